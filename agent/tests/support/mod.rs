//! Shared by the privileged integration tests.

#![allow(dead_code, reason = "each test binary uses a different subset")]

pub(crate) mod pg_lab;
pub(crate) mod pooler;

/// Runs the test when nothing is missing (`why` is None); otherwise skips
/// it with the reason, or fails under `cargo xtask test`
/// (FAROL_TEST_REQUIRE_PRIVILEGES=1), where a skip would hide a gap.
pub(crate) fn may_run(test: &str, why: Option<&str>) -> bool {
    match why {
        None => true,
        Some(why) if std::env::var_os("FAROL_TEST_REQUIRE_PRIVILEGES").is_some() => {
            panic!("{test}: {why}")
        }
        Some(why) => {
            eprintln!("skipping {test}: {why}");
            false
        }
    }
}

/// True when this test may load BPF programs and create namespaces.
/// Without root it skips (prints why); under `cargo xtask test`
/// (FAROL_TEST_REQUIRE_PRIVILEGES=1) a skip is a failure instead.
pub(crate) fn privileged(test: &str) -> bool {
    let why = if !xtask::is_root() {
        Some("needs root (BPF programs, network namespaces)")
    } else if farol_agent::dataplane::EBPF_OBJECT.is_empty() {
        Some("the agent was built without its eBPF object (run `cargo xtask build-ebpf`)")
    } else {
        None
    };
    may_run(test, why)
}

/// True when this test may mount FUSE file systems (root and /dev/fuse;
/// no eBPF object needed). Skips or fails like [`privileged`].
pub(crate) fn fuse_privileged(test: &str) -> bool {
    let why = if !xtask::is_root() {
        Some("needs root (FUSE mounts)")
    } else if !std::path::Path::new("/dev/fuse").exists() {
        Some("/dev/fuse is missing (modprobe fuse)")
    } else {
        None
    };
    may_run(test, why)
}

/// A node stays drained (its agent check says `drain`) until its supervised
/// Apache is ready, and `balancer` learns that at its next check. Waits
/// until every lab node says `ready` and `balancer` has seen it with the
/// backend up, so tests that count where flows go see all four.
pub(crate) fn wait_until_every_node_is_ready_at(lab: &xtask::lab::Lab, balancer: &str) {
    use std::time::Duration;
    for node in lab.nodes() {
        let url = format!("http://{}:9477/agent", node.ip());
        xtask::lab::wait_for(
            "every node's agent check to say ready",
            Duration::from_secs(30),
            || {
                let out = lab
                    .run(
                        xtask::lab::CLIENT,
                        "curl",
                        &["-sf", "--max-time", "1", &url],
                    )
                    .ok()?;
                (String::from_utf8_lossy(&out.stdout).trim() == "ready").then_some(())
            },
        )
        .unwrap();
    }
    xtask::lab::wait_for(
        &format!("{balancer} to see every node ready"),
        Duration::from_secs(30),
        || {
            let metrics = lab.metrics(balancer)?;
            lab.nodes()
                .iter()
                .all(|node| {
                    let labels = format!("service=\"web\",backend=\"{}\"", node.name);
                    metrics.get(&format!(
                        "farol_health_backend_admin_state{{{labels},state=\"ready\"}}"
                    )) == Some(&1)
                        && metrics.get(&format!("farol_lb_backend_up{{{labels}}}")) == Some(&1)
                })
                .then_some(())
        },
    )
    .unwrap();
}

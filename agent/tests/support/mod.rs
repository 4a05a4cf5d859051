//! Shared by the privileged integration tests.

#![allow(dead_code, reason = "each test binary uses a different subset")]

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

//! The volume across real network namespaces (the lab's nuster1..3 on a
//! bridge): a node cut off by a link failure (no TCP reset, only silence)
//! is detected by heartbeats, refuses writes with EROFS while the majority
//! goes on, and is healed identical when the link returns.

mod support;
mod volume_cluster;

use std::{fs, path::PathBuf, process::Output, time::Duration};

use volume_cluster::{assert_bricks_identical, wait_until, AGENT};
use xtask::lab::{unique_prefix, Lab, LabGuard, LabProcess};

const NODES: [&str; 3] = ["nuster1", "nuster2", "nuster3"];

/// Unmounts and removes the test directory last (declared first).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        for node in NODES {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.join(format!("mnt-{node}")))
                .output();
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn heal_info(lab: &Lab, config: &std::path::Path, node: &str) -> serde_json::Value {
    let out: Output = lab
        .command(node, AGENT)
        .args(["volume", "heal-info", "--json", "--node", node, "--config"])
        .arg(config)
        .output()
        .unwrap();
    if !out.status.success() {
        // Not listening yet: the callers poll.
        return serde_json::Value::Null;
    }
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    reports[0].clone()
}

#[test]
fn a_node_cut_off_by_a_link_failure_refuses_writes_and_heals_when_back() {
    if !support::fuse_privileged(
        "a_node_cut_off_by_a_link_failure_refuses_writes_and_heals_when_back",
    ) {
        return;
    }
    let prefix = unique_prefix("vol");
    let scratch = Scratch(std::env::temp_dir().join(format!("farol-{prefix}")));
    let dir = scratch.0.clone();
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("secret"), "lab volume secret 0123456789\n").unwrap();
    let mut text = format!(
        "[cluster]\nname = \"lab\"\nsecret_file = \"{}\"\n\n",
        dir.join("secret").display()
    );
    for (i, node) in NODES.iter().enumerate() {
        text.push_str(&format!(
            "[[node]]\nname = \"{node}\"\naddress = \"192.0.2.{}/24\"\ninterface = \"eth0\"\n\n",
            11 + i
        ));
    }
    text.push_str("[[volume]]\nname = \"www\"\npeer_timeout = \"1s\"\nreplicas = [\n");
    for node in NODES {
        text.push_str(&format!(
            "  {{ node = \"{node}\", brick = \"{}\", mount = \"{}\" }},\n",
            dir.join(format!("brick-{node}")).display(),
            dir.join(format!("mnt-{node}")).display()
        ));
    }
    text.push_str("]\n");
    let config = dir.join("cluster.toml");
    fs::write(&config, text).unwrap();

    let guard = LabGuard::up(Lab::new(&prefix).unwrap()).expect("lab up");
    let lab = guard.lab();
    let mut agents: Vec<LabProcess> = Vec::new();
    for node in NODES {
        let log = fs::File::create(dir.join(format!("{node}.log"))).unwrap();
        let mut command = lab.command(node, AGENT);
        command
            .args(["volume", "serve", "--node", node, "--config"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(log);
        agents.push(lab.spawn(node, &mut command, "agent").unwrap());
    }
    let mount = |node: &str| dir.join(format!("mnt-{node}"));
    let all_up = |node: &str| {
        let info = heal_info(lab, &config, node);
        info["current"] == true
            && info["peers"]
                .as_array()
                .is_some_and(|peers| peers.iter().all(|p| p["up"] == true))
    };
    wait_until(
        "every node sees the others",
        Duration::from_secs(30),
        || NODES.iter().all(|n| all_up(n)),
    );
    fs::write(mount("nuster1").join("before"), b"everyone has this").unwrap();
    assert_eq!(
        fs::read(mount("nuster3").join("before")).unwrap(),
        b"everyone has this"
    );

    // Cut nuster1's cable: its peers only notice by silence.
    let lan = lab.netns("lan");
    let status = std::process::Command::new("ip")
        .args(["-n", &lan, "link", "set", "nuster1", "down"])
        .status()
        .unwrap();
    assert!(status.success(), "link down");
    wait_until(
        "nuster1 sees both peers down",
        Duration::from_secs(15),
        || {
            heal_info(lab, &config, "nuster1")["peers"]
                .as_array()
                .is_some_and(|peers| peers.iter().all(|p| p["up"] == false))
        },
    );
    let error = fs::write(mount("nuster1").join("isolated"), b"x").unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EROFS), "{error}");
    wait_until("nuster2 sees nuster1 down", Duration::from_secs(15), || {
        heal_info(lab, &config, "nuster2")["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["node"] == "nuster1" && p["up"] == false)
    });
    for i in 0..50 {
        fs::write(
            mount("nuster2").join(format!("while-cut-{i}")),
            format!("{i}"),
        )
        .unwrap();
    }
    fs::write(
        mount("nuster3").join("before"),
        b"changed while nuster1 was cut off",
    )
    .unwrap();

    let status = std::process::Command::new("ip")
        .args(["-n", &lan, "link", "set", "nuster1", "up"])
        .status()
        .unwrap();
    assert!(status.success());
    wait_until("heal finished", Duration::from_secs(60), || {
        NODES.iter().all(|node| {
            let info = heal_info(lab, &config, node);
            info["current"] == true
                && info["peers"]
                    .as_array()
                    .is_some_and(|peers| peers.iter().all(|p| p["up"] == true && p["pending"] == 0))
        })
    });
    assert_eq!(
        fs::read(mount("nuster1").join("before")).unwrap(),
        b"changed while nuster1 was cut off"
    );
    assert_eq!(
        fs::read(mount("nuster1").join("while-cut-49")).unwrap(),
        b"49"
    );
    assert_bricks_identical(&dir.join("brick-nuster1"), &dir.join("brick-nuster2"));
    assert_bricks_identical(&dir.join("brick-nuster1"), &dir.join("brick-nuster3"));
    for agent in &mut agents {
        agent.terminate(Duration::from_secs(10)).unwrap();
    }
}

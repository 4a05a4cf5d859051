//! The volume across real network namespaces (the lab's nuster1..3 on a
//! bridge): a node cut off by a link failure (no TCP reset, only silence)
//! is detected by heartbeats, refuses writes with EROFS while the majority
//! goes on, and is healed identical when the link returns; a node whose
//! agent is killed during a stream of fsynced writes loses none of them
//! and is healed identical when it is started again.

mod support;
mod volume_cluster;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Output,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use volume_cluster::{assert_bricks_identical, wait_until, write_synced, AGENT};
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

fn heal_info(lab: &Lab, config: &Path, node: &str) -> serde_json::Value {
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

/// A fresh test directory with the secret and a three-node volume config
/// (bricks and mounts in it).
fn write_config(prefix: &str) -> (Scratch, PathBuf) {
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
    (scratch, config)
}

/// `agent volume serve` for `node` in its namespace (log appended to
/// `<dir>/<node>.log`, so a restart keeps the first run's).
fn spawn_agent(lab: &Lab, config: &Path, dir: &Path, node: &str) -> LabProcess {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{node}.log")))
        .unwrap();
    let mut command = lab.command(node, AGENT);
    command
        .args(["volume", "serve", "--node", node, "--config"])
        .arg(config)
        .env("FAROL_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log);
    lab.spawn(node, &mut command, "agent").unwrap()
}

/// Every node current, every peer up, nothing pending anywhere.
fn healed_everywhere(lab: &Lab, config: &Path) -> bool {
    NODES.iter().all(|node| {
        let info = heal_info(lab, config, node);
        info["current"] == true
            && info["peers"]
                .as_array()
                .is_some_and(|peers| peers.iter().all(|p| p["up"] == true && p["pending"] == 0))
    })
}

#[test]
fn a_node_cut_off_by_a_link_failure_refuses_writes_and_heals_when_back() {
    if !support::fuse_privileged(
        "a_node_cut_off_by_a_link_failure_refuses_writes_and_heals_when_back",
    ) {
        return;
    }
    let prefix = unique_prefix("vol");
    let (scratch, config) = write_config(&prefix);
    let dir = scratch.0.clone();
    let guard = LabGuard::up(Lab::new(&prefix).unwrap()).expect("lab up");
    let lab = guard.lab();
    let mut agents: Vec<LabProcess> = NODES
        .iter()
        .map(|node| spawn_agent(lab, &config, &dir, node))
        .collect();
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
        healed_everywhere(lab, &config)
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

/// nuster3's agent is killed (SIGKILL) in the middle of a stream of
/// fsynced writes through nuster1's mount, across the lab's bridge: the
/// stream goes on (quorum 2 of 3); the agent is started again and heals by
/// itself; every acknowledged write is on every replica and the bricks are
/// identical (checksums of every file).
#[test]
fn a_node_killed_during_fsynced_writes_loses_nothing_and_heals_when_back() {
    if !support::fuse_privileged(
        "a_node_killed_during_fsynced_writes_loses_nothing_and_heals_when_back",
    ) {
        return;
    }
    let prefix = unique_prefix("volk");
    let (scratch, config) = write_config(&prefix);
    let dir = scratch.0.clone();
    let guard = LabGuard::up(Lab::new(&prefix).unwrap()).expect("lab up");
    let lab = guard.lab();
    let mut agents: Vec<LabProcess> = NODES
        .iter()
        .map(|node| spawn_agent(lab, &config, &dir, node))
        .collect();
    let mount = |node: &str| dir.join(format!("mnt-{node}"));
    wait_until(
        "every node is healed and up",
        Duration::from_secs(30),
        || healed_everywhere(lab, &config),
    );
    fs::create_dir(mount("nuster1").join("stream")).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU32::new(0));
    let writer = {
        let dir = mount("nuster1").join("stream");
        let stop = stop.clone();
        let written = written.clone();
        std::thread::spawn(move || {
            let mut acknowledged = Vec::new();
            let mut failed = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut i = 0u32;
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline && i < 5000 {
                let body = format!("record {i}\n").repeat(200);
                match write_synced(&dir.join(format!("r{i:05}")), body.as_bytes()) {
                    Ok(()) => {
                        acknowledged.push((i, body));
                        written.store(i + 1, Ordering::SeqCst);
                    }
                    Err(error) => failed.push((i, error.to_string())),
                }
                i += 1;
            }
            (acknowledged, failed)
        })
    };
    wait_until("the stream started", Duration::from_secs(20), || {
        written.load(Ordering::SeqCst) >= 10
    });
    let before_kill = written.load(Ordering::SeqCst);
    agents[2].child_mut().kill().unwrap();
    agents[2].child_mut().wait().unwrap();
    // The killed agent's mount is left behind ("transport endpoint is not
    // connected"); the restarted agent replaces it.
    wait_until("nuster1 sees nuster3 down", Duration::from_secs(15), || {
        heal_info(lab, &config, "nuster1")["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["node"] == "nuster3" && p["up"] == false)
    });
    let at_down = written.load(Ordering::SeqCst);
    wait_until(
        "writes go on while nuster3 is down",
        Duration::from_secs(20),
        || written.load(Ordering::SeqCst) >= at_down + 20,
    );
    let while_down = written.load(Ordering::SeqCst) - before_kill;
    agents[2] = spawn_agent(lab, &config, &dir, "nuster3");
    // Writes keep coming while nuster3 catches up.
    let at_restart = written.load(Ordering::SeqCst);
    wait_until(
        "writes go on during the heal",
        Duration::from_secs(20),
        || written.load(Ordering::SeqCst) >= at_restart + 10,
    );
    stop.store(true, Ordering::SeqCst);
    let (acknowledged, failed) = writer.join().unwrap();
    assert!(
        failed.is_empty(),
        "quorum 2 of 3 kept every write working; failed: {failed:?}"
    );
    assert!(
        before_kill > 0 && while_down >= 20,
        "writes before the kill ({before_kill}) and while nuster3 was down ({while_down})"
    );
    eprintln!(
        "{} fsynced writes acknowledged: {before_kill} before the kill, {while_down} while nuster3 was down",
        acknowledged.len()
    );

    wait_until("heal finished", Duration::from_secs(90), || {
        healed_everywhere(lab, &config)
    });
    for node in NODES {
        let stream = dir.join(format!("brick-{node}")).join("stream");
        for (i, body) in &acknowledged {
            let path = stream.join(format!("r{i:05}"));
            let stored = fs::read(&path)
                .unwrap_or_else(|e| panic!("{} lost acknowledged write {i}: {e}", path.display()));
            assert_eq!(stored, body.as_bytes(), "write {i} on {node}");
        }
    }
    // Read back through the healed node's own mount as well.
    let (last, body) = acknowledged.last().unwrap();
    assert_eq!(
        fs::read(mount("nuster3").join(format!("stream/r{last:05}"))).unwrap(),
        body.as_bytes()
    );
    assert_bricks_identical(&dir.join("brick-nuster1"), &dir.join("brick-nuster2"));
    assert_bricks_identical(&dir.join("brick-nuster1"), &dir.join("brick-nuster3"));
    for agent in &mut agents {
        agent.terminate(Duration::from_secs(10)).unwrap();
    }
}

//! The replicated volume under what its users do with it: unpack a source
//! tarball, commit it with git, rsync a tree in; and a node killed in the
//! middle of a stream of writes, with every acknowledged write checked on
//! every replica afterwards.

mod support;
mod volume_cluster;

use std::{
    fs,
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use volume_cluster::{assert_bricks_identical, write_synced, Cluster};

/// Runs a command, panicking with its output when it fails.
fn run(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|error| panic!("{program}: {error}"));
    assert!(
        out.status.success(),
        "{program} {args:?} in {} failed:\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn workspace() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn a_source_tarball_unpacks_commits_and_rsyncs_onto_the_volume() {
    if !support::fuse_privileged("a_source_tarball_unpacks_commits_and_rsyncs_onto_the_volume") {
        return;
    }
    let mut cluster = Cluster::new("workload", 3, "");
    cluster.start_all();
    let m = cluster.mount(0);

    // A source tarball: this project's own agent and common crates.
    let scratch = std::env::temp_dir().join(format!("farol-workload-{}", std::process::id()));
    fs::create_dir_all(&scratch).unwrap();
    let tarball = scratch.join("src.tar.gz");
    run(
        workspace(),
        "tar",
        &[
            "czf",
            tarball.to_str().unwrap(),
            "--exclude=target",
            "agent/src",
            "common",
            "Cargo.toml",
        ],
    );
    fs::create_dir(m.join("project")).unwrap();
    let project = m.join("project");
    run(&project, "tar", &["xzf", tarball.to_str().unwrap()]);
    run(
        &project,
        "diff",
        &[
            "-r",
            "agent/src",
            workspace().join("agent/src").to_str().unwrap(),
        ],
    );

    // git: init, commit, fsck, a clean status, and a second commit.
    let git = |args: &[&str]| {
        let mut all = vec![
            "-c",
            "user.name=Farol",
            "-c",
            "user.email=farol@example.org",
        ];
        all.extend_from_slice(args);
        run(&project, "git", &all)
    };
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "unpacked"]);
    git(&["fsck", "--full", "--strict"]);
    assert_eq!(git(&["status", "--porcelain"]), "", "the tree is clean");
    fs::write(project.join("Cargo.toml"), "# edited on the volume\n").unwrap();
    git(&["commit", "-q", "-am", "edit"]);
    assert_eq!(git(&["rev-list", "--count", "HEAD"]).trim(), "2");

    // rsync a tree in, then a checksum dry run finds nothing to change.
    let source = workspace().join("xtask/src");
    let source_arg = format!("{}/", source.display());
    let target = format!("{}/", m.join("rsynced").display());
    run(workspace(), "rsync", &["-a", &source_arg, &target]);
    let changes = run(
        workspace(),
        "rsync",
        &[
            "-anc",
            "--delete",
            "--itemize-changes",
            &source_arg,
            &target,
        ],
    );
    assert_eq!(changes, "", "rsync sees identical trees");

    // Another node's mount sees the same repository, and the replicas hold
    // the same bytes.
    let other = cluster.mount(1).join("project");
    run(&other, "git", &["fsck", "--full"]);
    cluster.wait_healed(&[0, 1, 2]);
    assert_bricks_identical(&cluster.brick(0), &cluster.brick(1));
    assert_bricks_identical(&cluster.brick(0), &cluster.brick(2));
    let _ = fs::remove_dir_all(&scratch);
    for node in 0..3 {
        cluster.stop(node);
    }
}

/// Writes through node 1's mount without pause while node 3 is killed
/// (SIGKILL) and later restarted: every write that returned is on every
/// replica afterwards, byte for byte.
#[test]
fn a_node_killed_during_a_write_stream_loses_no_acknowledged_write() {
    if !support::fuse_privileged("a_node_killed_during_a_write_stream_loses_no_acknowledged_write")
    {
        return;
    }
    let mut cluster = Cluster::new("killstream", 3, "");
    cluster.start_all();
    let m = cluster.mount(0);
    fs::create_dir(m.join("stream")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU32::new(0));
    let writer = {
        let dir = m.join("stream");
        let stop = stop.clone();
        let written = written.clone();
        std::thread::spawn(move || {
            let mut acknowledged = Vec::new();
            let mut failed = 0;
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut i = 0u32;
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline && i < 5000 {
                let body = format!("record {i}\n").repeat(64);
                match write_synced(&dir.join(format!("r{i:05}")), body.as_bytes()) {
                    Ok(()) => {
                        acknowledged.push((i, body));
                        written.store(i + 1, Ordering::SeqCst);
                    }
                    Err(_) => failed += 1,
                }
                i += 1;
            }
            (acknowledged, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    let before_kill = written.load(Ordering::SeqCst);
    cluster.kill(2);
    std::thread::sleep(Duration::from_millis(1500));
    let while_down = written.load(Ordering::SeqCst) - before_kill;
    cluster.start(2);
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::SeqCst);
    let (acknowledged, failed) = writer.join().unwrap();
    assert!(
        acknowledged.len() >= 20,
        "the stream kept going: {} writes acknowledged, {failed} failed",
        acknowledged.len()
    );
    assert_eq!(failed, 0, "quorum 2 of 3 kept every write working");
    assert!(
        before_kill > 0 && while_down > 0,
        "writes before the kill ({before_kill}) and while node 3 was down ({while_down})"
    );
    eprintln!(
        "{} writes acknowledged: {before_kill} before the kill, {while_down} while node 3 was down",
        acknowledged.len()
    );

    cluster.wait_healed(&[0, 1, 2]);
    for node in 0..3 {
        let dir = cluster.brick(node).join("stream");
        for (i, body) in &acknowledged {
            let path = dir.join(format!("r{i:05}"));
            let stored = fs::read(&path)
                .unwrap_or_else(|e| panic!("{} lost acknowledged write {i}: {e}", path.display()));
            assert_eq!(stored, body.as_bytes(), "write {i} on replica {node}");
        }
    }
    assert_bricks_identical(&cluster.brick(0), &cluster.brick(2));
    assert_bricks_identical(&cluster.brick(1), &cluster.brick(2));
    for node in 0..3 {
        cluster.stop(node);
    }
}

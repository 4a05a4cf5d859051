//! Replication, quorum, self-heal and split brain of a three-replica
//! volume, with real agent processes on loopback and real FUSE mounts.

mod support;
mod volume_cluster;

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use volume_cluster::{assert_bricks_identical, wait_until, write_synced, Cluster};

/// Node 3 stops; writes go on with 2 of 3; node 3 comes back, the heal
/// brings its brick back byte for byte, and its mount serves the new data.
#[test]
fn writes_continue_with_one_replica_down_and_heal_makes_it_identical() {
    if !support::fuse_privileged(
        "writes_continue_with_one_replica_down_and_heal_makes_it_identical",
    ) {
        return;
    }
    let mut cluster = Cluster::new("heal", 3, "heal_rate_mib = 2\n");
    cluster.start_all();
    let m = cluster.mount(0);
    fs::create_dir(m.join("site")).unwrap();
    for i in 0..20 {
        write_synced(
            &m.join(format!("site/page-{i}.html")),
            format!("page {i}").as_bytes(),
        )
        .unwrap();
    }
    fs::create_dir(m.join("old")).unwrap();
    fs::write(m.join("old/a"), b"a").unwrap();

    cluster.stop(2);
    wait_until("node 1 sees node 3 down", Duration::from_secs(10), || {
        cluster.heal_info(0)["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["node"] == "n3" && p["up"] == false)
    });
    // Changes node 3 misses: new files, an overwrite, a delete, a renamed
    // tree, a 6 MiB file (several heal chunks), a chmod, a symlink.
    for i in 0..200 {
        write_synced(&m.join(format!("site/new-{i}.txt")), &vec![b'x'; 4096]).unwrap();
    }
    write_synced(
        &m.join("site/page-3.html"),
        b"page 3, edited while n3 was away",
    )
    .unwrap();
    fs::remove_file(m.join("site/page-4.html")).unwrap();
    fs::rename(m.join("old"), m.join("renamed")).unwrap();
    let big: Vec<u8> = (0..6 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    write_synced(&m.join("big.bin"), &big).unwrap();
    std::os::unix::fs::symlink("site/page-3.html", m.join("latest")).unwrap();
    fs::set_permissions(
        m.join("site/page-5.html"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    assert!(
        cluster.pending(0, 2) > 200,
        "node 1 records what node 3 missed"
    );
    assert!(
        cluster.pending(1, 2) > 200,
        "node 2 records it too (it knew node 3 was down)"
    );

    cluster.start(2);
    // Right after the restart, node 3's mount must not serve its stale
    // copy: reads wait until the heal made it current.
    assert_eq!(
        fs::read(cluster.mount(2).join("site/page-3.html")).unwrap(),
        b"page 3, edited while n3 was away"
    );
    assert!(!cluster.mount(2).join("site/page-4.html").exists());
    cluster.wait_healed(&[0, 1, 2]);
    assert_bricks_identical(&cluster.brick(0), &cluster.brick(2));
    assert_bricks_identical(&cluster.brick(1), &cluster.brick(2));
    let m3 = cluster.mount(2);
    assert_eq!(
        fs::read(m3.join("site/page-3.html")).unwrap(),
        b"page 3, edited while n3 was away"
    );
    assert_eq!(fs::read(m3.join("big.bin")).unwrap(), big);
    assert!(!m3.join("old").exists());
    assert_eq!(fs::read(m3.join("renamed/a")).unwrap(), b"a");
    // And node 3 takes writes again, replicated to the others.
    fs::write(m3.join("from-n3"), b"back").unwrap();
    assert_eq!(fs::read(m.join("from-n3")).unwrap(), b"back");
    for node in 0..3 {
        cluster.stop(node);
    }
}

/// With two of three nodes gone, the survivor refuses writes with EROFS
/// instead of diverging, and still serves reads.
#[test]
fn a_minority_side_refuses_writes_with_erofs() {
    if !support::fuse_privileged("a_minority_side_refuses_writes_with_erofs") {
        return;
    }
    let mut cluster = Cluster::new("minority", 3, "");
    cluster.start_all();
    let m = cluster.mount(0);
    fs::write(m.join("before"), b"kept").unwrap();
    cluster.stop(1);
    cluster.kill(2);
    wait_until(
        "node 1 sees both peers down",
        Duration::from_secs(10),
        || {
            cluster.heal_info(0)["peers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["up"] == false)
        },
    );
    let error = fs::write(m.join("after"), b"x").unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EROFS), "{error}");
    let error = fs::create_dir(m.join("dir")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EROFS), "{error}");
    let error = fs::remove_file(m.join("before")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EROFS), "{error}");
    assert_eq!(fs::read(m.join("before")).unwrap(), b"kept");
    assert!(cluster.counter(0, "writes_refused") >= 3);
    cluster.stop(0);
}

/// Writes return before the peers answer (write-behind), but `fsync`
/// does not claim what a quorum does not hold: with quorum 3, a replica
/// killed while a file's writes are on their way makes the writes or the
/// `fsync` fail, never all succeed; earlier writes synced before the kill
/// are on every brick.
#[test]
fn fsync_reports_writes_that_missed_their_quorum_behind_the_writer() {
    if !support::fuse_privileged("fsync_reports_writes_that_missed_their_quorum_behind_the_writer")
    {
        return;
    }
    let mut cluster = Cluster::new("behind", 3, "quorum = 3\n");
    cluster.start_all();
    let m = cluster.mount(0);
    let block = vec![0x42u8; 1 << 20];
    let mut file = fs::File::create(m.join("stream")).unwrap();
    for _ in 0..4 {
        file.write_all(&block).unwrap();
    }
    file.sync_all().unwrap();
    for node in 0..3 {
        assert_eq!(
            fs::metadata(cluster.brick(node).join("stream"))
                .unwrap()
                .len(),
            4 << 20,
            "node {node} holds the synced writes"
        );
    }
    for _ in 0..8 {
        file.write_all(&block).unwrap();
    }
    cluster.kill(2);
    let mut failed = None;
    for _ in 0..8 {
        if let Err(error) = file.write_all(&block) {
            failed = Some(error);
            break;
        }
    }
    let failed = failed.or_else(|| file.sync_all().err());
    let error = failed.expect("a write or fsync fails once a quorum of 3 is gone");
    assert!(
        matches!(error.raw_os_error(), Some(libc::EIO | libc::EROFS)),
        "{error}"
    );
    drop(file);
    cluster.stop(0);
    cluster.stop(1);
}

/// With quorum 1, node 1 alone and nodes 2+3 together both change the
/// same file; when they meet, the split brain is detected, counted, and
/// resolved by latest modification on every brick.
#[test]
fn divergence_with_quorum_one_is_detected_and_resolved_by_latest_mtime() {
    if !support::fuse_privileged(
        "divergence_with_quorum_one_is_detected_and_resolved_by_latest_mtime",
    ) {
        return;
    }
    let mut cluster = Cluster::new(
        "splitbrain",
        3,
        "quorum = 1\nsplit_brain = \"latest-mtime\"\n",
    );
    cluster.start_all();
    fs::write(cluster.mount(0).join("shared.txt"), b"original").unwrap();
    fs::write(cluster.mount(0).join("only-n1-changes.txt"), b"original").unwrap();

    // Partition: node 1 alone writes.
    cluster.stop(1);
    cluster.stop(2);
    write_synced(
        &cluster.mount(0).join("shared.txt"),
        b"written by n1 (older)",
    )
    .unwrap();
    write_synced(
        &cluster.mount(0).join("only-n1-changes.txt"),
        b"n1's change",
    )
    .unwrap();
    cluster.stop(0);

    // Nodes 2 and 3 meet without node 1 and write later.
    cluster.start(1);
    cluster.start(2);
    cluster.wait_connected(&[1, 2]);
    std::thread::sleep(Duration::from_millis(20));
    write_synced(
        &cluster.mount(1).join("shared.txt"),
        b"written by n2 (newer)",
    )
    .unwrap();

    // Node 1 returns: both sides changed shared.txt apart.
    cluster.start(0);
    cluster.wait_connected(&[0, 1, 2]);
    cluster.wait_healed(&[0, 1, 2]);
    let split_brains: u64 = (0..3).map(|n| cluster.counter(n, "split_brains")).sum();
    assert!(split_brains >= 1, "the split brain is detected and counted");
    for node in 0..3 {
        assert_eq!(
            fs::read(cluster.brick(node).join("shared.txt")).unwrap(),
            b"written by n2 (newer)",
            "node {node} keeps the latest copy"
        );
        assert_eq!(
            fs::read(cluster.brick(node).join("only-n1-changes.txt")).unwrap(),
            b"n1's change"
        );
    }
    assert_bricks_identical(&cluster.brick(0), &cluster.brick(1));
    assert_bricks_identical(&cluster.brick(0), &cluster.brick(2));
    for node in 0..3 {
        cluster.stop(node);
    }
}

/// A connection that sends garbage, or frames signed with another secret,
/// is closed and counted; the volume keeps working.
#[test]
fn a_peer_sending_garbage_frames_is_disconnected_and_counted() {
    if !support::fuse_privileged("a_peer_sending_garbage_frames_is_disconnected_and_counted") {
        return;
    }
    let mut cluster = Cluster::new("garbage", 3, "");
    cluster.start_all();
    let addr = format!("127.0.0.1:{}", cluster.port(0));
    let attempts: [&[u8]; 3] = [
        // a length prefix far beyond the frame limit
        &[0xff, 0xff, 0xff, 0xff, 1, 2, 3],
        // a frame too short to hold its tag
        &[0, 0, 0, 3, 1, 2, 3],
        // a 40-byte frame whose tag is wrong
        &[
            0, 0, 0, 40, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
            7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
        ],
    ];
    for bytes in attempts {
        let mut stream = TcpStream::connect(&addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(bytes).unwrap();
        let mut buf = [0u8; 64];
        // The agent closes the connection without answering.
        let read = stream.read(&mut buf);
        assert!(
            matches!(read, Ok(0)) || read.is_err(),
            "expected the connection to be closed, got {read:?}"
        );
    }
    wait_until(
        "three bad frames are counted",
        Duration::from_secs(5),
        || cluster.counter(0, "bad_frames") >= 3,
    );
    let metrics = cluster.metrics(0);
    for reason in ["too_long", "short", "bad_tag"] {
        let line = format!("farol_volume_bad_frames_total{{volume=\"www\",reason=\"{reason}\"}} 1");
        assert!(
            metrics.contains(&line),
            "expected {line:?} in /metrics:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("farol_volume_peer_up{volume=\"www\",peer=\"n2\"} 1"),
        "{metrics}"
    );
    fs::write(cluster.mount(0).join("still-works"), b"yes").unwrap();
    assert_eq!(
        fs::read(cluster.mount(2).join("still-works")).unwrap(),
        b"yes"
    );
    for node in 0..3 {
        cluster.stop(node);
    }
}

/// Bricks edited behind the agent's back are compared by `agent volume
/// heal --full` and healed to the latest copy.
#[test]
fn full_heal_repairs_bricks_changed_behind_the_agents_back() {
    if !support::fuse_privileged("full_heal_repairs_bricks_changed_behind_the_agents_back") {
        return;
    }
    let mut cluster = Cluster::new("fullheal", 3, "");
    cluster.start_all();
    fs::write(cluster.mount(0).join("page.html"), b"through the mount").unwrap();
    fs::write(
        cluster.mount(0).join("extra"),
        b"will vanish from one brick",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    // Behind the agents' backs: node 2's brick gets a newer page and a new
    // file; node 3's brick loses a file.
    fs::write(
        cluster.brick(1).join("page.html"),
        b"edited on the brick of n2",
    )
    .unwrap();
    fs::create_dir(cluster.brick(1).join("added")).unwrap();
    fs::write(cluster.brick(1).join("added/file"), b"new").unwrap();
    fs::remove_file(cluster.brick(2).join("extra")).unwrap();

    cluster.tool(0, &["heal", "--full"]);
    cluster.wait_healed(&[0, 1, 2]);
    assert_bricks_identical(&cluster.brick(0), &cluster.brick(1));
    assert_bricks_identical(&cluster.brick(0), &cluster.brick(2));
    assert_eq!(
        fs::read(cluster.mount(2).join("page.html")).unwrap(),
        b"edited on the brick of n2"
    );
    assert_eq!(
        fs::read(cluster.mount(0).join("added/file")).unwrap(),
        b"new"
    );
    assert_eq!(
        fs::read(cluster.brick(2).join("extra")).unwrap(),
        b"will vanish from one brick"
    );
    for node in 0..3 {
        cluster.stop(node);
    }
}

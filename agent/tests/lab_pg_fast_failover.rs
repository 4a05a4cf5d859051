//! The 2 s target (issue 9) with every timing at its default (lease 1 s +
//! 250 ms margin, election 750 ms, heartbeat 250 ms, `failover_after` 1 s),
//! synchronous replication: kill -9 of the primary's agent and postmaster
//! under a writer through nuster3's pooler; a synchronous standby is
//! promoted once a majority of voters' lease promises lapsed, writes come
//! back, and no acknowledged row is lost. Prints the time from the kill to
//! the first acknowledged write and asserts it is under 3 s (the target is
//! 2 s; the slack is for a loaded machine: with the former 3 s lease this
//! took 3.4-4.2 s), and not under the time the old primary's promises need
//! to lapse (the last one was asked for at most `lease / 4` before the
//! kill).

mod support;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use support::pg_lab::{
    acked, acked_after, first_ack_after, lost_rows, pg_may_run, pooled, write_rows, Attempt,
    PgCluster, PgOptions, PG_IPS,
};
use xtask::lab::wait_for;

/// Writes back this soon after the kill at the latest (target 2 s, slack
/// for a loaded machine).
const BOUND: Duration = Duration::from_secs(3);

#[test]
fn the_death_of_the_primarys_node_brings_writes_back_within_the_default_lease() {
    let test = "the_death_of_the_primarys_node_brings_writes_back_within_the_default_lease";
    if !pg_may_run(test) {
        return;
    }
    let cluster = PgCluster::start(
        "pgfast",
        &PgOptions {
            synchronous: true,
            cluster_timing: "",
            failover_after: "1s",
            ..PgOptions::default()
        },
    );
    let attempts = Mutex::new(Vec::<Attempt>::new());
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut killed_at = None;
    std::thread::scope(|scope| {
        let (lab, attempts_ref, stop_ref) = (&cluster.lab, &attempts, &stop);
        scope.spawn(move || {
            write_rows(
                lab,
                &pooled(PG_IPS[2]),
                "w",
                1,
                stop_ref,
                deadline,
                attempts_ref,
            )
        });
        wait_for("rows before the kill", Duration::from_secs(20), || {
            (acked(&attempts.lock().unwrap()) >= 20).then_some(())
        })
        .unwrap();
        cluster.kill_node("nuster1");
        let killed = Instant::now();
        killed_at = Some(killed);
        let back = wait_for("writes on a new primary", Duration::from_secs(45), || {
            (acked_after(&attempts.lock().unwrap(), killed) >= 5).then_some(())
        });
        stop.store(true, Ordering::SeqCst);
        back.unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.logs()));
    });
    let killed = killed_at.unwrap();
    let attempts = attempts.into_inner().unwrap();
    let first_back = first_ack_after(&attempts, killed).unwrap();
    let new_primary = cluster
        .primary()
        .unwrap_or_else(|| panic!("no single primary\n{}", cluster.logs()));
    let rows = cluster.rows(new_primary);
    let lost = lost_rows(&attempts, &rows);
    eprintln!(
        "default lease: writes back {:?} after kill -9 of the primary node, on {new_primary}; {} acknowledged, {} lost",
        first_back - killed,
        attempts.iter().filter(|a| a.server.is_some()).count(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged rows lost: {lost:?}\n{}",
        cluster.logs()
    );
    let logs = cluster.logs();
    assert!(
        logs.contains("made primary (epoch 2)"),
        "no failover\n{logs}"
    );
    for line in logs.lines().filter(|line| {
        line.starts_with("---")
            || [
                "made primary",
                "primary lease gained",
                "promoted",
                "lease promises revoked",
            ]
            .iter()
            .any(|what| line.contains(what))
    }) {
        eprintln!("{line}");
    }
    // One failover, none after it: the short lease is not lost by the new
    // primary on a loaded machine (the voters' promises need no Raft
    // leader, and a renewal has the whole lease to come back).
    assert!(
        !logs.contains("made primary (epoch 3)"),
        "a second failover after the first\n{logs}"
    );
    assert!(
        logs.contains("lease promises revoked"),
        "the failover did not go through the voters' revocation\n{logs}"
    );
    let lease = farol_agent::config::cluster_state::DEFAULT_LEASE;
    let margin = farol_agent::config::cluster_state::DEFAULT_LEASE_MARGIN;
    assert!(
        first_back - killed >= lease + margin - lease / 4 - Duration::from_millis(100),
        "writes back {:?} after the kill: before the old primary's promises lapsed\n{logs}",
        first_back - killed
    );
    assert!(
        first_back - killed < BOUND,
        "writes back only {:?} after the kill (bound {BOUND:?})\n{logs}",
        first_back - killed
    );
}

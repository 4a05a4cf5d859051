//! The 2 s target (issue 9): the failover of `lab_pg_failover` with
//! shorter timings than the defaults (`lease = "1.5s"`, `lease_margin =
//! "250ms"`, `election_timeout = "500ms"`, `heartbeat_interval = "150ms"`,
//! `failover_after = "500ms"`),
//! synchronous replication: kill -9 of the primary's agent and postmaster
//! under a writer through nuster3's pooler; a synchronous standby is
//! promoted, writes come back, and no acknowledged row is lost. Prints the
//! time from the kill to the first acknowledged write. Ignored by default:
//! see the attribute.

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

#[test]
#[ignore = "with election_timeout 500 ms the Raft leader flapped on the shared 2-vCPU machine (load 15-33: 66 elections and 25 lost leases in 90 s, the cluster never settled); run with --ignored on a quieter machine"]
fn a_shorter_lease_brings_writes_back_sooner_without_losing_any() {
    let test = "a_shorter_lease_brings_writes_back_sooner_without_losing_any";
    if !pg_may_run(test) {
        return;
    }
    let cluster = PgCluster::start(
        "pgfast",
        &PgOptions {
            synchronous: true,
            cluster_timing:
                "lease = \"1.5s\"\nlease_margin = \"250ms\"\nelection_timeout = \"500ms\"\nheartbeat_interval = \"150ms\"",
            failover_after: "500ms",
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
        "lease 1.5 s: writes back {:?} after kill -9 of the primary node, on {new_primary}; {} acknowledged, {} lost",
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
            || ["made primary", "primary lease gained", "promoted"]
                .iter()
                .any(|what| line.contains(what))
    }) {
        eprintln!("{line}");
    }
}

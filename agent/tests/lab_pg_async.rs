//! Asynchronous replication in the namespace lab (issue 9): three agents
//! with `[cluster_state]`, asynchronous PostgreSQL and `[pooler]`.
//!
//! - The primary node dies (agent and postmaster, SIGKILL) under a writer
//!   through nuster3's pooler: a standby is promoted, writes come back, and
//!   the acknowledged writes lost are bounded by `max_lag_bytes` (counted,
//!   and their WAL measured against the bound).
//! - Both standbys stop receiving (their WAL receivers get SIGSTOP), the
//!   primary writes 4 MB more, then dies: with `max_lag_bytes = 1MB` no
//!   standby is promoted (the decider says why), rather than one that
//!   would silently lose 4 MB of acknowledged writes.

mod support;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use support::pg_lab::{
    acked, acked_after, direct, first_ack_after, lost_rows, pg_may_run, pooled, psql, status_code,
    write_rows, Attempt, PgCluster, PgOptions, PG_IPS,
};
use xtask::lab::wait_for;

fn wal_lsn(cluster: &PgCluster) -> u64 {
    let text = psql(
        &cluster.lab,
        &direct(PG_IPS[0]),
        "SELECT pg_current_wal_lsn() - '0/0'",
    )
    .unwrap();
    text.parse().unwrap()
}

#[test]
fn an_asynchronous_failover_loses_at_most_max_lag_of_acknowledged_writes() {
    let test = "an_asynchronous_failover_loses_at_most_max_lag_of_acknowledged_writes";
    if !pg_may_run(test) {
        return;
    }
    let max_lag_bytes: u64 = 16 << 20;
    let cluster = PgCluster::start(
        "pgasync",
        &PgOptions {
            synchronous: false,
            max_lag_bytes: "16MB",
            ..PgOptions::default()
        },
    );
    let attempts = Mutex::new(Vec::<Attempt>::new());
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut killed_at = None;
    let mut wal_per_row = 0;
    std::thread::scope(|scope| {
        let (lab, attempts_ref, stop_ref) = (&cluster.lab, &attempts, &stop);
        let start_lsn = wal_lsn(&cluster);
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
            (acked(&attempts.lock().unwrap()) >= 30).then_some(())
        })
        .unwrap();
        let rows_acked = acked(&attempts.lock().unwrap()) as u64;
        wal_per_row = (wal_lsn(&cluster) - start_lsn) / rows_acked.max(1);
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
    let lost_bytes = lost.len() as u64 * wal_per_row;
    eprintln!(
        "asynchronous failover: writes back {:?} after kill -9 of the primary node, on {new_primary}; {} acknowledged, {} lost ({lost:?}; ~{wal_per_row} bytes of WAL each, ~{lost_bytes} bytes, bound {max_lag_bytes})",
        first_back - killed,
        attempts.iter().filter(|a| a.server.is_some()).count(),
        lost.len(),
    );
    assert!(wal_per_row > 0);
    assert!(
        lost_bytes <= max_lag_bytes,
        "lost more than max_lag_bytes of acknowledged writes\n{}",
        cluster.logs()
    );
    let logs = cluster.logs();
    assert!(
        logs.contains("made primary (epoch 2)"),
        "no failover decision\n{logs}"
    );
}

#[test]
fn standbys_beyond_max_lag_are_not_promoted() {
    let test = "standbys_beyond_max_lag_are_not_promoted";
    if !pg_may_run(test) {
        return;
    }
    let cluster = PgCluster::start(
        "pglag",
        &PgOptions {
            synchronous: false,
            max_lag_bytes: "1MB",
            ..PgOptions::default()
        },
    );
    // Both standbys 4 MB behind a 1 MB bound, seen by every agent.
    let _stalled = cluster.stall_standbys_4mb_behind();
    cluster.kill_node("nuster1");
    let killed = Instant::now();
    // Lease (3 s) + margin (0.5 s) + failover_after, then some.
    let logs = wait_for("the decider to refuse", Duration::from_secs(20), || {
        let logs = cluster.logs();
        logs.contains("no standby is fit to promote (answering: [\"nuster2\", \"nuster3\"]")
            .then_some(logs)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.logs()));
    while killed.elapsed() < Duration::from_secs(8) {
        for ip in &PG_IPS[1..] {
            assert_ne!(
                status_code(&cluster.lab, &format!("http://{ip}:8008/primary"), 2),
                200,
                "{ip} was promoted although beyond max_lag_bytes\n{}",
                cluster.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(!logs.contains("made primary (epoch 2)"), "{logs}");
    let refusal = logs
        .lines()
        .find(|line| line.contains("no standby is fit to promote (answering: [\"nuster2\""))
        .unwrap();
    eprintln!("{refusal}");
}

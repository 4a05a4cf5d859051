//! Planned switchover in the namespace lab (issue 9): `agent pg switchover
//! NODE` under a write workload through the pooler, three agents with
//! `[cluster_state]`, asynchronous PostgreSQL (so only the switchover's
//! wait for the target's replay keeps acknowledged commits) and `[pooler]`.
//! Refusals first: an unknown node, the current primary, a standby too far
//! behind. Then nuster1 → nuster2 asked on nuster3 (forwarded to the lease
//! holder), then back nuster2 → nuster1 asked on nuster1 (the old primary,
//! rejoined as a standby): every acknowledged commit is on the new primary,
//! the old primary streams from it, and the errors and the unavailability
//! the writers saw are reported.

mod support;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use support::pg_lab::{
    acked, direct, lost_rows, pg_may_run, pooled, psql, status_code, write_rows, Attempt,
    PgCluster, PgOptions, PG_IPS,
};
use xtask::lab::wait_for;

/// One switchover under two writers; returns what they saw.
fn switch_under_load(cluster: &PgCluster, via: &str, target: &str, first_id: i32) -> Vec<Attempt> {
    let attempts = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut answer = None;
    std::thread::scope(|scope| {
        for (writer, pooler) in [PG_IPS[2], PG_IPS[1]].into_iter().enumerate() {
            let (attempts, stop) = (&attempts, &stop);
            let lab = &cluster.lab;
            scope.spawn(move || {
                write_rows(
                    lab,
                    &pooled(pooler),
                    "w",
                    first_id + writer as i32 * 100_000,
                    stop,
                    deadline,
                    attempts,
                )
            });
        }
        wait_for(
            "writes before the switchover",
            Duration::from_secs(20),
            || (acked(&attempts.lock().unwrap()) >= 20).then_some(()),
        )
        .unwrap();
        let started = Instant::now();
        let result = cluster.pg_cli(via, &["switchover", target]);
        eprintln!(
            "agent pg switchover {target} on {via}: {:?} after {:?}",
            result,
            started.elapsed()
        );
        answer = Some((result, started));
        // Writes continue a while on the new primary.
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::SeqCst);
    });
    let (result, started) = answer.unwrap();
    result.unwrap_or_else(|e| panic!("switchover to {target} failed: {e}\n{}", cluster.logs()));
    let attempts = attempts.into_inner().unwrap();
    let target_ip = PG_IPS[target
        .trim_start_matches("nuster")
        .parse::<usize>()
        .unwrap()
        - 1];
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| a.server.is_none()).collect();
    let last_old = attempts
        .iter()
        .filter(|a| a.server.as_deref().is_some_and(|s| s != target_ip))
        .map(|a| a.done)
        .max();
    let first_new = attempts
        .iter()
        .filter(|a| a.server.as_deref() == Some(target_ip) && a.sent >= started)
        .map(|a| a.done)
        .min()
        .unwrap_or_else(|| panic!("no write on {target} after the switchover"));
    // The longest gap between acknowledged commits around the switchover.
    let mut acked: Vec<Instant> = attempts
        .iter()
        .filter(|a| a.server.is_some())
        .map(|a| a.done)
        .collect();
    acked.sort();
    let gap = acked
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
    for attempt in &failed {
        let error = attempt.error.clone().unwrap_or_default();
        let first = error.lines().next().unwrap_or_default().to_owned();
        *kinds.entry(first.chars().take(110).collect()).or_default() += 1;
    }
    eprintln!(
        "switchover to {target}: {} commits acknowledged, {} failed (errors: {kinds:#?}); first commit on {target} {:?} after the command started; longest gap between acknowledged commits {gap:?}; last on the old primary {:?} after the start",
        attempts.len() - failed.len(),
        failed.len(),
        first_new - started,
        last_old.map(|at| at.saturating_duration_since(started)),
    );
    attempts
}

/// Every acknowledged row is on the primary at `ip`; errors are rows that
/// may or may not be there (the client cannot know), never counted.
fn assert_none_lost(cluster: &PgCluster, ip: &str, attempts: &[Attempt]) {
    let rows = cluster.rows(ip);
    let lost = lost_rows(attempts, &rows);
    assert!(
        lost.is_empty(),
        "acknowledged commits missing on {ip}: {lost:?}\n{}",
        cluster.logs()
    );
    let failed_but_there = attempts
        .iter()
        .filter(|a| a.server.is_none() && rows.contains(&a.id))
        .count();
    eprintln!(
        "{} acknowledged rows all on {ip}; {failed_but_there} rows whose commit returned an error are there too (committed, acknowledgement lost)",
        attempts.iter().filter(|a| a.server.is_some()).count()
    );
}

#[test]
fn switchover_under_load_loses_no_committed_transaction() {
    let test = "switchover_under_load_loses_no_committed_transaction";
    if !pg_may_run(test) {
        return;
    }
    let cluster = PgCluster::start(
        "pgsw",
        &PgOptions {
            synchronous: false,
            max_lag_bytes: "1MB",
            ..PgOptions::default()
        },
    );

    // Refusals, each with its reason, and nothing changes.
    let unknown = cluster
        .pg_cli("nuster3", &["switchover", "nuster9"])
        .unwrap_err();
    assert!(unknown.contains("not a PostgreSQL node"), "{unknown}");
    let already = cluster
        .pg_cli("nuster2", &["switchover", "nuster1"])
        .unwrap_err();
    assert!(already.contains("already the primary"), "{already}");
    // nuster3 stops replaying; 4 MB of WAL later it is beyond max_lag_bytes.
    psql(
        &cluster.lab,
        &direct(PG_IPS[2]),
        "SELECT pg_wal_replay_pause()",
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    psql(
        &cluster.lab,
        &direct(PG_IPS[0]),
        "CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 20000) g",
    )
    .unwrap();
    let behind = cluster
        .pg_cli("nuster2", &["switchover", "nuster3"])
        .unwrap_err();
    assert!(behind.contains("not a caught-up standby"), "{behind}");
    eprintln!("refused: {unknown}\nrefused: {already}\nrefused: {behind}");
    psql(
        &cluster.lab,
        &direct(PG_IPS[2]),
        "SELECT pg_wal_replay_resume()",
    )
    .unwrap();
    assert_eq!(
        cluster.primary(),
        Some(PG_IPS[0]),
        "a refusal changed nothing"
    );

    // nuster1 → nuster2, asked on nuster3.
    let first = switch_under_load(&cluster, "nuster3", "nuster2", 1);
    assert_eq!(cluster.primary(), Some(PG_IPS[1]), "\n{}", cluster.logs());
    assert_none_lost(&cluster, PG_IPS[1], &first);
    for (ip, what) in [(PG_IPS[0], "the old primary"), (PG_IPS[2], "nuster3")] {
        wait_for(
            &format!("{what} streams from nuster2"),
            Duration::from_secs(60),
            || {
                (status_code(&cluster.lab, &format!("http://{ip}:8008/replica"), 2) == 200)
                    .then_some(())
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.logs()));
    }
    wait_for("two standbys of nuster2 caught up", Duration::from_secs(30), || {
        (psql(&cluster.lab, &direct(PG_IPS[1]), "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND replay_lsn = pg_current_wal_lsn()").ok()? == "2").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.logs()));

    // And back, asked on nuster1 (a standby now).
    let second = switch_under_load(&cluster, "nuster1", "nuster1", 1_000_000);
    assert_eq!(cluster.primary(), Some(PG_IPS[0]), "\n{}", cluster.logs());
    let mut all = first;
    all.extend(second);
    assert_none_lost(&cluster, PG_IPS[0], &all);
    wait_for(
        "nuster2 streams from nuster1",
        Duration::from_secs(60),
        || (status_code(&cluster.lab, "http://192.0.2.12:8008/replica", 2) == 200).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.logs()));
    let logs = cluster.logs();
    assert!(logs.contains("PostgreSQL switchover done"), "{logs}");
    assert!(
        !logs.contains("made primary (epoch"),
        "a failover happened during a switchover\n{logs}"
    );
}

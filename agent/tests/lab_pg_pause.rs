//! The poolers' pause around a planned switchover (issue 9), in the
//! namespace lab: three `agent run` with `[cluster_state]`, asynchronous
//! PostgreSQL and `[pooler]`; pgbench (4 clients on kept connections,
//! one INSERT per transaction) through nuster3's pooler and a psql writer
//! (a new connection per INSERT) through nuster2's, while `agent pg
//! switchover nuster2` runs. Every transaction a client sent succeeds
//! (none fails: they are held, then run on the new primary), every one is
//! on the new primary, and the poolers say how long they held them.

mod support;

use std::{
    process::Stdio,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use support::pg_lab::{
    acked, direct, pg_may_run, pooled, psql, write_rows, Attempt, PgCluster, PgOptions,
    APP_PASSWORD, PG_IPS,
};
use xtask::lab::{wait_for, CLIENT};

/// pgbench's run: how long, and when the switchover starts in it.
const PGBENCH_SECONDS: u64 = 14;
const SWITCH_AFTER: Duration = Duration::from_secs(4);

/// The admin console's `SHOW STATS` of the pooler at `ip`:
/// (total_held_count, total_held_time_us) summed over its pools.
fn held_stats(cluster: &PgCluster, ip: &str) -> (u64, u64) {
    let conninfo = format!(
        "host={ip} port=6432 user=app password={APP_PASSWORD} dbname=farol connect_timeout=2"
    );
    let out = psql(&cluster.lab, &conninfo, "SHOW STATS").unwrap();
    out.lines().fold((0, 0), |(count, micros), line| {
        let fields: Vec<&str> = line.split('|').collect();
        (
            count + fields[7].parse::<u64>().unwrap(),
            micros + fields[8].parse::<u64>().unwrap(),
        )
    })
}

#[test]
fn switchover_under_pgbench_through_paused_poolers_fails_no_transaction() {
    let test = "switchover_under_pgbench_through_paused_poolers_fails_no_transaction";
    if !pg_may_run(test) {
        return;
    }
    let cluster = PgCluster::start(
        "pgpause",
        &PgOptions {
            synchronous: false,
            max_lag_bytes: "16MB",
            ..PgOptions::default()
        },
    );
    psql(
        &cluster.lab,
        &direct(PG_IPS[0]),
        "CREATE TABLE pb (id bigserial PRIMARY KEY, client int NOT NULL); GRANT ALL ON pb TO app; GRANT ALL ON SEQUENCE pb_id_seq TO app",
    )
    .unwrap();
    let script = cluster.dir.join("insert.sql");
    std::fs::write(&script, "INSERT INTO pb (client) VALUES (:client_id);\n").unwrap();
    let log_prefix = cluster.dir.join("pgbench");

    let attempts: Mutex<Vec<Attempt>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut switch = None;
    let mut bench = None;
    std::thread::scope(|scope| {
        let (attempts, stop, lab) = (&attempts, &stop, &cluster.lab);
        scope.spawn(move || write_rows(lab, &pooled(PG_IPS[1]), "w", 1, stop, deadline, attempts));
        let pgbench = cluster
            .lab
            .command(CLIENT, format!("{}/pgbench", xtask::postgres::PG_BIN))
            .args([
                "-n",
                "-c",
                "4",
                "-j",
                "2",
                "-T",
                &PGBENCH_SECONDS.to_string(),
                "-l",
            ])
            .arg(format!("--log-prefix={}", log_prefix.display()))
            .arg("-f")
            .arg(&script)
            .arg(format!(
                "host={} port=6432 user=app password={APP_PASSWORD} dbname=postgres",
                PG_IPS[2]
            ))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pgbench_started = Instant::now();
        std::thread::sleep(SWITCH_AFTER);
        assert!(
            acked(&attempts.lock().unwrap()) >= 5,
            "the psql writer commits before the switchover"
        );
        let started = Instant::now();
        let result = cluster.pg_cli("nuster3", &["switchover", "nuster2"]);
        let took = started.elapsed();
        eprintln!("agent pg switchover nuster2 on nuster3: {result:?} after {took:?}");
        switch = Some((result, started, took));
        let out = pgbench.wait_with_output().unwrap();
        bench = Some((out, pgbench_started.elapsed()));
        // A little more of the psql writer on the new primary.
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::SeqCst);
    });
    let (result, started, _) = switch.unwrap();
    let answer = result.unwrap_or_else(|e| panic!("switchover failed: {e}\n{}", cluster.logs()));
    assert!(answer.contains("poolers paused after"), "{answer}");
    assert_eq!(cluster.primary(), Some(PG_IPS[1]), "\n{}", cluster.logs());

    // pgbench: every transaction succeeded, and each is on the new primary.
    let (out, ran) = bench.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "pgbench failed ({:?}):\n{stdout}\n{stderr}\n{}",
        out.status,
        cluster.logs()
    );
    assert!(
        !stderr.contains("aborted"),
        "a pgbench client aborted:\n{stderr}"
    );
    if stdout.contains("number of failed transactions") {
        assert!(
            stdout.contains("number of failed transactions: 0 "),
            "{stdout}"
        );
    }
    let processed: u64 = stdout
        .lines()
        .find_map(|line| line.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split('/').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in pgbench's output:\n{stdout}"));
    // Per-transaction latencies (µs) from pgbench's logs.
    let mut latencies: Vec<u64> = Vec::new();
    for entry in std::fs::read_dir(&cluster.dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("pgbench.") {
            let text = std::fs::read_to_string(&path).unwrap();
            latencies.extend(
                text.lines()
                    .filter_map(|line| line.split_whitespace().nth(2)?.parse::<u64>().ok()),
            );
        }
    }
    assert_eq!(
        latencies.len() as u64,
        processed,
        "pgbench logged every processed transaction"
    );
    let on_new: u64 = psql(&cluster.lab, &direct(PG_IPS[1]), "SELECT count(*) FROM pb")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        on_new, processed,
        "every pgbench transaction is on the new primary (and nothing else)"
    );
    latencies.sort_unstable();
    let slow: Vec<u64> = latencies.iter().rev().take(5).copied().collect();

    // The psql writer: no attempt failed, every one on the new primary.
    let attempts = attempts.into_inner().unwrap();
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| a.server.is_none()).collect();
    assert!(
        failed.is_empty(),
        "psql attempts failed during the switchover: {:#?}\n{}",
        failed,
        cluster.logs()
    );
    let rows = cluster.rows(PG_IPS[1]);
    assert!(attempts.iter().all(|a| rows.contains(&a.id)));
    assert!(
        attempts
            .iter()
            .any(|a| a.sent > started && a.server.as_deref() == Some(PG_IPS[1])),
        "the psql writer committed on the new primary"
    );
    let longest_psql = attempts.iter().map(|a| a.done - a.sent).max().unwrap();

    // The poolers held transactions and say for how long.
    let (held3, held3_us) = held_stats(&cluster, PG_IPS[2]);
    let (held2, held2_us) = held_stats(&cluster, PG_IPS[1]);
    assert!(held3 >= 1, "nuster3's pooler held pgbench's transactions");
    // The same on /metrics, with the pause itself.
    let metrics = cluster.lab.metrics("nuster3").expect("nuster3's /metrics");
    let metric = |name: &str| metrics.get(name).copied().unwrap_or_default();
    assert_eq!(
        metric("farol_pooler_held_transactions_total"),
        held3,
        "{metrics:#?}"
    );
    assert_eq!(
        metric("farol_pooler_pauses_total{reason=\"switchover\"}"),
        1,
        "{metrics:#?}"
    );
    assert_eq!(metric("farol_pooler_paused"), 0, "resumed: {metrics:#?}");
    assert_eq!(metric("farol_pooler_hold_timeouts_total"), 0);
    assert_eq!(metric("farol_pooler_pause_cut_transactions_total"), 0);
    let logs = cluster.logs();
    assert!(logs.contains("pooler paused"), "{logs}");
    assert!(logs.contains("pooler resumed"), "{logs}");
    assert!(
        !logs.contains("made primary (epoch"),
        "a failover happened\n{logs}"
    );
    eprintln!(
        "pgbench: {processed} transactions in {ran:?}, 0 failed, all on nuster2; slowest (µs): {slow:?}\n\
         psql writer: {} commits, 0 failed, all on nuster2, slowest {longest_psql:?}\n\
         held by nuster3's pooler: {held3} transactions, {:.1} ms on average; by nuster2's: {held2}, {:.1} ms on average\n\
         switchover answer: {answer}",
        attempts.len(),
        held3_us as f64 / held3.max(1) as f64 / 1000.0,
        held2_us as f64 / held2.max(1) as f64 / 1000.0,
    );
    wait_for(
        "nuster1 streams from nuster2",
        Duration::from_secs(60),
        || {
            (support::pg_lab::status_code(&cluster.lab, "http://192.0.2.11:8008/replica", 2) == 200)
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.logs()));
}

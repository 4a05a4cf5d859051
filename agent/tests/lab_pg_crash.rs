//! The primary's postmaster dies and its agent lives (issue 9): three
//! agents with `[cluster_state]` (lease 3 s, longer than the default, so
//! that the time shows the lease was not waited for), synchronous
//! PostgreSQL and `[pooler]`; a writer commits numbered rows through
//! nuster3's pooler; nuster1's postmaster gets SIGKILL. Its agent sees the
//! exit, gives its lease up and hands the primary over to the most
//! advanced synchronous standby at once: writes come back well before the
//! lease could have run out, no acknowledged row is lost, and nuster1 is
//! rewound and streams from the new primary.

mod support;

/// Longer than the default lease (1 s + 250 ms), so that writes back
/// within 3 s can only come from the handoff.
const LONG_LEASE: &str = "lease = \"3s\"\nlease_margin = \"500ms\"";

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

#[test]
fn a_dead_postmaster_is_handed_over_without_waiting_for_the_lease() {
    let test = "a_dead_postmaster_is_handed_over_without_waiting_for_the_lease";
    if !pg_may_run(test) {
        return;
    }
    let cluster = PgCluster::start(
        "pgcrash",
        &PgOptions {
            cluster_timing: LONG_LEASE,
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
        let postmaster = cluster
            .postmaster_pid("nuster1")
            .expect("nuster1's postmaster");
        // SAFETY: kill(2) on this test's postmaster of nuster1 (its agent
        // lives on).
        unsafe { libc::kill(postmaster, libc::SIGKILL) };
        let killed = Instant::now();
        killed_at = Some(killed);
        let back = wait_for("writes on a new primary", Duration::from_secs(30), || {
            (acked_after(&attempts.lock().unwrap(), killed) >= 5).then_some(())
        });
        stop.store(true, Ordering::SeqCst);
        back.unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.logs()));
    });
    let killed = killed_at.unwrap();
    let attempts = attempts.into_inner().unwrap();
    let first_back = first_ack_after(&attempts, killed).unwrap() - killed;
    let new_primary = cluster
        .primary()
        .unwrap_or_else(|| panic!("no single primary\n{}", cluster.logs()));
    assert_ne!(new_primary, PG_IPS[0], "{}", cluster.logs());
    let rows = cluster.rows(new_primary);
    let lost = lost_rows(&attempts, &rows);
    eprintln!(
        "postmaster killed: writes back {first_back:?} later on {new_primary}; {} acknowledged, {} lost",
        acked(&attempts),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged rows missing on {new_primary}: {lost:?}\n{}",
        cluster.logs()
    );
    let logs = cluster.logs();
    assert!(
        logs.contains("after its postmaster died"),
        "no handoff after the crash logged\n{logs}"
    );
    // The lease (3 s + 0.5 s margin here) was not waited for: the handoff
    // needs none. Generous for a loaded machine, and still below the lease.
    assert!(
        first_back < Duration::from_millis(3000),
        "writes back only {first_back:?} after the kill\n{logs}"
    );
    // nuster1's agent rewinds its server onto the new primary.
    wait_for(
        "nuster1 streaming from the new primary",
        Duration::from_secs(60),
        || (status_code(&cluster.lab, "http://192.0.2.11:8008/replica", 2) == 200).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.logs()));
}

/// No standby may take over (asynchronous, both 4 MB behind with
/// `max_lag_bytes = 1MB`): the agent keeps the primary and restarts its
/// server in place, with every acknowledged row.
#[test]
fn a_dead_postmaster_with_no_fit_standby_restarts_in_place() {
    let test = "a_dead_postmaster_with_no_fit_standby_restarts_in_place";
    if !pg_may_run(test) {
        return;
    }
    let cluster = PgCluster::start(
        "pgcrlag",
        &PgOptions {
            synchronous: false,
            max_lag_bytes: "1MB",
            ..PgOptions::default()
        },
    );
    // Both standbys 4 MB behind a 1 MB bound, seen by every agent.
    let _stalled = cluster.stall_standbys_4mb_behind();
    let postmaster = cluster
        .postmaster_pid("nuster1")
        .expect("nuster1's postmaster");
    // SAFETY: kill(2) on this test's postmaster of nuster1.
    unsafe { libc::kill(postmaster, libc::SIGKILL) };
    let killed = Instant::now();
    let back = wait_for("nuster1 primary again", Duration::from_secs(30), || {
        for ip in &PG_IPS[1..] {
            assert_ne!(
                status_code(&cluster.lab, &format!("http://{ip}:8008/primary"), 2),
                200,
                "{ip} was promoted although beyond max_lag_bytes\n{}",
                cluster.logs()
            );
        }
        (status_code(&cluster.lab, "http://192.0.2.11:8008/primary", 2) == 200)
            .then(|| killed.elapsed())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.logs()));
    let logs = cluster.logs();
    assert!(
        logs.contains("restarting it in place: no standby is fit to promote"),
        "no refusal logged\n{logs}"
    );
    assert!(!logs.contains("made primary (epoch 2)"), "{logs}");
    assert_eq!(
        psql(
            &cluster.lab,
            &direct(PG_IPS[0]),
            "SELECT count(*) FROM filler"
        )
        .unwrap(),
        "20000"
    );
    eprintln!("no fit standby: nuster1 primary again {back:?} after the kill");
}

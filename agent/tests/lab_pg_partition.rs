//! A partition in the namespace lab (issue 9): nuster1, the primary, is
//! cut away from nuster2 and nuster3 (blackhole routes both ways) while a
//! writer on each side writes through that side's pooler (nuster1's and
//! nuster3's; the client reaches both). Asynchronous PostgreSQL, so only
//! the lease stops the old primary: it must stop acknowledging writes
//! before the majority side's first write on the new primary is even
//! sent (never two primaries accepting writes at once). A switchover asked
//! on the cut-off node is refused for want of a quorum. After healing,
//! the old primary is rewound and streams from the new one, and every
//! write acknowledged on the majority side is there.

mod support;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use support::pg_lab::{
    acked, lost_rows, pg_may_run, pooled, status_code, write_rows, Attempt, PgCluster, PgOptions,
    PG_IPS,
};
use xtask::lab::wait_for;

#[test]
fn a_cut_off_primary_stops_writes_before_the_majority_promotes_and_rejoins_after() {
    let test = "a_cut_off_primary_stops_writes_before_the_majority_promotes_and_rejoins_after";
    if !pg_may_run(test) {
        return;
    }
    let cluster = PgCluster::start(
        "pgpart",
        &PgOptions {
            synchronous: false,
            ..PgOptions::default()
        },
    );
    let old_side = Mutex::new(Vec::<Attempt>::new());
    let new_side = Mutex::new(Vec::<Attempt>::new());
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut cut_at = None;
    let mut refusal = None;
    std::thread::scope(|scope| {
        let lab = &cluster.lab;
        let (stop, old_side_ref, new_side_ref) = (&stop, &old_side, &new_side);
        scope.spawn(move || {
            write_rows(
                lab,
                &pooled(PG_IPS[0]),
                "old",
                1,
                stop,
                deadline,
                old_side_ref,
            )
        });
        scope.spawn(move || {
            write_rows(
                lab,
                &pooled(PG_IPS[2]),
                "new",
                1_000_000,
                stop,
                deadline,
                new_side_ref,
            )
        });
        wait_for("writes on both sides", Duration::from_secs(20), || {
            let ok = |side: &Mutex<Vec<Attempt>>| acked(&side.lock().unwrap()) >= 10;
            (ok(&old_side) && ok(&new_side)).then_some(())
        })
        .unwrap();
        cluster.cut("nuster1", &["nuster2", "nuster3"]);
        let cut = Instant::now();
        cut_at = Some(cut);
        eprintln!("cut nuster1 away from nuster2 and nuster3");
        let first_new = wait_for("a write on a new primary", Duration::from_secs(45), || {
            new_side
                .lock()
                .unwrap()
                .iter()
                .find(|a| a.sent > cut && a.server.as_deref().is_some_and(|s| s != PG_IPS[0]))
                .map(|a| a.done)
        });
        if first_new.is_ok() {
            // The cut-off side has no quorum: a switchover asked there is
            // refused and changes nothing.
            refusal = Some(cluster.pg_cli("nuster1", &["switchover", "nuster3"]));
            std::thread::sleep(Duration::from_secs(2));
        }
        stop.store(true, Ordering::SeqCst);
        first_new.unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.logs()));
    });
    let cut = cut_at.unwrap();
    let old_side = old_side.into_inner().unwrap();
    let new_side = new_side.into_inner().unwrap();
    let acked_old_after_cut: Vec<&Attempt> = old_side
        .iter()
        .filter(|a| a.server.is_some() && a.sent > cut)
        .collect();
    let last_old = old_side
        .iter()
        .filter(|a| a.server.as_deref() == Some(PG_IPS[0]))
        .map(|a| a.done)
        .max()
        .unwrap();
    let first_new = new_side
        .iter()
        .filter(|a| a.server.as_deref().is_some_and(|s| s != PG_IPS[0]))
        .min_by_key(|a| a.done)
        .unwrap();
    let new_primary = first_new.server.clone().unwrap();
    let errors_old = old_side
        .iter()
        .filter(|a| a.sent > cut && a.server.is_none())
        .count();
    eprintln!(
        "old side: {} writes acknowledged after the cut, the last {:?} after it ({errors_old} errors after the cut); new side: first write on {new_primary} sent {:?} and acknowledged {:?} after the cut; gap between the old primary's last acknowledgement and the new one's first write {:?}",
        acked_old_after_cut.len(),
        last_old - cut,
        first_new.sent - cut,
        first_new.done - cut,
        first_new.sent.saturating_duration_since(last_old),
    );
    assert!(
        !acked_old_after_cut.is_empty(),
        "the old primary acknowledged nothing after the cut: the test shows nothing about its lease"
    );
    assert!(
        last_old < first_new.sent,
        "two primaries accepted writes at once: nuster1 acknowledged a write {:?} after the cut, the majority side sent its first successful write on {new_primary} {:?} after it\n{}",
        last_old - cut,
        first_new.sent - cut,
        cluster.logs()
    );
    let refusal = refusal.unwrap().unwrap_err();
    assert!(refusal.contains("no quorum"), "{refusal}");
    eprintln!("switchover on the cut-off node: {refusal}");

    cluster.heal("nuster1", &["nuster2", "nuster3"]);
    let healed = Instant::now();
    wait_for(
        "the old primary streams again",
        Duration::from_secs(90),
        || (status_code(&cluster.lab, "http://192.0.2.11:8008/replica", 2) == 200).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.logs()));
    eprintln!(
        "nuster1 streams from {new_primary} {:?} after the heal",
        healed.elapsed()
    );
    let logs = cluster.logs();
    assert!(
        logs.contains("pg_rewind done"),
        "the old primary was not rewound\n{logs}"
    );
    assert_eq!(cluster.primary(), Some(new_primary.as_str()));
    let rows = cluster.rows(&new_primary);
    let lost = lost_rows(&new_side, &rows);
    assert!(
        lost.is_empty(),
        "writes acknowledged on the majority side are missing: {lost:?}\n{logs}"
    );
    let old_gone = acked_old_after_cut
        .iter()
        .filter(|a| !rows.contains(&a.id))
        .count();
    eprintln!(
        "{} writes acknowledged on the majority side, all on {new_primary}; of the {} the cut-off primary acknowledged after the cut (asynchronous replication could not ship them), {old_gone} were undone by the rewind",
        new_side.iter().filter(|a| a.server.is_some()).count(),
        acked_old_after_cut.len()
    );
    // The rewound old primary holds exactly the new primary's rows.
    wait_for(
        "nuster1 replays up to the new primary",
        Duration::from_secs(30),
        || (cluster.rows(PG_IPS[0]) == cluster.rows(&new_primary)).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.logs()));
}

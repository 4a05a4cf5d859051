//! The fast path when the primary's postmaster dies and its agent lives:
//! the agent knows at once (its child exited), so it does not wait for its
//! lease to run out. It gives the lease up (its reconciler keeps the
//! server down), SIGKILLs what is left of the server's process group
//! (done by `PgNode::is_running`), picks the most advanced standby with the
//! failover rules (`failover::choose`: in synchronous mode only among the
//! standbys the primary reported synchronous in the last 5 s, once all of
//! them answered; in asynchronous mode within `max_lag_bytes` of its last
//! position) and hands the primary record over to it
//! ([`ClusterHandle::set_primary`] from the record's node: no lease wait).
//! The standby's agent gains the lease and promotes, the others repoint,
//! and this node's server is rewound and rejoins as a standby.
//!
//! When no standby may be promoted, or the cluster refuses the handoff,
//! the lease is taken back and the server restarts in place after
//! `crash_restart_delay`, as without the cluster state.
//!
//! In asynchronous mode a commit the standbys had not received when the
//! postmaster died is lost (as in any failover; bounded by
//! `max_lag_bytes`); a restart in place would have kept it, at the price of
//! waiting for a server that may not come back.

use std::{
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    failover::{choose, standby_candidates, FailoverStats, PrimaryView},
    reconcile::PrimaryCrash,
    ObservedRole, Pgha,
};
use crate::cluster::ClusterHandle;

/// How long the standbys are asked before the server restarts in place.
const CHOOSE_FOR: Duration = Duration::from_secs(3);

/// Follows this node's primary crashes until shutdown.
pub async fn hand_over_on_crash(
    pgha: Pgha,
    cluster: ClusterHandle,
    stats: Arc<FailoverStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut crashes = pgha.primary_crashes();
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            changed = crashes.changed() => if changed.is_err() { return },
        }
        let Some(crash) = crashes.borrow_and_update().clone() else {
            continue;
        };
        match hand_over(&pgha, &cluster, &crash).await {
            Ok(summary) => {
                stats.crash_handoffs.fetch_add(1, Ordering::Relaxed);
                info!(decision = %summary, "PostgreSQL failover");
            }
            Err(why) => {
                stats.crash_restarts.fetch_add(1, Ordering::Relaxed);
                warn!(decision = %why, "PostgreSQL failover");
            }
        }
    }
}

async fn hand_over(
    pgha: &Pgha,
    cluster: &ClusterHandle,
    crash: &PrimaryCrash,
) -> Result<String, String> {
    let plan = pgha.plan();
    let me = cluster.node().to_owned();
    let record = cluster.primary().borrow().clone();
    match &record {
        Some(record) if record.node == me && record.epoch == crash.epoch => {}
        _ => {
            return Err(format!(
                "the postmaster of {me} died, but {me} is no longer the recorded primary of epoch {}: nothing to hand over",
                crash.epoch
            ))
        }
    }
    let epoch = cluster
        .pause_lease("the most advanced standby (this node's postmaster died)")
        .map_err(|error| {
            format!(
                "the postmaster of {me} died; no handoff: {}",
                crate::error_chain(&error)
            )
        })?;
    let last = &crash.last_status;
    let view = PrimaryView {
        epoch,
        healthy_at: None,
        sync_standbys: crash.sync_standbys.clone(),
        lsn: last.lsn.filter(|_| last.role == ObservedRole::Primary),
    };
    // A standby that does not answer (a loaded machine) is asked again
    // for a while: the server is dead anyway, and the lease-expiry path
    // would take longer.
    let choose_until = Instant::now() + CHOOSE_FOR;
    let chosen = loop {
        let candidates = standby_candidates(plan, &me).await;
        // With every standby's answer in, asking again changes nothing.
        let all_answered = candidates.len() == plan.peers().count();
        match choose(plan.synchronous, plan.max_lag_bytes, &view, candidates) {
            Ok(chosen) => break chosen,
            Err(why) if all_answered || Instant::now() > choose_until => {
                cluster.resume_lease();
                return Err(format!(
                    "the postmaster of {me} died; restarting it in place: {why}"
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    match cluster.set_primary(&chosen.node, epoch).await {
        Ok(new) => Ok(format!(
            "failover: {} made primary (epoch {}), handed over by {me} {:?} after its postmaster died; it is the most advanced {}standby (received {:?}, replayed {:?})",
            new.node,
            new.epoch,
            crash.at.elapsed(),
            if plan.synchronous { "synchronous " } else { "" },
            chosen.receive_lsn.map(|l| l.to_string()),
            chosen.replay_lsn.map(|l| l.to_string()),
        )),
        Err(error) => {
            // set_primary took the lease back already; the pause is undone
            // as well, so renewals grant it again.
            cluster.resume_lease();
            Err(format!(
                "the postmaster of {me} died; the handoff to {} was refused ({}): restarting it in place",
                chosen.node,
                crate::error_chain(&error)
            ))
        }
    }
}

//! PostgreSQL HA on the cluster state (issue 9): the agents fail over on
//! their own, Patroni's leader loop on openraft.
//!
//! - [`follow_record`]: every agent's desired role is
//!   [`desired_from_record`] of the committed primary record and of this
//!   node's lease, updated on every change of either.
//! - [`run_decider`]: every agent watches the recorded primary's
//!   `/primary` endpoint (and remembers which standbys it last reported as
//!   synchronous and its last LSN); only the Raft leader acts. With no
//!   record yet, it records the config's bootstrap primary. When the
//!   recorded primary has not answered "primary" for `failover_after`, it
//!   picks the most advanced standby (in synchronous mode only among the
//!   standbys last seen synchronous, and only once all of them answered, so
//!   no acknowledged commit is lost; in asynchronous mode within
//!   `max_lag_bytes` of the primary's last position) and commits it with
//!   [`ClusterHandle::set_primary`], which the cluster refuses while the old
//!   primary's lease is live. The reconcilers then fence, promote and
//!   repoint; the pooler follows the promoted server by itself.

use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, MetricType},
};
use serde_json::Value;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{desired_from_record, promotion_candidate, Candidate, Desired, Lsn, Member, PgPlan};
use crate::cluster::{ClusterError, ClusterHandle, PrimaryRecord};

/// How long one `/primary` or `/replica` request may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// Decisions counted for `/metrics`.
#[derive(Debug, Default)]
pub struct FailoverStats {
    /// Primary records committed by this agent: first primary, failovers.
    pub bootstraps: AtomicU64,
    pub failovers: AtomicU64,
    /// Attempts that found no standby fit to promote.
    pub no_candidate: AtomicU64,
    /// Attempts the cluster refused (lease still live, epoch moved, no
    /// quorum).
    pub refused: AtomicU64,
    /// This node's postmaster died while it ran the primary: handed over
    /// to a standby at once (`pgha::crash`), or kept and restarted in
    /// place (no standby fit, handoff refused).
    pub crash_handoffs: AtomicU64,
    pub crash_restarts: AtomicU64,
}

/// `farol_pg_failover_*` on `/metrics`.
#[derive(Debug)]
pub struct FailoverCollector(pub Arc<FailoverStats>);

impl Collector for FailoverCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = &self.0;
        let mut family = encoder.encode_descriptor(
            "farol_pg_failover_decisions",
            "Primary decisions taken by this agent as Raft leader, by outcome",
            None,
            MetricType::Counter,
        )?;
        for (outcome, value) in [
            ("bootstrap", &stats.bootstraps),
            ("failover", &stats.failovers),
            ("no_candidate", &stats.no_candidate),
            ("refused", &stats.refused),
            ("crash_handoff", &stats.crash_handoffs),
            ("crash_restart_in_place", &stats.crash_restarts),
        ] {
            ConstCounter::new(value.load(Ordering::Relaxed))
                .encode(family.encode_family(&[("outcome", outcome)])?)?;
        }
        Ok(())
    }
}

/// Keeps `desired` equal to what the primary record and this node's lease
/// mean for `me`, until shutdown.
pub async fn follow_record(
    me: String,
    cluster: ClusterHandle,
    desired: watch::Sender<Desired>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut primary = cluster.primary();
    let mut lease = cluster.holds_lease();
    loop {
        let wanted = {
            let record = primary.borrow_and_update().clone();
            let holds = *lease.borrow_and_update();
            desired_from_record(
                &me,
                record.as_ref().map(|r| (r.node.as_str(), r.epoch)),
                holds,
            )
        };
        desired.send_if_modified(|current| {
            if *current == wanted {
                false
            } else {
                *current = wanted;
                true
            }
        });
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            changed = primary.changed() => if changed.is_err() { return },
            changed = lease.changed() => if changed.is_err() { return },
        }
    }
}

/// What the recorded primary's `/primary` endpoint last said.
#[derive(Debug, Default)]
pub(crate) struct PrimaryView {
    pub(crate) epoch: u64,
    /// When it last answered as a writable primary (None: not in this
    /// epoch, counted from when the epoch was first seen).
    pub(crate) healthy_at: Option<Instant>,
    /// Standbys it reported as synchronous (`sync` or `quorum`) and
    /// streaming.
    pub(crate) sync_standbys: BTreeSet<String>,
    /// Its last reported WAL position.
    pub(crate) lsn: Option<Lsn>,
}

/// Logs a decision once until its kind (with its reason, where it has
/// one) changes: the text may carry durations that change at every check.
#[derive(Debug, Default)]
struct Said(Option<String>);

impl Said {
    fn first_time(&mut self, kind: &str) -> bool {
        let new = self.0.as_deref() != Some(kind);
        if new {
            self.0 = Some(kind.to_owned());
        }
        new
    }
    fn info(&mut self, kind: &str, text: String) {
        if self.first_time(kind) {
            info!(decision = %text, "PostgreSQL failover");
        }
    }
    fn warn(&mut self, kind: &str, text: String) {
        if self.first_time(kind) {
            warn!(decision = %text, "PostgreSQL failover");
        }
    }
}

/// The decision loop (see the module doc), until shutdown.
pub async fn run_decider(
    plan: PgPlan,
    cluster: ClusterHandle,
    stats: Arc<FailoverStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let interval = plan.interval.min(Duration::from_millis(250));
    let mut view = PrimaryView::default();
    let mut epoch_seen_at = Instant::now();
    let mut said = Said::default();
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            () = tokio::time::sleep(interval) => {}
        }
        let record = cluster.primary().borrow().clone();
        let leads = cluster.status().raft_state == "Leader";
        let Some(record) = record else {
            if leads {
                bootstrap(&plan, &cluster, &stats, &mut said).await;
            }
            continue;
        };
        if record.epoch != view.epoch {
            // A new primary: what the old one reported no longer counts.
            view = PrimaryView {
                epoch: record.epoch,
                ..PrimaryView::default()
            };
            epoch_seen_at = Instant::now();
            // Every decision of the new epoch is logged afresh.
            said = Said::default();
        }
        let Ok(member) = plan.member(&record.node) else {
            said.warn(
                "unknown-node",
                format!(
                    "the primary record names {}, which is not a PostgreSQL node",
                    record.node
                ),
            );
            continue;
        };
        if let Some((200, body)) = probe(&plan, member, "/primary").await {
            view.healthy_at = Some(Instant::now());
            // The primary answers: its next failure is a new story to log.
            said = Said::default();
            view.lsn = body["lsn"].as_str().and_then(Lsn::parse).or(view.lsn);
            view.sync_standbys = sync_standbys(&body);
            continue;
        }
        let dead_for = view.healthy_at.unwrap_or(epoch_seen_at).elapsed();
        if !leads || dead_for < plan.failover_after {
            continue;
        }
        fail_over(&plan, &cluster, &stats, &record, &view, dead_for, &mut said).await;
    }
}

async fn bootstrap(plan: &PgPlan, cluster: &ClusterHandle, stats: &FailoverStats, said: &mut Said) {
    match cluster.set_primary(&plan.bootstrap_primary, 0).await {
        Ok(record) => {
            stats.bootstraps.fetch_add(1, Ordering::Relaxed);
            said.info("bootstrap", format!(
                "recorded {} as the first primary (epoch {}): no record yet, it is the config's bootstrap primary",
                record.node, record.epoch
            ));
        }
        Err(ClusterError::EpochMoved { .. }) => {}
        Err(error) => said.warn(
            "bootstrap-failed",
            format!(
                "cannot record the bootstrap primary {}: {}",
                plan.bootstrap_primary,
                crate::error_chain(&error)
            ),
        ),
    }
}

async fn fail_over(
    plan: &PgPlan,
    cluster: &ClusterHandle,
    stats: &FailoverStats,
    record: &PrimaryRecord,
    view: &PrimaryView,
    dead_for: Duration,
    said: &mut Said,
) {
    let candidates = standby_candidates(plan, &record.node).await;
    let chosen = match choose(plan.synchronous, plan.max_lag_bytes, view, candidates) {
        Ok(chosen) => chosen,
        Err(why) => {
            stats.no_candidate.fetch_add(1, Ordering::Relaxed);
            said.warn(
                &format!("no-candidate: {why}"),
                format!(
                    "{} has not answered as primary for {dead_for:?}: {why}",
                    record.node
                ),
            );
            return;
        }
    };
    match cluster.set_primary(&chosen.node, record.epoch).await {
        Ok(new) => {
            stats.failovers.fetch_add(1, Ordering::Relaxed);
            said.info("failover", format!(
                "failover: {} made primary (epoch {}) after {} did not answer as primary for {dead_for:?}; it is the most advanced {}standby (received {:?}, replayed {:?})",
                new.node,
                new.epoch,
                record.node,
                if plan.synchronous { "synchronous " } else { "" },
                chosen.receive_lsn.map(|l| l.to_string()),
                chosen.replay_lsn.map(|l| l.to_string()),
            ));
        }
        Err(ClusterError::LeaseHeld { .. }) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            said.info("lease-held", format!(
                "{} has not answered as primary for {dead_for:?}, but its lease may still be live: waiting for it to expire before promoting {}",
                record.node, chosen.node
            ));
        }
        Err(error) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            said.warn(
                "refused",
                format!(
                    "cannot make {} primary: {}",
                    chosen.node,
                    crate::error_chain(&error)
                ),
            );
        }
    }
}

/// Every PostgreSQL node but `primary` that answers `/replica` as a
/// replica, with its received and replayed positions.
pub(crate) async fn standby_candidates(plan: &PgPlan, primary: &str) -> Vec<Candidate> {
    let standbys: Vec<&Member> = plan
        .members
        .iter()
        .filter(|member| member.name != primary)
        .collect();
    let answers =
        futures_util::future::join_all(standbys.iter().map(|m| probe(plan, m, "/replica"))).await;
    let mut candidates = Vec::new();
    for (member, answer) in standbys.iter().zip(answers) {
        let Some((_, body)) = answer else { continue };
        if body["role"] != "replica" {
            continue;
        }
        let lsn = |key: &str| body["xlog"][key].as_u64().map(Lsn);
        candidates.push(Candidate {
            node: member.name.clone(),
            receive_lsn: lsn("received_location"),
            replay_lsn: lsn("replayed_location"),
        });
    }
    candidates
}

/// The standby to promote among those that answered, or why none may be.
/// Synchronous mode: only standbys the primary last reported synchronous,
/// and only once all of them answered (with `ANY 1 (...)` a commit is
/// acknowledged by one of them: only the most advanced of all surely has
/// every acknowledged commit). Asynchronous mode: within `max_lag_bytes` of
/// the primary's last known position.
pub(crate) fn choose(
    synchronous: bool,
    max_lag_bytes: u64,
    view: &PrimaryView,
    mut candidates: Vec<Candidate>,
) -> Result<Candidate, String> {
    let (reference, max_lag) = if synchronous {
        if view.sync_standbys.is_empty() {
            return Err(format!(
                "no standby was seen synchronous in epoch {}: not promoting one (acknowledged commits could be lost)",
                view.epoch
            ));
        }
        let missing: Vec<&String> = view
            .sync_standbys
            .iter()
            .filter(|name| !candidates.iter().any(|c| &c.node == *name))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "waiting for synchronous standby(s) {missing:?} to answer as standbys before choosing (one of them may hold the last acknowledged commit)"
            ));
        }
        candidates.retain(|c| view.sync_standbys.contains(&c.node));
        (None, u64::MAX)
    } else {
        (view.lsn, max_lag_bytes)
    };
    promotion_candidate(&candidates, reference, max_lag)
        .cloned()
        .ok_or_else(|| {
            format!(
                "no standby is fit to promote (answering: {:?}, within {} bytes of {:?})",
                candidates.iter().map(|c| &c.node).collect::<Vec<_>>(),
                max_lag_bytes,
                view.lsn.map(|l| l.to_string())
            )
        })
}

/// The standbys a primary's `/primary` body lists as synchronous and
/// streaming.
fn sync_standbys(body: &Value) -> BTreeSet<String> {
    body["replication"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter(|row| {
                    matches!(row["sync_state"].as_str(), Some("sync" | "quorum"))
                        && row["state"] == "streaming"
                })
                .filter_map(|row| row["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// GET `path` on `member`'s agent endpoint: status and JSON body, None
/// when it does not answer in time.
pub(crate) async fn probe(plan: &PgPlan, member: &Member, path: &str) -> Option<(u16, Value)> {
    let port = plan.api_listen.port();
    let exchange = async {
        let stream = tokio::net::TcpStream::connect((member.host.as_str(), port))
            .await
            .ok()?;
        let host = format!("{}:{port}", member.host);
        let response = crate::health::http::exchange(stream, "GET", path, &host, None)
            .await
            .ok()?;
        let body = serde_json::from_slice(&response.body).ok()?;
        Some((response.status, body))
    };
    tokio::time::timeout(PROBE_TIMEOUT, exchange)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_streaming_synchronous_standbys_count() {
        let body = serde_json::json!({
            "replication": [
                {"name": "b", "state": "streaming", "sync_state": "quorum"},
                {"name": "c", "state": "catchup", "sync_state": "quorum"},
                {"name": "d", "state": "streaming", "sync_state": "async"},
                {"name": "e", "state": "streaming", "sync_state": "sync"},
            ]
        });
        assert_eq!(
            sync_standbys(&body),
            BTreeSet::from(["b".to_owned(), "e".to_owned()])
        );
        assert!(sync_standbys(&serde_json::json!({})).is_empty());
    }

    fn standby(node: &str, received: u64) -> Candidate {
        Candidate {
            node: node.into(),
            receive_lsn: Some(Lsn(received)),
            replay_lsn: Some(Lsn(received)),
        }
    }

    fn view(sync: &[&str], lsn: u64) -> PrimaryView {
        PrimaryView {
            epoch: 4,
            healthy_at: None,
            sync_standbys: sync.iter().map(|s| s.to_string()).collect(),
            lsn: Some(Lsn(lsn)),
        }
    }

    #[test]
    fn synchronous_mode_promotes_only_a_synchronous_standby_once_all_answered() {
        let seen = view(&["b", "c"], 1000);
        // c may hold the last acknowledged commit: no choice without it.
        let why = choose(true, 16, &seen, vec![standby("b", 900)]).unwrap_err();
        assert!(why.contains("\"c\""), "{why}");
        // The most advanced synchronous standby, however far behind the
        // old primary's last (unacknowledged) position.
        let chosen = choose(true, 16, &seen, vec![standby("b", 900), standby("c", 950)]).unwrap();
        assert_eq!(chosen.node, "c");
        // An asynchronous standby is never promoted, even if ahead.
        let only_b = view(&["b"], 1000);
        let chosen = choose(
            true,
            16,
            &only_b,
            vec![standby("b", 900), standby("d", 990)],
        )
        .unwrap();
        assert_eq!(chosen.node, "b");
        // Never seen synchronous: refused.
        assert!(choose(true, 16, &view(&[], 1000), vec![standby("b", 1000)]).is_err());
    }

    #[test]
    fn asynchronous_mode_excludes_standbys_beyond_max_lag() {
        let seen = view(&[], 1000);
        assert!(choose(false, 50, &seen, vec![standby("b", 900)]).is_err());
        let chosen = choose(
            false,
            150,
            &seen,
            vec![standby("b", 900), standby("c", 880)],
        )
        .unwrap();
        assert_eq!(chosen.node, "b");
    }
}

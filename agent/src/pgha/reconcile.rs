//! The reconciler: brings this node's server to the [`Desired`] role and
//! keeps it there (start, promote, repoint, fence, rewind), logs every
//! role change once with its reason; plus the pure choice of a promotion
//! candidate and the switchover sequence.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{sync::watch, task::JoinHandle};
use tracing::{error, info, warn};

use super::{
    local::{connect, observe, observe_local, Lsn, ObservedRole, PgNode, PgStatus, UpstreamProbe},
    postmaster::StopMode,
    Desired, Member, PgPlan, PghaError, Role,
};

/// How long the upstream's last position stands in when it does not answer.
const UPSTREAM_POSITION_TTL: Duration = Duration::from_secs(3);

/// What the reconciler shares with the HTTP endpoints and `/metrics`.
#[derive(Debug)]
struct Shared {
    plan: PgPlan,
    desired: Mutex<Desired>,
    status: Mutex<PgStatus>,
    /// The upstream's position at the last look (a standby's lag on
    /// `/replica?lag=` is measured against it: at most `interval` old).
    upstream_lsn: Mutex<Option<Lsn>>,
    pid: Mutex<Option<u32>>,
    /// Role changes by the role reached.
    role_changes: Mutex<BTreeMap<&'static str, u64>>,
    /// The last unexpected exit of the postmaster while this node was to
    /// run the primary (`pgha::crash` hands the primary over on it).
    primary_crash: watch::Sender<Option<PrimaryCrash>>,
}

/// The postmaster of a running primary exited on its own.
#[derive(Debug, Clone)]
pub struct PrimaryCrash {
    /// The epoch of the decision that made this node primary.
    pub epoch: u64,
    pub at: Instant,
    /// What the server last reported as the primary (its WAL position).
    pub last_status: PgStatus,
    /// Every standby the primary reported synchronous and streaming in
    /// the last [`SYNC_MEMORY`]: the last look alone may have missed them
    /// (walsenders exit with the postmaster, a query may fail halfway),
    /// and one too many only adds a standby that must answer.
    pub sync_standbys: BTreeSet<String>,
}

/// How long a standby seen synchronous counts as one for a crash handoff.
pub const SYNC_MEMORY: Duration = Duration::from_secs(5);

/// A handle on this node's PostgreSQL under the agent.
#[derive(Debug, Clone)]
pub struct Pgha {
    shared: Arc<Shared>,
}

impl Pgha {
    /// Starts the reconciler; it follows `desired` until `shutdown`, then
    /// stops the server (fast shutdown).
    pub fn spawn(
        node: PgNode,
        desired: watch::Receiver<Desired>,
        shutdown: watch::Receiver<bool>,
    ) -> (Pgha, JoinHandle<()>) {
        let plan = node.plan.clone();
        let initial = desired.borrow().clone();
        info!(node = %plan.node, role = %initial.role, epoch = initial.epoch, reason = %initial.reason, "PostgreSQL: desired role");
        let pgha = Pgha {
            shared: Arc::new(Shared {
                plan,
                desired: Mutex::new(initial),
                status: Mutex::new(PgStatus::down("not started yet".into())),
                upstream_lsn: Mutex::new(None),
                pid: Mutex::new(None),
                role_changes: Mutex::new(BTreeMap::new()),
                primary_crash: watch::channel(None).0,
            }),
        };
        let task = tokio::spawn(run(node, pgha.clone(), desired, shutdown));
        (pgha, task)
    }

    pub fn plan(&self) -> &PgPlan {
        &self.shared.plan
    }

    pub fn desired(&self) -> Desired {
        lock(&self.shared.desired).clone()
    }

    /// The status at the reconciler's last look (every `plan.interval`).
    pub fn status(&self) -> PgStatus {
        lock(&self.shared.status).clone()
    }

    pub fn postmaster_pid(&self) -> Option<u32> {
        *lock(&self.shared.pid)
    }

    /// Crashes of this node's primary, as they happen.
    pub fn primary_crashes(&self) -> watch::Receiver<Option<PrimaryCrash>> {
        self.shared.primary_crash.subscribe()
    }

    pub fn role_changes(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.shared.role_changes).clone()
    }

    /// The member this node should stream from, if a standby.
    pub fn upstream(&self) -> Option<Member> {
        match &self.desired().role {
            Role::Standby { upstream } => self.plan().member(upstream).ok().cloned(),
            _ => None,
        }
    }

    /// Looks at the server now (the endpoints answer from this, not from
    /// the last loop's look); with `lag`, a standby's lag behind the
    /// upstream position the reconciler read last.
    pub async fn observe_now(&self, lag: bool) -> PgStatus {
        let mut status = observe_local(self.plan()).await;
        if lag {
            status.apply_upstream(*lock(&self.shared.upstream_lsn));
        }
        status
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave them inconsistent
    // (plain replacements): go on with the data.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn run(
    mut node: PgNode,
    pgha: Pgha,
    mut desired_rx: watch::Receiver<Desired>,
    mut shutdown: watch::Receiver<bool>,
) {
    let plan = pgha.plan().clone();
    let mut prepared = false;
    let mut crashed_at: Option<Instant> = None;
    let mut last_error: Option<String> = None;
    let mut last_role = ObservedRole::Down;
    let mut reason = String::from("agent started");
    let mut probe = UpstreamProbe::default();
    let mut upstream_seen: Option<(String, Lsn, Instant)> = None;
    // The last status of a running server.
    let mut last_up: Option<PgStatus> = None;
    // Standbys the primary reported synchronous, and when last.
    let mut seen_sync: BTreeMap<String, Instant> = BTreeMap::new();
    loop {
        if !prepared {
            match node.prepare().await {
                Ok(()) => prepared = true,
                Err(error) => report(&mut last_error, &plan, &error),
            }
        }
        let desired = pgha.desired();
        if prepared {
            let crashed_before = crashed_at.is_some();
            match step(&mut node, &desired, &mut crashed_at, &mut reason).await {
                Ok(()) => last_error = None,
                Err(error) => report(&mut last_error, &plan, &error),
            }
            // The exit may have been seen by the last look (status down):
            // what counts is what the server was before it went down.
            if let (false, Some(_), Role::Primary, Some(last_status)) = (
                crashed_before,
                crashed_at,
                &desired.role,
                last_up.clone().filter(|s| s.role == ObservedRole::Primary),
            ) {
                pgha.shared.primary_crash.send_replace(Some(PrimaryCrash {
                    epoch: desired.epoch,
                    at: Instant::now(),
                    last_status,
                    sync_standbys: seen_sync
                        .iter()
                        .filter(|(_, at)| at.elapsed() < SYNC_MEMORY)
                        .map(|(name, _)| name.clone())
                        .collect(),
                }));
            }
        }
        let status = if node.is_running() {
            let mut status = observe_local(&plan).await;
            let upstream = match (&status.role, pgha.upstream()) {
                (ObservedRole::Standby, Some(upstream)) => {
                    let position = probe.position(&plan, &upstream).await;
                    // One slow answer (a busy upstream) does not make the
                    // lag unknown at once: its last position counts for 3 s.
                    match position {
                        Some(position) => {
                            upstream_seen = Some((upstream.name.clone(), position, Instant::now()));
                            Some(position)
                        }
                        None => upstream_seen
                            .as_ref()
                            .filter(|(name, _, at)| {
                                *name == upstream.name && at.elapsed() < UPSTREAM_POSITION_TTL
                            })
                            .map(|(_, position, _)| *position),
                    }
                }
                _ => None,
            };
            *lock(&pgha.shared.upstream_lsn) = upstream;
            status.apply_upstream(upstream);
            status
        } else {
            PgStatus::down("the postmaster is not running".into())
        };
        if status.role != last_role {
            info!(node = %plan.node, from = last_role.label(), to = status.role.label(), timeline = ?status.timeline, %reason, "PostgreSQL role changed");
            *lock(&pgha.shared.role_changes)
                .entry(status.role.label())
                .or_default() += 1;
            last_role = status.role;
        }
        if status.role != ObservedRole::Down {
            last_up = Some(status.clone());
        }
        if status.role == ObservedRole::Primary {
            for row in &status.replication {
                if matches!(row.sync_state.as_str(), "sync" | "quorum") && row.state == "streaming"
                {
                    seen_sync.insert(row.name.clone(), Instant::now());
                }
            }
        }
        *lock(&pgha.shared.status) = status;
        *lock(&pgha.shared.pid) = node.pid();
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => break,
            changed = desired_rx.changed() => {
                if changed.is_err() {
                    // The decider is gone: keep the last decision.
                    desired_rx = watch::channel(desired).1;
                    continue;
                }
                let new = desired_rx.borrow_and_update().clone();
                let current = pgha.desired();
                if new.epoch < current.epoch {
                    warn!(node = %plan.node, epoch = new.epoch, current = current.epoch, "ignoring a desired role from an older epoch");
                } else if new != current {
                    info!(node = %plan.node, role = %new.role, epoch = new.epoch, reason = %new.reason, "PostgreSQL: desired role");
                    *lock(&pgha.shared.desired) = new;
                }
            }
            () = tokio::time::sleep(plan.interval) => {}
            // A postmaster that dies is seen at once, not at the next look.
            () = node.exited() => {}
        }
    }
    node.stop(StopMode::Fast).await;
    *lock(&pgha.shared.pid) = None;
}

/// Logs an error once until it changes or clears.
fn report(last: &mut Option<String>, plan: &PgPlan, error: &PghaError) {
    let text = crate::error_chain(error);
    if last.as_deref() != Some(text.as_str()) {
        error!(node = %plan.node, error = %text, "PostgreSQL: cannot reach the desired role (retrying)");
        *last = Some(text);
    }
}

/// One look and at most one action towards `desired`.
async fn step(
    node: &mut PgNode,
    desired: &Desired,
    crashed_at: &mut Option<Instant>,
    reason: &mut String,
) -> Result<(), PghaError> {
    if node.take_crash() {
        *crashed_at = Some(Instant::now());
        *reason = "the postmaster exited unexpectedly".into();
    }
    if !node.is_running() {
        if desired.role == Role::Primary
            && crashed_at.is_some_and(|at| at.elapsed() < node.plan.crash_restart_delay)
        {
            return Ok(());
        }
        if let Some(did) = node.bring_up(&desired.role).await? {
            *reason = format!("{did} ({})", desired.reason);
            *crashed_at = None;
        }
        return Ok(());
    }
    let status = observe(&node.plan, None).await;
    match (&desired.role, status.role) {
        (_, ObservedRole::Down) => {}
        (Role::Primary, ObservedRole::Standby) => {
            let started = Instant::now();
            node.promote().await?;
            info!(node = %node.plan.node, elapsed = ?started.elapsed(), reason = %desired.reason, "promoted");
            *reason = format!("promoted ({})", desired.reason);
        }
        (Role::Primary, ObservedRole::Primary) => {
            if status.fenced {
                node.setup_primary().await?;
                info!(node = %node.plan.node, reason = %desired.reason, "fence lifted");
            }
        }
        (Role::Standby { .. } | Role::Fenced, ObservedRole::Primary) => {
            warn!(node = %node.plan.node, desired = %desired.role, reason = %desired.reason, "fencing this primary");
            node.fence().await;
            *reason = format!("fenced ({})", desired.reason);
        }
        (Role::Standby { upstream }, ObservedRole::Standby) => {
            let upstream = node.plan.member(upstream)?.clone();
            let want = node.conninfo_for(&upstream);
            if status.primary_conninfo.as_deref() != Some(want.as_str()) {
                node.repoint(&upstream).await?;
                info!(node = %node.plan.node, upstream = %upstream.name, reason = %desired.reason, "repointed");
                *reason = format!("repointed to {} ({})", upstream.name, desired.reason);
            }
        }
        (Role::Fenced, ObservedRole::Standby) => {}
    }
    Ok(())
}

/// A standby that could be promoted, with its positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub node: String,
    pub receive_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
}

impl Candidate {
    fn position(&self) -> Option<Lsn> {
        self.receive_lsn.max(self.replay_lsn)
    }

    /// From a standby's status; None if it is not a standby.
    pub fn from_status(node: &str, status: &PgStatus) -> Option<Candidate> {
        (status.role == ObservedRole::Standby).then(|| Candidate {
            node: node.to_owned(),
            receive_lsn: status.receive_lsn,
            replay_lsn: status.replay_lsn,
        })
    }
}

/// The standby to promote: the most advanced (received, then replayed
/// WAL; ties by name) among those within `max_lag` bytes of the furthest
/// position known (the dead primary's last known position, or the most
/// advanced standby's). None when no standby qualifies.
pub fn promotion_candidate(
    candidates: &[Candidate],
    last_primary_lsn: Option<Lsn>,
    max_lag: u64,
) -> Option<&Candidate> {
    let reference = candidates
        .iter()
        .filter_map(Candidate::position)
        .chain(last_primary_lsn)
        .max()?;
    candidates
        .iter()
        .filter(|c| {
            c.position()
                .is_some_and(|position| reference.0.saturating_sub(position.0) <= max_lag)
        })
        .max_by(|a, b| {
            (a.position(), a.replay_lsn)
                .cmp(&(b.position(), b.replay_lsn))
                .then_with(|| b.node.cmp(&a.node))
        })
}

/// What a switchover measured.
#[derive(Debug, Clone)]
pub struct SwitchoverReport {
    /// The old primary's shutdown checkpoint: its last WAL record.
    pub final_lsn: Lsn,
    /// From the start of the old primary's stop to the new one's promotion:
    /// no primary accepts writes in between.
    pub unavailable: Duration,
    /// The whole sequence, the old primary's rejoin included.
    pub total: Duration,
}

/// A planned switchover from `old` (running primary) to `target` (its
/// streaming standby), with no committed transaction lost: the old
/// primary checkpoints and stops (fast: sessions end, walsenders send
/// everything up to the shutdown checkpoint), `target` replays up to that
/// last record, is promoted, `others` follow it, and `old` rejoins as its
/// standby. If `target` does not catch up within 30 s, `old` is started
/// again as the primary and the switchover fails.
pub async fn switchover(
    old: &mut PgNode,
    target: &mut PgNode,
    others: &mut [&mut PgNode],
) -> Result<SwitchoverReport, PghaError> {
    let started = Instant::now();
    let old_member = target.plan.member(&old.plan.node)?.clone();
    let target_member = old.plan.member(&target.plan.node)?.clone();
    // The target must stream and be within max_lag; asked for up to 10 s
    // (a busy upstream may be slow to answer the replication login).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = observe(&target.plan, Some(&old_member)).await;
        let streaming = status.role == ObservedRole::Standby && status.streaming;
        let within = status
            .lag_bytes
            .is_some_and(|lag| lag <= target.plan.max_lag_bytes);
        if streaming && within {
            break;
        }
        if Instant::now() > deadline {
            return Err(PghaError::State(format!(
                "{} is not a streaming standby within {} bytes of {} ({:?}, streaming {}, lag {:?}): no switchover",
                target.plan.node,
                target.plan.max_lag_bytes,
                old.plan.node,
                status.role,
                status.streaming,
                status.lag_bytes
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A checkpoint first makes the shutdown checkpoint short.
    let client = connect(&old.plan).await?;
    client
        .simple_query("CHECKPOINT")
        .await
        .map_err(|source| PghaError::Sql {
            node: old.plan.node.clone(),
            what: "CHECKPOINT".into(),
            source,
        })?;
    drop(client);
    let stopping = Instant::now();
    old.stop(StopMode::Fast).await;
    let control = old.control_data().await?;
    if control.state != "shut down" {
        return Err(PghaError::State(format!(
            "{} did not shut down cleanly ({:?})",
            old.plan.node, control.state
        )));
    }
    let final_lsn = control.checkpoint;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = observe(&target.plan, None).await;
        if status.replay_lsn.is_some_and(|replay| replay > final_lsn) {
            break;
        }
        if Instant::now() > deadline {
            warn!(target = %target.plan.node, %final_lsn, "the target did not replay the old primary's last record: the old primary starts again");
            old.start().await?;
            old.setup_primary().await?;
            return Err(PghaError::State(format!(
                "{} did not replay up to {final_lsn} within 30 s; {} is the primary again",
                target.plan.node, old.plan.node
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    target.promote().await?;
    let unavailable = stopping.elapsed();
    info!(old = %old.plan.node, new = %target.plan.node, %final_lsn, ?unavailable, "switchover: promoted");
    for other in others.iter_mut() {
        other.repoint(&target_member).await?;
    }
    old.rewind(&target_member).await?;
    old.start().await?;
    Ok(SwitchoverReport {
        final_lsn,
        unavailable,
        total: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(node: &str, receive: u64, replay: u64) -> Candidate {
        Candidate {
            node: node.into(),
            receive_lsn: Some(Lsn(receive)),
            replay_lsn: Some(Lsn(replay)),
        }
    }

    #[test]
    fn the_most_advanced_standby_within_the_lag_is_chosen() {
        let candidates = [candidate("b", 1000, 900), candidate("c", 1200, 800)];
        assert_eq!(
            promotion_candidate(&candidates, None, 1 << 20)
                .unwrap()
                .node,
            "c"
        );
        // Same received position: the one that replayed more.
        let candidates = [candidate("b", 1000, 900), candidate("c", 1000, 800)];
        assert_eq!(
            promotion_candidate(&candidates, None, 1 << 20)
                .unwrap()
                .node,
            "b"
        );
        // A full tie: by name, so every agent picks the same.
        let candidates = [candidate("c", 1000, 900), candidate("b", 1000, 900)];
        assert_eq!(
            promotion_candidate(&candidates, None, 1 << 20)
                .unwrap()
                .node,
            "b"
        );
    }

    #[test]
    fn standbys_further_behind_than_max_lag_are_not_eligible() {
        let candidates = [candidate("b", 1000, 1000), candidate("c", 5000, 5000)];
        // Reference: the primary's last known position, 10_000.
        assert_eq!(
            promotion_candidate(&candidates, Some(Lsn(10_000)), 5_000)
                .unwrap()
                .node,
            "c"
        );
        assert_eq!(
            promotion_candidate(&candidates, Some(Lsn(10_000)), 4_999),
            None
        );
        let unknown = [Candidate {
            node: "b".into(),
            receive_lsn: None,
            replay_lsn: None,
        }];
        assert_eq!(promotion_candidate(&unknown, None, 100), None);
        assert_eq!(promotion_candidate(&[], Some(Lsn(1)), 100), None);
    }

    #[test]
    fn lsns_parse_and_print_like_postgresql() {
        assert_eq!(Lsn::parse("0/3000148"), Some(Lsn(0x3000148)));
        assert_eq!(Lsn::parse("1A/FF"), Some(Lsn(0x1A_0000_00FF)));
        assert_eq!(Lsn(0x1A_0000_00FF).to_string(), "1A/FF");
        assert_eq!(Lsn::parse("nope"), None);
        assert_eq!(Lsn::parse("1/2/3"), None);
    }
}

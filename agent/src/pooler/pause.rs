//! Pausing the pooler (PgBouncer's PAUSE/RESUME), by hand on the admin
//! console or around a planned switchover of the primary.
//!
//! While paused, a new transaction bound for the primary is held (not
//! refused) until the pause lifts, at most `pooler.pause_wait_timeout`
//! (then 57P03); reads a standby takes are not held. Transactions already
//! running on the primary may finish: [`Pooler::drain`] waits until the
//! primary's transaction-mode pools have no connection lent out and no
//! session-mode connection runs anything, at most
//! `pooler.pause_drain_timeout`, then ends the sessions still in one with
//! 57P01. A session-mode client keeps its server connection while paused,
//! and its next transaction is held like any other; if the primary moved
//! meanwhile, that connection's session state (settings, prepared
//! statements, temporary tables) is on the old primary, so the client gets
//! 57P01 and reconnects to the new one. Sessions relayed in the kernel
//! (`kernel_relay`) are not held.
//!
//! A switchover (`agent pg switchover`) pauses every pooler of the cluster
//! before the old primary is fenced: the lease holder sends a
//! [`SwitchoverNotice::Started`] and waits until every pooler answered that
//! it drained. The pause lifts when the pooler's role checks move writes
//! to the new primary ([`Pooler::set_primary`]), so held transactions run
//! there; or at once when the switchover ends without a new primary (the
//! old one runs again); or by itself after `pause_wait_timeout`.

use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{pool::Pool, Pooler};
use crate::{
    cluster::{ClusterHandle, NoticeHandler, SwitchoverNotice},
    config::PoolMode,
};

/// How often a drain looks at the pools.
const DRAIN_POLL: Duration = Duration::from_millis(5);
/// How long the sessions ended after `pause_drain_timeout` may take to
/// give their connections back.
const CUT_GRACE: Duration = Duration::from_secs(1);

/// What holds the pooler now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PauseState {
    /// A planned switchover: (old primary node, new primary node, id).
    pub switchover: Option<(String, String, u64)>,
    /// `PAUSE` without a database.
    pub admin_all: bool,
    /// `PAUSE db`.
    pub admin_databases: BTreeSet<String>,
    /// Transactions past `pause_drain_timeout` are being ended.
    pub cutting: bool,
}

impl PauseState {
    /// True when a new transaction of `database` for the primary waits.
    pub fn holds(&self, database: &str) -> bool {
        self.switchover.is_some() || self.admin_all || self.admin_databases.contains(database)
    }

    fn paused(&self) -> bool {
        self.switchover.is_some() || self.admin_all || !self.admin_databases.is_empty()
    }

    /// Why the pooler is paused, for logs and client errors.
    pub fn reason(&self) -> String {
        let mut reasons = Vec::new();
        if let Some((from, to, _)) = &self.switchover {
            reasons.push(format!("a switchover of the primary from {from} to {to}"));
        }
        if self.admin_all {
            reasons.push("PAUSE on the admin console".to_owned());
        } else if !self.admin_databases.is_empty() {
            reasons.push(format!(
                "PAUSE of {} on the admin console",
                self.admin_databases
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if reasons.is_empty() {
            "nothing".to_owned()
        } else {
            reasons.join(" and ")
        }
    }
}

/// Counters and gauges for `SHOW POOLS`, `SHOW STATS` and `/metrics`.
#[derive(Debug, Default)]
pub struct PauseStats {
    pub switchover_pauses: AtomicU64,
    pub admin_pauses: AtomicU64,
    /// Transactions held now.
    pub held_now: AtomicU64,
    /// Transactions that were held (released or timed out).
    pub held_total: AtomicU64,
    pub held_micros_total: AtomicU64,
    pub held_micros_max: AtomicU64,
    /// Held past `pause_wait_timeout`.
    pub hold_timeouts: AtomicU64,
    /// Ended after `pause_drain_timeout`.
    pub cut: AtomicU64,
    /// Time spent paused, finished pauses only.
    pub paused_micros_total: AtomicU64,
}

/// The pause state of one pooler.
#[derive(Debug)]
pub struct Pause {
    state: watch::Sender<PauseState>,
    /// Mirrors `state.paused()` for the hot path (no lock when not paused).
    active: AtomicBool,
    since: std::sync::Mutex<Option<Instant>>,
    next_id: AtomicU64,
    pub stats: PauseStats,
}

impl Default for Pause {
    fn default() -> Self {
        Pause {
            state: watch::Sender::new(PauseState::default()),
            active: AtomicBool::new(false),
            since: std::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
            stats: PauseStats::default(),
        }
    }
}

/// A held transaction gave up.
#[derive(Debug, Clone)]
pub(crate) struct HoldTimeout {
    pub(crate) waited: Duration,
    pub(crate) reason: String,
}

impl Pause {
    pub fn state(&self) -> PauseState {
        self.state.borrow().clone()
    }

    pub fn is_paused(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    /// True when a new transaction of `database` for the primary waits.
    pub(crate) fn holds(&self, database: &str) -> bool {
        self.is_paused() && self.state.borrow().holds(database)
    }

    /// Changes the state; logs and counts a pause starting or ending.
    fn change(&self, why: &str, edit: impl FnOnce(&mut PauseState)) {
        let mut before = None;
        let mut after = None;
        self.state.send_if_modified(|state| {
            let old = state.clone();
            edit(state);
            if !state.paused() {
                state.cutting = false;
            }
            let changed = *state != old;
            if changed {
                before = Some(old);
                after = Some(state.clone());
            }
            changed
        });
        let (Some(before), Some(after)) = (before, after) else {
            return;
        };
        self.active.store(after.paused(), Ordering::SeqCst);
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        match (before.paused(), after.paused()) {
            (false, true) => {
                *since = Some(Instant::now());
                info!(reason = %after.reason(), "pooler paused: new transactions for the primary are held");
            }
            (true, false) => {
                let paused_for = since.take().map(|at| at.elapsed()).unwrap_or_default();
                self.stats
                    .paused_micros_total
                    .fetch_add(paused_for.as_micros() as u64, Ordering::Relaxed);
                info!(
                    reason = %why,
                    paused_ms = paused_for.as_millis() as u64,
                    held_now = self.stats.held_now.load(Ordering::Relaxed),
                    "pooler resumed: held transactions go on"
                );
            }
            (true, true) if before.reason() != after.reason() => {
                info!(reason = %after.reason(), "pooler still paused: {why}");
            }
            _ => {}
        }
    }

    /// Holds a new transaction of `database` while the pooler holds it;
    /// returns how long it was held (None: not held).
    pub(crate) async fn hold(
        &self,
        database: &str,
        pool: &Pool,
        limit: Duration,
    ) -> Result<Option<Duration>, HoldTimeout> {
        if !self.is_paused() {
            return Ok(None);
        }
        let mut changes = self.state.subscribe();
        if !changes.borrow().holds(database) {
            return Ok(None);
        }
        let started = Instant::now();
        self.stats.held_now.fetch_add(1, Ordering::Relaxed);
        pool.stats.held.fetch_add(1, Ordering::Relaxed);
        let waited = tokio::time::timeout(limit, changes.wait_for(|state| !state.holds(database)))
            .await
            .map(|_| ());
        let held = started.elapsed();
        self.stats.held_now.fetch_sub(1, Ordering::Relaxed);
        pool.stats.held.fetch_sub(1, Ordering::Relaxed);
        let micros = held.as_micros() as u64;
        self.stats.held_total.fetch_add(1, Ordering::Relaxed);
        self.stats
            .held_micros_total
            .fetch_add(micros, Ordering::Relaxed);
        self.stats
            .held_micros_max
            .fetch_max(micros, Ordering::Relaxed);
        pool.stats.held_total.fetch_add(1, Ordering::Relaxed);
        pool.stats
            .held_micros_total
            .fetch_add(micros, Ordering::Relaxed);
        match waited {
            Ok(()) => Ok(Some(held)),
            Err(_) => {
                self.stats.hold_timeouts.fetch_add(1, Ordering::Relaxed);
                Err(HoldTimeout {
                    waited: held,
                    reason: self.state.borrow().reason(),
                })
            }
        }
    }

    /// True when a session still in a transaction of `database` on the
    /// primary must end (past `pause_drain_timeout`).
    pub(crate) fn cuts(&self, database: &str) -> bool {
        self.is_paused() && {
            let state = self.state.borrow();
            state.cutting && state.holds(database)
        }
    }

    /// The primary moved: a switchover's pause is over.
    pub(crate) fn primary_moved(&self, old: std::net::SocketAddr, new: std::net::SocketAddr) {
        if self.state.borrow().switchover.is_some() {
            self.change(&format!("the primary moved from {old} to {new}"), |state| {
                state.switchover = None
            });
        }
    }
}

impl Pooler {
    /// Transactions running on the primary (of `database`, or every one):
    /// connections lent out by its transaction-mode pools, and session-mode
    /// connections between a client's message and the server's
    /// ReadyForQuery 'I' (an idle session holds its connection but runs
    /// nothing; its next transaction is held).
    pub(crate) fn busy_on_primary(&self, database: Option<&str>) -> usize {
        let primary = self.primary();
        self.pools()
            .iter()
            .filter(|pool| {
                pool.key.addr == primary && database.is_none_or(|name| pool.key.database == name)
            })
            .map(|pool| match pool.settings.mode {
                PoolMode::Transaction => pool.active_count(),
                PoolMode::Session => pool.stats.sessions_busy.load(Ordering::SeqCst) as usize,
            })
            .sum()
    }

    /// Waits until no transaction runs on the primary (of `database`, or
    /// any), at most `pause_drain_timeout`; then ends those still running.
    /// Returns how long it took and how many were still running.
    pub(crate) async fn drain(&self, database: Option<&str>) -> (Duration, usize) {
        let started = Instant::now();
        let deadline = started + self.config.pause_drain_timeout;
        loop {
            if self.busy_on_primary(database) == 0 {
                return (started.elapsed(), 0);
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        let running = self.busy_on_primary(database);
        warn!(
            running,
            drain_timeout = ?self.config.pause_drain_timeout,
            reason = %self.pause.state().reason(),
            "pooler pause: transactions still running on the primary after pooler.pause_drain_timeout are ended (57P01)"
        );
        self.pause.change("draining", |state| state.cutting = true);
        // Sessions holding a server connection look at the pause when the
        // topology generation moves.
        self.topology.send_modify(|generation| *generation += 1);
        let grace = Instant::now() + CUT_GRACE;
        while self.busy_on_primary(database) > 0 && Instant::now() < grace {
            tokio::time::sleep(DRAIN_POLL).await;
        }
        (started.elapsed(), running)
    }

    /// A switchover notice (see the module doc); answers what was done.
    pub async fn on_switchover_notice(self: &Arc<Self>, notice: SwitchoverNotice) -> String {
        match notice {
            SwitchoverNotice::Started { from, to } => {
                let id = self.pause.next_id.fetch_add(1, Ordering::Relaxed);
                self.pause
                    .stats
                    .switchover_pauses
                    .fetch_add(1, Ordering::Relaxed);
                self.pause.change("switchover", |state| {
                    state.switchover = Some((from.clone(), to.clone(), id))
                });
                // The pause lifts by itself if no new primary answers.
                let pooler = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(pooler.config.pause_wait_timeout).await;
                    let still =
                        matches!(&pooler.pause.state().switchover, Some((_, _, at)) if *at == id);
                    if still {
                        warn!(
                            wait_timeout = ?pooler.config.pause_wait_timeout,
                            "pooler pause for the switchover expired (pooler.pause_wait_timeout) without a new primary"
                        );
                        pooler
                            .pause
                            .change("the pause expired", |state| state.switchover = None);
                    }
                });
                let (took, cut) = self.drain(None).await;
                format!(
                    "paused, drained in {} ms{}",
                    took.as_millis(),
                    if cut > 0 {
                        format!(", {cut} transactions ended after pooler.pause_drain_timeout")
                    } else {
                        String::new()
                    }
                )
            }
            SwitchoverNotice::Ended {
                from,
                to,
                done,
                detail,
            } => {
                if self.pause.state().switchover.is_none() {
                    return "not paused".into();
                }
                if done && !self.config.role_check_interval.is_zero() {
                    // Writes move once the role checks see the new primary;
                    // look now.
                    self.recheck.notify_one();
                    format!("paused until {to} answers as the primary")
                } else if done {
                    // No role checks: nothing would move writes or lift
                    // the pause; the primary stays where the config says.
                    self.pause.change(
                        &format!("the switchover from {from} to {to} is done (role checks are off: pooler.role_check_interval = \"0s\")"),
                        |state| state.switchover = None,
                    );
                    "resumed (role checks are off)".into()
                } else {
                    self.pause.change(
                        &format!("the switchover from {from} to {to} ended without a new primary: {detail}"),
                        |state| state.switchover = None,
                    );
                    "resumed".into()
                }
            }
        }
    }

    /// `PAUSE [db]` on the admin console: holds new transactions, then
    /// drains. Err when already paused so.
    pub(crate) async fn admin_pause(&self, database: Option<&str>) -> Result<String, String> {
        let state = self.pause.state();
        let already = match database {
            None => state.admin_all,
            Some(name) => state.admin_all || state.admin_databases.contains(name),
        };
        if already {
            return Err(format!("already paused ({})", state.reason()));
        }
        self.pause
            .stats
            .admin_pauses
            .fetch_add(1, Ordering::Relaxed);
        self.pause.change("PAUSE", |state| match database {
            None => state.admin_all = true,
            Some(name) => {
                state.admin_databases.insert(name.to_owned());
            }
        });
        let (took, cut) = self.drain(database).await;
        Ok(format!("drained in {} ms, {cut} ended", took.as_millis()))
    }

    /// `RESUME [db]`: lifts the admin console's pause (and, without a
    /// database, a switchover's too: the operator decides).
    pub(crate) fn admin_resume(&self, database: Option<&str>) -> Result<(), String> {
        let state = self.pause.state();
        match database {
            None if state.paused() => {
                self.pause.change("RESUME on the admin console", |state| {
                    state.switchover = None;
                    state.admin_all = false;
                    state.admin_databases.clear();
                });
                Ok(())
            }
            Some(name) if state.admin_databases.contains(name) => {
                self.pause
                    .change(&format!("RESUME {name} on the admin console"), |state| {
                        state.admin_databases.remove(name);
                    });
                Ok(())
            }
            None => Err("the pooler is not paused".into()),
            Some(name) => Err(format!(
                "database {name:?} is not paused by name ({})",
                state.reason()
            )),
        }
    }
}

/// Registers `pooler` for the cluster's switchover notices.
pub fn serve_switchover_notices(pooler: Arc<Pooler>, cluster: &ClusterHandle) {
    let handler: NoticeHandler = Arc::new(move |notice| {
        let pooler = pooler.clone();
        Box::pin(async move { pooler.on_switchover_notice(notice).await })
    });
    cluster.serve_switchover_notices(handler);
}

/// `farol_pooler_pause*` and `farol_pooler_held*` on `/metrics`.
#[derive(Debug)]
pub struct PauseCollector(pub Arc<Pooler>);

impl Collector for PauseCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pause = &self.0.pause;
        let stats = &pause.stats;
        let load = |value: &AtomicU64| value.load(Ordering::Relaxed);
        ConstGauge::new(i64::from(pause.is_paused())).encode(encoder.encode_descriptor(
            "farol_pooler_paused",
            "1 while the pooler holds new transactions for the primary (a switchover, or PAUSE)",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(load(&stats.held_now) as i64).encode(encoder.encode_descriptor(
            "farol_pooler_held_clients",
            "Transactions held by a pause right now",
            None,
            MetricType::Gauge,
        )?)?;
        let mut family = encoder.encode_descriptor(
            "farol_pooler_pauses",
            "Pauses started, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, value) in [
            ("switchover", &stats.switchover_pauses),
            ("admin", &stats.admin_pauses),
        ] {
            ConstCounter::new(load(value)).encode(family.encode_family(&[("reason", reason)])?)?;
        }
        for (name, help, value) in [
            (
                "farol_pooler_held_transactions",
                "Transactions held by a pause (released or timed out)",
                &stats.held_total,
            ),
            (
                "farol_pooler_hold_timeouts",
                "Held transactions that gave up after pooler.pause_wait_timeout (57P03)",
                &stats.hold_timeouts,
            ),
            (
                "farol_pooler_pause_cut_transactions",
                "Transactions ended because they ran past pooler.pause_drain_timeout (57P01)",
                &stats.cut,
            ),
        ] {
            ConstCounter::new(load(value)).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        for (name, help, value) in [
            (
                "farol_pooler_held_seconds",
                "Time transactions spent held by pauses, summed",
                &stats.held_micros_total,
            ),
            (
                "farol_pooler_paused_seconds",
                "Time the pooler spent paused (finished pauses)",
                &stats.paused_micros_total,
            ),
        ] {
            ConstCounter::new(load(value) as f64 / 1e6).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        ConstGauge::new(load(&stats.held_micros_max) as f64 / 1e6).encode(
            encoder.encode_descriptor(
                "farol_pooler_held_max_seconds",
                "The longest any transaction was held by a pause",
                None,
                MetricType::Gauge,
            )?,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_pause_holds() {
        let mut state = PauseState::default();
        assert!(!state.holds("app") && !state.paused());
        state.admin_databases.insert("app".into());
        assert!(state.holds("app") && !state.holds("other") && state.paused());
        assert_eq!(state.reason(), "PAUSE of app on the admin console");
        state.switchover = Some(("nuster1".into(), "nuster2".into(), 1));
        assert!(state.holds("other"));
        assert_eq!(
            state.reason(),
            "a switchover of the primary from nuster1 to nuster2 and PAUSE of app on the admin console"
        );
    }

    #[tokio::test]
    async fn a_held_transaction_waits_for_the_resume_or_times_out() {
        let pause = Arc::new(Pause::default());
        let pool = Pool::new(
            super::super::pool::PoolKey {
                database: "app".into(),
                user: "app".into(),
                addr: "127.0.0.1:5432".parse().unwrap(),
                unix_socket_dir: None,
            },
            crate::config::PoolConfig {
                database: "app".into(),
                user: String::new(),
                mode: PoolMode::Transaction,
                pool_size: 1,
                min_idle: 0,
                query_wait_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(60),
                server_lifetime: Duration::from_secs(60),
            },
            super::super::auth::ServerCredential::None,
        );
        let pool = Arc::new(pool);
        // Not paused: no wait.
        assert!(pause
            .hold("app", &pool, Duration::from_secs(1))
            .await
            .unwrap()
            .is_none());
        pause.change("test", |state| state.admin_all = true);
        let held = {
            let (pause, pool) = (pause.clone(), pool.clone());
            tokio::spawn(async move { pause.hold("app", &pool, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(pause.stats.held_now.load(Ordering::Relaxed), 1);
        assert_eq!(pool.stats.held.load(Ordering::Relaxed), 1);
        pause.change("test", |state| state.admin_all = false);
        let waited = held.await.unwrap().unwrap().unwrap();
        assert!(waited >= Duration::from_millis(40), "{waited:?}");
        assert_eq!(pause.stats.held_now.load(Ordering::Relaxed), 0);
        // Paused past the limit: a timeout that says why.
        pause.change("test", |state| {
            state.switchover = Some(("a".into(), "b".into(), 1))
        });
        let timeout = pause
            .hold("app", &pool, Duration::from_millis(30))
            .await
            .unwrap_err();
        assert!(timeout.reason.contains("from a to b"), "{}", timeout.reason);
        assert_eq!(pause.stats.hold_timeouts.load(Ordering::Relaxed), 1);
        assert_eq!(pause.stats.held_total.load(Ordering::Relaxed), 2);
        assert!(!pause.cuts("app"));
        pause.change("test", |state| state.cutting = true);
        assert!(pause.cuts("app"));
        pause.primary_moved(
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        assert!(!pause.is_paused() && !pause.cuts("app"));
    }
}

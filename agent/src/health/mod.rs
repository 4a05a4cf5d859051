//! Health checks of the services' backends (HAProxy's `check`): TCP, HTTP
//! and PostgreSQL checkers ([`tcp`], [`http`], [`pg`]), HAProxy's rise/fall
//! counting ([`fsm`]), slow start, admin states and the agent check
//! ([`agent`], which explains how a drain reaches every balancer).
//!
//! [`Health`] is the shared state: what each backend's checks say, what
//! operators asked for (drain, disable, weight), and a [`Notify`] the
//! balancer waits on, so a change reaches the data plane at once rather
//! than at its next refresh. [`run`] keeps one task per checked backend,
//! started at offsets spread over the interval (no bursts), and follows
//! config reloads: backends whose check did not change keep their task and
//! their state.
//!
//! This module decides; it does not touch BPF maps (the balancer turns
//! [`Health::verdict`] into the plan the data plane applies).

pub mod agent;
mod fsm;
pub mod http;
mod metrics;
pub mod pg;
pub mod tcp;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use tokio::{
    sync::{watch, Notify},
    task::JoinHandle,
};
use tracing::{info, warn};

pub use agent::AdminState;
pub use fsm::{Fsm, Transition};
pub use metrics::HealthCollector;

use crate::config::{
    health::{DEFAULT_CHECK_INTERVAL, DEFAULT_CHECK_TIMEOUT},
    CheckKind, Config, HealthCheckConfig,
};

/// A check that passed, with what it saw (`HTTP 200`, `PostgreSQL standby`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passed {
    pub detail: String,
}

impl Passed {
    pub fn new(detail: impl Into<String>) -> Passed {
        Passed {
            detail: detail.into(),
        }
    }
}

/// A check that failed, with why (`connection refused`, `HTTP status 503
/// not in 200-399`, `timeout after 1s`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckFailure {
    pub reason: String,
}

impl CheckFailure {
    pub fn new(reason: impl Into<String>) -> CheckFailure {
        CheckFailure {
            reason: reason.into(),
        }
    }
}

/// Runs one check of `target` as `config` says, bounded by its timeout.
pub async fn run_check(
    target: SocketAddr,
    config: &HealthCheckConfig,
) -> Result<Passed, CheckFailure> {
    let timeout = config.timeout();
    let check = async {
        match config.kind {
            CheckKind::Tcp => tcp::check(target).await,
            CheckKind::Http => http::check(target, config).await,
            CheckKind::Postgres => pg::check(target, config).await,
        }
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(result) => result,
        Err(_) => Err(CheckFailure::new(format!(
            "timeout after {}",
            humantime::format_duration(timeout)
        ))),
    }
}

/// One backend of one service; the identity health state is kept under
/// across reloads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub service: String,
    /// The node's name, or the address for a backend given by address.
    pub name: String,
    pub addr: IpAddr,
    pub port: u16,
}

/// The last check's result.
#[derive(Debug, Clone, Serialize)]
pub struct LastCheck {
    pub passed: bool,
    /// What was seen, or why it failed.
    pub detail: String,
    pub latency_seconds: f64,
    /// Seconds since the Unix epoch.
    pub at_unix_seconds: f64,
}

#[derive(Debug)]
struct BackendHealth {
    /// None: the service has no check; the backend is up while reachable.
    fsm: Option<Fsm>,
    config: Option<HealthCheckConfig>,
    last: Option<LastCheck>,
    /// When it last came back up (slow start counts from there).
    up_since: Option<Instant>,
    /// The node's own admin state, from its agent (None: never answered).
    agent: Option<AdminState>,
    /// The [`Health::generation`] at which `agent` last changed.
    agent_generation: u64,
    agent_error: Option<String>,
    checks_passed: u64,
    checks_failed: u64,
    state_changes: u64,
}

impl BackendHealth {
    fn new(config: Option<HealthCheckConfig>) -> BackendHealth {
        BackendHealth {
            fsm: config.as_ref().map(|c| Fsm::new(c.rise, c.fall)),
            config,
            last: None,
            up_since: None,
            agent: None,
            agent_generation: 0,
            agent_error: None,
            checks_passed: 0,
            checks_failed: 0,
            state_changes: 0,
        }
    }

    fn check_up(&self) -> bool {
        self.fsm.is_none_or(|fsm| fsm.is_up())
    }

    /// The share of its weight a backend in slow start gets, 0 < f <= 1.
    fn slowstart_factor(&self, now: Instant) -> Option<f64> {
        let ramp = self.config.as_ref()?.slowstart?;
        let since = self.up_since?;
        let elapsed = now.saturating_duration_since(since);
        (elapsed < ramp && !ramp.is_zero()).then(|| elapsed.as_secs_f64() / ramp.as_secs_f64())
    }
}

/// What an operator set on this agent for a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Override {
    pub admin: Option<AdminState>,
    pub weight: Option<u32>,
}

/// What the data plane should do with a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub alive: bool,
    pub weight: u32,
    pub admin: AdminState,
}

#[derive(Debug, Default)]
struct Inner {
    backends: HashMap<BackendKey, BackendHealth>,
    /// Keyed by (service or None for all, backend name).
    overrides: HashMap<(Option<String>, String), Override>,
    /// This node's own admin state, served at `GET /agent`.
    own: AdminState,
    /// Counts admin-state changes read from nodes' agents (see
    /// [`Health::generation`]).
    generation: u64,
}

/// Shared health state; see the module docs.
#[derive(Debug)]
pub struct Health {
    node: String,
    inner: Mutex<Inner>,
    changed: Notify,
    own_tx: watch::Sender<AdminState>,
    /// Who read this node's admin state (the agent check), and when.
    pub agent_reads: AgentReads,
    /// The highest [`Health::generation`] this node's balancer has applied
    /// to its maps.
    applied_generation: watch::Sender<u64>,
}

/// A peer's last agent check of this node: when, and what it said its
/// maps hold (None: it did not say, as an agent before that report).
#[derive(Debug, Clone, Copy)]
pub struct AgentRead {
    pub at: Instant,
    pub applied: Option<agent::Applied>,
}

/// When each peer last read this node's admin state at `GET /agent`, and
/// what it had applied: a drain waits until every balancer has applied it.
#[derive(Debug, Default)]
pub struct AgentReads(Mutex<std::collections::HashMap<std::net::IpAddr, AgentRead>>);

impl AgentReads {
    pub fn record(&self, peer: std::net::IpAddr, applied: Option<agent::Applied>) {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(
                peer,
                AgentRead {
                    at: Instant::now(),
                    applied,
                },
            );
    }

    /// `peer`'s last agent check, if that was after `since`.
    pub fn read_after(&self, peer: std::net::IpAddr, since: Instant) -> Option<AgentRead> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&peer)
            .copied()
            .filter(|read| read.at > since)
    }
}

/// One backend's row for the status page, the JSON API and `agent status`.
#[derive(Debug, Clone, Serialize)]
pub struct BackendStatus {
    pub service: String,
    pub backend: String,
    pub address: String,
    /// "up", "down" (checks failed) or "unchecked" (no check configured).
    pub check_state: &'static str,
    pub checked: bool,
    pub check_kind: Option<String>,
    pub admin: AdminState,
    /// The admin state the node's own agent reports (None: unknown).
    pub agent: Option<AdminState>,
    pub agent_error: Option<String>,
    pub last_check: Option<LastCheck>,
    pub checks_passed: u64,
    pub checks_failed: u64,
    pub state_changes: u64,
    /// Slow start under way: the share of the weight given, 0..1.
    pub slowstart: Option<f64>,
    pub local_override: Override,
}

impl Health {
    pub fn new(node: &str) -> Arc<Health> {
        Arc::new(Health {
            node: node.to_owned(),
            inner: Mutex::new(Inner::default()),
            changed: Notify::new(),
            own_tx: watch::channel(AdminState::Ready).0,
            agent_reads: AgentReads::default(),
            applied_generation: watch::channel(0).0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data: keep using it.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Resolves when something that changes a verdict happened.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    fn notify(&self) {
        self.changed.notify_one();
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// This node's own admin state (what `GET /agent` answers).
    pub fn own_state(&self) -> AdminState {
        self.lock().own
    }

    /// Follows this node's own admin state (issue 8 waits on it).
    pub fn watch_own_state(&self) -> watch::Receiver<AdminState> {
        self.own_tx.subscribe()
    }

    /// A counter of the admin-state changes read from nodes' agents: a plan
    /// computed after reading it holds every change up to it.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// This node's balancer wrote a plan computed at `generation` to its
    /// maps (or found them holding it already).
    pub fn mark_applied(&self, generation: u64) {
        self.applied_generation.send_if_modified(|applied| {
            let newer = generation > *applied;
            if newer {
                *applied = generation;
            }
            newer
        });
    }

    /// Resolves once a plan holding `generation` is in the maps.
    async fn wait_applied(&self, generation: u64) {
        let mut applied = self.applied_generation.subscribe();
        // The sender lives as long as `self`.
        let _ = applied.wait_for(|applied| *applied >= generation).await;
    }

    /// What this node's maps hold of `node`'s own admin state, across every
    /// service it backs: pending while some state read from its agent is
    /// not applied yet.
    pub fn applied_agent_state(&self, node: &str) -> agent::Applied {
        let applied = *self.applied_generation.borrow();
        let inner = self.lock();
        let mut states = inner.backends.iter().filter(|(key, _)| key.name == node);
        let mut held = None;
        for (_, entry) in &mut states {
            match entry.agent {
                Some(state)
                    if entry.agent_generation <= applied && held.is_none_or(|h| h == state) =>
                {
                    held = Some(state)
                }
                _ => return agent::Applied::Pending,
            }
        }
        held.map_or(agent::Applied::Pending, agent::Applied::State)
    }

    /// Sets this node's own admin state; balancers learn it through the
    /// agent check.
    pub fn set_own_state(&self, state: AdminState, why: &str) {
        let before = std::mem::replace(&mut self.lock().own, state);
        if before != state {
            info!(node = %self.node, from = before.label(), to = state.label(), reason = why, "node admin state changed");
            self.own_tx.send_replace(state);
            self.notify();
        }
    }

    /// Sets (or with `Override::default()`, clears) an operator's override
    /// for `backend` in `service` (None: every service).
    pub fn set_override(&self, service: Option<String>, backend: &str, value: Override) {
        let key = (service.clone(), backend.to_owned());
        let mut inner = self.lock();
        let before = inner.overrides.get(&key).copied().unwrap_or_default();
        if value == Override::default() {
            inner.overrides.remove(&key);
        } else {
            inner.overrides.insert(key, value);
        }
        drop(inner);
        if before != value {
            info!(service = service.as_deref().unwrap_or("*"), %backend, admin = ?value.admin, weight = ?value.weight, "backend override set by an operator");
            self.notify();
        }
    }

    pub fn override_of(&self, service: Option<&str>, backend: &str) -> Override {
        self.lock()
            .overrides
            .get(&(service.map(str::to_owned), backend.to_owned()))
            .copied()
            .unwrap_or_default()
    }

    /// Whether some backend is ramping up (the balancer then re-plans
    /// often enough to follow the ramp).
    pub fn ramping(&self) -> bool {
        let now = Instant::now();
        self.lock()
            .backends
            .values()
            .any(|b| b.slowstart_factor(now).is_some())
    }

    /// What the data plane should do with `key`: its checks, the admin
    /// states (local override, the node's own, its agent's; the most
    /// restrictive wins), the weight (override or configured) and slow
    /// start. `resolved`: the balancer can reach it at L2.
    pub fn verdict(&self, key: &BackendKey, configured_weight: u32, resolved: bool) -> Verdict {
        let inner = self.lock();
        let service_override = inner
            .overrides
            .get(&(Some(key.service.clone()), key.name.clone()))
            .copied()
            .unwrap_or_default();
        let global_override = inner
            .overrides
            .get(&(None, key.name.clone()))
            .copied()
            .unwrap_or_default();
        let entry = inner.backends.get(key);
        let own = (key.name == self.node).then_some(inner.own);
        let admin = [
            service_override.admin,
            global_override.admin,
            own,
            entry.and_then(|e| e.agent),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or_default();
        let check_up = entry.is_none_or(BackendHealth::check_up);
        let alive = resolved && check_up && admin != AdminState::Maint;
        let base = service_override
            .weight
            .or(global_override.weight)
            .unwrap_or(configured_weight);
        let weight = match admin {
            AdminState::Ready => match entry.and_then(|e| e.slowstart_factor(Instant::now())) {
                // At least 1, so a backend in slow start does take flows.
                Some(factor) => ((base as f64 * factor).ceil() as u32).clamp(1.min(base), base),
                None => base,
            },
            AdminState::Drain | AdminState::Maint => 0,
        };
        Verdict {
            alive,
            weight,
            admin,
        }
    }

    /// Counts one check result; logs and notifies a state change. Returns
    /// the wait before the next check.
    fn record_check(
        &self,
        key: &BackendKey,
        result: Result<Passed, CheckFailure>,
        latency: Duration,
    ) -> Duration {
        let mut inner = self.lock();
        let Some(entry) = inner.backends.get_mut(key) else {
            return DEFAULT_CHECK_INTERVAL;
        };
        let (Some(fsm), Some(config)) = (entry.fsm.as_mut(), entry.config.as_ref()) else {
            return DEFAULT_CHECK_INTERVAL;
        };
        let passed = result.is_ok();
        let detail = match &result {
            Ok(passed) => passed.detail.clone(),
            Err(failure) => failure.reason.clone(),
        };
        let transition = fsm.record(passed);
        let next = fsm.next_interval(config.interval, config.fastinter(), config.downinter());
        let (rise, fall) = (config.rise, config.fall);
        if passed {
            entry.checks_passed += 1;
        } else {
            entry.checks_failed += 1;
        }
        entry.last = Some(LastCheck {
            passed,
            detail: detail.clone(),
            latency_seconds: latency.as_secs_f64(),
            at_unix_seconds: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or_default(),
        });
        if let Some(transition) = transition {
            entry.state_changes += 1;
            match transition {
                Transition::Up { successes } => {
                    entry.up_since = Some(Instant::now());
                    info!(service = %key.service, backend = %key.name, addr = %key.addr, port = key.port,
                        successes, rise, check = %detail, latency_ms = latency.as_millis() as u64,
                        "backend up: {successes} consecutive checks passed");
                }
                Transition::Down { failures } => {
                    entry.up_since = None;
                    warn!(service = %key.service, backend = %key.name, addr = %key.addr, port = key.port,
                        failures, fall, reason = %detail,
                        "backend down: {failures} consecutive checks failed, last: {detail}");
                }
            }
            drop(inner);
            self.notify();
        }
        next
    }

    /// Records what a node's agent said about its admin state.
    /// Records an agent check's answer; the new [`Health::generation`]
    /// when it changed the backend's admin state.
    fn record_agent(&self, key: &BackendKey, answer: Result<AdminState, String>) -> Option<u64> {
        let mut inner = self.lock();
        let next_generation = inner.generation + 1;
        let entry = inner.backends.get_mut(key)?;
        match answer {
            Ok(state) => {
                entry.agent_error = None;
                let before = entry.agent.replace(state);
                if before == Some(state) {
                    return None;
                }
                entry.agent_generation = next_generation;
                inner.generation = next_generation;
                if before.is_some() || state != AdminState::Ready {
                    info!(service = %key.service, backend = %key.name, from = before.map(AdminState::label).unwrap_or("unknown"), to = state.label(),
                        "backend admin state changed: reported by its node's agent");
                }
                drop(inner);
                self.notify();
                Some(next_generation)
            }
            Err(error) => {
                if entry.agent_error.is_none() {
                    tracing::debug!(service = %key.service, backend = %key.name, %error, "agent check failed; keeping the last known admin state");
                }
                entry.agent_error = Some(error);
                None
            }
        }
    }

    /// Every backend's row, sorted by service then backend.
    pub fn status(&self) -> Vec<BackendStatus> {
        let inner = self.lock();
        let now = Instant::now();
        let mut rows: Vec<BackendStatus> = inner
            .backends
            .iter()
            .map(|(key, entry)| {
                let local_override = {
                    let specific = inner
                        .overrides
                        .get(&(Some(key.service.clone()), key.name.clone()))
                        .copied()
                        .unwrap_or_default();
                    let global = inner
                        .overrides
                        .get(&(None, key.name.clone()))
                        .copied()
                        .unwrap_or_default();
                    Override {
                        admin: specific.admin.max(global.admin),
                        weight: specific.weight.or(global.weight),
                    }
                };
                let own = (key.name == self.node).then_some(inner.own);
                let admin = [local_override.admin, own, entry.agent]
                    .into_iter()
                    .flatten()
                    .max()
                    .unwrap_or_default();
                BackendStatus {
                    service: key.service.clone(),
                    backend: key.name.clone(),
                    address: SocketAddr::new(key.addr, key.port).to_string(),
                    check_state: match entry.fsm {
                        None => "unchecked",
                        Some(fsm) if fsm.is_up() => "up",
                        Some(_) => "down",
                    },
                    checked: entry.fsm.is_some(),
                    check_kind: entry
                        .config
                        .as_ref()
                        .map(|c| format!("{:?}", c.kind).to_lowercase()),
                    admin,
                    agent: entry.agent,
                    agent_error: entry.agent_error.clone(),
                    last_check: entry.last.clone(),
                    checks_passed: entry.checks_passed,
                    checks_failed: entry.checks_failed,
                    state_changes: entry.state_changes,
                    slowstart: entry.slowstart_factor(now),
                    local_override,
                }
            })
            .collect();
        rows.sort_by(|a, b| (&a.service, &a.backend).cmp(&(&b.service, &b.backend)));
        rows
    }
}

/// What a backend's task does: its check and where its node's agent is.
#[derive(Debug, Clone, PartialEq)]
struct Probe {
    check: Option<HealthCheckConfig>,
    target: SocketAddr,
    /// The backend node's agent (None: an address backend, or this node).
    agent: Option<SocketAddr>,
}

impl Probe {
    fn interval(&self) -> Duration {
        self.check
            .as_ref()
            .map_or(DEFAULT_CHECK_INTERVAL, |c| c.interval)
    }
}

/// Every backend of `config` with what to probe; none on a node without
/// the `balancer` role (it never sends flows, so it need not load the
/// backends with checks).
fn probes(config: &Config, this_node: &str) -> Vec<(BackendKey, Probe)> {
    let mut probes = Vec::new();
    let balances = config
        .nodes
        .iter()
        .any(|node| node.name == this_node && node.roles.contains(&crate::config::Role::Balancer));
    if !balances {
        return probes;
    }
    for service in &config.services {
        for backend in &service.backends {
            let Some(addr) = backend.resolve(&config.nodes) else {
                continue;
            };
            let port = backend.port.unwrap_or(service.port.first());
            let key = BackendKey {
                service: service.name.clone(),
                name: backend.node.clone().unwrap_or_else(|| addr.to_string()),
                addr,
                port,
            };
            let agent = backend
                .node
                .as_deref()
                .filter(|name| *name != this_node)
                .and_then(|name| config.nodes.iter().find(|n| n.name == name))
                .map(|node| {
                    SocketAddr::new(node.address.addr(), config.metrics_listen(node).port())
                });
            let check = service.check.clone();
            let target = SocketAddr::new(addr, check.as_ref().and_then(|c| c.port).unwrap_or(port));
            probes.push((
                key,
                Probe {
                    check,
                    target,
                    agent,
                },
            ));
        }
    }
    probes
}

/// One backend's loop: wait for its offset, then check (and ask its
/// node's agent) at the interval the FSM asks for.
async fn probe_loop(health: Arc<Health>, key: BackendKey, probe: Probe, offset: Duration) {
    tokio::time::sleep(offset).await;
    let agent_timeout = probe
        .check
        .as_ref()
        .map_or(DEFAULT_CHECK_TIMEOUT, HealthCheckConfig::timeout);
    loop {
        let agent_query = async {
            match probe.agent {
                Some(addr) => {
                    let applied = health.applied_agent_state(&key.name);
                    Some(agent::query(addr, agent_timeout, applied).await)
                }
                None => None,
            }
        };
        let service_check = async {
            match &probe.check {
                Some(config) => {
                    let started = Instant::now();
                    let result = run_check(probe.target, config).await;
                    Some((result, started.elapsed()))
                }
                None => None,
            }
        };
        let (answer, checked) = tokio::join!(agent_query, service_check);
        let mut changed = answer.and_then(|answer| health.record_agent(&key, answer));
        let next = match checked {
            Some((result, latency)) => health.record_check(&key, result, latency),
            None => probe.interval(),
        };
        let wake = tokio::time::Instant::now() + next;
        // The node waits for its balancers to apply a drain: say so as soon
        // as the maps hold it, not one interval later.
        while let (Some(generation), Some(addr)) = (changed, probe.agent) {
            tokio::select! {
                _ = health.wait_applied(generation) => {}
                _ = tokio::time::sleep_until(wake) => break,
            }
            let applied = health.applied_agent_state(&key.name);
            changed = agent::query(addr, agent_timeout, applied)
                .await
                .ok()
                .and_then(|state| health.record_agent(&key, Ok(state)));
        }
        tokio::time::sleep_until(wake).await;
    }
}

/// When the `position`-th of `total` probes first runs: evenly over one
/// interval, so a big cluster does not probe in bursts.
fn spread_offset(interval: Duration, position: u32, total: u32) -> Duration {
    interval * position.min(total) / total.max(1)
}

/// Keeps one probe task per backend in line with the config until
/// `shutdown`.
pub async fn run(
    health: Arc<Health>,
    mut config: watch::Receiver<Arc<Config>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tasks: HashMap<BackendKey, (Probe, JoinHandle<()>)> = HashMap::new();
    loop {
        let current = config.borrow_and_update().clone();
        let wanted = probes(&current, &health.node);
        let total = wanted.len().max(1) as u32;
        {
            let mut inner = health.lock();
            inner
                .backends
                .retain(|key, _| wanted.iter().any(|(k, _)| k == key));
            for (key, probe) in &wanted {
                let keep = inner
                    .backends
                    .get(key)
                    .is_some_and(|entry| entry.config == probe.check);
                if !keep {
                    inner
                        .backends
                        .insert(key.clone(), BackendHealth::new(probe.check.clone()));
                }
            }
        }
        tasks.retain(|key, (probe, handle)| {
            let same = wanted.iter().any(|(k, p)| k == key && p == probe);
            if !same {
                handle.abort();
            }
            same
        });
        for (position, (key, probe)) in wanted.into_iter().enumerate() {
            if tasks.contains_key(&key) {
                continue;
            }
            let offset = spread_offset(probe.interval(), position as u32, total);
            let handle = tokio::spawn(probe_loop(
                health.clone(),
                key.clone(),
                probe.clone(),
                offset,
            ));
            tasks.insert(key, (probe, handle));
        }
        health.notify();
        tokio::select! {
            changed = config.changed() => if changed.is_err() { break },
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    for (_, (_, handle)) in tasks {
        handle.abort();
    }
}

#[cfg(test)]
mod tests;

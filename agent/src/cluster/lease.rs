//! The primary lease on the primary's side: ask every voter for a promise
//! ([`super::promise`]) every `lease / 4`, hold the lease until `lease`
//! after *sending* the latest request that a majority of voters granted,
//! drop it at once when the record moves away.

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use tokio::{sync::watch, time::MissedTickBehavior};
use tracing::{debug, info, warn};

use super::{
    network::PROMISE_PATH,
    promise::{PromiseAnswer, PromiseRequest},
    ClusterHandle, Core,
};

/// This node's side of the lease.
#[derive(Debug, Default)]
pub(crate) struct LeaseState {
    /// Until when this node holds the lease (None: it does not).
    until: Option<Instant>,
    /// The epoch this node gave up for a handoff: no promise re-grants it.
    released: Option<u64>,
    /// The epoch the promises below are for.
    epoch: u64,
    /// Per voter, when this node sent the latest request it granted.
    granted: BTreeMap<String, Instant>,
    /// The last refusal logged (each new reason is logged once).
    refusal: Option<String>,
}

impl LeaseState {
    /// Notes a promise `voter` granted for a request sent at `sent`;
    /// returns the new end of the lease when a majority of `voters`
    /// granted one (the majority-th latest send, plus the lease).
    fn granted(
        &mut self,
        voter: &str,
        sent: Instant,
        voters: usize,
        lease: std::time::Duration,
    ) -> Option<Instant> {
        let latest = self.granted.entry(voter.to_owned()).or_insert(sent);
        *latest = (*latest).max(sent);
        let mut sends: Vec<Instant> = self.granted.values().copied().collect();
        sends.sort_unstable_by(|a, b| b.cmp(a));
        let until = *sends.get(voters / 2)? + lease;
        let until = self.until.map_or(until, |old| old.max(until));
        self.until = Some(until);
        Some(until)
    }
}

impl Core {
    fn lock_lease(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        // Only plain assignments happen under this lock.
        self.lease
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Publishes the lease state; logs and counts each change once.
    pub(crate) fn set_lease(&self, held: bool, reason: &str) {
        let changed = self.holds_lease.send_if_modified(|current| {
            if *current == held {
                false
            } else {
                *current = held;
                true
            }
        });
        if changed {
            let epoch = self.primary.borrow().as_ref().map_or(0, |r| r.epoch);
            if held {
                self.counters.lease_gained.fetch_add(1, Ordering::Relaxed);
                info!(node = %self.name, epoch, reason, "primary lease gained");
            } else {
                self.counters.lease_lost.fetch_add(1, Ordering::Relaxed);
                warn!(node = %self.name, epoch, reason, "primary lease lost: this node must not accept writes as primary");
            }
        }
    }

    /// Gives up the lease of `epoch` before handing the primary to `to`.
    pub(crate) fn release_lease(&self, epoch: u64, to: &str) {
        {
            let mut state = self.lock_lease();
            state.released = Some(epoch);
            state.until = None;
            state.granted.clear();
        }
        self.set_lease(false, &format!("handing the primary over to {to}"));
    }

    /// The handoff failed: promises may grant the lease again.
    pub(crate) fn resume_lease(&self) {
        self.lock_lease().released = None;
    }

    fn is_primary_here(&self) -> Option<u64> {
        self.primary
            .borrow()
            .as_ref()
            .filter(|record| record.node == self.name)
            .map(|record| record.epoch)
    }
}

/// Asks `voter` for a promise for `epoch`, and extends the lease when a
/// majority of voters granted one.
async fn ask(core: Arc<Core>, voter: String, epoch: u64) {
    let sent = Instant::now();
    let lease = core.settings.lease;
    let request = PromiseRequest {
        node: core.name.clone(),
        epoch,
    };
    let answer = if voter == core.name {
        core.grant_promise(&core.name, &request)
    } else {
        let Some(addr) = core.addresses.get(&voter) else {
            return;
        };
        // An answer later than the lease extends nothing.
        match core
            .client
            .call::<_, PromiseAnswer>(addr, PROMISE_PATH, &request, lease)
            .await
        {
            Ok(answer) => answer,
            Err(error) => {
                debug!(%voter, %error, "lease promise request failed");
                return;
            }
        }
    };
    let extended = {
        let mut state = core.lock_lease();
        match &answer {
            PromiseAnswer::Granted
                if state.released != Some(epoch) && core.is_primary_here() == Some(epoch) =>
            {
                if state.epoch != epoch {
                    state.epoch = epoch;
                    state.granted.clear();
                }
                state.refusal = None;
                state
                    .granted(&voter, sent, core.settings.voters.len(), lease)
                    .filter(|until| *until > Instant::now())
                    .is_some()
            }
            PromiseAnswer::Refused(why) => {
                let new = state.refusal.as_deref() != Some(why.as_str());
                if new {
                    state.refusal = Some(why.clone());
                    drop(state);
                    warn!(%voter, epoch, %why, "a voter refused this primary a lease promise");
                }
                false
            }
            PromiseAnswer::Granted => false,
        }
    };
    if extended {
        core.set_lease(
            true,
            "a majority of voters promised to make no other primary",
        );
    }
}

/// Runs until `shutdown`: promise requests while this node is the
/// recorded primary, and the end of the lease when its time runs out.
pub(crate) async fn run(handle: ClusterHandle, mut shutdown: watch::Receiver<bool>) {
    let core = handle.core;
    let mut primary = core.primary.clone();
    let mut tick = tokio::time::interval(core.settings.lease / 4);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let until = core.lock_lease().until;
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => {
                core.lock_lease().until = None;
                core.set_lease(false, "the agent is stopping");
                return;
            }
            _ = tick.tick() => {
                let Some(epoch) = core.is_primary_here() else { continue };
                if core.lock_lease().released == Some(epoch) {
                    continue;
                }
                // Every voter at every tick, each request on its own (one
                // slow voter delays no other): a majority is enough.
                for voter in &core.settings.voters {
                    tokio::spawn(ask(core.clone(), voter.clone(), epoch));
                }
            }
            _ = tokio::time::sleep_until(until.unwrap_or_else(Instant::now).into()), if until.is_some() => {
                let expired = {
                    let mut state = core.lock_lease();
                    let expired = state.until.is_some_and(|until| until <= Instant::now());
                    if expired {
                        state.until = None;
                    }
                    expired
                };
                if expired {
                    core.set_lease(false, &format!(
                        "no majority of voters granted a lease promise within the lease ({})",
                        humantime::format_duration(core.settings.lease)
                    ));
                }
            }
            changed = primary.changed() => {
                if changed.is_err() {
                    return;
                }
                let record = primary.borrow_and_update().clone();
                match record {
                    Some(record) if record.node == core.name => {
                        // Ask at once: the lease starts with the first
                        // majority of promises.
                        tick.reset_immediately();
                    }
                    other => {
                        {
                            let mut state = core.lock_lease();
                            state.until = None;
                            state.granted.clear();
                        }
                        let now = match other {
                            Some(record) => format!("{} (epoch {})", record.node, record.epoch),
                            None => "nobody".into(),
                        };
                        core.set_lease(false, &format!("the primary record moved to {now}"));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_lease_runs_from_the_send_a_majority_granted() {
        let lease = Duration::from_secs(1);
        let t0 = Instant::now();
        let mut state = LeaseState::default();
        // One voter of three is no majority.
        assert_eq!(state.granted("a", t0, 3, lease), None);
        // The second: the lease runs from the older of the two sends.
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!(state.granted("b", t1, 3, lease), Some(t0 + lease));
        // A third, later grant: the second latest send counts.
        let t2 = t0 + Duration::from_millis(500);
        assert_eq!(state.granted("c", t2, 3, lease), Some(t1 + lease));
        // A late answer to an older request never shortens it.
        assert_eq!(state.granted("a", t0, 3, lease), Some(t1 + lease));
        // One voter alone, however fresh, moves nothing without another.
        let t3 = t0 + Duration::from_millis(900);
        assert_eq!(state.granted("c", t3, 3, lease), Some(t1 + lease));
        assert_eq!(state.granted("b", t3, 3, lease), Some(t3 + lease));
        // A single voter is its own majority.
        let mut alone = LeaseState::default();
        assert_eq!(alone.granted("a", t0, 1, lease), Some(t0 + lease));
    }
}

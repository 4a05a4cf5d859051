//! The primary lease on the primary's side: renew through Raft every
//! `lease / 4`, hold the lease until `lease` after sending the last renewal
//! a majority committed, drop it at once when the record moves away.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use tokio::{sync::watch, time::MissedTickBehavior};
use tracing::{debug, info, warn};

use super::{types::Outcome, types::Request, ClusterHandle, Core};

/// This node's side of the lease.
#[derive(Debug, Default)]
pub(crate) struct LeaseState {
    /// Until when this node holds the lease (None: it does not).
    until: Option<Instant>,
    /// The epoch this node gave up for a handoff: no renewal re-grants it.
    released: Option<u64>,
    /// A renewal is on its way.
    renewing: bool,
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
        }
        self.set_lease(false, &format!("handing the primary over to {to}"));
    }

    /// The handoff failed: renewals may grant the lease again.
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

/// Sends one renewal and extends the lease when a majority committed it.
async fn renew(core: Arc<Core>, epoch: u64) {
    let sent = Instant::now();
    let lease = core.settings.lease;
    let outcome = core
        .submit(
            Request::Renew {
                node: core.name.clone(),
                epoch,
            },
            lease / 2,
        )
        .await;
    let granted = {
        let mut state = core.lock_lease();
        state.renewing = false;
        match &outcome {
            Ok(Outcome::Renewed)
                if state.released != Some(epoch) && core.is_primary_here() == Some(epoch) =>
            {
                let until = sent + lease;
                state.until = Some(state.until.map_or(until, |old| old.max(until)));
                true
            }
            _ => false,
        }
    };
    match outcome {
        Ok(Outcome::Renewed) if granted => {
            core.set_lease(true, "a majority of voters committed the renewal")
        }
        Ok(Outcome::Refused(error)) => {
            debug!(%error, "lease renewal refused");
        }
        Ok(_) => {}
        Err(error) => debug!(%error, "lease renewal failed"),
    }
}

/// Runs until `shutdown`: renewals while this node is the recorded
/// primary, and the end of the lease when its time runs out.
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
                let start = {
                    let mut state = core.lock_lease();
                    let start = !state.renewing && state.released != Some(epoch);
                    state.renewing |= start;
                    start
                };
                if start {
                    tokio::spawn(renew(core.clone(), epoch));
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
                        "no majority of voters committed a renewal within the lease ({})",
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
                        // Renew at once: the lease starts with the first
                        // committed renewal.
                        tick.reset_immediately();
                    }
                    other => {
                        core.lock_lease().until = None;
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

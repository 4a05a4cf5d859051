//! The voters' side of the primary lease: promises and revocations.
//!
//! The primary asks every voter for a promise every `lease / 4`
//! ([`super::lease`]); a voter that grants one promises not to help make
//! another node primary until `lease + lease_margin` after it *received*
//! the request, on its own clock. Making another node primary (without a
//! handoff by the primary itself) first needs a *revocation* of the
//! primary's epoch from a majority of voters: a voter revokes only once its
//! promise for that epoch has lapsed, and from then on never grants a
//! promise for that epoch or an older one again (written to
//! `state_dir/<node>/revoked.json`, fsynced, before it answers).
//!
//! Why this is safe: the primary holds the lease only until `lease` after
//! it *sent* a request that a majority of voters granted; the promotion
//! needs a majority that revoked. Two majorities share a voter. That voter
//! revoked only after its promise lapsed, `lease + lease_margin` after it
//! received the request, so after the primary's lease (counted from the
//! send, earlier) ended; and it grants nothing for that epoch afterwards,
//! so no later majority of promises exists either. The margin covers the
//! clocks' rates (CLOCK_MONOTONIC, slewed by NTP by at most 0.05%, so
//! well under a millisecond per second of lease) and a late timer and the
//! fence on a loaded old primary.
//!
//! A voter forgets its promises when its agent restarts (they are not
//! written down: one fsync every `lease / 4` on a Pi's SD card is too
//! many), so a restarted voter refuses to revoke anything until
//! `lease + lease_margin` after its start, as if it had just promised.
//!
//! No Raft leader takes part in a renewal: a Raft election (the death of
//! the Raft leader, a slow heartbeat) does not cost the primary its lease,
//! so the lease need not outlive an election and can be short.

use std::{
    sync::{atomic::Ordering, MutexGuard},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::{network::REVOKE_PATH, ClusterError, Core, PrimaryRecord};

/// The primary asks a voter for a promise for `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PromiseRequest {
    pub(crate) node: String,
    pub(crate) epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum PromiseAnswer {
    Granted,
    Refused(String),
}

/// The Raft leader asks a voter to revoke `epoch` of `node` before it
/// makes another node primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RevokeRequest {
    pub(crate) node: String,
    pub(crate) epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum RevokeAnswer {
    /// This voter's promise for the epoch lapsed; it grants no other.
    Revoked,
    /// A promise may still run for this long.
    Held {
        remaining_ms: u64,
    },
    Refused(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Promise {
    node: String,
    epoch: u64,
    until: Instant,
}

/// One voter's promises, the clock passed in (pure, for the tests).
#[derive(Debug)]
pub(crate) struct Promises {
    /// `lease + lease_margin`.
    duration: Duration,
    /// Until then this voter may have promised before its restart.
    quiet_until: Instant,
    promise: Option<Promise>,
    /// No promise for this epoch or an older one, ever (on disk).
    revoked_through: u64,
}

impl Promises {
    pub(crate) fn new(duration: Duration, now: Instant, revoked_through: u64) -> Promises {
        Promises {
            duration,
            quiet_until: now + duration,
            promise: None,
            revoked_through,
        }
    }

    /// Grants `node` a promise for `epoch` unless that epoch was revoked
    /// or the record this voter applied is newer.
    fn grant(
        &mut self,
        node: &str,
        epoch: u64,
        applied: Option<&PrimaryRecord>,
        now: Instant,
    ) -> PromiseAnswer {
        if epoch <= self.revoked_through {
            return PromiseAnswer::Refused(format!(
                "epoch {epoch} is revoked here (through epoch {}): another primary may have been chosen",
                self.revoked_through
            ));
        }
        if let Some(record) = applied {
            if record.epoch > epoch || (record.epoch == epoch && record.node != node) {
                return PromiseAnswer::Refused(format!(
                    "the record here names {} at epoch {}",
                    record.node, record.epoch
                ));
            }
        }
        let until = now + self.duration;
        match &mut self.promise {
            Some(promise) if promise.until > now && promise.epoch > epoch => {
                return PromiseAnswer::Refused(format!(
                    "a promise for epoch {} ({}) runs here",
                    promise.epoch, promise.node
                ));
            }
            Some(promise) if promise.epoch == epoch && promise.node == node => {
                promise.until = promise.until.max(until);
            }
            _ => {
                self.promise = Some(Promise {
                    node: node.to_owned(),
                    epoch,
                    until,
                })
            }
        }
        PromiseAnswer::Granted
    }

    /// What a revocation of `epoch` gets now; `Revoked` for an epoch above
    /// `revoked_through` must be written down before [`Promises::revoke`].
    fn check_revoke(&self, epoch: u64, now: Instant) -> RevokeAnswer {
        if epoch <= self.revoked_through {
            return RevokeAnswer::Revoked;
        }
        if let Some(promise) = self.promise.as_ref().filter(|p| p.until > now) {
            if promise.epoch > epoch {
                return RevokeAnswer::Refused(format!(
                    "stale: a promise for epoch {} ({}) runs here",
                    promise.epoch, promise.node
                ));
            }
            if promise.epoch == epoch {
                return RevokeAnswer::Held {
                    remaining_ms: millis_up(promise.until - now),
                };
            }
        }
        if now < self.quiet_until {
            return RevokeAnswer::Held {
                remaining_ms: millis_up(self.quiet_until - now),
            };
        }
        RevokeAnswer::Revoked
    }

    fn revoke(&mut self, epoch: u64) {
        self.revoked_through = self.revoked_through.max(epoch);
    }
}

/// How long until a majority (`needed`) of voters will have revoked, from
/// their `answers` (None: a voter that did not answer): the revoked ones
/// plus the soonest-lapsing held ones. None when even every held promise
/// lapsing would not make a majority (too many voters silent or refusing).
fn wait_for_majority(answers: &[Option<RevokeAnswer>], needed: usize) -> Option<u64> {
    let revoked = answers
        .iter()
        .filter(|a| matches!(a, Some(RevokeAnswer::Revoked)))
        .count();
    if revoked >= needed {
        return Some(0);
    }
    let mut held: Vec<u64> = answers
        .iter()
        .filter_map(|a| match a {
            Some(RevokeAnswer::Held { remaining_ms }) => Some(*remaining_ms),
            _ => None,
        })
        .collect();
    held.sort_unstable();
    held.get(needed - revoked - 1).copied()
}

fn millis_up(duration: Duration) -> u64 {
    (duration.as_micros().div_ceil(1000)) as u64
}

/// `revoked.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RevokedFile {
    revoked_through: u64,
}

/// The epoch revoked through, from `dir/revoked.json` (0 without one).
pub(crate) fn load_revoked(dir: &std::path::Path) -> Result<u64, ClusterError> {
    let path = dir.join("revoked.json");
    super::store::read_json::<RevokedFile>(&path)
        .map(|file| file.unwrap_or_default().revoked_through)
        .map_err(|error| ClusterError::Storage(format!("{}: {error}", path.display())))
}

impl Core {
    fn lock_promises(&self) -> MutexGuard<'_, Promises> {
        // Only plain assignments (and one file write) happen under it.
        self.promises
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The voter's answer to a promise request from `sender`.
    pub(crate) fn grant_promise(&self, sender: &str, request: &PromiseRequest) -> PromiseAnswer {
        let answer = if !self.settings.is_voter(&self.name) {
            PromiseAnswer::Refused(format!("{} is not a voter", self.name))
        } else if request.node != sender {
            PromiseAnswer::Refused(format!(
                "{sender} asked for a promise for {}: only a primary asks for itself",
                request.node
            ))
        } else {
            let applied = self.primary.borrow().clone();
            let mut promises = self.lock_promises();
            let new = promises
                .promise
                .as_ref()
                .is_none_or(|p| p.epoch != request.epoch || p.node != request.node);
            let answer = promises.grant(
                &request.node,
                request.epoch,
                applied.as_ref(),
                Instant::now(),
            );
            drop(promises);
            if new && answer == PromiseAnswer::Granted {
                info!(primary = %request.node, epoch = request.epoch, "lease promises granted to a new primary (this voter helps make no other primary until they lapse)");
            }
            answer
        };
        match &answer {
            PromiseAnswer::Granted => &self.counters.promises_granted,
            PromiseAnswer::Refused(why) => {
                debug!(primary = %request.node, epoch = request.epoch, %why, "lease promise refused");
                &self.counters.promises_refused
            }
        }
        .fetch_add(1, Ordering::Relaxed);
        answer
    }

    /// The voter's answer to a revocation.
    pub(crate) fn revoke_promise(&self, request: &RevokeRequest) -> RevokeAnswer {
        if !self.settings.is_voter(&self.name) {
            return RevokeAnswer::Refused(format!("{} is not a voter", self.name));
        }
        let mut promises = self.lock_promises();
        let answer = promises.check_revoke(request.epoch, Instant::now());
        if answer == RevokeAnswer::Revoked && request.epoch > promises.revoked_through {
            let file = RevokedFile {
                revoked_through: request.epoch,
            };
            let path = super::state_dir(&self.settings, &self.name).join("revoked.json");
            let written = serde_json::to_vec(&file)
                .map_err(std::io::Error::other)
                .and_then(|bytes| super::store::write_atomically(&path, &bytes, true));
            if let Err(error) = written {
                drop(promises);
                warn!(file = %path.display(), %error, "cannot write the revocation down: refusing it");
                self.counters
                    .revocations_refused
                    .fetch_add(1, Ordering::Relaxed);
                return RevokeAnswer::Refused(format!("{}: {error}", path.display()));
            }
            promises.revoke(request.epoch);
            drop(promises);
            info!(primary = %request.node, epoch = request.epoch, "lease promises revoked: this voter's promise lapsed and it grants none for this epoch again");
        } else {
            drop(promises);
        }
        match &answer {
            RevokeAnswer::Revoked => &self.counters.revocations_given,
            RevokeAnswer::Held { .. } => &self.counters.revocations_held,
            RevokeAnswer::Refused(_) => &self.counters.revocations_refused,
        }
        .fetch_add(1, Ordering::Relaxed);
        answer
    }

    /// On the Raft leader, before making another node primary: gets the
    /// revocation of `epoch` of `node` from a majority of voters, waiting
    /// for promises that lapse before `deadline`.
    pub(crate) async fn revoke_majority(
        &self,
        node: &str,
        epoch: u64,
        deadline: Instant,
    ) -> Result<(), ClusterError> {
        let request = RevokeRequest {
            node: node.to_owned(),
            epoch,
        };
        let needed = self.settings.voters.len() / 2 + 1;
        let wait_total = self.settings.lease + self.settings.lease_margin;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let asks = self.settings.voters.iter().map(|voter| {
                let request = request.clone();
                async move {
                    if *voter == self.name {
                        return Some(self.revoke_promise(&request));
                    }
                    let addr = self.addresses.get(voter)?;
                    let timeout = self.settings.election_timeout.min(left);
                    self.client
                        .call::<_, RevokeAnswer>(addr, REVOKE_PATH, &request, timeout)
                        .await
                        .ok()
                }
            });
            // Done as soon as a majority revoked: a voter that is down
            // (often the old primary itself) must not hold the rest up.
            let mut pending: futures_util::stream::FuturesUnordered<_> = asks.collect();
            let mut answers = Vec::new();
            let mut revoked = 0;
            while let Some(answer) = pending.next().await {
                revoked += usize::from(matches!(answer, Some(RevokeAnswer::Revoked)));
                if revoked >= needed {
                    return Ok(());
                }
                answers.push(answer);
            }
            let Some(wait_ms) = wait_for_majority(&answers, needed) else {
                let held = answers
                    .iter()
                    .filter(|a| matches!(a, Some(RevokeAnswer::Held { .. })))
                    .count();
                let refusals: Vec<&String> = answers
                    .iter()
                    .filter_map(|a| match a {
                        Some(RevokeAnswer::Refused(why)) => Some(why),
                        _ => None,
                    })
                    .collect();
                return Err(ClusterError::NoQuorum(format!(
                    "{revoked} of the {} voters revoked the lease of {node} (epoch {epoch}), {} hold it, {needed} needed (the others did not answer{})",
                    self.settings.voters.len(),
                    held,
                    if refusals.is_empty() { String::new() } else { format!(" or refused: {refusals:?}") }
                )));
            };
            let wait = Duration::from_millis(wait_ms + 5);
            if Instant::now() + wait > deadline {
                let needed_ms = wait_total.as_millis() as u64;
                return Err(ClusterError::LeaseHeld {
                    primary: node.to_owned(),
                    since_ms: needed_ms.saturating_sub(wait_ms),
                    needed_ms,
                });
            }
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DURATION: Duration = Duration::from_millis(1250);

    fn record(node: &str, epoch: u64) -> PrimaryRecord {
        PrimaryRecord {
            node: node.into(),
            epoch,
        }
    }

    /// A voter that started long enough ago to be past its quiet time.
    fn settled(start: Instant) -> Promises {
        Promises::new(DURATION, start, 0)
    }

    #[test]
    fn a_live_promise_holds_off_the_revocation_until_it_lapses() {
        let start = Instant::now();
        let mut voter = settled(start);
        let now = start + DURATION * 2;
        assert_eq!(
            voter.grant("a", 3, Some(&record("a", 3)), now),
            PromiseAnswer::Granted
        );
        assert_eq!(
            voter.check_revoke(3, now + Duration::from_millis(250)),
            RevokeAnswer::Held { remaining_ms: 1000 }
        );
        let lapsed = now + DURATION;
        assert_eq!(voter.check_revoke(3, lapsed), RevokeAnswer::Revoked);
        voter.revoke(3);
        // Never again for this epoch (or an older one), however late.
        assert!(matches!(
            voter.grant("a", 3, Some(&record("a", 3)), lapsed),
            PromiseAnswer::Refused(why) if why.contains("revoked")
        ));
        assert!(matches!(
            voter.grant("z", 2, None, lapsed),
            PromiseAnswer::Refused(_)
        ));
        // The next primary is served.
        assert_eq!(
            voter.grant("b", 4, Some(&record("b", 4)), lapsed),
            PromiseAnswer::Granted
        );
        // Revoking again is idempotent.
        assert_eq!(voter.check_revoke(3, lapsed), RevokeAnswer::Revoked);
    }

    #[test]
    fn a_restarted_voter_revokes_nothing_before_a_promise_could_have_lapsed() {
        let start = Instant::now();
        let voter = Promises::new(DURATION, start, 0);
        assert_eq!(
            voter.check_revoke(5, start + Duration::from_millis(1000)),
            RevokeAnswer::Held { remaining_ms: 250 }
        );
        assert_eq!(
            voter.check_revoke(5, start + DURATION),
            RevokeAnswer::Revoked
        );
        // A revocation written before the restart still counts.
        let voter = Promises::new(DURATION, start, 7);
        assert_eq!(voter.check_revoke(6, start), RevokeAnswer::Revoked);
        let mut voter = Promises::new(DURATION, start, 7);
        assert!(matches!(
            voter.grant("a", 7, None, start),
            PromiseAnswer::Refused(_)
        ));
    }

    #[test]
    fn the_leader_waits_for_the_promise_that_completes_a_majority() {
        let held = |ms| Some(RevokeAnswer::Held { remaining_ms: ms });
        let revoked = Some(RevokeAnswer::Revoked);
        // Three voters, the old primary silent: both others must lapse.
        assert_eq!(
            wait_for_majority(&[None, held(300), held(900)], 2),
            Some(900)
        );
        // One revoked already: the sooner of the others is enough.
        assert_eq!(
            wait_for_majority(&[revoked.clone(), held(300), held(900)], 2),
            Some(300)
        );
        assert_eq!(
            wait_for_majority(&[revoked.clone(), revoked.clone(), None], 2),
            Some(0)
        );
        // Two silent, or one silent and one refusing: no majority to wait for.
        assert_eq!(wait_for_majority(&[None, None, held(100)], 2), None);
        let refused = Some(RevokeAnswer::Refused("stale".into()));
        assert_eq!(wait_for_majority(&[None, refused, held(100)], 2), None);
        // Five voters, three needed.
        assert_eq!(
            wait_for_majority(&[revoked, None, held(50), held(700), held(20)], 3),
            Some(50)
        );
    }

    #[test]
    fn stale_primaries_get_no_promise() {
        let start = Instant::now();
        let mut voter = settled(start);
        let now = start + DURATION * 2;
        // The record here moved on: the old primary is refused.
        assert!(matches!(
            voter.grant("a", 3, Some(&record("b", 4)), now),
            PromiseAnswer::Refused(why) if why.contains("names b at epoch 4")
        ));
        // Same epoch, another node: refused.
        assert!(matches!(
            voter.grant("a", 4, Some(&record("b", 4)), now),
            PromiseAnswer::Refused(_)
        ));
        // A record not applied here yet does not stop a newer primary,
        // and an older one is refused while the newer promise runs.
        assert_eq!(
            voter.grant("c", 5, Some(&record("b", 4)), now),
            PromiseAnswer::Granted
        );
        assert!(matches!(
            voter.grant("b", 4, None, now),
            PromiseAnswer::Refused(_)
        ));
        // A revocation of an older epoch than the running promise is stale.
        assert!(matches!(
            voter.check_revoke(4, now),
            RevokeAnswer::Refused(why) if why.contains("stale")
        ));
        // An older epoch's promise does not hold off a newer revocation.
        assert_eq!(
            voter.check_revoke(6, now),
            RevokeAnswer::Revoked,
            "a promise for epoch 5 says nothing about epoch 6"
        );
    }
}

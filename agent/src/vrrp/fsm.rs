//! The VRRPv3 state machine of one virtual router (RFC 5798 §6.4), pure and
//! time-injected: events go in with the current instant, actions come out,
//! and [`Fsm::next_deadline`] says when to call [`Fsm::on_timer`] next. It
//! never touches a socket, a clock or the data plane (`mod.rs` does).
//!
//! Beyond the RFC, as keepalived does: a preempt delay, and a master that
//! meets a lower-priority master (a healed partition) answers at once with
//! an advert and re-sends gratuitous ARPs, so the loser leaves at once and
//! no client keeps the loser's MAC.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

/// Priority of the address owner: master at once (RFC 5798 §6.4.1).
pub const OWNER_PRIORITY: u8 = 255;
/// Priority a master sends when it stops (RFC 5798 §6.4.3).
pub const STOP_PRIORITY: u8 = 0;
/// A winner re-sends gratuitous ARPs for a split brain at most this often,
/// so a misbehaving peer that keeps claiming mastership cannot make us
/// flood the LAN.
const SPLIT_BRAIN_GARP_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Initialize,
    Backup,
    Master,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Initialize => "initialize",
            State::Backup => "backup",
            State::Master => "master",
        }
    }
}

/// Why the state changed: logged once and given to notify commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Startup with priority 255.
    AddressOwner,
    /// Startup with a lower priority: wait for a master.
    Startup,
    /// No advert within the master-down interval.
    MasterDown,
    /// The master sent priority 0; waited only the skew time.
    MasterStopped,
    /// An advert with a higher priority (or equal, from a higher address).
    HigherPriorityMaster,
    /// This node stops.
    Shutdown,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::AddressOwner => "address owner",
            Reason::Startup => "startup",
            Reason::MasterDown => "no advert within the master-down interval",
            Reason::MasterStopped => "the master stopped (priority 0)",
            Reason::HigherPriorityMaster => "a master with a higher priority",
            Reason::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send an advert with this priority (0 when stopping).
    SendAdvert { priority: u8 },
    /// The state changed; to Master means: own the VIPs and send
    /// gratuitous ARPs; from Master: give them up.
    Transition {
        from: State,
        to: State,
        reason: Reason,
    },
    /// Another master was heard while this node is master.
    MastersMet { peer: Ipv4Addr, won: bool },
    /// Send gratuitous ARPs again (the winner of a split brain).
    GratuitousArp,
}

/// What the instance is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// 1..=255; 255 only for the address owner.
    pub priority: u8,
    /// Advertisement_Interval; whole centiseconds, 10 ms to 40.95 s.
    pub advert_interval: Duration,
    pub preempt: bool,
    /// How long a lower-priority master is tolerated before preempting it.
    pub preempt_delay: Duration,
    /// This node's address on the VRRP interface: breaks priority ties.
    pub primary_address: Ipv4Addr,
}

#[derive(Debug, Clone)]
pub struct Fsm {
    params: Params,
    /// The configured priority with tracking applied.
    priority: u8,
    state: State,
    /// Master_Adver_Interval: the master's advert interval, learnt from
    /// its adverts (RFC 5798 §6.1).
    master_adver_interval: Duration,
    master_down_at: Option<Instant>,
    adver_at: Option<Instant>,
    /// When a lower-priority master may be preempted (preempt delay).
    preempt_at: Option<Instant>,
    last_split_brain_garp: Option<Instant>,
}

impl Fsm {
    pub fn new(params: Params) -> Fsm {
        Fsm {
            priority: params.priority,
            master_adver_interval: params.advert_interval,
            params,
            state: State::Initialize,
            master_down_at: None,
            adver_at: None,
            preempt_at: None,
            last_split_brain_garp: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The priority this node advertises now.
    pub fn priority(&self) -> u8 {
        self.priority
    }

    pub fn master_adver_interval(&self) -> Duration {
        self.master_adver_interval
    }

    /// Skew_Time = ((256 - Priority) * Master_Adver_Interval) / 256.
    pub fn skew_time(&self) -> Duration {
        self.master_adver_interval * (256 - u32::from(self.priority)) / 256
    }

    /// Master_Down_Interval = 3 * Master_Adver_Interval + Skew_Time.
    pub fn master_down_interval(&self) -> Duration {
        self.master_adver_interval * 3 + self.skew_time()
    }

    /// When [`Fsm::on_timer`] must run next, if a timer is armed.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Initialize => None,
            State::Backup => self.master_down_at,
            State::Master => self.adver_at,
        }
    }

    fn transition(&mut self, to: State, reason: Reason) -> Action {
        let from = self.state;
        self.state = to;
        self.preempt_at = None;
        Action::Transition { from, to, reason }
    }

    fn become_master(&mut self, now: Instant, reason: Reason) -> Vec<Action> {
        self.master_down_at = None;
        self.adver_at = Some(now + self.params.advert_interval);
        vec![
            Action::SendAdvert {
                priority: self.priority,
            },
            self.transition(State::Master, reason),
        ]
    }

    fn become_backup(&mut self, now: Instant, reason: Reason) -> Action {
        self.adver_at = None;
        self.master_down_at = Some(now + self.master_down_interval());
        self.transition(State::Backup, reason)
    }

    /// The Startup event (RFC 5798 §6.4.1).
    pub fn startup(&mut self, now: Instant) -> Vec<Action> {
        if self.state != State::Initialize {
            return Vec::new();
        }
        if self.priority == OWNER_PRIORITY {
            self.become_master(now, Reason::AddressOwner)
        } else {
            self.master_adver_interval = self.params.advert_interval;
            vec![self.become_backup(now, Reason::Startup)]
        }
    }

    /// The Shutdown event (RFC 5798 §6.4.2-3): a master sends priority 0
    /// so that a backup takes over after its skew time.
    pub fn shutdown(&mut self, _now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        match self.state {
            State::Initialize => return actions,
            State::Master => actions.push(Action::SendAdvert {
                priority: STOP_PRIORITY,
            }),
            State::Backup => {}
        }
        self.master_down_at = None;
        self.adver_at = None;
        actions.push(self.transition(State::Initialize, Reason::Shutdown));
        actions
    }

    /// Timers that fell due by `now`.
    pub fn on_timer(&mut self, now: Instant) -> Vec<Action> {
        match self.state {
            State::Initialize => Vec::new(),
            State::Backup => match self.master_down_at {
                Some(at) if at <= now => self.become_master(now, Reason::MasterDown),
                _ => Vec::new(),
            },
            State::Master => match self.adver_at {
                Some(at) if at <= now => {
                    // Keep the cadence unless we are a whole interval late.
                    let next = at + self.params.advert_interval;
                    self.adver_at = Some(if next > now {
                        next
                    } else {
                        now + self.params.advert_interval
                    });
                    vec![Action::SendAdvert {
                        priority: self.priority,
                    }]
                }
                _ => Vec::new(),
            },
        }
    }

    /// An advert for this VRID that passed the packet checks (§7.1).
    pub fn on_advert(
        &mut self,
        now: Instant,
        from: Ipv4Addr,
        priority: u8,
        interval: Duration,
    ) -> Vec<Action> {
        match self.state {
            State::Initialize => Vec::new(),
            State::Backup => self.backup_advert(now, priority, interval),
            State::Master => self.master_advert(now, from, priority, interval),
        }
    }

    /// RFC 5798 §6.4.2, "If an ADVERTISEMENT is received".
    fn backup_advert(&mut self, now: Instant, priority: u8, interval: Duration) -> Vec<Action> {
        if priority == STOP_PRIORITY {
            self.master_down_at = Some(now + self.skew_time());
            return Vec::new();
        }
        if !self.params.preempt || priority >= self.priority {
            self.accept_master(now, interval);
            if priority >= self.priority {
                self.preempt_at = None;
            }
            return Vec::new();
        }
        // A lower-priority master and preemption on: the RFC discards the
        // advert so the master-down timer runs out. The preempt delay first
        // tolerates that master for a while, as if it were higher.
        if self.params.preempt_delay > Duration::ZERO {
            let at = *self
                .preempt_at
                .get_or_insert(now + self.params.preempt_delay);
            if now < at {
                self.accept_master(now, interval);
            }
        }
        Vec::new()
    }

    fn accept_master(&mut self, now: Instant, interval: Duration) {
        self.master_adver_interval = interval;
        self.master_down_at = Some(now + self.master_down_interval());
    }

    /// RFC 5798 §6.4.3, "If an ADVERTISEMENT is received".
    fn master_advert(
        &mut self,
        now: Instant,
        from: Ipv4Addr,
        priority: u8,
        interval: Duration,
    ) -> Vec<Action> {
        if priority == STOP_PRIORITY {
            // Another master stopping: show the backups we are here.
            self.adver_at = Some(now + self.params.advert_interval);
            return vec![Action::SendAdvert {
                priority: self.priority,
            }];
        }
        let higher = priority > self.priority
            || (priority == self.priority && from > self.params.primary_address);
        if higher {
            self.master_adver_interval = interval;
            let priority = self.priority;
            let transition = self.become_backup(now, Reason::HigherPriorityMaster);
            // One last advert of ours (keepalived's higher_prio_send_advert):
            // the winner may never have heard us, and only hearing a lower
            // master tells it to re-send gratuitous ARPs for clients we had.
            return vec![
                Action::MastersMet {
                    peer: from,
                    won: false,
                },
                Action::SendAdvert { priority },
                transition,
            ];
        }
        // We win: the RFC discards the advert; we also answer at once so
        // the other master leaves now, and re-announce our MAC.
        let mut actions = vec![
            Action::MastersMet {
                peer: from,
                won: true,
            },
            Action::SendAdvert {
                priority: self.priority,
            },
        ];
        self.adver_at = Some(now + self.params.advert_interval);
        let garp_due = self
            .last_split_brain_garp
            .is_none_or(|last| now >= last + SPLIT_BRAIN_GARP_EVERY);
        if garp_due {
            self.last_split_brain_garp = Some(now);
            actions.push(Action::GratuitousArp);
        }
        actions
    }

    /// Tracking changed the priority (clamped to 1..=254 by the caller; an
    /// owner keeps 255). A master advertises the new value at once, so a
    /// backup with preemption can take over without waiting an interval.
    pub fn set_priority(&mut self, _now: Instant, priority: u8) -> Vec<Action> {
        if priority == self.priority || priority == STOP_PRIORITY {
            return Vec::new();
        }
        self.priority = priority;
        match self.state {
            State::Master => vec![Action::SendAdvert { priority }],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests;

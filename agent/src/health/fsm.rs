//! HAProxy's rise/fall counting, without IO: results in, transitions out.
//!
//! A backend that is up goes down after `fall` consecutive failures; one
//! that is down comes up after `rise` consecutive successes; a result of the
//! other kind resets the count. As in HAProxy, a backend starts up but
//! "barely" so: the first failure after start takes it down at once, so a
//! fresh balancer does not send flows to a dead server for `fall` intervals.

use std::time::Duration;

/// Where a backend's checks stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fsm {
    up: bool,
    /// Consecutive results against the current state.
    streak: u32,
    /// No result yet: one failure is enough to go down.
    fresh: bool,
    rise: u32,
    fall: u32,
}

/// A change of state, with the count that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Up { successes: u32 },
    Down { failures: u32 },
}

impl Fsm {
    pub fn new(rise: u32, fall: u32) -> Fsm {
        Fsm {
            up: true,
            streak: 0,
            fresh: true,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Results seen against the current state (toward `rise` or `fall`).
    pub fn streak(&self) -> u32 {
        self.streak
    }

    /// Counts one result; returns the transition it completes, if any.
    pub fn record(&mut self, passed: bool) -> Option<Transition> {
        let fresh = std::mem::take(&mut self.fresh);
        if passed == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = match (self.up, fresh) {
            (true, true) => 1,
            (true, false) => self.fall,
            (false, _) => self.rise,
        };
        if self.streak < needed {
            return None;
        }
        let count = self.streak;
        self.up = passed;
        self.streak = 0;
        Some(if passed {
            Transition::Up { successes: count }
        } else {
            Transition::Down { failures: count }
        })
    }

    /// The wait before the next check: `fastinter` while a change is under
    /// way, `downinter` while down, `interval` otherwise (HAProxy's rules).
    pub fn next_interval(
        &self,
        interval: Duration,
        fastinter: Duration,
        downinter: Duration,
    ) -> Duration {
        if self.streak > 0 {
            fastinter
        } else if !self.up {
            downinter
        } else {
            interval
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_backend_goes_down_at_the_first_failure() {
        let mut fsm = Fsm::new(2, 3);
        assert_eq!(fsm.record(false), Some(Transition::Down { failures: 1 }));
        assert!(!fsm.is_up());
    }

    #[test]
    fn fall_counts_consecutive_failures_and_a_success_resets_them() {
        let mut fsm = Fsm::new(2, 3);
        assert_eq!(fsm.record(true), None);
        assert_eq!(fsm.record(false), None);
        assert_eq!(fsm.record(false), None);
        assert_eq!(fsm.record(true), None, "a success resets the count");
        assert_eq!(fsm.record(false), None);
        assert_eq!(fsm.record(false), None);
        assert_eq!(fsm.record(false), Some(Transition::Down { failures: 3 }));
    }

    #[test]
    fn rise_counts_consecutive_successes() {
        let mut fsm = Fsm::new(2, 3);
        fsm.record(false);
        assert_eq!(fsm.record(true), None);
        assert_eq!(fsm.record(false), None, "a failure resets the count");
        assert_eq!(fsm.record(true), None);
        assert_eq!(fsm.record(true), Some(Transition::Up { successes: 2 }));
        assert!(fsm.is_up());
    }

    #[test]
    fn intervals_follow_haproxys_fastinter_and_downinter() {
        let (inter, fast, down) = (
            Duration::from_secs(2),
            Duration::from_millis(200),
            Duration::from_secs(5),
        );
        let mut fsm = Fsm::new(2, 3);
        fsm.record(true);
        assert_eq!(fsm.next_interval(inter, fast, down), inter);
        fsm.record(false);
        assert_eq!(fsm.next_interval(inter, fast, down), fast, "going down");
        fsm.record(false);
        fsm.record(false);
        assert_eq!(fsm.next_interval(inter, fast, down), down, "down");
        fsm.record(true);
        assert_eq!(fsm.next_interval(inter, fast, down), fast, "coming up");
    }
}

//! dom0's supervision decisions, portable so the host can test them: what the restart
//! policy says after a failure, and whether a domain's heartbeat says it hangs. dom0
//! (`dom0/src/supervise.rs`) does the hypercalls around them.

use alloc::vec::Vec;

use crate::manifest::{Restart, RestartPolicy, MAX_RESTART_BACKOFF_MS};

/// What to do with a domain that failed (faulted, exited, hung or was killed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Its policy is `never`: leave it destroyed.
    Leave,
    /// Build it again after `backoff_ms`.
    Restart { backoff_ms: u32 },
    /// It failed `failures` times within the window: leave it destroyed for good and tell
    /// its clients.
    GiveUp { failures: usize },
}

/// The policy's answer to a failure at `now_ns`, given `window` (the times of the restarts
/// already made, pruned here to those inside the window; a restart decided here is added).
/// The backoff doubles for each restart already in the window (capped).
pub fn decide(policy: &RestartPolicy, window: &mut Vec<u64>, now_ns: u64) -> Decision {
    if policy.mode != Restart::Always {
        return Decision::Leave;
    }
    let span = u64::from(policy.window_ms) * 1_000_000;
    window.retain(|&t| now_ns.saturating_sub(t) < span);
    if window.len() >= policy.limit as usize {
        return Decision::GiveUp { failures: window.len() + 1 };
    }
    let backoff_ms = policy.backoff_ms.saturating_mul(1 << window.len().min(16)).min(MAX_RESTART_BACKOFF_MS);
    window.push(now_ns);
    Decision::Restart { backoff_ms }
}

/// How long a domain may take from its start to its first heartbeat (device set-up under
/// emulation on a loaded machine takes a while; a hang before the first beat is noticed
/// only then).
pub const STARTUP_GRACE_NS: u64 = 5_000_000_000;

/// One domain's hang watchdog: hung once a whole period passed without a beat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watchdog {
    period_ns: u64,
    started_ns: u64,
    last_beat_ns: Option<u64>,
}

/// What [`Watchdog::check`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Alive,
    /// No beat for `silent_ns` (since the last beat, or since the start if it never beat).
    Hung {
        silent_ns: u64,
        ever_beat: bool,
    },
}

impl Watchdog {
    /// A watchdog of `period_ms` for a domain started at `now_ns`.
    pub fn new(period_ms: u32, now_ns: u64) -> Self {
        Self { period_ns: u64::from(period_ms) * 1_000_000, started_ns: now_ns, last_beat_ns: None }
    }

    /// The period in ns.
    pub fn period_ns(&self) -> u64 {
        self.period_ns
    }

    /// Look at `now_ns`: `beat` says whether the domain beat since the last check; `stalled`
    /// that dom0 itself did not run for a while (its timer came late: the whole machine
    /// paused, e.g. the host descheduled QEMU), so silence meanwhile proves nothing and is
    /// forgiven.
    pub fn check(&mut self, now_ns: u64, beat: bool, stalled: bool) -> Verdict {
        if beat || (stalled && self.last_beat_ns.is_some()) {
            self.last_beat_ns = Some(now_ns);
            return Verdict::Alive;
        }
        match self.last_beat_ns {
            Some(t) if now_ns.saturating_sub(t) > self.period_ns => {
                Verdict::Hung { silent_ns: now_ns - t, ever_beat: true }
            }
            None if now_ns.saturating_sub(self.started_ns) > STARTUP_GRACE_NS && !stalled => {
                Verdict::Hung { silent_ns: now_ns - self.started_ns, ever_beat: false }
            }
            _ => Verdict::Alive,
        }
    }
}

/// Whether dom0's periodic tick, due `tick_ns` after `last_ns`, came so late at `now_ns`
/// that the machine must have paused (more than a tick late).
pub fn stalled(last_ns: u64, now_ns: u64, tick_ns: u64) -> bool {
    now_ns.saturating_sub(last_ns) > tick_ns.saturating_mul(2)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;

    const MS: u64 = 1_000_000;

    fn always(limit: u32, window_ms: u32, backoff_ms: u32) -> RestartPolicy {
        RestartPolicy { mode: Restart::Always, limit, window_ms, backoff_ms, watchdog_ms: 0 }
    }

    #[test]
    fn never_leaves_the_domain_dead() {
        let mut w = vec![];
        assert_eq!(decide(&RestartPolicy::default(), &mut w, 0), Decision::Leave);
        assert!(w.is_empty());
    }

    #[test]
    fn restarts_up_to_the_limit_in_the_window_then_gives_up() {
        let p = always(3, 1000, 0);
        let mut w = vec![];
        for t in 0..3 {
            assert_eq!(decide(&p, &mut w, t * 10 * MS), Decision::Restart { backoff_ms: 0 });
        }
        assert_eq!(decide(&p, &mut w, 40 * MS), Decision::GiveUp { failures: 4 });
        // Once the first restarts leave the window, restarts are allowed again.
        assert_eq!(decide(&p, &mut w, 1005 * MS), Decision::Restart { backoff_ms: 0 });
    }

    #[test]
    fn the_backoff_doubles_within_the_window_and_is_capped() {
        let p = always(100, 3_600_000, 10);
        let mut w = vec![];
        let backoffs: std::vec::Vec<u32> = (0..4)
            .map(|t| match decide(&p, &mut w, t * MS) {
                Decision::Restart { backoff_ms } => backoff_ms,
                d => panic!("{d:?}"),
            })
            .collect();
        assert_eq!(backoffs, [10, 20, 40, 80]);
        let mut w = vec![0; 40];
        assert_eq!(decide(&p, &mut w, MS), Decision::Restart { backoff_ms: MAX_RESTART_BACKOFF_MS });
    }

    #[test]
    fn a_domain_is_hung_after_a_silent_period() {
        let mut d = Watchdog::new(50, 0);
        assert_eq!(d.check(10 * MS, true, false), Verdict::Alive);
        assert_eq!(d.check(35 * MS, false, false), Verdict::Alive);
        assert_eq!(d.check(60 * MS, false, false), Verdict::Alive);
        assert_eq!(d.check(61 * MS, false, false), Verdict::Hung { silent_ns: 51 * MS, ever_beat: true });
    }

    #[test]
    fn beats_keep_it_alive_and_a_paused_machine_is_forgiven() {
        let mut d = Watchdog::new(50, 0);
        for t in 1..100 {
            assert_eq!(d.check(t * 25 * MS, true, false), Verdict::Alive);
        }
        // dom0 ran 400 ms late: nobody ran, silence proves nothing.
        assert_eq!(d.check(2875 * MS, false, true), Verdict::Alive);
        assert_eq!(d.check(2900 * MS, false, false), Verdict::Alive);
        assert!(matches!(d.check(2930 * MS, false, false), Verdict::Hung { .. }));
    }

    #[test]
    fn a_domain_that_never_beats_gets_the_startup_grace() {
        let mut d = Watchdog::new(50, 1000 * MS);
        assert_eq!(d.check(1000 * MS + STARTUP_GRACE_NS, false, false), Verdict::Alive);
        assert_eq!(
            d.check(1001 * MS + STARTUP_GRACE_NS, false, false),
            Verdict::Hung { silent_ns: STARTUP_GRACE_NS + MS, ever_beat: false }
        );
    }

    #[test]
    fn a_late_tick_is_a_stall() {
        assert!(!stalled(0, 25 * MS, 25 * MS));
        assert!(!stalled(0, 50 * MS, 25 * MS));
        assert!(stalled(0, 51 * MS, 25 * MS));
    }
}

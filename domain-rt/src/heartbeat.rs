//! The heartbeat a supervised domain sends dom0's hang watchdog (manifest `watchdog_ms`):
//! dom0 puts `heartbeat=<slot> heartbeat_ms=<period>` on the command line and restarts the
//! domain as crashed when a whole period passes without a beat.
//!
//! A beat says "my serving loop still turns": a driver that spins, deadlocks or halts goes
//! quiet. (It does not say that its device answers: a device that takes longer than a period
//! under a loaded emulator is not a hang, and a request the device never completes is the
//! client's timeout's business.) It beats every quarter period, so that one late wake-up
//! does not cost a restart; the caller arms a timer for [`Heartbeat::next_in_ns`] before
//! sleeping while nothing else would wake it.

use crate::hypercall;
use crate::BootInfo;

/// When to beat (portable: the clock and the signalling are the caller's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pacer {
    every_ns: u64,
    last_ns: Option<u64>,
}

impl Pacer {
    /// A pacer for a watchdog of `period_ms`: beats every quarter period (at least 1 ms).
    pub fn new(period_ms: u64) -> Self {
        Self { every_ns: (period_ms.saturating_mul(1_000_000) / 4).max(1_000_000), last_ns: None }
    }

    /// Whether to beat now: the first time, and then once a quarter period passed since the
    /// last beat.
    pub fn due(&mut self, now_ns: u64) -> bool {
        let due = match self.last_ns {
            None => true,
            Some(last) => now_ns.saturating_sub(last) >= self.every_ns,
        };
        if due {
            self.last_ns = Some(now_ns);
        }
        due
    }

    /// Nanoseconds from `now_ns` until the next beat may be due.
    pub fn next_in_ns(&self, now_ns: u64) -> u64 {
        match self.last_ns {
            None => 0,
            Some(last) => self.every_ns.saturating_sub(now_ns.saturating_sub(last)).max(1),
        }
    }
}

/// A domain's heartbeat to dom0.
pub struct Heartbeat {
    slot: u64,
    pacer: Pacer,
}

impl Heartbeat {
    /// The heartbeat dom0 gave this domain, if any (`heartbeat=<slot> heartbeat_ms=<ms>`).
    pub fn from_cmdline(info: &BootInfo) -> Option<Self> {
        let slot = info.slot("heartbeat")?;
        let period = info.slot("heartbeat_ms")?;
        Some(Self { slot, pacer: Pacer::new(period) })
    }

    /// Beat if it is time ([`Pacer::due`]).
    pub fn beat(&mut self) {
        if self.pacer.due(hypercall::clock_ns()) {
            let _ = hypercall::signal(self.slot, 1);
        }
    }

    /// Nanoseconds until the next beat may be due: the longest an idle server may sleep.
    pub fn next_in_ns(&self) -> u64 {
        self.pacer.next_in_ns(hypercall::clock_ns())
    }
}

#[cfg(test)]
mod tests {
    use super::Pacer;

    const MS: u64 = 1_000_000;

    #[test]
    fn beats_at_once_then_every_quarter_period() {
        let mut p = Pacer::new(40);
        assert_eq!(p.next_in_ns(0), 0);
        assert!(p.due(5 * MS));
        assert!(!p.due(10 * MS));
        assert_eq!(p.next_in_ns(10 * MS), 5 * MS);
        assert!(p.due(15 * MS));
        assert!(!p.due(16 * MS));
        assert_eq!(p.next_in_ns(100 * MS), 1, "overdue: at once");
    }

    #[test]
    fn the_quarter_period_is_at_least_a_millisecond() {
        let mut p = Pacer::new(0);
        assert!(p.due(0));
        assert!(!p.due(MS - 1));
        assert!(p.due(MS));
    }
}

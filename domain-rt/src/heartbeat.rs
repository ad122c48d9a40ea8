//! The heartbeat a supervised domain sends dom0's hang watchdog (manifest `watchdog_ms`):
//! dom0 puts `heartbeat=<slot> heartbeat_ms=<period>` on the command line and restarts the
//! domain as crashed when a whole period passes without a beat.
//!
//! A beat says "I am making progress", not merely "my loop runs": a server beats when it is
//! idle or when its progress counter (e.g. completed requests) moved since the last beat, so
//! a driver whose loop still turns while its device stopped answering goes quiet too. It
//! beats every quarter period, so that one late wake-up does not cost a restart; the caller
//! arms a timer for [`Heartbeat::next_in_ns`] before sleeping while idle.

use crate::hypercall;
use crate::BootInfo;

/// When to beat (portable: the clock and the signalling are the caller's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pacer {
    every_ns: u64,
    last_ns: Option<u64>,
    progress: u64,
}

impl Pacer {
    /// A pacer for a watchdog of `period_ms`: beats every quarter period (at least 1 ms).
    pub fn new(period_ms: u64) -> Self {
        Self { every_ns: (period_ms.saturating_mul(1_000_000) / 4).max(1_000_000), last_ns: None, progress: 0 }
    }

    /// Whether to beat now: the first time, and then once a quarter period passed since the
    /// last beat if the server is `idle` or `progress` moved since then.
    pub fn due(&mut self, now_ns: u64, idle: bool, progress: u64) -> bool {
        let due = match self.last_ns {
            None => true,
            Some(last) => now_ns.saturating_sub(last) >= self.every_ns && (idle || progress != self.progress),
        };
        if due {
            self.last_ns = Some(now_ns);
            self.progress = progress;
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
    pub fn beat(&mut self, idle: bool, progress: u64) {
        if self.pacer.due(hypercall::clock_ns(), idle, progress) {
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
    fn beats_at_once_then_every_quarter_period_while_idle() {
        let mut p = Pacer::new(40);
        assert!(p.due(5 * MS, true, 0));
        assert!(!p.due(10 * MS, true, 0));
        assert_eq!(p.next_in_ns(10 * MS), 5 * MS);
        assert!(p.due(15 * MS, true, 0));
        assert!(!p.due(16 * MS, true, 0));
    }

    #[test]
    fn a_busy_server_beats_only_when_it_made_progress() {
        let mut p = Pacer::new(40);
        assert!(p.due(0, false, 3));
        // Busy and stuck: the loop runs, nothing completes, no beat however long.
        for t in 1..100 {
            assert!(!p.due(t * MS, false, 3), "at {t} ms");
        }
        // Something completed: beat.
        assert!(p.due(100 * MS, false, 4));
        // Idle again: beats resume.
        assert!(p.due(111 * MS, true, 4));
    }

    #[test]
    fn the_quarter_period_is_at_least_a_millisecond() {
        let mut p = Pacer::new(0);
        assert!(p.due(0, true, 0));
        assert!(!p.due(MS - 1, true, 0));
        assert!(p.due(MS, true, 0));
    }
}

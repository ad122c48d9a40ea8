//! The heartbeat a supervised domain sends dom0's hang watchdog (manifest `watchdog_ms`):
//! dom0 puts `heartbeat=<slot> heartbeat_ms=<period>` on the command line and restarts the
//! domain as crashed when a whole period passes without a beat.
//!
//! What a beat proves: "my serving loop still turns, and my device is keeping up". A driver
//! that spins, deadlocks or halts goes quiet; so does one whose device holds work and has
//! finished none of it for [`DEVICE_GRACE_PERIODS`] periods ([`Progress`]): a wedged device
//! (a lost kick, a queue the device stopped serving) that no loop iteration can get going
//! again, and that a restart (function-level reset, a fresh driver) does. A device with no
//! work owes nothing, and one that finishes something now and then is alive however slow;
//! the grace is several periods because a device emulated by a loaded host can take longer
//! than one period for a request without being stuck (a needless restart costs the guests
//! only time, but it does cost them). A request the device keeps for good while it finishes
//! others is not seen here: that is the client's timeout's business.
//!
//! It beats every quarter period, so that one late wake-up does not cost a restart; the
//! caller arms a timer for [`Heartbeat::next_in_ns`] before sleeping while nothing else
//! would wake it.

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

/// How many watchdog periods a device may hold work without finishing any before the
/// driver stops beating.
pub const DEVICE_GRACE_PERIODS: u64 = 4;

/// Whether a device is keeping up (portable: the caller says what the device holds and how
/// much it finished).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    grace_ns: u64,
    /// When the device was last seen idle or having finished something new.
    since_ns: Option<u64>,
    /// Its count of finished work then.
    done: u64,
}

impl Progress {
    /// A device may hold work for `grace_ns` without finishing any.
    pub fn new(grace_ns: u64) -> Self {
        Self { grace_ns, since_ns: None, done: 0 }
    }

    /// Look at `now_ns`: `pending` says whether the device holds work it owes an answer for;
    /// `done` is a running count of the work it finished. Keeping up: it holds nothing, or
    /// `done` moved since the last look, or it has held work without finishing any for at
    /// most the grace (counted from the last look that saw it idle or moving).
    pub fn keeping_up(&mut self, now_ns: u64, pending: bool, done: u64) -> bool {
        match self.since_ns {
            Some(since) if pending && done == self.done => now_ns.saturating_sub(since) <= self.grace_ns,
            _ => {
                self.since_ns = Some(now_ns);
                self.done = done;
                true
            }
        }
    }
}

/// A domain's heartbeat to dom0.
pub struct Heartbeat {
    slot: u64,
    pacer: Pacer,
    progress: Progress,
    /// Beats withheld because the device was not keeping up (for the console).
    withheld: u64,
}

impl Heartbeat {
    /// The heartbeat dom0 gave this domain, if any (`heartbeat=<slot> heartbeat_ms=<ms>`).
    pub fn from_cmdline(info: &BootInfo) -> Option<Self> {
        let slot = info.slot("heartbeat")?;
        let period = info.slot("heartbeat_ms")?;
        let grace = period.saturating_mul(DEVICE_GRACE_PERIODS).saturating_mul(1_000_000);
        Some(Self { slot, pacer: Pacer::new(period), progress: Progress::new(grace), withheld: 0 })
    }

    /// Beat if it is time ([`Pacer::due`]) and the device is keeping up
    /// ([`Progress::keeping_up`]: `pending`, the device holds work; `done`, a running count
    /// of what it finished). The first beat withheld is reported on the console.
    pub fn beat(&mut self, pending: bool, done: u64) {
        let now = hypercall::clock_ns();
        if !self.pacer.due(now) {
            return;
        }
        if self.progress.keeping_up(now, pending, done) {
            let _ = hypercall::signal(self.slot, 1);
        } else {
            self.withheld += 1;
            if self.withheld == 1 {
                crate::println!(
                    "heartbeat: withheld at {now} ns: my device holds work and finished none for {} ms",
                    self.progress.grace_ns / 1_000_000
                );
            }
        }
    }

    /// The interval between beats in ns (a quarter of the watchdog's period).
    pub fn every_ns(&self) -> u64 {
        self.pacer.every_ns
    }

    /// Nanoseconds until the next beat may be due: the longest an idle server may sleep.
    pub fn next_in_ns(&self) -> u64 {
        self.pacer.next_in_ns(hypercall::clock_ns())
    }
}

#[cfg(test)]
mod tests {
    use super::{Pacer, Progress};

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

    #[test]
    fn an_idle_device_keeps_up_for_ever() {
        let mut p = Progress::new(200 * MS);
        for t in 0..100 {
            assert!(p.keeping_up(t * 100 * MS, false, 7));
        }
    }

    #[test]
    fn a_device_that_finishes_something_keeps_up_however_slow() {
        let mut p = Progress::new(200 * MS);
        assert!(p.keeping_up(0, true, 0));
        assert!(p.keeping_up(150 * MS, true, 0));
        assert!(p.keeping_up(200 * MS, true, 0));
        assert!(p.keeping_up(201 * MS, true, 1), "it moved: the grace starts again");
        assert!(p.keeping_up(400 * MS, true, 1));
        assert!(!p.keeping_up(402 * MS, true, 1), "held work for 201 ms, finished none");
        assert!(!p.keeping_up(900 * MS, true, 1));
        assert!(p.keeping_up(901 * MS, true, 2), "and it recovers as soon as it finishes one");
    }

    #[test]
    fn the_grace_counts_from_the_last_look_at_an_idle_device() {
        let mut p = Progress::new(200 * MS);
        assert!(p.keeping_up(0, false, 3));
        // Work was given after the look at 0 ms; it is the look that counts (conservative).
        assert!(p.keeping_up(200 * MS, true, 3));
        assert!(!p.keeping_up(201 * MS, true, 3));
        assert!(p.keeping_up(202 * MS, false, 3), "drained: idle again");
        assert!(p.keeping_up(402 * MS, true, 3));
        assert!(!p.keeping_up(403 * MS, true, 3));
    }
}

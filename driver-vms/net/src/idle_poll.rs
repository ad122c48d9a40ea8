//! How long the serve loop polls before it sleeps: adaptive halt polling inside a VM, as
//! Linux's `cpuidle-haltpoll` does in a KVM guest (drivers/cpuidle/governors/haltpoll.c,
//! Documentation/virt/guest-halt-polling.rst) to avoid the VM exit a halt costs; KVM does
//! the same on the host's side (`halt_poll_ns`).
//!
//! Why: a driver VM that sleeps pays, for the next frame, a world switch out, the host
//! CPU's wake-up, and a world switch back in with its working set to bring back; on a
//! request/answer exchange (the host's next request follows our answer within some tens of
//! microseconds) that is most of what the driver VM adds to an exchange. Polling first,
//! with the device's interrupts off, finds that frame without any of it.
//!
//! The cost is the CPU spent polling, and vCPUs of the same or lower priority waiting for
//! it (the driver VM polls only while every guest it serves sleeps, but the microvisor
//! preempts it only for a higher priority): both are bounded by [`IdlePoll::max_ns`], and
//! the window adapts so that a driver whose idle periods are long polls little. The rule
//! is haltpoll's: an idle period that a longer window (up to the maximum) would have
//! caught doubles the window (to at least [`GROW_START_NS`]); one longer than the maximum,
//! where polling is wasted, halves it; one the window caught leaves it.

/// The least window after a growth (haltpoll's `guest_halt_poll_grow_start`).
pub const GROW_START_NS: u64 = 50_000;

/// The default longest window (haltpoll's `guest_halt_poll_ns`, KVM's `halt_poll_ns` on x86).
pub const DEFAULT_MAX_NS: u64 = 200_000;

/// The longest window a command line may ask for: two of the microvisor's 5 ms time
/// slices, longer than any answer worth waiting for, and the most a polling driver may
/// hold vCPUs of its priority or below back.
pub const LONGEST_MAX_NS: u64 = 10_000_000;

/// Why the command line's `idle_poll_us=<N>` was not taken as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxArgProblem {
    /// Not a number of microseconds: the default is used.
    NotMicroseconds,
    /// Above [`LONGEST_MAX_NS`]: that is used.
    TooLong,
}

impl core::fmt::Display for MaxArgProblem {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            MaxArgProblem::NotMicroseconds => "not a number of microseconds",
            MaxArgProblem::TooLong => "more than a poll may hold lower priorities back",
        })
    }
}

/// The longest window from the command line's `idle_poll_us=<N>` (`None`: not given, the
/// default; 0: no polling). A value it cannot take gives the window used instead and why.
pub fn max_ns_from_arg(arg: Option<&str>) -> Result<u64, (u64, MaxArgProblem)> {
    match arg.map(str::parse::<u64>) {
        None => Ok(DEFAULT_MAX_NS),
        Some(Ok(us)) if us.saturating_mul(1000) > LONGEST_MAX_NS => Err((LONGEST_MAX_NS, MaxArgProblem::TooLong)),
        Some(Ok(us)) => Ok(us * 1000),
        Some(Err(_)) => Err((DEFAULT_MAX_NS, MaxArgProblem::NotMicroseconds)),
    }
}

/// The polling window and how it adapts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdlePoll {
    window_ns: u64,
    max_ns: u64,
}

impl IdlePoll {
    /// Starts with no window; `max_ns` 0 never polls.
    pub const fn new(max_ns: u64) -> Self {
        Self { window_ns: 0, max_ns }
    }

    /// How long to poll before the next sleep (0: sleep at once).
    pub fn window_ns(&self) -> u64 {
        self.window_ns
    }

    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }

    /// After an idle period: `idle_ns` from its start (polling or not) until work arrived.
    pub fn idle_ended(&mut self, idle_ns: u64) {
        if idle_ns <= self.window_ns {
            // Caught by polling: keep the window.
        } else if idle_ns > self.max_ns {
            // Nothing the longest window would have caught: polling was wasted.
            self.window_ns /= 2;
        } else {
            // A longer window would have caught it.
            self.window_ns = self.window_ns.saturating_mul(2).max(GROW_START_NS).min(self.max_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grows_to_cover_a_steady_gap_then_keeps_it() {
        let mut p = IdlePoll::new(DEFAULT_MAX_NS);
        assert_eq!(p.window_ns(), 0);
        let mut windows = Vec::new();
        for _ in 0..8 {
            p.idle_ended(54_000);
            windows.push(p.window_ns());
        }
        assert_eq!(windows, [50_000, 100_000, 100_000, 100_000, 100_000, 100_000, 100_000, 100_000]);
        // A gap the window misses but the maximum covers: grow, up to the maximum.
        p.idle_ended(150_000);
        assert_eq!(p.window_ns(), DEFAULT_MAX_NS);
        p.idle_ended(DEFAULT_MAX_NS);
        assert_eq!(p.window_ns(), DEFAULT_MAX_NS);
    }

    #[test]
    fn long_idle_periods_wind_polling_down() {
        let mut p = IdlePoll::new(DEFAULT_MAX_NS);
        for gap in [54_000, 150_000, 150_000] {
            p.idle_ended(gap);
        }
        assert_eq!(p.window_ns(), DEFAULT_MAX_NS);
        let mut windows = Vec::new();
        for _ in 0..4 {
            p.idle_ended(DEFAULT_MAX_NS + 1);
            windows.push(p.window_ns());
        }
        assert_eq!(windows, [100_000, 50_000, 25_000, 12_500]);
        // Halved every time, it reaches 0.
        for _ in 0..20 {
            p.idle_ended(10_000_000);
        }
        assert_eq!(p.window_ns(), 0);
    }

    #[test]
    fn no_maximum_never_polls() {
        let mut p = IdlePoll::new(0);
        for gap in [0, 1, 5_000, 54_000, 1_000_000] {
            p.idle_ended(gap);
            assert_eq!(p.window_ns(), 0);
        }
    }

    #[test]
    fn the_longest_window_from_the_command_line() {
        assert_eq!(max_ns_from_arg(None), Ok(DEFAULT_MAX_NS));
        assert_eq!(max_ns_from_arg(Some("0")), Ok(0));
        assert_eq!(max_ns_from_arg(Some("50")), Ok(50_000));
        assert_eq!(max_ns_from_arg(Some("10000")), Ok(LONGEST_MAX_NS));
        assert_eq!(max_ns_from_arg(Some("10001")), Err((LONGEST_MAX_NS, MaxArgProblem::TooLong)));
        assert_eq!(max_ns_from_arg(Some(&u64::MAX.to_string())), Err((LONGEST_MAX_NS, MaxArgProblem::TooLong)));
        for bad in ["", "-1", "200us", "0x10"] {
            assert_eq!(max_ns_from_arg(Some(bad)), Err((DEFAULT_MAX_NS, MaxArgProblem::NotMicroseconds)), "{bad:?}");
        }
    }

    proptest! {
        /// Whatever the idle periods, the window stays within the maximum; a period longer
        /// than the maximum never grows it, and one the window did not catch never shrinks it.
        #[test]
        fn window_is_bounded(max in 0u64..1_000_000, gaps in prop::collection::vec(0u64..2_000_000, 0..64)) {
            let mut p = IdlePoll::new(max);
            for g in gaps {
                let before = p.window_ns();
                p.idle_ended(g);
                prop_assert!(p.window_ns() <= max);
                if g > max {
                    prop_assert!(p.window_ns() <= before);
                } else if g > before {
                    prop_assert!(p.window_ns() >= before.min(max));
                    prop_assert!(p.window_ns() >= g.min(GROW_START_NS).min(max));
                } else {
                    prop_assert_eq!(p.window_ns(), before);
                }
            }
        }
    }
}

//! The stall report's trigger: a device with requests outstanding that made no progress for
//! a while. Portable (times are TSC ticks given by the caller) so it is host-tested; the
//! VMM prints the devices' state when it fires. It only reports: it never re-rings a
//! doorbell or retries (a fallback would hide a lost wake-up instead of locating it).

/// Watches one progress counter while work is outstanding.
#[derive(Clone, Copy, Debug)]
pub struct StallWatch {
    /// Ticks without progress (with work outstanding) before the first report.
    after: u64,
    /// The progress counter last seen, and when (TSC) it last moved or work appeared.
    seen: u64,
    since: u64,
    /// When the next report is due while the stall lasts (doubling gaps: one line per
    /// device per report, a long stall does not flood the console).
    next_report: Option<u64>,
    gap: u64,
    /// Reports made.
    pub reports: u64,
}

impl StallWatch {
    pub fn new(after: u64) -> Self {
        Self { after: after.max(1), seen: 0, since: 0, next_report: None, gap: after.max(1), reports: 0 }
    }

    /// Look at `now`: `busy` (requests outstanding), `progress` (a counter that moves when
    /// any request is taken or completed). True when a report is due now.
    pub fn check(&mut self, now: u64, busy: bool, progress: u64) -> bool {
        if !busy || progress != self.seen || self.next_report.is_none() {
            let restart = !busy || progress != self.seen;
            self.seen = progress;
            if restart || self.next_report.is_none() {
                self.since = now;
                self.gap = self.after;
                self.next_report = busy.then_some(now.saturating_add(self.after));
            }
            if !busy {
                self.next_report = None;
            }
            return false;
        }
        match self.next_report {
            Some(t) if now >= t => {
                self.reports += 1;
                self.gap = self.gap.saturating_mul(2);
                self.next_report = Some(now.saturating_add(self.gap));
                true
            }
            _ => false,
        }
    }

    /// When the watch next wants to look (to arm a timer), if work is outstanding.
    pub fn deadline(&self) -> Option<u64> {
        self.next_report
    }

    /// Ticks since the last progress (or since work appeared).
    pub fn stalled_for(&self, now: u64) -> u64 {
        now.saturating_sub(self.since)
    }
}

#[cfg(test)]
mod tests {
    use super::StallWatch;

    #[test]
    fn reports_only_after_the_time_without_progress_and_then_with_doubling_gaps() {
        let mut w = StallWatch::new(100);
        assert!(!w.check(0, true, 5));
        assert!(!w.check(99, true, 5));
        assert!(w.check(100, true, 5));
        assert!(!w.check(150, true, 5));
        assert!(!w.check(299, true, 5));
        assert!(w.check(300, true, 5));
        assert_eq!(w.reports, 2);
        assert_eq!(w.stalled_for(300), 300);
    }

    #[test]
    fn progress_or_idleness_restarts_the_clock() {
        let mut w = StallWatch::new(100);
        assert!(!w.check(0, true, 1));
        assert!(!w.check(90, true, 2));
        assert!(!w.check(180, true, 2));
        assert!(w.check(190, true, 2));
        assert!(!w.check(200, false, 2));
        assert_eq!(w.deadline(), None);
        assert!(!w.check(1000, true, 2));
        assert!(!w.check(1099, true, 2));
        assert!(w.check(1100, true, 2));
    }

    #[test]
    fn an_idle_device_never_reports() {
        let mut w = StallWatch::new(10);
        for t in 0..1000 {
            assert!(!w.check(t, false, 0));
        }
    }
}

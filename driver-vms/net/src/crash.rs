//! Fault injection for restart tests: `rogue=crash-after=<n>` makes the net driver VM crash
//! once it has moved between `n` and `2n - 1` frames (the point drawn anew by each
//! incarnation), in one of three ways, also drawn: a stage-2 fault, a triple fault, or an
//! exit. dom0 hears of each and, with `restart = "always"`, builds the VM again; the
//! guests' channels must survive it (`ipc_spec::net`, "Restarts").
//!
//! `rogue=hang-after=<n>` picks the point the same way but then spins for ever: no fault,
//! no exit, no heartbeat. Only dom0's hang watchdog (manifest `watchdog_ms`) can notice.
//! `rogue=wedge-after=<n>` picks it the same way but then only stops taking transmit
//! completions (as after a failed reap: the device keeps the buffers), while the loop turns
//! on: its heartbeat must stop because the device no longer keeps up
//! (`domain_rt::heartbeat::Progress`), not because the loop stopped.

/// How the driver VM dies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// A read outside its memory: the microvisor stops it with a stage-2 fault.
    Stage2,
    /// An exception it cannot handle (an empty IDT): a triple fault.
    TripleFault,
    /// It exits (`DomainExit`) with a non-zero status.
    Exit,
    /// It spins for ever (`hang-after`; never drawn for `crash-after`).
    Hang,
    /// Its transmit path wedges, the loop turning on (`wedge-after`; never drawn).
    Wedge,
}

impl Way {
    /// The way drawn from `entropy`.
    pub fn from_entropy(entropy: u64) -> Self {
        match (entropy >> 17) % 3 {
            0 => Way::Stage2,
            1 => Way::TripleFault,
            _ => Way::Exit,
        }
    }

    /// Its name in the console line.
    pub fn name(self) -> &'static str {
        match self {
            Way::Stage2 => "a stage-2 fault",
            Way::TripleFault => "a triple fault",
            Way::Exit => "an exit",
            Way::Hang => "a hang",
            Way::Wedge => "a wedged transmit path",
        }
    }
}

/// Counts frames until it is time to crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrashAfter {
    /// Frames moved so far.
    pub frames: u64,
    /// Crash once `frames` reaches this.
    pub at: u64,
    /// How.
    pub way: Way,
}

impl CrashAfter {
    /// From the `rogue=` argument: `crash-after=<n>`, `hang-after=<n>` or `wedge-after=<n>`
    /// (`n` at least 1), the point drawn from `entropy` (any bits: the clock at start will
    /// do) in `n..2n`, and for `crash-after` the way as well. `None` for anything else.
    pub fn parse(rogue: &str, entropy: u64) -> Option<Self> {
        let (n, way) = [("crash-after=", None), ("hang-after=", Some(Way::Hang)), ("wedge-after=", Some(Way::Wedge))]
            .into_iter()
            .find_map(|(prefix, way)| Some((rogue.strip_prefix(prefix)?, way)))?;
        let n: u64 = n.parse().ok().filter(|&n| n > 0)?;
        // A cheap mix so that clock values close together still land far apart.
        let mixed = entropy.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
        let way = way.unwrap_or(Way::from_entropy(mixed));
        Some(Self { frames: 0, at: n.saturating_add(mixed % n), way })
    }

    /// One more frame moved; whether it is time to crash.
    pub fn frame(&mut self) -> bool {
        self.frames = self.frames.saturating_add(1);
        self.frames >= self.at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_draws_the_point_in_range() {
        assert_eq!(CrashAfter::parse("crash-after=0", 1), None);
        assert_eq!(CrashAfter::parse("crash-after=x", 1), None);
        assert_eq!(CrashAfter::parse("crash-after=", 1), None);
        assert_eq!(CrashAfter::parse("silent", 1), None);
        let mut ways = [false; 3];
        let mut points = std::collections::BTreeSet::new();
        for e in 0..3000u64 {
            let c = CrashAfter::parse("crash-after=500", e * 1_000_003).unwrap();
            assert!((500..1000).contains(&c.at), "{c:?}");
            points.insert(c.at);
            ways[match c.way {
                Way::Stage2 => 0,
                Way::TripleFault => 1,
                Way::Exit => 2,
                Way::Hang | Way::Wedge => panic!("crash-after never hangs or wedges"),
            }] = true;
        }
        assert!(ways.iter().all(|&w| w), "every way is drawn");
        assert!(points.len() > 300, "points spread: {}", points.len());
        let c = CrashAfter::parse("crash-after=1", 12345).unwrap();
        assert_eq!(c.at, 1);
        assert_eq!(CrashAfter::parse(&format!("crash-after={}", u64::MAX), 7).map(|c| c.at > 0), Some(true));
    }

    #[test]
    fn counts_frames_up_to_the_point() {
        let mut c = CrashAfter { frames: 0, at: 3, way: Way::Exit };
        assert!(!c.frame());
        assert!(!c.frame());
        assert!(c.frame());
        assert!(c.frame());
    }

    #[test]
    fn hang_after_picks_the_point_the_same_way_and_always_hangs() {
        assert_eq!(CrashAfter::parse("hang-after=0", 1), None);
        assert_eq!(CrashAfter::parse("hang-after=", 1), None);
        assert_eq!(CrashAfter::parse("hang-after=-3", 1), None);
        assert_eq!(CrashAfter::parse("wedge-after=0", 1), None);
        assert_eq!(CrashAfter::parse("wedge-after", 1), None);
        for e in 0..300u64 {
            let h = CrashAfter::parse("hang-after=40", e * 7_919).unwrap();
            let w = CrashAfter::parse("wedge-after=40", e * 7_919).unwrap();
            let c = CrashAfter::parse("crash-after=40", e * 7_919).unwrap();
            assert_eq!((h.way, h.at), (Way::Hang, c.at));
            assert_eq!((w.way, w.at), (Way::Wedge, c.at));
        }
    }
}

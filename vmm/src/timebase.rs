//! Converting between the guest TSC and the microvisor's nanosecond clock: the VMM measures
//! the TSC frequency against the Clock hypercall (no CPUID leaf 0x15/0x16 on the emulated
//! machine says it) and arms its nanosecond timer for TSC deadlines.

/// The TSC frequency in Hz from `tsc_ticks` counted over `ns` nanoseconds, rounded to a
/// multiple of 100 kHz (the measurement's jitter is larger than that); `None` if the
/// interval is empty or the result is 0.
pub fn tsc_hz(tsc_ticks: u64, ns: u64) -> Option<u64> {
    if ns == 0 {
        return None;
    }
    let hz = u128::from(tsc_ticks) * 1_000_000_000 / u128::from(ns);
    let hz = u64::try_from(hz).ok()?;
    let rounded = (hz + 50_000) / 100_000 * 100_000;
    (rounded > 0).then_some(rounded)
}

/// Nanoseconds from TSC `now` until TSC `deadline` at `hz` (0 if it has passed), rounded up
/// so the timer never fires before the deadline.
pub fn ns_until(deadline: u64, now: u64, hz: u64) -> u64 {
    if deadline <= now || hz == 0 {
        return 0;
    }
    let ns = (u128::from(deadline - now) * 1_000_000_000).div_ceil(u128::from(hz));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// TSC ticks in `ns` nanoseconds at `hz`.
pub fn ticks_in(ns: u64, hz: u64) -> u64 {
    u64::try_from(u128::from(ns) * u128::from(hz) / 1_000_000_000).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn calibration() {
        assert_eq!(tsc_hz(2_400_123_456, 1_000_000_000), Some(2_400_100_000));
        assert_eq!(tsc_hz(120_000_000, 50_000_000), Some(2_400_000_000));
        assert_eq!(tsc_hz(1, 0), None);
        assert_eq!(tsc_hz(0, 10), None);
        assert_eq!(tsc_hz(u64::MAX, 1), None);
    }

    #[test]
    fn deadlines() {
        assert_eq!(ns_until(100, 200, 1_000_000_000), 0);
        assert_eq!(ns_until(3_000, 1_000, 1_000_000_000), 2_000);
        assert_eq!(ns_until(3, 0, 2_000_000_000), 2, "rounded up");
        assert_eq!(ticks_in(1_000_000, 2_000_000_000), 2_000_000);
    }

    proptest! {
        #[test]
        fn never_early(now in any::<u64>(), d in any::<u64>(), hz in 1u64..10_000_000_000) {
            let ns = ns_until(d, now, hz);
            if d > now && ns < u64::MAX / 2 {
                prop_assert!(now.saturating_add(ticks_in(ns, hz)) >= d.saturating_sub(1));
            }
        }
    }
}

//! The KVM paravirtual clock (kvmclock) as a Linux guest uses it.
//!
//! The guest finds the KVM signature and feature bits through CPUID (see `cpuid.rs`), then
//! writes the guest-physical address of a `pvclock_vcpu_time_info` to `MSR_KVM_SYSTEM_TIME_NEW`
//! (0x4b564d01, bit 0 = enable) and of a `pvclock_wall_clock` to `MSR_KVM_WALL_CLOCK_NEW`
//! (0x4b564d00); 0x12 and 0x11 are the legacy numbers of the same MSRs. The hypervisor fills
//! the structures (Linux `Documentation/virt/kvm/x86/msr.rst`):
//!
//! ```text
//! pvclock_vcpu_time_info (32 bytes)      pvclock_wall_clock (12 bytes)
//!   0 u32 version (odd while updating)     0 u32 version
//!   8 u64 tsc_timestamp                    4 u32 sec
//!  16 u64 system_time (ns)                 8 u32 nsec
//!  24 u32 tsc_to_system_mul
//!  28 i8  tsc_shift
//!  29 u8  flags (bit 0 TSC_STABLE)
//! ```
//!
//! and the guest computes `system_time + (((tsc - tsc_timestamp) << shift) * mul) >> 32` (a
//! negative shift shifts right). With a constant, invariant TSC and TSC_STABLE set, one update
//! when the guest enables the clock is enough: the guest then never exits to read the time. The
//! TSC frequency follows from `mul`/`shift`, so Linux skips TSC calibration against the PIT.

use core::fmt;

use crate::memory::{GuestMemory, MemError};

/// `MSR_KVM_WALL_CLOCK_NEW`.
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// `MSR_KVM_SYSTEM_TIME_NEW`.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// `MSR_KVM_WALL_CLOCK` (legacy).
pub const MSR_KVM_WALL_CLOCK: u32 = 0x11;
/// `MSR_KVM_SYSTEM_TIME` (legacy).
pub const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
/// `PVCLOCK_TSC_STABLE_BIT`.
pub const PVCLOCK_TSC_STABLE: u8 = 1 << 0;
/// Size of `pvclock_vcpu_time_info`.
pub const TIME_INFO_SIZE: usize = 32;
/// Size of `pvclock_wall_clock`.
pub const WALL_CLOCK_SIZE: usize = 12;

const NSEC_PER_SEC: u64 = 1_000_000_000;

/// The scale that turns TSC ticks into nanoseconds: `ns = ((ticks << shift) * mul) >> 32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeScale {
    /// `tsc_to_system_mul`.
    pub mul: u32,
    /// `tsc_shift` (negative: shift right).
    pub shift: i8,
}

impl TimeScale {
    /// The scale for a TSC of `tsc_hz`, or `None` for 0 Hz.
    ///
    /// The frequency is scaled by a power of two into (1 GHz, 2 GHz], so that `mul` =
    /// 2^32 * 1e9 / scaled lies in [2^31, 2^32) and keeps 31 or more significant bits; this is
    /// the normalisation KVM's `kvm_get_time_scale()` arrives at, and it keeps the left shift
    /// small (a 1 MHz TSC shifts by 10) so the guest's 64-bit shift of the delta cannot
    /// overflow in practice.
    pub fn for_frequency(tsc_hz: u64) -> Option<Self> {
        if tsc_hz == 0 {
            return None;
        }
        let mut scaled = tsc_hz;
        let mut shift: i8 = 0;
        while scaled > 2 * NSEC_PER_SEC {
            scaled >>= 1;
            shift -= 1;
        }
        while scaled <= NSEC_PER_SEC {
            scaled <<= 1;
            shift += 1;
        }
        // scaled in (1e9, 2e9]: the quotient is below 2^32.
        let mul = u32::try_from((u128::from(NSEC_PER_SEC) << 32) / u128::from(scaled)).ok()?;
        Some(Self { mul, shift })
    }

    /// Nanoseconds for `ticks` TSC ticks, computed exactly as the guest does
    /// (`pvclock_scale_delta`: shift the delta, then a 64x32-bit multiply keeping bits 95:32).
    pub fn ticks_to_ns(&self, ticks: u64) -> u64 {
        let delta = if self.shift < 0 {
            ticks >> self.shift.unsigned_abs()
        } else {
            ticks.checked_shl(u32::from(self.shift.unsigned_abs())).map_or(0, |d| d)
        };
        ((u128::from(delta) * u128::from(self.mul)) >> 32) as u64
    }
}

/// Why kvmclock could not be set up; none of these fault the guest (KVM accepts the MSR write
/// and simply does not update an unusable address), the VMM may log them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmClockError {
    /// The MSR is not a kvmclock MSR.
    NotKvmClockMsr(u32),
    /// The structure's address is outside guest RAM.
    Memory(MemError),
}

impl fmt::Display for KvmClockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvmClockError::NotKvmClockMsr(m) => write!(f, "MSR {m:#x} is not a kvmclock MSR"),
            KvmClockError::Memory(e) => write!(f, "kvmclock structure not written: {e}"),
        }
    }
}

impl core::error::Error for KvmClockError {}

impl From<MemError> for KvmClockError {
    fn from(e: MemError) -> Self {
        KvmClockError::Memory(e)
    }
}

/// Whether `msr` is one of the four kvmclock MSRs.
pub fn is_kvmclock_msr(msr: u32) -> bool {
    matches!(msr, MSR_KVM_WALL_CLOCK_NEW | MSR_KVM_SYSTEM_TIME_NEW | MSR_KVM_WALL_CLOCK | MSR_KVM_SYSTEM_TIME)
}

/// kvmclock state of one vCPU.
#[derive(Clone, Debug)]
pub struct KvmClock {
    scale: TimeScale,
    /// Guest TSC at which system time is zero (VM start).
    boot_tsc: u64,
    /// Wall-clock time at VM start, seconds and nanoseconds since the Unix epoch.
    boot_wall: (u64, u32),
    system_time_msr: u64,
    wall_clock_msr: u64,
    version: u32,
}

impl KvmClock {
    /// A clock for a TSC of `tsc_hz` that reads system time 0 at guest TSC `boot_tsc`, when
    /// the wall clock read `boot_wall_sec`.`boot_wall_nsec`. `None` if `tsc_hz` is 0.
    pub fn new(tsc_hz: u64, boot_tsc: u64, boot_wall_sec: u64, boot_wall_nsec: u32) -> Option<Self> {
        Some(Self {
            scale: TimeScale::for_frequency(tsc_hz)?,
            boot_tsc,
            boot_wall: (boot_wall_sec, boot_wall_nsec % 1_000_000_000),
            system_time_msr: 0,
            wall_clock_msr: 0,
            version: 0,
        })
    }

    /// The TSC scale in use.
    pub fn scale(&self) -> TimeScale {
        self.scale
    }

    /// Guest system time (ns since VM start) at guest TSC `tsc`.
    pub fn system_time(&self, tsc: u64) -> u64 {
        self.scale.ticks_to_ns(tsc.saturating_sub(self.boot_tsc))
    }

    /// The guest-physical address of the enabled time structure, if any.
    pub fn time_info_gpa(&self) -> Option<u64> {
        (self.system_time_msr & 1 != 0).then_some(self.system_time_msr & !1)
    }

    /// RDMSR: the last value written (KVM returns the stored MSR values).
    pub fn read_msr(&self, msr: u32) -> Result<u64, KvmClockError> {
        match msr {
            MSR_KVM_SYSTEM_TIME_NEW | MSR_KVM_SYSTEM_TIME => Ok(self.system_time_msr),
            MSR_KVM_WALL_CLOCK_NEW | MSR_KVM_WALL_CLOCK => Ok(self.wall_clock_msr),
            _ => Err(KvmClockError::NotKvmClockMsr(msr)),
        }
    }

    /// WRMSR at guest TSC `now`: records the value and writes the structure into `mem`.
    /// A memory error leaves the value recorded (the guest's write succeeds, as with KVM).
    pub fn write_msr(
        &mut self,
        msr: u32,
        value: u64,
        now: u64,
        mem: &mut dyn GuestMemory,
    ) -> Result<(), KvmClockError> {
        match msr {
            MSR_KVM_SYSTEM_TIME_NEW | MSR_KVM_SYSTEM_TIME => {
                self.system_time_msr = value;
                self.update(now, mem)
            }
            MSR_KVM_WALL_CLOCK_NEW | MSR_KVM_WALL_CLOCK => {
                self.wall_clock_msr = value;
                self.write_wall_clock(value, mem)
            }
            _ => Err(KvmClockError::NotKvmClockMsr(msr)),
        }
    }

    /// Writes `pvclock_wall_clock` at `gpa`: the wall time at which system time was zero, so
    /// the guest adds its system time to get the current time.
    fn write_wall_clock(&mut self, gpa: u64, mem: &mut dyn GuestMemory) -> Result<(), KvmClockError> {
        let mut version = [0u8; 4];
        mem.read(gpa, &mut version)?;
        let v = u32::from_le_bytes(version).wrapping_add(1) | 1;
        let mut b = [0u8; WALL_CLOCK_SIZE];
        b[0..4].copy_from_slice(&v.to_le_bytes());
        // The structure holds 32-bit seconds (it wraps in 2106, as in KVM).
        b[4..8].copy_from_slice(&(self.boot_wall.0 as u32).to_le_bytes());
        b[8..12].copy_from_slice(&self.boot_wall.1.to_le_bytes());
        // Odd version while the fields change, then even (the guest retries on odd/changed).
        mem.write(gpa, &b)?;
        mem.write(gpa, &v.wrapping_add(1).to_le_bytes())?;
        Ok(())
    }

    /// (Re)writes the time structure, if enabled, for guest TSC `now`. The VMM calls this
    /// after the guest enables the clock (done by [`KvmClock::write_msr`]) and whenever the
    /// guest TSC rate or offset changes (never, with an invariant TSC).
    pub fn update(&mut self, now: u64, mem: &mut dyn GuestMemory) -> Result<(), KvmClockError> {
        let Some(gpa) = self.time_info_gpa() else { return Ok(()) };
        let odd = self.version.wrapping_add(1);
        let even = odd.wrapping_add(1);
        let mut b = [0u8; TIME_INFO_SIZE];
        b[0..4].copy_from_slice(&odd.to_le_bytes());
        b[8..16].copy_from_slice(&now.to_le_bytes());
        b[16..24].copy_from_slice(&self.system_time(now).to_le_bytes());
        b[24..28].copy_from_slice(&self.scale.mul.to_le_bytes());
        b[28] = self.scale.shift as u8;
        b[29] = PVCLOCK_TSC_STABLE;
        mem.write(gpa, &b)?;
        mem.write(gpa, &even.to_le_bytes())?;
        self.version = even;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::VecMemory;
    use proptest::prelude::*;

    /// The guest's reading of a time structure (Linux `__pvclock_read_cycles`).
    fn guest_read(mem: &VecMemory, gpa: u64, tsc: u64) -> (u32, u64, u8) {
        let mut b = [0u8; 32];
        mem.read(gpa, &mut b).unwrap();
        let version = u32::from_le_bytes(b[0..4].try_into().unwrap());
        let ts = u64::from_le_bytes(b[8..16].try_into().unwrap());
        let sys = u64::from_le_bytes(b[16..24].try_into().unwrap());
        let scale = TimeScale { mul: u32::from_le_bytes(b[24..28].try_into().unwrap()), shift: b[28] as i8 };
        (version, sys + scale.ticks_to_ns(tsc - ts), b[29])
    }

    #[test]
    fn scale_values() {
        // 1 GHz: one tick is one ns.
        assert_eq!(TimeScale::for_frequency(1_000_000_000), Some(TimeScale { mul: 1 << 31, shift: 1 }));
        // 2 GHz: half a ns per tick.
        assert_eq!(TimeScale::for_frequency(2_000_000_000), Some(TimeScale { mul: 1 << 31, shift: 0 }));
        // 2.5 GHz: scaled to 1.25 GHz, mul = 0.8 * 2^32.
        assert_eq!(TimeScale::for_frequency(2_500_000_000), Some(TimeScale { mul: 3_435_973_836, shift: -1 }));
        assert_eq!(TimeScale::for_frequency(0), None);
        let s = TimeScale::for_frequency(1).unwrap();
        assert_eq!(s.shift, 30);
        assert_eq!(s.ticks_to_ns(1), 1_000_000_000);
        let s = TimeScale::for_frequency(u64::MAX).unwrap();
        assert!(s.shift < 0);
    }

    proptest! {
        /// One second of ticks reads as one second within the scale's precision (31 bits of
        /// mul plus truncation of the scaled frequency: under 2 ppm + 2 ns).
        #[test]
        fn prop_one_second(hz in 1_000_000u64..20_000_000_000) {
            let s = TimeScale::for_frequency(hz).unwrap();
            prop_assert!(s.mul >= 1 << 31);
            let ns = s.ticks_to_ns(hz);
            let err = ns.abs_diff(1_000_000_000);
            prop_assert!(err <= 2_000 + 2, "hz {} ns {}", hz, ns);
        }

        #[test]
        fn prop_hostile_msr_writes(msr in prop_oneof![Just(0x11u32), Just(0x12), Just(0x4b564d00), Just(0x4b564d01), any::<u32>()],
                                   value in any::<u64>(), now in any::<u64>()) {
            let mut mem = VecMemory::new(0x1000, 0x1000);
            let mut c = KvmClock::new(3_000_000_000, 0, 1_700_000_000, 5).unwrap();
            let r = c.write_msr(msr, value, now, &mut mem);
            if is_kvmclock_msr(msr) {
                prop_assert_eq!(c.read_msr(msr), Ok(value));
            } else {
                prop_assert!(r.is_err());
            }
        }
    }

    #[test]
    fn system_time_structure() {
        let mut mem = VecMemory::new(0, 0x10000);
        let tsc_hz = 2_400_000_000;
        let boot_tsc = 1_000_000;
        let mut c = KvmClock::new(tsc_hz, boot_tsc, 1_700_000_000, 123).unwrap();
        assert_eq!(c.time_info_gpa(), None);
        // Disabled: nothing written.
        c.write_msr(MSR_KVM_SYSTEM_TIME_NEW, 0x3000, 5_000_000, &mut mem).unwrap();
        assert!(mem.bytes()[0x3000..0x3020].iter().all(|&b| b == 0));
        let now = boot_tsc + tsc_hz / 2;
        c.write_msr(MSR_KVM_SYSTEM_TIME_NEW, 0x3001, now, &mut mem).unwrap();
        assert_eq!(c.read_msr(MSR_KVM_SYSTEM_TIME_NEW), Ok(0x3001));
        assert_eq!(c.time_info_gpa(), Some(0x3000));
        let (version, t, flags) = guest_read(&mem, 0x3000, now);
        assert_eq!(version % 2, 0);
        assert_eq!(flags, PVCLOCK_TSC_STABLE);
        assert!(t.abs_diff(500_000_000) < 10, "{t}");
        // Three seconds later the guest computes it itself.
        let (_, t, _) = guest_read(&mem, 0x3000, now + 3 * tsc_hz);
        assert!(t.abs_diff(3_500_000_000) < 10, "{t}");
        // An update bumps the version by two.
        c.update(now, &mut mem).unwrap();
        assert_eq!(guest_read(&mem, 0x3000, now).0, version + 2);
        // Legacy MSR shares the state.
        assert_eq!(c.read_msr(MSR_KVM_SYSTEM_TIME), Ok(0x3001));
        // Out-of-RAM address: recorded, reported, no panic.
        assert!(matches!(c.write_msr(MSR_KVM_SYSTEM_TIME, 0xffff_fff1, now, &mut mem), Err(KvmClockError::Memory(_))));
        assert_eq!(c.read_msr(MSR_KVM_SYSTEM_TIME_NEW), Ok(0xffff_fff1));
        assert!(c.write_msr(MSR_KVM_SYSTEM_TIME, 0xfff1, now, &mut mem).is_err(), "straddles the end");
        assert!(c.read_msr(0x10).is_err());
        assert!(!KvmClockError::NotKvmClockMsr(1).to_string().is_empty());
    }

    #[test]
    fn wall_clock_structure() {
        let mut mem = VecMemory::new(0, 0x2000);
        let mut c = KvmClock::new(1_000_000_000, 0, 1_700_000_000, 999).unwrap();
        c.write_msr(MSR_KVM_WALL_CLOCK_NEW, 0x1800, 0, &mut mem).unwrap();
        let b = &mem.bytes()[0x1800..0x180c];
        let v = u32::from_le_bytes(b[0..4].try_into().unwrap());
        assert_eq!(v % 2, 0);
        assert_ne!(v, 0);
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 1_700_000_000);
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 999);
        assert_eq!(c.read_msr(MSR_KVM_WALL_CLOCK), Ok(0x1800));
        assert!(c.write_msr(MSR_KVM_WALL_CLOCK, 0x1ffa, 0, &mut mem).is_err());
    }
}

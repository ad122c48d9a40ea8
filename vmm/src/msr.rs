//! Which MSRs the VMM answers, and the simple ones it answers itself.
//!
//! [`route`] sorts an intercepted RDMSR/WRMSR: to the x2APIC model (`IA32_APIC_BASE`, the
//! x2APIC range, `IA32_TSC_DEADLINE`), to kvmclock, to the TSC (the platform knows the guest
//! TSC), to [`MsrState`] for MSRs with simple stored or constant values, or `None`, which the
//! VMM turns into #GP(0) (an unimplemented MSR faults on hardware too, and Linux probes most
//! optional MSRs with `rdmsr_safe`).
//!
//! MSRs that are plain vCPU state (EFER, STAR/LSTAR/CSTAR/SFMASK, FS/GS base, KERNEL_GS_BASE,
//! SYSENTER_*) are kept by the hardware in the VMCB/VMCS and must not be intercepted; they are
//! not routed here.

use core::fmt;

use crate::kvmclock::is_kvmclock_msr;
use crate::x2apic::{MSR_APIC_BASE, MSR_TSC_DEADLINE, X2APIC_MSR_FIRST, X2APIC_MSR_LAST};

/// `IA32_TIME_STAMP_COUNTER`.
pub const MSR_TSC: u32 = 0x10;
/// `IA32_FEATURE_CONTROL`.
pub const MSR_FEATURE_CONTROL: u32 = 0x3a;
/// `IA32_SPEC_CTRL`.
pub const MSR_SPEC_CTRL: u32 = 0x48;
/// `IA32_BIOS_SIGN_ID` (microcode revision).
pub const MSR_BIOS_SIGN_ID: u32 = 0x8b;
/// `MSR_PLATFORM_INFO`.
pub const MSR_PLATFORM_INFO: u32 = 0xce;
/// `IA32_MTRRCAP`.
pub const MSR_MTRRCAP: u32 = 0xfe;
/// `IA32_ARCH_CAPABILITIES`.
pub const MSR_ARCH_CAPABILITIES: u32 = 0x10a;
/// `MSR_MISC_FEATURES_ENABLES`.
pub const MSR_MISC_FEATURES_ENABLES: u32 = 0x140;
/// `IA32_MISC_ENABLE`.
pub const MSR_MISC_ENABLE: u32 = 0x1a0;
/// `IA32_DEBUGCTL`.
pub const MSR_DEBUGCTL: u32 = 0x1d9;
/// `IA32_MTRR_PHYSBASE0`; bases and masks alternate up to `IA32_MTRR_PHYSMASK7` (0x20F).
pub const MSR_MTRR_PHYSBASE0: u32 = 0x200;
/// `IA32_MTRR_FIX64K_00000`.
pub const MSR_MTRR_FIX64K: u32 = 0x250;
/// `IA32_MTRR_FIX16K_80000`.
pub const MSR_MTRR_FIX16K_80000: u32 = 0x258;
/// `IA32_MTRR_FIX16K_A0000`.
pub const MSR_MTRR_FIX16K_A0000: u32 = 0x259;
/// `IA32_MTRR_FIX4K_C0000`; the 4K ranges run to `IA32_MTRR_FIX4K_F8000` (0x26F).
pub const MSR_MTRR_FIX4K_C0000: u32 = 0x268;
/// `IA32_PAT`.
pub const MSR_PAT: u32 = 0x277;
/// `IA32_MTRR_DEF_TYPE`.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// AMD `MSR_K7_HWCR`.
pub const MSR_AMD_HWCR: u32 = 0xc001_0015;
/// AMD `MSR_AMD64_DE_CFG`.
pub const MSR_AMD_DE_CFG: u32 = 0xc001_1029;

/// Number of variable-range MTRRs offered (MTRRCAP.VCNT).
pub const MTRR_VARIABLE_COUNT: usize = 8;
/// MTRRCAP: VCNT = 8, fixed ranges supported (bit 8), write-combining (bit 10); no SMRR.
pub const MTRRCAP_VALUE: u64 = MTRR_VARIABLE_COUNT as u64 | (1 << 8) | (1 << 10);
/// MTRR_DEF_TYPE after reset: MTRRs enabled (bit 11), fixed ranges off, default type
/// write-back (6). With no variable range set, all of RAM is write-back and Linux's
/// `mtrr_trim_uncached_memory` has nothing to trim.
pub const MTRR_DEF_TYPE_RESET: u64 = (1 << 11) | 6;
/// PAT power-up value (SDM vol. 3A §13.12.4, Table 13-11): WB, WT, UC-, UC repeated.
pub const PAT_RESET: u64 = 0x0007_0406_0007_0406;
/// MISC_ENABLE as offered: fast strings (bit 0), BTS unavailable (11), PEBS unavailable (12).
pub const MISC_ENABLE_RESET: u64 = 1 | (1 << 11) | (1 << 12);
/// HWCR as offered: TscFreqSel (bit 24), the TSC counts at the P0 frequency (Linux warns
/// otherwise).
pub const HWCR_RESET: u64 = 1 << 24;
/// DE_CFG as offered: LFENCE is dispatch-serialising (bit 1), so Linux need not set it.
pub const DE_CFG_RESET: u64 = 1 << 1;
/// Microcode revision reported in BIOS_SIGN_ID bits 63:32.
pub const MICROCODE_REVISION: u64 = 1 << 32;

/// Which model answers an MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrRoute {
    /// `IA32_APIC_BASE`, 0x800-0x8FF, `IA32_TSC_DEADLINE`: the x2APIC model.
    Apic,
    /// The kvmclock MSRs.
    KvmClock,
    /// `IA32_TIME_STAMP_COUNTER`: reads return the guest TSC; writes are refused.
    Tsc,
    /// [`MsrState`].
    Local,
}

/// Routes `msr`; `None` means the VMM injects #GP(0).
pub fn route(msr: u32) -> Option<MsrRoute> {
    match msr {
        MSR_APIC_BASE | MSR_TSC_DEADLINE | X2APIC_MSR_FIRST..=X2APIC_MSR_LAST => Some(MsrRoute::Apic),
        m if is_kvmclock_msr(m) => Some(MsrRoute::KvmClock),
        MSR_TSC => Some(MsrRoute::Tsc),
        m if MsrState::handles(m) => Some(MsrRoute::Local),
        _ => None,
    }
}

/// A local MSR access that must fault (#GP(0)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrFault {
    /// Not an MSR [`MsrState`] handles.
    Unknown {
        /// The MSR.
        msr: u32,
    },
    /// A write to a read-only MSR.
    ReadOnly {
        /// The MSR.
        msr: u32,
    },
    /// A write with reserved bits set or an undefined memory type.
    BadValue {
        /// The MSR.
        msr: u32,
        /// The value written.
        value: u64,
    },
}

impl fmt::Display for MsrFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            MsrFault::Unknown { msr } => write!(f, "MSR {msr:#x} is not emulated"),
            MsrFault::ReadOnly { msr } => write!(f, "MSR {msr:#x} is read-only"),
            MsrFault::BadValue { msr, value } => write!(f, "MSR {msr:#x}: value {value:#x} is invalid"),
        }
    }
}

impl core::error::Error for MsrFault {}

/// Memory types valid in MTRRs (SDM vol. 3A §13.11.4 Table 13-8: UC 0, WC 1, WT 4, WP 5, WB 6).
fn valid_mtrr_type(t: u8) -> bool {
    matches!(t, 0 | 1 | 4 | 5 | 6)
}

/// Memory types valid in PAT entries (§13.12.2 Table 13-10: also UC- 7); "an attempt to write
/// an undefined memory type encoding into the PAT causes a #GP".
fn valid_pat_type(t: u8) -> bool {
    matches!(t, 0 | 1 | 4 | 5 | 6 | 7)
}

/// The physical address bits a variable MTRR base/mask may use (bits 51:12).
const MTRR_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Stored MSR values of one vCPU.
#[derive(Clone, Debug)]
pub struct MsrState {
    pat: u64,
    mtrr_def_type: u64,
    mtrr_fixed: [u64; 11],
    mtrr_var: [u64; 2 * MTRR_VARIABLE_COUNT],
    misc_enable: u64,
    hwcr: u64,
    de_cfg: u64,
}

impl Default for MsrState {
    fn default() -> Self {
        Self::new()
    }
}

/// Index into the fixed-range MTRR array.
fn fixed_index(msr: u32) -> Option<usize> {
    match msr {
        MSR_MTRR_FIX64K => Some(0),
        MSR_MTRR_FIX16K_80000 => Some(1),
        MSR_MTRR_FIX16K_A0000 => Some(2),
        0x268..=0x26f => Some(3 + (msr - MSR_MTRR_FIX4K_C0000) as usize),
        _ => None,
    }
}

impl MsrState {
    /// Power-up values.
    pub fn new() -> Self {
        Self {
            pat: PAT_RESET,
            mtrr_def_type: MTRR_DEF_TYPE_RESET,
            // Fixed ranges (unused while MTRR_DEF_TYPE.FE is clear) read as write-back.
            mtrr_fixed: [0x0606_0606_0606_0606; 11],
            mtrr_var: [0; 2 * MTRR_VARIABLE_COUNT],
            misc_enable: MISC_ENABLE_RESET,
            hwcr: HWCR_RESET,
            de_cfg: DE_CFG_RESET,
        }
    }

    /// Whether `msr` is one this state answers.
    pub fn handles(msr: u32) -> bool {
        matches!(
            msr,
            MSR_FEATURE_CONTROL
                | MSR_SPEC_CTRL
                | MSR_BIOS_SIGN_ID
                | MSR_PLATFORM_INFO
                | MSR_MTRRCAP
                | MSR_ARCH_CAPABILITIES
                | MSR_MISC_FEATURES_ENABLES
                | MSR_MISC_ENABLE
                | MSR_DEBUGCTL
                | MSR_PAT
                | MSR_MTRR_DEF_TYPE
                | MSR_AMD_HWCR
                | MSR_AMD_DE_CFG
                | 0x200..=0x20f
        ) || fixed_index(msr).is_some()
    }

    /// RDMSR.
    pub fn read(&self, msr: u32) -> Result<u64, MsrFault> {
        Ok(match msr {
            // Locked with VMX off (bit 0 lock, bits 1-2 VMX enables clear): Linux's
            // `init_ia32_feat_ctl` then leaves it alone and clears VMX.
            MSR_FEATURE_CONTROL => 1,
            // The speculation-control features are not advertised; reads see "nothing set".
            MSR_SPEC_CTRL | MSR_ARCH_CAPABILITIES => 0,
            MSR_BIOS_SIGN_ID => MICROCODE_REVISION,
            // No turbo ratios, no CPUID faulting (bit 32).
            MSR_PLATFORM_INFO => 0,
            MSR_MTRRCAP => MTRRCAP_VALUE,
            MSR_MISC_FEATURES_ENABLES | MSR_DEBUGCTL => 0,
            MSR_MISC_ENABLE => self.misc_enable,
            MSR_PAT => self.pat,
            MSR_MTRR_DEF_TYPE => self.mtrr_def_type,
            MSR_AMD_HWCR => self.hwcr,
            MSR_AMD_DE_CFG => self.de_cfg,
            0x200..=0x20f => self.mtrr_var[(msr - MSR_MTRR_PHYSBASE0) as usize],
            _ => match fixed_index(msr) {
                Some(i) => self.mtrr_fixed[i],
                None => return Err(MsrFault::Unknown { msr }),
            },
        })
    }

    /// WRMSR.
    pub fn write(&mut self, msr: u32, value: u64) -> Result<(), MsrFault> {
        let bad = MsrFault::BadValue { msr, value };
        match msr {
            // Locked: writes fault (SDM vol. 4, IA32_FEATURE_CONTROL: "once the lock bit is
            // set, WRMSR to this MSR causes #GP").
            MSR_FEATURE_CONTROL | MSR_MTRRCAP | MSR_PLATFORM_INFO | MSR_ARCH_CAPABILITIES => {
                return Err(MsrFault::ReadOnly { msr })
            }
            // Zero writes only: the features behind non-zero values are not offered.
            MSR_SPEC_CTRL | MSR_MISC_FEATURES_ENABLES | MSR_DEBUGCTL => {
                if value != 0 {
                    return Err(bad);
                }
            }
            // Linux writes 0 before reading the microcode revision; the write is a trigger.
            MSR_BIOS_SIGN_ID => {}
            MSR_MISC_ENABLE => self.misc_enable = value,
            MSR_PAT => {
                if !value.to_le_bytes().iter().all(|&t| valid_pat_type(t)) {
                    return Err(bad);
                }
                self.pat = value;
            }
            MSR_MTRR_DEF_TYPE => {
                // Bits 7:0 type, 10 FE, 11 E; the rest reserved.
                if value & !0xcff != 0 || !valid_mtrr_type(value as u8) {
                    return Err(bad);
                }
                self.mtrr_def_type = value;
            }
            // Stored as written: Linux sets documented bits with read-modify-write.
            MSR_AMD_HWCR => self.hwcr = value,
            MSR_AMD_DE_CFG => self.de_cfg = value,
            0x200..=0x20f => {
                let is_base = msr.is_multiple_of(2);
                let ok = if is_base {
                    value & !(MTRR_ADDR_MASK | 0xff) == 0 && valid_mtrr_type(value as u8)
                } else {
                    value & !(MTRR_ADDR_MASK | (1 << 11)) == 0
                };
                if !ok {
                    return Err(bad);
                }
                self.mtrr_var[(msr - MSR_MTRR_PHYSBASE0) as usize] = value;
            }
            _ => match fixed_index(msr) {
                Some(i) => {
                    if !value.to_le_bytes().iter().all(|&t| valid_mtrr_type(t)) {
                        return Err(bad);
                    }
                    self.mtrr_fixed[i] = value;
                }
                None => return Err(MsrFault::Unknown { msr }),
            },
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn routes() {
        assert_eq!(route(0x1b), Some(MsrRoute::Apic));
        assert_eq!(route(0x800), Some(MsrRoute::Apic));
        assert_eq!(route(0x8ff), Some(MsrRoute::Apic));
        assert_eq!(route(0x6e0), Some(MsrRoute::Apic));
        for m in [0x11, 0x12, 0x4b56_4d00, 0x4b56_4d01] {
            assert_eq!(route(m), Some(MsrRoute::KvmClock));
        }
        assert_eq!(route(0x10), Some(MsrRoute::Tsc));
        for m in [0xfe, 0x2ff, 0x200, 0x20f, 0x250, 0x258, 0x259, 0x268, 0x26f, 0x277, 0x1a0, 0x48, 0x10a, 0x3a] {
            assert_eq!(route(m), Some(MsrRoute::Local), "{m:#x}");
        }
        // Not emulated: machine check, perf, SMRR, TSC_AUX, AMD LS_CFG, PV EOI, EFER.
        for m in [0x179, 0x17a, 0x186, 0xc1, 0x1f2, 0x49, 0xc000_0103, 0xc001_1020, 0x4b56_4d04, 0x210, 0x26e + 2] {
            assert_eq!(route(m), None, "{m:#x}");
        }
        assert_eq!(route(0xc000_0080), None, "EFER is hardware state, never routed");
    }

    #[test]
    fn mtrr_defaults_and_checks() {
        let mut s = MsrState::new();
        assert_eq!(s.read(MSR_MTRRCAP), Ok(0x508));
        assert_eq!(s.read(MSR_MTRR_DEF_TYPE), Ok(0x806));
        assert_eq!(s.write(MSR_MTRRCAP, 0), Err(MsrFault::ReadOnly { msr: MSR_MTRRCAP }));
        s.write(MSR_MTRR_DEF_TYPE, 0x800).unwrap();
        assert_eq!(s.read(MSR_MTRR_DEF_TYPE), Ok(0x800));
        assert!(s.write(MSR_MTRR_DEF_TYPE, 0x802).is_err(), "type 2 undefined");
        assert!(s.write(MSR_MTRR_DEF_TYPE, 0x1000).is_err(), "reserved bit");
        s.write(0x200, 0xc000_0000).unwrap();
        s.write(0x201, 0xf_c000_0800).unwrap();
        assert_eq!(s.read(0x201), Ok(0xf_c000_0800));
        assert!(s.write(0x200, 0x3).is_err());
        assert!(s.write(0x201, 0x400).is_err());
        assert!(s.write(0x201, 1 << 60).is_err());
        assert_eq!(s.read(0x268), Ok(0x0606_0606_0606_0606));
        s.write(0x26f, 0x0505_0404_0101_0000).unwrap();
        assert!(s.write(0x26f, 0x0200).is_err());
        assert_eq!(s.read(0x26f), Ok(0x0505_0404_0101_0000));
    }

    #[test]
    fn pat_and_misc() {
        let mut s = MsrState::new();
        assert_eq!(s.read(MSR_PAT), Ok(0x0007_0406_0007_0406));
        // Linux's PAT: WB, WC, UC-, UC, WB, WP, UC-, WT.
        s.write(MSR_PAT, 0x0407_0501_0007_0106).unwrap();
        assert_eq!(s.read(MSR_PAT), Ok(0x0407_0501_0007_0106));
        assert!(s.write(MSR_PAT, 0x02).is_err());
        assert!(s.write(MSR_PAT, 0x0800_0000_0000_0000).is_err());
        assert_eq!(s.read(MSR_FEATURE_CONTROL), Ok(1));
        assert!(s.write(MSR_FEATURE_CONTROL, 5).is_err());
        assert_eq!(s.read(MSR_SPEC_CTRL), Ok(0));
        assert_eq!(s.write(MSR_SPEC_CTRL, 0), Ok(()));
        assert!(s.write(MSR_SPEC_CTRL, 1).is_err());
        assert_eq!(s.read(MSR_ARCH_CAPABILITIES), Ok(0));
        s.write(MSR_BIOS_SIGN_ID, 0).unwrap();
        assert_eq!(s.read(MSR_BIOS_SIGN_ID), Ok(1 << 32));
        assert_eq!(s.read(MSR_MISC_ENABLE), Ok(0x1801));
        s.write(MSR_MISC_ENABLE, 0x1).unwrap();
        assert_eq!(s.read(MSR_MISC_ENABLE), Ok(0x1));
        assert_eq!(s.read(MSR_AMD_HWCR), Ok(1 << 24));
        assert_eq!(s.read(MSR_AMD_DE_CFG), Ok(2));
        assert_eq!(s.read(0x179), Err(MsrFault::Unknown { msr: 0x179 }));
        assert_eq!(s.write(0x179, 0), Err(MsrFault::Unknown { msr: 0x179 }));
        for e in [MsrFault::Unknown { msr: 1 }, MsrFault::ReadOnly { msr: 1 }, MsrFault::BadValue { msr: 1, value: 2 }]
        {
            assert!(!e.to_string().is_empty());
        }
    }

    proptest! {
        /// Hostile writes either fault or stick; nothing panics, and `handles` agrees with
        /// what `read` answers.
        #[test]
        fn prop_hostile(msr in prop_oneof![0u32..0x300, 0xc001_0000u32..0xc001_1100, any::<u32>()], value in any::<u64>()) {
            let mut s = MsrState::new();
            prop_assert_eq!(s.read(msr).is_ok(), MsrState::handles(msr));
            if s.write(msr, value).is_ok() && !matches!(msr, MSR_SPEC_CTRL | MSR_BIOS_SIGN_ID | MSR_MISC_FEATURES_ENABLES | MSR_DEBUGCTL) {
                prop_assert_eq!(s.read(msr), Ok(value));
            }
        }
    }
}

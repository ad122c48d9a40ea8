//! The CPUID a Linux VM sees: the host's identity and instruction-set features, minus what the
//! VMM does not virtualise, plus a KVM signature and the features that keep Linux's exits few.
//!
//! Every leaf is built from an allowlist: a host bit reaches the guest only if it is named
//! here, so a newer host CPU cannot leak a feature whose state or MSRs the VMM does not handle.
//! Decisions (bit numbers from the Intel SDM vol. 2A, CPUID; AMD APM vol. 3, appendix E):
//! - leaf 1 ECX: hypervisor (31), x2APIC (21) and TSC-deadline (24) forced on; VMX (5), SMX
//!   (6), MONITOR (3), PCID (17), XSAVE (26), OSXSAVE (27), AVX (28), F16C (29), FMA (12), and
//!   the thermal/debug-store bits off. No XSAVE means Linux never executes XSETBV and keeps
//!   only x87/SSE state.
//! - leaf 1 EDX: MCE/MCA off (no machine-check MSR banks), HTT off, ACPI/TM/DS/PBE off.
//! - leaf 1 EBX: one logical processor, initial APIC ID 0; leaf 0xB/0x1F: one thread, one core.
//! - leaf 6: only ARAT (EAX bit 2), so the LAPIC timer keeps running in C-states and Linux
//!   needs no broadcast clock event (HPET/PIT).
//! - leaf 7: no INVPCID, TSX, AVX2/AVX-512, PT, PKU, RDPID, LA57, no speculation-control MSRs
//!   (SPEC_CTRL, PRED_CMD, ARCH_CAPABILITIES, FLUSH_CMD would be MSR exits on every context
//!   switch).
//! - leaf 0xA (perfmon), 0xD (XSAVE), 5 (MONITOR), 0x12, 0x14, 0x15, 0x16 and others: zero.
//! - 0x40000000: "KVMKVMKVM\0\0\0", max 0x40000001; 0x40000001 EAX: CLOCKSOURCE (0),
//!   NOP_IO_DELAY (1), CLOCKSOURCE2 (3), CLOCKSOURCE_STABLE_BIT (24) (Linux
//!   `Documentation/virt/kvm/x86/cpuid.rst`). Linux's KVM guest code also lets x2APIC be used
//!   without interrupt remapping only under a recognised hypervisor.
//! - 0x80000001: SVM (ECX 2), CmpLegacy (1), ExtApicSpace (3), topology extensions (22),
//!   perf counters, MWAITX, XOP/FMA4 (need AVX state), RDTSCP (EDX 27, needs the TSC_AUX MSR)
//!   off.
//! - 0x80000007 EDX: invariant TSC (bit 8) only. 0x80000008: address sizes kept, one core
//!   (ECX = 0), no AMD speculation-control bits (EBX = 0).
//! - The extended range is capped at 0x80000008 (no SEV, no 0x8000001E topology, no SVM leaf).

/// One CPUID result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidResult {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// The CPUID of the machine the VMM runs on.
pub trait HostCpuid {
    /// CPUID with EAX = `leaf`, ECX = `subleaf`.
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult;
}

impl<F: Fn(u32, u32) -> CpuidResult> HostCpuid for F {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
        self(leaf, subleaf)
    }
}

/// The hypervisor signature "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
pub const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// KVM feature bits in CPUID 0x40000001 EAX.
pub mod kvm_features {
    /// `KVM_FEATURE_CLOCKSOURCE`: MSRs 0x11/0x12.
    pub const CLOCKSOURCE: u32 = 1 << 0;
    /// `KVM_FEATURE_NOP_IO_DELAY`: no port 0x80 writes for I/O delays.
    pub const NOP_IO_DELAY: u32 = 1 << 1;
    /// `KVM_FEATURE_CLOCKSOURCE2`: MSRs 0x4b564d00/01.
    pub const CLOCKSOURCE2: u32 = 1 << 3;
    /// `KVM_FEATURE_CLOCKSOURCE_STABLE_BIT`: the guest may trust `PVCLOCK_TSC_STABLE`.
    pub const CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;
}

const fn bits(list: &[u32]) -> u32 {
    let mut v = 0;
    let mut i = 0;
    while i < list.len() {
        v |= 1 << list[i];
        i += 1;
    }
    v
}

/// Leaf 1 ECX bits passed from the host: SSE3, PCLMULQDQ, SSSE3, CX16, SSE4.1, SSE4.2, MOVBE,
/// POPCNT, AES, RDRAND.
pub const LEAF1_ECX_ALLOW: u32 = bits(&[0, 1, 9, 13, 19, 20, 22, 23, 25, 30]);
/// Leaf 1 ECX bits forced on: x2APIC, TSC-deadline, hypervisor.
pub const LEAF1_ECX_FORCE: u32 = bits(&[21, 24, 31]);
/// Leaf 1 EDX bits passed from the host: FPU, VME, DE, PSE, TSC, MSR, PAE, CX8, APIC, SEP,
/// MTRR, PGE, CMOV, PAT, PSE36, CLFSH, MMX, FXSR, SSE, SSE2.
pub const LEAF1_EDX_ALLOW: u32 = bits(&[0, 1, 2, 3, 4, 5, 6, 8, 9, 11, 12, 13, 15, 16, 17, 19, 23, 24, 25, 26]);
/// Leaf 1 EDX bits forced on: TSC, MSR, APIC (the VMM emulates them regardless of the host).
pub const LEAF1_EDX_FORCE: u32 = bits(&[4, 5, 9]);
/// Leaf 7.0 EBX bits passed: FSGSBASE, BMI1, FDP_EXCPTN_ONLY, SMEP, BMI2, ERMS, FPU CS/DS
/// deprecation, RDSEED, ADX, SMAP, CLFLUSHOPT, CLWB, SHA.
pub const LEAF7_EBX_ALLOW: u32 = bits(&[0, 3, 6, 7, 8, 9, 13, 18, 19, 20, 23, 24, 29]);
/// Leaf 7.0 EDX bits passed: FSRM, MD_CLEAR (VERW; no MSR).
pub const LEAF7_EDX_ALLOW: u32 = bits(&[4, 10]);
/// Leaf 0x80000001 ECX bits passed: LAHF/SAHF, ABM/LZCNT, SSE4A, misaligned SSE,
/// 3DNowPrefetch.
pub const EXT1_ECX_ALLOW: u32 = bits(&[0, 5, 6, 7, 8]);
/// Leaf 0x80000001 EDX bits passed: SYSCALL, NX, MMXEXT, FFXSR, 1 GiB pages, long mode, and
/// AMD's copies of the leaf 1 EDX bits kept above.
pub const EXT1_EDX_ALLOW: u32 = bits(&[11, 20, 22, 25, 26, 29])
    | (LEAF1_EDX_ALLOW & bits(&[0, 1, 2, 3, 4, 5, 6, 8, 9, 12, 13, 15, 16, 17, 23, 24]));

/// Highest basic leaf offered.
pub const MAX_BASIC_LEAF: u32 = 0x1f;
/// Highest extended leaf offered.
pub const MAX_EXTENDED_LEAF: u32 = 0x8000_0008;
/// Highest hypervisor leaf offered.
pub const MAX_HYPERVISOR_LEAF: u32 = 0x4000_0001;

/// CPUID policy for one single-vCPU Linux VM.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuidPolicy;

impl CpuidPolicy {
    /// The guest's CPUID for (`leaf`, `subleaf`), derived from `host`.
    pub fn query(&self, host: &dyn HostCpuid, leaf: u32, subleaf: u32) -> CpuidResult {
        let zero = CpuidResult::default();
        match leaf {
            0 => {
                let h = host.cpuid(0, 0);
                // Leaves 0xB and 0x1F are synthesised, so the range reaches 0x1F even on hosts
                // that stop lower; it is capped so future leaves stay hidden.
                CpuidResult { eax: MAX_BASIC_LEAF, ..h }
            }
            1 => {
                let h = host.cpuid(1, 0);
                CpuidResult {
                    eax: h.eax,
                    // Brand index 7:0 and CLFLUSH size 15:8 kept; one logical processor
                    // (23:16), initial APIC ID 0 (31:24).
                    ebx: (h.ebx & 0xffff) | (1 << 16),
                    ecx: (h.ecx & LEAF1_ECX_ALLOW) | LEAF1_ECX_FORCE,
                    edx: (h.edx & LEAF1_EDX_ALLOW) | LEAF1_EDX_FORCE,
                }
            }
            2 => host.cpuid(2, 0),
            4 => {
                let h = host.cpuid(4, subleaf);
                // EAX 31:26 cores per package - 1 and 25:14 threads sharing the cache - 1 are
                // zero: one core, one thread.
                CpuidResult { eax: h.eax & 0x3fff, ..h }
            }
            6 => CpuidResult { eax: 1 << 2, ..zero },
            7 if subleaf == 0 => {
                let h = host.cpuid(7, 0);
                // EAX = 0: no subleaf 1 (AVX-VNNI and friends).
                CpuidResult { eax: 0, ebx: h.ebx & LEAF7_EBX_ALLOW, ecx: 0, edx: h.edx & LEAF7_EDX_ALLOW }
            }
            0xb | 0x1f => topology(subleaf),
            MAX_BASIC_LEAF.. if leaf < 0x4000_0000 => zero,
            0x4000_0000 => CpuidResult {
                eax: MAX_HYPERVISOR_LEAF,
                ebx: KVM_SIGNATURE[0],
                ecx: KVM_SIGNATURE[1],
                edx: KVM_SIGNATURE[2],
            },
            0x4000_0001 => CpuidResult {
                eax: kvm_features::CLOCKSOURCE
                    | kvm_features::NOP_IO_DELAY
                    | kvm_features::CLOCKSOURCE2
                    | kvm_features::CLOCKSOURCE_STABLE_BIT,
                ..zero
            },
            0x8000_0000 => {
                let h = host.cpuid(0x8000_0000, 0);
                let max = if h.eax >= 0x8000_0000 { h.eax.min(MAX_EXTENDED_LEAF) } else { MAX_EXTENDED_LEAF };
                CpuidResult { eax: max, ..h }
            }
            0x8000_0001 => {
                let h = host.cpuid(0x8000_0001, 0);
                CpuidResult { eax: h.eax, ebx: h.ebx, ecx: h.ecx & EXT1_ECX_ALLOW, edx: h.edx & EXT1_EDX_ALLOW }
            }
            0x8000_0002..=0x8000_0006 => host.cpuid(leaf, 0),
            0x8000_0007 => CpuidResult { edx: 1 << 8, ..zero },
            0x8000_0008 => {
                let h = host.cpuid(0x8000_0008, 0);
                // EAX 7:0 physical, 15:8 linear address bits; 23:16 guest physical bits.
                CpuidResult { eax: h.eax & 0x00ff_ffff, ..zero }
            }
            _ => zero,
        }
    }
}

/// Leaf 0xB / 0x1F for one thread on one core (SDM vol. 2A, CPUID leaf 0BH): level 0 is SMT
/// (type 1) with one logical processor, level 1 is core (type 2) with one; higher levels are
/// invalid (type 0). EAX (shift to the next level's ID) is 0 because all IDs are 0; EDX is the
/// x2APIC ID.
fn topology(subleaf: u32) -> CpuidResult {
    let level = subleaf & 0xff;
    match level {
        0 => CpuidResult { eax: 0, ebx: 1, ecx: (1 << 8) | level, edx: 0 },
        1 => CpuidResult { eax: 0, ebx: 1, ecx: (2 << 8) | level, edx: 0 },
        _ => CpuidResult { eax: 0, ebx: 0, ecx: level, edx: 0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all_ones(_: u32, _: u32) -> CpuidResult {
        CpuidResult { eax: !0, ebx: !0, ecx: !0, edx: !0 }
    }

    fn all_zero(_: u32, _: u32) -> CpuidResult {
        CpuidResult::default()
    }

    fn q(host: &dyn HostCpuid, leaf: u32, sub: u32) -> CpuidResult {
        CpuidPolicy.query(host, leaf, sub)
    }

    fn bit(v: u32, b: u32) -> bool {
        v & (1 << b) != 0
    }

    #[test]
    fn leaf0_and_vendor() {
        let host = |leaf: u32, _| match leaf {
            0 => CpuidResult { eax: 0xd, ebx: 0x6874_7541, ecx: 0x444d_4163, edx: 0x6974_6e65 },
            _ => CpuidResult::default(),
        };
        let r = q(&host, 0, 0);
        assert_eq!(r, CpuidResult { eax: 0x1f, ebx: 0x6874_7541, ecx: 0x444d_4163, edx: 0x6974_6e65 });
        assert_eq!(q(&all_ones, 0, 0).eax, 0x1f);
    }

    #[test]
    fn leaf1_every_bit() {
        let r = q(&all_ones, 1, 0);
        assert_eq!(r.eax, !0, "signature passed through");
        assert_eq!(r.ebx, 0x0001_ffff, "1 logical CPU, APIC ID 0");
        // ECX, every bit.
        let ecx_on = [0, 1, 9, 13, 19, 20, 21, 22, 23, 24, 25, 30, 31];
        for b in 0..32 {
            assert_eq!(bit(r.ecx, b), ecx_on.contains(&b), "leaf 1 ECX bit {b}");
        }
        // The ones the brief names explicitly.
        for (b, name) in [(3, "MONITOR"), (5, "VMX"), (17, "PCID"), (26, "XSAVE"), (27, "OSXSAVE"), (28, "AVX")] {
            assert!(!bit(r.ecx, b), "{name} hidden");
        }
        for (b, name) in [(21, "x2APIC"), (24, "TSC-deadline"), (31, "hypervisor")] {
            assert!(bit(r.ecx, b), "{name} on");
        }
        let edx_on = [0, 1, 2, 3, 4, 5, 6, 8, 9, 11, 12, 13, 15, 16, 17, 19, 23, 24, 25, 26];
        for b in 0..32 {
            assert_eq!(bit(r.edx, b), edx_on.contains(&b), "leaf 1 EDX bit {b}");
        }
        // Forced bits even on an empty host.
        let z = q(&all_zero, 1, 0);
        assert_eq!(z.ecx, (1 << 21) | (1 << 24) | (1 << 31));
        assert_eq!(z.edx, (1 << 4) | (1 << 5) | (1 << 9));
        assert_eq!(z.ebx, 1 << 16);
    }

    #[test]
    fn thermal_perf_xsave_leaves() {
        assert_eq!(q(&all_ones, 6, 0), CpuidResult { eax: 4, ebx: 0, ecx: 0, edx: 0 }, "only ARAT");
        assert_eq!(q(&all_ones, 0xa, 0), CpuidResult::default(), "no perfmon");
        assert_eq!(q(&all_ones, 5, 0), CpuidResult::default(), "no MONITOR leaf");
        for sub in 0..4 {
            assert_eq!(q(&all_ones, 0xd, sub), CpuidResult::default(), "no XSAVE leaf");
        }
        for leaf in [3, 8, 9, 0xc, 0xe, 0xf, 0x10, 0x12, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1e, 0x20, 0x24] {
            assert_eq!(q(&all_ones, leaf, 0), CpuidResult::default(), "leaf {leaf:#x}");
        }
        assert_eq!(q(&all_ones, 2, 0), all_ones(2, 0), "cache descriptors");
        let l4 = q(&all_ones, 4, 1);
        assert_eq!(l4.eax, 0x3fff);
        assert_eq!((l4.ebx, l4.ecx, l4.edx), (!0, !0, !0));
    }

    #[test]
    fn leaf7_every_bit() {
        let r = q(&all_ones, 7, 0);
        assert_eq!(r.eax, 0);
        assert_eq!(r.ecx, 0);
        let ebx_on = [0, 3, 6, 7, 8, 9, 13, 18, 19, 20, 23, 24, 29];
        for b in 0..32 {
            assert_eq!(bit(r.ebx, b), ebx_on.contains(&b), "leaf 7 EBX bit {b}");
        }
        assert!(!bit(r.ebx, 10), "INVPCID hidden");
        assert!(!bit(r.ebx, 5), "AVX2 hidden");
        assert_eq!(r.edx, (1 << 4) | (1 << 10));
        assert_eq!(q(&all_ones, 7, 1), CpuidResult::default());
    }

    #[test]
    fn topology_leaves() {
        for leaf in [0xb, 0x1f] {
            assert_eq!(q(&all_ones, leaf, 0), CpuidResult { eax: 0, ebx: 1, ecx: 0x100, edx: 0 });
            assert_eq!(q(&all_ones, leaf, 1), CpuidResult { eax: 0, ebx: 1, ecx: 0x201, edx: 0 });
            assert_eq!(q(&all_ones, leaf, 2), CpuidResult { eax: 0, ebx: 0, ecx: 2, edx: 0 });
            assert_eq!(q(&all_ones, leaf, 0x1234_5605).ecx, 5);
        }
    }

    #[test]
    fn kvm_leaves() {
        let r = q(&all_ones, 0x4000_0000, 0);
        assert_eq!(r.eax, 0x4000_0001);
        let mut sig = [0u8; 12];
        sig[0..4].copy_from_slice(&r.ebx.to_le_bytes());
        sig[4..8].copy_from_slice(&r.ecx.to_le_bytes());
        sig[8..12].copy_from_slice(&r.edx.to_le_bytes());
        assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
        let f = q(&all_ones, 0x4000_0001, 0);
        assert_eq!(f, CpuidResult { eax: 0x0100_000b, ebx: 0, ecx: 0, edx: 0 });
        assert!(bit(f.eax, 3) && bit(f.eax, 24), "clocksource2 and stable bit");
        for leaf in [0x4000_0002, 0x4000_0010, 0x4000_0100, 0x4fff_ffff] {
            assert_eq!(q(&all_ones, leaf, 0), CpuidResult::default(), "{leaf:#x}");
        }
    }

    #[test]
    fn extended_leaves() {
        assert_eq!(q(&all_ones, 0x8000_0000, 0).eax, 0x8000_0008);
        let host = |leaf: u32, _| match leaf {
            0x8000_0000 => CpuidResult { eax: 0x8000_0004, ..Default::default() },
            _ => CpuidResult::default(),
        };
        assert_eq!(q(&host, 0x8000_0000, 0).eax, 0x8000_0004, "host's lower max kept");
        assert_eq!(q(&all_zero, 0x8000_0000, 0).eax, 0x8000_0008, "nonsense max replaced");
        let r = q(&all_ones, 0x8000_0001, 0);
        let ecx_on = [0, 5, 6, 7, 8];
        for b in 0..32 {
            assert_eq!(bit(r.ecx, b), ecx_on.contains(&b), "0x80000001 ECX bit {b}");
        }
        assert!(!bit(r.ecx, 2), "SVM hidden");
        let edx_on = [0, 1, 2, 3, 4, 5, 6, 8, 9, 11, 12, 13, 15, 16, 17, 20, 22, 23, 24, 25, 26, 29];
        for b in 0..32 {
            assert_eq!(bit(r.edx, b), edx_on.contains(&b), "0x80000001 EDX bit {b}");
        }
        assert!(!bit(r.edx, 27), "RDTSCP hidden");
        assert_eq!(q(&all_ones, 0x8000_0007, 0), CpuidResult { eax: 0, ebx: 0, ecx: 0, edx: 1 << 8 });
        assert_eq!(q(&all_ones, 0x8000_0008, 0), CpuidResult { eax: 0x00ff_ffff, ebx: 0, ecx: 0, edx: 0 });
        assert_eq!(q(&all_ones, 0x8000_0003, 0), all_ones(0, 0), "brand string");
        for leaf in [0x8000_0009, 0x8000_000a, 0x8000_001e, 0x8000_001f, 0xc000_0000, u32::MAX] {
            assert_eq!(q(&all_ones, leaf, 0), CpuidResult::default(), "{leaf:#x}");
        }
    }

    proptest! {
        /// Whatever the host says, the guest never sees the hidden features or a second CPU.
        #[test]
        fn prop_hidden_whatever_the_host(leaf in any::<u32>(), sub in any::<u32>(), seed in any::<[u32; 4]>()) {
            let host = move |l: u32, s: u32| CpuidResult {
                eax: seed[0] ^ l, ebx: seed[1] ^ s, ecx: seed[2].rotate_left(l % 32), edx: seed[3],
            };
            let r = CpuidPolicy.query(&host, leaf, sub);
            match leaf {
                1 => {
                    prop_assert_eq!(r.ecx & ((1 << 5) | (1 << 3) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 17)), 0);
                    prop_assert_eq!(r.ebx >> 16, 1);
                }
                0x8000_0001 => prop_assert_eq!(r.ecx & (1 << 2), 0),
                0xa | 0xd | 5 => prop_assert_eq!(r, CpuidResult::default()),
                _ => {}
            }
        }
    }
}

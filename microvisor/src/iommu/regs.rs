//! VT-d remapping unit registers: offsets, command and status bits, capability decoders.
//!
//! Offsets are from the unit's register base (the DRHD's `register_base`, 0xFED90000 on QEMU).
//! 32-bit registers must be accessed with 32-bit loads and stores, 64-bit ones with 64-bit
//! accesses (or two 32-bit halves, low first); QEMU rejects 1- and 2-byte accesses.
//!
//! Two register blocks have no fixed offset: the IOTLB registers are at `ECAP.IRO * 16`
//! (register-based invalidation, unused: see `invalidation`) and the fault recording registers at `CAP.FRO * 16`
//! ([`VtdCap::fault_record`]); on QEMU 7.2 they are at 0xF0 and 0x220.

use bitflags::bitflags;

/// VtdCap (64-bit, RO): see [`VtdCap`].
pub const CAP: u64 = 0x08;
/// Extended capability (64-bit, RO): see [`VtdExtCap`].
pub const ECAP: u64 = 0x10;
/// Global command (32-bit, WO): see [`GlobalCommand`] and [`gcmd_value`].
pub const GCMD: u64 = 0x18;
/// Global status (32-bit, RO): see [`GlobalStatus`].
pub const GSTS: u64 = 0x1c;
/// Root table address (64-bit): see [`crate::iommu::tables::rtaddr`].
pub const RTADDR: u64 = 0x20;
/// Fault status (32-bit): see [`FaultStatus`].
pub const FSTS: u64 = 0x34;
/// Invalidation queue tail (64-bit): index of the next free slot, in bits 18:4; writing it
/// submits descriptors.
pub const IQT: u64 = 0x88;
/// Invalidation queue address (64-bit): see [`crate::iommu::invalidation::iqa`].
pub const IQA: u64 = 0x90;
/// Interrupt remapping table address (64-bit): see [`crate::iommu::irte::irta`].
pub const IRTA: u64 = 0xb8;

bitflags! {
    /// GCMD bits. Writing GCMD is a whole command, not a bit update: use [`gcmd_value`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct GlobalCommand: u32 {
        /// Translation enable (DMA remapping on). Persistent.
        const TE = 1 << 31;
        /// Set root table pointer: latch RTADDR. One-shot.
        const SRTP = 1 << 30;
        /// Set fault log pointer (advanced fault logging). One-shot.
        const SFL = 1 << 29;
        /// Enable advanced fault logging. Persistent.
        const EAFL = 1 << 28;
        /// Write buffer flush (only needed when CAP.RWBF). One-shot.
        const WBF = 1 << 27;
        /// Queued invalidation enable. Persistent.
        const QIE = 1 << 26;
        /// Interrupt remapping enable. Persistent.
        const IRE = 1 << 25;
        /// Set interrupt remap table pointer: latch IRTA. One-shot.
        const SIRTP = 1 << 24;
        /// Compatibility format interrupts pass through unremapped while IRE. Persistent.
        const CFI = 1 << 23;
    }
}

bitflags! {
    /// GSTS bits: each reports the command bit at the same position.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct GlobalStatus: u32 {
        /// Translation enabled.
        const TES = 1 << 31;
        /// Root table pointer latched.
        const RTPS = 1 << 30;
        /// Fault log pointer latched.
        const FLS = 1 << 29;
        /// Advanced fault logging enabled.
        const AFLS = 1 << 28;
        /// Write buffer flush in progress (set while flushing, unlike the others).
        const WBFS = 1 << 27;
        /// Queued invalidation enabled.
        const QIES = 1 << 26;
        /// Interrupt remapping enabled.
        const IRES = 1 << 25;
        /// Interrupt remap table pointer latched.
        const IRTPS = 1 << 24;
        /// Compatibility format interrupts allowed.
        const CFIS = 1 << 23;
    }
}

impl GlobalCommand {
    /// The enables, which stay in effect only if every later GCMD write repeats them.
    pub const PERSISTENT: GlobalCommand = GlobalCommand::TE
        .union(GlobalCommand::EAFL)
        .union(GlobalCommand::QIE)
        .union(GlobalCommand::IRE)
        .union(GlobalCommand::CFI);
}

/// The value to write to GCMD to issue `set` and turn off `clear`, given the current GSTS.
///
/// The unit compares each write against the current state, so a write that leaves out an
/// enable turns it off (QEMU 7.2: `changed = GSTS ^ value`), and a one-shot bit carried over
/// from a status read re-issues that command (QEMU re-latches the root table and flushes its
/// caches on every write with SRTP set). Hence: keep the persistent enables the status
/// reports, drop everything else, then apply `set` and `clear`. Bits outside
/// [`GlobalCommand`] are never written. `set` wins if a bit is in both.
pub fn gcmd_value(gsts: u32, set: GlobalCommand, clear: GlobalCommand) -> u32 {
    let keep = GlobalCommand::from_bits_truncate(gsts) & GlobalCommand::PERSISTENT;
    ((keep - clear) | set).bits()
}

/// True when GSTS shows that the command `gcmd_value(_, set, clear)` has completed: every
/// status bit of `set` is on (WBF: WBFS is off again) and every status bit of `clear` is off.
/// Poll this after each GCMD write; the unit may take time (QEMU completes synchronously).
pub fn gcmd_complete(gsts: u32, set: GlobalCommand, clear: GlobalCommand) -> bool {
    let status = gsts & GlobalCommand::all().bits();
    let want_on = (set - GlobalCommand::WBF).bits();
    let want_off = (clear | (set & GlobalCommand::WBF)).bits();
    status & want_on == want_on && status & want_off == 0
}

bitflags! {
    /// FSTS bits. PFO, IQE, ICE and ITE are write-1-to-clear; PPF is the OR of the fault
    /// recording registers' F bits (clear those to clear it). The index of the first pending
    /// fault record is in bits 15:8 ([`fault_record_index`]).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct FaultStatus: u32 {
        /// Primary fault overflow: a fault was dropped because every record was full.
        const PFO = 1 << 0;
        /// Primary pending fault: at least one fault record holds a fault.
        const PPF = 1 << 1;
        /// Advanced fault overflow (deprecated).
        const AFO = 1 << 2;
        /// Advanced pending fault (deprecated).
        const APF = 1 << 3;
        /// Invalidation queue error: a bad descriptor stopped the queue at IQH.
        const IQE = 1 << 4;
        /// Invalidation completion error (device-TLB invalidations).
        const ICE = 1 << 5;
        /// Invalidation time-out error (device-TLB invalidations).
        const ITE = 1 << 6;
    }
}

/// FSTS.FRI (bits 15:8): the fault recording register to look at first when PPF is set.
pub const fn fault_record_index(fsts: u32) -> u8 {
    (fsts >> 8) as u8
}

/// Extract `width` bits starting at `shift`.
const fn field(value: u64, shift: u32, width: u32) -> u64 {
    (value >> shift) & ((1 << width) - 1)
}

/// The capability register, decoded on demand.
///
/// QEMU 7.2 reports `0x00d2008c22260206`: 16-bit domain ids, no caching mode, 3-level
/// (39-bit) second-level tables only, MGAW 39, one fault recording register at 0x220,
/// page-selective invalidation with MAMV 18, 2 MiB and 1 GiB pages, read and write draining.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VtdCap(pub u64);

impl VtdCap {
    /// ND (bits 2:0): domain id width is `4 + 2 * ND` bits. 7 is reserved and read as 16 bits.
    pub const fn domain_id_bits(self) -> u32 {
        let nd = field(self.0, 0, 3) as u32;
        if nd > 6 {
            16
        } else {
            4 + 2 * nd
        }
    }

    /// Number of domain ids the unit supports (`2^domain_id_bits`).
    pub const fn domains(self) -> u32 {
        1 << self.domain_id_bits()
    }

    /// CM (bit 7): caching mode. When set, the unit may cache not-present and faulting
    /// entries, so making an entry present also needs an invalidation, and domain id 0 is
    /// reserved. Clear on QEMU by default (`caching-mode=on` sets it).
    pub const fn caching_mode(self) -> bool {
        field(self.0, 7, 1) != 0
    }

    /// SAGAW (bits 12:8) raw: bit 1 = 39-bit/3-level, bit 2 = 48-bit/4-level, bit 3 =
    /// 57-bit/5-level.
    pub const fn sagaw(self) -> u8 {
        field(self.0, 8, 5) as u8
    }

    /// Whether second-level tables with `levels` levels (3, 4 or 5) are supported; what the
    /// context entry's address width must select.
    pub const fn supports_levels(self, levels: u8) -> bool {
        match levels {
            3..=5 => self.sagaw() & (1 << (levels - 2)) != 0,
            _ => false,
        }
    }

    /// FRO (bits 33:24) times 16: offset of the first fault recording register.
    pub const fn fault_recording_offset(self) -> u64 {
        field(self.0, 24, 10) * 16
    }

    /// NFR (bits 47:40, plus one): number of fault recording registers.
    pub const fn fault_recording_count(self) -> u32 {
        field(self.0, 40, 8) as u32 + 1
    }

    /// Offset of fault recording register `index` (16 bytes each: fault info at +0, source,
    /// reason and flags at +8), or `None` past the last one.
    pub const fn fault_record(self, index: u32) -> Option<u64> {
        if index < self.fault_recording_count() {
            Some(self.fault_recording_offset() + 16 * index as u64)
        } else {
            None
        }
    }
}

/// The extended capability register, decoded on demand.
///
/// QEMU 7.2 reports `0x0000000000f00f4a` with `-device intel-iommu`: queued invalidation,
/// interrupt remapping (xAPIC only: no EIM under TCG), pass-through, IOTLB registers at 0xF0,
/// MHMV 15; no page-walk coherency, no snoop control, no device TLBs, no scalable mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VtdExtCap(pub u64);

impl VtdExtCap {
    /// QI (bit 1): queued invalidation.
    pub const fn queued_invalidation(self) -> bool {
        field(self.0, 1, 1) != 0
    }

    /// IR (bit 3): interrupt remapping. Implies QI.
    pub const fn interrupt_remapping(self) -> bool {
        field(self.0, 3, 1) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// CAP as read from QEMU 7.2 `-machine q35 -device intel-iommu` (qtest `readq 0xfed90008`).
    const QEMU_CAP: u64 = 0x00d2_008c_2226_0206;
    /// ECAP, same machine (qtest `readq 0xfed90010`).
    const QEMU_ECAP: u64 = 0x0000_0000_00f0_0f4a;

    #[test]
    fn offsets_match_the_spec() {
        let all = [
            (CAP, 0x08),
            (ECAP, 0x10),
            (GCMD, 0x18),
            (GSTS, 0x1c),
            (RTADDR, 0x20),
            (FSTS, 0x34),
            (IQT, 0x88),
            (IQA, 0x90),
            (IRTA, 0xb8),
        ];
        for (got, want) in all {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn qemu_cap_decodes() {
        let cap = VtdCap(QEMU_CAP);
        assert_eq!(cap.domain_id_bits(), 16);
        assert_eq!(cap.domains(), 65536);
        assert!(!cap.caching_mode());
        assert_eq!(cap.sagaw(), 0b00010);
        assert!(cap.supports_levels(3));
        assert!(!cap.supports_levels(4) && !cap.supports_levels(5) && !cap.supports_levels(2));
        assert_eq!(cap.fault_recording_offset(), 0x220);
        assert_eq!(cap.fault_recording_count(), 1);
        assert_eq!(cap.fault_record(0), Some(0x220));
        assert_eq!(cap.fault_record(1), None);
    }

    #[test]
    fn qemu_ecap_decodes() {
        let ecap = VtdExtCap(QEMU_ECAP);
        assert!(ecap.queued_invalidation());
        assert!(ecap.interrupt_remapping());
    }

    #[test]
    fn nd_seven_reads_as_sixteen_bits() {
        assert_eq!(VtdCap(7).domain_id_bits(), 16);
        assert_eq!(VtdCap(0).domains(), 16);
    }

    #[test]
    fn gcmd_bits_match_the_spec() {
        assert_eq!(GlobalCommand::TE.bits(), 0x8000_0000);
        assert_eq!(GlobalCommand::SRTP.bits(), 0x4000_0000);
        assert_eq!(GlobalCommand::QIE.bits(), 0x0400_0000);
        assert_eq!(GlobalCommand::IRE.bits(), 0x0200_0000);
        assert_eq!(GlobalCommand::SIRTP.bits(), 0x0100_0000);
        assert_eq!(GlobalCommand::CFI.bits(), 0x0080_0000);
        assert_eq!(GlobalCommand::all().bits(), 0xff80_0000);
        assert_eq!(GlobalStatus::all().bits(), GlobalCommand::all().bits());
        // The mask Linux and the spec's example use: status with the one-shot bits cleared.
        assert_eq!(GlobalCommand::PERSISTENT.bits() | !GlobalCommand::all().bits(), 0x96ff_ffff);
    }

    #[test]
    fn gcmd_sequence_on_a_fresh_unit() {
        // Fresh unit: GSTS = 0.
        let v = gcmd_value(0, GlobalCommand::SRTP, GlobalCommand::empty());
        assert_eq!(v, 0x4000_0000);
        // QEMU leaves RTPS set; the next command must not repeat SRTP.
        let gsts = GlobalStatus::RTPS.bits();
        assert!(gcmd_complete(gsts, GlobalCommand::SRTP, GlobalCommand::empty()));
        assert_eq!(gcmd_value(gsts, GlobalCommand::QIE, GlobalCommand::empty()), 0x0400_0000);
        let gsts = gsts | GlobalStatus::QIES.bits();
        assert_eq!(gcmd_value(gsts, GlobalCommand::TE, GlobalCommand::empty()), 0x8400_0000);
        let gsts = gsts | GlobalStatus::TES.bits();
        assert_eq!(gcmd_value(gsts, GlobalCommand::SIRTP, GlobalCommand::empty()), 0x8500_0000);
        let gsts = gsts | GlobalStatus::IRTPS.bits();
        assert_eq!(gcmd_value(gsts, GlobalCommand::IRE, GlobalCommand::empty()), 0x8600_0000);
        assert!(!gcmd_complete(gsts, GlobalCommand::IRE, GlobalCommand::empty()));
        let gsts = gsts | GlobalStatus::IRES.bits();
        assert!(gcmd_complete(gsts, GlobalCommand::IRE, GlobalCommand::empty()));
        // Turning translation off keeps QI and IR on.
        assert_eq!(gcmd_value(gsts, GlobalCommand::empty(), GlobalCommand::TE), 0x0600_0000);
        assert!(!gcmd_complete(gsts, GlobalCommand::empty(), GlobalCommand::TE));
    }

    #[test]
    fn write_buffer_flush_completes_when_status_clears() {
        assert!(!gcmd_complete(GlobalStatus::WBFS.bits(), GlobalCommand::WBF, GlobalCommand::empty()));
        assert!(gcmd_complete(0, GlobalCommand::WBF, GlobalCommand::empty()));
    }

    #[test]
    fn fault_status_bits() {
        assert_eq!(FaultStatus::PFO.bits(), 1);
        assert_eq!(FaultStatus::PPF.bits(), 2);
        assert_eq!(FaultStatus::IQE.bits(), 0x10);
        assert_eq!(fault_record_index(0x0000_0302), 3);
    }

    proptest! {
        #[test]
        fn prop_gcmd_keeps_only_enables(gsts: u32, set in 0u32..512, clear in 0u32..512) {
            let set = GlobalCommand::from_bits_truncate(set << 23);
            let clear = GlobalCommand::from_bits_truncate(clear << 23);
            let v = gcmd_value(gsts, set, clear);
            // Never a bit outside GCMD.
            prop_assert_eq!(v & !GlobalCommand::all().bits(), 0);
            // One-shot bits only when asked for.
            let one_shot = GlobalCommand::all() - GlobalCommand::PERSISTENT;
            prop_assert_eq!(v & one_shot.bits(), (set & one_shot).bits());
            // Every requested bit is there; cleared enables are gone unless also set.
            prop_assert_eq!(v & set.bits(), set.bits());
            prop_assert_eq!(v & (clear - set).bits(), 0);
            // Enables not mentioned are preserved exactly.
            let untouched = GlobalCommand::PERSISTENT - set - clear;
            prop_assert_eq!(v & untouched.bits(), gsts & untouched.bits());
        }

        #[test]
        fn prop_fault_record_offsets(cap: u64, index in 0u32..300) {
            let c = VtdCap(cap);
            match c.fault_record(index) {
                Some(off) => {
                    prop_assert!(index < c.fault_recording_count());
                    prop_assert_eq!(off, c.fault_recording_offset() + 16 * u64::from(index));
                }
                None => prop_assert!(index >= c.fault_recording_count()),
            }
            prop_assert!(c.domain_id_bits() <= 16);
        }
    }
}

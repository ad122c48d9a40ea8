//! Root and context tables (legacy mode): how a requester id selects a DMA address space.
//!
//! A DMA request carries its requester id (source id): bus in bits 15:8, device in 7:3,
//! function in 2:0. The unit indexes the 4 KiB root table (256 [`root_entry`]s, one per bus)
//! with the bus, follows it to that bus's 4 KiB context table (256 [`context_entry`]s) and
//! indexes that with `devfn`. The context entry names the domain (its id tags the unit's
//! caches) and the second-level page table the request is translated through.
//!
//! Legacy mode is what `RTADDR` with TTM = 00 selects ([`rtaddr`]); every VT-d unit supports
//! it and QEMU 7.2 uses it unless started with `x-scalable-mode=on`.
//!
//! Layouts (spec 9.1, 9.3; QEMU's reserved-bit checks in brackets; a reserved bit set in a
//! present entry makes every request through it fault):
//!
//! ```text
//! root entry     low:  bit 0 P, [11:1 reserved], 63:12 context table address
//!                high: [reserved]
//! context entry  low:  bit 0 P, bit 1 FPD, 3:2 TT, [11:4 reserved], 63:12 SLPTPTR
//!                high: 2:0 AW, 6:3 ignored, [7 reserved], 23:8 DID, [63:24 reserved]
//! ```

use super::{check_addr, Entry128, VtdError, PAGE_SIZE};

/// Root entries per root table: one per bus.
pub const ROOT_ENTRIES: usize = 256;
/// Context entries per context table: one per `devfn`.
pub const CONTEXT_ENTRIES: usize = 256;

/// Present (root and context entries, low qword).
const P: u64 = 1 << 0;
/// Fault processing disable (context entry, low qword).
const FPD: u64 = 1 << 1;
/// Domain id position (context entry, high qword).
const DID_SHIFT: u32 = 8;

/// Address width of a context's second-level tables: the context entry's AW field, which
/// decides how many levels the unit walks. It must be one the unit reports in CAP.SAGAW
/// ([`super::regs::VtdCap::supports_levels`]), or every request faults with reason 0x3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressWidth {
    /// AW = 1: 39-bit DMA addresses, 3-level tables. The only width QEMU 7.2 supports by
    /// default (`aw-bits=39`).
    Bits39 = 1,
    /// AW = 2: 48-bit DMA addresses, 4-level tables.
    Bits48 = 2,
}

impl AddressWidth {
    /// Levels the unit walks.
    pub const fn levels(self) -> u8 {
        self as u8 + 2
    }

    /// One past the highest DMA address translated; requests at or above it fault (reason 0x4).
    pub const fn limit(self) -> u64 {
        1 << (30 + 9 * self as u32)
    }
}

/// The RTADDR register value for a legacy-mode root table at `root_table` (4 KiB aligned):
/// the address with TTM (bits 11:10) = 00. Latch it with GCMD.SRTP.
pub const fn rtaddr(root_table: u64) -> Result<u64, VtdError> {
    check_addr(root_table, PAGE_SIZE)
}

/// A present root entry pointing at the context table for one bus (4 KiB aligned).
pub const fn root_entry(context_table: u64) -> Result<Entry128, VtdError> {
    match check_addr(context_table, PAGE_SIZE) {
        Ok(addr) => Ok(Entry128 { low: addr | P, high: 0 }),
        Err(e) => Err(e),
    }
}

/// A present context entry: requests from this device are translated (TT = 0: untranslated
/// requests only, no device TLB) through the second-level table at `slpt` (4 KiB aligned, the
/// top of an `aw.levels()`-level tree), with the unit's caches tagged by `domain_id`.
///
/// `domain_id` must be below [`super::regs::VtdCap::domains`] (all 16 bits on QEMU), and
/// different address spaces must use different ids, since invalidations are by domain. Avoid
/// id 0: it is reserved when CAP.CM is set.
///
/// `fault_processing_disable` set suppresses fault records for this device's qualified faults
/// (translation faults, including a not-present context entry's); leave it clear to hear
/// about a misbehaving device.
pub const fn context_entry(
    slpt: u64,
    aw: AddressWidth,
    domain_id: u16,
    fault_processing_disable: bool,
) -> Result<Entry128, VtdError> {
    let addr = match check_addr(slpt, PAGE_SIZE) {
        Ok(addr) => addr,
        Err(e) => return Err(e),
    };
    let fpd = if fault_processing_disable { FPD } else { 0 };
    // TT (bits 3:2) = 00: translate untranslated requests, block translated ones.
    Ok(Entry128 { low: addr | fpd | P, high: aw as u64 | ((domain_id as u64) << DID_SHIFT) })
}

/// Index into the root table: the bus number.
pub const fn root_index(bus: u8) -> usize {
    bus as usize
}

/// `devfn` (device in bits 7:3, function in 2:0), or `None` if `device >= 32` or
/// `function >= 8`.
pub const fn devfn(device: u8, function: u8) -> Option<u8> {
    if device < 32 && function < 8 {
        Some((device << 3) | function)
    } else {
        None
    }
}

/// Index into a context table: `devfn`.
pub const fn context_index(devfn: u8) -> usize {
    devfn as usize
}

/// The 16-bit requester (source) id of a function: what fault records report and interrupt
/// remapping entries validate.
pub const fn source_id(bus: u8, devfn: u8) -> u16 {
    ((bus as u16) << 8) | devfn as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// QEMU 7.2 `VTD_ROOT_ENTRY_RSVD(39)`: reserved bits of a legacy root entry's low qword.
    const QEMU_ROOT_RSVD_LO: u64 = 0xffe | !((1 << 39) - 1);
    /// QEMU 7.2 `VTD_CONTEXT_ENTRY_RSVD_LO(39)` and `VTD_CONTEXT_ENTRY_RSVD_HI`.
    const QEMU_CTX_RSVD_LO: u64 = 0xff0 | !((1 << 39) - 1);
    const QEMU_CTX_RSVD_HI: u64 = 0xffff_ffff_ff00_0080;

    #[test]
    fn root_entry_layout() {
        let e = root_entry(0x12_3000).unwrap();
        assert_eq!(e, Entry128::new(0x12_3001, 0));
        assert_eq!(e.low & QEMU_ROOT_RSVD_LO, 0);
        assert_eq!(root_entry(0x12_3008), Err(VtdError::Misaligned { addr: 0x12_3008, align: 4096 }));
        assert_eq!(root_entry(1 << 52), Err(VtdError::AddressTooWide { addr: 1 << 52 }));
    }

    #[test]
    fn context_entry_layout() {
        let e = context_entry(0x4567_8000, AddressWidth::Bits39, 0xabcd, false).unwrap();
        assert_eq!(e.low, 0x4567_8001);
        assert_eq!(e.high, 0x00ab_cd01);
        // TT = 0, FPD = 0.
        assert_eq!(e.low & 0xe, 0);
        let e = context_entry(0x1000, AddressWidth::Bits48, 1, true).unwrap();
        assert_eq!(e, Entry128::new(0x1003, 0x102));
        assert!(context_entry(0x1001, AddressWidth::Bits39, 1, false).is_err());
        assert!(context_entry(!0xfff, AddressWidth::Bits39, 1, false).is_err());
    }

    #[test]
    fn address_widths() {
        assert_eq!(AddressWidth::Bits39.levels(), 3);
        assert_eq!(AddressWidth::Bits48.levels(), 4);
        assert_eq!(AddressWidth::Bits39.limit(), 1 << 39);
        assert_eq!(AddressWidth::Bits48.limit(), 1 << 48);
        // QEMU: level = 2 + AW, AGAW = 30 + 9 * AW.
        assert_eq!(AddressWidth::Bits39 as u64, 1);
    }

    #[test]
    fn indices() {
        assert_eq!(root_index(0xfe), 254);
        assert_eq!(devfn(3, 0), Some(0x18));
        assert_eq!(devfn(31, 7), Some(0xff));
        assert_eq!(devfn(32, 0), None);
        assert_eq!(devfn(0, 8), None);
        assert_eq!(context_index(0x18), 0x18);
        assert_eq!(source_id(0, 0x18), 0x0018);
        assert_eq!(source_id(0xff, 0xf8), 0xfff8);
        assert_eq!(rtaddr(0x10_0000), Ok(0x10_0000));
        assert!(rtaddr(0x10_0400).is_err());
    }

    proptest! {
        #[test]
        fn prop_context_entry_fields(page in 0u64..(1 << 27), did: u16, fpd: bool, wide: bool) {
            let slpt = page << 12;
            let aw = if wide { AddressWidth::Bits48 } else { AddressWidth::Bits39 };
            let e = context_entry(slpt, aw, did, fpd).unwrap();
            prop_assert!(e.bit(0));
            prop_assert_eq!(e.bit(1), fpd);
            prop_assert_eq!((e.low >> 2) & 3, 0);
            prop_assert_eq!(e.low & !0xfff, slpt);
            prop_assert_eq!(e.high & 7, aw as u64);
            prop_assert_eq!((e.high >> 8) as u16, did);
            // Below 2^39 (QEMU's host address width) nothing reserved is set.
            prop_assert_eq!(e.low & QEMU_CTX_RSVD_LO, 0);
            prop_assert_eq!(e.high & QEMU_CTX_RSVD_HI, 0);
        }

        #[test]
        fn prop_root_entry_fields(page in 0u64..(1 << 27)) {
            let e = root_entry(page << 12).unwrap();
            prop_assert_eq!(e.low, (page << 12) | 1);
            prop_assert_eq!(e.high, 0);
            prop_assert_eq!(e.low & QEMU_ROOT_RSVD_LO, 0);
        }

        #[test]
        fn prop_devfn_roundtrip(device in 0u8..32, function in 0u8..8, bus: u8) {
            let df = devfn(device, function).unwrap();
            prop_assert_eq!(df >> 3, device);
            prop_assert_eq!(df & 7, function);
            let sid = source_id(bus, df);
            prop_assert_eq!((sid >> 8) as u8, bus);
            prop_assert_eq!(sid as u8, df);
        }
    }
}

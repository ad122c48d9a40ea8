//! Intel VT-d (DMA and interrupt remapping) encodings, host-tested.
//!
//! Everything here is pure computation: register offsets and decoders ([`regs`]), the root and
//! context tables that select a device's DMA address space ([`tables`]), the second-level page
//! format for [`crate::stage2::Stage2Map`] ([`second_level`]), interrupt remapping table entries
//! and remappable MSIs ([`irte`]), fault records ([`faults`]) and invalidation commands
//! ([`invalidation`]). The bare-metal glue does the MMIO; keeping the bit layouts here means every
//! one of them is checked by a test against the specification (rev. 3.x/4.x, legacy i.e.
//! non-scalable mode) and against what QEMU 7.2's `intel-iommu` model checks.
//!
//! The 128-bit structures (root, context and interrupt remapping entries, invalidation
//! descriptors, fault records) are all [`Entry128`]: two little-endian quadwords, `low` at the
//! lower address. [`write_entry128`] and [`clear_entry128`] store them through a
//! [`TableMemory`] in the order the hardware needs.
//!
//! # Bring-up on QEMU 7.2 (`-device intel-iommu`, one unit at 0xFED90000)
//!
//! Registers are 32- or 64-bit MMIO (QEMU refuses other sizes). `GCMD` is write-only and every
//! write is a full command: compute it with [`regs::gcmd_value`] from the current `GSTS`, then
//! poll `GSTS` with [`regs::gcmd_complete`]. Order:
//!
//! 1. Fault reporting (optional): `FEDATA`/`FEADDR`, then clear `FECTL.IM` (masked at reset).
//! 2. `RTADDR` = [`tables::rtaddr`]`(root)`; `GCMD.SRTP`; wait for `GSTS.RTPS`.
//! 3. Invalidation queue: `IQT` = 0, `IQA` = [`invalidation::iqa`]; `GCMD.QIE`; wait `GSTS.QIES`.
//!    Then queue global context-cache, global IOTLB and global interrupt-entry-cache
//!    invalidations and a status-write wait descriptor; bump `IQT`; poll the status word.
//!    (Without QI, register-based invalidation (CCMD, IOTLB) works, but QEMU ignores it, and
//!    never clears its busy bit, once QI is enabled.)
//! 4. `GCMD.TE`; wait `GSTS.TES`. From here, DMA from a device without a present context entry
//!    faults.
//! 5. Interrupt remapping: `IRTA` = [`irte::irta`]; `GCMD.SIRTP`; wait `GSTS.IRTPS`; global
//!    interrupt-entry-cache invalidation through the queue; `GCMD.IRE`; wait `GSTS.IRES`.
//!    Leave `CFI` clear so compatibility-format interrupts are blocked (the spec's behaviour;
//!    QEMU 7.2 passes them through unremapped regardless).
//!
//! QEMU 7.2 does not make `IRE` wait for `QIE`, but the specification ties interrupt remapping to
//! queued invalidation (the interrupt entry cache can only be invalidated through the queue),
//! so enable QI first.
//!
//! Other QEMU 7.2 behaviour worth knowing (checked against the model with qtest and the `edu`
//! test device): interrupt-remapping faults (0x20..0x26) are not recorded in the fault
//! registers, the interrupt is only dropped; while a fault record from a requester is pending
//! (F set), further faults from it are not recorded; a queue error (FSTS.IQE) stops the queue
//! at the bad descriptor until software fixes it, clears IQE and writes IQT again.

pub mod faults;
pub mod invalidation;
pub mod irte;
pub mod regs;
pub mod second_level;
pub mod tables;

use core::fmt;

use crate::stage2::TableMemory;

/// A 128-bit VT-d structure as two little-endian quadwords: `low` is bits 63:0 (at the lower
/// address), `high` bits 127:64.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Entry128 {
    /// Bits 63:0.
    pub low: u64,
    /// Bits 127:64.
    pub high: u64,
}

impl Entry128 {
    /// An entry from its two halves.
    pub const fn new(low: u64, high: u64) -> Self {
        Self { low, high }
    }

    /// Bit `n` (0..128) of the entry; false for `n >= 128`.
    pub const fn bit(self, n: u32) -> bool {
        if n < 64 {
            (self.low >> n) & 1 != 0
        } else if n < 128 {
            (self.high >> (n - 64)) & 1 != 0
        } else {
            false
        }
    }
}

/// Why an encoder refused its input. Encoders never truncate silently: a bit dropped from an
/// address would point the hardware at the wrong memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VtdError {
    /// `addr` is not a multiple of `align`.
    Misaligned {
        /// The address given.
        addr: u64,
        /// The alignment it needs.
        align: u64,
    },
    /// `addr` has bits above [`MAX_ADDRESS_BITS`].
    AddressTooWide {
        /// The address given.
        addr: u64,
    },
    /// A size, index or count is outside what the field can hold.
    OutOfRange {
        /// The value given.
        value: u64,
        /// The first value that is not accepted.
        limit: u64,
    },
}

impl fmt::Display for VtdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VtdError::Misaligned { addr, align } => write!(f, "VT-d address {addr:#x} is not {align:#x}-aligned"),
            VtdError::AddressTooWide { addr } => {
                write!(f, "VT-d address {addr:#x} is wider than {MAX_ADDRESS_BITS} bits")
            }
            VtdError::OutOfRange { value, limit } => write!(f, "VT-d field value {value:#x} not below {limit:#x}"),
        }
    }
}

/// Widest physical address any VT-d structure can hold (address fields end at bit 51 in the
/// page-table format). The platform's host address width (DMAR table; 39 bits on QEMU) is a
/// further limit the hardware enforces by faulting on reserved bits, so memory handed to the
/// IOMMU must also lie below `2^HAW` (the frame allocator only hands out memory below 4 GiB).
pub const MAX_ADDRESS_BITS: u32 = 52;

/// 4 KiB: the size and alignment of every VT-d table page.
pub const PAGE_SIZE: u64 = 4096;

/// 128-bit entries per 4 KiB page.
pub const ENTRIES128_PER_PAGE: usize = 256;

/// Check that `addr` is `align`-aligned (a power of two) and fits in [`MAX_ADDRESS_BITS`].
pub(crate) const fn check_addr(addr: u64, align: u64) -> Result<u64, VtdError> {
    if addr & (align - 1) != 0 {
        Err(VtdError::Misaligned { addr, align })
    } else if addr >> MAX_ADDRESS_BITS != 0 {
        Err(VtdError::AddressTooWide { addr })
    } else {
        Ok(addr)
    }
}

/// Page and word of 128-bit entry `index` in a physically contiguous table at `table`, in the
/// 4 KiB units [`TableMemory`] addresses.
fn entry128_location(table: u64, index: usize) -> Result<(u64, usize), VtdError> {
    check_addr(table, PAGE_SIZE)?;
    let page = (index / ENTRIES128_PER_PAGE) as u64;
    let word = (index % ENTRIES128_PER_PAGE) * 2;
    match page.checked_mul(PAGE_SIZE).and_then(|off| table.checked_add(off)) {
        Some(addr) if addr >> MAX_ADDRESS_BITS == 0 => Ok((addr, word)),
        _ => {
            let pages_left = ((1u64 << MAX_ADDRESS_BITS) - table) / PAGE_SIZE;
            Err(VtdError::OutOfRange { value: index as u64, limit: pages_left * ENTRIES128_PER_PAGE as u64 })
        }
    }
}

/// Store `entry` as entry `index` of the physically contiguous table at `table` (root, context,
/// interrupt remapping table or invalidation queue: all arrays of 128-bit entries).
///
/// `high` is written before `low`, because `low` holds the present bit of root, context and
/// interrupt remapping entries and the type of descriptors: the hardware may read the entry
/// at any time (two 64-bit reads, in no promised order), and must never see a present entry
/// with a stale upper half. This makes a not-present entry present safely. Changing a present
/// entry is not atomic this way: clear it first ([`clear_entry128`]), invalidate, then write.
pub fn write_entry128<M: TableMemory + ?Sized>(
    mem: &mut M,
    table: u64,
    index: usize,
    entry: Entry128,
) -> Result<(), VtdError> {
    let (page, word) = entry128_location(table, index)?;
    mem.write_entry(page, word + 1, entry.high);
    mem.write_entry(page, word, entry.low);
    Ok(())
}

/// Make entry `index` of the table at `table` not present: `low` (present bit) is zeroed
/// before `high`, the reverse of [`write_entry128`]. The caller must then invalidate the
/// cache that may hold it (context cache, IOTLB or interrupt entry cache).
pub fn clear_entry128<M: TableMemory + ?Sized>(mem: &mut M, table: u64, index: usize) -> Result<(), VtdError> {
    let (page, word) = entry128_location(table, index)?;
    mem.write_entry(page, word, 0);
    mem.write_entry(page, word + 1, 0);
    Ok(())
}

/// Entry `index` of the table at `table`, read through the same addressing as
/// [`write_entry128`].
pub fn read_entry128<M: TableMemory + ?Sized>(mem: &M, table: u64, index: usize) -> Result<Entry128, VtdError> {
    let (page, word) = entry128_location(table, index)?;
    Ok(Entry128 { low: mem.read_entry(page, word), high: mem.read_entry(page, word + 1) })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::vec::Vec;

    /// Flat test memory: 64-bit words by (page, word), with a log of writes so ordering can be
    /// checked.
    #[derive(Default)]
    pub(crate) struct WordMem {
        pub(crate) words: BTreeMap<(u64, usize), u64>,
        pub(crate) log: Vec<(u64, usize, u64)>,
    }

    impl TableMemory for WordMem {
        fn alloc_table(&mut self) -> Option<u64> {
            None
        }
        fn free_table(&mut self, _table: u64) {}
        fn read_entry(&self, table: u64, index: usize) -> u64 {
            assert!(index < 512);
            self.words.get(&(table, index)).copied().unwrap_or(0)
        }
        fn write_entry(&mut self, table: u64, index: usize, entry: u64) {
            assert!(index < 512);
            self.words.insert((table, index), entry);
            self.log.push((table, index, entry));
        }
    }

    #[test]
    fn entry_bits() {
        let e = Entry128::new(1, 1 << 63);
        assert!(e.bit(0) && e.bit(127) && !e.bit(1) && !e.bit(64) && !e.bit(128));
    }

    #[test]
    fn write_orders_high_then_low_and_clear_reverses() {
        let mut mem = WordMem::default();
        write_entry128(&mut mem, 0x10_0000, 3, Entry128::new(0xa1, 0xb2)).unwrap();
        assert_eq!(mem.log, [(0x10_0000, 7, 0xb2), (0x10_0000, 6, 0xa1)]);
        mem.log.clear();
        clear_entry128(&mut mem, 0x10_0000, 3).unwrap();
        assert_eq!(mem.log, [(0x10_0000, 6, 0), (0x10_0000, 7, 0)]);
    }

    #[test]
    fn entries_beyond_a_page_go_to_the_next_page() {
        let mut mem = WordMem::default();
        write_entry128(&mut mem, 0x20_0000, 256 + 5, Entry128::new(1, 2)).unwrap();
        assert_eq!(mem.words.get(&(0x20_1000, 10)), Some(&1));
        assert_eq!(mem.words.get(&(0x20_1000, 11)), Some(&2));
        assert_eq!(read_entry128(&mem, 0x20_0000, 261), Ok(Entry128::new(1, 2)));
    }

    #[test]
    fn bad_tables_are_refused() {
        let mut mem = WordMem::default();
        assert_eq!(
            write_entry128(&mut mem, 0x1010, 0, Entry128::default()),
            Err(VtdError::Misaligned { addr: 0x1010, align: 4096 })
        );
        assert_eq!(clear_entry128(&mut mem, 1 << 52, 0), Err(VtdError::AddressTooWide { addr: 1 << 52 }));
        assert!(read_entry128(&mem, (1 << 52) - 4096, 256).is_err());
        assert!(write_entry128(&mut mem, 0, usize::MAX, Entry128::default()).is_err());
        assert!(mem.log.is_empty());
        for e in [
            VtdError::Misaligned { addr: 1, align: 4096 },
            VtdError::AddressTooWide { addr: 1 << 60 },
            VtdError::OutOfRange { value: 9, limit: 8 },
        ] {
            assert!(!e.to_string().is_empty());
        }
    }

    proptest! {
        #[test]
        fn prop_entry128_roundtrip(page in 0u64..(1 << 20), index in 0usize..4096, low: u64, high: u64) {
            let mut mem = WordMem::default();
            let table = page << 12;
            write_entry128(&mut mem, table, index, Entry128::new(low, high)).unwrap();
            prop_assert_eq!(read_entry128(&mem, table, index), Ok(Entry128::new(low, high)));
            prop_assert_eq!(mem.log.len(), 2);
            prop_assert_eq!(mem.log[1].2, low, "low half written last");
            clear_entry128(&mut mem, table, index).unwrap();
            prop_assert_eq!(read_entry128(&mem, table, index), Ok(Entry128::default()));
        }
    }
}

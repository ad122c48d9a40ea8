//! Portable stage-2 (guest-physical → host-physical) page-table builder.
//!
//! Both AMD NPT and Intel EPT are 4-level radix trees of 512-entry, 4 KiB tables indexed by
//! guest-physical address bits 47..12; they differ only in how an entry is encoded. So the tree
//! logic lives here once, generic over a [`Stage2Format`] (the entry encoding, see
//! [`crate::npt::Npt`]) and a [`TableMemory`] (where tables live: identity-mapped frames in the
//! microvisor, plain arrays in host tests).
//!
//! Design choices, and why:
//! * Every operation is all-or-nothing. A half-applied `map` would leave a guest with memory it
//!   was not meant to have (or without memory the caller believes it has), so `map` checks the
//!   whole range first and rolls back on a mid-way table allocation failure, and `unmap`
//!   validates and pre-allocates everything it needs before touching a single entry.
//! * 2 MiB pages are used wherever gpa and hpa are both 2 MiB aligned: fewer tables and far
//!   fewer TLB misses for guest RAM. 1 GiB pages are never created, which keeps every walk to
//!   one kind of large page.
//! * Empty tables are freed as soon as they become empty, so a non-root table always holds at
//!   least one present entry. That keeps memory bounded by what is mapped and makes "is this
//!   range unmapped?" answerable from the first empty entry on the walk.
//! * The tree stores nothing besides the entries: the caller owns the [`TableMemory`] and
//!   passes it to each call, which keeps this type free of lifetimes and `unsafe`.
//!
//! TLB maintenance is the caller's job: after `unmap`, or after changing a mapping, the guest's
//! ASID (AMD: VMCB TLB_CONTROL) must be flushed before the guest runs again.

use core::fmt;
use core::marker::PhantomData;

use bitflags::bitflags;

/// 4 KiB: the base page and the size of every table.
pub const PAGE_SIZE_4K: u64 = 1 << 12;
/// 2 MiB: the large page size used for aligned ranges.
pub const PAGE_SIZE_2M: u64 = 1 << 21;
/// Width of the guest-physical address space a 4-level table covers.
pub const GPA_BITS: u32 = 48;
/// One past the highest guest-physical address a 4-level table can map.
pub const GPA_LIMIT: u64 = 1 << GPA_BITS;
/// Entries in every table.
pub const ENTRIES_PER_TABLE: usize = 512;

/// The root table's level (PML4); level 1 is the page table holding 4 KiB leaves.
const ROOT_LEVEL: u8 = 4;

bitflags! {
    /// What the guest may do with a mapping.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Access: u8 {
        /// Loads (and, for NPT, presence itself).
        const READ = 1;
        /// Stores.
        const WRITE = 2;
        /// Instruction fetches.
        const EXEC = 4;
    }
}

impl Access {
    /// Read and write, no execute: the usual data mapping.
    pub const RW: Access = Access::READ.union(Access::WRITE);
}

/// Memory type of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemType {
    /// Cacheable, write-back: RAM.
    WriteBack,
    /// Uncached: device MMIO, where caching or merging accesses would change behaviour.
    Uncached,
}

/// Size of a leaf mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    /// 4 KiB page, in a level-1 table.
    Size4K,
    /// 2 MiB page, directly in a level-2 table.
    Size2M,
}

/// Address bits 51:12 of a table pointer or 4 KiB leaf, in NPT, EPT and VT-d alike.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Address bits 51:21 of a 2 MiB leaf (bit 12 is NPT's large-page PAT bit; VT-d reserves 20:12).
pub const ADDR_MASK_2M: u64 = 0x000f_ffff_ffe0_0000;
/// Page size: a large leaf in a level-2 entry (bit 7 in all three formats).
pub const PS: u64 = 1 << 7;

impl PageSize {
    /// The address bits of a leaf of this size.
    pub const fn addr_mask(self) -> u64 {
        match self {
            PageSize::Size4K => ADDR_MASK,
            PageSize::Size2M => ADDR_MASK_2M,
        }
    }

    /// Size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => PAGE_SIZE_4K,
            PageSize::Size2M => PAGE_SIZE_2M,
        }
    }
}

/// Result of [`Stage2Map::translate`].
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Host-physical address, including the offset within the page.
    pub hpa: u64,
    /// Permissions of the leaf.
    pub access: Access,
    /// Memory type of the leaf.
    pub mem_type: MemType,
    /// Size of the leaf that maps the address.
    pub page_size: PageSize,
}

/// Why a stage-2 operation failed. Every failing operation leaves the map unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage2Error {
    /// `gpa`, `hpa` or `size` is not 4 KiB aligned, or `unmap` would cut a 2 MiB page (`hpa`
    /// is 0 for `unmap`).
    Misaligned {
        /// Guest-physical start given.
        gpa: u64,
        /// Host-physical start given.
        hpa: u64,
        /// Size given.
        size: u64,
    },
    /// `size` is 0: almost certainly a caller bug, so not silently accepted.
    ZeroSize {
        /// Guest-physical start given.
        gpa: u64,
    },
    /// The first guest-physical address that lies beyond the 48-bit space (or the start, if the
    /// range wraps around).
    OutOfRange {
        /// Offending guest-physical address.
        gpa: u64,
    },
    /// The host-physical range does not fit in the format's physical address width.
    HpaOutOfRange {
        /// Host-physical start given.
        hpa: u64,
    },
    /// `map` found this page already mapped.
    AlreadyMapped {
        /// First mapped guest-physical page in the range.
        gpa: u64,
    },
    /// `unmap` found this page not mapped.
    NotMapped {
        /// First unmapped guest-physical page in the range.
        gpa: u64,
    },
    /// The [`TableMemory`] had no table left.
    NoTableMemory,
    /// The format cannot express these permissions (NPT: any mapping without READ, since a
    /// present entry is always readable).
    BadAccess {
        /// Permissions requested.
        access: Access,
    },
    /// [`TableMemory::alloc_table`] returned an address that is not 4 KiB aligned or does not
    /// fit in an entry; the table was given back.
    BadTable {
        /// The address returned.
        addr: u64,
    },
}

/// Where the page tables live.
///
/// The microvisor implements this over identity-mapped physical frames; tests over arrays.
/// Table addresses are the physical addresses the hardware walker will use.
pub trait TableMemory {
    /// A zeroed, 4 KiB aligned table, by physical address; `None` when out of memory.
    fn alloc_table(&mut self) -> Option<u64>;
    /// Give back a table previously returned by `alloc_table` and no longer referenced.
    fn free_table(&mut self, table: u64);
    /// Entry `index` (< 512) of `table`.
    fn read_entry(&self, table: u64, index: usize) -> u64;
    /// Set entry `index` (< 512) of `table`. Implementations for live tables must write the
    /// whole 64-bit value at once (a single aligned store) and must not let the compiler
    /// reorder or elide writes (use volatile stores): the map fills a table before linking it
    /// and the hardware walker may read entries concurrently.
    fn write_entry(&mut self, table: u64, index: usize, entry: u64);
}

/// Encoding of stage-2 entries (AMD NPT, Intel EPT, ...).
///
/// Conventions every format must follow: the all-zero entry is not present (fresh tables are
/// zero, and 0 is what the map writes to clear an entry), and a level-1 entry is always a leaf.
pub trait Stage2Format {
    /// Host-physical address width the entries can hold.
    const HPA_BITS: u32;

    /// Whether `access` is expressible, so `map` can refuse before touching anything. Both
    /// formats need READ: a present NPT entry is always readable, and in EPT write without
    /// read is a misconfiguration (SDM 28.2.3.1) while execute-only needs a capability not
    /// every CPU has. Unknown bits are refused rather than silently dropped.
    fn check_access(access: Access) -> Result<(), Stage2Error> {
        if access.contains(Access::READ) && Access::all().contains(access) {
            Ok(())
        } else {
            Err(Stage2Error::BadAccess { access })
        }
    }

    /// The bits of a leaf mapping a page of `size` at `hpa`, besides the address and the
    /// large-page bit: `hpa` fits and is aligned to `size`, `access` passed `check_access`.
    fn leaf_bits(access: Access, mem_type: MemType) -> u64;

    /// A leaf entry mapping a page of `size` at `hpa` (aligned to `size`).
    fn leaf(hpa: u64, access: Access, mem_type: MemType, size: PageSize) -> Result<u64, Stage2Error> {
        Self::check_access(access)?;
        if hpa >> Self::HPA_BITS != 0 {
            return Err(Stage2Error::HpaOutOfRange { hpa });
        }
        if hpa & !size.addr_mask() != 0 {
            return Err(Stage2Error::Misaligned { gpa: 0, hpa, size: size.bytes() });
        }
        let ps = if size == PageSize::Size2M { PS } else { 0 };
        Ok(hpa | ps | Self::leaf_bits(access, mem_type))
    }

    /// A non-leaf entry pointing to the table at `table` (4 KiB aligned).
    fn table(table: u64) -> u64;

    /// True when the entry is present (maps something or points to a table).
    fn is_present(entry: u64) -> bool;

    /// For a present entry of a level-2 (or level-3) table: true when it is a large leaf
    /// rather than a pointer to the next table. Never asked about level-1 entries.
    fn is_large(entry: u64) -> bool {
        entry & PS != 0
    }

    /// Address of the table a present non-leaf entry points to.
    fn table_address(entry: u64) -> u64 {
        entry & ADDR_MASK
    }

    // Decoding a leaf back: only `translate` and the tests need it.

    /// Base host-physical address of a present leaf of the given size.
    #[cfg(test)]
    fn leaf_address(entry: u64, size: PageSize) -> u64 {
        entry & size.addr_mask()
    }

    /// Permissions of a present leaf.
    #[cfg(test)]
    fn access(entry: u64) -> Access;

    /// Memory type of a present leaf.
    #[cfg(test)]
    fn mem_type(entry: u64) -> MemType;
}

/// What a walk found for one guest-physical address.
#[derive(Clone, Copy, Debug)]
enum Walk {
    /// The entry at `level` is not present: the whole `span(level)` block is unmapped.
    Hole { level: u8 },
    /// A leaf at `level` (1: 4 KiB, 2: 2 MiB) maps the address.
    Leaf {
        level: u8,
        #[cfg_attr(not(test), allow(dead_code))] // read by the test-only `translate`
        entry: u64,
    },
}

/// Bytes covered by one entry of a table at `level`.
const fn span(level: u8) -> u64 {
    1u64 << (12 + 9 * (level as u32 - 1))
}

/// Index into a table at `level` for `gpa`.
const fn index(gpa: u64, level: u8) -> usize {
    ((gpa >> (12 + 9 * (level as u32 - 1))) & 0x1ff) as usize
}

/// Start of the next `span(level)` block after the one holding `gpa`.
const fn next_block(gpa: u64, level: u8) -> u64 {
    (gpa & !(span(level) - 1)) + span(level)
}

/// A stage-2 address space: a 4-level table tree rooted at [`Stage2Map::root`].
///
/// Tables are owned by this value but live in the caller's [`TableMemory`]; pass the same
/// memory to every call. Dropping the map without [`Stage2Map::destroy`] leaks its tables.
pub struct Stage2Map<F: Stage2Format> {
    root: u64,
    /// `fn() -> F` rather than `F`: the map stores no `F`, so it must not inherit its auto
    /// traits.
    _format: PhantomData<fn() -> F>,
}

/// The stage-2 map used on AMD SVM (the tests' format).
#[cfg(test)]
pub type NptMap = Stage2Map<crate::npt::Npt>;

impl<F: Stage2Format> fmt::Debug for Stage2Map<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stage2Map").field("root", &format_args!("{:#x}", self.root)).finish()
    }
}

impl<F: Stage2Format> Stage2Map<F> {
    /// An empty address space with a fresh root table.
    pub fn new<M: TableMemory + ?Sized>(mem: &mut M) -> Result<Self, Stage2Error> {
        let root = Self::new_table(mem)?;
        Ok(Self { root, _format: PhantomData })
    }

    /// Physical address of the root table: what goes into the VMCB's nested CR3 (or the EPTP).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Allocate a table and make sure it is usable and empty. The explicit zeroing costs 512
    /// stores per table and protects against a `TableMemory` handing out stale memory, which
    /// would otherwise turn into guest access to arbitrary host memory.
    fn new_table<M: TableMemory + ?Sized>(mem: &mut M) -> Result<u64, Stage2Error> {
        let table = mem.alloc_table().ok_or(Stage2Error::NoTableMemory)?;
        if table & (PAGE_SIZE_4K - 1) != 0 || !Self::hpa_fits(table, PAGE_SIZE_4K) {
            mem.free_table(table);
            return Err(Stage2Error::BadTable { addr: table });
        }
        for i in 0..ENTRIES_PER_TABLE {
            mem.write_entry(table, i, 0);
        }
        Ok(table)
    }

    /// True when `[start, start + size)` lies within the format's host-physical width.
    fn hpa_fits(start: u64, size: u64) -> bool {
        match (start.checked_add(size), 1u64.checked_shl(F::HPA_BITS)) {
            (Some(end), Some(limit)) => end <= limit,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// Walk the tree for `gpa` (< [`GPA_LIMIT`]) without changing anything.
    fn walk<M: TableMemory + ?Sized>(&self, mem: &M, gpa: u64) -> Walk {
        let mut table = self.root;
        let mut level = ROOT_LEVEL;
        loop {
            let entry = mem.read_entry(table, index(gpa, level));
            if !F::is_present(entry) {
                return Walk::Hole { level };
            }
            if level == 1 || (level == 2 && F::is_large(entry)) {
                return Walk::Leaf { level, entry };
            }
            table = F::table_address(entry);
            level -= 1;
        }
    }

    /// First page in `[lo, hi)` whose mapped-ness equals `mapped`, skipping whole holes and
    /// large pages at a time.
    fn first_page<M: TableMemory + ?Sized>(&self, mem: &M, lo: u64, hi: u64, mapped: bool) -> Option<u64> {
        let mut cursor = lo;
        while cursor < hi {
            let (is_mapped, level) = match self.walk(mem, cursor) {
                Walk::Hole { level } => (false, level),
                Walk::Leaf { level, .. } => (true, level),
            };
            if is_mapped == mapped {
                return Some(cursor);
            }
            cursor = next_block(cursor, level);
        }
        None
    }

    /// Validate a range and return its end. `hpa` is only used for the error report.
    fn check_range(gpa: u64, hpa: u64, size: u64) -> Result<u64, Stage2Error> {
        if size == 0 {
            return Err(Stage2Error::ZeroSize { gpa });
        }
        if (gpa | hpa | size) & (PAGE_SIZE_4K - 1) != 0 {
            return Err(Stage2Error::Misaligned { gpa, hpa, size });
        }
        match gpa.checked_add(size) {
            Some(end) if end <= GPA_LIMIT => Ok(end),
            Some(_) => Err(Stage2Error::OutOfRange { gpa: gpa.max(GPA_LIMIT) }),
            None => Err(Stage2Error::OutOfRange { gpa }),
        }
    }

    /// Map `[gpa, gpa+size)` to `[hpa, hpa+size)` with `access` and `mem_type`.
    ///
    /// All three must be 4 KiB aligned. 2 MiB pages are used wherever gpa and hpa are both
    /// 2 MiB aligned and at least 2 MiB remain; 4 KiB pages elsewhere. Fails with
    /// [`Stage2Error::AlreadyMapped`] if any page of the range is mapped. On every error the map
    /// is exactly as before (tables allocated mid-way are freed again).
    pub fn map<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa: u64,
        hpa: u64,
        size: u64,
        access: Access,
        mem_type: MemType,
    ) -> Result<(), Stage2Error> {
        let end = Self::check_range(gpa, hpa, size)?;
        if !Self::hpa_fits(hpa, size) {
            return Err(Stage2Error::HpaOutOfRange { hpa });
        }
        F::check_access(access)?;
        if let Some(mapped) = self.first_page(mem, gpa, end, true) {
            return Err(Stage2Error::AlreadyMapped { gpa: mapped });
        }
        let mut cursor = gpa;
        while cursor < end {
            let target = hpa + (cursor - gpa);
            match self.install(mem, cursor, target, end - cursor, access, mem_type) {
                Ok(step) => cursor += step,
                Err(e) => {
                    // Everything in [gpa, end) was unmapped before: clearing it restores the
                    // leaves, and pruning frees every table this call created (all of them lie
                    // on walks of addresses in the range).
                    self.clear(mem, gpa, end);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Install one leaf at `gpa` (known to be unmapped) and return the bytes it covers.
    fn install<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa: u64,
        hpa: u64,
        remaining: u64,
        access: Access,
        mem_type: MemType,
    ) -> Result<u64, Stage2Error> {
        let pd = self.descend_alloc(mem, gpa, 2)?;
        let pd_index = index(gpa, 2);
        let pde = mem.read_entry(pd, pd_index);
        let want_large = (gpa | hpa) & (PAGE_SIZE_2M - 1) == 0 && remaining >= PAGE_SIZE_2M;
        if !F::is_present(pde) && want_large {
            let leaf = F::leaf(hpa, access, mem_type, PageSize::Size2M)?;
            mem.write_entry(pd, pd_index, leaf);
            return Ok(PAGE_SIZE_2M);
        }
        if F::is_present(pde) && F::is_large(pde) {
            // The up-front check rules this out; refuse rather than overwrite.
            return Err(Stage2Error::AlreadyMapped { gpa });
        }
        // Either no table yet, or a table already holding other 4 KiB pages of this 2 MiB
        // block (then 4 KiB pages are used even if the range would allow a large page).
        let pt = if F::is_present(pde) {
            F::table_address(pde)
        } else {
            let pt = Self::new_table(mem)?;
            mem.write_entry(pd, pd_index, F::table(pt));
            pt
        };
        let pt_index = index(gpa, 1);
        if F::is_present(mem.read_entry(pt, pt_index)) {
            return Err(Stage2Error::AlreadyMapped { gpa });
        }
        let leaf = F::leaf(hpa, access, mem_type, PageSize::Size4K)?;
        mem.write_entry(pt, pt_index, leaf);
        Ok(PAGE_SIZE_4K)
    }

    /// The table at `level` on the walk for `gpa`, creating missing tables above it.
    fn descend_alloc<M: TableMemory + ?Sized>(&mut self, mem: &mut M, gpa: u64, level: u8) -> Result<u64, Stage2Error> {
        let mut table = self.root;
        let mut current = ROOT_LEVEL;
        while current > level {
            let i = index(gpa, current);
            let entry = mem.read_entry(table, i);
            table = if !F::is_present(entry) {
                let next = Self::new_table(mem)?;
                mem.write_entry(table, i, F::table(next));
                next
            } else if current <= 3 && F::is_large(entry) {
                // Only 2 MiB leaves are ever created, and never above level 2.
                return Err(Stage2Error::AlreadyMapped { gpa });
            } else {
                F::table_address(entry)
            };
            current -= 1;
        }
        Ok(table)
    }

    /// Unmap `[gpa, gpa+size)` (4 KiB aligned). Every page must be mapped, else
    /// [`Stage2Error::NotMapped`]; a 2 MiB page only partly inside the range is refused as
    /// [`Stage2Error::Misaligned`] (the kernel only unmaps whole mappings, and `map` puts large
    /// pages only inside one mapping, so it never needs a split). On error nothing changes.
    /// Tables left empty are freed.
    pub fn unmap<M: TableMemory + ?Sized>(&mut self, mem: &mut M, gpa: u64, size: u64) -> Result<(), Stage2Error> {
        let end = Self::check_range(gpa, 0, size)?;
        if let Some(hole) = self.first_page(mem, gpa, end, false) {
            return Err(Stage2Error::NotMapped { gpa: hole });
        }
        for addr in [gpa, end - PAGE_SIZE_4K] {
            if let Walk::Leaf { level: 2, .. } = self.walk(mem, addr) {
                let base = addr & !(PAGE_SIZE_2M - 1);
                if base < gpa || end < base + PAGE_SIZE_2M {
                    return Err(Stage2Error::Misaligned { gpa, hpa: 0, size });
                }
            }
        }
        self.clear(mem, gpa, end);
        Ok(())
    }

    /// Clear every leaf wholly inside `[lo, hi)` and free every table on walks of that range
    /// that ends up empty (the root is kept). Large pages only partly inside are left alone
    /// (`unmap` refuses them). Never allocates, so it cannot fail.
    fn clear<M: TableMemory + ?Sized>(&mut self, mem: &mut M, lo: u64, hi: u64) {
        Self::clear_table(mem, self.root, ROOT_LEVEL, 0, lo, hi);
    }

    /// [`Stage2Map::clear`] for one table at `level` covering addresses from `base`. Returns
    /// true when the table is empty afterwards.
    fn clear_table<M: TableMemory + ?Sized>(mem: &mut M, table: u64, level: u8, base: u64, lo: u64, hi: u64) -> bool {
        let span = span(level);
        let table_end = base + span * ENTRIES_PER_TABLE as u64;
        let (lo, hi) = (lo.max(base), hi.min(table_end));
        if lo < hi {
            let first = ((lo - base) / span) as usize;
            let last = ((hi - base).div_ceil(span)) as usize;
            for i in first..last {
                let entry = mem.read_entry(table, i);
                if !F::is_present(entry) {
                    continue;
                }
                let entry_base = base + i as u64 * span;
                if level == 1 || (level == 2 && F::is_large(entry)) {
                    if lo <= entry_base && entry_base + span <= hi {
                        mem.write_entry(table, i, 0);
                    }
                    continue;
                }
                let child = F::table_address(entry);
                if Self::clear_table(mem, child, level - 1, entry_base, lo, hi) {
                    // Unlink before freeing so the walker never sees a freed table.
                    mem.write_entry(table, i, 0);
                    mem.free_table(child);
                }
            }
        }
        (0..ENTRIES_PER_TABLE).all(|i| !F::is_present(mem.read_entry(table, i)))
    }

    #[cfg(test)]
    /// Translate `gpa`: the host-physical address (with the page offset), permissions, memory
    /// type and page size, or `None` if unmapped or beyond the 48-bit space.
    pub fn translate<M: TableMemory + ?Sized>(&self, mem: &M, gpa: u64) -> Option<Translation> {
        if gpa >= GPA_LIMIT {
            return None;
        }
        match self.walk(mem, gpa) {
            Walk::Hole { .. } => None,
            Walk::Leaf { level, entry, .. } => {
                let page_size = if level == 1 { PageSize::Size4K } else { PageSize::Size2M };
                let offset = gpa & (page_size.bytes() - 1);
                Some(Translation {
                    hpa: F::leaf_address(entry, page_size) + offset,
                    access: F::access(entry),
                    mem_type: F::mem_type(entry),
                    page_size,
                })
            }
        }
    }

    /// Free every table, root included. The map is consumed: its root must no longer be in
    /// any VMCB, and the guest's TLB entries must be flushed before the frames are reused.
    pub fn destroy<M: TableMemory + ?Sized>(self, mem: &mut M) {
        Self::free_tree(mem, self.root, ROOT_LEVEL);
    }

    /// Free `table` (at `level`) and every table below it.
    fn free_tree<M: TableMemory + ?Sized>(mem: &mut M, table: u64, level: u8) {
        if level > 1 {
            for i in 0..ENTRIES_PER_TABLE {
                let entry = mem.read_entry(table, i);
                if F::is_present(entry) && !(level == 2 && F::is_large(entry)) {
                    Self::free_tree(mem, F::table_address(entry), level - 1);
                }
            }
        }
        mem.free_table(table);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::npt::Npt;
    use proptest::prelude::*;
    use std::boxed::Box;
    use std::collections::{BTreeMap, BTreeSet};
    use std::vec::Vec;

    const MIB: u64 = 1 << 20;

    /// Test table memory: tables are boxed arrays at fake physical addresses
    /// `TABLE_BASE + slot * 4096`, with an optional cap on live tables and counters to catch
    /// leaks, double frees and accesses to freed tables (those panic: they are test failures).
    pub(crate) struct TestMem {
        slots: Vec<Option<Box<[u64; 512]>>>,
        free_slots: Vec<usize>,
        pub(crate) limit: Option<usize>,
        pub(crate) allocs: usize,
        pub(crate) frees: usize,
        /// Fill new tables with garbage, to check that the map zeroes them.
        dirty: bool,
    }

    const TABLE_BASE: u64 = 0x4000_0000;

    impl TestMem {
        pub(crate) fn new() -> Self {
            Self { slots: Vec::new(), free_slots: Vec::new(), limit: None, allocs: 0, frees: 0, dirty: false }
        }

        pub(crate) fn with_limit(limit: usize) -> Self {
            Self { limit: Some(limit), ..Self::new() }
        }

        pub(crate) fn live(&self) -> usize {
            self.allocs - self.frees
        }

        fn slot(table: u64) -> usize {
            assert_eq!(table % 4096, 0, "unaligned table {table:#x}");
            assert!(table >= TABLE_BASE, "bad table {table:#x}");
            ((table - TABLE_BASE) / 4096) as usize
        }

        fn get(&self, table: u64) -> &[u64; 512] {
            self.slots[Self::slot(table)].as_deref().unwrap_or_else(|| panic!("access to freed table {table:#x}"))
        }
    }

    impl TableMemory for TestMem {
        fn alloc_table(&mut self) -> Option<u64> {
            if self.limit.is_some_and(|l| self.live() >= l) {
                return None;
            }
            let fill = if self.dirty { u64::MAX } else { 0 };
            let table = Box::new([fill; 512]);
            let slot = match self.free_slots.pop() {
                Some(s) => {
                    self.slots[s] = Some(table);
                    s
                }
                None => {
                    self.slots.push(Some(table));
                    self.slots.len() - 1
                }
            };
            self.allocs += 1;
            Some(TABLE_BASE + slot as u64 * 4096)
        }

        fn free_table(&mut self, table: u64) {
            let slot = Self::slot(table);
            assert!(self.slots[slot].take().is_some(), "double free {table:#x}");
            self.free_slots.push(slot);
            self.frees += 1;
        }

        fn read_entry(&self, table: u64, index: usize) -> u64 {
            self.get(table)[index]
        }

        fn write_entry(&mut self, table: u64, index: usize, entry: u64) {
            let slot = Self::slot(table);
            self.slots[slot].as_deref_mut().unwrap_or_else(|| panic!("write to freed table {table:#x}"))[index] = entry;
        }
    }

    /// Every table reachable from the root, checking that non-root tables are non-empty.
    fn reachable_tables(map: &NptMap, mem: &TestMem) -> usize {
        fn walk(mem: &TestMem, table: u64, level: u8, is_root: bool) -> usize {
            let mut count = 1;
            let mut present = 0;
            for i in 0..512 {
                let e = mem.read_entry(table, i);
                if !Npt::is_present(e) {
                    continue;
                }
                present += 1;
                if level > 1 && !(level == 2 && Npt::is_large(e)) {
                    count += walk(mem, Npt::table_address(e), level - 1, false);
                }
            }
            assert!(is_root || present > 0, "empty non-root table {table:#x}");
            count
        }
        walk(mem, map.root(), ROOT_LEVEL, true)
    }

    fn new_map(mem: &mut TestMem) -> NptMap {
        NptMap::new(mem).unwrap()
    }

    /// Full dump of every mapped 4 KiB page in [lo, hi), for before/after comparisons.
    fn snapshot(map: &NptMap, mem: &TestMem, lo: u64, hi: u64) -> Vec<(u64, Translation)> {
        (lo..hi).step_by(4096).filter_map(|g| map.translate(mem, g).map(|t| (g, t))).collect()
    }

    #[test]
    fn map_translate_roundtrip_4k() {
        let mut mem = TestMem::new();
        let mut map = new_map(&mut mem);
        map.map(&mut mem, 0x1000, 0x20_3000, 0x3000, Access::RW, MemType::WriteBack).unwrap();
        let t = map.translate(&mem, 0x1abc).unwrap();
        assert_eq!(
            t,
            Translation {
                hpa: 0x20_3abc,
                access: Access::RW,
                mem_type: MemType::WriteBack,
                page_size: PageSize::Size4K
            }
        );
        assert_eq!(map.translate(&mem, 0x3fff).unwrap().hpa, 0x20_5fff);
        assert_eq!(map.translate(&mem, 0x0), None);
        assert_eq!(map.translate(&mem, 0x4000), None);
        // Root + PDPT + PD + PT.
        assert_eq!(mem.live(), 4);
        assert_eq!(reachable_tables(&map, &mem), 4);
    }

    #[test]
    fn large_pages_when_aligned() {
        let mut mem = TestMem::new();
        let mut map = new_map(&mut mem);
        map.map(&mut mem, 0, 0x4000_0000, 8 * MIB, Access::all(), MemType::WriteBack).unwrap();
        for g in (0..8 * MIB).step_by(0x1000 * 37) {
            let t = map.translate(&mem, g).unwrap();
            assert_eq!(t.page_size, PageSize::Size2M);
            assert_eq!(t.hpa, 0x4000_0000 + g);
        }
        // Root + PDPT + PD: no page tables at all.
        assert_eq!(mem.live(), 3);
    }

    #[test]
    fn mixed_alignment() {
        let mut mem = TestMem::new();
        let mut map = new_map(&mut mem);
        // gpa 2M-aligned after 1 MiB; hpa shares the same offset, so the middle is large.
        let gpa = MIB;
        let hpa = 0x1000_0000 + MIB;
        map.map(&mut mem, gpa, hpa, 6 * MIB, Access::RW, MemType::WriteBack).unwrap();
        let size_at = |g: u64| map.translate(&mem, g).unwrap().page_size;
        assert_eq!(size_at(MIB), PageSize::Size4K);
        assert_eq!(size_at(2 * MIB), PageSize::Size2M);
        assert_eq!(size_at(4 * MIB), PageSize::Size2M);
        assert_eq!(size_at(6 * MIB), PageSize::Size4K);
        assert_eq!(size_at(7 * MIB - 1), PageSize::Size4K);
        assert_eq!(map.translate(&mem, 7 * MIB), None);
        for g in (MIB..7 * MIB).step_by(0x1000) {
            assert_eq!(map.translate(&mem, g).unwrap().hpa, hpa + (g - gpa));
        }

        // gpa and hpa 2M-aligned differently: only 4 KiB pages.
        let mut map2 = new_map(&mut mem);
        map2.map(&mut mem, 0, 0x1000, 4 * MIB, Access::RW, MemType::WriteBack).unwrap();
        assert!((0..4 * MIB).step_by(0x1000).all(|g| map2.translate(&mem, g).unwrap().page_size == PageSize::Size4K));
        // Less than 2 MiB left: 4 KiB pages even when aligned.
        let mut map3 = new_map(&mut mem);
        map3.map(&mut mem, 0, 0, 2 * MIB - 0x1000, Access::RW, MemType::WriteBack).unwrap();
        assert_eq!(map3.translate(&mem, 0).unwrap().page_size, PageSize::Size4K);
    }

    #[test]
    fn permissions_and_mem_type_preserved() {
        let mut mem = TestMem::new();
        let mut map = new_map(&mut mem);
        let cases = [
            (Access::READ, MemType::WriteBack),
            (Access::RW, MemType::Uncached),
            (Access::READ.union(Access::EXEC), MemType::WriteBack),
            (Access::all(), MemType::Uncached),
        ];
        for (k, (access, mem_type)) in cases.iter().enumerate() {
            let k = k as u64;
            // One 4 KiB page and one 2 MiB page per case.
            map.map(&mut mem, k * 0x1000, 0x9000_0000 + k * 0x1000, 0x1000, *access, *mem_type).unwrap();
            let g2 = 0x4000_0000 + k * 2 * MIB;
            map.map(&mut mem, g2, g2, 2 * MIB, *access, *mem_type).unwrap();
            let t = map.translate(&mem, k * 0x1000).unwrap();
            assert_eq!((t.access, t.mem_type), (*access, *mem_type));
            let t = map.translate(&mem, g2 + 0x1234).unwrap();
            assert_eq!((t.access, t.mem_type, t.page_size), (*access, *mem_type, PageSize::Size2M));
        }
        for bad in
            [Access::empty(), Access::WRITE, Access::EXEC, Access::WRITE | Access::EXEC, Access::from_bits_retain(0x9)]
        {
            assert_eq!(
                map.map(&mut mem, 0x10_0000, 0, 0x1000, bad, MemType::WriteBack),
                Err(Stage2Error::BadAccess { access: bad })
            );
        }
    }

    #[test]
    fn overlap_errors_leave_map_unchanged() {
        let mut mem = TestMem::new();
        let mut map = new_map(&mut mem);
        map.map(&mut mem, 4 * MIB, 4 * MIB, 2 * MIB, Access::RW, MemType::WriteBack).unwrap();
        map.map(&mut mem, 0x1000, 0x1000, 0x1000, Access::RW, MemType::WriteBack).unwrap();
        let before = snapshot(&map, &mem, 0, 16 * MIB);
        let live = mem.live();
        // Overlapping the tail of a large range with fresh space before it.
        assert_eq!(
            map.map(&mut mem, 2 * MIB, 0, 4 * MIB, Access::RW, MemType::WriteBack),
            Err(Stage2Error::AlreadyMapped { gpa: 4 * MIB })
        );
        // Overlapping a single 4 KiB page in the middle.
        assert_eq!(
            map.map(&mut mem, 0, 0x10_0000, 0x4000, Access::RW, MemType::WriteBack),
            Err(Stage2Error::AlreadyMapped { gpa: 0x1000 })
        );
        // Overlapping inside a large page at an unaligned gpa.
        assert_eq!(
            map.map(&mut mem, 5 * MIB + 0x3000, 0, 0x1000, Access::RW, MemType::WriteBack),
            Err(Stage2Error::AlreadyMapped { gpa: 5 * MIB + 0x3000 })
        );
        assert_eq!(snapshot(&map, &mem, 0, 16 * MIB), before);
        assert_eq!(mem.live(), live);
        assert_eq!(reachable_tables(&map, &mem), live);
    }

    #[test]
    fn argument_validation() {
        let mut mem = TestMem::new();
        let mut map = new_map(&mut mem);
        let rw = Access::RW;
        let wb = MemType::WriteBack;
        assert_eq!(
            map.map(&mut mem, 0x1001, 0, 0x1000, rw, wb),
            Err(Stage2Error::Misaligned { gpa: 0x1001, hpa: 0, size: 0x1000 })
        );
        assert!(matches!(map.map(&mut mem, 0, 0x10, 0x1000, rw, wb), Err(Stage2Error::Misaligned { .. })));
        assert!(matches!(map.map(&mut mem, 0, 0, 0x10, rw, wb), Err(Stage2Error::Misaligned { .. })));
        assert_eq!(map.map(&mut mem, 0, 0, 0, rw, wb), Err(Stage2Error::ZeroSize { gpa: 0 }));
        assert_eq!(map.map(&mut mem, GPA_LIMIT, 0, 0x1000, rw, wb), Err(Stage2Error::OutOfRange { gpa: GPA_LIMIT }));
        assert_eq!(
            map.map(&mut mem, GPA_LIMIT - 0x1000, 0, 0x2000, rw, wb),
            Err(Stage2Error::OutOfRange { gpa: GPA_LIMIT })
        );
        assert_eq!(map.map(&mut mem, !0xfff_u64, 0, 0x2000, rw, wb), Err(Stage2Error::OutOfRange { gpa: !0xfff_u64 }));
        assert_eq!(map.map(&mut mem, 0, 1 << 52, 0x1000, rw, wb), Err(Stage2Error::HpaOutOfRange { hpa: 1 << 52 }));
        assert_eq!(
            map.map(&mut mem, 0, (1 << 52) - 0x1000, 0x2000, rw, wb),
            Err(Stage2Error::HpaOutOfRange { hpa: (1 << 52) - 0x1000 })
        );
        assert_eq!(
            map.map(&mut mem, 0, !0xfff_u64, 0x2000, rw, wb),
            Err(Stage2Error::HpaOutOfRange { hpa: !0xfff_u64 })
        );
        assert_eq!(
            map.unmap(&mut mem, 0x800, 0x1000),
            Err(Stage2Error::Misaligned { gpa: 0x800, hpa: 0, size: 0x1000 })
        );
        assert_eq!(map.unmap(&mut mem, 0, 0), Err(Stage2Error::ZeroSize { gpa: 0 }));
        assert_eq!(map.unmap(&mut mem, GPA_LIMIT, 0x1000), Err(Stage2Error::OutOfRange { gpa: GPA_LIMIT }));
        assert_eq!(map.translate(&mem, GPA_LIMIT), None);
        assert_eq!(map.translate(&mem, u64::MAX), None);
        // Highest mappable page works.
        map.map(&mut mem, GPA_LIMIT - 0x1000, (1 << 52) - 0x1000, 0x1000, rw, wb).unwrap();
        assert_eq!(map.translate(&mem, GPA_LIMIT - 1).unwrap().hpa, (1 << 52) - 1);
        // Nothing else was left behind by the failures: root + 3 tables for the last page.
        assert_eq!(mem.live(), 4);
    }

    #[test]
    fn unmap_4k_and_free_tables() {
        let mut mem = TestMem::new();
        let mut map = new_map(&mut mem);
        map.map(&mut mem, 0x1000, 0x1000, 0x3000, Access::RW, MemType::WriteBack).unwrap();
        assert_eq!(map.unmap(&mut mem, 0, 0x2000), Err(Stage2Error::NotMapped { gpa: 0 }));
        assert_eq!(map.unmap(&mut mem, 0x2000, 0x3000), Err(Stage2Error::NotMapped { gpa: 0x4000 }));
        assert_eq!(map.translate(&mem, 0x3000).unwrap().hpa, 0x3000);
        map.unmap(&mut mem, 0x2000, 0x1000).unwrap();
        assert_eq!(map.translate(&mem, 0x2000), None);
        assert!(map.translate(&mem, 0x1000).is_some());
        assert!(map.translate(&mem, 0x3000).is_some());
        assert_eq!(mem.live(), 4);
        map.unmap(&mut mem, 0x1000, 0x1000).unwrap();
        map.unmap(&mut mem, 0x3000, 0x1000).unwrap();
        // Only the root is left.
        assert_eq!(mem.live(), 1);
        assert_eq!(reachable_tables(&map, &mem), 1);
    }

    #[test]
    fn unmap_refuses_to_cut_a_large_page() {
        let mut mem = TestMem::new();
        let mut map = new_map(&mut mem);
        map.map(&mut mem, 2 * MIB, 0x8000_0000, 4 * MIB, Access::READ.union(Access::EXEC), MemType::Uncached).unwrap();
        assert_eq!(mem.live(), 3);
        let before = snapshot(&map, &mem, 2 * MIB, 6 * MIB);
        // A hole spanning the boundary between the two large pages, one inside a large page,
        // and a range ending inside one: refused, nothing changed.
        for (gpa, size) in [(4 * MIB - 0x2000, 0x5000), (3 * MIB, 0x1000), (2 * MIB, 3 * MIB)] {
            assert_eq!(map.unmap(&mut mem, gpa, size), Err(Stage2Error::Misaligned { gpa, hpa: 0, size }));
            assert_eq!(snapshot(&map, &mem, 2 * MIB, 6 * MIB), before);
            assert_eq!(mem.live(), 3);
        }
        // Unmapping whole large pages needs no table, and frees the emptied ones.
        mem.limit = Some(mem.live());
        map.unmap(&mut mem, 4 * MIB, 2 * MIB).unwrap();
        assert_eq!(map.translate(&mem, 4 * MIB), None);
        assert_eq!(map.translate(&mem, 2 * MIB).unwrap().page_size, PageSize::Size2M);
        map.unmap(&mut mem, 2 * MIB, 2 * MIB).unwrap();
        assert_eq!(mem.live(), 1);
    }

    #[test]
    fn table_exhaustion_midway_is_clean() {
        // For each possible table budget, a mapping that needs many tables either succeeds or
        // fails leaving exactly the previous state.
        for budget in 1..12 {
            let mut mem = TestMem::with_limit(budget);
            let Ok(mut map) = NptMap::new(&mut mem) else { unreachable!("budget >= 1 holds the root") };
            // Pre-existing mapping sharing some tables with the new one.
            let pre = map.map(&mut mem, 0x3000, 0x3000, 0x1000, Access::RW, MemType::WriteBack);
            let before = snapshot(&map, &mem, 0, 8 * MIB);
            let live = mem.live();
            // Spans two PDPT entries (1 GiB boundary) with 4 KiB and 2 MiB pieces: needs
            // PDPT, 2 PDs and several PTs.
            let gpa = (1 << 30) - 2 * MIB - 0x1000;
            let res = map.map(&mut mem, gpa, gpa, 4 * MIB + 0x3000, Access::RW, MemType::WriteBack);
            match res {
                Ok(()) => {
                    assert!(pre.is_ok());
                    assert_eq!(map.translate(&mem, gpa).unwrap().hpa, gpa);
                }
                Err(e) => {
                    assert_eq!(e, Stage2Error::NoTableMemory);
                    assert_eq!(snapshot(&map, &mem, 0, 8 * MIB), before);
                    assert_eq!(snapshot(&map, &mem, gpa, gpa + 4 * MIB + 0x3000), Vec::new());
                    assert_eq!(mem.live(), live, "leak with budget {budget}");
                }
            }
            assert_eq!(reachable_tables(&map, &mem), mem.live());
            map.destroy(&mut mem);
            assert_eq!(mem.live(), 0);
        }
        // No memory even for the root.
        let mut mem = TestMem::with_limit(0);
        assert_eq!(NptMap::new(&mut mem).err(), Some(Stage2Error::NoTableMemory));
    }

    #[test]
    fn destroy_frees_everything() {
        let mut mem = TestMem::new();
        let mut map = new_map(&mut mem);
        map.map(&mut mem, 0, 0, 3 * MIB, Access::all(), MemType::WriteBack).unwrap();
        map.map(&mut mem, 1 << 40, 0x1000, 0x5000, Access::RW, MemType::Uncached).unwrap();
        map.map(&mut mem, 1 << 45, 1 << 45, 64 * MIB, Access::RW, MemType::WriteBack).unwrap();
        assert!(mem.live() > 5);
        assert_eq!(reachable_tables(&map, &mem), mem.live());
        map.destroy(&mut mem);
        assert_eq!(mem.live(), 0);
        assert_eq!(mem.allocs, mem.frees);
    }

    #[test]
    fn dirty_table_memory_is_zeroed() {
        let mut mem = TestMem::new();
        mem.dirty = true;
        let mut map = new_map(&mut mem);
        assert_eq!(map.translate(&mem, 0), None);
        map.map(&mut mem, 0x5000, 0x5000, 0x1000, Access::RW, MemType::WriteBack).unwrap();
        assert_eq!(map.translate(&mem, 0x4000), None);
        assert_eq!(map.translate(&mem, 0x5000).unwrap().hpa, 0x5000);
    }

    /// Table memory returning unusable addresses.
    struct BadMem {
        inner: TestMem,
        addr: u64,
        freed: Vec<u64>,
    }

    impl TableMemory for BadMem {
        fn alloc_table(&mut self) -> Option<u64> {
            Some(self.addr)
        }
        fn free_table(&mut self, table: u64) {
            self.freed.push(table);
        }
        fn read_entry(&self, table: u64, index: usize) -> u64 {
            self.inner.read_entry(table, index)
        }
        fn write_entry(&mut self, table: u64, index: usize, entry: u64) {
            self.inner.write_entry(table, index, entry)
        }
    }

    #[test]
    fn bad_table_addresses_are_refused() {
        for addr in [0x1234, 1 << 52] {
            let mut mem = BadMem { inner: TestMem::new(), addr, freed: Vec::new() };
            assert_eq!(NptMap::new(&mut mem).err(), Some(Stage2Error::BadTable { addr }));
            assert_eq!(mem.freed, [addr]);
        }
    }

    #[test]
    fn map_into_existing_page_table_uses_small_pages() {
        // Adjacent ranges: the first two share one page table, the next aligned block still
        // gets a large page of its own.
        let mut mem = TestMem::new();
        let mut map = new_map(&mut mem);
        map.map(&mut mem, 0, 0, 0x1000, Access::RW, MemType::WriteBack).unwrap();
        map.map(&mut mem, 0x1000, 0x1000, 2 * MIB - 0x1000, Access::RW, MemType::WriteBack).unwrap();
        map.map(&mut mem, 2 * MIB, 2 * MIB, 2 * MIB, Access::RW, MemType::WriteBack).unwrap();
        assert_eq!(map.translate(&mem, 0x20_0000).unwrap().page_size, PageSize::Size2M);
        assert_eq!(map.translate(&mem, 0x1f_f000).unwrap().page_size, PageSize::Size4K);
    }

    #[test]
    fn debug_names_the_root() {
        assert!(format!("{:?}", NptMap::new(&mut TestMem::new()).unwrap()).contains("root"));
    }

    // ---- property test against a model ----------------------------------------------------

    /// Guest-physical space the property test uses: 3 large-page blocks around a 1 GiB
    /// boundary plus a far-away one, so table creation/freeing at every level is exercised.
    const REGIONS: [u64; 2] = [(1 << 30) - 4 * MIB, 1 << 39];
    const REGION_SIZE: u64 = 8 * MIB;

    #[derive(Clone, Debug)]
    enum Op {
        Map { gpa: u64, hpa: u64, size: u64, access: Access, mem_type: MemType },
        Unmap { gpa: u64, size: u64 },
    }

    fn arb_gpa_range() -> impl Strategy<Value = (u64, u64)> {
        // Sizes and offsets in 4 KiB pages, biased so 2 MiB alignment happens often.
        (
            0..REGIONS.len(),
            prop_oneof![(0u64..4).prop_map(|b| b * 512), 0u64..(REGION_SIZE / 4096)],
            prop_oneof![(1u64..3).prop_map(|b| b * 512), 1u64..1200, 1u64..8],
        )
            .prop_map(|(r, off, pages)| {
                let gpa = REGIONS[r] + off * 4096;
                let max = REGIONS[r] + REGION_SIZE - gpa;
                (gpa, (pages * 4096).min(max))
            })
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        let access = prop_oneof![
            Just(Access::READ),
            Just(Access::RW),
            Just(Access::READ.union(Access::EXEC)),
            Just(Access::all()),
            Just(Access::WRITE),
        ];
        let mem_type = prop_oneof![Just(MemType::WriteBack), Just(MemType::Uncached)];
        prop_oneof![
            (arb_gpa_range(), prop_oneof![Just(0u64), 0u64..8, 0u64..0x1000], access, mem_type).prop_map(
                |((gpa, size), hpa_off, access, mem_type)| {
                    // hpa_off 0: same 2 MiB phase as gpa (large pages possible).
                    let hpa = 0x10_0000_0000 + (gpa % (1 << 30)) + hpa_off * 4096;
                    Op::Map { gpa, hpa, size, access, mem_type }
                }
            ),
            arb_gpa_range().prop_map(|(gpa, size)| Op::Unmap { gpa, size }),
        ]
    }

    type Model = BTreeMap<u64, (u64, Access, MemType)>;

    fn check_against_model(map: &NptMap, mem: &TestMem, model: &Model) {
        for &base in &REGIONS {
            for g in (base..base + REGION_SIZE).step_by(4096) {
                let got = map.translate(mem, g + 0x123).map(|t| (t.hpa - 0x123, t.access, t.mem_type));
                assert_eq!(got, model.get(&g).copied(), "gpa {g:#x}");
            }
        }
        assert_eq!(reachable_tables(map, mem), mem.live(), "leaked tables");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn prop_map_unmap_matches_model(
            ops in prop::collection::vec(arb_op(), 1..25),
            budget in prop_oneof![Just(None), (4usize..14).prop_map(Some)],
        ) {
            let mut mem = TestMem::new();
            mem.limit = budget;
            let mut map = new_map(&mut mem);
            let mut model = Model::new();
            for op in &ops {
                match *op {
                    Op::Map { gpa, hpa, size, access, mem_type } => {
                        let pages: Vec<u64> = (gpa..gpa + size).step_by(4096).collect();
                        let clash = pages.iter().find(|g| model.contains_key(g)).copied();
                        let res = map.map(&mut mem, gpa, hpa, size, access, mem_type);
                        if !access.contains(Access::READ) {
                            prop_assert_eq!(res, Err(Stage2Error::BadAccess { access }));
                        } else if let Some(g) = clash {
                            prop_assert_eq!(res, Err(Stage2Error::AlreadyMapped { gpa: g }));
                        } else {
                            match res {
                                Ok(()) => {
                                    for g in pages {
                                        model.insert(g, (hpa + (g - gpa), access, mem_type));
                                    }
                                    // Large pages exactly where allowed.
                                    let mut g = gpa;
                                    while g < gpa + size {
                                        let t = map.translate(&mem, g).unwrap();
                                        let h = hpa + (g - gpa);
                                        if t.page_size == PageSize::Size2M {
                                            prop_assert!((g | h) & (PAGE_SIZE_2M - 1) == 0);
                                            prop_assert!(gpa + size - g >= PAGE_SIZE_2M);
                                            g += PAGE_SIZE_2M;
                                        } else {
                                            g += 4096;
                                        }
                                    }
                                }
                                Err(e) => prop_assert_eq!(e, Stage2Error::NoTableMemory),
                            }
                        }
                    }
                    Op::Unmap { gpa, size } => {
                        let pages: Vec<u64> = (gpa..gpa + size).step_by(4096).collect();
                        let hole = pages.iter().find(|g| !model.contains_key(g)).copied();
                        // A 2 MiB page at either end only partly inside the range.
                        let cuts = |g: u64| {
                            map.translate(&mem, g).is_some_and(|t| t.page_size == PageSize::Size2M)
                                && (g & !(PAGE_SIZE_2M - 1) < gpa || gpa + size < (g | (PAGE_SIZE_2M - 1)) + 1)
                        };
                        let cut = cuts(gpa) || cuts(gpa + size - 4096);
                        let res = map.unmap(&mut mem, gpa, size);
                        if let Some(g) = hole {
                            prop_assert_eq!(res, Err(Stage2Error::NotMapped { gpa: g }));
                        } else if cut {
                            prop_assert_eq!(res, Err(Stage2Error::Misaligned { gpa, hpa: 0, size }));
                        } else {
                            prop_assert_eq!(res, Ok(()));
                            for g in pages {
                                model.remove(&g);
                            }
                        }
                    }
                }
                check_against_model(&map, &mem, &model);
            }
            // Unmap everything that is left, page by page (a large page whole): only the root
            // remains.
            let pages: BTreeSet<u64> = model.keys().copied().collect();
            for g in pages {
                match map.translate(&mem, g) {
                    Some(t) if t.page_size == PageSize::Size2M => {
                        prop_assert_eq!(map.unmap(&mut mem, g & !(PAGE_SIZE_2M - 1), PAGE_SIZE_2M), Ok(()));
                    }
                    Some(_) => prop_assert_eq!(map.unmap(&mut mem, g, 4096), Ok(())),
                    None => {}
                }
            }
            prop_assert_eq!(mem.live(), 1);
            map.destroy(&mut mem);
            prop_assert_eq!(mem.live(), 0);
        }
    }
}

//! `hvm_start_info` (Xen PVH boot ABI, version 1): byte-exact readers and writers.
//!
//! A PVH guest is entered with EBX holding the guest-physical address of an `hvm_start_info`.
//! The microvisor (and later dom0) builds one for every domain it boots with
//! [`build_start_page`]: the structure, its memory map, module list and command line all live in
//! a single guest page, so one page of guest RAM is all the loader has to reserve and the
//! domain can reach everything with paging off. [`parse_start_page`] is the matching reader,
//! used by tests and by domains reading their own start page.
//!
//! Every structure is encoded and decoded field by field in little endian rather than by
//! transmuting, so the code is `unsafe`-free and the bytes a guest sees never depend on host
//! layout. The `#[repr(C)]` structs mirror the C ABI for documentation and for callers that
//! compare against `size_of`; compile-time assertions keep the two in step. Everything read is
//! treated as untrusted: no panics, no unchecked offsets, no heap.

use core::fmt;
use core::slice::ChunksExact;

/// `hvm_start_info.magic`: `XEN_HVM_START_MAGIC_VALUE`.
pub const MAGIC: u32 = 0x336e_c578;
/// The `hvm_start_info` version we write; version 1 added the memory map.
pub const VERSION: u32 = 1;
/// Size of the start page [`build_start_page`] fills.
pub const PAGE_SIZE: usize = 4096;

/// `XEN_HVM_MEMMAP_TYPE_RAM`: usable RAM.
pub const MEMMAP_RAM: u32 = 1;
/// `XEN_HVM_MEMMAP_TYPE_RESERVED`.
pub const MEMMAP_RESERVED: u32 = 2;
/// `XEN_HVM_MEMMAP_TYPE_ACPI`: ACPI tables, reclaimable after they are parsed.
pub const MEMMAP_ACPI: u32 = 3;
/// `XEN_HVM_MEMMAP_TYPE_NVS`: ACPI non-volatile storage.
pub const MEMMAP_NVS: u32 = 4;
/// `XEN_HVM_MEMMAP_TYPE_UNUSABLE`: RAM with errors.
pub const MEMMAP_UNUSABLE: u32 = 5;
/// `XEN_HVM_MEMMAP_TYPE_DISABLED`.
pub const MEMMAP_DISABLED: u32 = 6;
/// `XEN_HVM_MEMMAP_TYPE_PMEM`: persistent memory.
pub const MEMMAP_PERSISTENT: u32 = 7;

/// Why start info bytes could not be read or a start page could not be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartInfoError {
    /// Fewer bytes were given than the structure needs.
    Truncated {
        /// C name of the structure.
        what: &'static str,
        /// Bytes the structure needs.
        needed: usize,
        /// Bytes that were given.
        available: usize,
    },
    /// `hvm_start_info.magic` is not [`MAGIC`].
    BadMagic {
        /// The value found.
        found: u32,
    },
    /// `hvm_start_info.version` is 0; the memory map needs version 1 or later.
    UnsupportedVersion {
        /// The value found.
        found: u32,
    },
    /// Writer: the named region would run past the end of the start page.
    DoesNotFit {
        /// Which region ("memory map", "module list", "command line").
        what: &'static str,
        /// Size of that region in bytes (saturated).
        len: usize,
        /// Page offset one past its last byte (saturated).
        end: usize,
    },
    /// Writer: the command line contains a NUL byte, which would silently truncate it.
    CmdlineContainsNul {
        /// Byte offset of the first NUL within the command line.
        offset: usize,
    },
    /// Writer: the page's last byte, `page_gpa + PAGE_SIZE - 1`, is beyond the 64-bit address
    /// space, so some of the page has no guest-physical address to point at.
    BadPageAddress {
        /// The page address given.
        page_gpa: u64,
    },
    /// Reader: a pointer field refers to memory that is not entirely inside the start page.
    OutsidePage {
        /// Name of the `hvm_start_info` field holding the pointer.
        field: &'static str,
        /// The guest-physical address found in the field.
        paddr: u64,
        /// Bytes the field's target needs (saturated).
        len: u64,
        /// Guest-physical address of the start page.
        page_gpa: u64,
        /// Size of the start page in bytes.
        page_size: usize,
    },
    /// Reader: no NUL terminates the command line before the end of the page.
    CmdlineUnterminated {
        /// `hvm_start_info.cmdline_paddr`.
        paddr: u64,
    },
}

impl fmt::Display for StartInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            StartInfoError::Truncated { what, needed, available } => {
                write!(f, "{what} truncated: needs {needed} bytes, only {available} available")
            }
            StartInfoError::BadMagic { found } => {
                write!(f, "hvm_start_info.magic is {found:#010x}, expected {MAGIC:#010x}")
            }
            StartInfoError::UnsupportedVersion { found } => {
                write!(f, "hvm_start_info.version is {found}, expected 1 or later")
            }
            StartInfoError::DoesNotFit { what, len, end } => write!(
                f,
                "start page overflow: {what} ({len} bytes) would end at page offset {end}, \
                 past the end of the {PAGE_SIZE}-byte page"
            ),
            StartInfoError::CmdlineContainsNul { offset } => {
                write!(f, "command line contains a NUL byte at offset {offset}")
            }
            StartInfoError::BadPageAddress { page_gpa } => write!(
                f,
                "start page at guest-physical {page_gpa:#x} wraps past the top of the 64-bit \
                 address space"
            ),
            StartInfoError::OutsidePage { field, paddr, len, page_gpa, page_size } => write!(
                f,
                "hvm_start_info.{field} = {paddr:#x} ({len} bytes) is not inside the start page \
                 [{page_gpa:#x}, {:#x})",
                page_gpa.saturating_add(page_size as u64)
            ),
            StartInfoError::CmdlineUnterminated { paddr } => write!(
                f,
                "command line at hvm_start_info.cmdline_paddr = {paddr:#x} has no NUL before the \
                 end of the start page"
            ),
        }
    }
}

impl core::error::Error for StartInfoError {}

/// Little-endian field reader over a slice whose length was checked by the caller; reads past
/// the end yield `None` instead of panicking.
struct LeReader<'a>(&'a [u8]);

impl LeReader<'_> {
    fn u32(&mut self) -> Option<u32> {
        let (head, tail) = self.0.split_first_chunk::<4>()?;
        self.0 = tail;
        Some(u32::from_le_bytes(*head))
    }

    fn u64(&mut self) -> Option<u64> {
        let (head, tail) = self.0.split_first_chunk::<8>()?;
        self.0 = tail;
        Some(u64::from_le_bytes(*head))
    }
}

/// Little-endian field writer over a fixed-size output array. Only used on arrays whose size
/// is the exact sum of the fields written (asserted by tests), so no write is ever dropped.
struct LeWriter<'a>(&'a mut [u8]);

impl LeWriter<'_> {
    fn put<const N: usize>(&mut self, bytes: [u8; N]) {
        if let Some((head, tail)) = core::mem::take(&mut self.0).split_first_chunk_mut::<N>() {
            *head = bytes;
            self.0 = tail;
        }
    }

    fn u32(&mut self, v: u32) {
        self.put(v.to_le_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.put(v.to_le_bytes());
    }
}

fn check_len(what: &'static str, needed: usize, bytes: &[u8]) -> Result<(), StartInfoError> {
    if bytes.len() < needed {
        Err(StartInfoError::Truncated { what, needed, available: bytes.len() })
    } else {
        Ok(())
    }
}

/// `struct hvm_start_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartInfo {
    /// Must be [`MAGIC`].
    pub magic: u32,
    /// Structure version; 1 or later.
    pub version: u32,
    /// `SIF_*` flags.
    pub flags: u32,
    /// Number of entries at `modlist_paddr`.
    pub nr_modules: u32,
    /// Guest-physical address of an array of `hvm_modlist_entry`.
    pub modlist_paddr: u64,
    /// Guest-physical address of the NUL-terminated command line; 0 if none.
    pub cmdline_paddr: u64,
    /// Guest-physical address of the ACPI RSDP; 0 if none.
    pub rsdp_paddr: u64,
    /// Guest-physical address of an array of `hvm_memmap_table_entry` (version >= 1).
    pub memmap_paddr: u64,
    /// Number of entries at `memmap_paddr`.
    pub memmap_entries: u32,
    /// Must be zero.
    pub reserved: u32,
}

impl StartInfo {
    /// Encoded size in bytes.
    pub const SIZE: usize = 56;

    /// Decodes the first [`SIZE`](Self::SIZE) bytes of `bytes` (longer input is allowed so a
    /// whole page can be passed). Does not validate; see [`validate`](Self::validate).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StartInfoError> {
        const WHAT: &str = "hvm_start_info";
        check_len(WHAT, Self::SIZE, bytes)?;
        let mut r = LeReader(bytes);
        let decoded = (|| {
            Some(Self {
                magic: r.u32()?,
                version: r.u32()?,
                flags: r.u32()?,
                nr_modules: r.u32()?,
                modlist_paddr: r.u64()?,
                cmdline_paddr: r.u64()?,
                rsdp_paddr: r.u64()?,
                memmap_paddr: r.u64()?,
                memmap_entries: r.u32()?,
                reserved: r.u32()?,
            })
        })();
        decoded.ok_or(StartInfoError::Truncated { what: WHAT, needed: Self::SIZE, available: bytes.len() })
    }

    /// Encodes the structure as the guest sees it.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        let mut w = LeWriter(&mut out);
        w.u32(self.magic);
        w.u32(self.version);
        w.u32(self.flags);
        w.u32(self.nr_modules);
        w.u64(self.modlist_paddr);
        w.u64(self.cmdline_paddr);
        w.u64(self.rsdp_paddr);
        w.u64(self.memmap_paddr);
        w.u32(self.memmap_entries);
        w.u32(self.reserved);
        out
    }

    /// Checks the fields that say whether this is a start info at all and whether it has a
    /// memory map: `magic` must be [`MAGIC`] and `version` at least 1.
    pub fn validate(&self) -> Result<(), StartInfoError> {
        if self.magic != MAGIC {
            return Err(StartInfoError::BadMagic { found: self.magic });
        }
        if self.version < 1 {
            return Err(StartInfoError::UnsupportedVersion { found: self.version });
        }
        Ok(())
    }
}

/// `struct hvm_modlist_entry`: one boot module (e.g. an initrd or a driver VM image).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModlistEntry {
    /// Guest-physical address of the module.
    pub paddr: u64,
    /// Size of the module in bytes.
    pub size: u64,
    /// Guest-physical address of the module's NUL-terminated command line; 0 if none.
    pub cmdline_paddr: u64,
    /// Must be zero.
    pub reserved: u64,
}

impl ModlistEntry {
    /// Encoded size in bytes.
    pub const SIZE: usize = 32;

    /// Decodes the first [`SIZE`](Self::SIZE) bytes of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StartInfoError> {
        const WHAT: &str = "hvm_modlist_entry";
        check_len(WHAT, Self::SIZE, bytes)?;
        let mut r = LeReader(bytes);
        let decoded =
            (|| Some(Self { paddr: r.u64()?, size: r.u64()?, cmdline_paddr: r.u64()?, reserved: r.u64()? }))();
        decoded.ok_or(StartInfoError::Truncated { what: WHAT, needed: Self::SIZE, available: bytes.len() })
    }

    /// Encodes the entry as the guest sees it.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        let mut w = LeWriter(&mut out);
        w.u64(self.paddr);
        w.u64(self.size);
        w.u64(self.cmdline_paddr);
        w.u64(self.reserved);
        out
    }
}

/// `struct hvm_memmap_table_entry`: one E820-style memory region.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemmapEntry {
    /// Guest-physical base address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// One of the `MEMMAP_*` constants (C field name `type`).
    pub r#type: u32,
    /// Must be zero.
    pub reserved: u32,
}

impl MemmapEntry {
    /// Encoded size in bytes.
    pub const SIZE: usize = 24;

    /// A region of the given type with `reserved` zero.
    pub const fn new(addr: u64, size: u64, r#type: u32) -> Self {
        Self { addr, size, r#type, reserved: 0 }
    }

    /// Decodes the first [`SIZE`](Self::SIZE) bytes of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StartInfoError> {
        const WHAT: &str = "hvm_memmap_table_entry";
        check_len(WHAT, Self::SIZE, bytes)?;
        let mut r = LeReader(bytes);
        let decoded = (|| Some(Self { addr: r.u64()?, size: r.u64()?, r#type: r.u32()?, reserved: r.u32()? }))();
        decoded.ok_or(StartInfoError::Truncated { what: WHAT, needed: Self::SIZE, available: bytes.len() })
    }

    /// Encodes the entry as the guest sees it.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        let mut w = LeWriter(&mut out);
        w.u64(self.addr);
        w.u64(self.size);
        w.u32(self.r#type);
        w.u32(self.reserved);
        out
    }
}

// The repr(C) structs must match the ABI sizes the byte encoders use.
const _: () = assert!(core::mem::size_of::<StartInfo>() == StartInfo::SIZE);
const _: () = assert!(core::mem::size_of::<ModlistEntry>() == ModlistEntry::SIZE);
const _: () = assert!(core::mem::size_of::<MemmapEntry>() == MemmapEntry::SIZE);

/// A boot module to list in the start info: where the loader put it and how big it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModuleSpec {
    /// Guest-physical address of the module.
    pub paddr: u64,
    /// Size of the module in bytes.
    pub size: u64,
}

/// Where each region goes in the start page; all offsets are page offsets.
struct Layout {
    memmap_off: usize,
    modlist_off: usize,
    cmdline_off: usize,
}

/// Computes the layout, naming the first region that does not fit.
fn layout(cmdline_len: usize, memmap_len: usize, modules_len: usize) -> Result<Layout, StartInfoError> {
    fn region(what: &'static str, off: usize, count: usize, elem: usize) -> Result<usize, StartInfoError> {
        let len = count.saturating_mul(elem);
        let end = off.saturating_add(len);
        if end > PAGE_SIZE {
            Err(StartInfoError::DoesNotFit { what, len, end })
        } else {
            Ok(end)
        }
    }
    let memmap_off = StartInfo::SIZE;
    let modlist_off = region("memory map", memmap_off, memmap_len, MemmapEntry::SIZE)?;
    let cmdline_off = region("module list", modlist_off, modules_len, ModlistEntry::SIZE)?;
    // The command line takes one extra byte for its NUL.
    region("command line", cmdline_off, cmdline_len.saturating_add(1), 1)?;
    Ok(Layout { memmap_off, modlist_off, cmdline_off })
}

/// Lays out a domain's complete start info in one guest page.
///
/// The page receives, in order: the `hvm_start_info` at offset 0, the memory map, the module
/// list and the NUL-terminated command line; every `*_paddr` field is `page_gpa` plus the
/// region's page offset. An empty memory map or module list gets a zero pointer; the command
/// line pointer is always set (to an empty string if `cmdline` is empty). Module entries get no
/// per-module command line.
///
/// The whole page is zeroed first so no stale host or other-domain data leaks into the guest.
/// On error nothing has been written.
pub fn build_start_page(
    page: &mut [u8; PAGE_SIZE],
    page_gpa: u64,
    cmdline: &[u8],
    memmap: &[MemmapEntry],
    modules: &[ModuleSpec],
    rsdp: u64,
) -> Result<(), StartInfoError> {
    if page_gpa.checked_add(PAGE_SIZE as u64 - 1).is_none() {
        return Err(StartInfoError::BadPageAddress { page_gpa });
    }
    if let Some(offset) = cmdline.iter().position(|&b| b == 0) {
        return Err(StartInfoError::CmdlineContainsNul { offset });
    }
    let l = layout(cmdline.len(), memmap.len(), modules.len())?;
    // Counts fit in u32 because they fit in the page; the fallback is unreachable.
    let too_big = |what, len| StartInfoError::DoesNotFit { what, len, end: usize::MAX };
    let memmap_entries = u32::try_from(memmap.len()).map_err(|_| too_big("memory map", memmap.len()))?;
    let nr_modules = u32::try_from(modules.len()).map_err(|_| too_big("module list", modules.len()))?;
    // Offsets are below PAGE_SIZE and page_gpa + PAGE_SIZE - 1 fits, so these cannot wrap.
    let gpa = |off: usize| page_gpa.saturating_add(off as u64);

    let info = StartInfo {
        magic: MAGIC,
        version: VERSION,
        flags: 0,
        nr_modules,
        modlist_paddr: if modules.is_empty() { 0 } else { gpa(l.modlist_off) },
        cmdline_paddr: gpa(l.cmdline_off),
        rsdp_paddr: rsdp,
        memmap_paddr: if memmap.is_empty() { 0 } else { gpa(l.memmap_off) },
        memmap_entries,
        reserved: 0,
    };

    page.fill(0);
    if let Some((head, rest)) = page.split_first_chunk_mut::<{ StartInfo::SIZE }>() {
        *head = info.to_bytes();
        // `rest` starts at page offset StartInfo::SIZE == l.memmap_off.
        for (entry, dst) in memmap.iter().zip(rest.chunks_exact_mut(MemmapEntry::SIZE)) {
            dst.copy_from_slice(&entry.to_bytes());
        }
    }
    let tail = page.get_mut(l.modlist_off..).unwrap_or_default();
    for (m, dst) in modules.iter().zip(tail.chunks_exact_mut(ModlistEntry::SIZE)) {
        let entry = ModlistEntry { paddr: m.paddr, size: m.size, cmdline_paddr: 0, reserved: 0 };
        dst.copy_from_slice(&entry.to_bytes());
    }
    // The NUL is already there from the fill.
    let end = l.cmdline_off.saturating_add(cmdline.len());
    if let Some(dst) = page.get_mut(l.cmdline_off..end) {
        dst.copy_from_slice(cmdline);
    }
    Ok(())
}

/// A start page read back by [`parse_start_page`], with every pointer resolved to a slice of
/// that page.
#[derive(Clone, Copy, Debug)]
pub struct ParsedStartInfo<'a> {
    info: StartInfo,
    cmdline: &'a [u8],
    memmap: &'a [u8],
    modules: &'a [u8],
}

impl<'a> ParsedStartInfo<'a> {
    /// The raw `hvm_start_info` (already validated).
    pub fn info(&self) -> &StartInfo {
        &self.info
    }

    /// The command line without its NUL; empty if `cmdline_paddr` was 0.
    pub fn cmdline(&self) -> &'a [u8] {
        self.cmdline
    }

    /// The memory map entries, in order.
    pub fn memmap(&self) -> MemmapIter<'a> {
        MemmapIter(self.memmap.chunks_exact(MemmapEntry::SIZE))
    }

    /// The module list entries, in order. Their `paddr`/`cmdline_paddr` are not resolved: they
    /// point outside the start page.
    pub fn modules(&self) -> ModlistIter<'a> {
        ModlistIter(self.modules.chunks_exact(ModlistEntry::SIZE))
    }

    /// `rsdp_paddr`: guest-physical address of the ACPI RSDP, 0 if none.
    pub fn rsdp(&self) -> u64 {
        self.info.rsdp_paddr
    }
}

/// Iterator over the memory map of a [`ParsedStartInfo`].
#[derive(Clone, Debug)]
pub struct MemmapIter<'a>(ChunksExact<'a, u8>);

impl Iterator for MemmapIter<'_> {
    type Item = MemmapEntry;

    fn next(&mut self) -> Option<MemmapEntry> {
        // Chunks are exactly SIZE bytes, so decoding cannot fail.
        self.0.next().and_then(|c| MemmapEntry::from_bytes(c).ok())
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl ExactSizeIterator for MemmapIter<'_> {}

/// Iterator over the module list of a [`ParsedStartInfo`].
#[derive(Clone, Debug)]
pub struct ModlistIter<'a>(ChunksExact<'a, u8>);

impl Iterator for ModlistIter<'_> {
    type Item = ModlistEntry;

    fn next(&mut self) -> Option<ModlistEntry> {
        // Chunks are exactly SIZE bytes, so decoding cannot fail.
        self.0.next().and_then(|c| ModlistEntry::from_bytes(c).ok())
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl ExactSizeIterator for ModlistIter<'_> {}

/// Returns the page offset of guest-physical `paddr` if the `len` bytes there lie entirely
/// inside `page`, which starts at guest-physical `page_gpa`.
fn resolve(
    page: &[u8],
    page_gpa: u64,
    field: &'static str,
    paddr: u64,
    len: u64,
) -> Result<core::ops::Range<usize>, StartInfoError> {
    let outside = StartInfoError::OutsidePage { field, paddr, len, page_gpa, page_size: page.len() };
    let off = paddr.checked_sub(page_gpa).ok_or(outside)?;
    let end = off.checked_add(len).ok_or(outside)?;
    let off = usize::try_from(off).map_err(|_| outside)?;
    let end = usize::try_from(end).map_err(|_| outside)?;
    if end > page.len() {
        return Err(outside);
    }
    Ok(off..end)
}

/// Reads a start page (as written by [`build_start_page`], or by any other PVH loader that
/// keeps everything in one page) that lives at guest-physical `page_gpa`.
///
/// Validates magic and version, then resolves `cmdline_paddr`, `memmap_paddr` and
/// `modlist_paddr`: each must point entirely inside `page` unless it is unused (a zero command
/// line pointer, or a zero entry count). `page` may be any length; it is usually 4096 bytes.
pub fn parse_start_page(page: &[u8], page_gpa: u64) -> Result<ParsedStartInfo<'_>, StartInfoError> {
    let info = StartInfo::from_bytes(page)?;
    info.validate()?;

    let cmdline = if info.cmdline_paddr == 0 {
        &[][..]
    } else {
        // At least the NUL must be inside the page; the string runs to the first NUL.
        let at = resolve(page, page_gpa, "cmdline_paddr", info.cmdline_paddr, 1)?;
        let rest = page.get(at.start..).unwrap_or_default();
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(StartInfoError::CmdlineUnterminated { paddr: info.cmdline_paddr })?;
        rest.get(..nul).unwrap_or_default()
    };

    let array = |field, paddr, count: u32, elem: usize| {
        if count == 0 {
            return Ok(&[][..]);
        }
        let len = u64::from(count).saturating_mul(elem as u64);
        let range = resolve(page, page_gpa, field, paddr, len)?;
        Ok(page.get(range).unwrap_or_default())
    };
    let memmap = array("memmap_paddr", info.memmap_paddr, info.memmap_entries, MemmapEntry::SIZE)?;
    let modules = array("modlist_paddr", info.modlist_paddr, info.nr_modules, ModlistEntry::SIZE)?;

    Ok(ParsedStartInfo { info, cmdline, memmap, modules })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GPA: u64 = 0x7000;

    fn sample_memmap() -> [MemmapEntry; 3] {
        [
            MemmapEntry::new(0, 0x9_f000, MEMMAP_RAM),
            MemmapEntry::new(0xf_0000, 0x1_0000, MEMMAP_RESERVED),
            MemmapEntry::new(0x10_0000, 0x3ff0_0000, MEMMAP_RAM),
        ]
    }

    fn sample_modules() -> [ModuleSpec; 2] {
        [ModuleSpec { paddr: 0x200_0000, size: 0x12345 }, ModuleSpec { paddr: 0x300_0000, size: 1 }]
    }

    #[test]
    fn sizes_match_abi() {
        assert_eq!(StartInfo::default().to_bytes().len(), 56);
        assert_eq!(ModlistEntry::default().to_bytes().len(), 32);
        assert_eq!(MemmapEntry::default().to_bytes().len(), 24);
    }

    #[test]
    fn start_info_encoding_is_little_endian_field_order() {
        let si = StartInfo {
            magic: MAGIC,
            version: 1,
            flags: 0x0302_0100,
            nr_modules: 2,
            modlist_paddr: 0x1122_3344_5566_7788,
            cmdline_paddr: 0x10,
            rsdp_paddr: 0x20,
            memmap_paddr: 0x30,
            memmap_entries: 4,
            reserved: 0xdead_beef,
        };
        let b = si.to_bytes();
        assert_eq!(&b[0..4], &[0x78, 0xc5, 0x6e, 0x33]);
        assert_eq!(&b[4..8], &[1, 0, 0, 0]);
        assert_eq!(&b[8..12], &[0, 1, 2, 3]);
        assert_eq!(&b[12..16], &[2, 0, 0, 0]);
        assert_eq!(&b[16..24], &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
        assert_eq!(b[24], 0x10);
        assert_eq!(b[32], 0x20);
        assert_eq!(b[40], 0x30);
        assert_eq!(&b[48..52], &[4, 0, 0, 0]);
        assert_eq!(&b[52..56], &[0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(StartInfo::from_bytes(&b), Ok(si));

        let m = MemmapEntry::new(0x1000, 0x2000, MEMMAP_ACPI);
        let mb = m.to_bytes();
        assert_eq!(&mb[16..20], &[3, 0, 0, 0]);
        assert_eq!(MemmapEntry::from_bytes(&mb), Ok(m));
        let e = ModlistEntry { paddr: 1, size: 2, cmdline_paddr: 3, reserved: 4 };
        let eb = e.to_bytes();
        assert_eq!(eb[0], 1);
        assert_eq!(eb[8], 2);
        assert_eq!(eb[16], 3);
        assert_eq!(eb[24], 4);
        assert_eq!(ModlistEntry::from_bytes(&eb), Ok(e));
    }

    #[test]
    fn from_bytes_truncated() {
        assert_eq!(
            StartInfo::from_bytes(&[0; 55]),
            Err(StartInfoError::Truncated { what: "hvm_start_info", needed: 56, available: 55 })
        );
        assert!(ModlistEntry::from_bytes(&[0; 31]).is_err());
        assert!(MemmapEntry::from_bytes(&[0; 23]).is_err());
        assert_eq!(
            StartInfo::from_bytes(&[]).unwrap_err().to_string(),
            "hvm_start_info truncated: needs 56 bytes, only 0 available"
        );
    }

    #[test]
    fn validate_names_field() {
        let mut si = StartInfo { magic: MAGIC, version: 1, ..Default::default() };
        assert_eq!(si.validate(), Ok(()));
        si.version = 2;
        assert_eq!(si.validate(), Ok(()));
        si.version = 0;
        let err = si.validate().unwrap_err();
        assert_eq!(err, StartInfoError::UnsupportedVersion { found: 0 });
        assert!(err.to_string().contains("hvm_start_info.version"));
        si.magic = 0x1234;
        let err = si.validate().unwrap_err();
        assert_eq!(err, StartInfoError::BadMagic { found: 0x1234 });
        assert_eq!(err.to_string(), "hvm_start_info.magic is 0x00001234, expected 0x336ec578");
    }

    #[test]
    fn round_trip() {
        let mut page = [0xccu8; PAGE_SIZE];
        let memmap = sample_memmap();
        let modules = sample_modules();
        build_start_page(&mut page, GPA, b"console=ttyS0 loglevel=7", &memmap, &modules, 0xe_0000).unwrap();

        let p = parse_start_page(&page, GPA).unwrap();
        assert_eq!(p.cmdline(), b"console=ttyS0 loglevel=7");
        assert_eq!(p.rsdp(), 0xe_0000);
        assert!(p.memmap().eq(memmap.iter().copied()));
        assert_eq!(p.memmap().len(), 3);
        let mods: Vec<_> = p.modules().collect();
        assert_eq!(mods.len(), 2);
        for (m, s) in mods.iter().zip(&modules) {
            assert_eq!((m.paddr, m.size, m.cmdline_paddr, m.reserved), (s.paddr, s.size, 0, 0));
        }

        // The documented layout: header, memmap, modlist, cmdline, zeros.
        let info = p.info();
        assert_eq!(info.magic, MAGIC);
        assert_eq!(info.version, VERSION);
        assert_eq!(info.memmap_paddr, GPA + 56);
        assert_eq!(info.modlist_paddr, GPA + 56 + 3 * 24);
        assert_eq!(info.cmdline_paddr, GPA + 56 + 3 * 24 + 2 * 32);
        assert_eq!(info.nr_modules, 2);
        assert_eq!(info.memmap_entries, 3);
        let end = 56 + 3 * 24 + 2 * 32 + 24;
        assert_eq!(page[end], 0);
        assert!(page[end..].iter().all(|&b| b == 0), "page not scrubbed");
    }

    #[test]
    fn empty_everything() {
        let mut page = [0u8; PAGE_SIZE];
        build_start_page(&mut page, 0, b"", &[], &[], 0).unwrap();
        let p = parse_start_page(&page, 0).unwrap();
        assert_eq!(p.cmdline(), b"");
        assert_eq!(p.memmap().count(), 0);
        assert_eq!(p.modules().count(), 0);
        assert_eq!(p.info().memmap_paddr, 0);
        assert_eq!(p.info().modlist_paddr, 0);
        assert_eq!(p.info().cmdline_paddr, 56);
    }

    #[test]
    fn exact_fit_and_one_over() {
        let mut page = [0u8; PAGE_SIZE];
        let max_cmd = vec![b'a'; PAGE_SIZE - 56 - 1];
        build_start_page(&mut page, GPA, &max_cmd, &[], &[], 0).unwrap();
        assert_eq!(parse_start_page(&page, GPA).unwrap().cmdline(), &max_cmd[..]);
        assert_eq!(page[PAGE_SIZE - 1], 0);

        let too_long = vec![b'a'; PAGE_SIZE - 56];
        let mut page = [0x55u8; PAGE_SIZE];
        let err = build_start_page(&mut page, GPA, &too_long, &[], &[], 0).unwrap_err();
        assert_eq!(
            err,
            StartInfoError::DoesNotFit { what: "command line", len: PAGE_SIZE - 56 + 1, end: PAGE_SIZE + 1 }
        );
        assert_eq!(
            err.to_string(),
            "start page overflow: command line (4041 bytes) would end at page offset 4097, past \
             the end of the 4096-byte page"
        );
        assert!(page.iter().all(|&b| b == 0x55), "page modified on error");
    }

    #[test]
    fn too_many_memmap_entries() {
        let mut page = [0u8; PAGE_SIZE];
        let fits = (PAGE_SIZE - 56 - 1) / 24;
        let entries = vec![MemmapEntry::new(0, 0x1000, MEMMAP_RAM); fits + 1];
        build_start_page(&mut page, GPA, b"", &entries[..fits], &[], 0).unwrap();
        assert_eq!(parse_start_page(&page, GPA).unwrap().memmap().len(), fits);
        let err = build_start_page(&mut page, GPA, b"", &entries, &[], 0).unwrap_err();
        assert_eq!(
            err,
            StartInfoError::DoesNotFit { what: "memory map", len: (fits + 1) * 24, end: 56 + (fits + 1) * 24 }
        );
        // With a long command line the memmap fits but the command line does not.
        let err = build_start_page(&mut page, GPA, &[b'x'; 100], &entries[..fits], &[], 0).unwrap_err();
        assert!(matches!(err, StartInfoError::DoesNotFit { what: "command line", .. }));
    }

    #[test]
    fn too_many_modules() {
        let mut page = [0u8; PAGE_SIZE];
        let mods = vec![ModuleSpec::default(); 200];
        assert!(matches!(
            build_start_page(&mut page, GPA, b"", &[], &mods, 0),
            Err(StartInfoError::DoesNotFit { what: "module list", .. })
        ));
    }

    #[test]
    fn cmdline_with_nul_rejected() {
        let mut page = [0u8; PAGE_SIZE];
        assert_eq!(
            build_start_page(&mut page, GPA, b"a\0b", &[], &[], 0),
            Err(StartInfoError::CmdlineContainsNul { offset: 1 })
        );
    }

    #[test]
    fn page_at_top_of_address_space() {
        let mut page = [0u8; PAGE_SIZE];
        let top = u64::MAX - PAGE_SIZE as u64 + 1;
        assert_eq!(
            build_start_page(&mut page, top + 1, b"", &[], &[], 0),
            Err(StartInfoError::BadPageAddress { page_gpa: top + 1 })
        );
        build_start_page(&mut page, top, b"hi", &sample_memmap(), &[], 0).unwrap();
        let p = parse_start_page(&page, top).unwrap();
        assert_eq!(p.cmdline(), b"hi");
        assert_eq!(p.memmap().count(), 3);
    }

    fn built() -> [u8; PAGE_SIZE] {
        let mut page = [0u8; PAGE_SIZE];
        build_start_page(&mut page, GPA, b"root=/dev/vda", &sample_memmap(), &sample_modules(), 0).unwrap();
        page
    }

    fn set_info(page: &mut [u8; PAGE_SIZE], f: impl FnOnce(&mut StartInfo)) {
        let mut si = StartInfo::from_bytes(page).unwrap();
        f(&mut si);
        page[..56].copy_from_slice(&si.to_bytes());
    }

    #[test]
    fn bad_magic_rejected() {
        let mut page = built();
        page[0] ^= 1;
        assert!(matches!(parse_start_page(&page, GPA), Err(StartInfoError::BadMagic { .. })));
        let mut page = built();
        set_info(&mut page, |si| si.version = 0);
        assert_eq!(parse_start_page(&page, GPA).unwrap_err(), StartInfoError::UnsupportedVersion { found: 0 });
        assert!(matches!(parse_start_page(&page[..40], GPA), Err(StartInfoError::Truncated { .. })));
    }

    #[test]
    fn parse_at_wrong_gpa_fails() {
        let page = built();
        let err = parse_start_page(&page, GPA + 0x1000).unwrap_err();
        assert!(matches!(err, StartInfoError::OutsidePage { field: "cmdline_paddr", .. }));
    }

    #[test]
    fn pointers_outside_page_rejected() {
        // Command line pointer below the page.
        let mut page = built();
        set_info(&mut page, |si| si.cmdline_paddr = GPA - 1);
        let err = parse_start_page(&page, GPA).unwrap_err();
        assert_eq!(
            err,
            StartInfoError::OutsidePage {
                field: "cmdline_paddr",
                paddr: GPA - 1,
                len: 1,
                page_gpa: GPA,
                page_size: PAGE_SIZE
            }
        );
        assert_eq!(
            err.to_string(),
            "hvm_start_info.cmdline_paddr = 0x6fff (1 bytes) is not inside the start page \
             [0x7000, 0x8000)"
        );
        // Command line pointer just past the page.
        let mut page = built();
        set_info(&mut page, |si| si.cmdline_paddr = GPA + PAGE_SIZE as u64);
        assert!(parse_start_page(&page, GPA).is_err());
        // Memmap array running off the end of the page.
        let mut page = built();
        set_info(&mut page, |si| {
            si.memmap_paddr = GPA + PAGE_SIZE as u64 - 24;
            si.memmap_entries = 2;
        });
        assert_eq!(
            parse_start_page(&page, GPA).unwrap_err(),
            StartInfoError::OutsidePage {
                field: "memmap_paddr",
                paddr: GPA + PAGE_SIZE as u64 - 24,
                len: 48,
                page_gpa: GPA,
                page_size: PAGE_SIZE
            }
        );
        // ... but exactly at the end is fine.
        set_info(&mut page, |si| si.memmap_entries = 1);
        assert_eq!(parse_start_page(&page, GPA).unwrap().memmap().len(), 1);
        // Huge entry count.
        let mut page = built();
        set_info(&mut page, |si| si.nr_modules = u32::MAX);
        assert!(matches!(
            parse_start_page(&page, GPA),
            Err(StartInfoError::OutsidePage { field: "modlist_paddr", .. })
        ));
        // Pointer near u64::MAX must not overflow.
        let mut page = built();
        set_info(&mut page, |si| si.modlist_paddr = u64::MAX - 4);
        assert!(parse_start_page(&page, GPA).is_err());
        // Zero counts make the pointers irrelevant.
        let mut page = built();
        set_info(&mut page, |si| {
            si.nr_modules = 0;
            si.modlist_paddr = u64::MAX;
            si.memmap_entries = 0;
            si.memmap_paddr = 1;
        });
        let p = parse_start_page(&page, GPA).unwrap();
        assert_eq!(p.modules().count(), 0);
        assert_eq!(p.memmap().count(), 0);
    }

    #[test]
    fn unterminated_cmdline() {
        let mut page = built();
        let off = 4000;
        page[off..].fill(b'z');
        set_info(&mut page, |si| si.cmdline_paddr = GPA + off as u64);
        assert_eq!(
            parse_start_page(&page, GPA).unwrap_err(),
            StartInfoError::CmdlineUnterminated { paddr: GPA + off as u64 }
        );
        // A zero pointer means no command line.
        set_info(&mut page, |si| si.cmdline_paddr = 0);
        assert_eq!(parse_start_page(&page, GPA).unwrap().cmdline(), b"");
    }

    #[test]
    fn all_errors_display() {
        let errs = [
            StartInfoError::Truncated { what: "x", needed: 1, available: 0 },
            StartInfoError::BadMagic { found: 0 },
            StartInfoError::UnsupportedVersion { found: 0 },
            StartInfoError::DoesNotFit { what: "memory map", len: usize::MAX, end: usize::MAX },
            StartInfoError::CmdlineContainsNul { offset: 3 },
            StartInfoError::BadPageAddress { page_gpa: u64::MAX },
            StartInfoError::OutsidePage {
                field: "memmap_paddr",
                paddr: u64::MAX,
                len: u64::MAX,
                page_gpa: u64::MAX,
                page_size: usize::MAX,
            },
            StartInfoError::CmdlineUnterminated { paddr: 5 },
        ];
        for e in errs {
            assert!(!e.to_string().is_empty());
        }
    }

    fn memmap_entry() -> impl Strategy<Value = MemmapEntry> {
        (any::<u64>(), any::<u64>(), 1u32..=7, any::<u32>()).prop_map(|(addr, size, t, r)| MemmapEntry {
            addr,
            size,
            r#type: t,
            reserved: r,
        })
    }

    proptest! {
        #[test]
        fn prop_round_trip(
            gpa_page in 0u64..(1 << 40),
            cmdline in proptest::collection::vec(1u8..=255, 0..400),
            memmap in proptest::collection::vec(memmap_entry(), 0..60),
            modules in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..40),
            rsdp in any::<u64>(),
        ) {
            let gpa = gpa_page * PAGE_SIZE as u64;
            let modules: Vec<ModuleSpec> =
                modules.into_iter().map(|(paddr, size)| ModuleSpec { paddr, size }).collect();
            let needed = 56 + memmap.len() * 24 + modules.len() * 32 + cmdline.len() + 1;
            let mut page = [0xa5u8; PAGE_SIZE];
            let res = build_start_page(&mut page, gpa, &cmdline, &memmap, &modules, rsdp);
            if needed > PAGE_SIZE {
                let is_overflow = matches!(res, Err(StartInfoError::DoesNotFit { .. }));
                prop_assert!(is_overflow);
                prop_assert!(page.iter().all(|&b| b == 0xa5));
            } else {
                prop_assert_eq!(res, Ok(()));
                let p = parse_start_page(&page, gpa).unwrap();
                prop_assert_eq!(p.cmdline(), &cmdline[..]);
                prop_assert_eq!(p.rsdp(), rsdp);
                prop_assert!(p.memmap().eq(memmap.iter().copied()));
                prop_assert_eq!(p.modules().len(), modules.len());
                for (m, s) in p.modules().zip(&modules) {
                    prop_assert_eq!((m.paddr, m.size), (s.paddr, s.size));
                }
                prop_assert!(page[needed..].iter().all(|&b| b == 0));
            }
        }

        #[test]
        fn prop_struct_round_trip(
            a in any::<[u32; 6]>(),
            b in any::<[u64; 8]>(),
        ) {
            let si = StartInfo {
                magic: a[0], version: a[1], flags: a[2], nr_modules: a[3],
                modlist_paddr: b[0], cmdline_paddr: b[1], rsdp_paddr: b[2], memmap_paddr: b[3],
                memmap_entries: a[4], reserved: a[5],
            };
            prop_assert_eq!(StartInfo::from_bytes(&si.to_bytes()), Ok(si));
            let m = ModlistEntry { paddr: b[4], size: b[5], cmdline_paddr: b[6], reserved: b[7] };
            prop_assert_eq!(ModlistEntry::from_bytes(&m.to_bytes()), Ok(m));
            let e = MemmapEntry { addr: b[0], size: b[7], r#type: a[2], reserved: a[3] };
            prop_assert_eq!(MemmapEntry::from_bytes(&e.to_bytes()), Ok(e));
        }

        #[test]
        fn prop_parse_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            gpa in any::<u64>(),
        ) {
            let _ = parse_start_page(&bytes, gpa);
            // Also with a valid header so the pointer resolution is exercised.
            let mut bytes = bytes;
            if bytes.len() >= 8 {
                bytes[..4].copy_from_slice(&MAGIC.to_le_bytes());
                bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
            }
            if let Ok(p) = parse_start_page(&bytes, gpa) {
                prop_assert!(p.cmdline().len() < bytes.len());
                prop_assert!(p.memmap().count() * 24 <= bytes.len());
                prop_assert!(p.modules().count() * 32 <= bytes.len());
            }
        }

        #[test]
        fn prop_mutated_page_parses_or_errors(
            muts in proptest::collection::vec((0usize..PAGE_SIZE, any::<u8>()), 1..8),
            header_only in any::<bool>(),
        ) {
            let mut page = built();
            for (i, v) in muts {
                let i = if header_only { i % 56 } else { i };
                page[i] = v;
            }
            match parse_start_page(&page, GPA) {
                Ok(p) => {
                    let _ = p.memmap().count();
                    let _ = p.modules().count();
                    prop_assert!(!p.cmdline().contains(&0));
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}

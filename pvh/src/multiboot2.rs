//! Multiboot2: the header a loader such as GRUB looks for, and a reader for the boot
//! information it hands over.
//!
//! The microvisor has two ways in: QEMU's PVH loader (EBX = `hvm_start_info`, see
//! [`start_info`](crate::start_info)) and Multiboot2, for GRUB on real machines and on
//! emulators without a PVH loader (Bochs). Multiboot2 enters in 32-bit protected mode with
//! paging off, EAX = [`BOOT_MAGIC`] and EBX = the physical address of the boot information
//! (Multiboot2 specification 2.0, section 3.3 "I386 machine state"); [`multiboot2_header!`]
//! emits the header and an entry that joins the PVH trampoline of
//! [`pvh_entry!`](crate::pvh_entry).
//!
//! The boot information is a sequence of tags (section 3.6): `total_size: u32`,
//! `reserved: u32`, then tags of `type: u32`, `size: u32` and a body, each starting 8-byte
//! aligned, closed by a tag of type 0 and size 8. [`Info::parse`] checks the whole sequence
//! once (every tag inside `total_size`, the known tags at least as long as their fixed
//! fields, an end tag); the accessors then read without further failure. The memory map and
//! modules come out as the same [`MemmapEntry`] and [`ModuleSpec`] the PVH start info uses,
//! so the microvisor has one set of boot facts whichever loader started it. Everything is
//! untrusted input: no panics, no unchecked offsets, no heap.

use core::fmt;

use crate::start_info::{MemmapEntry, ModuleSpec};

/// EAX at the Multiboot2 entry (section 3.3).
pub const BOOT_MAGIC: u32 = 0x36d7_6289;
/// First field of the Multiboot2 header (section 3.1.1).
pub const HEADER_MAGIC: u32 = 0xe852_50d6;
/// The header must lie entirely within this many bytes from the start of the image file,
/// 8-byte aligned (section 3.1.1).
pub const HEADER_SEARCH: usize = 32 * 1024;

/// Tag types of the boot information (section 3.6).
pub mod tag {
    /// Closes the tag sequence.
    pub const END: u32 = 0;
    /// The kernel's command line, NUL-terminated.
    pub const CMDLINE: u32 = 1;
    /// The boot loader's name, NUL-terminated.
    pub const BOOT_LOADER_NAME: u32 = 2;
    /// One boot module: `mod_start: u32`, `mod_end: u32`, its NUL-terminated string.
    pub const MODULE: u32 = 3;
    /// The memory map: `entry_size: u32`, `entry_version: u32`, entries.
    pub const MMAP: u32 = 6;
    /// A copy of the ACPI 1.0 RSDP.
    pub const ACPI_OLD: u32 = 14;
    /// A copy of the ACPI 2.0+ RSDP (XSDP).
    pub const ACPI_NEW: u32 = 15;
}

/// Size of a tag's `type` and `size` fields, and of the information's own header.
const TAG_HEADER: usize = 8;
/// Memory map entry: `base_addr: u64`, `length: u64`, `type: u32`, `reserved: u32`.
const MMAP_ENTRY_MIN: usize = 24;
/// Size of the RSDP of ACPI 1.0 (ACPI 6.5 section 5.2.5.3: the first 20 bytes).
pub const RSDP_V1_LEN: usize = 20;

/// Why boot information could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mb2Error {
    /// Fewer bytes than the 8-byte header, or than `total_size` says.
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        available: usize,
    },
    /// `total_size` is smaller than a header plus an end tag, or not a multiple of 8.
    BadTotalSize(u32),
    /// A tag's `size` is below 8 or runs past `total_size`.
    BadTagSize {
        /// Offset of the tag in the information.
        offset: usize,
        /// The tag's type.
        tag: u32,
        /// The tag's size field.
        size: u32,
    },
    /// A known tag is shorter than its fixed fields.
    TagTooShort {
        /// The tag's type.
        tag: u32,
        /// Its size field.
        size: u32,
        /// The size its fixed fields need.
        needed: usize,
    },
    /// The memory map's `entry_size` is below 24 or not a multiple of 8.
    BadMmapEntrySize(u32),
    /// A module ends before it starts.
    ModuleEndsBeforeStart {
        /// `mod_start`.
        start: u32,
        /// `mod_end`.
        end: u32,
    },
    /// No end tag before `total_size`.
    NoEndTag,
    /// The end tag's size is not 8.
    BadEndTag(u32),
}

impl fmt::Display for Mb2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Truncated { needed, available } => {
                write!(f, "Multiboot2 information truncated: needs {needed} bytes, {available} available")
            }
            Self::BadTotalSize(s) => write!(f, "Multiboot2 total_size {s} is not a multiple of 8 of at least 16"),
            Self::BadTagSize { offset, tag, size } => {
                write!(f, "Multiboot2 tag {tag} at offset {offset} has size {size}, outside the information")
            }
            Self::TagTooShort { tag, size, needed } => {
                write!(f, "Multiboot2 tag {tag} has size {size}, its fields need {needed}")
            }
            Self::BadMmapEntrySize(s) => {
                write!(f, "Multiboot2 memory map entry_size {s} (needs a multiple of 8, >= 24)")
            }
            Self::ModuleEndsBeforeStart { start, end } => {
                write!(f, "Multiboot2 module ends ({end:#x}) before it starts ({start:#x})")
            }
            Self::NoEndTag => f.write_str("Multiboot2 information has no end tag"),
            Self::BadEndTag(s) => write!(f, "Multiboot2 end tag has size {s}, expected 8"),
        }
    }
}

impl core::error::Error for Mb2Error {}

fn u32_at(bytes: &[u8], off: usize) -> Option<u32> {
    let b = bytes.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(bytes: &[u8], off: usize) -> Option<u64> {
    Some(u64::from(u32_at(bytes, off)?) | u64::from(u32_at(bytes, off.checked_add(4)?)?) << 32)
}

/// The bytes up to the first NUL (all of them if there is none).
fn c_string(bytes: &[u8]) -> &[u8] {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..len]
}

/// The `total_size` field: how many bytes of boot information to read. Reads only the
/// first 4 bytes, so a loader of physical memory can learn how much to map.
pub fn total_size(bytes: &[u8]) -> Result<u32, Mb2Error> {
    u32_at(bytes, 0).ok_or(Mb2Error::Truncated { needed: TAG_HEADER, available: bytes.len() })
}

/// One tag: its type and its body (the bytes after `type` and `size`, `size - 8` of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag<'a> {
    /// One of the [`tag`] constants (or another type this reader does not interpret).
    pub r#type: u32,
    /// The tag's bytes after its 8-byte header.
    pub body: &'a [u8],
}

/// Iterates over the tags of an [`Info`], up to and without the end tag.
#[derive(Clone, Debug)]
pub struct Tags<'a> {
    bytes: &'a [u8],
    offset: usize,
}

/// One step of the walk: the tag at `offset` and where the next one starts, or why not.
fn tag_at(bytes: &[u8], offset: usize) -> Result<(Tag<'_>, usize), Mb2Error> {
    let (Some(r#type), Some(size)) = (u32_at(bytes, offset), u32_at(bytes, offset.saturating_add(4))) else {
        return Err(Mb2Error::NoEndTag);
    };
    let end = offset.checked_add(size as usize).filter(|&e| e <= bytes.len() && size as usize >= TAG_HEADER);
    let Some(end) = end else {
        return Err(Mb2Error::BadTagSize { offset, tag: r#type, size });
    };
    let body = bytes.get(offset + TAG_HEADER..end).unwrap_or_default();
    // Tags start 8-byte aligned (section 3.6.1); the padding may run up to total_size.
    let next = end.checked_add(7).map_or(usize::MAX, |e| e & !7);
    Ok((Tag { r#type, body }, next))
}

impl<'a> Iterator for Tags<'a> {
    type Item = Tag<'a>;

    fn next(&mut self) -> Option<Tag<'a>> {
        // `Info::parse` checked the walk, so an error here only ends it.
        let (tag, next) = tag_at(self.bytes, self.offset).ok()?;
        if tag.r#type == tag::END {
            return None;
        }
        self.offset = next;
        Some(tag)
    }
}

/// Checks the fixed part of the tags this reader interprets.
fn check_tag(t: &Tag<'_>) -> Result<(), Mb2Error> {
    let size = (t.body.len() + TAG_HEADER) as u32;
    let need = |needed: usize| {
        if t.body.len() + TAG_HEADER < needed {
            Err(Mb2Error::TagTooShort { tag: t.r#type, size, needed })
        } else {
            Ok(())
        }
    };
    match t.r#type {
        tag::MODULE => {
            need(16)?;
            let (start, end) = (u32_at(t.body, 0).unwrap_or(0), u32_at(t.body, 4).unwrap_or(0));
            if end < start {
                return Err(Mb2Error::ModuleEndsBeforeStart { start, end });
            }
            Ok(())
        }
        tag::MMAP => {
            need(16)?;
            let entry_size = u32_at(t.body, 0).unwrap_or(0);
            if (entry_size as usize) < MMAP_ENTRY_MIN || !entry_size.is_multiple_of(8) {
                return Err(Mb2Error::BadMmapEntrySize(entry_size));
            }
            Ok(())
        }
        tag::ACPI_OLD => need(TAG_HEADER + RSDP_V1_LEN),
        tag::ACPI_NEW => need(TAG_HEADER + RSDP_V1_LEN),
        _ => Ok(()),
    }
}

/// Checked Multiboot2 boot information.
#[derive(Clone, Copy, Debug)]
pub struct Info<'a> {
    /// Exactly `total_size` bytes.
    bytes: &'a [u8],
}

impl<'a> Info<'a> {
    /// Checks `bytes` (at least `total_size` of them; more is allowed) as boot information.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, Mb2Error> {
        let total = total_size(bytes)?;
        if total < 16 || !total.is_multiple_of(8) {
            return Err(Mb2Error::BadTotalSize(total));
        }
        let bytes = bytes
            .get(..total as usize)
            .ok_or(Mb2Error::Truncated { needed: total as usize, available: bytes.len() })?;
        let mut offset = TAG_HEADER;
        loop {
            let (t, next) = tag_at(bytes, offset)?;
            if t.r#type == tag::END {
                if !t.body.is_empty() {
                    return Err(Mb2Error::BadEndTag((t.body.len() + TAG_HEADER) as u32));
                }
                return Ok(Self { bytes });
            }
            check_tag(&t)?;
            offset = next;
        }
    }

    /// `total_size`: the length of the information.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false: checked information holds at least a header and an end tag.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Every tag before the end tag.
    pub fn tags(&self) -> Tags<'a> {
        Tags { bytes: self.bytes, offset: TAG_HEADER }
    }

    fn first(&self, r#type: u32) -> Option<&'a [u8]> {
        self.tags().find(|t| t.r#type == r#type).map(|t| t.body)
    }

    /// The kernel's command line (without its NUL); empty if the loader gave none.
    pub fn cmdline(&self) -> &'a [u8] {
        self.first(tag::CMDLINE).map_or(&[], c_string)
    }

    /// The boot loader's name, if it gave one.
    pub fn boot_loader_name(&self) -> Option<&'a [u8]> {
        self.first(tag::BOOT_LOADER_NAME).map(c_string)
    }

    /// The boot modules in the loader's order; `size` is `mod_end - mod_start`.
    pub fn modules(&self) -> impl Iterator<Item = Module<'a>> + 'a {
        self.tags().filter(|t| t.r#type == tag::MODULE).map(|t| {
            let start = u32_at(t.body, 0).unwrap_or(0);
            let end = u32_at(t.body, 4).unwrap_or(start);
            Module {
                spec: ModuleSpec { paddr: start.into(), size: end.saturating_sub(start).into() },
                string: c_string(t.body.get(8..).unwrap_or_default()),
            }
        })
    }

    /// Every memory map entry of every memory map tag (there is normally one), in the PVH
    /// start info's form; the Multiboot2 types 1-5 mean what the `MEMMAP_*` types 1-5 mean.
    pub fn memory_map(&self) -> impl Iterator<Item = MemmapEntry> + 'a {
        self.tags().filter(|t| t.r#type == tag::MMAP).flat_map(|t| {
            // parse() checked entry_size >= 24 and a multiple of 8.
            let entry_size = (u32_at(t.body, 0).unwrap_or(0) as usize).max(MMAP_ENTRY_MIN);
            let entries = t.body.get(8..).unwrap_or_default();
            entries.chunks_exact(entry_size).map(|e| {
                MemmapEntry::new(u64_at(e, 0).unwrap_or(0), u64_at(e, 8).unwrap_or(0), u32_at(e, 16).unwrap_or(0))
            })
        })
    }

    /// The loader's copy of the ACPI RSDP: the 2.0+ one if given, else the 1.0 one. The
    /// bytes are the RSDP itself (its checksums cover them), not its address.
    pub fn rsdp(&self) -> Option<&'a [u8]> {
        self.first(tag::ACPI_NEW).or_else(|| self.first(tag::ACPI_OLD))
    }
}

/// One boot module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Module<'a> {
    /// Where the loader put it.
    pub spec: ModuleSpec,
    /// Its string (GRUB: the words after the file name on the `module2` line).
    pub string: &'a [u8],
}

/// A Multiboot2 header found in an image file, as a loader sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// File offset of the header (8-byte aligned, within [`HEADER_SEARCH`]).
    pub offset: usize,
    /// The entry address tag's value, if the header has one.
    pub entry: Option<u32>,
}

/// Find the header the way GRUB does (section 3.1.1): the first 8-byte-aligned position in
/// the first [`HEADER_SEARCH`] bytes holding [`HEADER_MAGIC`], architecture 0 and a header
/// length whose checksum makes the four fields sum to zero; then walk its tags to the end
/// tag. `None` if there is no such header or its tags run past its length.
pub fn find_header(image: &[u8]) -> Option<Header> {
    let search = image.get(..image.len().min(HEADER_SEARCH))?;
    (0..search.len()).step_by(8).find_map(|offset| {
        let field = |i: usize| u32_at(search, offset + 4 * i);
        let (magic, arch, len, sum) = (field(0)?, field(1)?, field(2)?, field(3)?);
        let total = magic.wrapping_add(arch).wrapping_add(len).wrapping_add(sum);
        if magic != HEADER_MAGIC || arch != 0 || total != 0 {
            return None;
        }
        let header = search.get(offset..offset.checked_add(len as usize)?)?;
        let mut entry = None;
        let mut at = 16;
        loop {
            let r#type = u16::from_le_bytes([*header.get(at)?, *header.get(at + 1)?]);
            let size = u32_at(header, at + 4)? as usize;
            if r#type == 0 {
                return Some(Header { offset, entry });
            }
            if r#type == 3 {
                entry = u32_at(header, at + 8);
            }
            at = at.checked_add(size.max(8))?.checked_add(7)? & !7;
        }
    })
}

/// Emit a Multiboot2 header and its entry, `mb2_start32`, which joins the PVH trampoline of
/// [`pvh_entry!`](crate::pvh_entry) (used in the same image) with ESI = EBX (the boot
/// information) and EBP = EAX (the loader's magic, [`BOOT_MAGIC`]), so `main` receives both.
///
/// The header goes into section `.multiboot2`, which the image's linker script must place
/// within the first [`HEADER_SEARCH`] bytes of the file, 8-byte aligned. Its tags: the entry
/// address (so GRUB does not use the ELF entry, the PVH one) and module alignment (page-
/// aligned modules; GRUB always does that). GRUB loads the ELF segments at their physical
/// addresses, so the image runs where it is linked, as under PVH.
#[macro_export]
macro_rules! multiboot2_header {
    () => {
        core::arch::global_asm!(
            ".pushsection .multiboot2, \"a\"",
            ".p2align 3",
            "mb2_header:",
            ".long 0xe85250d6",
            // Architecture 0: 32-bit protected mode of i386.
            ".long 0",
            ".long mb2_header_end - mb2_header",
            ".long -(0xe85250d6 + (mb2_header_end - mb2_header))",
            // Entry address tag (type 3, required): the 32-bit entry below.
            ".p2align 3",
            ".short 3",
            ".short 0",
            ".long 12",
            ".long mb2_start32",
            // Module alignment tag (type 6).
            ".p2align 3",
            ".short 6",
            ".short 0",
            ".long 8",
            // End tag.
            ".p2align 3",
            ".short 0",
            ".short 0",
            ".long 8",
            "mb2_header_end:",
            ".popsection",
            ".pushsection .text.pvh_start32, \"ax\"",
            ".code32",
            ".global mb2_start32",
            "mb2_start32:",
            "cli",
            "cld",
            "mov ebp, eax",
            "jmp pvh_start32_common",
            ".code64",
            ".popsection",
        );
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Builds boot information the way GRUB lays it out.
    #[derive(Default)]
    struct Builder {
        out: Vec<u8>,
    }

    impl Builder {
        fn new() -> Self {
            Self { out: vec![0; 8] }
        }

        fn tag(mut self, r#type: u32, body: &[u8]) -> Self {
            self.out.extend_from_slice(&r#type.to_le_bytes());
            self.out.extend_from_slice(&(body.len() as u32 + 8).to_le_bytes());
            self.out.extend_from_slice(body);
            while !self.out.len().is_multiple_of(8) {
                self.out.push(0);
            }
            self
        }

        fn string(self, r#type: u32, s: &str) -> Self {
            let mut b = s.as_bytes().to_vec();
            b.push(0);
            self.tag(r#type, &b)
        }

        fn module(self, start: u32, end: u32, s: &str) -> Self {
            let mut b = start.to_le_bytes().to_vec();
            b.extend_from_slice(&end.to_le_bytes());
            b.extend_from_slice(s.as_bytes());
            b.push(0);
            self.tag(tag::MODULE, &b)
        }

        fn mmap(self, entry_size: u32, entries: &[(u64, u64, u32)]) -> Self {
            let mut b = entry_size.to_le_bytes().to_vec();
            b.extend_from_slice(&0u32.to_le_bytes());
            for &(addr, len, t) in entries {
                let mut e = addr.to_le_bytes().to_vec();
                e.extend_from_slice(&len.to_le_bytes());
                e.extend_from_slice(&t.to_le_bytes());
                e.resize(entry_size as usize, 0);
                b.extend_from_slice(&e);
            }
            self.tag(tag::MMAP, &b)
        }

        fn finish(self) -> Vec<u8> {
            let mut out = self.tag(tag::END, &[]).out;
            let total = out.len() as u32;
            out[..4].copy_from_slice(&total.to_le_bytes());
            out
        }
    }

    fn rsdp(rev: u8) -> Vec<u8> {
        let mut r = b"RSD PTR ".to_vec();
        r.resize(if rev >= 2 { 36 } else { 20 }, rev);
        r
    }

    fn grub_like() -> Vec<u8> {
        Builder::new()
            .string(tag::CMDLINE, "dom0.on_ready=shutdown")
            .string(tag::BOOT_LOADER_NAME, "GRUB 2.06")
            .module(0x7f0_0000, 0x7f4_2345, "bundle")
            .module(0x7f5_0000, 0x7f5_0000, "")
            .tag(4, &[0x80, 2, 0, 0, 0, 0xfc, 0, 0]) // basic meminfo: not interpreted
            .mmap(24, &[(0, 0x9fc00, 1), (0x9fc00, 0x400, 2), (0x10_0000, 0x7ee_0000, 1), (0xfffc_0000, 0x4_0000, 2)])
            .tag(tag::ACPI_OLD, &rsdp(0))
            .tag(tag::ACPI_NEW, &rsdp(2))
            .finish()
    }

    #[test]
    fn reads_what_grub_gives() {
        let bytes = grub_like();
        let info = Info::parse(&bytes).unwrap();
        assert_eq!(info.len(), bytes.len());
        assert!(!info.is_empty());
        assert_eq!(info.cmdline(), b"dom0.on_ready=shutdown");
        assert_eq!(info.boot_loader_name(), Some(&b"GRUB 2.06"[..]));
        let mods: Vec<_> = info.modules().collect();
        assert_eq!(mods.len(), 2);
        assert_eq!(mods[0].spec, ModuleSpec { paddr: 0x7f0_0000, size: 0x4_2345 });
        assert_eq!(mods[0].string, b"bundle");
        assert_eq!(mods[1].spec.size, 0);
        let map: Vec<_> = info.memory_map().collect();
        assert_eq!(map.len(), 4);
        assert_eq!(map[2], MemmapEntry::new(0x10_0000, 0x7ee_0000, 1));
        assert_eq!(map[3].r#type, 2);
        // The 2.0 RSDP is preferred.
        assert_eq!(info.rsdp().map(<[u8]>::len), Some(36));
        assert_eq!(info.tags().count(), 8);
    }

    #[test]
    fn minimal_and_optional_parts() {
        let bytes = Builder::new().finish();
        assert_eq!(bytes.len(), 16);
        let info = Info::parse(&bytes).unwrap();
        assert_eq!(info.cmdline(), b"");
        assert_eq!(info.boot_loader_name(), None);
        assert_eq!(info.modules().count(), 0);
        assert_eq!(info.memory_map().count(), 0);
        assert_eq!(info.rsdp(), None);
        // Only the old RSDP.
        let bytes = Builder::new().tag(tag::ACPI_OLD, &rsdp(0)).finish();
        assert_eq!(Info::parse(&bytes).unwrap().rsdp().map(<[u8]>::len), Some(20));
        // Longer input than total_size is fine (the loader's page holds more).
        let mut long = grub_like();
        long.extend_from_slice(&[0xff; 100]);
        assert_eq!(Info::parse(&long).unwrap().len(), long.len() - 100);
    }

    #[test]
    fn larger_mmap_entries_are_stepped_over() {
        let bytes = Builder::new().mmap(32, &[(0x1000, 0x2000, 1), (0x5000, 0x1000, 3)]).finish();
        let map: Vec<_> = Info::parse(&bytes).unwrap().memory_map().collect();
        assert_eq!(map, [MemmapEntry::new(0x1000, 0x2000, 1), MemmapEntry::new(0x5000, 0x1000, 3)]);
    }

    #[test]
    fn header_errors() {
        assert_eq!(Info::parse(&[]).unwrap_err(), Mb2Error::Truncated { needed: 8, available: 0 });
        assert_eq!(total_size(&[1, 2, 3]), Err(Mb2Error::Truncated { needed: 8, available: 3 }));
        let bytes = grub_like();
        let err = Info::parse(&bytes[..bytes.len() - 1]).unwrap_err();
        assert_eq!(err, Mb2Error::Truncated { needed: bytes.len(), available: bytes.len() - 1 });
        for bad in [0u32, 8, 12, 17, 23] {
            let mut b = bytes.clone();
            b[..4].copy_from_slice(&bad.to_le_bytes());
            assert_eq!(Info::parse(&b).unwrap_err(), Mb2Error::BadTotalSize(bad), "total_size {bad}");
        }
    }

    fn set_u32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn tag_errors() {
        // The first tag (the command line) is at offset 8; its size at 12.
        let good = grub_like();
        for size in [0u32, 7] {
            let mut b = good.clone();
            set_u32(&mut b, 12, size);
            assert_eq!(Info::parse(&b).unwrap_err(), Mb2Error::BadTagSize { offset: 8, tag: 1, size });
        }
        let mut b = good.clone();
        set_u32(&mut b, 12, u32::MAX);
        assert!(matches!(Info::parse(&b), Err(Mb2Error::BadTagSize { size: u32::MAX, .. })));
        // total_size cut just before the end tag: no end tag.
        let mut b = good.clone();
        let cut = good.len() as u32 - 8;
        set_u32(&mut b, 0, cut);
        assert_eq!(Info::parse(&b).unwrap_err(), Mb2Error::NoEndTag);
        // An end tag of the wrong size.
        let mut b = Builder::new().finish();
        set_u32(&mut b, 12, 16);
        set_u32(&mut b, 0, 24);
        b.extend_from_slice(&[0; 8]);
        assert_eq!(Info::parse(&b).unwrap_err(), Mb2Error::BadEndTag(16));
    }

    #[test]
    fn known_tags_too_short_or_inconsistent() {
        let b = Builder::new().tag(tag::MODULE, &[0; 7]).finish();
        assert_eq!(Info::parse(&b).unwrap_err(), Mb2Error::TagTooShort { tag: 3, size: 15, needed: 16 });
        let b = Builder::new().module(0x2000, 0x1000, "").finish();
        assert_eq!(Info::parse(&b).unwrap_err(), Mb2Error::ModuleEndsBeforeStart { start: 0x2000, end: 0x1000 });
        let b = Builder::new().tag(tag::MMAP, &[24, 0, 0, 0]).finish();
        assert!(matches!(Info::parse(&b), Err(Mb2Error::TagTooShort { tag: 6, .. })));
        for es in [0u32, 20, 28] {
            let b = Builder::new().mmap(es.max(24), &[]).finish();
            let mut b = b;
            set_u32(&mut b, 16, es);
            assert_eq!(Info::parse(&b).unwrap_err(), Mb2Error::BadMmapEntrySize(es));
        }
        let b = Builder::new().tag(tag::ACPI_NEW, &[0; 19]).finish();
        assert!(matches!(Info::parse(&b), Err(Mb2Error::TagTooShort { tag: 15, needed: 28, .. })));
        let b = Builder::new().tag(tag::ACPI_OLD, &[0; 19]).finish();
        assert!(matches!(Info::parse(&b), Err(Mb2Error::TagTooShort { tag: 14, .. })));
        // A memory map whose last entry is cut short yields only the whole entries.
        let mut b = Builder::new().mmap(24, &[(0x1000, 0x1000, 1), (0x3000, 0x1000, 1)]).finish();
        set_u32(&mut b, 12, 8 + 8 + 24 + 16);
        // ... and the end tag follows at the next 8-byte boundary (offset 64).
        set_u32(&mut b, 64, tag::END);
        set_u32(&mut b, 68, 8);
        set_u32(&mut b, 0, 72);
        assert_eq!(Info::parse(&b).unwrap().memory_map().count(), 1);
    }

    #[test]
    fn unterminated_strings_end_at_the_tag() {
        let b = Builder::new().tag(tag::CMDLINE, b"abcdefgh").finish();
        assert_eq!(Info::parse(&b).unwrap().cmdline(), b"abcdefgh");
    }

    #[test]
    fn errors_display() {
        let errs = [
            Mb2Error::Truncated { needed: 1, available: 0 },
            Mb2Error::BadTotalSize(3),
            Mb2Error::BadTagSize { offset: 8, tag: 1, size: 0 },
            Mb2Error::TagTooShort { tag: 3, size: 8, needed: 16 },
            Mb2Error::BadMmapEntrySize(0),
            Mb2Error::ModuleEndsBeforeStart { start: 2, end: 1 },
            Mb2Error::NoEndTag,
            Mb2Error::BadEndTag(9),
        ];
        for e in errs {
            assert!(e.to_string().starts_with("Multiboot2"), "{e}");
        }
    }

    #[test]
    fn headers_are_found_as_grub_finds_them() {
        let header = |entry: u32| {
            let mut h = Vec::new();
            for v in [HEADER_MAGIC, 0, 40, 0u32.wrapping_sub(HEADER_MAGIC + 40)] {
                h.extend_from_slice(&v.to_le_bytes());
            }
            h.extend_from_slice(&[3, 0, 0, 0, 12, 0, 0, 0]);
            h.extend_from_slice(&entry.to_le_bytes());
            h.extend_from_slice(&[0; 4]);
            h.extend_from_slice(&[0, 0, 0, 0, 8, 0, 0, 0]);
            assert_eq!(h.len(), 40);
            h
        };
        let mut image = vec![0u8; 0x1018];
        image.extend_from_slice(&header(0x20_1000));
        assert_eq!(find_header(&image), Some(Header { offset: 0x1018, entry: Some(0x20_1000) }));
        // Not 8-byte aligned: not found.
        let mut odd = vec![0u8; 0x1014];
        odd.extend_from_slice(&header(1));
        assert_eq!(find_header(&odd), None);
        // Beyond the first 32 KiB: not found.
        let mut far = vec![0u8; HEADER_SEARCH];
        far.extend_from_slice(&header(1));
        assert_eq!(find_header(&far), None);
        // A bad checksum, or a header cut short, is not a header.
        let mut bad = header(1);
        bad[12] ^= 1;
        assert_eq!(find_header(&bad), None);
        assert_eq!(find_header(&header(1)[..36]), None);
        assert_eq!(find_header(&[]), None);
    }

    /// Reads everything an accessor can give: must not panic whatever the input.
    fn read_all(info: &Info<'_>) -> usize {
        info.cmdline().len()
            + info.boot_loader_name().map_or(0, <[u8]>::len)
            + info.modules().map(|m| m.string.len()).sum::<usize>()
            + info.memory_map().count()
            + info.rsdp().map_or(0, <[u8]>::len)
            + info.tags().count()
    }

    proptest! {
        #[test]
        fn prop_every_truncation_is_an_error(cut in 0usize..200) {
            let bytes = grub_like();
            let cut = cut.min(bytes.len() - 1);
            let is_truncated = matches!(Info::parse(&bytes[..cut]), Err(Mb2Error::Truncated { .. }));
            prop_assert!(is_truncated);
        }

        #[test]
        fn prop_shrunk_total_size_never_panics(total in 0u32..400) {
            let mut bytes = grub_like();
            set_u32(&mut bytes, 0, total);
            if let Ok(info) = Info::parse(&bytes) {
                prop_assert!(info.len() == total as usize);
                read_all(&info);
            }
        }

        #[test]
        fn prop_mutations_parse_or_error(
            muts in proptest::collection::vec((0usize..400, any::<u8>()), 1..8),
        ) {
            let mut bytes = grub_like();
            for (i, v) in muts {
                let i = i % bytes.len();
                bytes[i] = v;
            }
            match Info::parse(&bytes) {
                Ok(info) => {
                    read_all(&info);
                    for m in info.modules() {
                        prop_assert!(m.spec.paddr.checked_add(m.spec.size).is_some_and(|e| e <= u32::MAX as u64));
                    }
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }

        #[test]
        fn prop_find_header_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), len in 0u32..64) {
            let mut bytes = bytes;
            if bytes.len() >= 16 {
                bytes[..4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
                bytes[4..8].fill(0);
                bytes[8..12].copy_from_slice(&len.to_le_bytes());
                bytes[12..16].copy_from_slice(&0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(len)).to_le_bytes());
            }
            let _ = find_header(&bytes);
        }

        #[test]
        fn prop_random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(info) = Info::parse(&bytes) {
                read_all(&info);
            }
            // Also with a plausible total_size so the walk gets going.
            let mut bytes = bytes;
            if bytes.len() >= 16 {
                let total = (bytes.len() as u32) & !7;
                set_u32(&mut bytes, 0, total);
                if let Ok(info) = Info::parse(&bytes) {
                    read_all(&info);
                }
            }
        }
    }
}

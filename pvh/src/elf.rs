//! ELF64 executable parsing and validation for PVH images.
//!
//! Every image in the stack (the microvisor, dom0, later driver VMs) is a static x86-64 ELF64
//! `ET_EXEC` linked at fixed physical addresses and carrying a `XEN_ELFNOTE_PHYS32_ENTRY` note.
//! The loader copies each `PT_LOAD` segment to its `p_paddr`, zero-fills up to `p_memsz`, and
//! enters the image at the 32-bit PVH entry point from the note.
//!
//! The image bytes are untrusted (a later driver VM image may come from anywhere), so everything
//! the loader will later rely on is validated once in [`ElfImage::parse`]: after that, segment
//! data accessors are infallible and the physical layout is known not to overflow or overlap.
//! Nothing here allocates, indexes with unchecked offsets, or panics on any input.

use core::fmt;

/// `EM_X86_64`: the only machine we can run.
pub const EM_X86_64: u16 = 62;
/// `ET_EXEC`: images are linked at fixed addresses; we do not relocate.
pub const ET_EXEC: u16 = 2;
/// `PT_LOAD` program header type.
pub const PT_LOAD: u32 = 1;
/// `PT_NOTE` program header type.
pub const PT_NOTE: u32 = 4;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: note type carrying the 32-bit physical PVH entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Maximum number of non-empty `PT_LOAD` segments an image may have. Fixed so that the parsed
/// image needs no heap; real images have two to four.
pub const MAX_SEGMENTS: usize = 16;

/// Size of the ELF64 file header.
const EHDR_SIZE: usize = 64;
/// Size of one ELF64 program header (`Elf64_Phdr`).
const PHDR_SIZE: usize = 56;
/// Size of an ELF note header (`namesz`, `descsz`, `type`).
const NOTE_HEADER_SIZE: usize = 12;

const PF_X: u32 = 1;
const PF_W: u32 = 2;
const PF_R: u32 = 4;

/// Access permissions of a loadable segment, decoded from `p_flags`.
///
/// Kept so the loader can map code read-only/executable and data non-executable when it builds
/// the guest's initial page tables or EPT permissions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentFlags {
    /// `PF_R`.
    pub read: bool,
    /// `PF_W`.
    pub write: bool,
    /// `PF_X`.
    pub execute: bool,
}

impl SegmentFlags {
    /// Decodes the `PF_R`/`PF_W`/`PF_X` bits of `p_flags`; other (OS/processor specific) bits
    /// are ignored because nothing in the loader gives them meaning.
    pub const fn from_p_flags(p_flags: u32) -> Self {
        Self { read: p_flags & PF_R != 0, write: p_flags & PF_W != 0, execute: p_flags & PF_X != 0 }
    }

    /// Re-encodes the flags as `p_flags` bits.
    pub const fn to_p_flags(self) -> u32 {
        (if self.read { PF_R } else { 0 }) | (if self.write { PF_W } else { 0 }) | (if self.execute { PF_X } else { 0 })
    }
}

/// One `PT_LOAD` segment with `p_memsz > 0`.
///
/// Invariants established by [`ElfImage::parse`]: `file_offset + file_size` lies inside the
/// file, `file_size <= mem_size`, and `paddr + mem_size` does not overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSegment {
    /// Physical load address (`p_paddr`); images are entered with paging off, so this, not
    /// `p_vaddr`, is where the bytes must go.
    pub paddr: u64,
    /// Offset of the segment's bytes in the file (`p_offset`).
    pub file_offset: u64,
    /// Number of bytes to copy from the file (`p_filesz`).
    pub file_size: u64,
    /// Number of bytes the segment occupies in memory (`p_memsz`); the tail beyond `file_size`
    /// is zero-filled (`.bss`).
    pub mem_size: u64,
    /// Permissions from `p_flags`.
    pub flags: SegmentFlags,
}

impl LoadSegment {
    /// One past the last physical byte of the segment. Cannot overflow for segments returned by
    /// [`ElfImage::segments`]; saturates for hand-made values.
    pub const fn end(&self) -> u64 {
        self.paddr.saturating_add(self.mem_size)
    }
}

/// Why an image was rejected. Segment indices are indices into the ELF program header table
/// (as printed by `readelf -l`), so a message can be matched to the offending header directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfError {
    /// The file ends before the named structure does.
    Truncated {
        /// Which structure was cut off.
        what: &'static str,
    },
    /// The first four bytes are not `\x7fELF`.
    BadMagic,
    /// `e_ident[EI_CLASS]` is not `ELFCLASS64`.
    NotElf64,
    /// `e_ident[EI_DATA]` is not `ELFDATA2LSB`.
    NotLittleEndian,
    /// `e_machine` is not `EM_X86_64` (62); carries the value found.
    WrongMachine(u16),
    /// `e_type` is not `ET_EXEC` (2); carries the value found.
    NotExecutable(u16),
    /// `e_phentsize` is not 56 (`sizeof(Elf64_Phdr)`); carries the value found.
    BadProgramHeaderSize(u16),
    /// The program header table (`e_phoff .. e_phoff + e_phnum * 56`) is not inside the file.
    ProgramHeadersOutOfFile,
    /// The file range of program header `index` is not inside the file.
    SegmentOutOfFile {
        /// Program header index.
        index: usize,
    },
    /// Program header `index` has `p_filesz > p_memsz`.
    FileSizeExceedsMemSize {
        /// Program header index.
        index: usize,
    },
    /// Program header `index` has `p_paddr + p_memsz` beyond the 64-bit address space.
    AddressOverflow {
        /// Program header index.
        index: usize,
    },
    /// Two `PT_LOAD` segments share physical memory; loading one would clobber the other.
    SegmentOverlap {
        /// Program header index of the earlier segment.
        first: usize,
        /// Program header index of the later segment.
        second: usize,
    },
    /// More than [`MAX_SEGMENTS`] non-empty `PT_LOAD` segments.
    TooManySegments,
    /// No `PT_LOAD` segment with `p_memsz > 0`: there is nothing to run.
    NoLoadableSegments,
    /// The note at file offset `offset` does not fit in its `PT_NOTE` segment, or the PVH entry
    /// note's descriptor is neither 4 nor 8 bytes.
    BadNote {
        /// File offset of the start of the malformed note header.
        offset: u64,
    },
    /// The 8-byte PVH entry descriptor holds a value that does not fit in 32 bits.
    PvhEntryTooHigh(u64),
    /// Segment `index` does not lie inside the RAM window given to [`ElfImage::check_fits`].
    SegmentOutsideRam {
        /// Program header index.
        index: usize,
        /// First physical byte of the segment.
        paddr: u64,
        /// One past the last physical byte of the segment.
        end: u64,
    },
}

fn machine_name(machine: u16) -> &'static str {
    match machine {
        0 => "EM_NONE",
        3 => "EM_386",
        40 => "EM_ARM",
        62 => "EM_X86_64",
        183 => "EM_AARCH64",
        243 => "EM_RISCV",
        _ => "unknown machine",
    }
}

fn type_name(e_type: u16) -> &'static str {
    match e_type {
        0 => "ET_NONE",
        1 => "ET_REL",
        2 => "ET_EXEC",
        3 => "ET_DYN",
        4 => "ET_CORE",
        _ => "unknown type",
    }
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ElfError::Truncated { what } => {
                write!(f, "ELF image truncated: file ends inside the {what}")
            }
            ElfError::BadMagic => f.write_str("not an ELF file: first four bytes are not 0x7f 'E' 'L' 'F'"),
            ElfError::NotElf64 => f.write_str("ELF image is not 64-bit: e_ident[EI_CLASS] is not ELFCLASS64 (2)"),
            ElfError::NotLittleEndian => {
                f.write_str("ELF image is not little endian: e_ident[EI_DATA] is not ELFDATA2LSB (1)")
            }
            ElfError::WrongMachine(m) => {
                write!(f, "ELF e_machine is {m} ({}), expected 62 (EM_X86_64)", machine_name(m))
            }
            ElfError::NotExecutable(t) => write!(
                f,
                "ELF e_type is {t} ({}), expected 2 (ET_EXEC): images must be statically linked \
                 at fixed physical addresses",
                type_name(t)
            ),
            ElfError::BadProgramHeaderSize(s) => write!(f, "ELF e_phentsize is {s}, expected 56 (sizeof(Elf64_Phdr))"),
            ElfError::ProgramHeadersOutOfFile => {
                f.write_str("ELF program header table (e_phoff + e_phnum * 56) extends past the end of the file")
            }
            ElfError::SegmentOutOfFile { index } => {
                write!(f, "ELF program header {index}: p_offset + p_filesz extends past the end of the file")
            }
            ElfError::FileSizeExceedsMemSize { index } => {
                write!(f, "ELF program header {index}: p_filesz is larger than p_memsz")
            }
            ElfError::AddressOverflow { index } => {
                write!(f, "ELF program header {index}: p_paddr + p_memsz overflows the 64-bit address space")
            }
            ElfError::SegmentOverlap { first, second } => {
                write!(f, "ELF PT_LOAD program headers {first} and {second} overlap in physical memory")
            }
            ElfError::TooManySegments => write!(f, "ELF image has more than {MAX_SEGMENTS} non-empty PT_LOAD segments"),
            ElfError::NoLoadableSegments => f.write_str("ELF image has no PT_LOAD segment with p_memsz > 0"),
            ElfError::BadNote { offset } => write!(
                f,
                "malformed ELF note at file offset {offset:#x} (runs past its PT_NOTE segment, \
                 or PVH entry descriptor is not 4 or 8 bytes)"
            ),
            ElfError::PvhEntryTooHigh(v) => {
                write!(f, "PVH entry point {v:#x} (XEN_ELFNOTE_PHYS32_ENTRY) does not fit in 32 bits")
            }
            ElfError::SegmentOutsideRam { index, paddr, end } => write!(
                f,
                "ELF program header {index}: segment [{paddr:#x}, {end:#x}) lies outside the \
                 available RAM window"
            ),
        }
    }
}

impl core::error::Error for ElfError {}

/// A validated ELF64 PVH image borrowing the file bytes.
#[derive(Clone, Debug)]
pub struct ElfImage<'a> {
    data: &'a [u8],
    entry: u64,
    pvh_entry: Option<u32>,
    segments: heapless::Vec<LoadSegment, MAX_SEGMENTS>,
    /// Program header index of each entry of `segments`, so later errors (`check_fits`) name the
    /// same index as parse-time errors do.
    phdr_index: heapless::Vec<usize, MAX_SEGMENTS>,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    b.get(off..)?.first_chunk().map(|c| u16::from_le_bytes(*c))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..)?.first_chunk().map(|c| u32::from_le_bytes(*c))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    b.get(off..)?.first_chunk().map(|c| u64::from_le_bytes(*c))
}

/// Rounds `x` up to a multiple of `align` (a power of two); `None` on overflow.
fn align_up(x: usize, align: usize) -> Option<usize> {
    let mask = align.checked_sub(1)?;
    Some(x.checked_add(mask)? & !mask)
}

/// Returns the bytes `[offset, offset + size)` of `data`, or `None` if that range is not inside
/// it (including when the end overflows).
fn file_range(data: &[u8], offset: u64, size: u64) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    let len = usize::try_from(size).ok()?;
    data.get(start..start.checked_add(len)?)
}

/// A raw program header, fields as in `Elf64_Phdr`.
struct Phdr {
    p_type: u32,
    p_flags: u32,
    p_offset: u64,
    p_paddr: u64,
    p_filesz: u64,
    p_memsz: u64,
    p_align: u64,
}

impl Phdr {
    fn read(b: &[u8]) -> Option<Self> {
        Some(Self {
            p_type: u32_at(b, 0)?,
            p_flags: u32_at(b, 4)?,
            p_offset: u64_at(b, 8)?,
            p_paddr: u64_at(b, 24)?,
            p_filesz: u64_at(b, 32)?,
            p_memsz: u64_at(b, 40)?,
            p_align: u64_at(b, 48)?,
        })
    }
}

/// Walks the notes of one `PT_NOTE` segment and returns the PVH entry point if present.
///
/// `region` is the segment's bytes and `region_offset` its file offset (for error messages).
/// Notes are padded to 4 bytes, except in segments with `p_align == 8` which the gABI and GNU
/// tools pad to 8 (e.g. `.note.gnu.property`); handling both means a stray 8-aligned note
/// segment does not make an otherwise good image unparseable.
fn find_pvh_entry(region: &[u8], region_offset: u64, align: usize) -> Result<Option<u32>, ElfError> {
    let mut found = None;
    let mut pos = 0usize;
    while pos < region.len() {
        // `pos <= region.len()` and `region` lies inside the file, so this cannot overflow.
        let offset = region_offset.saturating_add(pos as u64);
        let bad = ElfError::BadNote { offset };
        let header = region.get(pos..).ok_or(bad)?;
        let namesz = u32_at(header, 0).ok_or(bad)?;
        let descsz = u32_at(header, 4).ok_or(bad)?;
        let n_type = u32_at(header, 8).ok_or(bad)?;
        let name_start = pos.checked_add(NOTE_HEADER_SIZE).ok_or(bad)?;
        let name_end = name_start.checked_add(usize::try_from(namesz).map_err(|_| bad)?).ok_or(bad)?;
        let desc_start = align_up(name_end, align).ok_or(bad)?;
        let desc_end = desc_start.checked_add(usize::try_from(descsz).map_err(|_| bad)?).ok_or(bad)?;
        let name = region.get(name_start..name_end).ok_or(bad)?;
        let desc = region.get(desc_start..desc_end).ok_or(bad)?;

        // Accept the name with or without its NUL; the ABI says "Xen\0" (namesz 4).
        let is_xen = name == b"Xen\0" || name == b"Xen";
        if is_xen && n_type == XEN_ELFNOTE_PHYS32_ENTRY && found.is_none() {
            let entry = match *desc {
                [a, b, c, d] => u32::from_le_bytes([a, b, c, d]),
                [a, b, c, d, e, f, g, h] => {
                    let wide = u64::from_le_bytes([a, b, c, d, e, f, g, h]);
                    u32::try_from(wide).map_err(|_| ElfError::PvhEntryTooHigh(wide))?
                }
                _ => return Err(bad),
            };
            // The first PHYS32_ENTRY note wins, like Xen's and QEMU's loaders.
            found = Some(entry);
        }

        // The final note's trailing padding may be omitted from p_filesz; stop cleanly then.
        match align_up(desc_end, align) {
            Some(next) => pos = next,
            None => break,
        }
    }
    Ok(found)
}

impl<'a> ElfImage<'a> {
    /// Parses and validates an image. See the module docs for what is checked; every offset
    /// and size from the file is treated as hostile.
    pub fn parse(data: &'a [u8]) -> Result<Self, ElfError> {
        // Identification first, so a short non-ELF blob reports BadMagic, not Truncated.
        let magic = data.get(..4).ok_or(ElfError::Truncated { what: "ELF identification (e_ident)" })?;
        if magic != b"\x7fELF" {
            return Err(ElfError::BadMagic);
        }
        let ident_truncated = ElfError::Truncated { what: "ELF identification (e_ident)" };
        if *data.get(4).ok_or(ident_truncated)? != 2 {
            return Err(ElfError::NotElf64);
        }
        if *data.get(5).ok_or(ident_truncated)? != 1 {
            return Err(ElfError::NotLittleEndian);
        }

        let header_truncated = ElfError::Truncated { what: "ELF file header" };
        let ehdr = data.get(..EHDR_SIZE).ok_or(header_truncated)?;
        let e_type = u16_at(ehdr, 16).ok_or(header_truncated)?;
        let e_machine = u16_at(ehdr, 18).ok_or(header_truncated)?;
        let e_entry = u64_at(ehdr, 24).ok_or(header_truncated)?;
        let e_phoff = u64_at(ehdr, 32).ok_or(header_truncated)?;
        let e_phentsize = u16_at(ehdr, 54).ok_or(header_truncated)?;
        let e_phnum = u16_at(ehdr, 56).ok_or(header_truncated)?;

        if e_machine != EM_X86_64 {
            return Err(ElfError::WrongMachine(e_machine));
        }
        if e_type != ET_EXEC {
            return Err(ElfError::NotExecutable(e_type));
        }
        if usize::from(e_phentsize) != PHDR_SIZE {
            return Err(ElfError::BadProgramHeaderSize(e_phentsize));
        }

        // e_phnum is a u16, so the table is at most 65535 * 56 bytes: no overflow in the size.
        let table_size = usize::from(e_phnum) * PHDR_SIZE;
        let table = file_range(data, e_phoff, table_size as u64).ok_or(ElfError::ProgramHeadersOutOfFile)?;

        let mut segments = heapless::Vec::<LoadSegment, MAX_SEGMENTS>::new();
        let mut phdr_index = heapless::Vec::<usize, MAX_SEGMENTS>::new();
        let mut pvh_entry = None;

        for (index, raw) in table.chunks_exact(PHDR_SIZE).enumerate() {
            let ph = Phdr::read(raw).ok_or(ElfError::Truncated { what: "program header" })?;
            match ph.p_type {
                PT_LOAD => {
                    if file_range(data, ph.p_offset, ph.p_filesz).is_none() {
                        return Err(ElfError::SegmentOutOfFile { index });
                    }
                    if ph.p_filesz > ph.p_memsz {
                        return Err(ElfError::FileSizeExceedsMemSize { index });
                    }
                    if ph.p_paddr.checked_add(ph.p_memsz).is_none() {
                        return Err(ElfError::AddressOverflow { index });
                    }
                    if ph.p_memsz == 0 {
                        // Occupies no memory: nothing to load, cannot overlap anything.
                        continue;
                    }
                    let seg = LoadSegment {
                        paddr: ph.p_paddr,
                        file_offset: ph.p_offset,
                        file_size: ph.p_filesz,
                        mem_size: ph.p_memsz,
                        flags: SegmentFlags::from_p_flags(ph.p_flags),
                    };
                    segments.push(seg).map_err(|_| ElfError::TooManySegments)?;
                    phdr_index.push(index).map_err(|_| ElfError::TooManySegments)?;
                }
                PT_NOTE => {
                    let region =
                        file_range(data, ph.p_offset, ph.p_filesz).ok_or(ElfError::SegmentOutOfFile { index })?;
                    let align = if ph.p_align == 8 { 8 } else { 4 };
                    if let Some(entry) = find_pvh_entry(region, ph.p_offset, align)? {
                        pvh_entry = pvh_entry.or(Some(entry));
                    }
                }
                _ => {}
            }
        }

        if segments.is_empty() {
            return Err(ElfError::NoLoadableSegments);
        }

        // At most 16 segments: the quadratic check is 120 comparisons.
        for (i, (a, &ai)) in segments.iter().zip(phdr_index.iter()).enumerate() {
            for (b, &bi) in segments.iter().zip(phdr_index.iter()).skip(i + 1) {
                // End addresses were checked not to overflow above.
                if a.paddr < b.end() && b.paddr < a.end() {
                    return Err(ElfError::SegmentOverlap { first: ai, second: bi });
                }
            }
        }

        Ok(Self { data, entry: e_entry, pvh_entry, segments, phdr_index })
    }

    /// `e_entry`, the 64-bit entry point. Informational only: PVH images are entered at
    /// [`pvh_entry`](Self::pvh_entry) in 32-bit mode.
    pub fn entry(&self) -> u64 {
        self.entry
    }

    /// The 32-bit physical entry point from the first `XEN_ELFNOTE_PHYS32_ENTRY` note, or
    /// `None` if the image has no such note (and so cannot be booted the PVH way).
    pub fn pvh_entry(&self) -> Option<u32> {
        self.pvh_entry
    }

    /// The non-empty `PT_LOAD` segments in program header order (at least one, at most
    /// [`MAX_SEGMENTS`]), pairwise disjoint in physical memory.
    pub fn segments(&self) -> &[LoadSegment] {
        &self.segments
    }

    /// The `file_size` bytes to copy for `seg`.
    ///
    /// Infallible because the range was validated at parse time. A `seg` not obtained from this
    /// image whose range is outside the file yields an empty slice rather than panicking.
    pub fn segment_data(&self, seg: &LoadSegment) -> &'a [u8] {
        file_range(self.data, seg.file_offset, seg.file_size).unwrap_or(&[])
    }

    /// The whole file the image was parsed from.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// Lowest `paddr` and highest `paddr + mem_size` of all segments: the physical range the
    /// loader must reserve.
    pub fn span(&self) -> (u64, u64) {
        let low = self.segments.iter().map(|s| s.paddr).min().unwrap_or(0);
        let high = self.segments.iter().map(|s| s.end()).max().unwrap_or(0);
        (low, high)
    }

    /// Checks that every segment lies inside `[base, base + size)`, e.g. the RAM the loader
    /// gives the domain, before anything is copied. The error names the first segment (by
    /// program header index) that does not. A window reaching past 2^64 is clamped to it.
    pub fn check_fits(&self, base: u64, size: u64) -> Result<(), ElfError> {
        let limit = u128::from(base) + u128::from(size);
        for (seg, &index) in self.segments.iter().zip(self.phdr_index.iter()) {
            let end = u128::from(seg.paddr) + u128::from(seg.mem_size);
            if seg.paddr < base || end > limit {
                return Err(ElfError::SegmentOutsideRam { index, paddr: seg.paddr, end: seg.end() });
            }
        }
        Ok(())
    }

    /// Program header index of `segments()[i]`, for callers reporting their own errors.
    pub fn segment_phdr_index(&self, i: usize) -> Option<usize> {
        self.phdr_index.get(i).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    struct Ph {
        p_type: u32,
        flags: u32,
        /// Offset of the data inside the builder body, or an absolute offset if `raw_offset`.
        body_off: u64,
        raw_offset: Option<u64>,
        paddr: u64,
        filesz: u64,
        memsz: u64,
        align: u64,
    }

    #[derive(Clone, Debug)]
    struct Builder {
        etype: u16,
        machine: u16,
        entry: u64,
        phentsize: u16,
        phs: Vec<Ph>,
        body: Vec<u8>,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                etype: ET_EXEC,
                machine: EM_X86_64,
                entry: 0xffff_ffff_8010_0000,
                phentsize: PHDR_SIZE as u16,
                phs: Vec::new(),
                body: Vec::new(),
            }
        }

        fn add_body(&mut self, bytes: &[u8]) -> u64 {
            self.body.resize(self.body.len().next_multiple_of(8), 0);
            let off = self.body.len() as u64;
            self.body.extend_from_slice(bytes);
            off
        }

        fn load(mut self, paddr: u64, bytes: &[u8], memsz: u64, flags: u32) -> Self {
            let body_off = self.add_body(bytes);
            self.phs.push(Ph {
                p_type: PT_LOAD,
                flags,
                body_off,
                raw_offset: None,
                paddr,
                filesz: bytes.len() as u64,
                memsz,
                align: 0x1000,
            });
            self
        }

        fn note_segment(mut self, bytes: &[u8], align: u64) -> Self {
            let body_off = self.add_body(bytes);
            self.phs.push(Ph {
                p_type: PT_NOTE,
                flags: PF_R,
                body_off,
                raw_offset: None,
                paddr: 0,
                filesz: bytes.len() as u64,
                memsz: bytes.len() as u64,
                align,
            });
            self
        }

        fn pvh_note4(self, entry: u32) -> Self {
            let n = note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &entry.to_le_bytes(), 4);
            self.note_segment(&n, 4)
        }

        fn pvh_note8(self, entry: u64) -> Self {
            let n = note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &entry.to_le_bytes(), 4);
            self.note_segment(&n, 4)
        }

        fn data_start(&self) -> u64 {
            (EHDR_SIZE + self.phs.len() * PHDR_SIZE) as u64
        }

        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(b"\x7fELF");
            out.extend_from_slice(&[2, 1, 1, 0]);
            out.extend_from_slice(&[0; 8]);
            out.extend_from_slice(&self.etype.to_le_bytes());
            out.extend_from_slice(&self.machine.to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
            out.extend_from_slice(&self.entry.to_le_bytes());
            out.extend_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
            out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
            out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
            out.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
            out.extend_from_slice(&self.phentsize.to_le_bytes());
            out.extend_from_slice(&(self.phs.len() as u16).to_le_bytes());
            out.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
            out.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
            out.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
            assert_eq!(out.len(), EHDR_SIZE);
            let start = self.data_start();
            for ph in &self.phs {
                let off = ph.raw_offset.unwrap_or(start + ph.body_off);
                out.extend_from_slice(&ph.p_type.to_le_bytes());
                out.extend_from_slice(&ph.flags.to_le_bytes());
                out.extend_from_slice(&off.to_le_bytes());
                out.extend_from_slice(&ph.paddr.to_le_bytes()); // vaddr
                out.extend_from_slice(&ph.paddr.to_le_bytes());
                out.extend_from_slice(&ph.filesz.to_le_bytes());
                out.extend_from_slice(&ph.memsz.to_le_bytes());
                out.extend_from_slice(&ph.align.to_le_bytes());
            }
            out.extend_from_slice(&self.body);
            out
        }
    }

    fn note(name: &[u8], n_type: u32, desc: &[u8], align: usize) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&n_type.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().next_multiple_of(align), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(align), 0);
        n
    }

    const CODE: &[u8] = &[0x90; 40];
    const DATA: &[u8] = &[0xAA; 24];

    /// A typical image: text at 1 MiB, data+bss after it, PVH note.
    fn typical() -> Builder {
        Builder::new().pvh_note4(0x10_0000).load(0x10_0000, CODE, 0x1000, PF_R | PF_X).load(
            0x10_1000,
            DATA,
            0x3000,
            PF_R | PF_W,
        )
    }

    #[test]
    fn valid_image_with_4_byte_note() {
        let bytes = typical().build();
        let img = ElfImage::parse(&bytes).unwrap();
        assert_eq!(img.entry(), 0xffff_ffff_8010_0000);
        assert_eq!(img.pvh_entry(), Some(0x10_0000));
        let segs = img.segments();
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[0].paddr, 0x10_0000);
        assert_eq!(segs[0].file_size, CODE.len() as u64);
        assert_eq!(segs[0].mem_size, 0x1000);
        assert_eq!(segs[0].flags, SegmentFlags { read: true, write: false, execute: true });
        assert_eq!(segs[1].paddr, 0x10_1000);
        assert_eq!(segs[1].mem_size, 0x3000);
        assert_eq!(segs[1].flags, SegmentFlags { read: true, write: true, execute: false });
        assert_eq!(img.segment_data(&segs[0]), CODE);
        assert_eq!(img.segment_data(&segs[1]), DATA);
        assert_eq!(img.span(), (0x10_0000, 0x10_4000));
        // Program header 0 is the note, so the loads are headers 1 and 2.
        assert_eq!(img.segment_phdr_index(0), Some(1));
        assert_eq!(img.segment_phdr_index(1), Some(2));
        assert_eq!(img.segment_phdr_index(2), None);
    }

    #[test]
    fn valid_image_with_8_byte_note() {
        let bytes = Builder::new().load(0x20_0000, CODE, 0x100, PF_R | PF_X).pvh_note8(0x20_0040).build();
        let img = ElfImage::parse(&bytes).unwrap();
        assert_eq!(img.pvh_entry(), Some(0x20_0040));
        assert_eq!(img.segments().len(), 1);
    }

    #[test]
    fn eight_byte_note_above_4g_is_rejected() {
        let bytes = Builder::new().load(0x20_0000, CODE, 0x100, PF_R | PF_X).pvh_note8(0x1_0000_0000).build();
        assert_eq!(ElfImage::parse(&bytes).unwrap_err(), ElfError::PvhEntryTooHigh(0x1_0000_0000));
    }

    #[test]
    fn odd_descriptor_size_is_bad_note() {
        let n = note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &[1, 2, 3, 4, 5, 6], 4);
        let b = Builder::new().note_segment(&n, 4).load(0x10_0000, CODE, 0x100, PF_R);
        let offset = b.data_start();
        let bytes = b.build();
        assert_eq!(ElfImage::parse(&bytes).unwrap_err(), ElfError::BadNote { offset });
    }

    #[test]
    fn note_running_past_segment_is_bad_note() {
        // Two notes; the second claims a descriptor longer than what remains.
        let mut n = note(b"GNU\0", 1, &[0; 4], 4);
        let first_len = n.len() as u64;
        let mut second = note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &[0; 4], 4);
        second[4..8].copy_from_slice(&100u32.to_le_bytes());
        n.extend_from_slice(&second);
        let b = Builder::new().note_segment(&n, 4).load(0x10_0000, CODE, 0x100, PF_R);
        let offset = b.data_start() + first_len;
        let bytes = b.build();
        assert_eq!(ElfImage::parse(&bytes).unwrap_err(), ElfError::BadNote { offset });
    }

    #[test]
    fn pvh_note_found_among_other_notes() {
        let mut n = note(b"GNU\0", 3, &[0xde, 0xad, 0xbe, 0xef, 0x11], 4);
        n.extend_from_slice(&note(b"Xen\0", 6, b"linux\0", 4));
        n.extend_from_slice(&note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, &0x1234u32.to_le_bytes(), 4));
        n.extend_from_slice(&note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &0x9999u32.to_le_bytes(), 4));
        let bytes = Builder::new().load(0x1000, CODE, 0x100, PF_R).note_segment(&n, 4).build();
        let img = ElfImage::parse(&bytes).unwrap();
        assert_eq!(img.pvh_entry(), Some(0x1234));
    }

    #[test]
    fn eight_aligned_note_segment() {
        let n = note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &0x4000u64.to_le_bytes(), 8);
        let mut gnu = note(b"GNU\0", 5, &[0; 12], 8);
        gnu.extend_from_slice(&n);
        let bytes = Builder::new().load(0x1000, CODE, 0x100, PF_R).note_segment(&gnu, 8).build();
        assert_eq!(ElfImage::parse(&bytes).unwrap().pvh_entry(), Some(0x4000));
    }

    #[test]
    fn missing_note_gives_none() {
        let bytes = Builder::new()
            .load(0x10_0000, CODE, 0x100, PF_R | PF_X)
            .note_segment(&note(b"GNU\0", 1, &[0; 16], 4), 4)
            .build();
        let img = ElfImage::parse(&bytes).unwrap();
        assert_eq!(img.pvh_entry(), None);
        // A Xen note of another type is not the entry.
        let bytes = Builder::new()
            .load(0x10_0000, CODE, 0x100, PF_R | PF_X)
            .note_segment(&note(b"Xen\0", 1, &[0; 8], 4), 4)
            .build();
        assert_eq!(ElfImage::parse(&bytes).unwrap().pvh_entry(), None);
    }

    #[test]
    fn truncated_header() {
        let bytes = typical().build();
        assert_eq!(
            ElfImage::parse(&bytes[..2]).unwrap_err(),
            ElfError::Truncated { what: "ELF identification (e_ident)" }
        );
        assert_eq!(
            ElfImage::parse(&bytes[..5]).unwrap_err(),
            ElfError::Truncated { what: "ELF identification (e_ident)" }
        );
        for len in 6..EHDR_SIZE {
            assert_eq!(
                ElfImage::parse(&bytes[..len]).unwrap_err(),
                ElfError::Truncated { what: "ELF file header" },
                "len {len}"
            );
        }
        assert_eq!(
            ElfImage::parse(&[]).unwrap_err().to_string(),
            "ELF image truncated: file ends inside the ELF identification (e_ident)"
        );
    }

    #[test]
    fn truncated_program_headers() {
        let bytes = typical().build();
        let table_end = EHDR_SIZE + 3 * PHDR_SIZE;
        for len in EHDR_SIZE..table_end {
            assert_eq!(ElfImage::parse(&bytes[..len]).unwrap_err(), ElfError::ProgramHeadersOutOfFile, "len {len}");
        }
        // e_phoff so large that offset + size overflows.
        let mut bytes = typical().build();
        bytes[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(ElfImage::parse(&bytes).unwrap_err(), ElfError::ProgramHeadersOutOfFile);
    }

    #[test]
    fn identification_errors() {
        let mut bytes = typical().build();
        bytes[0] = b'X';
        assert_eq!(ElfImage::parse(&bytes).unwrap_err(), ElfError::BadMagic);
        let mut bytes = typical().build();
        bytes[4] = 1;
        assert_eq!(ElfImage::parse(&bytes).unwrap_err(), ElfError::NotElf64);
        let mut bytes = typical().build();
        bytes[5] = 2;
        assert_eq!(ElfImage::parse(&bytes).unwrap_err(), ElfError::NotLittleEndian);
    }

    #[test]
    fn wrong_machine() {
        for m in [3u16, 183] {
            let mut b = typical();
            b.machine = m;
            let err = ElfImage::parse(&b.build()).unwrap_err();
            assert_eq!(err, ElfError::WrongMachine(m));
        }
        let mut b = typical();
        b.machine = 183;
        assert_eq!(
            ElfImage::parse(&b.build()).unwrap_err().to_string(),
            "ELF e_machine is 183 (EM_AARCH64), expected 62 (EM_X86_64)"
        );
    }

    #[test]
    fn dyn_is_not_executable() {
        let mut b = typical();
        b.etype = 3;
        assert_eq!(ElfImage::parse(&b.build()).unwrap_err(), ElfError::NotExecutable(3));
    }

    #[test]
    fn bad_phentsize() {
        let mut b = typical();
        b.phentsize = 64;
        assert_eq!(ElfImage::parse(&b.build()).unwrap_err(), ElfError::BadProgramHeaderSize(64));
    }

    #[test]
    fn overlapping_segments() {
        let bytes = Builder::new()
            .load(0x10_0000, CODE, 0x2000, PF_R)
            .pvh_note4(0x10_0000)
            .load(0x10_1fff, DATA, 0x20, PF_R)
            .build();
        let err = ElfImage::parse(&bytes).unwrap_err();
        assert_eq!(err, ElfError::SegmentOverlap { first: 0, second: 2 });
        assert_eq!(err.to_string(), "ELF PT_LOAD program headers 0 and 2 overlap in physical memory");
        // Adjacent is fine.
        let bytes = Builder::new().load(0x10_0000, CODE, 0x2000, PF_R).load(0x10_2000, DATA, 0x20, PF_R).build();
        assert!(ElfImage::parse(&bytes).is_ok());
        // Containment is an overlap too.
        let bytes = Builder::new().load(0x10_0000, CODE, 0x10_0000, PF_R).load(0x10_2000, DATA, 0x20, PF_R).build();
        assert_eq!(ElfImage::parse(&bytes).unwrap_err(), ElfError::SegmentOverlap { first: 0, second: 1 });
    }

    #[test]
    fn segment_beyond_file_end() {
        let mut b = typical();
        b.phs[2].filesz += 1; // DATA is last in the body: one byte past EOF.
        b.phs[2].memsz = 0x3000;
        assert_eq!(ElfImage::parse(&b.build()).unwrap_err(), ElfError::SegmentOutOfFile { index: 2 });
        let mut b = typical();
        b.phs[1].raw_offset = Some(u64::MAX - 4);
        assert_eq!(ElfImage::parse(&b.build()).unwrap_err(), ElfError::SegmentOutOfFile { index: 1 });
        // A note segment outside the file is reported the same way.
        let mut b = typical();
        b.phs[0].raw_offset = Some(1 << 40);
        assert_eq!(ElfImage::parse(&b.build()).unwrap_err(), ElfError::SegmentOutOfFile { index: 0 });
    }

    #[test]
    fn filesz_greater_than_memsz() {
        let mut b = typical();
        b.phs[1].memsz = CODE.len() as u64 - 1;
        let err = ElfImage::parse(&b.build()).unwrap_err();
        assert_eq!(err, ElfError::FileSizeExceedsMemSize { index: 1 });
        assert_eq!(err.to_string(), "ELF program header 1: p_filesz is larger than p_memsz");
    }

    #[test]
    fn address_overflow() {
        let bytes = Builder::new().load(u64::MAX - 0xff, CODE, 0x100, PF_R).build();
        assert_eq!(ElfImage::parse(&bytes).unwrap_err(), ElfError::AddressOverflow { index: 0 });
        // Ending exactly at u64::MAX still has a representable end address.
        let bytes = Builder::new().load(u64::MAX - 0x100, CODE, 0x100, PF_R).build();
        assert!(ElfImage::parse(&bytes).is_ok());
    }

    #[test]
    fn no_loadable_segments() {
        let bytes = Builder::new().pvh_note4(0x1000).build();
        assert_eq!(ElfImage::parse(&bytes).unwrap_err(), ElfError::NoLoadableSegments);
        // A PT_LOAD with p_memsz 0 does not count and is not returned.
        let bytes = Builder::new().load(0x1000, &[], 0, PF_R).build();
        assert_eq!(ElfImage::parse(&bytes).unwrap_err(), ElfError::NoLoadableSegments);
        let bytes = Builder::new().load(0x1000, &[], 0, PF_R).load(0x1000, CODE, 0x100, PF_R).build();
        let img = ElfImage::parse(&bytes).unwrap();
        assert_eq!(img.segments().len(), 1);
        assert_eq!(img.segment_phdr_index(0), Some(1));
    }

    #[test]
    fn too_many_segments() {
        let mut b = Builder::new();
        for i in 0..MAX_SEGMENTS as u64 {
            b = b.load(0x10_0000 + i * 0x1000, &[1, 2, 3], 0x1000, PF_R);
        }
        assert_eq!(ElfImage::parse(&b.build()).unwrap().segments().len(), 16);
        b = b.load(0x20_0000, &[1], 0x1000, PF_R);
        assert_eq!(ElfImage::parse(&b.build()).unwrap_err(), ElfError::TooManySegments);
    }

    #[test]
    fn bss_only_segment() {
        let bytes =
            Builder::new().load(0x10_0000, CODE, 0x100, PF_R | PF_X).load(0x20_0000, &[], 0x5000, PF_R | PF_W).build();
        let img = ElfImage::parse(&bytes).unwrap();
        assert_eq!(img.segment_data(&img.segments()[1]), &[] as &[u8]);
        assert_eq!(img.span(), (0x10_0000, 0x20_5000));
    }

    #[test]
    fn check_fits() {
        let bytes = typical().build();
        let img = ElfImage::parse(&bytes).unwrap();
        assert_eq!(img.check_fits(0, 0x1_0000_0000), Ok(()));
        assert_eq!(img.check_fits(0x10_0000, 0x4000), Ok(()));
        assert_eq!(img.check_fits(0, u64::MAX), Ok(()));
        assert_eq!(img.check_fits(0x10_0000, u64::MAX), Ok(()));
        assert_eq!(
            img.check_fits(0x10_0000, 0x3fff),
            Err(ElfError::SegmentOutsideRam { index: 2, paddr: 0x10_1000, end: 0x10_4000 })
        );
        let err = img.check_fits(0x10_0001, 0x10_0000).unwrap_err();
        assert_eq!(err, ElfError::SegmentOutsideRam { index: 1, paddr: 0x10_0000, end: 0x10_1000 });
        assert_eq!(
            err.to_string(),
            "ELF program header 1: segment [0x100000, 0x101000) lies outside the available RAM window"
        );
        assert!(img.check_fits(0, 0).is_err());
    }

    #[test]
    fn foreign_segment_data_does_not_panic() {
        let bytes = typical().build();
        let img = ElfImage::parse(&bytes).unwrap();
        let bogus = LoadSegment {
            paddr: 0,
            file_offset: u64::MAX,
            file_size: 10,
            mem_size: 10,
            flags: SegmentFlags::default(),
        };
        assert!(img.segment_data(&bogus).is_empty());
    }

    #[test]
    fn flags_round_trip() {
        for bits in 0..8 {
            assert_eq!(SegmentFlags::from_p_flags(bits).to_p_flags(), bits);
        }
        assert_eq!(SegmentFlags::from_p_flags(0xf000_0007).to_p_flags(), 7);
    }

    #[test]
    fn all_errors_display() {
        use std::string::ToString;
        let errs = [
            ElfError::Truncated { what: "x" },
            ElfError::BadMagic,
            ElfError::NotElf64,
            ElfError::NotLittleEndian,
            ElfError::WrongMachine(3),
            ElfError::NotExecutable(3),
            ElfError::BadProgramHeaderSize(1),
            ElfError::ProgramHeadersOutOfFile,
            ElfError::SegmentOutOfFile { index: 4 },
            ElfError::FileSizeExceedsMemSize { index: 4 },
            ElfError::AddressOverflow { index: 4 },
            ElfError::SegmentOverlap { first: 1, second: 4 },
            ElfError::TooManySegments,
            ElfError::NoLoadableSegments,
            ElfError::BadNote { offset: 0x44 },
            ElfError::PvhEntryTooHigh(1 << 33),
            ElfError::SegmentOutsideRam { index: 4, paddr: 1, end: 2 },
        ];
        for e in errs {
            let s = e.to_string();
            assert!(!s.is_empty());
            match e {
                ElfError::SegmentOutOfFile { .. }
                | ElfError::FileSizeExceedsMemSize { .. }
                | ElfError::AddressOverflow { .. }
                | ElfError::SegmentOverlap { .. }
                | ElfError::SegmentOutsideRam { .. } => assert!(s.contains(" 4"), "{s}"),
                ElfError::BadNote { .. } => assert!(s.contains("0x44"), "{s}"),
                _ => {}
            }
        }
    }

    /// Everything `parse` promises about a successful result.
    fn check_invariants(bytes: &[u8], img: &ElfImage<'_>) {
        let segs = img.segments();
        assert!(!segs.is_empty() && segs.len() <= MAX_SEGMENTS);
        for (i, s) in segs.iter().enumerate() {
            assert!(s.mem_size > 0);
            assert!(s.file_size <= s.mem_size);
            assert!(s.paddr.checked_add(s.mem_size).is_some());
            let d = img.segment_data(s);
            assert_eq!(d.len() as u64, s.file_size);
            assert!(s.file_offset + s.file_size <= bytes.len() as u64);
            for t in &segs[i + 1..] {
                assert!(s.end() <= t.paddr || t.end() <= s.paddr);
            }
            let (lo, hi) = img.span();
            assert!(lo <= s.paddr && s.end() <= hi);
        }
        let (lo, hi) = img.span();
        assert_eq!(img.check_fits(lo, hi - lo), Ok(()));
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(img) = ElfImage::parse(&bytes) {
                check_invariants(&bytes, &img);
            }
        }

        #[test]
        fn parse_never_panics_with_valid_prefix(tail in proptest::collection::vec(any::<u8>(), 0..600), phnum in 0u16..20) {
            // A valid identification and header with an arbitrary phdr table and body.
            let mut bytes = typical().build();
            bytes.truncate(EHDR_SIZE);
            bytes[56..58].copy_from_slice(&phnum.to_le_bytes());
            bytes.extend_from_slice(&tail);
            if let Ok(img) = ElfImage::parse(&bytes) {
                check_invariants(&bytes, &img);
            }
        }

        #[test]
        fn mutations_parse_or_error(
            muts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = typical().build();
            for (idx, val) in muts {
                let i = idx.index(bytes.len());
                bytes[i] = val;
            }
            match ElfImage::parse(&bytes) {
                Ok(img) => check_invariants(&bytes, &img),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }

        #[test]
        fn truncations_parse_or_error(len in 0usize..400) {
            let bytes = typical().build();
            let cut = &bytes[..len.min(bytes.len())];
            if let Ok(img) = ElfImage::parse(cut) {
                check_invariants(cut, &img);
            }
        }

        #[test]
        fn arbitrary_segment_tables(
            segs in proptest::collection::vec(
                (any::<u64>(), 0u64..64, any::<u64>(), 0u64..0x2000, any::<bool>()),
                1..20,
            ),
        ) {
            let mut b = Builder::new().pvh_note4(0x1000);
            for (paddr, filesz, memsz, off, small) in segs {
                let memsz = if small { memsz % 0x4000 } else { memsz };
                let mut ph = Ph {
                    p_type: PT_LOAD,
                    flags: PF_R,
                    body_off: 0,
                    raw_offset: Some(off),
                    paddr: if small { paddr % 0x10_0000 } else { paddr },
                    filesz,
                    memsz,
                    align: 0,
                };
                if small {
                    ph.raw_offset = None;
                }
                b.phs.push(ph);
            }
            b.body = vec![0x5a; 0x1000];
            let bytes = b.build();
            if let Ok(img) = ElfImage::parse(&bytes) {
                check_invariants(&bytes, &img);
            }
        }

        #[test]
        fn valid_disjoint_images_parse(
            sizes in proptest::collection::vec((1u64..0x3000, 0u64..64, 0u64..0x2000), 1..=MAX_SEGMENTS),
            entry in any::<u32>(),
        ) {
            let mut b = Builder::new().pvh_note4(entry);
            let mut paddr = 0x10_0000u64;
            let mut expect = Vec::new();
            for (memsz, filesz, gap) in sizes {
                let filesz = filesz.min(memsz);
                let content: Vec<u8> = (0..filesz).map(|i| i as u8).collect();
                b = b.load(paddr, &content, memsz, PF_R | PF_W);
                expect.push((paddr, memsz, content));
                paddr += memsz + gap;
            }
            let bytes = b.build();
            let img = ElfImage::parse(&bytes).unwrap();
            prop_assert_eq!(img.pvh_entry(), Some(entry));
            prop_assert_eq!(img.segments().len(), expect.len());
            for (s, (p, m, c)) in img.segments().iter().zip(&expect) {
                prop_assert_eq!(s.paddr, *p);
                prop_assert_eq!(s.mem_size, *m);
                prop_assert_eq!(img.segment_data(s), &c[..]);
            }
            check_invariants(&bytes, &img);
        }
    }
}

//! The boot bundle: the single `-initrd` module that carries every image the microvisor boots.
//!
//! QEMU hands the microvisor exactly one module, so the build tool packs dom0's ELF (and later
//! other domains' ELFs and a manifest) into one file. Format v1, all integers little endian:
//!
//! ```text
//! header (32 bytes):
//!   magic       [u8; 8]  = b"MVBUNDL1"
//!   version     u32      = 1
//!   entry_count u32      (<= 64)
//!   total_size  u64      length of the whole bundle; bytes after it are ignored (QEMU pads)
//!   reserved    u64      = 0
//! entry table (entry_count x 64 bytes, right after the header):
//!   name        [u8; 48] UTF-8, non-empty, NUL padded (at least one NUL, so <= 47 bytes)
//!   offset      u64      from the start of the bundle, a multiple of 4096
//!   size        u64
//! data: each entry's bytes at its offset; entries never overlap each other or the tables.
//! ```
//!
//! [`Bundle::parse`] validates all of that without allocating; [`build`] (feature `alloc`)
//! writes a bundle for the host tools.

use core::fmt;

// The crate root only links `alloc` with the `alloc` feature; the tests use `build` always.
#[cfg(all(test, not(feature = "alloc")))]
extern crate alloc;

/// The magic at the start of every v1 bundle.
pub const MAGIC: [u8; 8] = *b"MVBUNDL1";
/// The only format version this module reads and writes.
pub const VERSION: u32 = 1;
/// Size of the fixed header.
pub const HEADER_SIZE: usize = 32;
/// Size of one entry-table record.
pub const ENTRY_SIZE: usize = 64;
/// Size of the name field in an entry-table record.
pub const NAME_FIELD_LEN: usize = 48;
/// Longest entry name in bytes (the name field always keeps one NUL).
pub const MAX_NAME_LEN: usize = NAME_FIELD_LEN - 1;
/// Most entries a bundle may have.
pub const MAX_ENTRIES: usize = 64;
/// Alignment of every entry's data offset.
pub const DATA_ALIGN: u64 = 4096;

/// An entry name copied into a fixed buffer, so errors can name the entry without borrowing.
///
/// Always valid UTF-8. If the original name was longer than [`MAX_NAME_LEN`] or not entirely
/// valid UTF-8, this holds its longest valid prefix and [`EntryName::is_truncated`] is true.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct EntryName {
    len: u8,
    truncated: bool,
    buf: [u8; MAX_NAME_LEN],
}

impl EntryName {
    /// Copies `name`, cutting it at a character boundary if it is longer than
    /// [`MAX_NAME_LEN`]. Returns `None` for an empty name.
    pub fn new(name: &str) -> Option<Self> {
        Self::from_bytes_lossy(name.as_bytes())
    }

    /// Copies the longest valid UTF-8 prefix of `bytes` (stopping at the first NUL and at
    /// [`MAX_NAME_LEN`] bytes). Returns `None` if that prefix is empty.
    pub fn from_bytes_lossy(bytes: &[u8]) -> Option<Self> {
        let before_nul = match bytes.iter().position(|&b| b == 0) {
            Some(nul) => bytes.get(..nul).unwrap_or(&[]),
            None => bytes,
        };
        let capped = before_nul.get(..MAX_NAME_LEN).unwrap_or(before_nul);
        let valid = match core::str::from_utf8(capped) {
            Ok(s) => s,
            // `valid_up_to` is always a char boundary of `capped`, so this cannot fail.
            Err(e) => capped.get(..e.valid_up_to()).and_then(|p| core::str::from_utf8(p).ok()).unwrap_or(""),
        };
        if valid.is_empty() {
            return None;
        }
        let mut buf = [0u8; MAX_NAME_LEN];
        for (dst, src) in buf.iter_mut().zip(valid.bytes()) {
            *dst = src;
        }
        let truncated = valid.len() < before_nul.len();
        Some(Self {
            // `valid.len() <= MAX_NAME_LEN < 256`.
            len: u8::try_from(valid.len()).unwrap_or(0),
            truncated,
            buf,
        })
    }

    /// The (possibly truncated) name.
    pub fn as_str(&self) -> &str {
        self.buf.get(..usize::from(self.len)).and_then(|b| core::str::from_utf8(b).ok()).unwrap_or("")
    }

    /// Whether [`EntryName::as_str`] is only a prefix of the real name.
    pub fn is_truncated(&self) -> bool {
        self.truncated
    }
}

impl fmt::Debug for EntryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for EntryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())?;
        if self.truncated {
            f.write_str("...")?;
        }
        Ok(())
    }
}

/// Which entry an error is about: its index in the entry table and, when readable, its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryId {
    /// Index in the entry table (or in the slice given to [`build`]).
    pub index: usize,
    /// The entry's name, if any readable part of it exists.
    pub name: Option<EntryName>,
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bundle entry {}", self.index)?;
        if let Some(name) = &self.name {
            write!(f, " ({name})")?;
        }
        Ok(())
    }
}

/// What is wrong with an entry's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameProblem {
    /// The name is empty.
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`] bytes (in a bundle: the 48-byte field has no
    /// terminating NUL).
    TooLong {
        /// Length of the name, in bytes (48 when read from a bundle: the whole field).
        len: usize,
    },
    /// A NUL byte is followed by a non-NUL byte (or, for [`build`], the name contains a NUL).
    InteriorNul {
        /// Byte position of the offending NUL.
        at: usize,
    },
    /// The name is not valid UTF-8.
    NotUtf8 {
        /// Length of the valid UTF-8 prefix.
        valid_up_to: usize,
    },
}

impl fmt::Display for NameProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameProblem::Empty => f.write_str("name is empty"),
            NameProblem::TooLong { len } => write!(
                f,
                "name is {len} bytes or more without a terminating NUL; at most {MAX_NAME_LEN} \
                 bytes are allowed"
            ),
            NameProblem::InteriorNul { at } => {
                write!(f, "name has a NUL byte at position {at} followed by more text")
            }
            NameProblem::NotUtf8 { valid_up_to } => {
                write!(f, "name is not valid UTF-8 after byte {valid_up_to}")
            }
        }
    }
}

/// Why a bundle could not be read (or, for [`build`], written).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BundleError {
    /// Fewer bytes than the 32-byte header.
    HeaderTruncated {
        /// Bytes available.
        found: usize,
    },
    /// The magic is not `MVBUNDL1`.
    BadMagic {
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// A version other than [`VERSION`].
    UnsupportedVersion {
        /// The version field.
        found: u32,
    },
    /// The reserved header field is not zero.
    ReservedNotZero {
        /// The reserved field.
        found: u64,
    },
    /// `total_size` is smaller than the header itself.
    TotalSizeTooSmall {
        /// The `total_size` field.
        total_size: u64,
    },
    /// The bundle is shorter than its `total_size` says.
    Truncated {
        /// The `total_size` field.
        expected: u64,
        /// Bytes available.
        found: usize,
    },
    /// More than [`MAX_ENTRIES`] entries.
    TooManyEntries {
        /// The entry count (field value, or slice length for [`build`]).
        count: u64,
    },
    /// The entry table does not fit inside `total_size`.
    EntryTableOutOfBounds {
        /// The entry count.
        count: u32,
        /// Where the table would end.
        table_end: u64,
        /// The `total_size` field.
        total_size: u64,
    },
    /// An entry's name is invalid.
    InvalidName {
        /// The entry.
        entry: EntryId,
        /// What is wrong with it.
        problem: NameProblem,
    },
    /// Two entries have the same name.
    DuplicateName {
        /// The later entry.
        entry: EntryId,
        /// Index of the earlier entry with the same name.
        first_index: usize,
    },
    /// An entry's data does not lie inside `total_size` (or `offset + size` overflows).
    DataOutOfBounds {
        /// The entry.
        entry: EntryId,
        /// Offset field.
        offset: u64,
        /// Size field.
        size: u64,
        /// The `total_size` field.
        total_size: u64,
    },
    /// An entry's data offset is not a multiple of [`DATA_ALIGN`].
    MisalignedOffset {
        /// The entry.
        entry: EntryId,
        /// Offset field.
        offset: u64,
    },
    /// An entry's data overlaps the header or the entry table.
    OverlapsTable {
        /// The entry.
        entry: EntryId,
        /// Offset field.
        offset: u64,
        /// Size field.
        size: u64,
        /// Where the entry table ends.
        table_end: u64,
    },
    /// Two entries' data overlap.
    Overlap {
        /// The later entry.
        entry: EntryId,
        /// Its offset.
        offset: u64,
        /// Its size.
        size: u64,
        /// Index of the earlier entry it overlaps.
        other_index: usize,
        /// The earlier entry's offset.
        other_offset: u64,
        /// The earlier entry's size.
        other_size: u64,
    },
    /// [`build`]: the bundle would be larger than the address space allows.
    TooLarge,
}

impl fmt::Display for BundleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BundleError::HeaderTruncated { found } => write!(
                f,
                "bundle is truncated: the header needs {HEADER_SIZE} bytes but only {found} \
                 were found"
            ),
            BundleError::BadMagic { found } => {
                write!(f, "bundle has bad magic \"{}\" (expected \"MVBUNDL1\")", found.escape_ascii())
            }
            BundleError::UnsupportedVersion { found } => {
                write!(f, "bundle has unsupported version {found} (expected {VERSION})")
            }
            BundleError::ReservedNotZero { found } => {
                write!(f, "bundle header's reserved field is {found:#x} (must be 0)")
            }
            BundleError::TotalSizeTooSmall { total_size } => {
                write!(f, "bundle total_size {total_size:#x} is smaller than its {HEADER_SIZE}-byte header")
            }
            BundleError::Truncated { expected, found } => write!(
                f,
                "bundle is truncated: total_size says {expected:#x} bytes but only {found:#x} \
                 were found"
            ),
            BundleError::TooManyEntries { count } => {
                write!(f, "bundle has {count} entries (at most {MAX_ENTRIES} are allowed)")
            }
            BundleError::EntryTableOutOfBounds { count, table_end, total_size } => write!(
                f,
                "bundle entry table ({count} entries) ends at {table_end:#x}, past the end of \
                 the bundle ({total_size:#x} bytes)"
            ),
            BundleError::InvalidName { entry, problem } => write!(f, "{entry}: {problem}"),
            BundleError::DuplicateName { entry, first_index } => {
                write!(f, "{entry}: name is already used by bundle entry {first_index}")
            }
            BundleError::DataOutOfBounds { entry, offset, size, total_size } => write!(
                f,
                "{entry}: data at {offset:#x}+{size:#x} runs past the end of the bundle \
                 ({total_size:#x} bytes)"
            ),
            BundleError::MisalignedOffset { entry, offset } => {
                write!(f, "{entry}: data offset {offset:#x} is not a multiple of {DATA_ALIGN:#x}")
            }
            BundleError::OverlapsTable { entry, offset, size, table_end } => write!(
                f,
                "{entry}: data at {offset:#x}+{size:#x} overlaps the bundle header and entry \
                 table (which end at {table_end:#x})"
            ),
            BundleError::Overlap { entry, offset, size, other_index, other_offset, other_size } => write!(
                f,
                "{entry}: data at {offset:#x}+{size:#x} overlaps the data of bundle entry \
                 {other_index} at {other_offset:#x}+{other_size:#x}"
            ),
            BundleError::TooLarge => f.write_str("bundle would be larger than the address space allows"),
        }
    }
}

impl core::error::Error for BundleError {}

/// One entry of a parsed bundle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BundleEntry<'a> {
    /// The entry's name.
    pub name: &'a str,
    /// The entry's bytes.
    pub data: &'a [u8],
    /// Where the data starts, from the start of the bundle (a multiple of [`DATA_ALIGN`]).
    pub offset: u64,
}

/// A validated boot bundle borrowed from memory.
#[derive(Clone, Copy, Debug)]
pub struct Bundle<'a> {
    /// Exactly `total_size` bytes.
    data: &'a [u8],
    count: usize,
}

/// [`HEADER_SIZE`] as a `u64`.
const HEADER_SIZE_U64: u64 = 32;
const _: () = assert!(HEADER_SIZE == 32);

/// Where the entry table of `count` entries ends.
fn table_end(count: usize) -> Option<u64> {
    let end = count.checked_mul(ENTRY_SIZE)?.checked_add(HEADER_SIZE)?;
    u64::try_from(end).ok()
}

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    let end = at.checked_add(4)?;
    let bytes: [u8; 4] = data.get(at..end)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

fn read_u64(data: &[u8], at: usize) -> Option<u64> {
    let end = at.checked_add(8)?;
    let bytes: [u8; 8] = data.get(at..end)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// Raw fields of one entry-table record.
struct RawEntry<'a> {
    name_field: &'a [u8],
    offset: u64,
    size: u64,
}

fn raw_entry(data: &[u8], index: usize) -> Option<RawEntry<'_>> {
    let start = index.checked_mul(ENTRY_SIZE)?.checked_add(HEADER_SIZE)?;
    let rec = data.get(start..start.checked_add(ENTRY_SIZE)?)?;
    Some(RawEntry {
        name_field: rec.get(..NAME_FIELD_LEN)?,
        offset: read_u64(rec, NAME_FIELD_LEN)?,
        size: read_u64(rec, NAME_FIELD_LEN + 8)?,
    })
}

/// Validates a 48-byte name field and returns the name.
fn parse_name(field: &[u8]) -> Result<&str, NameProblem> {
    let Some(nul) = field.iter().position(|&b| b == 0) else {
        return Err(NameProblem::TooLong { len: field.len() });
    };
    if nul == 0 {
        return Err(NameProblem::Empty);
    }
    if field.iter().skip(nul).any(|&b| b != 0) {
        return Err(NameProblem::InteriorNul { at: nul });
    }
    let bytes = field.get(..nul).ok_or(NameProblem::Empty)?;
    core::str::from_utf8(bytes).map_err(|e| NameProblem::NotUtf8 { valid_up_to: e.valid_up_to() })
}

/// Checks a name given to [`build`].
#[cfg(any(feature = "alloc", test))]
fn check_name(name: &str) -> Result<(), NameProblem> {
    if name.is_empty() {
        return Err(NameProblem::Empty);
    }
    if let Some(at) = name.bytes().position(|b| b == 0) {
        return Err(NameProblem::InteriorNul { at });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameProblem::TooLong { len: name.len() });
    }
    Ok(())
}

/// Whether two byte ranges `[a, a+a_len)` and `[b, b+b_len)` share a byte. Empty ranges never
/// overlap anything. Both ranges must already be known not to overflow.
fn ranges_overlap(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a_len != 0 && b_len != 0 && a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

impl<'a> Bundle<'a> {
    /// Validates `data` as a v1 bundle. Bytes after `total_size` are ignored.
    pub fn parse(data: &'a [u8]) -> Result<Bundle<'a>, BundleError> {
        if data.len() < HEADER_SIZE {
            return Err(BundleError::HeaderTruncated { found: data.len() });
        }
        let magic: [u8; 8] =
            data.get(..8).and_then(|m| m.try_into().ok()).ok_or(BundleError::HeaderTruncated { found: data.len() })?;
        if magic != MAGIC {
            return Err(BundleError::BadMagic { found: magic });
        }
        let truncated = BundleError::HeaderTruncated { found: data.len() };
        let version = read_u32(data, 8).ok_or(truncated)?;
        if version != VERSION {
            return Err(BundleError::UnsupportedVersion { found: version });
        }
        let count_field = read_u32(data, 12).ok_or(truncated)?;
        let total_size = read_u64(data, 16).ok_or(truncated)?;
        let reserved = read_u64(data, 24).ok_or(truncated)?;
        if reserved != 0 {
            return Err(BundleError::ReservedNotZero { found: reserved });
        }
        if total_size < HEADER_SIZE_U64 {
            return Err(BundleError::TotalSizeTooSmall { total_size });
        }
        let total = match usize::try_from(total_size) {
            Ok(t) if t <= data.len() => t,
            _ => return Err(BundleError::Truncated { expected: total_size, found: data.len() }),
        };
        let data = data.get(..total).ok_or(BundleError::Truncated { expected: total_size, found: data.len() })?;
        let count = usize::try_from(count_field)
            .ok()
            .filter(|&c| c <= MAX_ENTRIES)
            .ok_or(BundleError::TooManyEntries { count: u64::from(count_field) })?;
        let table_end = table_end(count).ok_or(BundleError::TooManyEntries { count: u64::from(count_field) })?;
        if table_end > total_size {
            return Err(BundleError::EntryTableOutOfBounds { count: count_field, table_end, total_size });
        }

        for index in 0..count {
            let raw = raw_entry(data, index).ok_or(BundleError::EntryTableOutOfBounds {
                count: count_field,
                table_end,
                total_size,
            })?;
            let name = parse_name(raw.name_field).map_err(|problem| BundleError::InvalidName {
                entry: EntryId { index, name: EntryName::from_bytes_lossy(raw.name_field) },
                problem,
            })?;
            let entry = EntryId { index, name: EntryName::new(name) };
            let (offset, size) = (raw.offset, raw.size);
            match offset.checked_add(size) {
                Some(end) if end <= total_size => {}
                _ => return Err(BundleError::DataOutOfBounds { entry, offset, size, total_size }),
            }
            if offset % DATA_ALIGN != 0 {
                return Err(BundleError::MisalignedOffset { entry, offset });
            }
            if ranges_overlap(offset, size, 0, table_end) {
                return Err(BundleError::OverlapsTable { entry, offset, size, table_end });
            }
            for earlier in 0..index {
                // Entries before `index` were validated above; a missing one would be a bug,
                // and skipping it is harmless because the loop re-checks every pair.
                let Some(prev) = raw_entry(data, earlier) else {
                    continue;
                };
                let prev_name = parse_name(prev.name_field).ok();
                if prev_name == Some(name) {
                    return Err(BundleError::DuplicateName { entry, first_index: earlier });
                }
                if ranges_overlap(offset, size, prev.offset, prev.size) {
                    return Err(BundleError::Overlap {
                        entry,
                        offset,
                        size,
                        other_index: earlier,
                        other_offset: prev.offset,
                        other_size: prev.size,
                    });
                }
            }
        }
        Ok(Bundle { data, count })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the bundle has no entries.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The bundle's `total_size`: the length of [`Bundle::as_bytes`].
    pub fn total_size(&self) -> usize {
        self.data.len()
    }

    /// The bundle's bytes, up to `total_size` (trailing padding excluded).
    pub fn as_bytes(&self) -> &'a [u8] {
        self.data
    }

    /// The entry at `index` in the entry table.
    pub fn entry(&self, index: usize) -> Option<BundleEntry<'a>> {
        if index >= self.count {
            return None;
        }
        let data: &'a [u8] = self.data;
        let raw = raw_entry(data, index)?;
        let name = parse_name(raw.name_field).ok()?;
        let start = usize::try_from(raw.offset).ok()?;
        let end = start.checked_add(usize::try_from(raw.size).ok()?)?;
        Some(BundleEntry { name, data: data.get(start..end)?, offset: raw.offset })
    }

    /// The data of the entry called `name`.
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.entries().find(|e| e.name == name).map(|e| e.data)
    }

    /// All entries, in entry-table order.
    pub fn entries(&self) -> Entries<'a> {
        Entries { bundle: *self, next: 0 }
    }
}

/// Iterator over a bundle's entries; see [`Bundle::entries`].
#[derive(Clone, Debug)]
pub struct Entries<'a> {
    bundle: Bundle<'a>,
    next: usize,
}

impl<'a> Iterator for Entries<'a> {
    type Item = BundleEntry<'a>;

    fn next(&mut self) -> Option<BundleEntry<'a>> {
        while self.next < self.bundle.count {
            let index = self.next;
            self.next = self.next.saturating_add(1);
            if let Some(entry) = self.bundle.entry(index) {
                return Some(entry);
            }
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.bundle.count.saturating_sub(self.next)))
    }
}

impl<'a> IntoIterator for &Bundle<'a> {
    type Item = BundleEntry<'a>;
    type IntoIter = Entries<'a>;

    fn into_iter(self) -> Entries<'a> {
        self.entries()
    }
}

/// Rounds `value` up to a multiple of [`DATA_ALIGN`].
#[cfg(any(feature = "alloc", test))]
fn align_up(value: u64) -> Option<u64> {
    Some(value.checked_add(DATA_ALIGN - 1)? & !(DATA_ALIGN - 1))
}

/// Writes a v1 bundle holding `entries` (name, data) in the given order.
///
/// Each entry's data starts at the next 4096-aligned offset after the entry table and the
/// previous entry; the bundle is zero padded to a multiple of 4096 bytes, which is its
/// `total_size`. Rejects more than [`MAX_ENTRIES`] entries and empty, too long (more than
/// [`MAX_NAME_LEN`] bytes), NUL-containing or duplicate names.
#[cfg(any(feature = "alloc", test))]
pub fn build(entries: &[(&str, &[u8])]) -> Result<alloc::vec::Vec<u8>, BundleError> {
    let count = entries.len();
    if count > MAX_ENTRIES {
        return Err(BundleError::TooManyEntries { count: u64::try_from(count).unwrap_or(u64::MAX) });
    }
    for (index, (name, _)) in entries.iter().enumerate() {
        let entry = EntryId { index, name: EntryName::new(name) };
        check_name(name).map_err(|problem| BundleError::InvalidName { entry, problem })?;
        if let Some(first_index) = entries.iter().take(index).position(|(other, _)| other == name) {
            return Err(BundleError::DuplicateName { entry, first_index });
        }
    }

    let count_field = u32::try_from(count).map_err(|_| BundleError::TooLarge)?;
    let table_end = table_end(count).ok_or(BundleError::TooLarge)?;
    let mut cursor = align_up(table_end).ok_or(BundleError::TooLarge)?;
    let mut table = alloc::vec::Vec::with_capacity(count);
    for (_, data) in entries {
        let size = u64::try_from(data.len()).map_err(|_| BundleError::TooLarge)?;
        table.push((cursor, size));
        let end = cursor.checked_add(size).ok_or(BundleError::TooLarge)?;
        cursor = align_up(end).ok_or(BundleError::TooLarge)?;
    }
    let total_size = cursor;
    let total = usize::try_from(total_size).map_err(|_| BundleError::TooLarge)?;

    let mut out = alloc::vec::Vec::new();
    out.try_reserve_exact(total).map_err(|_| BundleError::TooLarge)?;
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&count_field.to_le_bytes());
    out.extend_from_slice(&total_size.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    for ((name, _), (offset, size)) in entries.iter().zip(&table) {
        let mut field = [0u8; NAME_FIELD_LEN];
        for (dst, src) in field.iter_mut().zip(name.bytes()) {
            *dst = src;
        }
        out.extend_from_slice(&field);
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
    }
    for ((_, data), (offset, _)) in entries.iter().zip(&table) {
        let offset = usize::try_from(*offset).map_err(|_| BundleError::TooLarge)?;
        out.resize(offset, 0);
        out.extend_from_slice(data);
    }
    out.resize(total, 0);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::string::{String, ToString};
    use std::vec::Vec;

    /// A hand-written bundle, independent of `build`.
    fn manual(entries: &[(&[u8], u64, u64)], total_size: u64) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"MVBUNDL1");
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&total_size.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        for (name, offset, size) in entries {
            let mut field = [0u8; 48];
            field[..name.len()].copy_from_slice(name);
            out.extend_from_slice(&field);
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
        }
        out.resize(total_size as usize, 0xAA);
        out
    }

    fn small() -> Vec<u8> {
        build(&[("dom0", b"\x7fELF dom0 image"), ("manifest", b"k=v\n")]).unwrap()
    }

    fn set_u64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn entry_offset_at(i: usize) -> usize {
        HEADER_SIZE + i * ENTRY_SIZE + NAME_FIELD_LEN
    }

    #[test]
    fn round_trip() {
        let bytes = small();
        assert_eq!(bytes.len() % 4096, 0);
        let b = Bundle::parse(&bytes).unwrap();
        assert_eq!(b.len(), 2);
        assert!(!b.is_empty());
        assert_eq!(b.total_size(), bytes.len());
        assert_eq!(b.get("dom0"), Some(&b"\x7fELF dom0 image"[..]));
        assert_eq!(b.get("manifest"), Some(&b"k=v\n"[..]));
        assert_eq!(b.get("dom1"), None);
        assert_eq!(b.get(""), None);
        let names: Vec<_> = b.entries().map(|e| e.name).collect();
        assert_eq!(names, ["dom0", "manifest"]);
        for e in &b {
            assert_eq!(e.offset % DATA_ALIGN, 0);
        }
        assert_eq!(b.entry(0).unwrap().offset, 4096);
        assert_eq!(b.entry(1).unwrap().offset, 8192);
        assert_eq!(b.entry(2), None);
    }

    #[test]
    fn empty_bundle_and_empty_entry() {
        let bytes = build(&[]).unwrap();
        let b = Bundle::parse(&bytes).unwrap();
        assert!(b.is_empty());
        assert_eq!(b.entries().count(), 0);

        let bytes = build(&[("a", b""), ("b", b"x"), ("c", b"")]).unwrap();
        let b = Bundle::parse(&bytes).unwrap();
        assert_eq!(b.get("a"), Some(&b""[..]));
        assert_eq!(b.get("b"), Some(&b"x"[..]));
        assert_eq!(b.get("c"), Some(&b""[..]));
    }

    #[test]
    fn max_entries_and_name_length() {
        let names: Vec<String> = (0..MAX_ENTRIES).map(|i| format!("{i:0>47}")).collect();
        let entries: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"d"[..])).collect();
        let bytes = build(&entries).unwrap();
        let b = Bundle::parse(&bytes).unwrap();
        assert_eq!(b.len(), MAX_ENTRIES);
        // 32 + 64*64 = 4128 bytes of tables, so the first entry starts at 8192.
        assert_eq!(b.entry(0).unwrap().offset, 8192);
        assert_eq!(b.get(&names[63]), Some(&b"d"[..]));

        let mut too_many = entries.clone();
        too_many.push(("extra", b""));
        assert_eq!(build(&too_many), Err(BundleError::TooManyEntries { count: 65 }));
    }

    #[test]
    fn trailing_padding_is_ignored() {
        let mut bytes = small();
        let len = bytes.len();
        bytes.extend_from_slice(&[0xFF; 5000]);
        let b = Bundle::parse(&bytes).unwrap();
        assert_eq!(b.total_size(), len);
        assert_eq!(b.get("manifest"), Some(&b"k=v\n"[..]));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = small();
        for len in 0..bytes.len() {
            let err = Bundle::parse(&bytes[..len]).unwrap_err();
            if len < HEADER_SIZE {
                assert_eq!(err, BundleError::HeaderTruncated { found: len });
            } else {
                assert_eq!(err, BundleError::Truncated { expected: bytes.len() as u64, found: len });
            }
        }
        let msg = Bundle::parse(&bytes[..100]).unwrap_err().to_string();
        assert_eq!(msg, "bundle is truncated: total_size says 0x3000 bytes but only 0x64 were found");
        let msg = Bundle::parse(&bytes[..3]).unwrap_err().to_string();
        assert!(msg.contains("32 bytes") && msg.contains("only 3"), "{msg}");
    }

    #[test]
    fn bad_header_fields() {
        let good = small();

        let mut b = good.clone();
        b[0] = b'X';
        let err = Bundle::parse(&b).unwrap_err();
        assert!(matches!(err, BundleError::BadMagic { .. }));
        assert!(err.to_string().contains("XVBUNDL1"), "{err}");

        let mut b = good.clone();
        b[8] = 2;
        let err = Bundle::parse(&b).unwrap_err();
        assert_eq!(err, BundleError::UnsupportedVersion { found: 2 });
        assert_eq!(err.to_string(), "bundle has unsupported version 2 (expected 1)");

        let mut b = good.clone();
        b[31] = 1;
        assert!(matches!(Bundle::parse(&b), Err(BundleError::ReservedNotZero { .. })));

        let mut b = good.clone();
        set_u64(&mut b, 16, 8);
        assert_eq!(Bundle::parse(&b).unwrap_err(), BundleError::TotalSizeTooSmall { total_size: 8 });

        let mut b = good.clone();
        set_u64(&mut b, 16, u64::MAX);
        assert!(matches!(Bundle::parse(&b), Err(BundleError::Truncated { expected: u64::MAX, .. })));

        let mut b = good.clone();
        b[12..16].copy_from_slice(&65u32.to_le_bytes());
        assert_eq!(Bundle::parse(&b).unwrap_err(), BundleError::TooManyEntries { count: 65 });
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Bundle::parse(&b).is_err());

        // The entry table does not fit in total_size.
        let b = manual(&[(b"a", 0, 0), (b"b", 0, 0)], 96);
        let err = Bundle::parse(&b).unwrap_err();
        assert_eq!(err, BundleError::EntryTableOutOfBounds { count: 2, table_end: 160, total_size: 96 });
        assert!(err.to_string().contains("0xa0"), "{err}");
    }

    #[test]
    fn data_out_of_bounds_message() {
        let b = manual(&[(b"kernel", 0x1000, 0x10), (b"x", 0x2000, 0), (b"dom0", 0x3000, 0x5000)], 0x6000);
        let err = Bundle::parse(&b).unwrap_err();
        assert!(matches!(err, BundleError::DataOutOfBounds { entry: EntryId { index: 2, .. }, .. }));
        assert_eq!(
            err.to_string(),
            "bundle entry 2 (\"dom0\"): data at 0x3000+0x5000 runs past the end of the bundle \
             (0x6000 bytes)"
        );

        // offset + size overflows u64.
        let b = manual(&[(b"a", 0x1000, u64::MAX)], 0x2000);
        assert!(matches!(Bundle::parse(&b), Err(BundleError::DataOutOfBounds { .. })));
        let b = manual(&[(b"a", !0xFFFu64, 1)], 0x2000);
        assert!(matches!(Bundle::parse(&b), Err(BundleError::DataOutOfBounds { .. })));
    }

    #[test]
    fn misaligned_offset() {
        let mut b = small();
        let at = entry_offset_at(1);
        let off = u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        set_u64(&mut b, at, off + 8);
        let err = Bundle::parse(&b).unwrap_err();
        assert!(
            matches!(err, BundleError::MisalignedOffset { entry: EntryId { index: 1, .. }, offset } if offset == off + 8)
        );
        assert!(err.to_string().contains("\"manifest\""), "{err}");
        assert!(err.to_string().contains("not a multiple of 0x1000"), "{err}");
    }

    #[test]
    fn overlaps() {
        // Second entry's data overlaps the first.
        let b = manual(&[(b"a", 0x1000, 0x1800), (b"b", 0x2000, 0x100)], 0x3000);
        let err = Bundle::parse(&b).unwrap_err();
        assert!(matches!(err, BundleError::Overlap { entry: EntryId { index: 1, .. }, other_index: 0, .. }));
        assert_eq!(
            err.to_string(),
            "bundle entry 1 (\"b\"): data at 0x2000+0x100 overlaps the data of bundle entry 0 \
             at 0x1000+0x1800"
        );
        // Same offset.
        let b = manual(&[(b"a", 0x1000, 1), (b"b", 0x1000, 1)], 0x2000);
        assert!(matches!(Bundle::parse(&b), Err(BundleError::Overlap { .. })));
        // Zero-sized entries overlap nothing.
        let b = manual(&[(b"a", 0x1000, 0), (b"b", 0x1000, 1), (b"c", 0x2000, 0)], 0x2000);
        assert!(Bundle::parse(&b).is_ok());
        // Data over the header/entry table.
        let b = manual(&[(b"a", 0, 0x10)], 0x1000);
        let err = Bundle::parse(&b).unwrap_err();
        assert!(matches!(err, BundleError::OverlapsTable { .. }), "{err}");
        assert!(err.to_string().contains("entry table"), "{err}");
    }

    #[test]
    fn duplicate_names() {
        let b = manual(&[(b"dom0", 0x1000, 1), (b"x", 0x2000, 1), (b"dom0", 0x3000, 1)], 0x4000);
        let err = Bundle::parse(&b).unwrap_err();
        assert!(matches!(err, BundleError::DuplicateName { entry: EntryId { index: 2, .. }, first_index: 0 }));
        assert_eq!(err.to_string(), "bundle entry 2 (\"dom0\"): name is already used by bundle entry 0");
        let err = build(&[("dom0", b"a"), ("dom0", b"b")]).unwrap_err();
        assert!(matches!(err, BundleError::DuplicateName { first_index: 0, .. }));
    }

    #[test]
    fn bad_names_in_bundle() {
        let cases: [(&[u8], NameProblem); 4] = [
            (b"", NameProblem::Empty),
            (b"ab\0cd", NameProblem::InteriorNul { at: 2 }),
            (b"ab\xff", NameProblem::NotUtf8 { valid_up_to: 2 }),
            (&[b'n'; 48], NameProblem::TooLong { len: 48 }),
        ];
        for (name, problem) in cases {
            let b = manual(&[(b"ok", 0x1000, 1), (name, 0x2000, 1)], 0x3000);
            let err = Bundle::parse(&b).unwrap_err();
            match err {
                BundleError::InvalidName { entry, problem: p } => {
                    assert_eq!(entry.index, 1);
                    assert_eq!(p, problem);
                }
                other => panic!("{other:?}"),
            }
            assert!(err.to_string().starts_with("bundle entry 1"), "{err}");
        }
        let b = manual(&[(b"ab\xff", 0x1000, 1)], 0x2000);
        assert_eq!(
            Bundle::parse(&b).unwrap_err().to_string(),
            "bundle entry 0 (\"ab\"...): name is not valid UTF-8 after byte 2"
        );
        let b = manual(&[(&[b'n'; 48], 0x1000, 1)], 0x2000);
        let msg = Bundle::parse(&b).unwrap_err().to_string();
        assert!(msg.contains(&format!("(\"{}\"...)", "n".repeat(47))), "{msg}");
        // Names in the field may use all 47 bytes plus the NUL.
        let b = manual(&[(&[b'n'; 47], 0x1000, 1)], 0x2000);
        assert!(Bundle::parse(&b).is_ok());
    }

    #[test]
    fn bad_names_in_build() {
        let long = "é".repeat(24); // 48 bytes
        let cases: [(&str, NameProblem); 3] = [
            ("", NameProblem::Empty),
            ("a\0b", NameProblem::InteriorNul { at: 1 }),
            (&long, NameProblem::TooLong { len: 48 }),
        ];
        for (name, problem) in cases {
            let err = build(&[("fine", b""), (name, b"")]).unwrap_err();
            assert!(
                matches!(err, BundleError::InvalidName { entry: EntryId { index: 1, .. }, problem: p } if p == problem),
                "{err:?}"
            );
        }
        let err = build(&[(&long, b"")]).unwrap_err();
        // Truncated to a character boundary: 23 "é" (46 bytes).
        assert_eq!(
            err.to_string(),
            format!(
                "bundle entry 0 (\"{}\"...): name is 48 bytes or more without a terminating NUL; \
                 at most 47 bytes are allowed",
                "é".repeat(23)
            )
        );
        let max = "m".repeat(MAX_NAME_LEN);
        let bytes = build(&[(&max, b"1")]).unwrap();
        assert_eq!(Bundle::parse(&bytes).unwrap().get(&max), Some(&b"1"[..]));
    }

    #[test]
    fn error_stays_small() {
        // Callers wrap this in their own error types; keep it well under clippy's
        // `result_large_err` limit (128 bytes).
        assert!(core::mem::size_of::<BundleError>() <= 112);
    }

    #[test]
    fn entry_name_helper() {
        assert_eq!(EntryName::new(""), None);
        let n = EntryName::new("dom0").unwrap();
        assert_eq!(n.as_str(), "dom0");
        assert!(!n.is_truncated());
        assert_eq!(n.to_string(), "\"dom0\"");
        let n = EntryName::from_bytes_lossy(b"ab\0\0").unwrap();
        assert_eq!(n.as_str(), "ab");
        assert!(!n.is_truncated());
        assert_eq!(EntryName::from_bytes_lossy(b"\xffab"), None);
        assert_eq!(EntryName::from_bytes_lossy(b"\0ab"), None);
    }

    fn arb_entries() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
        prop::collection::vec(("[a-z0-9._-]{1,47}", prop::collection::vec(any::<u8>(), 0..5000)), 0..6).prop_map(
            |mut v| {
                let mut seen = std::collections::HashSet::new();
                v.retain(|(n, _)| seen.insert(n.clone()));
                v
            },
        )
    }

    proptest! {
        #[test]
        fn prop_round_trip(entries in arb_entries()) {
            let refs: Vec<(&str, &[u8])> =
                entries.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
            let bytes = build(&refs).unwrap();
            let b = Bundle::parse(&bytes).unwrap();
            prop_assert_eq!(b.len(), entries.len());
            for ((name, data), e) in entries.iter().zip(b.entries()) {
                prop_assert_eq!(e.name, name.as_str());
                prop_assert_eq!(e.data, data.as_slice());
                prop_assert_eq!(b.get(name), Some(data.as_slice()));
                prop_assert_eq!(e.offset % DATA_ALIGN, 0);
            }
        }

        #[test]
        fn prop_mutated_never_panics(
            entries in arb_entries(),
            mutations in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
            do_cut in any::<bool>(),
        ) {
            let refs: Vec<(&str, &[u8])> =
                entries.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
            let mut bytes = build(&refs).unwrap();
            // Aim most mutations at the header and entry table, where they matter.
            let meta = (HEADER_SIZE + entries.len() * ENTRY_SIZE).min(bytes.len());
            for (i, (idx, val)) in mutations.iter().enumerate() {
                let len = if i % 4 == 3 { bytes.len() } else { meta };
                let at = idx.index(len);
                bytes[at] = *val;
            }
            if do_cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            match Bundle::parse(&bytes) {
                Ok(b) => {
                    // Every accepted bundle is internally consistent.
                    let mut n = 0;
                    for e in b.entries() {
                        n += 1;
                        prop_assert!(e.data.len() <= b.total_size());
                        prop_assert_eq!(b.get(e.name).map(|d| d.as_ptr()), Some(e.data.as_ptr()));
                    }
                    prop_assert_eq!(n, b.len());
                }
                Err(e) => {
                    prop_assert!(!e.to_string().is_empty());
                }
            }
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = Bundle::parse(&bytes).map_err(|e| e.to_string());
            let mut with_magic = bytes.clone();
            with_magic.splice(0..0, b"MVBUNDL1\x01\0\0\0".iter().copied());
            if let Ok(b) = Bundle::parse(&with_magic) {
                for e in b.entries() {
                    let _ = b.get(e.name);
                }
            }
        }
    }
}

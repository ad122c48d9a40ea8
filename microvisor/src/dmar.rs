//! ACPI DMAR table parser (Intel VT-d DMA remapping reporting).
//!
//! [`parse`] takes the whole table, ACPI header included, exactly as firmware published it, and
//! returns the remapping hardware units (DRHD) and reserved memory regions (RMRR) with their
//! device scopes. Other remapping structures (ATSR, RHSA, ANDD, SATC and unknown types) are
//! counted and skipped. The input is untrusted: every length is checked, nothing panics, and
//! nothing allocates.
//!
//! Layout (VT-d specification, chapter 8; little endian):
//!
//! ```text
//! 0   ACPI SDT header (36 bytes): signature "DMAR", length u32 at 4, checksum u8 at 9
//! 36  host_address_width u8 (width - 1)
//! 37  flags u8
//! 38  reserved [u8; 10]
//! 48  remapping structures: type u16, length u16, body
//!       DRHD (0): flags u8, size u8, segment u16, register_base u64, device scopes
//!       RMRR (1): reserved u16, segment u16, base u64, limit u64 (inclusive), device scopes
//! device scope: type u8, length u8, reserved u16, enumeration_id u8, start_bus u8,
//!               path: (device u8, function u8) pairs
//! ```

use bitflags::bitflags;
use core::fmt;
use heapless::Vec;

/// Length of the standard ACPI table header.
pub const SDT_HEADER_LEN: usize = 36;
/// Offset of the first remapping structure (ACPI header plus the DMAR-specific fields).
pub const DMAR_HEADER_LEN: usize = 48;
/// Most DRHD units [`parse`] accepts.
pub const MAX_UNITS: usize = 8;
/// Most RMRR regions [`parse`] accepts.
pub const MAX_RESERVED_REGIONS: usize = 8;
/// Most device scopes per DRHD or RMRR.
pub const MAX_SCOPES: usize = 16;
/// Most (device, function) hops in a device scope path.
pub const MAX_PATH: usize = 4;

/// Remapping structure type: DMA remapping hardware unit definition.
pub const TYPE_DRHD: u16 = 0;
/// Remapping structure type: reserved memory region reporting.
pub const TYPE_RMRR: u16 = 1;
/// Remapping structure type: root port ATS capability reporting.
pub const TYPE_ATSR: u16 = 2;
/// Remapping structure type: remapping hardware static affinity.
pub const TYPE_RHSA: u16 = 3;
/// Remapping structure type: ACPI name-space device declaration.
pub const TYPE_ANDD: u16 = 4;
/// Remapping structure type: SoC integrated address translation cache.
pub const TYPE_SATC: u16 = 5;

const DRHD_MIN_LEN: u16 = 16;
const RMRR_MIN_LEN: u16 = 24;
const SCOPE_MIN_LEN: u8 = 6;
const PAGE_MASK: u64 = 0xFFF;

bitflags! {
    /// The DMAR table's flags byte (offset 37). Unknown bits are kept.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct DmarFlags: u8 {
        /// The platform supports interrupt remapping.
        const INTR_REMAP = 1 << 0;
        /// Firmware asks the OS not to enable x2APIC mode.
        const X2APIC_OPT_OUT = 1 << 1;
        /// Platform opts in to DMA protection of firmware-set-up regions.
        const DMA_CTRL_PLATFORM_OPT_IN = 1 << 2;
    }
}

/// A parsed DMAR table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dmar {
    /// Maximum DMA physical address width in bits (the table's field plus one).
    pub host_address_width: u8,
    /// The table's flags.
    pub flags: DmarFlags,
    /// DMA remapping hardware units, in table order.
    pub units: Vec<Drhd, MAX_UNITS>,
    /// Reserved memory regions (RMRR), in table order.
    pub reserved_regions: Vec<Rmrr, MAX_RESERVED_REGIONS>,
    /// Number of other remapping structures (ATSR, RHSA, ANDD, SATC, unknown) skipped.
    pub other_structures: usize,
}

impl Dmar {
    /// Whether the platform supports interrupt remapping (flag `INTR_REMAP`).
    pub fn interrupt_remapping(&self) -> bool {
        self.flags.contains(DmarFlags::INTR_REMAP)
    }
}

/// A DMA remapping hardware unit definition (DRHD).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drhd {
    /// Physical address of the unit's register set (4 KiB aligned).
    pub register_base: u64,
    /// PCI segment the unit serves.
    pub segment: u16,
    /// The unit serves every device of the segment not claimed by another unit
    /// (`INCLUDE_PCI_ALL`); its scopes then list only IOAPICs/HPETs/ACPI devices.
    pub include_pci_all: bool,
    /// Devices the unit serves.
    pub scopes: Vec<DeviceScope, MAX_SCOPES>,
}

/// A reserved memory region (RMRR): memory devices DMA to that must stay identity mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rmrr {
    /// PCI segment of the devices.
    pub segment: u16,
    /// First byte of the region (4 KiB aligned).
    pub base: u64,
    /// Last byte of the region, inclusive (`limit + 1` is 4 KiB aligned).
    pub limit: u64,
    /// Devices that use the region.
    pub scopes: Vec<DeviceScope, MAX_SCOPES>,
}

/// One device scope entry of a DRHD or RMRR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceScope {
    /// What kind of device this is.
    pub kind: ScopeKind,
    /// IOAPIC ID, HPET number or ACPI device number, depending on `kind`.
    pub enumeration_id: u8,
    /// PCI bus number where the path starts.
    pub start_bus: u8,
    /// (device, function) hops from `start_bus` down to the device.
    pub path: Vec<(u8, u8), MAX_PATH>,
}

/// Device scope entry type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScopeKind {
    /// Type 1: a PCI endpoint device.
    PciEndpoint,
    /// Type 2: a PCI bridge and everything below it.
    PciSubHierarchy,
    /// Type 3: an I/O APIC.
    IoApic,
    /// Type 4: an HPET (MSI-capable timer block).
    Hpet,
    /// Type 5: an ACPI name-space device (see the ANDD structures).
    AcpiNamespaceDevice,
    /// Any other (reserved) type, kept so callers can decide what to do with it.
    Reserved(u8),
}

impl ScopeKind {
    /// Decodes a device scope type byte.
    pub fn from_raw(raw: u8) -> Self {
        match raw {
            1 => ScopeKind::PciEndpoint,
            2 => ScopeKind::PciSubHierarchy,
            3 => ScopeKind::IoApic,
            4 => ScopeKind::Hpet,
            5 => ScopeKind::AcpiNamespaceDevice,
            other => ScopeKind::Reserved(other),
        }
    }

    /// The type byte.
    pub fn raw(self) -> u8 {
        match self {
            ScopeKind::PciEndpoint => 1,
            ScopeKind::PciSubHierarchy => 2,
            ScopeKind::IoApic => 3,
            ScopeKind::Hpet => 4,
            ScopeKind::AcpiNamespaceDevice => 5,
            ScopeKind::Reserved(raw) => raw,
        }
    }
}

/// Short name of a remapping structure type, for messages.
pub fn structure_name(kind: u16) -> &'static str {
    match kind {
        TYPE_DRHD => "DRHD",
        TYPE_RMRR => "RMRR",
        TYPE_ATSR => "ATSR",
        TYPE_RHSA => "RHSA",
        TYPE_ANDD => "ANDD",
        TYPE_SATC => "SATC",
        _ => "unknown",
    }
}

/// Names a remapping structure in errors: its type and its offset in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StructureRef {
    /// Type field.
    pub kind: u16,
    /// Offset of the structure from the start of the table.
    pub offset: usize,
}

impl fmt::Display for StructureRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            TYPE_DRHD..=TYPE_SATC => {
                write!(f, "DMAR {} structure at offset {:#x}", structure_name(self.kind), self.offset)
            }
            kind => write!(f, "DMAR structure of unknown type {kind} at offset {:#x}", self.offset),
        }
    }
}

/// Why a DMAR table was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarError {
    /// Fewer bytes than the 48-byte DMAR header.
    TooShort {
        /// Bytes available.
        found: usize,
    },
    /// The signature is not `DMAR`.
    BadSignature {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// The header's length field is smaller than the 48-byte DMAR header.
    LengthTooSmall {
        /// The length field.
        length: u32,
    },
    /// Fewer bytes than the header's length field says.
    Truncated {
        /// The length field.
        expected: u32,
        /// Bytes available.
        found: usize,
    },
    /// The bytes of the table do not sum to zero.
    BadChecksum {
        /// The checksum byte at offset 9.
        checksum: u8,
        /// What all `length` bytes sum to, modulo 256 (should be 0).
        sum: u8,
    },
    /// Fewer than 4 bytes remain for a remapping structure's type and length.
    StructureHeaderTruncated {
        /// Offset where the structure would start.
        offset: usize,
        /// Bytes left in the table.
        remaining: usize,
    },
    /// A remapping structure's length is too small for its type (0 included).
    BadStructureLength {
        /// The structure.
        at: StructureRef,
        /// Its length field.
        length: u16,
        /// The smallest valid length for the type.
        min: u16,
    },
    /// A remapping structure runs past the end of the table.
    StructureOverrun {
        /// The structure.
        at: StructureRef,
        /// Its length field.
        length: u16,
        /// The table's length.
        table_length: usize,
    },
    /// More than [`MAX_UNITS`] DRHD structures.
    TooManyUnits {
        /// The first DRHD that did not fit.
        at: StructureRef,
    },
    /// More than [`MAX_RESERVED_REGIONS`] RMRR structures.
    TooManyReservedRegions {
        /// The first RMRR that did not fit.
        at: StructureRef,
    },
    /// A DRHD's register base is not 4 KiB aligned.
    MisalignedRegisterBase {
        /// The DRHD.
        at: StructureRef,
        /// The register base.
        base: u64,
    },
    /// An RMRR's range is empty, inverted or not 4 KiB granular.
    BadReservedRange {
        /// The RMRR.
        at: StructureRef,
        /// Its base.
        base: u64,
        /// Its (inclusive) limit.
        limit: u64,
    },
    /// Fewer than 2 bytes left in a structure for a device scope's type and length.
    ScopeTruncated {
        /// The structure holding the scope.
        at: StructureRef,
        /// Offset of the scope in the table.
        offset: usize,
        /// Bytes left in the structure.
        remaining: usize,
    },
    /// A device scope's length is below 6 or odd.
    BadScopeLength {
        /// The structure holding the scope.
        at: StructureRef,
        /// Offset of the scope in the table.
        offset: usize,
        /// Its length field.
        length: u8,
    },
    /// A device scope runs past the end of its structure.
    ScopeOverrun {
        /// The structure holding the scope.
        at: StructureRef,
        /// Offset of the scope in the table.
        offset: usize,
        /// Its length field.
        length: u8,
        /// Offset where the structure ends.
        structure_end: usize,
    },
    /// More than [`MAX_SCOPES`] device scopes in one structure.
    TooManyScopes {
        /// The structure.
        at: StructureRef,
        /// Offset of the first scope that did not fit.
        offset: usize,
    },
    /// A device scope path has more than [`MAX_PATH`] hops.
    PathTooLong {
        /// The structure holding the scope.
        at: StructureRef,
        /// Offset of the scope in the table.
        offset: usize,
        /// Number of hops in the path.
        hops: usize,
    },
}

impl fmt::Display for DmarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DmarError::TooShort { found } => write!(
                f,
                "DMAR table is truncated: its header needs {DMAR_HEADER_LEN} bytes but only \
                 {found} were found"
            ),
            DmarError::BadSignature { found } => {
                write!(f, "DMAR table has signature \"{}\" (expected \"DMAR\")", found.escape_ascii())
            }
            DmarError::LengthTooSmall { length } => write!(
                f,
                "DMAR table length field {length:#x} is smaller than its {DMAR_HEADER_LEN}-byte \
                 header"
            ),
            DmarError::Truncated { expected, found } => write!(
                f,
                "DMAR table is truncated: its length field says {expected:#x} bytes but only \
                 {found:#x} were found"
            ),
            DmarError::BadChecksum { checksum, sum } => write!(
                f,
                "DMAR table checksum is wrong: the bytes sum to {sum:#04x} instead of 0 \
                 (checksum byte at offset 9 is {checksum:#04x})"
            ),
            DmarError::StructureHeaderTruncated { offset, remaining } => write!(
                f,
                "DMAR remapping structure at offset {offset:#x} is truncated: only {remaining} \
                 bytes are left for its 4-byte type and length"
            ),
            DmarError::BadStructureLength { at, length, min } => {
                write!(f, "{at} has length {length} (must be at least {min})")
            }
            DmarError::StructureOverrun { at, length, table_length } => write!(
                f,
                "{at} has length {length:#x}, running past the end of the table \
                 ({table_length:#x} bytes)"
            ),
            DmarError::TooManyUnits { at } => {
                write!(f, "{at} is one DRHD too many (at most {MAX_UNITS} are supported)")
            }
            DmarError::TooManyReservedRegions { at } => {
                write!(f, "{at} is one RMRR too many (at most {MAX_RESERVED_REGIONS} are supported)")
            }
            DmarError::MisalignedRegisterBase { at, base } => {
                write!(f, "{at} has register base {base:#x}, which is not 4 KiB aligned")
            }
            DmarError::BadReservedRange { at, base, limit } => write!(
                f,
                "{at} has bad range {base:#x}..={limit:#x} (base must be 4 KiB aligned, limit \
                 must end a 4 KiB page and not be below base)"
            ),
            DmarError::ScopeTruncated { at, offset, remaining } => write!(
                f,
                "{at}: device scope at offset {offset:#x} is truncated: only {remaining} byte(s) \
                 left in the structure"
            ),
            DmarError::BadScopeLength { at, offset, length } => write!(
                f,
                "{at}: device scope at offset {offset:#x} has length {length} (must be an even \
                 number, at least {SCOPE_MIN_LEN})"
            ),
            DmarError::ScopeOverrun { at, offset, length, structure_end } => write!(
                f,
                "{at}: device scope at offset {offset:#x} has length {length}, running past the \
                 end of the structure at {structure_end:#x}"
            ),
            DmarError::TooManyScopes { at, offset } => write!(
                f,
                "{at}: device scope at offset {offset:#x} is one too many (at most {MAX_SCOPES} \
                 per structure are supported)"
            ),
            DmarError::PathTooLong { at, offset, hops } => write!(
                f,
                "{at}: device scope at offset {offset:#x} has a {hops}-hop path (at most \
                 {MAX_PATH} are supported)"
            ),
        }
    }
}

impl core::error::Error for DmarError {}

fn u8_at(b: &[u8], at: usize) -> Option<u8> {
    b.get(at).copied()
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    let bytes: [u8; 2] = b.get(at..at.checked_add(2)?)?.try_into().ok()?;
    Some(u16::from_le_bytes(bytes))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = b.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let bytes: [u8; 8] = b.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// Parses a whole DMAR table (ACPI header included). Bytes after the header's length field are
/// ignored.
pub fn parse(table: &[u8]) -> Result<Dmar, DmarError> {
    let too_short = DmarError::TooShort { found: table.len() };
    if table.len() < DMAR_HEADER_LEN {
        return Err(too_short);
    }
    let signature: [u8; 4] = table.get(..4).and_then(|s| s.try_into().ok()).ok_or(too_short)?;
    if &signature != b"DMAR" {
        return Err(DmarError::BadSignature { found: signature });
    }
    let length_field = u32_at(table, 4).ok_or(too_short)?;
    let length = usize::try_from(length_field)
        .map_err(|_| DmarError::Truncated { expected: length_field, found: table.len() })?;
    if length < DMAR_HEADER_LEN {
        return Err(DmarError::LengthTooSmall { length: length_field });
    }
    let table = table.get(..length).ok_or(DmarError::Truncated { expected: length_field, found: table.len() })?;
    let sum = table.iter().fold(0u8, |acc, &b| acc.wrapping_add(b));
    if sum != 0 {
        return Err(DmarError::BadChecksum { checksum: u8_at(table, 9).unwrap_or(0), sum });
    }

    let width_field = u8_at(table, 36).ok_or(too_short)?;
    let flags = DmarFlags::from_bits_retain(u8_at(table, 37).ok_or(too_short)?);
    let mut dmar = Dmar {
        // The field is width - 1; a (nonsensical) 255 saturates instead of wrapping to 0.
        host_address_width: width_field.saturating_add(1),
        flags,
        units: Vec::new(),
        reserved_regions: Vec::new(),
        other_structures: 0,
    };

    let mut offset = DMAR_HEADER_LEN;
    while offset < length {
        let remaining = length.saturating_sub(offset);
        let header_error = DmarError::StructureHeaderTruncated { offset, remaining };
        let kind = u16_at(table, offset).ok_or(header_error)?;
        let struct_len = u16_at(table, offset.saturating_add(2)).ok_or(header_error)?;
        let at = StructureRef { kind, offset };
        let min = match kind {
            TYPE_DRHD => DRHD_MIN_LEN,
            TYPE_RMRR => RMRR_MIN_LEN,
            _ => 4,
        };
        if struct_len < min {
            return Err(DmarError::BadStructureLength { at, length: struct_len, min });
        }
        let end = match offset.checked_add(usize::from(struct_len)) {
            Some(end) if end <= length => end,
            _ => return Err(DmarError::StructureOverrun { at, length: struct_len, table_length: length }),
        };
        let body = table.get(offset..end).ok_or(DmarError::StructureOverrun {
            at,
            length: struct_len,
            table_length: length,
        })?;
        let overrun = DmarError::StructureOverrun { at, length: struct_len, table_length: length };
        match kind {
            TYPE_DRHD => {
                let unit_flags = u8_at(body, 4).ok_or(overrun)?;
                let segment = u16_at(body, 6).ok_or(overrun)?;
                let register_base = u64_at(body, 8).ok_or(overrun)?;
                if register_base & PAGE_MASK != 0 {
                    return Err(DmarError::MisalignedRegisterBase { at, base: register_base });
                }
                let scopes = parse_scopes(body, usize::from(DRHD_MIN_LEN), at)?;
                dmar.units
                    .push(Drhd { register_base, segment, include_pci_all: unit_flags & 1 != 0, scopes })
                    .map_err(|_| DmarError::TooManyUnits { at })?;
            }
            TYPE_RMRR => {
                let segment = u16_at(body, 6).ok_or(overrun)?;
                let base = u64_at(body, 8).ok_or(overrun)?;
                let limit = u64_at(body, 16).ok_or(overrun)?;
                if base & PAGE_MASK != 0 || limit & PAGE_MASK != PAGE_MASK || limit < base {
                    return Err(DmarError::BadReservedRange { at, base, limit });
                }
                let scopes = parse_scopes(body, usize::from(RMRR_MIN_LEN), at)?;
                dmar.reserved_regions
                    .push(Rmrr { segment, base, limit, scopes })
                    .map_err(|_| DmarError::TooManyReservedRegions { at })?;
            }
            _ => dmar.other_structures = dmar.other_structures.saturating_add(1),
        }
        offset = end;
    }
    Ok(dmar)
}

/// Parses the device scopes of the structure `body` (which starts at `at.offset` in the
/// table), starting `first` bytes into it.
fn parse_scopes(body: &[u8], first: usize, at: StructureRef) -> Result<Vec<DeviceScope, MAX_SCOPES>, DmarError> {
    let mut scopes = Vec::new();
    let structure_end = at.offset.saturating_add(body.len());
    let mut pos = first;
    while pos < body.len() {
        let offset = at.offset.saturating_add(pos);
        let remaining = body.len().saturating_sub(pos);
        let truncated = DmarError::ScopeTruncated { at, offset, remaining };
        let raw_kind = u8_at(body, pos).ok_or(truncated)?;
        let length = u8_at(body, pos.saturating_add(1)).ok_or(truncated)?;
        if length < SCOPE_MIN_LEN || length % 2 != 0 {
            return Err(DmarError::BadScopeLength { at, offset, length });
        }
        let overrun = DmarError::ScopeOverrun { at, offset, length, structure_end };
        let scope = pos.checked_add(usize::from(length)).and_then(|end| body.get(pos..end)).ok_or(overrun)?;
        let enumeration_id = u8_at(scope, 4).ok_or(overrun)?;
        let start_bus = u8_at(scope, 5).ok_or(overrun)?;
        let hop_bytes = scope.get(usize::from(SCOPE_MIN_LEN)..).unwrap_or(&[]);
        let hops = hop_bytes.len() / 2;
        if hops > MAX_PATH {
            return Err(DmarError::PathTooLong { at, offset, hops });
        }
        let mut path = Vec::new();
        for hop in hop_bytes.chunks_exact(2) {
            if let [device, function] = *hop {
                path.push((device, function)).map_err(|_| DmarError::PathTooLong { at, offset, hops })?;
            }
        }
        scopes
            .push(DeviceScope { kind: ScopeKind::from_raw(raw_kind), enumeration_id, start_bus, path })
            .map_err(|_| DmarError::TooManyScopes { at, offset })?;
        pos = pos.saturating_add(usize::from(length));
    }
    Ok(scopes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::string::ToString;
    use std::vec::Vec as StdVec;

    /// Captured from QEMU 7.2 (`-machine q35 -device intel-iommu`), see tests/data/README.md.
    const QEMU_Q35: &[u8] = include_bytes!("../tests/data/qemu-7.2-q35-dmar.bin");
    /// Same machine with `-device intel-iommu,intremap=off`.
    const QEMU_Q35_NO_IR: &[u8] = include_bytes!("../tests/data/qemu-7.2-q35-intremap-off-dmar.bin");

    fn fix_checksum(t: &mut [u8]) {
        t[9] = 0;
        let sum = t.iter().fold(0u8, |a, &b| a.wrapping_add(b));
        t[9] = 0u8.wrapping_sub(sum);
    }

    /// Builds a DMAR table around the given remapping structures.
    fn table(width_field: u8, flags: u8, structures: &[StdVec<u8>]) -> StdVec<u8> {
        let mut t = StdVec::new();
        t.extend_from_slice(b"DMAR");
        t.extend_from_slice(&[0; 4]);
        t.push(1); // revision
        t.push(0); // checksum
        t.extend_from_slice(b"TESTID");
        t.extend_from_slice(b"TESTTBL ");
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(b"TEST");
        t.extend_from_slice(&1u32.to_le_bytes());
        t.push(width_field);
        t.push(flags);
        t.extend_from_slice(&[0; 10]);
        for s in structures {
            t.extend_from_slice(s);
        }
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        fix_checksum(&mut t);
        t
    }

    fn scope(kind: u8, enumeration_id: u8, bus: u8, path: &[(u8, u8)]) -> StdVec<u8> {
        let mut s = vec![kind, (6 + 2 * path.len()) as u8, 0, 0, enumeration_id, bus];
        for (d, f) in path {
            s.push(*d);
            s.push(*f);
        }
        s
    }

    fn structure(kind: u16, body: &[u8]) -> StdVec<u8> {
        let mut s = StdVec::new();
        s.extend_from_slice(&kind.to_le_bytes());
        s.extend_from_slice(&((body.len() + 4) as u16).to_le_bytes());
        s.extend_from_slice(body);
        s
    }

    fn drhd(flags: u8, segment: u16, base: u64, scopes: &[StdVec<u8>]) -> StdVec<u8> {
        let mut b = vec![flags, 0];
        b.extend_from_slice(&segment.to_le_bytes());
        b.extend_from_slice(&base.to_le_bytes());
        for s in scopes {
            b.extend_from_slice(s);
        }
        structure(TYPE_DRHD, &b)
    }

    fn rmrr(segment: u16, base: u64, limit: u64, scopes: &[StdVec<u8>]) -> StdVec<u8> {
        let mut b = vec![0, 0];
        b.extend_from_slice(&segment.to_le_bytes());
        b.extend_from_slice(&base.to_le_bytes());
        b.extend_from_slice(&limit.to_le_bytes());
        for s in scopes {
            b.extend_from_slice(s);
        }
        structure(TYPE_RMRR, &b)
    }

    fn path(hops: &[(u8, u8)]) -> Vec<(u8, u8), MAX_PATH> {
        Vec::from_slice(hops).unwrap()
    }

    #[test]
    fn captured_qemu_table() {
        assert_eq!(QEMU_Q35.len(), 112);
        let d = parse(QEMU_Q35).unwrap();
        assert_eq!(d.host_address_width, 39);
        assert_eq!(d.flags, DmarFlags::INTR_REMAP);
        assert!(d.interrupt_remapping());
        assert_eq!(d.units.len(), 1);
        assert!(d.reserved_regions.is_empty());
        assert_eq!(d.other_structures, 0);

        let unit = &d.units[0];
        assert_eq!(unit.register_base, 0xfed9_0000);
        assert_eq!(unit.segment, 0);
        // QEMU 7.2 lists every PCI device explicitly instead of setting INCLUDE_PCI_ALL.
        assert!(!unit.include_pci_all);
        let expected = [
            (ScopeKind::IoApic, 0, 0xff, (0, 0)),
            (ScopeKind::PciEndpoint, 0, 0, (0, 0)),
            (ScopeKind::PciEndpoint, 0, 0, (1, 0)),
            (ScopeKind::PciEndpoint, 0, 0, (0x1f, 0)),
            (ScopeKind::PciEndpoint, 0, 0, (0x1f, 2)),
            (ScopeKind::PciEndpoint, 0, 0, (0x1f, 3)),
        ];
        assert_eq!(unit.scopes.len(), expected.len());
        for (s, (kind, id, bus, hop)) in unit.scopes.iter().zip(expected) {
            assert_eq!(*s, DeviceScope { kind, enumeration_id: id, start_bus: bus, path: path(&[hop]) });
        }
    }

    #[test]
    fn captured_qemu_table_without_interrupt_remapping() {
        let d = parse(QEMU_Q35_NO_IR).unwrap();
        assert_eq!(d.flags, DmarFlags::empty());
        assert!(!d.interrupt_remapping());
        let with_ir = parse(QEMU_Q35).unwrap();
        assert_eq!(d.units, with_ir.units);
        assert_eq!(d.host_address_width, with_ir.host_address_width);
    }

    #[test]
    fn every_truncation_of_captured_table_is_an_error() {
        for len in 0..QEMU_Q35.len() {
            let err = parse(&QEMU_Q35[..len]).unwrap_err();
            if len < DMAR_HEADER_LEN {
                assert_eq!(err, DmarError::TooShort { found: len });
            } else {
                assert_eq!(err, DmarError::Truncated { expected: 112, found: len });
            }
        }
        assert_eq!(
            parse(&QEMU_Q35[..100]).unwrap_err().to_string(),
            "DMAR table is truncated: its length field says 0x70 bytes but only 0x64 were found"
        );
    }

    #[test]
    fn every_shortened_length_field_errors_or_parses() {
        // Shrink the length field (fixing the checksum) so the structure walk itself sees
        // every possible cut.
        for len in 0..=QEMU_Q35.len() {
            let mut t = QEMU_Q35[..len.max(DMAR_HEADER_LEN)].to_vec();
            t[4..8].copy_from_slice(&(len as u32).to_le_bytes());
            fix_checksum(&mut t);
            let result = parse(&t);
            match len {
                0..=47 => assert_eq!(result.unwrap_err(), DmarError::LengthTooSmall { length: len as u32 }),
                48 => assert!(result.unwrap().units.is_empty()),
                49..=51 => {
                    assert!(matches!(result.unwrap_err(), DmarError::StructureHeaderTruncated { offset: 48, .. }))
                }
                52..=111 => assert!(matches!(
                    result.unwrap_err(),
                    DmarError::StructureOverrun { at: StructureRef { kind: TYPE_DRHD, offset: 48 }, length: 64, .. }
                )),
                _ => assert_eq!(result.unwrap(), parse(QEMU_Q35).unwrap()),
            }
        }
    }

    #[test]
    fn trailing_bytes_after_length_are_ignored() {
        let mut t = QEMU_Q35.to_vec();
        t.extend_from_slice(&[0xAB; 37]);
        assert_eq!(parse(&t).unwrap(), parse(QEMU_Q35).unwrap());
    }

    #[test]
    fn header_errors() {
        let mut t = QEMU_Q35.to_vec();
        t[20] ^= 0x55;
        let err = parse(&t).unwrap_err();
        assert!(matches!(err, DmarError::BadChecksum { sum: 0x55, .. }), "{err:?}");
        assert!(err.to_string().contains("checksum"), "{err}");

        let mut t = QEMU_Q35.to_vec();
        t[0..4].copy_from_slice(b"APIC");
        let err = parse(&t).unwrap_err();
        assert_eq!(err, DmarError::BadSignature { found: *b"APIC" });
        assert_eq!(err.to_string(), "DMAR table has signature \"APIC\" (expected \"DMAR\")");

        let mut t = QEMU_Q35.to_vec();
        t[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(parse(&t), Err(DmarError::Truncated { expected: u32::MAX, .. })));
    }

    #[test]
    fn zero_length_structure_is_an_error() {
        let mut zero = drhd(0, 0, 0x1000, &[]);
        zero[2..4].copy_from_slice(&0u16.to_le_bytes());
        let t = table(38, 0, &[zero]);
        let err = parse(&t).unwrap_err();
        assert_eq!(
            err,
            DmarError::BadStructureLength { at: StructureRef { kind: TYPE_DRHD, offset: 48 }, length: 0, min: 16 }
        );
        assert_eq!(err.to_string(), "DMAR DRHD structure at offset 0x30 has length 0 (must be at least 16)");

        // Unknown and skipped types need at least their 4-byte header too.
        for kind in [2u16, 3, 4, 5, 0x77] {
            for len in 0..4u16 {
                let mut s = structure(kind, &[0; 8]);
                s[2..4].copy_from_slice(&len.to_le_bytes());
                let t = table(38, 0, &[drhd(1, 0, 0x1000, &[]), s]);
                assert!(
                    matches!(
                        parse(&t),
                        Err(DmarError::BadStructureLength { at: StructureRef { offset: 64, .. }, min: 4, .. })
                    ),
                    "kind {kind} len {len}"
                );
            }
        }
        // A short RMRR.
        let mut s = rmrr(0, 0, 0xfff, &[]);
        s[2..4].copy_from_slice(&20u16.to_le_bytes());
        let t = table(38, 0, &[s]);
        assert!(matches!(parse(&t), Err(DmarError::BadStructureLength { length: 20, min: 24, .. })));
    }

    #[test]
    fn synthetic_table_with_everything() {
        let t = table(
            47,
            0b111,
            &[
                drhd(
                    0,
                    0,
                    0xfed9_0000,
                    &[scope(2, 0, 0, &[(0x1c, 0)]), scope(1, 0, 3, &[(0x1c, 1), (0, 0), (2, 7), (31, 7)])],
                ),
                drhd(1, 0, 0xfed9_1000, &[scope(3, 8, 0xf0, &[(0x1f, 0)]), scope(4, 0, 0, &[])]),
                rmrr(0, 0x7c00_0000, 0x7c7f_ffff, &[scope(1, 0, 0, &[(0x14, 0)])]),
                structure(TYPE_ATSR, &[0, 0, 0, 0]),
                structure(TYPE_RHSA, &[0; 16]),
                structure(TYPE_ANDD, &[0, 0, 0, 1, b'X', 0]),
                structure(TYPE_SATC, &[0; 4]),
                structure(0x1234, &[]),
                drhd(1, 1, 0x1_0000_0000, &[scope(5, 1, 0, &[(0, 0)]), scope(0x42, 0, 0, &[])]),
            ],
        );
        let d = parse(&t).unwrap();
        assert_eq!(d.host_address_width, 48);
        assert_eq!(d.flags, DmarFlags::all());
        assert_eq!(d.other_structures, 5);
        assert_eq!(d.units.len(), 3);
        assert!(!d.units[0].include_pci_all);
        assert_eq!(d.units[0].scopes[0].kind, ScopeKind::PciSubHierarchy);
        assert_eq!(d.units[0].scopes[1].path, path(&[(0x1c, 1), (0, 0), (2, 7), (31, 7)]));
        assert_eq!(d.units[0].scopes[1].start_bus, 3);
        assert!(d.units[1].include_pci_all);
        assert_eq!(d.units[1].register_base, 0xfed9_1000);
        assert_eq!(d.units[1].scopes[0].kind, ScopeKind::IoApic);
        assert_eq!(d.units[1].scopes[0].enumeration_id, 8);
        assert_eq!(d.units[1].scopes[1].kind, ScopeKind::Hpet);
        assert!(d.units[1].scopes[1].path.is_empty());
        assert_eq!(d.units[2].segment, 1);
        assert_eq!(d.units[2].scopes[0].kind, ScopeKind::AcpiNamespaceDevice);
        assert_eq!(d.units[2].scopes[1].kind, ScopeKind::Reserved(0x42));
        assert_eq!(
            d.reserved_regions[..],
            [Rmrr {
                segment: 0,
                base: 0x7c00_0000,
                limit: 0x7c7f_ffff,
                scopes: Vec::from_slice(&[DeviceScope {
                    kind: ScopeKind::PciEndpoint,
                    enumeration_id: 0,
                    start_bus: 0,
                    path: path(&[(0x14, 0)]),
                }])
                .unwrap(),
            }]
        );
        for raw in 0..=255u8 {
            assert_eq!(ScopeKind::from_raw(raw).raw(), raw);
        }
    }

    #[test]
    fn width_field_saturates() {
        let d = parse(&table(255, 0, &[])).unwrap();
        assert_eq!(d.host_address_width, 255);
    }

    #[test]
    fn structure_errors() {
        // Misaligned register base.
        let t = table(38, 0, &[drhd(1, 0, 0xfed9_0010, &[])]);
        let err = parse(&t).unwrap_err();
        assert!(matches!(err, DmarError::MisalignedRegisterBase { base: 0xfed9_0010, .. }));
        assert!(err.to_string().contains("offset 0x30"), "{err}");

        // Bad RMRR ranges: inverted, misaligned base, limit not ending a page.
        for (base, limit) in [(0x2000, 0xfff), (0x10, 0xfff), (0x1000, 0x1ffe)] {
            let t = table(38, 0, &[rmrr(0, base, limit, &[])]);
            assert!(matches!(parse(&t), Err(DmarError::BadReservedRange { .. })), "{base:#x}..={limit:#x}");
        }

        // Too many units and regions.
        let units: StdVec<_> = (0..9).map(|i| drhd(0, 0, 0x1000 * (i + 1), &[])).collect();
        let err = parse(&table(38, 0, &units)).unwrap_err();
        assert_eq!(err, DmarError::TooManyUnits { at: StructureRef { kind: TYPE_DRHD, offset: 48 + 8 * 16 } });
        assert!(parse(&table(38, 0, &units[..8])).is_ok());
        let regions: StdVec<_> = (0..9).map(|_| rmrr(0, 0, 0xfff, &[])).collect();
        assert!(matches!(parse(&table(38, 0, &regions)), Err(DmarError::TooManyReservedRegions { .. })));

        // A structure running past the table.
        let mut s = drhd(1, 0, 0x1000, &[]);
        s[2..4].copy_from_slice(&17u16.to_le_bytes());
        let err = parse(&table(38, 0, &[s])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "DMAR DRHD structure at offset 0x30 has length 0x11, running past the end of the \
             table (0x40 bytes)"
        );

        // Leftover bytes too few for a structure header.
        let t = table(38, 0, &[drhd(1, 0, 0x1000, &[]), vec![0, 0]]);
        assert_eq!(parse(&t).unwrap_err(), DmarError::StructureHeaderTruncated { offset: 64, remaining: 2 });
    }

    #[test]
    fn scope_errors() {
        let at = StructureRef { kind: TYPE_DRHD, offset: 48 };
        let with_scope_bytes = |bytes: &[u8]| {
            let mut s = drhd(0, 0, 0x1000, &[scope(1, 0, 0, &[(1, 0)])]);
            s.extend_from_slice(bytes);
            let len = s.len() as u16;
            s[2..4].copy_from_slice(&len.to_le_bytes());
            parse(&table(38, 0, &[s]))
        };
        // Zero, short and odd scope lengths.
        for length in [0u8, 1, 4, 5, 7, 9] {
            let err = with_scope_bytes(&[1, length, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err();
            assert_eq!(err, DmarError::BadScopeLength { at, offset: 72, length });
        }
        assert_eq!(
            with_scope_bytes(&[1, 0, 0, 0, 0, 0]).unwrap_err().to_string(),
            "DMAR DRHD structure at offset 0x30: device scope at offset 0x48 has length 0 \
             (must be an even number, at least 6)"
        );
        // Scope running past its structure.
        assert_eq!(
            with_scope_bytes(&[1, 10, 0, 0, 0, 0, 1, 0]).unwrap_err(),
            DmarError::ScopeOverrun { at, offset: 72, length: 10, structure_end: 80 }
        );
        // One stray byte.
        assert_eq!(with_scope_bytes(&[1]).unwrap_err(), DmarError::ScopeTruncated { at, offset: 72, remaining: 1 });
        // Path too long.
        let long = scope(1, 0, 0, &[(1, 0); 5]);
        assert_eq!(with_scope_bytes(&long).unwrap_err(), DmarError::PathTooLong { at, offset: 72, hops: 5 });
        // Too many scopes: 16 fit, 17 do not.
        let many: StdVec<_> = (0..16).map(|i| scope(1, 0, 0, &[(i, 0)])).collect();
        assert_eq!(parse(&table(38, 0, &[drhd(0, 0, 0x1000, &many)])).unwrap().units[0].scopes.len(), 16);
        let many: StdVec<_> = (0..17).map(|i| scope(1, 0, 0, &[(i, 0)])).collect();
        assert_eq!(
            parse(&table(38, 0, &[drhd(0, 0, 0x1000, &many)])).unwrap_err(),
            DmarError::TooManyScopes { at, offset: 64 + 16 * 8 }
        );
        // The same checks apply to RMRR scopes.
        let mut s = rmrr(0, 0, 0xfff, &[]);
        s.extend_from_slice(&[1, 0, 0, 0, 0, 0]);
        let len = s.len() as u16;
        s[2..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            parse(&table(38, 0, &[s])),
            Err(DmarError::BadScopeLength { at: StructureRef { kind: TYPE_RMRR, offset: 48 }, offset: 72, length: 0 })
        ));
    }

    #[test]
    fn every_error_has_a_message() {
        let at = StructureRef { kind: 9, offset: 0x40 };
        assert_eq!(at.to_string(), "DMAR structure of unknown type 9 at offset 0x40");
        let errors = [
            DmarError::TooShort { found: 3 },
            DmarError::LengthTooSmall { length: 4 },
            DmarError::TooManyReservedRegions { at },
            DmarError::BadReservedRange { at, base: 1, limit: 0 },
        ];
        for e in errors {
            let msg = e.to_string();
            assert!(msg.contains("DMAR"), "{msg}");
        }
    }

    proptest! {
        #[test]
        fn prop_mutated_capture_never_panics(
            mutations in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            fix in any::<bool>(),
            cut in any::<prop::sample::Index>(),
            do_cut in any::<bool>(),
        ) {
            let mut t = QEMU_Q35.to_vec();
            for (idx, val) in &mutations {
                let at = idx.index(t.len());
                t[at] = *val;
            }
            if fix {
                // Let most mutations get past the checksum to reach the structure walk.
                t[0..4].copy_from_slice(b"DMAR");
                fix_checksum(&mut t);
            }
            if do_cut {
                t.truncate(cut.index(t.len() + 1));
            }
            match parse(&t) {
                Ok(d) => {
                    prop_assert!(d.units.len() <= MAX_UNITS);
                    for u in &d.units {
                        prop_assert_eq!(u.register_base & 0xfff, 0);
                    }
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }

        #[test]
        fn prop_arbitrary_body_never_panics(
            body in prop::collection::vec(any::<u8>(), 0..400),
            width in any::<u8>(),
            flags in any::<u8>(),
        ) {
            let mut t = table(width, flags, &[]);
            t.extend_from_slice(&body);
            let len = t.len() as u32;
            t[4..8].copy_from_slice(&len.to_le_bytes());
            fix_checksum(&mut t);
            if let Err(e) = parse(&t) {
                prop_assert!(!e.to_string().is_empty());
            }
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes).map_err(|e| e.to_string());
        }
    }
}

//! ACPI DMAR table parser (Intel VT-d DMA remapping reporting).
//!
//! [`parse`] takes the whole table, ACPI header included, exactly as firmware published it, and
//! returns what the microvisor uses: the DMA address width, the flags and the remapping
//! hardware units (DRHD). Device scopes are not decoded: the microvisor drives VT-d only on a
//! platform with a single unit, which then serves every device (see [`Dmar::sole_unit`]).
//! Reserved memory regions (RMRR) and the other structures are counted and skipped: a device
//! that needs an RMRR identity-mapped is not supported for passthrough (its DMA to the region
//! is blocked, which fails closed). The input is untrusted: every length is checked, nothing
//! panics, and nothing allocates.
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
//! ```

use bitflags::bitflags;
use core::fmt;
use heapless::Vec;

/// Offset of the first remapping structure (ACPI header plus the DMAR-specific fields).
pub const DMAR_HEADER_LEN: usize = 48;
/// Most DRHD units [`parse`] accepts.
pub const MAX_UNITS: usize = 8;

/// Remapping structure type: DMA remapping hardware unit definition.
pub const TYPE_DRHD: u16 = 0;
/// Remapping structure type: reserved memory region reporting.
pub const TYPE_RMRR: u16 = 1;

/// Smallest DRHD: header, flags, size, segment, register base.
const DRHD_MIN_LEN: u16 = 16;

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
    /// Number of reserved memory regions (RMRR).
    pub reserved_regions: usize,
    /// Number of other remapping structures (ATSR, RHSA, ANDD, SATC, unknown) skipped.
    pub other_structures: usize,
}

impl Dmar {
    /// Whether the platform supports interrupt remapping (flag `INTR_REMAP`).
    pub fn interrupt_remapping(&self) -> bool {
        self.flags.contains(DmarFlags::INTR_REMAP)
    }

    /// The unit that serves every device, if the platform has exactly one on segment 0 (with
    /// one unit, every device firmware puts behind an IOMMU is behind that one). With several
    /// units a device's unit is named by the device scopes, which are not decoded: the caller
    /// then gives no device out rather than guess.
    pub fn sole_unit(&self) -> Option<&Drhd> {
        match self.units.as_slice() {
            [unit] if unit.segment == 0 => Some(unit),
            _ => None,
        }
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
    /// (`INCLUDE_PCI_ALL`); otherwise its device scopes list the devices.
    pub include_pci_all: bool,
}

/// Why a DMAR table was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarError {
    /// Fewer bytes than the 48-byte DMAR header.
    TooShort(usize),
    /// The signature is not `DMAR`.
    BadSignature([u8; 4]),
    /// The header's length field (first) is below the header's size or above the bytes
    /// available (second).
    BadLength(u32, usize),
    /// The bytes of the table sum to this instead of zero.
    BadChecksum(u8),
    /// The remapping structure at this offset is truncated, too short for its type or runs
    /// past the end of the table.
    BadStructure(usize),
    /// The DRHD at this offset has a register base that is not 4 KiB aligned.
    MisalignedRegisterBase(usize),
    /// The DRHD at this offset is one more than [`MAX_UNITS`].
    TooManyUnits(usize),
}

impl fmt::Display for DmarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (h, u) = (DMAR_HEADER_LEN, MAX_UNITS);
        match *self {
            Self::TooShort(found) => write!(f, "DMAR table is truncated: {found} bytes, its header needs {h}"),
            Self::BadSignature(s) => write!(f, "DMAR table has signature \"{}\" (expected \"DMAR\")", s.escape_ascii()),
            Self::BadLength(l, found) => write!(
                f,
                "DMAR table length field {l:#x} is wrong: {found:#x} bytes are there and the header needs {h:#x}"
            ),
            Self::BadChecksum(sum) => write!(f, "DMAR table checksum is wrong: the bytes sum to {sum:#04x}, not 0"),
            Self::BadStructure(at) => write!(
                f,
                "DMAR remapping structure at offset {at:#x} is truncated, too short for its type or runs past the table"
            ),
            Self::MisalignedRegisterBase(at) => {
                write!(f, "DMAR DRHD at offset {at:#x} has a register base that is not 4 KiB aligned")
            }
            Self::TooManyUnits(at) => {
                write!(f, "DMAR DRHD at offset {at:#x} is one too many (at most {u} are supported)")
            }
        }
    }
}

fn bytes_at<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// Parses a whole DMAR table (ACPI header included). Bytes after the header's length field are
/// ignored.
pub fn parse(table: &[u8]) -> Result<Dmar, DmarError> {
    if table.len() < DMAR_HEADER_LEN {
        return Err(DmarError::TooShort(table.len()));
    }
    let signature = bytes_at::<4>(table, 0).ok_or(DmarError::TooShort(table.len()))?;
    if &signature != b"DMAR" {
        return Err(DmarError::BadSignature(signature));
    }
    let length_field = bytes_at(table, 4).map(u32::from_le_bytes).ok_or(DmarError::TooShort(table.len()))?;
    let bad_length = DmarError::BadLength(length_field, table.len());
    let length = usize::try_from(length_field).map_err(|_| bad_length)?;
    let table = table.get(..length).filter(|_| length >= DMAR_HEADER_LEN).ok_or(bad_length)?;
    let sum = table.iter().fold(0u8, |acc, &b| acc.wrapping_add(b));
    if sum != 0 {
        return Err(DmarError::BadChecksum(sum));
    }
    let mut dmar = Dmar {
        // The field is width - 1; a (nonsensical) 255 saturates instead of wrapping to 0.
        host_address_width: table[36].saturating_add(1),
        flags: DmarFlags::from_bits_retain(table[37]),
        units: Vec::new(),
        reserved_regions: 0,
        other_structures: 0,
    };
    let mut offset = DMAR_HEADER_LEN;
    while offset < length {
        let bad = DmarError::BadStructure(offset);
        let header = bytes_at::<4>(table, offset).ok_or(bad)?;
        let kind = u16::from_le_bytes([header[0], header[1]]);
        let struct_len = u16::from_le_bytes([header[2], header[3]]);
        let min = if kind == TYPE_DRHD { DRHD_MIN_LEN } else { 4 };
        let end = offset.checked_add(usize::from(struct_len)).filter(|&e| e <= length && struct_len >= min);
        let body = table.get(offset..end.ok_or(bad)?).ok_or(bad)?;
        match kind {
            TYPE_DRHD => {
                let segment = bytes_at(body, 6).map(u16::from_le_bytes).ok_or(bad)?;
                let register_base = bytes_at(body, 8).map(u64::from_le_bytes).ok_or(bad)?;
                if register_base & 0xFFF != 0 {
                    return Err(DmarError::MisalignedRegisterBase(offset));
                }
                let include_pci_all = body[4] & 1 != 0;
                dmar.units
                    .push(Drhd { register_base, segment, include_pci_all })
                    .map_err(|_| DmarError::TooManyUnits(offset))?;
            }
            TYPE_RMRR => dmar.reserved_regions += 1,
            _ => dmar.other_structures += 1,
        }
        offset += body.len();
    }
    Ok(dmar)
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

    fn structure(kind: u16, body: &[u8]) -> StdVec<u8> {
        let mut s = StdVec::new();
        s.extend_from_slice(&kind.to_le_bytes());
        s.extend_from_slice(&((body.len() + 4) as u16).to_le_bytes());
        s.extend_from_slice(body);
        s
    }

    /// A DRHD with one (undecoded) PCI endpoint scope for 00:01.0.
    fn drhd(flags: u8, segment: u16, base: u64) -> StdVec<u8> {
        let mut b = vec![flags, 0];
        b.extend_from_slice(&segment.to_le_bytes());
        b.extend_from_slice(&base.to_le_bytes());
        b.extend_from_slice(&[1, 8, 0, 0, 0, 0, 1, 0]);
        structure(TYPE_DRHD, &b)
    }

    fn rmrr(base: u64, limit: u64) -> StdVec<u8> {
        let mut b = vec![0; 4];
        b.extend_from_slice(&base.to_le_bytes());
        b.extend_from_slice(&limit.to_le_bytes());
        structure(TYPE_RMRR, &b)
    }

    #[test]
    fn captured_qemu_table() {
        assert_eq!(QEMU_Q35.len(), 112);
        let d = parse(QEMU_Q35).unwrap();
        assert_eq!(d.host_address_width, 39);
        assert_eq!(d.flags, DmarFlags::INTR_REMAP);
        assert!(d.interrupt_remapping());
        assert_eq!((d.units.len(), d.reserved_regions, d.other_structures), (1, 0, 0));
        // QEMU 7.2 lists every PCI device explicitly instead of setting INCLUDE_PCI_ALL.
        let unit = Drhd { register_base: 0xfed9_0000, segment: 0, include_pci_all: false };
        assert_eq!(d.units[0], unit);
        assert_eq!(d.sole_unit(), Some(&unit));
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
                assert_eq!(err, DmarError::TooShort(len));
            } else {
                assert_eq!(err, DmarError::BadLength(112, len));
            }
        }
        assert_eq!(
            parse(&QEMU_Q35[..100]).unwrap_err().to_string(),
            "DMAR table length field 0x70 is wrong: 0x64 bytes are there and the header needs 0x30"
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
                0..=47 => assert_eq!(result.unwrap_err(), DmarError::BadLength(len as u32, 48)),
                48 => assert!(result.unwrap().units.is_empty()),
                49..=111 => assert_eq!(result.unwrap_err(), DmarError::BadStructure(48)),
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
        assert_eq!(err, DmarError::BadChecksum(0x55));
        assert!(err.to_string().contains("checksum"), "{err}");

        let mut t = QEMU_Q35.to_vec();
        t[0..4].copy_from_slice(b"APIC");
        let err = parse(&t).unwrap_err();
        assert_eq!(err, DmarError::BadSignature(*b"APIC"));
        assert_eq!(err.to_string(), "DMAR table has signature \"APIC\" (expected \"DMAR\")");

        let mut t = QEMU_Q35.to_vec();
        t[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(parse(&t), Err(DmarError::BadLength(u32::MAX, 112))));
    }

    #[test]
    fn short_or_overrunning_structures_are_errors() {
        // A DRHD needs 16 bytes; every other type at least its 4-byte header.
        for (kind, min) in [(TYPE_DRHD, 16u16), (TYPE_RMRR, 4), (2, 4), (5, 4), (0x77, 4)] {
            for len in 0..min {
                let mut s = structure(kind, &[0; 16]);
                s[2..4].copy_from_slice(&len.to_le_bytes());
                let t = table(38, 0, &[drhd(1, 0, 0x1000), s]);
                assert_eq!(parse(&t).unwrap_err(), DmarError::BadStructure(72), "kind {kind} len {len}");
            }
        }
        // A structure running past the table.
        let mut s = drhd(1, 0, 0x1000);
        s[2..4].copy_from_slice(&25u16.to_le_bytes());
        let err = parse(&table(38, 0, &[s])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "DMAR remapping structure at offset 0x30 is truncated, too short for its type or runs past the table"
        );
        // Leftover bytes too few for a structure header.
        let t = table(38, 0, &[drhd(1, 0, 0x1000), vec![0, 0]]);
        assert_eq!(parse(&t).unwrap_err(), DmarError::BadStructure(72));
    }

    #[test]
    fn synthetic_table_with_everything() {
        let t = table(
            47,
            0b111,
            &[
                drhd(0, 0, 0xfed9_0000),
                drhd(1, 0, 0xfed9_1000),
                rmrr(0x7c00_0000, 0x7c7f_ffff),
                structure(2, &[0, 0, 0, 0]),
                structure(3, &[0; 16]),
                structure(4, &[0, 0, 0, 1, b'X', 0]),
                structure(5, &[0; 4]),
                structure(0x1234, &[]),
                drhd(1, 1, 0x1_0000_0000),
            ],
        );
        let d = parse(&t).unwrap();
        assert_eq!(d.host_address_width, 48);
        assert_eq!(d.flags, DmarFlags::all());
        assert_eq!((d.reserved_regions, d.other_structures), (1, 5));
        assert_eq!(d.units.len(), 3);
        assert!(!d.units[0].include_pci_all);
        assert!(d.units[1].include_pci_all);
        assert_eq!(d.units[1].register_base, 0xfed9_1000);
        assert_eq!(d.units[2].segment, 1);
        // Several units: which serves a device is in the scopes, which are not decoded.
        assert_eq!(d.sole_unit(), None);
        // One unit, but not on segment 0.
        assert_eq!(parse(&table(38, 0, &[drhd(1, 1, 0x1000)])).unwrap().sole_unit(), None);
    }

    #[test]
    fn width_field_saturates() {
        let d = parse(&table(255, 0, &[])).unwrap();
        assert_eq!(d.host_address_width, 255);
    }

    #[test]
    fn unit_errors() {
        let t = table(38, 0, &[drhd(1, 0, 0xfed9_0010)]);
        let err = parse(&t).unwrap_err();
        assert_eq!(err, DmarError::MisalignedRegisterBase(48));
        assert!(err.to_string().contains("offset 0x30"), "{err}");

        let units: StdVec<_> = (0..9).map(|i| drhd(0, 0, 0x1000 * (i + 1))).collect();
        let err = parse(&table(38, 0, &units)).unwrap_err();
        assert_eq!(err, DmarError::TooManyUnits(48 + 8 * 24));
        assert!(err.to_string().contains("at most 8"), "{err}");
        assert!(parse(&table(38, 0, &units[..8])).is_ok());
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

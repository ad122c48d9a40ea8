//! A small encoder for the ACPI Machine Language the DSDT needs (ACPI 6.5 §20.2 "AML Grammar
//! Definition"): names, scopes, devices, integers, strings, packages, buffers and the resource
//! descriptors of a legacy serial port (§6.4.2 small resource data types).
//!
//! Every function returns the encoded bytes or an error naming what cannot be encoded; nothing
//! panics on bad input (a name with a lowercase letter, a string with a NUL, a package body
//! over 2^28 bytes).

use alloc::vec::Vec;
use core::fmt;

/// `ZeroOp`.
pub const ZERO_OP: u8 = 0x00;
/// `OneOp`.
pub const ONE_OP: u8 = 0x01;
const NAME_OP: u8 = 0x08;
const BYTE_PREFIX: u8 = 0x0a;
const WORD_PREFIX: u8 = 0x0b;
const DWORD_PREFIX: u8 = 0x0c;
const STRING_PREFIX: u8 = 0x0d;
const QWORD_PREFIX: u8 = 0x0e;
const SCOPE_OP: u8 = 0x10;
const BUFFER_OP: u8 = 0x11;
const PACKAGE_OP: u8 = 0x12;
const EXT_OP_PREFIX: u8 = 0x5b;
const DEVICE_OP: u8 = 0x82;
const ROOT_CHAR: u8 = b'\\';
const PARENT_PREFIX: u8 = b'^';
const DUAL_NAME_PREFIX: u8 = 0x2e;
const MULTI_NAME_PREFIX: u8 = 0x2f;

/// Largest value a PkgLength can encode (28 bits, §20.2.4).
pub const MAX_PKG_LENGTH: usize = 0x0fff_ffff;

/// What cannot be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmlError {
    /// A name segment is empty, longer than 4 characters, or has a character outside
    /// `A-Z`, `0-9`, `_` (or starts with a digit), §20.2.2 `NameSeg`.
    BadName,
    /// A string contains NUL or a non-ASCII byte (§20.2.3 `AsciiCharList`).
    BadString,
    /// An EISA ID is not three uppercase letters and four hex digits.
    BadEisaId,
    /// A package or buffer is larger than PkgLength or the element count allows.
    TooLarge,
}

impl fmt::Display for AmlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AmlError::BadName => "AML name segment must be 1-4 characters of A-Z, 0-9, _ not starting with a digit",
            AmlError::BadString => "AML string must be ASCII without NUL",
            AmlError::BadEisaId => "EISA ID must be three uppercase letters and four hex digits",
            AmlError::TooLarge => "AML object too large to encode",
        })
    }
}

impl core::error::Error for AmlError {}

/// Encodes a PkgLength for `body_len` bytes following it; the encoded value counts the
/// PkgLength bytes themselves (§20.2.4: "the length of the package, including the PkgLength
/// bytes"). One byte holds up to 63 in bits 5:0; otherwise bits 7:6 give the number of
/// following bytes (1-3), bits 3:0 the low nibble, and each following byte the next 8 bits.
pub fn pkg_length(body_len: usize) -> Result<Vec<u8>, AmlError> {
    for extra in 0..4usize {
        let total = body_len.checked_add(extra + 1).ok_or(AmlError::TooLarge)?;
        let limit = if extra == 0 { 0x3f } else { (1usize << (4 + 8 * extra)) - 1 };
        if total <= limit {
            if extra == 0 {
                return Ok(alloc::vec![total as u8]);
            }
            let mut v = Vec::with_capacity(extra + 1);
            v.push(((extra as u8) << 6) | (total & 0xf) as u8);
            for i in 0..extra {
                v.push((total >> (4 + 8 * i)) as u8);
            }
            return Ok(v);
        }
    }
    Err(AmlError::TooLarge)
}

fn name_seg(seg: &str) -> Result<[u8; 4], AmlError> {
    let b = seg.as_bytes();
    if b.is_empty() || b.len() > 4 || b[0].is_ascii_digit() {
        return Err(AmlError::BadName);
    }
    let mut out = [b'_'; 4];
    for (o, &c) in out.iter_mut().zip(b) {
        if !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_') {
            return Err(AmlError::BadName);
        }
        *o = c;
    }
    Ok(out)
}

/// Encodes a name path such as `_HID`, `\_SB.COM1` or `^PCI0` (§20.2.2 `NameString`).
/// Segments shorter than four characters are padded with `_`.
pub fn name_string(path: &str) -> Result<Vec<u8>, AmlError> {
    let mut out = Vec::new();
    let mut rest = path;
    if let Some(r) = rest.strip_prefix('\\') {
        out.push(ROOT_CHAR);
        rest = r;
    } else {
        while let Some(r) = rest.strip_prefix('^') {
            out.push(PARENT_PREFIX);
            rest = r;
        }
    }
    if rest.is_empty() {
        out.push(0); // NullName
        return Ok(out);
    }
    let segs: Vec<[u8; 4]> = rest.split('.').map(name_seg).collect::<Result<_, _>>()?;
    match segs.len() {
        1 => {}
        2 => out.push(DUAL_NAME_PREFIX),
        n => {
            out.push(MULTI_NAME_PREFIX);
            out.push(u8::try_from(n).map_err(|_| AmlError::TooLarge)?);
        }
    }
    for s in segs {
        out.extend_from_slice(&s);
    }
    Ok(out)
}

/// Encodes an integer with the shortest constant form (§20.2.3 `ComputationalData`).
pub fn integer(v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    match v {
        0 => out.push(ZERO_OP),
        1 => out.push(ONE_OP),
        2..=0xff => out.extend_from_slice(&[BYTE_PREFIX, v as u8]),
        0x100..=0xffff => {
            out.push(WORD_PREFIX);
            out.extend_from_slice(&(v as u16).to_le_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(DWORD_PREFIX);
            out.extend_from_slice(&(v as u32).to_le_bytes());
        }
        _ => {
            out.push(QWORD_PREFIX);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Encodes a string constant.
pub fn string(s: &str) -> Result<Vec<u8>, AmlError> {
    if s.bytes().any(|b| b == 0 || !b.is_ascii()) {
        return Err(AmlError::BadString);
    }
    let mut out = alloc::vec![STRING_PREFIX];
    out.extend_from_slice(s.as_bytes());
    out.push(0);
    Ok(out)
}

/// Encodes `EISAID("PNP0501")`: the compressed 32-bit EISA ID as a DWordConst. The three
/// letters are 5 bits each (`'A'` = 1) packed big-endian into the first two bytes, followed by
/// the four hex digits as two bytes.
pub fn eisa_id(id: &str) -> Result<Vec<u8>, AmlError> {
    let b = id.as_bytes();
    if b.len() != 7 || !b[..3].iter().all(u8::is_ascii_uppercase) {
        return Err(AmlError::BadEisaId);
    }
    let hex = core::str::from_utf8(&b[3..]).map_err(|_| AmlError::BadEisaId)?;
    if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(AmlError::BadEisaId);
    }
    let product = u16::from_str_radix(hex, 16).map_err(|_| AmlError::BadEisaId)?;
    let vendor = (u16::from(b[0] - 0x40) << 10) | (u16::from(b[1] - 0x40) << 5) | u16::from(b[2] - 0x40);
    let v = vendor.to_be_bytes();
    let p = product.to_be_bytes();
    Ok(alloc::vec![DWORD_PREFIX, v[0], v[1], p[0], p[1]])
}

/// `Name(path, value)` where `value` is an encoded data object.
pub fn name(path: &str, value: &[u8]) -> Result<Vec<u8>, AmlError> {
    let mut out = alloc::vec![NAME_OP];
    out.extend(name_string(path)?);
    out.extend_from_slice(value);
    Ok(out)
}

fn with_pkg(prefix: &[u8], head: &[u8], body: &[u8]) -> Result<Vec<u8>, AmlError> {
    let len = head.len().checked_add(body.len()).ok_or(AmlError::TooLarge)?;
    let mut out = prefix.to_vec();
    out.extend(pkg_length(len)?);
    out.extend_from_slice(head);
    out.extend_from_slice(body);
    Ok(out)
}

/// `Scope(path) { body }`.
pub fn scope(path: &str, body: &[u8]) -> Result<Vec<u8>, AmlError> {
    with_pkg(&[SCOPE_OP], &name_string(path)?, body)
}

/// `Device(path) { body }`.
pub fn device(path: &str, body: &[u8]) -> Result<Vec<u8>, AmlError> {
    with_pkg(&[EXT_OP_PREFIX, DEVICE_OP], &name_string(path)?, body)
}

/// `Package() { elements }`, each element an encoded data object.
pub fn package(elements: &[Vec<u8>]) -> Result<Vec<u8>, AmlError> {
    let count = u8::try_from(elements.len()).map_err(|_| AmlError::TooLarge)?;
    let body: Vec<u8> = elements.concat();
    with_pkg(&[PACKAGE_OP], &[count], &body)
}

/// `Buffer() { bytes }`.
pub fn buffer(bytes: &[u8]) -> Result<Vec<u8>, AmlError> {
    let size = integer(u64::try_from(bytes.len()).map_err(|_| AmlError::TooLarge)?);
    with_pkg(&[BUFFER_OP], &size, bytes)
}

/// Small resource descriptor `IO(Decode16, min, max, align, len)` (§6.4.2.5, I/O port
/// descriptor: tag 0x47, 16-bit decode flag, min, max, alignment, length).
pub fn io_port(min: u16, max: u16, align: u8, len: u8) -> [u8; 8] {
    let mn = min.to_le_bytes();
    let mx = max.to_le_bytes();
    [0x47, 0x01, mn[0], mn[1], mx[0], mx[1], align, len]
}

/// Small resource descriptor `IRQNoFlags() { irq }` (§6.4.2.1, 2-byte form: tag 0x22, mask;
/// this form means edge-triggered, active-high, exclusive), or `None` for irq > 15.
pub fn irq_no_flags(irq: u8) -> Option<[u8; 3]> {
    let mask = 1u16.checked_shl(u32::from(irq)).filter(|_| irq < 16)?.to_le_bytes();
    Some([0x22, mask[0], mask[1]])
}

/// `ResourceTemplate() { descriptors }`: a buffer of the descriptors and an end tag
/// (§6.4.2.9: tag 0x79, checksum 0 meaning "treat as correct").
pub fn resource_template(descriptors: &[&[u8]]) -> Result<Vec<u8>, AmlError> {
    let mut bytes: Vec<u8> = descriptors.concat();
    bytes.extend_from_slice(&[0x79, 0x00]);
    buffer(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkg_length_boundaries() {
        assert_eq!(pkg_length(0).unwrap(), [0x01]);
        assert_eq!(pkg_length(62).unwrap(), [0x3f]);
        // 63 + 2 = 65 = 0x41: two bytes, low nibble 1, next byte 4.
        assert_eq!(pkg_length(63).unwrap(), [0x41, 0x04]);
        assert_eq!(pkg_length(0xfff - 2).unwrap(), [0x4f, 0xff]);
        assert_eq!(pkg_length(0xfff - 1).unwrap(), [0x81, 0x00, 0x01]);
        assert_eq!(pkg_length(0xf_ffff - 3).unwrap(), [0x8f, 0xff, 0xff]);
        assert_eq!(pkg_length(0xf_ffff - 2).unwrap(), [0xc1, 0x00, 0x00, 0x01]);
        assert_eq!(pkg_length(MAX_PKG_LENGTH - 4).unwrap(), [0xcf, 0xff, 0xff, 0xff]);
        assert_eq!(pkg_length(MAX_PKG_LENGTH - 3), Err(AmlError::TooLarge));
        assert_eq!(pkg_length(usize::MAX), Err(AmlError::TooLarge));
    }

    #[test]
    fn names() {
        assert_eq!(name_string("_HID").unwrap(), b"_HID");
        assert_eq!(name_string("COM").unwrap(), b"COM_");
        assert_eq!(name_string("\\_SB").unwrap(), b"\\_SB_");
        assert_eq!(name_string("\\_SB.COM1").unwrap(), b"\\\x2e_SB_COM1");
        assert_eq!(name_string("^^A.B.C").unwrap(), b"^^\x2f\x03A___B___C___");
        assert_eq!(name_string("\\").unwrap(), b"\\\0");
        for bad in ["com1", "ABCDE", "1ABC", "A..B", "A.", "", "\\^A", "A-B", "É"] {
            if bad.is_empty() {
                assert_eq!(name_string(bad).unwrap(), [0]);
            } else {
                assert_eq!(name_string(bad), Err(AmlError::BadName), "{bad}");
            }
        }
    }

    #[test]
    fn data_objects() {
        assert_eq!(integer(0), [0]);
        assert_eq!(integer(1), [1]);
        assert_eq!(integer(5), [0x0a, 5]);
        assert_eq!(integer(0x3f8), [0x0b, 0xf8, 0x03]);
        assert_eq!(integer(0x1_0000), [0x0c, 0, 0, 1, 0]);
        assert_eq!(integer(u64::MAX), [0x0e, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(string("ab").unwrap(), [0x0d, b'a', b'b', 0]);
        assert_eq!(string("a\0"), Err(AmlError::BadString));
        assert_eq!(string("é"), Err(AmlError::BadString));
        // The values iasl produces for these EISAIDs.
        assert_eq!(eisa_id("PNP0501").unwrap(), [0x0c, 0x41, 0xd0, 0x05, 0x01]);
        assert_eq!(eisa_id("PNP0A03").unwrap(), [0x0c, 0x41, 0xd0, 0x0a, 0x03]);
        for bad in ["PNP050", "pnp0501", "PNP05G1", "PNP05011", "PN\u{e9}0501"] {
            assert_eq!(eisa_id(bad), Err(AmlError::BadEisaId), "{bad}");
        }
        assert_eq!(package(&[integer(5), integer(0)]).unwrap(), [0x12, 0x05, 0x02, 0x0a, 0x05, 0x00]);
        assert_eq!(buffer(&[1, 2]).unwrap(), [0x11, 0x05, 0x0a, 0x02, 1, 2]);
        assert_eq!(buffer(&[]).unwrap(), [0x11, 0x02, 0x00]);
        assert!(package(&alloc::vec![integer(0); 256]).is_err());
        assert_eq!(irq_no_flags(4), Some([0x22, 0x10, 0x00]));
        assert_eq!(irq_no_flags(15), Some([0x22, 0x00, 0x80]));
        assert_eq!(irq_no_flags(16), None);
        assert_eq!(irq_no_flags(255), None);
        assert_eq!(io_port(0x3f8, 0x3f8, 1, 8), [0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]);
        assert_eq!(
            device("COM1", &name("_UID", &integer(0)).unwrap()).unwrap(),
            [0x5b, 0x82, 0x0b, b'C', b'O', b'M', b'1', 0x08, b'_', b'U', b'I', b'D', 0x00]
        );
        for e in [AmlError::BadName, AmlError::BadString, AmlError::BadEisaId, AmlError::TooLarge] {
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn large_package_uses_long_pkg_length() {
        let body = alloc::vec![0u8; 5000];
        let s = scope("\\", &body).unwrap();
        // 5000 + 2 (root name: '\\' and NullName) + 3 (PkgLength) = 5005 = 0x138d.
        assert_eq!(&s[..6], &[0x10, 0x8d, 0x38, 0x01, b'\\', 0]);
        assert_eq!(s.len(), 1 + 5005);
    }
}

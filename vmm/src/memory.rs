//! Guest-physical memory as the device models see it.
//!
//! Device models that write into the guest (kvmclock's time page) and the page-table walker that
//! reads it go through [`GuestMemory`], so they can be host-tested against a plain buffer and
//! used by the VMM against its mapping of the VM's RAM. Every address comes from the guest, so
//! every access is bounds-checked and reports an error instead of panicking.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// A guest-physical access that cannot be carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemError {
    /// First guest-physical byte of the access.
    pub gpa: u64,
    /// Length of the access in bytes.
    pub len: usize,
}

impl fmt::Display for MemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest-physical access [{:#x}, +{:#x}) is outside guest RAM", self.gpa, self.len)
    }
}

impl core::error::Error for MemError {}

/// Read and write access to guest-physical memory.
pub trait GuestMemory {
    /// Reads `buf.len()` bytes starting at `gpa`; fails without partial effect if any byte is
    /// outside guest RAM.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError>;
    /// Writes `data` starting at `gpa`; fails without partial effect if any byte is outside
    /// guest RAM.
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError>;
    /// Whether `[gpa, gpa + len)` lies inside guest RAM, without touching it: for a device
    /// that must know before it starts work it could not finish (`virtio::blk` fails a read
    /// into buffers outside RAM before the back end does the read).
    fn check(&self, gpa: u64, len: usize) -> Result<(), MemError>;

    /// Reads a little-endian `u64` at `gpa`.
    fn read_u64(&self, gpa: u64) -> Result<u64, MemError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads a little-endian `u32` at `gpa`.
    fn read_u32(&self, gpa: u64) -> Result<u32, MemError> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

/// Guest RAM as one contiguous slice starting at guest-physical `base`.
pub struct SliceMemory<'a> {
    base: u64,
    bytes: &'a mut [u8],
}

impl<'a> SliceMemory<'a> {
    /// Guest RAM `[base, base + bytes.len())` backed by `bytes`.
    pub fn new(base: u64, bytes: &'a mut [u8]) -> Self {
        Self { base, bytes }
    }

    /// The byte range of the slice that `[gpa, gpa + len)` occupies, if it lies inside.
    fn range(&self, gpa: u64, len: usize) -> Result<core::ops::Range<usize>, MemError> {
        let err = MemError { gpa, len };
        let off = usize::try_from(gpa.checked_sub(self.base).ok_or(err)?).map_err(|_| err)?;
        let end = off.checked_add(len).ok_or(err)?;
        if end > self.bytes.len() {
            return Err(err);
        }
        Ok(off..end)
    }
}

impl GuestMemory for SliceMemory<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let r = self.range(gpa, buf.len())?;
        buf.copy_from_slice(&self.bytes[r]);
        Ok(())
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        let r = self.range(gpa, data.len())?;
        self.bytes[r].copy_from_slice(data);
        Ok(())
    }

    fn check(&self, gpa: u64, len: usize) -> Result<(), MemError> {
        self.range(gpa, len).map(|_| ())
    }
}

/// Owned guest RAM starting at guest-physical `base`, for tests and tools.
pub struct VecMemory {
    base: u64,
    bytes: Vec<u8>,
}

impl VecMemory {
    /// `len` zeroed bytes of guest RAM at `base`.
    pub fn new(base: u64, len: usize) -> Self {
        Self { base, bytes: vec![0; len] }
    }

    /// The backing bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The backing bytes, mutable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    fn as_slice_memory(&mut self) -> SliceMemory<'_> {
        SliceMemory::new(self.base, &mut self.bytes)
    }
}

impl GuestMemory for VecMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let err = MemError { gpa, len: buf.len() };
        let off = usize::try_from(gpa.checked_sub(self.base).ok_or(err)?).map_err(|_| err)?;
        let src = self.bytes.get(off..off.checked_add(buf.len()).ok_or(err)?).ok_or(err)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        self.as_slice_memory().write(gpa, data)
    }

    fn check(&self, gpa: u64, len: usize) -> Result<(), MemError> {
        let err = MemError { gpa, len };
        let off = usize::try_from(gpa.checked_sub(self.base).ok_or(err)?).map_err(|_| err)?;
        let end = off.checked_add(len).ok_or(err)?;
        if end > self.bytes.len() {
            return Err(err);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        let mut m = VecMemory::new(0x1000, 0x100);
        m.write(0x1000, &[1, 2, 3]).unwrap();
        m.write(0x10fc, &[9; 4]).unwrap();
        assert_eq!(m.write(0x10fd, &[9; 4]), Err(MemError { gpa: 0x10fd, len: 4 }));
        assert!(m.write(0xfff, &[0]).is_err());
        assert!(m.write(u64::MAX, &[0; 2]).is_err());
        let mut b = [0u8; 3];
        m.read(0x1000, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3]);
        assert_eq!(m.read_u32(0x10fc), Ok(0x0909_0909));
        assert!(m.read_u64(0x10fc).is_err());
        assert!(m.read(u64::MAX - 1, &mut b).is_err());
        assert!(!MemError { gpa: 1, len: 2 }.to_string().is_empty());
        // Zero-length accesses at the end are fine, one past is not.
        assert!(m.read(0x1100, &mut []).is_ok());
        assert!(m.read(0x1101, &mut []).is_err());
        // `check` agrees with the accesses and touches nothing.
        assert_eq!(m.check(0x1000, 0x100), Ok(()));
        assert_eq!(m.check(0x10fd, 4), Err(MemError { gpa: 0x10fd, len: 4 }));
        assert!(m.check(0xfff, 1).is_err());
        assert!(m.check(u64::MAX, 2).is_err());
        assert_eq!(m.read_u32(0x10fc), Ok(0x0909_0909));
        let mut raw = [0u8; 8];
        let mut s = SliceMemory::new(u64::MAX - 7, &mut raw);
        s.write(u64::MAX - 7, &[1; 8]).unwrap();
        assert!(s.write(u64::MAX - 6, &[1; 8]).is_err());
        assert_eq!(s.check(u64::MAX - 7, 8), Ok(()));
        assert!(s.check(u64::MAX - 6, 8).is_err());
        assert!(s.check(0, 1).is_err());
        assert_eq!(s.read_u64(u64::MAX - 7), Ok(0x0101_0101_0101_0101));
    }
}

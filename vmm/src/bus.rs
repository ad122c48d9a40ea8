//! An address bus: device models registered on port-I/O or MMIO ranges.
//!
//! Shaped like cloud-hypervisor's `Bus` and vm-superio's devices: a device sees
//! `read(offset, data)` / `write(offset, data)` with the offset relative to the start of its
//! range and the access size given by the slice length. The bus maps an address to the key of
//! the device that claimed it; the caller owns the devices and dispatches on the key, so the
//! platform can still reach each device by its concrete type (to push serial input, to ask for
//! its interrupt line).
//!
//! Ranges never overlap (a second claim on a byte is refused), and an access that is not wholly
//! inside one range is unclaimed: reads of unclaimed addresses return all-ones, as on a PC where
//! nobody drives the data lines, and writes are dropped. The caller is told either way so it can
//! count or log such accesses.

use alloc::vec::Vec;
use core::fmt;

/// A device model on the bus.
pub trait BusDevice {
    /// Reads `data.len()` bytes (1, 2, 4 or 8) at `offset` from the start of the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` from the start of the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a registration was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusError {
    /// The range has length zero.
    EmptyRange {
        /// Requested base.
        base: u64,
    },
    /// `base + len` overflows the 64-bit address space.
    RangeOverflow {
        /// Requested base.
        base: u64,
        /// Requested length.
        len: u64,
    },
    /// The range overlaps one already registered.
    Overlap {
        /// Requested base.
        base: u64,
        /// Requested length.
        len: u64,
        /// Base of the existing range.
        existing_base: u64,
        /// Length of the existing range.
        existing_len: u64,
    },
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BusError::EmptyRange { base } => write!(f, "bus range at {base:#x} has length zero"),
            BusError::RangeOverflow { base, len } => {
                write!(f, "bus range {base:#x} + {len:#x} overflows the address space")
            }
            BusError::Overlap { base, len, existing_base, existing_len } => write!(
                f,
                "bus range [{base:#x}, +{len:#x}) overlaps the registered range [{existing_base:#x}, +{existing_len:#x})"
            ),
        }
    }
}

impl core::error::Error for BusError {}

/// Whether an access reached a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access<K> {
    /// The device with this key handled it.
    Claimed(K),
    /// No device claims the whole access; a read returned all-ones, a write was dropped.
    Unclaimed,
}

#[derive(Clone, Copy, Debug)]
struct Entry<K> {
    base: u64,
    len: u64,
    key: K,
}

impl<K> Entry<K> {
    /// One past the last address; registration guarantees no overflow.
    fn end(&self) -> u64 {
        self.base + self.len
    }
}

/// Address ranges mapped to device keys, kept sorted by base.
#[derive(Clone, Debug)]
pub struct Bus<K> {
    entries: Vec<Entry<K>>,
}

impl<K> Default for Bus<K> {
    fn default() -> Self {
        Self { entries: Vec::new() }
    }
}

impl<K: Copy> Bus<K> {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims `[base, base + len)` for the device `key`. Ranges are half-open, so `base + len`
    /// must not exceed `u64::MAX`.
    pub fn insert(&mut self, base: u64, len: u64, key: K) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::EmptyRange { base });
        }
        let end = base.checked_add(len).ok_or(BusError::RangeOverflow { base, len })?;
        // The first entry starting at or after `base`, and the one before it, are the only
        // candidates for overlap because the entries are sorted and disjoint.
        let pos = self.entries.partition_point(|e| e.base < base);
        let neighbours = [pos.checked_sub(1).and_then(|p| self.entries.get(p)), self.entries.get(pos)];
        for e in neighbours.into_iter().flatten() {
            if e.base < end && base < e.end() {
                return Err(BusError::Overlap { base, len, existing_base: e.base, existing_len: e.len });
            }
        }
        self.entries.insert(pos, Entry { base, len, key });
        Ok(())
    }

    /// Releases the range starting exactly at `base`, returning its key.
    pub fn remove(&mut self, base: u64) -> Option<K> {
        let pos = self.entries.iter().position(|e| e.base == base)?;
        Some(self.entries.remove(pos).key)
    }

    /// The device claiming every byte of `[addr, addr + size)` and the offset of `addr` in its
    /// range; `None` if no single device claims the whole access (including `size == 0`).
    pub fn resolve(&self, addr: u64, size: usize) -> Option<(K, u64)> {
        let size = u64::try_from(size).ok().filter(|&s| s > 0)?;
        let last = addr.checked_add(size - 1)?;
        let pos = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(pos.checked_sub(1)?)?;
        if last < e.end() {
            Some((e.key, addr - e.base))
        } else {
            None
        }
    }

    /// Reads `data.len()` bytes at `addr`: calls `dev(key, offset, data)` for the claiming
    /// device, or fills `data` with all-ones.
    pub fn read(&self, addr: u64, data: &mut [u8], dev: impl FnOnce(K, u64, &mut [u8])) -> Access<K> {
        match self.resolve(addr, data.len()) {
            Some((key, offset)) => {
                dev(key, offset, data);
                Access::Claimed(key)
            }
            None => {
                data.fill(0xff);
                Access::Unclaimed
            }
        }
    }

    /// Writes `data` at `addr`: calls `dev(key, offset, data)` for the claiming device, or
    /// drops the write.
    pub fn write(&self, addr: u64, data: &[u8], dev: impl FnOnce(K, u64, &[u8])) -> Access<K> {
        match self.resolve(addr, data.len()) {
            Some((key, offset)) => {
                dev(key, offset, data);
                Access::Claimed(key)
            }
            None => Access::Unclaimed,
        }
    }

    /// The registered ranges as `(base, len, key)`, sorted by base.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64, K)> + '_ {
        self.entries.iter().map(|e| (e.base, e.len, e.key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Dev {
        Uart,
        Pm,
    }

    #[test]
    fn dispatch_and_offsets() {
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, Dev::Uart).unwrap();
        bus.insert(0x600, 4, Dev::Pm).unwrap();
        assert_eq!(bus.resolve(0x3f8, 1), Some((Dev::Uart, 0)));
        assert_eq!(bus.resolve(0x3ff, 1), Some((Dev::Uart, 7)));
        assert_eq!(bus.resolve(0x3fe, 2), Some((Dev::Uart, 6)));
        assert_eq!(bus.resolve(0x3ff, 2), None, "access straddling the end");
        assert_eq!(bus.resolve(0x3f7, 2), None, "access straddling the start");
        assert_eq!(bus.resolve(0x400, 1), None);
        assert_eq!(bus.resolve(0x3f8, 0), None);
        assert_eq!(bus.resolve(0x602, 2), Some((Dev::Pm, 2)));

        let mut seen = None;
        let mut data = [0u8; 1];
        assert_eq!(bus.read(0x3fd, &mut data, |k, off, d| seen = Some((k, off, d.len()))), Access::Claimed(Dev::Uart));
        assert_eq!(seen, Some((Dev::Uart, 5, 1)));
        let mut data = [0u8; 4];
        assert_eq!(bus.read(0x80, &mut data, |_, _, _| panic!("no device")), Access::Unclaimed);
        assert_eq!(data, [0xff; 4]);
        assert_eq!(bus.write(0x80, &[1], |_, _, _| panic!("no device")), Access::Unclaimed);
        let mut wrote = None;
        assert_eq!(bus.write(0x600, &[0x34], |k, off, d| wrote = Some((k, off, d[0]))), Access::Claimed(Dev::Pm));
        assert_eq!(wrote, Some((Dev::Pm, 0, 0x34)));
    }

    #[test]
    fn overlaps_refused() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, 1).unwrap();
        let overlap = |base, len| BusError::Overlap { base, len, existing_base: 0x100, existing_len: 0x10 };
        assert_eq!(bus.insert(0x100, 1, 2), Err(overlap(0x100, 1)));
        assert_eq!(bus.insert(0x10f, 1, 2), Err(overlap(0x10f, 1)));
        assert_eq!(bus.insert(0xf0, 0x11, 2), Err(overlap(0xf0, 0x11)));
        assert_eq!(bus.insert(0x0, 0x1000, 2), Err(overlap(0x0, 0x1000)));
        bus.insert(0xf0, 0x10, 2).unwrap();
        bus.insert(0x110, 0x10, 3).unwrap();
        assert_eq!(bus.insert(0, 0, 4), Err(BusError::EmptyRange { base: 0 }));
        assert_eq!(bus.insert(u64::MAX, 2, 4), Err(BusError::RangeOverflow { base: u64::MAX, len: 2 }));
        // Ranges are half-open, so the very last address cannot be claimed.
        assert_eq!(bus.insert(u64::MAX, 1, 4), Err(BusError::RangeOverflow { base: u64::MAX, len: 1 }));
        bus.insert(u64::MAX - 1, 1, 5).unwrap();
        assert_eq!(bus.resolve(u64::MAX - 1, 1), Some((5, 0)));
        assert_eq!(bus.resolve(u64::MAX - 1, 2), None);
        assert_eq!(bus.resolve(u64::MAX, 1), None);
        assert_eq!(bus.ranges().map(|r| r.2).collect::<Vec<_>>(), [2, 1, 3, 5]);
        assert_eq!(bus.remove(0x100), Some(1));
        assert_eq!(bus.remove(0x100), None);
        bus.insert(0x100, 0x10, 6).unwrap();
        for e in [BusError::EmptyRange { base: 1 }, BusError::RangeOverflow { base: 1, len: 2 }, overlap(1, 2)] {
            assert!(!e.to_string().is_empty());
        }
    }

    proptest! {
        /// Random registrations never produce overlapping ranges, and every resolved access
        /// lies inside the range it resolved to.
        #[test]
        fn prop_disjoint(regs in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..40),
                         probes in proptest::collection::vec((any::<u64>(), 0usize..16), 0..40)) {
            let mut bus = Bus::new();
            for (i, (base, len)) in regs.iter().enumerate() {
                let _ = bus.insert(base % 0x10000, len % 0x100, i);
            }
            let r: Vec<_> = bus.ranges().collect();
            for w in r.windows(2) {
                prop_assert!(w[0].0 + w[0].1 <= w[1].0);
            }
            for (addr, size) in probes {
                let addr = addr % 0x10100;
                if let Some((k, off)) = bus.resolve(addr, size) {
                    let (base, len, _) = r.iter().copied().find(|e| e.2 == k).unwrap();
                    prop_assert_eq!(addr - base, off);
                    prop_assert!(off + size as u64 <= len);
                }
            }
        }
    }
}

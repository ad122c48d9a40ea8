//! PCI Express enhanced configuration access (ECAM): each function's 4 KiB of
//! configuration space is memory-mapped at `base + (bus << 20 | dev << 15 | func << 12)`.
//! The region lies below 4 GiB (MCFG), inside the microvisor's identity map.

use microvisor::pci::{Bdf, ConfigSpace};

use super::phys::IDENTITY_LIMIT;

pub struct Ecam {
    base: u64,
    bus_start: u8,
    bus_end: u8,
}

impl Ecam {
    /// The ECAM window from MCFG, if it lies where the microvisor can reach it.
    pub fn new(base: u64, bus_start: u8, bus_end: u8) -> Option<Self> {
        let size = (u64::from(bus_end) + 1) << 20;
        (base.checked_add(size)? <= IDENTITY_LIMIT && bus_start <= bus_end).then_some(Self { base, bus_start, bus_end })
    }

    pub fn buses(&self) -> core::ops::RangeInclusive<u8> {
        self.bus_start..=self.bus_end
    }

    fn address(&self, bdf: Bdf, offset: u16) -> Option<u64> {
        if bdf.bus < self.bus_start || bdf.bus > self.bus_end || offset >= 4096 || !offset.is_multiple_of(4) {
            return None;
        }
        let f = (u64::from(bdf.bus) << 20) | (u64::from(bdf.dev & 31) << 15) | (u64::from(bdf.func & 7) << 12);
        Some(self.base + f + u64::from(offset))
    }
}

impl ConfigSpace for Ecam {
    fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
        match self.address(bdf, offset) {
            // SAFETY: the address is a dword inside the MCFG window (checked in `new` and
            // `address`), identity-mapped MMIO that only the microvisor touches.
            Some(a) => unsafe { core::ptr::read_volatile(a as *const u32) },
            None => u32::MAX,
        }
    }

    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
        if let Some(a) = self.address(bdf, offset) {
            // SAFETY: as in read32; writes go only through the enumeration code and the
            // assignment filter, which decide what may change.
            unsafe { core::ptr::write_volatile(a as *mut u32, value) };
        }
    }
}

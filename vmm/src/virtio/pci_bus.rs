//! PCI bus 0 for the Linux VM: configuration mechanism #1, a host bridge at 00:00.0 and the
//! virtio functions, and dispatch of their BARs.
//!
//! Configuration mechanism #1 (PCI Local Bus 3.0 §3.2.2.3.2): a 32-bit write to
//! `CONFIG_ADDRESS` (port `0xCF8`) selects `enable(31) | bus(23:16) | device(15:11) |
//! function(10:8) | register(7:2)`; `CONFIG_DATA` (ports `0xCFC-0xCFF`) then reads or writes
//! that dword's bytes. Linux's `pci_check_type1` writes a byte to `0xCFB` (ignored here), then
//! checks that `0xCF8` reads back what it wrote, and its `pci_sanity_check` looks for a host
//! bridge class on bus 0, which the bridge at 00:00.0 answers. Every absent bus, device or
//! function reads all-ones (vendor `0xffff`), so Linux's scan of bus 0 costs one read per slot.
//!
//! The host bridge has no BARs and ignores writes. Functions are single-function devices in
//! slots 1-31. BARs are decoded only while the function's Memory Space bit is set.

use alloc::vec::Vec;
use core::fmt;

use super::pci::{MsiMessage, VirtioPci, BAR0_SIZE};
use crate::memory::GuestMemory;
use crate::mmio::{decode, CpuMode, DecodeError};

/// `CONFIG_ADDRESS`.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// `CONFIG_DATA` (first of four ports).
pub const CONFIG_DATA: u16 = 0xcfc;
/// Ports claimed: `0xCF8-0xCFF`.
pub const CONFIG_PORTS: u16 = 8;
/// The host bridge's ids: Red Hat's "QEMU PCIe host bridge" (`1b36:0008`), class 06 00 00.
pub const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
/// Device id of the host bridge.
pub const HOST_BRIDGE_DEVICE: u16 = 0x0008;

/// Why a function could not be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciError {
    /// Slot 0 (the host bridge) or above 31.
    BadSlot {
        /// The slot.
        slot: u8,
    },
    /// The slot is taken.
    SlotTaken {
        /// The slot.
        slot: u8,
    },
}

impl fmt::Display for PciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PciError::BadSlot { slot } => write!(f, "PCI slot {slot} is not in 1..=31"),
            PciError::SlotTaken { slot } => write!(f, "PCI slot {slot} is already used"),
        }
    }
}

impl core::error::Error for PciError {}

/// Bus 0: the host bridge and the virtio functions.
pub struct PciBus {
    address: u32,
    functions: Vec<(u8, VirtioPci)>,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus with only the host bridge.
    pub fn new() -> Self {
        Self { address: 0, functions: Vec::new() }
    }

    /// Adds `function` as device `slot`, function 0, with BAR 0 placed at `bar0` (a multiple
    /// of [`BAR0_SIZE`], outside RAM; memory decoding stays off until the guest turns it on).
    pub fn add(&mut self, slot: u8, bar0: u64, mut function: VirtioPci) -> Result<(), PciError> {
        if slot == 0 || slot > 31 {
            return Err(PciError::BadSlot { slot });
        }
        if self.functions.iter().any(|(s, _)| *s == slot) {
            return Err(PciError::SlotTaken { slot });
        }
        function.set_bar0(bar0);
        self.functions.push((slot, function));
        Ok(())
    }

    /// The function in `slot`.
    pub fn function(&self, slot: u8) -> Option<&VirtioPci> {
        self.functions.iter().find(|(s, _)| *s == slot).map(|(_, f)| f)
    }

    /// The function in `slot`, mutable.
    pub fn function_mut(&mut self, slot: u8) -> Option<&mut VirtioPci> {
        self.functions.iter_mut().find(|(s, _)| *s == slot).map(|(_, f)| f)
    }

    /// Whether `port` is one of the configuration ports.
    pub fn claims_port(port: u16) -> bool {
        (CONFIG_ADDRESS..CONFIG_ADDRESS + CONFIG_PORTS).contains(&port)
    }

    /// The selected (slot, register) if the address register selects something on bus 0.
    fn selected(&self) -> Option<(u8, u8, u8)> {
        let a = self.address;
        if a & (1 << 31) == 0 || (a >> 16) & 0xff != 0 {
            return None;
        }
        Some((((a >> 11) & 0x1f) as u8, ((a >> 8) & 7) as u8, (a & 0xfc) as u8))
    }

    fn host_bridge_image() -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0..2].copy_from_slice(&HOST_BRIDGE_VENDOR.to_le_bytes());
        c[2..4].copy_from_slice(&HOST_BRIDGE_DEVICE.to_le_bytes());
        c[0x0b] = 0x06; // class: bridge, subclass 0: host bridge
        c
    }

    /// `IN` of `size` bytes from a configuration port; `None` if `port` is not one of them.
    pub fn io_in(&mut self, port: u16, size: u8) -> Option<u32> {
        if !Self::claims_port(port) {
            return None;
        }
        let n = usize::from(size.clamp(1, 4));
        let mut buf = [0xffu8; 4];
        if port < CONFIG_DATA {
            let k = usize::from(port - CONFIG_ADDRESS);
            let a = self.address.to_le_bytes();
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = a.get(k + i).copied().unwrap_or(0xff);
            }
        } else {
            let k = port - CONFIG_DATA;
            if usize::from(k) + n <= 4 {
                if let Some((slot, func, reg)) = self.selected() {
                    let offset = reg + k as u8;
                    let data = &mut buf[..n];
                    if slot == 0 && func == 0 {
                        data.fill(0);
                        let img = Self::host_bridge_image();
                        for (i, b) in data.iter_mut().enumerate() {
                            *b = img.get(usize::from(offset) + i).copied().unwrap_or(0);
                        }
                    } else if func == 0 {
                        if let Some(f) = self.function(slot) {
                            f.config_read(offset, data);
                        }
                    }
                }
            }
        }
        Some(u32::from_le_bytes(buf) & (u32::MAX >> (32 - 8 * n as u32)))
    }

    /// `OUT` of the low `size` bytes of `value` to a configuration port; `false` if `port` is
    /// not one of them.
    pub fn io_out(&mut self, port: u16, size: u8, value: u32) -> bool {
        if !Self::claims_port(port) {
            return false;
        }
        let n = usize::from(size.clamp(1, 4));
        let bytes = value.to_le_bytes();
        if port == CONFIG_ADDRESS && n == 4 {
            // Bits 1:0 are reserved and read back 0.
            self.address = value & !3;
        } else if port >= CONFIG_DATA {
            let k = port - CONFIG_DATA;
            if usize::from(k) + n <= 4 {
                if let Some((slot, 0, reg)) = self.selected() {
                    if let Some(f) = self.function_mut(slot) {
                        f.config_write(reg + k as u8, &bytes[..n]);
                    }
                }
            }
        }
        // Narrow writes to 0xCF8-0xCFB (Linux's `outb(0x01, 0xCFB)` probe) select nothing.
        true
    }

    fn resolve(&mut self, gpa: u64, len: usize) -> Option<(&mut VirtioPci, u64)> {
        if len == 0 {
            return None;
        }
        self.functions.iter_mut().find_map(|(_, f)| {
            let base = f.bar0()?;
            let off = gpa.checked_sub(base)?;
            (off.checked_add(len as u64)? <= BAR0_SIZE).then_some((f, off))
        })
    }

    /// Whether `gpa` is inside a BAR some function decodes now (the VMM asks this before
    /// handing a stage-2 fault to [`PciBus::complete_mmio`] rather than to the platform).
    pub fn claims_mmio(&self, gpa: u64) -> bool {
        self.functions
            .iter()
            .any(|(_, f)| f.bar0().is_some_and(|base| gpa.checked_sub(base).is_some_and(|o| o < BAR0_SIZE)))
    }

    /// Emulates the MMIO instruction `insn` that faulted on `gpa` inside a BAR (as
    /// `Platform::complete_mmio` does for the platform's devices), updating `regs` for loads;
    /// returns the instruction length to add to RIP. An access that straddles the BAR's end
    /// reads all-ones and writes nothing.
    pub fn complete_mmio(
        &mut self,
        gpa: u64,
        insn: &[u8],
        mode: CpuMode,
        regs: &mut [u64; 16],
        mem: &mut dyn GuestMemory,
    ) -> Result<usize, DecodeError> {
        let i = decode(insn, mode)?;
        let n = usize::from(i.size.clamp(1, 8));
        match i.write_value(regs) {
            Some(v) => {
                self.mmio_write(gpa, &v.to_le_bytes()[..n], mem);
            }
            None => {
                let mut buf = [0xffu8; 8];
                if !self.mmio_read(gpa, &mut buf[..n]) {
                    buf = [0xff; 8];
                }
                i.complete_read(regs, u64::from_le_bytes(buf));
            }
        }
        Ok(i.len)
    }

    /// An MMIO read inside some function's BAR; `false` if none claims `[gpa, gpa + len)`.
    pub fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) -> bool {
        match self.resolve(gpa, data.len()) {
            Some((f, off)) => {
                f.bar_read(off, data);
                true
            }
            None => false,
        }
    }

    /// An MMIO write inside some function's BAR; `false` if none claims it.
    pub fn mmio_write(&mut self, gpa: u64, data: &[u8], mem: &mut dyn GuestMemory) -> bool {
        match self.resolve(gpa, data.len()) {
            Some((f, off)) => {
                f.bar_write(off, data, mem);
                true
            }
            None => false,
        }
    }

    /// Runs every function against its back end (call when a back end's doorbell rang, or
    /// periodically).
    pub fn poll(&mut self, mem: &mut dyn GuestMemory) {
        for (_, f) in &mut self.functions {
            f.process(mem);
        }
    }

    /// The MSI writes the functions performed, to deliver to the local APIC.
    pub fn take_messages(&mut self) -> Vec<MsiMessage> {
        let mut v = Vec::new();
        for (_, f) in &mut self.functions {
            v.extend(f.take_messages());
        }
        v
    }
}

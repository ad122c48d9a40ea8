//! An I/O APIC with 24 pins at 0xFEC00000, as the 82093AA datasheet describes it.
//!
//! Registers are reached indirectly (datasheet §3.1): the guest writes a register index to
//! IOREGSEL (offset 0x00) and accesses the register through IOWIN (offset 0x10), 32 bits at a
//! time. Index 0x00 is the ID, 0x01 the version (max redirection entry in bits 23:16), 0x02 the
//! arbitration ID, and 0x10 + 2n / 0x11 + 2n the low / high halves of redirection entry n
//! (§3.2.4): vector 7:0, delivery mode 10:8, destination mode 11, delivery status 12 (RO),
//! polarity 13, remote IRR 14 (RO), trigger mode 15 (1 = level), mask 16, destination 63:56.
//!
//! Devices drive pins with [`IoApic::set_irq`] (the logical level, already corrected for
//! polarity). An edge pin delivers on each rising edge; a level pin delivers while asserted,
//! then holds off (remote IRR set) until the local APIC broadcasts an EOI for its vector
//! ([`IoApic::eoi`]), after which a still-asserted pin delivers again. Deliveries queue up in
//! the model and the platform drains them into the local APIC ([`IoApic::take_deliveries`]).

use alloc::vec::Vec;

use crate::bus::BusDevice;

/// The I/O APIC's MMIO base.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Size of the MMIO window the model decodes.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Number of pins (redirection entries).
pub const IOAPIC_PINS: usize = 24;
/// Version register: version 0x11, max redirection entry 23 (datasheet §3.2.2).
pub const IOAPIC_VERSION: u32 = 0x0017_0011;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;

const RTE_DELIVERY_STATUS: u64 = 1 << 12;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
/// Bits the guest can write: everything except delivery status and remote IRR, and the
/// reserved bits 55:17 (bits 55:48 are the extended destination ID some hypervisors define;
/// not offered here).
const RTE_WRITABLE: u64 = 0xff00_0000_0001_afff;

/// One interrupt for the local APIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The vector.
    pub vector: u8,
    /// Level-triggered (the local APIC sets TMR and broadcasts its EOI).
    pub level: bool,
    /// The destination field (bits 63:56); with one CPU the platform delivers regardless.
    pub destination: u8,
}

/// The I/O APIC.
#[derive(Clone, Debug)]
pub struct IoApic {
    id: u32,
    ioregsel: u32,
    redir: [u64; IOAPIC_PINS],
    /// Logical level of each pin.
    asserted: [bool; IOAPIC_PINS],
    pending: Vec<Delivery>,
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new(0)
    }
}

impl IoApic {
    /// An I/O APIC after reset: every entry masked (datasheet §3.2.4: "mask ... set after
    /// reset").
    pub fn new(id: u8) -> Self {
        Self {
            id: u32::from(id & 0xf) << 24,
            ioregsel: 0,
            redir: [RTE_MASKED; IOAPIC_PINS],
            asserted: [false; IOAPIC_PINS],
            pending: Vec::new(),
        }
    }

    /// Redirection entry `pin`.
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.redir.get(pin).copied()
    }

    /// Deliveries produced since the last call.
    pub fn take_deliveries(&mut self) -> Vec<Delivery> {
        core::mem::take(&mut self.pending)
    }

    /// Delivers pin `pin` if its entry allows: unmasked, and for level pins not awaiting EOI.
    /// Only fixed (000) and lowest-priority (001) delivery modes produce vectors; SMI, NMI,
    /// INIT and ExtINT are not used by Linux for device pins and are dropped.
    fn try_deliver(&mut self, pin: usize) {
        let Some(&rte) = self.redir.get(pin) else { return };
        if rte & RTE_MASKED != 0 {
            return;
        }
        let level = rte & RTE_LEVEL != 0;
        if level && rte & RTE_REMOTE_IRR != 0 {
            return;
        }
        if (rte >> 8) & 7 > 1 {
            return;
        }
        let vector = (rte & 0xff) as u8;
        if level {
            // §3.2.4: remote IRR "is set to 1 after the level interrupt is accepted by a local
            // APIC" and cleared when the EOI with a matching vector arrives.
            self.redir[pin] |= RTE_REMOTE_IRR;
        }
        let d = Delivery { vector, level, destination: (rte >> 56) as u8 };
        if !self.pending.contains(&d) {
            self.pending.push(d);
        }
    }

    /// Sets the logical level of pin `pin`; out-of-range pins are ignored.
    pub fn set_irq(&mut self, pin: usize, asserted: bool) {
        let Some(&old) = self.asserted.get(pin) else { return };
        self.asserted[pin] = asserted;
        let level = self.redir[pin] & RTE_LEVEL != 0;
        if asserted && (level || !old) {
            self.try_deliver(pin);
        }
    }

    /// Asserts and deasserts an edge pin in one go (a pulse).
    pub fn pulse(&mut self, pin: usize) {
        self.set_irq(pin, true);
        self.set_irq(pin, false);
    }

    /// An EOI broadcast for `vector` from the local APIC: clears remote IRR on level pins with
    /// that vector and re-delivers those still asserted.
    pub fn eoi(&mut self, vector: u8) {
        for pin in 0..IOAPIC_PINS {
            let rte = self.redir[pin];
            if rte & RTE_LEVEL != 0 && rte & RTE_REMOTE_IRR != 0 && (rte & 0xff) as u8 == vector {
                self.redir[pin] &= !RTE_REMOTE_IRR;
                if self.asserted[pin] {
                    self.try_deliver(pin);
                }
            }
        }
    }

    /// Reads the register selected by index `reg`.
    pub fn read_register(&self, reg: u32) -> u32 {
        match reg {
            0x00 => self.id,
            0x01 => IOAPIC_VERSION,
            0x02 => self.id, // arbitration ID mirrors the ID
            0x10..=0x3f => {
                let pin = ((reg - 0x10) / 2) as usize;
                let mut rte = self.redir[pin];
                // Delivery status: "send pending" never lingers here, deliveries are immediate.
                rte &= !RTE_DELIVERY_STATUS;
                if reg.is_multiple_of(2) {
                    rte as u32
                } else {
                    (rte >> 32) as u32
                }
            }
            _ => 0xffff_ffff,
        }
    }

    /// Writes the register selected by index `reg`.
    pub fn write_register(&mut self, reg: u32, value: u32) {
        match reg {
            0x00 => self.id = value & 0x0f00_0000,
            0x10..=0x3f => {
                let pin = ((reg - 0x10) / 2) as usize;
                let old = self.redir[pin];
                let merged = if reg.is_multiple_of(2) {
                    (old & !0xffff_ffff) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                let new = (merged & RTE_WRITABLE) | (old & RTE_REMOTE_IRR);
                // An edge entry has no remote IRR.
                let new = if new & RTE_LEVEL == 0 { new & !RTE_REMOTE_IRR } else { new };
                self.redir[pin] = new;
                // Unmasking (or switching to level) an asserted level pin delivers it.
                if new & RTE_LEVEL != 0 && self.asserted[pin] {
                    self.try_deliver(pin);
                }
            }
            _ => {}
        }
    }
}

impl BusDevice for IoApic {
    /// IOREGSEL and IOWIN are 32-bit registers; other sizes and offsets read all-ones.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match (offset, data.len()) {
            (IOREGSEL, 4) => self.ioregsel,
            (IOWIN, 4) => self.read_register(self.ioregsel),
            _ => 0xffff_ffff,
        };
        data.fill(0xff);
        for (d, s) in data.iter_mut().zip(v.to_le_bytes()) {
            *d = s;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else { return };
        let v = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.ioregsel = v & 0xff,
            IOWIN => self.write_register(self.ioregsel, v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn program(io: &mut IoApic, pin: u32, low: u32, high: u32) {
        BusDevice::write(io, IOREGSEL, &(0x10 + 2 * pin).to_le_bytes());
        BusDevice::write(io, IOWIN, &low.to_le_bytes());
        BusDevice::write(io, IOREGSEL, &(0x11 + 2 * pin).to_le_bytes());
        BusDevice::write(io, IOWIN, &high.to_le_bytes());
    }

    fn read(io: &mut IoApic, reg: u32) -> u32 {
        BusDevice::write(io, IOREGSEL, &reg.to_le_bytes());
        let mut d = [0u8; 4];
        BusDevice::read(io, IOWIN, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn identity_registers() {
        let mut io = IoApic::new(2);
        assert_eq!(read(&mut io, 0), 2 << 24);
        assert_eq!(read(&mut io, 1), 0x0017_0011);
        assert_eq!(read(&mut io, 0x10), RTE_MASKED as u32);
        assert_eq!(read(&mut io, 0x40), 0xffff_ffff);
        let mut d = [0u8; 4];
        BusDevice::read(&mut io, IOREGSEL, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x40);
        let mut d = [0u8; 2];
        BusDevice::read(&mut io, IOWIN, &mut d);
        assert_eq!(d, [0xff, 0xff]);
    }

    #[test]
    fn edge_pin() {
        let mut io = IoApic::new(0);
        io.set_irq(4, true);
        assert!(io.take_deliveries().is_empty(), "masked");
        io.set_irq(4, false);
        program(&mut io, 4, 0x24, 0);
        assert_eq!(read(&mut io, 0x18), 0x24);
        io.set_irq(4, true);
        assert_eq!(io.take_deliveries(), [Delivery { vector: 0x24, level: false, destination: 0 }]);
        io.set_irq(4, true);
        assert!(io.take_deliveries().is_empty(), "no new edge");
        io.set_irq(4, false);
        io.pulse(4);
        assert_eq!(io.take_deliveries().len(), 1);
        io.eoi(0x24);
        assert!(io.take_deliveries().is_empty());
    }

    #[test]
    fn level_pin_remote_irr() {
        let mut io = IoApic::new(0);
        program(&mut io, 9, 0x39 | RTE_LEVEL as u32, 0x0100_0000);
        io.set_irq(9, true);
        assert_eq!(io.take_deliveries(), [Delivery { vector: 0x39, level: true, destination: 1 }]);
        assert_ne!(read(&mut io, 0x22) & RTE_REMOTE_IRR as u32, 0);
        io.set_irq(9, true);
        assert!(io.take_deliveries().is_empty(), "held by remote IRR");
        io.eoi(0x38);
        assert!(io.take_deliveries().is_empty(), "other vector");
        io.eoi(0x39);
        assert_eq!(io.take_deliveries().len(), 1, "still asserted: redelivered");
        io.set_irq(9, false);
        io.eoi(0x39);
        assert!(io.take_deliveries().is_empty());
        assert_eq!(read(&mut io, 0x22) & RTE_REMOTE_IRR as u32, 0);
        // Guest cannot set remote IRR or delivery status.
        program(&mut io, 9, 0x39 | RTE_LEVEL as u32 | (1 << 14) | (1 << 12), 0);
        assert_eq!(read(&mut io, 0x22), 0x39 | RTE_LEVEL as u32);
        // Masked while asserted, unmasking delivers.
        program(&mut io, 9, 0x39 | (RTE_LEVEL | RTE_MASKED) as u32, 0);
        io.set_irq(9, true);
        assert!(io.take_deliveries().is_empty());
        program(&mut io, 9, 0x39 | RTE_LEVEL as u32, 0);
        assert_eq!(io.take_deliveries().len(), 1);
        // Non-fixed delivery modes are dropped.
        program(&mut io, 10, 0x40 | (4 << 8), 0);
        io.pulse(10);
        assert!(io.take_deliveries().is_empty());
    }

    proptest! {
        #[test]
        fn prop_hostile(ops in proptest::collection::vec((any::<u64>(), any::<u32>(), 0usize..6, 0u8..4), 0..300)) {
            let mut io = IoApic::new(0);
            for (off, v, len, kind) in ops {
                let mut buf = [0u8; 8];
                let off = off % 0x30;
                match kind {
                    0 => BusDevice::read(&mut io, off, &mut buf[..len]),
                    1 => BusDevice::write(&mut io, off & 0x10, &v.to_le_bytes()),
                    2 => io.set_irq((v % 30) as usize, v & 0x100 != 0),
                    _ => io.eoi(v as u8),
                }
                for d in io.take_deliveries() {
                    let _ = d.vector;
                }
                prop_assert!(io.redir.iter().all(|r| r & RTE_LEVEL != 0 || r & RTE_REMOTE_IRR == 0));
            }
        }
    }
}

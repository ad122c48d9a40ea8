//! The hardware-reduced ACPI power registers: sleep control, sleep status and reset (ACPI 6.5
//! §4.8.3.7 "Sleep Control and Status Registers", §4.8.3.6 "Reset Register"), at the ports the
//! FADT names (`acpi.rs`).
//!
//! Linux powers off by writing `SLP_TYP(S5) << 2 | SLP_EN` to the sleep control register
//! (`acpi_hw_extended_sleep`) and reboots by writing the FADT's reset value to the reset
//! register (`acpi_reset`, the first method of `reboot=acpi`, the x86 default).

use crate::acpi::{RESET_VALUE, S5_SLP_TYP};
use crate::bus::BusDevice;

/// Ports decoded, from the sleep control register.
pub const POWER_PORTS: u64 = 3;

/// The 8042 keyboard controller's status/command port. Only its reset line is modelled (as
/// Firecracker does): Linux's `reboot=kbd`, the method after ACPI, waits for the input buffer
/// to drain (status bit 1) and writes the "pulse reset" command. Without it, that wait reads
/// an unclaimed port 0x10000 times per try (a panicking VM would take minutes to stop).
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The 8042 command that pulses the CPU reset line.
pub const I8042_RESET: u8 = 0xfe;

const SLP_EN: u8 = 1 << 5;

/// What the guest asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerEvent {
    /// Entered S5: stop the VM.
    PowerOff,
    /// Wrote the reset value: reset (or stop) the VM.
    Reset,
}

/// The power registers.
#[derive(Clone, Debug, Default)]
pub struct PowerDevice {
    event: Option<PowerEvent>,
}

impl PowerDevice {
    /// A device with no event pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the pending event.
    pub fn take_event(&mut self) -> Option<PowerEvent> {
        self.event.take()
    }
}

/// The 8042's reset line: status reads 0 (nothing to read, input buffer empty), the reset
/// command raises [`PowerEvent::Reset`], other commands are ignored.
#[derive(Clone, Debug, Default)]
pub struct I8042Reset {
    event: Option<PowerEvent>,
}

impl I8042Reset {
    /// No reset pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the pending reset.
    pub fn take_event(&mut self) -> Option<PowerEvent> {
        self.event.take()
    }
}

impl BusDevice for I8042Reset {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() == Some(&I8042_RESET) {
            self.event = Some(PowerEvent::Reset);
        }
    }
}

impl BusDevice for PowerDevice {
    /// The sleep status register reads 0 (WAK_STS clear: the VM never wakes from sleep); the
    /// control and reset registers read 0.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 if v & SLP_EN != 0 && (v >> 2) & 7 == S5_SLP_TYP => self.event = Some(PowerEvent::PowerOff),
            2 if v == RESET_VALUE => self.event = Some(PowerEvent::Reset),
            // Sleep states other than S5 are not offered (no \_S1-\_S4), status writes clear
            // nothing that is ever set.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i8042_reset_line() {
        let mut k = I8042Reset::new();
        let mut status = [0xffu8];
        k.read(0, &mut status);
        assert_eq!(status, [0], "input buffer empty");
        k.write(0, &[0xad]);
        assert_eq!(k.take_event(), None);
        k.write(0, &[I8042_RESET]);
        assert_eq!(k.take_event(), Some(PowerEvent::Reset));
        assert_eq!(k.take_event(), None);
    }
    use crate::acpi::SLEEP_CONTROL_S5;

    #[test]
    fn poweroff_and_reset() {
        let mut p = PowerDevice::new();
        p.write(1, &[0x80]); // clear WAK_STS first, as ACPICA does
        assert_eq!(p.take_event(), None);
        p.write(0, &[5 << 2]); // SLP_TYP without SLP_EN
        assert_eq!(p.take_event(), None);
        p.write(0, &[SLEEP_CONTROL_S5]);
        assert_eq!(p.take_event(), Some(PowerEvent::PowerOff));
        assert_eq!(p.take_event(), None);
        p.write(0, &[SLP_EN | (3 << 2)]); // S3: not offered
        assert_eq!(p.take_event(), None);
        p.write(2, &[2]);
        assert_eq!(p.take_event(), None);
        p.write(2, &[RESET_VALUE]);
        assert_eq!(p.take_event(), Some(PowerEvent::Reset));
        let mut d = [0xffu8; 2];
        p.read(1, &mut d);
        assert_eq!(d, [0, 0]);
        p.write(0, &[]);
        p.write(9, &[SLEEP_CONTROL_S5]);
        assert_eq!(p.take_event(), None);
    }
}

//! A 16550A UART, the PC's COM1 at port 0x3F8 on IRQ 4, as Linux's 8250 driver probes it.
//!
//! Register map (offsets from the base; PC16550D datasheet, "Register Summary"):
//!
//! | off | DLAB=0 read | DLAB=0 write | DLAB=1      |
//! |-----|-------------|--------------|-------------|
//! | 0   | RBR         | THR          | DLL         |
//! | 1   | IER         | IER          | DLM         |
//! | 2   | IIR         | FCR          | (same)      |
//! | 3   | LCR         | LCR          |             |
//! | 4   | MCR         | MCR          |             |
//! | 5   | LSR         | (ignored)    |             |
//! | 6   | MSR         | (ignored)    |             |
//! | 7   | SCR         | SCR          |             |
//!
//! Transmission is instantaneous: a byte written to THR goes to the console buffer at once, so
//! THR and the transmitter are always empty (LSR.THRE and LSR.TEMT set). What Linux's 8250
//! `autoconfig()` checks, and this model answers as a real 16550A does:
//! - IER bits 3:0 read back what was written, bits 7:4 read zero;
//! - with MCR.LOOP set and MCR = LOOP|OUT2|RTS, MSR bits 7:4 read 0x90 (DCD from OUT2, CTS from
//!   RTS; datasheet "MCR bit 4: Loop");
//! - after FCR bit 0 (FIFO enable), IIR bits 7:6 read 11b (FIFOs enabled, 16550A);
//! - the THRE interrupt: pending whenever THR is empty and IER.ETBEI is set, cleared by reading
//!   IIR when it is the reported source or by writing THR (datasheet "Interrupt Identification
//!   Register", priority 3). Enabling ETBEI with THR empty raises it at once, which is what the
//!   8250 driver's `UART_BUG_THRE` test expects of a good part.
//!
//! The interrupt output is a level ([`Uart::irq_pending`]): high while any enabled source is
//! pending and MCR.OUT2 is set (on the PC, OUT2 gates the UART's interrupt onto the ISA bus).
//! The platform turns rising edges into I/O APIC pin 4 assertions.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use crate::bus::BusDevice;

/// COM1's base port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's ISA IRQ.
pub const COM1_IRQ: u8 = 4;
/// Number of ports the UART decodes.
pub const UART_PORTS: u64 = 8;
/// Depth of the receive FIFO (16550A).
pub const RX_FIFO_DEPTH: usize = 16;
/// Bytes of console output held before the oldest are dropped, if the VMM does not drain.
pub const OUTPUT_CAPACITY: usize = 64 * 1024;

const IER_ERBFI: u8 = 0x01; // received data available
const IER_ETBEI: u8 = 0x02; // THR empty
const IER_ELSI: u8 = 0x04; // receiver line status
const IER_EDSSI: u8 = 0x08; // modem status

const IIR_NO_INT: u8 = 0x01;
const IIR_MSI: u8 = 0x00;
const IIR_THRI: u8 = 0x02;
const IIR_RDI: u8 = 0x04;
const IIR_RLSI: u8 = 0x06;
const IIR_FIFO_ENABLED: u8 = 0xc0;

const FCR_ENABLE: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;

const LCR_DLAB: u8 = 0x80;

const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;

const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;

const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;
const MSR_DELTA_MASK: u8 = 0x0f;

/// The 16550A state machine.
#[derive(Clone, Debug)]
pub struct Uart {
    ier: u8,
    lcr: u8,
    mcr: u8,
    lsr_errors: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fifo_enabled: bool,
    /// THR-empty interrupt condition (cleared by reading IIR or writing THR).
    thre_pending: bool,
    /// Modem status lines (bits 7:4 of MSR) and accumulated deltas (bits 3:0).
    msr: u8,
    rx: VecDeque<u8>,
    out: Vec<u8>,
    dropped_output: u64,
}

impl Default for Uart {
    fn default() -> Self {
        Self::new()
    }
}

impl Uart {
    /// A UART after reset: interrupts off, 8N1 at 115200 baud (divisor 1), modem lines up.
    pub fn new() -> Self {
        let mut u = Self {
            ier: 0,
            lcr: 0x03,
            mcr: MCR_OUT2,
            lsr_errors: 0,
            scr: 0,
            dll: 1,
            dlm: 0,
            fifo_enabled: false,
            thre_pending: false,
            msr: 0,
            rx: VecDeque::new(),
            out: Vec::new(),
            dropped_output: 0,
        };
        u.msr = u.modem_lines();
        u
    }

    /// The modem input lines: in loopback they are the MCR outputs (datasheet, MCR bit 4:
    /// RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD); otherwise a terminal is attached and ready.
    fn modem_lines(&self) -> u8 {
        if self.mcr & MCR_LOOP != 0 {
            let mut v = 0;
            if self.mcr & MCR_RTS != 0 {
                v |= MSR_CTS;
            }
            if self.mcr & MCR_DTR != 0 {
                v |= MSR_DSR;
            }
            if self.mcr & MCR_OUT1 != 0 {
                v |= MSR_RI;
            }
            if self.mcr & MCR_OUT2 != 0 {
                v |= MSR_DCD;
            }
            v
        } else {
            MSR_DCD | MSR_DSR | MSR_CTS
        }
    }

    /// Recomputes the line bits of MSR and accumulates the delta bits (DCTS, DDSR, TERI on a
    /// falling RI, DDCD).
    fn update_modem_lines(&mut self) {
        let old = self.msr;
        let new = self.modem_lines();
        let changed = old ^ new;
        let mut delta = old & MSR_DELTA_MASK;
        if changed & MSR_CTS != 0 {
            delta |= 0x01;
        }
        if changed & MSR_DSR != 0 {
            delta |= 0x02;
        }
        if changed & MSR_RI != 0 && new & MSR_RI == 0 {
            delta |= 0x04;
        }
        if changed & MSR_DCD != 0 {
            delta |= 0x08;
        }
        self.msr = new | delta;
    }

    fn lsr(&self) -> u8 {
        let mut v = LSR_THRE | LSR_TEMT | self.lsr_errors;
        if !self.rx.is_empty() {
            v |= LSR_DR;
        }
        v
    }

    /// The highest-priority pending interrupt source as IIR bits 3:0 (datasheet table
    /// "Interrupt Control Functions").
    fn interrupt_id(&self) -> u8 {
        if self.ier & IER_ELSI != 0 && self.lsr_errors != 0 {
            IIR_RLSI
        } else if self.ier & IER_ERBFI != 0 && !self.rx.is_empty() {
            IIR_RDI
        } else if self.ier & IER_ETBEI != 0 && self.thre_pending {
            IIR_THRI
        } else if self.ier & IER_EDSSI != 0 && self.msr & MSR_DELTA_MASK != 0 {
            IIR_MSI
        } else {
            IIR_NO_INT
        }
    }

    /// The UART's interrupt output: high while an enabled source is pending. On the PC the
    /// line reaches the interrupt controller only through MCR.OUT2; in loopback the output is
    /// disconnected (datasheet, MCR bit 4).
    pub fn irq_pending(&self) -> bool {
        self.interrupt_id() != IIR_NO_INT && self.mcr & MCR_OUT2 != 0 && self.mcr & MCR_LOOP == 0
    }

    /// Free space in the receive FIFO; the VMM keeps further typed input until there is room.
    pub fn rx_space(&self) -> usize {
        RX_FIFO_DEPTH.saturating_sub(self.rx.len())
    }

    /// Queues one received byte (typed input). Returns false, and sets the overrun error, if
    /// the FIFO was full (the byte is lost, as on the chip).
    pub fn receive(&mut self, byte: u8) -> bool {
        let depth = if self.fifo_enabled { RX_FIFO_DEPTH } else { 1 };
        if self.rx.len() >= depth {
            self.lsr_errors |= LSR_OE;
            return false;
        }
        self.rx.push_back(byte);
        true
    }

    /// Queues as many of `bytes` as fit without overrun; returns how many were taken.
    pub fn receive_all(&mut self, bytes: &[u8]) -> usize {
        let depth = if self.fifo_enabled { RX_FIFO_DEPTH } else { 1 };
        let n = depth.saturating_sub(self.rx.len()).min(bytes.len());
        self.rx.extend(bytes.iter().take(n));
        n
    }

    /// Console output not yet taken.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Takes all console output written so far.
    pub fn take_output(&mut self) -> Vec<u8> {
        core::mem::take(&mut self.out)
    }

    /// Takes the console output up to and including the last newline, leaving a partial line
    /// buffered; for a console that prints whole lines with a label.
    pub fn take_lines(&mut self) -> Vec<u8> {
        match self.out.iter().rposition(|&b| b == b'\n') {
            Some(i) => {
                let rest = self.out.split_off(i + 1);
                core::mem::replace(&mut self.out, rest)
            }
            None => Vec::new(),
        }
    }

    /// Bytes of output dropped because the buffer was full (the VMM did not drain it).
    pub fn dropped_output(&self) -> u64 {
        self.dropped_output
    }

    fn transmit(&mut self, byte: u8) {
        if self.mcr & MCR_LOOP != 0 {
            // Loopback: the transmitter output feeds the receiver (datasheet, MCR bit 4).
            let _ = self.receive(byte);
        } else if self.out.len() < OUTPUT_CAPACITY {
            self.out.push(byte);
        } else {
            self.dropped_output += 1;
        }
        // The byte left THR at once, so THR is empty again.
        self.thre_pending = true;
    }

    /// Reads the register at `offset` (0..8); other offsets read all-ones.
    pub fn read_reg(&mut self, offset: u64) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll,
            0 => self.rx.pop_front().unwrap_or(0),
            1 if dlab => self.dlm,
            1 => self.ier,
            2 => {
                let id = self.interrupt_id();
                // Reading IIR while it reports THRE clears that source (datasheet, IIR).
                if id == IIR_THRI {
                    self.thre_pending = false;
                }
                id | if self.fifo_enabled { IIR_FIFO_ENABLED } else { 0 }
            }
            3 => self.lcr,
            4 => self.mcr,
            5 => {
                let v = self.lsr();
                // Reading LSR clears the error bits (OE, PE, FE, BI).
                self.lsr_errors = 0;
                v
            }
            6 => {
                let v = self.msr;
                // Reading MSR clears the delta bits.
                self.msr &= !MSR_DELTA_MASK;
                v
            }
            7 => self.scr,
            _ => 0xff,
        }
    }

    /// Writes the register at `offset` (0..8); other offsets are ignored.
    pub fn write_reg(&mut self, offset: u64, value: u8) {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll = value,
            0 => self.transmit(value),
            1 if dlab => self.dlm = value,
            1 => {
                let old = self.ier;
                self.ier = value & 0x0f;
                // Enabling ETBEI while THR is empty raises the THRE interrupt.
                if old & IER_ETBEI == 0 && self.ier & IER_ETBEI != 0 {
                    self.thre_pending = true;
                }
            }
            2 => {
                let enable = value & FCR_ENABLE != 0;
                if enable != self.fifo_enabled || value & FCR_CLEAR_RX != 0 {
                    // Changing the FIFO mode or resetting the RX FIFO empties it.
                    self.rx.clear();
                }
                self.fifo_enabled = enable;
            }
            3 => self.lcr = value,
            4 => {
                self.mcr = value & 0x1f;
                self.update_modem_lines();
            }
            7 => self.scr = value,
            _ => {}
        }
    }
}

impl BusDevice for Uart {
    /// Byte registers: a wider access reads the register at `offset` into the low byte and
    /// all-ones above, as the 8250 driver never does that.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let Some(first) = data.first_mut() {
            *first = self.read_reg(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&first) = data.first() {
            self.write_reg(offset, first);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RBR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const MSR: u64 = 6;
    const SCR: u64 = 7;

    /// The checks of Linux's `drivers/tty/serial/8250/8250_port.c:autoconfig()`, in order.
    #[test]
    fn linux_autoconfig_finds_a_16550a() {
        let mut u = Uart::new();
        // IER test: write 0, read 0; write 0x0f, read 0x0f.
        u.write_reg(IER, 0);
        assert_eq!(u.read_reg(IER) & 0x0f, 0);
        u.write_reg(IER, 0x0f);
        assert_eq!(u.read_reg(IER) & 0x0f, 0x0f);
        u.write_reg(IER, 0);
        // Scratch register.
        u.write_reg(SCR, 0xa5);
        assert_eq!(u.read_reg(SCR), 0xa5);
        // Loopback test: MCR = LOOP | OUT2 | RTS -> MSR & 0xf0 == 0x90.
        let save_mcr = u.read_reg(MCR);
        u.write_reg(MCR, MCR_LOOP | 0x0a);
        assert_eq!(u.read_reg(MSR) & 0xf0, 0x90);
        u.write_reg(MCR, save_mcr);
        // FIFO: enable, then IIR >> 6 == 3 means 16550A.
        u.write_reg(2, FCR_ENABLE);
        assert_eq!(u.read_reg(IIR) >> 6, 3);
        // EFR probe with LCR = 0xbf must not read 0 at offset 2 (else it is a ST16C650).
        u.write_reg(LCR, 0xbf);
        assert_ne!(u.read_reg(2), 0);
        u.write_reg(LCR, 0x03);
        // Divisor latch round-trips with DLAB.
        u.write_reg(LCR, 0x83);
        u.write_reg(0, 0x0c);
        u.write_reg(1, 0x00);
        assert_eq!((u.read_reg(0), u.read_reg(1)), (0x0c, 0));
        u.write_reg(LCR, 0x03);
        assert_eq!(u.read_reg(IER), 0, "DLM write did not leak into IER");
        assert!(u.take_output().is_empty(), "DLL write did not transmit");
    }

    #[test]
    fn thre_interrupt_and_bug_thre_test() {
        let mut u = Uart::new();
        assert!(!u.irq_pending());
        assert_eq!(u.read_reg(IIR) & 0x0f, IIR_NO_INT);
        // serial8250_do_startup's THRE test: IER=THRI, read IIR; IER=0; IER=THRI, read IIR.
        u.write_reg(IER, IER_ETBEI);
        assert!(u.irq_pending());
        assert_eq!(u.read_reg(IIR) & 0x0f, IIR_THRI);
        assert!(!u.irq_pending(), "reading IIR cleared THRE");
        u.write_reg(IER, 0);
        u.write_reg(IER, IER_ETBEI);
        assert_eq!(u.read_reg(IIR) & 0x0f, IIR_THRI);
        // Transmit: byte goes out, THRE fires again.
        u.write_reg(RBR, b'h');
        assert!(u.irq_pending());
        u.write_reg(RBR, b'i');
        assert_eq!(u.read_reg(LSR) & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
        assert_eq!(u.take_output(), b"hi");
        // OUT2 gates the line.
        u.write_reg(MCR, 0);
        assert!(!u.irq_pending());
        u.write_reg(MCR, MCR_OUT2);
        assert!(u.irq_pending());
        u.write_reg(IER, 0);
        assert!(!u.irq_pending());
    }

    #[test]
    fn receive_path_and_priorities() {
        let mut u = Uart::new();
        u.write_reg(2, FCR_ENABLE);
        u.write_reg(IER, IER_ERBFI | IER_ETBEI | IER_ELSI);
        assert_eq!(u.receive_all(b"ls\n"), 3);
        // RDA outranks THRE.
        assert_eq!(u.read_reg(IIR) & 0x0f, IIR_RDI);
        assert_eq!(u.read_reg(LSR) & LSR_DR, LSR_DR);
        assert_eq!([u.read_reg(RBR), u.read_reg(RBR), u.read_reg(RBR)], *b"ls\n");
        assert_eq!(u.read_reg(LSR) & LSR_DR, 0);
        assert_eq!(u.read_reg(RBR), 0, "empty FIFO reads zero");
        assert_eq!(u.read_reg(IIR) & 0x0f, IIR_THRI);
        // Overrun: line status outranks everything and clears on LSR read.
        assert_eq!(u.receive_all(&[b'x'; 40]), RX_FIFO_DEPTH);
        assert_eq!(u.rx_space(), 0);
        assert!(!u.receive(b'y'));
        assert_eq!(u.read_reg(IIR) & 0x0f, IIR_RLSI);
        assert_eq!(u.read_reg(LSR) & LSR_OE, LSR_OE);
        assert_eq!(u.read_reg(LSR) & LSR_OE, 0);
        assert_eq!(u.read_reg(IIR) & 0x0f, IIR_RDI);
        // FCR RX reset empties the FIFO.
        u.write_reg(2, FCR_ENABLE | FCR_CLEAR_RX);
        assert_eq!(u.rx_space(), RX_FIFO_DEPTH);
        // Without FIFO the holding register takes one byte.
        u.write_reg(2, 0);
        assert_eq!(u.receive_all(b"ab"), 1);
    }

    #[test]
    fn loopback_data_and_modem_status_interrupt() {
        let mut u = Uart::new();
        u.write_reg(2, FCR_ENABLE);
        u.write_reg(IER, IER_EDSSI | IER_ERBFI);
        u.write_reg(MCR, MCR_LOOP);
        // Entering loopback dropped DCD/DSR/CTS: deltas recorded.
        let msr = u.read_reg(MSR);
        assert_eq!(msr & 0xf0, 0);
        assert_eq!(msr & 0x0b, 0x0b);
        assert_eq!(u.read_reg(MSR) & 0x0f, 0, "read cleared the deltas");
        u.write_reg(RBR, 0x55);
        assert!(u.take_output().is_empty(), "loopback does not reach the console");
        assert_eq!(u.read_reg(RBR), 0x55);
        assert!(!u.irq_pending(), "loopback disconnects the interrupt output");
        u.write_reg(MCR, MCR_OUT2 | MCR_DTR | MCR_RTS);
        assert!(u.irq_pending());
        assert_eq!(u.read_reg(IIR) & 0x0f, IIR_MSI);
        u.read_reg(MSR);
        assert!(!u.irq_pending());
    }

    #[test]
    fn lines_and_capacity() {
        let mut u = Uart::new();
        for &b in b"first\nsecond\npart" {
            u.write_reg(0, b);
        }
        assert_eq!(u.take_lines(), b"first\nsecond\n");
        assert_eq!(u.output(), b"part");
        assert!(u.take_lines().is_empty());
        for _ in 0..OUTPUT_CAPACITY + 10 {
            u.write_reg(0, b'z');
        }
        assert_eq!(u.output().len(), OUTPUT_CAPACITY);
        assert_eq!(u.dropped_output(), 14);
    }

    #[test]
    fn bus_interface() {
        let mut u = Uart::new();
        BusDevice::write(&mut u, 7, &[0x42, 0x99]);
        let mut d = [0u8; 2];
        BusDevice::read(&mut u, 7, &mut d);
        assert_eq!(d, [0x42, 0xff]);
        BusDevice::write(&mut u, 7, &[]);
        BusDevice::read(&mut u, 7, &mut []);
        assert_eq!(u.read_reg(8), 0xff);
        u.write_reg(100, 1);
    }

    proptest! {
        /// Any sequence of accesses keeps the invariants: THRE/TEMT always set, IIR's top bits
        /// match the FIFO state, the FIFO never exceeds its depth.
        #[test]
        fn prop_hostile_accesses(ops in proptest::collection::vec((0u64..10, any::<u8>(), 0u8..3), 0..300)) {
            let mut u = Uart::new();
            for (off, val, kind) in ops {
                match kind {
                    0 => { u.read_reg(off); }
                    1 => u.write_reg(off, val),
                    _ => { u.receive(val); }
                }
                prop_assert!(u.rx.len() <= RX_FIFO_DEPTH);
                prop_assert_eq!(u.lsr() & 0x60, 0x60);
                let _ = u.irq_pending();
            }
        }
    }
}

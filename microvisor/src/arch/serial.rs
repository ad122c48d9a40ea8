//! COM1 (16550 UART at 0x3f8): the microvisor's console, which it shares out to domains
//! through the console hypercall.

use core::fmt;
use x86_64::instructions::port::Port;

const COM1: u16 = 0x3f8;

pub struct Serial;

impl Serial {
    pub fn init() {
        let out = |offset: u16, value: u8| {
            // SAFETY: COM1's registers are owned by the microvisor alone (no domain is
            // given port I/O), and these writes only configure the UART.
            unsafe { Port::<u8>::new(COM1 + offset).write(value) }
        };
        out(1, 0x00); // no UART interrupts
        out(3, 0x80); // DLAB on
        out(0, 0x01); // divisor 1: 115200 baud
        out(1, 0x00);
        out(3, 0x03); // 8N1, DLAB off
        out(2, 0xc7); // FIFOs on and cleared
        out(4, 0x03); // DTR, RTS
    }

    fn write_byte(b: u8) {
        // SAFETY: reading the line status and writing the data register of the
        // microvisor-owned UART has no effect beyond sending this byte.
        unsafe {
            let mut status = Port::<u8>::new(COM1 + 5);
            while status.read() & 0x20 == 0 {
                core::hint::spin_loop();
            }
            Port::<u8>::new(COM1).write(b);
        }
    }

    /// Wait (boundedly: there may be no UART) until the transmitter has sent every byte
    /// (line status bit 6, TEMT): an emulator that is stopped right after would drop what
    /// is still in its FIFO (Bochs does).
    pub fn drain() {
        for _ in 0..1_000_000 {
            // SAFETY: reading the line status register of the microvisor-owned UART.
            if unsafe { Port::<u8>::new(COM1 + 5).read() } & 0x40 != 0 {
                return;
            }
            core::hint::spin_loop();
        }
    }

    /// A byte typed on the console, if one is waiting (LSR bit 0, data ready).
    pub fn read_byte() -> Option<u8> {
        // SAFETY: reading the line status and receive registers of the microvisor-owned
        // UART only takes a received byte out of its FIFO.
        unsafe { (Port::<u8>::new(COM1 + 5).read() & 1 != 0).then(|| Port::<u8>::new(COM1).read()) }
    }

    pub fn write_bytes(bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                Self::write_byte(b'\r');
            }
            Self::write_byte(b);
        }
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        Self::write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Serialises whole lines from the microvisor and from domains.
pub static CONSOLE_LOCK: spin::Mutex<()> = spin::Mutex::new(());

/// `println!` for the microvisor: every line is prefixed `[microvisor]`.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _guard = $crate::arch::serial::CONSOLE_LOCK.lock();
        let _ = write!($crate::arch::serial::Serial, "[microvisor] ");
        let _ = writeln!($crate::arch::serial::Serial, $($arg)*);
    }};
}

//! Console output through the console hypercall. Output is buffered up to a line (or the
//! buffer size) so that each hypercall carries a useful amount.

use core::fmt;

const BUF: usize = 512;

static PENDING: spin::Mutex<Writer> = spin::Mutex::new(Writer::new());

/// A buffered writer; flushes when full, on newline, and when dropped.
pub struct Writer {
    buf: [u8; BUF],
    len: usize,
}

impl Writer {
    pub const fn new() -> Self {
        Self { buf: [0; BUF], len: 0 }
    }

    pub fn flush(&mut self) {
        if self.len > 0 {
            let _ = crate::hypercall::console_write(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl Default for Writer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Write for Writer {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == BUF {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
            if b == b'\n' {
                self.flush();
            }
        }
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.flush();
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    use fmt::Write as _;
    let mut w = PENDING.lock();
    let _ = w.write_fmt(args);
}

/// Send whatever is buffered.
pub fn flush() {
    if let Some(mut w) = PENDING.try_lock() {
        w.flush();
    }
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}

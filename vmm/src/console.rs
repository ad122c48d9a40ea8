//! The VM's console output on its way to the microvisor's console: whole lines at once, and a
//! partial line (a shell prompt) after it has been left alone for a while, so that a prompt
//! shows without waiting for a newline that only comes after the next command.

use alloc::vec::Vec;

/// Longest partial line kept before it is sent anyway.
pub const PARTIAL_MAX: usize = 256;

/// What waits to be written.
#[derive(Clone, Debug, Default)]
pub struct ConsoleOut {
    partial: Vec<u8>,
    /// When the oldest byte of `partial` arrived (the caller's clock).
    since: Option<u64>,
}

impl ConsoleOut {
    /// Nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes `bytes` at time `now`; returns the complete lines to write (each with its newline).
    pub fn push(&mut self, bytes: &[u8], now: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in bytes {
            self.partial.push(b);
            if b == b'\n' || self.partial.len() >= PARTIAL_MAX {
                if b != b'\n' {
                    self.partial.push(b'\n');
                }
                out.append(&mut self.partial);
                self.since = None;
            }
        }
        if !self.partial.is_empty() && self.since.is_none() {
            self.since = Some(now);
        }
        out
    }

    /// When the partial line is due (`delay` after its first byte), if there is one.
    pub fn due(&self, delay: u64) -> Option<u64> {
        self.since.map(|t| t.saturating_add(delay))
    }

    /// The partial line as a line of its own if it is due at `now`.
    pub fn flush_due(&mut self, now: u64, delay: u64) -> Option<Vec<u8>> {
        if self.due(delay)? > now {
            return None;
        }
        self.since = None;
        let mut line = core::mem::take(&mut self.partial);
        line.push(b'\n');
        Some(line)
    }

    /// Whatever is pending, as a line (the VM is going).
    pub fn flush(&mut self) -> Option<Vec<u8>> {
        self.flush_due(u64::MAX, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_now_prompts_later() {
        let mut c = ConsoleOut::new();
        assert_eq!(c.push(b"Linux version\r\n/ # ", 10), b"Linux version\r\n");
        assert_eq!(c.due(5), Some(15));
        assert_eq!(c.flush_due(14, 5), None);
        assert_eq!(c.flush_due(15, 5), Some(b"/ # \n".to_vec()));
        assert_eq!(c.due(5), None);
        assert_eq!(c.flush(), None);
    }

    #[test]
    fn long_partial_goes_out() {
        let mut c = ConsoleOut::new();
        let out = c.push(&[b'x'; PARTIAL_MAX + 10], 0);
        assert_eq!(out.len(), PARTIAL_MAX + 1);
        assert_eq!(c.flush().map(|l| l.len()), Some(11));
    }
}

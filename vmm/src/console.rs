//! The VM's console output on its way to the microvisor's console: whole lines at once, and a
//! partial line (a shell prompt) after it has been left alone for a while, so that a prompt
//! shows without waiting for a newline that only comes after the next command. Terminal
//! control sequences (ESC `[` ... final byte, and two-byte ESC sequences) are dropped: the
//! microvisor would print their bytes as `?`, and the shell's cursor-position query
//! (`ESC [6n`, busybox's line editing) would follow every prompt.

use alloc::vec::Vec;

/// Longest partial line kept before it is sent anyway.
pub const PARTIAL_MAX: usize = 256;

/// Where the filter is in a control sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Escape {
    #[default]
    None,
    /// After ESC.
    Started,
    /// After ESC `[`: parameters and intermediates until a final byte (0x40..=0x7e).
    Csi,
}

/// What waits to be written.
#[derive(Clone, Debug, Default)]
pub struct ConsoleOut {
    escape: Escape,
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
            self.escape = match (self.escape, b) {
                (Escape::None, 0x1b) => Escape::Started,
                (Escape::None, _) => Escape::None,
                (Escape::Started, b'[') => Escape::Csi,
                (Escape::Csi, 0x20..=0x3f) => Escape::Csi,
                (Escape::Started | Escape::Csi, _) => {
                    self.escape = Escape::None;
                    continue;
                }
            };
            if self.escape != Escape::None {
                continue;
            }
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
    fn control_sequences_are_dropped() {
        let mut c = ConsoleOut::new();
        assert_eq!(c.push(b"/ # \x1b[6n", 0), b"");
        assert_eq!(c.flush(), Some(b"/ # \n".to_vec()));
        assert_eq!(c.push(b"\x1b[1;32mgreen\x1b[0m \x1bcx\n", 0), b"green x\n");
        // Split across pushes.
        assert!(c.push(b"a\x1b[", 0).is_empty());
        assert_eq!(c.push(b"12Kb\n", 0), b"ab\n");
    }

    #[test]
    fn long_partial_goes_out() {
        let mut c = ConsoleOut::new();
        let out = c.push(&[b'x'; PARTIAL_MAX + 10], 0);
        assert_eq!(out.len(), PARTIAL_MAX + 1);
        assert_eq!(c.flush().map(|l| l.len()), Some(11));
    }
}

//! The VM's console output on its way to the microvisor's console: whole lines at once, and a
//! partial line (a shell prompt) after it has been left alone for a while, so that a prompt
//! shows without waiting for a newline that only comes after the next command.
//!
//! "Left alone" is measured from the line's last byte, not its first, and confirmed by a
//! second look: a VM that writes its UART a byte per exit on a loaded host can take longer
//! than the delay over one long line, and the VMM's timer can fire right after the whole
//! machine was descheduled, before the VM had a chance to write the next byte. Either way
//! the line came out in two pieces (`virtio_rogue`: about one run in six had a split
//! line, one in a hundred failed on it). So a line found due goes out only if no byte came
//! during a short grace after that first look; a prompt still goes out, a little later. Terminal
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
    /// When the last byte of `partial` arrived (the caller's clock); `None` when it is empty.
    last: Option<u64>,
    /// When `partial` was first found due (it goes out a grace later if no byte came).
    looked: Option<u64>,
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
            }
        }
        // Any byte, even one of a control sequence, shows the VM is still writing.
        if !bytes.is_empty() {
            self.last = (!self.partial.is_empty()).then_some(now);
            self.looked = None;
        }
        out
    }

    /// When the partial line is next looked at, if there is one: `delay` after its last byte,
    /// or `grace` after it was first found due.
    pub fn due(&self, delay: u64, grace: u64) -> Option<u64> {
        let last = self.last?;
        Some(match self.looked {
            None => last.saturating_add(delay),
            Some(t) => t.saturating_add(grace),
        })
    }

    /// The partial line as a line of its own if it is due at `now` and was found due once
    /// before, at least `grace` ago, with no byte since.
    pub fn flush_due(&mut self, now: u64, delay: u64, grace: u64) -> Option<Vec<u8>> {
        if self.due(delay, grace)? > now {
            return None;
        }
        if self.looked.is_none() {
            self.looked = Some(now);
            return None;
        }
        self.flush()
    }

    /// Whatever is pending, as a line (the VM is going).
    pub fn flush(&mut self) -> Option<Vec<u8>> {
        self.last = None;
        self.looked = None;
        if self.partial.is_empty() {
            return None;
        }
        let mut line = core::mem::take(&mut self.partial);
        line.push(b'\n');
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_now_prompts_later() {
        let mut c = ConsoleOut::new();
        assert_eq!(c.push(b"Linux version\r\n/ # ", 10), b"Linux version\r\n");
        assert_eq!(c.due(5, 2), Some(15));
        assert_eq!(c.flush_due(14, 5, 2), None);
        // Found due: one more look, a grace later.
        assert_eq!(c.flush_due(15, 5, 2), None);
        assert_eq!(c.due(5, 2), Some(17));
        assert_eq!(c.flush_due(16, 5, 2), None);
        assert_eq!(c.flush_due(17, 5, 2), Some(b"/ # \n".to_vec()));
        assert_eq!(c.due(5, 2), None);
        assert_eq!(c.flush(), None);
    }

    /// A line written a byte at a time, each byte soon after the last but the whole line
    /// slower than the delay, stays one line.
    #[test]
    fn a_slow_line_is_not_split() {
        let mut c = ConsoleOut::new();
        for (i, b) in b"attack virtio-net/writable transmit buffer: contained".iter().enumerate() {
            let now = 100 + 3 * i as u64;
            assert_eq!(c.flush_due(now, 5, 2), None);
            assert!(c.push(&[*b], now).is_empty());
        }
        assert_eq!(c.push(b"\n", 400), b"attack virtio-net/writable transmit buffer: contained\n");
        assert_eq!(c.due(5, 2), None);
    }

    /// The VMM's timer fires after the whole machine stood still mid-line: the first look
    /// waits for the VM, which continues the line within the grace.
    #[test]
    fn a_stall_of_the_machine_does_not_split_a_line() {
        let mut c = ConsoleOut::new();
        assert!(c.push(b"virtio-rogue:", 10).is_empty());
        assert_eq!(c.flush_due(1000, 5, 2), None);
        assert!(c.push(b" virtio-blk after the attacks", 1001).is_empty());
        assert_eq!(c.flush_due(1003, 5, 2), None);
        assert_eq!(c.push(b": serves\n", 1004), b"virtio-rogue: virtio-blk after the attacks: serves\n");
        // An escape sequence alone also counts as writing.
        assert!(c.push(b"/ # ", 2000).is_empty());
        assert_eq!(c.flush_due(2005, 5, 2), None);
        assert!(c.push(b"\x1b[6n", 2006).is_empty());
        assert_eq!(c.flush_due(2008, 5, 2), None);
        assert_eq!(c.due(5, 2), Some(2011));
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

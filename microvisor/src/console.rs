//! Console line assembly for domains. Each domain's console output is collected into lines
//! so the microvisor can prefix every line with the domain's name, and sanitised so a domain
//! cannot send terminal control sequences to the operator's terminal.

/// Longest line kept before it is emitted in pieces.
pub const LINE_MAX: usize = 200;

/// Bytes of one domain's console output that do not yet form a complete line.
pub struct LineBuffer {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl LineBuffer {
    pub const fn new() -> Self {
        Self { buf: [0; LINE_MAX], len: 0 }
    }

    /// Append `bytes`; `emit` receives every completed line (without its newline). A line
    /// longer than [`LINE_MAX`] is emitted in pieces. Carriage returns are dropped; tabs stay;
    /// other control bytes and non-ASCII bytes become `?`.
    pub fn push(&mut self, bytes: &[u8], mut emit: impl FnMut(&[u8])) {
        for &b in bytes {
            match b {
                b'\n' => {
                    emit(&self.buf[..self.len]);
                    self.len = 0;
                }
                b'\r' => {}
                _ => {
                    if self.len == LINE_MAX {
                        emit(&self.buf[..self.len]);
                        self.len = 0;
                    }
                    self.buf[self.len] = if b == b'\t' || (0x20..0x7f).contains(&b) { b } else { b'?' };
                    self.len += 1;
                }
            }
        }
    }

    /// Emit what is left as a line of its own (e.g. when the domain stops).
    pub fn flush(&mut self, mut emit: impl FnMut(&[u8])) {
        if self.len > 0 {
            emit(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl Default for LineBuffer {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lines(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut lb = LineBuffer::new();
        for c in chunks {
            lb.push(c, |l| out.push(l.to_vec()));
        }
        lb.flush(|l| out.push(l.to_vec()));
        out
    }

    #[test]
    fn splits_and_joins_lines() {
        assert_eq!(lines(&[b"hel", b"lo\nwor", b"ld\n"]), vec![b"hello".to_vec(), b"world".to_vec()]);
        assert_eq!(lines(&[b"no newline"]), vec![b"no newline".to_vec()]);
        assert_eq!(lines(&[b"\n"]), vec![Vec::<u8>::new()]);
    }

    #[test]
    fn sanitises_control_bytes() {
        assert_eq!(lines(&[b"a\x1b[2Jb\r\tc\xff\n"]), vec![b"a?[2Jb\tc?".to_vec()]);
    }

    #[test]
    fn long_lines_come_in_pieces() {
        let long = vec![b'x'; LINE_MAX * 2 + 5];
        let out = lines(&[&long]);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].len(), LINE_MAX);
        assert_eq!(out[2].len(), 5);
    }

    proptest! {
        #[test]
        fn no_byte_is_lost_or_invented(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8)) {
            let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
            let out = lines(&refs);
            let kept: usize = chunks.iter().flatten().filter(|&&b| b != b'\n' && b != b'\r').count();
            prop_assert_eq!(out.iter().map(|l| l.len()).sum::<usize>(), kept);
            for l in &out {
                prop_assert!(l.len() <= LINE_MAX);
                prop_assert!(l.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)));
            }
        }
    }
}

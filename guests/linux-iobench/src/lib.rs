//! The portable part of `linux-iobench` (host-tested): which workloads run in which order,
//! where each request goes, and the console lines the program prints.
//!
//! The program (`main.rs`, a static Linux executable without libc) runs inside the Linux
//! guest of `cargo xtask bench linux-io`, natively in QEMU and under the microvisor alike.
//! Each workload is one request at a time (queue depth 1, like `dd iflag=direct`), for a
//! fixed time; around each it prints a mark line, at which the microvisor's VMM prints its
//! exit counters, so the host can tell the exits of each workload apart.
#![cfg_attr(not(test), no_std)]

/// One workload: direction, pattern and request size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    pub name: &'static str,
    pub write: bool,
    pub random: bool,
    pub block: usize,
}

/// The largest request, and so the size of the program's one buffer.
pub const MAX_BLOCK: usize = 64 << 10;

/// The workloads, in the order they run. Writes come before reads of the same kind so the
/// reads find written blocks (a hole in the host's image file would read faster).
pub const WORKLOADS: [Workload; 8] = [
    Workload { name: "seq-write-64k", write: true, random: false, block: 64 << 10 },
    Workload { name: "seq-read-64k", write: false, random: false, block: 64 << 10 },
    Workload { name: "rand-write-64k", write: true, random: true, block: 64 << 10 },
    Workload { name: "rand-read-64k", write: false, random: true, block: 64 << 10 },
    Workload { name: "seq-write-4k", write: true, random: false, block: 4 << 10 },
    Workload { name: "seq-read-4k", write: false, random: false, block: 4 << 10 },
    Workload { name: "rand-write-4k", write: true, random: true, block: 4 << 10 },
    Workload { name: "rand-read-4k", write: false, random: true, block: 4 << 10 },
];

/// The part of the disk the workloads use: at most this much, from sector 0.
pub const MAX_REGION: u64 = 64 << 20;

/// Where the requests of one workload go: sequential ones wrap around the region, random
/// ones are block-aligned, drawn by xorshift64 from a fixed seed (the same on both sides).
#[derive(Clone, Debug)]
pub struct Offsets {
    block: u64,
    blocks: u64,
    random: bool,
    next: u64,
    state: u64,
}

impl Offsets {
    /// `None` if the region cannot hold one block.
    pub fn new(w: &Workload, region: u64) -> Option<Self> {
        let block = w.block as u64;
        let blocks = region.min(MAX_REGION) / block.max(1);
        (blocks > 0 && block > 0).then_some(Self {
            block,
            blocks,
            random: w.random,
            next: 0,
            state: 0x9e37_79b9_7f4a_7c15,
        })
    }
}

impl Iterator for Offsets {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        let index = if self.random {
            // xorshift64 (Marsaglia, "Xorshift RNGs", 2003: shifts 13, 7, 17).
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            self.state % self.blocks
        } else {
            let i = self.next;
            self.next = (i + 1) % self.blocks;
            i
        };
        Some(index * self.block)
    }
}

/// Parses a decimal number (the run time per workload in milliseconds, `argv[1]`).
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    s.iter().try_fold(0u64, |n, &c| c.is_ascii_digit().then(|| n * 10 + u64::from(c - b'0')))
}

/// A line being built in a fixed buffer (no allocator in the program).
pub struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self::new()
    }
}

impl Line {
    pub fn new() -> Self {
        Self { buf: [0; 160], len: 0 }
    }

    /// Appends `s` (cut at the buffer's end).
    pub fn str(&mut self, s: &str) -> &mut Self {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        self
    }

    /// Appends `n` in decimal.
    pub fn num(&mut self, mut n: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for &d in &digits[i..] {
            if self.len < self.buf.len() {
                self.buf[self.len] = d;
                self.len += 1;
            }
        }
        self
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The prefix of every line the program prints.
pub const PREFIX: &str = "linux-io: ";

/// `linux-io: mark start <name>` / `linux-io: mark end <name>`: the VMM prints its exit
/// counters right after a line with `linux-io: mark`.
pub fn mark_line(start: bool, name: &str) -> Line {
    let mut l = Line::new();
    l.str(PREFIX).str("mark ").str(if start { "start " } else { "end " }).str(name).str("\n");
    l
}

/// `linux-io: result workload=<name> ops=<n> bytes=<n> ns=<n>`.
pub fn result_line(name: &str, ops: u64, bytes: u64, ns: u64) -> Line {
    let mut l = Line::new();
    l.str(PREFIX).str("result workload=").str(name).str(" ops=").num(ops).str(" bytes=").num(bytes);
    l.str(" ns=").num(ns).str("\n");
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_offsets_wrap_around_the_region() {
        let w = WORKLOADS[1];
        let v: Vec<u64> = Offsets::new(&w, 3 * 65536).unwrap().take(5).collect();
        assert_eq!(v, [0, 65536, 131072, 0, 65536]);
        assert!(Offsets::new(&w, 4096).is_none());
    }

    #[test]
    fn random_offsets_are_aligned_inside_the_region_and_repeatable() {
        let w = WORKLOADS[7];
        let a: Vec<u64> = Offsets::new(&w, 1 << 30).unwrap().take(1000).collect();
        assert!(a.iter().all(|&o| o % 4096 == 0 && o < MAX_REGION));
        let distinct: std::collections::BTreeSet<u64> = a.iter().copied().collect();
        // About 30 repeats are expected among 1,000 draws from 16,384 blocks (birthday bound).
        assert!(distinct.len() > 950, "{}", distinct.len());
        assert_eq!(a, Offsets::new(&w, 1 << 30).unwrap().take(1000).collect::<Vec<_>>());
    }

    #[test]
    fn numbers_and_lines() {
        assert_eq!(parse_u64(b"1500"), Some(1500));
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"12a"), None);
        assert_eq!(
            result_line("seq-read-4k", 7, 28672, 1_000_000_007).bytes(),
            b"linux-io: result workload=seq-read-4k ops=7 bytes=28672 ns=1000000007\n"
        );
        assert_eq!(mark_line(true, "x").bytes(), b"linux-io: mark start x\n");
        assert_eq!(Line::new().num(0).bytes(), b"0");
    }
}

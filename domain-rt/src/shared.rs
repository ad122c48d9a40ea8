//! A shared-memory region as a domain sees it: mapped by dom0 at a guest-physical address
//! the domain learns from its command line (`chan.<name>.region=<gpa>:<bytes>`), reached
//! through the identity map. The peer may change any byte at any time, so every access is
//! volatile and bounds-checked, and nothing read from it is trusted before validation.

use ipc_spec::ring::SharedMem;

#[derive(Clone, Copy)]
pub struct Region {
    base: usize,
    len: usize,
}

impl Region {
    /// The region at `base` (`len` bytes).
    ///
    /// # Safety
    /// `[base, base+len)` must be memory mapped into this domain for its whole life (a region
    /// dom0 mapped for a channel), not overlapping anything Rust code owns.
    pub const unsafe fn new(base: usize, len: usize) -> Self {
        Self { base, len }
    }

    /// Parse `<gpa>:<bytes>` (gpa in hex with 0x or decimal).
    pub fn parse(spec: &str) -> Option<(usize, usize)> {
        let (a, l) = spec.split_once(':')?;
        let addr = match a.strip_prefix("0x") {
            Some(h) => usize::from_str_radix(h, 16).ok()?,
            None => a.parse().ok()?,
        };
        Some((addr, l.parse().ok()?))
    }

    pub fn base(&self) -> usize {
        self.base
    }

    pub fn len_kib(&self) -> usize {
        self.len / 1024
    }

    fn in_bounds(&self, offset: usize, n: usize) -> bool {
        offset.checked_add(n).is_some_and(|end| end <= self.len)
    }
}

impl SharedMem for Region {
    fn read_u32(&self, offset: usize) -> u32 {
        if !self.in_bounds(offset, 4) || !offset.is_multiple_of(4) {
            return 0;
        }
        // SAFETY: in bounds and aligned (checked); the region is mapped (see `new`).
        unsafe { core::ptr::read_volatile((self.base + offset) as *const u32) }
    }

    fn write_u32(&self, offset: usize, v: u32) {
        if self.in_bounds(offset, 4) && offset.is_multiple_of(4) {
            // SAFETY: as in read_u32.
            unsafe { core::ptr::write_volatile((self.base + offset) as *mut u32, v) }
        }
    }

    fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        if !self.in_bounds(offset, out.len()) {
            out.fill(0);
            return;
        }
        // Whole aligned words first (ring slots are 8-byte aligned multiples of 8 bytes):
        // a copy per byte costs eight times the accesses, each dear under emulation. The
        // peer may change the bytes meanwhile either way; the copy is validated after.
        let words = if (self.base + offset).is_multiple_of(8) { out.len() / 8 } else { 0 };
        for (i, chunk) in out.chunks_exact_mut(8).take(words).enumerate() {
            // SAFETY: in bounds (checked above) and 8-byte aligned (checked here).
            let w = unsafe { core::ptr::read_volatile((self.base + offset + i * 8) as *const u64) };
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        for (i, b) in out.iter_mut().enumerate().skip(words * 8) {
            // SAFETY: in bounds (checked above); byte accesses need no alignment.
            *b = unsafe { core::ptr::read_volatile((self.base + offset + i) as *const u8) };
        }
    }

    fn write_bytes(&self, offset: usize, data: &[u8]) {
        if !self.in_bounds(offset, data.len()) {
            return;
        }
        let words = if (self.base + offset).is_multiple_of(8) { data.len() / 8 } else { 0 };
        for (i, chunk) in data.chunks_exact(8).take(words).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            // SAFETY: as in read_bytes, for words and for bytes.
            unsafe { core::ptr::write_volatile((self.base + offset + i * 8) as *mut u64, u64::from_le_bytes(w)) };
        }
        for (i, &b) in data.iter().enumerate().skip(words * 8) {
            // SAFETY: as in read_bytes.
            unsafe { core::ptr::write_volatile((self.base + offset + i) as *mut u8, b) };
        }
    }

    fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::Region;
    use ipc_spec::ring::SharedMem;

    #[test]
    fn word_and_byte_copies_agree_at_every_alignment() {
        // 8-byte aligned backing memory, so offsets pick the alignment.
        let mut backing = [0u64; 32];
        // SAFETY: `backing` outlives `r` and is used only through it below.
        let r = unsafe { Region::new(backing.as_mut_ptr() as usize, 256) };
        let data: std::vec::Vec<u8> = (1..=45).collect();
        for off in [0, 1, 8, 13, 40, 256 - 45] {
            r.write_bytes(0, &[0u8; 256]);
            r.write_bytes(off, &data);
            let mut all = [0u8; 256];
            r.read_bytes(0, &mut all);
            assert_eq!(&all[off..off + 45], &data[..], "offset {off}");
            assert!(all[..off].iter().chain(&all[off + 45..]).all(|&b| b == 0), "offset {off}: bytes outside");
            let mut out = [0u8; 45];
            r.read_bytes(off, &mut out);
            assert_eq!(&out[..], &data[..], "offset {off}");
        }
        // Past the end: nothing written, zeros read.
        r.write_bytes(250, &data);
        let mut out = [7u8; 45];
        r.read_bytes(250, &mut out);
        assert_eq!(out, [0u8; 45]);
    }
}

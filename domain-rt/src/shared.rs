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

    fn read_u64(&self, offset: usize) -> u64 {
        if !self.in_bounds(offset, 8) || !offset.is_multiple_of(8) {
            return 0;
        }
        // SAFETY: in bounds and aligned (checked); the region is mapped (see `new`).
        u64::from_le(unsafe { core::ptr::read_volatile((self.base + offset) as *const u64) })
    }

    fn write_u64(&self, offset: usize, v: u64) {
        if self.in_bounds(offset, 8) && offset.is_multiple_of(8) {
            // SAFETY: as in read_u64.
            unsafe { core::ptr::write_volatile((self.base + offset) as *mut u64, v.to_le()) }
        }
    }

    fn read_u64s(&self, offset: usize, out: &mut [u64]) {
        // One range check for the whole run (a ring slot): under TCG each check costs as much
        // as the access it guards (`cargo xtask bench blk --icount`).
        let in_bounds = out.len().checked_mul(8).is_some_and(|n| self.in_bounds(offset, n));
        if !in_bounds || !offset.is_multiple_of(8) {
            out.fill(0);
            return;
        }
        let at = (self.base + offset) as *const u64;
        for (i, w) in out.iter_mut().enumerate() {
            // SAFETY: word i lies inside the checked range and is 8-byte aligned (`offset` is
            // a multiple of 8 and the region starts on a page: dom0 maps whole pages), as in
            // `read_u64`; the region is mapped (see `new`).
            *w = u64::from_le(unsafe { core::ptr::read_volatile(at.add(i)) });
        }
    }

    fn write_u64s(&self, offset: usize, words: &[u64]) {
        let in_bounds = words.len().checked_mul(8).is_some_and(|n| self.in_bounds(offset, n));
        if !in_bounds || !offset.is_multiple_of(8) {
            return;
        }
        let at = (self.base + offset) as *mut u64;
        for (i, &w) in words.iter().enumerate() {
            // SAFETY: as in `read_u64s`.
            unsafe { core::ptr::write_volatile(at.add(i), w.to_le()) };
        }
    }

    fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        if !self.in_bounds(offset, out.len()) {
            out.fill(0);
            return;
        }
        let base = self.base + offset;
        let n = out.len();
        // Byte by byte up to an 8-byte boundary, then 64 bytes per round of eight 8-byte
        // accesses, then 8 bytes per access, then the rest byte by byte. Under TCG every
        // guest instruction and every volatile access is emulated one by one (volatile: the
        // compiler may not merge or widen them itself), so a frame copy (up to 1514 bytes,
        // in 2 KiB-aligned slots) is dominated by the loop's own instructions: 15 per
        // 8 bytes with one alignment test per access (2,850 per full frame, most of what
        // the net driver VM and the guest behind it executed per frame), 2.4 per 8 bytes
        // with eight accesses per round (`cargo xtask bench net --counts`).
        let head = base.wrapping_neg() % 8;
        let mut i = 0;
        while i < n && i < head {
            // SAFETY: in bounds (checked above); byte accesses need no alignment.
            out[i] = unsafe { core::ptr::read_volatile((base + i) as *const u8) };
            i += 1;
        }
        while n - i >= 64 {
            let at = (base + i) as *const u64;
            // SAFETY: `i + 64 <= n`: `out[i..i + 64]` (no bounds check in the loop: under
            // TCG it would end a translation block in the middle of every round).
            let to = unsafe { out.as_mut_ptr().add(i) } as *mut u64;
            for k in 0..8 {
                // SAFETY: `at + 8k .. at + 8k + 8` lies inside `offset..offset + n` (in
                // bounds, checked above) and is 8-byte aligned (`i >= head`); `to` points
                // into `out[i..i + 64]`, written unaligned.
                unsafe { to.add(k).write_unaligned(core::ptr::read_volatile(at.add(k))) };
            }
            i += 64;
        }
        while n - i >= 8 {
            // SAFETY: as above, for one 8-byte word.
            let v = unsafe { core::ptr::read_volatile((base + i) as *const u64) };
            out[i..i + 8].copy_from_slice(&v.to_ne_bytes());
            i += 8;
        }
        while i < n {
            // SAFETY: in bounds (checked above).
            out[i] = unsafe { core::ptr::read_volatile((base + i) as *const u8) };
            i += 1;
        }
    }

    fn write_bytes(&self, offset: usize, data: &[u8]) {
        if !self.in_bounds(offset, data.len()) {
            return;
        }
        let base = self.base + offset;
        let n = data.len();
        // As in `read_bytes`: eight 8-byte accesses per round where aligned.
        let head = base.wrapping_neg() % 8;
        let mut i = 0;
        while i < n && i < head {
            // SAFETY: as in `read_bytes`.
            unsafe { core::ptr::write_volatile((base + i) as *mut u8, data[i]) };
            i += 1;
        }
        while n - i >= 64 {
            let at = (base + i) as *mut u64;
            // SAFETY: `i + 64 <= n`: `data[i..i + 64]` (as in `read_bytes`).
            let from = unsafe { data.as_ptr().add(i) } as *const u64;
            for k in 0..8 {
                // SAFETY: as in `read_bytes`, with `from` reading `data[i..i + 64]`.
                unsafe { core::ptr::write_volatile(at.add(k), from.add(k).read_unaligned()) };
            }
            i += 64;
        }
        while n - i >= 8 {
            let mut v = [0u8; 8];
            v.copy_from_slice(&data[i..i + 8]);
            // SAFETY: as in `read_bytes`.
            unsafe { core::ptr::write_volatile((base + i) as *mut u64, u64::from_ne_bytes(v)) };
            i += 8;
        }
        while i < n {
            // SAFETY: as in `read_bytes`.
            unsafe { core::ptr::write_volatile((base + i) as *mut u8, data[i]) };
            i += 1;
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

    /// Copies of every length at every alignment read and write exactly their bytes.
    #[test]
    fn copies_are_exact_at_any_alignment_and_length() {
        let mut backing = vec![0u64; 128];
        let len = backing.len() * 8;
        let base = backing.as_mut_ptr() as usize;
        // SAFETY: the vector outlives the region's use in this test and nothing else touches
        // it meanwhile.
        let r = unsafe { Region::new(base, len) };
        for offset in 0..17 {
            for n in (0..40).chain(60..140).chain([200, 300]) {
                let data: Vec<u8> = (0..n).map(|i| (i * 7 + offset + 1) as u8).collect();
                r.write_bytes(0, &[0xEE; 400]);
                r.write_bytes(offset, &data);
                let mut all = vec![0u8; 400];
                r.read_bytes(0, &mut all);
                assert!(all[..offset].iter().all(|&b| b == 0xEE), "before {offset}+{n}");
                assert_eq!(&all[offset..offset + n], &data[..], "at {offset}+{n}");
                assert_eq!(all[offset + n], 0xEE, "after {offset}+{n}");
                let mut back = vec![0u8; n];
                r.read_bytes(offset, &mut back);
                assert_eq!(back, data);
            }
        }
        // Runs of words, as the ring copies its slots: exactly their bytes, little endian.
        r.write_bytes(0, &vec![0xEE; len]);
        r.write_u64s(16, &[0x0807_0605_0403_0201, u64::MAX, 0]);
        let mut all = vec![0u8; 48];
        r.read_bytes(0, &mut all);
        assert_eq!(&all[..16], &[0xEE; 16]);
        assert_eq!(&all[16..24], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&all[24..40], &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&all[40..], &[0xEE; 8]);
        let mut words = [7u64; 3];
        r.read_u64s(16, &mut words);
        assert_eq!(words, [0x0807_0605_0403_0201, u64::MAX, 0]);
        // A run that ends past the region, or a misaligned one: nothing written, zeros read.
        r.write_u64s(len - 8, &[1, 2]);
        r.write_u64s(4, &[1]);
        r.read_u64s(len - 8, &mut words);
        assert_eq!(words, [0; 3]);
        let mut word = [7u64];
        r.read_u64s(4, &mut word);
        assert_eq!(word, [0]);
        r.read_bytes(0, &mut all);
        assert_eq!(&all[..16], &[0xEE; 16]);
        let mut end = [0u8; 8];
        r.read_bytes(len - 8, &mut end);
        assert_eq!(end, [0xEE; 8]);
        // Out of bounds: nothing written, zeros read.
        r.write_bytes(len - 3, &[1, 2, 3, 4]);
        let mut out = [9u8; 4];
        r.read_bytes(len - 3, &mut out);
        assert_eq!(out, [0; 4]);
        drop(backing);
    }
}

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
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: in bounds (checked above); byte accesses need no alignment.
            *b = unsafe { core::ptr::read_volatile((self.base + offset + i) as *const u8) };
        }
    }

    fn write_bytes(&self, offset: usize, data: &[u8]) {
        if !self.in_bounds(offset, data.len()) {
            return;
        }
        for (i, &b) in data.iter().enumerate() {
            // SAFETY: as in read_bytes.
            unsafe { core::ptr::write_volatile((self.base + offset + i) as *mut u8, b) };
        }
    }

    fn len(&self) -> usize {
        self.len
    }
}

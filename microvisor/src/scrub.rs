//! Scrubbing freed domain RAM while the machine is idle, so that building a domain does not
//! wait for its RAM to be zeroed (as Xen scrubs freed pages in its idle loop).
//!
//! Domain RAM comes and goes in [`RAM_CHUNK`](crate::kernel::RAM_CHUNK)s. A chunk a
//! destroyed domain frees is not returned to the frame allocator but held here *dirty*;
//! while no vCPU is runnable the run loop zeroes dirty chunks a step at a time (letting
//! interrupts in between steps); a zeroed chunk is held *clean* and handed to the next
//! domain that asks for a chunk without being zeroed again. A restarted driver VM thus
//! gets the RAM its dead incarnation had, scrubbed in the idle time since, instead of
//! zeroing 8 MiB between the kill and its first instruction.
//!
//! The invariant, which the tests check: a chunk leaves the pool clean only after every
//! byte of it was zeroed since it was last freed; a dirty chunk leaves only through
//! [`ChunkPool::drain`], to the frame allocator, whose allocations are zeroed anyway. The
//! pool holds at most [`POOL_CHUNKS`] chunks; when memory runs short the platform drains it
//! back into the allocator, so holding chunks never makes an allocation fail.

/// Chunks held at most (dirty and clean together): 32 MiB with 2 MiB chunks, enough for
/// a few restartable driver VMs.
pub const POOL_CHUNKS: usize = 16;

/// Freed chunks waiting to be zeroed, and zeroed ones ready to be handed out.
pub struct ChunkPool {
    chunk: u64,
    dirty: heapless::Vec<u64, POOL_CHUNKS>,
    clean: heapless::Vec<u64, POOL_CHUNKS>,
    /// Bytes of the last dirty chunk zeroed so far (scrubbing works on it until done).
    progress: u64,
}

impl ChunkPool {
    /// An empty pool of `chunk`-byte chunks (a power of two).
    pub const fn new(chunk: u64) -> Self {
        Self { chunk, dirty: heapless::Vec::new(), clean: heapless::Vec::new(), progress: 0 }
    }

    /// A chunk is being freed: keep it to scrub (`true`), or refuse (`false`: misaligned,
    /// or the pool is full) and the caller frees it to the allocator.
    pub fn take_freed(&mut self, hpa: u64) -> bool {
        if !hpa.is_multiple_of(self.chunk) || self.held() >= POOL_CHUNKS {
            return false;
        }
        // Pushed at the front: the chunk being scrubbed (the last) keeps its progress.
        self.dirty.insert(0, hpa).is_ok()
    }

    /// A zeroed chunk, if one is ready.
    pub fn take_clean(&mut self) -> Option<u64> {
        self.clean.pop()
    }

    /// Zero up to `step` bytes of the chunk being scrubbed with `zero(hpa, bytes)`; a chunk
    /// finished becomes clean. Whether dirty chunks remain.
    pub fn scrub_step(&mut self, step: u64, mut zero: impl FnMut(u64, u64)) -> bool {
        let Some(&hpa) = self.dirty.last() else { return false };
        let n = step.min(self.chunk - self.progress);
        zero(hpa + self.progress, n);
        self.progress += n;
        if self.progress == self.chunk {
            self.progress = 0;
            self.dirty.pop();
            // Cannot fail: dirty and clean together hold at most POOL_CHUNKS.
            let _ = self.clean.push(hpa);
        }
        !self.dirty.is_empty()
    }

    /// Whether chunks wait to be zeroed.
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Chunks held (dirty and clean): free memory, as far as anyone asking is concerned.
    pub fn held(&self) -> usize {
        self.dirty.len() + self.clean.len()
    }

    /// Give up every chunk held (memory is short): each goes to `free`.
    pub fn drain(&mut self, mut free: impl FnMut(u64)) {
        for hpa in self.dirty.drain(..).chain(self.clean.drain(..)) {
            free(hpa);
        }
        self.progress = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::vec::Vec;

    const CHUNK: u64 = 0x2000;

    /// Memory as chunks of bytes, to see what was zeroed.
    struct Mem(BTreeMap<u64, Vec<u8>>);

    impl Mem {
        fn dirty(&mut self, hpa: u64) {
            self.0.insert(hpa, std::vec![0xa5; CHUNK as usize]);
        }
        fn zero(&mut self, at: u64, n: u64) {
            let base = at - at % CHUNK;
            let c = self.0.get_mut(&base).expect("a chunk");
            let off = (at - base) as usize;
            c[off..off + n as usize].fill(0);
        }
        fn is_zero(&self, hpa: u64) -> bool {
            self.0[&hpa].iter().all(|&b| b == 0)
        }
    }

    #[test]
    fn a_chunk_comes_back_clean_only_once_every_byte_was_zeroed() {
        let (mut pool, mut mem) = (ChunkPool::new(CHUNK), Mem(BTreeMap::new()));
        for hpa in [0x10000, 0x20000] {
            mem.dirty(hpa);
            assert!(pool.take_freed(hpa));
        }
        assert_eq!(pool.take_clean(), None, "nothing is clean before scrubbing");
        // Steps that do not divide the chunk: the last step of each is short.
        let mut steps = 0;
        while pool.scrub_step(0x700, |at, n| mem.zero(at, n)) {
            steps += 1;
            if let Some(c) = pool.take_clean() {
                assert!(mem.is_zero(c), "{c:#x} handed out dirty");
                if steps < 20 {
                    mem.dirty(c); // a domain used it and freed it again
                    assert!(pool.take_freed(c));
                }
            }
            assert!(steps < 100, "scrubbing never ends");
        }
        while let Some(c) = pool.take_clean() {
            assert!(mem.is_zero(c), "{c:#x} handed out dirty");
        }
        assert_eq!(pool.held(), 0);
    }

    #[test]
    fn a_chunk_freed_while_another_is_half_scrubbed_does_not_inherit_its_progress() {
        let (mut pool, mut mem) = (ChunkPool::new(CHUNK), Mem(BTreeMap::new()));
        mem.dirty(0x10000);
        assert!(pool.take_freed(0x10000));
        assert!(pool.scrub_step(CHUNK / 2, |at, n| mem.zero(at, n)), "half of the only dirty chunk: still dirty");
        assert!(pool.has_dirty());
        mem.dirty(0x30000);
        assert!(pool.take_freed(0x30000));
        while pool.scrub_step(CHUNK / 4, |at, n| mem.zero(at, n)) {}
        let mut got = Vec::new();
        while let Some(c) = pool.take_clean() {
            assert!(mem.is_zero(c), "{c:#x} handed out dirty");
            got.push(c);
        }
        got.sort();
        assert_eq!(got, [0x10000, 0x30000]);
    }

    #[test]
    fn the_pool_refuses_misaligned_chunks_and_more_than_it_holds() {
        let mut pool = ChunkPool::new(CHUNK);
        assert!(!pool.take_freed(CHUNK + 0x1000));
        for i in 0..POOL_CHUNKS as u64 {
            assert!(pool.take_freed((i + 1) * CHUNK));
        }
        assert!(!pool.take_freed(0x1000 * CHUNK), "full");
        assert_eq!(pool.held(), POOL_CHUNKS);
    }

    #[test]
    fn draining_gives_every_chunk_back_and_forgets_progress() {
        let mut pool = ChunkPool::new(CHUNK);
        for hpa in [CHUNK, 2 * CHUNK, 3 * CHUNK] {
            assert!(pool.take_freed(hpa));
        }
        // One chunk clean, one half scrubbed, one dirty.
        assert!(pool.scrub_step(CHUNK, |_, _| {}));
        assert!(pool.scrub_step(CHUNK / 2, |_, _| {}));
        let mut freed = Vec::new();
        pool.drain(|hpa| freed.push(hpa));
        freed.sort();
        assert_eq!(freed, [CHUNK, 2 * CHUNK, 3 * CHUNK]);
        assert_eq!(pool.held(), 0);
        assert!(!pool.has_dirty());
        assert_eq!(pool.take_clean(), None);
        // A chunk freed after draining starts from its first byte.
        let (mut mem, mut pool) = (Mem(BTreeMap::new()), pool);
        mem.dirty(5 * CHUNK);
        assert!(pool.take_freed(5 * CHUNK));
        while pool.scrub_step(CHUNK / 3, |at, n| mem.zero(at, n)) {}
        assert_eq!(pool.take_clean(), Some(5 * CHUNK));
        assert!(mem.is_zero(5 * CHUNK));
    }
}

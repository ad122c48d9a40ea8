//! The block benchmark's workloads, shared by every domain that runs them (the guest through
//! the disk driver VM, and a domain that owns a disk directly), so both measure exactly the
//! same sequence of requests.

/// One workload: `count` requests of `sectors` sectors each.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub name: &'static str,
    pub write: bool,
    pub random: bool,
    pub sectors: u32,
    pub count: u32,
}

/// Every workload, in the order they run (writes first, so reads find written data).
pub const WORKLOADS: &[Workload] = &[
    Workload { name: "seq-write-4k", write: true, random: false, sectors: 8, count: 1024 },
    Workload { name: "seq-write-64k", write: true, random: false, sectors: 128, count: 256 },
    Workload { name: "rand-write-4k", write: true, random: true, sectors: 8, count: 1024 },
    Workload { name: "rand-write-64k", write: true, random: true, sectors: 128, count: 256 },
    Workload { name: "seq-read-4k", write: false, random: false, sectors: 8, count: 1024 },
    Workload { name: "seq-read-64k", write: false, random: false, sectors: 128, count: 256 },
    Workload { name: "rand-read-4k", write: false, random: true, sectors: 8, count: 1024 },
    Workload { name: "rand-read-64k", write: false, random: true, sectors: 128, count: 256 },
];

impl Workload {
    /// The sector of request `i` on a disk of `capacity` sectors: sequential from 0, or a
    /// fixed pseudo-random sequence of request-aligned positions.
    pub fn sector(&self, i: u32, capacity: u64) -> u64 {
        let slots = (capacity / self.sectors as u64).max(1);
        let slot = if self.random {
            let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            x ^= x >> 31;
            x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x ^= x >> 29;
            x % slots
        } else {
            i as u64 % slots
        };
        slot * self.sectors as u64
    }

    pub fn bytes(&self) -> u64 {
        self.count as u64 * self.sectors as u64 * 512
    }
}

/// Times each side runs every workload: `cargo xtask bench blk` keeps the best of them and
/// the median of the rounds' ratios, so a round disturbed by the host (wall-clock time
/// under TCG on a loaded host is noisy: single rounds 5 to 30 times slower than the rest
/// were seen) does not count. The workloads take seconds; the boot takes most of the run.
pub const ROUNDS: u32 = 7;

/// Print one result line in the format `cargo xtask bench blk` reads.
pub fn report(via: &str, w: &Workload, ns: u64) {
    crate::println!("bench blk: via={via} workload={} bytes={} requests={} ns={ns}", w.name, w.bytes(), w.count);
}

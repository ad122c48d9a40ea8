//! Physical memory as the microvisor reaches it: the boot trampoline identity-maps the low
//! 4 GiB, so a physical address below [`IDENTITY_LIMIT`] is also its virtual address.
//! Only RAM below that limit is given to the frame allocator.

use microvisor::frame_alloc::FrameAllocator;
use microvisor::stage2::TableMemory;

pub const IDENTITY_LIMIT: u64 = 4 << 30;
pub const PAGE_SIZE: u64 = 4096;

/// The allocator of all free physical frames.
pub static FRAMES: spin::Mutex<FrameAllocator> = spin::Mutex::new(FrameAllocator::empty());

/// Fill `frames` pages at `pa` with zeros.
///
/// # Safety
/// The range must be RAM owned by the caller (freshly allocated, or owned by a domain that
/// is being built or torn down) and inside the identity map.
pub unsafe fn zero_frames(pa: u64, frames: u64) {
    // SAFETY: per the function contract the range is owned RAM inside the identity map.
    unsafe { core::ptr::write_bytes(pa as *mut u8, 0, (frames * PAGE_SIZE) as usize) };
}

/// Allocate `frames` contiguous zeroed frames.
pub fn alloc_zeroed_frames(frames: u64) -> Option<u64> {
    let pa = FRAMES.lock().alloc(frames, PAGE_SIZE).ok()?;
    // SAFETY: the allocator just handed these frames out exclusively; they are RAM below
    // the identity limit (only such RAM is given to the allocator).
    unsafe { zero_frames(pa, frames) };
    Some(pa)
}

/// Stage-2 page tables live in frames from [`FRAMES`], reached through the identity map.
pub struct PhysTables;

impl TableMemory for PhysTables {
    fn alloc_table(&mut self) -> Option<u64> {
        alloc_zeroed_frames(1)
    }

    fn free_table(&mut self, table: u64) {
        // A table frame came from alloc_table, so freeing it cannot fail; if it ever did,
        // the frame is leaked rather than handed out twice.
        let _ = FRAMES.lock().free(table, 1);
    }

    fn read_entry(&self, table: u64, index: usize) -> u64 {
        // SAFETY: `table` is a page-table frame from alloc_table (identity-mapped RAM owned
        // by a stage-2 map) and index < 512 keeps the access inside it.
        unsafe { core::ptr::read_volatile((table as *const u64).add(index & 511)) }
    }

    fn write_entry(&mut self, table: u64, index: usize, entry: u64) {
        // SAFETY: as in read_entry.
        unsafe { core::ptr::write_volatile((table as *mut u64).add(index & 511), entry) }
    }
}

/// A byte slice over physical memory owned by the microvisor (the boot bundle, firmware
/// tables).
///
/// # Safety
/// The range must be inside the identity map and must not be written while the slice lives.
pub unsafe fn phys_slice(pa: u64, len: usize) -> &'static [u8] {
    // SAFETY: per the function contract.
    unsafe { core::slice::from_raw_parts(pa as *const u8, len) }
}

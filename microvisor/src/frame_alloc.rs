//! Physical frame allocator.
//!
//! The microvisor owns all RAM the firmware reports as usable, minus what must never be handed
//! out (its own image, the boot bundle, ACPI tables, low memory, ...). It needs contiguous,
//! aligned physical chunks for page tables, VMCBs, IOMMU tables and guest RAM, and it runs
//! without a heap, so the free memory is kept as a fixed-capacity, sorted, coalesced list of
//! ranges. A list of ranges (rather than a bitmap) keeps the footprint independent of the amount
//! of RAM, and the few allocations a microvisor makes keep it short.
//!
//! The allocator does not remember individual allocations: `free` accepts any range that is
//! managed and currently not free, which lets callers return part of an allocation. What it
//! does reject is anything that would make it hand out memory twice or memory it never managed
//! (double free, overlap with free memory, ranges outside the usable-minus-reserved set).

use heapless::Vec;

/// Size of a physical frame: the 4 KiB base page of x86-64 and of the stage-2 tables.
pub const FRAME_SIZE: u64 = 4096;

/// How many disjoint ranges the free list (and the managed set) can hold. Firmware memory maps
/// have a few dozen entries at most; the margin is for the holes that allocations and frees
/// punch into them.
pub const MAX_RANGES: usize = 128;

/// A half-open physical address range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysRange {
    /// First byte of the range.
    pub start: u64,
    /// One past the last byte of the range.
    pub end: u64,
}

impl PhysRange {
    /// A range `[start, end)`; `end <= start` gives an empty range.
    pub const fn new(start: u64, end: u64) -> Self {
        Self { start, end }
    }

    /// Length in bytes (0 for an empty or inverted range, never an underflow).
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// True when the range holds no byte.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// True when the two ranges share at least one byte (touching ranges do not overlap).
    pub fn overlaps(&self, other: &PhysRange) -> bool {
        !self.is_empty() && !other.is_empty() && self.start < other.end && other.start < self.end
    }

    /// True when `addr` lies inside the range.
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// True when `other` lies entirely inside this range (an empty `other` never does, so
    /// callers cannot sneak a zero-length range past a containment check).
    fn covers(&self, other: &PhysRange) -> bool {
        !other.is_empty() && self.start <= other.start && other.end <= self.end
    }
}

/// Why an allocation or a free failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocError {
    /// No free range can hold the frames requested, contiguous and aligned as asked.
    OutOfMemory,
    /// The alignment is not a power of two of at least [`FRAME_SIZE`].
    BadAlignment(u64),
    /// A request for zero frames: almost certainly a caller bug, so it is not silently accepted.
    ZeroFrames,
    /// The range given to `free` is unaligned, outside the managed memory, or (partly) free
    /// already (double free).
    NotAllocated,
    /// The free list is full: the operation would need one more disjoint range than
    /// [`MAX_RANGES`]. Nothing was changed.
    TooFragmented,
}

type RangeList = Vec<PhysRange, MAX_RANGES>;

/// Physical frame allocator over a sorted, coalesced free list. See the module doc.
#[derive(Clone, Debug)]
pub struct FrameAllocator {
    /// Free memory: sorted by address, frame-aligned, non-empty, pairwise non-touching.
    free: RangeList,
    /// Everything this allocator was given (usable minus reserved), in the same normal form.
    /// `free` is always a subset; `free()` only accepts ranges inside one of these.
    managed: RangeList,
}

impl Default for FrameAllocator {
    fn default() -> Self {
        Self::empty()
    }
}

/// Round `value` up to a multiple of `align` (a power of two); `None` on overflow.
fn align_up(value: u64, align: u64) -> Option<u64> {
    value.checked_add(align - 1).map(|v| v & !(align - 1))
}

/// Round `value` down to a multiple of `align` (a power of two).
fn align_down(value: u64, align: u64) -> u64 {
    value & !(align - 1)
}

/// Add `r` (non-empty) to a sorted, coalesced list, merging with every range it overlaps or
/// touches. Returns `false`, leaving the list untouched, when that needs a new slot and the list
/// is full.
fn union_into(list: &mut RangeList, r: PhysRange) -> bool {
    // Ranges before `first` end strictly before `r` starts; ranges from `last` on start strictly
    // after `r` ends. Everything in between overlaps or touches `r` and merges with it.
    let first = list.iter().position(|c| c.end >= r.start).unwrap_or(list.len());
    let last = list.iter().position(|c| c.start > r.end).unwrap_or(list.len());
    if first >= last {
        return list.insert(first, r).is_ok();
    }
    let merged = PhysRange::new(list[first].start.min(r.start), list[last - 1].end.max(r.end));
    list[first] = merged;
    for _ in first + 1..last {
        list.remove(first + 1);
    }
    true
}

/// Remove `r` from a sorted, coalesced list. When a range must be split in two and the list is
/// full, the upper piece is dropped (the memory is lost, never wrongly kept) and `false` is
/// returned.
fn subtract_from(list: &mut RangeList, r: PhysRange) -> bool {
    let mut complete = true;
    let mut i = 0;
    while i < list.len() {
        let c = list[i];
        if c.end <= r.start {
            i += 1;
            continue;
        }
        if c.start >= r.end {
            break;
        }
        let left = PhysRange::new(c.start, r.start);
        let right = PhysRange::new(r.end, c.end);
        match (left.is_empty(), right.is_empty()) {
            (false, false) => {
                list[i] = left;
                if list.insert(i + 1, right).is_err() {
                    complete = false;
                }
                break;
            }
            (false, true) => {
                list[i] = left;
                i += 1;
            }
            (true, false) => {
                list[i] = right;
                break;
            }
            (true, true) => {
                list.remove(i);
            }
        }
    }
    complete
}

impl FrameAllocator {
    /// An allocator with no memory: every allocation fails. Useful as a `static` initialiser
    /// before the memory map is known.
    pub const fn empty() -> Self {
        Self { free: Vec::new(), managed: Vec::new() }
    }

    /// Build the allocator from the firmware memory map.
    ///
    /// `usable`: RAM ranges in any order, possibly overlapping or unaligned; each is rounded
    /// inward to whole frames, because a partial frame is not wholly RAM.
    /// `reserved`: ranges that must never be handed out; each is rounded outward, because
    /// handing out a frame that is partly reserved would expose the reserved bytes.
    ///
    /// If the result needs more than [`MAX_RANGES`] disjoint ranges, the excess memory is
    /// dropped (never handed out); the tests' `try_new` detects that.
    pub fn new(usable: &[PhysRange], reserved: &[PhysRange]) -> Self {
        Self::build(usable, reserved).0
    }

    /// Shared constructor; the flag is false when some memory had to be dropped.
    fn build(usable: &[PhysRange], reserved: &[PhysRange]) -> (Self, bool) {
        let mut managed = RangeList::new();
        let mut complete = true;
        for u in usable {
            let Some(start) = align_up(u.start, FRAME_SIZE) else { continue };
            let r = PhysRange::new(start, align_down(u.end, FRAME_SIZE));
            if !r.is_empty() {
                complete &= union_into(&mut managed, r);
            }
        }
        for res in reserved {
            if res.is_empty() {
                continue;
            }
            // A reserved range reaching the top of the address space stays open-ended.
            let end = align_up(res.end, FRAME_SIZE).unwrap_or(u64::MAX);
            let r = PhysRange::new(align_down(res.start, FRAME_SIZE), end);
            complete &= subtract_from(&mut managed, r);
        }
        let alloc = Self { free: managed.clone(), managed };
        (alloc, complete)
    }

    /// Validate an allocation request and return its size in bytes.
    fn request_size(frames: u64, align: u64) -> Result<u64, AllocError> {
        if frames == 0 {
            return Err(AllocError::ZeroFrames);
        }
        if !align.is_power_of_two() || align < FRAME_SIZE {
            return Err(AllocError::BadAlignment(align));
        }
        frames.checked_mul(FRAME_SIZE).ok_or(AllocError::OutOfMemory)
    }

    /// Remove `[start, end)` (inside `free[i]`) from the free list. Fails, changing nothing,
    /// when it would split the range and the list is full.
    fn carve(&mut self, i: usize, start: u64, end: u64) -> bool {
        // Only a split needs a new slot; with one free, `subtract_from` cannot lose memory.
        let r = self.free[i];
        (r.start == start || end == r.end || !self.free.is_full())
            && subtract_from(&mut self.free, PhysRange::new(start, end))
    }

    /// Allocate `frames` contiguous frames whose start is aligned to `align` bytes (a power of
    /// two, at least [`FRAME_SIZE`]). First fit, lowest address: keeps the top of memory in
    /// large pieces for guest RAM.
    pub fn alloc(&mut self, frames: u64, align: u64) -> Result<u64, AllocError> {
        let size = Self::request_size(frames, align)?;
        let mut fragmented = false;
        for i in 0..self.free.len() {
            let r = self.free[i];
            let Some(end) = align_up(r.start, align).and_then(|start| start.checked_add(size)) else { continue };
            if end > r.end {
                continue;
            }
            let start = end - size;
            if self.carve(i, start, end) {
                return Ok(start);
            }
            fragmented = true;
        }
        Err(if fragmented { AllocError::TooFragmented } else { AllocError::OutOfMemory })
    }

    /// Return `frames` frames starting at `start` to the free list, coalescing with neighbours.
    ///
    /// Rejected with [`AllocError::NotAllocated`] (nothing changed) if the range is unaligned,
    /// not entirely inside memory this allocator manages, or overlaps free memory (double
    /// free). Rejected with [`AllocError::TooFragmented`] if it would need a new list slot and
    /// the list is full; the frames then stay allocated.
    pub fn free(&mut self, start: u64, frames: u64) -> Result<(), AllocError> {
        if frames == 0 {
            return Err(AllocError::ZeroFrames);
        }
        let end = frames.checked_mul(FRAME_SIZE).and_then(|size| start.checked_add(size));
        let range = PhysRange::new(start, end.ok_or(AllocError::NotAllocated)?);
        let unaligned = start & (FRAME_SIZE - 1) != 0;
        if unaligned || !self.managed.iter().any(|m| m.covers(&range)) || self.free.iter().any(|f| f.overlaps(&range)) {
            return Err(AllocError::NotAllocated);
        }
        union_into(&mut self.free, range).then_some(()).ok_or(AllocError::TooFragmented)
    }

    /// Number of free frames.
    pub fn free_frames(&self) -> u64 {
        self.free.iter().map(|r| r.len() / FRAME_SIZE).sum()
    }

    /// The free list: sorted, frame-aligned, coalesced.
    pub fn free_ranges(&self) -> &[PhysRange] {
        &self.free
    }
}

#[cfg(test)]
impl FrameAllocator {
    /// Like [`FrameAllocator::new`], but fails with [`AllocError::TooFragmented`] instead of
    /// dropping memory that does not fit in the range list.
    pub fn try_new(usable: &[PhysRange], reserved: &[PhysRange]) -> Result<Self, AllocError> {
        match Self::build(usable, reserved) {
            (alloc, true) => Ok(alloc),
            (_, false) => Err(AllocError::TooFragmented),
        }
    }

    /// Everything the allocator manages (usable minus reserved, rounded), sorted and coalesced.
    pub fn managed_ranges(&self) -> &[PhysRange] {
        &self.managed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const MIB: u64 = 1 << 20;

    /// Free-list invariants that every operation must keep.
    fn check_invariants(a: &FrameAllocator) {
        for list in [a.free_ranges(), a.managed_ranges()] {
            for r in list {
                assert!(!r.is_empty(), "empty range in list: {r:?}");
                assert_eq!(r.start % FRAME_SIZE, 0, "unaligned start {r:?}");
                assert_eq!(r.end % FRAME_SIZE, 0, "unaligned end {r:?}");
            }
            for w in list.windows(2) {
                assert!(w[0].end < w[1].start, "unsorted or uncoalesced: {w:?}");
            }
        }
        for f in a.free_ranges() {
            assert!(a.managed_ranges().iter().any(|m| m.covers(f)), "free range {f:?} not managed");
        }
    }

    #[test]
    fn phys_range_basics() {
        let r = PhysRange::new(0x1000, 0x3000);
        assert_eq!(r.len(), 0x2000);
        assert!(!r.is_empty());
        assert!(r.contains(0x1000));
        assert!(r.contains(0x2fff));
        assert!(!r.contains(0x3000));
        assert!(!r.contains(0xfff));
        assert!(r.overlaps(&PhysRange::new(0x2fff, 0x4000)));
        assert!(!r.overlaps(&PhysRange::new(0x3000, 0x4000)));
        assert!(!r.overlaps(&PhysRange::new(0x2000, 0x2000)));
        let inverted = PhysRange::new(5, 1);
        assert!(inverted.is_empty());
        assert_eq!(inverted.len(), 0);
    }

    #[test]
    fn empty_allocator_has_nothing() {
        let mut a = FrameAllocator::empty();
        assert_eq!(a.free_frames(), 0);
        assert_eq!(a.alloc(1, FRAME_SIZE), Err(AllocError::OutOfMemory));
        assert!(a.free(0, 1).is_err());
        assert_eq!(FrameAllocator::default().free_frames(), 0);
    }

    #[test]
    fn unaligned_usable_rounds_inward() {
        let a = FrameAllocator::new(&[PhysRange::new(0x1001, 0x5fff), PhysRange::new(0x10_0000, 0x10_0fff)], &[]);
        assert_eq!(a.free_ranges(), &[PhysRange::new(0x2000, 0x5000)]);
        assert_eq!(a.free_frames(), 3);
        check_invariants(&a);
    }

    #[test]
    fn unaligned_reserved_rounds_outward() {
        let a = FrameAllocator::new(
            &[PhysRange::new(0, 0x10000)],
            &[PhysRange::new(0x2001, 0x2002), PhysRange::new(0x7fff, 0x9001)],
        );
        assert_eq!(
            a.free_ranges(),
            &[PhysRange::new(0, 0x2000), PhysRange::new(0x3000, 0x7000), PhysRange::new(0xa000, 0x10000)]
        );
        check_invariants(&a);
    }

    #[test]
    fn overlapping_and_unordered_usable_merge() {
        let a = FrameAllocator::new(
            &[
                PhysRange::new(0x8000, 0xc000),
                PhysRange::new(0x1000, 0x4000),
                PhysRange::new(0x3000, 0x9000),
                PhysRange::new(0xc000, 0xd000),
            ],
            &[],
        );
        assert_eq!(a.free_ranges(), &[PhysRange::new(0x1000, 0xd000)]);
        check_invariants(&a);
    }

    #[test]
    fn reserved_covering_everything() {
        let mut a = FrameAllocator::new(
            &[PhysRange::new(0x1000, 0x9000), PhysRange::new(0x20000, 0x30000)],
            &[PhysRange::new(0, u64::MAX)],
        );
        assert_eq!(a.free_frames(), 0);
        assert!(a.free_ranges().is_empty());
        assert!(matches!(a.alloc(1, FRAME_SIZE), Err(AllocError::OutOfMemory)));
        assert!(matches!(a.free(0x1000, 1), Err(AllocError::NotAllocated)));
    }

    #[test]
    fn ranges_at_the_top_of_the_address_space() {
        let top = u64::MAX - 0x2fff; // 0x...d000, frame aligned
        let a = FrameAllocator::new(&[PhysRange::new(top - 5, u64::MAX)], &[]);
        // The end rounds down to !0xfff_u64; the start rounds up.
        assert_eq!(a.free_ranges(), &[PhysRange::new(top, !(FRAME_SIZE - 1))]);
        let mut b =
            FrameAllocator::new(&[PhysRange::new(u64::MAX - 3, u64::MAX)], &[PhysRange::new(u64::MAX - 1, u64::MAX)]);
        assert_eq!(b.free_frames(), 0);
        // Reserved end rounding up past u64::MAX must not wrap and un-reserve memory.
        let c = FrameAllocator::new(&[PhysRange::new(0, u64::MAX)], &[PhysRange::new(0x1000, u64::MAX)]);
        assert_eq!(c.free_ranges(), &[PhysRange::new(0, 0x1000)]);
        // Huge requests fail cleanly instead of overflowing.
        assert!(matches!(b.alloc(u64::MAX, FRAME_SIZE), Err(AllocError::OutOfMemory)));
        let mut d = a.clone();
        assert!(matches!(d.alloc(1, 1 << 63), Err(AllocError::OutOfMemory)));
        assert!(matches!(d.free(!0xfff_u64, 2), Err(AllocError::NotAllocated)));
    }

    #[test]
    fn alloc_first_fit() {
        let mut a = FrameAllocator::new(&[PhysRange::new(0x1000, 0x100_0000)], &[]);
        assert_eq!(a.alloc(1, FRAME_SIZE), Ok(0x1000));
        assert_eq!(a.alloc(2, FRAME_SIZE), Ok(0x2000));
        assert_eq!(a.alloc(1, 2 * MIB), Ok(0x20_0000));
        check_invariants(&a);
    }

    #[test]
    fn alignment_is_honoured_and_validated() {
        let mut a = FrameAllocator::new(&[PhysRange::new(0x1000, 64 * MIB)], &[]);
        let p = a.alloc(3, 2 * MIB).unwrap();
        assert_eq!(p % (2 * MIB), 0);
        let q = a.alloc(5, 4 * MIB).unwrap();
        assert_eq!(q % (4 * MIB), 0);
        for bad in [0, 1, 2048, 3 * FRAME_SIZE, 6144] {
            assert_eq!(a.alloc(1, bad), Err(AllocError::BadAlignment(bad)));
        }
        assert_eq!(a.alloc(0, FRAME_SIZE), Err(AllocError::ZeroFrames));
        assert_eq!(a.free(p, 0), Err(AllocError::ZeroFrames));
    }

    #[test]
    fn out_of_memory() {
        let mut a = FrameAllocator::new(&[PhysRange::new(0, 0x4000), PhysRange::new(0x8000, 0xa000)], &[]);
        assert_eq!(a.alloc(5, FRAME_SIZE), Err(AllocError::OutOfMemory));
        assert_eq!(a.alloc(4, FRAME_SIZE), Ok(0));
        assert_eq!(a.alloc(2, FRAME_SIZE), Ok(0x8000));
        assert_eq!(a.free_frames(), 0);
        // Aligned request that fits in size but not in alignment.
        let mut b = FrameAllocator::new(&[PhysRange::new(0x1000, 0x20_1000)], &[]);
        assert!(matches!(b.alloc(512, 2 * MIB), Err(AllocError::OutOfMemory)));
    }

    #[test]
    fn free_coalesces_and_rejects_bad_frees() {
        let mut a = FrameAllocator::new(&[PhysRange::new(0, 0x10000)], &[PhysRange::new(0x8000, 0x9000)]);
        let initial: std::vec::Vec<_> = a.free_ranges().to_vec();
        let x = a.alloc(2, FRAME_SIZE).unwrap();
        let y = a.alloc(2, FRAME_SIZE).unwrap();
        let z = a.alloc(2, FRAME_SIZE).unwrap();
        assert_eq!((x, y, z), (0, 0x2000, 0x4000));
        a.free(y, 2).unwrap();
        assert_eq!(a.free(y, 2), Err(AllocError::NotAllocated));
        // Partially free (overlapping y's free frames) is also a double free.
        assert!(a.free(y + 0x1000, 2).is_err());
        // Unaligned.
        assert!(a.free(x + 1, 1).is_err());
        // Reserved memory was never managed.
        assert!(a.free(0x8000, 1).is_err());
        // Outside usable memory.
        assert!(a.free(0x10000, 1).is_err());
        // Crossing the reserved hole.
        assert!(a.free(0x7000, 2).is_err());
        // Overflowing range.
        assert!(a.free(0xffff_ffff_ffff_f000, 2).is_err());
        a.free(x, 2).unwrap();
        a.free(z, 2).unwrap();
        assert_eq!(a.free_ranges(), initial.as_slice());
        check_invariants(&a);
    }

    #[test]
    fn partial_free_of_an_allocation() {
        let mut a = FrameAllocator::new(&[PhysRange::new(0, 0x10000)], &[]);
        let p = a.alloc(4, FRAME_SIZE).unwrap();
        a.free(p + 0x1000, 2).unwrap();
        assert_eq!(a.free_frames(), 14);
        a.free(p, 1).unwrap();
        a.free(p + 0x3000, 1).unwrap();
        assert_eq!(a.free_ranges(), &[PhysRange::new(0, 0x10000)]);
    }

    /// `n` disjoint usable ranges of 36 KiB starting 4 KiB into each 64 KiB block.
    fn many_ranges(n: u64) -> std::vec::Vec<PhysRange> {
        (0..n).map(|k| PhysRange::new(k * 0x10000 + 0x1000, k * 0x10000 + 0xa000)).collect()
    }

    #[test]
    fn too_fragmented_alloc() {
        let ranges = many_ranges(MAX_RANGES as u64);
        let mut a = FrameAllocator::try_new(&ranges, &[]).unwrap();
        assert_eq!(a.free_ranges().len(), MAX_RANGES);
        // An 8 KiB aligned frame sits strictly inside every range: each fit needs a split.
        assert_eq!(a.alloc(1, 0x2000), Err(AllocError::TooFragmented));
        assert_eq!(a.free_ranges().len(), MAX_RANGES);
        // Allocations that do not split still work.
        assert_eq!(a.alloc(1, FRAME_SIZE), Ok(0x1000));
        check_invariants(&a);
    }

    #[test]
    fn too_fragmented_free_and_new() {
        let mut a = FrameAllocator::new(&[PhysRange::new(0, 0x1000 * 300)], &[]);
        let all = a.alloc(300, FRAME_SIZE).unwrap();
        assert_eq!(all, 0);
        // Free every other frame: each free needs a new slot.
        let mut freed = 0;
        let mut last_err = None;
        for k in 0..150u64 {
            match a.free(k * 0x2000, 1) {
                Ok(()) => freed += 1,
                Err(e) => {
                    last_err = Some(e);
                    break;
                }
            }
        }
        assert_eq!(freed, MAX_RANGES);
        assert_eq!(last_err, Some(AllocError::TooFragmented));
        // A free that merges with a neighbour needs no slot and still works.
        a.free(0x1000, 1).unwrap();
        check_invariants(&a);

        // Too many usable ranges: try_new refuses, new drops the excess but stays correct.
        let ranges = many_ranges(MAX_RANGES as u64 + 5);
        assert_eq!(FrameAllocator::try_new(&ranges, &[]).err(), Some(AllocError::TooFragmented));
        let b = FrameAllocator::new(&ranges, &[]);
        assert_eq!(b.free_ranges().len(), MAX_RANGES);
        check_invariants(&b);
        // A reserved hole that would need a split on a full list drops the upper piece.
        let full = many_ranges(MAX_RANGES as u64);
        let c = FrameAllocator::new(&full, &[PhysRange::new(0x3000, 0x4000)]);
        assert!(c.free_ranges().iter().all(|r| !r.overlaps(&PhysRange::new(0x3000, 0x4000))));
        assert_eq!(c.free_ranges()[0], PhysRange::new(0x1000, 0x3000));
        assert!(FrameAllocator::try_new(&full, &[PhysRange::new(0x3000, 0x4000)]).is_err());
        check_invariants(&c);
    }

    // ---- property tests -------------------------------------------------------------------

    /// Address space the property tests draw from: 4 MiB, i.e. 1024 frames, small enough to
    /// model frame by frame.
    const SPACE: u64 = 4 * MIB;

    fn arb_range(max_len: u64) -> impl Strategy<Value = PhysRange> {
        (0..SPACE, 0..max_len).prop_map(|(s, l)| PhysRange::new(s, s + l))
    }

    /// Frames the allocator may hand out according to the definition: wholly inside one usable
    /// range, and not touching any reserved byte.
    fn model_frames(usable: &[PhysRange], reserved: &[PhysRange]) -> BTreeSet<u64> {
        let mut set = BTreeSet::new();
        for f in (0..SPACE + MIB).step_by(FRAME_SIZE as usize) {
            let frame = PhysRange::new(f, f + FRAME_SIZE);
            if usable.iter().any(|u| u.covers(&frame)) && !reserved.iter().any(|r| r.overlaps(&frame)) {
                set.insert(f);
            }
        }
        set
    }

    #[derive(Clone, Debug)]
    struct Req {
        frames: u64,
        align_shift: u32,
    }

    fn arb_req() -> impl Strategy<Value = Req> {
        (1u64..40, 12u32..=22).prop_map(|(frames, align_shift)| Req { frames, align_shift })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn prop_alloc_free_roundtrip(
            usable in prop::collection::vec(arb_range(MIB), 0..8),
            reserved in prop::collection::vec(arb_range(MIB / 4), 0..8),
            reqs in prop::collection::vec(arb_req(), 1..40),
            free_order_seed in any::<u64>(),
        ) {
            let mut a = FrameAllocator::new(&usable, &reserved);
            check_invariants(&a);
            let model = model_frames(&usable, &reserved);
            let initial_free = a.free_frames();
            let initial_ranges: std::vec::Vec<_> = a.free_ranges().to_vec();
            prop_assert_eq!(initial_free, model.len() as u64);

            let mut allocated: std::vec::Vec<(u64, u64)> = std::vec::Vec::new();
            let mut in_use = BTreeSet::new();
            for r in &reqs {
                let align = 1u64 << r.align_shift;
                let before = a.free_frames();
                let res = a.alloc(r.frames, align);
                match res {
                    Ok(p) => {
                        prop_assert_eq!(p % align, 0, "alignment");
                        for k in 0..r.frames {
                            let f = p + k * FRAME_SIZE;
                            prop_assert!(model.contains(&f), "frame {:#x} not usable or reserved", f);
                            prop_assert!(in_use.insert(f), "frame {:#x} handed out twice", f);
                        }
                        prop_assert_eq!(a.free_frames(), before - r.frames);
                        allocated.push((p, r.frames));
                    }
                    Err(AllocError::OutOfMemory) => {
                        prop_assert_eq!(a.free_frames(), before);
                        // First/last fit must not miss a fitting aligned block.
                        let fits = model.iter().any(|&f| f & (align - 1) == 0
                            && (0..r.frames).all(|k| model.contains(&(f + k * FRAME_SIZE))
                                && !in_use.contains(&(f + k * FRAME_SIZE))));
                        prop_assert!(!fits, "OOM although an aligned block was free");
                    }
                    Err(e) => prop_assert!(false, "unexpected error {:?}", e),
                }
                check_invariants(&a);
            }
            prop_assert_eq!(a.free_frames() + in_use.len() as u64, initial_free);

            // Free everything in a pseudo-random order.
            let n = allocated.len();
            let mut order: std::vec::Vec<usize> = (0..n).collect();
            let mut s = free_order_seed | 1;
            for i in (1..n).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                order.swap(i, (s % (i as u64 + 1)) as usize);
            }
            for &i in &order {
                let (p, frames) = allocated[i];
                prop_assert_eq!(a.free(p, frames), Ok(()));
                // Double free is refused and changes nothing.
                let snapshot: std::vec::Vec<_> = a.free_ranges().to_vec();
                prop_assert_eq!(a.free(p, frames), Err(AllocError::NotAllocated));
                prop_assert_eq!(a.free_ranges(), snapshot.as_slice());
                check_invariants(&a);
            }
            prop_assert_eq!(a.free_frames(), initial_free);
            prop_assert_eq!(a.free_ranges(), initial_ranges.as_slice());
        }

        #[test]
        fn prop_free_of_unmanaged_is_rejected(
            usable in prop::collection::vec(arb_range(MIB), 0..6),
            reserved in prop::collection::vec(arb_range(MIB / 4), 0..6),
            start_frame in 0u64..(SPACE / FRAME_SIZE),
            frames in 1u64..16,
        ) {
            let mut a = FrameAllocator::new(&usable, &reserved);
            let model = model_frames(&usable, &reserved);
            // Allocate everything so that only "never managed" can explain a rejection.
            while a.alloc(1, FRAME_SIZE).is_ok() {}
            let start = start_frame * FRAME_SIZE;
            let all_managed = (0..frames).all(|k| model.contains(&(start + k * FRAME_SIZE)));
            let res = a.free(start, frames);
            if all_managed {
                // Managed but possibly spanning a merge of two usable ranges: still one
                // managed range, so the free is accepted.
                prop_assert_eq!(res, Ok(()));
            } else {
                prop_assert_eq!(res, Err(AllocError::NotAllocated));
            }
            check_invariants(&a);
        }
    }
}

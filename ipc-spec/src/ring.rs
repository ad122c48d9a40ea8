//! A single-producer / single-consumer ring of fixed-size entries in memory shared by two
//! domains that do not trust each other.
//!
//! Channels between a domain and a driver VM (see [`crate::block`]) carry their messages in a
//! region mapped into both stage-2 spaces. Either side may be buggy or hostile and may change
//! any byte of the region at any time, including while the other side reads it. The ring
//! code is written so that nothing the peer writes can make this side panic, loop, or touch
//! memory outside its own ring: the worst a peer can do is make the ring report
//! [`RingError::Corrupt`], after which this side stops using it and its owner decides what
//! to do (typically: tear the channel down).
//!
//! # Layout
//!
//! One ring at byte `offset` of the shared region, all integers little endian:
//!
//! ```text
//! offset + 0   producer  u32   free-running index of the next slot the producer fills
//! offset + 4   consumer  u32   free-running index of the next slot the consumer empties
//! offset + 8   capacity slots of SLOT_SIZE bytes; index i lives in slot i % capacity
//! ```
//!
//! `capacity` is a power of two, at most [`MAX_CAPACITY`], and is not stored in the ring: both
//! sides learn it out of band (for block channels, from the region header) and each checks
//! that the ring fits its own mapping. Indexes are free-running `u32`s that wrap around; the
//! number of entries in the ring is `producer.wrapping_sub(consumer)`, which is therefore
//! meaningful across the wrap as long as it never exceeds `capacity` (that is why capacity
//! is a power of two: `u32` wrap-around then keeps `index % capacity` continuous).
//!
//! # Memory ordering
//!
//! - The producer reads `consumer` (then an acquire fence, so it cannot write a slot before
//!   it has seen that the consumer is done with it), writes the slot, then a release fence,
//!   then publishes `producer`: a consumer that sees the new `producer` also sees the slot.
//! - The consumer reads `producer` (then an acquire fence, so the slot read comes after it),
//!   copies the slot, then a release fence, then publishes `consumer`: the producer cannot
//!   reuse the slot before the copy is complete.
//!
//! A batch may publish once: [`Producer::push_batched`] writes slots and
//! [`Producer::publish`] then writes `producer` once for all of them (fence first, as
//! above); [`Consumer::pop_batched`] copies entries and [`Consumer::release`] writes
//! `consumer` once. Either half publishes what it holds back when it is dropped at the
//! latest. Holding an index back only delays what the peer sees (it sees an older, valid
//! index), so no order above is weakened.
//!
//! The fences are [`core::sync::atomic::fence`] calls inside [`Producer`] and [`Consumer`].
//! A [`SharedMem`] implementation must do each [`SharedMem::read_u32`] and
//! [`SharedMem::write_u32`] as one aligned 32-bit access (a volatile or relaxed-atomic load or
//! store), so that an index is never seen half-written; ring offsets are required to be
//! 4-byte aligned for that reason. Slot bytes have no such requirement: a slot is copied out
//! once and then validated, so a torn slot is just one more malformed message.
//!
//! # Trust
//!
//! Each half keeps its own index in private memory and only ever *writes* it to the shared
//! header; it never reads it back (the peer could have changed it). The peer's index is read
//! once per operation into a local and checked: it must lie between the value last accepted
//! and the furthest the peer can legitimately have gone (our own index for a producer's view
//! of the consumer, our index plus `capacity` for a consumer's view of the producer). In
//! particular `producer.wrapping_sub(consumer)` never exceeds `capacity`, and the peer's
//! index never moves backwards. Anything else makes the half [corrupt](RingError::Corrupt)
//! for good. Slot offsets are computed from the private index only, so no value in shared
//! memory ever decides where this side reads or writes.
//!
//! Doorbells are not part of the ring: after a push the producer signals the peer's
//! notification, and a consumer that finds the ring empty waits on its own. Notifications
//! are latched bits, so a signal sent between the consumer's check and its wait is not lost.

use core::cell::Cell;
use core::fmt;
use core::sync::atomic::{fence, Ordering};

/// Memory shared with another domain, accessed by byte offset from its start.
///
/// `&self` everywhere because the memory is shared: the peer writes it behind our back, so
/// Rust's exclusive `&mut` would be a lie. Volatile (or atomic) access is the implementor's
/// business: a domain implements this over its mapping of the region with
/// `core::ptr::read_volatile` / `write_volatile` (or `AtomicU32` loads and stores for the
/// `u32` accessors); host tests and fuzzers use [`ByteMem`].
///
/// The ring and block code only ever pass ranges inside `0..len()` (they check every range
/// against `len()` with overflow-checked arithmetic before using it), so an implementation
/// may treat an out-of-range access as a bug in this crate.
pub trait SharedMem {
    /// Reads the little-endian `u32` at `offset` (4-byte aligned whenever the ring code calls
    /// it). A domain overrides it with one access (the indices are read and written with
    /// this, and each must be seen whole); the default, through [`Self::read_bytes`], is
    /// for host memories that are not shared with another CPU.
    fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read_bytes(offset, &mut b);
        u32::from_le_bytes(b)
    }
    /// Writes `v` as a little-endian `u32` at `offset` (see [`Self::read_u32`]).
    fn write_u32(&self, offset: usize, v: u32) {
        self.write_bytes(offset, &v.to_le_bytes());
    }
    /// Copies `out.len()` bytes starting at `offset` into `out`.
    fn read_bytes(&self, offset: usize, out: &mut [u8]);
    /// Copies `data` to the bytes starting at `offset`.
    fn write_bytes(&self, offset: usize, data: &[u8]);
    /// Reads the little-endian `u64` at `offset` (8-byte aligned whenever the ring code calls
    /// it). The ring copies its slots with this, 8 bytes at a time: a domain overrides it
    /// with one access (under emulation every access a slot copy makes costs; the default
    /// goes through [`Self::read_bytes`]).
    fn read_u64(&self, offset: usize) -> u64 {
        let mut b = [0u8; 8];
        self.read_bytes(offset, &mut b);
        u64::from_le_bytes(b)
    }
    /// Writes `v` as a little-endian `u64` at `offset` (see [`Self::read_u64`]).
    fn write_u64(&self, offset: usize, v: u64) {
        self.write_bytes(offset, &v.to_le_bytes());
    }
    /// Reads `out.len()` consecutive little-endian `u64`s starting at `offset` (8-byte
    /// aligned whenever the ring code calls it): how the ring copies a slot out. A domain
    /// overrides it to check the whole range once and then make one access per word (the
    /// default checks each word, through [`Self::read_u64`]: under emulation each check
    /// costs as much as the access).
    fn read_u64s(&self, offset: usize, out: &mut [u64]) {
        for (i, w) in out.iter_mut().enumerate() {
            *w = self.read_u64(offset + i * 8);
        }
    }
    /// Writes `words` as consecutive little-endian `u64`s from `offset` (see
    /// [`Self::read_u64s`]).
    fn write_u64s(&self, offset: usize, words: &[u64]) {
        for (i, &w) in words.iter().enumerate() {
            self.write_u64(offset + i * 8, w);
        }
    }
    /// Size of the region in bytes, as mapped by this side. Assumed constant: it is this
    /// side's own mapping, not a value the peer controls.
    fn len(&self) -> usize;
    /// Whether the region is empty (no ring fits in it).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A full fence: this side's earlier stores to the region become visible before its
    /// later loads from it are done ([`Ordering::SeqCst`]; MFENCE on x86, whose only
    /// reordering is this one: Intel SDM vol. 3A, "Loads May Be Reordered with Earlier
    /// Stores to Different Locations"). The
    /// doorbell suppression of [`crate::net`] ("store my flag, fence, look again") needs
    /// exactly this. Test memories that model a weaker order than sequential consistency
    /// override it to drain their store buffer; nothing else should.
    fn full_fence(&self) {
        fence(Ordering::SeqCst);
    }
}

/// A [`SharedMem`] over a byte array, for host tests, fuzzers and single-address-space use.
///
/// Never panics: reads outside the array return zero bytes and writes outside it are
/// dropped, so it can be handed arbitrary offsets (the ring code never produces any).
#[derive(Clone, Copy, Debug)]
pub struct ByteMem<'a> {
    cells: &'a [Cell<u8>],
}

impl<'a> ByteMem<'a> {
    /// Shares `bytes` (the `&mut` borrow guarantees nothing else touches them meanwhile; the
    /// result is `Copy`, so two halves of a ring can use the same bytes, as two domains do).
    pub fn new(bytes: &'a mut [u8]) -> Self {
        Self { cells: Cell::from_mut(bytes).as_slice_of_cells() }
    }

    /// Uses an existing slice of cells.
    pub fn from_cells(cells: &'a [Cell<u8>]) -> Self {
        Self { cells }
    }
}

impl SharedMem for ByteMem<'_> {
    fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = offset.checked_add(i).and_then(|at| self.cells.get(at)).map_or(0, Cell::get);
        }
    }

    fn write_bytes(&self, offset: usize, data: &[u8]) {
        for (i, &d) in data.iter().enumerate() {
            if let Some(cell) = offset.checked_add(i).and_then(|at| self.cells.get(at)) {
                cell.set(d);
            }
        }
    }

    fn len(&self) -> usize {
        self.cells.len()
    }
}

/// Size of the ring header (the two indexes).
pub const HEADER_SIZE: usize = 8;
/// Offset of the producer index inside the ring header.
pub const PRODUCER_INDEX_OFFSET: usize = 0;
/// Offset of the consumer index inside the ring header.
pub const CONSUMER_INDEX_OFFSET: usize = 4;
/// Largest ring capacity (entries). Keeps rings small and their size far from overflow.
pub const MAX_CAPACITY: u32 = 1024;
/// Required alignment of a ring's offset, so that each index is one aligned `u32` access.
pub const RING_ALIGN: usize = 4;

/// Whether `capacity` is a valid ring capacity: a power of two in `1..=MAX_CAPACITY`.
pub const fn capacity_is_valid(capacity: u32) -> bool {
    capacity.is_power_of_two() && capacity <= MAX_CAPACITY
}

/// Bytes one ring occupies (header and slots) for `capacity` entries of `slot_size` bytes, or
/// `None` if that does not fit in a `usize`.
pub const fn ring_size(capacity: u32, slot_size: usize) -> Option<usize> {
    // `u32` to `usize` is lossless on every target this crate builds for (32 and 64 bit).
    match (capacity as usize).checked_mul(slot_size) {
        Some(slots) => slots.checked_add(HEADER_SIZE),
        None => None,
    }
}

/// Why a ring operation did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// [`Producer::push`]: every slot holds an entry the consumer has not taken yet. Try
    /// again after the consumer's doorbell.
    Full,
    /// The peer's index is impossible (more than `capacity` entries apart from ours, or moved
    /// backwards). Sticky: the half refuses every later operation; the owner decides whether
    /// to reset the channel or give up on the peer.
    Corrupt,
    /// Construction only: the capacity is not a power of two in `1..=MAX_CAPACITY`, the
    /// slot size is zero, the offset is not [`RING_ALIGN`]-aligned, or the ring does not fit
    /// inside the shared memory.
    BadLayout,
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RingError::Full => "ring is full",
            RingError::Corrupt => "ring is corrupt: the peer's index is impossible",
            RingError::BadLayout => "ring does not fit the shared memory or has a bad capacity",
        })
    }
}

/// Where a ring lives; checked once against the memory so later offsets cannot leave it.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    /// Offset of the ring header.
    offset: usize,
    /// Entries; a power of two in `1..=MAX_CAPACITY`.
    capacity: u32,
    /// Offset of slot 0.
    slots: usize,
}

impl Geometry {
    #[inline]
    fn new<M: SharedMem + ?Sized>(mem: &M, offset: usize, capacity: u32, slot_size: usize) -> Result<Self, RingError> {
        if !capacity_is_valid(capacity) || slot_size == 0 || !offset.is_multiple_of(RING_ALIGN) {
            return Err(RingError::BadLayout);
        }
        let size = ring_size(capacity, slot_size).ok_or(RingError::BadLayout)?;
        let end = offset.checked_add(size).ok_or(RingError::BadLayout)?;
        if end > mem.len() {
            return Err(RingError::BadLayout);
        }
        let slots = offset.checked_add(HEADER_SIZE).ok_or(RingError::BadLayout)?;
        Ok(Self { offset, capacity, slots })
    }

    /// A fresh, empty ring at `offset`: both indexes set to `start`.
    fn init<M: SharedMem + ?Sized>(
        mem: &M,
        offset: usize,
        capacity: u32,
        slot_size: usize,
        start: u32,
    ) -> Result<Self, RingError> {
        let geo = Self::new(mem, offset, capacity, slot_size)?;
        mem.write_u32(geo.consumer_index(), start);
        mem.write_u32(geo.producer_index(), start);
        fence(Ordering::Release);
        Ok(geo)
    }

    /// An existing ring at `offset`, with its (producer, consumer) indexes as the header
    /// holds them; [`RingError::Corrupt`] if they are more than `capacity` apart.
    fn attach<M: SharedMem + ?Sized>(
        mem: &M,
        offset: usize,
        capacity: u32,
        slot_size: usize,
    ) -> Result<(Self, u32, u32), RingError> {
        let geo = Self::new(mem, offset, capacity, slot_size)?;
        let producer = mem.read_u32(geo.producer_index());
        let consumer = mem.read_u32(geo.consumer_index());
        fence(Ordering::Acquire);
        if producer.wrapping_sub(consumer) > capacity {
            return Err(RingError::Corrupt);
        }
        Ok((geo, producer, consumer))
    }

    fn producer_index(&self) -> usize {
        // Inside the ring: `offset + HEADER_SIZE <= mem.len()` was checked in `new`.
        self.offset + PRODUCER_INDEX_OFFSET
    }

    fn consumer_index(&self) -> usize {
        self.offset + CONSUMER_INDEX_OFFSET
    }

    /// Offset of the slot for the free-running `index`. Only ever called with this side's
    /// private index, never with a value read from shared memory.
    #[inline]
    fn slot_offset(&self, index: u32, slot_size: usize) -> usize {
        // `capacity >= 1` (a power of two), so the mask is `capacity - 1`.
        let slot = index & self.capacity.wrapping_sub(1);
        // `slot < capacity` and `slots + capacity * slot_size <= mem.len()` was checked in
        // `new`, so this neither overflows nor leaves the ring.
        self.slots + slot as usize * slot_size
    }
}

/// Words a slot copy moves per [`SharedMem::read_u64s`] / [`SharedMem::write_u64s`] call.
const COPY_WORDS: usize = 8;

/// Copies slot `at` (inside the ring, checked by the caller) into `out`: in runs of up to
/// [`COPY_WORDS`] 8-byte words (one range check per run, in the domains' memories) when the
/// slot is 8-byte aligned and a multiple of 8 bytes long, as every block and net slot is
/// (the slots follow the 8-byte ring header), else byte by byte.
///
/// Returned by value, each branch filling its own array: the compiler then sees every byte
/// of the word path written and drops the zeroing (four stores per slot under emulation).
#[inline]
fn read_slot<M: SharedMem + ?Sized, const N: usize>(mem: &M, at: usize) -> [u8; N] {
    if N.is_multiple_of(8) && at.is_multiple_of(8) {
        let mut out = [0u8; N];
        let mut words = [0u64; COPY_WORDS];
        for (i, run) in out.chunks_mut(COPY_WORDS * 8).enumerate() {
            let words = &mut words[..run.len() / 8];
            mem.read_u64s(at + i * COPY_WORDS * 8, words);
            for (bytes, w) in run.chunks_exact_mut(8).zip(words.iter()) {
                bytes.copy_from_slice(&w.to_le_bytes());
            }
        }
        return out;
    }
    let mut out = [0u8; N];
    mem.read_bytes(at, &mut out);
    out
}

/// Copies `entry` into slot `at` (see [`read_slot`]).
#[inline]
fn write_slot<M: SharedMem + ?Sized, const N: usize>(mem: &M, at: usize, entry: &[u8; N]) {
    if N.is_multiple_of(8) && at.is_multiple_of(8) {
        let mut words = [0u64; COPY_WORDS];
        for (i, run) in entry.chunks(COPY_WORDS * 8).enumerate() {
            let words = &mut words[..run.len() / 8];
            for (w, bytes) in words.iter_mut().zip(run.chunks_exact(8)) {
                let mut b = [0u8; 8];
                b.copy_from_slice(bytes);
                *w = u64::from_le_bytes(b);
            }
            mem.write_u64s(at + i * COPY_WORDS * 8, words);
        }
    } else {
        mem.write_bytes(at, entry);
    }
}

/// Writes a half's own index `index` to the header word at `at`, after a release fence (the
/// slot accesses before it, writes by the producer or copies by the consumer, come first),
/// if it moved since it was last written (`written`, updated). Not on a corrupt ring (it is
/// abandoned).
#[inline]
fn write_own_index<M: SharedMem + ?Sized>(mem: &M, at: usize, index: u32, written: &mut u32, corrupt: bool) {
    if index == *written || corrupt {
        return;
    }
    fence(Ordering::Release);
    mem.write_u32(at, index);
    *written = index;
}

/// The writing half of a ring: owns the `producer` index.
///
/// [`Self::push`] publishes each entry at once. [`Self::push_batched`] writes the entry's
/// slot but publishes it (one write of the index for the whole batch) only with
/// [`Self::publish`], the next [`Self::push`], or when the half is dropped, whichever comes
/// first: under emulation each access to shared memory costs, and a peer on the same CPU
/// cannot look at the ring in the middle of a batch anyway.
#[derive(Debug)]
pub struct Producer<'m, M: SharedMem + ?Sized, const SLOT_SIZE: usize> {
    mem: &'m M,
    geo: Geometry,
    /// Index of the next slot to fill. Private: published to the header, never read back.
    producer: u32,
    /// The producer index last written to the header (`producer` minus the entries written
    /// by [`Self::push_batched`] and not yet published).
    published: u32,
    /// The consumer index last accepted. The consumer may only move it forward, up to
    /// `published`; invariant: `producer - consumer_seen <= capacity`.
    consumer_seen: u32,
    corrupt: bool,
}

impl<'m, M: SharedMem + ?Sized, const SLOT_SIZE: usize> Producer<'m, M, SLOT_SIZE> {
    /// Sets up a fresh, empty ring at `offset` (both indexes = `start`, usually 0) and returns
    /// its producer half. The side that creates the channel calls this (or
    /// [`Consumer::init`]) before telling the peer about the ring.
    pub fn init(mem: &'m M, offset: usize, capacity: u32, start: u32) -> Result<Self, RingError> {
        let geo = Geometry::init(mem, offset, capacity, SLOT_SIZE, start)?;
        Ok(Self { mem, geo, producer: start, published: start, consumer_seen: start, corrupt: false })
    }

    /// Takes over the producer side of an existing ring, continuing from the indexes in its
    /// header (e.g. a restarted driver VM). Fails with [`RingError::Corrupt`] if the header
    /// holds more than `capacity` entries.
    pub fn attach(mem: &'m M, offset: usize, capacity: u32) -> Result<Self, RingError> {
        let (geo, producer, consumer) = Geometry::attach(mem, offset, capacity, SLOT_SIZE)?;
        Ok(Self { mem, geo, producer, published: producer, consumer_seen: consumer, corrupt: false })
    }

    /// Reads the consumer index once, checks it and returns the number of entries in the ring.
    #[inline]
    fn observe(&mut self) -> Result<u32, RingError> {
        if self.corrupt {
            return Err(RingError::Corrupt);
        }
        let consumer = self.mem.read_u32(self.geo.consumer_index());
        // No slot write may happen before this read: the consumer could still be copying.
        fence(Ordering::Acquire);
        // Legitimate values of `consumer` lie in `consumer_seen..=published` (it only moves
        // forward, and never past what was published), a range of at most `capacity`. This
        // rejects "moved backwards", "past the entries published" and so "more than
        // capacity" at once (wrapping differences: a move backwards is a huge one).
        if consumer.wrapping_sub(self.consumer_seen) > self.published.wrapping_sub(self.consumer_seen) {
            self.corrupt = true;
            return Err(RingError::Corrupt);
        }
        self.consumer_seen = consumer;
        Ok(self.producer.wrapping_sub(consumer))
    }

    /// Copies `entry` into the next slot and publishes it (with any entry written by
    /// [`Self::push_batched`] before it). [`RingError::Full`] if the consumer has not made
    /// room; [`RingError::Corrupt`] if its index is impossible (nothing is written then).
    #[inline]
    pub fn push(&mut self, entry: &[u8; SLOT_SIZE]) -> Result<(), RingError> {
        let used = self.observe()?;
        if used >= self.geo.capacity {
            return Err(RingError::Full);
        }
        self.write_next(entry);
        self.publish();
        Ok(())
    }

    /// Writes `entry` into the next slot (room already checked), unpublished.
    #[inline]
    fn write_next(&mut self, entry: &[u8; SLOT_SIZE]) {
        write_slot(self.mem, self.geo.slot_offset(self.producer, SLOT_SIZE), entry);
        self.producer = self.producer.wrapping_add(1);
    }

    /// Makes every entry written so far visible to the consumer: one write of the producer
    /// index (none if nothing is unpublished). Not on a corrupt ring (it is abandoned).
    #[inline]
    pub fn publish(&mut self) {
        // The slots must be visible before the index that publishes them.
        write_own_index(self.mem, self.geo.producer_index(), self.producer, &mut self.published, self.corrupt);
    }

    /// As [`Self::push`], for a batch: reads the consumer index only if the one read last
    /// leaves no room (then [`RingError::Full`] only after a fresh read, as `push`), and
    /// leaves the entry unpublished until [`Self::publish`] (or the next `push`, or the
    /// drop of this half). For a batch of pushes right after [`Self::attach`] (which read
    /// the index) or a fresh look: an index read earlier is still a safe bound (the
    /// consumer only moves it forward, and the acquire fence after that read already
    /// orders this slot write after it). A corrupt index is found at the next read.
    #[inline]
    pub fn push_batched(&mut self, entry: &[u8; SLOT_SIZE]) -> Result<(), RingError> {
        if self.corrupt {
            return Err(RingError::Corrupt);
        }
        if self.producer.wrapping_sub(self.consumer_seen) >= self.geo.capacity && self.observe()? >= self.geo.capacity {
            return Err(RingError::Full);
        }
        self.write_next(entry);
        Ok(())
    }

    /// Slots free as of the consumer index read last (no read: at least this many are
    /// free now, as the consumer only moves forward; [`Self::free`] reads it again).
    #[inline]
    pub fn free_seen(&self) -> u32 {
        // Invariant: `producer - consumer_seen <= capacity`.
        self.geo.capacity - self.producer.wrapping_sub(self.consumer_seen)
    }

    /// Entries pushed (published or not) and not yet taken by the consumer.
    pub fn len(&mut self) -> Result<u32, RingError> {
        self.observe()
    }

    /// Whether the consumer has taken every entry.
    pub fn is_empty(&mut self) -> Result<bool, RingError> {
        Ok(self.observe()? == 0)
    }

    /// Slots free for [`Producer::push`].
    pub fn free(&mut self) -> Result<u32, RingError> {
        // `observe` guarantees `used <= capacity`.
        Ok(self.geo.capacity.saturating_sub(self.observe()?))
    }

    /// Entries the ring holds.
    pub fn capacity(&self) -> u32 {
        self.geo.capacity
    }

    /// This side's private producer index (the next entry's free-running index).
    pub fn index(&self) -> u32 {
        self.producer
    }

    /// Whether the consumer's index was found impossible (every operation now fails).
    pub fn is_corrupt(&self) -> bool {
        self.corrupt
    }
}

/// Entries written by [`Producer::push_batched`] are published when the half goes at the
/// latest: none is left written but invisible to the consumer.
impl<M: SharedMem + ?Sized, const SLOT_SIZE: usize> Drop for Producer<'_, M, SLOT_SIZE> {
    fn drop(&mut self) {
        self.publish();
    }
}

/// The reading half of a ring: owns the `consumer` index.
///
/// [`Self::pop`] frees each slot at once. [`Self::pop_batched`] copies the entry out but
/// frees its slot (one write of the index for the whole batch) only with
/// [`Self::release`], the next [`Self::pop`] or [`Self::skip_all`], or when the half is
/// dropped, whichever comes first (see [`Producer`]).
#[derive(Debug)]
pub struct Consumer<'m, M: SharedMem + ?Sized, const SLOT_SIZE: usize> {
    mem: &'m M,
    geo: Geometry,
    /// Index of the next slot to take. Private: published to the header, never read back.
    consumer: u32,
    /// The consumer index last written to the header (`consumer` minus the entries taken
    /// by [`Self::pop_batched`] whose slots are not yet freed).
    released: u32,
    /// The producer index last accepted. The producer may only move it forward, up to
    /// `released + capacity`; invariant: `producer_seen - released <= capacity`.
    producer_seen: u32,
    corrupt: bool,
}

impl<'m, M: SharedMem + ?Sized, const SLOT_SIZE: usize> Consumer<'m, M, SLOT_SIZE> {
    /// Sets up a fresh, empty ring at `offset` (both indexes = `start`, usually 0) and returns
    /// its consumer half. See [`Producer::init`].
    pub fn init(mem: &'m M, offset: usize, capacity: u32, start: u32) -> Result<Self, RingError> {
        let geo = Geometry::init(mem, offset, capacity, SLOT_SIZE, start)?;
        Ok(Self { mem, geo, consumer: start, released: start, producer_seen: start, corrupt: false })
    }

    /// Takes over the consumer side of an existing ring, continuing from the indexes in its
    /// header (e.g. a restarted driver VM: entries published before the restart and not
    /// consumed are delivered). Fails with [`RingError::Corrupt`] if the header holds more
    /// than `capacity` entries.
    pub fn attach(mem: &'m M, offset: usize, capacity: u32) -> Result<Self, RingError> {
        let (geo, producer, consumer) = Geometry::attach(mem, offset, capacity, SLOT_SIZE)?;
        Ok(Self { mem, geo, consumer, released: consumer, producer_seen: producer, corrupt: false })
    }

    /// Reads the producer index once, checks it and returns the number of entries available.
    #[inline]
    fn observe(&mut self) -> Result<u32, RingError> {
        if self.corrupt {
            return Err(RingError::Corrupt);
        }
        let producer = self.mem.read_u32(self.geo.producer_index());
        // Slot reads must come after this read, or they could see the slot's old contents.
        fence(Ordering::Acquire);
        // Legitimate values of `producer` lie in `producer_seen..=released + capacity` (it
        // only moves forward, into slots freed): wrapping differences, as in
        // `Producer::observe`. `consumer <= producer_seen`, so what is available then is at
        // most `capacity`.
        let limit = self.released.wrapping_add(self.geo.capacity);
        if producer.wrapping_sub(self.producer_seen) > limit.wrapping_sub(self.producer_seen) {
            self.corrupt = true;
            return Err(RingError::Corrupt);
        }
        self.producer_seen = producer;
        Ok(producer.wrapping_sub(self.consumer))
    }

    /// Copies the oldest entry out of the ring and frees its slot (and those of entries
    /// taken by [`Self::pop_batched`] before it); `Ok(None)` if the ring is empty. The copy
    /// is private: validate it, the producer may already be rewriting the slot.
    /// [`RingError::Corrupt`] if the producer's index is impossible (nothing is read).
    #[inline]
    pub fn pop(&mut self) -> Result<Option<[u8; SLOT_SIZE]>, RingError> {
        if self.observe()? == 0 {
            return Ok(None);
        }
        let entry = self.take();
        self.release();
        Ok(Some(entry))
    }

    /// Copies the oldest entry out (an entry already known to be there); its slot stays
    /// taken until [`Self::release`].
    #[inline]
    fn take(&mut self) -> [u8; SLOT_SIZE] {
        let entry = read_slot(self.mem, self.geo.slot_offset(self.consumer, SLOT_SIZE));
        self.consumer = self.consumer.wrapping_add(1);
        entry
    }

    /// Frees the slots of every entry taken so far: one write of the consumer index (none
    /// if every slot is freed already). Not on a corrupt ring (it is abandoned).
    #[inline]
    pub fn release(&mut self) {
        // The copies must be complete before the producer may reuse the slots.
        write_own_index(self.mem, self.geo.consumer_index(), self.consumer, &mut self.released, self.corrupt);
    }

    /// As [`Self::pop`], for a batch: reads the producer index only if the one read last
    /// shows no entry left (so `Ok(None)` still comes only after a fresh read, as from
    /// `pop`), and frees the slot only at [`Self::release`] (or the next `pop`, or the drop
    /// of this half): a batch of pops after [`Self::attach`] or a fresh look reads the
    /// producer index once and writes the consumer index once. The entries below the index
    /// read last were published before it (the producer's release fence) and the acquire
    /// fence after that read orders these slot reads after it. A corrupt index is found at
    /// the next read.
    #[inline]
    pub fn pop_batched(&mut self) -> Result<Option<[u8; SLOT_SIZE]>, RingError> {
        if self.corrupt {
            return Err(RingError::Corrupt);
        }
        if self.producer_seen == self.consumer && self.observe()? == 0 {
            return Ok(None);
        }
        Ok(Some(self.take()))
    }

    /// Drops every entry waiting (frees their slots unread); returns how many. A restarted
    /// server calls this at attach: its client replays whatever it has not seen answered.
    pub fn skip_all(&mut self) -> Result<u32, RingError> {
        let available = self.observe()?;
        // `observe` accepted `producer_seen`: at most `capacity` past the freed slots.
        self.consumer = self.producer_seen;
        self.release();
        Ok(available)
    }

    /// Entries waiting to be popped.
    pub fn len(&mut self) -> Result<u32, RingError> {
        self.observe()
    }

    /// Whether no entry is waiting.
    pub fn is_empty(&mut self) -> Result<bool, RingError> {
        Ok(self.observe()? == 0)
    }

    /// Slots the producer still has free (as far as this side knows).
    pub fn free(&mut self) -> Result<u32, RingError> {
        Ok(self.geo.capacity.saturating_sub(self.observe()?))
    }

    /// Entries the ring holds.
    pub fn capacity(&self) -> u32 {
        self.geo.capacity
    }

    /// This side's private consumer index (the next entry's free-running index).
    pub fn index(&self) -> u32 {
        self.consumer
    }

    /// Whether the producer's index was found impossible (every operation now fails).
    pub fn is_corrupt(&self) -> bool {
        self.corrupt
    }
}

/// Slots of entries taken by [`Consumer::pop_batched`] are freed when the half goes at the
/// latest: the producer never waits for room that is already free.
impl<M: SharedMem + ?Sized, const SLOT_SIZE: usize> Drop for Consumer<'_, M, SLOT_SIZE> {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::RefCell;
    use proptest::prelude::*;
    use std::collections::VecDeque;
    use std::vec;
    use std::vec::Vec;

    const S: usize = 16;

    /// Shared memory that panics on any access outside `allowed` (the ring under test), and
    /// can answer header reads from a script of hostile values instead of memory.
    struct CheckedMem {
        bytes: RefCell<Vec<u8>>,
        allowed: core::ops::Range<usize>,
        /// Values returned (in order) by `read_u32` before falling back to memory.
        script: RefCell<VecDeque<u32>>,
    }

    impl CheckedMem {
        fn new(len: usize, allowed: core::ops::Range<usize>) -> Self {
            Self { bytes: RefCell::new(vec![0xA5; len]), allowed, script: RefCell::new(VecDeque::new()) }
        }

        fn check(&self, offset: usize, len: usize) {
            let end = offset.checked_add(len).expect("access range overflows");
            assert!(
                offset >= self.allowed.start && end <= self.allowed.end,
                "access {offset}..{end} outside the ring {:?}",
                self.allowed
            );
        }

        fn poke(&self, offset: usize, v: u32) {
            self.bytes.borrow_mut()[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
        }

        fn peek(&self, offset: usize) -> u32 {
            u32::from_le_bytes(self.bytes.borrow()[offset..offset + 4].try_into().unwrap())
        }
    }

    impl SharedMem for CheckedMem {
        fn read_u32(&self, offset: usize) -> u32 {
            self.check(offset, 4);
            assert_eq!(offset % 4, 0, "unaligned index access");
            if let Some(v) = self.script.borrow_mut().pop_front() {
                return v;
            }
            self.peek(offset)
        }
        fn write_u32(&self, offset: usize, v: u32) {
            self.check(offset, 4);
            assert_eq!(offset % 4, 0, "unaligned index access");
            self.poke(offset, v);
        }
        fn read_bytes(&self, offset: usize, out: &mut [u8]) {
            self.check(offset, out.len());
            out.copy_from_slice(&self.bytes.borrow()[offset..offset + out.len()]);
        }
        fn write_bytes(&self, offset: usize, data: &[u8]) {
            self.check(offset, data.len());
            self.bytes.borrow_mut()[offset..offset + data.len()].copy_from_slice(data);
        }
        fn len(&self) -> usize {
            self.bytes.borrow().len()
        }
    }

    /// A ring at `offset` with guard bytes on both sides.
    fn mem_for(offset: usize, capacity: u32) -> CheckedMem {
        let size = ring_size(capacity, S).unwrap();
        CheckedMem::new(offset + size + 64, offset..offset + size)
    }

    fn entry(n: u32) -> [u8; S] {
        let mut e = [0u8; S];
        e[..4].copy_from_slice(&n.to_le_bytes());
        e[4..8].copy_from_slice(&(!n).to_le_bytes());
        e[S - 1] = n as u8;
        e
    }

    #[test]
    fn fifo_across_index_wrap_around() {
        let mem = mem_for(64, 4);
        let start = u32::MAX - 5;
        let mut p = Producer::<_, S>::init(&mem, 64, 4, start).unwrap();
        let mut c = Consumer::<_, S>::attach(&mem, 64, 4).unwrap();
        let mut next_in = 0u32;
        let mut next_out = 0u32;
        // Varying batch sizes so that full, partial and empty rings all cross the wrap.
        for round in 0..40u32 {
            let batch = round % 5;
            for _ in 0..batch {
                match p.push(&entry(next_in)) {
                    Ok(()) => next_in += 1,
                    Err(RingError::Full) => break,
                    Err(e) => panic!("{e}"),
                }
            }
            for _ in 0..(round % 3 + 1) {
                match c.pop().unwrap() {
                    Some(e) => {
                        assert_eq!(e, entry(next_out));
                        next_out += 1;
                    }
                    None => assert_eq!(next_in, next_out),
                }
            }
        }
        while let Some(e) = c.pop().unwrap() {
            assert_eq!(e, entry(next_out));
            next_out += 1;
        }
        assert_eq!(next_in, next_out);
        assert!(next_in > 20);
        // The indexes really wrapped.
        assert!(p.index() < start && c.index() == p.index());
    }

    #[test]
    fn full_and_empty() {
        let mem = mem_for(0, 8);
        let mut p = Producer::<_, S>::init(&mem, 0, 8, 0).unwrap();
        let mut c = Consumer::<_, S>::attach(&mem, 0, 8).unwrap();
        assert_eq!(c.pop(), Ok(None));
        assert_eq!(c.is_empty(), Ok(true));
        assert_eq!(p.free(), Ok(8));
        for i in 0..8 {
            p.push(&entry(i)).unwrap();
            assert_eq!(p.len(), Ok(i + 1));
        }
        assert_eq!(p.push(&entry(99)), Err(RingError::Full));
        assert_eq!(p.free(), Ok(0));
        assert_eq!(c.len(), Ok(8));
        assert_eq!(c.free(), Ok(0));
        assert_eq!(c.pop(), Ok(Some(entry(0))));
        // One slot free again: the push goes into the slot just emptied.
        p.push(&entry(8)).unwrap();
        assert_eq!(p.push(&entry(99)), Err(RingError::Full));
        for i in 1..=8 {
            assert_eq!(c.pop(), Ok(Some(entry(i))));
        }
        assert_eq!(c.pop(), Ok(None));
        assert_eq!(p.is_empty(), Ok(true));
        assert!(!p.is_corrupt() && !c.is_corrupt());
    }

    #[test]
    fn capacity_one_works() {
        let mem = mem_for(4, 1);
        let mut p = Producer::<_, S>::init(&mem, 4, 1, u32::MAX).unwrap();
        let mut c = Consumer::<_, S>::attach(&mem, 4, 1).unwrap();
        for i in 0..5 {
            p.push(&entry(i)).unwrap();
            assert_eq!(p.push(&entry(i)), Err(RingError::Full));
            assert_eq!(c.pop(), Ok(Some(entry(i))));
        }
    }

    #[test]
    fn corrupt_producer_index_is_detected_without_touching_memory_outside() {
        let mem = mem_for(32, 4);
        let mut c = Consumer::<_, S>::init(&mem, 32, 4, 10).unwrap();
        // More than capacity ahead of the consumer.
        mem.poke(32 + PRODUCER_INDEX_OFFSET, 15);
        assert_eq!(c.pop(), Err(RingError::Corrupt));
        assert!(c.is_corrupt());
        // Sticky, even once the header looks sane again.
        mem.poke(32 + PRODUCER_INDEX_OFFSET, 11);
        assert_eq!(c.pop(), Err(RingError::Corrupt));
        assert_eq!(c.len(), Err(RingError::Corrupt));
        // The consumer index was never advanced.
        assert_eq!(mem.peek(32 + CONSUMER_INDEX_OFFSET), 10);
    }

    #[test]
    fn producer_index_moving_backwards_is_corrupt() {
        let mem = mem_for(0, 4);
        let mut c = Consumer::<_, S>::init(&mem, 0, 4, 0).unwrap();
        mem.poke(PRODUCER_INDEX_OFFSET, 3);
        assert_eq!(c.len(), Ok(3));
        mem.poke(PRODUCER_INDEX_OFFSET, 2);
        assert_eq!(c.pop(), Err(RingError::Corrupt));
        // "Behind the consumer" is the same thing as "far ahead": also corrupt.
        let mut c = Consumer::<_, S>::init(&mem, 0, 4, 5).unwrap();
        mem.poke(PRODUCER_INDEX_OFFSET, 4);
        assert_eq!(c.pop(), Err(RingError::Corrupt));
    }

    #[test]
    fn corrupt_consumer_index_is_detected() {
        let mem = mem_for(0, 4);
        let mut p = Producer::<_, S>::init(&mem, 0, 4, 0).unwrap();
        p.push(&entry(0)).unwrap();
        p.push(&entry(1)).unwrap();
        // Consumer claims to have taken more than was ever pushed.
        mem.poke(CONSUMER_INDEX_OFFSET, 3);
        assert_eq!(p.push(&entry(2)), Err(RingError::Corrupt));
        assert!(p.is_corrupt());
        assert_eq!(mem.peek(PRODUCER_INDEX_OFFSET), 2, "nothing published after corruption");

        // Consumer moving backwards.
        let mut p = Producer::<_, S>::init(&mem, 0, 4, 0).unwrap();
        p.push(&entry(0)).unwrap();
        p.push(&entry(1)).unwrap();
        mem.poke(CONSUMER_INDEX_OFFSET, 2);
        assert_eq!(p.free(), Ok(4));
        mem.poke(CONSUMER_INDEX_OFFSET, 1);
        assert_eq!(p.free(), Err(RingError::Corrupt));
    }

    #[test]
    fn batches_are_seen_only_once_published_or_dropped() {
        let cap = 8;
        let mem = mem_for(16, cap);
        let mut p = Producer::<_, S>::init(&mem, 16, cap, 0).unwrap();
        let mut c = Consumer::<_, S>::attach(&mem, 16, cap).unwrap();
        p.push_batched(&entry(1)).unwrap();
        p.push_batched(&entry(2)).unwrap();
        assert_eq!(mem.peek(16 + PRODUCER_INDEX_OFFSET), 0, "nothing published yet");
        assert_eq!(c.pop_batched().unwrap(), None);
        p.publish();
        assert_eq!(mem.peek(16 + PRODUCER_INDEX_OFFSET), 2);
        // A plain push publishes the batch before it with itself.
        p.push_batched(&entry(3)).unwrap();
        p.push(&entry(4)).unwrap();
        assert_eq!(mem.peek(16 + PRODUCER_INDEX_OFFSET), 4);
        assert_eq!(c.pop_batched().unwrap(), Some(entry(1)));
        assert_eq!(c.pop_batched().unwrap(), Some(entry(2)));
        assert_eq!(mem.peek(16 + CONSUMER_INDEX_OFFSET), 0, "no slot freed yet");
        assert_eq!(p.free().unwrap(), cap - 4);
        c.release();
        assert_eq!(mem.peek(16 + CONSUMER_INDEX_OFFSET), 2);
        assert_eq!(p.free().unwrap(), cap - 2);
        // Dropping either half publishes what it held back.
        assert_eq!(c.pop_batched().unwrap(), Some(entry(3)));
        drop(c);
        assert_eq!(mem.peek(16 + CONSUMER_INDEX_OFFSET), 3);
        p.push_batched(&entry(5)).unwrap();
        drop(p);
        assert_eq!(mem.peek(16 + PRODUCER_INDEX_OFFSET), 5);
        let mut c = Consumer::<_, S>::attach(&mem, 16, cap).unwrap();
        assert_eq!(c.pop().unwrap(), Some(entry(4)));
        assert_eq!(c.pop().unwrap(), Some(entry(5)));
    }

    #[test]
    fn a_peer_index_into_what_was_held_back_is_corrupt() {
        let cap = 8;
        // The consumer claims entries written but not yet published.
        let mem = mem_for(16, cap);
        let mut p = Producer::<_, S>::init(&mem, 16, cap, 0).unwrap();
        p.push(&entry(1)).unwrap();
        p.push_batched(&entry(2)).unwrap();
        mem.poke(16 + CONSUMER_INDEX_OFFSET, 2);
        assert_eq!(p.free(), Err(RingError::Corrupt));
        // The producer claims slots the consumer copied out but has not freed.
        let mem = mem_for(16, cap);
        let mut p = Producer::<_, S>::init(&mem, 16, cap, 0).unwrap();
        let mut c = Consumer::<_, S>::attach(&mem, 16, cap).unwrap();
        for i in 0..cap {
            p.push(&entry(i)).unwrap();
        }
        assert_eq!(c.pop_batched().unwrap(), Some(entry(0)));
        c.release();
        assert_eq!(c.pop_batched().unwrap(), Some(entry(1)));
        // One slot freed: the producer may be at most one past a full ring, not two.
        mem.poke(16 + PRODUCER_INDEX_OFFSET, cap + 1);
        assert_eq!(c.len(), Ok(cap - 1));
        mem.poke(16 + PRODUCER_INDEX_OFFSET, cap + 2);
        assert_eq!(c.len(), Err(RingError::Corrupt));
    }

    #[test]
    fn own_index_overwritten_by_peer_is_ignored() {
        let mem = mem_for(0, 4);
        let mut p = Producer::<_, S>::init(&mem, 0, 4, 0).unwrap();
        let mut c = Consumer::<_, S>::attach(&mem, 0, 4).unwrap();
        p.push(&entry(0)).unwrap();
        // The consumer scribbles on the producer's index: the producer keeps its own copy.
        mem.poke(PRODUCER_INDEX_OFFSET, 1000);
        mem.poke(PRODUCER_INDEX_OFFSET, 1);
        p.push(&entry(1)).unwrap();
        assert_eq!(mem.peek(PRODUCER_INDEX_OFFSET), 2);
        assert_eq!(c.pop(), Ok(Some(entry(0))));
        // And the producer scribbles on the consumer's: the consumer keeps its own copy.
        mem.poke(CONSUMER_INDEX_OFFSET, 0);
        assert_eq!(c.pop(), Ok(Some(entry(1))));
        assert_eq!(mem.peek(CONSUMER_INDEX_OFFSET), 2);
    }

    #[test]
    fn attach_continues_and_rejects_corrupt_headers() {
        let mem = mem_for(0, 4);
        let mut p = Producer::<_, S>::init(&mem, 0, 4, 7).unwrap();
        p.push(&entry(1)).unwrap();
        p.push(&entry(2)).unwrap();
        let mut c = Consumer::<_, S>::attach(&mem, 0, 4).unwrap();
        assert_eq!(c.pop(), Ok(Some(entry(1))));
        // A restarted consumer picks up where the last one stopped.
        let mut c = Consumer::<_, S>::attach(&mem, 0, 4).unwrap();
        assert_eq!(c.pop(), Ok(Some(entry(2))));
        // A restarted producer too.
        let mut p = Producer::<_, S>::attach(&mem, 0, 4).unwrap();
        p.push(&entry(3)).unwrap();
        assert_eq!(c.pop(), Ok(Some(entry(3))));

        mem.poke(PRODUCER_INDEX_OFFSET, 100);
        mem.poke(CONSUMER_INDEX_OFFSET, 95);
        assert_eq!(Consumer::<_, S>::attach(&mem, 0, 4).err(), Some(RingError::Corrupt));
        assert_eq!(Producer::<_, S>::attach(&mem, 0, 4).err(), Some(RingError::Corrupt));
    }

    #[test]
    fn bad_layouts_are_rejected() {
        let mem = mem_for(0, 4);
        let len = mem.len();
        for cap in [0, 3, 6, 2048, u32::MAX] {
            assert_eq!(Producer::<_, S>::init(&mem, 0, cap, 0).err(), Some(RingError::BadLayout), "capacity {cap}");
        }
        assert_eq!(Producer::<_, S>::init(&mem, 2, 4, 0).err(), Some(RingError::BadLayout), "unaligned");
        assert_eq!(Consumer::<_, S>::attach(&mem, len, 1).err(), Some(RingError::BadLayout), "past the end");
        assert_eq!(Consumer::<_, S>::attach(&mem, usize::MAX - 3, 1).err(), Some(RingError::BadLayout), "overflow");
        assert_eq!(Consumer::<_, 0>::attach(&mem, 0, 1).err(), Some(RingError::BadLayout), "zero-size slots");
        // Exactly fitting is fine.
        let size = ring_size(4, S).unwrap();
        let exact = CheckedMem::new(size, 0..size);
        assert!(Producer::<_, S>::init(&exact, 0, 4, 0).is_ok());
        let short = CheckedMem::new(size - 1, 0..size - 1);
        assert_eq!(Producer::<_, S>::init(&short, 0, 4, 0).err(), Some(RingError::BadLayout));
    }

    #[test]
    fn byte_mem_is_total() {
        let mut bytes = [0u8; 8];
        let m = ByteMem::new(&mut bytes);
        m.write_u32(2, 0x0403_0201);
        assert_eq!(m.read_u32(2), 0x0403_0201);
        m.write_u32(6, 0xFFFF_FFFF); // half outside: the inside half is written
        assert_eq!(m.read_u32(6), 0xFFFF);
        assert_eq!(m.read_u32(usize::MAX), 0);
        m.write_bytes(usize::MAX - 1, &[1, 2, 3]);
        assert_eq!(m.len(), 8);
        assert!(!m.is_empty());
        assert_eq!(bytes, [0, 0, 1, 2, 3, 4, 0xFF, 0xFF]);
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Step {
        Push,
        Pop,
        /// [`Producer::push_batched`] / [`Consumer::pop_batched`].
        PushBatched,
        PopBatched,
        /// [`Producer::publish`] / [`Consumer::release`].
        Publish,
        Release,
    }

    #[derive(Clone, Debug)]
    enum HostileStep {
        Push,
        Pop,
        PushBatched,
        PopBatched,
        Publish,
        Release,
        Len,
        /// Overwrite a header word with an arbitrary value.
        Scribble {
            consumer_word: bool,
            value: u32,
        },
        /// Make the next header reads return these values, whatever memory holds.
        Script(Vec<u32>),
    }

    fn hostile_step() -> impl Strategy<Value = HostileStep> {
        prop_oneof![
            Just(HostileStep::Push),
            Just(HostileStep::Pop),
            Just(HostileStep::PushBatched),
            Just(HostileStep::PopBatched),
            Just(HostileStep::Publish),
            Just(HostileStep::Release),
            Just(HostileStep::Len),
            (any::<bool>(), any::<u32>())
                .prop_map(|(consumer_word, value)| HostileStep::Scribble { consumer_word, value }),
            proptest::collection::vec(any::<u32>(), 1..4).prop_map(HostileStep::Script),
        ]
    }

    proptest! {
        #[test]
        fn interleavings_match_a_queue(
            cap_log in 0u32..5,
            start in prop_oneof![any::<u32>(), (u32::MAX - 40)..=u32::MAX],
            steps in proptest::collection::vec(
                prop_oneof![
                    Just(Step::Push),
                    Just(Step::Pop),
                    Just(Step::PushBatched),
                    Just(Step::PopBatched),
                    Just(Step::Publish),
                    Just(Step::Release),
                ],
                0..200,
            ),
            look in any::<bool>(),
        ) {
            let cap = 1u32 << cap_log;
            let mem = mem_for(16, cap);
            let mut p = Producer::<_, S>::init(&mem, 16, cap, start).unwrap();
            let mut c = Consumer::<_, S>::attach(&mem, 16, cap).unwrap();
            // Every entry between the consumer index in the header and the producer's own:
            // the first `taken` copied out by the consumer (slots not yet freed), the last
            // `unpublished` not yet visible to it.
            let mut model = VecDeque::new();
            let (mut taken, mut unpublished) = (0usize, 0usize);
            let mut n = 0u32;
            for step in steps {
                match step {
                    Step::Push | Step::PushBatched => {
                        let r = if step == Step::Push { p.push(&entry(n)) } else { p.push_batched(&entry(n)) };
                        if model.len() == cap as usize {
                            prop_assert_eq!(r, Err(RingError::Full));
                        } else {
                            prop_assert_eq!(r, Ok(()));
                            model.push_back(n);
                            // A push publishes the batch before it too.
                            unpublished = if step == Step::Push { 0 } else { unpublished + 1 };
                        }
                        n += 1;
                    }
                    Step::Pop | Step::PopBatched => {
                        let visible = model.len() - taken - unpublished;
                        let want = if visible > 0 { Some(entry(model[taken])) } else { None };
                        let got = if step == Step::Pop { c.pop().unwrap() } else { c.pop_batched().unwrap() };
                        prop_assert_eq!(got, want);
                        taken += usize::from(want.is_some());
                        if step == Step::Pop && want.is_some() {
                            model.drain(..taken);
                            taken = 0;
                        }
                    }
                    Step::Publish => {
                        p.publish();
                        unpublished = 0;
                    }
                    Step::Release => {
                        c.release();
                        model.drain(..taken);
                        taken = 0;
                    }
                }
                // The cached views are bounds: never more room than there is.
                prop_assert!(p.free_seen() as usize <= cap as usize - model.len());
                // Without a fresh look in between, the cached operations run on old indexes.
                if look {
                    prop_assert_eq!(p.len().unwrap() as usize, model.len());
                    prop_assert_eq!(c.len().unwrap() as usize, model.len() - taken - unpublished);
                    prop_assert_eq!(p.free().unwrap() as usize, cap as usize - model.len());
                    prop_assert_eq!(p.free_seen() as usize, cap as usize - model.len());
                }
            }
            // Dropping the halves publishes and frees what they held back.
            let left = model.len() - taken;
            drop(p);
            drop(c);
            let mut c = Consumer::<_, S>::attach(&mem, 16, cap).unwrap();
            prop_assert_eq!(c.len().unwrap() as usize, left);
        }

        #[test]
        fn hostile_headers_never_panic_or_escape_the_ring(
            cap_log in 0u32..5,
            header in any::<[u32; 2]>(),
            attach in any::<bool>(),
            steps in proptest::collection::vec(hostile_step(), 0..100),
        ) {
            let cap = 1u32 << cap_log;
            let offset = 8;
            // Two halves on two copies of the same ring: the "peer" of each is the test.
            let pmem = mem_for(offset, cap);
            let cmem = mem_for(offset, cap);
            for m in [&pmem, &cmem] {
                m.poke(offset + PRODUCER_INDEX_OFFSET, header[0]);
                m.poke(offset + CONSUMER_INDEX_OFFSET, header[1]);
            }
            let (mut p, mut c) = if attach {
                match (Producer::<_, S>::attach(&pmem, offset, cap), Consumer::<_, S>::attach(&cmem, offset, cap)) {
                    (Ok(p), Ok(c)) => (p, c),
                    (p, c) => {
                        // Only an impossible header may be refused.
                        prop_assert!(header[0].wrapping_sub(header[1]) > cap);
                        prop_assert!(p.is_err() && c.is_err());
                        return Ok(());
                    }
                }
            } else {
                (Producer::<_, S>::init(&pmem, offset, cap, header[0]).unwrap(),
                 Consumer::<_, S>::init(&cmem, offset, cap, header[1]).unwrap())
            };
            for step in steps {
                match step {
                    HostileStep::Push => {
                        let _ = p.push(&entry(1));
                    }
                    HostileStep::Pop => {
                        let _ = c.pop();
                    }
                    HostileStep::PushBatched => {
                        let _ = p.push_batched(&entry(1));
                        prop_assert!(p.free_seen() <= cap);
                    }
                    HostileStep::PopBatched => {
                        let _ = c.pop_batched();
                    }
                    HostileStep::Publish => p.publish(),
                    HostileStep::Release => c.release(),
                    HostileStep::Len => {
                        if let Ok(n) = p.len() {
                            prop_assert!(n <= cap);
                        }
                        if let Ok(n) = c.len() {
                            prop_assert!(n <= cap);
                        }
                    }
                    HostileStep::Scribble { consumer_word, value } => {
                        let at = offset + if consumer_word { CONSUMER_INDEX_OFFSET } else { PRODUCER_INDEX_OFFSET };
                        pmem.poke(at, value);
                        cmem.poke(at, value);
                    }
                    HostileStep::Script(values) => {
                        pmem.script.borrow_mut().extend(values.iter().copied());
                        cmem.script.borrow_mut().extend(values.iter().copied());
                    }
                }
            }
            // Once corrupt, always corrupt.
            if p.is_corrupt() {
                prop_assert_eq!(p.push(&entry(0)), Err(RingError::Corrupt));
            }
            if c.is_corrupt() {
                prop_assert_eq!(c.pop(), Err(RingError::Corrupt));
                prop_assert_eq!(c.pop_batched(), Err(RingError::Corrupt));
            }
            if p.is_corrupt() {
                prop_assert_eq!(p.push_batched(&entry(0)), Err(RingError::Corrupt));
            }
        }
    }
}

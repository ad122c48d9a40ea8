//! The split virtqueue (virtio 1.1 §2.6) as the device sees it, over guest memory.
//!
//! The driver (the guest) owns the three rings and may write any value into them at any time,
//! so nothing read from them is trusted: the available index may not run more than the queue
//! size ahead of what the device consumed, heads and `next` links must be inside their table,
//! every `addr + len` must not overflow, an indirect table must be a non-empty multiple of 16
//! bytes and not nested (§2.6.5.3.1: "The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag
//! within an indirect descriptor"), and a chain may not be longer than the queue size (or the
//! indirect table) it lives in, which is also what bounds the walk when the guest links
//! descriptors into a loop. Readable descriptors must come before writable ones (§2.6.4.2).
//! Guest-physical accesses go through [`GuestMemory`], which refuses anything outside RAM, so
//! a descriptor pointing elsewhere costs the guest an error, never another domain's memory.
//!
//! Ring layout (§2.6): descriptor table `16 * size` bytes (16-aligned); available ring
//! `flags u16, idx u16, ring[size] u16, used_event u16` (2-aligned); used ring
//! `flags u16, idx u16, ring[size] {id u32, len u32}, avail_event u16` (4-aligned).

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{fence, Ordering};

use super::{F_EVENT_IDX, F_INDIRECT_DESC};
use crate::memory::{GuestMemory, MemError};

/// `VIRTQ_DESC_F_NEXT`: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`: the buffer is a table of descriptors.
pub const DESC_F_INDIRECT: u16 = 4;
/// `VIRTQ_AVAIL_F_NO_INTERRUPT`: the driver does not want used-buffer notifications.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Largest split queue size (§2.6: "Queue Size ... maximum is 32768").
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Bytes per descriptor.
pub const DESC_SIZE: u64 = 16;

/// Why a queue cannot be used; the transport then sets `DEVICE_NEEDS_RESET`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// The queue is not enabled.
    NotReady,
    /// The size is 0, not a power of two, or above the device's maximum.
    BadSize {
        /// The size the driver wrote.
        size: u16,
    },
    /// A ring address is not aligned as §2.6 requires, or a ring overflows the address space.
    BadRingAddress {
        /// The address.
        addr: u64,
    },
    /// A ring access hit memory outside guest RAM.
    Memory(MemError),
    /// The available index is more than the queue size ahead of the device.
    AvailIndex {
        /// The driver's index.
        idx: u16,
        /// The device's next index.
        next: u16,
    },
    /// A head or `next` index outside its descriptor table.
    IndexOutOfRange {
        /// The index.
        index: u16,
    },
    /// The chain is longer than the queue size or the indirect table (or loops).
    ChainTooLong,
    /// `addr + len` of a descriptor overflows.
    AddressOverflow {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// An indirect descriptor without the feature, nested, with `NEXT`, or of a bad length.
    BadIndirect,
    /// A readable descriptor after a writable one.
    ReadableAfterWritable,
    /// The chain's writable bytes exceed `u32::MAX` (the used ring's length field).
    TooManyBytes,
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::NotReady => f.write_str("queue is not enabled"),
            QueueError::BadSize { size } => write!(f, "queue size {size} is not a power of two within the maximum"),
            QueueError::BadRingAddress { addr } => write!(f, "ring address {addr:#x} is misaligned or overflows"),
            QueueError::Memory(e) => write!(f, "{e}"),
            QueueError::AvailIndex { idx, next } => {
                write!(f, "available index {idx} is more than the queue size ahead of {next}")
            }
            QueueError::IndexOutOfRange { index } => write!(f, "descriptor index {index} is outside its table"),
            QueueError::ChainTooLong => f.write_str("descriptor chain is longer than its table (or loops)"),
            QueueError::AddressOverflow { addr, len } => write!(f, "buffer {addr:#x} + {len:#x} overflows"),
            QueueError::BadIndirect => f.write_str("bad indirect descriptor"),
            QueueError::ReadableAfterWritable => f.write_str("readable descriptor after a writable one"),
            QueueError::TooManyBytes => f.write_str("chain has more than 4 GiB of writable buffers"),
        }
    }
}

impl core::error::Error for QueueError {}

impl From<MemError> for QueueError {
    fn from(e: MemError) -> Self {
        QueueError::Memory(e)
    }
}

/// One buffer of a chain, checked not to overflow (not yet checked to be in RAM: every access
/// through [`GuestMemory`] is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it.
    pub writable: bool,
}

/// A descriptor chain taken from the available ring: readable buffers, then writable ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// The head index, returned in the used ring.
    pub head: u16,
    /// The buffers in order.
    pub descs: Vec<Descriptor>,
}

impl Chain {
    /// Total bytes of the readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.descs.iter().filter(|d| !d.writable).map(|d| u64::from(d.len)).sum()
    }

    /// Total bytes of the writable buffers (at most `u32::MAX`, checked by the walk).
    pub fn writable_len(&self) -> u64 {
        self.descs.iter().filter(|d| d.writable).map(|d| u64::from(d.len)).sum()
    }

    /// Whether every writable buffer lies inside guest RAM (checked, nothing written).
    pub fn writable_in_ram(&self, mem: &dyn GuestMemory) -> bool {
        self.descs
            .iter()
            .filter(|d| d.writable)
            .all(|d| usize::try_from(d.len).is_ok_and(|len| mem.check(d.addr, len).is_ok()))
    }

    /// Copies from the readable buffers, seen as one byte stream, starting at `offset`; returns
    /// how many bytes were copied (fewer than `buf.len()` at the end of the stream).
    pub fn read_at(&self, mem: &dyn GuestMemory, offset: u64, buf: &mut [u8]) -> Result<usize, MemError> {
        let mut done = 0usize;
        let mut skip = offset;
        for d in self.descs.iter().filter(|d| !d.writable) {
            if done == buf.len() {
                break;
            }
            let len = u64::from(d.len);
            if skip >= len {
                skip -= len;
                continue;
            }
            // `len - skip <= u32::MAX`, fits a usize on the 64-bit targets this builds for.
            let n = usize::try_from(len - skip).unwrap_or(usize::MAX).min(buf.len() - done);
            // `d.addr + d.len` was checked not to overflow, and `skip < len`.
            mem.read(d.addr + skip, &mut buf[done..done + n])?;
            done += n;
            skip = 0;
        }
        Ok(done)
    }

    /// Copies `data` into the writable buffers, seen as one byte stream, starting at `offset`;
    /// returns how many bytes were copied.
    pub fn write_at(&self, mem: &mut dyn GuestMemory, offset: u64, data: &[u8]) -> Result<usize, MemError> {
        let mut done = 0usize;
        let mut skip = offset;
        for d in self.descs.iter().filter(|d| d.writable) {
            if done == data.len() {
                break;
            }
            let len = u64::from(d.len);
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = usize::try_from(len - skip).unwrap_or(usize::MAX).min(data.len() - done);
            mem.write(d.addr + skip, &data[done..done + n])?;
            done += n;
            skip = 0;
        }
        Ok(done)
    }
}

fn read_u16(mem: &dyn GuestMemory, gpa: u64) -> Result<u16, MemError> {
    let mut b = [0u8; 2];
    mem.read(gpa, &mut b)?;
    Ok(u16::from_le_bytes(b))
}

/// `vring_need_event` (§2.6.7.2): whether moving the used index from `old` to `new` crossed
/// the driver's `event` index.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// One split virtqueue: the driver's configuration and the device's private indexes.
#[derive(Clone, Debug)]
pub struct Queue {
    max_size: u16,
    /// Size the driver chose (defaults to the maximum).
    pub size: u16,
    /// Descriptor table address (`queue_desc`).
    pub desc_table: u64,
    /// Available ring address (`queue_driver`).
    pub avail_ring: u64,
    /// Used ring address (`queue_device`).
    pub used_ring: u64,
    ready: bool,
    event_idx: bool,
    indirect: bool,
    next_avail: u16,
    next_used: u16,
    signalled_used: u16,
}

impl Queue {
    /// A disabled queue of at most `max_size` entries (clamped to 1..=[`MAX_QUEUE_SIZE`] and
    /// rounded down to a power of two).
    pub fn new(max_size: u16) -> Self {
        let m = max_size.clamp(1, MAX_QUEUE_SIZE);
        let max_size = 1u16 << (15 - m.leading_zeros().min(15));
        Self {
            max_size,
            size: max_size,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
            ready: false,
            event_idx: false,
            indirect: false,
            next_avail: 0,
            next_used: 0,
            signalled_used: 0,
        }
    }

    /// Back to the state after [`Queue::new`].
    pub fn reset(&mut self) {
        *self = Self::new(self.max_size);
    }

    /// The largest size the device accepts.
    pub fn max_size(&self) -> u16 {
        self.max_size
    }

    /// Whether the queue is enabled.
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// The device's next available-ring index.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// The device's next used-ring index.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    /// Enables the queue with the negotiated `features` after checking the size and the ring
    /// addresses (alignment per §2.6 Table 2.2, no overflow).
    pub fn enable(&mut self, features: u64) -> Result<(), QueueError> {
        let size = self.size;
        if size == 0 || !size.is_power_of_two() || size > self.max_size {
            return Err(QueueError::BadSize { size });
        }
        let n = u64::from(size);
        for (addr, align, len) in
            [(self.desc_table, 16, DESC_SIZE * n), (self.avail_ring, 2, 6 + 2 * n), (self.used_ring, 4, 6 + 8 * n)]
        {
            if addr % align != 0 || addr.checked_add(len).is_none() {
                return Err(QueueError::BadRingAddress { addr });
            }
        }
        self.event_idx = features & F_EVENT_IDX != 0;
        self.indirect = features & F_INDIRECT_DESC != 0;
        self.next_avail = 0;
        self.next_used = 0;
        self.signalled_used = 0;
        self.ready = true;
        Ok(())
    }

    // Ring offsets below: `enable` checked that every ring's end fits in a u64 and indexes
    // are reduced modulo `size`, so these additions cannot overflow.
    fn avail_entry(&self, i: u16) -> u64 {
        self.avail_ring + 4 + 2 * u64::from(i % self.size)
    }

    fn used_event_addr(&self) -> u64 {
        self.avail_ring + 4 + 2 * u64::from(self.size)
    }

    fn avail_event_addr(&self) -> u64 {
        self.used_ring + 4 + 8 * u64::from(self.size)
    }

    /// Number of chains the driver has made available and the device not taken yet.
    pub fn pending(&self, mem: &dyn GuestMemory) -> Result<u16, QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        let idx = read_u16(mem, self.avail_ring + 2)?;
        let pending = idx.wrapping_sub(self.next_avail);
        if pending > self.size {
            return Err(QueueError::AvailIndex { idx, next: self.next_avail });
        }
        Ok(pending)
    }

    /// Takes the next available chain, if any. With `EVENT_IDX`, an empty ring makes the device
    /// ask to be notified of the next one (`avail_event`) and look once more, so a chain the
    /// driver added meanwhile is not missed.
    pub fn pop(&mut self, mem: &mut dyn GuestMemory) -> Result<Option<Chain>, QueueError> {
        let mut pending = self.pending(mem)?;
        if pending == 0 && self.event_idx {
            mem.write(self.avail_event_addr(), &self.next_avail.to_le_bytes())?;
            // The driver writes idx then reads avail_event; we write avail_event then read idx
            // (§2.6.7.2): a full fence so neither side misses the other.
            fence(Ordering::SeqCst);
            pending = self.pending(mem)?;
        }
        if pending == 0 {
            return Ok(None);
        }
        // The ring entry must be read after the index that published it.
        fence(Ordering::Acquire);
        let head = read_u16(mem, self.avail_entry(self.next_avail))?;
        let chain = self.walk(mem, head)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(chain))
    }

    /// Follows the chain starting at `head`, with every check of the module doc.
    fn walk(&self, mem: &dyn GuestMemory, head: u16) -> Result<Chain, QueueError> {
        if head >= self.size {
            return Err(QueueError::IndexOutOfRange { index: head });
        }
        let mut descs = Vec::new();
        let mut table = self.desc_table;
        let mut table_len = self.size;
        let mut in_indirect = false;
        let mut idx = head;
        // Descriptors visited in the current table: a chain visiting more than the table
        // holds has looped.
        let mut visited: u32 = 0;
        let mut writable_total: u64 = 0;
        let mut seen_writable = false;
        loop {
            visited += 1;
            if visited > u32::from(table_len) {
                return Err(QueueError::ChainTooLong);
            }
            let at = u64::from(idx)
                .checked_mul(DESC_SIZE)
                .and_then(|o| table.checked_add(o))
                .ok_or(QueueError::BadRingAddress { addr: table })?;
            let mut raw = [0u8; 16];
            mem.read(at, &mut raw)?;
            let addr = u64::from_le_bytes([raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7]]);
            let len = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            let next = u16::from_le_bytes([raw[14], raw[15]]);
            if addr.checked_add(u64::from(len)).is_none() {
                return Err(QueueError::AddressOverflow { addr, len });
            }
            if flags & DESC_F_INDIRECT != 0 {
                let entries = len / DESC_SIZE as u32;
                if !self.indirect
                    || in_indirect
                    || flags & DESC_F_NEXT != 0
                    || len % DESC_SIZE as u32 != 0
                    || entries == 0
                    || entries > u32::from(self.size)
                {
                    return Err(QueueError::BadIndirect);
                }
                table = addr;
                // `entries <= size <= 32768`.
                table_len = entries as u16;
                in_indirect = true;
                idx = 0;
                visited = 0;
                continue;
            }
            let writable = flags & DESC_F_WRITE != 0;
            if writable {
                seen_writable = true;
                writable_total += u64::from(len);
                if writable_total > u64::from(u32::MAX) {
                    return Err(QueueError::TooManyBytes);
                }
            } else if seen_writable {
                return Err(QueueError::ReadableAfterWritable);
            }
            descs.push(Descriptor { addr, len, writable });
            if flags & DESC_F_NEXT == 0 {
                break;
            }
            if next >= table_len {
                return Err(QueueError::IndexOutOfRange { index: next });
            }
            idx = next;
        }
        Ok(Chain { head, descs })
    }

    /// Returns chain `head` to the driver with `len` bytes written.
    pub fn push_used(&mut self, mem: &mut dyn GuestMemory, head: u16, len: u32) -> Result<(), QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        let at = self.used_ring + 4 + 8 * u64::from(self.next_used % self.size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write(at, &elem)?;
        // The element must be visible before the index that publishes it (§2.6.8.2).
        fence(Ordering::Release);
        self.next_used = self.next_used.wrapping_add(1);
        mem.write(self.used_ring + 2, &self.next_used.to_le_bytes())?;
        Ok(())
    }

    /// Whether the driver wants a used-buffer notification for what was pushed since the last
    /// call (§2.6.7.2: `used_event` with `EVENT_IDX`, else the `NO_INTERRUPT` flag).
    pub fn needs_notification(&mut self, mem: &dyn GuestMemory) -> Result<bool, QueueError> {
        if !self.ready {
            return Ok(false);
        }
        // The used index write must be ordered before the read of the driver's suppression.
        fence(Ordering::SeqCst);
        let old = self.signalled_used;
        let new = self.next_used;
        self.signalled_used = new;
        if old == new {
            return Ok(false);
        }
        if self.event_idx {
            let event = read_u16(mem, self.used_event_addr())?;
            Ok(need_event(event, new, old))
        } else {
            Ok(read_u16(mem, self.avail_ring)? & AVAIL_F_NO_INTERRUPT == 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::VecMemory;
    use proptest::prelude::*;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x3000;
    const USED: u64 = 0x4000;
    const RAM: usize = 0x10000;

    fn setup(size: u16, features: u64) -> (Queue, VecMemory) {
        let mut q = Queue::new(256);
        q.size = size;
        q.desc_table = DESC;
        q.avail_ring = AVAIL;
        q.used_ring = USED;
        q.enable(features).unwrap();
        (q, VecMemory::new(0, RAM))
    }

    fn desc(mem: &mut VecMemory, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        mem.write(table + 16 * u64::from(i), &b).unwrap();
    }

    /// Makes `head` available as entry `idx` and publishes `idx + 1`.
    fn offer(mem: &mut VecMemory, size: u16, idx: u16, head: u16) {
        mem.write(AVAIL + 4 + 2 * u64::from(idx % size), &head.to_le_bytes()).unwrap();
        mem.write(AVAIL + 2, &idx.wrapping_add(1).to_le_bytes()).unwrap();
    }

    fn u16_at(mem: &VecMemory, gpa: u64) -> u16 {
        let mut b = [0u8; 2];
        mem.read(gpa, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    #[test]
    fn chain_round_trip_and_streams() {
        let (mut q, mut mem) = setup(8, 0);
        assert_eq!(q.pop(&mut mem), Ok(None));
        desc(&mut mem, DESC, 3, 0x8000, 4, DESC_F_NEXT, 5);
        desc(&mut mem, DESC, 5, 0x9000, 3, DESC_F_NEXT, 1);
        desc(&mut mem, DESC, 1, 0xa000, 8, DESC_F_WRITE, 0);
        mem.write(0x8000, b"abcd").unwrap();
        mem.write(0x9000, b"efg").unwrap();
        offer(&mut mem, 8, 0, 3);
        let c = q.pop(&mut mem).unwrap().unwrap();
        assert_eq!(c.head, 3);
        assert_eq!((c.readable_len(), c.writable_len()), (7, 8));
        let mut buf = [0u8; 10];
        assert_eq!(c.read_at(&mem, 2, &mut buf), Ok(5));
        assert_eq!(&buf[..5], b"cdefg");
        assert_eq!(c.write_at(&mut mem, 6, b"XYZ"), Ok(2));
        assert_eq!(&mem.bytes()[0xa006..0xa008], b"XY");
        assert_eq!(q.pop(&mut mem), Ok(None));
        q.push_used(&mut mem, c.head, 2).unwrap();
        assert_eq!(u16_at(&mem, USED + 2), 1);
        assert_eq!(mem.read_u32(USED + 4), Ok(3));
        assert_eq!(mem.read_u32(USED + 8), Ok(2));
        assert_eq!(q.needs_notification(&mem), Ok(true));
        assert_eq!(q.needs_notification(&mem), Ok(false), "nothing new");
        // NO_INTERRUPT suppresses.
        mem.write(AVAIL, &AVAIL_F_NO_INTERRUPT.to_le_bytes()).unwrap();
        desc(&mut mem, DESC, 0, 0x8000, 1, 0, 0);
        offer(&mut mem, 8, 1, 0);
        let c = q.pop(&mut mem).unwrap().unwrap();
        q.push_used(&mut mem, c.head, 0).unwrap();
        assert_eq!(q.needs_notification(&mem), Ok(false));
    }

    #[test]
    fn hostile_chains_are_errors() {
        let (mut q, mut mem) = setup(8, 0);
        // A loop 0 -> 1 -> 0.
        desc(&mut mem, DESC, 0, 0x8000, 1, DESC_F_NEXT, 1);
        desc(&mut mem, DESC, 1, 0x8000, 1, DESC_F_NEXT, 0);
        offer(&mut mem, 8, 0, 0);
        assert_eq!(q.pop(&mut mem), Err(QueueError::ChainTooLong));
        // A self-loop.
        desc(&mut mem, DESC, 0, 0x8000, 1, DESC_F_NEXT, 0);
        assert_eq!(q.pop(&mut mem), Err(QueueError::ChainTooLong));
        // Head and next outside the table.
        offer(&mut mem, 8, 0, 8);
        assert_eq!(q.pop(&mut mem), Err(QueueError::IndexOutOfRange { index: 8 }));
        offer(&mut mem, 8, 0, 0);
        desc(&mut mem, DESC, 0, 0x8000, 1, DESC_F_NEXT, 0xffff);
        assert_eq!(q.pop(&mut mem), Err(QueueError::IndexOutOfRange { index: 0xffff }));
        // addr + len overflows.
        desc(&mut mem, DESC, 0, u64::MAX - 1, 4, 0, 0);
        assert_eq!(q.pop(&mut mem), Err(QueueError::AddressOverflow { addr: u64::MAX - 1, len: 4 }));
        // Readable after writable.
        desc(&mut mem, DESC, 0, 0x8000, 0, DESC_F_WRITE | DESC_F_NEXT, 1);
        desc(&mut mem, DESC, 1, 0x8000, 1, 0, 0);
        assert_eq!(q.pop(&mut mem), Err(QueueError::ReadableAfterWritable));
        // More than 4 GiB writable.
        desc(&mut mem, DESC, 0, 0, u32::MAX, DESC_F_WRITE | DESC_F_NEXT, 1);
        desc(&mut mem, DESC, 1, 0, 1, DESC_F_WRITE, 0);
        assert_eq!(q.pop(&mut mem), Err(QueueError::TooManyBytes));
        // Indirect without the feature.
        desc(&mut mem, DESC, 0, 0x6000, 32, DESC_F_INDIRECT, 0);
        assert_eq!(q.pop(&mut mem), Err(QueueError::BadIndirect));
        // The available index runs more than `size` ahead.
        mem.write(AVAIL + 2, &9u16.to_le_bytes()).unwrap();
        assert_eq!(q.pop(&mut mem), Err(QueueError::AvailIndex { idx: 9, next: 0 }));
        // Buffers outside RAM: the walk accepts them, every access fails.
        desc(&mut mem, DESC, 0, RAM as u64 - 2, 4, 0, 0);
        offer(&mut mem, 8, 0, 0);
        let c = q.pop(&mut mem).unwrap().unwrap();
        assert!(c.read_at(&mem, 0, &mut [0u8; 4]).is_err());
        assert_eq!(c.read_at(&mem, 4, &mut [0u8; 4]), Ok(0), "past the end of the stream");
        // Rings outside RAM.
        let mut far = Queue::new(16);
        far.desc_table = 0x10_0000;
        far.avail_ring = 0x10_0000;
        far.used_ring = 0x10_0000;
        far.enable(0).unwrap();
        assert!(matches!(far.pop(&mut mem), Err(QueueError::Memory(_))));
        assert!(matches!(far.push_used(&mut mem, 0, 0), Err(QueueError::Memory(_))));
        for e in [QueueError::NotReady, QueueError::ChainTooLong, QueueError::BadSize { size: 3 }] {
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn indirect_tables() {
        let (mut q, mut mem) = setup(8, F_INDIRECT_DESC);
        let table = 0x6000;
        desc(&mut mem, table, 0, 0x8000, 16, DESC_F_NEXT, 1);
        desc(&mut mem, table, 1, 0x9000, 512, DESC_F_WRITE | DESC_F_NEXT, 2);
        desc(&mut mem, table, 2, 0xa000, 1, DESC_F_WRITE, 0);
        desc(&mut mem, DESC, 4, table, 48, DESC_F_INDIRECT, 0);
        offer(&mut mem, 8, 0, 4);
        let c = q.pop(&mut mem).unwrap().unwrap();
        assert_eq!(c.head, 4);
        assert_eq!(c.descs.len(), 3);
        assert_eq!((c.readable_len(), c.writable_len()), (16, 513));
        let bad = |mem: &mut VecMemory, q: &mut Queue, idx: u16| {
            offer(mem, 8, idx, 4);
            q.pop(mem)
        };
        // Nested indirect.
        desc(&mut mem, table, 2, table, 16, DESC_F_INDIRECT, 0);
        assert_eq!(bad(&mut mem, &mut q, 1), Err(QueueError::BadIndirect));
        desc(&mut mem, table, 2, 0xa000, 1, DESC_F_WRITE, 0);
        // Indirect with NEXT, bad lengths, more entries than the queue.
        for (len, flags) in [
            (48, DESC_F_INDIRECT | DESC_F_NEXT),
            (0, DESC_F_INDIRECT),
            (40, DESC_F_INDIRECT),
            (16 * 9, DESC_F_INDIRECT),
        ] {
            desc(&mut mem, DESC, 4, table, len, flags, 0);
            assert_eq!(bad(&mut mem, &mut q, 1), Err(QueueError::BadIndirect), "len {len} flags {flags}");
        }
        // A loop inside the table, and a `next` past its end.
        desc(&mut mem, DESC, 4, table, 48, DESC_F_INDIRECT, 0);
        desc(&mut mem, table, 2, 0xa000, 1, DESC_F_WRITE | DESC_F_NEXT, 1);
        assert_eq!(bad(&mut mem, &mut q, 1), Err(QueueError::ChainTooLong));
        desc(&mut mem, table, 2, 0xa000, 1, DESC_F_WRITE | DESC_F_NEXT, 3);
        assert_eq!(bad(&mut mem, &mut q, 1), Err(QueueError::IndexOutOfRange { index: 3 }));
        // A table outside RAM, or overflowing.
        desc(&mut mem, DESC, 4, RAM as u64, 48, DESC_F_INDIRECT, 0);
        assert!(matches!(bad(&mut mem, &mut q, 1), Err(QueueError::Memory(_))));
        desc(&mut mem, DESC, 4, u64::MAX - 15, 32, DESC_F_INDIRECT, 0);
        assert!(matches!(bad(&mut mem, &mut q, 1), Err(QueueError::AddressOverflow { .. })));
    }

    #[test]
    fn enable_checks_configuration() {
        let mut q = Queue::new(256);
        assert_eq!(q.max_size(), 256);
        assert_eq!(Queue::new(300).max_size(), 256, "rounded down to a power of two");
        assert_eq!(Queue::new(0).max_size(), 1);
        assert_eq!(q.pop(&mut VecMemory::new(0, 16)), Err(QueueError::NotReady));
        for size in [0, 3, 512, 0xffff] {
            q.size = size;
            assert_eq!(q.enable(0), Err(QueueError::BadSize { size }));
        }
        q.size = 16;
        for (d, a, u) in [(8, 0, 0), (0, 1, 0), (0, 0, 2), (!15u64, 0, 0), (0, u64::MAX - 1, 0)] {
            q.desc_table = d;
            q.avail_ring = a;
            q.used_ring = u;
            assert!(matches!(q.enable(0), Err(QueueError::BadRingAddress { .. })), "{d:#x} {a:#x} {u:#x}");
            assert!(!q.ready());
        }
        q.desc_table = 0;
        q.avail_ring = 0x100;
        q.used_ring = 0x200;
        q.enable(0).unwrap();
        assert!(q.ready());
        q.reset();
        assert!(!q.ready());
        assert_eq!(q.size, 256);
    }

    #[test]
    fn event_idx_suppression() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(0xffff, 0, 0xffff));
        assert!(need_event(5, 10, 2));
        assert!(!need_event(10, 10, 2));
        let (mut q, mut mem) = setup(8, F_EVENT_IDX);
        let avail_event = USED + 4 + 8 * 8;
        let used_event = AVAIL + 4 + 2 * 8;
        mem.write(avail_event, &0xbeefu16.to_le_bytes()).unwrap();
        assert_eq!(q.pop(&mut mem), Ok(None));
        assert_eq!(u16_at(&mem, avail_event), 0, "device asks for a notification at its next index");
        desc(&mut mem, DESC, 0, 0x8000, 1, 0, 0);
        for i in 0..3u16 {
            offer(&mut mem, 8, i, 0);
            let c = q.pop(&mut mem).unwrap().unwrap();
            q.push_used(&mut mem, c.head, 0).unwrap();
        }
        assert_eq!(q.pop(&mut mem), Ok(None));
        assert_eq!(u16_at(&mem, avail_event), 3);
        // The driver wants an interrupt only once used passes entry 5.
        mem.write(used_event, &5u16.to_le_bytes()).unwrap();
        assert_eq!(q.needs_notification(&mem), Ok(false));
        for i in 3..6u16 {
            offer(&mut mem, 8, i, 0);
            let c = q.pop(&mut mem).unwrap().unwrap();
            q.push_used(&mut mem, c.head, 0).unwrap();
        }
        assert_eq!(q.needs_notification(&mem), Ok(true));
    }

    proptest! {
        /// Random descriptor tables and rings, with and without indirect descriptors: pop
        /// never panics, never returns more buffers than the tables can hold, and every
        /// returned buffer's range does not overflow.
        #[test]
        fn prop_random_rings_never_panic(
            descs in proptest::collection::vec((prop_oneof![any::<u64>(), 0u64..0x10000], any::<u32>(), 0u16..8, any::<u16>()), 16),
            heads in proptest::collection::vec(any::<u16>(), 1..20),
            avail_idx in prop_oneof![any::<u16>(), 0u16..20],
            features in prop_oneof![Just(0u64), Just(F_INDIRECT_DESC), Just(F_INDIRECT_DESC | F_EVENT_IDX)],
        ) {
            let (mut q, mut mem) = setup(16, features);
            for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
                // Point some indirect descriptors at the table itself.
                let addr = if flags & DESC_F_INDIRECT != 0 && addr % 2 == 0 { DESC } else { addr };
                desc(&mut mem, DESC, i as u16, addr, len, flags, next % 20);
            }
            for (i, &h) in heads.iter().enumerate() {
                mem.write(AVAIL + 4 + 2 * i as u64, &(h % 20).to_le_bytes()).unwrap();
            }
            mem.write(AVAIL + 2, &avail_idx.to_le_bytes()).unwrap();
            for _ in 0..20 {
                match q.pop(&mut mem) {
                    Ok(Some(c)) => {
                        prop_assert!(c.descs.len() <= 32);
                        prop_assert!(c.head < 16);
                        for d in &c.descs {
                            prop_assert!(d.addr.checked_add(u64::from(d.len)).is_some());
                        }
                        let mut buf = [0u8; 64];
                        let _ = c.read_at(&mem, 3, &mut buf);
                        let _ = c.write_at(&mut mem, 5, &buf);
                        prop_assert!(q.push_used(&mut mem, c.head, 1).is_ok());
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            let _ = q.needs_notification(&mem);
        }
    }
}

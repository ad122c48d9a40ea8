//! The virtio-blk device (virtio 1.1 §5.2), its back end asynchronous.
//!
//! A request is a chain: a readable 16-byte header (`type u32, reserved u32, sector u64`), for
//! a write the data (readable), for a read the data (writable), and a writable status byte
//! last. The device checks the shape, the sector range against the capacity and the length
//! against what the back end takes in one request, hands reads, writes and flushes to the
//! [`BlockBackend`] under a fresh id, and completes the chain (data, status byte, used ring)
//! when the back end answers that id. `GET_ID` is answered here from the configured serial.
//! Anything malformed is completed with `VIRTIO_BLK_S_IOERR` (or `UNSUPP` for unknown types),
//! so a confused guest sees I/O errors and the queue goes on; only a corrupt ring stops it.
//! Whatever can be known before the back end is asked is checked here, at once: a read whose
//! buffers are not all guest RAM fails before it is forwarded, as a write whose data cannot
//! be read does; only what the disk itself says comes back later.
//!
//! Request size: the back end moves at most [`BlockGeometry::max_request_bytes`] at once, and
//! Linux's `virtio_blk` sets no sector limit (`blk_queue_max_hw_sectors(q, UINT_MAX)`) but
//! honours `seg_max` and `size_max`. So the device offers `SIZE_MAX` = 4 KiB and
//! `SEG_MAX` = `max_request_bytes / 4 KiB`, which bounds every request Linux builds; a longer
//! one (not from Linux) fails with IOERR.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::queue::{Chain, Queue};
use super::{device_type, DeviceError, Signals, VirtioDevice, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1};
use crate::memory::GuestMemory;

/// `VIRTIO_BLK_F_SIZE_MAX`: `size_max` is valid.
pub const F_SIZE_MAX: u64 = 1 << 1;
/// `VIRTIO_BLK_F_SEG_MAX`: `seg_max` is valid.
pub const F_SEG_MAX: u64 = 1 << 2;
/// `VIRTIO_BLK_F_RO`: the disk is read-only.
pub const F_RO: u64 = 1 << 5;
/// `VIRTIO_BLK_F_BLK_SIZE`: `blk_size` is valid.
pub const F_BLK_SIZE: u64 = 1 << 6;
/// `VIRTIO_BLK_F_FLUSH`: the device has a write cache and takes `FLUSH`.
pub const F_FLUSH: u64 = 1 << 9;

/// Request type: read.
pub const T_IN: u32 = 0;
/// Request type: write.
pub const T_OUT: u32 = 1;
/// Request type: flush.
pub const T_FLUSH: u32 = 4;
/// Request type: device id string.
pub const T_GET_ID: u32 = 8;

/// Status: success.
pub const S_OK: u8 = 0;
/// Status: failed.
pub const S_IOERR: u8 = 1;
/// Status: request type not supported.
pub const S_UNSUPP: u8 = 2;

/// virtio-blk sectors are always 512 bytes (§5.2.6).
pub const SECTOR_SIZE: u64 = 512;
/// Length of the `GET_ID` string.
pub const ID_BYTES: usize = 20;
/// Size of the request header.
pub const HEADER_SIZE: u64 = 16;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// `size_max`: the largest segment.
pub const SEGMENT_SIZE: u32 = 4096;

/// What a back-end request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockOp {
    /// Read `len` bytes from `sector`.
    Read,
    /// Write `len` bytes to `sector`.
    Write,
    /// Make completed writes durable.
    Flush,
}

/// A request to the back end. `len` is a multiple of 512, at most the geometry's
/// `max_request_bytes`, and `sector..sector + len / 512` is inside the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRequest {
    /// Chosen by the device, unique while the device lives; echoed by the completion.
    pub id: u64,
    /// What to do.
    pub op: BlockOp,
    /// First 512-byte sector.
    pub sector: u64,
    /// Bytes to move (0 for a flush).
    pub len: u32,
}

/// How a back-end request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockStatus {
    /// Done; a read's data is in the completion.
    Ok,
    /// Failed.
    IoError,
    /// The disk cannot do this.
    Unsupported,
}

/// The disk as the back end describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockGeometry {
    /// Size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// The device's block size (a hint for the guest), a power of two of at least 512.
    pub block_size: u32,
    /// Most bytes one request may move (at least 4 KiB).
    pub max_request_bytes: u32,
    /// Whether writes are refused.
    pub read_only: bool,
}

/// The back end cannot take another request now; the device retries on its next pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Busy;

/// A disk the device forwards requests to (the block channel to the disk driver VM, or an
/// in-memory disk in tests). Asynchronous: `submit` starts a request, `poll` reports finished
/// ones in any order.
pub trait BlockBackend {
    /// The disk; read once when the device is created.
    fn geometry(&self) -> BlockGeometry;
    /// Starts `req`; `data` is the payload of a write (exactly `req.len` bytes), empty
    /// otherwise.
    fn submit(&mut self, req: &BlockRequest, data: &[u8]) -> Result<(), Busy>;
    /// The next finished request as `(id, status)`; for a successful read, `read_data` (cleared
    /// first) holds the bytes read.
    fn poll(&mut self, read_data: &mut Vec<u8>) -> Option<(u64, BlockStatus)>;
    /// Called after a pass that submitted requests: ring the peer's doorbell once for all.
    fn kick(&mut self) {}
}

/// Counters for the VMM's log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkStats {
    /// Requests handed to the back end.
    pub submitted: u64,
    /// Requests completed (with any status).
    pub completed: u64,
    /// Requests completed with IOERR or UNSUPP.
    pub errors: u64,
    /// Back-end completions for ids not in flight (late after a reset, or a confused back end).
    pub stray: u64,
    /// Times the back end was busy.
    pub busy: u64,
}

struct InFlight {
    chain: Chain,
    op: BlockOp,
    len: u32,
}

/// The virtio-blk device.
pub struct VirtioBlk<B: BlockBackend> {
    backend: B,
    geometry: BlockGeometry,
    serial: [u8; ID_BYTES],
    in_flight: BTreeMap<u64, InFlight>,
    stalled: Option<(BlockRequest, Chain)>,
    next_id: u64,
    scratch: Vec<u8>,
    stats: BlkStats,
    submitted_this_pass: bool,
}

impl<B: BlockBackend> VirtioBlk<B> {
    /// A device over `backend`; `serial` is what `GET_ID` returns (truncated to 20 bytes).
    pub fn new(backend: B, serial: &[u8]) -> Self {
        let geometry = backend.geometry();
        let mut s = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        s[..n].copy_from_slice(&serial[..n]);
        Self {
            backend,
            geometry,
            serial: s,
            in_flight: BTreeMap::new(),
            stalled: None,
            next_id: 1,
            scratch: Vec::new(),
            stats: BlkStats::default(),
            submitted_this_pass: false,
        }
    }

    /// The back end.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The back end, mutable (to feed it in tests, or to ring its doorbell).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Counters.
    pub fn stats(&self) -> BlkStats {
        self.stats
    }

    /// A request taken from the queue waits for room on the back end.
    pub fn waiting_for_room(&self) -> bool {
        self.stalled.is_some()
    }

    /// Requests handed to the back end and not completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// `seg_max`: segments of [`SEGMENT_SIZE`] that fit one back-end request, at least 1 and
    /// leaving room for the header and status descriptors in the queue.
    pub fn seg_max(&self) -> u32 {
        (self.geometry.max_request_bytes / SEGMENT_SIZE).clamp(1, u32::from(QUEUE_SIZE) - 2)
    }

    fn config_bytes(&self) -> [u8; 0x24] {
        let mut c = [0u8; 0x24];
        c[0..8].copy_from_slice(&self.geometry.capacity_sectors.to_le_bytes());
        c[8..12].copy_from_slice(&SEGMENT_SIZE.to_le_bytes());
        c[12..16].copy_from_slice(&self.seg_max().to_le_bytes());
        c[20..24].copy_from_slice(&self.geometry.block_size.to_le_bytes());
        c
    }

    /// Completes `chain` with `status`, having written `written` bytes before the status byte.
    fn finish(
        &mut self,
        q: &mut Queue,
        mem: &mut dyn GuestMemory,
        chain: &Chain,
        written: u32,
        status: u8,
    ) -> Result<(), DeviceError> {
        let wlen = chain.writable_len();
        if wlen > 0 {
            // A status byte outside RAM is the guest's loss; the chain is still returned.
            let _ = chain.write_at(mem, wlen - 1, &[status]);
        }
        self.stats.completed += 1;
        if status != S_OK {
            self.stats.errors += 1;
        }
        let used = if wlen > 0 { written.saturating_add(1) } else { 0 };
        q.push_used(mem, chain.head, used).map_err(|error| DeviceError { queue: 0, error })
    }

    /// Checks a new chain: `Ok(Some)` a back-end request to submit, `Ok(None)` completed here.
    fn parse(
        &mut self,
        q: &mut Queue,
        mem: &mut dyn GuestMemory,
        chain: Chain,
    ) -> Result<Option<(BlockRequest, Chain)>, DeviceError> {
        let mut hdr = [0u8; HEADER_SIZE as usize];
        let readable = chain.readable_len();
        let writable = chain.writable_len();
        let header_ok = matches!(chain.read_at(mem, 0, &mut hdr), Ok(n) if n == hdr.len());
        if !header_ok || writable == 0 {
            self.finish(q, mem, &chain, 0, S_IOERR)?;
            return Ok(None);
        }
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15]]);
        let (op, len) = match kind {
            T_IN => (BlockOp::Read, writable - 1),
            T_OUT => (BlockOp::Write, readable - HEADER_SIZE),
            T_FLUSH => (BlockOp::Flush, 0),
            T_GET_ID => {
                let n = usize::try_from(writable - 1).unwrap_or(usize::MAX).min(ID_BYTES);
                let serial = self.serial;
                let status = match chain.write_at(mem, 0, &serial[..n]) {
                    Ok(_) => S_OK,
                    Err(_) => S_IOERR,
                };
                self.finish(q, mem, &chain, n as u32, status)?;
                return Ok(None);
            }
            _ => {
                self.finish(q, mem, &chain, 0, S_UNSUPP)?;
                return Ok(None);
            }
        };
        let g = self.geometry;
        let sectors = len / SECTOR_SIZE;
        let in_range = sector.checked_add(sectors).is_some_and(|end| end <= g.capacity_sectors);
        let ok = match op {
            BlockOp::Flush => true,
            BlockOp::Read | BlockOp::Write => {
                len % SECTOR_SIZE == 0
                    && len <= u64::from(g.max_request_bytes)
                    && in_range
                    && !(op == BlockOp::Write && g.read_only)
            }
        };
        // A read into buffers that are not all guest RAM could only fail when its data comes
        // back (the scatter in `complete`): fail it now, as a write whose data cannot be
        // gathered fails in `submit`. So the guest's error does not depend on how long the
        // disk driver VM takes (a guest that resets the device first never saw one), and no
        // disk read or data slot is spent on it.
        let buffers_ok = op != BlockOp::Read || chain.writable_in_ram(mem);
        if !ok || !buffers_ok {
            self.finish(q, mem, &chain, 0, S_IOERR)?;
            return Ok(None);
        }
        let id = self.next_id;
        self.next_id += 1;
        // `len <= max_request_bytes`, a u32.
        let len = len as u32;
        let sector = if op == BlockOp::Flush { 0 } else { sector };
        Ok(Some((BlockRequest { id, op, sector, len }, chain)))
    }

    /// Hands a parsed request to the back end; `false` if it is busy (the request is kept).
    fn submit(
        &mut self,
        q: &mut Queue,
        mem: &mut dyn GuestMemory,
        req: BlockRequest,
        chain: Chain,
    ) -> Result<bool, DeviceError> {
        self.scratch.clear();
        if req.op == BlockOp::Write {
            self.scratch.resize(req.len as usize, 0);
            if !matches!(chain.read_at(mem, HEADER_SIZE, &mut self.scratch), Ok(n) if n == req.len as usize) {
                self.finish(q, mem, &chain, 0, S_IOERR)?;
                return Ok(true);
            }
        }
        match self.backend.submit(&req, &self.scratch) {
            Ok(()) => {
                self.stats.submitted += 1;
                self.submitted_this_pass = true;
                self.in_flight.insert(req.id, InFlight { chain, op: req.op, len: req.len });
                Ok(true)
            }
            Err(Busy) => {
                self.stats.busy += 1;
                self.stalled = Some((req, chain));
                Ok(false)
            }
        }
    }

    fn complete(
        &mut self,
        q: &mut Queue,
        mem: &mut dyn GuestMemory,
        f: InFlight,
        status: BlockStatus,
    ) -> Result<(), DeviceError> {
        let mut written = 0;
        let status = match status {
            BlockStatus::Ok if f.op == BlockOp::Read => {
                if self.scratch.len() == f.len as usize && chain_write_all(&f.chain, mem, &self.scratch) {
                    written = f.len;
                    S_OK
                } else {
                    S_IOERR
                }
            }
            BlockStatus::Ok => S_OK,
            BlockStatus::IoError => S_IOERR,
            BlockStatus::Unsupported => S_UNSUPP,
        };
        self.finish(q, mem, &f.chain, written, status)
    }
}

fn chain_write_all(chain: &Chain, mem: &mut dyn GuestMemory, data: &[u8]) -> bool {
    matches!(chain.write_at(mem, 0, data), Ok(n) if n == data.len())
}

impl<B: BlockBackend + 'static> VirtioDevice for VirtioBlk<B> {
    fn device_type(&self) -> u16 {
        device_type::BLOCK
    }

    fn features(&self) -> u64 {
        let ro = if self.geometry.read_only { F_RO } else { 0 };
        F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX | F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | ro
    }

    fn num_queues(&self) -> usize {
        1
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_image(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // `writeback` is only writable with VIRTIO_BLK_F_CONFIG_WCE, which is not offered.
    }

    fn activate(&mut self, _features: u64) {}

    fn as_any_mut(&mut self) -> &mut dyn core::any::Any {
        self
    }

    fn reset(&mut self) {
        self.in_flight.clear();
        self.stalled = None;
    }

    fn process(&mut self, queues: &mut [Queue], mem: &mut dyn GuestMemory) -> Result<Signals, DeviceError> {
        let Some(q) = queues.first_mut() else { return Ok(Signals::default()) };
        if !q.ready() {
            return Ok(Signals::default());
        }
        let mut scratch = core::mem::take(&mut self.scratch);
        while let Some((id, status)) = self.backend.poll(&mut scratch) {
            match self.in_flight.remove(&id) {
                Some(f) => {
                    self.scratch = core::mem::take(&mut scratch);
                    let r = self.complete(q, mem, f, status);
                    scratch = core::mem::take(&mut self.scratch);
                    r?;
                }
                None => self.stats.stray += 1,
            }
        }
        self.scratch = scratch;
        loop {
            if let Some((req, chain)) = self.stalled.take() {
                if !self.submit(q, mem, req, chain)? {
                    break;
                }
                continue;
            }
            // At most a queue's worth in flight: a guest repeating heads cannot grow this.
            if self.in_flight.len() >= usize::from(q.size) {
                break;
            }
            let Some(chain) = q.pop(mem).map_err(|error| DeviceError { queue: 0, error })? else { break };
            if let Some((req, chain)) = self.parse(q, mem, chain)? {
                if !self.submit(q, mem, req, chain)? {
                    break;
                }
            }
        }
        if core::mem::take(&mut self.submitted_this_pass) {
            self.backend.kick();
        }
        let notify = q.needs_notification(mem).map_err(|error| DeviceError { queue: 0, error })?;
        Ok(Signals { queues: u64::from(notify), config: false })
    }
}

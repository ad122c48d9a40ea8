//! Back ends over the driver-VM channels of `ipc-spec`: [`BlockChannel`] speaks the block
//! protocol (`ipc_spec::block`) to the disk driver VM, [`NetChannel`] the net protocol
//! (`ipc_spec::net`) to the net driver VM. The VMM is the channel's "guest" side.
//!
//! Neither driver VM is trusted: every response is decoded (total) and matched by id against
//! the requests in flight, read data is copied out of the shared region once, a corrupt ring
//! fails the requests instead of panicking or hanging the device, and nothing the driver VM
//! writes decides where in guest memory the device writes (that comes from the guest's own
//! descriptors, kept by [`super::blk::VirtioBlk`]).
//!
//! Block data goes through the channel's data area, cut into fixed slots, one per request in
//! flight: the device gathers a write from guest memory, this back end copies it into its
//! slot; a read's data is copied out of the slot into the device's buffer and scattered into
//! guest memory. (The driver VM must not see guest RAM, so there is one copy each way.)

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

use ipc_spec::block::{BlockLayout, DiskInfo, LayoutError, Op, Request, Response, Status, SECTOR_SIZE};
use ipc_spec::net::{self as wire, FrameReceiver, FrameSender, NetDropReason, NetHeader};
use ipc_spec::ring::{RingError, SharedMem};

use super::blk::{BlockBackend, BlockGeometry, BlockOp, BlockRequest, BlockStatus, Busy};
use super::net::{NetBackend, SendError};

/// Rings the peer's doorbell (a notification signal in the VMM).
pub trait Doorbell {
    /// Tells the peer there is work on the channel.
    fn ring(&mut self);
}

/// Largest data slot: one 64 KiB request, Linux's usual largest with `seg_max` 16.
pub const MAX_SLOT: usize = 64 << 10;
/// Id of the `GetInfo` request [`BlockChannel::connect`] sends (device ids start at 1).
const INFO_ID: u64 = 0;

#[derive(Clone, Copy, Debug)]
struct Slot {
    id: u64,
    op: BlockOp,
    len: u32,
}

/// A block back end over a block channel region.
pub struct BlockChannel<M: SharedMem, D: Doorbell> {
    mem: M,
    layout: BlockLayout,
    doorbell: D,
    info: Option<DiskInfo>,
    slot_size: usize,
    slots: Vec<Option<Slot>>,
    /// Completions made here (a ring gone corrupt): `(id, status)`.
    local: VecDeque<(u64, BlockStatus)>,
    broken: bool,
    /// The driver incarnation last seen in the header (`ipc_spec::block`, "Restarts").
    incarnation: u32,
}

impl<M: SharedMem, D: Doorbell> BlockChannel<M, D> {
    /// Lays out `mem` ([`BlockLayout::standard`]), empties the rings, and asks the driver VM for
    /// the disk's description (its answer arrives through [`BlockChannel::poll_info`]).
    pub fn connect(mem: M, doorbell: D) -> Result<Self, LayoutError> {
        let layout = BlockLayout::standard(mem.len())?;
        let rings_ok = layout
            .guest_rings(&mem)
            .and_then(|(mut requests, _)| requests.push(&Request::simple(INFO_ID, Op::GetInfo).encode()))
            .is_ok();
        // The header last: the driver VM reads it when the doorbell rings.
        layout.write(&mem)?;
        let data = layout.data_len();
        let slot_size = if data >= 4 * MAX_SLOT {
            MAX_SLOT
        } else {
            (data / 4).max(SECTOR_SIZE as usize) & !(SECTOR_SIZE as usize - 1)
        };
        let n = (data / slot_size).min(layout.ring_capacity() as usize).max(1);
        let mut c = Self {
            mem,
            layout,
            doorbell,
            info: None,
            slot_size,
            slots: vec![None; n],
            local: VecDeque::new(),
            broken: !rings_ok,
            incarnation: 0,
        };
        c.incarnation = BlockLayout::incarnation(&c.mem);
        c.doorbell.ring();
        Ok(c)
    }

    /// The driver VM's description of the disk once it answered `GetInfo`: `Some(Ok)`, or
    /// `Some(Err(status))` if it refused; `None` while there is no answer yet.
    pub fn poll_info(&mut self) -> Option<Result<DiskInfo, Status>> {
        if let Some(i) = self.info {
            return Some(Ok(i));
        }
        // A driver that attaches drops what waits on the request ring (its clients replay):
        // if one attached since the GetInfo went out, ask again. A second answer, should the
        // first survive, is an answer to nothing in flight and is dropped by `poll`.
        let now = BlockLayout::incarnation(&self.mem);
        if now != self.incarnation && !self.broken {
            self.incarnation = now;
            let info = Request::simple(INFO_ID, Op::GetInfo).encode();
            match self.layout.guest_rings_attach(&self.mem).and_then(|(mut requests, _)| requests.push(&info)) {
                Ok(()) => self.doorbell.ring(),
                Err(_) => self.fail_all(),
            }
        }
        let r = self.next_response()?;
        if r.id != INFO_ID {
            return None;
        }
        if r.status != Status::Ok || r.info.capacity_sectors == 0 || r.info.max_sectors_per_request == 0 {
            return Some(Err(if r.status == Status::Ok { Status::IoError } else { r.status }));
        }
        self.info = Some(r.info);
        Some(Ok(r.info))
    }

    /// Requests that can be in flight at once.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    fn next_response(&mut self) -> Option<Response> {
        if self.broken {
            return None;
        }
        let popped = self.layout.guest_rings_attach(&self.mem).and_then(|(_, mut responses)| responses.pop());
        match popped {
            Ok(Some(slot)) => Some(Response::decode(&slot)),
            Ok(None) => None,
            Err(_) => {
                self.fail_all();
                None
            }
        }
    }

    /// The driver VM broke the ring protocol: every request in flight fails, and so will all
    /// later ones.
    fn fail_all(&mut self) {
        self.broken = true;
        for s in self.slots.iter_mut() {
            if let Some(s) = s.take() {
                self.local.push_back((s.id, BlockStatus::IoError));
            }
        }
    }

    fn slot_offset(&self, i: usize) -> usize {
        self.layout.data_offset() + i * self.slot_size
    }
}

impl<M: SharedMem, D: Doorbell> BlockBackend for BlockChannel<M, D> {
    fn geometry(&self) -> BlockGeometry {
        let info = self.info.unwrap_or_default();
        let max = u64::from(info.max_sectors_per_request).saturating_mul(u64::from(SECTOR_SIZE));
        let max = max.min(self.slot_size as u64) as u32;
        let block_size =
            if info.sector_size.is_power_of_two() && info.sector_size >= 512 { info.sector_size } else { 512 };
        BlockGeometry {
            capacity_sectors: info.capacity_sectors,
            block_size,
            max_request_bytes: max,
            read_only: info.read_only,
        }
    }

    fn submit(&mut self, req: &BlockRequest, data: &[u8]) -> Result<(), Busy> {
        if self.broken {
            self.local.push_back((req.id, BlockStatus::IoError));
            return Ok(());
        }
        let Some(i) = self.slots.iter().position(Option::is_none) else { return Err(Busy) };
        let len = req.len as usize;
        if len > self.slot_size {
            self.local.push_back((req.id, BlockStatus::IoError));
            return Ok(());
        }
        let offset = self.slot_offset(i);
        let (op, count) = match req.op {
            BlockOp::Read => (Op::Read, req.len / SECTOR_SIZE),
            BlockOp::Write => (Op::Write, req.len / SECTOR_SIZE),
            BlockOp::Flush => (Op::Flush, 0),
        };
        if req.op == BlockOp::Write {
            self.mem.write_bytes(offset, data);
        }
        // The data area lies below 4 GiB ([`BlockLayout::standard`]), so the offset fits.
        let wire = Request { id: req.id, op, sector: req.sector, count, data_offset: offset as u32, data_len: req.len };
        match self.layout.guest_rings_attach(&self.mem).and_then(|(mut requests, _)| requests.push(&wire.encode())) {
            Ok(()) => {
                self.slots[i] = Some(Slot { id: req.id, op: req.op, len: req.len });
                Ok(())
            }
            Err(RingError::Full) => Err(Busy),
            Err(_) => {
                self.fail_all();
                self.local.push_back((req.id, BlockStatus::IoError));
                Ok(())
            }
        }
    }

    fn poll(&mut self, read_data: &mut Vec<u8>) -> Option<(u64, BlockStatus)> {
        read_data.clear();
        if let Some(done) = self.local.pop_front() {
            return Some(done);
        }
        loop {
            // A ring found corrupt just now failed everything in flight into `local`.
            let Some(r) = self.next_response() else { return self.local.pop_front() };
            // Answers to nothing in flight (a late GetInfo, a confused driver) are dropped.
            let Some(i) = self.slots.iter().position(|s| s.is_some_and(|s| s.id == r.id)) else { continue };
            let Some(slot) = self.slots[i].take() else { continue };
            let status = match r.status {
                Status::Ok => BlockStatus::Ok,
                Status::Unsupported => BlockStatus::Unsupported,
                _ => BlockStatus::IoError,
            };
            if status == BlockStatus::Ok && slot.op == BlockOp::Read {
                read_data.resize(slot.len as usize, 0);
                self.mem.read_bytes(self.slot_offset(i), read_data);
            }
            return Some((r.id, status));
        }
    }

    fn kick(&mut self) {
        self.doorbell.ring();
    }
}

/// A net back end over a net channel region the driver VM has initialised.
pub struct NetChannel<'m, M: SharedMem + ?Sized, D: Doorbell> {
    mem: &'m M,
    header: NetHeader,
    tx: FrameSender<'m, M>,
    rx: FrameReceiver<'m, M>,
    doorbell: D,
    /// Frames the channel dropped, by reason code.
    pub drops: [u64; wire::DROP_COUNTERS],
}

/// Why a net channel could not be attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetChannelError {
    /// The header is not (yet) valid.
    Layout(wire::LayoutError),
    /// A ring does not fit or is corrupt.
    Ring(RingError),
}

impl<'m, M: SharedMem + ?Sized, D: Doorbell> NetChannel<'m, M, D> {
    /// Attaches once the driver VM has written the header ([`NetHeader::check`]; retry after its
    /// doorbell while this answers `Layout(BadMagic)`).
    pub fn attach(mem: &'m M, doorbell: D) -> Result<Self, NetChannelError> {
        let (header, layout) = NetHeader::check(mem).map_err(NetChannelError::Layout)?;
        let (tx, rx) = layout.guest_channel(mem, header.mtu).map_err(NetChannelError::Ring)?;
        Ok(Self { mem, header, tx, rx, doorbell, drops: [0; wire::DROP_COUNTERS] })
    }
}

impl<M: SharedMem + ?Sized, D: Doorbell> NetBackend for NetChannel<'_, M, D> {
    fn mac(&self) -> [u8; 6] {
        self.header.mac.0
    }

    fn mtu(&self) -> u16 {
        // Checked by `NetHeader::check` to be at most 1500.
        self.header.mtu as u16
    }

    fn link_up(&self) -> bool {
        wire::link_up(self.mem)
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), SendError> {
        match self.tx.send(frame) {
            Ok(()) => Ok(()),
            Err(NetDropReason::RingFull) => Err(SendError::Busy),
            Err(reason) => {
                if let Some(d) = self.drops.get_mut(reason.code()) {
                    *d += 1;
                }
                Err(SendError::Dropped)
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Option<usize> {
        // Each error consumed one bad entry; at most a ring's worth per call.
        for _ in 0..=wire::MAX_RING_CAPACITY {
            match self.rx.recv(buf) {
                Ok(got) => return got,
                Err(NetDropReason::BadRing) => return None,
                Err(reason) => {
                    if let Some(d) = self.drops.get_mut(reason.code()) {
                        *d += 1;
                    }
                }
            }
        }
        None
    }

    fn kick(&mut self) {
        self.doorbell.ring();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::boxed::Box;
    use ipc_spec::block::{validate, Validated};
    use ipc_spec::net::{Layout as NetLayout, MacAddr};
    use ipc_spec::ring::ByteMem;

    #[derive(Default)]
    struct Count(u32);
    impl Doorbell for &mut Count {
        fn ring(&mut self) {
            self.0 += 1;
        }
    }
    pub(crate) struct NoBell;
    impl Doorbell for NoBell {
        fn ring(&mut self) {}
    }

    pub(crate) const SECTORS: u64 = 256;

    pub(crate) fn info() -> DiskInfo {
        DiskInfo { capacity_sectors: SECTORS, sector_size: 512, max_sectors_per_request: 256, read_only: false }
    }

    /// The disk driver VM's loop body: answers every request on the ring from `disk`.
    pub(crate) fn serve(mem: &ByteMem<'_>, disk: &mut [u8]) -> usize {
        let layout = BlockLayout::read(mem).unwrap();
        let (mut requests, mut responses) = layout.driver_rings(mem).unwrap();
        let mut n = 0;
        while let Ok(Some(slot)) = requests.pop() {
            let req = Request::decode(&slot);
            let resp = match validate(&req, &layout, info()) {
                Ok(Validated::GetInfo) => Response::info(req.id, info()),
                Ok(Validated::Read(t)) => {
                    let s = t.sector() as usize * 512;
                    mem.write_bytes(t.data_offset(), &disk[s..s + t.data_len()]);
                    Response::new(req.id, Status::Ok)
                }
                Ok(Validated::Write(t)) => {
                    let s = t.sector() as usize * 512;
                    mem.read_bytes(t.data_offset(), &mut disk[s..s + t.data_len()]);
                    Response::new(req.id, Status::Ok)
                }
                Ok(Validated::Flush) => Response::new(req.id, Status::Ok),
                Err(status) => Response::new(req.id, status),
            };
            responses.push(&resp.encode()).unwrap();
            n += 1;
        }
        n
    }

    #[test]
    fn block_channel_round_trip() {
        let mut bytes = vec![0u8; 256 << 10];
        let mem = ByteMem::new(&mut bytes);
        let mut bell = Count::default();
        let mut disk: Vec<u8> = (0..SECTORS as usize * 512).map(|i| (i % 253) as u8).collect();
        let mut c = BlockChannel::connect(mem, &mut bell).unwrap();
        assert_eq!(c.poll_info(), None);
        assert_eq!(serve(&mem, &mut disk), 1);
        assert_eq!(c.poll_info(), Some(Ok(info())));
        let g = c.geometry();
        assert_eq!((g.capacity_sectors, g.read_only), (SECTORS, false));
        assert!(g.max_request_bytes >= 4096 && g.max_request_bytes as usize <= MAX_SLOT);
        let slots = c.slots();
        assert!(slots >= 2);
        // Fill every slot, then one more is refused.
        let data = vec![0x5a; 1024];
        for id in 1..=slots as u64 {
            c.submit(&BlockRequest { id, op: BlockOp::Write, sector: 2 * id, len: 1024 }, &data).unwrap();
        }
        assert_eq!(c.submit(&BlockRequest { id: 99, op: BlockOp::Flush, sector: 0, len: 0 }, &[]), Err(Busy));
        c.kick();
        let mut buf = Vec::new();
        assert_eq!(c.poll(&mut buf), None);
        assert_eq!(serve(&mem, &mut disk), slots);
        for id in 1..=slots as u64 {
            assert_eq!(c.poll(&mut buf), Some((id, BlockStatus::Ok)));
        }
        assert_eq!(&disk[1024..2048], &data[..]);
        c.submit(&BlockRequest { id: 50, op: BlockOp::Read, sector: 2, len: 1024 }, &[]).unwrap();
        c.submit(&BlockRequest { id: 51, op: BlockOp::Read, sector: SECTORS, len: 512 }, &[]).unwrap();
        serve(&mem, &mut disk);
        assert_eq!(c.poll(&mut buf), Some((50, BlockStatus::Ok)));
        assert_eq!(buf, data);
        assert_eq!(c.poll(&mut buf), Some((51, BlockStatus::IoError)), "out of range at the driver");
        assert!(buf.is_empty());
        assert!(bell.0 >= 2);
    }

    #[test]
    fn get_info_is_asked_again_when_the_driver_attaches_after_it_went_out() {
        let mut bytes = vec![0u8; 256 << 10];
        let mem = ByteMem::new(&mut bytes);
        let mut bell = Count::default();
        let mut disk: Vec<u8> = vec![0; SECTORS as usize * 512];
        let mut c = BlockChannel::connect(mem, &mut bell).unwrap();
        // The driver attaches only now, dropping the GetInfo that waited on the ring.
        BlockLayout::read(&mem).unwrap().driver_attach(&mem).unwrap();
        assert_eq!(serve(&mem, &mut disk), 0, "nothing left to answer");
        assert_eq!(c.poll_info(), None, "no answer yet, but asked again");
        assert_eq!(serve(&mem, &mut disk), 1);
        assert_eq!(c.poll_info(), Some(Ok(info())));
    }

    #[test]
    fn hostile_disk_driver() {
        let mut bytes = vec![0u8; 64 << 10];
        let mem = ByteMem::new(&mut bytes);
        let mut c = BlockChannel::connect(mem, NoBell).unwrap();
        let layout = BlockLayout::read(&mem).unwrap();
        let (_, mut responses) = layout.driver_rings(&mem).unwrap();
        // A GetInfo answer with a zero-sized disk is refused.
        responses.push(&Response::info(INFO_ID, DiskInfo { capacity_sectors: 0, ..info() }).encode()).unwrap();
        assert_eq!(c.poll_info(), Some(Err(Status::IoError)));
        c.info = Some(info());
        c.submit(&BlockRequest { id: 7, op: BlockOp::Read, sector: 0, len: 512 }, &[]).unwrap();
        // Answers for ids not in flight are dropped; then the real one.
        responses.push(&Response::new(8, Status::Ok).encode()).unwrap();
        responses.push(&Response::new(7, Status::Unknown(77)).encode()).unwrap();
        let mut buf = Vec::new();
        assert_eq!(c.poll(&mut buf), Some((7, BlockStatus::IoError)));
        // A response index far ahead: the ring is corrupt; in-flight and later requests fail.
        c.submit(&BlockRequest { id: 9, op: BlockOp::Read, sector: 0, len: 512 }, &[]).unwrap();
        let ring = layout.response_ring_offset();
        mem.write_u32(ring, mem.read_u32(ring).wrapping_add(1000));
        assert_eq!(c.poll(&mut buf), Some((9, BlockStatus::IoError)));
        c.submit(&BlockRequest { id: 10, op: BlockOp::Flush, sector: 0, len: 0 }, &[]).unwrap();
        assert_eq!(c.poll(&mut buf), Some((10, BlockStatus::IoError)));
        assert_eq!(c.poll(&mut buf), None);
    }

    #[test]
    fn net_channel_both_ways() {
        let bytes: &'static mut [u8] = Box::leak(vec![0u8; 64 << 10].into_boxed_slice());
        let mem: &'static ByteMem<'static> = Box::leak(Box::new(ByteMem::new(bytes)));
        let mut bell = Count::default();
        assert!(matches!(NetChannel::attach(mem, &mut bell), Err(NetChannelError::Layout(_))), "driver not ready");
        let layout = NetLayout::new(mem.len()).unwrap();
        NetHeader { mac: MacAddr([2, 0, 0, 0, 0, 9]), mtu: 1500, link_up: true }.init(mem, &layout).unwrap();
        let (mut from_guest, mut to_guest) = layout.driver_channel(mem, 1500).unwrap();
        let mut n = NetChannel::attach(mem, &mut bell).unwrap();
        assert_eq!((n.mac(), n.mtu(), n.link_up()), ([2, 0, 0, 0, 0, 9], 1500, true));
        let frame: Vec<u8> = (0..80u8).collect();
        n.send(&frame).unwrap();
        n.kick();
        let mut buf = [0u8; 1600];
        assert_eq!(from_guest.recv(&mut buf), Ok(Some(80)));
        assert_eq!(&buf[..80], &frame[..]);
        assert_eq!(n.send(&[0u8; 5]), Err(SendError::Dropped));
        to_guest.send(&[7u8; 64]).unwrap();
        assert_eq!(n.recv(&mut buf), Some(64));
        assert_eq!(n.recv(&mut buf), None);
        // Fill the TX ring: Busy, not dropped.
        let mut sent = 0;
        while n.send(&frame) == Ok(()) {
            sent += 1;
            assert!(sent <= 1024);
        }
        assert_eq!(n.send(&frame), Err(SendError::Busy));
        wire::set_link(mem, false);
        assert!(!n.link_up());
        assert_eq!(bell.0, 1);
    }
}

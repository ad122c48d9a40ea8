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

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use ipc_spec::block::{BlockLayout, DiskInfo, LayoutError, Op, Response, Status, SECTOR_SIZE};
use ipc_spec::block_client::{Client, ClientError};
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

/// A request in flight: the device's id, the channel's ([`Client`]'s) id, what it does.
#[derive(Clone, Copy, Debug)]
struct Slot {
    id: u64,
    wire_id: u64,
    op: BlockOp,
    len: u32,
}

/// A block back end over a block channel region.
///
/// The channel survives the disk driver VM (`ipc_spec::block`, "Restarts"): the requests go
/// through [`Client`], which keeps every request the driver has not answered, sends them all
/// again (oldest first) when a new incarnation attaches, and drops answers from a dead
/// incarnation and duplicates. A request's data slot stays reserved until its answer, so a
/// replayed write sends the same bytes and a replayed read lands in the same slot; replaying
/// a read, a write or a flush is harmless. So a driver VM restart costs the VM only delay.
pub struct BlockChannel<M: SharedMem, D: Doorbell> {
    mem: M,
    /// Boxed: its table of outstanding requests makes it about 10 KiB (sized for the deep
    /// ring), and the channel moves by value through several frames before it is boxed
    /// (the same move overflowed the demo guest's stack).
    client: Box<Client>,
    doorbell: D,
    info: Option<DiskInfo>,
    /// The `GetInfo` request while it is unanswered.
    info_id: Option<u64>,
    slot_size: usize,
    slots: Vec<Option<Slot>>,
    /// Completions made here (a ring gone corrupt): `(id, status)`.
    local: VecDeque<(u64, BlockStatus)>,
    broken: bool,
    /// Requests sent again to a new driver incarnation.
    pub replayed: u64,
}

impl<M: SharedMem, D: Doorbell> BlockChannel<M, D> {
    /// Lays out `mem` ([`BlockLayout::standard`]), empties the rings, and asks the driver VM for
    /// the disk's description (its answer arrives through [`BlockChannel::poll_info`]).
    pub fn connect(mem: M, doorbell: D) -> Result<Self, LayoutError> {
        let layout = BlockLayout::standard(mem.len())?;
        let data = layout.data_len();
        let slot_size = if data >= 4 * MAX_SLOT {
            MAX_SLOT
        } else {
            (data / 4).max(SECTOR_SIZE as usize) & !(SECTOR_SIZE as usize - 1)
        };
        let ring = (layout.ring_capacity() as usize).min(ipc_spec::block_client::MAX_OUTSTANDING);
        // One request of the ring's worth is the GetInfo (outstanding until answered).
        let n = (data / slot_size).min(ring.saturating_sub(1)).max(1);
        // The client writes the header last: the driver VM reads it when the doorbell rings.
        // It lays out the same standard layout, which fits (checked above), on rings it
        // empties itself: it cannot fail where `standard` did not.
        let client = Client::create(&mem)
            .map(Box::new)
            .map_err(|_| LayoutError::RegionTooSmall { len: mem.len(), min: ipc_spec::block::STANDARD_MIN_REGION })?;
        let mut c = Self {
            mem,
            client,
            doorbell,
            info: None,
            info_id: None,
            slot_size,
            slots: vec![None; n],
            local: VecDeque::new(),
            broken: false,
            replayed: 0,
        };
        // A driver attached already (its incarnation in the header) is the one to ask.
        c.client_poll();
        match c.client.submit(&c.mem, Op::GetInfo, 0, 0, 0) {
            Ok(id) => c.info_id = Some(id),
            Err(_) => c.fail_all(),
        }
        c.doorbell.ring();
        Ok(c)
    }

    /// The driver VM's description of the disk once it answered `GetInfo`: `Some(Ok)`, or
    /// `Some(Err(status))` if it refused; `None` while there is no answer yet.
    pub fn poll_info(&mut self) -> Option<Result<DiskInfo, Status>> {
        if let Some(i) = self.info {
            return Some(Ok(i));
        }
        // A driver that attaches drops what waits on the request ring: the client sends the
        // GetInfo again to it.
        let r = self.next_response()?;
        if Some(r.id) != self.info_id {
            return None;
        }
        self.info_id = None;
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

    /// Driver incarnations seen (the first attach counts: restarts survived plus one).
    pub fn incarnations(&self) -> u64 {
        self.client.restarts
    }

    /// Answers dropped: from a dead incarnation, or to requests answered already.
    pub fn ignored(&self) -> u64 {
        self.client.ignored
    }

    /// The channel's state for a stall report: what the client has outstanding, the
    /// incarnation it accepts (and the header's), and both rings' producer/consumer indices
    /// as they are in the region (read only: nothing moves).
    pub fn stall_state(&self) -> String {
        let [rq_p, rq_c, rs_p, rs_c] = self.client.ring_indices(&self.mem);
        format!(
            "chan outstanding={} slots_used={}/{} local={} broken={} incarnation={} header_incarnation={} attach_index={} req_ring prod={rq_p} cons={rq_c} resp_ring prod={rs_p} cons={rs_c} next_id={} replayed={} ignored={}",
            self.client.outstanding(),
            self.slots.iter().filter(|s| s.is_some()).count(),
            self.slots.len(),
            self.local.len(),
            self.broken,
            self.client.incarnation(),
            BlockLayout::incarnation(&self.mem),
            BlockLayout::attach_index(&self.mem),
            self.client.next_id(),
            self.replayed,
            self.client.ignored,
        )
    }

    /// Lets the client notice a new incarnation (and replay to it) and send what did not fit
    /// on the ring before; rings the driver if it sent anything.
    fn client_poll(&mut self) {
        if self.broken {
            return;
        }
        let outstanding = self.client.outstanding() as u64;
        match self.client.poll(&self.mem) {
            Ok(p) => {
                if p.restarted {
                    self.replayed += outstanding;
                }
                if p.sent > 0 {
                    self.doorbell.ring();
                }
            }
            // dom0 gave up restarting the driver: what was outstanding fails now (Linux sees
            // I/O errors at once, not its block layer's timeout); a driver built again by
            // `ctl restart` clears the mark and the channel goes on.
            Err(ClientError::ServerGone) => self.fail_outstanding(),
            Err(_) => self.fail_all(),
        }
    }

    /// The next answer of the current incarnation to a request still outstanding.
    fn next_response(&mut self) -> Option<Response> {
        self.client_poll();
        if self.broken {
            return None;
        }
        match self.client.next_response(&self.mem) {
            Ok(Some(r)) => Some(r),
            Ok(None) => {
                // All answers taken: a driver that stopped taking our requests for want of a
                // response slot sleeps until we ring (`ipc_spec::block`, "Doorbells").
                if self.client.doorbell_needed(&self.mem).unwrap_or(true) {
                    self.doorbell.ring();
                }
                None
            }
            Err(ClientError::ServerGone) => {
                self.fail_outstanding();
                None
            }
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
        self.fail_outstanding();
    }

    fn fail_outstanding(&mut self) {
        for s in self.slots.iter_mut() {
            if let Some(s) = s.take() {
                self.local.push_back((s.id, BlockStatus::IoError));
            }
        }
    }

    fn slot_offset(&self, i: usize) -> usize {
        self.client.layout().data_offset() + i * self.slot_size
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
        match self.client.submit(&self.mem, op, req.sector, count, offset as u32) {
            Ok(wire_id) => {
                self.slots[i] = Some(Slot { id: req.id, wire_id, op: req.op, len: req.len });
                Ok(())
            }
            Err(ClientError::TooMany) => Err(Busy),
            Err(ClientError::ServerGone) => {
                self.fail_outstanding();
                self.local.push_back((req.id, BlockStatus::IoError));
                Ok(())
            }
            Err(ClientError::Ring) => {
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
            // A GetInfo answered late (the device was created without it) is no request of
            // the device's.
            let Some(i) = self.slots.iter().position(|s| s.is_some_and(|s| s.wire_id == r.id)) else { continue };
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
            return Some((slot.id, status));
        }
    }

    fn kick(&mut self) {
        // Only a driver that sleeps and would not look otherwise needs the doorbell
        // (`ipc_spec::block`, "Doorbells"): each is a world switch. A corrupt ring rings.
        if self.broken || self.client.doorbell_needed(&self.mem).unwrap_or(true) {
            self.doorbell.ring();
        }
    }
}

/// A net back end over a net channel region the driver VM has initialised.
///
/// The channel survives the net driver VM (`ipc_spec::net`, "Restarts"): when dom0 builds
/// it again, the new incarnation re-attaches to the rings as they are and announces itself
/// in the header. This back end follows it the way the demo guest does
/// ([`FrameReceiver::follow_incarnations`]): an RX frame stamped by any other incarnation
/// than the one in the header is a dead one's leftover and is dropped
/// ([`NetDropReason::Stale`]); frames the guest queued on the TX ring that the dead one did
/// not take are taken by the new one; those it took and had not sent are lost (TCP sends
/// them again). On noticing a new incarnation the back end rings the doorbell (it reaches the
/// new driver VM: dom0 gives it the same notifications), so frames queued while no driver ran
/// go out without waiting for the guest's next one. MAC and MTU stay the device's: the
/// driver must keep them (it derives the MAC from the channel's position), and a change is
/// only counted.
///
/// When dom0 gives up on the driver it writes `SERVER_GONE` and the link word down
/// ([`wire::mark_server_gone`]) and rings us: [`NetBackend::link_up`] is then false (the
/// device model raises a configuration interrupt, Linux turns the carrier off) and frames
/// are refused instead of waiting for room that will never come. `ctl restart` clears the
/// mark and the new incarnation raises the link again.
pub struct NetChannel<'m, M: SharedMem + ?Sized, D: Doorbell> {
    mem: &'m M,
    header: NetHeader,
    tx: FrameSender<'m, M>,
    rx: FrameReceiver<'m, M>,
    doorbell: D,
    /// Frames the channel dropped, by reason code.
    pub drops: [u64; wire::DROP_COUNTERS],
    /// Frames the guest sent while dom0 had given up on the driver (dropped).
    pub gone_dropped: u64,
    /// Incarnation changes already accounted for (the receiver's count, which wraps).
    seen_changes: u32,
    /// Driver restarts this channel lived through (several between two looks count as one).
    pub restarts: u64,
    /// Restarts after which the header named another MAC or MTU than the device's.
    pub identity_changes: u64,
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
    /// doorbell while this answers `Layout(BadMagic)`), following the driver's incarnations
    /// from the one attached now.
    pub fn attach(mem: &'m M, doorbell: D) -> Result<Self, NetChannelError> {
        let (header, layout) = NetHeader::check(mem).map_err(NetChannelError::Layout)?;
        let (tx, mut rx) = layout.guest_channel(mem, header.mtu).map_err(NetChannelError::Ring)?;
        rx.follow_incarnations();
        Ok(Self {
            mem,
            header,
            tx,
            rx,
            doorbell,
            drops: [0; wire::DROP_COUNTERS],
            gone_dropped: 0,
            seen_changes: 0,
            restarts: 0,
            identity_changes: 0,
        })
    }

    /// The driver incarnation whose frames are taken now.
    pub fn incarnation(&self) -> u32 {
        self.rx.incarnation().unwrap_or(0)
    }

    /// The incarnation in the header now (for a stall report; frames are taken by
    /// [`NetChannel::incarnation`]'s).
    pub fn header_incarnation(&self) -> u32 {
        wire::incarnation(self.mem)
    }

    /// Whether dom0 gave up on the driver (`SERVER_GONE` in the header).
    pub fn server_gone(&self) -> bool {
        wire::server_gone(self.mem)
    }

    /// RX frames of dead incarnations dropped.
    pub fn stale_dropped(&self) -> u64 {
        self.drops.get(NetDropReason::Stale.code()).copied().unwrap_or(0)
    }

    fn count_drop(&mut self, reason: NetDropReason) {
        if let Some(d) = self.drops.get_mut(reason.code()) {
            *d += 1;
        }
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
        // dom0 writes the link word down with the mark; both are looked at, so a link word
        // a dying driver left up does not hide the mark.
        wire::link_up(self.mem) && !wire::server_gone(self.mem)
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), SendError> {
        if wire::server_gone(self.mem) {
            // No driver will take it: refused, not kept (the link is down for the guest).
            self.gone_dropped += 1;
            return Err(SendError::Dropped);
        }
        match self.tx.send(frame) {
            Ok(()) => Ok(()),
            // A dead driver's full ring too: the next incarnation takes it as it is.
            Err(NetDropReason::RingFull) => Err(SendError::Busy),
            Err(reason) => {
                self.count_drop(reason);
                Err(SendError::Dropped)
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Option<usize> {
        // Each error consumed one bad (or stale) entry; at most a ring's worth per call.
        for _ in 0..=wire::MAX_RING_CAPACITY {
            match self.rx.recv(buf) {
                Ok(got) => return got,
                Err(NetDropReason::BadRing) => return None,
                Err(reason) => self.count_drop(reason),
            }
        }
        None
    }

    fn kick(&mut self) {
        self.doorbell.ring();
    }

    fn poll(&mut self) {
        // One load from the header; `recv` may have noticed the change first (it looks too).
        self.rx.check_incarnation();
        let changes = self.rx.incarnation_changes();
        if changes == self.seen_changes {
            return;
        }
        self.restarts += u64::from(changes.wrapping_sub(self.seen_changes));
        self.seen_changes = changes;
        if !matches!(NetHeader::check(self.mem), Ok((h, _)) if h.mac == self.header.mac && h.mtu == self.header.mtu) {
            self.identity_changes += 1;
        }
        // The new incarnation may have looked at the TX ring before our last frames landed
        // there, and our doorbells while no driver ran went nowhere.
        self.doorbell.ring();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::boxed::Box;
    use ipc_spec::block::{validate, Request, Validated};
    use ipc_spec::net::MacAddr;
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

    /// A disk driver VM that attached before the VMM connected (incarnation 1 in the
    /// header, which the client's layout leaves alone).
    pub(crate) fn attached(mem: &ByteMem<'_>) {
        mem.write_u32(ipc_spec::block::header::INCARNATION, 1);
    }

    /// The disk driver VM's loop body: answers every request on the ring from `disk`, as the
    /// incarnation in the header.
    pub(crate) fn serve(mem: &ByteMem<'_>, disk: &mut [u8]) -> usize {
        answer(mem, &take(mem, disk, usize::MAX))
    }

    /// Executes up to `n` requests from the ring on `disk`; the answers are returned, not
    /// pushed (a driver that dies before answering).
    pub(crate) fn take(mem: &ByteMem<'_>, disk: &mut [u8], n: usize) -> Vec<Response> {
        let layout = BlockLayout::read(mem).unwrap();
        let incarnation = BlockLayout::incarnation(mem);
        let (mut requests, _) = layout.driver_rings(mem).unwrap();
        let mut out = Vec::new();
        while out.len() < n {
            let Ok(Some(slot)) = requests.pop() else { break };
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
            out.push(resp.from(incarnation));
        }
        out
    }

    /// Pushes answers onto the response ring; how many.
    pub(crate) fn answer(mem: &ByteMem<'_>, answers: &[Response]) -> usize {
        let layout = BlockLayout::read(mem).unwrap();
        let (_, mut responses) = layout.driver_rings(mem).unwrap();
        for r in answers {
            responses.push(&r.encode()).unwrap();
        }
        answers.len()
    }

    #[test]
    fn block_channel_round_trip() {
        let mut bytes = vec![0u8; 256 << 10];
        let mem = ByteMem::new(&mut bytes);
        attached(&mem);
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
        assert_eq!((c.incarnations(), c.replayed), (1, 0));
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

    /// Issue 12: the disk driver VM dies with requests taken and unanswered, a new
    /// incarnation attaches; every request the dead one did not answer is sent again and
    /// completed once, answers the dead one left behind are ignored, the data lands.
    #[test]
    fn requests_in_flight_are_replayed_to_a_restarted_driver() {
        let mut bytes = vec![0u8; 1 << 20];
        let mem = ByteMem::new(&mut bytes);
        attached(&mem);
        let mut bell = Count::default();
        let mut disk: Vec<u8> = vec![0; SECTORS as usize * 512];
        let mut c = BlockChannel::connect(mem, &mut bell).unwrap();
        serve(&mem, &mut disk);
        assert_eq!(c.poll_info(), Some(Ok(info())));
        let mut buf = Vec::new();
        let mut done = Vec::new();
        for round in 0..20u64 {
            // Writes of a pattern per round, then a flush.
            for k in 0..6u64 {
                let id = round * 10 + k;
                let data = vec![(id % 251) as u8 + 1; 1024];
                c.submit(&BlockRequest { id, op: BlockOp::Write, sector: 2 * k + 20 * (round % 8), len: 1024 }, &data)
                    .unwrap();
            }
            c.submit(&BlockRequest { id: round * 10 + 6, op: BlockOp::Flush, sector: 0, len: 0 }, &[]).unwrap();
            // The driver executes a few, answers some of those, and dies; its last answers
            // are pushed after the new incarnation attached (late, from a dead driver).
            let taken = take(&mem, &mut disk, (round % 5) as usize + 1);
            let (now, late) = taken.split_at(taken.len() / 2);
            answer(&mem, now);
            while let Some((id, status)) = c.poll(&mut buf) {
                assert_eq!(status, BlockStatus::Ok);
                done.push(id);
            }
            BlockLayout::read(&mem).unwrap().driver_attach(&mem).unwrap();
            answer(&mem, late);
            // The new one serves everything the client sends again.
            let mut guard = 0;
            while done.iter().filter(|&&id| id / 10 == round).count() < 7 {
                serve(&mem, &mut disk);
                while let Some((id, status)) = c.poll(&mut buf) {
                    assert_eq!(status, BlockStatus::Ok);
                    done.push(id);
                }
                guard += 1;
                assert!(guard < 10, "round {round}: requests never completed: {done:?}");
            }
        }
        let mut sorted = done.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), done.len(), "a request completed twice");
        assert_eq!(done.len(), 20 * 7);
        // Each place holds what the last round to write it wrote (rounds 12..20 cover every
        // `round % 8`).
        for place in 0..8u64 {
            let round = (12..20u64).rev().find(|r| r % 8 == place).unwrap_or(0);
            for k in 0..6u64 {
                let s = (2 * k + 20 * place) as usize * 512;
                let want = ((round * 10 + k) % 251) as u8 + 1;
                assert!(disk[s..s + 1024].iter().all(|&b| b == want), "place {place}, write {k}");
            }
        }
        assert_eq!(c.incarnations(), 21);
        assert!(c.replayed > 0 && c.ignored() > 0, "replayed {}, ignored {}", c.replayed, c.ignored());
    }

    #[test]
    fn hostile_disk_driver() {
        let mut bytes = vec![0u8; 64 << 10];
        let mem = ByteMem::new(&mut bytes);
        attached(&mem);
        let mut c = BlockChannel::connect(mem, NoBell).unwrap();
        let layout = BlockLayout::read(&mem).unwrap();
        let (_, mut responses) = layout.driver_rings(&mem).unwrap();
        let info_id = c.info_id.unwrap();
        // A GetInfo answer with a zero-sized disk is refused.
        responses.push(&Response::info(info_id, DiskInfo { capacity_sectors: 0, ..info() }).from(1).encode()).unwrap();
        assert_eq!(c.poll_info(), Some(Err(Status::IoError)));
        c.info = Some(info());
        c.submit(&BlockRequest { id: 7, op: BlockOp::Read, sector: 0, len: 512 }, &[]).unwrap();
        let wire = c.slots.iter().flatten().next().unwrap().wire_id;
        // Answers for ids not in flight, and from another incarnation, are dropped; then the
        // real one.
        responses.push(&Response::new(wire + 1, Status::Ok).from(1).encode()).unwrap();
        responses.push(&Response::new(wire, Status::Ok).from(2).encode()).unwrap();
        responses.push(&Response::new(wire, Status::Unknown(77)).from(1).encode()).unwrap();
        let mut buf = Vec::new();
        assert_eq!(c.poll(&mut buf), Some((7, BlockStatus::IoError)));
        assert_eq!(c.ignored(), 2);
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
        let d = NetHeader { mac: MacAddr([2, 0, 0, 0, 0, 9]), mtu: 1500, link_up: true }.attach_driver(mem).unwrap();
        let (mut from_guest, mut to_guest) = (d.tx, d.rx);
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

    /// Issue 12: the net driver VM dies with frames on both rings and a new incarnation
    /// re-attaches, many times over; the back end drops what the dead one left on the RX
    /// ring, the new one takes what the guest queued on the TX ring, the doorbell rings for
    /// it; when dom0 gives up the link goes down and frames are refused, and `ctl restart`
    /// brings the link back.
    #[test]
    fn net_channel_follows_driver_restarts_and_server_gone() {
        let bytes: &'static mut [u8] = Box::leak(vec![0u8; 256 << 10].into_boxed_slice());
        let mem: &'static ByteMem<'static> = Box::leak(Box::new(ByteMem::new(bytes)));
        let header = NetHeader { mac: MacAddr([2, 0x4d, 0, 0, 0, 0]), mtu: 1500, link_up: true };
        let mut bell = Count::default();
        let mut driver = header.attach_driver(mem).unwrap();
        let mut n = NetChannel::attach(mem, &mut bell).unwrap();
        let frame = |k: u32, len: usize| -> Vec<u8> { (0..len).map(|i| (k as usize * 7 + i) as u8).collect() };
        let mut buf = [0u8; 1600];
        let mut k = 0u32;
        for restart in 1..=12u64 {
            // The driver delivers two frames (taken), leaves `restart % 3` more behind, and
            // the guest queues `restart % 4` frames it never takes.
            for _ in 0..2 {
                driver.rx.send(&frame(k, 60 + k as usize % 40)).unwrap();
                assert_eq!(n.recv(&mut buf), Some(60 + k as usize % 40));
                assert_eq!(&buf[..60 + k as usize % 40], &frame(k, 60 + k as usize % 40)[..]);
                k += 1;
            }
            for _ in 0..restart % 3 {
                driver.rx.send(&frame(9999, 70)).unwrap();
            }
            let queued: Vec<Vec<u8>> = (0..restart % 4).map(|j| frame(1000 + j as u32, 80)).collect();
            for f in &queued {
                n.send(f).unwrap();
            }
            let bells = n.doorbell.0;
            // The driver VM dies (its ends are simply not used again).
            driver = header.attach_driver(mem).unwrap();
            assert_eq!(driver.incarnation, restart as u32 + 1);
            // The device's pass notices the new incarnation and rings it.
            n.poll();
            assert_eq!((n.restarts, n.incarnation()), (restart, restart as u32 + 1));
            assert_eq!(n.doorbell.0, bells + 1, "the new incarnation is rung");
            n.poll();
            assert_eq!(n.doorbell.0, bells + 1, "once");
            for f in &queued {
                assert_eq!(driver.tx.recv(&mut buf), Ok(Some(f.len())));
                assert_eq!(&buf[..f.len()], &f[..]);
            }
            assert_eq!(driver.tx.recv(&mut buf), Ok(None));
            // The dead one's leftovers are dropped; the new one's frames come through.
            driver.rx.send(&frame(k, 90)).unwrap();
            assert_eq!(n.recv(&mut buf), Some(90));
            assert_eq!(&buf[..90], &frame(k, 90)[..]);
            k += 1;
            assert!(n.link_up());
        }
        let stale: u64 = (1..=12u64).map(|r| r % 3).sum();
        assert_eq!(n.stale_dropped(), stale);
        assert_eq!(n.identity_changes, 0);
        // Two restarts between two looks count as one change, and a MAC change is counted.
        header.attach_driver(mem).unwrap();
        let changed = NetHeader { mac: MacAddr([2, 0, 0, 0, 0, 1]), ..header }.attach_driver(mem).unwrap();
        n.poll();
        assert_eq!((n.restarts, n.incarnation(), n.identity_changes), (13, 15, 1));
        assert_eq!(n.mac(), [2, 0x4d, 0, 0, 0, 0], "the device keeps its MAC");
        assert_eq!(changed.incarnation, 15);
        // The driver VM dies and dom0 gives up: the link goes down, frames are refused (not
        // kept for room).
        wire::mark_server_gone(mem, true);
        n.poll();
        assert!(!n.link_up() && n.server_gone());
        assert_eq!(n.send(&frame(1, 60)), Err(SendError::Dropped));
        assert_eq!(n.gone_dropped, 1);
        // `ctl restart`: dom0 clears the mark, the next incarnation raises the link.
        wire::mark_server_gone(mem, false);
        let mut driver = header.attach_driver(mem).unwrap();
        n.poll();
        assert!(n.link_up() && !n.server_gone());
        n.send(&frame(2, 60)).unwrap();
        assert_eq!(driver.tx.recv(&mut buf), Ok(Some(60)));
        assert_eq!(n.incarnation(), 16);
    }
}

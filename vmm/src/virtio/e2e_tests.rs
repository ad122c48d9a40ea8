//! Linux's driver sequence played against the PCI bus, the virtio-pci functions and the
//! devices, with in-memory back ends: PCI scan and BAR sizing, feature negotiation, MSI-X,
//! queue setup, block reads and writes, network send and receive; then hostile drivers.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

use proptest::prelude::*;

use super::blk::{self, BlockBackend, BlockGeometry, BlockOp, BlockRequest, BlockStatus, Busy, VirtioBlk};
use super::net::{self, NetBackend, SendError, VirtioNet};
use super::pci::{MsiMessage, VirtioPci, BAR0_SIZE, NO_VECTOR};
use super::pci_bus::PciBus;
use super::queue::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use super::{status, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1};
use crate::memory::{GuestMemory, VecMemory};
use crate::x2apic::{ApicConfig, X2Apic};

const BLK_SLOT: u8 = 1;
const NET_SLOT: u8 = 2;
const BLK_BAR: u64 = 0xe000_0000;
const NET_BAR: u64 = 0xe000_0000 + BAR0_SIZE;
const RAM: usize = 1 << 20;
const DISK_SECTORS: u64 = 2048;

/// An in-memory disk that finishes requests one poll later, in order, and takes at most
/// `max_in_flight` at once.
struct MemDisk {
    disk: Vec<u8>,
    pending: VecDeque<(BlockRequest, Vec<u8>)>,
    max_in_flight: usize,
    flushes: u32,
}

impl MemDisk {
    fn new(max_in_flight: usize) -> Self {
        let disk = (0..DISK_SECTORS as usize * 512).map(|i| (i % 251) as u8).collect();
        Self { disk, pending: VecDeque::new(), max_in_flight, flushes: 0 }
    }
}

impl BlockBackend for MemDisk {
    fn geometry(&self) -> BlockGeometry {
        BlockGeometry { capacity_sectors: DISK_SECTORS, block_size: 512, max_request_bytes: 64 << 10, read_only: false }
    }

    fn submit(&mut self, req: &BlockRequest, data: &[u8]) -> Result<(), Busy> {
        if self.pending.len() >= self.max_in_flight {
            return Err(Busy);
        }
        assert_eq!(data.len(), if req.op == BlockOp::Write { req.len as usize } else { 0 });
        self.pending.push_back((*req, data.to_vec()));
        Ok(())
    }

    fn poll(&mut self, read_data: &mut Vec<u8>) -> Option<(u64, BlockStatus)> {
        let (req, data) = self.pending.pop_front()?;
        let start = req.sector as usize * 512;
        let range = start..start + req.len as usize;
        read_data.clear();
        match req.op {
            BlockOp::Read => read_data.extend_from_slice(&self.disk[range]),
            BlockOp::Write => self.disk[range].copy_from_slice(&data),
            BlockOp::Flush => self.flushes += 1,
        }
        Some((req.id, BlockStatus::Ok))
    }
}

/// A wire: frames the guest sent, frames waiting for the guest.
#[derive(Default)]
struct Wire {
    sent: Vec<Vec<u8>>,
    incoming: VecDeque<Vec<u8>>,
    busy: bool,
    link_down: bool,
}

impl NetBackend for Wire {
    fn mac(&self) -> [u8; 6] {
        [0x02, 0, 0, 0, 0, 7]
    }

    fn mtu(&self) -> u16 {
        1500
    }

    fn link_up(&self) -> bool {
        !self.link_down
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), SendError> {
        if self.busy {
            return Err(SendError::Busy);
        }
        self.sent.push(frame.to_vec());
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Option<usize> {
        let f = self.incoming.pop_front()?;
        buf[..f.len()].copy_from_slice(&f);
        Some(f.len())
    }
}

fn platform(disk_in_flight: usize) -> PciBus {
    let mut bus = PciBus::new();
    bus.add(BLK_SLOT, BLK_BAR, VirtioPci::new(Box::new(VirtioBlk::new(MemDisk::new(disk_in_flight), b"vda-serial"))))
        .unwrap();
    bus.add(NET_SLOT, NET_BAR, VirtioPci::new(Box::new(VirtioNet::new(Wire::default())))).unwrap();
    bus
}

/// The guest side: config space through 0xCF8/0xCFC, BAR 0 through MMIO.
struct Guest {
    bus: PciBus,
    mem: VecMemory,
}

/// What the driver found in the capabilities.
#[derive(Clone, Copy, Debug, Default)]
struct Caps {
    common: u64,
    notify: u64,
    notify_mult: u64,
    isr: u64,
    device: u64,
    msix_cap: u8,
    msix_table: u64,
}

/// A split queue as the driver sets it up.
#[derive(Clone, Copy, Debug)]
struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_seen: u16,
}

impl Guest {
    fn new(bus: PciBus) -> Self {
        Self { bus, mem: VecMemory::new(0, RAM) }
    }

    fn select(&mut self, slot: u8, reg: u8) {
        assert!(self.bus.io_out(0xcf8, 4, 0x8000_0000 | u32::from(slot) << 11 | u32::from(reg & 0xfc)));
    }

    fn cfg_read(&mut self, slot: u8, reg: u8, size: u8) -> u32 {
        self.select(slot, reg);
        self.bus.io_in(0xcfc + u16::from(reg & 3), size).unwrap()
    }

    fn cfg_write(&mut self, slot: u8, reg: u8, size: u8, v: u32) {
        self.select(slot, reg);
        assert!(self.bus.io_out(0xcfc + u16::from(reg & 3), size, v));
    }

    fn rd(&mut self, gpa: u64, size: usize) -> u64 {
        let mut b = [0u8; 8];
        assert!(self.bus.mmio_read(gpa, &mut b[..size]), "unclaimed read at {gpa:#x}");
        u64::from_le_bytes(b)
    }

    fn wr(&mut self, gpa: u64, size: usize, v: u64) {
        let b = v.to_le_bytes();
        assert!(self.bus.mmio_write(gpa, &b[..size], &mut self.mem), "unclaimed write at {gpa:#x}");
    }

    /// Linux's `pci_check_type1`, the bus-0 scan, BAR sizing (`__pci_read_base`), enabling
    /// memory and bus mastering, and `virtio_pci_find_capability`.
    fn probe(&mut self, slot: u8) -> Caps {
        assert!(self.bus.io_out(0xcfb, 1, 1));
        let saved = self.bus.io_in(0xcf8, 4).unwrap();
        self.bus.io_out(0xcf8, 4, 0x8000_0000);
        assert_eq!(self.bus.io_in(0xcf8, 4), Some(0x8000_0000));
        self.bus.io_out(0xcf8, 4, saved);
        assert_eq!(self.cfg_read(0, 0x0a, 2), 0x0600, "host bridge class");
        let id = self.cfg_read(slot, 0, 4);
        assert_eq!(id & 0xffff, 0x1af4);
        let bar_lo = self.cfg_read(slot, 0x10, 4);
        let bar_hi = self.cfg_read(slot, 0x14, 4);
        assert_eq!(bar_lo & 0xf, 0x4, "64-bit memory BAR");
        self.cfg_write(slot, 0x10, 4, 0xffff_ffff);
        self.cfg_write(slot, 0x14, 4, 0xffff_ffff);
        let sz = u64::from(self.cfg_read(slot, 0x10, 4) & !0xf) | u64::from(self.cfg_read(slot, 0x14, 4)) << 32;
        assert_eq!((!sz).wrapping_add(1), BAR0_SIZE);
        self.cfg_write(slot, 0x10, 4, bar_lo);
        self.cfg_write(slot, 0x14, 4, bar_hi);
        let bar = u64::from(bar_lo & !0xf) | u64::from(bar_hi) << 32;
        if self.cfg_read(slot, 0x04, 2) & 2 == 0 {
            assert!(!self.bus.mmio_read(bar, &mut [0u8; 4]), "no decoding before the Memory Space bit");
        }
        self.cfg_write(slot, 0x04, 2, 0x6); // memory + bus master
        let mut caps = Caps::default();
        let mut at = self.cfg_read(slot, 0x34, 1) as u8;
        let mut hops = 0;
        while at != 0 {
            hops += 1;
            assert!(hops < 48);
            let id = self.cfg_read(slot, at, 1);
            if id == 0x09 {
                let ty = self.cfg_read(slot, at + 3, 1);
                assert_eq!(self.cfg_read(slot, at + 4, 1), 0, "BAR 0");
                let off = bar + u64::from(self.cfg_read(slot, at + 8, 4));
                match ty {
                    1 => caps.common = off,
                    2 => {
                        caps.notify = off;
                        caps.notify_mult = u64::from(self.cfg_read(slot, at + 16, 4));
                    }
                    3 => caps.isr = off,
                    4 => caps.device = off,
                    _ => {}
                }
            } else if id == 0x11 {
                caps.msix_cap = at;
                caps.msix_table = bar + u64::from(self.cfg_read(slot, at + 4, 4) & !7);
            }
            at = self.cfg_read(slot, at + 1, 1) as u8;
        }
        assert!(caps.common != 0 && caps.notify != 0 && caps.isr != 0 && caps.device != 0 && caps.msix_cap != 0);
        caps
    }

    /// `virtio_dev_probe` up to FEATURES_OK; returns the negotiated features.
    fn negotiate(&mut self, c: &Caps, wanted: u64) -> u64 {
        self.wr(c.common + 0x14, 1, 0);
        assert_eq!(self.rd(c.common + 0x14, 1), 0);
        self.wr(c.common + 0x14, 1, u64::from(status::ACKNOWLEDGE));
        self.wr(c.common + 0x14, 1, u64::from(status::ACKNOWLEDGE | status::DRIVER));
        self.wr(c.common, 4, 0);
        let lo = self.rd(c.common + 4, 4);
        self.wr(c.common, 4, 1);
        let hi = self.rd(c.common + 4, 4);
        let features = (lo | hi << 32) & wanted;
        self.wr(c.common + 8, 4, 0);
        self.wr(c.common + 0xc, 4, features & 0xffff_ffff);
        self.wr(c.common + 8, 4, 1);
        self.wr(c.common + 0xc, 4, features >> 32);
        self.wr(c.common + 0x14, 1, u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK));
        assert_eq!(self.rd(c.common + 0x14, 1) as u8 & status::FEATURES_OK, status::FEATURES_OK);
        features
    }

    /// MSI-X entries for `n` vectors (vector `base + i`), then MSI-X on.
    fn setup_msix(&mut self, slot: u8, c: &Caps, n: u16, base: u8) {
        for i in 0..u64::from(n) {
            let e = c.msix_table + 16 * i;
            self.wr(e, 4, 0xfee0_0000);
            self.wr(e + 4, 4, 0);
            self.wr(e + 8, 4, u64::from(base) + i);
            self.wr(e + 12, 4, 0);
        }
        let ctrl = self.cfg_read(slot, c.msix_cap + 2, 2);
        assert_eq!(ctrl & 0x7ff, u32::from(n) - 1, "table size");
        self.cfg_write(slot, c.msix_cap + 2, 2, ctrl | 0x8000);
        self.wr(c.common + 0x10, 2, u64::from(n) - 1); // config vector: the last one
        assert_eq!(self.rd(c.common + 0x10, 2), u64::from(n) - 1);
    }

    /// `setup_vq` of virtio_pci_modern for queue `index` with rings at `base`.
    fn setup_queue(&mut self, c: &Caps, index: u16, size: u16, base: u64, vector: u16) -> DriverQueue {
        self.wr(c.common + 0x16, 2, u64::from(index));
        let max = self.rd(c.common + 0x18, 2) as u16;
        assert!(max >= size);
        assert_eq!(self.rd(c.common + 0x1c, 2), 0, "not enabled yet");
        self.wr(c.common + 0x18, 2, u64::from(size));
        let n = u64::from(size);
        let q = DriverQueue {
            size,
            desc: base,
            avail: base + 16 * n,
            used: (base + 16 * n + 6 + 2 * n + 3) & !3,
            avail_idx: 0,
            used_seen: 0,
        };
        for (off, v) in [(0x20, q.desc), (0x28, q.avail), (0x30, q.used)] {
            self.wr(c.common + off, 4, v & 0xffff_ffff);
            self.wr(c.common + off + 4, 4, v >> 32);
        }
        self.wr(c.common + 0x1a, 2, u64::from(vector));
        assert_eq!(self.rd(c.common + 0x1a, 2), u64::from(vector));
        q
    }

    fn enable_queue(&mut self, c: &Caps, index: u16) {
        self.wr(c.common + 0x16, 2, u64::from(index));
        self.wr(c.common + 0x1c, 2, 1);
        assert_eq!(self.rd(c.common + 0x1c, 2), 1);
    }

    fn driver_ok(&mut self, c: &Caps) {
        let s = self.rd(c.common + 0x14, 1);
        self.wr(c.common + 0x14, 1, s | u64::from(status::DRIVER_OK));
        assert_eq!(
            self.rd(c.common + 0x14, 1) as u8,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
        );
    }

    fn put_desc(&mut self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        self.mem.write(table + 16 * u64::from(i), &b).unwrap();
    }

    fn post(&mut self, q: &mut DriverQueue, head: u16) {
        let slot = q.avail + 4 + 2 * u64::from(q.avail_idx % q.size);
        self.mem.write(slot, &head.to_le_bytes()).unwrap();
        q.avail_idx = q.avail_idx.wrapping_add(1);
        self.mem.write(q.avail + 2, &q.avail_idx.to_le_bytes()).unwrap();
    }

    fn notify(&mut self, c: &Caps, index: u16) {
        self.wr(c.notify + c.notify_mult * u64::from(index), 2, u64::from(index));
    }

    /// Used entries not seen yet, as (head, len).
    fn used(&mut self, q: &mut DriverQueue) -> Vec<(u16, u32)> {
        let mut b = [0u8; 2];
        self.mem.read(q.used + 2, &mut b).unwrap();
        let idx = u16::from_le_bytes(b);
        let mut out = Vec::new();
        while q.used_seen != idx {
            let e = q.used + 4 + 8 * u64::from(q.used_seen % q.size);
            out.push((self.mem.read_u32(e).unwrap() as u16, self.mem.read_u32(e + 4).unwrap()));
            q.used_seen = q.used_seen.wrapping_add(1);
        }
        // `virtqueue_enable_cb`: with EVENT_IDX, ask for an interrupt at the next entry.
        let used_event = q.avail + 4 + 2 * u64::from(q.size);
        self.mem.write(used_event, &q.used_seen.to_le_bytes()).unwrap();
        out
    }

    fn messages(&mut self) -> Vec<MsiMessage> {
        self.bus.take_messages()
    }
}

fn blk_header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Brings the block function up as Linux does; returns its caps and request queue.
fn blk_up(g: &mut Guest) -> (Caps, DriverQueue) {
    let c = g.probe(BLK_SLOT);
    let wanted =
        F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX | blk::F_SEG_MAX | blk::F_SIZE_MAX | blk::F_BLK_SIZE | blk::F_FLUSH;
    let features = g.negotiate(&c, wanted);
    assert_eq!(features, wanted);
    // virtblk_probe reads the configuration.
    assert_eq!(g.rd(c.device, 8), DISK_SECTORS);
    assert_eq!(g.rd(c.device + 8, 4), 4096, "size_max");
    assert_eq!(g.rd(c.device + 12, 4), 16, "seg_max: 64 KiB / 4 KiB");
    assert_eq!(g.rd(c.device + 20, 4), 512, "blk_size");
    g.setup_msix(BLK_SLOT, &c, 2, 0x30);
    let q = g.setup_queue(&c, 0, 128, 0x10000, 0);
    g.enable_queue(&c, 0);
    g.driver_ok(&c);
    (c, q)
}

#[test]
fn linux_block_sequence() {
    let mut g = Guest::new(platform(4));
    // Absent slots, functions and buses read all-ones.
    assert_eq!(g.cfg_read(5, 0, 4), 0xffff_ffff);
    g.select(BLK_SLOT, 0);
    assert!(g.bus.io_out(0xcf8, 4, 0x8000_0000 | u32::from(BLK_SLOT) << 11 | 1 << 8));
    assert_eq!(g.bus.io_in(0xcfc, 4), Some(0xffff_ffff));
    assert!(g.bus.io_out(0xcf8, 4, 0x8001_0000));
    assert_eq!(g.bus.io_in(0xcfc, 2), Some(0xffff));
    assert_eq!(g.cfg_read(BLK_SLOT, 0, 4), 0x1042_1af4);
    assert_eq!(g.cfg_read(NET_SLOT, 0, 4), 0x1041_1af4);

    let (c, mut q) = blk_up(&mut g);
    let mut apic =
        X2Apic::new(ApicConfig { id: 0, tsc_hz: 1_000_000_000, bus_hz: 1_000_000_000, start_in_x2apic: true });
    apic.write_msr(0x80f, 0x1ff, 0).unwrap();

    // A read of sector 0: header, 512 bytes of data, status, as three direct descriptors.
    g.mem.write(0x20000, &blk_header(blk::T_IN, 0)).unwrap();
    g.mem.write(0x20100, &[0xee]).unwrap();
    g.put_desc(q.desc, 0, 0x20000, 16, DESC_F_NEXT, 1);
    g.put_desc(q.desc, 1, 0x21000, 512, DESC_F_NEXT | DESC_F_WRITE, 2);
    g.put_desc(q.desc, 2, 0x20100, 1, DESC_F_WRITE, 0);
    g.post(&mut q, 0);
    g.notify(&c, 0);
    assert_eq!(g.used(&mut q), [], "the back end answers later");
    g.bus.poll(&mut g.mem);
    assert_eq!(g.used(&mut q), [(0, 513)]);
    assert_eq!(g.mem.bytes()[0x20100], blk::S_OK);
    let expect: Vec<u8> = (0..512).map(|i| (i % 251) as u8).collect();
    assert_eq!(&g.mem.bytes()[0x21000..0x21200], &expect[..]);
    let msgs = g.messages();
    assert_eq!(msgs, [MsiMessage { address: 0xfee0_0000, data: 0x30 }]);
    for m in msgs {
        assert_eq!(m.destination(), 0);
        assert!(apic.request(m.fixed_vector().unwrap(), false));
    }
    assert_eq!(apic.highest_deliverable(), Some(0x30));

    // A write of 8 sectors at sector 8 through an indirect table (Linux's usual shape),
    // data in two 2 KiB segments.
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    g.mem.write(0x30000, &pattern).unwrap();
    g.mem.write(0x22000, &blk_header(blk::T_OUT, 8)).unwrap();
    let table = 0x23000;
    g.put_desc(table, 0, 0x22000, 16, DESC_F_NEXT, 1);
    g.put_desc(table, 1, 0x30000, 2048, DESC_F_NEXT, 2);
    g.put_desc(table, 2, 0x30800, 2048, DESC_F_NEXT, 3);
    g.put_desc(table, 3, 0x22100, 1, DESC_F_WRITE, 0);
    g.put_desc(q.desc, 5, table, 64, DESC_F_INDIRECT, 0);
    g.post(&mut q, 5);
    // Flush and GET_ID right behind it.
    g.mem.write(0x24000, &blk_header(blk::T_FLUSH, 0)).unwrap();
    g.put_desc(q.desc, 6, 0x24000, 16, DESC_F_NEXT, 7);
    g.put_desc(q.desc, 7, 0x24100, 1, DESC_F_WRITE, 0);
    g.post(&mut q, 6);
    g.mem.write(0x25000, &blk_header(blk::T_GET_ID, 0)).unwrap();
    g.put_desc(q.desc, 8, 0x25000, 16, DESC_F_NEXT, 9);
    g.put_desc(q.desc, 9, 0x25100, 20, DESC_F_NEXT | DESC_F_WRITE, 10);
    g.put_desc(q.desc, 10, 0x25200, 1, DESC_F_WRITE, 0);
    g.post(&mut q, 8);
    g.notify(&c, 0);
    assert_eq!(g.used(&mut q), [(8, 21)], "GET_ID is answered at once");
    assert_eq!(&g.mem.bytes()[0x25100..0x2510a], b"vda-serial");
    assert_eq!(g.mem.bytes()[0x25200], blk::S_OK);
    g.bus.poll(&mut g.mem);
    g.bus.poll(&mut g.mem);
    assert_eq!(g.used(&mut q), [(5, 1), (6, 1)]);
    assert_eq!([g.mem.bytes()[0x22100], g.mem.bytes()[0x24100]], [blk::S_OK, blk::S_OK]);
    // Read it back through the device.
    g.mem.write(0x20000, &blk_header(blk::T_IN, 8)).unwrap();
    g.put_desc(q.desc, 1, 0x40000, 4096, DESC_F_NEXT | DESC_F_WRITE, 2);
    g.post(&mut q, 0);
    g.notify(&c, 0);
    g.bus.poll(&mut g.mem);
    assert_eq!(g.used(&mut q), [(0, 4097)]);
    assert_eq!(&g.mem.bytes()[0x40000..0x41000], &pattern[..]);

    // Errors the guest sees, the queue going on: past the end, not whole sectors, unknown type,
    // larger than one back-end request, no status byte.
    for (i, (kind, sector, len, status)) in [
        (blk::T_IN, DISK_SECTORS - 1, 1024u32, blk::S_IOERR),
        (blk::T_IN, u64::MAX, 512, blk::S_IOERR),
        (blk::T_IN, 0, 100, blk::S_IOERR),
        (11, 0, 512, blk::S_UNSUPP),
        (blk::T_IN, 0, 128 << 10, blk::S_IOERR),
    ]
    .into_iter()
    .enumerate()
    {
        g.mem.write(0x20000, &blk_header(kind, sector)).unwrap();
        g.mem.write(0x20100, &[0xee]).unwrap();
        g.put_desc(q.desc, 1, 0x40000, len, DESC_F_NEXT | DESC_F_WRITE, 2);
        g.post(&mut q, 0);
        g.notify(&c, 0);
        assert_eq!(g.used(&mut q), [(0, 1)], "case {i}");
        assert_eq!(g.mem.bytes()[0x20100], status, "case {i}");
    }
    g.put_desc(q.desc, 11, 0x20000, 16, 0, 0);
    g.post(&mut q, 11);
    g.notify(&c, 0);
    assert_eq!(g.used(&mut q), [(11, 0)]);
    assert_eq!(g.bus.function(BLK_SLOT).unwrap().status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn block_back_end_busy_and_many_in_flight() {
    let mut g = Guest::new(platform(2));
    let (c, mut q) = blk_up(&mut g);
    // Ten reads of one sector each at once; the back end takes two at a time.
    for i in 0..10u16 {
        let base = 0x20000 + 0x1000 * u64::from(i);
        g.mem.write(base, &blk_header(blk::T_IN, u64::from(i))).unwrap();
        g.put_desc(q.desc, 3 * i, base, 16, DESC_F_NEXT, 3 * i + 1);
        g.put_desc(q.desc, 3 * i + 1, base + 0x200, 512, DESC_F_NEXT | DESC_F_WRITE, 3 * i + 2);
        g.put_desc(q.desc, 3 * i + 2, base + 0x100, 1, DESC_F_WRITE, 0);
        g.post(&mut q, 3 * i);
    }
    g.notify(&c, 0);
    let mut done = Vec::new();
    for _ in 0..20 {
        g.bus.poll(&mut g.mem);
        done.extend(g.used(&mut q));
    }
    assert_eq!(done.len(), 10);
    for (n, (head, len)) in done.into_iter().enumerate() {
        assert_eq!((head, len), (3 * n as u16, 513));
        let base = 0x20000 + 0x1000 * n;
        assert_eq!(g.mem.bytes()[base + 0x100], blk::S_OK);
        assert_eq!(g.mem.bytes()[base + 0x200], ((n * 512) % 251) as u8);
    }
}

#[test]
fn linux_net_sequence() {
    let mut g = Guest::new(platform(4));
    let c = g.probe(NET_SLOT);
    let wanted = F_VERSION_1 | F_EVENT_IDX | net::F_MAC | net::F_STATUS | net::F_MTU | (1 << 0) /* CSUM: not offered */;
    let features = g.negotiate(&c, wanted);
    assert_eq!(features, wanted & !1);
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        *b = g.rd(c.device + i as u64, 1) as u8;
    }
    assert_eq!(mac, [2, 0, 0, 0, 0, 7]);
    assert_eq!(g.rd(c.device + 6, 2), u64::from(net::S_LINK_UP));
    assert_eq!(g.rd(c.device + 10, 2), 1500);
    g.setup_msix(NET_SLOT, &c, 3, 0x40);
    let mut rx = g.setup_queue(&c, 0, 64, 0x10000, 0);
    let mut tx = g.setup_queue(&c, 1, 64, 0x12000, 1);
    g.enable_queue(&c, 0);
    g.enable_queue(&c, 1);
    g.driver_ok(&c);
    // Receive buffers: Linux's small buffers, 12 + 1518 bytes each.
    for i in 0..4u16 {
        g.put_desc(rx.desc, i, 0x20000 + 0x800 * u64::from(i), 12 + 1518, DESC_F_WRITE, 0);
        g.post(&mut rx, i);
    }
    g.notify(&c, 0);
    assert_eq!(g.used(&mut rx), []);

    // Send a frame: header and frame in one buffer, as `xmit_skb` does with headroom.
    let frame: Vec<u8> = (0..60u8).collect();
    let mut buf = vec![0u8; 12];
    buf.extend_from_slice(&frame);
    g.mem.write(0x30000, &buf).unwrap();
    g.put_desc(tx.desc, 0, 0x30000, buf.len() as u32, 0, 0);
    g.post(&mut tx, 0);
    g.notify(&c, 1);
    assert_eq!(g.used(&mut tx), [(0, 0)]);
    assert_eq!(g.messages(), [MsiMessage { address: 0xfee0_0000, data: 0x41 }]);

    // Receive one.
    let incoming: Vec<u8> = (0..100u8).rev().collect();
    with_wire(&mut g.bus, |w| {
        assert_eq!(w.sent, core::slice::from_ref(&frame));
        w.incoming.push_back(incoming.clone());
    });
    g.bus.poll(&mut g.mem);
    assert_eq!(g.used(&mut rx), [(0, 112)]);
    let got = &g.mem.bytes()[0x20000..0x20000 + 112];
    assert_eq!(&got[..10], &[0; 10]);
    assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers");
    assert_eq!(&got[12..], &incoming[..]);
    assert_eq!(g.messages(), [MsiMessage { address: 0xfee0_0000, data: 0x40 }]);

    // Back-pressure: a busy wire keeps the frame until it has room.
    with_wire(&mut g.bus, |w| w.busy = true);
    g.mem.write(0x30000, &buf).unwrap();
    g.post(&mut tx, 0);
    g.notify(&c, 1);
    assert_eq!(g.used(&mut tx), []);
    with_wire(&mut g.bus, |w| w.busy = false);
    g.bus.poll(&mut g.mem);
    assert_eq!(g.used(&mut tx), [(0, 0)]);
    with_wire(&mut g.bus, |w| assert_eq!(w.sent.len(), 2));
    // A frame asking for checksum offload (not negotiated) and a runt are dropped.
    for bad in [
        {
            let mut b = buf.clone();
            b[0] = 1;
            b
        },
        vec![0u8; 12 + 10],
    ] {
        g.mem.write(0x30000, &bad).unwrap();
        g.put_desc(tx.desc, 0, 0x30000, bad.len() as u32, 0, 0);
        g.post(&mut tx, 0);
        g.notify(&c, 1);
        assert_eq!(g.used(&mut tx), [(0, 0)]);
    }
    with_wire(&mut g.bus, |w| assert_eq!(w.sent.len(), 2));
    // A receive buffer too small: the frame is dropped, the buffer returned empty.
    g.put_desc(rx.desc, 1, 0x20800, 40, DESC_F_WRITE, 0);
    with_wire(&mut g.bus, |w| w.incoming.push_back(incoming.clone()));
    g.bus.poll(&mut g.mem);
    assert_eq!(g.used(&mut rx), [(1, 0)]);
    // Link down: a configuration interrupt on the config vector, status reads 0.
    g.messages();
    with_wire(&mut g.bus, |w| w.link_down = true);
    g.bus.poll(&mut g.mem);
    assert_eq!(g.messages(), [MsiMessage { address: 0xfee0_0000, data: 0x42 }]);
    assert_eq!(g.rd(c.device + 6, 2), 0);
}

/// Reaches the net function's back end (the test owns the bus, as the VMM would).
fn with_wire(bus: &mut PciBus, f: impl FnOnce(&mut Wire)) {
    let dev = bus.function_mut(NET_SLOT).unwrap();
    let net = dev.device_mut().as_any_mut().downcast_mut::<VirtioNet<Wire>>().unwrap();
    f(net.backend_mut());
}

#[test]
fn feature_and_status_abuse() {
    let mut g = Guest::new(platform(4));
    let c = g.probe(BLK_SLOT);
    let st = |g: &mut Guest| g.rd(c.common + 0x14, 1) as u8;
    let set_features = |g: &mut Guest, f: u64| {
        g.wr(c.common + 8, 4, 0);
        g.wr(c.common + 0xc, 4, f & 0xffff_ffff);
        g.wr(c.common + 8, 4, 1);
        g.wr(c.common + 0xc, 4, f >> 32);
    };
    let (a, d, fok) = (u64::from(status::ACKNOWLEDGE), u64::from(status::DRIVER), u64::from(status::FEATURES_OK));
    g.wr(c.common + 0x14, 1, a | d);
    // Unknown feature bit: FEATURES_OK does not stick.
    set_features(&mut g, F_VERSION_1 | 1 << 40);
    g.wr(c.common + 0x14, 1, a | d | fok);
    assert_eq!(st(&mut g), status::ACKNOWLEDGE | status::DRIVER);
    // A legacy driver (no VERSION_1) is refused too.
    set_features(&mut g, blk::F_FLUSH);
    g.wr(c.common + 0x14, 1, a | d | fok);
    assert_eq!(st(&mut g) & status::FEATURES_OK, 0);
    // Feature words past 1 read 0 and take no writes.
    g.wr(c.common, 4, 7);
    assert_eq!(g.rd(c.common + 4, 4), 0);
    g.wr(c.common + 8, 4, 2);
    g.wr(c.common + 0xc, 4, 0xffff_ffff);
    assert_eq!(g.rd(c.common + 0xc, 4), 0);
    // Good features, then an attempt to change them after FEATURES_OK.
    set_features(&mut g, F_VERSION_1 | blk::F_FLUSH);
    g.wr(c.common + 0x14, 1, a | d | fok);
    assert_eq!(st(&mut g) & status::FEATURES_OK, status::FEATURES_OK);
    set_features(&mut g, F_VERSION_1 | F_EVENT_IDX);
    assert_eq!(g.bus.function(BLK_SLOT).unwrap().driver_features(), F_VERSION_1 | blk::F_FLUSH);
    // Clearing bits is ignored.
    g.wr(c.common + 0x14, 1, a);
    assert_eq!(st(&mut g), status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    // Out-of-range vectors read back NO_VECTOR; an absent queue reads size 0.
    g.wr(c.common + 0x10, 2, 9);
    assert_eq!(g.rd(c.common + 0x10, 2), u64::from(NO_VECTOR));
    g.wr(c.common + 0x16, 2, 7);
    assert_eq!(g.rd(c.common + 0x18, 2), 0);
    assert_eq!(g.rd(c.common + 0x1a, 2), u64::from(NO_VECTOR));
    g.wr(c.common + 0x1c, 2, 1);
    assert_eq!(g.rd(c.common + 0x1c, 2), 0);
    // A queue size that is not a power of two: enabling it needs a reset.
    g.setup_msix(BLK_SLOT, &c, 2, 0x30);
    g.setup_queue(&c, 0, 128, 0x10000, 0);
    g.wr(c.common + 0x18, 2, 100);
    g.wr(c.common + 0x1c, 2, 1);
    assert_eq!(st(&mut g) & status::DEVICE_NEEDS_RESET, status::DEVICE_NEEDS_RESET);
    assert_eq!(g.rd(c.common + 0x1c, 2), 0);
    assert_eq!(g.messages(), [MsiMessage { address: 0xfee0_0000, data: 0x31 }], "configuration interrupt");
    // DRIVER_OK does nothing for a device that needs a reset; reset clears everything.
    g.wr(c.common + 0x14, 1, a | d | fok | u64::from(status::DRIVER_OK));
    assert_ne!(st(&mut g) & status::DEVICE_NEEDS_RESET, 0);
    g.wr(c.common + 0x14, 1, 0);
    assert_eq!(st(&mut g), 0);
    assert_eq!(g.rd(c.common + 0x10, 2), u64::from(NO_VECTOR));
    // DRIVER_OK without FEATURES_OK.
    g.wr(c.common + 0x14, 1, a | d | u64::from(status::DRIVER_OK));
    assert_eq!(st(&mut g) & (status::DRIVER_OK | status::DEVICE_NEEDS_RESET), status::DEVICE_NEEDS_RESET);
    // And the full sequence works after a reset.
    g.wr(c.common + 0x14, 1, 0);
    let (c2, _) = blk_up(&mut g);
    assert_eq!(c2.common, c.common);
}

#[test]
fn corrupt_queue_is_contained_and_reset_recovers() {
    let mut g = Guest::new(platform(4));
    let (c, mut q) = blk_up(&mut g);
    // Queue registers are read-only once enabled.
    g.wr(c.common + 0x16, 2, 0);
    g.wr(c.common + 0x18, 2, 4);
    g.wr(c.common + 0x20, 4, 0x5000);
    assert_eq!((g.rd(c.common + 0x18, 2), g.rd(c.common + 0x20, 4)), (128, q.desc));
    // A chain that loops.
    g.put_desc(q.desc, 0, 0x20000, 16, DESC_F_NEXT, 1);
    g.put_desc(q.desc, 1, 0x21000, 512, DESC_F_NEXT | DESC_F_WRITE, 0);
    g.post(&mut q, 0);
    g.notify(&c, 0);
    let f = g.bus.function(BLK_SLOT).unwrap();
    assert_ne!(f.status() & status::DEVICE_NEEDS_RESET, 0);
    assert!(f.last_error().is_some());
    assert_eq!(g.messages(), [MsiMessage { address: 0xfee0_0000, data: 0x31 }]);
    // The device is stopped: a good request is not served until reset.
    g.mem.write(0x20000, &blk_header(blk::T_IN, 0)).unwrap();
    g.put_desc(q.desc, 1, 0x21000, 512, DESC_F_NEXT | DESC_F_WRITE, 2);
    g.put_desc(q.desc, 2, 0x20100, 1, DESC_F_WRITE, 0);
    g.post(&mut q, 0);
    g.notify(&c, 0);
    g.bus.poll(&mut g.mem);
    assert_eq!(g.used(&mut q), []);
    // The net function on the same bus is untouched.
    let n = g.probe(NET_SLOT);
    g.negotiate(&n, F_VERSION_1);
    // Reset and set up again: requests are served.
    g.wr(c.common + 0x14, 1, 0);
    let (c, mut q) = blk_up(&mut g);
    g.post(&mut q, 0);
    g.notify(&c, 0);
    g.bus.poll(&mut g.mem);
    assert_eq!(g.used(&mut q), [(0, 513)]);
    // Bus mastering off: the device does not touch memory.
    g.cfg_write(BLK_SLOT, 0x04, 2, 0x2);
    g.post(&mut q, 0);
    g.notify(&c, 0);
    g.bus.poll(&mut g.mem);
    assert_eq!(g.used(&mut q), []);
    g.cfg_write(BLK_SLOT, 0x04, 2, 0x6);
    g.notify(&c, 0);
    g.bus.poll(&mut g.mem);
    assert_eq!(g.used(&mut q), [(0, 513)]);
}

#[test]
fn msix_masking_and_bar_moves() {
    let mut g = Guest::new(platform(4));
    let (c, mut q) = blk_up(&mut g);
    g.mem.write(0x20000, &blk_header(blk::T_IN, 0)).unwrap();
    g.put_desc(q.desc, 0, 0x20000, 16, DESC_F_NEXT, 1);
    g.put_desc(q.desc, 1, 0x21000, 512, DESC_F_NEXT | DESC_F_WRITE, 2);
    g.put_desc(q.desc, 2, 0x20100, 1, DESC_F_WRITE, 0);
    // Entry 0 masked: the interrupt waits in the PBA.
    g.wr(c.msix_table + 12, 4, 1);
    g.post(&mut q, 0);
    g.notify(&c, 0);
    g.bus.poll(&mut g.mem);
    assert_eq!(g.used(&mut q).len(), 1);
    assert_eq!(g.messages(), []);
    let pba = c.msix_table + 0x1000;
    assert_eq!(g.rd(pba, 8), 1);
    g.wr(c.msix_table + 12, 4, 0);
    assert_eq!(g.messages(), [MsiMessage { address: 0xfee0_0000, data: 0x30 }]);
    assert_eq!(g.rd(pba, 8), 0);
    // Function mask, same.
    let ctrl = g.cfg_read(BLK_SLOT, c.msix_cap + 2, 2);
    g.cfg_write(BLK_SLOT, c.msix_cap + 2, 2, ctrl | 0x4000);
    g.post(&mut q, 0);
    g.notify(&c, 0);
    g.bus.poll(&mut g.mem);
    assert_eq!(g.used(&mut q).len(), 1);
    assert_eq!(g.messages(), []);
    g.cfg_write(BLK_SLOT, c.msix_cap + 2, 2, ctrl);
    assert_eq!(g.messages().len(), 1);
    // MSI-X off: the ISR records it; reading the ISR clears it.
    g.cfg_write(BLK_SLOT, c.msix_cap + 2, 2, 0);
    g.post(&mut q, 0);
    g.notify(&c, 0);
    g.bus.poll(&mut g.mem);
    assert_eq!(g.used(&mut q).len(), 1);
    assert_eq!(g.messages(), []);
    assert_eq!(g.rd(c.isr, 1), 1);
    assert_eq!(g.rd(c.isr, 1), 0);
    // The guest moves BAR 0: the old address is unclaimed, the new one works.
    let new = 0xd000_0000u64;
    g.cfg_write(BLK_SLOT, 0x10, 4, new as u32);
    assert!(!g.bus.mmio_read(c.common, &mut [0u8; 1]));
    assert_eq!(g.rd(new + 0x14, 1) as u8 & status::DRIVER_OK, status::DRIVER_OK);
    // Messages that are not ordinary interrupts are not injected.
    for (address, data) in
        [(0xfee0_0000, 0x0400 | 0x30), (0xfee0_0000, 0x8030), (0xfec0_0000, 0x30), (0xfee0_0000, 0x5)]
    {
        assert_eq!(MsiMessage { address, data }.fixed_vector(), None);
    }
}

proptest! {
    // Each case boots both functions first; 64 cases keep this test near a second.
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A hostile guest after a correct bring-up: scribbles on rings, descriptors and buffers,
    /// pokes configuration space and both BARs, notifies at random. Nothing panics, every
    /// message is bounded, and the block device keeps at most a queue's worth in flight.
    #[test]
    fn prop_hostile_guest(ops in proptest::collection::vec((0u8..6, any::<u32>(), any::<u64>()), 1..150)) {
        let mut g = Guest::new(platform(3));
        let (c, _q) = blk_up(&mut g);
        let n = g.probe(NET_SLOT);
        g.negotiate(&n, F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX | net::F_MAC);
        g.setup_msix(NET_SLOT, &n, 3, 0x40);
        g.setup_queue(&n, 0, 16, 0x14000, 0);
        g.setup_queue(&n, 1, 16, 0x16000, 1);
        g.enable_queue(&n, 0);
        g.enable_queue(&n, 1);
        g.driver_ok(&n);
        with_wire(&mut g.bus, |w| for i in 0..20u8 { w.incoming.push_back(vec![i; 64]); });
        for (kind, a, b) in ops {
            match kind {
                0 | 1 => {
                    // Rings and buffers live in 0x10000..0x20000.
                    let at = 0x10000 + u64::from(a % 0x10000);
                    let _ = g.mem.write(at, &b.to_le_bytes()[..(a as usize >> 16) % 8 + 1]);
                }
                2 => {
                    let (dev, q) = if a & 1 == 0 { (&c, 0) } else { (&n, u64::from(a >> 1) % 3) };
                    let b = b.to_le_bytes();
                    let _ = g.bus.mmio_write(dev.notify + 4 * q, &b[..2], &mut g.mem);
                }
                3 => {
                    let base = if a & 1 == 0 { BLK_BAR } else { NET_BAR };
                    let off = u64::from(a >> 1) % BAR0_SIZE;
                    let size = [1usize, 2, 4, 8][(b % 4) as usize];
                    // Never reset or re-enable through status: the point is the running device.
                    if off % 0x1000 != 0x14 {
                        let _ = g.bus.mmio_write(base + off, &b.to_le_bytes()[..size], &mut g.mem);
                    }
                    let mut r = [0u8; 8];
                    let _ = g.bus.mmio_read(base + (b % BAR0_SIZE), &mut r[..size]);
                }
                4 => {
                    let port = 0xcf8 + (a % 8) as u16;
                    g.bus.io_out(port, [1u8, 2, 4][(b % 3) as usize], b as u32);
                    let _ = g.bus.io_in(0xcf8 + (b % 8) as u16, 4);
                }
                _ => g.bus.poll(&mut g.mem),
            }
            prop_assert!(g.messages().len() <= 5);
            let f = g.bus.function_mut(BLK_SLOT).unwrap();
            if let Some(b) = f.device_mut().as_any_mut().downcast_mut::<VirtioBlk<MemDisk>>() {
                prop_assert!(b.in_flight() <= 128);
            }
        }
    }
}

#[test]
fn mmio_instructions_reach_the_bar() {
    use crate::mmio::CpuMode;
    let mut g = Guest::new(platform(4));
    let c = g.probe(BLK_SLOT);
    assert!(g.bus.claims_mmio(c.common));
    assert!(!g.bus.claims_mmio(BLK_BAR + BAR0_SIZE * 4));
    let mut regs = [0u64; 16];
    // mov byte [rdi], sil: device_status = ACKNOWLEDGE.
    regs[6] = u64::from(status::ACKNOWLEDGE);
    let len =
        g.bus.complete_mmio(c.common + 0x14, &[0x40, 0x88, 0x37], CpuMode::Bits64, &mut regs, &mut g.mem).unwrap();
    assert_eq!(len, 3);
    // movzx eax, byte [rdi]
    let len =
        g.bus.complete_mmio(c.common + 0x14, &[0x0f, 0xb6, 0x07], CpuMode::Bits64, &mut regs, &mut g.mem).unwrap();
    assert_eq!((len, regs[0]), (3, u64::from(status::ACKNOWLEDGE)));
    // mov eax, [rdi] straddling the end of the BAR: all-ones.
    g.bus.complete_mmio(BLK_BAR + BAR0_SIZE - 2, &[0x8b, 0x07], CpuMode::Bits64, &mut regs, &mut g.mem).unwrap();
    assert_eq!(regs[0], 0xffff_ffff);
    assert!(g.bus.complete_mmio(c.common, &[0x01, 0x07], CpuMode::Bits64, &mut regs, &mut g.mem).is_err());
}

/// The whole path: Linux's requests through the virtio-blk function, the block channel, and a
/// disk driver VM serving the channel (ipc-spec's driver side) from its disk.
#[test]
fn block_through_the_channel_to_a_driver_vm() {
    use super::channel::tests::{attached, info, serve, NoBell, SECTORS};
    use super::channel::BlockChannel;
    use ipc_spec::ring::ByteMem;
    let bytes: &'static mut [u8] = Box::leak(vec![0u8; 512 << 10].into_boxed_slice());
    let shared = ByteMem::new(bytes);
    let mut disk: Vec<u8> = (0..SECTORS as usize * 512).map(|i| (i % 253) as u8).collect();
    attached(&shared);
    let mut chan = BlockChannel::connect(shared, NoBell).unwrap();
    serve(&shared, &mut disk);
    assert_eq!(chan.poll_info(), Some(Ok(info())));
    let mut bus = PciBus::new();
    bus.add(BLK_SLOT, BLK_BAR, VirtioPci::new(Box::new(VirtioBlk::new(chan, b"chan")))).unwrap();
    let mut g = Guest::new(bus);
    let c = g.probe(BLK_SLOT);
    g.negotiate(&c, F_VERSION_1 | F_INDIRECT_DESC | blk::F_SEG_MAX | blk::F_SIZE_MAX | blk::F_FLUSH);
    assert_eq!(g.rd(c.device, 8), SECTORS);
    assert_eq!(g.rd(c.device + 12, 4), 16, "64 KiB slots");
    g.setup_msix(BLK_SLOT, &c, 2, 0x30);
    let mut q = g.setup_queue(&c, 0, 64, 0x10000, 0);
    g.enable_queue(&c, 0);
    g.driver_ok(&c);
    // Write 64 KiB at sector 64 (16 segments of 4 KiB in an indirect table), flush, read back.
    let pattern: Vec<u8> = (0..65536u32).map(|i| (i * 13 + i / 256) as u8).collect();
    g.mem.write(0x40000, &pattern).unwrap();
    g.mem.write(0x20000, &blk_header(blk::T_OUT, 64)).unwrap();
    let table = 0x21000;
    g.put_desc(table, 0, 0x20000, 16, DESC_F_NEXT, 1);
    for s in 0..16u16 {
        g.put_desc(table, 1 + s, 0x40000 + 4096 * u64::from(s), 4096, DESC_F_NEXT, 2 + s);
    }
    g.put_desc(table, 17, 0x20100, 1, DESC_F_WRITE, 0);
    g.put_desc(q.desc, 0, table, 18 * 16, DESC_F_INDIRECT, 0);
    g.post(&mut q, 0);
    g.mem.write(0x22000, &blk_header(blk::T_FLUSH, 0)).unwrap();
    g.put_desc(q.desc, 1, 0x22000, 16, DESC_F_NEXT, 2);
    g.put_desc(q.desc, 2, 0x22100, 1, DESC_F_WRITE, 0);
    g.post(&mut q, 1);
    g.notify(&c, 0);
    assert_eq!(serve(&shared, &mut disk), 2, "the driver VM sees the write and the flush");
    g.bus.poll(&mut g.mem);
    assert_eq!(g.used(&mut q), [(0, 1), (1, 1)]);
    assert_eq!(g.messages().len(), 1);
    assert_eq!(&disk[64 * 512..64 * 512 + 65536], &pattern[..]);
    g.mem.write(0x20000, &blk_header(blk::T_IN, 64)).unwrap();
    g.put_desc(q.desc, 3, 0x20000, 16, DESC_F_NEXT, 4);
    g.put_desc(q.desc, 4, 0x60000, 65536, DESC_F_NEXT | DESC_F_WRITE, 5);
    g.put_desc(q.desc, 5, 0x20100, 1, DESC_F_WRITE, 0);
    g.post(&mut q, 3);
    g.notify(&c, 0);
    serve(&shared, &mut disk);
    g.bus.poll(&mut g.mem);
    assert_eq!(g.used(&mut q), [(3, 65537)]);
    assert_eq!(&g.mem.bytes()[0x60000..0x70000], &pattern[..]);
    assert_eq!(g.mem.bytes()[0x20100], blk::S_OK);
    assert_eq!(g.messages().len(), 1);
}

/// The net path: frames through the virtio-net function, the net channel and a net driver VM
/// (ipc-spec's driver side) at the other end.
#[test]
fn net_through_the_channel_to_a_driver_vm() {
    use super::channel::tests::NoBell;
    use super::channel::NetChannel;
    use ipc_spec::net::{MacAddr, NetHeader};
    use ipc_spec::ring::ByteMem;
    let bytes: &'static mut [u8] = Box::leak(vec![0u8; 256 << 10].into_boxed_slice());
    let shared: &'static ByteMem<'static> = Box::leak(Box::new(ByteMem::new(bytes)));
    let header = NetHeader { mac: MacAddr([2, 0, 0, 0, 0, 0x11]), mtu: 1500, link_up: true };
    let d = header.attach_driver(shared).unwrap();
    let (mut from_guest, mut to_guest) = (d.tx, d.rx);
    let chan = NetChannel::attach(shared, NoBell).unwrap();
    let mut bus = PciBus::new();
    bus.add(NET_SLOT, NET_BAR, VirtioPci::new(Box::new(VirtioNet::new(chan)))).unwrap();
    let mut g = Guest::new(bus);
    let c = g.probe(NET_SLOT);
    g.negotiate(&c, F_VERSION_1 | F_EVENT_IDX | net::F_MAC | net::F_STATUS);
    assert_eq!(g.rd(c.device, 4), 0x0000_0002);
    assert_eq!(g.rd(c.device + 4, 2), 0x1100);
    g.setup_msix(NET_SLOT, &c, 3, 0x40);
    let mut rx = g.setup_queue(&c, 0, 16, 0x10000, 0);
    let mut tx = g.setup_queue(&c, 1, 16, 0x12000, 1);
    g.enable_queue(&c, 0);
    g.enable_queue(&c, 1);
    g.driver_ok(&c);
    g.put_desc(rx.desc, 0, 0x20000, 12 + 1518, DESC_F_WRITE, 0);
    g.post(&mut rx, 0);
    g.notify(&c, 0);
    // Guest -> driver VM: header in its own descriptor, the frame split in two.
    let frame: Vec<u8> = (0..200u8).collect();
    g.mem.write(0x30000, &[0u8; 12]).unwrap();
    g.mem.write(0x31000, &frame[..50]).unwrap();
    g.mem.write(0x32000, &frame[50..]).unwrap();
    g.put_desc(tx.desc, 0, 0x30000, 12, DESC_F_NEXT, 1);
    g.put_desc(tx.desc, 1, 0x31000, 50, DESC_F_NEXT, 2);
    g.put_desc(tx.desc, 2, 0x32000, 150, 0, 0);
    g.post(&mut tx, 0);
    g.notify(&c, 1);
    assert_eq!(g.used(&mut tx), [(0, 0)]);
    let mut buf = [0u8; 1600];
    assert_eq!(from_guest.recv(&mut buf), Ok(Some(200)));
    assert_eq!(&buf[..200], &frame[..]);
    // Driver VM -> guest.
    let reply: Vec<u8> = (0..90u8).map(|b| b ^ 0x5a).collect();
    to_guest.send(&reply).unwrap();
    g.bus.poll(&mut g.mem);
    assert_eq!(g.used(&mut rx), [(0, 102)]);
    assert_eq!(&g.mem.bytes()[0x2000c..0x2000c + 90], &reply[..]);

    // The driver VM dies with a frame published and not taken; the next incarnation
    // re-attaches. The guest gets only the new one's frame, and sees no link change.
    g.messages();
    to_guest.send(&[0xdd; 64]).unwrap();
    // The driver VM dies (its ends are simply not used again).
    let d = header.attach_driver(shared).unwrap();
    let (_from_guest, mut to_guest) = (d.tx, d.rx);
    to_guest.send(&reply[..70]).unwrap();
    g.put_desc(rx.desc, 1, 0x21000, 12 + 1518, DESC_F_WRITE, 0);
    g.post(&mut rx, 1);
    g.notify(&c, 0);
    assert_eq!(g.used(&mut rx), [(1, 82)]);
    assert_eq!(&g.mem.bytes()[0x2100c..0x2100c + 70], &reply[..70]);
    assert_eq!(g.messages(), [MsiMessage { address: 0xfee0_0000, data: 0x40 }], "no configuration interrupt");
    assert_eq!(g.rd(c.device + 6, 2), u64::from(net::S_LINK_UP));

    // dom0 gives up on the driver and rings the VMM: a configuration interrupt, link down;
    // `ctl restart`'s incarnation raises it again.
    // The driver VM dies (its ends are simply not used again).
    ipc_spec::net::mark_server_gone(shared, true);
    g.bus.poll(&mut g.mem);
    assert_eq!(g.messages(), [MsiMessage { address: 0xfee0_0000, data: 0x42 }]);
    assert_eq!(g.rd(c.device + 6, 2), 0);
    ipc_spec::net::mark_server_gone(shared, false);
    let _d = header.attach_driver(shared).unwrap();
    g.bus.poll(&mut g.mem);
    assert_eq!(g.messages(), [MsiMessage { address: 0xfee0_0000, data: 0x42 }]);
    assert_eq!(g.rd(c.device + 6, 2), u64::from(net::S_LINK_UP));
}

/// Buffers outside guest RAM: the request fails with IOERR, the device and queue go on, and
/// nothing is written anywhere but the guest's own status byte. The error comes with the
/// notify itself, the back end never asked: a read into such buffers is not forwarded (its
/// outcome must not depend on how long the back end takes: the device may be reset first).
#[test]
fn block_buffers_outside_ram() {
    let mut g = Guest::new(platform(4));
    let (c, mut q) = blk_up(&mut g);
    for (kind, data) in [
        (blk::T_IN, RAM as u64 - 256),
        (blk::T_OUT, RAM as u64 - 256),
        (blk::T_IN, u64::MAX - 1023),
        (blk::T_IN, BLK_BAR),
        (blk::T_IN, 0xfee0_0000),
    ] {
        g.mem.write(0x20000, &blk_header(kind, 4)).unwrap();
        g.mem.write(0x20100, &[0xee]).unwrap();
        let flags = if kind == blk::T_IN { DESC_F_NEXT | DESC_F_WRITE } else { DESC_F_NEXT };
        g.put_desc(q.desc, 0, 0x20000, 16, DESC_F_NEXT, 1);
        g.put_desc(q.desc, 1, data, 512, flags, 2);
        g.put_desc(q.desc, 2, 0x20100, 1, DESC_F_WRITE, 0);
        g.post(&mut q, 0);
        g.notify(&c, 0);
        assert_eq!(g.used(&mut q), [(0, 1)], "{kind} at {data:#x}");
        assert_eq!(g.mem.bytes()[0x20100], blk::S_IOERR);
    }
    // A read whose status byte alone is outside RAM is not forwarded either.
    g.mem.write(0x20000, &blk_header(blk::T_IN, 4)).unwrap();
    g.put_desc(q.desc, 0, 0x20000, 16, DESC_F_NEXT, 1);
    g.put_desc(q.desc, 1, 0x21000, 512, DESC_F_NEXT | DESC_F_WRITE, 2);
    g.put_desc(q.desc, 2, RAM as u64, 1, DESC_F_WRITE, 0);
    g.post(&mut q, 0);
    g.notify(&c, 0);
    assert_eq!(g.used(&mut q), [(0, 1)]);
    let f = g.bus.function_mut(BLK_SLOT).unwrap();
    assert_eq!(f.status() & status::DEVICE_NEEDS_RESET, 0);
    let b = f.device_mut().as_any_mut().downcast_mut::<VirtioBlk<MemDisk>>().unwrap();
    assert_eq!(b.stats().errors, 6);
    assert_eq!(b.stats().submitted, 0, "nothing was forwarded to the back end");
    // The disk was not written.
    assert!(b.backend().disk.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8));
}

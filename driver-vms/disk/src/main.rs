//! The disk driver VM. It owns one virtio-blk PCI function by passthrough (its DMA confined
//! by the IOMMU to this VM's memory), drives it with the virtio-drivers crate, and serves
//! guests over block channels. It is untrusted: a crash or a hostile act here must not hurt
//! the microvisor or any other domain.
//!
//! Command line (from dom0): `dev=<slot>` (the device capability), and per block channel
//! `chan.<name>.region=<gpa>:<bytes> chan.<name>.signal=<slot> chan.<name>.wait=<slot>`.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
mod device;

#[cfg(target_os = "none")]
mod driver {
    use domain_rt::hypercall;
    use domain_rt::{println, BootInfo};
    use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk};
    use virtio_pci::{DriverHal, HypercallConfig, Transport};

    use crate::device::Disk;

    domain_rt::domain_main!(main);

    /// The block benchmark run by the domain that owns the device: the same requests as
    /// the guest's, without the IPC hop (buffers in this VM's own memory).
    fn bench_direct(disk: &mut Disk) -> u64 {
        extern crate alloc;
        let capacity = disk.blk.capacity();
        let mut buf = alloc::vec![0u8; 128 * 512];
        for w in (0..domain_rt::bench::ROUNDS).flat_map(|_| domain_rt::bench::WORKLOADS) {
            let len = w.sectors as usize * 512;
            let t0 = domain_rt::hypercall::clock_ns();
            for i in 0..w.count {
                let sector = w.sector(i, capacity);
                let r = if w.write { disk.write(sector, &buf[..len]) } else { disk.read(sector, &mut buf[..len]) };
                if let Err(e) = r {
                    println!("bench blk: {} request {i}: {e}", w.name);
                    return 1;
                }
            }
            domain_rt::bench::report("direct", w, domain_rt::hypercall::clock_ns() - t0);
        }
        println!("bench blk: via=direct done");
        0
    }

    /// Route the queue's interrupt to our notification and wait for one real completion
    /// interrupt: device MSI-X → interrupt remapping (source-id checked) → host vector →
    /// our notification. Whether the route is in place.
    fn interrupt_check(cfg: &HypercallConfig, irq: u64, blk: &mut VirtIOBlk<DriverHal, Transport>) -> bool {
        let handle = match virtio_pci::irq::route_queue0(cfg, irq) {
            Ok(h) => h,
            Err(e) => {
                println!("device interrupts: {e}; polling instead");
                return false;
            }
        };
        let _ = hypercall::poll(irq);
        let (mut req, mut resp) = (BlkReq::default(), BlkResp::default());
        let mut buf = [0u8; 512];
        // SAFETY: req, resp and buf outlive the request, completed below before they go.
        let token = match unsafe { blk.read_blocks_nb(0, &mut req, &mut buf, &mut resp) } {
            Ok(t) => t,
            Err(e) => {
                println!("device interrupts: {e}");
                return false;
            }
        };
        match hypercall::wait(irq) {
            Ok(bits) => {
                println!("device interrupt arrived as a notification (remapping entry {handle}, bits {bits:#x})")
            }
            Err(e) => println!("device interrupts: waiting: {e}"),
        }
        while blk.peek_used() != Some(token) {
            core::hint::spin_loop();
        }
        // SAFETY: the same buffers as in read_blocks_nb, and the device is done with them.
        if let Err(e) = unsafe { blk.complete_read_blocks(token, &req, &mut buf, &mut resp) } {
            println!("device interrupts: completing: {e}");
        }
        true
    }

    fn main(info: &BootInfo) -> u64 {
        let (dev, transport) = match virtio_pci::open_from_cmdline(info) {
            Ok(opened) => opened,
            Err(e) => {
                println!("{e}");
                return e.status();
            }
        };
        let mut blk = match VirtIOBlk::<DriverHal, _>::new(transport) {
            Ok(b) => b,
            Err(e) => {
                println!("virtio-blk: {e}");
                return 4;
            }
        };
        let capacity = blk.capacity();
        println!(
            "virtio-blk: {} sectors ({} MiB){}, VIRTIO_F_ACCESS_PLATFORM negotiated",
            capacity,
            capacity / 2048,
            if blk.readonly() { ", read-only" } else { "" }
        );
        let mut sector = [0u8; 512];
        match blk.read_blocks(0, &mut sector) {
            Ok(()) => println!("read sector 0 by DMA through the IOMMU: first bytes {:02x?}", &sector[..8]),
            Err(e) => {
                println!("reading sector 0: {e}");
                return 5;
            }
        }
        // From here on the completion interrupt arrives as the virtual interrupt (with the
        // channels' doorbells), and the timer as the other vector (the fallback).
        let interrupts = info.slot("irq").is_some_and(|irq| {
            interrupt_check(&dev.config, irq, &mut blk) && hypercall::bind(irq, domain_rt::irq::VIRQ_VECTOR).is_ok()
        });
        let timer = info.slot("timer").filter(|&t| hypercall::bind(t, domain_rt::irq::TIMER_VECTOR).is_ok());
        let mut disk = Disk::new(blk, interrupts, timer);
        println!("ready");
        if info.arg("bench") == Some("direct") {
            // Our turn comes when the guest's run through the driver VM is over.
            if let Some(turn) = info.slot("chan.turn.wait") {
                let _ = hypercall::wait(turn);
            }
            return bench_direct(&mut disk);
        }
        match info.arg("rogue") {
            Some("dma") => crate::rogue::stray_dma(&mut disk.blk),
            Some("garbage") => crate::rogue::garbage(info),
            Some("silent") => crate::rogue::silent(),
            Some("late") => crate::rogue::late(info, timer, &mut disk),
            _ => crate::serve::serve(info, &mut disk),
        }
    }
}

/// Test modes that make this driver VM hostile, to show what the rest of the system does
/// about it: `rogue=dma` aims its device's DMA outside its memory; `rogue=garbage` answers
/// its guests with a corrupt ring; `rogue=silent` never answers at all, as a hung driver;
/// `rogue=late` answers nothing for a while and then serves normally.
#[cfg(target_os = "none")]
mod rogue {
    use domain_rt::{channels, hypercall, println, BootInfo};
    use ipc_spec::ring::SharedMem;
    use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk};
    use virtio_pci::{DriverHal, Transport};

    /// Far outside this VM's 8 MiB of RAM (and not one of its regions).
    const OUTSIDE: usize = 0x1000_0000;

    pub fn stray_dma(blk: &mut VirtIOBlk<DriverHal, Transport>) -> u64 {
        // A marker on the disk, so the data would be recognisable wherever it landed.
        let mut marker = [0u8; 512];
        for chunk in marker.chunks_mut(8) {
            chunk.copy_from_slice(b"ROGUEDMA");
        }
        if let Err(e) = blk.write_blocks(0, &marker) {
            println!("writing the marker: {e}");
        }
        println!("aiming my device's DMA at {OUTSIDE:#x}, outside my memory");
        let (mut req, mut resp) = (BlkReq::default(), BlkResp::default());
        // SAFETY: deliberately hostile: no CPU access ever goes through this slice; it only
        // tells the device where to write the marker sector. The IOMMU must block that.
        let buf = unsafe { core::slice::from_raw_parts_mut(OUTSIDE as *mut u8, 512) };
        // SAFETY: as above; req and resp outlive the request (this function never returns).
        let token = unsafe { blk.read_blocks_nb(0, &mut req, buf, &mut resp) };
        println!("request submitted ({token:?})");
        loop {
            core::hint::spin_loop();
        }
    }

    /// Take no request and answer none, for ever: a hung driver VM.
    pub fn silent() -> u64 {
        println!("ignoring every request (rogue=silent)");
        loop {
            // SAFETY: HLT only waits; no interrupt is bound, so this vCPU sleeps for good.
            unsafe { core::arch::asm!("hlt") };
        }
    }

    /// How long `rogue=late` stalls: longer than a guest waits for an answer.
    const STALL_NS: u64 = 8_000_000_000;

    /// At the first doorbell, stall for [`STALL_NS`], then serve as usual (answering what
    /// queued up meanwhile): a driver VM that stalls and recovers. `timer`: our timer
    /// notification, bound to the timer vector.
    pub fn late(info: &BootInfo, timer: Option<u64>, disk: &mut crate::device::Disk) -> u64 {
        let first =
            channels::channel_names(info.cmdline, "block").find_map(|n| channels::channel(info.cmdline, n).ok());
        if let Some(c) = first {
            let _ = hypercall::wait(c.wait);
        }
        println!("stalling for {} s before serving (rogue=late)", STALL_NS / 1_000_000_000);
        if let Some(t) = timer {
            let fired = domain_rt::irq::timer_count();
            let _ = hypercall::timer_set(t, STALL_NS, 1);
            let mut seen = domain_rt::irq::count();
            while domain_rt::irq::timer_count() == fired {
                seen = domain_rt::irq::wait_for_virq(seen);
            }
        }
        println!("serving now");
        crate::serve::serve(info, disk)
    }

    /// Answer the first doorbell of each block channel with a corrupt response ring.
    pub fn garbage(info: &BootInfo) -> u64 {
        let Some(a) =
            channels::channel_names(info.cmdline, "block").find_map(|n| channels::channel(info.cmdline, n).ok())
        else {
            println!("no block channel to corrupt");
            return 1;
        };
        let (name, signal, wait) = (a.name, a.signal, a.wait);
        // SAFETY: the channel region dom0 mapped for us.
        let region = unsafe { a.region() };
        let _ = hypercall::wait(wait);
        // The response ring of the standard layout sits at 0x2000: claim 0x7fff_ffff
        // responses and fill the slots with noise.
        region.write_u32(0x2000, 0x7fff_ffff);
        for i in 0..256 {
            region.write_u32(0x2008 + i * 4, 0xdead_beef ^ i as u32);
        }
        let _ = hypercall::signal(signal, 1);
        println!("answered \"{name}\" with a corrupt response ring");
        loop {
            let _ = hypercall::wait(wait);
        }
    }
}

#[cfg(target_os = "none")]
mod serve {
    extern crate alloc;

    use alloc::vec::Vec;

    use crate::device::Disk;
    use domain_rt::hypercall;
    use domain_rt::shared::Region;
    use domain_rt::{channels, println, BootInfo};
    use ipc_spec::block::{validate, BlockLayout, DiskInfo, Request, Response, Status, Validated};
    use ipc_spec::ring::RingError;

    /// Largest request served at once (64 KiB): one virtio descriptor.
    const MAX_SECTORS: u32 = 128;

    /// One guest's block channel.
    struct Channel<'a> {
        name: &'a str,
        region: Region,
        signal: u64,
        wait: u64,
        layout: Option<BlockLayout>,
        /// The guest broke the protocol (corrupt ring): this channel is no longer served.
        broken: bool,
    }

    fn channels(info: &BootInfo) -> Vec<Channel<'static>> {
        let mut list = Vec::new();
        for name in channels::channel_names(info.cmdline, "block") {
            let Ok(a) = channels::channel(info.cmdline, name) else { continue };
            // SAFETY: dom0 mapped this region into our stage-2 for this channel at the
            // address and size it put on our command line; nothing else in this VM uses it.
            let region = unsafe { a.region() };
            list.push(Channel { name, region, signal: a.signal, wait: a.wait, layout: None, broken: false });
        }
        list
    }

    /// Serve every block channel: doorbells arrive as one virtual interrupt; each wake-up
    /// drains every channel's request ring.
    pub fn serve(info: &BootInfo, dev: &mut Disk) -> u64 {
        let disk = DiskInfo {
            capacity_sectors: dev.blk.capacity(),
            sector_size: 512,
            max_sectors_per_request: MAX_SECTORS,
            read_only: dev.blk.readonly(),
        };
        let mut chans = channels(info);
        for c in &chans {
            if let Err(e) = hypercall::bind(c.wait, domain_rt::irq::VIRQ_VECTOR) {
                println!("channel {}: binding the doorbell failed: {e}", c.name);
            }
            println!("serving block channel \"{}\" ({} KiB shared)", c.name, c.region.len_kib());
        }
        if chans.is_empty() {
            println!("no block channel on my command line");
        }
        let mut seen = domain_rt::irq::count();
        loop {
            for c in chans.iter_mut() {
                // Taking the bits clears the doorbell before the rings are read, so a ring
                // after this point rings again.
                let _ = hypercall::poll(c.wait);
                if !c.broken && serve_channel(c, dev, disk) {
                    let _ = hypercall::signal(c.signal, 1);
                }
            }
            seen = domain_rt::irq::wait_for_virq(seen);
        }
    }

    /// Answer what is on the channel's request ring; true if anything was answered.
    fn serve_channel(c: &mut Channel, dev: &mut Disk, disk: DiskInfo) -> bool {
        let layout = match c.layout {
            Some(l) => l,
            None => match BlockLayout::read(&c.region) {
                Ok(l) => {
                    c.layout = Some(l);
                    l
                }
                Err(_) => return false, // not set up by the guest yet
            },
        };
        let (mut requests, mut responses) = match layout.driver_rings(&c.region) {
            Ok(r) => r,
            Err(e) => return give_up(c, e),
        };
        let mut answered = false;
        loop {
            match responses.free() {
                Ok(0) => break, // the guest must drain responses first
                Ok(_) => {}
                Err(e) => return give_up(c, e),
            }
            let slot = match requests.pop() {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(e) => return give_up(c, e),
            };
            let req = Request::decode(&slot);
            let resp = match validate(&req, &layout, disk) {
                Ok(Validated::GetInfo) => Response::info(req.id, disk),
                Ok(Validated::Flush) => Response::new(req.id, status(dev.flush())),
                Ok(Validated::Read(t)) => {
                    // SAFETY: `validate` placed the range inside the shared data area; the
                    // device DMAs into it directly (the IOMMU maps the region for it). The
                    // guest may scribble on it meanwhile: that only spoils its own data.
                    let buf = unsafe {
                        core::slice::from_raw_parts_mut((c.region.base() + t.data_offset()) as *mut u8, t.data_len())
                    };
                    Response::new(req.id, status(dev.read(t.sector(), buf)))
                }
                Ok(Validated::Write(t)) => {
                    // SAFETY: as for reads; the device reads the buffer by DMA.
                    let buf = unsafe {
                        core::slice::from_raw_parts((c.region.base() + t.data_offset()) as *const u8, t.data_len())
                    };
                    Response::new(req.id, status(dev.write(t.sector(), buf)))
                }
                Err(s) => Response::new(req.id, s),
            };
            if let Err(e) = responses.push(&resp.encode()) {
                return give_up(c, e);
            }
            answered = true;
        }
        answered
    }

    fn status(r: virtio_drivers::Result) -> Status {
        match r {
            Ok(()) => Status::Ok,
            Err(_) => Status::IoError,
        }
    }

    /// A corrupt ring: the guest broke the protocol. Stop serving it (other channels go on).
    fn give_up(c: &mut Channel, e: RingError) -> bool {
        println!("channel {}: {e}; no longer served", c.name);
        c.broken = true;
        false
    }
}

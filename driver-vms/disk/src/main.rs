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
mod startup;

#[cfg(target_os = "none")]
mod driver {
    use domain_rt::hypercall;
    use domain_rt::{println, BootInfo};
    use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk};
    use virtio_pci::{DriverHal, Transport};

    use crate::device::Disk;
    use crate::startup;

    domain_rt::domain_main!(main);

    /// The direct benchmark's buffers per slot of the device queue: each slot's requests go
    /// round 16 buffers of their size, so the domain's DMA covers as much memory as the
    /// guest's window does through the driver VM (256 requests: 1 MiB of 4 KiB buffers,
    /// 16 MiB of 64 KiB ones; `bench` in the demo guest). With 16 buffers in all, written
    /// again and again while they stay in the host's caches, the direct side was measured
    /// 10 % faster on sequential 64 KiB reads for that alone (docs/design.md, `bench blk`).
    const BUFFERS_PER_SLOT: usize = 16;
    /// The largest request of the benchmark (64 KiB).
    const MAX_REQUEST: usize = 128 * 512;

    extern "C" {
        /// The end of this image (domain-rt's link.ld): RAM above it is unused.
        static __image_end: u8;
    }

    /// The buffer area of the direct benchmark: this VM's RAM above its image (the boot
    /// page tables, stack and heap are inside it; the start info below 1 MiB), if there
    /// is enough of it.
    fn direct_buffers(info: &BootInfo) -> Option<*mut u8> {
        let need = (crate::device::QUEUE_DEPTH * BUFFERS_PER_SLOT * MAX_REQUEST) as u64;
        let start = (&raw const __image_end as u64).next_multiple_of(MAX_REQUEST as u64);
        let ram = info.start_info.memmap().find(|m| {
            m.r#type == domain_rt::pvh::start_info::MEMMAP_RAM
                && m.addr <= start
                && start < m.addr.saturating_add(m.size)
        })?;
        (ram.addr.saturating_add(ram.size).saturating_sub(start) >= need).then_some(start as *mut u8)
    }

    /// The block benchmark run by the domain that owns the device: the same requests as
    /// the guest's, without the IPC hop (buffers in this VM's own memory), kept in flight
    /// as many at a time as the device queue holds, as the serving loop does. Each
    /// workload starts when the guest gives the turn (`turn`: signal, wait) after running
    /// it through the driver VM, and gives it back when done.
    fn bench_direct(disk: &mut Disk, info: &BootInfo, turn: Option<(u64, u64)>) -> u64 {
        let take_turn = || {
            if let Some((_, wait)) = turn {
                let _ = hypercall::wait(wait);
            }
        };
        let give_turn = || {
            if let Some((signal, _)) = turn {
                let _ = hypercall::signal(signal, 1);
            }
        };
        let Some(base) = direct_buffers(info) else {
            let mib = (crate::device::QUEUE_DEPTH * BUFFERS_PER_SLOT * MAX_REQUEST) >> 20;
            println!("bench blk: via=direct could not start: it needs {mib} MiB of RAM above its image (memory_mib)");
            give_turn();
            return 1;
        };
        // Ready: the guest starts its first workload only now, so this VM's start-up (its
        // own device wait) never overlaps the guest's run.
        give_turn();
        let capacity = disk.blk.capacity();
        // Requests taken per slot so far: slot k's next buffer is k's (count % 16)-th.
        let mut taken = [0usize; crate::device::QUEUE_DEPTH];
        for w in (0..domain_rt::bench::ROUNDS).flat_map(|_| domain_rt::bench::WORKLOADS) {
            take_turn();
            let len = w.sectors as usize * 512;
            let t0 = domain_rt::hypercall::clock_ns();
            let (mut sent, mut done, mut failed) = (0u32, 0u32, false);
            let mut free: u32 = (1u32 << crate::device::QUEUE_DEPTH) - 1;
            let mut seen = domain_rt::irq::count();
            while done < w.count && !failed {
                // The batch, with one notification at its end (as the serving loop does).
                let refused = disk.submitting(|disk| {
                    while sent < w.count && disk.has_room() && free != 0 {
                        let k = free.trailing_zeros();
                        // Slot k's buffers are the k-th 16 of the area, each `len` long; one
                        // request per slot is in flight, so this one is used by it alone
                        // (k's bit is clear in `free` until the request completes).
                        let n = k as usize * BUFFERS_PER_SLOT + taken[k as usize] % BUFFERS_PER_SLOT;
                        taken[k as usize] += 1;
                        // SAFETY: n < QUEUE_DEPTH * BUFFERS_PER_SLOT and len <= MAX_REQUEST, so
                        // the buffer lies in the area `direct_buffers` found free in this VM's
                        // identity-mapped RAM.
                        let buf = unsafe { base.add(n * len) };
                        let tag = crate::device::Tag { chan: k as usize, id: u64::from(sent) };
                        // SAFETY: as above; the area is never used for anything else.
                        match unsafe { disk.submit(tag, w.write, w.sector(sent, capacity), buf, len) } {
                            Ok(()) => {
                                free &= !(1 << k);
                                sent += 1;
                            }
                            Err(crate::device::Submit::Full) => break,
                            Err(crate::device::Submit::Failed(e)) => return Some(e),
                        }
                    }
                    None
                });
                if let Some(e) = refused {
                    println!("bench blk: {} request {sent} failed: {e}", w.name);
                    give_turn();
                    return 1;
                }
                let n = disk.take_completions(|tag, r| {
                    free |= 1 << tag.chan;
                    failed |= r.is_err();
                });
                done += n as u32;
                if n == 0 {
                    seen = disk.sleep(seen);
                }
            }
            if failed {
                println!("bench blk: {} request failed", w.name);
                give_turn();
                return 1;
            }
            domain_rt::bench::report("direct", w, domain_rt::hypercall::clock_ns() - t0);
            give_turn();
        }
        println!("bench blk: via=direct done (up to {} requests in flight)", disk.peak);
        0
    }

    /// The first read, sector 0 into `buf`: it proves that the device's DMA reaches this
    /// VM's memory through the IOMMU and, when `irq` is given (queue 0's interrupt routed
    /// to that notification), that its completion interrupt arrives through interrupt
    /// remapping (device MSI-X → remapping entry, source-id checked → host vector → our
    /// notification): one device round trip for both, as a restarted driver VM has a guest
    /// waiting. The notification's bits if it waited for one.
    fn first_read(
        blk: &mut VirtIOBlk<DriverHal, Transport>,
        buf: &mut [u8; 512],
        irq: Option<u64>,
    ) -> Result<Option<Result<u64, ipc_spec::Error>>, virtio_drivers::Error> {
        if let Some(irq) = irq {
            let _ = hypercall::poll(irq);
        }
        let (mut req, mut resp) = (BlkReq::default(), BlkResp::default());
        // SAFETY: req, resp and buf outlive the request, completed below before they go.
        let token = unsafe { blk.read_blocks_nb(0, &mut req, buf, &mut resp) }?;
        // Spin for the completion, then take the interrupt, which the device raised with it
        // (virtio: the used ring is written before the notification). Not the other way
        // round: a halted vCPU is woken by the emulator only after the host has scheduled
        // its I/O thread and then the vCPU's thread again, which on a loaded host took
        // up to hundreds of ms for this one read (bench restart); spinning keeps the vCPU's
        // thread running meanwhile.
        while blk.peek_used() != Some(token) {
            core::hint::spin_loop();
        }
        let bits = irq.map(hypercall::wait);
        // SAFETY: the same buffers as in read_blocks_nb, and the device is done with them.
        unsafe { blk.complete_read_blocks(token, &req, buf, &mut resp) }?;
        Ok(bits)
    }

    fn main(info: &BootInfo) -> u64 {
        startup::mark(startup::Step::Entered);
        let (dev, transport) = match virtio_pci::open_from_cmdline(info) {
            Ok(opened) => opened,
            Err(e) => {
                println!("{e}");
                return e.status();
            }
        };
        startup::mark(startup::Step::Opened);
        let kicker = transport.kicker();
        let mut blk = match VirtIOBlk::<DriverHal, _>::new(transport) {
            Ok(b) => b,
            Err(e) => {
                println!("virtio-blk: {e}");
                return 4;
            }
        };
        startup::mark(startup::Step::Negotiated);
        let capacity = blk.capacity();
        println!(
            "virtio-blk: {} sectors ({} MiB){}, VIRTIO_F_ACCESS_PLATFORM negotiated",
            capacity,
            capacity / 2048,
            if blk.readonly() { ", read-only" } else { "" }
        );
        let routed = info.slot("irq").and_then(|irq| match virtio_pci::irq::route_queue0(&dev.config, irq) {
            Ok(handle) => Some((irq, handle)),
            Err(e) => {
                println!("device interrupts: {e}; polling instead");
                None
            }
        });
        let mut sector = [0u8; 512];
        let waited = match first_read(&mut blk, &mut sector, routed.map(|(irq, _)| irq)) {
            Ok(waited) => {
                startup::mark(startup::Step::FirstRead);
                println!("read sector 0 by DMA through the IOMMU: first bytes {:02x?}", &sector[..8]);
                waited
            }
            Err(e) => {
                println!("reading sector 0: {e}");
                return 5;
            }
        };
        // From here on the completion interrupt arrives as the virtual interrupt (with the
        // channels' doorbells), and the timer as the other vector (the fallback).
        let interrupts = match (routed, waited) {
            (Some((irq, handle)), Some(Ok(bits))) => {
                println!("device interrupt arrived as a notification (remapping entry {handle}, bits {bits:#x})");
                hypercall::bind(irq, domain_rt::irq::VIRQ_VECTOR).is_ok()
            }
            (Some(_), Some(Err(e))) => {
                println!("device interrupts: waiting: {e}; polling instead");
                false
            }
            _ => false,
        };
        let timer = info.slot("timer").filter(|&t| hypercall::bind(t, domain_rt::irq::TIMER_VECTOR).is_ok());
        startup::mark(startup::Step::Interrupts);
        let mut disk = Disk::new(blk, kicker, interrupts, timer);
        println!("ready");
        if info.arg("bench") == Some("direct") {
            return bench_direct(&mut disk, info, info.slot("chan.turn.signal").zip(info.slot("chan.turn.wait")));
        }
        match info.arg("rogue") {
            Some("dma") => crate::rogue::stray_dma(&mut disk.blk),
            Some("garbage") => crate::rogue::garbage(info),
            Some("silent") => crate::rogue::silent(),
            Some("late") => crate::rogue::late(info, timer, &mut disk),
            Some(r) if r.starts_with("crash-after=") => {
                let n = r["crash-after=".len()..].parse().unwrap_or(u64::MAX);
                crate::serve::serve_then_fail(info, &mut disk, n, crate::serve::Failure::Crash)
            }
            Some(r) if r.starts_with("hang-after=") => {
                let n = r["hang-after=".len()..].parse().unwrap_or(u64::MAX);
                crate::serve::serve_then_fail(info, &mut disk, n, crate::serve::Failure::Hang)
            }
            _ => crate::serve::serve(info, &mut disk),
        }
    }
}

/// Test modes that make this driver VM hostile, to show what the rest of the system does
/// about it: `rogue=dma` aims its device's DMA outside its memory; `rogue=garbage` answers
/// its guests with a corrupt ring; `rogue=silent` never answers at all, as a hung driver;
/// `rogue=late` answers nothing for a while and then serves normally;
/// `rogue=crash-after=<n>` serves normally until the device has completed `n` requests, then
/// faults with requests in flight, or at the latest after `2n` (each incarnation again, if
/// dom0 restarts it); `rogue=hang-after=<n>` spins for ever at that point instead (no
/// fault: only dom0's hang watchdog can notice).
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
        // The response ring where the guest's header puts it (0x2000 in the standard
        // layout): claim 0x7fff_ffff responses and fill the slots with noise.
        let at = ipc_spec::block::BlockLayout::read(&region).map_or(0x2000, |l| l.response_ring_offset());
        region.write_u32(at, 0x7fff_ffff);
        for i in 0..256 {
            region.write_u32(at + 8 + i * 4, 0xdead_beef ^ i as u32);
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

    use crate::device::{Disk, Submit, Tag};
    use domain_rt::shared::Region;
    use domain_rt::{channels, println, BootInfo};
    use domain_rt::{hypercall, irq};
    use ipc_spec::block::{
        validate, BlockLayout, DiskInfo, Request, RequestConsumer, Response, ResponseProducer, Status, Validated,
    };
    use ipc_spec::block_part::Partition;
    use ipc_spec::ring::RingError;

    /// Largest request served at once (64 KiB): one virtio descriptor.
    const MAX_SECTORS: u32 = 128;

    /// A read or write taken off a channel's ring and checked, not yet on the device.
    #[derive(Clone, Copy)]
    struct Io {
        id: u64,
        write: bool,
        sector: u64,
        data_offset: usize,
        data_len: usize,
    }

    /// A channel's two ring halves, attached once when the channel is (each keeps its own
    /// index privately, as `ipc_spec::ring` wants, and the peer's last one seen): a
    /// pass then reads the guest's index only when the one seen shows no work, instead of
    /// attaching (checking the geometry, reading both indexes) several times per pass.
    /// Entries held back by `push_batched`/`pop_batched` are published explicitly: at the
    /// end of `take_requests` and of `complete`, before this VM looks again or sleeps.
    struct Rings {
        requests: RequestConsumer<'static, Region>,
        responses: ResponseProducer<'static, Region>,
    }

    /// One guest's block channel.
    struct Channel<'a> {
        name: &'a str,
        /// Lives as long as this VM (leaked at start-up), so that ring halves attached to it
        /// can be kept while the channel's other fields change (`complete`).
        region: &'static Region,
        signal: u64,
        wait: u64,
        layout: Option<BlockLayout>,
        /// Its rings, once attached (with `layout`).
        rings: Option<Rings>,
        /// The guest broke the protocol (corrupt ring): this channel is no longer served.
        broken: bool,
        /// Requests of this channel on the device: each will need a response slot.
        outstanding: u32,
        /// A flush taken off the ring, answered once every earlier request is complete and
        /// the device has flushed; nothing later is taken off this ring meanwhile.
        flush: Option<u64>,
        /// A request the virtqueue had no room for: submitted before anything else.
        stalled: Option<Io>,
        /// Responses pushed since the last doorbell to the guest.
        answered: u32,
        /// This driver's incarnation on the channel (set at attach), carried by every answer.
        incarnation: u32,
        /// The window of the disk this channel's guest sees (`part.<name>=<first>+<count>`
        /// on the command line; the whole disk without one).
        part: Partition,
        /// The guest was asked to ring for new requests (header flag set).
        doorbell_wanted: bool,
        /// Its doorbell is due: rung when this VM is about to sleep (the guest, lower in
        /// priority, cannot run before anyway), the last one with the halt itself.
        ring_due: bool,
    }

    /// The channels on the command line, each with its window of `disk` (a bad window is
    /// reported and the channel is not served: no guest gets more disk than it was given).
    fn channels(info: &BootInfo, disk: &DiskInfo) -> Vec<Channel<'static>> {
        let mut list = Vec::new();
        for name in channels::channel_names(info.cmdline, "block") {
            let Ok(a) = channels::channel(info.cmdline, name) else { continue };
            // SAFETY: dom0 mapped this region into our stage-2 for this channel at the
            // address and size it put on our command line; nothing else in this VM uses it.
            let region = unsafe { a.region() };
            let region: &'static Region = alloc::boxed::Box::leak(alloc::boxed::Box::new(region));
            let key = alloc::format!("part.{name}");
            let (part, broken) = match info.arg(&key).map(|p| Partition::parse(p).and_then(|p| p.check(disk))) {
                None => (Partition::whole(disk), false),
                Some(Ok(p)) => {
                    println!("channel {name}: sectors {}..{} of the disk", p.first, p.first + p.count);
                    (p, false)
                }
                Some(Err(e)) => {
                    println!("channel {name}: {key}: {e}; not served");
                    (Partition::whole(disk), true)
                }
            };
            list.push(Channel {
                name,
                region,
                signal: a.signal,
                wait: a.wait,
                layout: None,
                rings: None,
                outstanding: 0,
                flush: None,
                stalled: None,
                answered: 0,
                incarnation: 0,
                part,
                broken,
                doorbell_wanted: false,
                ring_due: false,
            });
        }
        list
    }

    /// Serve every block channel: doorbells and the device's completion interrupt arrive
    /// as one virtual interrupt. Each pass answers what the device completed (in the order
    /// it completed them), takes new requests off every ring while the device and the
    /// response rings have room, and rings each guest that got answers once.
    pub fn serve(info: &BootInfo, dev: &mut Disk) -> u64 {
        serve_then_fail(info, dev, u64::MAX, Failure::Crash)
    }

    /// How [`serve_then_fail`] fails.
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub enum Failure {
        /// A read far outside this VM's memory: a stage-2 fault dom0 hears of at once.
        Crash,
        /// Spin for ever, answering nothing and beating no heartbeat: a hang.
        Hang,
    }

    /// [`serve`], but fail once the device has completed `crash_after` requests and more
    /// are in flight, or a flush waits: the worst moment for the guest; at the latest once
    /// it has completed twice that many.
    pub fn serve_then_fail(info: &BootInfo, dev: &mut Disk, crash_after: u64, how: Failure) -> u64 {
        let disk = DiskInfo {
            capacity_sectors: dev.blk.capacity(),
            sector_size: 512,
            max_sectors_per_request: MAX_SECTORS,
            read_only: dev.blk.readonly(),
        };
        let mut chans = channels(info, &disk);
        for c in &chans {
            if let Err(e) = hypercall::bind(c.wait, domain_rt::irq::VIRQ_VECTOR) {
                println!("channel {}: binding the doorbell failed: {e}", c.name);
            }
            println!("serving block channel \"{}\" ({} KiB shared)", c.name, c.region.len_kib());
        }
        if chans.is_empty() {
            println!("no block channel on my command line");
        }
        // dom0's hang watchdog (manifest `watchdog_ms`): beat while idle or completing.
        let mut heartbeat = domain_rt::heartbeat::Heartbeat::from_cmdline(info);
        let timer = info.slot("timer");
        let mut first_reported = false;
        loop {
            // Doorbells are not taken off the notifications: they are bound to the virtual
            // interrupt, which each signal raises whatever bits are set, and every wake-up
            // looks at every ring anyway (a hypercall per wake-up is a world switch, dearer
            // than a request under emulation).
            let seen = irq::count();
            while pass(&mut chans, dev, disk) {
                if let Some(h) = heartbeat.as_mut() {
                    h.beat(dev.in_flight() > 0, dev.completed);
                }
                if !first_reported && dev.completed > 0 {
                    // With the crash time below, gives the time a restart costs the guest.
                    println!("first request completed at {} ns", hypercall::clock_ns());
                    crate::startup::report();
                    first_reported = true;
                }
                // The worst moment is with work in flight; but a guest that sends one request
                // at a time may never leave any in flight when this looks, and a driver that
                // then never crashes makes the run depend on timing: by twice the count it
                // crashes whatever is in flight.
                let busy = dev.in_flight() > 0 || chans.iter().any(|c| c.flush.is_some());
                if dev.completed >= crash_after
                    && (busy || dev.completed >= crash_after.saturating_mul(2))
                    && how == Failure::Hang
                {
                    println!(
                        "hanging after {} completed requests, {} in flight, at {} ns (rogue=hang-after)",
                        dev.completed,
                        dev.in_flight(),
                        hypercall::clock_ns()
                    );
                    loop {
                        core::hint::spin_loop();
                    }
                }
                if dev.completed >= crash_after && (busy || dev.completed >= crash_after.saturating_mul(2)) {
                    println!(
                        "crashing after {} completed requests, {} in flight, at {} ns (rogue=crash-after)",
                        dev.completed,
                        dev.in_flight(),
                        hypercall::clock_ns()
                    );
                    // SAFETY: deliberately reading memory this VM does not have: the
                    // microvisor stops it with a stage-2 fault and tells dom0.
                    unsafe { core::ptr::read_volatile(0x1000_0000 as *const u64) };
                }
            }
            if ask_for_doorbells(&mut chans, dev) {
                continue; // requests came in meanwhile: no sleep
            }
            if let Some(h) = heartbeat.as_mut() {
                h.beat(dev.in_flight() > 0, dev.completed);
                if dev.in_flight() == 0 {
                    // Nothing on the device arms the fallback timer: wake for the next beat.
                    if let Some(t) = timer {
                        let _ = hypercall::timer_set(t, h.next_in_ns(), 1);
                    }
                }
            }
            // The doorbells due: all but the last now, the last with the halt.
            let mut ring = None;
            for c in chans.iter_mut().filter(|c| c.ring_due) {
                c.ring_due = false;
                if let Some(r) = ring.replace(c.signal) {
                    let _ = hypercall::signal(r, 1);
                }
            }
            dev.sleep_ringing(seen, ring);
            for c in chans.iter_mut().filter(|c| c.doorbell_wanted) {
                c.doorbell_wanted = false;
                BlockLayout::set_doorbell_wanted(c.region, false);
            }
        }
    }

    /// Before sleeping: where new requests would be taken now (the device has room, the
    /// channel waits for no flush and holds no request the device refused), ask the guest
    /// for its doorbell (D1, with the full fence D2, `BlockLayout::set_doorbell_wanted`),
    /// then look at its rings once more (D3; `ipc_spec::block`, "Doorbells", gives the
    /// ordering argument). Whether a request waits that could be taken now, i.e. with a
    /// response slot for it (then do not sleep). With the device full no doorbell is
    /// wanted: the next completion wakes this VM, which then looks at every ring.
    fn ask_for_doorbells(chans: &mut [Channel], dev: &Disk) -> bool {
        let mut waiting = false;
        for c in chans.iter_mut() {
            if c.rings.is_none() || c.broken || c.flush.is_some() || c.stalled.is_some() || !dev.has_room() {
                continue;
            }
            if !c.doorbell_wanted {
                BlockLayout::set_doorbell_wanted(c.region, true);
                c.doorbell_wanted = true;
            }
            // Only requests it could take now keep it awake: with no response slot for
            // them (the guest has not taken its answers), it sleeps, and the guest, which
            // looks at the flag after taking answers too, rings (a driver spinning here
            // would starve lower priorities).
            let outstanding = c.outstanding;
            waiting |= c.rings.as_mut().is_some_and(
                |r| matches!((r.requests.len(), r.responses.free()), (Ok(n), Ok(free)) if n > 0 && free > outstanding),
            );
        }
        waiting
    }

    /// One pass over the channels and the device; whether anything moved.
    fn pass(chans: &mut [Channel], dev: &mut Disk, disk: DiskInfo) -> bool {
        let mut progress = complete(chans, dev) > 0;
        // A flush waits for the whole device to drain (virtio-drivers' flush is
        // synchronous on the one queue): no new request goes on the device meanwhile.
        if chans.iter().any(|c| c.flush.is_some()) && dev.in_flight() == 0 {
            for c in chans.iter_mut() {
                if let Some(id) = c.flush.take() {
                    let s = status(dev.flush());
                    answer(c, Response::new(id, s));
                    progress = true;
                }
            }
        }
        if !chans.iter().any(|c| c.flush.is_some()) {
            // Every channel's requests, with one notification of the device at the end.
            progress |= dev.submitting(|dev| {
                let mut taken = false;
                for (i, c) in chans.iter_mut().enumerate() {
                    if !c.broken {
                        taken |= take_requests(i, c, dev, disk);
                    }
                }
                taken
            });
        }
        // Completions that arrived meanwhile are taken by the next pass (the loop goes
        // round while passes move, and the sleep looks at the used ring first), not by a
        // second take here: each take that finds one moves virtio's used-event index
        // on (virtio-drivers writes it after every completion taken), so the device
        // interrupts for the very next completion, mostly while this VM is still awake,
        // and an interrupt taken while a VM runs costs it an exit (`bench blk`: 0.11 device
        // interrupts per request through the driver VM with a second take here, 0.08 as
        // direct without).
        // Completions are batched: a guest is rung once half of what it has in flight here
        // is answered (so it refills while the device works on the rest), which includes
        // its last answer; each wake-up of the guest costs world switches, which under
        // emulation cost more than a request.
        for c in chans.iter_mut().filter(|c| c.answered > 0) {
            let waiting = c.rings.as_mut().and_then(|r| r.requests.len().ok()).unwrap_or(0);
            // Saturating: `answered` grows until the guest is rung, and a guest that keeps
            // its last-answer-only flag set and never drains must not wrap it.
            let window = c
                .answered
                .saturating_add(c.outstanding)
                .saturating_add(waiting)
                .saturating_add(u32::from(c.flush.is_some() || c.stalled.is_some()));
            // Held back only if the client asked for its last answer only and every answer
            // still owed has a response slot (looked at only when the ring would be due).
            let hold = |c: &mut Channel| {
                let owed = window.saturating_sub(c.answered);
                BlockLayout::last_answer_only(c.region)
                    && c.rings
                        .as_mut()
                        .and_then(|r| r.responses.free().ok())
                        .is_some_and(|free| ipc_spec::block::may_hold_ring(true, free, owed))
            };
            let due = ipc_spec::block::ring_client_now(c.answered, window, false);
            if due && ipc_spec::block::ring_client_now(c.answered, window, c.answered < window && hold(c)) {
                c.answered = 0;
                c.ring_due = true;
            }
        }
        progress
    }

    /// Answer every request the device completed, as it takes them; how many. The answers
    /// go on each channel's response ring as they come and are published once, at the end
    /// (one write of each ring's producer index per pass).
    fn complete(chans: &mut [Channel], dev: &mut Disk) -> usize {
        let taken = dev.take_completions(|tag: Tag, r| {
            let Some(c) = chans.get_mut(tag.chan) else { return };
            c.outstanding = c.outstanding.saturating_sub(1);
            if c.broken {
                return;
            }
            let Some(rings) = c.rings.as_mut() else { return };
            // Room was reserved when the request was taken (so the consumer index read
            // last is normally enough: `push_batched`).
            match rings.responses.push_batched(&Response::new(tag.id, status(r)).from(c.incarnation).encode()) {
                Ok(()) => c.answered += 1,
                Err(e) => {
                    give_up(c, e);
                }
            }
        });
        if taken > 0 {
            for rings in chans.iter_mut().filter_map(|c| c.rings.as_mut()) {
                rings.responses.publish();
            }
        }
        taken
    }

    /// Push a response (room was reserved when its request was taken).
    fn answer(c: &mut Channel, resp: Response) {
        if c.broken {
            return;
        }
        let Some(rings) = c.rings.as_mut() else { return };
        let resp = resp.from(c.incarnation);
        match rings.responses.push(&resp.encode()) {
            Ok(()) => c.answered += 1,
            Err(e) => {
                give_up(c, e);
            }
        }
    }

    /// Take requests off the channel's ring while the device and the response ring have
    /// room: reads and writes go on the device, the rest is answered at once; a flush stops
    /// the taking until it is done. Whether anything was taken.
    fn take_requests(chan: usize, c: &mut Channel, dev: &mut Disk, disk: DiskInfo) -> bool {
        let disk = c.part.info(&disk);
        let layout = match c.layout {
            Some(l) => l,
            None => match BlockLayout::read(c.region) {
                Ok(l) => {
                    // Announce this incarnation: requests still on the ring are dropped and
                    // the client, rung below, sends again everything it has not seen
                    // answered (this VM may be a restarted one).
                    match l.driver_attach(c.region) {
                        Ok(n) => {
                            crate::startup::mark(crate::startup::Step::Attached);
                            println!("channel {}: attached as incarnation {n}", c.name);
                            c.incarnation = n;
                        }
                        Err(e) => return give_up(c, e),
                    }
                    match l.driver_rings(c.region) {
                        Ok((requests, responses)) => c.rings = Some(Rings { requests, responses }),
                        Err(e) => return give_up(c, e),
                    }
                    c.layout = Some(l);
                    c.answered += 1;
                    return true;
                }
                Err(_) => return false, // not set up by the guest yet
            },
        };
        if let Some(io) = c.stalled.take() {
            match start(chan, c, dev, io) {
                Ok(()) => {}
                Err(None) => return false,
                Err(Some(id)) => answer(c, Response::new(id, Status::IoError)),
            }
        }
        if c.flush.is_some() || c.stalled.is_some() {
            return false;
        }
        let mut took = false;
        let on_device = c.outstanding;
        // Out of the channel while it is worked on (given back at the end, with every index
        // written once; a channel given up on below keeps none).
        let Some(mut rings) = c.rings.take() else { return false };
        let Rings { requests, responses } = &mut rings;
        // A flush or a request the device has no room for ends the batch (`break`): the
        // loop looks only at the device's room.
        while dev.has_room() {
            // Every request on the device and the one taken now need a response slot. The
            // consumer index read last is a lower bound of the room (the guest only frees
            // slots): it is read again only when that bound is not enough.
            if responses.free_seen() <= c.outstanding {
                match responses.free() {
                    Ok(free) if free > c.outstanding => {}
                    Ok(_) => break, // the guest must drain responses first
                    Err(e) => return give_up(c, e),
                }
            }
            // The producer index is read again only once the entries seen are taken.
            let slot = match requests.pop_batched() {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(e) => return give_up(c, e),
            };
            took = true;
            let req = Request::decode(&slot);
            let (write, t) = match validate(&req, &layout, disk) {
                Ok(Validated::GetInfo) => {
                    if let Err(e) = push_answer(responses, c, Response::info(req.id, disk)) {
                        return give_up(c, e);
                    }
                    continue;
                }
                Ok(Validated::Flush) => {
                    c.flush = Some(req.id);
                    break;
                }
                Ok(Validated::Read(t)) => (false, t),
                Ok(Validated::Write(t)) => (true, t),
                Err(s) => {
                    if let Err(e) = push_answer(responses, c, Response::new(req.id, s)) {
                        return give_up(c, e);
                    }
                    continue;
                }
            };
            let io = Io {
                id: req.id,
                write,
                sector: c.part.to_disk(t.sector()),
                data_offset: t.data_offset(),
                data_len: t.data_len(),
            };
            match start(chan, c, dev, io) {
                Ok(()) => {}
                Err(None) => break,
                Err(Some(id)) => {
                    if let Err(e) = push_answer(responses, c, Response::new(id, Status::IoError)) {
                        return give_up(c, e);
                    }
                }
            }
        }
        requests.release();
        responses.publish();
        c.rings = Some(rings);
        // Noted once per batch, not per request (the check costs little, the registers it
        // needs in the loop do).
        if c.outstanding != on_device && !crate::startup::marked(crate::startup::Step::FirstTaken) {
            crate::startup::mark(crate::startup::Step::FirstTaken);
        }
        took
    }

    /// Answer on the channel's response ring (as its incarnation), held back for the batch's
    /// one index write; room was reserved when the request was taken.
    fn push_answer(
        responses: &mut ResponseProducer<'static, Region>,
        c: &mut Channel,
        resp: Response,
    ) -> Result<(), RingError> {
        responses.push_batched(&resp.from(c.incarnation).encode())?;
        c.answered += 1;
        Ok(())
    }

    /// Put a checked read or write on the device; `Err(None)` if it had no room (kept as
    /// the channel's stalled request), `Err(Some(id))` if the device refused it (the caller
    /// answers it with an I/O error).
    fn start(chan: usize, c: &mut Channel, dev: &mut Disk, io: Io) -> Result<(), Option<u64>> {
        let buf = (c.region.base() + io.data_offset) as *mut u8;
        // SAFETY: `validate` placed the range inside the shared data area, which stays mapped
        // for this VM's life; the device DMAs straight into (or out of) it through the IOMMU.
        // The guest may scribble on it meanwhile: that only spoils its own data.
        match unsafe { dev.submit(Tag { chan, id: io.id }, io.write, io.sector, buf, io.data_len) } {
            Ok(()) => {
                c.outstanding += 1;
                Ok(())
            }
            Err(Submit::Full) => {
                c.stalled = Some(io);
                Err(None)
            }
            Err(Submit::Failed(_)) => Err(Some(io.id)),
        }
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

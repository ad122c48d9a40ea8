//! The VM's disk and network: a virtio-blk and a virtio-net function on the VMM's PCI bus
//! (`vmm::virtio`), whose back ends are the block and net channels dom0 gave this domain to
//! the disk and net driver VMs (`chan.<name>.kind=block|net`, `domain_rt::channels`).
//!
//! The functions' BARs sit in the hole above the VM's RAM (below the I/O APIC), where the
//! VM's stage-2 maps nothing, so every access exits to this VMM as a stage-2 fault.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use domain_rt::channels;
use domain_rt::hypercall;
use domain_rt::println;
use domain_rt::shared::Region;
use vmm::virtio::blk::VirtioBlk;
use vmm::virtio::channel::{BlockChannel, Doorbell, NetChannel, NetChannelError};
use vmm::virtio::net::VirtioNet;
use vmm::virtio::pci::{ResetCause, VirtioPci};
use vmm::virtio::pci_bus::PciBus;

/// PCI slot and BAR 0 of the virtio-blk function (32 KiB aligned, above any VM RAM this VMM
/// can view: `setup::VIEW_MAX` keeps the VM below 1.5 GiB).
pub const BLK_SLOT: u8 = 1;
pub const BLK_BAR0: u64 = 0xe000_0000;
/// PCI slot and BAR 0 of the virtio-net function.
const NET_SLOT: u8 = 2;
pub const NET_BAR0: u64 = 0xe000_8000;
/// How long the driver VMs get to answer the disk's `GetInfo` and to lay out the net
/// channel's header (they start before this VMM, but may still be initialising their devices).
const CONNECT_TRIES: u32 = 500;
const CONNECT_STEP_NS: u64 = 10_000_000;

/// A channel's doorbell: signals the driver VM's notification (slot, back end: [`BLOCK`] or
/// [`NET`]).
pub struct Bell(u64, usize);

/// The back ends, for the counters below.
pub const BLOCK: usize = 0;
pub const NET: usize = 1;

/// The benchmark's counters (`cargo xtask bench linux-io`), per back end: doorbells rung, the
/// TSC of the first ring not answered yet (0: none), answers seen and the TSC ticks from
/// ring to answer summed: how long the driver VM (and its device) took.
static BELLS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
static RUNG_AT: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
static ANSWERS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
static ANSWER_TICKS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// (doorbells rung, answers, TSC ticks from ring to answer) of back end `which`.
pub fn bell_counters(which: usize) -> (u64, u64, u64) {
    let get = |a: &[AtomicU64; 2]| a.get(which).map_or(0, |x| x.load(Ordering::Relaxed));
    (get(&BELLS), get(&ANSWERS), get(&ANSWER_TICKS))
}

fn blk(bus: &mut PciBus) -> Option<&mut VirtioBlk<BlockChannel<Region, Bell>>> {
    bus.function_mut(BLK_SLOT).and_then(|f| f.device_mut().as_any_mut().downcast_mut())
}

/// Requests the virtio-blk function has on the block channel and not completed.
pub fn blk_in_flight(bus: &mut PciBus) -> usize {
    blk(bus).map_or(0, |b| b.in_flight())
}

/// The VMM found answers of back end `which`'s driver VM (requests it completed).
pub fn answered(which: usize) {
    let Some(rung) = RUNG_AT.get(which) else { return };
    let t = rung.swap(0, Ordering::Relaxed);
    if t != 0 {
        ANSWERS[which].fetch_add(1, Ordering::Relaxed);
        ANSWER_TICKS[which].fetch_add(crate::setup::rdtsc().saturating_sub(t), Ordering::Relaxed);
    }
}

impl Doorbell for Bell {
    fn ring(&mut self) {
        if let (Some(n), Some(rung)) = (BELLS.get(self.1), RUNG_AT.get(self.1)) {
            n.fetch_add(1, Ordering::Relaxed);
            let _ = rung.compare_exchange(0, crate::setup::rdtsc(), Ordering::Relaxed, Ordering::Relaxed);
        }
        // A failed signal (the driver VM is gone) leaves its requests in flight; the guest's
        // driver times them out. Nothing else here depends on it.
        let _ = hypercall::signal(self.0, 1);
    }
}

/// Console reports of device errors at most (a guest resetting and breaking its queues in a
/// loop must not flood the console); the count of all of them is in the summary.
const MAX_ERROR_REPORTS: u32 = 64;

/// The PCI bus with the devices, and the notifications the driver VMs ring.
pub struct Devices {
    pub bus: PciBus,
    /// Our doorbells of the channels (the `wait` slots), bound to the VMM's receive.
    /// With their back end ([`BLOCK`], [`NET`]).
    pub waits: Vec<(u64, usize)>,
    /// Per function on the bus: its slot, name and the `DEVICE_NEEDS_RESET` cause last seen.
    errors_seen: Vec<(u8, &'static str, Option<ResetCause>)>,
    /// Times a function stopped on a guest error (`DEVICE_NEEDS_RESET`).
    needs_reset: u32,
    /// Disk driver VM incarnations reported so far.
    incarnations: u64,
    /// Net driver VM restarts reported so far, and the link state last reported.
    net_restarts: u64,
    net_link: Option<bool>,
}

impl Devices {
    /// Reports each time a function stops on what the guest put in its queues (the
    /// `DEVICE_NEEDS_RESET` cause): the VM's own fault, contained in its device, which
    /// serves again once the guest resets it. Call after anything that may move a function.
    pub fn report_errors(&mut self) {
        for (slot, name, seen) in self.errors_seen.iter_mut() {
            let now = self.bus.function(*slot).and_then(|f| f.last_error());
            if now == *seen {
                continue;
            }
            *seen = now;
            let Some(cause) = now else { continue };
            self.needs_reset += 1;
            if self.needs_reset <= MAX_ERROR_REPORTS {
                match cause {
                    ResetCause::Queue(e) => {
                        println!("{name} 00:{slot:02x}.0: the guest broke its {e}; DEVICE_NEEDS_RESET")
                    }
                    ResetCause::DriverOkWithoutFeatures => {
                        println!("{name} 00:{slot:02x}.0: DRIVER_OK without FEATURES_OK; DEVICE_NEEDS_RESET")
                    }
                }
            }
        }
    }

    /// Reports a new disk driver VM incarnation (a restarted driver: the block channel sent it
    /// every request the dead one had not answered), a new net driver VM incarnation (the net
    /// channel follows it) and the net link going down or up (dom0 gave up on the net driver
    /// VM, or built it again).
    pub fn report_restarts(&mut self) {
        self.report_net();
        let Some(b) = self.bus.function_mut(BLK_SLOT).and_then(|f| f.device_mut().as_any_mut().downcast_mut::<Blk>())
        else {
            return;
        };
        let chan = b.backend();
        if chan.incarnations() > self.incarnations {
            if self.incarnations > 0 {
                println!(
                    "disk driver VM incarnation {} attached: {} requests sent again in all, {} stale answers ignored",
                    chan.incarnations(),
                    chan.replayed,
                    chan.ignored()
                );
            }
            self.incarnations = chan.incarnations();
        }
    }

    fn report_net(&mut self) {
        let Some(n) = self.bus.function_mut(NET_SLOT).and_then(|f| f.device_mut().as_any_mut().downcast_mut::<Net>())
        else {
            return;
        };
        let chan = n.backend();
        if chan.restarts > self.net_restarts {
            self.net_restarts = chan.restarts;
            println!(
                "net driver VM incarnation {} attached: {} restarts followed, {} stale frames dropped in all",
                chan.incarnation(),
                chan.restarts,
                chan.stale_dropped()
            );
            if chan.identity_changes > 0 {
                println!("net driver VM changed MAC or MTU {} times; the device keeps its own", chan.identity_changes);
            }
        }
        let up = vmm::virtio::net::NetBackend::link_up(chan);
        if self.net_link != Some(up) {
            if self.net_link.is_some() {
                if up {
                    println!("virtio-net: link up (net driver VM incarnation {})", chan.incarnation());
                } else if chan.server_gone() {
                    println!("virtio-net: link down: dom0 gave up on the net driver VM");
                } else {
                    println!("virtio-net: link down (the net driver VM says so)");
                }
            }
            self.net_link = Some(up);
        }
    }

    /// Whether each device ([`BLOCK`], [`NET`]) has work outstanding, and a counter that moves
    /// whenever it progresses (for [`vmm::stall::StallWatch`]). Block: requests the guest
    /// made available and the VMM has not taken, taken but waiting for room, or on the
    /// channel; net: transmit chains not taken or a frame waiting for room (the receive
    /// queue always holds buffers: it is not work).
    pub fn activity(&mut self, mem: &dyn vmm::memory::GuestMemory) -> [(bool, u64); 2] {
        let mut out = [(false, 0); 2];
        if let Some(f) = self.bus.function_mut(BLK_SLOT) {
            let untaken = f.untaken(0, mem);
            if let Some(b) = f.device_mut().as_any_mut().downcast_mut::<Blk>() {
                let s = b.stats();
                out[BLOCK] = (
                    untaken > 0 || b.in_flight() > 0 || b.waiting_for_room(),
                    s.submitted + s.completed + s.errors + s.busy,
                );
            }
        }
        if let Some(f) = self.bus.function_mut(NET_SLOT) {
            let untaken = f.untaken(1, mem);
            if let Some(n) = f.device_mut().as_any_mut().downcast_mut::<Net>() {
                let s = n.stats();
                out[NET] = (untaken > 0 || n.tx_waiting(), s.tx_frames + s.tx_dropped + s.rx_frames + s.rx_dropped);
            }
        }
        out
    }

    /// One line per device `which` about a stall: the virtqueues and transport (avail, taken,
    /// used, MSI-X), the device's requests, and for the disk the block channel's client and
    /// rings. Only reads: nothing is rung or retried.
    pub fn stall_report(&mut self, which: usize, mem: &dyn vmm::memory::GuestMemory, secs: u64) {
        let (slot, name) = if which == BLOCK { (BLK_SLOT, "virtio-blk") } else { (NET_SLOT, "virtio-net") };
        let (bells, answers, _) = bell_counters(which);
        let Some(f) = self.bus.function_mut(slot) else { return };
        let transport = f.stall_state(mem);
        let dev = if let Some(b) = f.device_mut().as_any_mut().downcast_mut::<Blk>() {
            let s = b.stats();
            format!(
                "dev in_flight={} waiting_for_room={} submitted={} completed={} busy={} | {}",
                b.in_flight(),
                b.waiting_for_room(),
                s.submitted,
                s.completed,
                s.busy,
                b.backend().stall_state()
            )
        } else if let Some(n) = f.device_mut().as_any_mut().downcast_mut::<Net>() {
            let s = n.stats();
            let chan = n.backend();
            format!(
                "dev tx_waiting={} tx={} rx={} rx_dropped={} | chan incarnation={} header_incarnation={} restarts={} stale={} gone={} link={}",
                n.tx_waiting(),
                s.tx_frames,
                s.rx_frames,
                s.rx_dropped,
                chan.incarnation(),
                chan.header_incarnation(),
                chan.restarts,
                chan.stale_dropped(),
                chan.server_gone(),
                vmm::virtio::net::NetBackend::link_up(chan),
            )
        } else {
            String::new()
        };
        println!("STALL {name}: no progress for {secs} s: {transport} | {dev} | bells={bells} answered={answers}");
    }

    /// What the devices did, for the VMM's last words.
    pub fn summary(&mut self) {
        if self.errors_seen.is_empty() {
            return;
        }
        println!("virtio: {} device stops on guest errors (DEVICE_NEEDS_RESET)", self.needs_reset);
        if let Some(b) = self.bus.function_mut(BLK_SLOT).and_then(|f| f.device_mut().as_any_mut().downcast_mut::<Blk>())
        {
            let s = b.stats();
            println!(
                "virtio-blk: {} requests to the disk driver VM, {} completed, {} failed (IOERR/UNSUPP); {} driver incarnations, {} requests sent again",
                s.submitted,
                s.completed,
                s.errors,
                b.backend().incarnations(),
                b.backend().replayed
            );
        }
        if let Some(n) = self.bus.function_mut(NET_SLOT).and_then(|f| f.device_mut().as_any_mut().downcast_mut::<Net>())
        {
            let s = n.stats();
            let chan = n.backend();
            println!(
                "virtio-net: {} frames sent, {} transmit chains dropped, {} frames received, {} dropped; {} net driver restarts followed, {} stale frames dropped",
                s.tx_frames,
                s.tx_dropped,
                s.rx_frames,
                s.rx_dropped,
                chan.restarts,
                chan.stale_dropped()
            );
        }
    }
}

type Blk = VirtioBlk<BlockChannel<Region, Bell>>;
type Net = VirtioNet<NetChannel<'static, Region, Bell>>;

/// The first channel of `kind` on the command line, with its region.
fn first(cmdline: &str, kind: &'static str) -> Option<(String, Region, u64, u64)> {
    let a = channels::channel_names(cmdline, kind).find_map(|n| channels::channel(cmdline, n).ok())?;
    // SAFETY: dom0 mapped this region into this domain's stage-2 for the channel, at the
    // address and size on its command line, for the domain's whole life; nothing else in
    // this domain uses that memory.
    Some((String::from(a.name), unsafe { a.region() }, a.signal, a.wait))
}

/// Connects the channels present on the command line and puts their devices on the bus.
/// `timer` is this domain's timer notification (used to pace the waits here). A channel
/// that cannot be connected is reported and left out: the VM boots without that device.
pub fn connect(cmdline: &str, timer: u64) -> Devices {
    let mut d = Devices {
        bus: PciBus::new(),
        waits: Vec::new(),
        errors_seen: Vec::new(),
        needs_reset: 0,
        incarnations: 0,
        net_restarts: 0,
        net_link: None,
    };
    if let Some((name, region, signal, wait)) = first(cmdline, "block") {
        match block(region, signal, timer) {
            Ok(dev) => match d.bus.add(BLK_SLOT, BLK_BAR0, VirtioPci::new(dev)) {
                Ok(()) => {
                    println!("virtio-blk on 00:{BLK_SLOT:02x}.0 through block channel \"{name}\"");
                    d.waits.push((wait, BLOCK));
                    d.errors_seen.push((BLK_SLOT, "virtio-blk", None));
                }
                Err(e) => println!("virtio-blk: {e}"),
            },
            Err(e) => println!("block channel \"{name}\": {e}; the VM has no disk"),
        }
    }
    if let Some((name, region, signal, wait)) = first(cmdline, "net") {
        match net(region, signal, timer) {
            Ok(dev) => match d.bus.add(NET_SLOT, NET_BAR0, VirtioPci::new(dev)) {
                Ok(()) => {
                    println!("virtio-net on 00:{NET_SLOT:02x}.0 through net channel \"{name}\"");
                    d.waits.push((wait, NET));
                    d.errors_seen.push((NET_SLOT, "virtio-net", None));
                }
                Err(e) => println!("virtio-net: {e}"),
            },
            Err(e) => println!("net channel \"{name}\": {e}; the VM has no network"),
        }
    }
    d
}

fn block(region: Region, signal: u64, timer: u64) -> Result<Box<Blk>, String> {
    let mut chan = BlockChannel::connect(region, Bell(signal, BLOCK)).map_err(|e| format!("{e:?}"))?;
    for _ in 0..CONNECT_TRIES {
        match chan.poll_info() {
            Some(Ok(info)) => {
                println!(
                    "disk: {} MiB, up to {} KiB per request, {} in flight",
                    info.capacity_sectors >> 11,
                    info.max_sectors_per_request / 2,
                    chan.slots()
                );
                return Ok(Box::new(VirtioBlk::new(chan, b"linux-disk0")));
            }
            Some(Err(status)) => return Err(format!("the disk driver VM refused: {status:?}")),
            None => hypercall::sleep_ns(timer, CONNECT_STEP_NS).map_err(|e| format!("sleep: {e}"))?,
        }
    }
    // The state that says where the question stopped (as the stall report does later).
    Err(format!("the disk driver VM did not answer ({})", chan.stall_state()))
}

fn net(region: Region, signal: u64, timer: u64) -> Result<Box<Net>, String> {
    // The net channel borrows its region for the device's life, which is the VM's.
    let region: &'static Region = Box::leak(Box::new(region));
    for _ in 0..CONNECT_TRIES {
        match NetChannel::attach(region, Bell(signal, NET)) {
            Ok(chan) => return Ok(Box::new(VirtioNet::new(chan))),
            Err(NetChannelError::Layout(_)) => {
                hypercall::sleep_ns(timer, CONNECT_STEP_NS).map_err(|e| format!("sleep: {e}"))?
            }
            Err(e) => return Err(format!("{e:?}")),
        }
    }
    Err(String::from("the net driver VM did not lay out the channel"))
}

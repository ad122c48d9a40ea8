//! The guest's network device: a net channel to the net driver VM (`ipc_spec::net`), shown to
//! smoltcp as an Ethernet device. Frames are copied into the TX ring's slots and out of the
//! RX ring's slots; one doorbell to the driver VM after a poll that sent anything.
//!
//! The channel survives the net driver VM (`ipc_spec::net`, "Restarts"): when dom0 restarts
//! it, the next incarnation re-attaches to these rings; frames the dead one left on the RX
//! ring are dropped, frames in flight are lost (TCP sends them again), and the MAC stays.
//! The device counts the restarts it lived through and how long each cost (from the last
//! frame of one incarnation to the first of the next), for the status page.

use alloc::boxed::Box;
use domain_rt::hypercall;
use domain_rt::shared::Region;
use ipc_spec::net::{DropCounters, FrameReceiver, FrameSender, NetDropReason, NetHeader, MAX_FRAME_LEN};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// What the HTTP server needs of a network device besides smoltcp's [`Device`]: a net
/// channel to the net driver VM ([`ChannelDevice`]) or a NIC the guest owns directly.
pub trait NetDevice: Device {
    /// The device's MAC address.
    fn mac(&self) -> ipc_spec::net::MacAddr;
    /// Called after every poll: tell the other side about frames queued since the last call
    /// (it may wait for more, up to [`NetDevice::flush`]).
    fn kick(&mut self);
    /// Why the device cannot be used, if it cannot: for good (a corrupt ring, a failed
    /// NIC), or until dom0 builds the net driver VM again ([`GONE`]).
    fn dead(&self) -> Option<&'static str>;
    /// Called when the server is about to poll again at once with no progress made: tell
    /// the other side about every frame it has not taken yet (before a wait,
    /// [`NetDevice::prepare_to_wait`] and [`NetDevice::wait`] do).
    fn flush(&mut self) {}
    /// Before the server waits for its notification: ask to be woken for what arrives
    /// from now on, and tell the other side about every frame it has not taken yet;
    /// `false` if something already arrived (then do not wait: poll again).
    fn prepare_to_wait(&mut self) -> bool {
        true
    }
    /// Waits on the server's notification `slot` (after [`NetDevice::prepare_to_wait`] said
    /// to, and the server armed its timer on it).
    fn wait(&mut self, slot: u64) {
        let _ = hypercall::wait(slot);
    }
    /// The server runs again (after a wait, or instead of one) and will call
    /// [`NetDevice::prepare_to_wait`] before it next waits.
    fn running(&mut self) {}
    /// One line for the status page.
    fn describe(&self, out: &mut alloc::string::String);
}

/// Why a net channel is dead while dom0 has given up on its driver (`ipc_spec::net`,
/// "Restarts"; dom0 rings our doorbell when it marks the channel).
pub const GONE: &str = "server gone: dom0 gave up restarting the net driver VM";

impl NetDevice for ChannelDevice {
    fn mac(&self) -> ipc_spec::net::MacAddr {
        self.header.mac
    }

    fn kick(&mut self) {
        ChannelDevice::kick(self)
    }

    fn dead(&self) -> Option<&'static str> {
        if self.is_corrupt() {
            Some("a ring of the net channel is corrupt")
        } else if ipc_spec::net::server_gone(self.region) {
            Some(GONE)
        } else {
            None
        }
    }

    fn flush(&mut self) {
        ChannelDevice::flush(self)
    }

    /// Asks the driver to ring for RX frames again and looks at the RX ring once more
    /// (`ipc_spec::net`, "Doorbells"); the doorbell for frames the driver has not taken yet
    /// is left to [`NetDevice::wait`], which rings it and waits in one hypercall
    /// (`SignalWait`): a driver VM that outranks us runs at once, and then the CPU goes
    /// idle, with no return to this guest in between only to wait (one world switch fewer
    /// per idle period). Frames the driver puts on our RX ring in that round are rung for
    /// (the doorbell is armed by then): the wait ends at once. A corrupt ring: wait anyway
    /// (the server stops).
    fn prepare_to_wait(&mut self) -> bool {
        self.ring_on_wait = self.sent && self.tx.in_flight().map_or(true, |n| n > 0);
        self.sent = false;
        let waiting = matches!(self.rx.arm_doorbell(), Ok(true));
        if waiting && self.ring_on_wait {
            // Not waiting after all: ring now (the frames must not wait for our next idle).
            self.ring_on_wait = false;
            self.ring();
        }
        !waiting
    }

    fn wait(&mut self, slot: u64) {
        let bits = if core::mem::take(&mut self.ring_on_wait) {
            self.kicks += 1;
            hypercall::signal_wait(self.signal, 1, slot).or_else(|_| {
                // (Refused: ring and wait apart.)
                let _ = hypercall::signal(self.signal, 1);
                hypercall::wait(slot)
            })
        } else {
            hypercall::wait(slot)
        };
        // Woken by the server's timer alone (bit 1, see `Server::run`): nothing from the
        // driver VM. Counted for the status page: a wait that a frame should have ended
        // shows here as a timer wake-up.
        if bits == Ok(TIMER_BIT) {
            self.timer_wakeups += 1;
        }
    }

    /// While the server runs it looks at the RX ring before it waits: no doorbells needed.
    fn running(&mut self) {
        self.rx.suppress_doorbells();
    }

    fn describe(&self, out: &mut alloc::string::String) {
        use core::fmt::Write as _;
        let c = &self.counters;
        let _ = write!(
            out,
            "net: channel to the net driver VM, MAC {}, {} frames received, {} sent ({} doorbells), {} receive drops, {} waits ended by the timer alone",
            self.header.mac,
            c.received,
            c.sent,
            self.kicks,
            c.receive_dropped.total(),
            self.timer_wakeups
        );
        let r = &self.restarts;
        let _ = write!(
            out,
            "\nnet driver restarts seen: {} (incarnation {}), {} stale frames dropped, {} MAC changes",
            self.rx.incarnation_changes(),
            self.rx.incarnation().unwrap_or(0),
            c.receive_dropped.get(NetDropReason::Stale),
            r.mac_changes
        );
        let mut gaps = r.gaps_us.clone();
        gaps.sort_unstable();
        if let (Some(median), Some(worst)) = (gaps.get(gaps.len() / 2), gaps.last()) {
            let _ = write!(
                out,
                "\nnet restart gaps (last frame of one incarnation to the first of the next): median {} us, worst {} us, over {}",
                median,
                worst,
                gaps.len()
            );
        }
    }
}

/// One end of a net channel, as a smoltcp device.
pub struct ChannelDevice {
    tx: FrameSender<'static, Region>,
    rx: FrameReceiver<'static, Region>,
    rx_buf: [u8; MAX_FRAME_LEN],
    /// Where smoltcp builds a frame before it is copied into the TX ring (kept, not a fresh
    /// zeroed array per frame: a 1514-byte memset per frame sent, under TCG). Boxed: the
    /// device is moved by value through the server's frames.
    tx_buf: Box<[u8; MAX_FRAME_LEN]>,
    /// Frames queued since the last doorbell.
    sent: bool,
    /// [`NetDevice::wait`] rings the doorbell for frames still on the TX ring.
    ring_on_wait: bool,
    /// Frames received, sent, and dropped on receive (with the reason of the last).
    pub counters: Counters,
    signal: u64,
    /// What the driver VM put in the header.
    pub header: NetHeader,
    region: &'static Region,
    restarts: Restarts,
    /// Doorbells rung to the driver VM.
    kicks: u64,
    /// Waits that only the server's timer ended.
    timer_wakeups: u64,
}

/// The bit the server's timer sets on its notification (`Server::run`).
const TIMER_BIT: u64 = 1 << 1;

/// Frames on the TX ring that make [`ChannelDevice::kick`] ring the driver at once (a
/// quarter of the 64 entries of a 520 KiB channel: the pipeline to the device keeps going
/// while the server streams).
const KICK_BATCH: u32 = 16;

/// What the driver's restarts cost this guest.
#[derive(Default)]
struct Restarts {
    /// Incarnation changes already accounted for.
    seen: u32,
    /// When the last frame was received (smoltcp's clock, us: no hypercall per frame), and
    /// when the last frame before the latest restart was (the gap is measured at the next
    /// frame).
    last_frame_us: i64,
    gap_from: Option<i64>,
    /// Gaps measured (microseconds), the latest [`MAX_GAPS`].
    gaps_us: alloc::vec::Vec<u64>,
    /// Restarts after which the header named another MAC than ours (the driver must keep it).
    mac_changes: u32,
}

/// Restart gaps kept for the status page.
const MAX_GAPS: usize = 1024;

/// What the device has done.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub received: u64,
    pub sent: u64,
    pub send_failed: u64,
    pub receive_dropped: DropCounters,
}

/// Why the channel could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// The driver VM did not set the header up in time.
    NoDriver,
    /// The header is there but wrong (version, layout, MTU).
    Header(ipc_spec::net::LayoutError),
    /// The rings' indexes are inconsistent.
    Rings,
}

impl core::fmt::Display for OpenError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            OpenError::NoDriver => f.write_str("the net driver VM did not set the channel up"),
            OpenError::Header(e) => write!(f, "bad channel header: {e}"),
            OpenError::Rings => f.write_str("the channel's rings are corrupt"),
        }
    }
}

impl ChannelDevice {
    /// Waits (up to `timeout_ns`, woken by the driver's doorbell on `wait`) for the driver VM
    /// to set the channel up, then attaches to its rings.
    pub fn open(region: Region, signal: u64, wait: u64, timeout_ns: u64) -> Result<Self, OpenError> {
        let region: &'static Region = Box::leak(Box::new(region));
        let start = hypercall::clock_ns();
        let (header, layout) = loop {
            match NetHeader::check(region) {
                Ok(h) => break h,
                Err(ipc_spec::net::LayoutError::BadMagic { .. }) => {
                    if hypercall::clock_ns().saturating_sub(start) > timeout_ns {
                        return Err(OpenError::NoDriver);
                    }
                    // The driver rings our doorbell once it has written the header; the timer
                    // is the fallback.
                    let _ = hypercall::timer_set(wait, 10_000_000, 1);
                    let _ = hypercall::wait(wait);
                }
                Err(e) => return Err(OpenError::Header(e)),
            }
        };
        let (tx, mut rx) = layout.guest_channel(region, header.mtu).map_err(|_| OpenError::Rings)?;
        rx.follow_incarnations();
        Ok(Self {
            tx,
            rx,
            rx_buf: [0; MAX_FRAME_LEN],
            tx_buf: Box::new([0; MAX_FRAME_LEN]),
            sent: false,
            ring_on_wait: false,
            counters: Counters::default(),
            signal,
            header,
            region,
            restarts: Restarts::default(),
            kicks: 0,
            timer_wakeups: 0,
        })
    }

    /// Looks at the driver's incarnation (one load from the header); after a restart, checks
    /// that the new incarnation kept our MAC and MTU, and starts timing the gap.
    fn note_restarts(&mut self) {
        self.rx.check_incarnation();
        let changes = self.rx.incarnation_changes();
        if changes == self.restarts.seen {
            return;
        }
        self.restarts.seen = changes;
        self.restarts.gap_from.get_or_insert(self.restarts.last_frame_us);
        match NetHeader::check(self.region) {
            Ok((h, _)) if h.mac == self.header.mac && h.mtu == self.header.mtu => {}
            Ok((h, _)) => {
                self.restarts.mac_changes += 1;
                domain_rt::println!(
                    "net: the net driver VM's incarnation {} says MAC {}, MTU {} (was {}, {}); keeping ours",
                    self.rx.incarnation().unwrap_or(0),
                    h.mac,
                    h.mtu,
                    self.header.mac,
                    self.header.mtu
                );
            }
            Err(e) => domain_rt::println!("net: header after a driver restart: {e}"),
        }
    }

    /// A frame arrived at `now` (after [`ChannelDevice::note_restarts`]): closes a restart's
    /// gap.
    fn frame_arrived(&mut self, now: Instant) {
        let now = now.total_micros();
        if let Some(from) = self.restarts.gap_from.take() {
            if self.restarts.gaps_us.len() == MAX_GAPS {
                self.restarts.gaps_us.remove(0);
            }
            self.restarts.gaps_us.push(now.saturating_sub(from).max(0) as u64);
        }
        self.restarts.last_frame_us = now;
    }

    /// After a poll: rings the driver VM's doorbell once [`KICK_BATCH`] frames wait for it
    /// (and looks whether the driver was restarted). Fewer wait for [`ChannelDevice::flush`]
    /// or for the driver's next round (a frame from the network wakes it), whichever comes
    /// first: a doorbell switches to the driver VM and back, so one per poll that sent
    /// anything (one or two frames while the server streams) cost more than the frames.
    pub fn kick(&mut self) {
        self.note_restarts();
        if self.sent && self.tx.in_flight().map_or(true, |n| n >= KICK_BATCH) {
            self.ring();
        }
    }

    /// Before the server goes idle: rings the doorbell if frames sent since the last one
    /// are still on the TX ring. None are if the driver took them all meanwhile (its
    /// consumer index moved past them: it passes them on in the round that took them), so
    /// no doorbell is needed then; a stale index only makes us ring when not needed.
    pub fn flush(&mut self) {
        if self.sent && self.tx.in_flight().map_or(true, |n| n > 0) {
            self.ring();
        }
        self.sent = false;
    }

    fn ring(&mut self) {
        self.sent = false;
        self.kicks += 1;
        let _ = hypercall::signal(self.signal, 1);
    }

    /// Whether a ring was found corrupt: the channel is dead.
    pub fn is_corrupt(&self) -> bool {
        self.tx.is_corrupt() || self.rx.is_corrupt()
    }
}

pub struct Rx<'a>(&'a [u8]);

pub struct Tx<'a> {
    tx: &'a mut FrameSender<'static, Region>,
    buf: &'a mut [u8; MAX_FRAME_LEN],
    sent: &'a mut bool,
    counters: &'a mut Counters,
}

impl phy::RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let len = len.min(MAX_FRAME_LEN);
        // Holds the last frame's bytes until smoltcp writes this one over (all `len` of
        // them: it builds whole frames); our own data either way.
        let frame = &mut self.buf[..len];
        let r = f(frame);
        match self.tx.send(frame) {
            Ok(()) => {
                self.counters.sent += 1;
                *self.sent = true;
            }
            Err(_) => self.counters.send_failed += 1,
        }
        r
    }
}

impl Device for ChannelDevice {
    type RxToken<'a> = Rx<'a>;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, now: Instant) -> Option<(Rx<'_>, Tx<'_>)> {
        loop {
            let r = self.rx.recv(&mut self.rx_buf);
            self.note_restarts();
            match r {
                Ok(Some(len)) => {
                    self.frame_arrived(now);
                    self.counters.received += 1;
                    let tx = Tx {
                        tx: &mut self.tx,
                        buf: &mut self.tx_buf,
                        sent: &mut self.sent,
                        counters: &mut self.counters,
                    };
                    return Some((Rx(&self.rx_buf[..len]), tx));
                }
                Ok(None) => return None,
                // That entry is dropped (bad slot or length); the next may be fine.
                Err(why) if why != NetDropReason::BadRing => self.counters.receive_dropped.record(why),
                Err(why) => {
                    self.counters.receive_dropped.record(why);
                    return None;
                }
            }
        }
    }

    fn transmit(&mut self, _now: Instant) -> Option<Tx<'_>> {
        if !matches!(self.tx.free(), Ok(n) if n > 0) {
            return None;
        }
        Some(Tx { tx: &mut self.tx, buf: &mut self.tx_buf, sent: &mut self.sent, counters: &mut self.counters })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = ipc_spec::net::max_frame_len(self.header.mtu);
        // No `max_burst_size`: smoltcp caps every TCP window it advertises at that many
        // segments (16 gave 23 KiB, a third of the sockets' 64 KiB receive buffers, and a
        // host's upload stalled on our acknowledgements). The channel's RX ring has more
        // entries (64 in the default stacks) than a 64 KiB window has frames.
        caps
    }
}

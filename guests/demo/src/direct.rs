//! The guest's own network device: a virtio-net PCI function dom0 assigned to this guest
//! (`dev=<slot> irq=<slot>`), driven directly with virtio-drivers through the shared
//! `virtio-pci` crate, with no net driver VM and no IPC hop in between — the baseline that
//! `cargo xtask bench net` compares the net channel with. Shown to smoltcp as an Ethernet
//! device, like [`crate::net::ChannelDevice`].
//!
//! Receive buffers stay posted to the device; a received frame is copied out and its buffer
//! posted again at once. Transmit buffers are handed to the device without waiting; their
//! completions are reaped before every transmit. A full transmit queue makes
//! [`Device::transmit`] return `None` (smoltcp tries again later), never wait. The receive
//! queue's interrupt is routed to the `irq=` notification, the one the server waits on.

use core::fmt;

use domain_rt::hypercall;
use ipc_spec::net::MacAddr;
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_pci::net::{RxQueue, SendError, TxQueue};
use virtio_pci::{DriverHal, Transport};

use crate::net::NetDevice;

/// Descriptors per virtqueue.
const QUEUE_SIZE: usize = 16;
/// Receive buffers kept posted to the device (one descriptor each).
const RX_BUFFERS: usize = QUEUE_SIZE;
/// Transmit buffers: frames handed to the device and not yet completed.
const TX_BUFFERS: usize = QUEUE_SIZE;
/// The largest Ethernet frame (no FCS) for an MTU of 1500.
const MAX_FRAME: usize = 1514;
/// The receive virtqueue's index.
const RECEIVE_QUEUE: u16 = 0;
const TRANSMIT_QUEUE: u16 = 1;

type Net = VirtIONetRaw<DriverHal, Transport, QUEUE_SIZE>;

/// Why the device could not be opened.
pub enum OpenError {
    /// DeviceInfo refused, or the function is not a virtio PCI device we can drive.
    Pci(virtio_pci::OpenError),
    /// The virtio-net driver would not start.
    Virtio(virtio_drivers::Error),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pci(e) => write!(f, "{e}"),
            Self::Virtio(e) => write!(f, "virtio-net: {e}"),
        }
    }
}

/// What the device has done.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub received: u64,
    pub sent: u64,
    /// Frames smoltcp handed us that the device could not take (dropped).
    pub send_failed: u64,
}

/// A virtio-net function owned by this guest, as a smoltcp device.
pub struct DirectDevice {
    net: Net,
    /// Kicks the queues after each poll ([`virtio_pci::Kicker`]).
    kicker: virtio_pci::QueueKicker,
    rx: Rx,
    tx: Tx,
    /// The frame [`Device::receive`] took from the device, copied out.
    frame: [u8; MAX_FRAME],
    mac: [u8; 6],
    /// The PCI function, as `00:02.0`.
    pub function: Bdf,
    /// The remapping handle of the receive interrupt, if it could be routed.
    pub irq_handle: Option<u64>,
    pub counters: Counters,
    /// A device error was seen: the device is not used again.
    dead: bool,
}

/// A PCI bus/device/function, printed as `00:02.0`.
#[derive(Clone, Copy)]
pub struct Bdf(u8, u8, u8);

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.0, self.1, self.2)
    }
}

impl DirectDevice {
    /// Opens the device in capability `dev`, starts virtio-net on it, posts the receive
    /// buffers, and routes the receive queue's interrupt to notification `irq` (if given; on
    /// failure `irq_handle` stays `None` and frames are found by polling).
    pub fn open(dev: u64, irq: Option<u64>) -> Result<Self, OpenError> {
        let device = virtio_pci::device(dev).map_err(OpenError::Pci)?;
        let transport = virtio_pci::open(&device).map_err(OpenError::Pci)?;
        let kicker = transport.kicker();
        let mut net = Net::new(transport).map_err(OpenError::Virtio)?;
        let irq_handle = irq.and_then(|irq| {
            match virtio_pci::irq::route_queues(&device.config, irq, &[RECEIVE_QUEUE]) {
                Ok(handle) => {
                    // Whatever was pending before the route is stale.
                    let _ = hypercall::poll(irq);
                    Some(handle)
                }
                Err(e) => {
                    domain_rt::println!("net device interrupts: {e}; polling instead");
                    None
                }
            }
        });
        let mut rx = Rx::new();
        rx.post(&mut net).map_err(OpenError::Virtio)?;
        let f = device.config.function;
        Ok(Self {
            mac: net.mac_address(),
            net,
            kicker,
            rx,
            tx: Tx::new(),
            frame: [0; MAX_FRAME],
            function: Bdf(f.bus, f.device, f.function),
            irq_handle,
            counters: Counters::default(),
            dead: false,
        })
    }
}

/// The receive buffers kept posted to the device.
type Rx = RxQueue<RX_BUFFERS>;
/// The transmit buffers.
type Tx = TxQueue<TX_BUFFERS>;

pub struct RxToken<'a>(&'a [u8]);

pub struct TxToken<'a> {
    net: &'a mut Net,
    tx: &'a mut Tx,
    counters: &'a mut Counters,
    dead: &'a mut bool,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let len = len.min(MAX_FRAME);
        if self.tx.reap(self.net).is_err() {
            *self.dead = true;
        }
        let slot = if *self.dead {
            None
        } else {
            match self.tx.slot(self.net, len) {
                Ok(slot) => Some(slot),
                Err(e) => {
                    // The device failing to fill the header is fatal; no free buffer is not.
                    *self.dead |= matches!(e, SendError::Device(_));
                    None
                }
            }
        };
        let Some(mut slot) = slot else {
            // No buffer free (or the device failed): the frame is built and dropped; TCP
            // sends it again.
            let mut scratch = [0u8; MAX_FRAME];
            self.counters.send_failed += 1;
            return f(&mut scratch[..len]);
        };
        let r = f(slot.frame());
        match slot.submit(self.net) {
            Ok(()) => self.counters.sent += 1,
            Err(_) => self.counters.send_failed += 1,
        }
        r
    }
}

impl Device for DirectDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        if self.dead {
            return None;
        }
        let frame = &mut self.frame;
        let received = self.rx.next(&mut self.net, |f| {
            let n = f.len().min(frame.len());
            frame[..n].copy_from_slice(&f[..n]);
            n
        });
        match received? {
            Ok(len) => {
                self.counters.received += 1;
                let tx = TxToken {
                    net: &mut self.net,
                    tx: &mut self.tx,
                    counters: &mut self.counters,
                    dead: &mut self.dead,
                };
                Some((RxToken(&self.frame[..len]), tx))
            }
            Err(e) => {
                domain_rt::println!("net device: receiving: {e}");
                self.dead = true;
                None
            }
        }
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.dead {
            return None;
        }
        if let Err(e) = self.tx.reap(&mut self.net) {
            domain_rt::println!("net device: completing a transmit: {}", virtio_drivers::Error::from(e));
            self.dead = true;
            return None;
        }
        if self.tx.is_full() {
            return None;
        }
        Some(TxToken { net: &mut self.net, tx: &mut self.tx, counters: &mut self.counters, dead: &mut self.dead })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        // No `max_burst_size` (smoltcp would cap the TCP window at that many segments): the
        // same 64 KiB window as behind the net driver VM, so `bench net` compares the paths,
        // not their windows. Frames beyond the receive buffers posted wait in the device.
        caps
    }
}

impl NetDevice for DirectDevice {
    fn mac(&self) -> MacAddr {
        MacAddr(self.mac)
    }

    /// Frames go to the device as they are built; here the completions are collected and
    /// the queues that got buffers are kicked once more, safely ([`virtio_pci::Kicker`]).
    fn kick(&mut self) {
        if !self.dead && self.tx.reap(&mut self.net).is_err() {
            domain_rt::println!("net device: completing a transmit failed");
            self.dead = true;
        }
        if self.rx.take_posted() {
            self.kicker.kick(RECEIVE_QUEUE);
        }
        if self.tx.take_sent() {
            self.kicker.kick(TRANSMIT_QUEUE);
        }
    }

    fn dead(&self) -> Option<&'static str> {
        self.dead.then_some("the NIC failed")
    }

    fn describe(&self, out: &mut alloc::string::String) {
        use core::fmt::Write as _;
        let c = &self.counters;
        let _ = write!(
            out,
            "net: virtio-net owned directly, MAC {}, {} frames received, {} sent",
            MacAddr(self.mac),
            c.received,
            c.sent
        );
        if c.send_failed > 0 {
            let _ = write!(out, ", {} send drops", c.send_failed);
        }
    }
}

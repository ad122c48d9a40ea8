//! The virtio-net device (virtio 1.1 §5.1): one receive and one transmit queue, no offloads.
//!
//! Every buffer starts with the 12-byte `virtio_net_hdr` (with `VIRTIO_F_VERSION_1` the
//! header always has `num_buffers`, §5.1.6). No checksum, GSO or mergeable-buffer feature is
//! offered, so the device writes an all-zero header with `num_buffers = 1` in front of each
//! received frame ("If VIRTIO_NET_F_MRG_RXBUF has not been negotiated, the device MUST set
//! num_buffers to 1", §5.1.6.3.2), and a transmitted header asking for checksum or
//! segmentation is a driver bug: the frame is dropped. Frames come from and go to a
//! [`NetBackend`] (the net channel to the net driver VM). The MAC and MTU in the configuration
//! are the back end's; link status follows it (looked at on every pass), with a configuration
//! interrupt on a change (`VIRTIO_NET_F_STATUS`, §5.1.4: Linux's `virtnet_config_changed_work`
//! then turns the carrier off or on).
//!
//! Linux's `virtio_net` without `MRG_RXBUF` posts "small" receive buffers of
//! `hdr_len + GOOD_PACKET_LEN` (12 + 1518) bytes; a frame that does not fit the buffer the
//! guest posted is dropped and the buffer returned with length 0.

use alloc::vec;
use alloc::vec::Vec;

use super::queue::Queue;
use super::{device_type, DeviceError, Signals, VirtioDevice, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1};
use crate::memory::GuestMemory;

/// `VIRTIO_NET_F_MTU`: `mtu` is valid.
pub const F_MTU: u64 = 1 << 3;
/// `VIRTIO_NET_F_MAC`: `mac` is valid.
pub const F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_STATUS`: `status` is valid.
pub const F_STATUS: u64 = 1 << 16;
/// `VIRTIO_NET_S_LINK_UP`.
pub const S_LINK_UP: u16 = 1;
/// Size of `virtio_net_hdr` with `num_buffers`.
pub const HEADER_SIZE: usize = 12;
/// Largest frame carried: a 1500-byte MTU, the Ethernet header and a VLAN tag.
pub const MAX_FRAME: usize = 1518;
/// Shortest frame: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Receive queue index.
pub const RX_QUEUE: usize = 0;
/// Transmit queue index.
pub const TX_QUEUE: usize = 1;
/// Frames moved per direction in one [`VirtioDevice::process`] pass, so one busy direction
/// cannot starve the other or the vCPU.
pub const BUDGET: usize = 64;

/// Why a frame was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendError {
    /// No room now: the device keeps the frame and retries on its next pass.
    Busy,
    /// Refused for good (too long, link down): dropped.
    Dropped,
}

/// Where frames go and come from.
pub trait NetBackend {
    /// The guest's MAC address.
    fn mac(&self) -> [u8; 6];
    /// The IP MTU (68..=1500).
    fn mtu(&self) -> u16;
    /// Whether the link is up.
    fn link_up(&self) -> bool;
    /// Sends one Ethernet frame (no FCS).
    fn send(&mut self, frame: &[u8]) -> Result<(), SendError>;
    /// Receives the next frame into `buf` (at least [`MAX_FRAME`] bytes), returning its length;
    /// `None` when there is none.
    fn recv(&mut self, buf: &mut [u8]) -> Option<usize>;
    /// Called after a pass that sent frames: ring the peer's doorbell once for all.
    fn kick(&mut self) {}
    /// Called at the start of every pass, before the link is looked at: lets the back end
    /// notice that the peer changed under it (a restarted net driver VM) and catch up.
    fn poll(&mut self) {}
}

/// Counters for the VMM's log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames sent to the back end.
    pub tx_frames: u64,
    /// Transmit chains dropped (malformed, offload requested, refused by the back end).
    pub tx_dropped: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Received frames dropped (the guest's buffer too small or outside RAM).
    pub rx_dropped: u64,
}

/// The virtio-net device.
pub struct VirtioNet<N: NetBackend> {
    backend: N,
    mac: [u8; 6],
    mtu: u16,
    link_up: bool,
    /// A received frame waiting for a guest buffer.
    rx_pending: Option<usize>,
    rx_buf: Vec<u8>,
    /// A transmit chain the back end was too busy for: (head, frame length in `tx_buf`).
    tx_pending: Option<(u16, usize)>,
    tx_buf: Vec<u8>,
    stats: NetStats,
}

impl<N: NetBackend> VirtioNet<N> {
    /// A device over `backend`, reading its MAC and MTU once.
    pub fn new(backend: N) -> Self {
        let mac = backend.mac();
        let mtu = backend.mtu().clamp(68, 1500);
        let link_up = backend.link_up();
        Self {
            backend,
            mac,
            mtu,
            link_up,
            rx_pending: None,
            rx_buf: vec![0; HEADER_SIZE + MAX_FRAME],
            tx_pending: None,
            tx_buf: vec![0; HEADER_SIZE + MAX_FRAME],
            stats: NetStats::default(),
        }
    }

    /// The back end.
    pub fn backend(&self) -> &N {
        &self.backend
    }

    /// The back end, mutable.
    pub fn backend_mut(&mut self) -> &mut N {
        &mut self.backend
    }

    /// Counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// A transmit waits for room on the back end.
    pub fn tx_waiting(&self) -> bool {
        self.tx_pending.is_some()
    }

    fn config_bytes(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&(if self.link_up { S_LINK_UP } else { 0 }).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    fn receive(&mut self, q: &mut Queue, mem: &mut dyn GuestMemory) -> Result<bool, DeviceError> {
        let err = |error| DeviceError { queue: RX_QUEUE, error };
        let mut pushed = false;
        for _ in 0..BUDGET {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.backend.recv(&mut self.rx_buf[HEADER_SIZE..]) {
                    Some(len) if (MIN_FRAME..=MAX_FRAME).contains(&len) => len,
                    Some(_) => {
                        self.stats.rx_dropped += 1;
                        continue;
                    }
                    None => break,
                },
            };
            let Some(chain) = q.pop(mem).map_err(err)? else {
                self.rx_pending = Some(len);
                break;
            };
            self.rx_pending = None;
            let mut hdr = [0u8; HEADER_SIZE];
            hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
            self.rx_buf[..HEADER_SIZE].copy_from_slice(&hdr);
            let total = HEADER_SIZE + len;
            let used = if chain.writable_len() >= total as u64
                && matches!(chain.write_at(mem, 0, &self.rx_buf[..total]), Ok(n) if n == total)
            {
                self.stats.rx_frames += 1;
                total as u32
            } else {
                self.stats.rx_dropped += 1;
                0
            };
            q.push_used(mem, chain.head, used).map_err(err)?;
            pushed = true;
        }
        Ok(pushed)
    }

    fn transmit(&mut self, q: &mut Queue, mem: &mut dyn GuestMemory) -> Result<bool, DeviceError> {
        let err = |error| DeviceError { queue: TX_QUEUE, error };
        let mut pushed = false;
        for _ in 0..BUDGET {
            let (head, len) = match self.tx_pending.take() {
                Some(p) => p,
                None => {
                    let Some(chain) = q.pop(mem).map_err(err)? else { break };
                    let total = chain.readable_len();
                    let ok = (HEADER_SIZE + MIN_FRAME) as u64 <= total
                        && total <= (HEADER_SIZE + MAX_FRAME) as u64
                        && matches!(chain.read_at(mem, 0, &mut self.tx_buf), Ok(n) if n as u64 == total);
                    // flags (byte 0) and gso_type (byte 1) must be 0: nothing was negotiated.
                    if !ok || self.tx_buf[0] != 0 || self.tx_buf[1] != 0 {
                        self.stats.tx_dropped += 1;
                        q.push_used(mem, chain.head, 0).map_err(err)?;
                        pushed = true;
                        continue;
                    }
                    (chain.head, total as usize - HEADER_SIZE)
                }
            };
            match self.backend.send(&self.tx_buf[HEADER_SIZE..HEADER_SIZE + len]) {
                Ok(()) => self.stats.tx_frames += 1,
                Err(SendError::Busy) => {
                    self.tx_pending = Some((head, len));
                    break;
                }
                Err(SendError::Dropped) => self.stats.tx_dropped += 1,
            }
            q.push_used(mem, head, 0).map_err(err)?;
            pushed = true;
        }
        Ok(pushed)
    }
}

impl<N: NetBackend + 'static> VirtioDevice for VirtioNet<N> {
    fn device_type(&self) -> u16 {
        device_type::NET
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX | F_MAC | F_STATUS | F_MTU
    }

    fn num_queues(&self) -> usize {
        2
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_image(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only without VIRTIO_NET_F_CTRL_MAC_ADDR (not offered).
    }

    fn activate(&mut self, _features: u64) {}

    fn as_any_mut(&mut self) -> &mut dyn core::any::Any {
        self
    }

    fn reset(&mut self) {
        // A received frame waiting for a buffer stays for the next driver; a pending transmit
        // chain belonged to the old queue.
        self.tx_pending = None;
    }

    fn process(&mut self, queues: &mut [Queue], mem: &mut dyn GuestMemory) -> Result<Signals, DeviceError> {
        let mut signals = Signals::default();
        self.backend.poll();
        let link = self.backend.link_up();
        if link != self.link_up {
            self.link_up = link;
            signals.config = true;
        }
        let [rx, tx, ..] = queues else { return Ok(signals) };
        let sent = self.stats.tx_frames;
        let tx_pushed = tx.ready() && self.transmit(tx, mem)?;
        if self.stats.tx_frames != sent {
            self.backend.kick();
        }
        if tx_pushed && tx.needs_notification(mem).map_err(|error| DeviceError { queue: TX_QUEUE, error })? {
            signals.queues |= 1 << TX_QUEUE;
        }
        if rx.ready()
            && self.receive(rx, mem)?
            && rx.needs_notification(mem).map_err(|error| DeviceError { queue: RX_QUEUE, error })?
        {
            signals.queues |= 1 << RX_QUEUE;
        }
        Ok(signals)
    }
}

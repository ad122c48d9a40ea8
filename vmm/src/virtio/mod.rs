//! virtio 1.x devices for the Linux guest: virtio-blk and virtio-net over virtio-pci.
//!
//! # Why virtio-pci (modern) and not virtio-mmio
//!
//! - **Interrupts without exits.** With MSI-X every queue has its own vector, delivered as a
//!   message the VMM turns straight into an x2APIC request ([`pci::MsiMessage`]); Linux's
//!   `vring_interrupt` then runs without touching the device. virtio-mmio has one
//!   level-triggered pin through the I/O APIC: every interrupt costs the guest an MMIO read of
//!   `InterruptStatus` and an MMIO write of `InterruptACK` (two exits, each a round trip to this
//!   user-level VMM) plus the level-triggered EOI broadcast. The goal is 0.8 of native
//!   for 64 KiB sequential I/O, so the exits per request matter.
//! - **Discovery without ACPI devices.** Linux's `virtio_pci` finds the functions by scanning
//!   bus 0 through configuration mechanism #1 (ports `0xCF8`/`0xCFC`, [`pci_bus::PciBus`]);
//!   with `pci=noacpi` on the command line Linux scans bus 0 itself (`pci_legacy_init`) and no
//!   `PNP0A03` root bridge, `_CRS` windows or `_PRT` are needed in the DSDT. virtio-mmio needs
//!   one `LNRO0005` device per function in the DSDT (or `virtio_mmio.device=` arguments).
//! - **The same driver as the native run.** The benchmark compares against the same kernel in
//!   QEMU with virtio-pci devices, so both sides use the same guest driver code.
//!
//! The price is a PCI configuration space model (small: one host bridge at 00:00.0 and one
//! function per device, every absent function reading all-ones so the scan is cheap) and an
//! MSI-X table.
//!
//! # Layers
//!
//! - [`queue`]: the split virtqueue over [`crate::memory::GuestMemory`], every index, address
//!   and length checked, chains walked with a bound.
//! - [`blk`], [`net`]: the device types ([`VirtioDevice`]) and their back-end traits
//!   ([`blk::BlockBackend`], [`net::NetBackend`]) that the driver-VM channels implement
//!   ([`channel`]).
//! - [`pci`]: one virtio-pci function (configuration space, capabilities, BAR 0 with the common,
//!   ISR, device and notify structures and the MSI-X table, the device status state machine).
//! - [`pci_bus`]: the host bridge, configuration mechanism #1 and BAR dispatch.

pub mod blk;
pub mod channel;
pub mod net;
pub mod pci;
pub mod pci_bus;
pub mod queue;

#[cfg(test)]
mod e2e_tests;

use crate::memory::GuestMemory;

/// `VIRTIO_F_VERSION_1` (§6): the device is a modern (1.x) device. Required by this transport.
pub const F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_INDIRECT_DESC` (§2.7.5.3): descriptors may point at descriptor tables.
pub const F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX` (§2.7.10): `used_event` / `avail_event` suppression.
pub const F_EVENT_IDX: u64 = 1 << 29;

/// Device status bits (§2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready: queues may be used.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from (a corrupt queue): the driver must reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// Device type ids (§5).
pub mod device_type {
    /// Network card.
    pub const NET: u16 = 1;
    /// Block device.
    pub const BLOCK: u16 = 2;
}

/// A device found the guest's queue unusable: the transport sets `DEVICE_NEEDS_RESET` and stops
/// the device until the driver resets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceError {
    /// The queue.
    pub queue: usize,
    /// What was wrong.
    pub error: queue::QueueError,
}

impl core::fmt::Display for DeviceError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "queue {}: {}", self.queue, self.error)
    }
}

impl core::error::Error for DeviceError {}

/// What a pass over the queues asks the transport to signal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Signals {
    /// Bit `q` set: queue `q` needs a used-buffer notification.
    pub queues: u64,
    /// The device configuration changed (e.g. link status).
    pub config: bool,
}

/// A virtio device type behind a transport.
pub trait VirtioDevice {
    /// The virtio device type ([`device_type`]).
    fn device_type(&self) -> u16;
    /// All feature bits the device offers (device-specific and ring features; the transport
    /// adds nothing).
    fn features(&self) -> u64;
    /// Number of virtqueues.
    fn num_queues(&self) -> usize;
    /// Largest size of each queue.
    fn queue_max_size(&self) -> u16;
    /// Reads the device-specific configuration at `offset` (out-of-range bytes read 0).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration (both devices here ignore writes).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set `DRIVER_OK` with `features` accepted.
    fn activate(&mut self, features: u64);
    /// The driver reset the device: drop every request in flight (completions for them that
    /// arrive later are ignored) and forget negotiated state.
    fn reset(&mut self);
    /// Moves work between the queues and the back end: called on a notify and whenever the
    /// back end may have progressed. `queues` has [`VirtioDevice::num_queues`] entries.
    fn process(&mut self, queues: &mut [queue::Queue], mem: &mut dyn GuestMemory) -> Result<Signals, DeviceError>;
    /// The device as `Any`, so the VMM can reach its concrete type (and back end) behind the
    /// transport.
    fn as_any_mut(&mut self) -> &mut dyn core::any::Any;
}

/// Reads `data.len()` bytes of `image` at `offset`; bytes past the end read 0.
pub(crate) fn read_image(image: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| image.get(o))
            .copied()
            .unwrap_or(0);
    }
}

//! virtio PCI plumbing shared by the driver VMs (disk, net): the device's configuration
//! space through the microvisor's filtering hypercalls, DMA memory from the VM's own RAM,
//! a transport that negotiates VIRTIO_F_ACCESS_PLATFORM, and device interrupts (MSI-X
//! programmed with what DeviceIrq returns).
//!
//! A driver VM finds its device from the `dev=<slot>` word dom0 puts on its command line:
//! [`open`] asks the microvisor which function that is and brings up its virtio transport.
#![no_std]

extern crate alloc;

pub mod irq;
pub mod net;
mod probe;
mod transport;

use core::fmt;

use domain_rt::hypercall::call;
use ipc_spec::Hypercall;
use virtio_drivers::transport::pci::bus::{Command, DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::{PciTransport, VirtioPciError};

pub use transport::{AccessPlatform, DriverHal, HypercallConfig, Kicker, UsedNotifications};

/// A virtio PCI transport through the IOMMU, as the device drivers take it.
pub type Transport = AccessPlatform<PciTransport>;

/// Kicks the queues of a device opened with [`open`] ([`AccessPlatform::kicker`]).
pub type QueueKicker = Kicker<PciTransport>;

/// The PCI function a driver VM was given.
#[derive(Clone, Copy)]
pub struct Device {
    /// Configuration access for the function (the capability slot and its address).
    pub config: HypercallConfig,
    pub vendor: u16,
    pub device: u16,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let df = self.config.function;
        write!(
            f,
            "device {:02x}:{:02x}.{} vendor {:04x} device {:04x}",
            df.bus, df.device, df.function, self.vendor, self.device
        )
    }
}

/// Why [`open`] failed.
#[derive(Debug)]
pub enum OpenError {
    /// The microvisor would not describe the device (not ours, or no such capability).
    DeviceInfo(ipc_spec::Error),
    /// The function is not a modern virtio PCI device we can drive.
    Transport(VirtioPciError),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DeviceInfo(e) => write!(f, "DeviceInfo: {e}"),
            Self::Transport(e) => write!(f, "virtio PCI transport: {e}"),
        }
    }
}

/// Why a driver could not get at its device from its command line.
#[derive(Debug)]
pub enum StartError {
    /// No `dev=<slot>` on the command line (which is quoted).
    NoDevice(&'static str),
    /// DeviceInfo failed.
    Describe(OpenError),
    /// The transport could not be brought up.
    Open(OpenError),
}

impl StartError {
    /// The exit status a driver VM reports for it.
    pub fn status(&self) -> u64 {
        match self {
            Self::NoDevice(_) => 1,
            Self::Describe(_) => 2,
            Self::Open(_) => 3,
        }
    }
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDevice(cmdline) => write!(f, "no device capability on my command line: \"{cmdline}\""),
            Self::Describe(e) | Self::Open(e) => write!(f, "{e}"),
        }
    }
}

/// What every driver VM does first: find the device named by `dev=<slot>` on its command
/// line, print what it is, and open its virtio transport.
pub fn open_from_cmdline(info: &domain_rt::BootInfo) -> Result<(Device, Transport), StartError> {
    let slot = info.slot("dev").ok_or(StartError::NoDevice(info.cmdline))?;
    let dev = device(slot).map_err(StartError::Describe)?;
    domain_rt::println!("{dev}");
    let transport = open(&dev).map_err(StartError::Open)?;
    Ok((dev, transport))
}

/// Describe the device in capability `slot` (DeviceInfo).
pub fn device(slot: u64) -> Result<Device, OpenError> {
    let dev = call(Hypercall::DeviceInfo, slot, [0; 6]).map_err(OpenError::DeviceInfo)?;
    let rid = dev.args[0] as u16;
    let function = DeviceFunction { bus: (rid >> 8) as u8, device: ((rid >> 3) & 31) as u8, function: (rid & 7) as u8 };
    Ok(Device {
        config: HypercallConfig { slot, function },
        vendor: dev.args[1] as u16,
        device: (dev.args[1] >> 16) as u16,
    })
}

/// Bring up the device's virtio transport, wrapped to negotiate VIRTIO_F_ACCESS_PLATFORM,
/// then enable its memory space and bus mastering.
///
/// The transport sizes the BAR of each of its four regions, and switches memory decoding
/// off and on again around each sizing if it is on: eight command-register writes, each a
/// hypercall and, in an emulator, a remapping of the device's BARs. So the BARs are sized
/// with decoding off (as the microvisor leaves a device it quiesced for a restarted
/// driver) and decoding is switched on once, before anything touches them.
pub fn open(dev: &Device) -> Result<Transport, OpenError> {
    let f = dev.config.function;
    // Repeated reads and BAR sizings answered without a hypercall each (probe.rs).
    let mut root = PciRoot::new(probe::ProbeConfig::new(dev.config, f));
    if root.get_status_command(f).1.intersects(Command::MEMORY_SPACE | Command::IO_SPACE) {
        root.set_command(f, Command::empty());
    }
    let transport = PciTransport::new::<DriverHal, _>(&mut root, f).map_err(OpenError::Transport)?;
    root.set_command(f, Command::MEMORY_SPACE | Command::BUS_MASTER);
    Ok(AccessPlatform::new(transport))
}

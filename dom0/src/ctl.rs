//! The host control interface (`cargo xtask ctl`, protocol in `ipc_spec::ctl`): a virtio
//! console dom0 drives itself by passthrough, like a driver VM drives its device (the
//! `virtio-pci` plumbing: configuration space through the filtering hypercalls, DMA from
//! dom0's own heap through the IOMMU, its receive queue's interrupt through interrupt
//! remapping to dom0's wake notification). QEMU connects the console to a unix socket
//! next to the bundle; being on that socket is the only authentication.

use alloc::vec::Vec;

use domain_rt::println;
use ipc_spec::ctl::{LineBuffer, Pushed};
use ipc_spec::hypercall::dom0_slots;
use ipc_spec::manifest::{self, Manifest};
use ipc_spec::Hypercall;
use virtio_drivers::device::console::VirtIOConsole;
use virtio_pci::{DriverHal, Transport};

use crate::builder;

/// A request line, or a line that was too long.
pub type Request = Result<Vec<u8>, ()>;

pub struct Control {
    console: VirtIOConsole<DriverHal, Transport>,
    line: LineBuffer,
    /// Its receive interrupt wakes dom0 (else the tick polls it).
    pub interrupts: bool,
}

impl Control {
    /// Take the manifest's control device (if it names one) and bring it up; its receive
    /// interrupt goes to `wake` (bit 0). A missing or broken device is reported and the
    /// stack runs without a control interface.
    pub fn open(m: &Manifest, wake: u64) -> Option<Self> {
        if m.control.is_empty() {
            return None;
        }
        match Self::try_open(m, wake) {
            Ok(c) => Some(c),
            Err(e) => {
                println!("control: {e}; no host control interface");
                None
            }
        }
    }

    fn try_open(m: &Manifest, wake: u64) -> Result<Self, alloc::string::String> {
        let (vendor, device) =
            manifest::device_kind(&m.control).ok_or_else(|| alloc::format!("unknown device {}", m.control))?;
        let (slot, ..) = builder::devices()
            .into_iter()
            .find(|&(_, v, d, taken)| v == vendor && d == device && !taken)
            .ok_or_else(|| alloc::format!("no free {} device on this machine", m.control))?;
        builder::hc(Hypercall::DeviceAssign, slot, [dom0_slots::SELF_DOMAIN, 0, 0, 0, 0, 0])?;
        let dev = virtio_pci::device(slot).map_err(|e| alloc::format!("{e}"))?;
        let transport = virtio_pci::open(&dev).map_err(|e| alloc::format!("{e}"))?;
        let console =
            VirtIOConsole::<DriverHal, _>::new(transport).map_err(|e| alloc::format!("virtio-console: {e}"))?;
        let interrupts = match virtio_pci::irq::route_queue0(&dev.config, wake) {
            Ok(_) => true,
            Err(e) => {
                println!("control: {e}; polling it on the tick");
                false
            }
        };
        println!(
            "control: {} ({dev}) is the host control interface{}",
            m.control,
            if interrupts { "" } else { " (polled)" }
        );
        Ok(Self { console, line: LineBuffer::default(), interrupts })
    }

    /// The next complete request line, if one arrived.
    pub fn next_request(&mut self) -> Option<Request> {
        loop {
            let byte = match self.console.recv(true) {
                Ok(Some(b)) => b,
                Ok(None) => return None,
                Err(e) => {
                    println!("control: receiving: {e}");
                    return None;
                }
            };
            match self.line.push(byte) {
                Pushed::More => {}
                Pushed::Line(l) => return Some(Ok(l.to_vec())),
                Pushed::TooLong => return Some(Err(())),
            }
        }
    }

    /// Send one answer line.
    pub fn send_line(&mut self, line: &str) {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        // The device reads the buffer by DMA (dom0's heap, mapped by the IOMMU) before
        // send_bytes returns. A console port drops output nobody reads, so this never
        // waits for the host.
        if let Err(e) = self.console.send_bytes(&bytes) {
            println!("control: sending: {e}");
        }
    }
}

//! Device interrupts for a driver VM: the microvisor allocates a vector and an
//! interrupt-remapping entry that accepts it only from our device, routed to one of our
//! notifications (DeviceIrq); we program the device's MSI-X entry with the remappable
//! address and data it returns, and point the virtqueues at that entry.

use domain_rt::hypercall::call;
use ipc_spec::Hypercall;

use crate::transport::HypercallConfig;

const CAP_MSIX: u8 = 0x11;
const CAP_VENDOR: u8 = 0x09;
/// virtio_pci_common_cfg: queue_select and queue_msix_vector.
const COMMON_QUEUE_SELECT: u64 = 0x16;
const COMMON_QUEUE_MSIX_VECTOR: u64 = 0x1a;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;

fn read(cfg: &HypercallConfig, offset: u64, size: u64) -> u32 {
    call(Hypercall::PciConfigRead, cfg.slot, [offset, size, 0, 0, 0, 0]).map_or(u32::MAX, |r| r.args[0] as u32)
}

fn write(cfg: &HypercallConfig, offset: u64, size: u64, value: u32) {
    let _ = call(Hypercall::PciConfigWrite, cfg.slot, [offset, size, value as u64, 0, 0, 0]);
}

/// The capabilities of our function: (id, offset).
fn capabilities(cfg: &HypercallConfig) -> impl Iterator<Item = (u8, u64)> + '_ {
    let mut next = read(cfg, 0x34, 1) as u64 & 0xfc;
    let mut left = 48;
    core::iter::from_fn(move || {
        if next < 0x40 || left == 0 {
            return None;
        }
        left -= 1;
        let at = next;
        let header = read(cfg, at, 2);
        next = ((header >> 8) & 0xfc) as u64;
        Some((header as u8, at))
    })
}

/// The memory address of BAR `index` as config space shows it.
fn bar(cfg: &HypercallConfig, index: u64) -> u64 {
    let low = read(cfg, 0x10 + 4 * index, 4) as u64;
    let high = if low & 0b110 == 0b100 { read(cfg, 0x14 + 4 * index, 4) as u64 } else { 0 };
    (high << 32) | (low & !0xf)
}

/// Volatile MMIO store inside one of our BARs (mapped at its physical address).
fn mmio_write<T>(address: u64, value: T) {
    // SAFETY: the address lies in a BAR of the device the microvisor gave this VM, mapped
    // uncached at that address in our stage-2 and inside our identity map.
    unsafe { core::ptr::write_volatile(address as *mut T, value) }
}

fn mmio_read<T>(address: u64) -> T {
    // SAFETY: as in mmio_write.
    unsafe { core::ptr::read_volatile(address as *const T) }
}

/// Route queue 0's interrupts to notification `notification`. Returns the remapping handle.
pub fn route_queue0(cfg: &HypercallConfig, notification: u64) -> Result<u64, &'static str> {
    route_queues(cfg, notification, &[0])
}

/// Route the interrupts of every queue in `queues` to notification `notification`: one
/// remapping entry and MSI-X table entry 0, shared by the queues. Returns the remapping handle.
pub fn route_queues(cfg: &HypercallConfig, notification: u64, queues: &[u16]) -> Result<u64, &'static str> {
    let r = call(Hypercall::DeviceIrq, cfg.slot, [notification, 0, 0, 0, 0, 0]).map_err(|_| "DeviceIrq refused")?;
    let (address, data, handle) = (r.args[0], r.args[1], r.args[2]);
    let msix = capabilities(cfg).find(|(id, _)| *id == CAP_MSIX).map(|(_, at)| at).ok_or("no MSI-X capability")?;
    let control = read(cfg, msix + 2, 2);
    let table = read(cfg, msix + 4, 4) as u64;
    let entry0 = bar(cfg, table & 7) + (table & !7);
    mmio_write::<u32>(entry0, address as u32);
    mmio_write::<u32>(entry0 + 4, (address >> 32) as u32);
    mmio_write::<u32>(entry0 + 8, data as u32);
    mmio_write::<u32>(entry0 + 12, 0); // unmasked
    write(cfg, msix + 2, 2, control | 0x8000); // MSI-X enable

    // The virtio common configuration: a vendor capability of type 1.
    let common = capabilities(cfg)
        .filter(|(id, _)| *id == CAP_VENDOR)
        .find(|(_, at)| read(cfg, at + 3, 1) as u8 == VIRTIO_PCI_CAP_COMMON_CFG)
        .map(|(_, at)| bar(cfg, read(cfg, at + 4, 1) as u64) + read(cfg, at + 8, 4) as u64)
        .ok_or("no virtio common configuration")?;
    for &queue in queues {
        mmio_write::<u16>(common + COMMON_QUEUE_SELECT, queue);
        mmio_write::<u16>(common + COMMON_QUEUE_MSIX_VECTOR, 0);
        if mmio_read::<u16>(common + COMMON_QUEUE_MSIX_VECTOR) != 0 {
            return Err("the device refused MSI-X vector 0 for a queue");
        }
    }
    Ok(handle)
}

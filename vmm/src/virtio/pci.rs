//! One virtio-pci function (virtio 1.1 §4.1, "modern" only) with MSI-X.
//!
//! Configuration space (PCI Local Bus 3.0 §6.1, type 0 header): vendor `0x1af4`, device
//! `0x1040 + virtio type` (§4.1.2.1: `0x1041` net, `0x1042` block), revision 1, one 64-bit
//! memory BAR (BAR 0/1, [`BAR0_SIZE`] bytes), no interrupt pin (MSI-X only), and a capability
//! list: the four virtio structures (§4.1.4, vendor-specific capabilities, all in BAR 0) and
//! MSI-X (PCI 3.0 §6.8.2).
//!
//! BAR 0 layout:
//!
//! | offset   | what                                                      |
//! |----------|-----------------------------------------------------------|
//! | `0x0000` | common configuration (`virtio_pci_common_cfg`, 0x38 bytes) |
//! | `0x1000` | ISR status (read clears)                                  |
//! | `0x2000` | device-specific configuration                             |
//! | `0x3000` | notifications: queue `q` at `0x3000 + 4 * q`              |
//! | `0x4000` | MSI-X table (16 bytes per vector)                         |
//! | `0x5000` | MSI-X pending bits                                        |
//!
//! Device status (§2.1, §3.1): writing 0 resets; the driver may only add bits; `FEATURES_OK`
//! sticks only if the driver's features are a subset of the offered ones and include
//! `VERSION_1` (§2.2.2: "the device ... MUST NOT accept the feature bits" otherwise, by
//! leaving FEATURES_OK clear); `DRIVER_OK` without `FEATURES_OK`, a bad queue configuration at
//! `queue_enable`, or a device error ([`super::DeviceError`]) sets `DEVICE_NEEDS_RESET` and
//! raises a configuration interrupt, and the device then does nothing until reset. Queue
//! registers are read-only once the queue is enabled, features once `FEATURES_OK` is set. The
//! device touches guest memory only while the driver has set Bus Master Enable and
//! `DRIVER_OK`.
//!
//! Interrupts: with MSI-X enabled, a queue or configuration interrupt becomes an
//! [`MsiMessage`] (address/data from the table entry of the vector the driver chose, §4.1.4.3:
//! `NO_VECTOR` means none); a masked vector sets its pending bit and fires when unmasked.
//! Without MSI-X only the ISR bits are kept (the function has no INTx pin: Linux's
//! `virtio_pci` uses MSI-X whenever the function has it).

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;

use super::queue::Queue;
use super::{status, DeviceError, VirtioDevice, F_VERSION_1};
use crate::memory::GuestMemory;

/// virtio's PCI vendor id.
pub const VENDOR_ID: u16 = 0x1af4;
/// Modern device ids are this plus the virtio device type.
pub const DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem device id (§4.1.2.1 suggests at least 0x40 for modern devices).
pub const SUBSYSTEM_ID: u16 = 0x1100;
/// Size of BAR 0 (a power of two, as BAR sizing requires).
pub const BAR0_SIZE: u64 = 0x8000;
/// BAR 0 offset of the common configuration.
pub const COMMON_OFFSET: u64 = 0x0000;
/// BAR 0 offset of the ISR status byte.
pub const ISR_OFFSET: u64 = 0x1000;
/// BAR 0 offset of the device configuration.
pub const DEVICE_OFFSET: u64 = 0x2000;
/// BAR 0 offset of the notification area.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// BAR 0 offset of the MSI-X table.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// BAR 0 offset of the MSI-X pending-bit array.
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Length of each virtio structure region in BAR 0.
pub const REGION_LEN: u64 = 0x1000;
/// `VIRTIO_MSI_NO_VECTOR`.
pub const NO_VECTOR: u16 = 0xffff;
/// Size of `virtio_pci_common_cfg`.
pub const COMMON_CFG_LEN: u64 = 0x38;

/// Configuration space offsets of the capabilities.
const CAP_COMMON: usize = 0x40;
const CAP_NOTIFY: usize = 0x50;
const CAP_ISR: usize = 0x64;
const CAP_DEVICE: usize = 0x74;
const CAP_MSIX: usize = 0x84;

/// PCI command register bits.
const CMD_MEM: u16 = 1 << 1;
const CMD_BUS_MASTER: u16 = 1 << 2;
const CMD_INTX_DISABLE: u16 = 1 << 10;
const CMD_WRITABLE: u16 = CMD_MEM | CMD_BUS_MASTER | CMD_INTX_DISABLE;

/// MSI-X message control bits.
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// MSI-X vector control: masked.
const MSIX_ENTRY_MASKED: u32 = 1;

/// An MSI write the function performs: the VMM delivers it to the local APIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (`0xfee0_0000 | destination << 12 | ...`).
    pub address: u64,
    /// Message data (vector in bits 7:0, delivery mode in 10:8, trigger mode in bit 15).
    pub data: u32,
}

impl MsiMessage {
    /// The vector to inject, if this is an ordinary interrupt: the address in the local APIC's
    /// `0xfeex_xxxx` window (Intel SDM Vol. 3 §11.11.1), fixed or lowest-priority delivery,
    /// edge-triggered, and a vector of at least 16 (0-15 are reserved, §11.5.2). Anything else
    /// (NMI, SMI, INIT, a write elsewhere) is not injected.
    pub fn fixed_vector(&self) -> Option<u8> {
        let in_window = self.address >> 20 == 0xfee;
        let mode = (self.data >> 8) & 7;
        let vector = (self.data & 0xff) as u8;
        let edge = self.data & (1 << 15) == 0;
        (in_window && mode <= 1 && edge && vector >= 16).then_some(vector)
    }

    /// The destination APIC id (address bits 19:12).
    pub fn destination(&self) -> u32 {
        ((self.address >> 12) & 0xff) as u32
    }
}

/// Why the function set `DEVICE_NEEDS_RESET`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetCause {
    /// A queue's configuration at `queue_enable`, or its contents while running, were unusable.
    Queue(DeviceError),
    /// The driver set `DRIVER_OK` without `FEATURES_OK`.
    DriverOkWithoutFeatures,
}

/// The queue-facing state of one function.
pub struct VirtioPci {
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    queue_vectors: Vec<u16>,
    command: u16,
    bar0: u64,
    interrupt_line: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    msix_config: u16,
    queue_select: u16,
    isr: u8,
    msix_control: u16,
    msix_table: Vec<[u32; 4]>,
    msix_pending: u64,
    out: VecDeque<MsiMessage>,
    last_error: Option<ResetCause>,
}

/// Merges a write of `data` at `offset` into the `size`-byte field at `field`, whose current
/// value is `current`; `None` if the write does not touch the field.
fn merge(field: u64, size: u64, current: u64, offset: u64, data: &[u8]) -> Option<u64> {
    let end = offset.checked_add(data.len() as u64)?;
    if end <= field || offset >= field + size {
        return None;
    }
    let mut bytes = current.to_le_bytes();
    for (i, &b) in data.iter().enumerate() {
        let at = offset + i as u64;
        if at >= field && at < field + size {
            bytes[(at - field) as usize] = b;
        }
    }
    Some(u64::from_le_bytes(bytes))
}

impl VirtioPci {
    /// A function at reset for `device`, with one MSI-X vector per queue plus one for
    /// configuration changes.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let n = device.num_queues().min(63);
        let max = device.queue_max_size();
        Self {
            queues: (0..n).map(|_| Queue::new(max)).collect(),
            queue_vectors: alloc::vec![NO_VECTOR; n],
            device,
            command: 0,
            bar0: 0,
            interrupt_line: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            msix_config: NO_VECTOR,
            queue_select: 0,
            isr: 0,
            msix_control: 0,
            msix_table: alloc::vec![[0, 0, 0, MSIX_ENTRY_MASKED]; n + 1],
            msix_pending: 0,
            out: VecDeque::new(),
            last_error: None,
        }
    }

    /// The device model.
    pub fn device(&self) -> &dyn VirtioDevice {
        &*self.device
    }

    /// The device model, mutable (downcast with [`VirtioDevice::as_any_mut`] to reach its
    /// back end).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        &mut *self.device
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The features the driver accepted (meaningful once `FEATURES_OK` is set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The error that set `DEVICE_NEEDS_RESET`, if any.
    pub fn last_error(&self) -> Option<ResetCause> {
        self.last_error
    }

    /// The ISR status bits (without clearing them).
    pub fn isr(&self) -> u8 {
        self.isr
    }

    /// Where BAR 0 is, if memory decoding is on and the BAR has been placed.
    pub fn bar0(&self) -> Option<u64> {
        (self.command & CMD_MEM != 0 && self.bar0 != 0).then_some(self.bar0)
    }

    /// Places BAR 0 (the VMM does this as firmware would before boot; the guest may move it).
    pub fn set_bar0(&mut self, addr: u64) {
        self.bar0 = addr & !(BAR0_SIZE - 1);
    }

    /// Number of MSI-X vectors.
    pub fn msix_vectors(&self) -> usize {
        self.msix_table.len()
    }

    /// The transport's state for a stall report: per queue the guest's avail index, what the
    /// device has taken (next avail) and its used index, then the ISR, the MSI-X enable and
    /// function mask, each queue's vector and whether its table entry is masked, the
    /// pending-bit array and MSI writes not yet delivered.
    pub fn stall_state(&self, mem: &dyn GuestMemory) -> String {
        let mut s = alloc::format!("status={:#x}", self.status);
        for (i, q) in self.queues.iter().enumerate() {
            let avail = q.pending(mem).map(|p| alloc::format!("{}", q.next_avail().wrapping_add(p)));
            let avail = avail.unwrap_or_else(|e| alloc::format!("{e:?}"));
            let vector = self.queue_vectors.get(i).copied().unwrap_or(NO_VECTOR);
            let masked = self.msix_table.get(usize::from(vector)).map(|e| e[3] & MSIX_ENTRY_MASKED != 0);
            s += &alloc::format!(
                " q{i}: avail={avail} taken={} used={} vector={vector} masked={masked:?};",
                q.next_avail(),
                q.next_used()
            );
        }
        s += &alloc::format!(
            " isr={:#x} msix_enabled={} function_mask={} msix_pending={:#x} msi_out={}",
            self.isr,
            self.msix_control & MSIX_ENABLE != 0,
            self.msix_control & MSIX_FUNCTION_MASK != 0,
            self.msix_pending,
            self.out.len()
        );
        s
    }

    /// Chains the guest made available on queue `q` that the device has not taken (0 for a
    /// queue not ready or broken).
    pub fn untaken(&self, q: usize, mem: &dyn GuestMemory) -> u16 {
        self.queues.get(q).and_then(|q| q.pending(mem).ok()).unwrap_or(0)
    }

    /// MSI writes waiting for delivery.
    pub fn take_messages(&mut self) -> impl Iterator<Item = MsiMessage> + '_ {
        self.out.drain(..)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_vectors.fill(NO_VECTOR);
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.msix_config = NO_VECTOR;
        self.queue_select = 0;
        self.isr = 0;
        self.last_error = None;
        self.device.reset();
    }

    // ---- configuration space ----

    fn config_image(&self) -> [u8; 256] {
        let mut c = [0u8; 256];
        let put16 = |c: &mut [u8; 256], at: usize, v: u16| c[at..at + 2].copy_from_slice(&v.to_le_bytes());
        let put32 = |c: &mut [u8; 256], at: usize, v: u32| c[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let ty = self.device.device_type();
        put16(&mut c, 0x00, VENDOR_ID);
        put16(&mut c, 0x02, DEVICE_ID_BASE.wrapping_add(ty));
        put16(&mut c, 0x04, self.command);
        put16(&mut c, 0x06, 1 << 4); // status: capability list
        c[0x08] = 1; // revision
        let class: u32 = if ty == super::device_type::NET { 0x02_0000 } else { 0x01_8000 };
        c[0x09] = class as u8;
        c[0x0a] = (class >> 8) as u8;
        c[0x0b] = (class >> 16) as u8;
        // BAR 0: 64-bit memory (type 10b in bits 2:1), not prefetchable.
        put32(&mut c, 0x10, (self.bar0 as u32 & !(BAR0_SIZE as u32 - 1)) | 0x4);
        put32(&mut c, 0x14, (self.bar0 >> 32) as u32);
        put16(&mut c, 0x2c, VENDOR_ID);
        put16(&mut c, 0x2e, SUBSYSTEM_ID);
        c[0x34] = CAP_COMMON as u8;
        c[0x3c] = self.interrupt_line;
        // virtio_pci_cap: vndr, next, len, cfg_type, bar, id, pad[2], offset, length.
        let caps = [
            (CAP_COMMON, CAP_NOTIFY, 16u8, 1u8, COMMON_OFFSET),
            (CAP_NOTIFY, CAP_ISR, 20, 2, NOTIFY_OFFSET),
            (CAP_ISR, CAP_DEVICE, 16, 3, ISR_OFFSET),
            (CAP_DEVICE, CAP_MSIX, 16, 4, DEVICE_OFFSET),
        ];
        for (at, next, len, ty, off) in caps {
            c[at] = 0x09;
            c[at + 1] = next as u8;
            c[at + 2] = len;
            c[at + 3] = ty;
            put32(&mut c, at + 8, off as u32);
            put32(&mut c, at + 12, REGION_LEN as u32);
        }
        put32(&mut c, CAP_NOTIFY + 16, NOTIFY_MULTIPLIER);
        c[CAP_MSIX] = 0x11;
        put16(&mut c, CAP_MSIX + 2, self.msix_control | (self.msix_table.len() as u16 - 1));
        put32(&mut c, CAP_MSIX + 4, MSIX_TABLE_OFFSET as u32);
        put32(&mut c, CAP_MSIX + 8, MSIX_PBA_OFFSET as u32);
        c
    }

    /// Reads configuration space at `offset` (within one dword).
    pub fn config_read(&self, offset: u8, data: &mut [u8]) {
        super::read_image(&self.config_image(), u64::from(offset), data);
    }

    /// Writes configuration space at `offset` (within one dword); read-only bits are ignored.
    pub fn config_write(&mut self, offset: u8, data: &[u8]) {
        let off = u64::from(offset);
        if let Some(v) = merge(0x04, 2, u64::from(self.command), off, data) {
            self.command = v as u16 & CMD_WRITABLE;
        }
        if let Some(v) = merge(0x10, 4, self.bar0 & 0xffff_ffff, off, data) {
            self.bar0 = (self.bar0 & !0xffff_ffff) | (v & !(BAR0_SIZE - 1) & 0xffff_fff0);
        }
        if let Some(v) = merge(0x14, 4, self.bar0 >> 32, off, data) {
            self.bar0 = (self.bar0 & 0xffff_ffff) | (v << 32);
        }
        if let Some(v) = merge(0x3c, 1, u64::from(self.interrupt_line), off, data) {
            self.interrupt_line = v as u8;
        }
        if let Some(v) = merge(CAP_MSIX as u64 + 2, 2, u64::from(self.msix_control), off, data) {
            self.msix_control = v as u16 & (MSIX_ENABLE | MSIX_FUNCTION_MASK);
            self.deliver_pending();
        }
    }

    // ---- BAR 0 ----

    /// Reads BAR 0 at `offset`.
    pub fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let end = offset.saturating_add(data.len() as u64);
        match offset {
            o if end <= COMMON_OFFSET + REGION_LEN => super::read_image(&self.common_image(), o, data),
            // §4.1.4.5: reading the ISR clears it.
            o if o == ISR_OFFSET => {
                if let Some(b) = data.first_mut() {
                    *b = core::mem::take(&mut self.isr);
                }
            }
            o if o >= DEVICE_OFFSET && end <= DEVICE_OFFSET + REGION_LEN => {
                self.device.read_config(o - DEVICE_OFFSET, data)
            }
            o if o >= MSIX_TABLE_OFFSET && end <= MSIX_TABLE_OFFSET + REGION_LEN => {
                let mut image = Vec::with_capacity(self.msix_table.len() * 16);
                for e in &self.msix_table {
                    for w in e {
                        image.extend_from_slice(&w.to_le_bytes());
                    }
                }
                super::read_image(&image, o - MSIX_TABLE_OFFSET, data);
            }
            o if o >= MSIX_PBA_OFFSET && end <= MSIX_PBA_OFFSET + REGION_LEN => {
                super::read_image(&self.msix_pending.to_le_bytes(), o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    /// Writes BAR 0 at `offset`; a notification runs the device against `mem`.
    pub fn bar_write(&mut self, offset: u64, data: &[u8], mem: &mut dyn GuestMemory) {
        let end = offset.saturating_add(data.len() as u64);
        match offset {
            o if end <= COMMON_OFFSET + REGION_LEN => self.common_write(o, data),
            o if o >= DEVICE_OFFSET && end <= DEVICE_OFFSET + REGION_LEN => {
                self.device.write_config(o - DEVICE_OFFSET, data)
            }
            o if o >= NOTIFY_OFFSET && end <= NOTIFY_OFFSET + REGION_LEN => {
                let q = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER);
                if q < self.queues.len() as u64 {
                    self.process(mem);
                }
            }
            o if o >= MSIX_TABLE_OFFSET && end <= MSIX_TABLE_OFFSET + REGION_LEN => {
                self.msix_write(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }

    fn msix_write(&mut self, offset: u64, data: &[u8]) {
        let entry = (offset / 16) as usize;
        let Some(e) = self.msix_table.get_mut(entry) else { return };
        let base = entry as u64 * 16;
        for (w, word) in e.iter_mut().enumerate() {
            if let Some(v) = merge(base + 4 * w as u64, 4, u64::from(*word), offset, data) {
                *word = if w == 3 { v as u32 & MSIX_ENTRY_MASKED } else { v as u32 };
            }
        }
        self.deliver_pending();
    }

    fn common_image(&self) -> [u8; COMMON_CFG_LEN as usize] {
        let mut c = [0u8; COMMON_CFG_LEN as usize];
        let features = self.device.features();
        let half = |v: u64, sel: u32| match sel {
            0 => v as u32,
            1 => (v >> 32) as u32,
            _ => 0,
        };
        c[0x00..0x04].copy_from_slice(&self.device_feature_select.to_le_bytes());
        c[0x04..0x08].copy_from_slice(&half(features, self.device_feature_select).to_le_bytes());
        c[0x08..0x0c].copy_from_slice(&self.driver_feature_select.to_le_bytes());
        c[0x0c..0x10].copy_from_slice(&half(self.driver_features, self.driver_feature_select).to_le_bytes());
        c[0x10..0x12].copy_from_slice(&self.msix_config.to_le_bytes());
        c[0x12..0x14].copy_from_slice(&(self.queues.len() as u16).to_le_bytes());
        c[0x14] = self.status;
        c[0x15] = self.config_generation;
        c[0x16..0x18].copy_from_slice(&self.queue_select.to_le_bytes());
        let sel = usize::from(self.queue_select);
        if let Some(q) = self.queues.get(sel) {
            c[0x18..0x1a].copy_from_slice(&q.size.to_le_bytes());
            c[0x1a..0x1c].copy_from_slice(&self.queue_vectors[sel].to_le_bytes());
            c[0x1c..0x1e].copy_from_slice(&u16::from(q.ready()).to_le_bytes());
            c[0x1e..0x20].copy_from_slice(&self.queue_select.to_le_bytes());
            c[0x20..0x28].copy_from_slice(&q.desc_table.to_le_bytes());
            c[0x28..0x30].copy_from_slice(&q.avail_ring.to_le_bytes());
            c[0x30..0x38].copy_from_slice(&q.used_ring.to_le_bytes());
        } else {
            // §4.1.4.3.1: "queue_size ... 0 if the queue is unavailable".
            c[0x1a..0x1c].copy_from_slice(&NO_VECTOR.to_le_bytes());
        }
        c
    }

    fn common_write(&mut self, off: u64, data: &[u8]) {
        if let Some(v) = merge(0x00, 4, u64::from(self.device_feature_select), off, data) {
            self.device_feature_select = v as u32;
        }
        if let Some(v) = merge(0x08, 4, u64::from(self.driver_feature_select), off, data) {
            self.driver_feature_select = v as u32;
        }
        if self.status & status::FEATURES_OK == 0 {
            let shift = match self.driver_feature_select {
                0 => Some(0),
                1 => Some(32),
                _ => None,
            };
            if let Some(shift) = shift {
                let cur = (self.driver_features >> shift) & 0xffff_ffff;
                if let Some(v) = merge(0x0c, 4, cur, off, data) {
                    self.driver_features = (self.driver_features & !(0xffff_ffff << shift)) | (v << shift);
                }
            }
        }
        let nvec = self.msix_table.len() as u64;
        let vector = |v: u64| if v < nvec { v as u16 } else { NO_VECTOR };
        if let Some(v) = merge(0x10, 2, u64::from(self.msix_config), off, data) {
            self.msix_config = vector(v);
        }
        if let Some(v) = merge(0x14, 1, u64::from(self.status), off, data) {
            self.write_status(v as u8);
        }
        if let Some(v) = merge(0x16, 2, u64::from(self.queue_select), off, data) {
            self.queue_select = v as u16;
        }
        let sel = usize::from(self.queue_select);
        let features = self.driver_features;
        let mut bad_enable = None;
        if let (Some(q), Some(qv)) = (self.queues.get_mut(sel), self.queue_vectors.get_mut(sel)) {
            if let Some(v) = merge(0x1a, 2, u64::from(*qv), off, data) {
                *qv = vector(v);
            }
            if !q.ready() {
                if let Some(v) = merge(0x18, 2, u64::from(q.size), off, data) {
                    q.size = v as u16;
                }
                for (at, field) in [(0x20, &mut q.desc_table), (0x28, &mut q.avail_ring), (0x30, &mut q.used_ring)] {
                    if let Some(v) = merge(at, 8, *field, off, data) {
                        *field = v;
                    }
                }
                if let Some(v) = merge(0x1c, 2, 0, off, data) {
                    if v == 1 {
                        if let Err(error) = q.enable(features) {
                            bad_enable = Some(DeviceError { queue: sel, error });
                        }
                    }
                }
            }
        }
        if let Some(e) = bad_enable {
            self.needs_reset(ResetCause::Queue(e));
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // A device that needs a reset takes nothing but the reset.
        if old & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        let mut new = value & !status::DEVICE_NEEDS_RESET;
        // §2.1.2: the driver only ever adds bits (it writes back what it read plus one).
        if old & !new != 0 {
            return;
        }
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0 || self.driver_features & F_VERSION_1 == 0 {
                new &= !status::FEATURES_OK;
            }
        }
        self.status = new;
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            if new & status::FEATURES_OK == 0 {
                self.status &= !status::DRIVER_OK;
                self.needs_reset(ResetCause::DriverOkWithoutFeatures);
            } else {
                self.device.activate(self.driver_features);
            }
        }
    }

    fn needs_reset(&mut self, e: ResetCause) {
        if self.status & status::DEVICE_NEEDS_RESET == 0 {
            self.status |= status::DEVICE_NEEDS_RESET;
            self.last_error = Some(e);
            self.config_generation = self.config_generation.wrapping_add(1);
            self.signal(self.msix_config, 2);
        }
    }

    /// Whether the device may run: driver ready, no error, bus mastering allowed.
    fn live(&self) -> bool {
        self.status & (status::DRIVER_OK | status::DEVICE_NEEDS_RESET | status::FAILED) == status::DRIVER_OK
            && self.command & CMD_BUS_MASTER != 0
    }

    /// Runs the device: after a notification, and whenever its back end may have progressed.
    pub fn process(&mut self, mem: &mut dyn GuestMemory) {
        if !self.live() {
            return;
        }
        match self.device.process(&mut self.queues, mem) {
            Ok(sig) => {
                for q in 0..self.queues.len() {
                    if sig.queues & (1 << q) != 0 {
                        self.signal(self.queue_vectors[q], 1);
                    }
                }
                if sig.config {
                    self.config_generation = self.config_generation.wrapping_add(1);
                    self.signal(self.msix_config, 2);
                }
            }
            Err(e) => self.needs_reset(ResetCause::Queue(e)),
        }
    }

    /// Raises `vector` (MSI-X) or the ISR bit `isr_bit` (no MSI-X).
    fn signal(&mut self, vector: u16, isr_bit: u8) {
        if self.msix_control & MSIX_ENABLE == 0 {
            self.isr |= isr_bit;
            return;
        }
        let v = usize::from(vector);
        let Some(e) = self.msix_table.get(v) else { return };
        if self.msix_control & MSIX_FUNCTION_MASK != 0 || e[3] & MSIX_ENTRY_MASKED != 0 {
            self.msix_pending |= 1 << v;
        } else {
            self.send(v);
        }
    }

    fn send(&mut self, v: usize) {
        let Some(e) = self.msix_table.get(v) else { return };
        // An MSI is a memory write by the function: only with bus mastering on.
        if self.command & CMD_BUS_MASTER == 0 {
            return;
        }
        let msg = MsiMessage { address: u64::from(e[0]) | (u64::from(e[1]) << 32), data: e[2] };
        // Edge interrupts with the same message coalesce in the APIC anyway; keeping each
        // once bounds the queue when the VMM is slow to drain it.
        if !self.out.contains(&msg) {
            self.out.push_back(msg);
        }
    }

    fn deliver_pending(&mut self) {
        if self.msix_control & MSIX_ENABLE == 0 || self.msix_control & MSIX_FUNCTION_MASK != 0 {
            return;
        }
        for v in 0..self.msix_table.len() {
            if self.msix_pending & (1 << v) != 0 && self.msix_table[v][3] & MSIX_ENTRY_MASKED == 0 {
                self.msix_pending &= !(1 << v);
                self.send(v);
            }
        }
    }
}

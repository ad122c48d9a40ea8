//! Taking a function back from a dying domain so that nothing it started can still land:
//! what [`release`] does before the domain's memory may be freed.
//!
//! The IOMMU alone is not enough under emulation. On hardware every DMA is translated when it
//! happens, so once the context entry is cleared (and the invalidation has drained) no write of
//! the dead owner's device reaches memory. QEMU's virtio devices translate a request's buffers
//! once, when they take the request (`address_space_map` through the IOMMU), and write the
//! data and the status byte through that host pointer when the back end completes it, which
//! may be after the IOMMU revoke: into memory the microvisor has freed, scrubbed and perhaps
//! given to another domain. A reset of the device is what stops a request: virtio 1.0 §3.3.1,
//! "a driver MUST ensure a virtqueue isn't live (by device reset) before removing exposed
//! buffers", and QEMU's virtio-blk reset waits for every request in flight (`blk_drain`)
//! before it returns.
//!
//! So [`release`] resets what it can reach in configuration space, in this order:
//! - bus mastering and decoding off ([`quiesce`]): no new DMA, no MMIO;
//! - for a virtio function, a virtio device reset through its PCI configuration access
//!   capability ([`virtio_reset`]): device status 0 written, then read until it reads 0
//!   (virtio 1.0 §4.1.4.3.2: "After writing 0 to device_status, the driver MUST wait for a
//!   read of device_status to return 0"); a few configuration accesses, no BAR mapping, no
//!   wait under QEMU (its reset is synchronous);
//! - a function-level reset where the function has one ([`function_reset`]; PCIe functions on
//!   hardware; the caller then owes the 100 ms of PCIe 6.6.2, and the BARs the reset
//!   cleared: [`crate::pci::restore_after_reset`]; the bare-metal platform does both at
//!   the function's next assignment, refused with `DeviceResetting` until then).
//!
//! Why not the other ways (docs/design.md, "Late DMA"): FLR needs the functions behind PCIe
//! root ports in QEMU and 100 ms before the next owner may touch them, which is longer than a
//! whole restart; holding the dead owner's memory back until the device is reset needs an
//! event saying it was, which only a reset the microvisor makes itself gives.

use crate::pci::{function_reset, quiesce, ConfigSpace, Function};

/// Virtio's PCI vendor id (virtio 1.0 §4.1.2).
const VIRTIO_VENDOR: u16 = 0x1AF4;
/// Capability id: vendor-specific (virtio's structures are described with these).
const CAP_VENDOR: u8 = 0x09;
/// `cfg_type` (byte 3 of a virtio capability): common configuration.
const COMMON_CFG: u8 = 1;
/// `cfg_type`: PCI configuration access, a window from configuration space into the BARs
/// (virtio 1.0 §4.1.4.7; every device has one, §4.1.4.7.1): `bar` at +4, `offset` at +8, `length` at +12, `pci_cfg_data` at +16.
const PCI_CFG: u8 = 5;
/// Offset of `device_status` (u8) in the common configuration (virtio 1.0 §4.1.4.3).
const DEVICE_STATUS: u32 = 0x14;

/// What [`release`] did to a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// A function-level reset was started: the function must not be used for 100 ms, and
    /// then needs its BARs back ([`crate::pci::restore_after_reset`]).
    pub flr: bool,
    /// A virtio function was reset: whether its device status read 0 within the polls
    /// allowed (`None`: not a virtio function with a configuration access window).
    pub virtio_reset: Option<bool>,
}

/// Stop function `f` for good before its owner's memory is freed: quiesce it, reset it as a
/// virtio device if it is one (reading the status up to `polls` times), and start an FLR if
/// it has one. See the module documentation for why each step.
pub fn release(cs: &mut impl ConfigSpace, f: &Function, polls: u32) -> Released {
    quiesce(cs, f.bdf);
    let virtio_reset = virtio_reset(cs, f, polls);
    Released { flr: function_reset(cs, f), virtio_reset }
}

/// Reset virtio function `f` through its PCI configuration access capability: point the
/// window at `device_status` in the common configuration, write 0, and read it back up to
/// `polls` times until it reads 0. `None` when `f` is not virtio or lacks either capability
/// (or they are too short to hold their fields); otherwise whether the reset was seen done.
///
/// The capabilities' positions were walked at boot; their contents (`cfg_type`, the common
/// configuration's BAR and offset) are read now from the device, which lays them out itself
/// (a driver may write only the window's fields, which are written here anyway).
pub fn virtio_reset(cs: &mut impl ConfigSpace, f: &Function, polls: u32) -> Option<bool> {
    if f.vendor != VIRTIO_VENDOR {
        return None;
    }
    let bdf = f.bdf;
    // The first vendor capability of `cfg_type` (byte 3 of its header) at least `len` long.
    let find = |cfg_type: u8, len: u8| {
        let vendor = f.capabilities.iter().filter(|c| c.0 == CAP_VENDOR && c.2 >= len);
        vendor.map(|c| u16::from(c.1)).find(|&at| (cs.read32(bdf, at) >> 24) as u8 == cfg_type)
    };
    let (common, window) = (find(COMMON_CFG, 16)?, find(PCI_CFG, 20)?);
    let bar = cs.read32(bdf, common + 4) & 0xFF;
    let status = cs.read32(bdf, common + 8).wrapping_add(DEVICE_STATUS);
    cs.write32(bdf, window + 4, bar);
    cs.write32(bdf, window + 8, status);
    cs.write32(bdf, window + 12, 1);
    // The device takes the first `length` bytes of `pci_cfg_data` (virtio 1.0 §4.1.4.7.1).
    cs.write32(bdf, window + 16, 0);
    Some((0..polls).any(|_| cs.read32(bdf, window + 16) & 0xFF == 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::Bdf;
    use heapless::Vec;

    const BDF: Bdf = Bdf { bus: 0, dev: 2, func: 0 };
    /// Where QEMU puts virtio-pci's structures: all in BAR 4, the common configuration at 0.
    const BAR: u32 = 4;
    const COMMON_AT: u32 = 0x0;
    /// Capability offsets as QEMU lays them out for virtio-blk.
    const COMMON: u16 = 0x40;
    const WINDOW: u16 = 0x84;

    /// A virtio function as far as a release is concerned: its configuration space (the
    /// capabilities with their fields, the window registers), its device status behind the
    /// window, and the requests it has taken whose buffers it mapped and has not completed.
    /// Like QEMU's, the device completes them into those buffers whenever its back end is
    /// done, whatever bus mastering or the IOMMU say now; a reset completes them at once
    /// (`blk_drain`), into memory the owner still holds.
    struct VirtioModel {
        regs: [u32; 64],
        status: u8,
        in_flight: u32,
    }

    impl VirtioModel {
        fn new(flr: bool) -> Self {
            let mut regs = [0u32; 64];
            regs[0] = 0x1042_1AF4;
            // Status: capability list; command: bus master, memory and I/O decode on.
            regs[1] = 0x0010_0407;
            // (id, next, len, cfg_type) at `at`; the common configuration's bar and offset.
            let mut cap = |at: u16, next: u16, len: u32, cfg_type: u32| {
                regs[usize::from(at / 4)] = 0x09 | u32::from(next) << 8 | len << 16 | cfg_type << 24;
            };
            cap(COMMON, 0x50, 16, 1);
            cap(0x50, 0x60, 16, 3);
            cap(0x60, 0x70, 16, 4);
            cap(0x70, WINDOW, 20, 2);
            cap(WINDOW, 0, 20, 5);
            regs[usize::from(COMMON / 4) + 1] = BAR;
            regs[usize::from(COMMON / 4) + 2] = COMMON_AT;
            if flr {
                // A PCIe capability at 0xC0 with FLR (DevCap bit 28); not linked, found by
                // the boot walk's record only.
                regs[0xC0 / 4] = 0x0002_0010;
                regs[0xC4 / 4] = 1 << 28;
            }
            Self { regs, status: 0x0F, in_flight: 3 }
        }

        fn function(&self, vendor: u16, caps: &[(u8, u8, u8)]) -> Function {
            Function {
                bdf: BDF,
                vendor,
                device: 0x1042,
                class: Default::default(),
                header_type: 0,
                mem_bars: Vec::new(),
                bar_masks: [0; 6],
                bars: [0; 6],
                capabilities: caps.iter().copied().collect(),
            }
        }

        /// The capabilities the boot walk recorded, in list order.
        fn caps(&self) -> std::vec::Vec<(u8, u8, u8)> {
            let mut caps = std::vec![(0x09, 0x40, 16), (0x09, 0x50, 16), (0x09, 0x60, 16), (0x09, 0x70, 20)];
            caps.push((0x09, WINDOW as u8, 20));
            if self.regs[0xC0 / 4] != 0 {
                caps.push((0x10, 0xC0, 2));
            }
            caps
        }

        /// Whether the window points at the device status, one byte wide.
        fn window_on_status(&self) -> bool {
            let w = usize::from(WINDOW / 4);
            self.regs[w + 1] & 0xFF == BAR && self.regs[w + 2] == COMMON_AT + DEVICE_STATUS && self.regs[w + 3] == 1
        }
    }

    impl ConfigSpace for VirtioModel {
        fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
            assert_eq!(bdf, BDF);
            if offset == WINDOW + 16 && self.window_on_status() {
                return u32::from(self.status);
            }
            self.regs.get(usize::from(offset / 4)).copied().unwrap_or(0)
        }

        fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
            assert_eq!(bdf, BDF);
            let i = usize::from(offset / 4);
            match offset {
                // The header and the capabilities' own fields are read-only.
                0x00 | 0x08..=0x0C | 0x40..=0x83 | 0xC4 => {}
                0x04 => self.regs[1] = (self.regs[1] & 0xFFFF_0000) | (value & 0xFFFF),
                _ if offset == WINDOW || offset == WINDOW + 16 && !self.window_on_status() => {}
                _ if offset == WINDOW + 16 => {
                    self.status = value as u8;
                    if self.status == 0 {
                        // virtio_pci_reset -> virtio_blk_reset -> blk_drain: every request
                        // in flight completes now.
                        self.in_flight = 0;
                    }
                }
                _ => self.regs[i] = value,
            }
        }
    }

    /// A model whose device shows its reset done only after this many more status reads.
    struct Slow(VirtioModel, core::cell::Cell<u32>);

    impl ConfigSpace for Slow {
        fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
            if offset == WINDOW + 16 && self.0.window_on_status() && self.1.get() > 0 {
                self.1.set(self.1.get() - 1);
                return 0x0F;
            }
            self.0.read32(bdf, offset)
        }
        fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
            self.0.write32(bdf, offset, value)
        }
    }

    #[test]
    fn release_drains_a_virtio_device_before_the_owner_memory_goes() {
        let mut m = VirtioModel::new(false);
        let f = m.function(0x1AF4, &m.caps());
        let done = release(&mut m, &f, 8);
        assert_eq!(done, Released { flr: false, virtio_reset: Some(true) });
        // Nothing is left to complete later into memory the owner no longer holds.
        assert_eq!(m.in_flight, 0, "requests still in flight after the release");
        assert_eq!(m.status, 0);
        // Quiesced too: bus mastering and decoding off, the status half left alone.
        assert_eq!(m.regs[1], 0x0010_0400);
    }

    #[test]
    fn quiescing_alone_leaves_requests_in_flight() {
        // What the release did before: the device keeps its mapped requests.
        let mut m = VirtioModel::new(false);
        crate::pci::quiesce(&mut m, BDF);
        assert_eq!(m.in_flight, 3);
    }

    #[test]
    fn a_reset_not_seen_done_within_the_polls_is_reported() {
        let m = VirtioModel::new(false);
        let f = m.function(0x1AF4, &m.caps());
        let mut slow = Slow(m, core::cell::Cell::new(5));
        assert_eq!(virtio_reset(&mut slow, &f, 3), Some(false));
        assert_eq!(virtio_reset(&mut slow, &f, 3), Some(true));
        assert_eq!(slow.0.in_flight, 0);
    }

    #[test]
    fn the_window_is_pointed_at_the_common_configuration_wherever_it_is() {
        let mut m = VirtioModel::new(false);
        // The common configuration at 0x3000 of BAR 2.
        m.regs[usize::from(COMMON / 4) + 1] = 2;
        m.regs[usize::from(COMMON / 4) + 2] = 0x3000;
        let f = m.function(0x1AF4, &m.caps());
        virtio_reset(&mut m, &f, 1);
        let w = usize::from(WINDOW / 4);
        assert_eq!((m.regs[w + 1], m.regs[w + 2], m.regs[w + 3]), (2, 0x3014, 1));
    }

    #[test]
    fn other_functions_are_not_reset_as_virtio() {
        let mut m = VirtioModel::new(false);
        // Another vendor's vendor-specific capabilities mean something else.
        let f = m.function(0x8086, &m.caps());
        assert_eq!(release(&mut m, &f, 8), Released { flr: false, virtio_reset: None });
        assert_eq!(m.in_flight, 3);
        // No window, or one too short to hold its data register: nothing to reset through.
        let caps = m.caps();
        let f = m.function(0x1AF4, &caps[..4]);
        assert_eq!(virtio_reset(&mut m, &f, 8), None);
        let mut short = caps.clone();
        short[4].2 = 16;
        let f = m.function(0x1AF4, &short);
        assert_eq!(virtio_reset(&mut m, &f, 8), None);
        // No common configuration capability.
        let f = m.function(0x1AF4, &caps[1..]);
        assert_eq!(virtio_reset(&mut m, &f, 8), None);
        assert_eq!(m.in_flight, 3);
    }

    #[test]
    fn a_function_with_flr_gets_it_as_well() {
        let mut m = VirtioModel::new(true);
        let f = m.function(0x1AF4, &m.caps());
        assert_eq!(release(&mut m, &f, 8), Released { flr: true, virtio_reset: Some(true) });
        // Initiate Function Level Reset (Device Control bit 15) written, status half zero.
        assert_eq!(m.regs[0xC8 / 4], 1 << 15);
    }
}

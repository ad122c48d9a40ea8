//! PCI devices found at boot: assignment to a domain, configuration access, and device
//! interrupts routed to notifications.

use super::*;

/// Where a device interrupt (by host vector) goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqRoute {
    pub device: DeviceId,
    pub notification: NotificationId,
}

/// Host vectors the microvisor hands out for device interrupts.
pub const DEVICE_VECTOR_BASE: u8 = 0x30;
pub const DEVICE_VECTORS: usize = 32;

/// A PCI function the microvisor found at boot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Device {
    pub present: bool,
    /// Requester id: bus << 8 | device << 3 | function.
    pub rid: u16,
    pub vendor: u16,
    pub device: u16,
    /// class << 16 | subclass << 8 | programming interface.
    pub class: u32,
    pub owner: Option<DomainId>,
}

impl<F: Stage2Format> Kernel<F> {
    /// Record a PCI function found at boot; dom0 gets a capability to it.
    pub fn register_device(&mut self, rid: u16, vendor: u16, device: u16, class: u32) -> Option<DeviceId> {
        let i = self.devices.iter().position(|d| !d.present)?;
        self.devices[i] = Device { present: true, rid, vendor, device, class, owner: None };
        Some(i as DeviceId)
    }

    /// The device in the caller's `slot`.
    pub fn lookup_device(&self, caller: DomainId, slot: u64, rights: u64) -> Result<DeviceId, Error> {
        self.lookup_as(caller, slot, rights, |o| if let Object::Device(dev) = o { Some(dev) } else { None })
    }

    /// Give device `dev` to domain `d`: IOMMU space, then the BARs in its stage-2.
    pub fn device_assign<P: Platform>(&mut self, p: &mut P, dev: DeviceId, d: DomainId) -> Result<(), Error> {
        if self.devices[dev as usize].owner.is_some() {
            return Err(Error::DeviceBusy);
        }
        let dom = &self.domains[d as usize];
        let mut regions: heapless::Vec<(u64, u64, u64), MAX_MAPPINGS> = heapless::Vec::new();
        for m in &dom.mappings {
            let r = &self.regions[m.region as usize];
            let _ = regions.push((m.gpa, r.hpa, r.frames * PAGE));
        }
        let bars = p.device_bars(dev);
        // The BARs must land outside the domain's RAM and its regions.
        for &(addr, size) in &bars {
            let end = addr.saturating_add(size);
            if addr < dom.ram_size() || regions.iter().any(|&(g, _, s)| addr < g + s && g < end) {
                return Err(Error::AlreadyMapped);
            }
        }
        let ram = dom.ram.clone();
        p.device_assign(dev, d, &ram, &regions)?;
        let stage2 = self.domains[d as usize].stage2.as_mut().ok_or(Error::InvalidState)?;
        let mut mapped: heapless::Vec<(u64, u64), 6> = heapless::Vec::new();
        for &(addr, size) in &bars {
            if let Err(e) = stage2.map(p, addr, addr, size, Access::READ | Access::WRITE, MemType::Uncached) {
                for &(a, s) in &mapped {
                    let _ = stage2.unmap(p, a, s);
                }
                p.device_release(dev);
                return Err(stage2_error(e));
            }
            let _ = mapped.push((addr, size));
        }
        self.devices[dev as usize].owner = Some(d);
        Ok(())
    }

    /// Route a new interrupt of device `dev` to notification `n`.
    pub fn device_irq<P: Platform>(
        &mut self,
        p: &mut P,
        dev: DeviceId,
        n: NotificationId,
    ) -> Result<(u64, u64, u16), Error> {
        let IrqAllocation { vector, msi_address: address, msi_data: data, handle } = p.irq_allocate(dev)?;
        let Some(route) = vector.checked_sub(DEVICE_VECTOR_BASE).and_then(|i| self.irq_routes.get_mut(i as usize))
        else {
            p.irq_release(dev);
            return Err(Error::OutOfMemory);
        };
        *route = Some(IrqRoute { device: dev, notification: n });
        // The route keeps the notification alive.
        self.notifications[n as usize].refs += 1;
        Ok((address, data, handle))
    }

    pub(super) fn device_irqs_release<P: Platform>(&mut self, p: &mut P, dev: DeviceId) {
        p.irq_release(dev);
        for i in 0..DEVICE_VECTORS {
            if let Some(r) = self.irq_routes[i] {
                if r.device == dev {
                    self.irq_routes[i] = None;
                    self.release(p, Object::Notification(r.notification));
                }
            }
        }
    }

    /// A device interrupt arrived on host `vector`: signal its notification.
    pub fn device_interrupt(&mut self, vector: u8) {
        let route =
            vector.checked_sub(DEVICE_VECTOR_BASE).and_then(|i| self.irq_routes.get(i as usize).copied().flatten());
        if let Some(r) = route {
            self.signal_object(r.notification, 1);
        }
    }
}

//! virtio-drivers glue for a driver VM: configuration space through the microvisor's
//! filtering hypercalls, DMA memory from the driver VM's own RAM (its guest-physical
//! addresses are what the device sees: the IOMMU maps exactly this VM's memory), and a
//! transport wrapper that negotiates VIRTIO_F_ACCESS_PLATFORM, without which a device
//! behind an IOMMU (`iommu_platform=on`) refuses to start, and a [`Kicker`] that notifies
//! the device safely after buffers were published.

use alloc::rc::Rc;
use core::cell::{Cell, RefCell};
use core::ptr::NonNull;
use core::sync::atomic::{fence, AtomicU16, Ordering};

use domain_rt::hypercall::call;
use ipc_spec::Hypercall;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// VIRTIO_F_ACCESS_PLATFORM: the device's DMA goes through the platform's IOMMU.
const ACCESS_PLATFORM: u64 = 1 << 33;

/// PCI configuration access for the one function this VM owns (capability `slot`).
#[derive(Clone, Copy)]
pub struct HypercallConfig {
    pub slot: u64,
    pub function: DeviceFunction,
}

impl ConfigurationAccess for HypercallConfig {
    fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
        if df != self.function {
            return u32::MAX; // no other function exists for this VM
        }
        call(Hypercall::PciConfigRead, self.slot, [offset as u64, 4, 0, 0, 0, 0]).map_or(u32::MAX, |r| r.args[0] as u32)
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
        if df == self.function {
            let _ = call(Hypercall::PciConfigWrite, self.slot, [offset as u64, 4, data as u64, 0, 0, 0]);
        }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        *self
    }
}

/// DMA memory and address translation for virtio-drivers in a driver VM. The VM runs on an
/// identity map of its guest-physical space, so a pointer is its own device address.
pub struct DriverHal;

// SAFETY: dma_alloc hands out fresh, zeroed, page-aligned heap memory that nothing else
// aliases until dma_dealloc; addresses are identity-mapped guest-physical addresses, which
// the IOMMU maps for this VM's device; share/unshare need no bouncing for the same reason.
unsafe impl Hal for DriverHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let layout = match core::alloc::Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE) {
            Ok(l) => l,
            Err(_) => panic!("DMA allocation of {pages} pages is not a valid layout"),
        };
        // SAFETY: the layout has a non-zero size (virtio-drivers asks for at least a page).
        let ptr = unsafe { alloc::alloc::alloc_zeroed(layout) };
        match NonNull::new(ptr) {
            Some(p) => (p.as_ptr() as PhysAddr, p),
            None => panic!("out of heap for {pages} DMA pages"),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        if let Ok(layout) = core::alloc::Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE) {
            // SAFETY: per the trait contract the block came from dma_alloc with this size.
            unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), layout) };
        }
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // BARs are mapped at their physical addresses, inside our identity map (uncached).
        match NonNull::new(paddr as *mut u8) {
            Some(p) => p,
            None => panic!("BAR at address 0"),
        }
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// A transport that adds VIRTIO_F_ACCESS_PLATFORM to the features the driver accepts.
/// The inner transport is shared with the [`Kicker`]s taken from it before the device
/// driver takes the transport over, and so is whether notifications are held back
/// ([`Kicker::hold`]).
pub struct AccessPlatform<T: Transport>(Rc<RefCell<T>>, Rc<Held>);

/// Notifications held back while a batch of buffers is published: whether they are, and
/// the queues (a bit each, queues 0 to 31) due one.
#[derive(Default)]
pub struct Held {
    on: Cell<bool>,
    queues: Cell<u32>,
    /// Where each of the first [`AREAS`] queues' driver and device areas are, and its size
    /// (from `queue_set`): for [`Kicker::used_notifications`].
    areas: [Cell<(PhysAddr, PhysAddr, u32)>; AREAS],
}

/// Queues whose rings' addresses are kept (a net device's receive and transmit queues).
const AREAS: usize = 2;

impl<T: Transport> AccessPlatform<T> {
    pub fn new(inner: T) -> Self {
        Self(Rc::new(RefCell::new(inner)), Rc::new(Held::default()))
    }

    /// A handle that can notify the device's queues after the driver owns the transport.
    pub fn kicker(&self) -> Kicker<T> {
        Kicker(self.0.clone(), self.1.clone())
    }
}

/// Notifies ("kicks") a queue of the device, unconditionally, after a full fence.
///
/// Why it exists: virtio-drivers decides whether a kick is needed right after it publishes
/// a buffer, by reading the device's suppression field (`avail_event`, or the used ring's
/// NO_NOTIFY flag), with no full barrier between that publishing store and this load. x86
/// may perform the load first: the driver then sees "no kick needed" while the device, which
/// has just found the ring empty and re-enabled kicks, still sees the old index and waits for
/// a kick that never comes. QEMU's virtio-net does exactly that when it runs out of receive
/// buffers, and the receive path stops for good. A kick after a fence cannot be lost that
/// way: the device re-reads the index after the fence made it visible. Kicks are idempotent.
///
/// It also holds notifications back while a batch of requests is published ([`Self::hold`],
/// [`Self::release`]): the device then finds the whole batch at one notification. Under
/// emulation a notification is handled at once, so without this each request is taken
/// alone, and QEMU's virtio-blk, which merges adjacent requests only within what it takes
/// at once, merges fewer (`cargo xtask bench blk`, sequential workloads).
pub struct Kicker<T: Transport>(Rc<RefCell<T>>, Rc<Held>);

impl<T: Transport> Kicker<T> {
    pub fn kick(&self, queue: u16) {
        fence(Ordering::SeqCst);
        // The device driver's borrows of the transport never outlive one of its calls, and
        // a driver VM has one thread: the cell is always free here.
        if let Ok(mut t) = self.0.try_borrow_mut() {
            t.notify(queue);
        }
    }

    /// From now until [`Self::release`], a notification the device driver sends is noted,
    /// not sent.
    pub fn hold(&self) {
        self.1.on.set(true);
    }

    /// Control over `queue`'s used-buffer notifications (its interrupts), for a driver that
    /// polls the queue for a while: `None` before the queue is set up, or for a queue past
    /// the first [`AREAS`].
    pub fn used_notifications(&self, queue: u16) -> Option<UsedNotifications> {
        let (driver_area, device_area, size) = self.1.areas.get(usize::from(queue))?.get();
        if driver_area == 0 || device_area == 0 {
            return None;
        }
        Some(UsedNotifications { driver_area, device_area, size: size as usize })
    }

    /// Send the notifications noted since [`Self::hold`], one per queue (with [`Self::kick`],
    /// after a full fence), and send them at once from now on.
    pub fn release(&self) {
        self.1.on.set(false);
        let mut queues = self.1.queues.replace(0);
        while queues != 0 {
            let queue = queues.trailing_zeros();
            queues &= queues - 1;
            self.kick(queue as u16);
        }
    }
}

impl<T: Transport> Transport for AccessPlatform<T> {
    fn device_type(&self) -> DeviceType {
        self.0.borrow().device_type()
    }
    fn read_device_features(&mut self) -> u64 {
        self.0.borrow_mut().read_device_features()
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        let mut t = self.0.borrow_mut();
        let offered = t.read_device_features();
        t.write_driver_features(driver_features | (offered & ACCESS_PLATFORM));
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.0.borrow_mut().max_queue_size(queue)
    }
    fn notify(&mut self, queue: u16) {
        match 1u32.checked_shl(u32::from(queue)) {
            Some(bit) if self.1.on.get() => self.1.queues.set(self.1.queues.get() | bit),
            _ => self.0.borrow_mut().notify(queue),
        }
    }
    fn get_status(&self) -> DeviceStatus {
        self.0.borrow().get_status()
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.0.borrow_mut().set_status(status)
    }
    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.0.borrow_mut().set_guest_page_size(guest_page_size)
    }
    fn requires_legacy_layout(&self) -> bool {
        self.0.borrow().requires_legacy_layout()
    }
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        if let Some(a) = self.1.areas.get(usize::from(queue)) {
            a.set((driver_area, device_area, size));
        }
        self.0.borrow_mut().queue_set(queue, size, descriptors, driver_area, device_area)
    }
    fn queue_unset(&mut self, queue: u16) {
        self.0.borrow_mut().queue_unset(queue)
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.0.borrow_mut().queue_used(queue)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.0.borrow_mut().ack_interrupt()
    }
    fn read_config_generation(&self) -> u32 {
        self.0.borrow().read_config_generation()
    }
    fn read_config_space<V: FromBytes + IntoBytes>(&self, offset: usize) -> virtio_drivers::Result<V> {
        self.0.borrow().read_config_space(offset)
    }
    fn write_config_space<V: IntoBytes + Immutable>(&mut self, offset: usize, value: V) -> virtio_drivers::Result<()> {
        self.0.borrow_mut().write_config_space(offset, value)
    }
}

/// One split virtqueue's used-buffer notifications with VIRTIO_RING_F_EVENT_IDX, switched
/// off while the driver polls the queue and on again before it sleeps (virtio 1.1, 2.6.7.2
/// "Used Buffer Notification Suppression": the device interrupts when its used index
/// passes the driver's `used_event`, the last field of the available ring).
///
/// virtio-drivers writes `used_event` as it pops each buffer (it is then the driver's last
/// used index); [`Self::pause`] moves it half the index space ahead, where the device's
/// index, which is never more than the queue's size ahead of the driver's, cannot pass it,
/// and [`Self::resume`] puts it back. Nothing is popped between the two.
pub struct UsedNotifications {
    driver_area: PhysAddr,
    device_area: PhysAddr,
    size: usize,
}

impl UsedNotifications {
    fn used_event(&self) -> &AtomicU16 {
        // SAFETY: the driver area of a split virtqueue of `size` entries is `flags`, `idx`,
        // `ring[size]` and `used_event`, all u16 (virtio 1.1, 2.6.6), allocated by
        // virtio-drivers through `DriverHal` (identity-mapped, 2-byte aligned, alive as long
        // as the device driver: the queues are never torn down while it serves).
        unsafe { &*((self.driver_area as usize + 4 + 2 * self.size) as *const AtomicU16) }
    }

    fn used_idx(&self) -> &AtomicU16 {
        // SAFETY: the device area starts with `flags` and `idx`, u16 each (virtio 1.1,
        // 2.6.8); as above for where it lives.
        unsafe { &*((self.device_area as usize + 2) as *const AtomicU16) }
    }

    /// Stop the device's interrupts for this queue. Returns the driver's last used index,
    /// for [`Self::arrived`] and [`Self::resume`].
    pub fn pause(&self) -> u16 {
        let last = self.used_event().load(Ordering::Relaxed);
        self.used_event().store(last.wrapping_add(0x8000), Ordering::Release);
        last
    }

    /// Whether the device has used a buffer since `last`.
    pub fn arrived(&self, last: u16) -> bool {
        self.used_idx().load(Ordering::Acquire) != last
    }

    /// Let the device interrupt again for a buffer used after `last`, then look once more:
    /// `true` if a buffer was used meanwhile (it may have been used while notifications
    /// were off, and then no interrupt comes for it). The full fence orders the store
    /// before the load, as the device orders its index store before its `used_event` load.
    pub fn resume(&self, last: u16) -> bool {
        self.unpause(last);
        fence(Ordering::SeqCst);
        self.arrived(last)
    }

    fn unpause(&self, last: u16) {
        self.used_event().store(last, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use std::boxed::Box;
    use std::vec::Vec;

    const SIZE: usize = 16;

    /// The rings' memory, and the device's side of the event-index rule as QEMU's
    /// virtio-net keeps it (`virtio_should_notify`: it remembers the used index it last
    /// decided at, `signalled_used`, whether or not it interrupted then).
    struct Model {
        driver_area: Box<[AtomicU16; 3 + SIZE]>,
        device_area: Box<[AtomicU16; 2]>,
        signalled: Option<u16>,
        interrupts: u32,
        /// The driver's last used index (what virtio-drivers' pop leaves in `used_event`).
        last: u16,
    }

    impl Model {
        fn new(start: u16) -> Self {
            let m = Self {
                driver_area: Box::new(core::array::from_fn(|_| AtomicU16::new(0))),
                device_area: Box::new(core::array::from_fn(|_| AtomicU16::new(0))),
                signalled: Some(start),
                interrupts: 0,
                last: start,
            };
            m.device_area[1].store(start, Ordering::Relaxed);
            m.driver_area[2 + SIZE].store(start, Ordering::Relaxed);
            m
        }

        fn notes(&self) -> UsedNotifications {
            UsedNotifications {
                driver_area: self.driver_area.as_ptr() as PhysAddr,
                device_area: self.device_area.as_ptr() as PhysAddr,
                size: SIZE,
            }
        }

        /// The device uses a buffer: its index moves, then it decides whether to
        /// interrupt (virtio 1.1, 2.6.7.2: when the new index passes `used_event`).
        fn push(&mut self) {
            let new = self.device_area[1].load(Ordering::Relaxed).wrapping_add(1);
            self.device_area[1].store(new, Ordering::Relaxed);
            let event = self.driver_area[2 + SIZE].load(Ordering::Relaxed);
            let notify = match self.signalled {
                None => true,
                Some(old) => new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old),
            };
            self.signalled = Some(new);
            self.interrupts += u32::from(notify);
        }

        /// The driver takes every used buffer, as virtio-drivers' `pop_used` does: each
        /// pop stores the new last index in `used_event`.
        fn drain(&mut self) {
            while self.last != self.device_area[1].load(Ordering::Relaxed) {
                self.last = self.last.wrapping_add(1);
                self.driver_area[2 + SIZE].store(self.last, Ordering::Relaxed);
            }
        }
    }

    /// Every schedule of up to two device pushes at each point between the driver's steps
    /// of one idle period (pause, two looks, `used_event` restored, the last look), from
    /// indexes near the wrap: a buffer used after the pause is found by a look or, if the
    /// driver goes to sleep, raises an interrupt; and after a sleep the next buffer
    /// always interrupts.
    #[test]
    fn pausing_loses_no_interrupt() {
        const POINTS: u32 = 5;
        for start in [0u16, 7, 0x7fff, 0x8000, 0xfffe, 0xffff] {
            for schedule in 0..3u32.pow(POINTS) {
                let pushes: Vec<u32> = (0..POINTS).map(|i| schedule / 3u32.pow(i) % 3).collect();
                let mut m = Model::new(start);
                let notes = m.notes();
                let pushed_at = |m: &mut Model, point: usize| (0..pushes[point]).for_each(|_| m.push());
                pushed_at(&mut m, 0);
                let last = notes.pause();
                assert_eq!(last, m.last);
                pushed_at(&mut m, 1);
                let mut found = notes.arrived(last);
                pushed_at(&mut m, 2);
                found |= notes.arrived(last);
                let interrupts_before = m.interrupts;
                pushed_at(&mut m, 3);
                notes.unpause(last);
                pushed_at(&mut m, 4);
                found |= notes.arrived(last);
                let waiting = m.device_area[1].load(Ordering::Relaxed) != m.last;
                // Pushes before the pause may have interrupted already: only a push after
                // the pause is at stake; every pushed buffer is seen by the last look.
                assert_eq!(found, waiting, "start {start}, pushes {pushes:?}");
                if found {
                    m.drain();
                } else {
                    assert_eq!(m.interrupts, interrupts_before, "start {start}, pushes {pushes:?}");
                }
                // The driver sleeps (or drained and sleeps): the next buffer interrupts.
                let before = m.interrupts;
                m.push();
                assert_eq!(m.interrupts, before + 1, "start {start}, pushes {pushes:?}");
            }
        }
    }

    /// While paused, however many buffers the device uses (up to a full queue), it does
    /// not interrupt; the first look finds them.
    #[test]
    fn paused_queue_does_not_interrupt() {
        for start in [0u16, 0x7fff, 0xfff8] {
            let mut m = Model::new(start);
            let notes = m.notes();
            let last = notes.pause();
            for _ in 0..SIZE {
                m.push();
            }
            assert_eq!(m.interrupts, 0);
            assert!(notes.resume(last));
        }
    }
}

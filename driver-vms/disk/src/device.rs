//! The virtio-blk device as the disk driver VM drives it: one request at a time, and while
//! the device works on it the VM sleeps until the completion interrupt (so other domains
//! run) instead of spinning. Both the serving loop and the direct benchmark use this, so
//! their figures compare the same device handling.

use core::sync::atomic::{fence, Ordering};

use domain_rt::{hypercall, irq, println};
use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk};
use virtio_pci::{DriverHal, Transport};

pub type Blk = VirtIOBlk<DriverHal, Transport>;

/// With interrupts: how long a wait for a completion lasts before the VM looks again
/// anyway. A completion interrupt that was lost then costs this much, not the request.
const FALLBACK_NS: u64 = 10_000_000;

pub struct Disk {
    pub blk: Blk,
    /// The queue's completion interrupt arrives as this VM's virtual interrupt.
    interrupts: bool,
    /// A timer notification bound to [`irq::TIMER_VECTOR`], for the fallback.
    timer: Option<u64>,
    /// Completions found by the fallback timer alone, before their interrupt came (it was
    /// late, or lost).
    missed: u64,
}

impl Disk {
    /// `interrupts`: the queue's interrupt is routed to a notification bound to this VM's
    /// virtual interrupt; `timer`: a timer notification bound to [`irq::TIMER_VECTOR`].
    pub fn new(blk: Blk, interrupts: bool, timer: Option<u64>) -> Self {
        Self { blk, interrupts, timer, missed: 0 }
    }

    /// Read sectors from `sector` into `buf` (a non-zero multiple of 512 bytes).
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> virtio_drivers::Result {
        let (mut req, mut resp) = (BlkReq::default(), BlkResp::default());
        // SAFETY: req, buf and resp are left alone until complete_read_blocks below, which
        // runs before they go out of scope (wait_for returns once the device is done).
        let token = unsafe { self.blk.read_blocks_nb(sector as usize, &mut req, buf, &mut resp)? };
        self.wait_for_completion();
        // SAFETY: the same buffers as in read_blocks_nb.
        unsafe { self.blk.complete_read_blocks(token, &req, buf, &mut resp) }
    }

    /// Write `buf` (a non-zero multiple of 512 bytes) to the sectors from `sector`.
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> virtio_drivers::Result {
        let (mut req, mut resp) = (BlkReq::default(), BlkResp::default());
        // SAFETY: as for read.
        let token = unsafe { self.blk.write_blocks_nb(sector as usize, &mut req, buf, &mut resp)? };
        self.wait_for_completion();
        // SAFETY: the same buffers as in write_blocks_nb.
        unsafe { self.blk.complete_write_blocks(token, &req, buf, &mut resp) }
    }

    /// Flush the device's write cache (rare: waited for by spinning).
    pub fn flush(&mut self) -> virtio_drivers::Result {
        self.blk.flush()
    }

    /// Return once the device has completed a request (the only one outstanding).
    fn wait_for_completion(&mut self) {
        // The fallback timer's count when it was last armed (None: not armed yet).
        let mut armed: Option<u64> = None;
        loop {
            let before = irq::Counts::now();
            // Completing the last request stored `used_event` (the entry to interrupt for);
            // looking for the next entry is a load: x86 may do it first without a full
            // fence, and then neither side sees the other (see virtio_pci::Kicker).
            fence(Ordering::SeqCst);
            if self.blk.peek_used().is_some() {
                return;
            }
            if !self.interrupts {
                core::hint::spin_loop();
                continue;
            }
            if armed != Some(before.timer) {
                if let Some(t) = self.timer {
                    let _ = hypercall::timer_set(t, FALLBACK_NS, 1);
                }
                armed = Some(before.timer);
            }
            irq::wait_for_virq(before.all);
            self.note_missed_interrupt(before.until(irq::Counts::now()));
        }
    }

    /// After a wake-up: if only the fallback timer fired and the request is complete, its
    /// interrupt has not come (late, or lost); count it (reported on powers of two).
    fn note_missed_interrupt(&mut self, arrived: irq::Arrived) {
        fence(Ordering::SeqCst);
        if arrived.timer_only() && self.blk.peek_used().is_some() {
            self.missed += 1;
            if self.missed.is_power_of_two() {
                println!(
                    "device interrupts: {} completion(s) so far found by the {} ms fallback before their interrupt (late or lost)",
                    self.missed,
                    FALLBACK_NS / 1_000_000
                );
            }
        }
    }
}

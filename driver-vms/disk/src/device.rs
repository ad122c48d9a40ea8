//! The virtio-blk device as the disk driver VM drives it: many requests in flight at once
//! (up to [`QUEUE_DEPTH`], the virtqueue's size in virtio-drivers 0.13), completed as the
//! device finishes them, in whatever order it finishes them. While requests are in flight
//! and nothing else is to do, the VM sleeps until the completion interrupt (so other
//! domains run) instead of spinning. Both the serving loop and the direct benchmark use
//! this, so their figures compare the same device handling.

extern crate alloc;

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{fence, Ordering};

use domain_rt::{hypercall, irq, println};
use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk};
use virtio_pci::{DriverHal, QueueKicker, Transport};

pub type Blk = VirtIOBlk<DriverHal, Transport>;

/// Requests in flight at most: virtio-drivers 0.13's virtqueue has 16 descriptors, and
/// with `VIRTIO_F_INDIRECT_DESC` (which it negotiates, and QEMU offers) each request takes
/// one. Without it a request takes three and `add` says the queue is full sooner; that is
/// handled ([`Submit::Full`]).
pub const QUEUE_DEPTH: usize = 16;

/// With interrupts: how long a wait for a completion lasts before the VM looks again
/// anyway. A completion interrupt that was lost then costs this much, not the request.
const FALLBACK_NS: u64 = 10_000_000;

/// Who a request is for: echoed back with its completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    /// The caller's index (the serving loop: the channel).
    pub chan: usize,
    /// The caller's id (the serving loop: the guest's request id).
    pub id: u64,
}

/// A request the device is working on. `req` and `resp` live in a boxed array that is
/// never moved or reallocated, because the device reads and writes them by DMA until the
/// request completes.
struct Slot {
    busy: bool,
    token: u16,
    write: bool,
    buf: *mut u8,
    len: usize,
    tag: Tag,
    req: BlkReq,
    resp: BlkResp,
}

impl Slot {
    fn empty() -> Self {
        Self {
            busy: false,
            token: 0,
            write: false,
            buf: core::ptr::null_mut(),
            len: 0,
            tag: Tag { chan: 0, id: 0 },
            req: BlkReq::default(),
            resp: BlkResp::default(),
        }
    }
}

/// Why a request was not submitted.
#[derive(Debug)]
pub enum Submit {
    /// No room on the virtqueue now: try again after a completion.
    Full,
    /// The device refused it.
    Failed(virtio_drivers::Error),
}

pub struct Disk {
    pub blk: Blk,
    /// Holds the queue's notifications back while a batch is submitted ([`Self::submitting`]).
    kicker: QueueKicker,
    /// The queue's completion interrupt arrives as this VM's virtual interrupt.
    interrupts: bool,
    /// A timer notification bound to [`irq::TIMER_VECTOR`], for the fallback.
    timer: Option<u64>,
    /// Completions found by the fallback timer alone, before their interrupt came (it was
    /// late, or lost).
    missed: u64,
    slots: Box<[Slot]>,
    in_flight: usize,
    /// Most requests ever in flight at once (reported).
    pub peak: usize,
    /// Requests completed so far.
    pub completed: u64,
    /// The timer count when the fallback timer was last armed: it is armed again only
    /// after it fired (a hypercall per sleep would cost more than the request).
    armed: Option<u64>,
}

impl Disk {
    /// `interrupts`: the queue's interrupt is routed to a notification bound to this VM's
    /// virtual interrupt; `timer`: a timer notification bound to [`irq::TIMER_VECTOR`].
    pub fn new(blk: Blk, kicker: QueueKicker, interrupts: bool, timer: Option<u64>) -> Self {
        let slots: Vec<Slot> = (0..QUEUE_DEPTH).map(|_| Slot::empty()).collect();
        Self {
            blk,
            kicker,
            interrupts,
            timer,
            missed: 0,
            slots: slots.into_boxed_slice(),
            in_flight: 0,
            peak: 0,
            armed: None,
            completed: 0,
        }
    }

    /// Requests the device is working on.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether another request can be submitted now (the virtqueue may still say full).
    pub fn has_room(&self) -> bool {
        self.in_flight < QUEUE_DEPTH
    }

    /// Runs `submit`, which submits a batch of requests, and notifies the device once at
    /// the end (if any request needed it), so that it takes the batch at once
    /// ([`virtio_pci::Kicker::hold`]: QEMU's virtio-blk then merges adjacent requests).
    pub fn submitting<R>(&mut self, submit: impl FnOnce(&mut Self) -> R) -> R {
        self.kicker.hold();
        let r = submit(self);
        self.kicker.release();
        r
    }

    /// Start a read (`write` false: device → `buf`) or a write (`buf` → device) of `len`
    /// bytes (a non-zero multiple of 512) at `sector`, answered later by
    /// [`Self::take_completions`] with `tag`.
    ///
    /// # Safety
    /// `buf..buf+len` must stay valid memory the device may DMA to (reads) or from
    /// (writes) until the completion is taken, and nothing in this VM may use it meanwhile.
    pub unsafe fn submit(
        &mut self,
        tag: Tag,
        write: bool,
        sector: u64,
        buf: *mut u8,
        len: usize,
    ) -> Result<(), Submit> {
        let Some(i) = self.slots.iter().position(|s| !s.busy) else { return Err(Submit::Full) };
        let blk = &mut self.blk;
        let slot = &mut self.slots[i];
        let token = if write {
            // SAFETY: the caller vouches for the buffer until completion; req and resp sit in
            // the boxed slot array, which is neither moved nor reused before completion.
            unsafe {
                blk.write_blocks_nb(
                    sector as usize,
                    &mut slot.req,
                    core::slice::from_raw_parts(buf, len),
                    &mut slot.resp,
                )
            }
        } else {
            // SAFETY: as for writes.
            unsafe {
                blk.read_blocks_nb(
                    sector as usize,
                    &mut slot.req,
                    core::slice::from_raw_parts_mut(buf, len),
                    &mut slot.resp,
                )
            }
        };
        let token = match token {
            Ok(t) => t,
            Err(virtio_drivers::Error::QueueFull) => return Err(Submit::Full),
            Err(e) => return Err(Submit::Failed(e)),
        };
        slot.busy = true;
        slot.token = token;
        slot.write = write;
        slot.buf = buf;
        slot.len = len;
        slot.tag = tag;
        self.in_flight += 1;
        self.peak = self.peak.max(self.in_flight);
        Ok(())
    }

    /// Take every request the device has finished, in the order it finished them, giving
    /// each tag and result to `done`. Returns how many were taken.
    pub fn take_completions(&mut self, mut done: impl FnMut(Tag, virtio_drivers::Result)) -> usize {
        let mut taken = 0;
        loop {
            // Completing the last request stored `used_event` (the entry to interrupt for);
            // looking for the next entry is a load: x86 may do it first without a full
            // fence, and then neither side sees the other (see virtio_pci::Kicker).
            fence(Ordering::SeqCst);
            let Some(token) = self.blk.peek_used() else { return taken };
            let Some(i) = self.slots.iter().position(|s| s.busy && s.token == token) else {
                // A token we never handed out: the device broke the virtio contract. Nothing
                // can be completed safely; stop (the driver VM is then restarted by dom0).
                println!("virtio-blk: completion for unknown token {token}");
                return taken;
            };
            let blk = &mut self.blk;
            let s = &mut self.slots[i];
            let result = if s.write {
                // SAFETY: the same req, buffer and resp as in write_blocks_nb (the slot kept
                // them), and the device reported the request done.
                unsafe {
                    blk.complete_write_blocks(token, &s.req, core::slice::from_raw_parts(s.buf, s.len), &mut s.resp)
                }
            } else {
                // SAFETY: as for writes, with read_blocks_nb.
                unsafe {
                    blk.complete_read_blocks(token, &s.req, core::slice::from_raw_parts_mut(s.buf, s.len), &mut s.resp)
                }
            };
            s.busy = false;
            self.in_flight -= 1;
            self.completed += 1;
            taken += 1;
            done(s.tag, result);
        }
    }

    /// Sleep until a virtual interrupt after `seen` (a doorbell or the completion
    /// interrupt), with the fallback timer armed while requests are in flight; returns the
    /// new count. Without interrupts, spins while requests are in flight.
    pub fn sleep(&mut self, seen: u64) -> u64 {
        self.sleep_ringing(seen, None)
    }

    /// [`Self::sleep`], signalling notification `ring` first (bit 1) if given: with the
    /// halt in one hypercall (`SignalHalt`, one exit instead of two) when it does halt, with
    /// a plain signal when it does not.
    pub fn sleep_ringing(&mut self, seen: u64, ring: Option<u64>) -> u64 {
        let ring_now = |ring: Option<u64>| {
            if let Some(r) = ring {
                let _ = hypercall::signal(r, 1);
            }
        };
        let before = irq::Counts { all: seen, timer: irq::timer_count() };
        if self.in_flight > 0 {
            fence(Ordering::SeqCst);
            if self.blk.peek_used().is_some() {
                ring_now(ring);
                return irq::count();
            }
            if !self.interrupts {
                ring_now(ring);
                core::hint::spin_loop();
                return irq::count();
            }
            if self.armed != Some(before.timer) {
                if let Some(t) = self.timer {
                    let _ = hypercall::timer_set(t, FALLBACK_NS, 1);
                }
                self.armed = Some(before.timer);
            }
        }
        let now = match ring {
            Some(r) => irq::signal_and_wait_for_virq(r, seen),
            None => irq::wait_for_virq(seen),
        };
        if self.in_flight > 0 {
            self.note_missed_interrupt(before.until(irq::Counts::now()));
        }
        now
    }

    /// Wait until every request in flight is complete, giving each to `done`.
    pub fn drain(&mut self, mut done: impl FnMut(Tag, virtio_drivers::Result)) {
        let mut seen = irq::count();
        while self.in_flight > 0 {
            if self.take_completions(&mut done) == 0 {
                seen = self.sleep(seen);
            }
        }
    }

    /// Flush the device's write cache. Only requests already completed are covered (the
    /// caller drains first); waited for by spinning (virtio-drivers has no non-blocking
    /// flush), which needs the queue otherwise empty.
    pub fn flush(&mut self) -> virtio_drivers::Result {
        self.drain(|_, _| {});
        self.blk.flush()
    }

    /// After a wake-up: if only the fallback timer fired and a request is complete, its
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

//! Notifications: asynchronous bits with a wake-up. A waiter takes the bits; a bound vCPU
//! gets a virtual interrupt (and leaves HLT). Virtual timers signal a notification once
//! their deadline passes.

use ipc_spec::hypercall::rights;
use ipc_spec::Error;

use super::caps::Object;
use super::{Kernel, NotificationId, VcpuId, VcpuState, MAX_DOMAINS, MAX_NOTIFICATIONS, MAX_VCPUS};
use crate::stage2::Stage2Format;

/// A vCPU's virtual-interrupt hardware as the kernel needs it (SVM: V_IRQ and EVENTINJ).
/// The offered slot holds ONE vector, taken by the guest without an exit when its
/// RFLAGS.IF allows; the injection slot delivers an event at the next entry whatever IF
/// says, so the kernel uses it only when the guest could take an interrupt anyway.
pub trait VirqHardware {
    /// The vector offered and not yet taken (V_IRQ set), if any.
    fn virq_offered(&mut self, v: VcpuId) -> Option<u8>;
    /// Offer `vector` (the slot must be free).
    fn virq_offer(&mut self, v: VcpuId, vector: u8);
    /// The guest would take an interrupt at its next instruction: RFLAGS.IF set, no
    /// interrupt shadow (STI, MOV SS), and no event already waiting to be injected.
    fn virq_injectable(&mut self, v: VcpuId) -> bool;
    /// Deliver external interrupt `vector` at the next entry (EVENTINJ).
    fn virq_inject(&mut self, v: VcpuId, vector: u8);
    /// Exit (`Exit::InterruptWindow`) when the guest is about to take the offered vector
    /// (SVM: the VINTR intercept), or no longer.
    fn virq_window(&mut self, v: VcpuId, on: bool);
    /// The HLT that just exited may have been preceded by an interrupt the guest should
    /// have taken after it (an entry that dropped the interrupt shadow over it: QEMU's
    /// VMRUN, see `svm/hw.rs`): it must not sleep. Hardware that honours the shadow: never.
    fn hlt_woken(&mut self, _v: VcpuId) -> bool {
        false
    }
}

impl<F: Stage2Format> Kernel<F> {
    /// Before entering `v`: hand its pending virtual interrupts to the hardware. The
    /// lowest goes into the offered slot if that is free. A second one is injected when
    /// the guest could take an interrupt now, else an exit is requested for the moment it
    /// can: otherwise it would wait, with the guest running and interruptible, until the
    /// guest's next exit (after taking the first vector, a guest that looks at what
    /// arrived sees only the first: a late wake-up, which the wake-up model in
    /// `wakeup_model.rs` finds without this).
    #[inline(always)]
    pub fn deliver_irqs<H: VirqHardware>(&mut self, h: &mut H, v: VcpuId) {
        if self.vcpus[v as usize].has_irq() {
            self.deliver_pending(h, v);
        }
    }

    #[inline(never)]
    fn deliver_pending<H: VirqHardware>(&mut self, h: &mut H, v: VcpuId) {
        let vcpu = &mut self.vcpus[v as usize];
        #[cfg(feature = "counts")]
        let mut handed = 0;
        match h.virq_offered(v) {
            // The same vector again before the guest took it: one request, as a local
            // APIC's IRR bit holds one (a second edge on a requested vector merges).
            Some(offered) => vcpu.pending_irqs[offered as usize / 64] &= !(1 << (offered % 64)),
            None => {
                if let Some(vector) = vcpu.take_irq() {
                    h.virq_offer(v, vector);
                    #[cfg(feature = "counts")]
                    {
                        handed += 1;
                    }
                }
            }
        }
        if vcpu.has_irq() && h.virq_injectable(v) {
            if let Some(vector) = vcpu.take_irq() {
                h.virq_inject(v, vector);
                #[cfg(feature = "counts")]
                {
                    handed += 1;
                }
            }
        }
        // Still more (the guest cannot take an interrupt now, or a third vector): exit
        // when it is about to take the offered one, and inject the next then. Without
        // this, a guest that takes the offered vector and looks at what arrived (the timer)
        // finds the next one's work (a doorbell) without its interrupt: a late wake-up.
        if vcpu.has_irq() {
            h.virq_window(v, true);
        }
        #[cfg(feature = "counts")]
        {
            let d = vcpu.domain as usize;
            self.domains[d].counts.virqs += handed;
        }
    }

    /// `v` exited because it was about to take its offered vector (the window requested
    /// by [`Self::deliver_irqs`]): no more such exits until the next request; the entry
    /// after this injects what is pending.
    pub fn interrupt_window_exit<H: VirqHardware>(&mut self, h: &mut H, v: VcpuId) {
        h.virq_window(v, false);
    }

    /// The running vCPU `v` executed HLT (already completed: RIP past it, shadow over). It
    /// sleeps unless a virtual interrupt is offered (the guest did STI; HLT with STI's
    /// shadow covering the HLT: it takes the interrupt as soon as it resumes) or pending.
    pub fn hlt_exit<H: VirqHardware>(&mut self, h: &mut H, v: VcpuId) {
        if h.virq_offered(v).is_none() && !h.hlt_woken(v) {
            self.halt(v);
        }
    }

    fn notification_of(&self, v: VcpuId, slot: u64, right: u64) -> Result<(NotificationId, u64), Error> {
        let cap = self.lookup(self.vcpus[v as usize].domain, slot, right)?;
        match cap.object {
            Object::Notification(n) => Ok((n, cap.badge)),
            _ => Err(Error::WrongType),
        }
    }

    pub fn signal(&mut self, v: VcpuId, slot: u64, bits: u64) -> Result<(), Error> {
        let (n, badge) = self.notification_of(v, slot, rights::SIGNAL)?;
        if let Some(w) = self.signal_by(v, n, bits, badge) {
            self.wake_from(v, w);
        }
        Ok(())
    }

    /// vCPU `v` signals `n` with `bits` (its capability's `badge` when 0), counted for its
    /// domain: the common part of `Signal`, `SignalWait` and `SignalHalt`. Returns the vCPU
    /// the signal unblocks ([`Self::signal_wake`]).
    fn signal_by(&mut self, v: VcpuId, n: NotificationId, bits: u64, badge: u64) -> Option<VcpuId> {
        let bits = if bits != 0 { bits } else { badge.max(1) };
        self.domains[self.vcpus[v as usize].domain as usize].signals += 1;
        self.signal_wake(n, bits)
    }

    /// The running vCPU blocks as `state` after its signal unblocked `woken`, which takes
    /// the CPU at once when it may ([`Self::may_run_now`]), as a called server does.
    fn block_after_signal(&mut self, state: VcpuState, woken: Option<VcpuId>) {
        self.block_current(state);
        match woken {
            Some(w) if self.may_run_now(w) => self.switch_to(w),
            Some(w) => self.make_ready(w),
            None => {}
        }
        self.schedule();
    }

    /// Set `bits` on notification `n` and wake whoever is interested (from a timer, a
    /// device interrupt or an exit: no vCPU of the signaller's to hand the CPU over from).
    pub fn signal_object(&mut self, n: NotificationId, bits: u64) {
        if let Some(w) = self.signal_wake(n, bits) {
            self.make_ready(w);
        }
    }

    /// Set `bits` on `n`. Returns the vCPU the signal unblocks (a waiter, with its result
    /// already written; a receive the notification is bound to; a vCPU halted with the
    /// notification bound to one of its vectors), which the caller must make runnable.
    fn signal_wake(&mut self, n: NotificationId, bits: u64) -> Option<VcpuId> {
        self.stats.signals += 1;
        let ntf = &mut self.notifications[n as usize];
        ntf.bits |= bits;
        if let Some(w) = ntf.waiter.take() {
            let taken = core::mem::take(&mut ntf.bits);
            let r = &mut self.vcpus[w as usize].regs;
            r.rdi = taken;
            r.rax = 0;
            return Some(w);
        }
        match ntf.bound {
            // Bound to a receive: wake it if it waits, else the bits wait for the next one.
            Some((target, 0)) => {
                let VcpuState::BlockedRecv(e) = self.vcpus[target as usize].state else {
                    // Any of the notifications bound to its receive may hold bits now: the
                    // next receive looks at them all ([`Self::take_bound_bits`]).
                    self.vcpus[target as usize].recv_bits_waiting = true;
                    return None;
                };
                self.endpoints[e as usize].receivers.remove(target, &mut self.next);
                let bits = core::mem::take(&mut self.notifications[n as usize].bits);
                let r = &mut self.vcpus[target as usize].regs;
                (r.rax, r.rbx, r.rcx, r.rdi) = (0, ipc_spec::hypercall::NOTIFICATION_BADGE, 0, bits);
                Some(target)
            }
            // Bound to a vector: pending until the vCPU is entered ([`Self::deliver_irqs`]);
            // a halted vCPU wakes.
            Some((target, vector)) => {
                let vcpu = &mut self.vcpus[target as usize];
                vcpu.pending_irqs[vector as usize / 64] |= 1 << (vector % 64);
                (vcpu.state == VcpuState::Halted).then_some(target)
            }
            None => None,
        }
    }

    /// The fast path of a wake-up by the running vCPU `v`'s signal: a woken `w` of higher
    /// or equal priority runs at once, as a called server does, without a trip through
    /// the run queue; `v` stays ready (behind its equals). A lower priority is only made
    /// ready.
    fn wake_from(&mut self, v: VcpuId, w: VcpuId) {
        let prio = self.vcpus[v as usize].priority;
        if self.current != Some(v) || self.vcpus[w as usize].priority < prio || !self.may_run_now(w) {
            self.make_ready(w);
            return;
        }
        self.vcpus[v as usize].state = VcpuState::Ready;
        self.runq.push(v, prio, &mut self.next);
        self.switch_to(w);
    }

    /// May the woken `w` take the CPU at once: its VM is not paused and no ready vCPU
    /// outranks it?
    fn may_run_now(&self, w: VcpuId) -> bool {
        let wv = &self.vcpus[w as usize];
        let parked = wv.vm && self.domains[wv.domain as usize].paused;
        !parked && self.runq.highest().is_none_or(|h| h <= wv.priority)
    }

    /// Fast path of `SignalWait`, the doorbell ping-pong's common case: the peer waits on
    /// the notification signalled (explicit bits), nothing is pending on the one waited
    /// on, and no ready vCPU outranks the peer. Straight-line: hand the peer the bits,
    /// block, switch. Returns false (having changed nothing) when the general path must
    /// run. Like `call_fast`, it masks identifiers to drop bounds checks.
    #[inline(always)]
    pub(super) fn signal_wait_fast(&mut self, v: VcpuId, slot: u64) -> bool {
        let vi = v as usize & (MAX_VCPUS - 1);
        let d = self.vcpus[vi].domain as usize & (MAX_DOMAINS - 1);
        let (bits, wait_slot) = {
            let r = &self.vcpus[vi].regs;
            (r.rdi, r.rsi)
        };
        let caps = &self.domains[d].caps;
        let (Some(sc), Some(wc)) = (caps.get_raw(slot), caps.get_raw(wait_slot)) else { return false };
        let (Object::Notification(n), Object::Notification(m)) = (sc.object, wc.object) else { return false };
        if sc.rights & rights::SIGNAL == 0 || wc.rights & rights::WAIT == 0 || bits == 0 || n == m {
            return false;
        }
        let (ni, mi) = (n as usize & (MAX_NOTIFICATIONS - 1), m as usize & (MAX_NOTIFICATIONS - 1));
        let Some(w) = self.notifications[ni].waiter else { return false };
        if self.notifications[mi].bits != 0 || self.notifications[mi].waiter.is_some() {
            return false;
        }
        let wi = w as usize & (MAX_VCPUS - 1);
        if self.runq.highest().is_some_and(|h| h > self.vcpus[wi].priority) {
            return false;
        }
        // (A waiter is never a VM's vCPU, which makes no hypercalls: no pause to honour.)
        let taken = core::mem::take(&mut self.notifications[ni].bits) | bits;
        self.notifications[ni].waiter = None;
        self.notifications[mi].waiter = Some(v);
        let peer = &mut self.vcpus[wi];
        (peer.regs.rdi, peer.regs.rax) = (taken, 0);
        peer.state = VcpuState::Running;
        self.vcpus[vi].state = VcpuState::BlockedWait(m);
        self.current = Some(w);
        self.stats.signals += 1;
        self.domains[d].signals += 1;
        true
    }

    /// `SignalWait`: signal one notification and wait on another in one hypercall (a
    /// doorbell ping-pong costs one exit per side). Both capabilities are checked before
    /// anything changes. If the wait blocks, the CPU goes straight to the woken vCPU when
    /// no ready one outranks it.
    pub fn signal_wait(&mut self, v: VcpuId, slot: u64, bits: u64, wait_slot: u64) -> Result<(), Error> {
        let (n, badge) = self.notification_of(v, slot, rights::SIGNAL)?;
        let (m, _) = self.notification_of(v, wait_slot, rights::WAIT)?;
        // One waiter at a time. (A waiter on `m` with `m == n` is woken by this very
        // signal, and the caller takes its place.)
        if n != m && self.notifications[m as usize].waiter.is_some() {
            return Err(Error::InvalidState);
        }
        let woken = self.signal_by(v, n, bits, badge);
        let ntf = &mut self.notifications[m as usize];
        if ntf.bits != 0 {
            let r = &mut self.vcpus[v as usize].regs;
            (r.rdi, r.rax) = (core::mem::take(&mut ntf.bits), 0);
            if let Some(w) = woken {
                self.wake_from(v, w);
            }
            return Ok(());
        }
        ntf.waiter = Some(v);
        self.block_after_signal(VcpuState::BlockedWait(m), woken);
        Ok(())
    }

    /// `SignalHalt`: signal `slot`, then halt as [`Self::hlt_exit`] does (`offered`: a
    /// virtual interrupt is offered to `v` and not yet taken), in one hypercall.
    ///
    /// No wake-up is lost: the caller runs with interrupts off, so whatever was signalled
    /// to it since it last looked is pending in the kernel (`has_irq`) or offered in the
    /// hardware (`offered`), and either keeps it awake; anything signalled later finds it
    /// `Halted` and makes it ready (`signal_wake`), exactly as after a HLT. The halt is
    /// decided after the signal, so a signal to a notification bound to `v` itself counts.
    /// (Unlike HLT there is no interrupt shadow to lose: `VirqHardware::hlt_woken` is a
    /// HLT's matter.) A woken vCPU that may run now does, as in [`Self::signal_wait`].
    pub fn signal_halt(&mut self, v: VcpuId, slot: u64, bits: u64, offered: bool) -> Result<(), Error> {
        let (n, badge) = self.notification_of(v, slot, rights::SIGNAL)?;
        let woken = self.signal_by(v, n, bits, badge);
        self.vcpus[v as usize].regs.rax = 0;
        if offered || self.vcpus[v as usize].has_irq() || self.current != Some(v) {
            if let Some(w) = woken {
                self.wake_from(v, w);
            }
            return Ok(());
        }
        self.block_after_signal(VcpuState::Halted, woken);
        Ok(())
    }

    /// `Wait`: on success with no bits pending, the vCPU blocks (its result arrives with
    /// the signal).
    pub fn wait(&mut self, v: VcpuId, slot: u64) -> Result<(), Error> {
        let (n, _) = self.notification_of(v, slot, rights::WAIT)?;
        let ntf = &mut self.notifications[n as usize];
        if ntf.bits != 0 {
            self.vcpus[v as usize].regs.rdi = core::mem::take(&mut ntf.bits);
            self.vcpus[v as usize].regs.rax = 0;
            return Ok(());
        }
        if ntf.waiter.is_some() {
            return Err(Error::InvalidState);
        }
        ntf.waiter = Some(v);
        self.block_current(VcpuState::BlockedWait(n));
        self.schedule();
        Ok(())
    }

    pub fn poll(&mut self, v: VcpuId, slot: u64) -> Result<u64, Error> {
        let (n, _) = self.notification_of(v, slot, rights::WAIT)?;
        Ok(core::mem::take(&mut self.notifications[n as usize].bits))
    }

    /// Deliver notification `slot` to `v` as virtual interrupt `vector`, or (vector 0) to
    /// its receive.
    pub fn bind(&mut self, v: VcpuId, slot: u64, vector: u64) -> Result<(), Error> {
        let (n, _) = self.notification_of(v, slot, rights::WAIT)?;
        let vector = u8::try_from(vector).ok().filter(|&x| x >= 32 || x == 0).ok_or(Error::InvalidArgument)?;
        self.notifications[n as usize].bound = Some((v, vector));
        if vector == 0 {
            self.vcpus[v as usize].recv_bits_waiting |= self.notifications[n as usize].bits != 0;
        }
        Ok(())
    }

    pub fn timer_set(&mut self, v: VcpuId, slot: u64, ns: u64, bits: u64, now: u64) -> Result<(), Error> {
        let (n, _) = self.notification_of(v, slot, rights::WAIT)?;
        self.notifications[n as usize].timer = if ns == 0 { None } else { Some((now.saturating_add(ns), bits.max(1))) };
        Ok(())
    }

    pub(crate) fn fire_timers(&mut self, now: u64) {
        for n in 0..self.notifications.len() {
            if let Some((deadline, bits)) = self.notifications[n].timer {
                if deadline <= now {
                    self.notifications[n].timer = None;
                    self.signal_object(n as NotificationId, bits);
                }
            }
        }
    }
}

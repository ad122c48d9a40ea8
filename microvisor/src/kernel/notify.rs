//! Notifications: asynchronous bits with a wake-up. A waiter takes the bits; a bound vCPU
//! gets a virtual interrupt (and leaves HLT). Virtual timers signal a notification once
//! their deadline passes.

use ipc_spec::hypercall::rights;
use ipc_spec::Error;

use super::caps::Object;
use super::{Kernel, NotificationId, VcpuId, VcpuState};
use crate::stage2::Stage2Format;

impl<F: Stage2Format> Kernel<F> {
    fn notification_of(&self, v: VcpuId, slot: u64, right: u64) -> Result<(NotificationId, u64), Error> {
        let cap = self.lookup(self.vcpus[v as usize].domain, slot, right)?;
        match cap.object {
            Object::Notification(n) => Ok((n, cap.badge)),
            _ => Err(Error::WrongType),
        }
    }

    pub fn signal(&mut self, v: VcpuId, slot: u64, bits: u64) -> Result<(), Error> {
        let (n, badge) = self.notification_of(v, slot, rights::SIGNAL)?;
        let bits = if bits != 0 { bits } else { badge.max(1) };
        self.domains[self.vcpus[v as usize].domain as usize].signals += 1;
        self.signal_object(n, bits);
        Ok(())
    }

    /// Set `bits` on notification `n` and wake whoever is interested.
    pub fn signal_object(&mut self, n: NotificationId, bits: u64) {
        self.stats.signals += 1;
        let ntf = &mut self.notifications[n as usize];
        ntf.bits |= bits;
        if let Some(w) = ntf.waiter.take() {
            let taken = core::mem::take(&mut ntf.bits);
            let r = &mut self.vcpus[w as usize].regs;
            r.rdi = taken;
            r.rax = 0;
            self.make_ready(w);
        } else if let Some((target, 0)) = ntf.bound {
            // Bound to a receive: wake it if it waits, else the bits wait for the next one.
            if let VcpuState::BlockedRecv(e) = self.vcpus[target as usize].state {
                self.endpoints[e as usize].receivers.remove(target, &mut self.next);
                let bits = core::mem::take(&mut self.notifications[n as usize].bits);
                let r = &mut self.vcpus[target as usize].regs;
                (r.rax, r.rbx, r.rcx, r.rdi) = (0, ipc_spec::hypercall::NOTIFICATION_BADGE, 0, bits);
                self.make_ready(target);
            }
        } else if let Some((target, vector)) = ntf.bound {
            let vcpu = &mut self.vcpus[target as usize];
            vcpu.pending_irqs[vector as usize / 64] |= 1 << (vector % 64);
            if vcpu.state == VcpuState::Halted {
                self.make_ready(target);
            }
        }
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
            self.vcpus[v as usize].recv_notification = Some(n);
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

//! Exits as messages (the ABI is `ipc_spec::exit`): an exit the microvisor does not handle
//! itself makes the vCPU "call" its domain's exit endpoint; the handler's reply says how it
//! goes on. And what a VMM needs besides: its VM's RAM in view, interrupt injection, pause.

use ipc_spec::exit::{
    default_state, ExitMessage, ExitReply, VcpuState as ArchState, MESSAGE_WORDS_WITH_STATE, STATE_WORDS,
};
use ipc_spec::hypercall::{rights, NOTIFICATION_BADGE, REGISTER_WORDS};
use ipc_spec::Error;

use super::caps::Object;
use super::{DomainId, Kernel, PendingExit, Platform, VcpuId, VcpuState, MAX_VCPUS, RAM_CHUNK};
use crate::stage2::{Access, MemType, Stage2Format};

impl<F: Stage2Format> Kernel<F> {
    /// The running vCPU `v` exited for something its domain's exit handler decides. With a
    /// handler, the exit becomes a message to it and `v` waits for the verdict (true).
    /// Without one, `v` stops (false).
    pub fn exit<P: Platform>(&mut self, p: &mut P, v: VcpuId, x: PendingExit) -> bool {
        let d = self.vcpus[v as usize].domain;
        match self.domains[d as usize].fault_handler {
            Some((e, badge)) if self.endpoints[e as usize].refs > 0 => {
                self.vcpus[v as usize].exit = Some(x);
                self.vcpus[v as usize].send_badge = badge;
                if self.send(p, v, e).is_ok() {
                    return true;
                }
                self.vcpus[v as usize].exit = None;
                self.stop_vcpu(v);
                false
            }
            _ => {
                self.stop_vcpu(v);
                false
            }
        }
    }

    /// The register words and length of `from`'s exit message to handler `to`. The state
    /// groups it carries go straight into the handler's message page (none without one).
    pub(super) fn exit_message<P: Platform>(
        &mut self,
        p: &mut P,
        from: VcpuId,
        x: PendingExit,
        to: VcpuId,
    ) -> ([u64; REGISTER_WORDS], u64) {
        let d = self.vcpus[from as usize].domain;
        let page = self.vcpus[to as usize].msg_page;
        let mask = if page.is_some() { default_state(x.kind) | self.domains[d as usize].exit_state } else { 0 };
        let mut len = REGISTER_WORDS as u64;
        if let (Some(page), true) = (page, mask != 0) {
            let mut st = ArchState::default();
            p.vcpu_state(from, &mut self.vcpus[from as usize].regs, &mut st);
            let mut words = [0u64; STATE_WORDS];
            st.to_words(mask, &mut words);
            let mut bytes = [0u8; STATE_WORDS * 8];
            for (chunk, w) in bytes.chunks_exact_mut(8).zip(words) {
                chunk.copy_from_slice(&w.to_le_bytes());
            }
            p.write_phys(page, &bytes);
            len = MESSAGE_WORDS_WITH_STATE as u64;
        }
        let vc = &self.vcpus[from as usize];
        let m = ExitMessage {
            kind: x.kind,
            vcpu: vc.index_in_domain,
            insn_len: x.insn_len,
            state: mask,
            rip: vc.regs.rip,
            a: x.a,
            b: x.b,
            rax: vc.regs.rax,
        };
        (m.encode(), len)
    }

    /// The reply handler `server` gives to exit `x`, checked whole: an error changes nothing.
    pub(super) fn check_exit_reply(&self, server: VcpuId, x: PendingExit) -> Result<ExitReply, Error> {
        let r = &self.vcpus[server as usize].regs;
        let reply = ExitReply::decode(&r.message())?;
        if reply.write_state != 0 && self.vcpus[server as usize].msg_page.is_none() {
            return Err(Error::NoMessagePage);
        }
        // Advancing past an instruction of unknown length needs the handler to say how far.
        if reply.advance && reply.advance_by == 0 && x.insn_len == 0 {
            return Err(Error::InvalidArgument);
        }
        Ok(reply)
    }

    /// Act on a checked reply to `client`'s exit `x`; true if `client` runs again (else it
    /// is stopped, or paused with its domain).
    pub(super) fn apply_exit_reply<P: Platform>(
        &mut self,
        p: &mut P,
        client: VcpuId,
        server: VcpuId,
        x: PendingExit,
        reply: &ExitReply,
    ) -> bool {
        let ci = client as usize;
        // DomainExit is final, whatever the answer.
        if !reply.resume || !x.kind.awaits_reply() {
            self.vcpus[ci].state = VcpuState::Stopped;
            return false;
        }
        if reply.write_state != 0 {
            if let Some(page) = self.vcpus[server as usize].msg_page {
                let mut bytes = [0u8; STATE_WORDS * 8];
                p.read_phys(page, &mut bytes);
                let mut words = [0u64; STATE_WORDS];
                for (w, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
                    *w = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
                }
                let mut st = ArchState::default();
                st.from_words(reply.write_state, &words);
                p.vcpu_set_state(client, &mut self.vcpus[ci].regs, reply.write_state, &st);
            }
        }
        let regs = &mut self.vcpus[ci].regs;
        for (i, reg) in [&mut regs.rax, &mut regs.rcx, &mut regs.rdx, &mut regs.rbx].into_iter().enumerate() {
            if reply.set & (1 << i) != 0 {
                *reg = reply.values[i];
            }
        }
        if reply.advance {
            let len = if reply.advance_by != 0 { reply.advance_by } else { x.insn_len };
            p.vcpu_complete(client, regs, len);
        }
        if let Some(event) = reply.inject {
            p.vcpu_inject(client, event);
        }
        if self.domains[self.vcpus[ci].domain as usize].paused {
            self.vcpus[ci].state = VcpuState::Paused;
            return false;
        }
        true
    }

    /// A VM in the caller's `slot` (right VMM).
    fn vm_of(&self, caller: DomainId, slot: u64) -> Result<DomainId, Error> {
        match self.lookup(caller, slot, rights::VMM)?.object {
            Object::Domain(d, _) if self.domains[d as usize].vm => Ok(d),
            Object::Domain(..) => Err(Error::InvalidState),
            _ => Err(Error::WrongType),
        }
    }

    /// `DomainMapRam`: all of the VM's RAM, read-write, at `gpa` in the caller's stage-2.
    pub fn map_vm_ram<P: Platform>(&mut self, p: &mut P, caller: DomainId, slot: u64, gpa: u64) -> Result<(), Error> {
        let vm = self.vm_of(caller, slot)?;
        if vm == caller || !gpa.is_multiple_of(RAM_CHUNK) || gpa < self.domains[caller as usize].ram_size() {
            return Err(Error::InvalidArgument);
        }
        if self.domains[caller as usize].ram_view.is_some() {
            return Err(Error::AlreadyMapped);
        }
        let ram = self.domains[vm as usize].ram.clone();
        let stage2 = self.domains[caller as usize].stage2.as_mut().ok_or(Error::InvalidState)?;
        for (i, &hpa) in ram.iter().enumerate() {
            let at = gpa.checked_add(i as u64 * RAM_CHUNK).ok_or(Error::InvalidArgument);
            let mapped = at.and_then(|at| {
                stage2
                    .map(p, at, hpa, RAM_CHUNK, Access::READ | Access::WRITE, MemType::WriteBack)
                    .map_err(super::stage2_error)
            });
            if let Err(e) = mapped {
                if i > 0 {
                    let _ = stage2.unmap(p, gpa, i as u64 * RAM_CHUNK);
                    p.stage2_changed(caller);
                }
                return Err(e);
            }
        }
        self.domains[caller as usize].ram_view = Some((vm, gpa));
        Ok(())
    }

    /// Domain `d` is going: its RAM leaves the view of every VMM that maps it.
    pub(super) fn drop_ram_views<P: Platform>(&mut self, p: &mut P, d: DomainId) {
        let size = self.domains[d as usize].ram_size();
        self.domains[d as usize].ram_view = None;
        for x in 0..self.domains.len() {
            if let Some((vm, gpa)) = self.domains[x].ram_view {
                if vm == d {
                    if let Some(s) = self.domains[x].stage2.as_mut() {
                        let _ = s.unmap(p, gpa, size);
                    }
                    self.domains[x].ram_view = None;
                    p.stage2_changed(x as DomainId);
                }
            }
        }
    }

    /// `VcpuInject`: vector pending on a VM's vCPU, taken when the guest can; wakes HLT.
    pub fn inject(&mut self, caller: DomainId, slot: u64, vector: u64) -> Result<(), Error> {
        let t = self.lookup_vcpu(caller, slot)?;
        if !self.domains[self.vcpus[t as usize].domain as usize].vm {
            return Err(Error::InvalidState);
        }
        let vector = u8::try_from(vector).ok().filter(|&x| x >= 32).ok_or(Error::InvalidArgument)?;
        let vcpu = &mut self.vcpus[t as usize];
        vcpu.pending_irqs[vector as usize / 64] |= 1 << (vector % 64);
        if vcpu.state == VcpuState::Halted {
            self.make_ready(t);
        }
        Ok(())
    }

    /// `DomainPause`: stop (`pause`) or resume every vCPU of a VM.
    pub fn pause(&mut self, caller: DomainId, slot: u64, pause: u64) -> Result<(), Error> {
        let d = self.vm_of(caller, slot)?;
        let pause = match pause {
            0 => false,
            1 => true,
            _ => return Err(Error::InvalidArgument),
        };
        self.domains[d as usize].paused = pause;
        for v in 0..MAX_VCPUS {
            let vc = &self.vcpus[v];
            if vc.domain != d || vc.state == VcpuState::Free {
                continue;
            }
            match (pause, vc.state) {
                (true, VcpuState::Ready) => {
                    let prio = vc.priority;
                    self.runq.remove(v as VcpuId, prio, &mut self.next);
                    self.vcpus[v].state = VcpuState::Paused;
                }
                (true, VcpuState::Running) => {
                    self.block_current(VcpuState::Paused);
                    self.schedule();
                }
                (false, VcpuState::Paused) => self.make_ready(v as VcpuId),
                _ => {}
            }
        }
        Ok(())
    }

    /// A receive of `server` with a bound notification that has bits: take one's as the
    /// message (badge [`NOTIFICATION_BADGE`]). True if there were any. Every notification
    /// bound to the receive is looked at (a VMM binds its doorbells and its timer), not
    /// only the last bound: bits left on another one would wait for its next signal.
    pub(super) fn take_bound_bits(&mut self, server: VcpuId) -> bool {
        if !self.vcpus[server as usize].recv_bits_waiting {
            return false;
        }
        let Some(ntf) = self.notifications.iter_mut().find(|n| n.bound == Some((server, 0)) && n.bits != 0) else {
            self.vcpus[server as usize].recv_bits_waiting = false;
            return false;
        };
        let bits = core::mem::take(&mut ntf.bits);
        let r = &mut self.vcpus[server as usize].regs;
        (r.rax, r.rbx, r.rcx, r.rdi) = (0, NOTIFICATION_BADGE, 0, bits);
        true
    }
}

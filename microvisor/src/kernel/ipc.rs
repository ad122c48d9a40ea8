//! Synchronous IPC: call, receive, reply-and-receive, and fault messages.
//!
//! A call that finds a server waiting switches to it directly (no run-queue round trip):
//! the message moves register to register and the server holds a one-shot reply to the
//! caller. A call with no server waiting queues the caller on the endpoint; its message
//! stays in its registers until a server takes it. Exits travel the same way: the exiting
//! vCPU "calls" its domain's exit endpoint with a message built from the exit (`exits.rs`).

use ipc_spec::hypercall::{rights, MAX_MESSAGE_WORDS, REGISTER_WORDS};
use ipc_spec::Error;

use super::caps::Object;
use super::{EndpointId, Kernel, Platform, VcpuId, VcpuState, MAX_DOMAINS, MAX_ENDPOINTS, MAX_VCPUS, PAGE};
use crate::stage2::Stage2Format;

impl<F: Stage2Format> Kernel<F> {
    /// Is `client` waiting for `server`'s answer (to a call or to an exit message)?
    pub(crate) fn awaits_reply_from(&self, client: VcpuId, server: VcpuId) -> bool {
        matches!(self.vcpus[client as usize].state,
            VcpuState::BlockedReply(s) | VcpuState::BlockedFault(s) if s == server)
    }

    /// The state of a sender whose message `server` now holds.
    fn awaiting(&self, sender: VcpuId, server: VcpuId) -> VcpuState {
        if self.vcpus[sender as usize].exit.is_some() {
            VcpuState::BlockedFault(server)
        } else {
            VcpuState::BlockedReply(server)
        }
    }

    /// A blocked vCPU's IPC fails with `err`: it runs again with that status. A vCPU whose
    /// exit message cannot be delivered stops instead.
    pub(crate) fn fail_ipc(&mut self, v: VcpuId, err: Error) {
        let woken = self.fail_ipc_deferred(v, err);
        self.preempt_for(woken);
    }

    /// `fail_ipc` in the middle of an IPC operation, which goes on acting on the running
    /// vCPU: `v` is queued but does not preempt yet (the operation ends with
    /// [`Self::preempt_for`]). Returns `v`'s priority if it became ready.
    fn fail_ipc_deferred(&mut self, v: VcpuId, err: Error) -> Option<u8> {
        let vcpu = &mut self.vcpus[v as usize];
        if vcpu.exit.take().is_some() {
            vcpu.state = VcpuState::Stopped;
            return None;
        }
        vcpu.regs.rax = err.code();
        vcpu.state = VcpuState::Ready;
        let prio = vcpu.priority;
        self.runq.push(v, prio, &mut self.next);
        Some(prio)
    }

    /// A vCPU of priority `woken` became ready: it takes the CPU from a lower priority.
    pub(super) fn preempt_for(&mut self, woken: Option<u8>) {
        if let (Some(prio), Some(c)) = (woken, self.current) {
            if prio > self.vcpus[c as usize].priority {
                self.preempt();
            }
        }
    }

    /// Move a message from `from` (its registers, message page, or pending exit) to `to`.
    fn transfer<P: Platform>(&mut self, p: &mut P, from: VcpuId, to: VcpuId, badge: u64) -> Result<(), Error> {
        // (An exit message's state groups went straight into the receiver's page.)
        let (words, len) = match self.vcpus[from as usize].exit {
            Some(x) => self.exit_message(p, from, x, to),
            None => (self.vcpus[from as usize].regs.message(), self.vcpus[from as usize].regs.rcx),
        };
        if len > MAX_MESSAGE_WORDS as u64 {
            return Err(Error::InvalidArgument);
        }
        if len > REGISTER_WORDS as u64 && self.vcpus[from as usize].exit.is_none() {
            let src = &self.vcpus[from as usize];
            let (Some(sp), Some(dp)) = (src.msg_page, self.vcpus[to as usize].msg_page) else {
                return Err(Error::NoMessagePage);
            };
            let bytes = (len as usize - REGISTER_WORDS) * 8;
            let mut buf = [0u8; PAGE as usize];
            p.read_phys(sp, &mut buf[..bytes]);
            p.write_phys(dp, &buf[..bytes]);
        }
        self.vcpus[to as usize].regs.deliver(words, len, badge);
        Ok(())
    }

    /// The endpoint (and badge) in the caller's `slot`. Endpoints never go stale (they are
    /// reference-counted), so this is a plain table read: it is on every IPC.
    #[inline]
    fn endpoint_of(&self, caller: VcpuId, slot: u64, right: u64) -> Result<(EndpointId, u64), Error> {
        let cap = self.domains[self.vcpus[caller as usize].domain as usize].caps.get_ref(slot)?;
        match cap.object {
            Object::Endpoint(e) if cap.rights & right == right => Ok((e, cap.badge)),
            Object::Endpoint(_) => Err(Error::PermissionDenied),
            _ => Err(Error::WrongType),
        }
    }

    /// Fast path of `Call`: a server already waits on the endpoint and the message fits in
    /// registers. Straight-line: copy six words, hand the server the reply, switch. Returns
    /// false (having changed nothing) when the general path must run.
    #[inline(always)]
    fn call_fast(&mut self, caller: VcpuId, slot: u64) -> bool {
        // Identifiers the kernel handed out are always in range; masking (the tables are
        // powers of two) lets the compiler drop the bounds checks on this path.
        let ci = caller as usize & (MAX_VCPUS - 1);
        let d = self.vcpus[ci].domain as usize & (MAX_DOMAINS - 1);
        let Some(cap) = self.domains[d].caps.get_raw(slot) else { return false };
        let (Object::Endpoint(e), badge) = (cap.object, cap.badge) else { return false };
        let len = self.vcpus[ci].regs.rcx;
        if cap.rights & rights::CALL == 0 || len > REGISTER_WORDS as u64 {
            return false;
        }
        let ep = &mut self.endpoints[e as usize & (MAX_ENDPOINTS - 1)];
        let Some(server) = ep.receivers.head else { return false };
        let si = server as usize & (MAX_VCPUS - 1);
        // Unlink the head. Its own link is left stale: every push overwrites it, and
        // `tail` only matters while `head` is set.
        ep.receivers.head = self.next[si];
        let words = self.vcpus[ci].regs.message();
        self.vcpus[ci].state = VcpuState::BlockedReply(server);
        let s = &mut self.vcpus[si];
        s.regs.deliver(words, len, badge);
        s.reply_to = Some(caller);
        s.state = VcpuState::Running;
        self.current = Some(server);
        self.stats.ipc_calls += 1;
        self.domains[d].ipc_calls += 1;
        true
    }

    /// Fast path of `ReplyRecv`: the caller waits for this reply, nobody else is queued on
    /// the endpoint, the reply fits in registers: answer, wait, switch back to the caller.
    #[inline(always)]
    fn reply_recv_fast(&mut self, server: VcpuId, slot: u64) -> bool {
        let si = server as usize & (MAX_VCPUS - 1);
        let d = self.vcpus[si].domain as usize & (MAX_DOMAINS - 1);
        let Some(cap) = self.domains[d].caps.get_raw(slot) else { return false };
        let Object::Endpoint(e) = cap.object else { return false };
        let ei = e as usize & (MAX_ENDPOINTS - 1);
        let len = self.vcpus[si].regs.rcx;
        if cap.rights & rights::RECV == 0 || len > REGISTER_WORDS as u64 {
            return false;
        }
        // Bits on a notification bound to its receive: the general path hands them over.
        if self.vcpus[si].recv_bits_waiting {
            return false;
        }
        let Some(client) = self.vcpus[si].reply_to else { return false };
        let ci = client as usize & (MAX_VCPUS - 1);
        let c = &self.vcpus[ci];
        // (A vCPU awaiting an exit verdict is BlockedFault: the general path answers it.)
        if c.state != VcpuState::BlockedReply(server) {
            return false;
        }
        if !self.endpoints[ei].senders.is_empty() {
            return false;
        }
        // The reply goes first, so nothing is live across the queue operation.
        let words = self.vcpus[si].regs.message();
        self.vcpus[ci].regs.deliver(words, len, 0);
        // `reply_to` stays as it is: it is trusted only while the client is still
        // BlockedReply(server), which ends right here.
        self.vcpus[si].state = VcpuState::BlockedRecv(e);
        self.endpoints[ei].receivers.push(server, &mut self.next);
        let c = &mut self.vcpus[ci];
        c.state = VcpuState::Running;
        self.current = Some(client);
        true
    }

    /// `Call`: on success the caller is blocked (its status arrives with the reply).
    pub fn call<P: Platform>(&mut self, p: &mut P, caller: VcpuId, slot: u64) -> Result<(), Error> {
        if self.call_fast(caller, slot) {
            return Ok(());
        }
        let (e, badge) = self.endpoint_of(caller, slot, rights::CALL)?;
        let len = self.vcpus[caller as usize].regs.rcx;
        if len > MAX_MESSAGE_WORDS as u64 {
            return Err(Error::InvalidArgument);
        }
        if len > REGISTER_WORDS as u64 && self.vcpus[caller as usize].msg_page.is_none() {
            return Err(Error::NoMessagePage);
        }
        self.stats.ipc_calls += 1;
        self.domains[self.vcpus[caller as usize].domain as usize].ipc_calls += 1;
        self.vcpus[caller as usize].send_badge = badge;
        self.send(p, caller, e)
    }

    /// The running vCPU `sender` sends on endpoint `e` and waits for the reply.
    pub(super) fn send<P: Platform>(&mut self, p: &mut P, sender: VcpuId, e: EndpointId) -> Result<(), Error> {
        let badge = self.vcpus[sender as usize].send_badge;
        let mut woken = None;
        while let Some(server) = self.endpoints[e as usize].receivers.pop(&mut self.next) {
            match self.transfer(p, sender, server, badge) {
                Ok(()) => {
                    self.vcpus[server as usize].reply_to = Some(sender);
                    let state = self.awaiting(sender, server);
                    self.block_current(state);
                    self.switch_to(server);
                    self.preempt_for(woken);
                    return Ok(());
                }
                // This receiver cannot take the message (no message page): it fails, the
                // next one may.
                Err(Error::NoMessagePage) => woken = woken.max(self.fail_ipc_deferred(server, Error::NoMessagePage)),
                Err(err) => {
                    self.preempt_for(woken);
                    return Err(err);
                }
            }
        }
        self.block_current(VcpuState::BlockedSend(e));
        self.endpoints[e as usize].senders.push(sender, &mut self.next);
        self.schedule();
        self.preempt_for(woken);
        Ok(())
    }

    /// `Recv`: a pending reply is dropped (its caller learns the partner is gone).
    pub fn recv<P: Platform>(&mut self, p: &mut P, server: VcpuId, slot: u64) -> Result<(), Error> {
        let (e, _) = self.endpoint_of(server, slot, rights::RECV)?;
        let mut woken = None;
        if let Some(client) = self.vcpus[server as usize].reply_to.take() {
            if self.awaits_reply_from(client, server) {
                woken = self.fail_ipc_deferred(client, Error::PartnerGone);
            }
        }
        self.receive(p, server, e, &mut woken);
        self.preempt_for(woken);
        Ok(())
    }

    /// The running vCPU `server` takes the next message on `e`, or blocks for one.
    /// Returns true if it got a message (and keeps running). Senders that fail are queued
    /// to run without preempting (the caller calls `preempt_for(woken)` when done).
    fn receive<P: Platform>(&mut self, p: &mut P, server: VcpuId, e: EndpointId, woken: &mut Option<u8>) -> bool {
        if self.take_bound_bits(server) {
            return true;
        }
        while let Some(sender) = self.endpoints[e as usize].senders.pop(&mut self.next) {
            let badge = self.vcpus[sender as usize].send_badge;
            match self.transfer(p, sender, server, badge) {
                Ok(()) => {
                    self.vcpus[server as usize].reply_to = Some(sender);
                    self.vcpus[sender as usize].state = self.awaiting(sender, server);
                    return true;
                }
                Err(err) => *woken = (*woken).max(self.fail_ipc_deferred(sender, err)),
            }
        }
        self.block_current(VcpuState::BlockedRecv(e));
        self.endpoints[e as usize].receivers.push(server, &mut self.next);
        false
    }

    /// `ReplyRecv`: answer the pending caller, then wait for the next message. When no
    /// other message is waiting, the CPU goes straight back to the caller.
    pub fn reply_recv<P: Platform>(&mut self, p: &mut P, server: VcpuId, slot: u64) -> Result<(), Error> {
        if self.reply_recv_fast(server, slot) {
            return Ok(());
        }
        let (e, _) = self.endpoint_of(server, slot, rights::RECV)?;
        let len = self.vcpus[server as usize].regs.rcx;
        if len > MAX_MESSAGE_WORDS as u64 {
            return Err(Error::InvalidArgument);
        }
        let mut resume_client = None;
        let mut woken = None;
        if let Some(client) = self.vcpus[server as usize].reply_to.take() {
            if self.awaits_reply_from(client, server) {
                if let Some(x) = self.vcpus[client as usize].exit {
                    // Answer to an exit: checked whole before anything changes, so a bad
                    // reply leaves the exit pending for a better one.
                    let reply = match self.check_exit_reply(server, x) {
                        Ok(r) => r,
                        Err(e) => {
                            self.vcpus[server as usize].reply_to = Some(client);
                            return Err(e);
                        }
                    };
                    self.vcpus[client as usize].exit = None;
                    if self.apply_exit_reply(p, client, server, x, &reply) {
                        resume_client = Some(client);
                    }
                } else {
                    match self.transfer(p, server, client, 0) {
                        Ok(()) => resume_client = Some(client),
                        Err(err) => woken = self.fail_ipc_deferred(client, err),
                    }
                }
            }
        }
        if self.receive(p, server, e, &mut woken) {
            if let Some(c) = resume_client {
                self.make_ready(c);
            }
        } else {
            match resume_client {
                Some(c) => self.switch_to(c),
                None => self.schedule(),
            }
        }
        self.preempt_for(woken);
        Ok(())
    }
}

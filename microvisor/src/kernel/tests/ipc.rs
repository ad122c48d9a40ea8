//! Kernel tests: IPC: calls, replies, long messages.

use super::*;

/// dom0 plus a server domain holding a RECV copy of dom0's endpoint at its slot 0.
pub(super) struct Ipc {
    pub(super) s: Sys,
    /// dom0's endpoint slot (all rights) and the endpoint.
    pub(super) e: u64,
    pub(super) ep: EndpointId,
    pub(super) sd: DomainId,
    pub(super) sdslot: u64,
    pub(super) vs: VcpuId,
}

pub(super) fn ipc_setup(server_prio: u8) -> Ipc {
    let mut s = boot();
    let e = s.endpoint();
    let ep = s.endpoint_id(s.d0, e);
    let (sd, sdslot) = s.create_domain("server", MIB2, server_prio);
    let (vs, vslot) = s.create_vcpu(sdslot, false);
    assert_eq!(s.copy(e, sdslot, rights::RECV, 0), Ok(0));
    assert_eq!(s.hc(s.v0, Hypercall::VcpuStart, vslot, &[]), Ok(0));
    // A higher-priority vCPU runs at once.
    assert_eq!(s.k.current, Some(if server_prio > DOM0_PRIO { vs } else { s.v0 }));
    Ipc { s, e, ep, sd, sdslot, vs }
}

impl Ipc {
    /// The server waits for a message; afterwards dom0 runs.
    pub(super) fn server_waits(&mut self) {
        let vs = self.vs;
        self.s.switch(vs);
        self.s.raw(vs, Hypercall::Recv.number(), 0, 0, [0; 6]);
        assert_eq!(self.s.state(vs), VcpuState::BlockedRecv(self.ep));
        self.s.k.schedule();
        self.s.switch(self.s.v0);
    }
}

#[test]
fn call_switches_directly_to_the_server_and_reply_comes_back() {
    let mut t = ipc_setup(DOM0_PRIO);
    let (v0, vs) = (t.s.v0, t.vs);
    let badged = t.s.copy(t.e, dom0_slots::SELF_DOMAIN, rights::CALL, 0x77).unwrap();
    t.server_waits();
    assert_eq!(t.s.k.current, Some(v0));
    assert_eq!(t.s.raw(v0, Hypercall::Call.number(), badged, 6, [1, 2, 3, 4, 5, 6]), None);
    assert_eq!(t.s.k.current, Some(vs), "direct switch to the waiting server");
    assert_eq!(t.s.state(v0), VcpuState::BlockedReply(vs));
    assert_eq!(t.s.k.vcpus[vs as usize].reply_to, Some(v0));
    let r = t.s.regs(vs);
    assert_eq!((r.rax, r.rbx, r.rcx, words(&r)), (0, 0x77, 6, [1, 2, 3, 4, 5, 6]));
    assert!(t.s.pending(v0, Hypercall::Call));
    assert_eq!(t.s.k.runq.highest(), None, "nobody went through the run queue");
    check_invariants(&t.s.k);
    t.s.raw(vs, Hypercall::ReplyRecv.number(), 0, 2, [10, 20, 30, 0, 0, 0]);
    assert_eq!(t.s.k.current, Some(v0), "direct switch back to the caller");
    assert_eq!(t.s.state(vs), VcpuState::BlockedRecv(t.ep));
    let r = t.s.regs(v0);
    assert_eq!((r.rax, r.rbx, r.rcx), (0, 0, 2));
    assert_eq!(words(&r), [10, 20, 30, 0, 0, 0], "all six registers travel, RCX says how many count");
    assert_eq!(t.s.k.stats.ipc_calls, 1);
    // Unbadged capability: badge 0. Length 0.
    t.s.raw(v0, Hypercall::Call.number(), t.e, 0, [9; 6]);
    let r = t.s.regs(vs);
    assert_eq!((r.rbx, r.rcx, r.rdi), (0, 0, 9));
    t.s.raw(vs, Hypercall::ReplyRecv.number(), 0, 0, [0; 6]);
    assert_eq!(t.s.status(v0), Ok(0));
    check_invariants(&t.s.k);
}

#[test]
fn queued_callers_are_served_in_fifo_order() {
    let mut t = ipc_setup(DOM0_PRIO);
    let (v0, vs) = (t.s.v0, t.vs);
    let mut clients = vec![];
    for i in 1..=3u64 {
        let (_, dslot) = t.s.create_domain(&format!("client{i}"), MIB2, DOM0_PRIO);
        let (v, _) = t.s.create_vcpu(dslot, true);
        assert_eq!(t.s.copy(t.e, dslot, rights::CALL, i), Ok(0));
        clients.push(v);
    }
    let mine = t.s.copy(t.e, dom0_slots::SELF_DOMAIN, rights::CALL, 4).unwrap();
    // The server is busy (not receiving): everyone queues.
    for (i, &c) in clients.iter().enumerate() {
        t.s.switch(c);
        t.s.raw(c, Hypercall::Call.number(), 0, 1, args(&[100 + i as u64]));
        assert_eq!(t.s.state(c), VcpuState::BlockedSend(t.ep));
        t.s.k.schedule();
    }
    t.s.switch(v0);
    t.s.raw(v0, Hypercall::Call.number(), mine, 1, args(&[103]));
    assert_eq!(t.s.state(v0), VcpuState::BlockedSend(t.ep));
    let queued: Vec<VcpuId> = t.s.k.endpoints[t.ep as usize].senders.iter(&t.s.k.next).collect();
    assert_eq!(queued, [clients.clone(), vec![v0]].concat());
    check_invariants(&t.s.k);
    t.s.switch(vs);
    t.s.raw(vs, Hypercall::Recv.number(), 0, 0, [0; 6]);
    let mut order = vec![];
    for _ in 0..4 {
        assert_eq!(t.s.k.current, Some(vs), "the server keeps the CPU while messages wait");
        let r = t.s.regs(vs);
        assert_eq!(r.rax, 0);
        order.push((r.rbx, r.rdi));
        let reply = r.rdi + 1000;
        t.s.raw(vs, Hypercall::ReplyRecv.number(), 0, 1, args(&[reply]));
        check_invariants(&t.s.k);
    }
    assert_eq!(order, vec![(1, 100), (2, 101), (3, 102), (4, 103)]);
    assert_eq!(t.s.k.current, Some(v0), "the last caller gets the CPU back directly");
    assert_eq!(t.s.regs(v0).rdi, 1103);
    for (i, &c) in clients.iter().enumerate() {
        assert_eq!(t.s.state(c), VcpuState::Ready);
        assert_eq!((t.s.regs(c).rax, t.s.regs(c).rdi), (0, 1100 + i as u64));
    }
}

#[test]
fn long_messages_travel_through_message_pages() {
    let mut t = ipc_setup(DOM0_PRIO);
    let (d0, v0, vs, sd) = (t.s.d0, t.s.v0, t.vs, t.sd);
    assert_eq!(t.s.hc(v0, Hypercall::VcpuSetMessagePage, 0, &[PAGE_GPA]), Ok(PAGE_GPA));
    t.s.switch(vs);
    assert_eq!(t.s.hc(vs, Hypercall::VcpuSetMessagePage, 0, &[0x3000]), Ok(0x3000));
    t.server_waits();
    let extra: Vec<u64> = (0..14).map(|i| 1000 + i).collect();
    t.s.write_words(d0, PAGE_GPA, &extra);
    t.s.raw(v0, Hypercall::Call.number(), t.e, 20, [1, 2, 3, 4, 5, 6]);
    assert_eq!(t.s.k.current, Some(vs));
    let r = t.s.regs(vs);
    assert_eq!((r.rax, r.rcx, words(&r)), (0, 20, [1, 2, 3, 4, 5, 6]));
    assert_eq!(t.s.read_words(sd, 0x3000, 14), extra);
    // Reply with 10 words.
    t.s.write_words(sd, 0x3000, &[7, 8, 9, 10]);
    t.s.raw(vs, Hypercall::ReplyRecv.number(), 0, 10, [11, 12, 13, 14, 15, 16]);
    assert_eq!(t.s.k.current, Some(v0));
    let r = t.s.regs(v0);
    assert_eq!((r.rax, r.rcx, words(&r)), (0, 10, [11, 12, 13, 14, 15, 16]));
    assert_eq!(t.s.read_words(d0, PAGE_GPA, 4), vec![7, 8, 9, 10]);
    // The longest message fills the whole page.
    let full: Vec<u64> = (0..512).map(|i| i * 3 + 1).collect();
    t.s.write_words(d0, PAGE_GPA, &full);
    t.s.raw(v0, Hypercall::Call.number(), t.e, MAX_MESSAGE_WORDS as u64, [0; 6]);
    assert_eq!(t.s.regs(vs).rcx, MAX_MESSAGE_WORDS as u64);
    assert_eq!(t.s.read_words(sd, 0x3000, 512), full);
    t.s.raw(vs, Hypercall::ReplyRecv.number(), 0, MAX_MESSAGE_WORDS as u64 + 1, [0; 6]);
    assert_eq!(t.s.status(vs), Err(Error::InvalidArgument), "too long a reply");
    assert_eq!(t.s.k.current, Some(vs));
    t.s.raw(vs, Hypercall::ReplyRecv.number(), 0, 0, [0; 6]);
    assert_eq!(t.s.k.current, Some(v0));
    t.s.raw(v0, Hypercall::Call.number(), t.e, MAX_MESSAGE_WORDS as u64 + 1, [0; 6]);
    assert_eq!(t.s.status(v0), Err(Error::InvalidArgument), "too long a call");
    t.s.raw(v0, Hypercall::Call.number(), t.e, u64::MAX, [0; 6]);
    assert_eq!(t.s.status(v0), Err(Error::InvalidArgument));
    check_invariants(&t.s.k);
}

#[test]
fn long_messages_need_pages_on_both_sides() {
    let mut t = ipc_setup(DOM0_PRIO);
    let (d0, v0, vs, sd) = (t.s.d0, t.s.v0, t.vs, t.sd);
    t.server_waits();
    // The caller has no page: refused at once.
    t.s.raw(v0, Hypercall::Call.number(), t.e, REGISTER_WORDS as u64 + 1, [0; 6]);
    assert_eq!(t.s.status(v0), Err(Error::NoMessagePage));
    assert_eq!(t.s.k.current, Some(v0));
    // The waiting server has none: it fails, the caller waits for another receiver.
    t.s.hc(v0, Hypercall::VcpuSetMessagePage, 0, &[PAGE_GPA]).unwrap();
    t.s.write_words(d0, PAGE_GPA, &[42]);
    t.s.raw(v0, Hypercall::Call.number(), t.e, 7, [1, 2, 3, 4, 5, 6]);
    assert_eq!(t.s.state(v0), VcpuState::BlockedSend(t.ep));
    assert_eq!(t.s.state(vs), VcpuState::Running, "the failed receiver runs");
    assert_eq!(t.s.status(vs), Err(Error::NoMessagePage));
    check_invariants(&t.s.k);
    // With a page it takes the queued message.
    t.s.hc(vs, Hypercall::VcpuSetMessagePage, 0, &[0x5000]).unwrap();
    t.s.raw(vs, Hypercall::Recv.number(), 0, 0, [0; 6]);
    assert_eq!((t.s.regs(vs).rax, t.s.regs(vs).rcx), (0, 7));
    assert_eq!(t.s.read_words(sd, 0x5000, 1), vec![42]);
    // A long reply to a caller without a page fails the caller, the server goes on.
    t.s.k.vcpus[v0 as usize].msg_page = None;
    t.s.raw(vs, Hypercall::ReplyRecv.number(), 0, 9, [0; 6]);
    assert_eq!(t.s.status(v0), Err(Error::NoMessagePage));
    assert_eq!(t.s.state(vs), VcpuState::BlockedRecv(t.ep));
    t.s.k.schedule();
    assert_eq!(t.s.k.current, Some(v0));
    check_invariants(&t.s.k);
}

#[test]
fn recv_with_a_pending_reply_tells_the_caller_its_partner_is_gone() {
    let mut t = ipc_setup(DOM0_PRIO);
    let (v0, vs) = (t.s.v0, t.vs);
    t.server_waits();
    t.s.raw(v0, Hypercall::Call.number(), t.e, 1, [5; 6]);
    assert_eq!(t.s.k.current, Some(vs));
    t.s.raw(vs, Hypercall::Recv.number(), 0, 0, [0; 6]);
    assert_eq!(t.s.status(v0), Err(Error::PartnerGone));
    assert_eq!(t.s.state(vs), VcpuState::BlockedRecv(t.ep));
    t.s.k.schedule();
    assert_eq!(t.s.k.current, Some(v0));
    check_invariants(&t.s.k);
}

#[test]
fn freeing_an_endpoint_fails_its_waiters() {
    let mut t = ipc_setup(DOM0_PRIO);
    let (v0, vs) = (t.s.v0, t.vs);
    t.server_waits();
    // Revoke the server's copy, then delete the original: the waiting receiver fails.
    assert_eq!(t.s.hc(v0, Hypercall::CapRevoke, t.e, &[]), Ok(1));
    assert_eq!(t.s.state(vs), VcpuState::BlockedRecv(t.ep), "still referenced by dom0");
    assert_eq!(t.s.hc(v0, Hypercall::CapDelete, t.e, &[]), Ok(0));
    assert_eq!(t.s.state(vs), VcpuState::Ready);
    assert_eq!(t.s.status(vs), Err(Error::PartnerGone));
    assert_eq!(t.s.k.endpoints[t.ep as usize].refs, 0);
    check_invariants(&t.s.k);
    // A queued caller fails the same way when the last capability goes.
    let e2 = t.s.endpoint();
    let ep2 = t.s.endpoint_id(t.s.d0, e2);
    let c = t.s.copy(e2, t.sdslot, rights::CALL, 0).unwrap();
    t.s.switch(vs);
    t.s.raw(vs, Hypercall::Call.number(), c, 0, [0; 6]);
    assert_eq!(t.s.state(vs), VcpuState::BlockedSend(ep2));
    t.s.k.schedule();
    assert_eq!(t.s.k.current, Some(v0));
    assert_eq!(t.s.hc(v0, Hypercall::CapDelete, e2, &[]), Ok(0));
    assert_eq!(t.s.state(vs), VcpuState::BlockedSend(ep2));
    assert_eq!(t.s.hc(v0, Hypercall::DomainDestroy, t.sdslot, &[]), Ok(0));
    assert_eq!(t.s.k.endpoints[ep2 as usize].refs, 0);
    check_invariants(&t.s.k);
}

#[test]
fn destroying_the_server_fails_its_caller() {
    let mut t = ipc_setup(DOM0_PRIO);
    let v0 = t.s.v0;
    let (_, aslot) = t.s.create_domain("caller", MIB2, DOM0_PRIO);
    let (va, _) = t.s.create_vcpu(aslot, true);
    t.s.copy(t.e, aslot, rights::CALL, 1).unwrap();
    t.server_waits();
    t.s.switch(va);
    t.s.raw(va, Hypercall::Call.number(), 0, 0, [0; 6]);
    assert_eq!(t.s.k.current, Some(t.vs));
    assert_eq!(t.s.state(va), VcpuState::BlockedReply(t.vs));
    t.s.switch(v0);
    assert_eq!(t.s.hc(v0, Hypercall::DomainDestroy, t.sdslot, &[]), Ok(0));
    assert_eq!(t.s.state(va), VcpuState::Ready);
    assert_eq!(t.s.status(va), Err(Error::PartnerGone));
    check_invariants(&t.s.k);
}

/// A server with a notification bound to its receive, signalled while it serves a call:
/// its ReplyRecv answers the caller and returns the bits at once. The fast path used to
/// block it in the receive with the bits left behind (a dom0 woken by its tick or the
/// control device, a VMM by a doorbell, would sleep through them).
#[test]
fn reply_recv_takes_bits_that_arrived_on_the_bound_notification_meanwhile() {
    let mut t = ipc_setup(DOM0_PRIO);
    let (v0, vs) = (t.s.v0, t.vs);
    let n = t.s.notification();
    let nid = t.s.notification_id(t.s.d0, n);
    let ns = t.s.copy(n, t.sdslot, rights::WAIT, 0).unwrap();
    t.s.switch(vs);
    assert_eq!(t.s.hc(vs, Hypercall::NotificationBind, ns, &[0]), Ok(0));
    t.s.switch(v0);
    t.server_waits();
    t.s.raw(v0, Hypercall::Call.number(), t.e, 1, [5, 0, 0, 0, 0, 0]);
    assert_eq!(t.s.k.current, Some(vs));
    t.s.k.signal_object(nid, 0b1000);
    t.s.raw(vs, Hypercall::ReplyRecv.number(), 0, 1, [6, 0, 0, 0, 0, 0]);
    assert_eq!((t.s.regs(v0).rax, t.s.regs(v0).rdi), (0, 6), "the caller has its reply");
    assert!(!matches!(t.s.state(vs), VcpuState::BlockedRecv(_)), "the server does not sleep with bits waiting");
    let r = t.s.regs(vs);
    assert_eq!((r.rax, r.rbx, r.rdi), (0, ipc_spec::hypercall::NOTIFICATION_BADGE, 0b1000));
    check_invariants(&t.s.k);
}

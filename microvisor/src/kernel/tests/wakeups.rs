//! Kernel tests: wake-ups in the middle of an IPC operation.

use super::ipc::ipc_setup;
use super::*;

/// A caller of higher priority than its server is woken (with an error) while the server
/// goes on to wait: the server, not the caller, must end up waiting.
#[test]
fn recv_dropping_a_higher_priority_caller() {
    let mut t = ipc_setup(50);
    let (v0, vs) = (t.s.v0, t.vs);
    t.server_waits();
    t.s.raw(v0, Hypercall::Call.number(), t.e, 0, [0; 6]);
    assert_eq!(t.s.k.current, Some(vs), "direct switch even to a lower priority");
    t.s.raw(vs, Hypercall::Recv.number(), 0, 0, [0; 6]);
    check_invariants(&t.s.k);
    assert_eq!(t.s.state(vs), VcpuState::BlockedRecv(t.ep));
    t.s.k.schedule();
    assert_eq!(t.s.k.current, Some(v0));
    assert_eq!(t.s.status(v0), Err(Error::PartnerGone));
}

#[test]
fn reply_failing_for_a_higher_priority_caller() {
    let mut t = ipc_setup(50);
    let (v0, vs) = (t.s.v0, t.vs);
    t.s.switch(vs);
    t.s.hc(vs, Hypercall::VcpuSetMessagePage, 0, &[0x3000]).unwrap();
    t.server_waits();
    t.s.raw(v0, Hypercall::Call.number(), t.e, 0, [0; 6]);
    assert_eq!(t.s.k.current, Some(vs));
    // A long reply to a caller without a message page.
    t.s.raw(vs, Hypercall::ReplyRecv.number(), 0, 7, [0; 6]);
    check_invariants(&t.s.k);
    assert_eq!(t.s.state(vs), VcpuState::BlockedRecv(t.ep));
    assert_eq!(t.s.k.current, Some(v0));
    assert_eq!(t.s.status(v0), Err(Error::NoMessagePage));
}

#[test]
fn call_failing_a_higher_priority_receiver() {
    let mut t = ipc_setup(150);
    let (v0, vs) = (t.s.v0, t.vs);
    // The (higher-priority) server waits without a message page; dom0 sends a long message.
    t.s.raw(vs, Hypercall::Recv.number(), 0, 0, [0; 6]);
    t.s.k.schedule();
    assert_eq!(t.s.k.current, Some(v0));
    t.s.hc(v0, Hypercall::VcpuSetMessagePage, 0, &[PAGE_GPA]).unwrap();
    t.s.raw(v0, Hypercall::Call.number(), t.e, 7, [0; 6]);
    check_invariants(&t.s.k);
    assert_eq!(t.s.state(v0), VcpuState::BlockedSend(t.ep));
    assert_eq!(t.s.k.current, Some(vs), "the failed receiver has the higher priority");
    assert_eq!(t.s.status(vs), Err(Error::NoMessagePage));
}

#[test]
fn recv_failing_a_higher_priority_sender() {
    let mut t = ipc_setup(50);
    let (v0, vs) = (t.s.v0, t.vs);
    // dom0 (higher priority) queues a long message; the server has no message page.
    t.s.hc(v0, Hypercall::VcpuSetMessagePage, 0, &[PAGE_GPA]).unwrap();
    t.s.raw(v0, Hypercall::Call.number(), t.e, 7, [0; 6]);
    assert_eq!(t.s.state(v0), VcpuState::BlockedSend(t.ep));
    assert_eq!(t.s.k.current, Some(vs));
    t.s.raw(vs, Hypercall::Recv.number(), 0, 0, [0; 6]);
    check_invariants(&t.s.k);
    assert_eq!(t.s.state(vs), VcpuState::BlockedRecv(t.ep));
    t.s.k.schedule();
    assert_eq!(t.s.k.current, Some(v0));
    assert_eq!(t.s.status(v0), Err(Error::NoMessagePage));
}

/// A server stopped by its fault handler while it owed a reply: once its domain is
/// destroyed, the caller must learn that its partner is gone (not wait forever).
#[test]
fn caller_of_a_server_stopped_after_a_fault_is_released() {
    let mut s = boot();
    let v0 = s.v0;
    let e = s.endpoint();
    let fe = s.endpoint();
    let n = s.notification();
    let nid = s.notification_id(s.d0, n);
    let (sd, sdslot) = s.create_domain("server", MIB2, DOM0_PRIO);
    let (vs, _) = s.create_vcpu(sdslot, true);
    let (_, hslot) = s.create_domain("handler", MIB2, DOM0_PRIO);
    let (vh, _) = s.create_vcpu(hslot, true);
    assert_eq!(s.copy(e, sdslot, rights::RECV, 0), Ok(0));
    assert_eq!(s.copy(n, sdslot, rights::WAIT, 0), Ok(1));
    assert_eq!(s.copy(fe, hslot, rights::RECV, 0), Ok(0));
    s.hc(v0, Hypercall::DomainSetFaultEndpoint, sdslot, &[fe, 1]).unwrap();
    // The handler waits for faults; the server binds a notification and waits for calls.
    s.switch(vh);
    s.raw(vh, Hypercall::Recv.number(), 0, 0, [0; 6]);
    s.k.schedule();
    s.switch(vs);
    assert_eq!(s.hc(vs, Hypercall::NotificationBind, 1, &[33]), Ok(33));
    s.raw(vs, Hypercall::Recv.number(), 0, 0, [0; 6]);
    s.k.schedule();
    assert_eq!(s.k.current, Some(v0));
    s.raw(v0, Hypercall::Call.number(), e, 0, [0; 6]);
    assert_eq!(s.k.current, Some(vs));
    // The server faults while it owes dom0 a reply; the handler stops it.
    assert!(s.k.exit(&mut s.p, vs, PendingExit::new(ExitKind::Stage2, 0, 0)));
    assert_eq!(s.k.current, Some(vh));
    s.raw(vh, Hypercall::ReplyRecv.number(), 0, 1, ExitReply::STOP.encode());
    assert_eq!(s.state(vs), VcpuState::Stopped);
    check_invariants(&s.k);
    // dom0 may wait while the stopped server is inspected; destroying it must free dom0.
    s.k.domain_destroy(&mut s.p, sd);
    check_invariants(&s.k);
    assert_eq!(s.state(v0), VcpuState::Ready);
    assert_eq!(s.status(v0), Err(Error::PartnerGone));
    assert_eq!(s.k.notifications[nid as usize].bound, None, "no binding to a freed vCPU");
}

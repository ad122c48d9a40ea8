//! Kernel tests: faults and exits delivered to handlers.

use super::*;

/// dom0 handles the faults of a domain with two running vCPUs.
pub(super) struct Faulty {
    pub(super) s: Sys,
    pub(super) e: u64,
    pub(super) ep: EndpointId,
    pub(super) fd: DomainId,
    pub(super) fdslot: u64,
    pub(super) vf: [VcpuId; 2],
}

pub(super) fn faulty(handler: bool) -> Faulty {
    let mut s = boot();
    let e = s.endpoint();
    let ep = s.endpoint_id(s.d0, e);
    let (fd, fdslot) = s.create_domain("faulty", MIB2, DOM0_PRIO);
    let (a, _) = s.create_vcpu(fdslot, true);
    let (b, _) = s.create_vcpu(fdslot, true);
    if handler {
        assert_eq!(s.hc(s.v0, Hypercall::DomainSetFaultEndpoint, fdslot, &[e, 0xf00]), Ok(e));
        assert_eq!(s.k.domains[fd as usize].fault_handler, Some((ep, 0xf00)));
        assert_eq!(s.k.endpoints[ep as usize].refs, 2, "the handler holds a reference");
    }
    Faulty { s, e, ep, fd, fdslot, vf: [a, b] }
}

#[test]
fn faults_reach_the_handler_and_resume_or_stop() {
    let mut f = faulty(true);
    let (v0, vf) = (f.s.v0, f.vf[1]);
    // No handler waiting: the fault message queues.
    f.s.switch(vf);
    f.s.k.vcpus[vf as usize].regs = Regs { rip: 0xdead0, rax: 77, rcx: 3, rdi: 4, r15: 5, ..Regs::default() };
    let before = f.s.regs(vf);
    let fault = PendingExit::new(ExitKind::Stage2, 0x4000_1000, 5);
    assert!(f.s.k.exit(&mut f.s.p, vf, fault));
    assert_eq!(f.s.state(vf), VcpuState::BlockedSend(f.ep));
    check_invariants(&f.s.k);
    f.s.switch(v0);
    f.s.raw(v0, Hypercall::Recv.number(), f.e, 0, [0; 6]);
    assert_eq!(f.s.k.current, Some(v0));
    assert_eq!(f.s.state(vf), VcpuState::BlockedFault(v0));
    let r = f.s.regs(v0);
    assert_eq!((r.rax, r.rbx, r.rcx), (0, 0xf00, 6), "no message page: no state");
    assert_eq!(words(&r), [ExitKind::Stage2 as u64 | 1 << 8, 0xdead0, 0x4000_1000, 5, 77, 0]);
    check_invariants(&f.s.k);
    // Resume: the vCPU goes on with its registers untouched.
    f.s.raw(v0, Hypercall::ReplyRecv.number(), f.e, 1, ExitReply::RETRY.encode());
    assert_eq!(f.s.k.current, Some(vf));
    assert_eq!(f.s.regs(vf), before);
    assert_eq!(f.s.k.vcpus[vf as usize].exit, None);
    assert_eq!(f.s.state(v0), VcpuState::BlockedRecv(f.ep));
    // Again, with the handler waiting: straight to it.
    let fault = PendingExit::new(ExitKind::Exception, 13, 0x18);
    assert!(f.s.k.exit(&mut f.s.p, vf, fault));
    assert_eq!(f.s.k.current, Some(v0));
    let r = f.s.regs(v0);
    assert_eq!(words(&r), [ExitKind::Exception as u64 | 1 << 8, 0xdead0, 13, 0x18, 77, 0]);
    // Stop.
    f.s.raw(v0, Hypercall::ReplyRecv.number(), f.e, 1, ExitReply::STOP.encode());
    assert_eq!(f.s.state(vf), VcpuState::Stopped);
    assert_eq!(f.s.state(v0), VcpuState::BlockedRecv(f.ep));
    f.s.k.schedule();
    assert_eq!(f.s.k.current, Some(f.vf[0]), "the other vCPU goes on");
    check_invariants(&f.s.k);
}

#[test]
fn a_fault_without_handler_stops_the_vcpu() {
    let mut f = faulty(false);
    let vf = f.vf[0];
    f.s.switch(vf);
    assert!(!f.s.k.exit(&mut f.s.p, vf, PendingExit::new(ExitKind::Shutdown, 0, 0)));
    assert_eq!(f.s.state(vf), VcpuState::Stopped);
    assert_eq!(f.s.k.current, None);
    assert_eq!(f.s.state(f.vf[1]), VcpuState::Ready, "only the faulting vCPU stops");
    f.s.k.schedule();
    check_invariants(&f.s.k);
}

#[test]
fn domain_exit_without_handler_stops_the_domain() {
    let mut f = faulty(false);
    let vf = f.vf[0];
    f.s.switch(vf);
    f.s.k.write_ram(&mut f.s.p, f.fd, BUF_GPA, b"bye").unwrap();
    assert_eq!(f.s.hc(vf, Hypercall::ConsoleWrite, 0, &[BUF_GPA, 3]), Ok(BUF_GPA));
    assert!(f.s.p.lines_of("faulty").is_empty());
    let ev = f.s.raw(vf, Hypercall::DomainExit.number(), 0, 0, args(&[7]));
    assert_eq!(ev, Some(Event::Exited { domain: f.fd, status: 7, handled: false }));
    assert_eq!(f.s.p.lines_of("faulty"), vec!["bye"], "console flushed");
    assert_eq!(f.s.state(f.vf[0]), VcpuState::Stopped);
    assert_eq!(f.s.state(f.vf[1]), VcpuState::Stopped);
    assert_eq!(f.s.k.current, Some(f.s.v0));
    assert_eq!(f.s.k.domains[f.fd as usize].state, DomainState::Alive, "kept for inspection");
    check_invariants(&f.s.k);
    // dom0 can still destroy it.
    assert_eq!(f.s.hc(f.s.v0, Hypercall::DomainDestroy, f.fdslot, &[]), Ok(0));
    check_invariants(&f.s.k);
    // The last domain exiting leaves nothing alive.
    let v0 = f.s.v0;
    assert_eq!(
        f.s.raw(v0, Hypercall::DomainExit.number(), 0, 0, [0; 6]),
        Some(Event::Exited { domain: f.s.d0, status: 0, handled: false })
    );
    assert!(!f.s.k.any_alive());
    assert_eq!(f.s.k.current, None);
}

#[test]
fn domain_exit_with_handler_is_a_fault_message() {
    let mut f = faulty(true);
    let (v0, vf) = (f.s.v0, f.vf[1]);
    f.s.raw(v0, Hypercall::Recv.number(), f.e, 0, [0; 6]);
    f.s.k.schedule();
    f.s.switch(vf);
    f.s.k.vcpus[vf as usize].regs.rip = 0x1234;
    let ev = f.s.raw(vf, Hypercall::DomainExit.number(), 0, 0, args(&[3]));
    assert_eq!(ev, Some(Event::Exited { domain: f.fd, status: 3, handled: true }));
    assert_eq!(f.s.k.current, Some(v0));
    let r = f.s.regs(v0);
    assert_eq!((r.rbx, r.rcx), (0xf00, 6));
    assert_eq!(words(&r)[..4], [ExitKind::Exited as u64 | 1 << 8, 0x1234, 0, 3]);
    assert_eq!(f.s.state(f.vf[0]), VcpuState::Ready);
    check_invariants(&f.s.k);
}

#[test]
fn setting_a_fault_endpoint_replaces_the_old_one() {
    let mut f = faulty(true);
    let v0 = f.s.v0;
    let e2 = f.s.endpoint();
    let ep2 = f.s.endpoint_id(f.s.d0, e2);
    assert_eq!(f.s.hc(v0, Hypercall::DomainSetFaultEndpoint, f.fdslot, &[e2, 1]), Ok(e2));
    assert_eq!(f.s.k.endpoints[f.ep as usize].refs, 1);
    assert_eq!(f.s.k.endpoints[ep2 as usize].refs, 2);
    let call_only = f.s.copy(e2, dom0_slots::SELF_DOMAIN, rights::CALL, 0).unwrap();
    assert_eq!(f.s.hc(v0, Hypercall::DomainSetFaultEndpoint, f.fdslot, &[call_only, 2]), Ok(call_only));
    check_invariants(&f.s.k);
}

#[test]
fn destroying_a_domain_releases_its_fault_endpoint() {
    let mut f = faulty(true);
    let v0 = f.s.v0;
    assert_eq!(f.s.hc(v0, Hypercall::DomainDestroy, f.fdslot, &[]), Ok(0));
    assert_eq!(f.s.k.endpoints[f.ep as usize].refs, 1, "only dom0's capability is left");
    assert_eq!(f.s.hc(v0, Hypercall::CapDelete, f.e, &[]), Ok(0));
    assert_eq!(f.s.k.endpoints[f.ep as usize].refs, 0, "the endpoint is free again");
    check_invariants(&f.s.k);
}

#[test]
fn shutdown_needs_the_machine_capability() {
    let mut s = boot();
    let v0 = s.v0;
    assert_eq!(s.raw(v0, Hypercall::Shutdown.number(), dom0_slots::MACHINE, 0, args(&[3])), Some(Event::PowerOff(3)));
    assert_eq!(s.hc(v0, Hypercall::Shutdown, dom0_slots::MEMORY, &[0]), Err(Error::WrongType));
    assert_eq!(s.hc(v0, Hypercall::Shutdown, 40, &[0]), Err(Error::InvalidSlot));
    let weak = s.copy(dom0_slots::MEMORY, dom0_slots::SELF_DOMAIN, rights::GRANT, 0).unwrap();
    assert_eq!(s.hc(v0, Hypercall::Shutdown, weak, &[0]), Err(Error::PermissionDenied));
}

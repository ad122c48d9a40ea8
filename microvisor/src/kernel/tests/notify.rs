//! Kernel tests: notifications, timers, virtual interrupts.

use super::*;

/// dom0's notification, a waiter domain holding WAIT at slot 0 and a badged SIGNAL at slot 1.
pub(super) struct Ntf {
    pub(super) s: Sys,
    pub(super) n: u64,
    pub(super) nid: NotificationId,
    pub(super) vw: VcpuId,
}

pub(super) fn ntf_setup(prio: u8) -> Ntf {
    let mut s = boot();
    let n = s.notification();
    let nid = s.notification_id(s.d0, n);
    let (_, dslot) = s.create_domain("waiter", MIB2, prio);
    let (vw, vslot) = s.create_vcpu(dslot, false);
    assert_eq!(s.copy(n, dslot, rights::WAIT, 0), Ok(0));
    assert_eq!(s.copy(n, dslot, rights::SIGNAL, 0x40), Ok(1));
    assert_eq!(s.hc(s.v0, Hypercall::VcpuStart, vslot, &[]), Ok(0));
    Ntf { s, n, nid, vw }
}

#[test]
fn signal_wait_poll() {
    let mut t = ntf_setup(DOM0_PRIO);
    let (v0, vw, n, nid) = (t.s.v0, t.vw, t.n, t.nid);
    assert_eq!(t.s.hc(v0, Hypercall::Signal, n, &[0b1]), Ok(0b1));
    assert_eq!(t.s.k.notifications[nid as usize].bits, 1);
    assert_eq!(t.s.hc(v0, Hypercall::Signal, n, &[0b100]), Ok(0b100));
    assert_eq!(t.s.hc(v0, Hypercall::Poll, n, &[]), Ok(0b101));
    assert_eq!(t.s.hc(v0, Hypercall::Poll, n, &[]), Ok(0));
    // A waiter blocks and is woken with the bits.
    t.s.switch(vw);
    t.s.raw(vw, Hypercall::Wait.number(), 0, 0, [0; 6]);
    assert_eq!(t.s.state(vw), VcpuState::BlockedWait(nid));
    assert_eq!(t.s.k.notifications[nid as usize].waiter, Some(vw));
    t.s.k.schedule();
    assert_eq!(t.s.k.current, Some(v0));
    check_invariants(&t.s.k);
    assert_eq!(t.s.hc(v0, Hypercall::Signal, n, &[0b110]), Ok(0b110));
    assert_eq!(t.s.state(vw), VcpuState::Running, "equal priority: the waiter runs at once (notify.rs fast path)");
    assert_eq!(t.s.state(v0), VcpuState::Ready, "the signaller stays ready");
    assert_eq!((t.s.regs(vw).rax, t.s.regs(vw).rdi), (0, 0b110));
    assert_eq!(t.s.k.notifications[nid as usize].bits, 0, "the waiter took them");
    assert_eq!(t.s.k.notifications[nid as usize].waiter, None);
    t.s.switch(v0);
    // Bits already there: Wait returns at once.
    t.s.hc(v0, Hypercall::Signal, n, &[0b1000]).unwrap();
    t.s.switch(vw);
    assert_eq!(t.s.hc(vw, Hypercall::Wait, 0, &[]), Ok(0b1000));
    assert_eq!(t.s.k.current, Some(vw));
    // Signal with bits 0 sends the badge.
    assert_eq!(t.s.hc(vw, Hypercall::Signal, 1, &[0]), Ok(0));
    assert_eq!(t.s.hc(vw, Hypercall::Poll, 0, &[]), Ok(0x40));
    // An unbadged capability signals bit 0.
    t.s.switch(v0);
    assert_eq!(t.s.hc(v0, Hypercall::Signal, n, &[0]), Ok(0));
    assert_eq!(t.s.hc(v0, Hypercall::Poll, n, &[]), Ok(1));
    // Rights.
    t.s.switch(vw);
    assert_eq!(t.s.hc(vw, Hypercall::Signal, 0, &[1]), Err(Error::PermissionDenied));
    assert_eq!(t.s.hc(vw, Hypercall::Wait, 1, &[]), Err(Error::PermissionDenied));
    assert_eq!(t.s.hc(vw, Hypercall::Poll, 1, &[]), Err(Error::PermissionDenied));
    assert_eq!(t.s.hc(vw, Hypercall::Wait, 2, &[]), Err(Error::InvalidSlot));
    // One waiter at a time.
    t.s.raw(vw, Hypercall::Wait.number(), 0, 0, [0; 6]);
    t.s.k.schedule();
    assert_eq!(t.s.hc(v0, Hypercall::Wait, n, &[]), Err(Error::InvalidState));
    assert_eq!(t.s.k.current, Some(v0));
    assert_eq!(t.s.k.stats.signals, 6);
    check_invariants(&t.s.k);
}

#[test]
fn bound_notification_interrupts_and_wakes_a_halted_vcpu() {
    let mut t = ntf_setup(DOM0_PRIO);
    let (v0, vw, n, nid) = (t.s.v0, t.vw, t.n, t.nid);
    t.s.switch(vw);
    assert_eq!(t.s.hc(vw, Hypercall::NotificationBind, 0, &[31]), Err(Error::InvalidArgument));
    assert_eq!(t.s.hc(vw, Hypercall::NotificationBind, 0, &[256]), Err(Error::InvalidArgument));
    assert_eq!(t.s.hc(vw, Hypercall::NotificationBind, 0, &[u64::MAX]), Err(Error::InvalidArgument));
    assert_eq!(t.s.hc(vw, Hypercall::NotificationBind, 1, &[40]), Err(Error::PermissionDenied));
    assert_eq!(t.s.hc(vw, Hypercall::NotificationBind, 0, &[40]), Ok(40));
    assert_eq!(t.s.k.notifications[nid as usize].bound, Some((vw, 40)));
    t.s.k.halt(vw);
    assert_eq!(t.s.state(vw), VcpuState::Halted);
    assert_eq!(t.s.k.current, Some(v0));
    check_invariants(&t.s.k);
    assert_eq!(t.s.hc(v0, Hypercall::Signal, n, &[1]), Ok(1));
    assert_eq!(t.s.state(vw), VcpuState::Running, "left HLT, and runs at once (equal priority)");
    assert_eq!(t.s.state(v0), VcpuState::Ready, "the signaller stays ready");
    assert_eq!(t.s.k.notifications[nid as usize].bits, 1, "bits stay for a poll");
    assert!(t.s.k.vcpus[vw as usize].has_irq());
    assert_eq!(t.s.k.vcpus[vw as usize].take_irq(), Some(40));
    assert_eq!(t.s.k.vcpus[vw as usize].take_irq(), None);
    // HLT with an interrupt pending does not halt.
    t.s.switch(vw);
    t.s.hc(vw, Hypercall::Signal, 1, &[0]).unwrap();
    t.s.k.halt(vw);
    assert_eq!(t.s.state(vw), VcpuState::Running);
    // Vector 255, the highest.
    assert_eq!(t.s.hc(vw, Hypercall::NotificationBind, 0, &[255]), Ok(255));
    t.s.k.vcpus[vw as usize].pending_irqs = [0; 4];
    t.s.hc(vw, Hypercall::Signal, 1, &[0]).unwrap();
    assert_eq!(t.s.k.vcpus[vw as usize].take_irq(), Some(255));
    // A waiter takes the signal instead of the bound vCPU.
    t.s.switch(v0);
    t.s.hc(v0, Hypercall::Poll, n, &[]).unwrap();
    t.s.raw(v0, Hypercall::Wait.number(), n, 0, [0; 6]);
    t.s.k.schedule();
    t.s.hc(vw, Hypercall::Signal, 1, &[0]).unwrap();
    assert_eq!(t.s.regs(v0).rdi, 0x40);
    assert!(!t.s.k.vcpus[vw as usize].has_irq());
    check_invariants(&t.s.k);
}

#[test]
fn timers_fire_on_tick_after_their_deadline() {
    let mut t = ntf_setup(DOM0_PRIO);
    let (v0, vw, n, nid) = (t.s.v0, t.vw, t.n, t.nid);
    t.s.p.now = 5000;
    assert_eq!(t.s.hc(v0, Hypercall::TimerSet, n, &[1000, 0x10]), Ok(1000));
    assert_eq!(t.s.k.notifications[nid as usize].timer, Some((6000, 0x10)));
    assert_eq!(t.s.k.next_deadline(), Some(6000));
    t.s.switch(vw);
    t.s.raw(vw, Hypercall::Wait.number(), 0, 0, [0; 6]);
    t.s.k.schedule();
    t.s.k.tick(5999);
    assert_eq!(t.s.state(vw), VcpuState::BlockedWait(nid));
    t.s.k.tick(6000);
    assert_eq!(t.s.state(vw), VcpuState::Ready);
    assert_eq!(t.s.regs(vw).rdi, 0x10);
    assert_eq!(t.s.k.notifications[nid as usize].timer, None, "one-shot");
    assert_eq!(t.s.k.next_deadline(), None);
    // Bits 0 signal bit 0; 0 ns cancels; a huge delay saturates.
    assert_eq!(t.s.hc(v0, Hypercall::TimerSet, n, &[10, 0]), Ok(10));
    assert_eq!(t.s.k.notifications[nid as usize].timer, Some((5010, 1)));
    assert_eq!(t.s.hc(v0, Hypercall::TimerSet, n, &[0, 0]), Ok(0));
    assert_eq!(t.s.k.notifications[nid as usize].timer, None);
    assert_eq!(t.s.hc(v0, Hypercall::TimerSet, n, &[u64::MAX, 2]), Ok(u64::MAX));
    assert_eq!(t.s.k.next_deadline(), Some(u64::MAX));
    assert_eq!(t.s.hc(v0, Hypercall::TimerSet, n, &[0, 0]), Ok(0));
    // Fire when nobody waits: the bits wait for a poll.
    assert_eq!(t.s.hc(v0, Hypercall::TimerSet, n, &[1, 0x8]), Ok(1));
    t.s.k.tick(1 << 40);
    assert_eq!(t.s.hc(v0, Hypercall::Poll, n, &[]), Ok(0x8));
    // Timers need WAIT.
    t.s.switch(vw);
    assert_eq!(t.s.hc(vw, Hypercall::TimerSet, 1, &[1, 1]), Err(Error::PermissionDenied));
    check_invariants(&t.s.k);
}

//! Host tests of the notification fast path (`notify.rs`): a signal hands the CPU straight
//! to a woken vCPU of higher or equal priority (a waiter, or a vCPU halted with the
//! notification bound to a vector), the signaller stays ready, a lower priority is only
//! made ready; and `SignalWait`, the one-exit doorbell ping-pong.

use ipc_spec::hypercall::{rights, Hypercall};
use ipc_spec::Error;

use super::caps::Object;
use super::wakeup_model::Plat;
use super::*;
use crate::npt::Npt;

/// Domains `a` and `b` with a doorbell each way: `ab` (a signals, b waits) and `ba`.
struct Pair {
    k: Box<Kernel<Npt>>,
    p: Plat,
    va: VcpuId,
    vb: VcpuId,
    ab: NotificationId,
    ba: NotificationId,
    /// a's slots: SIGNAL on ab, WAIT on ba; b's: WAIT on ab, SIGNAL on ba.
    a_signal: u64,
    a_wait: u64,
    b_wait: u64,
    b_signal: u64,
}

fn pair(pa: u8, pb: u8) -> Pair {
    let mut p = Plat::new();
    let mut k: Box<Kernel<Npt>> = Box::default();
    let da = k.domain_create(&mut p, b"a", 2 << 20, pa).unwrap();
    let db = k.domain_create(&mut p, b"b", 2 << 20, pb).unwrap();
    let va = k.vcpu_create(&mut p, da, 0x1000, 0).unwrap();
    let vb = k.vcpu_create(&mut p, db, 0x1000, 0).unwrap();
    let ab = k.notification_create().unwrap();
    let a_signal = k.grant_original(da, Object::Notification(ab), rights::SIGNAL).unwrap();
    let b_wait = k.grant_original(db, Object::Notification(ab), rights::WAIT).unwrap();
    let ba = k.notification_create().unwrap();
    let b_signal = k.grant_original(db, Object::Notification(ba), rights::SIGNAL).unwrap();
    let a_wait = k.grant_original(da, Object::Notification(ba), rights::WAIT).unwrap();
    assert_ne!(ab, ba);
    k.vcpu_start(va).unwrap();
    k.vcpu_start(vb).unwrap();
    Pair { k, p, va, vb, ab, ba, a_signal, a_wait, b_wait, b_signal }
}

impl Pair {
    /// Make `v` the running vCPU (from the run queue).
    fn run(&mut self, v: VcpuId) {
        if self.k.current == Some(v) {
            return;
        }
        let prio = self.k.vcpus[v as usize].priority;
        assert!(self.k.runq.remove(v, prio, &mut self.k.next), "vCPU {v} is not ready");
        if let Some(c) = self.k.current.take() {
            self.k.vcpus[c as usize].state = VcpuState::Ready;
            let pc = self.k.vcpus[c as usize].priority;
            self.k.runq.push(c, pc, &mut self.k.next);
        }
        self.k.switch_to(v);
    }

    /// The running `v` makes hypercall `call`; RAX and RDI afterwards.
    fn hc(&mut self, v: VcpuId, call: Hypercall, slot: u64, rdi: u64, rsi: u64) -> (u64, u64) {
        assert_eq!(self.k.current, Some(v), "vCPU {v} is not running");
        let r = &mut self.k.vcpus[v as usize].regs;
        (r.rax, r.rbx, r.rdi, r.rsi) = (call.number(), slot, rdi, rsi);
        assert_eq!(self.k.hypercall(&mut self.p, v), None);
        let r = &self.k.vcpus[v as usize].regs;
        (r.rax, r.rdi)
    }

    fn state(&self, v: VcpuId) -> VcpuState {
        self.k.vcpus[v as usize].state
    }

    fn ready(&self, v: VcpuId) -> bool {
        let prio = self.k.vcpus[v as usize].priority;
        self.state(v) == VcpuState::Ready && self.k.runq.contains(v, prio, &self.k.next)
    }

    /// b blocks in Wait on `ab`; a runs.
    fn b_waits(&mut self) {
        self.run(self.vb);
        let (vb, slot) = (self.vb, self.b_wait);
        self.hc(vb, Hypercall::Wait, slot, 0, 0);
        assert_eq!(self.state(vb), VcpuState::BlockedWait(self.ab));
        self.run(self.va);
    }
}

#[test]
fn a_waiter_of_equal_or_higher_priority_runs_at_once_and_the_signaller_stays_ready() {
    for (pa, pb) in [(10, 10), (10, 20)] {
        let mut t = pair(pa, pb);
        t.b_waits();
        let (va, vb, slot) = (t.va, t.vb, t.a_signal);
        assert_eq!(t.hc(va, Hypercall::Signal, slot, 0b101, 0), (0, 0b101));
        assert_eq!(t.k.current, Some(vb), "priorities {pa}/{pb}");
        assert_eq!(t.state(vb), VcpuState::Running);
        assert_eq!((t.k.vcpus[vb as usize].regs.rax, t.k.vcpus[vb as usize].regs.rdi), (0, 0b101));
        assert!(t.ready(va), "the signaller is queued, ready");
        assert_eq!(t.k.notifications[t.ab as usize].waiter, None);
    }
}

#[test]
fn a_lower_priority_waiter_is_only_made_ready() {
    let mut t = pair(20, 10);
    t.b_waits();
    let (va, vb, slot) = (t.va, t.vb, t.a_signal);
    t.hc(va, Hypercall::Signal, slot, 1, 0);
    assert_eq!(t.k.current, Some(va));
    assert!(t.ready(vb));
    assert_eq!(t.k.vcpus[vb as usize].regs.rdi, 1);
}

#[test]
fn a_halted_bound_vcpu_runs_at_once_and_bits_accumulate() {
    let mut t = pair(10, 10);
    let (va, vb) = (t.va, t.vb);
    t.run(vb);
    let slot = t.b_wait;
    assert_eq!(t.hc(vb, Hypercall::NotificationBind, slot, 0x40, 0).0, 0);
    t.k.halt(vb);
    assert_eq!(t.state(vb), VcpuState::Halted);
    t.run(va);
    let sig = t.a_signal;
    t.hc(va, Hypercall::Signal, sig, 0b01, 0);
    assert_eq!(t.k.current, Some(vb), "the halted vCPU runs at once");
    assert!(t.ready(va));
    assert!(t.k.vcpus[vb as usize].has_irq());
    // A second signal before b looks: the bits accumulate for its poll.
    t.run(va);
    t.hc(va, Hypercall::Signal, sig, 0b10, 0);
    assert_eq!(t.k.current, Some(va), "b is not halted: nothing to switch to");
    t.run(vb);
    assert_eq!(t.hc(vb, Hypercall::Poll, slot, 0, 0), (0, 0b11));
    // A lower-priority halted vCPU is only made ready.
    let mut t = pair(20, 10);
    let (va, vb) = (t.va, t.vb);
    t.run(vb);
    let slot = t.b_wait;
    t.hc(vb, Hypercall::NotificationBind, slot, 0x40, 0);
    t.k.halt(vb);
    t.run(va);
    let sig = t.a_signal;
    t.hc(va, Hypercall::Signal, sig, 1, 0);
    assert_eq!(t.k.current, Some(va));
    assert!(t.ready(vb));
}

#[test]
fn signal_wait_ping_pong_switches_directly() {
    let mut t = pair(10, 10);
    t.b_waits();
    let (va, vb) = (t.va, t.vb);
    let (a_signal, a_wait, b_signal, b_wait) = (t.a_signal, t.a_wait, t.b_signal, t.b_wait);
    for round in 1..=3u64 {
        t.hc(va, Hypercall::SignalWait, a_signal, round, a_wait);
        assert_eq!(t.k.current, Some(vb));
        assert_eq!(t.state(va), VcpuState::BlockedWait(t.ba));
        assert_eq!(t.k.vcpus[vb as usize].regs.rdi, round, "b woke with a's bits");
        assert!(t.k.runq.highest().is_none(), "nobody went through the run queue");
        t.hc(vb, Hypercall::SignalWait, b_signal, round << 8, b_wait);
        assert_eq!(t.k.current, Some(va));
        assert_eq!(t.state(vb), VcpuState::BlockedWait(t.ab));
        assert_eq!((t.k.vcpus[va as usize].regs.rax, t.k.vcpus[va as usize].regs.rdi), (0, round << 8));
    }
    // Bits already there: SignalWait returns them at once (and still wakes b).
    t.k.notifications[t.ba as usize].bits = 0b100;
    assert_eq!(t.hc(va, Hypercall::SignalWait, a_signal, 1, a_wait), (0, 0b100));
    assert_eq!(t.k.current, Some(vb), "b, of equal priority, runs; a stays ready");
    assert!(t.ready(va));
    // Bits 0 signal the capability's badge (unbadged: bit 0); signal and wait on one
    // notification: the caller takes its own bits.
    t.run(va);
    let both =
        t.k.grant_original(t.k.vcpus[va as usize].domain, Object::Notification(t.ab), rights::SIGNAL | rights::WAIT);
    let both = both.unwrap();
    t.k.notifications[t.ab as usize].bits = 0;
    assert_eq!(t.hc(va, Hypercall::SignalWait, both, 0, both), (0, 1));
    assert_eq!(t.k.current, Some(va));
}

#[test]
fn signal_wait_checks_both_capabilities_before_anything_happens() {
    let mut t = pair(10, 10);
    t.b_waits();
    let (va, vb) = (t.va, t.vb);
    let (a_signal, a_wait) = (t.a_signal, t.a_wait);
    assert_eq!(t.hc(va, Hypercall::SignalWait, a_signal, 1, 40).0, Error::InvalidSlot.code());
    assert_eq!(t.hc(va, Hypercall::SignalWait, a_signal, 1, a_signal).0, Error::PermissionDenied.code());
    assert_eq!(t.hc(va, Hypercall::SignalWait, a_wait, 1, a_wait).0, Error::PermissionDenied.code());
    assert_eq!(t.state(vb), VcpuState::BlockedWait(t.ab), "b was not woken");
    assert_eq!(t.k.notifications[t.ab as usize].bits, 0);
    // Someone else already waits on the notification a would wait on: refused, and the
    // signal is not sent either.
    let dc = t.k.domain_create(&mut t.p, b"c", 2 << 20, 10).unwrap();
    let vc = t.k.vcpu_create(&mut t.p, dc, 0x1000, 0).unwrap();
    let c_wait = t.k.grant_original(dc, Object::Notification(t.ba), rights::WAIT).unwrap();
    t.k.vcpu_start(vc).unwrap();
    t.run(vc);
    t.hc(vc, Hypercall::Wait, c_wait, 0, 0);
    t.run(va);
    assert_eq!(t.hc(va, Hypercall::SignalWait, a_signal, 1, a_wait).0, Error::InvalidState.code());
    assert_eq!(t.state(vb), VcpuState::BlockedWait(t.ab), "b was not woken");
    assert_eq!(t.k.current, Some(va));
}

#[test]
fn signal_wait_lets_a_higher_ready_vcpu_go_first() {
    let mut t = pair(10, 10);
    t.b_waits();
    let dc = t.k.domain_create(&mut t.p, b"c", 2 << 20, 30).unwrap();
    let vc = t.k.vcpu_create(&mut t.p, dc, 0x1000, 0).unwrap();
    t.k.vcpu_start(vc).unwrap();
    // c is ready while a runs (whether or not starting it preempted a).
    t.run(t.va);
    assert!(t.ready(vc));
    let (va, vb, a_signal, a_wait) = (t.va, t.vb, t.a_signal, t.a_wait);
    t.hc(va, Hypercall::SignalWait, a_signal, 1, a_wait);
    assert_eq!(t.k.current, Some(vc), "the highest priority runs");
    assert!(t.ready(vb), "the woken one waits its turn");
    assert_eq!(t.state(va), VcpuState::BlockedWait(t.ba));
}

/// `SignalHalt` as the net driver VM uses it: a (the driver, its doorbell `ba` bound to a
/// vector) rings b (a guest waiting on `ab`) and halts in one hypercall.
#[test]
fn signal_halt_rings_then_sleeps_until_a_bound_notification_and_never_over_one() {
    for (pa, pb) in [(20, 10), (10, 10), (10, 20)] {
        let mut t = pair(pa, pb);
        let (va, vb, a_signal, a_wait, b_signal) = (t.va, t.vb, t.a_signal, t.a_wait, t.b_signal);
        t.run(va);
        assert_eq!(t.hc(va, Hypercall::NotificationBind, a_wait, 0x40, 0).0, 0);
        t.b_waits();
        // Nothing pending: a rings b and halts; b runs whatever the priorities (a sleeps).
        assert_eq!(t.hc(va, Hypercall::SignalHalt, a_signal, 0b1, 0).0, 0);
        assert_eq!(t.state(va), VcpuState::Halted, "priorities {pa}/{pb}");
        assert_eq!(t.k.current, Some(vb));
        assert_eq!(t.k.vcpus[vb as usize].regs.rdi, 0b1, "b woke with a's bits");
        // b's doorbell wakes a, as it wakes a HLT, with the vector pending.
        t.hc(vb, Hypercall::Signal, b_signal, 1, 0);
        assert!(t.k.vcpus[va as usize].has_irq());
        assert_ne!(t.state(va), VcpuState::Halted);
        // A doorbell that arrived while a ran with interrupts off (pending in the kernel):
        // a rings and does not sleep.
        t.run(va);
        t.b_waits();
        assert_eq!(t.hc(va, Hypercall::SignalHalt, a_signal, 0b1, 0).0, 0);
        assert_ne!(t.state(va), VcpuState::Halted, "a woken vCPU was not put to sleep");
        assert_eq!(t.k.vcpus[vb as usize].regs.rdi, 0b1);
    }
}

#[test]
fn signal_halt_does_not_sleep_over_an_offered_vector_and_checks_its_capability() {
    let mut t = pair(20, 10);
    let (va, a_signal, a_wait) = (t.va, t.a_signal, t.a_wait);
    t.run(va);
    // The vector already sits in V_IRQ (not pending in the kernel): a stays awake.
    assert_eq!(t.k.signal_halt(va, a_signal, 1, true), Ok(()));
    assert_eq!(t.k.current, Some(va));
    assert_eq!(t.state(va), VcpuState::Running);
    // Wrong capability: refused before anything happens (no signal, no halt).
    assert_eq!(t.hc(va, Hypercall::SignalHalt, a_wait, 1, 0).0, Error::PermissionDenied.code());
    assert_eq!(t.hc(va, Hypercall::SignalHalt, 40, 1, 0).0, Error::InvalidSlot.code());
    assert_eq!(t.state(va), VcpuState::Running);
    assert_eq!(t.k.notifications[t.ba as usize].bits, 0);
}

//! Kernel tests: scheduling.

use super::notify::ntf_setup;
use super::*;

#[test]
fn higher_priority_preempts_on_wake_lower_does_not() {
    let mut t = ntf_setup(150);
    let (v0, vw, n) = (t.s.v0, t.vw, t.n);
    assert_eq!(t.s.k.current, Some(vw), "started at a higher priority: runs at once");
    assert_eq!(t.s.state(v0), VcpuState::Ready);
    assert_eq!(t.s.status(v0), Ok(t.s.regs(v0).rdi), "VcpuStart's status was written");
    t.s.raw(vw, Hypercall::Wait.number(), 0, 0, [0; 6]);
    assert_eq!(t.s.k.current, Some(v0));
    assert_eq!(t.s.hc(v0, Hypercall::Signal, n, &[1]), Ok(1));
    assert_eq!(t.s.k.current, Some(vw), "the woken vCPU preempts");
    assert_eq!(t.s.state(v0), VcpuState::Ready);
    // Ticks never hand the CPU to a lower priority.
    for i in 0..3 * TIME_SLICE_TICKS as u64 {
        t.s.k.tick(i);
        assert_eq!(t.s.k.current, Some(vw));
    }
    // A lower-priority vCPU becoming ready does not preempt.
    t.s.raw(vw, Hypercall::Wait.number(), 0, 0, [0; 6]);
    assert_eq!(t.s.k.current, Some(v0));
    let (_, lslot) = t.s.create_domain("low", MIB2, 50);
    let (vl, _) = t.s.create_vcpu(lslot, true);
    assert_eq!(t.s.state(vl), VcpuState::Ready);
    assert_eq!(t.s.k.current, Some(v0));
    assert_eq!(t.s.hc(v0, Hypercall::Yield, 0, &[]), Ok(0));
    assert_eq!(t.s.k.current, Some(v0), "yield only to equal or higher priority");
    // The low one runs only when everything above blocks.
    let n2 = t.s.notification();
    t.s.raw(v0, Hypercall::Wait.number(), n2, 0, [0; 6]);
    assert_eq!(t.s.k.current, Some(vl));
    check_invariants(&t.s.k);
}

#[test]
fn equal_priorities_rotate_every_time_slice() {
    let mut s = boot();
    let v0 = s.v0;
    let n = s.notification();
    let (_, aslot) = s.create_domain("a", MIB2, DOM0_PRIO);
    let (_, bslot) = s.create_domain("b", MIB2, DOM0_PRIO);
    let (va, _) = s.create_vcpu(aslot, true);
    let (vb, _) = s.create_vcpu(bslot, true);
    s.raw(v0, Hypercall::Wait.number(), n, 0, [0; 6]);
    assert_eq!(s.k.current, Some(va));
    // Both spin; record who runs after every tick.
    let mut seq = vec![];
    for i in 0..40u64 {
        s.k.tick(i * 1000);
        seq.push(s.k.current.unwrap());
        check_invariants(&s.k);
    }
    let runs: Vec<(VcpuId, usize)> = seq.chunk_by(|a, b| a == b).map(|c| (c[0], c.len())).collect();
    assert!(runs.len() >= 7, "{runs:?}");
    assert!(runs.iter().all(|&(_, len)| len <= TIME_SLICE_TICKS as usize), "a vCPU kept the CPU too long: {runs:?}");
    assert!(seq.iter().filter(|&&v| v == va).count() >= 15, "{runs:?}");
    assert!(seq.iter().filter(|&&v| v == vb).count() >= 15, "{runs:?}");
    // Waking dom0 (equal priority) puts it in the rotation too.
    s.k.signal_object(s.notification_id(s.d0, n), 1);
    assert_eq!(s.state(v0), VcpuState::Ready);
    let mut seen = HashSet::new();
    for i in 0..15u64 {
        s.k.tick(100_000 + i);
        seen.insert(s.k.current.unwrap());
    }
    assert_eq!(seen, HashSet::from([v0, va, vb]));
}

#[test]
fn yield_passes_the_cpu_to_an_equal_priority() {
    let mut s = boot();
    let v0 = s.v0;
    let n = s.notification();
    let (_, aslot) = s.create_domain("a", MIB2, DOM0_PRIO);
    let (_, bslot) = s.create_domain("b", MIB2, DOM0_PRIO);
    let (va, _) = s.create_vcpu(aslot, true);
    let (vb, _) = s.create_vcpu(bslot, true);
    s.raw(v0, Hypercall::Wait.number(), n, 0, [0; 6]);
    assert_eq!(s.k.current, Some(va));
    assert_eq!(s.hc(va, Hypercall::Yield, 0, &[]), Ok(0));
    assert_eq!(s.k.current, Some(vb));
    assert_eq!(s.state(va), VcpuState::Ready);
    assert_eq!(s.hc(vb, Hypercall::Yield, 0, &[]), Ok(0));
    assert_eq!(s.k.current, Some(va));
    // HLT of a vCPU that is not running changes nothing.
    s.k.halt(vb);
    assert_eq!(s.state(vb), VcpuState::Ready);
    assert_eq!(s.hc(va, Hypercall::Yield, 0, &[]), Ok(0));
    assert_eq!(s.k.current, Some(vb));
    s.k.halt(vb);
    assert_eq!(s.state(vb), VcpuState::Halted);
    assert_eq!(s.k.current, Some(va));
    assert_eq!(s.hc(va, Hypercall::Yield, 0, &[]), Ok(0));
    assert_eq!(s.k.current, Some(va), "alone: keeps running");
    check_invariants(&s.k);
}

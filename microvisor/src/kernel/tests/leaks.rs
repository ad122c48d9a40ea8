//! Kernel tests: leaks the hypercall fuzzer looks for.

use super::*;

/// `MachineStatus` as dom0 sees it: (free frames, domains, vCPUs, regions, endpoints,
/// notifications).
fn machine_status(s: &mut Sys) -> (u64, u64, u64, u64, u64, u64) {
    let v0 = s.v0;
    s.hc(v0, Hypercall::MachineStatus, dom0_slots::MACHINE, &[]).unwrap();
    let r = s.regs(v0);
    (r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9)
}

#[test]
fn machine_status_counts_free_frames_and_live_objects() {
    let mut s = boot();
    let v0 = s.v0;
    let before = machine_status(&mut s);
    assert_eq!(before, (s.p.free(), 1, 1, 0, 0, 0));
    let (_, dslot) = s.create_domain("x", MIB2, 10);
    s.create_vcpu(dslot, false);
    let e = s.endpoint();
    let n = s.notification();
    let reg = s.hc(v0, Hypercall::RegionCreate, dom0_slots::MEMORY, &[PAGE]).unwrap();
    let during = machine_status(&mut s);
    assert_eq!(&[during.1, during.2, during.3, during.4, during.5], &[2, 2, 1, 1, 1]);
    assert!(during.0 < before.0 - (MIB2 / PAGE), "the domain's RAM and the region are not free");
    // Only the machine capability answers.
    assert_eq!(s.hc(v0, Hypercall::MachineStatus, dom0_slots::MEMORY, &[]), Err(Error::WrongType));
    assert_eq!(s.hc(v0, Hypercall::MachineStatus, 63, &[]), Err(Error::InvalidSlot));
    for slot in [e, n, reg] {
        s.hc(v0, Hypercall::CapDelete, slot, &[]).unwrap();
    }
    s.hc(v0, Hypercall::DomainDestroy, dslot, &[]).unwrap();
    assert_eq!(machine_status(&mut s), before);
}

/// dom0 gives `d` (slot `dslot` in dom0) a copy of the memory capability; the domain's
/// running vCPU `v` then creates a domain of its own. Returns (its id, the slot in `d`).
fn create_from(s: &mut Sys, dslot: u64, v: VcpuId, name: &str) -> (DomainId, u64) {
    let mem = s.copy(dom0_slots::MEMORY, dslot, rights::CONTROL | rights::GRANT, 0).unwrap();
    let d = s.k.vcpus[v as usize].domain;
    s.k.write_ram(&mut s.p, d, NAME_GPA, name.as_bytes()).unwrap();
    s.switch(v);
    let slot = s.hc(v, Hypercall::DomainCreate, mem, &[MIB2, 5, NAME_GPA, name.len() as u64]).unwrap();
    let Object::Domain(child, _) = s.cap(d, slot).object else { panic!("not a domain capability") };
    (child, slot)
}

/// Found by the hypercall fuzzer: a domain created by a domain that dom0 then destroyed
/// lived on (with its RAM, vCPUs and capabilities) although no capability reached it any
/// more, so nobody could ever destroy it. Destroying a domain now destroys every domain no
/// chain of domain capabilities from dom0 reaches.
#[test]
fn destroying_a_domain_destroys_the_domains_only_it_could_reach() {
    let mut s = boot();
    s.k.root = Some(s.d0);
    let v0 = s.v0;
    let before = machine_status(&mut s);
    let (_, aslot) = s.create_domain("a", MIB2, 10);
    let (va, _) = s.create_vcpu(aslot, true);
    // a creates b, gives b memory too, and b creates c (with a running vCPU) and its own
    // endpoint: a chain dom0 -> a -> b -> c.
    let (b, bslot_in_a) = create_from(&mut s, aslot, va, "b");
    let vbslot = s.hc(va, Hypercall::VcpuCreate, bslot_in_a, &[0x1000, 0]).unwrap();
    s.hc(va, Hypercall::VcpuStart, vbslot, &[]).unwrap();
    let Object::Vcpu(vb, _) = s.cap(s.k.vcpus[va as usize].domain, vbslot).object else { panic!() };
    let mem_b = s.hc(va, Hypercall::CapCopy, 0, &[bslot_in_a, rights::CONTROL | rights::GRANT, 0]);
    assert!(mem_b.is_ok(), "{mem_b:?}");
    s.k.write_ram(&mut s.p, b, NAME_GPA, b"c").unwrap();
    s.switch(vb);
    let cslot = s.hc(vb, Hypercall::DomainCreate, mem_b.unwrap(), &[MIB2, 5, NAME_GPA, 1]).unwrap();
    s.hc(vb, Hypercall::VcpuCreate, cslot, &[0x1000, 0]).unwrap();
    s.hc(vb, Hypercall::EndpointCreate, mem_b.unwrap(), &[]).unwrap();
    // An unrelated domain dom0 also holds stays.
    s.switch(v0);
    let (keep, _) = s.create_domain("keep", MIB2, 10);
    assert_eq!(s.live_domains(), 5);
    assert_eq!(s.hc(v0, Hypercall::DomainDestroy, aslot, &[]), Ok(0));
    check_invariants(&s.k);
    assert_eq!(s.live_domains(), 2, "b and c went with a");
    assert_eq!(s.k.domains[keep as usize].state, DomainState::Alive);
    let after = machine_status(&mut s);
    // Everything but "keep" (one domain, 2 MiB and its page tables) is back.
    assert_eq!(&[after.1, after.2, after.3, after.4, after.5], &[2, 1, 0, 0, 0]);
    for slot in 4..CAP_SLOTS as u64 {
        if let Ok(c) = s.k.domains[s.d0 as usize].caps.get(slot) {
            if matches!(c.object, Object::Domain(..)) {
                s.hc(v0, Hypercall::DomainDestroy, slot, &[]).ok();
            }
        }
    }
    assert_eq!(machine_status(&mut s), before);
}

/// Without a root (as in the other host tests) nothing is collected.
#[test]
fn without_a_root_no_domain_is_collected() {
    let mut s = boot();
    let v0 = s.v0;
    let (_, aslot) = s.create_domain("a", MIB2, 10);
    let (va, _) = s.create_vcpu(aslot, true);
    create_from(&mut s, aslot, va, "b");
    s.switch(v0);
    s.hc(v0, Hypercall::DomainDestroy, aslot, &[]).unwrap();
    assert_eq!(s.live_domains(), 2, "b stays: no root was named");
    assert_eq!(s.k.collect_unreachable(&mut s.p), 0);
}

/// Domains holding capabilities to each other (as they could if domain capabilities were
/// copyable) do not keep each other alive: what counts is a chain from the root.
#[test]
fn a_cycle_of_domain_capabilities_does_not_keep_its_domains_alive() {
    let mut s = boot();
    s.k.root = Some(s.d0);
    let v0 = s.v0;
    let before = machine_status(&mut s);
    let (a, aslot) = s.create_domain("a", MIB2, 10);
    let (b, bslot) = s.create_domain("b", MIB2, 10);
    let (_, xslot) = s.create_domain("x", MIB2, 10);
    let (ga, gb) = (s.k.domains[a as usize].generation, s.k.domains[b as usize].generation);
    // a and b each hold the other (and themselves).
    for (holder, target, g) in [(a, b, gb), (b, a, ga), (a, a, ga)] {
        s.k.grant_original(holder, Object::Domain(target, g), rights::CONTROL).unwrap();
    }
    // While dom0 reaches them, a destroy elsewhere keeps them.
    assert_eq!(s.hc(v0, Hypercall::DomainDestroy, xslot, &[]), Ok(0));
    assert_eq!(s.live_domains(), 3);
    // dom0 lets go of both: the cycle alone does not keep them. (Collected at the next
    // destruction, which here is a new domain's.)
    s.hc(v0, Hypercall::CapDelete, aslot, &[]).unwrap();
    s.hc(v0, Hypercall::CapDelete, bslot, &[]).unwrap();
    let (_, yslot) = s.create_domain("y", MIB2, 10);
    assert_eq!(s.hc(v0, Hypercall::DomainDestroy, yslot, &[]), Ok(0));
    check_invariants(&s.k);
    assert_eq!(s.live_domains(), 1);
    s.hc(v0, Hypercall::CapDelete, xslot, &[]).unwrap();
    s.hc(v0, Hypercall::CapDelete, yslot, &[]).unwrap();
    assert_eq!(machine_status(&mut s), before);
}

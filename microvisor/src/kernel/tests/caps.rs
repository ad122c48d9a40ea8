//! Kernel tests: capabilities: copy, revoke, delete, rights, badges.

use super::*;

#[test]
fn cap_copy_masks_rights_and_badges_only_unbadged_ipc_caps() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let (d, dslot) = s.create_domain("other", MIB2, 10);
    let e = s.endpoint();
    let n = s.notification();
    let me = dom0_slots::SELF_DOMAIN;
    // Rights are masked.
    let c = s.copy(e, dslot, rights::CALL | rights::WRITE, 0).unwrap();
    assert_eq!(c, 0);
    assert_eq!(s.cap(d, 0).rights, rights::CALL);
    assert_eq!(s.cap(d, 0).object, s.cap(d0, e).object);
    assert_eq!(s.cap(d, 0).badge, 0);
    // A badge on an unbadged endpoint/notification capability.
    let be = s.copy(e, me, rights::ALL, 0x55).unwrap();
    assert_eq!(s.cap(d0, be).badge, 0x55);
    assert_eq!(s.cap(d0, be).rights, rights::CALL | rights::RECV | rights::GRANT);
    let bn = s.copy(n, me, rights::SIGNAL | rights::GRANT, 0x66).unwrap();
    assert_eq!(s.cap(d0, bn).badge, 0x66);
    // A badged capability keeps its badge: 0 keeps it, another one is refused.
    let be2 = s.copy(be, me, rights::ALL, 0).unwrap();
    assert_eq!(s.cap(d0, be2).badge, 0x55);
    assert_eq!(s.copy(be, me, rights::ALL, 0x77), Err(Error::InvalidArgument));
    assert_eq!(s.copy(bn, me, rights::ALL, 1), Err(Error::InvalidArgument));
    // No badges on other kinds.
    assert_eq!(s.copy(dom0_slots::MEMORY, me, rights::ALL, 1), Err(Error::InvalidArgument));
    let reg = s.hc(v0, Hypercall::RegionCreate, dom0_slots::MEMORY, &[PAGE]).unwrap();
    assert_eq!(s.copy(reg, me, rights::ALL, 1), Err(Error::InvalidArgument));
    let r2 = s.copy(reg, me, rights::READ | rights::GRANT, 0).unwrap();
    assert_eq!(s.cap(d0, r2).rights, rights::READ | rights::GRANT);
    // Rights never grow back.
    let r3 = s.copy(r2, me, rights::ALL, 0).unwrap();
    assert_eq!(s.cap(d0, r3).rights, rights::READ | rights::GRANT);
    // Missing GRANT, bad source, bad target.
    let nogrant = s.copy(e, me, rights::CALL, 0).unwrap();
    assert_eq!(s.copy(nogrant, me, rights::ALL, 0), Err(Error::PermissionDenied));
    // dom0 may hand out the machine (console input: READ alone), but not a copy without GRANT.
    let machine = s.copy(dom0_slots::MACHINE, me, rights::READ, 0).unwrap();
    assert_eq!(s.copy(machine, me, rights::ALL, 0), Err(Error::PermissionDenied));
    assert_eq!(s.copy(40, me, rights::ALL, 0), Err(Error::InvalidSlot));
    assert_eq!(s.copy(e, 40, rights::ALL, 0), Err(Error::InvalidSlot));
    assert_eq!(s.copy(e, u64::MAX, rights::ALL, 0), Err(Error::InvalidSlot));
    assert_eq!(s.copy(e, dom0_slots::MEMORY, rights::ALL, 0), Err(Error::WrongType));
    assert_eq!(s.copy(e, e, rights::ALL, 0), Err(Error::PermissionDenied), "endpoint cap has no CONTROL");
    // Each copy is a reference.
    let ep = s.endpoint_id(d0, e);
    assert_eq!(s.k.endpoints[ep as usize].refs, 5);
    check_invariants(&s.k);
}

#[test]
fn cap_revoke_removes_copies_transitively_across_domains() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let (a, aslot) = s.create_domain("a", MIB2, DOM0_PRIO);
    let (b, bslot) = s.create_domain("b", MIB2, DOM0_PRIO);
    let (va, _) = s.create_vcpu(aslot, true);
    let e = s.endpoint();
    let other = s.endpoint();
    // Domain capabilities have no GRANT: only their holder can copy into a domain.
    assert_eq!(s.copy(bslot, aslot, rights::ALL, 0), Err(Error::PermissionDenied));
    // dom0 → a (with GRANT), dom0 → b (a sibling), dom0 → dom0; a gets memory to make c.
    assert_eq!(s.copy(e, aslot, rights::ALL, 0), Ok(0));
    assert_eq!(s.copy(dom0_slots::MEMORY, aslot, rights::ALL, 0), Ok(1));
    assert_eq!(s.copy(other, aslot, rights::ALL, 0), Ok(2));
    assert_eq!(s.copy(e, bslot, rights::CALL, 7), Ok(0));
    let mine = s.copy(e, dom0_slots::SELF_DOMAIN, rights::ALL, 0).unwrap();
    s.switch(va);
    s.k.write_ram(&mut s.p, a, NAME_GPA, b"c").unwrap();
    let cslot = s.hc(va, Hypercall::DomainCreate, 1, &[MIB2, 10, NAME_GPA, 1]).unwrap();
    assert_eq!(cslot, 3);
    let Object::Domain(c, _) = s.cap(a, cslot).object else { panic!() };
    // a → c twice (grandchildren of dom0's capability), and an unrelated endpoint.
    assert_eq!(s.hc(va, Hypercall::CapCopy, 0, &[cslot, rights::CALL | rights::GRANT, 3]), Ok(0));
    assert_eq!(s.hc(va, Hypercall::CapCopy, 0, &[cslot, rights::ALL, 4]), Ok(1));
    assert_eq!(s.hc(va, Hypercall::CapCopy, 2, &[cslot, rights::ALL, 0]), Ok(2));
    let ep = s.endpoint_id(d0, e);
    assert_eq!(s.k.endpoints[ep as usize].refs, 6);
    // a revokes its copy: c's copies go, a's stays.
    assert_eq!(s.hc(va, Hypercall::CapRevoke, 0, &[]), Ok(2));
    assert!(s.k.domains[a as usize].caps.get(0).is_ok(), "the revoked capability itself stays");
    assert_eq!(s.k.domains[c as usize].caps.get(0), Err(Error::InvalidSlot));
    assert_eq!(s.k.domains[c as usize].caps.get(1), Err(Error::InvalidSlot));
    assert!(s.k.domains[c as usize].caps.get(2).is_ok(), "other objects untouched");
    assert_eq!(s.k.endpoints[ep as usize].refs, 4);
    // Rebuild a grandchild (and a great-grandchild) and revoke from the root in dom0.
    assert_eq!(s.hc(va, Hypercall::CapCopy, 0, &[cslot, rights::ALL, 0]), Ok(0));
    assert_eq!(s.hc(va, Hypercall::CapCopy, 0, &[cslot, rights::ALL, 0]), Ok(1));
    assert_eq!(s.hc(va, Hypercall::CapRevoke, 40, &[]), Err(Error::InvalidSlot));
    assert_eq!(s.hc(va, Hypercall::CapRevoke, 7, &[]), Err(Error::InvalidSlot));
    s.switch(v0);
    assert_eq!(s.hc(v0, Hypercall::CapRevoke, e, &[]), Ok(5), "a's, c's two, b's, mine");
    assert!(s.k.domains[d0 as usize].caps.get(e).is_ok());
    assert_eq!(s.k.domains[d0 as usize].caps.get(mine), Err(Error::InvalidSlot));
    assert_eq!(s.k.domains[a as usize].caps.get(0), Err(Error::InvalidSlot));
    assert!(s.k.domains[a as usize].caps.get(1).is_ok());
    assert_eq!(s.k.domains[b as usize].caps.get(0), Err(Error::InvalidSlot));
    assert_eq!(s.k.domains[c as usize].caps.get(0), Err(Error::InvalidSlot));
    assert_eq!(s.k.domains[c as usize].caps.get(1), Err(Error::InvalidSlot));
    assert!(s.k.domains[c as usize].caps.get(2).is_ok());
    assert_eq!(s.k.endpoints[ep as usize].refs, 1);
    assert_eq!(s.hc(v0, Hypercall::CapRevoke, e, &[]), Ok(0));
    // Revoking the memory capability takes a's copy, not what a made with it.
    assert_eq!(s.hc(v0, Hypercall::CapRevoke, dom0_slots::MEMORY, &[]), Ok(1));
    assert_eq!(s.k.domains[a as usize].caps.get(1), Err(Error::InvalidSlot));
    assert!(s.k.domains[a as usize].caps.get(cslot).is_ok());
    check_invariants(&s.k);
}

#[test]
fn cap_delete_drops_one_reference() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let e = s.endpoint();
    let c = s.copy(e, dom0_slots::SELF_DOMAIN, rights::ALL, 0).unwrap();
    let ep = s.endpoint_id(d0, e);
    assert_eq!(s.hc(v0, Hypercall::CapDelete, e, &[]), Ok(0));
    assert_eq!(s.hc(v0, Hypercall::CapDelete, e, &[]), Err(Error::InvalidSlot));
    assert_eq!(s.hc(v0, Hypercall::CapDelete, 64, &[]), Err(Error::InvalidSlot));
    assert_eq!(s.hc(v0, Hypercall::CapDelete, u64::MAX, &[]), Err(Error::InvalidSlot));
    assert_eq!(s.k.endpoints[ep as usize].refs, 1);
    // The copy still works after its parent is gone.
    assert_eq!(s.hc(v0, Hypercall::CapRevoke, c, &[]), Ok(0));
    assert_eq!(s.hc(v0, Hypercall::CapDelete, c, &[]), Ok(0));
    assert_eq!(s.k.endpoints[ep as usize].refs, 0);
    // The freed slot is reused.
    assert_eq!(s.endpoint(), e);
    check_invariants(&s.k);
}

/// Every hypercall that names a capability refuses empty, out-of-range, wrong-type and
/// under-privileged slots, in that order of checks.
#[test]
fn every_slot_taking_hypercall_checks_its_capability() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let e = s.endpoint();
    let n = s.notification();
    let reg = s.hc(v0, Hypercall::RegionCreate, dom0_slots::MEMORY, &[PAGE]).unwrap();
    // Capabilities with every right but of the wrong kind, and with no rights at all.
    let all_mem = s.k.grant_original(d0, Object::Memory, rights::ALL).unwrap();
    let g = s.k.domains[d0 as usize].generation;
    let all_dom = s.k.grant_original(d0, Object::Domain(d0, g), rights::ALL).unwrap();
    let none_ep = s.copy(e, dom0_slots::SELF_DOMAIN, 0, 0).unwrap();
    let none_ntf = s.copy(n, dom0_slots::SELF_DOMAIN, 0, 0).unwrap();
    let none_mem = s.copy(dom0_slots::MEMORY, dom0_slots::SELF_DOMAIN, 0, 0).unwrap();
    use Hypercall as H;
    // (call, needs a right, a wrong-type slot holding that right, an unprivileged slot of the right type)
    let cases = [
        (H::Call, all_mem, none_ep),
        (H::ReplyRecv, all_mem, none_ep),
        (H::Recv, all_mem, none_ep),
        (H::Signal, all_mem, none_ntf),
        (H::Wait, all_mem, none_ntf),
        (H::Poll, all_mem, none_ntf),
        (H::NotificationBind, all_mem, none_ntf),
        (H::TimerSet, all_mem, none_ntf),
        (H::Shutdown, all_mem, none_mem),
        (H::DomainCreate, all_dom, none_mem),
        (H::RegionCreate, all_dom, none_mem),
        (H::EndpointCreate, all_dom, none_mem),
        (H::NotificationCreate, all_dom, none_mem),
        (H::DomainWrite, all_mem, none_mem),
        (H::DomainDestroy, all_mem, none_mem),
        (H::DomainSetFaultEndpoint, all_mem, none_mem),
        (H::VcpuCreate, all_mem, none_mem),
        (H::VcpuStart, all_mem, none_mem),
        (H::Map, all_mem, none_mem),
        (H::Unmap, all_mem, none_mem),
        (H::CapCopy, e, none_mem),
    ];
    for (call, wrong, weak) in cases {
        for slot in [40, 63, 64, 1000, u64::MAX] {
            // CapCopy names its target domain in RDI.
            let (rbx, a) = if call == H::CapCopy { (e, [slot, rights::ALL, 0]) } else { (slot, [32, 0, 0]) };
            assert_eq!(s.hc(v0, call, rbx, &a), Err(Error::InvalidSlot), "{call:?} slot {slot}");
        }
        let (rbx, a) = if call == H::CapCopy { (e, [all_mem, rights::ALL, 0]) } else { (wrong, [32, 0, 0]) };
        assert_eq!(s.hc(v0, call, rbx, &a), Err(Error::WrongType), "{call:?} wrong type");
        let (rbx, a) = if call == H::CapCopy { (e, [weak, rights::ALL, 0]) } else { (weak, [32, 0, 0]) };
        assert_eq!(s.hc(v0, call, rbx, &a), Err(Error::PermissionDenied), "{call:?} without the right");
    }
    // Second capabilities: the endpoint of DomainSetFaultEndpoint, the region of Map/Unmap.
    let me = dom0_slots::SELF_DOMAIN;
    assert_eq!(s.hc(v0, H::DomainSetFaultEndpoint, me, &[50, 0]), Err(Error::InvalidSlot));
    assert_eq!(s.hc(v0, H::DomainSetFaultEndpoint, me, &[all_mem, 0]), Err(Error::WrongType));
    assert_eq!(s.hc(v0, H::DomainSetFaultEndpoint, me, &[none_ep, 0]), Err(Error::PermissionDenied));
    assert_eq!(s.hc(v0, H::Map, me, &[50, 0x4000_0000, 1]), Err(Error::InvalidSlot));
    assert_eq!(s.hc(v0, H::Map, me, &[e, 0x4000_0000, 1]), Err(Error::WrongType));
    assert_eq!(s.hc(v0, H::Unmap, me, &[n, 0]), Err(Error::WrongType));
    assert_eq!(s.hc(v0, H::Map, me, &[reg, 0x4000_0000, 1]), Ok(reg));
    // Revoke and delete only need a filled slot.
    for call in [H::CapRevoke, H::CapDelete] {
        for slot in [50, 64, u64::MAX] {
            assert_eq!(s.hc(v0, call, slot, &[]), Err(Error::InvalidSlot), "{call:?} {slot}");
        }
    }
    // A domain with an empty table can name nothing.
    let (_, dslot) = s.create_domain("empty", MIB2, DOM0_PRIO);
    let (v, _) = s.create_vcpu(dslot, true);
    s.switch(v);
    for &call in Hypercall::ALL {
        if matches!(call, H::Null | H::ConsoleWrite | H::DomainExit | H::Yield | H::Clock | H::VcpuSetMessagePage) {
            continue;
        }
        for slot in [0, 1, 63, 64] {
            assert_eq!(s.hc(v, call, slot, &[0, 0, 0]), Err(Error::InvalidSlot), "empty table: {call:?} slot {slot}");
        }
    }
    check_invariants(&s.k);
}

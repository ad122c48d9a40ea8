//! Kernel tests: domains: creation, writes, destruction, reachability.

use super::*;

#[test]
fn domain_create_success() {
    let mut s = boot();
    let free = s.p.free();
    let (d, slot) = s.create_domain("alpha", 3 << 20, 50);
    assert_eq!(slot, 4, "lowest free slot");
    let dom = &s.k.domains[d as usize];
    assert_eq!(dom.state, DomainState::Alive);
    assert_eq!(dom.name(), "alpha");
    assert_eq!(s.p.names[&d], "alpha");
    assert_eq!(dom.ram_size(), 4 << 20, "rounded up to 2 MiB");
    assert_eq!(dom.priority, 50);
    assert_eq!(dom.caps.iter().count(), 0, "a new domain has no capabilities");
    assert_eq!(s.cap(s.d0, slot).rights, rights::CONTROL);
    assert!(free - s.p.free() >= 1024);
    // Its RAM is zeroed, and the name buffer was read from the caller's RAM.
    assert_eq!(s.read_words(d, 0, 4), vec![0; 4]);
    let (_, max) = s.create_domain(&"x".repeat(DOMAIN_NAME_MAX), 1, 254);
    assert_eq!(max, 5);
    check_invariants(&s.k);
}

#[test]
fn domain_create_errors() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let free = s.p.free();
    s.k.write_ram(&mut s.p, d0, NAME_GPA, b"good name!").unwrap();
    let create = |s: &mut Sys, slot: u64, ram: u64, prio: u64, gpa: u64, len: u64| {
        s.hc(v0, Hypercall::DomainCreate, slot, &[ram, prio, gpa, len])
    };
    let mem = dom0_slots::MEMORY;
    assert_eq!(create(&mut s, 40, MIB2, 10, NAME_GPA, 4), Err(Error::InvalidSlot));
    assert_eq!(create(&mut s, u64::MAX, MIB2, 10, NAME_GPA, 4), Err(Error::InvalidSlot));
    assert_eq!(create(&mut s, dom0_slots::SELF_DOMAIN, MIB2, 10, NAME_GPA, 4), Err(Error::WrongType));
    assert_eq!(create(&mut s, dom0_slots::MACHINE, MIB2, 10, NAME_GPA, 4), Err(Error::WrongType));
    let weak = s.copy(mem, dom0_slots::SELF_DOMAIN, rights::GRANT, 0).unwrap();
    assert_eq!(create(&mut s, weak, MIB2, 10, NAME_GPA, 4), Err(Error::PermissionDenied));
    // Names: length, characters, address.
    assert_eq!(create(&mut s, mem, MIB2, 10, NAME_GPA, 0), Err(Error::InvalidArgument));
    assert_eq!(create(&mut s, mem, MIB2, 10, NAME_GPA, DOMAIN_NAME_MAX as u64 + 1), Err(Error::InvalidArgument));
    assert_eq!(create(&mut s, mem, MIB2, 10, NAME_GPA, u64::MAX), Err(Error::InvalidArgument));
    assert_eq!(create(&mut s, mem, MIB2, 10, NAME_GPA, 10), Err(Error::InvalidArgument), "space in the name");
    assert_eq!(create(&mut s, mem, MIB2, 10, NAME_GPA + 20, 4), Err(Error::InvalidArgument), "NULs in the name");
    assert_eq!(create(&mut s, mem, MIB2, 10, DOM0_RAM - 2, 4), Err(Error::BadAddress));
    assert_eq!(create(&mut s, mem, MIB2, 10, u64::MAX - 1, 4), Err(Error::BadAddress));
    // Priority and size.
    for prio in [0, 255, 256, u64::MAX] {
        assert_eq!(create(&mut s, mem, MIB2, prio, NAME_GPA, 4), Err(Error::InvalidArgument), "priority {prio}");
    }
    assert_eq!(create(&mut s, mem, 0, 10, NAME_GPA, 4), Err(Error::InvalidArgument));
    assert_eq!(create(&mut s, mem, (1 << 30) + 1, 10, NAME_GPA, 4), Err(Error::InvalidArgument));
    assert_eq!(create(&mut s, mem, u64::MAX, 10, NAME_GPA, 4), Err(Error::InvalidArgument));
    // More RAM than there is: nothing leaks.
    let live = s.p.live.clone();
    assert_eq!(create(&mut s, mem, 60 << 20, 10, NAME_GPA, 4), Err(Error::OutOfMemory));
    assert_eq!(create(&mut s, mem, 1 << 30, 10, NAME_GPA, 4), Err(Error::OutOfMemory));
    assert_eq!(s.p.live, live);
    assert_eq!(s.p.free(), free);
    assert_eq!(s.live_domains(), 1);
    assert_eq!(create(&mut s, mem, MIB2, 10, NAME_GPA, 4), Ok(weak + 1));
    check_invariants(&s.k);
}

#[test]
fn domain_table_full_is_out_of_memory() {
    let mut s = boot();
    for i in 1..MAX_DOMAINS {
        s.create_domain(&format!("d{i}"), MIB2, 10);
    }
    assert_eq!(s.live_domains(), MAX_DOMAINS);
    let free = s.p.free();
    let r = s.hc(s.v0, Hypercall::DomainCreate, dom0_slots::MEMORY, &[MIB2, 10, NAME_GPA, 2]);
    assert_eq!(r, Err(Error::OutOfMemory));
    assert_eq!(s.p.free(), free);
    check_invariants(&s.k);
}

#[test]
fn full_capability_table_is_no_free_slot_and_leaks_nothing() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let (x, xslot) = s.create_domain("x", MIB2, 10);
    let nslot = s.notification();
    while s.k.domains[d0 as usize].caps.iter().count() < CAP_SLOTS {
        s.endpoint();
    }
    let free = s.p.free();
    let live = s.p.live.clone();
    let eps = s.k.endpoints.iter().filter(|e| e.refs > 0).count();
    let ntfs = s.k.notifications.iter().filter(|n| n.refs > 0).count();
    let vcpus = s.live_vcpus();
    let mem = dom0_slots::MEMORY;
    s.k.write_ram(&mut s.p, d0, NAME_GPA, b"full").unwrap();
    assert_eq!(s.hc(v0, Hypercall::DomainCreate, mem, &[MIB2, 10, NAME_GPA, 4]), Err(Error::NoFreeSlot));
    assert_eq!(s.live_domains(), 2, "the domain is destroyed again");
    assert_eq!(s.hc(v0, Hypercall::RegionCreate, mem, &[3 * PAGE]), Err(Error::NoFreeSlot));
    assert_eq!(s.hc(v0, Hypercall::EndpointCreate, mem, &[]), Err(Error::NoFreeSlot));
    assert_eq!(s.hc(v0, Hypercall::NotificationCreate, mem, &[]), Err(Error::NoFreeSlot));
    assert_eq!(s.hc(v0, Hypercall::VcpuCreate, xslot, &[0, 0]), Err(Error::NoFreeSlot));
    assert_eq!(s.copy(nslot, dom0_slots::SELF_DOMAIN, rights::ALL, 0), Err(Error::NoFreeSlot));
    assert_eq!(s.p.free(), free);
    assert_eq!(s.p.live, live);
    assert_eq!(s.k.endpoints.iter().filter(|e| e.refs > 0).count(), eps);
    assert_eq!(s.k.notifications.iter().filter(|n| n.refs > 0).count(), ntfs);
    assert_eq!(s.live_vcpus(), vcpus, "a vCPU nobody holds a capability to was left behind");
    assert_eq!(s.k.domains[x as usize].vcpus, 0);
    // A full target table.
    for _ in 0..CAP_SLOTS {
        s.copy(nslot, xslot, rights::ALL, 0).unwrap();
    }
    assert_eq!(s.copy(nslot, xslot, rights::ALL, 0), Err(Error::NoFreeSlot));
    check_invariants(&s.k);
}

#[test]
fn domain_write_copies_into_the_target() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let (d, slot) = s.create_domain("target", 4 << 20, 10);
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    s.k.write_ram(&mut s.p, d0, 0x30_0000 - 100, &data).unwrap();
    let dst = MIB2 - 5000; // crosses a 2 MiB chunk of the target
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, slot, &[dst, 0x30_0000 - 100, data.len() as u64]).map(|_| ()), Ok(()));
    let mut back = vec![0u8; data.len()];
    s.k.read_ram(&s.p, d, dst, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, slot, &[0, 0, 0]).map(|_| ()), Ok(()));
    // Errors: source or destination outside RAM, overflowing addresses, wrong capability.
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, slot, &[0, DOM0_RAM - 10, 20]), Err(Error::BadAddress));
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, slot, &[(4 << 20) - 10, 0, 20]), Err(Error::BadAddress));
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, slot, &[u64::MAX - 5, 0, 20]), Err(Error::BadAddress));
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, slot, &[0, u64::MAX - 5, 20]), Err(Error::BadAddress));
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, slot, &[0, 0, u64::MAX]), Err(Error::BadAddress));
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, dom0_slots::MEMORY, &[0, 0, 1]), Err(Error::WrongType));
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, 50, &[0, 0, 1]), Err(Error::InvalidSlot));
    // Writing into dom0 itself through its own capability works too.
    assert_eq!(
        s.hc(v0, Hypercall::DomainWrite, dom0_slots::SELF_DOMAIN, &[0x40_0000, 0x30_0000 - 100, 16]),
        Ok(0x40_0000)
    );
}

#[test]
fn domain_destroy_returns_all_memory_and_stales_capabilities() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let free = s.p.free();
    let live = s.p.live.clone();
    let (d, dslot) = s.create_domain("victim", 4 << 20, 10);
    let (v, vslot) = s.create_vcpu(dslot, true);
    let e = s.endpoint();
    let n = s.notification();
    let reg = s.hc(v0, Hypercall::RegionCreate, dom0_slots::MEMORY, &[5 * PAGE]).unwrap();
    assert_eq!(s.hc(v0, Hypercall::Map, dslot, &[reg, 0x4000_0000, rights::READ | rights::WRITE]), Ok(reg));
    s.copy(e, dslot, rights::ALL, 0).unwrap();
    s.copy(n, dslot, rights::ALL, 0).unwrap();
    s.copy(reg, dslot, rights::READ, 0).unwrap();
    s.hc(v0, Hypercall::DomainSetFaultEndpoint, dslot, &[e, 9]).unwrap();
    // The victim waits in the endpoint; its console has a partial line.
    s.k.write_ram(&mut s.p, d, BUF_GPA, b"last words").unwrap();
    s.switch(v);
    assert_eq!(s.hc(v, Hypercall::ConsoleWrite, 0, &[BUF_GPA, 10]), Ok(BUF_GPA));
    s.raw(v, Hypercall::Recv.number(), 0, 0, [0; 6]);
    s.k.schedule();
    assert_eq!(s.k.current, Some(v0));
    let changes = s.p.stage2_changes.get(&d).copied().unwrap_or(0);
    assert_eq!(s.hc(v0, Hypercall::DomainDestroy, dslot, &[]), Ok(0));
    check_invariants(&s.k);
    assert_eq!(s.k.domains[d as usize].state, DomainState::Free);
    assert_eq!(s.state(v), VcpuState::Free);
    assert_eq!(s.p.lines_of("victim"), vec!["last words"], "console flushed on destroy");
    assert!(s.p.stage2_changes[&d] > changes);
    assert!(s.k.endpoints[s.endpoint_id(d0, e) as usize].receivers.is_empty());
    // Every capability to the domain or its vCPU is stale now.
    let stale = Err(Error::StaleCapability);
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, dslot, &[0, 0, 1]), stale);
    assert_eq!(s.hc(v0, Hypercall::DomainDestroy, dslot, &[]), stale);
    assert_eq!(s.hc(v0, Hypercall::VcpuCreate, dslot, &[0, 0]), stale);
    assert_eq!(s.hc(v0, Hypercall::VcpuStart, vslot, &[]), stale);
    assert_eq!(s.hc(v0, Hypercall::DomainSetFaultEndpoint, dslot, &[e, 0]), stale);
    assert_eq!(s.hc(v0, Hypercall::Map, dslot, &[reg, 0x5000_0000, rights::READ]), stale);
    assert_eq!(s.hc(v0, Hypercall::Unmap, dslot, &[reg]), stale);
    assert_eq!(s.copy(e, dslot, rights::ALL, 0), stale);
    // A new domain in the same place does not revive the old capabilities.
    let (d2, d2slot) = s.create_domain("reborn", MIB2, 10);
    assert_eq!(d2, d);
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, dslot, &[0, 0, 1]), stale);
    let (v2, _) = s.create_vcpu(d2slot, false);
    assert_eq!(v2, v);
    assert_eq!(s.hc(v0, Hypercall::VcpuStart, vslot, &[]), stale);
    // Destroy the new one and drop dom0's capabilities: every frame is back.
    s.hc(v0, Hypercall::DomainDestroy, d2slot, &[]).unwrap();
    for slot in 4..CAP_SLOTS as u64 {
        let _ = s.hc(v0, Hypercall::CapDelete, slot, &[]);
    }
    assert_eq!(s.p.free(), free);
    assert_eq!(s.p.live, live);
    assert!(s.k.endpoints.iter().all(|e| e.refs == 0), "an endpoint reference was leaked");
    assert!(s.k.notifications.iter().all(|n| n.refs == 0));
    assert!(s.k.regions.iter().all(|r| r.refs == 0));
    check_invariants(&s.k);
}

#[test]
fn domain_destroy_errors() {
    let mut s = boot();
    let v0 = s.v0;
    assert_eq!(s.hc(v0, Hypercall::DomainDestroy, dom0_slots::SELF_DOMAIN, &[]), Err(Error::InvalidArgument));
    assert_eq!(s.hc(v0, Hypercall::DomainDestroy, dom0_slots::MEMORY, &[]), Err(Error::WrongType));
    assert_eq!(s.hc(v0, Hypercall::DomainDestroy, 64, &[]), Err(Error::InvalidSlot));
    let (_, dslot) = s.create_domain("x", MIB2, 10);
    let weak = s.copy(dslot, dom0_slots::SELF_DOMAIN, rights::GRANT, 0);
    assert_eq!(weak, Err(Error::PermissionDenied), "a domain capability has no GRANT");
    assert_eq!(s.live_domains(), 2);
}

#[test]
fn vcpus_create_and_start() {
    let mut s = boot();
    let v0 = s.v0;
    let (d, dslot) = s.create_domain("guest", MIB2, 10);
    let slot = s.hc(v0, Hypercall::VcpuCreate, dslot, &[0xabc, 0xdef]).unwrap();
    let Object::Vcpu(v, g) = s.cap(s.d0, slot).object else { panic!() };
    assert_eq!(s.cap(s.d0, slot).rights, rights::CONTROL);
    assert_eq!(s.state(v), VcpuState::Created);
    assert_eq!(s.k.vcpus[v as usize].generation, g);
    assert_eq!(s.k.vcpus[v as usize].domain, d);
    assert_eq!((s.regs(v).rip, s.regs(v).rbx), (0xabc, 0xdef));
    let root = s.k.domains[d as usize].stage2.as_ref().unwrap().root();
    assert_eq!(
        s.p.boots.last(),
        Some(&(v, VcpuBoot { entry: 0xabc, rbx: 0xdef, domain: d, stage2_root: root, vm: false }))
    );
    assert!(!s.k.runq.contains(v, 10, &s.k.next));
    assert_eq!(s.hc(v0, Hypercall::VcpuStart, slot, &[]), Ok(0));
    assert_eq!(s.state(v), VcpuState::Ready);
    assert_eq!(s.hc(v0, Hypercall::VcpuStart, slot, &[]), Err(Error::InvalidState));
    assert_eq!(s.hc(v0, Hypercall::VcpuStart, dom0_slots::SELF_VCPU, &[]), Err(Error::InvalidState));
    assert_eq!(s.hc(v0, Hypercall::VcpuStart, dslot, &[]), Err(Error::WrongType));
    assert_eq!(s.hc(v0, Hypercall::VcpuStart, 63, &[]), Err(Error::InvalidSlot));
    assert_eq!(s.hc(v0, Hypercall::VcpuCreate, dom0_slots::MEMORY, &[0, 0]), Err(Error::WrongType));
    // A second vCPU gets the next index in its domain.
    let (v2, _) = s.create_vcpu(dslot, false);
    assert_eq!(s.k.vcpus[v2 as usize].index_in_domain, 1);
    // The vCPU table fills up.
    while s.live_vcpus() < MAX_VCPUS {
        s.create_vcpu(dslot, false);
    }
    assert_eq!(s.hc(v0, Hypercall::VcpuCreate, dslot, &[0, 0]), Err(Error::OutOfMemory));
    check_invariants(&s.k);
}

#[test]
fn message_page_registration() {
    let mut s = boot();
    let v0 = s.v0;
    let hpa0 = s.k.domains[s.d0 as usize].ram_hpa(0).unwrap();
    assert_eq!(s.hc(v0, Hypercall::VcpuSetMessagePage, 0, &[PAGE_GPA]), Ok(PAGE_GPA));
    assert_eq!(s.k.vcpus[v0 as usize].msg_page, Some(hpa0 + PAGE_GPA));
    assert_eq!(s.hc(v0, Hypercall::VcpuSetMessagePage, 0, &[DOM0_RAM - PAGE]), Ok(DOM0_RAM - PAGE));
    for bad in [PAGE_GPA + 8, DOM0_RAM, DOM0_RAM + PAGE, !0xfff_u64, u64::MAX] {
        assert_eq!(s.hc(v0, Hypercall::VcpuSetMessagePage, 0, &[bad]), Err(Error::BadAddress), "{bad:#x}");
    }
    assert!(s.k.vcpus[v0 as usize].msg_page.is_some());
    assert_eq!(s.hc(v0, Hypercall::VcpuSetMessagePage, 0, &[0]), Ok(0));
    assert_eq!(s.k.vcpus[v0 as usize].msg_page, None);
}

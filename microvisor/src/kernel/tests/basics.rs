//! Kernel tests: boot and the basic hypercalls.

use super::*;

#[test]
fn boot_gives_dom0_its_well_known_slots() {
    let s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let g = s.k.domains[d0 as usize].generation;
    assert_eq!(s.cap(d0, dom0_slots::SELF_DOMAIN).object, Object::Domain(d0, g));
    assert_eq!(s.cap(d0, dom0_slots::SELF_DOMAIN).rights, rights::CONTROL);
    assert_eq!(s.cap(d0, dom0_slots::MEMORY).object, Object::Memory);
    assert_eq!(s.cap(d0, dom0_slots::MEMORY).rights, rights::CONTROL | rights::GRANT);
    assert_eq!(s.cap(d0, dom0_slots::SELF_VCPU).object, Object::Vcpu(v0, s.k.vcpus[v0 as usize].generation));
    assert_eq!(s.cap(d0, dom0_slots::MACHINE).object, Object::Machine);
    assert_eq!(s.k.domains[d0 as usize].caps.get(4), Err(Error::InvalidSlot));
    let root = s.k.domains[d0 as usize].stage2.as_ref().unwrap().root();
    let boot = VcpuBoot { entry: DOM0_ENTRY, rbx: 0x7000, domain: d0, stage2_root: root, vm: false };
    assert_eq!(s.p.boots, vec![(v0, boot)]);
    assert_eq!(s.regs(v0).rip, DOM0_ENTRY);
    assert_eq!(s.regs(v0).rbx, 0x7000);
    assert_eq!(s.k.domains[d0 as usize].name(), "dom0");
    assert_eq!(s.p.names[&d0], "dom0");
    assert_eq!(s.k.domains[d0 as usize].ram_size(), DOM0_RAM);
    // Four 2 MiB chunks of RAM and a few tables.
    let used = PHYS_SIZE / PAGE - s.p.free();
    assert!((2048..2048 + 16).contains(&used), "{used} frames used");
    assert!(s.k.any_alive());
    check_invariants(&s.k);
}

#[test]
fn null_clock_yield_and_unknown_numbers() {
    let mut s = boot();
    let v0 = s.v0;
    let w = [1, 2, 3, 4, 5, 6];
    s.raw(v0, Hypercall::Null.number(), 77, 9, w);
    let r = s.regs(v0);
    assert_eq!((r.rax, r.rbx, r.rcx, words(&r)), (0, 77, 9, w), "Null changes nothing but RAX");
    s.p.now = 123_456;
    assert_eq!(s.hc(v0, Hypercall::Clock, 0, &[]), Ok(123_456));
    let r = s.regs(v0);
    assert_eq!((r.rsi, r.rdx), (5, 2_000_000), "Clock gives the platform's TSC rate too");
    for nr in [8, 7, 9, 27, 23, 43, 67, 1000, u64::MAX] {
        s.raw(v0, nr, 0, 3, w);
        let r = s.regs(v0);
        assert_eq!(r.rax, Error::UnknownHypercall.code(), "number {nr}");
        assert_eq!((r.rcx, words(&r)), (3, w), "number {nr} changed registers");
    }
    // Yield with nobody else ready keeps running.
    assert_eq!(s.hc(v0, Hypercall::Yield, 0, &[]), Ok(0));
    assert_eq!(s.k.current, Some(v0));
    assert_eq!(s.k.stats.hypercalls, 1 + 1 + 9 + 1);
    check_invariants(&s.k);
}

#[test]
fn console_write_assembles_prefixed_lines() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    s.k.write_ram(&mut s.p, d0, BUF_GPA, b"hello\nwor").unwrap();
    assert_eq!(s.hc(v0, Hypercall::ConsoleWrite, 0, &[BUF_GPA, 9]), Ok(BUF_GPA));
    assert_eq!(s.p.lines_of("dom0"), vec!["hello"]);
    s.k.write_ram(&mut s.p, d0, BUF_GPA, b"ld\n\x1b[2J\n").unwrap();
    assert_eq!(s.hc(v0, Hypercall::ConsoleWrite, 0, &[BUF_GPA, 8]), Ok(BUF_GPA));
    assert_eq!(s.p.lines_of("dom0"), vec!["hello", "world", "?[2J"]);
    assert_eq!(s.hc(v0, Hypercall::ConsoleWrite, 0, &[BUF_GPA, 0]), Ok(BUF_GPA));
    assert_eq!(s.hc(v0, Hypercall::ConsoleWrite, 0, &[0, CONSOLE_WRITE_MAX]), Ok(0));
    assert_eq!(s.hc(v0, Hypercall::ConsoleWrite, 0, &[0, CONSOLE_WRITE_MAX + 1]), Err(Error::InvalidArgument));
    assert_eq!(s.hc(v0, Hypercall::ConsoleWrite, 0, &[DOM0_RAM - 2, 4]), Err(Error::BadAddress));
    assert_eq!(s.hc(v0, Hypercall::ConsoleWrite, 0, &[u64::MAX - 1, 4]), Err(Error::BadAddress));
    assert_eq!(s.hc(v0, Hypercall::ConsoleWrite, 0, &[1 << 40, 1]), Err(Error::BadAddress));
}

#[test]
fn console_read_needs_the_machine_with_read() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    s.p.typed = b"uname -r\n".to_vec();
    assert_eq!(s.hc(v0, Hypercall::ConsoleRead, dom0_slots::MACHINE, &[BUF_GPA, 5]), Ok(5));
    let mut got = [0u8; 5];
    s.k.read_ram(&s.p, d0, BUF_GPA, &mut got).unwrap();
    assert_eq!(&got, b"uname");
    // A bad buffer takes nothing.
    assert_eq!(s.hc(v0, Hypercall::ConsoleRead, dom0_slots::MACHINE, &[DOM0_RAM - 2, 4]), Err(Error::BadAddress));
    assert_eq!(s.hc(v0, Hypercall::ConsoleRead, dom0_slots::MACHINE, &[BUF_GPA, 100]), Ok(4));
    assert_eq!(s.hc(v0, Hypercall::ConsoleRead, dom0_slots::MACHINE, &[BUF_GPA, 100]), Ok(0));
    // Without READ (CONTROL alone), or on another object: refused.
    let (_, dslot) = s.create_domain("other", MIB2, 10);
    let me = dom0_slots::SELF_DOMAIN;
    let control = s.copy(dom0_slots::MACHINE, me, rights::CONTROL, 0).unwrap();
    assert_eq!(s.hc(v0, Hypercall::ConsoleRead, control, &[BUF_GPA, 1]), Err(Error::PermissionDenied));
    assert_eq!(s.hc(v0, Hypercall::ConsoleRead, dslot, &[BUF_GPA, 1]), Err(Error::PermissionDenied));
    let read = s.copy(dom0_slots::MACHINE, me, rights::READ, 0).unwrap();
    s.p.typed = b"x".to_vec();
    assert_eq!(s.hc(v0, Hypercall::ConsoleRead, read, &[BUF_GPA, 1]), Ok(1));
}

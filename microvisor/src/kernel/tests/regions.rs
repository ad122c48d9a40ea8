//! Kernel tests: memory regions.

use super::*;

#[test]
fn regions_create_map_unmap() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let free = s.p.free();
    let (d, dslot) = s.create_domain("guest", MIB2, 10);
    let reg = s.hc(v0, Hypercall::RegionCreate, dom0_slots::MEMORY, &[3 * PAGE - 1]).unwrap();
    let c = s.cap(d0, reg);
    let Object::Region(r) = c.object else { panic!() };
    assert_eq!(c.rights, rights::READ | rights::WRITE | rights::EXEC | rights::GRANT);
    assert_eq!(s.k.regions[r as usize].frames, 3);
    let rw = rights::READ | rights::WRITE;
    let gpa = 0x4000_0000;
    assert_eq!(s.hc(v0, Hypercall::Map, dslot, &[reg, gpa, rw]), Ok(reg));
    let t = s.k.domains[d as usize].stage2.as_ref().unwrap().translate(&s.p, gpa + PAGE + 5).unwrap();
    assert_eq!(t.hpa, s.k.regions[r as usize].hpa + PAGE + 5);
    assert_eq!(t.access, crate::stage2::Access::READ | crate::stage2::Access::WRITE);
    assert_eq!(s.k.regions[r as usize].refs, 2);
    // The same region mapped into dom0 too: shared memory.
    assert_eq!(s.hc(v0, Hypercall::Map, dom0_slots::SELF_DOMAIN, &[reg, 0x1_0000_0000, rights::READ]), Ok(reg));
    // Errors.
    let map = |s: &mut Sys, slot, reg, gpa, acc| s.hc(v0, Hypercall::Map, slot, &[reg, gpa, acc]);
    assert_eq!(map(&mut s, dslot, reg, 0x5000_0000, rw), Err(Error::AlreadyMapped), "once per domain");
    let reg2 = s.hc(v0, Hypercall::RegionCreate, dom0_slots::MEMORY, &[PAGE]).unwrap();
    assert_eq!(map(&mut s, dslot, reg2, gpa + 2 * PAGE, rw), Err(Error::AlreadyMapped), "overlap");
    assert_eq!(map(&mut s, dslot, reg2, 0x10_0000, rw), Err(Error::AlreadyMapped), "inside RAM");
    assert_eq!(map(&mut s, dslot, reg2, 0, rw), Err(Error::AlreadyMapped), "inside RAM");
    assert_eq!(map(&mut s, dslot, reg2, gpa + 3 * PAGE + 1, rw), Err(Error::InvalidArgument), "unaligned");
    assert_eq!(map(&mut s, dslot, reg2, 1 << 48, rw), Err(Error::InvalidArgument), "beyond stage-2");
    assert_eq!(map(&mut s, dslot, reg2, !0xfff_u64, rw), Err(Error::InvalidArgument));
    assert_eq!(map(&mut s, dslot, reg2, gpa + 4 * PAGE, rights::WRITE), Err(Error::InvalidArgument), "no READ");
    assert_eq!(map(&mut s, dslot, reg2, gpa + 4 * PAGE, rights::CALL | rights::READ), Err(Error::PermissionDenied));
    let ro = s.copy(reg2, dom0_slots::SELF_DOMAIN, rights::READ, 0).unwrap();
    assert_eq!(map(&mut s, dslot, ro, gpa + 4 * PAGE, rw), Err(Error::PermissionDenied));
    assert_eq!(map(&mut s, dslot, dslot, gpa + 4 * PAGE, rw), Err(Error::WrongType));
    assert_eq!(map(&mut s, reg2, reg2, gpa + 4 * PAGE, rw), Err(Error::PermissionDenied), "no CONTROL");
    assert_eq!(map(&mut s, dom0_slots::MEMORY, reg2, gpa + 4 * PAGE, rw), Err(Error::WrongType));
    assert_eq!(map(&mut s, dslot, 60, gpa + 4 * PAGE, rw), Err(Error::InvalidSlot));
    assert_eq!(map(&mut s, dslot, ro, gpa + 3 * PAGE, rights::READ), Ok(ro), "right after the first");
    // Region sizes.
    let rc = |s: &mut Sys, bytes| s.hc(v0, Hypercall::RegionCreate, dom0_slots::MEMORY, &[bytes]);
    assert_eq!(rc(&mut s, 0), Err(Error::InvalidArgument));
    assert_eq!(rc(&mut s, (256 << 20) + 1), Err(Error::InvalidArgument));
    assert_eq!(rc(&mut s, 200 << 20), Err(Error::OutOfMemory));
    assert_eq!(rc(&mut s, 1), Ok(ro + 1));
    // Unmap.
    let changes = s.p.stage2_changes.get(&d).copied().unwrap_or(0);
    assert_eq!(s.hc(v0, Hypercall::Unmap, dslot, &[reg]), Ok(reg));
    assert!(s.p.stage2_changes[&d] > changes, "TLB flush asked for");
    assert!(s.k.domains[d as usize].stage2.as_ref().unwrap().translate(&s.p, gpa).is_none());
    assert_eq!(s.hc(v0, Hypercall::Unmap, dslot, &[reg]), Err(Error::NotMapped));
    assert_eq!(s.hc(v0, Hypercall::Unmap, dslot, &[dslot]), Err(Error::WrongType));
    // A mapping keeps the region alive after its capabilities are gone.
    assert_eq!(s.hc(v0, Hypercall::CapDelete, reg, &[]), Ok(0));
    assert_eq!(s.k.regions[r as usize].refs, 1);
    assert_eq!(s.k.regions[r as usize].frames, 3);
    assert_eq!(s.hc(v0, Hypercall::Unmap, dom0_slots::SELF_DOMAIN, &[reg]), Err(Error::InvalidSlot));
    check_invariants(&s.k);
    // Destroying dom0's mapping is impossible without the capability; destroying the guest
    // drops its mapping of reg2/ro. Drop everything and count frames.
    s.hc(v0, Hypercall::DomainDestroy, dslot, &[]).unwrap();
    let mapping = s.k.domains[d0 as usize].mappings[0];
    s.k.unmap_region(&mut s.p, d0, mapping.region).unwrap();
    for slot in 4..CAP_SLOTS as u64 {
        let _ = s.hc(v0, Hypercall::CapDelete, slot, &[]);
    }
    assert_eq!(s.p.free(), free);
    check_invariants(&s.k);
}

#[test]
fn map_fixed_maps_host_memory_read_only() {
    let mut s = boot();
    let d0 = s.d0;
    let hpa = s.p.alloc_frames(3, PAGE).unwrap();
    assert_eq!(s.k.map_fixed(&mut s.p, d0, 0x8000_0000, hpa, 2 * PAGE + 1), Ok(()));
    let stage2 = s.k.domains[d0 as usize].stage2.as_ref().unwrap();
    let t = stage2.translate(&s.p, 0x8000_0000 + 2 * PAGE + 7).unwrap();
    assert_eq!(t.hpa, hpa + 2 * PAGE + 7, "the size is rounded up to whole pages");
    assert_eq!(t.access, crate::stage2::Access::READ);
    assert!(stage2.translate(&s.p, 0x8000_0000 + 3 * PAGE).is_none());
    assert_eq!(s.k.map_fixed(&mut s.p, d0, 0x8000_0000, hpa, PAGE), Err(Error::AlreadyMapped));
    assert_eq!(s.k.map_fixed(&mut s.p, d0, 0, hpa, PAGE), Err(Error::AlreadyMapped), "over RAM");
    // Not RAM: the kernel never reads or writes it on the domain's behalf.
    assert_eq!(s.hc(s.v0, Hypercall::ConsoleWrite, 0, &[0x8000_0000, 1]), Err(Error::BadAddress));
    assert_eq!(s.k.map_fixed(&mut s.p, 5, 0, hpa, PAGE), Err(Error::InvalidState), "a free domain");
}

#[test]
fn too_many_mappings_is_out_of_memory() {
    let mut s = boot();
    let v0 = s.v0;
    let (_, dslot) = s.create_domain("guest", MIB2, 10);
    for i in 0..MAX_MAPPINGS as u64 {
        let reg = s.hc(v0, Hypercall::RegionCreate, dom0_slots::MEMORY, &[PAGE]).unwrap();
        assert_eq!(s.hc(v0, Hypercall::Map, dslot, &[reg, 0x4000_0000 + i * PAGE, rights::READ]), Ok(reg));
    }
    let reg = s.hc(v0, Hypercall::RegionCreate, dom0_slots::MEMORY, &[PAGE]).unwrap();
    assert_eq!(s.hc(v0, Hypercall::Map, dslot, &[reg, 0x5000_0000, rights::READ]), Err(Error::OutOfMemory));
    check_invariants(&s.k);
}

/// A region of a few MiB (a block channel's data area) starts on a 2 MiB boundary, so a
/// 2 MiB-aligned mapping of it takes 2 MiB leaves (one IOTLB entry each for its device's
/// DMA), with 4 KiB leaves for the tail.
#[test]
fn large_regions_are_mapped_with_large_pages() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let (d, dslot) = s.create_domain("guest", MIB2, 10);
    // Single frames taken (small gaps first) until one starts a 2 MiB boundary: the next
    // free frame is then not on one, and a first fit would start the region there.
    let mut boundary = false;
    for _ in 0..4096 {
        if s.p.frames.alloc(1, PAGE).unwrap().is_multiple_of(MIB2) {
            boundary = true;
            break;
        }
    }
    assert!(boundary);
    let bytes = 2 * MIB2 + 16 * PAGE;
    let reg = s.hc(v0, Hypercall::RegionCreate, dom0_slots::MEMORY, &[bytes]).unwrap();
    let Object::Region(r) = s.cap(d0, reg).object else { panic!() };
    let hpa = s.k.regions[r as usize].hpa;
    assert!(hpa.is_multiple_of(MIB2), "a large region starts on a 2 MiB boundary");
    let gpa = 0x4000_0000;
    assert_eq!(s.hc(v0, Hypercall::Map, dslot, &[reg, gpa, rights::READ | rights::WRITE]), Ok(reg));
    let stage2 = s.k.domains[d as usize].stage2.as_ref().unwrap();
    let at = |off: u64| stage2.translate(&s.p, gpa + off).unwrap();
    assert_eq!(at(MIB2 + 5).page_size, crate::stage2::PageSize::Size2M);
    assert_eq!(at(MIB2 + 5).hpa, hpa + MIB2 + 5);
    assert_eq!(at(2 * MIB2 + 3 * PAGE).page_size, crate::stage2::PageSize::Size4K);
    // A small one needs no such alignment (and takes 4 KiB leaves wherever it lands).
    let small = s.hc(v0, Hypercall::RegionCreate, dom0_slots::MEMORY, &[3 * PAGE]).unwrap();
    let Object::Region(r2) = s.cap(d0, small).object else { panic!() };
    assert_eq!(s.k.regions[r2 as usize].frames, 3);
}

//! Kernel tests: VMs: exits to a VMM, and what a VMM may do.

use super::exits::faulty;
use super::*;

/// dom0 is the VMM of a VM with one running vCPU; its exits arrive on endpoint `e`.
struct VmSys {
    s: Sys,
    e: u64,
    vm: DomainId,
    vmslot: u64,
    vcpuslot: u64,
    v: VcpuId,
}

fn vm_sys(extra_state: u16) -> VmSys {
    let mut s = boot();
    let e = s.endpoint();
    s.k.write_ram(&mut s.p, s.d0, NAME_GPA, b"vm").unwrap();
    let args = [MIB2, DOM0_PRIO as u64 - 10, NAME_GPA, 2, ipc_spec::hypercall::domain_flags::VM];
    let vmslot = s.hc(s.v0, Hypercall::DomainCreate, dom0_slots::MEMORY, &args).unwrap();
    assert_eq!(s.cap(s.d0, vmslot).rights, rights::CONTROL | rights::VMM | rights::GRANT);
    let Object::Domain(vm, _) = s.cap(s.d0, vmslot).object else { panic!() };
    assert!(s.k.domains[vm as usize].vm);
    s.hc(s.v0, Hypercall::DomainSetFaultEndpoint, vmslot, &[e, 0x77, extra_state as u64]).unwrap();
    let (v, vcpuslot) = s.create_vcpu(vmslot, true);
    assert!(s.k.vcpus[v as usize].vm);
    assert!(s.p.boots.last().unwrap().1.vm);
    VmSys { s, e, vm, vmslot, vcpuslot, v }
}

impl VmSys {
    /// The VM's vCPU runs and exits with `x`; dom0 (waiting in Recv) gets the message.
    fn exit(&mut self, x: PendingExit) -> Regs {
        let (v0, v) = (self.s.v0, self.v);
        if self.s.k.current == Some(v0) {
            self.s.raw(v0, Hypercall::Recv.number(), self.e, 0, [0; 6]);
        }
        self.s.k.schedule();
        self.s.switch(v);
        assert!(self.s.k.exit(&mut self.s.p, v, x));
        assert_eq!(self.s.k.current, Some(v0));
        assert_eq!(self.s.state(v), VcpuState::BlockedFault(v0));
        self.s.regs(v0)
    }

    fn reply(&mut self, r: ExitReply) -> Result<u64, Error> {
        let v0 = self.s.v0;
        self.s.raw(v0, Hypercall::ReplyRecv.number(), self.e, 6, r.encode());
        if self.s.k.current == Some(v0) {
            return self.s.status(v0);
        }
        Ok(0)
    }
}

#[test]
fn an_exit_message_carries_its_facts_and_the_state_groups_asked_for() {
    let mut t = vm_sys(ipc_spec::exit::state::DT);
    let v = t.v;
    t.s.k.vcpus[v as usize].regs = Regs { rip: 0x1000, rax: 0xaa, r9: 9, rsp: 0x8000, ..Regs::default() };
    t.s.p.hw.insert(v, ArchState { cr3: 0x5000, gdtr: (0x6000, 0x27), ..ArchState::default() });
    // Without a message page: registers only, no state.
    let r = t.exit(PendingExit { kind: ExitKind::Io, insn_len: 2, a: 0x80 | 1 << 16 | 1 << 24, b: 0xaa });
    assert_eq!((r.rbx, r.rcx), (0x77, 6));
    let m = ipc_spec::exit::ExitMessage::decode(&words(&r)).unwrap();
    assert_eq!((m.kind, m.insn_len, m.state, m.rip, m.rax, m.b), (ExitKind::Io, 2, 0, 0x1000, 0xaa, 0xaa));
    assert_eq!(m.io().unwrap().port, 0x80);
    assert_eq!(t.reply(ExitReply::NEXT), Ok(0));
    assert_eq!(t.s.regs(v).rip, 0x1002, "advanced by the exit's length");
    // With one: a stage-2 exit brings GPR, RIP, CR, SEG, plus the DT group dom0 asked for.
    let v0 = t.s.v0;
    t.s.k.vcpus[v0 as usize].msg_page = t.s.k.domains[t.s.d0 as usize].ram_hpa(PAGE_GPA);
    let r = t.exit(PendingExit::new(ExitKind::Stage2, 0xfe00_0000, ipc_spec::exit::access::WRITE));
    assert_eq!(r.rcx, ipc_spec::exit::MESSAGE_WORDS_WITH_STATE as u64);
    let m = ipc_spec::exit::ExitMessage::decode(&words(&r)).unwrap();
    use ipc_spec::exit::{at, state};
    assert_eq!(m.state, state::GPR | state::RIP | state::CR | state::SEG | state::DT);
    assert_eq!(m.stage2(), Some((0xfe00_0000, ipc_spec::exit::access::WRITE)));
    let page = t.s.read_words(t.s.d0, PAGE_GPA, ipc_spec::exit::STATE_WORDS);
    assert_eq!((page[at::GPR], page[at::GPR + 9], page[at::GPR + 4]), (0xaa, 9, 0x8000));
    assert_eq!((page[at::RIP], page[at::CR3], page[at::GDTR]), (0x1002, 0x5000, 0x6000));
    assert_eq!(page[at::EVENT], 0, "a group not asked for is zero");
    check_invariants(&t.s.k);
}

#[test]
fn every_reply_path_acts_on_the_vcpu() {
    use ipc_spec::exit::{at, set, state, Event};
    let mut t = vm_sys(0);
    let (v0, v) = (t.s.v0, t.v);
    t.s.hc(v0, Hypercall::VcpuSetMessagePage, 0, &[PAGE_GPA]).unwrap();
    t.s.k.vcpus[v as usize].regs = Regs { rip: 0x2000, rbx: 1, r12: 12, ..Regs::default() };
    // CPUID: four registers set, RIP advanced.
    t.exit(PendingExit { kind: ExitKind::Cpuid, insn_len: 2, a: 0, b: 0 });
    assert_eq!(t.reply(ExitReply::next_with(set::RAX | set::RCX | set::RDX | set::RBX, [1, 2, 3, 4])), Ok(0));
    let r = t.s.regs(v);
    assert_eq!((r.rax, r.rcx, r.rdx, r.rbx, r.rip), (1, 2, 3, 4, 0x2002));
    assert_eq!(t.s.p.completed.last(), Some(&v));
    // MMIO with an explicit length and a register set through the state page.
    t.exit(PendingExit::new(ExitKind::Stage2, 0xfe00_0000, 0));
    let mut page = t.s.read_words(t.s.d0, PAGE_GPA, ipc_spec::exit::STATE_WORDS);
    page[at::GPR + 12] = 0x1212;
    page[at::CR0] = 0x8000_0011;
    t.s.write_words(t.s.d0, PAGE_GPA, &page);
    let r = ExitReply { advance_by: 3, write_state: state::GPR | state::CR, ..ExitReply::NEXT };
    assert_eq!(t.reply(r), Ok(0));
    assert_eq!((t.s.regs(v).r12, t.s.regs(v).rip), (0x1212, 0x2005));
    assert_eq!(t.s.p.hw[&v].cr0, 0x8000_0011);
    // Retry with an exception injected.
    t.exit(PendingExit::new(ExitKind::Exception, 6, 0));
    let ud = Event::Exception(6, None);
    assert_eq!(t.reply(ExitReply { inject: Some(ud), ..ExitReply::RETRY }), Ok(0));
    assert_eq!(t.s.regs(v).rip, 0x2005);
    assert_eq!(t.s.p.injected.last(), Some(&(v, ud)));
    // Stop.
    t.exit(PendingExit::new(ExitKind::Shutdown, 0, 0));
    assert_eq!(t.reply(ExitReply::STOP), Ok(0));
    assert_eq!(t.s.state(v), VcpuState::Stopped);
    check_invariants(&t.s.k);
}

#[test]
fn a_reply_the_microvisor_cannot_act_on_fails_and_changes_nothing() {
    let mut t = vm_sys(0);
    let (v0, v) = (t.s.v0, t.v);
    t.s.k.vcpus[v as usize].regs.rip = 0x3000;
    t.exit(PendingExit::new(ExitKind::Stage2, 0xfe00_0000, 0));
    let bad = [
        ([1u64 << 40, 0, 0, 0, 0, 0], Error::InvalidArgument),
        (ExitReply::NEXT.encode(), Error::InvalidArgument), // length unknown
        (ExitReply { write_state: ipc_spec::exit::state::GPR, ..ExitReply::RETRY }.encode(), Error::NoMessagePage),
        ([1 | 1 << 12, 0, 0, 0, 0, 0x20 | 3 << 8 | 1 << 31], Error::InvalidArgument),
    ];
    for (w, err) in bad {
        t.s.raw(v0, Hypercall::ReplyRecv.number(), t.e, 6, w);
        assert_eq!(t.s.k.current, Some(v0));
        assert_eq!(t.s.status(v0), Err(err), "{w:x?}");
        assert_eq!(t.s.state(v), VcpuState::BlockedFault(v0), "the exit is still pending");
        assert_eq!(t.s.regs(v).rip, 0x3000);
        check_invariants(&t.s.k);
    }
    assert_eq!(t.reply(ExitReply { advance_by: 2, ..ExitReply::NEXT }), Ok(0));
    assert_eq!((t.s.state(v), t.s.regs(v).rip), (VcpuState::Running, 0x3002));
}

#[test]
fn only_the_handler_holding_an_exit_can_answer_it() {
    let mut t = vm_sys(0);
    let (v0, v) = (t.s.v0, t.v);
    // A second handler vCPU of dom0 on the same endpoint.
    let (h2, _) = t.s.create_vcpu(dom0_slots::SELF_DOMAIN, true);
    t.exit(PendingExit::new(ExitKind::Hypercall, 0, 0));
    t.s.switch(h2);
    // It holds no exit: its ReplyRecv answers nobody and waits for the next message.
    t.s.raw(h2, Hypercall::ReplyRecv.number(), t.e, 6, ExitReply::RETRY.encode());
    assert_eq!(t.s.state(h2), VcpuState::BlockedRecv(t.s.endpoint_id(t.s.d0, t.e)));
    assert_eq!(t.s.state(v), VcpuState::BlockedFault(v0), "still dom0's to answer");
    // Nor can the VM answer itself (it has no capabilities at all).
    assert!(t.s.k.domains[t.vm as usize].caps.get(0).is_err());
    t.s.k.schedule();
    assert_eq!(t.s.k.current, Some(v0));
    assert_eq!(t.reply(ExitReply::RETRY), Ok(0));
    assert_eq!(t.s.state(v), VcpuState::Running);
    check_invariants(&t.s.k);
}

#[test]
fn domain_exit_is_final_whatever_the_reply() {
    let mut f = faulty(true);
    let (v0, vf) = (f.s.v0, f.vf[1]);
    f.s.raw(v0, Hypercall::Recv.number(), f.e, 0, [0; 6]);
    f.s.k.schedule();
    f.s.switch(vf);
    f.s.raw(vf, Hypercall::DomainExit.number(), 0, 0, args(&[3]));
    f.s.raw(v0, Hypercall::ReplyRecv.number(), f.e, 6, ExitReply::RETRY.encode());
    assert_eq!(f.s.state(vf), VcpuState::Stopped);
    check_invariants(&f.s.k);
}

#[test]
fn a_vmm_maps_its_vms_ram_until_the_vm_goes() {
    let mut t = vm_sys(0);
    let v0 = t.s.v0;
    let (d, dslot) = t.s.create_domain("plain", MIB2, 10);
    let at = 0x4000_0000;
    // Only a VM, with the VMM right, at a 2 MiB boundary above the caller's RAM.
    assert_eq!(t.s.hc(v0, Hypercall::DomainMapRam, dslot, &[at]), Err(Error::PermissionDenied));
    let no_vmm = t.s.copy(t.vmslot, dom0_slots::SELF_DOMAIN, rights::CONTROL, 0).unwrap();
    assert_eq!(t.s.hc(v0, Hypercall::DomainMapRam, no_vmm, &[at]), Err(Error::PermissionDenied));
    assert_eq!(t.s.hc(v0, Hypercall::DomainMapRam, t.vmslot, &[at + 4096]), Err(Error::InvalidArgument));
    assert_eq!(t.s.hc(v0, Hypercall::DomainMapRam, t.vmslot, &[0]), Err(Error::InvalidArgument));
    assert_eq!(t.s.hc(v0, Hypercall::DomainMapRam, t.vmslot, &[at]), Ok(at));
    assert_eq!(t.s.hc(v0, Hypercall::DomainMapRam, t.vmslot, &[at * 2]), Err(Error::AlreadyMapped));
    let vm_hpa = t.s.k.domains[t.vm as usize].ram[0];
    let s2 = t.s.k.domains[t.s.d0 as usize].stage2.as_ref().unwrap();
    assert_eq!(s2.translate(&t.s.p, at + 0x1234).map(|x| x.hpa), Some(vm_hpa + 0x1234));
    let _ = d;
    // The VM goes: so does the view, before its RAM is freed.
    let before = t.s.p.stage2_changes.get(&t.s.d0).copied().unwrap_or(0);
    assert_eq!(t.s.hc(v0, Hypercall::DomainDestroy, t.vmslot, &[]), Ok(0));
    assert_eq!(t.s.k.domains[t.s.d0 as usize].ram_view, None);
    let s2 = t.s.k.domains[t.s.d0 as usize].stage2.as_ref().unwrap();
    assert_eq!(s2.translate(&t.s.p, at + 0x1234), None);
    assert!(t.s.p.stage2_changes[&t.s.d0] > before);
    check_invariants(&t.s.k);
}

#[test]
fn injection_wakes_a_halted_vm_and_pause_holds_it() {
    let mut t = vm_sys(0);
    let (v0, v) = (t.s.v0, t.v);
    // Only a VM's vCPU, vectors 32..=255.
    let (_, dslot) = t.s.create_domain("plain", MIB2, 10);
    let (_, plain_vcpu) = t.s.create_vcpu(dslot, false);
    assert_eq!(t.s.hc(v0, Hypercall::VcpuInject, plain_vcpu, &[0x30]), Err(Error::InvalidState));
    assert_eq!(t.s.hc(v0, Hypercall::VcpuInject, t.vcpuslot, &[31]), Err(Error::InvalidArgument));
    assert_eq!(t.s.hc(v0, Hypercall::DomainPause, dslot, &[1]), Err(Error::PermissionDenied));
    // The VM halts; an injection wakes it.
    t.s.raw(v0, Hypercall::Yield.number(), 0, 0, [0; 6]);
    t.s.k.schedule();
    t.s.switch(v);
    t.s.k.halt(v);
    assert_eq!(t.s.state(v), VcpuState::Halted);
    assert_eq!(t.s.k.current, Some(v0));
    assert_eq!(t.s.hc(v0, Hypercall::VcpuInject, t.vcpuslot, &[0x41]), Ok(0x41));
    assert_eq!(t.s.state(v), VcpuState::Ready);
    assert!(t.s.k.vcpus[v as usize].has_irq());
    // Paused: out of the run queue until resumed; an injection does not run it.
    assert_eq!(t.s.hc(v0, Hypercall::DomainPause, t.vmslot, &[2]), Err(Error::InvalidArgument));
    assert_eq!(t.s.hc(v0, Hypercall::DomainPause, t.vmslot, &[1]), Ok(1));
    assert_eq!(t.s.state(v), VcpuState::Paused);
    check_invariants(&t.s.k);
    assert_eq!(t.s.hc(v0, Hypercall::VcpuInject, t.vcpuslot, &[0x42]), Ok(0x42));
    assert_eq!(t.s.state(v), VcpuState::Paused);
    assert_eq!(t.s.hc(v0, Hypercall::DomainPause, t.vmslot, &[0]), Ok(0));
    assert_eq!(t.s.state(v), VcpuState::Ready);
    check_invariants(&t.s.k);
}

#[test]
fn a_notification_bound_to_the_receive_wakes_it() {
    let mut t = vm_sys(0);
    let v0 = t.s.v0;
    let n = t.s.notification();
    assert_eq!(t.s.hc(v0, Hypercall::NotificationBind, n, &[0]), Ok(0));
    // Bits already there: the receive returns at once with them.
    let nid = t.s.notification_id(t.s.d0, n);
    t.s.k.signal_object(nid, 0b101);
    t.s.raw(v0, Hypercall::Recv.number(), t.e, 0, [0; 6]);
    let r = t.s.regs(v0);
    assert_eq!((r.rax, r.rbx, r.rcx, r.rdi), (0, ipc_spec::hypercall::NOTIFICATION_BADGE, 0, 0b101));
    // None: it blocks, and a signal wakes it.
    t.s.raw(v0, Hypercall::Recv.number(), t.e, 0, [0; 6]);
    assert!(matches!(t.s.state(v0), VcpuState::BlockedRecv(_)));
    t.s.k.signal_object(nid, 0b10);
    assert_eq!(t.s.state(v0), VcpuState::Ready);
    let r = t.s.regs(v0);
    assert_eq!((r.rax, r.rbx, r.rcx, r.rdi), (0, ipc_spec::hypercall::NOTIFICATION_BADGE, 0, 0b10));
    check_invariants(&t.s.k);
    // And an exit still arrives as a message.
    t.s.k.schedule();
    let r = t.exit(PendingExit::new(ExitKind::Hypercall, 0, 0));
    assert_eq!(r.rbx, 0x77);
}

/// Several notifications bound to one receive (a VMM's doorbells and its timer): bits that
/// arrive on any of them while the receiver is busy wake its next receive. Only the last
/// bound one's were looked at before, so a doorbell rung while the VMM ran stayed unseen
/// until its next ring (bench linux-io's "lost doorbells").
#[test]
fn bits_on_any_notification_bound_to_the_receive_are_seen_when_it_starts() {
    let mut t = vm_sys(0);
    let v0 = t.s.v0;
    let (a, b, c) = (t.s.notification(), t.s.notification(), t.s.notification());
    for n in [a, b, c] {
        assert_eq!(t.s.hc(v0, Hypercall::NotificationBind, n, &[0]), Ok(0));
    }
    let ids = [a, b, c].map(|n| t.s.notification_id(t.s.d0, n));
    // The first and the second rang while v0 was running; the last bound did not.
    t.s.k.signal_object(ids[0], 0b1);
    t.s.k.signal_object(ids[1], 0b100);
    let mut seen = 0;
    for _ in 0..2 {
        t.s.raw(v0, Hypercall::Recv.number(), t.e, 0, [0; 6]);
        let r = t.s.regs(v0);
        assert_eq!((r.rax, r.rbx), (0, ipc_spec::hypercall::NOTIFICATION_BADGE), "the receive returns at once");
        seen |= r.rdi;
    }
    assert_eq!(seen, 0b101);
    // Nothing left: the next receive blocks, and a ring on any of them wakes it.
    t.s.raw(v0, Hypercall::Recv.number(), t.e, 0, [0; 6]);
    assert!(matches!(t.s.state(v0), VcpuState::BlockedRecv(_)));
    t.s.k.signal_object(ids[1], 0b10);
    assert_eq!(t.s.state(v0), VcpuState::Ready);
    assert_eq!(t.s.regs(v0).rdi, 0b10);
    check_invariants(&t.s.k);
}

//! AMD SVM on the machine: turning SVM on, the permission maps, the VMCB of each vCPU and
//! the world switch (VMLOAD, VMRUN, VMSAVE) with the general registers VMRUN does not
//! swap. Implements [`VcpuHardware`], so nothing else in the microvisor knows SVM.

use ipc_spec::exit::{Event, VcpuState as ArchState};
use ipc_spec::Error;
use x86_64::registers::model_specific::Msr;

use super::exit;
use super::state;
use super::vmcb::{control, efer, misc1, misc2, save, Segment, Vmcb, DEFAULT_PAT};
use crate::kernel::notify::VirqHardware;
use crate::kernel::{Regs, VcpuBoot, VcpuId, MAX_VCPUS};
use crate::vcpu_hw::{Exit, VcpuHardware};

/// MSR holding the physical address of the host state-save area VMRUN uses.
const VM_HSAVE_PA: u32 = 0xc001_0117;
const IA32_EFER: u32 = 0xc000_0080;
const PAGE: usize = 4096;
/// nRIP: the next sequential instruction pointer, saved on intercepts where the CPU
/// reports NRIPS (APM 15.7.1).
const NEXT_RIP: usize = 0x0c8;
/// V_IRQ (bit 8 of the VINTR word): a virtual interrupt is waiting for the guest.
const V_IRQ: u64 = 1 << 8;
/// EVENTINJ / EXITINTINFO bit 31: the event is valid.
const EVENT_VALID: u64 = 1 << 31;
/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;
/// V_INTR_MASKING (bit 24): the guest's RFLAGS.IF masks only virtual interrupts.
const V_INTR_MASKING: u64 = 1 << 24;

/// Zeroed, page-aligned physical frames, identity-mapped (from the machine's allocator).
pub type AllocFrames = fn(u64) -> Option<u64>;

/// Per-CPU SVM state, the maps all guests share, and every vCPU's VMCB.
pub struct Svm {
    /// Host state that VMRUN does not save (FS, GS, TR, LDTR, syscall MSRs), kept with
    /// VMSAVE once and reloaded with VMLOAD after every #VMEXIT.
    host_save_pa: u64,
    /// I/O permission map: every port intercepted (no domain touches a port directly).
    iopm_pa: u64,
    /// MSR permission map of ordinary domains: every MSR intercepted.
    msrpm_pa: u64,
    /// MSR permission map of VMs: the MSRs VMLOAD/VMSAVE switch are the guest's own.
    msrpm_vm_pa: u64,
    /// ASIDs the CPU supports (CPUID 8000_000A EBX); ASID 0 is the host's.
    asids: u32,
    alloc: AllocFrames,
    /// Physical address of each vCPU's VMCB (0 = none yet); pages are kept for reuse.
    vmcbs: [u64; MAX_VCPUS],
    /// Per vCPU: the RIP it last exited at inside an interrupt shadow, kept until its
    /// next HLT exit; and whether that HLT was that instruction (see `run`).
    shadowed_at: [Option<u64>; MAX_VCPUS],
    hlt_woken: [bool; MAX_VCPUS],
}

impl Svm {
    /// SVM not yet enabled (a placeholder for static initialisation).
    pub const DISABLED: Self = Self {
        host_save_pa: 0,
        iopm_pa: 0,
        msrpm_pa: 0,
        msrpm_vm_pa: 0,
        asids: 0,
        alloc: |_| None,
        vmcbs: [0; MAX_VCPUS],
        shadowed_at: [None; MAX_VCPUS],
        hlt_woken: [false; MAX_VCPUS],
    };

    /// Set EFER.SVME, give the CPU its host save area, and build the shared permission
    /// maps. `asids` is what the CPU reports.
    pub fn enable(alloc: AllocFrames, asids: u32) -> Result<Self, Error> {
        let hsave = alloc(1).ok_or(Error::OutOfMemory)?;
        let host_save_pa = alloc(1).ok_or(Error::OutOfMemory)?;
        let iopm_pa = alloc(3).ok_or(Error::OutOfMemory)?;
        let msrpm_pa = alloc(2).ok_or(Error::OutOfMemory)?;
        let msrpm_vm_pa = alloc(2).ok_or(Error::OutOfMemory)?;
        // SAFETY: the maps are freshly allocated, identity-mapped frames owned by the
        // microvisor for ever, and nothing else refers to them yet; all-ones means
        // "intercept" for every port and every MSR access.
        unsafe {
            core::ptr::write_bytes(iopm_pa as *mut u8, 0xff, 3 * PAGE);
            core::ptr::write_bytes(msrpm_pa as *mut u8, 0xff, 2 * PAGE);
            let vm_map = core::slice::from_raw_parts_mut(msrpm_vm_pa as *mut u8, 2 * PAGE);
            vm_map.fill(0xff);
            for msr in state::GUEST_OWNED_MSRS {
                state::msrpm_allow(vm_map, msr);
            }
        }
        // SAFETY: the CPU reports SVM, nested paging and NX (checked by cpu::check_svm before
        // this is called) and VM_CR.SVMDIS is clear, so setting EFER.SVME is allowed; the
        // host save area is a page the CPU alone uses from now on.
        unsafe {
            let mut efer_msr = Msr::new(IA32_EFER);
            let v = efer_msr.read();
            // NXE: the nested walk uses the host's NX setting; without it the NX bit of a
            // non-executable stage-2 leaf would be a reserved bit and fault every access.
            efer_msr.write(v | efer::SVME | efer::NXE);
            Msr::new(VM_HSAVE_PA).write(hsave);
            core::arch::asm!("vmsave rax", in("rax") host_save_pa, options(nostack));
        }
        Ok(Self { host_save_pa, iopm_pa, msrpm_pa, msrpm_vm_pa, asids, alloc, ..Self::DISABLED })
    }

    pub fn vmcb_pa(&self, v: VcpuId) -> u64 {
        self.vmcbs[v as usize]
    }

    pub fn vmcb(&mut self, v: VcpuId) -> &mut Vmcb {
        // SAFETY: vmcbs[v] is a VMCB page allocated in `create` (a kernel vCPU is only ever
        // run or inspected after that), owned by this table and identity-mapped; the
        // exclusive borrow of `self` makes this the only reference.
        unsafe { &mut *(self.vmcbs[v as usize] as *mut Vmcb) }
    }

    /// Intercepts every domain gets: anything that could touch host state, physical
    /// devices, or the SVM machinery itself exits to the microvisor.
    fn set_standard_intercepts(&self, vmcb: &mut Vmcb, vm: bool) {
        vmcb.write_u32(control::INTERCEPT_EXCEPTIONS, (1 << 8) | (1 << 18)); // #DF, #MC
        vmcb.write_u32(control::INTERCEPT_MISC1, misc1::INTERCEPTED);
        vmcb.write_u32(control::INTERCEPT_MISC2, misc2::INTERCEPTED);
        vmcb.write_u64(control::IOPM_BASE_PA, self.iopm_pa);
        vmcb.write_u64(control::MSRPM_BASE_PA, if vm { self.msrpm_vm_pa } else { self.msrpm_pa });
        // Virtual interrupt masking: the guest's RFLAGS.IF masks only virtual interrupts;
        // physical ones always exit to the microvisor.
        vmcb.write_u64(control::VINTR, V_INTR_MASKING);
    }

    /// Put a new vCPU's VMCB into PVH entry state: 32-bit protected mode, paging off, flat
    /// segments, a busy TSS, its own ASID and stage-2 root. (EBX and RIP come from the
    /// kernel's register file, synced at every entry.)
    fn init_vmcb(&self, v: &mut Vmcb, boot: &VcpuBoot, asid: u32) {
        *v = Vmcb::zeroed();
        self.set_standard_intercepts(v, boot.vm);
        v.write_u32(control::GUEST_ASID, asid);
        v.write_u8(control::TLB_CONTROL, 1);
        v.write_u64(control::NP_ENABLE, 1);
        v.write_u64(control::NESTED_CR3, boot.stage2_root);
        v.set_segment(save::CS, Segment::flat_code32(0x08));
        for seg in [save::DS, save::ES, save::SS, save::FS, save::GS] {
            v.set_segment(seg, Segment::flat_data32(0x10));
        }
        v.set_segment(save::TR, Segment::tss32_busy());
        v.set_segment(save::LDTR, Segment::default());
        v.set_segment(save::GDTR, Segment::table(0, 0));
        v.set_segment(save::IDTR, Segment::table(0, 0));
        v.write_u64(save::CR0, 0x11); // PE | ET
        v.write_u64(save::EFER, efer::SVME); // VMRUN demands SVME in the guest's EFER
        v.write_u64(save::RFLAGS, 0x2);
        v.write_u64(save::DR6, 0xffff_0ff0);
        v.write_u64(save::DR7, 0x400);
        v.write_u64(save::G_PAT, DEFAULT_PAT);
        v.write_u64(save::RIP, boot.entry);
    }
}

impl Svm {
    /// Allocate every vCPU's VMCB page up front (they are kept for reuse, so lazy
    /// allocation made a table slot's first use cost a frame for good, which hides leaks).
    /// False if memory ran out.
    pub fn preallocate(&mut self) -> bool {
        for i in 0..self.vmcbs.len() {
            if self.vmcbs[i] == 0 {
                match (self.alloc)(1) {
                    Some(pa) => self.vmcbs[i] = pa,
                    None => return false,
                }
            }
        }
        true
    }
}

impl VcpuHardware for Svm {
    fn create(&mut self, v: VcpuId, boot: &VcpuBoot) -> Result<(), Error> {
        // One ASID per domain, never 0 (the host's): the domain's TLB entries are tagged
        // apart from every other domain's. The CPU must have that many.
        let asid = boot.domain as u32 + 1;
        if asid >= self.asids {
            return Err(Error::OutOfMemory);
        }
        if self.vmcbs[v as usize] == 0 {
            self.vmcbs[v as usize] = (self.alloc)(1).ok_or(Error::OutOfMemory)?;
        }
        let pa = self.vmcbs[v as usize];
        (self.shadowed_at[v as usize], self.hlt_woken[v as usize]) = (None, false);
        // SAFETY: the page was allocated above (or earlier) for this vCPU's VMCB alone and
        // is identity-mapped; no other reference to it exists while this one lives.
        let vmcb = unsafe { &mut *(pa as *mut Vmcb) };
        self.init_vmcb(vmcb, boot, asid);
        Ok(())
    }

    #[inline(always)]
    fn run(&mut self, v: VcpuId, regs: &mut Regs) -> Exit {
        let pa = self.vmcbs[v as usize];
        let vmcb = self.vmcb(v);
        vmcb.write_u64(save::RAX, regs.rax);
        vmcb.write_u64(save::RIP, regs.rip);
        // SAFETY: pa is the physical address of the VMCB page of vCPU v, set up by `create`
        // with the standard intercepts (VMRUN intercepted, a non-zero ASID, valid guest
        // state); `regs` is that vCPU's register file; host_save_pa was initialised with
        // VMSAVE in `enable`.
        unsafe { world_switch(pa, regs, self.host_save_pa) };
        let vmcb = self.vmcb(v);
        vmcb.write_u8(control::TLB_CONTROL, 0); // any flush asked for has happened
        regs.rax = vmcb.read_u64(save::RAX);
        regs.rip = vmcb.read_u64(save::RIP);
        let code = vmcb.read_u64(control::EXIT_CODE);
        // The hypercall, first and alone: it is what the IPC fast path runs on. (VMMCALL
        // takes no prefixes that change what it does; its three bytes are what we skip.)
        if code == exit::VMMCALL {
            return Exit::Hypercall { len: 3 };
        }
        // An exit in the middle of delivering an event (a virtual interrupt taken from
        // V_IRQ, an injected one, an exception) leaves that event in EXITINTINFO and it is
        // not delivered: "the VMM must re-inject it" (APM vol. 2, 15.7.2). Left there, a
        // V_IRQ vector the guest had already taken (V_IRQ is clear again) would be lost.
        // (A VMMCALL exit, above, is an instruction's: no delivery can be under way.)
        let interrupted = vmcb.read_u64(control::EXIT_INT_INFO);
        if interrupted & EVENT_VALID != 0 {
            vmcb.write_u64(control::EVENT_INJECTION, interrupted);
        }
        // A CPU's VMRUN loads INTERRUPT_SHADOW (APM vol. 2, 15.21.5): a guest stopped
        // between STI and HLT (a tick's exit) executes its HLT before it takes an interrupt
        // offered meanwhile, and the interrupt wakes the HLT. QEMU's VMRUN ignores the field:
        // the guest takes the interrupt at once, its handler returns to the HLT, and the HLT
        // sleeps with its wake-up already consumed (the doorbell test's hang: bell halted,
        // its doorbell's bits set, nothing pending). So the shadowed instruction is
        // remembered until the next HLT exit, and a HLT exit at it counts as woken
        // (`VirqHardware::hlt_woken`): where the shadow was honoured, the cost is at most
        // one spurious wake-up.
        let in_shadow = vmcb.read_u64(control::INTERRUPT_SHADOW) & 1 != 0;
        let (info1, info2, next_rip) =
            (vmcb.read_u64(control::EXIT_INFO1), vmcb.read_u64(control::EXIT_INFO2), vmcb.read_u64(NEXT_RIP));
        let shadowed = &mut self.shadowed_at[v as usize];
        if code == exit::HLT {
            self.hlt_woken[v as usize] = shadowed.take() == Some(regs.rip);
        } else if in_shadow {
            *shadowed = Some(regs.rip);
        }
        exit::decode(code, info1, info2, regs.rip, next_rip)
    }

    #[inline(always)]
    fn complete(&mut self, v: VcpuId, regs: &mut Regs, len: u8) {
        regs.rip = regs.rip.wrapping_add(len as u64);
        // The instruction is complete, so an interrupt shadow it sat in (after STI or MOV
        // SS) is over. Left set, the shadow would cover the guest's next instruction too,
        // and a virtual interrupt pending after `STI; HLT` would wait past a following CLI
        // for ever.
        self.vmcb(v).write_u64(control::INTERRUPT_SHADOW, 0);
    }

    fn inject(&mut self, v: VcpuId, event: Event) {
        // EVENTINJ (APM 15.20) has the layout of the ABI's event word.
        self.vmcb(v).write_u64(control::EVENT_INJECTION, event.encode());
    }

    fn offer_interrupt(&mut self, v: VcpuId, vector: u8) -> bool {
        let vmcb = self.vmcb(v);
        let vintr = vmcb.read_u64(control::VINTR);
        if vintr & V_IRQ != 0 {
            return false;
        }
        // V_IRQ, priority 15, ignore V_TPR, masking as before, vector.
        let value = (vintr & V_INTR_MASKING) | V_IRQ | (0xf << 16) | (1 << 20) | ((vector as u64) << 32);
        vmcb.write_u64(control::VINTR, value);
        true
    }

    fn interrupt_offered(&mut self, v: VcpuId) -> bool {
        self.vmcb(v).read_u64(control::VINTR) & V_IRQ != 0
    }

    fn flush_tlb(&mut self, v: VcpuId) {
        // TLB_CONTROL 1: flush every ASID's entries (TCG has no flush-by-ASID).
        self.vmcb(v).write_u8(control::TLB_CONTROL, 1);
    }

    fn state(&mut self, v: VcpuId, regs: &mut Regs, s: &mut ArchState) {
        state::read(self.vmcb(v), regs, s);
    }

    fn set_state(&mut self, v: VcpuId, regs: &mut Regs, mask: u16, s: &ArchState) {
        state::write(self.vmcb(v), regs, mask, s);
    }

    fn efer(&mut self, v: VcpuId) -> u64 {
        self.vmcb(v).read_u64(save::EFER) & !efer::SVME
    }

    fn set_efer(&mut self, v: VcpuId, value: u64) -> bool {
        // A domain may enable long mode, NX and SYSCALL; SVME stays set, as VMRUN requires.
        if value & !(efer::SCE | efer::LME | efer::LMA | efer::NXE) != 0 {
            return false;
        }
        let vmcb = self.vmcb(v);
        let current = vmcb.read_u64(save::EFER);
        let new = (value & (efer::SCE | efer::LME | efer::NXE)) | (current & efer::LMA) | efer::SVME;
        vmcb.write_u64(save::EFER, new);
        true
    }
}

impl VirqHardware for Svm {
    fn virq_offered(&mut self, v: VcpuId) -> Option<u8> {
        // V_INTR_VECTOR is bits 32..40 of the VINTR word.
        let vintr = self.vmcb(v).read_u64(control::VINTR);
        (vintr & V_IRQ != 0).then_some((vintr >> 32) as u8)
    }

    fn virq_offer(&mut self, v: VcpuId, vector: u8) {
        self.offer_interrupt(v, vector);
    }

    fn virq_injectable(&mut self, v: VcpuId) -> bool {
        // EVENTINJ ignores RFLAGS.IF and the interrupt shadow (APM 15.20): check them here,
        // as the CPU would before taking an external interrupt.
        let vmcb = self.vmcb(v);
        vmcb.read_u64(save::RFLAGS) & RFLAGS_IF != 0
            && vmcb.read_u64(control::INTERRUPT_SHADOW) & 1 == 0
            && vmcb.read_u64(control::EVENT_INJECTION) & EVENT_VALID == 0
    }

    fn virq_window(&mut self, v: VcpuId, on: bool) {
        let vmcb = self.vmcb(v);
        let misc1 = vmcb.read_u32(control::INTERCEPT_MISC1) & !misc1::VINTR;
        vmcb.write_u32(control::INTERCEPT_MISC1, misc1 | if on { misc1::VINTR } else { 0 });
    }

    fn virq_inject(&mut self, v: VcpuId, vector: u8) {
        self.inject(v, Event::Interrupt(vector));
    }

    fn hlt_woken(&mut self, v: VcpuId) -> bool {
        core::mem::take(&mut self.hlt_woken[v as usize])
    }
}

/// The world switch. Saves the host's callee-saved registers, loads the guest's general
/// registers, VMLOAD + VMRUN, then stores the guest registers back, VMSAVE the guest's
/// hidden state and VMLOAD the host's (TR above all: the IST stacks depend on it).
/// Runs with GIF clear throughout, and with IF set across VMRUN so that a physical
/// interrupt (the scheduler tick) forces a #VMEXIT.
// The world switch moves registers by their offsets in `Regs` (`offset_of!` below); its
// size is fixed here so that a field added or removed is noticed.
const _: () = assert!(core::mem::size_of::<Regs>() == 18 * 8);

#[unsafe(naked)]
unsafe extern "C" fn world_switch(vmcb_pa: u64, regs: *mut Regs, host_save_pa: u64) {
    core::arch::naked_asm!(
        "push rbx",
        "push rbp",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "push rsi", // regs
        "push rdx", // host save area
        "push rdi", // vmcb
        // GIF=0 holds every interrupt off until VMRUN; IF=1 then makes physical interrupts
        // exit the guest (with V_INTR_MASKING, the host's IF decides that).
        "clgi",
        "sti",
        "mov rax, rdi",
        "vmload rax",
        "mov rbx, [rsi + {rbx_at}]",
        "mov rcx, [rsi + {rcx_at}]",
        "mov rdx, [rsi + {rdx_at}]",
        "mov rdi, [rsi + {rdi_at}]",
        "mov rbp, [rsi + {rbp_at}]",
        "mov r8,  [rsi + {r8_at}]",
        "mov r9,  [rsi + {r9_at}]",
        "mov r10, [rsi + {r10_at}]",
        "mov r11, [rsi + {r11_at}]",
        "mov r12, [rsi + {r12_at}]",
        "mov r13, [rsi + {r13_at}]",
        "mov r14, [rsi + {r14_at}]",
        "mov r15, [rsi + {r15_at}]",
        "mov rsi, [rsi + {rsi_at}]",
        "vmrun rax",
        // #VMEXIT: RAX and RSP are the host's again; everything else is the guest's.
        "push rsi",
        "mov rsi, [rsp + 0x18]",
        "mov [rsi + {rbx_at}], rbx",
        "mov [rsi + {rcx_at}], rcx",
        "mov [rsi + {rdx_at}], rdx",
        "mov [rsi + {rdi_at}], rdi",
        "mov [rsi + {rbp_at}], rbp",
        "mov [rsi + {r8_at}], r8",
        "mov [rsi + {r9_at}], r9",
        "mov [rsi + {r10_at}], r10",
        "mov [rsi + {r11_at}], r11",
        "mov [rsi + {r12_at}], r12",
        "mov [rsi + {r13_at}], r13",
        "mov [rsi + {r14_at}], r14",
        "mov [rsi + {r15_at}], r15",
        "pop rax",
        "mov [rsi + {rsi_at}], rax",
        "pop rax", // vmcb
        "vmsave rax",
        "pop rax", // host save area
        "vmload rax",
        "pop rsi",
        // A pending interrupt stays pending until the run loop lets it in.
        "cli",
        "stgi",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbp",
        "pop rbx",
        "ret",
        rbx_at = const core::mem::offset_of!(Regs, rbx),
        rcx_at = const core::mem::offset_of!(Regs, rcx),
        rdx_at = const core::mem::offset_of!(Regs, rdx),
        rsi_at = const core::mem::offset_of!(Regs, rsi),
        rdi_at = const core::mem::offset_of!(Regs, rdi),
        rbp_at = const core::mem::offset_of!(Regs, rbp),
        r8_at = const core::mem::offset_of!(Regs, r8),
        r9_at = const core::mem::offset_of!(Regs, r9),
        r10_at = const core::mem::offset_of!(Regs, r10),
        r11_at = const core::mem::offset_of!(Regs, r11),
        r12_at = const core::mem::offset_of!(Regs, r12),
        r13_at = const core::mem::offset_of!(Regs, r13),
        r14_at = const core::mem::offset_of!(Regs, r14),
        r15_at = const core::mem::offset_of!(Regs, r15),
    );
}

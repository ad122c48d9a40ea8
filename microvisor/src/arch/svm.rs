//! AMD SVM glue: turning SVM on, the permission maps every domain shares, and the world
//! switch (VMLOAD, VMRUN, VMSAVE) with the general registers VMRUN does not swap.

use microvisor::kernel::{Regs, VcpuBoot};
use microvisor::svm::vmcb::{control, efer, misc1, misc2, save, Segment, Vmcb, DEFAULT_PAT};
use x86_64::registers::model_specific::Msr;

use super::phys::{alloc_zeroed_frames, PAGE_SIZE};

/// MSR holding the physical address of the host state-save area VMRUN uses.
const VM_HSAVE_PA: u32 = 0xc001_0117;
const IA32_EFER: u32 = 0xc000_0080;

/// Per-CPU SVM state and the maps all guests share.
pub struct Svm {
    /// Host state that VMRUN does not save (FS, GS, TR, LDTR, syscall MSRs), kept with
    /// VMSAVE once and reloaded with VMLOAD after every #VMEXIT.
    host_save_pa: u64,
    /// I/O permission map: every port intercepted (no domain touches a port directly).
    pub iopm_pa: u64,
    /// MSR permission map: every MSR intercepted (the microvisor emulates the few allowed).
    pub msrpm_pa: u64,
}

#[derive(Debug)]
pub struct OutOfMemory;

impl Svm {
    /// SVM not yet enabled (a placeholder for static initialisation).
    pub const DISABLED: Self = Self { host_save_pa: 0, iopm_pa: 0, msrpm_pa: 0 };

    /// Set EFER.SVME, give the CPU its host save area, and build the shared permission maps.
    pub fn enable() -> Result<Self, OutOfMemory> {
        let hsave = alloc_zeroed_frames(1).ok_or(OutOfMemory)?;
        let host_save_pa = alloc_zeroed_frames(1).ok_or(OutOfMemory)?;
        let iopm_pa = alloc_zeroed_frames(3).ok_or(OutOfMemory)?;
        let msrpm_pa = alloc_zeroed_frames(2).ok_or(OutOfMemory)?;
        // SAFETY: the maps are freshly allocated frames owned by the microvisor for ever;
        // all-ones means "intercept" for every port and every MSR access.
        unsafe {
            core::ptr::write_bytes(iopm_pa as *mut u8, 0xff, 3 * PAGE_SIZE as usize);
            core::ptr::write_bytes(msrpm_pa as *mut u8, 0xff, 2 * PAGE_SIZE as usize);
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
        Ok(Self { host_save_pa, iopm_pa, msrpm_pa })
    }

    /// Intercepts every domain gets: anything that could touch host state, physical
    /// devices, or the SVM machinery itself exits to the microvisor.
    pub fn set_standard_intercepts(&self, vmcb: &mut Vmcb) {
        vmcb.write_u32(control::INTERCEPT_EXCEPTIONS, (1 << 8) | (1 << 18)); // #DF, #MC
        vmcb.write_u32(
            control::INTERCEPT_MISC1,
            misc1::INTR
                | misc1::NMI
                | misc1::SMI
                | misc1::INIT
                | misc1::CPUID
                | misc1::INVD
                | misc1::HLT
                | misc1::INVLPGA
                | misc1::IOIO_PROT
                | misc1::MSR_PROT
                | misc1::TASK_SWITCH
                | misc1::SHUTDOWN,
        );
        vmcb.write_u32(
            control::INTERCEPT_MISC2,
            misc2::VMRUN
                | misc2::VMMCALL
                | misc2::VMLOAD
                | misc2::VMSAVE
                | misc2::STGI
                | misc2::CLGI
                | misc2::SKINIT
                | misc2::ICEBP
                | misc2::MONITOR
                | misc2::MWAIT
                | misc2::MWAIT_ARMED
                | misc2::XSETBV,
        );
        vmcb.write_u64(control::IOPM_BASE_PA, self.iopm_pa);
        vmcb.write_u64(control::MSRPM_BASE_PA, self.msrpm_pa);
        // Virtual interrupt masking: the guest's RFLAGS.IF masks only virtual interrupts;
        // physical ones always exit to the microvisor.
        vmcb.write_u64(control::VINTR, 1 << 24);
    }

    /// Put a new vCPU's VMCB into PVH entry state: 32-bit protected mode, paging off, flat
    /// segments, a busy TSS, its own ASID and stage-2 root. (EBX and RIP come from the
    /// kernel's register file, synced at every entry.)
    pub fn init_vmcb(&self, v: &mut Vmcb, boot: &VcpuBoot) {
        *v = Vmcb::zeroed();
        self.set_standard_intercepts(v);
        v.write_u32(control::GUEST_ASID, boot.asid);
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
        v.set_rip(boot.entry);
    }

    /// Run the guest described by `vmcb` (at physical `vmcb_pa`) until its next #VMEXIT.
    pub fn run(&self, vmcb_pa: u64, regs: &mut Regs) {
        // SAFETY: vmcb_pa is the physical address of a VMCB page owned by the running
        // vCPU, set up by the caller with the standard intercepts (VMRUN intercepted, a
        // non-zero ASID, valid guest state); `regs` is that vCPU's register file;
        // host_save_pa was initialised with VMSAVE in `enable`.
        unsafe { world_switch(vmcb_pa, regs, self.host_save_pa) }
    }
}

/// The world switch. Saves the host's callee-saved registers, loads the guest's general
/// registers, VMLOAD + VMRUN, then stores the guest registers back, VMSAVE the guest's
/// hidden state and VMLOAD the host's (TR above all: the IST stacks depend on it).
/// Runs with GIF clear throughout, and with IF set across VMRUN so that a physical
/// interrupt (the scheduler tick) forces a #VMEXIT.
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
        "mov rbx, [rsi + 0x00]",
        "mov rcx, [rsi + 0x08]",
        "mov rdx, [rsi + 0x10]",
        "mov rdi, [rsi + 0x20]",
        "mov rbp, [rsi + 0x28]",
        "mov r8,  [rsi + 0x30]",
        "mov r9,  [rsi + 0x38]",
        "mov r10, [rsi + 0x40]",
        "mov r11, [rsi + 0x48]",
        "mov r12, [rsi + 0x50]",
        "mov r13, [rsi + 0x58]",
        "mov r14, [rsi + 0x60]",
        "mov r15, [rsi + 0x68]",
        "mov rsi, [rsi + 0x18]",
        "vmrun rax",
        // #VMEXIT: RAX and RSP are the host's again; everything else is the guest's.
        "push rsi",
        "mov rsi, [rsp + 0x18]",
        "mov [rsi + 0x00], rbx",
        "mov [rsi + 0x08], rcx",
        "mov [rsi + 0x10], rdx",
        "mov [rsi + 0x20], rdi",
        "mov [rsi + 0x28], rbp",
        "mov [rsi + 0x30], r8",
        "mov [rsi + 0x38], r9",
        "mov [rsi + 0x40], r10",
        "mov [rsi + 0x48], r11",
        "mov [rsi + 0x50], r12",
        "mov [rsi + 0x58], r13",
        "mov [rsi + 0x60], r14",
        "mov [rsi + 0x68], r15",
        "pop rax",
        "mov [rsi + 0x18], rax",
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
    );
}

//! Intel VMX on the machine: VMXON, one VMCS per vCPU, the host state, the world switch
//! (VMLAUNCH/VMRESUME with the general registers the VMCS does not hold), INVEPT and
//! INVVPID, and virtual interrupt delivery. Implements [`VcpuHardware`] and
//! [`VirqHardware`], so nothing else in the microvisor knows VMX.

use core::arch::asm;

use ipc_spec::exit::{Event, VcpuState as ArchState};
use ipc_spec::Error;
use x86_64::registers::model_specific::Msr;

use super::controls::Controls;
use super::events::{self, Interrupts};
use super::exit::{self, ExitFields};
use super::state::{self, Tables};
use super::vmcs::{self as f, Vmcs};
use crate::kernel::notify::VirqHardware;
use crate::kernel::{Regs, VcpuBoot, VcpuId, MAX_VCPUS};
use crate::vcpu_hw::{Exit, VcpuHardware};
use crate::vmx_caps::VmxMsrs;

const PAGE: usize = 4096;

/// Zeroed, page-aligned physical frames, identity-mapped (from the machine's allocator).
pub type AllocFrames = fn(u64) -> Option<u64>;

/// The current VMCS, read and written with VMREAD and VMWRITE.
struct Current;

impl Vmcs for Current {
    #[inline(always)]
    fn read(&self, field: u32) -> u64 {
        let value: u64;
        // SAFETY: VMREAD of the current VMCS, which `Vmx::load` made current before any
        // access (every caller goes through it); a field that does not exist fails the
        // instruction without side effects.
        unsafe { asm!("vmread {}, {}", out(reg) value, in(reg) field as u64, options(nostack)) };
        value
    }

    #[inline(always)]
    fn write(&mut self, field: u32, value: u64) {
        // SAFETY: as for `read`: VMWRITE changes only the current VMCS, which describes a
        // guest of the microvisor's own making; the entry checks refuse bad values.
        unsafe { asm!("vmwrite {}, {}", in(reg) field as u64, in(reg) value, options(nostack)) };
    }
}

/// Run a VMX instruction taking the physical address of a region; false on VMfail (CF or
/// ZF set, SDM 30.2).
macro_rules! vmx_pa_instruction {
    ($insn:literal, $pa:expr) => {{
        let pa: u64 = $pa;
        let failed: u8;
        // SAFETY: the operand is a page the microvisor allocated for this purpose alone
        // (VMXON region or VMCS), identity-mapped, holding the VMCS revision identifier.
        unsafe { asm!(concat!($insn, " [{}]"), "setna {}", in(reg) &pa, out(reg_byte) failed, options(nostack)) };
        failed == 0
    }};
}

/// Per-vCPU state besides its VMCS.
#[derive(Clone, Copy)]
struct VcpuVmx {
    /// Physical address of the VMCS (0 = none yet); pages are kept for reuse.
    vmcs: u64,
    /// VMLAUNCH done (then VMRESUME until the VMCS is cleared: SDM 24.1).
    launched: bool,
    eptp: u64,
    /// The offered vector and interrupt-window state.
    irq: Interrupts,
    /// The guest's CR2, which the VMCS does not hold.
    cr2: u64,
}

impl VcpuVmx {
    const NONE: Self = Self { vmcs: 0, launched: false, eptp: 0, irq: Interrupts::NONE, cr2: 0 };
}

/// Per-CPU VMX state, the bitmaps all guests share, and every vCPU's VMCS.
pub struct Vmx {
    controls: Controls,
    revision: u32,
    /// I/O bitmaps A and B (two consecutive pages), all ones: every port access exits.
    io_bitmaps: u64,
    /// MSR bitmap of ordinary domains (all ones) and of VMs (the MSRs the VMCS switches
    /// are the guest's own).
    msr_bitmap: u64,
    msr_bitmap_vm: u64,
    alloc: AllocFrames,
    current: Option<VcpuId>,
    vcpus: [VcpuVmx; MAX_VCPUS],
    /// The VMX-preemption timer's start value: one scheduler tick of guest time.
    preemption: u32,
}

impl Vmx {
    /// VMX not yet enabled (a placeholder for static initialisation).
    pub const DISABLED: Self = Self {
        controls: Controls {
            pin: 0,
            proc1: 0,
            proc2: 0,
            exit: 0,
            entry: 0,
            cr0_fixed: (0, 0),
            cr4_fixed: (0, 0),
            preemption_shift: 0,
        },
        preemption: u32::MAX,
        revision: 0,
        io_bitmaps: 0,
        msr_bitmap: 0,
        msr_bitmap_vm: 0,
        alloc: |_| None,
        current: None,
        vcpus: [VcpuVmx::NONE; MAX_VCPUS],
    };

    /// Enter VMX operation (SDM 23.7): IA32_FEATURE_CONTROL locked with "VMX outside SMX",
    /// CR0 and CR4 with the bits VMX fixes (23.8: NE, VMXE), VMXON with a region holding
    /// the VMCS revision identifier; then build the shared bitmaps.
    pub fn enable(alloc: AllocFrames, m: &VmxMsrs) -> Result<Self, &'static str> {
        let controls = Controls::compute(m)?;
        let revision = (m.basic & 0x7fff_ffff) as u32;
        let region = alloc(1).ok_or("out of memory")?;
        let io_bitmaps = alloc(2).ok_or("out of memory")?;
        let msr_bitmap = alloc(1).ok_or("out of memory")?;
        let msr_bitmap_vm = alloc(1).ok_or("out of memory")?;
        // SAFETY: freshly allocated, identity-mapped frames owned by the microvisor for
        // ever; nothing else refers to them yet. All ones: every port and MSR exits.
        unsafe {
            core::ptr::write_bytes(io_bitmaps as *mut u8, 0xff, 2 * PAGE);
            core::ptr::write_bytes(msr_bitmap as *mut u8, 0xff, PAGE);
            let vm_map = core::slice::from_raw_parts_mut(msr_bitmap_vm as *mut u8, PAGE);
            vm_map.fill(0xff);
            for msr in state::GUEST_OWNED_MSRS {
                state::msr_bitmap_allow(vm_map, msr);
            }
            (region as *mut u32).write(revision);
        }
        // SAFETY: the CPU has VMX (CPUID.1:ECX.VMX, checked by the probe) and firmware did
        // not lock it off (checked by `VmxCaps::missing`). Setting the lock with "VMX
        // outside SMX" only enables VMXON; CR0.NE and CR4.VMXE are the bits FIXED0 asks
        // for, and the microvisor depends on neither being clear.
        unsafe {
            let mut fc = Msr::new(crate::vmx_caps::MSR_FEATURE_CONTROL);
            if fc.read() & 1 == 0 {
                fc.write(fc.read() | 0b101);
            }
            let (cr0, cr4): (u64, u64);
            asm!("mov {}, cr0", "mov {}, cr4", out(reg) cr0, out(reg) cr4, options(nomem, nostack));
            asm!("mov cr0, {}", "mov cr4, {}", in(reg) (cr0 | m.cr0_fixed.0) & m.cr0_fixed.1,
                 in(reg) (cr4 | m.cr4_fixed.0) & m.cr4_fixed.1, options(nostack));
        }
        if !vmx_pa_instruction!("vmxon", region) {
            return Err("VMXON failed");
        }
        Ok(Self {
            controls,
            revision,
            io_bitmaps,
            msr_bitmap,
            msr_bitmap_vm,
            alloc,
            current: None,
            vcpus: [VcpuVmx::NONE; MAX_VCPUS],
            preemption: u32::MAX,
        })
    }

    /// One scheduler tick is `tsc` TSC cycles: a vCPU exits after running that long even if
    /// no interrupt made it exit (see [`super::controls::pin::PREEMPTION_TIMER`]).
    pub fn set_tick(&mut self, tsc: u64) {
        self.preemption = (tsc >> self.controls.preemption_shift).clamp(1, u32::MAX as u64) as u32;
    }

    /// Allocate every vCPU's VMCS page up front (kept for reuse, as on SVM). False if
    /// memory ran out.
    pub fn preallocate(&mut self) -> bool {
        for v in self.vcpus.iter_mut() {
            if v.vmcs == 0 {
                match (self.alloc)(1) {
                    Some(pa) => v.vmcs = pa,
                    None => return false,
                }
            }
        }
        true
    }

    /// Make `v`'s VMCS the current one (VMPTRLD), so VMREAD and VMWRITE reach it.
    #[inline(always)]
    fn load(&mut self, v: VcpuId) -> Current {
        if self.current != Some(v) {
            // VMPTRLD of a VMCS `create` initialised (cleared, revision written).
            let _ = vmx_pa_instruction!("vmptrld", self.vcpus[v as usize].vmcs);
            self.current = Some(v);
        }
        Current
    }

    /// The host state every exit returns to (SDM 24.5, checked by 26.2.2-26.2.3): this
    /// CPU's control registers, segment selectors and bases, EFER and PAT. HOST_RSP and
    /// HOST_RIP are written by the world switch.
    fn write_host_state(c: &mut Current) {
        let (cr0, cr3, cr4): (u64, u64, u64);
        let mut sel = [0u16; 7];
        let mut gdt = [0u8; 10];
        let mut idt = [0u8; 10];
        // SAFETY: reading control registers, segment selectors and the descriptor-table
        // registers has no side effects; SGDT and SIDT write the 10 bytes given.
        unsafe {
            asm!("mov {}, cr0", "mov {}, cr3", "mov {}, cr4", out(reg) cr0, out(reg) cr3, out(reg) cr4, options(nomem, nostack));
            asm!("mov {:x}, es", "mov {:x}, cs", "mov {:x}, ss", "mov {:x}, ds", out(reg) sel[0], out(reg) sel[1], out(reg) sel[2], out(reg) sel[3], options(nomem, nostack));
            asm!("mov {:x}, fs", "mov {:x}, gs", "str {:x}", out(reg) sel[4], out(reg) sel[5], out(reg) sel[6], options(nomem, nostack));
            asm!("sgdt [{}]", "sidt [{}]", in(reg) gdt.as_mut_ptr(), in(reg) idt.as_mut_ptr(), options(nostack));
        }
        let table = |b: [u8; 10]| u64::from_le_bytes([b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9]]);
        let gdt_base = table(gdt);
        // The TSS descriptor (16 bytes in long mode): base bits 0..24 in bytes 2..5, 24..32
        // in byte 7, 32..64 in bytes 8..12.
        // SAFETY: TR's selector indexes the GDT the microvisor built and loaded (cpu::init).
        let d = unsafe { core::ptr::read_unaligned((gdt_base + (sel[6] & !7) as u64) as *const [u8; 16]) };
        let tr_base = u64::from_le_bytes([d[2], d[3], d[4], d[7], d[8], d[9], d[10], d[11]]);
        c.write(f::HOST_CR0, cr0);
        c.write(f::HOST_CR3, cr3);
        c.write(f::HOST_CR4, cr4);
        // Host selectors must have RPL and TI clear (26.2.3): the microvisor's are.
        for (i, s) in sel.iter().enumerate() {
            c.write(f::HOST_ES_SELECTOR + 2 * i as u32, (*s & !7) as u64);
        }
        // SAFETY: FS.base, GS.base, EFER and PAT exist on every x86-64 CPU with VMX.
        let msr = |m: u32| unsafe { Msr::new(m).read() };
        c.write(f::HOST_FS_BASE, msr(0xc000_0100));
        c.write(f::HOST_GS_BASE, msr(0xc000_0101));
        c.write(f::HOST_TR_BASE, tr_base);
        c.write(f::HOST_GDTR_BASE, gdt_base);
        c.write(f::HOST_IDTR_BASE, table(idt));
        c.write(f::HOST_EFER, msr(0xc000_0080));
        c.write(f::HOST_PAT, msr(0x277));
        c.write(f::HOST_SYSENTER_CS, 0);
    }

    /// After an exit other than VMCALL: re-inject an event whose delivery the exit cut
    /// short, then decode.
    #[inline(never)]
    fn exit_slow(&mut self, reason: u32, c: &mut Current) -> Exit {
        let len = c.read(f::EXIT_INSTRUCTION_LENGTH);
        events::reinject(c, len);
        let base = reason & 0xffff;
        let mut fields = ExitFields { reason, qualification: c.read(f::EXIT_QUALIFICATION), len, ..Default::default() };
        if base == exit::EPT_VIOLATION || base == exit::EPT_MISCONFIGURATION {
            fields.gpa = c.read(f::GUEST_PHYSICAL_ADDRESS);
        }
        if base == exit::EXCEPTION_OR_NMI {
            fields.interruption = c.read(f::EXIT_INTERRUPTION_INFO);
            fields.error = c.read(f::EXIT_INTERRUPTION_ERROR);
        }
        exit::decode(&fields)
    }

    fn invalidate(kind: u64, descriptor: [u64; 2], invept: bool) {
        // SAFETY: INVEPT/INVVPID only drop cached translations; the descriptor is a valid
        // 16-byte memory operand and the type one the CPU reports (checked by VmxCaps).
        unsafe {
            if invept {
                asm!("invept {}, [{}]", in(reg) kind, in(reg) descriptor.as_ptr(), options(nostack));
            } else {
                asm!("invvpid {}, [{}]", in(reg) kind, in(reg) descriptor.as_ptr(), options(nostack));
            }
        }
    }
}

/// INVEPT / INVVPID type 1: single context (SDM 30.3, "INVEPT" and "INVVPID").
const SINGLE_CONTEXT: u64 = 1;

impl VcpuHardware for Vmx {
    fn create(&mut self, v: VcpuId, boot: &VcpuBoot) -> Result<(), Error> {
        // One VPID per domain, never 0 (the host's; entry refuses it with VPIDs enabled).
        let vpid = boot.domain + 1;
        let i = v as usize;
        if self.vcpus[i].vmcs == 0 {
            self.vcpus[i].vmcs = (self.alloc)(1).ok_or(Error::OutOfMemory)?;
        }
        let pa = self.vcpus[i].vmcs;
        // SAFETY: the VMCS page is this vCPU's alone, identity-mapped; the revision
        // identifier goes in its first four bytes before VMCLEAR (SDM 24.2).
        unsafe { (pa as *mut u32).write(self.revision) };
        // VMCLEAR puts the VMCS in the "clear" launch state (and, for a page used before,
        // writes back whatever the CPU cached of it).
        let _ = vmx_pa_instruction!("vmclear", pa);
        if self.current == Some(v) {
            self.current = None;
        }
        let tables = Tables {
            io_bitmap_a: self.io_bitmaps,
            io_bitmap_b: self.io_bitmaps + PAGE as u64,
            msr_bitmap: if boot.vm { self.msr_bitmap_vm } else { self.msr_bitmap },
            eptp: Tables::eptp(boot.stage2_root),
            vpid,
        };
        let controls = self.controls;
        let mut c = self.load(v);
        state::init(&mut c, &controls, &tables, boot);
        Self::write_host_state(&mut c);
        // Without "save VMX-preemption timer value" every entry starts the timer from this
        // value (SDM 26.7.4): a vCPU exits after one tick of running, never at entry (a
        // saved value of 0 would exit before the first instruction, and Bochs then lost
        // the event the entry was injecting).
        c.write(f::PREEMPTION_TIMER_VALUE, self.preemption as u64);
        self.vcpus[i] = VcpuVmx { vmcs: pa, eptp: tables.eptp, ..VcpuVmx::NONE };
        // A domain slot (and so its VPID) and a page-table root are reused after a domain
        // is destroyed: drop what the CPU may still hold for the old ones (SDM 28.4.3).
        Self::invalidate(SINGLE_CONTEXT, [vpid as u64, 0], false);
        Self::invalidate(SINGLE_CONTEXT, [tables.eptp, 0], true);
        Ok(())
    }

    #[inline(always)]
    fn run(&mut self, v: VcpuId, regs: &mut Regs) -> Exit {
        let mut c = self.load(v);
        c.write(f::GUEST_RIP, regs.rip);
        let proc1 = self.controls.proc1;
        let irq = &mut self.vcpus[v as usize].irq;
        if irq.pending() {
            irq.prepare(&mut c, proc1);
        }
        let vc = &mut self.vcpus[v as usize];
        // SAFETY: the VMCS of vCPU v is current and complete (`create`); `regs` is that
        // vCPU's register file; CR2 holds nothing of the microvisor's (it takes no page
        // faults it survives).
        let failed = unsafe {
            asm!("mov cr2, {}", in(reg) vc.cr2, options(nostack, nomem));
            vmx_switch(regs, vc.launched as u64)
        };
        if failed != 0 {
            // VMfailValid: the controls or the host state were refused; the reason is the
            // VM-instruction error (SDM 30.4).
            return Exit::Invalid(c.read(f::VM_INSTRUCTION_ERROR) << 32);
        }
        vc.launched = true;
        // SAFETY: reading CR2 has no side effects. STI; NOP; CLI lets in a physical
        // interrupt that arrived while the guest ran without making it exit (Bochs 2.7
        // makes no external-interrupt exit while the guest has RFLAGS.IF clear): the tick
        // is then seen at this exit, whatever its reason, not only at the next
        // preemption-timer exit. The microvisor's interrupt handlers touch only their
        // counters and the EOI register, as where the run loop lets them in.
        unsafe {
            asm!("mov {}, cr2", out(reg) vc.cr2, options(nostack, nomem));
            asm!("sti", "nop", "cli", options(nostack));
        }
        regs.rip = c.read(f::GUEST_RIP);
        let reason = c.read(f::EXIT_REASON) as u32;
        // The hypercall, first and alone: it is what the IPC fast path runs on. VMCALL is
        // three bytes (0F 01 C1) and its exit cannot interrupt an event delivery.
        if reason == exit::VMCALL {
            return Exit::Hypercall { len: 3 };
        }
        self.exit_slow(reason, &mut c)
    }

    #[inline(always)]
    fn complete(&mut self, v: VcpuId, regs: &mut Regs, len: u8) {
        regs.rip = regs.rip.wrapping_add(len as u64);
        // The instruction is complete, so an interrupt shadow it sat in (after STI or MOV
        // SS) is over (as on SVM).
        let mut c = self.load(v);
        let blocking = c.read(f::GUEST_INTERRUPTIBILITY);
        if blocking & 3 != 0 {
            c.write(f::GUEST_INTERRUPTIBILITY, blocking & !3);
        }
    }

    fn inject(&mut self, v: VcpuId, event: Event) {
        events::inject(&mut self.load(v), event);
    }

    fn offer_interrupt(&mut self, v: VcpuId, vector: u8) -> bool {
        let slot = &mut self.vcpus[v as usize].irq.offered;
        if slot.is_some() {
            return false;
        }
        *slot = Some(vector);
        true
    }

    fn interrupt_offered(&mut self, v: VcpuId) -> bool {
        self.vcpus[v as usize].irq.offered.is_some()
    }

    fn flush_tlb(&mut self, v: VcpuId) {
        // A stage-2 mapping went away: drop the guest-physical and combined translations
        // derived from this vCPU's EPT, whatever their VPID (SDM 28.4.3.1).
        Self::invalidate(SINGLE_CONTEXT, [self.vcpus[v as usize].eptp, 0], true);
    }

    fn state(&mut self, v: VcpuId, regs: &mut Regs, s: &mut ArchState) {
        let c = self.load(v);
        state::read(&c, regs, self.vcpus[v as usize].cr2, s);
    }

    fn set_state(&mut self, v: VcpuId, regs: &mut Regs, mask: u16, s: &ArchState) {
        let controls = self.controls;
        let mut c = self.load(v);
        if let Some(cr2) = state::write(&mut c, &controls, regs, mask, s) {
            self.vcpus[v as usize].cr2 = cr2;
        }
    }

    fn efer(&mut self, v: VcpuId) -> u64 {
        self.load(v).read(f::GUEST_EFER)
    }

    fn set_efer(&mut self, v: VcpuId, value: u64) -> bool {
        state::set_efer(&mut self.load(v), value)
    }
}

impl VirqHardware for Vmx {
    fn virq_offered(&mut self, v: VcpuId) -> Option<u8> {
        self.vcpus[v as usize].irq.offered
    }

    fn virq_offer(&mut self, v: VcpuId, vector: u8) {
        self.offer_interrupt(v, vector);
    }

    fn virq_injectable(&mut self, v: VcpuId) -> bool {
        events::interruptible(&self.load(v))
    }

    fn virq_window(&mut self, v: VcpuId, on: bool) {
        self.vcpus[v as usize].irq.window = on;
    }

    fn virq_inject(&mut self, v: VcpuId, vector: u8) {
        self.inject(v, Event::Interrupt(vector));
    }
}

// The world switch moves registers by their offsets in `Regs` (`offset_of!` below); its
// size is fixed here so that a field added or removed is noticed.
const _: () = assert!(core::mem::size_of::<Regs>() == 18 * 8);

/// The world switch: saves the host's callee-saved registers, records the host RSP and RIP
/// the exit returns to, loads the guest's general registers (RSP and RIP are in the VMCS)
/// and enters with VMLAUNCH or VMRESUME. Returns 0 after a VM exit (guest registers stored
/// back), 1 if the entry instruction failed (VMfail: nothing ran).
#[unsafe(naked)]
unsafe extern "C" fn vmx_switch(regs: *mut Regs, launched: u64) -> u64 {
    core::arch::naked_asm!(
        "push rbx",
        "push rbp",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "push rdi", // regs, for the exit
        "mov rax, {host_rsp}",
        "vmwrite rax, rsp",
        "lea rdx, [rip + 2f]",
        "mov rax, {host_rip}",
        "vmwrite rax, rdx",
        "test rsi, rsi", // MOVs keep the flags until the JNZ
        "mov rax, [rdi + {rax_at}]",
        "mov rbx, [rdi + {rbx_at}]",
        "mov rcx, [rdi + {rcx_at}]",
        "mov rdx, [rdi + {rdx_at}]",
        "mov rbp, [rdi + {rbp_at}]",
        "mov rsi, [rdi + {rsi_at}]",
        "mov r8,  [rdi + {r8_at}]",
        "mov r9,  [rdi + {r9_at}]",
        "mov r10, [rdi + {r10_at}]",
        "mov r11, [rdi + {r11_at}]",
        "mov r12, [rdi + {r12_at}]",
        "mov r13, [rdi + {r13_at}]",
        "mov r14, [rdi + {r14_at}]",
        "mov r15, [rdi + {r15_at}]",
        "mov rdi, [rdi + {rdi_at}]",
        "jnz 1f",
        "vmlaunch",
        "jmp 3f",
        "1:",
        "vmresume",
        // VMfail: the instruction fell through; the host's registers are on the stack.
        "3:",
        "pop rdi",
        "mov eax, 1",
        "jmp 4f",
        // VM exit (HOST_RIP): RSP is HOST_RSP, pointing at the saved `regs`.
        "2:",
        "push rdi",
        "mov rdi, [rsp + 8]",
        "mov [rdi + {rax_at}], rax",
        "mov [rdi + {rbx_at}], rbx",
        "mov [rdi + {rcx_at}], rcx",
        "mov [rdi + {rdx_at}], rdx",
        "mov [rdi + {rbp_at}], rbp",
        "mov [rdi + {rsi_at}], rsi",
        "mov [rdi + {r8_at}], r8",
        "mov [rdi + {r9_at}], r9",
        "mov [rdi + {r10_at}], r10",
        "mov [rdi + {r11_at}], r11",
        "mov [rdi + {r12_at}], r12",
        "mov [rdi + {r13_at}], r13",
        "mov [rdi + {r14_at}], r14",
        "mov [rdi + {r15_at}], r15",
        "pop rax",
        "mov [rdi + {rdi_at}], rax",
        "pop rdi",
        "xor eax, eax",
        "4:",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbp",
        "pop rbx",
        "ret",
        host_rsp = const f::HOST_RSP,
        host_rip = const f::HOST_RIP,
        rax_at = const core::mem::offset_of!(Regs, rax),
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

//! The vendor seam: what the run loop and the exit handler need from the CPU's
//! virtualization extension, in neutral terms. AMD SVM implements it (`svm/`), Intel VMX
//! (`vmx/`) the same trait; a build has one of them (cargo feature `vmx`). Nothing outside
//! the vendor folder knows a VMCB offset, an exit code or how segment attributes are packed.

use ipc_spec::exit::{Event, Io, VcpuState as ArchState};
use ipc_spec::Error;

use crate::kernel::{Regs, VcpuBoot, VcpuId};

/// Why a vCPU stopped running, decoded from the vendor's exit information. `len` is the
/// length of the exiting instruction (from the CPU's next-RIP where it reports one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// VMMCALL / VMCALL.
    Hypercall {
        len: u8,
    },
    Cpuid {
        len: u8,
    },
    /// RDMSR (`write` false) or WRMSR; the index is in RCX.
    Msr {
        write: bool,
        len: u8,
    },
    Io {
        io: Io,
        len: u8,
    },
    /// The guest-physical address is not mapped, or not with this access
    /// (`ipc_spec::exit::access` bits).
    Stage2Fault {
        gpa: u64,
        access: u64,
    },
    Hlt {
        len: u8,
    },
    /// A physical interrupt or NMI arrived while the guest ran.
    Interrupt,
    /// The guest can take an interrupt now (requested with `want_interrupt_window`).
    InterruptWindow,
    /// An intercepted exception.
    Exception {
        vector: u8,
        error: u64,
    },
    /// Triple fault.
    Shutdown,
    /// The hardware refused the vCPU state (VM entry failed); the vendor's reason, for the
    /// report (VMX: the basic exit reason, or the VM-instruction error << 32; SVM: 0).
    Invalid(u64),
    /// An intercept without a neutral meaning (SVM/VMX instructions, INVD...): the vendor's
    /// exit code, for reports.
    Other(u64),
}

/// One CPU's virtualization hardware, per vCPU.
pub trait VcpuHardware {
    /// Build vCPU `v`'s hardware state from its boot state. Fails, leaving nothing
    /// behind, when memory or TLB tags (ASIDs, VPIDs) run out.
    fn create(&mut self, v: VcpuId, boot: &VcpuBoot) -> Result<(), Error>;
    /// Run `v` (RAX and RIP from `regs`, which the call keeps up to date) until it exits.
    fn run(&mut self, v: VcpuId, regs: &mut Regs) -> Exit;
    /// Resume after an instruction the microvisor or a handler emulated: RIP moves past
    /// it and an interrupt shadow it sat in is over.
    fn complete(&mut self, v: VcpuId, regs: &mut Regs, len: u8);
    /// Deliver `event` at the next entry.
    fn inject(&mut self, v: VcpuId, event: Event);
    /// Offer the guest interrupt `vector`, taken when its RFLAGS.IF allows; false if one
    /// offered earlier is still waiting (then try again at the next entry).
    fn offer_interrupt(&mut self, v: VcpuId, vector: u8) -> bool;
    /// An offered interrupt is still waiting to be taken.
    fn interrupt_offered(&mut self, v: VcpuId) -> bool;
    /// Flush `v`'s guest TLB entries at its next entry (a stage-2 mapping went away).
    fn flush_tlb(&mut self, v: VcpuId);
    /// The architectural state (GPRs from `regs`, after syncing their RSP and RFLAGS).
    fn state(&mut self, v: VcpuId, regs: &mut Regs, s: &mut ArchState);
    /// Write the state groups `mask` of `s`.
    fn set_state(&mut self, v: VcpuId, regs: &mut Regs, mask: u16, s: &ArchState);
    /// The guest's EFER as it sees it, and a write to it (the microvisor emulates EFER for
    /// every domain; false: the value is refused, #GP).
    fn efer(&mut self, v: VcpuId) -> u64;
    fn set_efer(&mut self, v: VcpuId, value: u64) -> bool;
}

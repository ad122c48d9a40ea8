//! What the microvisor does on each #VMEXIT: emulate the little it must (CPUID, EFER),
//! serve hypercalls, and turn everything a domain is not allowed to do into a stop with a
//! report. A domain can never crash the microvisor from here: every input is checked.

use core::fmt;

use ipc_spec::hypercall::{
    self, Hypercall, CONSOLE_WRITE_MAX, CPUID_LEAF_ABI, CPUID_LEAF_SIGNATURE, CPUID_SIGNATURE,
};
use ipc_spec::machine_exit::MachineExit;
use ipc_spec::Error;
use microvisor::guest_memory::read_guest;
use microvisor::svm::exit::ExitReason;
use microvisor::svm::vmcb::{efer, save};
use pvh::exceptions::exception_name;

use crate::arch::phys::{IdentityMemory, PhysTables};
use crate::domain::Domain;

/// What happens to the vCPU after an exit.
pub enum Verdict {
    Resume,
    /// HLT: the vCPU waits for an event.
    Halt,
    Stop(StopReason),
    PowerOff(MachineExit),
}

/// Why a domain was stopped; printed as the report.
pub enum StopReason {
    Exited {
        status: u64,
    },
    Stage2Fault {
        gpa: u64,
        access: &'static str,
        present: bool,
        rip: u64,
    },
    TripleFault {
        rip: u64,
    },
    Exception {
        vector: u8,
        error_code: u64,
        rip: u64,
    },
    PortIo {
        port: u16,
        write: bool,
        rip: u64,
    },
    InvalidState,
    Unexpected {
        code: u64,
        rip: u64,
    },
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Exited { status } => write!(f, "exited with status {status}"),
            Self::Stage2Fault {
                gpa,
                access,
                present,
                rip,
            } => write!(
                f,
                "stage-2 fault: {access} at guest-physical {gpa:#x} ({}), RIP {rip:#x}",
                if present {
                    "access not permitted"
                } else {
                    "not mapped: outside the domain's memory"
                }
            ),
            Self::TripleFault { rip } => write!(f, "triple fault (shutdown), RIP {rip:#x}"),
            Self::Exception {
                vector,
                error_code,
                rip,
            } => write!(
                f,
                "unrecoverable exception {vector} ({}), error code {error_code:#x}, RIP {rip:#x}",
                exception_name(vector as u64)
            ),
            Self::PortIo { port, write, rip } => write!(
                f,
                "port I/O ({} port {port:#x}): domains own no I/O ports, RIP {rip:#x}",
                if write { "OUT to" } else { "IN from" }
            ),
            Self::InvalidState => f.write_str("VMRUN rejected the vCPU state (exit code -1)"),
            Self::Unexpected { code, rip } => write!(
                f,
                "forbidden instruction (exit code {code:#x}), RIP {rip:#x}"
            ),
        }
    }
}

/// Instruction lengths: TCG offers no next-RIP save, so RIP advances by known lengths.
const VMMCALL_LEN: u64 = 3;
const CPUID_LEN: u64 = 2;
const MSR_LEN: u64 = 2;
const HLT_LEN: u64 = 1;
const IA32_EFER: u64 = 0xc000_0080;

pub fn handle(domain: &mut Domain) -> Verdict {
    let (code, info1, info2, rip) = {
        let v = &*domain.vcpu.vmcb;
        (v.exit_code(), v.exit_info1(), v.exit_info2(), v.rip())
    };
    match ExitReason::decode(code, info1, info2) {
        ExitReason::Vmmcall => hypercall(domain, rip),
        ExitReason::Cpuid => {
            emulate_cpuid(domain);
            domain.vcpu.vmcb.set_rip(rip + CPUID_LEN);
            Verdict::Resume
        }
        ExitReason::Hlt => {
            domain.vcpu.vmcb.set_rip(rip + HLT_LEN);
            Verdict::Halt
        }
        ExitReason::Msr { write } => {
            emulate_msr(domain, write, rip);
            Verdict::Resume
        }
        ExitReason::PhysicalInterrupt => Verdict::Resume,
        ExitReason::NestedPageFault { gpa, error } => Verdict::Stop(StopReason::Stage2Fault {
            gpa,
            access: error.access(),
            present: error.present(),
            rip,
        }),
        ExitReason::Shutdown => Verdict::Stop(StopReason::TripleFault { rip }),
        ExitReason::Exception { vector, error_code } => Verdict::Stop(StopReason::Exception {
            vector,
            error_code,
            rip,
        }),
        ExitReason::Io { port, write, .. } => {
            Verdict::Stop(StopReason::PortIo { port, write, rip })
        }
        ExitReason::Invalid => Verdict::Stop(StopReason::InvalidState),
        ExitReason::Other(code) => Verdict::Stop(StopReason::Unexpected { code, rip }),
    }
}

fn hypercall(domain: &mut Domain, rip: u64) -> Verdict {
    let number = domain.vcpu.vmcb.rax();
    let (arg0, arg1) = (domain.vcpu.regs.rdi, domain.vcpu.regs.rsi);
    let status = match Hypercall::from_number(number) {
        Some(Hypercall::ConsoleWrite) => console_write(domain, arg0, arg1),
        Some(Hypercall::DomainExit) => return Verdict::Stop(StopReason::Exited { status: arg0 }),
        Some(Hypercall::Shutdown) => {
            if domain.id == 0 {
                domain.console_flush();
                return Verdict::PowerOff(if arg0 == 0 {
                    MachineExit::Success
                } else {
                    MachineExit::Dom0Failure
                });
            }
            Err(Error::PermissionDenied)
        }
        None => Err(Error::UnknownHypercall),
    };
    domain.vcpu.vmcb.set_rax(hypercall::status_of(status));
    domain.vcpu.vmcb.set_rip(rip + VMMCALL_LEN);
    Verdict::Resume
}

fn console_write(domain: &mut Domain, gpa: u64, len: u64) -> Result<(), Error> {
    crate::selftest::maybe_fault_in_exit_handler();
    if len > CONSOLE_WRITE_MAX {
        return Err(Error::InvalidArgument);
    }
    let mut buf = [0u8; CONSOLE_WRITE_MAX as usize];
    let buf = &mut buf[..len as usize];
    read_guest(&domain.stage2, &PhysTables, &IdentityMemory, gpa, buf)
        .map_err(|_| Error::BadAddress)?;
    domain.console_write(buf);
    Ok(())
}

/// CPUID passes the host's answers through, minus what domains must not see (SVM, VMX,
/// MONITOR/MWAIT, which are intercepted) plus the hypervisor leaves.
fn emulate_cpuid(domain: &mut Domain) {
    let leaf = domain.vcpu.vmcb.rax() as u32;
    let subleaf = domain.vcpu.regs.rcx as u32;
    let sig = |i: usize| {
        u32::from_le_bytes([
            CPUID_SIGNATURE[i],
            CPUID_SIGNATURE[i + 1],
            CPUID_SIGNATURE[i + 2],
            CPUID_SIGNATURE[i + 3],
        ])
    };
    let (a, b, c, d) = match leaf {
        CPUID_LEAF_SIGNATURE => (CPUID_LEAF_ABI, sig(0), sig(4), sig(8)),
        CPUID_LEAF_ABI => (ipc_spec::ABI_VERSION, 0, 0, 0),
        0x4000_0002..=0x4000_00ff | 0x8000_000a => (0, 0, 0, 0),
        _ => {
            let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
            match leaf {
                // Hypervisor present; no VMX, no MONITOR/MWAIT.
                1 => (
                    r.eax,
                    r.ebx,
                    (r.ecx | (1 << 31)) & !((1 << 5) | (1 << 3)),
                    r.edx,
                ),
                // No SVM.
                0x8000_0001 => (r.eax, r.ebx, r.ecx & !(1 << 2), r.edx),
                _ => (r.eax, r.ebx, r.ecx, r.edx),
            }
        }
    };
    let regs = &mut domain.vcpu.regs;
    domain.vcpu.vmcb.set_rax(a as u64);
    regs.rbx = b as u64;
    regs.rcx = c as u64;
    regs.rdx = d as u64;
}

/// Every MSR is intercepted. EFER is emulated (a domain may enable long mode and NX, but
/// SVME stays set, as VMRUN requires); any other MSR raises #GP in the domain.
fn emulate_msr(domain: &mut Domain, write: bool, rip: u64) {
    let msr = domain.vcpu.regs.rcx;
    if msr != IA32_EFER {
        domain.vcpu.vmcb.inject_exception(13, Some(0));
        return;
    }
    let current = domain.vcpu.vmcb.read_u64(save::EFER);
    if write {
        let value = (domain.vcpu.regs.rdx << 32) | (domain.vcpu.vmcb.rax() & 0xffff_ffff);
        let allowed = efer::SCE | efer::LME | efer::LMA | efer::NXE;
        if value & !allowed != 0 {
            domain.vcpu.vmcb.inject_exception(13, Some(0));
            return;
        }
        let new =
            (value & (efer::SCE | efer::LME | efer::NXE)) | (current & efer::LMA) | efer::SVME;
        domain.vcpu.vmcb.write_u64(save::EFER, new);
    } else {
        let value = current & !efer::SVME;
        domain.vcpu.vmcb.set_rax(value & 0xffff_ffff);
        domain.vcpu.regs.rdx = value >> 32;
    }
    domain.vcpu.vmcb.set_rip(rip + MSR_LEN);
}

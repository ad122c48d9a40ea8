//! What the microvisor does on each #VMEXIT: emulate the little it must (CPUID, EFER),
//! hand hypercalls and HLT to the kernel, and turn everything a domain may not do into a
//! fault — a message to the domain's fault handler, or a stop with a report.

use core::fmt;

use ipc_spec::hypercall::{FaultKind, CPUID_LEAF_ABI, CPUID_LEAF_SIGNATURE, CPUID_SIGNATURE};
use microvisor::kernel::{Event, Fault, Kernel, Regs, VcpuId};
use microvisor::npt::Npt;
use microvisor::svm::exit::ExitReason;
use microvisor::svm::vmcb::{efer, save};
use pvh::exceptions::exception_name;

use crate::arch::apic;
use crate::machine::Machine;
use crate::println;

const VMMCALL_LEN: u64 = 3;
const CPUID_LEN: u64 = 2;
const MSR_LEN: u64 = 2;
const HLT_LEN: u64 = 1;
const IA32_EFER: u64 = 0xc000_0080;

/// Resume vCPU `v` after the `len`-byte instruction that exited, which the microvisor
/// emulated: it is complete, so an interrupt shadow it sat in (after STI or MOV SS) is over.
/// Left set, the shadow would cover the guest's next instruction too, and a virtual
/// interrupt pending after `STI; HLT` would wait past a following CLI for ever.
fn skip(m: &mut Machine, v: VcpuId, regs: &mut Regs, len: u64) {
    regs.rip += len;
    m.vmcb(v).write_u64(microvisor::svm::vmcb::control::INTERRUPT_SHADOW, 0);
}

/// Handle the exit of the running vCPU `v` (its RAX and RIP already synced into the
/// kernel's register file).
pub fn handle(k: &mut Kernel<Npt>, m: &mut Machine, v: VcpuId) -> Option<Event> {
    let (code, info1, info2) = {
        let vmcb = m.vmcb(v);
        (vmcb.exit_code(), vmcb.exit_info1(), vmcb.exit_info2())
    };
    let regs = &mut k.vcpus[v as usize].regs;
    match ExitReason::decode(code, info1, info2) {
        ExitReason::Vmmcall => {
            skip(m, v, regs, VMMCALL_LEN);
            return k.hypercall(m, v);
        }
        ExitReason::Cpuid => {
            crate::selftest::maybe_fault_in_exit_handler();
            emulate_cpuid(regs);
            skip(m, v, regs, CPUID_LEN);
        }
        ExitReason::Hlt => {
            skip(m, v, regs, HLT_LEN);
            // A virtual interrupt already loaded into V_IRQ (the guest did STI; HLT, and
            // STI's shadow covered the HLT) will be taken as soon as the guest resumes:
            // parking the vCPU now would lose that wake-up.
            if m.vmcb(v).read_u64(microvisor::svm::vmcb::control::VINTR) & (1 << 8) == 0 {
                k.halt(v);
            }
        }
        ExitReason::Msr { write } => emulate_msr(k, m, v, write),
        ExitReason::PhysicalInterrupt => apic::take_pending_interrupts(),
        ExitReason::NestedPageFault { gpa, error } => {
            let detail = error.write() as u64 | (error.fetch() as u64) << 1 | (error.present() as u64) << 2;
            fault(k, m, v, Fault { kind: FaultKind::Stage2, addr: gpa, detail });
        }
        ExitReason::Shutdown => fault(k, m, v, Fault { kind: FaultKind::TripleFault, addr: 0, detail: 0 }),
        ExitReason::Exception { vector, error_code } => {
            fault(k, m, v, Fault { kind: FaultKind::Exception, addr: vector as u64, detail: error_code })
        }
        ExitReason::Io { port, write, .. } => {
            fault(k, m, v, Fault { kind: FaultKind::Forbidden, addr: code, detail: port as u64 | (write as u64) << 16 })
        }
        ExitReason::Invalid | ExitReason::Other(_) => {
            fault(k, m, v, Fault { kind: FaultKind::Forbidden, addr: code, detail: 0 })
        }
    }
    None
}

/// A fault: to the domain's handler if it has one, else the vCPU stops; reported either way.
pub fn fault(k: &mut Kernel<Npt>, m: &mut Machine, v: VcpuId, f: Fault) {
    let d = k.vcpus[v as usize].domain;
    let rip = k.vcpus[v as usize].regs.rip;
    k.console_flush(m, d);
    let handled = k.fault(m, v, f);
    let name = k.domains[d as usize].name();
    if handled {
        println!("domain {name}: {}; sent to its fault handler", Report(f, rip));
    } else {
        println!("domain {name} stopped: {}", Report(f, rip));
    }
}

/// A fault in words.
struct Report(Fault, u64);

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (fault, rip) = (self.0, self.1);
        match fault.kind {
            FaultKind::Stage2 => write!(
                f,
                "stage-2 fault: {} at guest-physical {:#x} ({}), RIP {rip:#x}",
                match fault.detail & 3 {
                    0 => "read",
                    1 => "write",
                    _ => "execute",
                },
                fault.addr,
                if fault.detail & 4 != 0 { "access not permitted" } else { "not mapped: outside the domain's memory" }
            ),
            FaultKind::TripleFault => write!(f, "triple fault (shutdown), RIP {rip:#x}"),
            FaultKind::Exception => write!(
                f,
                "unrecoverable exception {} ({}), error code {:#x}, RIP {rip:#x}",
                fault.addr,
                exception_name(fault.addr),
                fault.detail
            ),
            FaultKind::Forbidden if fault.addr == microvisor::svm::exit::IOIO => write!(
                f,
                "port I/O ({} port {:#x}): domains own no I/O ports, RIP {rip:#x}",
                if fault.detail >> 16 != 0 { "OUT to" } else { "IN from" },
                fault.detail & 0xffff
            ),
            FaultKind::Forbidden if fault.addr == microvisor::svm::exit::INVALID => {
                f.write_str("VMRUN rejected the vCPU state (exit code -1)")
            }
            FaultKind::Forbidden => write!(f, "forbidden instruction (exit code {:#x}), RIP {rip:#x}", fault.addr),
            FaultKind::Exited => write!(f, "exited with status {}", fault.detail),
            FaultKind::Dma => write!(
                f,
                "its device {} made a blocked DMA {} at {:#x}",
                microvisor::pci::Bdf::from_requester_id(fault.detail as u16),
                if fault.detail & (1 << 24) != 0 { "write" } else { "read" },
                fault.addr
            ),
        }
    }
}

/// CPUID passes the host's answers through, minus what domains must not see (SVM, VMX,
/// MONITOR/MWAIT, which are intercepted) plus the hypervisor leaves.
fn emulate_cpuid(regs: &mut microvisor::kernel::Regs) {
    let (leaf, subleaf) = (regs.rax as u32, regs.rcx as u32);
    let sig = |i: usize| {
        u32::from_le_bytes([CPUID_SIGNATURE[i], CPUID_SIGNATURE[i + 1], CPUID_SIGNATURE[i + 2], CPUID_SIGNATURE[i + 3]])
    };
    let (a, b, c, d) = match leaf {
        CPUID_LEAF_SIGNATURE => (CPUID_LEAF_ABI, sig(0), sig(4), sig(8)),
        CPUID_LEAF_ABI => (ipc_spec::ABI_VERSION, 0, 0, 0),
        0x4000_0002..=0x4000_00ff | 0x8000_000a => (0, 0, 0, 0),
        _ => {
            let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
            match leaf {
                // Hypervisor present; no VMX, no MONITOR/MWAIT.
                1 => (r.eax, r.ebx, (r.ecx | (1 << 31)) & !((1 << 5) | (1 << 3)), r.edx),
                // No SVM.
                0x8000_0001 => (r.eax, r.ebx, r.ecx & !(1 << 2), r.edx),
                _ => (r.eax, r.ebx, r.ecx, r.edx),
            }
        }
    };
    (regs.rax, regs.rbx, regs.rcx, regs.rdx) = (a as u64, b as u64, c as u64, d as u64);
}

/// Every MSR is intercepted. EFER is emulated (a domain may enable long mode and NX, but
/// SVME stays set, as VMRUN requires); any other MSR raises #GP in the domain.
fn emulate_msr(k: &mut Kernel<Npt>, m: &mut Machine, v: VcpuId, write: bool) {
    let regs = &mut k.vcpus[v as usize].regs;
    let vmcb = m.vmcb(v);
    if regs.rcx != IA32_EFER {
        vmcb.inject_exception(13, Some(0));
        return;
    }
    let current = vmcb.read_u64(save::EFER);
    if write {
        let value = (regs.rdx << 32) | (regs.rax & 0xffff_ffff);
        if value & !(efer::SCE | efer::LME | efer::LMA | efer::NXE) != 0 {
            vmcb.inject_exception(13, Some(0));
            return;
        }
        let new = (value & (efer::SCE | efer::LME | efer::NXE)) | (current & efer::LMA) | efer::SVME;
        vmcb.write_u64(save::EFER, new);
    } else {
        let value = current & !efer::SVME;
        regs.rax = value & 0xffff_ffff;
        regs.rdx = value >> 32;
    }
    skip(m, v, regs, MSR_LEN);
}

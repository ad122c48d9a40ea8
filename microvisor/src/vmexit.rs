//! What the microvisor does on each exit, in vendor-neutral terms: hand hypercalls and HLT
//! to the kernel, emulate the little it must (CPUID and EFER for ordinary domains), and
//! send everything else to the domain's exit handler (`ipc_spec::exit`), or stop the vCPU
//! with a report when it has none. A VM's port I/O, CPUID, MSRs, VMMCALL and stage-2
//! faults go to its VMM as ordinary exits, not reported.

use core::fmt;

use ipc_spec::exit::{access, Event, ExitKind};
use ipc_spec::hypercall::{CPUID_LEAF_ABI, CPUID_LEAF_SIGNATURE, CPUID_SIGNATURE};
use microvisor::kernel::{Event as KernelEvent, Kernel, PendingExit, Regs, VcpuId};
use microvisor::vcpu_hw::{Exit, VcpuHardware};
use pvh::exceptions::exception_name;

use crate::arch::apic;
use crate::bare_metal::{BareMetal, Stage2};
use crate::println;

const IA32_EFER: u64 = 0xc000_0080;

/// Handle the exit of the running vCPU `v` (its RAX and RIP already in the kernel's
/// register file).
pub fn handle(k: &mut Kernel<Stage2>, m: &mut BareMetal, v: VcpuId, exit: Exit) -> Option<KernelEvent> {
    let vcpu = &mut k.vcpus[v as usize];
    let regs = &mut vcpu.regs;
    match exit {
        // A VM's VMMCALL is its VMM's business (below); everyone else's is a hypercall.
        Exit::Hypercall { len } if !vcpu.vm => {
            m.hw.complete(v, regs, len);
            return k.hypercall(m, v);
        }
        Exit::Cpuid { len } if !vcpu.vm => {
            crate::selftest::maybe_fault_in_exit_handler();
            emulate_cpuid(regs);
            m.hw.complete(v, regs, len);
        }
        Exit::Msr { write, len } if regs.rcx == IA32_EFER => emulate_efer(m, v, regs, write, len),
        Exit::Msr { .. } if !vcpu.vm => m.hw.inject(v, Event::Exception(13, Some(0))),
        Exit::Hlt { len } => {
            m.hw.complete(v, regs, len);
            k.hlt_exit(&mut m.hw, v);
        }
        Exit::Interrupt => apic::take_pending_interrupts(),
        Exit::InterruptWindow => k.interrupt_window_exit(&mut m.hw, v),
        other => {
            let x = pending_exit(other, regs);
            send(k, m, v, x);
        }
    }
    None
}

/// The message facts of an exit (see the table in `ipc_spec::exit`).
fn pending_exit(exit: Exit, regs: &Regs) -> PendingExit {
    let with_len = |kind, len, a, b| PendingExit { kind, insn_len: len, a, b };
    match exit {
        Exit::Io { io, len } => {
            let value = if io.write && !io.string { regs.rax & io.mask() } else { 0 };
            with_len(ExitKind::Io, len, io.encode(), value)
        }
        Exit::Cpuid { len } => with_len(ExitKind::Cpuid, len, regs.rax & 0xffff_ffff, regs.rcx & 0xffff_ffff),
        Exit::Msr { write, len } => {
            let value = if write { (regs.rdx << 32) | (regs.rax & 0xffff_ffff) } else { 0 };
            with_len(ExitKind::Msr, len, (regs.rcx & 0xffff_ffff) | (write as u64) << 32, value)
        }
        Exit::Hypercall { len } => with_len(ExitKind::Hypercall, len, 0, 0),
        Exit::Stage2Fault { gpa, access } => PendingExit::new(ExitKind::Stage2, gpa, access),
        Exit::Exception { vector, error } => PendingExit::new(ExitKind::Exception, vector as u64, error),
        Exit::Shutdown => PendingExit::new(ExitKind::Shutdown, 0, 0),
        Exit::Invalid(reason) => PendingExit::new(ExitKind::Invalid, reason, 0),
        Exit::Other(code) => PendingExit::new(ExitKind::Forbidden, code, 0),
        // Handled in `handle`; never sent.
        Exit::Hlt { .. } | Exit::Interrupt | Exit::InterruptWindow => PendingExit::new(ExitKind::Forbidden, 0, 0),
    }
}

/// Send exit `x` of vCPU `v` to its domain's exit handler, or stop `v` if it has none.
/// Faults are reported on the console; a VM's ordinary exits are not.
pub fn send(k: &mut Kernel<Stage2>, m: &mut BareMetal, v: VcpuId, x: PendingExit) {
    let d = k.vcpus[v as usize].domain;
    let rip = k.vcpus[v as usize].regs.rip;
    let routine = k.domains[d as usize].vm
        && matches!(x.kind, ExitKind::Io | ExitKind::Cpuid | ExitKind::Msr | ExitKind::Hypercall | ExitKind::Stage2);
    if !routine {
        k.console_flush(m, d);
    }
    let handled = k.exit(m, v, x);
    if routine && handled {
        return;
    }
    let name = k.domains[d as usize].name();
    if handled {
        println!("domain {name}: {}; sent to its fault handler", Report(x, rip));
    } else {
        println!("domain {name} stopped: {}", Report(x, rip));
    }
}

/// An exit in words.
struct Report(PendingExit, u64);

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (x, rip) = (self.0, self.1);
        match x.kind {
            ExitKind::Stage2 => {
                let what = match (x.b & access::EXECUTE != 0, x.b & access::WRITE != 0) {
                    (true, _) => "execute",
                    (false, true) => "write",
                    (false, false) => "read",
                };
                let why = if x.b & access::PRESENT != 0 {
                    "access not permitted"
                } else {
                    "not mapped: outside the domain's memory"
                };
                write!(f, "stage-2 fault: {what} at guest-physical {:#x} ({why}), RIP {rip:#x}", x.a)
            }
            ExitKind::Shutdown => write!(f, "triple fault (shutdown), RIP {rip:#x}"),
            ExitKind::Exception => write!(
                f,
                "unrecoverable exception {} ({}), error code {:#x}, RIP {rip:#x}",
                x.a,
                exception_name(x.a),
                x.b
            ),
            ExitKind::Io => {
                let io = ipc_spec::exit::Io::decode(x.a);
                let dir = if io.write { "OUT to" } else { "IN from" };
                write!(f, "port I/O ({dir} port {:#x}): domains own no I/O ports, RIP {rip:#x}", io.port)
            }
            ExitKind::Invalid => write!(f, "the hardware rejected the vCPU state (VM entry failed, reason {:#x})", x.a),
            ExitKind::Forbidden => write!(f, "forbidden instruction (exit code {:#x}), RIP {rip:#x}", x.a),
            ExitKind::Cpuid => write!(f, "CPUID leaf {:#x}, RIP {rip:#x}", x.a),
            ExitKind::Msr => write!(f, "MSR {:#x} access, RIP {rip:#x}", x.a as u32),
            ExitKind::Hypercall => write!(f, "VMMCALL, RIP {rip:#x}"),
            ExitKind::Exited => write!(f, "exited with status {}", x.b),
            ExitKind::Dma => {
                let d = ipc_spec::exit::Dma::decode(x.b);
                let (bdf, rw) =
                    (microvisor::pci::Bdf::from_requester_id(d.requester), if d.write { "write" } else { "read" });
                write!(f, "its device {bdf} made a blocked DMA {rw} at {:#x}", x.a)
            }
        }
    }
}

/// CPUID passes the host's answers through, minus what domains must not see (SVM, VMX,
/// MONITOR/MWAIT, which are intercepted) plus the hypervisor leaves.
fn emulate_cpuid(regs: &mut Regs) {
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

/// EFER is emulated for every domain, VMs included (SVME must stay set underneath): long
/// mode, NX and SYSCALL may be enabled; anything else raises #GP.
fn emulate_efer(m: &mut BareMetal, v: VcpuId, regs: &mut Regs, write: bool, len: u8) {
    if write {
        let value = (regs.rdx << 32) | (regs.rax & 0xffff_ffff);
        if !m.hw.set_efer(v, value) {
            m.hw.inject(v, Event::Exception(13, Some(0)));
            return;
        }
    } else {
        let value = m.hw.efer(v);
        regs.rax = value & 0xffff_ffff;
        regs.rdx = value >> 32;
    }
    m.hw.complete(v, regs, len);
}

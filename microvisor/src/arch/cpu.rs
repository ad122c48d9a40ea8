//! CPU set-up (GDT, TSS with IST stacks, IDT), feature checks, the exception report, and
//! stopping the machine.

use core::fmt::Write as _;
use core::sync::atomic::{AtomicUsize, Ordering};

use microvisor::kernel::MAX_DOMAINS;

use ipc_spec::machine_exit::{MachineExit, BOCHS_SHUTDOWN, BOCHS_SHUTDOWN_PORT, DEBUG_EXIT_PORT};
use pvh::exceptions::{exception_name, exception_stub_addresses, ExceptionFrame, Idt};
use x86_64::instructions::port::Port;
use x86_64::instructions::segmentation::{Segment as _, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

use super::serial::{Serial, CONSOLE_LOCK};

pvh::exception_stubs!(crate::arch::cpu::exception_handler);

const IST_STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
struct Stack([u8; IST_STACK_SIZE]);

/// Separate stacks for faults that may hit with a broken stack: #DF, NMI, #MC.
static mut IST_STACKS: [Stack; 3] = [const { Stack([0; IST_STACK_SIZE]) }; 3];

static TSS: spin::Once<TaskStateSegment> = spin::Once::new();
static GDT: spin::Once<(GlobalDescriptorTable, SegmentSelector, SegmentSelector, SegmentSelector)> = spin::Once::new();
static IDT: spin::Once<Idt> = spin::Once::new();

/// Install the microvisor's own GDT, TSS and IDT (replacing the boot trampoline's GDT).
pub fn init() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        for i in 0..3 {
            // Only the address of the static is taken (no reference is formed); each IST
            // stack is used by the CPU alone.
            let base = (&raw const IST_STACKS) as u64 + (i * IST_STACK_SIZE) as u64;
            tss.interrupt_stack_table[i] = VirtAddr::new(base + IST_STACK_SIZE as u64);
        }
        tss
    });
    let (gdt, code, data, tss_sel) = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss_sel = gdt.append(Descriptor::tss_segment(tss));
        (gdt, code, data, tss_sel)
    });
    gdt.load();
    // SAFETY: the selectors index the GDT just loaded, whose descriptors are a 64-bit code
    // segment, a data segment and the TSS above; all are 'static.
    unsafe {
        CS::set_reg(*code);
        SS::set_reg(*data);
        DS::set_reg(*data);
        ES::set_reg(*data);
        load_tss(*tss_sel);
    }
    let idt = IDT.call_once(|| {
        let mut idt = Idt::new();
        for (vector, stub) in exception_stub_addresses().into_iter().enumerate() {
            let ist = match vector {
                8 => 1,
                2 => 2,
                18 => 3,
                _ => 0,
            };
            idt.set(vector as u8, stub, code.0, ist);
        }
        for (vector, entry) in super::apic::interrupt_entries() {
            idt.set(vector, entry, code.0, 0);
        }
        idt
    });
    idt.load();
}

/// The domain the microvisor is working for (id + 1; 0 = none), and every domain's name,
/// so an exception report can name it without touching kernel state.
static CURRENT_DOMAIN: AtomicUsize = AtomicUsize::new(0);
static DOMAIN_NAMES: spin::Mutex<[([u8; 32], usize); MAX_DOMAINS]> = spin::Mutex::new([([0; 32], 0); MAX_DOMAINS]);

/// Remember a domain's name (at its creation, off every fast path).
pub fn name_domain(domain: u16, name: &str) {
    if let Some(slot) = DOMAIN_NAMES.lock().get_mut(domain as usize) {
        let len = name.len().min(32);
        slot.0[..len].copy_from_slice(&name.as_bytes()[..len]);
        slot.1 = len;
    }
}

/// Record which domain the microvisor is working for (one store: this is on every exit).
pub fn set_current_domain(domain: Option<u16>) {
    CURRENT_DOMAIN.store(domain.map_or(0, |d| d as usize + 1), Ordering::Relaxed);
}

fn current_domain(buf: &mut [u8; 32]) -> Option<&str> {
    let d = CURRENT_DOMAIN.load(Ordering::Relaxed).checked_sub(1)?;
    let names = DOMAIN_NAMES.try_lock()?;
    let (name, len) = names.get(d)?;
    buf[..*len].copy_from_slice(&name[..*len]);
    core::str::from_utf8(&buf[..*len]).ok()
}

/// Every CPU exception in root mode is a microvisor bug: report it and stop the machine.
extern "C" fn exception_handler(frame: &mut ExceptionFrame) {
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    // The fault may have hit while the console lock was held; a report matters more.
    // SAFETY: this CPU is the only one running and it is not coming back from here.
    unsafe { CONSOLE_LOCK.force_unlock() };
    let mut s = Serial;
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "[microvisor] FATAL: CPU exception {} ({}) in the microvisor",
        frame.vector,
        exception_name(frame.vector)
    );
    let _ = writeln!(
        s,
        "[microvisor]   error code {:#x}, RIP {:#018x}, CR2 {:#018x}, RSP {:#018x}, RFLAGS {:#x}",
        frame.error_code, frame.rip, cr2, frame.rsp, frame.rflags
    );
    if stack_overflowed() {
        let _ = writeln!(s, "[microvisor]   the stack has overflowed (canary overwritten): the cause, probably");
    }
    let mut name = [0u8; 32];
    let _ = match current_domain(&mut name) {
        Some(d) => writeln!(s, "[microvisor]   while handling domain {d}"),
        None => writeln!(s, "[microvisor]   no domain was being handled"),
    };
    let _ = writeln!(
        s,
        "[microvisor]   RAX {:#x} RBX {:#x} RCX {:#x} RDX {:#x} RSI {:#x} RDI {:#x}",
        frame.rax, frame.rbx, frame.rcx, frame.rdx, frame.rsi, frame.rdi
    );
    exit_machine(MachineExit::MicrovisorFault);
}

/// The lowest word of the boot stack holds this; an overflow overwrites it before it
/// runs into the page tables below the stack.
const STACK_CANARY: u64 = 0x5afe_57ac_c0de_d00d;

extern "C" {
    /// Bottom of the boot stack (from `pvh::pvh_entry!`).
    static mut pvh_boot_stack: u64;
}

pub fn arm_stack_canary() {
    // SAFETY: the lowest word of the stack is never reached by a stack that has not
    // overflowed; only the address is taken, written through a raw pointer.
    unsafe { core::ptr::write_volatile(&raw mut pvh_boot_stack, STACK_CANARY) };
}

fn stack_overflowed() -> bool {
    // SAFETY: as in `arm_stack_canary`.
    unsafe { core::ptr::read_volatile(&raw const pvh_boot_stack) != STACK_CANARY }
}

/// Stop with a clear report if the microvisor's stack has overflowed (checked every tick).
pub fn check_stack_canary() {
    if stack_overflowed() {
        crate::println!("FATAL: the microvisor's stack overflowed (canary overwritten)");
        exit_machine(MachineExit::MicrovisorFault);
    }
}

/// Report why the machine cannot go on, and stop it with `code`.
pub fn fail(code: MachineExit, args: core::fmt::Arguments) -> ! {
    crate::println!("FATAL: {}", args);
    exit_machine(code)
}

/// End the QEMU run with `code` (through isa-debug-exit), or the Bochs run (its shutdown
/// port); halt forever if neither device is there.
pub fn exit_machine(code: MachineExit) -> ! {
    // SAFETY: port 0xf4 is QEMU's isa-debug-exit device; writing it terminates the VM. On
    // a machine without it the write is ignored and we go on below.
    unsafe { Port::<u32>::new(DEBUG_EXIT_PORT).write(code as u32) };
    Serial::drain();
    for &b in BOCHS_SHUTDOWN {
        // SAFETY: port 0x8900 is Bochs's shutdown port, which ends Bochs after "Shutdown";
        // QEMU has nothing there (and has already stopped above).
        unsafe { Port::<u8>::new(BOCHS_SHUTDOWN_PORT).write(b) };
    }
    halt_forever()
}

pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// Facts about the CPU's SVM implementation the microvisor relies on.
#[cfg(not(feature = "vmx"))]
pub struct SvmFeatures {
    pub asids: u32,
    pub next_rip_save: bool,
}

/// The SVM features the microvisor needs, or why this CPU cannot run it (with the QEMU
/// option that gives a CPU that can). The VMX build checks in `vmx_probe`.
#[cfg(not(feature = "vmx"))]
pub fn check_svm() -> Result<SvmFeatures, &'static str> {
    let ext_max = core::arch::x86_64::__cpuid(0x8000_0000).eax;
    let ext1 = core::arch::x86_64::__cpuid(0x8000_0001);
    if ext1.ecx & (1 << 2) == 0 || ext_max < 0x8000_000a {
        return Err("this CPU has no AMD SVM (CPUID 0x80000001 ECX bit 2). Start QEMU with \
                    `-cpu qemu64,+svm,+npt` (or `-cpu max`). An Intel CPU with VMX needs the VMX build \
                    (cargo feature `vmx`).");
    }
    if ext1.edx & (1 << 20) == 0 {
        return Err("this CPU has no NX bit (CPUID 0x80000001 EDX bit 20), which stage-2 permissions need. \
                    Start QEMU with `-cpu qemu64,+svm,+npt`.");
    }
    // Leaf 0x8000000A exists: checked against the maximum extended leaf above.
    let svm = core::arch::x86_64::__cpuid(0x8000_000a);
    if svm.edx & 1 == 0 {
        return Err("this CPU has SVM but no nested paging (CPUID 0x8000000A EDX bit 0). Start QEMU with \
                    `-cpu qemu64,+svm,+npt` (the `+npt` is missing).");
    }
    // SAFETY: VM_CR (0xC0010114) exists on every CPU that reports SVM.
    let vm_cr = unsafe { x86_64::registers::model_specific::Msr::new(0xc001_0114).read() };
    if vm_cr & (1 << 4) != 0 {
        return Err("SVM is disabled by firmware (VM_CR.SVMDIS is set).");
    }
    Ok(SvmFeatures { asids: svm.ebx, next_rip_save: svm.edx & (1 << 3) != 0 })
}

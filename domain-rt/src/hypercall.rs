//! Hypercall stubs: VMMCALL (AMD) or VMCALL (Intel) with the register convention of
//! `ipc_spec::hypercall`.

use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use ipc_spec::hypercall::{result_of, Hypercall, REGISTER_WORDS};
use ipc_spec::Error;

/// The registers of one hypercall, in and out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    /// RDI, RSI, RDX, R10, R8, R9.
    pub args: [u64; REGISTER_WORDS],
}

/// Which instruction traps to the microvisor: VMMCALL under AMD SVM, VMCALL under Intel VMX
/// (each is #UD on the other vendor's CPU, SDM vol. 2 / APM vol. 3). Chosen from the CPU
/// vendor string (CPUID leaf 0) on the first hypercall, never by build: the same domain
/// image runs on both. The fast path pays one load and a branch.
static INSTRUCTION: AtomicU8 = AtomicU8::new(UNKNOWN);
const UNKNOWN: u8 = 0;
const VMMCALL: u8 = 1;
const VMCALL: u8 = 2;

/// The CPU is Intel's (or another VMX vendor's): hypercalls are VMCALL.
#[inline(always)]
pub fn on_vmx() -> bool {
    match INSTRUCTION.load(Ordering::Relaxed) {
        VMCALL => true,
        VMMCALL => false,
        _ => choose(),
    }
}

#[cold]
#[inline(never)]
fn choose() -> bool {
    // "AuthenticAMD" and "HygonGenuine" (AMD's design) have SVM; every other vendor VMX.
    let r = core::arch::x86_64::__cpuid(0);
    let amd = matches!(
        (r.ebx, r.edx, r.ecx),
        (0x6874_7541, 0x6974_6e65, 0x444d_4163) | (0x6f67_7948, 0x6e65_476e, 0x656e_6975)
    );
    INSTRUCTION.store(if amd { VMMCALL } else { VMCALL }, Ordering::Relaxed);
    !amd
}

/// Make a hypercall with every argument register; returns every result register.
#[inline(always)]
pub fn raw(number: u64, rbx: u64, rcx: u64, args: [u64; REGISTER_WORDS]) -> Regs {
    let [mut a0, mut a1, mut a2, mut a3, mut a4, mut a5] = args;
    let (mut rax, mut b, mut c) = (number, rbx, rcx);
    macro_rules! trap {
        ($insn:literal) => {
            // SAFETY: VMMCALL/VMCALL traps to the microvisor, which reads and writes only
            // the registers named here (RBX is swapped in and out around it, as LLVM
            // reserves it) and touches our memory only as the call documents.
            unsafe {
                core::arch::asm!(
                    "xchg {b}, rbx",
                    $insn,
                    "xchg {b}, rbx",
                    b = inout(reg) b,
                    inout("rax") rax,
                    inout("rcx") c,
                    inout("rdi") a0,
                    inout("rsi") a1,
                    inout("rdx") a2,
                    inout("r10") a3,
                    inout("r8") a4,
                    inout("r9") a5,
                    options(nostack),
                )
            }
        };
    }
    if on_vmx() {
        trap!("vmcall");
    } else {
        trap!("vmmcall");
    }
    Regs { rax, rbx: b, rcx: c, args: [a0, a1, a2, a3, a4, a5] }
}

/// A hypercall taking a slot and up to six arguments; on success, the result registers.
pub fn call(h: Hypercall, slot: u64, args: [u64; REGISTER_WORDS]) -> Result<Regs, Error> {
    let r = raw(h.number(), slot, 0, args);
    result_of(r.rax).map(|()| r)
}

/// Raw hypercall with up to two arguments and no slot; returns the RAX status word.
pub fn call2(number: u64, arg0: u64, arg1: u64) -> u64 {
    raw(number, 0, 0, [arg0, arg1, 0, 0, 0, 0]).rax
}

/// An IPC message: up to six words in registers (longer messages continue in the vCPU's
/// message page, which the caller fills itself).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Message {
    pub len: u64,
    pub words: [u64; REGISTER_WORDS],
}

impl Message {
    pub fn new(words: &[u64]) -> Self {
        let mut m = Self { len: words.len() as u64, words: [0; REGISTER_WORDS] };
        let n = words.len().min(REGISTER_WORDS);
        m.words[..n].copy_from_slice(&words[..n]);
        m
    }
}

/// Send `msg` on the endpoint in `slot` and wait for the reply.
#[inline(always)]
pub fn ipc_call(slot: u64, msg: &Message) -> Result<Message, Error> {
    let r = raw(Hypercall::Call.number(), slot, msg.len, msg.words);
    result_of(r.rax).map(|()| Message { len: r.rcx, words: r.args })
}

/// Reply to the last caller and wait for the next message: (message, badge).
#[inline(always)]
pub fn ipc_reply_recv(slot: u64, reply: &Message) -> Result<(Message, u64), Error> {
    let r = raw(Hypercall::ReplyRecv.number(), slot, reply.len, reply.words);
    result_of(r.rax).map(|()| (Message { len: r.rcx, words: r.args }, r.rbx))
}

/// Wait for a message: (message, badge).
pub fn ipc_recv(slot: u64) -> Result<(Message, u64), Error> {
    let r = raw(Hypercall::Recv.number(), slot, 0, [0; REGISTER_WORDS]);
    result_of(r.rax).map(|()| (Message { len: r.rcx, words: r.args }, r.rbx))
}

pub fn signal(slot: u64, bits: u64) -> Result<(), Error> {
    call(Hypercall::Signal, slot, [bits, 0, 0, 0, 0, 0]).map(|_| ())
}

/// Wait for bits on the notification in `slot`; returns them.
pub fn wait(slot: u64) -> Result<u64, Error> {
    call(Hypercall::Wait, slot, [0; 6]).map(|r| r.args[0])
}

/// Signal `signal` with `bits` and wait for bits on `wait`, in one hypercall; returns them.
pub fn signal_wait(signal: u64, bits: u64, wait: u64) -> Result<u64, Error> {
    call(Hypercall::SignalWait, signal, [bits, wait, 0, 0, 0, 0]).map(|r| r.args[0])
}

/// Signal `signal` with `bits` and halt until a virtual interrupt arrives, in one
/// hypercall. Call it with interrupts off; it returns with them off and the interrupt
/// offered, not taken ([`crate::irq::signal_and_wait_for_virq`] is the whole pattern).
pub fn signal_halt(signal: u64, bits: u64) -> Result<(), Error> {
    call(Hypercall::SignalHalt, signal, [bits, 0, 0, 0, 0, 0]).map(|_| ())
}

pub fn poll(slot: u64) -> Result<u64, Error> {
    call(Hypercall::Poll, slot, [0; 6]).map(|r| r.args[0])
}

/// Signal the notification in `slot` with `bits` after `ns` nanoseconds.
pub fn timer_set(slot: u64, ns: u64, bits: u64) -> Result<(), Error> {
    call(Hypercall::TimerSet, slot, [ns, bits, 0, 0, 0, 0]).map(|_| ())
}

/// The microvisor's clock rate, from the first `Clock` hypercall that gave one: the TSC at
/// the clock's zero, and TSC ticks per ms (0: not known yet, ask the microvisor).
static CLOCK_START: AtomicU64 = AtomicU64::new(0);
static CLOCK_PER_MS: AtomicU64 = AtomicU64::new(0);

/// Nanoseconds since boot: the microvisor's clock, computed here from the TSC once the
/// first `Clock` hypercall told its rate (a hypercall is an exit; under emulation a world
/// switch costs more than most of what a domain does between two readings).
pub fn clock_ns() -> u64 {
    let per_ms = CLOCK_PER_MS.load(Ordering::Acquire);
    if per_ms != 0 {
        // SAFETY: RDTSC only reads the counter; every x86-64 CPU has it.
        let tsc = unsafe { core::arch::x86_64::_rdtsc() };
        return ipc_spec::hypercall::clock_ns_from_tsc(tsc, CLOCK_START.load(Ordering::Relaxed), per_ms);
    }
    let r = raw(Hypercall::Clock.number(), 0, 0, [0; 6]);
    if r.args[2] != 0 {
        CLOCK_START.store(r.args[1], Ordering::Relaxed);
        CLOCK_PER_MS.store(r.args[2], Ordering::Release);
    }
    r.args[0]
}

pub fn yield_now() {
    raw(Hypercall::Yield.number(), 0, 0, [0; 6]);
}

/// Deliver the notification in `slot` to this vCPU as virtual interrupt `vector`.
pub fn bind(slot: u64, vector: u8) -> Result<(), Error> {
    call(Hypercall::NotificationBind, slot, [vector as u64, 0, 0, 0, 0, 0]).map(|_| ())
}

/// Sleep for `ns` nanoseconds using the notification in `slot` as the timer.
pub fn sleep_ns(slot: u64, ns: u64) -> Result<(), Error> {
    timer_set(slot, ns, 1)?;
    wait(slot).map(|_| ())
}

/// Write bytes to the console (split into calls of at most CONSOLE_WRITE_MAX bytes).
pub fn console_write(bytes: &[u8]) -> Result<(), Error> {
    for chunk in bytes.chunks(ipc_spec::hypercall::CONSOLE_WRITE_MAX as usize) {
        result_of(call2(Hypercall::ConsoleWrite.number(), chunk.as_ptr() as u64, chunk.len() as u64))?;
    }
    Ok(())
}

/// Stop this domain with `status`.
pub fn domain_exit(status: u64) -> ! {
    crate::console::flush();
    loop {
        call2(Hypercall::DomainExit.number(), status, 0);
    }
}

/// Power off the machine with the machine capability in `slot`; returns only on error.
pub fn shutdown(slot: u64, status: u64) -> Error {
    crate::console::flush();
    match call(Hypercall::Shutdown, slot, [status, 0, 0, 0, 0, 0]) {
        Ok(_) => Error::Unknown,
        Err(e) => e,
    }
}

/// Register this vCPU's message page (long messages, exit state): `page` must be a
/// 4 KiB-aligned page of this domain's RAM.
pub fn set_message_page(page: u64) -> Result<(), Error> {
    call(Hypercall::VcpuSetMessagePage, 0, [page, 0, 0, 0, 0, 0]).map(|_| ())
}

/// A VMM: map all of the VM (domain capability `vm`) RAM at `gpa` in this domain.
pub fn map_vm_ram(vm: u64, gpa: u64) -> Result<(), Error> {
    call(Hypercall::DomainMapRam, vm, [gpa, 0, 0, 0, 0, 0]).map(|_| ())
}

/// A VMM: make `vector` pending on the VM's vCPU (capability `vcpu`).
pub fn vcpu_inject(vcpu: u64, vector: u8) -> Result<(), Error> {
    call(Hypercall::VcpuInject, vcpu, [vector as u64, 0, 0, 0, 0, 0]).map(|_| ())
}

/// A VMM: pause (true) or resume the VM.
pub fn domain_pause(vm: u64, pause: bool) -> Result<(), Error> {
    call(Hypercall::DomainPause, vm, [pause as u64, 0, 0, 0, 0, 0]).map(|_| ())
}

/// Let the notification in `slot` wake this vCPU's Recv/ReplyRecv (the message then has
/// badge [`ipc_spec::hypercall::NOTIFICATION_BADGE`] and the bits in word 0).
pub fn bind_receive(slot: u64) -> Result<(), Error> {
    call(Hypercall::NotificationBind, slot, [0; 6]).map(|_| ())
}

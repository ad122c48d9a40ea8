//! The wake-up trace (cargo feature `trace`, for loop runs hunting lost wake-ups; not in
//! the default build). A ring of the last [`RING`] events of the notification and
//! virtual-interrupt path, each with the scheduler tick it happened at:
//!
//! - `X` exit: exit code; for a hypercall its number, slot (RBX) and bits (RDI), so
//!   Signal, Wait, Poll and SignalWait are visible; the guest's RFLAGS.IF, interrupt
//!   shadow, V_IRQ (and its vector) and the VINTR intercept as the exit left them, and
//!   whether an interrupted delivery (EXITINTINFO) was put back into EVENTINJ.
//! - `H` handled: what the kernel made of it: the vCPU's state afterwards (`Run`,
//!   `Rdy`, `Wait n`, `Halt`, ...), the vCPU running next, the result (RAX) and bits
//!   returned (RDI), its pending vectors 0x40..0x7f, and for notifications 0..15 which
//!   have bits set and which have a waiter.
//! - `E` entry: V_IRQ and its vector, EVENTINJ, the VINTR intercept, IF and shadow after
//!   `Kernel::deliver_irqs`, with the vectors still pending.
//! - `T` tick: the vCPU running (a preemption shows as the next entry being another's)
//!   and the kernel's signal count (a virtual timer firing signals).
//!
//! Dumped to the console (the last [`DUMP`] events) when a domain's console line reports
//! a fallback ("late or lost", "fallback"), a timeout ("did not answer") or a failure
//! ("FAILED"), and when Signal and SignalWait hypercalls stop
//! for [`STALL_TICKS`] after a ping-pong was under way: a hung doorbell test dumps its own trace long before
//! the harness gives up on it. A loop build can also ask for one dump at a fixed uptime
//! (`TRACE_DUMP_AT_MS=<ms>` in the build's environment): a run still going then is one
//! that hung without any of the above (a test client waiting on a silent guest).
//!
//! Besides the ring, each vCPU's last entry and exit (tick, exit code, RIP) and its number
//! of entries are kept, so a vCPU that stopped running long before the ring's window is
//! still visible in the dump.

use ipc_spec::hypercall::Hypercall;
use microvisor::kernel::{Kernel, VcpuId, VcpuState};
use microvisor::npt::Npt;
use microvisor::svm::vmcb::{control, misc1, save};

use crate::arch::apic;
use crate::bare_metal::BareMetal;
use crate::println;

const RING: usize = 8192;
const DUMP: usize = RING;
/// One second of ticks without a signal, after at least [`STALL_AFTER`] signals.
const STALL_TICKS: u64 = 1000;
const STALL_AFTER: u64 = 100;
/// The uptime (ms) of the fixed dump, from the build's environment; none without it.
const DUMP_AT_MS: Option<&str> = option_env!("TRACE_DUMP_AT_MS");
/// vCPUs with a summary.
const VCPUS: usize = 16;

/// Per vCPU: last entry tick, last exit tick, last exit code, RIP at the last exit, entries.
#[derive(Clone, Copy)]
struct Last {
    entered: u64,
    exited: u64,
    code: u64,
    rip: u64,
    entries: u64,
}

#[derive(Clone, Copy)]
struct Event {
    tick: u32,
    vcpu: u8,
    kind: u8,
    flags: u16,
    a: u64,
    b: u64,
}

struct Trace {
    ring: [Event; RING],
    next: usize,
    /// A domain reported a fallback: dump at the next exit.
    wanted: bool,
    /// The kernel's signal count at the last tick recorded.
    kernel_signals: u64,
    /// Signal and SignalWait hypercalls made.
    hypercall_signals: u64,
    /// That count and the tick it last changed at (the stall watch); `stalled`: the ring
    /// was dumped (once per boot, whatever asked).
    signals: u64,
    since: u64,
    stalled: bool,
    last: [Last; VCPUS],
}

static TRACE: spin::Mutex<Trace> = spin::Mutex::new(Trace {
    ring: [Event { tick: 0, vcpu: 0, kind: 0, flags: 0, a: 0, b: 0 }; RING],
    next: 0,
    wanted: false,
    kernel_signals: 0,
    hypercall_signals: 0,
    signals: 0,
    since: 0,
    stalled: false,
    last: [Last { entered: 0, exited: 0, code: 0, rip: 0, entries: 0 }; VCPUS],
});

fn record(vcpu: u8, kind: u8, flags: u16, a: u64, b: u64) {
    let mut t = TRACE.lock();
    let i = t.next % RING;
    t.ring[i] = Event { tick: apic::ticks() as u32, vcpu, kind, flags, a, b };
    t.next += 1;
}

/// IF, shadow, V_IRQ, the VINTR intercept, EVENTINJ valid, and the V_IRQ vector.
fn vmcb_flags(m: &mut BareMetal, v: VcpuId) -> u16 {
    let vmcb = m.hw.vmcb(v);
    let vintr = vmcb.read_u64(control::VINTR);
    let bit = |c: bool, n: u16| if c { 1 << n } else { 0 };
    bit(vmcb.read_u64(save::RFLAGS) & (1 << 9) != 0, 0)
        | bit(vmcb.read_u64(control::INTERRUPT_SHADOW) & 1 != 0, 1)
        | bit(vintr & (1 << 8) != 0, 2)
        | bit(vmcb.read_u32(control::INTERCEPT_MISC1) & misc1::VINTR != 0, 3)
        | bit(vmcb.read_u64(control::EVENT_INJECTION) & (1 << 31) != 0, 4)
        | (((vintr >> 32) as u8 as u16) << 8)
}

fn pending(k: &Kernel<Npt>, v: VcpuId) -> u64 {
    k.vcpus[v as usize].pending_irqs[1]
}

/// After the world switch, before the exit is handled.
pub fn exit(k: &Kernel<Npt>, m: &mut BareMetal, v: VcpuId) {
    let flags = vmcb_flags(m, v);
    let code = m.hw.vmcb(v).read_u64(control::EXIT_CODE);
    let rip = m.hw.vmcb(v).read_u64(save::RIP);
    if let Some(l) = TRACE.lock().last.get_mut(v as usize) {
        (l.exited, l.code, l.rip) = (apic::ticks(), code, rip);
    }
    let r = &k.vcpus[v as usize].regs;
    record(v as u8, b'X', flags, code, (r.rax & 0xffff) | (r.rbx & 0xffff) << 16 | (r.rdi & 0xffff_ffff) << 32);
    // Signal, SignalWait and SignalHalt by a domain (timers signal too, so the kernel's count would
    // never stall while a fallback timer runs).
    if code == microvisor::svm::exit::VMMCALL
        && (r.rax == Hypercall::Signal as u64
            || r.rax == Hypercall::SignalWait as u64
            || r.rax == Hypercall::SignalHalt as u64)
    {
        TRACE.lock().hypercall_signals += 1;
    }
}

/// After the exit was handled (and before the next vCPU is chosen).
pub fn handled(k: &Kernel<Npt>, v: VcpuId) {
    let (mut bits, mut waiters) = (0u64, 0u64);
    for (i, n) in k.notifications.iter().take(16).enumerate() {
        bits |= u64::from(n.bits != 0) << i;
        waiters |= u64::from(n.waiter.is_some()) << i;
    }
    let vcpu = &k.vcpus[v as usize];
    let next = k.current.map_or(0xff, |c| c as u64);
    let state = state_code(vcpu.state);
    let r = &vcpu.regs;
    let a = next | bits << 8 | waiters << 24 | (r.rax & 0xffff) << 40;
    record(v as u8, b'H', state, a, (r.rdi & 0xffff_ffff) | (pending(k, v) & 0xffff_ffff) << 32);
}

/// After `deliver_irqs`, just before the world switch.
pub fn enter(k: &Kernel<Npt>, m: &mut BareMetal, v: VcpuId) {
    let flags = vmcb_flags(m, v);
    let inj = m.hw.vmcb(v).read_u64(control::EVENT_INJECTION);
    if let Some(l) = TRACE.lock().last.get_mut(v as usize) {
        l.entered = apic::ticks();
        l.entries += 1;
    }
    record(v as u8, b'E', flags, inj, pending(k, v));
}

/// At a scheduler tick (after `Kernel::tick`); dumps the ring if signals stopped.
pub fn tick(k: &Kernel<Npt>) {
    let now = apic::ticks();
    let mut t = TRACE.lock();
    // Idle ticks (no vCPU running, no timer fired) would flush the ring.
    if k.current.is_some() || t.kernel_signals != k.stats.signals {
        t.kernel_signals = k.stats.signals;
        drop(t);
        record(k.current.map_or(0xff, |c| c as u8), b'T', 0, k.stats.signals, now);
        t = TRACE.lock();
    }
    let stalled = {
        if t.signals != t.hypercall_signals {
            (t.signals, t.since) = (t.hypercall_signals, now);
        }
        let stalled = !t.stalled && t.signals >= STALL_AFTER && now.wrapping_sub(t.since) >= STALL_TICKS;
        t.stalled |= stalled;
        stalled
    };
    let at = DUMP_AT_MS.and_then(|ms| ms.parse::<u64>().ok()).is_some_and(|ms| now >= ms);
    let timed = at && !t.stalled;
    t.stalled |= timed;
    drop(t);
    if stalled {
        dump(k, "no signal for 1 s after a ping-pong");
    } else if timed {
        dump(k, "the run is still going at TRACE_DUMP_AT_MS");
    }
}

/// A domain's console line: a fallback report asks for a dump (done at the next exit,
/// outside the console lock).
pub fn console_line(line: &[u8]) {
    let has = |w: &[u8]| line.windows(w.len()).any(|x| x == w);
    if has(b"late or lost") || has(b"fallback") || has(b"did not answer") || has(b"FAILED") {
        TRACE.lock().wanted = true;
    }
}

/// Dump now if a console line asked for it.
pub fn dump_if_wanted(k: &Kernel<Npt>) {
    let wanted = {
        let mut t = TRACE.lock();
        // Once per boot: printing the ring stops the machine for seconds, and a test that
        // provokes timeouts on purpose would otherwise pay that at each one.
        core::mem::take(&mut t.wanted) && !core::mem::replace(&mut t.stalled, true)
    };
    if wanted {
        dump(k, "a domain reported a fallback");
    }
}

fn state_code(s: VcpuState) -> u16 {
    match s {
        VcpuState::Running => 1,
        VcpuState::Ready => 2,
        VcpuState::BlockedWait(n) => 0x100 | n,
        VcpuState::Halted => 3,
        VcpuState::BlockedRecv(_) | VcpuState::BlockedSend(_) | VcpuState::BlockedReply(_) => 4,
        _ => 5,
    }
}

fn state_name(s: u16) -> &'static str {
    match s {
        1 => "Run",
        2 => "Rdy",
        3 => "Halt",
        4 => "IPC",
        5 => "Other",
        _ => "Wait",
    }
}

fn dump(k: &Kernel<Npt>, why: &str) {
    let t = TRACE.lock();
    let count = t.next.min(DUMP);
    println!("trace: {why}: the last {count} of {} events (tick now {})", t.next, apic::ticks());
    for (i, v) in k.vcpus.iter().enumerate().filter(|(_, v)| v.state != VcpuState::Free) {
        println!(
            "trace: v{i} = {} prio {} state {} pending {:#x}",
            k.domains[v.domain as usize].name(),
            v.priority,
            state_name(state_code(v.state)),
            v.pending_irqs[1]
        );
        if let Some(l) = t.last.get(i) {
            println!(
                "trace: v{i} last entered at {}, last exit at {} (code {:#x}, RIP {:#x}), {} entries",
                l.entered, l.exited, l.code, l.rip, l.entries
            );
        }
    }
    for (i, n) in k.notifications.iter().enumerate().take(16).filter(|(_, n)| n.refs != 0) {
        println!("trace: n{i} bits {:#x} waiter {:?} bound {:?} timer {:?}", n.bits, n.waiter, n.bound, n.timer);
    }
    for j in t.next - count..t.next {
        let e = t.ring[j % RING];
        let (f, tick, v) = (e.flags, e.tick, e.vcpu);
        let hw = |f: u16| {
            let on = |b: u16, s: &'static str| if f & (1 << b) != 0 { s } else { "" };
            (on(0, " IF"), on(1, " SH"), on(2, " VIRQ"), on(3, " WIN"), on(4, " INJ"), f >> 8)
        };
        match e.kind {
            b'X' => {
                let (i, s, q, w, inj, vec) = hw(f);
                let (nr, slot, bits) = (e.b & 0xffff, (e.b >> 16) & 0xffff, e.b >> 32);
                println!(
                    "trace: {tick} v{v} X {:#x} hc {nr} slot {slot} bits {bits:#x}{i}{s}{q}({vec:#x}){w}{inj}",
                    e.a
                );
            }
            b'H' => {
                let (next, bits, waiters, rax) = (e.a & 0xff, (e.a >> 8) & 0xffff, (e.a >> 24) & 0xffff, e.a >> 40);
                let wait = if f >= 0x100 { f & 0xff } else { 0xff };
                println!(
                    "trace: {tick} v{v} H {} n{wait} next v{next} rax {rax} rdi {:#x} pend {:#x} ntf-bits {bits:#x} ntf-waiters {waiters:#x}",
                    state_name(f),
                    e.b & 0xffff_ffff,
                    e.b >> 32
                );
            }
            b'E' => {
                let (i, s, q, w, inj, vec) = hw(f);
                println!(
                    "trace: {tick} v{v} E{i}{s}{q}({vec:#x}){w}{inj} eventinj {:#x} pend {:#x}",
                    e.a & 0xffff_ffff,
                    e.b
                );
            }
            _ => println!("trace: {tick} T run v{v} signals {}", e.a),
        }
    }
    println!("trace: end");
}

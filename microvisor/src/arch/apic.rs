//! Time: the local APIC timer drives the scheduler tick; the TSC is the clock. Both are
//! calibrated against the PIT at boot, so nothing assumes a frequency.

use core::sync::atomic::{AtomicU64, Ordering};

use microvisor::kernel::{DEVICE_VECTORS, DEVICE_VECTOR_BASE};
use x86_64::instructions::port::Port;

/// The LAPIC's MMIO page (MADT's local APIC address; the identity map covers it, uncached).
pub const LAPIC_BASE: u64 = 0xfee0_0000;
const REG_EOI: u64 = 0xb0;
const REG_SVR: u64 = 0xf0;
const REG_LVT_TIMER: u64 = 0x320;
const REG_TIMER_INIT: u64 = 0x380;
const REG_TIMER_CURRENT: u64 = 0x390;
const REG_TIMER_DIVIDE: u64 = 0x3e0;
/// Vector of the scheduler tick.
pub const TIMER_VECTOR: u8 = 0x20;
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// Scheduler tick period.
pub const TICK_NS: u64 = 1_000_000;

/// Timer interrupts taken so far (counted by the interrupt stub).
#[no_mangle]
static TIMER_TICKS: AtomicU64 = AtomicU64::new(0);
/// Every interrupt taken (timer or device): the run loop looks at the rest only when this
/// moves, so the common exit path pays one load.
#[no_mangle]
static IRQ_EVENTS: AtomicU64 = AtomicU64::new(0);
/// Device vectors taken and not yet handled: bit i = vector DEVICE_VECTOR_BASE + i.
#[no_mangle]
static DEVICE_IRQS: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    ".pushsection .text.apic_irq, \"ax\"",
    ".global apic_timer_entry",
    "apic_timer_entry:",
    "push rax",
    "mov rax, {eoi}",
    "mov dword ptr [rax], 0",
    "lock inc qword ptr [rip + TIMER_TICKS]",
    "lock inc qword ptr [rip + IRQ_EVENTS]",
    "pop rax",
    "iretq",
    // Device vectors: note the vector, EOI, return.
    ".macro device_irq_stub n",
    "device_irq_stub_\\n:",
    "push rax",
    "mov eax, \\n",
    "jmp device_irq_common",
    ".endm",
    ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "device_irq_stub \\n",
    ".endr",
    "device_irq_common:",
    "lock bts qword ptr [rip + DEVICE_IRQS], rax",
    "lock inc qword ptr [rip + IRQ_EVENTS]",
    "mov rax, {eoi}",
    "mov dword ptr [rax], 0",
    "pop rax",
    "iretq",
    ".global apic_spurious_entry",
    "apic_spurious_entry:",
    "iretq",
    ".popsection",
    ".pushsection .rodata.device_irq, \"a\"",
    ".p2align 3",
    "device_irq_stubs:",
    ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    ".quad device_irq_stub_\\n",
    ".endr",
    ".popsection",
    eoi = const LAPIC_BASE + REG_EOI,
);

extern "C" {
    fn apic_timer_entry();
    fn apic_spurious_entry();
}

/// Handler addresses for the IDT: the timer, spurious interrupts, and the device vectors.
pub fn interrupt_entries() -> impl Iterator<Item = (u8, u64)> {
    extern "C" {
        static device_irq_stubs: [u64; DEVICE_VECTORS];
    }
    // SAFETY: the table is emitted above in read-only data, 32 code addresses fixed at
    // link time.
    let stubs = unsafe { device_irq_stubs };
    [(TIMER_VECTOR, apic_timer_entry as *const () as u64), (SPURIOUS_VECTOR, apic_spurious_entry as *const () as u64)]
        .into_iter()
        .chain(stubs.into_iter().enumerate().map(|(i, a)| (DEVICE_VECTOR_BASE + i as u8, a)))
}

/// The interrupt event count (moves with every timer or device interrupt taken).
pub fn events() -> u64 {
    IRQ_EVENTS.load(Ordering::Relaxed)
}

/// Take the set of device vectors that fired (bit i = DEVICE_VECTOR_BASE + i).
pub fn take_device_irqs() -> u64 {
    DEVICE_IRQS.swap(0, Ordering::Relaxed)
}

fn read(reg: u64) -> u32 {
    // SAFETY: the LAPIC page is identity-mapped uncached MMIO owned by the microvisor (no
    // domain maps it); reading a register has no side effects.
    unsafe { core::ptr::read_volatile((LAPIC_BASE + reg) as *const u32) }
}

fn write(reg: u64, value: u32) {
    // SAFETY: as in `read`; the writes configure the microvisor's own timer.
    unsafe { core::ptr::write_volatile((LAPIC_BASE + reg) as *mut u32, value) }
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged and side-effect free.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC ticks and LAPIC timer counts during 10 ms of PIT channel 2 (mode 0: its OUT bit,
/// read at port 0x61 bit 5, rises at the terminal count).
fn pit_window() -> (u64, u32) {
    const PIT_HZ: u64 = 1_193_182;
    // 10 ms of PIT counts.
    let pit_count = (PIT_HZ / 100) as u16;
    // SAFETY: the PIT (ports 0x42, 0x43) and port 0x61's gate bit belong to the
    // microvisor; channel 2 only drives the speaker gate, which stays off.
    unsafe {
        let mut gate = Port::<u8>::new(0x61);
        let g = gate.read();
        gate.write((g & !0x02) | 0x01); // gate on, speaker off
        Port::<u8>::new(0x43).write(0b1011_0000); // channel 2, lobyte/hibyte, mode 0
        Port::<u8>::new(0x42).write(pit_count as u8);
        Port::<u8>::new(0x42).write((pit_count >> 8) as u8);
        // Restart the count by toggling the gate.
        let g = gate.read();
        gate.write(g & !0x01);
        gate.write(g | 0x01);
        write(REG_TIMER_INIT, u32::MAX);
        let tsc0 = rdtsc();
        while gate.read() & 0x20 == 0 {
            core::hint::spin_loop();
        }
        (rdtsc() - tsc0, u32::MAX - read(REG_TIMER_CURRENT))
    }
}

/// The calibrated clock and tick source.
pub struct Clock {
    pub tsc_start: u64,
    pub tsc_per_ms: u64,
    pub apic_per_ms: u32,
}

impl Clock {
    /// Before calibration (a placeholder for static initialisation).
    pub const UNCALIBRATED: Self = Self { tsc_start: 0, tsc_per_ms: 0, apic_per_ms: 0 };

    /// Enable the LAPIC, measure the LAPIC timer and TSC against PIT channel 2 ([`pit_window`]),
    /// then start the periodic tick.
    pub fn start() -> Self {
        write(REG_SVR, 0x100 | SPURIOUS_VECTOR as u32);
        write(REG_TIMER_DIVIDE, 0b1011); // divide by 1
        write(REG_LVT_TIMER, 1 << 16); // masked while calibrating

        // Three windows, the median kept: a window the host spoils (seen once in about 900
        // web-test boots on a loaded 2-core host: "TSC 151131 MHz", every timer 75 times
        // too slow, most likely the emulator's thread moved between host CPUs whose TSCs
        // differ) is outvoted by the other two.
        let mut windows = [pit_window(), pit_window(), pit_window()];
        windows.sort_unstable_by_key(|w| w.0);
        let (tsc_delta, apic_delta) = windows[1];
        let clock =
            Self { tsc_start: rdtsc(), tsc_per_ms: (tsc_delta / 10).max(1), apic_per_ms: (apic_delta / 10).max(1) };
        write(REG_LVT_TIMER, TIMER_VECTOR as u32 | (1 << 17)); // periodic
        write(REG_TIMER_INIT, clock.apic_per_ms);
        clock
    }

    pub fn now_ns(&self) -> u64 {
        ipc_spec::hypercall::clock_ns_from_tsc(rdtsc(), self.tsc_start, self.tsc_per_ms)
    }

    pub fn tsc_mhz(&self) -> u64 {
        self.tsc_per_ms / 1000
    }
}

pub fn ticks() -> u64 {
    TIMER_TICKS.load(Ordering::Relaxed)
}

/// Let a pending interrupt in (after an INTR exit), then close again.
pub fn take_pending_interrupts() {
    // SAFETY: the IDT has handlers for the only unmasked sources (timer, device vectors,
    // spurious); they touch no state but their counters and the EOI register. Not
    // `nomem`: the run loop reads those counters after this, never before.
    unsafe { core::arch::asm!("sti", "nop", "cli", options(nostack)) };
}

/// Sleep until an interrupt (the next tick at the latest).
pub fn wait_for_interrupt() {
    // SAFETY: as above; STI's one-instruction shadow makes STI;HLT atomic.
    unsafe { core::arch::asm!("sti", "hlt", "cli", options(nostack)) };
}

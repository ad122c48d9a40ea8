//! Virtual interrupts: a notification bound to this vCPU (hypercall NotificationBind)
//! arrives as interrupt [`VIRQ_VECTOR`]. The handler only counts; code waits for the count
//! to move with [`wait_for_virq`], which halts (the microvisor parks the vCPU) meanwhile.
//!
//! A notification bound to [`TIMER_VECTOR`] instead counts on both [`count`] (so it wakes
//! [`wait_for_virq`] like any other) and [`timer_count`]: code can tell that a timer fired
//! without asking the microvisor (no hypercall on the wake-up path).

use core::sync::atomic::{AtomicU64, Ordering};

/// The vector every bound notification uses.
pub const VIRQ_VECTOR: u8 = 0x40;

/// The vector for a timer's notification whose firing code wants to recognise.
pub const TIMER_VECTOR: u8 = 0x41;

/// Virtual interrupts taken so far (of both vectors).
#[no_mangle]
static DOMAIN_VIRQS: AtomicU64 = AtomicU64::new(0);
/// Those of them on [`TIMER_VECTOR`].
#[no_mangle]
static DOMAIN_TIMER_VIRQS: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    ".pushsection .text.domain_virq, \"ax\"",
    ".global domain_virq_entry",
    "domain_virq_entry:",
    "lock inc qword ptr [rip + DOMAIN_VIRQS]",
    "iretq",
    ".global domain_timer_virq_entry",
    "domain_timer_virq_entry:",
    "lock inc qword ptr [rip + DOMAIN_TIMER_VIRQS]",
    "lock inc qword ptr [rip + DOMAIN_VIRQS]",
    "iretq",
    ".popsection",
);

extern "C" {
    fn domain_virq_entry();
    fn domain_timer_virq_entry();
}

pub fn entry_address() -> u64 {
    domain_virq_entry as *const () as u64
}

pub fn timer_entry_address() -> u64 {
    domain_timer_virq_entry as *const () as u64
}

pub fn count() -> u64 {
    DOMAIN_VIRQS.load(Ordering::Relaxed)
}

/// Virtual interrupts taken on [`TIMER_VECTOR`] so far.
pub fn timer_count() -> u64 {
    DOMAIN_TIMER_VIRQS.load(Ordering::Relaxed)
}

/// Halt until a virtual interrupt arrives after `seen` (the count from before the wait).
pub fn wait_for_virq(seen: u64) -> u64 {
    loop {
        // SAFETY: interrupts are enabled only for the HLT (STI's shadow makes STI;HLT
        // atomic); the only interrupt this domain gets is its own counting handler. Not
        // `nomem`: the handler writes the count, which must be read after this, not before.
        unsafe { core::arch::asm!("sti", "hlt", "cli", options(nostack)) };
        let now = count();
        if now != seen {
            return now;
        }
    }
}

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

#[cfg(target_os = "none")]
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

#[cfg(target_os = "none")]
extern "C" {
    fn domain_virq_entry();
    fn domain_timer_virq_entry();
}

#[cfg(target_os = "none")]
pub fn entry_address() -> u64 {
    domain_virq_entry as *const () as u64
}

#[cfg(target_os = "none")]
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

/// Both counts at one moment, to tell later what arrived since: the timer, and anything
/// else. Loops with a timer fallback use it to notice "only the timer woke me".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    /// Every virtual interrupt ([`count`]).
    pub all: u64,
    /// Those on [`TIMER_VECTOR`] ([`timer_count`]).
    pub timer: u64,
}

/// What arrived between two [`Counts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrived {
    /// The timer fired.
    pub timer: bool,
    /// Something other than the timer arrived.
    pub others: bool,
}

impl Counts {
    pub fn now() -> Self {
        Self { all: count(), timer: timer_count() }
    }

    /// What arrived between `self` and `later`.
    pub fn until(self, later: Counts) -> Arrived {
        let timer = later.timer.wrapping_sub(self.timer);
        Arrived { timer: timer != 0, others: later.all.wrapping_sub(self.all) != timer }
    }
}

impl Arrived {
    /// The timer fired and nothing else arrived.
    pub fn timer_only(self) -> bool {
        self.timer && !self.others
    }
}

/// Halt until a virtual interrupt arrives after `seen` (the count from before the wait).
///
/// An interrupt already offered is let in first, without a HLT: a loop that runs with
/// interrupts off and was interrupted meanwhile (a physical interrupt exit, after which the
/// microvisor offers the vector) would otherwise pay a HLT exit that does not sleep (the
/// microvisor sees the offered vector and enters us again at once) to learn it. That was
/// the net driver VM's case on most small requests: the next request's device interrupt
/// arrived while it was still sending the response. Nothing new can sleep: if the count
/// has not moved, the loop below runs as it always did.
#[cfg(target_os = "none")]
pub fn wait_for_virq(seen: u64) -> u64 {
    let_offered_in();
    let now = count();
    if now != seen {
        return now;
    }
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

/// Signal notification `signal` and then halt until a virtual interrupt arrives after
/// `seen`, as [`wait_for_virq`], with one exit instead of two (a `Signal` hypercall and a
/// HLT): the `SignalHalt` hypercall. For a loop that runs with interrupts off and, at the
/// end of a round, rings a peer and goes idle.
///
/// No wake-up is lost: everything signalled to us since `seen` was read is, with
/// interrupts off, either pending in the microvisor or offered to this vCPU, and then the
/// microvisor does not let it sleep (`Kernel::signal_halt`); anything later wakes it as it
/// wakes a HLT. Either way it returns with a vector offered, which `let_offered_in` takes;
/// if the count has still not moved (an offered interrupt another round already counted,
/// or a refused hypercall) it falls back to [`wait_for_virq`], whose HLT sleeps only while
/// nothing is offered. A refused `SignalHalt` (an older microvisor) rings with `Signal`.
#[cfg(target_os = "none")]
pub fn signal_and_wait_for_virq(signal: u64, seen: u64) -> u64 {
    if crate::hypercall::signal_halt(signal, 1).is_err() {
        let _ = crate::hypercall::signal(signal, 1);
    } else {
        let_offered_in();
        let now = count();
        if now != seen {
            return now;
        }
    }
    wait_for_virq(seen)
}

/// Let in a virtual interrupt that is already offered (interrupts on for one instruction:
/// STI's shadow covers the NOP, so the interrupt is taken before the CLI), then close
/// again. Code that found work without its interrupt, while it ran with interrupts off,
/// uses it to tell an interrupt that was about to arrive from a late or lost one.
#[cfg(target_os = "none")]
pub fn let_offered_in() {
    // SAFETY: as in `wait_for_virq`: the only interrupts are this domain's counting
    // handlers. Not `nomem`: the caller reads the counts they write afterwards.
    unsafe { core::arch::asm!("sti", "nop", "cli", options(nostack)) };
}

#[cfg(test)]
mod tests {
    use super::{Arrived, Counts};

    #[test]
    fn tells_the_timer_alone_from_the_timer_with_others() {
        let at = |all, timer| Counts { all, timer };
        assert_eq!(at(5, 2).until(at(5, 2)), Arrived { timer: false, others: false });
        assert!(at(5, 2).until(at(6, 3)).timer_only());
        assert_eq!(at(5, 2).until(at(7, 3)), Arrived { timer: true, others: true });
        assert_eq!(at(5, 2).until(at(6, 2)), Arrived { timer: false, others: true });
        assert!(at(u64::MAX, u64::MAX).until(at(0, 0)).timer_only());
    }
}

//! Boot-time self-tests the machine owner can ask for on the command line, to prove the
//! failure paths work (the end-to-end tests use them). Domains cannot reach this switch.
//!
//! `selftest=exit-handler-fault`: take a #UD inside the #VMEXIT handler (at the first CPUID
//! exit), which must produce
//! the microvisor's exception report naming the domain being handled.

use core::sync::atomic::{AtomicBool, Ordering};

static FAULT_IN_EXIT_HANDLER: AtomicBool = AtomicBool::new(false);

pub fn configure(cmdline: &str) {
    if microvisor::cmdline::option(cmdline, "selftest") == Some("exit-handler-fault") {
        crate::println!("selftest: will fault inside the #VMEXIT handler");
        FAULT_IN_EXIT_HANDLER.store(true, Ordering::Relaxed);
    }
}

pub fn maybe_fault_in_exit_handler() {
    if FAULT_IN_EXIT_HANDLER.load(Ordering::Relaxed) {
        // SAFETY: UD2 raises #UD on purpose; the exception handler reports and stops.
        unsafe { core::arch::asm!("ud2") };
    }
}

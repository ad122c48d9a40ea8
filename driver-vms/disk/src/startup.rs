//! When this incarnation's start-up steps ended (the machine's clock), reported in one line
//! once it has completed its first request: with dom0's "killing" and "restarted" lines it
//! breaks a restart's cost to the guest into phases (`cargo xtask bench restart`). Each
//! stamp is one clock hypercall; nothing else depends on them.

extern crate alloc;

use alloc::string::String;
use core::fmt::Write as _;
use core::sync::atomic::{AtomicU64, Ordering};

use domain_rt::{hypercall, println};

/// A start-up step, in the order they happen.
#[derive(Clone, Copy)]
pub enum Step {
    /// `main` entered (the runtime is set up).
    Entered,
    /// The device is described (DeviceInfo) and its virtio transport found (capabilities
    /// read through the configuration hypercalls).
    Opened,
    /// The device is reset, its features negotiated and its queue set up.
    Negotiated,
    /// The first read (sector 0) by DMA through the IOMMU is done.
    FirstRead,
    /// The completion interrupt is routed (and proven) or polling chosen.
    Interrupts,
    /// Attached to the block channels as the next incarnation (the clients rung).
    Attached,
    /// The first request from a client went on the device.
    FirstTaken,
}

const STEPS: usize = 7;
const NAMES: [&str; STEPS] = ["entered", "opened", "negotiated", "first read", "interrupts", "attached", "first taken"];

static STAMPS: [AtomicU64; STEPS] = [const { AtomicU64::new(0) }; STEPS];

/// Note that `step` ended now (only its first time counts).
pub fn mark(step: Step) {
    let s = &STAMPS[step as usize];
    if s.load(Ordering::Relaxed) == 0 {
        s.store(hypercall::clock_ns(), Ordering::Relaxed);
    }
}

/// Whether `step` was noted already (a check without a hypercall, for hot paths).
pub fn marked(step: Step) -> bool {
    STAMPS[step as usize].load(Ordering::Relaxed) != 0
}

/// The line after the first completion: `start-up steps (ns): entered <ns>, negotiated
/// <ns>, …` (0: the step did not happen).
pub fn report() {
    let mut line = String::new();
    for (name, s) in NAMES.iter().zip(STAMPS.iter()) {
        let sep = if line.is_empty() { "" } else { ", " };
        let _ = write!(line, "{sep}{name} {}", s.load(Ordering::Relaxed));
    }
    println!("start-up steps (ns): {line}");
}

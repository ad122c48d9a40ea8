//! The portable half of a user-level VMM for unmodified Linux guests.
//!
//! Device models, CPUID/MSR policy, ACPI tables, the PVH boot layout and MMIO instruction
//! decoding, all independent of how exits reach the VMM so they can be tested on the host.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod acpi;
pub mod aml;
pub mod boot;
pub mod bus;
pub mod console;
pub mod cpuid;
pub mod ioapic;
pub mod kvmclock;
pub mod memory;
pub mod mmio;
pub mod msr;
pub mod platform;
pub mod power;
pub mod stall;
pub mod stats;
pub mod timebase;
pub mod uart;
pub mod virtio;
pub mod x2apic;

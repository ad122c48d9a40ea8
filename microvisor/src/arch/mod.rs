//! x86-64 hardware glue: everything that touches a CPU instruction, an I/O port or physical
//! memory directly. Portable decisions live in the library crate.

pub mod acpi;
pub mod apic;
pub mod cpu;
pub mod fpu;
pub mod pcie;
pub mod phys;
pub mod serial;
#[cfg(feature = "vmx")]
pub mod vmx_probe;
pub mod vtd;

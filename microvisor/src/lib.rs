//! Portable logic of the microvisor: everything here builds and is tested on the host with
//! plain `cargo test`. Hardware glue (VMRUN, serial port, ACPI discovery, physical memory
//! access) lives in the binary (`main.rs`, `arch/`), which only builds for
//! `x86_64-unknown-none`.
#![cfg_attr(not(test), no_std)]

pub mod cmdline;
pub mod console;
pub mod dmar;
pub mod frame_alloc;
pub mod iommu;
pub mod kernel;
pub mod npt;
pub mod pci;
pub mod phys_mem;
pub mod stage2;
pub mod svm;
pub mod vcpu_hw;
pub mod vmx_caps;

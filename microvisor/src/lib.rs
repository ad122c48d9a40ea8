//! Portable logic of the microvisor: everything here builds and is tested on the host with
//! plain `cargo test`. Hardware glue (VMRUN, serial port, ACPI discovery, physical memory
//! access) lives in the binary (`main.rs`, `arch/`), which only builds for
//! `x86_64-unknown-none`.
#![cfg_attr(not(test), no_std)]

pub mod cmdline;
pub mod console;
pub mod dmar;
#[cfg(any(test, feature = "vmx"))]
pub mod ept;
pub mod frame_alloc;
pub mod iommu;
pub mod kernel;
#[cfg(any(test, not(feature = "vmx")))]
pub mod npt;
pub mod pci;
pub mod pci_release;
pub mod phys_mem;
pub mod scrub;
pub mod stage2;
#[cfg(any(test, not(feature = "vmx")))]
pub mod svm;
pub mod vcpu_hw;
#[cfg(any(test, feature = "vmx"))]
pub mod vmx;
#[cfg(any(test, feature = "vmx"))]
pub mod vmx_caps;

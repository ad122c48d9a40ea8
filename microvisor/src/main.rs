//! The microvisor: the only code that runs in root mode. It boots by the PVH convention,
//! checks the CPU, reads ACPI, takes over physical memory, and runs dom0 as the first VM
//! under AMD SVM with nested paging.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "the microvisor is a bare-metal image: build it with `cargo xtask build` and boot it with `cargo xtask run`"
    );
    std::process::exit(2);
}

#[cfg(target_os = "none")]
mod arch;
#[cfg(target_os = "none")]
mod bare_metal;
#[cfg(target_os = "none")]
mod boot_info;
#[cfg(target_os = "none")]
mod init;
#[cfg(target_os = "none")]
mod run_loop;
#[cfg(target_os = "none")]
mod selftest;
#[cfg(all(target_os = "none", feature = "trace", not(feature = "vmx")))]
mod trace;
#[cfg(target_os = "none")]
mod vmexit;

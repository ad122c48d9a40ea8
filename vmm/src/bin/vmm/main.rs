//! The VMM domain of one Linux VM: deprivileged (an ordinary domain, not dom0, not the
//! microvisor), it loads the kernel and initramfs dom0 handed it into the VM's RAM the PVH
//! way, starts the VM's vCPU, and then serves the VM's exits and its own timer in one receive
//! loop, with the device models of the `vmm` library (`vmm::platform`).
//!
//! dom0 gives it on its command line: `vm=` (the VM's domain, rights CONTROL and VMM),
//! `exits=` (receive right of the VM's exit endpoint), `vm_ram=` (bytes), `timer=` (its own
//! timer notification), `files=<gpa>` (where dom0 mapped the files read-only) with
//! `kernel=`, `initramfs=` and `cmdline=` as `<offset>:<length>` in it, and `console=` (the
//! machine capability with right READ) when it receives the console's input.
//!
//! How it ends: a power-off or reset the guest asks for, a triple fault, an exception the
//! microvisor reflects, or an exit it cannot emulate stops the VM; the VMM says why and exits,
//! and dom0 destroys the VM with it. Nothing else in the stack is affected.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the VMM is a bare-metal domain image: build it with `cargo xtask build`");
}

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod devices;
#[cfg(target_os = "none")]
mod exits;
#[cfg(target_os = "none")]
mod setup;

#[cfg(target_os = "none")]
mod run {
    use domain_rt::{println, BootInfo};

    use crate::setup;

    domain_rt::domain_main!(main);

    fn main(info: &BootInfo) -> u64 {
        match setup::boot(info) {
            Ok(mut vmm) => domain_rt::exits::serve(vmm.exits_slot(), &mut vmm),
            Err(e) => {
                println!("cannot boot the VM: {e}");
                1
            }
        }
    }
}

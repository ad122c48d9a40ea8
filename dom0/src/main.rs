//! dom0, the management domain. In this first stage it proves the path from the
//! microvisor: it runs in SVM guest mode on its own page tables, sees the boot bundle the
//! microvisor mapped for it, and talks to the microvisor only through hypercalls.
//!
//! Command-line switches (given to the microvisor as `dom0.<key>=<value>`):
//! - `on_ready=shutdown`: power the machine off after reporting ready (tests use it);
//! - `selftest=stage2-fault | triple-fault | bad-hypercall`: exercise a failure path.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("dom0 is a bare-metal domain image: build it with `cargo xtask build`");
    std::process::exit(2);
}

#[cfg(target_os = "none")]
mod dom0 {
    extern crate alloc;

    use alloc::vec::Vec;
    use domain_rt::{hypercall, println, BootInfo};
    use ipc_spec::bundle::Bundle;
    use ipc_spec::hypercall::{CPUID_LEAF_ABI, CPUID_LEAF_SIGNATURE, CPUID_SIGNATURE};

    domain_rt::domain_main!(main);

    /// A guest-physical address far outside dom0's RAM (but inside its own page tables).
    const OUTSIDE_RAM: u64 = 0x8000_0000;

    fn main(info: &BootInfo) -> u64 {
        let guest_mode = report_guest_mode();
        let ram: u64 = info
            .start_info
            .memmap()
            .filter(|e| e.r#type == 1)
            .map(|e| e.size)
            .sum();
        println!(
            "dom0 starting: {} MiB RAM, command line \"{}\"",
            ram >> 20,
            info.cmdline
        );

        let Some(module) = info.start_info.modules().next() else {
            println!("no boot bundle module: nothing to build");
            return 1;
        };
        // SAFETY: the microvisor mapped the bundle read-only at this guest-physical range
        // (module 0 of the start info); dom0's page tables identity-map it.
        let bytes =
            unsafe { core::slice::from_raw_parts(module.paddr as *const u8, module.size as usize) };
        match Bundle::parse(bytes) {
            Ok(bundle) => {
                let names: Vec<_> = bundle.entries().map(|e| (e.name, e.data.len())).collect();
                println!("boot bundle: {} image(s): {:?}", names.len(), names);
            }
            Err(e) => {
                println!("boot bundle unreadable: {e}");
                return 2;
            }
        }

        match info.arg("selftest") {
            Some("stage2-fault") => {
                println!("selftest: reading guest-physical {OUTSIDE_RAM:#x}, outside my RAM");
                // SAFETY: deliberately touching memory dom0 does not own; the microvisor
                // must stop this domain with a stage-2 fault report.
                let v = unsafe { core::ptr::read_volatile(OUTSIDE_RAM as *const u64) };
                println!("selftest FAILED: the read returned {v:#x}");
                return 3;
            }
            Some("triple-fault") => {
                println!("selftest: loading an empty IDT and raising #BP");
                // SAFETY: deliberately makes every exception unhandleable, so INT3 escalates
                // to a triple fault, which the microvisor must report.
                unsafe {
                    let null: [u8; 10] = [0; 10];
                    core::arch::asm!("lidt [{}]", "int3", in(reg) &null);
                }
                println!("selftest FAILED: survived a triple fault");
                return 3;
            }
            Some("bad-hypercall") => {
                let status = hypercall::call2(0xdead_beef, 0, 0);
                println!("selftest: unknown hypercall returned status {status}");
                let status =
                    hypercall::call2(ipc_spec::Hypercall::ConsoleWrite.number(), OUTSIDE_RAM, 16);
                println!("selftest: console write from outside RAM returned status {status}");
                let status =
                    hypercall::call2(ipc_spec::Hypercall::ConsoleWrite.number(), 0x1000, 1 << 20);
                println!("selftest: oversized console write returned status {status}");
            }
            Some(other) => println!("unknown selftest \"{other}\" ignored"),
            None => {}
        }

        println!(
            "ready{}",
            if guest_mode {
                " (in SVM guest mode)"
            } else {
                ""
            }
        );
        if info.arg("on_ready") == Some("shutdown") {
            let e = hypercall::shutdown(ipc_spec::hypercall::dom0_slots::MACHINE, 0);
            println!("shutdown refused: {e}");
            return 4;
        }
        // Nothing more to do until later stages give dom0 work: wait for events.
        loop {
            // SAFETY: HLT only waits; the microvisor intercepts it and parks this vCPU.
            unsafe { core::arch::asm!("hlt") };
        }
    }

    /// Ask CPUID whether we run under a hypervisor and which one.
    fn report_guest_mode() -> bool {
        let leaf1 = core::arch::x86_64::__cpuid(1);
        let hypervisor = leaf1.ecx & (1 << 31) != 0;
        let sig = core::arch::x86_64::__cpuid(CPUID_LEAF_SIGNATURE);
        let mut name = [0u8; 12];
        name[0..4].copy_from_slice(&sig.ebx.to_le_bytes());
        name[4..8].copy_from_slice(&sig.ecx.to_le_bytes());
        name[8..12].copy_from_slice(&sig.edx.to_le_bytes());
        let abi = core::arch::x86_64::__cpuid(CPUID_LEAF_ABI).eax;
        let ours = hypervisor && name == CPUID_SIGNATURE;
        println!(
            "CPUID: hypervisor bit {}, signature \"{}\", ABI {}",
            if hypervisor { "set" } else { "clear" },
            core::str::from_utf8(&name).unwrap_or("?").trim_end(),
            abi
        );
        ours
    }
}

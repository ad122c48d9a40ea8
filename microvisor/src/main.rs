//! The microvisor: the only code that runs in root mode. It boots by the PVH convention,
//! checks the CPU, reads ACPI, takes over physical memory, and runs dom0 as the first VM
//! under AMD SVM with nested paging.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the microvisor is a bare-metal image: build it with `cargo xtask build` and boot it with `cargo xtask run`");
    std::process::exit(2);
}

#[cfg(target_os = "none")]
mod arch;
#[cfg(target_os = "none")]
mod boot;
#[cfg(target_os = "none")]
mod domain;
#[cfg(target_os = "none")]
mod selftest;
#[cfg(target_os = "none")]
mod vmexit;

#[cfg(target_os = "none")]
mod kernel {
    use ipc_spec::bundle::Bundle;
    use ipc_spec::machine_exit::MachineExit;
    use microvisor::frame_alloc::{FrameAllocator, PhysRange};
    use pvh::start_info::ModuleSpec;

    use crate::arch::cpu::{self, exit_machine};
    use crate::arch::phys::{phys_slice, FRAMES, PAGE_SIZE};
    use crate::arch::serial::Serial;
    use crate::arch::{acpi, svm::Svm};
    use crate::domain::{Domain, VcpuState};
    use crate::println;
    use crate::vmexit::{self, Verdict};

    pvh::pvh_entry!(microvisor_main, 64 * 1024);

    /// RAM given to dom0 (until dom0 receives all free memory as capabilities).
    const DOM0_RAM: u64 = 32 << 20;
    /// Where dom0 sees the boot bundle (read-only), outside its RAM.
    const BUNDLE_GPA: u64 = 0x4000_0000;

    extern "C" {
        static __image_start: u8;
        static __image_end: u8;
    }

    fn fail(code: MachineExit, args: core::fmt::Arguments) -> ! {
        println!("FATAL: {}", args);
        exit_machine(code)
    }

    extern "C" fn microvisor_main(start_info: u32) -> ! {
        Serial::init();
        mask_legacy_pic();
        cpu::init();
        println!(
            "microvisor {} (AMD SVM + nested paging, Intel VT-d), ABI {}",
            env!("CARGO_PKG_VERSION"),
            ipc_spec::ABI_VERSION
        );

        let boot = match crate::boot::read(start_info) {
            Ok(b) => b,
            Err(e) => fail(MachineExit::BadBoot, format_args!("boot: {e}")),
        };
        if !boot.cmdline.is_empty() {
            println!("command line: {}", boot.cmdline);
        }
        crate::selftest::configure(&boot.cmdline);

        let features = match cpu::check_svm() {
            Ok(f) => f,
            Err(p) => fail(
                MachineExit::CpuUnsupported,
                format_args!("CPU: {}", p.explain()),
            ),
        };
        println!(
            "cpu: SVM with nested paging, {} ASIDs, next-RIP save {}",
            features.asids,
            if features.next_rip_save { "yes" } else { "no" }
        );

        report_platform(boot.rsdp);

        // Physical memory: all RAM below 4 GiB except what is in use.
        // Only the addresses of the linker-defined symbols are taken.
        let (image_start, image_end) = (
            &raw const __image_start as u64,
            &raw const __image_end as u64,
        );
        let mut reserved: heapless::Vec<PhysRange, 4> = heapless::Vec::new();
        let _ = reserved.push(PhysRange::new(0, 0x10_0000)); // firmware, start info, real-mode area
        let _ = reserved.push(PhysRange::new(image_start, image_end));
        if let Some(b) = boot.bundle {
            let _ = reserved.push(b);
        }
        *FRAMES.lock() = FrameAllocator::new(&boot.ram, &reserved);
        let free = FRAMES.lock().free_frames() * PAGE_SIZE;
        println!(
            "memory: {} MiB free in {} ranges ({} memory map entries); microvisor image {:#x}-{:#x}",
            free >> 20,
            FRAMES.lock().free_ranges().len(),
            boot.memmap_entries,
            image_start,
            image_end
        );

        let Some(bundle_range) = boot.bundle else {
            fail(
                MachineExit::BadBoot,
                format_args!("boot: no boot bundle module: start QEMU with -initrd <bundle> (`cargo xtask build` writes target/stack/bundle.bin)"),
            )
        };
        // SAFETY: the bundle module lies below 4 GiB (checked by boot::read) and is reserved
        // from the frame allocator, so nothing writes it while this slice lives.
        let bundle_bytes = unsafe { phys_slice(bundle_range.start, bundle_range.len() as usize) };
        let bundle = match Bundle::parse(bundle_bytes) {
            Ok(b) => b,
            Err(e) => fail(MachineExit::BadBoot, format_args!("boot bundle: {e}")),
        };
        println!(
            "bundle: {} images, {} bytes",
            bundle.len(),
            bundle_bytes.len()
        );
        let Some(dom0_image) = bundle.get(ipc_spec::DOM0_IMAGE) else {
            fail(
                MachineExit::BadBoot,
                format_args!("boot bundle: no image named \"{}\"", ipc_spec::DOM0_IMAGE),
            )
        };

        let svm = match Svm::enable() {
            Ok(s) => s,
            Err(_) => fail(
                MachineExit::BadBoot,
                format_args!("out of memory while enabling SVM"),
            ),
        };

        let mut dom0 = match build_dom0(&svm, dom0_image, &boot.cmdline, bundle_range) {
            Ok(d) => d,
            Err(e) => fail(MachineExit::BadBoot, format_args!("building dom0: {e}")),
        };
        println!(
            "dom0: {} MiB RAM, ASID {}, stage-2 root {:#x}, entry {:#x}: entering SVM guest mode",
            dom0.ram_size >> 20,
            dom0.asid(),
            dom0.stage2.root(),
            dom0.vcpu.vmcb.rip()
        );
        run(&svm, &mut dom0)
    }

    fn build_dom0(
        svm: &Svm,
        image: &[u8],
        cmdline: &str,
        bundle: PhysRange,
    ) -> Result<Domain, crate::domain::BuildError> {
        let mut dom0 = Domain::create("dom0", 0, DOM0_RAM, svm)?;
        let entry = dom0.load_image(image)?;
        dom0.map_readonly(BUNDLE_GPA, bundle.start, bundle.len())?;
        let mut args: heapless::String<512> = heapless::String::new();
        for word in microvisor::cmdline::domain_args(cmdline, "dom0") {
            if !args.is_empty() {
                let _ = args.push(' ');
            }
            let _ = args.push_str(word);
        }
        let modules = [ModuleSpec {
            paddr: BUNDLE_GPA,
            size: bundle.len(),
        }];
        dom0.prepare_boot(entry, args.as_bytes(), &modules)?;
        Ok(dom0)
    }

    fn run(svm: &Svm, dom0: &mut Domain) -> ! {
        loop {
            match dom0.vcpu.state {
                VcpuState::Runnable => {}
                VcpuState::Halted => {
                    println!("all vCPUs halted and no event source can wake them: idle");
                    cpu::halt_forever();
                }
                VcpuState::Stopped => {
                    println!("no runnable domains left: stopping the machine");
                    exit_machine(MachineExit::NoDomainsLeft);
                }
            }
            cpu::set_current_domain(Some(dom0.name));
            svm.run(dom0.vcpu.vmcb_pa, &mut dom0.vcpu.regs);
            dom0.vcpu
                .vmcb
                .write_u8(microvisor::svm::vmcb::control::TLB_CONTROL, 0);
            match vmexit::handle(dom0) {
                Verdict::Resume => {}
                Verdict::Halt => dom0.vcpu.state = VcpuState::Halted,
                Verdict::Stop(reason) => {
                    dom0.console_flush();
                    println!("domain {} stopped: {}", dom0.name, reason);
                    dom0.vcpu.state = VcpuState::Stopped;
                }
                Verdict::PowerOff(code) => {
                    println!("dom0 asked to power off ({:?})", code);
                    exit_machine(code);
                }
            }
            cpu::set_current_domain(None);
        }
    }

    fn report_platform(rsdp: u64) {
        let p = match acpi::discover(rsdp) {
            Ok(p) => p,
            Err(e) => fail(MachineExit::BadBoot, format_args!("ACPI: {e}")),
        };
        let mut line: heapless::String<256> = heapless::String::new();
        use core::fmt::Write as _;
        let _ = write!(
            line,
            "acpi: {} CPUs (APIC ids {:?})",
            p.cpus,
            p.apic_ids.as_slice()
        );
        match p.ecam {
            Some(e) => {
                let _ = write!(
                    line,
                    ", PCI ECAM {:#x} (segment {}, buses {}-{})",
                    e.base, e.segment, e.bus_start, e.bus_end
                );
            }
            None => {
                let _ = write!(line, ", no PCI ECAM (MCFG missing)");
            }
        }
        match (&p.dmar, &p.dmar_error) {
            (Some(d), _) => {
                let _ = write!(line, ", IOMMU: {} VT-d unit(s)", d.units.len());
                for u in &d.units {
                    let _ = write!(
                        line,
                        " at {:#x}{}",
                        u.register_base,
                        if u.include_pci_all {
                            " (all PCI devices)"
                        } else {
                            ""
                        }
                    );
                }
                let _ = write!(
                    line,
                    ", {}-bit DMA, interrupt remapping {}",
                    d.host_address_width,
                    if d.interrupt_remapping() {
                        "supported"
                    } else {
                        "not supported"
                    }
                );
            }
            (None, Some(e)) => {
                let _ = write!(line, ", IOMMU: DMAR table unreadable ({e})");
            }
            (None, None) => {
                let _ = write!(
                    line,
                    ", IOMMU: none (no DMAR table; add -device intel-iommu)"
                );
            }
        }
        println!("{}", line);
        let _ = p.local_apic_base;
    }

    /// SeaBIOS leaves the 8259 PIC programmed; mask it so no legacy interrupt reaches the
    /// microvisor (which has no handler for it) or causes endless INTR exits.
    fn mask_legacy_pic() {
        use x86_64::instructions::port::Port;
        // SAFETY: writing the 8259 interrupt mask registers only masks interrupt lines.
        unsafe {
            Port::<u8>::new(0x21).write(0xff);
            Port::<u8>::new(0xa1).write(0xff);
        }
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo) -> ! {
        // SAFETY: the machine stops right after; a report matters more than a lock.
        unsafe { crate::arch::serial::CONSOLE_LOCK.force_unlock() };
        println!("FATAL: microvisor panic: {}", info);
        exit_machine(MachineExit::MicrovisorFault)
    }
}

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
mod boot;
#[cfg(target_os = "none")]
mod machine;
#[cfg(target_os = "none")]
mod selftest;
#[cfg(target_os = "none")]
mod vmexit;

#[cfg(target_os = "none")]
mod boot_and_run {
    use core::fmt;

    use ipc_spec::bundle::Bundle;
    use ipc_spec::hypercall::{dom0_slots, rights};
    use ipc_spec::machine_exit::MachineExit;
    use microvisor::frame_alloc::{FrameAllocator, PhysRange};
    use microvisor::kernel::caps::Object;
    use microvisor::kernel::{Event, Kernel};
    use microvisor::npt::Npt;
    use microvisor::svm::hw::Svm;
    use microvisor::vcpu_hw::VcpuHardware;
    use pvh::elf::{ElfError, ElfImage};
    use pvh::start_info::{self, MemmapEntry, ModuleSpec};

    use crate::arch::acpi;
    use crate::arch::apic::{self, Clock};
    use crate::arch::cpu::{self, exit_machine};
    use crate::arch::fpu::FpuStates;
    use crate::arch::pcie::Ecam;
    use crate::arch::phys::{alloc_zeroed_frames, phys_slice, FRAMES, PAGE_SIZE};
    use crate::arch::serial::Serial;
    use crate::arch::vtd::Iommu;
    use crate::machine::Machine;
    use crate::println;
    use crate::vmexit;

    pvh::pvh_entry!(microvisor_main, 64 * 1024);
    // GRUB (real machines, Bochs) boots the same image by Multiboot2.
    pvh::multiboot2_header!();

    /// RAM given to dom0 itself; it creates the other domains from the free memory.
    const DOM0_RAM: u64 = 32 << 20;
    /// dom0 outranks the domains it manages, so it can always handle their faults.
    const DOM0_PRIORITY: u8 = 200;
    /// Where dom0 sees the boot bundle (read-only), outside its RAM.
    const BUNDLE_GPA: u64 = 0x4000_0000;
    /// Guest-physical address of the page holding a domain's `hvm_start_info`.
    const START_INFO_GPA: u64 = 0x1000;
    /// Images are linked at or above 1 MiB; below stays free for the start info.
    const IMAGE_MIN_GPA: u64 = 0x10_0000;

    static KERNEL: spin::Mutex<Kernel<Npt>> = spin::Mutex::new(Kernel::new());
    static MACHINE: spin::Mutex<Machine> = spin::Mutex::new(Machine::new());

    extern "C" {
        static __image_start: u8;
        static __image_end: u8;
    }

    fn fail(code: MachineExit, args: fmt::Arguments) -> ! {
        println!("FATAL: {}", args);
        exit_machine(code)
    }

    extern "C" fn microvisor_main(boot_info: u32, boot_protocol: u32) -> ! {
        cpu::arm_stack_canary();
        Serial::init();
        mask_legacy_pic();
        cpu::init();
        println!(
            "microvisor {} (AMD SVM + nested paging, Intel VT-d), ABI {}",
            env!("CARGO_PKG_VERSION"),
            ipc_spec::ABI_VERSION
        );

        let boot = match crate::boot::read(boot_info, boot_protocol) {
            Ok(b) => b,
            Err(e) => fail(MachineExit::BadBoot, format_args!("boot: {e}")),
        };
        if !boot.loader.is_empty() {
            println!("boot: {} from {}", boot.protocol, boot.loader);
        }
        if !boot.cmdline.is_empty() {
            println!("command line: {}", boot.cmdline);
        }
        crate::selftest::configure(&boot.cmdline);

        let features = match cpu::check_svm() {
            Ok(f) => f,
            Err(p) => match crate::arch::vmx_probe::probe() {
                Some(vmx) => stop_on_vmx(&vmx, boot.rsdp),
                None => fail(MachineExit::CpuUnsupported, format_args!("CPU: {}", p.explain())),
            },
        };
        println!(
            "cpu: SVM with nested paging, {} ASIDs, next-RIP save {}",
            features.asids,
            if features.next_rip_save { "yes" } else { "no" }
        );

        let platform = report_platform(boot.rsdp);

        // Physical memory: all RAM below 4 GiB except what is in use.
        let (image_start, image_end) = (&raw const __image_start as u64, &raw const __image_end as u64);
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
        println!("bundle: {} images, {} bytes", bundle.len(), bundle_bytes.len());
        let Some(dom0_image) = bundle.get(ipc_spec::DOM0_IMAGE) else {
            fail(MachineExit::BadBoot, format_args!("boot bundle: no image named \"{}\"", ipc_spec::DOM0_IMAGE))
        };

        let svm = match Svm::enable(alloc_zeroed_frames, features.asids) {
            Ok(s) => s,
            Err(_) => fail(MachineExit::BadBoot, format_args!("out of memory while enabling SVM")),
        };
        FpuStates::enable();
        let clock = Clock::start();
        println!(
            "clock: TSC {} MHz, scheduler tick {} us ({} LAPIC timer counts)",
            clock.tsc_mhz(),
            apic::TICK_NS / 1000,
            clock.apic_per_ms
        );
        let mut m = MACHINE.lock();
        m.svm = svm;
        m.clock = clock;
        let mut k = KERNEL.lock();
        if !m.preallocate_vmcbs() {
            fail(MachineExit::BadBoot, format_args!("out of memory for the VMCBs"));
        }
        discover_pci(&mut k, &mut m, &platform);
        start_iommu(&mut m, &platform);

        if let Err(e) = build_dom0(&mut k, &mut m, dom0_image, &boot.cmdline, bundle_range) {
            fail(MachineExit::BadBoot, format_args!("building dom0: {e}"));
        }
        let stage2_root = k.domains[0].stage2.as_ref().map_or(0, |s| s.root());
        let entry = k.vcpus[0].regs.rip;
        println!(
            "dom0: {} MiB RAM, ASID 1, stage-2 root {:#x}, entry {:#x}: entering SVM guest mode",
            DOM0_RAM >> 20,
            stage2_root,
            entry
        );
        run(&mut k, &mut m)
    }

    /// An Intel CPU (Bochs, real machines booted by GRUB): report what its VMX offers and the
    /// platform, then stop, since only the SVM backend exists so far.
    fn stop_on_vmx(msrs: &microvisor::vmx_caps::VmxMsrs, rsdp: u64) -> ! {
        let caps = microvisor::vmx_caps::VmxCaps::decode(msrs);
        println!("cpu: Intel {caps}");
        if let Some(what) = caps.missing() {
            println!("cpu: the VMX backend will need {what}, which this CPU lacks");
        }
        let platform = report_platform(rsdp);
        if platform.dmar.is_none() {
            println!("iommu: no IOMMU: passthrough refused (no device will be given to a domain)");
        }
        fail(
            MachineExit::CpuUnsupported,
            format_args!("CPU: Intel VMX found, but the VMX backend is not there yet: only AMD SVM can run dom0"),
        )
    }

    enum BuildError {
        Image(ElfError),
        NoPvhEntry,
        Kernel(ipc_spec::Error),
        StartInfo,
    }

    impl fmt::Display for BuildError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                Self::Image(e) => write!(f, "image: {e}"),
                Self::NoPvhEntry => f.write_str("image: no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"),
                Self::Kernel(e) => write!(f, "{e}"),
                Self::StartInfo => f.write_str("start information does not fit in its page"),
            }
        }
    }

    impl From<ipc_spec::Error> for BuildError {
        fn from(e: ipc_spec::Error) -> Self {
            Self::Kernel(e)
        }
    }

    /// dom0 is built like any domain, and starts with the root capabilities.
    fn build_dom0(
        k: &mut Kernel<Npt>,
        m: &mut Machine,
        image: &[u8],
        cmdline: &str,
        bundle: PhysRange,
    ) -> Result<(), BuildError> {
        let elf = ElfImage::parse(image).map_err(BuildError::Image)?;
        let entry = elf.pvh_entry().ok_or(BuildError::NoPvhEntry)?;
        elf.check_fits(IMAGE_MIN_GPA, DOM0_RAM - IMAGE_MIN_GPA).map_err(BuildError::Image)?;

        let d = k.domain_create(m, b"dom0", DOM0_RAM, DOM0_PRIORITY)?;
        // Every other domain must stay reachable from dom0 through domain capabilities.
        k.root = Some(d);
        for seg in elf.segments() {
            k.write_ram(m, d, seg.paddr, elf.segment_data(seg))?;
        }
        k.map_fixed(m, d, BUNDLE_GPA, bundle.start, bundle.len())?;

        let mut args: heapless::String<512> = heapless::String::new();
        for word in microvisor::cmdline::domain_args(cmdline, "dom0") {
            if !args.is_empty() {
                let _ = args.push(' ');
            }
            let _ = args.push_str(word);
        }
        let memmap = [MemmapEntry::new(0, DOM0_RAM, start_info::MEMMAP_RAM)];
        let modules = [ModuleSpec { paddr: BUNDLE_GPA, size: bundle.len() }];
        let mut page = [0u8; 4096];
        start_info::build_start_page(&mut page, START_INFO_GPA, args.as_bytes(), &memmap, &modules, 0)
            .map_err(|_| BuildError::StartInfo)?;
        k.write_ram(m, d, START_INFO_GPA, &page)?;

        // The root capabilities, at the slots ipc-spec promises.
        let g = k.domains[d as usize].generation;
        let s0 = k.grant_original(d, Object::Domain(d, g), rights::CONTROL)?;
        let s1 = k.grant_original(d, Object::Memory, rights::CONTROL | rights::GRANT)?;
        let v = k.vcpu_create(m, d, entry as u64, START_INFO_GPA)?;
        let vg = k.vcpus[v as usize].generation;
        let s2 = k.grant_original(d, Object::Vcpu(v, vg), rights::CONTROL)?;
        let s3 = k.grant_original(d, Object::Machine, rights::CONTROL)?;
        debug_assert_eq!(
            [s0, s1, s2, s3],
            [dom0_slots::SELF_DOMAIN, dom0_slots::MEMORY, dom0_slots::SELF_VCPU, dom0_slots::MACHINE]
        );
        // Then every assignable PCI function, from FIRST_DEVICE on.
        for dev in 0..k.devices.len() {
            if k.devices[dev].present {
                k.grant_original(d, Object::Device(dev as u16), rights::CONTROL | rights::GRANT)?;
            }
        }
        k.vcpu_start(v)?;
        Ok(())
    }

    /// The scheduler loop: run the current vCPU until it exits, handle the exit, repeat.
    fn run(k: &mut Kernel<Npt>, m: &mut Machine) -> ! {
        let (mut seen_events, mut seen_ticks) = (apic::events(), apic::ticks());
        loop {
            let events = apic::events();
            if events != seen_events {
                seen_events = events;
                let mut irqs = apic::take_device_irqs();
                while irqs != 0 {
                    let bit = irqs.trailing_zeros();
                    irqs &= irqs - 1;
                    k.device_interrupt(microvisor::kernel::DEVICE_VECTOR_BASE + bit as u8);
                }
                let ticks = apic::ticks();
                if ticks != seen_ticks {
                    seen_ticks = ticks;
                    cpu::check_stack_canary();
                    poll_iommu_faults(k, m);
                    k.tick(m.clock.now_ns());
                }
            }
            k.schedule();
            let Some(v) = k.current else {
                if !k.any_alive() {
                    println!("no runnable domains left: stopping the machine");
                    exit_machine(MachineExit::NoDomainsLeft);
                }
                apic::wait_for_interrupt();
                continue;
            };
            cpu::set_current_domain(Some(k.vcpus[v as usize].domain));
            enter(k, m, v);
            let exit = m.svm.run(v, &mut k.vcpus[v as usize].regs);
            let event = vmexit::handle(k, m, v, exit);
            // A blocked DMA of this vCPU's domain goes to its exit handler now.
            if k.current == Some(v) {
                let d = k.vcpus[v as usize].domain;
                if let Some((addr, detail)) = m.pending_dma[d as usize].take() {
                    let x = microvisor::kernel::PendingExit::new(ipc_spec::exit::ExitKind::Dma, addr, detail);
                    vmexit::send(k, m, v, x);
                }
            }
            match event {
                None => {}
                Some(Event::PowerOff(status)) => {
                    println!("shutdown requested with status {status}");
                    exit_machine(if status == 0 { MachineExit::Success } else { MachineExit::Dom0Failure });
                }
                Some(Event::Exited { domain, status, handled }) => println!(
                    "domain {} exited with status {status}{}",
                    k.domains[domain as usize].name(),
                    if handled { "; its fault handler was told" } else { "" }
                ),
            }
            cpu::set_current_domain(None);
        }
    }

    /// Prepare the CPU for vCPU `v`: TLB, FPU, and its pending virtual interrupts handed to
    /// the hardware (`Kernel::deliver_irqs`).
    fn enter(k: &mut Kernel<Npt>, m: &mut Machine, v: microvisor::kernel::VcpuId) {
        m.sync_tlb(v);
        m.fpu.switch_to(v);
        k.deliver_irqs(&mut m.svm, v);
    }

    fn report_platform(rsdp: u64) -> acpi::Platform {
        let p = match acpi::discover(rsdp) {
            Ok(p) => p,
            Err(e) => fail(MachineExit::BadBoot, format_args!("ACPI: {e}")),
        };
        let mut line: heapless::String<256> = heapless::String::new();
        use core::fmt::Write as _;
        let _ = write!(line, "acpi: {} CPUs (APIC ids {:?})", p.cpus, p.apic_ids.as_slice());
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
                if let Some(u) = d.units.first() {
                    let _ = write!(line, " at {:#x}", u.register_base);
                }
                let ir = if d.interrupt_remapping() { "supported" } else { "not supported" };
                let _ = write!(line, ", {}-bit DMA, interrupt remapping {ir}", d.host_address_width);
            }
            (None, Some(e)) => {
                let _ = write!(line, ", IOMMU: DMAR table unreadable ({e})");
            }
            (None, None) => {
                let _ = write!(line, ", IOMMU: none (no DMAR table; add -device intel-iommu)");
            }
        }
        println!("{}", line);
        if p.local_apic_base != apic::LAPIC_BASE {
            fail(
                MachineExit::BadBoot,
                format_args!(
                    "the local APIC is at {:#x}; this microvisor expects it at {:#x}",
                    p.local_apic_base,
                    apic::LAPIC_BASE
                ),
            );
        }
        p
    }

    /// Turn VT-d on before any domain runs: from now on a device can only DMA where its
    /// domain's DMA space says.
    fn start_iommu(m: &mut Machine, platform: &acpi::Platform) {
        let Some(unit) = platform.dmar.as_ref().and_then(|d| d.sole_unit()) else {
            println!("iommu: none usable (needs one VT-d unit, on segment 0): no device will be given to a domain");
            return;
        };
        match Iommu::init(unit.register_base) {
            Ok(iommu) => {
                m.iommu = Some(iommu);
                println!(
                    "iommu: VT-d at {:#x} on: DMA translation (every device blocked until assigned), interrupt remapping, queued invalidation",
                    unit.register_base
                );
            }
            Err(why) => fail(MachineExit::BadBoot, format_args!("iommu at {:#x}: {why}", unit.register_base)),
        }
    }

    /// Report DMA faults the IOMMU recorded, and queue each for the domain that owns the
    /// device: it reaches that domain's fault handler when one of its vCPUs next runs.
    fn poll_iommu_faults(k: &Kernel<Npt>, m: &mut Machine) {
        let Some(iommu) = m.iommu.as_mut() else { return };
        while let Some(f) = iommu.poll_fault() {
            let bdf = microvisor::pci::Bdf::from_requester_id(f.source_id);
            let owner = k.devices.iter().find(|d| d.present && d.rid == f.source_id).and_then(|d| d.owner);
            let write = matches!(f.kind, microvisor::iommu::faults::RequestKind::Write);
            println!(
                "iommu: blocked DMA from {bdf}: {} at {:#x} ({}){}",
                if write { "write" } else { "read" },
                f.fault_info,
                f.reason,
                owner.map_or("", |_| "; reported to the owner's fault handler")
            );
            if f.fault_info < crate::arch::phys::IDENTITY_LIMIT {
                // What the device would have overwritten without the IOMMU, as it is now.
                // SAFETY: an 8-byte read inside the identity map; the value is only printed.
                let now = unsafe { core::ptr::read_volatile(f.fault_info as *const [u8; 8]) };
                println!("iommu: physical memory at {:#x} now holds {:02x?}", f.fault_info, now);
            }
            if let Some(d) = owner {
                let detail = ipc_spec::exit::Dma { requester: f.source_id, reason: f.reason.raw(), write }.encode();
                let slot = &mut m.pending_dma[d as usize];
                if slot.is_none() {
                    *slot = Some((f.fault_info, detail));
                }
            }
        }
    }

    /// Find every PCI function through ECAM; endpoints become kernel devices.
    fn discover_pci(k: &mut Kernel<Npt>, m: &mut Machine, platform: &acpi::Platform) {
        let Some(ecam) = platform.ecam.and_then(|e| Ecam::new(e.base, e.bus_start, e.bus_end)) else {
            println!("pci: no reachable ECAM window: no devices can be assigned");
            return;
        };
        let buses = ecam.buses();
        let mut ecam = ecam;
        let summary = microvisor::pci::enumerate(&mut ecam, buses, &mut m.functions);
        m.ecam = Some(ecam);
        let mut registered = 0;
        for i in 0..m.functions.len() {
            let f = &m.functions[i];
            println!("pci: {}", f);
            if f.layout() != microvisor::pci::HeaderLayout::Endpoint {
                continue;
            }
            let class = (f.class.base as u32) << 16 | (f.class.sub as u32) << 8 | f.class.prog_if as u32;
            if let Some(dev) = k.register_device(f.bdf.requester_id(), f.vendor, f.device, class) {
                m.bind_device(dev, i);
                registered += 1;
            }
        }
        println!(
            "pci: {} function(s) on {} bus(es), {} assignable{}",
            summary.functions_found,
            summary.buses_scanned,
            registered,
            if summary.functions_dropped > 0 { " (some dropped: table full)" } else { "" }
        );
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

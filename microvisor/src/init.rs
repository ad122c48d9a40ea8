//! The boot sequence: from the loader's hand-off to dom0's first entry. Checks the CPU,
//! reads the boot information and ACPI, takes over physical memory, turns on SVM and the
//! IOMMU, finds the PCI functions, builds dom0 and enters the run loop.

use ipc_spec::bundle::Bundle;
use ipc_spec::hypercall::{dom0_slots, rights};
use ipc_spec::machine_exit::MachineExit;
use microvisor::frame_alloc::{FrameAllocator, PhysRange};
use microvisor::kernel::caps::Object;
use microvisor::kernel::Kernel;
use pvh::elf::{ElfError, ElfImage};
use pvh::start_info::{self, MemmapEntry, ModuleSpec};

use crate::arch::acpi;
use crate::arch::apic::{self, Clock};
use crate::arch::cpu::{self, exit_machine, fail};
use crate::arch::fpu::FpuStates;
use crate::arch::pcie::Ecam;
use crate::arch::phys::{alloc_zeroed_frames, phys_slice, FRAMES, PAGE_SIZE};
use crate::arch::serial::Serial;
use crate::arch::vtd::Iommu;
use crate::bare_metal::{BareMetal, Hw, Stage2};
use crate::println;

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

/// What this build runs on: the banner's words, and what dom0 is entered in.
#[cfg(not(feature = "vmx"))]
const BACKEND: [&str; 2] = ["AMD SVM + nested paging", "SVM guest mode"];
#[cfg(feature = "vmx")]
const BACKEND: [&str; 2] = ["Intel VMX + EPT + VPID", "VMX non-root mode with EPT and VPID"];

static KERNEL: spin::Mutex<Kernel<Stage2>> = spin::Mutex::new(Kernel::new());
static BARE_METAL: spin::Mutex<BareMetal> = spin::Mutex::new(BareMetal::new());

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

extern "C" fn microvisor_main(boot_info: u32, boot_protocol: u32) -> ! {
    cpu::arm_stack_canary();
    Serial::init();
    mask_legacy_pic();
    cpu::init();
    println!("microvisor {} ({}, Intel VT-d), ABI {}", env!("CARGO_PKG_VERSION"), BACKEND[0], ipc_spec::ABI_VERSION);

    let boot = crate::boot_info::read(boot_info, boot_protocol);
    if !boot.loader.is_empty() {
        println!("boot: {} from {}", boot.protocol, boot.loader);
    }
    if !boot.cmdline.is_empty() {
        println!("command line: {}", boot.cmdline);
    }
    crate::selftest::configure(&boot.cmdline);

    #[cfg(not(feature = "vmx"))]
    let features = match cpu::check_svm() {
        Ok(f) => f,
        Err(p) => fail(MachineExit::CpuUnsupported, format_args!("CPU: {}", p)),
    };
    #[cfg(not(feature = "vmx"))]
    println!(
        "cpu: SVM with nested paging, {} ASIDs, next-RIP save {}",
        features.asids,
        if features.next_rip_save { "yes" } else { "no" }
    );
    #[cfg(feature = "vmx")]
    let features = crate::arch::vmx_probe::check();

    let platform = report_platform(boot.rsdp);

    // Physical memory: all RAM below 4 GiB except what is in use.
    let (image_start, image_end) = (&raw const __image_start as u64, &raw const __image_end as u64);
    // The low 1 MiB (firmware, start info, real-mode area), the image, the bundle (an empty
    // range, which reserves nothing, when there is none).
    let bundle_area = boot.bundle.unwrap_or(PhysRange::new(0, 0));
    let reserved = [PhysRange::new(0, 0x10_0000), PhysRange::new(image_start, image_end), bundle_area];
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
    let bundle =
        Bundle::parse(bundle_bytes).unwrap_or_else(|e| fail(MachineExit::BadBoot, format_args!("boot bundle: {e}")));
    println!("bundle: {} images, {} bytes", bundle.len(), bundle_bytes.len());
    let Some(dom0_image) = bundle.get(ipc_spec::DOM0_IMAGE) else {
        fail(MachineExit::BadBoot, format_args!("boot bundle: no image named \"{}\"", ipc_spec::DOM0_IMAGE))
    };

    #[cfg(not(feature = "vmx"))]
    let hw = match Hw::enable(alloc_zeroed_frames, features.asids) {
        Ok(s) => s,
        Err(_) => fail(MachineExit::BadBoot, format_args!("out of memory while enabling SVM")),
    };
    #[cfg(feature = "vmx")]
    let hw = match Hw::enable(alloc_zeroed_frames, &features) {
        Ok(s) => s,
        Err(why) => fail(MachineExit::CpuUnsupported, format_args!("CPU: entering VMX operation: {why}")),
    };
    FpuStates::enable();
    let clock = Clock::start();
    println!(
        "clock: TSC {} MHz, scheduler tick {} us ({} LAPIC timer counts)",
        clock.tsc_mhz(),
        apic::TICK_NS / 1000,
        clock.apic_per_ms
    );
    let mut m = BARE_METAL.lock();
    m.hw = hw;
    #[cfg(feature = "vmx")]
    m.hw.set_tick(clock.tsc_mhz() * apic::TICK_NS / 1000);
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
        "dom0: {} MiB RAM, ASID 1, stage-2 root {:#x}, entry {:#x}: entering {}",
        DOM0_RAM >> 20,
        stage2_root,
        entry,
        BACKEND[1]
    );
    crate::run_loop::run(&mut k, &mut m)
}

/// dom0 is built like any domain, and starts with the root capabilities.
fn build_dom0(
    k: &mut Kernel<Stage2>,
    m: &mut BareMetal,
    image: &[u8],
    cmdline: &str,
    bundle: PhysRange,
) -> Result<(), ipc_spec::Error> {
    fn image_error(e: ElfError) -> ! {
        fail(MachineExit::BadBoot, format_args!("building dom0: image: {e}"))
    }
    let elf = ElfImage::parse(image).unwrap_or_else(|e| image_error(e));
    let Some(entry) = elf.pvh_entry() else {
        fail(MachineExit::BadBoot, format_args!("building dom0: image: no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"))
    };
    if let Err(e) = elf.check_fits(IMAGE_MIN_GPA, DOM0_RAM - IMAGE_MIN_GPA) {
        image_error(e)
    }

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
    start_info::build_start_page(&mut page, START_INFO_GPA, args.as_bytes(), &memmap, &modules, 0).unwrap_or_else(
        |_| fail(MachineExit::BadBoot, format_args!("building dom0: start information does not fit in its page")),
    );
    k.write_ram(m, d, START_INFO_GPA, &page)?;

    // The root capabilities, at the slots ipc-spec promises.
    let g = k.domains[d as usize].generation;
    let s0 = k.grant_original(d, Object::Domain(d, g), rights::CONTROL)?;
    let s1 = k.grant_original(d, Object::Memory, rights::CONTROL | rights::GRANT)?;
    let v = k.vcpu_create(m, d, entry as u64, START_INFO_GPA)?;
    let vg = k.vcpus[v as usize].generation;
    let s2 = k.grant_original(d, Object::Vcpu(v, vg), rights::CONTROL)?;
    let s3 = k.grant_original(d, Object::Machine, rights::CONTROL | rights::READ | rights::GRANT)?;
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

fn report_platform(rsdp: u64) -> acpi::AcpiFacts {
    let p = acpi::discover(rsdp).unwrap_or_else(|e| fail(MachineExit::BadBoot, format_args!("ACPI: {e}")));
    let mut line: heapless::String<256> = heapless::String::new();
    use core::fmt::Write as _;
    let _ = write!(line, "acpi: {} CPUs (APIC ids {:?})", p.cpus, p.apic_ids.as_slice());
    let _ = match p.ecam {
        Some(e) => {
            write!(line, ", PCI ECAM {:#x} (segment {}, buses {}-{})", e.base, e.segment, e.bus_start, e.bus_end)
        }
        None => write!(line, ", no PCI ECAM (MCFG missing)"),
    };
    let _ = match (&p.dmar, &p.dmar_error) {
        (Some(d), _) => {
            let _ = write!(line, ", IOMMU: {} VT-d unit(s)", d.units.len());
            if let Some(u) = d.units.first() {
                let _ = write!(line, " at {:#x}", u.register_base);
            }
            let ir = if d.interrupt_remapping() { "supported" } else { "not supported" };
            write!(line, ", {}-bit DMA, interrupt remapping {ir}", d.host_address_width)
        }
        (None, Some(e)) => write!(line, ", IOMMU: DMAR table unreadable ({e})"),
        (None, None) => write!(line, ", IOMMU: none (no DMAR table; add -device intel-iommu)"),
    };
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
fn start_iommu(m: &mut BareMetal, platform: &acpi::AcpiFacts) {
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

/// Find every PCI function through ECAM; endpoints become kernel devices.
fn discover_pci(k: &mut Kernel<Stage2>, m: &mut BareMetal, platform: &acpi::AcpiFacts) {
    let Some(ecam) = platform.ecam.and_then(|e| Ecam::new(e.base, e.bus_start, e.bus_end)) else {
        println!("pci: no reachable ECAM window: no devices can be assigned");
        return;
    };
    let buses = ecam.buses();
    let mut ecam = ecam;
    let summary = microvisor::pci::enumerate(&mut ecam, buses, &mut m.functions);
    let mut registered = 0;
    for i in 0..m.functions.len() {
        let f = &m.functions[i];
        println!("pci: {}", f);
        if f.layout() != microvisor::pci::HeaderLayout::Endpoint {
            continue;
        }
        // Firmware may leave a function running (SeaBIOS: virtio-blk bus-mastering with a
        // virtqueue in its memory). Once in about 200 boots (`virtio_rogue`) it read that
        // ring after the IOMMU went on below and before any domain ran ("blocked DMA from
        // 00:01.0: read at 0x1ffde000"; what made QEMU look at the queue then is not known:
        // sizing the BARs just now toggled its decoding). With bus mastering off the read goes
        // nowhere; assignment quiesces the function again and its driver turns on what it uses.
        microvisor::pci::stop_bus_mastering(&mut ecam, f.bdf);
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
    m.ecam = Some(ecam);
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

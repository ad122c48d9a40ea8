//! Bringing the VM up: its RAM in view, the kernel, initramfs, start info and ACPI tables
//! written into it (`vmm::boot`'s plan), the TSC measured, the vCPU created at the PVH entry.

use alloc::format;
use alloc::string::String;

use domain_rt::hypercall::{self, call};
use domain_rt::{println, BootInfo};
use ipc_spec::Hypercall;
use vmm::boot::{plan, BootConfig};
use vmm::memory::{GuestMemory, SliceMemory};
use vmm::platform::{Platform, PlatformConfig};

use crate::exits::Vmm;

/// Where the VM's RAM appears in this domain (above this domain's RAM and the files, below
/// 3 GiB + 1 GiB, inside the boot page tables' identity map of the low 4 GiB).
pub const VIEW: u64 = 0xa000_0000;
/// Largest VM this layout can view.
const VIEW_MAX: u64 = 0x1_0000_0000 - VIEW;
/// How long the TSC is measured against the microvisor's clock.
const CALIBRATION_NS: u64 = 20_000_000;

/// `<offset>:<length>` inside the files region.
fn span(info: &BootInfo, key: &str, files_len: u64) -> Result<Option<(u64, u64)>, String> {
    let Some(v) = info.arg(key) else { return Ok(None) };
    let parse = |s: &str| {
        let s = s.trim_start_matches("0x");
        u64::from_str_radix(s, 16).map_err(|_| format!("{key}={v}: not <hex offset>:<hex length>"))
    };
    let (o, l) = v.split_once(':').ok_or_else(|| format!("{key}={v}: not <offset>:<length>"))?;
    let (o, l) = (parse(o)?, parse(l)?);
    if o.checked_add(l).is_none_or(|end| end > files_len) {
        return Err(format!("{key}={v}: outside the files region"));
    }
    Ok(Some((o, l)))
}

/// The TSC frequency, measured against the Clock hypercall over [`CALIBRATION_NS`].
fn calibrate(timer: u64) -> Result<u64, String> {
    let (t0, c0) = (rdtsc(), hypercall::clock_ns());
    hypercall::sleep_ns(timer, CALIBRATION_NS).map_err(|e| format!("calibration sleep: {e}"))?;
    let (t1, c1) = (rdtsc(), hypercall::clock_ns());
    vmm::timebase::tsc_hz(t1.wrapping_sub(t0), c1.saturating_sub(c0))
        .ok_or_else(|| String::from("the TSC did not advance during calibration"))
}

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter (the VM reads the same counter: the
    // microvisor gives guests no TSC offset).
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub fn boot(info: &BootInfo) -> Result<Vmm, String> {
    let slot = |k: &str| info.slot(k).ok_or_else(|| format!("missing {k}= on the command line"));
    let (vm, exits, timer) = (slot("vm")?, slot("exits")?, slot("timer")?);
    let vm_ram = slot("vm_ram")?;
    let files = info
        .arg("files")
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .ok_or("missing files=<gpa> on the command line")?;
    let files_len = info
        .arg("files_len")
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .ok_or("missing files_len= on the command line")?;
    if vm_ram > VIEW_MAX {
        return Err(format!("the VM's {} MiB do not fit this VMM's view", vm_ram >> 20));
    }
    let kernel = span(info, "kernel", files_len)?.ok_or("missing kernel= on the command line")?;
    let initramfs = span(info, "initramfs", files_len)?;
    let cmdline = span(info, "cmdline", files_len)?;

    domain_rt::exits::register_message_page().map_err(|e| format!("message page: {e}"))?;
    hypercall::map_vm_ram(vm, VIEW).map_err(|e| format!("mapping the VM's RAM: {e}"))?;

    // SAFETY: dom0 mapped the files region read-only at `files` (files_len bytes) and never
    // changes it; nothing in this domain writes there.
    let region = unsafe { core::slice::from_raw_parts(files as *const u8, files_len as usize) };
    let part = |(o, l): (u64, u64)| &region[o as usize..(o + l) as usize];
    // SAFETY: DomainMapRam mapped all of the VM's RAM (vm_ram bytes) read-write at VIEW; only
    // this domain and the VM use it. The VM may change it at any time, which the models
    // tolerate (every guest address is bounds-checked).
    let ram = unsafe { core::slice::from_raw_parts_mut(VIEW as *mut u8, vm_ram as usize) };
    let mut mem = SliceMemory::new(0, ram);

    let devices = crate::devices::connect(info.cmdline, timer);
    let mut cmd = alloc::vec::Vec::from(cmdline.map(part).unwrap_or(b""));
    if !cmd.is_empty() {
        cmd.push(b' ');
    }
    let platform_words =
        if devices.waits.is_empty() { vmm::platform::PLATFORM_CMDLINE } else { vmm::platform::PCI_CMDLINE };
    cmd.extend_from_slice(platform_words.as_bytes());
    let cmd = &cmd[..];
    let initrd = initramfs.map(part).unwrap_or(b"");
    let p = plan(&BootConfig { ram_size: vm_ram, kernel: part(kernel), initrd_len: initrd.len() as u64, cmdline: cmd })
        .map_err(|e| format!("{e}"))?;
    p.apply(&mut mem).map_err(|e| format!("loading: {e}"))?;
    if let Some(gpa) = p.initrd_gpa {
        mem.write(gpa, initrd).map_err(|e| format!("loading the initramfs: {e}"))?;
    }

    let tsc_hz = calibrate(timer)?;
    let boot_tsc = rdtsc();
    let platform = Platform::new(PlatformConfig {
        tsc_hz,
        apic_bus_hz: 1_000_000_000,
        boot_tsc,
        wall_clock_sec: 0,
        wall_clock_nsec: 0,
    })
    .map_err(|e| format!("{e}"))?;
    // The disk and network, once the driver VMs answer (before the VM runs: Linux probes
    // PCI early). Their doorbells wake the receive loop like the timer does; the timer is
    // bound last, as the microvisor checks the last bound notification's pending bits when a
    // receive starts (the VMM polls the channels' doorbells itself before each receive).
    for &(w, _) in &devices.waits {
        hypercall::bind_receive(w).map_err(|e| format!("binding a channel's doorbell: {e}"))?;
    }
    hypercall::bind_receive(timer).map_err(|e| format!("binding the timer: {e}"))?;
    let vcpu = call(Hypercall::VcpuCreate, vm, [u64::from(p.entry), p.start_info_gpa, 0, 0, 0, 0])
        .map_err(|e| format!("creating the vCPU: {e}"))?
        .args[0];
    println!(
        "booting Linux: kernel {} KiB, initramfs {} KiB at {:#x}, {} MiB RAM, TSC {} MHz (measured), command line \"{}\"",
        kernel.1 >> 10,
        initrd.len() >> 10,
        p.initrd_gpa.unwrap_or(0),
        vm_ram >> 20,
        tsc_hz / 1_000_000,
        core::str::from_utf8(cmd).unwrap_or("?")
    );
    call(Hypercall::VcpuStart, vcpu, [0; 6]).map_err(|e| format!("starting the vCPU: {e}"))?;
    Ok(Vmm::new(platform, devices, mem, vm, vcpu, exits, timer, info.slot("console"), tsc_hz))
}

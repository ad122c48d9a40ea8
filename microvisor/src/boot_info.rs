//! Reading what the boot loader hands over: memory map, command line, RSDP and the boot
//! bundle module, from a PVH `hvm_start_info` (QEMU `-kernel`) or a Multiboot2 information
//! (GRUB). Everything is copied out before the frame allocator starts handing out memory.

use core::fmt;

use ipc_spec::machine_exit::MachineExit;

use microvisor::frame_alloc::PhysRange;
use pvh::multiboot2;
use pvh::start_info::{MemmapEntry, ModlistEntry, StartInfo, MEMMAP_RAM};

use crate::arch::phys::{phys_slice, IDENTITY_LIMIT};

const START_INFO_LEN: usize = 56;
const MEMMAP_ENTRY_LEN: usize = 24;
const MODLIST_ENTRY_LEN: usize = 32;
const CMDLINE_MAX: usize = 1024;

pub struct BootInfo {
    /// How the microvisor was started: "PVH" or "Multiboot2".
    pub protocol: &'static str,
    /// The boot loader's name, when it gave one (Multiboot2).
    pub loader: heapless::String<64>,
    pub cmdline: heapless::String<CMDLINE_MAX>,
    pub rsdp: u64,
    /// RAM below the identity-map limit, from the memory map.
    pub ram: heapless::Vec<PhysRange, 32>,
    /// The boot bundle (the first module), if any.
    pub bundle: Option<PhysRange>,
    pub memmap_entries: u32,
}

/// A boot that cannot go on: the machine stops with `BadBoot` and the reason.
fn bad(why: fmt::Arguments) -> ! {
    crate::arch::cpu::fail(MachineExit::BadBoot, format_args!("boot: {why}"))
}

fn bad_start_info(why: &str) -> ! {
    bad(format_args!("bad PVH start info: {why} (was the microvisor booted with QEMU -kernel?)"))
}

fn module_out_of_reach(paddr: u64, size: u64) -> ! {
    bad(format_args!("boot module at {paddr:#x}+{size:#x} lies outside the low 4 GiB"))
}

fn utf8_cmdline(raw: &[u8]) -> &str {
    core::str::from_utf8(raw).unwrap_or_else(|_| bad(format_args!("the command line is not UTF-8")))
}

/// Type-1 RAM below 4 GiB (the identity map) is what the frame allocator may use.
fn push_ram(ram: &mut heapless::Vec<PhysRange, 32>, e: &MemmapEntry) {
    if e.r#type == MEMMAP_RAM && e.addr < IDENTITY_LIMIT {
        let _ = ram.push(PhysRange::new(e.addr, e.addr.saturating_add(e.size).min(IDENTITY_LIMIT)));
    }
}

fn reachable(pa: u64, len: u64) -> bool {
    pa.checked_add(len).is_some_and(|end| end <= IDENTITY_LIMIT)
}

/// Read the boot facts. `protocol` is what the entry trampoline passed on: the PVH magic for
/// the PVH entry, EAX for the Multiboot2 entry.
pub fn read(info_pa: u32, protocol: u32) -> BootInfo {
    match protocol {
        pvh::start_info::MAGIC => read_pvh(info_pa),
        multiboot2::BOOT_MAGIC => read_multiboot2(info_pa),
        other => bad(format_args!(
            "entered by the Multiboot2 entry with EAX = {other:#x}, not {:#x}: this loader does not speak Multiboot2",
            multiboot2::BOOT_MAGIC
        )),
    }
}

fn read_pvh(start_info_pa: u32) -> BootInfo {
    let pa = start_info_pa as u64;
    if !reachable(pa, START_INFO_LEN as u64) || pa == 0 {
        bad(format_args!("start info at {pa:#x} is outside the low 4 GiB"));
    }
    // SAFETY: the loader put the start info at `pa` (EBX at entry); it is below 4 GiB.
    let si = StartInfo::from_bytes(unsafe { phys_slice(pa, START_INFO_LEN) })
        .unwrap_or_else(|_| bad_start_info("truncated"));
    if si.validate().is_err() {
        bad_start_info("wrong magic or version");
    }

    let mut ram = heapless::Vec::new();
    let n = si.memmap_entries as u64;
    if !reachable(si.memmap_paddr, n * MEMMAP_ENTRY_LEN as u64) {
        bad(format_args!("the start info's memory map lies outside the low 4 GiB"));
    }
    for i in 0..n {
        // SAFETY: the entry lies inside the memory map array checked above.
        let bytes = unsafe { phys_slice(si.memmap_paddr + i * MEMMAP_ENTRY_LEN as u64, MEMMAP_ENTRY_LEN) };
        if let Ok(e) = MemmapEntry::from_bytes(bytes) {
            push_ram(&mut ram, &e);
        }
    }

    let bundle = if si.nr_modules > 0 && reachable(si.modlist_paddr, MODLIST_ENTRY_LEN as u64) {
        // SAFETY: the first module entry lies below 4 GiB (checked above).
        let m = ModlistEntry::from_bytes(unsafe { phys_slice(si.modlist_paddr, MODLIST_ENTRY_LEN) })
            .unwrap_or_else(|_| bad_start_info("truncated module entry"));
        if !reachable(m.paddr, m.size) {
            module_out_of_reach(m.paddr, m.size);
        }
        Some(PhysRange::new(m.paddr, m.paddr + m.size))
    } else {
        None
    };

    let mut cmdline = heapless::String::new();
    if si.cmdline_paddr != 0 && reachable(si.cmdline_paddr, CMDLINE_MAX as u64) {
        // SAFETY: CMDLINE_MAX bytes from the command line address lie below 4 GiB.
        let raw = unsafe { phys_slice(si.cmdline_paddr, CMDLINE_MAX) };
        let len = raw.iter().position(|&b| b == 0).unwrap_or(0);
        let _ = cmdline.push_str(utf8_cmdline(&raw[..len]));
    }

    BootInfo {
        protocol: "PVH",
        loader: heapless::String::new(),
        cmdline,
        rsdp: si.rsdp_paddr,
        ram,
        bundle,
        memmap_entries: si.memmap_entries,
    }
}

/// Room for the loader's copy of the RSDP (36 bytes for ACPI 2.0+; the length field may
/// cover more).
const RSDP_MAX: usize = 64;

/// The RSDP copied out of the Multiboot2 information: the information itself is in memory
/// the frame allocator will hand out, but ACPI is read later. It lives in the microvisor's
/// image, which is identity-mapped, so its address is a physical address for ACPI.
#[repr(C, align(16))]
struct RsdpCopy([u8; RSDP_MAX]);
static RSDP_COPY: spin::Once<RsdpCopy> = spin::Once::new();

/// The information's size cap: GRUB's is a few KiB (its largest tag, the ELF sections, is
/// bounded by the image); anything near this is not a Multiboot2 information.
const MB2_INFO_MAX: u64 = 1 << 20;

fn read_multiboot2(info_pa: u32) -> BootInfo {
    let pa = info_pa as u64;
    if pa == 0 || !reachable(pa, 8) {
        bad(format_args!("the Multiboot2 information at {pa:#x} lies outside the low 4 GiB"));
    }
    // SAFETY: 8 bytes at the address the loader put in EBX, below 4 GiB (checked).
    let total = multiboot2::total_size(unsafe { phys_slice(pa, 8) }).unwrap_or_else(|e| bad(format_args!("{e}")));
    let len = (total as u64).min(MB2_INFO_MAX);
    if !reachable(pa, len) {
        bad(format_args!("the Multiboot2 information at {pa:#x} lies outside the low 4 GiB"));
    }
    // SAFETY: the information's bytes lie below 4 GiB (checked); nothing writes them while
    // they are read here (the frame allocator does not exist yet).
    let info =
        multiboot2::Info::parse(unsafe { phys_slice(pa, len as usize) }).unwrap_or_else(|e| bad(format_args!("{e}")));

    let mut ram = heapless::Vec::new();
    let mut memmap_entries = 0;
    for e in info.memory_map() {
        memmap_entries += 1;
        push_ram(&mut ram, &e);
    }

    // The first module is the boot bundle (grub.cfg's first `module2` line).
    let bundle = match info.modules().next() {
        Some(m) if !reachable(m.spec.paddr, m.spec.size) => module_out_of_reach(m.spec.paddr, m.spec.size),
        Some(m) => Some(PhysRange::new(m.spec.paddr, m.spec.paddr + m.spec.size)),
        None => None,
    };

    let rsdp = match info.rsdp() {
        Some(bytes) if bytes.len() > RSDP_MAX => {
            bad(format_args!("the loader's copy of the ACPI RSDP is {} bytes, more than {RSDP_MAX}", bytes.len()))
        }
        Some(bytes) => {
            let copy = RSDP_COPY.call_once(|| {
                let mut c = RsdpCopy([0; RSDP_MAX]);
                c.0[..bytes.len()].copy_from_slice(bytes);
                c
            });
            &raw const copy.0 as u64
        }
        // The ACPI reader then searches the BIOS area.
        None => 0,
    };

    let mut cmdline = heapless::String::new();
    let raw = info.cmdline();
    let _ = cmdline.push_str(utf8_cmdline(&raw[..raw.len().min(CMDLINE_MAX)]));
    let mut loader = heapless::String::new();
    if let Some(name) = info.boot_loader_name() {
        let _ = loader.push_str(core::str::from_utf8(&name[..name.len().min(64)]).unwrap_or("(not UTF-8)"));
    }

    BootInfo { protocol: "Multiboot2", loader, cmdline, rsdp, ram, bundle, memmap_entries }
}

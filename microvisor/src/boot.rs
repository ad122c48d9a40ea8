//! Reading what the boot loader hands over: memory map, command line, RSDP and the boot
//! bundle module, from a PVH `hvm_start_info` (QEMU `-kernel`) or a Multiboot2 information
//! (GRUB). Everything is copied out before the frame allocator starts handing out memory.

use core::fmt;

use microvisor::frame_alloc::PhysRange;
use pvh::multiboot2::{self, Mb2Error};
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

#[derive(Debug)]
pub enum BootError {
    StartInfoOutOfReach(u64),
    BadStartInfo(&'static str),
    MemmapOutOfReach,
    ModuleOutOfReach {
        paddr: u64,
        size: u64,
    },
    CmdlineNotUtf8,
    /// Entered neither by a PVH loader nor with the Multiboot2 magic in EAX.
    UnknownProtocol(u32),
    InfoOutOfReach(u64),
    BadMultiboot2(Mb2Error),
    RsdpTooLong(usize),
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::StartInfoOutOfReach(a) => {
                write!(f, "start info at {a:#x} is outside the low 4 GiB")
            }
            Self::BadStartInfo(why) => {
                write!(f, "bad PVH start info: {why} (was the microvisor booted with QEMU -kernel?)")
            }
            Self::MemmapOutOfReach => f.write_str("the start info's memory map lies outside the low 4 GiB"),
            Self::ModuleOutOfReach { paddr, size } => {
                write!(f, "boot module at {paddr:#x}+{size:#x} lies outside the low 4 GiB")
            }
            Self::CmdlineNotUtf8 => f.write_str("the command line is not UTF-8"),
            Self::UnknownProtocol(eax) => write!(
                f,
                "entered by the Multiboot2 entry with EAX = {eax:#x}, not {:#x}: this loader does not speak Multiboot2",
                multiboot2::BOOT_MAGIC
            ),
            Self::InfoOutOfReach(a) => write!(f, "the Multiboot2 information at {a:#x} lies outside the low 4 GiB"),
            Self::BadMultiboot2(e) => write!(f, "{e}"),
            Self::RsdpTooLong(n) => write!(f, "the loader's copy of the ACPI RSDP is {n} bytes, more than {RSDP_MAX}"),
        }
    }
}

fn reachable(pa: u64, len: u64) -> bool {
    pa.checked_add(len).is_some_and(|end| end <= IDENTITY_LIMIT)
}

/// Read the boot facts. `protocol` is what the entry trampoline passed on: the PVH magic for
/// the PVH entry, EAX for the Multiboot2 entry.
pub fn read(info_pa: u32, protocol: u32) -> Result<BootInfo, BootError> {
    match protocol {
        pvh::start_info::MAGIC => read_pvh(info_pa),
        multiboot2::BOOT_MAGIC => read_multiboot2(info_pa),
        other => Err(BootError::UnknownProtocol(other)),
    }
}

fn read_pvh(start_info_pa: u32) -> Result<BootInfo, BootError> {
    let pa = start_info_pa as u64;
    if !reachable(pa, START_INFO_LEN as u64) || pa == 0 {
        return Err(BootError::StartInfoOutOfReach(pa));
    }
    // SAFETY: the loader put the start info at `pa` (EBX at entry); it is below 4 GiB.
    let si = StartInfo::from_bytes(unsafe { phys_slice(pa, START_INFO_LEN) })
        .map_err(|_| BootError::BadStartInfo("truncated"))?;
    si.validate().map_err(|_| BootError::BadStartInfo("wrong magic or version"))?;

    let mut ram = heapless::Vec::new();
    let n = si.memmap_entries as u64;
    if !reachable(si.memmap_paddr, n * MEMMAP_ENTRY_LEN as u64) {
        return Err(BootError::MemmapOutOfReach);
    }
    for i in 0..n {
        // SAFETY: the entry lies inside the memory map array checked above.
        let bytes = unsafe { phys_slice(si.memmap_paddr + i * MEMMAP_ENTRY_LEN as u64, MEMMAP_ENTRY_LEN) };
        let Ok(e) = MemmapEntry::from_bytes(bytes) else {
            continue;
        };
        if e.r#type != MEMMAP_RAM || e.addr >= IDENTITY_LIMIT {
            continue;
        }
        let end = e.addr.saturating_add(e.size).min(IDENTITY_LIMIT);
        let _ = ram.push(PhysRange::new(e.addr, end));
    }

    let bundle = if si.nr_modules > 0 && reachable(si.modlist_paddr, MODLIST_ENTRY_LEN as u64) {
        // SAFETY: the first module entry lies below 4 GiB (checked above).
        let m = ModlistEntry::from_bytes(unsafe { phys_slice(si.modlist_paddr, MODLIST_ENTRY_LEN) })
            .map_err(|_| BootError::BadStartInfo("truncated module entry"))?;
        if !reachable(m.paddr, m.size) {
            return Err(BootError::ModuleOutOfReach { paddr: m.paddr, size: m.size });
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
        let s = core::str::from_utf8(&raw[..len]).map_err(|_| BootError::CmdlineNotUtf8)?;
        let _ = cmdline.push_str(s);
    }

    Ok(BootInfo {
        protocol: "PVH",
        loader: heapless::String::new(),
        cmdline,
        rsdp: si.rsdp_paddr,
        ram,
        bundle,
        memmap_entries: si.memmap_entries,
    })
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

fn read_multiboot2(info_pa: u32) -> Result<BootInfo, BootError> {
    let pa = info_pa as u64;
    if pa == 0 || !reachable(pa, 8) {
        return Err(BootError::InfoOutOfReach(pa));
    }
    // SAFETY: 8 bytes at the address the loader put in EBX, below 4 GiB (checked).
    let total = multiboot2::total_size(unsafe { phys_slice(pa, 8) }).map_err(BootError::BadMultiboot2)?;
    let len = (total as u64).min(MB2_INFO_MAX);
    if !reachable(pa, len) {
        return Err(BootError::InfoOutOfReach(pa));
    }
    // SAFETY: the information's bytes lie below 4 GiB (checked); nothing writes them while
    // they are read here (the frame allocator does not exist yet).
    let info = multiboot2::Info::parse(unsafe { phys_slice(pa, len as usize) }).map_err(BootError::BadMultiboot2)?;

    let mut ram = heapless::Vec::new();
    let mut memmap_entries = 0;
    for e in info.memory_map() {
        memmap_entries += 1;
        if e.r#type != MEMMAP_RAM || e.addr >= IDENTITY_LIMIT {
            continue;
        }
        let end = e.addr.saturating_add(e.size).min(IDENTITY_LIMIT);
        let _ = ram.push(PhysRange::new(e.addr, end));
    }

    // The first module is the boot bundle (grub.cfg's first `module2` line).
    let bundle = match info.modules().next() {
        Some(m) if !reachable(m.spec.paddr, m.spec.size) => {
            return Err(BootError::ModuleOutOfReach { paddr: m.spec.paddr, size: m.spec.size })
        }
        Some(m) => Some(PhysRange::new(m.spec.paddr, m.spec.paddr + m.spec.size)),
        None => None,
    };

    let rsdp = match info.rsdp() {
        Some(bytes) if bytes.len() > RSDP_MAX => return Err(BootError::RsdpTooLong(bytes.len())),
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
    let s = core::str::from_utf8(&raw[..raw.len().min(CMDLINE_MAX)]).map_err(|_| BootError::CmdlineNotUtf8)?;
    let _ = cmdline.push_str(s);
    let mut loader = heapless::String::new();
    if let Some(name) = info.boot_loader_name() {
        let _ = loader.push_str(core::str::from_utf8(&name[..name.len().min(64)]).unwrap_or("(not UTF-8)"));
    }

    Ok(BootInfo { protocol: "Multiboot2", loader, cmdline, rsdp, ram, bundle, memmap_entries })
}

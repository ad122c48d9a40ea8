//! Reading what the boot loader hands over (PVH `hvm_start_info`): memory map, command
//! line, RSDP and the boot bundle module. Everything is copied out before the frame
//! allocator starts handing out memory.

use core::fmt;

use microvisor::frame_alloc::PhysRange;
use pvh::start_info::{MemmapEntry, ModlistEntry, StartInfo, MEMMAP_RAM};

use crate::arch::phys::{phys_slice, IDENTITY_LIMIT};

const START_INFO_LEN: usize = 56;
const MEMMAP_ENTRY_LEN: usize = 24;
const MODLIST_ENTRY_LEN: usize = 32;
const CMDLINE_MAX: usize = 1024;

pub struct BootInfo {
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
    ModuleOutOfReach { paddr: u64, size: u64 },
    CmdlineNotUtf8,
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
        }
    }
}

fn reachable(pa: u64, len: u64) -> bool {
    pa.checked_add(len).is_some_and(|end| end <= IDENTITY_LIMIT)
}

pub fn read(start_info_pa: u32) -> Result<BootInfo, BootError> {
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

    Ok(BootInfo { cmdline, rsdp: si.rsdp_paddr, ram, bundle, memmap_entries: si.memmap_entries })
}

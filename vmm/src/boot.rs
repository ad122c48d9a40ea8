//! Where everything goes when a Linux kernel is booted the PVH way.
//!
//! Guest-physical layout (RAM is `[0, low_top)` plus, above 3 GiB of RAM, `[4 GiB, ...)`):
//!
//! | range                     | what                                        | memory map |
//! |---------------------------|---------------------------------------------|------------|
//! | `0x0000_0000-0x0009_ffff` | low RAM; start info page at [`START_INFO_GPA`] | RAM        |
//! | `0x000a_0000-0x000f_ffff` | legacy hole; ACPI tables at [`ACPI_GPA`]    | reserved   |
//! | `0x0010_0000-low_top`     | kernel segments at their `p_paddr`, initrd at the top (below 2 GiB) | RAM |
//! | `low_top-4 GiB`           | I/O APIC, local APIC; not RAM               | (absent)   |
//! | `4 GiB-...`               | the RAM beyond 3 GiB                        | RAM        |
//!
//! The PVH contract (Xen `arch-x86/hvm/start_info.h`; Linux `arch/x86/platform/pvh/head.S`):
//! enter at the `XEN_ELFNOTE_PHYS32_ENTRY` address in 32-bit protected mode, paging off, CS a
//! flat 32-bit code segment, DS/ES/SS flat data, EBX = the start info's address. A non-Xen
//! Linux needs `version >= 1` and at least one memory-map entry; module 0 is the initrd. Low
//! RAM below 640 KiB matters: Linux allocates its real-mode trampoline there.
//!
//! The image and sizes are untrusted (they come from a manifest and a file), so every error
//! says what does not fit where, and nothing panics.

use alloc::vec::Vec;
use core::fmt;

use pvh::elf::{ElfError, ElfImage};
use pvh::start_info::{
    build_start_page, MemmapEntry, ModuleSpec, StartInfoError, MEMMAP_RAM, MEMMAP_RESERVED, PAGE_SIZE,
};

use crate::acpi::{self, AcpiConfig, AcpiError};
use crate::memory::{GuestMemory, MemError};

/// Guest-physical address of the `hvm_start_info` page (memory map, module list, command line).
pub const START_INFO_GPA: u64 = 0x6000;
/// Guest-physical address of the ACPI tables (RSDP first).
pub const ACPI_GPA: u64 = 0xe_0000;
/// Start of the legacy hole below 1 MiB.
pub const LEGACY_HOLE_START: u64 = 0xa_0000;
/// End of the legacy hole (1 MiB).
pub const LEGACY_HOLE_END: u64 = 0x10_0000;
/// RAM beyond this goes above 4 GiB, leaving room for the APICs below 4 GiB.
pub const LOW_RAM_LIMIT: u64 = 0xc000_0000;
/// Start of RAM above the 32-bit hole.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// The initrd must end at or below 2 GiB (Linux's `initrd_addr_max` of 0x7fffffff).
pub const INITRD_END_MAX: u64 = 0x8000_0000;
/// Smallest RAM accepted: the kernel is linked at 16 MiB.
pub const MIN_RAM: u64 = 32 << 20;
/// Largest RAM accepted (1 TiB), well inside any guest's physical address width.
pub const MAX_RAM: u64 = 1 << 40;

/// What the boot needs.
#[derive(Clone, Copy, Debug)]
pub struct BootConfig<'a> {
    /// Guest RAM in bytes.
    pub ram_size: u64,
    /// The kernel ELF (a `vmlinux` with a PVH note).
    pub kernel: &'a [u8],
    /// Length of the initrd in bytes (0: none).
    pub initrd_len: u64,
    /// Kernel command line (no NUL).
    pub cmdline: &'a [u8],
}

/// Why a boot cannot be planned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootError {
    /// The kernel image is not a valid ELF for PVH.
    Kernel(ElfError),
    /// The kernel has no `XEN_ELFNOTE_PHYS32_ENTRY` note (not built with `CONFIG_PVH`).
    NoPvhEntry,
    /// RAM below [`MIN_RAM`] or above [`MAX_RAM`].
    RamSize {
        /// RAM given.
        ram_size: u64,
    },
    /// A kernel segment is not inside RAM above 1 MiB.
    KernelOutsideRam {
        /// Program header index.
        index: usize,
        /// Segment start.
        paddr: u64,
        /// Segment end.
        end: u64,
        /// Top of low RAM.
        low_top: u64,
    },
    /// The initrd does not fit between the kernel's end and the top of RAM below 2 GiB.
    InitrdDoesNotFit {
        /// Initrd length.
        len: u64,
        /// First free byte after the kernel.
        kernel_end: u64,
        /// Highest end the initrd may have.
        limit: u64,
    },
    /// The start info page cannot hold the command line / memory map.
    StartInfo(StartInfoError),
    /// The ACPI tables could not be built.
    Acpi(AcpiError),
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootError::Kernel(e) => write!(f, "kernel image: {e}"),
            BootError::NoPvhEntry => f.write_str(
                "kernel image has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); it needs CONFIG_PVH=y and \
                 must be the uncompressed vmlinux, not a bzImage",
            ),
            BootError::RamSize { ram_size } => {
                write!(f, "guest RAM of {ram_size:#x} bytes is outside [{MIN_RAM:#x}, {MAX_RAM:#x}]")
            }
            BootError::KernelOutsideRam { index, paddr, end, low_top } => write!(
                f,
                "kernel segment {index} [{paddr:#x}, {end:#x}) is not inside guest RAM [0x100000, {low_top:#x})"
            ),
            BootError::InitrdDoesNotFit { len, kernel_end, limit } => write!(
                f,
                "initrd of {len:#x} bytes does not fit between the kernel's end {kernel_end:#x} and {limit:#x} \
                 (top of RAM, at most 2 GiB): give the VM more memory or use a smaller initrd"
            ),
            BootError::StartInfo(e) => write!(f, "start info: {e}"),
            BootError::Acpi(e) => write!(f, "ACPI tables: {e}"),
        }
    }
}

impl core::error::Error for BootError {}

/// Bytes for one write into the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteData<'a> {
    /// Bytes borrowed from the kernel image.
    Borrowed(&'a [u8]),
    /// Bytes built by the plan (start info, ACPI tables).
    Owned(Vec<u8>),
    /// This many zero bytes (a segment's `.bss`).
    Zero(u64),
}

impl WriteData<'_> {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            WriteData::Borrowed(b) => b.len() as u64,
            WriteData::Owned(b) => b.len() as u64,
            WriteData::Zero(n) => *n,
        }
    }

    /// Whether the write is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One write of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootWrite<'a> {
    /// Guest-physical destination.
    pub gpa: u64,
    /// The bytes.
    pub data: WriteData<'a>,
    /// What it is, for logs.
    pub what: &'static str,
}

/// The result of planning a boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootPlan<'a> {
    /// Writes to perform before the vCPU starts (the initrd is not among them: see
    /// [`BootPlan::initrd_gpa`]).
    pub writes: Vec<BootWrite<'a>>,
    /// EIP at entry (32-bit protected mode, paging off).
    pub entry: u32,
    /// EBX at entry: the start info's address.
    pub start_info_gpa: u64,
    /// Where the caller copies the initrd, if any.
    pub initrd_gpa: Option<u64>,
    /// The RSDP's address (also in the start info).
    pub rsdp_gpa: u64,
    /// The memory map given to the guest.
    pub memmap: Vec<MemmapEntry>,
    /// Guest-physical ranges `(base, len)` the VMM must back with RAM.
    pub ram: Vec<(u64, u64)>,
}

fn page_up(v: u64) -> Option<u64> {
    Some(v.checked_add(PAGE_SIZE as u64 - 1)? & !(PAGE_SIZE as u64 - 1))
}

/// Plans a PVH boot of `cfg.kernel`.
pub fn plan<'a>(cfg: &BootConfig<'a>) -> Result<BootPlan<'a>, BootError> {
    if !(MIN_RAM..=MAX_RAM).contains(&cfg.ram_size) {
        return Err(BootError::RamSize { ram_size: cfg.ram_size });
    }
    let image = ElfImage::parse(cfg.kernel).map_err(BootError::Kernel)?;
    let entry = image.pvh_entry().ok_or(BootError::NoPvhEntry)?;

    let low_top = cfg.ram_size.min(LOW_RAM_LIMIT);
    let high = cfg.ram_size - low_top;
    let mut ram = alloc::vec![(0, low_top)];
    let mut memmap = alloc::vec![
        MemmapEntry::new(0, LEGACY_HOLE_START, MEMMAP_RAM),
        MemmapEntry::new(LEGACY_HOLE_START, LEGACY_HOLE_END - LEGACY_HOLE_START, MEMMAP_RESERVED),
        MemmapEntry::new(LEGACY_HOLE_END, low_top - LEGACY_HOLE_END, MEMMAP_RAM),
    ];
    if high > 0 {
        ram.push((HIGH_RAM_START, high));
        memmap.push(MemmapEntry::new(HIGH_RAM_START, high, MEMMAP_RAM));
    }

    // Kernel segments: inside RAM above 1 MiB (so clear of the start info and ACPI tables).
    let mut writes = Vec::new();
    for (i, seg) in image.segments().iter().enumerate() {
        let index = image.segment_phdr_index(i).unwrap_or(i);
        if seg.paddr < LEGACY_HOLE_END || seg.end() > low_top {
            return Err(BootError::KernelOutsideRam { index, paddr: seg.paddr, end: seg.end(), low_top });
        }
        writes.push(BootWrite { gpa: seg.paddr, data: WriteData::Borrowed(image.segment_data(seg)), what: "kernel" });
        let bss = seg.mem_size - seg.file_size;
        if bss > 0 {
            writes.push(BootWrite { gpa: seg.paddr + seg.file_size, data: WriteData::Zero(bss), what: "kernel bss" });
        }
    }

    // Initrd: as high as possible (out of the kernel's way as it grows its early allocations),
    // page-aligned, above the kernel, ending at or below 2 GiB.
    let (_, kernel_top) = image.span();
    let kernel_end = page_up(kernel_top).unwrap_or(u64::MAX);
    let limit = low_top.min(INITRD_END_MAX);
    let mut modules = Vec::new();
    let initrd_gpa = if cfg.initrd_len == 0 {
        None
    } else {
        let err = BootError::InitrdDoesNotFit { len: cfg.initrd_len, kernel_end, limit };
        let start = limit.checked_sub(cfg.initrd_len).ok_or(err.clone())? & !(PAGE_SIZE as u64 - 1);
        if start < kernel_end {
            return Err(err);
        }
        modules.push(ModuleSpec { paddr: start, size: cfg.initrd_len });
        Some(start)
    };

    let tables = acpi::build(&AcpiConfig { base: ACPI_GPA, apic_id: 0, ioapic_id: 1 }).map_err(BootError::Acpi)?;
    let mut page = [0u8; PAGE_SIZE];
    build_start_page(&mut page, START_INFO_GPA, cfg.cmdline, &memmap, &modules, tables.rsdp)
        .map_err(BootError::StartInfo)?;
    writes.push(BootWrite { gpa: START_INFO_GPA, data: WriteData::Owned(page.to_vec()), what: "start info" });
    let rsdp_gpa = tables.rsdp;
    writes.push(BootWrite { gpa: ACPI_GPA, data: WriteData::Owned(tables.bytes), what: "ACPI tables" });

    Ok(BootPlan { writes, entry, start_info_gpa: START_INFO_GPA, initrd_gpa, rsdp_gpa, memmap, ram })
}

impl BootPlan<'_> {
    /// Performs the writes into `mem` (not the initrd).
    pub fn apply(&self, mem: &mut dyn GuestMemory) -> Result<(), MemError> {
        const CHUNK: usize = 4096;
        let zeros = [0u8; CHUNK];
        for w in &self.writes {
            match &w.data {
                WriteData::Borrowed(b) => mem.write(w.gpa, b)?,
                WriteData::Owned(b) => mem.write(w.gpa, b)?,
                WriteData::Zero(n) => {
                    let mut done = 0u64;
                    while done < *n {
                        let len = (*n - done).min(CHUNK as u64) as usize;
                        let gpa = w.gpa.checked_add(done).ok_or(MemError { gpa: w.gpa, len })?;
                        mem.write(gpa, &zeros[..len])?;
                        done += len as u64;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::VecMemory;
    use proptest::prelude::*;
    use pvh::start_info::parse_start_page;

    /// A minimal ELF64 `ET_EXEC` for x86-64: `segs` = (paddr, file bytes, memsz), plus a PVH
    /// entry note if `entry` is given.
    fn elf(segs: &[(u64, Vec<u8>, u64)], entry: Option<u32>) -> Vec<u8> {
        let phnum = segs.len() + usize::from(entry.is_some());
        let mut data_off = 64 + 56 * phnum;
        let mut phdrs = Vec::new();
        let mut body = Vec::new();
        let mut ph = |t: u32, flags: u32, off: usize, paddr: u64, filesz: usize, memsz: u64, align: u64| {
            let mut p = Vec::new();
            p.extend_from_slice(&t.to_le_bytes());
            p.extend_from_slice(&flags.to_le_bytes());
            p.extend_from_slice(&(off as u64).to_le_bytes());
            p.extend_from_slice(&paddr.to_le_bytes()); // vaddr
            p.extend_from_slice(&paddr.to_le_bytes());
            p.extend_from_slice(&(filesz as u64).to_le_bytes());
            p.extend_from_slice(&memsz.to_le_bytes());
            p.extend_from_slice(&align.to_le_bytes());
            phdrs.extend(p);
        };
        for (paddr, bytes, memsz) in segs {
            ph(1, 5, data_off, *paddr, bytes.len(), *memsz, 0x1000);
            body.extend_from_slice(bytes);
            data_off += bytes.len();
        }
        if let Some(e) = entry {
            let mut note = Vec::new();
            note.extend_from_slice(&4u32.to_le_bytes());
            note.extend_from_slice(&4u32.to_le_bytes());
            note.extend_from_slice(&18u32.to_le_bytes());
            note.extend_from_slice(b"Xen\0");
            note.extend_from_slice(&e.to_le_bytes());
            ph(4, 4, data_off, 0, note.len(), 0, 4);
            body.extend(note);
        }
        let mut f = Vec::new();
        f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&0x100_0000u64.to_le_bytes()); // e_entry
        f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        f.extend_from_slice(&0u32.to_le_bytes());
        f.extend_from_slice(&64u16.to_le_bytes());
        f.extend_from_slice(&56u16.to_le_bytes());
        f.extend_from_slice(&(phnum as u16).to_le_bytes());
        f.extend_from_slice(&[0; 6]);
        f.extend(phdrs);
        f.extend(body);
        f
    }

    fn linux_like() -> Vec<u8> {
        elf(
            &[(0x100_0000, alloc::vec![0xaa; 0x3000], 0x3000), (0x100_4000, alloc::vec![0xbb; 0x100], 0x2000)],
            Some(0x100_0123),
        )
    }

    #[test]
    fn plan_for_128_mib() {
        let kernel = linux_like();
        let cfg =
            BootConfig { ram_size: 128 << 20, kernel: &kernel, initrd_len: 0x12345, cmdline: b"console=ttyS0 quiet" };
        let p = plan(&cfg).unwrap();
        assert_eq!(p.entry, 0x100_0123);
        assert_eq!(p.start_info_gpa, START_INFO_GPA);
        assert_eq!(p.initrd_gpa, Some(((128 << 20) - 0x12345) & !0xfff));
        assert_eq!(p.ram, [(0, 128 << 20)]);
        assert_eq!(p.rsdp_gpa, ACPI_GPA);

        let mut mem = VecMemory::new(0, 128 << 20);
        mem.bytes_mut()[0x100_4100..0x100_6000].fill(0x77);
        p.apply(&mut mem).unwrap();
        assert!(mem.bytes()[0x100_0000..0x100_3000].iter().all(|&b| b == 0xaa));
        assert!(mem.bytes()[0x100_4000..0x100_4100].iter().all(|&b| b == 0xbb));
        assert!(mem.bytes()[0x100_4100..0x100_6000].iter().all(|&b| b == 0), "bss zeroed");
        assert_eq!(&mem.bytes()[ACPI_GPA as usize..][..8], b"RSD PTR ");

        let page = &mem.bytes()[START_INFO_GPA as usize..][..PAGE_SIZE];
        let si = parse_start_page(page, START_INFO_GPA).unwrap();
        assert_eq!(si.info().version, 1);
        assert_eq!(si.cmdline(), b"console=ttyS0 quiet");
        assert_eq!(si.rsdp(), ACPI_GPA);
        let mods: Vec<_> = si.modules().collect();
        assert_eq!(mods.len(), 1);
        assert_eq!((mods[0].paddr, mods[0].size), (p.initrd_gpa.unwrap(), 0x12345));
        let mm: Vec<_> = si.memmap().collect();
        assert_eq!(
            mm,
            [
                MemmapEntry::new(0, 0xa_0000, MEMMAP_RAM),
                MemmapEntry::new(0xa_0000, 0x6_0000, MEMMAP_RESERVED),
                MemmapEntry::new(0x10_0000, (128 << 20) - 0x10_0000, MEMMAP_RAM),
            ]
        );
        // The writes do not overlap each other.
        let mut spans: Vec<_> = p.writes.iter().map(|w| (w.gpa, w.gpa + w.data.len())).collect();
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
        assert!(!p.writes.iter().any(|w| w.data.is_empty()));
    }

    #[test]
    fn ram_above_3_gib_goes_high() {
        let kernel = linux_like();
        let p = plan(&BootConfig { ram_size: 4 << 30, kernel: &kernel, initrd_len: 1 << 20, cmdline: b"" }).unwrap();
        assert_eq!(p.ram, [(0, 0xc000_0000), (1 << 32, 1 << 30)]);
        assert_eq!(p.memmap.last(), Some(&MemmapEntry::new(1 << 32, 1 << 30, MEMMAP_RAM)));
        assert_eq!(p.initrd_gpa, Some(0x8000_0000 - (1 << 20)), "initrd below 2 GiB");
    }

    #[test]
    fn errors_name_what_does_not_fit() {
        let kernel = linux_like();
        let base = BootConfig { ram_size: 128 << 20, kernel: &kernel, initrd_len: 0, cmdline: b"" };
        assert_eq!(plan(&BootConfig { ram_size: 1 << 20, ..base }), Err(BootError::RamSize { ram_size: 1 << 20 }));
        assert_eq!(plan(&BootConfig { ram_size: u64::MAX, ..base }), Err(BootError::RamSize { ram_size: u64::MAX }));
        let e = plan(&BootConfig { initrd_len: 120 << 20, ..base }).unwrap_err();
        assert!(matches!(e, BootError::InitrdDoesNotFit { kernel_end: 0x100_6000, .. }), "{e:?}");
        assert!(e.to_string().contains("initrd"));
        assert!(matches!(plan(&BootConfig { initrd_len: u64::MAX, ..base }), Err(BootError::InitrdDoesNotFit { .. })));
        let long = alloc::vec![b'x'; 5000];
        let e = plan(&BootConfig { cmdline: &long, ..base }).unwrap_err();
        assert!(matches!(e, BootError::StartInfo(StartInfoError::DoesNotFit { what: "command line", .. })));
        assert!(plan(&BootConfig { cmdline: b"a\0b", ..base }).is_err());
        let no_note = elf(&[(0x100_0000, alloc::vec![1; 16], 16)], None);
        assert_eq!(plan(&BootConfig { kernel: &no_note, ..base }), Err(BootError::NoPvhEntry));
        let low = elf(&[(0x8_0000, alloc::vec![1; 16], 16)], Some(0x8_0000));
        let e = plan(&BootConfig { kernel: &low, ..base }).unwrap_err();
        assert!(matches!(e, BootError::KernelOutsideRam { index: 0, paddr: 0x8_0000, .. }));
        let big = elf(&[(0x100_0000, alloc::vec![1; 16], 200 << 20)], Some(0x100_0000));
        assert!(matches!(plan(&BootConfig { kernel: &big, ..base }), Err(BootError::KernelOutsideRam { .. })));
        assert!(matches!(plan(&BootConfig { kernel: b"MZ not an elf", ..base }), Err(BootError::Kernel(_))));
        for e in [
            BootError::NoPvhEntry,
            BootError::RamSize { ram_size: 1 },
            BootError::Kernel(ElfError::BadMagic),
            BootError::KernelOutsideRam { index: 1, paddr: 2, end: 3, low_top: 4 },
            BootError::InitrdDoesNotFit { len: 1, kernel_end: 2, limit: 3 },
            BootError::StartInfo(StartInfoError::CmdlineContainsNul { offset: 1 }),
            BootError::Acpi(AcpiError::BadBase { base: 1 }),
        ] {
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn apply_reports_memory_too_small() {
        let kernel = linux_like();
        let p = plan(&BootConfig { ram_size: 128 << 20, kernel: &kernel, initrd_len: 0, cmdline: b"" }).unwrap();
        let mut mem = VecMemory::new(0, 1 << 20);
        assert!(p.apply(&mut mem).is_err());
    }

    proptest! {
        #[test]
        fn prop_hostile_inputs(kernel in proptest::collection::vec(any::<u8>(), 0..512),
                               ram in prop_oneof![any::<u64>(), 0u64..(8 << 30)], initrd in prop_oneof![any::<u64>(), 0u64..(1 << 30)],
                               cmdline in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = plan(&BootConfig { ram_size: ram, kernel: &kernel, initrd_len: initrd, cmdline: &cmdline });
            let good = linux_like();
            if let Ok(p) = plan(&BootConfig { ram_size: ram, kernel: &good, initrd_len: initrd, cmdline: &cmdline }) {
                if let Some(g) = p.initrd_gpa {
                    prop_assert!(g >= 0x100_6000 && g + initrd <= INITRD_END_MAX.min(ram));
                }
            }
        }
    }
}

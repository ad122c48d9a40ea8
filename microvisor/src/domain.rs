//! Building a domain: its RAM (fresh frames), its stage-2 map covering exactly that RAM,
//! its image loaded by the PVH convention, its start information, and its vCPU.

use core::fmt;

use microvisor::console::LineBuffer;
use microvisor::guest_memory::write_guest;
use microvisor::stage2::{Access, MemType, NptMap, Stage2Error};
use microvisor::svm::vmcb::{control, efer, save, Segment, Vmcb, DEFAULT_PAT};
use pvh::elf::{ElfError, ElfImage};
use pvh::start_info::{self, MemmapEntry, ModuleSpec};

use crate::arch::phys::{
    alloc_zeroed_frames, zero_frames, IdentityMemory, PhysTables, FRAMES, PAGE_SIZE,
};
use crate::arch::svm::{GuestRegs, Svm};

/// Guest-physical address of the page holding the domain's `hvm_start_info`.
pub const START_INFO_GPA: u64 = 0x1000;
/// Images are linked at or above 1 MiB; below stays free for the start info.
pub const IMAGE_MIN_GPA: u64 = 0x10_0000;
const CHUNK: u64 = 2 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    Runnable,
    /// Executed HLT; waits for an event.
    Halted,
    Stopped,
}

pub struct Vcpu {
    pub vmcb: &'static mut Vmcb,
    pub vmcb_pa: u64,
    pub regs: GuestRegs,
    pub state: VcpuState,
}

pub struct Domain {
    pub name: &'static str,
    pub id: u16,
    pub ram_size: u64,
    pub stage2: NptMap,
    pub vcpu: Vcpu,
    pub console: LineBuffer,
}

#[derive(Debug)]
pub enum BuildError {
    OutOfMemory { wanted: u64 },
    Stage2(Stage2Error),
    Image(ElfError),
    NoPvhEntry,
    StartInfo,
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfMemory { wanted } => {
                write!(f, "out of memory (wanted {wanted:#x} bytes more)")
            }
            Self::Stage2(e) => write!(f, "stage-2 map: {e}"),
            Self::Image(e) => write!(f, "image: {e}"),
            Self::NoPvhEntry => {
                f.write_str("image has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
            }
            Self::StartInfo => f.write_str("start information does not fit in its page"),
        }
    }
}

impl From<Stage2Error> for BuildError {
    fn from(e: Stage2Error) -> Self {
        Self::Stage2(e)
    }
}

impl Domain {
    /// A domain with `ram_size` bytes of zeroed RAM at guest-physical 0, and an empty vCPU.
    pub fn create(
        name: &'static str,
        id: u16,
        ram_size: u64,
        svm: &Svm,
    ) -> Result<Self, BuildError> {
        let ram_size = ram_size.next_multiple_of(CHUNK);
        let mut stage2 = NptMap::new(&mut PhysTables)?;
        let mut gpa = 0;
        while gpa < ram_size {
            // 2 MiB chunks let the stage-2 map use large pages.
            let hpa = FRAMES.lock().alloc(CHUNK / PAGE_SIZE, CHUNK).map_err(|_| {
                BuildError::OutOfMemory {
                    wanted: ram_size - gpa,
                }
            })?;
            // SAFETY: the frames were just allocated for this domain and nobody else holds them.
            unsafe { zero_frames(hpa, CHUNK / PAGE_SIZE) };
            stage2.map(
                &mut PhysTables,
                gpa,
                hpa,
                CHUNK,
                Access::READ | Access::WRITE | Access::EXEC,
                MemType::WriteBack,
            )?;
            gpa += CHUNK;
        }
        let vmcb_pa =
            alloc_zeroed_frames(1).ok_or(BuildError::OutOfMemory { wanted: PAGE_SIZE })?;
        // SAFETY: vmcb_pa is a freshly allocated, zeroed, page-aligned frame inside the
        // identity map; this vCPU owns it exclusively for the domain's lifetime.
        let vmcb = unsafe { &mut *(vmcb_pa as *mut Vmcb) };
        svm.set_standard_intercepts(vmcb);
        vmcb.write_u32(control::GUEST_ASID, id as u32 + 1);
        vmcb.write_u8(control::TLB_CONTROL, 1); // flush this ASID on the first VMRUN
        vmcb.write_u64(control::NP_ENABLE, 1);
        vmcb.write_u64(control::NESTED_CR3, stage2.root());
        Ok(Self {
            name,
            id,
            ram_size,
            stage2,
            vcpu: Vcpu {
                vmcb,
                vmcb_pa,
                regs: GuestRegs::default(),
                state: VcpuState::Stopped,
            },
            console: LineBuffer::new(),
        })
    }

    pub fn asid(&self) -> u32 {
        self.vcpu.vmcb.read_u32(control::GUEST_ASID)
    }

    /// Copy a PVH image into the domain's RAM; returns its 32-bit entry point.
    pub fn load_image(&mut self, image: &[u8]) -> Result<u32, BuildError> {
        let elf = ElfImage::parse(image).map_err(BuildError::Image)?;
        let entry = elf.pvh_entry().ok_or(BuildError::NoPvhEntry)?;
        elf.check_fits(IMAGE_MIN_GPA, self.ram_size - IMAGE_MIN_GPA)
            .map_err(BuildError::Image)?;
        for seg in elf.segments() {
            let data = elf.segment_data(seg);
            write_guest(
                &self.stage2,
                &PhysTables,
                &mut IdentityMemory,
                seg.paddr,
                data,
            )
            .map_err(|e| BuildError::Stage2(Stage2Error::NotMapped { gpa: e.gpa }))?;
            // The rest of the segment (.bss) is already zero: the RAM was zeroed at creation.
        }
        Ok(entry)
    }

    /// Map host memory read-only into the domain (e.g. the boot bundle for dom0).
    pub fn map_readonly(&mut self, gpa: u64, hpa: u64, size: u64) -> Result<(), BuildError> {
        let size = size.next_multiple_of(PAGE_SIZE);
        self.stage2.map(
            &mut PhysTables,
            gpa,
            hpa,
            size,
            Access::READ,
            MemType::WriteBack,
        )?;
        Ok(())
    }

    /// Write the start information page and put the vCPU at the PVH entry: 32-bit
    /// protected mode, paging off, flat segments, EBX = start info.
    pub fn prepare_boot(
        &mut self,
        entry: u32,
        cmdline: &[u8],
        modules: &[ModuleSpec],
    ) -> Result<(), BuildError> {
        let memmap = [MemmapEntry::new(0, self.ram_size, start_info::MEMMAP_RAM)];
        let mut page = [0u8; 4096];
        start_info::build_start_page(&mut page, START_INFO_GPA, cmdline, &memmap, modules, 0)
            .map_err(|_| BuildError::StartInfo)?;
        write_guest(
            &self.stage2,
            &PhysTables,
            &mut IdentityMemory,
            START_INFO_GPA,
            &page,
        )
        .map_err(|e| BuildError::Stage2(Stage2Error::NotMapped { gpa: e.gpa }))?;

        let v = &mut *self.vcpu.vmcb;
        v.set_segment(save::CS, Segment::flat_code32(0x08));
        for seg in [save::DS, save::ES, save::SS, save::FS, save::GS] {
            v.set_segment(seg, Segment::flat_data32(0x10));
        }
        v.set_segment(save::TR, Segment::tss32_busy());
        v.set_segment(save::LDTR, Segment::default());
        v.set_segment(save::GDTR, Segment::table(0, 0));
        v.set_segment(save::IDTR, Segment::table(0, 0));
        v.write_u8(save::CPL, 0);
        v.write_u64(save::CR0, 0x11); // PE | ET
        v.write_u64(save::CR3, 0);
        v.write_u64(save::CR4, 0);
        v.write_u64(save::EFER, efer::SVME); // VMRUN demands SVME in the guest's EFER
        v.write_u64(save::RFLAGS, 0x2);
        v.write_u64(save::DR6, 0xffff_0ff0);
        v.write_u64(save::DR7, 0x400);
        v.write_u64(save::G_PAT, DEFAULT_PAT);
        v.write_u64(save::RSP, 0);
        v.set_rax(0);
        v.set_rip(entry as u64);
        self.vcpu.regs = GuestRegs {
            rbx: START_INFO_GPA,
            ..GuestRegs::default()
        };
        self.vcpu.state = VcpuState::Runnable;
        Ok(())
    }

    /// Print one line of this domain's console output, prefixed by its name.
    pub fn console_write(&mut self, bytes: &[u8]) {
        let name = self.name;
        self.console
            .push(bytes, |line| print_domain_line(name, line));
    }

    pub fn console_flush(&mut self) {
        let name = self.name;
        self.console.flush(|line| print_domain_line(name, line));
    }
}

fn print_domain_line(name: &str, line: &[u8]) {
    use crate::arch::serial::{Serial, CONSOLE_LOCK};
    let _guard = CONSOLE_LOCK.lock();
    Serial::write_bytes(b"[");
    Serial::write_bytes(name.as_bytes());
    Serial::write_bytes(b"] ");
    Serial::write_bytes(line);
    Serial::write_bytes(b"\n");
}

//! The virtual machine control block (AMD APM vol. 2, appendix B): a 4 KiB page with a
//! control area (intercepts, exit information, nested paging) at 0x000 and the guest's
//! saved state at 0x400. Kept as bytes with named offsets: no layout can drift from the
//! manual through a mistyped padding field, and every access is bounds-checked safe code.

/// Control-area offsets.
pub mod control {
    pub const INTERCEPT_EXCEPTIONS: usize = 0x008;
    pub const INTERCEPT_MISC1: usize = 0x00c;
    pub const INTERCEPT_MISC2: usize = 0x010;
    pub const IOPM_BASE_PA: usize = 0x040;
    pub const MSRPM_BASE_PA: usize = 0x048;
    pub const GUEST_ASID: usize = 0x058;
    pub const TLB_CONTROL: usize = 0x05c;
    pub const VINTR: usize = 0x060;
    /// Bit 0: the guest is in an interrupt shadow (after STI or MOV SS).
    pub const INTERRUPT_SHADOW: usize = 0x068;
    pub const EXIT_CODE: usize = 0x070;
    pub const EXIT_INFO1: usize = 0x078;
    pub const EXIT_INFO2: usize = 0x080;
    /// EXITINTINFO: the event whose delivery the exit interrupted (EVENTINJ layout).
    pub const EXIT_INT_INFO: usize = 0x088;
    pub const NP_ENABLE: usize = 0x090;
    pub const EVENT_INJECTION: usize = 0x0a8;
    pub const NESTED_CR3: usize = 0x0b0;
}

/// State-save-area offsets (guest state loaded by VMRUN, stored by #VMEXIT).
pub mod save {
    pub const ES: usize = 0x400;
    pub const CS: usize = 0x410;
    pub const SS: usize = 0x420;
    pub const DS: usize = 0x430;
    pub const FS: usize = 0x440;
    pub const GS: usize = 0x450;
    pub const GDTR: usize = 0x460;
    pub const LDTR: usize = 0x470;
    pub const IDTR: usize = 0x480;
    pub const TR: usize = 0x490;
    pub const EFER: usize = 0x4d0;
    pub const CR4: usize = 0x548;
    pub const CR3: usize = 0x550;
    pub const CR0: usize = 0x558;
    pub const DR7: usize = 0x560;
    pub const DR6: usize = 0x568;
    pub const RFLAGS: usize = 0x570;
    pub const RIP: usize = 0x578;
    pub const RSP: usize = 0x5d8;
    pub const RAX: usize = 0x5f8;
    pub const CR2: usize = 0x640;
    pub const G_PAT: usize = 0x668;
}

/// Bits of the first miscellaneous intercept word (offset 0x00c).
pub mod misc1 {
    pub const INTR: u32 = 1 << 0;
    pub const NMI: u32 = 1 << 1;
    pub const SMI: u32 = 1 << 2;
    pub const INIT: u32 = 1 << 3;
    /// VINTR: exit when the guest is about to take the virtual interrupt in V_IRQ.
    pub const VINTR: u32 = 1 << 4;
    pub const CPUID: u32 = 1 << 18;
    pub const INVD: u32 = 1 << 22;
    pub const HLT: u32 = 1 << 24;
    pub const INVLPGA: u32 = 1 << 26;
    pub const IOIO_PROT: u32 = 1 << 27;
    pub const MSR_PROT: u32 = 1 << 28;
    pub const TASK_SWITCH: u32 = 1 << 29;
    pub const SHUTDOWN: u32 = 1 << 31;
    /// What every vCPU intercepts.
    pub const INTERCEPTED: u32 =
        INTR | NMI | SMI | INIT | CPUID | INVD | HLT | INVLPGA | IOIO_PROT | MSR_PROT | TASK_SWITCH | SHUTDOWN;
}

/// Bits of the second miscellaneous intercept word (offset 0x010).
pub mod misc2 {
    pub const VMRUN: u32 = 1 << 0;
    pub const VMMCALL: u32 = 1 << 1;
    pub const VMLOAD: u32 = 1 << 2;
    pub const VMSAVE: u32 = 1 << 3;
    pub const STGI: u32 = 1 << 4;
    pub const CLGI: u32 = 1 << 5;
    pub const SKINIT: u32 = 1 << 6;
    pub const ICEBP: u32 = 1 << 8;
    pub const MONITOR: u32 = 1 << 10;
    pub const MWAIT: u32 = 1 << 11;
    pub const MWAIT_ARMED: u32 = 1 << 12;
    pub const XSETBV: u32 = 1 << 13;
    /// What every vCPU intercepts.
    pub const INTERCEPTED: u32 =
        VMRUN | VMMCALL | VMLOAD | VMSAVE | STGI | CLGI | SKINIT | ICEBP | MONITOR | MWAIT | MWAIT_ARMED | XSETBV;
}

/// EFER bits the microvisor cares about.
pub mod efer {
    pub const SCE: u64 = 1 << 0;
    pub const LME: u64 = 1 << 8;
    pub const LMA: u64 = 1 << 10;
    pub const NXE: u64 = 1 << 11;
    pub const SVME: u64 = 1 << 12;
}

/// A segment register as the VMCB stores it: the attribute word packs descriptor bits
/// 40..47 (type, S, DPL, P) into bits 0..7 and bits 52..55 (AVL, L, D/B, G) into 8..11.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Segment {
    pub selector: u16,
    pub attrib: u16,
    pub limit: u32,
    pub base: u64,
}

impl Segment {
    /// Flat 32-bit code segment (execute/read, accessed, DB, G), as the PVH entry wants.
    pub const fn flat_code32(selector: u16) -> Self {
        Self { selector, attrib: 0xc9b, limit: 0xffff_ffff, base: 0 }
    }
    /// Flat 32-bit data segment (read/write, accessed, DB, G).
    pub const fn flat_data32(selector: u16) -> Self {
        Self { selector, attrib: 0xc93, limit: 0xffff_ffff, base: 0 }
    }
    /// A busy 32-bit TSS, which the PVH ABI asks for in TR.
    pub const fn tss32_busy() -> Self {
        Self { selector: 0, attrib: 0x8b, limit: 0x67, base: 0 }
    }
    /// A descriptor table register (only base and limit are meaningful).
    pub const fn table(base: u64, limit: u32) -> Self {
        Self { selector: 0, attrib: 0, limit, base }
    }
}

/// Power-on value of the guest PAT; VMRUN rejects reserved memory types in G_PAT.
pub const DEFAULT_PAT: u64 = 0x0007_0406_0007_0406;

/// One VMCB page.
#[repr(C, align(4096))]
pub struct Vmcb {
    bytes: [u8; 4096],
}

impl Vmcb {
    pub const fn zeroed() -> Self {
        Self { bytes: [0; 4096] }
    }

    pub fn read_u64(&self, offset: usize) -> u64 {
        u64::from_le_bytes(self.bytes[offset..offset + 8].try_into().unwrap_or_default())
    }
    pub fn write_u64(&mut self, offset: usize, value: u64) {
        self.bytes[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
    }
    pub fn read_u32(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.bytes[offset..offset + 4].try_into().unwrap_or_default())
    }
    pub fn write_u32(&mut self, offset: usize, value: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }
    pub fn write_u16(&mut self, offset: usize, value: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }
    pub fn write_u8(&mut self, offset: usize, value: u8) {
        self.bytes[offset] = value;
    }

    pub fn set_segment(&mut self, offset: usize, seg: Segment) {
        self.write_u16(offset, seg.selector);
        self.write_u16(offset + 2, seg.attrib);
        self.write_u32(offset + 4, seg.limit);
        self.write_u64(offset + 8, seg.base);
    }

    pub fn segment(&self, offset: usize) -> Segment {
        Segment {
            selector: u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]]),
            attrib: u16::from_le_bytes([self.bytes[offset + 2], self.bytes[offset + 3]]),
            limit: self.read_u32(offset + 4),
            base: self.read_u64(offset + 8),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_match_the_manual() {
        // Spot checks against AMD APM vol. 2 table B-1/B-2.
        assert_eq!(control::EXIT_CODE, 0x70);
        assert_eq!(control::NESTED_CR3, 0xb0);
        assert_eq!(save::RIP, 0x578);
        assert_eq!(save::RAX, 0x5f8);
        assert_eq!(save::G_PAT, 0x668);
        assert_eq!(core::mem::size_of::<Vmcb>(), 4096);
        assert_eq!(core::mem::align_of::<Vmcb>(), 4096);
    }

    #[test]
    fn segment_round_trip() {
        let mut v = Vmcb::zeroed();
        let s = Segment::flat_code32(0x8);
        v.set_segment(save::CS, s);
        assert_eq!(v.segment(save::CS), s);
        assert_eq!(v.read_u64(save::CS + 8), 0);
    }
}

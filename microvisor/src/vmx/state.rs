//! A vCPU's VMCS contents: the controls and the PVH entry state a new vCPU starts with, the
//! architectural state to and from the neutral [`ipc_spec::exit::VcpuState`], EFER, and the
//! MSR bitmap of VMs. All through the [`Vmcs`] accessor, so all host-tested.

use ipc_spec::exit::{state, Segment as ArchSegment, VcpuState as ArchState};

use super::controls::{entry, Controls};
use super::vmcs::{self as f, seg, Vmcs};
use crate::kernel::{Regs, VcpuBoot};

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_PG: u64 = 1 << 31;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const RFLAGS_IF: u64 = 1 << 9;
/// Power-on PAT (WB, WT, UC-, UC twice): entry refuses reserved memory types (26.3.1.2).
const DEFAULT_PAT: u64 = 0x0007_0406_0007_0406;
/// Access rights bit 16: the segment is unusable (SDM 24.4.1, table 24-2).
const UNUSABLE: u64 = 1 << 16;
/// The exception bitmap: #DF and #MC exit, as the SVM side intercepts them.
const EXCEPTIONS: u64 = (1 << 8) | (1 << 18);
/// Interruptibility state: blocking by STI (bit 0), by MOV SS (bit 1) (table 24-3).
const BLOCKING_BY_STI: u64 = 1;
const BLOCKING_BY_MOV_SS: u64 = 2;

/// The segments in the order of the exit ABI's SEG group: CS, SS, DS, ES, FS, GS, TR, LDTR.
const SEGMENTS: [u32; 8] = [seg::CS, seg::SS, seg::DS, seg::ES, seg::FS, seg::GS, seg::TR, seg::LDTR];

/// The VMX access-rights word of a segment whose attributes are in the ABI's (VMCB)
/// packing: descriptor bits 40..47 stay in bits 0..7, bits 52..55 move from 8..11 to
/// 12..15; a segment that is not present is marked unusable.
pub fn access_rights(attrib: u16) -> u64 {
    let a = attrib as u64;
    if a & 0x80 == 0 {
        return UNUSABLE;
    }
    (a & 0xff) | (a & 0xf00) << 4
}

/// The ABI packing of a VMX access-rights word (an unusable segment reads as not present).
pub fn attributes(ar: u64) -> u16 {
    if ar & UNUSABLE != 0 {
        return 0;
    }
    ((ar & 0xff) | (ar >> 4 & 0xf00)) as u16
}

fn set_segment(v: &mut impl Vmcs, i: u32, s: ArchSegment) {
    v.write(seg::selector(i), s.selector as u64);
    v.write(seg::access(i), access_rights(s.attrib));
    v.write(seg::limit(i), s.limit as u64);
    v.write(seg::base(i), s.base);
}

/// The bitmaps, stage-2 root and TLB tag a vCPU runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tables {
    pub io_bitmap_a: u64,
    pub io_bitmap_b: u64,
    pub msr_bitmap: u64,
    /// EPTP (SDM 24.6.11): the PML4's address, memory type WB (6) in bits 2:0, a 4-level
    /// walk (3) in bits 5:3, accessed/dirty flags off (bit 6 clear).
    pub eptp: u64,
    pub vpid: u16,
}

impl Tables {
    pub fn eptp(root: u64) -> u64 {
        (root & !0xfff) | 3 << 3 | 6
    }
}

/// Write a new vCPU's controls and its PVH entry state: 32-bit protected mode, paging off,
/// flat segments, a busy 32-bit TSS (the same state the SVM side builds). RIP and EBX come
/// from the kernel's register file at every entry.
pub fn init(v: &mut impl Vmcs, c: &Controls, t: &Tables, boot: &VcpuBoot) {
    v.write(f::PIN_CONTROLS, c.pin as u64);
    v.write(f::PROC_CONTROLS, c.proc1 as u64);
    v.write(f::PROC_CONTROLS2, c.proc2 as u64);
    v.write(f::EXIT_CONTROLS, c.exit as u64);
    v.write(f::ENTRY_CONTROLS, c.entry as u64);
    v.write(f::EXCEPTION_BITMAP, EXCEPTIONS);
    v.write(f::IO_BITMAP_A, t.io_bitmap_a);
    v.write(f::IO_BITMAP_B, t.io_bitmap_b);
    v.write(f::MSR_BITMAP, t.msr_bitmap);
    v.write(f::EPT_POINTER, t.eptp);
    v.write(f::VPID, t.vpid as u64);
    v.write(f::ENTRY_INTERRUPTION_INFO, 0);
    // The CR0 and CR4 bits VMX operation fixes (NE, VMXE) are the microvisor's: the guest
    // reads its own value from the read shadow and a write changing them exits (SDM 25.3,
    // "guest/host masks and read shadows").
    v.write(f::CR0_MASK, c.cr0_fixed.0 & !(CR0_PE | CR0_PG));
    v.write(f::CR4_MASK, c.cr4_fixed.0);
    let flat = |selector, attrib| ArchSegment { selector, attrib, limit: 0xffff_ffff, base: 0 };
    set_segment(v, seg::CS, flat(0x08, 0xc9b));
    for s in [seg::SS, seg::DS, seg::ES, seg::FS, seg::GS] {
        set_segment(v, s, flat(0x10, 0xc93));
    }
    set_segment(v, seg::TR, ArchSegment { selector: 0, attrib: 0x8b, limit: 0x67, base: 0 });
    set_segment(v, seg::LDTR, ArchSegment::default());
    for (base, limit) in [(f::GUEST_GDTR_BASE, f::GUEST_GDTR_LIMIT), (f::GUEST_IDTR_BASE, f::GUEST_IDTR_LIMIT)] {
        v.write(base, 0);
        v.write(limit, 0);
    }
    set_crs(v, c, 0x11, 0, 0); // PE | ET
    v.write(f::GUEST_EFER, 0);
    v.write(f::GUEST_PAT, DEFAULT_PAT);
    v.write(f::GUEST_DR7, 0x400);
    v.write(f::GUEST_RFLAGS, 0x2);
    v.write(f::GUEST_RSP, 0);
    v.write(f::GUEST_RIP, boot.entry);
    v.write(f::GUEST_INTERRUPTIBILITY, 0);
    // Guest IA32_DEBUGCTL, activity state, pending debug exceptions, SYSENTER_CS, ESP,
    // EIP: all zero (active, nothing pending).
    for field in [0x2802, 0x4826, 0x6822, 0x482a, 0x6824, 0x6826] {
        v.write(field, 0);
    }
    // No shadow VMCS: the link pointer must be all ones (SDM 26.3.1.5).
    v.write(f::VMCS_LINK_POINTER, u64::MAX);
}

/// CR0, CR3 and CR4 as the guest wants them: the hardware gets the fixed bits, the read
/// shadows the guest's own values.
fn set_crs(v: &mut impl Vmcs, c: &Controls, cr0: u64, cr3: u64, cr4: u64) {
    v.write(f::GUEST_CR0, c.guest_cr0(cr0));
    v.write(f::CR0_SHADOW, cr0);
    v.write(f::GUEST_CR3, cr3);
    v.write(f::GUEST_CR4, c.guest_cr4(cr4));
    v.write(f::CR4_SHADOW, cr4);
}

/// A control register as the guest sees it: its masked bits from the read shadow.
fn guest_view(v: &impl Vmcs, cr: u32, mask: u32, shadow: u32) -> u64 {
    let m = v.read(mask);
    (v.read(cr) & !m) | (v.read(shadow) & m)
}

/// Fill `s` from the VMCS, `regs` (whose RSP and RFLAGS are synced from it) and the
/// guest's CR2 (not in the VMCS: the world switch keeps it).
pub fn read(v: &impl Vmcs, regs: &mut Regs, cr2: u64, s: &mut ArchState) {
    regs.rsp = v.read(f::GUEST_RSP);
    regs.rflags = v.read(f::GUEST_RFLAGS);
    s.gpr = regs.gprs();
    (s.rip, s.rflags) = (regs.rip, regs.rflags);
    s.shadow = (v.read(f::GUEST_INTERRUPTIBILITY) & (BLOCKING_BY_STI | BLOCKING_BY_MOV_SS) != 0) as u64;
    s.cr0 = guest_view(v, f::GUEST_CR0, f::CR0_MASK, f::CR0_SHADOW);
    s.cr2 = cr2;
    s.cr3 = v.read(f::GUEST_CR3);
    s.cr4 = guest_view(v, f::GUEST_CR4, f::CR4_MASK, f::CR4_SHADOW);
    s.efer = v.read(f::GUEST_EFER);
    for (out, &i) in s.seg.iter_mut().zip(SEGMENTS.iter()) {
        *out = ArchSegment {
            selector: v.read(seg::selector(i)) as u16,
            attrib: attributes(v.read(seg::access(i))),
            limit: v.read(seg::limit(i)) as u32,
            base: v.read(seg::base(i)),
        };
    }
    s.gdtr = (v.read(f::GUEST_GDTR_BASE), v.read(f::GUEST_GDTR_LIMIT));
    s.idtr = (v.read(f::GUEST_IDTR_BASE), v.read(f::GUEST_IDTR_LIMIT));
    // The event the exit interrupted: the IDT-vectoring information has the EVENTINJ
    // layout in its low 32 bits (table 24-16); the error code goes above.
    let info = v.read(f::IDT_VECTORING_INFO);
    let error = if info & (1 << 11) != 0 { v.read(f::IDT_VECTORING_ERROR) } else { 0 };
    s.event = if info & (1 << 31) != 0 { (info & 0x8000_0fff) | error << 32 } else { 0 };
}

/// Write the groups `mask` of `s` into the VMCS and `regs`; returns the guest's CR2 if
/// the CR group was written. Anything the hardware refuses shows as an `Invalid` exit.
pub fn write(v: &mut impl Vmcs, c: &Controls, regs: &mut Regs, mask: u16, s: &ArchState) -> Option<u64> {
    if mask & state::GPR != 0 {
        regs.set_gprs(&s.gpr);
        v.write(f::GUEST_RSP, s.gpr[ipc_spec::exit::gpr::RSP]);
    }
    if mask & state::RIP != 0 {
        (regs.rip, regs.rflags) = (s.rip, s.rflags | 2);
        v.write(f::GUEST_RIP, s.rip);
        v.write(f::GUEST_RFLAGS, regs.rflags);
        // Blocking by STI requires RFLAGS.IF (SDM 26.3.1.5); a shadow with IF clear can
        // only be MOV SS's.
        let shadow = match (s.shadow & 1 != 0, regs.rflags & RFLAGS_IF != 0) {
            (false, _) => 0,
            (true, true) => BLOCKING_BY_STI,
            (true, false) => BLOCKING_BY_MOV_SS,
        };
        v.write(f::GUEST_INTERRUPTIBILITY, shadow);
    }
    let mut cr2 = None;
    if mask & state::CR != 0 {
        set_crs(v, c, s.cr0, s.cr3, s.cr4);
        write_efer(v, s.efer);
        cr2 = Some(s.cr2);
    }
    if mask & state::SEG != 0 {
        for (g, &i) in s.seg.iter().zip(SEGMENTS.iter()) {
            set_segment(v, i, *g);
        }
    }
    if mask & state::DT != 0 {
        v.write(f::GUEST_GDTR_BASE, s.gdtr.0);
        v.write(f::GUEST_GDTR_LIMIT, s.gdtr.1);
        v.write(f::GUEST_IDTR_BASE, s.idtr.0);
        v.write(f::GUEST_IDTR_LIMIT, s.idtr.1);
    }
    cr2
}

/// EFER and the "IA-32e mode guest" entry control that must equal its LMA bit when the
/// entry loads EFER (SDM 26.2.4).
fn write_efer(v: &mut impl Vmcs, efer: u64) {
    v.write(f::GUEST_EFER, efer);
    let ctl = v.read(f::ENTRY_CONTROLS) & !(entry::IA32E_MODE_GUEST as u64);
    let ia32e = if efer & EFER_LMA != 0 { entry::IA32E_MODE_GUEST as u64 } else { 0 };
    v.write(f::ENTRY_CONTROLS, ctl | ia32e);
}

/// A guest's WRMSR to EFER: long mode, NX and SYSCALL may be enabled; anything else is
/// refused (#GP). LMA is the CPU's to change (when paging is turned on with LME set).
pub fn set_efer(v: &mut impl Vmcs, value: u64) -> bool {
    if value & !(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE) != 0 {
        return false;
    }
    let lma = v.read(f::GUEST_EFER) & EFER_LMA;
    write_efer(v, (value & (EFER_SCE | EFER_LME | EFER_NXE)) | lma);
    true
}

/// MSRs the VMCS switches with the guest (its guest-state area holds them: SDM 24.4.1 and
/// 24.4.2): a VM reads and writes them directly. (KernelGSbase, STAR, LSTAR, CSTAR and
/// SFMASK are not in the VMCS: they stay intercepted and go to the VMM.)
pub const GUEST_OWNED_MSRS: [u32; 5] = [0x174, 0x175, 0x176, 0xc000_0100, 0xc000_0101];

/// Stop intercepting reads and writes of `msr` in a 4 KiB MSR bitmap (SDM 24.6.9: read
/// bitmaps for MSRs 0..0x1fff and 0xc000_0000..0xc000_1fff at 0 and 1024, write bitmaps
/// at 2048 and 3072). False for an MSR the bitmap does not cover.
pub fn msr_bitmap_allow(map: &mut [u8], msr: u32) -> bool {
    let (offset, index) = match msr {
        0..=0x1fff => (0, msr),
        0xc000_0000..=0xc000_1fff => (1024, msr - 0xc000_0000),
        _ => return false,
    };
    for half in [0, 2048] {
        match map.get_mut(half + offset + index as usize / 8) {
            Some(byte) => *byte &= !(1 << (index % 8)),
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmx::vmcs::FakeVmcs;
    use crate::vmx_caps::tests::skylake;

    fn new_vcpu() -> (FakeVmcs, Controls) {
        let c = Controls::compute(&skylake()).unwrap();
        let t = Tables {
            io_bitmap_a: 0x1000,
            io_bitmap_b: 0x2000,
            msr_bitmap: 0x3000,
            eptp: Tables::eptp(0x5000),
            vpid: 3,
        };
        let mut v = FakeVmcs::default();
        init(&mut v, &c, &t, &VcpuBoot { entry: 0x10_0000, rbx: 0x1000, domain: 2, stage2_root: 0x5000, vm: false });
        (v, c)
    }

    #[test]
    fn a_new_vcpu_is_in_pvh_entry_state() {
        let (v, _) = new_vcpu();
        assert_eq!(v.read(f::EPT_POINTER), 0x501e, "WB, 4-level walk, no A/D");
        assert_eq!(v.read(f::VPID), 3);
        assert_eq!(v.read(f::GUEST_CR0), 0x31, "NE set underneath");
        assert_eq!(v.read(f::CR0_SHADOW), 0x11);
        assert_eq!(v.read(f::GUEST_CR4), 0x2000, "VMXE set underneath");
        assert_eq!(v.read(f::CR4_SHADOW), 0);
        assert_eq!(v.read(seg::access(seg::CS)), 0xc09b);
        assert_eq!(v.read(seg::access(seg::TR)), 0x8b);
        assert_eq!(v.read(seg::access(seg::LDTR)), UNUSABLE);
        assert_eq!(v.read(f::VMCS_LINK_POINTER), u64::MAX);
        assert_eq!(v.read(f::GUEST_RIP), 0x10_0000);
        let mut s = ArchState::default();
        read(&v, &mut Regs::default(), 0, &mut s);
        assert_eq!((s.cr0, s.cr4), (0x11, 0), "the guest sees its own CR0 and CR4");
        assert_eq!(s.seg[0], ArchSegment { selector: 8, attrib: 0xc9b, limit: 0xffff_ffff, base: 0 });
    }

    #[test]
    fn state_round_trips_through_the_vmcs() {
        let (mut v, c) = new_vcpu();
        let mut regs = Regs { rax: 1, rcx: 2, r15: 15, rip: 0x1000, ..Regs::default() };
        let mut s = ArchState::default();
        read(&v, &mut regs, 0, &mut s);
        s.gpr[4] = 0x7000;
        (s.rip, s.rflags, s.shadow) = (0x2000, 0x202, 1);
        (s.cr0, s.cr2, s.cr3, s.cr4, s.efer) = (0x8000_0011, 0xdead, 0x5000, 0x20, 0x500);
        s.seg[0] = ArchSegment { selector: 8, attrib: 0xa9b, limit: 0xffff_ffff, base: 0 };
        s.seg[3] = ArchSegment::default();
        s.gdtr = (0x3000, 0x27);
        assert_eq!(write(&mut v, &c, &mut regs, state::ALL, &s), Some(0xdead));
        assert_eq!(v.read(seg::access(seg::CS)), 0xa09b, "L bit in 13");
        assert_eq!(v.read(seg::access(seg::ES)), UNUSABLE);
        assert_eq!(v.read(f::GUEST_CR0), 0x8000_0031);
        assert_eq!(v.read(f::GUEST_CR4), 0x2020);
        assert_eq!(v.read(f::GUEST_INTERRUPTIBILITY), BLOCKING_BY_STI);
        assert_ne!(v.read(f::ENTRY_CONTROLS) & entry::IA32E_MODE_GUEST as u64, 0, "LMA: IA-32e mode guest");
        assert_eq!((regs.rsp, regs.rip), (0x7000, 0x2000));
        let mut back = ArchState::default();
        read(&v, &mut regs, 0xdead, &mut back);
        assert_eq!(back, s);
        // A shadow with IF clear is MOV SS's.
        s.rflags = 0x2;
        write(&mut v, &c, &mut regs, state::RIP, &s);
        assert_eq!(v.read(f::GUEST_INTERRUPTIBILITY), BLOCKING_BY_MOV_SS);
    }

    #[test]
    fn efer_writes() {
        let (mut v, _) = new_vcpu();
        assert!(set_efer(&mut v, EFER_LME | EFER_SCE));
        assert_eq!(v.read(f::GUEST_EFER), EFER_LME | EFER_SCE);
        assert_eq!(v.read(f::ENTRY_CONTROLS) & entry::IA32E_MODE_GUEST as u64, 0, "LMA is the CPU's");
        assert!(!set_efer(&mut v, 1 << 12), "SVME");
        v.write(f::GUEST_EFER, EFER_LME | EFER_LMA);
        assert!(set_efer(&mut v, EFER_LME | EFER_NXE));
        assert_eq!(v.read(f::GUEST_EFER), EFER_LME | EFER_LMA | EFER_NXE, "LMA kept");
    }

    #[test]
    fn access_rights_conversion() {
        for attrib in [0xc9b, 0xa9b, 0xc93, 0x8b, 0x82, 0xf3] {
            assert_eq!(attributes(access_rights(attrib)), attrib);
        }
        assert_eq!(access_rights(0x13), UNUSABLE, "not present");
        assert_eq!(attributes(UNUSABLE | 0x93), 0);
    }

    #[test]
    fn msr_bitmap_bits() {
        let mut map = [0xffu8; 4096];
        for m in GUEST_OWNED_MSRS {
            assert!(msr_bitmap_allow(&mut map, m));
        }
        // SYSENTER_CS (0x174): byte 0x2e bit 4, read and write halves.
        assert_eq!(map[0x2e] & 0x10, 0);
        assert_eq!(map[2048 + 0x2e] & 0x10, 0);
        // FS base (0xc000_0100): byte 1024 + 0x20, bit 0.
        assert_eq!(map[1024 + 0x20] & 1, 0);
        assert_eq!(map[3072 + 0x20] & 3, 0, "FS and GS base writes");
        assert!(!msr_bitmap_allow(&mut map, 0x4000_0000));
        assert_eq!(map.iter().filter(|b| **b != 0xff).count(), 4);
    }
}

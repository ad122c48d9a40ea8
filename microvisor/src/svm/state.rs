//! A vCPU's architectural state between the VMCB and the neutral
//! [`ipc_spec::exit::VcpuState`], and the MSR permission map of VMs.

use ipc_spec::exit::{state, Segment as ArchSegment, VcpuState as ArchState};

use super::vmcb::{control, efer, save, Segment, Vmcb};
use crate::kernel::Regs;

/// VMCB offsets of the segments in the order of the exit ABI's SEG group.
const SEGMENTS: [usize; 8] = [save::CS, save::SS, save::DS, save::ES, save::FS, save::GS, save::TR, save::LDTR];
/// EXITINTINFO: the event whose delivery the exit interrupted (APM 15.7.2).
const EXIT_INT_INFO: usize = 0x088;
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_FIXED: u64 = 1 << 1;

/// Fill `s` from the VMCB and `regs` (whose RSP and RFLAGS are synced from the VMCB).
pub fn read(vmcb: &Vmcb, regs: &mut Regs, s: &mut ArchState) {
    regs.rsp = vmcb.read_u64(save::RSP);
    regs.rflags = vmcb.read_u64(save::RFLAGS);
    s.gpr = regs.gprs();
    (s.rip, s.rflags) = (regs.rip, regs.rflags);
    s.shadow = vmcb.read_u64(control::INTERRUPT_SHADOW) & 1;
    s.cr0 = vmcb.read_u64(save::CR0);
    s.cr2 = vmcb.read_u64(save::CR2);
    s.cr3 = vmcb.read_u64(save::CR3);
    s.cr4 = vmcb.read_u64(save::CR4);
    // SVME is the microvisor's, not the guest's.
    s.efer = vmcb.read_u64(save::EFER) & !efer::SVME;
    for (out, &at) in s.seg.iter_mut().zip(SEGMENTS.iter()) {
        let g = vmcb.segment(at);
        *out = ArchSegment { selector: g.selector, attrib: g.attrib, limit: g.limit, base: g.base };
    }
    let table = |at: usize| (vmcb.read_u64(at + 8), vmcb.read_u32(at + 4) as u64);
    (s.gdtr, s.idtr) = (table(save::GDTR), table(save::IDTR));
    s.event = vmcb.read_u64(EXIT_INT_INFO);
}

/// Write the groups `mask` of `s` into the VMCB and `regs`. EFER keeps SVME (VMRUN
/// requires it); anything else the hardware refuses shows as an `Invalid` exit.
pub fn write(vmcb: &mut Vmcb, regs: &mut Regs, mask: u16, s: &ArchState) {
    if mask & state::GPR != 0 {
        regs.set_gprs(&s.gpr);
        vmcb.write_u64(save::RSP, s.gpr[ipc_spec::exit::gpr::RSP]);
        vmcb.write_u64(save::RAX, regs.rax);
    }
    if mask & state::RIP != 0 {
        (regs.rip, regs.rflags) = (s.rip, s.rflags | RFLAGS_FIXED);
        vmcb.write_u64(save::RIP, s.rip);
        vmcb.write_u64(save::RFLAGS, regs.rflags);
        vmcb.write_u64(control::INTERRUPT_SHADOW, s.shadow & 1);
    }
    if mask & state::CR != 0 {
        vmcb.write_u64(save::CR0, s.cr0);
        vmcb.write_u64(save::CR2, s.cr2);
        vmcb.write_u64(save::CR3, s.cr3);
        vmcb.write_u64(save::CR4, s.cr4);
        vmcb.write_u64(save::EFER, s.efer | efer::SVME);
    }
    if mask & state::SEG != 0 {
        for (g, &at) in s.seg.iter().zip(SEGMENTS.iter()) {
            vmcb.set_segment(at, Segment { selector: g.selector, attrib: g.attrib, limit: g.limit, base: g.base });
        }
    }
    if mask & state::DT != 0 {
        vmcb.set_segment(save::GDTR, Segment::table(s.gdtr.0, s.gdtr.1 as u32));
        vmcb.set_segment(save::IDTR, Segment::table(s.idtr.0, s.idtr.1 as u32));
    }
}

/// MSRs that VMLOAD/VMSAVE switch with the guest (APM 15.5.2): a VM reads and writes
/// them directly; the world switch keeps them per vCPU.
pub const GUEST_OWNED_MSRS: [u32; 10] = [
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0100, // FS.base
    0xc000_0101, // GS.base
    0xc000_0102, // KernelGSbase
];

/// Stop intercepting reads and writes of `msr` in an MSR permission map (8 KiB: two bits
/// per MSR, read then write; MSRs 0..0x1fff at byte 0, 0xc000_0000.. at 0x800,
/// 0xc001_0000.. at 0x1000; APM 15.11). False for an MSR the map does not cover.
pub fn msrpm_allow(map: &mut [u8], msr: u32) -> bool {
    let (base, offset) = match msr {
        0..=0x1fff => (0, 0),
        0xc000_0000..=0xc000_1fff => (0xc000_0000, 0x800),
        0xc001_0000..=0xc001_1fff => (0xc001_0000, 0x1000),
        _ => return false,
    };
    let bit = (msr - base) as usize * 2;
    match map.get_mut(offset + bit / 8) {
        Some(byte) => {
            *byte &= !(0b11 << (bit % 8));
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_the_vmcb() {
        let mut vmcb = Vmcb::zeroed();
        let mut regs = Regs { rax: 1, rcx: 2, r15: 15, rip: 0x1000, ..Regs::default() };
        let mut s = ArchState::default();
        read(&vmcb, &mut regs, &mut s);
        s.gpr[4] = 0x7000; // RSP
        (s.rip, s.rflags, s.cr0, s.cr3, s.efer) = (0x2000, 0x202, 0x8000_0011, 0x5000, 0x500);
        s.seg[0] = ArchSegment { selector: 8, attrib: 0xa9b, limit: 0xffff_ffff, base: 0 };
        s.gdtr = (0x3000, 0x27);
        write(&mut vmcb, &mut regs, state::ALL, &s);
        assert_eq!(vmcb.read_u64(save::EFER), 0x500 | efer::SVME, "SVME stays set");
        assert_eq!((regs.rsp, regs.rip, vmcb.read_u64(save::RIP)), (0x7000, 0x2000, 0x2000));
        let mut back = ArchState::default();
        read(&vmcb, &mut regs, &mut back);
        assert_eq!(back, s, "and the guest never sees SVME");
    }

    #[test]
    fn msr_map_bits() {
        let mut map = [0xffu8; 0x2000];
        assert!(msrpm_allow(&mut map, 0xc000_0082));
        // LSTAR is MSR 0x82 of the second range: bits 0x104, 0x105 from byte 0x800.
        assert_eq!(map[0x800 + 0x104 / 8], !(0b11 << 4));
        assert!(msrpm_allow(&mut map, 0x174));
        assert_eq!(map[0x174 * 2 / 8], !0b11);
        assert!(!msrpm_allow(&mut map, 0x4000_0000));
        for m in GUEST_OWNED_MSRS {
            assert!(msrpm_allow(&mut map, m));
        }
        assert_eq!(map.iter().filter(|b| **b != 0xff).count(), 4, "only those MSRs' bytes changed");
    }
}

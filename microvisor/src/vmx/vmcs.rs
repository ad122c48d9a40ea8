//! VMCS field encodings (SDM vol. 3 appendix B) and the accessor every VMCS use goes
//! through: VMREAD/VMWRITE of the current VMCS on the machine, a map in the host tests.

/// Read and write fields of one VMCS by their encoding.
pub trait Vmcs {
    fn read(&self, field: u32) -> u64;
    fn write(&mut self, field: u32, value: u64);
}

// 16-bit control and host-state fields (B.1).
pub const VPID: u32 = 0x0000;
/// Host selectors ES, CS, SS, DS, FS, GS, TR at 0x0c00 + 2 * index.
pub const HOST_ES_SELECTOR: u32 = 0x0c00;
pub const HOST_TR_SELECTOR: u32 = 0x0c0c;

// 64-bit fields (B.2).
pub const IO_BITMAP_A: u32 = 0x2000;
pub const IO_BITMAP_B: u32 = 0x2002;
pub const MSR_BITMAP: u32 = 0x2004;
pub const EPT_POINTER: u32 = 0x201a;
pub const GUEST_PHYSICAL_ADDRESS: u32 = 0x2400;
pub const VMCS_LINK_POINTER: u32 = 0x2800;
pub const GUEST_PAT: u32 = 0x2804;
pub const GUEST_EFER: u32 = 0x2806;
pub const HOST_PAT: u32 = 0x2c00;
pub const HOST_EFER: u32 = 0x2c02;

// 32-bit fields (B.3).
pub const PIN_CONTROLS: u32 = 0x4000;
pub const PROC_CONTROLS: u32 = 0x4002;
pub const EXCEPTION_BITMAP: u32 = 0x4004;
pub const EXIT_CONTROLS: u32 = 0x400c;
pub const ENTRY_CONTROLS: u32 = 0x4012;
pub const ENTRY_INTERRUPTION_INFO: u32 = 0x4016;
pub const ENTRY_EXCEPTION_ERROR: u32 = 0x4018;
pub const ENTRY_INSTRUCTION_LENGTH: u32 = 0x401a;
pub const PROC_CONTROLS2: u32 = 0x401e;
pub const VM_INSTRUCTION_ERROR: u32 = 0x4400;
pub const EXIT_REASON: u32 = 0x4402;
pub const EXIT_INTERRUPTION_INFO: u32 = 0x4404;
pub const EXIT_INTERRUPTION_ERROR: u32 = 0x4406;
pub const IDT_VECTORING_INFO: u32 = 0x4408;
pub const IDT_VECTORING_ERROR: u32 = 0x440a;
pub const EXIT_INSTRUCTION_LENGTH: u32 = 0x440c;
pub const GUEST_GDTR_LIMIT: u32 = 0x4810;
pub const GUEST_IDTR_LIMIT: u32 = 0x4812;
/// Bit 0 blocking by STI, bit 1 blocking by MOV SS (SDM 24.4.2, table 24-3).
pub const GUEST_INTERRUPTIBILITY: u32 = 0x4824;
pub const PREEMPTION_TIMER_VALUE: u32 = 0x482e;
pub const HOST_SYSENTER_CS: u32 = 0x4c00;

// Natural-width fields (B.4).
pub const CR0_MASK: u32 = 0x6000;
pub const CR4_MASK: u32 = 0x6002;
pub const CR0_SHADOW: u32 = 0x6004;
pub const CR4_SHADOW: u32 = 0x6006;
pub const EXIT_QUALIFICATION: u32 = 0x6400;
pub const GUEST_CR0: u32 = 0x6800;
pub const GUEST_CR3: u32 = 0x6802;
pub const GUEST_CR4: u32 = 0x6804;
pub const GUEST_GDTR_BASE: u32 = 0x6816;
pub const GUEST_IDTR_BASE: u32 = 0x6818;
pub const GUEST_DR7: u32 = 0x681a;
pub const GUEST_RSP: u32 = 0x681c;
pub const GUEST_RIP: u32 = 0x681e;
pub const GUEST_RFLAGS: u32 = 0x6820;
pub const HOST_CR0: u32 = 0x6c00;
pub const HOST_CR3: u32 = 0x6c02;
pub const HOST_CR4: u32 = 0x6c04;
pub const HOST_FS_BASE: u32 = 0x6c06;
pub const HOST_GS_BASE: u32 = 0x6c08;
pub const HOST_TR_BASE: u32 = 0x6c0a;
pub const HOST_GDTR_BASE: u32 = 0x6c0c;
pub const HOST_IDTR_BASE: u32 = 0x6c0e;
pub const HOST_RSP: u32 = 0x6c14;
pub const HOST_RIP: u32 = 0x6c16;

/// The guest segment registers in VMCS order (ES, CS, SS, DS, FS, GS, LDTR, TR): register
/// `i` has its selector at 0x0800 + 2i, limit at 0x4800 + 2i, access rights at 0x4814 + 2i
/// and base at 0x6806 + 2i (appendix B).
pub mod seg {
    pub const ES: u32 = 0;
    pub const CS: u32 = 1;
    pub const SS: u32 = 2;
    pub const DS: u32 = 3;
    pub const FS: u32 = 4;
    pub const GS: u32 = 5;
    pub const LDTR: u32 = 6;
    pub const TR: u32 = 7;
    pub const fn selector(i: u32) -> u32 {
        0x0800 + 2 * i
    }
    pub const fn limit(i: u32) -> u32 {
        0x4800 + 2 * i
    }
    pub const fn access(i: u32) -> u32 {
        0x4814 + 2 * i
    }
    pub const fn base(i: u32) -> u32 {
        0x6806 + 2 * i
    }
}

/// A VMCS kept in a map: what the host tests run the VMX logic against.
#[cfg(test)]
#[derive(Default, Debug)]
pub struct FakeVmcs(pub std::collections::BTreeMap<u32, u64>);

#[cfg(test)]
impl Vmcs for FakeVmcs {
    fn read(&self, field: u32) -> u64 {
        self.0.get(&field).copied().unwrap_or(0)
    }
    fn write(&mut self, field: u32, value: u64) {
        // A field's width is in bits 14:13 of its encoding (B.1-B.4): 16, 64, 32 bits,
        // natural width. The hardware drops what does not fit; so does the fake.
        let value = match (field >> 13) & 3 {
            0 => value & 0xffff,
            2 => value & 0xffff_ffff,
            _ => value,
        };
        self.0.insert(field, value);
    }
}

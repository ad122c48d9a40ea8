//! The VM-execution, exit and entry controls, computed from the capability MSRs.
//!
//! SDM vol. 3 appendix A.3-A.5: in each control MSR, bits 31:0 are the allowed 0-settings
//! (a bit set there must be 1 in the control) and bits 63:32 the allowed 1-settings (a bit
//! clear there must be 0). A control the microvisor needs but the CPU cannot set is an
//! error naming it; optional ones are set where allowed.

use crate::vmx_caps::VmxMsrs;

/// Pin-based controls (SDM 24.6.1).
pub mod pin {
    pub const EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
    pub const NMI_EXITING: u32 = 1 << 3;
    /// An exit when the VMX-preemption timer counts down to 0 (exit reason 52). Used as a
    /// second tick: Bochs 2.7 makes no external-interrupt exit while the guest runs with
    /// RFLAGS.IF clear (it leaves the host's interrupt masking in place across the entry),
    /// so a domain spinning with interrupts off was never preempted. The timer restarts
    /// at every entry (its value is not saved on exit).
    pub const PREEMPTION_TIMER: u32 = 1 << 6;
}

/// Primary processor-based controls (SDM 24.6.2, table 24-6).
pub mod proc1 {
    pub const INTERRUPT_WINDOW_EXITING: u32 = 1 << 2;
    pub const HLT_EXITING: u32 = 1 << 7;
    pub const MWAIT_EXITING: u32 = 1 << 10;
    pub const CR3_LOAD_EXITING: u32 = 1 << 15;
    pub const CR3_STORE_EXITING: u32 = 1 << 16;
    pub const USE_IO_BITMAPS: u32 = 1 << 25;
    pub const USE_MSR_BITMAPS: u32 = 1 << 28;
    pub const MONITOR_EXITING: u32 = 1 << 29;
    pub const SECONDARY: u32 = 1 << 31;
}

/// Secondary processor-based controls (SDM 24.6.2, table 24-7).
pub mod proc2 {
    pub const EPT: u32 = 1 << 1;
    pub const RDTSCP: u32 = 1 << 3;
    pub const VPID: u32 = 1 << 5;
    pub const UNRESTRICTED_GUEST: u32 = 1 << 7;
    pub const INVPCID: u32 = 1 << 12;
    pub const XSAVES: u32 = 1 << 20;
}

/// VM-exit controls (SDM 24.7.1, table 24-11).
pub mod exit {
    pub const HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
    pub const SAVE_PAT: u32 = 1 << 18;
    pub const LOAD_PAT: u32 = 1 << 19;
    pub const SAVE_EFER: u32 = 1 << 20;
    pub const LOAD_EFER: u32 = 1 << 21;
}

/// VM-entry controls (SDM 24.8.1, table 24-13).
pub mod entry {
    pub const IA32E_MODE_GUEST: u32 = 1 << 9;
    pub const LOAD_PAT: u32 = 1 << 14;
    pub const LOAD_EFER: u32 = 1 << 15;
}

/// The controls every vCPU starts with, and the CR0/CR4 bits VMX operation fixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Controls {
    pub pin: u32,
    pub proc1: u32,
    pub proc2: u32,
    pub exit: u32,
    pub entry: u32,
    /// (must be 1, may be 1), from IA32_VMX_CR0_FIXED0/1 (appendix A.7).
    pub cr0_fixed: (u64, u64),
    /// Same for CR4 (appendix A.8).
    pub cr4_fixed: (u64, u64),
    /// The VMX-preemption timer counts TSC >> this (IA32_VMX_MISC bits 4:0).
    pub preemption_shift: u32,
}

/// `want` plus the bits the CPU forces, or the name of the first wanted bit it cannot set.
fn adjust(msr: u64, want: u32, optional: u32, names: &[(u32, &'static str)]) -> Result<u32, &'static str> {
    let (must, may) = (msr as u32, (msr >> 32) as u32);
    if let Some((_, name)) = names.iter().find(|(bit, _)| want & bit & !may != 0) {
        return Err(name);
    }
    if want & !may != 0 {
        return Err("a VM-execution control");
    }
    Ok(must | want | (optional & may))
}

impl Controls {
    pub fn compute(m: &VmxMsrs) -> Result<Self, &'static str> {
        use proc1::*;
        let pin = adjust(
            m.pinbased_ctls,
            pin::EXTERNAL_INTERRUPT_EXITING | pin::NMI_EXITING,
            pin::PREEMPTION_TIMER,
            &[(pin::EXTERNAL_INTERRUPT_EXITING, "external-interrupt exiting")],
        )?;
        // Every port and MSR access exits through all-ones bitmaps; HLT, MWAIT and MONITOR
        // exit as under SVM. CR3 loads and stores need not exit with EPT (cleared where
        // the TRUE MSRs allow it; forced ones stay, and their exits are reported).
        let proc1 = adjust(
            m.procbased_ctls,
            HLT_EXITING | MWAIT_EXITING | USE_IO_BITMAPS | USE_MSR_BITMAPS | MONITOR_EXITING | SECONDARY,
            0,
            &[(USE_IO_BITMAPS, "I/O bitmaps"), (USE_MSR_BITMAPS, "MSR bitmaps"), (SECONDARY, "secondary controls")],
        )?;
        // RDTSCP, INVPCID and XSAVES #UD in the guest unless enabled (table 24-7), though
        // CPUID (passed through) announces them: enabled where the CPU allows.
        let proc2 = adjust(
            m.procbased2,
            proc2::EPT | proc2::VPID | proc2::UNRESTRICTED_GUEST,
            proc2::RDTSCP | proc2::INVPCID | proc2::XSAVES,
            &[(proc2::EPT, "EPT"), (proc2::VPID, "VPID"), (proc2::UNRESTRICTED_GUEST, "unrestricted guest")],
        )?;
        let exit = adjust(
            m.exit_ctls,
            exit::HOST_ADDRESS_SPACE_SIZE | exit::SAVE_PAT | exit::LOAD_PAT | exit::SAVE_EFER | exit::LOAD_EFER,
            0,
            &[(exit::HOST_ADDRESS_SPACE_SIZE, "a 64-bit host")],
        )?;
        // "Acknowledge interrupt on exit" stays clear: a physical interrupt stays pending in
        // the local APIC and the microvisor's IDT takes it, as under SVM.
        let entry = adjust(m.entry_ctls, entry::LOAD_PAT | entry::LOAD_EFER, 0, &[(entry::LOAD_EFER, "load EFER")])?;
        let preemption_shift = (m.misc & 0x1f) as u32;
        Ok(Self { pin, proc1, proc2, exit, entry, cr0_fixed: m.cr0_fixed, cr4_fixed: m.cr4_fixed, preemption_shift })
    }

    /// CR0 as the hardware must hold it for a guest wanting `cr0`: with unrestricted guest,
    /// PE and PG are the guest's own (SDM 26.3.1.1); the other FIXED0 bits (NE) are forced.
    pub fn guest_cr0(&self, cr0: u64) -> u64 {
        let forced = self.cr0_fixed.0 & !(crate::vmx::state::CR0_PE | crate::vmx::state::CR0_PG);
        (cr0 | forced) & self.cr0_fixed.1
    }

    /// CR4 as the hardware must hold it (VMXE forced, SDM 23.8).
    pub fn guest_cr4(&self, cr4: u64) -> u64 {
        (cr4 | self.cr4_fixed.0) & self.cr4_fixed.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmx_caps::tests::skylake;

    #[test]
    fn skylake_controls() {
        let c = Controls::compute(&skylake()).unwrap();
        assert_eq!(c.pin & 0b1001, 0b1001);
        assert_eq!(c.pin & 0x16, 0x16, "the default-1 bits stay set");
        assert_ne!(c.pin & pin::PREEMPTION_TIMER, 0);
        assert_eq!(c.preemption_shift, 7);
        assert_ne!(c.proc1 & proc1::HLT_EXITING, 0);
        assert_eq!(c.proc1 & (proc1::CR3_LOAD_EXITING | proc1::CR3_STORE_EXITING), 0, "cleared by the TRUE MSR");
        assert_eq!(c.proc1 & proc1::INTERRUPT_WINDOW_EXITING, 0, "set only when wanted");
        assert_eq!(c.proc2 & 0xa2, 0xa2);
        assert_ne!(c.proc2 & proc2::RDTSCP, 0);
        assert_ne!(c.exit & exit::LOAD_EFER, 0);
        assert_eq!(c.entry & entry::IA32E_MODE_GUEST, 0);
        assert_ne!(c.entry & entry::LOAD_EFER, 0);
        assert_eq!(c.guest_cr0(0x11), 0x31, "NE forced, PG not");
        assert_eq!(c.guest_cr4(0), 0x2000, "VMXE forced");
    }

    #[test]
    fn missing_controls_are_named() {
        let mut m = skylake();
        m.procbased2 &= !((proc2::EPT as u64) << 32);
        assert_eq!(Controls::compute(&m), Err("EPT"));
        let mut m = skylake();
        m.procbased2 &= !((proc2::UNRESTRICTED_GUEST as u64) << 32);
        assert_eq!(Controls::compute(&m), Err("unrestricted guest"));
        let mut m = skylake();
        m.entry_ctls &= !((entry::LOAD_EFER as u64) << 32);
        assert_eq!(Controls::compute(&m), Err("load EFER"));
        let mut m = skylake();
        m.procbased2 &= !((proc2::RDTSCP as u64) << 32);
        assert_eq!(Controls::compute(&m).map(|c| c.proc2 & proc2::RDTSCP), Ok(0), "optional: left out");
        let mut m = skylake();
        m.procbased_ctls |= proc1::CR3_LOAD_EXITING as u64;
        assert_ne!(Controls::compute(&m).unwrap().proc1 & proc1::CR3_LOAD_EXITING, 0, "a forced bit stays");
    }
}

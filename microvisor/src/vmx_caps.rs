//! What an Intel CPU's VMX capability MSRs say, decoded for the boot report and for the
//! check the VMX backend will make before VMXON.
//!
//! The raw values are read by the binary (`arch/vmx_probe.rs`); the decoding is portable and
//! host-tested. References are to the Intel SDM, volume 3, appendix A ("VMX capability
//! reporting facility") and section 24.6.2 (processor-based VM-execution controls).

use core::fmt;

/// IA32_FEATURE_CONTROL (SDM vol. 3 section 23.7): bit 0 lock, bit 2 VMX outside SMX.
pub const MSR_FEATURE_CONTROL: u32 = 0x3a;
/// IA32_VMX_BASIC (appendix A.1).
pub const MSR_VMX_BASIC: u32 = 0x480;
/// IA32_VMX_PROCBASED_CTLS (appendix A.3.2).
pub const MSR_VMX_PROCBASED_CTLS: u32 = 0x482;
/// IA32_VMX_PROCBASED_CTLS2 (appendix A.3.3): exists when the primary controls allow
/// "activate secondary controls" (bit 63 of IA32_VMX_PROCBASED_CTLS).
pub const MSR_VMX_PROCBASED_CTLS2: u32 = 0x48b;
/// IA32_VMX_EPT_VPID_CAP (appendix A.10): exists when the secondary controls allow EPT or
/// VPID.
pub const MSR_VMX_EPT_VPID_CAP: u32 = 0x48c;

/// IA32_VMX_TRUE_PINBASED_CTLS (appendix A.3.1), then the TRUE primary processor-based,
/// exit and entry controls at 0x48e..0x490: they exist when IA32_VMX_BASIC bit 55 is set
/// and let the default-1 controls be cleared (CR3 load/store exiting above all). Without
/// bit 55 the plain MSRs 0x481, 0x482, 0x483 and 0x484 are read instead.
pub const MSR_VMX_TRUE_PINBASED_CTLS: u32 = 0x48d;
pub const MSR_VMX_PINBASED_CTLS: u32 = 0x481;
/// IA32_VMX_CR0_FIXED0 (appendix A.7); FIXED1 at 0x487, the CR4 pair at 0x488/0x489.
pub const MSR_VMX_CR0_FIXED0: u32 = 0x486;

/// The raw values, as read (0 for an MSR that does not exist on this CPU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxMsrs {
    pub feature_control: u64,
    pub basic: u64,
    pub procbased: u64,
    pub procbased2: u64,
    pub ept_vpid: u64,
    /// Pin-based, primary processor-based, exit and entry controls, from the TRUE MSRs
    /// where the CPU has them (`procbased` above stays the plain MSR: its bit 63 says
    /// whether secondary controls exist).
    pub pinbased_ctls: u64,
    pub procbased_ctls: u64,
    pub exit_ctls: u64,
    pub entry_ctls: u64,
    /// IA32_VMX_MISC (appendix A.6): bits 4:0 the VMX-preemption timer's rate (TSC >> n).
    pub misc: u64,
    /// CR0 and CR4 bits fixed to 1 (FIXED0) and allowed to be 1 (FIXED1) in VMX operation.
    pub cr0_fixed: (u64, u64),
    pub cr4_fixed: (u64, u64),
}

impl VmxMsrs {
    /// Whether IA32_VMX_PROCBASED_CTLS2 exists: "activate secondary controls" (primary
    /// control bit 31) may be 1, i.e. bit 63 of IA32_VMX_PROCBASED_CTLS.
    pub fn has_secondary(procbased: u64) -> bool {
        procbased & (1 << 63) != 0
    }

    /// Whether IA32_VMX_EPT_VPID_CAP exists: EPT (secondary bit 1) or VPID (bit 5) may be 1,
    /// i.e. bit 33 or 37 of IA32_VMX_PROCBASED_CTLS2 (the allowed-1 settings are the high half).
    pub fn has_ept_vpid_cap(procbased2: u64) -> bool {
        procbased2 & (1 << 33 | 1 << 37) != 0
    }
}

/// How firmware left IA32_FEATURE_CONTROL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureControl {
    /// Not locked: the microvisor may set "VMX outside SMX" and the lock itself.
    Unlocked,
    /// Locked with VMX outside SMX allowed.
    LockedOn,
    /// Locked with VMX outside SMX disallowed: VMXON faults; only firmware can change it.
    LockedOff,
}

/// The capabilities that matter to the microvisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmxCaps {
    pub feature_control: FeatureControl,
    /// VMCS revision identifier (IA32_VMX_BASIC bits 30:0).
    pub vmcs_revision: u32,
    /// IA32_VMX_BASIC bit 55: the TRUE_*_CTLS MSRs exist.
    pub true_controls: bool,
    /// Secondary controls, allowed-1 (IA32_VMX_PROCBASED_CTLS2 bits 63:32).
    pub ept: bool,
    pub vpid: bool,
    pub unrestricted_guest: bool,
    /// IA32_VMX_EPT_VPID_CAP.
    pub ept_walk_4: bool,
    pub ept_write_back: bool,
    pub ept_2m: bool,
    pub ept_1g: bool,
    pub ept_ad: bool,
    pub invept_single: bool,
    pub invept_all: bool,
    pub invvpid_address: bool,
    pub invvpid_single: bool,
    pub invvpid_all: bool,
}

const fn bit(v: u64, n: u32) -> bool {
    v & (1 << n) != 0
}

impl VmxCaps {
    pub fn decode(m: &VmxMsrs) -> Self {
        let fc = m.feature_control;
        let feature_control = match (bit(fc, 0), bit(fc, 2)) {
            (false, _) => FeatureControl::Unlocked,
            (true, true) => FeatureControl::LockedOn,
            (true, false) => FeatureControl::LockedOff,
        };
        // Appendix A.3.3: bit 32 + n of IA32_VMX_PROCBASED_CTLS2 is the allowed-1 setting
        // of secondary control n (EPT = 1, VPID = 5, unrestricted guest = 7).
        let p2 = if VmxMsrs::has_secondary(m.procbased) { m.procbased2 } else { 0 };
        // Appendix A.10.
        let e = if VmxMsrs::has_ept_vpid_cap(p2) { m.ept_vpid } else { 0 };
        let invept = bit(e, 20);
        let invvpid = bit(e, 32);
        Self {
            feature_control,
            vmcs_revision: (m.basic & 0x7fff_ffff) as u32,
            true_controls: bit(m.basic, 55),
            ept: bit(p2, 33),
            vpid: bit(p2, 37),
            unrestricted_guest: bit(p2, 39),
            ept_walk_4: bit(e, 6),
            ept_write_back: bit(e, 14),
            ept_2m: bit(e, 16),
            ept_1g: bit(e, 17),
            ept_ad: bit(e, 21),
            invept_single: invept && bit(e, 25),
            invept_all: invept && bit(e, 26),
            invvpid_address: invvpid && bit(e, 40),
            invvpid_single: invvpid && bit(e, 41),
            invvpid_all: invvpid && bit(e, 42),
        }
    }

    /// What the VMX backend will need and this CPU lacks, first missing first.
    pub fn missing(&self) -> Option<&'static str> {
        if self.feature_control == FeatureControl::LockedOff {
            return Some("VMX is disabled by firmware (IA32_FEATURE_CONTROL locked without VMX outside SMX)");
        }
        [
            (self.ept, "EPT (secondary control 1)"),
            (self.vpid, "VPID (secondary control 5)"),
            (self.unrestricted_guest, "unrestricted guest (secondary control 7)"),
            (self.ept_walk_4, "4-level EPT page walks"),
            (self.ept_write_back, "write-back EPT paging structures"),
            (self.invept_single || self.invept_all, "INVEPT"),
            (self.invvpid_single || self.invvpid_all, "INVVPID"),
        ]
        .into_iter()
        .find(|(has, _)| !has)
        .map(|(_, what)| what)
    }
}

impl fmt::Display for VmxCaps {
    /// One line: `VMX (VMCS revision 0x.., feature control ..), EPT yes (..), VPID yes, ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes = |b: bool| if b { "yes" } else { "no" };
        let fc = match self.feature_control {
            FeatureControl::Unlocked => "unlocked",
            FeatureControl::LockedOn => "locked on",
            FeatureControl::LockedOff => "locked off",
        };
        write!(f, "VMX (VMCS revision {:#x}, feature control {fc}), EPT {}", self.vmcs_revision, yes(self.ept))?;
        if self.ept {
            let [w, b, m, g, ad, s, a] = [
                self.ept_walk_4,
                self.ept_write_back,
                self.ept_2m,
                self.ept_1g,
                self.ept_ad,
                self.invept_single,
                self.invept_all,
            ]
            .map(yes);
            write!(f, " (4-level {w}, WB {b}, 2M {m}, 1G {g}, A/D {ad}, INVEPT single {s} all {a})")?;
        }
        write!(f, ", VPID {}", yes(self.vpid))?;
        if self.vpid {
            let [a, s, all] = [self.invvpid_address, self.invvpid_single, self.invvpid_all].map(yes);
            write!(f, " (INVVPID address {a} single {s} all {all})")?;
        }
        write!(f, ", unrestricted guest {}", yes(self.unrestricted_guest))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Roughly what a Skylake-X reports (and Bochs's `corei7_skylake_x` model).
    pub(crate) fn skylake() -> VmxMsrs {
        VmxMsrs {
            feature_control: 0b101,
            basic: 0x00da_0400_0000_0004,
            procbased: 0xfff9_fffe_0401_e172,
            procbased2: 0x0057_cfff_0000_0000,
            ept_vpid: 0x0000_0f01_0673_4141,
            pinbased_ctls: 0x0000_007f_0000_0016,
            procbased_ctls: 0xfff9_fffe_0400_6172,
            exit_ctls: 0x01ff_ffff_0003_6dfb,
            entry_ctls: 0x0003_ffff_0000_11fb,
            misc: 0x7004_c1e7,
            cr0_fixed: (0x8000_0021, 0xffff_ffff),
            cr4_fixed: (0x2000, 0x0037_67ff),
        }
    }

    #[test]
    fn decodes_a_capable_cpu() {
        let c = VmxCaps::decode(&skylake());
        assert_eq!(c.feature_control, FeatureControl::LockedOn);
        assert_eq!(c.vmcs_revision, 4);
        assert!(c.true_controls);
        assert!(c.ept && c.vpid && c.unrestricted_guest);
        assert!(c.ept_walk_4 && c.ept_write_back && c.ept_2m && c.ept_1g && c.ept_ad);
        assert!(c.invept_single && c.invept_all);
        assert!(c.invvpid_address && c.invvpid_single && c.invvpid_all);
        assert_eq!(c.missing(), None);
        let s = c.to_string();
        assert!(s.starts_with("VMX (VMCS revision 0x4, feature control locked on), EPT yes (4-level yes"), "{s}");
        assert!(s.contains(", VPID yes (INVVPID address yes single yes all yes), unrestricted guest yes"), "{s}");
    }

    #[test]
    fn each_missing_feature_is_named() {
        let mut m = skylake();
        m.procbased2 &= !(1 << 33);
        let c = VmxCaps::decode(&m);
        assert!(!c.ept);
        assert_eq!(c.missing(), Some("EPT (secondary control 1)"));
        assert!(c.to_string().contains("EPT no, VPID yes"));

        let mut m = skylake();
        m.procbased2 &= !(1 << 37);
        assert_eq!(VmxCaps::decode(&m).missing(), Some("VPID (secondary control 5)"));

        let mut m = skylake();
        m.procbased2 &= !(1 << 39);
        assert_eq!(VmxCaps::decode(&m).missing(), Some("unrestricted guest (secondary control 7)"));

        let mut m = skylake();
        m.ept_vpid &= !(1 << 6);
        assert_eq!(VmxCaps::decode(&m).missing(), Some("4-level EPT page walks"));

        let mut m = skylake();
        m.ept_vpid &= !(1 << 20);
        let c = VmxCaps::decode(&m);
        assert!(!c.invept_single && !c.invept_all);
        assert_eq!(c.missing(), Some("INVEPT"));

        let mut m = skylake();
        m.ept_vpid &= !(1 << 32);
        assert_eq!(VmxCaps::decode(&m).missing(), Some("INVVPID"));
    }

    #[test]
    fn absent_msrs_are_ignored() {
        // Without "activate secondary controls" the secondary MSR's value means nothing.
        let mut m = skylake();
        m.procbased &= !(1 << 63);
        let c = VmxCaps::decode(&m);
        assert!(!c.ept && !c.vpid && !c.unrestricted_guest && !c.ept_walk_4);
        // Without EPT and VPID, IA32_VMX_EPT_VPID_CAP means nothing.
        let mut m = skylake();
        m.procbased2 &= !(1 << 33 | 1 << 37);
        let c = VmxCaps::decode(&m);
        assert!(!c.ept_2m && !c.invvpid_all);
        assert!(VmxMsrs::has_secondary(skylake().procbased));
        assert!(VmxMsrs::has_ept_vpid_cap(1 << 37));
        assert!(!VmxMsrs::has_ept_vpid_cap(1 << 39));
    }

    #[test]
    fn feature_control_states() {
        let mut m = skylake();
        m.feature_control = 0;
        assert_eq!(VmxCaps::decode(&m).feature_control, FeatureControl::Unlocked);
        assert_eq!(VmxCaps::decode(&m).missing(), None);
        m.feature_control = 1;
        let c = VmxCaps::decode(&m);
        assert_eq!(c.feature_control, FeatureControl::LockedOff);
        assert!(c.missing().is_some_and(|w| w.contains("disabled by firmware")));
        assert!(c.to_string().contains("feature control locked off"));
        m.feature_control = 4;
        assert!(VmxCaps::decode(&m).to_string().contains("feature control unlocked"));
    }
}

//! Reading an Intel CPU's VMX capability MSRs (decoded by [`microvisor::vmx_caps`]). Only
//! reads: nothing here turns VMX on.

use microvisor::vmx_caps::{
    VmxMsrs, MSR_FEATURE_CONTROL, MSR_VMX_BASIC, MSR_VMX_EPT_VPID_CAP, MSR_VMX_PROCBASED_CTLS, MSR_VMX_PROCBASED_CTLS2,
};
use x86_64::registers::model_specific::Msr;

/// CPUID.1:ECX bit 5 (SDM vol. 3 section 23.6, "Discovering support for VMX").
pub fn has_vmx() -> bool {
    core::arch::x86_64::__cpuid(1).ecx & (1 << 5) != 0
}

/// The capability MSRs, or `None` if the CPU has no VMX.
pub fn probe() -> Option<VmxMsrs> {
    if !has_vmx() {
        return None;
    }
    // SAFETY: with CPUID.1:ECX.VMX set, IA32_FEATURE_CONTROL and the VMX capability MSRs
    // 0x480-0x48A exist (SDM vol. 3 appendix A); reading them has no side effect.
    let (feature_control, basic, procbased) = unsafe {
        (Msr::new(MSR_FEATURE_CONTROL).read(), Msr::new(MSR_VMX_BASIC).read(), Msr::new(MSR_VMX_PROCBASED_CTLS).read())
    };
    let procbased2 = if VmxMsrs::has_secondary(procbased) {
        // SAFETY: the MSR exists when secondary controls may be activated (appendix A.3.3).
        unsafe { Msr::new(MSR_VMX_PROCBASED_CTLS2).read() }
    } else {
        0
    };
    let ept_vpid = if VmxMsrs::has_ept_vpid_cap(procbased2) {
        // SAFETY: the MSR exists when EPT or VPID may be enabled (appendix A.10).
        unsafe { Msr::new(MSR_VMX_EPT_VPID_CAP).read() }
    } else {
        0
    };
    Some(VmxMsrs { feature_control, basic, procbased, procbased2, ept_vpid })
}

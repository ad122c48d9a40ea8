//! Reading an Intel CPU's VMX capability MSRs (decoded by [`microvisor::vmx_caps`]). Only
//! reads: nothing here turns VMX on.

use microvisor::vmx_caps::{
    VmxMsrs, MSR_FEATURE_CONTROL, MSR_VMX_BASIC, MSR_VMX_CR0_FIXED0, MSR_VMX_EPT_VPID_CAP, MSR_VMX_PINBASED_CTLS,
    MSR_VMX_PROCBASED_CTLS, MSR_VMX_PROCBASED_CTLS2, MSR_VMX_TRUE_PINBASED_CTLS,
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
    let read = |msr: u32| unsafe { Msr::new(msr).read() };
    let (feature_control, basic, procbased) =
        (read(MSR_FEATURE_CONTROL), read(MSR_VMX_BASIC), read(MSR_VMX_PROCBASED_CTLS));
    // SDM appendix A.3: the TRUE controls 0x48D..0x490 exist when IA32_VMX_BASIC bit 55 is
    // set; they report the same allowed-1 settings with the default-1 bits clearable.
    let ctls = if basic & (1 << 55) != 0 { MSR_VMX_TRUE_PINBASED_CTLS } else { MSR_VMX_PINBASED_CTLS };
    let procbased2 = if VmxMsrs::has_secondary(procbased) { read(MSR_VMX_PROCBASED_CTLS2) } else { 0 };
    let ept_vpid = if VmxMsrs::has_ept_vpid_cap(procbased2) { read(MSR_VMX_EPT_VPID_CAP) } else { 0 };
    let fixed = |at: u32| (read(at), read(at + 1));
    Some(VmxMsrs {
        feature_control,
        basic,
        procbased,
        procbased2,
        ept_vpid,
        pinbased_ctls: read(ctls),
        procbased_ctls: read(ctls + 1),
        exit_ctls: read(ctls + 2),
        entry_ctls: read(ctls + 3),
        misc: read(0x485),
        cr0_fixed: fixed(MSR_VMX_CR0_FIXED0),
        cr4_fixed: fixed(MSR_VMX_CR0_FIXED0 + 2),
    })
}

/// The CPU check of the VMX build: VMX with what the backend needs (EPT, VPID,
/// unrestricted guest, INVEPT, INVVPID), reported in one line; otherwise the machine stops
/// with `CpuUnsupported` and the reason.
pub fn check() -> VmxMsrs {
    use ipc_spec::machine_exit::MachineExit;
    let Some(msrs) = probe() else {
        crate::arch::cpu::fail(
            MachineExit::CpuUnsupported,
            format_args!(
                "CPU: no Intel VMX (CPUID.1:ECX bit 5); this is the VMX build (an AMD CPU needs the SVM build)"
            ),
        )
    };
    let caps = microvisor::vmx_caps::VmxCaps::decode(&msrs);
    crate::println!("cpu: Intel {caps}");
    if let Some(what) = caps.missing() {
        crate::arch::cpu::fail(MachineExit::CpuUnsupported, format_args!("CPU: the VMX backend needs {what}"));
    }
    msrs
}

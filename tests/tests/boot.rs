//! The normal boot: microvisor, ACPI, dom0 in SVM guest mode.

use stack_tests::*;

#[test]
fn normal_boot_reaches_dom0_ready_in_guest_mode() {
    let run = boot(&machine("dom0.on_ready=shutdown"));
    assert_exit(&run, MachineExit::Success);
    assert_line(&run, "[microvisor] microvisor 0.1.0 (AMD SVM + nested paging");
    assert_line(&run, "[microvisor] cpu: SVM with nested paging");
    // The ACPI summary names the VT-d unit QEMU's intel-iommu puts at 0xfed90000.
    assert_line(&run, "IOMMU: 1 VT-d unit(s) at 0xfed90000");
    assert_line(&run, "interrupt remapping supported");
    assert_line(&run, "PCI ECAM 0xb0000000");
    assert_line(&run, "[microvisor] dom0: 32 MiB RAM, ASID 1");
    // dom0 itself sees the hypervisor through CPUID, i.e. it runs in guest mode.
    assert_line(&run, "[dom0] CPUID: hypervisor bit set, signature \"Microvisor\", ABI 2");
    assert_line(&run, "[dom0] boot bundle: 5 entries: [(\"dom0\"");
    assert_line(&run, "[dom0] ready (in SVM guest mode)");
    assert_line(&run, "[microvisor] shutdown requested with status 0");
    assert_no_line(&run, "FATAL");
}

#[test]
fn dom0_command_line_comes_from_the_microvisor_command_line() {
    let run = boot(&machine("dom0.on_ready=shutdown dom0.hello=world unrelated=1"));
    assert_exit(&run, MachineExit::Success);
    assert_line(&run, "[dom0] dom0 starting: 32 MiB RAM, command line \"on_ready=shutdown hello=world\"");
}

#[test]
fn without_an_iommu_no_device_is_given_out() {
    let mut m = machine("");
    m.iommu = false;
    let run = boot(&m);
    assert_line(&run, "IOMMU: none (no DMAR table; add -device intel-iommu)");
    assert_line(
        &run,
        "[microvisor] iommu: none usable (needs one VT-d unit, on segment 0): no device will be given to a domain",
    );
    // Passthrough without an IOMMU would let the driver's device write anywhere: refused.
    assert_line(&run, "[dom0] building the stack failed: domain disk: DeviceAssign:");
    assert_no_line(&run, "[disk] ready");
    assert_no_line(&run, "FATAL");
}

//! Bochs as a second test machine: an emulated Intel CPU with VMX (EPT, VPID, unrestricted
//! guest), no IOMMU, no PCIe. GRUB boots the microvisor by Multiboot2 from an ISO; the
//! microvisor reports the CPU's VMX capabilities and, as the VMX backend is not there yet,
//! stops cleanly, ending Bochs through its shutdown port.

use std::time::Duration;

use stack_tests::*;
use xtask::bochs::{self, BochsMachine};

/// A whole boot takes about 6 s of wall time on an idle machine (~110 M instructions).
const BOCHS_TIMEOUT: Duration = Duration::from_secs(90);

#[test]
fn grub_boots_the_microvisor_on_bochs_which_reports_vmx_with_ept_and_vpid() {
    if let Err(e) = xtask::setup::ensure_bochs() {
        eprintln!("SKIPPED: Bochs cannot be installed here: {e}");
        return;
    }
    let a = artifacts();
    let dir = std::env::temp_dir().join(format!("stack-tests-{}-bochs", std::process::id()));
    let iso = xtask::iso::build_iso(&a.microvisor, &a.bundle, "dom0.on_ready=shutdown", &dir.join("stack.iso"))
        .unwrap_or_else(|e| panic!("building the GRUB ISO: {e}"));
    let m = BochsMachine::new(&iso, &dir);
    let run = bochs::run_captured(&m, BOCHS_TIMEOUT, false, |_| false).unwrap_or_else(|e| panic!("running Bochs: {e}"));
    eprintln!("Bochs ran {:.1} s: {:?}", run.elapsed.as_secs_f64(), run.ending);
    // The microvisor ended Bochs itself (shutdown port), not the timeout.
    assert!(
        matches!(run.ending, Ending::Exited(_)),
        "Bochs did not end by itself: {:?}\nconsole:\n{}\nBochs log:\n{}",
        run.ending,
        run.console(),
        run.stderr
    );
    assert_line(&run, "[microvisor] boot: Multiboot2 from GRUB 2");
    assert_line(&run, "[microvisor] command line: dom0.on_ready=shutdown");
    assert_line(&run, "[microvisor] cpu: Intel VMX (VMCS revision");
    for cap in ["EPT yes (4-level yes, WB yes", "VPID yes", "unrestricted guest yes", "INVEPT single yes", "INVVPID"] {
        assert_line(&run, cap);
    }
    assert_no_line(&run, "the VMX backend will need");
    // Bochs has no VT-d: said so, and passthrough is refused.
    assert_line(&run, "IOMMU: none (no DMAR table");
    assert_line(&run, "[microvisor] iommu: no IOMMU: passthrough refused");
    assert_line(&run, "[microvisor] FATAL: CPU: Intel VMX found, but the VMX backend is not there yet");
}

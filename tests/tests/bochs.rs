//! Bochs as a second test machine: an emulated Intel CPU with VMX (EPT, VPID, unrestricted
//! guest), no IOMMU, no PCIe, no virtio. GRUB boots the microvisor's VMX build by
//! Multiboot2 from an ISO; dom0 and the domains run in VMX non-root mode. The end-to-end
//! tests that need no device run here as on QEMU: boot, IPC, a domain's exit, faults,
//! rogue hypercalls, scheduling, the virtual timer and doorbells, the test VMM and a rogue
//! VM.
//!
//! Each run costs a BIOS and GRUB boot (about 6 s) plus the stack at Bochs's pace, so the
//! checks are grouped into few runs.

use std::time::Duration;

use stack_tests::*;
use xtask::bochs::{self, BochsMachine};

/// A stack boots and runs its checks in 10 to 40 s of wall time on an idle machine.
const BOCHS_TIMEOUT: Duration = Duration::from_secs(240);

/// Boot `manifest` (relative to the workspace) on Bochs with `append` on the command line
/// until every `wanted` line is there (or Bochs ends). `None` when Bochs cannot be
/// installed here.
fn bochs_run(manifest: &str, append: &str, wanted: &[&str]) -> Option<Run> {
    if let Err(e) = xtask::setup::ensure_bochs() {
        eprintln!("SKIPPED: Bochs cannot be installed here: {e}");
        return None;
    }
    let a = artifacts();
    let name = manifest.replace(['/', '.'], "-");
    let dir = std::env::temp_dir().join(format!("stack-tests-{}-bochs-{name}", std::process::id()));
    let bundle = dir.join("bundle.bin");
    xtask::build::pack(&a.images, &xtask::workspace_root().join(manifest), &bundle)
        .unwrap_or_else(|e| panic!("packing {manifest}: {e}"));
    let microvisor = xtask::build::vmx_image(&a.microvisor);
    let iso = xtask::iso::build_iso(&microvisor, &bundle, append, &dir.join("stack.iso"))
        .unwrap_or_else(|e| panic!("building the GRUB ISO: {e}"));
    let m = BochsMachine::new(&iso, &dir);
    let run = bochs::run_captured(&m, BOCHS_TIMEOUT, false, |lines| {
        wanted.iter().all(|w| lines.iter().any(|l| l.contains(w)))
    })
    .unwrap_or_else(|e| panic!("running Bochs: {e}"));
    eprintln!("Bochs ran {:.1} s: {:?}", run.elapsed.as_secs_f64(), run.ending);
    Some(run)
}

fn assert_stopped(run: &Run) {
    assert!(
        matches!(run.ending, Ending::Stopped),
        "the wanted lines did not all appear: {:?}\nconsole:\n{}\nBochs log:\n{}",
        run.ending,
        run.console(),
        run.stderr
    );
}

#[test]
fn dom0_runs_in_vmx_non_root_mode_with_ipc_a_domain_exit_and_a_vm_served_by_its_vmm() {
    let Some(run) =
        bochs_run("stacks/bochs.toml", "", &["[dom0] destroyed ping: its memory is free again", "[vmm] VM results:"])
    else {
        return;
    };
    assert_stopped(&run);
    assert_line(&run, "[microvisor] microvisor 0.1.0 (Intel VMX + EPT + VPID");
    assert_line(&run, "[microvisor] boot: Multiboot2 from GRUB 2");
    assert_line(&run, "[microvisor] cpu: Intel VMX (VMCS revision");
    for cap in ["EPT yes (4-level yes, WB yes", "VPID yes", "unrestricted guest yes", "INVEPT single yes", "INVVPID"] {
        assert_line(&run, cap);
    }
    // Bochs has no VT-d: said so, and no device is given out.
    assert_line(&run, "IOMMU: none (no DMAR table");
    assert_line(&run, "[microvisor] iommu: none usable (needs one VT-d unit, on segment 0): no device will be given");
    assert_line(&run, "entering VMX non-root mode with EPT and VPID");
    assert_line(&run, "[dom0] ready (in VMX non-root mode)");
    // IPC and a domain's exit.
    assert_line(&run, "[ping] 1000 calls to \"ping-pong\" answered correctly");
    assert_line(&run, "[microvisor] domain ping exited with status 0; its fault handler was told");
    // The test VMM emulates its VM's exits (VMCALL included) and injects its timer.
    for check in [
        "IN AL merged into RAX: 0x11223344556677ab, as expected",
        "CPUID signature matches the VMM's: 0x1, as expected",
        "RDMSR returns what WRMSR wrote: 0x123456789abcdef0, as expected",
        "MMIO register read back: 0xcafef00d, as expected",
        "MMIO read into R9: 0x7e570001, as expected",
        "timer interrupts counted after HLT: 0x3, as expected",
        "all checks passed",
    ] {
        assert_line(&run, &format!("[vmm] guest: tiny VM: {check}"));
    }
    assert_line(&run, "[vmm] VM exited with status 0");
    assert_no_line(&run, "FAILED");
    assert_no_line(&run, "FATAL");
    assert_no_line(&run, "[dom0] fault in");
}

#[test]
fn on_bochs_a_stage2_fault_stops_dom0_and_the_microvisor_stays_in_control() {
    let Some(run) = bochs_run("stacks/bochs.toml", "dom0.selftest=stage2-fault", &["no runnable domains left"]) else {
        return;
    };
    assert_stopped(&run);
    assert_line(
        &run,
        "[microvisor] domain dom0 stopped: stage-2 fault: read at guest-physical 0x80000000 \
         (not mapped: outside the domain's memory)",
    );
    assert_no_line(&run, "FATAL");
}

#[test]
fn on_bochs_a_rogue_domain_gets_error_codes_and_a_spinner_does_not_starve_ping() {
    let Some(run) = bochs_run(
        "tests/stacks/rogue.toml",
        "",
        &["[ping] 20000 calls to \"ping-pong\" answered correctly", "[dom0] destroyed rogue: its memory is free again"],
    ) else {
        return;
    };
    assert_stopped(&run);
    assert_line(&run, "bad hypercalls refused with error codes");
    assert_no_line(&run, "[rogue] FAILED");
    // Its stray access: an EPT violation, sent to dom0 as a stage-2 fault message.
    assert_line(&run, "[microvisor] domain rogue: stage-2 fault: read at guest-physical 0x80000000");
    assert_line(&run, "[dom0] fault in rogue: stage-2 read at guest-physical 0x80000000");
    assert_no_line(&run, "FATAL");

    let Some(run) = bochs_run(
        "tests/stacks/spinner.toml",
        "",
        &["[spinner] ready", "[ping] 20000 calls to \"ping-pong\" answered"],
    ) else {
        return;
    };
    assert_stopped(&run);
    let spinner = run.lines.iter().position(|l| l.contains("[spinner] ready"));
    let ping = run.lines.iter().position(|l| l.contains("[ping] 20000 calls"));
    assert!(spinner < ping, "the spinner only started after ping was done:\n{}", run.console());
}

#[test]
fn on_bochs_the_virtual_timer_and_doorbells_arrive_as_virtual_interrupts() {
    let Some(run) = bochs_run("tests/stacks/doorbell.toml", "", &["[ping] 300 doorbells on \"ping-bell\" answered"])
    else {
        return;
    };
    assert_stopped(&run);
    let slept = run
        .lines
        .iter()
        .find_map(|l| l.strip_prefix("[ping] slept ")?.split(' ').next()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no sleep report:\n{}", run.console()));
    assert!(slept >= 20, "woke after {slept} ms, asked for 20:\n{}", run.console());
    assert_line(&run, "[bell] answering doorbells on \"ping-bell\" by virtual interrupt 0x40");
    assert_no_line(&run, "late or lost");
    assert_no_line(&run, "FATAL");
}

#[test]
fn on_bochs_a_rogue_vm_reaches_only_its_vmm() {
    let Some(run) = bochs_run(
        "tests/stacks/rogue-vm.toml",
        "",
        &["[vmm] rogue VM contained:", "[ping] 20000 calls to \"ping-pong\" answered correctly"],
    ) else {
        return;
    };
    assert_stopped(&run);
    assert_line(&run, "[vmm] guest: tiny VM (rogue): 2000 random port accesses done");
    assert_line(&run, "[vmm] guest: tiny VM (rogue): 500 wild MMIO accesses done");
    assert_line(&run, "pausing it: Ok(())");
    assert_no_line(&run, "[dom0] fault in");
    assert_no_line(&run, "FATAL");
}

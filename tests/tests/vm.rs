//! VMs served by a VMM domain: a guest's exits travel as messages to its VMM, which
//! emulates them (`ipc_spec::exit`), injects its timer, and contains a hostile guest.

use stack_tests::*;

#[test]
fn a_vmm_emulates_port_io_cpuid_msr_mmio_and_injects_a_timer() {
    let m = stack_machine("tests/stacks/vm.toml", "");
    let run = boot_until(&m, &["[vmm] VM results:"]);
    assert!(matches!(run.ending, Ending::Stopped), "ended with {:?}:\n{}", run.ending, run.console());
    assert_line(&run, "[dom0] vmm is the VMM of VM tiny");
    // The guest's own checks, printed through the VMM's console emulation.
    for check in [
        "IN AL merged into RAX: 0x11223344556677ab, as expected",
        "IN EAX zero-extended: 0xdeadbeef, as expected",
        "CPUID signature matches the VMM's: 0x1, as expected",
        "RDMSR returns what WRMSR wrote: 0x123456789abcdef0, as expected",
        "MMIO device id: 0x7e570001, as expected",
        "MMIO register read back: 0xcafef00d, as expected",
        "MMIO read into R9: 0x7e570001, as expected",
        "timer interrupts counted after HLT: 0x3, as expected",
    ] {
        assert_line(&run, &format!("[vmm] guest: tiny VM: {check}"));
    }
    assert_line(&run, "[vmm] guest: tiny VM: all checks passed");
    assert_line(&run, "[vmm] VM exited with status 0");
    // What the VMM saw of the guest.
    assert_line(
        &run,
        "[vmm] VM results: OUT 0x5a, MMIO register 0xcafef00d, MSR 0xc0000103 = 0x123456789abcdef0, 3 timer ticks injected",
    );
    assert_no_line(&run, "FAILED");
    assert_no_line(&run, "FATAL");
    // A VM's exits are its VMM's business: dom0 hears nothing of them.
    assert_no_line(&run, "[dom0] fault in");
}

#[test]
fn a_rogue_vm_reaches_only_its_vmm() {
    let m = stack_machine("tests/stacks/rogue-vm.toml", "");
    let run = boot_until(&m, &["[vmm] rogue VM contained:", "[ping] 20000 calls to \"ping-pong\" answered correctly"]);
    assert!(matches!(run.ending, Ending::Stopped), "ended with {:?}:\n{}", run.ending, run.console());
    assert_line(&run, "[vmm] guest: tiny VM (rogue): 2000 random port accesses done");
    assert_line(&run, "[vmm] guest: tiny VM (rogue): 500 wild MMIO accesses done");
    assert_line(&run, "pausing it: Ok(())");
    // Nobody else was touched: dom0 saw no fault, the microvisor stayed up.
    assert_no_line(&run, "[dom0] fault in");
    assert_no_line(&run, "FATAL");
    assert_line(&run, "[pong] ready");
}

//! Failure paths: a faulting domain is reported and stopped while the microvisor stays up;
//! a fault inside the microvisor is reported with its context; hypercalls with bad
//! arguments get error codes.

use stack_tests::*;

#[test]
fn stage2_fault_names_address_and_domain_and_microvisor_survives() {
    let run = boot(&machine("dom0.selftest=stage2-fault"));
    assert_line(&run, "[dom0] selftest: reading guest-physical 0x80000000, outside my RAM");
    assert_line(
        &run,
        "[microvisor] domain dom0 stopped: stage-2 fault: read at guest-physical 0x80000000 \
         (not mapped: outside the domain's memory)",
    );
    assert_no_line(&run, "selftest FAILED");
    // The microvisor is still in control after the report: it notices nothing is left to
    // run and ends the machine in order (not a crash, not a reset).
    assert_line(&run, "[microvisor] no runnable domains left: stopping the machine");
    assert_no_line(&run, "FATAL");
    assert_exit(&run, MachineExit::NoDomainsLeft);
}

#[test]
fn triple_fault_in_a_domain_is_reported_and_contained() {
    let run = boot(&machine("dom0.selftest=triple-fault"));
    assert_line(&run, "[microvisor] domain dom0 stopped: triple fault (shutdown)");
    assert_no_line(&run, "selftest FAILED");
    assert_no_line(&run, "FATAL");
    assert_exit(&run, MachineExit::NoDomainsLeft);
}

#[test]
fn bad_hypercalls_get_error_codes_and_dom0_carries_on() {
    let run = boot(&machine("dom0.selftest=bad-hypercall dom0.on_ready=shutdown"));
    let code = |e: ipc_spec::Error| e.code();
    assert_line(
        &run,
        &format!("selftest: unknown hypercall returned status {}", code(ipc_spec::Error::UnknownHypercall)),
    );
    assert_line(
        &run,
        &format!("selftest: console write from outside RAM returned status {}", code(ipc_spec::Error::BadAddress)),
    );
    assert_line(
        &run,
        &format!("selftest: oversized console write returned status {}", code(ipc_spec::Error::InvalidArgument)),
    );
    assert_line(&run, "[dom0] ready");
    assert_exit(&run, MachineExit::Success);
}

#[test]
fn exception_in_the_microvisor_is_reported_with_its_context() {
    let run = boot(&machine("selftest=exit-handler-fault"));
    assert_line(&run, "[microvisor] FATAL: CPU exception 6 (#UD invalid opcode) in the microvisor");
    assert_line(&run, "error code 0x0, RIP 0x");
    assert_line(&run, "CR2 0x");
    assert_line(&run, "[microvisor]   while handling domain dom0");
    assert_exit(&run, MachineExit::MicrovisorFault);
}

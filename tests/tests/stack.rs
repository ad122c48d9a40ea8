//! Stacks built by dom0 from a manifest: capabilities, IPC, scheduling and fault handling
//! seen from outside.

use stack_tests::*;

#[test]
fn ipc_manifest_builds_three_domains_that_all_report_ready() {
    let m = stack_machine("tests/stacks/ipc.toml", "");
    let run = boot_until(&m, &["[dom0] ready", "[pong] ready", "[ping] ready"]);
    assert!(matches!(run.ending, Ending::Stopped), "the stack did not come up: {:?}\n{}", run.ending, run.console());
    assert_line(&run, "[dom0] started pong: 4 MiB, priority 10");
    assert_line(&run, "[dom0] started ping: 4 MiB, priority 10");
    assert_line(&run, "[ping] 1000 calls to \"ping-pong\" answered correctly");
    assert_no_line(&run, "FATAL");
}

#[test]
fn a_rogue_domain_gets_only_error_codes_and_its_fault_goes_to_dom0() {
    let m = stack_machine("tests/stacks/rogue.toml", "");
    let run = boot_until(
        &m,
        &["[ping] 20000 calls to \"ping-pong\" answered correctly", "[dom0] destroyed rogue: its memory is free again"],
    );
    assert!(matches!(run.ending, Ending::Stopped), "ended with {:?}:\n{}", run.ending, run.console());
    // Every capability-less hypercall was refused; none succeeded.
    assert_line(&run, "bad hypercalls refused with error codes");
    assert_no_line(&run, "[rogue] FAILED");
    // Its stray access became a fault message to dom0, which tore the domain down.
    assert_line(&run, "[microvisor] domain rogue: stage-2 fault: read at guest-physical 0x80000000");
    assert_line(&run, "[dom0] fault in rogue: stage-2 read at guest-physical 0x80000000");
    // Meanwhile the others kept working.
    assert_line(&run, "[pong] ready");
    assert_no_line(&run, "FATAL");
}

#[test]
fn a_spinning_domain_does_not_starve_equal_priority_ones() {
    let m = stack_machine("tests/stacks/spinner.toml", "");
    let run = boot_until(&m, &["[spinner] ready", "[ping] 20000 calls to \"ping-pong\" answered correctly"]);
    assert!(
        matches!(run.ending, Ending::Stopped),
        "ping did not finish while the spinner spun: {:?}\n{}",
        run.ending,
        run.console()
    );
    // The spinner was running before ping finished: ping got the CPU by preemption.
    let spinner = run.lines.iter().position(|l| l.contains("[spinner] ready"));
    let ping = run.lines.iter().position(|l| l.contains("[ping] 20000 calls"));
    assert!(spinner < ping, "the spinner only started after ping was done:\n{}", run.console());
}

#[test]
fn a_domain_that_exits_is_reported_and_destroyed_by_dom0() {
    let m = stack_machine("tests/stacks/ipc.toml", "");
    let run = boot_until(&m, &["[dom0] destroyed ping: its memory is free again"]);
    assert!(matches!(run.ending, Ending::Stopped), "ended with {:?}:\n{}", run.ending, run.console());
    assert_line(&run, "[microvisor] domain ping exited with status 0; its fault handler was told");
    assert_line(&run, "[dom0] ping exited with status 0");
}

#[test]
fn virtual_timer_sleeps_and_doorbells_arrive_as_virtual_interrupts() {
    let m = stack_machine("tests/stacks/doorbell.toml", "");
    let run = boot_until(&m, &["[ping] 300 doorbells on \"ping-bell\" answered"]);
    assert!(matches!(run.ending, Ending::Stopped), "ended with {:?}:\n{}", run.ending, run.console());
    // The one-shot timer woke ping no earlier than asked.
    let slept = run
        .lines
        .iter()
        .find_map(|l| l.strip_prefix("[ping] slept ")?.split(' ').next()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no sleep report:\n{}", run.console()));
    assert!(slept >= 20, "woke after {slept} ms, asked for 20:\n{}", run.console());
    // bell halts between doorbells: a doorbell is a virtual interrupt that wakes it from
    // HLT. (Now and then the tick preempts bell after an answer and before it halts; ping
    // rings meanwhile and bell finds that doorbell pending without halting.)
    assert_line(&run, "[bell] answering doorbells on \"ping-bell\" by virtual interrupt 0x40");
    let woken = run
        .lines
        .iter()
        .find_map(|l| l.strip_prefix("[bell] 300 doorbells answered, ")?.split(' ').next()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no count of doorbells answered:\n{}", run.console()));
    // How many is up to the scheduler since the notification fast path: when ping waits
    // before bell answers (a tick preempted bell), bell's answer hands the CPU straight to
    // ping (equal priority), ping rings again before bell has halted, and from then on
    // every doorbell is found pending (its interrupt offered) until a tick changes the
    // rhythm again; under a CPU hog 19 to 73 of 300 were seen. The first always wakes it
    // (bell halted while ping slept).
    assert!(woken >= 1, "no doorbell woke bell from HLT:\n{}", run.console());
    // A late or lost wake-up (bell's fallback timer found a doorbell first) is reported, not
    // fatal; the cause found and fixed is in docs/design.md (known limits).
    for l in run.lines.iter().filter(|l| l.contains("found by the fallback timer")) {
        eprintln!("note: {l}");
    }
}

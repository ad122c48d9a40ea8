//! The hypercall fuzzer (`cargo xtask fuzz hypercalls`), shorter: 200,000 random hypercalls
//! from a fresh seed each run (printed; `FUZZ_SEED=<s>` replays one) beside a serving
//! ping-pong pair. No microvisor fault, no leak (dom0's verdict from `MachineStatus`), and
//! ping still served afterwards.

use stack_tests::*;

const CALLS: u64 = 200_000;

#[test]
fn random_hypercalls_neither_fault_nor_leak_and_the_others_keep_serving() {
    let seed = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(xtask::fuzz::fresh_seed);
    println!("fuzz: seed {seed}, {CALLS} calls (replay: FUZZ_SEED={seed})");
    let a = artifacts();
    let bundle = format!("stack-tests-{}-fuzz.bin", std::process::id());
    let m = xtask::fuzz::machine(&a, CALLS, seed, &bundle).unwrap_or_else(|e| panic!("{e}"));
    match xtask::fuzz::check(&m, seed, CALLS, xtask::fuzz::timeout_for(CALLS), false) {
        Ok(r) => println!(
            "fuzz: PASS: seed {seed}, {CALLS} calls at {} calls/s, {:.1} s wall\n{}",
            r.calls_per_s,
            r.wall.as_secs_f64(),
            r.summary.join("\n")
        ),
        Err(e) => panic!("fuzz: seed {seed}: {e}"),
    }
}

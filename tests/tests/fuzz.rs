//! The hypercall fuzzer (`cargo xtask fuzz hypercalls`), shorter: 200,000 random hypercalls
//! from a fresh seed each run (printed; `FUZZ_SEED=<s>` replays one) beside a serving
//! ping-pong pair. No microvisor fault, no leak (dom0's verdict from `MachineStatus`), and
//! ping still served afterwards; and `SignalHalt` was made both ways: halts that slept until
//! the fuzzer's wake timer and halts that returned at once.

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
        Ok(r) => {
            println!(
                "fuzz: PASS: seed {seed}, {CALLS} calls at {} calls/s, {:.1} s wall\n{}",
                r.calls_per_s,
                r.wall.as_secs_f64(),
                r.summary.join("\n")
            );
            let halts = r.summary.iter().find(|l| l.contains("fuzz: halts:"));
            let count = |key: &str| {
                let v = halts?.split(&format!(" {key}=")).nth(1)?.split(' ').next()?;
                v.parse::<u64>().ok()
            };
            let (slept, at_once) = (count("slept"), count("at_once"));
            assert!(
                slept.is_some_and(|n| n > 0) && at_once.is_some_and(|n| n > 0),
                "seed {seed}: SignalHalt not made both ways (slept {slept:?}, at once {at_once:?}): {halts:?}"
            );
        }
        Err(e) => panic!("fuzz: seed {seed}: {e}"),
    }
}

//! `cargo xtask fuzz hypercalls --calls N --seed S`: boot `stacks/fuzz.toml`, where the
//! `fuzzer` domain issues N random hypercalls from seed S beside a ping-pong pair, and check
//! the three things that must hold:
//! 1. the microvisor neither faulted nor stopped the machine (QEMU is still running: any
//!    machine exit during the run is a failure, and its exit code says which);
//! 2. no leak: dom0, after destroying the fuzzer, found every free frame and kernel object
//!    back (its `fuzz: PASS` line), and the fuzzer itself exited cleanly;
//! 3. the other domains kept serving: ping completes a round of calls to pong after dom0's
//!    verdict.
//!
//! The seed is random unless given, and always printed so a failure can be replayed.

use std::time::{Duration, Instant};

use crate::build::{self, Artifacts};
use crate::qemu::{self, describe_exit, Ending, Machine};

pub const STACK: &str = "stacks/fuzz.toml";
/// The fuzzer's domain in that stack.
pub const FUZZER: &str = "fz";
/// The client that must keep being served.
const CLIENT: &str = "ping";

/// What a passing run reports.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub calls: u64,
    /// As the fuzzer measured it (its own clock, from first to last call).
    pub calls_per_s: u64,
    /// Wall time of the whole QEMU run.
    pub wall: Duration,
    /// The fuzzer's summary lines and dom0's verdict.
    pub summary: Vec<String>,
}

/// A seed from the clock and the process id (no randomness crate needed for this).
pub fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut z = (t as u64) ^ ((std::process::id() as u64) << 32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) % 1_000_000_000_000
}

/// The fuzz stack with the fuzzer's `seed` and `calls`, packed next to `artifacts`' bundle.
pub fn machine(artifacts: &Artifacts, calls: u64, seed: u64, bundle_name: &str) -> Result<Machine, String> {
    machine_with(artifacts, calls, seed, "", bundle_name)
}

/// [`machine`] with more words for the fuzzer's command line (e.g. `only=Null`).
pub fn machine_with(
    artifacts: &Artifacts,
    calls: u64,
    seed: u64,
    extra: &str,
    bundle_name: &str,
) -> Result<Machine, String> {
    let mut manifest = crate::manifest::load(&crate::workspace_root().join(STACK), &build::known_images())?;
    let progress = (calls / 10).clamp(1000, 1_000_000);
    let fuzzer =
        manifest.domains.iter_mut().find(|d| d.fuzz).ok_or_else(|| format!("{STACK}: no domain with fuzz = true"))?;
    fuzzer.args = format!("seed={seed} calls={calls} progress={progress} {extra}").trim_end().to_string();
    let out = artifacts.bundle.with_file_name(bundle_name);
    let stack = build::pack_manifest(&artifacts.images, &manifest, &out)?;
    Ok(Machine::new(&Artifacts { bundle: out, stack, ..artifacts.clone() }))
}

/// Enough time for `calls` at a pessimistic 2,000 calls per second, plus the boot.
pub fn timeout_for(calls: u64) -> Duration {
    Duration::from_secs(120 + calls / 2000)
}

/// Run the machine and check the three conditions; `echo` shows the console meanwhile.
pub fn check(m: &Machine, seed: u64, calls: u64, timeout: Duration, echo: bool) -> Result<Report, String> {
    let verdict = "[dom0] fuzz: ";
    let round = format!("[{CLIENT}] round ");
    let started = Instant::now();
    let run = qemu::run_captured(m, timeout, echo, |lines| {
        if lines.last().is_some_and(|l| l.contains("FATAL")) {
            return true;
        }
        // Stop once the client finished a round after dom0's verdict.
        let Some(v) = lines.iter().rposition(|l| l.starts_with(verdict)) else { return false };
        lines[v..].iter().any(|l| l.starts_with(&round))
    })?;
    let wall = started.elapsed();
    let tail = |n: usize| {
        let from = run.lines.len().saturating_sub(n);
        run.lines[from..].join("\n")
    };
    let replay = format!("(seed {seed}: replay with `cargo xtask fuzz hypercalls --calls {calls} --seed {seed}`)");
    match run.ending {
        Ending::Stopped => {}
        Ending::Exited(code) => {
            return Err(format!(
                "the machine stopped during the fuzz: {} {replay}\nlast console lines:\n{}",
                describe_exit(code),
                tail(40)
            ))
        }
        Ending::TimedOut if run.lines.iter().any(|l| l.starts_with(verdict)) => {
            return Err(format!(
                "{CLIENT} completed no round of calls after dom0's verdict (run stopped after {} s): the other domains stopped being served {replay}\nlast console lines:\n{}",
                timeout.as_secs(),
                tail(40)
            ))
        }
        Ending::TimedOut => {
            return Err(format!(
                "no verdict within {} s: a hang? {replay}\nlast console lines:\n{}",
                timeout.as_secs(),
                tail(40)
            ))
        }
    }
    if let Some(fatal) = run.lines.iter().find(|l| l.contains("FATAL")) {
        return Err(format!("{fatal} {replay}\nlast console lines:\n{}", tail(40)));
    }
    let fuzzer = format!("[{FUZZER}] ");
    let mine = |l: &&String| l.starts_with(&fuzzer) && l.contains("fuzz: ");
    let summary: Vec<String> =
        run.lines.iter().filter(|l| mine(l) && !l.contains(" calls, ") || l.starts_with(verdict)).cloned().collect();
    let failed: Vec<&String> = run
        .lines
        .iter()
        .filter(|l| (l.starts_with(verdict) && l.contains("FAIL")) || (l.starts_with(&fuzzer) && l.contains("FAILED")))
        .collect();
    if !failed.is_empty() || !run.has_line("[dom0] fuzz: PASS") {
        return Err(format!(
            "{} {replay}\nsummary:\n{}",
            failed.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("\n"),
            summary.join("\n")
        ));
    }
    let calls_per_s = run
        .lines
        .iter()
        .find_map(|l| l.split("calls_per_s=").nth(1)?.split(' ').next()?.parse().ok())
        .ok_or_else(|| format!("no `fuzz: done` line from the fuzzer {replay}\n{}", tail(40)))?;
    Ok(Report { seed, calls, calls_per_s, wall, summary })
}

pub fn run(args: &[String]) -> Result<(), String> {
    let mut it = args.iter();
    match it.next().map(String::as_str) {
        Some("hypercalls") => {}
        Some(other) => return Err(format!("fuzz: unknown target `{other}` (known: hypercalls)")),
        None => return Err("fuzz: what? usage: cargo xtask fuzz hypercalls [--calls N] [--seed S]".into()),
    }
    let (mut calls, mut seed, mut echo, mut only) = (1_000_000u64, None, false, String::new());
    while let Some(a) = it.next() {
        let mut number = |what: &str| -> Result<u64, String> {
            let v = it.next().ok_or_else(|| format!("{what} needs a number"))?;
            v.replace('_', "").parse().map_err(|_| format!("{what}: `{v}` is not a number"))
        };
        match a.as_str() {
            "--calls" => calls = number("--calls")?,
            "--seed" => seed = Some(number("--seed")?),
            "--console" => echo = true,
            "--only" => only = format!("only={}", it.next().ok_or("--only needs a hypercall name")?),
            other => return Err(format!("fuzz hypercalls: unknown option `{other}`")),
        }
    }
    let seed = seed.unwrap_or_else(fresh_seed);
    println!("fuzz: seed {seed}, {calls} calls (replay with --seed {seed})");
    let artifacts = build::build(&build::default_target_dir(), &crate::manifest::default_stack_path())?;
    let m = machine_with(&artifacts, calls, seed, &only, "fuzz.bin")?;
    let report = check(&m, seed, calls, timeout_for(calls), echo)?;
    for l in &report.summary {
        println!("{l}");
    }
    println!(
        "fuzz: PASS: seed {seed}, {calls} calls at {} calls/s (fuzzer's clock), {:.1} s wall: no microvisor fault, no leak, {CLIENT} still served",
        report.calls_per_s,
        report.wall.as_secs_f64()
    );
    Ok(())
}

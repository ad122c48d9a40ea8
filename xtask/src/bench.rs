//! `cargo xtask bench ipc`: the cost of IPC, measured in instructions.
//!
//! The benchmark stack (`stacks/bench-ipc.toml`) runs twice in one invocation:
//! 1. under `-icount shift=0,align=off,sleep=off`, where the guest TSC counts executed
//!    instructions (microvisor and domains alike), so the client's medians are exact and
//!    repeatable: a null hypercall round trip (the floor), a call/reply round trip, and a
//!    doorbell (notification) ping-pong;
//! 2. without icount, where the host times the IPC phase between the client's console
//!    lines, for a wall-clock cost per round trip (noisy under emulation: compare ratios).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::build::{self, Artifacts};
use crate::qemu::{self, Ending, Machine};

const STACK: &str = "stacks/bench-ipc.toml";
const CLIENT: &str = "ping";

/// The figures the client prints.
#[derive(Debug, Clone, Copy, Default)]
pub struct IpcFigures {
    pub n: u64,
    pub null_hypercall: u64,
    pub ipc_roundtrip: u64,
    pub notification_roundtrip: u64,
    pub outliers: u64,
}

/// Parse `bench: n=.. null_hypercall_median=.. ipc_roundtrip_median=.. notification_roundtrip_median=.. outliers=..`.
pub fn parse_figures(line: &str) -> Option<IpcFigures> {
    let rest = line.split("bench: ").nth(1)?;
    let mut f = IpcFigures::default();
    let mut seen = 0;
    for word in rest.split_ascii_whitespace() {
        let (k, v) = word.split_once('=')?;
        let v: u64 = v.parse().ok()?;
        seen += 1;
        match k {
            "n" => f.n = v,
            "null_hypercall_median" => f.null_hypercall = v,
            "ipc_roundtrip_median" => f.ipc_roundtrip = v,
            "notification_roundtrip_median" => f.notification_roundtrip = v,
            "outliers" => f.outliers = v,
            _ => seen -= 1,
        }
    }
    (seen == 5).then_some(f)
}

fn bench_machine(artifacts: &Artifacts, n: u64, icount: bool) -> Result<Machine, String> {
    let mut manifest = crate::manifest::load(&crate::workspace_root().join(STACK), &build::known_images())?;
    for d in manifest.domains.iter_mut().filter(|d| d.name == CLIENT) {
        d.args = format!("bench={n}");
    }
    let out = artifacts.bundle.with_file_name("bench-ipc.bin");
    let stack = build::pack_manifest(&artifacts.images, &manifest, &out)?;
    let mut m = Machine::new(&Artifacts { bundle: out, stack, ..artifacts.clone() });
    if icount {
        m.extra = vec!["-icount".into(), "shift=0,align=off,sleep=off".into()];
    }
    Ok(m)
}

fn failure(run: &qemu::Run, what: &str) -> String {
    let tail: Vec<&String> = run.lines.iter().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
    format!(
        "{what}: {:?}; last console lines:\n{}",
        run.ending,
        tail.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("\n")
    )
}

pub fn run(args: &[String]) -> Result<(), String> {
    let mut n: u64 = 100_000;
    let mut it = args.iter();
    match it.next().map(String::as_str) {
        Some("ipc") => {}
        Some(other) => return Err(format!("bench: unknown benchmark `{other}` (known: ipc)")),
        None => return Err("bench: which benchmark? usage: cargo xtask bench ipc [--n N]".into()),
    }
    while let Some(a) = it.next() {
        match a.as_str() {
            "--n" => {
                let v = it.next().ok_or("--n needs a number")?;
                n = v.parse().map_err(|_| format!("--n: `{v}` is not a number"))?;
            }
            other => return Err(format!("bench ipc: unknown option `{other}`")),
        }
    }
    let target = build::default_target_dir();
    let artifacts = build::build(&target, &crate::manifest::default_stack_path())?;
    let timeout = Duration::from_secs(60 + n / 100);
    let done = |lines: &[String]| lines.iter().any(|l| l.starts_with("[ping] bench: n="));

    eprintln!("bench ipc: run 1 of 2: {n} iterations per phase under -icount (instruction counts)");
    let m = bench_machine(&artifacts, n, true)?;
    let run = qemu::run_captured(&m, timeout, false, done)?;
    let figures = run
        .lines
        .iter()
        .find_map(|l| if l.starts_with("[ping] bench: n=") { parse_figures(l) } else { None })
        .ok_or_else(|| failure(&run, "the icount run ended without results"))?;

    eprintln!("bench ipc: run 2 of 2: the same without icount (wall-clock time)");
    let m = bench_machine(&artifacts, n, false)?;
    let (mut start, mut end) = (None, None);
    let run2 = qemu::run_captured(&m, timeout, false, |lines| {
        if let Some(last) = lines.last() {
            if last.contains("bench: phase ipc start") {
                start = Some(Instant::now());
            } else if last.contains("bench: phase ipc done") {
                end = Some(Instant::now());
            }
        }
        done(lines)
    })?;
    let wall_ns = match (start, end, &run2.ending) {
        (Some(s), Some(e), Ending::Stopped) => (e - s).as_nanos() as f64 / n as f64,
        _ => return Err(failure(&run2, "the wall-clock run ended without results")),
    };

    report(&figures, wall_ns, &target.join("bench").join("ipc.json"))
}

fn report(f: &IpcFigures, wall_ns: f64, json: &Path) -> Result<(), String> {
    let ratio = f.ipc_roundtrip as f64 / f.null_hypercall.max(1) as f64;
    let ntf_ratio = f.notification_roundtrip as f64 / f.null_hypercall.max(1) as f64;
    println!("IPC benchmark: medians of {} iterations, in instructions (QEMU -icount shift=0)", f.n);
    println!();
    println!("  operation                          instructions   vs null hypercall");
    println!("  null hypercall round trip          {:>12}   {:>6.2}x", f.null_hypercall, 1.0);
    println!("  IPC call/reply round trip          {:>12}   {:>6.2}x", f.ipc_roundtrip, ratio);
    println!("  notification signal/wait ping-pong {:>12}   {:>6.2}x", f.notification_roundtrip, ntf_ratio);
    println!();
    println!(
        "  wall clock per IPC round trip without icount: {:.1} us (TCG: compare ratios, not times)",
        wall_ns / 1000.0
    );
    println!("  samples over the histogram range: {}", f.outliers);
    println!(
        "  target: IPC round trip <= 3x the null hypercall (floor 2x: two exits and two entries): {}",
        if ratio <= 3.0 { "met" } else { "NOT met" }
    );
    if let Some(dir) = json.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let text = format!(
        "{{\n  \"iterations\": {},\n  \"ipc_roundtrip_instructions\": {},\n  \"null_hypercall_instructions\": {},\n  \"ipc_to_null_ratio\": {:.3},\n  \"notification_roundtrip_instructions\": {},\n  \"notification_to_null_ratio\": {:.3},\n  \"ipc_roundtrip_wall_ns\": {:.0},\n  \"outliers\": {}\n}}\n",
        f.n, f.ipc_roundtrip, f.null_hypercall, ratio, f.notification_roundtrip, ntf_ratio, wall_ns, f.outliers
    );
    std::fs::write(json, text).map_err(|e| format!("writing {}: {e}", json.display()))?;
    println!("\nbench ipc: wrote {}", json.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_client_line() {
        let f = parse_figures(
            "[ping] bench: n=10 null_hypercall_median=150 ipc_roundtrip_median=400 notification_roundtrip_median=900 outliers=2",
        )
        .unwrap();
        assert_eq!(
            (f.n, f.null_hypercall, f.ipc_roundtrip, f.notification_roundtrip, f.outliers),
            (10, 150, 400, 900, 2)
        );
        assert!(parse_figures("[ping] bench: n=10 null_hypercall_median=x").is_none());
        assert!(parse_figures("[ping] bench: phase ipc start").is_none());
    }
}

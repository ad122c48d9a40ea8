//! `cargo xtask bench ipc`: the cost of IPC, measured in instructions.
//!
//! The benchmark stack (`stacks/bench-ipc.toml`) runs twice in one invocation:
//! 1. under `-icount shift=0,align=off,sleep=off`, where the guest TSC counts executed
//!    instructions (microvisor and domains alike), so the client's medians are exact and
//!    repeatable: a null hypercall round trip (the floor), a call/reply round trip, and a
//!    doorbell (notification) ping-pong;
//! 2. without icount, where the host times the IPC phase between the client's console
//!    lines, for a wall-clock cost per round trip (noisy under emulation: compare ratios).
//!
//! With `--machine bochs` the same stack runs once on Bochs (the VMX build): with
//! `clock: sync=none` Bochs's TSC advances one tick per emulated instruction (the
//! microvisor's PIT calibration reads a TSC of `bochs::IPS` / 1 MHz, 10 MHz), so the
//! client's RDTSC differences are instruction counts, microvisor included, and repeatable;
//! there is no wall-clock run. `target/bench/ipc-vmx.json`.

use std::path::{Path, PathBuf};
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
    /// A VM exit its VMM answers: exit, message, reply, resume.
    pub vm_exit_roundtrip: u64,
}

/// Parse the tiny VM's `bench: n=.. vm_exit_roundtrip_median=..` (printed by its VMM).
pub fn parse_vm_exit(line: &str) -> Option<u64> {
    let rest = line.split("bench: ").nth(1)?;
    rest.split_ascii_whitespace().find_map(|w| w.strip_prefix("vm_exit_roundtrip_median=")?.parse().ok())
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

/// The machine of a benchmark stack, `stacks/<name>.toml` packed beside `artifacts`' bundle
/// as `<name>.bin`, booting a microvisor built with `features` (none: `artifacts`' own);
/// with the stack file's path, for messages.
pub(crate) fn stack_machine(
    target: &Path,
    artifacts: &Artifacts,
    name: &str,
    features: &[&str],
) -> Result<(PathBuf, Machine), String> {
    let stack = crate::workspace_root().join("stacks").join(format!("{name}.toml"));
    let out = artifacts.bundle.with_file_name(format!("{name}.bin"));
    let info = build::pack(&artifacts.images, &stack, &out)?;
    let microvisor = match features {
        [] => artifacts.microvisor.clone(),
        _ => build::compile_microvisor_with(target, features)?,
    };
    Ok((stack, Machine::new(&Artifacts { bundle: out, stack: info, microvisor, ..artifacts.clone() })))
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

pub(crate) fn failure(run: &qemu::Run, what: &str) -> String {
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
        Some("blk") => return blk(it.as_slice()),
        Some("net") => return crate::bench_net::run(it.as_slice()),
        Some("boot") => return crate::bench_boot::run(it.as_slice()),
        Some("restart") => return crate::bench_restart::run(it.as_slice()),
        Some("linux-io") => return crate::bench_linux_io::run(it.as_slice()),
        Some(other) => {
            return Err(format!("bench: unknown benchmark `{other}` (known: ipc, blk, net, boot, restart, linux-io)"))
        }
        None => {
            return Err("bench: which benchmark? usage: cargo xtask bench ipc [--n N] | blk [--icount] | net | boot [--n N] | restart [--kills N] | linux-io".into())
        }
    }
    let (mut bochs, mut n_given) = (false, false);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--n" => {
                let v = it.next().ok_or("--n needs a number")?;
                n = v.parse().map_err(|_| format!("--n: `{v}` is not a number"))?;
                n_given = true;
            }
            "--machine" => match it.next().map(String::as_str) {
                Some("bochs") => bochs = true,
                Some("qemu") => bochs = false,
                other => return Err(format!("--machine: {other:?} is neither `qemu` nor `bochs`")),
            },
            other => return Err(format!("bench ipc: unknown option `{other}`")),
        }
    }
    let target = build::default_target_dir();
    let artifacts = build::build(&target, &crate::manifest::default_stack_path())?;
    let timeout = Duration::from_secs(60 + n / 100);
    let vm_line = |l: &String| l.starts_with("[vmm] guest: bench: ");
    let done = |lines: &[String]| lines.iter().any(|l| l.starts_with("[ping] bench: n=")) && lines.iter().any(vm_line);
    let figures_of = |run: &qemu::Run| -> Result<IpcFigures, String> {
        let mut f = run
            .lines
            .iter()
            .find_map(|l| if l.starts_with("[ping] bench: n=") { parse_figures(l) } else { None })
            .ok_or_else(|| failure(run, "the run ended without results"))?;
        f.vm_exit_roundtrip = run
            .lines
            .iter()
            .filter(|l| vm_line(l))
            .find_map(|l| parse_vm_exit(l))
            .ok_or_else(|| failure(run, "the run ended without the VM exit figure"))?;
        Ok(f)
    };

    if bochs {
        // Bochs runs some 30 times slower than QEMU's TCG: fewer iterations by default.
        let n = if n_given { n } else { 10_000 };
        eprintln!("bench ipc: {n} iterations per phase on Bochs (VMX build; TSC = instructions)");
        let m = bench_machine(&artifacts, n, false)?;
        let dir = target.join("bench").join("bochs");
        let bundle = m.initrd.clone().ok_or("the benchmark stack has no bundle")?;
        let iso = crate::iso::build_iso(&build::vmx_image(&artifacts.microvisor), &bundle, "", &dir.join("stack.iso"))?;
        let machine = crate::bochs::BochsMachine::new(&iso, &dir);
        let run = crate::bochs::run_captured(&machine, Duration::from_secs(600 + n / 20), false, done)?;
        return report(
            &figures_of(&run)?,
            None,
            "Bochs corei7_skylake_x, VMX, clock sync=none",
            &target.join("bench").join("ipc-vmx.json"),
        );
    }

    eprintln!("bench ipc: run 1 of 2: {n} iterations per phase under -icount (instruction counts)");
    let m = bench_machine(&artifacts, n, true)?;
    let run = qemu::run_captured(&m, timeout, false, done)?;
    let figures = figures_of(&run)?;

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

    report(&figures, Some(wall_ns), "QEMU -icount shift=0", &target.join("bench").join("ipc.json"))
}

fn report(f: &IpcFigures, wall_ns: Option<f64>, machine: &str, json: &Path) -> Result<(), String> {
    let ratio = f.ipc_roundtrip as f64 / f.null_hypercall.max(1) as f64;
    let ntf_ratio = f.notification_roundtrip as f64 / f.null_hypercall.max(1) as f64;
    println!("IPC benchmark: medians of {} iterations, in instructions ({machine})", f.n);
    println!();
    println!("  operation                          instructions   vs null hypercall");
    println!("  null hypercall round trip          {:>12}   {:>6.2}x", f.null_hypercall, 1.0);
    println!("  IPC call/reply round trip          {:>12}   {:>6.2}x", f.ipc_roundtrip, ratio);
    println!("  notification signal/wait ping-pong {:>12}   {:>6.2}x", f.notification_roundtrip, ntf_ratio);
    println!(
        "  VM exit handled by its VMM          {:>12}   {:>6.2}x",
        f.vm_exit_roundtrip,
        f.vm_exit_roundtrip as f64 / f.null_hypercall.max(1) as f64
    );
    println!();
    if let Some(ns) = wall_ns {
        println!(
            "  wall clock per IPC round trip without icount: {:.1} us (TCG: compare ratios, not times)",
            ns / 1000.0
        );
    }
    println!("  samples over the histogram range: {}", f.outliers);
    println!(
        "  target: IPC round trip <= 3x the null hypercall (floor 2x: two exits and two entries): {}",
        if ratio <= 3.0 { "met" } else { "NOT met" }
    );
    if let Some(dir) = json.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let text = format!(
        "{{\n  \"iterations\": {},\n  \"ipc_roundtrip_instructions\": {},\n  \"null_hypercall_instructions\": {},\n  \"ipc_to_null_ratio\": {:.3},\n  \"notification_roundtrip_instructions\": {},\n  \"notification_to_null_ratio\": {:.3},\n  \"ipc_roundtrip_wall_ns\": {},\n  \"outliers\": {},\n  \"vm_exit_roundtrip_instructions\": {}\n}}\n",
        f.n,
        f.ipc_roundtrip,
        f.null_hypercall,
        ratio,
        f.notification_roundtrip,
        ntf_ratio,
        wall_ns.map_or("null".to_string(), |ns| format!("{ns:.0}")),
        f.outliers,
        f.vm_exit_roundtrip
    );
    std::fs::write(json, text).map_err(|e| format!("writing {}: {e}", json.display()))?;
    println!("\nbench ipc: wrote {}", json.display());
    Ok(())
}

/// One line `bench blk: via=<via> workload=<name> bytes=<n> ns=<t>`.
pub fn parse_blk(line: &str) -> Option<(String, String, u64, u64)> {
    let rest = line.split("bench blk: ").nth(1)?;
    let (mut via, mut name, mut bytes, mut ns) = (None, None, None, None);
    for word in rest.split_ascii_whitespace() {
        match word.split_once('=')? {
            ("via", v) => via = Some(v.to_string()),
            ("workload", v) => name = Some(v.to_string()),
            ("bytes", v) => bytes = v.parse().ok(),
            ("ns", v) => ns = v.parse().ok(),
            _ => {}
        }
    }
    Some((via?, name?, bytes?, ns?))
}

/// The median of the ratios `driver[i] / direct[i]` of rounds run back to back (0 if none).
pub fn paired_median(driver: &[f64], direct: &[f64]) -> f64 {
    let mut r: Vec<f64> = driver.iter().zip(direct).filter(|(_, x)| **x > 0.0).map(|(d, x)| d / x).collect();
    if r.is_empty() {
        return 0.0;
    }
    r.sort_by(f64::total_cmp);
    let m = r.len() / 2;
    if r.len() % 2 == 1 {
        r[m]
    } else {
        (r[m - 1] + r[m]) / 2.0
    }
}

/// `cargo xtask bench blk`: the block workloads from the guest through the disk driver VM,
/// and the same workloads by a domain that owns a disk directly, in one boot.
///
/// `--icount`: run QEMU with `-icount shift=0,sleep=on`: the domains' clock then advances one
/// nanosecond per instruction executed, and with real time only while every vCPU is idle
/// (waiting for the device). The host's load then moves only the device's share of the
/// figures, and the cost of TCG's emulation of world switches (a TLB flush each) drops
/// out, as on hardware, where it is small; the instructions each side executes stay.
fn blk(args: &[String]) -> Result<(), String> {
    let mut icount = false;
    for a in args {
        match a.as_str() {
            "--icount" => icount = true,
            _ => return Err(format!("bench blk: unknown option `{a}` (known: --icount)")),
        }
    }
    let target = build::default_target_dir();
    let artifacts = build::build(&target, &crate::manifest::default_stack_path())?;
    // The `counts` build: it prints every domain's exits after each result line, for the
    // per-request table (diagnostics kept out of the default build and its line count).
    let (stack, mut m) = stack_machine(&target, &artifacts, "bench-blk", &["counts"])?;
    if icount {
        m.extra = vec!["-icount".into(), "shift=0,align=off,sleep=on".into()];
    }
    // Fresh disks for a repeatable run.
    for (i, disk) in m.disks.iter_mut().enumerate() {
        *disk = target.join("bench").join(format!("blk-disk{i}.img"));
        let _ = std::fs::remove_file(&*disk);
    }
    eprintln!(
        "bench blk: booting {} ({}; TCG: compare the ratios)",
        stack.display(),
        if icount { "under -icount: instructions, plus real time while idle" } else { "wall-clock time" }
    );
    // A side that fails stops the run at once (the other would wait for its turn for ever).
    let failed = |l: &String| {
        l.contains("bench blk: ") && ["failed", "could not", "did not answer"].iter().any(|f| l.contains(f))
    };
    let done = |lines: &[String]| {
        lines.iter().any(failed)
            || ["via=driver done", "via=direct done"].iter().all(|d| lines.iter().any(|l| l.contains(d)))
    };
    let run = qemu::run_captured(&m, Duration::from_secs(600), false, done)?;
    if !matches!(run.ending, Ending::Stopped) || run.lines.iter().any(failed) {
        return Err(failure(&run, "the block benchmark did not finish"));
    }
    // The whole console, for a look at what the domains said (e.g. about interrupts).
    let _ = std::fs::write(
        target.join("bench").join(if icount { "blk-icount.log" } else { "blk.log" }),
        run.lines.join("\n"),
    );
    let results: Vec<_> = run.lines.iter().filter_map(|l| parse_blk(l)).collect();
    // Each round's rate (MB/s), in the order they ran.
    let rates = |via: &str, name: &str| -> Vec<f64> {
        results
            .iter()
            .filter(|(v, n, _, _)| v == via && n == name)
            .map(|(_, _, bytes, ns)| *bytes as f64 * 1e3 / *ns.max(&1) as f64)
            .collect()
    };
    let mut names: Vec<String> = Vec::new();
    for (_, n, ..) in results.iter().filter(|(v, ..)| v == "driver") {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let rounds =
        names.first().map_or(0, |first| results.iter().filter(|(v, n, ..)| v == "driver" && n == first).count());
    println!("Block benchmark: the guest through the disk driver VM vs. a domain owning a disk directly");
    println!(
        "(MB/s, {} under TCG, best of {rounds} rounds; the sides alternate workload by workload, and",
        if icount { "-icount time (1 ns per instruction, real time while idle)" } else { "wall clock" }
    );
    println!("\"paired\" is the median over the rounds of driver VM / direct of the same round)\n");
    println!("  workload          driver VM      direct   best/best   paired");
    let mut json = String::from("{\n  \"workloads\": {\n");
    let mut worst: Option<f64> = None;
    for (i, name) in names.iter().enumerate() {
        let (d, x) = (rates("driver", name), rates("direct", name));
        let (Some(db), Some(xb)) = (d.iter().copied().reduce(f64::max), x.iter().copied().reduce(f64::max)) else {
            continue;
        };
        let paired = paired_median(&d, &x);
        worst = Some(worst.map_or(paired, |w| w.min(paired)));
        println!("  {name:<16} {db:>10.1} {xb:>11.1} {:>11.2} {paired:>8.2}", db / xb);
        json.push_str(&format!(
            "    \"{name}\": {{ \"driver_vm_mb_s\": {db:.1}, \"direct_mb_s\": {xb:.1}, \"ratio\": {:.3}, \"paired_ratio\": {paired:.3} }}{}\n",
            db / xb,
            if i + 1 < names.len() { "," } else { "" }
        ));
    }
    json.push_str("  }");
    // Exits, world switches, virtual interrupts and doorbells per request (the microvisor's
    // counts around each run; see bench_counts), summed over the rounds.
    let counts = crate::bench_counts::per_request(&run.lines, |l| {
        let (via, name, ..) = parse_blk(l)?;
        let n = l.split_ascii_whitespace().find_map(|w| w.strip_prefix("requests="))?.parse().ok()?;
        Some((via, name, n))
    });
    if !counts.is_empty() {
        // The time per request the machine was busy: each run's time less the machine's idle
        // time meanwhile. Under -icount that is instructions executed (microvisor and every
        // domain), whatever the host's load.
        let busy = |via: &str, name: &str, idle: f64| {
            let (ns, n) = results
                .iter()
                .filter(|(v, w, ..)| v == via && w == name)
                .filter_map(|(.., ns)| {
                    let l = run
                        .lines
                        .iter()
                        .find(|l| parse_blk(l).is_some_and(|(v, w, _, t)| v == via && w == name && t == *ns))?;
                    let n: u64 = l.split_ascii_whitespace().find_map(|w| w.strip_prefix("requests="))?.parse().ok()?;
                    Some((*ns as f64, n as f64))
                })
                .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
            (ns / n.max(1.0) - idle).max(0.0)
        };
        println!("\n  per request (whole machine; exits: all, hc: hypercalls, hlt, int: physical interrupts,");
        println!("  sw: world switches into a domain, virq: virtual interrupts, sig: notification signals,");
        println!(
            "  idle, busy: ns the machine was idle, busy{})",
            if icount { "; under -icount busy ns = instructions executed" } else { "" }
        );
        println!("  workload         via         exits     hc    hlt    int     sw   virq    sig     idle     busy");
        json.push_str(",\n  \"per_request\": {\n");
        let mut busy_ratios = Vec::new();
        for (i, ((via, name), c)) in counts.iter().enumerate() {
            let b = busy(via, name, c[7]);
            println!(
                "  {name:<16} {via:<8} {:>8.2} {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>8.0} {b:>8.0}",
                c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
            );
            if via == "driver" {
                if let Some(d) = counts.get(&("direct".to_string(), name.clone())) {
                    busy_ratios.push((name.clone(), busy("direct", name, d[7]) / b.max(1.0)));
                }
            }
            let fields: Vec<String> =
                crate::bench_counts::FIELDS.iter().zip(c).map(|(f, v)| format!("\"{f}\": {v:.3}")).collect();
            json.push_str(&format!(
                "    \"{name}/{via}\": {{ {}, \"busy_ns\": {b:.0} }}{}\n",
                fields.join(", "),
                if i + 1 < counts.len() { "," } else { "" }
            ));
        }
        json.push_str("  }");
        if !busy_ratios.is_empty() {
            println!("\n  busy time per request, direct / driver VM (1 = no cost for the hop):");
            json.push_str(",\n  \"busy_ratio\": {\n");
            for (i, (name, r)) in busy_ratios.iter().enumerate() {
                println!("  {name:<16} {r:>6.2}");
                json.push_str(&format!("    \"{name}\": {r:.3}{}\n", if i + 1 < busy_ratios.len() { "," } else { "" }));
            }
            json.push_str("  }");
        }
    }
    if let Some(w) = worst {
        println!(
            "\n  goal (issue 12): every workload through the driver VM >= 0.85 of direct (paired): worst {w:.2} ({})",
            if w >= 0.85 { "met" } else { "NOT met" }
        );
        json.push_str(&format!(",\n  \"worst_paired_ratio\": {w:.3},\n  \"icount\": {icount}"));
    }
    json.push_str("\n}\n");
    let path = target.join("bench").join(if icount { "blk-icount.json" } else { "blk.json" });
    std::fs::create_dir_all(path.parent().unwrap_or(&target))
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    std::fs::write(&path, json).map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!("\nbench blk: wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_rounds_before_taking_the_median() {
        // A disturbed direct round (the second) does not make the driver VM look fast.
        let d = [100.0, 100.0, 100.0];
        let x = [125.0, 50.0, 110.0];
        assert!((paired_median(&d, &x) - 100.0 / 110.0).abs() < 1e-9);
        assert_eq!(paired_median(&[1.0, 3.0], &[1.0, 1.0]), 2.0);
        assert_eq!(paired_median(&[], &[]), 0.0);
    }

    #[test]
    fn parses_block_lines() {
        let l = "[guest] bench blk: via=driver workload=seq-read-64k bytes=16777216 ns=21049333";
        assert_eq!(parse_blk(l), Some(("driver".into(), "seq-read-64k".into(), 16777216, 21049333)));
        assert_eq!(parse_blk("[guest] bench blk: via=driver done"), None);
    }

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

    #[test]
    fn parses_the_vm_line() {
        assert_eq!(parse_vm_exit("[vmm] guest: bench: n=10000 vm_exit_roundtrip_median=1234"), Some(1234));
        assert_eq!(parse_vm_exit("[vmm] guest: bench: n=10000 vm_exit_roundtrip_median=x"), None);
        assert_eq!(parse_vm_exit("[vmm] guest: tiny VM: ready"), None);
    }
}

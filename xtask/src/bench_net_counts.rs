//! `cargo xtask bench net --counts`: where each `bench net` workload's work goes, counted
//! rather than timed. The stack runs under `-icount shift=0,align=off,sleep=on` (the
//! microvisor's clock advances one ns per instruction while anything runs, and with real
//! time while the machine is idle) with the `counts-periodic` microvisor, which prints
//! every domain's exit counts and instructions in guest mode every 50 ms of its clock. The
//! host runs each workload once on each path with pauses between them; the lines with
//! activity form one segment per workload, and their differences are the workload's cost:
//! exits by kind, world switches, signals and instructions per domain, and the
//! microvisor's own instructions (busy time less every domain's).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::bench::failure;
use crate::bench_counts::{parse_counts, Counts, FIELDS};
use crate::build;
use crate::qemu::{self, Ending};

/// The workloads in the order they run, each on the driver VM path, then direct.
const ORDER: [(usize, &str); 6] = [
    (0, "host -> guest, driver VM"),
    (0, "host -> guest, direct"),
    (1, "guest -> host, driver VM"),
    (1, "guest -> host, direct"),
    (2, "small requests, driver VM"),
    (2, "small requests, direct"),
];

/// A line is active when some domain made more exits than this since the line before
/// (idle domains make a few per 50 ms: timers, the watchdog).
const ACTIVE_EXITS: u64 = 40;

fn field(c: &Counts, name: &str) -> u64 {
    FIELDS.iter().position(|f| *f == name).map_or(0, |i| c[i])
}

/// Per domain, `after - before`.
fn delta(before: &BTreeMap<String, Counts>, after: &BTreeMap<String, Counts>) -> BTreeMap<String, Counts> {
    after
        .iter()
        .map(|(name, a)| {
            let b = before.get(name).copied().unwrap_or([0; FIELDS.len()]);
            (name.clone(), core::array::from_fn(|i| a[i].saturating_sub(b[i])))
        })
        .collect()
}

/// The segments of activity in the counts lines: each the per-domain difference from the
/// last idle line before it to its last active line. Active lines at most `gap` idle
/// lines apart belong to one segment.
pub fn segments(lines: &[String], gap: usize) -> Vec<BTreeMap<String, Counts>> {
    let all: Vec<BTreeMap<String, Counts>> = lines.iter().filter_map(|l| parse_counts(l)).collect();
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let mut last_active = 0;
    for i in 1..all.len() {
        let d = delta(&all[i - 1], &all[i]);
        let active = d.iter().any(|(n, c)| n != "(machine)" && field(c, "exits") > ACTIVE_EXITS);
        if active {
            if start.is_none() {
                start = Some(i - 1);
            }
            last_active = i;
        } else if let Some(s) = start {
            if i - last_active > gap {
                out.push(delta(&all[s], &all[last_active]));
                start = None;
            }
        }
    }
    if let Some(s) = start {
        out.push(delta(&all[s], &all[last_active]));
    }
    out
}

/// `cargo xtask bench net --counts`.
pub fn run() -> Result<(), String> {
    let target = build::default_target_dir();
    let artifacts = build::build(&target, &crate::manifest::default_stack_path())?;
    let (stack, mut m) = crate::bench::stack_machine(&target, &artifacts, "bench-net", &["counts-periodic"])?;
    // `BENCH_NET_PERF=1`: no icount; `perf record --call-graph dwarf` of QEMU around each
    // workload instead, into target/bench/perf-<n>.data (n in the order of ORDER).
    let perf = std::env::var_os("BENCH_NET_PERF").is_some();
    let sched = std::env::var("BENCH_NET_PERF").is_ok_and(|v| v == "sched");
    if !perf {
        m.extra = vec!["-icount".into(), "shift=0,align=off,sleep=on".into()];
    }
    for port in m.net_ports.iter_mut() {
        *port = qemu::free_port()?;
    }
    let [driver_port, direct_port] = m.net_ports[..] else {
        return Err(format!("{}: expected two virtio-net devices", stack.display()));
    };
    eprintln!("bench net --counts: booting {} under -icount", stack.display());
    let serving = |who: &str, lines: &[String]| lines.iter().any(|l| l.starts_with(who) && l.contains("serving HTTP"));
    let mut result = None;
    let mut status_lines = Vec::new();
    let run = qemu::run_captured(&m, Duration::from_secs(900), false, |lines| {
        if serving("[guest]", lines) && serving("[direct]", lines) {
            let pause = || std::thread::sleep(Duration::from_millis(1500));
            pause();
            let qemu = crate::bench_net::find_qemu(driver_port);
            result = Some(ORDER.iter().enumerate().try_for_each(|(n, &(w, name))| {
                let port = if name.ends_with("direct") { direct_port } else { driver_port };
                eprintln!("bench net --counts: {name}");
                let recorder = match (perf, qemu) {
                    (true, Some(pid)) => {
                        let out = target.join("bench").join(format!("perf-{n}.data"));
                        // `BENCH_NET_PERF=sched`: the scheduler's switches and wake-ups (why a
                        // thread was off the CPU) instead of CPU samples.
                        let what: &[&str] = if sched {
                            &["-e", "sched:sched_switch", "-e", "sched:sched_wakeup", "-g"]
                        } else {
                            &["--call-graph", "dwarf,16384", "-F", "4000"]
                        };
                        let r = std::process::Command::new("perf")
                            .args(["record", "-q"])
                            .args(what)
                            .args(["-p", &pid.to_string(), "-o"])
                            .arg(&out)
                            .stderr(std::process::Stdio::null())
                            .spawn()
                            .map_err(|e| format!("perf: {e}"))?;
                        std::thread::sleep(Duration::from_millis(300));
                        Some(r)
                    }
                    _ => None,
                };
                crate::bench_net::workload(w, port)?;
                if let Some(mut r) = recorder {
                    let _ = std::process::Command::new("kill").args(["-INT", &r.id().to_string()]).status();
                    let _ = r.wait();
                }
                pause();
                Ok::<(), String>(())
            }));
            // The guests' own account (their status pages' device lines: doorbells, waits
            // that only the timer ended).
            for port in [driver_port, direct_port] {
                let page = crate::http_client::connect(port)
                    .and_then(|mut s| crate::http_client::request(&mut s, "GET", "/", b""));
                if let Ok((_, body)) = page {
                    for l in String::from_utf8_lossy(&body).lines().filter(|l| l.starts_with("net")) {
                        status_lines.push(l.to_string());
                    }
                }
            }
            return true;
        }
        lines.iter().any(|l| l.contains("FATAL"))
    })?;
    let log = target.join("bench").join("net-counts.log");
    std::fs::create_dir_all(log.parent().unwrap_or(&target)).map_err(|e| format!("creating {}: {e}", log.display()))?;
    std::fs::write(&log, run.lines.join("\n") + "\n").map_err(|e| format!("writing {}: {e}", log.display()))?;
    let Some(result) = result else {
        return Err(failure(&run, "the guests did not both serve HTTP"));
    };
    result.map_err(|e| format!("bench net --counts: {e}"))?;
    if !matches!(run.ending, Ending::Stopped) {
        return Err(failure(&run, "QEMU ended early"));
    }
    // The pauses are 30 lines; a workload idles for a line at most at its start.
    let segs = segments(&run.lines, 3);
    if segs.len() != ORDER.len() {
        return Err(format!(
            "bench net --counts: found {} segments of activity for {} workloads (see {})",
            segs.len(),
            ORDER.len(),
            log.display()
        ));
    }
    println!("Network benchmark, counted under -icount (one run of each workload on each path; instr: instructions)");
    println!("per unit: per 8 MiB transfer, per request for small requests\n");
    println!(
        "  {:<27} {:<8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>11} {:>9}",
        "workload", "domain", "exits", "hc", "hlt", "int", "sw", "sig", "instr", "instr/sw"
    );
    for (seg, &(w, name)) in segs.iter().zip(&ORDER) {
        let per = if w == 2 { crate::bench_net::REQUESTS as f64 } else { 1.0 };
        let mut run_sum = 0;
        for (dom, c) in seg.iter().filter(|(n, _)| n.as_str() != "(machine)") {
            run_sum += field(c, "run");
            if field(c, "exits") == 0 {
                continue;
            }
            let f = |k: &str| field(c, k) as f64 / per;
            println!(
                "  {name:<27} {dom:<8} {:>8.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>11.0} {:>9.0}",
                f("exits"),
                f("hc"),
                f("hlt"),
                f("int"),
                f("sw"),
                f("sig"),
                f("run"),
                field(c, "run") as f64 / field(c, "sw").max(1) as f64
            );
        }
        if let Some(mc) = seg.get("(machine)") {
            let busy = field(mc, "now").saturating_sub(field(mc, "idle"));
            println!(
                "  {name:<27} {:<8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>11.0}   (busy {:.0}, idle {:.0} ns)",
                "microvisor",
                "",
                "",
                "",
                "",
                "",
                "",
                busy.saturating_sub(run_sum) as f64 / per,
                busy as f64 / per,
                field(mc, "idle") as f64 / per
            );
        }
    }
    for l in &status_lines {
        println!("  status page: {l}");
    }
    println!("\nbench net --counts: console in {}", log.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_segments_of_activity() {
        let line =
            |a: u64, b: u64| format!("[microvisor] counts: a exits={a} run={a}; b exits={b}; (machine) idle=0 now=0;");
        let lines: Vec<String> = [
            line(0, 0),
            line(1, 1),
            line(100, 1), // segment 1 from here
            line(200, 2),
            line(201, 2), // idle
            line(300, 2), // still segment 1 (gap 1)
            line(301, 2),
            line(302, 3),
            line(303, 3),
            line(303, 103), // segment 2
            line(304, 104),
            line(305, 105),
            line(306, 106),
            line(307, 107),
        ]
        .to_vec();
        let s = segments(&lines, 2);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(field(&s[0]["a"], "exits"), 299);
        assert_eq!(field(&s[0]["a"], "run"), 299);
        assert_eq!(field(&s[1]["b"], "exits"), 100);
    }
}

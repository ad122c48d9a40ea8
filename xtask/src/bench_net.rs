//! `cargo xtask bench net`: TCP through the net driver VM beside a guest that owns its NIC.
//!
//! The stack `stacks/bench-net.toml` has two NICs on two QEMU user networks: the first is
//! owned by the net driver VM, which switches frames to the demo guest `guest` over a net
//! channel; the second is owned directly by a second demo guest, `direct`. Both serve the
//! same HTTP server, so the host measures, in one run and alternating between the two:
//! host-to-guest throughput (`POST /sink`), guest-to-host throughput (`GET /source`) and
//! small requests per second (`GET /source?bytes=256` on a kept-alive connection).
//!
//! Wall-clock times under TCG on a shared host are noisy, so the two paths are measured as
//! pairs: each workload runs on one path and at once on the other (which goes first
//! alternates), so that a change in the host's load falls on both halves of a pair alike;
//! each pair gives a ratio, and the figure reported is the median over [`ROUNDS`] pairs
//! (the paths' own figures are their medians too). QEMU's CPU time per workload is paired
//! the same way. `BENCH_NET_VERBOSE=1` prints every run's wall clock and CPU time.

use std::time::{Duration, Instant};

use crate::bench::failure;
use crate::build;
use crate::http_client::{connect, request};
use crate::qemu::{self, Ending};

/// Bytes per throughput transfer.
const TRANSFER: usize = 8 << 20;
/// Requests per requests-per-second round (200, about a quarter second, let one
/// descheduling of QEMU by the host's other load decide a round).
pub const REQUESTS: usize = 500;
/// Pairs per workload (the median pair is reported: best-of-5 per path, as before, took
/// each path's luckiest round independently, so one lucky round on either side moved the
/// ratio by up to a factor of 2 at a load of 10 on 2 cores).
const ROUNDS: usize = 9;

/// What is reported per workload (host to guest, guest to host, small requests), in this
/// order: (JSON name, printed name, whether more is better).
const MEASURES: [(&str, &str, bool); 6] = [
    ("host_to_guest_mb_s", "host -> guest (MB/s)", true),
    ("guest_to_host_mb_s", "guest -> host (MB/s)", true),
    ("requests_per_s", "small requests per s", true),
    ("host_to_guest_cpu_ms", "host -> guest, 8 MiB", false),
    ("guest_to_host_cpu_ms", "guest -> host, 8 MiB", false),
    ("requests_cpu_ms", "small requests", false),
];

/// One path's figures, medians over the rounds, in the order of [`MEASURES`]: the rates by
/// wall clock, then QEMU's CPU time per workload (ms; all its threads: the vCPU's and the
/// I/O thread's, which runs the user network). CPU time is what the work cost, which the
/// host's load changes far less than it changes wall clock.
pub type Figures = [f64; 6];

/// The ratios, in the order of [`MEASURES`]: medians of the per-pair ratios (driver VM /
/// direct for rates, direct / driver VM for CPU time: above 1 is the driver VM doing better
/// either way), with the least and greatest pair.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ratios {
    pub median: [f64; 6],
    pub min: [f64; 6],
    pub max: [f64; 6],
}

/// The median of `v` (the mean of the middle two for an even count; 0 for none).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// QEMU's process, found by the host forward of `port` on its command line.
pub fn find_qemu(port: u16) -> Option<u32> {
    let needle = format!("hostfwd=tcp:127.0.0.1:{port}-");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline).contains(&needle).then_some(pid)
    })
}

/// CPU time (ns) used so far by every thread of process `pid`; 0 without one.
fn cpu_ns(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// One workload's run on one path: its amount (MB or requests) and times.
struct Timed {
    amount: f64,
    wall_s: f64,
    cpu_ms: f64,
}

/// Runs `work` (which returns its amount) and returns it with the times QEMU spent.
fn timed(qemu: Option<u32>, work: impl FnOnce() -> Result<f64, String>) -> Result<Timed, String> {
    let c0 = cpu_ns(qemu);
    let t0 = Instant::now();
    let amount = work()?;
    let wall_s = t0.elapsed().as_secs_f64();
    Ok(Timed { amount, wall_s, cpu_ms: cpu_ns(qemu).saturating_sub(c0) as f64 / 1e6 })
}

/// Host to guest: one `POST /sink` of [`TRANSFER`] bytes; MB moved.
fn upload(port: u16) -> Result<f64, String> {
    let mut s = connect(port)?;
    let body = vec![0x5au8; TRANSFER];
    let (status, _) = request(&mut s, "POST", "/sink", &body)?;
    if status != 200 {
        return Err(format!("POST /sink answered {status}"));
    }
    Ok(TRANSFER as f64 / 1e6)
}

/// Guest to host: one `GET /source` of [`TRANSFER`] bytes; MB moved.
fn download(port: u16) -> Result<f64, String> {
    let mut s = connect(port)?;
    let (status, body) = request(&mut s, "GET", &format!("/source?bytes={TRANSFER}"), b"")?;
    if status != 200 || body.len() != TRANSFER {
        return Err(format!("GET /source answered {status} with {} bytes", body.len()));
    }
    Ok(TRANSFER as f64 / 1e6)
}

/// What a small request asks for: [`SMALL_ANSWER`] bytes of `/source`'s pattern, the same
/// work for the server on both paths. (It was `GET /`, whose status page differs by path:
/// behind the driver VM it describes the channel, seven numbers and about 150 bytes more
/// to format and send than the direct guest's, so the server's own work was part of what
/// the ratio compared.)
const SMALL_PATH: &str = "/source?bytes=256";
/// Bytes of each small request's answer body.
const SMALL_ANSWER: usize = 256;

/// Small requests: [`REQUESTS`] `GET` [`SMALL_PATH`] on one kept-alive connection;
/// requests made.
fn requests(port: u16) -> Result<f64, String> {
    let mut s = connect(port)?;
    for _ in 0..REQUESTS {
        let (status, body) = request(&mut s, "GET", SMALL_PATH, b"")?;
        if status != 200 || body.len() != SMALL_ANSWER {
            return Err(format!("GET {SMALL_PATH} answered {status} with {} bytes", body.len()));
        }
    }
    Ok(REQUESTS as f64)
}

/// One workload on the path at `port`.
pub fn workload(w: usize, port: u16) -> Result<f64, String> {
    match w {
        0 => upload(port),
        1 => download(port),
        _ => requests(port),
    }
}

/// Measures both paths in [`ROUNDS`] pairs per workload (see the module's comment).
fn measure(driver_port: u16, direct_port: u16) -> Result<(Figures, Figures, Ratios, [String; 2]), String> {
    let qemu = find_qemu(driver_port);
    // [measure][path][round], and [measure][round]: the pairs' ratios.
    let mut v = [[[0.0; ROUNDS]; 2]; 6];
    let mut pair = [[0.0; ROUNDS]; 6];
    for round in 0..ROUNDS {
        for w in 0..3 {
            let mut order = [(0, driver_port), (1, direct_port)];
            if (round + w) % 2 == 1 {
                order.reverse();
            }
            for (i, port) in order {
                let t = timed(qemu, || workload(w, port))?;
                if std::env::var_os("BENCH_NET_VERBOSE").is_some() {
                    eprintln!(
                        "bench net:   {} through the {}: wall {:.3} s, CPU {:.0} ms",
                        MEASURES[w].1,
                        ["driver VM", "direct NIC"][i],
                        t.wall_s,
                        t.cpu_ms
                    );
                }
                v[w][i][round] = t.amount / t.wall_s.max(1e-9);
                v[3 + w][i][round] = t.cpu_ms;
            }
            for k in [w, 3 + w] {
                let [d, x] = [v[k][0][round], v[k][1][round]];
                pair[k][round] = if MEASURES[k].2 { d / x.max(1e-9) } else { x / d.max(1e-9) };
            }
        }
        let p = |k: usize| pair[k][round];
        eprintln!(
            "bench net: round {}/{ROUNDS}: ratios {:.2} {:.2} {:.2}, CPU {:.2} {:.2} {:.2}",
            round + 1,
            p(0),
            p(1),
            p(2),
            p(3),
            p(4),
            p(5)
        );
    }
    let figures = |i: usize| -> Figures { core::array::from_fn(|k| median(&v[k][i])) };
    let mut ratios = Ratios::default();
    for (k, p) in pair.iter().enumerate() {
        ratios.median[k] = median(p);
        ratios.min[k] = p.iter().copied().fold(f64::INFINITY, f64::min);
        ratios.max[k] = p.iter().copied().fold(0.0, f64::max);
    }
    Ok((
        figures(0),
        figures(1),
        ratios,
        [crate::http_client::server_line(driver_port)?, crate::http_client::server_line(direct_port)?],
    ))
}

/// The JSON report: each path's median figure and the median of the pair ratios, with the
/// least and greatest pair.
pub fn to_json(driver: &Figures, direct: &Figures, r: &Ratios) -> String {
    let mut j = String::from("{\n");
    j.push_str(&format!(
        "  \"transfer_bytes\": {TRANSFER},\n  \"requests_per_round\": {REQUESTS},\n  \"pairs\": {ROUNDS},\n"
    ));
    for (k, (name, _, _)) in MEASURES.iter().enumerate() {
        j.push_str(&format!(
            "  \"{name}\": {{ \"driver_vm\": {:.2}, \"direct\": {:.2}, \"ratio\": {:.3}, \"ratio_min\": {:.3}, \"ratio_max\": {:.3} }}{}\n",
            driver[k],
            direct[k],
            r.median[k],
            r.min[k],
            r.max[k],
            if k + 1 == MEASURES.len() { "" } else { "," }
        ));
    }
    j.push_str("}\n");
    j
}

/// `cargo xtask bench net`.
pub fn run(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        None => {}
        Some("--counts") if args.len() == 1 => return crate::bench_net_counts::run(),
        Some(a) => return Err(format!("bench net: unknown option `{a}` (known: --counts)")),
    }
    let target = build::default_target_dir();
    let artifacts = build::build(&target, &crate::manifest::default_stack_path())?;
    let (stack, mut m) = crate::bench::stack_machine(&target, &artifacts, "bench-net", &[])?;
    for port in m.net_ports.iter_mut() {
        *port = qemu::free_port()?;
    }
    let [driver_port, direct_port] = m.net_ports[..] else {
        return Err(format!("{}: expected two virtio-net devices, found {}", stack.display(), m.net_ports.len()));
    };
    eprintln!(
        "bench net: booting {} (guest via the net driver VM on 127.0.0.1:{driver_port}, direct on 127.0.0.1:{direct_port})",
        stack.display()
    );
    let serving = |who: &str, lines: &[String]| lines.iter().any(|l| l.starts_with(who) && l.contains("serving HTTP"));
    let mut result = None;
    let run = qemu::run_captured(&m, Duration::from_secs(900), false, |lines| {
        if serving("[guest]", lines) && serving("[direct]", lines) {
            result = Some(measure(driver_port, direct_port));
            return true;
        }
        lines.iter().any(|l| l.contains("FATAL"))
    })?;
    let Some(result) = result else {
        return Err(failure(&run, "the guests did not both serve HTTP"));
    };
    let log = target.join("bench").join("net.log");
    std::fs::create_dir_all(log.parent().unwrap_or(&target)).map_err(|e| format!("creating {}: {e}", log.display()))?;
    std::fs::write(&log, run.lines.join("\n") + "\n").map_err(|e| format!("writing {}: {e}", log.display()))?;
    let (driver, direct, ratios, servers) = result.map_err(|e| format!("bench net: {e}"))?;
    if !matches!(run.ending, Ending::Stopped) {
        return Err(failure(&run, "QEMU ended early"));
    }
    println!("Network benchmark: the guest through the net driver VM vs. a guest owning its NIC");
    println!("(wall clock under TCG; medians of {ROUNDS} pairs, each pair both paths back to back;");
    println!(" the ratio is the median of the pairs' ratios, with the least and greatest pair)\n");
    println!("  measure                     driver VM      direct     ratio   (pairs)");
    for (k, (_, name, _)) in MEASURES.iter().enumerate() {
        if k == 3 {
            println!("\n  QEMU CPU time (ms): the ratio is direct / driver VM (above 1: the driver VM costs less)");
        }
        println!(
            "  {name:<24} {:>12.2} {:>11.2} {:>9.2}   ({:.2} to {:.2})",
            driver[k], direct[k], ratios.median[k], ratios.min[k], ratios.max[k]
        );
    }
    println!("\n  the servers' own counts: via the driver VM {}; direct {}", servers[0], servers[1]);
    let path = target.join("bench").join("net.json");
    std::fs::create_dir_all(path.parent().unwrap_or(&target))
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    std::fs::write(&path, to_json(&driver, &direct, &ratios))
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!("\nbench net: wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_none() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn json_has_both_paths_and_ratios() {
        let d: Figures = [2.0, 3.0, 100.0, 10.0, 10.0, 10.0];
        let x: Figures = [4.0, 3.0, 400.0, 8.0, 8.0, 8.0];
        let r = Ratios { median: [0.5, 1.0, 0.25, 0.8, 0.8, 0.8], min: [0.4; 6], max: [1.1; 6] };
        let j = to_json(&d, &x, &r);
        assert!(
            j.contains("\"host_to_guest_mb_s\": { \"driver_vm\": 2.00, \"direct\": 4.00, \"ratio\": 0.500, \"ratio_min\": 0.400, \"ratio_max\": 1.100 },"),
            "{j}"
        );
        assert!(
            j.contains("\"requests_per_s\": { \"driver_vm\": 100.00, \"direct\": 400.00, \"ratio\": 0.250,"),
            "{j}"
        );
        assert!(
            j.contains("\"requests_cpu_ms\": { \"driver_vm\": 10.00, \"direct\": 8.00, \"ratio\": 0.800, \"ratio_min\": 0.400, \"ratio_max\": 1.100 }\n}"),
            "{j}"
        );
    }
}

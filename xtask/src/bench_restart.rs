//! `cargo xtask bench restart`: what a disk driver VM restart costs the guest. The stack
//! (`stacks/bench-restart.toml`) serves HTTP; a host client writes and reads 16 KiB at random
//! sectors through it without pause while another thread kills the disk driver VM with
//! `ctl kill disk` every 300 to 700 ms. Per kill: the time from dom0's "killing" line to the
//! new incarnation's first completed request (both stamped by the machine's clock), run
//! twice: without icount (wall time) and under `-icount shift=0` (where the clock advances
//! one nanosecond per executed instruction: instructions). Throughput is measured before
//! the kills (baseline) and during them. Writes `target/bench/restart.json`.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::build::{self, Artifacts};
use crate::qemu::{self, Ending, Machine};

const STACK: &str = "stacks/bench-restart.toml";
const DEFAULT_KILLS: u64 = 30;
/// Sectors the load writes and reads (past the guest self-test's first run).
const FIRST: u64 = 4096;
/// The baseline's length, before the first kill.
const BASELINE: Duration = Duration::from_secs(4);

/// `at <n> ns` in a console line.
fn stamp(line: &str) -> Option<u64> {
    line.rsplit(" at ").next()?.split(" ns").next()?.trim().parse().ok()
}

/// Kill-to-next-completion gaps (ns) from the console: each "[dom0] ctl: killing disk at T
/// ns" paired with the next "[disk] first request completed at T ns"; a kill that comes
/// before the previous one's incarnation completed anything does not start a new gap (the
/// guest's stall runs from the first).
pub fn gaps(lines: &[String]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut killed = None;
    for l in lines {
        if l.contains("[dom0] ctl: killing disk at") {
            killed = killed.or_else(|| stamp(l));
        } else if l.contains("[disk] first request completed at") {
            if let (Some(k), Some(t)) = (killed.take(), stamp(l)) {
                out.push(t.saturating_sub(k));
            }
        }
    }
    out
}

struct Phase {
    gaps: Vec<u64>,
    baseline_kib_s: f64,
    during_kib_s: f64,
    kills: u64,
    elapsed: Duration,
}

fn machine(artifacts: &Artifacts, icount: bool) -> Result<Machine, String> {
    let out = artifacts.bundle.with_file_name("bench-restart.bin");
    let stack = build::pack(&artifacts.images, &crate::workspace_root().join(STACK), &out)?;
    let mut m = Machine::new(&Artifacts { bundle: out, stack, ..artifacts.clone() });
    if icount {
        m.extra = vec!["-icount".into(), "shift=0,align=off,sleep=off".into()];
    }
    for p in m.net_ports.iter_mut() {
        *p = qemu::free_port()?;
    }
    if let Some(socket) = &m.ctl {
        let _ = std::fs::remove_file(socket);
    }
    Ok(m)
}

/// The host client: 16 KiB writes and reads at random places until `stop`; bytes moved go
/// to `bytes`. Any failure is recorded in `error` (the guest must never fail a request).
fn load(port: u16, stop: Arc<AtomicBool>, bytes: Arc<AtomicU64>, error: Arc<Mutex<Option<String>>>) {
    let result = (|| -> Result<(), String> {
        let mut s = crate::http_client::connect(port)?;
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        while !stop.load(Ordering::Relaxed) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let lba = FIRST + x % 4096;
            let (status, body) = if x.is_multiple_of(2) {
                crate::http_client::request(&mut s, "PUT", &format!("/blk/{lba}"), &[x as u8; 16384])?
            } else {
                crate::http_client::request(&mut s, "GET", &format!("/blk/{lba}?count=32"), b"")?
            };
            if status != 200 {
                return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)));
            }
            bytes.fetch_add(16384, Ordering::Relaxed);
        }
        Ok(())
    })();
    if let Err(e) = result {
        if let Ok(mut slot) = error.lock() {
            *slot = Some(e);
        }
    }
}

fn phase(artifacts: &Artifacts, icount: bool, kills: u64) -> Result<Phase, String> {
    let m = machine(artifacts, icount)?;
    let socket = m.ctl.clone().ok_or("the benchmark stack has no control device")?;
    let port = m.net_ports[0];
    let stop = Arc::new(AtomicBool::new(false));
    let bytes = Arc::new(AtomicU64::new(0));
    let error = Arc::new(Mutex::new(None));
    let done = Arc::new(AtomicBool::new(false));
    let figures = Arc::new(Mutex::new((0.0f64, 0.0f64, 0u64, Duration::ZERO)));
    let mut started = false;
    let timeout = Duration::from_secs(if icount { 900 } else { 600 });
    let label = if icount { "icount" } else { "wall" };
    let run = qemu::run_captured_polling(&m, timeout, false, true, |lines| {
        if lines.last().is_some_and(|l| l.contains("FATAL")) {
            return true;
        }
        if !started && lines.iter().any(|l| l.starts_with("[guest]") && l.contains("serving HTTP")) {
            started = true;
            let (stop, bytes, error, done, figures, socket) =
                (stop.clone(), bytes.clone(), error.clone(), done.clone(), figures.clone(), socket.clone());
            std::thread::spawn(move || {
                let loader = {
                    let (stop, bytes, error) = (stop.clone(), bytes.clone(), error.clone());
                    std::thread::spawn(move || load(port, stop, bytes, error))
                };
                let t0 = Instant::now();
                std::thread::sleep(BASELINE);
                let baseline = bytes.load(Ordering::Relaxed) as f64 / 1024.0 / t0.elapsed().as_secs_f64();
                let (b1, t1) = (bytes.load(Ordering::Relaxed), Instant::now());
                let mut sent = 0;
                match crate::ctl::Ctl::connect(&socket) {
                    Ok(mut c) => {
                        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
                        while sent < kills && error.lock().map_or(true, |e| e.is_none()) {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            std::thread::sleep(Duration::from_millis(300 + x % 400));
                            match c.request("kill disk") {
                                Ok(_) => sent += 1,
                                Err(e) => {
                                    if let Ok(mut slot) = error.lock() {
                                        *slot = Some(format!("ctl kill disk: {e}"));
                                    }
                                }
                            }
                            print!("\rbench restart ({label}): {sent}/{kills} kills");
                            let _ = std::io::stdout().flush();
                        }
                        // Let the last restart complete a request.
                        std::thread::sleep(Duration::from_millis(1500));
                    }
                    Err(e) => {
                        if let Ok(mut slot) = error.lock() {
                            *slot = Some(e);
                        }
                    }
                }
                let during = (bytes.load(Ordering::Relaxed) - b1) as f64 / 1024.0 / t1.elapsed().as_secs_f64();
                stop.store(true, Ordering::Relaxed);
                let _ = loader.join();
                if let Ok(mut f) = figures.lock() {
                    *f = (baseline, during, sent, t1.elapsed());
                }
                done.store(true, Ordering::Relaxed);
            });
        }
        done.load(Ordering::Relaxed)
    })?;
    println!();
    let _ = std::fs::write(
        crate::build::default_target_dir().join("bench").join(format!("restart-{label}.log")),
        run.lines.join("\n"),
    );
    if let Some(e) = error.lock().ok().and_then(|e| e.clone()) {
        return Err(format!("bench restart ({label}): {e}"));
    }
    if !matches!(run.ending, Ending::Stopped) {
        return Err(crate::bench::failure(&run, &format!("bench restart ({label})")));
    }
    let (baseline_kib_s, during_kib_s, sent, elapsed) = *figures.lock().map_err(|_| "figures")?;
    let mut g = gaps(&run.lines);
    g.sort();
    Ok(Phase { gaps: g, baseline_kib_s, during_kib_s, kills: sent, elapsed })
}

fn median(v: &[u64]) -> u64 {
    v.get(v.len() / 2).copied().unwrap_or(0)
}

pub fn run(args: &[String]) -> Result<(), String> {
    let mut kills = DEFAULT_KILLS;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--kills" => {
                let v = it.next().ok_or("--kills needs a number")?;
                kills = v.parse().map_err(|_| format!("--kills: `{v}` is not a number"))?;
            }
            other => return Err(format!("bench restart: unknown option `{other}`")),
        }
    }
    let target = build::default_target_dir();
    let artifacts = build::build(&target, &crate::manifest::default_stack_path())?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let wall = phase(&artifacts, false, kills)?;
    let icount = phase(&artifacts, true, kills)?;
    let ms = |ns: u64| ns as f64 / 1e6;
    for (name, p) in [("wall", &wall), ("icount", &icount)] {
        println!(
            "bench restart ({name}): {} kills in {:.1} s, {} gaps measured; kill to next completed I/O: median {:.1} ms, worst {:.1} ms{}; throughput {:.0} KiB/s before the kills, {:.0} KiB/s during them",
            p.kills,
            p.elapsed.as_secs_f64(),
            p.gaps.len(),
            ms(median(&p.gaps)),
            ms(p.gaps.last().copied().unwrap_or(0)),
            if name == "icount" { " (virtual: 1 ns per instruction)" } else { "" },
            p.baseline_kib_s,
            p.during_kib_s
        );
    }
    let list = |v: &[u64]| v.iter().map(|g| g.to_string()).collect::<Vec<_>>().join(", ");
    let json = format!(
        "{{\n  \"kills\": {kills},\n  \"host_loadavg\": \"{}\",\n  \"wall\": {{ \"median_ms\": {:.2}, \"worst_ms\": {:.2}, \"gaps_ns\": [{}], \"throughput_baseline_kib_s\": {:.1}, \"throughput_during_kills_kib_s\": {:.1} }},\n  \"icount\": {{ \"median_instructions\": {}, \"worst_instructions\": {}, \"gaps_instructions\": [{}], \"throughput_baseline_kib_s\": {:.1}, \"throughput_during_kills_kib_s\": {:.1} }},\n  \"goal_median_ms\": 100,\n  \"goal_met\": {}\n}}\n",
        load.trim(),
        ms(median(&wall.gaps)),
        ms(wall.gaps.last().copied().unwrap_or(0)),
        list(&wall.gaps),
        wall.baseline_kib_s,
        wall.during_kib_s,
        median(&icount.gaps),
        icount.gaps.last().copied().unwrap_or(0),
        list(&icount.gaps),
        icount.baseline_kib_s,
        icount.during_kib_s,
        ms(median(&wall.gaps)) < 100.0
    );
    let path = target.join("bench").join("restart.json");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    std::fs::write(&path, json).map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!("bench restart: wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_pair_each_kill_with_the_next_first_completion() {
        let lines: Vec<String> = [
            "[disk] first request completed at 100 ns",
            "[dom0] ctl: killing disk at 1000 ns",
            "[dom0] destroyed disk: its memory is free again",
            "[disk] first request completed at 61000 ns",
            "[disk] first request completed at 99000 ns",
            "[dom0] ctl: killing disk at 200000 ns",
            "[dom0] ctl: killing disk at 300000 ns",
            "[disk] first request completed at 390000 ns",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(gaps(&lines), [60000, 190000]);
    }
}

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

/// The phases of one restart, in order, as [`phases`] names them.
pub const PHASES: [&str; 15] = [
    "destroy",
    "policy",
    "domain",
    "image",
    "device",
    "channels",
    "vcpu",
    "to main",
    "open",
    "negotiate",
    "first read",
    "interrupts",
    "attach",
    "replay",
    "first io",
];

/// What each phase covers (for the report).
pub const PHASE_MEANING: [&str; 15] = [
    "dom0 destroys the domain: the microvisor quiesces its device (bus mastering off, virtio reset, FLR if any), revokes its IOMMU context and interrupt-remapping entries, frees its memory",
    "dom0's console lines and restart policy, up to the rebuild",
    "DomainCreate: the new domain's RAM (allocated and zeroed) and stage-2 tables",
    "the image's segments copied into its RAM",
    "the virtio-blk function assigned (IOMMU context), its capabilities",
    "the channels' regions mapped again, the doorbells given",
    "start info written, vCPU created and started",
    "dom0's report, scheduling, the new domain's boot (.bss zeroed, page tables) and runtime set-up",
    "DeviceInfo, the virtio capabilities read through the configuration hypercalls",
    "virtio: device reset, feature negotiation, queue set-up",
    "the driver's first read (sector 0) by DMA",
    "the completion interrupt routed through remapping and proven by a read",
    "the channels read, attached as the next incarnation, the client rung",
    "the client notices the new incarnation and replays: the first request reaches the device",
    "that request on the device until it completes",
];

/// `<n> <unit>` right after `word ` in `line` (e.g. `("domain", "us")`).
fn field(line: &str, word: &str) -> Option<u64> {
    let key = format!("{word} ");
    let (at, _) = line.match_indices(&key).find(|(i, _)| {
        // A whole word: not the tail of a longer one ("at" in "that").
        line[..*i].chars().next_back().is_none_or(|c| !c.is_alphanumeric())
    })?;
    line[at + key.len()..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Per restart (a kill that started a gap and ended in a first completion, with every
/// stamp found): the length of each of [`PHASES`], in the machine clock's ns.
pub fn phases(lines: &[String]) -> Vec<[u64; 15]> {
    #[derive(Default)]
    struct R {
        kill: u64,
        several: bool,
        destroyed: Option<u64>,
        rebuilt: Option<[u64; 6]>,
        /// The first completion.
        done: Option<u64>,
    }
    let mut out = Vec::new();
    let mut cur: Option<R> = None;
    for l in lines {
        if l.contains("[dom0] ctl: killing disk at") {
            match cur.as_mut() {
                Some(r) => r.several = true,
                None => cur = stamp(l).map(|kill| R { kill, ..R::default() }),
            }
        } else if let Some(r) = cur.as_mut() {
            if l.starts_with("[dom0] destroyed disk:") {
                r.destroyed = field(l, "at");
            } else if l.starts_with("[dom0] restarted disk") {
                let from = field(l, "from");
                let us = ["domain", "image", "device", "channels", "vCPU"].map(|w| field(l, w));
                if let (Some(from), [Some(a), Some(b), Some(c), Some(d), Some(e)]) = (from, us) {
                    r.rebuilt = Some([from, a * 1000, b * 1000, c * 1000, d * 1000, e * 1000]);
                }
            } else if l.contains("[disk] first request completed at") {
                r.done = stamp(l);
            } else if l.starts_with("[disk] start-up steps (ns):") && r.done.is_some() {
                // Printed right after the first completion, by the same incarnation.
                let s =
                    ["entered", "opened", "negotiated", "read", "interrupts", "attached", "taken"].map(|w| field(l, w));
                let r = cur.take();
                if let (
                    [Some(a), Some(o), Some(n), Some(f), Some(i), Some(at), Some(t)],
                    Some(R { kill, several: false, destroyed: Some(x), rebuilt: Some(b), done: Some(done) }),
                ) = (s, r)
                {
                    let started = b[0] + b[1] + b[2] + b[3] + b[4] + b[5];
                    let d = |a: u64, b: u64| b.saturating_sub(a);
                    out.push([
                        d(kill, x),
                        d(x, b[0]),
                        b[1],
                        b[2],
                        b[3],
                        b[4],
                        b[5],
                        d(started, a),
                        d(a, o),
                        d(o, n),
                        d(n, f),
                        d(f, i),
                        d(i, at),
                        d(at, t),
                        d(t, done),
                    ]);
                }
            }
        }
    }
    out
}

struct Phase {
    gaps: Vec<u64>,
    /// Per restart, the length of each of [`PHASES`].
    phases: Vec<[u64; 15]>,
    baseline_kib_s: f64,
    during_kib_s: f64,
    kills: u64,
    elapsed: Duration,
    /// QEMU's vCPU thread over the kills: (ran, waited runnable) in ns ([`qemu_sched`]).
    sched: Option<(u64, u64)>,
}

/// How long this process's QEMU child's vCPU thread has run on the host's CPUs and waited,
/// runnable, on their run queues (ns: /proc/<pid>/task/<tid>/schedstat; the vCPU thread is
/// named "CPU 0/TCG" with `-name debug-threads=on`). Over the kills, the waiting is the
/// host's share of the wall-time spread (2 cores shared with other work).
fn qemu_sched() -> Option<(u64, u64)> {
    let me = std::process::id().to_string();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // "<pid> (<comm>) <state> <ppid> …"
        let Some((head, tail)) = stat.rsplit_once(") ") else { continue };
        if !head.contains("(qemu-system-x86") || tail.split_whitespace().nth(1) != Some(me.as_str()) {
            continue;
        }
        for t in std::fs::read_dir(e.path().join("task")).ok()?.flatten() {
            if !std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().contains("TCG") {
                continue;
            }
            let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            let mut it = s.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
            return Some((it.next().unwrap_or(0), it.next().unwrap_or(0)));
        }
    }
    None
}

fn machine(artifacts: &Artifacts, icount: bool) -> Result<Machine, String> {
    let out = artifacts.bundle.with_file_name("bench-restart.bin");
    let stack = build::pack(&artifacts.images, &crate::workspace_root().join(STACK), &out)?;
    let mut m = Machine::new(&Artifacts { bundle: out, stack, ..artifacts.clone() });
    // Named threads: the vCPU's is "CPU 0/TCG" (qemu_sched).
    m.extra = vec!["-name".into(), "bench-restart,debug-threads=on".into()];
    if icount {
        m.extra.extend(["-icount".into(), "shift=0,align=off,sleep=off".into()]);
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
    let figures = Arc::new(Mutex::new((0.0f64, 0.0f64, 0u64, Duration::ZERO, None::<(u64, u64)>)));
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
                let (b1, t1, s1) = (bytes.load(Ordering::Relaxed), Instant::now(), qemu_sched());
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
                    let sched = match (s1, qemu_sched()) {
                        (Some((r1, w1)), Some((r2, w2))) => Some((r2.saturating_sub(r1), w2.saturating_sub(w1))),
                        _ => None,
                    };
                    *f = (baseline, during, sent, t1.elapsed(), sched);
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
    let (baseline_kib_s, during_kib_s, sent, elapsed, sched) = *figures.lock().map_err(|_| "figures")?;
    let mut g = gaps(&run.lines);
    g.sort();
    Ok(Phase { gaps: g, phases: phases(&run.lines), baseline_kib_s, during_kib_s, kills: sent, elapsed, sched })
}

/// Each phase's median over the restarts.
fn phase_medians(all: &[[u64; 15]]) -> [u64; 15] {
    core::array::from_fn(|i| {
        let mut v: Vec<u64> = all.iter().map(|p| p[i]).collect();
        v.sort();
        median(&v)
    })
}

fn median(v: &[u64]) -> u64 {
    v.get(v.len() / 2).copied().unwrap_or(0)
}

pub fn run(args: &[String]) -> Result<(), String> {
    let mut kills = DEFAULT_KILLS;
    let (mut want_wall, mut want_icount) = (true, true);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--kills" => {
                let v = it.next().ok_or("--kills needs a number")?;
                kills = v.parse().map_err(|_| format!("--kills: `{v}` is not a number"))?;
            }
            "--only" => match it.next().map(String::as_str) {
                Some("wall") => want_icount = false,
                Some("icount") => want_wall = false,
                other => return Err(format!("--only wall | icount, not {other:?}")),
            },
            other => return Err(format!("bench restart: unknown option `{other}`")),
        }
    }
    let target = build::default_target_dir();
    let artifacts = build::build(&target, &crate::manifest::default_stack_path())?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let skipped = || Phase {
        gaps: Vec::new(),
        phases: Vec::new(),
        baseline_kib_s: 0.0,
        during_kib_s: 0.0,
        kills: 0,
        elapsed: Duration::ZERO,
        sched: None,
    };
    let wall = if want_wall { phase(&artifacts, false, kills)? } else { skipped() };
    let icount = if want_icount { phase(&artifacts, true, kills)? } else { skipped() };
    let ms = |ns: u64| ns as f64 / 1e6;
    let wall_phases = phase_medians(&wall.phases);
    let icount_phases = phase_medians(&icount.phases);
    println!(
        "bench restart: phases, median over {} (wall) and {} (icount) restarts with every stamp:",
        wall.phases.len(),
        icount.phases.len()
    );
    for (i, name) in PHASES.iter().enumerate() {
        println!(
            "  {name:>10}: {:>8.2} ms wall {:>10} instructions  {}",
            ms(wall_phases[i]),
            icount_phases[i],
            PHASE_MEANING[i]
        );
    }
    for (name, p) in [("wall", &wall), ("icount", &icount)] {
        if p.kills == 0 {
            continue;
        }
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
        if let Some((ran, waited)) = p.sched {
            let wall = p.elapsed.as_secs_f64() * 1e9;
            println!(
                "bench restart ({name}): over the kills QEMU's vCPU thread ran {:.0}% of the wall time and waited runnable on the host's run queues {:.0}%",
                ran as f64 / wall * 100.0,
                waited as f64 / wall * 100.0
            );
        }
    }
    let list = |v: &[u64]| v.iter().map(|g| g.to_string()).collect::<Vec<_>>().join(", ");
    let phase_json = |v: &[u64; 15]| {
        PHASES.iter().zip(v.iter()).map(|(n, x)| format!("\"{n}\": {x}")).collect::<Vec<_>>().join(", ")
    };
    let share = |p: &Phase| {
        p.sched.map_or("null".to_string(), |(ran, waited)| {
            let wall = p.elapsed.as_secs_f64() * 1e9;
            format!("{{ \"ran\": {:.3}, \"waited_runnable\": {:.3} }}", ran as f64 / wall, waited as f64 / wall)
        })
    };
    let json = format!(
        "{{\n  \"kills\": {kills},\n  \"host_loadavg\": \"{}\",\n  \"host_loadavg_after\": \"{}\",\n  \"qemu_vcpu_thread_share_during_kills\": {{ \"wall\": {}, \"icount\": {} }},\n  \"phases_median_wall_ns\": {{ {} }},\n  \"phases_median_icount_instructions\": {{ {} }},\n  \"wall\": {{ \"median_ms\": {:.2}, \"worst_ms\": {:.2}, \"gaps_ns\": [{}], \"throughput_baseline_kib_s\": {:.1}, \"throughput_during_kills_kib_s\": {:.1} }},\n  \"icount\": {{ \"median_instructions\": {}, \"worst_instructions\": {}, \"gaps_instructions\": [{}], \"throughput_baseline_kib_s\": {:.1}, \"throughput_during_kills_kib_s\": {:.1} }},\n  \"goal_median_ms\": 100,\n  \"goal_met\": {}\n}}\n",
        load.trim(),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        share(&wall),
        share(&icount),
        phase_json(&wall_phases),
        phase_json(&icount_phases),
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

    #[test]
    fn phases_come_from_the_stamped_lines_of_one_restart() {
        let lines: Vec<String> = [
            "[dom0] ctl: killing disk at 1000 ns",
            "[dom0] destroyed disk: its memory is free again (in 1 us, at 3000 ns)",
            "[dom0] restarted disk (1 of 9 within 9 ms), rebuilt in 20 us (domain 5 us, image 4 us, device 3 us, channels 2 us, vCPU 1 us) from 4000 to 24000 ns",
            "[disk] first request completed at 51000 ns",
            "[disk] start-up steps (ns): entered 30000, opened 30500, negotiated 31000, first read 33000, interrupts 36000, attached 40000, first taken 45000",
            // Two kills before a completion: no phases (the second rebuild's lines would
            // be taken for the first's).
            "[dom0] ctl: killing disk at 60000 ns",
            "[dom0] ctl: killing disk at 70000 ns",
            "[disk] first request completed at 90000 ns",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = phases(&lines);
        assert_eq!(p, [[2000, 1000, 5000, 4000, 3000, 2000, 1000, 11000, 500, 500, 2000, 3000, 4000, 5000, 6000]]);
        assert_eq!(p[0].iter().sum::<u64>(), 50000, "the phases cover the gap exactly");
    }
}

//! `cargo xtask bench linux-io`: Debian's kernel doing disk and network I/O under the
//! microvisor (the Linux VM of `stacks/linux.toml`: virtio-blk and virtio-net in its VMM,
//! served over channels by the disk and net driver VMs) beside the same kernel and initramfs
//! booted natively in QEMU with QEMU's own virtio-blk-pci and virtio-net-pci, in one run.
//!
//! Both boot with `init.mode=iobench` (`crate::linux::IOBENCH_SCRIPT`): the guest program
//! `linux-iobench` runs sequential and random O_DIRECT reads and writes of 4 KiB and 64 KiB on
//! `/dev/vda`, one request at a time for a fixed time each, timed in the guest; then the host
//! sends bytes to the guest's busybox `nc` (TCP in) and receives bytes from it (TCP out)
//! through QEMU's user-network port forwarding, timed on the host. The two sides alternate,
//! round after round (the machine is shared: ratios taken side by side in one round are what
//! carries over); the ratio of a workload is the median of its rounds' ratios, and the spread
//! of the rounds is kept. Under the microvisor the VMM prints its exit counters at every
//! `linux-io: mark` line, so each workload's exits, interrupts, doorbells and wake-ups per
//! request are known. Writes `target/bench/linux-io.json`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::bench::failure;
use crate::build::{self, Artifacts};
use crate::linux;
use crate::qemu::{self, Ending, Machine};

/// The stack of the microvisor side.
const STACK: &str = "stacks/linux.toml";
/// The VM's domain in it (its `cmdline` gets the bench words).
const VM_DOMAIN: &str = "linux-vm";
/// Printed by the guest around each workload; the VMM prints its counters after each.
pub const MARK: &str = "linux-io: mark ";
/// The VMM's counter line.
pub const STATS: &str = "linux-io stats: ";
/// The guest's result line of a block workload.
pub const RESULT: &str = "linux-io: result ";
/// The guest's `nc` ports (`crate::linux::IOBENCH_SCRIPT`).
const TCP_IN_PORT: u16 = 5001;
const TCP_OUT_PORT: u16 = 5002;
/// Disk image size: the workloads use the first 64 MiB.
const DISK_BYTES: u64 = 72 << 20;

/// The counters the VMM printed at one mark: (a start mark?, workload, counters).
pub type Mark = (bool, String, Vec<(String, u64)>);

/// One side's figures in one round: (workload, bytes, seconds), and the counters printed at
/// each mark: (start?, workload, counters).
#[derive(Debug, Default, Clone)]
pub struct Side {
    pub results: Vec<(String, u64, f64)>,
    pub marks: Vec<Mark>,
}

impl Side {
    /// MB/s of `name`.
    pub fn mb_s(&self, name: &str) -> Option<f64> {
        self.results.iter().find(|(n, ..)| n == name).map(|(_, b, s)| *b as f64 / 1e6 / s.max(1e-9))
    }

    /// Bytes moved by `name`.
    pub fn bytes(&self, name: &str) -> Option<u64> {
        self.results.iter().find(|(n, ..)| n == name).map(|(_, b, _)| *b)
    }

    /// The counters' growth over `name` (end minus start), key by key.
    pub fn counter_delta(&self, name: &str) -> Vec<(String, u64)> {
        let find = |start: bool| self.marks.iter().find(|(s, n, _)| *s == start && n == name).map(|(.., c)| c);
        let (Some(a), Some(b)) = (find(true), find(false)) else { return Vec::new() };
        b.iter()
            .map(|(k, v)| (k.clone(), v.saturating_sub(a.iter().find(|(ka, _)| ka == k).map_or(0, |(_, va)| *va))))
            .collect()
    }
}

/// `linux-io: result workload=<name> ops=<n> bytes=<n> ns=<n>` → (name, bytes, seconds).
pub fn parse_result(line: &str) -> Option<(String, u64, f64)> {
    let rest = line.split(RESULT).nth(1)?;
    let (mut name, mut bytes, mut ns) = (None, None, None);
    for (k, v) in rest.split_whitespace().filter_map(|w| w.split_once('=')) {
        match k {
            "workload" => name = Some(v.to_string()),
            "bytes" => bytes = v.parse().ok(),
            "ns" => ns = v.parse::<u64>().ok(),
            _ => {}
        }
    }
    Some((name?, bytes?, ns? as f64 / 1e9))
}

/// A console's mark and counter lines, paired: the counter lines after a mark (the VMM
/// prints a few short ones) belong to it.
pub fn parse_marks(lines: &[String]) -> Vec<Mark> {
    let mut out: Vec<Mark> = Vec::new();
    let mut open = false;
    for l in lines {
        if let Some(rest) = l.split(MARK).nth(1) {
            let mut w = rest.split_whitespace();
            open = match (w.next(), w.next()) {
                (Some(kind @ ("start" | "end")), Some(n)) => {
                    out.push((kind == "start", n.to_string(), Vec::new()));
                    true
                }
                _ => false,
            };
        } else if let Some(rest) = l.split(STATS).nth(1) {
            if let (true, Some(last)) = (open, out.last_mut()) {
                last.2.extend(crate::bench_boot::parse_counts(rest));
            }
        } else if l.contains(RESULT) {
            open = false;
        }
    }
    out.retain(|(.., c)| !c.is_empty());
    out
}

/// The median of `v` (the mean of the middle two for an even count).
pub fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// One workload over all rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: String,
    /// Bytes per request (IOPS = MB/s / this), 0 for TCP.
    pub block: u64,
    pub native: Vec<f64>,
    pub microvisor: Vec<f64>,
    /// Counters per request (per 64 KiB for TCP) under the microvisor, from the last round.
    pub per_op: Vec<(String, f64)>,
}

impl Row {
    /// The rounds' ratios (microvisor / native, each round side by side).
    pub fn ratios(&self) -> Vec<f64> {
        self.native.iter().zip(&self.microvisor).map(|(n, m)| m / n.max(1e-9)).collect()
    }
}

/// The counters reported per request.
const PER_OP_KEYS: &[&str] = &[
    "exits",
    "mmio",
    "io",
    "msr",
    "injected",
    "wakes",
    "timer",
    "blk_kick0",
    "blk_bells",
    "blk_answers",
    "blk_answer_us",
    "net_kick0",
    "net_kick1",
    "net_bells",
    "net_answers",
    "net_answer_us",
    "eoi",
    "tsc_deadline",
];

/// Builds the rows from the rounds' sides (native, microvisor).
pub fn rows(rounds: &[(Side, Side)]) -> Vec<Row> {
    let mut names: Vec<String> = Vec::new();
    for (n, _) in rounds {
        for (name, ..) in &n.results {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
    }
    names
        .into_iter()
        .map(|name| {
            let block = if name.ends_with("-64k") {
                65536
            } else if name.ends_with("-4k") {
                4096
            } else {
                0
            };
            // Only rounds with both sides (a TCP transfer that failed is left out).
            let pairs: Vec<(f64, f64)> =
                rounds.iter().filter_map(|(n, m)| Some((n.mb_s(&name)?, m.mb_s(&name)?))).collect();
            let native = pairs.iter().map(|p| p.0).collect();
            let microvisor = pairs.iter().map(|p| p.1).collect();
            let per_op = rounds
                .last()
                .map(|(_, m)| {
                    let ops = m.bytes(&name).unwrap_or(0) / if block == 0 { 65536 } else { block };
                    let delta = m.counter_delta(&name);
                    PER_OP_KEYS
                        .iter()
                        .filter_map(|k| delta.iter().find(|(dk, _)| dk == k))
                        .map(|(k, v)| (k.clone(), *v as f64 / ops.max(1) as f64))
                        .collect()
                })
                .unwrap_or_default();
            Row { name, block, native, microvisor, per_op }
        })
        .collect()
}

fn list(v: &[f64]) -> String {
    v.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(", ")
}

/// The JSON report.
pub fn to_json(rows: &[Row], header: &[(&str, String)]) -> String {
    let mut j = String::from("{\n");
    for (k, v) in header {
        j.push_str(&format!("  \"{k}\": {v},\n"));
    }
    j.push_str("  \"workloads\": {\n");
    for (i, r) in rows.iter().enumerate() {
        let ratios = r.ratios();
        if ratios.is_empty() {
            j.push_str(&format!(
                "    \"{}\": {{ \"unit\": \"MB/s\", \"ratio\": null, \"note\": \"no round with both sides\" }}{}\n",
                r.name,
                if i + 1 < rows.len() { "," } else { "" }
            ));
            continue;
        }
        let fields = [
            "\"unit\": \"MB/s\"".to_string(),
            format!("\"native_mb_s\": {:.3}", median(&r.native).unwrap_or(0.0)),
            format!("\"microvisor_mb_s\": {:.3}", median(&r.microvisor).unwrap_or(0.0)),
            format!("\"ratio\": {:.3}", median(&ratios).unwrap_or(0.0)),
            format!("\"ratio_min\": {:.3}", ratios.iter().copied().reduce(f64::min).unwrap_or(0.0)),
            format!("\"ratio_max\": {:.3}", ratios.iter().copied().reduce(f64::max).unwrap_or(0.0)),
            format!("\"native_rounds_mb_s\": [{}]", list(&r.native)),
            format!("\"microvisor_rounds_mb_s\": [{}]", list(&r.microvisor)),
            format!("\"round_ratios\": [{}]", list(&ratios)),
        ];
        let mut fields = fields.to_vec();
        if r.block > 0 {
            let iops = |v: &[f64]| median(v).unwrap_or(0.0) * 1e6 / r.block as f64;
            fields.push(format!("\"native_iops\": {:.0}", iops(&r.native)));
            fields.push(format!("\"microvisor_iops\": {:.0}", iops(&r.microvisor)));
        }
        if !r.per_op.is_empty() {
            let per: Vec<String> = r.per_op.iter().map(|(k, v)| format!("\"{k}\": {v:.2}")).collect();
            let unit = if r.block > 0 { "microvisor_per_request" } else { "microvisor_per_64k" };
            fields.push(format!("\"{unit}\": {{ {} }}", per.join(", ")));
        }
        j.push_str(&format!(
            "    \"{}\": {{ {} }}{}\n",
            r.name,
            fields.join(", "),
            if i + 1 < rows.len() { "," } else { "" }
        ));
    }
    j.push_str("  }\n}\n");
    j
}

/// How long one TCP transfer may take, retries included: a stalled one ends the side (the
/// guest's `nc` would wait for ever) instead of the run.
const TCP_DEADLINE: Duration = Duration::from_secs(150);

fn connect(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    Ok(s)
}

/// Host to guest: `bytes` to the guest's `nc`, which hands them to `dd of=/dev/null`; done
/// when the guest closes the connection (its `dd` has read the end). Seconds.
fn tcp_in(port: u16, bytes: usize) -> Result<f64, String> {
    let data = vec![0xa5u8; 64 << 10];
    let mut last = String::new();
    let t_start = Instant::now();
    while t_start.elapsed() < TCP_DEADLINE {
        let attempt = || -> std::io::Result<f64> {
            let mut s = connect(port)?;
            let t0 = Instant::now();
            let mut left = bytes;
            while left > 0 {
                let n = left.min(data.len());
                s.write_all(&data[..n])?;
                left -= n;
            }
            s.shutdown(Shutdown::Write)?;
            let mut sink = [0u8; 512];
            while s.read(&mut sink)? > 0 {}
            Ok(t0.elapsed().as_secs_f64())
        };
        match attempt() {
            Ok(t) => return Ok(t),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(format!("sending to the guest: {last}"))
}

/// Guest to host: the guest's `nc` sends `bytes` from `dd if=/dev/zero`; done at its close.
fn tcp_out(port: u16, bytes: usize) -> Result<f64, String> {
    let mut last = String::new();
    let t_start = Instant::now();
    while t_start.elapsed() < TCP_DEADLINE {
        let attempt = || -> std::io::Result<(usize, f64)> {
            let mut s = connect(port)?;
            let t0 = Instant::now();
            let mut buf = vec![0u8; 64 << 10];
            let mut got = 0;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            Ok((got, t0.elapsed().as_secs_f64()))
        };
        match attempt() {
            Ok((got, t)) if got == bytes => return Ok(t),
            Ok((got, _)) => last = format!("got {got} of {bytes} bytes"),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(format!("receiving from the guest: {last}"))
}

/// A fresh disk image for one side: written through (no holes), so reads find data.
fn fresh_disk(path: &Path) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let block: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let mut f = std::fs::File::create(path).map_err(|e| format!("creating {}: {e}", path.display()))?;
    for _ in 0..DISK_BYTES >> 20 {
        f.write_all(&block).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Boots `m` (the guest runs the bench by itself), does the TCP transfers when the guest
/// waits for them, and collects the figures.
fn run_side(m: &Machine, tcp_bytes: usize, what: &str) -> Result<Side, String> {
    let ports = match m.net_port_forwards[..] {
        [(a, _), (b, _)] => (a, b),
        _ => return Err(format!("{what}: the machine lacks the two TCP forwards")),
    };
    let mut tcp: Vec<(String, u64, f64)> = Vec::new();
    let mut error: Option<String> = None;
    // The console as it comes (a run that stops can be looked at while it hangs).
    let log = build::default_target_dir().join("bench").join(format!("linux-io-{what}.log"));
    let mut log_file = std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let run = qemu::run_captured(m, Duration::from_secs(900), false, |lines| {
        let Some(last) = lines.last() else { return false };
        let _ = writeln!(log_file, "{last}");
        if last.contains("linux-io: error") {
            return true;
        }
        for (name, f, port) in
            [("tcp-in", tcp_in as fn(u16, usize) -> Result<f64, String>, ports.0), ("tcp-out", tcp_out, ports.1)]
        {
            if last.contains(&format!("{MARK}start {name}")) {
                // The guest prints the mark, then starts `nc`: give it time to listen.
                std::thread::sleep(Duration::from_millis(1500));
                match f(port, tcp_bytes) {
                    Ok(secs) => tcp.push((name.to_string(), tcp_bytes as u64, secs)),
                    Err(e) => {
                        // The guest waits for this transfer for ever: the run ends here,
                        // with what it measured so far.
                        error = Some(format!("{name}: {e}"));
                        return true;
                    }
                }
            }
        }
        last.contains("linux-io: done")
    })?;
    if let Some(e) = &error {
        eprintln!("bench linux-io: {what}: {e}; this round's later TCP figure is left out");
    }
    if !matches!(run.ending, Ending::Stopped) || !(run.has_line("linux-io: done") || error.is_some()) {
        return Err(failure(&run, &format!("{what}: the guest did not finish the benchmark")));
    }
    let mut side = Side { results: run.lines.iter().filter_map(|l| parse_result(l)).collect(), ..Side::default() };
    side.results.extend(tcp);
    side.marks = parse_marks(&run.lines);
    Ok(side)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `cargo xtask bench linux-io [--rounds N] [--ms MS] [--tcp-mib N]`.
pub fn run(args: &[String]) -> Result<(), String> {
    let (mut rounds, mut ms, mut tcp_mib) = (2usize, 1500u64, 16usize);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            let v = it.next().ok_or_else(|| format!("{name} needs a number"))?;
            v.parse().ok().filter(|&n: &u64| n > 0).ok_or_else(|| format!("{name}: `{v}` is not a positive number"))
        };
        match a.as_str() {
            "--rounds" => rounds = value("--rounds")? as usize,
            "--ms" => ms = value("--ms")?,
            "--tcp-mib" => tcp_mib = value("--tcp-mib")? as usize,
            other => {
                return Err(format!("bench linux-io: unknown option `{other}` (known: --rounds, --ms, --tcp-mib)"))
            }
        }
    }
    let tcp_bytes = tcp_mib << 20;
    let words = format!("init.mode=iobench iobench.ms={ms} iobench.tcp_blocks={}", tcp_bytes >> 16);
    let target = build::default_target_dir();
    let root = crate::workspace_root();
    // Compiles every image, linux-iobench included, and (re)builds the initramfs with it.
    let artifacts = build::build(&target, &root.join(STACK))?;
    let a = linux::ensure(&linux::default_dir())?;
    let mut manifest = crate::manifest::load(&root.join(STACK), &build::known_images())?;
    let mut vm_mib = linux::NATIVE_MEMORY_MIB;
    for d in manifest.domains.iter_mut().filter(|d| d.name == VM_DOMAIN) {
        d.cmdline = format!("{} {words}", d.cmdline);
        vm_mib = d.memory_mib;
    }
    let bundle = artifacts.bundle.with_file_name("linux-io.bin");
    let info = build::pack_manifest(&artifacts.images, &manifest, &bundle)?;
    let mut mv = Machine::new(&Artifacts { bundle, stack: info, ..artifacts.clone() });
    let bench_dir = target.join("bench");
    mv.disks = vec![bench_dir.join("linux-io-microvisor.img")];
    mv.disk_ext4 = false;
    mv.net_ports = vec![qemu::free_port()?];
    mv.net_port_forwards = vec![(qemu::free_port()?, TCP_IN_PORT), (qemu::free_port()?, TCP_OUT_PORT)];
    // The same kernel and initramfs natively, with QEMU's virtio devices and the VM's RAM.
    let mut native = linux::native_machine(&a, &words);
    native.memory_mib = vm_mib;
    native.disks = vec![bench_dir.join("linux-io-native.img")];
    native.net_ports = vec![qemu::free_port()?];
    native.net_port_forwards = vec![(qemu::free_port()?, TCP_IN_PORT), (qemu::free_port()?, TCP_OUT_PORT)];

    let load_before = load_average();
    let mut results: Vec<(Side, Side)> = Vec::new();
    for round in 1..=rounds {
        let mut pair = Vec::new();
        for (what, m) in [("native", &native), ("microvisor", &mv)] {
            eprintln!("bench linux-io: round {round}/{rounds}: {what} (load average {})", load_average());
            fresh_disk(&m.disks[0])?;
            pair.push(run_side(m, tcp_bytes, what)?);
        }
        let mv_side = pair.pop().unwrap_or_default();
        let native_side = pair.pop().unwrap_or_default();
        results.push((native_side, mv_side));
    }
    let load_after = load_average();
    let rows = rows(&results);

    println!("Linux I/O: Debian kernel {} natively in QEMU vs. under the microvisor through the driver VMs", a.release);
    println!(
        "(MB/s; block: O_DIRECT on /dev/vda, one request at a time, {ms} ms each, guest-timed; TCP: {tcp_mib} MiB \
         through QEMU's user network, host-timed; medians of {rounds} rounds, ratio = median of the rounds' ratios)\n"
    );
    println!(
        "  workload          native   microvisor   ratio  (rounds)     us/op  exits  kicks  irqs  bells  driver us"
    );
    let per = |r: &Row, k: &str| r.per_op.iter().find(|(pk, _)| pk == k).map_or(0.0, |(_, v)| *v);
    for r in &rows {
        let ratios = r.ratios();
        if ratios.is_empty() {
            println!("  {:<15} (no round with both sides: a transfer failed)", r.name);
            continue;
        }
        let op = if r.block == 0 { 65536.0 } else { r.block as f64 };
        println!(
            "  {:<15} {:>8.2} {:>12.2} {:>7.2}  ({})  {:>8.0} {:>6.1} {:>6.2} {:>5.2} {:>6.2} {:>10.0}",
            r.name,
            median(&r.native).unwrap_or(0.0),
            median(&r.microvisor).unwrap_or(0.0),
            median(&ratios).unwrap_or(0.0),
            ratios.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(" "),
            r.microvisor.last().map_or(0.0, |mb| op / mb.max(1e-9)),
            per(r, "exits"),
            per(r, "blk_kick0") + per(r, "net_kick0") + per(r, "net_kick1"),
            per(r, "injected"),
            per(r, "blk_bells") + per(r, "net_bells"),
            per(r, "blk_answer_us") + per(r, "net_answer_us"),
        );
    }
    println!(
        "  (microvisor side, last round, per request (block) or per 64 KiB (TCP): us/op, VM exits, virtio \
         notifies, interrupts injected, doorbells to the driver VMs, and the time from a doorbell to the driver \
         VM's answer)"
    );
    if let Some(r) = rows.iter().find(|r| r.name == "seq-read-64k") {
        let ratio = median(&r.ratios()).unwrap_or(0.0);
        println!(
            "\n  goal: 64 KiB sequential I/O >= 0.8 of native: read {ratio:.2}{}",
            rows.iter()
                .find(|r| r.name == "seq-write-64k")
                .map(|w| format!(", write {:.2}", median(&w.ratios()).unwrap_or(0.0)))
                .unwrap_or_default()
        );
    }
    println!("  load average before / after: {load_before} / {load_after}");
    let header = [
        ("kernel", format!("\"{}\"", a.release)),
        ("rounds", rounds.to_string()),
        ("ms_per_block_workload", ms.to_string()),
        ("tcp_bytes", tcp_bytes.to_string()),
        ("load_average_before", format!("\"{load_before}\"")),
        ("load_average_after", format!("\"{load_after}\"")),
    ];
    let path = bench_dir.join("linux-io.json");
    std::fs::create_dir_all(&bench_dir).map_err(|e| format!("creating {}: {e}", bench_dir.display()))?;
    std::fs::write(&path, to_json(&rows, &header)).map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!("\nbench linux-io: wrote {} (consoles: {}/linux-io-*.log)", path.display(), bench_dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn results_marks_and_counters_parse_and_pair() {
        assert_eq!(
            parse_result("[linux] linux-io: result workload=seq-read-64k ops=10 bytes=655360 ns=500000000"),
            Some(("seq-read-64k".into(), 655360, 0.5))
        );
        assert_eq!(parse_result("linux-io: result workload=x ops=1"), None);
        let console = lines(&[
            "[linux] linux-io: mark start seq-read-64k",
            "[linux] linux-io stats: exits=100 mmio=10 mmio:0xe0003000=4",
            "[linux] linux-io stats: bells=2",
            "[linux] linux-io: mark end seq-read-64k",
            "[linux] linux-io stats: exits=130 mmio=20 mmio:0xe0003000=14",
            "[linux] linux-io stats: bells=12 wakes=5",
            "[linux] linux-io: result workload=seq-read-64k ops=10 bytes=655360 ns=500000000",
            "[linux] linux-io stats: exits=1 (a counter line after no mark is not paired)",
        ]);
        let marks = parse_marks(&console);
        assert_eq!(marks.len(), 2);
        let side = Side { results: console.iter().filter_map(|l| parse_result(l)).collect(), marks };
        assert_eq!(
            side.counter_delta("seq-read-64k"),
            vec![
                ("exits".into(), 30),
                ("mmio".into(), 10),
                ("mmio:0xe0003000".into(), 10),
                ("bells".into(), 10),
                ("wakes".into(), 5)
            ]
        );
        assert!(side.counter_delta("other").is_empty());
        assert!((side.mb_s("seq-read-64k").unwrap() - 1.31072).abs() < 1e-9);
    }

    #[test]
    fn rows_take_ratios_round_by_round_and_json_has_both_sides() {
        let side = |mb: f64, exits: u64| Side {
            results: vec![("seq-read-64k".into(), (mb * 1e6) as u64, 1.0), ("tcp-in".into(), (mb * 2e6) as u64, 1.0)],
            marks: vec![
                (true, "seq-read-64k".into(), vec![("exits".into(), 0)]),
                (false, "seq-read-64k".into(), vec![("exits".into(), exits)]),
            ],
        };
        let rounds = vec![(side(100.0, 0), side(50.0, 0)), (side(80.0, 0), side(72.0, 30_000))];
        let r = rows(&rounds);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].name, "seq-read-64k");
        assert_eq!(r[0].block, 65536);
        assert_eq!(r[0].ratios(), vec![0.5, 0.9]);
        assert_eq!(median(&r[0].ratios()), Some(0.7));
        // 72 MB in 64 KiB requests, 30,000 exits.
        let ops = 72_000_000u64 / 65536;
        assert_eq!(r[0].per_op, vec![("exits".to_string(), 30_000.0 / ops as f64)]);
        assert_eq!(r[1].block, 0);
        let j = to_json(&r, &[("rounds", "2".into())]);
        assert!(j.starts_with("{\n  \"rounds\": 2,\n  \"workloads\": {\n"), "{j}");
        assert!(j.contains("\"seq-read-64k\": { \"unit\": \"MB/s\", \"native_mb_s\": 90.000, \"microvisor_mb_s\": 61.000, \"ratio\": 0.700, \"ratio_min\": 0.500, \"ratio_max\": 0.900"), "{j}");
        assert!(j.contains("\"native_iops\": 1373"), "{j}");
        assert!(j.contains("\"round_ratios\": [0.500, 0.900]"), "{j}");
        assert!(j.contains("\"tcp-in\": {") && j.trim_end().ends_with("}\n}"), "{j}");
        // A workload one side never finished has no ratio.
        let half = vec![(side(100.0, 0), Side::default())];
        let j = to_json(&rows(&half), &[]);
        assert!(j.contains("\"seq-read-64k\": { \"unit\": \"MB/s\", \"ratio\": null"), "{j}");
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}

//! `cargo xtask bench boot`: how long Debian's kernel takes to reach its init marker,
//! booted natively in QEMU (PVH, `-kernel vmlinux`); the same kernel and initramfs under the
//! microvisor are the other half (issue 10, item 6), and `ratio` compares the two.
//!
//! Wall-clock seconds from starting QEMU to the marker line on the serial console, best and
//! median of N runs, written to `target/bench/boot.json`; beside them QEMU's CPU seconds by
//! the marker (`*_cpu_s`), which other load on the host inflates much less than wall time.

use std::time::Duration;

use crate::linux;

/// Best and median of a set of timings, seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Timings {
    pub runs: Vec<f64>,
}

impl Timings {
    pub fn best(&self) -> Option<f64> {
        self.runs.iter().copied().reduce(f64::min)
    }

    /// The middle run (the mean of the two middle ones for an even count).
    pub fn median(&self) -> Option<f64> {
        crate::bench_linux_io::median(&self.runs)
    }
}

/// What `boot.json` holds. The microvisor half fills `microvisor` and `exits` (exit kind,
/// count); without it only the native figures are written.
#[derive(Debug, Clone, Default)]
pub struct BootReport {
    pub release: String,
    pub cmdline: String,
    pub native: Option<Timings>,
    /// QEMU's CPU seconds at the marker, run by run.
    pub native_cpu: Option<Timings>,
    pub microvisor: Option<Timings>,
    pub microvisor_cpu: Option<Timings>,
    pub exits: Vec<(String, u64)>,
}

impl BootReport {
    /// `microvisor_s / native_s` (best against best), when both halves ran.
    pub fn ratio(&self) -> Option<f64> {
        Some(self.microvisor.as_ref()?.best()? / self.native.as_ref()?.best()?)
    }

    pub fn to_json(&self) -> String {
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let mut fields =
            vec![format!("\"kernel\": \"{}\"", esc(&self.release)), format!("\"cmdline\": \"{}\"", esc(&self.cmdline))];
        let mut timing = |name: &str, t: &Option<Timings>| {
            if let Some(t) = t {
                if let (Some(best), Some(median)) = (t.best(), t.median()) {
                    fields.push(format!("\"{name}_s\": {best:.3}"));
                    fields.push(format!("\"{name}_median_s\": {median:.3}"));
                    let runs: Vec<String> = t.runs.iter().map(|r| format!("{r:.3}")).collect();
                    fields.push(format!("\"{name}_runs_s\": [{}]", runs.join(", ")));
                }
            }
        };
        timing("native", &self.native);
        timing("native_cpu", &self.native_cpu);
        timing("microvisor", &self.microvisor);
        timing("microvisor_cpu", &self.microvisor_cpu);
        if let Some(r) = self.ratio() {
            fields.push(format!("\"ratio\": {r:.3}"));
        }
        if !self.exits.is_empty() {
            let exits: Vec<String> = self.exits.iter().map(|(k, n)| format!("\"{}\": {n}", esc(k))).collect();
            fields.push(format!("\"exits\": {{ {} }}", exits.join(", ")));
        }
        format!("{{\n  {}\n}}\n", fields.join(",\n  "))
    }
}

/// Boots natively `n` times; wall and (where known) CPU seconds to the init marker.
pub fn native(a: &linux::Artifacts, n: usize) -> Result<(Timings, Option<Timings>), String> {
    let mut wall = Vec::new();
    let mut cpu = Vec::new();
    for i in 0..n {
        let t = linux::time_native_boot(a, Duration::from_secs(180))?;
        let cpu_s = t.cpu.map(|c| c.as_secs_f64());
        eprintln!(
            "bench boot: native run {} of {n}: {:.2} s wall{} to {:?}",
            i + 1,
            t.wall.as_secs_f64(),
            cpu_s.map(|c| format!(", {c:.2} s QEMU CPU")).unwrap_or_default(),
            linux::INIT_MARKER
        );
        wall.push(t.wall.as_secs_f64());
        cpu.extend(cpu_s);
    }
    let cpu = (cpu.len() == n).then_some(Timings { runs: cpu });
    Ok((Timings { runs: wall }, cpu))
}

/// The stack the microvisor half boots: the Linux VM with its VMM (and the driver VMs).
pub const LINUX_STACK: &str = "stacks/linux.toml";
/// The VMM's line with its exit histogram, printed when the init marker passes.
pub const HISTOGRAM_LINE: &str = "[linux] exit histogram at the init marker: ";
/// The VMM's line with the ports and MSRs that exit most, printed right after.
pub const TOP_LINE: &str = "[linux] exits by port and MSR: ";

/// `key=value` words of the VMM's histogram lines, in order.
pub fn parse_counts(line: &str) -> Vec<(String, u64)> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

/// Boots the Linux stack under the microvisor `n` times: seconds to the VM's init marker,
/// and the exit counts of the last run.
pub fn microvisor(n: usize) -> Result<(Timings, Vec<(String, u64)>), String> {
    let root = crate::workspace_root();
    let artifacts = crate::build::build(&crate::build::default_target_dir(), &root.join(LINUX_STACK))?;
    let machine = crate::qemu::Machine::new(&artifacts);
    for disk in &machine.disks {
        crate::build::ensure_disk_as(disk, machine.disk_ext4)?;
    }
    let marker = format!("[linux] {}", linux::INIT_MARKER);
    let mut runs = Vec::new();
    let mut exits = Vec::new();
    for i in 0..n {
        let mut c = crate::console::Console::spawn(linux::console_command(&machine))?;
        let t = c.wait_for(&marker, Duration::from_secs(240))?;
        c.wait_for(TOP_LINE, Duration::from_secs(30))?;
        c.wait_for("\n", Duration::from_secs(30))?;
        let text = c.text().to_string();
        c.stop();
        let line =
            |prefix: &str| text.lines().find_map(|l| l.strip_prefix(prefix)).map(parse_counts).unwrap_or_default();
        exits = line(HISTOGRAM_LINE);
        exits.extend(line(TOP_LINE));
        eprintln!("bench boot: microvisor run {} of {n}: {:.2} s to {marker:?}", i + 1, t.as_secs_f64());
        runs.push(t.as_secs_f64());
    }
    Ok((Timings { runs }, exits))
}

/// `cargo xtask bench boot [--n N]`.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut n = 3usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--n" => {
                let v = it.next().ok_or("--n needs a number")?;
                n = v.parse().ok().filter(|&n| n > 0).ok_or_else(|| format!("--n: `{v}` is not a positive number"))?;
            }
            other => return Err(format!("bench boot: unknown option `{other}` (known: --n N)")),
        }
    }
    crate::setup::ensure_qemu()?;
    let a = linux::ensure(&linux::default_dir())?;
    eprintln!("bench boot: kernel {}, {n} native boots (QEMU TCG, PVH entry, to {:?})", a.release, linux::INIT_MARKER);
    let (native, native_cpu) = native(&a, n)?;
    eprintln!(
        "bench boot: {n} boots of {LINUX_STACK} under the microvisor (the VM's kernel and initramfs are the same)"
    );
    let (mv, exits) = microvisor(n)?;
    let report = BootReport {
        release: a.release.clone(),
        cmdline: linux::native_cmdline("init.mode=poweroff"),
        native: Some(native),
        native_cpu,
        microvisor: Some(mv),
        microvisor_cpu: None,
        exits,
    };
    println!("Boot to init: Debian kernel {} (wall seconds under TCG, best / median of {n})", a.release);
    for (name, t) in [
        ("native (QEMU -kernel vmlinux, PVH)", report.native.as_ref()),
        ("microvisor (VM + VMM domain)", report.microvisor.as_ref()),
    ] {
        if let (Some(best), Some(median)) = (t.and_then(Timings::best), t.and_then(Timings::median)) {
            println!("  {name:<36} {best:>6.2} / {median:.2}");
        }
    }
    if let Some(best) = report.native_cpu.as_ref().and_then(Timings::best) {
        println!("  native, QEMU CPU seconds (best)      {best:>6.2}");
    }
    if let Some(r) = report.ratio() {
        println!("  ratio (best / best)                  {r:>6.2}");
    }
    let counts: Vec<String> = report.exits.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("  the VM's exits to its VMM: {}", counts.join(" "));
    println!("  native command line: {}", report.cmdline);
    let path = crate::build::default_target_dir().join("bench").join("boot.json");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    std::fs::write(&path, report.to_json()).map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!("\nbench boot: wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_lines_parse() {
        let h = parse_counts("exits=12 io=10 msr=2 timer=5");
        assert_eq!(h, vec![("exits".into(), 12), ("io".into(), 10), ("msr".into(), 2), ("timer".into(), 5)]);
        assert_eq!(
            parse_counts("io:0x3f8=7 msr:0x6e0=3 junk x=y"),
            vec![("io:0x3f8".into(), 7), ("msr:0x6e0".into(), 3)]
        );
    }

    #[test]
    fn best_and_median() {
        let t = Timings { runs: vec![5.0, 4.0, 6.5] };
        assert_eq!((t.best(), t.median()), (Some(4.0), Some(5.0)));
        let t = Timings { runs: vec![3.0, 1.0, 2.0, 10.0] };
        assert_eq!((t.best(), t.median()), (Some(1.0), Some(2.5)));
        assert_eq!(Timings { runs: vec![] }.median(), None);
    }

    #[test]
    fn json_has_the_native_half_and_the_ratio_only_with_both() {
        let mut r = BootReport {
            release: "6.1.0-57-amd64".into(),
            cmdline: "console=ttyS0 quiet".into(),
            native: Some(Timings { runs: vec![2.0, 1.5, 1.75] }),
            ..Default::default()
        };
        let j = r.to_json();
        assert!(j.contains("\"native_s\": 1.500") && j.contains("\"native_median_s\": 1.750"), "{j}");
        assert!(!j.contains("ratio") && !j.contains("microvisor"), "{j}");
        r.microvisor = Some(Timings { runs: vec![3.0] });
        r.exits = vec![("msr".into(), 120), ("io".into(), 7)];
        let j = r.to_json();
        assert!(j.contains("\"ratio\": 2.000") && j.contains("\"exits\": { \"msr\": 120, \"io\": 7 }"), "{j}");
        assert!(j.trim_end().ends_with('}'));
    }
}

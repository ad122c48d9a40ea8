//! Helpers for the end-to-end tests: find (or build) the stack's images and boot them in
//! QEMU with the console captured.
//!
//! `cargo xtask test` builds the images first and passes their paths in `STACK_MICROVISOR`
//! and `STACK_BUNDLE`; a plain `cargo test -p stack-tests` builds them itself into
//! `target/e2e`.

use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

pub use ipc_spec::machine_exit::MachineExit;
pub use xtask::build::Artifacts;
pub use xtask::qemu::{Ending, Machine, Run};

/// Generous: a boot takes well under a second of emulation, but CI machines are slow and
/// run two QEMUs at once.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

pub fn artifacts() -> Artifacts {
    static ARTIFACTS: OnceLock<Artifacts> = OnceLock::new();
    ARTIFACTS
        .get_or_init(|| {
            sweep_dead_scratch();
            let default_stack = xtask::manifest::default_stack_path();
            match (
                std::env::var_os("STACK_MICROVISOR"),
                std::env::var_os("STACK_BUNDLE"),
                std::env::var_os("STACK_IMAGES"),
            ) {
                (Some(m), Some(b), Some(i)) => {
                    let images = PathBuf::from(i);
                    let scratch = std::env::temp_dir().join(format!("stack-tests-{}-default.bin", std::process::id()));
                    let stack = xtask::build::pack(&images, &default_stack, &scratch)
                        .unwrap_or_else(|e| panic!("reading the default stack: {e}"));
                    Artifacts { microvisor: PathBuf::from(m), bundle: PathBuf::from(b), images, stack }
                }
                _ => {
                    let dir = xtask::workspace_root().join("target").join("e2e");
                    xtask::build::build(&dir, &default_stack)
                        .unwrap_or_else(|e| panic!("building the stack failed: {e}"))
                }
            }
        })
        .clone()
}

/// Remove the scratch files (bundles, disk images, control sockets: `stack-tests-<pid>-*`
/// in the temporary directory) of test processes that have ended. A test process cannot
/// clean up after itself (the test harness has no teardown, and a test inspects its disk
/// image after QEMU stops), so each one sweeps what the earlier ones left: without this a
/// loop of test runs fills the disk (about 70 MiB per process).
fn sweep_dead_scratch() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("stack-tests-")).and_then(|r| r.split('-').next())
        else {
            continue;
        };
        let alive = pid.parse::<u32>().is_ok_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let path = e.path();
            let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        }
    }
}

/// A machine booting the stack described by `manifest` (a path relative to the workspace).
pub fn stack_machine(manifest: &str, append: &str) -> Machine {
    let a = artifacts();
    let name = manifest.replace(['/', '.'], "-");
    // A bundle per machine, not per manifest: tests of one process run in parallel, and a
    // second test packing the same manifest into the same file truncated it while the first
    // one's QEMU was loading it (the microvisor then booted with no bundle module, or QEMU
    // died on a short file: the web loops' "no boot bundle module" and empty consoles).
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = std::env::temp_dir().join(format!("stack-tests-{}-{name}-{n}.bin", std::process::id()));
    let stack = xtask::build::pack(&a.images, &xtask::workspace_root().join(manifest), &out)
        .unwrap_or_else(|e| panic!("packing {manifest}: {e}"));
    let mut m = Machine::new(&Artifacts { bundle: out, stack, ..a });
    m.append = append.to_string();
    own_disk(&mut m, &name);
    own_ports(&mut m);
    own_ctl(&mut m, &name);
    m
}

/// Boot until every line in `wanted` has appeared (QEMU is then stopped), QEMU exits, or
/// the timeout passes.
pub fn boot_until(machine: &Machine, wanted: &[&str]) -> Run {
    xtask::qemu::run_captured(machine, BOOT_TIMEOUT, false, |lines| {
        wanted.iter().all(|w| lines.iter().any(|l| l.contains(w)))
    })
    .unwrap_or_else(|e| panic!("could not run QEMU: {e}"))
}

/// The standard machine with `append` as the microvisor's command line.
pub fn machine(append: &str) -> Machine {
    let mut m = Machine::new(&artifacts());
    m.append = append.to_string();
    own_disk(&mut m, "default");
    own_ports(&mut m);
    m
}

/// Give a machine with a disk its own fresh image (QEMU locks an image against a second
/// user, and tests run in parallel): `<temp>/stack-tests-<pid>-<name>/disk.img`.
fn own_disk(m: &mut Machine, name: &str) {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("stack-tests-{}-{name}-{n}", std::process::id()));
    for (i, disk) in m.disks.iter_mut().enumerate() {
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("disk{i}.img"));
        let _ = std::fs::remove_file(&path);
        *disk = path;
    }
}

/// Give a machine with a control device a socket of its own (tests run in parallel).
fn own_ctl(m: &mut Machine, name: &str) {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    if m.ctl.is_some() {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("stack-tests-{}-ctl-{n}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(xtask::ctl::SOCKET_NAME);
        let _ = std::fs::remove_file(&path);
        eprintln!("{name}: control socket {}", path.display());
        m.ctl = Some(path);
    }
}

/// A connection to the control interface of a running machine `m` (see [`own_ctl`]).
pub fn ctl(m: &Machine) -> xtask::ctl::Ctl {
    let socket = m.ctl.as_ref().expect("the stack has a control device");
    xtask::ctl::Ctl::connect(socket).unwrap_or_else(|e| panic!("{e}"))
}

/// `ctl kill NAME`; whether it was killed. A domain that crashed by itself a moment ago
/// and is being rebuilt (or stays dead) refuses the kill: not an error for a kill test.
pub fn ctl_kill(c: &mut xtask::ctl::Ctl, name: &str) -> bool {
    match c.request(&format!("kill {name}")) {
        Ok(_) => true,
        Err(e) if e.contains("is restarting") || e.contains("is dead") => false,
        Err(e) => panic!("ctl kill {name}: {e}"),
    }
}

/// Give a machine with network devices host ports of its own (free now, picked by the
/// system) instead of 8080 and up: tests run in parallel, and the host may use 8080.
fn own_ports(m: &mut Machine) {
    for port in m.net_ports.iter_mut() {
        *port = xtask::qemu::free_port().unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Boot `machine` until QEMU exits (or the timeout).
pub fn boot(machine: &Machine) -> Run {
    let run = xtask::qemu::run_captured(machine, BOOT_TIMEOUT, false, |_| false)
        .unwrap_or_else(|e| panic!("could not run QEMU: {e}"));
    if let Ending::TimedOut = run.ending {
        panic!("QEMU timed out after {:?}; console:\n{}", BOOT_TIMEOUT, run.console());
    }
    run
}

/// Assert that the console has a line containing `needle`, showing the console if not.
#[track_caller]
pub fn assert_line(run: &Run, needle: &str) {
    assert!(
        run.has_line(needle),
        "no console line contains {needle:?}; console was:\n{}\nQEMU ended with {:?}; its stderr:\n{}",
        run.console(),
        run.ending,
        run.stderr
    );
}

#[track_caller]
pub fn assert_no_line(run: &Run, needle: &str) {
    assert!(!run.has_line(needle), "a console line contains {needle:?}; console was:\n{}", run.console());
}

#[track_caller]
pub fn assert_exit(run: &Run, expected: MachineExit) {
    assert_eq!(
        run.machine_exit(),
        Some(expected),
        "QEMU ended with {:?}, expected {expected:?}; console:\n{}\nQEMU stderr:\n{}",
        run.ending,
        run.console(),
        run.stderr
    );
}

/// A file in a fresh per-test temporary directory.
pub fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stack-tests-{}-{}", std::process::id(), name));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

/// Runs `m` until every domain in `servers` (console prefixes) says it serves HTTP, then
/// runs `client` and stops QEMU. A failed check in `client` still stops QEMU and shows the
/// console.
pub fn run_serving(m: &Machine, servers: &[&str], client: impl FnOnce()) -> Run {
    run_serving_after(m, servers, &[], client)
}

/// [`run_serving`], also waiting for lines containing each of `also`. With `WEB_PCAP=<file>`
/// the first network's frames are also dumped there (QEMU `filter-dump`), for debugging.
pub fn run_serving_after(m: &Machine, servers: &[&str], also: &[&str], client: impl FnOnce()) -> Run {
    let mut m = m.clone();
    if let Ok(f) = std::env::var("WEB_PCAP") {
        m.extra.extend(["-object".to_string(), format!("filter-dump,id=dump0,netdev=net0,file={f}")]);
    }
    let mut client = Some(client);
    let mut failure = None;
    let run = xtask::qemu::run_captured(&m, Duration::from_secs(240), false, |lines| {
        let serving = |who: &&str| lines.iter().any(|l| l.starts_with(who) && l.contains("serving HTTP"));
        if servers.iter().all(serving) && also.iter().all(|a| lines.iter().any(|l| l.contains(a))) {
            if let Some(c) = client.take() {
                failure = std::panic::catch_unwind(std::panic::AssertUnwindSafe(c)).err();
            }
            return true;
        }
        lines.iter().any(|l| l.contains("FATAL"))
    })
    .unwrap_or_else(|e| panic!("could not run QEMU: {e}"));
    // (QEMU's ending and stderr too: a QEMU that could not start, a host port taken
    // between `free_port` and QEMU's bind for one, leaves an empty console.)
    assert!(
        client.is_none(),
        "{servers:?} never all served HTTP (QEMU ended with {:?}; its stderr: {:?}):\n{}",
        run.ending,
        run.stderr,
        run.console()
    );
    if let Some(panic) = failure {
        eprintln!("console of the failed run:\n{}", run.console());
        std::panic::resume_unwind(panic);
    }
    run
}

/// A connection to the host port `port` forwards to a guest's port 80.
pub fn connect(port: u16) -> TcpStream {
    xtask::http_client::connect(port).unwrap_or_else(|e| panic!("{e}"))
}

/// One request on `s`; returns (status code, body).
pub fn request(s: &mut TcpStream, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    xtask::http_client::request(s, method, path, body).unwrap_or_else(|e| panic!("{e}"))
}

/// `GET path` on a fresh connection.
pub fn get(port: u16, path: &str) -> (u16, Vec<u8>) {
    request(&mut connect(port), "GET", path, b"")
}

/// Deterministic pseudo-random bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Debian's kernel and the initramfs for it (`cargo xtask linux`), fetched and built under
/// `target/linux` on first use (a clean machine downloads about 70 MB from Debian).
pub fn linux_artifacts() -> xtask::linux::Artifacts {
    static LINUX: OnceLock<xtask::linux::Artifacts> = OnceLock::new();
    LINUX
        .get_or_init(|| {
            xtask::linux::ensure(&xtask::linux::default_dir())
                .unwrap_or_else(|e| panic!("fetching or building the Linux kernel and initramfs failed: {e}"))
        })
        .clone()
}

/// A small deterministic generator (xorshift64*) for tests that draw random choices from a
/// seed they print ([`kill_seed`]).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// In `0..n` (0 for `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// The seed of a kill test: `KILL_SEED` if set (to replay a run's choices), else drawn from
/// the clock (odd, so never 0: xorshift would stay at 0).
pub fn kill_seed() -> u64 {
    std::env::var("KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
    })
}

/// Crashes of a driver that a `ctl kill` overtook, in console order: a `crash` line, then a
/// `kill` line before the next `restart` line. The driver prints its crash line just before
/// it faults; when the test's kill reaches dom0 before the fault message does, dom0 kills
/// the incarnation that was about to fault (it still runs as far as dom0 knows) and builds
/// the next one, and the fault message of the destroyed incarnation is stale: one restart
/// answers both. Every other crash or kill gets a restart of its own.
pub fn overtaken_crashes<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    crash: &str,
    kill: &str,
    restart: &str,
) -> usize {
    let (mut crashed, mut overtaken) = (false, 0);
    for l in lines {
        if l.contains(crash) {
            crashed = true;
        } else if l.contains(kill) && crashed {
            overtaken += 1;
            crashed = false;
        } else if l.contains(restart) {
            crashed = false;
        }
    }
    overtaken
}

/// [`run_serving`], but the client runs on a thread of its own while the console is still
/// read, so the run keeps every line printed while the client ran (`run_serving` stops
/// reading when the client starts). The run stops when the client returns (or at a FATAL
/// line, or after `timeout`); the client's panic is passed on with the console shown.
pub fn run_serving_whole<T: Send + 'static>(
    m: &Machine,
    servers: &[&str],
    timeout: Duration,
    client: impl FnOnce() -> T + Send + 'static,
) -> (Run, T) {
    let mut client = Some(client);
    let mut thread: Option<std::thread::JoinHandle<T>> = None;
    let run = xtask::qemu::run_captured_polling(m, timeout, false, true, |lines| {
        if lines.iter().any(|l| l.contains("FATAL")) {
            return true;
        }
        if let Some(t) = thread.as_ref() {
            return t.is_finished();
        }
        let serving = |who: &&str| lines.iter().any(|l| l.starts_with(who) && l.contains("serving HTTP"));
        if servers.iter().all(serving) {
            if let Some(c) = client.take() {
                thread = Some(std::thread::spawn(c));
            }
        }
        false
    })
    .unwrap_or_else(|e| panic!("could not run QEMU: {e}"));
    let Some(thread) = thread else { panic!("{servers:?} never all served HTTP:\n{}", run.console()) };
    if !thread.is_finished() {
        panic!("the client did not finish: QEMU ended with {:?}; console:\n{}", run.ending, run.console());
    }
    match thread.join() {
        Ok(t) => (run, t),
        Err(panic) => {
            eprintln!("console of the failed run:\n{}", run.console());
            std::panic::resume_unwind(panic)
        }
    }
}

#[cfg(test)]
mod overtaken_tests {
    use super::overtaken_crashes;

    #[test]
    fn a_crash_a_kill_overtook_shares_its_restart_and_others_do_not() {
        let console = [
            "[net] crashing after 1200 frames",
            "[dom0] restarted net (1 of 30)",
            "[dom0] ctl: killing net at 5 ns",
            "[dom0] restarted net (2 of 30)",
            "[net] crashing after 1500 frames",
            "[dom0] ctl: killing net at 9 ns",
            "[dom0] restarted net (3 of 30)",
            "[dom0] ctl: killing net at 12 ns",
            "[dom0] restarted net (4 of 30)",
        ];
        let n = overtaken_crashes(console, "[net] crashing after", "[dom0] ctl: killing net", "[dom0] restarted net");
        assert_eq!(n, 1);
    }
}

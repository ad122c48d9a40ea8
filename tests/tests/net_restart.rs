//! The net driver VM restarts under a long TCP transfer, and the guest's TCP connection to
//! the host survives every restart: frames in flight are lost and sent again, nothing else.
//!
//! - Kills mixed (tests/stacks/crashy-net.toml): the driver crashes after a random number of
//!   frames (`rogue=crash-after`: a stage-2 fault, a triple fault or an exit) and the test
//!   kills it with `ctl kill net` at random times: each after another 0.75 to 2.25 MiB of
//!   the transfer, drawn from a seed (printed; `KILL_SEED` replays the test's choices). dom0 builds it again each time and the new incarnation re-attaches to
//!   the guest's net channel as it is (`ipc_spec::net`, "Restarts").
//! - Hangs (tests/stacks/hung-net.toml): the driver spins after a random number of frames
//!   (`rogue=hang-after`): no fault, only dom0's hang watchdog (its heartbeat stops) can
//!   notice.
//! - Giving up (tests/stacks/crash-limit-net.toml): past its restart limit the driver stays
//!   dead, and the guest is told (the channel marked gone) and says so at once.

use ipc_spec::ctl::State;
use stack_tests::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Byte `offset` of the guest's `GET /source?seed=<seed>` stream (the same definition as
/// `demo_guest::http::seeded_byte`: SplitMix64 of `seed + offset / 8`, little endian).
fn seeded_byte(seed: u64, offset: u64) -> u8 {
    let mut z = seed.wrapping_add(offset / 8).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> (8 * (offset % 8))) as u8
}

/// FNV-1a, 64 bits, continued from `h`.
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}
const FNV_START: u64 = 0xCBF2_9CE4_8422_2325;

/// The guest's counts from its status page: (restarts seen, incarnation, stale frames dropped,
/// MAC changes) and the gap line, if any.
fn restarts(port: u16) -> ((u64, u64, u64, u64), String, String) {
    let (status, body) = get(port, "/");
    assert_eq!(status, 200);
    let page = String::from_utf8_lossy(&body).into_owned();
    let line = page
        .lines()
        .find(|l| l.starts_with("net driver restarts seen: "))
        .unwrap_or_else(|| panic!("no restart line on the status page:\n{page}"));
    let numbers: Vec<u64> =
        line.split(|c: char| !c.is_ascii_digit()).filter(|w| !w.is_empty()).map(|w| w.parse().unwrap()).collect();
    let [seen, incarnation, stale, macs] = numbers[..] else { panic!("unexpected restart line: {line}") };
    let gaps = page.lines().find(|l| l.starts_with("net restart gaps")).unwrap_or("").to_string();
    ((seen, incarnation, stale, macs), gaps, page)
}

/// One `GET /source` of `bytes` seeded bytes on one connection; every byte checked as it
/// comes, and a checksum of the whole compared with the expected one. Returns the time the
/// body took. The bytes received so far are published in `progress`.
fn download(port: u16, bytes: u64, seed: u64, progress: &AtomicU64) -> Duration {
    let mut s: TcpStream = connect(port);
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "GET /source?bytes={bytes}&seed={seed} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!("reading the response head: {other:?} after {:?}", String::from_utf8_lossy(&head)),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains(&format!("content-length: {bytes}\r\n")), "{head}");
    let t0 = Instant::now();
    let (mut got, mut want) = (FNV_START, FNV_START);
    let mut at = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut expected = vec![0u8; 64 * 1024];
    let mut next_report = 4 << 20;
    while at < bytes {
        let room = buf.len().min((bytes - at) as usize);
        let n = match s.read(&mut buf[..room]) {
            Ok(0) => panic!("the connection closed after {at} of {bytes} bytes"),
            Ok(n) => n,
            Err(e) => panic!("the connection failed after {at} of {bytes} bytes: {e}"),
        };
        for (i, e) in expected[..n].iter_mut().enumerate() {
            *e = seeded_byte(seed, at + i as u64);
        }
        got = fnv1a(got, &buf[..n]);
        want = fnv1a(want, &expected[..n]);
        if buf[..n] != expected[..n] {
            let i = buf[..n].iter().zip(&expected[..n]).position(|(a, b)| a != b).unwrap_or(0);
            panic!(
                "byte {} of the transfer differs (got {:#04x}, expected {:#04x})",
                at + i as u64,
                buf[i],
                expected[i]
            );
        }
        at += n as u64;
        progress.store(at, Ordering::Relaxed);
        if at >= next_report {
            eprintln!("net restart: {} MiB after {:.1} s", at >> 20, t0.elapsed().as_secs_f64());
            next_report += 4 << 20;
        }
    }
    assert_eq!(got, want, "checksums differ");
    eprintln!("net restart: {bytes} bytes, FNV-1a {got:016x} as expected");
    t0.elapsed()
}

/// Console lines of the net driver's failures and dom0's answers.
struct Failures {
    /// `[net] crashing after` (rogue=crash-after).
    crashes: usize,
    /// `[net] hanging after` (rogue=hang-after).
    hangs: usize,
    /// `[net] wedging my transmit path` (rogue=wedge-after).
    wedges: usize,
    /// `[net] heartbeat: withheld` (the device stopped keeping up).
    withheld: usize,
    /// `[dom0] ctl: killing net`.
    ctl_kills: usize,
    /// `[dom0] watchdog: net` (found hung).
    watchdog: usize,
    /// `[dom0] restarted net`.
    restarts: usize,
    /// For each hang or wedge that the watchdog noticed: ns from it to the watchdog's line.
    hang_to_watchdog: Vec<u64>,
}

fn failures(run: &Run) -> Failures {
    let count = |needle: &str| run.lines.iter().filter(|l| l.contains(needle)).count();
    // "... at <t> ns ..." on the driver's hang line and dom0's watchdog line.
    let at = |l: &str| l.rsplit(" at ").next()?.split(" ns").next()?.parse::<u64>().ok();
    let mut hang_to_watchdog = Vec::new();
    let mut hung = None;
    for l in &run.lines {
        if l.contains("[net] hanging after") || l.contains("[net] wedging my transmit path") {
            hung = at(l);
        } else if l.contains("[dom0] watchdog: net") {
            if let (Some(h), Some(t)) = (hung.take(), at(l)) {
                hang_to_watchdog.push(t.saturating_sub(h));
            }
        }
    }
    Failures {
        crashes: count("[net] crashing after"),
        hangs: count("[net] hanging after"),
        wedges: count("[net] wedging my transmit path"),
        withheld: count("[net] heartbeat: withheld"),
        ctl_kills: count("[dom0] ctl: killing net"),
        watchdog: count("[dom0] watchdog: net"),
        restarts: count("[dom0] restarted net"),
        hang_to_watchdog,
    }
}

/// How the test kills the driver besides what its manifest makes it do by itself.
#[derive(Clone, Copy)]
enum Killer {
    None,
    /// `ctl kill net` each time the transfer has moved another `min_kib` to `max_kib` KiB
    /// (drawn from the seed): kill times follow the transfer's progress, so that a faster
    /// or slower run gets as many kills, at points a seed replays.
    Ctl {
        min_kib: u64,
        max_kib: u64,
    },
}

/// Boots `stack`, downloads `mib` MiB and checks that it came through `min_restarts` net
/// driver restarts or more; returns the run (its whole console) and the kills `ctl kill`
/// made.
fn transfer_across_restarts(stack: &str, mib: u64, min_restarts: u64, killer: Killer) -> (Run, u64) {
    let m = stack_machine(stack, "");
    let port = m.net_ports[0];
    let seed = kill_seed();
    eprintln!("net restart: seed {seed} (KILL_SEED={seed} replays the test's choices: data and kill times)");
    let machine = m.clone();
    let (run, by_ctl) = run_serving_whole(&m, &["[guest]"], Duration::from_secs(900), move || {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let killer = match killer {
            Killer::None => None,
            Killer::Ctl { min_kib, max_kib } => {
                let (stop, progress) = (stop.clone(), progress.clone());
                let mut c = ctl(&machine);
                let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
                Some(std::thread::spawn(move || {
                    let (mut sent, mut next) = (0u64, 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        next += (min_kib + rng.below(max_kib - min_kib + 1)) << 10;
                        while progress.load(Ordering::Relaxed) < next && !stop.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        sent += u64::from(ctl_kill(&mut c, "net"));
                    }
                    sent
                }))
            }
        };
        let ((_, before, _, _), _, _) = restarts(port);
        let took = download(port, mib << 20, seed, &progress);
        stop.store(true, Ordering::Relaxed);
        let by_ctl = killer.map_or(0, |k| k.join().expect("the killer thread"));
        let ((seen, after, stale, macs), gaps, page) = restarts(port);
        eprintln!(
            "net restart: {mib} MiB in {:.1} s ({:.2} MiB/s) across {} net driver restarts (incarnation {before} to {after}; {by_ctl} by ctl kill); the guest saw {seen} restarts, dropped {stale} stale frames; {gaps}",
            took.as_secs_f64(),
            mib as f64 / took.as_secs_f64(),
            after - before,
        );
        assert!(after - before >= min_restarts, "only {} restarts during the transfer:\n{page}", after - before);
        assert_eq!(macs, 0, "the MAC changed across restarts:\n{page}");
        assert!(page.contains("MAC 02:4d:00:00:00:00"), "{page}");
        by_ctl
    });
    // Each incarnation attached as the next one and re-attached to the rings as they were.
    assert_line(&run, "[net] serving net channel \"net0\" as port 0: MAC 02:4d:00:00:00:00, MTU 1500");
    assert_line(&run, "incarnation 1");
    assert_no_line(&run, "restarting net failed");
    assert_no_line(&run, "not restarted again");
    assert_no_line(&run, "FATAL");
    (run, by_ctl)
}

#[test]
fn a_tcp_transfer_of_32_mib_survives_20_net_driver_kills_by_crashes_and_ctl() {
    let (run, by_ctl) =
        transfer_across_restarts("tests/stacks/crashy-net.toml", 32, 20, Killer::Ctl { min_kib: 768, max_kib: 2304 });
    let f = failures(&run);
    eprintln!(
        "net restart: {} crashes, {} ctl kills ({by_ctl} answered), {} found hung by the watchdog, {} restarts",
        f.crashes, f.ctl_kills, f.watchdog, f.restarts
    );
    assert_line(&run, "[dom0] watchdog on net: a hang is noticed after 50 ms without a heartbeat");
    assert!(
        f.crashes >= 5 && f.ctl_kills >= 5,
        "kills must be mixed: {} crashes, {} ctl kills",
        f.crashes,
        f.ctl_kills
    );
    assert!(f.crashes + f.ctl_kills >= 20, "{} crashes and {} ctl kills", f.crashes, f.ctl_kills);
    let overtaken = overtaken_crashes(
        run.lines.iter().map(String::as_str),
        "[net] crashing after",
        "[dom0] ctl: killing net",
        "[dom0] restarted net",
    );
    assert!(
        f.restarts + overtaken >= f.crashes + f.ctl_kills,
        "{} restarts ({overtaken} crashes overtaken by a kill)",
        f.restarts
    );
    // Every dead incarnation's device was reset before its memory was freed (`pci_release`).
    let resets = run.lines.iter().filter(|l| l.contains("released: virtio reset done")).count();
    assert!(resets >= f.restarts, "{} restarts, {resets} device resets", f.restarts);
    assert_no_line(&run, "virtio reset NOT done");
}

#[test]
fn a_tcp_transfer_survives_a_hanging_net_driver_restarted_by_the_watchdog() {
    let (run, _) = transfer_across_restarts("tests/stacks/hung-net.toml", 8, 3, Killer::None);
    let mut f = failures(&run);
    f.hang_to_watchdog.sort();
    let ms: Vec<u64> = f.hang_to_watchdog.iter().map(|t| t / 1_000_000).collect();
    eprintln!(
        "hung net: {} hangs, {} noticed by the watchdog, {} restarts; hang to watchdog {ms:?} ms",
        f.hangs, f.watchdog, f.restarts
    );
    assert_line(&run, "[dom0] watchdog on net: a hang is noticed after 50 ms without a heartbeat");
    assert!(f.hangs >= 3, "only {} hang(s)", f.hangs);
    // Every hang but possibly the last (the run stops when the client is done) was noticed
    // and restarted; no crash is involved. A busy driver on a loaded host may miss a beat
    // now and then: a needless restart, which costs the guest only time (not failed here).
    assert!(
        f.watchdog + 1 >= f.hangs && f.restarts >= f.hangs - 1,
        "{} hangs, {} noticed, {} restarts",
        f.hangs,
        f.watchdog,
        f.restarts
    );
    assert_no_line(&run, "fault in net");
    assert_no_line(&run, "[net] crashing after");
    // The watchdog's period is 50 ms and dom0 looks every 12.5 ms: seen within about 65 ms
    // of the last beat, and the driver beats every 12.5 ms or so.
    let median = f.hang_to_watchdog.get(f.hang_to_watchdog.len() / 2).copied().unwrap_or(u64::MAX);
    assert!(median < 100_000_000, "hang to watchdog {ms:?} ms");
}

/// A driver whose loop turns but whose device stopped giving back transmit buffers
/// (`rogue=wedge-after`) stops beating (`domain_rt::heartbeat::Progress`) and is restarted
/// by the watchdog: the heartbeat proves more than "the loop turns".
#[test]
fn a_tcp_transfer_survives_a_net_driver_whose_transmit_path_wedges() {
    let (run, _) = transfer_across_restarts("tests/stacks/wedged-net.toml", 8, 3, Killer::None);
    let mut f = failures(&run);
    f.hang_to_watchdog.sort();
    let ms: Vec<u64> = f.hang_to_watchdog.iter().map(|t| t / 1_000_000).collect();
    eprintln!(
        "wedged net: {} wedges, {} beats withheld, {} noticed by the watchdog, {} restarts; wedge to watchdog {ms:?} ms",
        f.wedges, f.withheld, f.watchdog, f.restarts
    );
    assert!(f.wedges >= 3, "only {} wedge(s)", f.wedges);
    // Each wedged incarnation (but possibly the last) withheld its beats and was found hung.
    assert!(
        f.withheld + 1 >= f.wedges && f.watchdog + 1 >= f.wedges,
        "{} wedges, {} withheld, {} noticed",
        f.wedges,
        f.withheld,
        f.watchdog
    );
    assert!(f.restarts + 1 >= f.wedges, "{} restarts", f.restarts);
    assert_no_line(&run, "fault in net");
    assert_no_line(&run, "[net] hanging after");
    // 4 periods of grace for the device, then the watchdog's period: about 260 ms.
    let median = f.hang_to_watchdog.get(f.hang_to_watchdog.len() / 2).copied().unwrap_or(u64::MAX);
    assert!(median < 600_000_000, "wedge to watchdog {ms:?} ms");
}

/// One `GET /` with short timeouts; whether it was answered 200.
fn try_get(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut body = Vec::new();
    let _ = s.read_to_end(&mut body);
    body.starts_with(b"HTTP/1.1 200")
}

#[test]
fn a_net_driver_past_its_restart_limit_stays_dead_and_the_guest_says_so_until_ctl_restart() {
    let m = stack_machine("tests/stacks/crash-limit-net.toml", "");
    let port = m.net_ports[0];
    let machine = m.clone();
    let (run, gone_after) = run_serving_whole(&m, &["[guest]"], Duration::from_secs(300), move || {
        let mut c = ctl(&machine);
        let state = |c: &mut xtask::ctl::Ctl| {
            c.list().expect("ctl list").into_iter().find(|(n, ..)| n == "net").map(|(_, s, ..)| s).expect("net")
        };
        // Requests move frames until the driver has crashed past its limit.
        let t0 = Instant::now();
        let mut answered = 0;
        while state(&mut c) != State::Dead {
            answered += u32::from(try_get(port));
            assert!(t0.elapsed() < Duration::from_secs(120), "the net driver was never given up on");
        }
        let gone_after = t0.elapsed();
        eprintln!("crash limit net: given up after {gone_after:?} ({answered} requests answered meanwhile)");
        // Nothing answers while it is dead...
        assert!(!try_get(port), "answered with the net driver dead");
        // ... and `ctl restart` brings it back: the guest serves again on the same channel.
        let (_, words) = c.request("restart net").expect("restart net");
        assert_eq!(words, "restarted net");
        let t1 = Instant::now();
        while !try_get(port) {
            assert!(t1.elapsed() < Duration::from_secs(30), "the guest did not serve again after ctl restart");
        }
        eprintln!("crash limit net: served again {:?} after ctl restart", t1.elapsed());
        gone_after
    });
    let _ = gone_after;
    assert_line(&run, "[dom0] net failed 4 times within 60000 ms: not restarted again (restart_limit)");
    assert_eq!(run.lines.iter().filter(|l| l.contains("[dom0] restarted net")).count(), 4, "3 by policy, 1 by ctl");
    // dom0 marks the channel and rings the guest: the guest says why at once, after dom0.
    let given_up = run.lines.iter().position(|l| l.contains("not restarted again")).expect("the give-up line");
    let said = run
        .lines
        .iter()
        .position(|l| l.contains("[guest] net: server gone: dom0 gave up restarting the net driver VM"))
        .unwrap_or_else(|| panic!("the guest did not say its net driver is gone:\n{}", run.console()));
    assert!(said > given_up, "the guest said so before dom0 gave up:\n{}", run.console());
    assert_line(&run, "[guest] net: the network device is back: serving again");
    assert_no_line(&run, "FATAL");
}

/// The same transfer through a net driver VM that is never killed: the throughput to
/// compare with.
#[test]
#[ignore]
fn control_the_same_transfer_without_kills() {
    transfer_across_restarts("stacks/demo.toml", 32, 0, Killer::None);
}

/// The soak: 256 MiB, about ten times as many kills, crashes and `ctl kill` mixed (minutes
/// under TCG).
#[test]
#[ignore]
fn soak_a_tcp_transfer_of_256_mib_survives_150_net_driver_kills() {
    transfer_across_restarts("tests/stacks/crashy-net.toml", 256, 150, Killer::Ctl { min_kib: 768, max_kib: 2304 });
}

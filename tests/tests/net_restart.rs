//! The net driver VM restarts under a long TCP transfer: it crashes after a random number of
//! frames (`rogue=crash-after`, a stage-2 fault, a triple fault or an exit), dom0 builds it
//! again, the new incarnation re-attaches to the guest's net channel as it is
//! (`ipc_spec::net`, "Restarts"), and the guest's TCP connection to the host survives every
//! kill: frames in flight are lost and sent again, nothing else.

use stack_tests::*;
use std::io::{Read, Write};
use std::net::TcpStream;
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
/// body took.
fn download(port: u16, bytes: u64, seed: u64) -> Duration {
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
        if at >= next_report {
            eprintln!("net restart: {} MiB after {:.1} s", at >> 20, t0.elapsed().as_secs_f64());
            next_report += 4 << 20;
        }
    }
    assert_eq!(got, want, "checksums differ");
    eprintln!("net restart: {bytes} bytes, FNV-1a {got:016x} as expected");
    t0.elapsed()
}

/// Boots `stack`, downloads `mib` MiB and checks that it came through `min_restarts` net
/// driver restarts or more.
fn transfer_across_restarts(stack: &str, mib: u64, min_restarts: u64) {
    let m = stack_machine(stack, "");
    let port = m.net_ports[0];
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    eprintln!("net restart: seed {seed}");
    let run = run_serving(&m, &["[guest]"], || {
        let ((_, before, _, _), _, _) = restarts(port);
        let took = download(port, mib << 20, seed);
        let ((seen, after, stale, macs), gaps, page) = restarts(port);
        eprintln!(
            "net restart: {mib} MiB in {:.1} s ({:.2} MiB/s) across {} net driver restarts (incarnation {before} to {after}); the guest saw {seen} restarts, dropped {stale} stale frames; {gaps}",
            took.as_secs_f64(),
            mib as f64 / took.as_secs_f64(),
            after - before,
        );
        assert!(after - before >= min_restarts, "only {} restarts during the transfer:\n{page}", after - before);
        assert_eq!(macs, 0, "the MAC changed across restarts:\n{page}");
        assert!(page.contains("MAC 02:4d:00:00:00:00"), "{page}");
    });
    // Each incarnation attached as the next one and re-attached to the rings as they were.
    assert_line(&run, "[net] serving net channel \"net0\" as port 0: MAC 02:4d:00:00:00:00, MTU 1500");
    assert_line(&run, "incarnation 1");
    assert_no_line(&run, "restarting net failed");
    assert_no_line(&run, "not restarted again");
    assert_no_line(&run, "FATAL");
}

#[test]
fn a_tcp_transfer_of_32_mib_survives_20_net_driver_crashes() {
    transfer_across_restarts("tests/stacks/crashy-net.toml", 32, 20);
}

/// The same transfer through a net driver VM that does not crash: the throughput to compare
/// with.
#[test]
#[ignore]
fn control_the_same_transfer_without_crashes() {
    transfer_across_restarts("stacks/demo.toml", 32, 0);
}

/// The soak: 256 MiB, about ten times as many crashes (minutes under TCG).
#[test]
#[ignore]
fn soak_a_tcp_transfer_of_256_mib_survives_150_net_driver_crashes() {
    transfer_across_restarts("tests/stacks/crashy-net.toml", 256, 150);
}

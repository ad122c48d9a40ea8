//! The network benchmark stack (`stacks/bench-net.toml`) as a real client on the host sees
//! it: the same demo guest image serves HTTP twice, once behind the net driver VM (a net
//! channel, on the first virtio-net function and the first forwarded port) and once owning
//! the second virtio-net function directly (no driver VM, its receive interrupt routed to
//! its own notification), each on its own QEMU user network.

use stack_tests::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The console lines that say both guests serve.
const VIA_DRIVER: &str = "[guest] net channel \"net0\"";
const DIRECT: &str = "[direct] net device 00:02.0 owned directly: MAC";

/// Boots the bench-net stack, runs `client` with the two forwarded ports (the net driver
/// VM's NIC first, then the directly owned one) once both guests serve, then stops QEMU.
fn with_servers(client: impl FnOnce(u16, u16)) -> Run {
    let m = stack_machine("stacks/bench-net.toml", "");
    assert_eq!(m.net_ports.len(), 2, "the stack assigns two virtio-net devices");
    let (via_driver, direct) = (m.net_ports[0], m.net_ports[1]);
    let mut client = Some(client);
    let mut failure = None;
    let run = xtask::qemu::run_captured(&m, Duration::from_secs(240), false, |lines| {
        let serving = |who: &str| lines.iter().any(|l| l.contains(who) && l.contains("serving HTTP"));
        if serving(VIA_DRIVER) && serving(DIRECT) {
            if let Some(c) = client.take() {
                // A failed check must still stop QEMU and show the console.
                failure = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c(via_driver, direct))).err();
            }
            return true;
        }
        lines.iter().any(|l| l.contains("FATAL"))
    })
    .unwrap_or_else(|e| panic!("could not run QEMU: {e}"));
    assert!(client.is_none(), "the guests never both served HTTP:\n{}", run.console());
    if let Some(panic) = failure {
        eprintln!("console of the failed run:\n{}", run.console());
        std::panic::resume_unwind(panic);
    }
    run
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connecting to 127.0.0.1:{port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// One request on `s`; returns (status code, body).
fn request(s: &mut TcpStream, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).unwrap_or_else(|e| panic!("reading the response head: {e}"));
        assert_eq!(n, 1, "connection closed in the response head: {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status: u16 =
        head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("bad head {head:?}"));
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no Content-Length in {head:?}"));
    let mut body = vec![0; len];
    s.read_exact(&mut body).unwrap_or_else(|e| panic!("reading a {len}-byte body: {e}"));
    (status, body)
}

/// Deterministic pseudo-random bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
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

/// The status page names the device behind port `port`; 100 KB come back as sent.
fn check(port: u16, device: &str) {
    let (status, body) = request(&mut connect(port), "GET", "/", b"");
    assert_eq!(status, 200, "GET / on port {port}");
    let page = String::from_utf8_lossy(&body);
    assert!(page.contains("microvisor demo guest"), "port {port}: {page}");
    assert!(page.contains(device), "port {port}: no {device:?} in {page}");
    let mut s = connect(port);
    for (i, len) in [1usize, 1460, 100_000].into_iter().enumerate() {
        let payload = noise(len, i as u64 + 11);
        let (status, body) = request(&mut s, "POST", "/echo", &payload);
        assert_eq!(status, 200, "port {port}: echo of {len} bytes");
        assert!(body == payload, "port {port}: echo of {len} bytes came back different");
    }
}

#[test]
fn a_guest_behind_the_net_driver_vm_and_a_guest_owning_its_nic_both_serve_http() {
    let run = with_servers(|via_driver, direct| {
        check(via_driver, "net: channel to the net driver VM");
        check(direct, "net: virtio-net owned directly, MAC 52:54:00:12:34:57");
        // Both still answer after the other was busy.
        assert_eq!(request(&mut connect(via_driver), "GET", "/", b"").0, 200);
        assert_eq!(request(&mut connect(direct), "GET", "/", b"").0, 200);
    });
    assert_no_line(&run, "FATAL");
    assert_no_line(&run, "blocked DMA");
    assert_no_line(&run, "[dom0] fault in");
    assert_line(&run, "[dom0] assigned virtio-net (1af4:1041) to net");
    assert_line(&run, "[dom0] assigned virtio-net (1af4:1041) to direct");
    assert_line(
        &run,
        "[direct] net device 00:02.0 owned directly: MAC 52:54:00:12:34:57; serving HTTP on 10.0.2.15/24, port 80",
    );
    // The direct guest waits on its device's interrupt, not on polling.
    assert_no_line(&run, "[direct] net device interrupts:");
}

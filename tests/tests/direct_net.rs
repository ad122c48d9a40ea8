//! The network benchmark stack (`stacks/bench-net.toml`) as a real client on the host sees
//! it: the same demo guest image serves HTTP twice, once behind the net driver VM (a net
//! channel, on the first virtio-net function and the first forwarded port) and once owning
//! the second virtio-net function directly (no driver VM, its receive interrupt routed to
//! its own notification), each on its own QEMU user network.

use stack_tests::*;

/// The console lines that say both guests serve.
const VIA_DRIVER: &str = "[guest] net channel \"net0\"";
const DIRECT: &str = "[direct] net device 00:02.0 owned directly: MAC";

/// Boots the bench-net stack, runs `client` with the two forwarded ports (the net driver
/// VM's NIC first, then the directly owned one) once both guests serve, then stops QEMU.
fn with_servers(client: impl FnOnce(u16, u16)) -> Run {
    let m = stack_machine("stacks/bench-net.toml", "");
    assert_eq!(m.net_ports.len(), 2, "the stack assigns two virtio-net devices");
    let (via_driver, direct) = (m.net_ports[0], m.net_ports[1]);
    run_serving(&m, &[VIA_DRIVER, DIRECT], || client(via_driver, direct))
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

/// Small requests on one kept-alive connection, then the server's own count of the sleeps
/// it began with work waiting (a wake-up it lost itself, which only a timer would end): none.
fn small_requests_without_lost_wakeups(port: u16) {
    let mut s = connect(port);
    for i in 0..300 {
        assert_eq!(request(&mut s, "GET", "/", b"").0, 200, "port {port}: small request {i}");
    }
    let (status, body) = request(&mut s, "GET", "/", b"");
    assert_eq!(status, 200, "GET / on port {port}");
    let page = String::from_utf8_lossy(&body);
    assert!(
        page.contains(", 0 sleeps with work waiting"),
        "port {port}: the server went to sleep with a request or an answer waiting:\n{page}"
    );
}

#[test]
fn a_guest_behind_the_net_driver_vm_and_a_guest_owning_its_nic_both_serve_http() {
    let run = with_servers(|via_driver, direct| {
        check(via_driver, "net: channel to the net driver VM");
        check(direct, "net: virtio-net owned directly, MAC 52:54:00:12:34:57");
        small_requests_without_lost_wakeups(via_driver);
        small_requests_without_lost_wakeups(direct);
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

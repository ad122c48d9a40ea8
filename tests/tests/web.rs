//! The default stack as a real client on the host sees it: plain TCP from the test to the
//! demo guest's HTTP server, through QEMU's user network, the virtio-net device (passthrough,
//! behind the IOMMU), the net driver VM's switch and the guest's net channel.

use stack_tests::*;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

/// Boots the default stack, runs `client` against the guest's port once the guest serves,
/// then stops QEMU; returns the run (console) and the machine (for its disk image).
fn with_server(client: impl FnOnce(u16)) -> (Run, xtask::qemu::Machine) {
    let m = stack_machine("stacks/demo.toml", "");
    let port = m.net_ports[0];
    let run = run_serving(&m, &["[guest]"], || client(port));
    (run, m)
}

#[test]
fn status_page_echo_and_errors_over_real_tcp() {
    let (run, _) = with_server(|port| {
        let (status, body) = get(port, "/");
        assert_eq!(status, 200);
        let page = String::from_utf8_lossy(&body);
        assert!(page.contains("microvisor demo guest"), "{page}");
        // Every domain, from dom0's status service, with its state and counts.
        for d in ["dom0", "disk", "net", "guest"] {
            assert!(
                page.lines().any(|l| l.trim_start().starts_with(d) && l.contains("running") && l.contains("IPC calls")),
                "no status line for {d}:\n{page}"
            );
        }
        // Echo on one kept-alive connection, 1 byte to 1 MiB.
        let mut s = connect(port);
        for (i, len) in [1usize, 100, 1460, 4096, 65_536, 300_000, 1 << 20].into_iter().enumerate() {
            let payload = noise(len, i as u64 + 7);
            let (status, body) = request(&mut s, "POST", "/echo", &payload);
            assert_eq!(status, 200, "echo of {len} bytes");
            assert!(body == payload, "echo of {len} bytes came back different");
        }
        // Mistakes get 4xx, and the server goes on.
        assert_eq!(get(port, "/nope").0, 404);
        assert_eq!(get(port, "/blk/131072").0, 416);
        assert_eq!(get(port, "/blk/zero").0, 400);
        assert_eq!(request(&mut connect(port), "PUT", "/blk/0", &[1; 100]).0, 400);
        assert_eq!(get(port, "/").0, 200);
    });
    assert_no_line(&run, "FATAL");
    assert_line(&run, "[dom0] assigned virtio-net (1af4:1041) to net");
}

#[test]
fn disk_writes_through_http_reach_the_disk_image() {
    const LBA: u64 = 4000;
    let data = noise(96 * 512, 99);
    let expected = data.clone();
    let (run, m) = with_server(move |port| {
        let mut s = connect(port);
        let (status, _) = request(&mut s, "PUT", &format!("/blk/{LBA}"), &data);
        assert_eq!(status, 200);
        let (status, body) = request(&mut s, "GET", &format!("/blk/{LBA}?count=96"), b"");
        assert_eq!(status, 200);
        assert!(body == data, "sectors read back differ from those written");
        let (status, body) = request(&mut s, "GET", &format!("/blk/{}?count=2", LBA + 95), b"");
        assert_eq!((status, body.len()), (200, 1024));
        assert_eq!(body[..512], data[95 * 512..]);
        assert_eq!(request(&mut s, "POST", "/flush", b"").0, 200);
    });
    assert_no_line(&run, "FATAL");
    // QEMU is stopped: the image on the host holds what the guest wrote.
    let image = std::fs::read(&m.disks[0]).unwrap();
    let at = (LBA * 512) as usize;
    assert!(image[at..at + expected.len()] == expected[..], "the disk image does not hold the written sectors");
}

#[test]
fn a_disk_driver_vm_that_never_answers_costs_the_guest_its_disk_and_nothing_else() {
    let m = stack_machine("tests/stacks/silent-disk.toml", "");
    let port = m.net_ports[0];
    let run = run_serving(&m, &["[guest]"], || {
        // Disk requests get 503. The first request timed out once (in the guest's block
        // self-test); later ones fail at once while it is unanswered: the count stays at 1.
        for _ in 0..3 {
            let (status, body) = get(port, "/blk/0");
            assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
        }
        assert_eq!(request(&mut connect(port), "PUT", "/blk/0", &[7; 512]).0, 503);
        assert_eq!(request(&mut connect(port), "POST", "/flush", b"").0, 503);
        // Everything else works.
        let payload = noise(100_000, 3);
        assert!(request(&mut connect(port), "POST", "/echo", &payload) == (200, payload));
        let (status, body) = get(port, "/");
        assert_eq!(status, 200);
        let page = String::from_utf8_lossy(&body);
        assert!(page.contains("it failed to answer 1 time(s) within 5 s"), "{page}");
        assert!(
            page.lines().any(|l| l.trim_start().starts_with("disk") && l.contains("running")),
            "the silent disk VM is not listed as running:\n{page}"
        );
    });
    assert_line(&run, "[disk] ignoring every request (rogue=silent)");
    assert_line(&run, "[guest] block self-test FAILED: the driver VM did not answer within 5 s");
    assert_no_line(&run, "FATAL");
    assert_no_line(&run, "stopped:");
}

#[test]
fn a_disk_driver_vm_that_answers_late_is_used_again_once_it_does() {
    let m = stack_machine("tests/stacks/late-disk.toml", "");
    let port = m.net_ports[0];
    let run = run_serving_after(&m, &["[guest]"], &["[disk] serving now"], || {
        // The late answer to the request that timed out is taken and dropped at the next
        // disk request; from then on the disk works.
        let data = noise(8 * 512, 5);
        let mut s = connect(port);
        assert_eq!(request(&mut s, "PUT", "/blk/100", &data).0, 200);
        let (status, body) = request(&mut s, "GET", "/blk/100?count=8", b"");
        assert_eq!(status, 200);
        assert!(body == data, "sectors read back differ from those written");
        let (_, page) = get(port, "/");
        let page = String::from_utf8_lossy(&page);
        assert!(page.contains("it failed to answer 1 time(s) within 5 s"), "{page}");
    });
    assert_line(&run, "[guest] block self-test FAILED: the driver VM did not answer within 5 s");
    assert_no_line(&run, "FATAL");
    assert_no_line(&run, "stopped:");
}

#[test]
fn many_connections_at_once_and_a_client_that_resets_mid_request() {
    let (run, _) = with_server(|port| {
        // A client that sends half a request and resets the connection.
        let mut s = connect(port);
        s.write_all(b"POST /echo HTTP/1.1\r\nContent-Length: 100000\r\n\r\nonly a little").unwrap();
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
        drop(s);
        // One that sends half a head and closes its side.
        let mut s = connect(port);
        s.write_all(b"GET / HT").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        drop(s);
        // Twelve connections open at once, each with a few requests running in parallel. They
        // are opened one after the other: QEMU's user network listens on the forwarded port
        // with a backlog of one, so a burst of simultaneous connects can be reset by the host
        // before QEMU accepts them (a limit of the emulated network, not of the stack).
        let streams: Vec<TcpStream> = (0..12)
            .map(|_| {
                let s = connect(port);
                std::thread::sleep(Duration::from_millis(50));
                s
            })
            .collect();
        let clients: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(c, mut s)| {
                std::thread::spawn(move || {
                    for r in 0..3 {
                        let payload = noise(5000 + c * 100 + r, (c * 10 + r) as u64);
                        let (status, body) = request(&mut s, "POST", "/echo", &payload);
                        assert_eq!(status, 200);
                        assert!(body == payload, "client {c} request {r}: echo differs");
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().expect("a client failed");
        }
        assert_eq!(get(port, "/").0, 200);
    });
    assert_no_line(&run, "FATAL");
}

#[test]
fn two_guests_behind_one_net_driver_vm_each_get_their_own_frames() {
    let mut m = stack_machine("tests/stacks/two-guests.toml", "");
    let port_b = xtask::qemu::free_port().unwrap();
    m.net_forwards.push((port_b, "10.0.2.16".into()));
    let port_a = m.net_ports[0];
    let run = run_serving(&m, &["[a]", "[b]"], || {
        // Each guest answers on its own address, with the MAC the driver VM gave it: the
        // switch delivered each guest's frames to that guest only.
        let page_a = String::from_utf8(get(port_a, "/").1).unwrap();
        let page_b = String::from_utf8(get(port_b, "/").1).unwrap();
        assert!(page_a.contains("MAC 02:4d:00:00:00:00"), "{page_a}");
        assert!(page_b.contains("MAC 02:4d:00:00:00:01"), "{page_b}");
        for (i, port) in [port_a, port_b, port_a, port_b].into_iter().enumerate() {
            let payload = noise(50_000 + i, i as u64 + 3);
            let (status, body) = request(&mut connect(port), "POST", "/echo", &payload);
            assert_eq!(status, 200);
            assert!(body == payload, "echo {i} differs");
        }
    });
    assert_line(&run, "[net] serving net channel \"neta\" as port 0: MAC 02:4d:00:00:00:00");
    assert_line(&run, "[net] serving net channel \"netb\" as port 1: MAC 02:4d:00:00:00:01");
    assert_line(
        &run,
        "[b] net channel \"netb\": MAC 02:4d:00:00:00:01, MTU 1500; serving HTTP on 10.0.2.16/24, port 80",
    );
    assert_no_line(&run, "FATAL");
}

#[test]
fn a_guest_breaking_the_net_channel_is_cut_off_and_the_other_guest_is_still_served() {
    let m = stack_machine("tests/stacks/rogue-net.toml", "");
    let port = m.net_ports[0];
    let run = run_serving_after(&m, &["[a]"], &["[b] rogue: corrupted my TX ring index"], || {
        for (i, len) in [10usize, 20_000, 100_000].into_iter().enumerate() {
            let payload = noise(len, i as u64 + 11);
            let (status, body) = request(&mut connect(port), "POST", "/echo", &payload);
            assert_eq!(status, 200);
            assert!(body == payload, "echo of {len} bytes differs");
        }
    });
    // Every malformed frame was dropped and counted, by reason, in b's channel header.
    assert_line(
        &run,
        "[b] rogue: the net driver VM dropped my bad frames: bad slot 1, too long 1, too short 1, bad source 1",
    );
    assert_line(&run, "[b] rogue: corrupted my TX ring index: bad ring 1");
    assert_line(&run, "[net] net channel \"netb\": ");
    assert_line(&run, "no longer served");
    assert_no_line(&run, "FATAL");
    assert_no_line(&run, "[dom0] fault in net");
}

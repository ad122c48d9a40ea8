//! Linux's network survives net driver VM restarts (issue 12): in
//! tests/stacks/linux-crashy-net.toml the net driver VM crashes by itself now and then
//! (`rogue=crash-after`) and this test kills it with `ctl kill net` as the transfers move;
//! dom0 rebuilds it each time, the new incarnation re-attaches to the Linux VM's net channel
//! as it is, and the VMM's net back end follows it (`vmm::virtio::channel::NetChannel`:
//! frames a dead incarnation left are dropped, the doorbell rings the new one). Frames in
//! flight are lost; Linux's TCP sends them again.
//!
//! One boot. Random data (from a seed the test prints; `KILL_SEED` replays it) goes host ->
//! Linux (busybox `nc -l -e sha256sum`: the checksum comes back on the connection) and
//! Linux -> host (`/dev/urandom` into a file, its checksum printed, `nc -l -e cat` sends it),
//! while the driver is killed every 512 to 1,023 KiB moved; both checksums match and the
//! driver was killed at least 10 times. Then the test kills it until dom0 gives up (its
//! restart limit): the VMM takes the virtio-net link down and Linux's carrier goes off;
//! `ctl restart net` brings the link and the carrier back and one more checksummed
//! transfer goes through.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc_spec::ctl::State;
use stack_tests::*;
use xtask::console::Console;
use xtask::linux::{self, SHELL_MARKER};

const STACK: &str = "tests/stacks/linux-crashy-net.toml";
const SHORT: Duration = Duration::from_secs(120);
/// The guest's `nc` ports (forwarded from host ports of the test's choosing).
const IN_PORT: u16 = 5001;
const OUT_PORT: u16 = 5002;
/// Host -> Linux and Linux -> host bytes.
const IN_BYTES: usize = 6 << 20;
const OUT_BYTES: usize = 4 << 20;
/// `ctl kill` every `KILL_MIN_KIB..2 * KILL_MIN_KIB` KiB moved, at most `MAX_CTL_KILLS`
/// during the transfers and never two within `KILL_GAP`: with the driver's own crashes that
/// stays below the manifest's restart limit (30 in 15 s), so dom0 gives up only when this
/// test means it to.
const KILL_MIN_KIB: u64 = 512;
const MAX_CTL_KILLS: u64 = 14;
const KILL_GAP: Duration = Duration::from_millis(300);

fn expect(c: &mut Console, needle: &str) {
    c.wait_for(needle, SHORT).unwrap_or_else(|e| panic!("{e}; console:\n{}", c.text()));
}

fn send(c: &mut Console, line: &str) {
    c.send(line).unwrap_or_else(|e| panic!("{e}"));
}

fn sha256_hex(data: &[u8]) -> String {
    let f = temp_file("linux-net-restart-sha", data);
    let out = Command::new("sha256sum").arg(&f).output().unwrap_or_else(|e| panic!("sha256sum: {e}"));
    let _ = std::fs::remove_file(&f);
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

/// The word after the last `key` in the console.
fn last_value(text: &str, key: &str) -> String {
    text.rsplit(key)
        .next()
        .filter(|_| text.contains(key))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {key:?}; console:\n{text}"))
        .to_string()
}

/// Connects to a forwarded port, retrying while the guest's `nc` is not there yet (QEMU's
/// user network accepts on the host side, then closes when the guest refuses).
fn connect_to(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connecting to {port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(90))).unwrap();
    s
}

/// Host -> Linux: `data` to the guest's `nc -l -e sha256sum`; returns the checksum it
/// answers. `progress` counts the bytes written.
fn send_to_guest(port: u16, data: &[u8], progress: &AtomicU64) -> String {
    for attempt in 0.. {
        let mut s = connect_to(port);
        let mut written = 0usize;
        let r = (|| -> std::io::Result<String> {
            for chunk in data.chunks(16 << 10) {
                s.write_all(chunk)?;
                written += chunk.len();
                progress.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            s.shutdown(Shutdown::Write)?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            Ok(answer)
        })();
        match r {
            Ok(a) if !a.is_empty() => return a.split_whitespace().next().unwrap_or_default().to_string(),
            // Refused before anything reached `nc`: it was not listening yet.
            Ok(_) | Err(_) if written <= 256 << 10 && attempt < 5 => {
                eprintln!("linux net restart: the guest's nc was not there ({r:?}); again");
                std::thread::sleep(Duration::from_secs(1));
            }
            other => panic!("sending {} bytes to the guest failed after {written}: {other:?}", data.len()),
        }
    }
    unreachable!()
}

/// Linux -> host: everything the guest's `nc -l -e cat` sends until it closes.
fn receive_from_guest(port: u16, expected: usize, progress: &AtomicU64) -> Vec<u8> {
    for attempt in 0.. {
        let mut s = connect_to(port);
        let mut got = Vec::with_capacity(expected);
        let mut buf = vec![0u8; 64 << 10];
        let r = loop {
            match s.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    progress.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => break Err(e),
            }
        };
        if got.is_empty() && attempt < 5 {
            eprintln!("linux net restart: the guest's nc was not there ({r:?}); again");
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        if let Err(e) = r {
            panic!("receiving from the guest failed after {} of {expected} bytes: {e}", got.len());
        }
        return got;
    }
    unreachable!()
}

/// Kills the net driver with `ctl kill net` each time `progress` has moved another
/// `KILL_MIN_KIB..2 * KILL_MIN_KIB` KiB (drawn from `seed`), until `stop`; returns the kills
/// dom0 answered.
fn killer(m: &Machine, seed: u64, progress: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let mut c = ctl(m);
    let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
    std::thread::spawn(move || {
        let (mut sent, mut next) = (0u64, 0u64);
        let mut last = Instant::now();
        while !stop.load(Ordering::Relaxed) && sent < MAX_CTL_KILLS {
            next += (KILL_MIN_KIB + rng.below(KILL_MIN_KIB)) << 10;
            while (progress.load(Ordering::Relaxed) < next || last.elapsed() < KILL_GAP)
                && !stop.load(Ordering::Relaxed)
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
            sent += u64::from(ctl_kill(&mut c, "net"));
            last = Instant::now();
        }
        sent
    })
}

/// Asks Linux for eth0's carrier until it reads `want` (the config-change work runs a
/// moment after the interrupt).
fn carrier_becomes(c: &mut Console, want: &str) {
    let t0 = Instant::now();
    loop {
        send(c, "echo CARRIER''=$(cat /sys/class/net/eth0/carrier 2>/dev/null)/\n");
        expect(c, "[linux] CARRIER=");
        // The value and the slash may come in a later piece of output.
        expect(c, "/");
        let text = c.text().to_string();
        if last_value(&text, "[linux] CARRIER=").trim_end_matches('/') == want {
            return;
        }
        assert!(t0.elapsed() < SHORT, "eth0's carrier never became {want}; console:\n{text}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn linux_tcp_transfers_survive_net_driver_vm_kills_and_the_link_follows_give_up() {
    let _ = linux_artifacts();
    let mut m = stack_machine(STACK, "");
    let in_port = xtask::qemu::free_port().unwrap_or_else(|e| panic!("{e}"));
    let out_port = xtask::qemu::free_port().unwrap_or_else(|e| panic!("{e}"));
    m.net_port_forwards = vec![(in_port, IN_PORT), (out_port, OUT_PORT)];
    let seed = kill_seed();
    eprintln!("linux net restart: seed {seed} (KILL_SEED={seed} replays the data and kill points)");

    let mut c = Console::spawn(linux::console_command(&m)).unwrap_or_else(|e| panic!("{e}"));
    expect(&mut c, &format!("[linux] {SHELL_MARKER}"));
    expect(&mut c, "[linux] / # ");
    let boot = c.text().to_string();
    assert!(boot.contains("[linux] linux-init: eth0 has 10.0.2.15"), "no DHCP lease; console:\n{boot}");
    let boot_crashes = boot.matches("[net] crashing after").count();
    let from = boot.len();

    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let kills = killer(&m, seed, progress.clone(), stop.clone());
    let t0 = Instant::now();

    // Host -> Linux.
    let data = noise(IN_BYTES, seed);
    send(&mut c, "(nc -l -p 5001 -e sha256sum &); sleep 1; echo READY''=in\n");
    expect(&mut c, "[linux] READY=in");
    let answer = send_to_guest(in_port, &data, &progress);
    let t_in = t0.elapsed();
    assert_eq!(answer, sha256_hex(&data), "Linux's checksum of what the host sent differs");

    // Linux -> host.
    let count = OUT_BYTES >> 16;
    send(
        &mut c,
        &format!(
            "dd if=/dev/urandom of=/out.bin bs=64k count={count} 2>/dev/null; echo OUT''=$(sha256sum /out.bin); \
             (nc -l -p 5002 -e cat /out.bin &); sleep 1; echo READY''=out\n"
        ),
    );
    expect(&mut c, "[linux] READY=out");
    let text = c.text().to_string();
    let out_sum = last_value(&text, "[linux] OUT=");
    let t1 = Instant::now();
    let got = receive_from_guest(out_port, OUT_BYTES, &progress);
    let t_out = t1.elapsed();
    stop.store(true, Ordering::Relaxed);
    let by_ctl = kills.join().expect("the killer thread");
    assert_eq!(got.len(), OUT_BYTES, "Linux sent another length");
    assert_eq!(sha256_hex(&got), out_sum, "the bytes Linux sent differ from those it summed");

    let text = c.text().to_string();
    let during = &text[from..];
    let crashes = during.matches("[net] crashing after").count();
    let ctl_kills = during.matches("[dom0] ctl: killing net").count();
    let restarts = during.matches("[dom0] restarted net").count();
    eprintln!(
        "linux net restart: {} MiB in in {:.1} s, {} MiB out in {:.1} s, across {crashes} crashes and {ctl_kills} ctl kills ({by_ctl} answered), {restarts} restarts ({boot_crashes} crashes during the boot)",
        IN_BYTES >> 20,
        t_in.as_secs_f64(),
        OUT_BYTES >> 20,
        t_out.as_secs_f64(),
    );
    assert!(crashes + ctl_kills >= 10, "only {crashes} crashes and {ctl_kills} ctl kills; console:\n{text}");
    let overtaken =
        overtaken_crashes(during.lines(), "[net] crashing after", "[dom0] ctl: killing net", "[dom0] restarted net");
    assert!(
        restarts + overtaken >= crashes + ctl_kills,
        "{restarts} restarts for {crashes} crashes ({overtaken} overtaken by a kill) and {ctl_kills} kills"
    );
    assert!(during.contains("[linux] net driver VM incarnation"), "the VMM followed no new incarnation:\n{text}");
    assert!(!during.contains("virtio-net: link down"), "the link went down during ordinary restarts:\n{text}");
    assert!(!text.contains("not restarted again"), "dom0 gave up during the transfers:\n{text}");

    // Kill it until dom0 gives up: the link goes down for Linux.
    let mut ctl_c = ctl(&m);
    let state = |k: &mut xtask::ctl::Ctl| {
        k.list().expect("ctl list").into_iter().find(|(n, ..)| n == "net").map(|(_, s, ..)| s).expect("net")
    };
    let mut burst = 0;
    while state(&mut ctl_c) != State::Dead {
        match ctl_c.request("kill net") {
            Ok(_) => burst += 1,
            Err(e) if e.contains("is restarting") => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("ctl kill net: {e}"),
        }
        assert!(burst < 200, "dom0 never gave up on the net driver");
    }
    expect(&mut c, "not restarted again (restart_limit)");
    expect(&mut c, "[linux] virtio-net: link down: dom0 gave up on the net driver VM");
    carrier_becomes(&mut c, "0");
    eprintln!("linux net restart: dom0 gave up after {burst} more kills; Linux's carrier is off");

    // `ctl restart` brings it back: the link, the carrier, and the network.
    let (_, words) = ctl_c.request("restart net").expect("restart net");
    assert_eq!(words, "restarted net");
    expect(&mut c, "[linux] virtio-net: link up");
    carrier_becomes(&mut c, "1");
    let again = noise(1 << 20, seed ^ 0x5555);
    send(&mut c, "(nc -l -p 5001 -e sha256sum &); sleep 1; echo READY''=again\n");
    expect(&mut c, "[linux] READY=again");
    let answer = send_to_guest(in_port, &again, &AtomicU64::new(0));
    assert_eq!(answer, sha256_hex(&again), "after ctl restart: Linux's checksum differs");

    send(&mut c, "poweroff -f\n");
    expect(&mut c, "the VM powered off (ACPI S5)");
    let text = c.text().to_string();
    c.stop();
    for l in text.lines().filter(|l| l.starts_with("[linux] virtio-net:")) {
        eprintln!("{l}");
    }
    for bad in ["FATAL", "restarting net failed"] {
        assert!(!text.contains(bad), "{bad:?} on the console:\n{text}");
    }
}

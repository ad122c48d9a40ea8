//! The demo guest and a Linux VM share one disk driver VM and one net driver VM, over
//! channels of their own (stacks/linux-demo.toml, issue 11): the disk driver gives each its
//! own window of the disk (`part.<channel>=`), QEMU's user network gives Linux 10.0.2.15 by
//! DHCP and the demo guest has 10.0.2.16.
//!
//! One boot. While a host client writes and reads random sectors through the demo guest's
//! HTTP interface, Linux writes 1 MiB of random data under `/srv`, prints its checksum and
//! serves it with httpd; the host fetches it at the same time. Afterwards Linux powers off
//! (the demo guest still serves), and the host's image holds both: the file in Linux's ext4
//! half (e2fsprogs' `debugfs`), the demo guest's sectors and self-test pattern in the other.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stack_tests::*;
use xtask::console::Console;
use xtask::linux::{self, HTTPD_MARKER, SHELL_MARKER, SRV_MARKER};

const STACK: &str = "stacks/linux-demo.toml";
const SHORT: Duration = Duration::from_secs(90);
/// Where the demo guest's window starts on the disk (its sector 0).
const DEMO_FIRST: u64 = 65536;

/// Waits until `needle` is anywhere in the console (the two guests' lines interleave).
fn seen(c: &mut Console, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !c.text().contains(needle) {
        if Instant::now() > deadline {
            panic!("no {needle:?} within {timeout:?}; console:\n{}", c.text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn send(c: &mut Console, line: &str) {
    c.send(line).unwrap_or_else(|e| panic!("{e}"));
}

fn sha256_hex(data: &[u8]) -> String {
    let f = temp_file("linux-shared-sha", data);
    let out = Command::new("sha256sum").arg(&f).output().unwrap_or_else(|e| panic!("sha256sum: {e}"));
    let _ = std::fs::remove_file(&f);
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

#[test]
fn the_demo_guest_and_linux_share_the_driver_vms() {
    let _ = linux_artifacts();
    let mut m = stack_machine(STACK, "");
    let disk = std::env::temp_dir().join(format!("stack-tests-{}-linux-shared-disk.img", std::process::id()));
    let _ = std::fs::remove_file(&disk);
    xtask::build::ensure_disk_as(&disk, true).unwrap_or_else(|e| panic!("{e}"));
    m.disks = vec![disk.clone()];
    let linux_port = xtask::qemu::free_port().unwrap_or_else(|e| panic!("{e}"));
    let demo_port = xtask::qemu::free_port().unwrap_or_else(|e| panic!("{e}"));
    m.net_ports = vec![linux_port];
    m.net_forwards = vec![(demo_port, "10.0.2.16".to_string())];

    let mut c = Console::spawn(linux::console_command(&m)).unwrap_or_else(|e| panic!("{e}"));
    seen(&mut c, &format!("[linux] {SRV_MARKER}"), BOOT_TIMEOUT);
    seen(&mut c, &format!("[linux] {HTTPD_MARKER}"), SHORT);
    seen(&mut c, &format!("[linux] {SHELL_MARKER}"), SHORT);
    seen(&mut c, "[guest] block self-test passed", SHORT);
    seen(&mut c, "serving HTTP on 10.0.2.16/24, port 80", SHORT);
    let boot = c.text().to_string();
    assert!(boot.contains("[linux] linux-init: eth0 has 10.0.2.15"), "Linux got no DHCP lease; console:\n{boot}");
    assert!(boot.contains("[disk] channel disk0: sectors 0..65536 of the disk"), "no window for Linux:\n{boot}");
    assert!(
        boot.contains("[disk] channel disk1: sectors 65536..131072 of the disk"),
        "no window for the demo:\n{boot}"
    );
    assert!(boot.contains("[linux] disk: 32 MiB"), "Linux's disk is not its 32 MiB window:\n{boot}");

    // The demo guest's client runs until Linux's part is done, at least `MIN_ROUNDS` rounds.
    const MIN_ROUNDS: usize = 6;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(5, |d| d.as_nanos() as u64);
    eprintln!("linux shared: seed {seed}");
    let done = Arc::new(AtomicBool::new(false));
    let stop = done.clone();
    let demo = std::thread::spawn(move || {
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut s = connect(demo_port);
        let mut round = 0u64;
        while round < MIN_ROUNDS as u64 || !stop.load(Ordering::Relaxed) {
            let r = noise(16, seed ^ round);
            // Disjoint 64-sector slots past the self-test's first run, each written once.
            let lba = 4096 + round * 64 + u64::from(r[0] % 32);
            let data = noise((1 + usize::from(r[1] % 16)) * 512, seed ^ (round << 8) ^ 1);
            assert_eq!(request(&mut s, "PUT", &format!("/blk/{lba}"), &data).0, 200, "PUT /blk/{lba}");
            let (status, body) = request(&mut s, "GET", &format!("/blk/{lba}?count={}", data.len() / 512), b"");
            assert_eq!(status, 200, "GET /blk/{lba}");
            assert!(body == data, "the demo guest read back other bytes at {lba}");
            assert_eq!(request(&mut s, "GET", "/", b"").0, 200);
            writes.push((lba, data));
            round += 1;
        }
        assert_eq!(request(&mut s, "POST", "/flush", b"").0, 200, "flush");
        writes
    });

    // Meanwhile Linux writes random data through the same disk driver VM and serves it
    // through the same net driver VM.
    let t0 = Instant::now();
    send(
        &mut c,
        "dd if=/dev/urandom of=/srv/big.bin bs=4096 count=256 2>/dev/null; echo SUM''=$(sha256sum /srv/big.bin)\n",
    );
    seen(&mut c, "[linux] SUM=", SHORT);
    let text = c.text().to_string();
    let sum = text
        .split("[linux] SUM=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no checksum; console:\n{text}"))
        .to_string();
    let (status, body) = get(linux_port, "/big.bin");
    assert_eq!(status, 200, "GET /big.bin from Linux's httpd");
    assert_eq!(body.len(), 1 << 20);
    assert_eq!(sha256_hex(&body), sum, "the bytes Linux's httpd served differ from those it summed");
    let overlap = t0.elapsed();
    let demo_alive_during = !demo.is_finished();
    done.store(true, Ordering::Relaxed);
    let writes = match demo.join() {
        Ok(w) => w,
        Err(p) => {
            eprintln!("console:\n{}", c.text());
            std::panic::resume_unwind(p)
        }
    };
    eprintln!("linux shared: Linux's part took {overlap:?}; the demo client made {} rounds", writes.len());
    assert!(demo_alive_during, "the demo guest's client ended before Linux's part: no overlap");

    send(&mut c, "sync; poweroff -f\n");
    seen(&mut c, "the VM powered off (ACPI S5)", SHORT);
    seen(&mut c, "[dom0] destroyed linux-vm, the VM of linux", SHORT);
    // The demo guest goes on serving after Linux is gone.
    assert_eq!(get(demo_port, "/").0, 200, "the demo guest after Linux powered off");
    let console = c.text().to_string();
    c.stop();
    for bad in ["FATAL", "[dom0] fault in", "I/O error", "EXT4-fs error"] {
        assert!(!console.contains(bad), "{bad:?} on the console:\n{console}");
    }

    // Linux's file is in its ext4 half...
    xtask::setup::ensure_e2fsprogs().unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new("debugfs")
        .args(["-R", "cat /big.bin"])
        .arg(&disk)
        .output()
        .unwrap_or_else(|e| panic!("debugfs: {e}"));
    assert_eq!(out.stdout, body, "the file in the host's image differs: {}", String::from_utf8_lossy(&out.stderr));
    // ...and the demo guest's sectors are in the other half, moved by its window.
    let image = std::fs::read(&disk).expect("reading the disk image");
    for (lba, data) in &writes {
        let at = ((DEMO_FIRST + lba) * 512) as usize;
        assert!(
            image[at..at + data.len()] == data[..],
            "the demo guest's sectors from {lba} are not at {}",
            DEMO_FIRST + lba
        );
    }
    let mut want = [0u8; 512];
    for s in [0u64, 2047, 32768, 65535] {
        ipc_spec::block::pattern(s, &mut want);
        let at = ((DEMO_FIRST + s) * 512) as usize;
        assert!(image[at..at + 512] == want, "the demo guest's self-test sector {s} is not in its window");
    }
    let _ = std::fs::remove_file(&disk);
}

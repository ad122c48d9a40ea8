//! Linux's disk survives disk driver VM restarts (issue 12): in
//! tests/stacks/linux-crashy-disk.toml the disk driver VM crashes every 12 completed
//! requests (with more in flight) and dom0 rebuilds it each time; the VMM's block channel
//! (`ipc_spec::block_client` under `vmm::virtio::channel::BlockChannel`) sends the new
//! incarnation every request the dead one did not answer and ignores the dead one's answers.
//!
//! One boot (its disk I/O already crosses restarts). Linux then writes 4 MiB of random data
//! to `/srv` while the driver keeps crashing, syncs, drops its page cache and reads the file
//! back from the disk: the checksums match, the kernel logged no I/O error, and after
//! `poweroff` the file is in the host's image (e2fsprogs' `debugfs`) with the same checksum.

use std::process::Command;
use std::time::{Duration, Instant};

use stack_tests::*;
use xtask::console::Console;
use xtask::linux::{self, SHELL_MARKER, SRV_MARKER};

const STACK: &str = "tests/stacks/linux-crashy-disk.toml";
const SHORT: Duration = Duration::from_secs(120);

/// Waits for `needle` after the console's last match.
fn expect(c: &mut Console, needle: &str, timeout: Duration) {
    c.wait_for(needle, timeout).unwrap_or_else(|e| panic!("{e}; console:\n{}", c.text()));
}

fn send(c: &mut Console, line: &str) {
    c.send(line).unwrap_or_else(|e| panic!("{e}"));
}

/// The word after the first `key` after `from` in the console.
fn value_after(text: &str, from: usize, key: &str) -> String {
    text[from..]
        .split(key)
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {key:?}; console:\n{text}"))
        .to_string()
}

#[test]
fn linux_disk_io_survives_disk_driver_vm_crashes() {
    let _ = linux_artifacts();
    let mut m = stack_machine(STACK, "");
    let disk = std::env::temp_dir().join(format!("stack-tests-{}-linux-restart-disk.img", std::process::id()));
    let _ = std::fs::remove_file(&disk);
    xtask::build::ensure_disk_as(&disk, true).unwrap_or_else(|e| panic!("{e}"));
    m.disks = vec![disk.clone()];

    let mut c = Console::spawn(linux::console_command(&m)).unwrap_or_else(|e| panic!("{e}"));
    expect(&mut c, &format!("[linux] {SRV_MARKER}"), BOOT_TIMEOUT * 2);
    expect(&mut c, &format!("[linux] {SHELL_MARKER}"), SHORT);
    expect(&mut c, "[linux] / # ", SHORT);
    let boot_crashes = c.text().matches("[disk] crashing after").count();
    eprintln!("linux restart: {boot_crashes} disk driver crashes during the boot");

    let from = c.text().len();
    let t0 = Instant::now();
    // Random data made in the guest, kept in its RAM (the initramfs) as the reference; the
    // empty quotes keep the commands' echo from matching the answers.
    send(
        &mut c,
        "dd if=/dev/urandom of=/ref.bin bs=64k count=64 2>/dev/null; cp /ref.bin /srv/rand.bin; sync; \
         echo 3 > /proc/sys/vm/drop_caches; echo REF''=$(sha256sum /ref.bin) DISK''=$(sha256sum /srv/rand.bin) \
         ERRORS''=$(dmesg | grep -c -i -E 'I/O error|blk_update_request|EXT4-fs (error|warning)|Buffer I/O')\n",
    );
    expect(&mut c, "[linux] REF=", SHORT);
    expect(&mut c, "ERRORS=", SHORT);
    let took = t0.elapsed();
    let text = c.text().to_string();
    let reference = value_after(&text, from, "[linux] REF=");
    let on_disk = value_after(&text, from, "DISK=");
    let errors = value_after(&text, from, "ERRORS=");
    let crashes = text[from..].matches("[disk] crashing after").count();
    let restarts = text[from..].matches("[dom0] restarted disk").count();
    eprintln!(
        "linux restart: 4 MiB written, synced and read back in {took:?} across {crashes} crashes ({restarts} restarts)"
    );
    for l in text[from..].lines().filter(|l| l.contains("incarnation") && l.starts_with("[linux]")) {
        eprintln!("{l}");
    }
    assert_eq!(on_disk, reference, "the file read back from the disk differs from the data written");
    assert_eq!(errors, "0", "the kernel logged I/O errors; console:\n{text}");
    assert!(crashes >= 3, "only {crashes} crash(es) during the write; console:\n{text}");
    assert!(text[from..].contains("[linux] disk driver VM incarnation"), "the VMM saw no new incarnation:\n{text}");

    send(&mut c, "sync; poweroff -f\n");
    expect(&mut c, "the VM powered off (ACPI S5)", SHORT);
    expect(&mut c, "[dom0] destroyed linux-vm, the VM of linux", SHORT);
    let text = c.text().to_string();
    c.stop();
    for bad in ["FATAL", "restarting disk failed", "not restarted again", "I/O error"] {
        assert!(!text.contains(bad), "{bad:?} on the console:\n{text}");
    }
    if let Some(l) = text.lines().find(|l| l.starts_with("[linux] virtio-blk:")) {
        eprintln!("{l}");
    }

    xtask::setup::ensure_e2fsprogs().unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new("debugfs")
        .args(["-R", "cat /rand.bin"])
        .arg(&disk)
        .output()
        .unwrap_or_else(|e| panic!("debugfs: {e}"));
    assert_eq!(out.stdout.len(), 4 << 20, "the file in the host's image: {}", String::from_utf8_lossy(&out.stderr));
    let f = temp_file("linux-restart-rand", &out.stdout);
    let sum = Command::new("sha256sum").arg(&f).output().unwrap_or_else(|e| panic!("sha256sum: {e}"));
    let _ = std::fs::remove_file(&f);
    let sum = String::from_utf8_lossy(&sum.stdout).split_whitespace().next().unwrap_or_default().to_string();
    assert_eq!(sum, reference, "the file in the host's disk image differs from the data written");
    let _ = std::fs::remove_file(&disk);
}

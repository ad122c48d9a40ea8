//! The Linux VM's disk and network through the driver VMs (stacks/linux.toml): the VMM's
//! virtio-blk and virtio-net functions (`vmm::virtio`) are served over block and net
//! channels by the disk and net driver VMs; the initramfs mounts `/dev/vda` (ext4) at `/srv`,
//! takes an address from QEMU's user network and serves `/srv` with busybox httpd.
//!
//! One boot: random bytes from this test are typed at the Linux console into a file under
//! `/srv`, its checksum printed; the host fetches it through the forwarded port and gets the
//! same bytes; after `sync` and `poweroff -f` the file is in the host's disk image (read
//! back with e2fsprogs' `debugfs`).

use std::process::Command;
use std::time::Duration;

use stack_tests::*;
use xtask::console::Console;
use xtask::linux::{self, HTTPD_MARKER, SHELL_MARKER, SRV_MARKER};

const STACK: &str = "stacks/linux.toml";
const SHORT: Duration = Duration::from_secs(60);
/// Bytes typed per `printf` line (four characters each, as octal escapes).
const CHUNK: usize = 48;

fn expect(c: &mut Console, needle: &str) {
    c.wait_for(needle, SHORT).unwrap_or_else(|e| panic!("{e}; console:\n{}", c.text()));
}

fn send(c: &mut Console, line: &str) {
    c.send(line).unwrap_or_else(|e| panic!("{e}"));
}

fn sha256_hex(data: &[u8]) -> String {
    let f = temp_file("linux-io-sha", data);
    let out = Command::new("sha256sum").arg(&f).output().unwrap_or_else(|e| panic!("sha256sum: {e}"));
    let _ = std::fs::remove_file(&f);
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

#[test]
fn linux_file_written_at_the_console_is_served_and_durable() {
    let _ = linux_artifacts();
    let mut m = stack_machine(STACK, "");
    assert!(m.disk_ext4, "the Linux stack's disk should be made as ext4");
    let disk = std::env::temp_dir().join(format!("stack-tests-{}-linux-io-disk.img", std::process::id()));
    let _ = std::fs::remove_file(&disk);
    xtask::build::ensure_disk_as(&disk, true).unwrap_or_else(|e| panic!("{e}"));
    m.disks = vec![disk.clone()];
    let port = xtask::qemu::free_port().unwrap_or_else(|e| panic!("{e}"));
    m.net_ports = vec![port];

    let mut c = Console::spawn(linux::console_command(&m)).unwrap_or_else(|e| panic!("{e}"));
    c.wait_for(&format!("[linux] {SRV_MARKER}"), BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}; console:\n{}", c.text()));
    expect(&mut c, &format!("[linux] {HTTPD_MARKER}"));
    expect(&mut c, &format!("[linux] {SHELL_MARKER}"));
    expect(&mut c, "[linux] / # ");
    let boot = c.text().to_string();
    assert!(boot.contains("[linux] linux-init: eth0 has 10.0.2.15"), "no DHCP lease; console:\n{boot}");

    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.as_nanos() as u64);
    let data = noise(1024, seed);
    let want = sha256_hex(&data);
    for chunk in data.chunks(CHUNK) {
        let esc: String = chunk.iter().map(|b| format!("\\{b:03o}")).collect();
        send(&mut c, &format!("printf '{esc}' >> /srv/rand.bin\n"));
        // One line at a time: typed ahead of a busy shell (a loaded host), the lines pile up
        // in the kernel's tty buffer (4 KiB), which drops what does not fit.
        expect(&mut c, "[linux] / # ");
    }
    // The empty quotes keep the echo of the command from matching the answer.
    send(&mut c, "echo SUM''=$(sha256sum /srv/rand.bin)\n");
    expect(&mut c, &format!("[linux] SUM={want}"));

    let (status, body) = get(port, "/rand.bin");
    assert_eq!(status, 200, "GET /rand.bin through the forwarded port");
    assert_eq!(body, data, "the bytes httpd served differ from those typed");

    send(&mut c, "sync; poweroff -f\n");
    expect(&mut c, "the VM powered off (ACPI S5)");
    expect(&mut c, "[dom0] destroyed linux-vm, the VM of linux");
    // The figures, for the record (`--nocapture`): exits to the init marker and in all.
    for l in c.text().lines().filter(|l| l.contains("exit histogram") || l.contains("exits by port")) {
        eprintln!("{l}");
    }
    c.stop();

    xtask::setup::ensure_e2fsprogs().unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new("debugfs")
        .args(["-R", "cat /rand.bin"])
        .arg(&disk)
        .output()
        .unwrap_or_else(|e| panic!("debugfs: {e}"));
    assert_eq!(out.stdout, data, "the file in the host's disk image differs: {}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_file(&disk);
}

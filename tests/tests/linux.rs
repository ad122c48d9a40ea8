//! Debian's unmodified Linux kernel as a VM under the microvisor (stacks/linux.toml): its
//! exits go to a deprivileged VMM domain (`vmm/src/bin/vmm`), which boots it by PVH to a
//! busybox shell on the machine's serial console. What is typed reaches the shell (COM1 →
//! microvisor → ConsoleRead → the VMM's 16550 model → Linux). Powering off or crashing the
//! kernel ends that VM only: its VMM says why and exits, dom0 destroys both, and the machine
//! with the other domains keeps running.
//!
//! Two boots (they run in parallel): one types commands and powers off, one crashes.

use std::sync::OnceLock;
use std::time::Duration;

use stack_tests::*;
use xtask::console::Console;
use xtask::linux::{self, SHELL_MARKER};

const STACK: &str = "stacks/linux.toml";
const SHORT: Duration = Duration::from_secs(30);

/// The Linux stack's machine, its bundle packed once (the tests run in parallel: packing
/// per test would rewrite the bundle file under the other test's QEMU).
fn linux_machine(tag: &str) -> Machine {
    static MACHINE: OnceLock<Machine> = OnceLock::new();
    let mut m = MACHINE
        .get_or_init(|| {
            // The kernel and initramfs are fetched and built on first use.
            let _ = linux_artifacts();
            stack_machine(STACK, "")
        })
        .clone();
    // Each QEMU its own disk image (QEMU locks it) and its own forwarded ports.
    for (i, disk) in m.disks.iter_mut().enumerate() {
        *disk = std::env::temp_dir().join(format!("stack-tests-{}-linux-{tag}-disk{i}.img", std::process::id()));
        let _ = std::fs::remove_file(&*disk);
        xtask::build::ensure_disk_as(disk, m.disk_ext4).unwrap_or_else(|e| panic!("{e}"));
    }
    for port in m.net_ports.iter_mut() {
        *port = xtask::qemu::free_port().unwrap_or_else(|e| panic!("{e}"));
    }
    m
}

/// Boots the Linux stack until the shell's prompt.
fn boot_to_shell(tag: &str) -> Console {
    let m = linux_machine(tag);
    let mut c = Console::spawn(linux::console_command(&m)).unwrap_or_else(|e| panic!("{e}"));
    let booted = c.wait_for(&format!("[linux] {SHELL_MARKER}"), BOOT_TIMEOUT);
    // The VMM's stall reports (`vmm::stall`), also of stalls that passed: shown with
    // `--nocapture` (a boot loop hunting a rare stall collects them).
    for l in c.text().lines().filter(|l| l.contains("STALL")) {
        eprintln!("{tag}: {l}");
    }
    booted.unwrap_or_else(|e| panic!("{e}"));
    // The VMM sends a partial line (the prompt) after a short pause.
    c.wait_for("[linux] / # ", SHORT).unwrap_or_else(|e| panic!("{e}"));
    c
}

fn expect(c: &mut Console, needle: &str) {
    c.wait_for(needle, SHORT).unwrap_or_else(|e| panic!("{e}"));
}

/// The VM is gone and the machine is still running: nothing ends it within a few seconds.
fn machine_keeps_running(c: &mut Console) {
    match c.wait_for("[microvisor] no runnable domains left", Duration::from_secs(3)) {
        Err(e) if e.starts_with("timed out") => {}
        Err(e) => panic!("the machine ended with the VM: {e}"),
        Ok(_) => panic!("the machine stopped with the VM; console:\n{}", c.text()),
    }
    assert!(!c.text().contains("[microvisor] fault"), "a fault besides the VM's; console:\n{}", c.text());
}

#[test]
fn linux_vm_shell_answers_and_powers_off_alone() {
    let mut c = boot_to_shell("shell");
    let boot = c.text().to_string();
    assert!(
        boot.contains("[linux] linux-init: modules: loaded "),
        "the initramfs did not load its modules; console:\n{boot}"
    );
    assert!(
        boot.lines().any(|l| l.starts_with("[linux] exit histogram at the init marker: exits=")),
        "no exit histogram at the init marker; console:\n{boot}"
    );

    c.send("uname -r\n").unwrap_or_else(|e| panic!("{e}"));
    expect(&mut c, "[linux] 6.1.0-");

    // The clock is kvmclock and the TSC frequency came from it: no PIT calibration. (The
    // empty quotes keep the command's echo from matching the answer.)
    c.send("dmesg > /tmp/d; grep -q 'kvm-clock: Using msrs' /tmp/d && echo KVM''CLOCK=yes; grep -q PIT /tmp/d && echo PIT''LINES=some || echo PIT''LINES=none\n")
        .unwrap_or_else(|e| panic!("{e}"));
    expect(&mut c, "[linux] KVMCLOCK=yes");
    expect(&mut c, "[linux] PITLINES=none");

    c.send("poweroff -f\n").unwrap_or_else(|e| panic!("{e}"));
    expect(&mut c, "[linux] VM stopped after ");
    expect(&mut c, "the VM powered off (ACPI S5)");
    expect(&mut c, "[linux] exit histogram: exits=");
    expect(&mut c, "[dom0] linux exited with status 0");
    expect(&mut c, "[dom0] destroyed linux-vm, the VM of linux");
    machine_keeps_running(&mut c);
    c.stop();
}

#[test]
fn linux_vm_crash_stops_only_that_vm() {
    let mut c = boot_to_shell("crash");
    c.send("echo c > /proc/sysrq-trigger\n").unwrap_or_else(|e| panic!("{e}"));
    expect(&mut c, "[linux] VM stopped after ");
    // The VMM says why on the same line: the kernel (panic=-1, reboot=acpi) reset the VM
    // through the FADT reset register.
    expect(&mut c, "the kernel panicked and asked for a reset");
    let text = c.text().to_string();
    assert!(text.contains("sysrq triggered crash"), "no panic message from the kernel; console:\n{text}");
    expect(&mut c, "[dom0] destroyed linux-vm, the VM of linux");
    machine_keeps_running(&mut c);
    c.stop();
}

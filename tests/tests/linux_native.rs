//! Debian's own kernel, booted natively in QEMU by its PVH entry (the baseline the
//! microvisor's Linux VM is compared with): it reaches the initramfs's /init, loads the
//! virtio and ext4 modules, and a command typed on the serial console runs.

use std::time::Duration;

use stack_tests::*;
use xtask::linux::{self, INIT_MARKER, MODULES_MARKER, SHELL_MARKER};

#[test]
fn debian_kernel_boots_natively_to_a_shell_that_answers_uname() {
    let a = linux_artifacts();
    let mut c = linux::boot(&linux::native_machine(&a, "")).unwrap_or_else(|e| panic!("{e}"));
    let t = c.wait_for(INIT_MARKER, BOOT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("native boot of {} reached init in {:.2} s", a.release, t.as_secs_f64());

    c.wait_for(MODULES_MARKER, BOOT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    c.wait_for("\n", Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));
    let text = c.text().to_string();
    let line = text.lines().find(|l| l.starts_with(MODULES_MARKER)).unwrap_or_default();
    assert_eq!(
        line,
        format!("{MODULES_MARKER} loaded {} modules", a.modules.len()),
        "not every module loaded; console:\n{text}"
    );

    // The shell's prompt, then a command typed on the console.
    c.wait_for(SHELL_MARKER, BOOT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    c.wait_for("# ", Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    c.send("uname -r\n").unwrap_or_else(|e| panic!("{e}"));
    // The terminal echoes the command, then the shell runs it.
    c.wait_for("uname -r\n", Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    // Debian bookworm's kernel: the release the package named, e.g. 6.1.0-57-amd64.
    assert!(a.release.starts_with("6.1.0-"), "unexpected kernel release {}", a.release);
    c.wait_for(&format!("{}\n", a.release), Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    c.stop();
}

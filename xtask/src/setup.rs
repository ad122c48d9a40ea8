//! First-run set-up: the bare-metal Rust target and QEMU. Installs what it can (rustup
//! target, apt-get as root) and otherwise stops with the exact command to run.

use std::process::Command;

use crate::BARE_METAL_TARGET;

pub const QEMU: &str = "qemu-system-x86_64";

fn installed_targets() -> String {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Make sure `rustup target add x86_64-unknown-none` has been done.
pub fn ensure_target() -> Result<(), String> {
    if installed_targets().lines().any(|l| l.trim() == BARE_METAL_TARGET) {
        return Ok(());
    }
    eprintln!("setup: adding the Rust target {BARE_METAL_TARGET} (rustup target add {BARE_METAL_TARGET})");
    let ok = Command::new("rustup")
        .args(["target", "add", BARE_METAL_TARGET])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "could not add the Rust target {BARE_METAL_TARGET}; run `rustup target add {BARE_METAL_TARGET}` and retry"
        ))
    }
}

fn qemu_present() -> bool {
    Command::new(QEMU).arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// Make sure QEMU is installed: apt-get it when running as root, else say how.
pub fn ensure_qemu() -> Result<(), String> {
    if qemu_present() {
        return Ok(());
    }
    let install = "apt-get update && apt-get install -y qemu-system-x86";
    if !is_root() {
        return Err(format!("{QEMU} is not installed; install it with: sudo sh -c '{install}'"));
    }
    eprintln!("setup: installing QEMU ({install})");
    let ok = Command::new("sh")
        .args(["-c", install])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok && qemu_present() {
        Ok(())
    } else {
        Err(format!("installing QEMU failed; run `{install}` by hand and retry"))
    }
}

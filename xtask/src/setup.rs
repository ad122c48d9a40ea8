//! First-run set-up: the bare-metal Rust target, QEMU, GRUB's ISO tools and Bochs. Installs
//! what it can (rustup target, apt-get as root) and otherwise stops with the exact command
//! to run.

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

fn runs(program: &str, arg: &str) -> bool {
    Command::new(program).arg(arg).output().is_ok()
}

/// Install Debian `packages` with apt-get when `present()` says the tools are missing: as
/// root at once, otherwise stop with the command to run.
fn ensure_debian(what: &str, packages: &str, present: impl Fn() -> bool) -> Result<(), String> {
    if present() {
        return Ok(());
    }
    let install = format!("apt-get update && apt-get install -y {packages}");
    if !is_root() {
        return Err(format!("{what} is not installed; install it with: sudo sh -c '{install}'"));
    }
    eprintln!("setup: installing {what} ({install})");
    let ok = Command::new("sh")
        .args(["-c", &install])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok && present() {
        Ok(())
    } else {
        Err(format!("installing {what} failed; run `{install}` by hand and retry"))
    }
}

/// The GRUB modules for BIOS machines, which `grub-mkrescue` puts on the ISO.
pub const GRUB_I386_PC: &str = "/usr/lib/grub/i386-pc";

/// Make sure `grub-mkrescue` can build a BIOS-bootable ISO: GRUB's i386-pc modules
/// (`grub-pc-bin`), `xorriso` and `mtools`.
pub fn ensure_grub() -> Result<(), String> {
    ensure_debian("GRUB's ISO tools (grub-mkrescue, xorriso, mtools)", "grub-pc-bin grub-common xorriso mtools", || {
        runs("grub-mkrescue", "--version")
            && runs("xorriso", "-version")
            && runs("mformat", "--version")
            && std::path::Path::new(GRUB_I386_PC).join("multiboot2.mod").exists()
    })
}

/// Bochs, its BIOS and VGA BIOS, and its terminal display library (the only headless one
/// Debian builds: there is no `nogui`).
pub const BOCHS: &str = "bochs";
pub const BOCHS_BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";
pub const BOCHS_VGABIOS: &str = "/usr/share/vgabios/vgabios.bin";
const BOCHS_TERM_PLUGIN: &str = "/usr/lib/x86_64-linux-gnu/bochs/plugins/libbx_term_gui.so";

/// Make sure Bochs can run headless: `bochs`, `bochs-term`, `bochsbios`, `vgabios`.
pub fn ensure_bochs() -> Result<(), String> {
    ensure_debian("Bochs (bochs, bochs-term, bochsbios, vgabios)", "bochs bochs-term bochsbios vgabios", || {
        runs(BOCHS, "--help")
            && [BOCHS_BIOS, BOCHS_VGABIOS, BOCHS_TERM_PLUGIN].iter().all(|p| std::path::Path::new(p).exists())
    })
}

/// Make sure e2fsprogs is there: `mkfs.ext4` makes the Linux guest's disk image, `debugfs`
/// reads files out of it in the tests.
pub fn ensure_e2fsprogs() -> Result<(), String> {
    ensure_debian("e2fsprogs (mkfs.ext4, debugfs)", "e2fsprogs", || runs("mkfs.ext4", "-V") && runs("debugfs", "-V"))
}

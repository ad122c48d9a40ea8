//! A bootable GRUB ISO of the stack (`cargo xtask iso`): the microvisor, booted by
//! Multiboot2, with the boot bundle as its first module. For machines and emulators without
//! a PVH loader (Bochs, real hardware); QEMU boots it too (`-cdrom`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The file names on the ISO.
const MICROVISOR: &str = "/boot/microvisor.elf";
const BUNDLE: &str = "/boot/bundle.bin";

/// Characters GRUB's configuration language would interpret (quoting, variables, comments,
/// blocks); the microvisor's command-line words never need them.
const GRUB_SPECIAL: &[char] = &['\'', '"', '\\', '$', ';', '#', '{', '}', '\n', '\r', '&', '|', '<', '>'];

/// `grub.cfg`: no menu (timeout 0), GRUB's console on the serial port as well as the screen
/// (the microvisor's console is COM1), the bundle as the first module.
pub fn grub_cfg(append: &str) -> Result<String, String> {
    if let Some(c) = append.chars().find(|c| GRUB_SPECIAL.contains(c)) {
        return Err(format!("the command line {append:?} contains {c:?}, which grub.cfg would interpret"));
    }
    let args = if append.trim().is_empty() { String::new() } else { format!(" {}", append.trim()) };
    Ok(format!(
        "# Written by `cargo xtask iso`.
set timeout=0
set default=0
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
menuentry \"microvisor\" {{
    multiboot2 {MICROVISOR}{args}
    module2 {BUNDLE} bundle
    boot
}}
"
    ))
}

/// Build `out` from the microvisor ELF and the boot bundle, with `append` as the
/// microvisor's command line. The ISO's tree is staged beside it (`<out>.d/`).
pub fn build_iso(microvisor: &Path, bundle: &Path, append: &str, out: &Path) -> Result<PathBuf, String> {
    crate::setup::ensure_grub()?;
    let cfg = grub_cfg(append)?;
    let stage = out.with_extension("d");
    let _ = std::fs::remove_dir_all(&stage);
    let grub_dir = stage.join("boot").join("grub");
    std::fs::create_dir_all(&grub_dir).map_err(|e| format!("creating {}: {e}", grub_dir.display()))?;
    // Without debug information: a BIOS loads the ISO's files by programmed I/O, which
    // Bochs emulates instruction by instruction (7 MB with it, under 1 MB without).
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let microvisor_bytes = strip_elf(&read(microvisor)?, &stage)?;
    let bundle_bytes = strip_bundle(&read(bundle)?, &stage)?;
    for (bytes, to) in [(microvisor_bytes, MICROVISOR), (bundle_bytes, BUNDLE)] {
        let dst = stage.join(to.trim_start_matches('/'));
        std::fs::write(&dst, bytes).map_err(|e| format!("writing {}: {e}", dst.display()))?;
    }
    std::fs::write(grub_dir.join("grub.cfg"), cfg).map_err(|e| format!("writing grub.cfg: {e}"))?;
    let output = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(out)
        // Only the BIOS platform; no translations, fonts or themes on a serial-console ISO.
        .args(["-d", crate::setup::GRUB_I386_PC, "--locales=", "--fonts=", "--themes="])
        .arg(&stage)
        .output()
        .map_err(|e| format!("could not run grub-mkrescue: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "grub-mkrescue failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(out.to_path_buf())
}

/// `image` without its debug sections (`objcopy --strip-debug`); unchanged if it is not an
/// ELF file or objcopy is missing (then the ISO is only bigger and slower to load).
fn strip_elf(image: &[u8], scratch: &Path) -> Result<Vec<u8>, String> {
    if !image.starts_with(b"\x7fELF") {
        return Ok(image.to_vec());
    }
    let (input, output) = (scratch.join("strip-in.elf"), scratch.join("strip-out.elf"));
    std::fs::write(&input, image).map_err(|e| format!("writing {}: {e}", input.display()))?;
    let stripped =
        Command::new("objcopy").arg("--strip-debug").arg(&input).arg(&output).status().is_ok_and(|s| s.success());
    let out = if stripped { std::fs::read(&output).unwrap_or_else(|_| image.to_vec()) } else { image.to_vec() };
    let _ = std::fs::remove_file(&input);
    let _ = std::fs::remove_file(&output);
    Ok(out)
}

/// The boot bundle with every ELF image in it stripped of debug information.
fn strip_bundle(bundle: &[u8], scratch: &Path) -> Result<Vec<u8>, String> {
    let parsed = ipc_spec::bundle::Bundle::parse(bundle).map_err(|e| format!("reading the boot bundle: {e}"))?;
    let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
    for e in parsed.entries() {
        entries.push((e.name.to_string(), strip_elf(e.data, scratch)?));
    }
    let refs: Vec<(&str, &[u8])> = entries.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
    ipc_spec::bundle::build(&refs).map_err(|e| format!("repacking the boot bundle: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grub_cfg_boots_the_microvisor_with_the_bundle_as_first_module() {
        let cfg = grub_cfg(" dom0.on_ready=shutdown ").unwrap();
        assert!(cfg.contains("set timeout=0\n"));
        assert!(cfg.contains("terminal_output serial console\n"));
        assert!(
            cfg.contains("    multiboot2 /boot/microvisor.elf dom0.on_ready=shutdown\n    module2 /boot/bundle.bin")
        );
        let plain = grub_cfg("").unwrap();
        assert!(plain.contains("    multiboot2 /boot/microvisor.elf\n"));
    }

    #[test]
    fn bundles_are_repacked_with_the_same_entries() {
        let dir = std::env::temp_dir().join(format!("xtask-iso-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bundle = ipc_spec::bundle::build(&[("a", b"not an elf"), ("manifest", b"\x01\x02")]).unwrap();
        let again = strip_bundle(&bundle, &dir).unwrap();
        assert_eq!(again, bundle);
        assert!(strip_bundle(b"garbage", &dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn grub_syntax_in_the_command_line_is_refused() {
        for bad in ["a=$x", "a;reboot", "x'y", "}", "a\nb"] {
            assert!(grub_cfg(bad).is_err(), "{bad:?}");
        }
    }
}

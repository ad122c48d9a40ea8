//! Building the bare-metal images and packing the boot bundle.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{workspace_root, BARE_METAL_TARGET};

/// Domain images packed into the bundle: (bundle name, cargo package).
pub const DOMAIN_IMAGES: &[(&str, &str)] = &[(ipc_spec::DOM0_IMAGE, "dom0")];

/// What a build produces.
#[derive(Clone, Debug)]
pub struct Artifacts {
    /// The microvisor ELF, booted with QEMU `-kernel`.
    pub microvisor: PathBuf,
    /// The boot bundle, given with QEMU `-initrd`.
    pub bundle: PathBuf,
}

impl Artifacts {
    /// Where `build` puts things under a cargo target directory.
    pub fn in_dir(stack_dir: &Path) -> Self {
        Self {
            microvisor: stack_dir.join("microvisor.elf"),
            bundle: stack_dir.join("bundle.bin"),
        }
    }
}

/// Build every image (release, bare-metal) into `target_dir` and pack the bundle.
pub fn build(target_dir: &Path) -> Result<Artifacts, String> {
    crate::setup::ensure_target()?;
    let root = workspace_root();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&root)
        .args([
            "build",
            "--release",
            "--target",
            BARE_METAL_TARGET,
            "-p",
            "microvisor",
        ])
        .env("CARGO_TARGET_DIR", target_dir);
    for (_, package) in DOMAIN_IMAGES {
        cmd.args(["-p", package]);
    }
    eprintln!("build: compiling the microvisor and domain images for {BARE_METAL_TARGET}");
    let status = cmd
        .status()
        .map_err(|e| format!("could not run cargo: {e}"))?;
    if !status.success() {
        return Err("cargo build of the bare-metal images failed (see the errors above)".into());
    }
    let out = target_dir.join(BARE_METAL_TARGET).join("release");
    let stack_dir = target_dir.join("stack");
    std::fs::create_dir_all(&stack_dir)
        .map_err(|e| format!("creating {}: {e}", stack_dir.display()))?;
    let artifacts = Artifacts::in_dir(&stack_dir);
    copy(&out.join("microvisor"), &artifacts.microvisor)?;

    let mut images = Vec::new();
    for (name, package) in DOMAIN_IMAGES {
        let path = out.join(package);
        let data = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        images.push((*name, data));
    }
    let entries: Vec<(&str, &[u8])> = images.iter().map(|(n, d)| (*n, d.as_slice())).collect();
    let bundle =
        ipc_spec::bundle::build(&entries).map_err(|e| format!("packing the boot bundle: {e}"))?;
    std::fs::write(&artifacts.bundle, &bundle)
        .map_err(|e| format!("writing {}: {e}", artifacts.bundle.display()))?;
    eprintln!(
        "build: {} ({} KiB), {} ({} KiB, {} image(s))",
        artifacts.microvisor.display(),
        file_len(&artifacts.microvisor) / 1024,
        artifacts.bundle.display(),
        bundle.len() / 1024,
        images.len()
    );
    Ok(artifacts)
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// The default target directory (`<workspace>/target`, or `$CARGO_TARGET_DIR`).
pub fn default_target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

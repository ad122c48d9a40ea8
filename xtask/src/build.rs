//! Building the bare-metal images and packing boot bundles.
//!
//! Compiling happens once (`compile`); a bundle is then packed per stack manifest (`pack`):
//! dom0's image, the images the manifest uses, and the manifest itself (postcard).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{workspace_root, BARE_METAL_TARGET};

/// Domain images a manifest may use: (bundle name, cargo package, binary).
pub const DOMAIN_IMAGES: &[(&str, &str, &str)] = &[
    ("ipc-client", "domains", "ipc-client"),
    ("ipc-server", "domains", "ipc-server"),
    ("rogue", "domains", "rogue"),
    ("spinner", "domains", "spinner"),
    ("test-vmm", "domains", "test-vmm"),
    ("tiny-vm", "domains", "tiny-vm"),
    ("virtio-rogue", "domains", "virtio-rogue"),
    ("fuzzer", "domains", "fuzzer"),
    ("vmm", "vmm", "vmm"),
    ("disk-driver", "disk-driver", "disk-driver"),
    ("net-driver", "net-driver", "net-driver"),
    ("demo-guest", "demo-guest", "demo-guest"),
];

/// The names manifests may use as `image` (and, for the Linux files, as `kernel` and
/// `initramfs`).
pub fn known_images() -> Vec<&'static str> {
    let mut names: Vec<&str> = DOMAIN_IMAGES.iter().map(|(name, _, _)| *name).collect();
    names.extend(crate::linux::BUNDLE_FILES);
    names
}

/// What a build produces.
#[derive(Clone, Debug)]
pub struct Artifacts {
    /// The microvisor ELF, booted with QEMU `-kernel`.
    pub microvisor: PathBuf,
    /// The boot bundle of the stack, given with QEMU `-initrd`.
    pub bundle: PathBuf,
    /// Where the compiled images are (to pack other stacks).
    pub images: PathBuf,
    /// What the stack's manifest says.
    pub stack: StackInfo,
}

/// The parts of a stack manifest the tools need.
#[derive(Clone, Debug, Default)]
pub struct StackInfo {
    /// The domains besides dom0, as the manifest names them.
    pub domains: Vec<String>,
    /// Those of them that are VMs (their console goes through their VMM).
    pub vms: Vec<String>,
    /// RAM of the machine (QEMU `-m`).
    pub memory_mib: u32,
    /// Devices the manifest assigns (e.g. `virtio-blk`): QEMU must provide them.
    pub devices: Vec<String>,
    /// The stack runs a Linux VM (a domain with a `kernel`): its disk is an ext4 file system
    /// (the initramfs mounts it at `/srv`), so a missing image is made with `mkfs.ext4`.
    pub linux: bool,
    /// dom0 drives a host control device (`[machine] control`): QEMU gives it a virtio
    /// console on a unix socket (`cargo xtask ctl`).
    pub control: bool,
}

/// The microvisor builds, one per CPU vendor: (image name in the images folder, cargo
/// features). The SVM build is the default one, booted by QEMU; the VMX build boots on
/// Bochs and Intel machines.
pub const MICROVISOR_BUILDS: [(&str, &[&str]); 2] = [("microvisor-svm", &[]), ("microvisor-vmx", &["vmx"])];

/// Where the VMX build of the microvisor is, beside the SVM build `microvisor` (as
/// `build` and `cargo xtask test` leave them).
pub fn vmx_image(microvisor: &Path) -> PathBuf {
    microvisor.with_file_name("microvisor-vmx.elf")
}

/// Compile every image (release, bare-metal) into `target_dir`; returns the images folder.
pub fn compile(target_dir: &Path) -> Result<PathBuf, String> {
    crate::setup::ensure_target()?;
    let release = target_dir.join(BARE_METAL_TARGET).join("release");
    // The microvisor is built on its own: built together with the domains, cargo would
    // unify features and link ipc-spec's allocating manifest code into the microvisor.
    // Each vendor build is copied aside, since both are named `microvisor`.
    let domains = &["dom0", "domains", "vmm", "disk-driver", "net-driver", "demo-guest", "linux-iobench"][..];
    let microvisors = MICROVISOR_BUILDS.iter().map(|(name, features)| (&["microvisor"][..], *features, Some(*name)));
    for (packages, features, copy_to) in microvisors.chain([(domains, &[][..], None)]) {
        cargo_build(target_dir, packages, features)?;
        if let Some(name) = copy_to {
            std::fs::copy(release.join("microvisor"), release.join(name))
                .map_err(|e| format!("copying the microvisor to {name}: {e}"))?;
        }
    }
    Ok(release)
}

/// The SVM microvisor built with diagnostic cargo `features` (e.g. `counts`), in a target
/// folder of its own under `target_dir` (so the default images stay as they are); returns
/// the image's path.
pub fn compile_microvisor_with(target_dir: &Path, features: &[&str]) -> Result<PathBuf, String> {
    let dir = target_dir.join(features.join("-"));
    cargo_build(&dir, &["microvisor"], features)?;
    Ok(dir.join(BARE_METAL_TARGET).join("release").join("microvisor"))
}

/// `cargo build --release` of bare-metal `packages` with `features` into `target_dir`.
fn cargo_build(target_dir: &Path, packages: &[&str], features: &[&str]) -> Result<(), String> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root())
        .args(["build", "--release", "--target", BARE_METAL_TARGET])
        .env("CARGO_TARGET_DIR", target_dir);
    for p in packages {
        cmd.args(["-p", p]);
    }
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    eprintln!("build: compiling {} for {BARE_METAL_TARGET} {features:?}", packages.join(", "));
    let status = cmd.status().map_err(|e| format!("could not run cargo: {e}"))?;
    if !status.success() {
        return Err("cargo build of the bare-metal images failed (see the errors above)".into());
    }
    Ok(())
}

/// Pack the bundle for the stack manifest `stack` from compiled `images` into `out`.
pub fn pack(images: &Path, stack: &Path, out: &Path) -> Result<StackInfo, String> {
    let manifest = crate::manifest::load(stack, &known_images())?;
    pack_manifest(images, &manifest, out)
}

/// Pack the bundle for an already loaded (and validated) manifest.
pub fn pack_manifest(images: &Path, manifest: &ipc_spec::manifest::Manifest, out: &Path) -> Result<StackInfo, String> {
    let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
    let read = |bin: &str| {
        let path = images.join(bin);
        std::fs::read(&path).map_err(|e| format!("reading {}: {e} (run `cargo xtask build` first)", path.display()))
    };
    entries.push((ipc_spec::DOM0_IMAGE.to_string(), read("dom0")?));
    let mut linux: Option<crate::linux::Artifacts> = None;
    for image in crate::manifest::images(manifest) {
        if crate::linux::BUNDLE_FILES.contains(&image) {
            // Fetched and built on first use, then cached under target/linux.
            let a = match linux.take() {
                Some(a) => a,
                None => crate::linux::ensure(&crate::linux::default_dir())?,
            };
            let path = if image == crate::linux::KERNEL_ENTRY { &a.vmlinux } else { &a.initramfs };
            let data = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
            entries.push((image.to_string(), data));
            linux = Some(a);
            continue;
        }
        let bin = DOMAIN_IMAGES
            .iter()
            .find(|(name, _, _)| *name == image)
            .map(|(_, _, bin)| *bin)
            .ok_or_else(|| format!("image \"{image}\" has no binary"))?;
        entries.push((image.to_string(), read(bin)?));
    }
    entries.push((ipc_spec::manifest::MANIFEST_ENTRY.to_string(), crate::manifest::pack(manifest)));
    let refs: Vec<(&str, &[u8])> = entries.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
    let bundle = ipc_spec::bundle::build(&refs).map_err(|e| format!("packing the boot bundle: {e}"))?;
    check_memory(manifest, &entries, bundle.len() as u64)?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    std::fs::write(out, &bundle).map_err(|e| format!("writing {}: {e}", out.display()))?;
    Ok(StackInfo {
        domains: manifest.domains.iter().map(|d| d.name.clone()).collect(),
        vms: manifest.domains.iter().filter(|d| !d.vmm.is_empty()).map(|d| d.name.clone()).collect(),
        memory_mib: manifest.machine_memory_mib,
        devices: manifest.domains.iter().filter(|d| !d.device.is_empty()).map(|d| d.device.clone()).collect(),
        linux: manifest.domains.iter().any(|d| !d.kernel.is_empty()),
        control: !manifest.control.is_empty(),
    })
}

/// The machine must hold the bundle, dom0's copy of each VM's kernel and initramfs (handed
/// to its VMM), the domains' RAM and the reserve; the manifest check alone cannot know the
/// files' sizes.
fn check_memory(
    manifest: &ipc_spec::manifest::Manifest,
    entries: &[(String, Vec<u8>)],
    bundle: u64,
) -> Result<(), String> {
    let size = |name: &str| entries.iter().find(|(n, _)| n == name).map_or(0, |(_, d)| d.len() as u64);
    let copies: u64 = manifest
        .domains
        .iter()
        .filter(|d| !d.kernel.is_empty())
        .map(|d| (size(&d.kernel) + size(&d.initramfs)).next_multiple_of(2 << 20))
        .sum();
    let mib = |b: u64| b.div_ceil(1 << 20);
    let need =
        mib(bundle) + mib(copies) + manifest.total_memory_mib() + u64::from(ipc_spec::manifest::RESERVED_MEMORY_MIB);
    if need > u64::from(manifest.machine_memory_mib) {
        return Err(format!(
            "machine.memory_mib: {} MiB is too little: the boot bundle ({} MiB), the kernel and initramfs copies \
             handed to the VMMs ({} MiB), the domains ({} MiB) and the reserve ({} MiB) need {need} MiB",
            manifest.machine_memory_mib,
            mib(bundle),
            mib(copies),
            manifest.total_memory_mib(),
            ipc_spec::manifest::RESERVED_MEMORY_MIB
        ));
    }
    Ok(())
}

/// Compile everything and pack the bundle of `stack` into `<target>/stack/`.
pub fn build(target_dir: &Path, stack: &Path) -> Result<Artifacts, String> {
    let images = compile(target_dir)?;
    let stack_dir = target_dir.join("stack");
    std::fs::create_dir_all(&stack_dir).map_err(|e| format!("creating {}: {e}", stack_dir.display()))?;
    let microvisor = stack_dir.join("microvisor.elf");
    for (from, to) in [("microvisor-svm", microvisor.clone()), ("microvisor-vmx", vmx_image(&microvisor))] {
        let from = images.join(from);
        std::fs::copy(&from, &to).map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))?;
    }
    let bundle = stack_dir.join("bundle.bin");
    let info = pack(&images, stack, &bundle)?;
    eprintln!(
        "build: {} ({} KiB), {} ({} KiB: dom0 + {} domain(s) from {})",
        microvisor.display(),
        file_len(&microvisor) / 1024,
        bundle.display(),
        file_len(&bundle) / 1024,
        info.domains.len(),
        stack.display()
    );
    Ok(Artifacts { microvisor, bundle, images, stack: info })
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Size of the disk image `xtask` creates when there is none.
pub const DISK_BYTES: u64 = 64 << 20;
/// Size of the ext4 file system made for a Linux guest: the first half of the image.
pub const EXT4_BYTES: u64 = DISK_BYTES / 2;

/// Make sure a raw disk image exists at `path` (zero-filled, [`DISK_BYTES`] long).
pub fn ensure_disk(path: &Path) -> Result<(), String> {
    ensure_disk_as(path, false)
}

/// Make sure a disk image exists at `path`: [`DISK_BYTES`] long, zero-filled, or (`ext4`)
/// holding an empty ext4 file system made by e2fsprogs' `mkfs.ext4`, for the Linux guest.
pub fn ensure_disk_as(path: &Path, ext4: bool) -> Result<(), String> {
    if ext4 && !path.exists() {
        crate::setup::ensure_e2fsprogs()?;
        ensure_disk_as(path, false)?;
        // -F: the target is a file; no lazy init, so the image is complete when mkfs ends.
        // The file system takes the first half of the image ([`EXT4_BYTES`]): a stack may give
        // the second half to another guest through the disk driver's partitions
        // (`part.<channel>=`, stacks/linux-demo.toml).
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "srv", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(path)
            .arg(format!("{}k", EXT4_BYTES >> 10))
            .output()
            .map_err(|e| format!("running mkfs.ext4: {e}"))?;
        if !out.status.success() {
            let _ = std::fs::remove_file(path);
            return Err(format!("mkfs.ext4 {}: {}", path.display(), String::from_utf8_lossy(&out.stderr)));
        }
        eprintln!("build: made an ext4 file system on {}", path.display());
        return Ok(());
    }
    if path.exists() {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let f = std::fs::File::create(path).map_err(|e| format!("creating the disk image {}: {e}", path.display()))?;
    f.set_len(DISK_BYTES).map_err(|e| format!("sizing the disk image {}: {e}", path.display()))?;
    eprintln!("build: created the disk image {} ({} MiB, zeros)", path.display(), DISK_BYTES >> 20);
    Ok(())
}

/// The default target directory (`<workspace>/target`, or `$CARGO_TARGET_DIR`).
pub fn default_target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc_spec::manifest::{DomainSpec, Manifest, MANIFEST_VERSION};

    fn domain(name: &str, mib: u32) -> DomainSpec {
        DomainSpec {
            name: name.into(),
            image: String::new(),
            memory_mib: mib,
            priority: 10,
            vcpus: 1,
            args: String::new(),
            device: String::new(),
            status: false,
            vmm: String::new(),
            fuzz: false,
            kernel: String::new(),
            initramfs: String::new(),
            cmdline: String::new(),
            console_input: false,
            restart: ipc_spec::manifest::RestartPolicy::default(),
        }
    }

    #[test]
    fn the_machine_must_hold_bundle_copies_and_domains() {
        let mut vm = domain("linux-vm", 128);
        (vm.kernel, vm.initramfs, vm.vmm) = ("linux".into(), "initrd".into(), "vmm".into());
        let mut m = Manifest {
            version: MANIFEST_VERSION,
            machine_memory_mib: 512,
            domains: vec![domain("vmm", 16), vm],
            channels: Vec::new(),
            control: String::new(),
        };
        let entries = vec![("linux".to_string(), vec![0u8; 60 << 20]), ("initrd".to_string(), vec![0u8; 5 << 20])];
        // 70 MiB bundle + 66 MiB copy + 144 MiB domains + 64 MiB reserve = 344 MiB.
        assert_eq!(check_memory(&m, &entries, 70 << 20), Ok(()));
        m.machine_memory_mib = 300;
        let e = check_memory(&m, &entries, 70 << 20).unwrap_err();
        assert!(e.starts_with("machine.memory_mib: 300 MiB is too little") && e.contains("need 344 MiB"), "{e}");
    }
}

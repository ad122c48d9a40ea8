//! Debian packages as build inputs: resolve a name with `apt-cache`, download the `.deb`
//! with `apt-get download` (no installation, nothing changes on the host but apt's package
//! lists), unpack it with `dpkg-deb -x`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The package `linux-image-amd64` (a metapackage) stands for, from `apt-cache depends`
/// output: its `Depends: linux-image-<version>-amd64` line.
pub fn parse_kernel_depends(apt_cache_depends: &str) -> Option<String> {
    apt_cache_depends.lines().find_map(|l| {
        let dep = l.trim().strip_prefix("Depends:")?.trim();
        (dep.starts_with("linux-image-") && dep != "linux-image-amd64" && !dep.contains(' ')).then(|| dep.to_string())
    })
}

/// The kernel release (`uname -r`, e.g. `6.1.0-57-amd64`) of the package
/// `linux-image-6.1.0-57-amd64`.
pub fn kernel_release(package: &str) -> Option<&str> {
    package.strip_prefix("linux-image-").filter(|r| !r.is_empty())
}

fn run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{what}: could not run it: {e}"))?;
    if !out.status.success() {
        return Err(format!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    run(Command::new("id").arg("-u"), "id -u").map(|s| s.trim() == "0").unwrap_or(false)
}

fn apt_get_update() -> Result<(), String> {
    if !is_root() {
        return Err("apt's package lists do not know the package; run `sudo apt-get update` and retry".into());
    }
    eprintln!("linux: apt-get update (the package lists do not know the package yet)");
    run(Command::new("apt-get").args(["update", "-qq"]), "apt-get update").map(|_| ())
}

/// The real package behind `metapackage` (e.g. `linux-image-amd64` →
/// `linux-image-6.1.0-57-amd64`); refreshes apt's lists once if they do not know it.
pub fn resolve_kernel_package(metapackage: &str) -> Result<String, String> {
    let lookup = || {
        run(Command::new("apt-cache").args(["depends", metapackage]), "apt-cache depends")
            .ok()
            .and_then(|o| parse_kernel_depends(&o))
    };
    if let Some(p) = lookup() {
        return Ok(p);
    }
    apt_get_update()?;
    lookup().ok_or_else(|| format!("apt-cache depends {metapackage} names no linux-image-* package (is this Debian?)"))
}

/// The `.deb` of `package` in `dir`, downloading it with `apt-get download` when missing.
pub fn download(package: &str, dir: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    if let Some(deb) = find_deb(package, dir)? {
        return Ok(deb);
    }
    eprintln!("linux: downloading {package} (apt-get download, into {})", dir.display());
    let attempt =
        || run(Command::new("apt-get").args(["download", "-q", package]).current_dir(dir), "apt-get download");
    if let Err(first) = attempt() {
        // The lists may be stale (a security update replaced the version they name).
        apt_get_update().map_err(|e| format!("{first}; {e}"))?;
        attempt()
            .map_err(|e| format!("{e}\n  to fetch it by hand: (cd {} && apt-get download {package})", dir.display()))?;
    }
    find_deb(package, dir)?
        .ok_or_else(|| format!("apt-get download {package} left no {package}_*.deb in {}", dir.display()))
}

fn find_deb(package: &str, dir: &Path) -> Result<Option<PathBuf>, String> {
    let prefix = format!("{package}_");
    let mut debs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("reading {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .collect();
    debs.sort();
    Ok(debs.pop())
}

/// Unpacks the files of `deb` into `dir` (`dpkg-deb -x`), unless a previous run finished
/// doing so (marked by `dir/.unpacked`).
pub fn unpack(deb: &Path, dir: &Path) -> Result<(), String> {
    let done = dir.join(".unpacked");
    if done.exists() {
        return Ok(());
    }
    if dir.exists() {
        // A half-finished earlier attempt.
        std::fs::remove_dir_all(dir).map_err(|e| format!("removing {}: {e}", dir.display()))?;
    }
    eprintln!("linux: unpacking {} (dpkg-deb -x)", deb.file_name().and_then(|n| n.to_str()).unwrap_or("?"));
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir), "dpkg-deb -x")?;
    std::fs::write(&done, b"").map_err(|e| format!("writing {}: {e}", done.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_real_kernel_package() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n";
        assert_eq!(parse_kernel_depends(out).as_deref(), Some("linux-image-6.1.0-57-amd64"));
        // An alternative (`|Depends:`) or unrelated line is skipped.
        let out = "linux-image-amd64\n |Depends: foo\n  Depends: linux-base\n  Depends: linux-image-6.1.0-9-amd64\n";
        assert_eq!(parse_kernel_depends(out).as_deref(), Some("linux-image-6.1.0-9-amd64"));
        assert_eq!(parse_kernel_depends("linux-image-amd64\n"), None);
        assert_eq!(kernel_release("linux-image-6.1.0-57-amd64"), Some("6.1.0-57-amd64"));
        assert_eq!(kernel_release("busybox"), None);
    }
}

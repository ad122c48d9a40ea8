//! Kernel modules for the initramfs: what each `.ko` depends on and the order to load them.
//!
//! Debian's kernel package carries no `modules.dep` (depmod writes it when the package is
//! installed), so the dependencies come from the modules themselves: every `.ko` is an ELF
//! relocatable object with a `.modinfo` section of NUL-separated `key=value` strings
//! (include/linux/moduleparam.h `__MODULE_INFO`), among them `name=`, `depends=` (comma
//! separated, written by modpost from the symbols the module imports), `alias=` and
//! `softdep=pre: ... post: ...` (a module another one needs but does not link against, e.g.
//! ext4's `crypto-crc32c`). busybox `insmod` loads one file and resolves nothing, so the
//! initramfs loads the modules in an order where each comes after what it needs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What a module says about itself in `.modinfo`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    pub name: String,
    pub depends: Vec<String>,
    /// Modules (or aliases) to load before this one (`softdep=pre:`).
    pub softdep_pre: Vec<String>,
    pub aliases: Vec<String>,
}

/// Module names use `_` where file names may use `-` (kmod treats them as equal).
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn u16_at(d: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(d.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(d: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(d.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(d: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(d.get(at..at + 8)?.try_into().ok()?))
}

/// The bytes of the ELF64 section called `wanted` (System V gABI, "Sections": the header
/// table at `e_shoff`, `e_shnum` entries of `e_shentsize` bytes, names in section
/// `e_shstrndx`).
pub fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Option<&'a [u8]> {
    if elf.get(..4)? != b"\x7fELF" || *elf.get(4)? != 2 || *elf.get(5)? != 1 {
        return None;
    }
    let shoff = usize::try_from(u64_at(elf, 0x28)?).ok()?;
    let shentsize = usize::from(u16_at(elf, 0x3a)?);
    let shnum = usize::from(u16_at(elf, 0x3c)?);
    let shstrndx = usize::from(u16_at(elf, 0x3e)?);
    if shentsize < 64 {
        return None;
    }
    let header = |i: usize| elf.get(shoff.checked_add(i.checked_mul(shentsize)?)?..)?.get(..64);
    let range = |h: &[u8]| -> Option<(usize, usize)> {
        let off = usize::try_from(u64_at(h, 0x18)?).ok()?;
        let size = usize::try_from(u64_at(h, 0x20)?).ok()?;
        Some((off, off.checked_add(size)?))
    };
    let (str_start, str_end) = range(header(shstrndx)?)?;
    let names = elf.get(str_start..str_end)?;
    for i in 0..shnum {
        let h = header(i)?;
        let name_off = u32_at(h, 0)? as usize;
        let name = names.get(name_off..)?.split(|&b| b == 0).next()?;
        if name == wanted.as_bytes() {
            let (start, end) = range(h)?;
            return elf.get(start..end);
        }
    }
    None
}

/// Parses the `key=value` strings of a `.modinfo` section.
pub fn parse_modinfo(section: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for entry in section.split(|&b| b == 0) {
        let Ok(entry) = std::str::from_utf8(entry) else { continue };
        let Some((key, value)) = entry.split_once('=') else { continue };
        match key {
            "name" => info.name = normalize(value),
            "depends" => info.depends.extend(value.split(',').filter(|d| !d.is_empty()).map(normalize)),
            "alias" => info.aliases.push(value.to_string()),
            "softdep" => {
                // "pre: a b post: c": the words after "pre:" up to the next "post:".
                let mut pre = false;
                for word in value.split_ascii_whitespace() {
                    match word {
                        "pre:" => pre = true,
                        "post:" => pre = false,
                        w if pre => info.softdep_pre.push(w.to_string()),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    info
}

/// Reads the `.modinfo` of the module file `ko`; the name falls back to the file name.
pub fn read_modinfo(ko: &Path) -> Result<ModInfo, String> {
    let bytes = std::fs::read(ko).map_err(|e| format!("reading {}: {e}", ko.display()))?;
    let section = elf_section(&bytes, ".modinfo")
        .ok_or_else(|| format!("{}: no .modinfo section (not a module?)", ko.display()))?;
    let mut info = parse_modinfo(section);
    if info.name.is_empty() {
        info.name = module_name(ko).unwrap_or_default();
    }
    Ok(info)
}

/// `virtio_pci` for `.../virtio_pci.ko` (`crc32c-intel.ko` gives `crc32c_intel`); `None`
/// for anything else, including compressed modules (`.ko.xz`), which busybox `insmod`
/// could not load as they are.
pub fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    Some(normalize(file.strip_suffix(".ko")?))
}

/// Every module file under `dir` (e.g. `lib/modules/<version>/kernel`), by module name.
pub fn index(dir: &Path) -> Result<BTreeMap<String, PathBuf>, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).map_err(|e| format!("reading {}: {e}", d.display()))? {
            let path = entry.map_err(|e| format!("reading {}: {e}", d.display()))?.path();
            if path.is_dir() {
                todo.push(path);
            } else if let Some(name) = module_name(&path) {
                out.insert(name, path);
            }
        }
    }
    Ok(out)
}

/// The load order for `wanted` and everything they depend on: each module after its
/// `depends` and after those of its `softdep pre` entries that name (or alias) a module in
/// the set; otherwise in the order asked for. `info` looks a module up by name.
pub fn load_order(
    wanted: &[&str],
    mut info: impl FnMut(&str) -> Result<ModInfo, String>,
) -> Result<Vec<ModInfo>, String> {
    // The closure over hard dependencies, in first-seen order.
    let mut set: Vec<ModInfo> = Vec::new();
    let mut queue: Vec<String> = wanted.iter().map(|w| normalize(w)).collect();
    queue.reverse();
    while let Some(name) = queue.pop() {
        if set.iter().any(|m| m.name == name) {
            continue;
        }
        let m = info(&name)?;
        if m.name != name {
            return Err(format!("module file for {name} calls itself {}", m.name));
        }
        for d in m.depends.iter().rev() {
            queue.push(d.clone());
        }
        set.push(m);
    }
    // Soft dependencies only order modules that are in the set anyway.
    let resolve = |want: &str| -> Option<String> {
        let n = normalize(want);
        set.iter().find(|m| m.name == n || m.aliases.iter().any(|a| a == want)).map(|m| m.name.clone())
    };
    let edges: Vec<(String, Vec<String>)> = set
        .iter()
        .map(|m| {
            let mut before = m.depends.clone();
            before.extend(m.softdep_pre.iter().filter_map(|s| resolve(s)));
            (m.name.clone(), before)
        })
        .collect();
    // Depth-first post-order, starting from the modules in the order they were asked for.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    let mut marks: BTreeMap<&str, Mark> = edges.iter().map(|(n, _)| (n.as_str(), Mark::New)).collect();
    let mut order: Vec<String> = Vec::new();
    fn visit<'a>(
        name: &'a str,
        edges: &'a [(String, Vec<String>)],
        marks: &mut BTreeMap<&'a str, Mark>,
        order: &mut Vec<String>,
        path: &mut Vec<&'a str>,
    ) -> Result<(), String> {
        match marks.get(name).copied() {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Active) => {
                path.push(name);
                return Err(format!("module dependency cycle: {}", path.join(" -> ")));
            }
            Some(Mark::New) => {}
            None => return Err(format!("module {name} is needed but was not found")),
        }
        marks.insert(name, Mark::Active);
        path.push(name);
        let before = edges.iter().find(|(n, _)| n == name).map(|(_, b)| b.as_slice()).unwrap_or(&[]);
        for b in before {
            visit(b, edges, marks, order, path)?;
        }
        path.pop();
        marks.insert(name, Mark::Done);
        order.push(name.to_string());
        Ok(())
    }
    for (name, _) in &edges {
        visit(name, &edges, &mut marks, &mut order, &mut Vec::new())?;
    }
    Ok(order.iter().filter_map(|n| set.iter().find(|m| &m.name == n).cloned()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, depends: &[&str], pre: &[&str], aliases: &[&str]) -> ModInfo {
        ModInfo {
            name: name.into(),
            depends: depends.iter().map(|s| s.to_string()).collect(),
            softdep_pre: pre.iter().map(|s| s.to_string()).collect(),
            aliases: aliases.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The dependencies Debian's 6.1 modules declare (read from their .modinfo).
    fn debian_6_1(name: &str) -> Result<ModInfo, String> {
        Ok(match name {
            "virtio" => m("virtio", &["virtio_ring"], &[], &[]),
            "virtio_pci" => {
                m("virtio_pci", &["virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio"], &[], &[])
            }
            "virtio_blk" | "virtio_mmio" => m(name, &["virtio", "virtio_ring"], &[], &[]),
            "virtio_net" => m("virtio_net", &["virtio_ring", "virtio", "net_failover"], &[], &[]),
            "net_failover" => m("net_failover", &["failover"], &[], &[]),
            "ext4" => m("ext4", &["jbd2", "mbcache", "crc16"], &["crypto-crc32c"], &[]),
            "jbd2" => m("jbd2", &[], &["crypto-crc32c"], &[]),
            "crc32c_generic" => m("crc32c_generic", &[], &[], &["crypto-crc32c", "crypto-crc32c-generic"]),
            "virtio_ring" | "virtio_pci_modern_dev" | "virtio_pci_legacy_dev" | "failover" | "mbcache" | "crc16" => {
                m(name, &[], &[], &[])
            }
            other => return Err(format!("no module {other}")),
        })
    }

    fn names(v: &[ModInfo]) -> Vec<&str> {
        v.iter().map(|m| m.name.as_str()).collect()
    }

    fn before(order: &[&str], a: &str, b: &str) -> bool {
        order.iter().position(|x| *x == a) < order.iter().position(|x| *x == b)
    }

    #[test]
    fn every_module_comes_after_its_dependencies() {
        let wanted = ["virtio_pci", "virtio_blk", "virtio_net", "virtio_mmio", "ext4", "crc32c_generic"];
        let order = load_order(&wanted, debian_6_1).unwrap();
        let order = names(&order);
        assert_eq!(order.len(), 15, "{order:?}");
        for name in &order {
            for d in &debian_6_1(name).unwrap().depends {
                assert!(before(&order, d, name), "{d} not before {name} in {order:?}");
            }
        }
        // The soft dependency pulls crc32c_generic (asked for last) ahead of jbd2 and ext4.
        assert!(before(&order, "crc32c_generic", "jbd2"), "{order:?}");
        // Otherwise the order asked for is kept.
        assert!(before(&order, "virtio_pci", "virtio_blk") && before(&order, "virtio_net", "ext4"));
    }

    #[test]
    fn a_soft_dependency_on_a_module_outside_the_set_adds_nothing() {
        let order = load_order(&["ext4"], debian_6_1).unwrap();
        assert_eq!(names(&order), ["jbd2", "mbcache", "crc16", "ext4"]);
    }

    #[test]
    fn file_names_with_dashes_match_module_names() {
        let order = load_order(&["crc32c-generic"], debian_6_1).unwrap();
        assert_eq!(names(&order), ["crc32c_generic"]);
        assert_eq!(module_name(Path::new("a/b/crc32c-intel.ko")).as_deref(), Some("crc32c_intel"));
        assert_eq!(module_name(Path::new("a/b/virtio.ko.xz")), None);
    }

    #[test]
    fn cycles_and_missing_modules_are_errors() {
        let cyclic = |n: &str| -> Result<ModInfo, String> {
            Ok(match n {
                "a" => m("a", &["b"], &[], &[]),
                "b" => m("b", &["c"], &[], &[]),
                _ => m("c", &["a"], &[], &[]),
            })
        };
        let e = load_order(&["a"], cyclic).unwrap_err();
        assert!(e.contains("cycle") && e.contains("a -> b -> c -> a"), "{e}");
        let e = load_order(&["virtio_net", "nonexistent"], debian_6_1).unwrap_err();
        assert!(e.contains("nonexistent"), "{e}");
    }

    #[test]
    fn parses_modinfo_strings() {
        let s = b"license=GPL\0depends=jbd2,mbcache,crc16\0softdep=pre: crypto-crc32c post: x\0alias=fs-ext4\0\0name=ext4\0vermagic=6.1.0-57-amd64 SMP\0";
        let info = parse_modinfo(s);
        assert_eq!(info, m("ext4", &["jbd2", "mbcache", "crc16"], &["crypto-crc32c"], &["fs-ext4"]));
        assert_eq!(parse_modinfo(b"depends=\0name=virtio_ring\0").depends, Vec::<String>::new());
    }

    /// A tiny ELF64 relocatable object with a .modinfo and a .shstrtab section.
    fn ko(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let mut e = vec![0u8; 64];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        let modinfo_off = e.len();
        e.extend_from_slice(modinfo);
        let str_off = e.len();
        e.extend_from_slice(shstrtab);
        while !e.len().is_multiple_of(8) {
            e.push(0);
        }
        let shoff = e.len();
        let section = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            h
        };
        e.extend(section(0, 0, 0));
        e.extend(section(1, str_off, shstrtab.len()));
        e.extend(section(11, modinfo_off, modinfo.len()));
        e[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        e[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        e[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        e[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        e
    }

    #[test]
    fn finds_the_modinfo_section_in_an_elf() {
        let elf = ko(b"depends=virtio_ring\0name=virtio\0");
        assert_eq!(elf_section(&elf, ".modinfo"), Some(&b"depends=virtio_ring\0name=virtio\0"[..]));
        assert_eq!(elf_section(&elf, ".text"), None);
        // Truncated or hostile headers give None, not a panic.
        for cut in [3, 40, 64, elf.len() - 1] {
            let _ = elf_section(&elf[..cut], ".modinfo");
        }
        let mut bad = elf.clone();
        bad[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(elf_section(&bad, ".modinfo"), None);
    }
}

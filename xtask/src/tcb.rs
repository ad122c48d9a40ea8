//! `cargo xtask tcb`: how big the trusted computing base is.
//!
//! Counts Rust source lines (non-blank, non-comment, test code excluded) of the microvisor and
//! of every other component, the `unsafe` in the microvisor and in the shared crates it links
//! (`pvh`, `ipc-spec`), and the size of the microvisor's loaded image. Prints a table beside the
//! reference points of ARCHITECTURE.md §4 and writes `<target dir>/tcb.json`.
//!
//! What counts as a source line: any line with something other than whitespace outside
//! comments. Line comments (`//`, `///`, `//!`) and block comments (`/* */`, nested) are not
//! code; the lines of string literals are (the assembly in `asm!`/`global_asm!` is code).
//! Test code is left out: any item under a `#[cfg(test)]` (or `#[cfg(all(test, ..))]`) or
//! `#[test]` attribute, with its braces tracked to the item's end (string and char literal
//! contents are skipped so a `"{"` does not confuse the count), files of a `#[cfg(test)] mod
//! name;` declaration, and whole files starting with `#![cfg(test)]`. Only each crate's `src/`
//! is walked, so `tests/` directories, benches and build scripts (which run on the build host)
//! are not counted; the `tests` component, the end-to-end suite, is test code by definition
//! and is counted whole (`tests/src` and `tests/tests`).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{workspace_root, BARE_METAL_TARGET};

/// The agreed ceiling for the microvisor crate, in source lines as counted here: 6,500,
/// issue 8's budget for the exit path and vendor seam (met again after the notification fast
/// path, SignalWait and the wake-up fixes had taken it past, by cutting duplication).
pub const MICROVISOR_SLOC_LIMIT: usize = 6_500;

/// The ceiling for the microvisor's VMX build (issue 13: at most 7,000 lines per build).
/// `MICROVISOR_SLOC_LIMIT` above is the SVM build's: the default build, and the one every
/// earlier figure counted.
pub const VMX_BUILD_SLOC_LIMIT: usize = 7_000;

/// Microvisor files only one vendor build compiles (a path ending in `/` is a folder):
/// the other build leaves them out of its count. Items in shared files under
/// `#[cfg(feature = "vmx")]` or `#[cfg(not(feature = "vmx"))]` are split the same way.
pub const VMX_ONLY: &[&str] =
    &["microvisor/src/vmx/", "microvisor/src/ept.rs", "microvisor/src/vmx_caps.rs", "microvisor/src/arch/vmx_probe.rs"];
pub const SVM_ONLY: &[&str] = &["microvisor/src/svm/", "microvisor/src/npt.rs"];

/// Which vendor build an item attribute (whitespace removed) confines code to: `Some(true)`
/// for the VMX build only, `Some(false)` for the SVM build only.
fn vendor_attribute(body: &str) -> Option<bool> {
    match body {
        "cfg(feature=\"vmx\")" | "cfg(any(test,feature=\"vmx\"))" => Some(true),
        "cfg(not(feature=\"vmx\"))" | "cfg(any(test,not(feature=\"vmx\")))" => Some(false),
        _ => None,
    }
}

/// The shared crates linked into the microvisor binary, and so part of its TCB.
pub const LINKED_SHARED_CRATES: &[&str] = &["pvh", "ipc-spec"];

/// Files of the linked shared crates that the microvisor does not compile: `ipc-spec`'s
/// modules behind its `channels` and `alloc` features, which only domains and host tools
/// enable. The TCB total leaves them out (every `pvh` module is linked).
pub const NOT_LINKED: &[&str] = &[
    "ipc-spec/src/block.rs",
    "ipc-spec/src/net.rs",
    "ipc-spec/src/ring.rs",
    "ipc-spec/src/status.rs",
    "ipc-spec/src/manifest.rs",
    "ipc-spec/src/block_client.rs",
];

/// Reference points from ARCHITECTURE.md §4: (system, trusted kernel size).
pub const REFERENCE_POINTS: &[(&str, &str)] = &[
    ("NOVA (x86_64 build)", "~14.1k SLOC C++"),
    ("seL4 (x86_64)", "8.7k C, verified on ARM; VT-x/VT-d unverified"),
    ("Muen", "~5.7k SPARK"),
    ("Xen", "~300k C + dom0 Linux"),
];

/// `unsafe` occurrences in non-test code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnsafeCounts {
    /// `unsafe {` blocks (`\bunsafe\s*\{`).
    pub blocks: usize,
    /// `unsafe fn` (also `unsafe extern "C" fn`).
    pub fns: usize,
    /// `unsafe impl`.
    pub impls: usize,
    /// `#[unsafe(naked)]` functions.
    pub naked: usize,
}

impl std::ops::AddAssign for UnsafeCounts {
    fn add_assign(&mut self, o: Self) {
        self.blocks += o.blocks;
        self.fns += o.fns;
        self.impls += o.impls;
        self.naked += o.naked;
    }
}

/// What [`analyze`] finds in one source file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileAnalysis {
    /// Non-blank, non-comment lines outside test code.
    pub sloc: usize,
    /// `unsafe` outside test code.
    pub unsafe_counts: UnsafeCounts,
    /// The whole file is test code (`#![cfg(test)]`).
    pub all_test: bool,
    /// Modules declared `#[cfg(test)] mod name;` (their files are test code too).
    pub test_modules: Vec<String>,
    /// Of `sloc`, the lines in items only the VMX build compiles, and only the SVM build.
    pub vmx_only: usize,
    pub svm_only: usize,
}

/// One line with comments removed and the contents of string and char literals replaced by
/// `s` (so braces and keywords inside literals are invisible), and whether it holds code.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stripped {
    code: String,
    has_code: bool,
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Code,
    /// Inside `/* */`, with the nesting depth (Rust block comments nest).
    Block(usize),
    /// Inside `"..."` (escapes apply).
    Str,
    /// Inside `r#"..."#` with this many `#`.
    RawStr(usize),
}

/// Splits `src` into lines with comments removed and literal contents masked.
fn strip(src: &str) -> Vec<Stripped> {
    let c: Vec<char> = src.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let mut lines = Vec::new();
    let mut cur = Stripped { code: String::new(), has_code: false };
    let mut state = State::Code;
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            lines.push(std::mem::replace(&mut cur, Stripped { code: String::new(), has_code: false }));
            i += 1;
            continue;
        }
        match state {
            State::Code => {
                if ch == '/' && at(i + 1) == '/' {
                    while i < c.len() && c[i] != '\n' {
                        i += 1;
                    }
                    continue;
                }
                if ch == '/' && at(i + 1) == '*' {
                    state = State::Block(1);
                    i += 2;
                    continue;
                }
                if ch == '"' {
                    cur.code.push('"');
                    cur.has_code = true;
                    state = State::Str;
                    i += 1;
                    continue;
                }
                // Raw strings: r"..", r#".."#, br#".."#; the `r` must start a token.
                let prev = if i > 0 { c[i - 1] } else { ' ' };
                let prev2 = if i > 1 { c[i - 2] } else { ' ' };
                let starts_token = !is_ident(prev) || (prev == 'b' && !is_ident(prev2));
                if ch == 'r' && starts_token {
                    let mut j = i + 1;
                    while at(j) == '#' {
                        j += 1;
                    }
                    if at(j) == '"' {
                        cur.code.push_str("r\"");
                        cur.has_code = true;
                        state = State::RawStr(j - i - 1);
                        i = j + 1;
                        continue;
                    }
                }
                if ch == '\'' {
                    // A char literal, not a lifetime or label.
                    if at(i + 1) == '\\' {
                        let mut j = i + 3; // past the quote, the backslash and the escaped char
                        while j < c.len() && c[j] != '\'' && c[j] != '\n' {
                            j += 1;
                        }
                        if at(j) == '\'' {
                            cur.code.push_str("'s'");
                            cur.has_code = true;
                            i = j + 1;
                            continue;
                        }
                    } else if at(i + 2) == '\'' && at(i + 1) != '\n' && at(i + 1) != '\'' {
                        cur.code.push_str("'s'");
                        cur.has_code = true;
                        i += 3;
                        continue;
                    }
                }
                cur.code.push(ch);
                if !ch.is_whitespace() {
                    cur.has_code = true;
                }
                i += 1;
            }
            State::Block(depth) => {
                if ch == '/' && at(i + 1) == '*' {
                    state = State::Block(depth + 1);
                    i += 2;
                } else if ch == '*' && at(i + 1) == '/' {
                    state = if depth == 1 { State::Code } else { State::Block(depth - 1) };
                    i += 2;
                } else {
                    i += 1;
                }
            }
            State::Str => {
                if ch == '"' {
                    cur.code.push('"');
                    cur.has_code = true;
                    state = State::Code;
                    i += 1;
                } else if ch == '\\' {
                    cur.code.push('s');
                    cur.has_code = true;
                    // Skip the escaped char, but never the newline (a line continuation
                    // still ends this line).
                    i += if at(i + 1) == '\n' { 1 } else { 2 };
                } else {
                    if !ch.is_whitespace() {
                        cur.code.push('s');
                        cur.has_code = true;
                    }
                    i += 1;
                }
            }
            State::RawStr(hashes) => {
                if ch == '"' && (1..=hashes).all(|k| at(i + k) == '#') {
                    cur.code.push('"');
                    cur.has_code = true;
                    state = State::Code;
                    i += 1 + hashes;
                } else {
                    if !ch.is_whitespace() {
                        cur.code.push('s');
                        cur.has_code = true;
                    }
                    i += 1;
                }
            }
        }
    }
    if !cur.code.is_empty() || cur.has_code {
        lines.push(cur);
    }
    lines
}

/// If `code` (a stripped line) starts with an attribute, returns (is inner `#![..]`, the
/// attribute's contents with whitespace removed, the byte offset just past its `]`).
fn leading_attribute(code: &str) -> Option<(bool, String, usize)> {
    let start = code.len() - code.trim_start().len();
    let rest = &code[start..];
    let (inner, open) = if rest.starts_with("#![") {
        (true, 3)
    } else if rest.starts_with("#[") {
        (false, 2)
    } else {
        return None;
    };
    let mut depth = 0usize;
    for (k, ch) in rest.char_indices() {
        match ch {
            '[' => depth += 1,
            ']' => {
                depth -= 1;
                if depth == 0 {
                    let body: String = rest[open..k].chars().filter(|c| !c.is_whitespace()).collect();
                    return Some((inner, body, start + k + 1));
                }
            }
            _ => {}
        }
    }
    None
}

/// Whether an attribute body (whitespace removed) marks test-only code.
fn is_test_attribute(body: &str) -> bool {
    if body == "test" || body == "cfg(test)" {
        return true;
    }
    match body.strip_prefix("cfg(all(") {
        Some(args) => args.starts_with("test,") || args.contains(",test,") || args.contains(",test)"),
        None => false,
    }
}

/// Finds the end of the item that starts at `lines[line][col..]`: the line holding the `}`
/// that closes its first `{`, or the `;`/`,` that ends a brace-less item. Also returns the
/// module name if the item is `mod name;` or `mod name { .. }`.
fn item_end(lines: &[Stripped], line: usize, col: usize) -> (usize, Option<String>) {
    let mut depth = 0usize; // braces
    let mut nest = 0usize; // parens and brackets, outside braces
    let mut opened = false;
    let mut header = String::new();
    for (n, l) in lines.iter().enumerate().skip(line) {
        let text = if n == line { &l.code[col..] } else { &l.code[..] };
        for ch in text.chars() {
            if !opened {
                header.push(ch);
            }
            match ch {
                '{' => {
                    if !opened {
                        header.pop();
                    }
                    depth += 1;
                    opened = true;
                }
                '}' => {
                    if depth == 0 {
                        // The enclosing item closes: the attributed thing ended before.
                        return (n.saturating_sub(1).max(line), None);
                    }
                    depth -= 1;
                    if depth == 0 {
                        return (n, module_name(&header));
                    }
                }
                '(' | '[' if !opened => nest += 1,
                ')' | ']' if !opened => nest = nest.saturating_sub(1),
                ';' | ',' if !opened && nest == 0 => {
                    header.pop();
                    return (n, module_name(&header));
                }
                _ => {}
            }
        }
        if !opened {
            header.push(' ');
        }
    }
    (lines.len().saturating_sub(1), None)
}

/// `mod name` at the end of an item header (after any attributes and visibility).
fn module_name(header: &str) -> Option<String> {
    let words: Vec<&str> = header.split(|c: char| !is_ident(c)).filter(|w| !w.is_empty()).collect();
    let k = words.iter().rposition(|w| *w == "mod")?;
    words.get(k + 1).map(|w| w.to_string())
}

/// Which stripped lines are test code.
/// Returns (per line: is test code, `#[cfg(test)] mod name;` names, whole file is test code).
/// Code only the microvisor's `trace`, `counts` or `counts-periodic` feature compiles
/// (`#[cfg(feature = "trace")]` or a `cfg(all(..))` naming it: the wake-up trace for loop
/// runs, the exit counts for `bench blk` and `bench net --counts`) is left out the same way: it is never in the default build. (Stripped lines have literal contents masked, so the
/// feature's name is looked for in `raw`, the source's lines.)
fn test_lines(lines: &[Stripped], raw: &[&str]) -> (Vec<bool>, Vec<String>, bool) {
    let mut test = vec![false; lines.len()];
    let mut modules = Vec::new();
    let mut i = 0;
    let trace_only = |i: usize, body: &str| {
        let raw: String = raw.get(i).unwrap_or(&"").chars().filter(|c| !c.is_whitespace()).collect();
        (body.starts_with("cfg(feature=") || body.starts_with("cfg(all("))
            && ["trace", "counts", "counts-periodic"].iter().any(|f| raw.contains(&format!("feature=\"{f}\"")))
    };
    while i < lines.len() {
        match leading_attribute(&lines[i].code) {
            Some((true, body, _)) if body == "cfg(test)" => {
                return (vec![true; lines.len()], Vec::new(), true);
            }
            Some((false, body, end)) if is_test_attribute(&body) || trace_only(i, &body) => {
                let (last, module) = item_end(lines, i, end);
                for t in &mut test[i..=last] {
                    *t = true;
                }
                modules.extend(module);
                i = last + 1;
            }
            _ => i += 1,
        }
    }
    (test, modules, false)
}

/// Counts `unsafe` in stripped code (literal contents are already masked).
fn count_unsafe(code: &str) -> UnsafeCounts {
    let c: Vec<char> = code.chars().collect();
    let mut counts = UnsafeCounts::default();
    let skip_ws = |mut j: usize| {
        while j < c.len() && c[j].is_whitespace() {
            j += 1;
        }
        j
    };
    let word_at = |j: usize| -> String { c[j..].iter().take_while(|ch| is_ident(**ch)).collect() };
    let mut i = 0;
    while i < c.len() {
        if !is_ident(c[i]) {
            i += 1;
            continue;
        }
        let word = word_at(i);
        let start = i;
        i += word.chars().count();
        if word != "unsafe" {
            continue;
        }
        let mut j = skip_ws(i);
        match c.get(j) {
            Some('{') => counts.blocks += 1,
            Some('(') => {
                // An attribute: #[unsafe(naked)].
                let before: String = c[..start].iter().filter(|ch| !ch.is_whitespace()).collect();
                let after: String = c[j..].iter().take(16).filter(|ch| !ch.is_whitespace()).collect();
                if before.ends_with("#[") && after.starts_with("(naked)") {
                    counts.naked += 1;
                }
            }
            Some(_) => {
                let mut next = word_at(j);
                if next == "extern" {
                    j = skip_ws(j + next.len());
                    if c.get(j) == Some(&'"') {
                        j += 1;
                        while j < c.len() && c[j] != '"' {
                            j += 1;
                        }
                        j += 1;
                    }
                    j = skip_ws(j);
                    next = if j < c.len() { word_at(j) } else { String::new() };
                }
                match next.as_str() {
                    "fn" => counts.fns += 1,
                    "impl" => counts.impls += 1,
                    _ => {}
                }
            }
            None => {}
        }
    }
    counts
}

/// Per line: `Some(true)` inside an item only the VMX build compiles, `Some(false)` only
/// the SVM build. (The attribute is read from the raw line `src`: stripping masks the
/// string literal holding the feature's name.)
fn vendor_lines(src: &str, lines: &[Stripped]) -> Vec<Option<bool>> {
    let raw: Vec<&str> = src.lines().collect();
    let mut vendor = vec![None; lines.len()];
    let mut i = 0;
    while i < lines.len() {
        let attribute = if lines[i].has_code { raw.get(i).and_then(|l| leading_attribute(l)) } else { None };
        match attribute {
            Some((false, body, end)) if vendor_attribute(&body).is_some() => {
                let (last, _) = item_end(lines, i, end);
                for v in &mut vendor[i..=last] {
                    *v = vendor_attribute(&body);
                }
                i = last + 1;
            }
            _ => i += 1,
        }
    }
    vendor
}

/// Counts source lines and `unsafe` of one file; with `exclude_tests`, test code is left out.
pub fn analyze(src: &str, exclude_tests: bool) -> FileAnalysis {
    let lines = strip(src);
    let (test, test_modules, all_test) = if exclude_tests {
        test_lines(&lines, &src.split('\n').collect::<Vec<_>>())
    } else {
        (vec![false; lines.len()], Vec::new(), false)
    };
    let vendor = vendor_lines(src, &lines);
    let mut code = String::new();
    let (mut sloc, mut vmx_only, mut svm_only) = (0, 0, 0);
    for ((l, t), v) in lines.iter().zip(&test).zip(&vendor) {
        if *t {
            continue;
        }
        if l.has_code {
            sloc += 1;
            match v {
                Some(true) => vmx_only += 1,
                Some(false) => svm_only += 1,
                None => {}
            }
        }
        code.push_str(&l.code);
        code.push('\n');
    }
    FileAnalysis { sloc, unsafe_counts: count_unsafe(&code), all_test, test_modules, vmx_only, svm_only }
}

/// A part of the stack whose sources are counted.
#[derive(Clone, Debug)]
pub struct Component {
    /// Name as shown (and as the key in `tcb.json`).
    pub name: String,
    /// Source roots, relative to the workspace.
    pub roots: Vec<PathBuf>,
    /// Whether test code is left out (everything but the `tests` component).
    pub exclude_tests: bool,
}

/// What was counted for one component.
#[derive(Clone, Debug, Default)]
pub struct ComponentCount {
    /// Source lines.
    pub sloc: usize,
    /// Files that hold counted code.
    pub files: usize,
    /// `unsafe` outside test code.
    pub unsafe_counts: UnsafeCounts,
    /// Source lines per counted file (path relative to the workspace), for `--files`.
    pub per_file: Vec<(PathBuf, usize)>,
    /// Source lines of the microvisor's SVM build and VMX build (the files and items each
    /// compiles); for other components both are `sloc`.
    pub svm_build: usize,
    pub vmx_build: usize,
}

/// The components of the workspace: the microvisor, the shared crates, the domains, every
/// crate under `driver-vms/` and `guests/` (if any), the host tools and the end-to-end tests.
pub fn components(root: &Path) -> Vec<Component> {
    let mut names: Vec<String> =
        ["microvisor", "pvh", "ipc-spec", "domain-rt", "dom0", "domains"].iter().map(|s| s.to_string()).collect();
    for group in ["driver-vms", "guests"] {
        if let Ok(dir) = std::fs::read_dir(root.join(group)) {
            let mut crates: Vec<String> = dir
                .filter_map(Result::ok)
                .filter(|e| e.path().join("Cargo.toml").is_file())
                .map(|e| format!("{group}/{}", e.file_name().to_string_lossy()))
                .collect();
            crates.sort();
            names.extend(crates);
        }
    }
    names.push("xtask".into());
    let mut list: Vec<Component> = names
        .into_iter()
        .map(|name| Component { roots: vec![PathBuf::from(&name).join("src")], name, exclude_tests: true })
        .collect();
    list.push(Component {
        name: "tests".into(),
        roots: vec!["tests/src".into(), "tests/tests".into()],
        exclude_tests: false,
    });
    list
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let path = e.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// The directory holding the child modules of the module in `file`.
fn module_dir(file: &Path) -> PathBuf {
    let parent = file.parent().unwrap_or(Path::new("")).to_path_buf();
    match file.file_stem().and_then(|s| s.to_str()) {
        Some("mod") | Some("lib") | Some("main") => parent,
        Some(stem) => parent.join(stem),
        None => parent,
    }
}

/// Counts one component's sources under the workspace `root`.
pub fn count_component(root: &Path, component: &Component) -> Result<ComponentCount, String> {
    let mut files = Vec::new();
    for r in &component.roots {
        rust_files(&root.join(r), &mut files);
    }
    files.sort();
    let mut analyses = Vec::new();
    let mut excluded: Vec<PathBuf> = Vec::new();
    for f in files {
        let src = std::fs::read_to_string(&f).map_err(|e| format!("reading {}: {e}", f.display()))?;
        let a = analyze(&src, component.exclude_tests);
        let dir = module_dir(&f);
        for m in &a.test_modules {
            excluded.push(dir.join(format!("{m}.rs")));
            excluded.push(dir.join(m));
        }
        analyses.push((f, a));
    }
    let mut count = ComponentCount::default();
    for (f, a) in analyses {
        if a.all_test || excluded.iter().any(|x| f.starts_with(x)) {
            continue;
        }
        count.sloc += a.sloc;
        let rel = f.strip_prefix(root).unwrap_or(&f).to_string_lossy().replace('\\', "/");
        let only = |list: &[&str]| list.iter().any(|p| if p.ends_with('/') { rel.starts_with(p) } else { rel == *p });
        if !only(VMX_ONLY) {
            count.svm_build += a.sloc - a.vmx_only;
        }
        if !only(SVM_ONLY) {
            count.vmx_build += a.sloc - a.svm_only;
        }
        count.files += 1;
        count.unsafe_counts += a.unsafe_counts;
        count.per_file.push((f.strip_prefix(root).unwrap_or(&f).to_path_buf(), a.sloc));
    }
    Ok(count)
}

/// The loaded size of an ELF image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImageSize {
    /// Sum of `p_filesz` over the `PT_LOAD` segments: the code and data that are loaded.
    pub file_bytes: u64,
    /// Sum of `p_memsz`: the memory footprint, with `.bss` and stacks.
    pub memory_bytes: u64,
    /// Number of `PT_LOAD` segments.
    pub segments: usize,
    /// `p_filesz` of executable segments.
    pub code_bytes: u64,
    /// `p_filesz` of read-only, non-executable segments.
    pub rodata_bytes: u64,
    /// `p_filesz` of writable segments.
    pub data_bytes: u64,
}

/// Measures an ELF image with the same parser the microvisor loads domains with.
pub fn image_size(elf: &[u8]) -> Result<ImageSize, String> {
    let image = pvh::elf::ElfImage::parse(elf).map_err(|e| e.to_string())?;
    let mut s = ImageSize::default();
    for seg in image.segments() {
        s.segments += 1;
        s.file_bytes += seg.file_size;
        s.memory_bytes += seg.mem_size;
        if seg.flags.execute {
            s.code_bytes += seg.file_size;
        } else if seg.flags.write {
            s.data_bytes += seg.file_size;
        } else {
            s.rodata_bytes += seg.file_size;
        }
    }
    Ok(s)
}

/// Parses `cargo tree --prefix none` output into deduplicated, sorted "name version" entries,
/// leaving out workspace crates (those with a path) and proc macros (not linked).
pub fn parse_cargo_tree(out: &str) -> Vec<String> {
    let mut set = BTreeSet::new();
    for line in out.lines() {
        if line.contains("(/") || line.contains("(proc-macro)") {
            continue;
        }
        let mut w = line.split_whitespace();
        if let (Some(name), Some(version)) = (w.next(), w.next()) {
            set.insert(format!("{name} {}", version.trim_start_matches('v')));
        }
    }
    set.into_iter().collect()
}

/// The third-party crates linked into the microvisor, from `cargo tree`.
fn third_party_linked() -> Result<Vec<String>, String> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .args([
            "tree",
            "-p",
            "microvisor",
            "--target",
            BARE_METAL_TARGET,
            "-e",
            "normal,no-proc-macro",
            "--prefix",
            "none",
        ])
        .output()
        .map_err(|e| format!("could not run cargo tree: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo tree failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(parse_cargo_tree(&String::from_utf8_lossy(&out.stdout)))
}

/// Everything `cargo xtask tcb` reports.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// (component name, count), in display order.
    pub components: Vec<(String, ComponentCount)>,
    /// The microvisor's source lines in its SVM build (the default one).
    pub microvisor_sloc: usize,
    /// The microvisor's source lines in its VMX build.
    pub microvisor_vmx_sloc: usize,
    /// The microvisor plus the modules of the shared crates linked into it.
    pub microvisor_tcb_sloc: usize,
    /// Files counted in `microvisor_tcb_sloc`.
    pub microvisor_tcb_files: usize,
    /// `unsafe` in the microvisor crate.
    pub microvisor_unsafe: UnsafeCounts,
    /// `unsafe` in the shared crates linked into the microvisor.
    pub shared_unsafe: UnsafeCounts,
    /// The microvisor image.
    pub image: ImageSize,
    /// Where the image was read from.
    pub image_path: PathBuf,
    /// Third-party crates linked into the microvisor ("name version"), not counted.
    pub third_party: Vec<String>,
    /// Why the third-party list is missing, if it is.
    pub third_party_error: Option<String>,
}

impl Report {
    fn get(&self, name: &str) -> ComponentCount {
        self.components.iter().find(|(n, _)| n == name).map(|(_, c)| c.clone()).unwrap_or_default()
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (k, ch) in s.chars().enumerate() {
        if k > 0 && (s.len() - k).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The human-readable report.
pub fn render(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Rust source lines (non-blank, non-comment; #[cfg(test)] code, tests/ dirs and build scripts left out)\n"
    );
    let _ = writeln!(o, "  {:<24} {:>7} {:>6}", "component", "SLOC", "files");
    let tcb_files = r.microvisor_tcb_files;
    for (name, c) in &r.components {
        let note = match name.as_str() {
            "microvisor" => "  trusted core: the only code in root mode",
            "pvh" => "  linked into the microvisor: counted whole in its TCB",
            "ipc-spec" => "  linked into the microvisor: its TCB counts the modules it compiles (no `channels`)",
            "tests" => "  end-to-end tests, counted whole",
            _ => "",
        };
        let _ = writeln!(o, "  {:<24} {:>7} {:>6}{note}", name, thousands(c.sloc as u64), c.files);
        if name == LINKED_SHARED_CRATES[LINKED_SHARED_CRATES.len() - 1] {
            let _ = writeln!(
                o,
                "  {:<24} {:>7} {:>6}  microvisor + what it links of {}",
                "= microvisor TCB",
                thousands(r.microvisor_tcb_sloc as u64),
                tcb_files,
                LINKED_SHARED_CRATES.join(" + ")
            );
        }
    }
    let total: usize = r.components.iter().map(|(_, c)| c.sloc).sum();
    let total_files: usize = r.components.iter().map(|(_, c)| c.files).sum();
    let _ = writeln!(o, "  {:<24} {:>7} {:>6}", "all components", thousands(total as u64), total_files);

    let _ = writeln!(o, "\nunsafe in non-test code");
    let _ = writeln!(o, "  {:<24} {:>7} {:>6} {:>6} {:>17}", "", "blocks", "fns", "impls", "#[unsafe(naked)]");
    for (name, u) in [("microvisor", r.microvisor_unsafe), (&*LINKED_SHARED_CRATES.join(" + "), r.shared_unsafe)] {
        let _ = writeln!(o, "  {:<24} {:>7} {:>6} {:>6} {:>17}", name, u.blocks, u.fns, u.impls, u.naked);
    }

    let i = &r.image;
    let _ = writeln!(o, "\nmicrovisor image ({})", r.image_path.display());
    let _ = writeln!(
        o,
        "  loaded:    {:>9} bytes in {} PT_LOAD segments (code {}, read-only data {}, data {})",
        thousands(i.file_bytes),
        i.segments,
        thousands(i.code_bytes),
        thousands(i.rodata_bytes),
        thousands(i.data_bytes)
    );
    let _ = writeln!(o, "  in memory: {:>9} bytes (with .bss and stacks)", thousands(i.memory_bytes));

    let _ = writeln!(o, "\nnot counted above: third-party crates linked into the microvisor");
    match &r.third_party_error {
        Some(e) => {
            let _ = writeln!(o, "  (unknown: {e})");
        }
        None => {
            let _ = writeln!(o, "  {}", r.third_party.join(", "));
        }
    }

    let _ = writeln!(o, "\ntrusted kernel size beside the reference points (ARCHITECTURE.md §4)");
    let mv = r.microvisor_sloc as u64;
    let ours = format!(
        "{} SLOC Rust (microvisor {} + {} {}; third-party crates not counted)",
        thousands(r.microvisor_tcb_sloc as u64),
        thousands(mv),
        LINKED_SHARED_CRATES.join(" + "),
        thousands(r.microvisor_tcb_sloc as u64 - mv)
    );
    let _ = writeln!(o, "  {:<22} {ours}", "this microvisor");
    for (system, size) in REFERENCE_POINTS {
        let _ = writeln!(o, "  {system:<22} {size}");
    }
    let _ = writeln!(o, "\nbudget per build (each compiles one vendor backend)");
    for (build, sloc, limit) in
        [("SVM", r.microvisor_sloc, MICROVISOR_SLOC_LIMIT), ("VMX", r.microvisor_vmx_sloc, VMX_BUILD_SLOC_LIMIT)]
    {
        let verdict = if sloc < limit { "OK" } else { "OVER" };
        let _ = writeln!(
            o,
            "  microvisor, {build} build: {} of {} SLOC: {verdict}",
            thousands(sloc as u64),
            thousands(limit as u64)
        );
    }
    o
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_unsafe(u: &UnsafeCounts) -> String {
    format!("{{\"blocks\": {}, \"fns\": {}, \"impls\": {}, \"naked\": {}}}", u.blocks, u.fns, u.impls, u.naked)
}

/// The report as JSON (`tcb.json`).
pub fn to_json(r: &Report) -> String {
    let mut o = String::from("{\n");
    let mut field = |k: &str, v: String| {
        let _ = writeln!(o, "  {}: {v},", json_str(k));
    };
    field("microvisor_sloc", r.microvisor_sloc.to_string());
    field("microvisor_sloc_limit", MICROVISOR_SLOC_LIMIT.to_string());
    field("microvisor_vmx_sloc", r.microvisor_vmx_sloc.to_string());
    field("microvisor_vmx_sloc_limit", VMX_BUILD_SLOC_LIMIT.to_string());
    field("microvisor_tcb_sloc", r.microvisor_tcb_sloc.to_string());
    field(
        "microvisor_tcb_crates",
        format!(
            "[{}]",
            std::iter::once("microvisor")
                .chain(LINKED_SHARED_CRATES.iter().copied())
                .map(json_str)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    field("microvisor_unsafe_blocks", r.microvisor_unsafe.blocks.to_string());
    field("microvisor_unsafe_fns", r.microvisor_unsafe.fns.to_string());
    field("microvisor_unsafe_impls", r.microvisor_unsafe.impls.to_string());
    field("microvisor_naked_fns", r.microvisor_unsafe.naked.to_string());
    field("shared_unsafe", json_unsafe(&r.shared_unsafe));
    field("microvisor_image_bytes", r.image.file_bytes.to_string());
    field("microvisor_memory_bytes", r.image.memory_bytes.to_string());
    field(
        "microvisor_image",
        format!(
            "{{\"segments\": {}, \"code_bytes\": {}, \"rodata_bytes\": {}, \"data_bytes\": {}}}",
            r.image.segments, r.image.code_bytes, r.image.rodata_bytes, r.image.data_bytes
        ),
    );
    let comps: Vec<String> = r
        .components
        .iter()
        .map(|(n, c)| format!("    {}: {{\"sloc\": {}, \"files\": {}}}", json_str(n), c.sloc, c.files))
        .collect();
    field("components", format!("{{\n{}\n  }}", comps.join(",\n")));
    let tp: Vec<String> = r.third_party.iter().map(|s| json_str(s)).collect();
    let _ = writeln!(o, "  \"third_party_linked\": [{}]", tp.join(", "));
    o.push_str("}\n");
    o
}

/// Counts every component under `root` (no build).
pub fn count_sources(root: &Path) -> Result<Report, String> {
    let mut r = Report::default();
    for c in components(root) {
        let count = count_component(root, &c)?;
        r.components.push((c.name, count));
    }
    let mv = r.get("microvisor");
    r.microvisor_sloc = mv.svm_build;
    r.microvisor_vmx_sloc = mv.vmx_build;
    r.microvisor_unsafe = mv.unsafe_counts;
    r.microvisor_tcb_sloc = mv.svm_build;
    r.microvisor_tcb_files = mv.files;
    for n in LINKED_SHARED_CRATES {
        for (path, sloc) in r.get(n).per_file {
            if NOT_LINKED.iter().any(|x| path == Path::new(x)) {
                continue;
            }
            let src =
                std::fs::read_to_string(root.join(&path)).map_err(|e| format!("reading {}: {e}", path.display()))?;
            r.microvisor_tcb_sloc += sloc;
            r.microvisor_tcb_files += 1;
            r.shared_unsafe += analyze(&src, true).unsafe_counts;
        }
    }
    Ok(r)
}

/// The files of one component, largest first: where the lines are.
pub fn render_files(r: &Report, component: &str) -> String {
    let mut files = r.get(component).per_file.clone();
    files.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut o = format!("{component}: source lines per file\n");
    for (path, sloc) in files {
        o.push_str(&format!("  {:>6}  {}\n", thousands(sloc as u64), path.display()));
    }
    o
}

/// `cargo xtask tcb`: count, build, measure, print, write `<target dir>/tcb.json`. Fails if
/// the microvisor is over [`MICROVISOR_SLOC_LIMIT`] (after writing the report).
pub fn run(args: &[String]) -> Result<(), String> {
    let mut list_files = false;
    for a in args {
        match a.as_str() {
            "--files" => list_files = true,
            _ => return Err(format!("tcb: unknown option `{a}` (the only option is --files)")),
        }
    }
    let root = workspace_root();
    let mut report = count_sources(&root)?;
    if list_files {
        print!("{}", render_files(&report, "microvisor"));
    }
    let target_dir = crate::build::default_target_dir();
    let artifacts = crate::build::build(&target_dir, &crate::manifest::default_stack_path())?;
    let elf =
        std::fs::read(&artifacts.microvisor).map_err(|e| format!("reading {}: {e}", artifacts.microvisor.display()))?;
    report.image = image_size(&elf).map_err(|e| format!("parsing {}: {e}", artifacts.microvisor.display()))?;
    report.image_path = artifacts.microvisor.clone();
    match third_party_linked() {
        Ok(list) => report.third_party = list,
        Err(e) => report.third_party_error = Some(e),
    }
    print!("\n{}", render(&report));
    std::fs::create_dir_all(&target_dir).map_err(|e| format!("creating {}: {e}", target_dir.display()))?;
    let json_path = target_dir.join("tcb.json");
    std::fs::write(&json_path, to_json(&report)).map_err(|e| format!("writing {}: {e}", json_path.display()))?;
    println!("tcb: wrote {}", json_path.display());
    if report.microvisor_sloc >= MICROVISOR_SLOC_LIMIT {
        return Err(format!(
            "the microvisor's SVM build has {} SLOC, at or over its limit of {MICROVISOR_SLOC_LIMIT}",
            report.microvisor_sloc
        ));
    }
    if report.microvisor_vmx_sloc >= VMX_BUILD_SLOC_LIMIT {
        return Err(format!(
            "the microvisor's VMX build has {} SLOC, at or over its limit of {VMX_BUILD_SLOC_LIMIT}",
            report.microvisor_vmx_sloc
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sloc(src: &str) -> usize {
        analyze(src, true).sloc
    }

    #[test]
    fn blank_lines_do_not_count() {
        assert_eq!(sloc("\n\n   \n\t\nfn a() {}\n\n"), 1);
        assert_eq!(sloc(""), 0);
    }

    #[test]
    fn line_and_doc_comments_do_not_count() {
        let src = "//! crate docs\n/// item docs\n// plain\n    // indented\nfn a() {} // trailing\n";
        assert_eq!(sloc(src), 1);
    }

    #[test]
    fn block_comments_do_not_count() {
        let src = "/* one line */\n/*\n * many\n * lines\n */\nfn a() {}\n/** doc block */\n";
        assert_eq!(sloc(src), 1);
        // A code line that opens a block comment counts; the comment's lines do not; code after
        // the close on the same line counts.
        let src = "let x = 1; /* starts here\n still comment\n ends */ let y = 2;\n/* a */ /* b */\n";
        assert_eq!(sloc(src), 2);
        // Nested block comments.
        assert_eq!(sloc("/* outer /* inner */ still outer */\nfn a() {}\n"), 1);
    }

    #[test]
    fn comment_markers_in_strings_are_code() {
        let src = "let url = \"http://example\";\nlet s = \"/* not a comment\";\nlet t = 1;\n";
        assert_eq!(sloc(src), 3);
    }

    #[test]
    fn multi_line_strings_and_asm_are_code() {
        let src = "core::arch::global_asm!(\n    \".code32\",\n    \"mov eax, 1\",  // comment\n);\nlet s = \"line one\n  line two\";\nlet r = r#\"raw {\n\"#;\n";
        assert_eq!(sloc(src), 8);
    }

    #[test]
    fn test_module_is_excluded_with_nested_braces() {
        let src = "fn a() {}\n\n#[cfg(test)]\nmod tests {\n    use super::*;\n    #[test]\n    fn t() {\n        if true { let v = vec![1]; }\n        let s = \"}\"; let c = '}';\n    }\n}\n";
        assert_eq!(sloc(src), 1);
    }

    #[test]
    fn code_after_the_test_module_counts() {
        let src = "fn a() {}\n#[cfg(test)]\npub(crate) mod tests {\n    fn t() { '{'; \"{{\"; }\n}\nfn b() {\n}\n";
        assert_eq!(sloc(src), 3);
    }

    #[test]
    fn other_test_items_are_excluded() {
        let src = "#[cfg(all(test, not(feature = \"alloc\")))]\nextern crate alloc;\n#[cfg(test)] use std::{a,\n b};\nfn a() {}\n#[cfg(test)]\nmod helpers;\n";
        let a = analyze(src, true);
        assert_eq!(a.sloc, 1);
        assert_eq!(a.test_modules, vec!["helpers".to_string()]);
        // The trace feature's code is not in the default build.
        assert_eq!(sloc("#[cfg(feature = \"trace\")]\ncrate::trace::tick(k);\nfn a() {}\n"), 1);
        assert_eq!(sloc("#[cfg(all(target_os = \"none\", feature = \"trace\"))]\nmod trace;\n"), 0);
        assert_eq!(sloc("#[cfg(feature = \"counts\")]\nfn count() {\n    x += 1;\n}\nfn a() {}\n"), 1);
        assert_eq!(sloc("#[cfg(feature = \"alloc\")]\nfn a() {}\n"), 2);
        // cfg(any(test, ..)) is not test-only.
        assert_eq!(sloc("#[cfg(any(test, feature = \"alloc\"))]\nfn a() {}\n"), 2);
        // A whole-file test module.
        assert!(analyze("#![cfg(test)]\nfn a() {}\n", true).all_test);
        // Without exclusion (the tests component) test code counts.
        assert_eq!(analyze("#[cfg(test)]\nmod t {\n}\n", false).sloc, 3);
    }

    #[test]
    fn lifetimes_are_not_char_literals() {
        let src = "fn f<'a>(x: &'a str) -> &'a str {\n    x\n}\n#[cfg(test)]\nmod tests {\n    fn g<'b>(_: &'b u8) { }\n}\nfn h() {}\n";
        assert_eq!(sloc(src), 4);
    }

    #[test]
    fn unsafe_is_counted_outside_tests_only() {
        let src = "pub unsafe fn f() {}\nunsafe extern \"C\" fn g() {}\nunsafe impl Send for X {}\n\
                   #[unsafe(naked)]\nextern \"C\" fn n() {}\nfn h() {\n    unsafe { f() };\n    let _ = unsafe{ 1 };\n    // unsafe { in a comment }\n    let s = \"unsafe { in a string }\";\n    let is_unsafe = 1;\n}\n\
                   #[cfg(test)]\nmod tests {\n    fn t() { unsafe { super::f() } }\n}\n";
        let u = analyze(src, true).unsafe_counts;
        assert_eq!(u, UnsafeCounts { blocks: 2, fns: 2, impls: 1, naked: 1 });
        // A block whose brace is on the next line.
        assert_eq!(analyze("let x = unsafe\n{ 1 };\n", true).unsafe_counts.blocks, 1);
    }

    #[test]
    fn cargo_tree_output_is_deduplicated() {
        let out = "microvisor v0.1.0 (/w/microvisor)\nacpi v5.2.0\nbitflags v2.13.2\nbitflags v2.13.2\npvh v0.1.0 (/w/pvh)\nheapless v0.9.3 (*)\nheapless v0.9.3\nconst_fn v0.4.12 (proc-macro)\n";
        assert_eq!(parse_cargo_tree(out), vec!["acpi 5.2.0", "bitflags 2.13.2", "heapless 0.9.3"]);
    }

    #[test]
    fn vendor_items_are_counted_per_build() {
        let src = "fn a() {}\n#[cfg(feature = \"vmx\")]\nfn v() {\n    1;\n}\n#[cfg(not(feature = \"vmx\"))]\nlet s = f(\n    1,\n);\n#[cfg(any(test, feature = \"vmx\"))]\npub mod vmx;\n";
        let a = analyze(src, true);
        assert_eq!((a.sloc, a.vmx_only, a.svm_only), (11, 6, 4));
        let r = count_sources(&workspace_root()).unwrap();
        let mv = r.get("microvisor");
        assert!(
            r.microvisor_sloc < mv.sloc && r.microvisor_vmx_sloc < mv.sloc,
            "each build leaves the other vendor out"
        );
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn the_workspace_counts_are_plausible() {
        let r = count_sources(&workspace_root()).unwrap();
        assert!(r.microvisor_sloc > 500, "{r:?}");
        assert!(r.microvisor_tcb_sloc > r.microvisor_sloc);
        // Only what the microvisor links: less than the crates whole.
        let whole: usize = LINKED_SHARED_CRATES.iter().map(|n| r.get(n).sloc).sum();
        assert!(r.microvisor_tcb_sloc < r.microvisor_sloc + whole, "{r:?}");
        for f in NOT_LINKED {
            assert!(workspace_root().join(f).is_file(), "{f} is listed as not linked but does not exist");
        }
        assert!(r.microvisor_unsafe.blocks > 0);
    }

    /// The size budget is part of the test suite, so a change that grows the trusted core past
    /// it fails `cargo xtask test`, not only `cargo xtask tcb`.
    #[test]
    fn the_microvisor_is_within_its_budget() {
        let r = count_sources(&workspace_root()).unwrap();
        assert!(
            r.microvisor_sloc < MICROVISOR_SLOC_LIMIT,
            "the microvisor's SVM build has {} SLOC, at or over its limit of {MICROVISOR_SLOC_LIMIT}: \
             see `cargo xtask tcb --files` for where the lines are",
            r.microvisor_sloc
        );
        assert!(
            r.microvisor_vmx_sloc < VMX_BUILD_SLOC_LIMIT,
            "the microvisor's VMX build has {} SLOC, at or over its limit of {VMX_BUILD_SLOC_LIMIT}",
            r.microvisor_vmx_sloc
        );
    }

    #[test]
    fn files_are_listed_largest_first() {
        let r = count_sources(&workspace_root()).unwrap();
        let listing = render_files(&r, "microvisor");
        let sizes: Vec<usize> = listing
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().next().unwrap().replace(',', "").parse().unwrap())
            .collect();
        assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{listing}");
        assert_eq!(sizes.iter().sum::<usize>(), r.get("microvisor").sloc);
    }
}

//! Running the stack's GRUB ISO in Bochs, an emulator of Intel CPUs with VMX (EPT, VPID,
//! unrestricted guest), headless, with COM1 captured line by line.
//!
//! What makes Debian's Bochs 2.7 run unattended (see ARCHITECTURE.md section 6): it is built
//! with its debugger, so it is started with `-rc FILE` where FILE holds `c` (continue);
//! `display_library: term` (from `bochs-term`) with standard input from /dev/null stands in
//! for the missing `nogui`; dummy sound drivers and no speaker avoid an ALSA crash; COM1 goes
//! to a file that is followed while Bochs runs; `clock: sync=none` makes emulated time follow
//! the instructions executed, so a run does not depend on the host's load. Bochs ends when
//! the microvisor writes "Shutdown" to port 0x8900 (`MachineExit` codes do not reach Bochs's
//! exit status: the outcome is read from the console).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::qemu::{Ending, Run};
use crate::setup::{BOCHS, BOCHS_BIOS, BOCHS_VGABIOS};

/// A CPU model with VMX, EPT, VPID and unrestricted guest (`bochs --help cpu` lists them).
pub const DEFAULT_CPU_MODEL: &str = "corei7_skylake_x";

/// Instructions per emulated second. With `clock: sync=none` this sets how many
/// instructions the BIOS's timed waits (disk detection) cost: at 50 M the BIOS alone ran
/// 160 M instructions before the boot sector, at 10 M 35 M; a 1 ms timer tick is still
/// 10,000 instructions.
pub const IPS: u32 = 10_000_000;

/// One Bochs machine: a PC (i440FX, no IOMMU, no PCIe) booting an ISO from its CD drive.
#[derive(Clone, Debug)]
pub struct BochsMachine {
    pub iso: PathBuf,
    pub cpu_model: String,
    pub memory_mib: u32,
    /// Where the bochsrc, the COM1 capture and Bochs's log go.
    pub dir: PathBuf,
}

impl BochsMachine {
    pub fn new(iso: &Path, dir: &Path) -> Self {
        Self { iso: iso.to_path_buf(), cpu_model: DEFAULT_CPU_MODEL.into(), memory_mib: 256, dir: dir.to_path_buf() }
    }

    pub fn bochsrc_path(&self) -> PathBuf {
        self.dir.join("bochsrc")
    }

    pub fn com1_path(&self) -> PathBuf {
        self.dir.join("com1.txt")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("bochs.log")
    }

    fn rc_path(&self) -> PathBuf {
        self.dir.join("continue.rc")
    }

    /// The configuration file's text.
    pub fn bochsrc(&self) -> String {
        format!(
            "# Written by cargo xtask (xtask/src/bochs.rs).
megs: {mem}
cpu: model={cpu}, count=1, ips={ips}, reset_on_triple_fault=0
romimage: file={bios}
vgaromimage: file={vgabios}
display_library: term
ata0-master: type=cdrom, path={iso}, status=inserted
boot: cdrom
com1: enabled=1, mode=file, dev={com1}
sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy
speaker: enabled=0
clock: sync=none, time0=utc
log: {log}
panic: action=fatal
error: action=report
info: action=report
",
            mem = self.memory_mib,
            ips = IPS,
            cpu = self.cpu_model,
            bios = BOCHS_BIOS,
            vgabios = BOCHS_VGABIOS,
            iso = self.iso.display(),
            com1 = self.com1_path().display(),
            log = self.log_path().display(),
        )
    }

    /// Write the bochsrc and the debugger's command file; returns the command to start Bochs.
    pub fn prepare(&self) -> Result<Command, String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("creating {}: {e}", self.dir.display()))?;
        std::fs::write(self.bochsrc_path(), self.bochsrc()).map_err(|e| format!("writing the bochsrc: {e}"))?;
        // Debian's Bochs has its debugger built in: without this it waits at `<bochs:1>`.
        std::fs::write(self.rc_path(), "c\n").map_err(|e| format!("writing the debugger commands: {e}"))?;
        for f in [self.com1_path(), self.log_path()] {
            let _ = std::fs::remove_file(f);
        }
        let mut c = Command::new(BOCHS);
        c.arg("-q").arg("-f").arg(self.bochsrc_path()).arg("-rc").arg(self.rc_path());
        Ok(c)
    }

    /// The command line as a shell would show it.
    pub fn display_command(&self) -> String {
        format!("{BOCHS} -q -f {} -rc {} < /dev/null", self.bochsrc_path().display(), self.rc_path().display())
    }
}

/// Drop terminal escape sequences (GRUB clears the screen on the serial console) and the
/// carriage returns of the serial line discipline.
pub fn clean_line(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC '[' parameters, then one final byte in '@'..='~'.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// Run `machine`, echoing console lines when `echo`, until Bochs exits, `stop_when` returns
/// true for the lines so far (Bochs is then killed), or `timeout` passes. `Run::stderr`
/// holds the end of Bochs's log.
pub fn run_captured(
    machine: &BochsMachine,
    timeout: Duration,
    echo: bool,
    mut stop_when: impl FnMut(&[String]) -> bool,
) -> Result<Run, String> {
    crate::setup::ensure_bochs()?;
    let mut cmd = machine.prepare()?;
    // The term display draws the VGA screen on standard output: keep it out of the way.
    let screen =
        std::fs::File::create(machine.dir.join("screen.txt")).map_err(|e| format!("creating screen.txt: {e}"))?;
    cmd.stdin(Stdio::null()).stdout(screen).stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("could not start {BOCHS}: {e}"))?;
    let mut lines: Vec<String> = Vec::new();
    let mut consumed = 0usize;
    let mut take_lines = |lines: &mut Vec<String>, all: bool| -> bool {
        let Ok(bytes) = std::fs::read(machine.com1_path()) else { return false };
        while let Some(rest) = bytes.get(consumed..).filter(|r| !r.is_empty()) {
            let (raw, advance) = match rest.iter().position(|&b| b == b'\n') {
                Some(nl) => (&rest[..nl], nl + 1),
                None if all => (rest, rest.len()),
                None => break,
            };
            consumed += advance;
            let line = clean_line(&String::from_utf8_lossy(raw));
            if line.trim().is_empty() {
                continue;
            }
            if echo {
                println!("{line}");
            }
            lines.push(line);
            if stop_when(lines) {
                return true;
            }
        }
        false
    };
    let ending = loop {
        if take_lines(&mut lines, false) {
            let _ = child.kill();
            break Ending::Stopped;
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                let stopped = take_lines(&mut lines, true);
                break if stopped { Ending::Stopped } else { Ending::Exited(status.code()) };
            }
            Ok(None) => {}
            Err(e) => return Err(format!("waiting for Bochs: {e}")),
        }
        if start.elapsed() >= timeout {
            let _ = child.kill();
            take_lines(&mut lines, true);
            break Ending::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.wait();
    let log = std::fs::read_to_string(machine.log_path()).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(15).collect();
    let stderr = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
    Ok(Run { lines, ending, elapsed: start.elapsed(), stderr })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bochsrc_has_what_a_headless_vmx_run_needs() {
        let m = BochsMachine::new(Path::new("/x/stack.iso"), Path::new("/w"));
        let rc = m.bochsrc();
        for want in [
            "megs: 256\n",
            "cpu: model=corei7_skylake_x,",
            "display_library: term\n",
            "ata0-master: type=cdrom, path=/x/stack.iso, status=inserted\n",
            "boot: cdrom\n",
            "com1: enabled=1, mode=file, dev=/w/com1.txt\n",
            "sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy\n",
            "speaker: enabled=0\n",
            "clock: sync=none",
        ] {
            assert!(rc.contains(want), "bochsrc lacks {want:?}:\n{rc}");
        }
        assert!(m.display_command().contains("-rc /w/continue.rc"));
    }

    #[test]
    fn escape_sequences_and_carriage_returns_are_dropped() {
        assert_eq!(clean_line("\u{1b}[H\u{1b}[J\u{1b}[1;1H  Booting `microvisor'\r"), "  Booting `microvisor'");
        assert_eq!(clean_line("\r[microvisor] ok\r"), "[microvisor] ok");
        assert_eq!(clean_line("plain"), "plain");
        assert_eq!(clean_line("\u{1b}"), "");
    }
}

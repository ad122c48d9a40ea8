//! Starting QEMU on the stack, interactively or with the console captured line by line.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ipc_spec::machine_exit::MachineExit;

use crate::build::Artifacts;
use crate::setup::QEMU;

/// The CPU model with the features the microvisor needs.
pub const DEFAULT_CPU: &str = "qemu64,+svm,+npt";

/// One QEMU machine configuration.
#[derive(Clone, Debug)]
pub struct Machine {
    pub kernel: PathBuf,
    /// The boot bundle; `None` boots without `-initrd`.
    pub initrd: Option<PathBuf>,
    /// Boot this GRUB ISO (`cargo xtask iso`) from the CD drive instead of `kernel` and
    /// `initrd` by PVH; the command line is then the ISO's (`append` is not used).
    pub cdrom: Option<PathBuf>,
    pub cpu: String,
    pub memory_mib: u32,
    pub iommu: bool,
    /// The microvisor's command line (`-append`).
    pub append: String,
    /// Wait for a debugger on tcp::1234 before starting.
    pub gdb: bool,
    /// Further QEMU arguments (e.g. `-icount`).
    pub extra: Vec<String>,
    /// Raw disk images, each behind a virtio-blk-pci device (behind the IOMMU).
    pub disks: Vec<PathBuf>,
    /// One virtio-net-pci device (behind the IOMMU) per entry, on QEMU user networking,
    /// with host port `127.0.0.1:<entry>` forwarded to the guests' port 80.
    pub net_ports: Vec<u16>,
    /// More forwards on the first network device: host port `127.0.0.1:<port>` to port 80
    /// of the guest at `<address>` (for stacks with several guests behind one NIC).
    pub net_forwards: Vec<(u16, String)>,
    /// More forwards on the first network device: host port `127.0.0.1:<.0>` to port `<.1>`
    /// of the guest at 10.0.2.15 (`cargo xtask bench linux-io`'s TCP transfers).
    pub net_port_forwards: Vec<(u16, u16)>,
    /// Missing disk images are made as ext4 file systems (the Linux guest's), not zeros.
    pub disk_ext4: bool,
    /// dom0's host control interface (`[machine] control`): a virtio console whose other
    /// end is a unix socket at this path (`cargo xtask ctl`).
    pub ctl: Option<PathBuf>,
    /// Put each virtio-blk and virtio-net function behind a `pcie-root-port` of its own
    /// (on secondary buses, not on bus 0): QEMU then makes it a PCIe endpoint with a PCIe
    /// capability offering function-level reset (virtio-pci's `x-pcie-flr-init`), as
    /// hardware functions have, so the microvisor's FLR path on release runs.
    pub root_ports: bool,
}

/// The host port forwarded to port 80 of the first network device (`cargo xtask run --port`).
pub const DEFAULT_NET_PORT: u16 = 8080;

/// A TCP port on 127.0.0.1 that is free now (the system picks it), for a forwarding that
/// must not clash with another QEMU (tests run in parallel). The system may pick a port it
/// picked a moment ago (it is free again once the probe closes), so ports already handed
/// out by this process are never handed out again.
pub fn free_port() -> Result<u16, String> {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for _ in 0..100 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a free port: {e}"))?;
        let port = listener.local_addr().map(|a| a.port()).map_err(|e| format!("finding a free port: {e}"))?;
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return Ok(port);
        }
    }
    Err("finding a free port: the system keeps offering ports already in use by this run".into())
}

impl Machine {
    pub fn new(artifacts: &Artifacts) -> Self {
        Self {
            kernel: artifacts.microvisor.clone(),
            initrd: Some(artifacts.bundle.clone()),
            cdrom: None,
            cpu: DEFAULT_CPU.into(),
            memory_mib: if artifacts.stack.memory_mib > 0 { artifacts.stack.memory_mib } else { 512 },
            iommu: true,
            append: String::new(),
            gdb: false,
            extra: Vec::new(),
            // One disk image per virtio-blk the stack assigns, next to its bundle.
            disks: (0..artifacts.stack.devices.iter().filter(|d| *d == "virtio-blk").count())
                .map(|i| {
                    artifacts.bundle.with_file_name(if i == 0 { "disk.img".into() } else { format!("disk{i}.img") })
                })
                .collect(),
            // One network device per virtio-net the stack assigns: ports 8080, 8081, ...
            net_ports: (0..artifacts.stack.devices.iter().filter(|d| *d == "virtio-net").count())
                .map(|i| DEFAULT_NET_PORT.saturating_add(i as u16))
                .collect(),
            net_forwards: Vec::new(),
            net_port_forwards: Vec::new(),
            disk_ext4: artifacts.stack.linux,
            ctl: artifacts.stack.control.then(|| artifacts.bundle.with_file_name(crate::ctl::SOCKET_NAME)),
            root_ports: false,
        }
    }

    /// QEMU arguments, without the console options.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-machine".into(),
            "q35".into(),
            "-cpu".into(),
            self.cpu.clone(),
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-smp".into(),
            "1".into(),
            "-no-reboot".into(),
            // Only the devices the stack uses: no default NIC, no VGA.
            "-nic".into(),
            "none".into(),
            "-vga".into(),
            "none".into(),
            "-device".into(),
            "isa-debug-exit,iobase=0xf4,iosize=0x04".into(),
        ];
        if self.iommu {
            a.extend(["-device".into(), "intel-iommu".into()]);
        }
        // Modern-only virtio behind the IOMMU: the driver must negotiate
        // VIRTIO_F_ACCESS_PLATFORM, and every DMA goes through VT-d. Without an IOMMU (the
        // native Linux baseline) the devices are plain modern virtio.
        let platform = if self.iommu { ",iommu_platform=on" } else { "" };
        // With `root_ports`, a root port per function (chassis numbers must differ) and the
        // function on its secondary bus.
        let mut ports = 0;
        let mut bus = |a: &mut Vec<String>| {
            if !self.root_ports {
                return String::new();
            }
            ports += 1;
            a.extend(["-device".into(), format!("pcie-root-port,id=rp{ports},chassis={ports}")]);
            format!(",bus=rp{ports}")
        };
        for (i, disk) in self.disks.iter().enumerate() {
            let bus = bus(&mut a);
            a.extend([
                "-drive".into(),
                format!("file={},if=none,id=disk{i},format=raw", disk.display()),
                "-device".into(),
                format!("virtio-blk-pci,drive=disk{i},disable-legacy=on{platform}{bus}"),
            ]);
        }
        for (i, port) in self.net_ports.iter().enumerate() {
            // User networking (no host privileges); only 127.0.0.1 reaches the forwarded port.
            let mut netdev = format!("user,id=net{i},hostfwd=tcp:127.0.0.1:{port}-:80");
            if i == 0 {
                for (p, address) in &self.net_forwards {
                    netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{p}-{address}:80"));
                }
                for (p, guest) in &self.net_port_forwards {
                    netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{p}-10.0.2.15:{guest}"));
                }
            }
            let bus = bus(&mut a);
            a.extend([
                "-netdev".into(),
                netdev,
                "-device".into(),
                format!("virtio-net-pci,netdev=net{i},disable-legacy=on{platform}{bus}"),
            ]);
            // Diagnostics: `STACK_NET_PCAP=<dir>` has QEMU write every frame of this NIC, both
            // ways and timestamped (headers: the first 120 bytes), to <dir>/net<i>.pcap. One
            // machine at a time (the names are per NIC, not per machine).
            if let Some(dir) = std::env::var_os("STACK_NET_PCAP") {
                let file = std::path::Path::new(&dir).join(format!("net{i}.pcap"));
                a.extend([
                    "-object".into(),
                    format!("filter-dump,id=dump{i},netdev=net{i},maxlen=120,file={}", file.display()),
                ]);
            }
        }
        if let Some(socket) = &self.ctl {
            // A modern virtio-serial function behind the IOMMU whose port 0 is a console
            // (what virtio-drivers' console driver speaks: no multiport), on a unix socket
            // QEMU listens on; output is dropped while nobody is connected.
            a.extend([
                "-device".into(),
                "virtio-serial-pci,id=ctl0,max_ports=1,disable-legacy=on,iommu_platform=on".into(),
                "-chardev".into(),
                format!("socket,id=ctl,path={},server=on,wait=off", socket.display()),
                "-device".into(),
                "virtconsole,chardev=ctl,bus=ctl0.0,nr=0".into(),
            ]);
        }
        if let Some(iso) = &self.cdrom {
            a.extend(["-cdrom".into(), iso.display().to_string()]);
        } else {
            a.extend(["-kernel".into(), self.kernel.display().to_string()]);
            if let Some(initrd) = &self.initrd {
                a.extend(["-initrd".into(), initrd.display().to_string()]);
            }
            if !self.append.is_empty() {
                a.extend(["-append".into(), self.append.clone()]);
            }
        }
        if self.gdb {
            a.extend(["-s".into(), "-S".into()]);
        }
        a.extend(self.extra.iter().cloned());
        a
    }

    /// The command for an interactive run: serial console and QEMU monitor on the terminal.
    pub fn interactive_command(&self) -> Command {
        let mut c = Command::new(QEMU);
        c.args(self.args()).args(["-display", "none", "-serial", "mon:stdio"]);
        c
    }

    /// The command for a captured run: serial on stdout, no monitor.
    pub fn captured_command(&self) -> Command {
        let mut c = Command::new(QEMU);
        c.args(self.args()).args(["-display", "none", "-serial", "stdio", "-monitor", "none"]);
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        c
    }

    /// The command line as a shell would show it.
    pub fn display_command(&self, interactive: bool) -> String {
        let c = if interactive { self.interactive_command() } else { self.captured_command() };
        let mut s = QEMU.to_string();
        for a in c.get_args() {
            let a = a.to_string_lossy();
            if a.contains(' ') || a.is_empty() {
                s.push_str(&format!(" '{a}'"));
            } else {
                s.push(' ');
                s.push_str(&a);
            }
        }
        s
    }
}

/// How a captured run ended.
#[derive(Debug)]
pub enum Ending {
    /// QEMU exited by itself with this status.
    Exited(Option<i32>),
    /// The `stop_when` condition held; QEMU was killed.
    Stopped,
    /// Nothing happened in time; QEMU was killed.
    TimedOut,
}

/// The console and outcome of a captured run.
#[derive(Debug)]
pub struct Run {
    pub lines: Vec<String>,
    pub ending: Ending,
    pub elapsed: Duration,
    pub stderr: String,
}

impl Run {
    pub fn machine_exit(&self) -> Option<MachineExit> {
        match self.ending {
            Ending::Exited(Some(code)) => MachineExit::from_qemu_status(code),
            _ => None,
        }
    }

    pub fn has_line(&self, needle: &str) -> bool {
        self.lines.iter().any(|l| l.contains(needle))
    }

    pub fn console(&self) -> String {
        self.lines.join("\n")
    }
}

/// Describe a QEMU exit status in words.
pub fn describe_exit(code: Option<i32>) -> String {
    match code {
        None => "QEMU was killed by a signal".into(),
        Some(c) => match MachineExit::from_qemu_status(c) {
            Some(e) => format!("exit status {c} ({e:?})"),
            None => format!("exit status {c} (QEMU itself failed or the machine reset)"),
        },
    }
}

/// Run `machine`, echoing console lines when `echo`, until QEMU exits, `stop_when`
/// returns true for the lines so far (QEMU is then killed), or `timeout` passes.
pub fn run_captured(
    machine: &Machine,
    timeout: Duration,
    echo: bool,
    stop_when: impl FnMut(&[String]) -> bool,
) -> Result<Run, String> {
    run_captured_polling(machine, timeout, echo, false, stop_when)
}

/// [`run_captured`]; with `poll`, `stop_when` is also asked every 200 ms without a new line
/// (for a condition a client thread makes true while the console is quiet).
pub fn run_captured_polling(
    machine: &Machine,
    timeout: Duration,
    echo: bool,
    poll: bool,
    mut stop_when: impl FnMut(&[String]) -> bool,
) -> Result<Run, String> {
    crate::setup::ensure_qemu()?;
    for disk in &machine.disks {
        crate::build::ensure_disk_as(disk, machine.disk_ext4)?;
    }
    let start = Instant::now();
    let mut child: Child = machine.captured_command().spawn().map_err(|e| format!("could not start {QEMU}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Bytes, not `lines()`: a line that is not UTF-8 (a domain or the firmware may print
        // any byte) ended the reading, and QEMU then died of SIGPIPE at its next console
        // byte: an empty console and `Exited(None)`, seen in the web-test loops.
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    if tx.send(line.trim_end_matches(['\n', '\r']).to_string()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut lines = Vec::new();
    let ending = loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            let _ = child.kill();
            break Ending::TimedOut;
        }
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(line) => {
                if echo {
                    println!("{line}");
                }
                lines.push(line);
                if stop_when(&lines) {
                    let _ = child.kill();
                    break Ending::Stopped;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if poll && stop_when(&lines) {
                    let _ = child.kill();
                    break Ending::Stopped;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().map_err(|e| format!("waiting for QEMU: {e}"))?;
                break Ending::Exited(status.code());
            }
        }
    };
    let _ = child.wait();
    // What QEMU printed while `stop_when` ran (a test's client runs inside it, for up to
    // minutes) or before it was killed is still in the channel: keep it, or the console of
    // a failed run ends where its client started (what a hung client was waiting for, and
    // the `trace` microvisor's dumps, would be missing). The reader ends at QEMU's EOF.
    lines.extend(rx.iter().inspect(|l| {
        if echo {
            println!("{l}");
        }
    }));
    let stderr = err_thread.join().unwrap_or_default();
    Ok(Run { lines, ending, elapsed: start.elapsed(), stderr })
}

//! Debian's own Linux kernel as a guest: the host side.
//!
//! On first use this fetches Debian's kernel package (what `linux-image-amd64` stands for)
//! and `busybox-static` with apt, extracts the PVH-bootable `vmlinux` from the compressed
//! `vmlinuz` ([`crate::bzimage`]), and builds an initramfs ([`crate::cpio`]): busybox, the
//! virtio and ext4 modules in dependency order ([`crate::kmod`]) and an `/init` script.
//! Everything lives under `target/linux/` (never committed). It also boots the result
//! natively in QEMU (PVH entry, `-kernel vmlinux`), the baseline a VM is measured against.
//!
//! `cargo xtask linux` does the fetching and building and says what it made.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::console::Console;
use crate::qemu::{Machine, DEFAULT_CPU};
use crate::setup::QEMU;
use crate::{bzimage, cpio, debian, kmod};

/// The boot bundle entry holding the kernel (`kernel = "linux"` in a manifest).
pub const KERNEL_ENTRY: &str = "linux";
/// The boot bundle entry holding the initramfs (`initramfs = "linux-initramfs"`).
pub const INITRAMFS_ENTRY: &str = "linux-initramfs";
/// The Linux files a manifest may name; xtask makes them on first use.
pub const BUNDLE_FILES: [&str; 2] = [KERNEL_ENTRY, INITRAMFS_ENTRY];

/// The metapackage that names Debian's current kernel.
pub const KERNEL_METAPACKAGE: &str = "linux-image-amd64";
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

/// The line `/init` prints first, once proc, sys and devtmpfs are mounted: boot times are
/// measured to it.
pub const INIT_MARKER: &str = "linux-init: reached init";
/// Printed by `/init` just before it starts the interactive shell.
pub const SHELL_MARKER: &str = "linux-init: shell on the console";
/// The prefix of the line saying how the modules went (`... loaded N modules` or
/// `... insmod failed: ...`).
pub const MODULES_MARKER: &str = "linux-init: modules:";
/// Printed by `/init` once `/dev/vda` is mounted at `/srv`.
pub const SRV_MARKER: &str = "linux-init: /dev/vda mounted at /srv";
/// Printed by `/init` once busybox `httpd` serves `/srv` on port 80.
pub const HTTPD_MARKER: &str = "linux-init: httpd serving /srv on port 80";

/// The modules the initramfs loads (and with them, what they depend on): virtio over PCI
/// and MMIO, the block and network drivers, ext4. `crc32c_generic` is what ext4's and
/// jbd2's soft dependency `crypto-crc32c` asks for (metadata checksums).
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "crc32c_generic",
    "ext4",
];

/// busybox applets linked into `/bin`.
pub const APPLETS: &[&str] = &[
    "sh",
    "ash",
    "mount",
    "umount",
    "insmod",
    "lsmod",
    "rmmod",
    "uname",
    "dmesg",
    "cat",
    "echo",
    "poweroff",
    "reboot",
    "halt",
    "ip",
    "ifconfig",
    "udhcpc",
    "httpd",
    "wget",
    "sync",
    "sha256sum",
    "dd",
    "mkdir",
    "ls",
    "grep",
    "sleep",
    "setsid",
    "cttyhack",
    "ps",
    "kill",
    "head",
    "tail",
    "wc",
    "cut",
    "tr",
    "sed",
    "awk",
    "cp",
    "mv",
    "rm",
    "ln",
    "touch",
    "true",
    "false",
    "test",
    "[",
    "printf",
    "df",
    "du",
    "free",
    "uptime",
    "date",
    "hexdump",
    "mknod",
    "mke2fs",
    "stty",
    "tty",
    "vi",
    "less",
    "find",
    "xargs",
    "env",
    "id",
    "hostname",
    "nc",
];

/// The kernel command line for a native boot. `console=ttyS0`: the serial port is the
/// console; `quiet`: few console lines (each costs time on an emulated UART); `panic=-1`
/// with QEMU's `-no-reboot`: a panic ends QEMU at once instead of hanging a test. The other
/// words are the ones measured to shorten a TCG boot (see [`FAST_BOOT_ARGS`]).
pub fn native_cmdline(extra: &str) -> String {
    let mut s = format!("console=ttyS0 quiet panic=-1 {FAST_BOOT_ARGS}");
    if !extra.is_empty() {
        s.push(' ');
        s.push_str(extra);
    }
    s
}

/// Kernel parameters that shorten a boot under emulation without changing what the
/// booted system does (they skip boot-time self-checks only). Measured on this machine's
/// QEMU TCG to the init marker, best of 3-4 boots, wall seconds (at a host load of about 3)
/// and QEMU CPU seconds (at a load of about 10, where wall time means little):
/// - `console=ttyS0 quiet panic=-1` alone: 4.15 s wall, 3.99 s CPU;
/// - `no_timer_check`: no check that the timer interrupt ticks (arch/x86/kernel/apic/
///   io_apic.c `timer_irq_works` waits for ticks) and `tsc=reliable`: no clocksource
///   watchdog on a TSC that emulation makes jittery: 3.84 s wall, 3.96 s CPU (they save
///   waiting, not work);
/// - `cryptomgr.notests`: no crypto self-tests at boot (crypto/testmgr.c; the late
///   `crypto_algapi_init` spent 0.48 s running them): 3.36 s wall, 3.42 s CPU.
///
/// Measured but not used, since they change the booted system: `mitigations=off` (3.25 s
/// wall, 3.34 s CPU: fewer alternatives to patch) and `rodata=off` on top (3.08 s wall,
/// 3.17 s CPU: no read-only marking and no W+X page-table walk).
pub const FAST_BOOT_ARGS: &str = "no_timer_check tsc=reliable cryptomgr.notests";

/// Memory for a native boot, MiB.
pub const NATIVE_MEMORY_MIB: u32 = 256;

/// What `cargo xtask linux` makes.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// `uname -r` of the kernel, e.g. `6.1.0-57-amd64`.
    pub release: String,
    /// The Debian package version of the kernel, e.g. `6.1.192-3` (from the .deb name).
    pub package_version: String,
    pub vmlinux: PathBuf,
    pub pvh_entry: u32,
    pub initramfs: PathBuf,
    /// The modules in the order `/etc/init.d/rcS` loads them.
    pub modules: Vec<String>,
}

/// `target/linux` in the workspace.
pub fn default_dir() -> PathBuf {
    crate::workspace_root().join("target").join("linux")
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Writes `data` to `path` through a temporary file and a rename, so a reader (another
/// test's QEMU) never sees half a file; leaves an identical file alone.
fn write_atomically(path: &Path, data: &[u8]) -> Result<(), String> {
    if std::fs::read(path).is_ok_and(|old| old == data) {
        return Ok(());
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, data).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("renaming {} to {}: {e}", tmp.display(), path.display()))
}

/// Fetches what is missing and builds the vmlinux and initramfs under `dir`.
pub fn ensure(dir: &Path) -> Result<Artifacts, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let debs = dir.join("debs");
    // Once resolved, the kernel package is remembered: no apt look-up on later runs
    // (`cargo xtask linux --refresh` forgets it).
    let pinned = dir.join("kernel-package");
    let resolve = || -> Result<String, String> {
        let p = debian::resolve_kernel_package(KERNEL_METAPACKAGE)?;
        eprintln!("linux: {KERNEL_METAPACKAGE} is {p}");
        std::fs::write(&pinned, &p).map_err(|e| format!("writing {}: {e}", pinned.display()))?;
        Ok(p)
    };
    let (package, kernel_deb) = match std::fs::read_to_string(&pinned) {
        Ok(p) if !p.trim().is_empty() => {
            let p = p.trim().to_string();
            match debian::download(&p, &debs) {
                Ok(deb) => (p, deb),
                Err(e) => {
                    // The remembered package may have left the archive (a newer ABI
                    // replaced it): look the metapackage up again.
                    eprintln!("linux: {p}: {e}; looking {KERNEL_METAPACKAGE} up again");
                    let p = resolve()?;
                    let deb = debian::download(&p, &debs)?;
                    (p, deb)
                }
            }
        }
        _ => {
            let p = resolve()?;
            let deb = debian::download(&p, &debs)?;
            (p, deb)
        }
    };
    let release = debian::kernel_release(&package)
        .ok_or_else(|| format!("{package} is not a linux-image-* package"))?
        .to_string();
    let busybox_deb = debian::download(BUSYBOX_PACKAGE, &debs)?;
    let package_version =
        kernel_deb.file_name().and_then(|n| n.to_str()).and_then(|n| n.split('_').nth(1)).unwrap_or("?").to_string();
    let kernel_dir = dir.join(format!("pkg-{package}"));
    debian::unpack(&kernel_deb, &kernel_dir)?;
    let busybox_dir = dir.join("pkg-busybox");
    debian::unpack(&busybox_deb, &busybox_dir)?;

    let vmlinux_path = dir.join(format!("vmlinux-{release}"));
    // A vmlinux from an earlier run is used when it still checks out.
    let cached = std::fs::read(&vmlinux_path).ok().and_then(|elf| bzimage::check_pvh(&elf).ok());
    let pvh_entry = match cached {
        Some(entry) => entry,
        None => {
            let vmlinuz = kernel_dir.join("boot").join(format!("vmlinuz-{release}"));
            let data = std::fs::read(&vmlinuz).map_err(|e| format!("reading {}: {e}", vmlinuz.display()))?;
            eprintln!("linux: extracting vmlinux from {} ({} bytes)", vmlinuz.display(), data.len());
            let v = bzimage::extract(&data).map_err(|e| format!("{}: {e}", vmlinuz.display()))?;
            eprintln!(
                "linux: vmlinux: {} bytes from the XZ stream at {:#x}, PVH entry {:#x}",
                v.elf.len(),
                v.xz_offset,
                v.pvh_entry
            );
            write_atomically(&vmlinux_path, &v.elf)?;
            v.pvh_entry
        }
    };

    let module_dir = kernel_dir.join("lib").join("modules").join(&release).join("kernel");
    let index = kmod::index(&module_dir)?;
    let order = kmod::load_order(MODULES, |name| {
        let path = index.get(name).ok_or_else(|| format!("module {name} is not in {}", module_dir.display()))?;
        kmod::read_modinfo(path)
    })?;
    let mut modules = Vec::new();
    for m in &order {
        let path = index.get(&m.name).ok_or_else(|| format!("module {} has no file", m.name))?;
        let data = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        modules.push((m.name.clone(), data));
    }
    let busybox_path = busybox_dir.join("bin").join("busybox");
    let busybox = std::fs::read(&busybox_path).map_err(|e| format!("reading {}: {e}", busybox_path.display()))?;
    // The benchmark's guest half (`init.mode=iobench`): its script, and its program once
    // `cargo xtask build` has compiled it (`cargo xtask bench linux-io` builds first).
    let iobench_path = iobench_binary();
    let iobench = std::fs::read(&iobench_path).ok();
    let mut extra: Vec<(&str, u32, &[u8])> = vec![(IOBENCH_SCRIPT_PATH, 0o755, IOBENCH_SCRIPT.as_bytes())];
    if let Some(b) = &iobench {
        extra.push((IOBENCH_BIN_PATH, 0o755, b));
    }
    let archive = initramfs(&busybox, &modules, &extra)?;
    let initramfs_path = dir.join(format!("initramfs-{release}.cpio"));
    write_atomically(&initramfs_path, &archive)?;

    Ok(Artifacts {
        release,
        package_version,
        vmlinux: vmlinux_path,
        pvh_entry,
        initramfs: initramfs_path,
        modules: order.into_iter().map(|m| m.name).collect(),
    })
}

/// Where the initramfs holds `linux-iobench` (`guests/linux-iobench`), the block half of
/// `cargo xtask bench linux-io`.
pub const IOBENCH_BIN_PATH: &str = "/bin/linux-iobench";
/// The script of `init.mode=iobench`.
pub const IOBENCH_SCRIPT_PATH: &str = "/etc/init.d/iobench";

/// The compiled `linux-iobench` (a static Linux executable built for the bare-metal target).
pub fn iobench_binary() -> PathBuf {
    crate::build::default_target_dir().join(crate::BARE_METAL_TARGET).join("release").join("linux-iobench")
}

/// `init.mode=iobench` (`xtask/src/bench_linux_io.rs` is the host half): the disk is not
/// mounted (rcS's mount is undone) and httpd is not started; `linux-iobench` runs the block
/// workloads on `/dev/vda` for `iobench.ms=` milliseconds each, then two TCP transfers with
/// busybox `nc` (ports 5001 and 5002: a port of its own each, so the second `nc` never
/// finds the first one's connection in the way), each waiting for the host: the host sends
/// (`dd` in the guest drops the bytes) and the host receives `iobench.tcp_blocks=` 64 KiB
/// blocks of zeros. `linux-io: mark` lines around each make the VMM print its counters.
pub const IOBENCH_SCRIPT: &str = r#"#!/bin/sh
ms=2000
blocks=256
for word in $(cat /proc/cmdline); do
    case "$word" in
        iobench.ms=*) ms="${word#iobench.ms=}" ;;
        iobench.tcp_blocks=*) blocks="${word#iobench.tcp_blocks=}" ;;
    esac
done
umount /srv 2>/dev/null
if [ -x /bin/linux-iobench ]; then
    /bin/linux-iobench "$ms" /dev/vda
else
    echo "linux-io: error: /bin/linux-iobench is not in the initramfs (run cargo xtask build first)"
fi
echo "linux-io: mark start tcp-in"
nc -l -p 5001 -e dd of=/dev/null bs=65536 2>/dev/null
echo "linux-io: mark end tcp-in"
echo "linux-io: mark start tcp-out"
nc -l -p 5002 -e dd if=/dev/zero bs=65536 count="$blocks" 2>/dev/null
echo "linux-io: mark end tcp-out"
echo "linux-io: done"
poweroff -f
"#;

/// `/etc/init.d/rcS`, which busybox `init` (PID 1, `/init`) runs first: mounts, the
/// marker, the modules (in the order given), then the mode the kernel command line asks
/// for with `init.mode=<name>`:
/// - `shell` (the default): nothing more; `init` then keeps an interactive shell on the
///   console (see [`INITTAB`]);
/// - `poweroff`: power off at once (boot-time measurements);
/// - any other name: runs `/etc/init.d/<name>` if the initramfs has it (later test modes
///   add their scripts there), then the shell.
pub fn init_script(modules: &[String]) -> String {
    format!(
        r#"#!/bin/sh
# Run by busybox init as its sysinit action; built by xtask (xtask/src/linux.rs).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "{INIT_MARKER}"
mode=shell
for word in $(cat /proc/cmdline); do
    case "$word" in
        init.mode=*) mode="${{word#init.mode=}}" ;;
    esac
done
loaded=0
failed=""
for m in {modules}; do
    if out=$(insmod /lib/modules/$m.ko 2>&1); then
        loaded=$((loaded + 1))
    else
        failed="$failed $m ($out)"
    fi
done
if [ -z "$failed" ]; then
    echo "{MODULES_MARKER} loaded $loaded modules"
else
    echo "{MODULES_MARKER} loaded $loaded modules, insmod failed:$failed"
fi
if [ "$mode" != poweroff ]; then
    # The stack's services: the disk (virtio-blk through the disk driver VM) at /srv, the
    # network (virtio-net through the net driver VM) from QEMU's DHCP, httpd serving /srv.
    mkdir -p /srv
    if [ -b /dev/vda ]; then
        if mount -t ext4 /dev/vda /srv; then
            echo "{SRV_MARKER}"
        else
            echo "linux-init: mounting /dev/vda at /srv failed"
        fi
    fi
    ip link set lo up
    if [ -e /sys/class/net/eth0 ]; then
        echo "linux-init: eth0 MAC $(cat /sys/class/net/eth0/address)"
        udhcpc -i eth0 -s /etc/udhcpc.script -q -n -t 5 -T 2 2>/dev/null || echo "linux-init: no DHCP lease on eth0"
        # No web server while the benchmark measures.
        if [ "$mode" = iobench ]; then
            :
        elif httpd -h /srv -p 80; then
            echo "{HTTPD_MARKER}"
        fi
    fi
fi
case "$mode" in
    shell) ;;
    poweroff)
        poweroff
        ;;
    *)
        if [ -x "/etc/init.d/$mode" ]; then
            echo "linux-init: init.mode=$mode: running /etc/init.d/$mode"
            "/etc/init.d/$mode"
        else
            echo "linux-init: init.mode=$mode is unknown; starting the shell"
        fi
        ;;
esac
echo "{SHELL_MARKER}"
"#,
        modules = modules.join(" ")
    )
}

/// busybox `init`'s table (busybox examples/inittab: `<id>::<action>:<process>`, an empty
/// id meaning /dev/console). PID 1 has to be a real init: busybox `poweroff`, `halt` and
/// `reboot` signal PID 1 (USR2, USR1, TERM) to do it, which a shell script as PID 1 would
/// not act on. `cttyhack` reopens the shell's stdio on the real console device (e.g.
/// ttyS0) so, as init made it a session leader, that device becomes its controlling
/// terminal (job control, Ctrl-C); `respawn` gives a new shell when one exits.
pub const INITTAB: &str = "::sysinit:/etc/init.d/rcS
::respawn:/bin/cttyhack /bin/sh
::ctrlaltdel:/bin/reboot
::shutdown:/bin/sync
";

/// The initramfs: busybox with its applet links in `/bin`, the modules (name, contents) in
/// `/lib/modules/<name>.ko`, the `/init` script for them, and `extra` files (path, mode,
/// contents), e.g. `/etc/init.d/<mode>` scripts.
pub fn initramfs(
    busybox: &[u8],
    modules: &[(String, Vec<u8>)],
    extra: &[(&str, u32, &[u8])],
) -> Result<Vec<u8>, String> {
    let mut w = cpio::Writer::new();
    for d in
        ["bin", "dev", "etc", "etc/init.d", "lib", "lib/modules", "mnt", "proc", "root", "run", "srv", "sys", "tmp"]
    {
        w.dir(d, if d == "tmp" { 0o1777 } else { 0o755 })?;
    }
    // The kernel opens /dev/console for init's stdin/stdout before /init can mount
    // devtmpfs (init/main.c, console_on_rootfs): without the node init has no output.
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.char_device("dev/null", 0o666, 1, 3)?;
    w.file("bin/busybox", 0o755, busybox)?;
    for a in APPLETS {
        w.symlink(&format!("bin/{a}"), "busybox")?;
    }
    for (name, data) in modules {
        w.file(&format!("lib/modules/{name}.ko"), 0o644, data)?;
    }
    let names: Vec<String> = modules.iter().map(|(n, _)| n.clone()).collect();
    // busybox runs the applet named by argv[0]'s last component: "/init" is init.
    w.symlink("init", "bin/busybox")?;
    w.file("etc/inittab", 0o644, INITTAB.as_bytes())?;
    w.file("etc/init.d/rcS", 0o755, init_script(&names).as_bytes())?;
    // udhcpc configures nothing by itself: it runs this script with the lease in variables.
    w.file("etc/udhcpc.script", 0o755, UDHCPC_SCRIPT.as_bytes())?;
    w.file("etc/hostname", 0o644, b"linux-guest\n")?;
    for (path, mode, data) in extra {
        w.file(path.trim_start_matches('/'), *mode, data)?;
    }
    Ok(w.finish())
}

/// For `udhcpc -s /etc/udhcpc.script`: apply the lease (busybox's udhcpc passes
/// `$interface`, `$ip`, `$mask`, `$router` and the event as `$1`).
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
    deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        for r in $router; do ip route add default via "$r" dev "$interface"; break; done
        echo "linux-init: $interface has $ip"
        ;;
esac
"#;

/// A QEMU machine booting the kernel natively (PVH entry from the ELF note) with the
/// initramfs: the CPU model of the microvisor's machine, no IOMMU, no devices but the
/// serial port.
pub fn native_machine(a: &Artifacts, cmdline_extra: &str) -> Machine {
    Machine {
        kernel: a.vmlinux.clone(),
        initrd: Some(a.initramfs.clone()),
        cpu: DEFAULT_CPU.into(),
        memory_mib: NATIVE_MEMORY_MIB,
        iommu: false,
        append: native_cmdline(cmdline_extra),
        gdb: false,
        extra: Vec::new(),
        disks: Vec::new(),
        net_ports: Vec::new(),
        net_forwards: Vec::new(),
        net_port_forwards: Vec::new(),
        disk_ext4: false,
        cdrom: None,
        ctl: None,
        root_ports: false,
    }
}

/// The QEMU command for `m` with the serial console on stdio (for [`Console`]).
pub fn console_command(m: &Machine) -> Command {
    let mut c = Command::new(QEMU);
    c.args(m.args()).args(["-display", "none", "-serial", "stdio", "-monitor", "none"]);
    c
}

/// Boots `m` and returns its console.
pub fn boot(m: &Machine) -> Result<Console, String> {
    crate::setup::ensure_qemu()?;
    Console::spawn(console_command(m))
}

/// How long a boot took to the init marker.
#[derive(Debug, Clone, Copy)]
pub struct BootTime {
    /// Wall time from starting QEMU.
    pub wall: Duration,
    /// QEMU's CPU time (user + system) by then, if the host has /proc.
    pub cpu: Option<Duration>,
}

/// Boots natively until the init marker.
pub fn time_native_boot(a: &Artifacts, timeout: Duration) -> Result<BootTime, String> {
    let mut c = boot(&native_machine(a, "init.mode=poweroff"))?;
    let wall = c.wait_for(INIT_MARKER, timeout)?;
    let cpu = c.cpu_time();
    c.stop();
    Ok(BootTime { wall, cpu })
}

/// `cargo xtask linux [--refresh] [--native]`.
pub fn run(args: &[String]) -> Result<(), String> {
    let dir = default_dir();
    let mut native = false;
    for a in args {
        match a.as_str() {
            "--refresh" => {
                // Look the metapackage up again (a newer kernel may have come out).
                let _ = std::fs::remove_file(dir.join("kernel-package"));
            }
            "--native" => native = true,
            other => return Err(format!("linux: unknown option `{other}` (known: --refresh, --native)")),
        }
    }
    let a = ensure(&dir)?;
    println!("linux: kernel {} (Debian package version {})", a.release, a.package_version);
    println!(
        "linux: vmlinux   {} ({:.1} MiB, PVH entry {:#x})",
        a.vmlinux.display(),
        file_len(&a.vmlinux) as f64 / 1048576.0,
        a.pvh_entry
    );
    println!("linux: initramfs {} ({:.1} MiB)", a.initramfs.display(), file_len(&a.initramfs) as f64 / 1048576.0);
    println!("linux: modules, in load order: {}", a.modules.join(" "));
    println!(
        "linux: boot it natively: {QEMU} -machine q35 -cpu {DEFAULT_CPU} -m {NATIVE_MEMORY_MIB} -nographic -kernel {} -initrd {} -append '{}'",
        a.vmlinux.display(),
        a.initramfs.display(),
        native_cmdline("")
    );
    if native {
        // The console and QEMU's monitor on this terminal, as `cargo xtask run` does.
        crate::setup::ensure_qemu()?;
        println!("linux: booting natively; the shell follows; press Ctrl-A X to quit QEMU");
        let mut c = Command::new(QEMU);
        c.args(native_machine(&a, "").args()).args(["-display", "none", "-serial", "mon:stdio"]);
        let status = c.status().map_err(|e| format!("could not start {QEMU}: {e}"))?;
        match status.code() {
            // An ACPI power-off (Linux's `poweroff`) ends QEMU with status 0.
            Some(0) => println!("linux: QEMU ended: the machine powered off"),
            code => println!("linux: QEMU ended: {}", crate::qemu::describe_exit(code)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_initramfs_has_init_busybox_links_modules_and_a_console_node() {
        let modules = vec![("virtio_ring".to_string(), vec![1u8; 10]), ("virtio".to_string(), vec![2u8; 3])];
        let a = initramfs(b"BB", &modules, &[("/etc/init.d/probe", 0o755, b"#!/bin/sh\n")]).unwrap();
        let entries = cpio::read(&a).unwrap();
        let get = |n: &str| entries.iter().find(|e| e.name == n).unwrap_or_else(|| panic!("no {n}"));
        assert_eq!(get("bin/busybox").data, b"BB");
        for applet in ["sh", "insmod", "cttyhack", "setsid", "uname", "poweroff", "udhcpc", "httpd"] {
            assert_eq!(get(&format!("bin/{applet}")).data, b"busybox");
        }
        // PID 1 is busybox init (so poweroff works), running rcS first and then a shell.
        let init = get("init");
        assert_eq!((init.mode, init.data.as_slice()), (cpio::S_IFLNK | 0o777, &b"bin/busybox"[..]));
        let inittab = String::from_utf8(get("etc/inittab").data.clone()).unwrap();
        assert!(inittab.starts_with("::sysinit:/etc/init.d/rcS\n"), "{inittab}");
        assert!(inittab.contains("::respawn:/bin/cttyhack /bin/sh\n"), "{inittab}");
        let console = get("dev/console");
        assert_eq!((console.mode & 0o170000, console.rdev_major, console.rdev_minor), (cpio::S_IFCHR, 5, 1));
        assert_eq!(get("lib/modules/virtio.ko").data, [2, 2, 2]);
        let rcs = get("etc/init.d/rcS");
        assert_eq!(rcs.mode, cpio::S_IFREG | 0o755);
        let init = String::from_utf8(rcs.data.clone()).unwrap();
        assert!(init.starts_with("#!/bin/sh\n"));
        // The modules in the order given, after the marker.
        assert!(init.contains("for m in virtio_ring virtio; do"), "{init}");
        assert!(init.find(INIT_MARKER) < init.find("insmod"));
        assert_eq!(get("etc/init.d/probe").data, b"#!/bin/sh\n");
        // Directories come before their contents.
        let pos = |n: &str| entries.iter().position(|e| e.name == n).unwrap();
        assert!(pos("lib") < pos("lib/modules") && pos("lib/modules") < pos("lib/modules/virtio.ko"));
    }

    #[test]
    fn the_native_command_line_keeps_the_console_and_adds_words() {
        assert!(native_cmdline("").starts_with("console=ttyS0 "));
        assert!(native_cmdline("init.mode=poweroff").ends_with(" init.mode=poweroff"));
    }
}

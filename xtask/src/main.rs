//! `cargo xtask <command>`: build, run and test the stack.
//!
//! ```text
//! build                 build every image and pack the boot bundle
//! run [options]         boot the stack in QEMU with the console on this terminal
//!   --smoke             boot, wait until every domain reports ready, summarise, stop
//!   --gdb               wait for a debugger on localhost:1234 before starting
//!   --append "<words>"  extra microvisor command-line words (e.g. `dom0.selftest=...`)
//!   --timeout <secs>    with --smoke: give up after this long (default 120)
//!   --port <port>       host port forwarded to port 80 of the network device (default 8080)
//!   --machine bochs     boot the GRUB ISO in Bochs (Intel VMX CPU model) instead of QEMU
//! iso [--append ...]    a GRUB ISO booting the microvisor by Multiboot2: target/iso/stack.iso
//! test                  host tests, then the QEMU end-to-end tests
//! fuzz hypercalls       random hypercalls beside a serving pair; checks faults and leaks
//! tcb                   size of the trusted core (SLOC, unsafe, image); writes target/tcb.json
//! linux                 fetch Debian's kernel and busybox, build vmlinux and the initramfs
//! ctl list|kill N|restart N   talk to the running stack's dom0 (its control device)
//! ```

use std::process::{Command, ExitCode};
use std::time::Duration;

use std::path::PathBuf;

use xtask::build;
use xtask::qemu::{self, describe_exit, Ending, Machine};
use xtask::{setup, workspace_root};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build") => build_command(&args[1..]),
        Some("run") => run(&args[1..]),
        Some("iso") => iso_command(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("bench") => xtask::bench::run(&args[1..]),
        Some("fuzz") => xtask::fuzz::run(&args[1..]),
        Some("tcb") => xtask::tcb::run(&args[1..]),
        Some("linux") => xtask::linux::run(&args[1..]),
        Some("load") => xtask::load::run(&args[1..]),
        Some("ctl") => xtask::ctl::run(&args[1..]),
        Some("help") | Some("--help") | Some("-h") | None => {
            println!("{}", USAGE);
            Ok(())
        }
        Some(other) => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: cargo xtask <command>
  build [--stack file]  build the microvisor and domain images, pack target/stack/bundle.bin
                        for the stack manifest (default stacks/demo.toml)
  run [--stack file] [--smoke] [--gdb] [--append \"words\"] [--timeout secs] [--port port]
                        boot the stack in QEMU (console on this terminal; Ctrl-A X quits);
                        with a virtio-net device, 127.0.0.1:<port> (default 8080) is
                        forwarded to port 80 on QEMU's user network
  run --machine bochs [--smoke] [--append \"words\"] [--timeout secs]
                        boot the stack's GRUB ISO in Bochs on an Intel CPU with VMX (the VMX
                        build; default stack stacks/bochs.toml)
                        (headless; COM1 shown here; files under target/bochs/)
  iso [--stack file] [--append \"words\"]
                        build target/iso/stack.iso: GRUB boots the microvisor by Multiboot2
                        with the boot bundle as its module (serial console)
  test                  host tests, then the QEMU end-to-end tests
  bench ipc [--n N]     IPC cost in instructions (QEMU -icount) and wall time; writes
                        target/bench/ipc.json
  bench ipc --machine bochs [--n N]
                        the same figures under VMX on Bochs (TSC = instructions with
                        clock sync=none); writes target/bench/ipc-vmx.json
  bench blk [--icount]  block throughput through the disk driver VM vs. a domain owning
                        the device; writes target/bench/blk.json (--icount: time in
                        instructions plus idle time, target/bench/blk-icount.json)
  bench net             TCP throughput and small requests per second through the net driver
                        VM vs. a guest owning its NIC; writes target/bench/net.json
  bench boot [--n N]    Debian's kernel booted natively (PVH) to its init marker, best and
                        median of N (default 3); writes target/bench/boot.json
  bench restart [--kills N]
                        kill the disk driver VM N times (default 30) with `ctl kill` under an
                        HTTP read/write load: kill to the guest's next completed I/O (median,
                        worst; wall and instructions under icount), throughput before and
                        during the kills; writes target/bench/restart.json
  bench linux-io [--rounds N] [--ms MS] [--tcp-mib N]
                        Debian's kernel doing O_DIRECT disk I/O and TCP natively in QEMU and
                        under the microvisor through the driver VMs, side by side, N rounds
                        (default 2); writes target/bench/linux-io.json
  fuzz hypercalls [--calls N] [--seed S] [--console]
                        boot stacks/fuzz.toml: a domain makes N (default 1,000,000) random
                        hypercalls from seed S (random by default, always printed); fails on
                        a microvisor fault, a leak (dom0 compares free frames and kernel
                        objects before and after), or if the other domains stop serving
  load web [-n N] [-c C] [--microvisor path]
                        ApacheBench (`ab -k`, apache2-utils; default -n 20000 -c 8) against
                        the demo guest's HTTP server; fails on a failed request or on any
                        watchdog, fallback, timeout, failure or trace report on the console
  tcb                   size of the trusted computing base (SLOC, unsafe, image bytes) beside
                        the reference points; writes target/tcb.json
  ctl [--socket path] list | kill NAME | restart NAME | help
                        the running stack's dom0 through its control device (a stack with
                        `[machine] control = \"virtio-console\"`; socket target/stack/ctl.sock):
                        domains with state, restarts and I/O; make one fail as a crash (its
                        restart policy applies); destroy and rebuild one now (restart = \"always\")
  linux [--refresh] [--native]
                        fetch Debian's kernel and busybox-static (apt, cached in target/linux),
                        extract vmlinux, build the initramfs; print their paths and sizes;
                        with --native, boot them in QEMU with the shell on this terminal";

fn stack_option(args: &[String]) -> Result<(PathBuf, Vec<String>), String> {
    let mut stack = xtask::manifest::default_stack_path();
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--stack" {
            stack = PathBuf::from(it.next().ok_or("--stack needs a manifest file")?);
        } else {
            rest.push(a.clone());
        }
    }
    Ok((stack, rest))
}

fn build_command(args: &[String]) -> Result<(), String> {
    let (stack, rest) = stack_option(args)?;
    if let Some(a) = rest.first() {
        return Err(format!("build: unknown option `{a}`"));
    }
    build::build(&build::default_target_dir(), &stack).map(|_| ())
}

/// The stack Bochs boots unless told otherwise: no devices (Bochs has no virtio).
const BOCHS_STACK: &str = "stacks/bochs.toml";

struct RunOptions {
    stack: PathBuf,
    smoke: bool,
    gdb: bool,
    append: String,
    timeout: Duration,
    /// Whether `--timeout` was given.
    timeout_given: bool,
    port: Option<u16>,
    bochs: bool,
}

fn parse_run(args: &[String]) -> Result<RunOptions, String> {
    let (mut stack, args) = stack_option(args)?;
    // Bochs has no virtio devices: without --stack it boots the stack made for it.
    if args.windows(2).any(|w| w[0] == "--machine" && w[1] == "bochs") && stack == xtask::manifest::default_stack_path()
    {
        stack = xtask::workspace_root().join(BOCHS_STACK);
    }
    let args = &args[..];
    let mut o = RunOptions {
        stack,
        smoke: false,
        gdb: false,
        append: String::new(),
        timeout: Duration::from_secs(120),
        timeout_given: false,
        port: None,
        bochs: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--smoke" => o.smoke = true,
            "--gdb" => o.gdb = true,
            "--append" => o.append = it.next().ok_or("--append needs a value")?.clone(),
            "--timeout" => {
                let v = it.next().ok_or("--timeout needs a number of seconds")?;
                o.timeout = Duration::from_secs(v.parse().map_err(|_| format!("--timeout: `{v}` is not a number"))?);
                o.timeout_given = true;
            }
            "--port" => {
                let v = it.next().ok_or("--port needs a port number")?;
                o.port = Some(v.parse().map_err(|_| format!("--port: `{v}` is not a port number"))?);
            }
            "--machine" => match it.next().map(String::as_str) {
                Some("bochs") => o.bochs = true,
                Some("qemu") => o.bochs = false,
                other => return Err(format!("--machine: {other:?} is neither `qemu` nor `bochs`")),
            },
            other => return Err(format!("run: unknown option `{other}`\n\n{USAGE}")),
        }
    }
    Ok(o)
}

fn run(args: &[String]) -> Result<(), String> {
    let opts = parse_run(args)?;
    if opts.bochs {
        return run_bochs(&opts);
    }
    setup::ensure_qemu()?;
    let artifacts = build::build(&build::default_target_dir(), &opts.stack)?;
    let mut machine = Machine::new(&artifacts);
    machine.append = opts.append.clone();
    machine.gdb = opts.gdb;
    if let Some(port) = opts.port {
        for (i, p) in machine.net_ports.iter_mut().enumerate() {
            *p = port.saturating_add(i as u16);
        }
    }
    for port in &machine.net_ports {
        println!(
            "xtask: network: http://127.0.0.1:{port}/ on the host reaches port 80 on QEMU's user network (the demo guest's web server)"
        );
    }
    if let Some(socket) = &machine.ctl {
        // A socket left by an earlier run would make QEMU fail to listen.
        let _ = std::fs::remove_file(socket);
        println!(
            "xtask: control: dom0's control interface is the unix socket {} (`cargo xtask ctl list`, `ctl kill NAME`, `ctl restart NAME`{})",
            socket.display(),
            if *socket == xtask::ctl::default_socket() { String::new() } else { format!(", with --socket {}", socket.display()) }
        );
    }
    if !opts.smoke {
        println!("xtask: {}", machine.display_command(true));
        if opts.gdb {
            println!("xtask: waiting for a debugger: gdb {} -ex 'target remote :1234'", artifacts.microvisor.display());
        }
        for disk in &machine.disks {
            build::ensure_disk_as(disk, machine.disk_ext4)?;
        }
        println!("xtask: console follows; press Ctrl-A X to quit QEMU");
        let status = machine.interactive_command().status().map_err(|e| format!("could not start QEMU: {e}"))?;
        println!("xtask: QEMU ended: {}", describe_exit(status.code()));
        return Ok(());
    }
    smoke(&machine, &artifacts, opts.timeout)
}

/// Boot, wait until every domain of the stack reports ready, then stop QEMU.
fn smoke(machine: &Machine, artifacts: &build::Artifacts, timeout: Duration) -> Result<(), String> {
    println!("smoke: {}", machine.display_command(false));
    let mut domains: Vec<&str> = vec![ipc_spec::DOM0_IMAGE];
    domains.extend(artifacts.stack.domains.iter().map(String::as_str));
    let ready = |lines: &[String], d: &str| {
        let prefix = format!("[{d}] ready");
        lines.iter().any(|l| l.starts_with(&prefix))
    };
    let run = qemu::run_captured(machine, timeout, true, |lines| domains.iter().all(|d| ready(lines, d)))?;
    let find = |needle: &str| run.lines.iter().find(|l| l.contains(needle)).cloned();
    match run.ending {
        Ending::Stopped => {
            let acpi = find("[microvisor] acpi:").unwrap_or_default();
            let guest = if run.has_line("[dom0] ready (in SVM guest mode)") { "in SVM guest mode" } else { "" };
            println!(
                "smoke: OK in {:.1} s: microvisor booted; {}; ready: {} {}",
                run.elapsed.as_secs_f64(),
                acpi.trim_start_matches("[microvisor] "),
                domains.join(", "),
                guest
            );
            Ok(())
        }
        Ending::Exited(code) => {
            let missing: Vec<_> = domains.iter().filter(|d| !ready(&run.lines, d)).collect();
            Err(format!(
                "smoke: QEMU ended before {:?} reported ready: {}{}",
                missing,
                describe_exit(code),
                if run.stderr.trim().is_empty() {
                    String::new()
                } else {
                    format!("\nQEMU said: {}", run.stderr.trim())
                }
            ))
        }
        Ending::TimedOut => Err(format!(
            "smoke: timed out after {} s waiting for every domain to report ready (see the console above)",
            timeout.as_secs()
        )),
    }
}

fn iso_command(args: &[String]) -> Result<(), String> {
    let (stack, rest) = stack_option(args)?;
    let mut append = String::new();
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--append" => append = it.next().ok_or("--append needs a value")?.clone(),
            other => return Err(format!("iso: unknown option `{other}`")),
        }
    }
    let artifacts = build::build(&build::default_target_dir(), &stack)?;
    let out = build::default_target_dir().join("iso").join("stack.iso");
    xtask::iso::build_iso(&artifacts.microvisor, &artifacts.bundle, &append, &out)?;
    println!(
        "iso: {} ({} KiB): GRUB boots the microvisor by Multiboot2, the bundle as its module, console on COM1",
        out.display(),
        std::fs::metadata(&out).map(|m| m.len() / 1024).unwrap_or(0)
    );
    let mut machine = Machine::new(&artifacts);
    machine.cdrom = Some(out);
    println!("iso: in QEMU (the devices of the stack included): {}", machine.display_command(true));
    println!("iso: in Bochs: cargo xtask run --machine bochs");
    Ok(())
}

/// Boot the stack's GRUB ISO in Bochs; with `--smoke`, judge the run.
fn run_bochs(opts: &RunOptions) -> Result<(), String> {
    if opts.gdb || opts.port.is_some() {
        return Err("--gdb and --port are for QEMU; Bochs has its own debugger and no network here".into());
    }
    setup::ensure_bochs()?;
    let target = build::default_target_dir();
    let artifacts = build::build(&target, &opts.stack)?;
    let dir = target.join("bochs");
    // Bochs emulates an Intel CPU: it boots the VMX build.
    let microvisor = build::vmx_image(&artifacts.microvisor);
    let iso = xtask::iso::build_iso(&microvisor, &artifacts.bundle, &opts.append, &dir.join("stack.iso"))?;
    let machine = xtask::bochs::BochsMachine::new(&iso, &dir);
    let what = if opts.smoke { "smoke" } else { "xtask" };
    println!(
        "{what}: {} (CPU {}, {} MiB; bochsrc, COM1 and log in {})",
        machine.display_command(),
        machine.cpu_model,
        machine.memory_mib,
        dir.display()
    );
    let mut domains: Vec<&str> = vec![ipc_spec::DOM0_IMAGE];
    // A VM's console goes through its VMM: the domains that say "ready" themselves.
    let stack = &artifacts.stack;
    domains.extend(stack.domains.iter().filter(|d| !stack.vms.contains(d)).map(String::as_str));
    let ready = |lines: &[String], d: &str| {
        let prefix = format!("[{d}] ready");
        lines.iter().any(|l| l.starts_with(&prefix))
    };
    // Without --smoke the run goes on until Bochs ends (or an hour, or --timeout).
    let timeout = if opts.smoke || opts.timeout_given { opts.timeout } else { Duration::from_secs(3600) };
    let smoke = opts.smoke;
    let run =
        xtask::bochs::run_captured(&machine, timeout, true, |lines| smoke && domains.iter().all(|d| ready(lines, d)))?;
    let secs = run.elapsed.as_secs_f64();
    if !smoke {
        println!("xtask: Bochs ended after {secs:.1} s ({:?})", run.ending);
        return Ok(());
    }
    match run.ending {
        Ending::Stopped if run.has_line("entering VMX non-root mode with EPT and VPID") => {
            println!("smoke: OK on Bochs in {secs:.1} s: dom0 in VMX non-root mode; ready: {}", domains.join(", "));
            Ok(())
        }
        Ending::Stopped => Err("smoke: the domains came up, but not in VMX non-root mode with EPT and VPID".into()),
        Ending::TimedOut => Err(format!(
            "smoke: timed out after {} s on Bochs (see the console above; Bochs's log: {})",
            timeout.as_secs(),
            machine.log_path().display()
        )),
        Ending::Exited(code) => Err(format!(
            "smoke: Bochs ended (status {code:?}) after {secs:.1} s before {:?} reported ready; the end of its log:\n{}",
            domains.iter().filter(|d| !ready(&run.lines, d)).collect::<Vec<_>>(),
            run.stderr
        )),
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn test(args: &[String]) -> Result<(), String> {
    if let Some(a) = args.first() {
        return Err(format!("test: unknown option `{a}`"));
    }
    setup::ensure_target()?;
    setup::ensure_qemu()?;
    println!("xtask test: [1/3] host tests of the portable logic (cargo test --workspace --exclude stack-tests)");
    let ok = cargo()
        .args(["test", "--workspace", "--exclude", "stack-tests"])
        .status()
        .map_err(|e| format!("could not run cargo: {e}"))?
        .success();
    if !ok {
        return Err("host tests failed (see above)".into());
    }
    println!("xtask test: [2/3] building the bare-metal images");
    let target_dir = build::default_target_dir();
    let artifacts = build::build(&target_dir, &xtask::manifest::default_stack_path())?;
    println!("xtask test: [3/3] end-to-end tests in QEMU (cargo test -p stack-tests)");
    let ok = cargo()
        .args(["test", "-p", "stack-tests"])
        .env("STACK_MICROVISOR", &artifacts.microvisor)
        .env("STACK_BUNDLE", &artifacts.bundle)
        .env("STACK_IMAGES", &artifacts.images)
        .status()
        .map_err(|e| format!("could not run cargo: {e}"))?
        .success();
    if !ok {
        return Err("end-to-end tests failed (see above)".into());
    }
    println!("xtask test: all passed");
    Ok(())
}

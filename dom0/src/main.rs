//! dom0, the management domain. It holds the root capabilities (all free memory, the
//! machine), reads the stack manifest from the boot bundle the microvisor mapped for it,
//! builds every domain of the stack with hypercalls, and then handles their faults.
//!
//! Command-line switches (given to the microvisor as `dom0.<key>=<value>`):
//! - `on_ready=shutdown`: power the machine off after reporting ready (tests use it);
//! - `selftest=stage2-fault | triple-fault | bad-hypercall`: exercise a failure path.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("dom0 is a bare-metal domain image: build it with `cargo xtask build`");
    std::process::exit(2);
}

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod builder;
#[cfg(target_os = "none")]
mod ctl;
#[cfg(target_os = "none")]
mod supervise;

#[cfg(target_os = "none")]
mod dom0 {

    use alloc::vec::Vec;
    use domain_rt::hypercall::Message;
    use domain_rt::{hypercall, println, BootInfo};
    use ipc_spec::bundle::Bundle;
    use ipc_spec::exit::{access, ExitKind, ExitMessage};
    use ipc_spec::hypercall::dom0_slots;
    use ipc_spec::manifest::{self, MANIFEST_ENTRY};

    use crate::{builder, ctl, supervise};
    use ipc_spec::hypercall::{CPUID_LEAF_ABI, CPUID_LEAF_SIGNATURE, CPUID_SIGNATURE};

    domain_rt::domain_main!(main);

    /// A guest-physical address far outside dom0's RAM (but inside its own page tables).
    const OUTSIDE_RAM: u64 = 0x8000_0000;

    fn main(info: &BootInfo) -> u64 {
        let guest_mode = report_guest_mode();
        let ram: u64 = info.start_info.memmap().filter(|e| e.r#type == 1).map(|e| e.size).sum();
        println!("dom0 starting: {} MiB RAM, command line \"{}\"", ram >> 20, info.cmdline);

        let Some(module) = info.start_info.modules().next() else {
            println!("no boot bundle module: nothing to build");
            return 1;
        };
        // SAFETY: the microvisor mapped the bundle read-only at this guest-physical range
        // (module 0 of the start info); dom0's page tables identity-map it.
        let bytes = unsafe { core::slice::from_raw_parts(module.paddr as *const u8, module.size as usize) };
        let bundle = match Bundle::parse(bytes) {
            Ok(bundle) => bundle,
            Err(e) => {
                println!("boot bundle unreadable: {e}");
                return 2;
            }
        };
        let names: Vec<_> = bundle.entries().map(|e| (e.name, e.data.len())).collect();
        println!("boot bundle: {} entries: {:?}", names.len(), names);

        match info.arg("selftest") {
            Some("stage2-fault") => {
                println!("selftest: reading guest-physical {OUTSIDE_RAM:#x}, outside my RAM");
                // SAFETY: deliberately touching memory dom0 does not own; the microvisor
                // must stop this domain with a stage-2 fault report.
                let v = unsafe { core::ptr::read_volatile(OUTSIDE_RAM as *const u64) };
                println!("selftest FAILED: the read returned {v:#x}");
                return 3;
            }
            Some("triple-fault") => {
                println!("selftest: loading an empty IDT and raising #BP");
                // SAFETY: deliberately makes every exception unhandleable, so INT3 escalates
                // to a triple fault, which the microvisor must report.
                unsafe {
                    let null: [u8; 10] = [0; 10];
                    core::arch::asm!("lidt [{}]", "int3", in(reg) &null);
                }
                println!("selftest FAILED: survived a triple fault");
                return 3;
            }
            Some("bad-hypercall") => {
                let status = hypercall::call2(0xdead_beef, 0, 0);
                println!("selftest: unknown hypercall returned status {status}");
                let status = hypercall::call2(ipc_spec::Hypercall::ConsoleWrite.number(), OUTSIDE_RAM, 16);
                println!("selftest: console write from outside RAM returned status {status}");
                let status = hypercall::call2(ipc_spec::Hypercall::ConsoleWrite.number(), 0x1000, 1 << 20);
                println!("selftest: oversized console write returned status {status}");
            }
            Some(other) => println!("unknown selftest \"{other}\" ignored"),
            None => {}
        }

        let stack = match bundle.get(MANIFEST_ENTRY) {
            None => {
                println!("no stack manifest in the bundle: nothing to build");
                None
            }
            Some(bytes) => match manifest::decode(bytes) {
                Err(e) => {
                    println!("stack manifest unreadable: {e}");
                    return 5;
                }
                Ok(m) => {
                    let images: Vec<&str> = bundle.entries().map(|e| e.name).collect();
                    if let Err(problems) = manifest::validate(&m, &images) {
                        for p in problems {
                            println!("stack manifest: {p}");
                        }
                        return 5;
                    }
                    // dom0's own objects first: a fuzzer's baseline (taken while building)
                    // must not see them appear.
                    let wake = match builder::hc(ipc_spec::Hypercall::NotificationCreate, dom0_slots::MEMORY, [0; 6]) {
                        Ok(r) => r.args[0],
                        Err(e) => {
                            println!("wake notification: {e}");
                            return 6;
                        }
                    };
                    let control = ctl::Control::open(&m, wake);
                    match builder::build(&bundle, &m) {
                        Ok(s) => Some((s, wake, control)),
                        Err(e) => {
                            println!("building the stack failed: {e}");
                            return 6;
                        }
                    }
                }
            },
        };

        let mode = if hypercall::on_vmx() { " (in VMX non-root mode)" } else { " (in SVM guest mode)" };
        println!("ready{}", if guest_mode { mode } else { "" });
        if info.arg("on_ready") == Some("shutdown") {
            let e = hypercall::shutdown(ipc_spec::hypercall::dom0_slots::MACHINE, 0);
            println!("shutdown refused: {e}");
            return 4;
        }
        match (stack, bundle.get(MANIFEST_ENTRY).and_then(|b| manifest::decode(b).ok())) {
            (Some((mut s, wake, control)), Some(m)) => handle_faults(&mut s, &bundle, &m, wake, control),
            _ => loop {
                // SAFETY: HLT only waits; the microvisor intercepts it and parks this vCPU.
                unsafe { core::arch::asm!("hlt") };
            },
        }
    }

    /// dom0's event loop. Every domain's faults (and DomainExits) arrive as exit messages
    /// (`ipc_spec::exit`): dom0 reports the fault and tears the domain down, which returns
    /// its memory, and its restart policy decides what follows (`supervise.rs`). A
    /// notification bound to the same receive wakes it for the periodic tick (hang
    /// watchdog, restarts after a backoff) and for the host control device (`ctl.rs`).
    fn handle_faults(
        stack: &mut builder::Stack,
        bundle: &Bundle,
        m: &manifest::Manifest,
        wake: u64,
        mut control: Option<ctl::Control>,
    ) -> ! {
        if let Err(e) = hypercall::bind_receive(wake) {
            println!("binding the wake notification to my receive: {e}");
        }
        let polled = control.as_ref().is_some_and(|c| !c.interrupts);
        let mut sup = supervise::Supervisor::new(stack, m, wake, polled);
        let mut reply: Option<Message> = None;
        loop {
            // Before blocking: the wake timer for whatever is due next.
            sup.arm();
            let next = match reply.take() {
                Some(r) => hypercall::ipc_reply_recv(stack.fault_endpoint, &r),
                None => hypercall::ipc_recv(stack.fault_endpoint),
            };
            let (msg, badge) = match next {
                Ok(m) => m,
                Err(e) => {
                    println!("fault endpoint: {e}");
                    hypercall::domain_exit(7)
                }
            };
            let w = msg.words;
            if badge == ipc_spec::hypercall::NOTIFICATION_BADGE {
                sup.tick(stack, bundle, m);
                if let Some(c) = control.as_mut() {
                    serve_control(c, &mut sup, stack, bundle, m);
                }
                continue;
            }
            if badge & ipc_spec::status::STATUS_BADGE != 0 {
                reply = Some(Message::new(&status_of(stack, w[0])));
                continue;
            }
            let who = stack.domains.get((badge as usize).wrapping_sub(1));
            let name = who.map_or("?", |d| d.name.as_str());
            match ExitMessage::decode(&w) {
                Some(x) if x.kind == ExitKind::Exited => println!("{name} exited with status {}", x.b),
                Some(x) if x.kind == ExitKind::Stage2 => println!(
                    "fault in {name}: stage-2 {} at guest-physical {:#x}, RIP {:#x}",
                    if x.b & access::EXECUTE != 0 {
                        "execute"
                    } else if x.b & access::WRITE != 0 {
                        "write"
                    } else {
                        "read"
                    },
                    x.a,
                    x.rip
                ),
                Some(x) if x.kind == ExitKind::Dma => {
                    let d = ipc_spec::exit::Dma::decode(x.b);
                    println!(
                        "fault in {name}: its device {:02x}:{:02x}.{} tried to DMA ({}) at {:#x}, outside its memory; blocked by the IOMMU",
                        d.requester >> 8,
                        (d.requester >> 3) & 31,
                        d.requester & 7,
                        if d.write { "write" } else { "read" },
                        x.a
                    )
                }
                Some(x) => println!("fault in {name}: {:?} ({:#x}, {:#x}) at RIP {:#x}", x.kind, x.a, x.b, x.rip),
                None => println!("fault in {name}: unknown message {w:?}"),
            }
            if let Some(d) = who {
                let index = (badge as usize).wrapping_sub(1);
                let baseline = d.fuzz_baseline;
                let fuzzer = d.name.clone();
                supervise::destroy(stack, index);
                if let Some(before) = baseline {
                    fuzz_verdict(&fuzzer, &w, before);
                }
                sup.failed(stack, bundle, m, index, supervise::Cause::Fault);
            }
        }
    }

    /// Answer every complete request line waiting on the control device.
    fn serve_control(
        c: &mut ctl::Control,
        sup: &mut supervise::Supervisor,
        stack: &mut builder::Stack,
        bundle: &Bundle,
        m: &manifest::Manifest,
    ) {
        use ipc_spec::ctl::{self as proto, Command};
        while let Some(request) = c.next_request() {
            let line = match request {
                Ok(l) => l,
                Err(()) => {
                    c.send_line(&alloc::format!("{}{}", proto::ERROR, proto::ParseError::TooLong));
                    continue;
                }
            };
            let answer = match proto::parse(&line) {
                Err(e) => Err(alloc::format!("{e}")),
                Ok(Command::Help) => {
                    for h in proto::HELP {
                        c.send_line(h);
                    }
                    Ok(alloc::string::String::new())
                }
                Ok(Command::List) => {
                    let mut lines = Vec::new();
                    sup.list(stack, |l| lines.push(alloc::string::String::from(l)));
                    for l in &lines {
                        c.send_line(l);
                    }
                    Ok(alloc::string::String::new())
                }
                Ok(Command::Kill(name)) => sup.kill(stack, bundle, m, name),
                Ok(Command::Restart(name)) => sup.restart(stack, bundle, m, name),
            };
            match answer {
                Ok(words) if words.is_empty() => c.send_line(proto::OK),
                Ok(words) => c.send_line(&alloc::format!("{} {words}", proto::OK)),
                Err(e) => c.send_line(&alloc::format!("{}{e}", proto::ERROR)),
            }
        }
    }

    /// After a fuzzer's end (message words `w`) and destruction: did it exit cleanly, and
    /// is every frame and kernel object back? One PASS or FAIL line with the numbers.
    fn fuzz_verdict(name: &str, w: &[u64; 6], before: builder::MachineStatus) {
        let after = match builder::machine_status() {
            Ok(a) => a,
            Err(e) => {
                println!("fuzz: FAIL: {e}");
                return;
            }
        };
        let mut line = alloc::string::String::new();
        let mut leaks = 0;
        for (i, field) in builder::MACHINE_STATUS_FIELDS.iter().enumerate() {
            use core::fmt::Write as _;
            let _ = write!(line, " {field} {}->{}", before[i], after[i]);
            if before[i] != after[i] {
                leaks += 1;
                let _ = write!(line, " ({:+})", after[i] as i64 - before[i] as i64);
            }
        }
        let exited = ExitMessage::decode(w).is_some_and(|x| x.kind == ExitKind::Exited);
        if !exited || w[3] != 0 {
            println!("fuzz: FAIL: {name} did not exit cleanly (message {:#x?})", &w[..4]);
        }
        if leaks == 0 {
            println!("fuzz: PASS: no leak after destroying {name}:{line}");
        } else {
            println!("fuzz: FAIL: leak after destroying {name}:{line}");
        }
    }

    /// The status service's answer about domain `index` (0: dom0, then the manifest's).
    fn status_of(stack: &builder::Stack, index: u64) -> [u64; 6] {
        use ipc_spec::status::{name_bytes, DomainState, DomainStatusReply};
        let (name, slot) = match usize::try_from(index) {
            Ok(0) => ("dom0", dom0_slots::SELF_DOMAIN),
            Ok(i) => match stack.domains.get(i - 1) {
                Some(d) => (d.name.as_str(), d.slot),
                None => return [0; 6],
            },
            Err(_) => return [0; 6],
        };
        let mut reply = DomainStatusReply {
            name: name_bytes(name),
            state: DomainState::Destroyed,
            vcpus: 0,
            stopped: 0,
            ram_mib: 0,
            ipc_calls: 0,
            signals: 0,
        };
        // A destroyed domain's capability is revoked: the hypercall fails.
        if let Ok(r) = hypercall::call(ipc_spec::Hypercall::DomainStatus, slot, [0; 6]) {
            reply.state = DomainState::Alive;
            (reply.vcpus, reply.stopped) = (r.args[0] as u16, r.args[1] as u16);
            (reply.ipc_calls, reply.signals, reply.ram_mib) = (r.args[2], r.args[3], r.args[4] as u32);
        }
        reply.encode()
    }

    /// Ask CPUID whether we run under a hypervisor and which one.
    fn report_guest_mode() -> bool {
        let leaf1 = core::arch::x86_64::__cpuid(1);
        let hypervisor = leaf1.ecx & (1 << 31) != 0;
        let sig = core::arch::x86_64::__cpuid(CPUID_LEAF_SIGNATURE);
        let mut name = [0u8; 12];
        name[0..4].copy_from_slice(&sig.ebx.to_le_bytes());
        name[4..8].copy_from_slice(&sig.ecx.to_le_bytes());
        name[8..12].copy_from_slice(&sig.edx.to_le_bytes());
        let abi = core::arch::x86_64::__cpuid(CPUID_LEAF_ABI).eax;
        let ours = hypervisor && name == CPUID_SIGNATURE;
        println!(
            "CPUID: hypervisor bit {}, signature \"{}\", ABI {}",
            if hypervisor { "set" } else { "clear" },
            core::str::from_utf8(&name).unwrap_or("?").trim_end(),
            abi
        );
        ours
    }
}

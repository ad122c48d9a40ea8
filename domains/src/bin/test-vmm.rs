//! A small VMM for the end-to-end tests: it serves the exits of one VM (`tiny-vm`),
//! emulating port I/O, CPUID, MSRs, a little MMIO device (decoding the guest's MOV), the
//! console and exit hypercalls of the domain runtime, and a timer it injects as virtual
//! interrupt [`domain_rt::irq::TIMER_VECTOR`]. Exits and its timer arrive in one receive
//! loop (the timer notification is bound to the receive).
//!
//! dom0 gives it `vm=` (the VM's domain, right VMM), `vcpu=`, `exits=` (receive right of the
//! VM's exit endpoint) and `vm_ram=` (bytes); `timer=` is its own timer. With `mode=rogue`
//! it serves a hostile VM generically and pauses it after a while.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
mod vmm {
    use domain_rt::exits::{register_message_page, serve, state_words as page, ExitHandler};
    use domain_rt::hypercall;
    use domain_rt::{println, BootInfo};
    use ipc_spec::exit::{at, set, state, Event, ExitKind, ExitMessage, ExitReply};
    use ipc_spec::Hypercall;

    domain_rt::domain_main!(main);

    /// Where the VM's RAM appears in this domain.
    const VIEW: u64 = 0x8000_0000;
    /// The test device's registers (guest-physical).
    const DEVICE: u64 = 0xfe00_0000;
    /// What its identification register reads.
    const DEVICE_ID: u64 = 0x7e57_0001;
    /// The CPUID signature leaf's answer (EBX, ECX, EDX).
    const SIGNATURE: &[u8; 12] = b"TinyVMM test";
    /// A timer tick, nanoseconds.
    const TICK_NS: u64 = 10_000_000;
    /// How long a rogue VM runs before it is paused.
    const ROGUE_NS: u64 = 3_000_000_000;

    struct Vmm {
        rogue: bool,
        vm: u64,
        vcpu: u64,
        timer: u64,
        vm_ram: u64,
        exits: u64,
        last_out: Option<u64>,
        device_reg: u64,
        msrs: [(u32, u64); 8],
        ticks_wanted: u64,
        ticks: u64,
        console_lines: u64,
        kinds: [u64; 12],
        finished: bool,
    }

    fn main(info: &BootInfo) -> u64 {
        let slot = |k: &str| info.slot(k);
        let (Some(vm), Some(vcpu), Some(exits), Some(timer)) = (slot("vm"), slot("vcpu"), slot("exits"), slot("timer"))
        else {
            println!("missing vm=, vcpu=, exits= or timer= on the command line");
            return 1;
        };
        let vm_ram = slot("vm_ram").unwrap_or(0);
        let setup = register_message_page()
            .and_then(|()| hypercall::map_vm_ram(vm, VIEW))
            .and_then(|()| hypercall::bind_receive(timer));
        if let Err(e) = setup {
            println!("setting up: {e}");
            return 2;
        }
        let mut v = Vmm {
            rogue: info.arg("mode") == Some("rogue"),
            vm,
            vcpu,
            timer,
            vm_ram,
            exits: 0,
            last_out: None,
            device_reg: 0,
            msrs: [(0, 0); 8],
            ticks_wanted: 0,
            ticks: 0,
            console_lines: 0,
            kinds: [0; 12],
            finished: false,
        };
        if v.rogue {
            let _ = hypercall::timer_set(timer, ROGUE_NS, 1);
        }
        println!("ready: serving the exits of its VM ({} MiB seen at {VIEW:#x})", vm_ram >> 20);
        serve(exits, &mut v)
    }

    impl ExitHandler for Vmm {
        fn wake(&mut self) -> Option<u64> {
            self.timer_fired();
            None
        }

        fn exit(&mut self, x: &ExitMessage) -> Result<ExitReply, u64> {
            Ok(self.handle(x))
        }
    }

    impl Vmm {
        fn handle(&mut self, x: &ExitMessage) -> ExitReply {
            self.exits += 1;
            self.kinds[x.kind as usize % 12] += 1;
            match x.kind {
                ExitKind::Io => self.io(x),
                ExitKind::Cpuid => self.cpuid(x),
                ExitKind::Msr => self.msr(x),
                ExitKind::Stage2 => self.mmio(x),
                ExitKind::Hypercall => self.hypercall(x),
                kind => {
                    if !self.rogue || self.kinds[kind as usize % 12] == 1 {
                        println!("VM: {kind:?} ({:#x}, {:#x}) at RIP {:#x}: stopping it", x.a, x.b, x.rip);
                    }
                    self.finish();
                    ExitReply::STOP
                }
            }
        }

        fn io(&mut self, x: &ExitMessage) -> ExitReply {
            let Some(io) = x.io() else { return ExitReply::STOP };
            if io.write {
                match (io.port, self.rogue) {
                    (0x80, false) => self.last_out = Some(x.b),
                    (0x70, false) => {
                        self.ticks_wanted = x.b;
                        let _ = hypercall::timer_set(self.timer, TICK_NS, 1);
                    }
                    _ => {}
                }
                return ExitReply::NEXT;
            }
            let value = match (io.port, self.rogue) {
                (0x71, false) => 0xab,
                (0x72, false) => 0xdead_beef,
                _ => u64::MAX,
            };
            ExitReply::next_with(set::RAX, [io.merge_in(x.rax, value), 0, 0, 0])
        }

        fn cpuid(&mut self, x: &ExitMessage) -> ExitReply {
            let Some((leaf, subleaf)) = x.cpuid() else { return ExitReply::STOP };
            let word =
                |i: usize| u32::from_le_bytes([SIGNATURE[i], SIGNATURE[i + 1], SIGNATURE[i + 2], SIGNATURE[i + 3]]);
            let (a, b, c, d) = match leaf {
                0x4000_0000 => (0x4000_0000, word(0), word(4), word(8)),
                // Everything else as this domain sees it (the microvisor's answers).
                _ => {
                    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
                    (r.eax, r.ebx, r.ecx, r.edx)
                }
            };
            let all = set::RAX | set::RCX | set::RDX | set::RBX;
            ExitReply::next_with(all, [a as u64, c as u64, d as u64, b as u64])
        }

        fn msr(&mut self, x: &ExitMessage) -> ExitReply {
            let Some((index, write, value)) = x.msr() else { return ExitReply::STOP };
            let found = self.msrs.iter().position(|&(i, _)| i == index);
            if write {
                match found.or_else(|| self.msrs.iter().position(|&(i, _)| i == 0)) {
                    Some(slot) => self.msrs[slot] = (index, value),
                    None => return ExitReply { inject: Some(Event::Exception(13, Some(0))), ..ExitReply::RETRY },
                }
                return ExitReply::NEXT;
            }
            let v = found.map_or(0, |s| self.msrs[s].1);
            ExitReply::next_with(set::RAX | set::RDX, [v & 0xffff_ffff, 0, v >> 32, 0])
        }

        /// MMIO: decode the MOV at RIP (the guest identity-maps its memory, so RIP is a
        /// guest-physical address), emulate the device, skip the instruction.
        fn mmio(&mut self, x: &ExitMessage) -> ExitReply {
            let Some((gpa, _)) = x.stage2() else { return ExitReply::STOP };
            let gprs = x.state & state::GPR != 0;
            let code = if gprs && x.rip < self.vm_ram.saturating_sub(16) {
                // SAFETY: VIEW maps all of the VM's RAM (vm_ram bytes) read-write in this
                // domain; 16 bytes from RIP lie inside it. The guest may change them at
                // any time, which only makes the decode fail or differ.
                Some(unsafe { core::ptr::read_volatile((VIEW + x.rip) as *const [u8; 16]) })
            } else {
                None
            };
            let Some(mov) = code.and_then(|c| domains::mmio::decode(&c)) else {
                if !self.rogue {
                    println!("MMIO at {gpa:#x}: cannot decode the instruction at RIP {:#x}", x.rip);
                }
                // #UD: the guest's own handler decides.
                return ExitReply { inject: Some(Event::Exception(6, None)), ..ExitReply::RETRY };
            };
            let regs = page();
            let reg = regs[at::GPR + mov.reg];
            let advance = ExitReply { advance_by: mov.len, ..ExitReply::NEXT };
            if mov.write {
                if gpa == DEVICE + 0x10 {
                    self.device_reg = mov.store(reg);
                }
                return advance;
            }
            let value = match gpa {
                DEVICE => DEVICE_ID,
                a if a == DEVICE + 0x10 => self.device_reg,
                _ => u64::MAX,
            };
            let new = mov.load(reg, value);
            // RAX, RCX, RDX, RBX are encodings 0..3, the reply's `set` bits in that order.
            if mov.reg < 4 {
                let mut values = [0; 4];
                values[mov.reg] = new;
                return ExitReply { set: 1 << mov.reg, values, ..advance };
            }
            regs[at::GPR + mov.reg] = new;
            ExitReply { write_state: state::GPR, ..advance }
        }

        /// The domain runtime's hypercalls, for a guest built with it: console output and
        /// exit. Anything else fails with UnknownHypercall.
        fn hypercall(&mut self, x: &ExitMessage) -> ExitReply {
            let regs = page();
            let (nr, a0, a1) = (x.rax, regs[at::GPR + 7], regs[at::GPR + 6]); // RDI, RSI
            if nr == Hypercall::ConsoleWrite.number() {
                if a1 <= 4096 && a0.checked_add(a1).is_some_and(|end| end <= self.vm_ram) {
                    // SAFETY: [a0, a0 + a1) lies in the VM's RAM, which VIEW maps; the bytes
                    // are copied out before use.
                    let bytes = unsafe { core::slice::from_raw_parts((VIEW + a0) as *const u8, a1 as usize) };
                    let mut buf = [0u8; 4096];
                    buf[..bytes.len()].copy_from_slice(bytes);
                    self.console(&buf[..bytes.len()]);
                    return ExitReply::next_with(set::RAX, [0; 4]);
                }
                return ExitReply::next_with(set::RAX, [ipc_spec::Error::BadAddress.code(), 0, 0, 0]);
            }
            if nr == Hypercall::DomainExit.number() {
                println!("VM exited with status {a0}");
                self.finish();
                return ExitReply::STOP;
            }
            ExitReply::next_with(set::RAX, [ipc_spec::Error::UnknownHypercall.code(), 0, 0, 0])
        }

        fn console(&mut self, bytes: &[u8]) {
            self.console_lines += 1;
            if self.rogue && self.console_lines > 20 {
                return;
            }
            for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                match core::str::from_utf8(line) {
                    Ok(text) if text.chars().all(|c| !c.is_control()) => println!("guest: {text}"),
                    _ => println!("guest: ({} bytes that are not text)", line.len()),
                }
            }
        }

        fn timer_fired(&mut self) {
            if self.rogue {
                let pause = hypercall::domain_pause(self.vm, true);
                println!(
                    "rogue VM contained: {} exits handled ({} port I/O, {} MMIO, {} CPUID, {} MSR, {} hypercalls, {} faults); pausing it: {:?}",
                    self.exits,
                    self.kinds[ExitKind::Io as usize],
                    self.kinds[ExitKind::Stage2 as usize],
                    self.kinds[ExitKind::Cpuid as usize],
                    self.kinds[ExitKind::Msr as usize],
                    self.kinds[ExitKind::Hypercall as usize],
                    self.kinds[ExitKind::Exception as usize] + self.kinds[ExitKind::Shutdown as usize],
                    pause
                );
                return;
            }
            if self.ticks >= self.ticks_wanted {
                return;
            }
            match hypercall::vcpu_inject(self.vcpu, domain_rt::irq::TIMER_VECTOR) {
                Ok(()) => self.ticks += 1,
                Err(e) => println!("injecting the timer: {e}"),
            }
            if self.ticks < self.ticks_wanted {
                let _ = hypercall::timer_set(self.timer, TICK_NS, 1);
            }
        }

        /// The VM is done: what the VMM saw, for the test to check.
        fn finish(&mut self) {
            if self.finished || self.rogue {
                return;
            }
            self.finished = true;
            let (index, value) = self.msrs[0];
            println!(
                "VM results: OUT {:#x}, MMIO register {:#x}, MSR {index:#x} = {value:#x}, {} timer ticks injected, {} exits",
                self.last_out.unwrap_or(0),
                self.device_reg,
                self.ticks,
                self.exits
            );
        }
    }
}

//! Serving the VM: each exit goes to the platform's models (`vmm::platform`), the answer goes
//! back as the exit's reply; between exits the VMM injects the interrupts the models raise,
//! writes the console's lines, takes typed input, and arms its timer for the earliest of the
//! APIC timer's deadline, a partial console line's flush and the next input poll.

use alloc::string::String;
use core::arch::x86_64::__cpuid_count;

use domain_rt::exits::{state_words as page, ExitHandler};
use domain_rt::hypercall::{self, raw};
use domain_rt::println;
use ipc_spec::exit::{at, seg, set, state, Event, ExitKind, ExitMessage, ExitReply, Segment};
use ipc_spec::Hypercall;
use vmm::console::ConsoleOut;
use vmm::cpuid::CpuidResult;
use vmm::memory::SliceMemory;
use vmm::mmio::{fetch_instruction, CpuMode, PagingRegs, MAX_INSTRUCTION_LEN};
use vmm::platform::Platform;
use vmm::power::PowerEvent;
use vmm::stall::StallWatch;
use vmm::stats::{ExitStats, Kind};
use vmm::timebase::{ns_until, ticks_in};
use vmm::virtio::pci_bus::PciBus;

use crate::devices::{self, Devices};
use crate::setup::rdtsc;

/// The line of the initramfs's `/init` at which boot times are measured
/// (`xtask::linux::INIT_MARKER`): the histogram is printed when it passes.
const INIT_MARKER: &[u8] = b"linux-init: reached init";
/// Lines of `cargo xtask bench linux-io`'s guest program (`linux-iobench`) and script around
/// each workload (`xtask::bench_linux_io::MARK`): the counters are printed after each, so the
/// host can tell each workload's exits apart.
const BENCH_MARK: &[u8] = b"linux-io: mark";
/// A partial console line (a prompt) goes out after this long without a newline.
const PARTIAL_FLUSH_NS: u64 = 150_000_000;
/// ... and only if no byte came this long after it was first found due (the VM may just not
/// have run: `vmm::console`).
const PARTIAL_GRACE_NS: u64 = 30_000_000;
/// How often typed input is polled while there is console input.
const INPUT_POLL_NS: u64 = 20_000_000;
/// KVM's "no such hypercall" (-KVM_ENOSYS), the answer to a VMMCALL.
const KVM_ENOSYS: u64 = (-1000i64) as u64;
/// How long a panicking kernel may take to reset the VM before the VMM stops it (a kernel
/// told `panic=0` waits forever; one that resets does so at once).
const PANIC_GRACE_NS: u64 = 2_000_000_000;
/// ... and after at least this many more exits (about 2 s of a 250 Hz tick and its EOI).
const PANIC_GRACE_EXITS: u64 = 1_000;
/// A device with work outstanding and no progress for this long gets a stall report
/// (`vmm::stall`): one line per device with the state that says where the work stopped.
const STALL_REPORT_NS: u64 = 5_000_000_000;
/// Messages about unclaimed MMIO printed before they are only counted.
const UNCLAIMED_REPORTS: u64 = 8;

#[repr(C, align(4096))]
#[allow(dead_code)] // written by the microvisor, read through a cast pointer
struct InputBuf([u8; ipc_spec::hypercall::CONSOLE_INPUT_BUFFER]);
static mut INPUT: InputBuf = InputBuf([0; ipc_spec::hypercall::CONSOLE_INPUT_BUFFER]);

pub struct Vmm {
    platform: Platform,
    /// The virtio functions and the driver VMs' doorbells.
    devices: Devices,
    mem: SliceMemory<'static>,
    vm: u64,
    vcpu: u64,
    exits: u64,
    timer: u64,
    console: Option<u64>,
    tsc_hz: u64,
    stats: ExitStats,
    out: ConsoleOut,
    /// The TSC the timer is armed for.
    armed: Option<u64>,
    next_poll: u64,
    /// The guest said it panicked (a console line).
    panicked: bool,
    unclaimed_reported: u64,
    boot_tsc: u64,
    /// After a panic line: when (TSC) and after how many exits in all the VMM stops the VM
    /// if the kernel has not reset it.
    panic_deadline: Option<(u64, u64)>,
    /// Receives ended by a notification (the timer or a driver VM's doorbell).
    wakes: u64,
    /// Per device ([`devices::BLOCK`], [`devices::NET`]): the stall report's trigger.
    stalls: [StallWatch; 2],
    /// The last vector injected (for the stall report).
    last_injected: Option<u8>,
}

impl Vmm {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        platform: Platform,
        devices: Devices,
        mem: SliceMemory<'static>,
        vm: u64,
        vcpu: u64,
        exits: u64,
        timer: u64,
        console: Option<u64>,
        tsc_hz: u64,
    ) -> Self {
        let now = rdtsc();
        Self {
            platform,
            devices,
            mem,
            vm,
            vcpu,
            exits,
            timer,
            console,
            tsc_hz,
            stats: ExitStats::new(),
            out: ConsoleOut::new(),
            armed: None,
            next_poll: now,
            panicked: false,
            unclaimed_reported: 0,
            boot_tsc: now,
            panic_deadline: None,
            wakes: 0,
            stalls: [StallWatch::new(ticks_in(STALL_REPORT_NS, tsc_hz)); 2],
            last_injected: None,
        }
    }

    pub fn exits_slot(&self) -> u64 {
        self.exits
    }

    /// Before waiting: inject what is pending, arm the timer for the earliest thing due.
    pub fn before_wait(&mut self) {
        self.poll_devices();
        for _ in 0..4 {
            let Some(v) = self.platform.pending_interrupt() else { break };
            if let Err(e) = hypercall::vcpu_inject(self.vcpu, v) {
                println!("injecting vector {v:#x}: {e}");
                break;
            }
            self.platform.acknowledge(v);
            self.stats.count(Kind::Injected);
            self.last_injected = Some(v);
        }
        let now = rdtsc();
        self.watch_stalls(now);
        let mut next = self.platform.next_deadline();
        for w in &self.stalls {
            if let Some(t) = w.deadline() {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        let flush = self.out.due(ticks_in(PARTIAL_FLUSH_NS, self.tsc_hz), ticks_in(PARTIAL_GRACE_NS, self.tsc_hz));
        let poll = self.console.map(|_| self.next_poll);
        for t in [flush, poll, self.panic_deadline.map(|(t, _)| t)].into_iter().flatten() {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        if let Some(t) = next {
            if self.armed != Some(t) {
                let ns = ns_until(t, now, self.tsc_hz).max(1_000);
                match hypercall::timer_set(self.timer, ns, 1) {
                    Ok(()) => self.armed = Some(t),
                    Err(e) => println!("arming the timer: {e}"),
                }
            }
        }
    }

    /// Moves work between the virtqueues and the driver VMs and raises the interrupts the
    /// functions signal. Runs before every receive. The doorbells' bits are not taken here
    /// (that was two Poll hypercalls per exit, a third of the world switches per disk
    /// request): bits a doorbell left while the VMM was busy make its next receive return
    /// at once (the microvisor looks at every notification bound to a receive), so a ring
    /// is never slept through; at worst it costs one wake with nothing new.
    fn poll_devices(&mut self) {
        if self.devices.waits.is_empty() {
            return;
        }
        let before = devices::blk_in_flight(&mut self.devices.bus);
        self.devices.bus.poll(&mut self.mem);
        if devices::blk_in_flight(&mut self.devices.bus) < before {
            devices::answered(devices::BLOCK);
        }
        self.devices.report_errors();
        self.devices.report_restarts();
        for m in self.devices.bus.take_messages() {
            // A message to another APIC or not a fixed vector is the guest's own choice;
            // it is dropped (this VM has one vCPU).
            let _ = self.platform.deliver_msi(m);
        }
    }

    /// Reports each device that has had work outstanding without progress for
    /// [`STALL_REPORT_NS`] (then again after doubling gaps while the stall lasts): a report,
    /// never a retry, so a lost wake-up or interrupt shows where it was lost. The doorbell
    /// bits are not shown: reading them takes them (Poll).
    fn watch_stalls(&mut self, now: u64) {
        if self.devices.waits.is_empty() {
            return;
        }
        let activity = self.devices.activity(&self.mem);
        let mut reported = false;
        for (which, (busy, progress)) in activity.into_iter().enumerate() {
            if !self.stalls[which].check(now, busy, progress) {
                continue;
            }
            let secs = self.stalls[which].stalled_for(now) / self.tsc_hz.max(1);
            self.devices.stall_report(which, &self.mem, secs);
            reported = true;
        }
        if reported {
            let apic = self.platform.apic();
            println!(
                "STALL guest: apic irr_highest={:?} isr_highest={:?} ppr={:#x} deliverable={:?} last_injected={:?} injected={} exits={} wakes={} timer_armed={} apic_deadline={:?} now={now}",
                apic.irr().highest(),
                apic.isr().highest(),
                apic.ppr(),
                self.platform.pending_interrupt(),
                self.last_injected,
                self.stats.get(Kind::Injected),
                self.stats.exits(),
                self.wakes,
                self.armed.is_some(),
                self.platform.next_deadline(),
            );
        }
    }

    /// A notification (the timer or a driver VM's doorbell) woke the VMM.
    pub fn wake(&mut self) -> Option<u64> {
        self.armed = None;
        self.wakes += 1;
        let now = rdtsc();
        if self.platform.timer(now) {
            self.stats.count(Kind::Timer);
        }
        if let Some(slot) = self.console {
            if now >= self.next_poll {
                self.poll_input(slot);
                self.next_poll = now + ticks_in(INPUT_POLL_NS, self.tsc_hz);
            }
        }
        let (delay, grace) = (ticks_in(PARTIAL_FLUSH_NS, self.tsc_hz), ticks_in(PARTIAL_GRACE_NS, self.tsc_hz));
        if let Some(line) = self.out.flush_due(now, delay, grace) {
            write_console(&line);
        }
        if let Some((_, exits)) = self.panic_deadline.filter(|&(t, _)| now >= t) {
            // The grace is counted in the guest's progress too, not wall time alone: under
            // TCG on a loaded host the kernel's reset path can take seconds of wall time.
            // A kernel that panicked and loops (panic=0) keeps taking its timer's exits.
            if self.stats.exits() >= exits + PANIC_GRACE_EXITS {
                return self.stop("the kernel panicked (and did not reset the VM)", 4).err();
            }
            self.panic_deadline = Some((now + ticks_in(PANIC_GRACE_NS / 20, self.tsc_hz), exits));
        }
        None
    }

    fn poll_input(&mut self, slot: u64) {
        // SAFETY: INPUT is only used here, by this single-threaded domain; the microvisor
        // writes into it during the hypercall only.
        let buf = unsafe { &mut *(&raw mut INPUT).cast::<[u8; ipc_spec::hypercall::CONSOLE_INPUT_BUFFER]>() };
        // Take only what the UART's backlog keeps: the rest waits in the microvisor's buffer
        // (which stops reading the real UART when full), so fast typing or a slow guest
        // loses nothing.
        let want = buf.len().min(self.platform.input_room());
        if want == 0 {
            return;
        }
        let r = raw(Hypercall::ConsoleRead.number(), slot, 0, [buf.as_ptr() as u64, want as u64, 0, 0, 0, 0]);
        if ipc_spec::hypercall::result_of(r.rax).is_err() {
            println!("console input unavailable: {:?}", ipc_spec::hypercall::result_of(r.rax));
            self.console = None;
            return;
        }
        let n = (r.args[0] as usize).min(want);
        if n > 0 {
            self.platform.input(&buf[..n]);
        }
    }

    pub fn handle(&mut self, x: &ExitMessage) -> Result<ExitReply, u64> {
        let reply = match x.kind {
            ExitKind::Io => self.io(x),
            ExitKind::Cpuid => {
                self.stats.count(Kind::Cpuid);
                let (leaf, sub) = x.cpuid().unwrap_or((0, 0));
                let host = |l: u32, s: u32| {
                    let r = __cpuid_count(l, s);
                    CpuidResult { eax: r.eax, ebx: r.ebx, ecx: r.ecx, edx: r.edx }
                };
                let r = self.platform.cpuid(&host, leaf, sub);
                let all = set::RAX | set::RCX | set::RDX | set::RBX;
                Ok(ExitReply::next_with(all, [r.eax.into(), r.ecx.into(), r.edx.into(), r.ebx.into()]))
            }
            ExitKind::Msr => self.msr(x),
            ExitKind::Stage2 => self.mmio(x),
            ExitKind::Hypercall => {
                self.stats.count(Kind::Hypercall);
                let r = ExitReply::next_with(set::RAX, [KVM_ENOSYS, 0, 0, 0]);
                Ok(if x.insn_len == 0 { ExitReply { advance_by: 3, ..r } } else { r })
            }
            ExitKind::Shutdown => Err(String::from("triple fault (shutdown)")),
            ExitKind::Exception => {
                Err(alloc::format!("unhandled exception {} (error code {:#x}) at RIP {:#x}", x.a, x.b, x.rip))
            }
            kind => Err(alloc::format!("unhandled exit {kind:?} ({:#x}, {:#x}) at RIP {:#x}", x.a, x.b, x.rip)),
        };
        match reply {
            Ok(r) => match self.platform.take_power_event() {
                Some(e) => self.power(e),
                None => Ok(r),
            },
            Err(why) => self.stop(&why, 2),
        }
    }

    fn power(&mut self, e: PowerEvent) -> Result<ExitReply, u64> {
        match (e, self.panicked) {
            (PowerEvent::PowerOff, _) => self.stop("the VM powered off (ACPI S5)", 0),
            (PowerEvent::Reset, true) => self.stop("the kernel panicked and asked for a reset", 4),
            (PowerEvent::Reset, false) => self.stop("the VM asked for a reset", 0),
        }
    }

    /// The VM is over: what remains of its console, why, and the exit counts (`Err(status)`:
    /// the serving loop ends).
    fn stop(&mut self, why: &str, status: u64) -> Result<ExitReply, u64> {
        self.drain_console();
        if let Some(line) = self.out.flush() {
            write_console(&line);
        }
        let why = if self.panicked && status != 0 && !why.contains("panic") {
            alloc::format!("{why} after a kernel panic")
        } else {
            String::from(why)
        };
        let secs = (rdtsc() - self.boot_tsc) / self.tsc_hz.max(1);
        println!("VM stopped after {secs} s: {why}");
        println!("exit histogram: {}", self.stats.summary());
        println!("exits by port and MSR: {}", self.stats.top());
        self.devices.summary();
        let _ = hypercall::domain_pause(self.vm, true);
        Err(status)
    }

    fn io(&mut self, x: &ExitMessage) -> Result<ExitReply, String> {
        let io = x.io().ok_or("not a port access")?;
        self.stats.io(io.port);
        if PciBus::claims_port(io.port) && !io.string && !io.rep {
            if io.write {
                self.devices.bus.io_out(io.port, io.size, x.b as u32);
                return Ok(ExitReply::NEXT);
            }
            let v = self.devices.bus.io_in(io.port, io.size).unwrap_or(u32::MAX);
            return Ok(ExitReply::next_with(set::RAX, [io.merge_in(x.rax, u64::from(v)), 0, 0, 0]));
        }
        if io.string || io.rep {
            return Err(alloc::format!("string port I/O (port {:#x}) at RIP {:#x} is not emulated", io.port, x.rip));
        }
        if io.write {
            self.platform.io_out(io.port, io.size, x.b as u32);
            if io.port & !7 == vmm::uart::COM1_BASE {
                self.drain_console();
            }
            return Ok(ExitReply::NEXT);
        }
        let v = self.platform.io_in(io.port, io.size);
        Ok(ExitReply::next_with(set::RAX, [io.merge_in(x.rax, u64::from(v)), 0, 0, 0]))
    }

    fn drain_console(&mut self) {
        let bytes = self.platform.take_console();
        if bytes.is_empty() {
            return;
        }
        let lines = self.out.push(&bytes, rdtsc());
        if lines.is_empty() {
            return;
        }
        write_console(&lines);
        if contains(&lines, b"Kernel panic") && !self.panicked {
            self.panicked = true;
            self.panic_deadline = Some((rdtsc() + ticks_in(PANIC_GRACE_NS, self.tsc_hz), self.stats.exits()));
        }
        if contains(&lines, BENCH_MARK) {
            self.print_bench_counters();
        }
        if contains(&lines, INIT_MARKER) {
            println!("exit histogram at the init marker: {}", self.stats.summary());
            println!("exits by port and MSR: {}", self.stats.top());
        }
    }

    fn msr(&mut self, x: &ExitMessage) -> Result<ExitReply, String> {
        let (msr, write, value) = x.msr().ok_or("not an MSR access")?;
        self.stats.msr(msr);
        let now = rdtsc();
        let gp = ExitReply { inject: Some(Event::Exception(13, Some(0))), ..ExitReply::RETRY };
        if write {
            return Ok(match self.platform.wrmsr(msr, value, now, &mut self.mem) {
                Ok(()) => ExitReply::NEXT,
                Err(_) => gp,
            });
        }
        Ok(match self.platform.rdmsr(msr, now) {
            Ok(v) => ExitReply::next_with(set::RAX | set::RDX, [v & 0xffff_ffff, 0, v >> 32, 0]),
            Err(_) => gp,
        })
    }

    /// `cargo xtask bench linux-io`'s counters, in short lines (the microvisor cuts long
    /// console lines).
    fn print_bench_counters(&self) {
        println!("linux-io stats: {} wakes={}", self.stats.summary(), self.wakes);
        let us = |ticks: u64| ticks.saturating_mul(1_000_000) / self.tsc_hz.max(1);
        for (name, which, bar) in [("blk", devices::BLOCK, devices::BLK_BAR0), ("net", devices::NET, devices::NET_BAR0)]
        {
            let (bells, answers, ticks) = devices::bell_counters(which);
            let notify = bar + vmm::virtio::pci::NOTIFY_OFFSET;
            println!(
                "linux-io stats: {name}_bells={bells} {name}_answers={answers} {name}_answer_us={} {name}_kick0={} {name}_kick1={}",
                us(ticks),
                self.stats.mmio_at(notify),
                self.stats.mmio_at(notify + u64::from(vmm::virtio::pci::NOTIFY_MULTIPLIER)),
            );
        }
        println!(
            "linux-io stats: eoi={} tsc_deadline={}",
            self.stats.msr_at(0x80b),
            self.stats.msr_at(vmm::x2apic::MSR_TSC_DEADLINE),
        );
    }

    fn mmio(&mut self, x: &ExitMessage) -> Result<ExitReply, String> {
        let (gpa, _) = x.stage2().ok_or("not a stage-2 fault")?;
        self.stats.mmio(gpa);
        let need = state::GPR | state::RIP | state::CR | state::SEG;
        if x.state & need != need {
            return Err(alloc::format!("MMIO at {gpa:#x} without the vCPU state to decode it"));
        }
        let p = page();
        let paging = PagingRegs { cr0: p[at::CR0], cr3: p[at::CR3], cr4: p[at::CR4], efer: p[at::EFER] };
        let cs = Segment::from_words([p[at::SEG + 2 * seg::CS], p[at::SEG + 2 * seg::CS + 1]]);
        let (mode, linear) = if cs.long() {
            (CpuMode::Bits64, p[at::RIP])
        } else if cs.big() {
            (CpuMode::Bits32, cs.base.wrapping_add(p[at::RIP]) & 0xffff_ffff)
        } else {
            (CpuMode::Bits16, cs.base.wrapping_add(p[at::RIP] & 0xffff))
        };
        let mut insn = [0u8; MAX_INSTRUCTION_LEN];
        let n = fetch_instruction(&paging, linear, &self.mem, &mut insn)
            .map_err(|e| alloc::format!("MMIO at {gpa:#x}: fetching the instruction at {linear:#x}: {e}"))?;
        let mut regs = [0u64; 16];
        regs.copy_from_slice(&p[at::GPR..at::GPR + 16]);
        if self.devices.bus.claims_mmio(gpa) {
            let len = self
                .devices
                .bus
                .complete_mmio(gpa, &insn[..n], mode, &mut regs, &mut self.mem)
                .map_err(|e| alloc::format!("virtio MMIO at {gpa:#x}, RIP {linear:#x}: {e}"))?;
            self.devices.report_errors();
            p[at::GPR..at::GPR + 16].copy_from_slice(&regs);
            let len = u8::try_from(len).map_err(|_| "instruction length")?;
            return Ok(ExitReply { advance_by: len, write_state: state::GPR, ..ExitReply::NEXT });
        }
        let done = self
            .platform
            .complete_mmio(gpa, &insn[..n], mode, &mut regs)
            .map_err(|e| alloc::format!("MMIO at {gpa:#x}, RIP {linear:#x}: {e}"))?;
        if !done.claimed && self.unclaimed_reported < UNCLAIMED_REPORTS {
            self.unclaimed_reported += 1;
            println!("MMIO at {gpa:#x} (RIP {linear:#x}): no device there; reads return all-ones");
        }
        p[at::GPR..at::GPR + 16].copy_from_slice(&regs);
        let len = u8::try_from(done.len).map_err(|_| "instruction length")?;
        Ok(ExitReply { advance_by: len, write_state: state::GPR, ..ExitReply::NEXT })
    }
}

/// The serving loop (`domain_rt::exits::serve`) drives the VMM through these.
impl ExitHandler for Vmm {
    fn before_wait(&mut self) {
        Vmm::before_wait(self)
    }

    fn wake(&mut self) -> Option<u64> {
        Vmm::wake(self)
    }

    fn exit(&mut self, x: &ExitMessage) -> Result<ExitReply, u64> {
        self.handle(x)
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The guest's console bytes as this domain's console lines (the microvisor prefixes them
/// with this domain's name and makes control bytes harmless).
fn write_console(bytes: &[u8]) {
    domain_rt::console::flush();
    if let Err(e) = hypercall::console_write(bytes) {
        println!("console write: {e}");
    }
}

//! The hypercall fuzzer: `calls=<n>` random hypercalls from `seed=<s>` (generator and
//! model in `domains::fuzz`), then a summary and exit. dom0 builds it for a manifest domain
//! with `fuzz = true`: it gets a memory capability (`mem=<slot>`) and its timer, records
//! `MachineStatus` before, and after the exit destroys the domain and checks that every
//! frame and kernel object came back.
//!
//! Prints `fuzz: <n> calls, <ms> ms` every `progress=<n>` calls (default 10,000) and ends
//! with `fuzz: done: ...` (calls per second, counts per status code) and `fuzz: halts: ...`
//! (how its `SignalHalt`s ended). The exit status is 0 when every status was a known code
//! and the model saw nothing impossible, else 1.
//!
//! It runs with interrupts off. After a `SignalHalt` that succeeded it lets the offered
//! virtual interrupts in (`sti; nop; cli`) until none is left; its random `NotificationBind`s
//! pick any vector, so its interrupt table has a counting handler on every vector from 32
//! up (the runtime's timer handler on the wake vector).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
mod fuzzer {
    extern crate alloc;

    use domain_rt::{hypercall, irq};
    use domain_rt::{println, BootInfo};
    use domains::fuzz::{Call, Fuzzer, Setup, AGENT_CODE, STATUS_BINS, WAKE_VECTOR};
    use ipc_spec::hypercall::Hypercall;
    use ipc_spec::Error;
    use pvh::exceptions::Idt;

    domain_rt::domain_main!(main);

    /// The echo agent's code, in RAM (DomainWrite copies from RAM only).
    static AGENT: [u8; AGENT_CODE.len()] = AGENT_CODE;

    /// A page the fuzzer may register as its message page (nothing else lives there).
    #[repr(C, align(4096))]
    struct Page([u8; 4096]);
    static mut MESSAGE_PAGE: Page = Page([0; 4096]);
    /// Names for DomainCreate (any 1..=31 bytes from the first 8 offsets are valid).
    static NAMES: [u8; 64] = *b"fz-child-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQR!";

    /// Load the fuzzer's interrupt table (see the module docs), kept for good.
    fn load_idt() {
        let idt: &'static mut Idt = alloc::boxed::Box::leak(alloc::boxed::Box::new(Idt::new()));
        for (vector, stub) in pvh::exceptions::exception_stub_addresses().into_iter().enumerate() {
            idt.set(vector as u8, stub, 0x08, 0);
        }
        for vector in 32..=255 {
            idt.set(vector, irq::entry_address(), 0x08, 0);
        }
        idt.set(WAKE_VECTOR, irq::timer_entry_address(), 0x08, 0);
        let idt: &'static Idt = idt;
        idt.load();
    }

    /// Let the offered virtual interrupts in until none is left (each `sti; nop; cli` takes
    /// the one offered; the microvisor offers the next at the following entry). Bounded:
    /// there are not more pending vectors than vectors.
    fn let_all_in() {
        for _ in 0..=256 {
            let seen = irq::count();
            irq::let_offered_in();
            if irq::count() == seen {
                break;
            }
        }
    }

    fn main(info: &BootInfo) -> u64 {
        let seed = info.arg("seed").and_then(|v| v.parse::<u64>().ok()).unwrap_or(1);
        let calls = info.arg("calls").and_then(|v| v.parse::<u64>().ok()).unwrap_or(10_000);
        let progress = info.arg("progress").and_then(|v| v.parse::<u64>().ok()).unwrap_or(10_000).max(1);
        let Some(memory) = info.slot("mem") else {
            println!("FAILED: no memory capability (mem=<slot>) on my command line: \"{}\"", info.cmdline);
            return 2;
        };
        let priority = info.arg("prio").and_then(|v| v.parse::<u8>().ok()).unwrap_or(2);
        let ram: u64 = info.start_info.memmap().filter(|e| e.r#type == 1).map(|e| e.addr + e.size).max().unwrap_or(0);
        let setup = Setup {
            memory,
            timer: info.slot("timer"),
            ram,
            child_priority_max: priority.saturating_sub(1).max(1),
            message_page: (&raw const MESSAGE_PAGE) as u64,
            name: NAMES.as_ptr() as u64,
            agent_code: AGENT.as_ptr() as u64,
        };
        load_idt();
        println!("fuzzing: seed={seed} calls={calls} ram={} MiB memory slot {memory}", ram >> 20);
        println!("ready");
        let mut f = Fuzzer::new(seed, setup);
        if let Some(name) = info.arg("only") {
            f.only = Fuzzer::call_index(name);
            println!("fuzzing only {name}: {}", if f.only.is_some() { "known" } else { "unknown, ignored" });
        }
        let t0 = hypercall::clock_ns();
        for i in 1..=calls {
            let c = f.next_call();
            let timed = Fuzzer::wants_clock(&c);
            let before = if timed { hypercall::clock_ns() } else { 0 };
            let r = hypercall::raw(c.number, c.rbx, c.rcx, c.args);
            let clock = timed.then(|| (before, hypercall::clock_ns()));
            if c.number == Hypercall::SignalHalt.number() && r.rax == 0 {
                let_all_in();
            }
            f.record_timed(&c, &Call { number: r.rax, rbx: r.rbx, rcx: r.rcx, args: r.args }, clock);
            if i % progress == 0 {
                let ms = (hypercall::clock_ns() - t0) / 1_000_000;
                println!(
                    "fuzz: {i} calls, {ms} ms, {} slots filled, {} domains of mine alive",
                    f.filled(),
                    f.live_children()
                );
            }
        }
        let ns = (hypercall::clock_ns() - t0).max(1);
        println!(
            "fuzz: done: seed={seed} calls={calls} ms={} calls_per_s={} timed_waits={} echoes={} bursts={} surprises={}",
            ns / 1_000_000,
            calls as u128 * 1_000_000_000 / ns as u128,
            f.timed_waits,
            f.echoes,
            f.bursts,
            f.surprises
        );
        println!(
            "fuzz: halts: signal_halts={} slept={} at_once={} unclear={} interrupts_let_in={} on_wake_vector={}",
            f.signal_halts,
            f.halts_slept,
            f.halts_at_once,
            f.halts_unclear,
            irq::count(),
            irq::timer_count()
        );
        let mut line = Line::new("fuzz: statuses:");
        for (code, &n) in f.statuses.iter().enumerate().filter(|(_, n)| **n > 0) {
            match code {
                0 => line.item(format_args!("ok={n}")),
                c if c == STATUS_BINS - 1 => line.item(format_args!("other={n}")),
                c => match Error::from_code(c as u64) {
                    Some(e) => line.item(format_args!("{e:?}={n}")),
                    None => line.item(format_args!("code{c}={n}")),
                },
            }
        }
        line.end();
        let mut line = Line::new("fuzz: calls:");
        for (i, &n) in f.by_call.iter().enumerate() {
            line.item(format_args!("{}={n}", Fuzzer::call_name(i)));
        }
        line.end();
        if f.surprises > 0 {
            println!("FAILED: {} results the model says are impossible", f.surprises);
            return 1;
        }
        0
    }

    /// `prefix key=value key=value ...` printed in lines that fit the console's 200 bytes.
    struct Line {
        prefix: &'static str,
        buf: heapless::String<200>,
    }

    impl Line {
        fn new(prefix: &'static str) -> Self {
            Self { prefix, buf: heapless::String::new() }
        }

        fn item(&mut self, item: core::fmt::Arguments) {
            use core::fmt::Write as _;
            let mut word: heapless::String<64> = heapless::String::new();
            let _ = write!(word, " {item}");
            if self.buf.len() + word.len() > 180 {
                self.end();
            }
            if self.buf.is_empty() {
                let _ = self.buf.push_str(self.prefix);
            }
            let _ = self.buf.push_str(&word);
        }

        fn end(&mut self) {
            if !self.buf.is_empty() {
                println!("{}", self.buf);
                self.buf.clear();
            }
        }
    }
}

//! The hypercall fuzzer's generator and model (the `fuzzer` domain runs it; portable, so
//! it is host-tested).
//!
//! Every call is random: numbers (known and unknown), capability slots (filled, empty, out
//! of range), addresses, lengths, rights, badges, sizes, priorities, vectors. Valid
//! capabilities are used in invalid ways (a region as an endpoint, an endpoint without the
//! right, a stale domain) and objects are created and destroyed in random sequences
//! (domains, vCPUs, regions, endpoints, notifications, mappings, copies, revocations).
//!
//! The run must never hang, and the fuzzer's domain must never be harmed by its own calls,
//! so the generator keeps a model of its capability table and passes every call through
//! [`Fuzzer::make_safe`], which rewrites the few calls that would block forever or damage
//! the fuzzer:
//! - `Call` and `ReplyRecv` on an endpoint it may use get a length the microvisor refuses
//!   (nobody receives on the fuzzer's endpoints: a valid call would block forever); `Recv`
//!   on such an endpoint goes to an empty slot instead;
//! - `Wait` on a notification only when bits are certainly pending (the fuzzer signalled
//!   it) or a short timer is certainly armed on it (the blocking case, ended by the timer);
//!   otherwise it becomes `Poll`; `SignalWait` likewise waits only on such a notification
//!   or on the one it signals (which then has bits), else its wait slot becomes the
//!   signalled one;
//! - `SignalHalt` (signal, then halt as HLT does: it sleeps unless a virtual interrupt is
//!   pending or offered) is drawn with any slot and bits; one the microvisor refuses (bad
//!   slot, wrong type, no SIGNAL right) is left as is. One that would halt sleeps until a
//!   notification bound to one of the fuzzer's vectors is signalled, so the fuzzer keeps a
//!   *wake* notification (its timer, or another of its notifications if it deleted that)
//!   bound to [`WAKE_VECTOR`] and arms a short timer on it first: the generator puts a
//!   `NotificationBind` (when the model does not know it bound) and a `TimerSet` (when no
//!   short timer is known to be armed since the binding and the last halt) before the
//!   call, and `make_safe` turns a halt that could still sleep for good into a `Signal`.
//!   Random binds, deletions and timers on the wake notification are made as drawn; the
//!   model notes what they undo, and the next halt re-establishes it. A signal to the wake
//!   notification itself raises the fuzzer's vector: that halt returns at once. (Copies of
//!   the wake notification lose WAIT, so that no other domain could wait on it or rebind
//!   it.) After a halt the fuzzer lets the offered interrupts in (`sti; nop; cli`), with a
//!   counting handler on every vector from 32 up;
//! - `ConsoleRead` needs the machine capability, which the fuzzer does not hold: it is
//!   drawn with any slot, address and length, and a success is a surprise;
//! - never `DomainExit`, never deleting its memory capability (it would end the fuzzing);
//! - a message page only at its own scratch page, console writes only empty or invalid
//!   (no garbage on the console), new domains only below its own priority (their vCPUs run
//!   whatever is in their RAM; they must not starve the other domains).
//!
//! The fuzzer holds no capability to its own domain (only its memory capability and its
//! timer), so every domain-taking call acts on domains it created: copies never land in its
//! own table, and its table changes only through its creations and deletions, which the
//! model follows exactly.

use ipc_spec::hypercall::{rights, Hypercall, CAP_SLOTS, CONSOLE_WRITE_MAX, MAX_MESSAGE_WORDS, REGISTER_WORDS};
use ipc_spec::Error;

/// xorshift64*: small, fast, and the same sequence for the same seed everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Scramble so that small seeds (1, 2, 3) give unrelated sequences; never zero.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0; the tiny modulo bias does not matter here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What the fuzzer knows about the domain it runs in.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    /// Slot of the memory capability dom0 gave it (CONTROL, GRANT).
    pub memory: u64,
    /// Slot of its timer notification, if any (SIGNAL, WAIT).
    pub timer: Option<u64>,
    /// Its RAM size in bytes (guest-physical 0 up to this).
    pub ram: u64,
    /// Highest priority for the domains it creates (below its own).
    pub child_priority_max: u8,
    /// A page-aligned 4 KiB page of its RAM it may register as message page.
    pub message_page: u64,
    /// 64 bytes of its RAM holding a valid domain name (for DomainCreate).
    pub name: u64,
    /// Where in its RAM the echo agent's code is ([`AGENT_CODE`]), copied into the agent.
    pub agent_code: u64,
}

/// The echo agent: 32-bit code (PVH entry state: protected mode, paging off) that receives
/// on the endpoint in its slot 0 and answers every message with itself, forever:
/// `Recv(0); loop { ReplyRecv(0) }`. An error (its capability revoked) just loops.
pub const AGENT_CODE: [u8; 22] = [
    0xb8, 0x34, 0, 0, 0, // mov eax, 52 (Recv)
    0x31, 0xdb, // xor ebx, ebx (slot 0)
    0x0f, 0x01, 0xd9, // vmmcall
    0xb8, 0x33, 0, 0, 0, // loop: mov eax, 51 (ReplyRecv; RCX and the words are the message)
    0x31, 0xdb, // xor ebx, ebx
    0x0f, 0x01, 0xd9, // vmmcall
    0xeb, 0xf4, // jmp loop
];
/// Where the agent's code goes in its RAM (its entry point).
pub const AGENT_ENTRY: u64 = 0x1000;

/// A domain the fuzzer made to answer its calls, so that IPC really happens: its endpoint
/// may be called with any message (the call returns, with the echo or an error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Agent {
    /// Slots in the fuzzer's table: the agent's domain, the endpoint it serves, its vCPU.
    pub domain: u64,
    pub endpoint: u64,
    pub vcpu: u64,
}

/// A burst of creations that fills the kernel's tables (see [`Fuzzer::start_burst`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Burst {
    kind: Hypercall,
    /// Slot of the domain the objects are copied into.
    child: u64,
    left: u32,
    step: BurstStep,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BurstStep {
    Create,
    Give { slot: u64 },
    Drop { slot: u64 },
}

/// Building the agent, one call at a time: what the next call is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AgentStep {
    Create,
    Load { d: u64 },
    Endpoint { d: u64 },
    Give { d: u64, e: u64 },
    Vcpu { d: u64, e: u64 },
    Start { d: u64, e: u64, v: u64 },
}

/// One hypercall's registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Call {
    pub number: u64,
    pub rbx: u64,
    pub rcx: u64,
    /// RDI, RSI, RDX, R10, R8, R9.
    pub args: [u64; REGISTER_WORDS],
}

/// What a slot of the fuzzer's own table holds, as far as the model knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    Memory,
    /// A domain the fuzzer created; `alive` until it destroyed it.
    Domain {
        alive: bool,
    },
    /// A vCPU, created in the domain whose capability was in slot `domain` then.
    Vcpu {
        domain: u64,
    },
    Region,
    Endpoint,
    /// `pending`: bits are certainly set (signalled, not taken since); `armed`: a timer of
    /// at most [`SHORT_TIMER_NS`] is certainly going to signal it.
    Notification {
        pending: bool,
        armed: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub held: Held,
    pub rights: u64,
}

/// Timers up to this long may be waited for (the wait ends at the next tick after it).
pub const SHORT_TIMER_NS: u64 = 2_000_000;

/// The vector the fuzzer's wake notification is bound to (see the module docs): the
/// runtime's timer vector, whose handler counts apart from the others.
pub const WAKE_VECTOR: u8 = domain_rt::irq::TIMER_VECTOR;

/// Statuses seen, by code: index 0 = success, `code` for each [`Error`] code up to
/// [`Fuzzer::MAX_CODE`], the last index for anything else (an unknown status is a bug).
pub const STATUS_BINS: usize = 17;

/// The hypercalls the generator makes, with their weights. Hypercalls added to the ABI
/// later are not fuzzed until they are added here with a model of what they do.
const WEIGHTS: &[(Hypercall, u64)] = &[
    (Hypercall::Null, 2),
    (Hypercall::ConsoleWrite, 2),
    (Hypercall::ConsoleRead, 1),
    (Hypercall::Shutdown, 1),
    (Hypercall::Yield, 1),
    (Hypercall::Clock, 1),
    (Hypercall::DomainCreate, 4),
    (Hypercall::DomainWrite, 4),
    (Hypercall::DomainDestroy, 3),
    (Hypercall::DomainSetFaultEndpoint, 3),
    (Hypercall::VcpuCreate, 4),
    (Hypercall::VcpuStart, 3),
    (Hypercall::VcpuSetMessagePage, 2),
    (Hypercall::DomainMapRam, 2),
    (Hypercall::VcpuInject, 2),
    (Hypercall::DomainPause, 2),
    (Hypercall::RegionCreate, 6),
    (Hypercall::Map, 7),
    (Hypercall::Unmap, 4),
    (Hypercall::EndpointCreate, 5),
    (Hypercall::NotificationCreate, 5),
    (Hypercall::CapCopy, 9),
    (Hypercall::CapRevoke, 4),
    (Hypercall::CapDelete, 8),
    (Hypercall::Call, 3),
    (Hypercall::ReplyRecv, 2),
    (Hypercall::Recv, 2),
    (Hypercall::Signal, 4),
    (Hypercall::Wait, 4),
    (Hypercall::Poll, 2),
    (Hypercall::SignalWait, 3),
    (Hypercall::SignalHalt, 3),
    (Hypercall::NotificationBind, 2),
    (Hypercall::TimerSet, 3),
    (Hypercall::DeviceInfo, 1),
    (Hypercall::DeviceAssign, 1),
    (Hypercall::PciConfigRead, 1),
    (Hypercall::PciConfigWrite, 1),
    (Hypercall::DeviceIrq, 1),
    (Hypercall::DomainStatus, 2),
    (Hypercall::MachineStatus, 1),
];
/// A burst (tables filled) starts with a chance of 1 in this many calls.
const BURST_EVERY: u64 = 3000;
/// Without an agent, one is built with a chance of 1 in this many calls.
const AGENT_EVERY: u64 = 100;
/// Domains the fuzzer keeps alive at most (each costs its zeroed RAM).
const MAX_CHILDREN: usize = 4;
/// Weight of a number no hypercall has.
const UNKNOWN_WEIGHT: u64 = 3;

/// The generator, its model of the fuzzer's capability table, and the statistics.
pub struct Fuzzer {
    rng: Rng,
    setup: Setup,
    pub slots: [Option<Slot>; CAP_SLOTS],
    message_page: bool,
    /// Calls to make right after the current one, in order (a `Wait` after its
    /// `Signal`/`TimerSet`; a `SignalHalt` after its `NotificationBind` and `TimerSet`).
    follow_ups: [Option<Call>; 2],
    /// The slot of the wake notification, once chosen (see the module docs).
    pub wake: Option<u64>,
    /// The wake notification is certainly bound to [`WAKE_VECTOR`] of the fuzzer's vCPU.
    pub wake_bound: bool,
    /// A timer of at most [`SHORT_TIMER_NS`] was set on it since it was bound and since the
    /// last halt let the interrupts in: a halt now certainly ends.
    pub wake_armed: bool,
    /// No earlier than this clock reading the wake timer fires (its `TimerSet`'s clock
    /// before the call plus its time), when known.
    wake_deadline: Option<u64>,
    /// Statuses by code (see [`STATUS_BINS`]).
    pub statuses: [u64; STATUS_BINS],
    /// Calls made, by hypercall number (index into [`WEIGHTS`]; the last: unknown numbers).
    pub by_call: [u64; WEIGHTS.len() + 1],
    /// Results the model says are impossible (a creation returning a slot it thought
    /// filled, an unknown status word): each is a bug somewhere.
    pub surprises: u64,
    /// Waits that blocked until a timer fired.
    pub timed_waits: u64,
    /// `SignalHalt`s that succeeded, and how they ended (with the clock readings around
    /// them, see [`Self::record_timed`]): `slept` entered before the wake timer's deadline
    /// and returned after it (it slept until the timer, or was held up that long);
    /// `at_once` returned before the deadline, or signalled the bound wake notification
    /// itself (its vector then pending); `unclear`: the deadline had passed before the
    /// call (the timer may have fired already), or no clock readings.
    pub signal_halts: u64,
    pub halts_slept: u64,
    pub halts_at_once: u64,
    pub halts_unclear: u64,
    /// The echo agent, while the model knows it answers.
    pub agent: Option<Agent>,
    agent_step: Option<AgentStep>,
    /// The current call is a step of building the agent.
    in_step: bool,
    /// Calls the agent answered (each checked: the reply is the message).
    pub echoes: u64,
    burst: Option<Burst>,
    /// Bursts started.
    pub bursts: u64,
    /// The current call is part of a burst.
    in_burst: bool,
    /// Make only this hypercall (an index into the names of [`Self::call_name`]): to
    /// measure one call's cost, or to hammer one path.
    pub only: Option<usize>,
}

impl Fuzzer {
    pub const MAX_CODE: u64 = STATUS_BINS as u64 - 2;

    pub fn new(seed: u64, setup: Setup) -> Self {
        let mut slots = [None; CAP_SLOTS];
        if let Some(s) = slots.get_mut(setup.memory as usize) {
            *s = Some(Slot { held: Held::Memory, rights: rights::CONTROL | rights::GRANT });
        }
        if let Some(t) = setup.timer.and_then(|t| slots.get_mut(t as usize)) {
            *t = Some(Slot {
                held: Held::Notification { pending: false, armed: false },
                rights: rights::SIGNAL | rights::WAIT,
            });
        }
        Self {
            rng: Rng::new(seed),
            setup,
            slots,
            message_page: false,
            follow_ups: [None; 2],
            wake: setup.timer,
            wake_bound: false,
            wake_armed: false,
            wake_deadline: None,
            statuses: [0; STATUS_BINS],
            by_call: [0; WEIGHTS.len() + 1],
            surprises: 0,
            timed_waits: 0,
            signal_halts: 0,
            halts_slept: 0,
            halts_at_once: 0,
            halts_unclear: 0,
            agent: None,
            agent_step: None,
            in_step: false,
            echoes: 0,
            burst: None,
            bursts: 0,
            in_burst: false,
            only: None,
        }
    }

    /// Names of the fuzzed hypercalls, in the order of [`Self::by_call`] (then "unknown").
    pub fn call_name(i: usize) -> &'static str {
        const NAMES: &[&str] = &[
            "Null",
            "ConsoleWrite",
            "ConsoleRead",
            "Shutdown",
            "Yield",
            "Clock",
            "DomainCreate",
            "DomainWrite",
            "DomainDestroy",
            "DomainSetFaultEndpoint",
            "VcpuCreate",
            "VcpuStart",
            "VcpuSetMessagePage",
            "DomainMapRam",
            "VcpuInject",
            "DomainPause",
            "RegionCreate",
            "Map",
            "Unmap",
            "EndpointCreate",
            "NotificationCreate",
            "CapCopy",
            "CapRevoke",
            "CapDelete",
            "Call",
            "ReplyRecv",
            "Recv",
            "Signal",
            "Wait",
            "Poll",
            "SignalWait",
            "SignalHalt",
            "NotificationBind",
            "TimerSet",
            "DeviceInfo",
            "DeviceAssign",
            "PciConfigRead",
            "PciConfigWrite",
            "DeviceIrq",
            "DomainStatus",
            "MachineStatus",
        ];
        NAMES.get(i).copied().unwrap_or("unknown")
    }

    /// The index of the hypercall called `name` (see [`Self::call_name`]).
    pub fn call_index(name: &str) -> Option<usize> {
        (0..WEIGHTS.len()).find(|&i| Self::call_name(i) == name)
    }

    /// Filled slots of the model.
    pub fn filled(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Live domains the fuzzer created (and has not destroyed).
    pub fn live_children(&self) -> usize {
        self.slots.iter().filter(|s| matches!(s, Some(Slot { held: Held::Domain { alive: true }, .. }))).count()
    }

    /// The next call to make.
    pub fn next_call(&mut self) -> Call {
        if let Some(c) = self.follow_ups[0].take() {
            self.follow_ups.rotate_left(1);
            return self.checked(c);
        }
        if self.agent_step.is_none() && self.agent.is_none() && self.only.is_none() && self.rng.below(AGENT_EVERY) == 0
        {
            self.agent_step = Some(AgentStep::Create);
        }
        if let Some(step) = self.agent_step {
            // Known to be safe: not rewritten.
            self.in_step = true;
            return self.agent_call(step);
        }
        if self.burst.is_none() && self.only.is_none() && self.rng.below(BURST_EVERY) == 0 {
            self.start_burst();
        }
        if let Some(b) = self.burst {
            self.in_burst = true;
            return self.burst_call(b);
        }
        let c = self.generate();
        self.checked(c)
    }

    /// Fill the tables: create objects one after the other, each copied into one of the
    /// domains the fuzzer created and then dropped from its own table (so they pile up
    /// there), until the table or memory runs out or the burst ends.
    fn start_burst(&mut self) {
        let child = self.pick_filled(|h| matches!(h, Held::Domain { alive: true }));
        if !matches!(self.held(child), Some(Held::Domain { alive: true })) {
            return;
        }
        let kind = [Hypercall::EndpointCreate, Hypercall::NotificationCreate, Hypercall::RegionCreate]
            [self.rng.below(3) as usize];
        let left = 40 + self.rng.below(100) as u32;
        self.burst = Some(Burst { kind, child, left, step: BurstStep::Create });
        self.bursts += 1;
    }

    fn burst_call(&mut self, b: Burst) -> Call {
        match b.step {
            BurstStep::Create => mk(b.kind, self.setup.memory, 0, [1 + self.rng.below(8192), 0, 0, 0, 0, 0]),
            BurstStep::Give { slot } => {
                let (mask, badge) = (self.access_mask(), if self.rng.chance(50) { 0 } else { self.rng.next_u64() });
                mk(Hypercall::CapCopy, slot, 0, [b.child, mask, badge, 0, 0, 0])
            }
            BurstStep::Drop { slot } => mk(Hypercall::CapDelete, slot, 0, [0; 6]),
        }
    }

    fn burst_advance(&mut self, ok: bool, rdi: u64) {
        let Some(mut b) = self.burst else { return };
        b.step = match b.step {
            BurstStep::Create if ok => BurstStep::Give { slot: rdi },
            // Out of memory or slots: the point of the burst.
            BurstStep::Create => {
                self.burst = None;
                return;
            }
            BurstStep::Give { slot } => BurstStep::Drop { slot },
            BurstStep::Drop { .. } => {
                b.left = b.left.saturating_sub(1);
                if b.left == 0 {
                    self.burst = None;
                    return;
                }
                BurstStep::Create
            }
        };
        self.burst = Some(b);
    }

    /// [`Self::make_safe`], then forget the agent if the call may break it.
    fn checked(&mut self, c: Call) -> Call {
        let c = self.make_safe(c);
        if let Some(a) = self.agent {
            let h = Hypercall::from_number(c.number);
            let overlaps_code = |dst: u64, len: u64| {
                let end = dst.saturating_add(len);
                dst < AGENT_ENTRY + AGENT_CODE.len() as u64 && end > AGENT_ENTRY
            };
            let vcpu_of_agent = matches!(self.held(c.rbx), Some(Held::Vcpu { domain }) if domain == a.domain);
            let breaks = match h {
                Some(Hypercall::DomainDestroy) => c.rbx == a.domain,
                Some(Hypercall::CapDelete) => c.rbx == a.domain || c.rbx == a.endpoint || c.rbx == a.vcpu,
                Some(Hypercall::CapRevoke) => c.rbx == a.endpoint,
                Some(Hypercall::DomainWrite) => c.rbx == a.domain && overlaps_code(c.args[0], c.args[2]),
                // Another vCPU running whatever is in its RAM might overwrite the code.
                Some(Hypercall::VcpuStart) => vcpu_of_agent && c.rbx != a.vcpu,
                _ => false,
            };
            if breaks {
                self.agent = None;
            }
        }
        c
    }

    fn held(&self, slot: u64) -> Option<Held> {
        self.slots.get(slot as usize).copied().flatten().map(|s| s.held)
    }

    /// The call for a step of building the agent.
    fn agent_call(&mut self, step: AgentStep) -> Call {
        use Hypercall as H;
        let mem = self.setup.memory;
        match step {
            AgentStep::Create => {
                let prio = self.setup.child_priority_max as u64;
                mk(H::DomainCreate, mem, 0, [2 << 20, prio, self.setup.name, 8, 0, 0])
            }
            AgentStep::Load { d } => {
                mk(H::DomainWrite, d, 0, [AGENT_ENTRY, self.setup.agent_code, AGENT_CODE.len() as u64, 0, 0, 0])
            }
            AgentStep::Endpoint { .. } => mk(H::EndpointCreate, mem, 0, [0; 6]),
            AgentStep::Give { d, e } => mk(H::CapCopy, e, 0, [d, rights::RECV, 0, 0, 0, 0]),
            AgentStep::Vcpu { d, .. } => mk(H::VcpuCreate, d, 0, [AGENT_ENTRY, 0, 0, 0, 0, 0]),
            AgentStep::Start { v, .. } => mk(H::VcpuStart, v, 0, [0; 6]),
        }
    }

    /// The outcome of a step of building the agent: the next step, or give up.
    fn agent_advance(&mut self, step: AgentStep, ok: bool, rdi: u64) {
        self.agent_step = match (step, ok) {
            (_, false) => None,
            (AgentStep::Create, _) => Some(AgentStep::Load { d: rdi }),
            (AgentStep::Load { d }, _) => Some(AgentStep::Endpoint { d }),
            (AgentStep::Endpoint { d }, _) => Some(AgentStep::Give { d, e: rdi }),
            // The code receives on slot 0: the first capability of a new domain.
            (AgentStep::Give { d, e }, _) if rdi == 0 => Some(AgentStep::Vcpu { d, e }),
            (AgentStep::Give { .. }, _) => None,
            (AgentStep::Vcpu { d, e }, _) => Some(AgentStep::Start { d, e, v: rdi }),
            (AgentStep::Start { d, e, v }, _) => {
                self.agent = Some(Agent { domain: d, endpoint: e, vcpu: v });
                None
            }
        };
    }

    fn generate(&mut self) -> Call {
        if let Some(&(h, _)) = self.only.and_then(|i| WEIGHTS.get(i)) {
            return self.generate_one(h);
        }
        // Keep the tables from filling up for good: clean up when they get full.
        if self.filled() >= CAP_SLOTS - 8 && self.rng.chance(50) {
            // (Not the agent's: it would need rebuilding.)
            let agent = self.agent;
            let mine = move |slot: u64| agent.is_some_and(|a| [a.domain, a.endpoint, a.vcpu].contains(&slot));
            let slot = self.pick_filled(|_| true);
            if !mine(slot) {
                return mk(Hypercall::CapDelete, slot, 0, [0; 6]);
            }
        }
        if self.live_children() > MAX_CHILDREN && self.rng.chance(30) {
            let d = self.pick_filled(|h| matches!(h, Held::Domain { alive: true }));
            return mk(Hypercall::DomainDestroy, d, 0, [0; 6]);
        }
        let total: u64 = WEIGHTS.iter().map(|(_, w)| w).sum::<u64>() + UNKNOWN_WEIGHT;
        let mut pick = self.rng.below(total);
        for &(h, w) in WEIGHTS {
            if pick < w {
                return self.generate_one(h);
            }
            pick -= w;
        }
        self.unknown()
    }

    /// A number no hypercall has, with random registers.
    fn unknown(&mut self) -> Call {
        let number = loop {
            let n = match self.rng.below(3) {
                0 => self.rng.below(128),
                1 => self.rng.next_u64() >> self.rng.below(64),
                _ => self.rng.next_u64(),
            };
            if Hypercall::from_number(n).is_none() {
                break n;
            }
        };
        let args = core::array::from_fn(|_| self.value());
        Call { number, rbx: self.any_slot(), rcx: self.value(), args }
    }

    fn generate_one(&mut self, h: Hypercall) -> Call {
        use Hypercall as H;
        let is_domain = |h: &Held| matches!(h, Held::Domain { .. });
        let is_endpoint = |h: &Held| matches!(h, Held::Endpoint);
        let is_notification = |h: &Held| matches!(h, Held::Notification { .. });
        let is_region = |h: &Held| matches!(h, Held::Region);
        let is_memory = |h: &Held| matches!(h, Held::Memory);
        match h {
            H::Null | H::Yield | H::Clock | H::MachineStatus | H::Shutdown => {
                let slot = self.any_slot();
                let args = [self.value(), self.value(), 0, 0, 0, 0];
                mk(h, slot, 0, args)
            }
            H::ConsoleWrite => {
                let (addr, len) = (self.address(), self.length());
                mk(h, 0, 0, [addr, len, 0, 0, 0, 0])
            }
            H::ConsoleRead => {
                let (slot, addr, len) = (self.any_slot(), self.address(), self.length());
                mk(h, slot, 0, [addr, len, 0, 0, 0, 0])
            }
            H::DomainCreate => {
                let mem = self.slot_for(is_memory);
                // Every domain created costs its RAM zeroed (slow under emulation): keep
                // a few alive, small; beyond that ask for sizes that are refused.
                let ram = match self.rng.below(40) {
                    _ if self.live_children() >= MAX_CHILDREN => self.bad_ram(),
                    0..=7 => self.bad_ram(),
                    8 => (1 + self.rng.below(16)) << 20,
                    9..=12 => 4 << 20,
                    _ => 2 << 20,
                };
                let priority = match self.rng.below(8) {
                    0 => 0,
                    1 => 255,
                    2 => self.rng.next_u64(),
                    _ => 1 + self.rng.below(254),
                };
                let name = match self.rng.below(10) {
                    0 => self.address(),
                    _ => self.setup.name + self.rng.below(8),
                };
                let len = match self.rng.below(10) {
                    0 => 0,
                    1 => 32 + self.rng.below(64),
                    2 => self.rng.next_u64(),
                    _ => 1 + self.rng.below(31),
                };
                // Now and then a VM (its exits go to its exit handler, if it gets one),
                // or flags the microvisor does not know.
                let flags = match self.rng.below(10) {
                    0 => ipc_spec::hypercall::domain_flags::VM,
                    1 => self.value(),
                    _ => 0,
                };
                mk(h, mem, 0, [ram, priority, name, len, flags, 0])
            }
            H::DomainWrite => {
                let d = self.slot_for(is_domain);
                let dst = self.child_address();
                let src = match self.rng.below(4) {
                    0 => self.address(),
                    _ => self.rng.below(self.setup.ram),
                };
                let len = match self.rng.below(50) {
                    0 => self.rng.next_u64(),
                    1 => self.rng.below(1 << 20),
                    _ => self.rng.below(3 * 4096),
                };
                mk(h, d, 0, [dst, src, len, 0, 0, 0])
            }
            H::DomainDestroy | H::DomainStatus => {
                let d = self.slot_for(is_domain);
                mk(h, d, 0, [0; 6])
            }
            H::DomainSetFaultEndpoint => {
                let d = self.slot_for(is_domain);
                let e = self.slot_for(is_endpoint);
                let badge = self.value();
                mk(h, d, 0, [e, badge, 0, 0, 0, 0])
            }
            H::VcpuCreate => {
                let d = self.slot_for(is_domain);
                let entry = self.child_address();
                let rbx = self.value();
                mk(h, d, 0, [entry, rbx, 0, 0, 0, 0])
            }
            H::VcpuStart => {
                let v = self.slot_for(|h| matches!(h, Held::Vcpu { .. }));
                mk(h, v, 0, [0; 6])
            }
            H::DomainMapRam => {
                // A VM's RAM into the fuzzer's own space: anywhere, or where the microvisor
                // could accept it (2 MiB aligned, above the fuzzer's RAM).
                let d = self.slot_for(is_domain);
                let gpa = match self.rng.below(3) {
                    0 => self.value(),
                    _ => 0x8000_0000 + (self.rng.below(64) << 21),
                };
                mk(h, d, 0, [gpa, 0, 0, 0, 0, 0])
            }
            H::VcpuInject => {
                let v = self.slot_for(|h| matches!(h, Held::Vcpu { .. }));
                let vector = match self.rng.below(4) {
                    0 => self.value(),
                    1 => self.rng.below(32),
                    _ => 32 + self.rng.below(224),
                };
                mk(h, v, 0, [vector, 0, 0, 0, 0, 0])
            }
            H::DomainPause => {
                let d = self.slot_for(is_domain);
                let pause = match self.rng.below(4) {
                    0 => self.value(),
                    1 => 0,
                    _ => 1,
                };
                mk(h, d, 0, [pause, 0, 0, 0, 0, 0])
            }
            H::VcpuSetMessagePage => {
                let page = match self.rng.below(4) {
                    0 => 0,
                    1 => self.setup.message_page,
                    _ => self.address(),
                };
                mk(h, 0, 0, [page, 0, 0, 0, 0, 0])
            }
            H::RegionCreate => {
                let mem = self.slot_for(is_memory);
                // Sizes up to the limit, but rarely: fresh frames are zeroed.
                let bytes = match self.rng.below(2000) {
                    0 => 256 << 20,
                    1..=10 => self.rng.below(8 << 20),
                    11..=60 => 0,
                    61..=100 => (256 << 20) + 1 + self.rng.below(1 << 40),
                    101..=140 => self.rng.next_u64(),
                    _ => 1 + self.rng.below(64 << 10),
                };
                mk(h, mem, 0, [bytes, 0, 0, 0, 0, 0])
            }
            H::Map | H::Unmap => {
                let d = self.slot_for(is_domain);
                let r = self.slot_for(is_region);
                let gpa = match self.rng.below(8) {
                    0 => self.value(),
                    1 => self.rng.below(64 << 20) & !0xfff,
                    2 => (0x4000_0000 + self.rng.below(1 << 30)) | (self.rng.below(2) * 0x800),
                    _ => 0x4000_0000 + (self.rng.below(64) << 21) + (self.rng.below(4) << 12),
                };
                let access = self.access();
                mk(h, d, 0, [r, gpa, access, 0, 0, 0])
            }
            H::EndpointCreate | H::NotificationCreate => {
                let mem = self.slot_for(is_memory);
                mk(h, mem, 0, [0; 6])
            }
            H::CapCopy => {
                let src = self.slot_for(|_| true);
                let d = self.slot_for(is_domain);
                let mask = self.access_mask();
                let badge = match self.rng.below(3) {
                    0 => 0,
                    1 => 1 + self.rng.below(1000),
                    _ => self.value(),
                };
                mk(h, src, 0, [d, mask, badge, 0, 0, 0])
            }
            H::CapRevoke | H::CapDelete => {
                let s = self.slot_for(|_| true);
                mk(h, s, 0, [0; 6])
            }
            H::Call if self.agent.is_some() && self.rng.chance(60) => {
                // Real IPC: a call the agent answers (or refuses: too long).
                let e = self.agent.map_or(0, |a| a.endpoint);
                let len = match self.rng.below(8) {
                    0 => self.rng.below(MAX_MESSAGE_WORDS as u64 + 2),
                    _ => self.rng.below(REGISTER_WORDS as u64 + 1),
                };
                let args = core::array::from_fn(|_| self.value());
                mk(h, e, len, args)
            }
            H::Call | H::ReplyRecv | H::Recv => {
                let e = self.slot_for(is_endpoint);
                let len = match self.rng.below(6) {
                    0 => self.rng.below(REGISTER_WORDS as u64 + 1),
                    1 => self.rng.next_u64(),
                    2 => MAX_MESSAGE_WORDS as u64 + 1 + self.rng.below(100),
                    _ => self.rng.below(MAX_MESSAGE_WORDS as u64 + 1),
                };
                let args = core::array::from_fn(|_| self.value());
                mk(h, e, len, args)
            }
            H::Signal | H::Wait | H::Poll => {
                let n = self.slot_for(is_notification);
                let bits = match self.rng.below(3) {
                    0 => 0,
                    _ => self.value(),
                };
                if h == H::Wait {
                    if let Some(prep) = self.prepare_wait(n) {
                        self.follow(mk(h, n, 0, [0; 6]));
                        return prep;
                    }
                }
                mk(h, n, 0, [bits, 0, 0, 0, 0, 0])
            }
            H::SignalWait => {
                // Signal `n`, wait on `m`: often the same notification (the wait then
                // takes the bits just set), else one made ready first as for `Wait`.
                let n = self.slot_for(is_notification);
                let m = if self.rng.chance(25) { n } else { self.slot_for(is_notification) };
                let bits = match self.rng.below(3) {
                    0 => 0,
                    _ => self.value(),
                };
                let call = mk(h, n, 0, [bits, m, 0, 0, 0, 0]);
                if m != n {
                    if let Some(prep) = self.prepare_wait(m) {
                        self.follow(call);
                        return prep;
                    }
                }
                call
            }
            H::SignalHalt => {
                // Mostly a notification (now and then the wake notification, whose
                // signal raises the fuzzer's own vector), else any slot: refused.
                let n = match self.wake {
                    Some(w) if self.rng.chance(15) => w,
                    _ => self.slot_for(is_notification),
                };
                let bits = match self.rng.below(3) {
                    0 => 0,
                    _ => self.value(),
                };
                let call = mk(h, n, 0, [bits, 0, 0, 0, 0, 0]);
                if self.halt_may_sleep(&call) {
                    return self.prepare_halt(call);
                }
                call
            }
            H::NotificationBind => {
                let n = self.slot_for(is_notification);
                let vector = match self.rng.below(4) {
                    0 => self.rng.below(32),
                    1 => self.value(),
                    _ => 32 + self.rng.below(224),
                };
                mk(h, n, 0, [vector, 0, 0, 0, 0, 0])
            }
            H::TimerSet => {
                let n = self.slot_for(is_notification);
                let ns = match self.rng.below(6) {
                    0 => 0,
                    1 => self.value(),
                    2 => u64::MAX,
                    _ => 1 + self.rng.below(SHORT_TIMER_NS),
                };
                let bits = self.value();
                mk(h, n, 0, [ns, bits, 0, 0, 0, 0])
            }
            H::DeviceInfo | H::DeviceAssign | H::PciConfigRead | H::PciConfigWrite | H::DeviceIrq => {
                let s = self.any_slot();
                let args = [self.value(), self.rng.below(8), self.value(), 0, 0, 0];
                mk(h, s, 0, args)
            }
            // Not modelled (see WEIGHTS): never generated.
            _ => mk(H::Null, 0, 0, [0; 6]),
        }
    }

    /// Before a `Wait` on `slot`: a call that makes it return (a signal, or a short timer
    /// the wait then blocks for), if one is wanted.
    fn prepare_wait(&mut self, slot: u64) -> Option<Call> {
        let s = self.slots.get(slot as usize).copied().flatten()?;
        let Held::Notification { pending, armed } = s.held else { return None };
        if pending || armed || !s.has_wait() {
            return None;
        }
        if self.rng.chance(10) {
            let ns = 1 + self.rng.below(SHORT_TIMER_NS);
            return Some(mk(Hypercall::TimerSet, slot, 0, [ns, 1 + self.rng.below(7), 0, 0, 0, 0]));
        }
        if s.rights & rights::SIGNAL != 0 && self.rng.chance(50) {
            return Some(mk(Hypercall::Signal, slot, 0, [self.rng.next_u64() | 1, 0, 0, 0, 0, 0]));
        }
        None
    }

    /// Queue `c` to be made after the current call (and after those queued before it).
    fn follow(&mut self, c: Call) {
        if let Some(free) = self.follow_ups.iter_mut().find(|f| f.is_none()) {
            *free = Some(c);
        }
    }

    /// Would `c`, a `SignalHalt`, halt if nothing were pending: the microvisor accepts its
    /// capability (a notification with SIGNAL), and its signal does not raise one of the
    /// fuzzer's vectors (the wake notification, bound, raises [`WAKE_VECTOR`]).
    fn halt_may_sleep(&self, c: &Call) -> bool {
        let accepted = matches!(
            self.slots.get(c.rbx as usize).copied().flatten(),
            Some(Slot { held: Held::Notification { .. }, rights: r }) if r & rights::SIGNAL != 0
        );
        accepted && !(self.wake == Some(c.rbx) && self.wake_bound)
    }

    /// A halt now certainly ends: the wake notification is bound and a short timer armed.
    pub fn wake_ready(&self) -> bool {
        self.wake.is_some() && self.wake_bound && self.wake_armed
    }

    /// Before `halt`, a `SignalHalt` that may sleep: the calls that make it end (choose a
    /// wake notification if there is none; bind it; arm a short timer on it), the first
    /// returned and the rest queued with the halt after them. With none possible (no
    /// notification to wait with) the halt is left to `make_safe`.
    fn prepare_halt(&mut self, halt: Call) -> Call {
        if self.wake.is_none() {
            let candidates = |s: &Option<Slot>| matches!(s, Some(Slot { held: Held::Notification { .. }, rights: r }) if r & rights::WAIT != 0);
            let n = self.slots.iter().filter(|s| candidates(s)).count() as u64;
            if n == 0 {
                return halt;
            }
            let k = self.rng.below(n) as usize;
            self.wake = self.slots.iter().enumerate().filter(|(_, s)| candidates(s)).nth(k).map(|(i, _)| i as u64);
            (self.wake_bound, self.wake_armed, self.wake_deadline) = (false, false, None);
        }
        let Some(wake) = self.wake else { return halt };
        // Mostly a timer well after the halt is made (it then sleeps); sometimes one that
        // may fire before (it then returns at once, or sleeps until the next tick).
        let ns = match self.rng.below(4) {
            0 => 1 + self.rng.below(SHORT_TIMER_NS / 2),
            _ => SHORT_TIMER_NS / 2 + self.rng.below(SHORT_TIMER_NS / 2 + 1),
        };
        let timer = mk(Hypercall::TimerSet, wake, 0, [ns, 1 + self.rng.below(7), 0, 0, 0, 0]);
        if !self.wake_bound {
            self.follow(timer);
            self.follow(halt);
            return mk(Hypercall::NotificationBind, wake, 0, [WAKE_VECTOR as u64, 0, 0, 0, 0, 0]);
        }
        if !self.wake_armed {
            self.follow(halt);
            return timer;
        }
        halt
    }

    /// Rewrite a call that would block forever or harm the fuzzer (see the module docs).
    pub fn make_safe(&mut self, mut c: Call) -> Call {
        let slot = self.slots.get(c.rbx as usize).copied().flatten();
        let endpoint_with =
            |right: u64| matches!(slot, Some(Slot { held: Held::Endpoint, rights: r }) if r & right != 0);
        let agent_answers = self.agent.is_some_and(|a| a.endpoint == c.rbx);
        match Hypercall::from_number(c.number) {
            Some(Hypercall::DomainExit) => c.number = Hypercall::Null.number(),
            Some(Hypercall::Call) if endpoint_with(rights::CALL) && !agent_answers => {
                // Refused before anything happens: too long, or long without a message page.
                let max = MAX_MESSAGE_WORDS as u64;
                let refused = c.rcx > max || (c.rcx > REGISTER_WORDS as u64 && !self.message_page);
                if !refused {
                    c.rcx = if !self.message_page && self.rng.chance(50) {
                        REGISTER_WORDS as u64 + 1 + self.rng.below(max - REGISTER_WORDS as u64)
                    } else {
                        max + 1 + self.rng.below(u64::MAX - max)
                    };
                }
            }
            Some(Hypercall::ReplyRecv) if endpoint_with(rights::RECV) => {
                let max = MAX_MESSAGE_WORDS as u64;
                if c.rcx <= max {
                    c.rcx = max + 1 + self.rng.below(u64::MAX - max);
                }
            }
            Some(Hypercall::Recv) if endpoint_with(rights::RECV) => {
                c.rbx = self.empty_slot();
            }
            Some(Hypercall::Wait) => {
                if let Some(s) = slot {
                    if let Held::Notification { pending, armed } = s.held {
                        if s.has_wait() && !pending && !armed {
                            c.number = Hypercall::Poll.number();
                        }
                    }
                }
            }
            Some(Hypercall::SignalWait) => {
                // The signal on RBX never ends a wait on another notification (no two of
                // the fuzzer's slots hold one object): wait on the signalled one instead.
                let wait = self.slots.get(c.args[1] as usize).copied().flatten();
                if let Some(s) = wait {
                    if let Held::Notification { pending, armed } = s.held {
                        if s.has_wait() && !pending && !armed {
                            c.args[1] = c.rbx;
                        }
                    }
                }
            }
            Some(Hypercall::CapDelete) if slot.is_some_and(|s| s.held == Held::Memory) => {
                c.number = Hypercall::CapRevoke.number();
            }
            // A halt nothing is certain to end (its preparation failed): signal only.
            Some(Hypercall::SignalHalt) if self.halt_may_sleep(&c) && !self.wake_ready() => {
                c.number = Hypercall::Signal.number();
            }
            // Whoever holds a copy of the wake notification must not wait on it (a waiter
            // takes the timer's bits: no vector is raised) nor rebind it.
            Some(Hypercall::CapCopy) if self.wake == Some(c.rbx) => c.args[1] &= !rights::WAIT,
            Some(Hypercall::VcpuSetMessagePage) => {
                let a = c.args[0];
                if a != 0 && a.is_multiple_of(4096) && a.checked_add(4096).is_some_and(|end| end <= self.setup.ram) {
                    c.args[0] = self.setup.message_page;
                }
            }
            Some(Hypercall::ConsoleWrite) => {
                let (a, len) = (c.args[0], c.args[1]);
                if len <= CONSOLE_WRITE_MAX && a.checked_add(len).is_some_and(|end| end <= self.setup.ram) {
                    c.args[1] = 0;
                }
            }
            // Below the agent, which must be able to answer whatever they do.
            Some(Hypercall::DomainCreate) if (1..=254).contains(&c.args[1]) => {
                c.args[1] = 1 + c.args[1] % self.setup.child_priority_max.saturating_sub(1).max(1) as u64;
            }
            _ => {}
        }
        c
    }

    /// Learn from a call's outcome: statistics and the model.
    pub fn record(&mut self, c: &Call, out: &Call) {
        self.record_timed(c, out, None);
    }

    /// Calls whose outcome [`Self::record_timed`] wants the clock around (before, after).
    pub fn wants_clock(c: &Call) -> bool {
        c.number == Hypercall::TimerSet.number() || c.number == Hypercall::SignalHalt.number()
    }

    /// [`Self::record`], with the clock read just before and just after the call (for
    /// [`Self::wants_clock`]'s calls: when the wake timer fires, how a halt ended).
    pub fn record_timed(&mut self, c: &Call, out: &Call, clock: Option<(u64, u64)>) {
        let (rax, rdi) = (out.number, out.args[0]);
        if core::mem::take(&mut self.in_step) {
            if let Some(step) = self.agent_step {
                self.agent_advance(step, rax == 0, rdi);
            }
        }
        if core::mem::take(&mut self.in_burst) {
            self.burst_advance(rax == 0, rdi);
        }
        if c.number == Hypercall::Call.number() && rax == 0 {
            // Only the agent answers: with the message itself.
            if self.agent.is_some_and(|a| a.endpoint == c.rbx) && out.rcx == c.rcx && out.args == c.args {
                self.echoes += 1;
            } else {
                self.surprises += 1;
            }
        }
        let bin = if rax <= Self::MAX_CODE { rax as usize } else { STATUS_BINS - 1 };
        self.statuses[bin] += 1;
        if rax != 0 && Error::from_code(rax).is_none() {
            self.surprises += 1;
        }
        let index = WEIGHTS.iter().position(|(h, _)| h.number() == c.number).unwrap_or(WEIGHTS.len());
        self.by_call[index] += 1;
        if rax != 0 {
            return;
        }
        let Some(h) = Hypercall::from_number(c.number) else {
            // An unknown number succeeded.
            self.surprises += 1;
            return;
        };
        let new = |held, rights| Some(Slot { held, rights });
        let slot = c.rbx as usize;
        match h {
            Hypercall::DomainCreate => self.created(rdi, new(Held::Domain { alive: true }, rights::CONTROL)),
            Hypercall::VcpuCreate => self.created(rdi, new(Held::Vcpu { domain: c.rbx }, rights::CONTROL)),
            Hypercall::RegionCreate => {
                let all = rights::READ | rights::WRITE | rights::EXEC | rights::GRANT;
                self.created(rdi, new(Held::Region, all))
            }
            Hypercall::EndpointCreate => {
                self.created(rdi, new(Held::Endpoint, rights::CALL | rights::RECV | rights::GRANT))
            }
            Hypercall::NotificationCreate => {
                let held = Held::Notification { pending: false, armed: false };
                self.created(rdi, new(held, rights::SIGNAL | rights::WAIT | rights::GRANT))
            }
            // Success on a slot outside the table cannot happen: a surprise.
            Hypercall::CapDelete => {
                match self.slots.get_mut(slot) {
                    Some(s) => *s = None,
                    None => self.surprises += 1,
                }
                if self.wake == Some(c.rbx) {
                    // Another is chosen (and bound) before the next halt that needs it.
                    self.wake = None;
                    (self.wake_bound, self.wake_armed, self.wake_deadline) = (false, false, None);
                }
            }
            Hypercall::DomainDestroy => {
                if let Some(Some(s)) = self.slots.get_mut(slot) {
                    s.held = Held::Domain { alive: false };
                }
            }
            Hypercall::Signal => self.set_notification(slot, |p, _| *p = true),
            Hypercall::Wait | Hypercall::Poll => {
                if h == Hypercall::Wait && !self.notification_pending(slot) {
                    self.timed_waits += 1;
                }
                // A wait took the timer's bits (as a waiter, no vector is raised).
                if h == Hypercall::Wait && self.wake == Some(c.rbx) {
                    self.wake_armed = false;
                }
                // Whether an armed timer fired meanwhile is unknown: trust neither.
                self.set_notification(slot, |p, a| (*p, *a) = (false, false));
            }
            Hypercall::SignalWait => {
                let wait = c.args[1] as usize;
                if wait != slot && !self.notification_pending(wait) {
                    self.timed_waits += 1;
                }
                if self.wake == Some(c.args[1]) {
                    self.wake_armed = false;
                }
                // Signalled, then the waited-on one's bits taken (the same one: both).
                self.set_notification(slot, |p, _| *p = true);
                self.set_notification(wait, |p, a| (*p, *a) = (false, false));
            }
            // Only with the machine capability, which the fuzzer never holds.
            Hypercall::ConsoleRead => self.surprises += 1,
            Hypercall::TimerSet => {
                let ns = c.args[0];
                let short = ns != 0 && ns <= SHORT_TIMER_NS;
                self.set_notification(slot, |_, a| *a = short);
                if self.wake == Some(c.rbx) {
                    // One timer per notification: this one replaced (or cancelled) any other.
                    self.wake_armed = short;
                    self.wake_deadline = clock.filter(|_| ns != 0).map(|(before, _)| before.saturating_add(ns));
                }
            }
            Hypercall::NotificationBind if self.wake == Some(c.rbx) => {
                // A timer that fired before this binding raised no vector: re-arm after it.
                self.wake_bound = c.args[0] == WAKE_VECTOR as u64;
                self.wake_armed = false;
            }
            Hypercall::SignalHalt => {
                self.signal_halts += 1;
                if self.wake == Some(c.rbx) && self.wake_bound {
                    self.halts_at_once += 1;
                } else {
                    match (clock, self.wake_deadline) {
                        (Some((_, after)), Some(d)) if after < d => self.halts_at_once += 1,
                        (Some((before, _)), Some(d)) if before < d => self.halts_slept += 1,
                        _ => self.halts_unclear += 1,
                    }
                }
                // Its signal as `Signal`'s; the interrupts let in after it may have taken
                // the wake timer's vector.
                self.set_notification(slot, |p, _| *p = true);
                self.wake_armed = false;
            }
            Hypercall::VcpuSetMessagePage => self.message_page = c.args[0] != 0,
            _ => {}
        }
    }

    fn created(&mut self, slot: u64, what: Option<Slot>) {
        match self.slots.get_mut(slot as usize) {
            Some(s) if s.is_none() => *s = what,
            // The microvisor put a new capability where the model has one, or outside the
            // table: the model (or the microvisor) is wrong.
            _ => self.surprises += 1,
        }
    }

    fn notification_pending(&self, slot: usize) -> bool {
        matches!(self.slots.get(slot), Some(Some(Slot { held: Held::Notification { pending: true, .. }, .. })))
    }

    fn set_notification(&mut self, slot: usize, f: impl FnOnce(&mut bool, &mut bool)) {
        if let Some(Some(Slot { held: Held::Notification { pending, armed }, .. })) = self.slots.get_mut(slot) {
            f(pending, armed);
        }
    }

    // ---- random values ----------------------------------------------------------------

    /// Mostly a slot holding what the call wants, else any slot, empty or out of range.
    fn slot_for(&mut self, wanted: impl Fn(&Held) -> bool) -> u64 {
        match self.rng.below(10) {
            0..=5 => self.pick_filled(wanted),
            6 | 7 => self.pick_filled(|_| true),
            _ => self.any_slot(),
        }
    }

    /// A random filled slot matching `wanted`, else any slot.
    fn pick_filled(&mut self, wanted: impl Fn(&Held) -> bool) -> u64 {
        let n = self.slots.iter().flatten().filter(|s| wanted(&s.held)).count() as u64;
        if n == 0 {
            return self.any_slot();
        }
        let k = self.rng.below(n) as usize;
        let i = self.slots.iter().enumerate().filter(|(_, s)| s.is_some_and(|s| wanted(&s.held))).nth(k);
        i.map_or(0, |(i, _)| i as u64)
    }

    /// Any slot number: in the table (filled or not) or far outside it.
    fn any_slot(&mut self) -> u64 {
        match self.rng.below(10) {
            0 => CAP_SLOTS as u64 + self.rng.below(4),
            1 => self.rng.next_u64(),
            2 => u64::MAX,
            _ => self.rng.below(CAP_SLOTS as u64),
        }
    }

    /// A slot the model says is empty (out of range if the table is full).
    fn empty_slot(&mut self) -> u64 {
        let start = self.rng.below(CAP_SLOTS as u64) as usize;
        (0..CAP_SLOTS)
            .map(|i| (start + i) % CAP_SLOTS)
            .find(|&i| self.slots[i].is_none())
            .map_or(CAP_SLOTS as u64 + 1, |i| i as u64)
    }

    /// A RAM size DomainCreate refuses (0, over 1 GiB), or very rarely the largest one,
    /// which runs out of memory after zeroing all of it (slow: it tests the unwinding).
    fn bad_ram(&mut self) -> u64 {
        match self.rng.below(1000) {
            0 => 1 << 30,
            1..=200 => 0,
            201..=400 => (1 << 30) + 1 + self.rng.below(1 << 40),
            401..=600 => u64::MAX - self.rng.below(1 << 21),
            _ => (1 << 30) + 1 + self.rng.next_u64() % (u64::MAX - (1 << 30)),
        }
    }

    /// An interesting number.
    fn value(&mut self) -> u64 {
        match self.rng.below(12) {
            0 => 0,
            1 => 1,
            2 => u64::MAX,
            3 => 1 << 63,
            4 => 4096,
            5 => self.rng.below(256),
            6 => self.rng.next_u64() as u32 as u64,
            7 => self.setup.ram,
            8 => 0x4000_0000,
            _ => self.rng.next_u64(),
        }
    }

    /// An address: in the fuzzer's RAM, at its edge, or far outside.
    fn address(&mut self) -> u64 {
        match self.rng.below(8) {
            0 => self.setup.ram - self.rng.below(16),
            1 => self.value(),
            2 => u64::MAX - self.rng.below(4096),
            _ => self.rng.below(self.setup.ram),
        }
    }

    /// A guest-physical address in a created domain (most have 2 or 4 MiB).
    fn child_address(&mut self) -> u64 {
        match self.rng.below(8) {
            0 => self.value(),
            1 => (2 << 20) - self.rng.below(8192),
            _ => self.rng.below(4 << 20),
        }
    }

    fn length(&mut self) -> u64 {
        match self.rng.below(6) {
            0 => self.value(),
            1 => CONSOLE_WRITE_MAX + 1 + self.rng.below(8192),
            _ => self.rng.below(CONSOLE_WRITE_MAX + 1),
        }
    }

    /// Map rights: usually a combination of READ, WRITE and EXEC, sometimes other bits.
    fn access(&mut self) -> u64 {
        match self.rng.below(6) {
            0 => self.rng.below(1 << 10),
            1 => self.value(),
            _ => rights::READ | self.rng.below(8) & (rights::WRITE | rights::EXEC),
        }
    }

    /// A CapCopy rights mask: any subset of the rights, or anything.
    fn access_mask(&mut self) -> u64 {
        match self.rng.below(5) {
            0 => self.value(),
            1 => rights::ALL,
            _ => self.rng.below(rights::ALL + 1),
        }
    }
}

fn mk(h: Hypercall, rbx: u64, rcx: u64, args: [u64; 6]) -> Call {
    Call { number: h.number(), rbx, rcx, args }
}

impl Slot {
    fn has_wait(&self) -> bool {
        self.rights & rights::WAIT != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> Setup {
        Setup {
            memory: 5,
            timer: Some(3),
            ram: 8 << 20,
            child_priority_max: 4,
            message_page: 0x20_0000,
            name: 0x1000,
            agent_code: 0x3000,
        }
    }

    /// A stand-in for the microvisor that accepts everything it can: creations get the
    /// lowest free slot; other calls succeed or fail at random.
    fn drive(seed: u64, calls: usize, mut check: impl FnMut(&Fuzzer, &Call)) -> Fuzzer {
        let mut f = Fuzzer::new(seed, setup());
        let mut rng = Rng::new(seed ^ 0xabcdef);
        for _ in 0..calls {
            let c = f.next_call();
            check(&f, &c);
            let creates = [
                Hypercall::DomainCreate,
                Hypercall::VcpuCreate,
                Hypercall::RegionCreate,
                Hypercall::EndpointCreate,
                Hypercall::NotificationCreate,
            ];
            let agent_answers = f.agent.is_some_and(|a| a.endpoint == c.rbx) && c.rcx <= REGISTER_WORDS as u64;
            let (rax, rdi) = if Hypercall::from_number(c.number).is_none() {
                (Error::UnknownHypercall.code(), 0)
            } else if c.number == Hypercall::ConsoleRead.number() {
                // The fuzzer holds no machine capability.
                (Error::WrongType.code(), 0)
            } else if c.number == Hypercall::Call.number() {
                (if agent_answers { 0 } else { Error::InvalidArgument.code() }, c.args[0])
            } else if creates.iter().any(|h| h.number() == c.number) {
                match f.slots.iter().position(|s| s.is_none()) {
                    Some(i) if rng.chance(70) => (0, i as u64),
                    _ => (Error::OutOfMemory.code(), 0),
                }
            } else if c.rbx < CAP_SLOTS as u64 && rng.chance(80) {
                (0, 0)
            } else {
                (Error::InvalidSlot.code(), 0)
            };
            let mut out = Call { number: rax, rbx: 0, rcx: c.rcx, args: c.args };
            out.args[0] = rdi;
            if c.number == Hypercall::Call.number() && rax == 0 {
                out.args = c.args;
            }
            f.record(&c, &out);
        }
        f
    }

    #[test]
    fn every_fuzzed_hypercall_has_its_own_name() {
        for (i, (h, _)) in WEIGHTS.iter().enumerate() {
            assert_eq!(Fuzzer::call_name(i), format!("{h:?}"), "name {i}");
        }
        assert_eq!(Fuzzer::call_name(WEIGHTS.len()), "unknown");
    }

    #[test]
    fn never_makes_a_call_that_could_block_forever_or_end_the_run() {
        for seed in 0..8 {
            drive(seed, 20_000, |f, c| {
                let slot = f.slots.get(c.rbx as usize).copied().flatten();
                let h = Hypercall::from_number(c.number);
                assert_ne!(h, Some(Hypercall::DomainExit));
                match (h, slot) {
                    (Some(Hypercall::Recv), Some(Slot { held: Held::Endpoint, rights: r })) => {
                        assert_eq!(r & rights::RECV, 0, "a Recv on an endpoint nobody sends to: {c:?}")
                    }
                    (Some(Hypercall::ReplyRecv), Some(Slot { held: Held::Endpoint, rights: r }))
                        if r & rights::RECV != 0 =>
                    {
                        assert!(c.rcx > MAX_MESSAGE_WORDS as u64, "{c:?}")
                    }
                    (Some(Hypercall::Call), Some(Slot { held: Held::Endpoint, .. }))
                        if f.agent.is_none_or(|a| a.endpoint != c.rbx) =>
                    {
                        assert!(c.rcx > REGISTER_WORDS as u64, "a call nobody answers: {c:?}")
                    }
                    (Some(Hypercall::Wait), Some(Slot { held: Held::Notification { pending, armed }, .. })) => {
                        assert!(pending || armed, "a wait nobody ends: {c:?}")
                    }
                    (Some(Hypercall::SignalWait), Some(Slot { held: Held::Notification { .. }, rights: r }))
                        if r & rights::SIGNAL != 0 && c.args[1] != c.rbx =>
                    {
                        if let Some(Slot { held: Held::Notification { pending, armed }, rights: w }) =
                            f.slots.get(c.args[1] as usize).copied().flatten()
                        {
                            assert!(w & rights::WAIT == 0 || pending || armed, "a signal-wait nobody ends: {c:?}")
                        }
                    }
                    (Some(Hypercall::CapDelete), Some(Slot { held: Held::Memory, .. })) => {
                        panic!("deleting the memory capability: {c:?}")
                    }
                    (Some(Hypercall::SignalHalt), _) if f.halt_may_sleep(c) => {
                        assert!(f.wake_ready(), "a halt nothing is certain to end: {c:?}")
                    }
                    (Some(Hypercall::DomainCreate), _) if (1..=254).contains(&c.args[1]) => {
                        assert!(c.args[1] <= 4, "a domain at priority {} (limit 4)", c.args[1])
                    }
                    _ => {}
                }
            });
        }
    }

    #[test]
    fn covers_every_modelled_hypercall_and_unknown_numbers() {
        let f = drive(7, 50_000, |_, _| {});
        for (i, n) in f.by_call.iter().enumerate() {
            assert!(*n > 0, "{} never called", Fuzzer::call_name(i));
        }
        assert!(f.timed_waits > 0, "no wait ever blocked on a timer");
        assert!(f.signal_halts > 0, "no SignalHalt ever succeeded");
        assert!(f.echoes > 0, "the agent never answered");
        assert!(f.bursts > 0, "no burst filled the tables");
        assert_eq!(f.surprises, 0);
    }

    #[test]
    fn same_seed_same_calls() {
        let mut a = Fuzzer::new(42, setup());
        let mut b = Fuzzer::new(42, setup());
        let mut c = Fuzzer::new(43, setup());
        let (mut same, mut differ) = (true, false);
        for _ in 0..1000 {
            let (x, y, z) = (a.next_call(), b.next_call(), c.next_call());
            same &= x == y;
            differ |= x != z;
            for f in [&mut a, &mut b, &mut c] {
                f.record(&x, &Call { number: 1, ..Call::default() });
            }
        }
        assert!(same && differ);
    }

    fn out(rax: u64, rdi: u64) -> Call {
        Call { number: rax, args: [rdi, 0, 0, 0, 0, 0], ..Call::default() }
    }

    #[test]
    fn the_model_follows_creations_and_deletions() {
        let mut f = Fuzzer::new(1, setup());
        let create = Call { number: Hypercall::EndpointCreate.number(), rbx: 5, ..Call::default() };
        f.record(&create, &out(0, 0));
        assert_eq!(f.slots[0].map(|s| s.held), Some(Held::Endpoint));
        // A creation into a slot the model has filled is a surprise.
        f.record(&create, &out(0, 5));
        assert_eq!(f.surprises, 1);
        let delete = Call { number: Hypercall::CapDelete.number(), rbx: 0, ..Call::default() };
        f.record(&delete, &out(0, 0));
        assert_eq!(f.slots[0], None);
        // An unknown status word is a surprise too.
        f.record(&delete, &out(0xdead, 0));
        assert_eq!(f.surprises, 2);
        // A Recv on the endpoint goes elsewhere; a Call gets a length that is refused.
        f.record(&create, &out(0, 0));
        let recv = f.make_safe(Call { number: Hypercall::Recv.number(), rbx: 0, ..Call::default() });
        assert!(f.slots.get(recv.rbx as usize).copied().flatten().is_none());
        let call = f.make_safe(Call { number: Hypercall::Call.number(), rbx: 0, rcx: 2, ..Call::default() });
        assert!(call.rcx > REGISTER_WORDS as u64);
    }

    /// Unknown numbers are numbers the ABI does not define: never SignalHalt or any other
    /// known one, and every known number the generator makes is one it models.
    #[test]
    fn unknown_numbers_avoid_every_known_hypercall() {
        let mut f = Fuzzer::new(3, setup());
        for _ in 0..20_000 {
            let c = f.unknown();
            assert!(Hypercall::from_number(c.number).is_none(), "unknown() drew {c:?}");
        }
        drive(11, 20_000, |_, c| {
            if let Some(h) = Hypercall::from_number(c.number) {
                assert!(WEIGHTS.iter().any(|(w, _)| *w == h), "{h:?} is made but not modelled");
            }
        });
    }

    fn call(h: Hypercall, rbx: u64, args: [u64; 6]) -> Call {
        mk(h, rbx, 0, args)
    }

    fn ok() -> Call {
        out(0, 0)
    }

    #[test]
    fn a_halt_with_nothing_armed_gets_a_binding_and_a_timer_first() {
        let mut f = Fuzzer::new(9, setup());
        f.only = Fuzzer::call_index("SignalHalt");
        assert_eq!(f.wake, Some(3), "the timer is the first wake notification");
        let mut seen = 0;
        for _ in 0..200 {
            let c = f.next_call();
            if c.number == Hypercall::SignalHalt.number() && c.rbx == 3 {
                // The wake notification itself: no preparation needed once bound.
                assert!(f.wake_bound, "{c:?}");
            } else if f.halt_may_sleep(&c) || c.number == Hypercall::NotificationBind.number() {
                // Unbound: bind, then a timer, then the halt.
                assert_eq!(c, call(Hypercall::NotificationBind, 3, [WAKE_VECTOR as u64, 0, 0, 0, 0, 0]));
                f.record(&c, &ok());
                let t = f.next_call();
                assert_eq!((t.number, t.rbx), (Hypercall::TimerSet.number(), 3), "{t:?}");
                assert!((1..=SHORT_TIMER_NS).contains(&t.args[0]), "{t:?}");
                f.record_timed(&t, &ok(), Some((1_000, 1_100)));
                let h = f.next_call();
                assert_eq!(h.number, Hypercall::SignalHalt.number(), "{h:?}");
                assert!(f.wake_ready());
                // Returned after the deadline: it slept (unless it signalled the wake
                // notification, now bound: at once). The next halt needs a new timer but
                // no new binding.
                f.record_timed(&h, &ok(), Some((1_000, 1_000 + t.args[0] + 5)));
                let slept = u64::from(h.rbx != 3);
                assert_eq!((f.halts_slept, f.halts_at_once), (slept, 1 - slept), "{h:?}");
                assert!(f.wake_bound && !f.wake_armed);
                seen += 1;
                break;
            }
            f.record(&c, &out(Error::InvalidSlot.code(), 0));
        }
        assert_eq!(seen, 1, "no halt that may sleep drawn");
        // Armed but unbound is not enough, and a timer set before the binding is not
        // trusted (it may have fired while nothing was bound).
        let halt = call(Hypercall::SignalHalt, 3, [1, 0, 0, 0, 0, 0]);
        let mut f = Fuzzer::new(9, setup());
        f.record(&call(Hypercall::TimerSet, 3, [1000, 1, 0, 0, 0, 0]), &ok());
        assert!(f.wake_armed && !f.wake_ready());
        f.record(&call(Hypercall::NotificationBind, 3, [WAKE_VECTOR as u64, 0, 0, 0, 0, 0]), &ok());
        assert!(f.wake_bound && !f.wake_armed);
        // Bound: a halt signalling the wake notification raises its own vector.
        assert!(!f.halt_may_sleep(&halt));
        f.record(&halt, &ok());
        assert_eq!(f.halts_at_once, 1);
    }

    #[test]
    fn a_refused_halt_is_left_as_is_and_an_unsafe_one_only_signals() {
        let mut f = Fuzzer::new(5, setup());
        f.record(&call(Hypercall::EndpointCreate, 5, [0; 6]), &out(0, 0));
        f.slots[7] = Some(Slot { held: Held::Notification { pending: false, armed: false }, rights: rights::WAIT });
        // Out of range, empty, the wrong type, no SIGNAL right: refused, never halted.
        for slot in [CAP_SLOTS as u64, u64::MAX, 9, 0, 5, 7] {
            let c = call(Hypercall::SignalHalt, slot, [1, 0, 0, 0, 0, 0]);
            assert!(!f.halt_may_sleep(&c), "{c:?}");
            assert_eq!(f.make_safe(c), c);
        }
        // A notification with SIGNAL and nothing armed: only a signal.
        f.record(&call(Hypercall::NotificationCreate, 5, [0; 6]), &out(0, 1));
        let c = call(Hypercall::SignalHalt, 1, [6, 0, 0, 0, 0, 0]);
        assert!(f.halt_may_sleep(&c));
        assert_eq!(f.make_safe(c), call(Hypercall::Signal, 1, [6, 0, 0, 0, 0, 0]));
        // Bound and armed: made as drawn.
        f.record(&call(Hypercall::NotificationBind, 3, [WAKE_VECTOR as u64, 0, 0, 0, 0, 0]), &ok());
        f.record(&call(Hypercall::TimerSet, 3, [SHORT_TIMER_NS, 1, 0, 0, 0, 0]), &ok());
        assert_eq!(f.make_safe(c), c);
        // A long timer replaces the short one; a rebind elsewhere undoes the binding.
        f.record(&call(Hypercall::TimerSet, 3, [SHORT_TIMER_NS + 1, 1, 0, 0, 0, 0]), &ok());
        assert!(!f.wake_ready());
        f.record(&call(Hypercall::TimerSet, 3, [5, 1, 0, 0, 0, 0]), &ok());
        f.record(&call(Hypercall::NotificationBind, 3, [0x42, 0, 0, 0, 0, 0]), &ok());
        assert!(!f.wake_bound && f.make_safe(c).number == Hypercall::Signal.number());
        // Copies of the wake notification lose WAIT.
        let copy = f.make_safe(call(Hypercall::CapCopy, 3, [2, rights::ALL, 0, 0, 0, 0]));
        assert_eq!(copy.args[1], rights::ALL & !rights::WAIT);
        // Deleting it: another notification becomes the wake one before the next halt.
        f.record(&call(Hypercall::CapDelete, 3, [0; 6]), &ok());
        assert_eq!(f.wake, None);
        let prep = f.prepare_halt(c);
        assert_eq!((prep.number, prep.rbx), (Hypercall::NotificationBind.number(), 1));
        assert_eq!(f.wake, Some(1));
    }

    /// A stand-in for the microvisor's notifications, independent of the model: objects,
    /// bindings, one-shot timers that fire at random moments (before a binding, too), bits,
    /// and the fuzzer's vCPU with its vectors raised and not yet let in. A wait or a halt
    /// that nothing would ever end fails the test.
    struct Notifications {
        rng: Rng,
        /// Per slot of the fuzzer's table: a notification (its index) with its rights, or
        /// another object.
        table: [Option<(Option<usize>, u64)>; CAP_SLOTS],
        /// bound vector (0: to receive), short timer armed, bits pending.
        objects: Vec<(Option<u64>, Option<u64>, bool)>,
        /// A vector raised and not yet let in.
        raised: bool,
        halts_slept: u64,
        halts_at_once: u64,
        /// Random binds and deletions of the wake notification the model had chosen.
        wake_undone: u64,
    }

    impl Notifications {
        fn new(seed: u64) -> Self {
            let mut table = [None; CAP_SLOTS];
            table[5] = Some((None, rights::CONTROL | rights::GRANT));
            table[3] = Some((Some(0), rights::SIGNAL | rights::WAIT));
            Self {
                rng: Rng::new(seed),
                table,
                objects: vec![(None, None, false)],
                raised: false,
                halts_slept: 0,
                halts_at_once: 0,
                wake_undone: 0,
            }
        }

        fn notification(&self, slot: u64, right: u64) -> Result<usize, Error> {
            match self.table.get(slot as usize).copied().flatten() {
                None => Err(Error::InvalidSlot),
                Some((Some(n), r)) if r & right != 0 => Ok(n),
                Some((Some(_), _)) => Err(Error::PermissionDenied),
                Some((None, _)) => Err(Error::WrongType),
            }
        }

        fn signal(&mut self, n: usize) {
            self.objects[n].2 = true;
            if self.objects[n].0.is_some_and(|v| v != 0) {
                self.raised = true;
            }
        }

        fn fire(&mut self, n: usize) {
            self.objects[n].1 = None;
            self.signal(n);
        }

        fn wait(&mut self, n: usize, c: &Call) {
            if !self.objects[n].2 {
                assert!(self.objects[n].1.is_some(), "a wait nobody ends: {c:?}");
                // The waiter takes the timer's bits: no vector.
                self.objects[n].1 = None;
            }
            self.objects[n].2 = false;
        }

        /// Make `c`: its status and RDI.
        fn make(&mut self, f: &Fuzzer, c: &Call) -> (u64, u64) {
            // Timers fire whenever they like.
            for n in 0..self.objects.len() {
                if self.objects[n].1.is_some() && self.rng.chance(30) {
                    self.fire(n);
                }
            }
            let status = |r: Result<(), Error>| r.map_or_else(|e| e.code(), |()| 0);
            let slot = c.rbx;
            match Hypercall::from_number(c.number) {
                None => (Error::UnknownHypercall.code(), 0),
                Some(
                    h @ (Hypercall::DomainCreate
                    | Hypercall::VcpuCreate
                    | Hypercall::RegionCreate
                    | Hypercall::EndpointCreate
                    | Hypercall::NotificationCreate),
                ) => match self.table.iter().position(|s| s.is_none()) {
                    Some(i) if self.rng.chance(70) => {
                        self.table[i] = Some(if h == Hypercall::NotificationCreate {
                            self.objects.push((None, None, false));
                            (Some(self.objects.len() - 1), rights::SIGNAL | rights::WAIT | rights::GRANT)
                        } else {
                            (None, rights::ALL)
                        });
                        (0, i as u64)
                    }
                    _ => (Error::OutOfMemory.code(), 0),
                },
                Some(Hypercall::CapDelete) => match self.table.get_mut(slot as usize) {
                    Some(s @ Some(_)) => {
                        *s = None;
                        self.wake_undone += u64::from(f.wake == Some(slot));
                        (0, 0)
                    }
                    _ => (Error::InvalidSlot.code(), 0),
                },
                Some(Hypercall::NotificationBind) => {
                    let r = self.notification(slot, rights::WAIT).and_then(|n| {
                        let v = u8::try_from(c.args[0]).ok().filter(|&v| v >= 32 || v == 0);
                        self.objects[n].0 = Some(v.ok_or(Error::InvalidArgument)? as u64);
                        Ok(())
                    });
                    if r.is_ok() && f.wake == Some(slot) && c.args[0] != WAKE_VECTOR as u64 {
                        self.wake_undone += 1;
                    }
                    (status(r), 0)
                }
                Some(Hypercall::TimerSet) => {
                    let r = self.notification(slot, rights::WAIT).map(|n| {
                        let ns = c.args[0];
                        self.objects[n].1 = (ns != 0 && ns <= SHORT_TIMER_NS).then_some(ns);
                    });
                    (status(r), 0)
                }
                Some(Hypercall::Signal) => (status(self.notification(slot, rights::SIGNAL).map(|n| self.signal(n))), 0),
                Some(Hypercall::Poll) => {
                    let r = self.notification(slot, rights::WAIT).map(|n| self.objects[n].2 = false);
                    (status(r), 0)
                }
                Some(Hypercall::Wait) => (status(self.notification(slot, rights::WAIT).map(|n| self.wait(n, c))), 0),
                Some(Hypercall::SignalWait) => {
                    let r = self.notification(slot, rights::SIGNAL).and_then(|n| {
                        let m = self.notification(c.args[1], rights::WAIT)?;
                        self.signal(n);
                        self.wait(m, c);
                        Ok(())
                    });
                    (status(r), 0)
                }
                Some(Hypercall::SignalHalt) => {
                    let r = self.notification(slot, rights::SIGNAL).map(|n| {
                        self.signal(n);
                        if self.raised {
                            self.halts_at_once += 1;
                        } else {
                            // Asleep: only a timer on a notification bound to a vector
                            // wakes the fuzzer.
                            let waker = (0..self.objects.len())
                                .find(|&m| self.objects[m].1.is_some() && self.objects[m].0.is_some_and(|v| v != 0));
                            let Some(m) = waker else { panic!("halted for good: {c:?}") };
                            self.fire(m);
                            self.halts_slept += 1;
                        }
                        // The fuzzer lets the interrupts in.
                        self.raised = false;
                    });
                    (status(r), 0)
                }
                Some(Hypercall::ConsoleRead) => (Error::WrongType.code(), 0),
                Some(Hypercall::Call) => {
                    let answers = f.agent.is_some_and(|a| a.endpoint == slot) && c.rcx <= REGISTER_WORDS as u64;
                    (if answers { 0 } else { Error::InvalidArgument.code() }, c.args[0])
                }
                // Only these take a notification besides the calls above.
                Some(Hypercall::CapCopy | Hypercall::CapRevoke) => (0, 0),
                Some(_) if self.notification(slot, rights::ALL).is_ok() => (Error::WrongType.code(), 0),
                Some(_) if slot < CAP_SLOTS as u64 && self.rng.chance(80) => (0, 0),
                Some(_) => (Error::InvalidSlot.code(), 0),
            }
        }
    }

    #[test]
    fn the_wake_binding_survives_random_rebinds_deletions_and_timers() {
        let (mut slept, mut at_once, mut undone) = (0, 0, 0);
        for seed in 0..6 {
            let mut f = Fuzzer::new(seed, setup());
            let mut k = Notifications::new(seed ^ 0x5eed);
            for _ in 0..30_000 {
                let c = f.next_call();
                let (rax, rdi) = k.make(&f, &c);
                let mut out = Call { number: rax, rbx: 0, rcx: c.rcx, args: c.args };
                out.args[0] = rdi;
                if c.number == Hypercall::Call.number() && rax == 0 {
                    out.args = c.args;
                }
                f.record(&c, &out);
            }
            assert_eq!(f.surprises, 0, "seed {seed}");
            (slept, at_once, undone) = (slept + k.halts_slept, at_once + k.halts_at_once, undone + k.wake_undone);
        }
        eprintln!("halts: {slept} slept, {at_once} at once, wake undone {undone}");
        assert!(slept > 50 && at_once > 50, "halts: {slept} slept, {at_once} at once");
        assert!(undone > 10, "the wake notification was rebound or deleted only {undone} times");
    }
}

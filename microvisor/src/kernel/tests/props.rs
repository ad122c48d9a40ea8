//! Kernel tests: property tests over random hypercall sequences.

use super::ipc::ipc_setup;
use super::*;

/// A capability as the shadow model sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SCap {
    object: Object,
    rights: u64,
    badge: u64,
    id: u64,
    parent: u64,
}

/// Which capabilities each domain holds, maintained from what the hypercalls are documented
/// to do, independently of the kernel's tables (compared with them after every step).
struct Shadow {
    tables: Vec<[Option<SCap>; CAP_SLOTS]>,
    domains: HashSet<(DomainId, u32)>,
    vcpus: HashMap<(VcpuId, u32), DomainId>,
    next_id: u64,
}

impl Shadow {
    fn from_kernel(k: &K) -> Self {
        let mut tables = vec![[None; CAP_SLOTS]; MAX_DOMAINS];
        for (d, dom) in k.domains.iter().enumerate() {
            for (slot, c) in dom.caps.iter() {
                let (id, parent) = (c.id as u64, c.parent as u64);
                tables[d][slot as usize] =
                    Some(SCap { object: c.object, rights: c.rights, badge: c.badge, id, parent });
            }
        }
        let domains = (0..MAX_DOMAINS)
            .filter(|&d| k.domains[d].state == DomainState::Alive)
            .map(|d| (d as DomainId, k.domains[d].generation))
            .collect();
        let vcpus = (0..MAX_VCPUS)
            .filter(|&v| k.vcpus[v].state != VcpuState::Free)
            .map(|v| ((v as VcpuId, k.vcpus[v].generation), k.vcpus[v].domain))
            .collect();
        Self { tables, domains, vcpus, next_id: 1 << 40 }
    }

    fn get(&self, d: DomainId, slot: u64) -> Result<SCap, Error> {
        usize::try_from(slot)
            .ok()
            .and_then(|i| self.tables[d as usize].get(i).copied().flatten())
            .ok_or(Error::InvalidSlot)
    }

    fn lookup(&self, d: DomainId, slot: u64, rights: u64) -> Result<SCap, Error> {
        let c = self.get(d, slot)?;
        if c.rights & rights != rights {
            return Err(Error::PermissionDenied);
        }
        let alive = match c.object {
            Object::Domain(x, g) => self.domains.contains(&(x, g)),
            Object::Vcpu(x, g) => self.vcpus.contains_key(&(x, g)),
            _ => true,
        };
        if alive {
            Ok(c)
        } else {
            Err(Error::StaleCapability)
        }
    }

    fn typed(&self, d: DomainId, slot: u64, rights: u64, kind: Kind) -> Result<SCap, Error> {
        let c = self.lookup(d, slot, rights)?;
        if kind_of(c.object) == kind {
            Ok(c)
        } else {
            Err(Error::WrongType)
        }
    }

    /// Like `typed`, but the errors a kernel may give when more than one check fails: the ABI
    /// does not order the rights check before the type check.
    fn typed_any(&self, d: DomainId, slot: u64, rights: u64, kind: Kind) -> Result<SCap, Vec<Error>> {
        match self.typed(d, slot, rights, kind) {
            Ok(c) => Ok(c),
            Err(e @ (Error::PermissionDenied | Error::StaleCapability))
                if kind_of(self.get(d, slot).unwrap().object) != kind =>
            {
                Err(vec![e, Error::WrongType])
            }
            Err(e) => Err(vec![e]),
        }
    }

    fn domain(&self, d: DomainId, slot: u64) -> Result<DomainId, Error> {
        match self.typed(d, slot, rights::CONTROL, Kind::Domain)?.object {
            Object::Domain(t, _) => Ok(t),
            _ => unreachable!(),
        }
    }

    fn free_slot(&self, d: DomainId) -> Option<u64> {
        self.tables[d as usize].iter().position(Option::is_none).map(|i| i as u64)
    }

    fn insert(&mut self, d: DomainId, object: Object, rights: u64, badge: u64, parent: u64) -> Result<u64, Error> {
        let slot = self.free_slot(d).ok_or(Error::NoFreeSlot)?;
        self.next_id += 1;
        self.tables[d as usize][slot as usize] = Some(SCap { object, rights, badge, id: self.next_id, parent });
        Ok(slot)
    }

    /// CapCopy as documented, checks in the kernel's order.
    fn copy(&mut self, d: DomainId, src: u64, target: u64, mask: u64, badge: u64) -> Result<u64, Error> {
        let t = self.domain(d, target)?;
        let c = self.lookup(d, src, rights::GRANT)?;
        let badge = match kind_of(c.object) {
            Kind::Endpoint | Kind::Notification if c.badge == 0 => badge,
            _ if badge != 0 => return Err(Error::InvalidArgument),
            _ => c.badge,
        };
        self.insert(t, c.object, c.rights & mask, badge, c.id)
    }

    fn revoke(&mut self, d: DomainId, slot: u64) -> Result<u64, Error> {
        let root = self.get(d, slot)?;
        let mut ids = vec![root.id];
        let mut removed = 0;
        loop {
            let before = removed;
            for table in self.tables.iter_mut() {
                for s in table.iter_mut() {
                    if let Some(c) = s {
                        if c.parent != 0 && ids.contains(&c.parent) {
                            ids.push(c.id);
                            *s = None;
                            removed += 1;
                        }
                    }
                }
            }
            if removed == before {
                return Ok(removed);
            }
        }
    }

    fn delete(&mut self, d: DomainId, slot: u64) -> Result<(), Error> {
        self.get(d, slot)?;
        self.tables[d as usize][slot as usize] = None;
        Ok(())
    }

    fn destroy(&mut self, t: DomainId) {
        self.tables[t as usize] = [None; CAP_SLOTS];
        self.domains.retain(|&(d, _)| d != t);
        self.vcpus.retain(|_, d| *d != t);
    }

    /// The kernel's tables hold exactly the shadow's capabilities.
    fn compare(&self, k: &K) {
        for d in 0..MAX_DOMAINS {
            for slot in 0..CAP_SLOTS {
                let kc = k.domains[d].caps.get(slot as u64).ok().map(|c| (c.object, c.rights, c.badge));
                let sc = self.tables[d][slot].map(|c| (c.object, c.rights, c.badge));
                assert_eq!(kc, sc, "domain {d} slot {slot}: kernel vs model");
            }
        }
        let kd: HashSet<(DomainId, u32)> = (0..MAX_DOMAINS)
            .filter(|&d| k.domains[d].state == DomainState::Alive)
            .map(|d| (d as DomainId, k.domains[d].generation))
            .collect();
        assert_eq!(kd, self.domains, "live domains");
        let kv: HashSet<(VcpuId, u32)> = (0..MAX_VCPUS)
            .filter(|&v| k.vcpus[v].state != VcpuState::Free)
            .map(|v| (v as VcpuId, k.vcpus[v].generation))
            .collect();
        assert_eq!(kv, self.vcpus.keys().copied().collect::<HashSet<_>>(), "live vCPUs");
    }
}

/// One step of a random run.
#[derive(Clone, Debug)]
enum Op {
    /// The running vCPU makes a hypercall; the numbers pick the call and its arguments.
    Hc { pick: u8, slot: u8, a: u64, b: u64, c: u64, len: u8 },
    /// Time passes, a timer tick.
    Tick(u64),
    /// The running vCPU faults.
    Fault(u8, u64, u64),
    /// The running vCPU executes HLT.
    Halt,
    /// A device signals a notification.
    Irq(u8, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        14 => (any::<u8>(), any::<u8>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u8>())
            .prop_map(|(pick, slot, a, b, c, len)| Op::Hc { pick, slot, a, b, c, len }),
        2 => (0u64..4000).prop_map(Op::Tick),
        1 => (any::<u8>(), any::<u64>(), any::<u64>()).prop_map(|(k, a, d)| Op::Fault(k, a, d)),
        1 => Just(Op::Halt),
        1 => (any::<u8>(), any::<u64>()).prop_map(|(n, b)| Op::Irq(n, b)),
    ]
}

/// Call tags (message word 0) start here; fault messages have a small word 0.
const TAG_BASE: u64 = 1 << 40;
const REPLY: u64 = 1 << 63;

fn call_words(tag: u64) -> [u64; 6] {
    [tag, tag + 1, tag + 2, tag + 3, tag + 4, tag + 5]
}

fn reply_words(tag: u64) -> [u64; 6] {
    let r = tag ^ REPLY;
    [r, r ^ 1, r ^ 2, r ^ 3, r ^ 4, r ^ 5]
}

/// What a vCPU's last hypercall left pending, to check when it runs next.
#[derive(Clone, Copy, Debug)]
enum Last {
    None,
    Call(u64),
    Recv,
    Wait,
    Fault(Regs),
}

/// The request a server received and owes a reply to.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Held {
    None,
    Call(u64),
    Fault,
}

struct Sent {
    words: [u64; 6],
    len: u64,
    badge: u64,
}

struct PendingFault {
    words: [u64; 6],
    badge: u64,
}

#[derive(Default, Debug)]
struct Coverage {
    received: u64,
    replies: u64,
    faults_delivered: u64,
    errors: u64,
    destroys: u64,
    hypercalls: u64,
    idle: u64,
}

struct World {
    s: Sys,
    sh: Shadow,
    free_at_start: u64,
    live_at_start: BTreeMap<u64, u64>,
    last: [Last; MAX_VCPUS],
    held: [Held; MAX_VCPUS],
    next_tag: u64,
    sent: HashMap<u64, Sent>,
    received: HashSet<u64>,
    replied: HashMap<u64, u64>,
    completed: HashSet<u64>,
    faults: Vec<PendingFault>,
    cov: Coverage,
}

/// Slots mostly in the small range real tables use, sometimes out of range.
fn slot_of(raw: u8) -> u64 {
    match raw {
        0..=191 => (raw % 8) as u64,
        192..=239 => (raw % 32) as u64,
        240..=247 => 63,
        248..=251 => 64,
        _ => u64::MAX,
    }
}

impl World {
    /// dom0 plus three domains (four vCPUs) sharing two endpoints and two notifications
    /// through badged, rights-reduced copies; two of them have fault handlers.
    fn new(prios: [u8; 3]) -> Self {
        let mut s = boot();
        let free_at_start = s.p.free();
        let live_at_start = s.p.live.clone();
        let me = dom0_slots::SELF_DOMAIN;
        let e0 = s.endpoint();
        let e1 = s.endpoint();
        let n0 = s.notification();
        let n1 = s.notification();
        s.copy(e0, me, rights::CALL, 0xd0).unwrap();
        let mut doms = vec![];
        for (i, &prio) in prios.iter().enumerate() {
            let (d, dslot) = s.create_domain(["alpha", "beta", "gamma"][i], MIB2, prio);
            s.k.write_ram(&mut s.p, d, NAME_GPA, b"child").unwrap();
            doms.push(dslot);
        }
        let [a, b, c] = [doms[0], doms[1], doms[2]];
        let all = rights::ALL;
        for (src, to, mask, badge) in [
            (e0, a, all, 0),
            (e1, a, rights::CALL | rights::GRANT, 0xa1),
            (n0, a, all, 0),
            (n1, a, rights::SIGNAL, 0xa2),
            (dom0_slots::MEMORY, a, all, 0),
            (e0, b, rights::CALL, 0xb1),
            (e1, b, rights::RECV | rights::CALL, 0),
            (n0, b, rights::WAIT | rights::SIGNAL, 0xb2),
            (e0, c, rights::RECV | rights::CALL | rights::GRANT, 0xc1),
            (e1, c, rights::CALL, 0xc2),
            (n1, c, rights::WAIT, 0),
            (n0, c, rights::SIGNAL, 0xc3),
        ] {
            s.copy(src, to, mask, badge).unwrap();
        }
        s.hc(s.v0, Hypercall::DomainSetFaultEndpoint, a, &[e1, 0xfa]).unwrap();
        s.hc(s.v0, Hypercall::DomainSetFaultEndpoint, b, &[e1, 0xfb]).unwrap();
        s.hc(s.v0, Hypercall::DomainSetFaultEndpoint, c, &[e0, 0xfc]).unwrap();
        let mut vcpus = vec![];
        for dslot in [a, a, b, c] {
            vcpus.push(s.create_vcpu(dslot, false).0);
        }
        for v in vcpus {
            s.k.vcpu_start(v).unwrap();
        }
        s.k.schedule();
        check_invariants(&s.k);
        let sh = Shadow::from_kernel(&s.k);
        World {
            s,
            sh,
            free_at_start,
            live_at_start,
            last: [Last::None; MAX_VCPUS],
            held: [Held::None; MAX_VCPUS],
            next_tag: TAG_BASE,
            sent: HashMap::new(),
            received: HashSet::new(),
            replied: HashMap::new(),
            completed: HashSet::new(),
            faults: Vec::new(),
            cov: Coverage::default(),
        }
    }

    /// One step; false once nothing can ever run again (all blocked, nothing to wake them).
    fn step(&mut self, op: &Op) -> bool {
        let mut alive = true;
        let cur = self.s.k.current;
        if let Some(v) = cur {
            self.observe(v);
        }
        match (op, cur) {
            (&Op::Hc { pick, slot, a, b, c, len }, Some(v)) => self.hypercall(v, pick, slot, a, b, c, len),
            // HLT with nothing bound to wake it would stop the vCPU for good.
            (Op::Halt, Some(v)) if self.s.k.notifications.iter().any(|n| n.bound.is_some_and(|(b, _)| b == v)) => {
                self.s.k.halt(v)
            }
            (Op::Halt, Some(_)) => {}
            // dom0 has no fault handler: a fault stops it for good, so rarely.
            (&Op::Fault(kind, addr, detail), Some(v)) if v != self.s.v0 || kind.is_multiple_of(8) => {
                self.fault(v, kind, addr, detail)
            }
            (Op::Fault(..), Some(_)) => {}
            (&Op::Irq(n, bits), _) => {
                let live: Vec<usize> = (0..MAX_NOTIFICATIONS).filter(|&i| self.s.k.notifications[i].refs > 0).collect();
                if !live.is_empty() {
                    self.s.k.signal_object(live[n as usize % live.len()] as NotificationId, bits.max(1));
                }
            }
            (&Op::Tick(dt), _) => {
                self.s.p.now += dt;
                self.s.k.tick(self.s.p.now);
            }
            (op, None) => {
                self.cov.idle += 1;
                // Idle until an interrupt: a device signals a notification someone waits
                // for (or that a halted vCPU is bound to), or the timer ticks.
                let k = &self.s.k;
                let wakes = |n: &Notification| {
                    n.refs > 0
                        && (n.waiter.is_some()
                            || n.bound.is_some_and(|(b, _)| k.vcpus[b as usize].state == VcpuState::Halted))
                };
                let ns: Vec<usize> = (0..MAX_NOTIFICATIONS).filter(|&n| wakes(&k.notifications[n])).collect();
                let r = match *op {
                    Op::Hc { a, .. } => a,
                    Op::Halt => 1,
                    _ => 0,
                };
                let deadline = k.next_deadline();
                if !ns.is_empty() && (!r.is_multiple_of(4) || deadline.is_none()) {
                    self.s.k.signal_object(ns[r as usize % ns.len()] as NotificationId, r | 1);
                } else {
                    alive = deadline.is_some();
                    self.s.p.now = self.s.p.now.max(deadline.unwrap_or(0)) + r % 1000;
                    self.s.k.tick(self.s.p.now);
                }
            }
        }
        // The glue's run loop.
        self.s.k.schedule();
        if self.s.k.current.is_none() {
            assert_eq!(self.s.k.runq.highest(), None, "idle with ready vCPUs");
        }
        check_invariants(&self.s.k);
        self.sh.compare(&self.s.k);
        for v in 0..MAX_VCPUS {
            if self.s.k.vcpus[v].state == VcpuState::Free {
                self.last[v] = Last::None;
                self.held[v] = Held::None;
            }
        }
        alive
    }

    /// `v` runs again: check what its last blocking call brought.
    fn observe(&mut self, v: VcpuId) {
        let r = self.s.regs(v);
        match std::mem::replace(&mut self.last[v as usize], Last::None) {
            Last::None => {}
            Last::Call(tag) => {
                assert_ne!(r.rax, Hypercall::Call.number(), "vCPU {v} runs with its call pending");
                if r.rax == 0 {
                    assert_eq!(words(&r), reply_words(tag), "vCPU {v} got a reply that is not to its call {tag:#x}");
                    assert!(self.received.contains(&tag), "reply to call {tag:#x}, which no server received");
                    assert_eq!(Some(&r.rcx), self.replied.get(&tag), "reply length of call {tag:#x}");
                    assert_eq!(r.rbx, 0);
                    assert!(self.completed.insert(tag), "call {tag:#x} completed twice");
                    self.cov.replies += 1;
                } else {
                    assert!(Error::from_code(r.rax).is_some(), "bad status {:#x}", r.rax);
                }
            }
            Last::Recv => {
                assert!(
                    ![Hypercall::Recv.number(), Hypercall::ReplyRecv.number()].contains(&r.rax),
                    "vCPU {v} runs while receiving"
                );
                if r.rax == 0 {
                    self.message(v, &r);
                } else {
                    assert!(Error::from_code(r.rax).is_some(), "bad status {:#x}", r.rax);
                }
            }
            Last::Wait => {
                assert_ne!(r.rax, Hypercall::Wait.number(), "vCPU {v} runs while waiting");
                if r.rax == 0 {
                    assert_ne!(r.rdi, 0, "woken with no bits");
                } else {
                    assert!(Error::from_code(r.rax).is_some(), "bad status {:#x}", r.rax);
                }
            }
            Last::Fault(before) => assert_eq!(r, before, "vCPU {v} resumed after a fault with changed registers"),
        }
    }

    /// A server received a message into its registers.
    fn message(&mut self, v: VcpuId, r: &Regs) {
        let w = words(r);
        if w[0] >= TAG_BASE {
            let tag = w[0];
            let sent = self.sent.get(&tag).unwrap_or_else(|| panic!("vCPU {v} received {tag:#x}, which nobody sent"));
            assert_eq!(w, sent.words, "message {tag:#x} words");
            assert_eq!(r.rcx, sent.len, "message {tag:#x} length");
            assert_eq!(r.rbx, sent.badge, "message {tag:#x} badge");
            assert!(self.received.insert(tag), "message {tag:#x} received twice");
            self.held[v as usize] = Held::Call(tag);
            self.cov.received += 1;
        } else {
            let w = [w[0] & 0xffff_ffff, w[1], w[2], w[3], w[4], w[5]];
            let state = r.rdi >> 32 != 0;
            assert_eq!(r.rcx, if state { 6 + ipc_spec::exit::STATE_WORDS as u64 } else { 6 }, "exit message length");
            let i = self.faults.iter().position(|f| f.words == w && f.badge == r.rbx);
            let i = i.unwrap_or_else(|| {
                panic!("vCPU {v} received a fault message {w:x?} badge {:#x} matching no fault", r.rbx)
            });
            self.faults.swap_remove(i);
            self.held[v as usize] = Held::Fault;
            self.cov.faults_delivered += 1;
        }
    }

    fn fault(&mut self, v: VcpuId, kind: u8, addr: u64, detail: u64) {
        let kind = [ExitKind::Stage2, ExitKind::Exception, ExitKind::Shutdown, ExitKind::Forbidden][kind as usize % 4];
        let vc = &self.s.k.vcpus[v as usize];
        let before = vc.regs;
        let handler = self.s.k.domains[vc.domain as usize].fault_handler;
        if let Some((_, badge)) = handler {
            let words = [kind as u64 | (vc.index_in_domain as u64) << 8, before.rip, addr, detail, before.rax, 0];
            self.faults.push(PendingFault { words, badge });
        }
        self.s.k.console_flush(&mut self.s.p, vc.domain);
        let handled = self.s.k.exit(&mut self.s.p, v, PendingExit::new(kind, addr, detail));
        assert_eq!(handled, handler.is_some());
        if handled {
            self.last[v as usize] = Last::Fault(before);
        } else {
            assert_eq!(self.s.state(v), VcpuState::Stopped);
        }
    }

    /// What the shadow says the capability checks of `call` must give: success, or the
    /// errors the kernel may report.
    fn cap_check(&self, d: DomainId, call: Hypercall, slot: u64, w: &[u64; 6]) -> Result<(), Vec<Error>> {
        use Hypercall as H;
        let sh = &self.sh;
        let one = |r: Result<SCap, Error>| r.map(drop).map_err(|e| vec![e]);
        let any = |slot: u64, rights: u64, kind: Kind| sh.typed_any(d, slot, rights, kind).map(drop);
        match call {
            H::Call => any(slot, rights::CALL, Kind::Endpoint),
            H::ReplyRecv | H::Recv => any(slot, rights::RECV, Kind::Endpoint),
            H::Signal => any(slot, rights::SIGNAL, Kind::Notification),
            H::Wait | H::Poll | H::NotificationBind | H::TimerSet => any(slot, rights::WAIT, Kind::Notification),
            H::Shutdown => any(slot, rights::CONTROL, Kind::Machine),
            H::DomainCreate | H::RegionCreate | H::EndpointCreate | H::NotificationCreate => {
                any(slot, rights::CONTROL, Kind::Memory)
            }
            H::DomainWrite | H::DomainDestroy | H::VcpuCreate => any(slot, rights::CONTROL, Kind::Domain),
            H::VcpuStart => any(slot, rights::CONTROL, Kind::Vcpu),
            H::DomainSetFaultEndpoint => {
                any(slot, rights::CONTROL, Kind::Domain).and_then(|_| any(w[0], rights::CALL, Kind::Endpoint))
            }
            H::Map | H::Unmap => any(slot, rights::CONTROL, Kind::Domain).and_then(|_| any(w[0], 0, Kind::Region)),
            H::CapCopy => one(sh.domain(d, w[0]).and_then(|_| sh.lookup(d, slot, rights::GRANT))),
            H::CapRevoke | H::CapDelete => one(sh.get(d, slot)),
            _ => Ok(()),
        }
    }

    /// Mostly a slot the domain fills (usually with a capability of `kind`), sometimes an
    /// empty or out-of-range one.
    fn pick_slot(&self, d: DomainId, raw: u8, kind: Option<Kind>) -> u64 {
        if raw >= 200 {
            return slot_of(raw);
        }
        let filled: Vec<(u64, Kind)> =
            (0..CAP_SLOTS as u64).filter_map(|s| self.sh.get(d, s).ok().map(|c| (s, kind_of(c.object)))).collect();
        let typed: Vec<(u64, Kind)> =
            filled.iter().copied().filter(|&(_, k)| kind.is_none_or(|want| k == want)).collect();
        let pool = if !raw.is_multiple_of(5) && !typed.is_empty() { typed } else { filled };
        pool.get(raw as usize % pool.len().max(1)).map_or((raw % 8) as u64, |&(s, _)| s)
    }

    #[allow(clippy::too_many_arguments)]
    fn hypercall(&mut self, v: VcpuId, pick: u8, slot_raw: u8, a: u64, b: u64, c: u64, len_raw: u8) {
        use Hypercall as H;
        let d = self.s.k.vcpus[v as usize].domain;
        let dom0 = d == self.s.d0;
        let mut slot = slot_of(slot_raw);
        // A server holding a request usually answers it; dom0 mostly manages.
        let pick = if self.held[v as usize] != Held::None && !pick.is_multiple_of(3) {
            10
        } else if dom0 && (4..=21).contains(&(pick % 42)) && !a.is_multiple_of(3) {
            25 + (a % 16) as u8
        } else {
            pick
        };
        let mut len = 0;
        let mut w = [a, b, c, a ^ b, b ^ c, 0];
        let mut call = match pick % 42 {
            0 => H::Null,
            1 => {
                w[0] = if a.is_multiple_of(4) { a } else { a % 0x4000 };
                w[1] = if b.is_multiple_of(16) { b } else { b % 300 };
                H::ConsoleWrite
            }
            2 => H::Yield,
            3 => H::Clock,
            4..=9 => H::Call,
            10..=15 => H::ReplyRecv,
            16..=17 => H::Recv,
            18..=19 => {
                w[0] = if a.is_multiple_of(3) { 0 } else { a };
                H::Signal
            }
            20..=21 => H::Wait,
            22 => H::Poll,
            23 => {
                w[0] = if a.is_multiple_of(8) { a } else { 32 + a % 224 };
                H::NotificationBind
            }
            24 => {
                w[0] = a % 10_000;
                H::TimerSet
            }
            25..=26 => {
                let target = self.pick_slot(d, b as u8, Some(Kind::Domain));
                w = [
                    target,
                    if c.is_multiple_of(2) { rights::ALL } else { c },
                    if a.is_multiple_of(2) { 0 } else { a },
                    0,
                    0,
                    0,
                ];
                H::CapCopy
            }
            27 => H::CapDelete,
            28 => H::CapRevoke,
            29 => {
                w[0] = [0, 0x1000, 0x3000, MIB2 - PAGE, a][a as usize % 5];
                H::VcpuSetMessagePage
            }
            30 => H::EndpointCreate,
            31 => H::NotificationCreate,
            32 => {
                w[0] = if a % 8 == 7 { a } else { (a % 3 + 1) * PAGE - b % 2 };
                H::RegionCreate
            }
            33 => {
                let gpa = [0x4000_0000, 0x4000_2000, 0x8000_0000, 0x1000, a][a as usize % 5];
                w = [self.pick_slot(d, b as u8, Some(Kind::Region)), gpa, c % 8, 0, 0, 0];
                H::Map
            }
            34 => {
                w[0] = self.pick_slot(d, b as u8, Some(Kind::Region));
                H::Unmap
            }
            35 => {
                w = [a % (3 << 20), b % (9 << 20), c % 9000, 0, 0, 0];
                H::DomainWrite
            }
            36 => H::VcpuCreate,
            37 => H::VcpuStart,
            38 => {
                w[0] = self.pick_slot(d, b as u8, Some(Kind::Endpoint));
                w[2] = c & ipc_spec::exit::state::ALL as u64;
                H::DomainSetFaultEndpoint
            }
            39 if a.is_multiple_of(2) => H::DomainDestroy,
            40 if a.is_multiple_of(16) => H::DomainExit,
            40 => {
                let prio = [10, 50, 100, 150, 0, 255, 300][b as usize % 7];
                let ram = if c.is_multiple_of(8) { c } else { MIB2 };
                w = [
                    ram,
                    prio,
                    if b.is_multiple_of(5) { b } else { NAME_GPA },
                    if a.is_multiple_of(9) { a % 40 } else { 5 },
                    0,
                    0,
                ];
                H::DomainCreate
            }
            41 if a.is_multiple_of(8) => H::Shutdown,
            41 => {
                let nr = [26, 7, 8, 9, 27, 1000, u64::MAX][a as usize % 7];
                self.s.raw(v, nr, slot, len, w);
                assert_eq!(self.s.regs(v).rax, Error::UnknownHypercall.code());
                return;
            }
            _ => H::Null,
        };
        let kind = match call {
            H::Call | H::ReplyRecv | H::Recv => Some(Kind::Endpoint),
            H::Signal | H::Wait | H::Poll | H::NotificationBind | H::TimerSet => Some(Kind::Notification),
            H::Shutdown => Some(Kind::Machine),
            H::DomainCreate | H::RegionCreate | H::EndpointCreate | H::NotificationCreate => Some(Kind::Memory),
            H::VcpuStart => Some(Kind::Vcpu),
            H::CapCopy | H::CapDelete | H::CapRevoke => None,
            _ => Some(Kind::Domain),
        };
        slot = self.pick_slot(d, slot_raw, kind);
        // Mostly IPC that gets somewhere: call a waiting server, receive a waiting caller
        // (switching between calling and receiving when only the other one would).
        if matches!(call, H::Call | H::Recv | H::ReplyRecv) && !slot_raw.is_multiple_of(3) {
            let useful = |right: u64, senders: bool| -> Vec<u64> {
                (0..CAP_SLOTS as u64)
                    .filter(|&s| {
                        self.sh.get(d, s).is_ok_and(|c| match c.object {
                            Object::Endpoint(e) if c.rights & right != 0 => {
                                let ep = &self.s.k.endpoints[e as usize];
                                !(if senders { ep.senders } else { ep.receivers }).is_empty()
                            }
                            _ => false,
                        })
                    })
                    .collect()
            };
            let (to_call, to_recv) = (useful(rights::CALL, false), useful(rights::RECV, true));
            match call {
                H::Call if to_call.is_empty() && !to_recv.is_empty() && a.is_multiple_of(2) => call = H::Recv,
                H::Recv if to_recv.is_empty() && !to_call.is_empty() && a.is_multiple_of(2) => call = H::Call,
                _ => {}
            }
            let useful = if call == H::Call { to_call } else { to_recv };
            if !useful.is_empty() {
                slot = useful[slot_raw as usize % useful.len()];
            }
        }
        // dom0 keeps its well-known capabilities.
        if dom0 && call == H::CapDelete && slot < 4 {
            slot += 4;
        }
        self.cov.hypercalls += 1;
        let expect = self.cap_check(d, call, slot, &w);
        let held = self.held[v as usize];
        match call {
            H::Call => {
                len = len_raw as u64 % 9;
                let tag = self.next_tag;
                self.next_tag += 8;
                w = call_words(tag);
                let badge = self.sh.get(d, slot).map(|c| c.badge).unwrap_or(0);
                self.sent.insert(tag, Sent { words: w, len, badge });
            }
            H::ReplyRecv => {
                len = len_raw as u64 % 8;
                w = match held {
                    Held::Call(tag) => reply_words(tag),
                    Held::Fault => [u64::from(!a.is_multiple_of(4)), 0, 0, 0, 0, 0],
                    Held::None => w,
                };
            }
            _ => {}
        }
        // The shadow's prediction of capability-table changes.
        let mut predicted: Option<Result<u64, Error>> = None;
        match call {
            H::CapCopy => predicted = Some(self.sh.copy(d, slot, w[0], w[1], w[2])),
            H::CapRevoke => predicted = Some(self.sh.revoke(d, slot)),
            H::CapDelete => predicted = Some(self.sh.delete(d, slot).map(|()| 0)),
            _ => {}
        }
        let before = {
            let mut r = self.s.regs(v);
            r.rax = call.number();
            r.rbx = slot;
            r.rcx = len;
            set_words(&mut r, w);
            r
        };
        let event = self.s.raw(v, call.number(), slot, len, w);
        let r = self.s.regs(v);
        let blocking = matches!(call, H::Call | H::Recv | H::ReplyRecv | H::Wait);
        let pending = blocking && r.rax == call.number();
        // Special completions.
        match call {
            H::Shutdown => {
                if expect.is_ok() {
                    assert_eq!(event, Some(Event::PowerOff(w[0])));
                    self.s.k.vcpus[v as usize].regs.rax = 0;
                    return;
                }
            }
            H::DomainExit => {
                let handler = self.s.k.domains[d as usize].fault_handler;
                let Some(Event::Exited { domain, status, handled }) = event else {
                    panic!("DomainExit gave {event:?}")
                };
                assert_eq!((domain, status, handled), (d, w[0], handler.is_some()));
                if handled {
                    let words = [
                        ExitKind::Exited as u64 | (self.s.k.vcpus[v as usize].index_in_domain as u64) << 8,
                        before.rip,
                        0,
                        w[0],
                        before.rax,
                        0,
                    ];
                    self.faults.push(PendingFault { words, badge: handler.unwrap().1 });
                    self.last[v as usize] = Last::Fault(before);
                } else {
                    for x in 0..MAX_VCPUS {
                        let vc = &self.s.k.vcpus[x];
                        if vc.state != VcpuState::Free && vc.domain == d {
                            assert_eq!(vc.state, VcpuState::Stopped, "vCPU {x} of an exited domain");
                        }
                    }
                }
                return;
            }
            _ => assert_eq!(event, None, "{call:?}"),
        }
        // The capability checks: a failure the model predicts is exactly the kernel's, and a
        // capability the model says is fine is never refused for being missing or wrong.
        let status = if pending { None } else { Some(result_of(r.rax)) };
        if let Some(Err(e)) = status {
            assert_ne!(e, Error::Unknown, "{call:?}: status {:#x}", r.rax);
            self.cov.errors += 1;
        }
        match (&expect, status) {
            (Err(e), Some(got)) => {
                assert!(
                    got.is_err_and(|g| e.contains(&g)),
                    "{call:?} slot {slot} args {w:x?}: {got:?}, the model expects {e:?}"
                )
            }
            (Err(e), None) => panic!("{call:?} slot {slot} went ahead; the model expects {e:?}"),
            (Ok(()), Some(Err(e))) => {
                let cap_error = matches!(e, Error::InvalidSlot | Error::WrongType | Error::StaleCapability)
                    || (e == Error::PermissionDenied && call != H::Map);
                assert!(
                    !cap_error,
                    "{call:?} slot {slot} args {w:x?} refused with {e:?}; the model has the capability"
                );
            }
            _ => {}
        }
        if let Some(p) = predicted {
            assert_eq!(status, Some(p.map(drop)), "{call:?} slot {slot} args {w:x?}");
            if let (Ok(x), H::CapCopy | H::CapRevoke) = (p, call) {
                assert_eq!(r.rdi, x, "{call:?} result");
            }
        }
        let ok = status == Some(Ok(()));
        // Blocking calls: remember what to check when the vCPU runs again.
        match call {
            H::Call if status.is_none() => self.last[v as usize] = Last::Call(w[0]),
            H::Recv | H::ReplyRecv if status.is_none() || ok => {
                // The reply (or the dropped reply) went out.
                if let (H::ReplyRecv, Held::Call(tag)) = (call, held) {
                    self.replied.insert(tag, len);
                }
                self.held[v as usize] = Held::None;
                self.last[v as usize] = Last::Recv;
                if ok {
                    self.observe(v);
                }
            }
            H::Wait if status.is_none() => self.last[v as usize] = Last::Wait,
            H::Yield => assert_eq!(status, Some(Ok(()))),
            _ => {}
        }
        if !ok {
            return;
        }
        // Successful management calls change the model.
        let new_cap = |k: &K, d: DomainId, slot: u64| k.domains[d as usize].caps.get(slot).unwrap().object;
        match call {
            H::DomainCreate => {
                let o = new_cap(&self.s.k, d, r.rdi);
                let Object::Domain(nd, g) = o else { panic!("{o:?}") };
                assert_eq!(self.sh.insert(d, o, rights::CONTROL, 0, 0), Ok(r.rdi));
                assert!(self.sh.domains.insert((nd, g)));
                self.s.k.write_ram(&mut self.s.p, nd, NAME_GPA, b"child").unwrap();
            }
            H::VcpuCreate => {
                let t = self.sh.domain(d, slot).unwrap();
                let o = new_cap(&self.s.k, d, r.rdi);
                let Object::Vcpu(nv, g) = o else { panic!("{o:?}") };
                assert_eq!(self.s.k.vcpus[nv as usize].domain, t);
                assert_eq!(self.sh.insert(d, o, rights::CONTROL, 0, 0), Ok(r.rdi));
                assert!(self.sh.vcpus.insert((nv, g), t).is_none());
            }
            H::RegionCreate | H::EndpointCreate | H::NotificationCreate => {
                let o = new_cap(&self.s.k, d, r.rdi);
                let (kind, rights) = match call {
                    H::RegionCreate => (Kind::Region, rights::READ | rights::WRITE | rights::EXEC | rights::GRANT),
                    H::EndpointCreate => (Kind::Endpoint, rights::CALL | rights::RECV | rights::GRANT),
                    _ => (Kind::Notification, rights::SIGNAL | rights::WAIT | rights::GRANT),
                };
                assert_eq!(kind_of(o), kind);
                assert_eq!(self.sh.insert(d, o, rights, 0, 0), Ok(r.rdi));
            }
            H::DomainDestroy => {
                let t = self.sh.domain(d, slot).unwrap();
                self.sh.destroy(t);
                self.cov.destroys += 1;
            }
            _ => {}
        }
    }

    /// Destroy every domain but dom0, drop what dom0 made: every frame is back.
    fn teardown(mut self) {
        let (d0, k, p) = (self.s.d0, &mut self.s.k, &mut self.s.p);
        for d in 0..MAX_DOMAINS as DomainId {
            if d != d0 && k.domains[d as usize].state == DomainState::Alive {
                k.domain_destroy(p, d);
            }
        }
        while let Some(m) = k.domains[d0 as usize].mappings.first().copied() {
            k.unmap_region(p, d0, m.region).unwrap();
        }
        for slot in 4..CAP_SLOTS as u64 {
            let _ = k.cap_delete(p, d0, slot);
        }
        check_invariants(k);
        assert_eq!(p.free(), self.free_at_start, "frames lost");
        assert_eq!(p.live, self.live_at_start);
        let handler = k.domains[d0 as usize].fault_handler.map(|(e, _)| e as usize);
        for (e, ep) in k.endpoints.iter().enumerate() {
            assert_eq!(ep.refs, u32::from(handler == Some(e)), "endpoint {e}");
        }
        assert!(k.notifications.iter().all(|n| n.refs == 0));
        assert!(k.regions.iter().all(|r| r.refs == 0 && r.frames == 0));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(256) })]

    /// Random hypercalls, ticks, faults, HLTs and interrupts: no panic, every status a known
    /// code, the scheduling invariants, capability tables exactly as the model says,
    /// messages neither lost nor duplicated, and all memory back at the end.
    #[test]
    fn random_operations_keep_the_kernel_consistent(
        prios in proptest::array::uniform3(prop_oneof![Just(50u8), Just(100u8), Just(150u8)]),
        ops in proptest::collection::vec(op(), 1..400),
    ) {
        let mut w = World::new(prios);
        for op in &ops {
            if !w.step(op) {
                break;
            }
        }
        // KERNEL_TEST_COVERAGE=1 ... -- --nocapture: what the random runs exercised.
        if std::env::var_os("KERNEL_TEST_COVERAGE").is_some() {
            eprintln!("{:?}", w.cov);
        }
        w.teardown();
    }
}

#[test]
fn domain_status_counts_each_domains_calls_and_signals() {
    let mut t = ipc_setup(DOM0_PRIO);
    t.server_waits();
    let v0 = t.s.v0;
    // dom0 calls the server twice (the fast path), the server answers.
    for _ in 0..2 {
        t.s.raw(v0, Hypercall::Call.number(), t.e, 0, [0; 6]);
        t.s.raw(t.vs, Hypercall::ReplyRecv.number(), 0, 0, [0; 6]);
    }
    // And signals a notification once.
    let n = t.s.hc(v0, Hypercall::NotificationCreate, dom0_slots::MEMORY, &[]).unwrap();
    assert!(t.s.hc(v0, Hypercall::Signal, n, &[1]).is_ok());
    // The server domain: one vCPU, none stopped, no calls made (it only answered), 2 MiB.
    assert_eq!(t.s.hc(v0, Hypercall::DomainStatus, t.sdslot, &[]), Ok(1), "RDI: one vCPU");
    let r = t.s.regs(v0);
    assert_eq!((r.rdi, r.rsi, r.rdx, r.r10, r.r8), (1, 0, 0, 0, 2));
    // dom0 itself, through its own domain capability: two calls, one signal.
    assert_eq!(t.s.hc(v0, Hypercall::DomainStatus, dom0_slots::SELF_DOMAIN, &[]), Ok(1));
    let r = t.s.regs(v0);
    assert_eq!((r.rdx, r.r10), (2, 1));
    // Not a domain capability; an empty slot.
    assert_eq!(t.s.hc(v0, Hypercall::DomainStatus, n, &[]), Err(Error::PermissionDenied));
    assert_eq!(t.s.hc(v0, Hypercall::DomainStatus, 60, &[]), Err(Error::InvalidSlot));
    // Destroyed: its capability is gone.
    assert!(t.s.hc(v0, Hypercall::DomainDestroy, t.sdslot, &[]).is_ok());
    assert!(t.s.hc(v0, Hypercall::DomainStatus, t.sdslot, &[]).is_err());
    check_invariants(&t.s.k);
}

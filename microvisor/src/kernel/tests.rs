//! Host tests of the kernel core (see the module docs of `kernel`).
//!
//! A simulated [`Platform`] hands out frames from a real [`FrameAllocator`] over a fake
//! physical range and keeps memory contents in a map of pages; every physical access must
//! hit allocated memory, and every free must match an allocation exactly, so leaks, double
//! frees and use-after-free show up as failures. The tests drive the kernel like the glue
//! does: set the running vCPU's registers, call [`Kernel::hypercall`], read the registers.

use std::collections::{BTreeMap, HashMap, HashSet};

use ipc_spec::exit::{ExitKind, ExitReply, VcpuState as ArchState};
use ipc_spec::hypercall::{
    dom0_slots, result_of, rights, Hypercall, CAP_SLOTS, CONSOLE_WRITE_MAX, DOMAIN_NAME_MAX, MAX_MESSAGE_WORDS,
    REGISTER_WORDS,
};
use ipc_spec::Error;
use proptest::prelude::*;

use super::caps::{Capability, Object};
use super::*;
use crate::frame_alloc::{FrameAllocator, PhysRange};
use crate::guest_memory::{PhysRead, PhysWrite};
use crate::npt::Npt;
use crate::stage2::TableMemory;

type K = Kernel<Npt>;

// ---- the simulated platform --------------------------------------------------------------

const PHYS_BASE: u64 = 0x100_0000;
const PHYS_SIZE: u64 = 64 << 20;

struct Sim {
    frames: FrameAllocator,
    /// Page number → contents; pages never written read as zero.
    mem: HashMap<u64, Box<[u8; PAGE as usize]>>,
    /// Allocated blocks: start → frames.
    live: BTreeMap<u64, u64>,
    now: u64,
    boots: Vec<(VcpuId, VcpuBoot)>,
    stage2_changes: HashMap<DomainId, u32>,
    lines: Vec<(String, String)>,
    names: HashMap<DomainId, String>,
    /// Simulated vCPU hardware state, completed instructions, injected events.
    hw: HashMap<VcpuId, ArchState>,
    completed: Vec<VcpuId>,
    injected: Vec<(VcpuId, ipc_spec::exit::Event)>,
}

impl Sim {
    fn new() -> Self {
        Self {
            frames: FrameAllocator::new(&[PhysRange::new(PHYS_BASE, PHYS_BASE + PHYS_SIZE)], &[]),
            mem: HashMap::new(),
            live: BTreeMap::new(),
            now: 0,
            boots: Vec::new(),
            stage2_changes: HashMap::new(),
            lines: Vec::new(),
            names: HashMap::new(),
            hw: HashMap::new(),
            completed: Vec::new(),
            injected: Vec::new(),
        }
    }

    fn free(&self) -> u64 {
        self.frames.free_frames()
    }

    /// Panics unless `[hpa, hpa + len)` is inside one page of one allocated block.
    fn check(&self, hpa: u64, len: usize) {
        assert!(hpa % PAGE + len as u64 <= PAGE, "access {hpa:#x}+{len} crosses a page");
        let ok = self.live.range(..=hpa).next_back().is_some_and(|(&s, &f)| hpa + len as u64 <= s + f * PAGE);
        assert!(ok, "access to memory that is not allocated: {hpa:#x}+{len}");
    }

    fn lines_of(&self, domain: &str) -> Vec<&str> {
        self.lines.iter().filter(|(d, _)| d == domain).map(|(_, l)| l.as_str()).collect()
    }
}

impl PhysRead for Sim {
    fn read_phys(&self, hpa: u64, buf: &mut [u8]) {
        self.check(hpa, buf.len());
        let off = (hpa % PAGE) as usize;
        match self.mem.get(&(hpa / PAGE)) {
            Some(page) => buf.copy_from_slice(&page[off..off + buf.len()]),
            None => buf.fill(0),
        }
    }
}

impl PhysWrite for Sim {
    fn write_phys(&mut self, hpa: u64, data: &[u8]) {
        self.check(hpa, data.len());
        let off = (hpa % PAGE) as usize;
        let page = self.mem.entry(hpa / PAGE).or_insert_with(|| Box::new([0; PAGE as usize]));
        page[off..off + data.len()].copy_from_slice(data);
    }
}

impl TableMemory for Sim {
    fn alloc_table(&mut self) -> Option<u64> {
        self.alloc_frames(1, PAGE)
    }

    fn free_table(&mut self, table: u64) {
        self.free_frames(table, 1);
    }

    fn read_entry(&self, table: u64, index: usize) -> u64 {
        assert!(index < 512);
        let mut b = [0; 8];
        self.read_phys(table + index as u64 * 8, &mut b);
        u64::from_le_bytes(b)
    }

    fn write_entry(&mut self, table: u64, index: usize, entry: u64) {
        assert!(index < 512);
        self.write_phys(table + index as u64 * 8, &entry.to_le_bytes());
    }
}

impl Platform for Sim {
    fn alloc_frames(&mut self, frames: u64, align: u64) -> Option<u64> {
        let hpa = self.frames.alloc(frames, align).ok()?;
        assert!(self.live.insert(hpa, frames).is_none());
        Some(hpa)
    }

    fn free_frames(&mut self, hpa: u64, frames: u64) {
        assert_eq!(self.live.remove(&hpa), Some(frames), "freeing {frames} frames at {hpa:#x}: not such an allocation");
        self.frames.free(hpa, frames).expect("the allocator refused a free");
        for page in hpa / PAGE..hpa / PAGE + frames {
            self.mem.remove(&page);
        }
    }

    fn now_ns(&self) -> u64 {
        self.now
    }

    fn vcpu_created(&mut self, vcpu: VcpuId, boot: &VcpuBoot) -> Result<(), Error> {
        self.boots.push((vcpu, *boot));
        Ok(())
    }

    /// The simulated hardware keeps RSP and RFLAGS in `regs`, the rest of the state in
    /// `hw`, so that what a handler writes back can be read again.
    fn vcpu_state(&mut self, vcpu: VcpuId, regs: &mut Regs, s: &mut ArchState) {
        *s = self.hw.get(&vcpu).copied().unwrap_or_default();
        s.gpr = regs.gprs();
        (s.rip, s.rflags) = (regs.rip, regs.rflags);
    }

    fn vcpu_set_state(&mut self, vcpu: VcpuId, regs: &mut Regs, mask: u16, s: &ArchState) {
        let mut hw = self.hw.get(&vcpu).copied().unwrap_or_default();
        let mut words = [0; ipc_spec::exit::STATE_WORDS];
        s.to_words(mask, &mut words);
        hw.from_words(mask, &words);
        self.hw.insert(vcpu, hw);
        if mask & ipc_spec::exit::state::GPR != 0 {
            regs.set_gprs(&s.gpr);
        }
        if mask & ipc_spec::exit::state::RIP != 0 {
            (regs.rip, regs.rflags) = (s.rip, s.rflags);
        }
    }

    fn vcpu_complete(&mut self, vcpu: VcpuId, regs: &mut Regs, len: u8) {
        regs.rip = regs.rip.wrapping_add(len as u64);
        self.completed.push(vcpu);
    }

    fn vcpu_inject(&mut self, vcpu: VcpuId, event: ipc_spec::exit::Event) {
        self.injected.push((vcpu, event));
    }

    fn stage2_changed(&mut self, domain: DomainId) {
        *self.stage2_changes.entry(domain).or_default() += 1;
    }

    fn console_line(&mut self, domain: &str, line: &[u8]) {
        self.lines.push((domain.to_string(), String::from_utf8_lossy(line).into_owned()));
    }

    fn domain_named(&mut self, domain: DomainId, name: &str) {
        self.names.insert(domain, name.to_string());
    }

    fn free_frame_count(&self) -> u64 {
        self.frames.free_frames()
    }
}

// ---- driving the kernel -----------------------------------------------------------------

const DOM0_RAM: u64 = 8 << 20;
const DOM0_PRIO: u8 = 100;
const DOM0_ENTRY: u64 = 0x10_0000;
/// Scratch addresses in a domain's RAM.
const NAME_GPA: u64 = 0x1000;
const BUF_GPA: u64 = 0x2000;
const PAGE_GPA: u64 = 0x8000;
const MIB2: u64 = 2 << 20;

struct Sys {
    k: Box<K>,
    p: Sim,
    d0: DomainId,
    v0: VcpuId,
}

/// Boot like the real microvisor: dom0 with its well-known slots, its vCPU running.
fn boot() -> Sys {
    let mut p = Sim::new();
    let mut k: Box<K> = Box::default();
    let d0 = k.domain_create(&mut p, b"dom0", DOM0_RAM, DOM0_PRIO).unwrap();
    let g = k.domains[d0 as usize].generation;
    assert_eq!(k.grant_original(d0, Object::Domain(d0, g), rights::CONTROL), Ok(dom0_slots::SELF_DOMAIN));
    assert_eq!(k.grant_original(d0, Object::Memory, rights::CONTROL | rights::GRANT), Ok(dom0_slots::MEMORY));
    let v0 = k.vcpu_create(&mut p, d0, DOM0_ENTRY, 0x7000).unwrap();
    let vg = k.vcpus[v0 as usize].generation;
    assert_eq!(k.grant_original(d0, Object::Vcpu(v0, vg), rights::CONTROL), Ok(dom0_slots::SELF_VCPU));
    assert_eq!(k.grant_original(d0, Object::Machine, rights::CONTROL), Ok(dom0_slots::MACHINE));
    k.vcpu_start(v0).unwrap();
    k.schedule();
    assert_eq!(k.current, Some(v0));
    Sys { k, p, d0, v0 }
}

/// Message words in ABI order: RDI, RSI, RDX, R10, R8, R9.
fn words(r: &Regs) -> [u64; 6] {
    [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9]
}

fn set_words(r: &mut Regs, w: [u64; 6]) {
    [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9] = w;
}

fn args(a: &[u64]) -> [u64; 6] {
    let mut w = [0; 6];
    w[..a.len()].copy_from_slice(a);
    w
}

fn kind_of(o: Object) -> Kind {
    match o {
        Object::Domain(..) => Kind::Domain,
        Object::Vcpu(..) => Kind::Vcpu,
        Object::Memory => Kind::Memory,
        Object::Machine => Kind::Machine,
        Object::Region(_) => Kind::Region,
        Object::Endpoint(_) => Kind::Endpoint,
        Object::Notification(_) => Kind::Notification,
        Object::Device(_) => Kind::Device,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Domain,
    Vcpu,
    Memory,
    Machine,
    Region,
    Endpoint,
    Notification,
    Device,
}

impl Sys {
    fn regs(&self, v: VcpuId) -> Regs {
        self.k.vcpus[v as usize].regs
    }

    fn state(&self, v: VcpuId) -> VcpuState {
        self.k.vcpus[v as usize].state
    }

    /// The running vCPU `v` executes VMMCALL with these registers.
    fn raw(&mut self, v: VcpuId, nr: u64, slot: u64, len: u64, w: [u64; 6]) -> Option<Event> {
        assert_eq!(self.k.current, Some(v), "vCPU {v} is not the running one");
        let r = &mut self.k.vcpus[v as usize].regs;
        r.rax = nr;
        r.rbx = slot;
        r.rcx = len;
        set_words(r, w);
        self.k.hypercall(&mut self.p, v)
    }

    /// A hypercall that completes at once: its status and RDI.
    fn hc(&mut self, v: VcpuId, call: Hypercall, slot: u64, a: &[u64]) -> Result<u64, Error> {
        assert_eq!(self.raw(v, call.number(), slot, 0, args(a)), None);
        self.status(v)
    }

    fn status(&self, v: VcpuId) -> Result<u64, Error> {
        let r = &self.k.vcpus[v as usize].regs;
        result_of(r.rax).map(|()| r.rdi)
    }

    /// The call made by `v` has not completed yet (RAX still holds the number).
    fn pending(&self, v: VcpuId, call: Hypercall) -> bool {
        self.k.vcpus[v as usize].regs.rax == call.number()
    }

    fn cap(&self, d: DomainId, slot: u64) -> Capability {
        self.k.domains[d as usize].caps.get(slot).unwrap()
    }

    /// As if the scheduler picked `v` (a ready vCPU) now.
    fn switch(&mut self, v: VcpuId) {
        if self.k.current == Some(v) {
            return;
        }
        assert_eq!(self.state(v), VcpuState::Ready, "switching to vCPU {v}");
        let prio = self.k.vcpus[v as usize].priority;
        assert!(self.k.runq.remove(v, prio, &mut self.k.next));
        if let Some(c) = self.k.current.take() {
            self.k.vcpus[c as usize].state = VcpuState::Ready;
            let pc = self.k.vcpus[c as usize].priority;
            self.k.runq.push(c, pc, &mut self.k.next);
        }
        self.k.switch_to(v);
    }

    fn create_domain(&mut self, name: &str, ram: u64, prio: u8) -> (DomainId, u64) {
        self.k.write_ram(&mut self.p, self.d0, NAME_GPA, name.as_bytes()).unwrap();
        let args = [ram, prio as u64, NAME_GPA, name.len() as u64];
        let slot = self.hc(self.v0, Hypercall::DomainCreate, dom0_slots::MEMORY, &args).unwrap();
        let Object::Domain(d, _) = self.cap(self.d0, slot).object else { panic!("not a domain capability") };
        (d, slot)
    }

    fn create_vcpu(&mut self, dslot: u64, start: bool) -> (VcpuId, u64) {
        let slot = self.hc(self.v0, Hypercall::VcpuCreate, dslot, &[0x1000, 0x2000]).unwrap();
        let Object::Vcpu(v, _) = self.cap(self.d0, slot).object else { panic!("not a vCPU capability") };
        if start {
            self.hc(self.v0, Hypercall::VcpuStart, slot, &[]).unwrap();
        }
        (v, slot)
    }

    fn endpoint(&mut self) -> u64 {
        self.hc(self.v0, Hypercall::EndpointCreate, dom0_slots::MEMORY, &[]).unwrap()
    }

    fn notification(&mut self) -> u64 {
        self.hc(self.v0, Hypercall::NotificationCreate, dom0_slots::MEMORY, &[]).unwrap()
    }

    fn copy(&mut self, src: u64, to: u64, mask: u64, badge: u64) -> Result<u64, Error> {
        self.hc(self.v0, Hypercall::CapCopy, src, &[to, mask, badge])
    }

    fn endpoint_id(&self, d: DomainId, slot: u64) -> EndpointId {
        match self.cap(d, slot).object {
            Object::Endpoint(e) => e,
            o => panic!("not an endpoint: {o:?}"),
        }
    }

    fn notification_id(&self, d: DomainId, slot: u64) -> NotificationId {
        match self.cap(d, slot).object {
            Object::Notification(n) => n,
            o => panic!("not a notification: {o:?}"),
        }
    }

    fn live_vcpus(&self) -> usize {
        self.k.vcpus.iter().filter(|v| v.state != VcpuState::Free).count()
    }

    fn live_domains(&self) -> usize {
        self.k.domains.iter().filter(|d| d.state == DomainState::Alive).count()
    }

    fn read_words(&self, d: DomainId, gpa: u64, n: usize) -> Vec<u64> {
        let mut buf = vec![0u8; n * 8];
        self.k.read_ram(&self.p, d, gpa, &mut buf).unwrap();
        buf.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect()
    }

    fn write_words(&mut self, d: DomainId, gpa: u64, w: &[u64]) {
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.k.write_ram(&mut self.p, d, gpa, &bytes).unwrap();
    }
}

// ---- invariants ---------------------------------------------------------------------------

/// The scheduling and reference-counting invariants of the whole kernel.
fn check_invariants(k: &K) {
    use VcpuState::*;
    // Queue links never form a cycle (so walking a queue ends). A vCPU that is in no queue
    // may keep a stale link: every push overwrites it.
    for v in 0..MAX_VCPUS {
        let (mut cur, mut steps) = (Some(v as VcpuId), 0);
        while let Some(c) = cur {
            steps += 1;
            assert!(steps <= MAX_VCPUS, "cycle in the queue links through vCPU {v}");
            cur = k.next[c as usize];
        }
    }

    // Endpoint queues hold exactly the vCPUs blocked on them.
    let mut queued: HashMap<VcpuId, (EndpointId, bool)> = HashMap::new();
    for (e, ep) in k.endpoints.iter().enumerate() {
        for (q, send) in [(&ep.senders, true), (&ep.receivers, false)] {
            let members: Vec<VcpuId> = q.iter(&k.next).collect();
            if q.head.is_some() {
                // (`tail` means something only while the queue is not empty.)
                assert_eq!(q.tail, members.last().copied(), "tail of endpoint {e} queue");
            }
            for m in members {
                assert!(queued.insert(m, (e as EndpointId, send)).is_none(), "vCPU {m} is in two endpoint queues");
                let want = if send { BlockedSend(e as EndpointId) } else { BlockedRecv(e as EndpointId) };
                assert_eq!(k.vcpus[m as usize].state, want, "state of vCPU {m}, queued on endpoint {e}");
            }
            if ep.refs == 0 {
                assert!(q.is_empty(), "free endpoint {e} has waiters");
            }
        }
    }

    let running: Vec<usize> = (0..MAX_VCPUS).filter(|&v| k.vcpus[v].state == Running).collect();
    match k.current {
        Some(c) => assert_eq!(running, vec![c as usize], "the running vCPUs"),
        None => assert!(running.is_empty(), "vCPUs {running:?} are Running but none is current"),
    }
    let mut best_ready: Option<u8> = None;
    for v in 0..MAX_VCPUS {
        let vc = &k.vcpus[v];
        let vid = v as VcpuId;
        let in_runq = k.runq.contains(vid, vc.priority, &k.next);
        assert_eq!(in_runq, vc.state == Ready, "vCPU {v} is {:?} and in the run queue: {in_runq}", vc.state);
        if vc.state == Ready {
            best_ready = best_ready.max(Some(vc.priority));
        }
        match vc.state {
            BlockedSend(e) => assert_eq!(queued.get(&vid), Some(&(e, true)), "vCPU {v} BlockedSend({e}) not queued"),
            BlockedRecv(e) => assert_eq!(queued.get(&vid), Some(&(e, false)), "vCPU {v} BlockedRecv({e}) not queued"),
            BlockedWait(n) => assert_eq!(k.notifications[n as usize].waiter, Some(vid), "vCPU {v} BlockedWait({n})"),
            BlockedReply(s) | BlockedFault(s) => {
                let owed = k.vcpus[s as usize].reply_to;
                assert_eq!(owed, Some(vid), "vCPU {v} waits for an answer from {s}, which owes it none");
                assert_eq!(matches!(vc.state, BlockedFault(_)), vc.exit.is_some(), "vCPU {v} is {:?}", vc.state);
            }
            _ => assert!(!queued.contains_key(&vid), "vCPU {v} is {:?} but queued on an endpoint", vc.state),
        }
        if vc.state != Free {
            assert_eq!(k.domains[vc.domain as usize].state, DomainState::Alive, "vCPU {v} of a dead domain");
        }
        if vc.exit.is_some() {
            assert!(
                matches!(vc.state, BlockedSend(_) | BlockedFault(_) | Stopped),
                "vCPU {v} has a fault in {:?}",
                vc.state
            );
        }
    }
    assert_eq!(k.runq.highest(), best_ready, "run queue bitmap vs ready vCPUs");
    // Queued vCPUs (run queue or endpoint) are linked from at most one queued vCPU: no two
    // queues share a tail.
    let mut preds = [0u8; MAX_VCPUS];
    for v in 0..MAX_VCPUS {
        if queued.contains_key(&(v as VcpuId)) || k.vcpus[v].state == Ready {
            if let Some(n) = k.next[v] {
                preds[n as usize] += 1;
            }
        }
    }
    assert!(preds.iter().all(|&p| p <= 1), "a vCPU is linked from two queued vCPUs: {preds:?}");

    for (n, ntf) in k.notifications.iter().enumerate() {
        if let Some(w) = ntf.waiter {
            assert_eq!(k.vcpus[w as usize].state, BlockedWait(n as NotificationId), "waiter of notification {n}");
        }
        if let Some((b, vector)) = ntf.bound {
            assert_ne!(k.vcpus[b as usize].state, Free, "notification {n} is bound to free vCPU {b}");
            assert!(vector >= 32 || vector == 0, "notification {n} bound to vector {vector}");
        }
        if ntf.refs == 0 {
            assert!(ntf.waiter.is_none() && ntf.bound.is_none() && ntf.timer.is_none(), "free notification {n} in use");
        }
    }

    // Reference counts: capabilities, mappings and fault handlers.
    let mut ep_refs = [0u32; MAX_ENDPOINTS];
    let mut ntf_refs = [0u32; MAX_NOTIFICATIONS];
    let mut reg_refs = [0u32; MAX_REGIONS];
    for (d, dom) in k.domains.iter().enumerate() {
        if dom.state != DomainState::Alive {
            assert_eq!(dom.caps.iter().count(), 0, "dead domain {d} holds capabilities");
            assert!(
                dom.mappings.is_empty() && dom.ram.is_empty() && dom.stage2.is_none(),
                "dead domain {d} holds memory"
            );
            assert!(dom.fault_handler.is_none());
            continue;
        }
        for (_, c) in dom.caps.iter() {
            match c.object {
                Object::Endpoint(e) => ep_refs[e as usize] += 1,
                Object::Notification(n) => ntf_refs[n as usize] += 1,
                Object::Region(r) => reg_refs[r as usize] += 1,
                _ => {}
            }
        }
        for m in &dom.mappings {
            reg_refs[m.region as usize] += 1;
        }
        if let Some((e, _)) = dom.fault_handler {
            ep_refs[e as usize] += 1;
        }
    }
    for (e, (ep, want)) in k.endpoints.iter().zip(ep_refs).enumerate() {
        assert_eq!(ep.refs, want, "references to endpoint {e}");
    }
    for (n, (ntf, want)) in k.notifications.iter().zip(ntf_refs).enumerate() {
        assert_eq!(ntf.refs, want, "references to notification {n}");
    }
    for (r, (region, want)) in k.regions.iter().zip(reg_refs).enumerate() {
        assert_eq!(region.refs, want, "references to region {r}");
        if want == 0 {
            assert_eq!(region.frames, 0, "free region {r} still owns frames");
        }
    }
}

// ---- boot, basic hypercalls ---------------------------------------------------------------

#[test]
fn boot_gives_dom0_its_well_known_slots() {
    let s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let g = s.k.domains[d0 as usize].generation;
    assert_eq!(s.cap(d0, dom0_slots::SELF_DOMAIN).object, Object::Domain(d0, g));
    assert_eq!(s.cap(d0, dom0_slots::SELF_DOMAIN).rights, rights::CONTROL);
    assert_eq!(s.cap(d0, dom0_slots::MEMORY).object, Object::Memory);
    assert_eq!(s.cap(d0, dom0_slots::MEMORY).rights, rights::CONTROL | rights::GRANT);
    assert_eq!(s.cap(d0, dom0_slots::SELF_VCPU).object, Object::Vcpu(v0, s.k.vcpus[v0 as usize].generation));
    assert_eq!(s.cap(d0, dom0_slots::MACHINE).object, Object::Machine);
    assert_eq!(s.k.domains[d0 as usize].caps.get(4), Err(Error::InvalidSlot));
    let root = s.k.domains[d0 as usize].stage2.as_ref().unwrap().root();
    let boot = VcpuBoot { entry: DOM0_ENTRY, rbx: 0x7000, domain: d0, stage2_root: root, vm: false };
    assert_eq!(s.p.boots, vec![(v0, boot)]);
    assert_eq!(s.regs(v0).rip, DOM0_ENTRY);
    assert_eq!(s.regs(v0).rbx, 0x7000);
    assert_eq!(s.k.domains[d0 as usize].name(), "dom0");
    assert_eq!(s.p.names[&d0], "dom0");
    assert_eq!(s.k.domains[d0 as usize].ram_size(), DOM0_RAM);
    // Four 2 MiB chunks of RAM and a few tables.
    let used = PHYS_SIZE / PAGE - s.p.free();
    assert!((2048..2048 + 16).contains(&used), "{used} frames used");
    assert!(s.k.any_alive());
    check_invariants(&s.k);
}

#[test]
fn null_clock_yield_and_unknown_numbers() {
    let mut s = boot();
    let v0 = s.v0;
    let w = [1, 2, 3, 4, 5, 6];
    s.raw(v0, Hypercall::Null.number(), 77, 9, w);
    let r = s.regs(v0);
    assert_eq!((r.rax, r.rbx, r.rcx, words(&r)), (0, 77, 9, w), "Null changes nothing but RAX");
    s.p.now = 123_456;
    assert_eq!(s.hc(v0, Hypercall::Clock, 0, &[]), Ok(123_456));
    for nr in [6, 7, 9, 27, 23, 43, 66, 1000, u64::MAX] {
        s.raw(v0, nr, 0, 3, w);
        let r = s.regs(v0);
        assert_eq!(r.rax, Error::UnknownHypercall.code(), "number {nr}");
        assert_eq!((r.rcx, words(&r)), (3, w), "number {nr} changed registers");
    }
    // Yield with nobody else ready keeps running.
    assert_eq!(s.hc(v0, Hypercall::Yield, 0, &[]), Ok(0));
    assert_eq!(s.k.current, Some(v0));
    assert_eq!(s.k.stats.hypercalls, 1 + 1 + 9 + 1);
    check_invariants(&s.k);
}

#[test]
fn console_write_assembles_prefixed_lines() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    s.k.write_ram(&mut s.p, d0, BUF_GPA, b"hello\nwor").unwrap();
    assert_eq!(s.hc(v0, Hypercall::ConsoleWrite, 0, &[BUF_GPA, 9]), Ok(BUF_GPA));
    assert_eq!(s.p.lines_of("dom0"), vec!["hello"]);
    s.k.write_ram(&mut s.p, d0, BUF_GPA, b"ld\n\x1b[2J\n").unwrap();
    assert_eq!(s.hc(v0, Hypercall::ConsoleWrite, 0, &[BUF_GPA, 8]), Ok(BUF_GPA));
    assert_eq!(s.p.lines_of("dom0"), vec!["hello", "world", "?[2J"]);
    assert_eq!(s.hc(v0, Hypercall::ConsoleWrite, 0, &[BUF_GPA, 0]), Ok(BUF_GPA));
    assert_eq!(s.hc(v0, Hypercall::ConsoleWrite, 0, &[0, CONSOLE_WRITE_MAX]), Ok(0));
    assert_eq!(s.hc(v0, Hypercall::ConsoleWrite, 0, &[0, CONSOLE_WRITE_MAX + 1]), Err(Error::InvalidArgument));
    assert_eq!(s.hc(v0, Hypercall::ConsoleWrite, 0, &[DOM0_RAM - 2, 4]), Err(Error::BadAddress));
    assert_eq!(s.hc(v0, Hypercall::ConsoleWrite, 0, &[u64::MAX - 1, 4]), Err(Error::BadAddress));
    assert_eq!(s.hc(v0, Hypercall::ConsoleWrite, 0, &[1 << 40, 1]), Err(Error::BadAddress));
}

// ---- domains ------------------------------------------------------------------------------

#[test]
fn domain_create_success() {
    let mut s = boot();
    let free = s.p.free();
    let (d, slot) = s.create_domain("alpha", 3 << 20, 50);
    assert_eq!(slot, 4, "lowest free slot");
    let dom = &s.k.domains[d as usize];
    assert_eq!(dom.state, DomainState::Alive);
    assert_eq!(dom.name(), "alpha");
    assert_eq!(s.p.names[&d], "alpha");
    assert_eq!(dom.ram_size(), 4 << 20, "rounded up to 2 MiB");
    assert_eq!(dom.priority, 50);
    assert_eq!(dom.caps.iter().count(), 0, "a new domain has no capabilities");
    assert_eq!(s.cap(s.d0, slot).rights, rights::CONTROL);
    assert!(free - s.p.free() >= 1024);
    // Its RAM is zeroed, and the name buffer was read from the caller's RAM.
    assert_eq!(s.read_words(d, 0, 4), vec![0; 4]);
    let (_, max) = s.create_domain(&"x".repeat(DOMAIN_NAME_MAX), 1, 254);
    assert_eq!(max, 5);
    check_invariants(&s.k);
}

#[test]
fn domain_create_errors() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let free = s.p.free();
    s.k.write_ram(&mut s.p, d0, NAME_GPA, b"good name!").unwrap();
    let create = |s: &mut Sys, slot: u64, ram: u64, prio: u64, gpa: u64, len: u64| {
        s.hc(v0, Hypercall::DomainCreate, slot, &[ram, prio, gpa, len])
    };
    let mem = dom0_slots::MEMORY;
    assert_eq!(create(&mut s, 40, MIB2, 10, NAME_GPA, 4), Err(Error::InvalidSlot));
    assert_eq!(create(&mut s, u64::MAX, MIB2, 10, NAME_GPA, 4), Err(Error::InvalidSlot));
    assert_eq!(create(&mut s, dom0_slots::SELF_DOMAIN, MIB2, 10, NAME_GPA, 4), Err(Error::WrongType));
    assert_eq!(create(&mut s, dom0_slots::MACHINE, MIB2, 10, NAME_GPA, 4), Err(Error::WrongType));
    let weak = s.copy(mem, dom0_slots::SELF_DOMAIN, rights::GRANT, 0).unwrap();
    assert_eq!(create(&mut s, weak, MIB2, 10, NAME_GPA, 4), Err(Error::PermissionDenied));
    // Names: length, characters, address.
    assert_eq!(create(&mut s, mem, MIB2, 10, NAME_GPA, 0), Err(Error::InvalidArgument));
    assert_eq!(create(&mut s, mem, MIB2, 10, NAME_GPA, DOMAIN_NAME_MAX as u64 + 1), Err(Error::InvalidArgument));
    assert_eq!(create(&mut s, mem, MIB2, 10, NAME_GPA, u64::MAX), Err(Error::InvalidArgument));
    assert_eq!(create(&mut s, mem, MIB2, 10, NAME_GPA, 10), Err(Error::InvalidArgument), "space in the name");
    assert_eq!(create(&mut s, mem, MIB2, 10, NAME_GPA + 20, 4), Err(Error::InvalidArgument), "NULs in the name");
    assert_eq!(create(&mut s, mem, MIB2, 10, DOM0_RAM - 2, 4), Err(Error::BadAddress));
    assert_eq!(create(&mut s, mem, MIB2, 10, u64::MAX - 1, 4), Err(Error::BadAddress));
    // Priority and size.
    for prio in [0, 255, 256, u64::MAX] {
        assert_eq!(create(&mut s, mem, MIB2, prio, NAME_GPA, 4), Err(Error::InvalidArgument), "priority {prio}");
    }
    assert_eq!(create(&mut s, mem, 0, 10, NAME_GPA, 4), Err(Error::InvalidArgument));
    assert_eq!(create(&mut s, mem, (1 << 30) + 1, 10, NAME_GPA, 4), Err(Error::InvalidArgument));
    assert_eq!(create(&mut s, mem, u64::MAX, 10, NAME_GPA, 4), Err(Error::InvalidArgument));
    // More RAM than there is: nothing leaks.
    let live = s.p.live.clone();
    assert_eq!(create(&mut s, mem, 60 << 20, 10, NAME_GPA, 4), Err(Error::OutOfMemory));
    assert_eq!(create(&mut s, mem, 1 << 30, 10, NAME_GPA, 4), Err(Error::OutOfMemory));
    assert_eq!(s.p.live, live);
    assert_eq!(s.p.free(), free);
    assert_eq!(s.live_domains(), 1);
    assert_eq!(create(&mut s, mem, MIB2, 10, NAME_GPA, 4), Ok(weak + 1));
    check_invariants(&s.k);
}

#[test]
fn domain_table_full_is_out_of_memory() {
    let mut s = boot();
    for i in 1..MAX_DOMAINS {
        s.create_domain(&format!("d{i}"), MIB2, 10);
    }
    assert_eq!(s.live_domains(), MAX_DOMAINS);
    let free = s.p.free();
    let r = s.hc(s.v0, Hypercall::DomainCreate, dom0_slots::MEMORY, &[MIB2, 10, NAME_GPA, 2]);
    assert_eq!(r, Err(Error::OutOfMemory));
    assert_eq!(s.p.free(), free);
    check_invariants(&s.k);
}

#[test]
fn full_capability_table_is_no_free_slot_and_leaks_nothing() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let (x, xslot) = s.create_domain("x", MIB2, 10);
    let nslot = s.notification();
    while s.k.domains[d0 as usize].caps.iter().count() < CAP_SLOTS {
        s.endpoint();
    }
    let free = s.p.free();
    let live = s.p.live.clone();
    let eps = s.k.endpoints.iter().filter(|e| e.refs > 0).count();
    let ntfs = s.k.notifications.iter().filter(|n| n.refs > 0).count();
    let vcpus = s.live_vcpus();
    let mem = dom0_slots::MEMORY;
    s.k.write_ram(&mut s.p, d0, NAME_GPA, b"full").unwrap();
    assert_eq!(s.hc(v0, Hypercall::DomainCreate, mem, &[MIB2, 10, NAME_GPA, 4]), Err(Error::NoFreeSlot));
    assert_eq!(s.live_domains(), 2, "the domain is destroyed again");
    assert_eq!(s.hc(v0, Hypercall::RegionCreate, mem, &[3 * PAGE]), Err(Error::NoFreeSlot));
    assert_eq!(s.hc(v0, Hypercall::EndpointCreate, mem, &[]), Err(Error::NoFreeSlot));
    assert_eq!(s.hc(v0, Hypercall::NotificationCreate, mem, &[]), Err(Error::NoFreeSlot));
    assert_eq!(s.hc(v0, Hypercall::VcpuCreate, xslot, &[0, 0]), Err(Error::NoFreeSlot));
    assert_eq!(s.copy(nslot, dom0_slots::SELF_DOMAIN, rights::ALL, 0), Err(Error::NoFreeSlot));
    assert_eq!(s.p.free(), free);
    assert_eq!(s.p.live, live);
    assert_eq!(s.k.endpoints.iter().filter(|e| e.refs > 0).count(), eps);
    assert_eq!(s.k.notifications.iter().filter(|n| n.refs > 0).count(), ntfs);
    assert_eq!(s.live_vcpus(), vcpus, "a vCPU nobody holds a capability to was left behind");
    assert_eq!(s.k.domains[x as usize].vcpus, 0);
    // A full target table.
    for _ in 0..CAP_SLOTS {
        s.copy(nslot, xslot, rights::ALL, 0).unwrap();
    }
    assert_eq!(s.copy(nslot, xslot, rights::ALL, 0), Err(Error::NoFreeSlot));
    check_invariants(&s.k);
}

#[test]
fn domain_write_copies_into_the_target() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let (d, slot) = s.create_domain("target", 4 << 20, 10);
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    s.k.write_ram(&mut s.p, d0, 0x30_0000 - 100, &data).unwrap();
    let dst = MIB2 - 5000; // crosses a 2 MiB chunk of the target
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, slot, &[dst, 0x30_0000 - 100, data.len() as u64]).map(|_| ()), Ok(()));
    let mut back = vec![0u8; data.len()];
    s.k.read_ram(&s.p, d, dst, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, slot, &[0, 0, 0]).map(|_| ()), Ok(()));
    // Errors: source or destination outside RAM, overflowing addresses, wrong capability.
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, slot, &[0, DOM0_RAM - 10, 20]), Err(Error::BadAddress));
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, slot, &[(4 << 20) - 10, 0, 20]), Err(Error::BadAddress));
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, slot, &[u64::MAX - 5, 0, 20]), Err(Error::BadAddress));
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, slot, &[0, u64::MAX - 5, 20]), Err(Error::BadAddress));
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, slot, &[0, 0, u64::MAX]), Err(Error::BadAddress));
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, dom0_slots::MEMORY, &[0, 0, 1]), Err(Error::WrongType));
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, 50, &[0, 0, 1]), Err(Error::InvalidSlot));
    // Writing into dom0 itself through its own capability works too.
    assert_eq!(
        s.hc(v0, Hypercall::DomainWrite, dom0_slots::SELF_DOMAIN, &[0x40_0000, 0x30_0000 - 100, 16]),
        Ok(0x40_0000)
    );
}

#[test]
fn domain_destroy_returns_all_memory_and_stales_capabilities() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let free = s.p.free();
    let live = s.p.live.clone();
    let (d, dslot) = s.create_domain("victim", 4 << 20, 10);
    let (v, vslot) = s.create_vcpu(dslot, true);
    let e = s.endpoint();
    let n = s.notification();
    let reg = s.hc(v0, Hypercall::RegionCreate, dom0_slots::MEMORY, &[5 * PAGE]).unwrap();
    assert_eq!(s.hc(v0, Hypercall::Map, dslot, &[reg, 0x4000_0000, rights::READ | rights::WRITE]), Ok(reg));
    s.copy(e, dslot, rights::ALL, 0).unwrap();
    s.copy(n, dslot, rights::ALL, 0).unwrap();
    s.copy(reg, dslot, rights::READ, 0).unwrap();
    s.hc(v0, Hypercall::DomainSetFaultEndpoint, dslot, &[e, 9]).unwrap();
    // The victim waits in the endpoint; its console has a partial line.
    s.k.write_ram(&mut s.p, d, BUF_GPA, b"last words").unwrap();
    s.switch(v);
    assert_eq!(s.hc(v, Hypercall::ConsoleWrite, 0, &[BUF_GPA, 10]), Ok(BUF_GPA));
    s.raw(v, Hypercall::Recv.number(), 0, 0, [0; 6]);
    s.k.schedule();
    assert_eq!(s.k.current, Some(v0));
    let changes = s.p.stage2_changes.get(&d).copied().unwrap_or(0);
    assert_eq!(s.hc(v0, Hypercall::DomainDestroy, dslot, &[]), Ok(0));
    check_invariants(&s.k);
    assert_eq!(s.k.domains[d as usize].state, DomainState::Free);
    assert_eq!(s.state(v), VcpuState::Free);
    assert_eq!(s.p.lines_of("victim"), vec!["last words"], "console flushed on destroy");
    assert!(s.p.stage2_changes[&d] > changes);
    assert!(s.k.endpoints[s.endpoint_id(d0, e) as usize].receivers.is_empty());
    // Every capability to the domain or its vCPU is stale now.
    let stale = Err(Error::StaleCapability);
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, dslot, &[0, 0, 1]), stale);
    assert_eq!(s.hc(v0, Hypercall::DomainDestroy, dslot, &[]), stale);
    assert_eq!(s.hc(v0, Hypercall::VcpuCreate, dslot, &[0, 0]), stale);
    assert_eq!(s.hc(v0, Hypercall::VcpuStart, vslot, &[]), stale);
    assert_eq!(s.hc(v0, Hypercall::DomainSetFaultEndpoint, dslot, &[e, 0]), stale);
    assert_eq!(s.hc(v0, Hypercall::Map, dslot, &[reg, 0x5000_0000, rights::READ]), stale);
    assert_eq!(s.hc(v0, Hypercall::Unmap, dslot, &[reg]), stale);
    assert_eq!(s.copy(e, dslot, rights::ALL, 0), stale);
    // A new domain in the same place does not revive the old capabilities.
    let (d2, d2slot) = s.create_domain("reborn", MIB2, 10);
    assert_eq!(d2, d);
    assert_eq!(s.hc(v0, Hypercall::DomainWrite, dslot, &[0, 0, 1]), stale);
    let (v2, _) = s.create_vcpu(d2slot, false);
    assert_eq!(v2, v);
    assert_eq!(s.hc(v0, Hypercall::VcpuStart, vslot, &[]), stale);
    // Destroy the new one and drop dom0's capabilities: every frame is back.
    s.hc(v0, Hypercall::DomainDestroy, d2slot, &[]).unwrap();
    for slot in 4..CAP_SLOTS as u64 {
        let _ = s.hc(v0, Hypercall::CapDelete, slot, &[]);
    }
    assert_eq!(s.p.free(), free);
    assert_eq!(s.p.live, live);
    assert!(s.k.endpoints.iter().all(|e| e.refs == 0), "an endpoint reference was leaked");
    assert!(s.k.notifications.iter().all(|n| n.refs == 0));
    assert!(s.k.regions.iter().all(|r| r.refs == 0));
    check_invariants(&s.k);
}

#[test]
fn domain_destroy_errors() {
    let mut s = boot();
    let v0 = s.v0;
    assert_eq!(s.hc(v0, Hypercall::DomainDestroy, dom0_slots::SELF_DOMAIN, &[]), Err(Error::InvalidArgument));
    assert_eq!(s.hc(v0, Hypercall::DomainDestroy, dom0_slots::MEMORY, &[]), Err(Error::WrongType));
    assert_eq!(s.hc(v0, Hypercall::DomainDestroy, 64, &[]), Err(Error::InvalidSlot));
    let (_, dslot) = s.create_domain("x", MIB2, 10);
    let weak = s.copy(dslot, dom0_slots::SELF_DOMAIN, rights::GRANT, 0);
    assert_eq!(weak, Err(Error::PermissionDenied), "a domain capability has no GRANT");
    assert_eq!(s.live_domains(), 2);
}

#[test]
fn vcpus_create_and_start() {
    let mut s = boot();
    let v0 = s.v0;
    let (d, dslot) = s.create_domain("guest", MIB2, 10);
    let slot = s.hc(v0, Hypercall::VcpuCreate, dslot, &[0xabc, 0xdef]).unwrap();
    let Object::Vcpu(v, g) = s.cap(s.d0, slot).object else { panic!() };
    assert_eq!(s.cap(s.d0, slot).rights, rights::CONTROL);
    assert_eq!(s.state(v), VcpuState::Created);
    assert_eq!(s.k.vcpus[v as usize].generation, g);
    assert_eq!(s.k.vcpus[v as usize].domain, d);
    assert_eq!((s.regs(v).rip, s.regs(v).rbx), (0xabc, 0xdef));
    let root = s.k.domains[d as usize].stage2.as_ref().unwrap().root();
    assert_eq!(
        s.p.boots.last(),
        Some(&(v, VcpuBoot { entry: 0xabc, rbx: 0xdef, domain: d, stage2_root: root, vm: false }))
    );
    assert!(!s.k.runq.contains(v, 10, &s.k.next));
    assert_eq!(s.hc(v0, Hypercall::VcpuStart, slot, &[]), Ok(0));
    assert_eq!(s.state(v), VcpuState::Ready);
    assert_eq!(s.hc(v0, Hypercall::VcpuStart, slot, &[]), Err(Error::InvalidState));
    assert_eq!(s.hc(v0, Hypercall::VcpuStart, dom0_slots::SELF_VCPU, &[]), Err(Error::InvalidState));
    assert_eq!(s.hc(v0, Hypercall::VcpuStart, dslot, &[]), Err(Error::WrongType));
    assert_eq!(s.hc(v0, Hypercall::VcpuStart, 63, &[]), Err(Error::InvalidSlot));
    assert_eq!(s.hc(v0, Hypercall::VcpuCreate, dom0_slots::MEMORY, &[0, 0]), Err(Error::WrongType));
    // A second vCPU gets the next index in its domain.
    let (v2, _) = s.create_vcpu(dslot, false);
    assert_eq!(s.k.vcpus[v2 as usize].index_in_domain, 1);
    // The vCPU table fills up.
    while s.live_vcpus() < MAX_VCPUS {
        s.create_vcpu(dslot, false);
    }
    assert_eq!(s.hc(v0, Hypercall::VcpuCreate, dslot, &[0, 0]), Err(Error::OutOfMemory));
    check_invariants(&s.k);
}

#[test]
fn message_page_registration() {
    let mut s = boot();
    let v0 = s.v0;
    let hpa0 = s.k.domains[s.d0 as usize].ram_hpa(0).unwrap();
    assert_eq!(s.hc(v0, Hypercall::VcpuSetMessagePage, 0, &[PAGE_GPA]), Ok(PAGE_GPA));
    assert_eq!(s.k.vcpus[v0 as usize].msg_page, Some(hpa0 + PAGE_GPA));
    assert_eq!(s.hc(v0, Hypercall::VcpuSetMessagePage, 0, &[DOM0_RAM - PAGE]), Ok(DOM0_RAM - PAGE));
    for bad in [PAGE_GPA + 8, DOM0_RAM, DOM0_RAM + PAGE, !0xfff_u64, u64::MAX] {
        assert_eq!(s.hc(v0, Hypercall::VcpuSetMessagePage, 0, &[bad]), Err(Error::BadAddress), "{bad:#x}");
    }
    assert!(s.k.vcpus[v0 as usize].msg_page.is_some());
    assert_eq!(s.hc(v0, Hypercall::VcpuSetMessagePage, 0, &[0]), Ok(0));
    assert_eq!(s.k.vcpus[v0 as usize].msg_page, None);
}

// ---- regions ------------------------------------------------------------------------------

#[test]
fn regions_create_map_unmap() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let free = s.p.free();
    let (d, dslot) = s.create_domain("guest", MIB2, 10);
    let reg = s.hc(v0, Hypercall::RegionCreate, dom0_slots::MEMORY, &[3 * PAGE - 1]).unwrap();
    let c = s.cap(d0, reg);
    let Object::Region(r) = c.object else { panic!() };
    assert_eq!(c.rights, rights::READ | rights::WRITE | rights::EXEC | rights::GRANT);
    assert_eq!(s.k.regions[r as usize].frames, 3);
    let rw = rights::READ | rights::WRITE;
    let gpa = 0x4000_0000;
    assert_eq!(s.hc(v0, Hypercall::Map, dslot, &[reg, gpa, rw]), Ok(reg));
    let t = s.k.domains[d as usize].stage2.as_ref().unwrap().translate(&s.p, gpa + PAGE + 5).unwrap();
    assert_eq!(t.hpa, s.k.regions[r as usize].hpa + PAGE + 5);
    assert_eq!(t.access, crate::stage2::Access::READ | crate::stage2::Access::WRITE);
    assert_eq!(s.k.regions[r as usize].refs, 2);
    // The same region mapped into dom0 too: shared memory.
    assert_eq!(s.hc(v0, Hypercall::Map, dom0_slots::SELF_DOMAIN, &[reg, 0x1_0000_0000, rights::READ]), Ok(reg));
    // Errors.
    let map = |s: &mut Sys, slot, reg, gpa, acc| s.hc(v0, Hypercall::Map, slot, &[reg, gpa, acc]);
    assert_eq!(map(&mut s, dslot, reg, 0x5000_0000, rw), Err(Error::AlreadyMapped), "once per domain");
    let reg2 = s.hc(v0, Hypercall::RegionCreate, dom0_slots::MEMORY, &[PAGE]).unwrap();
    assert_eq!(map(&mut s, dslot, reg2, gpa + 2 * PAGE, rw), Err(Error::AlreadyMapped), "overlap");
    assert_eq!(map(&mut s, dslot, reg2, 0x10_0000, rw), Err(Error::AlreadyMapped), "inside RAM");
    assert_eq!(map(&mut s, dslot, reg2, 0, rw), Err(Error::AlreadyMapped), "inside RAM");
    assert_eq!(map(&mut s, dslot, reg2, gpa + 3 * PAGE + 1, rw), Err(Error::InvalidArgument), "unaligned");
    assert_eq!(map(&mut s, dslot, reg2, 1 << 48, rw), Err(Error::InvalidArgument), "beyond stage-2");
    assert_eq!(map(&mut s, dslot, reg2, !0xfff_u64, rw), Err(Error::InvalidArgument));
    assert_eq!(map(&mut s, dslot, reg2, gpa + 4 * PAGE, rights::WRITE), Err(Error::InvalidArgument), "no READ");
    assert_eq!(map(&mut s, dslot, reg2, gpa + 4 * PAGE, rights::CALL | rights::READ), Err(Error::PermissionDenied));
    let ro = s.copy(reg2, dom0_slots::SELF_DOMAIN, rights::READ, 0).unwrap();
    assert_eq!(map(&mut s, dslot, ro, gpa + 4 * PAGE, rw), Err(Error::PermissionDenied));
    assert_eq!(map(&mut s, dslot, dslot, gpa + 4 * PAGE, rw), Err(Error::WrongType));
    assert_eq!(map(&mut s, reg2, reg2, gpa + 4 * PAGE, rw), Err(Error::PermissionDenied), "no CONTROL");
    assert_eq!(map(&mut s, dom0_slots::MEMORY, reg2, gpa + 4 * PAGE, rw), Err(Error::WrongType));
    assert_eq!(map(&mut s, dslot, 60, gpa + 4 * PAGE, rw), Err(Error::InvalidSlot));
    assert_eq!(map(&mut s, dslot, ro, gpa + 3 * PAGE, rights::READ), Ok(ro), "right after the first");
    // Region sizes.
    let rc = |s: &mut Sys, bytes| s.hc(v0, Hypercall::RegionCreate, dom0_slots::MEMORY, &[bytes]);
    assert_eq!(rc(&mut s, 0), Err(Error::InvalidArgument));
    assert_eq!(rc(&mut s, (256 << 20) + 1), Err(Error::InvalidArgument));
    assert_eq!(rc(&mut s, 200 << 20), Err(Error::OutOfMemory));
    assert_eq!(rc(&mut s, 1), Ok(ro + 1));
    // Unmap.
    let changes = s.p.stage2_changes.get(&d).copied().unwrap_or(0);
    assert_eq!(s.hc(v0, Hypercall::Unmap, dslot, &[reg]), Ok(reg));
    assert!(s.p.stage2_changes[&d] > changes, "TLB flush asked for");
    assert!(s.k.domains[d as usize].stage2.as_ref().unwrap().translate(&s.p, gpa).is_none());
    assert_eq!(s.hc(v0, Hypercall::Unmap, dslot, &[reg]), Err(Error::NotMapped));
    assert_eq!(s.hc(v0, Hypercall::Unmap, dslot, &[dslot]), Err(Error::WrongType));
    // A mapping keeps the region alive after its capabilities are gone.
    assert_eq!(s.hc(v0, Hypercall::CapDelete, reg, &[]), Ok(0));
    assert_eq!(s.k.regions[r as usize].refs, 1);
    assert_eq!(s.k.regions[r as usize].frames, 3);
    assert_eq!(s.hc(v0, Hypercall::Unmap, dom0_slots::SELF_DOMAIN, &[reg]), Err(Error::InvalidSlot));
    check_invariants(&s.k);
    // Destroying dom0's mapping is impossible without the capability; destroying the guest
    // drops its mapping of reg2/ro. Drop everything and count frames.
    s.hc(v0, Hypercall::DomainDestroy, dslot, &[]).unwrap();
    let mapping = s.k.domains[d0 as usize].mappings[0];
    s.k.unmap_region(&mut s.p, d0, mapping.region).unwrap();
    for slot in 4..CAP_SLOTS as u64 {
        let _ = s.hc(v0, Hypercall::CapDelete, slot, &[]);
    }
    assert_eq!(s.p.free(), free);
    check_invariants(&s.k);
}

#[test]
fn map_fixed_maps_host_memory_read_only() {
    let mut s = boot();
    let d0 = s.d0;
    let hpa = s.p.alloc_frames(3, PAGE).unwrap();
    assert_eq!(s.k.map_fixed(&mut s.p, d0, 0x8000_0000, hpa, 2 * PAGE + 1), Ok(()));
    let stage2 = s.k.domains[d0 as usize].stage2.as_ref().unwrap();
    let t = stage2.translate(&s.p, 0x8000_0000 + 2 * PAGE + 7).unwrap();
    assert_eq!(t.hpa, hpa + 2 * PAGE + 7, "the size is rounded up to whole pages");
    assert_eq!(t.access, crate::stage2::Access::READ);
    assert!(stage2.translate(&s.p, 0x8000_0000 + 3 * PAGE).is_none());
    assert_eq!(s.k.map_fixed(&mut s.p, d0, 0x8000_0000, hpa, PAGE), Err(Error::AlreadyMapped));
    assert_eq!(s.k.map_fixed(&mut s.p, d0, 0, hpa, PAGE), Err(Error::AlreadyMapped), "over RAM");
    // Not RAM: the kernel never reads or writes it on the domain's behalf.
    assert_eq!(s.hc(s.v0, Hypercall::ConsoleWrite, 0, &[0x8000_0000, 1]), Err(Error::BadAddress));
    assert_eq!(s.k.map_fixed(&mut s.p, 5, 0, hpa, PAGE), Err(Error::InvalidState), "a free domain");
}

#[test]
fn too_many_mappings_is_out_of_memory() {
    let mut s = boot();
    let v0 = s.v0;
    let (_, dslot) = s.create_domain("guest", MIB2, 10);
    for i in 0..MAX_MAPPINGS as u64 {
        let reg = s.hc(v0, Hypercall::RegionCreate, dom0_slots::MEMORY, &[PAGE]).unwrap();
        assert_eq!(s.hc(v0, Hypercall::Map, dslot, &[reg, 0x4000_0000 + i * PAGE, rights::READ]), Ok(reg));
    }
    let reg = s.hc(v0, Hypercall::RegionCreate, dom0_slots::MEMORY, &[PAGE]).unwrap();
    assert_eq!(s.hc(v0, Hypercall::Map, dslot, &[reg, 0x5000_0000, rights::READ]), Err(Error::OutOfMemory));
    check_invariants(&s.k);
}

// ---- capabilities -------------------------------------------------------------------------

#[test]
fn cap_copy_masks_rights_and_badges_only_unbadged_ipc_caps() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let (d, dslot) = s.create_domain("other", MIB2, 10);
    let e = s.endpoint();
    let n = s.notification();
    let me = dom0_slots::SELF_DOMAIN;
    // Rights are masked.
    let c = s.copy(e, dslot, rights::CALL | rights::WRITE, 0).unwrap();
    assert_eq!(c, 0);
    assert_eq!(s.cap(d, 0).rights, rights::CALL);
    assert_eq!(s.cap(d, 0).object, s.cap(d0, e).object);
    assert_eq!(s.cap(d, 0).badge, 0);
    // A badge on an unbadged endpoint/notification capability.
    let be = s.copy(e, me, rights::ALL, 0x55).unwrap();
    assert_eq!(s.cap(d0, be).badge, 0x55);
    assert_eq!(s.cap(d0, be).rights, rights::CALL | rights::RECV | rights::GRANT);
    let bn = s.copy(n, me, rights::SIGNAL | rights::GRANT, 0x66).unwrap();
    assert_eq!(s.cap(d0, bn).badge, 0x66);
    // A badged capability keeps its badge: 0 keeps it, another one is refused.
    let be2 = s.copy(be, me, rights::ALL, 0).unwrap();
    assert_eq!(s.cap(d0, be2).badge, 0x55);
    assert_eq!(s.copy(be, me, rights::ALL, 0x77), Err(Error::InvalidArgument));
    assert_eq!(s.copy(bn, me, rights::ALL, 1), Err(Error::InvalidArgument));
    // No badges on other kinds.
    assert_eq!(s.copy(dom0_slots::MEMORY, me, rights::ALL, 1), Err(Error::InvalidArgument));
    let reg = s.hc(v0, Hypercall::RegionCreate, dom0_slots::MEMORY, &[PAGE]).unwrap();
    assert_eq!(s.copy(reg, me, rights::ALL, 1), Err(Error::InvalidArgument));
    let r2 = s.copy(reg, me, rights::READ | rights::GRANT, 0).unwrap();
    assert_eq!(s.cap(d0, r2).rights, rights::READ | rights::GRANT);
    // Rights never grow back.
    let r3 = s.copy(r2, me, rights::ALL, 0).unwrap();
    assert_eq!(s.cap(d0, r3).rights, rights::READ | rights::GRANT);
    // Missing GRANT, bad source, bad target.
    let nogrant = s.copy(e, me, rights::CALL, 0).unwrap();
    assert_eq!(s.copy(nogrant, me, rights::ALL, 0), Err(Error::PermissionDenied));
    assert_eq!(s.copy(dom0_slots::MACHINE, me, rights::ALL, 0), Err(Error::PermissionDenied));
    assert_eq!(s.copy(40, me, rights::ALL, 0), Err(Error::InvalidSlot));
    assert_eq!(s.copy(e, 40, rights::ALL, 0), Err(Error::InvalidSlot));
    assert_eq!(s.copy(e, u64::MAX, rights::ALL, 0), Err(Error::InvalidSlot));
    assert_eq!(s.copy(e, dom0_slots::MEMORY, rights::ALL, 0), Err(Error::WrongType));
    assert_eq!(s.copy(e, e, rights::ALL, 0), Err(Error::PermissionDenied), "endpoint cap has no CONTROL");
    // Each copy is a reference.
    let ep = s.endpoint_id(d0, e);
    assert_eq!(s.k.endpoints[ep as usize].refs, 5);
    check_invariants(&s.k);
}

#[test]
fn cap_revoke_removes_copies_transitively_across_domains() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let (a, aslot) = s.create_domain("a", MIB2, DOM0_PRIO);
    let (b, bslot) = s.create_domain("b", MIB2, DOM0_PRIO);
    let (va, _) = s.create_vcpu(aslot, true);
    let e = s.endpoint();
    let other = s.endpoint();
    // Domain capabilities have no GRANT: only their holder can copy into a domain.
    assert_eq!(s.copy(bslot, aslot, rights::ALL, 0), Err(Error::PermissionDenied));
    // dom0 → a (with GRANT), dom0 → b (a sibling), dom0 → dom0; a gets memory to make c.
    assert_eq!(s.copy(e, aslot, rights::ALL, 0), Ok(0));
    assert_eq!(s.copy(dom0_slots::MEMORY, aslot, rights::ALL, 0), Ok(1));
    assert_eq!(s.copy(other, aslot, rights::ALL, 0), Ok(2));
    assert_eq!(s.copy(e, bslot, rights::CALL, 7), Ok(0));
    let mine = s.copy(e, dom0_slots::SELF_DOMAIN, rights::ALL, 0).unwrap();
    s.switch(va);
    s.k.write_ram(&mut s.p, a, NAME_GPA, b"c").unwrap();
    let cslot = s.hc(va, Hypercall::DomainCreate, 1, &[MIB2, 10, NAME_GPA, 1]).unwrap();
    assert_eq!(cslot, 3);
    let Object::Domain(c, _) = s.cap(a, cslot).object else { panic!() };
    // a → c twice (grandchildren of dom0's capability), and an unrelated endpoint.
    assert_eq!(s.hc(va, Hypercall::CapCopy, 0, &[cslot, rights::CALL | rights::GRANT, 3]), Ok(0));
    assert_eq!(s.hc(va, Hypercall::CapCopy, 0, &[cslot, rights::ALL, 4]), Ok(1));
    assert_eq!(s.hc(va, Hypercall::CapCopy, 2, &[cslot, rights::ALL, 0]), Ok(2));
    let ep = s.endpoint_id(d0, e);
    assert_eq!(s.k.endpoints[ep as usize].refs, 6);
    // a revokes its copy: c's copies go, a's stays.
    assert_eq!(s.hc(va, Hypercall::CapRevoke, 0, &[]), Ok(2));
    assert!(s.k.domains[a as usize].caps.get(0).is_ok(), "the revoked capability itself stays");
    assert_eq!(s.k.domains[c as usize].caps.get(0), Err(Error::InvalidSlot));
    assert_eq!(s.k.domains[c as usize].caps.get(1), Err(Error::InvalidSlot));
    assert!(s.k.domains[c as usize].caps.get(2).is_ok(), "other objects untouched");
    assert_eq!(s.k.endpoints[ep as usize].refs, 4);
    // Rebuild a grandchild (and a great-grandchild) and revoke from the root in dom0.
    assert_eq!(s.hc(va, Hypercall::CapCopy, 0, &[cslot, rights::ALL, 0]), Ok(0));
    assert_eq!(s.hc(va, Hypercall::CapCopy, 0, &[cslot, rights::ALL, 0]), Ok(1));
    assert_eq!(s.hc(va, Hypercall::CapRevoke, 40, &[]), Err(Error::InvalidSlot));
    assert_eq!(s.hc(va, Hypercall::CapRevoke, 7, &[]), Err(Error::InvalidSlot));
    s.switch(v0);
    assert_eq!(s.hc(v0, Hypercall::CapRevoke, e, &[]), Ok(5), "a's, c's two, b's, mine");
    assert!(s.k.domains[d0 as usize].caps.get(e).is_ok());
    assert_eq!(s.k.domains[d0 as usize].caps.get(mine), Err(Error::InvalidSlot));
    assert_eq!(s.k.domains[a as usize].caps.get(0), Err(Error::InvalidSlot));
    assert!(s.k.domains[a as usize].caps.get(1).is_ok());
    assert_eq!(s.k.domains[b as usize].caps.get(0), Err(Error::InvalidSlot));
    assert_eq!(s.k.domains[c as usize].caps.get(0), Err(Error::InvalidSlot));
    assert_eq!(s.k.domains[c as usize].caps.get(1), Err(Error::InvalidSlot));
    assert!(s.k.domains[c as usize].caps.get(2).is_ok());
    assert_eq!(s.k.endpoints[ep as usize].refs, 1);
    assert_eq!(s.hc(v0, Hypercall::CapRevoke, e, &[]), Ok(0));
    // Revoking the memory capability takes a's copy, not what a made with it.
    assert_eq!(s.hc(v0, Hypercall::CapRevoke, dom0_slots::MEMORY, &[]), Ok(1));
    assert_eq!(s.k.domains[a as usize].caps.get(1), Err(Error::InvalidSlot));
    assert!(s.k.domains[a as usize].caps.get(cslot).is_ok());
    check_invariants(&s.k);
}

#[test]
fn cap_delete_drops_one_reference() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let e = s.endpoint();
    let c = s.copy(e, dom0_slots::SELF_DOMAIN, rights::ALL, 0).unwrap();
    let ep = s.endpoint_id(d0, e);
    assert_eq!(s.hc(v0, Hypercall::CapDelete, e, &[]), Ok(0));
    assert_eq!(s.hc(v0, Hypercall::CapDelete, e, &[]), Err(Error::InvalidSlot));
    assert_eq!(s.hc(v0, Hypercall::CapDelete, 64, &[]), Err(Error::InvalidSlot));
    assert_eq!(s.hc(v0, Hypercall::CapDelete, u64::MAX, &[]), Err(Error::InvalidSlot));
    assert_eq!(s.k.endpoints[ep as usize].refs, 1);
    // The copy still works after its parent is gone.
    assert_eq!(s.hc(v0, Hypercall::CapRevoke, c, &[]), Ok(0));
    assert_eq!(s.hc(v0, Hypercall::CapDelete, c, &[]), Ok(0));
    assert_eq!(s.k.endpoints[ep as usize].refs, 0);
    // The freed slot is reused.
    assert_eq!(s.endpoint(), e);
    check_invariants(&s.k);
}

/// Every hypercall that names a capability refuses empty, out-of-range, wrong-type and
/// under-privileged slots, in that order of checks.
#[test]
fn every_slot_taking_hypercall_checks_its_capability() {
    let mut s = boot();
    let (d0, v0) = (s.d0, s.v0);
    let e = s.endpoint();
    let n = s.notification();
    let reg = s.hc(v0, Hypercall::RegionCreate, dom0_slots::MEMORY, &[PAGE]).unwrap();
    // Capabilities with every right but of the wrong kind, and with no rights at all.
    let all_mem = s.k.grant_original(d0, Object::Memory, rights::ALL).unwrap();
    let g = s.k.domains[d0 as usize].generation;
    let all_dom = s.k.grant_original(d0, Object::Domain(d0, g), rights::ALL).unwrap();
    let none_ep = s.copy(e, dom0_slots::SELF_DOMAIN, 0, 0).unwrap();
    let none_ntf = s.copy(n, dom0_slots::SELF_DOMAIN, 0, 0).unwrap();
    let none_mem = s.copy(dom0_slots::MEMORY, dom0_slots::SELF_DOMAIN, 0, 0).unwrap();
    use Hypercall as H;
    // (call, needs a right, a wrong-type slot holding that right, an unprivileged slot of the right type)
    let cases = [
        (H::Call, all_mem, none_ep),
        (H::ReplyRecv, all_mem, none_ep),
        (H::Recv, all_mem, none_ep),
        (H::Signal, all_mem, none_ntf),
        (H::Wait, all_mem, none_ntf),
        (H::Poll, all_mem, none_ntf),
        (H::NotificationBind, all_mem, none_ntf),
        (H::TimerSet, all_mem, none_ntf),
        (H::Shutdown, all_mem, none_mem),
        (H::DomainCreate, all_dom, none_mem),
        (H::RegionCreate, all_dom, none_mem),
        (H::EndpointCreate, all_dom, none_mem),
        (H::NotificationCreate, all_dom, none_mem),
        (H::DomainWrite, all_mem, none_mem),
        (H::DomainDestroy, all_mem, none_mem),
        (H::DomainSetFaultEndpoint, all_mem, none_mem),
        (H::VcpuCreate, all_mem, none_mem),
        (H::VcpuStart, all_mem, none_mem),
        (H::Map, all_mem, none_mem),
        (H::Unmap, all_mem, none_mem),
        (H::CapCopy, e, none_mem),
    ];
    for (call, wrong, weak) in cases {
        for slot in [40, 63, 64, 1000, u64::MAX] {
            // CapCopy names its target domain in RDI.
            let (rbx, a) = if call == H::CapCopy { (e, [slot, rights::ALL, 0]) } else { (slot, [32, 0, 0]) };
            assert_eq!(s.hc(v0, call, rbx, &a), Err(Error::InvalidSlot), "{call:?} slot {slot}");
        }
        let (rbx, a) = if call == H::CapCopy { (e, [all_mem, rights::ALL, 0]) } else { (wrong, [32, 0, 0]) };
        assert_eq!(s.hc(v0, call, rbx, &a), Err(Error::WrongType), "{call:?} wrong type");
        let (rbx, a) = if call == H::CapCopy { (e, [weak, rights::ALL, 0]) } else { (weak, [32, 0, 0]) };
        assert_eq!(s.hc(v0, call, rbx, &a), Err(Error::PermissionDenied), "{call:?} without the right");
    }
    // Second capabilities: the endpoint of DomainSetFaultEndpoint, the region of Map/Unmap.
    let me = dom0_slots::SELF_DOMAIN;
    assert_eq!(s.hc(v0, H::DomainSetFaultEndpoint, me, &[50, 0]), Err(Error::InvalidSlot));
    assert_eq!(s.hc(v0, H::DomainSetFaultEndpoint, me, &[all_mem, 0]), Err(Error::WrongType));
    assert_eq!(s.hc(v0, H::DomainSetFaultEndpoint, me, &[none_ep, 0]), Err(Error::PermissionDenied));
    assert_eq!(s.hc(v0, H::Map, me, &[50, 0x4000_0000, 1]), Err(Error::InvalidSlot));
    assert_eq!(s.hc(v0, H::Map, me, &[e, 0x4000_0000, 1]), Err(Error::WrongType));
    assert_eq!(s.hc(v0, H::Unmap, me, &[n, 0]), Err(Error::WrongType));
    assert_eq!(s.hc(v0, H::Map, me, &[reg, 0x4000_0000, 1]), Ok(reg));
    // Revoke and delete only need a filled slot.
    for call in [H::CapRevoke, H::CapDelete] {
        for slot in [50, 64, u64::MAX] {
            assert_eq!(s.hc(v0, call, slot, &[]), Err(Error::InvalidSlot), "{call:?} {slot}");
        }
    }
    // A domain with an empty table can name nothing.
    let (_, dslot) = s.create_domain("empty", MIB2, DOM0_PRIO);
    let (v, _) = s.create_vcpu(dslot, true);
    s.switch(v);
    for &call in Hypercall::ALL {
        if matches!(call, H::Null | H::ConsoleWrite | H::DomainExit | H::Yield | H::Clock | H::VcpuSetMessagePage) {
            continue;
        }
        for slot in [0, 1, 63, 64] {
            assert_eq!(s.hc(v, call, slot, &[0, 0, 0]), Err(Error::InvalidSlot), "empty table: {call:?} slot {slot}");
        }
    }
    check_invariants(&s.k);
}

// ---- IPC ----------------------------------------------------------------------------------

/// dom0 plus a server domain holding a RECV copy of dom0's endpoint at its slot 0.
struct Ipc {
    s: Sys,
    /// dom0's endpoint slot (all rights) and the endpoint.
    e: u64,
    ep: EndpointId,
    sd: DomainId,
    sdslot: u64,
    vs: VcpuId,
}

fn ipc_setup(server_prio: u8) -> Ipc {
    let mut s = boot();
    let e = s.endpoint();
    let ep = s.endpoint_id(s.d0, e);
    let (sd, sdslot) = s.create_domain("server", MIB2, server_prio);
    let (vs, vslot) = s.create_vcpu(sdslot, false);
    assert_eq!(s.copy(e, sdslot, rights::RECV, 0), Ok(0));
    assert_eq!(s.hc(s.v0, Hypercall::VcpuStart, vslot, &[]), Ok(0));
    // A higher-priority vCPU runs at once.
    assert_eq!(s.k.current, Some(if server_prio > DOM0_PRIO { vs } else { s.v0 }));
    Ipc { s, e, ep, sd, sdslot, vs }
}

impl Ipc {
    /// The server waits for a message; afterwards dom0 runs.
    fn server_waits(&mut self) {
        let vs = self.vs;
        self.s.switch(vs);
        self.s.raw(vs, Hypercall::Recv.number(), 0, 0, [0; 6]);
        assert_eq!(self.s.state(vs), VcpuState::BlockedRecv(self.ep));
        self.s.k.schedule();
        self.s.switch(self.s.v0);
    }
}

#[test]
fn call_switches_directly_to_the_server_and_reply_comes_back() {
    let mut t = ipc_setup(DOM0_PRIO);
    let (v0, vs) = (t.s.v0, t.vs);
    let badged = t.s.copy(t.e, dom0_slots::SELF_DOMAIN, rights::CALL, 0x77).unwrap();
    t.server_waits();
    assert_eq!(t.s.k.current, Some(v0));
    assert_eq!(t.s.raw(v0, Hypercall::Call.number(), badged, 6, [1, 2, 3, 4, 5, 6]), None);
    assert_eq!(t.s.k.current, Some(vs), "direct switch to the waiting server");
    assert_eq!(t.s.state(v0), VcpuState::BlockedReply(vs));
    assert_eq!(t.s.k.vcpus[vs as usize].reply_to, Some(v0));
    let r = t.s.regs(vs);
    assert_eq!((r.rax, r.rbx, r.rcx, words(&r)), (0, 0x77, 6, [1, 2, 3, 4, 5, 6]));
    assert!(t.s.pending(v0, Hypercall::Call));
    assert_eq!(t.s.k.runq.highest(), None, "nobody went through the run queue");
    check_invariants(&t.s.k);
    t.s.raw(vs, Hypercall::ReplyRecv.number(), 0, 2, [10, 20, 30, 0, 0, 0]);
    assert_eq!(t.s.k.current, Some(v0), "direct switch back to the caller");
    assert_eq!(t.s.state(vs), VcpuState::BlockedRecv(t.ep));
    let r = t.s.regs(v0);
    assert_eq!((r.rax, r.rbx, r.rcx), (0, 0, 2));
    assert_eq!(words(&r), [10, 20, 30, 0, 0, 0], "all six registers travel, RCX says how many count");
    assert_eq!(t.s.k.stats.ipc_calls, 1);
    // Unbadged capability: badge 0. Length 0.
    t.s.raw(v0, Hypercall::Call.number(), t.e, 0, [9; 6]);
    let r = t.s.regs(vs);
    assert_eq!((r.rbx, r.rcx, r.rdi), (0, 0, 9));
    t.s.raw(vs, Hypercall::ReplyRecv.number(), 0, 0, [0; 6]);
    assert_eq!(t.s.status(v0), Ok(0));
    check_invariants(&t.s.k);
}

#[test]
fn queued_callers_are_served_in_fifo_order() {
    let mut t = ipc_setup(DOM0_PRIO);
    let (v0, vs) = (t.s.v0, t.vs);
    let mut clients = vec![];
    for i in 1..=3u64 {
        let (_, dslot) = t.s.create_domain(&format!("client{i}"), MIB2, DOM0_PRIO);
        let (v, _) = t.s.create_vcpu(dslot, true);
        assert_eq!(t.s.copy(t.e, dslot, rights::CALL, i), Ok(0));
        clients.push(v);
    }
    let mine = t.s.copy(t.e, dom0_slots::SELF_DOMAIN, rights::CALL, 4).unwrap();
    // The server is busy (not receiving): everyone queues.
    for (i, &c) in clients.iter().enumerate() {
        t.s.switch(c);
        t.s.raw(c, Hypercall::Call.number(), 0, 1, args(&[100 + i as u64]));
        assert_eq!(t.s.state(c), VcpuState::BlockedSend(t.ep));
        t.s.k.schedule();
    }
    t.s.switch(v0);
    t.s.raw(v0, Hypercall::Call.number(), mine, 1, args(&[103]));
    assert_eq!(t.s.state(v0), VcpuState::BlockedSend(t.ep));
    let queued: Vec<VcpuId> = t.s.k.endpoints[t.ep as usize].senders.iter(&t.s.k.next).collect();
    assert_eq!(queued, [clients.clone(), vec![v0]].concat());
    check_invariants(&t.s.k);
    t.s.switch(vs);
    t.s.raw(vs, Hypercall::Recv.number(), 0, 0, [0; 6]);
    let mut order = vec![];
    for _ in 0..4 {
        assert_eq!(t.s.k.current, Some(vs), "the server keeps the CPU while messages wait");
        let r = t.s.regs(vs);
        assert_eq!(r.rax, 0);
        order.push((r.rbx, r.rdi));
        let reply = r.rdi + 1000;
        t.s.raw(vs, Hypercall::ReplyRecv.number(), 0, 1, args(&[reply]));
        check_invariants(&t.s.k);
    }
    assert_eq!(order, vec![(1, 100), (2, 101), (3, 102), (4, 103)]);
    assert_eq!(t.s.k.current, Some(v0), "the last caller gets the CPU back directly");
    assert_eq!(t.s.regs(v0).rdi, 1103);
    for (i, &c) in clients.iter().enumerate() {
        assert_eq!(t.s.state(c), VcpuState::Ready);
        assert_eq!((t.s.regs(c).rax, t.s.regs(c).rdi), (0, 1100 + i as u64));
    }
}

#[test]
fn long_messages_travel_through_message_pages() {
    let mut t = ipc_setup(DOM0_PRIO);
    let (d0, v0, vs, sd) = (t.s.d0, t.s.v0, t.vs, t.sd);
    assert_eq!(t.s.hc(v0, Hypercall::VcpuSetMessagePage, 0, &[PAGE_GPA]), Ok(PAGE_GPA));
    t.s.switch(vs);
    assert_eq!(t.s.hc(vs, Hypercall::VcpuSetMessagePage, 0, &[0x3000]), Ok(0x3000));
    t.server_waits();
    let extra: Vec<u64> = (0..14).map(|i| 1000 + i).collect();
    t.s.write_words(d0, PAGE_GPA, &extra);
    t.s.raw(v0, Hypercall::Call.number(), t.e, 20, [1, 2, 3, 4, 5, 6]);
    assert_eq!(t.s.k.current, Some(vs));
    let r = t.s.regs(vs);
    assert_eq!((r.rax, r.rcx, words(&r)), (0, 20, [1, 2, 3, 4, 5, 6]));
    assert_eq!(t.s.read_words(sd, 0x3000, 14), extra);
    // Reply with 10 words.
    t.s.write_words(sd, 0x3000, &[7, 8, 9, 10]);
    t.s.raw(vs, Hypercall::ReplyRecv.number(), 0, 10, [11, 12, 13, 14, 15, 16]);
    assert_eq!(t.s.k.current, Some(v0));
    let r = t.s.regs(v0);
    assert_eq!((r.rax, r.rcx, words(&r)), (0, 10, [11, 12, 13, 14, 15, 16]));
    assert_eq!(t.s.read_words(d0, PAGE_GPA, 4), vec![7, 8, 9, 10]);
    // The longest message fills the whole page.
    let full: Vec<u64> = (0..512).map(|i| i * 3 + 1).collect();
    t.s.write_words(d0, PAGE_GPA, &full);
    t.s.raw(v0, Hypercall::Call.number(), t.e, MAX_MESSAGE_WORDS as u64, [0; 6]);
    assert_eq!(t.s.regs(vs).rcx, MAX_MESSAGE_WORDS as u64);
    assert_eq!(t.s.read_words(sd, 0x3000, 512), full);
    t.s.raw(vs, Hypercall::ReplyRecv.number(), 0, MAX_MESSAGE_WORDS as u64 + 1, [0; 6]);
    assert_eq!(t.s.status(vs), Err(Error::InvalidArgument), "too long a reply");
    assert_eq!(t.s.k.current, Some(vs));
    t.s.raw(vs, Hypercall::ReplyRecv.number(), 0, 0, [0; 6]);
    assert_eq!(t.s.k.current, Some(v0));
    t.s.raw(v0, Hypercall::Call.number(), t.e, MAX_MESSAGE_WORDS as u64 + 1, [0; 6]);
    assert_eq!(t.s.status(v0), Err(Error::InvalidArgument), "too long a call");
    t.s.raw(v0, Hypercall::Call.number(), t.e, u64::MAX, [0; 6]);
    assert_eq!(t.s.status(v0), Err(Error::InvalidArgument));
    check_invariants(&t.s.k);
}

#[test]
fn long_messages_need_pages_on_both_sides() {
    let mut t = ipc_setup(DOM0_PRIO);
    let (d0, v0, vs, sd) = (t.s.d0, t.s.v0, t.vs, t.sd);
    t.server_waits();
    // The caller has no page: refused at once.
    t.s.raw(v0, Hypercall::Call.number(), t.e, REGISTER_WORDS as u64 + 1, [0; 6]);
    assert_eq!(t.s.status(v0), Err(Error::NoMessagePage));
    assert_eq!(t.s.k.current, Some(v0));
    // The waiting server has none: it fails, the caller waits for another receiver.
    t.s.hc(v0, Hypercall::VcpuSetMessagePage, 0, &[PAGE_GPA]).unwrap();
    t.s.write_words(d0, PAGE_GPA, &[42]);
    t.s.raw(v0, Hypercall::Call.number(), t.e, 7, [1, 2, 3, 4, 5, 6]);
    assert_eq!(t.s.state(v0), VcpuState::BlockedSend(t.ep));
    assert_eq!(t.s.state(vs), VcpuState::Running, "the failed receiver runs");
    assert_eq!(t.s.status(vs), Err(Error::NoMessagePage));
    check_invariants(&t.s.k);
    // With a page it takes the queued message.
    t.s.hc(vs, Hypercall::VcpuSetMessagePage, 0, &[0x5000]).unwrap();
    t.s.raw(vs, Hypercall::Recv.number(), 0, 0, [0; 6]);
    assert_eq!((t.s.regs(vs).rax, t.s.regs(vs).rcx), (0, 7));
    assert_eq!(t.s.read_words(sd, 0x5000, 1), vec![42]);
    // A long reply to a caller without a page fails the caller, the server goes on.
    t.s.k.vcpus[v0 as usize].msg_page = None;
    t.s.raw(vs, Hypercall::ReplyRecv.number(), 0, 9, [0; 6]);
    assert_eq!(t.s.status(v0), Err(Error::NoMessagePage));
    assert_eq!(t.s.state(vs), VcpuState::BlockedRecv(t.ep));
    t.s.k.schedule();
    assert_eq!(t.s.k.current, Some(v0));
    check_invariants(&t.s.k);
}

#[test]
fn recv_with_a_pending_reply_tells_the_caller_its_partner_is_gone() {
    let mut t = ipc_setup(DOM0_PRIO);
    let (v0, vs) = (t.s.v0, t.vs);
    t.server_waits();
    t.s.raw(v0, Hypercall::Call.number(), t.e, 1, [5; 6]);
    assert_eq!(t.s.k.current, Some(vs));
    t.s.raw(vs, Hypercall::Recv.number(), 0, 0, [0; 6]);
    assert_eq!(t.s.status(v0), Err(Error::PartnerGone));
    assert_eq!(t.s.state(vs), VcpuState::BlockedRecv(t.ep));
    t.s.k.schedule();
    assert_eq!(t.s.k.current, Some(v0));
    check_invariants(&t.s.k);
}

#[test]
fn freeing_an_endpoint_fails_its_waiters() {
    let mut t = ipc_setup(DOM0_PRIO);
    let (v0, vs) = (t.s.v0, t.vs);
    t.server_waits();
    // Revoke the server's copy, then delete the original: the waiting receiver fails.
    assert_eq!(t.s.hc(v0, Hypercall::CapRevoke, t.e, &[]), Ok(1));
    assert_eq!(t.s.state(vs), VcpuState::BlockedRecv(t.ep), "still referenced by dom0");
    assert_eq!(t.s.hc(v0, Hypercall::CapDelete, t.e, &[]), Ok(0));
    assert_eq!(t.s.state(vs), VcpuState::Ready);
    assert_eq!(t.s.status(vs), Err(Error::PartnerGone));
    assert_eq!(t.s.k.endpoints[t.ep as usize].refs, 0);
    check_invariants(&t.s.k);
    // A queued caller fails the same way when the last capability goes.
    let e2 = t.s.endpoint();
    let ep2 = t.s.endpoint_id(t.s.d0, e2);
    let c = t.s.copy(e2, t.sdslot, rights::CALL, 0).unwrap();
    t.s.switch(vs);
    t.s.raw(vs, Hypercall::Call.number(), c, 0, [0; 6]);
    assert_eq!(t.s.state(vs), VcpuState::BlockedSend(ep2));
    t.s.k.schedule();
    assert_eq!(t.s.k.current, Some(v0));
    assert_eq!(t.s.hc(v0, Hypercall::CapDelete, e2, &[]), Ok(0));
    assert_eq!(t.s.state(vs), VcpuState::BlockedSend(ep2));
    assert_eq!(t.s.hc(v0, Hypercall::DomainDestroy, t.sdslot, &[]), Ok(0));
    assert_eq!(t.s.k.endpoints[ep2 as usize].refs, 0);
    check_invariants(&t.s.k);
}

#[test]
fn destroying_the_server_fails_its_caller() {
    let mut t = ipc_setup(DOM0_PRIO);
    let v0 = t.s.v0;
    let (_, aslot) = t.s.create_domain("caller", MIB2, DOM0_PRIO);
    let (va, _) = t.s.create_vcpu(aslot, true);
    t.s.copy(t.e, aslot, rights::CALL, 1).unwrap();
    t.server_waits();
    t.s.switch(va);
    t.s.raw(va, Hypercall::Call.number(), 0, 0, [0; 6]);
    assert_eq!(t.s.k.current, Some(t.vs));
    assert_eq!(t.s.state(va), VcpuState::BlockedReply(t.vs));
    t.s.switch(v0);
    assert_eq!(t.s.hc(v0, Hypercall::DomainDestroy, t.sdslot, &[]), Ok(0));
    assert_eq!(t.s.state(va), VcpuState::Ready);
    assert_eq!(t.s.status(va), Err(Error::PartnerGone));
    check_invariants(&t.s.k);
}

// ---- faults and exits ---------------------------------------------------------------------

/// dom0 handles the faults of a domain with two running vCPUs.
struct Faulty {
    s: Sys,
    e: u64,
    ep: EndpointId,
    fd: DomainId,
    fdslot: u64,
    vf: [VcpuId; 2],
}

fn faulty(handler: bool) -> Faulty {
    let mut s = boot();
    let e = s.endpoint();
    let ep = s.endpoint_id(s.d0, e);
    let (fd, fdslot) = s.create_domain("faulty", MIB2, DOM0_PRIO);
    let (a, _) = s.create_vcpu(fdslot, true);
    let (b, _) = s.create_vcpu(fdslot, true);
    if handler {
        assert_eq!(s.hc(s.v0, Hypercall::DomainSetFaultEndpoint, fdslot, &[e, 0xf00]), Ok(e));
        assert_eq!(s.k.domains[fd as usize].fault_handler, Some((ep, 0xf00)));
        assert_eq!(s.k.endpoints[ep as usize].refs, 2, "the handler holds a reference");
    }
    Faulty { s, e, ep, fd, fdslot, vf: [a, b] }
}

#[test]
fn faults_reach_the_handler_and_resume_or_stop() {
    let mut f = faulty(true);
    let (v0, vf) = (f.s.v0, f.vf[1]);
    // No handler waiting: the fault message queues.
    f.s.switch(vf);
    f.s.k.vcpus[vf as usize].regs = Regs { rip: 0xdead0, rax: 77, rcx: 3, rdi: 4, r15: 5, ..Regs::default() };
    let before = f.s.regs(vf);
    let fault = PendingExit::new(ExitKind::Stage2, 0x4000_1000, 5);
    assert!(f.s.k.exit(&mut f.s.p, vf, fault));
    assert_eq!(f.s.state(vf), VcpuState::BlockedSend(f.ep));
    check_invariants(&f.s.k);
    f.s.switch(v0);
    f.s.raw(v0, Hypercall::Recv.number(), f.e, 0, [0; 6]);
    assert_eq!(f.s.k.current, Some(v0));
    assert_eq!(f.s.state(vf), VcpuState::BlockedFault(v0));
    let r = f.s.regs(v0);
    assert_eq!((r.rax, r.rbx, r.rcx), (0, 0xf00, 6), "no message page: no state");
    assert_eq!(words(&r), [ExitKind::Stage2 as u64 | 1 << 8, 0xdead0, 0x4000_1000, 5, 77, 0]);
    check_invariants(&f.s.k);
    // Resume: the vCPU goes on with its registers untouched.
    f.s.raw(v0, Hypercall::ReplyRecv.number(), f.e, 1, ExitReply::RETRY.encode());
    assert_eq!(f.s.k.current, Some(vf));
    assert_eq!(f.s.regs(vf), before);
    assert_eq!(f.s.k.vcpus[vf as usize].exit, None);
    assert_eq!(f.s.state(v0), VcpuState::BlockedRecv(f.ep));
    // Again, with the handler waiting: straight to it.
    let fault = PendingExit::new(ExitKind::Exception, 13, 0x18);
    assert!(f.s.k.exit(&mut f.s.p, vf, fault));
    assert_eq!(f.s.k.current, Some(v0));
    let r = f.s.regs(v0);
    assert_eq!(words(&r), [ExitKind::Exception as u64 | 1 << 8, 0xdead0, 13, 0x18, 77, 0]);
    // Stop.
    f.s.raw(v0, Hypercall::ReplyRecv.number(), f.e, 1, ExitReply::STOP.encode());
    assert_eq!(f.s.state(vf), VcpuState::Stopped);
    assert_eq!(f.s.state(v0), VcpuState::BlockedRecv(f.ep));
    f.s.k.schedule();
    assert_eq!(f.s.k.current, Some(f.vf[0]), "the other vCPU goes on");
    check_invariants(&f.s.k);
}

#[test]
fn a_fault_without_handler_stops_the_vcpu() {
    let mut f = faulty(false);
    let vf = f.vf[0];
    f.s.switch(vf);
    assert!(!f.s.k.exit(&mut f.s.p, vf, PendingExit::new(ExitKind::Shutdown, 0, 0)));
    assert_eq!(f.s.state(vf), VcpuState::Stopped);
    assert_eq!(f.s.k.current, None);
    assert_eq!(f.s.state(f.vf[1]), VcpuState::Ready, "only the faulting vCPU stops");
    f.s.k.schedule();
    check_invariants(&f.s.k);
}

#[test]
fn domain_exit_without_handler_stops_the_domain() {
    let mut f = faulty(false);
    let vf = f.vf[0];
    f.s.switch(vf);
    f.s.k.write_ram(&mut f.s.p, f.fd, BUF_GPA, b"bye").unwrap();
    assert_eq!(f.s.hc(vf, Hypercall::ConsoleWrite, 0, &[BUF_GPA, 3]), Ok(BUF_GPA));
    assert!(f.s.p.lines_of("faulty").is_empty());
    let ev = f.s.raw(vf, Hypercall::DomainExit.number(), 0, 0, args(&[7]));
    assert_eq!(ev, Some(Event::Exited { domain: f.fd, status: 7, handled: false }));
    assert_eq!(f.s.p.lines_of("faulty"), vec!["bye"], "console flushed");
    assert_eq!(f.s.state(f.vf[0]), VcpuState::Stopped);
    assert_eq!(f.s.state(f.vf[1]), VcpuState::Stopped);
    assert_eq!(f.s.k.current, Some(f.s.v0));
    assert_eq!(f.s.k.domains[f.fd as usize].state, DomainState::Alive, "kept for inspection");
    check_invariants(&f.s.k);
    // dom0 can still destroy it.
    assert_eq!(f.s.hc(f.s.v0, Hypercall::DomainDestroy, f.fdslot, &[]), Ok(0));
    check_invariants(&f.s.k);
    // The last domain exiting leaves nothing alive.
    let v0 = f.s.v0;
    assert_eq!(
        f.s.raw(v0, Hypercall::DomainExit.number(), 0, 0, [0; 6]),
        Some(Event::Exited { domain: f.s.d0, status: 0, handled: false })
    );
    assert!(!f.s.k.any_alive());
    assert_eq!(f.s.k.current, None);
}

#[test]
fn domain_exit_with_handler_is_a_fault_message() {
    let mut f = faulty(true);
    let (v0, vf) = (f.s.v0, f.vf[1]);
    f.s.raw(v0, Hypercall::Recv.number(), f.e, 0, [0; 6]);
    f.s.k.schedule();
    f.s.switch(vf);
    f.s.k.vcpus[vf as usize].regs.rip = 0x1234;
    let ev = f.s.raw(vf, Hypercall::DomainExit.number(), 0, 0, args(&[3]));
    assert_eq!(ev, Some(Event::Exited { domain: f.fd, status: 3, handled: true }));
    assert_eq!(f.s.k.current, Some(v0));
    let r = f.s.regs(v0);
    assert_eq!((r.rbx, r.rcx), (0xf00, 6));
    assert_eq!(words(&r)[..4], [ExitKind::Exited as u64 | 1 << 8, 0x1234, 0, 3]);
    assert_eq!(f.s.state(f.vf[0]), VcpuState::Ready);
    check_invariants(&f.s.k);
}

#[test]
fn setting_a_fault_endpoint_replaces_the_old_one() {
    let mut f = faulty(true);
    let v0 = f.s.v0;
    let e2 = f.s.endpoint();
    let ep2 = f.s.endpoint_id(f.s.d0, e2);
    assert_eq!(f.s.hc(v0, Hypercall::DomainSetFaultEndpoint, f.fdslot, &[e2, 1]), Ok(e2));
    assert_eq!(f.s.k.endpoints[f.ep as usize].refs, 1);
    assert_eq!(f.s.k.endpoints[ep2 as usize].refs, 2);
    let call_only = f.s.copy(e2, dom0_slots::SELF_DOMAIN, rights::CALL, 0).unwrap();
    assert_eq!(f.s.hc(v0, Hypercall::DomainSetFaultEndpoint, f.fdslot, &[call_only, 2]), Ok(call_only));
    check_invariants(&f.s.k);
}

#[test]
fn destroying_a_domain_releases_its_fault_endpoint() {
    let mut f = faulty(true);
    let v0 = f.s.v0;
    assert_eq!(f.s.hc(v0, Hypercall::DomainDestroy, f.fdslot, &[]), Ok(0));
    assert_eq!(f.s.k.endpoints[f.ep as usize].refs, 1, "only dom0's capability is left");
    assert_eq!(f.s.hc(v0, Hypercall::CapDelete, f.e, &[]), Ok(0));
    assert_eq!(f.s.k.endpoints[f.ep as usize].refs, 0, "the endpoint is free again");
    check_invariants(&f.s.k);
}

#[test]
fn shutdown_needs_the_machine_capability() {
    let mut s = boot();
    let v0 = s.v0;
    assert_eq!(s.raw(v0, Hypercall::Shutdown.number(), dom0_slots::MACHINE, 0, args(&[3])), Some(Event::PowerOff(3)));
    assert_eq!(s.hc(v0, Hypercall::Shutdown, dom0_slots::MEMORY, &[0]), Err(Error::WrongType));
    assert_eq!(s.hc(v0, Hypercall::Shutdown, 40, &[0]), Err(Error::InvalidSlot));
    let weak = s.copy(dom0_slots::MEMORY, dom0_slots::SELF_DOMAIN, rights::GRANT, 0).unwrap();
    assert_eq!(s.hc(v0, Hypercall::Shutdown, weak, &[0]), Err(Error::PermissionDenied));
}

// ---- notifications ------------------------------------------------------------------------

/// dom0's notification, a waiter domain holding WAIT at slot 0 and a badged SIGNAL at slot 1.
struct Ntf {
    s: Sys,
    n: u64,
    nid: NotificationId,
    vw: VcpuId,
}

fn ntf_setup(prio: u8) -> Ntf {
    let mut s = boot();
    let n = s.notification();
    let nid = s.notification_id(s.d0, n);
    let (_, dslot) = s.create_domain("waiter", MIB2, prio);
    let (vw, vslot) = s.create_vcpu(dslot, false);
    assert_eq!(s.copy(n, dslot, rights::WAIT, 0), Ok(0));
    assert_eq!(s.copy(n, dslot, rights::SIGNAL, 0x40), Ok(1));
    assert_eq!(s.hc(s.v0, Hypercall::VcpuStart, vslot, &[]), Ok(0));
    Ntf { s, n, nid, vw }
}

#[test]
fn signal_wait_poll() {
    let mut t = ntf_setup(DOM0_PRIO);
    let (v0, vw, n, nid) = (t.s.v0, t.vw, t.n, t.nid);
    assert_eq!(t.s.hc(v0, Hypercall::Signal, n, &[0b1]), Ok(0b1));
    assert_eq!(t.s.k.notifications[nid as usize].bits, 1);
    assert_eq!(t.s.hc(v0, Hypercall::Signal, n, &[0b100]), Ok(0b100));
    assert_eq!(t.s.hc(v0, Hypercall::Poll, n, &[]), Ok(0b101));
    assert_eq!(t.s.hc(v0, Hypercall::Poll, n, &[]), Ok(0));
    // A waiter blocks and is woken with the bits.
    t.s.switch(vw);
    t.s.raw(vw, Hypercall::Wait.number(), 0, 0, [0; 6]);
    assert_eq!(t.s.state(vw), VcpuState::BlockedWait(nid));
    assert_eq!(t.s.k.notifications[nid as usize].waiter, Some(vw));
    t.s.k.schedule();
    assert_eq!(t.s.k.current, Some(v0));
    check_invariants(&t.s.k);
    assert_eq!(t.s.hc(v0, Hypercall::Signal, n, &[0b110]), Ok(0b110));
    assert_eq!(t.s.state(vw), VcpuState::Running, "equal priority: the waiter runs at once (notify.rs fast path)");
    assert_eq!(t.s.state(v0), VcpuState::Ready, "the signaller stays ready");
    assert_eq!((t.s.regs(vw).rax, t.s.regs(vw).rdi), (0, 0b110));
    assert_eq!(t.s.k.notifications[nid as usize].bits, 0, "the waiter took them");
    assert_eq!(t.s.k.notifications[nid as usize].waiter, None);
    t.s.switch(v0);
    // Bits already there: Wait returns at once.
    t.s.hc(v0, Hypercall::Signal, n, &[0b1000]).unwrap();
    t.s.switch(vw);
    assert_eq!(t.s.hc(vw, Hypercall::Wait, 0, &[]), Ok(0b1000));
    assert_eq!(t.s.k.current, Some(vw));
    // Signal with bits 0 sends the badge.
    assert_eq!(t.s.hc(vw, Hypercall::Signal, 1, &[0]), Ok(0));
    assert_eq!(t.s.hc(vw, Hypercall::Poll, 0, &[]), Ok(0x40));
    // An unbadged capability signals bit 0.
    t.s.switch(v0);
    assert_eq!(t.s.hc(v0, Hypercall::Signal, n, &[0]), Ok(0));
    assert_eq!(t.s.hc(v0, Hypercall::Poll, n, &[]), Ok(1));
    // Rights.
    t.s.switch(vw);
    assert_eq!(t.s.hc(vw, Hypercall::Signal, 0, &[1]), Err(Error::PermissionDenied));
    assert_eq!(t.s.hc(vw, Hypercall::Wait, 1, &[]), Err(Error::PermissionDenied));
    assert_eq!(t.s.hc(vw, Hypercall::Poll, 1, &[]), Err(Error::PermissionDenied));
    assert_eq!(t.s.hc(vw, Hypercall::Wait, 2, &[]), Err(Error::InvalidSlot));
    // One waiter at a time.
    t.s.raw(vw, Hypercall::Wait.number(), 0, 0, [0; 6]);
    t.s.k.schedule();
    assert_eq!(t.s.hc(v0, Hypercall::Wait, n, &[]), Err(Error::InvalidState));
    assert_eq!(t.s.k.current, Some(v0));
    assert_eq!(t.s.k.stats.signals, 6);
    check_invariants(&t.s.k);
}

#[test]
fn bound_notification_interrupts_and_wakes_a_halted_vcpu() {
    let mut t = ntf_setup(DOM0_PRIO);
    let (v0, vw, n, nid) = (t.s.v0, t.vw, t.n, t.nid);
    t.s.switch(vw);
    assert_eq!(t.s.hc(vw, Hypercall::NotificationBind, 0, &[31]), Err(Error::InvalidArgument));
    assert_eq!(t.s.hc(vw, Hypercall::NotificationBind, 0, &[256]), Err(Error::InvalidArgument));
    assert_eq!(t.s.hc(vw, Hypercall::NotificationBind, 0, &[u64::MAX]), Err(Error::InvalidArgument));
    assert_eq!(t.s.hc(vw, Hypercall::NotificationBind, 1, &[40]), Err(Error::PermissionDenied));
    assert_eq!(t.s.hc(vw, Hypercall::NotificationBind, 0, &[40]), Ok(40));
    assert_eq!(t.s.k.notifications[nid as usize].bound, Some((vw, 40)));
    t.s.k.halt(vw);
    assert_eq!(t.s.state(vw), VcpuState::Halted);
    assert_eq!(t.s.k.current, Some(v0));
    check_invariants(&t.s.k);
    assert_eq!(t.s.hc(v0, Hypercall::Signal, n, &[1]), Ok(1));
    assert_eq!(t.s.state(vw), VcpuState::Running, "left HLT, and runs at once (equal priority)");
    assert_eq!(t.s.state(v0), VcpuState::Ready, "the signaller stays ready");
    assert_eq!(t.s.k.notifications[nid as usize].bits, 1, "bits stay for a poll");
    assert!(t.s.k.vcpus[vw as usize].has_irq());
    assert_eq!(t.s.k.vcpus[vw as usize].take_irq(), Some(40));
    assert_eq!(t.s.k.vcpus[vw as usize].take_irq(), None);
    // HLT with an interrupt pending does not halt.
    t.s.switch(vw);
    t.s.hc(vw, Hypercall::Signal, 1, &[0]).unwrap();
    t.s.k.halt(vw);
    assert_eq!(t.s.state(vw), VcpuState::Running);
    // Vector 255, the highest.
    assert_eq!(t.s.hc(vw, Hypercall::NotificationBind, 0, &[255]), Ok(255));
    t.s.k.vcpus[vw as usize].pending_irqs = [0; 4];
    t.s.hc(vw, Hypercall::Signal, 1, &[0]).unwrap();
    assert_eq!(t.s.k.vcpus[vw as usize].take_irq(), Some(255));
    // A waiter takes the signal instead of the bound vCPU.
    t.s.switch(v0);
    t.s.hc(v0, Hypercall::Poll, n, &[]).unwrap();
    t.s.raw(v0, Hypercall::Wait.number(), n, 0, [0; 6]);
    t.s.k.schedule();
    t.s.hc(vw, Hypercall::Signal, 1, &[0]).unwrap();
    assert_eq!(t.s.regs(v0).rdi, 0x40);
    assert!(!t.s.k.vcpus[vw as usize].has_irq());
    check_invariants(&t.s.k);
}

#[test]
fn timers_fire_on_tick_after_their_deadline() {
    let mut t = ntf_setup(DOM0_PRIO);
    let (v0, vw, n, nid) = (t.s.v0, t.vw, t.n, t.nid);
    t.s.p.now = 5000;
    assert_eq!(t.s.hc(v0, Hypercall::TimerSet, n, &[1000, 0x10]), Ok(1000));
    assert_eq!(t.s.k.notifications[nid as usize].timer, Some((6000, 0x10)));
    assert_eq!(t.s.k.next_deadline(), Some(6000));
    t.s.switch(vw);
    t.s.raw(vw, Hypercall::Wait.number(), 0, 0, [0; 6]);
    t.s.k.schedule();
    t.s.k.tick(5999);
    assert_eq!(t.s.state(vw), VcpuState::BlockedWait(nid));
    t.s.k.tick(6000);
    assert_eq!(t.s.state(vw), VcpuState::Ready);
    assert_eq!(t.s.regs(vw).rdi, 0x10);
    assert_eq!(t.s.k.notifications[nid as usize].timer, None, "one-shot");
    assert_eq!(t.s.k.next_deadline(), None);
    // Bits 0 signal bit 0; 0 ns cancels; a huge delay saturates.
    assert_eq!(t.s.hc(v0, Hypercall::TimerSet, n, &[10, 0]), Ok(10));
    assert_eq!(t.s.k.notifications[nid as usize].timer, Some((5010, 1)));
    assert_eq!(t.s.hc(v0, Hypercall::TimerSet, n, &[0, 0]), Ok(0));
    assert_eq!(t.s.k.notifications[nid as usize].timer, None);
    assert_eq!(t.s.hc(v0, Hypercall::TimerSet, n, &[u64::MAX, 2]), Ok(u64::MAX));
    assert_eq!(t.s.k.next_deadline(), Some(u64::MAX));
    assert_eq!(t.s.hc(v0, Hypercall::TimerSet, n, &[0, 0]), Ok(0));
    // Fire when nobody waits: the bits wait for a poll.
    assert_eq!(t.s.hc(v0, Hypercall::TimerSet, n, &[1, 0x8]), Ok(1));
    t.s.k.tick(1 << 40);
    assert_eq!(t.s.hc(v0, Hypercall::Poll, n, &[]), Ok(0x8));
    // Timers need WAIT.
    t.s.switch(vw);
    assert_eq!(t.s.hc(vw, Hypercall::TimerSet, 1, &[1, 1]), Err(Error::PermissionDenied));
    check_invariants(&t.s.k);
}

// ---- scheduling ---------------------------------------------------------------------------

#[test]
fn higher_priority_preempts_on_wake_lower_does_not() {
    let mut t = ntf_setup(150);
    let (v0, vw, n) = (t.s.v0, t.vw, t.n);
    assert_eq!(t.s.k.current, Some(vw), "started at a higher priority: runs at once");
    assert_eq!(t.s.state(v0), VcpuState::Ready);
    assert_eq!(t.s.status(v0), Ok(t.s.regs(v0).rdi), "VcpuStart's status was written");
    t.s.raw(vw, Hypercall::Wait.number(), 0, 0, [0; 6]);
    assert_eq!(t.s.k.current, Some(v0));
    assert_eq!(t.s.hc(v0, Hypercall::Signal, n, &[1]), Ok(1));
    assert_eq!(t.s.k.current, Some(vw), "the woken vCPU preempts");
    assert_eq!(t.s.state(v0), VcpuState::Ready);
    // Ticks never hand the CPU to a lower priority.
    for i in 0..3 * TIME_SLICE_TICKS as u64 {
        t.s.k.tick(i);
        assert_eq!(t.s.k.current, Some(vw));
    }
    // A lower-priority vCPU becoming ready does not preempt.
    t.s.raw(vw, Hypercall::Wait.number(), 0, 0, [0; 6]);
    assert_eq!(t.s.k.current, Some(v0));
    let (_, lslot) = t.s.create_domain("low", MIB2, 50);
    let (vl, _) = t.s.create_vcpu(lslot, true);
    assert_eq!(t.s.state(vl), VcpuState::Ready);
    assert_eq!(t.s.k.current, Some(v0));
    assert_eq!(t.s.hc(v0, Hypercall::Yield, 0, &[]), Ok(0));
    assert_eq!(t.s.k.current, Some(v0), "yield only to equal or higher priority");
    // The low one runs only when everything above blocks.
    let n2 = t.s.notification();
    t.s.raw(v0, Hypercall::Wait.number(), n2, 0, [0; 6]);
    assert_eq!(t.s.k.current, Some(vl));
    check_invariants(&t.s.k);
}

#[test]
fn equal_priorities_rotate_every_time_slice() {
    let mut s = boot();
    let v0 = s.v0;
    let n = s.notification();
    let (_, aslot) = s.create_domain("a", MIB2, DOM0_PRIO);
    let (_, bslot) = s.create_domain("b", MIB2, DOM0_PRIO);
    let (va, _) = s.create_vcpu(aslot, true);
    let (vb, _) = s.create_vcpu(bslot, true);
    s.raw(v0, Hypercall::Wait.number(), n, 0, [0; 6]);
    assert_eq!(s.k.current, Some(va));
    // Both spin; record who runs after every tick.
    let mut seq = vec![];
    for i in 0..40u64 {
        s.k.tick(i * 1000);
        seq.push(s.k.current.unwrap());
        check_invariants(&s.k);
    }
    let runs: Vec<(VcpuId, usize)> = seq.chunk_by(|a, b| a == b).map(|c| (c[0], c.len())).collect();
    assert!(runs.len() >= 7, "{runs:?}");
    assert!(runs.iter().all(|&(_, len)| len <= TIME_SLICE_TICKS as usize), "a vCPU kept the CPU too long: {runs:?}");
    assert!(seq.iter().filter(|&&v| v == va).count() >= 15, "{runs:?}");
    assert!(seq.iter().filter(|&&v| v == vb).count() >= 15, "{runs:?}");
    // Waking dom0 (equal priority) puts it in the rotation too.
    s.k.signal_object(s.notification_id(s.d0, n), 1);
    assert_eq!(s.state(v0), VcpuState::Ready);
    let mut seen = HashSet::new();
    for i in 0..15u64 {
        s.k.tick(100_000 + i);
        seen.insert(s.k.current.unwrap());
    }
    assert_eq!(seen, HashSet::from([v0, va, vb]));
}

#[test]
fn yield_passes_the_cpu_to_an_equal_priority() {
    let mut s = boot();
    let v0 = s.v0;
    let n = s.notification();
    let (_, aslot) = s.create_domain("a", MIB2, DOM0_PRIO);
    let (_, bslot) = s.create_domain("b", MIB2, DOM0_PRIO);
    let (va, _) = s.create_vcpu(aslot, true);
    let (vb, _) = s.create_vcpu(bslot, true);
    s.raw(v0, Hypercall::Wait.number(), n, 0, [0; 6]);
    assert_eq!(s.k.current, Some(va));
    assert_eq!(s.hc(va, Hypercall::Yield, 0, &[]), Ok(0));
    assert_eq!(s.k.current, Some(vb));
    assert_eq!(s.state(va), VcpuState::Ready);
    assert_eq!(s.hc(vb, Hypercall::Yield, 0, &[]), Ok(0));
    assert_eq!(s.k.current, Some(va));
    // HLT of a vCPU that is not running changes nothing.
    s.k.halt(vb);
    assert_eq!(s.state(vb), VcpuState::Ready);
    assert_eq!(s.hc(va, Hypercall::Yield, 0, &[]), Ok(0));
    assert_eq!(s.k.current, Some(vb));
    s.k.halt(vb);
    assert_eq!(s.state(vb), VcpuState::Halted);
    assert_eq!(s.k.current, Some(va));
    assert_eq!(s.hc(va, Hypercall::Yield, 0, &[]), Ok(0));
    assert_eq!(s.k.current, Some(va), "alone: keeps running");
    check_invariants(&s.k);
}

// ---- wake-ups in the middle of an IPC operation -------------------------------------------

/// A caller of higher priority than its server is woken (with an error) while the server
/// goes on to wait: the server, not the caller, must end up waiting.
#[test]
fn recv_dropping_a_higher_priority_caller() {
    let mut t = ipc_setup(50);
    let (v0, vs) = (t.s.v0, t.vs);
    t.server_waits();
    t.s.raw(v0, Hypercall::Call.number(), t.e, 0, [0; 6]);
    assert_eq!(t.s.k.current, Some(vs), "direct switch even to a lower priority");
    t.s.raw(vs, Hypercall::Recv.number(), 0, 0, [0; 6]);
    check_invariants(&t.s.k);
    assert_eq!(t.s.state(vs), VcpuState::BlockedRecv(t.ep));
    t.s.k.schedule();
    assert_eq!(t.s.k.current, Some(v0));
    assert_eq!(t.s.status(v0), Err(Error::PartnerGone));
}

#[test]
fn reply_failing_for_a_higher_priority_caller() {
    let mut t = ipc_setup(50);
    let (v0, vs) = (t.s.v0, t.vs);
    t.s.switch(vs);
    t.s.hc(vs, Hypercall::VcpuSetMessagePage, 0, &[0x3000]).unwrap();
    t.server_waits();
    t.s.raw(v0, Hypercall::Call.number(), t.e, 0, [0; 6]);
    assert_eq!(t.s.k.current, Some(vs));
    // A long reply to a caller without a message page.
    t.s.raw(vs, Hypercall::ReplyRecv.number(), 0, 7, [0; 6]);
    check_invariants(&t.s.k);
    assert_eq!(t.s.state(vs), VcpuState::BlockedRecv(t.ep));
    assert_eq!(t.s.k.current, Some(v0));
    assert_eq!(t.s.status(v0), Err(Error::NoMessagePage));
}

#[test]
fn call_failing_a_higher_priority_receiver() {
    let mut t = ipc_setup(150);
    let (v0, vs) = (t.s.v0, t.vs);
    // The (higher-priority) server waits without a message page; dom0 sends a long message.
    t.s.raw(vs, Hypercall::Recv.number(), 0, 0, [0; 6]);
    t.s.k.schedule();
    assert_eq!(t.s.k.current, Some(v0));
    t.s.hc(v0, Hypercall::VcpuSetMessagePage, 0, &[PAGE_GPA]).unwrap();
    t.s.raw(v0, Hypercall::Call.number(), t.e, 7, [0; 6]);
    check_invariants(&t.s.k);
    assert_eq!(t.s.state(v0), VcpuState::BlockedSend(t.ep));
    assert_eq!(t.s.k.current, Some(vs), "the failed receiver has the higher priority");
    assert_eq!(t.s.status(vs), Err(Error::NoMessagePage));
}

#[test]
fn recv_failing_a_higher_priority_sender() {
    let mut t = ipc_setup(50);
    let (v0, vs) = (t.s.v0, t.vs);
    // dom0 (higher priority) queues a long message; the server has no message page.
    t.s.hc(v0, Hypercall::VcpuSetMessagePage, 0, &[PAGE_GPA]).unwrap();
    t.s.raw(v0, Hypercall::Call.number(), t.e, 7, [0; 6]);
    assert_eq!(t.s.state(v0), VcpuState::BlockedSend(t.ep));
    assert_eq!(t.s.k.current, Some(vs));
    t.s.raw(vs, Hypercall::Recv.number(), 0, 0, [0; 6]);
    check_invariants(&t.s.k);
    assert_eq!(t.s.state(vs), VcpuState::BlockedRecv(t.ep));
    t.s.k.schedule();
    assert_eq!(t.s.k.current, Some(v0));
    assert_eq!(t.s.status(v0), Err(Error::NoMessagePage));
}

/// A server stopped by its fault handler while it owed a reply: once its domain is
/// destroyed, the caller must learn that its partner is gone (not wait forever).
#[test]
fn caller_of_a_server_stopped_after_a_fault_is_released() {
    let mut s = boot();
    let v0 = s.v0;
    let e = s.endpoint();
    let fe = s.endpoint();
    let n = s.notification();
    let nid = s.notification_id(s.d0, n);
    let (sd, sdslot) = s.create_domain("server", MIB2, DOM0_PRIO);
    let (vs, _) = s.create_vcpu(sdslot, true);
    let (_, hslot) = s.create_domain("handler", MIB2, DOM0_PRIO);
    let (vh, _) = s.create_vcpu(hslot, true);
    assert_eq!(s.copy(e, sdslot, rights::RECV, 0), Ok(0));
    assert_eq!(s.copy(n, sdslot, rights::WAIT, 0), Ok(1));
    assert_eq!(s.copy(fe, hslot, rights::RECV, 0), Ok(0));
    s.hc(v0, Hypercall::DomainSetFaultEndpoint, sdslot, &[fe, 1]).unwrap();
    // The handler waits for faults; the server binds a notification and waits for calls.
    s.switch(vh);
    s.raw(vh, Hypercall::Recv.number(), 0, 0, [0; 6]);
    s.k.schedule();
    s.switch(vs);
    assert_eq!(s.hc(vs, Hypercall::NotificationBind, 1, &[33]), Ok(33));
    s.raw(vs, Hypercall::Recv.number(), 0, 0, [0; 6]);
    s.k.schedule();
    assert_eq!(s.k.current, Some(v0));
    s.raw(v0, Hypercall::Call.number(), e, 0, [0; 6]);
    assert_eq!(s.k.current, Some(vs));
    // The server faults while it owes dom0 a reply; the handler stops it.
    assert!(s.k.exit(&mut s.p, vs, PendingExit::new(ExitKind::Stage2, 0, 0)));
    assert_eq!(s.k.current, Some(vh));
    s.raw(vh, Hypercall::ReplyRecv.number(), 0, 1, ExitReply::STOP.encode());
    assert_eq!(s.state(vs), VcpuState::Stopped);
    check_invariants(&s.k);
    // dom0 may wait while the stopped server is inspected; destroying it must free dom0.
    s.k.domain_destroy(&mut s.p, sd);
    check_invariants(&s.k);
    assert_eq!(s.state(v0), VcpuState::Ready);
    assert_eq!(s.status(v0), Err(Error::PartnerGone));
    assert_eq!(s.k.notifications[nid as usize].bound, None, "no binding to a freed vCPU");
}

// ---- property tests -----------------------------------------------------------------------

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
                let nr = [6, 7, 8, 9, 27, 1000, u64::MAX][a as usize % 7];
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

// ---- VMs: exits to a VMM, and what a VMM may do ---------------------------------------------

/// dom0 is the VMM of a VM with one running vCPU; its exits arrive on endpoint `e`.
struct VmSys {
    s: Sys,
    e: u64,
    vm: DomainId,
    vmslot: u64,
    vcpuslot: u64,
    v: VcpuId,
}

fn vm_sys(extra_state: u16) -> VmSys {
    let mut s = boot();
    let e = s.endpoint();
    s.k.write_ram(&mut s.p, s.d0, NAME_GPA, b"vm").unwrap();
    let args = [MIB2, DOM0_PRIO as u64 - 10, NAME_GPA, 2, ipc_spec::hypercall::domain_flags::VM];
    let vmslot = s.hc(s.v0, Hypercall::DomainCreate, dom0_slots::MEMORY, &args).unwrap();
    assert_eq!(s.cap(s.d0, vmslot).rights, rights::CONTROL | rights::VMM | rights::GRANT);
    let Object::Domain(vm, _) = s.cap(s.d0, vmslot).object else { panic!() };
    assert!(s.k.domains[vm as usize].vm);
    s.hc(s.v0, Hypercall::DomainSetFaultEndpoint, vmslot, &[e, 0x77, extra_state as u64]).unwrap();
    let (v, vcpuslot) = s.create_vcpu(vmslot, true);
    assert!(s.k.vcpus[v as usize].vm);
    assert!(s.p.boots.last().unwrap().1.vm);
    VmSys { s, e, vm, vmslot, vcpuslot, v }
}

impl VmSys {
    /// The VM's vCPU runs and exits with `x`; dom0 (waiting in Recv) gets the message.
    fn exit(&mut self, x: PendingExit) -> Regs {
        let (v0, v) = (self.s.v0, self.v);
        if self.s.k.current == Some(v0) {
            self.s.raw(v0, Hypercall::Recv.number(), self.e, 0, [0; 6]);
        }
        self.s.k.schedule();
        self.s.switch(v);
        assert!(self.s.k.exit(&mut self.s.p, v, x));
        assert_eq!(self.s.k.current, Some(v0));
        assert_eq!(self.s.state(v), VcpuState::BlockedFault(v0));
        self.s.regs(v0)
    }

    fn reply(&mut self, r: ExitReply) -> Result<u64, Error> {
        let v0 = self.s.v0;
        self.s.raw(v0, Hypercall::ReplyRecv.number(), self.e, 6, r.encode());
        if self.s.k.current == Some(v0) {
            return self.s.status(v0);
        }
        Ok(0)
    }
}

#[test]
fn an_exit_message_carries_its_facts_and_the_state_groups_asked_for() {
    let mut t = vm_sys(ipc_spec::exit::state::DT);
    let v = t.v;
    t.s.k.vcpus[v as usize].regs = Regs { rip: 0x1000, rax: 0xaa, r9: 9, rsp: 0x8000, ..Regs::default() };
    t.s.p.hw.insert(v, ArchState { cr3: 0x5000, gdtr: (0x6000, 0x27), ..ArchState::default() });
    // Without a message page: registers only, no state.
    let r = t.exit(PendingExit { kind: ExitKind::Io, insn_len: 2, a: 0x80 | 1 << 16 | 1 << 24, b: 0xaa });
    assert_eq!((r.rbx, r.rcx), (0x77, 6));
    let m = ipc_spec::exit::ExitMessage::decode(&words(&r)).unwrap();
    assert_eq!((m.kind, m.insn_len, m.state, m.rip, m.rax, m.b), (ExitKind::Io, 2, 0, 0x1000, 0xaa, 0xaa));
    assert_eq!(m.io().unwrap().port, 0x80);
    assert_eq!(t.reply(ExitReply::NEXT), Ok(0));
    assert_eq!(t.s.regs(v).rip, 0x1002, "advanced by the exit's length");
    // With one: a stage-2 exit brings GPR, RIP, CR, SEG, plus the DT group dom0 asked for.
    let v0 = t.s.v0;
    t.s.k.vcpus[v0 as usize].msg_page = t.s.k.domains[t.s.d0 as usize].ram_hpa(PAGE_GPA);
    let r = t.exit(PendingExit::new(ExitKind::Stage2, 0xfe00_0000, ipc_spec::exit::access::WRITE));
    assert_eq!(r.rcx, ipc_spec::exit::MESSAGE_WORDS_WITH_STATE as u64);
    let m = ipc_spec::exit::ExitMessage::decode(&words(&r)).unwrap();
    use ipc_spec::exit::{at, state};
    assert_eq!(m.state, state::GPR | state::RIP | state::CR | state::SEG | state::DT);
    assert_eq!(m.stage2(), Some((0xfe00_0000, ipc_spec::exit::access::WRITE)));
    let page = t.s.read_words(t.s.d0, PAGE_GPA, ipc_spec::exit::STATE_WORDS);
    assert_eq!((page[at::GPR], page[at::GPR + 9], page[at::GPR + 4]), (0xaa, 9, 0x8000));
    assert_eq!((page[at::RIP], page[at::CR3], page[at::GDTR]), (0x1002, 0x5000, 0x6000));
    assert_eq!(page[at::EVENT], 0, "a group not asked for is zero");
    check_invariants(&t.s.k);
}

#[test]
fn every_reply_path_acts_on_the_vcpu() {
    use ipc_spec::exit::{at, set, state, Event};
    let mut t = vm_sys(0);
    let (v0, v) = (t.s.v0, t.v);
    t.s.hc(v0, Hypercall::VcpuSetMessagePage, 0, &[PAGE_GPA]).unwrap();
    t.s.k.vcpus[v as usize].regs = Regs { rip: 0x2000, rbx: 1, r12: 12, ..Regs::default() };
    // CPUID: four registers set, RIP advanced.
    t.exit(PendingExit { kind: ExitKind::Cpuid, insn_len: 2, a: 0, b: 0 });
    assert_eq!(t.reply(ExitReply::next_with(set::RAX | set::RCX | set::RDX | set::RBX, [1, 2, 3, 4])), Ok(0));
    let r = t.s.regs(v);
    assert_eq!((r.rax, r.rcx, r.rdx, r.rbx, r.rip), (1, 2, 3, 4, 0x2002));
    assert_eq!(t.s.p.completed.last(), Some(&v));
    // MMIO with an explicit length and a register set through the state page.
    t.exit(PendingExit::new(ExitKind::Stage2, 0xfe00_0000, 0));
    let mut page = t.s.read_words(t.s.d0, PAGE_GPA, ipc_spec::exit::STATE_WORDS);
    page[at::GPR + 12] = 0x1212;
    page[at::CR0] = 0x8000_0011;
    t.s.write_words(t.s.d0, PAGE_GPA, &page);
    let r = ExitReply { advance_by: 3, write_state: state::GPR | state::CR, ..ExitReply::NEXT };
    assert_eq!(t.reply(r), Ok(0));
    assert_eq!((t.s.regs(v).r12, t.s.regs(v).rip), (0x1212, 0x2005));
    assert_eq!(t.s.p.hw[&v].cr0, 0x8000_0011);
    // Retry with an exception injected.
    t.exit(PendingExit::new(ExitKind::Exception, 6, 0));
    let ud = Event::Exception(6, None);
    assert_eq!(t.reply(ExitReply { inject: Some(ud), ..ExitReply::RETRY }), Ok(0));
    assert_eq!(t.s.regs(v).rip, 0x2005);
    assert_eq!(t.s.p.injected.last(), Some(&(v, ud)));
    // Stop.
    t.exit(PendingExit::new(ExitKind::Shutdown, 0, 0));
    assert_eq!(t.reply(ExitReply::STOP), Ok(0));
    assert_eq!(t.s.state(v), VcpuState::Stopped);
    check_invariants(&t.s.k);
}

#[test]
fn a_reply_the_microvisor_cannot_act_on_fails_and_changes_nothing() {
    let mut t = vm_sys(0);
    let (v0, v) = (t.s.v0, t.v);
    t.s.k.vcpus[v as usize].regs.rip = 0x3000;
    t.exit(PendingExit::new(ExitKind::Stage2, 0xfe00_0000, 0));
    let bad = [
        ([1u64 << 40, 0, 0, 0, 0, 0], Error::InvalidArgument),
        (ExitReply::NEXT.encode(), Error::InvalidArgument), // length unknown
        (ExitReply { write_state: ipc_spec::exit::state::GPR, ..ExitReply::RETRY }.encode(), Error::NoMessagePage),
        ([1 | 1 << 12, 0, 0, 0, 0, 0x20 | 3 << 8 | 1 << 31], Error::InvalidArgument),
    ];
    for (w, err) in bad {
        t.s.raw(v0, Hypercall::ReplyRecv.number(), t.e, 6, w);
        assert_eq!(t.s.k.current, Some(v0));
        assert_eq!(t.s.status(v0), Err(err), "{w:x?}");
        assert_eq!(t.s.state(v), VcpuState::BlockedFault(v0), "the exit is still pending");
        assert_eq!(t.s.regs(v).rip, 0x3000);
        check_invariants(&t.s.k);
    }
    assert_eq!(t.reply(ExitReply { advance_by: 2, ..ExitReply::NEXT }), Ok(0));
    assert_eq!((t.s.state(v), t.s.regs(v).rip), (VcpuState::Running, 0x3002));
}

#[test]
fn only_the_handler_holding_an_exit_can_answer_it() {
    let mut t = vm_sys(0);
    let (v0, v) = (t.s.v0, t.v);
    // A second handler vCPU of dom0 on the same endpoint.
    let (h2, _) = t.s.create_vcpu(dom0_slots::SELF_DOMAIN, true);
    t.exit(PendingExit::new(ExitKind::Hypercall, 0, 0));
    t.s.switch(h2);
    // It holds no exit: its ReplyRecv answers nobody and waits for the next message.
    t.s.raw(h2, Hypercall::ReplyRecv.number(), t.e, 6, ExitReply::RETRY.encode());
    assert_eq!(t.s.state(h2), VcpuState::BlockedRecv(t.s.endpoint_id(t.s.d0, t.e)));
    assert_eq!(t.s.state(v), VcpuState::BlockedFault(v0), "still dom0's to answer");
    // Nor can the VM answer itself (it has no capabilities at all).
    assert!(t.s.k.domains[t.vm as usize].caps.get(0).is_err());
    t.s.k.schedule();
    assert_eq!(t.s.k.current, Some(v0));
    assert_eq!(t.reply(ExitReply::RETRY), Ok(0));
    assert_eq!(t.s.state(v), VcpuState::Running);
    check_invariants(&t.s.k);
}

#[test]
fn domain_exit_is_final_whatever_the_reply() {
    let mut f = faulty(true);
    let (v0, vf) = (f.s.v0, f.vf[1]);
    f.s.raw(v0, Hypercall::Recv.number(), f.e, 0, [0; 6]);
    f.s.k.schedule();
    f.s.switch(vf);
    f.s.raw(vf, Hypercall::DomainExit.number(), 0, 0, args(&[3]));
    f.s.raw(v0, Hypercall::ReplyRecv.number(), f.e, 6, ExitReply::RETRY.encode());
    assert_eq!(f.s.state(vf), VcpuState::Stopped);
    check_invariants(&f.s.k);
}

#[test]
fn a_vmm_maps_its_vms_ram_until_the_vm_goes() {
    let mut t = vm_sys(0);
    let v0 = t.s.v0;
    let (d, dslot) = t.s.create_domain("plain", MIB2, 10);
    let at = 0x4000_0000;
    // Only a VM, with the VMM right, at a 2 MiB boundary above the caller's RAM.
    assert_eq!(t.s.hc(v0, Hypercall::DomainMapRam, dslot, &[at]), Err(Error::PermissionDenied));
    let no_vmm = t.s.copy(t.vmslot, dom0_slots::SELF_DOMAIN, rights::CONTROL, 0).unwrap();
    assert_eq!(t.s.hc(v0, Hypercall::DomainMapRam, no_vmm, &[at]), Err(Error::PermissionDenied));
    assert_eq!(t.s.hc(v0, Hypercall::DomainMapRam, t.vmslot, &[at + 4096]), Err(Error::InvalidArgument));
    assert_eq!(t.s.hc(v0, Hypercall::DomainMapRam, t.vmslot, &[0]), Err(Error::InvalidArgument));
    assert_eq!(t.s.hc(v0, Hypercall::DomainMapRam, t.vmslot, &[at]), Ok(at));
    assert_eq!(t.s.hc(v0, Hypercall::DomainMapRam, t.vmslot, &[at * 2]), Err(Error::AlreadyMapped));
    let vm_hpa = t.s.k.domains[t.vm as usize].ram[0];
    let s2 = t.s.k.domains[t.s.d0 as usize].stage2.as_ref().unwrap();
    assert_eq!(s2.translate(&t.s.p, at + 0x1234).map(|x| x.hpa), Some(vm_hpa + 0x1234));
    let _ = d;
    // The VM goes: so does the view, before its RAM is freed.
    let before = t.s.p.stage2_changes.get(&t.s.d0).copied().unwrap_or(0);
    assert_eq!(t.s.hc(v0, Hypercall::DomainDestroy, t.vmslot, &[]), Ok(0));
    assert_eq!(t.s.k.domains[t.s.d0 as usize].ram_view, None);
    let s2 = t.s.k.domains[t.s.d0 as usize].stage2.as_ref().unwrap();
    assert_eq!(s2.translate(&t.s.p, at + 0x1234), None);
    assert!(t.s.p.stage2_changes[&t.s.d0] > before);
    check_invariants(&t.s.k);
}

#[test]
fn injection_wakes_a_halted_vm_and_pause_holds_it() {
    let mut t = vm_sys(0);
    let (v0, v) = (t.s.v0, t.v);
    // Only a VM's vCPU, vectors 32..=255.
    let (_, dslot) = t.s.create_domain("plain", MIB2, 10);
    let (_, plain_vcpu) = t.s.create_vcpu(dslot, false);
    assert_eq!(t.s.hc(v0, Hypercall::VcpuInject, plain_vcpu, &[0x30]), Err(Error::InvalidState));
    assert_eq!(t.s.hc(v0, Hypercall::VcpuInject, t.vcpuslot, &[31]), Err(Error::InvalidArgument));
    assert_eq!(t.s.hc(v0, Hypercall::DomainPause, dslot, &[1]), Err(Error::PermissionDenied));
    // The VM halts; an injection wakes it.
    t.s.raw(v0, Hypercall::Yield.number(), 0, 0, [0; 6]);
    t.s.k.schedule();
    t.s.switch(v);
    t.s.k.halt(v);
    assert_eq!(t.s.state(v), VcpuState::Halted);
    assert_eq!(t.s.k.current, Some(v0));
    assert_eq!(t.s.hc(v0, Hypercall::VcpuInject, t.vcpuslot, &[0x41]), Ok(0x41));
    assert_eq!(t.s.state(v), VcpuState::Ready);
    assert!(t.s.k.vcpus[v as usize].has_irq());
    // Paused: out of the run queue until resumed; an injection does not run it.
    assert_eq!(t.s.hc(v0, Hypercall::DomainPause, t.vmslot, &[2]), Err(Error::InvalidArgument));
    assert_eq!(t.s.hc(v0, Hypercall::DomainPause, t.vmslot, &[1]), Ok(1));
    assert_eq!(t.s.state(v), VcpuState::Paused);
    check_invariants(&t.s.k);
    assert_eq!(t.s.hc(v0, Hypercall::VcpuInject, t.vcpuslot, &[0x42]), Ok(0x42));
    assert_eq!(t.s.state(v), VcpuState::Paused);
    assert_eq!(t.s.hc(v0, Hypercall::DomainPause, t.vmslot, &[0]), Ok(0));
    assert_eq!(t.s.state(v), VcpuState::Ready);
    check_invariants(&t.s.k);
}

#[test]
fn a_notification_bound_to_the_receive_wakes_it() {
    let mut t = vm_sys(0);
    let v0 = t.s.v0;
    let n = t.s.notification();
    assert_eq!(t.s.hc(v0, Hypercall::NotificationBind, n, &[0]), Ok(0));
    // Bits already there: the receive returns at once with them.
    let nid = t.s.notification_id(t.s.d0, n);
    t.s.k.signal_object(nid, 0b101);
    t.s.raw(v0, Hypercall::Recv.number(), t.e, 0, [0; 6]);
    let r = t.s.regs(v0);
    assert_eq!((r.rax, r.rbx, r.rcx, r.rdi), (0, ipc_spec::hypercall::NOTIFICATION_BADGE, 0, 0b101));
    // None: it blocks, and a signal wakes it.
    t.s.raw(v0, Hypercall::Recv.number(), t.e, 0, [0; 6]);
    assert!(matches!(t.s.state(v0), VcpuState::BlockedRecv(_)));
    t.s.k.signal_object(nid, 0b10);
    assert_eq!(t.s.state(v0), VcpuState::Ready);
    let r = t.s.regs(v0);
    assert_eq!((r.rax, r.rbx, r.rcx, r.rdi), (0, ipc_spec::hypercall::NOTIFICATION_BADGE, 0, 0b10));
    check_invariants(&t.s.k);
    // And an exit still arrives as a message.
    t.s.k.schedule();
    let r = t.exit(PendingExit::new(ExitKind::Hypercall, 0, 0));
    assert_eq!(r.rbx, 0x77);
}

// ---- leaks the hypercall fuzzer looks for -----------------------------------------------------

/// `MachineStatus` as dom0 sees it: (free frames, domains, vCPUs, regions, endpoints,
/// notifications).
fn machine_status(s: &mut Sys) -> (u64, u64, u64, u64, u64, u64) {
    let v0 = s.v0;
    s.hc(v0, Hypercall::MachineStatus, dom0_slots::MACHINE, &[]).unwrap();
    let r = s.regs(v0);
    (r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9)
}

#[test]
fn machine_status_counts_free_frames_and_live_objects() {
    let mut s = boot();
    let v0 = s.v0;
    let before = machine_status(&mut s);
    assert_eq!(before, (s.p.free(), 1, 1, 0, 0, 0));
    let (_, dslot) = s.create_domain("x", MIB2, 10);
    s.create_vcpu(dslot, false);
    let e = s.endpoint();
    let n = s.notification();
    let reg = s.hc(v0, Hypercall::RegionCreate, dom0_slots::MEMORY, &[PAGE]).unwrap();
    let during = machine_status(&mut s);
    assert_eq!(&[during.1, during.2, during.3, during.4, during.5], &[2, 2, 1, 1, 1]);
    assert!(during.0 < before.0 - (MIB2 / PAGE), "the domain's RAM and the region are not free");
    // Only the machine capability answers.
    assert_eq!(s.hc(v0, Hypercall::MachineStatus, dom0_slots::MEMORY, &[]), Err(Error::WrongType));
    assert_eq!(s.hc(v0, Hypercall::MachineStatus, 63, &[]), Err(Error::InvalidSlot));
    for slot in [e, n, reg] {
        s.hc(v0, Hypercall::CapDelete, slot, &[]).unwrap();
    }
    s.hc(v0, Hypercall::DomainDestroy, dslot, &[]).unwrap();
    assert_eq!(machine_status(&mut s), before);
}

/// dom0 gives `d` (slot `dslot` in dom0) a copy of the memory capability; the domain's
/// running vCPU `v` then creates a domain of its own. Returns (its id, the slot in `d`).
fn create_from(s: &mut Sys, dslot: u64, v: VcpuId, name: &str) -> (DomainId, u64) {
    let mem = s.copy(dom0_slots::MEMORY, dslot, rights::CONTROL | rights::GRANT, 0).unwrap();
    let d = s.k.vcpus[v as usize].domain;
    s.k.write_ram(&mut s.p, d, NAME_GPA, name.as_bytes()).unwrap();
    s.switch(v);
    let slot = s.hc(v, Hypercall::DomainCreate, mem, &[MIB2, 5, NAME_GPA, name.len() as u64]).unwrap();
    let Object::Domain(child, _) = s.cap(d, slot).object else { panic!("not a domain capability") };
    (child, slot)
}

/// Found by the hypercall fuzzer: a domain created by a domain that dom0 then destroyed
/// lived on (with its RAM, vCPUs and capabilities) although no capability reached it any
/// more, so nobody could ever destroy it. Destroying a domain now destroys every domain no
/// chain of domain capabilities from dom0 reaches.
#[test]
fn destroying_a_domain_destroys_the_domains_only_it_could_reach() {
    let mut s = boot();
    s.k.root = Some(s.d0);
    let v0 = s.v0;
    let before = machine_status(&mut s);
    let (_, aslot) = s.create_domain("a", MIB2, 10);
    let (va, _) = s.create_vcpu(aslot, true);
    // a creates b, gives b memory too, and b creates c (with a running vCPU) and its own
    // endpoint: a chain dom0 -> a -> b -> c.
    let (b, bslot_in_a) = create_from(&mut s, aslot, va, "b");
    let vbslot = s.hc(va, Hypercall::VcpuCreate, bslot_in_a, &[0x1000, 0]).unwrap();
    s.hc(va, Hypercall::VcpuStart, vbslot, &[]).unwrap();
    let Object::Vcpu(vb, _) = s.cap(s.k.vcpus[va as usize].domain, vbslot).object else { panic!() };
    let mem_b = s.hc(va, Hypercall::CapCopy, 0, &[bslot_in_a, rights::CONTROL | rights::GRANT, 0]);
    assert!(mem_b.is_ok(), "{mem_b:?}");
    s.k.write_ram(&mut s.p, b, NAME_GPA, b"c").unwrap();
    s.switch(vb);
    let cslot = s.hc(vb, Hypercall::DomainCreate, mem_b.unwrap(), &[MIB2, 5, NAME_GPA, 1]).unwrap();
    s.hc(vb, Hypercall::VcpuCreate, cslot, &[0x1000, 0]).unwrap();
    s.hc(vb, Hypercall::EndpointCreate, mem_b.unwrap(), &[]).unwrap();
    // An unrelated domain dom0 also holds stays.
    s.switch(v0);
    let (keep, _) = s.create_domain("keep", MIB2, 10);
    assert_eq!(s.live_domains(), 5);
    assert_eq!(s.hc(v0, Hypercall::DomainDestroy, aslot, &[]), Ok(0));
    check_invariants(&s.k);
    assert_eq!(s.live_domains(), 2, "b and c went with a");
    assert_eq!(s.k.domains[keep as usize].state, DomainState::Alive);
    let after = machine_status(&mut s);
    // Everything but "keep" (one domain, 2 MiB and its page tables) is back.
    assert_eq!(&[after.1, after.2, after.3, after.4, after.5], &[2, 1, 0, 0, 0]);
    for slot in 4..CAP_SLOTS as u64 {
        if let Ok(c) = s.k.domains[s.d0 as usize].caps.get(slot) {
            if matches!(c.object, Object::Domain(..)) {
                s.hc(v0, Hypercall::DomainDestroy, slot, &[]).ok();
            }
        }
    }
    assert_eq!(machine_status(&mut s), before);
}

/// Without a root (as in the other host tests) nothing is collected.
#[test]
fn without_a_root_no_domain_is_collected() {
    let mut s = boot();
    let v0 = s.v0;
    let (_, aslot) = s.create_domain("a", MIB2, 10);
    let (va, _) = s.create_vcpu(aslot, true);
    create_from(&mut s, aslot, va, "b");
    s.switch(v0);
    s.hc(v0, Hypercall::DomainDestroy, aslot, &[]).unwrap();
    assert_eq!(s.live_domains(), 2, "b stays: no root was named");
    assert_eq!(s.k.collect_unreachable(&mut s.p), 0);
}

/// Domains holding capabilities to each other (as they could if domain capabilities were
/// copyable) do not keep each other alive: what counts is a chain from the root.
#[test]
fn a_cycle_of_domain_capabilities_does_not_keep_its_domains_alive() {
    let mut s = boot();
    s.k.root = Some(s.d0);
    let v0 = s.v0;
    let before = machine_status(&mut s);
    let (a, aslot) = s.create_domain("a", MIB2, 10);
    let (b, bslot) = s.create_domain("b", MIB2, 10);
    let (_, xslot) = s.create_domain("x", MIB2, 10);
    let (ga, gb) = (s.k.domains[a as usize].generation, s.k.domains[b as usize].generation);
    // a and b each hold the other (and themselves).
    for (holder, target, g) in [(a, b, gb), (b, a, ga), (a, a, ga)] {
        s.k.grant_original(holder, Object::Domain(target, g), rights::CONTROL).unwrap();
    }
    // While dom0 reaches them, a destroy elsewhere keeps them.
    assert_eq!(s.hc(v0, Hypercall::DomainDestroy, xslot, &[]), Ok(0));
    assert_eq!(s.live_domains(), 3);
    // dom0 lets go of both: the cycle alone does not keep them. (Collected at the next
    // destruction, which here is a new domain's.)
    s.hc(v0, Hypercall::CapDelete, aslot, &[]).unwrap();
    s.hc(v0, Hypercall::CapDelete, bslot, &[]).unwrap();
    let (_, yslot) = s.create_domain("y", MIB2, 10);
    assert_eq!(s.hc(v0, Hypercall::DomainDestroy, yslot, &[]), Ok(0));
    check_invariants(&s.k);
    assert_eq!(s.live_domains(), 1);
    s.hc(v0, Hypercall::CapDelete, xslot, &[]).unwrap();
    s.hc(v0, Hypercall::CapDelete, yslot, &[]).unwrap();
    assert_eq!(machine_status(&mut s), before);
}

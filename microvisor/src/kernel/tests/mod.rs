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
use crate::npt::Npt;
use crate::phys_mem::{PhysRead, PhysWrite};
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
    /// Console input waiting for ConsoleRead.
    pub(super) typed: Vec<u8>,
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
            typed: Vec::new(),
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
    /// The simulation has no interrupt hardware: nothing is ever offered.
    fn virq_offered(&mut self, _v: VcpuId) -> bool {
        false
    }

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

    fn clock_rate(&self) -> [u64; 2] {
        [5, 2_000_000]
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

    fn console_read(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.typed.len());
        out[..n].copy_from_slice(&self.typed[..n]);
        self.typed.drain(..n);
        n
    }

    // A machine without an IOMMU or devices.
    fn device_bars(&self, _dev: DeviceId) -> heapless::Vec<(u64, u64), 6> {
        heapless::Vec::new()
    }
    fn device_assign(&mut self, _: DeviceId, _: DomainId, _: &[u64], _: &[(u64, u64, u64)]) -> Result<(), Error> {
        Err(Error::InvalidState)
    }
    fn device_release(&mut self, _dev: DeviceId) {}
    fn dma_map(&mut self, _d: DomainId, _gpa: Gpa, _hpa: Hpa, _size: u64) {}
    fn dma_unmap(&mut self, _d: DomainId, _gpa: Gpa, _size: u64) {}
    fn dma_space_destroy(&mut self, _d: DomainId) {}
    fn pci_config_read(&mut self, _dev: DeviceId, _offset: u64, _size: u64) -> Result<u32, Error> {
        Err(Error::InvalidState)
    }
    fn pci_config_write(&mut self, _dev: DeviceId, _offset: u64, _size: u64, _value: u32) -> Result<(), Error> {
        Err(Error::InvalidState)
    }
    fn irq_allocate(&mut self, _dev: DeviceId) -> Result<IrqAllocation, Error> {
        Err(Error::InvalidState)
    }
    fn irq_release(&mut self, _dev: DeviceId) {}
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
    assert_eq!(
        k.grant_original(d0, Object::Machine, rights::CONTROL | rights::READ | rights::GRANT),
        Ok(dom0_slots::MACHINE)
    );
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

mod basics;
mod caps;
mod domains;
mod exits;
mod ipc;
mod leaks;
mod notify;
mod props;
mod regions;
mod sched;
mod vm;
mod wakeups;

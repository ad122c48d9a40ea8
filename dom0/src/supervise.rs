//! Supervision of the built domains: what dom0 does when one faults, exits, hangs or is
//! killed from the host (`ctl kill`), and its periodic tick (the hang watchdog, restarts
//! due after their backoff). The decisions are `ipc_spec::supervision`'s (host-tested);
//! this file does the hypercalls.
//!
//! dom0's event loop (`main.rs`) receives faults on its endpoint; a notification of its own
//! (`wake`) is bound to that receive: the tick's timer sets [`TICK_BIT`], the control
//! device's interrupt bit 0.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;

use domain_rt::shared::Region;
use domain_rt::{hypercall, println};
use ipc_spec::block::BlockLayout;
use ipc_spec::bundle::Bundle;
use ipc_spec::ctl::{DomainLine, State};
use ipc_spec::manifest::{self, ChannelKind, Manifest};
use ipc_spec::ring::SharedMem;
use ipc_spec::supervision::{self, Decision, Verdict, Watchdog};
use ipc_spec::Hypercall;

use crate::builder::{self, Stack};

/// The bit the tick's timer sets on the wake notification.
pub const TICK_BIT: u64 = 1 << 1;
/// The tick when no watchdog asks for a faster one (restarts due, control device polling).
const DEFAULT_TICK_NS: u64 = 20_000_000;

/// Why a domain is replaced.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// It faulted or exited (reported by the microvisor).
    Fault,
    /// Its watchdog found it hung (dom0 destroyed it).
    Hang,
    /// `ctl kill` (dom0 destroyed it).
    Kill,
}

/// dom0's view of one domain of the manifest.
struct Watch {
    state: State,
    /// Times of the restarts in the current window (the policy's).
    window: Vec<u64>,
    /// Restarts so far (by policy and by `ctl restart`).
    restarts: u64,
    /// When a restart is due (state [`State::Restarting`]).
    due_ns: u64,
    watchdog: Option<Watchdog>,
    /// When it failed last (for the restart's report).
    failed_ns: u64,
}

pub struct Supervisor {
    watch: Vec<Watch>,
    wake: u64,
    /// The watchdog tick: a quarter of the shortest period (a hang is seen within 1.25
    /// periods of the domain's last beat).
    tick_ns: u64,
    last_tick_ns: u64,
    /// The deadline the wake timer is armed for.
    armed_ns: Option<u64>,
    /// Something needs the tick whatever the watchdogs say (the control device is polled).
    always_tick: bool,
}

impl Supervisor {
    /// Watch the built `stack`; `wake` is dom0's notification bound to its receive.
    pub fn new(stack: &Stack, m: &Manifest, wake: u64, always_tick: bool) -> Self {
        let now = hypercall::clock_ns();
        let watch: Vec<Watch> = m
            .domains
            .iter()
            .zip(stack.domains.iter())
            .map(|(spec, d)| Watch {
                state: State::Running,
                window: Vec::new(),
                restarts: 0,
                due_ns: 0,
                watchdog: d.heartbeat.map(|_| Watchdog::new(spec.restart.watchdog_ms, now)),
                failed_ns: 0,
            })
            .collect();
        let tick_ns = watch
            .iter()
            .filter_map(|w| w.watchdog.map(|d| d.period_ns() / 4))
            .min()
            .unwrap_or(DEFAULT_TICK_NS)
            .clamp(1_000_000, DEFAULT_TICK_NS);
        for (w, d) in watch.iter().zip(stack.domains.iter()) {
            if let Some(dog) = w.watchdog {
                println!(
                    "watchdog on {}: a hang is noticed after {} ms without a heartbeat",
                    d.name,
                    dog.period_ns() / 1_000_000
                );
            }
        }
        Self { watch, wake, tick_ns, last_tick_ns: now, armed_ns: None, always_tick }
    }

    /// Arm the wake timer for the next thing due (the tick, a restart), if anything is.
    pub fn arm(&mut self) {
        let ticking = self.always_tick || self.watch.iter().any(|w| w.watchdog.is_some() && w.state == State::Running);
        let mut next = ticking.then_some(self.last_tick_ns.saturating_add(self.tick_ns));
        for w in self.watch.iter().filter(|w| w.state == State::Restarting) {
            next = Some(next.map_or(w.due_ns, |n| n.min(w.due_ns)));
        }
        let Some(at) = next else { return };
        if self.armed_ns == Some(at) {
            return;
        }
        let ns = at.saturating_sub(hypercall::clock_ns()).max(1);
        match hypercall::timer_set(self.wake, ns, TICK_BIT) {
            Ok(()) => self.armed_ns = Some(at),
            Err(e) => println!("supervision: arming the tick: {e}"),
        }
    }

    /// The tick: every watched domain's heartbeat, then the restarts that are due.
    pub fn tick(&mut self, stack: &mut Stack, bundle: &Bundle, m: &Manifest) {
        let now = hypercall::clock_ns();
        self.armed_ns = None;
        if now < self.last_tick_ns.saturating_add(self.tick_ns) && !self.watch.iter().any(|w| due(w, now)) {
            return; // woken early (the control device): nothing is due
        }
        let stalled = supervision::stalled(self.last_tick_ns, now, self.tick_ns);
        self.last_tick_ns = now;
        for index in 0..self.watch.len() {
            let (Some(hb), Some(w)) = (stack.domains.get(index).and_then(|d| d.heartbeat), self.watch.get_mut(index))
            else {
                continue;
            };
            if w.state != State::Running {
                continue;
            }
            let Some(dog) = w.watchdog.as_mut() else { continue };
            let beat = hypercall::poll(hb).is_ok_and(|bits| bits != 0);
            if let Verdict::Hung { silent_ns, ever_beat } = dog.check(now, beat, stalled) {
                let name = stack.domains[index].name.clone();
                println!(
                    "watchdog: {name} {} for {} ms: hung at {now} ns; destroying it",
                    if ever_beat { "has not beaten" } else { "never beat since its start" },
                    silent_ns / 1_000_000
                );
                destroy(stack, index);
                self.failed(stack, bundle, m, index, Cause::Hang);
            }
        }
        for index in 0..self.watch.len() {
            if self.watch.get(index).is_some_and(|w| w.state == State::Restarting && w.due_ns <= now) {
                self.rebuild(stack, bundle, m, index);
            }
        }
    }

    /// Domain `index` failed and is destroyed already: apply its restart policy (build it
    /// again now, or when its backoff is over, or give up and tell its clients).
    pub fn failed(&mut self, stack: &mut Stack, bundle: &Bundle, m: &Manifest, index: usize, cause: Cause) {
        let (Some(spec), Some(w)) = (m.domains.get(index), self.watch.get_mut(index)) else { return };
        let now = hypercall::clock_ns();
        w.failed_ns = now;
        w.state = State::Dead;
        let name = spec.name.as_str();
        match supervision::decide(&spec.restart, &mut w.window, now) {
            Decision::Leave => {}
            Decision::GiveUp { failures } => {
                println!(
                    "{name} failed {failures} times within {} ms: not restarted again (restart_limit); its clients' requests now fail",
                    spec.restart.window_ms
                );
                mark_gone(stack, index, true);
            }
            Decision::Restart { backoff_ms } => {
                w.state = State::Restarting;
                w.due_ns = now.saturating_add(u64::from(backoff_ms) * 1_000_000);
                if backoff_ms == 0 {
                    self.rebuild(stack, bundle, m, index);
                }
            }
        }
        if cause == Cause::Kill && self.watch.get(index).is_some_and(|w| w.state == State::Dead) {
            println!("{name} stays dead (its restart policy)");
        }
    }

    /// Build domain `index` again now.
    fn rebuild(&mut self, stack: &mut Stack, bundle: &Bundle, m: &Manifest, index: usize) {
        let Some(w) = self.watch.get_mut(index) else { return };
        let name = m.domains.get(index).map_or("?", |d| d.name.as_str());
        let t0 = hypercall::clock_ns();
        match builder::restart(bundle, m, stack, index) {
            Ok(s) => {
                let now = hypercall::clock_ns();
                w.state = State::Running;
                w.restarts += 1;
                w.watchdog = m.domains.get(index).and_then(|spec| {
                    stack.domains.get(index)?.heartbeat.map(|_| Watchdog::new(spec.restart.watchdog_ms, now))
                });
                let policy = m.domains.get(index).map(|d| d.restart).unwrap_or_default();
                // The steps' lengths (the bench's phase breakdown, `bench_restart.rs`).
                let us = |a: u64, b: u64| b.saturating_sub(a) / 1000;
                println!(
                    "restarted {name} ({} of {} within {} ms), rebuilt in {} us (domain {} us, image {} us, device {} us, channels {} us, vCPU {} us) from {t0} to {now} ns",
                    w.window.len(),
                    policy.limit,
                    policy.window_ms,
                    (now - t0) / 1000,
                    us(t0, s.created),
                    us(s.created, s.loaded),
                    us(s.loaded, s.assigned),
                    us(s.assigned, s.attached),
                    us(s.attached, s.started),
                );
            }
            Err(e) => {
                w.state = State::Dead;
                println!("restarting {name} failed: {e}");
            }
        }
    }

    /// `ctl kill NAME`: the domain fails as a crash would.
    pub fn kill(&mut self, stack: &mut Stack, bundle: &Bundle, m: &Manifest, name: &str) -> Result<String, String> {
        let index = m.domain_index(name).ok_or_else(|| alloc::format!("no domain \"{name}\""))?;
        match self.watch.get(index).map(|w| w.state) {
            Some(State::Running) => {}
            Some(s) => return Err(alloc::format!("{name} is {}", s.as_str())),
            None => return Err(alloc::format!("no domain \"{name}\"")),
        }
        println!("ctl: killing {name} at {} ns", hypercall::clock_ns());
        destroy(stack, index);
        self.failed(stack, bundle, m, index, Cause::Kill);
        let state = self.watch.get(index).map_or(State::Dead, |w| w.state);
        Ok(alloc::format!("killed {name}; now {}", state.as_str()))
    }

    /// `ctl restart NAME`: destroy it if alive and build it again now (whatever its policy
    /// and limit; its clients are told it is back).
    pub fn restart(&mut self, stack: &mut Stack, bundle: &Bundle, m: &Manifest, name: &str) -> Result<String, String> {
        let index = m.domain_index(name).ok_or_else(|| alloc::format!("no domain \"{name}\""))?;
        let spec = &m.domains[index];
        if spec.restart.mode != manifest::Restart::Always {
            // dom0 kept no channels to give it again: it would come back cut off.
            return Err(alloc::format!("{name} cannot be restarted: its manifest says restart = \"never\""));
        }
        println!("ctl: restarting {name}");
        if self.watch.get(index).is_some_and(|w| w.state == State::Running) {
            destroy(stack, index);
        }
        mark_gone(stack, index, false);
        self.rebuild(stack, bundle, m, index);
        match self.watch.get(index).map(|w| w.state) {
            Some(State::Running) => Ok(alloc::format!("restarted {name}")),
            _ => Err(alloc::format!("restarting {name} failed (see the console)")),
        }
    }

    /// `ctl list`: one line per domain, dom0 first.
    pub fn list(&self, stack: &Stack, mut out: impl FnMut(&str)) {
        let mut line = String::new();
        let status = |slot: u64| {
            hypercall::call(Hypercall::DomainStatus, slot, [0; 6]).map_or((0, 0), |r| (r.args[2], r.args[3]))
        };
        let (ipc, signals) = status(ipc_spec::hypercall::dom0_slots::SELF_DOMAIN);
        let dom0 = DomainLine { name: "dom0", state: State::Running, restarts: 0, io: None, ipc, signals };
        let _ = write!(line, "{dom0}");
        out(&line);
        for (index, (d, w)) in stack.domains.iter().zip(self.watch.iter()).enumerate() {
            let (ipc, signals) = if w.state == State::Running { status(d.slot) } else { (0, 0) };
            let line_of = DomainLine {
                name: &d.name,
                state: w.state,
                restarts: w.restarts,
                io: answers(stack, index),
                ipc,
                signals,
            };
            line.clear();
            let _ = write!(line, "{line_of}");
            out(&line);
        }
    }
}

fn due(w: &Watch, now: u64) -> bool {
    w.state == State::Restarting && w.due_ns <= now
}

/// Destroy domain `index` (and the VMs it is the VMM of: a VM does not outlive its VMM).
/// The microvisor quiesces its device and revokes its IOMMU entries before freeing memory.
pub fn destroy(stack: &Stack, index: usize) {
    let Some(d) = stack.domains.get(index) else { return };
    let name = d.name.as_str();
    let t0 = hypercall::clock_ns();
    match hypercall::call(Hypercall::DomainDestroy, d.slot, [0; 6]) {
        Ok(_) => {
            let t1 = hypercall::clock_ns();
            println!("destroyed {name}: its memory is free again (in {} us, at {t1} ns)", (t1 - t0) / 1000)
        }
        Err(e) => println!("destroying {name} failed: {e}"),
    }
    for vm in stack.domains.iter().filter(|x| x.vmm == Some(index)) {
        match hypercall::call(Hypercall::DomainDestroy, vm.slot, [0; 6]) {
            Ok(_) => println!("destroyed {}, the VM of {name}", vm.name),
            Err(e) => println!("destroying {}, the VM of {name}, failed: {e}", vm.name),
        }
    }
}

/// The channels of `kind` served by domain `index` that dom0 has mapped.
fn views(stack: &Stack, index: usize, kind: ChannelKind) -> impl Iterator<Item = (Region, u64)> + '_ {
    stack.reattach.iter().filter(move |k| k.server == index && k.kind == kind).filter_map(|k| {
        let ((_, _, bytes), at) = (k.region?, k.in_dom0?);
        // SAFETY: builder::build mapped this region into dom0 at `at` for good (dom0 keeps
        // its capability); dom0's Rust code owns nothing there.
        Some((unsafe { Region::new(at as usize, bytes as usize) }, k.to_client))
    })
}

/// Tell the clients of domain `index`'s block and net channels that their server is gone
/// (or back), and ring them so that a client waiting for an answer or a frame sees it at
/// once.
fn mark_gone(stack: &Stack, index: usize, gone: bool) {
    let block = views(stack, index, ChannelKind::Block).map(|(region, to_client)| {
        BlockLayout::set_server_gone(&region, gone);
        to_client
    });
    let net = views(stack, index, ChannelKind::Net).map(|(region, to_client)| {
        ipc_spec::net::mark_server_gone(&region, gone);
        to_client
    });
    for to_client in block.chain(net) {
        if gone {
            let _ = hypercall::signal(to_client, 1);
        }
    }
}

/// Answers pushed on the block channels domain `index` serves (the response rings'
/// free-running producer indexes, which survive restarts), if dom0 watches any.
fn answers(stack: &Stack, index: usize) -> Option<u64> {
    let mut total = None;
    for (region, _) in views(stack, index, ChannelKind::Block) {
        let ring = region.read_u32(ipc_spec::block::header::RESPONSE_RING) as usize;
        // The guest wrote the offset: read only inside the region (read_u32 is checked).
        let produced = u64::from(region.read_u32(ring));
        total = Some(total.unwrap_or(0) + produced);
    }
    total
}

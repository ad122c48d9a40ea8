//! An exhaustive model of the block channel's doorbells ([`crate::block`], "Doorbells"):
//! every interleaving of a client and a driver, instruction by instruction, on x86's memory
//! model (TSO: each side's stores wait in a FIFO store buffer and reach memory at any later
//! moment, in order; a load sees its own side's newest buffered store, else memory; a full
//! fence, and a hypercall (a VM exit), empties the buffer first). Loads may pass earlier
//! stores to other locations, which is exactly how a "set my flag, look at yours" protocol
//! loses a wake-up without a fence (Dekker).
//!
//! The client (`block_client::Client` and the loops of the demo guest, the bench domain and
//! the VMM around it) submits `n` requests keeping at most `window` outstanding: it pushes
//! what the request ring has room for, drains the answers it sees, and after any of that it
//! rings the driver if [`crate::block_client::Client::doorbell_needed`] says so (full fence,
//! the driver's "doorbell wanted" flag, requests still on the ring); with nothing moved, it
//! waits on its notification (whose bits stay set until taken, so a ring between its look
//! and its wait is not lost: the microvisor's own model covers that part).
//!
//! The driver (`driver-vms/disk`, `serve`) reads its interrupt count ("seen"), then passes
//! over the channel until nothing moves: it answers completed requests, takes requests
//! while the device has room and the response ring a slot for each request on the device
//! plus the new one, and finds a ring of the client due once half of its window (answers
//! not rung about, requests on the device, requests seen waiting on the ring) is answered;
//! it sends that ring when it next goes to sleep (with the halt, `SignalHalt`). Before sleeping with room on the device it
//! sets "doorbell wanted", fences, and looks at the request ring once more (requests it
//! could take: no sleep). It sleeps until an interrupt came after "seen" (a doorbell or a
//! device completion: the device completes what it holds at any moment), and clears the
//! flag when it wakes. There is no fallback timer here: a wake-up that only a timer would
//! bring is a lost one.
//!
//! Checked: from every reachable state, running on reaches the end (every request
//! answered and taken by the client): no wake-up is lost for good, no side spins without
//! progress. Each rule is needed: the tests remove them one at a time and expect a
//! counterexample.

use std::collections::{HashMap, VecDeque};
use std::format;
use std::string::String;
use std::vec;
use std::vec::Vec;

/// The protocol's rules, each of which a test removes.
#[derive(Clone, Copy, Debug)]
struct Rules {
    /// The driver's full fence between storing "doorbell wanted" and its second look.
    driver_fence: bool,
    /// The driver's second look at the ring after setting the flag.
    driver_recheck: bool,
    /// The client's full fence between publishing (producer or consumer index) and reading
    /// the flag.
    client_fence: bool,
    /// The client also checks the flag after it took answers (not only after it pushed
    /// requests): a driver that stopped for want of a response slot needs that doorbell.
    client_checks_after_drain: bool,
    /// Stores wait in store buffers (x86); `false`: every store reaches memory at once
    /// (sequential consistency, as under QEMU's TCG with one CPU).
    tso: bool,
    /// The client set "last answer only" (header +44) for the whole run: the driver holds
    /// back the half-window ring where [`crate::block::may_hold_ring`] lets it.
    last_only: bool,
    /// The client may set or clear "last answer only" at any moment (the driver reads the
    /// flag from guest-written memory whenever a ring is due; a flag whose store waits in a
    /// buffer is the same as one flipped later, so the flip is modelled as instant).
    last_only_flips: bool,
    /// The hold needs a response slot for every answer the driver still owes (else it
    /// rings at half the window as usual).
    hold_needs_room: bool,
    /// A ring found due in a pass is sent when the driver goes to sleep (`SignalHalt`,
    /// modelled as a ring step before the sleep, other steps allowed in between), not at
    /// once; until then it stays due across passes.
    ring_at_sleep: bool,
}

const CORRECT: Rules = Rules {
    driver_fence: true,
    driver_recheck: true,
    client_fence: true,
    client_checks_after_drain: true,
    tso: true,
    last_only: false,
    last_only_flips: false,
    hold_needs_room: true,
    ring_at_sleep: true,
};

/// The sizes of one run.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    /// Requests the client submits in all.
    n: u8,
    /// Requests it keeps outstanding at most.
    window: u8,
    /// Request ring capacity.
    req_cap: u8,
    /// Response ring capacity.
    resp_cap: u8,
    /// Requests the device holds at once.
    depth: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Loc {
    ReqProd,
    ReqCons,
    RespProd,
    RespCons,
    Flag,
}

const BUF: usize = 4;

/// A store buffer: FIFO, oldest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
struct StoreBuf {
    len: u8,
    e: [(u8, u8); BUF],
}

impl StoreBuf {
    fn full(&self) -> bool {
        self.len as usize == BUF
    }
    fn push(&mut self, l: Loc, v: u8) {
        self.e[self.len as usize] = (l as u8, v);
        self.len += 1;
    }
    fn newest(&self, l: Loc) -> Option<u8> {
        self.e[..self.len as usize].iter().rev().find(|(x, _)| *x == l as u8).map(|(_, v)| *v)
    }
    fn pop(&mut self) -> Option<(u8, u8)> {
        if self.len == 0 {
            return None;
        }
        let first = self.e[0];
        self.e.copy_within(1..self.len as usize, 0);
        self.len -= 1;
        self.e[self.len as usize] = (0, 0);
        Some(first)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Cpc {
    /// Push while it may (window, ring room: loads the driver's consumer index).
    Submit,
    /// Store the new producer index.
    Push,
    /// Look for an answer (loads the response producer index).
    Drain,
    /// Store the new response consumer index.
    Pop,
    /// Something moved this round: the doorbell check starts (fence).
    Fence,
    /// Load the flag.
    LoadFlag,
    /// Load the request ring's consumer index: anything left on the ring?
    LoadReqCons,
    /// Ring the driver (a hypercall: empties the store buffer first).
    Ring,
    /// Nothing moved: wait on the notification (takes its bits, or blocks).
    Wait,
    End,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Dpc {
    /// Read the interrupt count ("seen").
    Top,
    /// Answer what the device completed (one store per answer).
    Complete,
    /// May it take a request: device room, then the response consumer index (a load).
    TakeRoom,
    /// Load the request producer index.
    TakeLoad,
    /// Store the new request consumer index.
    TakeStore,
    /// Ring the client if its batch is due.
    RingClient,
    /// Decide whether to sleep: a pass that moved goes round again.
    EndPass,
    /// Store "doorbell wanted".
    SetFlag,
    /// The full fence after it.
    Fence,
    /// Second look: the request producer index.
    RecheckReq,
    /// Second look: the response consumer index (a slot for it?).
    RecheckRoom,
    /// Sleep until an interrupt came after "seen".
    Sleep,
    /// Awake: clear the flag.
    ClearFlag,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct State {
    mem: [u8; 5],
    cbuf: StoreBuf,
    dbuf: StoreBuf,
    // client
    cpc: Cpc,
    submitted: u8,
    done: u8,
    c_req_prod: u8,
    c_resp_cons: u8,
    /// Pushed (or, by the rule, took) something since the last doorbell check.
    moved: bool,
    /// Pushed or took something since it last looked at the flag or waited: go round
    /// again before waiting.
    round: bool,
    /// Its notification's bits (set by the driver's ring, taken by its wait).
    c_bits: bool,
    /// "Last answer only" as the client has it set now (with `Rules::last_only_flips`).
    c_last_only: bool,
    // driver
    dpc: Dpc,
    d_req_cons: u8,
    d_resp_prod: u8,
    /// The last producer index it loaded (what it believes waits on the ring).
    d_req_prod_seen: u8,
    on_device: u8,
    /// Completed by the device, not answered yet (part of `on_device`).
    dev_done: u8,
    /// Answers pushed since the client was last rung.
    answered: u8,
    /// Interrupts pending (the count moved) that "seen" has not taken.
    irq: bool,
    progress: bool,
    flag_set: bool,
    /// A ring found due, not sent yet (`ring_at_sleep`).
    ring_due: bool,
}

impl State {
    fn new() -> Self {
        // The client's setup writes the flag as 1 (no driver has said anything yet).
        let mut mem = [0; 5];
        mem[Loc::Flag as usize] = 1;
        State {
            mem,
            cbuf: StoreBuf::default(),
            dbuf: StoreBuf::default(),
            cpc: Cpc::Submit,
            submitted: 0,
            done: 0,
            c_req_prod: 0,
            c_resp_cons: 0,
            moved: false,
            round: false,
            c_bits: false,
            c_last_only: false,
            dpc: Dpc::Top,
            d_req_cons: 0,
            d_resp_prod: 0,
            d_req_prod_seen: 0,
            on_device: 0,
            dev_done: 0,
            answered: 0,
            irq: false,
            progress: false,
            flag_set: true,
            ring_due: false,
        }
    }

    fn cload(&self, l: Loc) -> u8 {
        self.cbuf.newest(l).unwrap_or(self.mem[l as usize])
    }
    fn dload(&self, l: Loc) -> u8 {
        self.dbuf.newest(l).unwrap_or(self.mem[l as usize])
    }
    fn drain_c(&mut self) {
        while let Some((l, v)) = self.cbuf.pop() {
            self.mem[l as usize] = v;
        }
    }
    fn drain_d(&mut self) {
        while let Some((l, v)) = self.dbuf.pop() {
            self.mem[l as usize] = v;
        }
    }
    fn interrupt(&mut self) {
        self.irq = true;
    }

    fn finished(&self, s: Sizes) -> bool {
        self.cpc == Cpc::End && self.done == s.n
    }
}

/// One step of the client, if it can take one.
fn client_step(st: &State, s: Sizes, r: Rules) -> Option<State> {
    if st.cbuf.full() {
        return None; // a full store buffer stalls the CPU until a store drains
    }
    let mut x = *st;
    match st.cpc {
        Cpc::Submit => {
            let outstanding = x.submitted - x.done;
            if x.submitted < s.n && outstanding < s.window {
                let cons = x.cload(Loc::ReqCons);
                if x.c_req_prod.wrapping_sub(cons) < s.req_cap {
                    x.cpc = Cpc::Push;
                    return Some(x);
                }
            }
            x.cpc = Cpc::Drain;
        }
        Cpc::Push => {
            x.c_req_prod = x.c_req_prod.wrapping_add(1);
            x.cbuf.push(Loc::ReqProd, x.c_req_prod);
            x.submitted += 1;
            x.moved = true;
            x.round = true;
            x.cpc = Cpc::Submit;
        }
        Cpc::Drain => {
            if x.cload(Loc::RespProd) != x.c_resp_cons {
                x.cpc = Cpc::Pop;
            } else if x.done == s.n {
                x.cpc = Cpc::End;
            } else if x.moved {
                x.cpc = Cpc::Fence;
            } else if x.round {
                x.round = false;
                x.cpc = Cpc::Submit;
            } else {
                x.cpc = Cpc::Wait;
            }
        }
        Cpc::Pop => {
            x.c_resp_cons = x.c_resp_cons.wrapping_add(1);
            x.cbuf.push(Loc::RespCons, x.c_resp_cons);
            x.done += 1;
            x.round = true;
            if r.client_checks_after_drain {
                x.moved = true;
            }
            x.cpc = Cpc::Drain;
        }
        Cpc::Fence => {
            if r.client_fence && x.cbuf.len > 0 {
                return None; // waits for its stores to drain
            }
            x.moved = false;
            x.round = false;
            x.cpc = Cpc::LoadFlag;
        }
        Cpc::LoadFlag => x.cpc = if x.cload(Loc::Flag) != 0 { Cpc::LoadReqCons } else { Cpc::Submit },
        Cpc::LoadReqCons => x.cpc = if x.cload(Loc::ReqCons) != x.c_req_prod { Cpc::Ring } else { Cpc::Submit },
        Cpc::Ring => {
            x.drain_c();
            x.interrupt();
            x.cpc = Cpc::Submit;
        }
        Cpc::Wait => {
            if !x.c_bits {
                return None; // blocked until the driver rings
            }
            x.drain_c(); // the Wait hypercall is a VM exit: the store buffer drains
            x.c_bits = false;
            x.cpc = Cpc::Submit;
        }
        Cpc::End => return None,
    }
    Some(x)
}

/// One step of the driver, if it can take one.
fn driver_step(st: &State, s: Sizes, r: Rules) -> Option<State> {
    if st.dbuf.full() {
        return None;
    }
    let mut x = *st;
    match st.dpc {
        Dpc::Top => {
            x.irq = false; // "seen": what came before is looked at by this pass
            x.progress = false;
            x.dpc = Dpc::Complete;
        }
        Dpc::Complete => {
            if x.dev_done > 0 {
                x.dev_done -= 1;
                x.on_device -= 1;
                x.d_resp_prod = x.d_resp_prod.wrapping_add(1);
                x.dbuf.push(Loc::RespProd, x.d_resp_prod);
                x.answered += 1;
                x.progress = true;
            } else {
                x.dpc = Dpc::TakeRoom;
            }
        }
        Dpc::TakeRoom => {
            if x.on_device >= s.depth {
                x.dpc = Dpc::RingClient;
            } else {
                let free = s.resp_cap - x.d_resp_prod.wrapping_sub(x.dload(Loc::RespCons));
                if free > x.on_device {
                    x.dpc = Dpc::TakeLoad;
                } else {
                    x.dpc = Dpc::RingClient; // stopped for want of a response slot
                }
            }
        }
        Dpc::TakeLoad => {
            x.d_req_prod_seen = x.dload(Loc::ReqProd);
            x.dpc = if x.d_req_prod_seen != x.d_req_cons { Dpc::TakeStore } else { Dpc::RingClient };
        }
        Dpc::TakeStore => {
            x.d_req_cons = x.d_req_cons.wrapping_add(1);
            x.dbuf.push(Loc::ReqCons, x.d_req_cons);
            x.on_device += 1;
            x.progress = true;
            x.dpc = Dpc::Complete;
        }
        Dpc::RingClient => {
            let waiting = x.d_req_prod_seen.wrapping_sub(x.d_req_cons);
            let window = x.answered + x.on_device + waiting;
            // The response ring's room, as the driver sees it (a load), only when the
            // client asked to be rung at its last answer.
            let hold = (r.last_only || x.c_last_only) && {
                let free = s.resp_cap - x.d_resp_prod.wrapping_sub(x.dload(Loc::RespCons));
                let owed = x.on_device + waiting;
                crate::block::may_hold_ring(
                    true,
                    if r.hold_needs_room { u32::from(free) } else { u32::MAX },
                    u32::from(owed),
                )
            };
            if crate::block::ring_client_now(u32::from(x.answered), u32::from(window), hold) {
                if r.ring_at_sleep {
                    x.ring_due = true;
                } else {
                    x.drain_d();
                    x.c_bits = true;
                }
                x.answered = 0;
            }
            x.dpc = Dpc::EndPass;
        }
        Dpc::EndPass => {
            if x.progress {
                x.progress = false;
                x.dpc = Dpc::Complete;
            } else if x.on_device >= s.depth {
                // Device full: its completion wakes the driver; no doorbell wanted.
                x.dpc = Dpc::Sleep;
            } else {
                x.dpc = if x.flag_set { Dpc::Fence } else { Dpc::SetFlag };
            }
        }
        Dpc::SetFlag => {
            x.dbuf.push(Loc::Flag, 1);
            x.flag_set = true;
            x.dpc = Dpc::Fence;
        }
        Dpc::Fence => {
            if r.driver_fence && x.dbuf.len > 0 {
                return None;
            }
            x.dpc = if r.driver_recheck { Dpc::RecheckReq } else { Dpc::Sleep };
        }
        Dpc::RecheckReq => {
            x.d_req_prod_seen = x.dload(Loc::ReqProd);
            x.dpc = if x.d_req_prod_seen != x.d_req_cons { Dpc::RecheckRoom } else { Dpc::Sleep };
        }
        Dpc::RecheckRoom => {
            let free = s.resp_cap - x.d_resp_prod.wrapping_sub(x.dload(Loc::RespCons));
            // Requests it could take: go round again (the flag stays up meanwhile).
            x.dpc = if free > x.on_device { Dpc::Top } else { Dpc::Sleep };
        }
        Dpc::Sleep => {
            if x.ring_due {
                // The hypercall (an exit) empties the store buffer, then rings.
                x.drain_d();
                x.c_bits = true;
                x.ring_due = false;
                return Some(x);
            }
            if !x.irq {
                return None; // halted until an interrupt
            }
            x.dpc = if x.flag_set { Dpc::ClearFlag } else { Dpc::Top };
        }
        Dpc::ClearFlag => {
            x.dbuf.push(Loc::Flag, 0);
            x.flag_set = false;
            x.dpc = Dpc::Top;
        }
    }
    Some(x)
}

/// Every successor of a state, with what moved.
fn successors(st: &State, s: Sizes, r: Rules) -> Vec<(&'static str, State)> {
    let mut out = Vec::new();
    if let Some(mut x) = client_step(st, s, r) {
        if !r.tso {
            x.drain_c();
        }
        out.push(("client", x));
    }
    if let Some(mut x) = driver_step(st, s, r) {
        if !r.tso {
            x.drain_d();
        }
        out.push(("driver", x));
    }
    if st.cbuf.len > 0 {
        let mut x = *st;
        if let Some((l, v)) = x.cbuf.pop() {
            x.mem[l as usize] = v;
        }
        out.push(("client store reaches memory", x));
    }
    if st.dbuf.len > 0 {
        let mut x = *st;
        if let Some((l, v)) = x.dbuf.pop() {
            x.mem[l as usize] = v;
        }
        out.push(("driver store reaches memory", x));
    }
    if r.last_only_flips {
        let mut x = *st;
        x.c_last_only = !x.c_last_only;
        out.push(("client flips last-answer-only", x));
    }
    if st.dev_done < st.on_device {
        let mut x = *st;
        x.dev_done += 1;
        x.interrupt();
        out.push(("device completes", x));
    }
    out
}

/// Explores every interleaving; `Err` with a path to a state from which the end cannot be
/// reached (a wake-up lost for good). `Ok` with the number of states.
fn check(s: Sizes, r: Rules) -> Result<usize, Vec<(&'static str, State)>> {
    let start = State::new();
    let mut index: HashMap<State, usize> = HashMap::new();
    let mut states = vec![start];
    let mut parent: Vec<Option<(usize, &'static str)>> = vec![None];
    let mut preds: Vec<Vec<usize>> = vec![Vec::new()];
    index.insert(start, 0);
    let mut queue = VecDeque::from([0usize]);
    while let Some(i) = queue.pop_front() {
        let st = states[i];
        for (what, x) in successors(&st, s, r) {
            let j = match index.get(&x) {
                Some(&j) => j,
                None => {
                    let j = states.len();
                    states.push(x);
                    parent.push(Some((i, what)));
                    preds.push(Vec::new());
                    index.insert(x, j);
                    queue.push_back(j);
                    j
                }
            };
            preds[j].push(i);
        }
        assert!(states.len() < 5_000_000, "model too large");
    }
    // Backwards from the ends: every state must reach one.
    let mut reaches = vec![false; states.len()];
    let mut back: VecDeque<usize> = (0..states.len()).filter(|&i| states[i].finished(s)).collect();
    for &i in &back {
        reaches[i] = true;
    }
    while let Some(i) = back.pop_front() {
        for &p in &preds[i] {
            if !reaches[p] {
                reaches[p] = true;
                back.push_back(p);
            }
        }
    }
    match (0..states.len()).find(|&i| !reaches[i]) {
        None => Ok(states.len()),
        Some(bad) => {
            let mut path = Vec::new();
            let mut at = bad;
            while let Some((p, what)) = parent[at] {
                path.push((what, states[at]));
                at = p;
            }
            path.reverse();
            Err(path)
        }
    }
}

/// The sizes the tests run: a client within the response ring's capacity (the demo guest,
/// the VMM), and one beyond it (more outstanding than response slots: answers left unread
/// by a dead incarnation, or a client with a deeper window), each with a device holding
/// one request and one holding more.
const SIZES: [Sizes; 4] = [
    Sizes { n: 3, window: 2, req_cap: 2, resp_cap: 2, depth: 1 },
    Sizes { n: 4, window: 2, req_cap: 2, resp_cap: 2, depth: 2 },
    Sizes { n: 4, window: 3, req_cap: 2, resp_cap: 2, depth: 1 },
    Sizes { n: 4, window: 3, req_cap: 4, resp_cap: 2, depth: 2 },
];

fn report(path: &[(&'static str, State)]) -> String {
    let mut out = String::new();
    for (what, st) in path {
        out.push_str(&format!("  {what:<28} client {:?} driver {:?} mem {:?}\n", st.cpc, st.dpc, st.mem));
    }
    out
}

#[test]
fn no_wake_up_is_lost_in_any_interleaving() {
    for s in SIZES {
        match check(s, CORRECT) {
            Ok(n) => assert!(n > 100, "{s:?}: only {n} states: the model does not run"),
            Err(path) => panic!("{s:?}: a lost wake-up after {} steps:\n{}", path.len(), report(&path)),
        }
    }
}

/// Whether removing a rule is found (in some of the sizes).
fn found(r: Rules) -> bool {
    SIZES.iter().any(|&s| check(s, r).is_err())
}

#[test]
fn without_the_drivers_fence_a_wake_up_is_lost() {
    assert!(found(Rules { driver_fence: false, ..CORRECT }));
}

#[test]
fn without_the_clients_fence_a_wake_up_is_lost() {
    assert!(found(Rules { client_fence: false, ..CORRECT }));
}

#[test]
fn without_the_drivers_second_look_a_wake_up_is_lost() {
    assert!(found(Rules { driver_recheck: false, ..CORRECT }));
}

#[test]
fn a_driver_stopped_for_room_needs_the_clients_check_after_draining() {
    // A client with more outstanding than response slots: the driver stops taking, the
    // client drains the answers and waits for the rest, still on the request ring; nobody
    // rings (issue 9's "driver halted, nothing pending" stall, in its logical form: found
    // with and without store buffers). A client within the response ring's capacity never
    // gets there.
    for tso in [true, false] {
        let r = Rules { client_checks_after_drain: false, tso, ..CORRECT };
        assert!(SIZES.iter().filter(|s| s.window > s.resp_cap).all(|&s| check(s, r).is_err()), "tso {tso}");
        assert!(SIZES.iter().filter(|s| s.window <= s.resp_cap).all(|&s| check(s, r).is_ok()), "tso {tso}");
    }
}

#[test]
fn the_protocol_holds_with_sequentially_consistent_memory_too() {
    for s in SIZES {
        assert!(check(s, Rules { tso: false, ..CORRECT }).is_ok(), "{s:?}");
    }
}

#[test]
fn ringing_the_client_at_once_instead_of_at_sleep_holds_too() {
    for tso in [true, false] {
        for last_only in [false, true] {
            for s in SIZES {
                let r = Rules { ring_at_sleep: false, tso, last_only, ..CORRECT };
                assert!(check(s, r).is_ok(), "{s:?} tso {tso} last_only {last_only}");
            }
        }
    }
}

#[test]
fn a_client_rung_at_its_last_answer_only_loses_no_wake_up() {
    for tso in [true, false] {
        for s in SIZES {
            let r = Rules { last_only: true, tso, ..CORRECT };
            match check(s, r) {
                Ok(n) => assert!(n > 100, "{s:?}: only {n} states"),
                Err(path) => panic!("{s:?} tso {tso}: a lost wake-up after {} steps:\n{}", path.len(), report(&path)),
            }
        }
    }
}

#[test]
fn a_client_that_flips_last_answer_only_at_any_moment_loses_no_wake_up() {
    // The flag is guest-written: set, then more submitted; cleared mid-window; set again.
    // Store buffers only: every sequentially consistent run is one of theirs (each store
    // may reach memory at once).
    for s in SIZES {
        let r = Rules { last_only_flips: true, ..CORRECT };
        if let Err(path) = check(s, r) {
            panic!("{s:?}: a lost wake-up after {} steps:\n{}", path.len(), report(&path));
        }
    }
}

#[test]
fn holding_the_ring_back_while_short_of_response_slots_loses_a_wake_up() {
    // A client with more outstanding than response slots, rung at its last answer only
    // whatever the room: the driver stops for want of a slot with requests still on the
    // ring, so the last answer never comes, and the client waits for a ring.
    let r = Rules { last_only: true, hold_needs_room: false, ..CORRECT };
    assert!(SIZES.iter().filter(|s| s.window > s.resp_cap).all(|&s| check(s, r).is_err()));
}

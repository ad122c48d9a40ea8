//! The client's half of a block channel that survives its server: it keeps every request
//! it has not seen answered, replays them when a new driver incarnation attaches, and
//! ignores answers from dead incarnations and duplicates (the rules are in
//! [`crate::block`], "Restarts"). Portable (no doorbells, no clocks): the domain around it
//! rings doorbells and decides how long to wait; host tests drive it against a fake driver.

use crate::block::{BlockLayout, Op, Request, Response};
use crate::ring::{RingError, SharedMem};

/// Requests outstanding at most: the deep ring's capacity ([`Client::create_deep`]); a
/// client on a smaller ring is limited to that ring's capacity.
pub const MAX_OUTSTANDING: usize = crate::block::DEEP_RING_CAPACITY as usize;

#[derive(Clone, Copy, Debug)]
struct Entry {
    req: Request,
    /// On the request ring for the current incarnation (or for a driver not seen yet).
    sent: bool,
    /// The request-ring index it was put at (when `sent`).
    at: u32,
}

/// Why the client could not go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientError {
    /// As many requests as the ring holds (at most [`MAX_OUTSTANDING`]) are unanswered
    /// already.
    TooMany,
    /// A ring is corrupt: the driver broke the protocol.
    Ring,
    /// dom0 gave up restarting the driver ([`crate::block::SERVER_GONE`]): every request
    /// outstanding was dropped, and new ones fail until dom0 builds a driver again.
    ServerGone,
}

impl From<RingError> for ClientError {
    fn from(_: RingError) -> Self {
        ClientError::Ring
    }
}

/// What a poll found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Polled {
    /// A new incarnation attached since the last poll (requests were sent again).
    pub restarted: bool,
    /// Requests put on the request ring by this poll (replays and ones that did not fit
    /// before): the driver's doorbell should be rung.
    pub sent: usize,
}

/// The client state of one block channel.
///
/// Every operation on the common path is O(1) (a client polls for every answer, and under
/// emulation a scan of the whole table per request costs as much as the request): request
/// `id` lives in slot `id % MAX_OUTSTANDING`; an id whose slot is still taken by an older
/// request is skipped (ids only have to be unique and increasing, not consecutive).
#[derive(Debug)]
pub struct Client {
    layout: BlockLayout,
    /// The incarnation whose answers are accepted (0 until a driver attached).
    incarnation: u32,
    /// Outstanding requests, request `id` in slot `id % MAX_OUTSTANDING`.
    pending: [Option<Entry>; MAX_OUTSTANDING],
    /// How many slots of `pending` are taken.
    count: usize,
    /// Requests outstanding at most: the ring's capacity (at most [`MAX_OUTSTANDING`]).
    limit: usize,
    /// How many outstanding requests are not on the ring (`sent` false).
    unsent: usize,
    /// Requests pushed or answers taken since [`Self::doorbell_needed`] last looked.
    moved: bool,
    next_id: u64,
    /// Incarnation changes seen.
    pub restarts: u64,
    /// Answers dropped: from a dead incarnation, or for requests already answered.
    pub ignored: u64,
}

/// The slot of request `id` in [`Client::pending`].
fn slot(id: u64) -> usize {
    (id % MAX_OUTSTANDING as u64) as usize
}

impl Client {
    /// Lays out `mem` ([`BlockLayout::standard`]), creates empty rings and writes the header
    /// (the client's setup, before the driver is told about the region).
    pub fn create<M: SharedMem + ?Sized>(mem: &M) -> Result<Self, ClientError> {
        let layout = BlockLayout::standard(mem.len()).map_err(|_| ClientError::Ring)?;
        Self::create_with(mem, layout)
    }

    /// As [`Self::create`], with [`BlockLayout::deep`]: up to [`MAX_OUTSTANDING`] requests
    /// in flight if the region is large enough, so a client with many requests in flight
    /// is woken less often per request.
    pub fn create_deep<M: SharedMem + ?Sized>(mem: &M) -> Result<Self, ClientError> {
        let layout = BlockLayout::deep(mem.len()).map_err(|_| ClientError::Ring)?;
        Self::create_with(mem, layout)
    }

    fn create_with<M: SharedMem + ?Sized>(mem: &M, layout: BlockLayout) -> Result<Self, ClientError> {
        layout.guest_rings(mem)?;
        layout.write(mem).map_err(|_| ClientError::Ring)?;
        Ok(Self {
            layout,
            incarnation: 0,
            pending: [None; MAX_OUTSTANDING],
            count: 0,
            limit: (layout.ring_capacity() as usize).min(MAX_OUTSTANDING),
            unsent: 0,
            moved: false,
            next_id: 1,
            restarts: 0,
            ignored: 0,
        })
    }

    /// The layout in use.
    pub fn layout(&self) -> &BlockLayout {
        &self.layout
    }

    /// Requests not answered yet.
    pub fn outstanding(&self) -> usize {
        self.count
    }

    /// Whether request `id` is still unanswered.
    pub fn is_outstanding(&self, id: u64) -> bool {
        self.pending[slot(id)].is_some_and(|e| e.req.id == id)
    }

    /// Whether any request with an id up to `last` is still unanswered.
    pub fn any_outstanding_up_to(&self, last: u64) -> bool {
        self.pending.iter().flatten().any(|e| e.req.id <= last)
    }

    /// The id the next request will get (or a later one, if its slot is taken).
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// The incarnation whose answers are accepted.
    pub fn incarnation(&self) -> u32 {
        self.incarnation
    }

    /// The rings' indices as they are in the region now, for a stall report: request ring
    /// (producer: this client, consumer: the driver), response ring (producer: the driver,
    /// consumer: this client). Raw reads: nothing is checked or moved.
    pub fn ring_indices<M: SharedMem + ?Sized>(&self, mem: &M) -> [u32; 4] {
        let (rq, rs) = (self.layout.request_ring_offset(), self.layout.response_ring_offset());
        [
            mem.read_u32(rq + crate::ring::PRODUCER_INDEX_OFFSET),
            mem.read_u32(rq + crate::ring::CONSUMER_INDEX_OFFSET),
            mem.read_u32(rs + crate::ring::PRODUCER_INDEX_OFFSET),
            mem.read_u32(rs + crate::ring::CONSUMER_INDEX_OFFSET),
        ]
    }

    /// Queue a request (its buffer must stay untouched until it is answered) and put it on
    /// the ring if there is room (else a later [`Self::poll`] does). Returns its id.
    pub fn submit<M: SharedMem + ?Sized>(
        &mut self,
        mem: &M,
        op: Op,
        sector: u64,
        count: u32,
        data_offset: u32,
    ) -> Result<u64, ClientError> {
        self.submitter(mem)?.submit(op, sector, count, data_offset)
    }

    /// For several requests in a row: the checks [`Self::submit`] makes once per call
    /// (whether dom0 gave up on the driver, the request ring's header) are made once for
    /// all of them (under emulation every read of the shared header costs).
    pub fn submitter<'c, 'm, M: SharedMem + ?Sized>(
        &'c mut self,
        mem: &'m M,
    ) -> Result<Submitter<'c, 'm, M>, ClientError> {
        self.check_server(mem)?;
        Ok(Submitter { client: self, mem, requests: None })
    }

    /// Puts unsent requests on the ring, oldest first, while it has room; how many.
    fn send_unsent<M: SharedMem + ?Sized>(&mut self, mem: &M) -> Result<usize, ClientError> {
        if self.unsent == 0 {
            return Ok(0);
        }
        let mut requests = self.layout.guest_requests_attach(mem)?;
        let mut sent = 0;
        while self.unsent > 0 {
            // Oldest unsent first: replays keep the order the client submitted in.
            let Some(e) = self.pending.iter_mut().flatten().filter(|e| !e.sent).min_by_key(|e| e.req.id) else {
                self.unsent = 0; // cannot happen: the count says otherwise
                break;
            };
            let at = requests.index();
            match requests.push(&e.req.encode()) {
                Ok(()) => {
                    e.sent = true;
                    e.at = at;
                    self.unsent -= 1;
                    self.moved = true;
                    sent += 1;
                }
                Err(RingError::Full) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(sent)
    }

    /// Whether the driver must be rung now: call it after pushing requests and after
    /// taking answers, at the latest before waiting for answers (see [`crate::block`],
    /// "Doorbells"). True when something moved since the last look (requests pushed,
    /// answers taken: either may be what a sleeping driver waits for), the driver asked
    /// for its doorbell (read after a full fence, [`BlockLayout::doorbell_wanted`]) and
    /// requests are still on the request ring. A client may always ring anyway; after a
    /// replay it must ([`Polled::sent`]), whatever this says.
    pub fn doorbell_needed<M: SharedMem + ?Sized>(&mut self, mem: &M) -> Result<bool, ClientError> {
        if !core::mem::take(&mut self.moved) {
            return Ok(false);
        }
        if !BlockLayout::doorbell_wanted(mem) {
            return Ok(false);
        }
        let mut requests = self.layout.guest_requests_attach(mem)?;
        Ok(requests.len()? > 0)
    }

    /// Look at the channel: a new incarnation makes every outstanding request it did not
    /// find on its ring unsent (replayed here, as far as the ring has room); unsent requests
    /// go on the ring.
    pub fn poll<M: SharedMem + ?Sized>(&mut self, mem: &M) -> Result<Polled, ClientError> {
        self.check_server(mem)?;
        let now = BlockLayout::incarnation(mem);
        let restarted = now != self.incarnation;
        if restarted {
            self.incarnation = now;
            self.restarts += 1;
            // Put below the new driver's attach index: dropped at attach, or taken by a dead
            // incarnation: send again. At or above it: on the new driver's ring already.
            let from = BlockLayout::attach_index(mem);
            for e in self.pending.iter_mut().flatten() {
                if e.sent && (from.wrapping_sub(e.at) as i32) > 0 {
                    e.sent = false;
                    self.unsent += 1;
                }
            }
        }
        let sent = self.send_unsent(mem)?;
        Ok(Polled { restarted, sent })
    }

    /// Fails with [`ClientError::ServerGone`] (dropping every outstanding request: nobody
    /// will answer them) while dom0 says the driver is gone.
    fn check_server<M: SharedMem + ?Sized>(&mut self, mem: &M) -> Result<(), ClientError> {
        if !BlockLayout::server_gone(mem) {
            return Ok(());
        }
        self.pending = [None; MAX_OUTSTANDING];
        (self.count, self.unsent) = (0, 0);
        Err(ClientError::ServerGone)
    }

    /// The next answer to an outstanding request from the current incarnation, if one is
    /// on the response ring; answers from other incarnations and duplicates are dropped.
    /// Call [`Self::poll`] first (it notices restarts).
    pub fn next_response<M: SharedMem + ?Sized>(&mut self, mem: &M) -> Result<Option<Response>, ClientError> {
        let mut responses = self.layout.guest_responses_attach(mem)?;
        loop {
            let Some(s) = responses.pop_batched()? else { return Ok(None) };
            if let Some(r) = self.accept(&s) {
                return Ok(Some(r));
            }
        }
    }

    /// Every answer on the response ring, as [`Self::next_response`] takes them (with one
    /// attach of the ring and one read of its producer index per batch), given to `f`;
    /// how many. Call [`Self::poll`] first.
    pub fn take_responses<M: SharedMem + ?Sized>(
        &mut self,
        mem: &M,
        mut f: impl FnMut(Response),
    ) -> Result<usize, ClientError> {
        let mut responses = self.layout.guest_responses_attach(mem)?;
        let mut n = 0;
        while let Some(s) = responses.pop_batched()? {
            if let Some(r) = self.accept(&s) {
                f(r);
                n += 1;
            }
        }
        Ok(n)
    }

    /// One slot taken off the response ring: the answer if it is the current incarnation's
    /// to a request outstanding and sent to it (then no longer outstanding); else dropped.
    fn accept(&mut self, s: &[u8; crate::block::SLOT_SIZE]) -> Option<Response> {
        // A slot freed: a driver that stopped taking for want of one may need a ring.
        self.moved = true;
        let r = Response::decode(s);
        if r.incarnation != self.incarnation || self.incarnation == 0 {
            self.ignored += 1;
            return None;
        }
        let e = &mut self.pending[slot(r.id)];
        if e.is_some_and(|e| e.req.id == r.id && e.sent) {
            *e = None;
            self.count -= 1;
            return Some(r);
        }
        self.ignored += 1;
        None
    }
}

/// Requests submitted in a row ([`Client::submitter`]): the request ring is attached once,
/// at the first request that goes straight onto it, and its consumer index is read again
/// only when the ring looks full ([`crate::ring::Producer::push_batched`]).
pub struct Submitter<'c, 'm, M: SharedMem + ?Sized> {
    client: &'c mut Client,
    mem: &'m M,
    requests: Option<crate::block::RequestProducer<'m, M>>,
}

impl<M: SharedMem + ?Sized> Submitter<'_, '_, M> {
    /// As [`Client::submit`]. Inlined: a batch calls it once per request, and under
    /// emulation the call itself (saving and restoring registers) costs a fifth of it.
    #[inline(always)]
    pub fn submit(&mut self, op: Op, sector: u64, count: u32, data_offset: u32) -> Result<u64, ClientError> {
        let c = &mut *self.client;
        if c.count >= c.limit {
            return Err(ClientError::TooMany);
        }
        // A free slot exists: at most MAX_OUTSTANDING - 1 ids are skipped.
        while c.pending[slot(c.next_id)].is_some() {
            c.next_id += 1;
        }
        let id = c.next_id;
        let req = Request { id, op, sector, count, data_offset, data_len: count.saturating_mul(512) };
        c.next_id += 1;
        c.count += 1;
        if c.unsent == 0 {
            // Nothing older waits to be sent: this one goes straight on the ring.
            let requests = match self.requests.as_mut() {
                Some(r) => r,
                None => match c.layout.guest_requests_attach(self.mem) {
                    Ok(r) => self.requests.insert(r),
                    Err(e) => {
                        c.pending[slot(id)] = Some(Entry { req, sent: false, at: 0 });
                        c.unsent += 1;
                        return Err(e.into());
                    }
                },
            };
            let at = requests.index();
            let sent = match requests.push_batched(&req.encode()) {
                Ok(()) => true,
                Err(RingError::Full) => false,
                Err(e) => {
                    c.pending[slot(id)] = Some(Entry { req, sent: false, at: 0 });
                    c.unsent += 1;
                    return Err(e.into());
                }
            };
            c.pending[slot(id)] = Some(Entry { req, sent, at });
            c.unsent += usize::from(!sent);
            c.moved |= sent;
            return Ok(id);
        }
        c.pending[slot(id)] = Some(Entry { req, sent: false, at: 0 });
        c.unsent += 1;
        // The ring may be attached here: `send_unsent` attaches its own (and moves the
        // producer index), so this one is dropped first.
        self.requests = None;
        c.send_unsent(self.mem)?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::collections::HashMap;
    use std::vec::Vec;

    use super::*;
    use crate::block::{validate, DiskInfo, Status, Validated};
    use crate::ring::ByteMem;

    const REGION: usize = 64 * 1024;
    const DISK: DiskInfo =
        DiskInfo { capacity_sectors: 64, sector_size: 512, max_sectors_per_request: 8, read_only: false };

    /// A driver on the same memory: a disk image, and an incarnation number.
    struct Driver {
        disk: Vec<u8>,
        incarnation: u32,
    }

    impl Driver {
        fn attach(mem: &ByteMem, disk: Vec<u8>) -> Self {
            let layout = BlockLayout::read(mem).unwrap();
            let incarnation = layout.driver_attach(mem).unwrap();
            Self { disk, incarnation }
        }

        /// Take up to `n` requests and execute them; answers are returned, not pushed.
        fn take(&mut self, mem: &ByteMem, n: usize) -> Vec<Response> {
            let layout = BlockLayout::read(mem).unwrap();
            let (mut requests, _) = layout.driver_rings(mem).unwrap();
            let mut out = Vec::new();
            for _ in 0..n {
                let Some(slot) = requests.pop().unwrap() else { break };
                let req = Request::decode(&slot);
                let status = match validate(&req, &layout, DISK) {
                    Ok(Validated::Write(t)) => {
                        let at = t.sector() as usize * 512;
                        mem.read_bytes(t.data_offset(), &mut self.disk[at..at + t.data_len()]);
                        Status::Ok
                    }
                    Ok(Validated::Read(t)) => {
                        let at = t.sector() as usize * 512;
                        mem.write_bytes(t.data_offset(), &self.disk[at..at + t.data_len()]);
                        Status::Ok
                    }
                    Ok(_) => Status::Ok,
                    Err(s) => s,
                };
                out.push(Response::new(req.id, status).from(self.incarnation));
            }
            out
        }

        fn answer(mem: &ByteMem, answers: &[Response]) {
            let layout = BlockLayout::read(mem).unwrap();
            let (_, mut responses) = layout.driver_rings(mem).unwrap();
            for r in answers {
                responses.push(&r.encode()).unwrap();
            }
        }
    }

    fn drain(client: &mut Client, mem: &ByteMem) -> Vec<u64> {
        let mut ids = Vec::new();
        client.poll(mem).unwrap();
        while let Some(r) = client.next_response(mem).unwrap() {
            assert_eq!(r.status, Status::Ok);
            ids.push(r.id);
        }
        ids
    }

    /// Write `n` distinct sectors (sector i holds byte i+1), return the ids by sector.
    /// Incarnations that each execute `take(round)` requests, answer half of them and die,
    /// then one that serves until nothing is outstanding (`batch` a round). Returns how
    /// many answers the client took, and the last incarnation (its disk).
    fn restarts_then_serve(
        client: &mut Client,
        mem: &ByteMem,
        mut disk: Vec<u8>,
        takes: impl Iterator<Item = usize>,
        batch: usize,
    ) -> (usize, Driver) {
        let mut answered = 0;
        for n in takes {
            let mut d = Driver::attach(mem, disk);
            client.poll(mem).unwrap();
            let answers = d.take(mem, n);
            Driver::answer(mem, &answers[..answers.len() / 2]);
            answered += drain(client, mem).len();
            disk = d.disk;
        }
        let mut d = Driver::attach(mem, disk);
        while client.outstanding() > 0 {
            client.poll(mem).unwrap();
            let answers = d.take(mem, batch);
            Driver::answer(mem, &answers);
            answered += drain(client, mem).len();
        }
        (answered, d)
    }

    fn write_all(client: &mut Client, mem: &ByteMem, n: u64) -> HashMap<u64, u64> {
        let data = client.layout().data_offset();
        let mut ids = HashMap::new();
        for i in 0..n {
            let off = data + i as usize * 512;
            mem.write_bytes(off, &[i as u8 + 1; 512]);
            ids.insert(client.submit(mem, Op::Write, i, 1, off as u32).unwrap(), i);
        }
        ids
    }

    /// The driver's side of "Doorbells": about to sleep with room, it asks for the
    /// doorbell and looks once more; whether it may sleep.
    fn driver_may_sleep(mem: &ByteMem) -> bool {
        let layout = BlockLayout::read(mem).unwrap();
        BlockLayout::set_doorbell_wanted(mem, true);
        let (mut requests, _) = layout.driver_rings(mem).unwrap();
        requests.is_empty().unwrap()
    }

    #[test]
    fn a_sleeping_driver_is_rung_and_a_busy_one_is_not() {
        let mut bytes = vec![0u8; REGION];
        let mem = ByteMem::new(&mut bytes);
        let mut client = Client::create(&mem).unwrap();
        // No driver yet: the fresh header asks for doorbells.
        write_all(&mut client, &mem, 1);
        assert!(client.doorbell_needed(&mem).unwrap());
        let mut d = Driver::attach(&mem, vec![0; 64 * 512]);
        client.poll(&mem).unwrap();
        Driver::answer(&mem, &d.take(&mem, 64));
        drain(&mut client, &mem);
        // The driver sleeps with room: the next request rings it.
        assert!(driver_may_sleep(&mem));
        write_all(&mut client, &mem, 1);
        assert!(client.doorbell_needed(&mem).unwrap());
        // It wakes (flag cleared) and works: requests added meanwhile need no doorbell.
        BlockLayout::set_doorbell_wanted(&mem, false);
        write_all(&mut client, &mem, 2);
        assert!(!client.doorbell_needed(&mem).unwrap());
        // Requests that came before its second look keep it awake: nothing is lost.
        assert!(!driver_may_sleep(&mem));
        Driver::answer(&mem, &d.take(&mem, 64));
        assert_eq!(drain(&mut client, &mem).len(), 3);
        // With the flag up but every request already taken, there is nothing to ring for.
        assert!(driver_may_sleep(&mem));
        assert!(!client.doorbell_needed(&mem).unwrap());
    }

    #[test]
    fn a_slow_request_does_not_block_its_slot_for_the_others() {
        let mut bytes = vec![0u8; REGION];
        let mem = ByteMem::new(&mut bytes);
        let mut client = Client::create(&mem).unwrap();
        let mut d = Driver::attach(&mem, vec![0; 64 * 512]);
        client.poll(&mem).unwrap();
        let first = client.submit(&mem, Op::Read, 0, 1, client.layout().data_offset() as u32).unwrap();
        let held = d.take(&mem, 1);
        // Many rounds of other requests pass the one held by the driver.
        let mut ids = Vec::new();
        for _ in 0..3 {
            let batch: Vec<u64> = write_all(&mut client, &mem, 40).into_keys().collect();
            assert!(batch.iter().all(|&id| id != first && !ids.contains(&id)), "ids are never reused");
            Driver::answer(&mem, &d.take(&mem, 64));
            let mut done = drain(&mut client, &mem);
            done.sort();
            let mut want = batch.clone();
            want.sort();
            assert_eq!(done, want);
            ids.extend(batch);
        }
        assert!(client.is_outstanding(first));
        assert_eq!(client.outstanding(), 1);
        Driver::answer(&mem, &held);
        assert_eq!(drain(&mut client, &mem), vec![first]);
        assert_eq!(client.outstanding(), 0);
    }

    #[test]
    fn a_batch_submits_and_takes_answers_as_single_calls_do() {
        let mut bytes = vec![0u8; REGION];
        let mem = ByteMem::new(&mut bytes);
        let mut client = Client::create(&mem).unwrap();
        let mut d = Driver::attach(&mem, vec![0; 64 * 512]);
        client.poll(&mem).unwrap();
        let data = client.layout().data_offset() as u32;
        let mut ids = Vec::new();
        {
            let mut batch = client.submitter(&mem).unwrap();
            for i in 0..5 {
                ids.push(batch.submit(Op::Read, i, 1, data + i as u32 * 512).unwrap());
            }
        }
        // One more through the single call, after the batch: the ring index continues.
        ids.push(client.submit(&mem, Op::Read, 5, 1, data + 5 * 512).unwrap());
        assert_eq!(client.ring_indices(&mem)[0], 6);
        let answers = d.take(&mem, 64);
        assert_eq!(answers.iter().map(|r| r.id).collect::<Vec<_>>(), ids);
        // Answers doubled, plus one from a dead incarnation: each request completes once.
        let mut pushed: Vec<Response> = answers.iter().chain(answers.iter()).copied().collect();
        pushed.push(Response::new(ids[0], Status::Ok).from(d.incarnation.wrapping_sub(1)));
        Driver::answer(&mem, &pushed);
        let mut got = Vec::new();
        assert_eq!(client.take_responses(&mem, |r| got.push(r.id)).unwrap(), 6);
        assert_eq!(got, ids);
        assert_eq!(client.ignored, 7);
        assert_eq!(client.outstanding(), 0);
        // Nothing left: a second batch takes none (after a fresh look at the ring).
        assert_eq!(client.take_responses(&mem, |_| {}).unwrap(), 0);
        // A batch fails like a single call once dom0 gave up on the driver.
        BlockLayout::set_server_gone(&mem, true);
        assert_eq!(client.submitter(&mem).err(), Some(ClientError::ServerGone));
    }

    #[test]
    fn ring_indices_show_where_requests_are() {
        let mut bytes = vec![0u8; REGION];
        let mem = ByteMem::new(&mut bytes);
        let mut client = Client::create(&mem).unwrap();
        let mut d = Driver::attach(&mem, vec![0; 64 * 512]);
        write_all(&mut client, &mem, 3);
        assert_eq!(client.ring_indices(&mem), [3, 0, 0, 0], "on the request ring, not taken");
        let answers = d.take(&mem, 2);
        assert_eq!(client.ring_indices(&mem), [3, 2, 0, 0], "two taken, none answered");
        Driver::answer(&mem, &answers);
        assert_eq!(client.ring_indices(&mem), [3, 2, 2, 0], "two answers wait for the client");
        assert_eq!(drain(&mut client, &mem).len(), 2);
        assert_eq!(client.ring_indices(&mem), [3, 2, 2, 2]);
        assert_eq!(client.outstanding(), 1);
    }

    #[test]
    fn lost_answers_are_replayed_to_the_next_incarnation() {
        let mut bytes = vec![0u8; REGION];
        let mem = ByteMem::new(&mut bytes);
        let mut client = Client::create(&mem).unwrap();
        let mut d1 = Driver::attach(&mem, vec![0; 64 * 512]);
        let ids = write_all(&mut client, &mem, 8);
        // The first driver takes 5, answers 2 and dies; the disk keeps what it wrote.
        let answers = d1.take(&mem, 5);
        Driver::answer(&mem, &answers[..2]);
        let done = drain(&mut client, &mem);
        assert_eq!(done.len(), 2);
        assert_eq!(client.outstanding(), 6);
        // The next one drops what was left on the ring, the client replays all six.
        let mut d2 = Driver::attach(&mem, d1.disk);
        assert!(client.poll(&mem).unwrap().restarted);
        let answers = d2.take(&mem, 64);
        assert_eq!(answers.len(), 6, "every unanswered request is replayed once");
        Driver::answer(&mem, &answers);
        let mut all = done;
        all.extend(drain(&mut client, &mem));
        all.sort();
        let mut want: Vec<u64> = ids.keys().copied().collect();
        want.sort();
        assert_eq!(all, want);
        assert_eq!(client.outstanding(), 0);
        for s in 0..8usize {
            assert!(d2.disk[s * 512..(s + 1) * 512].iter().all(|&b| b == s as u8 + 1), "sector {s}");
        }
    }

    #[test]
    fn answers_from_a_dead_incarnation_are_ignored() {
        let mut bytes = vec![0u8; REGION];
        let mem = ByteMem::new(&mut bytes);
        let mut client = Client::create(&mem).unwrap();
        let mut d1 = Driver::attach(&mem, vec![0; 64 * 512]);
        write_all(&mut client, &mem, 4);
        let stale = d1.take(&mem, 4);
        // A new incarnation attaches before the old one's answers are read (they were pushed
        // by the dead driver, or are late): all are dropped, everything is replayed.
        let mut d2 = Driver::attach(&mem, d1.disk);
        Driver::answer(&mem, &stale);
        assert!(client.poll(&mem).unwrap().restarted);
        assert_eq!(client.next_response(&mem).unwrap(), None);
        assert_eq!(client.ignored, 4);
        assert_eq!(client.outstanding(), 4);
        let answers = d2.take(&mem, 64);
        assert_eq!(answers.len(), 4);
        Driver::answer(&mem, &answers);
        assert_eq!(drain(&mut client, &mem).len(), 4);
        assert_eq!(client.outstanding(), 0);
    }

    #[test]
    fn duplicated_answers_complete_a_request_once() {
        let mut bytes = vec![0u8; REGION];
        let mem = ByteMem::new(&mut bytes);
        let mut client = Client::create(&mem).unwrap();
        let mut d = Driver::attach(&mem, vec![0; 64 * 512]);
        write_all(&mut client, &mem, 3);
        let answers = d.take(&mem, 3);
        let doubled: Vec<Response> = answers.iter().chain(answers.iter()).copied().collect();
        Driver::answer(&mem, &doubled);
        assert_eq!(drain(&mut client, &mem).len(), 3);
        assert_eq!(client.ignored, 3);
        // An answer to an id never sent is ignored too.
        Driver::answer(&mem, &[Response::new(999, Status::Ok).from(d.incarnation)]);
        assert_eq!(drain(&mut client, &mem).len(), 0);
        assert_eq!(client.ignored, 4);
    }

    #[test]
    fn answers_before_any_driver_attached_are_ignored() {
        let mut bytes = vec![0u8; REGION];
        let mem = ByteMem::new(&mut bytes);
        let mut client = Client::create(&mem).unwrap();
        write_all(&mut client, &mem, 1);
        // A forged answer with incarnation 0 before any driver announced itself.
        let layout = *client.layout();
        let (_, mut responses) = layout.driver_rings(&mem).unwrap();
        responses.push(&Response::new(1, Status::Ok).encode()).unwrap();
        assert_eq!(drain(&mut client, &mem).len(), 0);
        assert_eq!(client.outstanding(), 1);
    }

    #[test]
    fn replay_survives_a_full_ring_and_many_restarts() {
        let mut bytes = vec![0u8; REGION];
        let mem = ByteMem::new(&mut bytes);
        let mut client = Client::create(&mem).unwrap();
        let disk = vec![0; 64 * 512];
        let n = MAX_OUTSTANDING as u64;
        // The first writes cover sectors 0..64 (64 requests, the whole ring).
        let ids = write_all(&mut client, &mem, n.min(64));
        assert_eq!(client.submit(&mem, Op::Flush, 0, 0, 0), Err(ClientError::TooMany));
        // Each incarnation executes a few, answers some of them and dies.
        let (answered, d) = restarts_then_serve(&mut client, &mem, disk, (0..20).map(|r| 3 + r % 5), 64);
        assert_eq!(answered, ids.len());
        assert_eq!(client.restarts, 21);
        for s in 0..64usize {
            assert!(d.disk[s * 512..(s + 1) * 512].iter().all(|&b| b == s as u8 + 1), "sector {s}");
        }
    }

    #[test]
    fn a_deep_ring_replays_a_full_window_across_restarts() {
        // A region with a 4 KiB buffer per deep-ring entry: MAX_OUTSTANDING in flight.
        let mut bytes = vec![0u8; 2 << 20];
        let mem = ByteMem::new(&mut bytes);
        let mut client = Client::create_deep(&mem).unwrap();
        assert_eq!(client.layout().ring_capacity() as usize, MAX_OUTSTANDING);
        // Request i writes sector i % 64 (the test disk's size) from its own buffer, with
        // the same bytes as every other write of that sector: order does not matter.
        let disk = vec![0; 64 * 512];
        let data = client.layout().data_offset();
        let mut ids = HashMap::new();
        for i in 0..MAX_OUTSTANDING {
            let off = data + i * 512;
            mem.write_bytes(off, &[(i % 64) as u8 + 1; 512]);
            ids.insert(client.submit(&mem, Op::Write, (i % 64) as u64, 1, off as u32).unwrap(), i);
        }
        assert_eq!(client.outstanding(), MAX_OUTSTANDING);
        assert_eq!(client.submit(&mem, Op::Flush, 0, 0, 0), Err(ClientError::TooMany));
        // Each incarnation executes many, answers half of them and dies.
        let takes = (0..10).map(|r| 40 + r * 7);
        let (answered, d) = restarts_then_serve(&mut client, &mem, disk, takes, MAX_OUTSTANDING);
        assert_eq!(answered, ids.len());
        for s in 0..64 {
            assert!(d.disk[s * 512..(s + 1) * 512].iter().all(|&b| b == s as u8 + 1), "sector {s}");
        }
    }

    #[test]
    fn a_server_given_up_on_fails_everything_at_once_until_it_comes_back() {
        let mut bytes = vec![0u8; REGION];
        let mem = ByteMem::new(&mut bytes);
        let mut client = Client::create(&mem).unwrap();
        let d1 = Driver::attach(&mem, vec![0; 64 * 512]);
        write_all(&mut client, &mem, 3);
        assert_eq!(client.outstanding(), 3);
        // dom0 gives up on the driver: outstanding requests fail, and so does a new one.
        BlockLayout::set_server_gone(&mem, true);
        assert_eq!(client.poll(&mem), Err(ClientError::ServerGone));
        assert_eq!(client.outstanding(), 0);
        assert_eq!(client.submit(&mem, Op::Flush, 0, 0, 0), Err(ClientError::ServerGone));
        // dom0 builds the driver again (ctl restart): the channel works as before.
        BlockLayout::set_server_gone(&mem, false);
        let mut d2 = Driver::attach(&mem, d1.disk);
        let ids = write_all(&mut client, &mem, 2);
        assert!(client.poll(&mem).unwrap().restarted);
        // The two new ones were put on the new driver's ring before the client saw it: not
        // sent again. The three dropped ones are not sent again either.
        let answers = d2.take(&mem, 64);
        assert_eq!(answers.len(), 2);
        Driver::answer(&mem, &answers);
        let mut done = drain(&mut client, &mem);
        done.sort();
        let mut want: Vec<u64> = ids.keys().copied().collect();
        want.sort();
        assert_eq!(done, want);
    }

    /// A request put on the ring after the new driver attached but before the client saw
    /// the new incarnation is on the new driver's ring: it must not be sent a second time
    /// (a second copy of a write, still on the device after the first was answered, could
    /// land over a later write to the same sectors).
    #[test]
    fn a_request_already_on_the_new_drivers_ring_is_not_sent_twice() {
        let mut bytes = vec![0u8; REGION];
        let mem = ByteMem::new(&mut bytes);
        let mut client = Client::create(&mem).unwrap();
        let mut d1 = Driver::attach(&mem, vec![0; 64 * 512]);
        let first = write_all(&mut client, &mem, 2);
        // d1 takes the first, then dies; one more is put on the ring before d2 attaches.
        let taken = d1.take(&mem, 1);
        assert_eq!(taken.len(), 1);
        let data = client.layout().data_offset() + 8 * 512;
        mem.write_bytes(data, &[0xaa; 512]);
        let before = client.submit(&mem, Op::Write, 10, 1, data as u32).unwrap();
        let mut d2 = Driver::attach(&mem, d1.disk);
        // After the attach, before the client looks: this one is on d2's ring.
        let after = client.submit(&mem, Op::Write, 11, 1, data as u32).unwrap();
        assert!(client.poll(&mem).unwrap().restarted);
        let answers = d2.take(&mem, 64);
        let mut ids: Vec<u64> = answers.iter().map(|r| r.id).collect();
        ids.sort();
        let mut want: Vec<u64> = first.keys().copied().chain([before, after]).collect();
        want.sort();
        assert_eq!(ids, want, "each outstanding request reaches d2 exactly once");
        Driver::answer(&mem, &answers);
        assert_eq!(drain(&mut client, &mem).len(), 4);
        assert_eq!(client.outstanding(), 0);
    }
}

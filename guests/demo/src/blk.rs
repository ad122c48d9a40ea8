//! Block client: requests on the shared ring, a doorbell to the driver VM, responses back.
//! Data buffers are in the shared region's data area, so the device reads and writes them
//! directly (no copy in the driver VM).
//!
//! The channel survives its driver ([`ipc_spec::block_client`]): every request stays
//! outstanding until the current driver incarnation answers it; when dom0 replaces a dead
//! driver VM, the new one announces a new incarnation and the client sends every
//! outstanding request again. Only delay shows.
//!
//! The driver VM is still not trusted to answer: a request unanswered after
//! [`REQUEST_TIMEOUT_NS`] fails with [`ClientError::Timeout`], and until the driver answers
//! it (late, or a new incarnation does), every later request fails at once with
//! [`ClientError::NotAnswering`] instead of waiting again. When dom0 gives up on the driver
//! (its restart limit), it marks the channel and rings us: every request then fails at once
//! with [`ClientError::ServerGone`], without waiting for the timeout.

use alloc::boxed::Box;

use domain_rt::hypercall;
use domain_rt::shared::Region;
use ipc_spec::block::{DiskInfo, Op, Response, Status};
use ipc_spec::block_client::{self, Client};
use ipc_spec::ring::SharedMem;

/// How long a request may go unanswered before the client gives up on it. Generous: under
/// TCG a request takes milliseconds, a flush of the host's image file maybe a second.
pub const REQUEST_TIMEOUT_NS: u64 = 5_000_000_000;
/// The bit the timeout's timer sets on the channel's notification.
const TIMEOUT_BIT: u64 = 1 << 62;

pub struct BlockClient {
    region: Region,
    /// On the heap: with the deep ring's table of outstanding requests it is 10 KiB, and
    /// the client is moved through several frames of a 64 KiB stack (it overflowed there).
    core: Box<Client>,
    signal: u64,
    wait: u64,
    /// The newest request given up on (timed out) while the driver has not answered it:
    /// requests fail at once meanwhile.
    given_up: Option<u64>,
    /// Requests given up on so far.
    pub timeouts: u64,
    /// The timeout timer on `wait` is armed (for at most [`REQUEST_TIMEOUT_NS`]). It is
    /// left armed between waits and set again only after it fired: a hypercall per wait
    /// costs more than a request under emulation.
    timer_armed: bool,
}

/// Requests submitted in a row ([`BlockClient::submitter`]).
pub struct BlockSubmitter<'a> {
    inner: block_client::Submitter<'a, 'a, Region>,
}

impl BlockSubmitter<'_> {
    /// Queue a request (rung with [`BlockClient::kick_if_needed`]); returns its id.
    #[inline]
    pub fn submit(&mut self, op: Op, sector: u64, count: u32, data_offset: usize) -> Result<u64, ClientError> {
        Ok(self.inner.submit(op, sector, count, data_offset as u32)?)
    }
}

#[derive(Debug)]
pub enum ClientError {
    Layout,
    Ring,
    Doorbell(ipc_spec::Error),
    /// The driver VM did not answer within [`REQUEST_TIMEOUT_NS`].
    Timeout,
    /// An earlier request timed out and is still unanswered: not waiting again.
    NotAnswering,
    /// More requests outstanding than the ring holds.
    TooMany,
    /// dom0 gave up restarting the driver VM: nothing will answer.
    ServerGone,
}

impl ClientError {
    /// Whether the driver VM is just not answering (rather than having broken the protocol).
    pub fn is_silence(&self) -> bool {
        matches!(self, Self::Timeout | Self::NotAnswering | Self::ServerGone)
    }
}

impl core::fmt::Display for ClientError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Layout => f.write_str("the shared region cannot hold the block layout"),
            Self::Ring => f.write_str("the rings are corrupt (the driver broke the protocol)"),
            Self::Doorbell(e) => write!(f, "doorbell: {e}"),
            Self::Timeout => write!(f, "the driver VM did not answer within {} s", REQUEST_TIMEOUT_NS / 1_000_000_000),
            Self::NotAnswering => f.write_str("the driver VM has not answered an earlier request"),
            Self::TooMany => f.write_str("too many requests outstanding"),
            Self::ServerGone => f.write_str("server gone: dom0 gave up restarting the disk driver VM"),
        }
    }
}

impl From<block_client::ClientError> for ClientError {
    fn from(e: block_client::ClientError) -> Self {
        match e {
            block_client::ClientError::TooMany => ClientError::TooMany,
            block_client::ClientError::Ring => ClientError::Ring,
            block_client::ClientError::ServerGone => ClientError::ServerGone,
        }
    }
}

impl BlockClient {
    /// Lay out the region (rings + data area) and start with empty rings.
    pub fn new(region: Region, signal: u64, wait: u64) -> Result<Self, ClientError> {
        // The deep ring where the region is large enough: the block benchmark keeps up to
        // that many requests in flight, and the driver wakes it once per half of them.
        let core = Box::new(Client::create_deep(&region).map_err(|_| ClientError::Layout)?);
        Ok(Self { region, core, signal, wait, given_up: None, timeouts: 0, timer_armed: false })
    }

    /// The data area: where buffers go (offsets relative to the region).
    pub fn data_range(&self) -> core::ops::Range<usize> {
        self.core.layout().data_range()
    }

    /// Driver incarnations seen (the first attach counts: restarts survived plus one).
    pub fn restarts(&self) -> u64 {
        self.core.restarts
    }

    /// Send one request and wait for its response.
    pub fn request(&mut self, op: Op, sector: u64, count: u32, data_offset: u32) -> Result<Response, ClientError> {
        let id = self.submit(op, sector, count, data_offset as usize)?;
        self.kick_if_needed()?;
        loop {
            let r = self.complete()?;
            if r.id == id {
                return Ok(r);
            }
            // An answer to a request nobody waits for any more (submitted by a caller that
            // gave up on it): dropped.
        }
    }

    /// Queue a request (rung with [`Self::kick`]); returns its id.
    pub fn submit(&mut self, op: Op, sector: u64, count: u32, data_offset: usize) -> Result<u64, ClientError> {
        if ipc_spec::block::BlockLayout::server_gone(&self.region) {
            // Not a stall: nothing earlier is worth waiting for either.
            self.given_up = None;
            return Err(ClientError::ServerGone);
        }
        self.check_answering()?;
        Ok(self.core.submit(&self.region, op, sector, count, data_offset as u32)?)
    }

    /// For several requests in a row ([`BlockSubmitter::submit`]): the checks
    /// [`Self::submit`] makes per request are made once (under emulation each look at the
    /// shared header costs).
    pub fn submitter(&mut self) -> Result<BlockSubmitter<'_>, ClientError> {
        if ipc_spec::block::BlockLayout::server_gone(&self.region) {
            self.given_up = None;
            return Err(ClientError::ServerGone);
        }
        self.check_answering()?;
        let Self { region, core, .. } = self;
        Ok(BlockSubmitter { inner: core.submitter(region)? })
    }

    /// Ask the driver to ring only at the last answer (`true`: nothing more will be sent
    /// until then) or at half the window again (`false`); a hint (`ipc_spec::block`,
    /// "Doorbells"): the last answer always rings.
    pub fn last_answer_only(&mut self, on: bool) {
        ipc_spec::block::BlockLayout::set_last_answer_only(&self.region, on);
    }

    /// Ring the driver's doorbell for everything queued so far.
    pub fn kick(&mut self) -> Result<(), ClientError> {
        hypercall::signal(self.signal, 1).map_err(ClientError::Doorbell)
    }

    /// Ring the driver's doorbell for everything queued so far if it needs it: it sleeps
    /// and would not look at the ring otherwise (`ipc_spec::block`, "Doorbells"). A driver
    /// working on earlier requests takes these when one of those completes.
    pub fn kick_if_needed(&mut self) -> Result<(), ClientError> {
        if self.core.doorbell_needed(&self.region)? {
            self.kick()?;
        }
        Ok(())
    }

    /// Arm the timeout timer to fire in `ns` unless it is armed already. Every arming is
    /// for at most [`REQUEST_TIMEOUT_NS`] and every wait's deadline is that long after its
    /// start, so a timer armed earlier fires before the deadline of any later wait: at
    /// worst it wakes that wait early, which then arms it again for the rest.
    fn arm(&mut self, ns: u64) -> Result<(), ClientError> {
        if !self.timer_armed {
            hypercall::timer_set(self.wait, ns.max(1), TIMEOUT_BIT).map_err(ClientError::Doorbell)?;
            self.timer_armed = true;
        }
        Ok(())
    }

    /// Wait for the driver's doorbell or the timer; returns the bits. Rings the driver
    /// first if it sleeps on requests of ours: ones pushed, or ones it stopped taking for
    /// want of a response slot that the answers taken since have freed
    /// (`ipc_spec::block`, "Doorbells").
    fn wait_bits(&mut self) -> Result<u64, ClientError> {
        self.kick_if_needed()?;
        let bits = hypercall::wait(self.wait).map_err(ClientError::Doorbell)?;
        if bits & TIMEOUT_BIT != 0 {
            self.timer_armed = false;
        }
        Ok(bits)
    }

    /// The next response, waiting for the driver's doorbell if there is none yet, at most
    /// [`REQUEST_TIMEOUT_NS`] without any answer; then every request sent so far is given
    /// up on. A driver restart meanwhile replays what is outstanding and restarts the clock.
    /// No hypercall but the wait itself unless the timer fired.
    pub fn complete(&mut self) -> Result<Response, ClientError> {
        if let Some(r) = self.next_response()? {
            return Ok(r);
        }
        // The clock is read from the TSC (`hypercall::clock_ns`): no exit.
        let mut start = hypercall::clock_ns();
        let mut left = REQUEST_TIMEOUT_NS;
        loop {
            self.arm(left)?;
            let bits = self.wait_bits()?;
            let restarted = bits & !TIMEOUT_BIT != 0
                && self.core.incarnation() != ipc_spec::block::BlockLayout::incarnation(&self.region);
            if let Some(r) = self.next_response()? {
                return Ok(r);
            }
            if restarted {
                // A new driver: it starts from scratch on the replayed requests.
                start = hypercall::clock_ns();
                left = REQUEST_TIMEOUT_NS;
            } else if bits & TIMEOUT_BIT != 0 {
                let waited = hypercall::clock_ns().saturating_sub(start);
                if waited >= REQUEST_TIMEOUT_NS {
                    self.given_up = Some(self.core.next_id().saturating_sub(1));
                    self.timeouts += 1;
                    return Err(ClientError::Timeout);
                }
                left = REQUEST_TIMEOUT_NS - waited;
            }
        }
    }

    /// Wait for a response as [`Self::complete`], then take every other one already there
    /// in one batch (one look at the response ring's header for all of them): each is
    /// given to `f`; how many.
    pub fn complete_all(&mut self, mut f: impl FnMut(Response)) -> Result<usize, ClientError> {
        f(self.complete()?);
        self.send_unsent()?;
        let given_up = self.given_up;
        let mut n = 1;
        self.core.take_responses(&self.region, |r| match given_up {
            // An answer to a request given up on: nobody waits for it.
            Some(last) if r.id <= last => {}
            _ => {
                f(r);
                n += 1;
            }
        })?;
        self.settle_given_up();
        Ok(n)
    }

    /// Whether the driver VM is answering (no request given up on is still unanswered).
    pub fn is_answering(&mut self) -> bool {
        self.check_answering().is_ok()
    }

    /// Take the late answers to requests given up on; `NotAnswering` while one is missing.
    /// If a new driver incarnation attached since they were given up on, it has them again
    /// (replayed): it is worth one more wait for its answers.
    fn check_answering(&mut self) -> Result<(), ClientError> {
        let Some(last) = self.given_up else { return Ok(()) };
        let before = self.core.incarnation();
        while self.given_up.is_some() {
            if self.next_response()?.is_none() {
                break;
            }
        }
        if self.given_up.is_some() && self.core.incarnation() != before {
            self.given_up = None;
            let deadline = hypercall::clock_ns().saturating_add(REQUEST_TIMEOUT_NS);
            while self.core.any_outstanding_up_to(last) {
                if self.next_response()?.is_some() {
                    continue;
                }
                let now = hypercall::clock_ns();
                if now >= deadline {
                    self.given_up = Some(last);
                    break;
                }
                self.arm(deadline - now)?;
                self.wait_bits()?;
            }
        }
        match self.given_up {
            Some(_) => Err(ClientError::NotAnswering),
            None => Ok(()),
        }
    }

    /// The next response to a request someone waits for, if any: restarts are noticed and
    /// replayed first (ringing the new driver). Answers to requests given up on are dropped
    /// here; once none of them is outstanding, `given_up` clears.
    fn next_response(&mut self) -> Result<Option<Response>, ClientError> {
        self.send_unsent()?;
        loop {
            let Some(r) = self.core.next_response(&self.region)? else {
                self.settle_given_up();
                return Ok(None);
            };
            match self.given_up {
                Some(last) if r.id <= last => self.settle_given_up(),
                _ => return Ok(Some(r)),
            }
        }
    }

    /// Puts what the client holds back on the ring (a replay after a restart, requests
    /// that found no room) and rings the driver VM if that sent anything.
    fn send_unsent(&mut self) -> Result<(), ClientError> {
        if self.core.poll(&self.region)?.sent > 0 {
            self.kick()?;
        }
        Ok(())
    }

    /// Forgets the request given up on once nothing up to it is outstanding any more.
    fn settle_given_up(&mut self) {
        if let Some(last) = self.given_up {
            if !self.core.any_outstanding_up_to(last) {
                self.given_up = None;
            }
        }
    }

    /// Requests the rings can hold at once.
    pub fn ring_capacity(&self) -> usize {
        (self.core.layout().ring_capacity() as usize).min(block_client::MAX_OUTSTANDING)
    }

    pub fn info(&mut self) -> Result<DiskInfo, ClientError> {
        let r = self.request(Op::GetInfo, 0, 0, 0)?;
        Ok(r.info)
    }

    /// Read `count` sectors into the data area at `data_offset`.
    pub fn read(&mut self, sector: u64, count: u32, data_offset: usize) -> Result<Status, ClientError> {
        self.request(Op::Read, sector, count, data_offset as u32).map(|r| r.status)
    }

    /// Write `count` sectors from the data area at `data_offset`.
    pub fn write(&mut self, sector: u64, count: u32, data_offset: usize) -> Result<Status, ClientError> {
        self.request(Op::Write, sector, count, data_offset as u32).map(|r| r.status)
    }

    pub fn flush(&mut self) -> Result<Status, ClientError> {
        self.request(Op::Flush, 0, 0, 0).map(|r| r.status)
    }

    pub fn write_bytes(&self, offset: usize, data: &[u8]) {
        self.region.write_bytes(offset, data)
    }

    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        self.region.read_bytes(offset, out)
    }
}

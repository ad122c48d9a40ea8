//! Block client: requests on the shared ring, a doorbell to the driver VM, responses back.
//! Data buffers are in the shared region's data area, so the device reads and writes them
//! directly (no copy in the driver VM).
//!
//! The driver VM is not trusted to answer: a request unanswered after
//! [`REQUEST_TIMEOUT_NS`] fails with [`ClientError::Timeout`], and until the driver answers
//! it (late), every later request fails at once with [`ClientError::NotAnswering`] instead
//! of waiting again. A late answer is recognised by its id and dropped; the channel then
//! works again.

use domain_rt::hypercall;
use domain_rt::shared::Region;
use ipc_spec::block::{BlockLayout, DiskInfo, Op, Request, Response, Status};
use ipc_spec::ring::SharedMem;

/// How long a request may go unanswered before the client gives up on it. Generous: under
/// TCG a request takes milliseconds, a flush of the host's image file maybe a second.
pub const REQUEST_TIMEOUT_NS: u64 = 5_000_000_000;
/// The bit the timeout's timer sets on the channel's notification.
const TIMEOUT_BIT: u64 = 1 << 62;

pub struct BlockClient {
    region: Region,
    layout: BlockLayout,
    signal: u64,
    wait: u64,
    next_id: u64,
    /// The newest request given up on (timed out) while the driver has not answered it:
    /// requests fail at once meanwhile.
    given_up: Option<u64>,
    /// Requests given up on so far.
    pub timeouts: u64,
}

#[derive(Debug)]
pub enum ClientError {
    Layout,
    Ring,
    Doorbell(ipc_spec::Error),
    WrongResponse {
        expected: u64,
        got: u64,
    },
    /// The driver VM did not answer within [`REQUEST_TIMEOUT_NS`].
    Timeout,
    /// An earlier request timed out and is still unanswered: not waiting again.
    NotAnswering,
}

impl ClientError {
    /// Whether the driver VM is just not answering (rather than having broken the protocol).
    pub fn is_silence(&self) -> bool {
        matches!(self, Self::Timeout | Self::NotAnswering)
    }
}

impl core::fmt::Display for ClientError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Layout => f.write_str("the shared region cannot hold the block layout"),
            Self::Ring => f.write_str("the rings are corrupt (the driver broke the protocol)"),
            Self::Doorbell(e) => write!(f, "doorbell: {e}"),
            Self::WrongResponse { expected, got } => write!(f, "response {got} while waiting for {expected}"),
            Self::Timeout => write!(f, "the driver VM did not answer within {} s", REQUEST_TIMEOUT_NS / 1_000_000_000),
            Self::NotAnswering => f.write_str("the driver VM has not answered an earlier request"),
        }
    }
}

impl BlockClient {
    /// Lay out the region (rings + data area) and start with empty rings.
    pub fn new(region: Region, signal: u64, wait: u64) -> Result<Self, ClientError> {
        let layout = BlockLayout::standard(region.len()).map_err(|_| ClientError::Layout)?;
        layout.guest_rings(&region).map_err(|_| ClientError::Ring)?;
        layout.write(&region).map_err(|_| ClientError::Layout)?;
        Ok(Self { region, layout, signal, wait, next_id: 1, given_up: None, timeouts: 0 })
    }

    /// The data area: where buffers go (offsets relative to the region).
    pub fn data_range(&self) -> core::ops::Range<usize> {
        self.layout.data_range()
    }

    /// Send one request and wait for its response.
    pub fn request(&mut self, op: Op, sector: u64, count: u32, data_offset: u32) -> Result<Response, ClientError> {
        let id = self.submit(op, sector, count, data_offset as usize)?;
        self.kick()?;
        let r = self.complete()?;
        if r.id == id {
            Ok(r)
        } else {
            Err(ClientError::WrongResponse { expected: id, got: r.id })
        }
    }

    /// Queue a request without ringing the doorbell; returns its id.
    pub fn submit(&mut self, op: Op, sector: u64, count: u32, data_offset: usize) -> Result<u64, ClientError> {
        self.check_answering()?;
        let id = self.next_id;
        let req =
            Request { id, op, sector, count, data_offset: data_offset as u32, data_len: count.saturating_mul(512) };
        // Attach to the rings at the indexes in the shared header: this side's indexes
        // are the authoritative ones for its half.
        let (mut requests, _) = self.layout.guest_rings_attach(&self.region).map_err(|_| ClientError::Ring)?;
        requests.push(&req.encode()).map_err(|e| match e {
            ipc_spec::ring::RingError::Full => ClientError::NotAnswering,
            _ => ClientError::Ring,
        })?;
        self.next_id += 1;
        Ok(id)
    }

    /// Ring the driver's doorbell for everything queued so far.
    pub fn kick(&mut self) -> Result<(), ClientError> {
        hypercall::signal(self.signal, 1).map_err(ClientError::Doorbell)
    }

    /// The next response, waiting for the driver's doorbell if there is none yet, at most
    /// [`REQUEST_TIMEOUT_NS`]; then every request sent so far is given up on.
    pub fn complete(&mut self) -> Result<Response, ClientError> {
        let deadline = hypercall::clock_ns().saturating_add(REQUEST_TIMEOUT_NS);
        loop {
            if let Some(r) = self.next_response()? {
                return Ok(r);
            }
            let now = hypercall::clock_ns();
            if now >= deadline {
                self.given_up = Some(self.next_id - 1);
                self.timeouts += 1;
                return Err(ClientError::Timeout);
            }
            hypercall::timer_set(self.wait, deadline - now, TIMEOUT_BIT).map_err(ClientError::Doorbell)?;
            hypercall::wait(self.wait).map_err(ClientError::Doorbell)?;
        }
    }

    /// Whether the driver VM is answering (no request given up on is still unanswered).
    pub fn is_answering(&mut self) -> bool {
        self.check_answering().is_ok()
    }

    /// Take the late answers to requests given up on; `NotAnswering` while one is missing.
    fn check_answering(&mut self) -> Result<(), ClientError> {
        while self.given_up.is_some() {
            // Late answers are dropped inside; one that is not late answers a request nobody
            // waits for any more (the driver broke the order): dropped too.
            if self.next_response()?.is_none() {
                break;
            }
        }
        match self.given_up {
            Some(_) => Err(ClientError::NotAnswering),
            None => Ok(()),
        }
    }

    /// The next response on the ring, if any. Late answers to requests given up on are
    /// dropped here (the driver answers in order: the last of them clears `given_up`).
    fn next_response(&mut self) -> Result<Option<Response>, ClientError> {
        loop {
            let (_, mut responses) = self.layout.guest_rings_attach(&self.region).map_err(|_| ClientError::Ring)?;
            let slot = match responses.pop() {
                Ok(Some(slot)) => slot,
                Ok(None) => return Ok(None),
                Err(_) => return Err(ClientError::Ring),
            };
            let r = Response::decode(&slot);
            match self.given_up {
                Some(last) if r.id <= last => {
                    if r.id == last {
                        self.given_up = None;
                    }
                }
                _ => return Ok(Some(r)),
            }
        }
    }

    /// Requests the rings can hold at once.
    pub fn ring_capacity(&self) -> usize {
        self.layout.ring_capacity() as usize
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

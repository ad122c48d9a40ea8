//! Block client: requests on the shared ring, a doorbell to the driver VM, responses back.
//! Data buffers are in the shared region's data area, so the device reads and writes them
//! directly (no copy in the driver VM).

use domain_rt::hypercall;
use domain_rt::shared::Region;
use ipc_spec::block::{BlockLayout, DiskInfo, Op, Request, Response, Status};
use ipc_spec::ring::SharedMem;

pub struct BlockClient {
    region: Region,
    layout: BlockLayout,
    signal: u64,
    wait: u64,
    next_id: u64,
}

#[derive(Debug)]
pub enum ClientError {
    Layout,
    Ring,
    Doorbell(ipc_spec::Error),
    WrongResponse { expected: u64, got: u64 },
}

impl core::fmt::Display for ClientError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Layout => f.write_str("the shared region cannot hold the block layout"),
            Self::Ring => f.write_str("the rings are corrupt (the driver broke the protocol)"),
            Self::Doorbell(e) => write!(f, "doorbell: {e}"),
            Self::WrongResponse { expected, got } => write!(f, "response {got} while waiting for {expected}"),
        }
    }
}

impl BlockClient {
    /// Lay out the region (rings + data area) and start with empty rings.
    pub fn new(region: Region, signal: u64, wait: u64) -> Result<Self, ClientError> {
        let layout = BlockLayout::standard(region.len()).map_err(|_| ClientError::Layout)?;
        layout.guest_rings(&region).map_err(|_| ClientError::Ring)?;
        layout.write(&region).map_err(|_| ClientError::Layout)?;
        Ok(Self { region, layout, signal, wait, next_id: 1 })
    }

    /// The data area: where buffers go (offsets relative to the region).
    pub fn data_range(&self) -> core::ops::Range<usize> {
        self.layout.data_range()
    }

    /// Send one request and wait for its response.
    pub fn request(&mut self, op: Op, sector: u64, count: u32, data_offset: u32) -> Result<Response, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request { id, op, sector, count, data_offset, data_len: count.saturating_mul(512) };
        // Attach to the rings at the indexes in the shared header: this side's indexes
        // are the authoritative ones for its half.
        let (mut requests, mut responses) =
            self.layout.guest_rings_attach(&self.region).map_err(|_| ClientError::Ring)?;
        requests.push(&req.encode()).map_err(|_| ClientError::Ring)?;
        hypercall::signal(self.signal, 1).map_err(ClientError::Doorbell)?;
        loop {
            match responses.pop() {
                Ok(Some(slot)) => {
                    let r = Response::decode(&slot);
                    return if r.id == id {
                        Ok(r)
                    } else {
                        Err(ClientError::WrongResponse { expected: id, got: r.id })
                    };
                }
                Ok(None) => {
                    hypercall::wait(self.wait).map_err(ClientError::Doorbell)?;
                }
                Err(_) => return Err(ClientError::Ring),
            }
        }
    }

    /// Queue a request without ringing the doorbell; returns its id.
    pub fn submit(&mut self, op: Op, sector: u64, count: u32, data_offset: usize) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let req =
            Request { id, op, sector, count, data_offset: data_offset as u32, data_len: count.saturating_mul(512) };
        let (mut requests, _) = self.layout.guest_rings_attach(&self.region).map_err(|_| ClientError::Ring)?;
        requests.push(&req.encode()).map_err(|_| ClientError::Ring)?;
        Ok(id)
    }

    /// Ring the driver's doorbell for everything queued so far.
    pub fn kick(&mut self) -> Result<(), ClientError> {
        hypercall::signal(self.signal, 1).map_err(ClientError::Doorbell)
    }

    /// The next response, waiting for the driver's doorbell if there is none yet.
    pub fn complete(&mut self) -> Result<Response, ClientError> {
        loop {
            let (_, mut responses) = self.layout.guest_rings_attach(&self.region).map_err(|_| ClientError::Ring)?;
            match responses.pop() {
                Ok(Some(slot)) => return Ok(Response::decode(&slot)),
                Ok(None) => hypercall::wait(self.wait).map(|_| ()).map_err(ClientError::Doorbell)?,
                Err(_) => return Err(ClientError::Ring),
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

//! The guest's HTTP/1.1 server on port 80: smoltcp over the net channel, request handling
//! from [`demo_guest::http`], disk access through the block channel. Bodies stream: an echo
//! or a disk transfer of megabytes goes through in pieces that fit the socket buffers.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write as _;
use demo_guest::http::{self, Disk, Head, Refusal, Route, Status, SECTOR};
use domain_rt::{hypercall, println};
use smoltcp::iface::{Config, Interface, PollIngressSingleResult, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

use crate::blk::{BlockClient, ClientError};
use crate::net::NetDevice;
use ipc_spec::status::{DomainState, DomainStatusReply};

/// Connections served at once (one listening socket each; a connection beyond these is
/// refused).
const SOCKETS: usize = 16;
/// Socket buffer sizes: receive (the window the client sees) and send. A 64 KiB window
/// (44 full frames) keeps a host's upload flowing while the guest's acknowledgements wait
/// for its next idle moment (through the net driver VM a frame leaves only when the driver
/// VM runs; `cargo xtask bench net`). 16 sockets take 1.25 MiB, more than the runtime's
/// 1 MiB heap: they live in [`SOCKET_MEMORY`].
const RX_BUFFER: usize = 64 * 1024;
const TX_BUFFER: usize = 16 * 1024;
/// How much a streamed answer (`/source`, `/echo`) keeps in a connection's output at most.
/// A phase appends to what is there, so the first piece of a body goes out with the
/// answer's head: sent alone first, the head was a segment that smoltcp's Nagle rule made
/// a small body wait behind until the host acknowledged it (a 256-byte `GET /source` took
/// 2.5 ms instead of 0.2 behind QEMU's user network; behind a peer's 40 ms delayed ACK it
/// would take 40).
const OUT_CHUNK: usize = 16 * 1024;
/// Every socket's buffers, taken once by [`socket_memory`].
static mut SOCKET_MEMORY: [u8; SOCKETS * (RX_BUFFER + TX_BUFFER)] = [0; SOCKETS * (RX_BUFFER + TX_BUFFER)];
static SOCKET_MEMORY_TAKEN: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// [`SOCKET_MEMORY`], the first time only (a second server would get none).
fn socket_memory() -> Option<&'static mut [u8]> {
    if SOCKET_MEMORY_TAKEN.swap(true, core::sync::atomic::Ordering::AcqRel) {
        return None;
    }
    // SAFETY: the flag above hands the static out once, so this is its only reference;
    // the length is the static's own.
    Some(unsafe {
        core::slice::from_raw_parts_mut((&raw mut SOCKET_MEMORY).cast::<u8>(), SOCKETS * (RX_BUFFER + TX_BUFFER))
    })
}
/// Sectors per disk request while streaming (32 KiB).
const DISK_CHUNK: u64 = 64;

/// Where a connection is in its request.
enum Phase {
    /// Reading the request head.
    Head,
    /// Copying `left` body bytes back (`POST /echo`).
    Echo { left: u64 },
    /// Sending `left` sectors from `lba` (`GET /blk`).
    Read { lba: u64, left: u64 },
    /// Receiving `left` body bytes to write from `lba` (`PUT /blk`).
    Write { lba: u64, left: u64 },
    /// Receiving `left` body bytes to throw away, of `total` (`POST /sink`).
    Sink { left: u64, total: u64 },
    /// Sending `left` more pattern bytes (`GET /source`); with a seed, the seeded stream
    /// from byte `at` on.
    Source { left: u64, seed: Option<u64>, at: u64 },
    /// Sending what is in `out`, then closing or reading the next head.
    Answer { close: bool },
}

struct Conn {
    handle: SocketHandle,
    phase: Phase,
    keep_alive: bool,
    /// Bytes received but not yet used (a head, or body bytes that came with it).
    input: Vec<u8>,
    /// Bytes to send.
    out: Vec<u8>,
    sent: usize,
    /// Closed by us: the socket finishes on its own.
    closed: bool,
}

/// What the server has done, for the status page.
#[derive(Default)]
struct Stats {
    requests: u64,
    refused: u64,
    disk_sectors: u64,
    /// Sleeps begun while a connection could move ([`Server::could_move`]): wake-ups the
    /// server itself lost (only a timer would end them). Must stay 0: the web tests say so.
    slept_with_work: u64,
}

pub struct Server<D: NetDevice> {
    iface: Interface,
    sockets: SocketSet<'static>,
    conns: Vec<Conn>,
    dev: D,
    disk: Option<BlockClient>,
    /// The disk's size, once its driver VM has told us (0: not yet).
    disk_sectors: u64,
    wait: u64,
    /// When the timer armed on `wait` fires (smoltcp microseconds), if armed by
    /// [`Self::arm_timer`] and not yet known to have fired.
    timer_deadline: Option<i64>,
    stats: Stats,
    started_ns: u64,
    /// dom0's status service (`ipc_spec::status`), if this guest may ask.
    status: Option<u64>,
}

fn now() -> Instant {
    Instant::from_micros((hypercall::clock_ns() / 1000) as i64)
}

impl<D: NetDevice> Server<D> {
    /// Sets the interface up with `address` (and `gateway`) and listens on port 80.
    pub fn new(mut dev: D, wait: u64, address: Ipv4Cidr, gateway: Ipv4Address, mut disk: Option<BlockClient>) -> Self {
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(dev.mac().0)));
        config.random_seed = hypercall::clock_ns();
        let mut iface = Interface::new(config, &mut dev, now());
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::Ipv4(address));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(gateway);
        let mut sockets = SocketSet::new(Vec::new());
        let mut conns = Vec::new();
        let mut memory = socket_memory();
        for _ in 0..SOCKETS {
            let (rx, tx) = match memory.take() {
                Some(m) => {
                    let (mine, rest) = m.split_at_mut(RX_BUFFER + TX_BUFFER);
                    memory = Some(rest);
                    let (rx, tx) = mine.split_at_mut(RX_BUFFER);
                    (tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx))
                }
                // A second server (none is made today) gets small buffers from the heap.
                None => (tcp::SocketBuffer::new(vec![0; 4096]), tcp::SocketBuffer::new(vec![0; 4096])),
            };
            let mut socket = tcp::Socket::new(rx, tx);
            // Listening from the start: a connection that comes before the first poll must
            // not find the port closed.
            let _ = socket.listen(80);
            let handle = sockets.add(socket);
            conns.push(Conn::new(handle));
        }
        let disk_sectors = disk.as_mut().and_then(|d| d.info().ok()).map_or(0, |i| i.capacity_sectors);
        Self {
            iface,
            sockets,
            conns,
            dev,
            disk,
            disk_sectors,
            wait,
            timer_deadline: None,
            stats: Stats::default(),
            started_ns: hypercall::clock_ns(),
            status: None,
        }
    }

    /// Lets the status page list every domain, asking dom0's status service on `slot`.
    pub fn with_status(mut self, slot: Option<u64>) -> Self {
        self.status = slot;
        self
    }

    /// Serves forever.
    ///
    /// The clock is read once per pass (a hypercall, so an exit, each time): smoltcp's
    /// timers need no finer time than a pass. A pass ends in sleep only if nothing moved:
    /// no connection served and no frame taken in by the second poll (a frame the driver
    /// VM delivered while we served). Frames sent by that poll are no reason for another
    /// pass (nothing to serve comes of them), so an answer queued there leaves with the
    /// doorbell of the sleep right after it, not one pass later.
    pub fn run(&mut self) -> ! {
        loop {
            let t = now();
            self.iface.poll(t, &mut self.dev, &mut self.sockets);
            let mut progress = false;
            for i in 0..self.conns.len() {
                progress |= self.serve(i);
            }
            progress |= self.take_in_and_send(t);
            self.dev.kick();
            if let Some(why) = self.dev.dead() {
                self.out_of_service(why);
            }
            if !progress {
                // Sleep until a frame arrives (the driver's doorbell) or smoltcp has a timer due.
                let delay = self.iface.poll_delay(t, &self.sockets).map_or(100_000, |d| d.total_micros());
                if delay == 0 {
                    self.dev.flush();
                }
                // The device asks to be woken for frames from now on, and looks once more.
                if delay > 0 && self.dev.prepare_to_wait() {
                    if self.could_move() {
                        // A lost wake-up of our own making: nothing would end this wait for
                        // that input or output but a timer (counted, and shown: must be 0).
                        self.stats.slept_with_work += 1;
                    }
                    self.arm_timer(t, delay.min(100_000));
                    self.dev.wait(self.wait);
                }
                self.dev.running();
            }
        }
    }

    /// smoltcp's second poll of a pass: every frame that arrived, then what the sockets
    /// have to send. Whether a frame changed a socket (then serve again rather than sleep
    /// with a request in a socket buffer and only smoltcp's next timer, its 10 ms delayed
    /// ACK, to wake us for it).
    fn take_in_and_send(&mut self, t: Instant) -> bool {
        let mut changed = false;
        loop {
            match self.iface.poll_ingress_single(t, &mut self.dev, &mut self.sockets) {
                PollIngressSingleResult::None => break,
                PollIngressSingleResult::PacketProcessed => {}
                PollIngressSingleResult::SocketStateChanged => changed = true,
            }
        }
        self.iface.poll_egress(t, &mut self.dev, &mut self.sockets);
        changed
    }

    /// Has the timer signal our notification `us` microseconds after `t`, unless it is
    /// armed to fire no later than that already (a wake-up earlier than needed only costs
    /// a pass; re-arming for every sleep cost a hypercall each).
    fn arm_timer(&mut self, t: Instant, us: u64) {
        let deadline = t.total_micros().saturating_add(us as i64);
        if matches!(self.timer_deadline, Some(d) if d > t.total_micros() && d <= deadline) {
            return;
        }
        if hypercall::timer_set(self.wait, us * 1000, 1 << 1).is_ok() {
            self.timer_deadline = Some(deadline);
        }
    }

    /// Whether [`Self::serve`] would move some connection now: input in a socket that the
    /// connection has room for, or output it holds and the socket has room for.
    fn could_move(&self) -> bool {
        self.conns.iter().any(|conn| {
            let socket = self.sockets.get::<tcp::Socket>(conn.handle);
            socket.is_open()
                && !conn.closed
                && ((socket.can_recv() && conn.input.len() < conn.input_limit())
                    || (conn.sent < conn.out.len() && socket.can_send()))
        })
    }

    /// The network device cannot be used (`why`): say so, drop every connection (no frame
    /// can reach its peer: each gets a reset if the device comes back) and wait until the
    /// device is usable again, checking every 100 ms and at each doorbell (a net channel
    /// whose driver dom0 builds again after giving up, `ctl restart`), or for ever.
    fn out_of_service(&mut self, why: &str) {
        let open = self
            .conns
            .iter()
            .filter(|c| {
                let s = self.sockets.get::<tcp::Socket>(c.handle);
                s.is_open() && s.state() != tcp::State::Listen
            })
            .count();
        println!("net: {why}: {open} connection(s) dropped; serving nothing until the network device is back");
        for c in &self.conns {
            self.sockets.get_mut::<tcp::Socket>(c.handle).abort();
        }
        loop {
            let _ = hypercall::timer_set(self.wait, 100_000_000, 1 << 1);
            let _ = hypercall::wait(self.wait);
            if self.dev.dead().is_none() {
                println!("net: the network device is back: serving again");
                // The timer was re-armed here: the next sleep arms it afresh.
                self.timer_deadline = None;
                return;
            }
        }
    }

    /// Moves connection `i` on as far as it can go now; whether anything happened.
    fn serve(&mut self, i: usize) -> bool {
        let handle = self.conns[i].handle;
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        if !socket.is_open() {
            // Closed, reset, or never opened: listen again with a fresh state.
            self.conns[i] = Conn::new(handle);
            let _ = socket.listen(80);
            return false;
        }
        let conn = &mut self.conns[i];
        if conn.closed {
            return false;
        }
        let mut progress = false;
        // Send what is pending.
        if conn.sent < conn.out.len() && socket.can_send() {
            if let Ok(n) = socket.send_slice(&conn.out[conn.sent..]) {
                conn.sent += n;
                progress |= n > 0;
            }
        }
        if conn.sent == conn.out.len() {
            conn.out.clear();
            conn.sent = 0;
        }
        // Take in what arrived, up to what the current phase can use.
        let limit = conn.input_limit();
        while socket.can_recv() && conn.input.len() < limit {
            let mut buf = [0u8; 4096];
            let room = (limit - conn.input.len()).min(buf.len());
            match socket.recv_slice(&mut buf[..room]) {
                Ok(n) if n > 0 => {
                    conn.input.extend_from_slice(&buf[..n]);
                    progress = true;
                }
                _ => break,
            }
        }
        // The peer finished sending (or went away) before the request was whole: nothing
        // more can come, so close.
        let starved = match conn.phase {
            Phase::Head => !conn.input.is_empty() || conn.out.is_empty(),
            Phase::Echo { left } | Phase::Write { left, .. } | Phase::Sink { left, .. } => {
                (conn.input.len() as u64) < left.min(limit as u64)
            }
            _ => false,
        };
        let peer_done = matches!(socket.state(), tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing);
        if peer_done
            && !socket.can_recv()
            && starved
            && http::parse_head(&conn.input, Disk::None).ok().flatten().is_none()
        {
            socket.close();
            conn.closed = true;
            return true;
        }
        progress | self.step(i)
    }

    /// Advances connection `i`'s phase with the bytes in `input` and room in `out`.
    fn step(&mut self, i: usize) -> bool {
        let out_room = self.conns[i].out.is_empty();
        // What a streamed answer may still append (`OUT_CHUNK`).
        let out_free = OUT_CHUNK.saturating_sub(self.conns[i].out.len());
        let parsing = matches!(self.conns[i].phase, Phase::Head) && !self.conns[i].input.is_empty();
        let disk = if parsing { self.disk_for_router() } else { Disk::None };
        let conn = &mut self.conns[i];
        match conn.phase {
            Phase::Head => match http::parse_head(&conn.input, disk) {
                Ok(None) => false,
                Ok(Some(head)) => {
                    self.stats.requests += 1;
                    conn.input.drain(..head.head_len);
                    conn.keep_alive = head.keep_alive;
                    self.start(i, head);
                    true
                }
                Err(r) => {
                    self.refuse(i, r);
                    true
                }
            },
            Phase::Echo { left } => {
                if out_free == 0 || conn.input.is_empty() {
                    return false;
                }
                let n = (conn.input.len() as u64).min(left).min(out_free as u64) as usize;
                conn.out.extend(conn.input.drain(..n));
                let left = left - n as u64;
                conn.phase = if left == 0 { Phase::Answer { close: !conn.keep_alive } } else { Phase::Echo { left } };
                true
            }
            Phase::Read { lba, left } => {
                if !out_room {
                    return false;
                }
                let count = left.min(DISK_CHUNK);
                match self.disk_read(lba, count) {
                    Ok(data) => {
                        let conn = &mut self.conns[i];
                        conn.out = data;
                        let left = left - count;
                        conn.phase = if left == 0 {
                            Phase::Answer { close: !conn.keep_alive }
                        } else {
                            Phase::Read { lba: lba + count, left }
                        };
                    }
                    // The head (200, with a length) is gone already: all we can do is close.
                    Err(_) => self.conns[i].phase = Phase::Answer { close: true },
                }
                true
            }
            Phase::Write { lba, left } => {
                let chunk = (DISK_CHUNK * SECTOR).min(left) as usize;
                if conn.input.len() < chunk {
                    return false;
                }
                let data: Vec<u8> = conn.input.drain(..chunk).collect();
                let result = self.disk_write(lba, &data);
                let left = left - chunk as u64;
                if let Err(e) = result {
                    // The rest of the body is not read: the connection closes after this.
                    self.conns[i].keep_alive = false;
                    self.disk_failed(i, e, "write");
                } else if left == 0 {
                    self.answer(i, Status::Ok, "text/plain", b"written\n");
                } else {
                    self.conns[i].phase = Phase::Write { lba: lba + chunk as u64 / SECTOR, left };
                }
                true
            }
            Phase::Sink { left, total } => {
                if conn.input.is_empty() {
                    return false;
                }
                let n = (conn.input.len() as u64).min(left) as usize;
                conn.input.drain(..n);
                let left = left - n as u64;
                if left == 0 {
                    let mut text = http::Text::<64>::default();
                    let _ = writeln!(text, "{total} bytes received");
                    self.answer(i, Status::Ok, "text/plain", text.as_bytes());
                } else {
                    conn.phase = Phase::Sink { left, total };
                }
                true
            }
            Phase::Source { left, seed, at } => {
                if out_free == 0 {
                    return false;
                }
                let n = left.min(out_free as u64) as usize;
                let start = conn.out.len();
                match seed {
                    Some(seed) => {
                        conn.out.resize(start + n, 0);
                        http::seeded_fill(seed, at, &mut conn.out[start..]);
                    }
                    None => conn.out.extend((0..n as u64).map(|k| b'a' + ((at + k) % 26) as u8)),
                }
                let left = left - n as u64;
                conn.phase = if left == 0 {
                    Phase::Answer { close: !conn.keep_alive }
                } else {
                    Phase::Source { left, seed, at: at + n as u64 }
                };
                true
            }
            Phase::Answer { close } => {
                if !out_room {
                    return false;
                }
                if close {
                    self.sockets.get_mut::<tcp::Socket>(conn.handle).close();
                    conn.closed = true;
                    return true;
                }
                conn.phase = Phase::Head;
                !conn.input.is_empty()
            }
        }
    }

    fn start(&mut self, i: usize, head: Head) {
        let len = head.body_len;
        match head.route {
            Route::Status => {
                let page = self.status_page();
                self.answer(i, Status::Ok, "text/plain; charset=utf-8", page.as_bytes());
            }
            Route::Echo => {
                self.conns[i].out.extend_from_slice(
                    http::response_head(Status::Ok, "application/octet-stream", len, head.keep_alive).as_bytes(),
                );
                self.conns[i].phase =
                    if len == 0 { Phase::Answer { close: !head.keep_alive } } else { Phase::Echo { left: len } };
                // The body there already goes out with the head (`OUT_CHUNK`).
                self.step(i);
            }
            Route::BlkRead { lba, count } => {
                self.conns[i].out.extend_from_slice(
                    http::response_head(Status::Ok, "application/octet-stream", count * SECTOR, head.keep_alive)
                        .as_bytes(),
                );
                self.conns[i].phase = Phase::Read { lba, left: count };
            }
            Route::BlkWrite { lba } => self.conns[i].phase = Phase::Write { lba, left: len },
            Route::Sink if len == 0 => self.answer(i, Status::Ok, "text/plain", b"0 bytes received\n"),
            Route::Sink => self.conns[i].phase = Phase::Sink { left: len, total: len },
            Route::Source { bytes, seed } => {
                let answer = http::response_head(Status::Ok, "application/octet-stream", bytes, head.keep_alive);
                self.conns[i].out.extend_from_slice(answer.as_bytes());
                self.conns[i].phase = if bytes == 0 {
                    Phase::Answer { close: !head.keep_alive }
                } else {
                    Phase::Source { left: bytes, seed, at: 0 }
                };
                // The body's first piece (a small body whole) goes out with the head
                // (`OUT_CHUNK`).
                self.step(i);
            }
            Route::Flush => match self.disk.as_mut().map(|d| d.flush()) {
                Some(Ok(ipc_spec::block::Status::Ok)) => self.answer(i, Status::Ok, "text/plain", b"flushed\n"),
                Some(Err(e)) => self.disk_failed(i, DiskError::Channel(e), "flush"),
                _ => self.answer(i, Status::InternalError, "text/plain", b"the flush failed\n"),
            },
        }
    }

    fn answer(&mut self, i: usize, status: Status, content_type: &str, body: &[u8]) {
        let conn = &mut self.conns[i];
        let head = http::response_head(status, content_type, body.len() as u64, conn.keep_alive);
        conn.out.extend_from_slice(head.as_bytes());
        conn.out.extend_from_slice(body);
        conn.phase = Phase::Answer { close: !conn.keep_alive };
    }

    fn refuse(&mut self, i: usize, r: Refusal) {
        self.stats.refused += 1;
        let conn = &mut self.conns[i];
        conn.out.extend_from_slice(http::refusal_response(r).as_bytes());
        conn.input.clear();
        conn.phase = Phase::Answer { close: true };
    }

    /// The disk as the router sees it. Until the driver VM has told us the disk's size
    /// (it was not answering when the server started) it is asked again here.
    fn disk_for_router(&mut self) -> Disk {
        let Some(disk) = self.disk.as_mut() else { return Disk::None };
        if !disk.is_answering() {
            return Disk::Unavailable;
        }
        if self.disk_sectors == 0 {
            match disk.info() {
                Ok(info) => self.disk_sectors = info.capacity_sectors,
                Err(_) => return Disk::Unavailable,
            }
        }
        Disk::Sectors(self.disk_sectors)
    }

    /// Answer a disk request that failed: 503 if the driver VM is not answering, else 500.
    fn disk_failed(&mut self, i: usize, e: DiskError, what: &str) {
        let mut text = http::Text::<128>::default();
        match e {
            DiskError::Channel(e) if e.is_silence() => {
                let _ = writeln!(text, "the disk driver VM did not answer the {what}: {e}");
                self.answer(i, Status::ServiceUnavailable, "text/plain", text.as_bytes());
            }
            DiskError::Channel(e) => {
                let _ = writeln!(text, "the {what} failed: {e}");
                self.answer(i, Status::InternalError, "text/plain", text.as_bytes());
            }
            DiskError::Status(s) => {
                let _ = writeln!(text, "the disk refused the {what}: {s:?}");
                self.answer(i, Status::InternalError, "text/plain", text.as_bytes());
            }
        }
    }

    fn disk_read(&mut self, lba: u64, count: u64) -> Result<Vec<u8>, DiskError> {
        let disk = self.disk.as_mut().ok_or(DiskError::Status(ipc_spec::block::Status::IoError))?;
        let at = disk.data_range().start;
        match disk.read(lba, count as u32, at) {
            Ok(ipc_spec::block::Status::Ok) => {
                let mut data = vec![0; (count * SECTOR) as usize];
                disk.read_bytes(at, &mut data);
                self.stats.disk_sectors += count;
                Ok(data)
            }
            Ok(s) => Err(DiskError::Status(s)),
            Err(e) => Err(DiskError::Channel(e)),
        }
    }

    fn disk_write(&mut self, lba: u64, data: &[u8]) -> Result<(), DiskError> {
        let disk = self.disk.as_mut().ok_or(DiskError::Status(ipc_spec::block::Status::IoError))?;
        let at = disk.data_range().start;
        disk.write_bytes(at, data);
        let count = (data.len() as u64 / SECTOR) as u32;
        match disk.write(lba, count, at) {
            Ok(ipc_spec::block::Status::Ok) => {
                self.stats.disk_sectors += u64::from(count);
                Ok(())
            }
            Ok(s) => Err(DiskError::Status(s)),
            Err(e) => Err(DiskError::Channel(e)),
        }
    }

    fn status_page(&self) -> alloc::string::String {
        let mut s = alloc::string::String::new();
        let up_s = hypercall::clock_ns().saturating_sub(self.started_ns) / 1_000_000_000;
        let _ = writeln!(s, "microvisor demo guest: up {up_s} s");
        self.dev.describe(&mut s);
        s.push('\n');
        match self.disk.as_ref() {
            Some(d) if d.timeouts > 0 => {
                let _ = writeln!(
                    s,
                    "disk: {} sectors through the disk driver VM; it failed to answer {} time(s) within {} s",
                    self.stats.disk_sectors,
                    d.timeouts,
                    crate::blk::REQUEST_TIMEOUT_NS / 1_000_000_000
                );
            }
            Some(_) => {
                let _ = writeln!(
                    s,
                    "disk: {} sectors through the disk driver VM ({} MiB disk)",
                    self.stats.disk_sectors,
                    self.disk_sectors / 2048
                );
            }
            None => {
                let _ = writeln!(s, "disk: none");
            }
        }
        if let Some(d) = self.disk.as_ref() {
            let _ = writeln!(s, "disk driver incarnations seen: {}", d.restarts());
        }
        let _ = writeln!(
            s,
            "http: {} requests, {} refused, {} sleeps with work waiting",
            self.stats.requests, self.stats.refused, self.stats.slept_with_work
        );
        if let Some(slot) = self.status {
            let _ = writeln!(s, "\ndomains (from dom0):");
            for index in 0..64 {
                let msg = hypercall::Message::new(&[index]);
                let Ok(reply) = hypercall::ipc_call(slot, &msg) else {
                    let _ = writeln!(s, "  (dom0's status service did not answer)");
                    break;
                };
                let Some(d) = DomainStatusReply::decode(&reply.words) else { break };
                match d.state {
                    DomainState::Alive => {
                        let state = if d.stopped > 0 { "stopped" } else { "running" };
                        let _ = writeln!(
                            s,
                            "  {:<8} {state}, {} vCPU, {} MiB, {} IPC calls, {} notifications signalled",
                            d.name(),
                            d.vcpus,
                            d.ram_mib,
                            d.ipc_calls,
                            d.signals
                        );
                    }
                    DomainState::Destroyed => {
                        let _ = writeln!(s, "  {:<8} destroyed", d.name());
                    }
                }
            }
        }
        s
    }
}

/// Why a disk request failed.
enum DiskError {
    /// The channel: the driver VM did not answer, or broke the protocol.
    Channel(ClientError),
    /// The driver answered with an error status.
    Status(ipc_spec::block::Status),
}

impl Conn {
    /// Input bytes the connection holds at most in its current phase ([`Server::serve`]
    /// takes in more only below this).
    fn input_limit(&self) -> usize {
        match self.phase {
            Phase::Echo { .. } | Phase::Sink { .. } => 16 * 1024,
            Phase::Write { .. } => (DISK_CHUNK * SECTOR) as usize,
            _ => http::MAX_HEAD,
        }
    }

    fn new(handle: SocketHandle) -> Self {
        Self {
            handle,
            phase: Phase::Head,
            keep_alive: false,
            input: Vec::new(),
            out: Vec::new(),
            sent: 0,
            closed: false,
        }
    }
}

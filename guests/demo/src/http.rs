//! The demo guest's HTTP/1.1 server logic, without I/O: request heads are parsed (with
//! `httparse`), checked and turned into a [`Route`]; bodies are never buffered whole (an echo
//! or a disk write of 1 MiB streams through in pieces), so the caller moves bytes between the
//! TCP socket and the handler. Every client mistake becomes a 4xx [`Status`] with a short
//! text body, never a panic.
//!
//! Routes:
//! - `GET /`: the status page.
//! - `POST /echo`: the body back, unchanged.
//! - `GET /blk/<lba>?count=<n>`: `n` sectors (default 1) read through the disk driver VM.
//! - `PUT /blk/<lba>`: the body (a multiple of 512 bytes) written at sector `lba`.
//! - `POST /flush`: the disk flushed.
//! - `POST /sink`: the body read and thrown away; the answer says how many bytes (for
//!   measuring host-to-guest throughput).
//! - `GET /source?bytes=<n>`: `n` bytes of a pattern (guest-to-host throughput); with
//!   `&seed=<s>`, `n` pseudo-random bytes that depend on `s` and their position only
//!   ([`seeded_byte`]), so a client can check every byte of a long transfer.

use core::fmt::{self, Write as _};

/// Largest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// Most headers in a request.
pub const MAX_HEADERS: usize = 32;
/// Largest body accepted for `POST /echo` and `PUT /blk` (4 MiB).
pub const MAX_BODY: u64 = 4 << 20;
/// Sector size of the disk.
pub const SECTOR: u64 = 512;
/// Most sectors one `GET /blk` may read (4 MiB).
pub const MAX_READ_SECTORS: u64 = MAX_BODY / SECTOR;
/// Largest `POST /sink` body and `GET /source` answer (1 GiB).
pub const MAX_STREAM: u64 = 1 << 30;

/// An HTTP status the server answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    LengthRequired,
    PayloadTooLarge,
    RangeNotSatisfiable,
    HeaderTooLarge,
    InternalError,
    NotImplemented,
    ServiceUnavailable,
    VersionNotSupported,
}

impl Status {
    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::LengthRequired => 411,
            Status::PayloadTooLarge => 413,
            Status::RangeNotSatisfiable => 416,
            Status::HeaderTooLarge => 431,
            Status::InternalError => 500,
            Status::NotImplemented => 501,
            Status::ServiceUnavailable => 503,
            Status::VersionNotSupported => 505,
        }
    }

    /// The reason phrase.
    pub fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::LengthRequired => "Length Required",
            Status::PayloadTooLarge => "Payload Too Large",
            Status::RangeNotSatisfiable => "Range Not Satisfiable",
            Status::HeaderTooLarge => "Request Header Fields Too Large",
            Status::InternalError => "Internal Server Error",
            Status::NotImplemented => "Not Implemented",
            Status::ServiceUnavailable => "Service Unavailable",
            Status::VersionNotSupported => "HTTP Version Not Supported",
        }
    }
}

/// A refused request: the status and why, for the answer's body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: Status,
    pub why: &'static str,
}

fn refuse<T>(status: Status, why: &'static str) -> Result<T, Refusal> {
    Err(Refusal { status, why })
}

/// What a request head says, as far as the server cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// What to do.
    pub route: Route,
    /// Body length (`Content-Length`; 0 without one).
    pub body_len: u64,
    /// Whether the connection stays open after the answer.
    pub keep_alive: bool,
    /// Bytes of the head, so the body starts there in the input.
    pub head_len: usize,
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Status,
    Echo,
    BlkRead { lba: u64, count: u64 },
    BlkWrite { lba: u64 },
    Flush,
    Sink,
    Source { bytes: u64, seed: Option<u64> },
}

/// The disk behind `/blk` and `/flush`, as the router needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disk {
    /// This guest has no disk: 404.
    None,
    /// There is one, but its driver VM is not serving requests (silent, or it broke the
    /// channel's protocol): 503.
    Unavailable,
    /// A disk of this many sectors (for range checks).
    Sectors(u64),
}

/// Parses a request head from the start of `input`. `Ok(None)`: not all of it is there yet.
pub fn parse_head(input: &[u8], disk: Disk) -> Result<Option<Head>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(input) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if input.len() >= MAX_HEAD => {
            return refuse(Status::HeaderTooLarge, "the request head is over 8 KiB");
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return refuse(Status::HeaderTooLarge, "too many headers"),
        Err(_) => return refuse(Status::BadRequest, "malformed request head"),
    };
    if head_len > MAX_HEAD {
        return refuse(Status::HeaderTooLarge, "the request head is over 8 KiB");
    }
    let version = req.version.unwrap_or(1);
    let mut body_len = None;
    let mut keep_alive = version == 1;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = core::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse::<u64>().ok());
            match (n, body_len) {
                (Some(n), None) => body_len = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => return refuse(Status::BadRequest, "bad or conflicting Content-Length"),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return refuse(Status::NotImplemented, "chunked bodies are not supported: send Content-Length");
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = h.value;
            if v.eq_ignore_ascii_case(b"close") {
                keep_alive = false;
            } else if v.eq_ignore_ascii_case(b"keep-alive") {
                keep_alive = true;
            }
        }
    }
    let method = req.method.unwrap_or("");
    let target = req.path.unwrap_or("");
    let route = route(method, target, body_len, disk)?;
    Ok(Some(Head { route, body_len: body_len.unwrap_or(0), keep_alive, head_len }))
}

/// Maps a method and target to a route, checking the body length it needs.
pub fn route(method: &str, target: &str, body_len: Option<u64>, disk: Disk) -> Result<Route, Refusal> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let needs_body = |len: Option<u64>| match len {
        None => refuse(Status::LengthRequired, "a Content-Length is needed"),
        Some(n) if n > MAX_BODY => refuse(Status::PayloadTooLarge, "the body is over 4 MiB"),
        Some(n) => Ok(n),
    };
    let no_body = |len: Option<u64>| match len {
        Some(n) if n > 0 => refuse(Status::BadRequest, "this request takes no body"),
        _ => Ok(()),
    };
    let disk_sectors = match disk {
        _ if path != "/flush" && !path.starts_with("/blk/") => 0,
        Disk::None => return refuse(Status::NotFound, "this guest has no disk"),
        Disk::Unavailable => return refuse(Status::ServiceUnavailable, "the disk driver VM is not serving requests"),
        Disk::Sectors(n) => n,
    };
    match path {
        "/" => match method {
            "GET" | "HEAD" => no_body(body_len).map(|_| Route::Status),
            _ => refuse(Status::MethodNotAllowed, "/ takes GET"),
        },
        "/echo" => match method {
            "POST" => needs_body(body_len).map(|_| Route::Echo),
            _ => refuse(Status::MethodNotAllowed, "/echo takes POST"),
        },
        "/sink" => match (method, body_len) {
            ("POST", None) => refuse(Status::LengthRequired, "a Content-Length is needed"),
            ("POST", Some(n)) if n > MAX_STREAM => refuse(Status::PayloadTooLarge, "the body is over 1 GiB"),
            ("POST", Some(_)) => Ok(Route::Sink),
            _ => refuse(Status::MethodNotAllowed, "/sink takes POST"),
        },
        "/source" => match method {
            "GET" => {
                no_body(body_len)?;
                let (mut bytes, mut seed) = (None, None);
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    match pair.split_once('=') {
                        Some(("bytes", n)) => bytes = n.parse::<u64>().ok().filter(|&n| n <= MAX_STREAM),
                        Some(("seed", s)) => match s.parse::<u64>() {
                            Ok(s) => seed = Some(s),
                            Err(_) => return refuse(Status::BadRequest, "seed is not a number"),
                        },
                        _ => return refuse(Status::BadRequest, "unknown query parameter (bytes=<n>, seed=<s>)"),
                    }
                }
                match bytes {
                    Some(bytes) => Ok(Route::Source { bytes, seed }),
                    None => refuse(Status::BadRequest, "/source needs ?bytes=<n>, at most 1 GiB"),
                }
            }
            _ => refuse(Status::MethodNotAllowed, "/source takes GET"),
        },
        "/flush" => match method {
            "POST" => no_body(body_len).map(|_| Route::Flush),
            _ => refuse(Status::MethodNotAllowed, "/flush takes POST"),
        },
        _ => match path.strip_prefix("/blk/") {
            Some(lba) => blk_route(method, lba, query, body_len, disk_sectors),
            None => refuse(Status::NotFound, "no such path: try /, /echo, /blk/<lba>, /flush, /sink, /source"),
        },
    }
}

fn blk_route(method: &str, lba: &str, query: &str, body_len: Option<u64>, disk_sectors: u64) -> Result<Route, Refusal> {
    let Ok(lba) = lba.parse::<u64>() else {
        return refuse(Status::BadRequest, "the sector number is not a number");
    };
    match method {
        "GET" => {
            let mut count = 1;
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                match pair.split_once('=') {
                    Some(("count", n)) => match n.parse::<u64>() {
                        Ok(n) if (1..=MAX_READ_SECTORS).contains(&n) => count = n,
                        Ok(_) => return refuse(Status::BadRequest, "count must be 1 to 8192"),
                        Err(_) => return refuse(Status::BadRequest, "count is not a number"),
                    },
                    _ => return refuse(Status::BadRequest, "unknown query parameter (only count=<n>)"),
                }
            }
            if body_len.is_some_and(|n| n > 0) {
                return refuse(Status::BadRequest, "GET takes no body");
            }
            check_range(lba, count, disk_sectors)?;
            Ok(Route::BlkRead { lba, count })
        }
        "PUT" => {
            let len = match body_len {
                None => return refuse(Status::LengthRequired, "a Content-Length is needed"),
                Some(n) if n > MAX_BODY => return refuse(Status::PayloadTooLarge, "the body is over 4 MiB"),
                Some(n) => n,
            };
            if len == 0 || len % SECTOR != 0 {
                return refuse(Status::BadRequest, "the body must be a non-zero multiple of 512 bytes");
            }
            check_range(lba, len / SECTOR, disk_sectors)?;
            Ok(Route::BlkWrite { lba })
        }
        _ => refuse(Status::MethodNotAllowed, "/blk/<lba> takes GET and PUT"),
    }
}

fn check_range(lba: u64, count: u64, disk_sectors: u64) -> Result<(), Refusal> {
    match lba.checked_add(count) {
        Some(end) if end <= disk_sectors => Ok(()),
        _ => refuse(Status::RangeNotSatisfiable, "the sectors are past the end of the disk"),
    }
}

/// Byte `offset` of `GET /source?seed=<seed>`: byte `offset % 8` (little endian) of
/// SplitMix64's output for `seed + offset / 8` (wrapping). Depends on nothing but the seed
/// and the position, so any piece of the stream can be made (and checked) on its own.
pub fn seeded_byte(seed: u64, offset: u64) -> u8 {
    (splitmix64(seed.wrapping_add(offset / 8)) >> (8 * (offset % 8))) as u8
}

/// Fills `out` with the `GET /source?seed=<seed>` stream from byte `offset` on.
pub fn seeded_fill(seed: u64, offset: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = seeded_byte(seed, offset.wrapping_add(i as u64));
    }
}

/// SplitMix64's output function (Steele, Lea, Flood 2014).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A fixed-capacity text buffer for response heads and small bodies.
pub struct Text<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Default for Text<N> {
    fn default() -> Self {
        Self { buf: [0; N], len: 0 }
    }
}

impl<const N: usize> Text<N> {
    /// The bytes written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> fmt::Write for Text<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len.checked_add(s.len()).filter(|&e| e <= N).ok_or(fmt::Error)?;
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Writes a response head.
pub fn response_head(status: Status, content_type: &str, body_len: u64, keep_alive: bool) -> Text<256> {
    let mut t = Text::default();
    let connection = if keep_alive { "keep-alive" } else { "close" };
    // 256 bytes hold the longest head this writes.
    let _ = write!(
        t,
        "HTTP/1.1 {} {}\r\nContent-Type: {content_type}\r\nContent-Length: {body_len}\r\nConnection: {connection}\r\n\r\n",
        status.code(),
        status.reason()
    );
    t
}

/// The whole answer to a refused request: head and a one-line text body. The connection is
/// closed after it (the rest of the request may not have been read).
pub fn refusal_response(r: Refusal) -> Text<512> {
    let mut t = Text::default();
    let body_len = r.why.len() + 1;
    let _ = write!(
        t,
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nContent-Length: {body_len}\r\nConnection: close\r\n\r\n{}\n",
        r.status.code(),
        r.status.reason(),
        r.why
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::string::String;

    const SECTORS: u64 = 131072;
    const DISK: Disk = Disk::Sectors(SECTORS);

    fn head(s: &str) -> Result<Option<Head>, Refusal> {
        parse_head(s.as_bytes(), DISK)
    }

    fn status_of(s: &str) -> Status {
        head(s).unwrap_err().status
    }

    #[test]
    fn the_routes() {
        let h = head("GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap().unwrap();
        assert_eq!((h.route, h.body_len, h.keep_alive), (Route::Status, 0, true));
        let h = head("POST /echo HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").unwrap().unwrap();
        assert_eq!((h.route, h.body_len, h.head_len), (Route::Echo, 5, 42));
        let h = head("GET /blk/7?count=3 HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.route, Route::BlkRead { lba: 7, count: 3 });
        let h = head("GET /blk/131071 HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.route, Route::BlkRead { lba: 131071, count: 1 });
        let h = head("PUT /blk/8 HTTP/1.1\r\ncontent-length: 1024\r\n\r\n").unwrap().unwrap();
        assert_eq!((h.route, h.body_len), (Route::BlkWrite { lba: 8 }, 1024));
        let h = head("POST /flush HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap().unwrap();
        assert_eq!((h.route, h.keep_alive), (Route::Flush, false));
        let h = head("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive, "HTTP/1.0 closes unless asked");
        let h = head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").unwrap().unwrap();
        assert!(h.keep_alive);
    }

    #[test]
    fn the_benchmark_routes() {
        let h = head("POST /sink HTTP/1.1\r\nContent-Length: 104857600\r\n\r\n").unwrap().unwrap();
        assert_eq!((h.route, h.body_len), (Route::Sink, 100 << 20));
        let h = head("GET /source?bytes=5000000 HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.route, Route::Source { bytes: 5_000_000, seed: None });
        let h = head("GET /source?bytes=10&seed=42 HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.route, Route::Source { bytes: 10, seed: Some(42) });
        let h = head("GET /source?seed=0&bytes=1 HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.route, Route::Source { bytes: 1, seed: Some(0) });
        assert_eq!(status_of("GET /source?bytes=1&seed=-1 HTTP/1.1\r\n\r\n"), Status::BadRequest);
        assert_eq!(status_of("GET /source?bytes=1&speed=1 HTTP/1.1\r\n\r\n"), Status::BadRequest);
        assert_eq!(status_of("GET /source?seed=1 HTTP/1.1\r\n\r\n"), Status::BadRequest);
        assert_eq!(status_of("POST /sink HTTP/1.1\r\n\r\n"), Status::LengthRequired);
        assert_eq!(status_of("POST /sink HTTP/1.1\r\nContent-Length: 2000000000\r\n\r\n"), Status::PayloadTooLarge);
        assert_eq!(status_of("GET /source HTTP/1.1\r\n\r\n"), Status::BadRequest);
        assert_eq!(status_of("GET /source?bytes=x HTTP/1.1\r\n\r\n"), Status::BadRequest);
        assert_eq!(status_of("GET /source?bytes=2000000000 HTTP/1.1\r\n\r\n"), Status::BadRequest);
        assert_eq!(status_of("GET /sink HTTP/1.1\r\n\r\n"), Status::MethodNotAllowed);
    }

    #[test]
    fn the_seeded_stream_depends_on_seed_and_position_only() {
        // SplitMix64's first output from state 0 (the reference implementation's).
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        let mut whole = [0u8; 1000];
        seeded_fill(7, 0, &mut whole);
        // Any split into pieces gives the same bytes.
        let mut pieces = [0u8; 1000];
        for (i, chunk) in pieces.chunks_mut(13).enumerate() {
            seeded_fill(7, i as u64 * 13, chunk);
        }
        assert_eq!(whole, pieces);
        let mut other = [0u8; 1000];
        seeded_fill(8, 0, &mut other);
        assert_ne!(whole, other);
        // Not periodic in any small way: no 8-byte word repeats in the first 1000 bytes.
        let words: std::collections::BTreeSet<&[u8]> = whole.chunks(8).collect();
        assert_eq!(words.len(), 125);
        assert_eq!(seeded_byte(u64::MAX, u64::MAX), seeded_byte(u64::MAX, u64::MAX));
    }

    #[test]
    fn partial_heads_wait_for_more() {
        let full = "PUT /blk/8 HTTP/1.1\r\nContent-Length: 512\r\n\r\n";
        for cut in 0..full.len() {
            assert_eq!(head(&full[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn client_mistakes_get_4xx() {
        assert_eq!(status_of("GET /nope HTTP/1.1\r\n\r\n"), Status::NotFound);
        assert_eq!(status_of("DELETE / HTTP/1.1\r\n\r\n"), Status::MethodNotAllowed);
        assert_eq!(status_of("GET /echo HTTP/1.1\r\n\r\n"), Status::MethodNotAllowed);
        assert_eq!(status_of("POST /echo HTTP/1.1\r\n\r\n"), Status::LengthRequired);
        assert_eq!(status_of("POST /echo HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"), Status::PayloadTooLarge);
        assert_eq!(status_of("POST /echo HTTP/1.1\r\nContent-Length: x\r\n\r\n"), Status::BadRequest);
        assert_eq!(
            status_of("POST /echo HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Status::BadRequest
        );
        assert_eq!(status_of("POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), Status::NotImplemented);
        assert_eq!(status_of("GET /blk/x HTTP/1.1\r\n\r\n"), Status::BadRequest);
        assert_eq!(status_of("GET /blk/-1 HTTP/1.1\r\n\r\n"), Status::BadRequest);
        assert_eq!(status_of("GET /blk/0?count=0 HTTP/1.1\r\n\r\n"), Status::BadRequest);
        assert_eq!(status_of("GET /blk/0?count=99999 HTTP/1.1\r\n\r\n"), Status::BadRequest);
        assert_eq!(status_of("GET /blk/0?bogus=1 HTTP/1.1\r\n\r\n"), Status::BadRequest);
        assert_eq!(status_of("GET /blk/131072 HTTP/1.1\r\n\r\n"), Status::RangeNotSatisfiable);
        assert_eq!(status_of("GET /blk/131071?count=2 HTTP/1.1\r\n\r\n"), Status::RangeNotSatisfiable);
        assert_eq!(status_of("GET /blk/18446744073709551615?count=2 HTTP/1.1\r\n\r\n"), Status::RangeNotSatisfiable);
        assert_eq!(status_of("PUT /blk/0 HTTP/1.1\r\nContent-Length: 100\r\n\r\n"), Status::BadRequest);
        assert_eq!(status_of("PUT /blk/0 HTTP/1.1\r\nContent-Length: 0\r\n\r\n"), Status::BadRequest);
        assert_eq!(status_of("PUT /blk/0 HTTP/1.1\r\n\r\n"), Status::LengthRequired);
        assert_eq!(status_of("PUT /blk/131071 HTTP/1.1\r\nContent-Length: 1024\r\n\r\n"), Status::RangeNotSatisfiable);
        assert_eq!(status_of("GARBAGE\r\n\r\n"), Status::BadRequest);
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(status_of(&huge), Status::HeaderTooLarge);
        let many: String = (0..40).map(|i| format!("X{i}: y\r\n")).collect();
        assert_eq!(status_of(&format!("GET / HTTP/1.1\r\n{many}\r\n")), Status::HeaderTooLarge);
    }

    #[test]
    fn disk_routes_are_404_without_a_disk_and_503_while_its_driver_is_silent() {
        for req in ["GET /blk/0 HTTP/1.1\r\n\r\n", "POST /flush HTTP/1.1\r\n\r\n"] {
            assert_eq!(parse_head(req.as_bytes(), Disk::None).unwrap_err().status, Status::NotFound);
            assert_eq!(parse_head(req.as_bytes(), Disk::Unavailable).unwrap_err().status, Status::ServiceUnavailable);
        }
        assert!(parse_head(b"GET / HTTP/1.1\r\n\r\n", Disk::None).unwrap().is_some());
        assert!(parse_head(b"GET / HTTP/1.1\r\n\r\n", Disk::Unavailable).unwrap().is_some());
    }

    #[test]
    fn responses() {
        let h = response_head(Status::Ok, "text/plain", 5, true);
        assert_eq!(
            h.as_bytes(),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n"
        );
        let r = refusal_response(Refusal { status: Status::NotFound, why: "no" });
        assert_eq!(
            r.as_bytes(),
            b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nno\n"
        );
        for s in [Status::BadRequest, Status::RangeNotSatisfiable, Status::HeaderTooLarge, Status::VersionNotSupported]
        {
            assert!((400..600).contains(&s.code()) && !s.reason().is_empty());
        }
        let mut t = Text::<4>::default();
        assert!(t.write_str("12345").is_err());
        assert_eq!(t.as_bytes(), b"");
    }

    proptest! {
        #[test]
        fn prop_any_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_head(&bytes, DISK);
        }

        #[test]
        fn prop_blk_reads_are_in_range_or_refused(lba in any::<u64>(), count in 0u64..10000) {
            let req = format!("GET /blk/{lba}?count={count} HTTP/1.1\r\n\r\n");
            match head(&req) {
                Ok(Some(Head { route: Route::BlkRead { lba: l, count: c }, .. })) => {
                    prop_assert!(c >= 1 && l + c <= SECTORS);
                }
                Ok(other) => prop_assert!(false, "unexpected {:?}", other),
                Err(r) => prop_assert!(matches!(r.status, Status::BadRequest | Status::RangeNotSatisfiable)),
            }
        }
    }
}

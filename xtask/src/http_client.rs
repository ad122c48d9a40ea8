//! A minimal HTTP/1.1 client over plain TCP, for talking to the demo guest's web server from
//! the host (`cargo xtask bench net` and the end-to-end tests): one request at a time on a
//! kept-alive connection, bodies with `Content-Length`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Connects to `127.0.0.1:<port>` with generous timeouts (TCG is slow).
pub fn connect(port: u16) -> Result<TcpStream, String> {
    let s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connecting to 127.0.0.1:{port}: {e}"))?;
    for r in [s.set_read_timeout(Some(Duration::from_secs(120))), s.set_write_timeout(Some(Duration::from_secs(120)))] {
        r.map_err(|e| e.to_string())?;
    }
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(s)
}

/// Sends one request on `s` and reads the response: (status code, body).
pub fn request(s: &mut TcpStream, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n", body.len());
    s.write_all(head.as_bytes())
        .and_then(|_| s.write_all(body))
        .map_err(|e| format!("sending {method} {path}: {e}"))?;
    read_response(s)
}

/// The demo guest's HTTP server's own counts: the `http: ` line of its status page (`GET /`
/// on the guest at `port`): requests, refusals and the sleeps it began with work waiting
/// (a wake-up it lost itself; must be 0).
pub fn server_line(port: u16) -> Result<String, String> {
    let (status, body) = request(&mut connect(port)?, "GET", "/", b"")?;
    let page = String::from_utf8_lossy(&body);
    match page.lines().find(|l| l.starts_with("http: ")) {
        Some(l) if status == 200 => Ok(l.to_string()),
        _ => Err(format!("GET / on port {port} answered {status} without an `http:` line")),
    }
}

/// Reads one response: (status code, body).
pub fn read_response(s: &mut TcpStream) -> Result<(u16, Vec<u8>), String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) => {
                return Err(format!("connection closed in the response head: {:?}", String::from_utf8_lossy(&head)))
            }
            Err(e) => return Err(format!("reading the response head: {e}")),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or(format!("bad response head {head:?}"))?;
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").and_then(|v| v.trim().parse().ok()))
        .ok_or(format!("no Content-Length in {head:?}"))?;
    let mut body = vec![0; len];
    s.read_exact(&mut body).map_err(|e| format!("reading a {len}-byte body: {e}"))?;
    Ok((status, body))
}

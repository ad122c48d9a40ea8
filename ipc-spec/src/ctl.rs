//! The host control interface to dom0 (`cargo xtask ctl`): lines of ASCII text over dom0's
//! own control device (the manifest's `[machine] control = "virtio-console"`; QEMU puts its
//! other end on a unix socket next to the bundle). Being on that socket is the only
//! authentication: whoever can open it controls the stack.
//!
//! Requests, one per line (`\n`, an optional `\r` before it is ignored):
//!
//! ```text
//! list                 one line per domain (DomainLine), then "ok"
//! kill <name>          the domain fails as if it crashed: its restart policy applies
//! restart <name>       the domain is destroyed (if alive) and built again now, whatever
//!                      its restart limit (only a domain with restart = "always": dom0
//!                      keeps its channels to give them again)
//! help                 the commands, then "ok"
//! ```
//!
//! Every answer ends with a line that is either [`OK`] (possibly followed by a space and
//! words) or starts with [`ERROR`]: a client reads until one of those. Bad input (an unknown
//! command, a missing or extra word, a line longer than [`MAX_LINE`], bytes that are not
//! printable ASCII) gets an error line and changes nothing.

use core::fmt;

/// Longest request line, in bytes (without the newline).
pub const MAX_LINE: usize = 96;
/// An answer's last line on success (alone, or followed by a space and more words).
pub const OK: &str = "ok";
/// The start of an answer's last line on failure.
pub const ERROR: &str = "error: ";

/// A parsed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    List,
    Kill(&'a str),
    Restart(&'a str),
    Help,
}

/// Why a request line was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError<'a> {
    /// Nothing but blanks.
    Empty,
    /// The first word is no command.
    Unknown(&'a str),
    /// `kill` or `restart` without a domain name.
    MissingName(&'a str),
    /// More words than the command takes.
    Extra(&'a str),
    /// Longer than [`MAX_LINE`].
    TooLong,
    /// A byte that is not printable ASCII.
    NotText,
}

impl fmt::Display for ParseError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Empty => f.write_str("empty command (try \"help\")"),
            ParseError::Unknown(w) => write!(f, "unknown command \"{w}\" (try \"help\")"),
            ParseError::MissingName(c) => write!(f, "\"{c}\" needs a domain name"),
            ParseError::Extra(w) => write!(f, "unexpected \"{w}\""),
            ParseError::TooLong => write!(f, "line longer than {MAX_LINE} bytes"),
            ParseError::NotText => f.write_str("only printable ASCII is accepted"),
        }
    }
}

/// The help text's lines (before [`OK`]).
pub const HELP: &[&str] = &[
    "list            domains: state, restarts, I/O answered, IPC calls, signals",
    "kill NAME       make NAME fail as a crash (its restart policy applies)",
    "restart NAME    destroy NAME if alive and build it again now (restart = \"always\" only)",
];

/// Parse one request line (without its newline).
pub fn parse(line: &[u8]) -> Result<Command<'_>, ParseError<'_>> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > MAX_LINE {
        return Err(ParseError::TooLong);
    }
    if line.iter().any(|&b| !(b == b' ' || b == b'\t' || b.is_ascii_graphic())) {
        return Err(ParseError::NotText);
    }
    let text = core::str::from_utf8(line).map_err(|_| ParseError::NotText)?;
    let mut words = text.split_ascii_whitespace();
    let command = words.next().ok_or(ParseError::Empty)?;
    let parsed = match command {
        "list" => Command::List,
        "help" => Command::Help,
        "kill" | "restart" => {
            let name = words.next().ok_or(ParseError::MissingName(command))?;
            if command == "kill" {
                Command::Kill(name)
            } else {
                Command::Restart(name)
            }
        }
        other => return Err(ParseError::Unknown(other)),
    };
    match words.next() {
        Some(extra) => Err(ParseError::Extra(extra)),
        None => Ok(parsed),
    }
}

/// Collects bytes into request lines. A line longer than [`MAX_LINE`] is reported once,
/// at its newline, as [`ParseError::TooLong`] (its bytes are dropped meanwhile).
pub struct LineBuffer {
    buf: [u8; MAX_LINE + 1],
    len: usize,
    overflow: bool,
}

impl Default for LineBuffer {
    fn default() -> Self {
        Self { buf: [0; MAX_LINE + 1], len: 0, overflow: false }
    }
}

/// What [`LineBuffer::push`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed<'a> {
    /// The line is not complete yet.
    More,
    /// A whole line (without its newline).
    Line(&'a [u8]),
    /// A whole line that was too long.
    TooLong,
}

impl LineBuffer {
    /// Take one byte.
    pub fn push(&mut self, b: u8) -> Pushed<'_> {
        if b == b'\n' {
            let (len, overflow) = (self.len, self.overflow);
            self.len = 0;
            self.overflow = false;
            return if overflow { Pushed::TooLong } else { Pushed::Line(&self.buf[..len]) };
        }
        if self.len < self.buf.len() {
            self.buf[self.len] = b;
            self.len += 1;
        } else {
            self.overflow = true;
        }
        Pushed::More
    }
}

/// A domain's state as `list` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Built and not known to have failed.
    Running,
    /// Failed; dom0 builds it again after its backoff.
    Restarting,
    /// Destroyed and not built again (restart policy "never", or past its limit).
    Dead,
}

impl State {
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Restarting => "restarting",
            State::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [State::Running, State::Restarting, State::Dead].into_iter().find(|x| x.as_str() == s)
    }
}

/// One line of `list`: `<name> <state> restarts=<n> io=<n> ipc=<n> signals=<n>`, where
/// `io` counts the answers on the block channels it serves (`-` for none: only channels of
/// restartable servers are watched), `ipc` and `signals` the IPC calls and notifications its
/// vCPUs made (current incarnation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainLine<'a> {
    pub name: &'a str,
    pub state: State,
    pub restarts: u64,
    pub io: Option<u64>,
    pub ipc: u64,
    pub signals: u64,
}

impl fmt::Display for DomainLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} restarts={} io=", self.name, self.state.as_str(), self.restarts)?;
        match self.io {
            Some(n) => write!(f, "{n}")?,
            None => f.write_str("-")?,
        }
        write!(f, " ipc={} signals={}", self.ipc, self.signals)
    }
}

impl<'a> DomainLine<'a> {
    /// Read a line written by [`fmt::Display`] (the host side).
    pub fn parse(line: &'a str) -> Option<Self> {
        let mut w = line.split_ascii_whitespace();
        let name = w.next()?;
        let state = State::parse(w.next()?)?;
        let mut field = |key: &str| w.next()?.strip_prefix(key)?.strip_prefix('=');
        let restarts = field("restarts")?.parse().ok()?;
        let io = match field("io")? {
            "-" => None,
            n => Some(n.parse().ok()?),
        };
        let ipc = field("ipc")?.parse().ok()?;
        let signals = field("signals")?.parse().ok()?;
        Some(Self { name, state, restarts, io, ipc, signals })
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::format;

    #[test]
    fn commands_parse() {
        assert_eq!(parse(b"list"), Ok(Command::List));
        assert_eq!(parse(b"  list \r"), Ok(Command::List));
        assert_eq!(parse(b"help"), Ok(Command::Help));
        assert_eq!(parse(b"kill disk"), Ok(Command::Kill("disk")));
        assert_eq!(parse(b"restart\tnet"), Ok(Command::Restart("net")));
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        assert_eq!(parse(b""), Err(ParseError::Empty));
        assert_eq!(parse(b"   "), Err(ParseError::Empty));
        assert_eq!(parse(b"reboot"), Err(ParseError::Unknown("reboot")));
        assert_eq!(parse(b"kill"), Err(ParseError::MissingName("kill")));
        assert_eq!(parse(b"kill disk now"), Err(ParseError::Extra("now")));
        assert_eq!(parse(b"list all"), Err(ParseError::Extra("all")));
        assert_eq!(parse(b"kill \xffdisk"), Err(ParseError::NotText));
        assert_eq!(parse(b"kill\x00disk"), Err(ParseError::NotText));
        assert_eq!(parse(&[b'a'; MAX_LINE + 1]), Err(ParseError::TooLong));
        let shown = format!("{}", ParseError::Unknown("reboot"));
        assert!(shown.contains("reboot"), "{shown}");
    }

    #[test]
    fn lines_are_collected_and_overlong_ones_reported_once() {
        let mut b = LineBuffer::default();
        for &c in b"kil" {
            assert_eq!(b.push(c), Pushed::More);
        }
        assert_eq!(b.push(b'l'), Pushed::More);
        assert_eq!(b.push(b'\n'), Pushed::Line(b"kill"));
        for _ in 0..500 {
            assert_eq!(b.push(b'x'), Pushed::More);
        }
        assert_eq!(b.push(b'\n'), Pushed::TooLong);
        assert_eq!(b.push(b'\n'), Pushed::Line(b""));
        for &c in b"list" {
            b.push(c);
        }
        assert_eq!(b.push(b'\n'), Pushed::Line(b"list"));
    }

    #[test]
    fn domain_lines_round_trip() {
        for io in [None, Some(12345)] {
            let d = DomainLine { name: "disk", state: State::Restarting, restarts: 3, io, ipc: 7, signals: 99 };
            let text = format!("{d}");
            assert_eq!(DomainLine::parse(&text), Some(d), "{text}");
        }
        assert_eq!(DomainLine::parse("disk running restarts=x io=- ipc=0 signals=0"), None);
        assert_eq!(DomainLine::parse("disk sleeping restarts=0 io=- ipc=0 signals=0"), None);
        assert_eq!(DomainLine::parse("ok"), None);
    }
}

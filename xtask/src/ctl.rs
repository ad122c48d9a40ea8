//! `cargo xtask ctl list | kill NAME | restart NAME`: the host side of dom0's control
//! interface (protocol in `ipc_spec::ctl`). QEMU listens on a unix socket next to the bundle
//! (`target/stack/ctl.sock` for `cargo xtask run`) for the virtio console dom0 drives; this
//! connects, sends one request line and prints the answer up to its last line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipc_spec::ctl;

/// The socket's file name, next to the bundle.
pub const SOCKET_NAME: &str = "ctl.sock";

/// How long an answer may take: a restart rebuilds a domain (tens of ms) under emulation
/// on a loaded machine.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The socket of `cargo xtask run`'s stack.
pub fn default_socket() -> PathBuf {
    crate::build::default_target_dir().join("stack").join(SOCKET_NAME)
}

/// One domain as `list` shows it: (name, state, restarts, I/O answered).
pub type Listed = (String, ctl::State, u64, Option<u64>);

/// An open connection to dom0's control interface.
pub struct Ctl {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Ctl {
    pub fn connect(socket: &Path) -> Result<Self, String> {
        let s = UnixStream::connect(socket).map_err(|e| {
            format!("connecting to {}: {e} (is the stack running with a control device?)", socket.display())
        })?;
        s.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(|e| format!("{e}"))?;
        let reader = BufReader::new(s.try_clone().map_err(|e| format!("{e}"))?);
        Ok(Self { writer: s, reader })
    }

    /// Send `request` (one line) and return the answer's lines: `Ok` with the data lines and
    /// the final "ok" line's words, or `Err` with the error line's reason.
    pub fn request(&mut self, request: &str) -> Result<(Vec<String>, String), String> {
        if request.contains('\n') {
            return Err("a request is one line".into());
        }
        self.writer.write_all(format!("{request}\n").as_bytes()).map_err(|e| format!("sending: {e}"))?;
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err("the control socket closed".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("reading the answer: {e}")),
            }
            let line = line.trim_end_matches(['\n', '\r']).to_string();
            if let Some(why) = line.strip_prefix(ctl::ERROR) {
                return Err(why.to_string());
            }
            if line == ctl::OK {
                return Ok((lines, String::new()));
            }
            if let Some(words) = line.strip_prefix(ctl::OK).and_then(|w| w.strip_prefix(' ')) {
                return Ok((lines, words.to_string()));
            }
            lines.push(line);
        }
    }

    /// `list`, parsed.
    pub fn list(&mut self) -> Result<Vec<Listed>, String> {
        let (lines, _) = self.request("list")?;
        lines
            .iter()
            .map(|l| {
                ctl::DomainLine::parse(l)
                    .map(|d| (d.name.to_string(), d.state, d.restarts, d.io))
                    .ok_or_else(|| format!("unreadable list line: {l}"))
            })
            .collect()
    }
}

/// `cargo xtask ctl [--socket PATH] <request words>`.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut socket = default_socket();
    let mut words = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--socket" {
            socket = PathBuf::from(it.next().ok_or("--socket needs a path")?);
        } else {
            words.push(a.as_str());
        }
    }
    if words.is_empty() {
        return Err("ctl: say what: list | kill NAME | restart NAME | help".into());
    }
    let mut c = Ctl::connect(&socket)?;
    let (lines, words) = c.request(&words.join(" ")).map_err(|e| format!("dom0: {e}"))?;
    for l in lines {
        println!("{l}");
    }
    if !words.is_empty() {
        println!("{words}");
    }
    Ok(())
}

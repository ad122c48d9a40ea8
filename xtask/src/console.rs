//! A serial console to talk to: QEMU with `-serial stdio`, its output collected as it
//! comes (prompts end without a newline, so bytes, not lines) and its input fed from here,
//! so a test or benchmark can wait for a marker and type a command.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct Console {
    child: Child,
    stdin: Option<ChildStdin>,
    rx: mpsc::Receiver<Vec<u8>>,
    /// Everything the console printed so far (lossy UTF-8, `\r` removed).
    text: String,
    /// Where the next [`wait_for`](Self::wait_for) starts looking.
    cursor: usize,
    started: Instant,
    stderr: Option<std::thread::JoinHandle<String>>,
    /// Echo console output to this process's stdout as it arrives.
    pub echo: bool,
}

impl Console {
    /// Starts `cmd` (which must put the serial port on stdout) with piped stdio.
    pub fn spawn(mut cmd: Command) -> Result<Self, String> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let program = cmd.get_program().to_string_lossy().into_owned();
        let mut child = cmd.spawn().map_err(|e| format!("could not start {program}: {e}"))?;
        let started = Instant::now();
        let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let mut stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Ok(Self {
            stdin: child.stdin.take(),
            child,
            rx,
            text: String::new(),
            cursor: 0,
            started,
            stderr: Some(stderr),
            echo: false,
        })
    }

    /// Waits until `needle` appears after the end of the previous match; returns the time
    /// since the start. On timeout or exit the error quotes the end of the console.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<Duration, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.text[self.cursor..].find(needle) {
                self.cursor += pos + needle.len();
                return Ok(self.started.elapsed());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("timed out after {timeout:?} waiting for {needle:?}; {}", self.tail()));
            }
            match self.rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(bytes) => self.take(&bytes),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                    return Err(format!("QEMU ended ({status}) before {needle:?} appeared; {}", self.tail()));
                }
            }
        }
    }

    fn take(&mut self, bytes: &[u8]) {
        let s = String::from_utf8_lossy(bytes).replace('\r', "");
        if self.echo {
            print!("{s}");
            let _ = std::io::stdout().flush();
        }
        self.text.push_str(&s);
    }

    /// Types `text` on the console.
    pub fn send(&mut self, text: &str) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("the console's input is closed")?;
        stdin.write_all(text.as_bytes()).and_then(|_| stdin.flush()).map_err(|e| format!("typing on the console: {e}"))
    }

    /// Everything printed so far, including what is waiting in the pipe.
    pub fn text(&mut self) -> &str {
        while let Ok(bytes) = self.rx.try_recv() {
            self.take(&bytes);
        }
        &self.text
    }

    /// The text after the last match (what the latest command printed so far).
    pub fn since_last_match(&mut self) -> &str {
        let cursor = self.cursor;
        &self.text()[cursor..]
    }

    fn tail(&mut self) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(25)..].join("\n");
        format!("last console lines:\n{tail}")
    }

    /// Stops QEMU (if still running) and returns what it wrote to stderr.
    pub fn stop(mut self) -> String {
        self.kill();
        self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default()
    }

    fn kill(&mut self) {
        self.stdin = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_output_and_feeds_input() {
        // `cat` echoes what is typed: the same round trip as a shell on a serial port.
        let mut c = Console::spawn(Command::new("cat")).unwrap();
        c.send("hello\n").unwrap();
        c.wait_for("hello", Duration::from_secs(10)).unwrap();
        // A second wait for the same text needs a second occurrence.
        assert!(c.wait_for("hello", Duration::from_millis(300)).unwrap_err().contains("timed out"));
        c.send("hello again\n").unwrap();
        c.wait_for("hello", Duration::from_secs(10)).unwrap();
        assert_eq!(c.since_last_match(), " again\n");
        c.stop();
    }

    #[test]
    fn reports_an_early_exit() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo bye"]);
        let mut c = Console::spawn(cmd).unwrap();
        let e = c.wait_for("never", Duration::from_secs(10)).unwrap_err();
        assert!(e.contains("ended") && e.contains("bye"), "{e}");
    }
}

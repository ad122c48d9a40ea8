//! `cargo xtask load web`: ApacheBench (`ab -k`) against the demo guest's HTTP server, and a
//! count of the reports the stack printed meanwhile.
//!
//! The point is not the requests per second (wall clock under TCG) but what a sustained,
//! concurrent, kept-alive load shakes out of the notification path (issue 9): the net
//! driver VM's watchdog reports frames found before their interrupt ("late or lost"), the
//! disk driver VM and the doorbell server report completions found by a fallback timer
//! ("fallback"), a block client reports a driver that "did not answer", a domain reports a
//! failure ("FAILED"), and the `trace` microvisor dumps its ring ("trace:"). The command
//! fails if any of those appear, if `ab` reports a failed or non-2xx request, or if QEMU
//! ends on its own. `ab` comes from apache2-utils; it is not installed here.

use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use crate::bench::failure;
use crate::build::{self, Artifacts};
use crate::qemu::{self, Ending, Machine};

/// Console lines that count as a report (a lost or late wake-up, a timeout, a failure).
pub const REPORTS: [&str; 5] = ["late or lost", "fallback", "did not answer", "FAILED", "trace:"];

/// What `ab` printed that matters here.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct AbFigures {
    pub complete: u64,
    pub failed: u64,
    pub non_2xx: u64,
    pub requests_per_s: f64,
}

/// Parses `ab`'s summary ("Complete requests:", "Failed requests:", "Non-2xx responses:",
/// "Requests per second:"); `None` without a "Complete requests" line.
pub fn parse_ab(out: &str) -> Option<AbFigures> {
    let mut f = AbFigures::default();
    let mut complete = None;
    for line in out.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let first = value.split_ascii_whitespace().next().unwrap_or("");
        match key.trim() {
            "Complete requests" => complete = first.parse().ok(),
            "Failed requests" => f.failed = first.parse().unwrap_or(u64::MAX),
            "Non-2xx responses" => f.non_2xx = first.parse().unwrap_or(u64::MAX),
            "Requests per second" => f.requests_per_s = first.parse().unwrap_or(0.0),
            _ => {}
        }
    }
    f.complete = complete?;
    Some(f)
}

/// The console lines that are reports (see [`REPORTS`]).
pub fn reports(lines: &[String]) -> Vec<&String> {
    lines.iter().filter(|l| REPORTS.iter().any(|r| l.contains(r))).collect()
}

struct Options {
    requests: u64,
    concurrency: u64,
    microvisor: Option<PathBuf>,
}

fn options(args: &[String]) -> Result<Options, String> {
    let mut o = Options { requests: 20_000, concurrency: 8, microvisor: None };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("load web: {a} needs a value"));
        match a.as_str() {
            "-n" | "--n" => o.requests = value()?.parse().map_err(|e| format!("load web: -n: {e}"))?,
            "-c" | "--c" => o.concurrency = value()?.parse().map_err(|e| format!("load web: -c: {e}"))?,
            "--microvisor" => o.microvisor = Some(PathBuf::from(value()?)),
            other => return Err(format!("load web: unknown option `{other}`")),
        }
    }
    if o.requests == 0 || o.concurrency == 0 || o.concurrency > o.requests {
        return Err("load web: need 0 < -c <= -n".into());
    }
    Ok(o)
}

/// `cargo xtask load web [-n N] [-c C] [--microvisor path]`.
pub fn run(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("web") => web(&options(&args[1..])?),
        _ => Err("usage: cargo xtask load web [-n N] [-c C] [--microvisor path]".into()),
    }
}

fn web(o: &Options) -> Result<(), String> {
    if Command::new("ab").arg("-V").output().is_err() {
        return Err("load web: `ab` (ApacheBench, Debian package apache2-utils) is not installed".into());
    }
    let target = build::default_target_dir();
    let mut artifacts = build::build(&target, &crate::manifest::default_stack_path())?;
    if let Some(m) = &o.microvisor {
        artifacts = Artifacts { microvisor: m.clone(), ..artifacts };
    }
    let mut m = Machine::new(&artifacts);
    let port = qemu::free_port()?;
    let Some(p) = m.net_ports.first_mut() else {
        return Err("load web: the default stack has no virtio-net device".into());
    };
    *p = port;
    eprintln!("load web: booting the demo stack ({}), HTTP on 127.0.0.1:{port}", artifacts.microvisor.display());
    let url = format!("http://127.0.0.1:{port}/");
    let (tx, rx) = mpsc::channel();
    let mut started = false;
    let mut ab_result = None;
    let mut server_line = None;
    let run = qemu::run_captured_polling(&m, Duration::from_secs(3600), false, true, |lines| {
        if !started && lines.iter().any(|l| l.starts_with("[guest]") && l.contains("serving HTTP")) {
            started = true;
            let (n, c, url, tx) = (o.requests.to_string(), o.concurrency.to_string(), url.clone(), tx.clone());
            // `-l`: the status page's length changes with its counters (ab would count
            // every other length as a failed request).
            eprintln!("load web: ab -k -l -c {c} -n {n} {url}");
            std::thread::spawn(move || {
                let out = Command::new("ab").args(["-k", "-l", "-q", "-s", "120", "-c", &c, "-n", &n, &url]).output();
                let _ = tx.send(out);
            });
        }
        if let Ok(out) = rx.try_recv() {
            ab_result = Some(out);
            // The server's own line, while QEMU still runs: its count of sleeps begun
            // with work waiting (a wake-up it lost itself) must be 0.
            server_line = Some(crate::http_client::server_line(port));
            return true;
        }
        lines.iter().any(|l| l.contains("FATAL"))
    })?;
    let Some(out) = ab_result else {
        return Err(failure(&run, "load web: QEMU ended before ab did"));
    };
    let out = out.map_err(|e| format!("load web: running ab: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let figures = parse_ab(&stdout);
    let mut found: Vec<String> = reports(&run.lines).into_iter().cloned().collect();
    match server_line {
        Some(Ok(l)) => {
            println!("load web: the guest's server: {l}");
            if !l.contains(", 0 sleeps with work waiting") {
                found.push(format!("the guest's server slept with work waiting: {l}"));
            }
        }
        Some(Err(e)) => found.push(format!("the guest's status page after ab: {e}")),
        None => {}
    }
    for l in &found {
        println!("report: {l}");
    }
    if let Some(f) = figures {
        println!(
            "load web: ab -k -l -c {} -n {}: {} complete, {} failed, {} non-2xx, {:.1} requests/s (wall clock, TCG); {} report(s) on the console",
            o.concurrency,
            o.requests,
            f.complete,
            f.failed,
            f.non_2xx,
            f.requests_per_s,
            found.len()
        );
    }
    match figures {
        _ if !matches!(run.ending, Ending::Stopped) => Err(failure(&run, "load web: QEMU ended on its own")),
        None => Err(format!(
            "load web: ab gave no summary ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )),
        Some(f) if f.complete != o.requests || f.failed != 0 || f.non_2xx != 0 || !out.status.success() => {
            Err(format!("load web: ab: {f:?}, {}", out.status))
        }
        Some(_) if !found.is_empty() => Err(format!("load web: {} report(s) on the console", found.len())),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AB: &str = "Server Software:\nDocument Length:        1234 bytes\n\nConcurrency Level:      8\n\
Time taken for tests:   41.2 seconds\nComplete requests:      20000\nFailed requests:        3\n\
   (Connect: 0, Receive: 0, Length: 3, Exceptions: 0)\nNon-2xx responses:      2\n\
Keep-Alive requests:    20000\nRequests per second:    485.44 [#/sec] (mean)\n";

    #[test]
    fn reads_abs_summary() {
        let f = parse_ab(AB).unwrap();
        assert_eq!((f.complete, f.failed, f.non_2xx), (20000, 3, 2));
        assert!((f.requests_per_s - 485.44).abs() < 1e-9);
        // Without non-2xx responses ab prints no such line.
        let f = parse_ab(&AB.replace("Non-2xx responses:      2\n", "")).unwrap();
        assert_eq!(f.non_2xx, 0);
        assert_eq!(parse_ab("apr_socket_recv: Connection reset by peer (104)\n"), None);
    }

    #[test]
    fn counts_every_kind_of_report() {
        let lines: Vec<String> = [
            "[net] ready",
            "[net] device interrupts: 1 time(s) so far the 50 ms watchdog found frames before their interrupt (late or lost)",
            "[guest] block self-test FAILED: the driver VM did not answer within 5 s",
            "[microvisor] trace: a domain reported a fallback: the last 10 of 10 events",
            "[guest] GET / 200",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(reports(&lines).len(), 3);
    }
}

//! The client side of the IPC demo, and the IPC benchmark.
//!
//! Normally it makes `calls=<n>` (default 1000) calls on its endpoint channel, checks every
//! reply, and reports. With `bench=<n>` it measures, with the TSC (which counts executed
//! instructions when QEMU runs with `-icount shift=0`): a null hypercall, a call/reply
//! round trip, and (given a notification channel) a doorbell ping-pong, `n` times each,
//! and prints the median of each.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod client {
    use domain_rt::hypercall::{self, Message};
    use domain_rt::{println, BootInfo};
    use ipc_spec::Hypercall;

    domain_rt::domain_main!(main);

    fn main(info: &BootInfo) -> u64 {
        if let Some(timer) = domains::slot(info.cmdline, "timer") {
            let ms = info.arg("sleep_ms").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            if ms > 0 {
                let t0 = hypercall::clock_ns();
                if let Err(e) = hypercall::sleep_ns(timer, ms * 1_000_000) {
                    println!("sleep failed: {e}");
                    return 4;
                }
                let slept = (hypercall::clock_ns() - t0) / 1_000_000;
                println!("slept {slept} ms on the virtual timer (asked for {ms} ms)");
            }
        }
        if domains::first_endpoint(info.cmdline).is_none() {
            if let Some((name, signal, wait)) = domains::first_doorbell(info.cmdline) {
                let rings = info.arg("rings").and_then(|v| v.parse::<u64>().ok()).unwrap_or(100);
                for i in 0..rings {
                    if let Err(e) = hypercall::signal(signal, 1).and_then(|_| hypercall::wait(wait)) {
                        println!("doorbell {i} failed: {e}");
                        return 5;
                    }
                }
                println!("{rings} doorbells on \"{name}\" answered");
                println!("ready");
                return 0;
            }
        }
        let Some((name, ep)) = domains::first_endpoint(info.cmdline) else {
            println!("no channel on my command line: \"{}\"", info.cmdline);
            return 1;
        };
        if let Some(n) = info.arg("bench").and_then(|v| v.parse::<u64>().ok()) {
            bench(ep, domains::first_doorbell(info.cmdline), n.max(1));
            println!("ready");
            return 0;
        }
        let calls = info.arg("calls").and_then(|v| v.parse::<u64>().ok()).unwrap_or(1000);
        if let Err(status) = round(ep, calls) {
            return status;
        }
        println!("{calls} calls to \"{name}\" answered correctly");
        println!("ready");
        // `repeat_ms=<ms>`: keep going, a round of calls every <ms> (shows the server
        // still serves, e.g. while a fuzzer runs beside it).
        let (Some(ms), Some(timer)) =
            (info.arg("repeat_ms").and_then(|v| v.parse::<u64>().ok()), domains::slot(info.cmdline, "timer"))
        else {
            return 0;
        };
        for k in 1.. {
            if let Err(e) = hypercall::sleep_ns(timer, ms * 1_000_000) {
                println!("sleep failed: {e}");
                return 4;
            }
            if let Err(status) = round(ep, calls) {
                return status;
            }
            println!("round {k}: {calls} calls to \"{name}\" answered correctly");
        }
        0
    }

    /// `calls` calls on `ep`, each reply checked; Err(exit status) on a failure.
    fn round(ep: u64, calls: u64) -> Result<(), u64> {
        for i in 0..calls {
            let msg = Message::new(&[i, i ^ 0x5a5a, 3, 4, 5, 6]);
            match hypercall::ipc_call(ep, &msg) {
                Ok(r) if r.len == 6 && r.words == [i + 1, i ^ 0x5a5a, 3, 4, 5, 6] => {}
                Ok(r) => {
                    println!("call {i}: wrong reply {r:?}");
                    return Err(2);
                }
                Err(e) => {
                    println!("call {i} failed: {e}");
                    return Err(3);
                }
            }
        }
        Ok(())
    }

    fn rdtsc() -> u64 {
        // SAFETY: RDTSC is unprivileged and side-effect free.
        unsafe { core::arch::x86_64::_rdtsc() }
    }

    /// Exact medians of small values: a histogram up to `BINS`, larger ones counted apart.
    const BINS: usize = 8192;

    struct Histogram {
        bins: alloc::vec::Vec<u32>,
        over: u64,
        n: u64,
    }

    impl Histogram {
        fn new() -> Self {
            Self { bins: alloc::vec![0; BINS], over: 0, n: 0 }
        }
        fn add(&mut self, v: u64) {
            self.n += 1;
            match self.bins.get_mut(v as usize) {
                Some(b) => *b += 1,
                None => self.over += 1,
            }
        }
        fn median(&self) -> u64 {
            let mut seen = 0u64;
            for (v, &c) in self.bins.iter().enumerate() {
                seen += c as u64;
                if seen * 2 >= self.n {
                    return v as u64;
                }
            }
            BINS as u64
        }
    }

    fn measure(n: u64, mut op: impl FnMut()) -> (u64, u64) {
        let mut h = Histogram::new();
        for _ in 0..n {
            let t0 = rdtsc();
            op();
            h.add(rdtsc() - t0);
        }
        (h.median(), h.over)
    }

    fn bench(ep: u64, doorbell: Option<(&str, u64, u64)>, n: u64) {
        // The floor: a hypercall that does nothing.
        println!("bench: phase null start");
        let (null, over_null) = measure(n, || {
            hypercall::raw(Hypercall::Null.number(), 0, 0, [0; 6]);
        });
        println!("bench: phase null done");
        let msg = Message::new(&[1, 2, 3, 4, 5, 6]);
        println!("bench: phase ipc start");
        let (ipc, over_ipc) = measure(n, || {
            let _ = hypercall::ipc_call(ep, &msg);
        });
        println!("bench: phase ipc done");
        let (ntf, over_ntf) = match doorbell {
            Some((_, signal, wait)) => {
                println!("bench: phase notification start");
                // Ring and wait for the answer in one hypercall (the peer answers the same
                // way): one exit per side, as an IPC call and its reply.
                let r = measure(n, || {
                    let _ = hypercall::signal_wait(signal, 1, wait);
                });
                println!("bench: phase notification done");
                r
            }
            None => (0, 0),
        };
        println!(
            "bench: n={n} null_hypercall_median={null} ipc_roundtrip_median={ipc} notification_roundtrip_median={ntf} outliers={}",
            over_null + over_ipc + over_ntf
        );
    }
}

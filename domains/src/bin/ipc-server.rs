//! The server side of the IPC demo and benchmark. With an endpoint channel it answers every
//! call with word 0 plus one and the other words echoed; with only a notification channel
//! it answers every doorbell with a doorbell back.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
mod server {
    use domain_rt::hypercall;
    use domain_rt::{println, BootInfo};

    domain_rt::domain_main!(main);

    fn main(info: &BootInfo) -> u64 {
        if let Some((name, ep)) = domains::first_endpoint(info.cmdline) {
            return serve_calls(name, ep);
        }
        if let Some((name, signal, wait)) = domains::first_doorbell(info.cmdline) {
            if info.arg("mode") == Some("irq") {
                return serve_doorbells_by_interrupt(name, signal, wait, info.slot("timer"));
            }
            println!("answering doorbells on \"{name}\"");
            println!("ready");
            // Wait for the first doorbell, then answer each one and wait for the next in
            // one hypercall.
            let mut next = hypercall::wait(wait);
            loop {
                if let Err(e) = next.and_then(|_| hypercall::signal_wait(signal, 1, wait)) {
                    println!("doorbell failed: {e}");
                    return 3;
                }
                next = Ok(0);
            }
        }
        println!("no channel on my command line: \"{}\"", info.cmdline);
        1
    }

    /// The doorbell arrives as a virtual interrupt while this vCPU halts (no Wait call):
    /// each one is answered with a doorbell back. Counts the doorbells found after a virtual
    /// interrupt woke this vCPU from HLT; the others were already pending when it looked
    /// (the tick preempted it after an answer, before it halted, and the peer rang then).
    ///
    /// `timer`: a fallback that looks at the doorbell every [`FALLBACK_NS`] while halted.
    /// A doorbell it finds came before its virtual interrupt (late, or lost: a lost wake-up
    /// hung this test once under load; see docs/design.md): counted and reported, not a
    /// hang.
    fn serve_doorbells_by_interrupt(name: &str, signal: u64, wait: u64, timer: Option<u64>) -> u64 {
        const FALLBACK_NS: u64 = 200_000_000;
        if let Err(e) = hypercall::bind(wait, domain_rt::irq::VIRQ_VECTOR) {
            println!("bind failed: {e}");
            return 4;
        }
        let timer = timer.filter(|&t| hypercall::bind(t, domain_rt::irq::TIMER_VECTOR).is_ok());
        if let Some(t) = timer {
            let _ = hypercall::timer_set(t, FALLBACK_NS, 1);
        }
        let (mut by_fallback, mut fallback) = (0u64, false);
        println!("answering doorbells on \"{name}\" by virtual interrupt {:#x}", domain_rt::irq::VIRQ_VECTOR);
        println!("ready");
        // The counts at the last wake-up (or the start).
        let mut counts = domain_rt::irq::Counts::now();
        let (mut answered, mut after_interrupt, mut woken) = (0u64, 0u64, false);
        loop {
            // Bits may have arrived before we halted: take them first.
            let bits = hypercall::poll(wait).unwrap_or(0);
            if bits == 0 {
                domain_rt::irq::wait_for_virq(counts.all);
                let now = domain_rt::irq::Counts::now();
                let arrived = counts.until(now);
                counts = now;
                if arrived.timer {
                    if let Some(t) = timer {
                        let _ = hypercall::timer_set(t, FALLBACK_NS, 1);
                    }
                }
                // Nothing but the fallback woke us: a doorbell found now had no interrupt.
                (woken, fallback) = (!arrived.timer_only(), arrived.timer_only());
                continue;
            }
            answered += 1;
            if core::mem::take(&mut woken) {
                after_interrupt += 1;
            }
            // Only the timer woke us and the doorbell is there: its interrupt may still be
            // offered, kept out by our own CLI while we were preempted after waking (rung
            // meanwhile). Let it in: only if it does not come was it late or lost.
            if fallback {
                domain_rt::irq::let_offered_in();
                let now = domain_rt::irq::Counts::now();
                fallback = !counts.until(now).others;
                counts = now;
            }
            if core::mem::take(&mut fallback) {
                by_fallback += 1;
                println!("doorbell {answered} found by the fallback timer before its interrupt, late or lost ({by_fallback} so far)");
            }
            if answered.is_multiple_of(100) {
                println!("{answered} doorbells answered, {after_interrupt} of them after a virtual interrupt woke me from HLT");
            }
            if let Err(e) = hypercall::signal(signal, 1) {
                println!("signal failed: {e}");
                return 5;
            }
        }
    }

    fn serve_calls(name: &str, ep: u64) -> u64 {
        println!("serving \"{name}\" (slot {ep})");
        println!("ready");
        let mut msg = match hypercall::ipc_recv(ep) {
            Ok((m, _badge)) => m,
            Err(e) => {
                println!("recv failed: {e}");
                return 2;
            }
        };
        loop {
            msg.words[0] = msg.words[0].wrapping_add(1);
            match hypercall::ipc_reply_recv(ep, &msg) {
                Ok((m, _badge)) => msg = m,
                Err(e) => {
                    println!("reply_recv failed: {e}");
                    return 2;
                }
            }
        }
    }
}

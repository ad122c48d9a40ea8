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
            println!("answering doorbells on \"{name}\"");
            println!("ready");
            loop {
                if let Err(e) = hypercall::wait(wait).and_then(|_| hypercall::signal(signal, 1)) {
                    println!("doorbell failed: {e}");
                    return 3;
                }
            }
        }
        println!("no channel on my command line: \"{}\"", info.cmdline);
        1
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

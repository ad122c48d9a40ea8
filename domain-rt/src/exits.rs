//! Serving a VM's exits (`ipc_spec::exit`): the receive loop every VMM domain runs, and the
//! message page the exits' state groups arrive in. The exits and the VMM's notifications
//! (its timer, doorbells: bound to the receive) come in through one receive; each exit is
//! answered by the reply of the next receive.

use ipc_spec::exit::{ExitMessage, ExitReply, STATE_WORDS};
use ipc_spec::hypercall::NOTIFICATION_BADGE;
use ipc_spec::Error;

use crate::hypercall::{self, Message};
use crate::println;

/// What the loop asks of a VMM.
pub trait ExitHandler {
    /// Before each wait: inject what is pending, arm timers.
    fn before_wait(&mut self) {}
    /// A notification bound to the receive woke the VMM; `Some(status)` ends the loop.
    fn wake(&mut self) -> Option<u64>;
    /// Handle an exit: the reply, or `Err(status)` to end the loop (the VM stays stopped).
    fn exit(&mut self, x: &ExitMessage) -> Result<ExitReply, u64>;
}

/// Serve the exits arriving on the endpoint in `exits` (receive right) until the handler ends
/// the loop; returns its status, or 3 when a receive fails.
pub fn serve(exits: u64, h: &mut impl ExitHandler) -> u64 {
    let mut reply: Option<ExitReply> = None;
    loop {
        h.before_wait();
        let got = match reply.take() {
            Some(r) => hypercall::ipc_reply_recv(exits, &Message::new(&r.encode())),
            None => hypercall::ipc_recv(exits),
        };
        let (msg, badge) = match got {
            Ok(m) => m,
            Err(e) => {
                println!("receiving the VM's exits failed: {e}");
                return 3;
            }
        };
        if badge == NOTIFICATION_BADGE {
            if let Some(status) = h.wake() {
                return status;
            }
            continue;
        }
        match ExitMessage::decode(&msg.words) {
            Some(x) => match h.exit(&x) {
                Ok(r) => reply = Some(r),
                Err(status) => return status,
            },
            None => println!("not an exit message: {:x?}", msg.words),
        }
    }
}

/// The VMM vCPU's message page: the microvisor writes the state groups of an exit there
/// (`ipc_spec::exit::at` offsets), and a reply's `write_state` groups are read from there.
#[repr(C, align(4096))]
struct Page([u64; 512]);
static mut PAGE: Page = Page([0; 512]);

// The state words are inside the page.
const _: () = assert!(STATE_WORDS <= 512);

/// Register the message page (once, before serving exits).
pub fn register_message_page() -> Result<(), Error> {
    hypercall::set_message_page((&raw const PAGE) as u64)
}

/// The message page's words. Hold one at a time.
pub fn state_words() -> &'static mut [u64; 512] {
    let p = &raw mut PAGE;
    // SAFETY: only this single-threaded domain touches PAGE, through one reference at a
    // time; the microvisor writes it only while this vCPU waits in a receive, never while
    // this code runs.
    unsafe { &mut (*p).0 }
}

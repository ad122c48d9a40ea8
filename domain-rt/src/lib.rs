//! The runtime every domain links: PVH entry (the same trampoline as the microvisor), an
//! IDT whose handlers report exceptions to the console and stop the domain, a small heap,
//! console printing, and the hypercall stubs.
//!
//! A domain binary says `domain_rt::domain_main!(main);` with `fn main(&BootInfo) -> u64`;
//! the returned value becomes its exit status. Its linker script is `domain-rt/link.ld`.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod bench;
pub mod channels;
pub mod console;
pub mod exits;
pub mod heartbeat;
pub mod hypercall;
pub mod irq;
#[cfg(target_os = "none")]
mod rt;
pub mod shared;

pub use pvh;
use pvh::start_info::ParsedStartInfo;
#[cfg(target_os = "none")]
pub use rt::{exception_handler, start};

/// What a domain learns at boot.
pub struct BootInfo {
    pub start_info: ParsedStartInfo<'static>,
    pub cmdline: &'static str,
}

impl BootInfo {
    /// The value of `key` in the domain's command line (`key=value` words).
    pub fn arg(&self, key: &str) -> Option<&'static str> {
        self.cmdline.split_ascii_whitespace().filter_map(|w| w.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// The capability slot dom0 put in `key=<slot>` (`dev`, `irq`, `timer`, `status`, ...).
    pub fn slot(&self, key: &str) -> Option<u64> {
        self.arg(key).and_then(|v| v.parse().ok())
    }
}

/// Expand in the domain binary: the PVH entry, the exception stubs, and the call of `$main`.
#[macro_export]
macro_rules! domain_main {
    ($main:path) => {
        $crate::pvh::pvh_entry!(__domain_entry, 64 * 1024);
        $crate::pvh::exception_stubs!($crate::exception_handler);

        extern "C" fn __domain_entry(start_info: u32) -> ! {
            $crate::start(start_info, $main)
        }
    };
}

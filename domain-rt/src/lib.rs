//! The runtime every domain links: PVH entry (the same trampoline as the microvisor), an
//! IDT whose handlers report exceptions to the console and stop the domain, a small heap,
//! console printing, and the hypercall stubs.
//!
//! A domain binary says `domain_rt::domain_main!(main);` with `fn main(&BootInfo) -> u64`;
//! the returned value becomes its exit status. Its linker script is `domain-rt/link.ld`.
#![no_std]

extern crate alloc;

pub mod console;
pub mod hypercall;

use core::fmt::Write as _;

use linked_list_allocator::LockedHeap;
use pvh::exceptions::{exception_name, ExceptionFrame, Idt};
use pvh::start_info::{parse_start_page, ParsedStartInfo};

pub use pvh;

/// What a domain learns at boot.
pub struct BootInfo {
    pub start_info: ParsedStartInfo<'static>,
    pub cmdline: &'static str,
}

impl BootInfo {
    /// The value of `key` in the domain's command line (`key=value` words).
    pub fn arg(&self, key: &str) -> Option<&'static str> {
        self.cmdline
            .split_ascii_whitespace()
            .filter_map(|w| w.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}

const HEAP_SIZE: usize = 256 * 1024;
static mut HEAP: [u8; HEAP_SIZE] = [0; HEAP_SIZE];

#[cfg_attr(target_os = "none", global_allocator)]
static ALLOCATOR: LockedHeap = LockedHeap::empty();

static IDT: spin::Once<Idt> = spin::Once::new();

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

#[cfg(target_os = "none")]
/// Runtime set-up, then the domain's main; its return value is the exit status.
pub fn start(start_info: u32, main: fn(&BootInfo) -> u64) -> ! {
    let idt = IDT.call_once(|| {
        let mut idt = Idt::new();
        for (vector, stub) in pvh::exceptions::exception_stub_addresses().into_iter().enumerate() {
            idt.set(vector as u8, stub, 0x08, 0);
        }
        idt
    });
    idt.load();
    // SAFETY: HEAP is used only through the allocator, initialised once here before any
    // allocation; only its address is taken.
    unsafe { ALLOCATOR.lock().init((&raw mut HEAP) as *mut u8, HEAP_SIZE) };

    // SAFETY: the loader (the microvisor) put the start info page at `start_info` in this
    // domain's RAM, which the boot trampoline identity-maps; nothing writes it afterwards.
    let page = unsafe { core::slice::from_raw_parts(start_info as usize as *const u8, 4096) };
    let parsed = match parse_start_page(page, start_info as u64) {
        Ok(p) => p,
        Err(e) => {
            println!("bad start info: {e}");
            hypercall::domain_exit(0xbad)
        }
    };
    let cmdline = core::str::from_utf8(parsed.cmdline()).unwrap_or("");
    let info = BootInfo { start_info: parsed, cmdline };
    let status = main(&info);
    console::flush();
    hypercall::domain_exit(status)
}

#[cfg(target_os = "none")]
/// An exception in a domain: report it on the console and stop this domain.
pub extern "C" fn exception_handler(frame: &mut ExceptionFrame) {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    let mut w = console::Writer::new();
    let _ = writeln!(
        w,
        "exception {} ({}), error code {:#x}, RIP {:#x}, CR2 {:#x}, RSP {:#x}",
        frame.vector,
        exception_name(frame.vector),
        frame.error_code,
        frame.rip,
        cr2,
        frame.rsp
    );
    drop(w);
    hypercall::domain_exit(0x100 + frame.vector)
}

#[cfg(target_os = "none")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("panic: {info}");
    hypercall::domain_exit(0xdead)
}

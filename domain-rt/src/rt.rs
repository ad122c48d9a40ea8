//! The bare-metal half of the runtime: IDT, heap, start-up and the panic handler.

use core::fmt::Write as _;

use linked_list_allocator::LockedHeap;
use pvh::exceptions::{exception_name, ExceptionFrame, Idt};
use pvh::start_info::parse_start_page;

use crate::{console, hypercall, println, BootInfo};

const HEAP_SIZE: usize = 1024 * 1024;
static mut HEAP: [u8; HEAP_SIZE] = [0; HEAP_SIZE];

#[global_allocator]
static ALLOCATOR: LockedHeap = LockedHeap::empty();

static IDT: spin::Once<Idt> = spin::Once::new();

/// Runtime set-up, then the domain's main; its return value is the exit status.
pub fn start(start_info: u32, main: fn(&BootInfo) -> u64) -> ! {
    let idt = IDT.call_once(|| {
        let mut idt = Idt::new();
        for (vector, stub) in pvh::exceptions::exception_stub_addresses().into_iter().enumerate() {
            idt.set(vector as u8, stub, 0x08, 0);
        }
        idt.set(crate::irq::VIRQ_VECTOR, crate::irq::entry_address(), 0x08, 0);
        idt.set(crate::irq::TIMER_VECTOR, crate::irq::timer_entry_address(), 0x08, 0);
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

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("panic: {info}");
    hypercall::domain_exit(0xdead)
}

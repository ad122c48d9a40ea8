//! Hypercall stubs: VMMCALL with the register convention of `ipc_spec::hypercall`.

use ipc_spec::hypercall::{result_of, Hypercall};
use ipc_spec::Error;

/// Raw hypercall with up to two arguments; returns the RAX status word.
pub fn call2(number: u64, arg0: u64, arg1: u64) -> u64 {
    let status: u64;
    // SAFETY: VMMCALL traps to the microvisor, which reads RAX/RDI/RSI, may write RAX, and
    // preserves every other register; it touches no memory of ours except as the call
    // documents (reads of the buffer we name).
    unsafe {
        core::arch::asm!(
            "vmmcall",
            inout("rax") number => status,
            in("rdi") arg0,
            in("rsi") arg1,
            options(nostack),
        );
    }
    status
}

/// Write bytes to the console (split into calls of at most CONSOLE_WRITE_MAX bytes).
pub fn console_write(bytes: &[u8]) -> Result<(), Error> {
    for chunk in bytes.chunks(ipc_spec::hypercall::CONSOLE_WRITE_MAX as usize) {
        result_of(call2(
            Hypercall::ConsoleWrite.number(),
            chunk.as_ptr() as u64,
            chunk.len() as u64,
        ))?;
    }
    Ok(())
}

/// Stop this domain with `status`.
pub fn domain_exit(status: u64) -> ! {
    crate::console::flush();
    loop {
        call2(Hypercall::DomainExit.number(), status, 0);
    }
}

/// Power off the machine (dom0 only); returns only on error.
pub fn shutdown(status: u64) -> Error {
    crate::console::flush();
    match result_of(call2(Hypercall::Shutdown.number(), status, 0)) {
        Ok(()) => Error::Unknown,
        Err(e) => e,
    }
}

//! Hypercall numbers and register convention.
//!
//! A domain calls the microvisor with `VMMCALL` (3 bytes; the microvisor advances RIP past it):
//!
//! | register | on entry            | on return                          |
//! |----------|---------------------|------------------------------------|
//! | RAX      | hypercall number    | status: 0 = success, else [`Error`] code |
//! | RDI      | argument 0          | result 0 (if the call has one)     |
//! | RSI      | argument 1          | result 1                           |
//! | RDX      | argument 2          | result 2                           |
//! | R10      | argument 3          |                                    |
//! | R8       | argument 4          |                                    |
//! | R9       | argument 5          |                                    |
//!
//! All other registers are preserved. Arguments that name guest memory are guest-physical
//! addresses in the caller's own stage-2 space.

use crate::error::Error;

/// Every hypercall the microvisor implements, by number (RAX).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Hypercall {
    /// Write bytes to the console. RDI = guest-physical address, RSI = length
    /// (at most [`CONSOLE_WRITE_MAX`]). The microvisor prefixes each line with the domain's name.
    ConsoleWrite = 1,
    /// Stop the calling domain. RDI = exit status (0 = clean). Does not return.
    DomainExit = 2,
    /// Power off the whole machine. RDI = status (0 = success). Only dom0 may call it
    /// (others get [`Error::PermissionDenied`]). Does not return on success.
    Shutdown = 3,
}

/// Longest single console write; longer output takes several calls.
pub const CONSOLE_WRITE_MAX: u64 = 4096;

impl Hypercall {
    /// Decode RAX; `None` for numbers the microvisor does not know.
    pub const fn from_number(number: u64) -> Option<Self> {
        match number {
            1 => Some(Self::ConsoleWrite),
            2 => Some(Self::DomainExit),
            3 => Some(Self::Shutdown),
            _ => None,
        }
    }

    pub const fn number(self) -> u64 {
        self as u64
    }
}

/// Encode a hypercall result into the RAX status word.
pub const fn status_of(result: Result<(), Error>) -> u64 {
    match result {
        Ok(()) => 0,
        Err(e) => e.code(),
    }
}

/// Decode the RAX status word a hypercall returned.
pub const fn result_of(status: u64) -> Result<(), Error> {
    if status == 0 {
        return Ok(());
    }
    match Error::from_code(status) {
        Some(e) => Err(e),
        None => Err(Error::Unknown),
    }
}

/// CPUID leaf where the microvisor identifies itself to domains (EBX, ECX, EDX spell
/// [`CPUID_SIGNATURE`]; EAX is the highest hypervisor leaf). Leaf 1 ECX bit 31 is set too.
pub const CPUID_LEAF_SIGNATURE: u32 = 0x4000_0000;
/// CPUID leaf whose EAX is [`crate::ABI_VERSION`].
pub const CPUID_LEAF_ABI: u32 = 0x4000_0001;
pub const CPUID_SIGNATURE: [u8; 12] = *b"Microvisor  ";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip() {
        for h in [
            Hypercall::ConsoleWrite,
            Hypercall::DomainExit,
            Hypercall::Shutdown,
        ] {
            assert_eq!(Hypercall::from_number(h.number()), Some(h));
        }
        assert_eq!(Hypercall::from_number(0), None);
        assert_eq!(Hypercall::from_number(u64::MAX), None);
    }

    #[test]
    fn status_round_trip() {
        assert_eq!(result_of(status_of(Ok(()))), Ok(()));
        assert_eq!(
            result_of(status_of(Err(Error::BadAddress))),
            Err(Error::BadAddress)
        );
        assert_eq!(result_of(0xdead_beef), Err(Error::Unknown));
    }
}

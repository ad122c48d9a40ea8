//! Error codes returned in RAX by every hypercall. Codes are stable ABI: never renumber.

use core::fmt;

macro_rules! errors {
    ($($(#[$doc:meta])* $name:ident = $code:expr => $text:expr,)*) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u64)]
        pub enum Error {
            $($(#[$doc])* $name = $code,)*
        }

        impl Error {
            pub const ALL: &'static [Error] = &[$(Error::$name,)*];

            pub const fn code(self) -> u64 {
                self as u64
            }

            pub const fn from_code(code: u64) -> Option<Self> {
                match code {
                    $($code => Some(Self::$name),)*
                    _ => None,
                }
            }

            pub const fn text(self) -> &'static str {
                match self {
                    $(Self::$name => $text,)*
                }
            }
        }
    };
}

errors! {
    /// RAX named no hypercall the microvisor implements.
    UnknownHypercall = 1 => "unknown hypercall",
    /// An argument is out of its documented range.
    InvalidArgument = 2 => "invalid argument",
    /// A guest-physical address range is not (entirely) the caller's RAM.
    BadAddress = 3 => "address is not the caller's RAM",
    /// The capability lacks a right the call needs.
    PermissionDenied = 4 => "permission denied",
    /// The slot is out of range or empty.
    InvalidSlot = 5 => "no capability in that slot",
    /// The capability is of the wrong kind for this call.
    WrongType = 6 => "capability of the wrong type",
    /// The object the capability named is gone (e.g. a destroyed domain).
    StaleCapability = 7 => "the capability's object no longer exists",
    /// Not enough free memory, or a fixed-size table of objects is full.
    OutOfMemory = 8 => "out of memory or object table full",
    /// The target domain's capability table is full.
    NoFreeSlot = 9 => "no free capability slot",
    /// The guest-physical range is already (partly) mapped.
    AlreadyMapped = 10 => "range already mapped",
    /// The region is not mapped in that domain.
    NotMapped = 11 => "not mapped",
    /// The call cannot be made in the current state (e.g. starting a running vCPU).
    InvalidState = 12 => "not possible in the current state",
    /// A long message needs a message page on both sides.
    NoMessagePage = 13 => "no message page registered",
    /// The IPC partner went away (e.g. its domain was destroyed) before the message got through.
    PartnerGone = 14 => "IPC partner went away",
    /// The device is assigned to another domain (or, for config access, not to the caller).
    DeviceBusy = 15 => "device assigned elsewhere",
    /// The device is completing a function-level reset (100 ms after its last release,
    /// PCIe base spec §6.6.2): try again later.
    DeviceResetting = 16 => "device still resetting: try again",
    /// A status word the caller's ABI version does not know (only produced by decoders).
    Unknown = 0xffff => "unknown error code",
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for &e in Error::ALL {
            assert_eq!(Error::from_code(e.code()), Some(e));
        }
        assert_eq!(Error::from_code(0), None);
    }
}

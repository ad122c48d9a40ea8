//! Error codes returned in RAX by every hypercall. Codes are stable ABI: never renumber.

use core::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Error {
    /// RAX named no hypercall the microvisor implements.
    UnknownHypercall = 1,
    /// An argument is out of its documented range (e.g. a length over the maximum).
    InvalidArgument = 2,
    /// A guest-physical address range is not (entirely) the caller's RAM.
    BadAddress = 3,
    /// The caller lacks the right to do this.
    PermissionDenied = 4,
    /// A status word the caller's ABI version does not know (only produced by decoders).
    Unknown = 0xffff,
}

impl Error {
    pub const fn code(self) -> u64 {
        self as u64
    }

    pub const fn from_code(code: u64) -> Option<Self> {
        match code {
            1 => Some(Self::UnknownHypercall),
            2 => Some(Self::InvalidArgument),
            3 => Some(Self::BadAddress),
            4 => Some(Self::PermissionDenied),
            0xffff => Some(Self::Unknown),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::UnknownHypercall => "unknown hypercall",
            Self::InvalidArgument => "invalid argument",
            Self::BadAddress => "address is not the caller's RAM",
            Self::PermissionDenied => "permission denied",
            Self::Unknown => "unknown error code",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for e in [
            Error::UnknownHypercall,
            Error::InvalidArgument,
            Error::BadAddress,
            Error::PermissionDenied,
            Error::Unknown,
        ] {
            assert_eq!(Error::from_code(e.code()), Some(e));
        }
        assert_eq!(Error::from_code(0), None);
    }
}

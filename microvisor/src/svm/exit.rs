//! #VMEXIT codes (AMD APM vol. 2, appendix C) decoded into what the microvisor acts on.

pub const CPUID: u64 = 0x72;
pub const HLT: u64 = 0x78;
pub const IOIO: u64 = 0x7b;
pub const MSR: u64 = 0x7c;
pub const SHUTDOWN: u64 = 0x7f;
pub const VMMCALL: u64 = 0x81;
pub const INTR: u64 = 0x60;
pub const NMI: u64 = 0x61;
pub const NPF: u64 = 0x400;
/// VMRUN found the VMCB's guest state invalid.
pub const INVALID: u64 = u64::MAX;
const EXCEPTION_BASE: u64 = 0x40;

/// Why the guest stopped running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    Cpuid,
    Hlt,
    /// Port I/O; `info1` carries port, size and direction.
    Io {
        port: u16,
        write: bool,
        next_rip: u64,
    },
    /// RDMSR (`write` false) or WRMSR (`write` true); the MSR number is in guest RCX.
    Msr {
        write: bool,
    },
    /// Triple fault.
    Shutdown,
    Vmmcall,
    /// A physical interrupt or NMI arrived while the guest ran.
    PhysicalInterrupt,
    /// A stage-2 (nested page) fault at a guest-physical address.
    NestedPageFault {
        gpa: u64,
        error: NptFaultError,
    },
    /// An intercepted exception.
    Exception {
        vector: u8,
        error_code: u64,
    },
    /// VMRUN refused the guest state.
    Invalid,
    /// An intercept this microvisor sets but does not single out (e.g. VMRUN, STGI).
    Other(u64),
}

/// The nested page fault error code (EXITINFO1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NptFaultError(pub u64);

impl NptFaultError {
    pub fn present(self) -> bool {
        self.0 & 1 != 0
    }
    pub fn write(self) -> bool {
        self.0 & 2 != 0
    }
    pub fn fetch(self) -> bool {
        self.0 & (1 << 4) != 0
    }
    pub fn access(self) -> &'static str {
        if self.fetch() {
            "execute"
        } else if self.write() {
            "write"
        } else {
            "read"
        }
    }
}

impl ExitReason {
    pub fn decode(code: u64, info1: u64, info2: u64) -> Self {
        match code {
            CPUID => Self::Cpuid,
            HLT => Self::Hlt,
            IOIO => Self::Io { port: (info1 >> 16) as u16, write: info1 & 1 == 0, next_rip: info2 },
            MSR => Self::Msr { write: info1 & 1 != 0 },
            SHUTDOWN => Self::Shutdown,
            VMMCALL => Self::Vmmcall,
            INTR | NMI => Self::PhysicalInterrupt,
            NPF => Self::NestedPageFault { gpa: info2, error: NptFaultError(info1) },
            c if (EXCEPTION_BASE..EXCEPTION_BASE + 32).contains(&c) => {
                Self::Exception { vector: (c - EXCEPTION_BASE) as u8, error_code: info1 }
            }
            INVALID => Self::Invalid,
            other => Self::Other(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_exits_we_handle() {
        assert_eq!(ExitReason::decode(0x81, 0, 0), ExitReason::Vmmcall);
        assert_eq!(
            ExitReason::decode(0x400, 0x1_0000_0004, 0x4000_0000),
            ExitReason::NestedPageFault { gpa: 0x4000_0000, error: NptFaultError(0x1_0000_0004) }
        );
        assert_eq!(ExitReason::decode(0x48, 0, 0), ExitReason::Exception { vector: 8, error_code: 0 });
        assert_eq!(ExitReason::decode(u64::MAX, 0, 0), ExitReason::Invalid);
        // IN from port 0x3f8 (type bit set), next RIP in info2.
        assert_eq!(
            ExitReason::decode(0x7b, (0x3f8 << 16) | 1, 0x1234),
            ExitReason::Io { port: 0x3f8, write: false, next_rip: 0x1234 }
        );
        assert_eq!(ExitReason::decode(0x7c, 1, 0), ExitReason::Msr { write: true });
        assert_eq!(ExitReason::decode(0x80, 0, 0), ExitReason::Other(0x80));
    }

    #[test]
    fn npt_error_bits() {
        let e = NptFaultError(0b10010);
        assert!(e.fetch() && e.write() && !e.present());
        assert_eq!(e.access(), "execute");
        assert_eq!(NptFaultError(0).access(), "read");
    }
}

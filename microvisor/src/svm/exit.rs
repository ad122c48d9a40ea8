//! #VMEXIT codes (AMD APM vol. 2, appendix C) decoded into the neutral [`Exit`].

use ipc_spec::exit::{access, Io};

use crate::vcpu_hw::Exit;

pub const CPUID: u64 = 0x72;
pub const HLT: u64 = 0x78;
pub const IOIO: u64 = 0x7b;
pub const MSR: u64 = 0x7c;
pub const SHUTDOWN: u64 = 0x7f;
pub const VMMCALL: u64 = 0x81;
pub const INTR: u64 = 0x60;
pub const NMI: u64 = 0x61;
pub const VINTR: u64 = 0x64;
pub const NPF: u64 = 0x400;
/// VMRUN found the VMCB's guest state invalid.
pub const INVALID: u64 = u64::MAX;
const EXCEPTION_BASE: u64 = 0x40;

/// Decode an exit. `rip` is the guest's RIP, `next_rip` the VMCB's nRIP (0 where the CPU
/// does not save it: then the fixed lengths of the plain instructions apply).
pub fn decode(code: u64, info1: u64, info2: u64, rip: u64, next_rip: u64) -> Exit {
    let len = |fixed: u8| match next_rip.checked_sub(rip) {
        Some(n @ 1..=15) if next_rip != 0 => n as u8,
        _ => fixed,
    };
    match code {
        CPUID => Exit::Cpuid { len: len(2) },
        HLT => Exit::Hlt { len: len(1) },
        // EXITINFO1 (APM 15.10.2): bit 0 IN, 2 string, 3 REP, 4..6 operand size; port in
        // 16..31. EXITINFO2 holds the next RIP for I/O intercepts in any case.
        IOIO => Exit::Io {
            io: Io {
                port: (info1 >> 16) as u16,
                size: match (info1 >> 4) & 7 {
                    1 => 1,
                    2 => 2,
                    _ => 4,
                },
                write: info1 & 1 == 0,
                string: info1 & (1 << 2) != 0,
                rep: info1 & (1 << 3) != 0,
            },
            len: match info2.checked_sub(rip) {
                Some(n @ 1..=15) => n as u8,
                _ => 1,
            },
        },
        MSR => Exit::Msr { write: info1 & 1 != 0, len: len(2) },
        SHUTDOWN => Exit::Shutdown,
        VMMCALL => Exit::Hypercall { len: len(3) },
        INTR | NMI => Exit::Interrupt,
        VINTR => Exit::InterruptWindow,
        // EXITINFO1 is the #PF-style error code: bit 0 present, 1 write, 4 fetch.
        NPF => Exit::Stage2Fault {
            gpa: info2,
            access: if info1 & 2 != 0 { access::WRITE } else { 0 }
                | if info1 & (1 << 4) != 0 { access::EXECUTE } else { 0 }
                | if info1 & 1 != 0 { access::PRESENT } else { 0 },
        },
        c if (EXCEPTION_BASE..EXCEPTION_BASE + 32).contains(&c) => {
            Exit::Exception { vector: (c - EXCEPTION_BASE) as u8, error: info1 }
        }
        INVALID => Exit::Invalid(0),
        other => Exit::Other(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_exits_we_handle() {
        assert_eq!(decode(0x81, 0, 0, 0x1000, 0), Exit::Hypercall { len: 3 });
        assert_eq!(decode(0x81, 0, 0, 0x1000, 0x1004), Exit::Hypercall { len: 4 });
        assert_eq!(
            decode(0x400, 0x1_0000_0004 | 2, 0x4000_0000, 0, 0),
            Exit::Stage2Fault { gpa: 0x4000_0000, access: access::WRITE }
        );
        assert_eq!(
            decode(0x400, 0b10001, 0x5000, 0, 0),
            Exit::Stage2Fault { gpa: 0x5000, access: access::EXECUTE | access::PRESENT }
        );
        assert_eq!(decode(0x48, 0, 0, 0, 0), Exit::Exception { vector: 8, error: 0 });
        assert_eq!(decode(u64::MAX, 0, 0, 0, 0), Exit::Invalid(0));
        // IN AL from port 0x3f8 (type bit set, SZ8), next RIP in info2.
        assert_eq!(
            decode(0x7b, (0x3f8 << 16) | 1 << 4 | 1, 0x1002, 0x1000, 0),
            Exit::Io { io: Io { port: 0x3f8, size: 1, write: false, string: false, rep: false }, len: 2 }
        );
        // REP OUTSW to port 0x80.
        assert_eq!(
            decode(0x7b, (0x80 << 16) | 2 << 4 | 1 << 3 | 1 << 2, 0x1003, 0x1000, 0),
            Exit::Io { io: Io { port: 0x80, size: 2, write: true, string: true, rep: true }, len: 3 }
        );
        assert_eq!(decode(0x7c, 1, 0, 0, 0), Exit::Msr { write: true, len: 2 });
        assert_eq!(decode(0x72, 0, 0, 0x10, 0x13), Exit::Cpuid { len: 3 });
        assert_eq!(decode(0x80, 0, 0, 0, 0), Exit::Other(0x80));
        assert_eq!(decode(0x64, 0, 0, 0, 0), Exit::InterruptWindow);
    }
}

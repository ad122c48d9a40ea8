//! VM exits (SDM vol. 3 chapter 27, basic exit reasons in appendix C) decoded into the
//! neutral [`Exit`].

use ipc_spec::exit::{access, Io};

use crate::vcpu_hw::Exit;

pub const EXCEPTION_OR_NMI: u32 = 0;
pub const EXTERNAL_INTERRUPT: u32 = 1;
pub const TRIPLE_FAULT: u32 = 2;
pub const INTERRUPT_WINDOW: u32 = 7;
pub const CPUID: u32 = 10;
pub const HLT: u32 = 12;
pub const VMCALL: u32 = 18;
pub const IO: u32 = 30;
pub const RDMSR: u32 = 31;
pub const WRMSR: u32 = 32;
pub const EPT_VIOLATION: u32 = 48;
pub const EPT_MISCONFIGURATION: u32 = 49;
pub const PREEMPTION_TIMER: u32 = 52;
/// Exit reason bit 31: "VM-entry failure" (SDM 26.8): the guest state or the MSR-load area
/// was refused (basic reasons 33, 34), or a machine check hit the entry (41).
pub const ENTRY_FAILURE: u32 = 1 << 31;
/// Interruption-information bit 31 (valid) and type NMI (bits 10:8 = 2), table 24-15.
const INFO_VALID: u64 = 1 << 31;
const TYPE_NMI: u64 = 2 << 8;

/// What the exit fields say: the exit reason, qualification, instruction length,
/// guest-physical address and exit interruption information and error code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitFields {
    pub reason: u32,
    pub qualification: u64,
    pub len: u64,
    pub gpa: u64,
    pub interruption: u64,
    pub error: u64,
}

pub fn decode(f: &ExitFields) -> Exit {
    // VMCALL, HLT, CPUID, RDMSR/WRMSR and I/O instructions report their length (SDM 27.2.5).
    let len = match f.len {
        n @ 1..=15 => n as u8,
        _ => 0,
    };
    if f.reason & ENTRY_FAILURE != 0 {
        return Exit::Invalid(f.reason as u64 & 0xffff);
    }
    match f.reason & 0xffff {
        CPUID => Exit::Cpuid { len },
        HLT => Exit::Hlt { len },
        VMCALL => Exit::Hypercall { len },
        RDMSR | WRMSR => Exit::Msr { write: f.reason & 0xffff == WRMSR, len },
        // Qualification for I/O (table 27-5): bits 2:0 size - 1, bit 3 IN, bit 4 string,
        // bit 5 REP, bits 31:16 the port.
        IO => Exit::Io {
            io: Io {
                port: (f.qualification >> 16) as u16,
                size: (f.qualification & 7) as u8 + 1,
                write: f.qualification & (1 << 3) == 0,
                string: f.qualification & (1 << 4) != 0,
                rep: f.qualification & (1 << 5) != 0,
            },
            len,
        },
        // Qualification for EPT violations (table 27-7): bits 0-2 the access was a read,
        // write, fetch; bits 3-5 the translation allowed read, write, execute (any of them:
        // the address is mapped).
        EPT_VIOLATION => Exit::Stage2Fault {
            gpa: f.gpa,
            access: if f.qualification & 2 != 0 { access::WRITE } else { 0 }
                | if f.qualification & 4 != 0 { access::EXECUTE } else { 0 }
                | if f.qualification & 0x38 != 0 { access::PRESENT } else { 0 },
        },
        TRIPLE_FAULT => Exit::Shutdown,
        INTERRUPT_WINDOW => Exit::InterruptWindow,
        // The VMX-preemption timer stands in for the tick (see `controls::pin`).
        EXTERNAL_INTERRUPT | PREEMPTION_TIMER => Exit::Interrupt,
        // Exceptions in the bitmap and NMIs (with NMI exiting) share reason 0: the type in
        // the interruption information tells them apart (table 24-15).
        EXCEPTION_OR_NMI if f.interruption & (INFO_VALID | 7 << 8) == INFO_VALID | TYPE_NMI => Exit::Interrupt,
        EXCEPTION_OR_NMI => Exit::Exception {
            vector: f.interruption as u8,
            error: if f.interruption & (1 << 11) != 0 { f.error } else { 0 },
        },
        // An EPT misconfiguration is a bug in the microvisor's tables, not the guest's
        // doing: reported with its reason like any other unhandled exit.
        other => Exit::Other(other as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(reason: u32, qualification: u64, len: u64) -> ExitFields {
        ExitFields { reason, qualification, len, ..Default::default() }
    }

    #[test]
    fn decodes_the_exits_we_handle() {
        assert_eq!(decode(&f(VMCALL, 0, 3)), Exit::Hypercall { len: 3 });
        assert_eq!(decode(&f(CPUID, 0, 2)), Exit::Cpuid { len: 2 });
        assert_eq!(decode(&f(HLT, 0, 1)), Exit::Hlt { len: 1 });
        assert_eq!(decode(&f(RDMSR, 0, 2)), Exit::Msr { write: false, len: 2 });
        assert_eq!(decode(&f(WRMSR, 0, 2)), Exit::Msr { write: true, len: 2 });
        // IN AL, DX from 0x3f8.
        assert_eq!(
            decode(&f(IO, 0x3f8 << 16 | 1 << 3 | 1 << 6, 1)),
            Exit::Io { io: Io { port: 0x3f8, size: 1, write: false, string: false, rep: false }, len: 1 }
        );
        // REP OUTSW to 0x80.
        assert_eq!(
            decode(&f(IO, 0x80 << 16 | 1 << 5 | 1 << 4 | 1, 3)),
            Exit::Io { io: Io { port: 0x80, size: 2, write: true, string: true, rep: true }, len: 3 }
        );
        assert_eq!(
            decode(&f(IO, 3, 1)),
            Exit::Io { io: Io { port: 0, size: 4, write: true, string: false, rep: false }, len: 1 }
        );
        let ept =
            |q| decode(&ExitFields { reason: EPT_VIOLATION, qualification: q, gpa: 0x4000_0000, ..Default::default() });
        assert_eq!(ept(0b10), Exit::Stage2Fault { gpa: 0x4000_0000, access: access::WRITE });
        assert_eq!(ept(0b1100), Exit::Stage2Fault { gpa: 0x4000_0000, access: access::EXECUTE | access::PRESENT });
        assert_eq!(ept(0b101001), Exit::Stage2Fault { gpa: 0x4000_0000, access: access::PRESENT });
        assert_eq!(decode(&f(TRIPLE_FAULT, 0, 0)), Exit::Shutdown);
        assert_eq!(decode(&f(EXTERNAL_INTERRUPT, 0, 0)), Exit::Interrupt);
        assert_eq!(decode(&f(PREEMPTION_TIMER, 0, 0)), Exit::Interrupt);
        assert_eq!(decode(&f(INTERRUPT_WINDOW, 0, 0)), Exit::InterruptWindow);
        assert_eq!(decode(&f(EPT_MISCONFIGURATION, 0, 0)), Exit::Other(49));
        assert_eq!(decode(&f(13, 0, 2)), Exit::Other(13), "INVD");
    }

    #[test]
    fn exceptions_nmis_and_failed_entries() {
        let x = |interruption, error| {
            decode(&ExitFields { reason: EXCEPTION_OR_NMI, interruption, error, ..Default::default() })
        };
        // #DF, hardware exception with an error code.
        assert_eq!(x(INFO_VALID | 3 << 8 | 1 << 11 | 8, 0), Exit::Exception { vector: 8, error: 0 });
        assert_eq!(x(INFO_VALID | 3 << 8 | 1 << 11 | 14, 6), Exit::Exception { vector: 14, error: 6 });
        assert_eq!(x(INFO_VALID | 3 << 8 | 18, 0x55), Exit::Exception { vector: 18, error: 0 }, "no error code");
        assert_eq!(x(INFO_VALID | TYPE_NMI | 2, 0), Exit::Interrupt);
        // Invalid guest state (33) and MSR loading (34), with bit 31.
        assert_eq!(decode(&f(ENTRY_FAILURE | 33, 0, 0)), Exit::Invalid(33));
        assert_eq!(decode(&f(ENTRY_FAILURE | 34, 2, 0)), Exit::Invalid(34));
        assert_eq!(decode(&f(CPUID, 0, 0)), Exit::Cpuid { len: 0 }, "no length: unknown");
    }
}

//! Primary fault records: what the unit logs when it blocks a DMA or interrupt request.
//!
//! Each fault recording register (CAP.NFR + 1 of them, 16 bytes each at CAP.FRO * 16; one at
//! 0x220 on QEMU 7.2) holds one record (spec 10.4.14):
//!
//! ```text
//! 63:12  FI: page address of the faulting DMA request; for interrupt requests bits 63:48
//!        hold the interrupt index
//! 79:64  SID (requester id)        92  T2 (spec 3.0+)      103:96  FR (fault reason)
//! 125:124 AT (address type)        126 T1: 1 = read, 0 = write (with T2 = 0)
//! 127    F: record valid; write 1 to clear (RW1C)
//! ```
//!
//! Read a record with two 64-bit loads, decode it with [`FaultRecord::decode`], then clear it
//! by writing [`CLEAR_HIGH`] to its upper quadword (offset +8): the unit records nothing
//! further from the same requester while F is set, and on QEMU a new fault event is only
//! signalled once FSTS has no pending fault or overflow left.

use core::fmt;

use super::Entry128;

/// The value to write to a fault record's upper quadword (+8) to clear its F bit. (The other
/// bits of that quadword are read-only; with a 32-bit write, write `1 << 31` at +12.)
pub const CLEAR_HIGH: u64 = 1 << 63;

/// What kind of request faulted (T2, T1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// A DMA write (T2 = 0, T1 = 0).
    Write,
    /// A DMA read (T2 = 0, T1 = 1).
    Read,
    /// A page request (T2 = 1, T1 = 0).
    PageRequest,
    /// An atomic operation (T2 = 1, T1 = 1).
    Atomic,
}

/// Fault reasons of legacy-mode DMA remapping (0x1..0xD) and of interrupt remapping
/// (0x20..0x26), spec 7.1.3 and 7.1.4. Anything else (scalable-mode reasons 0x30 and up,
/// reserved codes) is [`FaultReason::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultReason {
    /// 0x1: the root entry for the bus is not present.
    RootNotPresent,
    /// 0x2: the context entry for the device is not present.
    ContextNotPresent,
    /// 0x3: the context entry is invalid (e.g. AW not in CAP.SAGAW, TT not supported).
    ContextInvalid,
    /// 0x4: the address is beyond the context's address width or MGAW.
    AddressBeyondWidth,
    /// 0x5: a write to a page without W (including not-present entries, R = W = 0).
    WriteDenied,
    /// 0x6: a read to a page without R (including not-present entries).
    ReadDenied,
    /// 0x7: error reading a second-level paging entry (its table address is not memory).
    PagingEntryAccess,
    /// 0x8: error reading the root entry (bad RTADDR).
    RootTableAccess,
    /// 0x9: error reading the context entry (bad context table pointer).
    ContextTableAccess,
    /// 0xA: reserved bit set in a present root entry.
    RootReserved,
    /// 0xB: reserved bit set in a present context entry.
    ContextReserved,
    /// 0xC: reserved bit set in a present second-level paging entry.
    PagingEntryReserved,
    /// 0xD: a translated or translation request blocked by the context's TT.
    TranslationTypeBlocked,
    /// 0x20: reserved field set in the interrupt request (e.g. upper address bits).
    IrRequestReserved,
    /// 0x21: the interrupt index is beyond the table size in IRTA.
    IrIndexBeyondTable,
    /// 0x22: the IRTE is not present.
    IrEntryNotPresent,
    /// 0x23: error reading the IRTE (bad IRTA).
    IrTableAccess,
    /// 0x24: reserved bit set in a present IRTE.
    IrEntryReserved,
    /// 0x25: a compatibility-format interrupt was blocked (IRE set, CFI clear).
    IrCompatibilityBlocked,
    /// 0x26: the requester failed the IRTE's source-id validation.
    IrSourceIdInvalid,
    /// Any other code.
    Other(u8),
}

impl FaultReason {
    /// The reason for a raw FR code.
    pub const fn from_raw(raw: u8) -> Self {
        match raw {
            0x1 => Self::RootNotPresent,
            0x2 => Self::ContextNotPresent,
            0x3 => Self::ContextInvalid,
            0x4 => Self::AddressBeyondWidth,
            0x5 => Self::WriteDenied,
            0x6 => Self::ReadDenied,
            0x7 => Self::PagingEntryAccess,
            0x8 => Self::RootTableAccess,
            0x9 => Self::ContextTableAccess,
            0xa => Self::RootReserved,
            0xb => Self::ContextReserved,
            0xc => Self::PagingEntryReserved,
            0xd => Self::TranslationTypeBlocked,
            0x20 => Self::IrRequestReserved,
            0x21 => Self::IrIndexBeyondTable,
            0x22 => Self::IrEntryNotPresent,
            0x23 => Self::IrTableAccess,
            0x24 => Self::IrEntryReserved,
            0x25 => Self::IrCompatibilityBlocked,
            0x26 => Self::IrSourceIdInvalid,
            other => Self::Other(other),
        }
    }

    /// The raw FR code.
    pub const fn raw(self) -> u8 {
        match self {
            Self::RootNotPresent => 0x1,
            Self::ContextNotPresent => 0x2,
            Self::ContextInvalid => 0x3,
            Self::AddressBeyondWidth => 0x4,
            Self::WriteDenied => 0x5,
            Self::ReadDenied => 0x6,
            Self::PagingEntryAccess => 0x7,
            Self::RootTableAccess => 0x8,
            Self::ContextTableAccess => 0x9,
            Self::RootReserved => 0xa,
            Self::ContextReserved => 0xb,
            Self::PagingEntryReserved => 0xc,
            Self::TranslationTypeBlocked => 0xd,
            Self::IrRequestReserved => 0x20,
            Self::IrIndexBeyondTable => 0x21,
            Self::IrEntryNotPresent => 0x22,
            Self::IrTableAccess => 0x23,
            Self::IrEntryReserved => 0x24,
            Self::IrCompatibilityBlocked => 0x25,
            Self::IrSourceIdInvalid => 0x26,
            Self::Other(raw) => raw,
        }
    }

    /// True for interrupt-remapping faults (0x20..=0x2F), whose FI field holds an interrupt
    /// index instead of an address.
    pub const fn is_interrupt_remapping(self) -> bool {
        matches!(self.raw(), 0x20..=0x2f)
    }

    /// A short description, for fault reports.
    pub const fn description(self) -> &'static str {
        match self {
            Self::RootNotPresent => "root entry not present",
            Self::ContextNotPresent => "context entry not present",
            Self::ContextInvalid => "invalid context entry",
            Self::AddressBeyondWidth => "address beyond the address width",
            Self::WriteDenied => "write to a page without write permission",
            Self::ReadDenied => "read of a page without read permission",
            Self::PagingEntryAccess => "error reading a second-level paging entry",
            Self::RootTableAccess => "error reading the root entry",
            Self::ContextTableAccess => "error reading the context entry",
            Self::RootReserved => "reserved bit set in the root entry",
            Self::ContextReserved => "reserved bit set in the context entry",
            Self::PagingEntryReserved => "reserved bit set in a second-level paging entry",
            Self::TranslationTypeBlocked => "request blocked by the context's translation type",
            Self::IrRequestReserved => "reserved field set in the interrupt request",
            Self::IrIndexBeyondTable => "interrupt index beyond the remapping table",
            Self::IrEntryNotPresent => "interrupt remapping entry not present",
            Self::IrTableAccess => "error reading the interrupt remapping entry",
            Self::IrEntryReserved => "reserved bit set in the interrupt remapping entry",
            Self::IrCompatibilityBlocked => "compatibility-format interrupt blocked",
            Self::IrSourceIdInvalid => "interrupt from a requester the entry does not allow",
            Self::Other(_) => "unknown fault reason",
        }
    }
}

impl fmt::Display for FaultReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (reason {:#x})", self.description(), self.raw())
    }
}

/// A decoded primary fault record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// FI (bits 63:12, page aligned): the faulting DMA page address. For interrupt-remapping
    /// faults see [`FaultRecord::interrupt_index`].
    pub fault_info: u64,
    /// Requester id: bus in bits 15:8, devfn in 7:0.
    pub source_id: u16,
    /// Why the request was blocked.
    pub reason: FaultReason,
    /// The request kind (meaningless for interrupt-remapping faults).
    pub kind: RequestKind,
}

impl FaultRecord {
    /// Decode a record read as two quadwords; `None` if its F bit is clear (no fault held).
    pub const fn decode(record: Entry128) -> Option<Self> {
        if record.high >> 63 == 0 {
            return None;
        }
        let t1 = (record.high >> 62) & 1 != 0;
        let t2 = (record.high >> 28) & 1 != 0;
        let kind = match (t2, t1) {
            (false, false) => RequestKind::Write,
            (false, true) => RequestKind::Read,
            (true, false) => RequestKind::PageRequest,
            (true, true) => RequestKind::Atomic,
        };
        Some(Self {
            fault_info: record.low & !0xfff,
            source_id: record.high as u16,
            reason: FaultReason::from_raw((record.high >> 32) as u8),
            kind,
        })
    }

    /// For interrupt-remapping faults, the interrupt index (FI bits 63:48).
    pub const fn interrupt_index(&self) -> Option<u16> {
        if self.reason.is_interrupt_remapping() {
            Some((self.fault_info >> 48) as u16)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A record the way QEMU 7.2 writes it (`vtd_record_frcd`): lo = addr & !0xfff,
    /// hi = sid | reason << 32 | (read ? 1 << 62 : 0), then F (bit 63) set.
    fn qemu_record(sid: u16, addr: u64, reason: u8, is_write: bool) -> Entry128 {
        let mut hi = u64::from(sid) | (u64::from(reason) << 32) | (1 << 63);
        if !is_write {
            hi |= 1 << 62;
        }
        Entry128::new(addr & !0xfff, hi)
    }

    #[test]
    fn decodes_a_qemu_read_fault() {
        let r = FaultRecord::decode(qemu_record(0x0018, 0x1234_5678, 0x6, false)).unwrap();
        assert_eq!(
            r,
            FaultRecord {
                fault_info: 0x1234_5000,
                source_id: 0x18,
                reason: FaultReason::ReadDenied,
                kind: RequestKind::Read
            }
        );
        assert_eq!(r.interrupt_index(), None);
        let w = FaultRecord::decode(qemu_record(0x0100, 0x8000, 0x5, true)).unwrap();
        assert_eq!(w.kind, RequestKind::Write);
        assert_eq!(w.reason, FaultReason::WriteDenied);
    }

    #[test]
    fn clear_record_is_none() {
        assert_eq!(FaultRecord::decode(Entry128::new(0x1000, 0x7fff_ffff_ffff_ffff)), None);
        assert_eq!(CLEAR_HIGH, 0x8000_0000_0000_0000);
    }

    #[test]
    fn t2_selects_page_request_and_atomics() {
        let base = 1u64 << 63;
        assert_eq!(FaultRecord::decode(Entry128::new(0, base | (1 << 28))).unwrap().kind, RequestKind::PageRequest);
        assert_eq!(
            FaultRecord::decode(Entry128::new(0, base | (1 << 28) | (1 << 62))).unwrap().kind,
            RequestKind::Atomic
        );
    }

    #[test]
    fn interrupt_faults_carry_the_index() {
        let r = FaultRecord::decode(Entry128::new(0x002a_0000_0000_0000, (1 << 63) | (0x22 << 32) | 0xf8)).unwrap();
        assert_eq!(r.reason, FaultReason::IrEntryNotPresent);
        assert_eq!(r.interrupt_index(), Some(0x2a));
        assert_eq!(r.source_id, 0xf8);
    }

    #[test]
    fn reason_table() {
        let named = [
            (0x1, FaultReason::RootNotPresent),
            (0x2, FaultReason::ContextNotPresent),
            (0x3, FaultReason::ContextInvalid),
            (0x4, FaultReason::AddressBeyondWidth),
            (0x5, FaultReason::WriteDenied),
            (0x6, FaultReason::ReadDenied),
            (0x7, FaultReason::PagingEntryAccess),
            (0x8, FaultReason::RootTableAccess),
            (0x9, FaultReason::ContextTableAccess),
            (0xa, FaultReason::RootReserved),
            (0xb, FaultReason::ContextReserved),
            (0xc, FaultReason::PagingEntryReserved),
            (0xd, FaultReason::TranslationTypeBlocked),
            (0x20, FaultReason::IrRequestReserved),
            (0x21, FaultReason::IrIndexBeyondTable),
            (0x22, FaultReason::IrEntryNotPresent),
            (0x23, FaultReason::IrTableAccess),
            (0x24, FaultReason::IrEntryReserved),
            (0x25, FaultReason::IrCompatibilityBlocked),
            (0x26, FaultReason::IrSourceIdInvalid),
        ];
        for (raw, reason) in named {
            assert_eq!(FaultReason::from_raw(raw), reason);
            assert_eq!(reason.raw(), raw);
            assert_eq!(reason.is_interrupt_remapping(), raw >= 0x20);
            assert!(reason.to_string().contains(&format!("{raw:#x}")));
        }
        assert_eq!(FaultReason::from_raw(0), FaultReason::Other(0));
        assert_eq!(FaultReason::from_raw(0x39).description(), "unknown fault reason");
    }

    proptest! {
        #[test]
        fn prop_decode_matches_qemu_encoding(sid: u16, addr: u64, reason: u8, is_write: bool) {
            let r = FaultRecord::decode(qemu_record(sid, addr, reason, is_write)).unwrap();
            prop_assert_eq!(r.source_id, sid);
            prop_assert_eq!(r.fault_info, addr & !0xfff);
            prop_assert_eq!(r.reason.raw(), reason);
            prop_assert_eq!(r.kind, if is_write { RequestKind::Write } else { RequestKind::Read });
        }

        #[test]
        fn prop_reason_roundtrip(raw: u8) {
            prop_assert_eq!(FaultReason::from_raw(raw).raw(), raw);
        }

        #[test]
        fn prop_decode_never_panics(low: u64, high: u64) {
            let r = FaultRecord::decode(Entry128::new(low, high));
            prop_assert_eq!(r.is_some(), high >> 63 == 1);
        }
    }
}

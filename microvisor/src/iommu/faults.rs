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

/// A fault reason code (FR): legacy-mode DMA remapping (0x1..0xD, spec 7.1.3) and interrupt
/// remapping (0x20..0x26, spec 7.1.4); anything else (scalable-mode reasons 0x30 and up,
/// reserved codes) is reported as unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultReason(pub u8);

impl FaultReason {
    /// The raw FR code.
    pub const fn raw(self) -> u8 {
        self.0
    }

    /// True for interrupt-remapping faults (0x20..=0x2F), whose FI field holds an interrupt
    /// index instead of an address.
    pub const fn is_interrupt_remapping(self) -> bool {
        matches!(self.0, 0x20..=0x2f)
    }

    /// A short description, for fault reports.
    pub const fn description(self) -> &'static str {
        match self.0 {
            0x1 => "root entry not present",
            0x2 => "context entry not present",
            // e.g. AW not in CAP.SAGAW, TT not supported
            0x3 => "invalid context entry",
            // beyond the context's address width or MGAW
            0x4 => "address beyond the address width",
            // including not-present entries (R = W = 0)
            0x5 => "write to a page without write permission",
            0x6 => "read of a page without read permission",
            // its table address is not memory
            0x7 => "error reading a second-level paging entry",
            0x8 => "error reading the root entry",
            0x9 => "error reading the context entry",
            0xa => "reserved bit set in the root entry",
            0xb => "reserved bit set in the context entry",
            0xc => "reserved bit set in a second-level paging entry",
            0xd => "request blocked by the context's translation type",
            0x20 => "reserved field set in the interrupt request",
            0x21 => "interrupt index beyond the remapping table",
            0x22 => "interrupt remapping entry not present",
            0x23 => "error reading the interrupt remapping entry",
            0x24 => "reserved bit set in the interrupt remapping entry",
            // IRE set, CFI clear
            0x25 => "compatibility-format interrupt blocked",
            // the IRTE's source-id validation failed
            0x26 => "interrupt from a requester the entry does not allow",
            _ => "unknown fault reason",
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
            reason: FaultReason((record.high >> 32) as u8),
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
            FaultRecord { fault_info: 0x1234_5000, source_id: 0x18, reason: FaultReason(0x6), kind: RequestKind::Read }
        );
        assert_eq!(r.interrupt_index(), None);
        let w = FaultRecord::decode(qemu_record(0x0100, 0x8000, 0x5, true)).unwrap();
        assert_eq!(w.kind, RequestKind::Write);
        assert_eq!(w.reason, FaultReason(0x5));
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
        assert_eq!(r.reason, FaultReason(0x22));
        assert_eq!(r.interrupt_index(), Some(0x2a));
        assert_eq!(r.source_id, 0xf8);
    }

    #[test]
    fn reason_table() {
        for raw in (0x1..=0xd).chain(0x20..=0x26) {
            let reason = FaultReason(raw);
            assert_ne!(reason.description(), "unknown fault reason", "{raw:#x}");
            assert_eq!(reason.is_interrupt_remapping(), raw >= 0x20);
            assert!(reason.to_string().contains(&format!("{raw:#x}")));
        }
        assert_eq!(FaultReason(0).description(), "unknown fault reason");
        assert_eq!(FaultReason(0x39).description(), "unknown fault reason");
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
        fn prop_decode_never_panics(low: u64, high: u64) {
            let r = FaultRecord::decode(Entry128::new(low, high));
            prop_assert_eq!(r.is_some(), high >> 63 == 1);
        }
    }
}

//! Interrupt remapping: table entries (IRTEs), remappable-format MSIs and the IRTA register.
//!
//! With interrupt remapping on, a device's MSI no longer names a CPU and vector: it carries a
//! 16-bit handle, an index into the interrupt remapping table, and the unit delivers what that
//! entry says, after checking that the entry belongs to the requester. So a driver VM that
//! programs its device's MSI registers can only raise the interrupts the microvisor set up
//! for it.
//!
//! IRTE layout (spec 9.10, remapped format, xAPIC mode; QEMU's reserved-bit checks in brackets):
//!
//! ```text
//! low:  bit 0 P, bit 1 FPD, bit 2 DM, bit 3 RH, bit 4 TM, 7:5 DLM, 11:8 available,
//!       [14:12 reserved], bit 15 IM (0: remapped), 23:16 vector, [31:24 reserved],
//!       63:32 destination (xAPIC: APIC id in 47:40)
//! high: 79:64 SID, 81:80 SQ, 83:82 SVT, [127:84 reserved]
//! ```

use super::{check_addr, Entry128, VtdError, PAGE_SIZE};

/// Present.
const P: u64 = 1 << 0;
/// Vector position.
const VECTOR_SHIFT: u32 = 16;
/// xAPIC destination position (bits 47:40; bits 39:32 and 63:48 stay zero).
const XAPIC_DEST_SHIFT: u32 = 40;
/// Source-id validation type position (high qword bits 19:18 = entry bits 83:82).
const SVT_SHIFT: u32 = 18;
/// SVT = 01: verify the full requester id against SID, qualified by SQ.
const SVT_REQUESTER_ID: u64 = 0b01;

/// Lowest vector a fixed interrupt may use: vectors 0..16 are reserved for exceptions and the
/// local APIC rejects them as illegal.
pub const MIN_VECTOR: u8 = 0x10;

/// Most entries an interrupt remapping table can have (IRTA.S = 15).
pub const MAX_ENTRIES: usize = 1 << 16;

/// A present, remapped-format IRTE: fixed delivery of `vector`, edge-triggered, to the CPU
/// with xAPIC id `apic_id` (physical destination mode, no redirection hint), accepted only
/// from the requester `source_id` (bus << 8 | devfn: SVT = 01, SQ = 00, all 16 bits compared).
/// FPD is clear, so a blocked request is recorded as a fault.
///
/// Refuses vectors below [`MIN_VECTOR`]. The destination is an 8-bit xAPIC id because the
/// table is set up with IRTA.EIME = 0 ([`irta`]): QEMU under TCG has no x2APIC mode (ECAP.EIM
/// is clear) and reads the id from bits 47:40.
pub const fn irte(vector: u8, apic_id: u8, source_id: u16) -> Result<Entry128, VtdError> {
    if vector < MIN_VECTOR {
        return Err(VtdError::OutOfRange { value: vector as u64, limit: MIN_VECTOR as u64 });
    }
    // FPD = 0, DM = 0 (physical), RH = 0, TM = 0 (edge), DLM = 000 (fixed), IM = 0 (remapped).
    let low = P | ((vector as u64) << VECTOR_SHIFT) | ((apic_id as u64) << XAPIC_DEST_SHIFT);
    // SQ (bits 17:16 of the high qword) = 00: compare every bit of the requester id.
    let high = source_id as u64 | (SVT_REQUESTER_ID << SVT_SHIFT);
    Ok(Entry128 { low, high })
}

/// The MSI address that makes a device's MSI use interrupt remapping table entry `handle`:
/// 0xFEE in bits 31:20, handle bits 14:0 in 19:5, interrupt format (remappable) in bit 4, SHV
/// (no sub-handle) clear in bit 3, handle bit 15 in bit 2. The upper 32 bits of the MSI address
/// must be 0 (QEMU rejects anything else).
pub const fn msi_address(handle: u16) -> u32 {
    let handle = handle as u32;
    0xfee0_0000 | ((handle & 0x7fff) << 5) | (1 << 4) | ((handle >> 15) << 2)
}

/// The MSI data to pair with [`msi_address`]. Without SHV the unit takes everything from the
/// IRTE; QEMU only compares the vector and trigger bits of the data against the entry for a
/// trace warning.
pub const MSI_DATA: u32 = 0;

/// Entries of a table whose IRTA size field is `size`: `2^(size + 1)`.
pub const fn entries(size: u8) -> usize {
    if size < 16 {
        1 << (size as u32 + 1)
    } else {
        0
    }
}

/// The IRTA register value for a table at `table` (4 KiB aligned, physically contiguous) of
/// [`entries`]`(size)` entries (`size` 0..=15: 2 to 65536 entries, 16 bytes each, so
/// `size` 7 is exactly one page). EIME (bit 11) is 0: xAPIC mode. Latch it with GCMD.SIRTP.
/// Handles at or beyond the size fault (reason 0x21).
pub const fn irta(table: u64, size: u8) -> Result<u64, VtdError> {
    if size > 15 {
        return Err(VtdError::OutOfRange { value: size as u64, limit: 16 });
    }
    match check_addr(table, PAGE_SIZE) {
        Ok(addr) => Ok(addr | size as u64),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// QEMU 7.2's `VTD_IR_TableEntry` fields, decoded from the two qwords by bit position.
    #[derive(Debug, PartialEq, Eq)]
    struct Decoded {
        present: bool,
        fault_disable: bool,
        dest_mode: u64,
        redir_hint: u64,
        trigger_mode: u64,
        delivery_mode: u64,
        irte_mode: u64,
        vector: u8,
        dest_id: u32,
        source_id: u16,
        sid_q: u64,
        sid_vtype: u64,
        reserved: u64,
    }

    fn decode(e: Entry128) -> Decoded {
        Decoded {
            present: e.low & 1 != 0,
            fault_disable: (e.low >> 1) & 1 != 0,
            dest_mode: (e.low >> 2) & 1,
            redir_hint: (e.low >> 3) & 1,
            trigger_mode: (e.low >> 4) & 1,
            delivery_mode: (e.low >> 5) & 7,
            irte_mode: (e.low >> 15) & 1,
            vector: (e.low >> 16) as u8,
            dest_id: (e.low >> 32) as u32,
            source_id: e.high as u16,
            sid_q: (e.high >> 16) & 3,
            sid_vtype: (e.high >> 18) & 3,
            // __reserved_0 (14:12), __reserved_1 (31:24), __reserved_2 (127:84).
            reserved: (e.low & 0xff00_7000) | (e.high & !0xf_ffff),
        }
    }

    #[test]
    fn irte_layout() {
        let e = irte(0x31, 0x02, 0x0018).unwrap();
        assert_eq!(e.low, 0x0000_0200_0031_0001);
        assert_eq!(e.high, 0x0000_0000_0004_0018);
        assert_eq!(
            decode(e),
            Decoded {
                present: true,
                fault_disable: false,
                dest_mode: 0,
                redir_hint: 0,
                trigger_mode: 0,
                delivery_mode: 0,
                irte_mode: 0,
                vector: 0x31,
                dest_id: 0x0200,
                source_id: 0x0018,
                sid_q: 0,
                sid_vtype: 1,
                reserved: 0,
            }
        );
        // QEMU in xAPIC mode (EIME = 0): dest = (dest_id & 0xff00) >> 8.
        assert_eq!((decode(e).dest_id & 0xff00) >> 8, 0x02);
    }

    #[test]
    fn low_vectors_are_refused() {
        assert_eq!(irte(0x0f, 0, 0), Err(VtdError::OutOfRange { value: 0x0f, limit: 0x10 }));
        assert!(irte(0x10, 0, 0).is_ok());
    }

    #[test]
    fn msi_address_layout() {
        assert_eq!(msi_address(0), 0xfee0_0010);
        assert_eq!(msi_address(1), 0xfee0_0030);
        assert_eq!(msi_address(0x7fff), 0xfeef_fff0);
        assert_eq!(msi_address(0x8000), 0xfee0_0014);
        assert_eq!(msi_address(0xffff), 0xfeef_fff4);
        assert_eq!(MSI_DATA, 0);
    }

    #[test]
    fn irta_layout() {
        assert_eq!(irta(0x30_0000, 7), Ok(0x30_0007));
        assert_eq!(entries(7), 256);
        assert_eq!(entries(0), 2);
        assert_eq!(entries(15), MAX_ENTRIES);
        assert_eq!(entries(16), 0);
        assert_eq!(irta(0x30_0000, 16), Err(VtdError::OutOfRange { value: 16, limit: 16 }));
        assert!(irta(0x30_0800, 0).is_err());
        // EIME (bit 11) never set.
        assert_eq!(irta(0x30_0000, 15).unwrap() & (1 << 11), 0);
    }

    proptest! {
        #[test]
        fn prop_irte_fields(vector in MIN_VECTOR..=255u8, apic_id: u8, sid: u16) {
            let d = decode(irte(vector, apic_id, sid).unwrap());
            prop_assert!(d.present && !d.fault_disable);
            prop_assert_eq!((d.dest_mode, d.redir_hint, d.trigger_mode, d.delivery_mode, d.irte_mode), (0, 0, 0, 0, 0));
            prop_assert_eq!(d.vector, vector);
            prop_assert_eq!(d.dest_id, u32::from(apic_id) << 8);
            prop_assert_eq!((d.source_id, d.sid_q, d.sid_vtype), (sid, 0, 1));
            prop_assert_eq!(d.reserved, 0);
        }

        /// QEMU 7.2 recovers the handle as `index_h << 15 | index_l` from the address bits.
        #[test]
        fn prop_msi_handle_roundtrip(handle: u16) {
            let a = msi_address(handle);
            prop_assert_eq!(a >> 20, 0xfee);
            prop_assert_eq!((a >> 4) & 1, 1, "remappable format");
            prop_assert_eq!((a >> 3) & 1, 0, "no sub-handle");
            prop_assert_eq!(a & 3, 0);
            let index = (((a >> 2) & 1) << 15) | ((a >> 5) & 0x7fff);
            prop_assert_eq!(index, u32::from(handle));
        }

        #[test]
        fn prop_irta_fields(page in 0u64..(1 << 27), size in 0u8..16) {
            let v = irta(page << 12, size).unwrap();
            prop_assert_eq!(v & !0xfff, page << 12);
            prop_assert_eq!(v & 0xf, u64::from(size));
            prop_assert_eq!(v & 0xff0, 0, "EIME and reserved bits clear");
        }
    }
}

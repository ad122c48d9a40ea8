//! AMD nested page table (NPT) entry encoding.
//!
//! NPT reuses the ordinary AMD64 long-mode 4-level page-table format; the only twists are that
//! the nested walk treats every guest access as a *user* access, so `US` must be set at every
//! level, and that permissions only need enforcing once: non-leaf entries grant everything
//! (`P|RW|US`, no `NX`) and each leaf carries the real permissions.
//!
//! Hardware requirements the integrator must meet: the host must run with `EFER.NXE` set when
//! executing `VMRUN` (the nested walk uses the host's NX setting; with it clear, bit 63 is a
//! reserved bit and every non-executable mapping would fault), and the default PAT must be in
//! place in the host (entry 0 = WB, entry 3 = UC), which is what the `PWT`/`PCD` encodings
//! below select.

use crate::stage2::{Access, MemType, Stage2Format};
pub use crate::stage2::{ADDR_MASK, ADDR_MASK_2M, PS};

/// Present.
pub const P: u64 = 1 << 0;
/// Writable.
pub const RW: u64 = 1 << 1;
/// User: must be set at every level, the nested walk is a user-mode walk.
pub const US: u64 = 1 << 2;
/// Page-level write-through (PAT index bit 0).
pub const PWT: u64 = 1 << 3;
/// Page-level cache disable (PAT index bit 1).
pub const PCD: u64 = 1 << 4;
/// Accessed.
pub const A: u64 = 1 << 5;
/// Dirty (leaves only).
pub const D: u64 = 1 << 6;
/// No-execute.
pub const NX: u64 = 1 << 63;
/// The AMD NPT format, for [`crate::stage2::Stage2Map`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Npt;

impl Stage2Format for Npt {
    const HPA_BITS: u32 = 52;

    /// `A` is preset on every leaf and `D` on writable ones: the walker would otherwise set
    /// them with locked read-modify-writes on first use, which buys nothing since the
    /// microvisor never reads them.
    fn leaf_bits(access: Access, mem_type: MemType) -> u64 {
        let mut entry = P | US | A;
        if access.contains(Access::WRITE) {
            entry |= RW | D;
        }
        if !access.contains(Access::EXEC) {
            entry |= NX;
        }
        if mem_type == MemType::Uncached {
            entry |= PCD | PWT;
        }
        entry
    }

    fn table(table: u64) -> u64 {
        (table & ADDR_MASK) | P | RW | US | A
    }

    fn is_present(entry: u64) -> bool {
        entry & P != 0
    }

    /// P and RW are the bit positions of READ and WRITE.
    #[cfg(test)]
    fn access(entry: u64) -> Access {
        let exec = if entry & NX == 0 { Access::EXEC } else { Access::empty() };
        Access::from_bits_truncate((entry & (P | RW)) as u8) | exec
    }

    /// Anything with caching disabled (PCD) counts as uncached; only PWT=PCD=0 is write-back.
    /// The map only ever writes those two encodings.
    #[cfg(test)]
    fn mem_type(entry: u64) -> MemType {
        if entry & (PCD | PWT) == 0 {
            MemType::WriteBack
        } else {
            MemType::Uncached
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage2::{PageSize, Stage2Error};
    use proptest::prelude::*;

    #[test]
    fn leaf_encodings() {
        let e = Npt::leaf(0x1234_5000, Access::all(), MemType::WriteBack, PageSize::Size4K).unwrap();
        assert_eq!(e, 0x1234_5000 | P | RW | US | A | D);
        let e = Npt::leaf(0x20_0000, Access::READ, MemType::Uncached, PageSize::Size2M).unwrap();
        assert_eq!(e, 0x20_0000 | P | US | A | PCD | PWT | PS | NX);
        let e = Npt::leaf(0x3000, Access::READ.union(Access::EXEC), MemType::WriteBack, PageSize::Size4K).unwrap();
        assert_eq!(e, 0x3000 | P | US | A);
        // 4 KiB leaves never set bit 7 (PAT there).
        assert_eq!(e & PS, 0);
    }

    #[test]
    fn table_encoding() {
        let e = Npt::table(0xabc_d000);
        assert_eq!(e, 0xabc_d000 | P | RW | US | A);
        assert!(Npt::is_present(e));
        assert!(!Npt::is_large(e));
        assert_eq!(Npt::table_address(e), 0xabc_d000);
        assert_eq!(e & NX, 0);
    }

    #[test]
    fn zero_is_not_present() {
        assert!(!Npt::is_present(0));
    }

    #[test]
    fn bad_leaves_are_refused() {
        for access in [Access::empty(), Access::WRITE, Access::EXEC, Access::from_bits_retain(0x11)] {
            assert_eq!(
                Npt::leaf(0, access, MemType::WriteBack, PageSize::Size4K),
                Err(Stage2Error::BadAccess { access })
            );
        }
        assert_eq!(
            Npt::leaf(1 << 52, Access::READ, MemType::WriteBack, PageSize::Size4K),
            Err(Stage2Error::HpaOutOfRange { hpa: 1 << 52 })
        );
        assert!(matches!(
            Npt::leaf(0x1000, Access::READ, MemType::WriteBack, PageSize::Size2M),
            Err(Stage2Error::Misaligned { .. })
        ));
        assert!(matches!(
            Npt::leaf(0x10, Access::READ, MemType::WriteBack, PageSize::Size4K),
            Err(Stage2Error::Misaligned { .. })
        ));
    }

    #[test]
    fn decoding_foreign_cache_bits() {
        assert_eq!(Npt::mem_type(P | PCD), MemType::Uncached);
        assert_eq!(Npt::mem_type(P | PWT), MemType::Uncached);
        assert_eq!(Npt::mem_type(P), MemType::WriteBack);
    }

    fn arb_access() -> impl Strategy<Value = Access> {
        (0u8..8).prop_map(|b| Access::from_bits_truncate(b) | Access::READ)
    }

    proptest! {
        #[test]
        fn prop_leaf_roundtrip(
            frame in 0u64..(1 << 40),
            access in arb_access(),
            uncached in any::<bool>(),
            large in any::<bool>(),
        ) {
            let (size, hpa) = if large {
                (PageSize::Size2M, (frame << 21) & ADDR_MASK_2M)
            } else {
                (PageSize::Size4K, (frame << 12) & ADDR_MASK)
            };
            let mem_type = if uncached { MemType::Uncached } else { MemType::WriteBack };
            let e = Npt::leaf(hpa, access, mem_type, size).unwrap();
            prop_assert!(Npt::is_present(e));
            prop_assert_eq!(Npt::is_large(e), large);
            prop_assert!(e & US != 0, "US must always be set");
            prop_assert_eq!(Npt::leaf_address(e, size), hpa);
            prop_assert_eq!(Npt::access(e), access);
            prop_assert_eq!(Npt::mem_type(e), mem_type);
            // Bits 52..62 (available/reserved) stay clear.
            prop_assert_eq!(e & 0x7ff0_0000_0000_0000, 0);
        }

        #[test]
        fn prop_table_roundtrip(frame in 0u64..(1 << 40)) {
            let t = frame << 12;
            let e = Npt::table(t);
            prop_assert_eq!(Npt::table_address(e), t);
            prop_assert!(Npt::is_present(e) && !Npt::is_large(e));
            prop_assert_eq!(e & (P | RW | US), P | RW | US);
        }
    }
}

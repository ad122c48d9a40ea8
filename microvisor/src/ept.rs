//! Intel EPT entry encoding (SDM vol. 3 section 28.2.2, tables 28-1 to 28-6), the stage-2
//! format of the VMX build, beside AMD's NPT ([`crate::npt`]).
//!
//! Every level has read, write and execute bits (0, 1, 2); a non-leaf grants all three and
//! each leaf carries the real permissions. A leaf holds its memory type in bits 5:3 (6 =
//! write-back for RAM, 0 = uncached for device memory); bit 7 makes a level-2 entry a 2 MiB
//! page. Accessed/dirty flags are off in the EPTP, so bits 8 and 9 are ignored and never
//! written by the CPU.

use crate::stage2::{Access, MemType, Stage2Format};
pub use crate::stage2::{ADDR_MASK, ADDR_MASK_2M, PS};

pub const R: u64 = 1 << 0;
pub const W: u64 = 1 << 1;
pub const X: u64 = 1 << 2;
/// Memory type write-back in bits 5:3 (table 28-6; UC is 0).
pub const WB: u64 = 6 << 3;

/// The EPT format, for [`crate::stage2::Stage2Map`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ept;

impl Stage2Format for Ept {
    const HPA_BITS: u32 = 52;

    fn leaf_bits(access: Access, mem_type: MemType) -> u64 {
        let mut entry = R;
        if access.contains(Access::WRITE) {
            entry |= W;
        }
        if access.contains(Access::EXEC) {
            entry |= X;
        }
        if mem_type == MemType::WriteBack {
            entry |= WB;
        }
        entry
    }

    fn table(table: u64) -> u64 {
        (table & ADDR_MASK) | R | W | X
    }

    /// "Not present" is all three permission bits clear (28.2.2).
    fn is_present(entry: u64) -> bool {
        entry & (R | W | X) != 0
    }

    #[cfg(test)]
    fn access(entry: u64) -> Access {
        Access::from_bits_truncate((entry & (R | W | X)) as u8)
    }

    #[cfg(test)]
    fn mem_type(entry: u64) -> MemType {
        if entry & (7 << 3) == WB {
            MemType::WriteBack
        } else {
            MemType::Uncached
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage2::PageSize;
    use proptest::prelude::*;

    #[test]
    fn leaf_encodings() {
        let e = Ept::leaf(0x1234_5000, Access::all(), MemType::WriteBack, PageSize::Size4K).unwrap();
        assert_eq!(e, 0x1234_5000 | R | W | X | WB);
        let e = Ept::leaf(0x20_0000, Access::READ, MemType::Uncached, PageSize::Size2M).unwrap();
        assert_eq!(e, 0x20_0000 | R | PS);
        assert_eq!(Ept::table(0xabc_d000), 0xabc_d000 | 7);
        assert!(!Ept::is_present(0) && Ept::is_present(R));
        assert!(Ept::leaf(0, Access::WRITE, MemType::WriteBack, PageSize::Size4K).is_err());
        assert!(Ept::leaf(0, Access::EXEC, MemType::WriteBack, PageSize::Size4K).is_err());
        assert!(Ept::leaf(0x1000, Access::READ, MemType::WriteBack, PageSize::Size2M).is_err());
    }

    proptest! {
        #[test]
        fn prop_leaf_roundtrip(frame in 0u64..(1 << 40), bits in 0u8..8, uncached in any::<bool>(), large in any::<bool>()) {
            let access = Access::from_bits_truncate(bits) | Access::READ;
            let (size, hpa) = if large { (PageSize::Size2M, (frame << 21) & ADDR_MASK_2M) } else { (PageSize::Size4K, (frame << 12) & ADDR_MASK) };
            let mem_type = if uncached { MemType::Uncached } else { MemType::WriteBack };
            let e = Ept::leaf(hpa, access, mem_type, size).unwrap();
            prop_assert!(Ept::is_present(e));
            prop_assert_eq!(Ept::is_large(e), large);
            prop_assert_eq!(Ept::leaf_address(e, size), hpa);
            prop_assert_eq!(Ept::access(e), access);
            prop_assert_eq!(Ept::mem_type(e), mem_type);
            prop_assert_eq!(e & 0x3c0, if large { PS } else { 0 }, "no ignore-PAT, A or D bits");
        }
    }
}

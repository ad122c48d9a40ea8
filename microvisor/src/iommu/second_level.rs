//! VT-d second-level page-table entries, as a [`Stage2Format`] for [`Stage2Map`].
//!
//! VT-d second-level tables have the same shape as NPT/EPT (512 8-byte entries per 4 KiB table,
//! indexed by DMA address bits 47:12, 2 MiB leaves in level-2 entries), so the generic
//! [`Stage2Map`] builds them; only the entry encoding differs (spec 9.8, legacy mode):
//!
//! ```text
//! bit 0 R, bit 1 W, bit 2 X (execute requests only; never set), bit 7 PS (large leaf),
//! bit 11 SNP (reserved without ECAP.SC), 51:12 address (2 MiB leaf: 51:21, with 20:12 reserved),
//! bit 62 TM (reserved without ECAP.DT), 52..61 and 63 ignored
//! ```
//!
//! An entry is present when R or W is set; permissions are the AND over every level of the
//! walk, so table pointers grant both and each leaf carries the real ones. There is no user
//! bit, no accessed/dirty bit (QEMU never checks or sets them) and no memory type: DMA
//! coherency is the platform's (snooped on QEMU), so [`MemType`] is accepted and not encoded.
//!
//! # 3-level contexts
//!
//! [`Stage2Map`] always builds 4 levels (PML4 at [`Stage2Map::root`]). A unit that only walks
//! 3 levels (QEMU 7.2: CAP.SAGAW = 39-bit only) is given the level-3 table that entry 0 of the
//! PML4 points to ([`three_level_root`]): a 3-level walk of a 39-bit address is exactly the
//! 4-level walk of the same address with the (zero) top index skipped. So DMA addresses
//! `0..512 GiB` of a map serve such a context; mappings at or above 512 GiB are unreachable
//! (the device gets fault reason 0x4). A context entry for this uses
//! [`AddressWidth::Bits39`](super::tables::AddressWidth::Bits39).

use crate::stage2::{Access, MemType, Stage2Error, Stage2Format, Stage2Map, TableMemory};
pub use crate::stage2::{ADDR_MASK, ADDR_MASK_2M, PS};

/// Read permission (and, with W, presence).
pub const R: u64 = 1 << 0;
/// Write permission.
pub const W: u64 = 1 << 1;
/// One past the highest DMA address a 3-level (39-bit) context can reach.
pub const THREE_LEVEL_LIMIT: u64 = 1 << 39;

/// The VT-d second-level format, for [`Stage2Map`]: `Stage2Map<Vtd>` is a device's DMA address
/// space, built exactly like a domain's NPT map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vtd;

impl Stage2Format for Vtd {
    /// The format's address field ends at bit 51. The unit also faults on bits at or above the
    /// platform's host address width (39 on QEMU), which the frame allocator stays below.
    const HPA_BITS: u32 = 52;

    /// READ, WRITE or both. An empty set would be a not-present entry, and EXEC cannot be
    /// granted: devices make no execute requests through a legacy-mode context (TT = 0), and
    /// silently dropping it would make [`Stage2Map::translate`] report something other than
    /// what was asked for. Map guest RAM for DMA with [`Access::RW`].
    fn check_access(access: Access) -> Result<(), Stage2Error> {
        if !access.is_empty() && Access::RW.contains(access) {
            Ok(())
        } else {
            Err(Stage2Error::BadAccess { access })
        }
    }

    /// `mem_type` is not encoded: legacy-mode second-level entries have no memory type.
    /// R and W are the bit positions of READ and WRITE.
    fn leaf_bits(access: Access, _mem_type: MemType) -> u64 {
        u64::from(access.bits()) & (R | W)
    }

    /// Table pointers grant R and W; the leaves restrict.
    fn table(table: u64) -> u64 {
        (table & ADDR_MASK) | R | W
    }

    fn is_present(entry: u64) -> bool {
        entry & (R | W) != 0
    }

    #[cfg(test)]
    fn access(entry: u64) -> Access {
        Access::from_bits_truncate((entry & (R | W)) as u8)
    }

    /// Always write-back: the entries carry no memory type.
    #[cfg(test)]
    fn mem_type(_entry: u64) -> MemType {
        MemType::WriteBack
    }
}

/// The table a 3-level (39-bit) context entry must point at for `map`: the level-3 table in
/// entry 0 of the map's PML4, read through `mem`. `None` while nothing below 512 GiB is mapped
/// (the map has not created that table yet).
///
/// The answer changes over the map's life, because [`Stage2Map`] frees tables that become
/// empty: unmapping everything below 512 GiB frees this table (this returns `None` again) and
/// a later map creates a new one at a different address. So after every `map`/`unmap` of a
/// DMA map, compare this with what the context entries hold; if it changed, rewrite them
/// (make them not present when `None`), then invalidate the context cache and the IOTLB
/// before the old table's memory is reused. Keeping one mapping below 512 GiB for the map's
/// whole life keeps the address stable.
pub fn three_level_root(map: &Stage2Map<Vtd>, mem: &impl TableMemory) -> Option<u64> {
    let pml4e = mem.read_entry(map.root(), 0);
    if Vtd::is_present(pml4e) {
        Some(Vtd::table_address(pml4e))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage2::tests::TestMem;
    use crate::stage2::PageSize;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::vec::Vec;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// QEMU 7.2's host address width and the reserved-bit masks it checks (`vtd_spte_rsvd`,
    /// `aw-bits=39`, no device TLB): bits 39..51 and 62 everywhere, SNP (11) everywhere, PS (7)
    /// in level 4, bits 20:12 in 2 MiB leaves.
    const HAW_MASK: u64 = (1 << 39) - 1;
    const IGNORED: u64 = 0xbff0_0000_0000_0000;
    const fn rsvd(level: u8, large: bool) -> u64 {
        let common = 0x800 | !(HAW_MASK | IGNORED);
        match (level, large) {
            (4, _) => common | 0x80,
            (2, true) => common | 0x1f_f800,
            _ => common,
        }
    }

    /// A VT-d walk the way QEMU 7.2 does it (`vtd_iova_to_slpte`): from a 3-level root, check
    /// the requested permission and then the reserved bits at each level. Returns the host
    /// address and leaf size, or the fault reason.
    fn qemu_walk(mem: &TestMem, slpt: u64, iova: u64, write: bool) -> Result<(u64, PageSize), u8> {
        if iova >= THREE_LEVEL_LIMIT {
            return Err(0x4);
        }
        let mut table = slpt;
        let mut level = 3u8;
        loop {
            let shift = 12 + 9 * (u32::from(level) - 1);
            let entry = mem.read_entry(table, ((iova >> shift) & 0x1ff) as usize);
            let need = if write { W } else { R };
            if entry & need == 0 {
                return Err(if write { 0x5 } else { 0x6 });
            }
            let large = level == 2 && entry & PS != 0;
            if entry & rsvd(level, large) != 0 {
                return Err(0xc);
            }
            if level == 1 || large {
                let page_mask = !((1u64 << shift) - 1);
                let base = entry & !0xfff & HAW_MASK & page_mask;
                let size = if large { PageSize::Size2M } else { PageSize::Size4K };
                return Ok((base | (iova & !page_mask), size));
            }
            table = entry & !0xfff & HAW_MASK;
            level -= 1;
        }
    }

    #[test]
    fn leaf_encodings() {
        let e = Vtd::leaf(0x1234_5000, Access::RW, MemType::WriteBack, PageSize::Size4K).unwrap();
        assert_eq!(e, 0x1234_5003);
        let e = Vtd::leaf(0x20_0000, Access::READ, MemType::Uncached, PageSize::Size2M).unwrap();
        assert_eq!(e, 0x20_0000 | R | PS);
        let e = Vtd::leaf(0x3000, Access::WRITE, MemType::WriteBack, PageSize::Size4K).unwrap();
        assert_eq!(e, 0x3000 | W);
        assert!(Vtd::is_present(e));
        // Never X, never SNP, nothing in the ignored bits.
        assert_eq!(e & ((1 << 2) | (1 << 11) | IGNORED | (1 << 62)), 0);
    }

    #[test]
    fn table_encoding() {
        let e = Vtd::table(0xabc_d000);
        assert_eq!(e, 0xabc_d003);
        assert!(Vtd::is_present(e) && !Vtd::is_large(e));
        assert_eq!(Vtd::table_address(e), 0xabc_d000);
        for level in 1..=4 {
            assert_eq!(e & rsvd(level, false), 0, "level {level}");
        }
    }

    #[test]
    fn zero_is_not_present() {
        assert!(!Vtd::is_present(0));
        assert!(!Vtd::is_present(PS | 0x1000));
    }

    #[test]
    fn bad_leaves_are_refused() {
        for access in [
            Access::empty(),
            Access::EXEC,
            Access::READ.union(Access::EXEC),
            Access::all(),
            Access::from_bits_retain(0x11),
        ] {
            assert_eq!(
                Vtd::leaf(0, access, MemType::WriteBack, PageSize::Size4K),
                Err(Stage2Error::BadAccess { access })
            );
            assert_eq!(Vtd::check_access(access), Err(Stage2Error::BadAccess { access }));
        }
        assert_eq!(
            Vtd::leaf(1 << 52, Access::READ, MemType::WriteBack, PageSize::Size4K),
            Err(Stage2Error::HpaOutOfRange { hpa: 1 << 52 })
        );
        assert!(matches!(
            Vtd::leaf(0x1000, Access::READ, MemType::WriteBack, PageSize::Size2M),
            Err(Stage2Error::Misaligned { .. })
        ));
        assert!(matches!(
            Vtd::leaf(0x10, Access::READ, MemType::WriteBack, PageSize::Size4K),
            Err(Stage2Error::Misaligned { .. })
        ));
    }

    #[test]
    fn memory_type_is_not_encoded() {
        let wb = Vtd::leaf(0x5000, Access::RW, MemType::WriteBack, PageSize::Size4K).unwrap();
        let uc = Vtd::leaf(0x5000, Access::RW, MemType::Uncached, PageSize::Size4K).unwrap();
        assert_eq!(wb, uc);
        assert_eq!(Vtd::mem_type(uc), MemType::WriteBack);
    }

    #[test]
    fn three_level_root_follows_pml4_entry_zero() {
        let mut mem = TestMem::new();
        let mut map = Stage2Map::<Vtd>::new(&mut mem).unwrap();
        assert_eq!(three_level_root(&map, &mem), None);
        // Only above 512 GiB: still nothing a 3-level context can reach.
        map.map(&mut mem, 600 * GIB, 0x4000_0000, 2 * MIB, Access::RW, MemType::WriteBack).unwrap();
        assert_eq!(three_level_root(&map, &mem), None);

        map.map(&mut mem, 0, 0x20_0000, 4 * MIB, Access::RW, MemType::WriteBack).unwrap();
        map.map(&mut mem, 5 * GIB + 0x3000, 0x7000, 0x2000, Access::READ, MemType::WriteBack).unwrap();
        let slpt = three_level_root(&map, &mem).unwrap();
        assert_eq!(slpt, Vtd::table_address(mem.read_entry(map.root(), 0)));

        assert_eq!(qemu_walk(&mem, slpt, 0x1234, true), Ok((0x20_1234, PageSize::Size2M)));
        assert_eq!(qemu_walk(&mem, slpt, 0x3f_fff8, false), Ok((0x5f_fff8, PageSize::Size2M)));
        assert_eq!(qemu_walk(&mem, slpt, 5 * GIB + 0x4010, false), Ok((0x8010, PageSize::Size4K)));
        assert_eq!(qemu_walk(&mem, slpt, 5 * GIB + 0x4010, true), Err(0x5));
        assert_eq!(qemu_walk(&mem, slpt, 4 * MIB, false), Err(0x6));
        assert_eq!(qemu_walk(&mem, slpt, 600 * GIB, false), Err(0x4));

        // Unmapping everything below 512 GiB frees the table: the context must be re-pointed.
        map.unmap(&mut mem, 0, 4 * MIB).unwrap();
        map.unmap(&mut mem, 5 * GIB + 0x3000, 0x2000).unwrap();
        assert_eq!(three_level_root(&map, &mem), None);
        map.destroy(&mut mem);
        assert_eq!(mem.live(), 0);
    }

    #[derive(Clone, Debug)]
    struct Mapping {
        gpa: u64,
        hpa: u64,
        pages: u64,
        access: Access,
    }

    fn arb_mapping() -> impl Strategy<Value = Mapping> {
        (
            // Starts near 0, on GiB boundaries, just below GiB boundaries (so a range crosses
            // into the next level-2 table) and around 512 GiB (where 3-level reach ends).
            prop_oneof![
                (0u64..8).prop_map(|s| s << 21),
                (1u64..512).prop_map(|g| g << 30),
                (1u64..512).prop_map(|g| (g << 30) - 2 * MIB),
                Just(THREE_LEVEL_LIMIT - 2 * MIB),
                (512u64..1024).prop_map(|g| g << 30),
            ],
            prop_oneof![Just(0u64), 0u64..8],
            prop_oneof![1u64..16, Just(512u64), Just(1024u64)],
            prop_oneof![Just(Access::READ), Just(Access::WRITE), Just(Access::RW)],
            any::<bool>(),
        )
            .prop_map(|(base, off, pages, access, same_phase)| {
                let gpa = base + (off << 12);
                let hpa_off = if same_phase { 0 } else { 0x3000 };
                Mapping { gpa, hpa: 0x40_0000_0000 + (gpa % (16 * GIB)) + hpa_off, pages, access }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Whatever the generic map builds, a QEMU-style 3-level walk from `three_level_root`
        /// agrees with `translate` for every DMA address below 512 GiB, faults with the
        /// spec's reasons elsewhere, and never trips a reserved bit.
        #[test]
        fn prop_three_level_walk_matches_translate(maps in prop::collection::vec(arb_mapping(), 1..8)) {
            let mut mem = TestMem::new();
            let mut map = Stage2Map::<Vtd>::new(&mut mem).unwrap();
            let mut model: BTreeMap<u64, (u64, Access)> = BTreeMap::new();
            for m in &maps {
                let size = m.pages * 4096;
                let hpa = m.hpa & (HAW_MASK & !0xfff);
                if map.map(&mut mem, m.gpa, hpa, size, m.access, MemType::WriteBack).is_ok() {
                    for p in 0..m.pages {
                        model.insert(m.gpa + p * 4096, (hpa + p * 4096, m.access));
                    }
                }
            }
            let slpt = three_level_root(&map, &mem);
            prop_assert_eq!(slpt.is_some(), model.keys().any(|&g| g < THREE_LEVEL_LIMIT));
            let mut probes: Vec<u64> = model.keys().flat_map(|&g| [g, g + 4096, g.wrapping_sub(4096)]).collect();
            probes.push(THREE_LEVEL_LIMIT);
            for g in probes.into_iter().filter(|&g| g < (1 << 40)) {
                let iova = g + 0x18;
                let want = model.get(&g).copied();
                prop_assert_eq!(map.translate(&mem, iova).map(|t| (t.hpa, t.access)), want.map(|(h, a)| (h + 0x18, a)));
                let Some(slpt) = slpt else { continue };
                for write in [false, true] {
                    let need = if write { Access::WRITE } else { Access::READ };
                    let expected = if g >= THREE_LEVEL_LIMIT {
                        Err(0x4)
                    } else {
                        match want.filter(|(_, a)| a.contains(need)) {
                            Some((h, _)) => Ok(h + 0x18),
                            None => Err(if write { 0x5 } else { 0x6 }),
                        }
                    };
                    prop_assert_eq!(qemu_walk(&mem, slpt, iova, write).map(|(h, _)| h), expected, "gpa {:#x}", g);
                }
            }
            map.destroy(&mut mem);
            prop_assert_eq!(mem.live(), 0);
        }

        #[test]
        fn prop_leaf_roundtrip(frame in 0u64..(1 << 27), access in 1u8..4, large: bool) {
            let access = Access::from_bits_truncate(access);
            let (size, hpa) = if large {
                (PageSize::Size2M, (frame << 21) & ADDR_MASK_2M & HAW_MASK)
            } else {
                (PageSize::Size4K, (frame << 12) & HAW_MASK)
            };
            let e = Vtd::leaf(hpa, access, MemType::WriteBack, size).unwrap();
            prop_assert!(Vtd::is_present(e));
            prop_assert_eq!(Vtd::is_large(e), large);
            prop_assert_eq!(Vtd::leaf_address(e, size), hpa);
            prop_assert_eq!(Vtd::access(e), access);
            prop_assert_eq!(e & rsvd(if large { 2 } else { 1 }, large), 0);
        }
    }
}

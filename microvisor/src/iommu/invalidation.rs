//! Invalidation: queued descriptors and the register-based fallback.
//!
//! The unit caches context entries (by requester), translations (IOTLB, by domain id) and
//! interrupt remapping entries. After software changes a present entry, or makes one not
//! present, it must invalidate the cache that may hold the old value before relying on the
//! change (for example before freeing or reusing a page a device could still reach).
//!
//! **Queued invalidation** (ECAP.QI): software writes 128-bit descriptors into a ring of
//! 4 KiB pages ([`iqa`]) and advances the tail register ([`iqt`]); the unit processes them in
//! order and moves the head. A [`wait`] descriptor with a status write tells software when
//! everything before it is done. Required for interrupt remapping: the interrupt entry cache
//! can only be invalidated this way.
//!
//! **Register-based** (CCMD, and the IOTLB register at `ECAP.IRO * 16 + 8`): always
//! available, but ignored by QEMU while QI is enabled, without ever clearing the busy bit; the
//! microvisor needs QI for interrupt remapping anyway, so it has no encodings for them.
//!
//! After changing context entries: context-cache invalidation, then IOTLB invalidation (the
//! spec requires both, in that order). After changing second-level entries: IOTLB. After
//! changing IRTEs: interrupt entry cache. Descriptor layouts (spec 6.5.2, QEMU's reserved-bit
//! checks in brackets; a descriptor with a reserved bit set stops the queue with FSTS.IQE):
//!
//! ```text
//! context-cache   low: 3:0 type 1, 5:4 G (01 global), 31:16 DID, 47:32 SID, 49:48 FM
//! IOTLB           low: 3:0 type 2, 5:4 G (01 global), 6 DW, 7 DR, 31:16 DID [15:8, 63:32]
//!                 high: 63:12 address, 6 IH, 5:0 AM (page-selective only)
//! interrupt entry low: 3:0 type 4, 4 G (0 global, 1 index-selective), 31:27 IM, 47:32 index
//! wait            low: 3:0 type 5, 4 IF, 5 SW, 6 FN, [31:7], 63:32 status data
//!                 high: 63:2 status address [1:0]
//! ```

use super::{check_addr, Entry128, VtdError, PAGE_SIZE};

/// Descriptor type: context-cache invalidate.
const TYPE_CONTEXT: u64 = 0x1;
/// Descriptor type: IOTLB invalidate.
const TYPE_IOTLB: u64 = 0x2;
/// Descriptor type: interrupt entry cache invalidate.
const TYPE_IEC: u64 = 0x4;
/// Descriptor type: invalidation wait.
const TYPE_WAIT: u64 = 0x5;
/// Granularity field (bits 5:4) = 01: global, for context-cache and IOTLB descriptors.
const GLOBAL: u64 = 0b01 << 4;
/// IOTLB descriptor: drain writes.
const DESC_DW: u64 = 1 << 6;
/// IOTLB descriptor: drain reads.
const DESC_DR: u64 = 1 << 7;
/// Wait descriptor: status write.
const WAIT_SW: u64 = 1 << 5;
/// Wait descriptor: fence.
const WAIT_FN: u64 = 1 << 6;

/// Largest queue size field: 2^7 pages, 32768 descriptors.
pub const MAX_QUEUE_SIZE: u8 = 7;

/// Global context-cache invalidation: forget every cached context entry.
pub const fn context_cache_global() -> Entry128 {
    Entry128 { low: TYPE_CONTEXT | GLOBAL, high: 0 }
}

/// Global IOTLB invalidation: forget every cached translation, of every domain. With
/// `drain_reads`/`drain_writes`, DMA reads/writes already translated with old entries are
/// completed first; set them when CAP.DRD/DWD report support (both on QEMU) so that
/// completion really means no device is still using an old translation.
pub const fn iotlb_global(drain_reads: bool, drain_writes: bool) -> Entry128 {
    let dr = if drain_reads { DESC_DR } else { 0 };
    let dw = if drain_writes { DESC_DW } else { 0 };
    Entry128 { low: TYPE_IOTLB | GLOBAL | dr | dw, high: 0 }
}

/// Global interrupt entry cache invalidation: forget every cached IRTE. (Its granularity bit
/// is 0 for global, unlike the other descriptors.)
pub const fn interrupt_entry_cache_global() -> Entry128 {
    Entry128 { low: TYPE_IEC, high: 0 }
}

/// An invalidation wait descriptor: once every earlier descriptor has completed, the unit
/// writes the 32-bit `status` to `status_addr` (4-byte aligned). Software polls that word
/// (having set it to something else first). With `fence`, descriptors after this one are not
/// started before it completes.
///
/// Only the status-write form: QEMU 7.2 aborts (an assertion) on a wait descriptor with both
/// the status-write and interrupt flags set.
pub const fn wait(status_addr: u64, status: u32, fence: bool) -> Result<Entry128, VtdError> {
    let addr = match check_addr(status_addr, 4) {
        Ok(addr) => addr,
        Err(e) => return Err(e),
    };
    let fence = if fence { WAIT_FN } else { 0 };
    Ok(Entry128 { low: TYPE_WAIT | WAIT_SW | fence | ((status as u64) << 32), high: addr })
}

/// Descriptors in a queue of size field `size` (0..=7): `2^(size + 8)`, i.e. `2^size` pages.
pub const fn queue_entries(size: u8) -> usize {
    if size <= MAX_QUEUE_SIZE {
        256 << size
    } else {
        0
    }
}

/// The IQA register value for a queue at `queue` (4 KiB aligned, physically contiguous) of
/// [`queue_entries`]`(size)` 128-bit descriptors (DW, bit 11, = 0). Write IQT = 0 and then IQA
/// before setting GCMD.QIE; the unit starts at head 0.
pub const fn iqa(queue: u64, size: u8) -> Result<u64, VtdError> {
    if size > MAX_QUEUE_SIZE {
        return Err(VtdError::OutOfRange { value: size as u64, limit: MAX_QUEUE_SIZE as u64 + 1 });
    }
    match check_addr(queue, PAGE_SIZE) {
        Ok(addr) => Ok(addr | size as u64),
        Err(e) => Err(e),
    }
}

/// The IQT (tail) register value that submits every descriptor before slot `index` of a queue
/// of size field `size`: the index in bits 18:4. `index` must be a valid slot (wrap it to 0 at
/// the end of the queue); the unit stops with FSTS.IQE on a tail beyond the queue.
pub const fn iqt(index: usize, size: u8) -> Result<u64, VtdError> {
    let entries = queue_entries(size);
    if index >= entries {
        return Err(VtdError::OutOfRange { value: index as u64, limit: entries as u64 });
    }
    Ok((index as u64) << 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// QEMU 7.2 reserved-bit masks (`VTD_INV_DESC_*_RSVD*`).
    const CC_RSVD: u64 = 0xfffc_0000_0000_ffc0;
    const IOTLB_RSVD_LO: u64 = 0xffff_ffff_0000_ff00;
    const IOTLB_RSVD_HI: u64 = 0xf80;
    const WAIT_RSVD_LO: u64 = 0xffff_ff80;
    const WAIT_RSVD_HI: u64 = 3;

    #[test]
    fn context_cache_descriptor() {
        let d = context_cache_global();
        assert_eq!(d, Entry128::new(0x11, 0));
        assert_eq!(d.low & CC_RSVD, 0);
        assert_eq!(d.low & 0xf, 1);
        assert_eq!((d.low >> 4) & 3, 1, "global granularity");
    }

    #[test]
    fn iotlb_descriptor() {
        assert_eq!(iotlb_global(false, false), Entry128::new(0x12, 0));
        assert_eq!(iotlb_global(true, true), Entry128::new(0xd2, 0));
        assert_eq!(iotlb_global(true, false).low, 0x92);
        assert_eq!(iotlb_global(false, true).low, 0x52);
        for (dr, dw) in [(false, false), (true, false), (false, true), (true, true)] {
            let d = iotlb_global(dr, dw);
            assert_eq!(d.low & IOTLB_RSVD_LO, 0);
            assert_eq!(d.high & IOTLB_RSVD_HI, 0);
        }
    }

    #[test]
    fn interrupt_entry_cache_descriptor() {
        let d = interrupt_entry_cache_global();
        assert_eq!(d, Entry128::new(0x4, 0));
        // QEMU: `global = !granularity` with granularity in bit 4.
        assert_eq!((d.low >> 4) & 1, 0);
    }

    #[test]
    fn wait_descriptor() {
        let d = wait(0x1234_5678, 0xdead_beef, true).unwrap();
        assert_eq!(d.low, 0xdead_beef_0000_0065);
        assert_eq!(d.high, 0x1234_5678);
        assert_eq!(d.low & WAIT_RSVD_LO, 0);
        assert_eq!(d.high & WAIT_RSVD_HI, 0);
        assert_eq!(d.low & (1 << 4), 0, "never IF together with SW");
        assert_eq!(wait(0x1000, 1, false).unwrap().low, 0x0000_0001_0000_0025);
        assert_eq!(wait(0x1002, 1, false), Err(VtdError::Misaligned { addr: 0x1002, align: 4 }));
        assert!(wait(1 << 60, 1, false).is_err());
    }

    #[test]
    fn queue_registers() {
        assert_eq!(queue_entries(0), 256);
        assert_eq!(queue_entries(7), 32768);
        assert_eq!(queue_entries(8), 0);
        assert_eq!(iqa(0x50_0000, 0), Ok(0x50_0000));
        assert_eq!(iqa(0x50_0000, 3), Ok(0x50_0003));
        assert_eq!(iqa(0x50_0000, 8), Err(VtdError::OutOfRange { value: 8, limit: 8 }));
        assert!(iqa(0x50_0100, 0).is_err());
        assert_eq!(iqt(0, 0), Ok(0));
        assert_eq!(iqt(5, 0), Ok(0x50));
        assert_eq!(iqt(255, 0), Ok(0xff0));
        assert_eq!(iqt(256, 0), Err(VtdError::OutOfRange { value: 256, limit: 256 }));
        assert_eq!(iqt(32767, 7), Ok(0x7fff0));
    }

    proptest! {
        #[test]
        fn prop_wait_fields(word in 0u64..(1 << 50), status: u32, fence: bool) {
            let d = wait(word << 2, status, fence).unwrap();
            prop_assert_eq!(d.low & 0xf, 5);
            prop_assert_eq!((d.low >> 5) & 1, 1);
            prop_assert_eq!((d.low >> 6) & 1 != 0, fence);
            prop_assert_eq!((d.low >> 32) as u32, status);
            prop_assert_eq!(d.high, word << 2);
            prop_assert_eq!(d.low & WAIT_RSVD_LO, 0);
        }

        #[test]
        fn prop_iqt_roundtrips_through_iqh(size in 0u8..8, index in 0usize..32768) {
            match iqt(index, size) {
                Ok(v) => {
                    prop_assert!(index < queue_entries(size));
                    prop_assert_eq!((v >> 4) as usize, index);
                }
                Err(_) => prop_assert!(index >= queue_entries(size)),
            }
        }
    }
}

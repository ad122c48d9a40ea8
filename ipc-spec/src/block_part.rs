//! Partitions of one disk among block channels: a disk driver VM that serves several guests
//! from one device can give each channel a window of sectors of its own
//! (`part.<channel>=<first>+<count>` on its command line, from the manifest's `args`). The
//! guest behind the channel sees a disk of `count` sectors starting at its sector 0; the
//! driver checks every request against that size ([`crate::block::validate`] with
//! [`Partition::info`]) and adds `first` before it reaches the device, so no guest can
//! name a sector outside its window.

use crate::block::DiskInfo;

/// A window of `count` sectors starting at sector `first` of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    /// First sector of the disk in the window.
    pub first: u64,
    /// Sectors in the window.
    pub count: u64,
}

/// Why a partition was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionError {
    /// Not `<first>+<count>` in decimal sectors.
    Syntax,
    /// Empty, or reaching past the end of the disk.
    OutOfRange {
        /// Sectors of the disk.
        capacity: u64,
    },
}

impl core::fmt::Display for PartitionError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Syntax => f.write_str("not <first sector>+<sector count>"),
            Self::OutOfRange { capacity } => write!(f, "empty or past the end of the disk ({capacity} sectors)"),
        }
    }
}

impl Partition {
    /// Parses `<first>+<count>` (decimal sectors).
    pub fn parse(s: &str) -> Result<Self, PartitionError> {
        let (first, count) = s.split_once('+').ok_or(PartitionError::Syntax)?;
        let first = first.parse().map_err(|_| PartitionError::Syntax)?;
        let count = count.parse().map_err(|_| PartitionError::Syntax)?;
        Ok(Self { first, count })
    }

    /// The whole disk.
    pub fn whole(disk: &DiskInfo) -> Self {
        Self { first: 0, count: disk.capacity_sectors }
    }

    /// Checks the window against `disk`: not empty, inside it.
    pub fn check(self, disk: &DiskInfo) -> Result<Self, PartitionError> {
        let end = self.first.checked_add(self.count);
        if self.count == 0 || end.is_none_or(|e| e > disk.capacity_sectors) {
            return Err(PartitionError::OutOfRange { capacity: disk.capacity_sectors });
        }
        Ok(self)
    }

    /// The disk as a guest of this window sees it.
    pub fn info(self, disk: &DiskInfo) -> DiskInfo {
        DiskInfo { capacity_sectors: self.count, ..*disk }
    }

    /// The disk's sector for the window's `sector` (checked by `validate` against
    /// [`Self::info`] to lie inside the window, so this does not overflow; saturating all the
    /// same).
    pub fn to_disk(self, sector: u64) -> u64 {
        self.first.saturating_add(sector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{validate, BlockLayout, Op, Request, Status, Validated};
    use crate::ring::{ByteMem, SharedMem};
    extern crate std;
    use std::vec;

    const DISK: DiskInfo =
        DiskInfo { capacity_sectors: 1000, sector_size: 512, max_sectors_per_request: 128, read_only: false };

    #[test]
    fn parse_and_check() {
        assert_eq!(Partition::parse("10+20"), Ok(Partition { first: 10, count: 20 }));
        for bad in ["", "10", "+5", "a+1", "1+b", "-1+2", "1+2+3"] {
            assert_eq!(Partition::parse(bad), Err(PartitionError::Syntax), "{bad:?}");
        }
        assert!(Partition::parse("0+1000").unwrap().check(&DISK).is_ok());
        assert!(Partition::parse("999+1").unwrap().check(&DISK).is_ok());
        for bad in ["0+0", "999+2", "1000+1", "18446744073709551615+2"] {
            assert_eq!(
                Partition::parse(bad).unwrap().check(&DISK),
                Err(PartitionError::OutOfRange { capacity: 1000 }),
                "{bad}"
            );
        }
        assert_eq!(Partition::whole(&DISK), Partition { first: 0, count: 1000 });
    }

    #[test]
    fn requests_stay_inside_the_window() {
        let mut bytes = vec![0u8; 64 << 10];
        let mem = ByteMem::new(&mut bytes);
        let layout = BlockLayout::standard(mem.len()).unwrap();
        let p = Partition::parse("600+100").unwrap().check(&DISK).unwrap();
        let info = p.info(&DISK);
        assert_eq!(info.capacity_sectors, 100);
        let data = layout.data_offset() as u32;
        let req =
            |sector, count| Request { id: 1, op: Op::Write, sector, count, data_offset: data, data_len: count * 512 };
        // The last sectors of the window map to the disk's 690..700.
        match validate(&req(90, 10), &layout, info) {
            Ok(Validated::Write(t)) => assert_eq!(p.to_disk(t.sector()), 690),
            _ => panic!("a request inside the window is refused"),
        }
        // One sector past the window, or a huge sector, is refused before it is mapped.
        for (sector, count) in [(91, 10), (100, 1), (u64::MAX, 1), (u64::MAX - 5, 8)] {
            assert_eq!(validate(&req(sector, count), &layout, info).err(), Some(Status::OutOfRange), "{sector}");
        }
    }
}

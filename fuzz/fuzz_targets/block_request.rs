//! Driver-side parsing of hostile block-channel input: request slots through
//! `Request::decode` + `validate`, and region headers through `BlockLayout::read` (then the
//! ring attach a driver does next). Neither may panic, and whatever `validate` accepts must
//! lie inside the disk and the data area.
#![no_main]

use ipc_spec::block::{self, BlockLayout, DiskInfo, Request, Validated};
use ipc_spec::ring::ByteMem;
use libfuzzer_sys::fuzz_target;

/// The region the fixed layout describes (the standard layout of a 1 MiB region).
const REGION: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let layout = BlockLayout::standard(REGION).expect("the standard layout fits 1 MiB");
    // The first bytes pick the disk, so validation sees small, edge and huge disks.
    let (disk, rest) = match data.split_first() {
        Some((&sel, rest)) => (disk(sel), rest),
        None => (disk(0), data),
    };

    // Every 32-byte chunk is a request slot as the driver would pop it.
    for chunk in rest.chunks(block::SLOT_SIZE) {
        let mut slot = [0u8; block::SLOT_SIZE];
        slot[..chunk.len()].copy_from_slice(chunk);
        let req = Request::decode(&slot);
        if let Ok(Validated::Read(t) | Validated::Write(t)) = block::validate(&req, &layout, disk) {
            assert!(t.count() >= 1 && t.count() <= disk.max_sectors_per_request);
            assert!(t.end_sector() <= disk.capacity_sectors);
            assert_eq!(t.data_len(), t.count() as usize * 512);
            let area = layout.data_range();
            assert!(area.start <= t.data_range().start && t.data_range().end <= area.end);
        }
    }

    // The whole input as the start of a region: header parsing, then ring attach.
    for len in [rest.len(), 4096, 0x4000, REGION] {
        let mut region = vec![0u8; len.max(rest.len())];
        region[..rest.len()].copy_from_slice(rest);
        region.truncate(len);
        let mem = ByteMem::new(&mut region);
        if let Ok(l) = BlockLayout::read(&mem) {
            assert!(l.data_range().end <= len);
            if let Ok((mut requests, _responses)) = l.driver_rings(&mem) {
                while let Ok(Some(slot)) = requests.pop() {
                    let _ = block::validate(&Request::decode(&slot), &l, disk);
                }
            }
        }
    }
});

fn disk(sel: u8) -> DiskInfo {
    let capacity_sectors = match sel & 3 {
        0 => 2048,
        1 => 1,
        2 => u64::MAX,
        _ => 0,
    };
    DiskInfo {
        capacity_sectors,
        sector_size: 512,
        max_sectors_per_request: if sel & 4 == 0 { 256 } else { u32::MAX },
        read_only: sel & 8 != 0,
    }
}

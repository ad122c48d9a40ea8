//! VT-d protected passthrough: the disk driver VM serves the demo guest's block I/O; the
//! result is checked in the disk image file on the host.

use ipc_spec::block::pattern;
use stack_tests::*;

/// The runs the demo guest writes (see guests/demo/src/main.rs): (first sector, count).
fn runs(capacity: u64) -> [(u64, u64); 3] {
    [(0, 2048), (capacity / 2, 77), (capacity - 1, 1)]
}

#[test]
fn guest_block_io_through_the_disk_driver_vm_lands_in_the_disk_image() {
    let m = machine("");
    let disk = m.disks.first().cloned().expect("the default stack has a disk");
    let run = boot_until(&m, &["[guest] ready"]);
    assert!(matches!(run.ending, Ending::Stopped), "ended with {:?}:\n{}", run.ending, run.console());
    assert_line(&run, "[microvisor] iommu: VT-d at 0xfed90000 on");
    assert_line(&run, "[microvisor] iommu: 00:01.0 assigned to domain");
    assert_line(&run, "[disk] virtio-blk: 131072 sectors (64 MiB), VIRTIO_F_ACCESS_PLATFORM negotiated");
    // The completion interrupt came through interrupt remapping as a notification.
    assert_line(&run, "[disk] device interrupt arrived as a notification (remapping entry");
    assert_line(&run, "[guest] block self-test passed");
    assert_line(&run, "(the last one, 131071, included); out-of-range requests refused");
    assert_no_line(&run, "FATAL");
    assert_no_line(&run, "blocked DMA");

    // The stack is down; the image on the host holds exactly the pattern where the guest
    // wrote it, and zeros elsewhere.
    let image = std::fs::read(&disk).expect("reading the disk image");
    let capacity = image.len() as u64 / 512;
    assert_eq!(capacity, 131072);
    let mut want = [0u8; 512];
    let mut written = 0;
    for (first, count) in runs(capacity) {
        for s in first..first + count {
            pattern(s, &mut want);
            let got = &image[(s * 512) as usize..((s + 1) * 512) as usize];
            assert!(got == want, "sector {s} does not hold the pattern");
            written += 1;
        }
    }
    assert_eq!(written, 2126);
    for s in [2048u64, capacity / 2 - 1, capacity / 2 + 77, capacity - 2] {
        let got = &image[(s * 512) as usize..((s + 1) * 512) as usize];
        assert!(got.iter().all(|&b| b == 0), "sector {s} was written but should not have been");
    }
}

#[test]
fn rogue_dma_is_blocked_by_the_iommu_reported_to_dom0_and_harms_nobody() {
    let m = stack_machine("tests/stacks/rogue-dma.toml", "");
    assert_eq!(m.disks.len(), 2, "the rogue gets a disk device of its own");
    let run = boot_until(&m, &["[dom0] destroyed rogue", "[guest] ready"]);
    assert!(matches!(run.ending, Ending::Stopped), "ended with {:?}:\n{}", run.ending, run.console());
    assert_line(&run, "[rogue] aiming my device's DMA at 0x10000000, outside my memory");
    // Blocked and logged by the microvisor, with the device and the address...
    assert_line(&run, "[microvisor] iommu: blocked DMA from 00:02.0: write at 0x10000000");
    // ...the target memory does not hold the rogue's data (its disk says ROGUEDMA)...
    let now = run
        .lines
        .iter()
        .find(|l| l.starts_with("[microvisor] iommu: physical memory at 0x10000000 now holds"))
        .unwrap_or_else(|| panic!("no report of the target memory:\n{}", run.console()));
    assert!(!now.contains("[52, 4f, 47, 55, 45, 44, 4d, 41]"), "the rogue's data reached the target: {now}");
    // ...the fault reached dom0 as a message, and dom0 tore the rogue down...
    assert_line(&run, "[dom0] fault in rogue: its device 00:02.0 tried to DMA (write) at 0x10000000");
    // ...and the real disk driver and the guest worked throughout.
    assert_line(&run, "[guest] block self-test passed");
    assert_no_line(&run, "FATAL");
}

#[test]
fn a_driver_that_corrupts_the_ring_gets_the_guest_an_error_and_nothing_crashes() {
    let m = stack_machine("tests/stacks/rogue-ring.toml", "");
    let run = boot_until(&m, &["[guest] ready"]);
    assert!(matches!(run.ending, Ending::Stopped), "ended with {:?}:\n{}", run.ending, run.console());
    assert_line(&run, "[disk] answered \"disk0\" with a corrupt response ring");
    assert_line(&run, "[guest] block self-test FAILED: the rings are corrupt (the driver broke the protocol)");
    assert_no_line(&run, "FATAL");
    assert_no_line(&run, "[microvisor] domain guest stopped");
    assert_no_line(&run, "[microvisor] domain disk stopped");
}

//! The VMM's stall report (`vmm::stall`): in tests/stacks/linux-hung-disk.toml the disk
//! driver VM hangs after 8 completed requests and nothing restarts it, so Linux's disk
//! requests stay outstanding. Within seconds the VMM prints one `STALL virtio-blk` line
//! (virtqueue, MSI-X, block channel client and ring indices) and one `STALL guest` line
//! (the guest's APIC), and the state there places the stall in the driver VM: the VMM took
//! every request the guest made available, the driver took every request off the request
//! ring (consumer = producer), and no answer waits on the response ring.

use std::time::Duration;

use stack_tests::*;
use xtask::console::Console;
use xtask::linux;

const STACK: &str = "tests/stacks/linux-hung-disk.toml";

/// The number after `key` in `line`.
fn number(line: &str, key: &str) -> u64 {
    line.split(key)
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {key:?} in {line:?}"))
}

#[test]
fn a_hung_disk_driver_gets_a_stall_report_that_points_at_it() {
    let _ = linux_artifacts();
    let mut m = stack_machine(STACK, "");
    let disk = std::env::temp_dir().join(format!("stack-tests-{}-linux-stall-disk.img", std::process::id()));
    let _ = std::fs::remove_file(&disk);
    xtask::build::ensure_disk_as(&disk, true).unwrap_or_else(|e| panic!("{e}"));
    m.disks = vec![disk.clone()];

    let mut c = Console::spawn(linux::console_command(&m)).unwrap_or_else(|e| panic!("{e}"));
    c.wait_for("[disk] hanging after", BOOT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    c.wait_for("[linux] STALL guest:", Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    let text = c.text().to_string();
    let _ = std::fs::remove_file(&disk);
    // The report's lines are long: the microvisor emits them in pieces of 200 bytes, each
    // with the domain's prefix; joined again here.
    let start = text
        .find("[linux] STALL virtio-blk: no progress for ")
        .unwrap_or_else(|| panic!("no virtio-blk stall line; console:\n{text}"));
    let end = text[start..].find("[linux] STALL guest:").map_or(text.len(), |e| start + e);
    let blk = text[start..end].replace("\n[linux] ", "");
    let blk = blk.as_str();
    eprintln!("{blk}");
    assert!(number(blk, "for ") >= 5, "reported before 5 s without progress: {blk}");
    assert_eq!(number(blk, "avail="), number(blk, "taken="), "the VMM left requests on the virtqueue: {blk}");
    assert!(number(blk, "chan outstanding=") > 0, "nothing outstanding on the channel: {blk}");
    assert_eq!(number(blk, "req_ring prod="), number(blk, " cons="), "the driver did not take every request: {blk}");
    let resp = blk.split("resp_ring").nth(1).unwrap_or_else(|| panic!("no response ring in {blk}"));
    assert_eq!(number(resp, "prod="), number(resp, "cons="), "an answer waits on the response ring: {blk}");
    assert!(
        !text.contains("[linux] STALL virtio-net"),
        "the network reported a stall it does not have; console:\n{text}"
    );
}

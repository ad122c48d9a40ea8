//! A guest that corrupts its virtqueues is contained (issue 11): `virtio-rogue`
//! (domains/src/bin/virtio-rogue.rs), a VM under the real VMM, posts garbage to its
//! virtio-blk and virtio-net queues while the demo guest uses the same driver VMs
//! (tests/stacks/rogue-virtio.toml). Every attack must end in an error the guest sees
//! (IOERR, a dropped frame, DEVICE_NEEDS_RESET), the VMM must report the device stops and
//! keep serving (the rogue's devices work again after a reset), the VM stops only when it
//! powers itself off, and the driver VMs and the demo guest serve throughout.

use stack_tests::*;

#[test]
fn a_guest_corrupting_its_virtqueues_is_contained() {
    let mut m = stack_machine("tests/stacks/rogue-virtio.toml", "");
    // The disk is the demo guest's raw disk, not an ext4 file system.
    m.disk_ext4 = false;
    let disk = m.disks.first().cloned().expect("the stack has a disk");
    let port = m.net_ports[0];
    let run = run_serving_after(&m, &["[guest]"], &["[guest] block self-test", "[rogue] virtio-net: "], || {
        // The demo guest still serves its pages and its disk after the attacks.
        let (status, page) = get(port, "/");
        assert_eq!(status, 200, "GET / from the demo guest");
        let page = String::from_utf8_lossy(&page).into_owned();
        assert!(page.contains("rogue"), "the status page lists the rogue's VMM:\n{page}");
        let data = noise(4096, 11);
        let mut s = connect(port);
        assert_eq!(request(&mut s, "PUT", "/blk/8192", &data).0, 200, "PUT /blk/8192");
        let (status, body) = request(&mut s, "GET", "/blk/8192?count=8", b"");
        assert_eq!(status, 200);
        assert!(body == data, "the demo guest's disk read back differs");
    });
    let console = run.console();
    let attacks: Vec<&str> = console.lines().filter(|l| l.starts_with("[rogue] attack ")).collect();
    for l in &attacks {
        eprintln!("{l}");
    }
    assert!(attacks.len() >= 35, "only {} attacks reported:\n{console}", attacks.len());
    assert_no_line(&run, "NOT CONTAINED");
    assert_line(&run, "[rogue] virtio-rogue: virtio-blk after the attacks: serves (sector written and read back)");
    assert_line(&run, "[rogue] virtio-rogue: virtio-net after the attacks: serves (ARP reply from 10.0.2.2)");
    // The VMM reported the device stops and survived to the VM's own power-off.
    assert_line(&run, "DEVICE_NEEDS_RESET");
    assert_line(&run, "[rogue] VM stopped after");
    assert_line(&run, "the VM powered off (ACPI S5)");
    // Its counts: the malformed block requests failed, the bad frames were dropped.
    let number_before = |prefix: &str, word: &str| -> u64 {
        let line =
            console.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?}:\n{console}"));
        eprintln!("{line}");
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| w.starts_with(word)).unwrap_or_else(|| panic!("{word:?} in {line:?}"));
        words[at - 1].parse().unwrap_or_else(|_| panic!("a number before {word:?} in {line:?}"))
    };
    assert!(number_before("[rogue] virtio: ", "device") >= 15, "too few device stops reported:\n{console}");
    assert!(number_before("[rogue] virtio-blk: ", "failed") >= 10, "too few block requests failed:\n{console}");
    assert!(number_before("[rogue] virtio-net: ", "transmit") >= 6, "too few bad frames dropped:\n{console}");
    // Nobody else noticed: no fault reached dom0, no domain but the VM and its VMM ended,
    // the driver VMs and the demo guest kept going.
    assert_no_line(&run, "[dom0] fault in");
    assert_no_line(&run, "[dom0] destroyed disk");
    assert_no_line(&run, "[dom0] destroyed net");
    assert_no_line(&run, "[dom0] destroyed guest");
    assert_no_line(&run, "blocked DMA");
    assert_no_line(&run, "FATAL");
    assert_line(&run, "[guest] block self-test passed");
    // The demo guest's self-test pattern and the rogue's sector are where they belong.
    let image = std::fs::read(&disk).expect("reading the disk image");
    let mut want = [0u8; 512];
    for s in [0u64, 1000, 2047, 65536, 131071] {
        ipc_spec::block::pattern(s, &mut want);
        assert!(image[(s * 512) as usize..((s + 1) * 512) as usize] == want, "sector {s} lost the pattern");
    }
    let rogue: Vec<u8> = (0..512u64).map(|i| (i.wrapping_mul(31) ^ 100_000) as u8).collect();
    assert!(image[100_000 * 512..100_001 * 512] == rogue[..], "the rogue's valid write is not on the disk");
}

//! The Multiboot2 boot: GRUB from an ISO (`cargo xtask iso`) starts the microvisor with the
//! boot bundle as its module, on the same QEMU machine as the PVH boot, and the whole stack
//! comes up as it does there.

use stack_tests::*;

/// The default machine, booting a GRUB ISO built for it instead of `-kernel`/`-initrd`.
fn iso_machine(name: &str, append: &str) -> Machine {
    let a = artifacts();
    let mut m = machine("");
    let dir = std::env::temp_dir().join(format!("stack-tests-{}-{name}", std::process::id()));
    let iso = xtask::iso::build_iso(&a.microvisor, &a.bundle, append, &dir.join("stack.iso"))
        .unwrap_or_else(|e| panic!("building the GRUB ISO: {e}"));
    m.cdrom = Some(iso);
    m
}

#[test]
fn the_microvisor_image_has_a_header_grub_accepts() {
    let image = std::fs::read(artifacts().microvisor).expect("reading the microvisor image");
    let h = pvh::multiboot2::find_header(&image).expect("no Multiboot2 header in the first 32 KiB");
    assert_eq!(h.offset % 8, 0);
    // GRUB loads the ELF segments at their physical addresses and jumps to the entry tag's
    // address: it must be inside a loaded, executable segment.
    let entry = u64::from(h.entry.expect("no entry address tag"));
    let elf = pvh::elf::ElfImage::parse(&image).expect("the microvisor is not a valid ELF image");
    let seg = elf.segments().iter().find(|s| s.paddr <= entry && entry < s.end()).expect("entry outside the image");
    assert!(seg.flags.execute, "the Multiboot2 entry {entry:#x} is in a non-executable segment");
    assert!(entry < 1 << 32, "the Multiboot2 entry must be reachable in 32-bit mode");
}

#[test]
fn grub_boots_the_whole_stack_by_multiboot2() {
    let m = iso_machine("mb2-stack", "dom0.hello=grub");
    let mut wanted = vec!["[dom0] ready".to_string()];
    wanted.extend(artifacts().stack.domains.iter().map(|d| format!("[{d}] ready")));
    let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
    let run = boot_until(&m, &wanted);
    assert!(matches!(run.ending, Ending::Stopped), "the stack did not come up: {:?}\n{}", run.ending, run.console());
    assert_line(&run, "[microvisor] boot: Multiboot2 from GRUB 2");
    // The command line comes from grub.cfg, without the file name GRUB boots.
    assert_line(&run, "[microvisor] command line: dom0.hello=grub");
    assert_line(&run, "[dom0] dom0 starting: 32 MiB RAM, command line \"hello=grub\"");
    // The RSDP copy from GRUB's ACPI tag leads to the same tables as under PVH.
    assert_line(&run, "IOMMU: 1 VT-d unit(s) at 0xfed90000");
    assert_line(&run, "PCI ECAM 0xb0000000");
    // The memory map is GRUB's (from the BIOS's E820), with the image and bundle reserved.
    assert_line(&run, "memory map entries); microvisor image 0x200000-");
    // The module is the bundle: dom0 finds its images in it.
    assert_line(&run, "[dom0] boot bundle: 5 entries: [(\"dom0\"");
    assert_line(&run, "[dom0] ready (in SVM guest mode)");
    assert_no_line(&run, "FATAL");
}

//! Wrong machine configurations and bad boot bundles get clear messages, not crashes.

use stack_tests::*;

#[test]
fn cpu_without_svm_gets_the_qemu_option_to_use() {
    let mut m = machine("");
    // QEMU's qemu64 model has SVM (without nested paging) unless told otherwise.
    m.cpu = "qemu64,-svm".into();
    let run = boot(&m);
    assert_line(&run, "[microvisor] FATAL: CPU: this CPU has no AMD SVM");
    assert_line(&run, "`-cpu qemu64,+svm,+npt`");
    assert_exit(&run, MachineExit::CpuUnsupported);
}

#[test]
fn cpu_without_nested_paging_gets_the_qemu_option_to_use() {
    let mut m = machine("");
    m.cpu = "qemu64,+svm,-npt".into();
    let run = boot(&m);
    assert_line(&run, "no nested paging");
    assert_line(&run, "the `+npt` is missing");
    assert_exit(&run, MachineExit::CpuUnsupported);
}

#[test]
fn missing_bundle_is_reported() {
    let mut m = machine("");
    m.initrd = None;
    let run = boot(&m);
    assert_line(&run, "[microvisor] FATAL: boot: no boot bundle module: start QEMU with -initrd");
    assert_exit(&run, MachineExit::BadBoot);
}

#[test]
fn truncated_bundle_is_reported_not_a_panic() {
    let bundle = std::fs::read(artifacts().bundle).expect("reading the bundle");
    let truncated = &bundle[..bundle.len() / 2];
    let mut m = machine("");
    m.initrd = Some(temp_file("truncated-bundle.bin", truncated));
    let run = boot(&m);
    assert_line(&run, "[microvisor] FATAL: boot bundle:");
    assert_no_line(&run, "panic");
    assert_exit(&run, MachineExit::BadBoot);
}

#[test]
fn garbage_bundle_is_reported() {
    let mut m = machine("");
    m.initrd = Some(temp_file("garbage-bundle.bin", &[0x5a; 10000]));
    let run = boot(&m);
    assert_line(&run, "[microvisor] FATAL: boot bundle:");
    assert_exit(&run, MachineExit::BadBoot);
}

#[test]
fn bundle_without_dom0_names_the_missing_image() {
    let dom0 = std::fs::read(artifacts().bundle).expect("reading the bundle");
    let other = ipc_spec::bundle::build(&[("not-dom0", &dom0[..4096])]).expect("packing");
    let mut m = machine("");
    m.initrd = Some(temp_file("no-dom0-bundle.bin", &other));
    let run = boot(&m);
    assert_line(&run, "[microvisor] FATAL: boot bundle: no image named \"dom0\"");
    assert_exit(&run, MachineExit::BadBoot);
}

#[test]
fn dom0_image_that_is_not_an_elf_is_reported_by_name() {
    let bad = ipc_spec::bundle::build(&[("dom0", &[0u8; 8192][..])]).expect("packing");
    let mut m = machine("");
    m.initrd = Some(temp_file("bad-dom0-bundle.bin", &bad));
    let run = boot(&m);
    assert_line(&run, "[microvisor] FATAL: building dom0: image:");
    assert_exit(&run, MachineExit::BadBoot);
}

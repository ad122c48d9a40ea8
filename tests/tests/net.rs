//! VT-d protected passthrough of a network device: the net driver VM drives a virtio-net
//! device on QEMU's user network and proves frames flow both ways (an ARP request to the
//! gateway, the reply received by DMA through the IOMMU and announced by an interrupt
//! through interrupt remapping).

use stack_tests::*;

#[test]
fn the_net_driver_vm_brings_up_virtio_net_and_gets_an_arp_reply_through_the_iommu() {
    let m = stack_machine("tests/stacks/net.toml", "");
    assert_eq!(m.net_ports.len(), 1, "the stack assigns one virtio-net device");
    assert_ne!(m.net_ports[0], 0);
    let args = m.args().join(" ");
    assert!(
        args.contains(&format!("user,id=net0,hostfwd=tcp:127.0.0.1:{}-:80", m.net_ports[0])),
        "no user network with the port forwarded: {args}"
    );
    assert!(args.contains("virtio-net-pci,netdev=net0,disable-legacy=on,iommu_platform=on"), "{args}");
    let run = boot_until(&m, &["[net] ready"]);
    assert!(matches!(run.ending, Ending::Stopped), "ended with {:?}:\n{}", run.ending, run.console());
    assert_line(&run, "[microvisor] iommu: VT-d at 0xfed90000 on");
    assert_line(&run, "[microvisor] iommu: 00:01.0 assigned to domain");
    assert_line(&run, "[dom0] assigned virtio-net (1af4:1041) to net");
    assert_line(&run, "[net] device 00:01.0 vendor 1af4 device 1041");
    // QEMU's default MAC; the link is up; the device runs behind the IOMMU.
    assert_line(&run, "[net] virtio-net: MAC 52:54:00:12:34:56, link up, VIRTIO_F_ACCESS_PLATFORM negotiated");
    // A frame went out, and the gateway's answer came in by DMA...
    assert_line(&run, "[net] ARP reply from 10.0.2.2 (52:55:0a:00:02:02), received by DMA through the IOMMU");
    // ...announced by the device's interrupt, through interrupt remapping.
    assert_line(&run, "[net] device interrupt arrived as a notification (remapping entry");
    assert_no_line(&run, "FATAL");
    assert_no_line(&run, "blocked DMA");
    assert_no_line(&run, "[dom0] fault in net");
}

#[test]
fn a_stack_without_a_network_device_gets_no_nic() {
    let m = stack_machine("tests/stacks/ipc.toml", "");
    assert!(m.net_ports.is_empty());
    let args = m.args().join(" ");
    assert!(args.contains("-nic none"), "{args}");
    assert!(!args.contains("-netdev") && !args.contains("virtio-net-pci"), "{args}");
}

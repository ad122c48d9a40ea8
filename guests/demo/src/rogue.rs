//! `rogue=net`: the demo guest turned hostile to the net driver VM, for the end-to-end test
//! that a guest breaking the net channel protocol cannot stop the driver serving others. It
//! puts malformed descriptors and a frame with another guest's source MAC on its TX ring,
//! reads back the drop counters the driver VM publishes, then corrupts the ring's index.

use domain_rt::shared::Region;
use domain_rt::{hypercall, println};
use ipc_spec::net::{
    Descriptor, Direction, DropCounters, EthernetHeader, MacAddr, NetDropReason, NetHeader, TxProducer, ETHERTYPE_IPV4,
};
use ipc_spec::ring::{SharedMem, PRODUCER_INDEX_OFFSET};

/// Waits `ms` milliseconds on notification `wait` (its timer, or an earlier doorbell).
fn pause(wait: u64, ms: u64) {
    let _ = hypercall::timer_set(wait, ms * 1_000_000, 1 << 2);
    let _ = hypercall::wait(wait);
}

pub fn break_the_net_channel(name: &str, region: Region, signal: u64, wait: u64) {
    let start = hypercall::clock_ns();
    let layout = loop {
        match NetHeader::check(&region) {
            Ok((_, layout)) => break layout,
            Err(_) if hypercall::clock_ns().saturating_sub(start) < 5_000_000_000 => pause(wait, 10),
            Err(e) => return println!("rogue: net channel \"{name}\": {e}"),
        }
    };
    let Ok(mut ring) = TxProducer::attach(&region, layout.tx_ring_offset(), layout.ring_capacity()) else {
        return println!("rogue: cannot attach to my TX ring");
    };
    // Entry i uses slot i (mod the slot count); the driver accepts nothing else.
    let slot = |i: u32| layout.slot_for_index(i);
    // A well-formed frame claiming another guest's source address.
    let mut frame = [0u8; 60];
    let spoofed = EthernetHeader { dst: MacAddr::BROADCAST, src: MacAddr::local(99), ethertype: ETHERTYPE_IPV4 };
    frame[..14].copy_from_slice(&spoofed.encode());
    if let Some(r) = layout.slot_range(Direction::Tx, slot(3)) {
        region.write_bytes(r.start, &frame);
    }
    let bad = [
        Descriptor { slot: 99_999, len: 60 },    // a slot outside the TX half
        Descriptor { slot: slot(1), len: 9000 }, // longer than any frame
        Descriptor { slot: slot(2), len: 3 },    // shorter than an Ethernet header
        Descriptor { slot: slot(3), len: 60 },   // someone else's source MAC
    ];
    for d in bad {
        if ring.push(&d.encode()).is_err() {
            return println!("rogue: my TX ring is full");
        }
    }
    let _ = hypercall::signal(signal, 1);
    pause(wait, 300);
    let c = DropCounters::read(&region);
    println!(
        "rogue: the net driver VM dropped my bad frames: bad slot {}, too long {}, too short {}, bad source {}",
        c.get(NetDropReason::BadSlot),
        c.get(NetDropReason::TooLong),
        c.get(NetDropReason::TooShort),
        c.get(NetDropReason::BadSource)
    );
    // Now an impossible producer index: the ring is broken for good.
    region.write_u32(layout.tx_ring_offset() + PRODUCER_INDEX_OFFSET, 0xdead_beef);
    let _ = hypercall::signal(signal, 1);
    pause(wait, 300);
    let c = DropCounters::read(&region);
    println!("rogue: corrupted my TX ring index: bad ring {}", c.get(NetDropReason::BadRing));
}

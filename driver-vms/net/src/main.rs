//! The net driver VM. It owns one virtio-net PCI function by passthrough (its DMA confined
//! by the IOMMU to this VM's memory), drives it with the virtio-drivers crate, and serves
//! guests over net channels (`ipc_spec::net`), switching frames between them and the device
//! by destination MAC (`net_driver::switch`). It is untrusted: a crash or a hostile act here
//! must not hurt the microvisor or any other domain; and it trusts no guest.
//!
//! At start it proves the device works end to end: it asks the network's gateway for its
//! MAC address (an ARP probe, which claims no IP address) and waits for the answer, which
//! the device writes by DMA through the IOMMU and announces with an interrupt that arrives
//! through interrupt remapping as one of our notifications.
//!
//! Command line (from dom0): `dev=<slot>` (the device capability), `irq=<slot>` (the
//! notification its interrupts are routed to), and per net channel
//! `chan.<name>.kind=net chan.<name>.region=<gpa>:<bytes> chan.<name>.signal=<slot>
//! chan.<name>.wait=<slot>` (`net_driver::args`); with a hang watchdog in the manifest,
//! `heartbeat=<slot> heartbeat_ms=<period>` (`domain_rt::heartbeat`; beaten from `serve`);
//! from the manifest's `args`, `idle_poll_us=<N>` (the longest poll before sleeping, default
//! 200; 0: none) and `rogue=...` (`net_driver::crash`).
//!
//! Waiting: the device's notification and every channel's doorbell (dom0 gives each channel
//! its own) are bound to this vCPU as one virtual interrupt; the serve loop halts until any
//! of them is signalled, then looks at everything (the device's receive queue and every
//! guest's TX ring). Before it halts while every guest sleeps, it polls for a while with the
//! device's receive interrupts off (`net_driver::idle_poll`). Transmit completions are
//! polled (reaped before each transmit and once per round).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
mod driver {
    extern crate alloc;

    use alloc::boxed::Box;
    use alloc::vec::Vec;
    use core::fmt;

    use domain_rt::channels;
    use domain_rt::heartbeat::Heartbeat;
    use domain_rt::hypercall;
    use domain_rt::shared::Region;
    use domain_rt::{println, BootInfo};
    use ipc_spec::net::{
        DropCounters, FrameReceiver, FrameSender, MacAddr, NetDropReason, NetHeader, MAX_FRAME_LEN, MAX_MTU,
    };
    use net_driver::crash::{CrashAfter, Way};
    use net_driver::idle_poll::{self, IdlePoll};
    use net_driver::switch::{Port, Switch, MAX_GUESTS};
    use net_driver::{arp, drops};
    use virtio_drivers::device::net::VirtIONetRaw;
    use virtio_drivers::transport::Transport as _;
    use virtio_pci::net::{RxQueue, SendError, TxQueue};
    use virtio_pci::{DriverHal, QueueKicker, Transport};

    domain_rt::domain_main!(main);

    /// Descriptors per virtqueue.
    const QUEUE_SIZE: usize = 16;
    /// Receive buffers kept posted to the device: the whole queue. (8 were measured no
    /// better while guests had an 8 KiB TCP window; with 16 KiB a burst from the host is
    /// 11 frames, and the frames beyond 8 waited or were lost until the driver's next round
    /// posted buffers again: `bench net` host to guest went from 5 to 14 MB/s.)
    const RX_BUFFERS: usize = QUEUE_SIZE;
    /// Transmit buffers: frames handed to the device and not yet completed. While all are
    /// with the device, guests' frames wait in their rings (see `serve`).
    const TX_BUFFERS: usize = QUEUE_SIZE;
    /// QEMU user networking's gateway.
    const GATEWAY_IP: [u8; 4] = [10, 0, 2, 2];
    /// virtio-net configuration space: `status` after the 6-byte MAC; bit 0 is link up.
    const CONFIG_STATUS: usize = 6;
    const STATUS_LINK_UP: u16 = 1;
    /// The receive and transmit virtqueues' indexes.
    const RECEIVE_QUEUE: u16 = 0;
    const TRANSMIT_QUEUE: u16 = 1;
    /// The timer bit on the interrupt notification that ends a wait for a reply.
    const TIMEOUT_BIT: u64 = 1 << 62;
    /// How long to wait for an ARP reply before asking again, and how often to ask.
    const ARP_WAIT_NS: u64 = 1_000_000_000;
    const ARP_TRIES: u32 = 5;
    /// The MTU every channel gets.
    const MTU: u32 = MAX_MTU;
    /// Frames taken from one source (the device, or one guest's TX ring) per round, so a
    /// busy source cannot starve the others; a source with more left makes the loop go round
    /// again without waiting.
    const BUDGET: usize = 64;
    /// Without device interrupts: how often to look at the device's receive queue.
    const POLL_NS: u64 = 1_000_000;
    /// With device interrupts: how often the loop looks at the device anyway (the watchdog).
    const WATCHDOG_NS: u64 = 50_000_000;

    /// What wakes the serving loop besides doorbells and device interrupts: the timer
    /// notification `slot`, bound to [`domain_rt::irq::TIMER_VECTOR`] so the loop sees it
    /// fire without a hypercall, re-armed for `ns` each time it fires.
    ///
    /// Without device interrupts it is how frames from the network are found at all. With
    /// them it is a watchdog: a lost device interrupt would otherwise stop the receive path
    /// for good (with VIRTIO_RING_F_EVENT_IDX the device does not interrupt again until the
    /// driver has taken the frame it interrupted for). Frames found by the watchdog alone
    /// are counted as missed interrupts and reported (the 1st, 2nd, 4th, 8th...): the path
    /// recovers, visibly.
    #[derive(Clone, Copy)]
    struct Wakeup {
        slot: u64,
        ns: u64,
        watchdog: bool,
    }

    type Net = VirtIONetRaw<DriverHal, Transport, QUEUE_SIZE>;

    /// A MAC address as `52:54:00:12:34:56`.
    struct Mac([u8; 6]);

    impl fmt::Display for Mac {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let m = self.0;
            write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
        }
    }

    /// The receive buffers kept posted to the device.
    type Rx = RxQueue<RX_BUFFERS>;

    /// The transmit buffers. A failed reap is reported (and remembered: `.1`) and then
    /// transmit completions stop: the queue fills and later frames are dropped.
    struct Tx(TxQueue<TX_BUFFERS>, bool);

    impl Tx {
        fn new() -> Self {
            Self(TxQueue::new(), false)
        }

        /// Take back every buffer the device is done with.
        fn reap(&mut self, net: &mut Net) {
            if self.1 {
                return; // completions stopped (or wedged on purpose: `rogue=wedge-after`)
            }
            if let Err(e) = self.0.reap(net) {
                println!("transmit: {e}");
                self.1 = true;
            }
        }

        /// Every buffer is with the device even after taking back the completed ones, and
        /// they will come back (after a failed reap they never do: frames are dropped).
        fn full(&mut self, net: &mut Net) -> bool {
            self.0.is_full() && !self.1 && {
                self.reap(net);
                self.0.is_full() && !self.1
            }
        }

        /// Hand `frame` to the device without waiting for it. [`NetDropReason::DeviceError`]
        /// (the frame is dropped) if every buffer is still with the device or the device
        /// refuses it.
        fn send(&mut self, net: &mut Net, frame: &[u8]) -> Result<(), NetDropReason> {
            self.reap(net);
            self.0.send(net, frame).map_err(|e| match e {
                SendError::TooLong => NetDropReason::TooLong,
                SendError::Busy | SendError::Device(_) => NetDropReason::DeviceError,
            })
        }
    }

    /// Ask the gateway for its MAC until it answers: returns its MAC and how many device
    /// interrupts arrived meanwhile (`None`: polled, no interrupts routed).
    fn arp_gateway(net: &mut Net, rx: &mut Rx, tx: &mut Tx, irq: Option<u64>) -> Result<([u8; 6], u32), &'static str> {
        let mac = net.mac_address();
        let request = arp::probe(mac, GATEWAY_IP);
        let mut interrupts = 0;
        for _ in 0..ARP_TRIES {
            if tx.send(net, &request).is_err() {
                return Err("sending the ARP request failed");
            }
            let deadline = hypercall::clock_ns() + ARP_WAIT_NS;
            if let Some(irq) = irq {
                let _ = hypercall::timer_set(irq, ARP_WAIT_NS, TIMEOUT_BIT);
            }
            loop {
                tx.reap(net);
                let mut gateway = None;
                while let Some(r) = rx.next(net, |frame| gateway = gateway.or(arp::reply_from(frame, GATEWAY_IP, mac)))
                {
                    r.map_err(|_| "receiving a frame failed")?;
                }
                if let Some(g) = gateway {
                    if let Some(irq) = irq {
                        // The reply may have been found before its interrupt was taken: it
                        // is pending (or on its way) on the notification.
                        if interrupts == 0 {
                            let _ = hypercall::timer_set(irq, ARP_WAIT_NS, TIMEOUT_BIT);
                            if hypercall::wait(irq).is_ok_and(|bits| bits & !TIMEOUT_BIT != 0) {
                                interrupts += 1;
                            }
                        }
                        let _ = hypercall::timer_set(irq, 0, 0);
                        let _ = hypercall::poll(irq);
                    }
                    return Ok((g, interrupts));
                }
                match irq {
                    Some(irq) => {
                        let bits = hypercall::wait(irq).map_err(|_| "waiting for the device failed")?;
                        if bits & !TIMEOUT_BIT != 0 {
                            interrupts += 1;
                        }
                        if bits & TIMEOUT_BIT != 0 {
                            break;
                        }
                    }
                    None if hypercall::clock_ns() >= deadline => break,
                    None => hypercall::yield_now(),
                }
            }
        }
        Err("no ARP reply from the gateway")
    }

    /// One guest's net channel (guest port `n` is `guests[n]`).
    struct Guest {
        name: &'static str,
        region: &'static Region,
        signal: u64,
        /// The guest's TX ring (we receive) and RX ring (we send).
        tx: FrameReceiver<'static, Region>,
        rx: FrameSender<'static, Region>,
        /// Our count of this channel's drops, published to its header.
        drops: DropCounters,
        /// Drops since the last publish.
        dirty: bool,
        /// Frames put on its RX ring since the last doorbell.
        to_signal: bool,
        /// Whether its TX ring had more than a round's budget.
        more: bool,
    }

    impl Guest {
        fn drop(&mut self, why: NetDropReason) {
            self.drops.record(why);
            self.dirty = true;
        }
    }

    /// Set up every net channel on the command line: header, rings, switch port, doorbell.
    /// A channel an earlier incarnation of this VM served (dom0 maps the same region again
    /// after a restart) is re-attached as it is, as the next incarnation
    /// (`ipc_spec::net`, "Restarts"). Guest `n` (the `n`th net channel on the command line,
    /// an order dom0 keeps across restarts) always gets the MAC `MacAddr::local(n)`.
    fn attach_guests(info: &BootInfo, link_up: bool, switch: &mut Switch) -> Vec<Option<Guest>> {
        let mut guests: Vec<Option<Guest>> = (0..MAX_GUESTS).map(|_| None).collect();
        for (n, name) in channels::channel_names(info.cmdline, "net").enumerate() {
            if n >= MAX_GUESTS {
                println!("net channel \"{name}\": more than {MAX_GUESTS} net channels; not served");
                continue;
            }
            let a = match channels::channel(info.cmdline, name) {
                Ok(a) => a,
                Err(e) => {
                    println!("net channel \"{name}\": {e}; not served");
                    continue;
                }
            };
            // SAFETY: dom0 mapped this region into our stage-2 for this channel at the address
            // and size it put on our command line; nothing else in this VM uses it (each name
            // is taken once). Leaked: the channel is served for the rest of our life.
            let region: &'static Region = Box::leak(Box::new(unsafe { a.region() }));
            let mac = MacAddr::local(n as u32);
            let attached = match (NetHeader { mac, mtu: MTU, link_up }).attach_driver(region) {
                Ok(a) => a,
                Err(e) => {
                    println!("net channel \"{name}\": {e}; not served");
                    continue;
                }
            };
            if !switch.attach(n, mac) {
                println!("net channel \"{name}\": cannot attach {mac} to the switch; not served");
                continue;
            }
            if let Err(e) = hypercall::bind(a.wait, domain_rt::irq::VIRQ_VECTOR) {
                println!("net channel \"{name}\": binding the doorbell failed: {e}");
            }
            let ring = ipc_spec::net::Layout::new(a.len).map_or(0, |l| l.ring_capacity());
            println!(
                "serving net channel \"{name}\" as port {n}: MAC {mac}, MTU {MTU}, {ring} frames per ring ({} KiB shared), incarnation {}{}",
                region.len_kib(),
                attached.incarnation,
                if attached.fresh { "" } else { " (re-attached to the rings as they were)" }
            );
            // The guest waits for this doorbell before it reads the header.
            let _ = hypercall::signal(a.signal, 1);
            guests[n] = Some(Guest {
                name: a.name,
                region,
                signal: a.signal,
                tx: attached.tx,
                rx: attached.rx,
                drops: attached.drops,
                dirty: false,
                to_signal: false,
                more: false,
            });
        }
        guests
    }

    /// The guest broke the protocol (a corrupt ring): stop serving it, the others go on.
    fn give_up(guests: &mut [Option<Guest>], switch: &mut Switch, n: usize) {
        if let Some(mut g) = guests.get_mut(n).and_then(Option::take) {
            g.drop(NetDropReason::BadRing);
            g.drops.publish(g.region);
            println!("net channel \"{}\": {}; no longer served", g.name, NetDropReason::BadRing);
        }
        switch.detach(n);
    }

    /// Put `frame` on the RX rings of the guests in `to` (all but `from`, which the switch
    /// never includes); drops are counted on the receiving guest's channel.
    fn deliver(guests: &mut [Option<Guest>], switch: &mut Switch, to: impl Iterator<Item = usize>, frame: &[u8]) {
        for m in to {
            let Some(g) = guests.get_mut(m).and_then(Option::as_mut) else { continue };
            match g.rx.send(frame) {
                Ok(()) => g.to_signal = true,
                Err(NetDropReason::BadRing) => give_up(guests, switch, m),
                Err(why) => g.drop(why),
            }
        }
    }

    /// `rogue=crash-after=<n>`, `hang-after=<n>` or `wedge-after=<n>`: count a frame moved;
    /// crash or hang when it is time (mid-round: frames taken and not yet passed on, guests
    /// not yet rung), or wedge the transmit path (`tx` takes no completion again).
    fn maybe_crash(crash: &mut Option<CrashAfter>, tx: &mut Tx) {
        let Some(c) = crash.as_mut() else { return };
        if !c.frame() {
            return;
        }
        if c.way == Way::Wedge {
            println!(
                "wedging my transmit path after {} frames, at {} ns (rogue=wedge-after)",
                c.frames,
                hypercall::clock_ns()
            );
            tx.1 = true;
            *crash = None;
            return;
        }
        if c.way == Way::Hang {
            println!("hanging after {} frames, at {} ns (rogue=hang-after)", c.frames, hypercall::clock_ns());
            // Interrupts are off in the serving loop: nothing runs here again, nothing beats.
            loop {
                core::hint::spin_loop();
            }
        }
        println!(
            "crashing after {} frames by {}, at {} ns (rogue=crash-after)",
            c.frames,
            c.way.name(),
            hypercall::clock_ns()
        );
        match c.way {
            // SAFETY: deliberately reading memory this VM does not have: the microvisor
            // stops it with a stage-2 fault and tells dom0.
            Way::Stage2 => unsafe {
                core::ptr::read_volatile(0x1000_0000 as *const u64);
            },
            // SAFETY: deliberately makes every exception unhandleable, so INT3 escalates to a
            // triple fault, which the microvisor reports to dom0.
            Way::TripleFault => unsafe {
                let null: [u8; 10] = [0; 10];
                core::arch::asm!("lidt [{}]", "int3", in(reg) &null);
            },
            // (Hang and Wedge were handled above.)
            Way::Exit | Way::Hang | Way::Wedge => hypercall::domain_exit(99),
        }
    }

    /// Serve the device and the guests until the device fails.
    ///
    /// `wakeup`: the timer that wakes the loop when nothing else does ([`Wakeup`]); `crash`:
    /// when to crash or hang on purpose (`rogue=crash-after=<n>`, `hang-after=<n>`);
    /// `heartbeat`: dom0's hang watchdog, if the manifest asks for one.
    ///
    /// The heartbeat rides on the same timer: with one, the timer fires at least every half
    /// beat interval (every 6.25 ms for a 50 ms watchdog), beats are sent from rounds the
    /// timer started (paced by [`Heartbeat::beat`]: one clock read per such round, none on
    /// the others), and only every `wakeup.ns`'th worth of them is a device watchdog round.
    /// A beat says the loop turns and the device is keeping up with transmits (it gives
    /// back buffers, or holds none): see `domain_rt::heartbeat`. A busy loop (work left
    /// over: it yields instead of halting) lets the timer's interrupt in after each yield,
    /// so it beats as an idle one does.
    #[allow(clippy::too_many_arguments)] // the device's three parts, the guests, four options
    fn serve(
        net: &mut Net,
        rx: &mut Rx,
        tx: &mut Tx,
        guests: &mut [Option<Guest>],
        switch: &mut Switch,
        kicker: &QueueKicker,
        wakeup: Option<Wakeup>,
        mut crash: Option<CrashAfter>,
        mut heartbeat: Option<Heartbeat>,
        mut idle_poll: IdlePoll,
    ) -> u64 {
        let mut frame = [0u8; MAX_FRAME_LEN];
        let mut first_reported = false;
        let mut counts = domain_rt::irq::Counts::now();
        // The timer's period, and how many of its firings make one of `wakeup`'s.
        let beat_every = heartbeat.as_ref().map(Heartbeat::every_ns);
        let tick_ns = |w: Wakeup| beat_every.map_or(w.ns, |b| w.ns.min(b / 2).max(1));
        let per_wakeup = |w: Wakeup| w.ns.div_ceil(tick_ns(w)).max(1);
        if let Some(w) = wakeup {
            let _ = hypercall::timer_set(w.slot, tick_ns(w), 1);
        }
        let mut ticks = 0u64;
        let mut missed_interrupts = 0u64;
        // Polling before sleeping (`net_driver::idle_poll`) switches the device's receive
        // interrupts off while it polls: only with them, and only if it polls at all.
        let rx_notes = wakeup
            .filter(|w| w.watchdog && idle_poll.max_ns() > 0)
            .and_then(|_| kicker.used_notifications(RECEIVE_QUEUE));
        // Whether the last idle period ended in a poll, with the device's interrupts off:
        // frames found after it came without an interrupt by design, not late. (A poll that
        // found nothing turned them on again before the sleep.)
        let mut polled = false;
        loop {
            // What woke us since the last round: the timer, and anything else?
            let now = domain_rt::irq::Counts::now();
            let arrived = counts.until(now);
            counts = now;
            let mut wakeup_round = false;
            if let Some(w) = wakeup.filter(|_| arrived.timer) {
                let _ = hypercall::timer_set(w.slot, tick_ns(w), 1);
                ticks += 1;
                wakeup_round = ticks.is_multiple_of(per_wakeup(w));
            }
            let watchdog = wakeup.filter(|w| w.watchdog && wakeup_round);
            if watchdog.is_some() {
                // Make sure the device has seen every buffer (see `Kicker`).
                kicker.kick(RECEIVE_QUEUE);
                kicker.kick(TRANSMIT_QUEUE);
            }
            // The device: frames from the network go to the guests.
            let mut device_more = false;
            let mut received = 0;
            for i in 0..=BUDGET {
                if i == BUDGET {
                    device_more = true;
                    break;
                }
                let r = rx.next(net, |f| {
                    if let Ok(to) = switch.route(Port::Uplink, f) {
                        deliver(guests, switch, to.guests(), f);
                    }
                });
                match r {
                    None => break,
                    Some(Ok(())) => {
                        received += 1;
                        maybe_crash(&mut crash, tx);
                    }
                    Some(Err(e)) => {
                        println!("receiving: {e}");
                        return 7;
                    }
                }
            }
            // Frames no device interrupt (nor anything but the watchdog) told us about. This
            // loop runs with interrupts off: the frames' interrupt may have been raised
            // and offered meanwhile. Let it in first (the next round then looks again);
            // only an interrupt still missing now was late or lost.
            let after_poll = core::mem::take(&mut polled);
            let late = watchdog.is_some() && !after_poll && arrived.timer_only() && received > 0 && {
                domain_rt::irq::let_offered_in();
                !counts.until(domain_rt::irq::Counts::now()).others
            };
            if late {
                missed_interrupts += 1;
                if missed_interrupts.is_power_of_two() {
                    println!(
                        "device interrupts: {missed_interrupts} time(s) so far the {} ms watchdog found frames before their interrupt (late or lost)",
                        WATCHDOG_NS / 1_000_000
                    );
                }
            }
            // Buffers a failed completion left unposted.
            if let Err(e) = rx.post(net) {
                println!("posting receive buffers: {e}");
                return 5;
            }

            // The guests: frames from each go to the device and/or the other guests.
            let mut tx_full = false;
            for n in 0..guests.len() {
                for i in 0..=BUDGET {
                    let Some(g) = guests[n].as_mut() else { break };
                    // Every transmit buffer with the device: leave the guest's frames in its
                    // ring and come back after a yield. (Taken now, a frame for the uplink
                    // would be dropped, and TCP waits for a retransmission timeout.)
                    tx_full |= i < BUDGET && tx.full(net);
                    g.more = i == BUDGET || tx_full;
                    if g.more {
                        break;
                    }
                    let len = match g.tx.recv(&mut frame) {
                        Ok(Some(len)) => len,
                        Ok(None) => break,
                        Err(NetDropReason::BadRing) => {
                            give_up(guests, switch, n);
                            break;
                        }
                        Err(why) => {
                            g.drop(why);
                            continue;
                        }
                    };
                    let Some(f) = frame.get(..len) else { continue };
                    let to = match switch.route(Port::Guest(n), f) {
                        Ok(to) => to,
                        Err(why) => {
                            g.drop(drops::reason(why));
                            continue;
                        }
                    };
                    if to.uplink() {
                        if let Err(why) = tx.send(net, f) {
                            g.drop(why);
                        }
                    }
                    deliver(guests, switch, to.guests(), f);
                    maybe_crash(&mut crash, tx);
                }
            }
            tx.reap(net);
            if let Some(h) = heartbeat.as_mut().filter(|_| arrived.timer) {
                let (held, given_back) = tx.0.progress();
                h.beat(held > 0, given_back);
            }
            // Make sure the device saw the receive buffers this round posted (see `Kicker`):
            // a device out of them waits for a kick, and nothing else would come.
            if rx.take_posted() {
                kicker.kick(RECEIVE_QUEUE);
            }
            // And the frames this round sent: virtio-drivers' own kick can be lost the same
            // way, and then the frame waits for the next kick or the watchdog's (50 ms). On
            // a TCP transfer to a guest that frame is the guest's ACK, and the sender waits
            // for it. (Also when guests wait for transmit buffers: rare, only when the
            // device has all of them.)
            if tx.0.take_sent() || tx_full {
                kicker.kick(TRANSMIT_QUEUE);
            }

            // One doorbell per guest that got frames, and the drop counters that moved. The
            // last one is held back: if the loop goes idle now it is rung by the halt
            // itself (below).
            let mut more = device_more;
            let mut ring = None;
            for g in guests.iter_mut().flatten() {
                if g.to_signal && !first_reported {
                    // With the crash lines, gives the time a restart costs the guests.
                    println!("first frames for a guest at {} ns", hypercall::clock_ns());
                    first_reported = true;
                }
                // Unless the guest said it will look at its RX ring before it waits
                // (`ipc_spec::net`, "Doorbells": the fence and the load are in
                // `wants_doorbell`).
                if core::mem::take(&mut g.to_signal) && g.rx.wants_doorbell() {
                    if let Some(earlier) = ring.replace(g.signal) {
                        let _ = hypercall::signal(earlier, 1);
                    }
                }
                if core::mem::take(&mut g.dirty) {
                    g.drops.publish(g.region);
                }
                more |= g.more;
            }
            if more {
                if let Some(signal) = ring {
                    let _ = hypercall::signal(signal, 1);
                }
                // Work left over: go round again, letting others run first (and the
                // timer's interrupt in, if it fired: the heartbeat rides on it).
                hypercall::yield_now();
                domain_rt::irq::let_offered_in();
            } else if let Some(signal) = ring {
                // Ring and halt in one hypercall (`SignalHalt`): one exit per idle period
                // instead of two, the round that took a frame from the device and gave it
                // to a guest (every small request's). Returns at once if anything arrived
                // during this round: it ran with interrupts off, so that is pending or
                // offered, and the microvisor does not let us sleep then
                // (`domain_rt::irq::signal_and_wait_for_virq`).
                domain_rt::irq::signal_and_wait_for_virq(signal, counts.all);
            } else {
                // Idle (nothing to ring, nothing left over): poll first while every guest
                // sleeps, then sleep. Both return at once if anything arrived during this
                // round.
                match rx_notes.as_ref().filter(|_| guests.iter().flatten().all(|g| g.rx.wants_doorbell())) {
                    Some(notes) => {
                        let start = hypercall::clock_ns();
                        polled = poll_before_sleep(notes, guests, counts.all, start + idle_poll.window_ns());
                        if !polled {
                            domain_rt::irq::wait_for_virq(counts.all);
                        }
                        idle_poll.idle_ended(hypercall::clock_ns().saturating_sub(start));
                    }
                    None => {
                        domain_rt::irq::wait_for_virq(counts.all);
                    }
                }
            }
        }
    }

    /// Before sleeping, while every guest sleeps: look at the device's receive queue, the
    /// guests' TX rings and our own interrupts until the clock reads `deadline`, with the
    /// device's receive interrupts off (`net_driver::idle_poll` says why). `true` if
    /// anything arrived; then the loop goes round instead of sleeping.
    fn poll_before_sleep(
        notes: &virtio_pci::UsedNotifications,
        guests: &mut [Option<Guest>],
        seen: u64,
        deadline: u64,
    ) -> bool {
        let last = notes.pause();
        let found = loop {
            if notes.arrived(last) {
                break true;
            }
            if guests.iter_mut().flatten().any(|g| g.tx.pending().map_or(true, |n| n > 0)) {
                break true;
            }
            domain_rt::irq::let_offered_in();
            if domain_rt::irq::count() != seen {
                break true;
            }
            if hypercall::clock_ns() >= deadline {
                break false;
            }
            core::hint::spin_loop();
        };
        // Interrupts back on, then one more look: a frame that arrived while they were
        // off raises none.
        notes.resume(last) || found
    }

    fn main(info: &BootInfo) -> u64 {
        let (dev, transport) = match virtio_pci::open_from_cmdline(info) {
            Ok(opened) => opened,
            Err(e) => {
                println!("{e}");
                return e.status();
            }
        };
        // The link state, before the driver takes the transport (the field is there when
        // the device offers VIRTIO_NET_F_STATUS, as QEMU's does).
        let link_up = transport.read_config_space::<u16>(CONFIG_STATUS).map_or(true, |s| s & STATUS_LINK_UP != 0);
        let kicker = transport.kicker();
        let mut net = match Net::new(transport) {
            Ok(n) => n,
            Err(e) => {
                println!("virtio-net: {e}");
                return 4;
            }
        };
        println!(
            "virtio-net: MAC {}, link {}, VIRTIO_F_ACCESS_PLATFORM negotiated",
            Mac(net.mac_address()),
            if link_up { "up" } else { "down" }
        );

        // The receive queue (0) interrupts through a remapping entry to our notification;
        // transmit completions are polled.
        let irq = info.slot("irq");
        let routed = irq.and_then(|irq| match virtio_pci::irq::route_queues(&dev.config, irq, &[RECEIVE_QUEUE]) {
            Ok(handle) => Some((irq, handle)),
            Err(e) => {
                println!("device interrupts: {e}; polling instead");
                None
            }
        });
        if let Some((irq, _)) = routed {
            let _ = hypercall::poll(irq);
        }

        let mut rx = Rx::new();
        let mut tx = Tx::new();
        if let Err(e) = rx.post(&mut net) {
            println!("posting receive buffers: {e}");
            return 5;
        }
        match arp_gateway(&mut net, &mut rx, &mut tx, routed.map(|(irq, _)| irq)) {
            Ok((gateway, interrupts)) => {
                let [a, b, c, d] = GATEWAY_IP;
                println!("ARP reply from {a}.{b}.{c}.{d} ({}), received by DMA through the IOMMU", Mac(gateway));
                if let Some((_, handle)) = routed {
                    if interrupts > 0 {
                        println!("device interrupt arrived as a notification (remapping entry {handle})");
                    } else {
                        println!("device interrupts: none arrived; the reply was found by polling");
                    }
                }
            }
            Err(e) => {
                println!("{e}");
                return 6;
            }
        }

        // From here on every notification we wait for arrives as the one virtual interrupt.
        let mut switch = Switch::new();
        let mut guests = attach_guests(info, link_up, &mut switch);
        let timer = info.slot("timer").filter(|&t| hypercall::bind(t, domain_rt::irq::TIMER_VECTOR).is_ok());
        let wakeup = match routed {
            Some((irq, _)) => {
                if let Err(e) = hypercall::bind(irq, domain_rt::irq::VIRQ_VECTOR) {
                    println!("device interrupts: binding the notification failed: {e}");
                }
                if timer.is_none() {
                    println!("no timer: no watchdog for lost device interrupts");
                }
                timer.map(|slot| Wakeup { slot, ns: WATCHDOG_NS, watchdog: true })
            }
            None => match timer {
                Some(slot) => {
                    println!("device interrupts: none; polling the device every {} us", POLL_NS / 1000);
                    Some(Wakeup { slot, ns: POLL_NS, watchdog: false })
                }
                None => {
                    println!("device interrupts: none; frames from the network wait for a guest's doorbell");
                    None
                }
            },
        };
        if guests.iter().all(Option::is_none) {
            println!("no net channel on my command line: frames from the network are dropped");
        }
        let crash = info.arg("rogue").and_then(|r| CrashAfter::parse(r, hypercall::clock_ns()));
        if let Some(c) = crash {
            println!("will fail after {} frames by {} (rogue={})", c.at, c.way.name(), info.arg("rogue").unwrap_or(""));
        }
        // dom0's hang watchdog (manifest `watchdog_ms`): beats ride on the timer.
        let heartbeat = Heartbeat::from_cmdline(info);
        if heartbeat.is_some() && wakeup.is_none() {
            println!("heartbeat: no timer to beat by; dom0's watchdog will call me hung when idle");
        }
        // `idle_poll_us=N`: the longest poll before sleeping (`net_driver::idle_poll`); 0: none.
        let arg = info.arg("idle_poll_us");
        let idle_poll_max_ns = idle_poll::max_ns_from_arg(arg).unwrap_or_else(|(ns, why)| {
            println!("idle_poll_us={}: {why}; polling up to {} us", arg.unwrap_or(""), ns / 1000);
            ns
        });
        if routed.is_some() {
            match idle_poll_max_ns {
                0 => println!("idle polling: off (idle_poll_us=0)"),
                ns => println!("idle polling: up to {} us before sleeping while every guest sleeps", ns / 1000),
            }
        }
        println!("ready");
        let idle_poll = IdlePoll::new(idle_poll_max_ns);
        serve(&mut net, &mut rx, &mut tx, &mut guests, &mut switch, &kicker, wakeup, crash, heartbeat, idle_poll)
    }
}

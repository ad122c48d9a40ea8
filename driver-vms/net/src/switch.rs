//! The net driver VM's Ethernet switch: which ports a frame goes to.
//!
//! Ports are the device (the uplink, toward the virtio-net NIC) and one port per guest
//! channel. The driver VM gives every guest its MAC address (it writes it into the channel's
//! header), so the switch needs no learning: it knows every guest's address from the start,
//! and a frame is forwarded by destination MAC:
//!
//! - to a guest's MAC: to that guest only;
//! - broadcast or multicast: to every port but the one it came from;
//! - any other unicast: to the uplink if it came from a guest; dropped if it came from the
//!   uplink (it is for nobody here), as is a broadcast with no other port.
//!
//! Guests are untrusted: a frame from a guest must carry that guest's own source MAC
//! (no spoofing another guest or the network), and a guest never gets its own frame back.
//! Every drop has a reason, counted in [`SwitchStats`]; the switch never fails otherwise.

use ipc_spec::net::{EthernetHeader, MacAddr};

/// Most guest ports a switch has.
pub const MAX_GUESTS: usize = 8;

/// Where a frame comes from or goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Port {
    /// The NIC, and through it the outside network.
    Uplink,
    /// The guest on channel `n` (`n < MAX_GUESTS`).
    Guest(usize),
}

/// The set of ports a frame goes to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ports {
    uplink: bool,
    guests: u16,
}

impl Ports {
    /// No port.
    pub const NONE: Ports = Ports { uplink: false, guests: 0 };

    /// Whether `port` is in the set.
    pub fn contains(&self, port: Port) -> bool {
        match port {
            Port::Uplink => self.uplink,
            Port::Guest(n) => n < MAX_GUESTS && self.guests & (1 << n) != 0,
        }
    }

    /// Whether the uplink is in the set.
    pub fn uplink(&self) -> bool {
        self.uplink
    }

    /// The guest ports in the set, lowest first.
    pub fn guests(&self) -> impl Iterator<Item = usize> + '_ {
        (0..MAX_GUESTS).filter(|n| self.guests & (1 << n) != 0)
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        !self.uplink && self.guests == 0
    }

    fn add(&mut self, port: Port) {
        match port {
            Port::Uplink => self.uplink = true,
            Port::Guest(n) if n < MAX_GUESTS => self.guests |= 1 << n,
            Port::Guest(_) => {}
        }
    }
}

/// Why the switch dropped a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SwitchDrop {
    /// Shorter than an Ethernet header.
    TooShort,
    /// From a guest, with a source MAC that is not the guest's own.
    SpoofedSource,
    /// Nowhere to go: unicast from the uplink to a MAC no guest has, or a broadcast with no
    /// other port attached.
    NoRoute,
    /// From a port the switch does not have (no such guest attached).
    NoSuchPort,
    /// Unicast from a guest to its own MAC.
    ToItself,
}

/// Frames forwarded and dropped, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwitchStats {
    /// Frames forwarded to at least one port.
    pub forwarded: u64,
    /// Dropped: shorter than an Ethernet header.
    pub too_short: u64,
    /// Dropped: a guest used a source MAC that is not its own.
    pub spoofed: u64,
    /// Dropped: nowhere to go.
    pub no_route: u64,
    /// Dropped: from a port that is not attached.
    pub no_such_port: u64,
    /// Dropped: a guest sent a frame to itself.
    pub to_itself: u64,
}

impl SwitchStats {
    /// All drops together.
    pub fn dropped(&self) -> u64 {
        self.too_short + self.spoofed + self.no_route + self.no_such_port + self.to_itself
    }

    fn count(&mut self, why: SwitchDrop) {
        let c = match why {
            SwitchDrop::TooShort => &mut self.too_short,
            SwitchDrop::SpoofedSource => &mut self.spoofed,
            SwitchDrop::NoRoute => &mut self.no_route,
            SwitchDrop::NoSuchPort => &mut self.no_such_port,
            SwitchDrop::ToItself => &mut self.to_itself,
        };
        *c = c.saturating_add(1);
    }
}

/// The switch: the guests' MACs and the counters.
#[derive(Clone, Debug, Default)]
pub struct Switch {
    guests: [Option<MacAddr>; MAX_GUESTS],
    /// What happened to the frames so far.
    pub stats: SwitchStats,
}

impl Switch {
    /// A switch with no guest attached.
    pub fn new() -> Self {
        Self::default()
    }

    /// Attaches guest `n` with the MAC the driver VM gave it. Returns false (nothing changed) if
    /// `n` is out of range, or the MAC is not a unicast address or is already another guest's.
    pub fn attach(&mut self, n: usize, mac: MacAddr) -> bool {
        let clash = self.guests.iter().enumerate().any(|(i, g)| i != n && *g == Some(mac));
        if n >= MAX_GUESTS || clash || !mac.is_unicast() {
            return false;
        }
        self.guests[n] = Some(mac);
        true
    }

    /// Detaches guest `n` (its channel went away): frames for it are no longer forwarded.
    pub fn detach(&mut self, n: usize) {
        if let Some(g) = self.guests.get_mut(n) {
            *g = None;
        }
    }

    /// The guest that has `mac`, if any.
    pub fn guest_with(&self, mac: &MacAddr) -> Option<usize> {
        self.guests.iter().position(|g| g.as_ref() == Some(mac))
    }

    /// Decides where `frame`, received on port `from`, goes, and counts the decision.
    pub fn route(&mut self, from: Port, frame: &[u8]) -> Result<Ports, SwitchDrop> {
        let decision = self.decide(from, frame);
        match decision {
            Ok(_) => self.stats.forwarded = self.stats.forwarded.saturating_add(1),
            Err(why) => self.stats.count(why),
        }
        decision
    }

    fn decide(&self, from: Port, frame: &[u8]) -> Result<Ports, SwitchDrop> {
        let EthernetHeader { dst, src, .. } = EthernetHeader::parse(frame).ok_or(SwitchDrop::TooShort)?;
        if let Port::Guest(n) = from {
            let own = self.guests.get(n).copied().flatten().ok_or(SwitchDrop::NoSuchPort)?;
            if src != own {
                return Err(SwitchDrop::SpoofedSource);
            }
        }
        let mut to = Ports::NONE;
        if !dst.is_unicast() {
            // Broadcast and multicast: everyone but the sender.
            if from != Port::Uplink {
                to.add(Port::Uplink);
            }
            for n in (0..MAX_GUESTS).filter(|&n| self.guests[n].is_some() && from != Port::Guest(n)) {
                to.add(Port::Guest(n));
            }
            return if to.is_empty() { Err(SwitchDrop::NoRoute) } else { Ok(to) };
        }
        match (self.guest_with(&dst), from) {
            (Some(n), Port::Guest(m)) if n == m => Err(SwitchDrop::ToItself),
            (Some(n), _) => {
                to.add(Port::Guest(n));
                Ok(to)
            }
            (None, Port::Guest(_)) => {
                to.add(Port::Uplink);
                Ok(to)
            }
            (None, Port::Uplink) => Err(SwitchDrop::NoRoute),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec;

    use ipc_spec::net::ETH_HEADER_LEN;

    const A: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 1]);
    const B: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 2]);
    const GATEWAY: MacAddr = MacAddr([0x52, 0x55, 0x0a, 0, 2, 2]);
    const BROADCAST: MacAddr = MacAddr::BROADCAST;

    fn frame(dst: MacAddr, src: MacAddr) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst.0);
        f.extend_from_slice(&src.0);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[0xAB; 46]);
        f
    }

    fn two_guests() -> Switch {
        let mut s = Switch::new();
        assert!(s.attach(0, A));
        assert!(s.attach(1, B));
        s
    }

    fn set(ports: &[Port]) -> Ports {
        let mut p = Ports::NONE;
        for &x in ports {
            p.add(x);
        }
        p
    }

    #[test]
    fn unicast_goes_to_the_guest_with_that_mac() {
        let mut s = two_guests();
        assert_eq!(s.route(Port::Uplink, &frame(B, GATEWAY)), Ok(set(&[Port::Guest(1)])));
        assert_eq!(s.route(Port::Guest(0), &frame(B, A)), Ok(set(&[Port::Guest(1)])));
        assert_eq!(s.route(Port::Guest(1), &frame(A, B)), Ok(set(&[Port::Guest(0)])));
        assert_eq!(s.stats.forwarded, 3);
    }

    #[test]
    fn other_unicast_goes_out_from_guests_and_is_dropped_from_the_uplink() {
        let mut s = two_guests();
        assert_eq!(s.route(Port::Guest(0), &frame(GATEWAY, A)), Ok(set(&[Port::Uplink])));
        assert_eq!(s.route(Port::Uplink, &frame(MacAddr([0x02, 9, 9, 9, 9, 9]), GATEWAY)), Err(SwitchDrop::NoRoute));
        assert_eq!(s.stats.no_route, 1);
    }

    #[test]
    fn broadcast_and_multicast_go_everywhere_but_back() {
        let mut s = two_guests();
        let all_guests = set(&[Port::Guest(0), Port::Guest(1)]);
        assert_eq!(s.route(Port::Uplink, &frame(BROADCAST, GATEWAY)), Ok(all_guests));
        assert_eq!(s.route(Port::Guest(0), &frame(BROADCAST, A)), Ok(set(&[Port::Uplink, Port::Guest(1)])));
        let multicast = MacAddr([0x01, 0x00, 0x5e, 0, 0, 0xfb]);
        assert_eq!(s.route(Port::Guest(1), &frame(multicast, B)), Ok(set(&[Port::Uplink, Port::Guest(0)])));
        // A lone guest's broadcast goes only to the uplink.
        let mut lone = Switch::new();
        assert!(lone.attach(3, A));
        let to = lone.route(Port::Guest(3), &frame(BROADCAST, A)).unwrap();
        assert!(to.uplink() && to.guests().next().is_none());
    }

    #[test]
    fn guests_cannot_spoof_or_talk_to_themselves() {
        let mut s = two_guests();
        assert_eq!(s.route(Port::Guest(0), &frame(GATEWAY, B)), Err(SwitchDrop::SpoofedSource));
        assert_eq!(s.route(Port::Guest(0), &frame(GATEWAY, GATEWAY)), Err(SwitchDrop::SpoofedSource));
        assert_eq!(s.route(Port::Guest(0), &frame(A, A)), Err(SwitchDrop::ToItself));
        assert_eq!(s.route(Port::Guest(5), &frame(GATEWAY, A)), Err(SwitchDrop::NoSuchPort));
        assert_eq!(s.route(Port::Guest(99), &frame(GATEWAY, A)), Err(SwitchDrop::NoSuchPort));
        assert_eq!((s.stats.spoofed, s.stats.to_itself, s.stats.no_such_port), (2, 1, 2));
        assert_eq!(s.stats.dropped(), 5);
    }

    #[test]
    fn short_frames_are_dropped() {
        let mut s = two_guests();
        for len in 0..ETH_HEADER_LEN {
            assert_eq!(s.route(Port::Uplink, &frame(A, GATEWAY)[..len]), Err(SwitchDrop::TooShort));
        }
        assert!(s.route(Port::Uplink, &frame(A, GATEWAY)[..ETH_HEADER_LEN]).is_ok());
        assert_eq!(s.stats.too_short, ETH_HEADER_LEN as u64);
    }

    #[test]
    fn attach_rules_and_detach() {
        let mut s = two_guests();
        assert!(!s.attach(2, A), "a MAC belongs to one guest");
        assert!(!s.attach(MAX_GUESTS, MacAddr([0x02, 1, 1, 1, 1, 1])));
        assert!(!s.attach(2, BROADCAST), "not unicast");
        assert!(s.attach(0, A), "re-attaching a guest with its own MAC is fine");
        s.detach(1);
        s.detach(MAX_GUESTS + 4);
        assert_eq!(s.guest_with(&B), None);
        assert_eq!(s.route(Port::Uplink, &frame(B, GATEWAY)), Err(SwitchDrop::NoRoute));
        assert_eq!(s.route(Port::Guest(1), &frame(GATEWAY, B)), Err(SwitchDrop::NoSuchPort));
    }

    proptest! {
        #[test]
        fn prop_never_back_to_the_sender_and_only_attached_guests(
            attached in prop::collection::vec(any::<bool>(), MAX_GUESTS),
            from_guest in prop::option::of(0usize..MAX_GUESTS + 2),
            dst_pick in 0usize..MAX_GUESTS + 3,
            src_pick in 0usize..MAX_GUESTS + 2,
            len in 0usize..80,
        ) {
            let mut s = Switch::new();
            let mac = |n: usize| MacAddr::local(n as u32);
            for (n, on) in attached.iter().enumerate() {
                if *on {
                    prop_assert!(s.attach(n, mac(n)));
                }
            }
            let dst = match dst_pick {
                n if n < MAX_GUESTS => mac(n),
                n if n == MAX_GUESTS => BROADCAST,
                _ => GATEWAY,
            };
            let src = if src_pick < MAX_GUESTS { mac(src_pick) } else { GATEWAY };
            let mut f = frame(dst, src);
            f.truncate(len);
            let from = from_guest.map_or(Port::Uplink, Port::Guest);
            let before = s.stats;
            match s.route(from, &f) {
                Ok(to) => {
                    prop_assert!(!to.is_empty());
                    prop_assert!(!to.contains(from));
                    for n in to.guests() {
                        prop_assert!(attached[n]);
                    }
                    if let Port::Guest(n) = from {
                        prop_assert_eq!(src, mac(n));
                    }
                    prop_assert_eq!(s.stats.forwarded, before.forwarded + 1);
                }
                Err(_) => prop_assert_eq!(s.stats.dropped(), before.dropped() + 1),
            }
        }
    }
}

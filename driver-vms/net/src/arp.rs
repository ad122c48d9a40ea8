//! The ARP frames of the driver VM's start-up check: it asks the network's gateway for its
//! MAC address as an ARP probe (RFC 5227: sender IP 0.0.0.0), so the network learns no
//! IP address for the device's own MAC. (A plain request with, say, 10.0.2.15 as sender would
//! teach QEMU's user network that 10.0.2.15 is at the NIC's MAC, while the guest that really
//! uses 10.0.2.15 sits behind the switch with a MAC of its own.)

use ipc_spec::net::{ETHERTYPE_ARP, ETHERTYPE_IPV4};

/// Length of an ARP request frame, padded to Ethernet's minimum (without FCS).
pub const FRAME_LEN: usize = 60;
/// The sender IP address of a probe.
pub const UNSPECIFIED: [u8; 4] = [0; 4];

const OP_REQUEST: u16 = 1;
const OP_REPLY: u16 = 2;

/// A broadcast ARP probe from `mac` for `target`: "who has `target`?", sender IP 0.0.0.0.
pub fn probe(mac: [u8; 6], target: [u8; 4]) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&OP_REQUEST.to_be_bytes());
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&UNSPECIFIED);
    // Target hardware address unknown (zeros).
    f[38..42].copy_from_slice(&target);
    f
}

/// `target`'s MAC if `frame` is an ARP reply from `target` addressed to `mac` (the answer to
/// [`probe`]). Any frame is accepted as input; nothing panics.
pub fn reply_from(frame: &[u8], target: [u8; 4], mac: [u8; 6]) -> Option<[u8; 6]> {
    let arp = frame.get(..42)?;
    if arp[12..14] != ETHERTYPE_ARP.to_be_bytes()
        || arp[14..16] != 1u16.to_be_bytes()
        || arp[16..18] != ETHERTYPE_IPV4.to_be_bytes()
        || arp[18..20] != [6, 4]
        || arp[20..22] != OP_REPLY.to_be_bytes()
    {
        return None;
    }
    if arp[28..32] != target || arp[32..38] != mac {
        return None;
    }
    arp[22..28].try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const GW: [u8; 4] = [10, 0, 2, 2];
    const GW_MAC: [u8; 6] = [0x52, 0x55, 10, 0, 2, 2];

    /// What QEMU's user network answers to a probe: sender = gateway, target = the
    /// prober's MAC and its (unspecified) IP.
    fn reply(to: &[u8; FRAME_LEN]) -> [u8; FRAME_LEN] {
        let mut r = *to;
        r[0..6].copy_from_slice(&to[6..12]);
        r[6..12].copy_from_slice(&GW_MAC);
        r[20..22].copy_from_slice(&OP_REPLY.to_be_bytes());
        r[22..28].copy_from_slice(&GW_MAC);
        r[28..32].copy_from_slice(&to[38..42]);
        r[32..38].copy_from_slice(&to[22..28]);
        r[38..42].copy_from_slice(&to[28..32]);
        r
    }

    #[test]
    fn a_probe_claims_no_address() {
        let p = probe(MAC, GW);
        assert_eq!(&p[..6], &[0xff; 6]);
        assert_eq!(&p[6..12], &MAC);
        assert_eq!(&p[12..22], &[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
        assert_eq!(&p[22..28], &MAC);
        assert_eq!(&p[28..32], &UNSPECIFIED, "a probe must not claim an IP address");
        assert_eq!(&p[32..38], &[0; 6]);
        assert_eq!(&p[38..42], &GW);
        assert!(p[42..].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_gateways_reply_is_recognised() {
        let r = reply(&probe(MAC, GW));
        assert_eq!(reply_from(&r, GW, MAC), Some(GW_MAC));
        // Not for us, not from the gateway, not a reply, truncated.
        assert_eq!(reply_from(&r, GW, [1; 6]), None);
        assert_eq!(reply_from(&r, [10, 0, 2, 3], MAC), None);
        assert_eq!(reply_from(&probe(MAC, GW), GW, MAC), None);
        assert_eq!(reply_from(&r[..41], GW, MAC), None);
        assert_eq!(reply_from(&r[..42], GW, MAC), Some(GW_MAC));
        let mut ipv4 = r;
        ipv4[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        assert_eq!(reply_from(&ipv4, GW, MAC), None);
    }

    proptest! {
        #[test]
        fn any_frame_is_safe(frame in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Some(m) = reply_from(&frame, GW, MAC) {
                prop_assert_eq!(&frame[22..28], &m);
            }
        }
    }
}

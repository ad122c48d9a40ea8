//! How the switch's drops are counted in a channel's header ([`NetDropReason`]).

use ipc_spec::net::NetDropReason;

use crate::switch::SwitchDrop;

/// The channel drop counter a switch drop of a guest's frame goes to.
pub fn reason(d: SwitchDrop) -> NetDropReason {
    match d {
        SwitchDrop::TooShort => NetDropReason::TooShort,
        SwitchDrop::SpoofedSource => NetDropReason::BadSource,
        // Sent to itself, from a port no longer attached, or nowhere to go: no route.
        SwitchDrop::NoRoute | SwitchDrop::NoSuchPort | SwitchDrop::ToItself => NetDropReason::NoRoute,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::switch::{Port, Switch};
    use ipc_spec::net::MacAddr;

    #[test]
    fn switch_drops_map_to_channel_reasons() {
        let mut s = Switch::new();
        assert!(s.attach(0, MacAddr::local(0)));
        let mut f = [0u8; 60];
        f[..6].copy_from_slice(&MacAddr::local(0).0);
        f[6..12].copy_from_slice(&MacAddr::local(0).0);
        assert_eq!(s.route(Port::Guest(0), &f).map_err(reason), Err(NetDropReason::NoRoute));
        f[6..12].copy_from_slice(&MacAddr::local(1).0);
        assert_eq!(s.route(Port::Guest(0), &f).map_err(reason), Err(NetDropReason::BadSource));
        assert_eq!(s.route(Port::Guest(0), &f[..13]).map_err(reason), Err(NetDropReason::TooShort));
        assert_eq!(s.route(Port::Guest(3), &f).map_err(reason), Err(NetDropReason::NoRoute));
    }
}

//! Shared bits of the small domains: how dom0 tells a domain where its capabilities are.
//!
//! dom0 puts the slots on the domain's command line: `chan.<name>=<slot>` for an endpoint
//! channel, `chan.<name>.signal=<slot>` and `chan.<name>.wait=<slot>` for a notification
//! channel, `timer=<slot>` for the domain's own timer notification.
#![cfg_attr(not(test), no_std)]

pub mod fuzz;

/// The slot named `key` on the command line.
pub fn slot(cmdline: &str, key: &str) -> Option<u64> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

/// The first endpoint channel's slot (`chan.<name>=<slot>` with no further dot).
pub fn first_endpoint(cmdline: &str) -> Option<(&str, u64)> {
    cmdline.split_ascii_whitespace().filter_map(|w| w.split_once('=')).find_map(|(k, v)| {
        let name = k.strip_prefix("chan.")?;
        if name.contains('.') {
            return None;
        }
        Some((name, v.parse().ok()?))
    })
}

/// The first notification channel: (name, signal slot, wait slot).
pub fn first_doorbell(cmdline: &str) -> Option<(&str, u64, u64)> {
    let words = || cmdline.split_ascii_whitespace().filter_map(|w| w.split_once('='));
    words().find_map(|(k, v)| {
        let name = k.strip_prefix("chan.")?.strip_suffix(".signal")?;
        let signal = v.parse().ok()?;
        let wait = words().find_map(|(k2, v2)| {
            let other = k2.strip_prefix("chan.")?.strip_suffix(".wait")?;
            if other == name {
                v2.parse().ok()
            } else {
                None
            }
        })?;
        Some((name, signal, wait))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_slots() {
        let c = "x=1 chan.bell.signal=7 timer=3 chan.pp=4 chan.bell.wait=8";
        assert_eq!(slot(c, "timer"), Some(3));
        assert_eq!(first_endpoint(c), Some(("pp", 4)));
        assert_eq!(first_doorbell(c), Some(("bell", 7, 8)));
        assert_eq!(first_doorbell("chan.bell.signal=7"), None);
        assert_eq!(first_endpoint("chan.a.signal=1"), None);
    }
}

pub mod mmio;

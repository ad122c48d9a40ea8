//! The channels on a domain's command line.
//!
//! Dom0 gives both ends of each block or net channel
//! `chan.<name>.kind=<kind> chan.<name>.region=<gpa>:<bytes> chan.<name>.signal=<slot>
//! chan.<name>.wait=<slot>`. [`channel_names`] lists the channels of one kind in command-line
//! order (for the net driver VM the order is the guest port number, and so the guest's MAC);
//! [`channel`] reads one. Nothing here allocates or panics, whatever the command line says.

use core::fmt;

use crate::shared::Region;

/// One channel's arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelArgs<'a> {
    /// The channel's name (from the manifest).
    pub name: &'a str,
    /// Guest-physical address the region is mapped at.
    pub base: usize,
    /// Region length in bytes.
    pub len: usize,
    /// The slot of the peer's doorbell (we signal it).
    pub signal: u64,
    /// The slot of our doorbell (the peer signals it).
    pub wait: u64,
}

impl ChannelArgs<'_> {
    /// The shared region.
    ///
    /// # Safety
    /// The arguments must be the ones dom0 gave this domain (then the region is mapped for the
    /// domain's whole life, and nothing else in the domain uses it); see [`Region::new`].
    pub unsafe fn region(&self) -> Region {
        // SAFETY: passed on to the caller (above).
        unsafe { Region::new(self.base, self.len) }
    }
}

/// What is wrong with a channel's arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgError {
    /// No `chan.<name>.region=`, or not `<gpa>:<bytes>`.
    Region,
    /// The region's end overflows the address space.
    RegionOverflow,
    /// No `chan.<name>.signal=` slot, or not a number.
    Signal,
    /// No `chan.<name>.wait=` slot, or not a number.
    Wait,
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ArgError::Region => "no valid region=<gpa>:<bytes>",
            ArgError::RegionOverflow => "the region wraps around the address space",
            ArgError::Signal => "no valid signal=<slot>",
            ArgError::Wait => "no valid wait=<slot>",
        })
    }
}

/// The `key=value` words of a command line.
fn pairs(cmdline: &str) -> impl Iterator<Item = (&str, &str)> {
    cmdline.split_ascii_whitespace().filter_map(|w| w.split_once('='))
}

/// The channel named by a `chan.<name>.kind=<kind>` word, if `key`/`value` is one.
fn of_kind<'a>(key: &'a str, value: &str, kind: &str) -> Option<&'a str> {
    let name = key.strip_prefix("chan.")?.strip_suffix(".kind")?;
    (value == kind && !name.is_empty()).then_some(name)
}

/// The names of the channels of `kind` ("block", "net"), in command-line order, each once (a
/// name given twice counts where it first appears).
pub fn channel_names<'a>(cmdline: &'a str, kind: &'a str) -> impl Iterator<Item = &'a str> {
    let mut words = pairs(cmdline);
    let mut before = 0usize;
    core::iter::from_fn(move || loop {
        let (key, value) = words.next()?;
        before += 1;
        let Some(name) = of_kind(key, value, kind) else { continue };
        // Skip a repeat: the first `before - 1` pairs hold an earlier kind word for it.
        let repeat = pairs(cmdline).take(before - 1).any(|(k, v)| of_kind(k, v, kind) == Some(name));
        if !repeat {
            return Some(name);
        }
    })
}

/// The value of `chan.<name><suffix>` (the first, if given twice).
fn channel_value<'a>(cmdline: &'a str, name: &str, suffix: &str) -> Option<&'a str> {
    pairs(cmdline).find_map(|(k, v)| (k.strip_prefix("chan.")?.strip_prefix(name)? == suffix).then_some(v))
}

/// The arguments of channel `name`.
pub fn channel<'a>(cmdline: &str, name: &'a str) -> Result<ChannelArgs<'a>, ArgError> {
    let (base, len) = channel_value(cmdline, name, ".region").and_then(Region::parse).ok_or(ArgError::Region)?;
    base.checked_add(len).ok_or(ArgError::RegionOverflow)?;
    let slot = |suffix| channel_value(cmdline, name, suffix).and_then(|v| v.parse::<u64>().ok());
    let signal = slot(".signal").ok_or(ArgError::Signal)?;
    let wait = slot(".wait").ok_or(ArgError::Wait)?;
    Ok(ChannelArgs { name, base, len, signal, wait })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec;

    const DOM0: &str = "timer=3 dev=4 irq=5 chan.net0.kind=net chan.net0.region=0x40000000:532480 \
        chan.net0.signal=6 chan.net0.wait=7 chan.disk0.kind=block chan.disk0.region=0x40400000:1048576 \
        chan.disk0.signal=8 chan.disk0.wait=9 chan.net1.kind=net chan.net1.region=1073741824:16384 \
        chan.net1.signal=10 chan.net1.wait=11";

    #[test]
    fn finds_the_net_channels_in_order() {
        let names: Vec<_> = channel_names(DOM0, "net").collect();
        assert_eq!(names, ["net0", "net1"]);
        assert_eq!(
            channel(DOM0, "net0"),
            Ok(ChannelArgs { name: "net0", base: 0x4000_0000, len: 532_480, signal: 6, wait: 7 })
        );
        assert_eq!(
            channel(DOM0, "net1"),
            Ok(ChannelArgs { name: "net1", base: 0x4000_0000, len: 16384, signal: 10, wait: 11 })
        );
        assert_eq!(channel_names(DOM0, "block").collect::<Vec<_>>(), ["disk0"]);
        assert_eq!(channel_names("dev=1 irq=2", "net").count(), 0);
        assert_eq!(channel_names("", "net").count(), 0);
    }

    #[test]
    fn names_do_not_match_by_prefix() {
        // "net" is a prefix of "net0": its keys must not be taken for net0's or the reverse.
        let c = "chan.net.kind=net chan.net0.region=0x1000:16384 chan.net0.signal=1 chan.net0.wait=2 \
                 chan.net.signal=3 chan.net.wait=4";
        assert_eq!(channel_names(c, "net").collect::<Vec<_>>(), ["net"]);
        assert_eq!(channel(c, "net"), Err(ArgError::Region));
    }

    #[test]
    fn bad_arguments_are_reported() {
        let c = |rest: &str| std::format!("chan.a.kind=net {rest}");
        assert_eq!(channel(&c("chan.a.signal=1 chan.a.wait=2"), "a"), Err(ArgError::Region));
        assert_eq!(channel(&c("chan.a.region=0x1000 chan.a.signal=1 chan.a.wait=2"), "a"), Err(ArgError::Region));
        assert_eq!(channel(&c("chan.a.region=0xzz:4 chan.a.signal=1 chan.a.wait=2"), "a"), Err(ArgError::Region));
        assert_eq!(channel(&c("chan.a.region=0x1000:-4 chan.a.signal=1 chan.a.wait=2"), "a"), Err(ArgError::Region));
        let max = std::format!("chan.a.region={}:2 chan.a.signal=1 chan.a.wait=2", usize::MAX);
        assert_eq!(channel(&c(&max), "a"), Err(ArgError::RegionOverflow));
        assert_eq!(channel(&c("chan.a.region=0x1000:4 chan.a.wait=2"), "a"), Err(ArgError::Signal));
        assert_eq!(channel(&c("chan.a.region=0x1000:4 chan.a.signal=x chan.a.wait=2"), "a"), Err(ArgError::Signal));
        assert_eq!(channel(&c("chan.a.region=0x1000:4 chan.a.signal=1"), "a"), Err(ArgError::Wait));
        assert_eq!(channel(&c("chan.a.region=4096:4 chan.a.signal=1 chan.a.wait=2"), "a").map(|a| a.base), Ok(4096));
    }

    #[test]
    fn other_kinds_and_repeats_are_skipped() {
        let c = "chan.a.kind=block chan.b.kind=net chan..kind=net chan.b.kind=net chan.c.kind=net2 \
                 chan.d.kind=net kind=net chan.kind=net chan.e.kind";
        assert_eq!(channel_names(c, "net").collect::<Vec<_>>(), ["b", "d"]);
    }

    proptest! {
        #[test]
        fn any_command_line_parses_without_panicking(words in proptest::collection::vec(
            prop_oneof![
                "[a-z.=:0-9x]{0,24}",
                Just("chan.n.kind=net".to_string()),
                "chan\\.n\\.(region|signal|wait)=[0-9a-fx:]{0,22}",
            ], 0..12)) {
            let line = words.join(" ");
            for name in channel_names(&line, "net") {
                if let Ok(a) = channel(&line, name) {
                    prop_assert!(a.base.checked_add(a.len).is_some());
                    prop_assert_eq!(a.name, name);
                }
            }
            prop_assert!(channel_names(&line, "net").count() <= 1);
        }
    }
}

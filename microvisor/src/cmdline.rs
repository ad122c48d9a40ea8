//! The microvisor's command line (`-append` in QEMU): space-separated `key=value` words.
//! Words `dom0.<key>=<value>` are handed to dom0 as `<key>=<value>`; the rest are the
//! microvisor's own.

/// Words of `cmdline` that belong to the domain `name` (prefix `name.` stripped).
pub fn domain_args<'a>(cmdline: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    cmdline.split_ascii_whitespace().filter_map(move |w| w.strip_prefix(name)?.strip_prefix('.'))
}

/// The value of the microvisor's own option `key` (a word `key=value` without a domain
/// prefix); the last one wins.
pub fn option<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_domain_words() {
        let c = "selftest=x dom0.selftest=stage2-fault  dom0.verbose dom0x.no=1 dom1.a=b";
        assert_eq!(domain_args(c, "dom0").collect::<Vec<_>>(), vec!["selftest=stage2-fault", "verbose"]);
        assert_eq!(domain_args(c, "dom1").collect::<Vec<_>>(), vec!["a=b"]);
        assert_eq!(domain_args("", "dom0").count(), 0);
    }

    #[test]
    fn own_options() {
        let c = "selftest=a dom0.selftest=b selftest=c flag";
        assert_eq!(option(c, "selftest"), Some("c"));
        assert_eq!(option(c, "flag"), None);
        assert_eq!(option(c, "dom0.selftest"), Some("b"));
    }
}

//! The VMM's count of its VM's exits by kind, with the ports and MSRs that cause the most:
//! what `cargo xtask bench boot` reports and what shows where a boot's time goes.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;

/// Exit kinds the VMM tells apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Port I/O.
    Io,
    /// RDMSR/WRMSR.
    Msr,
    /// CPUID.
    Cpuid,
    /// MMIO (stage-2 faults) the VMM emulated.
    Mmio,
    /// VMMCALL.
    Hypercall,
    /// Timer expiries the VMM processed (its own wake-ups, not the VM's exits).
    Timer,
    /// Interrupts injected.
    Injected,
    /// Anything else.
    Other,
}

const KINDS: [(Kind, &str); 8] = [
    (Kind::Io, "io"),
    (Kind::Msr, "msr"),
    (Kind::Cpuid, "cpuid"),
    (Kind::Mmio, "mmio"),
    (Kind::Hypercall, "hypercall"),
    (Kind::Timer, "timer"),
    (Kind::Injected, "injected"),
    (Kind::Other, "other"),
];

/// Distinct ports or MSRs tracked; beyond that they count in the kind only.
const TRACKED: usize = 512;

/// The histogram.
#[derive(Clone, Debug, Default)]
pub struct ExitStats {
    counts: [u64; 8],
    ports: Vec<(u32, u64)>,
    msrs: Vec<(u32, u64)>,
    /// MMIO exits by guest-physical address (below 4 GiB; e.g. a virtio notify register).
    mmios: Vec<(u32, u64)>,
}

fn bump(list: &mut Vec<(u32, u64)>, key: u32) {
    if let Some((_, n)) = list.iter_mut().find(|(k, _)| *k == key) {
        *n += 1;
    } else if list.len() < TRACKED {
        list.push((key, 1));
    }
}

impl ExitStats {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// One event of `kind`.
    pub fn count(&mut self, kind: Kind) {
        if let Some(i) = KINDS.iter().position(|(k, _)| *k == kind) {
            self.counts[i] += 1;
        }
    }

    /// A port I/O exit on `port`.
    pub fn io(&mut self, port: u16) {
        self.count(Kind::Io);
        bump(&mut self.ports, u32::from(port));
    }

    /// An MSR exit on `msr`.
    pub fn msr(&mut self, msr: u32) {
        self.count(Kind::Msr);
        bump(&mut self.msrs, msr);
    }

    /// An MMIO exit at `gpa`.
    pub fn mmio(&mut self, gpa: u64) {
        self.count(Kind::Mmio);
        if let Ok(a) = u32::try_from(gpa) {
            bump(&mut self.mmios, a);
        }
    }

    /// MMIO exits counted at `gpa` (0 if untracked).
    pub fn mmio_at(&self, gpa: u64) -> u64 {
        u32::try_from(gpa).ok().and_then(|a| self.mmios.iter().find(|(k, _)| *k == a)).map_or(0, |(_, n)| *n)
    }

    /// MSR exits counted on `msr` (0 if untracked).
    pub fn msr_at(&self, msr: u32) -> u64 {
        self.msrs.iter().find(|(k, _)| *k == msr).map_or(0, |(_, n)| *n)
    }

    /// Count of `kind`.
    pub fn get(&self, kind: Kind) -> u64 {
        KINDS.iter().position(|(k, _)| *k == kind).map_or(0, |i| self.counts[i])
    }

    /// The VM's exits (not the VMM's timer wake-ups and injections).
    pub fn exits(&self) -> u64 {
        [Kind::Io, Kind::Msr, Kind::Cpuid, Kind::Mmio, Kind::Hypercall, Kind::Other].iter().map(|&k| self.get(k)).sum()
    }

    /// One line: `exits=N io=N msr=N cpuid=N ...`.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = write!(s, "exits={}", self.exits());
        for (i, (_, name)) in KINDS.iter().enumerate() {
            let _ = write!(s, " {name}={}", self.counts[i]);
        }
        s
    }

    /// The ports, MSRs and MMIO addresses that exit most: `io:0x3f8=N io:0x3fd=N ...
    /// msr:0x6e0=N ... mmio:0xe0003000=N ...` (five of each).
    pub fn top(&self) -> String {
        let mut s = String::new();
        for (name, list) in [("io", &self.ports), ("msr", &self.msrs), ("mmio", &self.mmios)] {
            let mut top = list.clone();
            top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            for (k, n) in top.iter().take(5) {
                let _ = write!(s, "{}{name}:{k:#x}={n}", if s.is_empty() { "" } else { " " });
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_summary() {
        let mut s = ExitStats::new();
        for _ in 0..3 {
            s.io(0x3f8);
        }
        s.io(0x3fd);
        s.msr(0x6e0);
        s.count(Kind::Cpuid);
        s.count(Kind::Timer);
        assert_eq!(s.exits(), 6);
        assert_eq!(s.summary(), "exits=6 io=4 msr=1 cpuid=1 mmio=0 hypercall=0 timer=1 injected=0 other=0");
        assert_eq!(s.top(), "io:0x3f8=3 io:0x3fd=1 msr:0x6e0=1");
        s.mmio(0xe000_3000);
        s.mmio(0xe000_3000);
        s.mmio(0x1_0000_0000);
        assert_eq!(s.get(Kind::Mmio), 3);
        assert_eq!(s.top(), "io:0x3f8=3 io:0x3fd=1 msr:0x6e0=1 mmio:0xe0003000=2");
        assert_eq!((s.mmio_at(0xe000_3000), s.mmio_at(0x1_0000_0000), s.msr_at(0x6e0), s.msr_at(0x80b)), (2, 0, 1, 0));
    }

    #[test]
    fn tracking_is_bounded() {
        let mut s = ExitStats::new();
        for p in 0..1000u16 {
            s.io(p);
        }
        assert_eq!(s.get(Kind::Io), 1000);
        assert_eq!(s.ports.len(), TRACKED);
    }
}

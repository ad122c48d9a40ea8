//! The status service: dom0 answers, on its endpoint, what a domain with a status capability
//! (manifest `status = true`) may know about every domain: name, state, vCPUs, memory, and
//! the IPC calls and notification signals its vCPUs made (from `Hypercall::DomainStatus`).
//!
//! A query is one call with one word, the index of the domain (0 is dom0, then the
//! manifest's domains in order). The answer is six words, [`DomainStatusReply::encode`]:
//!
//! ```text
//! w0  0 = no such index (the end of the list), 1 = alive, 2 = destroyed
//! w1  name bytes 0..8   (little endian, zero padded)
//! w2  name bytes 8..16
//! w3  vCPUs (bits 0..16) | stopped vCPUs (bits 16..32) | RAM in MiB (bits 32..64)
//! w4  IPC calls
//! w5  notification signals
//! ```

/// Badge bit dom0 puts on status capabilities, to tell queries from fault messages (whose
/// badge is the faulting domain's index plus one).
pub const STATUS_BADGE: u64 = 1 << 32;

/// Longest name carried (longer names are cut).
pub const NAME_BYTES: usize = 16;

/// What a domain's state is, as far as the status service knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainState {
    /// It exists; `stopped` of its vCPUs are stopped.
    Alive,
    /// dom0 destroyed it (after a fault or an exit).
    Destroyed,
}

/// One domain's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainStatusReply {
    pub name: [u8; NAME_BYTES],
    pub state: DomainState,
    pub vcpus: u16,
    pub stopped: u16,
    pub ram_mib: u32,
    pub ipc_calls: u64,
    pub signals: u64,
}

impl DomainStatusReply {
    /// The six words of the answer.
    pub fn encode(&self) -> [u64; 6] {
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&self.name[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let state = match self.state {
            DomainState::Alive => 1,
            DomainState::Destroyed => 2,
        };
        let sizes = u64::from(self.vcpus) | u64::from(self.stopped) << 16 | u64::from(self.ram_mib) << 32;
        [state, word(0), word(1), sizes, self.ipc_calls, self.signals]
    }

    /// Reads an answer; `None` for the end of the list or a state word it does not know.
    pub fn decode(w: &[u64; 6]) -> Option<Self> {
        let state = match w[0] {
            1 => DomainState::Alive,
            2 => DomainState::Destroyed,
            _ => return None,
        };
        let mut name = [0u8; NAME_BYTES];
        name[..8].copy_from_slice(&w[1].to_le_bytes());
        name[8..].copy_from_slice(&w[2].to_le_bytes());
        Some(Self {
            name,
            state,
            vcpus: w[3] as u16,
            stopped: (w[3] >> 16) as u16,
            ram_mib: (w[3] >> 32) as u32,
            ipc_calls: w[4],
            signals: w[5],
        })
    }

    /// The name as text: up to the first zero byte, `?` if it is not UTF-8.
    pub fn name(&self) -> &str {
        let len = self.name.iter().position(|&b| b == 0).unwrap_or(NAME_BYTES);
        core::str::from_utf8(&self.name[..len]).unwrap_or("?")
    }
}

/// A name cut or padded to [`NAME_BYTES`].
pub fn name_bytes(name: &str) -> [u8; NAME_BYTES] {
    let mut b = [0u8; NAME_BYTES];
    let n = name.len().min(NAME_BYTES);
    b[..n].copy_from_slice(&name.as_bytes()[..n]);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_end_of_list() {
        let r = DomainStatusReply {
            name: name_bytes("disk"),
            state: DomainState::Alive,
            vcpus: 1,
            stopped: 0,
            ram_mib: 8,
            ipc_calls: 1234,
            signals: 99,
        };
        let w = r.encode();
        assert_eq!(w[0], 1);
        assert_eq!(w[3], 1 | 8 << 32);
        assert_eq!(DomainStatusReply::decode(&w), Some(r));
        assert_eq!(r.name(), "disk");
        assert_eq!(DomainStatusReply::decode(&[0; 6]), None);
        assert_eq!(DomainStatusReply::decode(&[7, 0, 0, 0, 0, 0]), None);
        assert_eq!(name_bytes("a-very-long-domain-name").len(), NAME_BYTES);
        let full = DomainStatusReply { name: name_bytes("sixteen-letters!"), ..r };
        assert_eq!(DomainStatusReply::decode(&full.encode()).unwrap().name(), "sixteen-letters!");
        let bad = DomainStatusReply { name: [0xff; NAME_BYTES], ..r };
        assert_eq!(bad.name(), "?");
    }

    proptest! {
        #[test]
        fn prop_any_words_decode_without_panic(w in any::<[u64; 6]>()) {
            if let Some(r) = DomainStatusReply::decode(&w) {
                prop_assert_eq!(r.encode(), w);
                let _ = r.name();
            }
        }
    }
}

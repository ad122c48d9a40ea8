//! Capabilities: typed references with rights, one fixed-size table per domain.
//!
//! Every capability has a unique id and remembers the id of the capability it was copied
//! from, so revoking a capability can find every copy made from it, in any domain,
//! transitively, without a separate derivation tree.

use ipc_spec::hypercall::CAP_SLOTS;
use ipc_spec::Error;

use super::{DeviceId, DomainId, EndpointId, NotificationId, RegionId, VcpuId};

/// What a capability refers to. Domains and vCPUs carry a generation: when the object is
/// destroyed its generation moves on and every capability to it becomes stale. Regions,
/// endpoints and notifications are reference-counted instead, so they never go away while a
/// capability names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Object {
    Domain(DomainId, u32),
    Vcpu(VcpuId, u32),
    /// All free physical memory: creates the other objects.
    Memory,
    /// The machine itself: power off.
    Machine,
    Region(RegionId),
    Endpoint(EndpointId),
    Notification(NotificationId),
    /// A PCI function.
    Device(DeviceId),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    pub object: Object,
    pub rights: u64,
    /// Identifies the holder to the receiver of IPC or signals (0 = none).
    pub badge: u64,
    pub id: u32,
    /// Id of the capability this was copied from (0 = an original).
    pub parent: u32,
}

impl Capability {
    pub fn has(&self, rights: u64) -> bool {
        self.rights & rights == rights
    }
}

/// One domain's capability table. An empty slot holds id 0 (real capabilities are
/// numbered from 1), so an empty table is all zero bytes and the kernel's tables live in
/// .bss rather than in the loaded image.
#[derive(Clone)]
pub struct CapTable {
    slots: [Capability; CAP_SLOTS],
}

const EMPTY: Capability = Capability { object: Object::Domain(0, 0), rights: 0, badge: 0, id: 0, parent: 0 };

impl CapTable {
    pub const fn new() -> Self {
        Self { slots: [EMPTY; CAP_SLOTS] }
    }

    /// The capability in `slot`, by reference.
    #[inline]
    pub fn get_ref(&self, slot: u64) -> Result<&Capability, Error> {
        // A u64 slot converts to usize losslessly on x86-64; `get` is the range check.
        match self.slots.get(slot as usize) {
            Some(c) if c.id != 0 => Ok(c),
            _ => Err(Error::InvalidSlot),
        }
    }

    /// The slot itself, filled or not, for the IPC fast paths: an empty slot reads as a
    /// capability with no rights (and a non-endpoint kind), so the rights check those
    /// callers make anyway rejects it.
    #[inline]
    pub fn get_raw(&self, slot: u64) -> Option<&Capability> {
        self.slots.get(slot as usize)
    }

    /// The capability in `slot`, if the slot is in range and filled.
    pub fn get(&self, slot: u64) -> Result<Capability, Error> {
        self.get_ref(slot).copied()
    }

    /// The capability in `slot`, which must have `rights`.
    pub fn get_with(&self, slot: u64, rights: u64) -> Result<Capability, Error> {
        let cap = self.get(slot)?;
        if cap.has(rights) {
            Ok(cap)
        } else {
            Err(Error::PermissionDenied)
        }
    }

    /// Put `cap` into the lowest free slot.
    pub fn insert(&mut self, cap: Capability) -> Result<u64, Error> {
        let i = self.slots.iter().position(|c| c.id == 0).ok_or(Error::NoFreeSlot)?;
        self.slots[i] = cap;
        Ok(i as u64)
    }

    pub fn remove(&mut self, slot: u64) -> Result<Capability, Error> {
        let cap = self.get(slot)?;
        self.slots[slot as usize] = EMPTY;
        Ok(cap)
    }

    /// Take every capability out (when the domain is destroyed).
    pub fn drain(&mut self) -> impl Iterator<Item = Capability> + '_ {
        self.slots.iter_mut().filter(|c| c.id != 0).map(|c| core::mem::replace(c, EMPTY))
    }

    /// Remove every capability whose parent is in `ids`, returning them (their own ids are
    /// added to `ids` by the caller so grandchildren follow).
    pub fn remove_children(&mut self, ids: &[u32], mut removed: impl FnMut(Capability)) {
        for c in self.slots.iter_mut() {
            if c.id != 0 && c.parent != 0 && ids.contains(&c.parent) {
                removed(*c);
                *c = EMPTY;
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &Capability)> {
        self.slots.iter().enumerate().filter(|(_, c)| c.id != 0).map(|(i, c)| (i as u64, c))
    }
}

impl Default for CapTable {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(id: u32, parent: u32) -> Capability {
        Capability { object: Object::Memory, rights: 3, badge: 0, id, parent }
    }

    #[test]
    fn insert_get_remove() {
        let mut t = CapTable::new();
        assert_eq!(t.get(0), Err(Error::InvalidSlot));
        assert_eq!(t.get(u64::MAX), Err(Error::InvalidSlot));
        let s = t.insert(cap(1, 0)).unwrap();
        assert_eq!(s, 0);
        assert_eq!(t.get(0).unwrap().id, 1);
        assert_eq!(t.get_with(0, 4), Err(Error::PermissionDenied));
        assert_eq!(t.remove(0).unwrap().id, 1);
        assert_eq!(t.remove(0), Err(Error::InvalidSlot));
    }

    #[test]
    fn full_table() {
        let mut t = CapTable::new();
        for i in 0..CAP_SLOTS {
            t.insert(cap(i as u32 + 1, 0)).unwrap();
        }
        assert_eq!(t.insert(cap(999, 0)), Err(Error::NoFreeSlot));
    }

    #[test]
    fn children_removed() {
        let mut t = CapTable::new();
        t.insert(cap(1, 0)).unwrap();
        t.insert(cap(2, 1)).unwrap();
        t.insert(cap(3, 7)).unwrap();
        let mut gone = vec![];
        t.remove_children(&[1], |c| gone.push(c.id));
        assert_eq!(gone, vec![2]);
        assert_eq!(t.iter().count(), 2);
    }
}

//! The kernel's capability operations: grant, look up, copy, revoke, delete, and the
//! reference counts of the objects capabilities name. (The table itself is in `caps.rs`.)

use super::*;

impl<F: Stage2Format> Kernel<F> {
    pub(super) fn new_cap(&mut self, object: Object, rights: u64, badge: u64, parent: u32) -> Capability {
        // Ids start at 1 (0 means "no parent") and skip 0 when they wrap.
        self.next_cap_id = self.next_cap_id.wrapping_add(1).max(1);
        Capability { object, rights, badge, id: self.next_cap_id, parent }
    }

    /// Count a new reference to a reference-counted object.
    pub(super) fn retain(&mut self, object: Object) {
        match object {
            Object::Region(r) => self.regions[r as usize].refs += 1,
            Object::Endpoint(e) => self.endpoints[e as usize].refs += 1,
            Object::Notification(n) => self.notifications[n as usize].refs += 1,
            _ => {}
        }
    }

    /// Drop a reference; the object is freed with its last one.
    pub(super) fn release<P: Platform>(&mut self, p: &mut P, object: Object) {
        match object {
            Object::Region(r) => {
                let region = &mut self.regions[r as usize];
                region.refs = region.refs.saturating_sub(1);
                if region.refs == 0 {
                    p.free_frames(region.hpa, region.frames);
                    region.frames = 0;
                }
            }
            Object::Endpoint(e) => {
                let ep = &mut self.endpoints[e as usize];
                ep.refs = ep.refs.saturating_sub(1);
                if ep.refs == 0 {
                    // Nobody can reach the endpoint any more: fail whoever still waits on it.
                    while let Some(v) = self.endpoints[e as usize].senders.pop(&mut self.next) {
                        self.fail_ipc(v, Error::PartnerGone);
                    }
                    while let Some(v) = self.endpoints[e as usize].receivers.pop(&mut self.next) {
                        self.fail_ipc(v, Error::PartnerGone);
                    }
                }
            }
            Object::Notification(n) => {
                let ntf = &mut self.notifications[n as usize];
                ntf.refs = ntf.refs.saturating_sub(1);
                if ntf.refs == 0 {
                    let waiter = ntf.waiter.take();
                    *ntf = Notification { refs: 0, bits: 0, waiter: None, bound: None, timer: None };
                    if let Some(v) = waiter {
                        self.fail_ipc(v, Error::PartnerGone);
                    }
                }
            }
            _ => {}
        }
    }

    /// Insert an original capability (no parent) into `domain`'s table.
    pub fn grant_original(&mut self, domain: DomainId, object: Object, rights: u64) -> Result<u64, Error> {
        let cap = self.new_cap(object, rights, 0, 0);
        let slot = self.domains[domain as usize].caps.insert(cap)?;
        self.retain(object);
        Ok(slot)
    }

    /// The caller's capability in `slot`, with `rights`, checked for staleness.
    pub fn lookup(&self, domain: DomainId, slot: u64, rights: u64) -> Result<Capability, Error> {
        let cap = self.domains[domain as usize].caps.get_with(slot, rights)?;
        match cap.object {
            Object::Domain(d, g) => {
                let dom = &self.domains[d as usize];
                if dom.state != DomainState::Alive || dom.generation != g {
                    return Err(Error::StaleCapability);
                }
            }
            Object::Vcpu(v, g) => {
                let vcpu = &self.vcpus[v as usize];
                if vcpu.state == VcpuState::Free || vcpu.generation != g {
                    return Err(Error::StaleCapability);
                }
            }
            _ => {}
        }
        Ok(cap)
    }

    /// What `kind` makes of the object in the caller's `slot` (with `rights`): `None` is
    /// the wrong type.
    pub fn lookup_as<T>(
        &self,
        caller: DomainId,
        slot: u64,
        rights: u64,
        kind: impl FnOnce(Object) -> Option<T>,
    ) -> Result<T, Error> {
        kind(self.lookup(caller, slot, rights)?.object).ok_or(Error::WrongType)
    }

    pub fn lookup_domain(&self, caller: DomainId, slot: u64) -> Result<DomainId, Error> {
        self.lookup_as(caller, slot, rights::CONTROL, |o| if let Object::Domain(d, _) = o { Some(d) } else { None })
    }

    pub fn lookup_vcpu(&self, caller: DomainId, slot: u64) -> Result<VcpuId, Error> {
        self.lookup_as(caller, slot, rights::CONTROL, |o| if let Object::Vcpu(v, _) = o { Some(v) } else { None })
    }

    /// Copy capability `slot` of `from` into `to` with rights masked and, for an unbadged
    /// endpoint or notification capability, a badge.
    pub fn cap_copy(&mut self, from: DomainId, slot: u64, to: DomainId, mask: u64, badge: u64) -> Result<u64, Error> {
        let src = self.lookup(from, slot, rights::GRANT)?;
        let badge = match src.object {
            Object::Endpoint(_) | Object::Notification(_) if src.badge == 0 => badge,
            _ if badge != 0 => return Err(Error::InvalidArgument),
            _ => src.badge,
        };
        let cap = self.new_cap(src.object, src.rights & mask, badge, src.id);
        let slot = self.domains[to as usize].caps.insert(cap)?;
        self.retain(src.object);
        Ok(slot)
    }

    /// Delete every capability derived from `slot`'s capability, transitively.
    pub fn cap_revoke<P: Platform>(&mut self, p: &mut P, domain: DomainId, slot: u64) -> Result<u32, Error> {
        let root = self.domains[domain as usize].caps.get(slot)?;
        let mut ids: heapless::Vec<u32, { MAX_DOMAINS * ipc_spec::hypercall::CAP_SLOTS }> = heapless::Vec::new();
        let _ = ids.push(root.id);
        let mut removed = 0;
        let mut dropped: heapless::Vec<Object, { MAX_DOMAINS * ipc_spec::hypercall::CAP_SLOTS }> = heapless::Vec::new();
        loop {
            let before = ids.len();
            for d in self.domains.iter_mut() {
                let mut found: heapless::Vec<Capability, { ipc_spec::hypercall::CAP_SLOTS }> = heapless::Vec::new();
                d.caps.remove_children(&ids, |c| {
                    let _ = found.push(c);
                });
                for c in found {
                    let _ = ids.push(c.id);
                    let _ = dropped.push(c.object);
                    removed += 1;
                }
            }
            if ids.len() == before {
                break;
            }
        }
        for o in dropped {
            self.release(p, o);
        }
        Ok(removed)
    }

    pub fn cap_delete<P: Platform>(&mut self, p: &mut P, domain: DomainId, slot: u64) -> Result<(), Error> {
        let cap = self.domains[domain as usize].caps.remove(slot)?;
        self.release(p, cap.object);
        Ok(())
    }
}

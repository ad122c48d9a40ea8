//! Memory regions: frames shared between domains, mapped into their stage-2 maps (and
//! their devices' DMA spaces).

use super::*;

/// A large page: the alignment of regions that can use one (see `region_create`).
const LARGE: u64 = 2 << 20;

pub struct Region {
    /// Capabilities plus mappings referring to it; 0 = free.
    pub refs: u32,
    pub hpa: u64,
    pub frames: u64,
}

impl<F: Stage2Format> Kernel<F> {
    pub fn region_create<P: Platform>(&mut self, p: &mut P, bytes: u64) -> Result<RegionId, Error> {
        if bytes == 0 || bytes > (256 << 20) {
            return Err(Error::InvalidArgument);
        }
        let r = self.regions.iter().position(|r| r.refs == 0).ok_or(Error::OutOfMemory)?;
        let frames = bytes.div_ceil(PAGE);
        // A region of 2 MiB or more starts on a 2 MiB boundary if memory allows: mapped at a
        // 2 MiB-aligned guest address it then takes 2 MiB leaves in the stage-2 map and in
        // the IOMMU's tables (`Stage2Map::map`). A device DMAing into a shared buffer area
        // of a few MiB (a block channel's data area) otherwise needs an IOTLB entry per
        // 4 KiB page: over the IOTLB's size, every page of every transfer is a table walk.
        let hpa = (frames * PAGE >= LARGE)
            .then(|| p.alloc_frames(frames, LARGE))
            .flatten()
            .or_else(|| p.alloc_frames(frames, PAGE))
            .ok_or(Error::OutOfMemory)?;
        self.regions[r] = Region { refs: 0, hpa, frames };
        Ok(r as RegionId)
    }

    pub fn map_region<P: Platform>(
        &mut self,
        p: &mut P,
        d: DomainId,
        region: RegionId,
        gpa: u64,
        access: u64,
    ) -> Result<(), Error> {
        if !gpa.is_multiple_of(PAGE) {
            return Err(Error::InvalidArgument);
        }
        let mut a = Access::empty();
        for (bit, acc) in [(rights::READ, Access::READ), (rights::WRITE, Access::WRITE), (rights::EXEC, Access::EXEC)] {
            if access & bit != 0 {
                a |= acc;
            }
        }
        if access & !(rights::READ | rights::WRITE | rights::EXEC) != 0 || !a.contains(Access::READ) {
            return Err(Error::InvalidArgument);
        }
        let (hpa, frames) = (self.regions[region as usize].hpa, self.regions[region as usize].frames);
        let dom = &mut self.domains[d as usize];
        if dom.mappings.iter().any(|m| m.region == region) {
            return Err(Error::AlreadyMapped);
        }
        // Guest-physical ranges inside the domain's RAM are never remapped.
        if gpa < dom.ram_size() {
            return Err(Error::AlreadyMapped);
        }
        if dom.mappings.is_full() {
            return Err(Error::OutOfMemory);
        }
        let stage2 = dom.stage2.as_mut().ok_or(Error::InvalidState)?;
        stage2.map(p, gpa, hpa, frames * PAGE, a, MemType::WriteBack).map_err(stage2_error)?;
        let _ = dom.mappings.push(Mapping { region, gpa });
        self.regions[region as usize].refs += 1;
        p.dma_map(d, Gpa(gpa), Hpa(hpa), frames * PAGE);
        Ok(())
    }

    pub fn unmap_region<P: Platform>(&mut self, p: &mut P, d: DomainId, region: RegionId) -> Result<(), Error> {
        let dom = &mut self.domains[d as usize];
        let i = dom.mappings.iter().position(|m| m.region == region).ok_or(Error::NotMapped)?;
        let m = dom.mappings.swap_remove(i);
        let frames = self.regions[region as usize].frames;
        if let Some(s) = dom.stage2.as_mut() {
            let _ = s.unmap(p, m.gpa, frames * PAGE);
        }
        p.stage2_changed(d);
        // The device must lose access before the frames can go back to the pool.
        p.dma_unmap(d, Gpa(m.gpa), frames * PAGE);
        self.release(p, Object::Region(region));
        Ok(())
    }
}

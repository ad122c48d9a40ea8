//! Intel VT-d glue: bring-up, per-domain DMA address spaces, device attach/detach, queued
//! invalidation, and the fault log. The encodings are in the portable `microvisor::iommu`.
//!
//! Every device is blocked from boot on: translation is enabled before any domain runs and
//! a device without a context entry can do no DMA. A device given to a domain gets a
//! context entry pointing at that domain's DMA space, which mirrors exactly the domain's
//! RAM and the regions mapped into it (never MMIO, never another domain's memory or the
//! microvisor's). Interrupt remapping is on with an empty table.

use microvisor::iommu::faults::{FaultRecord, CLEAR_HIGH};
use microvisor::iommu::invalidation as inv;
use microvisor::iommu::regs::{self, FaultStatus, GlobalCommand, GlobalStatus, VtdCap, VtdExtCap};
use microvisor::iommu::second_level::{three_level_root, Vtd};
use microvisor::iommu::tables::{self, AddressWidth};
use microvisor::iommu::{clear_entry128, irte, write_entry128, Entry128};
use microvisor::kernel::{DomainId, MAX_DOMAINS, RAM_CHUNK};
use microvisor::stage2::{Access, MemType, Stage2Map};

use super::phys::{alloc_zeroed_frames, PhysTables, IDENTITY_LIMIT};

/// Interrupt remapping table: 2^(IRT_SIZE+1) = 256 entries of 16 bytes, one page.
const IRT_SIZE: u8 = 7;
/// Invalidation queue: size 0 = 256 descriptors, one page.
const IQ_SIZE: u8 = 0;
/// Polls before a hardware handshake counts as hung.
const SPIN_LIMIT: u32 = 50_000_000;

pub struct Iommu {
    base: u64,
    cap: VtdCap,
    root: u64,
    /// Context table of each bus (0 = none yet).
    contexts: [u64; 256],
    queue: u64,
    tail: usize,
    /// A page whose first dword the wait descriptors write.
    status: u64,
    spaces: [Option<Stage2Map<Vtd>>; MAX_DOMAINS],
    /// The interrupt remapping table, and which device owns each entry.
    irt: u64,
    irte_owner: [Option<u16>; 256],
}

impl Iommu {
    fn read32(&self, reg: u64) -> u32 {
        // SAFETY: `base` is the DRHD register page from the DMAR table, below 4 GiB in the
        // identity map (checked in `init`); only the microvisor touches it.
        unsafe { core::ptr::read_volatile((self.base + reg) as *const u32) }
    }
    fn write32(&self, reg: u64, v: u32) {
        // SAFETY: as in read32.
        unsafe { core::ptr::write_volatile((self.base + reg) as *mut u32, v) }
    }
    fn read64(&self, reg: u64) -> u64 {
        // SAFETY: as in read32 (64-bit registers are 8-byte aligned).
        unsafe { core::ptr::read_volatile((self.base + reg) as *const u64) }
    }
    fn write64(&self, reg: u64, v: u64) {
        // SAFETY: as in read32.
        unsafe { core::ptr::write_volatile((self.base + reg) as *mut u64, v) }
    }

    /// Issue a global command and wait for the hardware to acknowledge it.
    fn command(&self, set: GlobalCommand, clear: GlobalCommand) -> Result<(), &'static str> {
        let gsts = self.read32(regs::GSTS);
        self.write32(regs::GCMD, regs::gcmd_value(gsts, set, clear));
        for _ in 0..SPIN_LIMIT {
            if regs::gcmd_complete(self.read32(regs::GSTS), set, clear) {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err("the IOMMU did not acknowledge a global command")
    }

    /// Queue `descs` plus a status-write wait, and wait until the hardware has done them all.
    fn invalidate(&mut self, descs: &[Entry128]) -> Result<(), &'static str> {
        let entries = inv::queue_entries(IQ_SIZE);
        // SAFETY: the status page is the microvisor's own frame (allocated in `init`).
        unsafe { core::ptr::write_volatile(self.status as *mut u32, 0) };
        let wait = inv::wait(self.status, 1, true).map_err(|_| "bad wait descriptor")?;
        for d in descs.iter().chain(core::iter::once(&wait)) {
            write_entry128(&mut PhysTables, self.queue, self.tail, *d).map_err(|_| "bad queue entry")?;
            self.tail = (self.tail + 1) % entries;
        }
        self.write64(regs::IQT, inv::iqt(self.tail, IQ_SIZE).map_err(|_| "bad queue tail")?);
        for _ in 0..SPIN_LIMIT {
            // SAFETY: as above; the IOMMU writes the dword when it reaches the wait.
            if unsafe { core::ptr::read_volatile(self.status as *const u32) } == 1 {
                return Ok(());
            }
            if FaultStatus::from_bits_truncate(self.read32(regs::FSTS)).intersects(FaultStatus::IQE | FaultStatus::ITE)
            {
                return Err("the IOMMU rejected an invalidation descriptor");
            }
            core::hint::spin_loop();
        }
        Err("the IOMMU did not complete an invalidation")
    }

    fn flush_all(&mut self) -> Result<(), &'static str> {
        self.invalidate(&[inv::context_cache_global(), inv::iotlb_global(true, true)])
    }

    /// Bring the unit up: root table, queued invalidation, translation (every device
    /// blocked), interrupt remapping with an empty table.
    pub fn init(base: u64) -> Result<Self, &'static str> {
        if base == 0 || base >= IDENTITY_LIMIT {
            return Err("the IOMMU's registers are outside the identity map");
        }
        let (Some(root), Some(queue), Some(status), Some(irt)) =
            (alloc_zeroed_frames(1), alloc_zeroed_frames(1), alloc_zeroed_frames(1), alloc_zeroed_frames(1))
        else {
            return Err("out of memory for the IOMMU's tables");
        };
        let mut u = Self {
            base,
            cap: VtdCap(0),
            root,
            contexts: [0; 256],
            queue,
            tail: 0,
            status,
            spaces: [const { None }; MAX_DOMAINS],
            irt,
            irte_owner: [None; 256],
        };
        u.cap = VtdCap(u.read64(regs::CAP));
        let ecap = VtdExtCap(u.read64(regs::ECAP));
        if !u.cap.supports_levels(3) {
            return Err("the IOMMU cannot walk 3-level (39-bit) tables");
        }
        if u.cap.caching_mode() {
            // Caching mode needs an invalidation after every not-present to present change.
            return Err("the IOMMU is in caching mode (a virtual IOMMU), which is not supported");
        }
        if !ecap.queued_invalidation() || !ecap.interrupt_remapping() {
            return Err("the IOMMU lacks queued invalidation or interrupt remapping");
        }
        u.write64(regs::RTADDR, tables::rtaddr(root).map_err(|_| "bad root table address")?);
        u.command(GlobalCommand::SRTP, GlobalCommand::empty())?;
        u.write64(regs::IQT, 0);
        u.write64(regs::IQA, inv::iqa(queue, IQ_SIZE).map_err(|_| "bad queue address")?);
        u.command(GlobalCommand::QIE, GlobalCommand::empty())?;
        u.invalidate(&[
            inv::context_cache_global(),
            inv::iotlb_global(true, true),
            inv::interrupt_entry_cache_global(),
        ])?;
        u.command(GlobalCommand::TE, GlobalCommand::empty())?;
        u.write64(regs::IRTA, irte::irta(irt, IRT_SIZE).map_err(|_| "bad interrupt table address")?);
        u.command(GlobalCommand::SIRTP, GlobalCommand::empty())?;
        u.invalidate(&[inv::interrupt_entry_cache_global()])?;
        // CFI stays clear: compatibility-format interrupts are not to be trusted.
        u.command(GlobalCommand::IRE, GlobalCommand::empty())?;
        let gsts = GlobalStatus::from_bits_truncate(u.read32(regs::GSTS));
        if !gsts.contains(GlobalStatus::TES | GlobalStatus::IRES | GlobalStatus::QIES) {
            return Err("the IOMMU did not turn translation and interrupt remapping on");
        }
        Ok(u)
    }

    /// An interrupt-remapping entry delivering `vector` to the boot CPU, accepted only from
    /// requester `rid`; returns its handle. `owner` tags it for `free_irtes`.
    pub fn alloc_irte(&mut self, owner: u16, vector: u8, rid: u16) -> Result<u16, &'static str> {
        let handle = self.irte_owner.iter().position(Option::is_none).ok_or("interrupt remapping table full")?;
        let entry = irte::irte(vector, 0, rid).map_err(|_| "bad remapping entry")?;
        write_entry128(&mut PhysTables, self.irt, handle, entry).map_err(|_| "remapping entry")?;
        self.irte_owner[handle] = Some(owner);
        self.invalidate(&[inv::interrupt_entry_cache_global()])?;
        Ok(handle as u16)
    }

    /// Remove every remapping entry of `owner`: its device can raise nothing any more.
    pub fn free_irtes(&mut self, owner: u16) {
        for handle in 0..self.irte_owner.len() {
            if self.irte_owner[handle] == Some(owner) {
                let _ = clear_entry128(&mut PhysTables, self.irt, handle);
                self.irte_owner[handle] = None;
            }
        }
        let _ = self.invalidate(&[inv::interrupt_entry_cache_global()]);
    }

    /// Build domain `d`'s DMA space if it has none: its RAM and its regions, read/write.
    pub fn ensure_space(&mut self, d: DomainId, ram: &[u64], regions: &[(u64, u64, u64)]) -> Result<(), &'static str> {
        let slot = self.spaces.get_mut(d as usize).ok_or("no such domain")?;
        if slot.is_some() {
            return Ok(());
        }
        let mut space = Stage2Map::<Vtd>::new(&mut PhysTables).map_err(|_| "out of memory for DMA tables")?;
        let rw = Access::READ | Access::WRITE;
        let mut result = Ok(());
        for (i, &hpa) in ram.iter().enumerate() {
            result =
                result.and(space.map(&mut PhysTables, i as u64 * RAM_CHUNK, hpa, RAM_CHUNK, rw, MemType::WriteBack));
        }
        for &(gpa, hpa, size) in regions {
            result = result.and(space.map(&mut PhysTables, gpa, hpa, size, rw, MemType::WriteBack));
        }
        if result.is_err() || three_level_root(&space, &PhysTables).is_none() {
            space.destroy(&mut PhysTables);
            return Err("the domain's memory does not fit a 39-bit DMA space");
        }
        *slot = Some(space);
        Ok(())
    }

    /// Point device `rid` at domain `d`'s DMA space (which must exist).
    pub fn attach(&mut self, rid: u16, d: DomainId) -> Result<(), &'static str> {
        let space = self.spaces.get(d as usize).and_then(Option::as_ref).ok_or("the domain has no DMA space")?;
        let slpt = three_level_root(space, &PhysTables).ok_or("the DMA space is empty")?;
        let bus = (rid >> 8) as usize;
        if self.contexts[bus] == 0 {
            let table = alloc_zeroed_frames(1).ok_or("out of memory for a context table")?;
            let entry = tables::root_entry(table).map_err(|_| "bad context table address")?;
            write_entry128(&mut PhysTables, self.root, tables::root_index(bus as u8), entry)
                .map_err(|_| "root entry")?;
            self.contexts[bus] = table;
        }
        let entry = tables::context_entry(slpt, AddressWidth::Bits39, d + 1, false).map_err(|_| "bad context entry")?;
        let index = tables::context_index(rid as u8);
        // A present entry is never changed in place: clear, invalidate, then write.
        clear_entry128(&mut PhysTables, self.contexts[bus], index).map_err(|_| "context entry")?;
        self.flush_all()?;
        write_entry128(&mut PhysTables, self.contexts[bus], index, entry).map_err(|_| "context entry")?;
        self.flush_all()
    }

    /// Block device `rid` again: no context entry, caches flushed.
    pub fn detach(&mut self, rid: u16) -> Result<(), &'static str> {
        let table = self.contexts[(rid >> 8) as usize];
        if table != 0 {
            clear_entry128(&mut PhysTables, table, tables::context_index(rid as u8)).map_err(|_| "context entry")?;
        }
        self.flush_all()
    }

    pub fn map(&mut self, d: DomainId, gpa: u64, hpa: u64, size: u64) {
        if let Some(Some(space)) = self.spaces.get_mut(d as usize) {
            let _ = space.map(&mut PhysTables, gpa, hpa, size, Access::READ | Access::WRITE, MemType::WriteBack);
        }
    }

    /// Remove a mapping; the IOTLB is flushed before the caller frees the frames.
    pub fn unmap(&mut self, d: DomainId, gpa: u64, size: u64) {
        if let Some(Some(space)) = self.spaces.get_mut(d as usize) {
            let _ = space.unmap(&mut PhysTables, gpa, size);
            let _ = self.invalidate(&[inv::iotlb_global(true, true)]);
        }
    }

    /// Free domain `d`'s DMA space (its devices are detached already).
    pub fn destroy_space(&mut self, d: DomainId) {
        if let Some(space) = self.spaces.get_mut(d as usize).and_then(Option::take) {
            let _ = self.flush_all();
            space.destroy(&mut PhysTables);
        }
    }

    /// Take a pending fault record (cleared in the unit) for reporting.
    pub fn poll_fault(&mut self) -> Option<FaultRecord> {
        let fsts = FaultStatus::from_bits_truncate(self.read32(regs::FSTS));
        if !fsts.contains(FaultStatus::PPF) {
            return None;
        }
        let index = regs::fault_record_index(fsts.bits()) as u32;
        let reg = self.cap.fault_record(index)?;
        let record = Entry128::new(self.read64(reg), self.read64(reg + 8));
        self.write64(reg + 8, CLEAR_HIGH);
        self.write32(regs::FSTS, FaultStatus::PFO.bits());
        FaultRecord::decode(record)
    }
}

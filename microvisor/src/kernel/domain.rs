//! Domains: their RAM, stage-2 map, capability table and console, their creation and
//! destruction, and the collection of domains nothing can reach any more.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainState {
    Free,
    Alive,
}

#[derive(Clone, Copy, Debug)]
pub struct Mapping {
    pub region: RegionId,
    pub gpa: u64,
}

pub struct Domain<F: Stage2Format> {
    pub state: DomainState,
    pub generation: u32,
    pub(super) name: [u8; DOMAIN_NAME_MAX],
    pub(super) name_len: usize,
    pub caps: CapTable,
    pub stage2: Option<Stage2Map<F>>,
    /// Host-physical address of each 2 MiB chunk of RAM, in guest-physical order from 0.
    pub ram: heapless::Vec<u64, MAX_RAM_CHUNKS>,
    pub priority: u8,
    /// The exit handler: endpoint, badge.
    pub fault_handler: Option<(EndpointId, u64)>,
    /// State groups every exit message carries besides the kind's defaults.
    pub exit_state: u16,
    /// A VM: its CPUID, MSR, port I/O, VMMCALL and MMIO exits go to its exit handler.
    pub vm: bool,
    /// A VM's vCPUs do not run while it is paused (DomainPause).
    pub paused: bool,
    /// The VM whose RAM this domain (its VMM) sees, and where (DomainMapRam).
    pub ram_view: Option<(DomainId, u64)>,
    pub mappings: heapless::Vec<Mapping, MAX_MAPPINGS>,
    pub console: LineBuffer,
    pub vcpus: u8,
    /// IPC calls and notification signals its vCPUs made (for `DomainStatus`).
    pub ipc_calls: u64,
    pub signals: u64,
    #[cfg(feature = "counts")]
    /// Where its vCPUs' time went, for the block benchmark's per-request accounting
    /// (printed after each `bench blk: via=` line of any domain; see [`ExitCounts`]).
    pub counts: ExitCounts,
}

#[cfg(feature = "counts")]
/// Exits and world switches of one domain's vCPUs, cumulative since boot. Cheap enough to
/// keep always (a few additions per exit, which costs thousands of cycles itself); printed
/// only when a benchmark asks, so that its figures can be explained per request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// Exits of every kind.
    pub exits: u64,
    /// Of those: hypercalls, HLTs, and physical interrupts (device or tick).
    pub hypercalls: u64,
    pub hlts: u64,
    pub interrupts: u64,
    /// Entries after another vCPU (or the idle loop) ran: world switches into this domain.
    pub switches: u64,
    /// Virtual interrupts handed to its vCPUs (injected or offered).
    pub virqs: u64,
    /// Nanoseconds by the microvisor's clock from just before each entry to just after its
    /// exit: under `-icount` the instructions its vCPUs executed (plus the entry and exit).
    pub run_ns: u64,
}

impl<F: Stage2Format> Domain<F> {
    pub(super) const FREE: Self = Self {
        state: DomainState::Free,
        generation: 0,
        name: [0; DOMAIN_NAME_MAX],
        name_len: 0,
        caps: CapTable::new(),
        stage2: None,
        ram: heapless::Vec::new(),
        priority: 0,
        fault_handler: None,
        exit_state: 0,
        vm: false,
        paused: false,
        ram_view: None,
        mappings: heapless::Vec::new(),
        console: LineBuffer::new(),
        vcpus: 0,
        ipc_calls: 0,
        signals: 0,
        #[cfg(feature = "counts")]
        counts: ExitCounts { exits: 0, hypercalls: 0, hlts: 0, interrupts: 0, switches: 0, virqs: 0, run_ns: 0 },
    };

    pub fn name(&self) -> &str {
        core::str::from_utf8(&self.name[..self.name_len]).unwrap_or("?")
    }

    pub fn ram_size(&self) -> u64 {
        self.ram.len() as u64 * RAM_CHUNK
    }

    /// Host-physical address of guest-physical `gpa` if it is in this domain's RAM.
    pub fn ram_hpa(&self, gpa: u64) -> Option<u64> {
        let chunk = self.ram.get(usize::try_from(gpa / RAM_CHUNK).ok()?)?;
        Some(chunk + gpa % RAM_CHUNK)
    }
}

impl<F: Stage2Format> Kernel<F> {
    /// Create a domain with `ram_bytes` of zeroed RAM at guest-physical 0.
    pub fn domain_create<P: Platform>(
        &mut self,
        p: &mut P,
        name: &[u8],
        ram_bytes: u64,
        priority: u8,
    ) -> Result<DomainId, Error> {
        if name.is_empty() || name.len() > DOMAIN_NAME_MAX || !name.iter().all(|b| b.is_ascii_graphic()) {
            return Err(Error::InvalidArgument);
        }
        if ram_bytes == 0 || ram_bytes > MAX_RAM_CHUNKS as u64 * RAM_CHUNK || priority == 0 || priority == 255 {
            return Err(Error::InvalidArgument);
        }
        let d = self.domains.iter().position(|d| d.state == DomainState::Free).ok_or(Error::OutOfMemory)?;
        let mut stage2 = Stage2Map::<F>::new(p).map_err(|_| Error::OutOfMemory)?;
        let mut ram: heapless::Vec<u64, MAX_RAM_CHUNKS> = heapless::Vec::new();
        let rwx = Access::READ | Access::WRITE | Access::EXEC;
        for i in 0..ram_bytes.div_ceil(RAM_CHUNK) {
            // (`ram` cannot overflow: at most MAX_RAM_CHUNKS chunks, checked above.)
            let chunk = p.alloc_frames(RAM_CHUNK / PAGE, RAM_CHUNK).inspect(|&hpa| ram.push(hpa).unwrap_or(()));
            if chunk.is_none_or(|hpa| stage2.map(p, i * RAM_CHUNK, hpa, RAM_CHUNK, rwx, MemType::WriteBack).is_err()) {
                Self::free_ram(p, &ram);
                stage2.destroy(p);
                return Err(Error::OutOfMemory);
            }
        }
        let dom = &mut self.domains[d];
        let generation = dom.generation.wrapping_add(1);
        *dom = Domain { state: DomainState::Alive, generation, stage2: Some(stage2), ram, priority, ..Domain::FREE };
        dom.name[..name.len()].copy_from_slice(name);
        dom.name_len = name.len();
        p.domain_named(d as DomainId, dom.name());
        Ok(d as DomainId)
    }

    pub(super) fn free_ram<P: Platform>(p: &mut P, ram: &[u64]) {
        for &hpa in ram {
            p.free_frames(hpa, RAM_CHUNK / PAGE);
        }
    }

    /// Map host memory that is not a region (the boot bundle for dom0) read-only.
    pub fn map_fixed<P: Platform>(
        &mut self,
        p: &mut P,
        d: DomainId,
        gpa: u64,
        hpa: u64,
        size: u64,
    ) -> Result<(), Error> {
        let stage2 = self.domains[d as usize].stage2.as_mut().ok_or(Error::InvalidState)?;
        stage2
            .map(p, gpa, hpa, size.next_multiple_of(PAGE), Access::READ, MemType::WriteBack)
            .map_err(|_| Error::AlreadyMapped)
    }

    /// Walk `[gpa, gpa+len)` of domain `d`'s RAM (only its RAM: never MMIO or regions)
    /// page by page: `each(hpa, offset into the range, bytes)`. The whole range is checked
    /// before anything is visited.
    pub(super) fn for_ram_pages(
        &self,
        d: DomainId,
        gpa: u64,
        len: usize,
        mut each: impl FnMut(u64, usize, usize),
    ) -> Result<(), Error> {
        let dom = &self.domains[d as usize];
        let end = gpa.checked_add(len as u64).ok_or(Error::BadAddress)?;
        if end > dom.ram_size() {
            return Err(Error::BadAddress);
        }
        let mut done = 0usize;
        while done < len {
            let addr = gpa + done as u64;
            let hpa = dom.ram_hpa(addr).ok_or(Error::BadAddress)?;
            let n = ((PAGE - addr % PAGE) as usize).min(len - done);
            each(hpa, done, n);
            done += n;
        }
        Ok(())
    }

    /// Copy `data` into domain `d`'s RAM at `gpa`.
    pub fn write_ram<P: Platform>(&mut self, p: &mut P, d: DomainId, gpa: u64, data: &[u8]) -> Result<(), Error> {
        self.for_ram_pages(d, gpa, data.len(), |hpa, at, n| p.write_phys(hpa, &data[at..at + n]))
    }

    /// Read from domain `d`'s RAM.
    pub fn read_ram<P: Platform>(&self, p: &P, d: DomainId, gpa: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.for_ram_pages(d, gpa, buf.len(), |hpa, at, n| p.read_phys(hpa, &mut buf[at..at + n]))
    }

    /// Stop every vCPU of domain `d` (it stays alive for its handler to inspect).
    pub fn stop_domain(&mut self, d: DomainId) {
        for v in 0..MAX_VCPUS {
            let vc = &self.vcpus[v];
            // Already stopped ones too: one stopped by its fault handler may still owe a
            // reply or be bound to a notification.
            if vc.state != VcpuState::Free && vc.domain == d {
                self.stop_vcpu(v as VcpuId);
            }
        }
    }

    /// Destroy domain `d`: vCPUs, capabilities, mappings, RAM, page tables.
    pub fn domain_destroy<P: Platform>(&mut self, p: &mut P, d: DomainId) {
        self.stop_domain(d);
        // Its RAM leaves every VMM's view before it can go back to the pool.
        self.drop_ram_views(p, d);
        // Devices first: their DMA must stop before any of the domain's memory is freed.
        for i in 0..MAX_DEVICES {
            if self.devices[i].owner == Some(d) {
                self.device_irqs_release(p, i as DeviceId);
                p.device_release(i as DeviceId);
                self.devices[i].owner = None;
            }
        }
        p.dma_space_destroy(d);
        for v in 0..MAX_VCPUS {
            if self.vcpus[v].state != VcpuState::Free && self.vcpus[v].domain == d {
                let g = self.vcpus[v].generation;
                self.vcpus[v] = Vcpu { generation: g, ..Vcpu::FREE };
            }
        }
        let mut caps: heapless::Vec<Capability, { ipc_spec::hypercall::CAP_SLOTS }> = heapless::Vec::new();
        for c in self.domains[d as usize].caps.drain() {
            let _ = caps.push(c);
        }
        for c in caps {
            self.release(p, c.object);
        }
        let mappings = core::mem::take(&mut self.domains[d as usize].mappings);
        for m in mappings {
            self.release(p, Object::Region(m.region));
        }
        // The fault handler holds a reference to its endpoint.
        if let Some((e, _)) = self.domains[d as usize].fault_handler.take() {
            self.release(p, Object::Endpoint(e));
        }
        let dom = &mut self.domains[d as usize];
        if let Some(s) = dom.stage2.take() {
            s.destroy(p);
        }
        let ram = core::mem::take(&mut dom.ram);
        Self::free_ram(p, &ram);
        dom.state = DomainState::Free;
        dom.generation = dom.generation.wrapping_add(1);
        dom.fault_handler = None;
        p.stage2_changed(d);
    }

    /// Destroy every live domain that no chain of domain capabilities from the root reaches.
    /// Without this, domains created by a domain that is then destroyed (or that hold
    /// capabilities to each other in a cycle) would live on with nobody able to destroy
    /// them: their memory and table entries would leak. Returns how many were destroyed.
    pub fn collect_unreachable<P: Platform>(&mut self, p: &mut P) -> u32 {
        let Some(root) = self.root.filter(|&r| self.domains[r as usize].state == DomainState::Alive) else {
            return 0;
        };
        let mut reached = [false; MAX_DOMAINS];
        let mut todo: heapless::Vec<DomainId, MAX_DOMAINS> = heapless::Vec::new();
        reached[root as usize] = true;
        let _ = todo.push(root);
        while let Some(d) = todo.pop() {
            for (_, cap) in self.domains[d as usize].caps.iter() {
                if let Object::Domain(t, g) = cap.object {
                    let target = &self.domains[t as usize];
                    if target.state == DomainState::Alive && target.generation == g && !reached[t as usize] {
                        reached[t as usize] = true;
                        let _ = todo.push(t);
                    }
                }
            }
        }
        let mut destroyed = 0;
        for (d, reached) in reached.into_iter().enumerate() {
            if self.domains[d].state == DomainState::Alive && !reached {
                self.console_flush(p, d as DomainId);
                self.domain_destroy(p, d as DomainId);
                destroyed += 1;
            }
        }
        destroyed
    }
}

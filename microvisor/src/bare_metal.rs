//! The microvisor's [`Platform`]: what the portable kernel needs from this machine —
//! frames, physical memory, the clock, the vCPU hardware and the console.

use ipc_spec::exit::{Event, VcpuState as ArchState};
use ipc_spec::hypercall::CONSOLE_INPUT_BUFFER;
use ipc_spec::Error;
use microvisor::kernel::{
    DeviceId, DomainId, Gpa, Hpa, IrqAllocation, Platform, Regs, VcpuBoot, VcpuId, MAX_DEVICES, MAX_VCPUS, PAGE,
    RAM_CHUNK,
};
use microvisor::pci::{self, AssignedState, ConfigError, Function, MAX_FUNCTIONS};
use microvisor::pci_release;
use microvisor::phys_mem::{PhysRead, PhysWrite};
use microvisor::scrub::ChunkPool;
use microvisor::stage2::TableMemory;
use microvisor::vcpu_hw::VcpuHardware;
// The vendor backend of this build (cargo feature `vmx`) and its stage-2 format.
#[cfg(feature = "vmx")]
pub use microvisor::{ept::Ept as Stage2, vmx::hw::Vmx as Hw};
#[cfg(not(feature = "vmx"))]
pub use microvisor::{npt::Npt as Stage2, svm::hw::Svm as Hw};

use crate::arch::apic::Clock;
use crate::arch::fpu::FpuStates;
use crate::arch::pcie::Ecam;
use crate::arch::phys::{PhysTables, FRAMES};
use crate::arch::serial::{Serial, CONSOLE_LOCK};
use crate::arch::vtd::Iommu;

pub struct BareMetal {
    /// The vCPU hardware (the vendor backend).
    pub hw: Hw,
    pub clock: Clock,
    /// Bumped whenever some stage-2 map shrinks; a vCPU that has not seen the current
    /// value flushes its TLB on entry (TCG has no flush-by-ASID).
    tlb_epoch: u64,
    seen_epoch: [u64; MAX_VCPUS],
    pub fpu: FpuStates,
    pub ecam: Option<Ecam>,
    /// The VT-d unit, when the machine has one: without it no device is given out.
    pub iommu: Option<Iommu>,
    /// Every PCI function found at boot.
    pub functions: heapless::Vec<Function, MAX_FUNCTIONS>,
    /// Kernel device id → index in `functions`, and the filter state while assigned.
    devices: [Option<(usize, Option<AssignedState>)>; MAX_DEVICES],
    /// When a released device's function-level reset started (clock ns): its BARs are
    /// written back, and it may be assigned again, 100 ms later.
    flr_since: [Option<u64>; MAX_DEVICES],
    /// A blocked DMA per domain, waiting for one of its vCPUs to run so it can be sent to
    /// the domain's fault handler: (address, requester id | reason << 16 | write << 24).
    pub pending_dma: [Option<(u64, u64)>; microvisor::kernel::MAX_DOMAINS],
    /// Which device each device vector belongs to.
    vectors: [Option<DeviceId>; microvisor::kernel::DEVICE_VECTORS],
    /// Typed console bytes not yet read (ConsoleRead); beyond the buffer, new bytes are
    /// dropped.
    console_in: heapless::Deque<u8, CONSOLE_INPUT_BUFFER>,
    /// Freed domain RAM chunks, zeroed while the machine is idle (`microvisor::scrub`).
    scrub: ChunkPool,
}

impl BareMetal {
    /// Idle work: zero the next piece of a freed RAM chunk. Whether more is waiting. A
    /// step is 64 KiB: short enough that an interrupt arriving meanwhile is taken late by
    /// little (the run loop lets interrupts in between steps).
    pub fn scrub_step(&mut self) -> bool {
        const STEP: u64 = 64 << 10;
        self.scrub.scrub_step(STEP, |pa, bytes| {
            // SAFETY: `pa..pa + bytes` lies in a RAM chunk the pool holds: freed by its
            // domain (whose device was quiesced and detached first), owned by nobody else
            // until the pool hands it out, inside the identity map.
            unsafe { crate::arch::phys::zero_frames(pa, bytes / PAGE) }
        })
    }

    /// Give every chunk held for scrubbing back to the frame allocator (dirty ones are
    /// zeroed when allocated, as all frames are).
    fn release_scrub_pool(&mut self) {
        self.scrub.drain(|pa| {
            let _ = FRAMES.lock().free(pa, RAM_CHUNK / PAGE);
        });
    }

    /// Built in place in a static: it holds 16 KiB of FPU save areas, too much to pass
    /// through the boot stack. `hw` and `clock` are filled in at boot.
    pub const fn new() -> Self {
        Self {
            hw: Hw::DISABLED,
            clock: Clock::UNCALIBRATED,
            tlb_epoch: 0,
            seen_epoch: [0; MAX_VCPUS],
            fpu: FpuStates::new(),
            ecam: None,
            iommu: None,
            functions: heapless::Vec::new(),
            devices: [const { None }; MAX_DEVICES],
            flr_since: [None; MAX_DEVICES],
            pending_dma: [None; microvisor::kernel::MAX_DOMAINS],
            scrub: ChunkPool::new(RAM_CHUNK),
            vectors: [None; microvisor::kernel::DEVICE_VECTORS],
            console_in: heapless::Deque::new(),
        }
    }

    /// Moves what was typed from the UART's FIFO (16 bytes) into the larger buffer; called
    /// every scheduler tick, so input is not lost while nobody reads it.
    pub fn poll_console(&mut self) {
        while !self.console_in.is_full() {
            let Some(b) = Serial::read_byte() else { break };
            let _ = self.console_in.push_back(b);
        }
    }

    /// Remember that kernel device `dev` is `functions[index]`.
    pub fn bind_device(&mut self, dev: DeviceId, index: usize) {
        if let Some(slot) = self.devices.get_mut(dev as usize) {
            *slot = Some((index, None));
        }
    }

    fn function(&self, dev: DeviceId) -> Option<&Function> {
        let (i, _) = self.devices.get(dev as usize)?.as_ref()?;
        self.functions.get(*i)
    }

    /// Allocate every vCPU's VMCB page up front. They are kept for reuse, so taking them
    /// on first use made a vCPU table slot's first use cost a frame for good (free memory
    /// never came back to its level at boot, which hides leaks). False if memory ran out
    /// (at boot).
    pub fn preallocate_vmcbs(&mut self) -> bool {
        self.hw.preallocate()
    }

    /// Flush the vCPU's TLB on its next entry if some stage-2 map shrank since its last.
    pub fn sync_tlb(&mut self, v: VcpuId) {
        if self.seen_epoch[v as usize] != self.tlb_epoch {
            self.seen_epoch[v as usize] = self.tlb_epoch;
            self.hw.flush_tlb(v);
        }
    }
}

impl TableMemory for BareMetal {
    fn alloc_table(&mut self) -> Option<u64> {
        PhysTables.alloc_table().or_else(|| {
            self.release_scrub_pool();
            PhysTables.alloc_table()
        })
    }
    fn free_table(&mut self, table: u64) {
        PhysTables.free_table(table)
    }
    fn read_entry(&self, table: u64, index: usize) -> u64 {
        PhysTables.read_entry(table, index)
    }
    fn write_entry(&mut self, table: u64, index: usize, entry: u64) {
        PhysTables.write_entry(table, index, entry)
    }
}

// Host-physical memory reached through the identity map, for copies into and out of domain
// RAM. The kernel passes only addresses from a domain's stage-2 translation of its RAM, so
// every access lands in RAM the microvisor gave that domain.
impl PhysRead for BareMetal {
    fn read_phys(&self, hpa: u64, buf: &mut [u8]) {
        // SAFETY: `hpa..hpa+len` is domain RAM within one page (above), identity-mapped.
        unsafe { core::ptr::copy_nonoverlapping(hpa as *const u8, buf.as_mut_ptr(), buf.len()) };
    }
}

impl PhysWrite for BareMetal {
    fn write_phys(&mut self, hpa: u64, data: &[u8]) {
        // SAFETY: as in `read_phys`.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), hpa as *mut u8, data.len()) };
    }
}

impl Platform for BareMetal {
    fn alloc_frames(&mut self, frames: u64, align: u64) -> Option<u64> {
        if frames * PAGE == RAM_CHUNK && align == RAM_CHUNK {
            // Domain RAM: a chunk scrubbed while the machine was idle, if one is ready.
            if let Some(pa) = self.scrub.take_clean() {
                return Some(pa);
            }
        }
        // (The lock is dropped at the end of this statement: releasing the pool takes it.)
        let first = FRAMES.lock().alloc(frames, align);
        let pa = match first {
            Ok(pa) => pa,
            Err(_) => {
                // Memory is short: the chunks held for scrubbing are free memory too.
                self.release_scrub_pool();
                FRAMES.lock().alloc(frames, align).ok()?
            }
        };
        // SAFETY: freshly allocated frames, exclusively ours, inside the identity map.
        unsafe { crate::arch::phys::zero_frames(pa, frames) };
        Some(pa)
    }

    fn free_frames(&mut self, hpa: u64, frames: u64) {
        // A domain's RAM chunk is kept to be zeroed while idle (the device that could DMA
        // into it was quiesced and detached before its domain's memory was freed).
        if frames * PAGE == RAM_CHUNK && self.scrub.take_freed(hpa) {
            return;
        }
        // Frames come back only from the kernel, which got them from alloc_frames; a
        // refused free leaks them rather than handing them out twice.
        let _ = FRAMES.lock().free(hpa, frames);
    }

    fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    fn clock_rate(&self) -> [u64; 2] {
        [self.clock.tsc_start, self.clock.tsc_per_ms]
    }

    fn virq_offered(&mut self, v: VcpuId) -> bool {
        microvisor::kernel::notify::VirqHardware::virq_offered(&mut self.hw, v).is_some()
    }

    fn free_frame_count(&self) -> u64 {
        // Chunks held for scrubbing are free memory (a fuzzer's leak check compares this).
        FRAMES.lock().free_frames() + self.scrub.held() as u64 * (RAM_CHUNK / PAGE)
    }

    fn vcpu_created(&mut self, v: VcpuId, boot: &VcpuBoot) -> Result<(), Error> {
        self.hw.create(v, boot)?;
        self.seen_epoch[v as usize] = self.tlb_epoch;
        self.fpu.reset(v);
        Ok(())
    }

    fn vcpu_state(&mut self, v: VcpuId, regs: &mut Regs, s: &mut ArchState) {
        self.hw.state(v, regs, s);
    }

    fn vcpu_set_state(&mut self, v: VcpuId, regs: &mut Regs, mask: u16, s: &ArchState) {
        self.hw.set_state(v, regs, mask, s);
    }

    fn vcpu_complete(&mut self, v: VcpuId, regs: &mut Regs, len: u8) {
        self.hw.complete(v, regs, len);
    }

    fn vcpu_inject(&mut self, v: VcpuId, event: Event) {
        self.hw.inject(v, event);
    }

    fn stage2_changed(&mut self, _domain: DomainId) {
        self.tlb_epoch += 1;
    }

    fn device_bars(&self, dev: DeviceId) -> heapless::Vec<(u64, u64), 6> {
        // Only page-granular memory BARs are recorded: a smaller one would expose whatever
        // shares its page. I/O BARs are never given out (domains own no ports).
        self.function(dev).map(|f| f.mem_bars.clone()).unwrap_or_default()
    }

    fn device_assign(
        &mut self,
        dev: DeviceId,
        d: DomainId,
        ram: &[u64],
        regions: &[(u64, u64, u64)],
    ) -> Result<(), Error> {
        let Some((index, _)) = self.devices.get(dev as usize).copied().flatten() else {
            return Err(Error::InvalidState);
        };
        let f = self.functions.get(index).ok_or(Error::InvalidState)?;
        let (rid, name) = (f.bdf.requester_id(), f.bdf);
        // After an FLR the function may not be touched for 100 ms (PCIe base spec §6.6.2):
        // refused until then (dom0 retries), then its BARs are written back (the reset
        // cleared them; the new owner maps the boot addresses).
        if let Some(t0) = self.flr_since.get(dev as usize).copied().flatten() {
            if self.clock.now_ns().saturating_sub(t0) < 100_000_000 {
                return Err(Error::DeviceResetting);
            }
            if let Some(ecam) = self.ecam.as_mut() {
                pci::restore_after_reset(ecam, f);
            }
            self.flr_since[dev as usize] = None;
            crate::println!("pci: {name} reset (function-level reset), BARs restored");
        }
        let state = AssignedState::new(f).map_err(config_error)?;
        // Passthrough without an IOMMU would let the domain's device write anywhere.
        let iommu = self.iommu.as_mut().ok_or(Error::InvalidState)?;
        // A function may still be running what firmware left it (SeaBIOS leaves virtio-blk
        // with bus mastering on and a virtqueue in its own memory: once in about 1,000 web
        // test boots it read that ring right after assignment, a blocked DMA charged to the
        // new owner, who was destroyed for it before its first instruction). Stop it, as on
        // release; its driver turns on what it uses (command bits a driver may write).
        if let Some(ecam) = self.ecam.as_mut() {
            pci::quiesce(ecam, name);
        }
        let attached = iommu.ensure_space(d, ram, regions).and_then(|()| iommu.attach(rid, d));
        if let Err(why) = attached {
            crate::println!("iommu: assigning {name}: {why}");
            return Err(Error::OutOfMemory);
        }
        if let Some(Some((_, s))) = self.devices.get_mut(dev as usize) {
            *s = Some(state);
        }
        crate::println!("iommu: {name} assigned to domain {}: DMA confined to its memory", d);
        Ok(())
    }

    fn device_release(&mut self, dev: DeviceId) {
        let Some((index, _)) = self.devices.get(dev as usize).copied().flatten() else { return };
        let Some(bdf) = self.functions.get(index).map(|f| f.bdf) else { return };
        // Stop it for good (`pci_release`): no more bus mastering or decoding, a virtio
        // reset (QEMU completes the requests it holds now, into memory the domain still
        // has, not later into freed memory), a function-level reset where the device has
        // one (the 100 ms the spec asks for before it is touched again are waited by its
        // next assignment, not here), then no DMA path at all.
        if let (Some(ecam), Some(f)) = (self.ecam.as_mut(), self.functions.get(index)) {
            let done = pci_release::release(ecam, f, 1000);
            if done.flr {
                self.flr_since[dev as usize] = Some(self.clock.now_ns());
                crate::println!("pci: {bdf} function-level reset started");
            }
            match done.virtio_reset {
                Some(true) => crate::println!("pci: {bdf} released: virtio reset done"),
                Some(false) => crate::println!("pci: {bdf} released: virtio reset NOT done"),
                None => {}
            }
        }
        if let Some(iommu) = self.iommu.as_mut() {
            if let Err(why) = iommu.detach(bdf.requester_id()) {
                crate::println!("iommu: detaching {bdf}: {why}");
            }
        }
        if let Some(Some((_, s))) = self.devices.get_mut(dev as usize) {
            *s = None;
        }
    }

    fn dma_map(&mut self, d: DomainId, Gpa(gpa): Gpa, Hpa(hpa): Hpa, size: u64) {
        if let Some(iommu) = self.iommu.as_mut() {
            iommu.map(d, gpa, hpa, size);
        }
    }

    fn dma_unmap(&mut self, d: DomainId, Gpa(gpa): Gpa, size: u64) {
        if let Some(iommu) = self.iommu.as_mut() {
            iommu.unmap(d, gpa, size);
        }
    }

    fn dma_space_destroy(&mut self, d: DomainId) {
        if let Some(iommu) = self.iommu.as_mut() {
            iommu.destroy_space(d);
        }
    }

    fn irq_allocate(&mut self, dev: DeviceId) -> Result<IrqAllocation, Error> {
        let rid = self.function(dev).map(|f| f.bdf.requester_id()).ok_or(Error::InvalidState)?;
        let i = self.vectors.iter().position(Option::is_none).ok_or(Error::OutOfMemory)?;
        let vector = microvisor::kernel::DEVICE_VECTOR_BASE + i as u8;
        let iommu = self.iommu.as_mut().ok_or(Error::InvalidState)?;
        let handle = iommu.alloc_irte(dev, vector, rid).map_err(|_| Error::OutOfMemory)?;
        self.vectors[i] = Some(dev);
        let address = microvisor::iommu::irte::msi_address(handle) as u64;
        Ok(IrqAllocation { vector, msi_address: address, msi_data: microvisor::iommu::irte::MSI_DATA as u64, handle })
    }

    fn irq_release(&mut self, dev: DeviceId) {
        if let Some(iommu) = self.iommu.as_mut() {
            iommu.free_irtes(dev);
        }
        for v in self.vectors.iter_mut() {
            if *v == Some(dev) {
                *v = None;
            }
        }
    }

    fn pci_config_read(&mut self, dev: DeviceId, offset: u64, size: u64) -> Result<u32, Error> {
        let (Some(ecam), Some(Some((i, Some(state))))) = (&self.ecam, self.devices.get(dev as usize)) else {
            return Err(Error::InvalidState);
        };
        let f = self.functions.get(*i).ok_or(Error::InvalidState)?;
        let (offset, size) = config_args(offset, size)?;
        pci::config_read(ecam, f, state, offset, size).map_err(config_error)
    }

    fn pci_config_write(&mut self, dev: DeviceId, offset: u64, size: u64, value: u32) -> Result<(), Error> {
        let (Some(ecam), Some(Some((i, Some(state))))) = (&mut self.ecam, self.devices.get_mut(dev as usize)) else {
            return Err(Error::InvalidState);
        };
        let f = self.functions.get(*i).ok_or(Error::InvalidState)?;
        let (offset, size) = config_args(offset, size)?;
        pci::config_write(ecam, f, state, offset, size, value).map(|_| ()).map_err(config_error)
    }

    fn domain_named(&mut self, domain: DomainId, name: &str) {
        crate::arch::cpu::name_domain(domain, name);
    }

    fn console_read(&mut self, out: &mut [u8]) -> usize {
        self.poll_console();
        let n = out.len().min(self.console_in.len());
        for b in &mut out[..n] {
            *b = self.console_in.pop_front().unwrap_or(0);
        }
        n
    }

    fn console_line(&mut self, domain: &str, line: &[u8]) {
        #[cfg(all(feature = "trace", not(feature = "vmx")))]
        crate::trace::console_line(line);
        let _guard = CONSOLE_LOCK.lock();
        Serial::write_bytes(b"[");
        Serial::write_bytes(domain.as_bytes());
        Serial::write_bytes(b"] ");
        Serial::write_bytes(line);
        Serial::write_bytes(b"\n");
    }
}

fn config_args(offset: u64, size: u64) -> Result<(u16, u8), Error> {
    let offset = u16::try_from(offset).map_err(|_| Error::InvalidArgument)?;
    let size = u8::try_from(size).map_err(|_| Error::InvalidArgument)?;
    Ok((offset, size))
}

fn config_error(e: ConfigError) -> Error {
    match e {
        ConfigError::NotEndpoint => Error::InvalidState,
        _ => Error::InvalidArgument,
    }
}

//! The microvisor's kernel objects and their state machines: domains, vCPUs, memory
//! regions, endpoints, notifications, capabilities, the scheduler and IPC.
//!
//! Everything here is portable and host-tested. The hardware is reached only through the
//! [`Platform`] trait (frames, physical memory, the VMCB behind a vCPU), so the same code
//! runs under `cargo test` with a simulated platform and in root mode on the machine.
//!
//! One CPU for now: there is a single `current` vCPU.

pub mod cap_ops;
pub mod caps;
pub mod device;
pub mod dispatch;
pub mod domain;
pub mod exits;
pub mod ipc;
pub mod notify;
pub mod region;
pub mod sched;
pub mod scheduling;
pub mod vcpu;

use ipc_spec::exit::{ExitKind, VcpuState as ArchState};
use ipc_spec::hypercall::{rights, DOMAIN_NAME_MAX};
use ipc_spec::Error;

use crate::console::LineBuffer;
use crate::phys_mem::{PhysRead, PhysWrite};
use crate::stage2::{Access, MemType, Stage2Format, Stage2Map, TableMemory};
use caps::{CapTable, Capability, Object};
use sched::{Queue, RunQueue};

pub use device::{Device, IrqRoute, DEVICE_VECTORS, DEVICE_VECTOR_BASE};
pub use domain::{Domain, DomainState, Mapping};
pub use region::Region;
pub use vcpu::{PendingExit, Regs, Vcpu, VcpuBoot, VcpuState};

pub type DomainId = u16;
pub type VcpuId = u16;
pub type RegionId = u16;
pub type EndpointId = u16;
pub type NotificationId = u16;
pub type DeviceId = u16;

pub const MAX_DOMAINS: usize = 16;
pub const MAX_VCPUS: usize = 32;
pub const MAX_REGIONS: usize = 128;
pub const MAX_ENDPOINTS: usize = 64;
pub const MAX_NOTIFICATIONS: usize = 64;
pub const MAX_DEVICES: usize = 32;
/// 2 MiB chunks of RAM per domain (1 GiB).
pub const MAX_RAM_CHUNKS: usize = 512;
pub const MAX_MAPPINGS: usize = 16;
pub const RAM_CHUNK: u64 = 2 << 20;
pub const PAGE: u64 = 4096;
/// Scheduler ticks per time slice.
pub const TIME_SLICE_TICKS: u32 = 5;

/// What the kernel needs from the machine.
pub trait Platform: TableMemory + PhysRead + PhysWrite {
    /// `frames` contiguous zeroed frames aligned to `align` bytes.
    fn alloc_frames(&mut self, frames: u64, align: u64) -> Option<u64>;
    fn free_frames(&mut self, hpa: u64, frames: u64);
    /// Nanoseconds since boot.
    fn now_ns(&self) -> u64;
    /// How domains compute [`Self::now_ns`] from the TSC themselves: [TSC at zero, ticks
    /// per ms] (`Clock`'s RSI and RDX; 0 per ms: they cannot).
    fn clock_rate(&self) -> [u64; 2] {
        [0, 0]
    }
    /// Build the hardware state (VMCB/VMCS) of a new vCPU; fails when memory for it or a
    /// TLB tag runs out.
    fn vcpu_created(&mut self, vcpu: VcpuId, boot: &VcpuBoot) -> Result<(), Error>;
    /// Copy the vCPU's architectural state into `s` (GPRs from `regs`, after syncing its
    /// RSP and RFLAGS from the hardware).
    fn vcpu_state(&mut self, vcpu: VcpuId, regs: &mut Regs, s: &mut ArchState);
    /// Write the groups `mask` of `s` to the vCPU (GPRs and RIP into `regs`, RSP and
    /// RFLAGS into `regs` and the hardware). The backend keeps what the hardware demands
    /// (EFER.SVME, for instance).
    fn vcpu_set_state(&mut self, vcpu: VcpuId, regs: &mut Regs, mask: u16, s: &ArchState);
    /// The emulated instruction of `len` bytes is complete: RIP moves past it and its
    /// interrupt shadow is over.
    fn vcpu_complete(&mut self, vcpu: VcpuId, regs: &mut Regs, len: u8);
    /// Inject `event` at the vCPU's next entry.
    fn vcpu_inject(&mut self, vcpu: VcpuId, event: ipc_spec::exit::Event);
    /// The domain's stage-2 mappings shrank: its TLB entries must be flushed.
    fn stage2_changed(&mut self, domain: DomainId);
    /// One line of a domain's console output.
    fn console_line(&mut self, domain: &str, line: &[u8]);
    /// Free 4 KiB frames in the pool (for `MachineStatus`, which makes leaks measurable).
    fn free_frame_count(&self) -> u64;
    /// A domain got its name (at creation): lets fault reports name it.
    fn domain_named(&mut self, domain: DomainId, name: &str);
    /// Takes up to `out.len()` bytes typed on the console; returns how many.
    fn console_read(&mut self, _out: &mut [u8]) -> usize {
        0
    }
    /// A virtual interrupt is offered to `vcpu` and not yet taken (SVM: V_IRQ set): it
    /// must not sleep in `SignalHalt` ([`notify::VirqHardware::virq_offered`]; no default,
    /// so that no platform forgets it and loses a wake-up).
    fn virq_offered(&mut self, vcpu: VcpuId) -> bool;

    // Device passthrough.

    /// Memory BARs of a device: (physical address, size) pairs, page aligned.
    fn device_bars(&self, dev: DeviceId) -> heapless::Vec<(u64, u64), 6>;
    /// Point the device's DMA at domain `d`'s IOMMU space, built (if new) from its RAM
    /// (2 MiB chunks from guest-physical 0) and its region mappings (gpa, hpa, size).
    fn device_assign(
        &mut self,
        dev: DeviceId,
        d: DomainId,
        ram: &[u64],
        regions: &[(u64, u64, u64)],
    ) -> Result<(), Error>;
    /// Quiesce the device (bus mastering off, reset) and block its DMA.
    fn device_release(&mut self, dev: DeviceId);
    /// A region was mapped into / unmapped from domain `d`: mirror it in its IOMMU space.
    fn dma_map(&mut self, d: DomainId, gpa: Gpa, hpa: Hpa, size: u64);
    fn dma_unmap(&mut self, d: DomainId, gpa: Gpa, size: u64);
    /// Domain `d` is gone: free its IOMMU space.
    fn dma_space_destroy(&mut self, d: DomainId);
    /// Filtered configuration-space access to a device (the kernel checked ownership).
    fn pci_config_read(&mut self, dev: DeviceId, offset: u64, size: u64) -> Result<u32, Error>;
    fn pci_config_write(&mut self, dev: DeviceId, offset: u64, size: u64, value: u32) -> Result<(), Error>;
    /// A host vector and an interrupt-remapping entry for the device.
    fn irq_allocate(&mut self, dev: DeviceId) -> Result<IrqAllocation, Error>;
    /// Give back every vector and remapping entry of the device.
    fn irq_release(&mut self, dev: DeviceId);
}

/// A guest-physical address (where a domain sees memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gpa(pub u64);

/// A host-physical address (where the memory really is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hpa(pub u64);

/// What [`Platform::irq_allocate`] hands out for a device interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqAllocation {
    /// The host vector it arrives on.
    pub vector: u8,
    /// The remappable-format MSI address and data the driver programs into the device.
    pub msi_address: u64,
    pub msi_data: u64,
    /// The interrupt-remapping entry's index.
    pub handle: u16,
}

/// The hypercall error for a failed stage-2 change.
pub(crate) fn stage2_error(e: crate::stage2::Stage2Error) -> Error {
    match e {
        crate::stage2::Stage2Error::AlreadyMapped { .. } => Error::AlreadyMapped,
        crate::stage2::Stage2Error::NoTableMemory => Error::OutOfMemory,
        _ => Error::InvalidArgument,
    }
}

pub struct Endpoint {
    pub refs: u32,
    pub senders: Queue,
    pub receivers: Queue,
}

pub struct Notification {
    pub refs: u32,
    pub bits: u64,
    pub waiter: Option<VcpuId>,
    /// vCPU and vector it is delivered to as a virtual interrupt.
    pub bound: Option<(VcpuId, u8)>,
    /// Virtual timer: deadline (ns) and the bits it signals.
    pub timer: Option<(u64, u64)>,
}

/// Something the machine must do after a kernel operation, beyond running `current`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Power off with this status (a shutdown by the holder of the machine capability).
    PowerOff(u64),
    /// A domain called DomainExit; `handled`: its fault handler was told.
    Exited { domain: DomainId, status: u64, handled: bool },
}

/// All kernel state.
pub struct Kernel<F: Stage2Format> {
    pub domains: [Domain<F>; MAX_DOMAINS],
    pub vcpus: [Vcpu; MAX_VCPUS],
    /// Queue links of the vCPUs (run queue or endpoint queue).
    pub next: [Option<VcpuId>; MAX_VCPUS],
    pub regions: [Region; MAX_REGIONS],
    pub endpoints: [Endpoint; MAX_ENDPOINTS],
    pub notifications: [Notification; MAX_NOTIFICATIONS],
    pub devices: [Device; MAX_DEVICES],
    /// Device interrupt routes, by host vector − [`DEVICE_VECTOR_BASE`].
    pub irq_routes: [Option<IrqRoute>; DEVICE_VECTORS],
    pub runq: RunQueue,
    pub current: Option<VcpuId>,
    /// The domain every other one must be reachable from (dom0): when a domain is destroyed,
    /// the domains no chain of domain capabilities from the root leads to any more are
    /// destroyed too ([`Self::collect_unreachable`]). `None` (host tests): no collection.
    pub root: Option<DomainId>,
    next_cap_id: u32,
    /// Statistics for the status page and benchmarks.
    pub stats: Stats,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Hypercalls other than Call and ReplyRecv.
    pub hypercalls: u64,
    /// IPC round trips (Call; the ReplyRecv that answers one is not counted again).
    pub ipc_calls: u64,
    pub signals: u64,
    pub ticks: u64,
    #[cfg(feature = "counts")]
    /// Nanoseconds the machine spent idle (every vCPU waiting), by the microvisor's clock:
    /// under `-icount` the rest of the time is instructions executed.
    pub idle_ns: u64,
}

#[cfg(feature = "counts")]
/// A console line with this in it (a block benchmark result, `cargo xtask bench blk`) is
/// followed by a line of exit counts (`Kernel::print_counts`), so the benchmark can give
/// exits, world switches and virtual interrupts per request.
const BENCH_LINE: &[u8] = b"bench blk: via=";

impl<F: Stage2Format> Default for Kernel<F> {
    fn default() -> Self {
        Self::new()
    }
}

impl<F: Stage2Format> Kernel<F> {
    pub const fn new() -> Self {
        Self {
            domains: [const { Domain::FREE }; MAX_DOMAINS],
            vcpus: [Vcpu::FREE; MAX_VCPUS],
            next: [None; MAX_VCPUS],
            regions: [const { Region { refs: 0, hpa: 0, frames: 0 } }; MAX_REGIONS],
            endpoints: [const { Endpoint { refs: 0, senders: Queue::new(), receivers: Queue::new() } }; MAX_ENDPOINTS],
            notifications: [const { Notification { refs: 0, bits: 0, waiter: None, bound: None, timer: None } };
                MAX_NOTIFICATIONS],
            devices: [Device { present: false, rid: 0, vendor: 0, device: 0, class: 0, owner: None }; MAX_DEVICES],
            irq_routes: [None; DEVICE_VECTORS],
            runq: RunQueue::new(),
            current: None,
            root: None,
            // All-zero initial state keeps the kernel in .bss, not in the loaded image.
            next_cap_id: 0,
            stats: Stats {
                hypercalls: 0,
                ipc_calls: 0,
                signals: 0,
                ticks: 0,
                #[cfg(feature = "counts")]
                idle_ns: 0,
            },
        }
    }

    /// Live objects per table: (domains, vCPUs, regions, endpoints, notifications).
    pub fn object_counts(&self) -> (u64, u64, u64, u64, u64) {
        let count = |n: usize| n as u64;
        (
            count(self.domains.iter().filter(|d| d.state == DomainState::Alive).count()),
            count(self.vcpus.iter().filter(|v| v.state != VcpuState::Free).count()),
            count(self.regions.iter().filter(|r| r.refs > 0).count()),
            count(self.endpoints.iter().filter(|e| e.refs > 0).count()),
            count(self.notifications.iter().filter(|n| n.refs > 0).count()),
        )
    }

    pub fn endpoint_create(&mut self) -> Result<EndpointId, Error> {
        let e = self.endpoints.iter().position(|e| e.refs == 0).ok_or(Error::OutOfMemory)?;
        self.endpoints[e] = Endpoint { refs: 0, senders: Queue::new(), receivers: Queue::new() };
        Ok(e as EndpointId)
    }

    pub fn notification_create(&mut self) -> Result<NotificationId, Error> {
        let n = self.notifications.iter().position(|n| n.refs == 0).ok_or(Error::OutOfMemory)?;
        self.notifications[n] = Notification { refs: 0, bits: 0, waiter: None, bound: None, timer: None };
        Ok(n as NotificationId)
    }

    /// Console output of domain `d`, assembled into lines for the platform.
    #[cfg(not(feature = "counts"))]
    pub fn console_write<P: Platform>(&mut self, p: &mut P, d: DomainId, bytes: &[u8]) {
        let dom = &mut self.domains[d as usize];
        let name = core::str::from_utf8(&dom.name[..dom.name_len]).unwrap_or("?");
        dom.console.push(bytes, |line| p.console_line(name, line));
    }

    /// Console output of domain `d`, assembled into lines for the platform; a block
    /// benchmark's result line is followed by the exit counts (the `counts` build).
    #[cfg(feature = "counts")]
    pub fn console_write<P: Platform>(&mut self, p: &mut P, d: DomainId, bytes: &[u8]) {
        let dom = &mut self.domains[d as usize];
        let name = core::str::from_utf8(&dom.name[..dom.name_len]).unwrap_or("?");
        let mut bench = false;
        dom.console.push(bytes, |line| {
            bench |= line.windows(BENCH_LINE.len()).any(|w| w == BENCH_LINE);
            p.console_line(name, line)
        });
        if bench {
            self.print_counts(p);
        }
    }

    #[cfg(feature = "counts")]
    /// One console line with every live domain's [`domain::ExitCounts`] and signals.
    pub fn print_counts<P: Platform>(&self, p: &mut P) {
        use core::fmt::Write;
        let mut s: heapless::String<800> = heapless::String::new();
        let _ = s.push_str("counts:");
        for dom in self.domains.iter().filter(|d| d.state == DomainState::Alive) {
            let c = dom.counts;
            // A line that does not fit is cut short: the counts are diagnostics.
            let _ = write!(
                s,
                " {} exits={} hc={} hlt={} int={} sw={} virq={} sig={} run={};",
                dom.name(),
                c.exits,
                c.hypercalls,
                c.hlts,
                c.interrupts,
                c.switches,
                c.virqs,
                dom.signals,
                c.run_ns
            );
        }
        let _ = write!(s, " (machine) idle={} now={};", self.stats.idle_ns, p.now_ns());
        p.console_line("microvisor", s.as_bytes());
    }

    pub fn console_flush<P: Platform>(&mut self, p: &mut P, d: DomainId) {
        let dom = &mut self.domains[d as usize];
        let name = core::str::from_utf8(&dom.name[..dom.name_len]).unwrap_or("?");
        dom.console.flush(|line| p.console_line(name, line));
    }

    /// Does any vCPU still have work (running, ready, or blocked on something that can
    /// still happen)? False when every vCPU is stopped or free.
    pub fn any_alive(&self) -> bool {
        self.vcpus.iter().any(|v| !matches!(v.state, VcpuState::Free | VcpuState::Stopped | VcpuState::Created))
    }

    /// Earliest pending virtual timer deadline (the tests check timers with it).
    #[cfg(test)]
    pub fn next_deadline(&self) -> Option<u64> {
        self.notifications.iter().filter_map(|n| n.timer.map(|(t, _)| t)).min()
    }
}

#[cfg(test)]
mod signal_fast_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod wakeup_model;

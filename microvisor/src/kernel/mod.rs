//! The microvisor's kernel objects and their state machines: domains, vCPUs, memory
//! regions, endpoints, notifications, capabilities, the scheduler and IPC.
//!
//! Everything here is portable and host-tested. The hardware is reached only through the
//! [`Platform`] trait (frames, physical memory, the VMCB behind a vCPU), so the same code
//! runs under `cargo test` with a simulated platform and in root mode on the machine.
//!
//! One CPU for now: there is a single `current` vCPU.

pub mod caps;
pub mod dispatch;
pub mod exits;
pub mod ipc;
pub mod notify;
pub mod sched;

use ipc_spec::exit::{ExitKind, VcpuState as ArchState};
use ipc_spec::hypercall::{rights, DOMAIN_NAME_MAX};
use ipc_spec::Error;

use crate::console::LineBuffer;
use crate::guest_memory::{PhysRead, PhysWrite};
use crate::stage2::{Access, MemType, Stage2Format, Stage2Map, TableMemory};
use caps::{CapTable, Capability, Object};
use sched::{Queue, RunQueue};

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

/// A vCPU's general registers. The first fourteen are laid out as the world-switch
/// assembly expects; RAX and RIP live in the VMCB and are synced around each run. RSP and
/// RFLAGS stay in the hardware state (VMCB or VMCS) and are copied here only while an exit
/// message is built or its reply applied: the hypercall path never touches them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rax: u64,
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
}

impl Regs {
    /// The sixteen general registers in instruction-encoding order (RAX, RCX, RDX, RBX,
    /// RSP, RBP, RSI, RDI, R8..R15), as the exit ABI's GPR group carries them.
    pub fn gprs(&self) -> [u64; 16] {
        let r = self;
        [r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15]
    }

    pub fn set_gprs(&mut self, g: &[u64; 16]) {
        let r = self;
        [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14,
            r.r15,
        ] = *g;
    }
}

/// What a new vCPU starts with; the platform builds the VMCB from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuBoot {
    pub entry: u64,
    pub rbx: u64,
    /// The domain's index; the hardware backend derives its TLB tag (ASID/VPID) from it.
    pub domain: DomainId,
    pub stage2_root: u64,
    /// The domain is a VM: CPUID and MSRs go to its VMM, the MSRs VMLOAD/VMSAVE switch are
    /// the guest's own.
    pub vm: bool,
}

/// What the kernel needs from the machine.
pub trait Platform: TableMemory + PhysRead + PhysWrite {
    /// `frames` contiguous zeroed frames aligned to `align` bytes.
    fn alloc_frames(&mut self, frames: u64, align: u64) -> Option<u64>;
    fn free_frames(&mut self, hpa: u64, frames: u64);
    /// Nanoseconds since boot.
    fn now_ns(&self) -> u64;
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
    fn free_frame_count(&self) -> u64 {
        0
    }
    /// A domain got its name (at creation): lets fault reports name it.
    fn domain_named(&mut self, domain: DomainId, name: &str);

    // Device passthrough. The defaults describe a machine without an IOMMU or devices.

    /// Memory BARs of a device: (physical address, size) pairs, page aligned.
    fn device_bars(&self, _dev: DeviceId) -> heapless::Vec<(u64, u64), 6> {
        heapless::Vec::new()
    }
    /// Point the device's DMA at domain `d`'s IOMMU space, built (if new) from its RAM
    /// (2 MiB chunks from guest-physical 0) and its region mappings (gpa, hpa, size).
    fn device_assign(
        &mut self,
        _dev: DeviceId,
        _d: DomainId,
        _ram: &[u64],
        _regions: &[(u64, u64, u64)],
    ) -> Result<(), Error> {
        Err(Error::InvalidState)
    }
    /// Quiesce the device (bus mastering off, reset) and block its DMA.
    fn device_release(&mut self, _dev: DeviceId) {}
    /// A region was mapped into / unmapped from domain `d`: mirror it in its IOMMU space.
    fn dma_map(&mut self, _d: DomainId, _gpa: u64, _hpa: u64, _size: u64) {}
    fn dma_unmap(&mut self, _d: DomainId, _gpa: u64, _size: u64) {}
    /// Domain `d` is gone: free its IOMMU space.
    fn dma_space_destroy(&mut self, _d: DomainId) {}
    /// Filtered configuration-space access to a device (the kernel checked ownership).
    fn pci_config_read(&mut self, _dev: DeviceId, _offset: u64, _size: u64) -> Result<u32, Error> {
        Err(Error::InvalidState)
    }
    fn pci_config_write(&mut self, _dev: DeviceId, _offset: u64, _size: u64, _value: u32) -> Result<(), Error> {
        Err(Error::InvalidState)
    }
    /// The oldest IOMMU fault record: (requester id, address, info), and how many remain.
    fn iommu_fault(&mut self) -> Option<((u16, u64, u64), u64)> {
        None
    }
    /// A host vector and an interrupt-remapping entry for the device: (vector, MSI
    /// address, MSI data, handle).
    fn irq_allocate(&mut self, _dev: DeviceId) -> Result<(u8, u64, u64, u16), Error> {
        Err(Error::InvalidState)
    }
    /// Give back every vector and remapping entry of the device.
    fn irq_release(&mut self, _dev: DeviceId) {}
}

/// Where a device interrupt (by host vector) goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqRoute {
    pub device: DeviceId,
    pub notification: NotificationId,
}

/// Host vectors the microvisor hands out for device interrupts.
pub const DEVICE_VECTOR_BASE: u8 = 0x30;
pub const DEVICE_VECTORS: usize = 32;

/// A PCI function the microvisor found at boot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Device {
    pub present: bool,
    /// Requester id: bus << 8 | device << 3 | function.
    pub rid: u16,
    pub vendor: u16,
    pub device: u16,
    /// class << 16 | subclass << 8 | programming interface.
    pub class: u32,
    pub owner: Option<DomainId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    Free,
    /// Created, not started yet.
    Created,
    /// The one running on the CPU.
    Running,
    /// In the run queue.
    Ready,
    /// Waiting in an endpoint's send queue (a call, or a fault message).
    BlockedSend(EndpointId),
    /// Waiting in an endpoint's receive queue.
    BlockedRecv(EndpointId),
    /// Called a server that has the message; waits for its reply.
    BlockedReply(VcpuId),
    /// Faulted; the fault message is with this handler vCPU, which decides its fate.
    BlockedFault(VcpuId),
    BlockedWait(NotificationId),
    /// Executed HLT; a bound notification wakes it.
    Halted,
    /// Its domain (a VM) is paused; it becomes ready when the domain resumes.
    Paused,
    Stopped,
}

/// An exit on its way to the domain's exit handler (see `ipc_spec::exit`): the kind and
/// the facts of the message's words 2 and 3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingExit {
    pub kind: ExitKind,
    /// Length of the exiting instruction, 0 if unknown.
    pub insn_len: u8,
    pub a: u64,
    pub b: u64,
}

impl PendingExit {
    pub const fn new(kind: ExitKind, a: u64, b: u64) -> Self {
        Self { kind, insn_len: 0, a, b }
    }
}

pub struct Vcpu {
    pub state: VcpuState,
    pub domain: DomainId,
    pub generation: u32,
    pub priority: u8,
    pub regs: Regs,
    /// Server side: the caller waiting for our reply. Valid only while that caller is
    /// `BlockedReply`/`BlockedFault(this vCPU)`; every user checks that (a stale value is
    /// harmless).
    pub reply_to: Option<VcpuId>,
    /// Badge of the capability used for a pending call.
    pub send_badge: u64,
    /// An exit message waiting to be delivered / answered, instead of the registers.
    pub exit: Option<PendingExit>,
    /// Host-physical address of the message page, if registered.
    pub msg_page: Option<u64>,
    /// Pending virtual interrupt vectors (bit n = vector n).
    pub pending_irqs: [u64; 4],
    /// A notification bound to this vCPU's receive (NotificationBind with vector 0).
    pub recv_notification: Option<NotificationId>,
    pub slice_left: u32,
    pub index_in_domain: u8,
    /// Its domain is a VM (a copy of the domain's flag, next to the registers the exit
    /// path reads anyway).
    pub vm: bool,
}

impl Vcpu {
    const FREE: Vcpu = Vcpu {
        state: VcpuState::Free,
        domain: 0,
        generation: 0,
        priority: 0,
        regs: Regs {
            rbx: 0,
            rcx: 0,
            rdx: 0,
            rsi: 0,
            rdi: 0,
            rbp: 0,
            r8: 0,
            r9: 0,
            r10: 0,
            r11: 0,
            r12: 0,
            r13: 0,
            r14: 0,
            r15: 0,
            rax: 0,
            rip: 0,
            rsp: 0,
            rflags: 0,
        },
        reply_to: None,
        send_badge: 0,
        exit: None,
        msg_page: None,
        pending_irqs: [0; 4],
        recv_notification: None,
        slice_left: 0,
        index_in_domain: 0,
        vm: false,
    };

    /// The lowest pending virtual interrupt, taken out of the pending set.
    pub fn take_irq(&mut self) -> Option<u8> {
        for (i, w) in self.pending_irqs.iter_mut().enumerate() {
            if *w != 0 {
                let bit = w.trailing_zeros();
                *w &= !(1 << bit);
                return Some((i as u32 * 64 + bit) as u8);
            }
        }
        None
    }

    pub fn has_irq(&self) -> bool {
        self.pending_irqs.iter().any(|w| *w != 0)
    }
}

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
    name: [u8; DOMAIN_NAME_MAX],
    name_len: usize,
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
}

impl<F: Stage2Format> Domain<F> {
    const FREE: Self = Self {
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

pub struct Region {
    /// Capabilities plus mappings referring to it; 0 = free.
    pub refs: u32,
    pub hpa: u64,
    pub frames: u64,
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
}

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
            stats: Stats { hypercalls: 0, ipc_calls: 0, signals: 0, ticks: 0 },
        }
    }

    // ---- capabilities ------------------------------------------------------------------

    fn new_cap(&mut self, object: Object, rights: u64, badge: u64, parent: u32) -> Capability {
        // Ids start at 1 (0 means "no parent") and skip 0 when they wrap.
        self.next_cap_id = self.next_cap_id.wrapping_add(1).max(1);
        Capability { object, rights, badge, id: self.next_cap_id, parent }
    }

    /// Count a new reference to a reference-counted object.
    fn retain(&mut self, object: Object) {
        match object {
            Object::Region(r) => self.regions[r as usize].refs += 1,
            Object::Endpoint(e) => self.endpoints[e as usize].refs += 1,
            Object::Notification(n) => self.notifications[n as usize].refs += 1,
            _ => {}
        }
    }

    /// Drop a reference; the object is freed with its last one.
    fn release<P: Platform>(&mut self, p: &mut P, object: Object) {
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

    pub fn lookup_domain(&self, caller: DomainId, slot: u64) -> Result<DomainId, Error> {
        match self.lookup(caller, slot, rights::CONTROL)?.object {
            Object::Domain(d, _) => Ok(d),
            _ => Err(Error::WrongType),
        }
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

    // ---- scheduling --------------------------------------------------------------------

    /// Put a vCPU in the run queue.
    pub fn make_ready(&mut self, v: VcpuId) {
        let vcpu = &mut self.vcpus[v as usize];
        // (Only a VM can be paused: ordinary domains pay one test of a flag at hand.)
        if vcpu.vm && self.domains[vcpu.domain as usize].paused {
            vcpu.state = VcpuState::Paused;
            return;
        }
        vcpu.state = VcpuState::Ready;
        let prio = vcpu.priority;
        self.runq.push(v, prio, &mut self.next);
        // A higher-priority vCPU takes the CPU at once.
        if let Some(c) = self.current {
            if prio > self.vcpus[c as usize].priority {
                self.preempt();
            }
        }
    }

    /// The running vCPU goes back to the run queue; the best ready one runs.
    pub fn preempt(&mut self) {
        if let Some(c) = self.current.take() {
            let vcpu = &mut self.vcpus[c as usize];
            vcpu.state = VcpuState::Ready;
            let prio = vcpu.priority;
            self.runq.push(c, prio, &mut self.next);
        }
        self.schedule();
    }

    /// If nothing runs, run the highest-priority ready vCPU.
    pub fn schedule(&mut self) {
        if self.current.is_some() {
            return;
        }
        if let Some(v) = self.runq.pop_highest(&mut self.next) {
            self.switch_to(v);
        }
    }

    /// Make `v` the running vCPU (it must be out of every queue).
    /// (A vCPU keeps what is left of its time slice; one that has used it up is rotated at
    /// the next tick.)
    pub fn switch_to(&mut self, v: VcpuId) {
        self.vcpus[v as usize].state = VcpuState::Running;
        self.current = Some(v);
    }

    /// The running vCPU stops running with `state` (a blocked or stopped state).
    pub fn block_current(&mut self, state: VcpuState) {
        if let Some(c) = self.current.take() {
            self.vcpus[c as usize].state = state;
        }
    }

    /// Timer tick: fire due virtual timers and rotate equal-priority vCPUs.
    pub fn tick(&mut self, now_ns: u64) {
        self.stats.ticks += 1;
        self.fire_timers(now_ns);
        if let Some(c) = self.current {
            let vcpu = &mut self.vcpus[c as usize];
            vcpu.slice_left = vcpu.slice_left.saturating_sub(1);
            if vcpu.slice_left == 0 {
                // Slice used up: a fresh one, and equal or higher priorities go first.
                vcpu.slice_left = TIME_SLICE_TICKS;
                let prio = vcpu.priority;
                if self.runq.highest().is_some_and(|h| h >= prio) {
                    self.preempt();
                }
            }
        } else {
            self.schedule();
        }
    }

    /// The running vCPU executed HLT.
    pub fn halt(&mut self, v: VcpuId) {
        if self.vcpus[v as usize].has_irq() {
            return;
        }
        if self.current == Some(v) {
            self.block_current(VcpuState::Halted);
            self.schedule();
        }
    }

    /// Give up the CPU to an equal- or higher-priority ready vCPU.
    pub fn yield_current(&mut self) {
        if let Some(c) = self.current {
            if self.runq.highest().is_some_and(|h| h >= self.vcpus[c as usize].priority) {
                self.preempt();
            }
        }
    }

    // ---- domains and vCPUs --------------------------------------------------------------

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
        let chunks = ram_bytes.div_ceil(RAM_CHUNK);
        for i in 0..chunks {
            let hpa = match p.alloc_frames(RAM_CHUNK / PAGE, RAM_CHUNK) {
                Some(h) => h,
                None => {
                    Self::free_ram(p, &ram);
                    stage2.destroy(p);
                    return Err(Error::OutOfMemory);
                }
            };
            let _ = ram.push(hpa);
            if stage2
                .map(p, i * RAM_CHUNK, hpa, RAM_CHUNK, Access::READ | Access::WRITE | Access::EXEC, MemType::WriteBack)
                .is_err()
            {
                Self::free_ram(p, &ram);
                stage2.destroy(p);
                return Err(Error::OutOfMemory);
            }
        }
        let dom = &mut self.domains[d];
        dom.state = DomainState::Alive;
        dom.generation = dom.generation.wrapping_add(1);
        dom.name = [0; DOMAIN_NAME_MAX];
        dom.name[..name.len()].copy_from_slice(name);
        dom.name_len = name.len();
        dom.stage2 = Some(stage2);
        dom.ram = ram;
        dom.priority = priority;
        dom.fault_handler = None;
        (dom.exit_state, dom.vm, dom.paused, dom.ram_view) = (0, false, false, None);
        dom.mappings.clear();
        dom.console = LineBuffer::new();
        (dom.vcpus, dom.ipc_calls, dom.signals) = (0, 0, 0);
        p.domain_named(d as DomainId, dom.name());
        Ok(d as DomainId)
    }

    fn free_ram<P: Platform>(p: &mut P, ram: &[u64]) {
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
    fn for_ram_pages(
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

    /// Create a vCPU of domain `d` in PVH entry state.
    pub fn vcpu_create<P: Platform>(&mut self, p: &mut P, d: DomainId, entry: u64, rbx: u64) -> Result<VcpuId, Error> {
        let dom = &self.domains[d as usize];
        if dom.state != DomainState::Alive {
            return Err(Error::StaleCapability);
        }
        let root = dom.stage2.as_ref().map(|s| s.root()).ok_or(Error::InvalidState)?;
        let (priority, index) = (dom.priority, dom.vcpus);
        let v = self.vcpus.iter().position(|v| v.state == VcpuState::Free).ok_or(Error::OutOfMemory)?;
        let generation = self.vcpus[v].generation.wrapping_add(1);
        let vm = self.domains[d as usize].vm;
        self.vcpus[v] = Vcpu {
            vm,
            state: VcpuState::Created,
            domain: d,
            generation,
            priority,
            regs: Regs { rbx, rip: entry, ..Regs::default() },
            index_in_domain: index,
            ..Vcpu::FREE
        };
        if let Err(e) = p.vcpu_created(v as VcpuId, &VcpuBoot { entry, rbx, domain: d, stage2_root: root, vm }) {
            self.vcpus[v] = Vcpu { generation, ..Vcpu::FREE };
            return Err(e);
        }
        self.domains[d as usize].vcpus += 1;
        Ok(v as VcpuId)
    }

    pub fn vcpu_start(&mut self, v: VcpuId) -> Result<(), Error> {
        if self.vcpus[v as usize].state != VcpuState::Created {
            return Err(Error::InvalidState);
        }
        self.make_ready(v);
        Ok(())
    }

    /// Take a vCPU out of whatever it is waiting in and mark it stopped.
    pub fn stop_vcpu(&mut self, v: VcpuId) {
        let state = self.vcpus[v as usize].state;
        match state {
            VcpuState::Ready => {
                let prio = self.vcpus[v as usize].priority;
                self.runq.remove(v, prio, &mut self.next);
            }
            VcpuState::BlockedSend(e) => {
                self.endpoints[e as usize].senders.remove(v, &mut self.next);
            }
            VcpuState::BlockedRecv(e) => {
                self.endpoints[e as usize].receivers.remove(v, &mut self.next);
            }
            VcpuState::BlockedWait(n) if self.notifications[n as usize].waiter == Some(v) => {
                self.notifications[n as usize].waiter = None;
            }
            VcpuState::Running => {
                self.current = None;
            }
            _ => {}
        }
        // A caller waiting for this vCPU's reply learns its server is gone.
        if let Some(client) = self.vcpus[v as usize].reply_to.take() {
            if self.awaits_reply_from(client, v) {
                self.fail_ipc(client, Error::PartnerGone);
            }
        }
        for n in self.notifications.iter_mut() {
            if n.bound.is_some_and(|(b, _)| b == v) {
                n.bound = None;
            }
        }
        self.vcpus[v as usize].state = VcpuState::Stopped;
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

    // ---- memory regions -----------------------------------------------------------------

    pub fn region_create<P: Platform>(&mut self, p: &mut P, bytes: u64) -> Result<RegionId, Error> {
        if bytes == 0 || bytes > (256 << 20) {
            return Err(Error::InvalidArgument);
        }
        let r = self.regions.iter().position(|r| r.refs == 0).ok_or(Error::OutOfMemory)?;
        let frames = bytes.div_ceil(PAGE);
        let hpa = p.alloc_frames(frames, PAGE).ok_or(Error::OutOfMemory)?;
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
        stage2.map(p, gpa, hpa, frames * PAGE, a, MemType::WriteBack).map_err(|e| match e {
            crate::stage2::Stage2Error::AlreadyMapped { .. } => Error::AlreadyMapped,
            crate::stage2::Stage2Error::NoTableMemory => Error::OutOfMemory,
            _ => Error::InvalidArgument,
        })?;
        let _ = dom.mappings.push(Mapping { region, gpa });
        self.regions[region as usize].refs += 1;
        p.dma_map(d, gpa, hpa, frames * PAGE);
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
        p.dma_unmap(d, m.gpa, frames * PAGE);
        self.release(p, Object::Region(region));
        Ok(())
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
    pub fn console_write<P: Platform>(&mut self, p: &mut P, d: DomainId, bytes: &[u8]) {
        let dom = &mut self.domains[d as usize];
        let name_len = dom.name_len;
        let name = dom.name;
        let name = core::str::from_utf8(&name[..name_len]).unwrap_or("?");
        dom.console.push(bytes, |line| p.console_line(name, line));
    }

    pub fn console_flush<P: Platform>(&mut self, p: &mut P, d: DomainId) {
        let dom = &mut self.domains[d as usize];
        let name = dom.name;
        let name = core::str::from_utf8(&name[..dom.name_len]).unwrap_or("?");
        dom.console.flush(|line| p.console_line(name, line));
    }

    /// Does any vCPU still have work (running, ready, or blocked on something that can
    /// still happen)? False when every vCPU is stopped or free.
    pub fn any_alive(&self) -> bool {
        self.vcpus.iter().any(|v| !matches!(v.state, VcpuState::Free | VcpuState::Stopped | VcpuState::Created))
    }

    /// Record a PCI function found at boot; dom0 gets a capability to it.
    pub fn register_device(&mut self, rid: u16, vendor: u16, device: u16, class: u32) -> Option<DeviceId> {
        let i = self.devices.iter().position(|d| !d.present)?;
        self.devices[i] = Device { present: true, rid, vendor, device, class, owner: None };
        Some(i as DeviceId)
    }

    /// The device in the caller's `slot`.
    pub fn lookup_device(&self, caller: DomainId, slot: u64, rights: u64) -> Result<DeviceId, Error> {
        match self.lookup(caller, slot, rights)?.object {
            Object::Device(dev) => Ok(dev),
            _ => Err(Error::WrongType),
        }
    }

    /// Give device `dev` to domain `d`: IOMMU space, then the BARs in its stage-2.
    pub fn device_assign<P: Platform>(&mut self, p: &mut P, dev: DeviceId, d: DomainId) -> Result<(), Error> {
        if self.devices[dev as usize].owner.is_some() {
            return Err(Error::DeviceBusy);
        }
        let dom = &self.domains[d as usize];
        let mut regions: heapless::Vec<(u64, u64, u64), MAX_MAPPINGS> = heapless::Vec::new();
        for m in &dom.mappings {
            let r = &self.regions[m.region as usize];
            let _ = regions.push((m.gpa, r.hpa, r.frames * PAGE));
        }
        let bars = p.device_bars(dev);
        // The BARs must land outside the domain's RAM and its regions.
        for &(addr, size) in &bars {
            let end = addr.saturating_add(size);
            if addr < dom.ram_size() || regions.iter().any(|&(g, _, s)| addr < g + s && g < end) {
                return Err(Error::AlreadyMapped);
            }
        }
        let ram = dom.ram.clone();
        p.device_assign(dev, d, &ram, &regions)?;
        let stage2 = self.domains[d as usize].stage2.as_mut().ok_or(Error::InvalidState)?;
        let mut mapped: heapless::Vec<(u64, u64), 6> = heapless::Vec::new();
        for &(addr, size) in &bars {
            if let Err(e) = stage2.map(p, addr, addr, size, Access::READ | Access::WRITE, MemType::Uncached) {
                for &(a, s) in &mapped {
                    let _ = stage2.unmap(p, a, s);
                }
                p.device_release(dev);
                return Err(match e {
                    crate::stage2::Stage2Error::AlreadyMapped { .. } => Error::AlreadyMapped,
                    crate::stage2::Stage2Error::NoTableMemory => Error::OutOfMemory,
                    _ => Error::InvalidArgument,
                });
            }
            let _ = mapped.push((addr, size));
        }
        self.devices[dev as usize].owner = Some(d);
        Ok(())
    }

    /// Route a new interrupt of device `dev` to notification `n`.
    pub fn device_irq<P: Platform>(
        &mut self,
        p: &mut P,
        dev: DeviceId,
        n: NotificationId,
    ) -> Result<(u64, u64, u16), Error> {
        let (vector, address, data, handle) = p.irq_allocate(dev)?;
        let Some(route) = vector.checked_sub(DEVICE_VECTOR_BASE).and_then(|i| self.irq_routes.get_mut(i as usize))
        else {
            p.irq_release(dev);
            return Err(Error::OutOfMemory);
        };
        *route = Some(IrqRoute { device: dev, notification: n });
        // The route keeps the notification alive.
        self.notifications[n as usize].refs += 1;
        Ok((address, data, handle))
    }

    fn device_irqs_release<P: Platform>(&mut self, p: &mut P, dev: DeviceId) {
        p.irq_release(dev);
        for i in 0..DEVICE_VECTORS {
            if let Some(r) = self.irq_routes[i] {
                if r.device == dev {
                    self.irq_routes[i] = None;
                    self.release(p, Object::Notification(r.notification));
                }
            }
        }
    }

    /// A device interrupt arrived on host `vector`: signal its notification.
    pub fn device_interrupt(&mut self, vector: u8) {
        let route =
            vector.checked_sub(DEVICE_VECTOR_BASE).and_then(|i| self.irq_routes.get(i as usize).copied().flatten());
        if let Some(r) = route {
            self.signal_object(r.notification, 1);
        }
    }

    /// Earliest pending virtual timer deadline, for the idle loop.
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

//! vCPUs: their registers and states, what a new one starts with, the exit it may hold,
//! and their creation, start and stop.

use super::*;

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
    /// All zero (`Default` is not usable in a constant).
    pub const ZERO: Regs = {
        let [rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rax, rip, rsp, rflags] = [0; 18];
        Regs { rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rax, rip, rsp, rflags }
    };

    /// The message words of IPC (RDI, RSI, RDX, R10, R8, R9: `ipc_spec::hypercall::REGISTER_WORDS`).
    #[inline(always)]
    pub fn message(&self) -> [u64; 6] {
        [self.rdi, self.rsi, self.rdx, self.r10, self.r8, self.r9]
    }

    /// Deliver a message: its words, length (RCX) and badge (RBX), status 0 (RAX).
    #[inline(always)]
    pub fn deliver(&mut self, words: [u64; 6], len: u64, badge: u64) {
        [self.rdi, self.rsi, self.rdx, self.r10, self.r8, self.r9] = words;
        (self.rcx, self.rbx, self.rax) = (len, badge, 0);
    }

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
    /// A notification bound to this vCPU's receive (NotificationBind with vector 0) may
    /// hold bits: it was signalled while this vCPU was not waiting in a receive.
    pub recv_bits_waiting: bool,
    pub slice_left: u32,
    pub index_in_domain: u8,
    /// Its domain is a VM (a copy of the domain's flag, next to the registers the exit
    /// path reads anyway).
    pub vm: bool,
}

impl Vcpu {
    pub(super) const FREE: Vcpu = Vcpu {
        state: VcpuState::Free,
        domain: 0,
        generation: 0,
        priority: 0,
        regs: Regs::ZERO,
        reply_to: None,
        send_badge: 0,
        exit: None,
        msg_page: None,
        pending_irqs: [0; 4],
        recv_bits_waiting: false,
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

impl<F: Stage2Format> Kernel<F> {
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
}

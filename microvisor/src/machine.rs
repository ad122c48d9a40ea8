//! The microvisor's [`Platform`]: what the portable kernel needs from this machine —
//! frames, physical memory, the clock, VMCBs and the console.

use microvisor::guest_memory::{PhysRead, PhysWrite};
use microvisor::kernel::{DomainId, Platform, VcpuBoot, VcpuId, MAX_VCPUS};
use microvisor::stage2::TableMemory;
use microvisor::svm::vmcb::{control, Vmcb};

use crate::arch::apic::Clock;
use crate::arch::fpu::FpuStates;
use crate::arch::phys::{alloc_zeroed_frames, IdentityMemory, PhysTables, FRAMES};
use crate::arch::serial::{Serial, CONSOLE_LOCK};
use crate::arch::svm::Svm;

pub struct Machine {
    pub svm: Svm,
    pub clock: Clock,
    /// Physical address of each vCPU's VMCB (0 = none yet); pages are kept for reuse.
    vmcbs: [u64; MAX_VCPUS],
    /// Bumped whenever some stage-2 map shrinks; a vCPU that has not seen the current
    /// value flushes its TLB on entry (TCG has no flush-by-ASID).
    tlb_epoch: u64,
    seen_epoch: [u64; MAX_VCPUS],
    pub fpu: FpuStates,
}

impl Machine {
    /// Built in place in a static: it holds 16 KiB of FPU save areas, too much to pass
    /// through the boot stack. `svm` and `clock` are filled in at boot.
    pub const fn new() -> Self {
        Self {
            svm: Svm::DISABLED,
            clock: Clock::UNCALIBRATED,
            vmcbs: [0; MAX_VCPUS],
            tlb_epoch: 0,
            seen_epoch: [0; MAX_VCPUS],
            fpu: FpuStates::new(),
        }
    }

    pub fn vmcb_pa(&self, v: VcpuId) -> u64 {
        self.vmcbs[v as usize]
    }

    pub fn vmcb(&mut self, v: VcpuId) -> &mut Vmcb {
        // SAFETY: vmcbs[v] is a VMCB page allocated in `vcpu_created` (a kernel vCPU is
        // only ever run after that), owned by this table and identity-mapped; the
        // exclusive borrow of `self` makes this the only reference.
        unsafe { &mut *(self.vmcbs[v as usize] as *mut Vmcb) }
    }

    /// Flush the vCPU's TLB on its next entry if some stage-2 map shrank since its last.
    pub fn sync_tlb(&mut self, v: VcpuId) {
        if self.seen_epoch[v as usize] != self.tlb_epoch {
            self.seen_epoch[v as usize] = self.tlb_epoch;
            self.vmcb(v).write_u8(control::TLB_CONTROL, 1);
        }
    }
}

impl TableMemory for Machine {
    fn alloc_table(&mut self) -> Option<u64> {
        PhysTables.alloc_table()
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

impl PhysRead for Machine {
    fn read_phys(&self, hpa: u64, buf: &mut [u8]) {
        IdentityMemory.read_phys(hpa, buf)
    }
}

impl PhysWrite for Machine {
    fn write_phys(&mut self, hpa: u64, data: &[u8]) {
        IdentityMemory.write_phys(hpa, data)
    }
}

impl Platform for Machine {
    fn alloc_frames(&mut self, frames: u64, align: u64) -> Option<u64> {
        let pa = FRAMES.lock().alloc(frames, align).ok()?;
        // SAFETY: freshly allocated frames, exclusively ours, inside the identity map.
        unsafe { crate::arch::phys::zero_frames(pa, frames) };
        Some(pa)
    }

    fn free_frames(&mut self, hpa: u64, frames: u64) {
        // Frames come back only from the kernel, which got them from alloc_frames; a
        // refused free leaks them rather than handing them out twice.
        let _ = FRAMES.lock().free(hpa, frames);
    }

    fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    fn vcpu_created(&mut self, v: VcpuId, boot: &VcpuBoot) {
        if self.vmcbs[v as usize] == 0 {
            match alloc_zeroed_frames(1) {
                Some(pa) => self.vmcbs[v as usize] = pa,
                None => crate::fail_out_of_memory("a VMCB"),
            }
        }
        // SAFETY: the page was allocated above (or earlier) for this vCPU's VMCB alone and
        // is identity-mapped; no other reference to it exists while this one lives.
        let vmcb = unsafe { &mut *(self.vmcbs[v as usize] as *mut Vmcb) };
        self.svm.init_vmcb(vmcb, boot);
        self.seen_epoch[v as usize] = self.tlb_epoch;
        self.fpu.reset(v);
    }

    fn stage2_changed(&mut self, _domain: DomainId) {
        self.tlb_epoch += 1;
    }

    fn domain_named(&mut self, domain: DomainId, name: &str) {
        crate::arch::cpu::name_domain(domain, name);
    }

    fn console_line(&mut self, domain: &str, line: &[u8]) {
        let _guard = CONSOLE_LOCK.lock();
        Serial::write_bytes(b"[");
        Serial::write_bytes(domain.as_bytes());
        Serial::write_bytes(b"] ");
        Serial::write_bytes(line);
        Serial::write_bytes(b"\n");
    }
}

//! The run loop: run the current vCPU until it exits, hand the exit to `vmexit`, deliver
//! what arrived meanwhile (device interrupts, the scheduler tick, IOMMU faults), repeat.

use ipc_spec::machine_exit::MachineExit;
use microvisor::kernel::{Event, Kernel};
use microvisor::vcpu_hw::VcpuHardware;

use crate::arch::apic;
use crate::arch::cpu::{self, exit_machine};
use crate::bare_metal::{BareMetal, Stage2};
use crate::println;
use crate::vmexit;

/// The scheduler loop: run the current vCPU until it exits, handle the exit, repeat.
pub fn run(k: &mut Kernel<Stage2>, m: &mut BareMetal) -> ! {
    let (mut seen_events, mut seen_ticks) = (apic::events(), apic::ticks());
    // The vCPU entered last (None: the idle loop ran since), for the switch count.
    #[cfg(feature = "counts")]
    let mut last: Option<microvisor::kernel::VcpuId> = None;
    loop {
        let events = apic::events();
        if events != seen_events {
            seen_events = events;
            let mut irqs = apic::take_device_irqs();
            while irqs != 0 {
                let bit = irqs.trailing_zeros();
                irqs &= irqs - 1;
                k.device_interrupt(microvisor::kernel::DEVICE_VECTOR_BASE + bit as u8);
            }
            let ticks = apic::ticks();
            if ticks != seen_ticks {
                seen_ticks = ticks;
                cpu::check_stack_canary();
                poll_iommu_faults(k, m);
                m.poll_console();
                k.tick(m.clock.now_ns());
                #[cfg(feature = "counts-periodic")]
                print_counts_every(k, m);
                #[cfg(all(feature = "trace", not(feature = "vmx")))]
                crate::trace::tick(k);
            }
        }
        k.schedule();
        let Some(v) = k.current else {
            if !k.any_alive() {
                println!("no runnable domains left: stopping the machine");
                exit_machine(MachineExit::NoDomainsLeft);
            }
            if m.scrub_step() {
                // Idle with freed RAM to zero: one step, then whatever arrived meanwhile.
                apic::take_pending_interrupts();
                continue;
            }
            #[cfg(feature = "counts")]
            let idle_from = m.clock.now_ns();
            apic::wait_for_interrupt();
            #[cfg(feature = "counts")]
            {
                k.stats.idle_ns += m.clock.now_ns().saturating_sub(idle_from);
                last = None;
            }
            continue;
        };
        cpu::set_current_domain(Some(k.vcpus[v as usize].domain));
        enter(k, m, v);
        #[cfg(all(feature = "trace", not(feature = "vmx")))]
        crate::trace::enter(k, m, v);
        #[cfg(feature = "counts")]
        let entered_at = m.clock.now_ns();
        let exit = m.hw.run(v, &mut k.vcpus[v as usize].regs);
        #[cfg(feature = "counts")]
        count(k, v, &exit, last.replace(v) != Some(v), m.clock.now_ns().saturating_sub(entered_at));
        #[cfg(all(feature = "trace", not(feature = "vmx")))]
        crate::trace::exit(k, m, v);
        let event = vmexit::handle(k, m, v, exit);
        #[cfg(all(feature = "trace", not(feature = "vmx")))]
        crate::trace::handled(k, v);
        #[cfg(all(feature = "trace", not(feature = "vmx")))]
        crate::trace::dump_if_wanted(k);
        // A blocked DMA of this vCPU's domain goes to its exit handler now.
        if k.current == Some(v) {
            let d = k.vcpus[v as usize].domain;
            if let Some((addr, detail)) = m.pending_dma[d as usize].take() {
                let x = microvisor::kernel::PendingExit::new(ipc_spec::exit::ExitKind::Dma, addr, detail);
                vmexit::send(k, m, v, x);
            }
        }
        match event {
            None => {}
            Some(Event::PowerOff(status)) => {
                println!("shutdown requested with status {status}");
                exit_machine(if status == 0 { MachineExit::Success } else { MachineExit::Dom0Failure });
            }
            Some(Event::Exited { domain, status, handled }) => println!(
                "domain {} exited with status {status}{}",
                k.domains[domain as usize].name(),
                if handled { "; its fault handler was told" } else { "" }
            ),
        }
        cpu::set_current_domain(None);
    }
}

#[cfg(feature = "counts")]
/// Count exit `exit` of vCPU `v` for its domain (`ExitCounts`); `switched`: another vCPU
/// or the idle loop ran before this entry.
/// `ran_ns`: from just before the entry to just after the exit.
fn count(
    k: &mut Kernel<Stage2>,
    v: microvisor::kernel::VcpuId,
    exit: &microvisor::vcpu_hw::Exit,
    switched: bool,
    ran_ns: u64,
) {
    use microvisor::vcpu_hw::Exit;
    let d = k.vcpus[v as usize].domain as usize;
    let c = &mut k.domains[d].counts;
    c.exits += 1;
    c.run_ns += ran_ns;
    c.switches += u64::from(switched);
    match exit {
        Exit::Hypercall { .. } => c.hypercalls += 1,
        Exit::Hlt { .. } => c.hlts += 1,
        Exit::Interrupt => c.interrupts += 1,
        _ => {}
    }
}

#[cfg(feature = "counts-periodic")]
/// Every 50 ms of the microvisor's clock, one line of every domain's counts (checked at
/// ticks), so that a host driving the workloads can take the differences around each.
fn print_counts_every(k: &Kernel<Stage2>, m: &mut BareMetal) {
    use core::sync::atomic::{AtomicU64, Ordering};
    const EVERY_NS: u64 = 50_000_000;
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = m.clock.now_ns();
    if now / EVERY_NS != LAST.load(Ordering::Relaxed) {
        LAST.store(now / EVERY_NS, Ordering::Relaxed);
        k.print_counts(m);
    }
}

/// Prepare the CPU for vCPU `v`: TLB, FPU, and its pending virtual interrupts handed to
/// the hardware (`Kernel::deliver_irqs`).
fn enter(k: &mut Kernel<Stage2>, m: &mut BareMetal, v: microvisor::kernel::VcpuId) {
    m.sync_tlb(v);
    m.fpu.switch_to(v);
    k.deliver_irqs(&mut m.hw, v);
}

/// Report DMA faults the IOMMU recorded, and queue each for the domain that owns the
/// device: it reaches that domain's fault handler when one of its vCPUs next runs.
fn poll_iommu_faults(k: &Kernel<Stage2>, m: &mut BareMetal) {
    let Some(iommu) = m.iommu.as_mut() else { return };
    while let Some(f) = iommu.poll_fault() {
        let bdf = microvisor::pci::Bdf::from_requester_id(f.source_id);
        let owner = k.devices.iter().find(|d| d.present && d.rid == f.source_id).and_then(|d| d.owner);
        let write = matches!(f.kind, microvisor::iommu::faults::RequestKind::Write);
        println!(
            "iommu: blocked DMA from {bdf}: {} at {:#x} ({}){}",
            if write { "write" } else { "read" },
            f.fault_info,
            f.reason,
            owner.map_or("", |_| "; reported to the owner's fault handler")
        );
        if f.fault_info < crate::arch::phys::IDENTITY_LIMIT {
            // What the device would have overwritten without the IOMMU, as it is now.
            // SAFETY: an 8-byte read inside the identity map; the value is only printed.
            let now = unsafe { core::ptr::read_volatile(f.fault_info as *const [u8; 8]) };
            println!("iommu: physical memory at {:#x} now holds {:02x?}", f.fault_info, now);
        }
        if let Some(d) = owner {
            let detail = ipc_spec::exit::Dma { requester: f.source_id, reason: f.reason.raw(), write }.encode();
            let slot = &mut m.pending_dma[d as usize];
            if slot.is_none() {
                *slot = Some((f.fault_info, detail));
            }
        }
    }
}

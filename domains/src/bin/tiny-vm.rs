//! A tiny guest for the VM exit tests, run as a VM (manifest `vmm = ...`): every port
//! access, CPUID, MSR access, MMIO access and hypercall of it is an exit its VMM
//! (`test-vmm`) emulates; its console output and exit are the domain runtime's
//! hypercalls, which the VMM emulates too. It checks each answer and reports.
//!
//! `bench=<n>`: time n port writes the VMM answers at once (exit, message, reply,
//! resume), in TSC ticks (instructions under `-icount`). `mode=rogue seed=<n>`: random port
//! I/O, wild MMIO, then random bytes executed.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
mod vm {
    extern crate alloc;

    use core::arch::asm;

    use domain_rt::{irq, println, BootInfo};

    domain_rt::domain_main!(main);

    /// The VMM's test device (guest-physical, outside RAM: every access exits).
    const DEVICE: u64 = 0xfe00_0000;
    const TICKS: u64 = 3;

    fn out8(port: u16, value: u8) {
        // SAFETY: port I/O in a VM only exits to the VMM.
        unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) };
    }

    /// IN AL with the rest of RAX preset, to see the VMM merge the byte.
    fn in8_into(port: u16, rax: u64) -> u64 {
        let mut rax = rax;
        // SAFETY: as above.
        unsafe { asm!("in al, dx", in("dx") port, inout("rax") rax, options(nomem, nostack)) };
        rax
    }

    fn in32_into(port: u16, rax: u64) -> u64 {
        let mut rax = rax;
        // SAFETY: as above.
        unsafe { asm!("in eax, dx", in("dx") port, inout("rax") rax, options(nomem, nostack)) };
        rax
    }

    fn wrmsr(index: u32, value: u64) {
        // SAFETY: in a VM, WRMSR of an intercepted MSR only exits to the VMM.
        unsafe {
            asm!("wrmsr", in("ecx") index, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack))
        };
    }

    fn rdmsr(index: u32) -> u64 {
        let (lo, hi): (u32, u32);
        // SAFETY: as above.
        unsafe { asm!("rdmsr", in("ecx") index, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
        (hi as u64) << 32 | lo as u64
    }

    /// `mov [rdi], esi`: the encoding the VMM's decoder is tested with.
    fn mmio_write32(addr: u64, value: u32) {
        // SAFETY: the address is outside the VM's RAM: the store exits to the VMM.
        unsafe { asm!("mov dword ptr [rdi], esi", in("rdi") addr, in("esi") value, options(nostack)) };
    }

    /// `mov eax, [rdi]`.
    fn mmio_read32(addr: u64) -> u64 {
        let v: u64;
        // SAFETY: as above; a 32-bit load zero-extends RAX.
        unsafe { asm!("mov eax, dword ptr [rdi]", in("rdi") addr, out("rax") v, options(nostack)) };
        v
    }

    /// `mov r9d, [rdi]`: a register the reply cannot set directly (state write-back).
    fn mmio_read32_r9(addr: u64) -> u64 {
        let v: u64;
        // SAFETY: as above.
        unsafe { asm!("mov r9d, dword ptr [rdi]", in("rdi") addr, out("r9") v, options(nostack)) };
        v
    }

    fn rdtsc() -> u64 {
        let (lo, hi): (u32, u32);
        // SAFETY: RDTSC only reads the time-stamp counter (not intercepted).
        unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
        (hi as u64) << 32 | lo as u64
    }

    fn main(info: &BootInfo) -> u64 {
        println!("tiny VM: ready");
        if let Some(n) = info.arg("bench").and_then(|v| v.parse::<u64>().ok()) {
            bench(n.max(1));
            return 0;
        }
        if info.arg("mode") == Some("rogue") {
            rogue(info.arg("seed").and_then(|s| s.parse().ok()).unwrap_or(1));
        }
        let mut failed = 0;
        let mut check = |what: &str, got: u64, want: u64| {
            if got == want {
                println!("tiny VM: {what}: {got:#x}, as expected");
            } else {
                println!("tiny VM: {what}: FAILED: got {got:#x}, expected {want:#x}");
                failed += 1;
            }
        };

        out8(0x80, 0x5a);
        check("IN AL merged into RAX", in8_into(0x71, 0x1122_3344_5566_7700), 0x1122_3344_5566_77ab);
        check("IN EAX zero-extended", in32_into(0x72, u64::MAX), 0xdead_beef);

        let sig = core::arch::x86_64::__cpuid(0x4000_0000);
        let mut name = [0u8; 12];
        for (i, r) in [sig.ebx, sig.ecx, sig.edx].iter().enumerate() {
            name[i * 4..i * 4 + 4].copy_from_slice(&r.to_le_bytes());
        }
        check("CPUID signature matches the VMM's", (&name == b"TinyVMM test") as u64, 1);

        wrmsr(0xc000_0103, 0x1234_5678_9abc_def0);
        check("RDMSR returns what WRMSR wrote", rdmsr(0xc000_0103), 0x1234_5678_9abc_def0);

        check("MMIO device id", mmio_read32(DEVICE), 0x7e57_0001);
        mmio_write32(DEVICE + 0x10, 0xcafe_f00d);
        check("MMIO register read back", mmio_read32(DEVICE + 0x10), 0xcafe_f00d);
        check("MMIO read into R9", mmio_read32_r9(DEVICE), 0x7e57_0001);

        // HLT until the VMM's timer ticks arrive (port 0x70 asks for them).
        out8(0x70, TICKS as u8);
        while irq::timer_count() < TICKS {
            irq::wait_for_virq(irq::count());
        }
        check("timer interrupts counted after HLT", irq::timer_count(), TICKS);

        if failed == 0 {
            println!("tiny VM: all checks passed");
        } else {
            println!("tiny VM: {failed} check(s) FAILED");
        }
        failed
    }

    /// Round trips through the VMM: one OUT each, timed with the TSC.
    fn bench(n: u64) {
        let mut samples = alloc::vec::Vec::with_capacity(n as usize);
        for _ in 0..n {
            let t0 = rdtsc();
            out8(0x81, 0);
            samples.push(rdtsc() - t0);
        }
        samples.sort_unstable();
        println!("bench: n={n} vm_exit_roundtrip_median={}", samples[samples.len() / 2]);
    }

    /// A hostile guest: none of this may reach beyond its VMM.
    fn rogue(seed: u64) -> ! {
        let mut x = seed | 1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let r = next();
            if r & 1 != 0 {
                out8((r >> 8) as u16, (r >> 24) as u8);
            } else {
                in8_into((r >> 8) as u16, r);
            }
        }
        println!("tiny VM (rogue): 2000 random port accesses done");
        for _ in 0..500 {
            // Anywhere between 64 MiB and 4 GiB: never RAM, always a stage-2 exit.
            let addr = (0x400_0000 + next() % (0xffff_f000 - 0x400_0000)) & !3;
            if next() & 1 != 0 {
                mmio_write32(addr, next() as u32);
            } else {
                mmio_read32(addr);
            }
        }
        println!("tiny VM (rogue): 500 wild MMIO accesses done; now executing random bytes");
        static mut CODE: [u8; 4096] = [0; 4096];
        let code = (&raw mut CODE).cast::<u8>();
        // SAFETY: CODE is this domain's own memory, 4096 bytes, touched by nothing else; it
        // is filled and then executed, which is the point: whatever it does stays inside
        // this VM and its VMM.
        unsafe {
            for i in 0..4096 {
                code.add(i).write(next() as u8);
            }
            asm!("jmp {}", in(reg) code, options(noreturn));
        }
    }
}

//! FPU/SSE state of vCPUs. The microvisor itself never touches the FPU (soft-float
//! target), so the registers hold the running vCPU's state; they are saved and restored
//! only when the CPU switches to a different vCPU, so no state leaks between domains.

use microvisor::kernel::{VcpuId, MAX_VCPUS};

#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct FxArea([u8; 512]);

/// FXSAVE image of a freshly reset FPU: FCW 0x37f, MXCSR 0x1f80, everything else zero.
const RESET: FxArea = {
    let mut a = [0u8; 512];
    a[0] = 0x7f;
    a[1] = 0x03;
    a[24] = 0x80;
    a[25] = 0x1f;
    FxArea(a)
};

/// The save areas start zeroed (so the table lives in .bss); a vCPU's area gets the reset
/// image when the vCPU is created.
pub struct FpuStates {
    areas: [FxArea; MAX_VCPUS],
    /// Index + 1 of the vCPU whose state is in the registers (0: none yet).
    loaded: usize,
}

impl FpuStates {
    pub const fn new() -> Self {
        Self { areas: [FxArea([0; 512]); MAX_VCPUS], loaded: 0 }
    }

    /// Turn on FXSAVE/FXRSTOR of SSE state (CR4.OSFXSR, OSXMMEXCPT).
    pub fn enable() {
        // SAFETY: setting OSFXSR/OSXMMEXCPT only changes what FXSAVE covers and how SIMD
        // exceptions are reported; the microvisor executes no SSE itself.
        unsafe {
            use x86_64::registers::control::{Cr4, Cr4Flags};
            Cr4::update(|f| *f |= Cr4Flags::OSFXSR | Cr4Flags::OSXMMEXCPT_ENABLE);
        }
    }

    /// A new vCPU starts from reset state.
    pub fn reset(&mut self, v: VcpuId) {
        self.areas[v as usize] = RESET;
        if self.loaded == v as usize + 1 {
            self.loaded = 0;
        }
    }

    /// Make the FPU registers hold `v`'s state.
    #[inline(always)]
    pub fn switch_to(&mut self, v: VcpuId) {
        let v = v as usize;
        if self.loaded == v + 1 {
            return;
        }
        if let Some(old) = self.areas.get_mut(self.loaded.wrapping_sub(1)) {
            // SAFETY: the area is 512 bytes, 16-byte aligned, owned by this table.
            unsafe { core::arch::asm!("fxsave64 [{}]", in(reg) old.0.as_mut_ptr(), options(nostack)) };
        }
        // SAFETY: as above; the image came from FXSAVE or is the valid reset image.
        unsafe { core::arch::asm!("fxrstor64 [{}]", in(reg) self.areas[v].0.as_ptr(), options(nostack)) };
        self.loaded = v + 1;
    }
}

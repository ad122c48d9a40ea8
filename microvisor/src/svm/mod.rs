//! AMD SVM: everything vendor-specific about running a vCPU. The VMCB layout, the exit
//! codes and the state conversion are pure data, host-tested; `hw` (bare metal only) has
//! the instructions (VMRUN, VMLOAD, VMSAVE) and implements [`crate::vcpu_hw::VcpuHardware`].

pub mod exit;
#[cfg(target_os = "none")]
pub mod hw;
pub mod state;
pub mod vmcb;

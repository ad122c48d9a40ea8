//! Intel VMX with EPT and VPID: everything vendor-specific about running a vCPU on an Intel
//! CPU. The VMCS is reached only through the [`vmcs::Vmcs`] accessor, so the control
//! computation (`controls`), the guest state (`state`), the exit decoding (`exit`) and the
//! event delivery (`events`) are host-tested against a fake; `hw` (bare metal only) has VMXON, VMPTRLD, VMREAD/VMWRITE,
//! VMLAUNCH/VMRESUME, INVEPT and INVVPID and implements [`crate::vcpu_hw::VcpuHardware`].
//! References are to the Intel SDM, volume 3C (chapters 24 to 28, appendices A to C).

pub mod controls;
pub mod events;
pub mod exit;
#[cfg(target_os = "none")]
pub mod hw;
pub mod state;
pub mod vmcs;

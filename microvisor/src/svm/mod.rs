//! AMD SVM data structures: the VMCB layout and #VMEXIT codes. Pure data, so it is
//! host-tested; the instructions that use them (VMRUN, VMLOAD, VMSAVE) are in `arch/`.

pub mod exit;
pub mod vmcb;

//! The one ABI every component shares: hypercall numbers and register convention, error
//! codes, the boot bundle format, and how a QEMU run ends.
//!
//! `no_std`, no dependencies, tested on the host. Changing a number here is an ABI break:
//! bump [`ABI_VERSION`].
#![cfg_attr(not(test), no_std)]

#[cfg(feature = "alloc")]
extern crate alloc;

#[cfg(any(test, feature = "channels"))]
pub mod block;
#[cfg(any(test, feature = "channels"))]
pub mod block_client;
#[cfg(any(test, feature = "channels"))]
pub mod block_part;
#[cfg(test)]
mod block_wakeup_model;
pub mod bundle;
#[cfg(any(test, feature = "channels"))]
pub mod ctl;
pub mod error;
pub mod exit;
pub mod hypercall;
pub mod machine_exit;
#[cfg(feature = "alloc")]
pub mod manifest;
#[cfg(any(test, feature = "channels"))]
pub mod net;
#[cfg(any(test, feature = "channels"))]
pub mod ring;
#[cfg(any(test, feature = "channels"))]
pub mod status;
#[cfg(feature = "alloc")]
pub mod supervision;

pub use error::Error;
pub use hypercall::Hypercall;

/// Version of this ABI. Domains and the microvisor are built from one tree, so this is a
/// consistency check for images built separately, not a compatibility promise.
pub const ABI_VERSION: u32 = 2;

/// Name of the dom0 image inside the boot bundle.
pub const DOM0_IMAGE: &str = "dom0";

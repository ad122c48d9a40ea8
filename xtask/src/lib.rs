//! Building the stack and running it in QEMU, shared by the `cargo xtask` command line and
//! the end-to-end tests in `tests/`.

pub mod bench;
pub mod bench_boot;
pub mod bench_counts;
pub mod bench_linux_io;
pub mod bench_net;
pub mod bench_net_counts;
pub mod bench_restart;
pub mod bochs;
pub mod build;
pub mod bzimage;
pub mod console;
pub mod cpio;
pub mod ctl;
pub mod debian;
pub mod fuzz;
pub mod http_client;
pub mod iso;
pub mod kmod;
pub mod linux;
pub mod load;
pub mod manifest;
pub mod qemu;
pub mod setup;
pub mod tcb;

use std::path::PathBuf;

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// The bare-metal target every image is built for.
pub const BARE_METAL_TARGET: &str = "x86_64-unknown-none";

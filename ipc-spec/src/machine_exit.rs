//! How the microvisor ends a QEMU run, so that tools can tell outcomes apart.
//!
//! QEMU's `isa-debug-exit` device (at [`DEBUG_EXIT_PORT`]) turns a byte `v` written to it into
//! the process exit status `(v << 1) | 1`. The microvisor writes one of these codes.

/// I/O port of `-device isa-debug-exit,iobase=0xf4,iosize=0x04`.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Bochs has no isa-debug-exit, and its exit status says nothing of the guest: writing
/// [`BOCHS_SHUTDOWN`] byte by byte to this port ends Bochs ("Shutdown port" of its
/// `unmapped` device); the outcome is read from the console.
pub const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;
/// The string Bochs's shutdown port waits for.
pub const BOCHS_SHUTDOWN: &[u8] = b"Shutdown";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MachineExit {
    /// dom0 asked for a shutdown with status 0.
    Success = 0x10,
    /// The microvisor itself took an exception or panicked.
    MicrovisorFault = 0x11,
    /// The CPU lacks a feature the microvisor needs (SVM, nested paging).
    CpuUnsupported = 0x12,
    /// The boot information or the boot bundle is missing or malformed.
    BadBoot = 0x13,
    /// Every domain has stopped: nothing is left to run.
    NoDomainsLeft = 0x14,
    /// dom0 asked for a shutdown with a non-zero status.
    Dom0Failure = 0x15,
}

impl MachineExit {
    /// The exit status the QEMU process ends with.
    pub const fn qemu_status(self) -> i32 {
        ((self as i32) << 1) | 1
    }

    pub fn from_qemu_status(status: i32) -> Option<Self> {
        [
            Self::Success,
            Self::MicrovisorFault,
            Self::CpuUnsupported,
            Self::BadBoot,
            Self::NoDomainsLeft,
            Self::Dom0Failure,
        ]
        .into_iter()
        .find(|e| e.qemu_status() == status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping() {
        assert_eq!(MachineExit::Success.qemu_status(), 33);
        assert_eq!(MachineExit::from_qemu_status(33), Some(MachineExit::Success));
        assert_eq!(MachineExit::from_qemu_status(1), None);
    }
}

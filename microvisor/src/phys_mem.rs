//! Host-physical memory access, as the kernel asks the platform for it (copying a
//! domain's console buffer, loading images, long IPC messages). The kernel only ever passes
//! addresses it translated from a domain's own RAM.

/// Host-physical memory as the microvisor sees it.
pub trait PhysRead {
    /// Copy `buf.len()` bytes from host-physical `hpa`; the range never crosses a 4 KiB page.
    fn read_phys(&self, hpa: u64, buf: &mut [u8]);
}

/// Host-physical memory the microvisor may write on a domain's behalf.
pub trait PhysWrite {
    /// Copy `data` to host-physical `hpa`; the range never crosses a 4 KiB page.
    fn write_phys(&mut self, hpa: u64, data: &[u8]);
}

//! Reading a domain's memory on its behalf (e.g. the console buffer of a hypercall).
//!
//! Every guest-physical page is translated through the domain's own stage-2 map, so a domain
//! can only ever name memory that is mapped to it, and only its RAM (write-back memory):
//! device MMIO mapped into a domain is never read by the microvisor on its behalf.

use crate::stage2::{Access, MemType, Stage2Format, Stage2Map, TableMemory};

/// Host-physical memory as the microvisor sees it.
pub trait PhysRead {
    /// Copy `buf.len()` bytes from host-physical `hpa`; the range never crosses a 4 KiB page.
    fn read_phys(&self, hpa: u64, buf: &mut [u8]);
}

/// The range named by a domain is not entirely its readable RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadGuestAddress {
    pub gpa: u64,
}

/// Copy `buf.len()` bytes from guest-physical `gpa` of the domain whose map is `map`.
pub fn read_guest<F: Stage2Format>(
    map: &Stage2Map<F>,
    tables: &impl TableMemory,
    phys: &impl PhysRead,
    gpa: u64,
    buf: &mut [u8],
) -> Result<(), BadGuestAddress> {
    let mut done = 0usize;
    while done < buf.len() {
        let addr = gpa
            .checked_add(done as u64)
            .ok_or(BadGuestAddress { gpa })?;
        let t = map
            .translate(tables, addr)
            .ok_or(BadGuestAddress { gpa: addr })?;
        if !t.access.contains(Access::READ) || t.mem_type != MemType::WriteBack {
            return Err(BadGuestAddress { gpa: addr });
        }
        let in_page = (4096 - (addr & 0xfff)) as usize;
        let n = in_page.min(buf.len() - done);
        phys.read_phys(t.hpa, &mut buf[done..done + n]);
        done += n;
    }
    Ok(())
}

/// Host-physical memory the microvisor may write on a domain's behalf.
pub trait PhysWrite {
    /// Copy `data` to host-physical `hpa`; the range never crosses a 4 KiB page.
    fn write_phys(&mut self, hpa: u64, data: &[u8]);
}

/// Copy `data` to guest-physical `gpa` of the domain whose map is `map` (its writable RAM
/// only). Used to load images and to hand a domain its start information.
pub fn write_guest<F: Stage2Format>(
    map: &Stage2Map<F>,
    tables: &impl TableMemory,
    phys: &mut impl PhysWrite,
    gpa: u64,
    data: &[u8],
) -> Result<(), BadGuestAddress> {
    let mut done = 0usize;
    while done < data.len() {
        let addr = gpa
            .checked_add(done as u64)
            .ok_or(BadGuestAddress { gpa })?;
        let t = map
            .translate(tables, addr)
            .ok_or(BadGuestAddress { gpa: addr })?;
        if !t.access.contains(Access::WRITE) || t.mem_type != MemType::WriteBack {
            return Err(BadGuestAddress { gpa: addr });
        }
        let in_page = (4096 - (addr & 0xfff)) as usize;
        let n = in_page.min(data.len() - done);
        phys.write_phys(t.hpa, &data[done..done + n]);
        done += n;
    }
    Ok(())
}

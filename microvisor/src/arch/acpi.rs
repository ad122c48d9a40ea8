//! ACPI discovery through the `acpi` crate: CPUs (MADT), PCI configuration space (MCFG) and
//! IOMMU units (DMAR, parsed by the portable [`microvisor::dmar`] parser).

use core::ptr::NonNull;

use acpi::madt::{Madt, MadtEntry};
use acpi::mcfg::Mcfg;
use acpi::sdt::{SdtHeader, Signature};
use acpi::{AcpiHandler, AcpiTable, AcpiTables, PhysicalMapping};
use microvisor::dmar::{self, Dmar};

use super::phys::IDENTITY_LIMIT;

/// The microvisor runs on an identity map of the low 4 GiB, where firmware puts its tables.
#[derive(Clone)]
struct IdentityMapped;

impl AcpiHandler for IdentityMapped {
    unsafe fn map_physical_region<T>(&self, address: usize, size: usize) -> PhysicalMapping<Self, T> {
        let end = (address as u64).saturating_add(size as u64);
        if address == 0 || end > IDENTITY_LIMIT {
            panic!("ACPI table at {address:#x}+{size:#x} lies outside the identity-mapped low 4 GiB");
        }
        let Some(ptr) = NonNull::new(address as *mut T) else {
            panic!("ACPI table at physical address 0");
        };
        // SAFETY: the range is inside the identity map (checked above), so the virtual
        // address equals the physical one and stays mapped for the microvisor's lifetime.
        unsafe { PhysicalMapping::new(address, ptr, size, size, self.clone()) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// The DMAR table as the acpi crate sees it: only its header; the body is parsed from bytes.
#[repr(C, packed)]
struct DmarHeader {
    header: SdtHeader,
}

// SAFETY: DmarHeader is exactly an SDT header, which is how every ACPI table begins.
unsafe impl AcpiTable for DmarHeader {
    const SIGNATURE: Signature = Signature::DMAR;
    fn header(&self) -> &SdtHeader {
        &self.header
    }
}

/// PCI Express enhanced configuration space (one MCFG entry).
#[derive(Clone, Copy, Debug)]
pub struct EcamWindow {
    pub base: u64,
    pub segment: u16,
    pub bus_start: u8,
    pub bus_end: u8,
}

/// What the microvisor learns from ACPI at boot.
pub struct AcpiFacts {
    pub cpus: usize,
    pub apic_ids: heapless::Vec<u8, 16>,
    pub local_apic_base: u64,
    pub ecam: Option<EcamWindow>,
    pub dmar: Option<Dmar>,
    pub dmar_error: Option<dmar::DmarError>,
}

/// Find and read the tables. `rsdp` is the start info's RSDP address (0 when absent).
/// Without an RSDP or a MADT the machine cannot be used: the error says which.
pub fn discover(rsdp: u64) -> Result<AcpiFacts, &'static str> {
    // SAFETY: the RSDP address comes from the boot loader's start info (or the BIOS area
    // search), and IdentityMapped only hands out ranges inside the identity map.
    let tables = unsafe {
        if rsdp != 0 {
            AcpiTables::from_rsdp(IdentityMapped, rsdp as usize)
        } else {
            AcpiTables::search_for_rsdp_bios(IdentityMapped)
        }
    }
    .map_err(|_| "no valid ACPI RSDP (neither in the start info nor in the BIOS area)")?;

    let madt = tables.find_table::<Madt>().map_err(|_| "the ACPI tables have no MADT (APIC) table")?;
    let mut apic_ids = heapless::Vec::new();
    let mut cpus = 0;
    for entry in madt.get().entries() {
        if let MadtEntry::LocalApic(lapic) = entry {
            // Bit 0: enabled; bit 1: online capable.
            if lapic.flags & 0b11 != 0 {
                cpus += 1;
                let _ = apic_ids.push(lapic.apic_id);
            }
        }
    }
    let local_apic_base = madt.get().local_apic_address as u64;

    let ecam = tables.find_table::<Mcfg>().ok().and_then(|mcfg| {
        mcfg.entries().first().map(|e| EcamWindow {
            base: e.base_address,
            segment: e.pci_segment_group,
            bus_start: e.bus_number_start,
            bus_end: e.bus_number_end,
        })
    });

    let (dmar, dmar_error) = match tables.find_table::<DmarHeader>() {
        Ok(mapping) => {
            let start = mapping.physical_start();
            let length = { mapping.get().header.length } as usize;
            // SAFETY: the acpi crate validated the header at `start`; the body of `length`
            // bytes lies in firmware-reserved memory inside the identity map (the handler
            // checked that when the crate mapped the whole table).
            let bytes = unsafe { core::slice::from_raw_parts(start as *const u8, length) };
            match dmar::parse(bytes) {
                Ok(d) => (Some(d), None),
                Err(e) => (None, Some(e)),
            }
        }
        Err(_) => (None, None),
    };

    Ok(AcpiFacts { cpus, apic_ids, local_apic_base, ecam, dmar, dmar_error })
}

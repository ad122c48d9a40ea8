//! The ACPI tables of a Linux VM: RSDP, XSDT, FADT, MADT and DSDT (ACPI 6.5, chapter 5).
//!
//! The platform is "hardware-reduced" (FADT flag HW_REDUCED_ACPI, §4.1): no PM timer, no
//! PM1/GPE blocks, no SCI, no 8259 and no PIT; Linux then skips the legacy PIC and timer setup.
//! `IAPC_BOOT_ARCH` (§5.2.9.3) says there are no legacy devices, no 8042, no VGA and no CMOS
//! RTC (the wall clock comes from kvmclock). Power-off and reset use the hardware-reduced
//! registers: writing `SLP_TYP = 5 | SLP_EN` to the sleep control register at
//! [`SLEEP_CONTROL_PORT`] powers off (with `\_S5` in the DSDT), and writing [`RESET_VALUE`] to
//! the reset register at [`RESET_PORT`] resets. The MADT lists one local APIC (ID 0) and the I/O
//! APIC; ISA IRQs map identically onto I/O APIC pins (no overrides needed: COM1 is IRQ 4 on
//! pin 4, edge, active high). The DSDT describes COM1 (`PNP0501`, ports 0x3F8-0x3FF, IRQ 4).

use alloc::vec::Vec;
use core::fmt;

use crate::aml::{self, AmlError};
use crate::ioapic::IOAPIC_BASE;
use crate::uart::{COM1_BASE, COM1_IRQ};
use crate::x2apic::APIC_DEFAULT_BASE;

/// Port of the sleep control register (8 bits).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// Port of the sleep status register (8 bits).
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// Port of the reset register (8 bits).
pub const RESET_PORT: u16 = 0x602;
/// The value the guest writes to the reset register.
pub const RESET_VALUE: u8 = 0x01;
/// The `SLP_TYP` value of S5 in `\_S5`.
pub const S5_SLP_TYP: u8 = 5;
/// Sleep control: `SLP_EN` (bit 5) and `SLP_TYP` (bits 4:2), §4.8.3.7.
pub const SLEEP_CONTROL_S5: u8 = 0x20 | (S5_SLP_TYP << 2);

const OEM_ID: &[u8; 6] = b"MVISOR";
const OEM_TABLE_ID: &[u8; 8] = b"VMMLINUX";
const CREATOR_ID: &[u8; 4] = b"MVMM";

const RSDP_SIZE: usize = 36;
const HEADER_SIZE: usize = 36;
const FADT_SIZE: usize = 276;

// FADT flags (§5.2.9, Table 5.10).
const FADT_WBINVD: u32 = 1 << 0;
const FADT_PWR_BUTTON: u32 = 1 << 4;
const FADT_SLP_BUTTON: u32 = 1 << 5;
const FADT_RESET_REG_SUP: u32 = 1 << 10;
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;

// IAPC_BOOT_ARCH (§5.2.9.3, Table 5.11): LEGACY_DEVICES (bit 0) and 8042 (bit 1) clear.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// What the tables describe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Guest-physical address the tables will be copied to (the RSDP is at offset 0).
    pub base: u64,
    /// Local APIC ID of the one CPU.
    pub apic_id: u8,
    /// I/O APIC ID.
    pub ioapic_id: u8,
}

/// Why the tables could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    /// The tables would not fit below 4 GiB-relative addressing or overflow the address space.
    BadBase {
        /// The base given.
        base: u64,
    },
    /// The DSDT could not be encoded.
    Aml(AmlError),
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcpiError::BadBase { base } => {
                write!(f, "ACPI tables at {base:#x} would not lie below 4 GiB (the FADT's 32-bit DSDT pointer)")
            }
            AcpiError::Aml(e) => write!(f, "DSDT: {e}"),
        }
    }
}

impl core::error::Error for AcpiError {}

impl From<AmlError> for AcpiError {
    fn from(e: AmlError) -> Self {
        AcpiError::Aml(e)
    }
}

/// The built tables: bytes to copy to `base`, and where each table landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    /// All tables, RSDP first.
    pub bytes: Vec<u8>,
    /// Guest-physical address of the RSDP (`hvm_start_info.rsdp_paddr`).
    pub rsdp: u64,
    /// Guest-physical address of the XSDT.
    pub xsdt: u64,
    /// Guest-physical address of the FADT.
    pub fadt: u64,
    /// Guest-physical address of the MADT.
    pub madt: u64,
    /// Guest-physical address of the DSDT.
    pub dsdt: u64,
}

/// Sum of bytes modulo 256; a table is valid when the sum including its checksum is 0.
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b))
}

/// A system description table header (§5.2.6, Table 5.4) with the checksum left 0.
fn header(signature: &[u8; 4], length: usize, revision: u8) -> Vec<u8> {
    let mut h = Vec::with_capacity(length);
    h.extend_from_slice(signature);
    h.extend_from_slice(&(length as u32).to_le_bytes());
    h.push(revision);
    h.push(0); // checksum
    h.extend_from_slice(OEM_ID);
    h.extend_from_slice(OEM_TABLE_ID);
    h.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    h.extend_from_slice(CREATOR_ID);
    h.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    h
}

/// Fills in the header's length and checksum (byte 9) once the table is complete.
fn finish(mut t: Vec<u8>) -> Vec<u8> {
    let len = (t.len() as u32).to_le_bytes();
    t[4..8].copy_from_slice(&len);
    t[9] = 0;
    t[9] = 0u8.wrapping_sub(checksum(&t));
    t
}

/// A Generic Address Structure (§5.2.3.2) for an 8-bit System I/O register.
fn gas_io8(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // System I/O
    g[1] = 8; // register bit width
    g[2] = 0; // bit offset
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let mut t = header(b"FACP", FADT_SIZE, 6);
    t.resize(FADT_SIZE, 0);
    // FIRMWARE_CTRL (36) = 0: no FACS, allowed with HW_REDUCED_ACPI.
    // DSDT (40), 32-bit; checked to fit by the caller.
    t[40..44].copy_from_slice(&(dsdt as u32).to_le_bytes());
    // Preferred PM profile (45) = 0 unspecified, SCI_INT (46) = 0, SMI_CMD (48) = 0: no SCI,
    // no legacy ACPI mode switch. All PM1/GPE/PM timer blocks stay 0.
    let iapc = IAPC_VGA_NOT_PRESENT | IAPC_PCIE_ASPM_CONTROLS | IAPC_CMOS_RTC_NOT_PRESENT;
    t[109..111].copy_from_slice(&iapc.to_le_bytes());
    let flags = FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_RESET_REG_SUP | FADT_HW_REDUCED_ACPI;
    t[112..116].copy_from_slice(&flags.to_le_bytes());
    t[116..128].copy_from_slice(&gas_io8(RESET_PORT));
    t[128] = RESET_VALUE;
    t[131] = 5; // FADT minor version (6.5)
    t[140..148].copy_from_slice(&dsdt.to_le_bytes()); // X_DSDT
    t[244..256].copy_from_slice(&gas_io8(SLEEP_CONTROL_PORT));
    t[256..268].copy_from_slice(&gas_io8(SLEEP_STATUS_PORT));
    t[268..276].copy_from_slice(b"MVISOR\0\0"); // hypervisor vendor identity
    finish(t)
}

fn madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut t = header(b"APIC", HEADER_SIZE + 8, 5);
    t.extend_from_slice(&(APIC_DEFAULT_BASE as u32).to_le_bytes());
    // Flags: PCAT_COMPAT (bit 0) clear, there are no 8259s (§5.2.12, Table 5.20).
    t.extend_from_slice(&0u32.to_le_bytes());
    // Processor Local APIC (type 0, §5.2.12.2): UID 0, APIC ID, flags Enabled.
    t.extend_from_slice(&[0, 8, 0, cfg.apic_id]);
    t.extend_from_slice(&1u32.to_le_bytes());
    // I/O APIC (type 1, §5.2.12.3): ID, reserved, address, GSI base 0.
    t.extend_from_slice(&[1, 12, cfg.ioapic_id, 0]);
    t.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes());
    finish(t)
}

/// The DSDT's AML:
///
/// ```text
/// Scope (\_SB) {
///     Device (COM1) {
///         Name (_HID, EisaId ("PNP0501"))
///         Name (_UID, Zero)
///         Name (_CRS, ResourceTemplate () {
///             IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08)
///             IRQNoFlags () {4}
///         })
///     }
/// }
/// Name (_S5, Package () { 5, 5, Zero, Zero })
/// ```
pub fn dsdt_aml() -> Result<Vec<u8>, AmlError> {
    let irq = aml::irq_no_flags(COM1_IRQ).ok_or(AmlError::TooLarge)?;
    let crs = aml::resource_template(&[&aml::io_port(COM1_BASE, COM1_BASE, 1, 8), &irq])?;
    let com1 = aml::device(
        "COM1",
        &[
            aml::name("_HID", &aml::eisa_id("PNP0501")?)?,
            aml::name("_UID", &aml::integer(0))?,
            aml::name("_CRS", &crs)?,
        ]
        .concat(),
    )?;
    // At the root `_SB` and `\\_SB` name the same scope; iasl emits the shorter form.
    let sb = aml::scope("_SB", &com1)?;
    let s5 = aml::name(
        "_S5",
        &aml::package(&[
            aml::integer(S5_SLP_TYP.into()),
            aml::integer(S5_SLP_TYP.into()),
            aml::integer(0),
            aml::integer(0),
        ])?,
    )?;
    Ok([sb, s5].concat())
}

fn dsdt() -> Result<Vec<u8>, AmlError> {
    let mut t = header(b"DSDT", HEADER_SIZE, 2);
    t.extend(dsdt_aml()?);
    Ok(finish(t))
}

fn align16(v: usize) -> usize {
    (v + 15) & !15
}

/// Builds all tables for copying to `cfg.base`.
pub fn build(cfg: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    let xsdt_off = align16(RSDP_SIZE);
    let xsdt_len = HEADER_SIZE + 2 * 8;
    let fadt_off = align16(xsdt_off + xsdt_len);
    let madt_off = align16(fadt_off + FADT_SIZE);
    let madt_bytes = madt(cfg);
    let dsdt_off = align16(madt_off + madt_bytes.len());
    let dsdt_bytes = dsdt()?;
    let total = dsdt_off + dsdt_bytes.len();

    let bad = AcpiError::BadBase { base: cfg.base };
    let end = cfg.base.checked_add(total as u64).ok_or(bad)?;
    // The RSDP's RSDT pointer and the FADT's DSDT pointer are 32-bit: keep it all below 4 GiB.
    if end > 1 << 32 {
        return Err(bad);
    }
    let at = |off: usize| cfg.base + off as u64;

    let mut xsdt = header(b"XSDT", xsdt_len, 1);
    xsdt.extend_from_slice(&at(fadt_off).to_le_bytes());
    xsdt.extend_from_slice(&at(madt_off).to_le_bytes());
    let xsdt = finish(xsdt);

    // RSDP (§5.2.5.3, Table 5.3), revision 2 with the XSDT; the RSDT address is 0 (absent).
    let mut rsdp = Vec::with_capacity(RSDP_SIZE);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2);
    rsdp.extend_from_slice(&0u32.to_le_bytes());
    rsdp.extend_from_slice(&(RSDP_SIZE as u32).to_le_bytes());
    rsdp.extend_from_slice(&at(xsdt_off).to_le_bytes());
    rsdp.push(0); // extended checksum
    rsdp.extend_from_slice(&[0; 3]);
    rsdp[8] = 0u8.wrapping_sub(checksum(&rsdp[..20]));
    rsdp[32] = 0u8.wrapping_sub(checksum(&rsdp));

    let mut bytes = alloc::vec![0u8; total];
    for (off, t) in [
        (0, &rsdp),
        (xsdt_off, &xsdt),
        (fadt_off, &fadt(at(dsdt_off))),
        (madt_off, &madt_bytes),
        (dsdt_off, &dsdt_bytes),
    ] {
        bytes[off..off + t.len()].copy_from_slice(t);
    }
    Ok(AcpiTables {
        bytes,
        rsdp: at(0),
        xsdt: at(xsdt_off),
        fadt: at(fadt_off),
        madt: at(madt_off),
        dsdt: at(dsdt_off),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::acpi::fadt::Fadt;
    use ::acpi::madt::{Madt, MadtEntry};
    use ::acpi::{AcpiHandler, PhysicalMapping};
    use core::ptr::NonNull;

    /// Maps "physical" addresses into a host buffer holding the tables.
    #[derive(Clone)]
    struct BufferHandler {
        base: u64,
        ptr: *const u8,
        len: usize,
    }

    impl AcpiHandler for BufferHandler {
        unsafe fn map_physical_region<T>(&self, physical_address: usize, size: usize) -> PhysicalMapping<Self, T> {
            let off = (physical_address as u64).checked_sub(self.base).expect("below the tables") as usize;
            assert!(off + size <= self.len, "mapping {physical_address:#x}+{size:#x} beyond the tables");
            // SAFETY: the range was checked to lie inside the buffer, which outlives the
            // `AcpiTables` in each test; the acpi crate only reads through it.
            unsafe {
                let p = NonNull::new(self.ptr.add(off) as *mut T).expect("non-null");
                PhysicalMapping::new(physical_address, p, size, size, self.clone())
            }
        }

        fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
    }

    const BASE: u64 = 0xe_0000;

    fn tables() -> AcpiTables {
        build(&AcpiConfig { base: BASE, apic_id: 0, ioapic_id: 1 }).unwrap()
    }

    #[test]
    fn checksums() {
        let t = tables();
        assert_eq!(t.rsdp, BASE);
        let rel = |a: u64| (a - BASE) as usize;
        assert_eq!(checksum(&t.bytes[..20]), 0);
        assert_eq!(checksum(&t.bytes[..36]), 0);
        for (addr, sig) in [(t.xsdt, b"XSDT"), (t.fadt, b"FACP"), (t.madt, b"APIC"), (t.dsdt, b"DSDT")] {
            let o = rel(addr);
            assert_eq!(&t.bytes[o..o + 4], sig);
            let len = u32::from_le_bytes(t.bytes[o + 4..o + 8].try_into().unwrap()) as usize;
            assert_eq!(checksum(&t.bytes[o..o + len]), 0, "{}", core::str::from_utf8(sig).unwrap());
            assert_eq!(addr % 16, 0);
        }
    }

    #[test]
    fn parsed_by_the_acpi_crate() {
        let t = tables();
        let handler = BufferHandler { base: BASE, ptr: t.bytes.as_ptr(), len: t.bytes.len() };
        // SAFETY: the handler maps only inside `t.bytes`, which lives to the end of the test.
        let parsed = unsafe { ::acpi::AcpiTables::from_rsdp(handler, BASE as usize) }.unwrap();
        assert_eq!(parsed.revision(), 2);
        let sigs: Vec<_> = parsed.headers().map(|h| h.signature.as_str().to_owned()).collect();
        assert_eq!(sigs, ["FACP", "APIC"]);

        let fadt_map = parsed.find_table::<Fadt>().unwrap();
        let fadt = fadt_map.get();
        let flags = fadt.flags;
        assert!(flags.system_is_hw_reduced_acpi());
        assert!(flags.supports_system_reset_via_fadt());
        assert_eq!(fadt.dsdt_address().unwrap(), t.dsdt as usize);
        let reset = fadt.reset_register().unwrap();
        assert_eq!(reset.address, u64::from(RESET_PORT));
        assert_eq!(fadt.reset_value, RESET_VALUE);
        assert_eq!(fadt.sleep_control_register().unwrap().unwrap().address, u64::from(SLEEP_CONTROL_PORT));
        assert_eq!(fadt.sleep_status_register().unwrap().unwrap().address, u64::from(SLEEP_STATUS_PORT));
        let sci = fadt.sci_interrupt;
        assert_eq!(sci, 0);
        let iapc = fadt.iapc_boot_arch;
        assert!(!iapc.legacy_devices_are_accessible());
        assert!(!iapc.motherboard_implements_8042());
        assert!(iapc.dont_probe_vga());
        // The crate has no accessor for CMOS RTC Not Present (bit 5): check the raw field.
        let raw = &t.bytes[(t.fadt - BASE) as usize + 109..][..2];
        assert_eq!(u16::from_le_bytes([raw[0], raw[1]]) & (1 << 5), 1 << 5);
        assert!(fadt.pm_timer_block().unwrap().is_none());

        let madt_map = parsed.find_table::<Madt>().unwrap();
        let madt = madt_map.get();
        assert!(!madt.supports_8259());
        let lapic_addr = madt.local_apic_address;
        assert_eq!(lapic_addr, 0xfee0_0000);
        let mut lapics = 0;
        let mut ioapics = 0;
        for e in madt.entries() {
            match e {
                MadtEntry::LocalApic(l) => {
                    lapics += 1;
                    let (id, flags) = (l.apic_id, l.flags);
                    assert_eq!((id, flags), (0, 1));
                }
                MadtEntry::IoApic(io) => {
                    ioapics += 1;
                    let (id, addr, gsi) = (io.io_apic_id, io.io_apic_address, io.global_system_interrupt_base);
                    assert_eq!((id, addr, gsi), (1, 0xfec0_0000, 0));
                }
                other => panic!("unexpected MADT entry {other:?}"),
            }
        }
        assert_eq!((lapics, ioapics), (1, 1));

        let dsdt = parsed.dsdt().unwrap();
        assert_eq!(dsdt.address, t.dsdt as usize + 36);
        assert_eq!(dsdt.length as usize, dsdt_aml().unwrap().len());
    }

    /// The DSDT's AML, byte for byte as `iasl` compiles the ASL in `dsdt_aml`'s doc comment
    /// (iasl 20200925, Debian; `iasl -d` also disassembles all built tables without complaint).
    #[test]
    fn dsdt_bytes() {
        let expected: &[u8] = &[
            0x10, 0x32, b'_', b'S', b'B', b'_', // Scope (\_SB)
            0x5b, 0x82, 0x2b, b'C', b'O', b'M', b'1', // Device (COM1)
            0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x05, 0x01, // _HID
            0x08, b'_', b'U', b'I', b'D', 0x00, // _UID
            0x08, b'_', b'C', b'R', b'S', 0x11, 0x10, 0x0a, 0x0d, // _CRS buffer of 13
            0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08, // IO
            0x22, 0x10, 0x00, // IRQNoFlags {4}
            0x79, 0x00, // end tag
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0x00, 0x00,
        ];
        assert_eq!(dsdt_aml().unwrap(), expected);
    }

    #[test]
    fn bases() {
        assert!(build(&AcpiConfig { base: 0, apic_id: 0, ioapic_id: 0 }).is_ok());
        let near_top = (1u64 << 32) - 0x100;
        assert_eq!(
            build(&AcpiConfig { base: near_top, apic_id: 0, ioapic_id: 0 }),
            Err(AcpiError::BadBase { base: near_top })
        );
        assert!(build(&AcpiConfig { base: u64::MAX, apic_id: 0, ioapic_id: 0 }).is_err());
        assert!(!AcpiError::BadBase { base: 1 }.to_string().is_empty());
        assert!(!AcpiError::Aml(AmlError::BadName).to_string().is_empty());
        // Position-independent apart from the pointers: a different base moves everything.
        let a = build(&AcpiConfig { base: 0x1000, apic_id: 0, ioapic_id: 0 }).unwrap();
        assert_eq!(a.bytes.len(), tables().bytes.len());
        assert_eq!(a.xsdt - a.rsdp, tables().xsdt - tables().rsdp);
    }
}

//! PCI configuration space: enumeration at boot, and the filter that stands between a driver VM
//! and the configuration space of the one function assigned to it.
//!
//! The microvisor reaches configuration space through ECAM; the access itself is the caller's
//! business (trait [`ConfigSpace`]), so everything here is portable and tested against a fake
//! configuration space.
//!
//! # Enumeration ([`enumerate`])
//!
//! At boot, every function reachable from the first bus of the given range is read once: ids,
//! class, header type, BARs (sized with the write-all-ones protocol while the function's decode
//! bits are off) and the capability list. This is the only time the microvisor writes BARs;
//! afterwards they are never written again, which is what lets a driver VM map them at their
//! real addresses (GPA = HPA) and lets the filter answer sizing from memory.
//!
//! # Filtering ([`filter_write`], [`filter_read`])
//!
//! A driver VM is untrusted: it may do anything the function's BARs allow (they are mapped into
//! its stage-2 as uncached MMIO, and the IOMMU confines the function's DMA to the VM's RAM), but
//! configuration space holds things that reach beyond that: where the BARs decode (a moved BAR
//! could shadow another device or RAM), interrupt routing (MSI address/data), error reporting,
//! and the extended capabilities (ACS, ATS, SR-IOV, ...). The hypercall therefore goes through
//! the filter, which works on whole dwords and allows, for a type-0 (endpoint) function:
//!
//! | register | write | read |
//! |---|---|---|
//! | command (0x04) | only memory decode, bus master, INTx disable change | hardware |
//! | status (0x06) | dropped | hardware |
//! | BARs (0x10..0x27) | emulated: all ones starts sizing, anything else ends it | real address, or what the BAR read back when sized at boot |
//! | expansion ROM (0x30) | emulated | 0 (no ROM) |
//! | other header fields | dropped | hardware |
//! | MSI-X Message Control | only enable (bit 15) and function mask (bit 14) | hardware |
//! | vendor-specific capability (0x09) body | allowed | hardware |
//! | rest of 0x40..0xFF (MSI included) | dropped | hardware |
//! | extended space (0x100..0xFFF) | dropped | hardware |
//!
//! MSI writes are dropped because the microvisor programs interrupts itself, through interrupt
//! remapping, and never lets the driver choose an interrupt address or vector; the MSI-X table
//! lives in a BAR (mapped to the driver), where remapping makes the addresses written harmless.
//!
//! Every write is first merged into the hardware dword (read-modify-write) and then masked
//! with the bits that may change, so a byte outside the allowed bits keeps its hardware value
//! whatever the access size.

use core::fmt;
use core::ops::RangeInclusive;
use heapless::Vec;

/// Most functions [`enumerate`] records (a q35 machine with a few devices has about a dozen).
pub const MAX_FUNCTIONS: usize = 64;
/// Most capabilities recorded per function (virtio-pci has 6 or 7; a longer list is cut).
pub const MAX_CAPS: usize = 16;
/// Size of a function's configuration space under ECAM (PCI Express).
pub const CONFIG_SPACE_SIZE: u16 = 4096;

/// Vendor id (u16) and device id (u16).
const REG_ID: u16 = 0x00;
/// Command register (u16); the status register (u16) is the upper half of the same dword.
const REG_COMMAND: u16 = 0x04;
/// Revision (u8), then programming interface, subclass and base class.
const REG_CLASS_REV: u16 = 0x08;
/// Cache line size, latency timer, header type (byte 2) and BIST.
const REG_HEADER: u16 = 0x0C;
/// First base address register (six of them in an endpoint, up to 0x24; two in a bridge).
const REG_BAR0: u16 = 0x10;
/// Bus numbers of a PCI-to-PCI bridge (type 1): primary, secondary (byte 1), subordinate.
const REG_BRIDGE_BUSES: u16 = 0x18;
/// Expansion ROM base address (type 0).
const REG_ROM_BAR: u16 = 0x30;
/// Capabilities pointer (byte, type 0 and 1).
const REG_CAP_PTR: u16 = 0x34;

/// Status register bit 4, as a bit of the command/status dword: the function has a capability
/// list.
const STATUS_CAP_LIST: u32 = 1 << 20;
/// Command register: I/O space (bit 0) and memory space (bit 1) decode, cleared while BARs are
/// sized so that a BAR holding all ones never decodes.
const COMMAND_DECODE: u16 = 0x3;
/// Command register: the function may issue DMA (and MSI writes).
const COMMAND_BUS_MASTER: u16 = 0x4;
/// The command bits a driver VM may change: memory decode (1), bus master (2) and INTx disable
/// (10); it needs them to run and reset its device. I/O decode stays as the microvisor left it
/// (I/O ports are not passed through: every port access exits), and the error-reporting bits
/// belong to the platform, not to the driver.
const COMMAND_DRIVER_WRITABLE: u16 = 0x2 | COMMAND_BUS_MASTER | (1 << 10);

/// Capability id: vendor-specific. virtio-pci describes its regions with these and offers a
/// configuration-space window into its BARs (`VIRTIO_PCI_CAP_PCI_CFG`), so their bodies are
/// writable.
const CAP_VENDOR: u8 = 0x09;
/// Capability id: MSI-X.
const CAP_MSIX: u8 = 0x11;
/// MSI-X Message Control bits a driver may change, as bits of the capability's first dword:
/// MSI-X enable (15) and function mask (14).
const MSIX_CONTROL_WRITABLE: u32 = 0xC000_0000;

/// Access to configuration space, implemented by the caller (ECAM in the microvisor, an array
/// in tests). Offsets are dword aligned and below [`CONFIG_SPACE_SIZE`]; an absent function
/// reads as all ones, as on real hardware.
pub trait ConfigSpace {
    /// Read the dword at `offset` of function `bdf`.
    fn read32(&self, bdf: Bdf, offset: u16) -> u32;
    /// Write the dword at `offset` of function `bdf`.
    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32);
}

/// A PCI function address in segment 0: bus, device (0..32), function (0..8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    /// Bus number.
    pub bus: u8,
    /// Device number, 0..32.
    pub dev: u8,
    /// Function number, 0..8.
    pub func: u8,
}

impl Bdf {
    /// The 16-bit requester id (`bus << 8 | dev << 3 | func`) the function puts on its DMA
    /// requests: the IOMMU's context tables and the interrupt remapping table are indexed by
    /// it. Out-of-range device and function numbers are masked so they cannot alias into the
    /// neighbouring field.
    pub const fn requester_id(self) -> u16 {
        ((self.bus as u16) << 8) | (((self.dev & 0x1F) as u16) << 3) | ((self.func & 0x7) as u16)
    }

    /// The function a requester id names (the inverse of [`Bdf::requester_id`]).
    pub const fn from_requester_id(rid: u16) -> Self {
        Self { bus: (rid >> 8) as u8, dev: ((rid >> 3) & 0x1F) as u8, func: (rid & 0x7) as u8 }
    }
}

impl fmt::Display for Bdf {
    /// The usual `bus:dev.func` form in hex, e.g. `00:04.0`, as Linux and QEMU print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{:x}", self.bus, self.dev, self.func)
    }
}

/// Class code: base class, subclass, programming interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClassCode {
    /// Base class (e.g. 0x01 mass storage, 0x02 network, 0x06 bridge).
    pub base: u8,
    /// Subclass.
    pub sub: u8,
    /// Programming interface.
    pub prog_if: u8,
}

/// Layout of the configuration header (header type without the multi-function bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderLayout {
    /// Type 0: an endpoint, six BARs. The only layout that can be assigned to a driver VM.
    Endpoint,
    /// Type 1: PCI-to-PCI bridge, two BARs and bus numbers.
    Bridge,
    /// Anything else (CardBus bridge, reserved): neither BARs nor capabilities are read.
    Other,
}

/// One PCI function as read at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    /// Where it is.
    pub bdf: Bdf,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class code.
    pub class: ClassCode,
    /// Header type byte as read (bit 7: multi-function device).
    pub header_type: u8,
    /// The memory BARs that cover whole 4 KiB pages (page-aligned start and size, no
    /// wrap-around), as `(address, size)` in slot order. Stage-2 maps pages, so a smaller BAR
    /// would expose whatever else shares its page (possibly another function's registers):
    /// only these may be mapped into a driver VM. I/O BARs are never given out.
    pub mem_bars: Vec<(u64, u64), 6>,
    /// What each BAR dword read back after the write of all ones at boot (the size mask with
    /// the type bits; 0 for a slot that is not implemented or that the layout lacks): what a
    /// driver sizing the BAR is shown.
    pub bar_masks: [u32; 6],
    /// The BAR dwords as firmware programmed them (read at boot; 0 for slots the layout
    /// lacks). BARs never move afterwards, but a function-level reset clears them: they are
    /// written back from here ([`restore_after_reset`]).
    pub bars: [u32; 6],
    /// Capabilities as `(id, offset, byte 2)`, in list order (at most [`MAX_CAPS`]). Byte 2 of
    /// a vendor-specific capability is its length: the filter needs it to know which bytes the
    /// capability covers.
    pub capabilities: Vec<(u8, u8, u8), MAX_CAPS>,
}

impl Function {
    /// The header layout.
    pub fn layout(&self) -> HeaderLayout {
        match self.header_type & 0x7F {
            0 => HeaderLayout::Endpoint,
            1 => HeaderLayout::Bridge,
            _ => HeaderLayout::Other,
        }
    }
}

impl fmt::Display for Function {
    /// One boot-log line: `00:01.0 1af4:1042 class 01/00/00`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:04x}:{:04x} class {:02x}/{:02x}/{:02x}",
            self.bdf, self.vendor, self.device, self.class.base, self.class.sub, self.class.prog_if
        )
    }
}

/// What [`enumerate`] saw, so the boot log can say when something did not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EnumerationSummary {
    /// Buses scanned.
    pub buses_scanned: usize,
    /// Functions found, recorded or not.
    pub functions_found: usize,
    /// Functions found but not recorded because the output was full ([`MAX_FUNCTIONS`]).
    pub functions_dropped: usize,
}

/// Enumerate the functions reachable from bus `buses.start()` into `out` (cleared first), in
/// bus, device, function order.
///
/// Every device's function 0 is probed; functions 1..8 only when function 0's header type has
/// the multi-function bit (a single-function device may answer on every function number).
/// A vendor id of all ones (what an absent function returns) or 0 (never valid; some bridges
/// return it for absent functions) means no function. A PCI-to-PCI bridge's secondary bus is
/// scanned when it lies inside `buses` and has not been scanned yet, so misprogrammed bus
/// numbers cannot make the scan loop: at most 256 buses of 256 functions are read. Bus numbers
/// are the ones firmware assigned; bridges are not reprogrammed, and root buses not reachable
/// from the first bus are not scanned.
///
/// Each recorded function's BARs are sized (see [`size_bars`]). Functions that do not fit into
/// `out` are counted in the summary and left untouched.
pub fn enumerate(
    cs: &mut impl ConfigSpace,
    buses: RangeInclusive<u8>,
    out: &mut Vec<Function, MAX_FUNCTIONS>,
) -> EnumerationSummary {
    out.clear();
    let mut summary = EnumerationSummary::default();
    // Per bus number: a bridge (or the range) leads there and it is still to be scanned; it has
    // been scanned. The lowest pending bus is scanned next.
    let (mut pending, mut scanned) = ([false; 256], [false; 256]);
    pending[usize::from(*buses.start())] = !buses.is_empty();
    while let Some(index) = pending.iter().position(|&p| p) {
        (pending[index], scanned[index]) = (false, true);
        summary.buses_scanned += 1;
        let bus = index as u8;
        for dev in 0..32u8 {
            for func in 0..8u8 {
                let bdf = Bdf { bus, dev, func };
                let vendor = cs.read32(bdf, REG_ID) as u16;
                if vendor == 0xFFFF || vendor == 0 {
                    // An absent function 0 means an absent device.
                    if func == 0 {
                        break;
                    }
                    continue;
                }
                let header_type = (cs.read32(bdf, REG_HEADER) >> 16) as u8;
                summary.functions_found += 1;
                if header_type & 0x7F == 1 {
                    let secondary = (cs.read32(bdf, REG_BRIDGE_BUSES) >> 8) as u8;
                    let s = usize::from(secondary);
                    pending[s] |= buses.contains(&secondary) && !scanned[s];
                }
                if out.is_full() {
                    summary.functions_dropped += 1;
                } else {
                    // Cannot fail: `out` is not full.
                    let _ = out.push(read_function(cs, bdf, header_type));
                }
                if func == 0 && header_type & 0x80 == 0 {
                    break;
                }
            }
        }
    }
    summary
}

/// Read one present function: ids, class, BARs (sized), capabilities. Writes to the function
/// only to size its BARs, see [`size_bars`].
fn read_function(cs: &mut impl ConfigSpace, bdf: Bdf, header_type: u8) -> Function {
    let id = cs.read32(bdf, REG_ID);
    let class_rev = cs.read32(bdf, REG_CLASS_REV);
    let class =
        ClassCode { base: (class_rev >> 24) as u8, sub: (class_rev >> 16) as u8, prog_if: (class_rev >> 8) as u8 };
    let mut f = Function {
        bdf,
        vendor: id as u16,
        device: (id >> 16) as u16,
        class,
        header_type,
        mem_bars: Vec::new(),
        bar_masks: [0; 6],
        bars: [0; 6],
        capabilities: Vec::new(),
    };
    let bar_count = match f.layout() {
        HeaderLayout::Endpoint => 6,
        HeaderLayout::Bridge => 2,
        HeaderLayout::Other => return f,
    };
    for (slot, bar) in f.bars.iter_mut().take(bar_count).enumerate() {
        *bar = cs.read32(bdf, REG_BAR0 + 4 * slot as u16);
    }
    (f.bar_masks, f.mem_bars) = size_bars(cs, bdf, bar_count);
    if cs.read32(bdf, REG_COMMAND) & STATUS_CAP_LIST != 0 {
        f.capabilities = walk_capabilities(cs, bdf, cs.read32(bdf, REG_CAP_PTR) as u8);
    }
    f
}

/// Size the first `count` BARs (6 for endpoints, 2 for bridges) with the standard protocol:
/// write all ones to each BAR dword, read back the address bits that stuck (the size is the
/// lowest of them), write the original value back. Only done at boot: afterwards BARs are never
/// written. Returns what each dword read back and the page-granular memory BARs (see
/// [`Function::mem_bars`]).
///
/// While a BAR holds all ones it decodes a bogus range that may overlap RAM or another device,
/// so the function's I/O and memory decode bits are cleared in the command register for the
/// duration and restored afterwards (the status half is written as zeros, which leaves its
/// write-one-to-clear bits alone). A 64-bit BAR takes its upper half from the next slot; one in
/// the last slot, a reserved type and I/O BARs give no memory BAR.
fn size_bars(cs: &mut impl ConfigSpace, bdf: Bdf, count: usize) -> ([u32; 6], Vec<(u64, u64), 6>) {
    let (mut originals, mut masks) = ([0u32; 6], [0u32; 6]);
    let command = cs.read32(bdf, REG_COMMAND) as u16;
    let decode = command & COMMAND_DECODE;
    if decode != 0 {
        cs.write32(bdf, REG_COMMAND, u32::from(command & !decode));
    }
    for (slot, (original, mask)) in originals.iter_mut().zip(&mut masks).take(count).enumerate() {
        let offset = REG_BAR0 + 4 * slot as u16;
        *original = cs.read32(bdf, offset);
        cs.write32(bdf, offset, u32::MAX);
        *mask = cs.read32(bdf, offset);
        cs.write32(bdf, offset, *original);
    }
    if decode != 0 {
        cs.write32(bdf, REG_COMMAND, u32::from(command));
    }

    let mut mem_bars = Vec::new();
    let mut slots = originals.into_iter().zip(masks).take(count);
    while let Some((low, mask)) = slots.next() {
        // Bit 0: I/O space. Bits 2..1: type 0 (32-bit), 1 (legacy 32-bit below 1 MiB),
        // 2 (64-bit), 3 (reserved).
        let (high, mask_high) = match low & 0x7 {
            0 | 2 => (0, 0),
            4 => match slots.next() {
                Some(upper) => upper,
                None => continue,
            },
            _ => continue,
        };
        let addr = (u64::from(high) << 32) | u64::from(low & !0xF);
        let mask = (u64::from(mask_high) << 32) | u64::from(mask & !0xF);
        let size = mask & mask.wrapping_neg();
        if size != 0 && addr % 4096 == 0 && size % 4096 == 0 && addr.checked_add(size).is_some() {
            // Cannot fail: at most one entry per slot.
            let _ = mem_bars.push((addr, size));
        }
    }
    (masks, mem_bars)
}

/// Walk the capability list from `first` (the capabilities pointer). A pointer below 0x40 (0
/// ends the list) or not dword aligned stops the walk, as does an id of 0xFF (the function
/// went away) or a pointer already visited; at most [`MAX_CAPS`] entries are read and recorded.
/// Devices are not trusted to have a well-formed list: this runs before any of them is
/// assigned, but a looping list must not hang the boot.
fn walk_capabilities(cs: &impl ConfigSpace, bdf: Bdf, first: u8) -> Vec<(u8, u8, u8), MAX_CAPS> {
    let mut caps: Vec<(u8, u8, u8), MAX_CAPS> = Vec::new();
    let mut ptr = first;
    // Every pointer visited is recorded (or the walk stops), so the list itself says which
    // were visited and bounds the walk.
    while ptr >= 0x40 && ptr.is_multiple_of(4) && !caps.iter().any(|c| c.1 == ptr) {
        let header = cs.read32(bdf, u16::from(ptr));
        if header as u8 == 0xFF || caps.push((header as u8, ptr, (header >> 16) as u8)).is_err() {
            break;
        }
        ptr = (header >> 8) as u8;
    }
    caps
}

/// Why a configuration access from a driver VM is refused (the hypercall returns an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigError {
    /// The size is not 1, 2 or 4 bytes, the offset is not a multiple of the size (an access
    /// must not straddle registers), or it is beyond the 4 KiB configuration space.
    BadAccess,
    /// The function is not a type-0 endpoint: bridges are never assigned to driver VMs.
    NotEndpoint,
}

/// Check a driver's configuration access: size 1, 2 or 4, offset a multiple of the size (so
/// the access lies inside one dword and the filter can reason dword by dword), offset below
/// 4096 (ECAM gives each function 4 KiB; beyond is another function's space).
pub fn check_access(offset: u16, size: u8) -> Result<(), ConfigError> {
    match size {
        1 | 2 | 4 if offset.is_multiple_of(u16::from(size)) && offset < CONFIG_SPACE_SIZE => Ok(()),
        _ => Err(ConfigError::BadAccess),
    }
}

/// The per-assignment state the filter keeps: which BARs the driver is sizing. Created when a
/// function is assigned; a fresh one is created on every (re)assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssignedState {
    /// The function this state belongs to; the filter refuses to apply it to another one.
    bdf: Bdf,
    /// Bit i: BAR i last got a write of all ones, so it reads as its size mask.
    sizing: u8,
}

impl AssignedState {
    /// State for assigning `f`. Only endpoints (type 0) can be assigned: a bridge's
    /// configuration space routes other functions' addresses and bus numbers.
    pub fn new(f: &Function) -> Result<Self, ConfigError> {
        match f.layout() {
            HeaderLayout::Endpoint => Ok(Self { bdf: f.bdf, sizing: 0 }),
            _ => Err(ConfigError::NotEndpoint),
        }
    }
}

/// What the microvisor does with a driver's configuration write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteAction {
    /// Write this whole dword to hardware.
    Write {
        /// Dword-aligned offset.
        offset: u16,
        /// The full dword: the hardware value with only the allowed bits taken from the driver.
        value: u32,
    },
    /// Nothing changes (the write is silently ignored, as PCI does for read-only bits).
    Drop,
    /// Nothing reaches hardware; the filter's state absorbed the write (BAR sizing).
    Emulated,
}

/// True when the filter handles an access with `state`: a valid access (see [`check_access`])
/// to the endpoint the state was made for.
fn applies(f: &Function, state: &AssignedState, offset: u16, size: u8) -> bool {
    check_access(offset, size).is_ok() && state.bdf == f.bdf && f.layout() == HeaderLayout::Endpoint
}

/// The byte lanes of the dword an access of `size` (at most 4) bytes at `offset` covers.
fn lane_mask(offset: u16, size: u8) -> u32 {
    let bits = if size >= 4 { u32::MAX } else { (1 << (8 * u32::from(size))) - 1 };
    bits << (8 * u32::from(offset & 0x3))
}

/// Bits of the dword at `dword` (0x40..0x100) the driver may change: MSI-X enable and
/// function mask, and the body of vendor-specific capabilities (all but the id, next and
/// length bytes, which describe the list the microvisor walked and must stay as they are).
/// A vendor-specific capability's length is clamped to the start of the next capability (or
/// the end of the capability area), so a bad length byte cannot make another capability (MSI,
/// MSI-X) writable.
fn capability_area_mask(f: &Function, dword: u16) -> u32 {
    let mut mask = 0;
    for &(id, offset, len) in &f.capabilities {
        let offset = u16::from(offset);
        if id == CAP_MSIX && offset == dword {
            mask |= MSIX_CONTROL_WRITABLE;
        } else if id == CAP_VENDOR {
            let next = f.capabilities.iter().map(|c| u16::from(c.1)).filter(|&o| o > offset).min().unwrap_or(0x100);
            let body = offset + 3..(offset + u16::from(len)).min(next);
            for lane in (0..4).filter(|lane| body.contains(&(dword + lane))) {
                mask |= 0xFF << (8 * lane);
            }
        }
    }
    mask
}

/// Filter a driver VM's configuration write of `size` bytes at `offset` to function `f`.
/// `hw_dword` is the current hardware value of the dword holding `offset` (the caller reads
/// it: [`config_write`] does), into which the written bytes are merged first.
///
/// Invalid accesses (see [`check_access`]) and a `state` belonging to another function are
/// dropped. Otherwise (the table in the module documentation):
/// - BARs and the ROM BAR are emulated and never written: moving a BAR could make the
///   function decode over RAM or another device's MMIO, and the driver's stage-2 mapping is
///   fixed at the boot address. A merged dword of all ones starts sizing (see
///   [`filter_read`]); any other write ends it.
/// - Any other dword is written only when some bit the driver touched may change; the value
///   written is the hardware dword with exactly those bits replaced. For the command dword the
///   status half is written as zeros: its error bits are write-one-to-clear, so writing back
///   what was read would clear them.
pub fn filter_write(
    f: &Function,
    state: &mut AssignedState,
    offset: u16,
    size: u8,
    value: u32,
    hw_dword: u32,
) -> WriteAction {
    if !applies(f, state, offset, size) {
        return WriteAction::Drop;
    }
    let dword = offset & !0x3;
    let lanes = lane_mask(offset, size);
    let written = (hw_dword & !lanes) | ((value << (8 * u32::from(offset & 0x3))) & lanes);
    let allowed = match dword {
        REG_BAR0..=0x24 => {
            let bit = 1 << ((dword - REG_BAR0) / 4);
            state.sizing = if written == u32::MAX { state.sizing | bit } else { state.sizing & !bit };
            return WriteAction::Emulated;
        }
        REG_ROM_BAR => return WriteAction::Emulated,
        REG_COMMAND => u32::from(COMMAND_DRIVER_WRITABLE),
        0x40..=0xFC => capability_area_mask(f, dword),
        // Ids, class, header type, cache line, latency, BIST, CardBus CIS, subsystem ids,
        // capabilities pointer, interrupt line and pin (interrupts are routed by the
        // microvisor), and the extended space (AER, ACS, ATS, SR-IOV: platform policy).
        _ => 0,
    } & lanes;
    if allowed == 0 {
        return WriteAction::Drop;
    }
    let keep = if dword == REG_COMMAND { 0xFFFF } else { u32::MAX };
    WriteAction::Write { offset: dword, value: ((hw_dword & !allowed) | (written & allowed)) & keep }
}

/// What the driver reads for `size` bytes at `offset` of `f`, given the hardware dword
/// `hw_dword` holding `offset`; the value is right-aligned (a 1-byte read returns 0..=0xFF).
///
/// Everything reads as hardware (the driver needs the real BAR addresses, since its mapping is
/// GPA = HPA, and the real capability contents), except a BAR being sized, which shows what it
/// read back when sized at boot so the driver's generic sizing code works without the BAR ever
/// moving, and the expansion ROM BAR, which reads 0 (no ROM: the ROM is not mapped for the
/// driver). An invalid access or a `state` of another function reads all ones, like an absent
/// function.
pub fn filter_read(f: &Function, state: &AssignedState, offset: u16, size: u8, hw_dword: u32) -> u32 {
    if !applies(f, state, offset, size) {
        return u32::MAX;
    }
    let slot = usize::from(offset.wrapping_sub(REG_BAR0) / 4);
    let view = match offset & !0x3 {
        REG_BAR0..=0x24 if state.sizing & (1 << slot) != 0 => f.bar_masks.get(slot).copied().unwrap_or(0),
        REG_ROM_BAR => 0,
        _ => hw_dword,
    };
    (view & lane_mask(offset, size)) >> (8 * u32::from(offset & 0x3))
}

/// The read hypercall: check the access, read the hardware dword, filter it.
pub fn config_read(
    cs: &impl ConfigSpace,
    f: &Function,
    state: &AssignedState,
    offset: u16,
    size: u8,
) -> Result<u32, ConfigError> {
    check_access(offset, size)?;
    let hw = cs.read32(f.bdf, offset & !0x3);
    Ok(filter_read(f, state, offset, size, hw))
}

/// The write hypercall: check the access, read the hardware dword, filter, and perform the
/// resulting write if any. Returns what was done.
pub fn config_write(
    cs: &mut impl ConfigSpace,
    f: &Function,
    state: &mut AssignedState,
    offset: u16,
    size: u8,
    value: u32,
) -> Result<WriteAction, ConfigError> {
    check_access(offset, size)?;
    let hw = cs.read32(f.bdf, offset & !0x3);
    let action = filter_write(f, state, offset, size, value, hw);
    if let WriteAction::Write { offset, value } = action {
        cs.write32(f.bdf, offset, value);
    }
    Ok(action)
}

/// Start a function-level reset if the function supports it (PCIe capability, DevCap
/// bit 28): afterwards the device has forgotten everything its last owner programmed. The
/// caller must wait 100 ms before the function is used again. Returns whether it was sent.
pub fn function_reset(cs: &mut impl ConfigSpace, f: &Function) -> bool {
    const CAP_PCIE: u8 = 0x10;
    let Some(&(_, cap, _)) = f.capabilities.iter().find(|c| c.0 == CAP_PCIE) else { return false };
    let cap = u16::from(cap);
    if cs.read32(f.bdf, cap + 4) & (1 << 28) == 0 {
        return false;
    }
    // Device Control is the low half of the dword at +8; the status half is written as
    // zeros (its bits are write-one-to-clear).
    let control = cs.read32(f.bdf, cap + 8) & 0xffff;
    cs.write32(f.bdf, cap + 8, control | (1 << 15));
    true
}

/// Undo what a completed function-level reset did to `f`'s addressing: write back the BARs
/// firmware assigned ([`Function::bars`]), with decoding and bus mastering left off.
///
/// An FLR sets the function's registers back to their defaults, sticky and HwInit ones
/// excepted (PCIe base spec §6.6.2), so the BARs read 0 (or the device's default) while the
/// microvisor maps the boot addresses into the next owner and never lets a driver move a BAR
/// ([`filter_write`]). The command register is reset too and is written here with decoding
/// and bus mastering off ([`quiesce`]): the next owner's driver turns on what it uses
/// through the filtered command bits, as after any assignment.
/// Call only once the function may be accessed again (100 ms after the FLR started).
pub fn restore_after_reset(cs: &mut impl ConfigSpace, f: &Function) {
    quiesce(cs, f.bdf);
    let count = match f.layout() {
        HeaderLayout::Endpoint => 6,
        HeaderLayout::Bridge => 2,
        HeaderLayout::Other => 0,
    };
    for (slot, &bar) in f.bars.iter().take(count).enumerate() {
        cs.write32(f.bdf, REG_BAR0 + 4 * slot as u16, bar);
    }
}

/// Stop a function's DMA: clear bus mastering only (decoding stays: a bridge's, or the LPC
/// bridge's legacy ports, may be what the machine itself uses). Done for every endpoint at
/// boot, before the IOMMU blocks unassigned devices (the status half is written as zeros).
pub fn stop_bus_mastering(cs: &mut impl ConfigSpace, bdf: Bdf) {
    let command = cs.read32(bdf, REG_COMMAND) as u16;
    if command & COMMAND_BUS_MASTER != 0 {
        cs.write32(bdf, REG_COMMAND, u32::from(command & !COMMAND_BUS_MASTER));
    }
}

/// Stop a function from touching memory: clear bus mastering and memory/IO decoding (the
/// status half is written as zeros, which leaves its write-one-to-clear bits alone). Used
/// before a function is given to a domain, and when a dying domain's device is taken back.
pub fn quiesce(cs: &mut impl ConfigSpace, bdf: Bdf) {
    let command = cs.read32(bdf, REG_COMMAND) as u16 & !(COMMAND_BUS_MASTER | COMMAND_DECODE);
    cs.write32(bdf, REG_COMMAND, u32::from(command));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::boxed::Box;
    use std::collections::BTreeMap;
    use std::string::ToString;
    use std::vec::Vec as StdVec;

    const DWORDS: usize = 1024;
    const REG_STATUS: u16 = 0x06;
    const REG_SUBSYSTEM: u16 = 0x2C;
    const REG_INTERRUPT: u16 = 0x3C;
    const CAP_MSI: u8 = 0x05;
    const STATUS_CAP_LIST_BIT: u16 = 1 << 4;

    /// One fake function: register values, which bits are writable, which are
    /// write-one-to-clear. Unless a test says otherwise every bit is writable, so any write the
    /// filter lets through shows up.
    #[derive(Clone)]
    struct FakeFn {
        regs: Box<[u32; DWORDS]>,
        wmask: Box<[u32; DWORDS]>,
        w1c: Box<[u32; DWORDS]>,
        /// Where its PCIe capability with FLR is, if it has one ([`FakeFn::flr`]).
        flr: Option<u16>,
    }

    impl FakeFn {
        fn new(vendor: u16, device: u16, class: u32, revision: u8, header_type: u8) -> Self {
            let mut f = FakeFn {
                regs: Box::new([0; DWORDS]),
                wmask: Box::new([u32::MAX; DWORDS]),
                w1c: Box::new([0; DWORDS]),
                flr: None,
            };
            f.regs[0] = u32::from(vendor) | u32::from(device) << 16;
            f.regs[2] = class << 8 | u32::from(revision);
            f.regs[3] = u32::from(header_type) << 16;
            // Status: bits 15..11 and 8 are RW1C, the rest read-only; command writable.
            f.wmask[1] = 0x0000_FFFF;
            f.w1c[1] = 0xF900_0000;
            // No BARs, no ROM until set.
            for i in 4..10 {
                f.wmask[i] = 0;
            }
            f.wmask[12] = 0;
            f
        }

        fn command(mut self, command: u16, status: u16) -> Self {
            self.regs[1] = u32::from(command) | u32::from(status) << 16;
            self
        }

        fn interrupt(mut self, line: u8, pin: u8) -> Self {
            self.regs[15] = u32::from(line) | u32::from(pin) << 8;
            self
        }

        fn bar32(mut self, slot: usize, addr: u32, size: u32, prefetchable: bool) -> Self {
            self.regs[4 + slot] = addr | if prefetchable { 0x8 } else { 0 };
            self.wmask[4 + slot] = !(size - 1);
            self
        }

        fn bar64(mut self, slot: usize, addr: u64, size: u64, prefetchable: bool) -> Self {
            let mask = !(size - 1);
            self.regs[4 + slot] = addr as u32 | 0x4 | if prefetchable { 0x8 } else { 0 };
            self.regs[5 + slot] = (addr >> 32) as u32;
            self.wmask[4 + slot] = mask as u32 & !0xF;
            self.wmask[5 + slot] = (mask >> 32) as u32;
            self
        }

        fn io(mut self, slot: usize, port: u32, size: u32) -> Self {
            self.regs[4 + slot] = port | 0x1;
            // A 16-bit decoder: the upper half reads back as zeros.
            self.wmask[4 + slot] = !(size - 1) & 0xFFFC;
            self
        }

        fn bridge_buses(mut self, primary: u8, secondary: u8, subordinate: u8) -> Self {
            self.regs[6] = u32::from(primary) | u32::from(secondary) << 8 | u32::from(subordinate) << 16;
            self.wmask[6] = 0;
            self
        }

        /// Chain capabilities `(id, offset, byte 2, byte 3)` in the given order.
        fn caps(mut self, caps: &[(u8, u8, u8, u8)]) -> Self {
            self.regs[1] |= STATUS_CAP_LIST;
            self.regs[13] = caps.first().map_or(0, |c| u32::from(c.1));
            for (i, &(id, off, b2, b3)) in caps.iter().enumerate() {
                let next = caps.get(i + 1).map_or(0, |c| c.1);
                self.regs[usize::from(off) / 4] =
                    u32::from(id) | u32::from(next) << 8 | u32::from(b2) << 16 | u32::from(b3) << 24;
            }
            self
        }

        /// Put a PCIe capability with FLR (DevCap bit 28) at `at`, first in the list.
        fn flr(mut self, at: u16) -> Self {
            let first = self.regs[13] & 0xFF;
            self.regs[1] |= STATUS_CAP_LIST;
            self.regs[13] = u32::from(at);
            self.regs[usize::from(at) / 4] = 0x10 | first << 8 | 0x0002 << 16;
            self.regs[usize::from(at) / 4 + 1] = 1 << 28;
            self.flr = Some(at);
            self
        }

        /// What a function-level reset does to the registers modelled here (PCIe base spec
        /// §6.6.2): the BARs and the command register lose what software wrote (their
        /// read-only bits, such as a BAR's type, stay), Initiate FLR reads 0 again.
        fn reset(&mut self, cap: u16) {
            for i in 4..10 {
                self.regs[i] &= !self.wmask[i];
            }
            self.regs[1] &= 0xFFFF_0000;
            self.regs[usize::from(cap) / 4 + 2] &= !(1 << 15);
        }

        fn set(mut self, offset: u16, value: u32) -> Self {
            self.regs[usize::from(offset) / 4] = value;
            self
        }
    }

    #[derive(Clone, Default)]
    struct FakeCs {
        fns: BTreeMap<Bdf, FakeFn>,
        writes: StdVec<(Bdf, u16, u32)>,
    }

    impl FakeCs {
        fn with(mut self, bus: u8, dev: u8, func: u8, f: FakeFn) -> Self {
            self.fns.insert(Bdf { bus, dev, func }, f);
            self
        }

        fn reg(&self, bdf: Bdf, offset: u16) -> u32 {
            self.fns[&bdf].regs[usize::from(offset) / 4]
        }
    }

    impl ConfigSpace for FakeCs {
        fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
            assert_eq!(offset % 4, 0, "unaligned dword read");
            assert!(offset < CONFIG_SPACE_SIZE);
            self.fns.get(&bdf).map_or(u32::MAX, |f| f.regs[usize::from(offset) / 4])
        }

        fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
            assert_eq!(offset % 4, 0, "unaligned dword write");
            assert!(offset < CONFIG_SPACE_SIZE);
            self.writes.push((bdf, offset, value));
            if let Some(f) = self.fns.get_mut(&bdf) {
                let i = usize::from(offset) / 4;
                let old = f.regs[i];
                f.regs[i] = ((old & !f.wmask[i]) | (value & f.wmask[i])) & !(value & f.w1c[i]);
                if let Some(cap) = f.flr.filter(|&cap| offset == cap + 8 && value & (1 << 15) != 0) {
                    f.reset(cap);
                }
            }
        }
    }

    const VIRTIO: Bdf = Bdf { bus: 0, dev: 1, func: 0 };
    const AHCI: Bdf = Bdf { bus: 0, dev: 0x1f, func: 2 };
    const VIRTIO_COMMAND: u16 = 0x0147; // IO, MEM, BM, parity response, SERR
    const VIRTIO_STATUS: u16 = 0x2010; // received master abort (RW1C), capability list
    const BAR1_ADDR: u32 = 0xFEBD_1000;
    const BAR4_ADDR: u64 = 0x8_0000_0000;

    /// virtio-blk (modern) as QEMU lays it out: MSI-X at 0x98, then the virtio vendor
    /// capabilities (PCI_CFG at 0x84, NOTIFY at 0x70, DEVICE at 0x60, ISR at 0x50, COMMON at
    /// 0x40).
    fn virtio_blk() -> FakeFn {
        FakeFn::new(0x1af4, 0x1042, 0x01_00_00, 1, 0)
            .command(VIRTIO_COMMAND, VIRTIO_STATUS)
            .interrupt(11, 1)
            .set(REG_SUBSYSTEM, 0x0002_1af4)
            .bar32(1, BAR1_ADDR, 4096, false)
            .bar64(4, BAR4_ADDR, 16384, true)
            .caps(&[
                (CAP_MSIX, 0x98, 0x02, 0x00), // table size 3
                (CAP_VENDOR, 0x84, 20, 5),    // VIRTIO_PCI_CAP_PCI_CFG
                (CAP_VENDOR, 0x70, 20, 2),    // notify
                (CAP_VENDOR, 0x60, 16, 4),    // device
                (CAP_VENDOR, 0x50, 16, 3),    // ISR
                (CAP_VENDOR, 0x40, 16, 1),    // common
            ])
            .set(0x9C, 0x0000_0001) // MSI-X table in BAR1 at 0
            .set(0xA0, 0x0000_0801) // PBA in BAR1 at 0x800
            .set(0x94, 0x1234_5678) // pci_cfg_data
    }

    /// A q35-like bus 0 without bridges: host bridge, virtio-blk, a single-function NIC that
    /// also answers on function 1, and the ICH9 multi-function device at 1f (functions 0, 2,
    /// 3). A function on bus 1 is unreachable (no bridge leads there).
    fn machine() -> FakeCs {
        FakeCs::default()
            .with(0, 0, 0, FakeFn::new(0x8086, 0x29c0, 0x06_00_00, 0, 0))
            .with(0, 1, 0, virtio_blk())
            .with(
                0,
                3,
                0,
                FakeFn::new(0x8086, 0x10d3, 0x02_00_00, 0, 0)
                    .command(0x0003, 0)
                    .bar32(0, 0xFEB8_0000, 128 * 1024, false)
                    .io(2, 0xC000, 32)
                    .interrupt(10, 1),
            )
            .with(0, 3, 1, FakeFn::new(0x8086, 0x10d3, 0x02_00_00, 0, 0))
            .with(0, 0x1f, 0, FakeFn::new(0x8086, 0x2918, 0x06_01_00, 2, 0x80))
            .with(
                0,
                0x1f,
                2,
                FakeFn::new(0x8086, 0x2922, 0x01_06_01, 2, 0)
                    .command(0x0007, 0)
                    .io(4, 0xC080, 32)
                    .bar32(5, 0xFEBD_2000, 4096, false)
                    .interrupt(10, 1)
                    .caps(&[(CAP_MSI, 0x80, 0x80, 0x00), (0x12, 0xA8, 0x10, 0x00)]),
            )
            .with(0, 0x1f, 3, FakeFn::new(0x8086, 0x2930, 0x0c_05_00, 2, 0).io(4, 0x0700, 64).interrupt(10, 1))
            .with(1, 0, 0, FakeFn::new(0x1b36, 0x0001, 0x06_00_00, 0, 0))
    }

    fn enumerate_all(cs: &mut FakeCs) -> (Vec<Function, MAX_FUNCTIONS>, EnumerationSummary) {
        let mut out = Vec::new();
        let summary = enumerate(cs, 0..=255, &mut out);
        (out, summary)
    }

    fn find(fns: &[Function], bdf: Bdf) -> Function {
        fns.iter().find(|f| f.bdf == bdf).cloned().expect("function enumerated")
    }

    fn virtio_function() -> (FakeCs, Function) {
        let mut cs = machine();
        let (fns, _) = enumerate_all(&mut cs);
        let f = find(&fns, VIRTIO);
        cs.writes.clear();
        (cs, f)
    }

    fn caps_of(list: &[(u8, u8, u8)]) -> Vec<(u8, u8, u8), MAX_CAPS> {
        list.iter().copied().collect()
    }

    fn sizing(st: &AssignedState, slot: usize) -> bool {
        st.sizing & (1 << slot) != 0
    }

    #[test]
    fn bus_mastering_stops_and_decoding_stays() {
        let bdf = Bdf { bus: 0, dev: 1, func: 0 };
        // Bus mastering, memory and I/O decode on; a write-one-to-clear status bit set.
        let mut cs =
            FakeCs::default().with(0, 1, 0, FakeFn::new(0x1af4, 0x1042, 0x01_00_00, 0, 0).command(0x0407, 0x8000));
        stop_bus_mastering(&mut cs, bdf);
        assert_eq!(cs.reg(bdf, REG_COMMAND), 0x8000_0403, "BME off, decode and INTx disable kept, status kept");
        // Nothing to do: no write.
        let writes = cs.writes.len();
        stop_bus_mastering(&mut cs, bdf);
        assert_eq!(cs.writes.len(), writes);
        quiesce(&mut cs, bdf);
        assert_eq!(cs.reg(bdf, REG_COMMAND), 0x8000_0400);
    }

    #[test]
    fn bdf_requester_id_and_display() {
        let b = Bdf { bus: 0, dev: 4, func: 0 };
        assert_eq!(b.to_string(), "00:04.0");
        assert_eq!(b.requester_id(), 0x20);
        let b = Bdf { bus: 0xab, dev: 0x1f, func: 7 };
        assert_eq!(b.to_string(), "ab:1f.7");
        assert_eq!(b.requester_id(), 0xabff);
        assert_eq!(Bdf::from_requester_id(0xabff), b);
        // Out-of-range fields do not spill into the neighbours.
        assert_eq!(Bdf { bus: 0, dev: 0xff, func: 0xff }.requester_id(), 0x00ff);
    }

    #[test]
    fn enumerates_a_bridgeless_bus_in_order() {
        let mut cs = machine();
        let (fns, summary) = enumerate_all(&mut cs);
        let bdfs: StdVec<_> = fns.iter().map(|f| f.bdf.to_string()).collect();
        // 00:03.1 is a ghost of a single-function device; 01:00.0 is behind no bridge.
        assert_eq!(bdfs, ["00:00.0", "00:01.0", "00:03.0", "00:1f.0", "00:1f.2", "00:1f.3"]);
        assert_eq!(summary, EnumerationSummary { buses_scanned: 1, functions_found: 6, functions_dropped: 0 });
    }

    #[test]
    fn virtio_blk_is_described_completely() {
        let (_, f) = virtio_function();
        let expected = Function {
            bdf: VIRTIO,
            vendor: 0x1af4,
            device: 0x1042,
            class: ClassCode { base: 1, sub: 0, prog_if: 0 },
            header_type: 0,
            mem_bars: [(u64::from(BAR1_ADDR), 4096), (BAR4_ADDR, 16384)].into_iter().collect(),
            bar_masks: [0, 0xFFFF_F000, 0, 0, 0xFFFF_C00C, 0xFFFF_FFFF],
            bars: [0, BAR1_ADDR, 0, 0, BAR4_ADDR as u32 | 0xC, (BAR4_ADDR >> 32) as u32],
            // Byte 2: the MSI-X table size, then the vendor capabilities' lengths.
            capabilities: caps_of(&[
                (CAP_MSIX, 0x98, 2),
                (CAP_VENDOR, 0x84, 20),
                (CAP_VENDOR, 0x70, 20),
                (CAP_VENDOR, 0x60, 16),
                (CAP_VENDOR, 0x50, 16),
                (CAP_VENDOR, 0x40, 16),
            ]),
        };
        assert_eq!(f, expected);
        assert_eq!(f.layout(), HeaderLayout::Endpoint);
        assert_eq!(f.to_string(), "00:01.0 1af4:1042 class 01/00/00");
    }

    #[test]
    fn after_a_function_level_reset_the_boot_bars_come_back_and_decoding_stays_off() {
        let mut cs = FakeCs::default().with(0, 1, 0, virtio_blk().flr(0xC0));
        let boot = find(&enumerate_all(&mut cs).0, VIRTIO);
        assert_eq!(boot.capabilities[0], (0x10, 0xC0, 2));
        assert_eq!(boot.bars, [0, BAR1_ADDR, 0, 0, BAR4_ADDR as u32 | 0xC, (BAR4_ADDR >> 32) as u32]);
        // Its driver turned decoding and bus mastering on, then its domain died.
        cs.write32(VIRTIO, REG_COMMAND, 0x0007);
        assert!(function_reset(&mut cs, &boot));
        // The reset forgot the addresses: the function decodes nothing where the next
        // owner's mapping points.
        assert_eq!(cs.reg(VIRTIO, REG_BAR0 + 4), 0);
        assert_eq!(cs.reg(VIRTIO, REG_BAR0 + 16), 0xC);
        assert_eq!(cs.reg(VIRTIO, REG_BAR0 + 20), 0);
        restore_after_reset(&mut cs, &boot);
        for (slot, &bar) in boot.bars.iter().enumerate() {
            assert_eq!(cs.reg(VIRTIO, REG_BAR0 + 4 * slot as u16), bar, "BAR{slot}");
        }
        // Quiesced: the next owner's driver enables what it uses; status left alone.
        assert_eq!(cs.reg(VIRTIO, REG_COMMAND), u32::from(VIRTIO_STATUS) << 16);
        // Enumerated again, it is the function the microvisor recorded at boot.
        assert_eq!(find(&enumerate_all(&mut cs).0, VIRTIO), boot);
    }

    #[test]
    fn multi_function_device_io_bars_and_msi() {
        let mut cs = machine();
        let (fns, _) = enumerate_all(&mut cs);
        let lpc = find(&fns, Bdf { bus: 0, dev: 0x1f, func: 0 });
        assert!(lpc.header_type & 0x80 != 0);
        assert_eq!(lpc.class, ClassCode { base: 6, sub: 1, prog_if: 0 });
        assert_eq!((lpc.bar_masks, lpc.mem_bars.len()), ([0; 6], 0));
        let ahci = find(&fns, AHCI);
        assert_eq!(ahci.class, ClassCode { base: 1, sub: 6, prog_if: 1 });
        // I/O BARs are not memory BARs; sizing shows what the 16-bit decoder read back.
        assert_eq!(ahci.bar_masks[4], 0x0000_FFE1);
        assert_eq!(ahci.mem_bars[..], [(0xFEBD_2000, 4096)]);
        assert_eq!(ahci.capabilities, caps_of(&[(CAP_MSI, 0x80, 0x80), (0x12, 0xA8, 0x10)]));
        let smbus = find(&fns, Bdf { bus: 0, dev: 0x1f, func: 3 });
        assert_eq!(smbus.bar_masks[4], 0x0000_FFC1);
        assert!(smbus.mem_bars.is_empty() && smbus.capabilities.is_empty());
        let nic = find(&fns, Bdf { bus: 0, dev: 3, func: 0 });
        assert_eq!(nic.mem_bars[..], [(0xFEB8_0000, 0x20000)]);
        assert_eq!(nic.bar_masks[..3], [0xFFFE_0000, 0, 0x0000_FFE1]);
    }

    #[test]
    fn sizing_restores_bars_and_command_and_keeps_status() {
        let before = machine();
        let mut cs = before.clone();
        let _ = enumerate_all(&mut cs);
        for (bdf, f) in &before.fns {
            assert_eq!(&f.regs[..], &cs.fns[bdf].regs[..], "{bdf} changed by enumeration");
        }
        // The virtio function's writes: decode off, size each BAR with decode off, restore.
        let writes: StdVec<_> = cs.writes.iter().filter(|w| w.0 == VIRTIO).map(|w| (w.1, w.2)).collect();
        let cmd_off = u32::from(VIRTIO_COMMAND & !COMMAND_DECODE);
        assert_eq!(writes.first(), Some(&(REG_COMMAND, cmd_off)));
        assert_eq!(writes.last(), Some(&(REG_COMMAND, u32::from(VIRTIO_COMMAND))));
        assert_eq!(writes.iter().filter(|w| w.0 == REG_COMMAND).count(), 2);
        let bar_writes: StdVec<_> = writes[1..writes.len() - 1].to_vec();
        assert_eq!(bar_writes.len(), 12, "each of the six BAR dwords: all ones, then restore");
        for pair in bar_writes.chunks(2) {
            assert_eq!(pair[0].0, pair[1].0);
            assert_eq!(pair[0].1, u32::MAX);
            assert_eq!(pair[1].1, before.reg(VIRTIO, pair[0].0));
        }
        // The RW1C status bit survived (the command writes carry zeros in the status half).
        assert_eq!(cs.reg(VIRTIO, REG_COMMAND) >> 16, u32::from(VIRTIO_STATUS));
        // A function with decode already off sees no command write at all.
        let smbus = Bdf { bus: 0, dev: 0x1f, func: 3 };
        assert!(cs.writes.iter().filter(|w| w.0 == smbus).all(|w| w.1 != REG_COMMAND));
        // A function with decode off and no BARs only sees the probes of its BAR slots.
        let host = Bdf { bus: 0, dev: 0, func: 0 };
        assert!(cs.writes.iter().filter(|w| w.0 == host).all(|w| (REG_BAR0..0x28).contains(&w.1)));
        // Nothing but BAR slots and the command register is ever written.
        assert!(cs.writes.iter().all(|w| (REG_BAR0..0x28).contains(&w.1) || w.1 == REG_COMMAND));
    }

    #[test]
    fn bars_of_unusual_types() {
        let cs = FakeCs::default().with(
            0,
            0,
            0,
            FakeFn::new(1, 2, 0, 0, 0)
                .bar64(5, 0x1000_0000, 4096, false) // 64-bit type in the last slot
                .bar32(0, 0xE000_0000, 1 << 20, true)
                .set(0x14, 0x6) // reserved memory type 3
                .set(0x18, 0x2), // legacy below-1 MiB type
        );
        let mut cs = cs;
        let bdf = Bdf { bus: 0, dev: 0, func: 0 };
        cs.fns.get_mut(&bdf).unwrap().wmask[6] = 0xFFFF_F000;
        let (masks, mem) = size_bars(&mut cs, bdf, 6);
        // Slot 1 (reserved type) and slot 5 (64-bit, no upper half) are no memory BARs.
        assert_eq!(mem[..], [(0xE000_0000, 1 << 20), (0, 4096)]);
        assert_eq!(masks, [0xFFF0_0008, 0x6, 0xFFFF_F002, 0, 0, 0xFFFF_F004]);
        // Bridges have two BAR slots only; counts beyond six are clamped.
        assert_eq!(size_bars(&mut cs, bdf, 2), ([0xFFF0_0008, 0x6, 0, 0, 0, 0], mem[..1].iter().copied().collect()));
        assert_eq!(size_bars(&mut cs, bdf, 99), (masks, mem));
        assert_eq!(size_bars(&mut cs, bdf, 0), ([0; 6], Vec::new()));
        // A 64-bit BAR consumes the upper slot, even when that holds what would look like the
        // start of another 64-bit BAR (which would swallow the 32-bit BAR in slot 2). Here the
        // upper dword is read-only 4: a 16 GiB BAR at 16 GiB.
        let upper = FakeFn::new(1, 2, 0, 0, 0).set(0x10, 0x4).set(0x14, 0x4).bar32(2, 0xFE00_0000, 4096, false);
        let mut cs = FakeCs::default().with(0, 0, 0, upper);
        assert_eq!(size_bars(&mut cs, bdf, 6).1[..], [(4 << 32, 4 << 32), (0xFE00_0000, 4096)]);
        // BARs smaller than a page, or that wrap around, are not recorded.
        let mut small = FakeFn::new(1, 2, 0, 0, 0).bar32(0, 0x1100, 256, false).set(0x14, 0x1800);
        small.wmask[5] = 0xFFFF_F000;
        let mut cs = FakeCs::default().with(0, 0, 0, small.bar64(2, 0xFFFF_FFFF_FFFF_E000, 8192, false));
        let (masks, mem) = size_bars(&mut cs, bdf, 6);
        assert_eq!((masks[0], masks[1], masks[2], masks[3]), (0xFFFF_FF00, 0xFFFF_F800, 0xFFFF_E004, u32::MAX));
        assert!(mem.is_empty());
    }

    #[test]
    fn bridges_are_followed_within_range_and_without_loops() {
        let mut cs = FakeCs::default()
            .with(0, 0, 0, FakeFn::new(0x8086, 0x29c0, 0x06_00_00, 0, 0))
            .with(0, 0x1c, 0, FakeFn::new(0x1b36, 0x000c, 0x06_04_00, 0, 0x01).bridge_buses(0, 2, 2))
            .with(0, 0x1d, 0, FakeFn::new(0x1b36, 0x000c, 0x06_04_00, 0, 0x01).bridge_buses(0, 0, 0))
            .with(0, 0x1e, 0, FakeFn::new(0x1b36, 0x000c, 0x06_04_00, 0, 0x01).bridge_buses(0, 9, 9))
            .with(2, 0, 0, FakeFn::new(0x1af4, 0x1041, 0x02_00_00, 1, 0).bar32(1, 0xFE00_0000, 4096, false))
            .with(2, 1, 0, FakeFn::new(0x1b36, 0x000c, 0x06_04_00, 0, 0x01).bridge_buses(2, 2, 2))
            .with(9, 0, 0, FakeFn::new(0x1af4, 0x1042, 0x01_00_00, 1, 0));
        let mut out = Vec::new();
        let summary = enumerate(&mut cs, 0..=4, &mut out);
        let bdfs: StdVec<_> = out.iter().map(|f| f.bdf.to_string()).collect();
        assert_eq!(bdfs, ["00:00.0", "00:1c.0", "00:1d.0", "00:1e.0", "02:00.0", "02:01.0"]);
        assert_eq!(summary.buses_scanned, 2);
        assert_eq!(out[1].layout(), HeaderLayout::Bridge);
        assert_eq!(out[4].mem_bars[..], [(0xFE00_0000, 4096)]);
        // Starting elsewhere scans from that bus; an empty range scans nothing.
        let summary = enumerate(&mut cs, 2..=2, &mut out);
        assert_eq!((summary.buses_scanned, out.len()), (1, 2));
        #[allow(clippy::reversed_empty_ranges)]
        let summary = enumerate(&mut cs, 3..=2, &mut out);
        assert_eq!((summary, out.len()), (EnumerationSummary::default(), 0));
    }

    #[test]
    fn output_overflow_is_counted_not_fatal() {
        let mut cs = FakeCs::default();
        for dev in 0..9 {
            cs = cs.with(0, dev, 0, FakeFn::new(0x8086, 0x1000, 0x02_00_00, 0, 0x80));
            for func in 1..8 {
                cs = cs.with(0, dev, func, FakeFn::new(0x8086, 0x1000, 0x02_00_00, 0, 0));
            }
        }
        let (fns, summary) = enumerate_all(&mut cs);
        assert_eq!(fns.len(), MAX_FUNCTIONS);
        assert_eq!(summary, EnumerationSummary { buses_scanned: 1, functions_found: 72, functions_dropped: 8 });
    }

    #[test]
    fn vendor_zero_is_absent() {
        let mut cs = FakeCs::default().with(0, 0, 0, FakeFn::new(0, 0, 0, 0, 0));
        assert!(enumerate_all(&mut cs).0.is_empty());
    }

    fn caps_fn(first: u8, entries: &[(u8, u32)]) -> FakeCs {
        let mut f = FakeFn::new(1, 2, 0, 0, 0).command(0, STATUS_CAP_LIST_BIT).set(REG_CAP_PTR, u32::from(first));
        for &(off, v) in entries {
            f = f.set(u16::from(off), v);
        }
        FakeCs::default().with(0, 0, 0, f)
    }

    fn walk(cs: &FakeCs) -> StdVec<(u8, u8)> {
        let mut cs = cs.clone();
        enumerate_all(&mut cs).0[0].capabilities.iter().map(|&(id, off, _)| (id, off)).collect()
    }

    #[test]
    fn capability_walk_terminates_on_loops_and_bad_pointers() {
        // 0x40 -> 0x50 -> 0x40 -> ...
        let looping = caps_fn(0x40, &[(0x40, 0x0000_5005), (0x50, 0x0000_4011)]);
        assert_eq!(walk(&looping), [(0x05, 0x40), (0x11, 0x50)]);
        // A capability pointing at itself.
        assert_eq!(walk(&caps_fn(0x60, &[(0x60, 0x0000_6009)])), [(0x09, 0x60)]);
        // Unaligned, below 0x40, and 0xFF ids stop the walk.
        assert_eq!(walk(&caps_fn(0x40, &[(0x40, 0x0000_5105)])), [(0x05, 0x40)]);
        assert_eq!(walk(&caps_fn(0x41, &[(0x40, 0x0000_0005)])), []);
        assert_eq!(walk(&caps_fn(0x3C, &[])), []);
        assert_eq!(walk(&caps_fn(0x40, &[(0x40, 0x0000_5005), (0x50, 0xFFFF_FFFF)])), [(0x05, 0x40)]);
        // Without the status bit the pointer is not followed.
        let mut no_list = caps_fn(0x40, &[(0x40, 0x0000_0005)]);
        no_list.fns.values_mut().for_each(|f| f.regs[1] = 0);
        assert_eq!(walk(&no_list), []);
        // A list of all 48 slots is cut at MAX_CAPS.
        let all: StdVec<(u8, u32)> = (0..48u32)
            .map(|i| ((0x40 + 4 * i) as u8, if i == 47 { 0x09 } else { (0x44 + 4 * i) << 8 | 0x09 }))
            .collect();
        let caps = walk(&caps_fn(0x40, &all));
        assert_eq!(caps.len(), MAX_CAPS);
        assert_eq!(caps[15], (0x09, 0x7C));
    }

    #[test]
    fn check_access_rules() {
        assert_eq!(check_access(0, 4), Ok(()));
        assert_eq!(check_access(0xFFC, 4), Ok(()));
        assert_eq!(check_access(0xFFF, 1), Ok(()));
        assert_eq!(check_access(0xFFE, 2), Ok(()));
        assert_eq!(check_access(0, 3), Err(ConfigError::BadAccess));
        assert_eq!(check_access(0, 8), Err(ConfigError::BadAccess));
        assert_eq!(check_access(0, 0), Err(ConfigError::BadAccess));
        assert_eq!(check_access(2, 4), Err(ConfigError::BadAccess));
        assert_eq!(check_access(1, 2), Err(ConfigError::BadAccess));
        assert_eq!(check_access(0x1000, 4), Err(ConfigError::BadAccess));
        assert_eq!(check_access(0xFFFF, 1), Err(ConfigError::BadAccess));
    }

    #[test]
    fn only_endpoints_can_be_assigned() {
        let mut cs = FakeCs::default().with(0, 0, 0, FakeFn::new(1, 2, 0x06_04_00, 0, 1).bridge_buses(0, 1, 1));
        let bridge = enumerate_all(&mut cs).0[0].clone();
        assert_eq!(AssignedState::new(&bridge), Err(ConfigError::NotEndpoint));
        let mut bridge_state = AssignedState { bdf: bridge.bdf, sizing: 0 };
        assert_eq!(filter_write(&bridge, &mut bridge_state, REG_COMMAND, 2, 0xFFFF, 0), WriteAction::Drop);
        let (_, f) = virtio_function();
        let mut state = AssignedState::new(&f).unwrap();
        assert_eq!(state.bdf, VIRTIO);
        // A state used with another function filters nothing through.
        let mut other = f.clone();
        other.bdf = AHCI;
        assert_eq!(filter_write(&other, &mut state, 4, 2, 0xFFFF, 0), WriteAction::Drop);
        assert_eq!(filter_read(&other, &state, 0, 4, 0x1234), u32::MAX);
        // So does a function whose header changed after the state was made.
        let mut changed = f.clone();
        changed.header_type = 1;
        assert_eq!(filter_write(&changed, &mut state, 4, 2, 0xFFFF, 0), WriteAction::Drop);
        // Invalid accesses are dropped / read as all ones even without the wrappers.
        assert_eq!(filter_write(&f, &mut state, 5, 2, 0xFFFF, 0), WriteAction::Drop);
        assert_eq!(filter_read(&f, &state, 5, 2, 0), u32::MAX);
    }

    #[test]
    fn command_register_only_changes_allowed_bits() {
        let (mut cs, f) = virtio_function();
        let mut st = AssignedState::new(&f).unwrap();
        let hw = u32::from(VIRTIO_COMMAND) | u32::from(VIRTIO_STATUS) << 16;
        // Everything off: IO, parity response and SERR keep their hardware values.
        assert_eq!(
            filter_write(&f, &mut st, REG_COMMAND, 2, 0, hw),
            WriteAction::Write { offset: REG_COMMAND, value: u32::from(VIRTIO_COMMAND & !0x0006) }
        );
        // Everything on, as a dword: only INTX_DISABLE is added; status written as zeros.
        assert_eq!(
            filter_write(&f, &mut st, REG_COMMAND, 4, u32::MAX, hw),
            WriteAction::Write { offset: REG_COMMAND, value: u32::from(VIRTIO_COMMAND | 0x0400) }
        );
        // The high byte alone: bit 10 may change, SERR (8) and fast back-to-back (9) not.
        assert_eq!(
            filter_write(&f, &mut st, 0x05, 1, 0xFF, hw),
            WriteAction::Write { offset: REG_COMMAND, value: u32::from(VIRTIO_COMMAND | 0x0400) }
        );
        assert_eq!(
            filter_write(&f, &mut st, 0x05, 1, 0x00, hw),
            WriteAction::Write { offset: REG_COMMAND, value: u32::from(VIRTIO_COMMAND) }
        );
        // Through the hypercall path: the hardware keeps IO, SERR and its RW1C status bit.
        assert!(matches!(config_write(&mut cs, &f, &mut st, REG_COMMAND, 2, 0x0000), Ok(WriteAction::Write { .. })));
        assert_eq!(cs.reg(VIRTIO, REG_COMMAND), u32::from(VIRTIO_COMMAND & !0x6) | u32::from(VIRTIO_STATUS) << 16);
        assert_eq!(config_read(&cs, &f, &st, REG_COMMAND, 2), Ok(u32::from(VIRTIO_COMMAND & !0x6)));
        assert_eq!(config_read(&cs, &f, &st, REG_STATUS, 2), Ok(u32::from(VIRTIO_STATUS)));
    }

    #[test]
    fn status_and_header_writes_are_dropped() {
        let (mut cs, f) = virtio_function();
        let mut st = AssignedState::new(&f).unwrap();
        for (offset, size) in [
            (REG_STATUS, 2),
            (0x07, 1),
            (REG_ID, 4),
            (0x02, 2),
            (REG_CLASS_REV, 4),
            (REG_HEADER, 4),
            (0x0E, 1),
            (0x0F, 1),
            (0x28, 4),
            (REG_SUBSYSTEM, 4),
            (REG_CAP_PTR, 1),
            (0x38, 4),
            (REG_INTERRUPT, 1),
            (0x3D, 1),
            (REG_INTERRUPT, 4),
        ] {
            assert_eq!(
                config_write(&mut cs, &f, &mut st, offset, size, u32::MAX),
                Ok(WriteAction::Drop),
                "{offset:#x}"
            );
        }
        assert!(cs.writes.is_empty());
        assert_eq!(config_write(&mut cs, &f, &mut st, 0x1000, 4, 0), Err(ConfigError::BadAccess));
        assert_eq!(config_read(&cs, &f, &st, 3, 2), Err(ConfigError::BadAccess));
        assert_eq!(config_read(&cs, &f, &st, 0, 4), Ok(0x1042_1af4));
        assert_eq!(config_read(&cs, &f, &st, 0x3D, 1), Ok(1));
    }

    #[test]
    fn bar_sizing_is_emulated() {
        let (mut cs, f) = virtio_function();
        let mut st = AssignedState::new(&f).unwrap();
        let bar = |slot: u16| REG_BAR0 + 4 * slot;
        // Real addresses by default.
        assert_eq!(config_read(&cs, &f, &st, bar(1), 4), Ok(BAR1_ADDR));
        assert_eq!(config_read(&cs, &f, &st, bar(4), 4), Ok(0x0000_000C));
        assert_eq!(config_read(&cs, &f, &st, bar(5), 4), Ok(0x8));
        // Sizing every slot.
        let masks = [0, 0xFFFF_F000, 0, 0, 0xFFFF_C00C, 0xFFFF_FFFF];
        for (slot, mask) in masks.iter().enumerate() {
            let slot = slot as u16;
            assert_eq!(config_write(&mut cs, &f, &mut st, bar(slot), 4, u32::MAX), Ok(WriteAction::Emulated));
            assert!(sizing(&st, usize::from(slot)));
            assert_eq!(config_read(&cs, &f, &st, bar(slot), 4), Ok(*mask), "BAR{slot}");
            // It stays sized until the next write, like hardware.
            assert_eq!(config_read(&cs, &f, &st, bar(slot), 4), Ok(*mask));
            assert_eq!(config_read(&cs, &f, &st, bar(slot) + 2, 2), Ok(*mask >> 16));
            assert_eq!(config_read(&cs, &f, &st, bar(slot) + 1, 1), Ok((*mask >> 8) & 0xFF));
        }
        // Writing the address back (or anything else) restores the real view.
        assert_eq!(config_write(&mut cs, &f, &mut st, bar(1), 4, BAR1_ADDR), Ok(WriteAction::Emulated));
        assert_eq!(config_read(&cs, &f, &st, bar(1), 4), Ok(BAR1_ADDR));
        assert_eq!(config_write(&mut cs, &f, &mut st, bar(4), 4, 0x1234_0000), Ok(WriteAction::Emulated));
        assert_eq!(config_read(&cs, &f, &st, bar(4), 4), Ok(0x0000_000C));
        assert!(!sizing(&st, 4) && sizing(&st, 5) && !sizing(&st, 6));
        // A sub-dword write of ones does not make the merged dword all ones: no sizing.
        assert_eq!(config_write(&mut cs, &f, &mut st, bar(1) + 2, 2, 0xFFFF), Ok(WriteAction::Emulated));
        assert_eq!(config_read(&cs, &f, &st, bar(1), 4), Ok(BAR1_ADDR));
        // The hardware never saw any of it.
        assert!(cs.writes.is_empty());
        assert_eq!(cs.reg(VIRTIO, bar(1)), BAR1_ADDR);
    }

    #[test]
    fn io_bar_sizing_view() {
        let mut cs = machine();
        let (fns, _) = enumerate_all(&mut cs);
        let ahci = find(&fns, AHCI);
        let mut st = AssignedState::new(&ahci).unwrap();
        assert_eq!(config_write(&mut cs, &ahci, &mut st, 0x20, 4, u32::MAX), Ok(WriteAction::Emulated));
        // What the 16-bit I/O decoder read back at boot.
        assert_eq!(config_read(&cs, &ahci, &st, 0x20, 4), Ok(0x0000_FFE1));
        assert_eq!(config_read(&cs, &ahci, &st, 0x24, 4), Ok(0xFEBD_2000));
    }

    #[test]
    fn rom_bar_reads_zero_and_is_never_written() {
        let (mut cs, f) = virtio_function();
        let mut st = AssignedState::new(&f).unwrap();
        cs.fns.get_mut(&VIRTIO).unwrap().regs[12] = 0xFEB0_0001;
        assert_eq!(config_read(&cs, &f, &st, REG_ROM_BAR, 4), Ok(0));
        assert_eq!(config_write(&mut cs, &f, &mut st, REG_ROM_BAR, 4, 0xFFFF_F800), Ok(WriteAction::Emulated));
        assert_eq!(config_read(&cs, &f, &st, REG_ROM_BAR, 4), Ok(0));
        assert_eq!(config_write(&mut cs, &f, &mut st, REG_ROM_BAR + 1, 1, 0), Ok(WriteAction::Emulated));
        assert!(cs.writes.is_empty());
    }

    #[test]
    fn msix_control_allows_enable_and_mask_only() {
        let (mut cs, f) = virtio_function();
        let mut st = AssignedState::new(&f).unwrap();
        let hw = cs.reg(VIRTIO, 0x98);
        assert_eq!(hw, 0x0002_8411);
        assert_eq!(
            filter_write(&f, &mut st, 0x9A, 2, 0xFFFF, hw),
            WriteAction::Write { offset: 0x98, value: 0xC002_8411 }
        );
        assert_eq!(
            filter_write(&f, &mut st, 0x98, 4, 0x8000_0000, 0xC002_8411),
            WriteAction::Write { offset: 0x98, value: 0x8002_8411 }
        );
        assert_eq!(
            filter_write(&f, &mut st, 0x9B, 1, 0x40, hw),
            WriteAction::Write { offset: 0x98, value: 0x4002_8411 }
        );
        // Table size byte, id and next pointer, table and PBA offsets: dropped.
        assert_eq!(filter_write(&f, &mut st, 0x9A, 1, 0xFF, hw), WriteAction::Drop);
        assert_eq!(filter_write(&f, &mut st, 0x98, 2, 0, hw), WriteAction::Drop);
        assert_eq!(filter_write(&f, &mut st, 0x9C, 4, 0, 1), WriteAction::Drop);
        assert_eq!(filter_write(&f, &mut st, 0xA0, 4, 0, 1), WriteAction::Drop);
        config_write(&mut cs, &f, &mut st, 0x98, 4, u32::MAX).unwrap();
        assert_eq!(cs.reg(VIRTIO, 0x98), 0xC002_8411);
    }

    #[test]
    fn vendor_capabilities_are_writable_except_their_header() {
        let (mut cs, f) = virtio_function();
        let mut st = AssignedState::new(&f).unwrap();
        // VIRTIO_PCI_CAP_PCI_CFG: bar, offset, length, data window.
        assert_eq!(config_write(&mut cs, &f, &mut st, 0x88, 1, 4), Ok(WriteAction::Write { offset: 0x88, value: 4 }));
        assert_eq!(
            config_write(&mut cs, &f, &mut st, 0x94, 4, 0xDEAD_BEEF),
            Ok(WriteAction::Write { offset: 0x94, value: 0xDEAD_BEEF })
        );
        assert_eq!(cs.reg(VIRTIO, 0x94), 0xDEAD_BEEF);
        assert_eq!(config_read(&cs, &f, &st, 0x96, 2), Ok(0xDEAD));
        // The header bytes (id, next, length) are not; cfg_type (byte 3) is part of the body.
        let hw = cs.reg(VIRTIO, 0x84);
        for off in [0x84, 0x85, 0x86] {
            assert_eq!(filter_write(&f, &mut st, off, 1, 0, hw), WriteAction::Drop);
        }
        assert_eq!(
            filter_write(&f, &mut st, 0x84, 4, 0, hw),
            WriteAction::Write { offset: 0x84, value: hw & 0x00FF_FFFF }
        );
        // Past the end of the capability list: dropped.
        assert_eq!(config_write(&mut cs, &f, &mut st, 0xA4, 4, 0), Ok(WriteAction::Drop));
        assert_eq!(config_write(&mut cs, &f, &mut st, 0xFC, 4, 0), Ok(WriteAction::Drop));
    }

    #[test]
    fn vendor_capability_length_is_clamped_to_the_next_capability() {
        let mut cs = FakeCs::default().with(
            0,
            0,
            0,
            FakeFn::new(1, 2, 0, 0, 0).caps(&[(CAP_VENDOR, 0x40, 0xF0, 0), (CAP_MSI, 0x50, 0x80, 0)]).set(0xF4, 0),
        );
        let f = enumerate_all(&mut cs).0[0].clone();
        let mut st = AssignedState::new(&f).unwrap();
        assert!(matches!(filter_write(&f, &mut st, 0x4C, 4, 0, 1), WriteAction::Write { .. }));
        for off in (0x50..0x100).step_by(4) {
            assert_eq!(filter_write(&f, &mut st, off, 4, 0, 1), WriteAction::Drop, "{off:#x}");
        }
        // A vendor capability shorter than its header has no body.
        let mut short = f.clone();
        short.capabilities[0].2 = 2;
        assert_eq!(filter_write(&short, &mut st, 0x40, 4, 0, 1), WriteAction::Drop);
        assert_eq!(filter_write(&short, &mut st, 0x44, 4, 0, 1), WriteAction::Drop);
    }

    #[test]
    fn msi_and_extended_space_writes_are_dropped() {
        let mut cs = machine();
        let (fns, _) = enumerate_all(&mut cs);
        let ahci = find(&fns, AHCI);
        cs.writes.clear();
        let mut st = AssignedState::new(&ahci).unwrap();
        for off in (0x80..0x98).step_by(4) {
            assert_eq!(config_write(&mut cs, &ahci, &mut st, off, 4, u32::MAX), Ok(WriteAction::Drop));
        }
        assert_eq!(config_write(&mut cs, &ahci, &mut st, 0x82, 2, 1), Ok(WriteAction::Drop));
        for off in [0x100, 0x104, 0x200, 0xFFC] {
            assert_eq!(config_write(&mut cs, &ahci, &mut st, off, 4, u32::MAX), Ok(WriteAction::Drop));
        }
        assert!(cs.writes.is_empty());
        // Reads of the extended space pass through.
        cs.fns.get_mut(&AHCI).unwrap().regs[0x40] = 0x1001_0001;
        assert_eq!(config_read(&cs, &ahci, &st, 0x100, 4), Ok(0x1001_0001));
        assert_eq!(config_read(&cs, &ahci, &st, 0x102, 2), Ok(0x1001));
    }

    /// The bits of each virtio-blk dword a driver may change, written out by hand from the
    /// rules (independent of the filter's own mask computation).
    fn allowed_changes(dword: u16) -> u32 {
        let body_ranges = [(0x43, 0x50), (0x53, 0x60), (0x63, 0x70), (0x73, 0x84), (0x87, 0x98)];
        match dword {
            REG_COMMAND => 0x0000_0406,
            0x98 => 0xC000_0000,
            0x40..=0x97 => {
                let mut mask = 0;
                for lane in 0..4u16 {
                    let byte = dword + lane;
                    if body_ranges.iter().any(|&(s, e)| byte >= s && byte < e) {
                        mask |= 0xFF << (8 * lane);
                    }
                }
                mask
            }
            _ => 0,
        }
    }

    fn arb_access() -> impl Strategy<Value = (u16, u8, u32)> {
        (
            prop_oneof![0u16..0x40, 0x40u16..0x100, 0u16..0x1000, Just(0x04u16), 0x10u16..0x34],
            prop_oneof![Just(1u8), Just(2u8), Just(4u8)],
            prop_oneof![any::<u32>(), Just(u32::MAX), Just(0u32)],
        )
            .prop_map(|(offset, size, value)| (offset & !(u16::from(size) - 1), size, value))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn prop_writes_never_change_protected_bits(ops in prop::collection::vec(arb_access(), 1..40)) {
            let (mut cs, f) = virtio_function();
            let mut st = AssignedState::new(&f).unwrap();
            let before = cs.fns[&VIRTIO].regs.clone();
            for (offset, size, value) in ops {
                let action = config_write(&mut cs, &f, &mut st, offset, size, value).unwrap();
                let dword = offset & !3;
                match action {
                    WriteAction::Write { offset: o, .. } => prop_assert_eq!(o, dword),
                    WriteAction::Emulated => prop_assert!((0x10..0x28).contains(&dword) || dword == REG_ROM_BAR),
                    WriteAction::Drop => {}
                }
                if (0x10..0x28).contains(&dword) || dword == REG_ROM_BAR {
                    prop_assert_eq!(action, WriteAction::Emulated);
                }
                let now = &cs.fns[&VIRTIO].regs;
                for (i, (b, n)) in before.iter().zip(now.iter()).enumerate() {
                    let d = (i * 4) as u16;
                    prop_assert_eq!((b ^ n) & !allowed_changes(d), 0, "dword {:#x}: {:#x} -> {:#x}", d, b, n);
                }
            }
            // The RW1C status bit and the BARs are as they were.
            prop_assert_eq!(cs.reg(VIRTIO, REG_COMMAND) >> 16, u32::from(VIRTIO_STATUS));
            prop_assert_eq!(cs.reg(VIRTIO, 0x14), BAR1_ADDR);
        }

        #[test]
        fn prop_filter_merges_only_allowed_bits(
            (offset, size, value) in arb_access(),
            hw in any::<u32>(),
        ) {
            let (_, f) = virtio_function();
            let mut st = AssignedState::new(&f).unwrap();
            let dword = offset & !3;
            let lanes = lane_mask(offset, size);
            match filter_write(&f, &mut st, offset, size, value, hw) {
                WriteAction::Write { offset: o, value: v } => {
                    prop_assert_eq!(o, dword);
                    let allowed = allowed_changes(dword) & lanes;
                    prop_assert!(allowed != 0);
                    if dword == REG_COMMAND {
                        prop_assert_eq!(v >> 16, 0, "status half written as zeros");
                        prop_assert_eq!((v ^ hw) & 0xFFFF & !allowed, 0);
                    } else {
                        prop_assert_eq!((v ^ hw) & !allowed, 0);
                    }
                    let shifted = value << (8 * u32::from(offset & 3));
                    prop_assert_eq!(v & allowed, shifted & allowed);
                }
                WriteAction::Drop => prop_assert_eq!(allowed_changes(dword) & lanes, 0),
                WriteAction::Emulated => prop_assert!((0x10..0x28).contains(&dword) || dword == REG_ROM_BAR),
            }
        }

        #[test]
        fn prop_read_after_sizing_returns_the_mask(
            prefix in prop::collection::vec(arb_access(), 0..20),
            slot in 0usize..6,
            restore in any::<u32>().prop_filter("not all ones", |v| *v != u32::MAX),
        ) {
            let (mut cs, f) = virtio_function();
            let mut st = AssignedState::new(&f).unwrap();
            for (offset, size, value) in prefix {
                config_write(&mut cs, &f, &mut st, offset, size, value).unwrap();
            }
            let masks = [0, 0xFFFF_F000, 0, 0, 0xFFFF_C00C, 0xFFFF_FFFF];
            let real = [0, BAR1_ADDR, 0, 0, 0x0000_000C, 0x8];
            let offset = REG_BAR0 + 4 * slot as u16;
            prop_assert_eq!(config_write(&mut cs, &f, &mut st, offset, 4, u32::MAX), Ok(WriteAction::Emulated));
            prop_assert_eq!(config_read(&cs, &f, &st, offset, 4), Ok(masks[slot]));
            prop_assert_eq!(config_read(&cs, &f, &st, offset, 2), Ok(masks[slot] & 0xFFFF));
            prop_assert_eq!(config_write(&mut cs, &f, &mut st, offset, 4, restore), Ok(WriteAction::Emulated));
            prop_assert_eq!(config_read(&cs, &f, &st, offset, 4), Ok(real[slot]));
            prop_assert_eq!(config_read(&cs, &f, &st, REG_ROM_BAR, 4), Ok(0));
        }

        #[test]
        fn prop_check_access_matches_definition(offset in any::<u16>(), size in any::<u8>()) {
            let ok = matches!(size, 1 | 2 | 4) && offset % u16::from(size.max(1)) == 0 && offset < 4096;
            prop_assert_eq!(check_access(offset, size).is_ok(), ok);
            if ok {
                prop_assert!(offset + u16::from(size) <= 4096);
                // The access lies inside one dword.
                prop_assert!(u16::from(size) + (offset & 3) <= 4);
            }
        }

        #[test]
        fn prop_capability_walk_is_bounded(
            first in any::<u8>(),
            words in prop::collection::vec(any::<u32>(), 48),
        ) {
            let mut f = FakeFn::new(1, 2, 0, 0, 0).command(0, STATUS_CAP_LIST_BIT).set(REG_CAP_PTR, u32::from(first));
            for (i, w) in words.iter().enumerate() {
                f = f.set(0x40 + 4 * i as u16, *w);
            }
            let cs = FakeCs::default().with(0, 0, 0, f);
            let caps = walk_capabilities(&cs, Bdf { bus: 0, dev: 0, func: 0 }, first);
            let mut seen = std::collections::BTreeSet::new();
            for &(id, off, byte2) in caps.iter() {
                prop_assert!(off >= 0x40 && off % 4 == 0);
                prop_assert!(seen.insert(off), "offset {:#x} visited twice", off);
                prop_assert!(id != 0xFF);
                prop_assert_eq!(byte2, (cs.read32(Bdf { bus: 0, dev: 0, func: 0 }, u16::from(off)) >> 16) as u8);
            }
            prop_assert!(caps.len() <= MAX_CAPS);
        }
    }
}

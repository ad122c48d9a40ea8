//! Completing an MMIO exit: decode the faulting instruction, and fetch it first through the
//! guest's page tables.
//!
//! A nested page fault on an MMIO address tells the VMM the guest-physical address but not the
//! access size, direction or register. [`decode`] reads them from the instruction bytes (with
//! `iced-x86`, no_std) for the forms Linux uses for MMIO: its `readb/w/l/q` and `writeb/w/l/q`
//! are plain `MOV`s (`mov reg, [mem]`, `mov [mem], reg`, `mov [mem], imm`, the `moffs` forms),
//! plus `MOVZX`/`MOVSX` that the compiler sometimes folds into a narrow read. Anything else is
//! refused with an error the VMM reports (and may turn into a guest fault), never a panic.
//!
//! Register write-back follows the SDM vol. 1 §3.4.1.1 "General-Purpose Registers in 64-Bit
//! Mode": a 32-bit destination zero-extends into bits 63:32; 8- and 16-bit destinations leave
//! the other bits unchanged (AH/BH/CH/DH are bits 15:8).
//!
//! [`translate`] walks the guest's page tables (SDM vol. 3A chapter 4 "Paging": 32-bit paging
//! §4.3, PAE §4.4, 4-level §4.5) so the VMM can fetch the instruction bytes at the guest's RIP.

use core::fmt;

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

use crate::memory::{GuestMemory, MemError};

/// Longest x86 instruction.
pub const MAX_INSTRUCTION_LEN: usize = 15;

/// The code-segment mode the instruction was fetched in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    /// 64-bit mode (CS.L = 1).
    Bits64,
    /// 32-bit protected mode (CS.D = 1).
    Bits32,
    /// 16-bit mode.
    Bits16,
}

impl CpuMode {
    fn bitness(self) -> u32 {
        match self {
            CpuMode::Bits64 => 64,
            CpuMode::Bits32 => 32,
            CpuMode::Bits16 => 16,
        }
    }
}

/// Which part of a general-purpose register an operand names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegPart {
    /// Bits 7:0 (AL, R8B, SIL...).
    Low8,
    /// Bits 15:8 (AH, BH, CH, DH).
    High8,
    /// Bits 15:0.
    Bits16,
    /// Bits 31:0.
    Bits32,
    /// Bits 63:0.
    Bits64,
}

impl RegPart {
    fn width_bits(self) -> u32 {
        match self {
            RegPart::Low8 | RegPart::High8 => 8,
            RegPart::Bits16 => 16,
            RegPart::Bits32 => 32,
            RegPart::Bits64 => 64,
        }
    }
}

/// A general-purpose register operand: `gpr` 0-15 in the encoding order RAX, RCX, RDX, RBX,
/// RSP, RBP, RSI, RDI, R8-R15.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegOperand {
    /// Register number.
    pub gpr: u8,
    /// Which bits.
    pub part: RegPart,
}

fn mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

impl RegOperand {
    /// The operand's value given the full register value `full`.
    pub fn get(&self, full: u64) -> u64 {
        match self.part {
            RegPart::High8 => (full >> 8) & 0xff,
            p => full & mask(p.width_bits()),
        }
    }

    /// The full register after writing `value` to this operand: 32-bit writes zero-extend,
    /// 8/16-bit writes merge (SDM vol. 1 §3.4.1.1).
    pub fn merge(&self, old: u64, value: u64) -> u64 {
        match self.part {
            RegPart::Low8 => (old & !0xff) | (value & 0xff),
            RegPart::High8 => (old & !0xff00) | ((value & 0xff) << 8),
            RegPart::Bits16 => (old & !0xffff) | (value & 0xffff),
            RegPart::Bits32 => value & 0xffff_ffff,
            RegPart::Bits64 => value,
        }
    }
}

/// How the loaded value reaches the destination register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extend {
    /// `MOV`: same width.
    None,
    /// `MOVZX`.
    Zero,
    /// `MOVSX`.
    Sign,
}

/// What the instruction does with the MMIO location.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioOp {
    /// A load into `dest`.
    Read {
        /// The destination register.
        dest: RegOperand,
        /// How the value is widened.
        extend: Extend,
    },
    /// A store of a register.
    WriteRegister(RegOperand),
    /// A store of an immediate (already sign-extended to the access size and masked).
    WriteImmediate(u64),
}

/// A decoded MMIO instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioInstruction {
    /// Instruction length: advance RIP by this much after completing it.
    pub len: usize,
    /// Access size in bytes (1, 2, 4 or 8).
    pub size: u8,
    /// What to do.
    pub op: MmioOp,
}

/// Why an instruction cannot be completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes are not a valid instruction in this mode (or too few were given).
    Invalid,
    /// A valid instruction that is not an emulated MMIO form.
    Unsupported(Mnemonic),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Invalid => f.write_str("MMIO instruction bytes do not decode"),
            DecodeError::Unsupported(m) => write!(f, "MMIO by {m:?} is not emulated (only MOV, MOVZX, MOVSX)"),
        }
    }
}

impl core::error::Error for DecodeError {}

fn reg_operand(r: Register) -> Option<RegOperand> {
    let part = if matches!(r, Register::AH | Register::CH | Register::DH | Register::BH) {
        RegPart::High8
    } else if r.is_gpr8() {
        RegPart::Low8
    } else if r.is_gpr16() {
        RegPart::Bits16
    } else if r.is_gpr32() {
        RegPart::Bits32
    } else if r.is_gpr64() {
        RegPart::Bits64
    } else {
        return None;
    };
    let full = r.full_register();
    let gpr = (full as u32).checked_sub(Register::RAX as u32).filter(|&n| n < 16)? as u8;
    Some(RegOperand { gpr, part })
}

/// Decodes the instruction at the start of `bytes`.
pub fn decode(bytes: &[u8], mode: CpuMode) -> Result<MmioInstruction, DecodeError> {
    let bytes = &bytes[..bytes.len().min(MAX_INSTRUCTION_LEN)];
    let mut decoder =
        Decoder::try_new(mode.bitness(), bytes, DecoderOptions::NONE).map_err(|_| DecodeError::Invalid)?;
    let mut instr = Instruction::default();
    decoder.decode_out(&mut instr);
    if instr.is_invalid() {
        return Err(DecodeError::Invalid);
    }
    let unsupported = DecodeError::Unsupported(instr.mnemonic());
    let size = u8::try_from(instr.memory_size().size()).map_err(|_| unsupported)?;
    if !matches!(size, 1 | 2 | 4 | 8) || instr.op_count() != 2 || instr.has_segment_prefix_fs_gs() {
        return Err(unsupported);
    }
    let op = match (instr.mnemonic(), instr.op_kind(0), instr.op_kind(1)) {
        (Mnemonic::Mov, OpKind::Register, OpKind::Memory) => {
            MmioOp::Read { dest: reg_operand(instr.op_register(0)).ok_or(unsupported)?, extend: Extend::None }
        }
        (Mnemonic::Movzx | Mnemonic::Movsx, OpKind::Register, OpKind::Memory) => {
            let extend = if instr.mnemonic() == Mnemonic::Movzx { Extend::Zero } else { Extend::Sign };
            MmioOp::Read { dest: reg_operand(instr.op_register(0)).ok_or(unsupported)?, extend }
        }
        (Mnemonic::Mov, OpKind::Memory, OpKind::Register) => {
            MmioOp::WriteRegister(reg_operand(instr.op_register(1)).ok_or(unsupported)?)
        }
        (Mnemonic::Mov, OpKind::Memory, _) => {
            let imm = instr.try_immediate(1).map_err(|_| unsupported)?;
            MmioOp::WriteImmediate(imm & mask(u32::from(size) * 8))
        }
        _ => return Err(unsupported),
    };
    Ok(MmioInstruction { len: instr.len(), size, op })
}

/// Whether the instruction has an FS or GS override. Such accesses are per-CPU data, never
/// MMIO in Linux, and their linear address would need the segment base: refused.
trait SegmentPrefix {
    fn has_segment_prefix_fs_gs(&self) -> bool;
}

impl SegmentPrefix for Instruction {
    fn has_segment_prefix_fs_gs(&self) -> bool {
        matches!(self.segment_prefix(), Register::FS | Register::GS)
    }
}

impl MmioInstruction {
    /// Whether this is a load.
    pub fn is_read(&self) -> bool {
        matches!(self.op, MmioOp::Read { .. })
    }

    /// For a store, the bytes to write (little-endian, `size` long) given the guest's registers
    /// in encoding order; `None` for a load.
    pub fn write_value(&self, regs: &[u64; 16]) -> Option<u64> {
        let m = mask(u32::from(self.size) * 8);
        match self.op {
            MmioOp::WriteRegister(r) => Some(r.get(regs[usize::from(r.gpr & 15)]) & m),
            MmioOp::WriteImmediate(v) => Some(v & m),
            MmioOp::Read { .. } => None,
        }
    }

    /// For a load, writes `data` (the `size` bytes read, little-endian in the low bits) into
    /// the destination register. Does nothing for a store.
    pub fn complete_read(&self, regs: &mut [u64; 16], data: u64) {
        let MmioOp::Read { dest, extend } = self.op else { return };
        let bits = u32::from(self.size) * 8;
        let raw = data & mask(bits);
        let value = match extend {
            Extend::None | Extend::Zero => raw,
            Extend::Sign => {
                let shift = 64 - bits;
                (((raw << shift) as i64) >> shift) as u64
            }
        };
        let slot = &mut regs[usize::from(dest.gpr & 15)];
        *slot = dest.merge(*slot, value & mask(dest.part.width_bits()));
    }
}

/// The paging-related control state of the vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagingRegs {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// IA32_EFER.
    pub efer: u64,
}

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_PS: u64 = 1 << 7;
/// Bits 51:12 of a 64-bit paging-structure entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Why a linear address cannot be translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// A paging-structure entry on the way is not present (the guest would take a #PF).
    NotPresent {
        /// The linear address.
        linear: u64,
        /// Level of the missing entry (4 = PML4, 1 = PT; 3 = PDPTE for PAE).
        level: u8,
    },
    /// 5-level paging is not supported (the CPUID policy hides LA57).
    FiveLevel,
    /// The address is not canonical for 4-level paging.
    NonCanonical {
        /// The linear address.
        linear: u64,
    },
    /// A paging structure is outside guest RAM.
    Memory(MemError),
}

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalkError::NotPresent { linear, level } => {
                write!(f, "linear address {linear:#x} not mapped: level-{level} entry not present")
            }
            WalkError::FiveLevel => f.write_str("5-level paging is not supported"),
            WalkError::NonCanonical { linear } => write!(f, "linear address {linear:#x} is not canonical"),
            WalkError::Memory(e) => write!(f, "page-table walk: {e}"),
        }
    }
}

impl core::error::Error for WalkError {}

impl From<MemError> for WalkError {
    fn from(e: MemError) -> Self {
        WalkError::Memory(e)
    }
}

/// Translates `linear` to a guest-physical address with the guest's paging mode. Access
/// rights are not checked: the walk only serves to fetch an instruction the CPU already
/// fetched.
pub fn translate(regs: &PagingRegs, linear: u64, mem: &dyn GuestMemory) -> Result<u64, WalkError> {
    if regs.cr0 & CR0_PG == 0 {
        // No paging: linear addresses are physical (32 bits outside long mode).
        return Ok(linear & 0xffff_ffff);
    }
    let not_present = |level| WalkError::NotPresent { linear, level };
    if regs.efer & EFER_LMA != 0 {
        if regs.cr4 & CR4_LA57 != 0 {
            return Err(WalkError::FiveLevel);
        }
        // Canonical: bits 63:47 all equal (§3.3.7.1 vol. 1).
        let top = (linear as i64) >> 47;
        if top != 0 && top != -1 {
            return Err(WalkError::NonCanonical { linear });
        }
        let mut table = regs.cr3 & ADDR_MASK;
        for level in (1..=4u8).rev() {
            let shift = 12 + 9 * (u32::from(level) - 1);
            let index = (linear >> shift) & 0x1ff;
            let entry = mem.read_u64(table + index * 8)?;
            if entry & PTE_PRESENT == 0 {
                return Err(not_present(level));
            }
            // PS in a PDPTE (1 GiB) or PDE (2 MiB) maps a page (§4.5.4).
            if (level == 3 || level == 2) && entry & PTE_PS != 0 {
                let page_mask = mask(shift);
                return Ok((entry & ADDR_MASK & !page_mask) | (linear & page_mask));
            }
            table = entry & ADDR_MASK;
        }
        return Ok(table | (linear & 0xfff));
    }
    let linear = linear & 0xffff_ffff;
    if regs.cr4 & CR4_PAE != 0 {
        // PAE (§4.4): CR3 bits 31:5 locate four PDPTEs.
        let pdpte = mem.read_u64((regs.cr3 & 0xffff_ffe0) + ((linear >> 30) & 3) * 8)?;
        if pdpte & PTE_PRESENT == 0 {
            return Err(WalkError::NotPresent { linear, level: 3 });
        }
        let pde = mem.read_u64((pdpte & ADDR_MASK) + ((linear >> 21) & 0x1ff) * 8)?;
        if pde & PTE_PRESENT == 0 {
            return Err(WalkError::NotPresent { linear, level: 2 });
        }
        if pde & PTE_PS != 0 {
            return Ok((pde & ADDR_MASK & !mask(21)) | (linear & mask(21)));
        }
        let pte = mem.read_u64((pde & ADDR_MASK) + ((linear >> 12) & 0x1ff) * 8)?;
        if pte & PTE_PRESENT == 0 {
            return Err(WalkError::NotPresent { linear, level: 1 });
        }
        return Ok((pte & ADDR_MASK) | (linear & 0xfff));
    }
    // 32-bit paging (§4.3): 4-byte entries; 4 MiB pages with CR4.PSE, address bits 39:32 from
    // PDE bits 20:13 (PSE-36).
    let pde = u64::from(mem.read_u32((regs.cr3 & 0xffff_f000) + ((linear >> 22) & 0x3ff) * 4)?);
    if pde & PTE_PRESENT == 0 {
        return Err(WalkError::NotPresent { linear, level: 2 });
    }
    if pde & PTE_PS != 0 && regs.cr4 & CR4_PSE != 0 {
        let base = (pde & 0xffc0_0000) | (((pde >> 13) & 0xff) << 32);
        return Ok(base | (linear & mask(22)));
    }
    let pte = u64::from(mem.read_u32((pde & 0xffff_f000) + ((linear >> 12) & 0x3ff) * 4)?);
    if pte & PTE_PRESENT == 0 {
        return Err(WalkError::NotPresent { linear, level: 1 });
    }
    Ok((pte & 0xffff_f000) | (linear & 0xfff))
}

/// Fetches up to 15 instruction bytes at linear address `rip` into `buf`, page by page.
/// Returns how many bytes were fetched: fewer than 15 when the next page is unmapped (the
/// instruction may still be complete). Fails only if the first byte cannot be fetched.
pub fn fetch_instruction(
    regs: &PagingRegs,
    rip: u64,
    mem: &dyn GuestMemory,
    buf: &mut [u8; MAX_INSTRUCTION_LEN],
) -> Result<usize, WalkError> {
    let mut done = 0usize;
    while done < MAX_INSTRUCTION_LEN {
        let linear = rip.wrapping_add(done as u64);
        let in_page = (0x1000 - (linear & 0xfff)) as usize;
        let n = in_page.min(MAX_INSTRUCTION_LEN - done);
        let step = translate(regs, linear, mem).and_then(|gpa| Ok(mem.read(gpa, &mut buf[done..done + n])?));
        match step {
            Ok(()) => done += n,
            Err(e) if done == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::VecMemory;
    use proptest::prelude::*;

    const RAX: u8 = 0;
    const RCX: u8 = 1;
    const RDX: u8 = 2;
    const RBX: u8 = 3;
    const RSI: u8 = 6;
    const R8: u8 = 8;
    const R15: u8 = 15;

    fn d64(b: &[u8]) -> MmioInstruction {
        decode(b, CpuMode::Bits64).unwrap()
    }

    #[test]
    fn linux_readl_writel_forms() {
        // mov eax, [rdi+0x14]  (readl)
        assert_eq!(
            d64(&[0x8b, 0x47, 0x14]),
            MmioInstruction {
                len: 3,
                size: 4,
                op: MmioOp::Read { dest: RegOperand { gpr: RAX, part: RegPart::Bits32 }, extend: Extend::None }
            }
        );
        // mov [rdi+0x14], esi  (writel)
        assert_eq!(
            d64(&[0x89, 0x77, 0x14]),
            MmioInstruction {
                len: 3,
                size: 4,
                op: MmioOp::WriteRegister(RegOperand { gpr: RSI, part: RegPart::Bits32 })
            }
        );
        // mov r8, [rdx]  (readq)
        let i = d64(&[0x4c, 0x8b, 0x02]);
        assert_eq!(
            (i.size, i.op),
            (8, MmioOp::Read { dest: RegOperand { gpr: R8, part: RegPart::Bits64 }, extend: Extend::None })
        );
        // mov [rax], r15w  (writew)
        let i = d64(&[0x66, 0x44, 0x89, 0x38]);
        assert_eq!(
            (i.len, i.size, i.op),
            (4, 2, MmioOp::WriteRegister(RegOperand { gpr: R15, part: RegPart::Bits16 }))
        );
        // mov [rcx], bh  (writeb with a high-byte register)
        let i = d64(&[0x88, 0x39]);
        assert_eq!(i.op, MmioOp::WriteRegister(RegOperand { gpr: RBX, part: RegPart::High8 }));
        // mov sil, [rdx]  (REX makes it SIL, not DH)
        let i = d64(&[0x40, 0x8a, 0x32]);
        assert_eq!(i.op, MmioOp::Read { dest: RegOperand { gpr: RSI, part: RegPart::Low8 }, extend: Extend::None });
        // mov dword [rdi+0x70], 0x1234
        let i = d64(&[0xc7, 0x47, 0x70, 0x34, 0x12, 0, 0]);
        assert_eq!((i.len, i.size, i.op), (7, 4, MmioOp::WriteImmediate(0x1234)));
        // mov qword [rdi], -1  (imm32 sign-extended to 64)
        let i = d64(&[0x48, 0xc7, 0x07, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!((i.size, i.op), (8, MmioOp::WriteImmediate(u64::MAX)));
        // mov byte [rdi], 0x80
        assert_eq!(d64(&[0xc6, 0x07, 0x80]).op, MmioOp::WriteImmediate(0x80));
        // movzx ecx, word [rdi+2]
        let i = d64(&[0x0f, 0xb7, 0x4f, 0x02]);
        assert_eq!(
            (i.size, i.op),
            (2, MmioOp::Read { dest: RegOperand { gpr: RCX, part: RegPart::Bits32 }, extend: Extend::Zero })
        );
        // movsx rdx, byte [rax]
        let i = d64(&[0x48, 0x0f, 0xbe, 0x10]);
        assert_eq!(
            (i.size, i.op),
            (1, MmioOp::Read { dest: RegOperand { gpr: RDX, part: RegPart::Bits64 }, extend: Extend::Sign })
        );
        // mov eax, [moffs64]  (A1 with an 8-byte address)
        let i = d64(&[0xa1, 0x00, 0x00, 0xc0, 0xfe, 0, 0, 0, 0]);
        assert_eq!((i.len, i.size), (9, 4));
        assert!(i.is_read());
        // Trailing bytes are ignored.
        assert_eq!(d64(&[0x8b, 0x47, 0x14, 0x90, 0x90]).len, 3);
    }

    #[test]
    fn write_back_rules() {
        let mut regs = [0xffff_ffff_ffff_ffffu64; 16];
        // 32-bit load zero-extends.
        d64(&[0x8b, 0x47, 0x14]).complete_read(&mut regs, 0x1234_5678_9abc_def0);
        assert_eq!(regs[0], 0x9abc_def0);
        // 16-bit load merges.
        regs[0] = 0x1111_2222_3333_4444;
        d64(&[0x66, 0x8b, 0x07]).complete_read(&mut regs, 0xabcd);
        assert_eq!(regs[0], 0x1111_2222_3333_abcd);
        // AH load merges into bits 15:8.
        d64(&[0x8a, 0x27]).complete_read(&mut regs, 0x5a);
        assert_eq!(regs[0], 0x1111_2222_3333_5acd);
        // movsx rdx, byte: sign-extends to 64 bits.
        d64(&[0x48, 0x0f, 0xbe, 0x10]).complete_read(&mut regs, 0x80);
        assert_eq!(regs[usize::from(RDX)], 0xffff_ffff_ffff_ff80);
        // movsx cx, byte [rdi] -> 16-bit destination merges.
        regs[1] = 0xaaaa_aaaa_aaaa_aaaa;
        d64(&[0x66, 0x0f, 0xbe, 0x0f]).complete_read(&mut regs, 0xff);
        assert_eq!(regs[1], 0xaaaa_aaaa_aaaa_ffff);
        // movzx ecx, word: zero-extends and clears the top half.
        d64(&[0x0f, 0xb7, 0x4f, 0x02]).complete_read(&mut regs, 0xffff_8001);
        assert_eq!(regs[1], 0x8001);
        // Stores.
        regs[6] = 0xdead_beef_cafe_f00d;
        assert_eq!(d64(&[0x89, 0x77, 0x14]).write_value(&regs), Some(0xcafe_f00d));
        regs[3] = 0x1234;
        assert_eq!(d64(&[0x88, 0x39]).write_value(&regs), Some(0x12));
        assert_eq!(d64(&[0x8b, 0x47, 0x14]).write_value(&regs), None);
        // complete_read on a store changes nothing.
        let before = regs;
        d64(&[0x89, 0x77, 0x14]).complete_read(&mut regs, 5);
        assert_eq!(regs, before);
    }

    #[test]
    fn thirty_two_bit_mode() {
        // mov eax, [0xfec00010] in 32-bit mode: A1 + 4-byte address.
        let i = decode(&[0xa1, 0x10, 0x00, 0xc0, 0xfe], CpuMode::Bits32).unwrap();
        assert_eq!((i.len, i.size), (5, 4));
        // 0x48 is DEC EAX in 32-bit mode, not REX.W: unsupported.
        assert_eq!(decode(&[0x48, 0x8b, 0x07], CpuMode::Bits32), Err(DecodeError::Unsupported(Mnemonic::Dec)));
        // 16-bit: mov ax, [bx]
        let i = decode(&[0x8b, 0x07], CpuMode::Bits16).unwrap();
        assert_eq!(
            (i.size, i.op),
            (2, MmioOp::Read { dest: RegOperand { gpr: RAX, part: RegPart::Bits16 }, extend: Extend::None })
        );
    }

    #[test]
    fn refused() {
        assert_eq!(decode(&[], CpuMode::Bits64), Err(DecodeError::Invalid));
        assert_eq!(decode(&[0x8b], CpuMode::Bits64), Err(DecodeError::Invalid), "truncated");
        assert_eq!(decode(&[0x0f, 0xff], CpuMode::Bits64), Err(DecodeError::Invalid));
        // add [rdi], eax; rep movsb; mov eax, ebx; movaps xmm0, [rdi]; xchg [rdi], eax; lock or
        for b in
            [&[0x01, 0x07][..], &[0xf3, 0xa4], &[0x89, 0xd8], &[0x0f, 0x28, 0x07], &[0x87, 0x07], &[0xf0, 0x09, 0x07]]
        {
            assert!(matches!(decode(b, CpuMode::Bits64), Err(DecodeError::Unsupported(_))), "{b:x?}");
        }
        // mov rax, cr0 / mov eax, [gs:0x10]
        assert!(decode(&[0x0f, 0x20, 0xc0], CpuMode::Bits64).is_err());
        assert!(decode(&[0x65, 0x8b, 0x04, 0x25, 0x10, 0, 0, 0], CpuMode::Bits64).is_err());
        // mov es, [rdi]: a segment register destination.
        assert!(decode(&[0x8e, 0x07], CpuMode::Bits64).is_err());
        assert!(!DecodeError::Invalid.to_string().is_empty());
        assert!(!DecodeError::Unsupported(Mnemonic::Add).to_string().is_empty());
    }

    proptest! {
        /// Any bytes in any mode decode or are refused; decoded ones are self-consistent.
        #[test]
        fn prop_hostile_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..20), mode in 0u8..3, data in any::<u64>()) {
            let mode = [CpuMode::Bits64, CpuMode::Bits32, CpuMode::Bits16][usize::from(mode)];
            if let Ok(i) = decode(&bytes, mode) {
                prop_assert!(i.len >= 1 && i.len <= 15 && i.len <= bytes.len());
                prop_assert!(matches!(i.size, 1 | 2 | 4 | 8));
                let mut regs = [0u64; 16];
                i.complete_read(&mut regs, data);
                let _ = i.write_value(&regs);
            }
        }
    }

    /// Builds 4-level tables in `mem`: PML4 at 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000.
    fn long_mode_tables(mem: &mut VecMemory) -> PagingRegs {
        let w = |mem: &mut VecMemory, at: u64, v: u64| mem.write(at, &v.to_le_bytes()).unwrap();
        // Linear 0xffff_8000_0000_0000 + ... : PML4 index 256.
        w(mem, 0x1000 + 256 * 8, 0x2000 | 3);
        w(mem, 0x2000, 0x3000 | 3); // PDPT[0] -> PD
        w(mem, 0x2000 + 8, 0x4000_0000 | 0x83); // PDPT[1]: 1 GiB page at 1 GiB
        w(mem, 0x3000, 0x4000 | 3); // PD[0] -> PT
        w(mem, 0x3000 + 8, 0x20_0000 | 0x83); // PD[1]: 2 MiB page at 2 MiB
        w(mem, 0x4000 + 5 * 8, 0x9000 | 3); // PT[5] -> 0x9000
        w(mem, 0x4000 + 6 * 8, 0xa000 | 3); // PT[6] -> 0xa000
        PagingRegs { cr0: CR0_PG | 1, cr3: 0x1000, cr4: CR4_PAE, efer: EFER_LMA | (1 << 8) }
    }

    #[test]
    fn four_level_walk() {
        let mut mem = VecMemory::new(0, 0x10_0000);
        let regs = long_mode_tables(&mut mem);
        let base = 0xffff_8000_0000_0000u64;
        assert_eq!(translate(&regs, base + 0x5123, &mem), Ok(0x9123));
        assert_eq!(translate(&regs, base + 0x20_1234, &mem), Ok(0x20_1234));
        assert_eq!(translate(&regs, base + 0x4000_0000 + 0x12_3456, &mem), Ok(0x4012_3456));
        assert_eq!(
            translate(&regs, base + 0x7000, &mem),
            Err(WalkError::NotPresent { linear: base + 0x7000, level: 1 })
        );
        assert_eq!(translate(&regs, 0x1000, &mem), Err(WalkError::NotPresent { linear: 0x1000, level: 4 }));
        assert_eq!(
            translate(&regs, 0x0000_8000_0000_0000, &mem),
            Err(WalkError::NonCanonical { linear: 0x0000_8000_0000_0000 })
        );
        let la57 = PagingRegs { cr4: CR4_PAE | CR4_LA57, ..regs };
        assert_eq!(translate(&la57, base, &mem), Err(WalkError::FiveLevel));
        // A table pointer outside RAM is a memory error, not a panic.
        mem.write(0x3000 + 16, &(0xffff_f000u64 | 3).to_le_bytes()).unwrap();
        assert!(matches!(translate(&regs, base + 0x40_0000, &mem), Err(WalkError::Memory(_))));
        // Fetch across a page boundary: bytes from 0x9ffa.. and 0xa000..
        mem.bytes_mut()[0x9ffa..0xa000].copy_from_slice(&[0x90, 0x90, 0x90, 0x90, 0x8b, 0x47]);
        mem.bytes_mut()[0xa000..0xa009].copy_from_slice(&[0x14, 1, 2, 3, 4, 5, 6, 7, 8]);
        let mut buf = [0u8; 15];
        assert_eq!(fetch_instruction(&regs, base + 0x5ffe, &mem, &mut buf), Ok(15));
        assert_eq!(&buf[..3], &[0x8b, 0x47, 0x14]);
        assert_eq!(decode(&buf, CpuMode::Bits64).unwrap().len, 3);
        // Next page unmapped: a partial fetch.
        mem.bytes_mut()[0xaffe..0xb000].copy_from_slice(&[0x89, 0x07]);
        assert_eq!(fetch_instruction(&regs, base + 0x6ffe, &mem, &mut buf), Ok(2));
        assert!(fetch_instruction(&regs, base + 0x7000, &mem, &mut buf).is_err());
        for e in [
            WalkError::NotPresent { linear: 1, level: 1 },
            WalkError::FiveLevel,
            WalkError::NonCanonical { linear: 1 },
            WalkError::Memory(MemError { gpa: 1, len: 1 }),
        ] {
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn pae_and_32_bit_walks() {
        let mut mem = VecMemory::new(0, 0x10_0000);
        let w64 = |mem: &mut VecMemory, at: u64, v: u64| mem.write(at, &v.to_le_bytes()).unwrap();
        // PAE: PDPT at 0x1020 (32-byte aligned), PD at 0x2000, PT at 0x3000.
        w64(&mut mem, 0x1020 + 3 * 8, 0x2000 | 1);
        w64(&mut mem, 0x2000 + 8, 0x3000 | 3);
        w64(&mut mem, 0x3000 + 2 * 8, 0x7000 | 3);
        w64(&mut mem, 0x2000 + 16, 0x40_0000 | 0x83);
        let pae = PagingRegs { cr0: CR0_PG | 1, cr3: 0x1020, cr4: CR4_PAE, efer: 0 };
        assert_eq!(translate(&pae, 0xc020_2abc, &mem), Ok(0x7abc));
        assert_eq!(translate(&pae, 0xc040_0010, &mem), Ok(0x40_0010));
        assert_eq!(translate(&pae, 0x8000_0000, &mem), Err(WalkError::NotPresent { linear: 0x8000_0000, level: 3 }));
        // 32-bit: PD at 0x5000, PT at 0x6000, one 4 MiB page with PSE-36 high bits.
        let w32 = |mem: &mut VecMemory, at: u64, v: u32| mem.write(at, &v.to_le_bytes()).unwrap();
        w32(&mut mem, 0x5000 + 0x300 * 4, 0x6000 | 3);
        w32(&mut mem, 0x6000 + 4 * 4, 0x8000 | 3);
        w32(&mut mem, 0x5000 + 0x301 * 4, 0x0080_0000 | (1 << 13) | 0x83);
        let legacy = PagingRegs { cr0: CR0_PG | 1, cr3: 0x5000, cr4: CR4_PSE, efer: 0 };
        assert_eq!(translate(&legacy, 0xc000_4123, &mem), Ok(0x8123));
        assert_eq!(translate(&legacy, 0xc040_0005, &mem), Ok((1 << 32) | 0x80_0005));
        let no_pse = PagingRegs { cr4: 0, ..legacy };
        // Without CR4.PSE the PS bit is ignored: the PDE is taken as a page-table pointer
        // (0x802000, outside this RAM).
        assert!(matches!(translate(&no_pse, 0xc040_0005, &mem), Err(WalkError::Memory(_))));
        assert!(matches!(translate(&legacy, 0x1000, &mem), Err(WalkError::NotPresent { level: 2, .. })));
        // Paging off: identity, truncated to 32 bits.
        let off = PagingRegs::default();
        assert_eq!(translate(&off, 0x1_2345_6789, &mem), Ok(0x2345_6789));
    }

    proptest! {
        /// Random page tables and addresses: the walk returns or errors, never panics.
        #[test]
        fn prop_hostile_tables(entries in proptest::collection::vec(any::<u64>(), 64), linear in any::<u64>(),
                               cr3 in any::<u64>(), cr4 in any::<u64>(), efer in any::<u64>()) {
            let mut mem = VecMemory::new(0, 0x4000);
            for (i, e) in entries.iter().enumerate() {
                // Mostly point into the small RAM so walks go deep.
                let v = if i % 2 == 0 { (e & 0x3fff) | 1 | (e & 0x80) } else { *e };
                mem.write(i as u64 * 8 * 8, &v.to_le_bytes()).unwrap();
            }
            let regs = PagingRegs { cr0: CR0_PG, cr3: cr3 & 0x3fff, cr4, efer };
            let _ = translate(&regs, linear, &mem);
            let mut buf = [0u8; 15];
            let _ = fetch_instruction(&regs, linear, &mem, &mut buf);
        }
    }
}

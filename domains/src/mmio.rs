//! A tiny x86 decoder for the MMIO accesses of the tiny VM: `MOV` between a general
//! register and memory (opcodes 88, 89, 8A, 8B with optional 66 / REX prefixes and any
//! ModRM addressing form). A real VMM decodes everything (the `vmm` crate uses iced-x86);
//! this one only needs what the test guest does.

/// A decoded register-memory `MOV`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mov {
    /// Instruction length in bytes.
    pub len: u8,
    /// Register to memory (a store); else memory to register.
    pub write: bool,
    /// The register, in encoding order (0 = RAX .. 15 = R15).
    pub reg: usize,
    /// Access size in bytes: 1, 2, 4 or 8.
    pub size: u8,
}

impl Mov {
    /// The register value after a load of `value`: 32-bit loads zero-extend, 8- and
    /// 16-bit loads keep the rest of the register.
    pub fn load(&self, old: u64, value: u64) -> u64 {
        match self.size {
            1 => (old & !0xff) | (value & 0xff),
            2 => (old & !0xffff) | (value & 0xffff),
            4 => value & 0xffff_ffff,
            _ => value,
        }
    }

    /// The bytes a store writes from register value `reg`.
    pub fn store(&self, reg: u64) -> u64 {
        match self.size {
            1 => reg & 0xff,
            2 => reg & 0xffff,
            4 => reg & 0xffff_ffff,
            _ => reg,
        }
    }
}

/// Decode the instruction at the start of `code` (at most 15 bytes are looked at); `None`
/// for anything but the forms above (including AH..BH, which this decoder leaves out).
pub fn decode(code: &[u8]) -> Option<Mov> {
    let mut i = 0;
    let mut opsize16 = false;
    if code.first() == Some(&0x66) {
        opsize16 = true;
        i += 1;
    }
    let mut rex = 0u8;
    if let Some(&b @ 0x40..=0x4f) = code.get(i) {
        rex = b;
        i += 1;
    }
    let op = *code.get(i)?;
    i += 1;
    let (write, byte) = match op {
        0x88 => (true, true),
        0x89 => (true, false),
        0x8a => (false, true),
        0x8b => (false, false),
        _ => return None,
    };
    let modrm = *code.get(i)?;
    i += 1;
    let (md, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    if md == 3 {
        return None; // register to register: no memory access
    }
    if rm == 4 {
        let sib = *code.get(i)?;
        i += 1;
        if md == 0 && sib & 7 == 5 {
            i += 4; // no base: disp32
        }
    }
    i += match (md, rm) {
        (0, 5) => 4, // RIP-relative disp32
        (0, _) => 0,
        (1, _) => 1,
        _ => 4,
    };
    if i > code.len() || i > 15 {
        return None;
    }
    let reg = reg as usize + if rex & 4 != 0 { 8 } else { 0 };
    if byte && rex == 0 && reg >= 4 {
        return None; // AH, CH, DH, BH
    }
    let size = if byte {
        1
    } else if rex & 8 != 0 {
        8
    } else if opsize16 {
        2
    } else {
        4
    };
    Some(Mov { len: i as u8, write, reg, size })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forms_the_tiny_vm_uses() {
        // mov [rdi], esi
        assert_eq!(decode(&[0x89, 0x37]), Some(Mov { len: 2, write: true, reg: 6, size: 4 }));
        // mov eax, [rdi]
        assert_eq!(decode(&[0x8b, 0x07]), Some(Mov { len: 2, write: false, reg: 0, size: 4 }));
        // mov r9d, [rdi]
        assert_eq!(decode(&[0x44, 0x8b, 0x0f]), Some(Mov { len: 3, write: false, reg: 9, size: 4 }));
        // mov rax, [rdi + 8]
        assert_eq!(decode(&[0x48, 0x8b, 0x47, 0x08]), Some(Mov { len: 4, write: false, reg: 0, size: 8 }));
        // mov [rsp + rcx*4 + 0x12345678], dx (SIB + disp32, 66 prefix)
        assert_eq!(
            decode(&[0x66, 0x89, 0x94, 0x8c, 0x78, 0x56, 0x34, 0x12]),
            Some(Mov { len: 8, write: true, reg: 2, size: 2 })
        );
        // mov byte [rip + 0], cl
        assert_eq!(decode(&[0x88, 0x0d, 0, 0, 0, 0]), Some(Mov { len: 6, write: true, reg: 1, size: 1 }));
    }

    #[test]
    fn everything_else_is_refused() {
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[0x89]), None, "truncated");
        assert_eq!(decode(&[0x89, 0x84, 0x24]), None, "truncated disp32");
        assert_eq!(decode(&[0x89, 0xc0]), None, "register to register");
        assert_eq!(decode(&[0x88, 0x27]), None, "AH");
        assert_eq!(decode(&[0xc7, 0x07, 1, 0, 0, 0]), None, "immediate store");
        assert_eq!(decode(&[0x0f, 0x0b]), None);
    }

    #[test]
    fn loads_merge_like_the_cpu() {
        let m = |size| Mov { len: 2, write: false, reg: 0, size };
        assert_eq!(m(1).load(0x1122_3344_5566_7788, 0xab), 0x1122_3344_5566_77ab);
        assert_eq!(m(2).load(0x1122_3344_5566_7788, 0xabcd), 0x1122_3344_5566_abcd);
        assert_eq!(m(4).load(0x1122_3344_5566_7788, 0xdead_beef), 0xdead_beef);
        assert_eq!(m(8).load(1, u64::MAX), u64::MAX);
        assert_eq!(m(2).store(0x1234_5678), 0x5678);
    }
}

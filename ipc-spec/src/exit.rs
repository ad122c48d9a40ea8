//! VM exits as messages: what a domain's exit handler receives when one of its vCPUs
//! exits, and how the handler answers.
//!
//! Every domain may have an exit handler: an endpoint set with
//! [`crate::Hypercall::DomainSetFaultEndpoint`]. When a vCPU of the domain exits for a
//! reason the microvisor does not handle itself, the vCPU "calls" that endpoint with an
//! [`ExitMessage`] and waits, in the microvisor, for the handler's [`ExitReply`]. Only the
//! handler vCPU that received the message can answer it (with `ReplyRecv`).
//!
//! Which exits reach the handler depends on how the domain was created:
//! - an ordinary domain (dom0's drivers, services): only what it may not do — a stage-2
//!   fault, an unrecoverable exception, a triple fault, port I/O, a forbidden instruction,
//!   a blocked DMA of its device — and its [`crate::Hypercall::DomainExit`]. CPUID and EFER
//!   are answered by the microvisor, other MSRs raise #GP, VMMCALL is a hypercall;
//! - a *VM* ([`crate::hypercall::domain_flags::VM`]): additionally port I/O, CPUID, every
//!   MSR access except EFER and the MSRs VMLOAD/VMSAVE switch (FS/GS/KernelGS base,
//!   STAR/LSTAR/CSTAR/SFMASK, SYSENTER_CS/ESP/EIP), which the guest owns, VMMCALL, and
//!   stage-2 faults (MMIO) — all of it for its VMM to emulate. HLT parks the vCPU in the
//!   microvisor until an injected interrupt or a bound notification wakes it.
//!
//! ## The message
//!
//! Six register words ([`ExitMessage::encode`]):
//!
//! | word | contents |
//! |------|----------|
//! | 0    | kind (bits 0..8) · vCPU index in its domain (8..16) · instruction length, 0 = unknown (16..20) · state groups in the message page (32..48) |
//! | 1    | RIP of the exiting instruction |
//! | 2    | fact A (by kind, below) |
//! | 3    | fact B |
//! | 4    | RAX |
//! | 5    | 0 (reserved) |
//!
//! | kind | fact A | fact B |
//! |------|--------|--------|
//! | [`ExitKind::Io`] | port · size (bytes) << 16 · write << 24 · string << 25 · rep << 26 | OUT: the value written (RAX masked to the size) |
//! | [`ExitKind::Cpuid`] | leaf (EAX) | subleaf (ECX) |
//! | [`ExitKind::Msr`] | index (ECX) · write << 32 | WRMSR: EDX:EAX |
//! | [`ExitKind::Stage2`] | guest-physical address | [`access`] bits |
//! | [`ExitKind::Exception`] | vector | error code |
//! | [`ExitKind::Forbidden`] | the vendor's raw exit code (for reports only) | 0 |
//! | [`ExitKind::Exited`] | 0 | exit status |
//! | [`ExitKind::Dma`] | the address the device used | requester id · reason << 16 · write << 24 |
//! | others | 0 | 0 |
//!
//! When word 0 names state groups, the message is [`MESSAGE_WORDS_WITH_STATE`] words long
//! and the groups are in the handler's message page at the fixed offsets of [`at`] (words
//! of other groups are zero). Which groups come with each kind is [`default_state`], plus
//! the extra groups the handler asked for when it was set (RDX of DomainSetFaultEndpoint).
//! A handler without a message page receives no state (the mask says so).
//!
//! ## The reply
//!
//! Six register words ([`ExitReply::encode`]): word 0 holds flags (resume, advance RIP,
//! which of RAX/RCX/RDX/RBX to set, inject an event, which state groups to write back from
//! the handler's message page); words 1..5 hold RAX, RCX, RDX, RBX and the event. A reply
//! the microvisor cannot act on (reserved bits, a bad event, write-back without a message
//! page) fails the handler's ReplyRecv with `InvalidArgument` before anything changes;
//! the exit stays unanswered. All-zero means "stop the vCPU".

use crate::Error;

/// Why a vCPU exited (word 0, bits 0..8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitKind {
    /// A stage-2 fault: the guest-physical address is not mapped (MMIO) or not permitted.
    Stage2 = 1,
    /// An intercepted exception (#DF, #MC for every domain).
    Exception = 2,
    /// Triple fault.
    Shutdown = 3,
    /// An instruction the domain may not use (SVM instructions, INVD...).
    Forbidden = 4,
    /// The domain called DomainExit (a message, not an exit: the reply is ignored).
    Exited = 5,
    /// The IOMMU blocked a DMA of the domain's device (a report; the reply is ignored).
    Dma = 6,
    /// Port I/O (IN, OUT, INS, OUTS).
    Io = 7,
    /// CPUID (VMs only).
    Cpuid = 8,
    /// RDMSR or WRMSR (VMs only; ordinary domains get #GP).
    Msr = 9,
    /// VMMCALL (VMs only; ordinary domains make hypercalls with it).
    Hypercall = 10,
    /// The hardware refused the vCPU state (VMRUN/VMLAUNCH failed).
    Invalid = 11,
}

impl ExitKind {
    pub const ALL: [ExitKind; 11] = [
        Self::Stage2,
        Self::Exception,
        Self::Shutdown,
        Self::Forbidden,
        Self::Exited,
        Self::Dma,
        Self::Io,
        Self::Cpuid,
        Self::Msr,
        Self::Hypercall,
        Self::Invalid,
    ];

    pub const fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Stage2),
            2 => Some(Self::Exception),
            3 => Some(Self::Shutdown),
            4 => Some(Self::Forbidden),
            5 => Some(Self::Exited),
            6 => Some(Self::Dma),
            7 => Some(Self::Io),
            8 => Some(Self::Cpuid),
            9 => Some(Self::Msr),
            10 => Some(Self::Hypercall),
            11 => Some(Self::Invalid),
            _ => None,
        }
    }

    /// Whether the vCPU waits for the handler's verdict (false: a report only).
    pub const fn awaits_reply(self) -> bool {
        !matches!(self, Self::Exited | Self::Dma)
    }
}

/// Stage-2 access bits (fact B of a [`ExitKind::Stage2`] exit).
pub mod access {
    pub const WRITE: u64 = 1 << 0;
    pub const EXECUTE: u64 = 1 << 1;
    /// The address is mapped, but not with this access.
    pub const PRESENT: u64 = 1 << 2;
}

/// A blocked DMA (fact B of a [`ExitKind::Dma`] message; fact A is the address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dma {
    /// The device's PCI requester id (bus << 8 | device << 3 | function).
    pub requester: u16,
    /// The IOMMU's fault reason code.
    pub reason: u8,
    pub write: bool,
}

impl Dma {
    pub const fn encode(self) -> u64 {
        self.requester as u64 | (self.reason as u64) << 16 | (self.write as u64) << 24
    }
    pub const fn decode(b: u64) -> Self {
        Self { requester: b as u16, reason: (b >> 16) as u8, write: b & (1 << 24) != 0 }
    }
}

/// vCPU state groups (a mask; NOVA calls it the message transfer descriptor).
pub mod state {
    /// The sixteen general registers, in instruction-encoding order (RAX, RCX, RDX, RBX,
    /// RSP, RBP, RSI, RDI, R8..R15), so a decoder indexes them by register number.
    pub const GPR: u16 = 1 << 0;
    /// RIP, RFLAGS and the interrupt shadow (bit 0: after STI / MOV SS).
    pub const RIP: u16 = 1 << 1;
    /// CR0, CR2, CR3, CR4, EFER.
    pub const CR: u16 = 1 << 2;
    /// CS, SS, DS, ES, FS, GS, TR, LDTR ([`super::Segment`] each, two words).
    pub const SEG: u16 = 1 << 3;
    /// GDTR and IDTR (base, limit).
    pub const DT: u16 = 1 << 4;
    /// The event whose delivery the exit interrupted (same encoding as [`super::Event`]);
    /// read-only.
    pub const EVENT: u16 = 1 << 5;
    pub const ALL: u16 = (1 << 6) - 1;
}

/// Word offsets of the state groups in the message page.
pub mod at {
    pub const GPR: usize = 0;
    pub const RIP: usize = 16;
    pub const RFLAGS: usize = 17;
    pub const SHADOW: usize = 18;
    pub const CR0: usize = 19;
    pub const CR2: usize = 20;
    pub const CR3: usize = 21;
    pub const CR4: usize = 22;
    pub const EFER: usize = 23;
    /// Segment `i` (see [`super::seg`]) at `SEG + 2 * i`.
    pub const SEG: usize = 24;
    pub const GDTR: usize = 40;
    pub const IDTR: usize = 42;
    pub const EVENT: usize = 44;
}

/// Segment indexes in the SEG group.
pub mod seg {
    pub const CS: usize = 0;
    pub const SS: usize = 1;
    pub const DS: usize = 2;
    pub const ES: usize = 3;
    pub const FS: usize = 4;
    pub const GS: usize = 5;
    pub const TR: usize = 6;
    pub const LDTR: usize = 7;
}

/// Words of state in the message page.
pub const STATE_WORDS: usize = 45;
/// Length of an exit message that carries state: the registers plus the state words.
pub const MESSAGE_WORDS_WITH_STATE: usize = crate::hypercall::REGISTER_WORDS + STATE_WORDS;

/// General-register numbers (the order of the GPR group).
pub mod gpr {
    pub const RAX: usize = 0;
    pub const RCX: usize = 1;
    pub const RDX: usize = 2;
    pub const RBX: usize = 3;
    pub const RSP: usize = 4;
    pub const RBP: usize = 5;
    pub const RSI: usize = 6;
    pub const RDI: usize = 7;
}

/// The state groups each kind carries by default: enough to emulate it, nothing more on
/// the common exits (port I/O, CPUID and MSR exits carry their facts in registers).
pub const fn default_state(kind: ExitKind) -> u16 {
    match kind {
        ExitKind::Io | ExitKind::Cpuid | ExitKind::Msr | ExitKind::Exited | ExitKind::Dma => 0,
        ExitKind::Hypercall => state::GPR,
        // Decoding an MMIO instruction: registers, CS (mode, base), paging state.
        ExitKind::Stage2 => state::GPR | state::RIP | state::CR | state::SEG,
        ExitKind::Exception | ExitKind::Shutdown | ExitKind::Forbidden | ExitKind::Invalid => state::ALL,
    }
}

/// A segment register. `attrib` packs descriptor bits 40..47 (type, S, DPL, P) into bits
/// 0..8 and bits 52..55 (AVL, L, D/B, G) into 8..12, as AMD's VMCB does; a VMX backend
/// converts from its access-rights format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub attrib: u16,
    pub limit: u32,
    pub base: u64,
}

impl Segment {
    pub const fn to_words(self) -> [u64; 2] {
        [self.selector as u64 | (self.attrib as u64) << 16 | (self.limit as u64) << 32, self.base]
    }
    pub const fn from_words(w: [u64; 2]) -> Self {
        Self { selector: w[0] as u16, attrib: (w[0] >> 16) as u16, limit: (w[0] >> 32) as u32, base: w[1] }
    }
    /// Long mode code segment (L bit).
    pub const fn long(self) -> bool {
        self.attrib & (1 << 9) != 0
    }
    /// Default operand size 32 (D/B bit).
    pub const fn big(self) -> bool {
        self.attrib & (1 << 10) != 0
    }
}

/// A vCPU's architectural state, as the state groups carry it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuState {
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub shadow: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub seg: [Segment; 8],
    /// (base, limit)
    pub gdtr: (u64, u64),
    pub idtr: (u64, u64),
    pub event: u64,
}

impl VcpuState {
    /// Write the groups in `mask` to `out` (other words untouched).
    pub fn to_words(&self, mask: u16, out: &mut [u64; STATE_WORDS]) {
        if mask & state::GPR != 0 {
            out[at::GPR..at::GPR + 16].copy_from_slice(&self.gpr);
        }
        if mask & state::RIP != 0 {
            (out[at::RIP], out[at::RFLAGS], out[at::SHADOW]) = (self.rip, self.rflags, self.shadow);
        }
        if mask & state::CR != 0 {
            out[at::CR0..at::EFER + 1].copy_from_slice(&[self.cr0, self.cr2, self.cr3, self.cr4, self.efer]);
        }
        if mask & state::SEG != 0 {
            for (i, s) in self.seg.iter().enumerate() {
                out[at::SEG + 2 * i..at::SEG + 2 * i + 2].copy_from_slice(&s.to_words());
            }
        }
        if mask & state::DT != 0 {
            out[at::GDTR..at::IDTR + 2].copy_from_slice(&[self.gdtr.0, self.gdtr.1, self.idtr.0, self.idtr.1]);
        }
        if mask & state::EVENT != 0 {
            out[at::EVENT] = self.event;
        }
    }

    /// Read the groups in `mask` from `w` (other fields untouched).
    pub fn from_words(&mut self, mask: u16, w: &[u64; STATE_WORDS]) {
        if mask & state::GPR != 0 {
            self.gpr.copy_from_slice(&w[at::GPR..at::GPR + 16]);
        }
        if mask & state::RIP != 0 {
            (self.rip, self.rflags, self.shadow) = (w[at::RIP], w[at::RFLAGS], w[at::SHADOW]);
        }
        if mask & state::CR != 0 {
            (self.cr0, self.cr2, self.cr3, self.cr4, self.efer) =
                (w[at::CR0], w[at::CR2], w[at::CR3], w[at::CR4], w[at::EFER]);
        }
        if mask & state::SEG != 0 {
            for (i, s) in self.seg.iter_mut().enumerate() {
                *s = Segment::from_words([w[at::SEG + 2 * i], w[at::SEG + 2 * i + 1]]);
            }
        }
        if mask & state::DT != 0 {
            self.gdtr = (w[at::GDTR], w[at::GDTR + 1]);
            self.idtr = (w[at::IDTR], w[at::IDTR + 1]);
        }
        if mask & state::EVENT != 0 {
            self.event = w[at::EVENT];
        }
    }
}

/// A port access (fact A of an [`ExitKind::Io`] exit, decoded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Io {
    pub port: u16,
    /// 1, 2 or 4 bytes.
    pub size: u8,
    pub write: bool,
    /// INS/OUTS.
    pub string: bool,
    pub rep: bool,
}

impl Io {
    pub const fn encode(self) -> u64 {
        self.port as u64
            | (self.size as u64) << 16
            | (self.write as u64) << 24
            | (self.string as u64) << 25
            | (self.rep as u64) << 26
    }
    pub const fn decode(a: u64) -> Self {
        Self {
            port: a as u16,
            size: (a >> 16) as u8,
            write: a & (1 << 24) != 0,
            string: a & (1 << 25) != 0,
            rep: a & (1 << 26) != 0,
        }
    }
    /// The bits of RAX the access uses.
    pub const fn mask(self) -> u64 {
        match self.size {
            1 => 0xff,
            2 => 0xffff,
            _ => 0xffff_ffff,
        }
    }
    /// RAX after an IN that read `value`: AL/AX replace the low bits, EAX zero-extends
    /// into RAX (as a 32-bit register write does).
    pub const fn merge_in(self, rax: u64, value: u64) -> u64 {
        match self.size {
            1 | 2 => (rax & !self.mask()) | (value & self.mask()),
            _ => value & 0xffff_ffff,
        }
    }
}

/// An exit as the handler sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitMessage {
    pub kind: ExitKind,
    /// The vCPU's index in its domain.
    pub vcpu: u8,
    /// Length of the exiting instruction (0: unknown, e.g. a stage-2 fault).
    pub insn_len: u8,
    /// State groups present in the message page.
    pub state: u16,
    pub rip: u64,
    pub a: u64,
    pub b: u64,
    pub rax: u64,
}

impl ExitMessage {
    pub const fn new(kind: ExitKind, rip: u64, insn_len: u8, a: u64, b: u64) -> Self {
        Self { kind, vcpu: 0, insn_len, state: 0, rip, a, b, rax: 0 }
    }

    pub const fn encode(&self) -> [u64; 6] {
        let w0 = self.kind as u64
            | (self.vcpu as u64) << 8
            | ((self.insn_len & 0xf) as u64) << 16
            | (self.state as u64) << 32;
        [w0, self.rip, self.a, self.b, self.rax, 0]
    }

    /// `None` for an unknown kind (a message that is no exit).
    pub const fn decode(w: &[u64; 6]) -> Option<Self> {
        let Some(kind) = ExitKind::from_u8(w[0] as u8) else { return None };
        Some(Self {
            kind,
            vcpu: (w[0] >> 8) as u8,
            insn_len: ((w[0] >> 16) & 0xf) as u8,
            state: (w[0] >> 32) as u16,
            rip: w[1],
            a: w[2],
            b: w[3],
            rax: w[4],
        })
    }

    pub const fn io(&self) -> Option<Io> {
        match self.kind {
            ExitKind::Io => Some(Io::decode(self.a)),
            _ => None,
        }
    }
    /// (index, write, value written)
    pub const fn msr(&self) -> Option<(u32, bool, u64)> {
        match self.kind {
            ExitKind::Msr => Some((self.a as u32, self.a & (1 << 32) != 0, self.b)),
            _ => None,
        }
    }
    /// (leaf, subleaf)
    pub const fn cpuid(&self) -> Option<(u32, u32)> {
        match self.kind {
            ExitKind::Cpuid => Some((self.a as u32, self.b as u32)),
            _ => None,
        }
    }
    /// (guest-physical address, [`access`] bits)
    pub const fn stage2(&self) -> Option<(u64, u64)> {
        match self.kind {
            ExitKind::Stage2 => Some((self.a, self.b)),
            _ => None,
        }
    }
}

/// An event to inject: word 5 of a reply. Bits 0..8 vector, 8..11 type, 11 error code
/// valid, 31 valid, 32..64 error code (AMD's EVENTINJ layout; Intel's VM-entry
/// interruption information uses the same low bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// An external interrupt (vector 32..=255), delivered at once: the handler checked that
    /// the guest can take it. (To deliver one when the guest can, use VcpuInject.)
    Interrupt(u8),
    Nmi,
    /// An exception (vector 0..=31) with or without an error code.
    Exception(u8, Option<u32>),
}

const EVENT_VALID: u64 = 1 << 31;
const EVENT_HAS_ERROR: u64 = 1 << 11;

impl Event {
    pub const fn encode(self) -> u64 {
        match self {
            Event::Interrupt(v) => v as u64 | EVENT_VALID,
            Event::Nmi => 2 | 2 << 8 | EVENT_VALID,
            Event::Exception(v, None) => v as u64 | 3 << 8 | EVENT_VALID,
            Event::Exception(v, Some(e)) => v as u64 | 3 << 8 | EVENT_HAS_ERROR | EVENT_VALID | (e as u64) << 32,
        }
    }

    /// `Ok(None)` for 0 (no event); an error for anything a guest could not be given.
    pub const fn decode(w: u64) -> Result<Option<Self>, Error> {
        if w == 0 {
            return Ok(None);
        }
        let vector = w as u8;
        let has_error = w & EVENT_HAS_ERROR != 0;
        if w & EVENT_VALID == 0 || w & 0x7fff_f000 != 0 || (!has_error && w >> 32 != 0) {
            return Err(Error::InvalidArgument);
        }
        match ((w >> 8) & 7, has_error) {
            (0, false) if vector >= 32 => Ok(Some(Event::Interrupt(vector))),
            (2, false) if vector == 2 => Ok(Some(Event::Nmi)),
            // #NMI (2) is not an exception to inject; vectors 32+ are not exceptions.
            (3, _) if vector < 32 && vector != 2 => {
                Ok(Some(Event::Exception(vector, if has_error { Some((w >> 32) as u32) } else { None })))
            }
            _ => Err(Error::InvalidArgument),
        }
    }
}

/// Registers a reply may set (word 0 bits 8..12), values in words 1..5.
pub mod set {
    pub const RAX: u8 = 1 << 0;
    pub const RCX: u8 = 1 << 1;
    pub const RDX: u8 = 1 << 2;
    pub const RBX: u8 = 1 << 3;
}

const R_RESUME: u64 = 1 << 0;
const R_ADVANCE: u64 = 1 << 1;
const R_INJECT: u64 = 1 << 12;
const R_KNOWN: u64 = R_RESUME | R_ADVANCE | 0xf << 4 | 0xf << 8 | R_INJECT | 0xffff << 16;

/// The handler's answer to an exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitReply {
    /// Run the vCPU again (false: stop it; the handler may destroy or rebuild the VM).
    pub resume: bool,
    /// Move RIP past the instruction: by the exit's instruction length when `advance_by`
    /// is 0, else by `advance_by` bytes (1..=15, for an instruction the handler decoded).
    pub advance: bool,
    pub advance_by: u8,
    /// Which of `values` (RAX, RCX, RDX, RBX) to set ([`set`] bits).
    pub set: u8,
    pub values: [u64; 4],
    /// State groups to write back from the handler's message page (at the [`at`] offsets;
    /// [`state::EVENT`] is read-only).
    pub write_state: u16,
    pub inject: Option<Event>,
}

impl ExitReply {
    /// Stop the vCPU.
    pub const STOP: Self =
        Self { resume: false, advance: false, advance_by: 0, set: 0, values: [0; 4], write_state: 0, inject: None };
    /// Resume without changing anything (retry the instruction).
    pub const RETRY: Self = Self { resume: true, ..Self::STOP };
    /// Resume after the emulated instruction.
    pub const NEXT: Self = Self { resume: true, advance: true, ..Self::STOP };

    /// Resume after the instruction with RAX (and others by `mask`) set.
    pub const fn next_with(set: u8, values: [u64; 4]) -> Self {
        Self { set, values, ..Self::NEXT }
    }

    pub const fn encode(&self) -> [u64; 6] {
        let w0 = self.resume as u64
            | (self.advance as u64) << 1
            | ((self.advance_by & 0xf) as u64) << 4
            | ((self.set & 0xf) as u64) << 8
            | (self.inject.is_some() as u64) << 12
            | (self.write_state as u64) << 16;
        let event = match self.inject {
            Some(e) => e.encode(),
            None => 0,
        };
        [w0, self.values[0], self.values[1], self.values[2], self.values[3], event]
    }

    /// Check and decode a reply; any bit the microvisor does not know is an error.
    pub const fn decode(w: &[u64; 6]) -> Result<Self, Error> {
        let w0 = w[0];
        if w0 & !R_KNOWN != 0 {
            return Err(Error::InvalidArgument);
        }
        let write_state = (w0 >> 16) as u16;
        if write_state & !(state::ALL & !state::EVENT) != 0 {
            return Err(Error::InvalidArgument);
        }
        let inject = if w0 & R_INJECT != 0 {
            match Event::decode(w[5]) {
                Ok(Some(e)) => Some(e),
                _ => return Err(Error::InvalidArgument),
            }
        } else if w[5] != 0 {
            return Err(Error::InvalidArgument);
        } else {
            None
        };
        let advance_by = ((w0 >> 4) & 0xf) as u8;
        if advance_by != 0 && w0 & R_ADVANCE == 0 {
            return Err(Error::InvalidArgument);
        }
        Ok(Self {
            resume: w0 & R_RESUME != 0,
            advance: w0 & R_ADVANCE != 0,
            advance_by,
            set: ((w0 >> 8) & 0xf) as u8,
            values: [w[1], w[2], w[3], w[4]],
            write_state,
            inject,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trip_for_every_kind() {
        for kind in ExitKind::ALL {
            let m = ExitMessage {
                kind,
                vcpu: 3,
                insn_len: 15,
                state: default_state(kind),
                rip: 0xffff_8000_0000_1234,
                a: u64::MAX - 1,
                b: 0x1234_5678_9abc_def0,
                rax: 7,
            };
            assert_eq!(ExitMessage::decode(&m.encode()), Some(m));
        }
        assert_eq!(ExitMessage::decode(&[0; 6]), None);
        assert_eq!(ExitMessage::decode(&[12, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn io_facts() {
        let io = Io { port: 0x3f8, size: 2, write: false, string: false, rep: true };
        assert_eq!(Io::decode(io.encode()), io);
        let m = ExitMessage::new(ExitKind::Io, 0x1000, 1, io.encode(), 0);
        assert_eq!(m.io(), Some(io));
        assert_eq!(m.msr(), None);
        // IN AL keeps the rest of RAX; IN EAX zero-extends.
        let byte = Io { size: 1, ..io };
        assert_eq!(byte.merge_in(0x1122_3344_5566_7788, 0xab), 0x1122_3344_5566_77ab);
        let dword = Io { size: 4, ..io };
        assert_eq!(dword.merge_in(0x1122_3344_5566_7788, 0x1_dead_beef), 0xdead_beef);
    }

    #[test]
    fn dma_facts() {
        let d = Dma { requester: 0x0010, reason: 5, write: true };
        assert_eq!(d.encode(), 0x10 | 5 << 16 | 1 << 24);
        assert_eq!(Dma::decode(d.encode()), d);
    }

    #[test]
    fn msr_cpuid_stage2_facts() {
        let m = ExitMessage::new(ExitKind::Msr, 0, 2, 0xc000_0100 | 1 << 32, 42);
        assert_eq!(m.msr(), Some((0xc000_0100, true, 42)));
        let m = ExitMessage::new(ExitKind::Cpuid, 0, 2, 7, 1);
        assert_eq!(m.cpuid(), Some((7, 1)));
        let m = ExitMessage::new(ExitKind::Stage2, 0, 0, 0xfee0_0000, access::WRITE);
        assert_eq!(m.stage2(), Some((0xfee0_0000, access::WRITE)));
    }

    #[test]
    fn state_groups_round_trip_and_stay_apart() {
        let mut s = VcpuState::default();
        for (i, r) in s.gpr.iter_mut().enumerate() {
            *r = 100 + i as u64;
        }
        (s.rip, s.rflags, s.shadow) = (1, 2, 1);
        (s.cr0, s.cr2, s.cr3, s.cr4, s.efer) = (3, 4, 5, 6, 7);
        for (i, seg) in s.seg.iter_mut().enumerate() {
            *seg = Segment { selector: i as u16, attrib: 0xa9b, limit: 0xffff_ffff, base: 0x1000 * i as u64 };
        }
        (s.gdtr, s.idtr, s.event) = ((8, 9), (10, 11), 12);
        let mut w = [0u64; STATE_WORDS];
        s.to_words(state::ALL, &mut w);
        let mut back = VcpuState::default();
        back.from_words(state::ALL, &w);
        assert_eq!(back, s);
        // One group alone touches only its words.
        for group in [state::GPR, state::RIP, state::CR, state::SEG, state::DT, state::EVENT] {
            let mut only = [0u64; STATE_WORDS];
            s.to_words(group, &mut only);
            let mut other = [0u64; STATE_WORDS];
            s.to_words(state::ALL & !group, &mut other);
            for i in 0..STATE_WORDS {
                assert!(only[i] == 0 || other[i] == 0, "group {group:#x} overlaps at word {i}");
                assert_eq!(only[i] | other[i], w[i]);
            }
        }
        assert!(Segment::from_words(s.seg[seg::CS].to_words()).long() == (0xa9b & (1 << 9) != 0));
    }

    #[test]
    fn state_fits_the_message_page() {
        const { assert!(MESSAGE_WORDS_WITH_STATE <= crate::hypercall::MAX_MESSAGE_WORDS) };
        assert_eq!(at::EVENT + 1, STATE_WORDS);
    }

    #[test]
    fn reply_round_trips() {
        let replies = [
            ExitReply::STOP,
            ExitReply::RETRY,
            ExitReply::NEXT,
            ExitReply::next_with(set::RAX | set::RDX, [1, 2, 3, 4]),
            ExitReply { advance_by: 3, ..ExitReply::NEXT },
            ExitReply { write_state: state::GPR | state::RIP, ..ExitReply::RETRY },
            ExitReply { inject: Some(Event::Exception(13, Some(0))), ..ExitReply::RETRY },
            ExitReply { inject: Some(Event::Exception(6, None)), ..ExitReply::RETRY },
            ExitReply { inject: Some(Event::Interrupt(0x20)), ..ExitReply::NEXT },
            ExitReply { inject: Some(Event::Nmi), ..ExitReply::RETRY },
        ];
        for r in replies {
            assert_eq!(ExitReply::decode(&r.encode()), Ok(r), "{r:?}");
        }
        // The old fault verdicts keep their meaning: 0 stops, 1 resumes.
        assert_eq!(ExitReply::decode(&[0; 6]), Ok(ExitReply::STOP));
        assert_eq!(ExitReply::decode(&[1, 0, 0, 0, 0, 0]), Ok(ExitReply::RETRY));
    }

    #[test]
    fn bad_replies_are_refused() {
        let bad: [[u64; 6]; 9] = [
            [1 << 13, 0, 0, 0, 0, 0],                           // reserved bit
            [1 << 63, 0, 0, 0, 0, 0],                           // reserved bit
            [1 | (state::EVENT as u64) << 16, 0, 0, 0, 0, 0],   // read-only group
            [1 | 1 << 12, 0, 0, 0, 0, 0],                       // inject without an event
            [1, 0, 0, 0, 0, Event::Nmi.encode()],               // an event without inject
            [1 | 1 << 12, 0, 0, 0, 0, 0x20 | 3 << 8 | 1 << 31], // exception vector 32
            [1 | 1 << 12, 0, 0, 0, 0, 5 | 1 << 31],             // interrupt vector 5
            [1 | 1 << 12, 0, 0, 0, 0, 0x30 | 5 << 8 | 1 << 31], // unknown type
            [1 | 3 << 4, 0, 0, 0, 0, 0],                        // advance_by without advance
        ];
        for w in bad {
            assert_eq!(ExitReply::decode(&w), Err(Error::InvalidArgument), "{w:x?}");
        }
        assert_eq!(Event::decode(13 | 3 << 8 | 1 << 31 | 1 << 32), Err(Error::InvalidArgument));
    }
}

//! CPU exception entry shared by the microvisor and every domain: 32 assembly stubs that
//! normalise the stack into an [`ExceptionFrame`] and call one Rust handler, and a minimal
//! 64-bit IDT to install them. (Stable Rust has no `x86-interrupt` ABI, hence the stubs.)

/// Register state at the time of an exception, as the stubs lay it out on the stack.
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    /// The CPU's error code, or 0 for vectors that push none.
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Architectural names of the exception vectors, for reports.
pub fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 floating point",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD floating point",
        20 => "#VE virtualization",
        21 => "#CP control protection",
        29 => "#VC VMM communication",
        30 => "#SX security",
        _ => "reserved vector",
    }
}

/// One 16-byte long-mode interrupt gate.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

/// A 64-bit interrupt descriptor table.
#[repr(C, align(16))]
pub struct Idt {
    gates: [Gate; 256],
}

impl Idt {
    pub const fn new() -> Self {
        const EMPTY: Gate =
            Gate { offset_low: 0, selector: 0, ist: 0, type_attr: 0, offset_mid: 0, offset_high: 0, reserved: 0 };
        Self { gates: [EMPTY; 256] }
    }

    /// Point `vector` at `handler` through a present, DPL-0 interrupt gate using code segment
    /// `selector`; `ist` 1..=7 switches to that TSS stack (0: stay on the current stack).
    pub fn set(&mut self, vector: u8, handler: u64, selector: u16, ist: u8) {
        self.gates[vector as usize] = Gate {
            offset_low: handler as u16,
            selector,
            ist: ist & 7,
            type_attr: 0x8e,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        };
    }

    /// Load this table into IDTR.
    #[cfg(target_arch = "x86_64")]
    pub fn load(&'static self) {
        #[repr(C, packed)]
        struct Pointer {
            limit: u16,
            base: u64,
        }
        let pointer = Pointer { limit: (core::mem::size_of::<Self>() - 1) as u16, base: self as *const Self as u64 };
        // SAFETY: `self` is 'static, so IDTR never points at freed memory; every gate was
        // written through `set` (or is not present, which raises #NP→#DF as the CPU defines).
        unsafe { core::arch::asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack)) };
    }
}

impl Default for Idt {
    fn default() -> Self {
        Self::new()
    }
}

/// Emit the 32 exception stubs. Each pushes a dummy error code where the CPU pushes none,
/// then the vector and all general registers, and calls
/// `$handler: extern "C" fn(&mut ExceptionFrame)`; if the handler returns, the registers
/// (possibly changed) are restored and the faulting context resumes.
///
/// Also emits `pvh_exception_stubs`, a table of the 32 stub addresses: use
/// [`exception_stub_addresses`](crate::exceptions::exception_stub_addresses) to read it.
#[macro_export]
macro_rules! exception_stubs {
    ($handler:path) => {
        core::arch::global_asm!(
            ".pushsection .text.pvh_exceptions, \"ax\"",
            ".macro pvh_exc_stub vec, has_err",
            "pvh_exc_stub_\\vec:",
            ".if \\has_err == 0",
            "push 0",
            ".endif",
            "push \\vec",
            "jmp pvh_exc_common",
            ".endm",
            "pvh_exc_stub 0, 0",
            "pvh_exc_stub 1, 0",
            "pvh_exc_stub 2, 0",
            "pvh_exc_stub 3, 0",
            "pvh_exc_stub 4, 0",
            "pvh_exc_stub 5, 0",
            "pvh_exc_stub 6, 0",
            "pvh_exc_stub 7, 0",
            "pvh_exc_stub 8, 1",
            "pvh_exc_stub 9, 0",
            "pvh_exc_stub 10, 1",
            "pvh_exc_stub 11, 1",
            "pvh_exc_stub 12, 1",
            "pvh_exc_stub 13, 1",
            "pvh_exc_stub 14, 1",
            "pvh_exc_stub 15, 0",
            "pvh_exc_stub 16, 0",
            "pvh_exc_stub 17, 1",
            "pvh_exc_stub 18, 0",
            "pvh_exc_stub 19, 0",
            "pvh_exc_stub 20, 0",
            "pvh_exc_stub 21, 1",
            "pvh_exc_stub 22, 0",
            "pvh_exc_stub 23, 0",
            "pvh_exc_stub 24, 0",
            "pvh_exc_stub 25, 0",
            "pvh_exc_stub 26, 0",
            "pvh_exc_stub 27, 0",
            "pvh_exc_stub 28, 0",
            "pvh_exc_stub 29, 1",
            "pvh_exc_stub 30, 1",
            "pvh_exc_stub 31, 0",
            "pvh_exc_common:",
            "push rax",
            "push rbx",
            "push rcx",
            "push rdx",
            "push rsi",
            "push rdi",
            "push rbp",
            "push r8",
            "push r9",
            "push r10",
            "push r11",
            "push r12",
            "push r13",
            "push r14",
            "push r15",
            "mov rdi, rsp",
            "cld",
            "call {handler}",
            "pop r15",
            "pop r14",
            "pop r13",
            "pop r12",
            "pop r11",
            "pop r10",
            "pop r9",
            "pop r8",
            "pop rbp",
            "pop rdi",
            "pop rsi",
            "pop rdx",
            "pop rcx",
            "pop rbx",
            "pop rax",
            "add rsp, 16",
            "iretq",
            ".popsection",
            ".pushsection .rodata.pvh_exceptions, \"a\"",
            ".p2align 3",
            ".global pvh_exception_stubs",
            "pvh_exception_stubs:",
            ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
            ".quad pvh_exc_stub_\\n",
            ".endr",
            ".popsection",
            handler = sym $handler,
        );
    };
}

/// Addresses of the 32 stubs emitted by [`exception_stubs!`](crate::exception_stubs).
/// Only call this in an image that invoked that macro (else the link fails).
#[cfg(target_os = "none")]
pub fn exception_stub_addresses() -> [u64; 32] {
    extern "C" {
        static pvh_exception_stubs: [u64; 32];
    }
    // SAFETY: the table is emitted by `exception_stubs!` in read-only data, initialised at
    // link time with 32 code addresses and never written.
    unsafe { pvh_exception_stubs }
}

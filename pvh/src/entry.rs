//! The PVH entry trampoline, shared by the microvisor and every domain image.
//!
//! [`pvh_entry!`](crate::pvh_entry) expands to the ELF note that tells a loader (QEMU or the
//! microvisor) where the 32-bit entry is, and to the trampoline itself: it zeroes `.bss`,
//! identity-maps the low 4 GiB with 2 MiB pages (the range above 3 GiB uncached, as it holds
//! MMIO), enables long mode and calls `main(start_info_paddr, protocol)` on a boot stack.
//! `protocol` is [`start_info::MAGIC`](crate::start_info::MAGIC) when entered here by a PVH
//! loader, or what EAX held when entered by the Multiboot2 entry of
//! [`multiboot2_header!`](crate::multiboot2_header) (which joins at `pvh_start32_common`);
//! domains, always booted by PVH, ignore it.
//!
//! The image's linker script must define `__bss_start` and `__bss_end` and keep `.note.pvh`
//! in a note segment of its own (4-byte aligned: QEMU aligns the descriptor by the segment's
//! alignment).

/// Emit the PVH note and 32-bit trampoline. `$main` is an
/// `extern "C" fn(start_info: u32) -> !` or `extern "C" fn(start_info: u32, protocol: u32) -> !`;
/// `$stack` the boot stack size in bytes.
#[macro_export]
macro_rules! pvh_entry {
    ($main:path, $stack:expr) => {
        core::arch::global_asm!(
            // XEN_ELFNOTE_PHYS32_ENTRY: name "Xen", type 18, 8-byte descriptor.
            ".pushsection .note.pvh, \"a\", @note",
            ".p2align 2",
            ".long 4",
            ".long 8",
            ".long 18",
            ".asciz \"Xen\"",
            ".p2align 2",
            ".quad pvh_start32",
            ".popsection",

            ".pushsection .text.pvh_start32, \"ax\"",
            ".code32",
            ".global pvh_start32",
            "pvh_start32:",
            "cli",
            "cld",
            // EBP: how the image was entered (the PVH magic here; EAX via the Multiboot2 entry).
            "mov ebp, 0x336ec578",
            ".global pvh_start32_common",
            "pvh_start32_common:",
            "mov esi, ebx",
            // Zero .bss (it holds the boot page tables and stack): by dwords, then the
            // last 0-3 bytes. Not byte by byte: an emulator (QEMU's TCG, icount) runs a REP
            // string instruction one iteration at a time, and a domain's 2 MiB of .bss
            // byte by byte was half of what a driver VM restart cost (bench restart).
            "mov edi, offset __bss_start",
            "mov edx, offset __bss_end",
            "sub edx, edi",
            "xor eax, eax",
            "mov ecx, edx",
            "shr ecx, 2",
            "rep stosd",
            "mov ecx, edx",
            "and ecx, 3",
            "rep stosb",
            // PML4[0] -> PDPT; PDPT[0..4] -> PD0..PD3.
            "mov edi, offset pvh_boot_tables",
            "lea eax, [edi + 0x1003]",
            "mov [edi], eax",
            "lea eax, [edi + 0x2003]",
            "mov [edi + 0x1000], eax",
            "add eax, 0x1000",
            "mov [edi + 0x1008], eax",
            "add eax, 0x1000",
            "mov [edi + 0x1010], eax",
            "add eax, 0x1000",
            "mov [edi + 0x1018], eax",
            // 2048 2 MiB pages: P|RW|PS, plus PCD|PWT from 3 GiB up.
            "lea edx, [edi + 0x2000]",
            "xor ecx, ecx",
            "2:",
            "mov eax, ecx",
            "shl eax, 21",
            "or eax, 0x83",
            "cmp ecx, 1536",
            "jb 3f",
            "or eax, 0x18",
            "3:",
            "mov [edx + ecx * 8], eax",
            "inc ecx",
            "cmp ecx, 2048",
            "jb 2b",
            // PAE, page tables, EFER.LME, then paging + write protect.
            "mov eax, cr4",
            "or eax, 0x20",
            "mov cr4, eax",
            "mov cr3, edi",
            "mov ecx, 0xC0000080",
            "rdmsr",
            "or eax, 0x100",
            "wrmsr",
            "mov eax, cr0",
            "or eax, 0x80010001",
            "mov cr0, eax",
            "lgdt [pvh_boot_gdt_ptr]",
            "jmp fword ptr [pvh_boot_far_jump]",

            ".code64",
            "pvh_start64:",
            "mov ax, 0x10",
            "mov ds, ax",
            "mov es, ax",
            "mov ss, ax",
            "xor eax, eax",
            "mov fs, ax",
            "mov gs, ax",
            "lea rsp, [rip + pvh_boot_stack_top]",
            "mov edi, esi",
            "mov esi, ebp",
            "xor ebp, ebp",
            "call {main}",
            "4:",
            "hlt",
            "jmp 4b",
            ".popsection",

            ".pushsection .rodata.pvh_boot_gdt, \"a\"",
            ".p2align 3",
            "pvh_boot_gdt:",
            ".quad 0",
            ".quad 0x00af9a000000ffff",
            ".quad 0x00cf92000000ffff",
            "pvh_boot_gdt_ptr:",
            ".word 23",
            ".long pvh_boot_gdt",
            "pvh_boot_far_jump:",
            ".long pvh_start64",
            ".word 0x08",
            ".popsection",

            ".pushsection .bss.pvh_boot, \"aw\", @nobits",
            ".p2align 12",
            "pvh_boot_tables:",
            ".skip 6 * 4096",
            ".global pvh_boot_stack",
            "pvh_boot_stack:",
            ".skip {stack}",
            "pvh_boot_stack_top:",
            ".popsection",
            main = sym $main,
            stack = const $stack,
        );
    };
}

//! The PVH boot convention shared by the microvisor and every domain image.
//!
//! Every image in the stack is an ELF64 executable with a `XEN_ELFNOTE_PHYS32_ENTRY` note; it is
//! entered in 32-bit protected mode with paging off and EBX pointing at an `hvm_start_info`.
//! QEMU boots the microvisor this way (`-kernel`), and the microvisor boots dom0 the same way,
//! so one trampoline ([`pvh_entry!`]) serves all. The microvisor can also be started by a
//! Multiboot2 loader (GRUB): [`multiboot2`] has its header, entry and boot information reader.
#![cfg_attr(not(test), no_std)]

pub mod elf;
pub mod entry;
pub mod exceptions;
pub mod multiboot2;
pub mod start_info;

//! Getting the PVH-bootable ELF `vmlinux` out of a distribution's compressed `vmlinuz`.
//!
//! Debian's kernel is a bzImage: a real-mode setup part, then a small decompressor whose
//! payload is the real kernel ELF, XZ-compressed (CONFIG_KERNEL_XZ; scripts/xz_wrap.sh
//! compresses with the x86 BCJ filter and a CRC32 check). The PVH entry note (ELF note type
//! 18, XEN_ELFNOTE_PHYS32_ENTRY) is only in that inner ELF, so a PVH loader needs it
//! decompressed. The bzImage setup header says where the payload is (Documentation/x86/
//! boot.rst: `setup_sects` at 0x1f1, "HdrS" at 0x202, `payload_offset` at 0x248 and
//! `payload_length` at 0x24c, the offset counted from the start of the protected-mode code,
//! which follows the `setup_sects + 1` sectors of 512 bytes); without a usable header the
//! image is scanned for the XZ stream magic. The payload ends in the 4-byte decompressed
//! size (and the file may carry padding): data after the XZ stream is ignored.

use std::io::Read;

use pvh::elf::ElfImage;

/// The XZ stream header magic (the .xz file format, section 2.1.1.1).
pub const XZ_MAGIC: [u8; 6] = [0xFD, b'7', b'z', b'X', b'Z', 0x00];

/// Offsets of every XZ stream magic in `data`, in order.
pub fn xz_magic_offsets(data: &[u8]) -> Vec<usize> {
    data.windows(XZ_MAGIC.len()).enumerate().filter(|(_, w)| *w == XZ_MAGIC).map(|(i, _)| i).collect()
}

fn u32_le(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

/// Where the setup header of a bzImage says its compressed payload is (file offset,
/// length), or `None` if `data` has no such header or the range is outside the file.
pub fn bzimage_payload(data: &[u8]) -> Option<(usize, usize)> {
    if data.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    // boot.rst: "If this field is 0, the real value is 4."
    let setup_sects = match *data.get(0x1f1)? {
        0 => 4,
        n => usize::from(n),
    };
    let pm_start = (setup_sects + 1) * 512;
    let offset = pm_start.checked_add(u32_le(data, 0x248)? as usize)?;
    let len = u32_le(data, 0x24c)? as usize;
    let end = offset.checked_add(len)?;
    (len > 0 && end <= data.len()).then_some((offset, len))
}

/// Decompresses the single XZ stream at the start of `stream`; whatever follows it is
/// ignored (the kernel's appended size, padding).
pub fn decompress_xz(stream: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(stream.len() * 4);
    lzma_rust2::XzReader::new(stream, false)
        .read_to_end(&mut out)
        .map_err(|e| format!("XZ decompression failed: {e}"))?;
    Ok(out)
}

/// What was found in a kernel image.
#[derive(Debug, Clone)]
pub struct Vmlinux {
    pub elf: Vec<u8>,
    /// The 32-bit PVH entry point from the ELF note.
    pub pvh_entry: u32,
    /// Where in the compressed image the XZ stream started.
    pub xz_offset: usize,
}

/// Checks that `elf` is an x86-64 executable the PVH loader accepts and has the PVH entry
/// note; returns the entry point.
pub fn check_pvh(elf: &[u8]) -> Result<u32, String> {
    let image = ElfImage::parse(elf).map_err(|e| format!("not a loadable x86-64 ELF: {e:?}"))?;
    image.pvh_entry().ok_or_else(|| "the ELF has no PVH entry note (type 18, XEN_ELFNOTE_PHYS32_ENTRY)".to_string())
}

/// The PVH-bootable ELF inside the bzImage `vmlinuz`: the payload the setup header names
/// first, then every other XZ stream in the file, until one decompresses to an ELF with a
/// PVH entry note.
pub fn extract(vmlinuz: &[u8]) -> Result<Vmlinux, String> {
    let mut candidates = Vec::new();
    if let Some((offset, _)) = bzimage_payload(vmlinuz) {
        if vmlinuz[offset..].starts_with(&XZ_MAGIC) {
            candidates.push(offset);
        }
    }
    for offset in xz_magic_offsets(vmlinuz) {
        if !candidates.contains(&offset) {
            candidates.push(offset);
        }
    }
    if candidates.is_empty() {
        return Err("no XZ stream in the kernel image (is it an XZ-compressed bzImage?)".into());
    }
    let mut why = Vec::new();
    for &offset in &candidates {
        let elf = match decompress_xz(&vmlinuz[offset..]) {
            Ok(elf) => elf,
            Err(e) => {
                why.push(format!("at {offset:#x}: {e}"));
                continue;
            }
        };
        match check_pvh(&elf) {
            Ok(pvh_entry) => return Ok(Vmlinux { elf, pvh_entry, xz_offset: offset }),
            Err(e) => why.push(format!("at {offset:#x}: {e}")),
        }
    }
    Err(format!("no XZ stream in the kernel image holds a PVH-bootable ELF: {}", why.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn xz(data: &[u8], bcj: bool) -> Vec<u8> {
        use lzma_rust2::{XzOptions, XzWriter};
        let mut opts = XzOptions::with_preset(1);
        // As scripts/xz_wrap.sh does for x86: BCJ before LZMA2, CRC32 check.
        opts.set_check_sum_type(lzma_rust2::CheckType::Crc32);
        if bcj {
            opts.prepend_pre_filter(lzma_rust2::FilterType::BcjX86, 0);
        }
        let mut w = XzWriter::new(Vec::new(), opts).unwrap();
        w.write_all(data).unwrap();
        w.finish().unwrap()
    }

    /// A minimal ELF64 executable with one PT_LOAD and a PT_NOTE holding a PVH entry note.
    fn pvh_elf(entry: u32) -> Vec<u8> {
        let mut e = vec![0u8; 0x200];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // ELFCLASS64
        e[5] = 1; // little-endian
        e[6] = 1;
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        e[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        e[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        e[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
        let ph = |e: &mut Vec<u8>, at: usize, ty: u32, off: u64, paddr: u64, size: u64| {
            e[at..at + 4].copy_from_slice(&ty.to_le_bytes());
            e[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            e[at + 24..at + 32].copy_from_slice(&paddr.to_le_bytes());
            e[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
            e[at + 40..at + 48].copy_from_slice(&size.to_le_bytes());
            e[at + 48..at + 56].copy_from_slice(&4u64.to_le_bytes());
        };
        ph(&mut e, 64, 1, 0x100, 0x100_0000, 0x100);
        // Note: namesz 4 ("Xen\0"), descsz 4, type 18.
        let note = [4u32.to_le_bytes(), 4u32.to_le_bytes(), 18u32.to_le_bytes()].concat();
        e[0x180..0x18c].copy_from_slice(&note);
        e[0x18c..0x190].copy_from_slice(b"Xen\0");
        e[0x190..0x194].copy_from_slice(&entry.to_le_bytes());
        ph(&mut e, 120, 4, 0x180, 0, 0x14);
        e
    }

    #[test]
    fn finds_every_magic_including_at_the_edges() {
        let mut d = XZ_MAGIC.to_vec();
        d.extend_from_slice(b"\xfd7zX"); // a partial magic is no magic
        d.extend_from_slice(&XZ_MAGIC);
        d.extend_from_slice(b"..");
        d.extend_from_slice(&XZ_MAGIC);
        assert_eq!(xz_magic_offsets(&d), vec![0, 10, 18]);
        assert!(xz_magic_offsets(&XZ_MAGIC[..5]).is_empty());
        assert!(xz_magic_offsets(b"").is_empty());
    }

    #[test]
    fn decompresses_a_bcj_stream_and_ignores_what_follows() {
        let data: Vec<u8> = (0..100_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for bcj in [false, true] {
            let mut s = xz(&data, bcj);
            // The kernel appends the decompressed size, then possibly padding.
            s.extend_from_slice(&(data.len() as u32).to_le_bytes());
            s.extend_from_slice(&[0; 37]);
            assert_eq!(decompress_xz(&s).unwrap(), data, "bcj={bcj}");
        }
    }

    #[test]
    fn a_truncated_stream_is_an_error_not_a_short_result() {
        let s = xz(&[9u8; 50_000], true);
        assert!(decompress_xz(&s[..s.len() / 2]).is_err());
    }

    /// A fake bzImage: setup sectors with the header, a decoy XZ stream (not an ELF), then
    /// the payload with the PVH ELF, then the size and padding.
    fn fake_bzimage(header: bool) -> Vec<u8> {
        let mut img = vec![0u8; 5 * 512];
        let decoy = xz(b"not an elf at all", false);
        img.extend_from_slice(&decoy);
        let payload_at = img.len();
        let payload = xz(&pvh_elf(0x100_1234), true);
        img.extend_from_slice(&payload);
        img.extend_from_slice(&[0x40, 0x02, 0, 0]);
        img.extend_from_slice(&[0xff; 100]);
        if header {
            img[0x1f1] = 4;
            img[0x202..0x206].copy_from_slice(b"HdrS");
            img[0x248..0x24c].copy_from_slice(&((payload_at - 5 * 512) as u32).to_le_bytes());
            img[0x24c..0x250].copy_from_slice(&(payload.len() as u32 + 4).to_le_bytes());
        }
        img
    }

    #[test]
    fn the_setup_header_names_the_payload() {
        let img = fake_bzimage(true);
        let (off, len) = bzimage_payload(&img).unwrap();
        assert!(img[off..].starts_with(&XZ_MAGIC));
        assert!(off + len <= img.len());
        assert_eq!(bzimage_payload(&fake_bzimage(false)), None);
        // A payload range past the end of the file is not believed.
        let mut bad = fake_bzimage(true);
        bad[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(bzimage_payload(&bad), None);
    }

    #[test]
    fn extracts_the_pvh_elf_with_or_without_a_header() {
        for header in [true, false] {
            let v = extract(&fake_bzimage(header)).unwrap();
            assert_eq!(v.pvh_entry, 0x100_1234);
            assert_eq!(v.elf, pvh_elf(0x100_1234));
        }
    }

    #[test]
    fn an_elf_without_the_note_or_no_stream_at_all_is_refused() {
        let mut elf = pvh_elf(1);
        elf[0x188..0x18c].copy_from_slice(&17u32.to_le_bytes()); // another note type
        let err = extract(&xz(&elf, true)).unwrap_err();
        assert!(err.contains("no PVH entry note"), "{err}");
        assert!(extract(b"plain bytes").unwrap_err().contains("no XZ stream"));
    }
}

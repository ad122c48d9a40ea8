//! A writer for the "newc" cpio format (the SVR4 portable format without checksums), the
//! format Linux unpacks an initramfs from (Documentation/driver-api/early-userspace/
//! buffer-format.rst: magic "070701", every field 8 ASCII hex digits, the name NUL-terminated
//! and the header plus name padded to a multiple of 4 bytes, the data padded to 4 bytes,
//! and a final entry named "TRAILER!!!"). Linux takes it uncompressed, so no compression here.

/// `S_IFDIR`, `S_IFREG`, `S_IFLNK` from `<sys/stat.h>`: the type bits of `c_mode`.
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
/// `S_IFCHR`: a character device node (e.g. `/dev/console`, needed before devtmpfs is up).
pub const S_IFCHR: u32 = 0o020000;

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

/// An archive being built in memory. Entries keep the order they were added in, which is
/// the order the kernel creates them: add a directory before what it contains.
#[derive(Debug, Default)]
pub struct Writer {
    out: Vec<u8>,
    next_ino: u32,
    names: Vec<String>,
}

impl Writer {
    pub fn new() -> Self {
        Self { out: Vec::new(), next_ino: 1, names: Vec::new() }
    }

    /// A directory `path` (no leading slash, e.g. `bin` or `lib/modules`) with permissions
    /// `perm` (e.g. 0o755).
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), String> {
        self.entry(path, S_IFDIR | (perm & 0o7777), 2, (0, 0), b"")
    }

    /// A regular file with contents `data`.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<(), String> {
        self.entry(path, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// A symbolic link `path` pointing at `target` (the link's data is the target).
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), String> {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// A character device node with the given major and minor numbers.
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<(), String> {
        self.entry(path, S_IFCHR | (perm & 0o7777), 1, (major, minor), b"")
    }

    /// The archive: every entry, then the trailer.
    pub fn finish(mut self) -> Vec<u8> {
        // The trailer is an entry like the others with ino 0 and nlink 1.
        self.header(TRAILER, 0, 0, 1, 0, (0, 0));
        self.out
    }

    fn entry(&mut self, path: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) -> Result<(), String> {
        if path.is_empty() || path.starts_with('/') || path.contains('\0') || path == TRAILER {
            return Err(format!("cpio: bad entry name {path:?} (relative, non-empty, no NUL)"));
        }
        if path.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return Err(format!("cpio: entry name {path:?} has an empty, `.` or `..` component"));
        }
        if self.names.iter().any(|n| n == path) {
            return Err(format!("cpio: {path} added twice"));
        }
        let size = u32::try_from(data.len()).map_err(|_| format!("cpio: {path} is over 4 GiB"))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.names.push(path.to_string());
        self.header(path, ino, mode, nlink, size, rdev);
        self.out.extend_from_slice(data);
        pad4(&mut self.out);
        Ok(())
    }

    fn header(&mut self, name: &str, ino: u32, mode: u32, nlink: u32, size: u32, rdev: (u32, u32)) {
        let name_size = name.len() as u32 + 1; // with the NUL
        let fields = [
            ino, mode, 0, // uid: root
            0, // gid: root
            nlink, 0, // mtime: fixed, so the archive is reproducible
            size, 0,      // devmajor
            0,      // devminor
            rdev.0, // rdevmajor
            rdev.1, // rdevminor
            name_size, 0, // check: unused in newc
        ];
        self.out.extend_from_slice(MAGIC.as_bytes());
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        pad4(&mut self.out);
    }
}

/// Header (110 bytes) plus name are padded together to a multiple of four, and so is the
/// data; the archive starts aligned, so padding the whole buffer is the same thing.
fn pad4(v: &mut Vec<u8>) {
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
}

/// One entry read back from an archive (for tests and for checking what was built).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub mode: u32,
    pub nlink: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    pub data: Vec<u8>,
}

/// Reads a newc archive up to its trailer (a minimal reader, to check the writer and the
/// finished initramfs without external tools).
pub fn read(mut bytes: &[u8]) -> Result<Vec<Entry>, String> {
    let start_len = bytes.len();
    let mut entries = Vec::new();
    loop {
        let at = start_len - bytes.len();
        let header = bytes.get(..110).ok_or(format!("cpio: truncated header at byte {at}"))?;
        if &header[..6] != MAGIC.as_bytes() {
            return Err(format!("cpio: bad magic at byte {at}"));
        }
        let field = |i: usize| -> Result<u32, String> {
            let s = std::str::from_utf8(&header[6 + 8 * i..14 + 8 * i]).map_err(|_| "cpio: non-ASCII field")?;
            u32::from_str_radix(s, 16).map_err(|_| format!("cpio: bad hex field {s:?} at byte {at}"))
        };
        let (mode, nlink, size, rdev_major, rdev_minor, name_size) =
            (field(1)?, field(4)?, field(6)? as usize, field(9)?, field(10)?, field(11)? as usize);
        let name_end = 110 + name_size;
        let name_bytes = bytes.get(110..name_end).ok_or("cpio: truncated name")?;
        let name = std::str::from_utf8(name_bytes.strip_suffix(&[0]).ok_or("cpio: name not NUL-terminated")?)
            .map_err(|_| "cpio: name not UTF-8")?
            .to_string();
        let data_start = name_end.next_multiple_of(4);
        let data_end = data_start + size;
        let data = bytes.get(data_start..data_end).ok_or(format!("cpio: truncated data of {name}"))?.to_vec();
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(Entry { name, mode, nlink, rdev_major, rdev_minor, data });
        bytes = bytes.get(data_end.next_multiple_of(4)..).ok_or("cpio: truncated padding")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_archive_is_just_the_trailer() {
        let a = Writer::new().finish();
        // 110-byte header + "TRAILER!!!\0" (11) = 121, padded to 124.
        assert_eq!(a.len(), 124);
        assert!(a.starts_with(b"070701"));
        assert_eq!(&a[110..121], b"TRAILER!!!\0");
        assert_eq!(read(&a).unwrap(), vec![]);
    }

    #[test]
    fn header_fields_are_eight_hex_digits_and_padding_aligns_to_four() {
        let mut w = Writer::new();
        w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        let a = w.finish();
        let header = std::str::from_utf8(&a[..110]).unwrap();
        // ino 1, regular file 0755, uid 0, gid 0, nlink 1, mtime 0, size 10.
        assert_eq!(&header[6..62], "00000001000081ed000000000000000000000001000000000000000a");
        // namesize 5 ("init\0"); 110 + 5 = 115, padded to 116, then 10 bytes, padded to 128.
        assert_eq!(&header[94..102], "00000005");
        assert_eq!(&a[110..116], b"init\0\0");
        assert_eq!(&a[116..126], b"#!/bin/sh\n");
        assert_eq!(&a[126..128], b"\0\0");
        assert_eq!(&a[128..134], b"070701");
    }

    #[test]
    fn round_trips_every_kind_of_entry() {
        let mut w = Writer::new();
        w.dir("bin", 0o755).unwrap();
        w.file("bin/busybox", 0o755, &[1, 2, 3, 4, 5]).unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.dir("dev", 0o755).unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        w.file("empty", 0o644, b"").unwrap();
        let entries = read(&w.finish()).unwrap();
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["bin", "bin/busybox", "bin/sh", "dev", "dev/console", "empty"]);
        assert_eq!(entries[0].mode, S_IFDIR | 0o755);
        assert_eq!(entries[0].nlink, 2);
        assert_eq!(entries[1].data, [1, 2, 3, 4, 5]);
        assert_eq!(entries[2].mode, S_IFLNK | 0o777);
        assert_eq!(entries[2].data, b"busybox");
        assert_eq!((entries[4].mode, entries[4].rdev_major, entries[4].rdev_minor), (S_IFCHR | 0o600, 5, 1));
        assert!(entries[5].data.is_empty());
    }

    #[test]
    fn every_entry_starts_four_byte_aligned_for_all_name_and_data_lengths() {
        for name_len in 1..9 {
            for data_len in 0..9 {
                let mut w = Writer::new();
                let name = "n".repeat(name_len);
                w.file(&name, 0o644, &vec![7; data_len]).unwrap();
                w.file("next", 0o644, b"x").unwrap();
                let a = w.finish();
                assert_eq!(a.len() % 4, 0);
                let e = read(&a).unwrap();
                assert_eq!((e[0].name.len(), e[0].data.len(), e[1].name.as_str()), (name_len, data_len, "next"));
            }
        }
    }

    #[test]
    fn refuses_bad_names_and_duplicates() {
        let mut w = Writer::new();
        for bad in ["", "/init", "a//b", "a/../b", "./a", "TRAILER!!!", "a\0b"] {
            assert!(w.file(bad, 0o644, b"").is_err(), "{bad:?} accepted");
        }
        w.file("a", 0o644, b"").unwrap();
        assert!(w.dir("a", 0o755).is_err());
    }
}

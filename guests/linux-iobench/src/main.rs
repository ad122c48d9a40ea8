//! `linux-iobench [<ms per workload>] [<device>]`: the block half of `cargo xtask bench
//! linux-io`, run by the guest's `/etc/init.d/iobench`. A static Linux x86-64 executable
//! with no libc (built for `x86_64-unknown-none` and linked non-PIE: Linux maps its segments
//! and jumps to `_start`), so it needs nothing the project does not already build with.
//!
//! Opens the device with `O_DIRECT` (no page cache: every request reaches the virtio-blk
//! device) and runs each of `linux_iobench::WORKLOADS` for the given time (default 2000 ms),
//! one request at a time, timed with `CLOCK_MONOTONIC`. Prints the lines of
//! `linux_iobench::{mark_line, result_line}` on stdout.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("linux-iobench is a static Linux program for the guest: `cargo xtask build` builds it");
}

#[cfg(target_os = "none")]
mod linux {
    use core::arch::{asm, global_asm};

    use linux_iobench::{mark_line, parse_u64, result_line, Line, Offsets, MAX_BLOCK, PREFIX, WORKLOADS};

    // Linux x86-64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl).
    const SYS_WRITE: u64 = 1;
    const SYS_OPEN: u64 = 2;
    const SYS_LSEEK: u64 = 8;
    const SYS_PREAD64: u64 = 17;
    const SYS_PWRITE64: u64 = 18;
    const SYS_CLOCK_GETTIME: u64 = 228;
    const SYS_EXIT_GROUP: u64 = 231;
    // include/uapi/asm-generic/fcntl.h (x86 uses the generic values).
    const O_RDWR: u64 = 2;
    const O_DIRECT: u64 = 0o40000;
    const O_CLOEXEC: u64 = 0o2000000;
    const SEEK_END: u64 = 2;
    const CLOCK_MONOTONIC: u64 = 1;

    /// The one I/O buffer: O_DIRECT wants it aligned to the logical block size.
    #[repr(C, align(4096))]
    struct Buffer([u8; MAX_BLOCK]);
    static mut BUFFER: Buffer = Buffer([0; MAX_BLOCK]);

    // The process starts with the stack pointer at argc, then argv[], then NULL (System V
    // x86-64 ABI, 3.4.1); the entry aligns the stack and calls `start` with that pointer.
    global_asm!(
        ".globl _start",
        "_start:",
        "mov rdi, rsp",
        "and rsp, -16",
        "call {start}",
        "ud2",
        start = sym start,
    );

    fn syscall(n: u64, a: u64, b: u64, c: u64, d: u64) -> i64 {
        let r: i64;
        // SAFETY: a Linux system call by the x86-64 convention (number in rax, arguments in
        // rdi, rsi, rdx, r10; rcx and r11 clobbered). Every caller passes pointers to memory
        // it owns for the call's duration, with lengths inside it.
        unsafe {
            asm!("syscall", inlateout("rax") n as i64 => r, in("rdi") a, in("rsi") b, in("rdx") c, in("r10") d,
                 lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        r
    }

    fn print(bytes: &[u8]) {
        syscall(SYS_WRITE, 1, bytes.as_ptr() as u64, bytes.len() as u64, 0);
    }

    fn fail(what: &str, err: i64) -> ! {
        let mut l = Line::new();
        l.str(PREFIX).str("error: ").str(what).str(": errno ").num(err.unsigned_abs()).str("\n");
        print(l.bytes());
        exit(1)
    }

    fn exit(code: u64) -> ! {
        syscall(SYS_EXIT_GROUP, code, 0, 0, 0);
        loop {
            core::hint::spin_loop();
        }
    }

    fn now_ns() -> u64 {
        let mut ts = [0u64; 2];
        let r = syscall(SYS_CLOCK_GETTIME, CLOCK_MONOTONIC, ts.as_mut_ptr() as u64, 0, 0);
        if r < 0 {
            fail("clock_gettime", r);
        }
        ts[0] * 1_000_000_000 + ts[1]
    }

    /// The NUL-terminated string at `p` (an argv entry the kernel placed on the stack).
    fn c_str(p: *const u8) -> &'static [u8] {
        let mut n = 0;
        // SAFETY: the kernel copied each argv string, NUL-terminated, onto the new process's
        // stack, which lives as long as the process; reading up to the NUL stays inside it.
        unsafe {
            while *p.add(n) != 0 {
                n += 1;
            }
            core::slice::from_raw_parts(p, n)
        }
    }

    extern "C" fn start(sp: *const u64) -> ! {
        // SAFETY: `sp` is the initial stack pointer: argc, then argc argv pointers.
        let argc = unsafe { *sp };
        // SAFETY: as above; index 1 + i < 1 + argc.
        let arg = |i: u64| (i < argc).then(|| c_str(unsafe { *sp.add(1 + i as usize) } as *const u8));
        let ms = arg(1).and_then(parse_u64).unwrap_or(2000);
        let mut path = [0u8; 64];
        let dev = arg(2).unwrap_or(b"/dev/vda");
        let n = dev.len().min(path.len() - 1);
        path[..n].copy_from_slice(&dev[..n]);

        let fd = syscall(SYS_OPEN, path.as_ptr() as u64, O_RDWR | O_DIRECT | O_CLOEXEC, 0, 0);
        if fd < 0 {
            fail("open", fd);
        }
        let fd = fd as u64;
        // The size: a block device's end is its capacity (a file's works too, for a try on
        // the host).
        let size = syscall(SYS_LSEEK, fd, 0, SEEK_END, 0);
        if size < 0 {
            fail("lseek", size);
        }
        let size = size as u64;
        // SAFETY: this single-threaded program touches BUFFER only here and through the
        // pointer below, never at the same time.
        let buf = unsafe { core::slice::from_raw_parts_mut((&raw mut BUFFER).cast::<u8>(), MAX_BLOCK) };
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i as u8) ^ 0x5a;
        }
        let buf = buf.as_mut_ptr() as u64;
        for w in WORKLOADS {
            let Some(offsets) = Offsets::new(&w, size) else { fail("the device is too small", 0) };
            print(mark_line(true, w.name).bytes());
            let call = if w.write { SYS_PWRITE64 } else { SYS_PREAD64 };
            let t0 = now_ns();
            let deadline = t0 + ms * 1_000_000;
            let mut ops = 0u64;
            let mut t = t0;
            for off in offsets {
                let r = syscall(call, fd, buf, w.block as u64, off);
                if r != w.block as i64 {
                    fail(if w.write { "pwrite" } else { "pread" }, r);
                }
                ops += 1;
                if ops.is_multiple_of(8) {
                    t = now_ns();
                    if t >= deadline {
                        break;
                    }
                }
            }
            print(mark_line(false, w.name).bytes());
            print(result_line(w.name, ops, ops * w.block as u64, t - t0).bytes());
        }
        exit(0)
    }

    #[panic_handler]
    fn panic(_: &core::panic::PanicInfo) -> ! {
        print(b"linux-io: error: panic\n");
        exit(2)
    }
}

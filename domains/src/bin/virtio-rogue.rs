//! A hostile guest for the real VMM (`vmm/src/bin/vmm/`): booted as a VM's `kernel` (a PVH
//! ELF like Linux's `vmlinux`), it finds the VMM's virtio-blk and virtio-net functions on
//! PCI bus 0 (configuration mechanism #1), drives them as a virtio 1.1 driver would, and then
//! posts garbage to their virtqueues: buffers outside its RAM, in the MMIO hole, in the
//! VMM's own view of it, in the local APIC; huge lengths, overflowing addresses, chain
//! loops, indices outside the table, available-index jumps, rings in the MMIO hole or
//! unaligned, bad indirect tables, writable and readable parts swapped, sectors past the
//! disk. After each attack it looks at what the device did (used ring, status byte, device
//! status) and prints one line: `attack <name>: contained: <how>` or `attack <name>: NOT
//! CONTAINED: <what>`. Then it resets each device, drives it correctly (a sector written and
//! read back through the disk driver VM; an ARP request answered through the net driver VM)
//! and powers the VM off (ACPI S5).
//!
//! It runs without interrupts (its queues have no MSI-X vector; it polls) and talks only to
//! its serial port, so everything it does is an exit to its VMM or a write to its own RAM.
//! Why not Linux with a tool poking the rings: a purpose-built guest boots in milliseconds,
//! needs no kernel module or `/dev/mem`, and each attack is one deterministic request whose
//! outcome it can check exactly.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
mod vm {
    use core::arch::asm;
    use core::fmt::Write;

    use domain_rt::BootInfo;

    domain_rt::domain_main!(main);

    /// The VMM's UART (COM1) transmit register and its ACPI sleep control register.
    const COM1: u16 = 0x3f8;
    const SLEEP_CONTROL: u16 = 0x600;
    const S5: u8 = 0x20 | (5 << 2);

    /// Queue size the driver asks for.
    const QS: u16 = 16;
    /// Device status bits (virtio 1.1 §2.1).
    const ACKNOWLEDGE: u8 = 1;
    const DRIVER: u8 = 2;
    const DRIVER_OK: u8 = 4;
    const FEATURES_OK: u8 = 8;
    const NEEDS_RESET: u8 = 0x40;
    /// Descriptor flags (§2.6.5).
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    /// Feature bits: VERSION_1 (32) and INDIRECT_DESC (28).
    const FEATURES: u64 = 1 << 32 | 1 << 28;

    /// Addresses no buffer of this guest may name: past its RAM, its own BAR in the MMIO
    /// hole, where the VMM maps this VM's RAM in its own address space, the local APIC.
    const OUTSIDE_RAM: u64 = 0x1_0000_0000;
    const VMM_VIEW: u64 = 0xa000_0000;
    const LAPIC: u64 = 0xfee0_0000;

    /// The guest's rings and buffers (identity-mapped: virtual = guest-physical).
    #[repr(C, align(4096))]
    struct Arena([u8; ARENA]);
    const ARENA: usize = 0x40000;
    static mut MEM: Arena = Arena([0; ARENA]);

    fn base() -> u64 {
        (&raw mut MEM) as u64
    }

    struct Uart;
    impl Write for Uart {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            for b in s.bytes() {
                out8(COM1, b);
            }
            Ok(())
        }
    }
    macro_rules! say {
        ($($t:tt)*) => {{ let _ = writeln!(Uart, $($t)*); }};
    }

    fn out8(port: u16, v: u8) {
        // SAFETY: port I/O in a VM only exits to its VMM.
        unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) };
    }
    fn out32(port: u16, v: u32) {
        // SAFETY: as above.
        unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack)) };
    }
    fn in32(port: u16) -> u32 {
        let v: u32;
        // SAFETY: as above.
        unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack)) };
        v
    }

    // MMIO to the BAR: explicit instructions the VMM's decoder knows; each access exits.
    fn mw8(a: u64, v: u8) {
        // SAFETY: `a` is in a virtio BAR outside RAM: the store exits to the VMM.
        unsafe { asm!("mov byte ptr [rdi], sil", in("rdi") a, in("sil") v, options(nostack)) };
    }
    fn mw16(a: u64, v: u16) {
        // SAFETY: as above.
        unsafe { asm!("mov word ptr [rdi], si", in("rdi") a, in("si") v, options(nostack)) };
    }
    fn mw32(a: u64, v: u32) {
        // SAFETY: as above.
        unsafe { asm!("mov dword ptr [rdi], esi", in("rdi") a, in("esi") v, options(nostack)) };
    }
    fn mr32(a: u64) -> u32 {
        let v: u64;
        // SAFETY: as above; a 32-bit load zero-extends RAX.
        unsafe { asm!("mov eax, dword ptr [rdi]", in("rdi") a, out("rax") v, options(nostack)) };
        v as u32
    }
    fn mr8(a: u64) -> u8 {
        (mr32(a & !3) >> ((a & 3) * 8)) as u8
    }
    fn mr16(a: u64) -> u16 {
        (mr32(a & !3) >> ((a & 2) * 8)) as u16
    }

    // This guest's own RAM (inside MEM).
    fn w16(a: u64, v: u16) {
        // SAFETY: `a` is inside MEM (callers compute it from `base()`), this guest's own RAM.
        unsafe { (a as *mut u16).write_volatile(v) }
    }
    fn w32(a: u64, v: u32) {
        // SAFETY: as above.
        unsafe { (a as *mut u32).write_volatile(v) }
    }
    fn w64(a: u64, v: u64) {
        // SAFETY: as above.
        unsafe { (a as *mut u64).write_volatile(v) }
    }
    fn r8(a: u64) -> u8 {
        // SAFETY: as above.
        unsafe { (a as *const u8).read_volatile() }
    }
    fn r16(a: u64) -> u16 {
        // SAFETY: as above.
        unsafe { (a as *const u16).read_volatile() }
    }
    fn fill(a: u64, len: usize, v: u8) {
        for i in 0..len as u64 {
            // SAFETY: as above.
            unsafe { ((a + i) as *mut u8).write_volatile(v) }
        }
    }

    fn cfg_addr(slot: u8, off: u8) -> u32 {
        0x8000_0000 | u32::from(slot) << 11 | u32::from(off & 0xfc)
    }
    fn cfg_read(slot: u8, off: u8) -> u32 {
        out32(0xcf8, cfg_addr(slot, off));
        in32(0xcfc)
    }
    fn cfg_write(slot: u8, off: u8, v: u32) {
        out32(0xcf8, cfg_addr(slot, off));
        out32(0xcfc, v);
    }

    /// One virtio-pci function as found through its capabilities.
    #[derive(Clone, Copy)]
    struct Dev {
        name: &'static str,
        /// Where this device's rings start in MEM (each device has its own).
        rings: u64,
        common: u64,
        notify: u64,
        notify_mul: u64,
        device_cfg: u64,
    }

    fn find(device_id: u32, name: &'static str, rings: u64) -> Option<Dev> {
        let slot = (0..32u8).find(|&s| cfg_read(s, 0) == (device_id << 16 | 0x1af4))?;
        let lo = cfg_read(slot, 0x10);
        let bar = u64::from(lo & !0xf) | if lo & 6 == 4 { u64::from(cfg_read(slot, 0x14)) << 32 } else { 0 };
        // Memory decoding and bus mastering on (the status half of the dword is read-only).
        cfg_write(slot, 4, (cfg_read(slot, 4) & 0xffff) | 6);
        let mut d = Dev { name, rings, common: 0, notify: 0, notify_mul: 0, device_cfg: 0 };
        let mut p = (cfg_read(slot, 0x34) & 0xff) as u8;
        for _ in 0..48 {
            if p == 0 {
                break;
            }
            let head = cfg_read(slot, p);
            if head & 0xff == 9 {
                let kind = (head >> 24) as u8;
                let off = u64::from(cfg_read(slot, p + 8));
                match kind {
                    1 => d.common = bar + off,
                    2 => {
                        d.notify = bar + off;
                        d.notify_mul = u64::from(cfg_read(slot, p + 16));
                    }
                    4 => d.device_cfg = bar + off,
                    _ => {}
                }
            }
            p = ((head >> 8) & 0xff) as u8;
        }
        say!("virtio-rogue: {name} at 00:{slot:02x}.0, BAR 0 at {bar:#x}");
        (d.common != 0 && d.notify != 0).then_some(d)
    }

    /// Where queue `q` of `d` has its rings in a well-behaved setup.
    fn desc(d: &Dev, q: u16) -> u64 {
        d.rings + u64::from(q) * 0x4000
    }
    fn avail(d: &Dev, q: u16) -> u64 {
        desc(d, q) + 0x1000
    }
    fn used(d: &Dev, q: u16) -> u64 {
        desc(d, q) + 0x2000
    }
    /// Buffers: 64 KiB after the rings of both devices.
    fn buf(i: u64) -> u64 {
        base() + 0x10000 + i * 0x1000
    }

    #[derive(Clone, Copy)]
    struct Rings {
        desc: u64,
        avail: u64,
        used: u64,
        size: u16,
    }

    impl Rings {
        fn good(d: &Dev, q: u16) -> Self {
            Self { desc: desc(d, q), avail: avail(d, q), used: used(d, q), size: QS }
        }
    }

    fn status(d: &Dev) -> u8 {
        mr8(d.common + 0x14)
    }

    /// Reset, negotiate, set the queues up (`rings[q]`) and set DRIVER_OK; the status read back.
    fn setup(d: &Dev, rings: &[Rings]) -> u8 {
        mw8(d.common + 0x14, 0);
        for (q, r) in rings.iter().enumerate() {
            let q = q as u16;
            // Fresh rings in this guest's memory (only when they are ours).
            if r.desc == desc(d, q) {
                fill(desc(d, q), 0x3000, 0);
            }
        }
        mw8(d.common + 0x14, ACKNOWLEDGE);
        mw8(d.common + 0x14, ACKNOWLEDGE | DRIVER);
        mw32(d.common, 0);
        let offered = u64::from(mr32(d.common + 4));
        mw32(d.common, 1);
        let offered = offered | u64::from(mr32(d.common + 4)) << 32;
        let want = offered & FEATURES;
        mw32(d.common + 8, 0);
        mw32(d.common + 0xc, want as u32);
        mw32(d.common + 8, 1);
        mw32(d.common + 0xc, (want >> 32) as u32);
        mw8(d.common + 0x14, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        for (q, r) in rings.iter().enumerate() {
            mw16(d.common + 0x16, q as u16);
            mw16(d.common + 0x18, r.size);
            mw16(d.common + 0x1a, 0xffff);
            for (off, a) in [(0x20, r.desc), (0x28, r.avail), (0x30, r.used)] {
                mw32(d.common + off, a as u32);
                mw32(d.common + off + 4, (a >> 32) as u32);
            }
            mw16(d.common + 0x1c, 1);
        }
        mw8(d.common + 0x14, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        status(d)
    }

    fn notify(d: &Dev, q: u16) {
        mw16(d.common + 0x16, q);
        let off = u64::from(mr16(d.common + 0x1e));
        mw16(d.notify + off * d.notify_mul, q);
    }

    fn set_desc(d: &Dev, q: u16, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = desc(d, q) + u64::from(i) * 16;
        w64(at, addr);
        w32(at + 8, len);
        w16(at + 12, flags);
        w16(at + 14, next);
    }

    /// Puts `head` on queue `q`'s available ring (advancing its index by `bump`) and notifies;
    /// returns the used index from before the notify, for [`watch`] (the request may well be
    /// complete when the notify's exit returns: the VMM and the driver VMs outrank this VM).
    fn post(d: &Dev, q: u16, head: u16, bump: u16) -> u16 {
        let idx = r16(avail(d, q) + 2);
        w16(avail(d, q) + 4 + 2 * u64::from(idx % QS), head);
        w16(avail(d, q) + 2, idx.wrapping_add(bump));
        let before = r16(used(d, q) + 2);
        notify(d, q);
        before
    }

    /// What the device did with what was posted: polls (each status read is an exit, so the
    /// VMM runs its devices and the driver VMs get the CPU) until a used entry or
    /// DEVICE_NEEDS_RESET, at most `tries` times.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Seen {
        NeedsReset,
        Used { len: u32 },
        Nothing,
    }

    fn watch(d: &Dev, q: u16, before: u16, tries: u32) -> Seen {
        for _ in 0..tries {
            if status(d) & NEEDS_RESET != 0 {
                return Seen::NeedsReset;
            }
            let now = r16(used(d, q) + 2);
            if now != before {
                let e = used(d, q) + 4 + 8 * u64::from(before % QS);
                // SAFETY: inside MEM.
                let len = unsafe { ((e + 4) as *const u32).read_volatile() };
                return Seen::Used { len };
            }
            core::hint::spin_loop();
        }
        Seen::Nothing
    }

    struct Tally {
        attacks: u32,
        escaped: u32,
    }

    impl Tally {
        fn report(&mut self, d: &Dev, name: &str, contained: Result<&str, &str>) {
            self.attacks += 1;
            match contained {
                Ok(how) => say!("attack {}/{name}: contained: {how}", d.name),
                Err(what) => {
                    self.escaped += 1;
                    say!("attack {}/{name}: NOT CONTAINED: {what}", d.name);
                }
            }
        }
    }

    const TRIES: u32 = 400;

    /// A block request whose outcome must be an error: IOERR/UNSUPP in the status byte, a
    /// used entry without status, or the device stopping (DEVICE_NEEDS_RESET).
    fn blk_judge(d: &Dev, before: u16, status_at: u64) -> Result<&'static str, &'static str> {
        match watch(d, 0, before, TRIES) {
            Seen::NeedsReset => Ok("DEVICE_NEEDS_RESET"),
            Seen::Nothing => Ok("request ignored"),
            Seen::Used { .. } => match r8(status_at) {
                1 => Ok("IOERR"),
                2 => Ok("UNSUPP"),
                0xee => Ok("completed without touching the status byte"),
                0 => Err("the request succeeded"),
                _ => Err("the status byte holds garbage"),
            },
        }
    }

    /// Header at buf(0), status byte at buf(1), data at buf(2..).
    fn blk_header(t: u32, sector: u64) {
        w32(buf(0), t);
        w32(buf(0) + 4, 0);
        w64(buf(0) + 8, sector);
        fill(buf(1), 1, 0xee);
    }

    /// A three-descriptor read or write of `len` bytes at `data`.
    fn blk_simple(d: &Dev, t: u32, sector: u64, data: u64, len: u32) -> Result<&'static str, &'static str> {
        setup(d, &[Rings::good(d, 0)]);
        blk_header(t, sector);
        let data_flags = if t == 0 { WRITE } else { 0 };
        set_desc(d, 0, 0, buf(0), 16, NEXT, 1);
        set_desc(d, 0, 1, data, len, NEXT | data_flags, 2);
        set_desc(d, 0, 2, buf(1), 1, WRITE, 0);
        let before = post(d, 0, 0, 1);
        blk_judge(d, before, buf(1))
    }

    fn attack_blk(d: &Dev, t: &mut Tally) {
        const IN: u32 = 0;
        const OUT: u32 = 1;
        for (name, ty, data) in [
            ("read into memory past RAM", IN, OUTSIDE_RAM),
            ("read into its own BAR (MMIO hole)", IN, 0xe000_0000),
            ("read into the VMM's view of its RAM", IN, VMM_VIEW),
            ("write from the VMM's view of its RAM", OUT, VMM_VIEW),
            ("read into the local APIC", IN, LAPIC),
        ] {
            let r = blk_simple(d, ty, 0, data, 512);
            t.report(d, name, r);
        }
        let r = blk_simple(d, IN, 0, buf(2), 0xffff_f000);
        t.report(d, "huge data length", r);
        let r = blk_simple(d, IN, 0, 0xffff_ffff_ffff_f000, 0x2000);
        t.report(d, "address + length overflows", r);
        let r = blk_simple(d, OUT, 0, buf(2), 256 << 10);
        t.report(d, "write longer than the back end takes", r);
        let r = blk_simple(d, IN, u64::MAX - 1, buf(2), 512);
        t.report(d, "sector past the disk", r);
        let r = blk_simple(d, 77, 0, buf(2), 512);
        t.report(d, "unknown request type", r);

        // Chains: a loop, a `next` outside the table, readable after writable, no status.
        setup(d, &[Rings::good(d, 0)]);
        blk_header(IN, 0);
        set_desc(d, 0, 0, buf(0), 16, NEXT, 1);
        set_desc(d, 0, 1, buf(2), 512, NEXT | WRITE, 0);
        let before = post(d, 0, 0, 1);
        let r = blk_judge(d, before, buf(1));
        t.report(d, "chain loop", r);

        setup(d, &[Rings::good(d, 0)]);
        blk_header(IN, 0);
        set_desc(d, 0, 0, buf(0), 16, NEXT, 200);
        let before = post(d, 0, 0, 1);
        let r = blk_judge(d, before, buf(1));
        t.report(d, "next index outside the table", r);

        setup(d, &[Rings::good(d, 0)]);
        blk_header(OUT, 0);
        set_desc(d, 0, 0, buf(1), 1, NEXT | WRITE, 1);
        set_desc(d, 0, 1, buf(0), 16, NEXT, 2);
        set_desc(d, 0, 2, buf(2), 512, 0, 0);
        let before = post(d, 0, 0, 1);
        let r = blk_judge(d, before, buf(1));
        t.report(d, "readable after writable", r);

        setup(d, &[Rings::good(d, 0)]);
        blk_header(IN, 0);
        set_desc(d, 0, 0, buf(0), 16, NEXT, 1);
        set_desc(d, 0, 1, buf(2), 512, NEXT | WRITE, 2);
        set_desc(d, 0, 2, buf(1), 1, 0, 0);
        let before = post(d, 0, 0, 1);
        let r = blk_judge(d, before, buf(1));
        t.report(d, "read-only status byte", r);

        setup(d, &[Rings::good(d, 0)]);
        blk_header(IN, 0);
        set_desc(d, 0, 0, buf(0), 4, NEXT, 1);
        set_desc(d, 0, 1, buf(1), 1, WRITE, 0);
        let before = post(d, 0, 0, 1);
        let r = blk_judge(d, before, buf(1));
        t.report(d, "short header", r);

        // The available ring: a head outside the table, an index far ahead.
        setup(d, &[Rings::good(d, 0)]);
        let before = post(d, 0, 0xffff, 1);
        let r = blk_judge(d, before, buf(1));
        t.report(d, "head index outside the table", r);

        setup(d, &[Rings::good(d, 0)]);
        blk_header(IN, 0);
        set_desc(d, 0, 0, buf(0), 16, NEXT, 1);
        set_desc(d, 0, 1, buf(1), 1, WRITE, 0);
        let before = post(d, 0, 0, 0x8000);
        let r = blk_judge(d, before, buf(1));
        t.report(d, "available index jumps 32768 ahead", r);

        // Indirect tables: a bad length, outside RAM, nested.
        for (name, table, len, nested) in [
            ("indirect table of 24 bytes", buf(3), 24, false),
            ("indirect table past RAM", OUTSIDE_RAM, 48, false),
            ("indirect table in the MMIO hole", 0xe000_0000, 48, false),
            ("nested indirect table", buf(3), 48, true),
        ] {
            setup(d, &[Rings::good(d, 0)]);
            blk_header(IN, 0);
            let tab = buf(3);
            for (i, (a, l, f)) in
                [(buf(0), 16u32, NEXT), (buf(2), 512, NEXT | WRITE), (buf(1), 1, WRITE)].into_iter().enumerate()
            {
                let at = tab + i as u64 * 16;
                w64(at, if nested && i == 1 { buf(4) } else { a });
                w32(at + 8, if nested && i == 1 { 48 } else { l });
                w16(at + 12, if nested && i == 1 { INDIRECT } else { f });
                w16(at + 14, i as u16 + 1);
            }
            set_desc(d, 0, 0, table, len, INDIRECT, 0);
            let before = post(d, 0, 0, 1);
            let r = blk_judge(d, before, buf(1));
            t.report(d, name, r);
        }

        // The rings themselves: outside RAM, in the MMIO hole, unaligned, a bad size. The
        // device must refuse the queue (DEVICE_NEEDS_RESET at queue_enable or DRIVER_OK) or
        // fail on first use, never write there.
        let g = Rings::good(d, 0);
        for (name, rings) in [
            ("descriptor table past RAM", Rings { desc: OUTSIDE_RAM, ..g }),
            ("used ring in the MMIO hole", Rings { used: 0xe000_0000, ..g }),
            ("used ring in the VMM's view", Rings { used: VMM_VIEW, ..g }),
            ("available ring unaligned", Rings { avail: g.avail + 1, ..g }),
            ("queue size 3", Rings { size: 3, ..g }),
        ] {
            let s = setup(d, &[rings]);
            let r = if s & NEEDS_RESET != 0 {
                Ok("DEVICE_NEEDS_RESET at setup")
            } else {
                blk_header(IN, 0);
                set_desc(d, 0, 0, buf(0), 16, NEXT, 1);
                set_desc(d, 0, 1, buf(2), 512, NEXT | WRITE, 2);
                set_desc(d, 0, 2, buf(1), 1, WRITE, 0);
                let before = if rings.avail == g.avail {
                    post(d, 0, 0, 1)
                } else {
                    notify(d, 0);
                    0
                };
                match watch(d, 0, before, TRIES) {
                    Seen::NeedsReset => Ok("DEVICE_NEEDS_RESET on use"),
                    Seen::Nothing => Ok("nothing done"),
                    Seen::Used { .. } if rings.used == g.used && r8(buf(1)) != 0 => Ok("IOERR"),
                    Seen::Used { .. } => Err("the device used the queue"),
                }
            };
            t.report(d, name, r);
        }

        // A notify for a queue that does not exist.
        setup(d, &[Rings::good(d, 0)]);
        notify(d, 9);
        let r = if status(d) & NEEDS_RESET == 0 { Ok("ignored") } else { Ok("DEVICE_NEEDS_RESET") };
        t.report(d, "notify of queue 9", r);
    }

    fn attack_net(d: &Dev, t: &mut Tally) {
        let rx_tx = [Rings::good(d, 0), Rings::good(d, 1)];
        let tx = |data: u64, len: u32, flags: u16, next: u16| {
            setup(d, &rx_tx);
            set_desc(d, 1, 0, data, len, flags, next);
            let before = post(d, 1, 0, 1);
            match watch(d, 1, before, TRIES) {
                Seen::NeedsReset => Ok("DEVICE_NEEDS_RESET"),
                Seen::Nothing => Ok("frame not taken"),
                Seen::Used { .. } => Ok("buffer returned (the VMM counts what it dropped)"),
            }
        };
        fill(buf(2), 12, 0);
        let r = tx(OUTSIDE_RAM, 60, 0, 0);
        t.report(d, "frame past RAM", r);
        let r = tx(0xe000_8000, 60, 0, 0);
        t.report(d, "frame in the MMIO hole", r);
        let r = tx(VMM_VIEW, 1500, 0, 0);
        t.report(d, "frame in the VMM's view", r);
        let r = tx(buf(2), 0xffff_0000, 0, 0);
        t.report(d, "huge frame", r);
        let r = tx(buf(2), 60, NEXT, 0);
        t.report(d, "chain loop", r);
        let r = tx(buf(2), 60, WRITE, 0);
        t.report(d, "writable transmit buffer", r);
        // A header asking for GSO (no offload was negotiated).
        w32(buf(2), 0);
        w16(buf(2), 1 << 8); // gso_type TCPv4
        let r = tx(buf(2), 80, 0, 0);
        t.report(d, "GSO without the feature", r);

        setup(d, &rx_tx);
        let before = post(d, 1, 0, 0x9000);
        let r = match watch(d, 1, before, TRIES) {
            Seen::NeedsReset => Ok("DEVICE_NEEDS_RESET"),
            _ => Err("the device went on"),
        };
        t.report(d, "transmit available index jumps", r);

        // Receive buffers nobody may write, then a real ARP request so frames arrive.
        setup(d, &rx_tx);
        set_desc(d, 0, 0, 0xe000_0000, 2048, WRITE, 0);
        set_desc(d, 0, 1, buf(5), 2048, 0, 0);
        set_desc(d, 0, 2, VMM_VIEW, 2048, WRITE, 0);
        for h in 0..3 {
            let _ = post(d, 0, h, 1);
        }
        arp(d, 4);
        let r = match watch(d, 0, 0, TRIES * 4) {
            Seen::NeedsReset => Ok("DEVICE_NEEDS_RESET"),
            Seen::Nothing => Ok("no frame delivered"),
            Seen::Used { len: 0 } => Ok("buffers returned empty"),
            Seen::Used { .. } => Err("a frame was delivered into a forbidden buffer"),
        };
        t.report(d, "receive buffers in the MMIO hole, read-only, in the VMM's view", r);
    }

    /// Sends an ARP request for the gateway (10.0.2.2) from this device's MAC, sender
    /// address 0.0.0.0 (as the net driver VM's probe does), from buf(`at`) on queue 1.
    fn arp(d: &Dev, at: u64) {
        let mut mac = [0u8; 6];
        for (i, m) in mac.iter_mut().enumerate() {
            *m = mr8(d.device_cfg + i as u64);
        }
        let mut f = [0u8; 12 + 42];
        let e = &mut f[12..];
        e[..6].copy_from_slice(&[0xff; 6]);
        e[6..12].copy_from_slice(&mac);
        e[12..14].copy_from_slice(&[0x08, 0x06]);
        e[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        e[22..28].copy_from_slice(&mac);
        e[38..42].copy_from_slice(&[10, 0, 2, 2]);
        for (i, b) in f.iter().enumerate() {
            // SAFETY: inside MEM.
            unsafe { ((buf(at) + i as u64) as *mut u8).write_volatile(*b) }
        }
        let head = 5;
        set_desc(d, 1, head, buf(at), f.len() as u32, 0, 0);
        let _ = post(d, 1, head, 1);
    }

    /// After the attacks: the disk still serves (a sector written and read back).
    fn blk_works(d: &Dev, sector: u64) -> bool {
        if setup(d, &[Rings::good(d, 0)]) & NEEDS_RESET != 0 {
            return false;
        }
        let pattern = |i: u64| (i.wrapping_mul(31) ^ sector) as u8;
        for i in 0..512 {
            // SAFETY: inside MEM.
            unsafe { ((buf(2) + i) as *mut u8).write_volatile(pattern(i)) }
        }
        for (n, ty, data) in [(0u16, 1u32, buf(2)), (3, 0, buf(6))] {
            blk_header(ty, sector);
            fill(buf(6), 512, 0);
            set_desc(d, 0, n, buf(0), 16, NEXT, n + 1);
            set_desc(d, 0, n + 1, data, 512, NEXT | if ty == 0 { WRITE } else { 0 }, n + 2);
            set_desc(d, 0, n + 2, buf(1), 1, WRITE, 0);
            let before = post(d, 0, n, 1);
            if !matches!(watch(d, 0, before, TRIES * 50), Seen::Used { .. }) || r8(buf(1)) != 0 {
                say!("virtio-rogue: request type {ty} after the attacks: status {:#x}", r8(buf(1)));
                return false;
            }
        }
        (0..512).all(|i| r8(buf(6) + i) == pattern(i))
    }

    /// After the attacks: the network still serves (an ARP reply from the gateway).
    fn net_works(d: &Dev) -> bool {
        if setup(d, &[Rings::good(d, 0), Rings::good(d, 1)]) & NEEDS_RESET != 0 {
            return false;
        }
        for h in 0..8u16 {
            fill(buf(8 + u64::from(h)), 2048, 0);
            set_desc(d, 0, h, buf(8 + u64::from(h)), 2048, WRITE, 0);
            let _ = post(d, 0, h, 1);
        }
        for attempt in 0..5 {
            let seen = r16(used(d, 0) + 2);
            arp(d, 4 + attempt % 2);
            for _ in 0..TRIES * 10 {
                let now = r16(used(d, 0) + 2);
                for k in seen..now {
                    let e = used(d, 0) + 4 + 8 * u64::from(k % QS);
                    // SAFETY: inside MEM.
                    let id = unsafe { (e as *const u32).read_volatile() } as u64;
                    let frame = buf(8 + (id % 8)) + 12;
                    // An ARP reply (opcode 2) from 10.0.2.2.
                    if r8(frame + 12) == 8 && r8(frame + 13) == 6 && r8(frame + 21) == 2 && r8(frame + 31) == 2 {
                        return true;
                    }
                }
                if status(d) & NEEDS_RESET != 0 {
                    return false;
                }
            }
        }
        false
    }

    fn main(info: &BootInfo) -> u64 {
        say!("virtio-rogue: started");
        let mut t = Tally { attacks: 0, escaped: 0 };
        let sector = info.arg("sector").and_then(|s| s.parse().ok()).unwrap_or(100_000);
        let blk = find(0x1042, "virtio-blk", base());
        let net = find(0x1041, "virtio-net", base() + 0x8000);
        if let Some(d) = &blk {
            attack_blk(d, &mut t);
        }
        if let Some(d) = &net {
            attack_net(d, &mut t);
        }
        say!("virtio-rogue: {} attacks, {} not contained", t.attacks, t.escaped);
        if let Some(d) = &blk {
            let ok = blk_works(d, sector);
            say!(
                "virtio-rogue: virtio-blk after the attacks: {}",
                if ok { "serves (sector written and read back)" } else { "FAILED" }
            );
        }
        if let Some(d) = &net {
            let ok = net_works(d);
            say!(
                "virtio-rogue: virtio-net after the attacks: {}",
                if ok { "serves (ARP reply from 10.0.2.2)" } else { "FAILED" }
            );
        }
        say!("virtio-rogue: done, powering off");
        out8(SLEEP_CONTROL, S5);
        loop {
            // SAFETY: HLT only waits (the VMM has stopped the VM by now).
            unsafe { asm!("cli; hlt", options(nomem, nostack)) };
        }
    }
}

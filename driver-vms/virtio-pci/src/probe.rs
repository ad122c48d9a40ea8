//! Configuration access for bringing up a virtio transport ([`crate::open`]) with as few
//! hypercalls as the answers allow. virtio-drivers' probe sizes the BAR of each of the four
//! regions it needs (QEMU puts all four in one 64-bit BAR: four times nine accesses) and
//! reads the command register before each sizing; every access is a hypercall, a world
//! switch (under TCG on a loaded host about 100 µs of wall time), and a restarted driver VM
//! has a guest waiting meanwhile.
//!
//! The microvisor emulates BAR writes (a BAR never moves; `microvisor::pci::filter_write`):
//! writing all ones makes the BAR read as its size mask until any other value is written,
//! and nothing reaches the device. So once a BAR's mask was read through the microvisor,
//! sizing it again is answered here, exactly as the microvisor would. The rest of what the
//! probe reads is read once: ids, the capability list (read-only), and the command register,
//! kept up to date with this driver's own writes (of its status half the probe looks only at
//! the capability-list bit, which does not change). Used for the probe only: afterwards
//! the plain [`HypercallConfig`](crate::HypercallConfig) reads the hardware every time.

use alloc::rc::Rc;
use core::cell::RefCell;

use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction};

/// The BAR registers (0x10..0x28): which BAR an offset is, if one.
fn bar_index(offset: u8) -> Option<usize> {
    (0x10..0x28).contains(&offset).then(|| usize::from((offset - 0x10) / 4))
}

const COMMAND_DWORD: usize = 1;

struct State {
    /// Dwords of the configuration header and capability area read so far.
    dwords: [Option<u32>; 64],
    /// Each BAR's size mask, as the microvisor showed it while the BAR was sized.
    masks: [Option<u32>; 6],
    /// BARs being sized here (their mask known): they read as their mask.
    local: u8,
    /// BARs being sized through the microvisor (their mask not known yet).
    remote: u8,
}

/// A [`ConfigurationAccess`] for one function that answers repeated reads and BAR sizings
/// itself (see the module's documentation).
pub struct ProbeConfig<C> {
    inner: C,
    function: DeviceFunction,
    state: Rc<RefCell<State>>,
}

impl<C: ConfigurationAccess> ProbeConfig<C> {
    /// Probe `function` through `inner`.
    pub fn new(inner: C, function: DeviceFunction) -> Self {
        let state = State { dwords: [None; 64], masks: [None; 6], local: 0, remote: 0 };
        Self { inner, function, state: Rc::new(RefCell::new(state)) }
    }
}

impl<C: ConfigurationAccess> ConfigurationAccess for ProbeConfig<C> {
    fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
        if df != self.function {
            return self.inner.read_word(df, offset);
        }
        let mut s = self.state.borrow_mut();
        if let Some(bar) = bar_index(offset) {
            let bit = 1u8 << bar;
            if s.local & bit != 0 {
                if let Some(mask) = s.masks[bar] {
                    return mask;
                }
            }
            if s.remote & bit != 0 {
                let mask = self.inner.read_word(df, offset);
                s.masks[bar] = Some(mask);
                return mask;
            }
        }
        let i = usize::from(offset / 4);
        if let Some(v) = s.dwords[i] {
            return v;
        }
        let v = self.inner.read_word(df, offset);
        s.dwords[i] = Some(v);
        v
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
        if df != self.function {
            self.inner.write_word(df, offset, data);
            return;
        }
        let mut s = self.state.borrow_mut();
        if let Some(bar) = bar_index(offset) {
            let bit = 1u8 << bar;
            if data == u32::MAX {
                if s.masks[bar].is_some() {
                    s.local |= bit;
                } else {
                    s.remote |= bit;
                    self.inner.write_word(df, offset, data);
                }
            } else {
                // Any other value ends a sizing; the BAR itself keeps its address.
                s.local &= !bit;
                if s.remote & bit != 0 {
                    s.remote &= !bit;
                    self.inner.write_word(df, offset, data);
                }
            }
            return;
        }
        self.inner.write_word(df, offset, data);
        let i = usize::from(offset / 4);
        s.dwords[i] = match (i, s.dwords[i]) {
            // Our view of the command register follows our writes.
            (COMMAND_DWORD, Some(v)) => Some((v & 0xffff_0000) | (data & 0xffff)),
            _ => None,
        };
    }

    unsafe fn unsafe_clone(&self) -> Self {
        // SAFETY: per the trait's contract the caller uses the clone only as the original
        // could be used; the state is shared, so both see the same sizings.
        Self { inner: unsafe { self.inner.unsafe_clone() }, function: self.function, state: self.state.clone() }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use core::cell::Cell;
    use std::vec::Vec;
    use virtio_drivers::transport::pci::bus::{BarInfo, Command, PciRoot};

    const F: DeviceFunction = DeviceFunction { bus: 0, device: 1, function: 0 };

    /// What the fake microvisor holds, shared with the test: the function's registers, the
    /// BARs being sized, and the accesses (hypercalls) counted.
    struct Shared {
        regs: RefCell<[u32; 64]>,
        sizing: Cell<u8>,
        calls: Cell<u32>,
    }

    /// A function as the microvisor shows it: BAR writes emulated (all ones: the next reads
    /// give the size mask; anything else ends the sizing), the command register written
    /// through, everything else read-only.
    struct Microvisor(Rc<Shared>);

    const MASKS: [u32; 6] = [0xffff_f000, 0, 0, 0, 0xffff_c00c, 0xffff_ffff];

    fn microvisor() -> (Microvisor, Rc<Shared>) {
        let shared = Rc::new(Shared { regs: RefCell::new([0; 64]), sizing: Cell::new(0), calls: Cell::new(0) });
        {
            let mut regs = shared.regs.borrow_mut();
            regs[0] = 0x1042_1af4;
            regs[1] = 0x0010_0000; // status: capability list; command: nothing on
            regs[4] = 0xfebf_1000; // BAR0: 32-bit memory, 4 KiB
            regs[8] = 0xfe00_000c; // BAR4: 64-bit prefetchable memory, 16 KiB
            regs[13] = 0x40; // capabilities pointer
            regs[16] = 0x0000_5009; // a vendor capability, the last
        }
        (Microvisor(shared.clone()), shared)
    }

    impl ConfigurationAccess for Microvisor {
        fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
            assert_eq!(df, F);
            let s = &self.0;
            s.calls.set(s.calls.get() + 1);
            match bar_index(offset) {
                Some(b) if s.sizing.get() & (1 << b) != 0 => MASKS[b],
                _ => s.regs.borrow()[usize::from(offset / 4)],
            }
        }

        fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
            assert_eq!(df, F);
            let s = &self.0;
            s.calls.set(s.calls.get() + 1);
            match bar_index(offset) {
                Some(b) if data == u32::MAX => s.sizing.set(s.sizing.get() | 1 << b),
                Some(b) => s.sizing.set(s.sizing.get() & !(1 << b)),
                None if offset == 4 => {
                    let mut r = s.regs.borrow_mut();
                    r[1] = (r[1] & 0xffff_0000) | (data & 0xffff);
                }
                None => {}
            }
        }

        unsafe fn unsafe_clone(&self) -> Self {
            Microvisor(self.0.clone())
        }
    }

    fn probe<C: ConfigurationAccess>(root: &mut PciRoot<C>) -> Vec<Option<BarInfo>> {
        // What PciTransport::new does: each region's BAR sized (four regions in BAR4),
        // then decoding switched on.
        let mut out = Vec::new();
        for bar in [4, 4, 0, 4, 4] {
            out.push(root.bar_info(F, bar).unwrap());
        }
        root.set_command(F, Command::MEMORY_SPACE | Command::BUS_MASTER);
        out.push(root.bar_info(F, 4).unwrap()); // decoding on: switched off around the sizing
        out
    }

    #[test]
    fn the_probe_sees_what_the_microvisor_says_with_fewer_hypercalls() {
        let (m, direct) = microvisor();
        let plain = probe(&mut PciRoot::new(m));
        let (m, cached) = microvisor();
        let mut root = PciRoot::new(ProbeConfig::new(m, F));
        let answered = probe(&mut root);
        assert_eq!(std::format!("{plain:?}"), std::format!("{answered:?}"));
        assert!(std::format!("{plain:?}").contains("size: 16384"), "{plain:?}");
        assert!(
            cached.calls.get() * 2 < direct.calls.get(),
            "{} hypercalls instead of {}",
            cached.calls.get(),
            direct.calls.get()
        );
        // Every sizing ended: the microvisor shows the BARs' addresses again.
        assert_eq!(direct.sizing.get(), 0);
        assert_eq!(cached.sizing.get(), 0, "a sizing left open in the microvisor");
        let on = Command::MEMORY_SPACE | Command::BUS_MASTER;
        assert_eq!(cached.regs.borrow()[1] & 0xffff, u32::from(on.bits()));
        // And the command register reads as written.
        assert_eq!(root.get_status_command(F).1, on);
    }

    #[test]
    fn another_function_is_passed_on() {
        let (m, shared) = microvisor();
        let p = ProbeConfig::new(m, F);
        let other = DeviceFunction { bus: 0, device: 2, function: 0 };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.read_word(other, 0)));
        assert!(r.is_err(), "the fake refuses other functions: the read was passed on");
        assert_eq!(shared.calls.get(), 0);
    }
}

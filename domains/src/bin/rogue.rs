//! A hostile domain: it issues every hypercall with bad arguments (capability slots it does
//! not hold, addresses outside its RAM, absurd lengths, unknown numbers) and checks that
//! each one is refused with an error code. With `then=fault` it finally touches memory it
//! does not own, which must reach its fault handler (dom0) as a message.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
mod rogue {
    use domain_rt::hypercall::raw;
    use domain_rt::{println, BootInfo};
    use ipc_spec::hypercall::result_of;
    use ipc_spec::{Error, Hypercall};

    domain_rt::domain_main!(main);

    /// Calls that need no capability and may succeed.
    const HARMLESS: &[Hypercall] = &[Hypercall::Null, Hypercall::Yield, Hypercall::Clock];

    fn main(info: &BootInfo) -> u64 {
        // dom0 gives us one capability (our timer, in slot 0): every other slot is empty.
        let slots = [7u64, 63, 64, 1000, u64::MAX];
        let addresses = [0x8000_0000u64, 0xffff_ffff_f000, u64::MAX - 7, 0x1234];
        let mut refused = 0u64;
        let mut harmless = 0u64;
        let mut codes = [0u64; 16];
        for &h in Hypercall::ALL {
            if h == Hypercall::DomainExit {
                continue; // would simply stop us
            }
            for &slot in &slots {
                for &addr in &addresses {
                    let args = [addr, u64::MAX, addr, u64::MAX, 7, 0];
                    let r = raw(h.number(), slot, u64::MAX, args);
                    match result_of(r.rax) {
                        Ok(()) if HARMLESS.contains(&h) => harmless += 1,
                        Ok(()) => {
                            println!("FAILED: {h:?} with slot {slot:#x} and address {addr:#x} succeeded");
                            return 1;
                        }
                        Err(e) => {
                            refused += 1;
                            codes[(e.code() as usize).min(15)] += 1;
                        }
                    }
                }
            }
        }
        for number in [8u64, 7, 9, 27, 99, 0xdead, u64::MAX] {
            match result_of(raw(number, 0, 0, [0; 6]).rax) {
                Err(Error::UnknownHypercall) => refused += 1,
                other => {
                    println!("FAILED: hypercall number {number:#x} returned {other:?}");
                    return 1;
                }
            }
        }
        println!("{refused} bad hypercalls refused with error codes, {harmless} harmless ones succeeded");
        println!(
            "error codes seen (code: count): {:?}",
            codes.iter().enumerate().filter(|(_, &c)| c > 0).collect::<heapless_pairs::Pairs>()
        );
        println!("ready");
        if info.arg("then") == Some("fault") {
            println!("now touching guest-physical 0x80000000, outside my RAM");
            // SAFETY: deliberately faulting; the microvisor sends the fault to dom0.
            let v = unsafe { core::ptr::read_volatile(0x8000_0000 as *const u64) };
            println!("FAILED: read {v:#x} from memory I do not own");
            return 1;
        }
        0
    }

    mod heapless_pairs {
        /// Formats (code, count) pairs without a heap.
        pub struct Pairs([(usize, u64); 16], usize);

        impl<'a> FromIterator<(usize, &'a u64)> for Pairs {
            fn from_iter<I: IntoIterator<Item = (usize, &'a u64)>>(iter: I) -> Self {
                let mut p = Pairs([(0, 0); 16], 0);
                for (c, &n) in iter {
                    if p.1 < 16 {
                        p.0[p.1] = (c, n);
                        p.1 += 1;
                    }
                }
                p
            }
        }

        impl core::fmt::Debug for Pairs {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.debug_map().entries(self.0[..self.1].iter().map(|(c, n)| (c, n))).finish()
            }
        }
    }
}

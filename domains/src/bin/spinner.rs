//! A domain that never blocks: it reports ready and spins forever. The scheduler must still
//! give equal-priority domains their turns.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
mod spinner {
    use domain_rt::{println, BootInfo};

    domain_rt::domain_main!(main);

    fn main(_info: &BootInfo) -> u64 {
        println!("ready (spinning forever)");
        let mut n: u64 = 0;
        loop {
            n = n.wrapping_add(1);
            core::hint::black_box(n);
        }
    }
}

//! Link the program as a static, non-PIE Linux executable: Linux loads its segments where
//! the ELF says and jumps to `_start`; there is no dynamic loader to apply relocations.
fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    if target == "x86_64-unknown-none" {
        println!("cargo:rustc-link-arg-bins=--no-pie");
        println!("cargo:rustc-link-arg-bins=--entry=_start");
    }
}

//! Link the bare-metal domain image with the shared domain linker script.
fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    println!("cargo:rerun-if-changed={dir}/../domain-rt/link.ld");
    if target == "x86_64-unknown-none" {
        println!("cargo:rustc-link-arg-bins=-T{dir}/../domain-rt/link.ld");
        println!("cargo:rustc-link-arg-bins=--no-pie");
    }
}

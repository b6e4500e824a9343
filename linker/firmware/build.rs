//! Puts linker/memory.x (the mps2-an386 memory map) and linker/device.x
//! (its interrupt handlers' defaults) on the link path.
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let memory = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("dir"))
        .join("..")
        .join("memory.x");
    std::fs::copy(&memory, out.join("memory.x")).expect("copy memory.x");
    let device = memory.with_file_name("device.x");
    std::fs::copy(&device, out.join("device.x")).expect("copy device.x");
    println!("cargo:rerun-if-changed={}", device.display());
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed={}", memory.display());
    println!("cargo:rustc-link-arg=-Tlink.x");
    println!("cargo:rustc-link-arg=-Tdefmt.x");
}

//! Builds the CPU emulator: the kernel sources under kernels/ compiled by the host C++ compiler with
//! kernels/emu/cuda_emu.h force-included, plus the fiber scheduler. Optimised (-O2) even in debug builds so
//! the emulated kernel tests stay fast.
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let kernels = manifest.join("../../kernels");
    println!("cargo:rerun-if-changed={}", kernels.display());
    for dir in ["common", "gemv", "attention", "quant", "emu"] {
        println!("cargo:rerun-if-changed={}", kernels.join(dir).display());
        if let Ok(entries) = std::fs::read_dir(kernels.join(dir)) {
            for e in entries.flatten() {
                println!("cargo:rerun-if-changed={}", e.path().display());
            }
        }
    }
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .debug(false)
        .flag(format!("-include{}", kernels.join("emu/cuda_emu.h").display()))
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-clobbered")
        .file(kernels.join("emu/emu_runtime.cpp"))
        .file(kernels.join("emu/registry.cpp"))
        .compile("quantfleet_kernels_emu");
}

//! The emulator's kernel table and the NVRTC module list (src/sources.rs) must name the same kernels,
//! and a malformed launch must come back from the emulator as an error, not a crash.

use quantfleet_kernels::emu::{EmuBuffer, EmuRunner, kernel_names};
use quantfleet_kernels::launch::{KernelArg, Launch, LaunchConfig, Runner};
use quantfleet_kernels::sources::MODULES;

#[test]
fn every_kernel_is_registered_and_compiled() {
    let mut declared: Vec<String> = MODULES.iter().flat_map(|m| m.kernels.iter().map(|k| k.to_string())).collect();
    let mut emulated = kernel_names();
    declared.sort();
    emulated.sort();
    assert_eq!(declared, emulated, "kernels/emu/registry.cpp and src/sources.rs disagree");
}

#[test]
fn emulator_reports_bad_launches() {
    let buf = EmuBuffer::poisoned(64);
    let config = LaunchConfig { grid: [1, 1, 1], block: [128, 1, 1], shared_mem_bytes: 0 };
    let mut launch = Launch { module: "gemv_fp8", kernel: "gemv_fp8_f16_bt1", config, args: vec![KernelArg::U32(1)] };
    let err = EmuRunner.launch(&launch).unwrap_err().to_string();
    assert!(err.contains("takes 9 arguments, got 1"), "{err}");
    launch.kernel = "no_such_kernel";
    assert!(EmuRunner.launch(&launch).unwrap_err().to_string().contains("unknown kernel"));
    launch.kernel = "gemv_fp8_f16_bt1";
    let p = KernelArg::Ptr(buf_addr(&buf));
    launch.args = vec![p, p, p, p, p, p, KernelArg::U32(1), KernelArg::U32(1), KernelArg::U32(1)];
    let err = EmuRunner.launch(&launch).unwrap_err().to_string();
    assert!(err.contains("argument 2 has 8 bytes, the kernel expects 4"), "{err}");
    let (zero, one) = (KernelArg::U32(0), KernelArg::U32(1));
    launch.args = vec![p, p, zero, zero, p, p, one, one, one];
    launch.config.block = [2048, 1, 1];
    assert!(EmuRunner.launch(&launch).unwrap_err().to_string().contains("1..=1024 threads"));
}

fn buf_addr(b: &EmuBuffer) -> u64 {
    use quantfleet_kernels::launch::DeviceBuffer;
    b.device_addr()
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_probe_never_panics() {
    use quantfleet_kernels::KernelError;
    let present = unsafe { cudarc::driver::sys::is_culib_present() };
    match quantfleet_kernels::cuda::probe(0) {
        Err(KernelError::NoDriver(_)) => assert!(!present),
        Ok(_) | Err(KernelError::NoDevice(_)) | Err(KernelError::Driver(_)) => assert!(present),
        Err(other) => panic!("unexpected probe error {other}"),
    }
}

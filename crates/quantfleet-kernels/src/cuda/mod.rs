//! The CUDA path (feature `cuda`): NVRTC compilation of the embedded modules, a per-architecture PTX cache,
//! and launches through the driver API. cudarc loads libcuda and libnvrtc at run time, so this builds on a
//! machine without CUDA; every entry point checks that the libraries are present first and returns
//! [`crate::KernelError::NoDriver`] / [`crate::KernelError::NoNvrtc`] instead of letting cudarc panic.

pub mod nvrtc;
pub mod runner;

pub use nvrtc::{CompileOutput, KernelResources, compile_module, nvrtc_version, parse_ptxas_report};
pub use runner::{CudaBuffer, CudaRunner, DeviceInfo, probe};

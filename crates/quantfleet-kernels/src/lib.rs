//! Quantfleet's GPU kernels, from source text to launch.
//!
//! * [`sources`]: the CUDA C++ under `kernels/` embedded into the binary, one NVRTC module per file, with our
//!   own `#include`s inlined so NVRTC needs no include path and no CUDA toolkit headers.
//! * [`launch`] and [`ops`]: every kernel's launch described as plain data (name, grid, block, shared memory,
//!   arguments), built from shapes that are validated first. The same description drives both runners.
//! * [`emu`]: runs a launch on the CPU through the C++ emulation layer in `kernels/emu/` (the same .cu
//!   sources compiled by the host compiler, with real block/warp semantics). Tests use it against the
//!   scalar references in `quantfleet-quant`.
//! * `cuda` (feature `cuda`): NVRTC compilation with a per-architecture PTX cache, module loading and
//!   launches through the driver API (cudarc, dynamically loaded: building needs no CUDA; running needs the
//!   NVIDIA driver and libnvrtc). A missing driver is [`KernelError::NoDriver`], never a panic.

pub mod device;
pub mod emu;
pub mod error;
pub mod launch;
pub mod ops;
pub mod sources;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use device::Device;
pub use error::{KernelError, Result};
pub use launch::{DeviceBuffer, KernelArg, Launch, LaunchConfig};

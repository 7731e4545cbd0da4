//! Typed errors of the kernel layer: bad shapes and buffers are refused before a launch, and a missing
//! driver or compiler is an error value, never a panic.

use thiserror::Error;

/// Why a kernel could not be compiled, prepared or launched.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum KernelError {
    #[error("invalid shape for {kernel}: {reason}")]
    InvalidShape { kernel: &'static str, reason: String },
    #[error("{kernel}: buffer `{buffer}` holds {actual} bytes, needs at least {needed}")]
    BufferTooSmall { kernel: &'static str, buffer: &'static str, needed: usize, actual: usize },
    #[error("unknown kernel module `{0}`")]
    UnknownModule(String),
    #[error("kernel source error: {0}")]
    Source(String),
    #[error("CPU emulator: {0}")]
    Emulator(String),
    #[error("no CUDA driver: {0}")]
    NoDriver(String),
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    #[error("NVRTC unavailable: {0}")]
    NoNvrtc(String),
    #[error("NVRTC failed to compile {module} for {arch}:\n{log}")]
    Compile { module: String, arch: String, log: String },
    #[error("CUDA driver call failed: {0}")]
    Driver(String),
    #[error("PTX cache at {path}: {reason}")]
    Cache { path: String, reason: String },
    #[error("the crate was built without the `cuda` feature")]
    CudaFeatureDisabled,
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, KernelError>;

//! The GPU backend on a real NVIDIA GPU (feature `cuda`): driver probing without panicking, and the backend
//! over `quantfleet_kernels::cuda::CudaRunner` (NVRTC compilation at first use, PTX cached per architecture).

use std::path::Path;

use quantfleet_kernels::cuda::{CudaRunner, DeviceInfo, nvrtc_version, probe as probe_device};

use super::GpuBackend;
use crate::error::{EngineError, Result};

/// The GPU backend on a CUDA device.
pub type CudaBackend = GpuBackend<CudaRunner>;

/// Why the CUDA backend cannot serve here, or the device it would use. Checks libcuda (dlopen), cuInit,
/// the device count, the device itself and libnvrtc, in that order, and never panics.
pub fn probe(ordinal: usize) -> Result<DeviceInfo> {
    let info = probe_device(ordinal).map_err(|e| EngineError::Device(e.to_string()))?;
    nvrtc_version().map_err(|e| EngineError::Device(e.to_string()))?;
    Ok(info)
}

/// What `name()` reports for a device: `cuda:<ordinal> <name> sm_<major><minor>`.
pub fn label(info: &DeviceInfo) -> String {
    let (major, minor) = info.compute_capability;
    format!("cuda:{} {} sm_{major}{minor}", info.ordinal, info.name)
}

/// The CUDA backend on device `ordinal`, caching PTX under `ptx_cache`.
pub fn open(ordinal: usize, ptx_cache: &Path) -> Result<CudaBackend> {
    let info = probe(ordinal)?;
    let runner = CudaRunner::new(ordinal, ptx_cache).map_err(|e| EngineError::Device(e.to_string()))?;
    Ok(GpuBackend::new(runner, label(&info)))
}

//! Launching on a real GPU: device probing that never panics, lazy per-module compilation through a PTX
//! cache keyed by architecture, source digest and NVRTC version, and `cuLaunchKernel` with the argument
//! bytes described by a [`Launch`].

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, result, sys};
use cudarc::nvrtc::Ptx;

use crate::cuda::nvrtc::{compile_module, nvrtc_version};
use crate::error::{KernelError, Result};
use crate::launch::{DeviceBuffer, KernelArg, Launch, Runner};
use crate::sources;

/// What node start-up learns about the GPU before choosing a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability, e.g. (9, 0) for H100.
    pub compute_capability: (i32, i32),
    pub total_memory_bytes: usize,
}

fn driver(e: impl std::fmt::Debug) -> KernelError {
    KernelError::Driver(format!("{e:?}"))
}

/// Checks for libcuda and a device without panicking: Err(NoDriver) without the library, Err(NoDevice) when
/// the driver reports no GPU (or cannot initialise), Ok with the device's description otherwise.
pub fn probe(ordinal: usize) -> Result<DeviceInfo> {
    // SAFETY: only probes for the shared library.
    if !unsafe { sys::is_culib_present() } {
        return Err(KernelError::NoDriver("libcuda.so was not found on the library path".into()));
    }
    result::init().map_err(|e| KernelError::NoDevice(format!("cuInit failed: {e:?}")))?;
    let count = result::device::get_count().map_err(|e| KernelError::NoDevice(format!("{e:?}")))?;
    if ordinal >= count.max(0) as usize {
        return Err(KernelError::NoDevice(format!("device {ordinal} requested, the driver reports {count}")));
    }
    let ctx = CudaContext::new(ordinal).map_err(driver)?;
    Ok(DeviceInfo {
        ordinal,
        name: ctx.name().map_err(driver)?,
        compute_capability: ctx.compute_capability().map_err(driver)?,
        total_memory_bytes: ctx.total_mem().map_err(driver)?,
    })
}

/// A device allocation usable as a kernel argument.
pub struct CudaBuffer {
    slice: CudaSlice<u8>,
    stream: Arc<CudaStream>,
}

impl DeviceBuffer for CudaBuffer {
    fn device_addr(&self) -> u64 {
        let (ptr, _sync) = self.slice.device_ptr(&self.stream);
        ptr
    }
    fn byte_len(&self) -> usize {
        self.slice.len()
    }
}

/// Compiles, caches, loads and launches kernels on one device.
pub struct CudaRunner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// `compute_XY` of the device: PTX for exactly this architecture, JIT-compiled by the driver once.
    arch: String,
    cache_dir: PathBuf,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
}

impl CudaRunner {
    /// Opens device `ordinal` (after [`probe`]) and keeps compiled PTX under `cache_dir/<arch>/`.
    pub fn new(ordinal: usize, cache_dir: &Path) -> Result<Self> {
        let info = probe(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(driver)?;
        let stream = ctx.default_stream();
        let (major, minor) = info.compute_capability;
        Ok(Self {
            ctx,
            stream,
            arch: format!("compute_{major}{minor}"),
            cache_dir: cache_dir.to_path_buf(),
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        })
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Copies `data` to a new device buffer.
    pub fn upload(&self, data: &[u8]) -> Result<CudaBuffer> {
        Ok(CudaBuffer { slice: self.stream.clone_htod(data).map_err(driver)?, stream: self.stream.clone() })
    }

    /// A zeroed device buffer of `len` bytes.
    pub fn alloc(&self, len: usize) -> Result<CudaBuffer> {
        Ok(CudaBuffer { slice: self.stream.alloc_zeros::<u8>(len).map_err(driver)?, stream: self.stream.clone() })
    }

    /// Copies a device buffer back (synchronises the stream).
    pub fn download(&self, buf: &CudaBuffer) -> Result<Vec<u8>> {
        self.stream.clone_dtoh(&buf.slice).map_err(driver)
    }

    fn cache_path(&self, module: &sources::KernelModule) -> Result<PathBuf> {
        let (major, minor) = nvrtc_version()?;
        let digest = sources::source_digest(module)?;
        Ok(self.cache_dir.join(&self.arch).join(format!("{}-{}-nvrtc{major}.{minor}.ptx", module.name, &digest[..16])))
    }

    /// PTX for `module` from the cache, or compiled now and written to the cache (atomically, so
    /// concurrent processes never read a partial file).
    fn ptx(&self, module: &sources::KernelModule) -> Result<String> {
        let path = self.cache_path(module)?;
        if let Ok(text) = std::fs::read_to_string(&path) {
            return Ok(text);
        }
        let ptx = compile_module(module, &self.arch, false)?
            .ptx
            .ok_or_else(|| KernelError::Source(format!("NVRTC returned no PTX for {}", module.name)))?;
        let cache_err =
            |e: std::io::Error| KernelError::Cache { path: path.display().to_string(), reason: e.to_string() };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(cache_err)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &ptx).map_err(cache_err)?;
        std::fs::rename(&tmp, &path).map_err(cache_err)?;
        Ok(ptx)
    }

    fn function(&self, launch: &Launch) -> Result<CudaFunction> {
        let mut functions = self.functions.lock().map_err(|_| KernelError::Driver("poisoned lock".into()))?;
        if let Some(f) = functions.get(launch.kernel) {
            return Ok(f.clone());
        }
        let mut modules = self.modules.lock().map_err(|_| KernelError::Driver("poisoned lock".into()))?;
        let module = match modules.get(launch.module) {
            Some(m) => m.clone(),
            None => {
                let m = sources::module(launch.module)?;
                let loaded = self.ctx.load_module(Ptx::from_src(self.ptx(m)?)).map_err(driver)?;
                modules.insert(m.name, loaded.clone());
                loaded
            }
        };
        let f = module.load_function(launch.kernel).map_err(driver)?;
        functions.insert(launch.kernel, f.clone());
        Ok(f)
    }

    /// Mean time of one launch in milliseconds over `iters` back-to-back launches (after one warm-up
    /// launch, which also compiles and loads the module), measured with CUDA events on the stream.
    pub fn time_launch(&self, launch: &Launch, iters: u32) -> Result<f32> {
        self.launch(launch)?;
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream.record_event(flags).map_err(driver)?;
        for _ in 0..iters.max(1) {
            self.launch(launch)?;
        }
        let end = self.stream.record_event(flags).map_err(driver)?;
        end.synchronize().map_err(driver)?;
        Ok(start.elapsed_ms(&end).map_err(driver)? / iters.max(1) as f32)
    }

    /// Waits for all launched work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver)
    }
}

impl Runner for CudaRunner {
    fn launch(&self, launch: &Launch) -> Result<()> {
        let f = self.function(launch)?;
        let mut values: Vec<Vec<u8>> = launch.args.iter().map(KernelArg::bytes).collect();
        let mut params: Vec<*mut c_void> = values.iter_mut().map(|v| v.as_mut_ptr().cast::<c_void>()).collect();
        let c = &launch.config;
        self.ctx.bind_to_thread().map_err(driver)?;
        // SAFETY: the argument list was built by `crate::ops` against the kernel's signature, with every
        // buffer checked to be large enough; `values` outlives the call (the driver copies parameters).
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                (c.grid[0], c.grid[1], c.grid[2]),
                (c.block[0], c.block[1], c.block[2]),
                c.shared_mem_bytes,
                self.stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(driver)
    }
}

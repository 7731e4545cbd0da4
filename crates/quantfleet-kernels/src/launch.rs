//! A kernel launch as plain data. [`crate::ops`] builds these from validated shapes; the CPU emulator and
//! the CUDA runner both execute them, so the emulated tests exercise the very grid/block/argument choices a
//! GPU would get.

use crate::error::{KernelError, Result};

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_mem_bytes: u32,
}

/// One kernel argument, passed by value exactly as the kernel's C signature declares it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    /// A device address (`const T*` / `T*`); 0 is a null pointer (optional inputs).
    Ptr(u64),
    U32(u32),
    U64(u64),
    I32(i32),
    F32(f32),
}

impl KernelArg {
    /// The argument's bytes as the kernel receives them (little-endian, natural size).
    pub fn bytes(&self) -> Vec<u8> {
        match *self {
            KernelArg::Ptr(v) => v.to_ne_bytes().to_vec(),
            KernelArg::U32(v) => v.to_ne_bytes().to_vec(),
            KernelArg::U64(v) => v.to_ne_bytes().to_vec(),
            KernelArg::I32(v) => v.to_ne_bytes().to_vec(),
            KernelArg::F32(v) => v.to_ne_bytes().to_vec(),
        }
    }
}

/// Memory a kernel can address: a device allocation, or host memory under the emulator.
pub trait DeviceBuffer {
    /// Address of the first byte as the kernel sees it.
    fn device_addr(&self) -> u64;
    /// Usable size in bytes.
    fn byte_len(&self) -> usize;
}

/// A fully described launch of one kernel (the name is its `extern "C"` symbol).
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub module: &'static str,
    pub kernel: &'static str,
    pub config: LaunchConfig,
    pub args: Vec<KernelArg>,
}

/// Something that executes [`Launch`]es: the CPU emulator or a CUDA device.
pub trait Runner {
    fn launch(&self, launch: &Launch) -> Result<()>;
}

/// The pointer argument for `buf`, after checking it holds at least `needed` bytes.
pub(crate) fn buffer_arg(
    kernel: &'static str,
    name: &'static str,
    buf: &dyn DeviceBuffer,
    needed: usize,
) -> Result<KernelArg> {
    if buf.byte_len() < needed {
        return Err(KernelError::BufferTooSmall { kernel, buffer: name, needed, actual: buf.byte_len() });
    }
    Ok(KernelArg::Ptr(buf.device_addr()))
}

/// Ceiling division for grid sizes, as u32 with an overflow check.
pub(crate) fn blocks(kernel: &'static str, items: u64, per_block: u64) -> Result<u32> {
    u32::try_from(items.div_ceil(per_block))
        .map_err(|_| KernelError::InvalidShape { kernel, reason: format!("{items} items need too many blocks") })
}

//! A device the kernels run on: memory plus a [`Runner`](crate::launch::Runner). The CPU emulator and a CUDA
//! GPU both implement it, so a kernel test is written once and run per device (the emulated run in every
//! `cargo test`, the GPU run on a GPU host).

use crate::error::Result;
use crate::launch::{DeviceBuffer, Launch};

pub trait Device: Send + Sync {
    type Buffer: DeviceBuffer + Send + Sync;
    /// Short name for messages ("emu", "cuda").
    fn name(&self) -> &'static str;
    /// A new buffer holding a copy of `data`.
    fn upload(&self, data: &[u8]) -> Result<Self::Buffer>;
    /// A new buffer of `len` bytes, all 0xFF (NaN in every float format we use), so unwritten outputs show.
    fn poisoned(&self, len: usize) -> Result<Self::Buffer> {
        self.upload(&vec![0xFF; len])
    }
    /// A new buffer of `len` bytes whose contents the caller will write before reading: poisoned on the
    /// emulator (so a read of an unwritten byte shows as NaN), zeroed on a GPU (no host staging copy).
    fn alloc(&self, len: usize) -> Result<Self::Buffer> {
        self.poisoned(len)
    }
    /// The buffer's contents (waits for launched work).
    fn download(&self, buf: &Self::Buffer) -> Result<Vec<u8>>;
    /// Executes one launch.
    fn run(&self, launch: &Launch) -> Result<()>;
    /// Fails if a kernel wrote outside `buf`, where the device can tell (the emulator's guard zones).
    fn check_guards(&self, buf: &Self::Buffer, name: &str) -> Result<()>;
}

impl Device for crate::emu::EmuRunner {
    type Buffer = crate::emu::EmuBuffer;
    fn name(&self) -> &'static str {
        "emu"
    }
    fn upload(&self, data: &[u8]) -> Result<Self::Buffer> {
        Ok(crate::emu::EmuBuffer::from_bytes(data))
    }
    fn download(&self, buf: &Self::Buffer) -> Result<Vec<u8>> {
        Ok(buf.bytes().to_vec())
    }
    fn run(&self, launch: &Launch) -> Result<()> {
        crate::launch::Runner::launch(self, launch)
    }
    fn check_guards(&self, buf: &Self::Buffer, name: &str) -> Result<()> {
        buf.check_guards(name)
    }
}

#[cfg(feature = "cuda")]
impl Device for crate::cuda::CudaRunner {
    type Buffer = crate::cuda::CudaBuffer;
    fn name(&self) -> &'static str {
        "cuda"
    }
    fn upload(&self, data: &[u8]) -> Result<Self::Buffer> {
        crate::cuda::CudaRunner::upload(self, data)
    }
    fn alloc(&self, len: usize) -> Result<Self::Buffer> {
        crate::cuda::CudaRunner::alloc(self, len)
    }
    fn download(&self, buf: &Self::Buffer) -> Result<Vec<u8>> {
        crate::cuda::CudaRunner::download(self, buf)
    }
    fn run(&self, launch: &Launch) -> Result<()> {
        crate::launch::Runner::launch(self, launch)
    }
    fn check_guards(&self, _buf: &Self::Buffer, _name: &str) -> Result<()> {
        // No guard zones on the GPU; compute-sanitizer (memcheck) is the tool for out-of-bounds writes there.
        Ok(())
    }
}

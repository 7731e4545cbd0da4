//! Runs launches on the CPU through the C++ emulation layer (kernels/emu/), compiled into this crate by
//! build.rs. Buffers carry guard zones filled with 0xFF on both sides: an out-of-bounds read meets a NaN in
//! every float format we use, and an out-of-bounds write is reported by [`EmuBuffer::check_guards`].

use std::ffi::{CStr, CString, c_char, c_void};

use crate::error::{KernelError, Result};
use crate::launch::{DeviceBuffer, KernelArg, Launch, Runner};

unsafe extern "C" {
    fn qf_emu_kernel_count() -> usize;
    fn qf_emu_kernel_name(i: usize) -> *const c_char;
    fn qf_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        smem: usize,
        params: *mut *mut c_void,
        sizes: *const usize,
        nparams: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// Guard bytes on each side; a multiple of 16 so the data keeps the 16-byte alignment vector loads need.
const GUARD: usize = 64;

/// Host memory standing in for a device allocation. Kernels write through the raw pointer, as a device
/// would; the allocation is owned as a raw box so no Rust reference aliases those writes.
pub struct EmuBuffer {
    base: *mut u128,
    words: usize,
    len: usize,
}

impl EmuBuffer {
    /// A buffer holding a copy of `data`.
    pub fn from_bytes(data: &[u8]) -> Self {
        let words = (data.len() + 2 * GUARD).div_ceil(16);
        let base = Box::into_raw(vec![u128::MAX; words].into_boxed_slice()).cast::<u128>();
        // SAFETY: the allocation is `words * 16` bytes, at least GUARD + data.len() + GUARD.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), base.cast::<u8>().add(GUARD), data.len()) };
        Self { base, words, len: data.len() }
    }

    /// A buffer of `len` bytes, all 0xFF (NaN as f16/bf16/f32/E4M3) so unwritten outputs are visible.
    pub fn poisoned(len: usize) -> Self {
        Self::from_bytes(&vec![0xFF; len])
    }

    fn all_bytes(&self) -> &[u8] {
        // SAFETY: the whole allocation viewed as bytes; launches are synchronous, so nothing writes to it
        // while this borrow lives.
        unsafe { std::slice::from_raw_parts(self.base.cast::<u8>(), self.words * 16) }
    }

    /// The buffer's contents.
    pub fn bytes(&self) -> &[u8] {
        &self.all_bytes()[GUARD..GUARD + self.len]
    }

    /// Fails if anything wrote outside `[0, len)`.
    pub fn check_guards(&self, name: &str) -> Result<()> {
        let all = self.all_bytes();
        let bad = all[..GUARD].iter().chain(&all[GUARD + self.len..]).any(|&b| b != 0xFF);
        if bad {
            return Err(KernelError::Emulator(format!("a kernel wrote outside buffer `{name}`")));
        }
        Ok(())
    }
}

// SAFETY: the buffer exclusively owns its allocation (no aliasing handle exists), so moving it to another
// thread is sound. Sharing `&EmuBuffer` across threads exposes only reads on the Rust side; kernels write
// through its address as a device writes to device memory, and launches are synchronous: like a GPU
// allocation, concurrent launches writing one buffer are the caller's race to avoid (the engine writes
// activations and caches only through `&mut`).
unsafe impl Send for EmuBuffer {}
// SAFETY: see `Send` above.
unsafe impl Sync for EmuBuffer {}

impl DeviceBuffer for EmuBuffer {
    fn device_addr(&self) -> u64 {
        self.base as u64 + GUARD as u64
    }
    fn byte_len(&self) -> usize {
        self.len
    }
}

impl Drop for EmuBuffer {
    fn drop(&mut self) {
        // SAFETY: `base` came from Box::into_raw of a `words`-long boxed slice in `from_bytes`.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.base, self.words)) });
    }
}

/// Names of every kernel the emulator was built with.
pub fn kernel_names() -> Vec<String> {
    // SAFETY: the registry is a static table; names are static NUL-terminated strings.
    (0..unsafe { qf_emu_kernel_count() })
        .map(|i| unsafe { CStr::from_ptr(qf_emu_kernel_name(i)) }.to_string_lossy().into_owned())
        .collect()
}

/// Executes launches on the CPU. Blocks run one after another on the calling thread; independent tests
/// may use separate runners concurrently (all emulator state is thread-local).
#[derive(Clone, Copy, Debug, Default)]
pub struct EmuRunner;

impl Runner for EmuRunner {
    fn launch(&self, launch: &Launch) -> Result<()> {
        let name = CString::new(launch.kernel).map_err(|e| KernelError::Emulator(e.to_string()))?;
        let mut values: Vec<Vec<u8>> = launch.args.iter().map(KernelArg::bytes).collect();
        let sizes: Vec<usize> = values.iter().map(Vec::len).collect();
        let mut params: Vec<*mut c_void> = values.iter_mut().map(|v| v.as_mut_ptr().cast::<c_void>()).collect();
        let mut err = vec![0 as c_char; 1024];
        let c = &launch.config;
        // SAFETY: every pointer argument was produced by `buffer_arg` from a live buffer whose size was
        // checked against the shape; params/sizes describe `values`, which outlive the call.
        let rc = unsafe {
            qf_emu_launch(
                name.as_ptr(),
                c.grid.as_ptr(),
                c.block.as_ptr(),
                c.shared_mem_bytes as usize,
                params.as_mut_ptr(),
                sizes.as_ptr(),
                params.len(),
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc != 0 {
            // SAFETY: the emulator NUL-terminates the message within `err`.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
            return Err(KernelError::Emulator(msg));
        }
        Ok(())
    }
}

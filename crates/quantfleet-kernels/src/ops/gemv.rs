//! Quantized-weight GEMV / small-batch GEMM launches: `y[b, n] = sum_k x[b, k] * W[n, k]` with
//! x `[batch x k]`, y `[batch x n]` in f16/bf16 and W packed exactly as quantfleet-quant stores it
//! (Fp8Matrix, Int8Matrix, Int4Matrix with f32 scales), so the engine hands the same bytes to the GPU.

use crate::error::{KernelError, Result};
use crate::launch::{DeviceBuffer, Launch, LaunchConfig, blocks, buffer_arg};
use crate::ops::Act;
use crate::sources;

/// Rows (warps) per block; must equal QF_GEMV_WARPS in kernels/gemv/gemv_common.cuh.
pub const ROWS_PER_BLOCK: u32 = 4;
/// Batch rows handled per launch tile by the `bt8` variants.
pub const BATCH_TILE: usize = 8;

/// Problem size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemvShape {
    /// Output features (weight rows).
    pub n: usize,
    /// Input features (weight columns).
    pub k: usize,
    /// Activation rows (tokens).
    pub batch: usize,
}

/// Packed weights and their scales.
pub enum GemvWeights<'a> {
    /// E4M3 codes `[n x k]`; f32 scales as `scaling` lays them out.
    Fp8 { codes: &'a dyn DeviceBuffer, scales: &'a dyn DeviceBuffer, scaling: Fp8Scales },
    /// int8 codes `[n x k]`; f32 scale per row.
    Int8 { codes: &'a dyn DeviceBuffer, scales: &'a dyn DeviceBuffer },
    /// INT4 nibbles `[n x ceil(k/2)]` (element 2j in the low nibble of byte j), f32 scale per
    /// (row, group), optional zero point per (row, group) (None: symmetric, implicit zero 8).
    Int4 {
        packed: &'a dyn DeviceBuffer,
        scales: &'a dyn DeviceBuffer,
        zeros: Option<&'a dyn DeviceBuffer>,
        group_size: usize,
    },
    /// 16-bit weights `[n x k]` (no scales): IEEE half (`bf16: false`) or bfloat16.
    Half { w: &'a dyn DeviceBuffer, bf16: bool },
}

/// How an FP8 matrix's f32 scales are laid out (quantfleet-quant's `Fp8Matrix::scales`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8Scales {
    /// One scale for the matrix.
    PerTensor,
    /// One scale per row.
    PerChannel,
    /// One scale per `group` consecutive columns of a row (32, 64, 128 or 256), `ceil(k / group)` per row.
    PerGroup(usize),
}

fn kernel_name(module: &'static str, fmt: &str, act: Act, batch: usize) -> Result<&'static str> {
    let tile = if batch == 1 { 1 } else { BATCH_TILE };
    let wanted = format!("gemv_{fmt}_{}_bt{tile}", act.suffix());
    let m = sources::module(module)?;
    m.kernels
        .iter()
        .copied()
        .find(|k| *k == wanted)
        .ok_or_else(|| KernelError::Source(format!("module {module} lacks kernel {wanted}")))
}

/// The launch of `y = x W^T` for the given weights.
pub fn gemv(
    weights: GemvWeights<'_>,
    act: Act,
    shape: GemvShape,
    x: &dyn DeviceBuffer,
    y: &dyn DeviceBuffer,
) -> Result<Launch> {
    let GemvShape { n, k, batch } = shape;
    let what = "gemv";
    if n == 0 || k == 0 || batch == 0 {
        return Err(KernelError::InvalidShape { kernel: what, reason: format!("empty shape {shape:?}") });
    }
    let (n32, k32, b32) = match (u32::try_from(n), u32::try_from(k), u32::try_from(batch)) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        _ => return Err(KernelError::InvalidShape { kernel: what, reason: format!("{shape:?} exceeds u32") }),
    };
    let tile = if batch == 1 { 1 } else { BATCH_TILE };
    let config = LaunchConfig {
        grid: [blocks(what, n as u64, ROWS_PER_BLOCK as u64)?, blocks(what, batch as u64, tile as u64)?, 1],
        block: [32 * ROWS_PER_BLOCK, 1, 1],
        shared_mem_bytes: 0,
    };
    let x_arg = buffer_arg(what, "x", x, batch * k * 2)?;
    let y_arg = buffer_arg(what, "y", y, batch * n * 2)?;
    let tail = [x_arg, y_arg, crate::KernelArg::U32(n32), crate::KernelArg::U32(k32), crate::KernelArg::U32(b32)];
    let (module, kernel, mut args) = match weights {
        GemvWeights::Fp8 { codes, scales, scaling } => {
            let kernel = kernel_name("gemv_fp8", "fp8", act, batch)?;
            // (scales, stride of the per-row scale, log2 of the group: 0 without groups)
            let (count, stride, shift) = match scaling {
                Fp8Scales::PerTensor => (1, 0, 0),
                Fp8Scales::PerChannel => (n, 1, 0),
                Fp8Scales::PerGroup(g @ (32 | 64 | 128 | 256)) => (n * k.div_ceil(g), 0, g.trailing_zeros()),
                Fp8Scales::PerGroup(g) => {
                    return Err(KernelError::InvalidShape {
                        kernel,
                        reason: format!("FP8 scale group size {g} (use 32, 64, 128 or 256)"),
                    });
                }
            };
            let args = vec![
                buffer_arg(kernel, "codes", codes, n * k)?,
                buffer_arg(kernel, "scales", scales, 4 * count)?,
                crate::KernelArg::U32(stride),
                crate::KernelArg::U32(shift),
            ];
            ("gemv_fp8", kernel, args)
        }
        GemvWeights::Int8 { codes, scales } => {
            let kernel = kernel_name("gemv_int8", "int8", act, batch)?;
            let args = vec![buffer_arg(kernel, "codes", codes, n * k)?, buffer_arg(kernel, "scales", scales, 4 * n)?];
            ("gemv_int8", kernel, args)
        }
        GemvWeights::Int4 { packed, scales, zeros, group_size } => {
            let kernel = kernel_name("gemv_int4", "int4", act, batch)?;
            if !matches!(group_size, 32 | 64 | 128 | 256) {
                return Err(KernelError::InvalidShape {
                    kernel,
                    reason: format!("group size {group_size} (use 32, 64, 128 or 256)"),
                });
            }
            let groups = n * k.div_ceil(group_size);
            let zeros_arg = match zeros {
                Some(z) => buffer_arg(kernel, "zeros", z, groups)?,
                None => crate::KernelArg::Ptr(0),
            };
            let args = vec![
                buffer_arg(kernel, "packed", packed, n * k.div_ceil(2))?,
                buffer_arg(kernel, "scales", scales, 4 * groups)?,
                zeros_arg,
                crate::KernelArg::U32(group_size.trailing_zeros()),
            ];
            ("gemv_int4", kernel, args)
        }
        GemvWeights::Half { w, bf16 } => {
            let kernel = kernel_name("gemv_half", if bf16 { "bf16w" } else { "f16w" }, act, batch)?;
            ("gemv_half", kernel, vec![buffer_arg(kernel, "w", w, 2 * n * k)?])
        }
    };
    args.extend(tail);
    Ok(Launch { module, kernel, config, args })
}

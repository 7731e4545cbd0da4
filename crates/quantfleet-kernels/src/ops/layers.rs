//! Launches of the per-token layers (kernels/common/layers.cu) and of per-token FP8 activation
//! quantization (kernels/quant/act_quant_fp8.cu). Shapes are row-major `[tokens x cols]`.

use crate::error::{KernelError, Result};
use crate::launch::{DeviceBuffer, KernelArg, Launch, LaunchConfig, blocks, buffer_arg};
use crate::ops::Act;

fn dims(kernel: &'static str, tokens: usize, cols: usize) -> Result<(u32, u32)> {
    if tokens == 0 || cols == 0 {
        return Err(KernelError::InvalidShape { kernel, reason: format!("empty shape {tokens} x {cols}") });
    }
    match (u32::try_from(tokens), u32::try_from(cols)) {
        (Ok(t), Ok(c)) if t <= 65535 * 32768 => Ok((t, c)),
        _ => Err(KernelError::InvalidShape { kernel, reason: format!("{tokens} x {cols} exceeds u32") }),
    }
}

fn per_token(tokens: u32, threads: u32) -> LaunchConfig {
    LaunchConfig { grid: [tokens, 1, 1], block: [threads, 1, 1], shared_mem_bytes: 0 }
}

fn name(act: Act, f16: &'static str, bf16: &'static str) -> &'static str {
    match act {
        Act::F16 => f16,
        Act::Bf16 => bf16,
    }
}

/// `codes[t] = e4m3(x[t] / scale[t])`, `scale[t] = amax(x[t]) / 448`.
pub fn act_quant_fp8(
    act: Act,
    tokens: usize,
    cols: usize,
    x: &dyn DeviceBuffer,
    codes: &dyn DeviceBuffer,
    scales: &dyn DeviceBuffer,
) -> Result<Launch> {
    let kernel = name(act, "act_quant_fp8_f16", "act_quant_fp8_bf16");
    let (t, c) = dims(kernel, tokens, cols)?;
    let args = vec![
        buffer_arg(kernel, "x", x, 2 * tokens * cols)?,
        buffer_arg(kernel, "codes", codes, tokens * cols)?,
        buffer_arg(kernel, "scales", scales, 4 * tokens)?,
        KernelArg::U32(c),
    ];
    Ok(Launch { module: "act_quant_fp8", kernel, config: per_token(t, 256), args })
}

/// `y = x * rsqrt(mean(x^2) + eps) * weight` per token; weight is f32 `[cols]`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm(
    act: Act,
    tokens: usize,
    cols: usize,
    x: &dyn DeviceBuffer,
    weight: &dyn DeviceBuffer,
    y: &dyn DeviceBuffer,
    eps: f32,
) -> Result<Launch> {
    let kernel = name(act, "rmsnorm_f16", "rmsnorm_bf16");
    let (t, c) = dims(kernel, tokens, cols)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(KernelError::InvalidShape { kernel, reason: format!("eps {eps}") });
    }
    let args = vec![
        buffer_arg(kernel, "x", x, 2 * tokens * cols)?,
        buffer_arg(kernel, "weight", weight, 4 * cols)?,
        buffer_arg(kernel, "y", y, 2 * tokens * cols)?,
        KernelArg::U32(c),
        KernelArg::F32(eps),
    ];
    Ok(Launch { module: "layers", kernel, config: per_token(t, 256), args })
}

/// Rotary embedding in place on `x: [tokens x n_heads x head_dim]` (half-split pairs).
pub fn rope(
    act: Act,
    tokens: usize,
    n_heads: usize,
    head_dim: usize,
    x: &dyn DeviceBuffer,
    positions: &dyn DeviceBuffer,
    base: f32,
) -> Result<Launch> {
    let kernel = name(act, "rope_f16", "rope_bf16");
    let (t, _) = dims(kernel, tokens, n_heads * head_dim)?;
    if !(head_dim.is_multiple_of(2) && base.is_finite() && base > 1.0) {
        return Err(KernelError::InvalidShape {
            kernel,
            reason: format!("head_dim {head_dim} must be even, base {base} > 1"),
        });
    }
    let args = vec![
        buffer_arg(kernel, "x", x, 2 * tokens * n_heads * head_dim)?,
        buffer_arg(kernel, "positions", positions, 4 * tokens)?,
        KernelArg::U32(n_heads as u32),
        KernelArg::U32(head_dim as u32),
        KernelArg::F32(base.log2()),
    ];
    Ok(Launch { module: "layers", kernel, config: per_token(t, 128), args })
}

/// `out[t] = silu(gate_up[t, ..inter]) * gate_up[t, inter..]`.
pub fn swiglu(
    act: Act,
    tokens: usize,
    inter: usize,
    gate_up: &dyn DeviceBuffer,
    out: &dyn DeviceBuffer,
) -> Result<Launch> {
    let kernel = name(act, "swiglu_f16", "swiglu_bf16");
    let (_, i) = dims(kernel, tokens, inter)?;
    let total = (tokens * inter) as u64;
    let args = vec![
        buffer_arg(kernel, "gate_up", gate_up, 4 * tokens * inter)?,
        buffer_arg(kernel, "out", out, 2 * tokens * inter)?,
        KernelArg::U32(i),
        KernelArg::U64(total),
    ];
    // Enough blocks to fill a large GPU; the grid-stride loop covers the rest.
    let grid = blocks(kernel, total, 256)?.min(4096);
    Ok(Launch {
        module: "layers",
        kernel,
        config: LaunchConfig { grid: [grid, 1, 1], block: [256, 1, 1], shared_mem_bytes: 0 },
        args,
    })
}

/// `out[t] = table[ids[t]]`; out-of-range ids give a zero row and set `status` (one u32) to 1.
#[allow(clippy::too_many_arguments)]
pub fn embedding(
    act: Act,
    tokens: usize,
    vocab: usize,
    dim: usize,
    table: &dyn DeviceBuffer,
    ids: &dyn DeviceBuffer,
    out: &dyn DeviceBuffer,
    status: &dyn DeviceBuffer,
) -> Result<Launch> {
    let kernel = name(act, "embedding_f16", "embedding_bf16");
    let (t, d) = dims(kernel, tokens, dim)?;
    let v = u32::try_from(vocab).map_err(|_| KernelError::InvalidShape { kernel, reason: format!("vocab {vocab}") })?;
    let args = vec![
        buffer_arg(kernel, "table", table, 2 * vocab * dim)?,
        buffer_arg(kernel, "ids", ids, 4 * tokens)?,
        buffer_arg(kernel, "out", out, 2 * tokens * dim)?,
        KernelArg::U32(v),
        KernelArg::U32(d),
        buffer_arg(kernel, "status", status, 4)?,
    ];
    Ok(Launch { module: "layers", kernel, config: per_token(t, 128), args })
}

/// Grid of a grid-stride element-wise launch over `total` elements: enough blocks to fill a large GPU.
fn elementwise_config(kernel: &'static str, total: usize) -> Result<LaunchConfig> {
    if total == 0 {
        return Err(KernelError::InvalidShape { kernel, reason: "no elements".into() });
    }
    let grid = blocks(kernel, total as u64, 256)?.min(4096);
    Ok(LaunchConfig { grid: [grid, 1, 1], block: [256, 1, 1], shared_mem_bytes: 0 })
}

/// `x[i] += y[i]` for `total` elements (the residual add).
pub fn add(act: Act, total: usize, x: &dyn DeviceBuffer, y: &dyn DeviceBuffer) -> Result<Launch> {
    let kernel = name(act, "add_f16", "add_bf16");
    let config = elementwise_config(kernel, total)?;
    let args = vec![
        buffer_arg(kernel, "x", x, 2 * total)?,
        buffer_arg(kernel, "y", y, 2 * total)?,
        KernelArg::U64(total as u64),
    ];
    Ok(Launch { module: "elementwise", kernel, config, args })
}

/// `out[i] = silu(gate[i]) * up[i]` for `total` elements (gate and up in separate tensors).
pub fn swiglu_split(
    act: Act,
    total: usize,
    gate: &dyn DeviceBuffer,
    up: &dyn DeviceBuffer,
    out: &dyn DeviceBuffer,
) -> Result<Launch> {
    let kernel = name(act, "swiglu_split_f16", "swiglu_split_bf16");
    let config = elementwise_config(kernel, total)?;
    let args = vec![
        buffer_arg(kernel, "gate", gate, 2 * total)?,
        buffer_arg(kernel, "up", up, 2 * total)?,
        buffer_arg(kernel, "out", out, 2 * total)?,
        KernelArg::U64(total as u64),
    ];
    Ok(Launch { module: "elementwise", kernel, config, args })
}

/// Rotary embedding in place on `x: [tokens x n_heads x head_dim]` with interleaved pairs `(2i, 2i+1)` (GGUF's
/// NORM layout) and host angles: `cos`/`sin` are f32 `[tokens x head_dim/2]`.
#[allow(clippy::too_many_arguments)]
pub fn rope_table(
    act: Act,
    tokens: usize,
    n_heads: usize,
    head_dim: usize,
    x: &dyn DeviceBuffer,
    cos: &dyn DeviceBuffer,
    sin: &dyn DeviceBuffer,
) -> Result<Launch> {
    let kernel = name(act, "rope_table_f16", "rope_table_bf16");
    let (t, _) = dims(kernel, tokens, n_heads * head_dim)?;
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(KernelError::InvalidShape { kernel, reason: format!("head_dim {head_dim} must be even") });
    }
    let half = head_dim / 2;
    let args = vec![
        buffer_arg(kernel, "x", x, 2 * tokens * n_heads * head_dim)?,
        buffer_arg(kernel, "cos", cos, 4 * tokens * half)?,
        buffer_arg(kernel, "sin", sin, 4 * tokens * half)?,
        KernelArg::U32(n_heads as u32),
        KernelArg::U32(half as u32),
    ];
    Ok(Launch { module: "elementwise", kernel, config: per_token(t, 128), args })
}

//! Launches of the sampling helpers (kernels/common/sampling.cu) over f32 logits `[batch x vocab]`.

use crate::error::{KernelError, Result};
use crate::launch::{DeviceBuffer, KernelArg, Launch, LaunchConfig, buffer_arg};

fn check(kernel: &'static str, batch: usize, vocab: usize) -> Result<(u32, u32)> {
    match (u32::try_from(batch), u32::try_from(vocab)) {
        (Ok(b), Ok(v)) if b > 0 && v > 0 && b <= i32::MAX as u32 && v <= i32::MAX as u32 => Ok((b, v)),
        _ => Err(KernelError::InvalidShape { kernel, reason: format!("batch {batch} x vocab {vocab}") }),
    }
}

fn config(batch: u32) -> LaunchConfig {
    LaunchConfig { grid: [batch, 1, 1], block: [256, 1, 1], shared_mem_bytes: 0 }
}

/// Greedy token per sequence (ties to the lowest index) into `out: [batch]` i32.
pub fn argmax(batch: usize, vocab: usize, logits: &dyn DeviceBuffer, out: &dyn DeviceBuffer) -> Result<Launch> {
    let kernel = "sample_argmax_f32";
    let (b, v) = check(kernel, batch, vocab)?;
    let args = vec![
        buffer_arg(kernel, "logits", logits, 4 * batch * vocab)?,
        buffer_arg(kernel, "out", out, 4 * batch)?,
        KernelArg::U32(v),
    ];
    Ok(Launch { module: "sampling", kernel, config: config(b), args })
}

/// `probs = softmax(logits / temperature)` per sequence.
pub fn softmax(
    batch: usize,
    vocab: usize,
    logits: &dyn DeviceBuffer,
    probs: &dyn DeviceBuffer,
    temperature: f32,
) -> Result<Launch> {
    let kernel = "sample_softmax_f32";
    let (b, v) = check(kernel, batch, vocab)?;
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(KernelError::InvalidShape {
            kernel,
            reason: format!("temperature {temperature} (use argmax for 0)"),
        });
    }
    let args = vec![
        buffer_arg(kernel, "logits", logits, 4 * batch * vocab)?,
        buffer_arg(kernel, "probs", probs, 4 * batch * vocab)?,
        KernelArg::U32(v),
        KernelArg::F32(1.0 / temperature),
    ];
    Ok(Launch { module: "sampling", kernel, config: config(b), args })
}

/// Inverse-CDF draw per sequence with host uniforms `[batch]` in [0, 1) into `out: [batch]` i32.
pub fn categorical(
    batch: usize,
    vocab: usize,
    probs: &dyn DeviceBuffer,
    uniforms: &dyn DeviceBuffer,
    out: &dyn DeviceBuffer,
) -> Result<Launch> {
    let kernel = "sample_categorical_f32";
    let (b, v) = check(kernel, batch, vocab)?;
    let args = vec![
        buffer_arg(kernel, "probs", probs, 4 * batch * vocab)?,
        buffer_arg(kernel, "uniforms", uniforms, 4 * batch)?,
        buffer_arg(kernel, "out", out, 4 * batch)?,
        KernelArg::U32(v),
    ];
    Ok(Launch { module: "sampling", kernel, config: config(b), args })
}

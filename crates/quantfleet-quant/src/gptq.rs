//! GPTQ (Frantar et al. 2022): quantize a layer column by column, pushing each column's rounding error onto
//! the columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction loss
//! (H = 2/n X^T X from calibration inputs). Dampening keeps H invertible; the upper Cholesky factor of H^-1
//! supplies the update coefficients; updates are applied lazily in blocks of columns so the bulk of the work
//! is one rank-B update per block. Optional act-order quantizes columns with the largest H diagonal first;
//! with act-order the INT4 group parameters are fitted on the original weights ("static groups") so the packed
//! layout keeps contiguous groups and needs no column permutation at inference time.

use crate::error::{QuantError, Result};
use crate::fp8::{Fp8Format, Saturation};
use crate::fp8_matrix::{Fp8Matrix, fp8_scales};
use crate::halfp::f16;
use crate::int4::{GroupParams, Int4Config, Int4Matrix, Int4Scales, ScaleStorage, pack_nibbles};
use crate::int8::{Int8Matrix, int8_scale};
use crate::linalg::inverse_upper_cholesky;
use crate::matrix::{MatrixRef, amax, check_calibration, subsample_rows};
use crate::quantized::{QuantizedMatrix, WeightFormat};
use crate::simd::{Isa, multiversion};

/// GPTQ settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptqConfig {
    /// `WeightFormat::Int4` (group-wise scales), `WeightFormat::Int8` (per-channel) or `WeightFormat::Fp8`
    /// (per-channel, per-tensor or static scale).
    pub format: WeightFormat,
    /// Dampening: lambda = damp * mean(diag H) added to the diagonal (GPTQ's percdamp, usually 0.01).
    pub damp: f64,
    /// Columns per lazy update block.
    pub block_size: usize,
    pub act_order: bool,
    /// Calibration tokens used for the Hessian (evenly subsampled). Give GPTQ well over `in_features` tokens:
    /// with fewer, H is rank-deficient and GPTQ overfits the calibration subspace (measured on real SmolLM2
    /// down_proj, 1536 inputs, 895 tokens: held-out error above RTN's).
    pub max_tokens: usize,
}

impl GptqConfig {
    pub fn new(format: WeightFormat) -> Self {
        Self { format, damp: 0.01, block_size: 128, act_order: false, max_tokens: 512 }
    }
}

/// The layer Hessian 2/n X^T X (f64, `in x in`).
pub fn layer_hessian(x: &MatrixRef<'_>) -> Vec<f64> {
    hessian_kernel(Isa::detect(), x.data(), x.rows(), x.cols())
}

multiversion! {
    fn hessian_kernel(data: &[f32], n: usize, d: usize) -> Vec<f64> {
        hessian_inline(data, n, d)
    }
}

#[inline(always)]
fn hessian_inline(data: &[f32], n: usize, d: usize) -> Vec<f64> {
    let mut h = vec![0f64; d * d];
    // Accumulate the lower triangle in f32 blocks of tokens (fast), folding into f64 per block (accurate).
    let mut acc = vec![0f32; d * d];
    for (t, row) in data.chunks_exact(d).take(n).enumerate() {
        for i in 0..d {
            let xi = row[i];
            if xi != 0.0 {
                for (a, &xj) in acc[i * d..i * d + i + 1].iter_mut().zip(&row[..=i]) {
                    *a += xi * xj;
                }
            }
        }
        if t % 32 == 31 || t == n - 1 {
            for (hv, av) in h.iter_mut().zip(acc.iter_mut()) {
                *hv += *av as f64;
                *av = 0.0;
            }
        }
    }
    let f = 2.0 / n as f64;
    for i in 0..d {
        for j in 0..=i {
            let v = h[i * d + j] * f;
            h[i * d + j] = v;
            h[j * d + i] = v;
        }
    }
    h
}

/// Per-element quantizer state for the two supported formats.
enum Grid {
    Int4 {
        config: Int4Config,
        params: Vec<GroupParams>,
        gpr: usize,
        rounding: ScaleRounding,
    },
    Int8 {
        scales: Vec<f32>,
    },
    /// FP8 with one scale per row (`scales[r]`) or one for the matrix (`scales.len() == 1`), fixed from the
    /// original weights' amax. E4M3's grid is relative (three mantissa bits at every magnitude), so the error
    /// feedback is what GPTQ adds over RTN here: each rounding error is pushed onto correlated inputs.
    Fp8 {
        format: Fp8Format,
        scales: Vec<f32>,
    },
}

impl Grid {
    /// (code, dequantized value) of `v` at (row, natural column).
    #[inline]
    fn quantize(&self, r: usize, c: usize, v: f32) -> (u8, f32) {
        match self {
            Grid::Int4 { config, params, gpr, .. } => {
                let p = &params[r * gpr + c / config.group_size.get()];
                let q = p.quantize(v);
                (q, p.dequantize(q))
            }
            Grid::Int8 { scales } => {
                let q = (v / scales[r]).round_ties_even().clamp(-127.0, 127.0);
                (q as i8 as u8, q * scales[r])
            }
            Grid::Fp8 { format, scales } => {
                let s = scales[if scales.len() == 1 { 0 } else { r }];
                let code = format.encode(v / s, Saturation::Saturating);
                (code, format.decode(code) * s)
            }
        }
    }
}

/// How group scales are rounded to their storage before any value is rounded with them, so the values GPTQ
/// rounds to are exactly the ones the packed matrix decodes. Double quantization uses one per-tensor scale
/// fixed up front from the RTN group scales of the original weights (GPTQ's scales are fitted progressively).
#[derive(Clone, Copy)]
struct ScaleRounding {
    storage: ScaleStorage,
    dq_tensor_scale: f32,
}

impl ScaleRounding {
    fn round(&self, s: f32) -> Result<f32> {
        match self.storage {
            ScaleStorage::F32 => Ok(s),
            ScaleStorage::F16 => {
                let h = f16::from_f32(s);
                if h.is_infinite() {
                    return Err(QuantError::InvalidParameter {
                        name: "scales",
                        reason: format!("group scale {s} overflows f16"),
                    });
                }
                Ok(h.to_f32())
            }
            ScaleStorage::DoubleQuant => {
                let ts = self.dq_tensor_scale;
                Ok(if s > 0.0 { (s / ts).round_ties_even().clamp(1.0, 255.0) * ts } else { 0.0 })
            }
        }
    }

    /// Fit one group and express its zero point in the rounded scale.
    fn fit(&self, values: &[f32], symmetric: bool) -> Result<GroupParams> {
        let p = GroupParams::fit(values, symmetric, 1.0);
        let s = self.round(p.scale)?;
        let zero = if symmetric {
            8
        } else if s > 0.0 {
            (p.zero as f32 * p.scale / s).round_ties_even().clamp(0.0, 15.0) as u8
        } else {
            0
        };
        Ok(GroupParams { scale: s, zero })
    }

    fn store(&self, effective: &[f32]) -> Int4Scales {
        match self.storage {
            ScaleStorage::F32 => Int4Scales::F32(effective.to_vec()),
            ScaleStorage::F16 => Int4Scales::F16(effective.iter().map(|&s| f16::from_f32(s)).collect()),
            ScaleStorage::DoubleQuant => Int4Scales::DoubleQuant {
                codes: effective.iter().map(|&s| (s / self.dq_tensor_scale).round_ties_even() as u8).collect(),
                tensor_scale: self.dq_tensor_scale,
            },
        }
    }
}

multiversion! {
    /// Lazy update of every column after the block [i1, i2) with the whole block's errors:
    /// W[:, j] -= sum_i err_i * U[i][j].
    fn lazy_update(wt: &mut [f32], rows: usize, cols: usize, u: &[f64], err_block: &[f32], i1: usize, i2: usize) {
        for j in i2..cols {
            let cj = &mut wt[j * rows..(j + 1) * rows];
            for i in i1..i2 {
                let coef = u[i * cols + j] as f32;
                if coef != 0.0 {
                    let err = &err_block[(i - i1) * rows..(i - i1 + 1) * rows];
                    cj.iter_mut().zip(err).for_each(|(v, e)| *v -= e * coef);
                }
            }
        }
    }
}

/// Quantize `w` (`[out x in]`) with GPTQ using calibration inputs `x` (`[tokens x in]`).
pub fn gptq(w: &MatrixRef<'_>, x: &MatrixRef<'_>, config: &GptqConfig) -> Result<QuantizedMatrix> {
    check_calibration(x, w.cols())?;
    if config.block_size == 0 || config.max_tokens == 0 || !(config.damp >= 0.0 && config.damp.is_finite()) {
        return Err(QuantError::InvalidParameter {
            name: "GptqConfig",
            reason: "block_size and max_tokens must be positive, damp finite and >= 0".into(),
        });
    }
    let xs_data = subsample_rows(x, config.max_tokens);
    let xs = MatrixRef::new("calibration tokens", &xs_data, xs_data.len() / w.cols(), w.cols())?;
    gptq_with_hessian(w, layer_hessian(&xs), config)
}

/// GPTQ with a precomputed [`layer_hessian`] (`in x in`), so linears that read the same input (q/k/v,
/// gate/up) build it once.
pub fn gptq_with_hessian(w: &MatrixRef<'_>, mut h: Vec<f64>, config: &GptqConfig) -> Result<QuantizedMatrix> {
    let (rows, cols) = (w.rows(), w.cols());
    if h.len() != cols * cols {
        return Err(QuantError::LengthMismatch { what: "Hessian", expected: cols * cols, actual: h.len() });
    }
    if let Some(i) = h.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::NonFinite { what: "Hessian", index: i, value: h[i] as f32 });
    }
    if config.block_size == 0 || !(config.damp >= 0.0 && config.damp.is_finite()) {
        return Err(QuantError::InvalidParameter {
            name: "GptqConfig",
            reason: "block_size must be positive, damp finite and >= 0".into(),
        });
    }

    // Column-major working copy: wt[c] is column c (one value per output row), contiguous.
    let mut wt = vec![0f32; rows * cols];
    for r in 0..rows {
        for (c, &v) in w.row(r).iter().enumerate() {
            wt[c * rows + r] = v;
        }
    }
    // Inputs that never fire carry no information: pin their Hessian diagonal and zero their weights.
    for c in 0..cols {
        if h[c * cols + c] == 0.0 {
            h[c * cols + c] = 1.0;
            wt[c * rows..(c + 1) * rows].fill(0.0);
        }
    }
    let mean_diag = (0..cols).map(|c| h[c * cols + c]).sum::<f64>() / cols as f64;
    for c in 0..cols {
        h[c * cols + c] += config.damp * mean_diag;
    }

    let mut grid = match config.format {
        WeightFormat::Int4(c) => {
            let g = c.group_size.get();
            let gpr = cols.div_ceil(g);
            let original: Vec<GroupParams> = (0..rows)
                .flat_map(|r| w.row(r).chunks(g).map(|chunk| GroupParams::fit(chunk, c.symmetric, 1.0)))
                .collect();
            let max_scale = original.iter().fold(0f32, |m, p| m.max(p.scale));
            let rounding = ScaleRounding {
                storage: c.scales,
                dq_tensor_scale: if max_scale > 0.0 { max_scale / 255.0 } else { 1.0 },
            };
            let params = if config.act_order {
                // Static groups from the original weights.
                let mut all = Vec::with_capacity(rows * gpr);
                for r in 0..rows {
                    for chunk in w.row(r).chunks(g) {
                        all.push(rounding.fit(chunk, c.symmetric)?);
                    }
                }
                all
            } else {
                vec![GroupParams { scale: 0.0, zero: 8 }; rows * gpr]
            };
            Grid::Int4 { config: c, params, gpr, rounding }
        }
        WeightFormat::Int8 => Grid::Int8 { scales: (0..rows).map(|r| int8_scale(amax(w.row(r)))).collect() },
        WeightFormat::Fp8 { format, scaling } => Grid::Fp8 { format, scales: fp8_scales(w, format, scaling)? },
        _ => {
            return Err(QuantError::InvalidParameter {
                name: "format",
                reason: "GPTQ supports Int4, Int8 and FP8 weights".into(),
            });
        }
    };

    // Processing order (act-order: largest Hessian diagonal first).
    let mut perm: Vec<usize> = (0..cols).collect();
    if config.act_order {
        perm.sort_by(|&a, &b| h[b * cols + b].total_cmp(&h[a * cols + a]));
        let hp: Vec<f64> = (0..cols * cols).map(|i| h[perm[i / cols] * cols + perm[i % cols]]).collect();
        h = hp;
        let wp: Vec<f32> = (0..cols).flat_map(|i| wt[perm[i] * rows..(perm[i] + 1) * rows].to_vec()).collect();
        wt = wp;
    }
    let u = inverse_upper_cholesky(&h, cols)?;

    let mut codes = vec![0u8; rows * cols]; // row-major, natural column order
    let bs = config.block_size;
    let mut err_block = vec![0f32; bs * rows];
    for i1 in (0..cols).step_by(bs) {
        let i2 = (i1 + bs).min(cols);
        for i in i1..i2 {
            let c = perm[i];
            if let Grid::Int4 { config: ic, params, gpr, rounding } = &mut grid
                && !config.act_order
                && c.is_multiple_of(ic.group_size.get())
            {
                // Dynamic groups: fit on the current (error-updated) columns c..c+g.
                let g = ic.group_size.get();
                let end = (c + g).min(cols);
                let mut group = Vec::with_capacity(end - c);
                for r in 0..rows {
                    group.clear();
                    group.extend((c..end).map(|k| wt[k * rows + r]));
                    params[r * *gpr + c / g] = rounding.fit(&group, ic.symmetric)?;
                }
            }
            let d = u[i * cols + i] as f32;
            let (col, rest) = wt[i * rows..].split_at_mut(rows);
            let err = &mut err_block[(i - i1) * rows..(i - i1 + 1) * rows];
            for r in 0..rows {
                let (q, deq) = grid.quantize(r, c, col[r]);
                codes[r * cols + c] = q;
                err[r] = (col[r] - deq) / d;
            }
            // Error feedback inside the block.
            for j in i + 1..i2 {
                let coef = u[i * cols + j] as f32;
                let cj = &mut rest[(j - i - 1) * rows..(j - i) * rows];
                cj.iter_mut().zip(err.iter()).for_each(|(v, e)| *v -= e * coef);
            }
        }
        lazy_update(Isa::detect(), &mut wt, rows, cols, &u, &err_block, i1, i2);
    }

    Ok(match grid {
        Grid::Int4 { config: ic, params, rounding, .. } => {
            let packed = codes.chunks(cols).flat_map(pack_nibbles).collect();
            let effective: Vec<f32> = params.iter().map(|p| p.scale).collect();
            QuantizedMatrix::Int4(Int4Matrix {
                rows,
                cols,
                group_size: ic.group_size,
                packed,
                scales: rounding.store(&effective),
                zeros: if ic.symmetric { None } else { Some(params.iter().map(|p| p.zero).collect()) },
            })
        }
        Grid::Int8 { scales } => {
            QuantizedMatrix::Int8(Int8Matrix { rows, cols, codes: codes.iter().map(|&c| c as i8).collect(), scales })
        }
        Grid::Fp8 { format, scales } => QuantizedMatrix::Fp8(Fp8Matrix { format, rows, cols, codes, scales }),
    })
}

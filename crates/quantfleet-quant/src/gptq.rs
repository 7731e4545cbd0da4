//! GPTQ (Frantar et al. 2022): quantize a layer column by column, pushing each column's rounding error onto
//! the columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction loss
//! (H = 2/n X^T X from calibration inputs). Dampening keeps H invertible; the upper Cholesky factor of H^-1
//! supplies the update coefficients; updates are applied lazily in blocks of columns so the bulk of the work
//! is one rank-B update per block. Optional act-order quantizes columns with the largest H diagonal first;
//! with act-order the INT4 group parameters are fitted on the original weights ("static groups") so the packed
//! layout keeps contiguous groups and needs no column permutation at inference time.

use crate::error::{QuantError, Result};
use crate::fp8::Saturation;
use crate::fp8_matrix::Fp8Matrix;
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
    let (n, d) = (x.rows(), x.cols());
    let mut h = vec![0f64; d * d];
    hessian_accumulate(x.data(), n, d, 0..d, &mut h);
    finish_hessian(h, n, d)
}

/// Tokens per pass over the tiles: the block of X they read (`TOKEN_BLOCK x in` f32, 768 KiB at 1536 inputs)
/// stays in the L2 cache.
const TOKEN_BLOCK: usize = 128;
/// Token blocks summed in f32 before the sums are folded into the f64 H: 1024 products per f32 sum keep the
/// Hessian accurate to ~1e-6 relative, and folding once per block cost a third of the tiles' time.
const FOLD_BLOCKS: usize = 8;

/// Adds rows `rows` of the lower triangle (with the diagonal) of X^T X to `h_rows`, those rows of the row-major
/// `d x d` H (`data` is X, `n x d`): the first half of [`layer_hessian`], exposed so callers can give disjoint
/// row ranges to threads (row i costs i + 1 products per token).
///
/// A tile of H (`TI x TJ`, the ISA's register block: 8 x 32 on AVX-512, 6 x 16 on AVX2) keeps its sums in
/// registers over a block of tokens, one broadcast of `X[t][i]` and one load of `X[t][j..j + TJ]` per row of it:
/// a GEMM micro-kernel. Tiles on the ragged edge (d not a multiple of the tile) take the scalar path.
pub fn hessian_accumulate(data: &[f32], n: usize, d: usize, rows: std::ops::Range<usize>, h_rows: &mut [f64]) {
    hessian_accumulate_on(Isa::detect(), data, n, d, rows, h_rows)
}

/// [`hessian_accumulate`] with the tiles of `isa` (one the CPU supports).
fn hessian_accumulate_on(isa: Isa, data: &[f32], n: usize, d: usize, rows: std::ops::Range<usize>, h_rows: &mut [f64]) {
    assert!(data.len() >= n * d && rows.end <= d && h_rows.len() == rows.len() * d, "hessian_accumulate: shapes");
    let (ti, tj) = hessian_tile(isa);
    // f32 sums of these rows (the upper-triangle entries the diagonal tiles also compute are never folded).
    let mut acc = vec![0f32; rows.len() * d];
    let blocks = n.div_ceil(TOKEN_BLOCK);
    for b in 0..blocks {
        let x = &data[b * TOKEN_BLOCK * d..((b + 1) * TOKEN_BLOCK).min(n) * d];
        let mut i0 = rows.start;
        while i0 < rows.end {
            let ni = ti.min(rows.end - i0);
            // Columns 0..=i for row i: every tile that reaches the diagonal of the tile's last row.
            let mut j0 = 0;
            while j0 < i0 + ni {
                let nj = tj.min(d - j0);
                tile_sums(isa, x, d, (i0, ni), (j0, nj), &mut acc[(i0 - rows.start) * d..]);
                j0 += nj;
            }
            i0 += ni;
        }
        if (b + 1) % FOLD_BLOCKS == 0 || b + 1 == blocks {
            for (r, (h_row, acc_row)) in h_rows.chunks_exact_mut(d).zip(acc.chunks_exact_mut(d)).enumerate() {
                let i = rows.start + r;
                for (h, a) in h_row[..=i].iter_mut().zip(&acc_row[..=i]) {
                    *h += *a as f64;
                }
                acc_row.fill(0.0);
            }
        }
    }
}

/// Tile shape (rows, columns) of [`hessian_accumulate`] on `isa`.
fn hessian_tile(isa: Isa) -> (usize, usize) {
    match isa {
        Isa::Avx512 => (8, 32),
        Isa::Avx2 => (6, 16),
        Isa::Scalar => (4, 16),
    }
}

/// Adds `sum over the tokens of x of x[t][i0 + a] * x[t][j0 + b]` to `acc[a * d + j0 + b]` for a tile of
/// `ni x nj` (`acc` starts at H row i0, rows `d` apart).
fn tile_sums(isa: Isa, x: &[f32], d: usize, (i0, ni): (usize, usize), (j0, nj): (usize, usize), acc: &mut [f32]) {
    let (ti, tj) = hessian_tile(isa);
    assert!(acc.len() >= (ni - 1) * d + j0 + nj && i0 + ni <= d && j0 + nj <= d, "tile_sums: shapes");
    let tokens = x.len() / d;
    #[cfg(target_arch = "x86_64")]
    if (ni, nj) == (ti, tj) && isa != Isa::Scalar {
        // SAFETY: Isa::detect found the kernel's features; the tile lies inside every row of x and inside acc
        // (both checked just above).
        unsafe {
            match isa {
                Isa::Avx512 => hessian_x86::tile_8x32(x.as_ptr(), d, tokens, i0, j0, acc.as_mut_ptr()),
                _ => hessian_x86::tile_6x16(x.as_ptr(), d, tokens, i0, j0, acc.as_mut_ptr()),
            }
        }
        return;
    }
    let _ = (ti, tj);
    for row in x.chunks_exact(d) {
        for a in 0..ni {
            let xi = row[i0 + a];
            let out = &mut acc[a * d + j0..a * d + j0 + nj];
            for (o, &xj) in out.iter_mut().zip(&row[j0..j0 + nj]) {
                *o += xi * xj;
            }
        }
    }
}

/// The Hessian's register-blocked tiles, written with intrinsics: LLVM's vectorizer, given the portable loop,
/// vectorized across the tile's rows with a broadcast per column and ran 10x slower than the old row update.
#[cfg(target_arch = "x86_64")]
mod hessian_x86 {
    use std::arch::x86_64::*;

    /// An 8 x 32 tile: 16 AVX-512 accumulators, added to `acc` (rows `d` apart, from column j0).
    ///
    /// # Safety
    /// AVX-512F; `x` holds `tokens` rows of `d` f32 with `i0 + 8 <= d` and `j0 + 32 <= d`; `acc` has 8 rows of
    /// `d` from column j0.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_8x32(x: *const f32, d: usize, tokens: usize, i0: usize, j0: usize, acc: *mut f32) {
        // SAFETY: all pointers stay within the caller's bounds above.
        unsafe {
            let out = |a: usize, half: usize| acc.add(a * d + j0 + 16 * half);
            let mut c = [[_mm512_setzero_ps(); 2]; 8];
            for (a, ca) in c.iter_mut().enumerate() {
                *ca = [_mm512_loadu_ps(out(a, 0)), _mm512_loadu_ps(out(a, 1))];
            }
            for t in 0..tokens {
                let row = x.add(t * d);
                let b0 = _mm512_loadu_ps(row.add(j0));
                let b1 = _mm512_loadu_ps(row.add(j0 + 16));
                for (a, ca) in c.iter_mut().enumerate() {
                    let s = _mm512_set1_ps(*row.add(i0 + a));
                    ca[0] = _mm512_fmadd_ps(s, b0, ca[0]);
                    ca[1] = _mm512_fmadd_ps(s, b1, ca[1]);
                }
            }
            for (a, ca) in c.iter().enumerate() {
                _mm512_storeu_ps(out(a, 0), ca[0]);
                _mm512_storeu_ps(out(a, 1), ca[1]);
            }
        }
    }

    /// A 6 x 16 tile: 12 AVX2 accumulators (with two loads and a broadcast, 15 of the 16 registers), added to
    /// `acc` (rows `d` apart, from column j0).
    ///
    /// # Safety
    /// AVX2 and FMA; `x` holds `tokens` rows of `d` f32 with `i0 + 6 <= d` and `j0 + 16 <= d`; `acc` has 6 rows
    /// of `d` from column j0.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_6x16(x: *const f32, d: usize, tokens: usize, i0: usize, j0: usize, acc: *mut f32) {
        // SAFETY: all pointers stay within the caller's bounds above.
        unsafe {
            let out = |a: usize, half: usize| acc.add(a * d + j0 + 8 * half);
            let mut c = [[_mm256_setzero_ps(); 2]; 6];
            for (a, ca) in c.iter_mut().enumerate() {
                *ca = [_mm256_loadu_ps(out(a, 0)), _mm256_loadu_ps(out(a, 1))];
            }
            for t in 0..tokens {
                let row = x.add(t * d);
                let b0 = _mm256_loadu_ps(row.add(j0));
                let b1 = _mm256_loadu_ps(row.add(j0 + 8));
                for (a, ca) in c.iter_mut().enumerate() {
                    let s = _mm256_broadcast_ss(&*row.add(i0 + a));
                    ca[0] = _mm256_fmadd_ps(s, b0, ca[0]);
                    ca[1] = _mm256_fmadd_ps(s, b1, ca[1]);
                }
            }
            for (a, ca) in c.iter().enumerate() {
                _mm256_storeu_ps(out(a, 0), ca[0]);
                _mm256_storeu_ps(out(a, 1), ca[1]);
            }
        }
    }
}

/// Mirrors the lower triangle accumulated by [`hessian_accumulate`] and scales it by 2/n.
pub fn finish_hessian(mut h: Vec<f64>, n: usize, d: usize) -> Vec<f64> {
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
    /// FP8 with one scale per row, per group or for the matrix, fixed from the original weights' amax (an
    /// empty matrix: `Fp8Matrix::scale` indexes them). E4M3's grid is relative (three mantissa bits at every
    /// magnitude), so the error feedback is what GPTQ adds over RTN here: each rounding error is pushed onto
    /// correlated inputs.
    Fp8(Fp8Matrix),
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
            Grid::Fp8(m) => {
                let s = m.scale(r, c);
                let code = m.format.encode(v / s, Saturation::Saturating);
                (code, m.format.decode(code) * s)
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
    /// Lazy update of every column after the block `[i1, i2)` with the whole block's errors:
    /// `W[:, j] -= sum_i err_i * U[i][j]`.
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
/// gate/up) build it once. Several linears of one input should share a [`GptqHessian`] instead
/// ([`gptq_prepared`]), which also factors it once.
pub fn gptq_with_hessian(w: &MatrixRef<'_>, h: Vec<f64>, config: &GptqConfig) -> Result<QuantizedMatrix> {
    gptq_prepared(w, &GptqHessian::new(h, w.cols(), config)?, config)
}

/// What GPTQ derives from the Hessian alone: the inputs that never fire, the damped Hessian's processing order
/// (act-order: largest diagonal first) and the upper Cholesky factor of its inverse in that order. The same
/// for every linear that reads the same input, so q/k/v (and gate/up) factor it once instead of once each.
#[derive(Debug, Clone)]
pub struct GptqHessian {
    cols: usize,
    /// Inputs whose Hessian diagonal is 0: their weights carry nothing and are zeroed.
    dead: Vec<bool>,
    perm: Vec<usize>,
    u: Vec<f64>,
    /// The settings it was made for ([`gptq_prepared`] refuses others).
    damp: f64,
    act_order: bool,
}

impl GptqHessian {
    /// Prepares `h` (`cols x cols`, from [`layer_hessian`]) for `config`'s damping and order.
    pub fn new(mut h: Vec<f64>, cols: usize, config: &GptqConfig) -> Result<Self> {
        if h.len() != cols * cols {
            return Err(QuantError::LengthMismatch { what: "Hessian", expected: cols * cols, actual: h.len() });
        }
        if let Some(i) = h.iter().position(|v| !v.is_finite()) {
            return Err(QuantError::NonFinite { what: "Hessian", index: i, value: h[i] as f32 });
        }
        // The block size is the quantization's, checked by `gptq_prepared`.
        if !(config.damp >= 0.0 && config.damp.is_finite()) {
            return Err(QuantError::InvalidParameter {
                name: "GptqConfig",
                reason: "damp must be finite and >= 0".into(),
            });
        }
        // Inputs that never fire carry no information: pin their Hessian diagonal (their weights are zeroed).
        let dead: Vec<bool> = (0..cols).map(|c| h[c * cols + c] == 0.0).collect();
        for c in (0..cols).filter(|&c| dead[c]) {
            h[c * cols + c] = 1.0;
        }
        let mean_diag = (0..cols).map(|c| h[c * cols + c]).sum::<f64>() / cols as f64;
        for c in 0..cols {
            h[c * cols + c] += config.damp * mean_diag;
        }
        // Processing order (act-order: largest Hessian diagonal first).
        let mut perm: Vec<usize> = (0..cols).collect();
        if config.act_order {
            perm.sort_by(|&a, &b| h[b * cols + b].total_cmp(&h[a * cols + a]));
            h = (0..cols * cols).map(|i| h[perm[i / cols] * cols + perm[i % cols]]).collect();
        }
        let u = inverse_upper_cholesky(&h, cols)?;
        Ok(Self { cols, dead, perm, u, damp: config.damp, act_order: config.act_order })
    }
}

/// GPTQ of `w` (`[out x in]`) with a prepared Hessian of its input ([`GptqHessian::new`] with the same
/// damping and order as `config`).
pub fn gptq_prepared(w: &MatrixRef<'_>, hessian: &GptqHessian, config: &GptqConfig) -> Result<QuantizedMatrix> {
    let (rows, cols) = (w.rows(), w.cols());
    if hessian.cols != cols {
        return Err(QuantError::LengthMismatch { what: "Hessian columns", expected: cols, actual: hessian.cols });
    }
    if config.block_size == 0 || hessian.damp != config.damp || hessian.act_order != config.act_order {
        return Err(QuantError::InvalidParameter {
            name: "GptqConfig",
            reason: "block_size must be positive, and damp and act_order those the Hessian was prepared with".into(),
        });
    }
    let GptqHessian { dead, perm, u, .. } = hessian;

    // Column-major working copy: wt[c] is column c (one value per output row), contiguous; inputs that never
    // fire have their weights zeroed.
    let mut wt = vec![0f32; rows * cols];
    for r in 0..rows {
        for (c, &v) in w.row(r).iter().enumerate() {
            wt[c * rows + r] = if dead[c] { 0.0 } else { v };
        }
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
        WeightFormat::Fp8 { format, scaling } => Grid::Fp8(Fp8Matrix::with_scales_of(w, format, scaling)?),
        _ => {
            return Err(QuantError::InvalidParameter {
                name: "format",
                reason: "GPTQ supports Int4, Int8 and FP8 weights".into(),
            });
        }
    };

    if config.act_order {
        wt = (0..cols).flat_map(|i| wt[perm[i] * rows..(perm[i] + 1) * rows].to_vec()).collect();
    }

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
        lazy_update(Isa::detect(), &mut wt, rows, cols, u, &err_block, i1, i2);
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
        Grid::Fp8(m) => QuantizedMatrix::Fp8(Fp8Matrix { codes, ..m }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Synthetic inputs (a fixed LCG, values in [-2, 2)) for the Hessian's shape tests.
    fn inputs(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n * d)
            .map(|_| {
                s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                (s >> 40) as f32 / (1u64 << 22) as f32 - 2.0
            })
            .collect()
    }

    #[test]
    fn blocked_hessian_equals_the_definition_on_every_isa_shape_and_row_split() {
        // Shapes around both tiles (8 x 32, 6 x 16), the 128-token block and the 8-block f32 fold, ragged edges
        // included.
        for (n, d) in [(1, 1), (5, 7), (130, 37), (300, 64), (129, 100), (257, 33), (1100, 40)] {
            let x = inputs(n, d, (n * 1000 + d) as u64);
            let mut want = vec![0f64; d * d];
            for row in x.chunks_exact(d) {
                for i in 0..d {
                    for j in 0..d {
                        want[i * d + j] += 2.0 * row[i] as f64 * row[j] as f64 / n as f64;
                    }
                }
            }
            for isa in Isa::available() {
                // The whole matrix at once, and as three row ranges filled separately (as threads do).
                let cuts = [0, d / 3, d / 2 + 1, d].map(|c| c.min(d));
                let mut split = vec![0f64; d * d];
                for w in cuts.windows(2) {
                    let rows = w[0]..w[1];
                    hessian_accumulate_on(isa, &x, n, d, rows.clone(), &mut split[rows.start * d..rows.end * d]);
                }
                let mut whole = vec![0f64; d * d];
                hessian_accumulate_on(isa, &x, n, d, 0..d, &mut whole);
                // Tiles fall differently in a range, so the f32 sums may differ in their last bits.
                for got in [finish_hessian(whole, n, d), finish_hessian(split, n, d)] {
                    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{isa:?} n={n} d={d} H[{k}] {g} vs {w}");
                    }
                }
            }
        }
    }

    /// Linears of one input sharing a [`GptqHessian`] get exactly what each gets from its own Hessian
    /// ([`gptq_with_hessian`]): INT4 with dynamic groups and FP8 with act-order, an input that never fires
    /// included (its weights come out zero). A Hessian prepared for other settings or another width is
    /// refused. SYNTHETIC weights and inputs.
    #[test]
    fn a_shared_prepared_hessian_quantizes_as_a_fresh_one() {
        let (n, d) = (200, 96);
        let mut x = inputs(n, d, 7);
        for row in x.chunks_exact_mut(d) {
            row[5] = 0.0;
        }
        let h = layer_hessian(&MatrixRef::new("x", &x, n, d).unwrap());
        let fp8 = WeightFormat::Fp8 { format: crate::Fp8Format::E4M3, scaling: crate::Fp8Scaling::PerRow };
        for (format, act_order) in
            [(WeightFormat::Int4(crate::Int4Config::asymmetric(32).unwrap()), false), (fp8, true)]
        {
            let mut config = GptqConfig::new(format);
            config.act_order = act_order;
            let shared = GptqHessian::new(h.clone(), d, &config).unwrap();
            for (rows, seed) in [(32, 11), (64, 12)] {
                let w = inputs(rows, d, seed);
                let w = MatrixRef::new("w", &w, rows, d).unwrap();
                let got = gptq_prepared(&w, &shared, &config).unwrap();
                assert_eq!(got, gptq_with_hessian(&w, h.clone(), &config).unwrap(), "{format:?} {rows} rows");
                assert!(got.dequantize().chunks_exact(d).all(|r| r[5] == 0.0), "the dead input's weights are zero");
            }
            let w = inputs(8, d, 13);
            let w = MatrixRef::new("w", &w, 8, d).unwrap();
            let mut other = config;
            other.act_order = !act_order;
            assert!(gptq_prepared(&w, &shared, &other).is_err(), "another order");
            other = config;
            other.damp *= 2.0;
            assert!(gptq_prepared(&w, &shared, &other).is_err(), "another damping");
            let narrow = inputs(8, d - 32, 14);
            let narrow = MatrixRef::new("w", &narrow, 8, d - 32).unwrap();
            assert!(gptq_prepared(&narrow, &shared, &config).is_err(), "another width");
        }
    }
}

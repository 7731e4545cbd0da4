//! AWQ (activation-aware weight quantization, Lin et al. 2023): protect the weights that meet large
//! activations by scaling input channel j by s_j = mean|X_j|^alpha (normalised), quantizing W*diag(s),
//! and folding 1/s into the previous operation (RMSNorm gain or the previous linear's output rows), so the
//! layer computes (X/s)(Q(W s))^T ~= X W^T. alpha is searched on a grid against the layer's output error on
//! calibration tokens; an optional per-group clipping search then shrinks INT4 group ranges where that lowers
//! the output error.

use crate::error::{QuantError, Result};
use crate::int4::{GroupParams, quantize_with_params};
use crate::matrix::{MatrixRef, check_calibration, dot_lanes, matmul_xwt, nmse, subsample_rows};
use crate::quantized::{QuantizedMatrix, WeightFormat, quantize_rtn};
use crate::simd::multiversion;

/// AWQ search settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AwqConfig {
    pub format: WeightFormat,
    /// alpha takes `grid + 1` values 0, 1/grid, ..., 1 (alpha = 0 is plain RTN, so AWQ never loses to it
    /// on the search tokens).
    pub grid: usize,
    /// Per-group clipping search (INT4 formats only).
    pub clip_search: bool,
    /// Clip ratios tried: 1.0 down to 1 - 0.05 * (clip_grid - 1).
    pub clip_grid: usize,
    /// Calibration tokens used by the searches (evenly subsampled).
    pub max_tokens: usize,
}

impl AwqConfig {
    /// The usual settings for a format: 20 alpha points, clipping for INT4, 128 search tokens.
    pub fn new(format: WeightFormat) -> Self {
        Self { format, grid: 20, clip_search: matches!(format, WeightFormat::Int4(_)), clip_grid: 10, max_tokens: 128 }
    }
}

/// An AWQ-quantized layer.
#[derive(Clone, Debug)]
pub struct AwqResult {
    /// Chosen exponent.
    pub alpha: f32,
    /// Per-input-channel scales s; `weight` holds Q(W diag(s)), so inputs must be divided by s.
    pub input_scales: Vec<f32>,
    pub weight: QuantizedMatrix,
    /// Output NMSE on the search tokens: plain RTN and the final AWQ result.
    pub search_nmse_rtn: f64,
    pub search_nmse: f64,
}

impl AwqResult {
    /// Q(W s) / s: the weight to use when the scales cannot be folded into a previous op.
    pub fn effective_weight(&self) -> Vec<f32> {
        let cols = self.weight.cols();
        let mut w = self.weight.dequantize();
        for (i, v) in w.iter_mut().enumerate() {
            *v /= self.input_scales[i % cols];
        }
        w
    }
}

/// Fold AWQ/SmoothQuant input scales into a preceding RMSNorm/LayerNorm gain: gamma_j /= s_j.
pub fn fold_into_norm(gamma: &mut [f32], input_scales: &[f32]) -> Result<()> {
    if gamma.len() != input_scales.len() {
        return Err(QuantError::LengthMismatch {
            what: "norm gain",
            expected: input_scales.len(),
            actual: gamma.len(),
        });
    }
    gamma.iter_mut().zip(input_scales).for_each(|(g, s)| *g /= s);
    Ok(())
}

/// Fold input scales into the previous linear layer `[prev_out x prev_in]` whose outputs feed this layer:
/// its output row j is divided by s_j (e.g. v_proj before o_proj, up_proj before down_proj).
pub fn fold_into_previous_linear(prev: &mut [f32], prev_out: usize, input_scales: &[f32]) -> Result<()> {
    if prev_out != input_scales.len() || prev_out == 0 || !prev.len().is_multiple_of(prev_out) {
        return Err(QuantError::LengthMismatch {
            what: "previous linear rows",
            expected: input_scales.len(),
            actual: prev_out,
        });
    }
    let cols = prev.len() / prev_out;
    for (row, s) in prev.chunks_mut(cols).zip(input_scales) {
        row.iter_mut().for_each(|v| *v /= s);
    }
    Ok(())
}

fn scaled_weight(w: &MatrixRef<'_>, s: &[f32]) -> Vec<f32> {
    w.data().iter().enumerate().map(|(i, &v)| v * s[i % w.cols()]).collect()
}

/// Run AWQ on one linear layer: `w` is `[out x in]`, `x` the calibration inputs `[tokens x in]`.
pub fn awq(w: &MatrixRef<'_>, x: &MatrixRef<'_>, config: &AwqConfig) -> Result<AwqResult> {
    check_calibration(x, w.cols())?;
    if config.grid == 0 || config.max_tokens == 0 || (config.clip_search && config.clip_grid == 0) {
        return Err(QuantError::InvalidParameter {
            name: "AwqConfig",
            reason: "grid, clip_grid and max_tokens must be positive".into(),
        });
    }
    if config.clip_search && config.clip_grid > 19 {
        return Err(QuantError::InvalidParameter {
            name: "clip_grid",
            reason: "at most 19 ratios (down to 0.1)".into(),
        });
    }
    let int4 = match config.format {
        WeightFormat::Int4(c) => Some(c),
        _ if config.clip_search => {
            return Err(QuantError::InvalidParameter {
                name: "clip_search",
                reason: "clipping search needs an INT4 format".into(),
            });
        }
        _ => None,
    };
    let (rows, cols) = (w.rows(), w.cols());
    let xs_data = subsample_rows(x, config.max_tokens);
    let xs = MatrixRef::new("calibration tokens", &xs_data, xs_data.len() / cols, cols)?;

    // Mean |activation| per input channel over all calibration tokens.
    let mut mean_abs = vec![0f64; cols];
    for t in 0..x.rows() {
        for (m, v) in mean_abs.iter_mut().zip(x.row(t)) {
            *m += v.abs() as f64;
        }
    }
    let mean_abs: Vec<f32> = mean_abs.iter().map(|m| ((m / x.rows() as f64) as f32).max(1e-4)).collect();

    let y_ref = matmul_xwt(xs.data(), xs.rows(), w.data(), rows, cols);
    let search_nmse = |w_hat: &[f32]| nmse(&y_ref, &matmul_xwt(xs.data(), xs.rows(), w_hat, rows, cols));
    let mut best: Option<(f64, f32, Vec<f32>, QuantizedMatrix)> = None;
    let mut rtn_nmse = f64::NAN;
    for step in 0..=config.grid {
        let alpha = step as f32 / config.grid as f32;
        let mut s: Vec<f32> = mean_abs.iter().map(|m| m.powf(alpha)).collect();
        // Normalise so scales straddle 1 (as AWQ does): keeps W s in a sane range for any alpha.
        let (lo, hi) = s.iter().fold((f32::MAX, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let norm = (lo * hi).sqrt();
        s.iter_mut().for_each(|v| *v /= norm);
        let ws = scaled_weight(w, &s);
        let q = quantize_rtn(&MatrixRef::new("scaled weight", &ws, rows, cols)?, &config.format)?;
        let mut w_hat = q.dequantize();
        w_hat.iter_mut().enumerate().for_each(|(i, v)| *v /= s[i % cols]);
        let err = search_nmse(&w_hat);
        if step == 0 {
            rtn_nmse = err;
        }
        if best.as_ref().is_none_or(|b| err < b.0) {
            best = Some((err, alpha, s, q));
        }
    }
    let (mut err, alpha, s, mut weight) = best.expect("grid has at least one point");

    if let (true, Some(int4)) = (config.clip_search, int4) {
        let ws = scaled_weight(w, &s);
        let wsm = MatrixRef::new("scaled weight", &ws, rows, cols)?;
        // Inputs of the scaled layer: X / s.
        let xs_scaled: Vec<f32> = xs.data().iter().enumerate().map(|(i, &v)| v / s[i % cols]).collect();
        let params = clip_search(
            crate::Isa::detect(),
            &ws,
            rows,
            cols,
            &xs_scaled,
            xs.rows(),
            int4.group_size.get(),
            int4.symmetric,
            config.clip_grid,
        );
        let clipped = QuantizedMatrix::Int4(quantize_with_params(crate::Isa::detect(), &wsm, &int4, &params)?);
        let mut w_hat = clipped.dequantize();
        w_hat.iter_mut().enumerate().for_each(|(i, v)| *v /= s[i % cols]);
        let clipped_err = search_nmse(&w_hat);
        // Clipping is chosen per group on that group's own output contribution; keep it only if the whole
        // layer agrees (cross-group error terms can disagree).
        if clipped_err < err {
            err = clipped_err;
            weight = clipped;
        }
    }
    Ok(AwqResult { alpha, input_scales: s, weight, search_nmse_rtn: rtn_nmse, search_nmse: err })
}

multiversion! {
    /// Per (row, group): the clip ratio whose quantized group minimises sum_t (x_t,g . (w_g - w_hat_g))^2
    /// over the `n` rows of `x` (`[n x cols]`, already divided by the AWQ scales).
    fn clip_search(
        w: &[f32],
        rows: usize,
        cols: usize,
        x: &[f32],
        n: usize,
        group: usize,
        symmetric: bool,
        clip_grid: usize,
    ) -> Vec<GroupParams> {
        let mut params = Vec::with_capacity(rows * cols.div_ceil(group));
        let mut diff = vec![0f32; group];
        for r in 0..rows {
            for (gi, values) in w[r * cols..(r + 1) * cols].chunks(group).enumerate() {
                let c0 = gi * group;
                let mut best = (f64::INFINITY, GroupParams::fit(values, symmetric, 1.0));
                for k in 0..clip_grid {
                    let p = GroupParams::fit(values, symmetric, 1.0 - 0.05 * k as f32);
                    for (d, &v) in diff.iter_mut().zip(values) {
                        *d = v - p.dequantize(p.quantize(v));
                    }
                    let mut err = 0f64;
                    for t in 0..n {
                        let e = dot_lanes(&x[t * cols + c0..t * cols + c0 + values.len()], &diff[..values.len()]);
                        err += (e as f64) * (e as f64);
                    }
                    if err < best.0 {
                        best = (err, p);
                    }
                }
                params.push(best.1);
            }
        }
        params
    }
}

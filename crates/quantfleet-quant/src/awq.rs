//! AWQ (activation-aware weight quantization, Lin et al. 2023): protect the weights that meet large
//! activations by scaling input channel j by s_j = mean|X_j|^alpha (normalised), quantizing W*diag(s),
//! and folding 1/s into the previous operation (RMSNorm gain or the previous linear's output rows), so the
//! layer computes (X/s)(Q(W s))^T ~= X W^T. alpha is searched on a grid against the layer's output error on
//! calibration tokens; an optional per-group clipping search then shrinks INT4 group ranges where that lowers
//! the output error.

use crate::error::{QuantError, Result};
use crate::int4::{GroupParams, quantize_with_params};
use crate::matrix::{MatrixRef, check_calibration, matmul_xwt, scale_columns, subsample_rows, unscale_columns};
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
        let mut w = self.weight.dequantize();
        unscale_columns(&mut w, &self.input_scales);
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
    scale_columns(w.data(), s)
}

/// Run AWQ on one linear layer: `w` is `[out x in]`, `x` the calibration inputs `[tokens x in]`.
pub fn awq(w: &MatrixRef<'_>, x: &MatrixRef<'_>, config: &AwqConfig) -> Result<AwqResult> {
    let mut shared = awq_shared_input(std::slice::from_ref(w), x, config)?;
    Ok(AwqResult {
        alpha: shared.alpha,
        input_scales: shared.input_scales,
        weight: shared.weights.remove(0),
        search_nmse_rtn: shared.search_nmse_rtn,
        search_nmse: shared.search_nmse,
    })
}

/// AWQ for linears that read the same input (q/k/v after the attention norm, gate/up after the FFN norm):
/// one set of input scales, searched on their combined output error, so that 1/s folds into the single
/// shared previous op. Each weight then gets its own clipping search.
#[derive(Clone, Debug)]
pub struct AwqSharedResult {
    pub alpha: f32,
    pub input_scales: Vec<f32>,
    /// Q(W_i diag(s)) for each input weight, in order.
    pub weights: Vec<QuantizedMatrix>,
    /// Combined output NMSE on the search tokens (sum of squared errors over sum of squared outputs).
    pub search_nmse_rtn: f64,
    pub search_nmse: f64,
}

impl AwqSharedResult {
    /// Q(W_i s) / s for member `i`, when the scales cannot be folded.
    pub fn effective_weight(&self, i: usize) -> Option<Vec<f32>> {
        let q = self.weights.get(i)?;
        let mut w = q.dequantize();
        unscale_columns(&mut w, &self.input_scales);
        Some(w)
    }
}

/// Squared error and squared reference norm of one member's outputs.
fn output_error(y_ref: &[f32], y: &[f32]) -> (f64, f64) {
    y_ref.iter().zip(y).fold((0.0, 0.0), |(e, r), (&a, &b)| {
        let d = (a - b) as f64;
        (e + d * d, r + (a as f64) * (a as f64))
    })
}

/// See [`AwqSharedResult`]. Every weight must have `x.cols()` input features.
pub fn awq_shared_input(ws: &[MatrixRef<'_>], x: &MatrixRef<'_>, config: &AwqConfig) -> Result<AwqSharedResult> {
    if ws.is_empty() {
        return Err(QuantError::Empty { what: "AWQ weight list" });
    }
    for w in ws {
        check_calibration(x, w.cols())?;
    }
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
    let cols = x.cols();
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

    let y_refs: Vec<Vec<f32>> = ws.iter().map(|w| matmul_xwt(xs.data(), xs.rows(), w.data(), w.rows(), cols)).collect();
    // Combined NMSE of candidate weights (one per member).
    let combined = |w_hats: &[Vec<f32>]| -> f64 {
        let (mut e, mut r) = (0.0, 0.0);
        for ((w, w_hat), y_ref) in ws.iter().zip(w_hats).zip(&y_refs) {
            let (de, dr) = output_error(y_ref, &matmul_xwt(xs.data(), xs.rows(), w_hat, w.rows(), cols));
            e += de;
            r += dr;
        }
        if r > 0.0 { e / r } else { e }
    };
    let unscale = |q: &QuantizedMatrix, s: &[f32]| -> Vec<f32> {
        let mut w_hat = q.dequantize();
        unscale_columns(&mut w_hat, s);
        w_hat
    };

    let mut best: Option<(f64, f32, Vec<f32>, Vec<QuantizedMatrix>)> = None;
    let mut rtn_nmse = f64::NAN;
    for step in 0..=config.grid {
        let alpha = step as f32 / config.grid as f32;
        let mut s: Vec<f32> = mean_abs.iter().map(|m| m.powf(alpha)).collect();
        // Normalise so scales straddle 1 (as AWQ does): keeps W s in a sane range for any alpha.
        let (lo, hi) = s.iter().fold((f32::MAX, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let norm = (lo * hi).sqrt();
        s.iter_mut().for_each(|v| *v /= norm);
        let mut qs = Vec::with_capacity(ws.len());
        for w in ws {
            let scaled = scaled_weight(w, &s);
            qs.push(quantize_rtn(&MatrixRef::new("scaled weight", &scaled, w.rows(), cols)?, &config.format)?);
        }
        let w_hats: Vec<Vec<f32>> = qs.iter().map(|q| unscale(q, &s)).collect();
        let err = combined(&w_hats);
        if step == 0 {
            rtn_nmse = err;
        }
        if best.as_ref().is_none_or(|b| err < b.0) {
            best = Some((err, alpha, s, qs));
        }
    }
    let Some((mut err, alpha, s, mut weights)) = best else {
        return Err(QuantError::Empty { what: "alpha grid" });
    };

    if let (true, Some(int4)) = (config.clip_search, int4) {
        // Inputs of the scaled layer, X / s, transposed to [cols x tokens] for the clipping search.
        let n = xs.rows();
        let mut xt = vec![0f32; cols * n];
        for t in 0..n {
            for (c, &v) in xs.row(t).iter().enumerate() {
                xt[c * n + t] = v / s[c];
            }
        }
        let mut clipped = Vec::with_capacity(ws.len());
        for w in ws {
            let scaled = scaled_weight(w, &s);
            let params = clip_search(
                crate::Isa::detect(),
                &scaled,
                w.rows(),
                cols,
                &xt,
                n,
                int4.group_size.get(),
                int4.symmetric,
                config.clip_grid,
            );
            let m = MatrixRef::new("scaled weight", &scaled, w.rows(), cols)?;
            clipped.push(QuantizedMatrix::Int4(quantize_with_params(crate::Isa::detect(), &m, &int4, &params)?));
        }
        let clipped_err = combined(&clipped.iter().map(|q| unscale(q, &s)).collect::<Vec<_>>());
        // Clipping is chosen per group on that group's own output contribution; keep it only if the whole
        // layer agrees (cross-group error terms can disagree).
        if clipped_err < err {
            err = clipped_err;
            weights = clipped;
        }
    }
    Ok(AwqSharedResult { alpha, input_scales: s, weights, search_nmse_rtn: rtn_nmse, search_nmse: err })
}

multiversion! {
    /// Per (row, group): the clip ratio whose quantized group minimises sum_t (x_t,g . (w_g - w_hat_g))^2
    /// over `n` tokens; `xt` is the inputs TRANSPOSED, `[cols x n]`, already divided by the AWQ scales.
    fn clip_search(
        w: &[f32],
        rows: usize,
        cols: usize,
        xt: &[f32],
        n: usize,
        group: usize,
        symmetric: bool,
        clip_grid: usize,
    ) -> Vec<GroupParams> {
        let mut params = Vec::with_capacity(rows * cols.div_ceil(group));
        let mut diff = vec![0f32; group];
        let mut e = vec![0f32; n];
        for r in 0..rows {
            for (gi, values) in w[r * cols..(r + 1) * cols].chunks(group).enumerate() {
                let c0 = gi * group;
                let mut best = (f64::INFINITY, GroupParams::fit(values, symmetric, 1.0));
                for k in 0..clip_grid {
                    let p = GroupParams::fit(values, symmetric, 1.0 - 0.05 * k as f32);
                    for (d, &v) in diff.iter_mut().zip(values) {
                        *d = v - p.dequantize(p.quantize(v));
                    }
                    // e = X_g d for all tokens at once: axpys over the transposed inputs (contiguous in t).
                    e.fill(0.0);
                    for (k, &dk) in diff[..values.len()].iter().enumerate() {
                        let col = &xt[(c0 + k) * n..(c0 + k + 1) * n];
                        e.iter_mut().zip(col).for_each(|(ev, &xv)| *ev += dk * xv);
                    }
                    let err: f64 = e.iter().map(|&v| (v as f64) * (v as f64)).sum();
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

//! SmoothQuant (Xiao et al. 2022) for W8A8: activation outliers sit in a few input channels, which wrecks
//! per-token activation quantization. Migrate difficulty from activations to weights with per-input-channel
//! factors s_j = max|X_j|^alpha / max|W_j|^(1-alpha): the layer computes (X/s)(W s)^T, where X/s is easy to
//! quantize per token and W s is still easy per output channel. 1/s folds into the previous op like AWQ's
//! scales ([`crate::awq::fold_into_norm`]). alpha is fixed or searched on calibration tokens.

use crate::error::{QuantError, Result};
use crate::fp8::Fp8Format;
use crate::fp8_matrix::{Fp8Scaling, quantize_fp8};
use crate::matrix::{
    MatrixRef, amax, check_calibration, matmul_xwt, nmse, scale_columns, subsample_rows, unscale_columns,
};
use crate::quantized::{QuantizedMatrix, WeightFormat, quantize_rtn};

/// Activation element type of a W8A8 layer (activations are quantized per token, dynamically).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivationFormat {
    /// INT8, one scale per token (the SmoothQuant paper's per-token dynamic quantization).
    Int8,
    /// INT8, one scale per token and block of 32 channels (llama.cpp's Q8_0 activations; the CPU engine's
    /// W8A8/W4A8 tiers). Finer than per token, so it needs less smoothing.
    Int8Block32,
    Fp8E4M3,
}

/// SmoothQuant settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SmoothQuantConfig {
    /// Migration strength; `None` searches 0, 0.05, ..., 1 on the calibration tokens.
    pub alpha: Option<f32>,
    pub activations: ActivationFormat,
    /// Weight format: `Int8` or `Fp8 { .. }` (per output channel).
    pub weights: WeightFormat,
    pub max_tokens: usize,
}

impl SmoothQuantConfig {
    /// INT8 weights and activations with alpha searched.
    pub fn int8() -> Self {
        Self { alpha: None, activations: ActivationFormat::Int8, weights: WeightFormat::Int8, max_tokens: 256 }
    }
    /// FP8 E4M3 weights (per channel) and activations (per token) with alpha searched.
    pub fn fp8() -> Self {
        Self {
            alpha: None,
            activations: ActivationFormat::Fp8E4M3,
            weights: WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling: Fp8Scaling::PerRow },
            max_tokens: 256,
        }
    }
}

/// A smoothed, quantized W8A8 layer.
#[derive(Clone, Debug)]
pub struct SmoothQuantResult {
    /// Chosen migration strength; `None` when no smoothing (s = 1) was best on the calibration tokens.
    pub alpha: Option<f32>,
    /// Per-input-channel factors: inputs are divided by them, `weight` holds Q(W diag(s)).
    pub smoothing: Vec<f32>,
    pub weight: QuantizedMatrix,
    pub activations: ActivationFormat,
    /// Output NMSE on the calibration tokens used for the search.
    pub search_nmse: f64,
}

/// Quantize-dequantize activations per token (the runtime W8A8 path does this on the fly).
pub fn fake_quantize_activations(x: &MatrixRef<'_>, format: ActivationFormat) -> Result<Vec<f32>> {
    match format {
        ActivationFormat::Int8 => {
            let mut out = vec![0f32; x.rows() * x.cols()];
            let mut codes = vec![0i8; x.cols()];
            for (t, o) in out.chunks_mut(x.cols()).enumerate() {
                let s = crate::int8::int8_scale(amax(x.row(t)));
                crate::int8::quantize_int8_slice(x.row(t), s, &mut codes);
                crate::int8::dequantize_int8_slice(&codes, s, o);
            }
            Ok(out)
        }
        ActivationFormat::Int8Block32 => {
            let mut out = x.data().to_vec();
            let mut codes = [0i8; 32];
            for row in out.chunks_mut(x.cols()) {
                for block in row.chunks_mut(32) {
                    let s = crate::int8::int8_scale(amax(block));
                    crate::int8::quantize_int8_slice(block, s, &mut codes[..block.len()]);
                    crate::int8::dequantize_int8_slice(&codes[..block.len()], s, block);
                }
            }
            Ok(out)
        }
        ActivationFormat::Fp8E4M3 => {
            Ok(QuantizedMatrix::Fp8(quantize_fp8(x, Fp8Format::E4M3, Fp8Scaling::PerRow)?).dequantize())
        }
    }
}

/// Simulated W8A8 layer output `[tokens x out]`: divide inputs by `smoothing` (if any), quantize them per
/// token, multiply by the dequantized weight.
pub fn w8a8_forward(
    x: &MatrixRef<'_>,
    smoothing: Option<&[f32]>,
    weight: &QuantizedMatrix,
    activations: ActivationFormat,
) -> Result<Vec<f32>> {
    check_calibration(x, weight.cols())?;
    let cols = x.cols();
    let xs: Vec<f32> = match smoothing {
        Some(s) if s.len() != cols => {
            return Err(QuantError::LengthMismatch { what: "smoothing factors", expected: cols, actual: s.len() });
        }
        Some(s) => {
            let mut v = x.data().to_vec();
            unscale_columns(&mut v, s);
            v
        }
        None => x.data().to_vec(),
    };
    let xq = fake_quantize_activations(&MatrixRef::new("activations", &xs, x.rows(), cols)?, activations)?;
    Ok(matmul_xwt(&xq, x.rows(), &weight.dequantize(), weight.rows(), cols))
}

fn smoothing_factors(act_max: &[f32], w_max: &[f32], alpha: f32) -> Vec<f32> {
    act_max
        .iter()
        .zip(w_max)
        .map(|(&a, &w)| if a > 0.0 && w > 0.0 { (a.powf(alpha) / w.powf(1.0 - alpha)).clamp(1e-5, 1e5) } else { 1.0 })
        .collect()
}

/// Smooth and quantize one linear layer `w` (`[out x in]`) for W8A8 using calibration inputs `x`.
pub fn smoothquant(w: &MatrixRef<'_>, x: &MatrixRef<'_>, config: &SmoothQuantConfig) -> Result<SmoothQuantResult> {
    check_calibration(x, w.cols())?;
    if !matches!(config.weights, WeightFormat::Int8 | WeightFormat::Fp8 { .. }) || config.max_tokens == 0 {
        return Err(QuantError::InvalidParameter {
            name: "SmoothQuantConfig",
            reason: "weights must be Int8 or Fp8 and max_tokens positive".into(),
        });
    }
    if let Some(a) = config.alpha
        && !(0.0..=1.0).contains(&a)
    {
        return Err(QuantError::InvalidParameter { name: "alpha", reason: format!("{a} is outside [0, 1]") });
    }
    let (rows, cols) = (w.rows(), w.cols());
    let mut act_max = vec![0f32; cols];
    for t in 0..x.rows() {
        act_max.iter_mut().zip(x.row(t)).for_each(|(m, v)| *m = m.max(v.abs()));
    }
    let mut w_max = vec![0f32; cols];
    for r in 0..rows {
        w_max.iter_mut().zip(w.row(r)).for_each(|(m, v)| *m = m.max(v.abs()));
    }
    let xs_data = subsample_rows(x, config.max_tokens);
    let xs = MatrixRef::new("calibration tokens", &xs_data, xs_data.len() / cols, cols)?;
    let reference = matmul_xwt(xs.data(), xs.rows(), w.data(), rows, cols);
    // A searched alpha also competes with no smoothing at all (s = 1; alpha = 0 is not that, it divides by
    // max|W|), so the search never ends worse than naive W8A8 on its own tokens.
    let candidates: Vec<Option<f32>> = match config.alpha {
        Some(a) => vec![Some(a)],
        None => std::iter::once(None).chain((0..=20).map(|i| Some(i as f32 / 20.0))).collect(),
    };
    let mut best: Option<SmoothQuantResult> = None;
    for alpha in candidates {
        let s = match alpha {
            Some(a) => smoothing_factors(&act_max, &w_max, a),
            None => vec![1.0; cols],
        };
        let ws = scale_columns(w.data(), &s);
        let weight = quantize_rtn(&MatrixRef::new("smoothed weight", &ws, rows, cols)?, &config.weights)?;
        let y = w8a8_forward(&xs, Some(&s), &weight, config.activations)?;
        let err = nmse(&reference, &y);
        if best.as_ref().is_none_or(|b| err < b.search_nmse) {
            best = Some(SmoothQuantResult {
                alpha,
                smoothing: s,
                weight,
                activations: config.activations,
                search_nmse: err,
            });
        }
    }
    best.ok_or(QuantError::Empty { what: "alpha grid" })
}

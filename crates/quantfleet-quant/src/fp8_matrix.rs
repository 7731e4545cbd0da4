//! FP8 matrices: E4M3/E5M2 codes with per-tensor, per-row (weights: output channel; activations: token)
//! or static (calibrated) f32 scales. value = decode(code) * scale. Encoding always saturates, so a value
//! beyond a static scale's range clamps to ±max instead of turning into NaN.

use crate::error::{QuantError, Result, check_len};
use crate::fp8::{Fp8Format, Saturation, decode_fp8_slice, encode_fp8_slice};
use crate::matrix::{MatrixRef, amax};

/// Where FP8 scales come from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fp8Scaling {
    /// One dynamic scale for the whole matrix (amax / max finite).
    PerTensor,
    /// One dynamic scale per row: per output channel for weights, per token for activations.
    PerRow,
    /// One fixed scale calibrated ahead of time (see [`calibrate_fp8_scale`]).
    Static(f32),
}

/// A row-major FP8 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Matrix {
    pub format: Fp8Format,
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<u8>,
    /// One scale (per-tensor or static) or one per row.
    pub scales: Vec<f32>,
}

/// Scale that maps `amax` onto the format's largest finite value (1 for all-zero data).
pub fn fp8_scale(format: Fp8Format, amax: f32) -> f32 {
    if amax > 0.0 { amax / format.max_finite() } else { 1.0 }
}

/// Static per-tensor scale from calibration batches: the largest magnitude seen, mapped to max finite.
pub fn calibrate_fp8_scale(format: Fp8Format, batches: &[MatrixRef<'_>]) -> Result<f32> {
    if batches.is_empty() {
        return Err(QuantError::Empty { what: "calibration batches" });
    }
    Ok(fp8_scale(format, batches.iter().map(|b| amax(b.data())).fold(0f32, f32::max)))
}

/// The scales `scaling` gives matrix `m` (one, or one per row), as [`Fp8Matrix::scales`] holds them.
pub fn fp8_scales(m: &MatrixRef<'_>, format: Fp8Format, scaling: Fp8Scaling) -> Result<Vec<f32>> {
    Ok(match scaling {
        Fp8Scaling::PerTensor => vec![fp8_scale(format, amax(m.data()))],
        Fp8Scaling::PerRow => (0..m.rows()).map(|r| fp8_scale(format, amax(m.row(r)))).collect(),
        Fp8Scaling::Static(s) => {
            if !(s.is_finite() && s > 0.0) {
                return Err(QuantError::InvalidParameter {
                    name: "static scale",
                    reason: format!("{s} is not a positive finite number"),
                });
            }
            vec![s]
        }
    })
}

/// Quantize a matrix to FP8 with the given scaling.
pub fn quantize_fp8(m: &MatrixRef<'_>, format: Fp8Format, scaling: Fp8Scaling) -> Result<Fp8Matrix> {
    let (rows, cols) = (m.rows(), m.cols());
    let scales = fp8_scales(m, format, scaling)?;
    let mut codes = vec![0u8; rows * cols];
    for r in 0..rows {
        let s = scales[if scales.len() == 1 { 0 } else { r }];
        encode_fp8_slice(format, Saturation::Saturating, m.row(r), 1.0 / s, &mut codes[r * cols..(r + 1) * cols])?;
    }
    Ok(Fp8Matrix { format, rows, cols, codes, scales })
}

impl Fp8Matrix {
    /// Scale of row `r`.
    pub fn row_scale(&self, r: usize) -> f32 {
        self.scales[if self.scales.len() == 1 { 0 } else { r }]
    }

    /// Dequantize row `r` into `out`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        check_len("FP8 codes", self.rows * self.cols, self.codes.len())?;
        if self.scales.len() != 1 {
            check_len("FP8 row scales", self.rows, self.scales.len())?;
        }
        if r >= self.rows {
            return Err(QuantError::RowOutOfRange { row: r, rows: self.rows });
        }
        decode_fp8_slice(self.format, &self.codes[r * self.cols..(r + 1) * self.cols], self.row_scale(r), out)
    }

    pub fn storage_bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }
}

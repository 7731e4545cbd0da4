//! FP8 matrices: E4M3/E5M2 codes with per-tensor, per-row (weights: output channel; activations: token),
//! per-group (`g` consecutive elements of a row, as block-scaled FP8 checkpoints store weights) or static
//! (calibrated) f32 scales. value = decode(code) * scale. Encoding always saturates, so a value beyond a
//! static scale's range clamps to ±max instead of turning into NaN.

use std::num::NonZeroUsize;

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
    /// One dynamic scale per `g` consecutive elements of a row (the last group of a row may be shorter).
    /// The scale then follows the weights' magnitude along the row, so small weights far from the row's
    /// largest one keep their three mantissa bits instead of falling into E4M3's subnormal range.
    PerGroup(NonZeroUsize),
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
    /// One scale (per-tensor or static), one per row, or with `group_size` one per group: group `g` of row
    /// `r` at `r * cols.div_ceil(group_size) + g`.
    pub scales: Vec<f32>,
    /// Elements per scale group (per-group scaling), else `None`.
    pub group_size: Option<NonZeroUsize>,
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

/// The scales `scaling` gives matrix `m` (one, one per row or one per group), as [`Fp8Matrix::scales`]
/// holds them.
pub fn fp8_scales(m: &MatrixRef<'_>, format: Fp8Format, scaling: Fp8Scaling) -> Result<Vec<f32>> {
    Ok(match scaling {
        Fp8Scaling::PerTensor => vec![fp8_scale(format, amax(m.data()))],
        Fp8Scaling::PerRow => (0..m.rows()).map(|r| fp8_scale(format, amax(m.row(r)))).collect(),
        Fp8Scaling::PerGroup(g) => {
            (0..m.rows()).flat_map(|r| m.row(r).chunks(g.get()).map(|c| fp8_scale(format, amax(c)))).collect()
        }
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
    let mut out = Fp8Matrix::with_scales_of(m, format, scaling)?;
    let g = out.span();
    let mut codes = vec![0u8; rows * cols];
    for r in 0..rows {
        let row_codes = codes[r * cols..(r + 1) * cols].chunks_mut(g);
        for (k, (values, codes)) in m.row(r).chunks(g).zip(row_codes).enumerate() {
            encode_fp8_slice(format, Saturation::Saturating, values, 1.0 / out.scale(r, k * g), codes)?;
        }
    }
    out.codes = codes;
    Ok(out)
}

impl Fp8Matrix {
    /// The matrix of `m`'s shape with the scales `scaling` gives it and no codes yet: what RTN
    /// ([`quantize_fp8`]) and GPTQ round to, filling `codes`.
    pub fn with_scales_of(m: &MatrixRef<'_>, format: Fp8Format, scaling: Fp8Scaling) -> Result<Self> {
        let group_size = match scaling {
            Fp8Scaling::PerGroup(g) => Some(g),
            _ => None,
        };
        let scales = fp8_scales(m, format, scaling)?;
        Ok(Fp8Matrix { format, rows: m.rows(), cols: m.cols(), codes: Vec::new(), scales, group_size })
    }

    /// Elements that share a scale along a row: the group size, or the whole row.
    fn span(&self) -> usize {
        self.group_size.map_or(self.cols.max(1), NonZeroUsize::get)
    }

    /// Scale groups per row (1 without per-group scaling).
    pub fn groups_per_row(&self) -> usize {
        self.cols.div_ceil(self.span())
    }

    /// Scale of element (row `r`, column `c`).
    pub fn scale(&self, r: usize, c: usize) -> f32 {
        match self.scales.len() {
            1 => self.scales[0],
            _ if self.group_size.is_some() => self.scales[r * self.groups_per_row() + c / self.span()],
            _ => self.scales[r],
        }
    }

    /// Dequantize row `r` into `out`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        check_len("FP8 codes", self.rows * self.cols, self.codes.len())?;
        if self.group_size.is_some() {
            check_len("FP8 group scales", self.rows * self.groups_per_row(), self.scales.len())?;
        } else if self.scales.len() != 1 {
            check_len("FP8 row scales", self.rows, self.scales.len())?;
        }
        if r >= self.rows {
            return Err(QuantError::RowOutOfRange { row: r, rows: self.rows });
        }
        check_len("FP8 output row", self.cols, out.len())?;
        let g = self.span();
        let codes = self.codes[r * self.cols..(r + 1) * self.cols].chunks(g);
        for (k, (codes, out)) in codes.zip(out.chunks_mut(g)).enumerate() {
            decode_fp8_slice(self.format, codes, self.scale(r, k * g), out)?;
        }
        Ok(())
    }

    pub fn storage_bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }
}

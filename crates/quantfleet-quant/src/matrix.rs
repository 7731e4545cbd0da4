//! Borrowed views of row-major f32 matrices (weights `[out x in]`, activations `[tokens x in]`) and the
//! small dense helpers the quantizers share.

use crate::error::{QuantError, Result, check_finite};

/// A validated, borrowed row-major f32 matrix.
#[derive(Clone, Copy, Debug)]
pub struct MatrixRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
}

impl<'a> MatrixRef<'a> {
    /// Wrap `data` as `[rows x cols]`; refuses empty shapes, length mismatches and NaN/inf values.
    pub fn new(what: &'static str, data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        if rows == 0 || cols == 0 {
            return Err(QuantError::Empty { what });
        }
        let expected = rows.checked_mul(cols).ok_or(QuantError::InvalidParameter {
            name: "shape",
            reason: format!("{rows} x {cols} overflows usize"),
        })?;
        if data.len() != expected {
            return Err(QuantError::LengthMismatch { what, expected, actual: data.len() });
        }
        check_finite(what, data)?;
        Ok(Self { data, rows, cols })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn data(&self) -> &'a [f32] {
        self.data
    }
    /// Row `r` (caller guarantees `r < rows`).
    pub fn row(&self, r: usize) -> &'a [f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Check that calibration activations `x` feed a weight with `in_features` columns.
pub fn check_calibration(x: &MatrixRef<'_>, in_features: usize) -> Result<()> {
    if x.cols() != in_features {
        return Err(QuantError::CalibrationShape { expected: in_features, actual: x.cols() });
    }
    Ok(())
}

/// Largest magnitude in a slice (0 for an empty slice).
pub fn amax(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// `y = x W^T` for `x: [n x in]`, `w: [out x in]` (both row-major) -> `[n x out]`, f32 with 4 accumulators.
pub fn matmul_xwt(x: &[f32], n: usize, w: &[f32], out: usize, inf: usize) -> Vec<f32> {
    let mut y = vec![0f32; n * out];
    for t in 0..n {
        let xr = &x[t * inf..(t + 1) * inf];
        for o in 0..out {
            y[t * out + o] = dot(xr, &w[o * inf..(o + 1) * inf]);
        }
    }
    y
}

/// Dot product with 8 independent partial sums (vectorises; stable enough for error metrics).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// Normalised mean squared error ||a - b||^2 / ||a||^2 (0 when both are zero), accumulated in f64.
pub fn nmse(reference: &[f32], approx: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&r, &a) in reference.iter().zip(approx) {
        let d = (r - a) as f64;
        num += d * d;
        den += (r as f64) * (r as f64);
    }
    if den == 0.0 { if num == 0.0 { 0.0 } else { f64::INFINITY } } else { num / den }
}

/// Output NMSE of a layer on calibration inputs: ||X W^T - X W_hat^T||^2 / ||X W^T||^2.
pub fn output_nmse(x: &MatrixRef<'_>, w: &[f32], w_hat: &[f32], out_features: usize) -> f64 {
    let (n, inf) = (x.rows(), x.cols());
    let y = matmul_xwt(x.data(), n, w, out_features, inf);
    let y_hat = matmul_xwt(x.data(), n, w_hat, out_features, inf);
    nmse(&y, &y_hat)
}

/// At most `max_rows` rows of `x`, evenly spaced (the searches do not need every calibration token).
pub fn subsample_rows(x: &MatrixRef<'_>, max_rows: usize) -> Vec<f32> {
    let n = x.rows();
    if n <= max_rows {
        return x.data().to_vec();
    }
    (0..max_rows).flat_map(|i| x.row(i * n / max_rows).iter().copied()).collect()
}

//! Borrowed views of row-major f32 matrices (weights `[out x in]`, activations `[tokens x in]`) and the
//! small dense helpers the quantizers share.

use crate::error::{QuantError, Result, check_finite};
use crate::simd::{Isa, multiversion};

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

/// `y = x W^T` for `x: [n x in]`, `w: [out x in]` (both row-major) -> `[n x out]`.
/// This is the inner loop of the AWQ and SmoothQuant searches, so it has explicit AVX-512 and AVX2 paths.
pub fn matmul_xwt(x: &[f32], n: usize, w: &[f32], out: usize, inf: usize) -> Vec<f32> {
    let mut y = vec![0f32; n * out];
    #[cfg(target_arch = "x86_64")]
    match Isa::detect() {
        // SAFETY: the CPU reports the features each kernel enables.
        Isa::Avx512 => unsafe { x86::matmul_avx512(x, n, w, out, inf, &mut y) },
        Isa::Avx2 => unsafe { x86::matmul_avx2(x, n, w, out, inf, &mut y) },
        Isa::Scalar => matmul_portable(x, n, w, out, inf, &mut y),
    }
    #[cfg(not(target_arch = "x86_64"))]
    matmul_portable(x, n, w, out, inf, &mut y);
    y
}

fn matmul_portable(x: &[f32], n: usize, w: &[f32], out: usize, inf: usize, y: &mut [f32]) {
    for t in 0..n {
        for o in 0..out {
            y[t * out + o] = dot_lanes(&x[t * inf..(t + 1) * inf], &w[o * inf..(o + 1) * inf]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! Register-blocked x W^T: four tokens share every loaded weight vector (half the loads per
    //! multiply-add of one dot at a time); tiles of 64 weight rows stay in L2 while the tokens sweep them.
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) fn matmul_avx512(x: &[f32], n: usize, w: &[f32], out: usize, inf: usize, y: &mut [f32]) {
        assert!(x.len() >= n * inf && w.len() >= out * inf && y.len() >= n * out);
        let n16 = inf / 16 * 16;
        for o0 in (0..out).step_by(64) {
            let o1 = (o0 + 64).min(out);
            let mut t = 0;
            while t < n {
                let tb = (n - t).min(4);
                for o in o0..o1 {
                    let wr = &w[o * inf..(o + 1) * inf];
                    let mut acc = [_mm512_setzero_ps(); 4];
                    let mut c = 0;
                    while c < n16 {
                        // SAFETY: c + 16 <= inf, rows are in bounds (asserted above).
                        unsafe {
                            let wv = _mm512_loadu_ps(wr.as_ptr().add(c));
                            for (k, a) in acc.iter_mut().enumerate().take(tb) {
                                let xv = _mm512_loadu_ps(x.as_ptr().add((t + k) * inf + c));
                                *a = _mm512_fmadd_ps(xv, wv, *a);
                            }
                        }
                        c += 16;
                    }
                    for (k, a) in acc.iter().enumerate().take(tb) {
                        let xr = &x[(t + k) * inf..(t + k + 1) * inf];
                        let tail: f32 = (n16..inf).map(|i| xr[i] * wr[i]).sum();
                        y[(t + k) * out + o] = _mm512_reduce_add_ps(*a) + tail;
                    }
                }
                t += tb;
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn matmul_avx2(x: &[f32], n: usize, w: &[f32], out: usize, inf: usize, y: &mut [f32]) {
        assert!(x.len() >= n * inf && w.len() >= out * inf && y.len() >= n * out);
        let n8 = inf / 8 * 8;
        for o0 in (0..out).step_by(64) {
            let o1 = (o0 + 64).min(out);
            let mut t = 0;
            while t < n {
                let tb = (n - t).min(4);
                for o in o0..o1 {
                    let wr = &w[o * inf..(o + 1) * inf];
                    let mut acc = [_mm256_setzero_ps(); 4];
                    let mut c = 0;
                    while c < n8 {
                        // SAFETY: c + 8 <= inf, rows are in bounds (asserted above).
                        unsafe {
                            let wv = _mm256_loadu_ps(wr.as_ptr().add(c));
                            for (k, a) in acc.iter_mut().enumerate().take(tb) {
                                let xv = _mm256_loadu_ps(x.as_ptr().add((t + k) * inf + c));
                                *a = _mm256_fmadd_ps(xv, wv, *a);
                            }
                        }
                        c += 8;
                    }
                    for (k, a) in acc.iter().enumerate().take(tb) {
                        let xr = &x[(t + k) * inf..(t + k + 1) * inf];
                        let tail: f32 = (n8..inf).map(|i| xr[i] * wr[i]).sum();
                        let mut lanes = [0f32; 8];
                        // SAFETY: lanes holds 8 f32.
                        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *a) };
                        y[(t + k) * out + o] = lanes.iter().sum::<f32>() + tail;
                    }
                }
                t += tb;
            }
        }
    }
}

/// Dot product with 16 independent lanes (vectorises under the enabled target features).
#[inline(always)]
pub(crate) fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    for (x, y) in (&mut ca).zip(b.chunks_exact(16)) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let r = n / 16 * 16;
    acc.iter().sum::<f32>() + ca.remainder().iter().zip(&b[r..]).map(|(x, y)| x * y).sum::<f32>()
}

multiversion! {
    fn dot_kernel(a: &[f32], b: &[f32]) -> f32 {
        dot_lanes(a, b)
    }
}

/// Dot product (vectorised on the widest ISA available).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_kernel(Isa::detect(), a, b)
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

/// Row-major `[rows x s.len()]` data with every row multiplied element-wise by `s` (column scaling).
pub fn scale_columns(data: &[f32], s: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(data.len());
    for row in data.chunks(s.len().max(1)) {
        out.extend(row.iter().zip(s).map(|(v, k)| v * k));
    }
    out
}

/// In place: every row divided element-wise by `s` (undoing [`scale_columns`]).
pub fn unscale_columns(data: &mut [f32], s: &[f32]) {
    for row in data.chunks_mut(s.len().max(1)) {
        row.iter_mut().zip(s).for_each(|(v, k)| *v /= k);
    }
}

//! The dense f64 linear algebra GPTQ needs (plain Rust, no BLAS): Cholesky factorisation, the inverse of a
//! symmetric positive definite matrix from its factor, and the upper Cholesky factor of that inverse.
//! Matrices are row-major `n x n`; loops are arranged so the inner loop runs over contiguous memory.

use crate::error::{QuantError, Result};
use crate::simd::{Isa, multiversion};

#[inline(always)]
fn dot64(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f64; 8];
    let mut ca = a.chunks_exact(8);
    for (x, y) in (&mut ca).zip(b.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let r = n / 8 * 8;
    acc.iter().sum::<f64>() + ca.remainder().iter().zip(&b[r..]).map(|(x, y)| x * y).sum::<f64>()
}

/// In-place lower Cholesky factor: on success the lower triangle of `a` holds L with A = L L^T and the
/// strict upper triangle is zeroed.
pub fn cholesky_lower(a: &mut [f64], n: usize) -> Result<()> {
    cholesky_kernel(Isa::detect(), a, n)
}

multiversion! {
    fn cholesky_kernel(a: &mut [f64], n: usize) -> Result<()> {
        cholesky_inline(a, n)
    }
}

#[inline(always)]
fn cholesky_inline(a: &mut [f64], n: usize) -> Result<()> {
    for i in 0..n {
        for j in 0..=i {
            let (ri, rj) = (i * n, j * n);
            let s = a[ri + j] - dot64(&a[ri..ri + j], &a[rj..rj + j]);
            if i == j {
                if s.is_nan() || s <= 0.0 {
                    return Err(QuantError::NotPositiveDefinite { column: i, pivot: s });
                }
                a[ri + i] = s.sqrt();
            } else {
                a[ri + j] = s / a[rj + j];
            }
        }
        for j in i + 1..n {
            a[i * n + j] = 0.0;
        }
    }
    Ok(())
}

/// Inverse of a lower-triangular matrix (row-wise forward substitution).
#[inline(always)]
fn lower_inverse(l: &[f64], n: usize) -> Vec<f64> {
    let mut m = vec![0f64; n * n];
    for i in 0..n {
        // Row i of L^-1: (e_i - sum_{k<i} L[i][k] M[k]) / L[i][i]; M[k] is zero past column k.
        let mut row = vec![0f64; i + 1];
        row[i] = 1.0;
        for k in 0..i {
            let lik = l[i * n + k];
            if lik != 0.0 {
                for (r, mk) in row[..=k].iter_mut().zip(&m[k * n..k * n + k + 1]) {
                    *r -= lik * mk;
                }
            }
        }
        let d = l[i * n + i];
        for (j, r) in row.into_iter().enumerate() {
            m[i * n + j] = r / d;
        }
    }
    m
}

/// Upper-triangular U with H^-1 = U^T U, for symmetric positive definite H (GPTQ's "Cholesky of the
/// inverse"). Returned row-major, so row i of U (the coefficients GPTQ spreads column i's error with) is
/// contiguous.
pub fn inverse_upper_cholesky(h: &[f64], n: usize) -> Result<Vec<f64>> {
    inverse_upper_cholesky_kernel(Isa::detect(), h, n)
}

multiversion! {
    fn inverse_upper_cholesky_kernel(h: &[f64], n: usize) -> Result<Vec<f64>> {
        inverse_upper_cholesky_inline(h, n)
    }
}

#[inline(always)]
fn inverse_upper_cholesky_inline(h: &[f64], n: usize) -> Result<Vec<f64>> {
    // With J the reversal permutation, factor J H J = L' L'^T. Then H = R R^T with R = J L' J upper, so
    // H^-1 = R^-T R^-1 and U = R^-1 = J L'^-1 J is the upper factor we want: one Cholesky and one
    // triangular inverse, instead of Cholesky, inverse, product and a second Cholesky.
    let mut lr = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            lr[i * n + j] = h[(n - 1 - i) * n + (n - 1 - j)];
        }
    }
    cholesky_inline(&mut lr, n).map_err(|e| match e {
        QuantError::NotPositiveDefinite { column, pivot } => {
            QuantError::NotPositiveDefinite { column: n - 1 - column, pivot }
        }
        other => other,
    })?;
    let m = lower_inverse(&lr, n);
    let mut u = vec![0f64; n * n];
    for i in 0..n {
        for j in i..n {
            u[i * n + j] = m[(n - 1 - i) * n + (n - 1 - j)];
        }
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_upper_cholesky_reconstructs_the_inverse() {
        // A small SPD matrix: B B^T + I.
        let n = 7;
        let b: Vec<f64> = (0..n * n).map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0).collect();
        let mut h = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                h[i * n + j] =
                    (0..n).map(|k| b[i * n + k] * b[j * n + k]).sum::<f64>() + if i == j { 1.0 } else { 0.0 };
            }
        }
        let u = inverse_upper_cholesky(&h, n).unwrap();
        // (U^T U) H must be the identity.
        for i in 0..n {
            for j in 0..n {
                let hinv_row: Vec<f64> = (0..n).map(|c| (0..n).map(|k| u[k * n + i] * u[k * n + c]).sum()).collect();
                let v: f64 = (0..n).map(|c| hinv_row[c] * h[c * n + j]).sum();
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9, "({i},{j}) = {v}");
                if j < i {
                    assert_eq!(u[i * n + j], 0.0);
                }
            }
        }
    }

    #[test]
    fn indefinite_matrix_is_an_error() {
        let h = [1.0, 2.0, 2.0, 1.0];
        assert!(matches!(inverse_upper_cholesky(&h, 2), Err(QuantError::NotPositiveDefinite { column: 0, .. })));
    }
}

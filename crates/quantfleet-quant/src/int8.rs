//! INT8 symmetric per-channel weights: one f32 scale per output row, codes in -127..=127
//! (scale = amax / 127, round to nearest even; -128 is never produced so negation stays exact).

use crate::error::{QuantError, Result, check_len};
use crate::matrix::{MatrixRef, amax};
use crate::simd::{Isa, clamp_fast, multiversion, round_small};

/// A row-major INT8 matrix with a per-row scale: value = `code * scales[row]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Matrix {
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<i8>,
    pub scales: Vec<f32>,
}

#[inline(always)]
fn quantize_i8(x: f32, inv: f32) -> i8 {
    round_small(clamp_fast(x * inv, -127.0, 127.0)) as i8
}

multiversion! {
    fn encode_row(src: &[f32], inv: f32, dst: &mut [i8]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = quantize_i8(x, inv);
        }
    }
}

multiversion! {
    fn decode_row(src: &[i8], scale: f32, dst: &mut [f32]) {
        for (d, &c) in dst.iter_mut().zip(src) {
            *d = c as f32 * scale;
        }
    }
}

/// Scale for a vector whose largest magnitude is `amax` (1 for an all-zero vector, which then stays zero).
pub fn int8_scale(amax: f32) -> f32 {
    if amax > 0.0 { amax / 127.0 } else { 1.0 }
}

/// Quantize one vector with a given scale into `dst` (the per-token activation and KV paths use this).
pub fn quantize_int8_slice(src: &[f32], scale: f32, dst: &mut [i8]) {
    encode_row(Isa::detect(), src, 1.0 / scale, dst);
}

/// Dequantize one vector.
pub fn dequantize_int8_slice(src: &[i8], scale: f32, dst: &mut [f32]) {
    decode_row(Isa::detect(), src, scale, dst);
}

/// Round-to-nearest INT8 per output channel.
pub fn quantize_int8(w: &MatrixRef<'_>) -> Result<Int8Matrix> {
    let (rows, cols) = (w.rows(), w.cols());
    let mut codes = vec![0i8; rows * cols];
    let mut scales = Vec::with_capacity(rows);
    for r in 0..rows {
        let scale = int8_scale(amax(w.row(r)));
        quantize_int8_slice(w.row(r), scale, &mut codes[r * cols..(r + 1) * cols]);
        scales.push(scale);
    }
    Ok(Int8Matrix { rows, cols, codes, scales })
}

impl Int8Matrix {
    /// Dequantize row `r` into `out`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        check_len("INT8 codes", self.rows * self.cols, self.codes.len())?;
        check_len("INT8 row scales", self.rows, self.scales.len())?;
        if r >= self.rows {
            return Err(QuantError::RowOutOfRange { row: r, rows: self.rows });
        }
        if out.len() != self.cols {
            return Err(QuantError::LengthMismatch { what: "dequantized row", expected: self.cols, actual: out.len() });
        }
        dequantize_int8_slice(&self.codes[r * self.cols..(r + 1) * self.cols], self.scales[r], out);
        Ok(())
    }

    pub fn storage_bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }
}

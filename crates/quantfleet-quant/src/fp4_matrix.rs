//! Block-scaled FP4 matrices with E2M1 elements, packed two per byte in the INT4 nibble order
//! (element 2k low nibble, 2k+1 high nibble; each row starts on a byte boundary):
//! * NVFP4: blocks of 16 along a row, an E4M3 block scale, and one f32 per-tensor scale.
//!   tensor_scale = amax / (448 * 6) so block scales use E4M3's full range; block code =
//!   E4M3(block_amax / 6 / tensor_scale) (saturating); value = e2m1 * decode(block) * tensor_scale.
//! * OCP MXFP4: blocks of 32, an E8M0 shared scale X = 2^(floor(log2(block_amax)) - 2) as the OCP MX spec
//!   derives it (E2M1's emax is 2); elements above 6 * X saturate to ±6 * X. value = e2m1 * X.
//!
//! The last block of a row may be shorter when the block size does not divide the row length.

use crate::error::{QuantError, Result, check_len};
use crate::fp4::{E2M1_MAX, E2M1_VALUES, decode_e2m1, decode_e8m0, encode_e2m1, mx_shared_scale_e8m0};
use crate::fp8::{Fp8Format, Saturation, encode_e2m1_fast};
use crate::matrix::{MatrixRef, amax};
use crate::simd::{Isa, multiversion};

/// Which block-scaled FP4 flavour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp4Kind {
    Nvfp4,
    Mxfp4,
}

impl Fp4Kind {
    pub fn block_size(self) -> usize {
        match self {
            Fp4Kind::Nvfp4 => 16,
            Fp4Kind::Mxfp4 => 32,
        }
    }
}

/// A packed block-scaled FP4 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp4Matrix {
    pub kind: Fp4Kind,
    pub rows: usize,
    pub cols: usize,
    /// `rows * ceil(cols / 2)` bytes of E2M1 nibbles.
    pub packed: Vec<u8>,
    /// One code per block (`rows * ceil(cols / block)`): E4M3 for NVFP4, E8M0 for MXFP4.
    pub block_scales: Vec<u8>,
    /// NVFP4 per-tensor scale; 1.0 for MXFP4.
    pub tensor_scale: f32,
}

multiversion! {
    /// Encode one block into its bytes of the packed row (`src` starts at an even column).
    fn encode_block(src: &[f32], inv: f32, dst: &mut [u8]) {
        let pairs = src.len() / 2;
        for (d, p) in dst[..pairs].iter_mut().zip(src.chunks_exact(2)) {
            *d = encode_e2m1_fast(p[0] * inv) | (encode_e2m1_fast(p[1] * inv) << 4);
        }
        if src.len() % 2 == 1 {
            dst[pairs] = encode_e2m1_fast(src[src.len() - 1] * inv);
        }
    }
}

multiversion! {
    /// Decode one block (`dst.len()` values) from its packed bytes.
    fn decode_block(src: &[u8], scale: f32, dst: &mut [f32]) {
        let pairs = dst.len() / 2;
        for (d, &b) in dst.chunks_exact_mut(2).zip(&src[..pairs]) {
            d[0] = E2M1_VALUES[(b & 0xF) as usize] * scale;
            d[1] = E2M1_VALUES[(b >> 4) as usize] * scale;
        }
        if dst.len() % 2 == 1 {
            dst[pairs * 2] = E2M1_VALUES[(src[pairs] & 0xF) as usize] * scale;
        }
    }
}

fn tensor_scale(m: &MatrixRef<'_>, kind: Fp4Kind) -> f32 {
    match kind {
        Fp4Kind::Nvfp4 => {
            let a = amax(m.data());
            if a > 0.0 { a / (Fp8Format::E4M3.max_finite() * E2M1_MAX) } else { 1.0 }
        }
        Fp4Kind::Mxfp4 => 1.0,
    }
}

/// (stored code, effective f32 scale) of one block.
fn block_scale_for(kind: Fp4Kind, block: &[f32], tensor_scale: f32) -> (u8, f32) {
    let block_amax = amax(block);
    match kind {
        Fp4Kind::Nvfp4 => {
            let c = Fp8Format::E4M3.encode(block_amax / E2M1_MAX / tensor_scale, Saturation::Saturating);
            (c, Fp8Format::E4M3.decode(c) * tensor_scale)
        }
        Fp4Kind::Mxfp4 => {
            let c = mx_shared_scale_e8m0(block_amax, 2);
            (c, decode_e8m0(c))
        }
    }
}

/// Quantize with round-to-nearest-even E2M1 elements on the given ISA.
pub fn quantize_fp4_isa(isa: Isa, m: &MatrixRef<'_>, kind: Fp4Kind) -> Result<Fp4Matrix> {
    let (rows, cols, b) = (m.rows(), m.cols(), kind.block_size());
    let tensor_scale = tensor_scale(m, kind);
    let row_bytes = cols.div_ceil(2);
    let mut packed = vec![0u8; rows * row_bytes];
    let mut block_scales = Vec::with_capacity(rows * cols.div_ceil(b));
    for r in 0..rows {
        let dst = &mut packed[r * row_bytes..(r + 1) * row_bytes];
        for (bi, block) in m.row(r).chunks(b).enumerate() {
            let (code, scale) = block_scale_for(kind, block, tensor_scale);
            block_scales.push(code);
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let start = bi * b / 2;
            encode_block(isa, block, inv, &mut dst[start..start + block.len().div_ceil(2)]);
        }
    }
    Ok(Fp4Matrix { kind, rows, cols, packed, block_scales, tensor_scale })
}

/// Quantize with round-to-nearest-even E2M1 elements (widest ISA available).
pub fn quantize_fp4(m: &MatrixRef<'_>, kind: Fp4Kind) -> Result<Fp4Matrix> {
    quantize_fp4_isa(Isa::detect(), m, kind)
}

/// Reference quantizer: one element at a time through the branchy scalar E2M1 encoder.
pub fn quantize_fp4_ref(m: &MatrixRef<'_>, kind: Fp4Kind) -> Result<Fp4Matrix> {
    let (rows, cols, b) = (m.rows(), m.cols(), kind.block_size());
    let tensor_scale = tensor_scale(m, kind);
    let row_bytes = cols.div_ceil(2);
    let mut packed = vec![0u8; rows * row_bytes];
    let mut block_scales = Vec::with_capacity(rows * cols.div_ceil(b));
    for r in 0..rows {
        for (bi, block) in m.row(r).chunks(b).enumerate() {
            let (code, scale) = block_scale_for(kind, block, tensor_scale);
            block_scales.push(code);
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            for (k, &x) in block.iter().enumerate() {
                let col = bi * b + k;
                packed[r * row_bytes + col / 2] |= encode_e2m1(x * inv) << (4 * (col % 2));
            }
        }
    }
    Ok(Fp4Matrix { kind, rows, cols, packed, block_scales, tensor_scale })
}

impl Fp4Matrix {
    /// Effective f32 scale of block `bi` of row `r`.
    pub fn block_scale(&self, r: usize, bi: usize) -> f32 {
        let code = self.block_scales[r * self.cols.div_ceil(self.kind.block_size()) + bi];
        match self.kind {
            Fp4Kind::Nvfp4 => Fp8Format::E4M3.decode(code) * self.tensor_scale,
            Fp4Kind::Mxfp4 => decode_e8m0(code),
        }
    }

    /// Check that the field lengths agree with the shape (the fields are public).
    pub fn validate(&self) -> Result<()> {
        check_len("FP4 packed bytes", self.rows * self.cols.div_ceil(2), self.packed.len())?;
        check_len("FP4 block scales", self.rows * self.cols.div_ceil(self.kind.block_size()), self.block_scales.len())
    }

    fn check_row(&self, r: usize, out: &[f32]) -> Result<()> {
        self.validate()?;
        if r >= self.rows {
            return Err(QuantError::RowOutOfRange { row: r, rows: self.rows });
        }
        if out.len() != self.cols {
            return Err(QuantError::LengthMismatch { what: "dequantized row", expected: self.cols, actual: out.len() });
        }
        Ok(())
    }

    /// Dequantize row `r` into `out` on the given ISA.
    pub fn dequantize_row_isa(&self, isa: Isa, r: usize, out: &mut [f32]) -> Result<()> {
        self.check_row(r, out)?;
        let row_bytes = self.cols.div_ceil(2);
        let row = &self.packed[r * row_bytes..(r + 1) * row_bytes];
        let b = self.kind.block_size();
        for (bi, chunk) in out.chunks_mut(b).enumerate() {
            let start = bi * b / 2;
            decode_block(isa, &row[start..start + chunk.len().div_ceil(2)], self.block_scale(r, bi), chunk);
        }
        Ok(())
    }

    /// Dequantize row `r` into `out` (widest ISA available).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        self.dequantize_row_isa(Isa::detect(), r, out)
    }

    /// Reference dequantizer: one nibble at a time.
    pub fn dequantize_row_ref(&self, r: usize, out: &mut [f32]) -> Result<()> {
        self.check_row(r, out)?;
        let row = &self.packed[r * self.cols.div_ceil(2)..];
        let b = self.kind.block_size();
        for (c, o) in out.iter_mut().enumerate() {
            *o = decode_e2m1(row[c / 2] >> (4 * (c % 2))) * self.block_scale(r, c / b);
        }
        Ok(())
    }

    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + self.block_scales.len() + 4
    }
}

//! One enum over every packed weight container, so the engine can hold "a quantized linear weight" without
//! caring which tier made it, plus the round-to-nearest (RTN) baseline for every format.

use crate::error::{QuantError, Result, check_len};
use crate::fp4_matrix::{Fp4Kind, Fp4Matrix, quantize_fp4};
use crate::fp8::Fp8Format;
use crate::fp8_matrix::{Fp8Matrix, Fp8Scaling, quantize_fp8};
use crate::halfp::{bf16, f16};
use crate::int4::{Int4Config, Int4Matrix, quantize_int4};
use crate::int8::{Int8Matrix, quantize_int8};
use crate::matrix::MatrixRef;

/// A weight format and its scaling: everything RTN needs to quantize a matrix.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum WeightFormat {
    Bf16,
    F16,
    Fp8 { format: Fp8Format, scaling: Fp8Scaling },
    Int8,
    Int4(Int4Config),
    Fp4(Fp4Kind),
}

/// A quantized weight matrix `[rows = out_features x cols = in_features]`.
#[derive(Clone, Debug, PartialEq)]
pub enum QuantizedMatrix {
    Bf16 { rows: usize, cols: usize, values: Vec<bf16> },
    F16 { rows: usize, cols: usize, values: Vec<f16> },
    Fp8(Fp8Matrix),
    Int8(Int8Matrix),
    Int4(Int4Matrix),
    Fp4(Fp4Matrix),
}

/// Round-to-nearest quantization of `w` in `format`.
pub fn quantize_rtn(w: &MatrixRef<'_>, format: &WeightFormat) -> Result<QuantizedMatrix> {
    let (rows, cols) = (w.rows(), w.cols());
    Ok(match *format {
        WeightFormat::Bf16 => {
            QuantizedMatrix::Bf16 { rows, cols, values: w.data().iter().map(|&x| bf16::from_f32(x)).collect() }
        }
        WeightFormat::F16 => {
            let values: Vec<f16> = w.data().iter().map(|&x| f16::from_f32(x)).collect();
            if let Some(i) = values.iter().position(|v| v.is_infinite()) {
                return Err(QuantError::InvalidParameter {
                    name: "weights",
                    reason: format!("value {} at index {i} overflows f16", w.data()[i]),
                });
            }
            QuantizedMatrix::F16 { rows, cols, values }
        }
        WeightFormat::Fp8 { format, scaling } => QuantizedMatrix::Fp8(quantize_fp8(w, format, scaling)?),
        WeightFormat::Int8 => QuantizedMatrix::Int8(quantize_int8(w)?),
        WeightFormat::Int4(config) => QuantizedMatrix::Int4(quantize_int4(w, &config)?),
        WeightFormat::Fp4(kind) => QuantizedMatrix::Fp4(quantize_fp4(w, kind)?),
    })
}

impl QuantizedMatrix {
    pub fn rows(&self) -> usize {
        match self {
            QuantizedMatrix::Bf16 { rows, .. } | QuantizedMatrix::F16 { rows, .. } => *rows,
            QuantizedMatrix::Fp8(m) => m.rows,
            QuantizedMatrix::Int8(m) => m.rows,
            QuantizedMatrix::Int4(m) => m.rows,
            QuantizedMatrix::Fp4(m) => m.rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            QuantizedMatrix::Bf16 { cols, .. } | QuantizedMatrix::F16 { cols, .. } => *cols,
            QuantizedMatrix::Fp8(m) => m.cols,
            QuantizedMatrix::Int8(m) => m.cols,
            QuantizedMatrix::Int4(m) => m.cols,
            QuantizedMatrix::Fp4(m) => m.cols,
        }
    }

    /// Bytes the packed weight occupies (values, scales, zero points).
    pub fn storage_bytes(&self) -> usize {
        match self {
            QuantizedMatrix::Bf16 { values, .. } => 2 * values.len(),
            QuantizedMatrix::F16 { values, .. } => 2 * values.len(),
            QuantizedMatrix::Fp8(m) => m.storage_bytes(),
            QuantizedMatrix::Int8(m) => m.storage_bytes(),
            QuantizedMatrix::Int4(m) => m.storage_bytes(),
            QuantizedMatrix::Fp4(m) => m.storage_bytes(),
        }
    }

    /// Dequantize row `r` into `out` (`cols` values): the scalar reference a GEMV kernel is tested against.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        let (rows, cols) = (self.rows(), self.cols());
        if r >= rows {
            return Err(QuantError::RowOutOfRange { row: r, rows });
        }
        if out.len() != cols {
            return Err(QuantError::LengthMismatch { what: "dequantized row", expected: cols, actual: out.len() });
        }
        match self {
            QuantizedMatrix::Bf16 { values, .. } => {
                check_len("BF16 values", rows * cols, values.len())?;
                for (o, v) in out.iter_mut().zip(&values[r * cols..]) {
                    *o = v.to_f32();
                }
                Ok(())
            }
            QuantizedMatrix::F16 { values, .. } => {
                check_len("FP16 values", rows * cols, values.len())?;
                for (o, v) in out.iter_mut().zip(&values[r * cols..]) {
                    *o = v.to_f32();
                }
                Ok(())
            }
            QuantizedMatrix::Fp8(m) => m.dequantize_row(r, out),
            QuantizedMatrix::Int8(m) => m.dequantize_row(r, out),
            QuantizedMatrix::Int4(m) => m.dequantize_row_isa(crate::Isa::detect(), r, out),
            QuantizedMatrix::Fp4(m) => m.dequantize_row(r, out),
        }
    }

    /// The whole matrix dequantized, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let (rows, cols) = (self.rows(), self.cols());
        let mut out = vec![0f32; rows * cols];
        for (r, row) in out.chunks_mut(cols).enumerate() {
            // Cannot fail: r < rows and every chunk has exactly `cols` values.
            let _ = self.dequantize_row(r, row);
        }
        out
    }
}

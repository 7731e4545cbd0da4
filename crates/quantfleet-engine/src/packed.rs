//! Weight matrices quantized at load for a precision tier: BF16, FP8 E4M3 (one f32 scale per output row),
//! INT8 (one f32 scale per output row) and INT4 (groups of 32-256 input features, one f16 scale per group,
//! a u8 zero point per group when asymmetric). This is the host-side, backend-neutral form: the CPU backend
//! computes on it directly (`cpu/packed_kernels.rs`), a GPU backend copies it to the device.
//!
//! Layout (row-major, `rows` = output features, `cols` = input features):
//! * BF16: 2 bytes per element, little endian.
//! * FP8 E4M3 and INT8: 1 byte per element; value = decode(code) * row_scales[row].
//! * INT4: each row takes `ceil(cols / 2)` bytes; element `2k` is the LOW nibble of byte `k`, element `2k+1`
//!   the HIGH nibble (the quant crate's order); value = (nibble - zero) * scale, where zero is 8 for symmetric
//!   groups and `zeros[row * groups_per_row + g]` otherwise.
//! * `input_scales` (AWQ): the matrix holds Q(W diag(s)); a product divides its input by s first, so the
//!   layer still computes x W^T without folding s into a previous operation.
//!
//! The storage bytes match the fit planner's conventions (`quantfleet_api::plan::matrix_bytes`), plus the
//! AWQ input scales (4 bytes per input feature), which the planner does not count.

use half::f16;
use quantfleet_quant::int4::Int4Scales;
use quantfleet_quant::{Fp8Format, QuantizedMatrix};

use crate::error::{EngineError, Result};

/// Storage format of a [`PackedMatrix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PackedFormat {
    Bf16,
    Fp8E4m3,
    Int8,
    Int4 { group: usize, symmetric: bool },
}

impl PackedFormat {
    pub fn name(&self) -> String {
        match self {
            PackedFormat::Bf16 => "bf16".into(),
            PackedFormat::Fp8E4m3 => "fp8-e4m3".into(),
            PackedFormat::Int8 => "int8".into(),
            PackedFormat::Int4 { group, symmetric } => {
                format!("int4-g{group}-{}", if *symmetric { "sym" } else { "asym" })
            }
        }
    }
}

/// A quantized weight matrix owned in host memory (see the module docs for the layout).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedMatrix {
    pub format: PackedFormat,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
    /// FP8/INT8: one scale per row. Empty otherwise.
    pub row_scales: Vec<f32>,
    /// INT4: one scale per (row, group). Empty otherwise.
    pub group_scales: Vec<f16>,
    /// INT4 asymmetric: one zero point per (row, group). Empty otherwise.
    pub zeros: Vec<u8>,
    /// AWQ per-input-feature scales: inputs are divided by these before the product.
    pub input_scales: Option<Vec<f32>>,
}

fn bad(what: String) -> EngineError {
    EngineError::InvalidRequest(format!("packed matrix: {what}"))
}

impl PackedMatrix {
    /// Converts a quantized matrix of the quant crate. INT4 group scales are stored as f16: quantize with
    /// `ScaleStorage::F16` so that the conversion is exact (f32 scales are rounded to f16 here).
    pub fn from_quantized(q: &QuantizedMatrix) -> Result<Self> {
        let (rows, cols) = (q.rows(), q.cols());
        let base = |format, data| PackedMatrix {
            format,
            rows,
            cols,
            data,
            row_scales: Vec::new(),
            group_scales: Vec::new(),
            zeros: Vec::new(),
            input_scales: None,
        };
        let m = match q {
            QuantizedMatrix::Bf16 { values, .. } => {
                base(PackedFormat::Bf16, values.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect())
            }
            QuantizedMatrix::Fp8(m) => {
                if m.format != Fp8Format::E4M3 {
                    return Err(bad("only FP8 E4M3 weights are supported".into()));
                }
                let mut p = base(PackedFormat::Fp8E4m3, m.codes.clone());
                p.row_scales = (0..rows).map(|r| m.row_scale(r)).collect();
                p
            }
            QuantizedMatrix::Int8(m) => {
                let mut p = base(PackedFormat::Int8, m.codes.iter().map(|&c| c as u8).collect());
                p.row_scales = m.scales.clone();
                p
            }
            QuantizedMatrix::Int4(m) => {
                let groups = rows * m.groups_per_row();
                let symmetric = m.zeros.is_none();
                let mut p = base(PackedFormat::Int4 { group: m.group_size.get(), symmetric }, m.packed.clone());
                p.group_scales = match &m.scales {
                    Int4Scales::F16(v) => v.clone(),
                    other => (0..groups).map(|i| f16::from_f32(other.get(i))).collect(),
                };
                p.zeros = m.zeros.clone().unwrap_or_default();
                p
            }
            other => {
                return Err(bad(format!(
                    "{:?} weights are not supported by the engine",
                    std::mem::discriminant(other)
                )));
            }
        };
        m.validate()?;
        Ok(m)
    }

    pub fn groups_per_row(&self) -> usize {
        match self.format {
            PackedFormat::Int4 { group, .. } => self.cols.div_ceil(group),
            _ => 0,
        }
    }

    /// Bytes of one row of `data`.
    pub fn row_bytes(&self) -> usize {
        match self.format {
            PackedFormat::Bf16 => 2 * self.cols,
            PackedFormat::Fp8E4m3 | PackedFormat::Int8 => self.cols,
            PackedFormat::Int4 { .. } => self.cols.div_ceil(2),
        }
    }

    /// Every length consistent with the shape; FP8 codes finite (the E4M3 NaN codes 0x7f/0xff are refused:
    /// the fast kernels do not decode them as NaN); scales finite.
    pub fn validate(&self) -> Result<()> {
        if self.rows == 0 || self.cols == 0 {
            return Err(bad(format!("empty shape {} x {}", self.rows, self.cols)));
        }
        let expect = |what: &str, want: usize, got: usize| {
            if want == got { Ok(()) } else { Err(bad(format!("{what}: expected {want}, found {got}"))) }
        };
        expect("data bytes", self.rows * self.row_bytes(), self.data.len())?;
        match self.format {
            PackedFormat::Bf16 => {}
            PackedFormat::Fp8E4m3 | PackedFormat::Int8 => {
                expect("row scales", self.rows, self.row_scales.len())?;
                if self.format == PackedFormat::Fp8E4m3 && self.data.iter().any(|&c| c & 0x7f == 0x7f) {
                    return Err(bad("FP8 E4M3 NaN code".into()));
                }
            }
            PackedFormat::Int4 { group, symmetric } => {
                if !matches!(group, 32 | 64 | 128 | 256) {
                    return Err(bad(format!("INT4 group size {group}")));
                }
                let groups = self.rows * self.groups_per_row();
                expect("group scales", groups, self.group_scales.len())?;
                expect("zero points", if symmetric { 0 } else { groups }, self.zeros.len())?;
                if self.zeros.iter().any(|&z| z > 15) {
                    return Err(bad("INT4 zero point above 15".into()));
                }
            }
        }
        if let Some(s) = &self.input_scales {
            expect("input scales", self.cols, s.len())?;
            if s.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(bad("input scales must be positive and finite".into()));
            }
        }
        let finite = self.row_scales.iter().all(|s| s.is_finite()) && self.group_scales.iter().all(|s| s.is_finite());
        if !finite {
            return Err(bad("non-finite scale".into()));
        }
        Ok(())
    }

    /// Bytes this matrix occupies: values, scales, zero points and AWQ input scales.
    pub fn storage_bytes(&self) -> usize {
        self.data.len()
            + 4 * self.row_scales.len()
            + 2 * self.group_scales.len()
            + self.zeros.len()
            + 4 * self.input_scales.as_ref().map_or(0, Vec::len)
    }

    pub fn row_data(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Scalar reference: row `r` of the stored matrix (Q(W diag(s)) for AWQ: input scales NOT applied).
    /// Written for obviousness; the fast kernels are tested against it.
    pub fn dequantize_row_reference(&self, r: usize, out: &mut [f32]) -> Result<()> {
        if r >= self.rows || out.len() != self.cols {
            return Err(bad(format!("row {r} into {} values of a {} x {} matrix", out.len(), self.rows, self.cols)));
        }
        let row = self.row_data(r);
        match self.format {
            PackedFormat::Bf16 => {
                for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                    *o = half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
            PackedFormat::Fp8E4m3 => {
                for (o, &c) in out.iter_mut().zip(row) {
                    *o = Fp8Format::E4M3.decode(c) * self.row_scales[r];
                }
            }
            PackedFormat::Int8 => {
                for (o, &c) in out.iter_mut().zip(row) {
                    *o = (c as i8) as f32 * self.row_scales[r];
                }
            }
            PackedFormat::Int4 { group, symmetric } => {
                let gpr = self.groups_per_row();
                for (c, o) in out.iter_mut().enumerate() {
                    let nibble = (row[c / 2] >> (4 * (c % 2))) & 0x0f;
                    let g = r * gpr + c / group;
                    let zero = if symmetric { 8 } else { self.zeros[g] };
                    *o = (nibble as f32 - zero as f32) * self.group_scales[g].to_f32();
                }
            }
        }
        Ok(())
    }

    /// Scalar reference of `(row r) · (x / input_scales)`, summed in f64.
    pub fn dot_reference(&self, r: usize, x: &[f32]) -> Result<f32> {
        let mut w = vec![0.0f32; self.cols];
        self.dequantize_row_reference(r, &mut w)?;
        if x.len() != self.cols {
            return Err(bad(format!("input of {} for {} columns", x.len(), self.cols)));
        }
        let s = |j: usize| self.input_scales.as_ref().map_or(1.0, |s| s[j] as f64);
        Ok(w.iter().zip(x).enumerate().map(|(j, (&a, &b))| a as f64 * b as f64 / s(j)).sum::<f64>() as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quantfleet_quant::{Fp8Scaling, Int4Config, MatrixRef, WeightFormat, quantize_rtn};

    #[test]
    fn reference_dequantization_equals_the_quant_crate_for_every_format() {
        let (rows, cols) = (5, 96);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let m = MatrixRef::new("w", &w, rows, cols).unwrap();
        let mut int4 = Int4Config::asymmetric(32).unwrap();
        int4.scales = quantfleet_quant::ScaleStorage::F16;
        let mut int4s = Int4Config::symmetric(64).unwrap();
        int4s.scales = quantfleet_quant::ScaleStorage::F16;
        let formats = [
            WeightFormat::Bf16,
            WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling: Fp8Scaling::PerRow },
            WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling: Fp8Scaling::PerTensor },
            WeightFormat::Int8,
            WeightFormat::Int4(int4),
            WeightFormat::Int4(int4s),
        ];
        for f in formats {
            let q = quantize_rtn(&m, &f).unwrap();
            let p = PackedMatrix::from_quantized(&q).unwrap();
            let (mut a, mut b) = (vec![0.0; cols], vec![0.0; cols]);
            for r in 0..rows {
                q.dequantize_row(r, &mut a).unwrap();
                p.dequantize_row_reference(r, &mut b).unwrap();
                assert_eq!(a, b, "{f:?} row {r}");
            }
        }
    }

    #[test]
    fn corrupt_packed_matrices_are_refused() {
        let w: Vec<f32> = (0..64).map(|i| i as f32 * 0.1 - 3.0).collect();
        let m = MatrixRef::new("w", &w, 2, 32).unwrap();
        let q = quantize_rtn(&m, &WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling: Fp8Scaling::PerRow }).unwrap();
        let mut p = PackedMatrix::from_quantized(&q).unwrap();
        p.data[3] = 0x7f;
        assert!(p.validate().is_err(), "NaN code");
        let mut p = PackedMatrix::from_quantized(&q).unwrap();
        p.row_scales.pop();
        assert!(p.validate().is_err(), "missing scale");
        let mut p = PackedMatrix::from_quantized(&q).unwrap();
        p.input_scales = Some(vec![0.0; 32]);
        assert!(p.validate().is_err(), "zero input scale");
        assert!(p.dequantize_row_reference(2, &mut [0.0; 32]).is_err());
    }
}

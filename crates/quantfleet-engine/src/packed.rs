//! Weight matrices quantized at load for a precision tier: BF16, FP8 E4M3 (one f32 scale per output row, or
//! per group of 32-256 input features), INT8 (one f32 scale per output row) and INT4 (groups of 32-256 input
//! features, one f16 scale per group, a u8 zero point per group when asymmetric). This is the host-side,
//! backend-neutral form: the CPU backend computes on it directly (`cpu/packed_kernels.rs`), a GPU backend
//! copies it to the device.
//!
//! Layout (row-major, `rows` = output features, `cols` = input features):
//! * BF16: 2 bytes per element, little endian.
//! * FP8 E4M3 and INT8: 1 byte per element; value = `decode(code) * f32_scales[row]` (FP8 with scale groups
//!   of `g`: `* f32_scales[row * groups + col / g]`, `groups` = [`PackedMatrix::scale_groups_per_row`]).
//! * INT4: each row takes `ceil(cols / 2)` bytes; element `2k` is the LOW nibble of byte `k`, element `2k+1`
//!   the HIGH nibble (the quant crate's order); value = (nibble - zero) * scale, where zero is 8 for symmetric
//!   groups and `zeros[row * groups_per_row + g]` otherwise.
//! * `input_scales` (AWQ, SmoothQuant): the matrix holds Q(W diag(s)); a product divides its input by s first,
//!   so the layer still computes x W^T without folding s into a previous operation.
//! * `activations` ([`ActivationQuant`]): INT8 and INT4 matrices of a W8A8/W4A8 tier quantize their input at
//!   run time, per token in blocks of 32 input features ([`quantize_activation_block`]), and multiply in
//!   integers; a product then computes `row · x̂` where x̂ is the quantize-dequantized input. BF16 and INT4
//!   matrices of a weight-only tier (`activations: bf16`, the default) round their input to bf16.
//!
//! * `layout` ([`PackedLayout`]): the CPU backend re-orders an INT4 matrix with INT8 activations (and, at its
//!   AVX2 level, with bf16 activations) into groups of eight interleaved rows at load
//!   ([`PackedMatrix::interleave_rows8`]), and, on a CPU with AVX-512 BF16, INT4 and BF16 matrices with bf16
//!   activations into groups of sixteen ([`PackedMatrix::interleave_rows16`]);
//!   the bytes and scales are the same values in another order ([`PackedMatrix::into_rows_layout`] restores
//!   the row layout, which the GPU backend reads).
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
    /// FP8 E4M3 with one scale per row, or with `group` one per `group` consecutive columns of a row.
    Fp8E4m3 {
        group: Option<usize>,
    },
    Int8,
    Int4 {
        group: usize,
        symmetric: bool,
    },
}

impl PackedFormat {
    pub fn name(&self) -> String {
        match self {
            PackedFormat::Bf16 => "bf16".into(),
            PackedFormat::Fp8E4m3 { group: None } => "fp8-e4m3".into(),
            PackedFormat::Fp8E4m3 { group: Some(g) } => format!("fp8-e4m3-g{g}"),
            PackedFormat::Int8 => "int8".into(),
            PackedFormat::Int4 { group, symmetric } => {
                format!("int4-g{group}-{}", if *symmetric { "sym" } else { "asym" })
            }
        }
    }
}

/// What a product does to its input before multiplying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ActivationQuant {
    /// The input stays f32 (weight-only quantization: W8A16, W4A16).
    #[default]
    F32,
    /// The input (after the input scales) is rounded to bf16, to nearest with ties to even: the tier's
    /// `activations: bf16`. With AVX-512 BF16 the CPU then multiplies BF16 and INT4 weights by bf16 dot
    /// products; other kernels multiply the rounded values in f32 (the same products, summed in another order).
    Bf16,
    /// Dynamic symmetric INT8 per token and block of 32 input features (after the input scales): scale
    /// `d = amax / 127`, codes `round(x / d)` (ties to even). The block size and rounding of llama.cpp's
    /// Q8_0 activations, so the integer dot products match its `Q8_0 x Q8_0` / `Q4_0 x Q8_0` kernels in bits.
    Int8,
}

/// The order of an INT4 matrix's bytes, group scales and zero points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PackedLayout {
    /// Row after row, as the module docs describe: what the quantizer produces and every backend reads.
    #[default]
    Rows,
    /// INT4 with INT8 activations, or at the CPU's AVX2 level with bf16 activations (taken as 16-bit fixed
    /// point), for the CPU's integer kernels, whose vector lanes are rows: rows in groups of eight
    /// (`rows % 8 == 0`, `cols % 32 == 0`). Row group `R` and block `b` (columns `32 b .. 32 b + 32`) take the
    /// 128 bytes at `128 (R * cols / 32 + b)`, four runs of 32; byte `4 i + j` of run `v` holds, for row
    /// `8 R + i`, the code of column `32 b + 4 v + j` in its low nibble and of column `32 b + 16 + 4 v + j` in
    /// its high nibble. Scales (and zero points) of row group `R`, weight group `g`: the eight rows' at
    /// `8 (R * groups_per_row + g) + i`.
    Int4Rows8,
    /// INT4 with bf16 activations, for the CPU's AVX-512 BF16 kernels, whose vector lanes are rows: rows in
    /// groups of sixteen (`rows % 16 == 0`, `cols % 32 == 0`). Row group `R` and chunk `k` (columns
    /// `8 k .. 8 k + 8`) take the 64 bytes at `64 (R * cols / 8 + k)`; the little-endian u32 at byte `4 i`
    /// holds, for row `16 R + i`, the code of column `8 k + 2 j` in bits `4 j ..` and of column `8 k + 2 j + 1`
    /// in bits `16 + 4 j ..` (j = 0..3). Scales (and zero points) of row group `R`, weight group `g`: the
    /// sixteen rows' at `16 (R * groups_per_row + g) + i`.
    Int4Rows16,
    /// BF16 with bf16 activations, for the same kernels: rows in groups of sixteen (`rows % 16 == 0`,
    /// `cols % 32 == 0`). Row group `R` and column pair `p` (columns `2 p`, `2 p + 1`) take the 64 bytes at
    /// `64 (R * cols / 2 + p)`: bytes `4 i .. 4 i + 4` are row `16 R + i`'s two values, column `2 p` first.
    Bf16Rows16,
    /// INT8 or FP8 E4M3 with bf16 activations, for the same kernels: [`Self::Bf16Rows16`] with one byte per
    /// value. Row group `R` and column pair `p` take the 32 bytes at `32 (R * cols / 2 + p)`: bytes `2 i`,
    /// `2 i + 1` are row `16 R + i`'s two codes, column `2 p` first. Scales of row group `R`, scale group `g`: the
    /// sixteen rows' at `16 (R * groups + g) + i` (one scale per row: row order).
    Byte8Rows16,
}

impl PackedLayout {
    /// The sixteen-row layouts of the AVX-512 BF16 kernels.
    pub fn is_rows16(self) -> bool {
        matches!(self, PackedLayout::Int4Rows16 | PackedLayout::Bf16Rows16 | PackedLayout::Byte8Rows16)
    }
}

/// Input features per INT8 activation block.
pub const ACT_BLOCK: usize = 32;

/// Quantizes one block of activations (see [`ActivationQuant::Int8`]); returns the block's scale. An
/// all-zero block has scale 0 and zero codes; a block holding a NaN or an infinity gets a NaN scale, so the
/// product is NaN as it would be in f32 (the node's NaN guard must still see it).
#[inline(always)]
pub fn quantize_activation_block(x: &[f32], q: &mut [i8]) -> f32 {
    let mut amax = 0.0f32;
    let mut finite = true;
    for v in x {
        finite &= v.is_finite();
        amax = amax.max(v.abs());
    }
    if amax == 0.0 || !finite {
        q.fill(0);
        return if finite { 0.0 } else { f32::NAN };
    }
    let d = amax / 127.0;
    let id = 1.0 / d;
    for (c, &v) in q.iter_mut().zip(x) {
        *c = round_half_even_small(v * id).clamp(-127.0, 127.0) as i8;
    }
    d
}

/// `v.round_ties_even()` for |v| <= 2^22, without SSE4.1's `roundss` (baseline x86-64 calls libm's `rintf`,
/// which was 5% of an INT8-activation decode): adding 1.5 * 2^23 lands in [2^23, 2^24), where floats are
/// the integers, so the sum is rounded to the nearest integer, ties to even (the constant is even); the
/// subtraction is then exact.
#[inline(always)]
fn round_half_even_small(v: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0; // 1.5 * 2^23
    (v + SHIFT) - SHIFT
}

/// Quantize-dequantizes `x` in place per block of [`ACT_BLOCK`] (the reference of what an INT8-activation
/// product sees); `x.len()` must be a multiple of the block.
pub fn fake_quantize_activations(x: &mut [f32]) {
    let mut q = [0i8; ACT_BLOCK];
    for b in x.chunks_exact_mut(ACT_BLOCK) {
        let d = quantize_activation_block(b, &mut q);
        for (v, &c) in b.iter_mut().zip(&q) {
            *v = c as f32 * d;
        }
    }
}

/// Rounds `x` to bf16 in place (to nearest, ties to even; NaN stays NaN): what a
/// [`ActivationQuant::Bf16`] product sees.
pub fn round_to_bf16(x: &mut [f32]) {
    for v in x {
        *v = half::bf16::from_f32(*v).to_f32();
    }
}

/// Blocks of `n` rows x `per_row` values (row-major) turned into `per_row` x `n`, in place: the order of the
/// interleaved layouts' scales and zero points (row group `R`, weight group `g`, row `n R + i` at
/// `n (R * per_row + g) + i`).
fn transpose_row_groups<T: Copy>(v: &mut [T], n: usize, per_row: usize) {
    for block in v.chunks_exact_mut(n * per_row) {
        let rows = block.to_vec();
        for (i, row) in rows.chunks_exact(per_row).enumerate() {
            for (g, &x) in row.iter().enumerate() {
                block[n * g + i] = x;
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
    /// FP8/INT8: one scale per row, or for FP8 with scale groups one per (row, group) (see
    /// [`Self::scale_groups_per_row`]; in the order of the [`PackedLayout`]). Empty otherwise.
    pub f32_scales: Vec<f32>,
    /// INT4: one scale per (row, group). Empty otherwise.
    pub group_scales: Vec<f16>,
    /// INT4 asymmetric: one zero point per (row, group). Empty otherwise.
    pub zeros: Vec<u8>,
    /// AWQ/SmoothQuant per-input-feature scales: inputs are divided by these before the product.
    pub input_scales: Option<Vec<f32>>,
    /// Run-time quantization of the input (INT8 and INT4 weights only; `cols` a multiple of [`ACT_BLOCK`]).
    pub activations: ActivationQuant,
    /// The order of `data`, `group_scales` and `zeros` (INT4 only; see [`PackedLayout`]).
    pub layout: PackedLayout,
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
            f32_scales: Vec::new(),
            group_scales: Vec::new(),
            zeros: Vec::new(),
            input_scales: None,
            activations: ActivationQuant::F32,
            layout: PackedLayout::Rows,
        };
        let m = match q {
            QuantizedMatrix::Bf16 { values, .. } => {
                base(PackedFormat::Bf16, values.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect())
            }
            QuantizedMatrix::Fp8(m) => {
                if m.format != Fp8Format::E4M3 {
                    return Err(bad("only FP8 E4M3 weights are supported".into()));
                }
                let group = m.group_size.map(|g| g.get());
                let mut p = base(PackedFormat::Fp8E4m3 { group }, m.codes.clone());
                p.f32_scales = match group {
                    Some(_) => m.scales.clone(),
                    None => (0..rows).map(|r| m.scale(r, 0)).collect(),
                };
                p
            }
            QuantizedMatrix::Int8(m) => {
                let mut p = base(PackedFormat::Int8, m.codes.iter().map(|&c| c as u8).collect());
                p.f32_scales = m.scales.clone();
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

    /// INT4: scale groups per row (0 for other formats).
    pub fn groups_per_row(&self) -> usize {
        match self.format {
            PackedFormat::Int4 { group, .. } => self.cols.div_ceil(group),
            _ => 0,
        }
    }

    /// FP8 and INT8: `f32_scales` per row (1, or FP8's scale groups per row); 0 for other formats.
    pub fn scale_groups_per_row(&self) -> usize {
        match self.format {
            PackedFormat::Fp8E4m3 { group: Some(g) } => self.cols.div_ceil(g),
            PackedFormat::Fp8E4m3 { group: None } | PackedFormat::Int8 => 1,
            _ => 0,
        }
    }

    /// FP8 and INT8: columns that share one of `f32_scales` (the group, or the whole row).
    pub fn scale_span(&self) -> usize {
        match self.format {
            PackedFormat::Fp8E4m3 { group: Some(g) } => g,
            _ => self.cols,
        }
    }

    /// The index in `f32_scales` of (row `r`, column `c`) of an FP8 or INT8 matrix, in its layout.
    fn f32_scale_index(&self, r: usize, c: usize) -> usize {
        let (gpr, g) = (self.scale_groups_per_row(), c / self.scale_span());
        match self.layout {
            PackedLayout::Byte8Rows16 => 16 * ((r / 16) * gpr + g) + r % 16,
            _ => r * gpr + g,
        }
    }

    /// Bytes of one row of `data`.
    pub fn row_bytes(&self) -> usize {
        match self.format {
            PackedFormat::Bf16 => 2 * self.cols,
            PackedFormat::Fp8E4m3 { .. } | PackedFormat::Int8 => self.cols,
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
            PackedFormat::Fp8E4m3 { group } => {
                if let Some(g) = group
                    && !matches!(g, 32 | 64 | 128 | 256)
                {
                    return Err(bad(format!("FP8 scale group size {g} (32, 64, 128 or 256)")));
                }
                expect("FP8 scales", self.rows * self.scale_groups_per_row(), self.f32_scales.len())?;
                if self.data.iter().any(|&c| c & 0x7f == 0x7f) {
                    return Err(bad("FP8 E4M3 NaN code".into()));
                }
            }
            PackedFormat::Int8 => expect("row scales", self.rows, self.f32_scales.len())?,
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
        if self.layout == PackedLayout::Int4Rows8
            && !(matches!(self.format, PackedFormat::Int4 { .. })
                && matches!(self.activations, ActivationQuant::Int8 | ActivationQuant::Bf16)
                && self.rows.is_multiple_of(8)
                && self.cols.is_multiple_of(32))
        {
            return Err(bad(format!(
                "the interleaved layout needs INT4 weights, INT8 or bf16 activations, rows % 8 == 0 and cols % \
                 32 == 0 ({} with {:?} activations, {} x {})",
                self.format_name(),
                self.activations,
                self.rows,
                self.cols
            )));
        }
        let rows16_weights = match self.layout {
            PackedLayout::Int4Rows16 => Some(("INT4", matches!(self.format, PackedFormat::Int4 { .. }))),
            PackedLayout::Bf16Rows16 => Some(("BF16", self.format == PackedFormat::Bf16)),
            PackedLayout::Byte8Rows16 => {
                Some(("INT8 or FP8", matches!(self.format, PackedFormat::Int8 | PackedFormat::Fp8E4m3 { .. })))
            }
            _ => None,
        };
        if let Some((weights, format_fits)) = rows16_weights
            && !(format_fits
                && self.activations == ActivationQuant::Bf16
                && self.rows.is_multiple_of(16)
                && self.cols.is_multiple_of(32))
        {
            return Err(bad(format!(
                "the sixteen-row interleaved layout {:?} needs {weights} weights, bf16 activations, rows % 16 == 0 \
                 and cols % 32 == 0 ({} with {:?} activations, {} x {})",
                self.layout,
                self.format_name(),
                self.activations,
                self.rows,
                self.cols
            )));
        }
        if let Some(s) = &self.input_scales {
            expect("input scales", self.cols, s.len())?;
            if s.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(bad("input scales must be positive and finite".into()));
            }
        }
        if self.activations == ActivationQuant::Int8 {
            if !matches!(self.format, PackedFormat::Int8 | PackedFormat::Int4 { .. }) {
                return Err(bad(format!("INT8 activations need INT8 or INT4 weights, not {}", self.format.name())));
            }
            if !self.cols.is_multiple_of(ACT_BLOCK) {
                return Err(bad(format!("INT8 activations need a multiple of {ACT_BLOCK} columns, not {}", self.cols)));
            }
        }
        let finite = self.f32_scales.iter().all(|s| s.is_finite()) && self.group_scales.iter().all(|s| s.is_finite());
        if !finite {
            return Err(bad("non-finite scale".into()));
        }
        Ok(())
    }

    /// Bytes this matrix occupies: values, scales, zero points and AWQ input scales.
    pub fn storage_bytes(&self) -> usize {
        self.data.len()
            + 4 * self.f32_scales.len()
            + 2 * self.group_scales.len()
            + self.zeros.len()
            + 4 * self.input_scales.as_ref().map_or(0, Vec::len)
    }

    /// The bytes of row `r` (the row layout only: an interleaved row is not contiguous).
    pub fn row_data(&self, r: usize) -> &[u8] {
        assert_eq!(self.layout, PackedLayout::Rows, "row_data of an interleaved matrix");
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Where the code of (row `r`, column `c`) of an INT4 matrix is: its byte and whether it is the high
    /// nibble; and the index of its group's scale and zero point.
    fn int4_position(&self, r: usize, c: usize) -> (usize, bool, usize) {
        let PackedFormat::Int4 { group, .. } = self.format else { unreachable!("INT4 only") };
        let gpr = self.groups_per_row();
        match self.layout {
            PackedLayout::Rows => (r * self.row_bytes() + c / 2, c % 2 == 1, r * gpr + c / group),
            PackedLayout::Int4Rows8 => {
                let (rg, i, b, k) = (r / 8, r % 8, c / 32, c % 32);
                let (v, j) = ((k % 16) / 4, k % 4);
                let byte = 128 * (rg * self.cols / 32 + b) + 32 * v + 4 * i + j;
                (byte, k >= 16, 8 * (rg * gpr + c / group) + i)
            }
            PackedLayout::Int4Rows16 => {
                let (rg, i, k, j, odd) = (r / 16, r % 16, c / 8, (c % 8) / 2, c % 2);
                let bit = 16 * odd + 4 * j;
                let byte = 64 * (rg * self.cols / 8 + k) + 4 * i + bit / 8;
                (byte, bit % 8 == 4, 16 * (rg * gpr + c / group) + i)
            }
            PackedLayout::Bf16Rows16 | PackedLayout::Byte8Rows16 => unreachable!("not an INT4 layout (validate)"),
        }
    }

    /// This INT4 matrix with INT8 or bf16 activations in [`PackedLayout::Int4Rows8`] (the same values
    /// re-ordered); an error if it does not qualify (see the layout). Re-interleaving an interleaved matrix
    /// returns it as is.
    pub fn interleave_rows8(mut self) -> Result<Self> {
        if self.layout == PackedLayout::Int4Rows8 {
            return Ok(self);
        }
        if self.layout != PackedLayout::Rows {
            return Err(bad(format!("cannot re-interleave a matrix in {:?}", self.layout)));
        }
        self.layout = PackedLayout::Int4Rows8;
        self.validate()?;
        // In place, one row group at a time, as `interleave_rows16`: a group's eight rows take the same 4 cols
        // bytes (and scales) in both layouts.
        let rb = self.row_bytes();
        let mut rows = vec![0u8; 8 * rb];
        for dst in self.data.chunks_exact_mut(8 * rb) {
            rows.copy_from_slice(dst);
            let code = |i: usize, c: usize| (rows[i * rb + c / 2] >> (4 * (c % 2))) & 0x0f;
            for (k, run) in dst.chunks_exact_mut(32).enumerate() {
                let (b, v) = (k / 4, k % 4);
                for (i, bytes) in run.chunks_exact_mut(4).enumerate() {
                    for (j, byte) in bytes.iter_mut().enumerate() {
                        let c = 32 * b + 4 * v + j;
                        *byte = code(i, c) | (code(i, c + 16) << 4);
                    }
                }
            }
        }
        let gpr = self.groups_per_row();
        transpose_row_groups(&mut self.group_scales, 8, gpr);
        transpose_row_groups(&mut self.zeros, 8, gpr);
        Ok(self)
    }

    /// This INT4, BF16, INT8 or FP8 matrix with bf16 activations in [`PackedLayout::Int4Rows16`],
    /// [`PackedLayout::Bf16Rows16`] or [`PackedLayout::Byte8Rows16`] (the same values re-ordered); an error
    /// when it does not fit that layout.
    pub fn interleave_rows16(mut self) -> Result<Self> {
        if self.layout.is_rows16() {
            return Ok(self);
        }
        if self.layout != PackedLayout::Rows {
            return Err(bad(format!("cannot re-interleave a matrix in {:?}", self.layout)));
        }
        let layout = match self.format {
            PackedFormat::Bf16 => PackedLayout::Bf16Rows16,
            PackedFormat::Int8 | PackedFormat::Fp8E4m3 { .. } => PackedLayout::Byte8Rows16,
            PackedFormat::Int4 { .. } => PackedLayout::Int4Rows16,
        };
        self.layout = layout;
        self.validate()?;
        // In place, one row group at a time: a group's rows take the same bytes (and scales) in both layouts,
        // so only a group's worth of scratch is needed, never a second copy of the matrix.
        let rb = self.row_bytes();
        let mut rows = vec![0u8; 16 * rb];
        let pair_element_bytes = self.pair_element_bytes();
        for dst in self.data.chunks_exact_mut(16 * rb) {
            rows.copy_from_slice(dst);
            if let Some(es) = pair_element_bytes {
                // Pair p of row i: the row's bytes of columns 2 p, 2 p + 1, to lane i of pair p's 16 lanes.
                let lane = 2 * es;
                for (p, pair) in dst.chunks_exact_mut(16 * lane).enumerate() {
                    for (i, l) in pair.chunks_exact_mut(lane).enumerate() {
                        l.copy_from_slice(&rows[i * rb + lane * p..i * rb + lane * (p + 1)]);
                    }
                }
                continue;
            }
            let code = |i: usize, c: usize| ((rows[i * rb + c / 2] >> (4 * (c % 2))) & 0x0f) as u32;
            for (k, chunk) in dst.chunks_exact_mut(64).enumerate() {
                for (i, lane) in chunk.chunks_exact_mut(4).enumerate() {
                    let c = 8 * k;
                    let v = (0..4)
                        .fold(0u32, |v, j| v | code(i, c + 2 * j) << (4 * j) | code(i, c + 2 * j + 1) << (16 + 4 * j));
                    lane.copy_from_slice(&v.to_le_bytes());
                }
            }
        }
        if layout == PackedLayout::Int4Rows16 {
            let gpr = self.groups_per_row();
            transpose_row_groups(&mut self.group_scales, 16, gpr);
            transpose_row_groups(&mut self.zeros, 16, gpr);
        }
        if layout == PackedLayout::Byte8Rows16 {
            // One scale per row keeps row order (a transpose of 16 x 1).
            let gpr = self.scale_groups_per_row();
            transpose_row_groups(&mut self.f32_scales, 16, gpr);
        }
        Ok(self)
    }

    /// Bytes per value of the column-pair layouts ([`PackedLayout::Bf16Rows16`], [`PackedLayout::Byte8Rows16`]);
    /// `None` for the others.
    fn pair_element_bytes(&self) -> Option<usize> {
        match self.layout {
            PackedLayout::Bf16Rows16 => Some(2),
            PackedLayout::Byte8Rows16 => Some(1),
            _ => None,
        }
    }

    /// The first byte of BF16, INT8 or FP8 element (row `r`, column `c`) in this matrix's layout.
    fn element_position(&self, r: usize, c: usize) -> usize {
        match self.pair_element_bytes() {
            Some(es) => es * (32 * ((r / 16) * self.cols / 2 + c / 2) + 2 * (r % 16) + c % 2),
            None => r * self.row_bytes() + c * if self.format == PackedFormat::Bf16 { 2 } else { 1 },
        }
    }

    /// This matrix in the row layout (the same values): what backends other than the CPU's read. A matrix in
    /// the row layout is returned as is.
    pub fn into_rows_layout(self) -> Result<Self> {
        if self.layout == PackedLayout::Rows {
            return Ok(self);
        }
        if let Some(es) = self.pair_element_bytes() {
            let mut data = vec![0; self.data.len()];
            for (r, row) in data.chunks_exact_mut(self.row_bytes()).enumerate() {
                for (c, v) in row.chunks_exact_mut(es).enumerate() {
                    let at = self.element_position(r, c);
                    v.copy_from_slice(&self.data[at..at + es]);
                }
            }
            // Scales back to (row, group) order: entry i is row i / gpr's group i % gpr.
            let (gpr, span) = (self.scale_groups_per_row().max(1), self.scale_span());
            let f32_scales = (0..self.f32_scales.len())
                .map(|i| self.f32_scales[self.f32_scale_index(i / gpr, i % gpr * span)])
                .collect();
            let out = PackedMatrix {
                data,
                f32_scales,
                layout: PackedLayout::Rows,
                input_scales: self.input_scales.clone(),
                ..self
            };
            out.validate()?;
            return Ok(out);
        }
        let PackedFormat::Int4 { group, .. } = self.format else { unreachable!("INT4: the pair layouts returned") };
        let (rb, gpr) = (self.row_bytes(), self.groups_per_row());
        let mut out = PackedMatrix {
            data: vec![0; self.data.len()],
            group_scales: vec![f16::ZERO; self.group_scales.len()],
            zeros: vec![0; self.zeros.len()],
            layout: PackedLayout::Rows,
            f32_scales: self.f32_scales.clone(),
            input_scales: self.input_scales.clone(),
            ..self
        };
        for r in 0..self.rows {
            for c in 0..self.cols {
                let (byte, high, g) = self.int4_position(r, c);
                let code = (self.data[byte] >> (4 * high as u8)) & 0x0f;
                out.data[r * rb + c / 2] |= code << (4 * (c % 2));
                if c % group == 0 {
                    out.group_scales[r * gpr + c / group] = self.group_scales[g];
                    if !self.zeros.is_empty() {
                        out.zeros[r * gpr + c / group] = self.zeros[g];
                    }
                }
            }
        }
        out.validate()?;
        Ok(out)
    }

    /// Scalar reference: row `r` of the stored matrix (Q(W diag(s)) for AWQ: input scales NOT applied).
    /// Written for obviousness; the fast kernels are tested against it.
    pub fn dequantize_row_reference(&self, r: usize, out: &mut [f32]) -> Result<()> {
        if r >= self.rows || out.len() != self.cols {
            return Err(bad(format!("row {r} into {} values of a {} x {} matrix", out.len(), self.rows, self.cols)));
        }
        if let PackedFormat::Int4 { symmetric, .. } = self.format {
            for (c, o) in out.iter_mut().enumerate() {
                let (byte, high, g) = self.int4_position(r, c);
                let nibble = (self.data[byte] >> (4 * high as u8)) & 0x0f;
                let zero = if symmetric { 8 } else { self.zeros[g] };
                *o = (nibble as f32 - zero as f32) * self.group_scales[g].to_f32();
            }
            return Ok(());
        }
        for (c, o) in out.iter_mut().enumerate() {
            let at = self.element_position(r, c);
            *o = match self.format {
                PackedFormat::Bf16 => {
                    half::bf16::from_bits(u16::from_le_bytes([self.data[at], self.data[at + 1]])).to_f32()
                }
                PackedFormat::Fp8E4m3 { .. } => {
                    Fp8Format::E4M3.decode(self.data[at]) * self.f32_scales[self.f32_scale_index(r, c)]
                }
                PackedFormat::Int8 => (self.data[at] as i8) as f32 * self.f32_scales[self.f32_scale_index(r, c)],
                PackedFormat::Int4 { .. } => unreachable!("decoded above"),
            };
        }
        Ok(())
    }

    /// The storage format, with `-a8` when the input is quantized to INT8 at run time.
    pub fn format_name(&self) -> String {
        match self.activations {
            // BF16 inputs are the weight-only default (`activations: bf16`), not a format of their own.
            ActivationQuant::F32 | ActivationQuant::Bf16 => self.format.name(),
            ActivationQuant::Int8 => format!("{}-a8", self.format.name()),
        }
    }

    /// The input a product really multiplies: divided by the input scales (in f32, as the kernels do), then
    /// rounded to bf16 or quantize-dequantized when the activations are BF16 or INT8.
    pub fn effective_input(&self, x: &[f32]) -> Result<Vec<f32>> {
        if x.len() != self.cols {
            return Err(bad(format!("input of {} for {} columns", x.len(), self.cols)));
        }
        let mut v: Vec<f32> = match &self.input_scales {
            Some(s) => x.iter().zip(s).map(|(a, b)| a / b).collect(),
            None => x.to_vec(),
        };
        match self.activations {
            ActivationQuant::F32 => {}
            ActivationQuant::Bf16 => round_to_bf16(&mut v),
            ActivationQuant::Int8 => fake_quantize_activations(&mut v),
        }
        Ok(v)
    }

    /// Scalar reference of `(row r) · effective_input(x)`, summed in f64.
    pub fn dot_reference(&self, r: usize, x: &[f32]) -> Result<f32> {
        let mut w = vec![0.0f32; self.cols];
        self.dequantize_row_reference(r, &mut w)?;
        let x = self.effective_input(x)?;
        Ok(w.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quantfleet_quant::{Fp8Scaling, Int4Config, MatrixRef, WeightFormat, quantize_rtn};
    use std::num::NonZeroUsize;

    /// The CPU's interleaved layouts hold the same values: every row dequantizes as in the row layout (the
    /// re-ordering loops and the reference's addressing are written independently), for INT4 with symmetric
    /// and asymmetric groups of 32-256 (a group cut short at the row end included) and for BF16, INT8 and FP8
    /// (per-row and per-group scales) in sixteen rows; matrices a layout does not fit are refused with a clear
    /// error. SYNTHETIC weights.
    #[test]
    fn interleaved_layouts_hold_the_same_values() {
        for (group, symmetric, rows, cols) in
            [(32, true, 16, 64), (64, false, 48, 96), (128, true, 32, 320), (256, false, 16, 288)]
        {
            let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 211) as f32 - 105.0) * 0.01).collect();
            let mut cfg = if symmetric { Int4Config::symmetric(group) } else { Int4Config::asymmetric(group) }.unwrap();
            cfg.scales = quantfleet_quant::ScaleStorage::F16;
            let q = quantize_rtn(&MatrixRef::new("w", &w, rows, cols).unwrap(), &WeightFormat::Int4(cfg)).unwrap();
            let m = PackedMatrix::from_quantized(&q).unwrap();
            let for_int8 = PackedMatrix { activations: ActivationQuant::Int8, ..m.clone() };
            let for_bf16 = PackedMatrix { activations: ActivationQuant::Bf16, ..m.clone() };
            let interleaved = [
                (for_int8.clone(), for_int8.clone().interleave_rows8().unwrap(), PackedLayout::Int4Rows8),
                (for_bf16.clone(), for_bf16.clone().interleave_rows16().unwrap(), PackedLayout::Int4Rows16),
            ];
            let bf16 = quantize_rtn(&MatrixRef::new("w", &w, rows, cols).unwrap(), &WeightFormat::Bf16).unwrap();
            let bf16 =
                PackedMatrix { activations: ActivationQuant::Bf16, ..PackedMatrix::from_quantized(&bf16).unwrap() };
            let fp8 = |scaling| WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling };
            let groups = Fp8Scaling::PerGroup(std::num::NonZeroUsize::new(group).unwrap());
            let bytes8 = [WeightFormat::Int8, fp8(Fp8Scaling::PerRow), fp8(groups)].map(|f| {
                let q = quantize_rtn(&MatrixRef::new("w", &w, rows, cols).unwrap(), &f).unwrap();
                PackedMatrix { activations: ActivationQuant::Bf16, ..PackedMatrix::from_quantized(&q).unwrap() }
            });
            let sixteen = [(bf16, PackedLayout::Bf16Rows16)]
                .into_iter()
                .chain(bytes8.map(|m| (m, PackedLayout::Byte8Rows16)))
                .filter(|_| rows.is_multiple_of(16))
                .map(|(m, layout)| (m.clone(), m.interleave_rows16().unwrap(), layout));
            let interleaved = interleaved.into_iter().chain(sixteen);
            for (m, i, layout) in interleaved {
                assert_eq!((i.layout, i.storage_bytes()), (layout, m.storage_bytes()));
                assert_ne!(i.data, m.data, "the bytes are re-ordered");
                let (mut a, mut b) = (vec![0.0; cols], vec![0.0; cols]);
                for r in 0..rows {
                    m.dequantize_row_reference(r, &mut a).unwrap();
                    i.dequantize_row_reference(r, &mut b).unwrap();
                    assert_eq!(a, b, "{layout:?} g{group} sym={symmetric} row {r}");
                }
                let again = match layout {
                    PackedLayout::Int4Rows8 => i.clone().interleave_rows8(),
                    _ => i.clone().interleave_rows16(),
                };
                assert_eq!(again.unwrap(), i, "interleaving twice changes nothing");
                assert_eq!(i.into_rows_layout().unwrap(), m, "{layout:?}: back to the row layout, bit for bit");
            }
        }
        let w: Vec<f32> = (0..12 * 64).map(|i| (i % 13) as f32 * 0.1).collect();
        let mut cfg = Int4Config::symmetric(32).unwrap();
        cfg.scales = quantfleet_quant::ScaleStorage::F16;
        let q = quantize_rtn(&MatrixRef::new("w", &w, 12, 64).unwrap(), &WeightFormat::Int4(cfg)).unwrap();
        let mut m = PackedMatrix::from_quantized(&q).unwrap();
        let err = m.clone().interleave_rows8().unwrap_err().to_string();
        assert!(err.contains("interleaved layout needs"), "{err}");
        m.activations = ActivationQuant::Int8;
        let err = m.clone().interleave_rows8().unwrap_err().to_string();
        assert!(err.contains("12 x 64"), "12 rows are not whole groups of 8: {err}");
        m.activations = ActivationQuant::Bf16;
        let err = m.interleave_rows16().unwrap_err().to_string();
        assert!(err.contains("sixteen-row") && err.contains("12 x 64"), "12 rows are not whole groups of 16: {err}");
    }

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
            WeightFormat::Fp8 {
                format: Fp8Format::E4M3,
                scaling: Fp8Scaling::PerGroup(NonZeroUsize::new(32).unwrap()),
            },
            WeightFormat::Fp8 {
                format: Fp8Format::E4M3,
                scaling: Fp8Scaling::PerGroup(NonZeroUsize::new(64).unwrap()),
            },
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
        p.f32_scales.pop();
        assert!(p.validate().is_err(), "missing scale");
        let mut p = PackedMatrix::from_quantized(&q).unwrap();
        p.input_scales = Some(vec![0.0; 32]);
        assert!(p.validate().is_err(), "zero input scale");
        assert!(p.dequantize_row_reference(2, &mut [0.0; 32]).is_err());
        let mut p = PackedMatrix::from_quantized(&q).unwrap();
        p.activations = ActivationQuant::Int8;
        assert!(p.validate().unwrap_err().to_string().contains("INT8 or INT4 weights"), "FP8 W8A8 on the CPU");
        // FP8 with scale groups: one scale per (row, group), groups of 32-256.
        let groups = Fp8Scaling::PerGroup(NonZeroUsize::new(32).unwrap());
        let q = quantize_rtn(&m, &WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling: groups }).unwrap();
        let p = PackedMatrix::from_quantized(&q).unwrap();
        assert_eq!(
            (p.format, p.scale_groups_per_row(), p.f32_scales.len()),
            (PackedFormat::Fp8E4m3 { group: Some(32) }, 1, 2)
        );
        let mut bad = p.clone();
        bad.format = PackedFormat::Fp8E4m3 { group: Some(16) };
        assert!(bad.validate().unwrap_err().to_string().contains("FP8 scale group size 16"));
        let mut bad = p.clone();
        bad.f32_scales.pop();
        assert!(bad.validate().unwrap_err().to_string().contains("FP8 scales"), "missing group scale");
    }

    #[test]
    fn int8_activations_need_whole_blocks() {
        let w: Vec<f32> = (0..2 * 48).map(|i| i as f32 * 0.01 - 0.4).collect();
        let q = quantize_rtn(&MatrixRef::new("w", &w, 2, 48).unwrap(), &WeightFormat::Int8).unwrap();
        let mut p = PackedMatrix::from_quantized(&q).unwrap();
        p.activations = ActivationQuant::Int8;
        assert!(p.validate().unwrap_err().to_string().contains("multiple of 32 columns"));
    }

    /// The block quantizer: scale amax/127, codes round-half-even and within +-127, all-zero blocks, NaN.
    #[test]
    fn activation_blocks_quantize_like_q8_0() {
        let mut x = [0.0f32; 32];
        // amax 127 gives scale 1 exactly, so the halves below are exact ties.
        x[..6].copy_from_slice(&[-127.0, 63.5, 0.5, 1.5, 2.5, -0.49]);
        let mut q = [0i8; 32];
        assert_eq!(quantize_activation_block(&x, &mut q), 1.0);
        assert_eq!(&q[..6], &[-127, 64, 0, 2, 2, 0]);
        x[1] = 200.0;
        assert_eq!(quantize_activation_block(&x, &mut q), 200.0 / 127.0);
        assert_eq!((q[0], q[1]), (-81, 127));
        assert_eq!(quantize_activation_block(&[0.0; 32], &mut q), 0.0);
        assert!(q.iter().all(|&c| c == 0));
        x[9] = f32::NAN;
        assert!(quantize_activation_block(&x, &mut q).is_nan());
        let mut v = vec![0.3f32; 64];
        v[33] = -1.0;
        fake_quantize_activations(&mut v);
        assert!((v[0] - 0.3).abs() <= 1e-7, "a block of equal values keeps them: {}", v[0]);
        assert!((v[33] + 1.0).abs() <= 1e-7);
        assert!((v[32] - 0.3).abs() <= 0.5 / 127.0 + 1e-7, "{}", v[32]);
    }

    /// The rounding trick equals `round_ties_even` over the whole range a block can produce (|v| <= 127 and a
    /// little): every tie k + 0.5, its neighbours one ulp away, and a dense sweep of ordinary values.
    #[test]
    fn small_round_half_even_equals_the_std_rounding() {
        let mut cases: Vec<f32> = Vec::new();
        for k in -130..130 {
            let tie = k as f32 + 0.5;
            cases.extend([tie, tie.next_up(), tie.next_down(), k as f32, -0.0]);
        }
        cases.extend((0..2_000_000).map(|i| (i as f32 - 1e6) * 1.3e-4));
        for v in cases {
            assert_eq!(round_half_even_small(v), v.round_ties_even(), "{v:e}");
        }
    }
}

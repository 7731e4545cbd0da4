//! INT4 weights: symmetric or asymmetric (zero point) groups of 32/64/128/256 input features, two values
//! per byte, with f32, f16 or double-quantized (8-bit code x per-tensor f32) group scales.
//!
//! Packed layout (the engine's GEMV reads this directly):
//! * Each row (output channel) starts on a byte boundary and takes `ceil(cols / 2)` bytes.
//! * Nibble order: element `2k` of a row is in the LOW nibble (bits 0-3) of byte `k`, element `2k+1` in the
//!   HIGH nibble (bits 4-7). An odd row length leaves the last high nibble zero.
//! * Value = (nibble - zero) * scale. Symmetric groups use the implicit zero 8 (nibble = q + 8, q in -8..=7,
//!   scale = amax / 7); asymmetric groups store one zero point 0..=15 per group (scale = range / 15, with the
//!   range widened to include 0 so that zero is exact).
//! * Groups run along the row: group `g` of row `r` covers columns `g*G .. min((g+1)*G, cols)`; the last
//!   group of a row may be shorter when G does not divide `cols` (e.g. 576 columns at G = 128). Scales and
//!   zero points are indexed `r * groups_per_row + g`.

use crate::error::{QuantError, Result, check_len};
use crate::halfp::f16;
use crate::matrix::MatrixRef;
use crate::simd::{Isa, clamp_fast, multiversion, round_small};

/// A supported group size (32, 64, 128 or 256 input features per scale).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GroupSize(usize);

impl GroupSize {
    pub fn new(size: usize) -> Result<Self> {
        match size {
            32 | 64 | 128 | 256 => Ok(Self(size)),
            other => Err(QuantError::UnsupportedGroupSize(other)),
        }
    }
    pub fn get(self) -> usize {
        self.0
    }
}

/// How group scales are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScaleStorage {
    F32,
    F16,
    /// Double quantization: each group scale is an unsigned 8-bit code times one per-tensor f32 scale
    /// (scales are non-negative, so the sign bit would be wasted).
    DoubleQuant,
}

/// INT4 quantizer settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Int4Config {
    pub group_size: GroupSize,
    pub symmetric: bool,
    pub scales: ScaleStorage,
}

impl Int4Config {
    /// Symmetric groups of `group_size` with f32 scales.
    pub fn symmetric(group_size: usize) -> Result<Self> {
        Ok(Self { group_size: GroupSize::new(group_size)?, symmetric: true, scales: ScaleStorage::F32 })
    }
    /// Asymmetric (zero point) groups of `group_size` with f32 scales.
    pub fn asymmetric(group_size: usize) -> Result<Self> {
        Ok(Self { symmetric: false, ..Self::symmetric(group_size)? })
    }
}

/// Stored group scales.
#[derive(Clone, Debug, PartialEq)]
pub enum Int4Scales {
    F32(Vec<f32>),
    F16(Vec<f16>),
    DoubleQuant { codes: Vec<u8>, tensor_scale: f32 },
}

impl Int4Scales {
    /// Scale of group index `i` as f32.
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Int4Scales::F32(v) => v[i],
            Int4Scales::F16(v) => v[i].to_f32(),
            Int4Scales::DoubleQuant { codes, tensor_scale } => codes[i] as f32 * tensor_scale,
        }
    }
    fn bytes(&self) -> usize {
        match self {
            Int4Scales::F32(v) => 4 * v.len(),
            Int4Scales::F16(v) => 2 * v.len(),
            Int4Scales::DoubleQuant { codes, .. } => codes.len() + 4,
        }
    }
}

/// Quantization parameters of one group: value = (nibble - zero) * scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupParams {
    pub scale: f32,
    pub zero: u8,
}

impl GroupParams {
    /// Round-to-nearest fit of one group, with the range multiplied by `clip` (1.0 = no clipping).
    #[inline(always)]
    pub fn fit(values: &[f32], symmetric: bool, clip: f32) -> Self {
        fit_group(values, symmetric, clip)
    }

    /// Nibble for `x` (round to nearest even, clamped to 0..=15).
    #[inline(always)]
    pub fn quantize(&self, x: f32) -> u8 {
        let inv = if self.scale > 0.0 { 1.0 / self.scale } else { 0.0 };
        quantize_nibble(x, inv, self.zero as i32)
    }

    #[inline(always)]
    pub fn dequantize(&self, nibble: u8) -> f32 {
        (nibble as f32 - self.zero as f32) * self.scale
    }
}

#[inline(always)]
fn quantize_nibble(x: f32, inv: f32, zero: i32) -> u8 {
    // Clamp first (bounds wider than the grid) so round_small's range holds for any scale.
    (round_small(clamp_fast(x * inv, -32.0, 32.0)) + zero).clamp(0, 15) as u8
}

/// Largest |v| of a group (0 for an empty one), with 16 independent lanes so it vectorises.
#[inline(always)]
fn group_amax(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = values.chunks_exact(16);
    for c in &mut chunks {
        for l in 0..16 {
            let a = c[l].abs();
            lanes[l] = if a > lanes[l] { a } else { lanes[l] };
        }
    }
    chunks.remainder().iter().fold(lanes.iter().fold(0f32, |m, &v| m.max(v)), |m, v| m.max(v.abs()))
}

/// (min(values, 0), max(values, 0)) with 16 independent lanes so it vectorises.
#[inline(always)]
fn group_min_max(values: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = ([0f32; 16], [0f32; 16]);
    let mut chunks = values.chunks_exact(16);
    for c in &mut chunks {
        for l in 0..16 {
            lo[l] = if c[l] < lo[l] { c[l] } else { lo[l] };
            hi[l] = if c[l] > hi[l] { c[l] } else { hi[l] };
        }
    }
    let init = (lo.iter().fold(0f32, |a, &b| a.min(b)), hi.iter().fold(0f32, |a, &b| a.max(b)));
    chunks.remainder().iter().fold(init, |(l, h), &v| (l.min(v), h.max(v)))
}

#[inline(always)]
fn fit_group(values: &[f32], symmetric: bool, clip: f32) -> GroupParams {
    if symmetric {
        GroupParams { scale: group_amax(values) * clip / 7.0, zero: 8 }
    } else {
        let (lo, hi) = group_min_max(values);
        let scale = (hi - lo) * clip / 15.0;
        let zero = if scale > 0.0 { round_small(clamp_fast(-lo * clip / scale, 0.0, 15.0)) as u8 } else { 0 };
        GroupParams { scale, zero }
    }
}

multiversion! {
    /// Fit every group of one row (`params.len() == row.len().div_ceil(group)`).
    fn fit_row(row: &[f32], group: usize, symmetric: bool, params: &mut [GroupParams]) {
        for (p, chunk) in params.iter_mut().zip(row.chunks(group)) {
            *p = fit_group(chunk, symmetric, 1.0);
        }
    }
}

multiversion! {
    /// Quantize one group into packed nibbles (`dst.len() == src.len().div_ceil(2)`).
    fn encode_group(src: &[f32], inv: f32, zero: i32, dst: &mut [u8]) {
        let pairs = src.len() / 2;
        for (d, p) in dst[..pairs].iter_mut().zip(src.chunks_exact(2)) {
            *d = quantize_nibble(p[0], inv, zero) | (quantize_nibble(p[1], inv, zero) << 4);
        }
        if src.len() % 2 == 1 {
            dst[pairs] = quantize_nibble(src[src.len() - 1], inv, zero);
        }
    }
}

multiversion! {
    /// Dequantize packed nibbles of one group (`dst.len()` values; odd lengths ignore the last high nibble).
    fn decode_group(src: &[u8], scale: f32, zero: f32, dst: &mut [f32]) {
        let pairs = dst.len() / 2;
        for (d, &b) in dst.chunks_exact_mut(2).zip(&src[..pairs]) {
            d[0] = ((b & 0xF) as f32 - zero) * scale;
            d[1] = ((b >> 4) as f32 - zero) * scale;
        }
        if dst.len() % 2 == 1 {
            dst[pairs * 2] = ((src[pairs] & 0xF) as f32 - zero) * scale;
        }
    }
}

/// Pack 4-bit codes (low nibble of each input byte) two per byte in the documented order.
pub fn pack_nibbles(codes: &[u8]) -> Vec<u8> {
    codes.chunks(2).map(|p| (p[0] & 0xF) | (p.get(1).map_or(0, |&h| (h & 0xF) << 4))).collect()
}

/// Inverse of [`pack_nibbles`]: `len` codes from `packed`.
pub fn unpack_nibbles(packed: &[u8], len: usize) -> Result<Vec<u8>> {
    if packed.len() != len.div_ceil(2) {
        return Err(QuantError::LengthMismatch {
            what: "packed nibbles",
            expected: len.div_ceil(2),
            actual: packed.len(),
        });
    }
    Ok((0..len).map(|i| (packed[i / 2] >> (4 * (i % 2))) & 0xF).collect())
}

/// A packed INT4 weight matrix (see the module docs for the layout).
#[derive(Clone, Debug, PartialEq)]
pub struct Int4Matrix {
    pub rows: usize,
    pub cols: usize,
    pub group_size: GroupSize,
    /// `rows * ceil(cols / 2)` bytes.
    pub packed: Vec<u8>,
    pub scales: Int4Scales,
    /// One zero point per group for asymmetric matrices; `None` means the implicit symmetric zero 8.
    pub zeros: Option<Vec<u8>>,
}

impl Int4Matrix {
    pub fn groups_per_row(&self) -> usize {
        self.cols.div_ceil(self.group_size.get())
    }
    pub fn row_bytes(&self) -> usize {
        self.cols.div_ceil(2)
    }
    /// Parameters of group `g` of row `r`.
    pub fn group_params(&self, r: usize, g: usize) -> GroupParams {
        let i = r * self.groups_per_row() + g;
        GroupParams { scale: self.scales.get(i), zero: self.zeros.as_ref().map_or(8, |z| z[i]) }
    }
    /// Bytes of packed values, scales and zero points.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + self.scales.bytes() + self.zeros.as_ref().map_or(0, Vec::len)
    }

    /// Check that the field lengths agree with the shape (the fields are public).
    pub fn validate(&self) -> Result<()> {
        let groups = self.rows * self.groups_per_row();
        check_len("INT4 packed bytes", self.rows * self.row_bytes(), self.packed.len())?;
        let scales = match &self.scales {
            Int4Scales::F32(v) => v.len(),
            Int4Scales::F16(v) => v.len(),
            Int4Scales::DoubleQuant { codes, .. } => codes.len(),
        };
        check_len("INT4 group scales", groups, scales)?;
        if let Some(z) = &self.zeros {
            check_len("INT4 zero points", groups, z.len())?;
        }
        Ok(())
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

    /// Dequantize row `r` into `out` (`cols` values) on the given ISA.
    pub fn dequantize_row_isa(&self, isa: Isa, r: usize, out: &mut [f32]) -> Result<()> {
        self.check_row(r, out)?;
        let g = self.group_size.get();
        let row = &self.packed[r * self.row_bytes()..(r + 1) * self.row_bytes()];
        for (gi, chunk) in out.chunks_mut(g).enumerate() {
            let p = self.group_params(r, gi);
            let start = gi * g / 2;
            decode_group(isa, &row[start..start + chunk.len().div_ceil(2)], p.scale, p.zero as f32, chunk);
        }
        Ok(())
    }

    /// Dequantize row `r` into `out` on the widest ISA available.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        self.dequantize_row_isa(Isa::detect(), r, out)
    }

    /// Dequantize row `r` (reference: one nibble at a time through [`GroupParams::dequantize`]).
    pub fn dequantize_row_ref(&self, r: usize, out: &mut [f32]) -> Result<()> {
        self.check_row(r, out)?;
        let row = &self.packed[r * self.row_bytes()..(r + 1) * self.row_bytes()];
        for (c, o) in out.iter_mut().enumerate() {
            let nibble = (row[c / 2] >> (4 * (c % 2))) & 0xF;
            *o = self.group_params(r, c / self.group_size.get()).dequantize(nibble);
        }
        Ok(())
    }
}

/// Round the raw group scales to their storage format; returns the stored scales and the effective
/// f32 scales that the values must be quantized with (so storage rounding is part of the error, not a bias).
pub(crate) fn store_scales(raw: &[f32], storage: ScaleStorage) -> Result<(Int4Scales, Vec<f32>)> {
    match storage {
        ScaleStorage::F32 => Ok((Int4Scales::F32(raw.to_vec()), raw.to_vec())),
        ScaleStorage::F16 => {
            let v: Vec<f16> = raw.iter().map(|&s| f16::from_f32(s)).collect();
            if let Some(i) = v.iter().position(|s| s.is_infinite()) {
                return Err(QuantError::InvalidParameter {
                    name: "scales",
                    reason: format!("group scale {} at index {i} overflows f16", raw[i]),
                });
            }
            let eff = v.iter().map(|s| s.to_f32()).collect();
            Ok((Int4Scales::F16(v), eff))
        }
        ScaleStorage::DoubleQuant => {
            let max = raw.iter().fold(0f32, |m, &s| m.max(s));
            let tensor_scale = if max > 0.0 { max / 255.0 } else { 1.0 };
            let codes: Vec<u8> = raw
                .iter()
                .map(|&s| if s > 0.0 { (s / tensor_scale).round_ties_even().clamp(1.0, 255.0) as u8 } else { 0 })
                .collect();
            let eff = codes.iter().map(|&c| c as f32 * tensor_scale).collect();
            Ok((Int4Scales::DoubleQuant { codes, tensor_scale }, eff))
        }
    }
}

/// Quantize `w` with caller-chosen raw group parameters (`params[r * groups_per_row + g]`): the shared
/// back end of RTN, AWQ clipping and GPTQ. Scales are rounded to `config.scales` first; asymmetric zero
/// points are refitted to the rounded scale.
pub(crate) fn quantize_with_params(
    isa: Isa,
    w: &MatrixRef<'_>,
    config: &Int4Config,
    params: &[GroupParams],
) -> Result<Int4Matrix> {
    let (rows, cols, g) = (w.rows(), w.cols(), config.group_size.get());
    let gpr = cols.div_ceil(g);
    let raw: Vec<f32> = params.iter().map(|p| p.scale).collect();
    let (scales, eff) = store_scales(&raw, config.scales)?;
    let row_bytes = cols.div_ceil(2);
    let mut packed = vec![0u8; rows * row_bytes];
    let mut zeros = if config.symmetric { None } else { Some(vec![0u8; rows * gpr]) };
    for r in 0..rows {
        let row = w.row(r);
        let dst = &mut packed[r * row_bytes..(r + 1) * row_bytes];
        for (gi, chunk) in row.chunks(g).enumerate() {
            let i = r * gpr + gi;
            let scale = eff[i];
            let zero = match zeros.as_mut() {
                None => 8u8,
                Some(z) => {
                    // Keep the fitted real-valued offset (-min) and re-express it in the stored scale.
                    let offset = params[i].zero as f32 * params[i].scale;
                    z[i] = if scale > 0.0 { (offset / scale).round_ties_even().clamp(0.0, 15.0) as u8 } else { 0 };
                    z[i]
                }
            };
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let start = gi * g / 2;
            encode_group(isa, chunk, inv, zero as i32, &mut dst[start..start + chunk.len().div_ceil(2)]);
        }
    }
    Ok(Int4Matrix { rows, cols, group_size: config.group_size, packed, scales, zeros })
}

/// Round-to-nearest INT4 on the given ISA.
pub fn quantize_int4_isa(isa: Isa, w: &MatrixRef<'_>, config: &Int4Config) -> Result<Int4Matrix> {
    let g = config.group_size.get();
    let gpr = w.cols().div_ceil(g);
    let mut params = vec![GroupParams { scale: 0.0, zero: 8 }; w.rows() * gpr];
    for (r, p) in params.chunks_mut(gpr).enumerate() {
        fit_row(isa, w.row(r), g, config.symmetric, p);
    }
    quantize_with_params(isa, w, config, &params)
}

/// Round-to-nearest INT4 (RTN) on the widest ISA available.
pub fn quantize_int4(w: &MatrixRef<'_>, config: &Int4Config) -> Result<Int4Matrix> {
    quantize_int4_isa(Isa::detect(), w, config)
}

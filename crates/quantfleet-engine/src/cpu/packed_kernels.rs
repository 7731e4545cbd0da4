//! Matrix products over tier weights quantized at load ([`PackedMatrix`]: BF16, FP8 E4M3, INT8, INT4).
//!
//! Decode (one token) reads each row once in its packed form. The kernels are fixed 16-lane loops written so
//! that LLVM vectorizes them, compiled once per instruction set through `#[target_feature]` wrappers
//! (AVX-512, AVX2+FMA, portable) and selected at run time like the GGUF kernels of `matmul.rs`:
//! * BF16: widen u16 to f32 by a 16-bit shift.
//! * FP8 E4M3: decoded arithmetically (no table): normal codes become f32 bits `(code & 0x7f) << 20` plus the
//!   exponent re-bias 120 << 23; the 8 subnormal magnitudes are `m * 2^-9`, chosen with a select.
//! * INT8: sign-extend and convert.
//! * INT4: the input is de-interleaved once per product (even elements then odd elements of every 32), so
//!   the low nibbles of 16 bytes meet 16 contiguous activations and the high nibbles the next 16; the zero
//!   point is applied once per group through the group's activation sum: s * (sum n x - z * sum x).
//!
//! With AVX-512 and with AVX2, hand-written kernels (`x86.rs`) replace these loops, which LLVM vectorizes
//! poorly (on an AVX2 machine INT8 decode ran at 4.7 GB/s, INT4 at 2.1). AVX-512 dequantizes INT4 through a
//! 16-entry table per group ((n - z) * s for every nibble n, looked up by a permute), so no zero-point term
//! is needed; AVX2's eight-lane permutes cannot, so its one-token INT4 kernel factors the zero point out as
//! the portable one does.
//!
//! INT8 activations (W8A8/W4A8 tiers, [`ActivationQuant::Int8`]): `prepare` quantizes the input per block of
//! 32 (for INT4 put in pair order, `i4_q8_offsets`) and the kernels take exact integer dot products per
//! block (`x86::dot_i8_q8_multi_avx2` / `dot_i4_q8_avx2`, with AVX-512 VNNI their `_vnni` forms; the portable
//! `dot_i8_q8` / `dot_i4_q8` beside them), scaled by the block's activation scale. Several tokens (a batch
//! step, a prefill) run over each task's rows, up to 4 tokens per weight load, with per-token arithmetic
//! identical to one token's: batch-invariant by construction (see `matmul_q8`).
//!
//! On the x86 levels the CPU backend stores such INT4 matrices as groups of eight interleaved rows
//! (`PackedLayout::Int4Rows8`, built at load), as llama.cpp repacks Q4_0 for its AVX2 GEMV: the kernel
//! (`x86::dot_i4x8_q8_*`, activation codes then in column order) gives eight rows' results in the lanes of
//! one vector, so each block costs one scale multiply for eight rows and no row pays a horizontal sum. On
//! SmolLM2's shapes it ran the products 2.2-2.8x faster than the row kernels (`tier_bench --kernels`).
//!
//! BF16 activations (weight-only tiers, [`ActivationQuant::Bf16`]): `prepare` rounds the input to bf16 on
//! every level. With AVX-512 BF16 (`x86_bf16`, [`bf16_dot`]) every format is interleaved by sixteen rows at
//! load (`PackedLayout::Bf16Rows16` / `Byte8Rows16` / `Int4Rows16`): BF16 weights are multiplied as stored,
//! INT8, FP8 and INT4 weights become bf16 in registers, all by `vdpbf16ps`; any number of tokens runs
//! through them, 8 per pass over each task's rows. On SmolLM2's shapes, against the f32 kernels (`tier_bench
//! --kernels`): INT4 about 3x faster; BF16 2x at one token and 3x at eight; FP8 1.2-1.5x at one token and
//! 1.5-3.7x at eight; INT8 1.7-4.7x at eight, and at one token 0.86-1.18x on the layer matrices (its
//! conversion through f32 costs about what the f32 product does) and 1.1x on the 49152-row lm_head.
//!
//! At the AVX2 level, which has no bf16 dot product, INT4 matrices with bf16 activations are interleaved by
//! eight rows as for W4A8 and take the rounded input as 16-bit fixed point per block of 32 ([`fixed16`]:
//! exact for every value within 7 octaves of its block's largest) through the same integer kernels
//! (`x86::dot_i4x8_fixed16_avx2`, two byte products per weight), for every token count; widening each nibble
//! to f32 had made them the slowest AVX2 products per byte. Elsewhere the f32 kernels below multiply the
//! rounded input.
//!
//! A few tokens (2-16, a decode step of a batch) with AVX-512 or AVX2: every weight is decoded once in
//! registers and multiplied into up to 8 tokens' accumulators. Prefill (more tokens) dequantizes tiles of
//! rows to f32 and uses the shared GEMM kernels.
//! `PackedMatrix::dot_reference` / `dequantize_row_reference` are the scalar references the tests use.

use half::f16;
#[cfg(target_arch = "x86_64")]
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::gemm::OutPtr;
use super::matmul::{ROWS_PER_TASK, SimdLevel, by_token_count, gemm_dequantized, par_row_chunks};
#[cfg(target_arch = "x86_64")]
use super::x86;
#[cfg(target_arch = "x86_64")]
use super::x86_bf16::{self, PAIRS_BF16, PAIRS_FP8, PAIRS_INT8, pairs16_rows};
use crate::packed::{
    ACT_BLOCK, ActivationQuant, PackedFormat, PackedLayout, PackedMatrix, quantize_activation_block, round_to_bf16,
};

/// The activation vector prepared for one matrix: divided by the AWQ/SmoothQuant input scales, and for INT4
/// de-interleaved per 32 elements with per-group sums; or, with INT8 activations, quantized.
pub(crate) struct Prepared {
    x: Vec<f32>,
    gsum: Vec<f32>,
    /// INT4 only: whether `x` is de-interleaved (needs `cols % 32 == 0`); otherwise the generic path runs.
    interleaved_fast: bool,
    /// The input in integer form (`x` and `gsum` are then empty): INT8 activations, or a bf16 input as 16-bit
    /// fixed point for the interleaved INT4 kernels ([`fixed16`]).
    ints: Option<IntInput>,
    /// The bf16 input (bits) of the AVX-512 BF16 kernels ([`bf16_dot`]; `x` is then empty, `gsum` holds
    /// INT4's group sums).
    xb: Vec<u16>,
}

/// Whether `m`'s products run on the AVX-512 BF16 kernels at `level` (`x86_bf16`): weights interleaved for
/// them (`PackedLayout::Bf16Rows16` / `Byte8Rows16` / `Int4Rows16`, which the CPU backend builds at load
/// where this CPU has AVX-512 BF16), with bf16 activations. Other matrices with bf16 activations multiply the
/// rounded input in f32.
fn bf16_dot(level: SimdLevel, m: &PackedMatrix) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // The sixteen-row layouts hold cols % 32 == 0 (`PackedMatrix::validate`).
        level == SimdLevel::Avx512
            && m.activations == ActivationQuant::Bf16
            && matches!(
                (m.format, m.layout),
                (PackedFormat::Bf16, PackedLayout::Bf16Rows16)
                    | (PackedFormat::Int4 { .. }, PackedLayout::Int4Rows16)
                    | (PackedFormat::Int8 | PackedFormat::Fp8E4m3 { .. }, PackedLayout::Byte8Rows16)
            )
            && x86_bf16::has_avx512bf16()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (level, m);
        false
    }
}

/// `xs` (rounded to bf16 already, so each value's low 16 bits are zero) as the bf16 bits the `x86_bf16`
/// kernels read, with INT4's group sums.
#[cfg(target_arch = "x86_64")]
fn bf16_input(m: &PackedMatrix, xs: &[f32]) -> (Vec<u16>, Vec<f32>) {
    let bits: Vec<u16> = xs.iter().map(|&v| (v.to_bits() >> 16) as u16).collect();
    let gsum = match m.format {
        PackedFormat::Int4 { group, .. } => xs.chunks(group).map(|g| g.iter().sum()).collect(),
        _ => Vec::new(),
    };
    (bits, gsum)
}

/// The BF16, INT8 or FP8 matrix `m` in a column-pair layout for the `x86_bf16` kernels.
#[cfg(target_arch = "x86_64")]
fn pair_rows16(m: &PackedMatrix) -> x86_bf16::PairRows16<'_> {
    let scales = (m.format != PackedFormat::Bf16).then_some(&m.f32_scales[..]);
    // A scale group wider than the row is the row (one scale per row).
    let span = m.scale_span().min(m.cols);
    x86_bf16::PairRows16 { bytes: &m.data, scales, span, rows: m.rows, cols: m.cols }
}

/// The interleaved INT4 matrix `m` for the `x86_bf16` kernels.
#[cfg(target_arch = "x86_64")]
fn i4_rows16(m: &PackedMatrix) -> x86_bf16::I4Rows16<'_> {
    let PackedFormat::Int4 { group, symmetric } = m.format else { unreachable!("INT4 only") };
    x86_bf16::I4Rows16 {
        bytes: &m.data,
        scales: &m.group_scales,
        zeros: (!symmetric).then_some(&m.zeros[..]),
        group,
        rows: m.rows,
        cols: m.cols,
    }
}

/// An input in integer form, per block of 32 a scale `d_b` times integers `x_b`: quantized for
/// [`ActivationQuant::Int8`] (`x_b = q_b`, `lo` empty), or a bf16 input held as 16-bit fixed point for the
/// interleaved INT4 kernels (`x_b = 256 q_b + lo_b`, see [`fixed16`]).
struct IntInput {
    /// Codes (the high bytes of fixed point), in the order of the weights' bytes: for row-layout INT4 in pair
    /// order (see [`i4_q8_offsets`]), for interleaved INT4 (`PackedLayout::Int4Rows8`) and INT8 in column
    /// order.
    q: Vec<i8>,
    /// Fixed point only: the low bytes, in column order. Empty for INT8 activations.
    lo: Vec<u8>,
    /// One scale per block of 32.
    d: Vec<f32>,
    /// INT4: per weight group, sum over its blocks of d_b * sum(x_b) (the zero-point term). Empty otherwise.
    gzero: Vec<f32>,
    /// Symmetric INT4: 8 * sum(x_b) of every block as i32 lanes for the x86 kernels (`x86::I4Act`): eight
    /// lanes per pair of blocks, the first block's in lane 0 and the second's in lane 4. Empty otherwise.
    corr: Vec<i32>,
}

/// Where INT4 block `b` of `n` finds its activation codes in a [`IntInput`]: the offsets of its 16 even
/// elements (the weights' low nibbles) and of its 16 odd elements (high nibbles). Blocks go in pairs, each
/// pair's 64 codes being the evens of both blocks then the odds of both, so that one 32-byte load of the
/// pair's weights meets 32 contiguous codes per nibble half (`x86::i4_q8_body`); an unpaired last block
/// keeps its evens then its odds.
#[inline(always)]
fn i4_q8_offsets(b: usize, n: usize) -> (usize, usize) {
    if b + 1 - b % 2 < n {
        let base = 64 * (b / 2) + 16 * (b % 2);
        (base, base + 32)
    } else {
        (32 * b, 32 * b + 16)
    }
}

fn prepare_q8(m: &PackedMatrix, xs: &[f32]) -> IntInput {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { prepare_q8_avx2(m, xs) };
    }
    prepare_q8_body(m, xs)
}

/// [`prepare_q8`] compiled for AVX2 (the same operations, so the same codes and scales; baseline x86-64
/// vectorizes the block quantization four lanes wide at best, and prepare was a tenth of a prefill profile).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn prepare_q8_avx2(m: &PackedMatrix, xs: &[f32]) -> IntInput {
    prepare_q8_body(m, xs)
}

#[inline(always)]
fn prepare_q8_body(m: &PackedMatrix, xs: &[f32]) -> IntInput {
    let n = xs.len() / ACT_BLOCK;
    let mut q = vec![0i8; xs.len()];
    let mut d = vec![0.0f32; n];
    let PackedFormat::Int4 { group, symmetric } = m.format else {
        for ((qb, xb), db) in q.chunks_exact_mut(ACT_BLOCK).zip(xs.chunks_exact(ACT_BLOCK)).zip(d.iter_mut()) {
            *db = quantize_activation_block(xb, qb);
        }
        return IntInput { q, lo: Vec::new(), d, gzero: Vec::new(), corr: Vec::new() };
    };
    // INT4: each block quantized aside, its codes placed in pair order and its zero-point term d * sum(q)
    // added to its group's (symmetric: 8 * sum(q) also kept as an integer correction).
    let mut gzero = vec![0.0f32; n.div_ceil(group / ACT_BLOCK)];
    let mut corr = if symmetric { vec![0i32; 8 * n.div_ceil(2)] } else { Vec::new() };
    let mut block = [0i8; ACT_BLOCK];
    for (b, xb) in xs.chunks_exact(ACT_BLOCK).enumerate() {
        d[b] = quantize_activation_block(xb, &mut block);
        let sum = block.iter().map(|&c| c as i32).sum::<i32>();
        gzero[b / (group / ACT_BLOCK)] += d[b] * sum as f32;
        if symmetric {
            corr[8 * (b / 2) + 4 * (b % 2)] = 8 * sum;
        }
        if m.layout == PackedLayout::Int4Rows8 {
            // The interleaved rows' kernel reads the codes in column order.
            q[32 * b..32 * b + 32].copy_from_slice(&block);
            continue;
        }
        let (even, odd) = i4_q8_offsets(b, n);
        for j in 0..16 {
            q[even + j] = block[2 * j];
            q[odd + j] = block[2 * j + 1];
        }
    }
    IntInput { q, lo: Vec::new(), d, gzero, corr }
}

/// Whether `m`'s products at `level` take its bf16 input as 16-bit fixed point ([`fixed16`]): INT4 weights
/// with bf16 activations, interleaved by eight rows (`PackedLayout::Int4Rows8`, which the CPU backend builds
/// for them at the AVX2 level, where no bf16 dot product exists), on an x86 level.
fn uses_fixed16(level: SimdLevel, m: &PackedMatrix) -> bool {
    matches!(level, SimdLevel::Avx2Fma | SimdLevel::Avx512)
        && m.activations == ActivationQuant::Bf16
        && m.layout == PackedLayout::Int4Rows8
}

/// The bf16 input `xs` (already rounded: 8 significant bits) of an interleaved INT4 matrix as 16-bit fixed
/// point for [`x86::dot_i4x8_fixed16_avx2`], per block of 32: `x = d_b * (256 q + lo)` with `d_b = 2^(E - 14)`
/// for the block's largest magnitude in `[2^E, 2^(E+1))`. That largest is at most `255 * 2^(E - 7)`, 32640
/// units, so every value fits in i16; a value within 7 octaves of it (exponent >= E - 7) is a multiple of
/// `2^(E - 7)` and held exactly, a smaller one is rounded to the unit, an error of at most half a unit,
/// `2^(E - 15)`: at most `2^-15` of the block's largest and 1/256 of that largest value's own bf16 step. The
/// integer kernels then multiply 16-bit inputs exactly (two byte products per weight), which on AVX2 ran the
/// products 1.7-2.9x faster than widening the nibbles to f32 (`tier_bench --kernels`). Codes in column
/// order, as the interleaved kernels read them.
fn fixed16(m: &PackedMatrix, xs: &[f32]) -> IntInput {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { fixed16_avx2(m, xs) };
    }
    fixed16_body(m, xs)
}

/// [`fixed16`] compiled for AVX2 (the same operations, so the same integers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn fixed16_avx2(m: &PackedMatrix, xs: &[f32]) -> IntInput {
    fixed16_body(m, xs)
}

#[inline(always)]
fn fixed16_body(m: &PackedMatrix, xs: &[f32]) -> IntInput {
    let PackedFormat::Int4 { group, symmetric } = m.format else { unreachable!("fixed point is for INT4 only") };
    let n = xs.len() / ACT_BLOCK;
    let (mut q, mut lo) = (vec![0i8; xs.len()], vec![0u8; xs.len()]);
    let mut d = vec![0.0f32; n];
    let mut gzero = vec![0.0f32; n.div_ceil(group / ACT_BLOCK)];
    let mut corr = if symmetric { vec![0i32; 8 * n.div_ceil(2)] } else { Vec::new() };
    for (b, xb) in xs.chunks_exact(ACT_BLOCK).enumerate() {
        let (q, lo) = (&mut q[32 * b..32 * b + 32], &mut lo[32 * b..32 * b + 32]);
        let mut sum = 0i32;
        if xb.iter().all(|v| v.is_finite()) {
            let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            // E from the bits; a subnormal's field is 0, so E = -127 bounds it from above and its values,
            // all below 2^-126, still fit. The unit and its inverse are exact powers of two in f64, whose
            // range holds 2^(14 - E) for every f32 (and an all-zero block takes any unit).
            let e = ((amax.to_bits() >> 23) & 0xff) as i32 - 127;
            let inv = 2f64.powi(14 - e);
            for ((&v, qj), lj) in xb.iter().zip(q.iter_mut()).zip(lo.iter_mut()) {
                let x16 = (f64::from(v) * inv).round_ties_even() as i32;
                sum += x16;
                (*qj, *lj) = ((x16 >> 8) as i8, (x16 & 0xff) as u8);
            }
            d[b] = 2f64.powi(e - 14) as f32;
        } else {
            // A NaN or infinite input: the block's scale is NaN, so every output it touches is NaN, as the
            // f32 kernels would give, instead of a finite wrong value.
            d[b] = f32::NAN;
        }
        gzero[b / (group / ACT_BLOCK)] += d[b] * sum as f32;
        if symmetric {
            corr[8 * (b / 2) + 4 * (b % 2)] = 8 * sum;
        }
    }
    IntInput { q, lo, d, gzero, corr }
}

/// `x` prepared for `m`'s kernels at `level`.
pub(crate) fn prepare(level: SimdLevel, m: &PackedMatrix, x: &[f32]) -> Prepared {
    let mut xs: Vec<f32> = match &m.input_scales {
        Some(s) => x.iter().zip(s).map(|(a, b)| a / b).collect(),
        None => x.to_vec(),
    };
    match m.activations {
        ActivationQuant::F32 => {}
        ActivationQuant::Bf16 => round_to_bf16(&mut xs),
        ActivationQuant::Int8 => {
            // `validate` guarantees INT8/INT4 weights and cols % 32 == 0.
            let q8 = prepare_q8(m, &xs);
            return Prepared {
                x: Vec::new(),
                gsum: Vec::new(),
                interleaved_fast: false,
                ints: Some(q8),
                xb: Vec::new(),
            };
        }
    }
    if uses_fixed16(level, m) {
        // `validate` guarantees INT4 weights and cols % 32 == 0 for the interleaved layout.
        let ints = Some(fixed16(m, &xs));
        return Prepared { x: Vec::new(), gsum: Vec::new(), interleaved_fast: false, ints, xb: Vec::new() };
    }
    #[cfg(target_arch = "x86_64")]
    if bf16_dot(level, m) {
        let (xb, gsum) = bf16_input(m, &xs);
        return Prepared { x: Vec::new(), gsum, interleaved_fast: false, ints: None, xb };
    }
    let mut gsum = Vec::new();
    let mut interleaved_fast = false;
    if let PackedFormat::Int4 { group, .. } = m.format
        && m.cols.is_multiple_of(32)
        && m.layout == PackedLayout::Rows
    {
        gsum = xs.chunks(group).map(|g| g.iter().sum()).collect();
        let mut d = vec![0.0f32; xs.len()];
        for (dc, xc) in d.chunks_exact_mut(32).zip(xs.chunks_exact(32)) {
            for j in 0..16 {
                dc[j] = xc[2 * j];
                dc[16 + j] = xc[2 * j + 1];
            }
        }
        xs = d;
        interleaved_fast = true;
    }
    Prepared { x: xs, gsum, interleaved_fast, ints: None, xb: Vec::new() }
}

/// INT8 row · INT8 activations, before the row scale: an exact i32 sum per block times the block's scale.
#[inline(always)]
fn dot_i8_q8(row: &[u8], q: &[i8], d: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for ((w, qb), &db) in row.chunks_exact(32).zip(q.chunks_exact(32)).zip(d) {
        let mut s = 0i32;
        for j in 0..32 {
            s += (w[j] as i8 as i32) * qb[j] as i32;
        }
        acc += db * s as f32;
    }
    acc
}

/// INT4 row · INT8 activations in pair order (see [`i4_q8_offsets`]).
#[inline(always)]
fn dot_i4_q8(
    row: &[u8],
    q8: &IntInput,
    scales: &[f16],
    zeros: Option<&[u8]>,
    group: usize,
    to_f32: &impl Fn(f16) -> f32,
) -> f32 {
    let (mut acc, mut zero_part) = (0.0f32, 0.0f32);
    let n = row.len() / 16;
    let per_group = group / 32;
    for (g, (gb, gd)) in row.chunks(group / 2).zip(q8.d.chunks(per_group)).enumerate() {
        let s = to_f32(scales[g]);
        let mut sum = 0.0f32;
        for (i, (w, &db)) in gb.chunks_exact(16).zip(gd).enumerate() {
            let (even, odd) = i4_q8_offsets(g * per_group + i, n);
            let (qe, qo) = (&q8.q[even..even + 16], &q8.q[odd..odd + 16]);
            let mut si = 0i32;
            for j in 0..16 {
                si += (w[j] & 0x0f) as i32 * qe[j] as i32 + (w[j] >> 4) as i32 * qo[j] as i32;
            }
            sum += db * si as f32;
        }
        acc += s * sum;
        zero_part += s * zeros.map_or(8.0, |z| z[g] as f32) * q8.gzero[g];
    }
    acc - zero_part
}

#[inline(always)]
fn hsum16(v: [f32; 16]) -> f32 {
    let mut w = v;
    let mut n = 16;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            w[i] += w[i + n];
        }
    }
    w[0]
}

/// FP8 E4M3 code to f32 without a table (see the module docs). The NaN codes are refused at load.
#[inline(always)]
pub(crate) fn e4m3_to_f32(c: u8) -> f32 {
    let c = c as u32;
    let mag = c & 0x7f;
    let normal = f32::from_bits((mag << 20) + (120 << 23));
    let sub = (c & 7) as f32 * (1.0 / 512.0);
    let v = if mag < 8 { sub } else { normal };
    f32::from_bits(v.to_bits() | ((c & 0x80) << 24))
}

#[inline(always)]
fn bf16_to_f32(lo: u8, hi: u8) -> f32 {
    f32::from_bits((u16::from_le_bytes([lo, hi]) as u32) << 16)
}

#[inline(always)]
fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut rc = row.chunks_exact(32);
    let mut xc = x.chunks_exact(16);
    for (r, xs) in (&mut rc).zip(&mut xc) {
        let r: &[u8; 32] = r.try_into().unwrap();
        let xs: &[f32; 16] = xs.try_into().unwrap();
        for j in 0..16 {
            acc[j] += bf16_to_f32(r[2 * j], r[2 * j + 1]) * xs[j];
        }
    }
    let tail: f32 = rc.remainder().chunks_exact(2).zip(xc.remainder()).map(|(c, &v)| bf16_to_f32(c[0], c[1]) * v).sum();
    hsum16(acc) + tail
}

#[inline(always)]
fn dot_bytes(row: &[u8], x: &[f32], decode: impl Fn(u8) -> f32) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut rc = row.chunks_exact(16);
    let mut xc = x.chunks_exact(16);
    for (r, xs) in (&mut rc).zip(&mut xc) {
        let r: &[u8; 16] = r.try_into().unwrap();
        let xs: &[f32; 16] = xs.try_into().unwrap();
        for j in 0..16 {
            acc[j] += decode(r[j]) * xs[j];
        }
    }
    let tail: f32 = rc.remainder().iter().zip(xc.remainder()).map(|(&c, &v)| decode(c) * v).sum();
    hsum16(acc) + tail
}

/// `Σ_g dot(row_g, x_g) * scale(r, g)` over the scale groups of row `r` of an FP8 or INT8 matrix in the row
/// layout: one group per row gives `dot(row, x) * scale(r)`.
#[inline(always)]
fn scaled_groups(m: &PackedMatrix, r: usize, row: &[u8], x: &[f32], dot: impl Fn(&[u8], &[f32]) -> f32) -> f32 {
    let (gpr, span) = (m.scale_groups_per_row(), m.scale_span());
    let scales = &m.f32_scales[r * gpr..(r + 1) * gpr];
    row.chunks(span).zip(x.chunks(span)).zip(scales).map(|((w, x), s)| dot(w, x) * s).sum()
}

/// INT4 row · de-interleaved x (`cols % 32 == 0`).
#[inline(always)]
fn dot_int4(
    row: &[u8],
    xd: &[f32],
    gsum: &[f32],
    scales: &[f16],
    zeros: Option<&[u8]>,
    group: usize,
    to_f32: &impl Fn(f16) -> f32,
) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut zero_part = 0.0f32;
    for (g, (gb, gx)) in row.chunks(group / 2).zip(xd.chunks(group)).enumerate() {
        let mut s = [0.0f32; 16];
        for (b, xc) in gb.chunks_exact(16).zip(gx.chunks_exact(32)) {
            let b: &[u8; 16] = b.try_into().unwrap();
            let xc: &[f32; 32] = xc.try_into().unwrap();
            for j in 0..16 {
                s[j] += (b[j] & 0x0f) as f32 * xc[j] + (b[j] >> 4) as f32 * xc[16 + j];
            }
        }
        let scale = to_f32(scales[g]);
        for j in 0..16 {
            acc[j] += scale * s[j];
        }
        let z = zeros.map_or(8.0, |z| z[g] as f32);
        zero_part += scale * z * gsum[g];
    }
    hsum16(acc) - zero_part
}

/// Rows `r0 .. r0 + out.len()` of `m` times the prepared input.
#[inline(always)]
fn rows_body(m: &PackedMatrix, p: &Prepared, r0: usize, out: &mut [f32], to_f32: impl Fn(f16) -> f32) {
    if m.layout != PackedLayout::Rows && p.ints.is_none() {
        // Interleaved for the kernels of another level but run where they are not (a test's other levels).
        return rows_reference(m, &p.x, r0, out);
    }
    let gpr = m.groups_per_row();
    for (i, o) in out.iter_mut().enumerate() {
        let r = r0 + i;
        let row = m.row_data(r);
        if let Some(q8) = &p.ints {
            *o = match m.format {
                PackedFormat::Int4 { symmetric, group } => {
                    let zeros = (!symmetric).then(|| &m.zeros[r * gpr..(r + 1) * gpr]);
                    dot_i4_q8(row, q8, &m.group_scales[r * gpr..(r + 1) * gpr], zeros, group, &to_f32)
                }
                // Only INT8 and INT4 matrices take INT8 activations (`PackedMatrix::validate`).
                _ => dot_i8_q8(row, &q8.q, &q8.d) * m.f32_scales[r],
            };
            continue;
        }
        *o = match m.format {
            PackedFormat::Bf16 => dot_bf16(row, &p.x),
            PackedFormat::Fp8E4m3 { .. } => scaled_groups(m, r, row, &p.x, |w, x| dot_bytes(w, x, e4m3_to_f32)),
            PackedFormat::Int8 => dot_bytes(row, &p.x, |c| (c as i8) as f32) * m.f32_scales[r],
            PackedFormat::Int4 { group, symmetric } if p.interleaved_fast => {
                let zeros = (!symmetric).then(|| &m.zeros[r * gpr..(r + 1) * gpr]);
                dot_int4(row, &p.x, &p.gsum, &m.group_scales[r * gpr..(r + 1) * gpr], zeros, group, &to_f32)
            }
            PackedFormat::Int4 { .. } => {
                rows_reference(m, &p.x, r, std::slice::from_mut(o));
                continue;
            }
        };
    }
}

/// Rows `r0 .. r0 + out.len()` of `m` (any layout) times the prepared f32 input `x`, through the reference
/// dequantization: for shapes and layouts no kernel takes.
fn rows_reference(m: &PackedMatrix, x: &[f32], r0: usize, out: &mut [f32]) {
    let mut w = vec![0.0f32; m.cols];
    for (i, o) in out.iter_mut().enumerate() {
        // Cannot fail: r0 + i < rows and w has cols values.
        let _ = m.dequantize_row_reference(r0 + i, &mut w);
        *o = w.iter().zip(x).map(|(a, b)| a * b).sum();
    }
}

/// The packed kind of `m` for the hand-written x86 kernels.
#[cfg(target_arch = "x86_64")]
fn x86_kind(m: &PackedMatrix) -> x86::PackedKind<'_> {
    match m.format {
        PackedFormat::Bf16 => x86::PackedKind::Bf16,
        PackedFormat::Fp8E4m3 { .. } => x86::PackedKind::Fp8 { scales: &m.f32_scales, span: m.scale_span() },
        PackedFormat::Int8 => x86::PackedKind::Int8(&m.f32_scales),
        PackedFormat::Int4 { group, symmetric } => {
            x86::PackedKind::Int4 { scales: &m.group_scales, zeros: (!symmetric).then_some(&m.zeros[..]), group }
        }
    }
}

/// The one-token kernels of one x86 instruction set for [`rows_x86`], `lanes` wide: `dot_packed`
/// (BF16/FP8/INT8 row · x, before the row scale), `dot_fp8_groups` (an FP8 row with scale groups: row, x,
/// the row's scales, span) and `dot_int4` (an INT4 row with its scales and zero points, and the group size).
#[cfg(target_arch = "x86_64")]
struct X86Kernels<P, G, I> {
    lanes: usize,
    dot_packed: P,
    dot_fp8_groups: G,
    dot_int4: I,
}

/// The x86 rows of weight-only tiers through the hand-written one-token kernels of one instruction set, the
/// portable body for shapes they do not take.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn rows_x86<P, G, I>(m: &PackedMatrix, p: &Prepared, r0: usize, out: &mut [f32], kernels: X86Kernels<P, G, I>)
where
    P: Fn(x86::PackedKind<'_>, &[u8], &[f32]) -> f32,
    G: Fn(&[u8], &[f32], &[f32], usize) -> f32,
    I: Fn(&[u8], &[f16], Option<&[u8]>, usize) -> f32,
{
    let X86Kernels { lanes, dot_packed, dot_fp8_groups, dot_int4 } = kernels;
    let int4 = matches!(m.format, PackedFormat::Int4 { .. });
    if (int4 && !p.interleaved_fast) || !m.cols.is_multiple_of(lanes) || m.layout != PackedLayout::Rows {
        return rows_body(m, p, r0, out, |h| x86::f16_bits_to_f32(h.to_bits()));
    }
    let kind = x86_kind(m);
    let gpr = m.groups_per_row();
    for (i, o) in out.iter_mut().enumerate() {
        let r = r0 + i;
        let row = m.row_data(r);
        *o = match kind {
            x86::PackedKind::Int4 { scales, zeros, group } => {
                dot_int4(row, &scales[r * gpr..(r + 1) * gpr], zeros.map(|z| &z[r * gpr..(r + 1) * gpr]), group)
            }
            x86::PackedKind::Bf16 => dot_packed(kind, row, &p.x),
            x86::PackedKind::Fp8 { scales, span } if span < m.cols => {
                let gpr = m.scale_groups_per_row();
                dot_fp8_groups(row, &p.x, &scales[r * gpr..(r + 1) * gpr], span)
            }
            x86::PackedKind::Fp8 { scales: s, .. } | x86::PackedKind::Int8(s) => dot_packed(kind, row, &p.x) * s[r],
        };
    }
}

/// AVX-512 rows: the hand-written kernels of `x86.rs` (LLVM vectorizes the portable loops poorly: the INT8
/// and FP8 decodes ran at a third of the BF16 speed).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn rows_avx512(m: &PackedMatrix, p: &Prepared, r0: usize, out: &mut [f32]) {
    if let Some(q8) = &p.ints {
        return rows_q8_avx2(m, q8, r0, out, x86::has_vnni());
    }
    if !p.xb.is_empty() {
        // SAFETY: `prepare` builds `xb` only where `bf16_dot` found AVX-512 BF16.
        return unsafe { rows_bf16(m, p, r0, out) };
    }
    // Closures defined here have this function's CPU features, so they may call the kernels.
    let dot_packed = |kind: x86::PackedKind<'_>, row: &[u8], x: &[f32]| x86::dot_packed_avx512(kind, row, x);
    let dot_fp8_groups =
        |row: &[u8], x: &[f32], scales: &[f32], span: usize| x86::dot_fp8_groups_avx512(row, x, scales, span);
    let dot_int4 = |row: &[u8], scales: &[f16], zeros: Option<&[u8]>, group: usize| {
        x86::dot_int4_avx512(row, &p.x, scales, zeros, group)
    };
    rows_x86(m, p, r0, out, X86Kernels { lanes: 16, dot_packed, dot_fp8_groups, dot_int4 })
}

/// Rows of one token through the AVX-512 BF16 kernels (`p.xb` prepared, see [`bf16_dot`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
fn rows_bf16(m: &PackedMatrix, p: &Prepared, r0: usize, out: &mut [f32]) {
    // Sixteen-row groups: the task's rows are whole groups (rows % 16 == 0, ROWS_PER_TASK % 16 == 0).
    let out = OutPtr { base: out.as_mut_ptr(), stride: out.len(), row0: 0, len: out.len() };
    bf16_kernel(m, [&p.xb], [&p.gsum], (r0, out.len), out)
}

/// Rows `r0 .. r0 + nr` of `m` for `NT` tokens' bf16 inputs (and INT4's group sums) through the `x86_bf16`
/// kernel of `m`'s format ([`bf16_dot`] holds for `m`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
fn bf16_kernel<const NT: usize>(
    m: &PackedMatrix,
    xb: [&[u16]; NT],
    gsum: [&[f32]; NT],
    rows: (usize, usize),
    out: OutPtr,
) {
    match m.format {
        PackedFormat::Bf16 => pairs16_rows::<NT, PAIRS_BF16>(pair_rows16(m), xb, rows, out),
        PackedFormat::Int8 => pairs16_rows::<NT, PAIRS_INT8>(pair_rows16(m), xb, rows, out),
        PackedFormat::Fp8E4m3 { .. } => pairs16_rows::<NT, PAIRS_FP8>(pair_rows16(m), xb, rows, out),
        PackedFormat::Int4 { .. } => x86_bf16::i4x16_rows::<NT>(i4_rows16(m), xb, gsum, rows, out),
    }
}

/// Rows of one token whose input is in integer form ([`IntInput`]: INT8 activations or fixed point) with the
/// x86 integer kernels: AVX2's, or with `vnni` (the AVX-512 level on a CPU with AVX-512 VNNI) the `vpdpbusd`
/// forms, which give the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn rows_q8_avx2(m: &PackedMatrix, q8: &IntInput, r0: usize, out: &mut [f32], vnni: bool) {
    let out = OutPtr { base: out.as_mut_ptr(), stride: out.len(), row0: 0, len: out.len() };
    rows_q8_multi_avx2(m, &[q8], r0, out.len, out, 0, vnni);
}

/// Integer-input rows `r0 .. r0 + nr` for up to 4 tokens (`q8s`, tokens `t0..` of `out`): each weight
/// block is loaded and decoded once for all of them (`x86::dot_i8_q8_multi_avx2`, `x86::dot_i4_q8_avx2`,
/// `x86::dot_i4x8_q8_avx2`, their VNNI forms with `vnni`, or `x86::dot_i4x8_fixed16_avx2` for fixed-point
/// inputs), with per-token arithmetic that does not depend on how many tokens share the call.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn rows_q8_multi_avx2(m: &PackedMatrix, q8s: &[&IntInput], r0: usize, nr: usize, out: OutPtr, t0: usize, vnni: bool) {
    let gpr = m.groups_per_row();
    let scale_bits: &[u16] = m.group_scales.reinterpret_cast();
    macro_rules! tokens {
        ($nt:literal) => {{
            // The tokens' INT4-kernel inputs, gathered once for all rows.
            let act: [x86::I4Act<'_>; $nt] = std::array::from_fn(|i| x86::I4Act {
                q: &q8s[i].q,
                lo: &q8s[i].lo,
                d: &q8s[i].d,
                gzero: &q8s[i].gzero,
                corr: &q8s[i].corr,
            });
            if m.layout == PackedLayout::Int4Rows8 {
                let PackedFormat::Int4 { symmetric, group } = m.format else { unreachable!("validated layout") };
                assert!(r0 % 8 == 0 && nr % 8 == 0, "interleaved rows in whole groups of 8");
                let (bytes, n_scales) = (4 * m.cols, 8 * gpr);
                for g in r0 / 8..(r0 + nr) / 8 {
                    let rows = x86::I4Rows8 {
                        bytes: &m.data[g * bytes..(g + 1) * bytes],
                        scales: &scale_bits[g * n_scales..(g + 1) * n_scales],
                        zeros: (!symmetric).then(|| &m.zeros[g * n_scales..(g + 1) * n_scales]),
                        group,
                    };
                    // `out` starts at row r0: these are its rows 8 g - r0 ..
                    if !q8s[0].lo.is_empty() {
                        x86::dot_i4x8_fixed16_avx2::<$nt>(rows, act, out, (t0, 8 * g - r0))
                    } else if vnni {
                        // SAFETY: `vnni` is set only on a CPU with AVX-512 VNNI and VL.
                        unsafe { x86::dot_i4x8_q8_vnni::<$nt>(rows, act, out, (t0, 8 * g - r0)) }
                    } else {
                        x86::dot_i4x8_q8_avx2::<$nt>(rows, act, out, (t0, 8 * g - r0))
                    }
                }
                return;
            }
            // The INT8 kernel's codes and scales, gathered once for all rows.
            let q: [&[i8]; $nt] = std::array::from_fn(|i| &q8s[i].q[..]);
            let d: [&[f32]; $nt] = std::array::from_fn(|i| &q8s[i].d[..]);
            for r in r0..r0 + nr {
                let row = m.row_data(r);
                let v = match m.format {
                    PackedFormat::Int4 { symmetric, group } => {
                        let zeros = (!symmetric).then(|| &m.zeros[r * gpr..(r + 1) * gpr]);
                        let row = x86::I4Row { bytes: row, scales: &scale_bits[r * gpr..(r + 1) * gpr], zeros, group };
                        if vnni {
                            // SAFETY: `vnni` is set only on a CPU with AVX-512 VNNI and VL.
                            unsafe { x86::dot_i4_q8_vnni::<$nt>(row, act) }
                        } else {
                            x86::dot_i4_q8_avx2::<$nt>(row, act)
                        }
                    }
                    // Only INT8 and INT4 matrices take INT8 activations (`PackedMatrix::validate`).
                    _ => {
                        let v = if vnni {
                            // SAFETY: as above.
                            unsafe { x86::dot_i8_q8_multi_vnni::<$nt>(row, q, d) }
                        } else {
                            x86::dot_i8_q8_multi_avx2::<$nt>(row, q, d)
                        };
                        v.map(|v| v * m.f32_scales[r])
                    }
                };
                for (i, v) in v.into_iter().enumerate() {
                    out.write(t0 + i, r - r0, v);
                }
            }
        }};
    }
    match q8s.len() {
        4 => tokens!(4),
        3 => tokens!(3),
        2 => tokens!(2),
        _ => tokens!(1),
    }
}

/// AVX2 rows: the hand-written kernels of `x86.rs`, as at the AVX-512 level.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn rows_avx2(m: &PackedMatrix, p: &Prepared, r0: usize, out: &mut [f32]) {
    if let Some(q8) = &p.ints {
        return rows_q8_avx2(m, q8, r0, out, false);
    }
    // Closures defined here have this function's CPU features, so they may call the kernels.
    let dot_packed = |kind: x86::PackedKind<'_>, row: &[u8], x: &[f32]| x86::dot_packed_avx2(kind, row, x);
    let dot_fp8_groups =
        |row: &[u8], x: &[f32], scales: &[f32], span: usize| x86::dot_fp8_groups_avx2(row, x, scales, span);
    let dot_int4 = |row: &[u8], scales: &[f16], zeros: Option<&[u8]>, group: usize| {
        x86::dot_int4_avx2(row, &p.x, &p.gsum, scales, zeros, group)
    };
    rows_x86(m, p, r0, out, X86Kernels { lanes: 8, dot_packed, dot_fp8_groups, dot_int4 })
}

fn rows_dispatch(level: SimdLevel, m: &PackedMatrix, p: &Prepared, r0: usize, out: &mut [f32]) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: non-portable levels exist only where the CPU supports them (SimdLevel::detect/is_supported).
        SimdLevel::Avx512 => unsafe { rows_avx512(m, p, r0, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdLevel::Avx2Fma => unsafe { rows_avx2(m, p, r0, out) },
        _ => rows_body(m, p, r0, out, f16::to_f32),
    }
}

/// Whether `prepare` gives `a` and `b` the same prepared input for the same `x`: everything it reads of the
/// matrix (format with group size and symmetry, activation quantization, layout, input scales) is equal.
/// Q, K and V (and gate and up) share their input, so their products prepare it once.
fn same_preparation(a: &PackedMatrix, b: &PackedMatrix) -> bool {
    (a.format, a.activations, a.layout, a.cols) == (b.format, b.activations, b.layout, b.cols)
        && a.input_scales == b.input_scales
}

/// `outs[i] = ms[i] · x` (one token) in one parallel region.
pub(crate) fn matvec_many<O: AsMut<[f32]> + Send>(level: SimdLevel, ms: &[&PackedMatrix], x: &[f32], outs: &mut [O]) {
    assert_eq!(ms.len(), outs.len(), "one output per matrix");
    // One preparation per distinct input; `which[i]` is matrix i's.
    let mut preps: Vec<Prepared> = Vec::with_capacity(ms.len());
    let mut which = Vec::with_capacity(ms.len());
    for (i, m) in ms.iter().enumerate() {
        match (0..i).find(|&j| same_preparation(ms[j], m)) {
            Some(j) => which.push(which[j]),
            None => {
                which.push(preps.len());
                preps.push(prepare(level, m, x));
            }
        }
    }
    for (m, o) in ms.iter().zip(outs.iter_mut()) {
        assert_eq!((x.len(), o.as_mut().len()), (m.cols, m.rows), "matvec shape");
    }
    let preps = &preps;
    outs.par_iter_mut().zip(ms.par_iter().zip(which.par_iter())).for_each(|(out, (m, &k))| {
        out.as_mut().par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(c, oc)| {
            rows_dispatch(level, m, &preps[k], c * ROWS_PER_TASK, oc);
        });
    });
}

/// Fast dequantization of one row (input scales not applied), for prefill tiles.
#[inline(always)]
pub(crate) fn dequantize_row_fast(m: &PackedMatrix, r: usize, out: &mut [f32]) {
    if m.layout != PackedLayout::Rows {
        // Interleaved for kernels of another level (tests): the reference reads any layout.
        let _ = m.dequantize_row_reference(r, out);
        return;
    }
    let row = m.row_data(r);
    match m.format {
        PackedFormat::Bf16 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = bf16_to_f32(c[0], c[1]);
            }
        }
        PackedFormat::Fp8E4m3 { group: None } => {
            let s = m.f32_scales[r];
            for (o, &c) in out.iter_mut().zip(row) {
                *o = e4m3_to_f32(c) * s;
            }
        }
        PackedFormat::Fp8E4m3 { group: Some(g) } => {
            // Decoded over the whole row, then scaled per group: two loops the compiler vectorizes (the
            // same values as one multiply per element: every code is exact in f32).
            for (o, &c) in out.iter_mut().zip(row) {
                *o = e4m3_to_f32(c);
            }
            let gpr = m.scale_groups_per_row();
            for (og, s) in out.chunks_mut(g).zip(&m.f32_scales[r * gpr..(r + 1) * gpr]) {
                og.iter_mut().for_each(|o| *o *= s);
            }
        }
        PackedFormat::Int8 => {
            let s = m.f32_scales[r];
            for (o, &c) in out.iter_mut().zip(row) {
                *o = (c as i8) as f32 * s;
            }
        }
        PackedFormat::Int4 { group, symmetric } => {
            // The reference's arithmetic, (nibble - zero) * scale in f32, with the group's scale and zero
            // point looked up once per group instead of once per element.
            let gpr = m.groups_per_row();
            for (g, og) in out.chunks_mut(group).enumerate() {
                let i = r * gpr + g;
                let s = m.group_scales[i].to_f32();
                let z = if symmetric { 8.0 } else { m.zeros[i] as f32 };
                let bytes = &row[g * group / 2..];
                let half = og.len() / 2;
                let mut pairs = og.chunks_exact_mut(2);
                for (pair, &b) in (&mut pairs).zip(bytes) {
                    pair[0] = ((b & 0x0f) as f32 - z) * s;
                    pair[1] = ((b >> 4) as f32 - z) * s;
                }
                if let [last] = pairs.into_remainder() {
                    *last = ((bytes[half] & 0x0f) as f32 - z) * s;
                }
            }
        }
    }
}

/// `out[t * rows + r] = m[r] · (x[t] / input_scales)` for `t < n_tokens`.
pub(crate) fn matmul(level: SimdLevel, m: &PackedMatrix, x: &[f32], n_tokens: usize, out: &mut [f32]) {
    assert_eq!(x.len(), n_tokens * m.cols, "activation shape");
    assert_eq!(out.len(), n_tokens * m.rows, "output shape");
    if int_input(level, m) {
        return matmul_q8(level, m, x, out);
    }
    #[cfg(target_arch = "x86_64")]
    if n_tokens >= 2 && bf16_dot(level, m) {
        // Any number of tokens: 8 per pass over each task's rows, which stay in cache between passes (the
        // bf16 products of 8 tokens outrun the f32 GEMM on dequantized tiles).
        return matmul_multi_bf16(m, x, n_tokens, out);
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(level, SimdLevel::Avx2Fma | SimdLevel::Avx512)
        && (2..=MULTI_MAX_TOKENS).contains(&n_tokens)
        && m.cols.is_multiple_of(32)
        && m.layout == PackedLayout::Rows
    {
        matmul_multi_x86(level, m, x, n_tokens, out);
        return;
    }
    if n_tokens < 4 || !m.cols.is_multiple_of(16) {
        for (xt, ot) in x.chunks_exact(m.cols).zip(out.chunks_exact_mut(m.rows)) {
            matvec_many(level, &[m], xt, &mut [ot]);
        }
        return;
    }
    let effective;
    let x = if m.input_scales.is_some() || m.activations != ActivationQuant::F32 {
        effective = effective_tokens(m, x);
        &effective[..]
    } else {
        x
    };
    let dequant = |r: usize, o: &mut [f32]| dequantize_row_fast(m, r, o);
    gemm_dequantized(level, m.rows, m.cols, &dequant, x, n_tokens, out);
}

/// Several tokens' inputs (weight-only: F32 or BF16 activations) as the products multiply them: divided by
/// the input scales, rounded to bf16 with bf16 activations.
fn effective_tokens(m: &PackedMatrix, x: &[f32]) -> Vec<f32> {
    let mut xs = x.to_vec();
    if let Some(s) = &m.input_scales {
        for xt in xs.chunks_exact_mut(m.cols) {
            xt.iter_mut().zip(s).for_each(|(a, b)| *a /= b);
        }
    }
    if m.activations == ActivationQuant::Bf16 {
        round_to_bf16(&mut xs);
    }
    xs
}

/// INT8-activation products of several tokens (a batch step or a prefill): each task runs the integer
/// kernels for every token over its rows, which stay in cache between tokens. Every token goes through the
/// same kernel whatever the batch, so a token's output does not depend on how many tokens share the step
/// (batch invariance): incremental decode reproduces the prefill's logits bit for bit. That matters more
/// here than for f32 inputs: where a block holds an outlier, a rounding-level difference between two kernels
/// can move a small activation across a quantization step (a full step of amax/127), and a prefill through the
/// f32 GEMM on quantize-dequantized inputs drifted from decode by ~0.5 in the logits on the real model.
///
/// The interleaved INT4 matrices of weight-only tiers at the AVX2 level take this path too, with their bf16
/// inputs as 16-bit fixed point ([`fixed16`]), and for the same reason: one kernel for every token count.
fn matmul_q8(level: SimdLevel, m: &PackedMatrix, x: &[f32], out: &mut [f32]) {
    matmul_q8_prepared(level, m, &prepare_tokens(level, m, x), out)
}

/// Whether `m`'s products at `level` take their input in integer form ([`IntInput`]): INT8 activations, or
/// [`uses_fixed16`].
fn int_input(level: SimdLevel, m: &PackedMatrix) -> bool {
    m.activations == ActivationQuant::Int8 || uses_fixed16(level, m)
}

/// Each token's input prepared for `m`: every token is quantized on its own, so in parallel.
fn prepare_tokens(level: SimdLevel, m: &PackedMatrix, x: &[f32]) -> Vec<Prepared> {
    x.par_chunks_exact(m.cols).map(|xt| prepare(level, m, xt)).collect()
}

/// Several products of the same tokens `x` (Q, K and V of a prefill): where the inputs take integer form
/// ([`int_input`]), the tokens are prepared once for every matrix that prepares them alike
/// ([`same_preparation`]); other matrices go through [`matmul`]. `outs[i]` is `[n_tokens, ms[i].rows]`.
pub(crate) fn matmul_many(level: SimdLevel, ms: &[&PackedMatrix], x: &[f32], n_tokens: usize, outs: &mut [&mut [f32]]) {
    assert_eq!(ms.len(), outs.len(), "one output per matrix");
    let mut shared: Option<(usize, Vec<Prepared>)> = None;
    for (i, (m, out)) in ms.iter().zip(outs.iter_mut()).enumerate() {
        assert_eq!((x.len(), out.len()), (n_tokens * m.cols, n_tokens * m.rows), "matmul shape");
        if !int_input(level, m) {
            matmul(level, m, x, n_tokens, out);
            continue;
        }
        if !shared.as_ref().is_some_and(|(j, _)| same_preparation(ms[*j], m)) {
            shared = Some((i, prepare_tokens(level, m, x)));
        }
        let (_, preps) = shared.as_ref().expect("prepared just above");
        matmul_q8_prepared(level, m, preps, out);
    }
}

/// [`matmul_q8`] over tokens already prepared for `m` (or for a matrix that prepares them alike).
fn matmul_q8_prepared(level: SimdLevel, m: &PackedMatrix, preps: &[Prepared], out: &mut [f32]) {
    let rows = m.rows;
    assert_eq!(out.len(), preps.len() * rows, "output shape");
    #[cfg(target_arch = "x86_64")]
    if matches!(level, SimdLevel::Avx2Fma | SimdLevel::Avx512) {
        let q8s: Vec<&IntInput> = preps.iter().map(|p| p.ints.as_ref().expect("an input in integer form")).collect();
        let vnni = level == SimdLevel::Avx512 && x86::has_vnni();
        par_row_chunks(rows, out, |r0, nr, o| {
            for (chunk, qs) in q8s.chunks(4).enumerate() {
                // SAFETY: non-portable levels exist only where the CPU supports them, and AVX-512 implies AVX2.
                unsafe { rows_q8_multi_avx2(m, qs, r0, nr, o, chunk * 4, vnni) };
            }
        });
        return;
    }
    par_row_chunks(rows, out, |r0, nr, o| {
        let mut tile = [0.0f32; ROWS_PER_TASK];
        for (t, p) in preps.iter().enumerate() {
            rows_dispatch(level, m, p, r0, &mut tile[..nr]);
            o.write_rows(t, &tile[..nr]);
        }
    });
}

/// Up to this many tokens (a decode step of a batch of sequences), the x86 paths decode each weight once
/// for all tokens in registers (`x86::rows_multi_avx512`/`rows_multi_avx2`, 8 tokens per pass) instead of
/// dequantizing tiles of rows to memory for the prefill GEMM, whose transposition and stores cost more than a
/// few tokens' FMAs.
const MULTI_MAX_TOKENS: usize = 16;

/// Several tokens through the x86 multi-token kernels of `level` (AVX2 or AVX-512).
#[cfg(target_arch = "x86_64")]
fn matmul_multi_x86(level: SimdLevel, m: &PackedMatrix, x: &[f32], n_tokens: usize, out: &mut [f32]) {
    assert!(matches!(level, SimdLevel::Avx2Fma | SimdLevel::Avx512), "x86 multi-token kernels at {level:?}");
    let cols = m.cols;
    // Per token: divided by the AWQ input scales (rounded to bf16 with bf16 activations), and for INT4
    // de-interleaved per 32 (see `prepare`).
    let mut xs = effective_tokens(m, x);
    for dt in xs.chunks_exact_mut(cols) {
        if matches!(m.format, PackedFormat::Int4 { .. }) {
            for c in dt.chunks_exact_mut(32) {
                let orig: [f32; 32] = (&*c).try_into().expect("32-element chunk");
                for j in 0..16 {
                    c[j] = orig[2 * j];
                    c[16 + j] = orig[2 * j + 1];
                }
            }
        }
    }
    let kind = x86_kind(m);
    let rows = m.rows;
    let xs = &xs;
    par_row_chunks(rows, out, |r0, nr, chunk_out| {
        let mut t0 = 0;
        while t0 < n_tokens {
            let nt = (n_tokens - t0).min(8);
            let xt = &xs[t0 * cols..(t0 + nt) * cols];
            // Rows r0.., tokens t0..: the base moves to token t0 (the checked length shrinks accordingly).
            let o =
                OutPtr { base: chunk_out.base.wrapping_add(t0 * rows), len: chunk_out.len - t0 * rows, ..chunk_out };
            macro_rules! avx512 {
                ($nt:literal) => {
                    x86::rows_multi_avx512::<$nt>(kind, &m.data, cols, r0, nr, xt, o)
                };
            }
            macro_rules! avx2 {
                ($nt:literal) => {
                    x86::rows_multi_avx2::<$nt>(kind, &m.data, cols, r0, nr, xt, o)
                };
            }
            // SAFETY: non-portable levels exist only where the CPU supports them (SimdLevel::detect/is_supported),
            // and AVX-512 implies AVX2; tasks write disjoint row ranges of `out`.
            unsafe { if level == SimdLevel::Avx512 { by_token_count!(nt, avx512) } else { by_token_count!(nt, avx2) } }
            t0 += nt;
        }
    });
}

/// Several tokens through the AVX-512 BF16 kernels (`x86_bf16::pairs16_rows` / `i4x16_rows`, 8 tokens per
/// pass); the caller checked [`bf16_dot`].
#[cfg(target_arch = "x86_64")]
fn matmul_multi_bf16(m: &PackedMatrix, x: &[f32], n_tokens: usize, out: &mut [f32]) {
    let xs = effective_tokens(m, x);
    let inputs: Vec<(Vec<u16>, Vec<f32>)> = xs.par_chunks_exact(m.cols).map(|xt| bf16_input(m, xt)).collect();
    let (rows, inputs) = (m.rows, &inputs);
    par_row_chunks(rows, out, |r0, nr, chunk_out| {
        for t0 in (0..n_tokens).step_by(8) {
            let nt = (n_tokens - t0).min(8);
            let o =
                OutPtr { base: chunk_out.base.wrapping_add(t0 * rows), len: chunk_out.len - t0 * rows, ..chunk_out };
            macro_rules! run {
                ($nt:literal) => {{
                    let xb: [&[u16]; $nt] = std::array::from_fn(|t| &inputs[t0 + t].0[..]);
                    let gsum: [&[f32]; $nt] = std::array::from_fn(|t| &inputs[t0 + t].1[..]);
                    // SAFETY: `bf16_dot` found AVX-512 BF16; tasks write disjoint row ranges of `out`.
                    unsafe { bf16_kernel::<$nt>(m, xb, gsum, (r0, nr), o) }
                }};
            }
            by_token_count!(nt, run)
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use quantfleet_quant::{Fp8Format, Fp8Scaling, Int4Config, MatrixRef, ScaleStorage, WeightFormat, quantize_rtn};

    struct Rng(u64);
    impl Rng {
        fn uniform(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    fn levels() -> Vec<SimdLevel> {
        [SimdLevel::Portable, SimdLevel::Avx2Fma, SimdLevel::Avx512].into_iter().filter(|l| l.is_supported()).collect()
    }

    /// For each token count, fresh random inputs through `matmul` on `m` at every level; `check(level,
    /// n_tokens, t, r, x_t, out)` sees every output.
    fn each_output(
        m: &PackedMatrix,
        rng: &mut Rng,
        token_counts: &[usize],
        mut check: impl FnMut(SimdLevel, usize, usize, usize, &[f32], f32),
    ) {
        let (rows, cols) = (m.rows, m.cols);
        for &n_tokens in token_counts {
            let x: Vec<f32> = (0..n_tokens * cols).map(|_| rng.uniform()).collect();
            for level in levels() {
                let mut out = vec![f32::NAN; n_tokens * rows];
                matmul(level, m, &x, n_tokens, &mut out);
                for (t, xt) in x.chunks_exact(cols).enumerate() {
                    for r in 0..rows {
                        check(level, n_tokens, t, r, xt, out[t * rows + r]);
                    }
                }
            }
        }
    }

    fn int4(group: usize, symmetric: bool) -> WeightFormat {
        let mut c = if symmetric { Int4Config::symmetric(group) } else { Int4Config::asymmetric(group) }.unwrap();
        c.scales = ScaleStorage::F16;
        WeightFormat::Int4(c)
    }

    fn fp8_groups(group: usize) -> WeightFormat {
        let group = std::num::NonZeroUsize::new(group).unwrap();
        WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling: Fp8Scaling::PerGroup(group) }
    }

    #[test]
    fn e4m3_decoder_matches_the_reference_on_every_finite_code() {
        for c in 0..=255u8 {
            if c & 0x7f == 0x7f {
                continue;
            }
            assert_eq!(e4m3_to_f32(c).to_bits(), Fp8Format::E4M3.decode(c).to_bits(), "code {c:#04x}");
        }
    }

    /// The vector FP8 decoders (one token, and the multi-token kernel) on every finite E4M3 code, subnormals
    /// included, with a row scale and with a scale per 32 codes: one-hot activations pick single weights,
    /// which must equal the reference decode times the code's scale exactly (as values: a sum of products
    /// does not keep the sign of a zero). The group-scaled matrix has two rows: the first's scales fold into
    /// the kernels' re-bias multiply (one is tiny, so its products are f32 subnormals), the second holds two
    /// that cannot (300 and 1024, at least 2^8), which sends that row through two multiplies.
    #[test]
    fn fast_fp8_kernels_decode_every_code_exactly() {
        let codes: Vec<u8> = (0..=255u8).filter(|c| c & 0x7f != 0x7f).chain([0, 0]).collect();
        let cols = codes.len();
        assert_eq!(cols, 256);
        let group_scales = [
            [0.75, 3.0e-3, 2.5, 1.0e-30, 6.1e-5, 0.5, 100.0, 1.0],
            [0.75, 3.0e-3, 300.0, 2.5, 1024.0, 6.1e-5, 0.5, 1.0],
        ];
        for (group, f32_scales) in [(None, vec![0.75]), (Some(32), group_scales.concat())] {
            let rows = f32_scales.len() / cols.div_ceil(group.unwrap_or(cols));
            let m = PackedMatrix {
                format: PackedFormat::Fp8E4m3 { group },
                rows,
                cols,
                data: codes.repeat(rows),
                f32_scales: f32_scales.clone(),
                group_scales: Vec::new(),
                zeros: Vec::new(),
                input_scales: None,
                activations: ActivationQuant::F32,
                layout: PackedLayout::Rows,
            };
            m.validate().unwrap();
            for level in levels() {
                for n_tokens in [1, 8] {
                    for j0 in (0..cols).step_by(n_tokens) {
                        let mut x = vec![0.0f32; n_tokens * cols];
                        for t in 0..n_tokens {
                            x[t * cols + j0 + t] = 1.0;
                        }
                        let mut out = vec![f32::NAN; n_tokens * rows];
                        matmul(level, &m, &x, n_tokens, &mut out);
                        for (i, got) in out.iter().enumerate() {
                            let (t, r) = (i / rows, i % rows);
                            let j = j0 + t;
                            let scale = f32_scales[r * f32_scales.len() / rows + j / group.unwrap_or(cols)];
                            let want = Fp8Format::E4M3.decode(codes[j]) * scale;
                            assert_eq!(*got, want, "code {:#04x} row {r} {group:?} {level:?} T={n_tokens}", codes[j]);
                        }
                    }
                }
            }
        }
    }

    /// Every format, every level, awkward shapes (rows not multiples of the task size or 4, columns with
    /// tails, groups shorter at the row end), 1-70 tokens, with and without AWQ input scales, against the
    /// scalar f64 reference. Bound: |fast - ref| <= 3e-6 * sum|w x / s| + 1e-6.
    #[test]
    fn packed_matmul_matches_the_scalar_reference_on_every_level() {
        let mut rng = Rng(0x00c0_ffee_1234_5678);
        let formats = [
            WeightFormat::Bf16,
            WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling: Fp8Scaling::PerRow },
            fp8_groups(32),
            fp8_groups(128),
            WeightFormat::Int8,
            int4(32, false),
            int4(64, true),
            int4(128, false),
            int4(256, true),
        ];
        for f in formats {
            for (rows, cols) in [(33, 64), (7, 96), (70, 320), (3, 48), (5, 37)] {
                let w: Vec<f32> = (0..rows * cols).map(|_| rng.uniform() * 0.2).collect();
                let q = quantize_rtn(&MatrixRef::new("w", &w, rows, cols).unwrap(), &f).unwrap();
                let mut m = PackedMatrix::from_quantized(&q).unwrap();
                for with_scales in [false, true] {
                    m.input_scales = with_scales.then(|| (0..cols).map(|_| 0.25 + rng.uniform().abs() * 4.0).collect());
                    let mut wrow = vec![0.0f32; cols];
                    each_output(&m, &mut rng, &[1, 3, 4, 9, 70], |level, n_tokens, t, r, xt, got| {
                        let want = m.dot_reference(r, xt).unwrap();
                        m.dequantize_row_reference(r, &mut wrow).unwrap();
                        let s = |j: usize| m.input_scales.as_ref().map_or(1.0, |s| s[j]);
                        let mag: f32 = wrow.iter().zip(xt).enumerate().map(|(j, (a, b))| (a * b / s(j)).abs()).sum();
                        assert!(
                            (got - want).abs() <= 3e-6 * mag + 1e-6,
                            "{} {rows}x{cols} T={n_tokens} {level:?} scales={with_scales} ({t},{r}): {got} vs {want}",
                            m.format.name()
                        );
                    });
                }
            }
        }
    }

    /// BF16 activations (weight-only tiers): every level, for one token, a batch step and a prefill, with and
    /// without input scales, against the scalar reference on the bf16-rounded input. On a CPU with AVX-512
    /// BF16 the AVX-512 level runs the `x86_bf16` kernels: BF16, INT8, FP8 (per-row and per-tensor scales) and
    /// INT4 weights (every group size) in the sixteen-row layouts (`PackedLayout::Bf16Rows16` / `Byte8Rows16`
    /// / `Int4Rows16`, also run at the other levels through the reference); the row layout takes the f32
    /// kernels on the rounded input. Bound: 2e-6 * sum|w x| plus f32 rounding of the INT4 kernels' offset sums,
    /// 2e-7 * sum 144 |s x|. Rounding the input moves outputs by ~1e-3 relative: the test also checks that it
    /// happened (a kernel fed the unrounded input fails the bound). SYNTHETIC weights.
    #[test]
    fn bf16_activation_kernels_match_the_reference_on_every_level() {
        let mut rng = Rng(0x0b0f_1600_1234_5678);
        let fp8 = |scaling| WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling };
        let formats = [
            WeightFormat::Bf16,
            WeightFormat::Int8,
            fp8(Fp8Scaling::PerRow),
            fp8(Fp8Scaling::PerTensor),
            fp8_groups(32),
            fp8_groups(128),
            int4(128, false),
            int4(128, true),
            int4(256, false),
            int4(32, true),
            int4(64, false),
        ];
        #[cfg(target_arch = "x86_64")]
        // The hardware's answer: `bf16_dot` is asked about the AVX-512 level even where QUANTFLEET_CPU_ISA keeps
        // the backend below it (AVX-512 BF16 implies AVX-512 F/BW/VL on every CPU that has it).
        let bf16_cpu = x86_bf16::has_avx512bf16();
        #[cfg(not(target_arch = "x86_64"))]
        let bf16_cpu = false;
        for f in formats {
            for (rows, cols) in [(16, 320), (48, 288), (32, 576), (16, 64), (70, 320), (33, 64), (3, 37)] {
                let w: Vec<f32> = (0..rows * cols).map(|_| rng.uniform() * 0.2).collect();
                let q = quantize_rtn(&MatrixRef::new("w", &w, rows, cols).unwrap(), &f).unwrap();
                let mut m = PackedMatrix::from_quantized(&q).unwrap();
                m.activations = ActivationQuant::Bf16;
                let base = m.clone();
                let mut variants = vec![m.clone()];
                if rows % 16 == 0 && cols % 32 == 0 {
                    variants.push(m.clone().interleave_rows16().unwrap());
                }
                if matches!(m.format, PackedFormat::Int4 { .. }) && rows % 8 == 0 && cols % 32 == 0 {
                    // The AVX2 level's layout: fixed-point inputs through the integer kernels.
                    variants.push(m.interleave_rows8().unwrap());
                }
                for mut m in variants {
                    m.validate().unwrap();
                    let fast = cols.is_multiple_of(32)
                        && matches!(
                            (m.format, m.layout),
                            (PackedFormat::Bf16, PackedLayout::Bf16Rows16)
                                | (PackedFormat::Int4 { .. }, PackedLayout::Int4Rows16)
                                | (PackedFormat::Int8 | PackedFormat::Fp8E4m3 { .. }, PackedLayout::Byte8Rows16)
                        );
                    let name = format!("{} {:?} {rows}x{cols}", m.format.name(), m.layout);
                    assert_eq!(bf16_dot(SimdLevel::Avx512, &m), bf16_cpu && fast, "{name}");
                    let fixed = m.layout == PackedLayout::Int4Rows8;
                    assert_eq!(uses_fixed16(SimdLevel::Avx2Fma, &m), fixed, "{name}");
                    assert!(!uses_fixed16(SimdLevel::Portable, &m), "{name}");
                    for with_scales in [false, true] {
                        m.input_scales =
                            with_scales.then(|| (0..cols).map(|_| 0.25 + rng.uniform().abs() * 4.0).collect());
                        let mut wrow = vec![0.0f32; cols];
                        let mut rounding_seen = false;
                        each_output(&m, &mut rng, &[1, 3, 8, 9, 70], |level, n_tokens, t, r, xt, got| {
                            let xe = m.effective_input(xt).unwrap();
                            let want = m.dot_reference(r, xt).unwrap();
                            m.dequantize_row_reference(r, &mut wrow).unwrap();
                            let unrounded: f32 = wrow
                                .iter()
                                .zip(xt)
                                .enumerate()
                                .map(|(j, (a, b))| a * b / m.input_scales.as_ref().map_or(1.0, |s| s[j]))
                                .sum();
                            let mag: f32 = wrow.iter().zip(&xe).map(|(a, b)| (a * b).abs()).sum();
                            // The scales from the row-layout matrix (same values, plain indexing).
                            let offsets: f32 = match base.format {
                                PackedFormat::Int4 { group, .. } => (0..cols)
                                    .map(|j| {
                                        let s = base.group_scales[r * base.groups_per_row() + j / group];
                                        144.0 * (s.to_f32() * xe[j]).abs()
                                    })
                                    .sum(),
                                _ => 0.0,
                            };
                            // Fixed-point inputs (the interleaved INT4 layout at x86 levels) round values more
                            // than 7 octaves below their block's largest to 2^-15 of it.
                            let fixed_point: f32 = if uses_fixed16(level, &m) {
                                let amax: Vec<f32> =
                                    xe.chunks(32).map(|b| b.iter().fold(0.0f32, |a, v| a.max(v.abs()))).collect();
                                wrow.iter().enumerate().map(|(j, w)| w.abs() * amax[j / 32]).sum::<f32>() / 32768.0
                            } else {
                                0.0
                            };
                            let bound = 2e-6 * mag + 2e-7 * offsets + 1e-6 + fixed_point;
                            assert!(
                                (got - want).abs() <= bound,
                                "{name} T={n_tokens} {level:?} scales={with_scales} ({t},{r}): {got} vs {want}"
                            );
                            rounding_seen |= (unrounded - want).abs() > 4.0 * bound;
                        });
                        assert!(rounding_seen, "{name}: the bf16 rounding moved no output");
                    }
                }
            }
        }
    }

    /// The AVX2 level's fixed-point form of a bf16 input (`fixed16`) on SYNTHETIC blocks spanning 40
    /// octaves: every value within 7 octaves of its block's largest comes back exactly, every smaller one
    /// within 2^-15 of that largest; the codes' sums match the zero-point terms; an all-zero block is zeros, a
    /// subnormal block is exact, a NaN makes its block's scale NaN.
    #[test]
    fn fixed_point_inputs_hold_bf16_values() {
        let mut rng = Rng(0x0f1c_ed16_0000_0001);
        let cols = 256;
        let mut x: Vec<f32> = (0..cols)
            .map(|i| {
                let octave = (rng.uniform() * 20.0) as i32 - 17;
                rng.uniform() * 2f32.powi(octave) * if i % 32 == 5 { 0.0 } else { 1.0 }
            })
            .collect();
        x[64..96].fill(0.0);
        for (j, v) in x[96..128].iter_mut().enumerate() {
            *v = f32::from_bits(1 + 40_000 * j as u32) * if j % 2 == 0 { 1.0 } else { -1.0 };
        }
        round_to_bf16(&mut x);
        for symmetric in [true, false] {
            let w = vec![0.01f32; 8 * cols];
            let q = quantize_rtn(&MatrixRef::new("w", &w, 8, cols).unwrap(), &int4(64, symmetric)).unwrap();
            let mut m = PackedMatrix::from_quantized(&q).unwrap();
            m.activations = ActivationQuant::Bf16;
            let m = m.interleave_rows8().unwrap();
            let f = fixed16(&m, &x);
            let (mut exact, mut rounded) = (0, 0);
            for (b, xb) in x.chunks_exact(32).enumerate() {
                let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let mut sum = 0i32;
                for (j, &v) in xb.iter().enumerate() {
                    let x16 = 256 * f.q[32 * b + j] as i32 + f.lo[32 * b + j] as i32;
                    sum += x16;
                    let back = f.d[b] as f64 * x16 as f64;
                    if (v.abs() as f64) * 128.0 >= amax as f64 {
                        assert_eq!(back, v as f64, "block {b} element {j}: within 7 octaves, held exactly");
                        exact += 1;
                    } else {
                        assert!((back - v as f64).abs() <= amax as f64 * 2f64.powi(-15), "block {b} element {j}");
                        rounded += usize::from(back != v as f64);
                    }
                }
                if symmetric {
                    assert_eq!(f.corr[8 * (b / 2) + 4 * (b % 2)], 8 * sum, "block {b}");
                }
                if b == 2 {
                    assert!(sum == 0 && f.q[64..96].iter().all(|&c| c == 0), "an all-zero block");
                }
            }
            // The zero-point terms hold the held values' sums (sum of d_b * x16 over the group).
            let held = |j: usize| f.d[j / 32] as f64 * (256 * f.q[j] as i32 + f.lo[j] as i32) as f64;
            let gzero: Vec<f64> = (0..cols / 64).map(|g| (64 * g..64 * g + 64).map(held).sum::<f64>()).collect();
            for (g, (&got, want)) in f.gzero.iter().zip(gzero).enumerate() {
                assert!((got as f64 - want).abs() <= 1e-6 * want.abs().max(1e-30), "group {g}: {got} vs {want}");
            }
            assert!(exact >= 64 && rounded >= 64, "the fixture exercises both cases: {exact} exact, {rounded} rounded");
            let mut bad = x.clone();
            bad[200] = f32::NAN;
            let f = fixed16(&m, &bad);
            assert!(f.d[6].is_nan() && f.d.iter().enumerate().all(|(b, d)| b == 6 || d.is_finite()));
        }
    }

    /// The AVX2 level's INT4 products on fixed-point inputs (the CPU backend's layout for weight-only INT4
    /// there): every token of a batch step and a prefill equals its one-token product bit for bit, as the
    /// W4A8 kernels do, and a NaN input stays visible. SYNTHETIC weights and inputs.
    #[test]
    fn fixed_point_int4_products_are_batch_invariant() {
        let mut rng = Rng(0x0f1c_ed16_0000_0002);
        for (f, rows, cols) in [(int4(128, false), 24, 576), (int4(32, true), 16, 608), (int4(256, false), 8, 288)] {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.uniform() * 0.2).collect();
            let q = quantize_rtn(&MatrixRef::new("w", &w, rows, cols).unwrap(), &f).unwrap();
            let mut m = PackedMatrix::from_quantized(&q).unwrap();
            m.activations = ActivationQuant::Bf16;
            let m = m.interleave_rows8().unwrap();
            for level in levels().into_iter().filter(|&l| uses_fixed16(l, &m)) {
                let n = 21;
                let x: Vec<f32> = (0..n * cols).map(|_| rng.uniform()).collect();
                for n_tokens in [2, 5, 9, 21] {
                    let mut out = vec![f32::NAN; n_tokens * rows];
                    matmul(level, &m, &x[..n_tokens * cols], n_tokens, &mut out);
                    for (t, xt) in x[..n_tokens * cols].chunks_exact(cols).enumerate() {
                        let mut one = vec![f32::NAN; rows];
                        matmul(level, &m, xt, 1, &mut one);
                        let got: Vec<u32> = out[t * rows..(t + 1) * rows].iter().map(|v| v.to_bits()).collect();
                        assert_eq!(
                            got,
                            one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            "{level:?} T={n_tokens} t={t}"
                        );
                    }
                }
                let mut bad = x[..cols].to_vec();
                bad[cols / 2] = f32::NAN;
                let mut out = vec![0.0f32; rows];
                matmul(level, &m, &bad, 1, &mut out);
                assert!(out.iter().all(|v| v.is_nan()), "{level:?}: {out:?}");
            }
        }
    }

    /// INT8 activations (W8A8, W4A8): the integer kernels of every level, for one token, a batch step and a
    /// prefill, with and without input scales, against the scalar reference that quantize-dequantizes the
    /// input the same way; and every token of a batch bit for bit equal to its one-token product. Shapes include a group cut short at
    /// the row end (96 columns in groups of 64, 320 in groups of 128). Bound: 1e-5 * sum|w x^| + 1e-6; the
    /// activation quantization itself moves outputs by about 1e-2 relative, so a kernel that skipped or
    /// misplaced it fails.
    #[test]
    fn int8_activation_kernels_match_the_reference_on_every_level() {
        let mut rng = Rng(0x0a8a_8a8a_1234_5678);
        let formats =
            [WeightFormat::Int8, int4(32, true), int4(32, false), int4(64, true), int4(128, false), int4(256, true)];
        for f in formats {
            for (rows, cols) in [(33, 64), (7, 96), (72, 320), (3, 32), (16, 96)] {
                let w: Vec<f32> = (0..rows * cols).map(|_| rng.uniform() * 0.2).collect();
                let q = quantize_rtn(&MatrixRef::new("w", &w, rows, cols).unwrap(), &f).unwrap();
                let mut rows_layout = PackedMatrix::from_quantized(&q).unwrap();
                rows_layout.activations = ActivationQuant::Int8;
                rows_layout.validate().unwrap();
                // INT4 with whole groups of 8 rows also in the CPU's interleaved layout, on the x86 levels
                // (the only ones that read it).
                let interleaved = (matches!(f, WeightFormat::Int4(_)) && rows % 8 == 0)
                    .then(|| rows_layout.clone().interleave_rows8().unwrap());
                for (mut m, x86_only) in std::iter::once((rows_layout, false)).chain(interleaved.map(|m| (m, true))) {
                    for with_scales in [false, true] {
                        m.input_scales =
                            with_scales.then(|| (0..cols).map(|_| 0.25 + rng.uniform().abs() * 4.0).collect());
                        let mut wrow = vec![0.0f32; cols];
                        for n_tokens in [1, 3, 9, 20] {
                            // Spread magnitudes so blocks get different scales; a zero block on token 0.
                            let mut x: Vec<f32> =
                                (0..n_tokens * cols).map(|i| rng.uniform() * (1 + i % 7) as f32).collect();
                            x[..32].fill(0.0);
                            for level in levels().into_iter().filter(|&l| !x86_only || l != SimdLevel::Portable) {
                                let mut out = vec![f32::NAN; n_tokens * rows];
                                matmul(level, &m, &x, n_tokens, &mut out);
                                for t in 0..n_tokens {
                                    let xt = &x[t * cols..(t + 1) * cols];
                                    // Batch invariance: each token's row equals its one-token product bit for bit.
                                    let mut alone = vec![f32::NAN; rows];
                                    matmul(level, &m, xt, 1, &mut alone);
                                    let batched = &out[t * rows..(t + 1) * rows];
                                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                                    assert_eq!(
                                        bits(batched),
                                        bits(&alone),
                                        "{} T={n_tokens} {level:?} token {t}",
                                        m.format_name()
                                    );
                                    let xq = m.effective_input(xt).unwrap();
                                    for r in 0..rows {
                                        let want = m.dot_reference(r, xt).unwrap();
                                        m.dequantize_row_reference(r, &mut wrow).unwrap();
                                        let mag: f32 = wrow.iter().zip(&xq).map(|(a, b)| (a * b).abs()).sum();
                                        let got = out[t * rows + r];
                                        assert!(
                                            (got - want).abs() <= 1e-5 * mag + 1e-6,
                                            "{} {:?} {rows}x{cols} T={n_tokens} {level:?} scales={with_scales} ({t},{r}): {got} vs {want}",
                                            m.format_name(),
                                            m.layout
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Matrices that prepare their input alike share one preparation (`matvec_many`, `matmul_many`): the
    /// products must equal each matrix's own, bit for bit, on every level, for a mix of formats, layouts
    /// and input scales where some share and some do not. SYNTHETIC weights.
    #[test]
    fn shared_input_preparation_changes_no_bits() {
        let mut rng = Rng(0x5a4e_d0be_ef00);
        let cols = 96;
        let mut make = |f: &WeightFormat, rows: usize, a8: bool, scales: bool| {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.uniform() * 0.2).collect();
            let mut m =
                PackedMatrix::from_quantized(&quantize_rtn(&MatrixRef::new("w", &w, rows, cols).unwrap(), f).unwrap())
                    .unwrap();
            m.activations = if a8 { ActivationQuant::Int8 } else { ActivationQuant::F32 };
            m.input_scales = scales.then(|| (0..cols).map(|i| 0.5 + (i % 5) as f32).collect());
            m
        };
        let ms = vec![
            make(&int4(32, true), 16, true, false),
            make(&int4(32, true), 24, true, false),
            make(&WeightFormat::Int8, 8, true, false),
            make(&int4(32, false), 16, true, false),
            make(&int4(32, true), 16, true, true),
            make(&int4(32, true), 16, false, false),
        ];
        let x: Vec<f32> = (0..5 * cols).map(|i| rng.uniform() * (1 + i % 3) as f32).collect();
        for level in levels() {
            let mut variants = vec![ms.clone()];
            if level != SimdLevel::Portable {
                // As the x86 backend stores them: the W4A8 matrices interleaved (the F32 one stays in rows).
                variants.push(
                    ms.iter()
                        .map(|m| {
                            let w4a8 =
                                matches!(m.format, PackedFormat::Int4 { .. }) && m.activations == ActivationQuant::Int8;
                            if w4a8 { m.clone().interleave_rows8().unwrap() } else { m.clone() }
                        })
                        .collect(),
                );
            }
            for ms in &variants {
                let refs: Vec<&PackedMatrix> = ms.iter().collect();
                for n_tokens in [1, 5] {
                    let xs = &x[..n_tokens * cols];
                    let alone: Vec<Vec<u32>> = refs
                        .iter()
                        .map(|m| {
                            let mut o = vec![f32::NAN; n_tokens * m.rows];
                            matmul(level, m, xs, n_tokens, &mut o);
                            o.iter().map(|v| v.to_bits()).collect()
                        })
                        .collect();
                    let mut outs: Vec<Vec<f32>> = refs.iter().map(|m| vec![f32::NAN; n_tokens * m.rows]).collect();
                    let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
                    matmul_many(level, &refs, xs, n_tokens, &mut slices);
                    for (i, (o, a)) in outs.iter().zip(&alone).enumerate() {
                        let bits: Vec<u32> = o.iter().map(|v| v.to_bits()).collect();
                        assert_eq!(&bits, a, "{level:?} matmul_many matrix {i} T={n_tokens}");
                    }
                    if n_tokens == 1 {
                        let mut outs: Vec<Vec<f32>> = refs.iter().map(|m| vec![f32::NAN; m.rows]).collect();
                        matvec_many(level, &refs, xs, &mut outs);
                        for (i, (o, a)) in outs.iter().zip(&alone).enumerate() {
                            let bits: Vec<u32> = o.iter().map(|v| v.to_bits()).collect();
                            assert_eq!(&bits, a, "{level:?} matvec_many matrix {i}");
                        }
                    }
                }
            }
        }
    }

    /// AVX-512 VNNI's W4A8 and W8A8 kernels against AVX2's, bit for bit, for one and four tokens, symmetric and
    /// asymmetric, with full 8-block runs, a leftover pair and an unpaired last block (skipped without VNNI).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vnni_and_avx2_integer_kernels_agree_bit_for_bit() {
        if !(SimdLevel::Avx2Fma.is_supported() && x86::has_vnni()) {
            eprintln!("skipped: no AVX-512 VNNI on this CPU");
            return;
        }
        let mut rng = Rng(0x005e_ed0f_7a11);
        for (f, cols) in [(int4(32, true), 608), (int4(64, false), 352), (int4(128, true), 288)] {
            let rows = 5;
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.uniform() * 0.3).collect();
            let q = quantize_rtn(&MatrixRef::new("w", &w, rows, cols).unwrap(), &f).unwrap();
            let mut m = PackedMatrix::from_quantized(&q).unwrap();
            m.activations = ActivationQuant::Int8;
            let PackedFormat::Int4 { symmetric, group } = m.format else { unreachable!() };
            let inputs: Vec<IntInput> = (0..4)
                .map(|t| prepare_q8(&m, &(0..cols).map(|_| rng.uniform() * (1 + t) as f32).collect::<Vec<_>>()))
                .collect();
            let gpr = m.groups_per_row();
            let bits: &[u16] = m.group_scales.reinterpret_cast();
            for r in 0..rows {
                let zeros = (!symmetric).then(|| &m.zeros[r * gpr..(r + 1) * gpr]);
                let row = x86::I4Row { bytes: m.row_data(r), scales: &bits[r * gpr..(r + 1) * gpr], zeros, group };
                let act: [x86::I4Act<'_>; 4] = std::array::from_fn(|t| x86::I4Act {
                    q: &inputs[t].q,
                    lo: &inputs[t].lo,
                    d: &inputs[t].d,
                    gzero: &inputs[t].gzero,
                    corr: &inputs[t].corr,
                });
                // SAFETY: AVX2 and AVX-512 VNNI are present (checked above).
                let (a, v) = unsafe { (x86::dot_i4_q8_avx2::<4>(row, act), x86::dot_i4_q8_vnni::<4>(row, act)) };
                assert_eq!(a.map(f32::to_bits), v.map(f32::to_bits), "{} cols {cols} row {r}", m.format_name());
                // SAFETY: as above.
                let one = unsafe { x86::dot_i4_q8_vnni::<1>(row, [act[2]]) };
                assert_eq!(one[0].to_bits(), v[2].to_bits(), "{} cols {cols} row {r}: token 2 alone", m.format_name());
            }
        }
        // The interleaved rows' kernel (`PackedLayout::Int4Rows8`), with an odd block count and a group cut
        // short at the row end.
        for (f, cols) in [(int4(32, true), 608), (int4(64, false), 352), (int4(128, true), 288), (int4(256, false), 96)]
        {
            let rows = 16;
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.uniform() * 0.3).collect();
            let q = quantize_rtn(&MatrixRef::new("w", &w, rows, cols).unwrap(), &f).unwrap();
            let mut m = PackedMatrix::from_quantized(&q).unwrap();
            m.activations = ActivationQuant::Int8;
            let m = m.interleave_rows8().unwrap();
            let PackedFormat::Int4 { symmetric, group } = m.format else { unreachable!() };
            let inputs: Vec<IntInput> = (0..4)
                .map(|t| prepare_q8(&m, &(0..cols).map(|_| rng.uniform() * (1 + t) as f32).collect::<Vec<_>>()))
                .collect();
            let n_scales = 8 * m.groups_per_row();
            let bits: &[u16] = m.group_scales.reinterpret_cast();
            for g in 0..rows / 8 {
                let rows8 = x86::I4Rows8 {
                    bytes: &m.data[g * 4 * cols..(g + 1) * 4 * cols],
                    scales: &bits[g * n_scales..(g + 1) * n_scales],
                    zeros: (!symmetric).then(|| &m.zeros[g * n_scales..(g + 1) * n_scales]),
                    group,
                };
                let act: [x86::I4Act<'_>; 4] = std::array::from_fn(|t| x86::I4Act {
                    q: &inputs[t].q,
                    lo: &inputs[t].lo,
                    d: &inputs[t].d,
                    gzero: &inputs[t].gzero,
                    corr: &inputs[t].corr,
                });
                // Four tokens' eight rows, written at rows 8..16 of a [4 x 24] output (NaN elsewhere).
                let run = |kernel: &dyn Fn(OutPtr)| {
                    let mut o = vec![f32::NAN; 4 * 24];
                    kernel(OutPtr { base: o.as_mut_ptr(), stride: 24, row0: 0, len: o.len() });
                    o.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
                };
                // SAFETY (all three): AVX2 and AVX-512 VNNI are present (checked above).
                let a = run(&|o| unsafe { x86::dot_i4x8_q8_avx2::<4>(rows8, act, o, (0, 8)) });
                let v = run(&|o| unsafe { x86::dot_i4x8_q8_vnni::<4>(rows8, act, o, (0, 8)) });
                assert_eq!(a, v, "interleaved {} cols {cols} row group {g}", m.format_name());
                let nan = f32::NAN.to_bits();
                for t in 0..4 {
                    let (row, rest) =
                        (&v[24 * t + 8..24 * t + 16], [&v[24 * t..24 * t + 8], &v[24 * t + 16..24 * t + 24]]);
                    assert!(row.iter().all(|&b| b != nan) && rest.iter().all(|r| r.iter().all(|&b| b == nan)));
                }
                let one = run(&|o| unsafe { x86::dot_i4x8_q8_vnni::<1>(rows8, [act[2]], o, (2, 8)) });
                assert_eq!(one[2 * 24 + 8..2 * 24 + 16], v[2 * 24 + 8..2 * 24 + 16], "interleaved: token 2 alone");
            }
        }
        // W8A8: the same for the INT8 kernel (an odd block count leaves an unpaired block).
        let (rows, cols) = (5, 608);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.uniform() * 0.3).collect();
        let qw = quantize_rtn(&MatrixRef::new("w", &w, rows, cols).unwrap(), &WeightFormat::Int8).unwrap();
        let mut m = PackedMatrix::from_quantized(&qw).unwrap();
        m.activations = ActivationQuant::Int8;
        let inputs: Vec<IntInput> =
            (0..3).map(|_| prepare_q8(&m, &(0..cols).map(|_| rng.uniform()).collect::<Vec<_>>())).collect();
        let q: [&[i8]; 3] = std::array::from_fn(|t| &inputs[t].q[..]);
        let d: [&[f32]; 3] = std::array::from_fn(|t| &inputs[t].d[..]);
        for r in 0..rows {
            // SAFETY: AVX2 and AVX-512 VNNI are present (checked above).
            let (a, v) = unsafe {
                (
                    x86::dot_i8_q8_multi_avx2::<3>(m.row_data(r), q, d),
                    x86::dot_i8_q8_multi_vnni::<3>(m.row_data(r), q, d),
                )
            };
            assert_eq!(a.map(f32::to_bits), v.map(f32::to_bits), "int8 row {r}");
        }
    }

    #[test]
    fn int8_activations_keep_a_nan_visible() {
        let w: Vec<f32> = (0..4 * 64).map(|i| (i % 13) as f32 * 0.01 - 0.06).collect();
        for f in [WeightFormat::Int8, int4(32, false)] {
            let q = quantize_rtn(&MatrixRef::new("w", &w, 4, 64).unwrap(), &f).unwrap();
            let mut m = PackedMatrix::from_quantized(&q).unwrap();
            m.activations = ActivationQuant::Int8;
            let mut x = vec![0.5f32; 64];
            x[40] = f32::NAN;
            for level in levels() {
                let mut out = vec![0.0f32; 4];
                matmul(level, &m, &x, 1, &mut out);
                assert!(out.iter().all(|v| v.is_nan()), "{} {level:?}: {out:?}", m.format_name());
            }
        }
    }
}

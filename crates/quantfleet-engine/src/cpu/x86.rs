//! Hand-written x86 kernels for the decode dot products: the GGUF file's Q4_1 and Q8_0 weights and the tiers'
//! packed BF16/FP8/INT8/INT4 weights against f32 activations, INT8/INT4 weights against INT8 activations, and
//! INT4 weights against bf16 inputs held as 16-bit fixed point (AVX2's weight-only INT4).
//! LLVM vectorizes the portable versions in `dot.rs` only two lanes wide (the nibble unpacking defeats its
//! cost model), so these spell out the widening: 16 quants -> 16 i32 -> 16 f32 per AVX-512 register
//! (8 per AVX2 register), one FMA per 16 weights. `cpu::tests` checks them against the scalar reference.

use std::arch::x86_64::*;

use super::gemm::OutPtr;

/// Block scales are little-endian f16 at unaligned offsets; F16C converts them in one instruction.
#[inline(always)]
fn f16_to_f32(b0: u8, b1: u8) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b0, b1]))
}

/// One f16 (as bits) to f32 with F16C.
#[inline(always)]
pub(crate) fn f16_bits_to_f32(bits: u16) -> f32 {
    // SAFETY: only inlined into functions compiled with the f16c feature (checked at dispatch).
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))) }
}

/// `out[i] = src[i]` for f16 elements (`out` at least as long as `src`), eight per F16C conversion.
#[inline]
#[target_feature(enable = "avx,f16c")]
pub(crate) fn f16_run_to_f32(src: &[half::f16], out: &mut [f32]) {
    let out = &mut out[..src.len()];
    let mut dst = out.chunks_exact_mut(8);
    let mut from = src.chunks_exact(8);
    for (o, h) in (&mut dst).zip(&mut from) {
        // SAFETY: 8 f16 (16 bytes) are read and 8 f32 written, both chunks exactly that long; unaligned ops.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr() as *const __m128i))) }
    }
    for (o, h) in dst.into_remainder().iter_mut().zip(from.remainder()) {
        *o = f16_bits_to_f32(h.to_bits());
    }
}

/// Attention scores of 16 key slots: `acc[s] = sum_d (q[d] * scale) * keys_t[16 d + s]` in `d` order, a
/// multiply then an add (no FMA), as the portable loop computes them. `keys_t.len() == 16 * q.len()`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn block_scores16_avx512(keys_t: &[f32], q: &[f32], scale: f32) -> [f32; 16] {
    let mut acc = _mm512_setzero_ps();
    for (col, &qd) in keys_t.chunks_exact(16).zip(q) {
        // SAFETY: `col` is exactly 16 floats; unaligned load.
        let k = unsafe { _mm512_loadu_ps(col.as_ptr()) };
        acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_set1_ps(qd * scale), k));
    }
    let mut out = [0.0f32; 16];
    // SAFETY: `out` holds 16 floats.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), acc) };
    out
}

/// [`block_scores16_avx512`] in two 8-lane halves.
#[inline]
#[target_feature(enable = "avx")]
pub(crate) fn block_scores16_avx2(keys_t: &[f32], q: &[f32], scale: f32) -> [f32; 16] {
    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for (col, &qd) in keys_t.chunks_exact(16).zip(q) {
        let qd = _mm256_set1_ps(qd * scale);
        // SAFETY: `col` is exactly 16 floats; unaligned loads.
        let (k0, k1) = unsafe { (_mm256_loadu_ps(col.as_ptr()), _mm256_loadu_ps(col.as_ptr().add(8))) };
        lo = _mm256_add_ps(lo, _mm256_mul_ps(qd, k0));
        hi = _mm256_add_ps(hi, _mm256_mul_ps(qd, k1));
    }
    let mut out = [0.0f32; 16];
    // SAFETY: `out` holds 16 floats.
    unsafe {
        _mm256_storeu_ps(out.as_mut_ptr(), lo);
        _mm256_storeu_ps(out.as_mut_ptr().add(8), hi);
    }
    out
}

/// One Q4_1 block times its 32 activations, before scaling: (sum q_lo*x_lo + q_hi*x_hi) as 16 lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn q4_1_block_avx512(q: &[u8], xb: &[f32]) -> __m512 {
    let mask = _mm_set1_epi8(0x0f);
    // SAFETY: callers pass q = 16 bytes and xb = 32 floats (sliced, so lengths are checked); unaligned loads.
    unsafe {
        let q = _mm_loadu_si128(q.as_ptr() as *const __m128i);
        let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, mask)));
        let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), mask)));
        _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb.as_ptr().add(16)), _mm512_mul_ps(lo, _mm512_loadu_ps(xb.as_ptr())))
    }
}

/// Q4_1 row · x: row = K/32 blocks of {f16 d, f16 m, 16 bytes of nibbles}, x = K f32, xsum = K/32 block sums.
/// Two blocks per iteration into two accumulators: one accumulator chains every FMA on the previous one
/// (4-cycle latency), which, not the loads, bounded the single-accumulator loop.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) fn dot_q4_1_avx512(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let n = (row.len() / 20).min(x.len() / 32).min(xsum.len());
    let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let (mut min0, mut min1) = (0.0f32, 0.0f32);
    let mut b = 0;
    while b + 2 <= n {
        let (k0, k1) = (&row[b * 20..b * 20 + 20], &row[b * 20 + 20..b * 20 + 40]);
        let s0 = q4_1_block_avx512(&k0[4..20], &x[b * 32..b * 32 + 32]);
        let s1 = q4_1_block_avx512(&k1[4..20], &x[b * 32 + 32..b * 32 + 64]);
        acc0 = _mm512_fmadd_ps(_mm512_set1_ps(f16_to_f32(k0[0], k0[1])), s0, acc0);
        acc1 = _mm512_fmadd_ps(_mm512_set1_ps(f16_to_f32(k1[0], k1[1])), s1, acc1);
        min0 += f16_to_f32(k0[2], k0[3]) * xsum[b];
        min1 += f16_to_f32(k1[2], k1[3]) * xsum[b + 1];
        b += 2;
    }
    if b < n {
        let k0 = &row[b * 20..b * 20 + 20];
        let s0 = q4_1_block_avx512(&k0[4..20], &x[b * 32..b * 32 + 32]);
        acc0 = _mm512_fmadd_ps(_mm512_set1_ps(f16_to_f32(k0[0], k0[1])), s0, acc0);
        min0 += f16_to_f32(k0[2], k0[3]) * xsum[b];
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + (min0 + min1)
}

/// One Q8_0 block's 32 quants times its activations, before scaling, as 16 lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn q8_0_block_avx512(q: &[u8], xb: &[f32]) -> __m512 {
    // SAFETY: callers pass q = 32 bytes and xb = 32 floats; unaligned loads.
    unsafe {
        let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q.as_ptr() as *const __m128i)));
        let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q.as_ptr().add(16) as *const __m128i)));
        _mm512_fmadd_ps(q1, _mm512_loadu_ps(xb.as_ptr().add(16)), _mm512_mul_ps(q0, _mm512_loadu_ps(xb.as_ptr())))
    }
}

/// Q8_0 row · x: row = K/32 blocks of {f16 d, 32 i8}, x = K f32. Two accumulators, as for Q4_1.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) fn dot_q8_0_avx512(row: &[u8], x: &[f32]) -> f32 {
    let n = (row.len() / 34).min(x.len() / 32);
    let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut b = 0;
    while b + 2 <= n {
        let (k0, k1) = (&row[b * 34..b * 34 + 34], &row[b * 34 + 34..b * 34 + 68]);
        let s0 = q8_0_block_avx512(&k0[2..34], &x[b * 32..b * 32 + 32]);
        let s1 = q8_0_block_avx512(&k1[2..34], &x[b * 32 + 32..b * 32 + 64]);
        acc0 = _mm512_fmadd_ps(_mm512_set1_ps(f16_to_f32(k0[0], k0[1])), s0, acc0);
        acc1 = _mm512_fmadd_ps(_mm512_set1_ps(f16_to_f32(k1[0], k1[1])), s1, acc1);
        b += 2;
    }
    if b < n {
        let k0 = &row[b * 34..b * 34 + 34];
        let s0 = q8_0_block_avx512(&k0[2..34], &x[b * 32..b * 32 + 32]);
        acc0 = _mm512_fmadd_ps(_mm512_set1_ps(f16_to_f32(k0[0], k0[1])), s0, acc0);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
}

/// Checks the shapes the `gguf_rows_multi_*` kernels read (rows up to `row_end`, `nt` tokens) and returns
/// (bytes per block, blocks per row).
fn gguf_rows_multi_shapes(
    q4_1: bool,
    nt: usize,
    (data, row_bytes, cols): (&[u8], usize, usize),
    row_end: usize,
    x: &[f32],
    xsum_t: &[f32],
) -> (usize, usize) {
    let (block_bytes, blocks) = (if q4_1 { 20 } else { 34 }, cols / 32);
    assert!(
        nt <= 8
            && cols.is_multiple_of(32)
            && row_bytes == blocks * block_bytes
            && data.len() >= row_end * row_bytes
            && x.len() >= nt * cols
            && (!q4_1 || xsum_t.len() >= 8 * blocks),
        "gguf_rows_multi shapes"
    );
    (block_bytes, blocks)
}

/// Rows `r0 .. r0 + nr` of a GGUF Q4_1 or Q8_0 matrix (`data`, `row_bytes` per row, `cols` columns) against
/// `NT` tokens (`x`: `NT` rows of `cols`; Q4_1 also `xsum_t`, the block sums by block, eight lanes per block,
/// lane t for token t, so that one 8-lane multiply-add serves every token's min term): each weight
/// block is loaded and widened once for all the tokens. Per token the arithmetic is exactly
/// [`dot_q4_1_avx512`]'s or [`dot_q8_0_avx512`]'s (the same block products, even and odd blocks in two
/// accumulators, the same final sums), so a token's result equals its one-token product bit for bit and a
/// batch step changes no logits. `out.write(t, r, ..)` receives row `r0 + r` of token `t`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) fn gguf_rows_multi_avx512<const NT: usize>(
    q4_1: bool,
    (data, row_bytes, cols): (&[u8], usize, usize),
    (r0, nr): (usize, usize),
    x: &[f32],
    xsum_t: &[f32],
    out: OutPtr,
) {
    let (block_bytes, blocks) = gguf_rows_multi_shapes(q4_1, NT, (data, row_bytes, cols), r0 + nr, x, xsum_t);
    let mask = _mm_set1_epi8(0x0f);
    for r in 0..nr {
        let row = &data[(r0 + r) * row_bytes..(r0 + r + 1) * row_bytes];
        let mut acc = [[_mm512_setzero_ps(); 2]; NT];
        // Lane t: token t's min term (separate multiply and add per lane: the one-token kernel's scalar sums).
        let mut mins = [_mm256_setzero_ps(); 2];
        // Block `b` (bytes `k`) into accumulator `par` (b % 2, a literal so the accumulators stay in registers).
        macro_rules! block {
            ($b:expr, $k:expr, $par:literal) => {{
                let (b, k): (usize, &[u8]) = ($b, $k);
                let d = _mm512_set1_ps(f16_to_f32(k[0], k[1]));
                // SAFETY: k holds the block's 20 or 34 bytes (sliced by the caller); unaligned loads.
                let (lo, hi) = unsafe {
                    if q4_1 {
                        let q = _mm_loadu_si128(k[4..20].as_ptr() as *const __m128i);
                        (
                            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, mask))),
                            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), mask))),
                        )
                    } else {
                        let q0 = _mm_loadu_si128(k[2..18].as_ptr() as *const __m128i);
                        let q1 = _mm_loadu_si128(k[18..34].as_ptr() as *const __m128i);
                        (_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)))
                    }
                };
                if q4_1 {
                    let m = _mm256_set1_ps(f16_to_f32(k[2], k[3]));
                    // SAFETY: 8 * b + 8 <= 8 * blocks <= xsum_t.len() (asserted above).
                    let sums = unsafe { _mm256_loadu_ps(xsum_t.as_ptr().add(8 * b)) };
                    mins[$par] = _mm256_add_ps(mins[$par], _mm256_mul_ps(m, sums));
                }
                for (t, a) in acc.iter_mut().enumerate() {
                    // SAFETY: t < NT and 32 b + 32 <= cols, so the 32 floats lie in x (asserted above).
                    let s = unsafe {
                        let xb = x.as_ptr().add(t * cols + 32 * b);
                        let x_lo = _mm512_loadu_ps(xb);
                        _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb.add(16)), _mm512_mul_ps(lo, x_lo))
                    };
                    a[$par] = _mm512_fmadd_ps(d, s, a[$par]);
                }
            }};
        }
        let pairs = row.chunks_exact(2 * block_bytes);
        let tail = pairs.remainder();
        for (i, pair) in pairs.enumerate() {
            block!(2 * i, &pair[..block_bytes], 0);
            block!(2 * i + 1, &pair[block_bytes..], 1);
        }
        if !tail.is_empty() {
            block!(blocks - 1, tail, 0);
        }
        let (mut mn0, mut mn1) = ([0.0f32; 8], [0.0f32; 8]);
        // SAFETY: 8 floats into 8-float arrays.
        unsafe {
            _mm256_storeu_ps(mn0.as_mut_ptr(), mins[0]);
            _mm256_storeu_ps(mn1.as_mut_ptr(), mins[1]);
        }
        for (t, a) in acc.iter().enumerate() {
            let dot = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
            out.write(t, r, if q4_1 { dot + (mn0[t] + mn1[t]) } else { dot });
        }
    }
}

#[inline(always)]
fn hsum256(v: __m256) -> f32 {
    let mut lanes = [0.0f32; 8];
    // SAFETY: storing 8 floats into an 8-float array.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    (lanes[0] + lanes[4]) + (lanes[1] + lanes[5]) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

/// AVX2 version of [`dot_q4_1_avx512`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_q4_1_avx2(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let n = (row.len() / 20).min(x.len() / 32).min(xsum.len());
    let mut acc = _mm256_setzero_ps();
    let mut min_part = 0.0f32;
    let mask = _mm_set1_epi8(0x0f);
    for b in 0..n {
        let blk = &row[b * 20..b * 20 + 20];
        let xb = &x[b * 32..b * 32 + 32];
        let d = f16_to_f32(blk[0], blk[1]);
        let m = f16_to_f32(blk[2], blk[3]);
        // SAFETY: as in the AVX-512 version.
        unsafe {
            let q = _mm_loadu_si128(blk.as_ptr().add(4) as *const __m128i);
            let lo = _mm_and_si128(q, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
            let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
            let xp = xb.as_ptr();
            let mut s = _mm256_mul_ps(f(lo), _mm256_loadu_ps(xp));
            s = _mm256_fmadd_ps(f(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xp.add(8)), s);
            s = _mm256_fmadd_ps(f(hi), _mm256_loadu_ps(xp.add(16)), s);
            s = _mm256_fmadd_ps(f(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xp.add(24)), s);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc);
        }
        min_part += m * xsum[b];
    }
    hsum256(acc) + min_part
}

/// AVX2 version of [`dot_q8_0_avx512`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_q8_0_avx2(row: &[u8], x: &[f32]) -> f32 {
    let n = (row.len() / 34).min(x.len() / 32);
    let mut acc = _mm256_setzero_ps();
    for b in 0..n {
        let blk = &row[b * 34..b * 34 + 34];
        let xb = &x[b * 32..b * 32 + 32];
        let d = f16_to_f32(blk[0], blk[1]);
        // SAFETY: as in the AVX-512 version; each 8-byte load stays inside blk[2..34].
        unsafe {
            let qp = blk.as_ptr().add(2);
            let xp = xb.as_ptr();
            let f =
                |i: usize| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(qp.add(8 * i) as *const __m128i)));
            let mut s = _mm256_mul_ps(f(0), _mm256_loadu_ps(xp));
            s = _mm256_fmadd_ps(f(1), _mm256_loadu_ps(xp.add(8)), s);
            s = _mm256_fmadd_ps(f(2), _mm256_loadu_ps(xp.add(16)), s);
            s = _mm256_fmadd_ps(f(3), _mm256_loadu_ps(xp.add(24)), s);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc);
        }
    }
    hsum256(acc)
}

/// The AVX2 form of [`gguf_rows_multi_avx512`]: each Q4_1 or Q8_0 block is widened once for the `NT` tokens,
/// and each token's arithmetic is exactly [`dot_q4_1_avx2`]'s or [`dot_q8_0_avx2`]'s (the block's four 8-lane
/// products in the same order, one accumulator, the min terms summed in block order), so a batch step
/// reproduces every token's one-token product bit for bit. `NT` accumulators, the four widened weight vectors
/// and a product fit in the 16 ymm registers.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn gguf_rows_multi_avx2<const NT: usize>(
    q4_1: bool,
    (data, row_bytes, cols): (&[u8], usize, usize),
    (r0, nr): (usize, usize),
    x: &[f32],
    xsum_t: &[f32],
    out: OutPtr,
) {
    let (block_bytes, _) = gguf_rows_multi_shapes(q4_1, NT, (data, row_bytes, cols), r0 + nr, x, xsum_t);
    let mask = _mm_set1_epi8(0x0f);
    let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    for r in 0..nr {
        let row = &data[(r0 + r) * row_bytes..(r0 + r + 1) * row_bytes];
        let mut acc = [_mm256_setzero_ps(); NT];
        // Lane t: token t's min term, a multiply then an add per block as the one-token kernel's scalar sum.
        let mut mins = _mm256_setzero_ps();
        for (b, k) in row.chunks_exact(block_bytes).enumerate() {
            let d = _mm256_set1_ps(f16_to_f32(k[0], k[1]));
            // SAFETY: k holds the block's 20 or 34 bytes; each load stays inside it (unaligned loads).
            let w = unsafe {
                if q4_1 {
                    let q = _mm_loadu_si128(k.as_ptr().add(4) as *const __m128i);
                    let lo = _mm_and_si128(q, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                    [f(lo), f(_mm_srli_si128(lo, 8)), f(hi), f(_mm_srli_si128(hi, 8))]
                } else {
                    let qp = k.as_ptr().add(2);
                    let g = |i: usize| {
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(qp.add(8 * i) as *const __m128i)))
                    };
                    [g(0), g(1), g(2), g(3)]
                }
            };
            if q4_1 {
                let m = _mm256_set1_ps(f16_to_f32(k[2], k[3]));
                // SAFETY: 8 * b + 8 <= 8 * blocks <= xsum_t.len() (asserted above).
                let sums = unsafe { _mm256_loadu_ps(xsum_t.as_ptr().add(8 * b)) };
                mins = _mm256_add_ps(mins, _mm256_mul_ps(m, sums));
            }
            for (t, a) in acc.iter_mut().enumerate() {
                // SAFETY: t < NT and 32 b + 32 <= cols, so the 32 floats lie in x (asserted above).
                unsafe {
                    let xp = x.as_ptr().add(t * cols + 32 * b);
                    let mut s = _mm256_mul_ps(w[0], _mm256_loadu_ps(xp));
                    s = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xp.add(8)), s);
                    s = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xp.add(16)), s);
                    s = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xp.add(24)), s);
                    *a = _mm256_fmadd_ps(d, s, *a);
                }
            }
        }
        let mut mn = [0.0f32; 8];
        // SAFETY: 8 floats into an 8-float array.
        unsafe { _mm256_storeu_ps(mn.as_mut_ptr(), mins) };
        for (t, a) in acc.iter().enumerate() {
            out.write(t, r, if q4_1 { hsum256(*a) + mn[t] } else { hsum256(*a) });
        }
    }
}

/// Prefill kernel over a k-major tile of 32 weight rows (`wt[kk * 32 + r]`): for each kk, two weight vectors
/// (rows 0-15, 16-31) times the broadcast activation of each of up to 6 tokens. 12 accumulators hold finished
/// output rows, so unlike the 4x4 dot kernel nothing needs a horizontal reduction at the end; per step 2
/// vector loads and 6 broadcasts feed 12 FMAs. `out` receives (token, row) for rows < `nr`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
pub(crate) fn gemm_kmajor32_avx512(wt: &[f32], nr: usize, x: &[f32], nt: usize, k: usize, out: OutPtr) {
    assert!(wt.len() >= 32 * k && x.len() >= nt * k && nr <= 32, "gemm_kmajor32 shapes");
    let mut t = 0;
    while t < nt {
        let n = (nt - t).min(6);
        let rows = &x[t * k..(t + n) * k];
        let acc = match n {
            6 => tile_kmajor::<6>(wt, rows, k),
            5 => tile_kmajor::<5>(wt, rows, k),
            4 => tile_kmajor::<4>(wt, rows, k),
            3 => tile_kmajor::<3>(wt, rows, k),
            2 => tile_kmajor::<2>(wt, rows, k),
            _ => tile_kmajor::<1>(wt, rows, k),
        };
        for (j, lanes) in acc.iter().enumerate().take(n) {
            out.write_rows(t + j, &lanes[..nr]);
        }
        t += n;
    }
}

/// `NT` tokens (`x`, NT x k) against the k-major 32-row tile; returns `[token][row]` (6 rows of 32 at most).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn tile_kmajor<const NT: usize>(wt: &[f32], x: &[f32], k: usize) -> [[f32; 32]; 6] {
    assert!(wt.len() >= 32 * k && x.len() >= NT * k);
    let mut acc = [[_mm512_setzero_ps(); 2]; NT];
    let wp = wt.as_ptr();
    let xp = x.as_ptr();
    for kk in 0..k {
        // SAFETY: kk * 32 + 32 <= wt.len() and j * k + kk < x.len() (asserted above).
        unsafe {
            let w0 = _mm512_loadu_ps(wp.add(kk * 32));
            let w1 = _mm512_loadu_ps(wp.add(kk * 32 + 16));
            for (j, a) in acc.iter_mut().enumerate() {
                let xb = _mm512_set1_ps(*xp.add(j * k + kk));
                a[0] = _mm512_fmadd_ps(w0, xb, a[0]);
                a[1] = _mm512_fmadd_ps(w1, xb, a[1]);
            }
        }
    }
    let mut out = [[0.0f32; 32]; 6];
    for (o, a) in out.iter_mut().zip(&acc) {
        // SAFETY: each row of `out` holds 32 floats.
        unsafe {
            _mm512_storeu_ps(o.as_mut_ptr(), a[0]);
            _mm512_storeu_ps(o.as_mut_ptr().add(16), a[1]);
        }
    }
    out
}

/// The AVX2 form of [`gemm_kmajor32_avx512`] over the same k-major 32-row tile, as two halves of 16 rows:
/// per half, two weight vectors times the broadcast activation of each of up to 6 tokens, so 12 accumulators,
/// 2 weight vectors and the broadcast fill 15 of the 16 ymm registers (the portable 4x4 dot kernel, with
/// 16-lane arrays, needed 32 and spilled: AVX2 prefill ran at a third of llama.cpp's).
#[target_feature(enable = "avx2,fma")]
pub(crate) fn gemm_kmajor32_avx2(wt: &[f32], nr: usize, x: &[f32], nt: usize, k: usize, out: OutPtr) {
    assert!(wt.len() >= 32 * k && x.len() >= nt * k && nr <= 32, "gemm_kmajor32 shapes");
    let mut t = 0;
    while t < nt {
        let n = (nt - t).min(6);
        let rows = &x[t * k..(t + n) * k];
        for half in 0..nr.div_ceil(16) {
            let acc = match n {
                6 => tile_kmajor16_avx2::<6>(wt, half, rows, k),
                5 => tile_kmajor16_avx2::<5>(wt, half, rows, k),
                4 => tile_kmajor16_avx2::<4>(wt, half, rows, k),
                3 => tile_kmajor16_avx2::<3>(wt, half, rows, k),
                2 => tile_kmajor16_avx2::<2>(wt, half, rows, k),
                _ => tile_kmajor16_avx2::<1>(wt, half, rows, k),
            };
            let (r0, r1) = (16 * half, nr.min(16 * half + 16));
            for (j, lanes) in acc.iter().enumerate().take(n) {
                out.with_row0(out.row0 + r0).write_rows(t + j, &lanes[..r1 - r0]);
            }
        }
        t += n;
    }
}

/// `NT` tokens (`x`, NT x k) against rows `16 * half ..` of the k-major 32-row tile; returns `[token][row]`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn tile_kmajor16_avx2<const NT: usize>(wt: &[f32], half: usize, x: &[f32], k: usize) -> [[f32; 16]; 6] {
    assert!(wt.len() >= 32 * k && x.len() >= NT * k && half < 2);
    let mut acc = [[_mm256_setzero_ps(); 2]; NT];
    let wp = wt.as_ptr().wrapping_add(16 * half);
    let xp = x.as_ptr();
    for kk in 0..k {
        // SAFETY: kk * 32 + 16 * half + 16 <= wt.len() and j * k + kk < x.len() (asserted above).
        unsafe {
            let w0 = _mm256_loadu_ps(wp.add(kk * 32));
            let w1 = _mm256_loadu_ps(wp.add(kk * 32 + 8));
            for (j, a) in acc.iter_mut().enumerate() {
                let xb = _mm256_broadcast_ss(&*xp.add(j * k + kk));
                a[0] = _mm256_fmadd_ps(w0, xb, a[0]);
                a[1] = _mm256_fmadd_ps(w1, xb, a[1]);
            }
        }
    }
    let mut out = [[0.0f32; 16]; 6];
    for (o, a) in out.iter_mut().zip(&acc) {
        // SAFETY: each row of `out` holds 16 floats.
        unsafe {
            _mm256_storeu_ps(o.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), a[1]);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------------
// Tier (packed) weights: see `packed_kernels.rs` for the layouts. INT4 activations arrive de-interleaved per
// 32 elements (16 even, then 16 odd), so the low nibbles of 16 bytes meet one vector and the high nibbles the
// next.

/// The 16 values of a group's nibbles, `(n - z) * s` for n = 0..15, computed as the reference does (the
/// difference is exact in f32, then one rounded product): `_mm512_permutexvar_ps` with the nibbles as
/// indices then yields dequantized weights directly, with no int-to-float conversion and no zero-point term.
#[inline]
#[target_feature(enable = "avx512f")]
fn int4_lut_avx512(scale: f32, zero: f32) -> __m512 {
    let iota = _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.);
    _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(zero)), _mm512_set1_ps(scale))
}

/// 16 bytes of INT4 nibbles as two vectors of 16 dequantized weights (low nibbles, high nibbles): one
/// widening to 32-bit lanes, then the group's table looked up by each lane's low 4 bits (the permute ignores
/// the higher bits, so the low nibble needs no mask; the high nibble is the lane shifted right by 4).
#[inline(always)]
fn nibbles_lut_avx512(p: *const u8, lut: __m512) -> (__m512, __m512) {
    // SAFETY: callers pass a pointer with 16 readable bytes; the feature is enabled by every caller.
    unsafe {
        let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
        (_mm512_permutexvar_ps(v, lut), _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut))
    }
}

/// INT4 row · de-interleaved x (`cols = xd.len()`, a multiple of 32; groups of `group` columns, the last one
/// possibly shorter): weights dequantized through the group's table ([`int4_lut_avx512`]), four independent
/// accumulators over 64 columns per step so that FMAs do not wait on each other.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) fn dot_int4_avx512(row: &[u8], xd: &[f32], scales: &[half::f16], zeros: Option<&[u8]>, group: usize) -> f32 {
    let cols = xd.len();
    assert!(
        cols.is_multiple_of(32)
            && row.len() * 2 >= cols
            && scales.len() == cols.div_ceil(group)
            && zeros.is_none_or(|z| z.len() == scales.len()),
        "dot_int4 shapes"
    );
    let (rp, xp) = (row.as_ptr(), xd.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    for (g, s16) in scales.iter().enumerate() {
        let lut = int4_lut_avx512(f16_bits_to_f32(s16.to_bits()), zeros.map_or(8.0, |z| z[g] as f32));
        let (c0, c1) = (g * group, ((g + 1) * group).min(cols));
        let mut c = c0;
        // SAFETY: c + 64 (or + 32) <= c1 <= cols: bytes c/2 .. lie in the row, floats c .. in xd.
        unsafe {
            while c + 64 <= c1 {
                let (lo0, hi0) = nibbles_lut_avx512(rp.add(c / 2), lut);
                let (lo1, hi1) = nibbles_lut_avx512(rp.add(c / 2 + 16), lut);
                acc[0] = _mm512_fmadd_ps(lo0, _mm512_loadu_ps(xp.add(c)), acc[0]);
                acc[1] = _mm512_fmadd_ps(hi0, _mm512_loadu_ps(xp.add(c + 16)), acc[1]);
                acc[2] = _mm512_fmadd_ps(lo1, _mm512_loadu_ps(xp.add(c + 32)), acc[2]);
                acc[3] = _mm512_fmadd_ps(hi1, _mm512_loadu_ps(xp.add(c + 48)), acc[3]);
                c += 64;
            }
            if c < c1 {
                // A last 32-column chunk (group 32, or a short final group).
                let (lo0, hi0) = nibbles_lut_avx512(rp.add(c / 2), lut);
                acc[0] = _mm512_fmadd_ps(lo0, _mm512_loadu_ps(xp.add(c)), acc[0]);
                acc[1] = _mm512_fmadd_ps(hi0, _mm512_loadu_ps(xp.add(c + 16)), acc[1]);
            }
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])))
}

/// Which packed format [`rows_multi_avx512`] decodes, with the per-row data it needs.
#[derive(Clone, Copy)]
pub(crate) enum PackedKind<'a> {
    Bf16,
    /// FP8 E4M3: scales per row and group of `span` columns (`span == cols`: per row).
    Fp8 {
        scales: &'a [f32],
        span: usize,
    },
    /// INT8: `f32_scales` per row.
    Int8(&'a [f32]),
    /// INT4: scales per (row, group), zero points per (row, group) when asymmetric.
    Int4 {
        scales: &'a [half::f16],
        zeros: Option<&'a [u8]>,
        group: usize,
    },
}

/// 2^120: an E4M3 code placed in f32 bits as `sign << 31 | (code & 0x7f) << 20` is its value times 2^-120
/// (subnormal codes land on f32 subnormals with the same mantissa), so one multiply re-biases every code.
const E4M3_REBIAS: f32 = f32::from_bits((127 + 120) << 23);

/// Whether the scales of an FP8 row with scale groups fold into the re-bias multiply: `2^120 * s` finite for
/// every `s` (`|s| < 2^8`, which every real checkpoint's scales are). Then one multiply by `2^120 * s` turns a
/// group's raw codes (see [`fp8_raw16`]) into its dequantized weights, re-biasing and scaling at once, and it
/// is exact: `2^120 * s` only moves the exponent of `s` and a code times 2^120 is an exact f32, so `raw *
/// (2^120 * s)` and `(raw * 2^120) * s` round the same real number once. A row with a larger or non-finite
/// scale takes the two multiplies.
#[inline(always)]
fn fp8_scales_fold(scales: &[f32]) -> bool {
    scales.iter().fold(true, |ok, &s| ok & (s * E4M3_REBIAS).is_finite())
}

/// Whether `groups` scale groups of `span` columns cover `cols` columns with none left empty: `groups ==
/// cols.div_ceil(span)` for a nonzero `span`, without the division (the one-token kernels check it per row).
#[inline(always)]
fn fp8_groups_cover(groups: usize, span: usize, cols: usize) -> bool {
    span > 0 && groups.checked_mul(span).is_some_and(|n| n >= cols) && (groups == 0 || (groups - 1) * span < cols)
}

/// A group's multiplier for [`fp8_group16`]/[`fp8_group8`]: `2^120 * s` when the row's scales fold
/// ([`fp8_scales_fold`]), else `s`.
#[inline(always)]
fn fp8_group_factor(s: f32, fold: bool) -> f32 {
    if fold { s * E4M3_REBIAS } else { s }
}

/// 16 E4M3 codes of a row starting at column `c` as raw f32 bits, their values times 2^-120 (see
/// [`decode16`]): the caller multiplies by 2^120 (and may fold a scale into that multiply).
///
/// # Safety
/// The row behind `rp` holds at least `c + 16` codes; the caller has AVX-512F/BW.
#[inline(always)]
unsafe fn fp8_raw16(rp: *const u8, c: usize) -> __m512 {
    // SAFETY: as documented above.
    unsafe {
        let q = _mm_loadu_si128(rp.add(c) as *const __m128i);
        let v = _mm512_slli_epi32(_mm512_cvtepi8_epi32(q), 20);
        _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x87f0_0000u32 as i32)))
    }
}

/// 16 weights of an FP8 scale group at column `c`, dequantized with the group's [`fp8_group_factor`] (as a
/// vector): one multiply when the row's scales fold, two otherwise.
///
/// # Safety
/// As [`fp8_raw16`].
#[inline(always)]
unsafe fn fp8_group16(rp: *const u8, c: usize, factor: __m512, fold: bool) -> __m512 {
    // SAFETY: as documented above.
    unsafe {
        let raw = fp8_raw16(rp, c);
        if fold {
            _mm512_mul_ps(raw, factor)
        } else {
            _mm512_mul_ps(_mm512_mul_ps(raw, _mm512_set1_ps(E4M3_REBIAS)), factor)
        }
    }
}

/// The AVX2 form of [`fp8_group16`]: 8 weights.
///
/// # Safety
/// As [`fp8_raw8`].
#[inline(always)]
unsafe fn fp8_group8(rp: *const u8, c: usize, factor: __m256, fold: bool) -> __m256 {
    // SAFETY: as documented above.
    unsafe {
        let raw = fp8_raw8(rp, c);
        if fold {
            _mm256_mul_ps(raw, factor)
        } else {
            _mm256_mul_ps(_mm256_mul_ps(raw, _mm256_set1_ps(E4M3_REBIAS)), factor)
        }
    }
}

/// The AVX2 form of [`fp8_raw16`]: 8 codes.
///
/// # Safety
/// The row behind `rp` holds at least `c + 8` codes; the caller has AVX2.
#[inline(always)]
unsafe fn fp8_raw8(rp: *const u8, c: usize) -> __m256 {
    // SAFETY: as documented above.
    unsafe {
        let q = _mm_loadl_epi64(rp.add(c) as *const __m128i);
        let v = _mm256_slli_epi32(_mm256_cvtepi8_epi32(q), 20);
        _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(0x87f0_0000u32 as i32)))
    }
}

/// Bytes per weight of the 8/16-bit packed formats.
#[inline(always)]
fn byte_width(kind: PackedKind<'_>) -> usize {
    if matches!(kind, PackedKind::Bf16) { 2 } else { 1 }
}

/// 16 weights of a BF16, FP8 or INT8 row starting at column `c`, as f32 (FP8 and INT8 without their row
/// scale). BF16: widened to 32 bits and shifted into the high half. FP8 E4M3: the code sign-extended to 32
/// bits and shifted left by 20 puts the magnitude at bits 20..26 with copies of the sign above, a mask keeps
/// the sign and the magnitude ([`fp8_raw16`]), and a multiply by 2^120 re-biases the exponent (subnormal
/// codes included). INT8: sign-extended and converted.
///
/// # Safety
/// The row behind `rp` holds at least `c + 16` weights; the caller has AVX-512F/BW.
#[inline(always)]
unsafe fn decode16(kind: PackedKind<'_>, rp: *const u8, c: usize) -> __m512 {
    // SAFETY: as documented above.
    unsafe {
        match kind {
            PackedKind::Bf16 => {
                let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(rp.add(2 * c) as *const __m256i));
                _mm512_castsi512_ps(_mm512_slli_epi32(h, 16))
            }
            PackedKind::Fp8 { .. } => {
                // Re-bias before the products: unscaled values would make subnormal products.
                _mm512_mul_ps(fp8_raw16(rp, c), _mm512_set1_ps(E4M3_REBIAS))
            }
            PackedKind::Int8(_) => {
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(rp.add(c) as *const __m128i)))
            }
            PackedKind::Int4 { .. } => unreachable!("INT4 rows are decoded by nibbles_avx512"),
        }
    }
}

/// One BF16, FP8 or INT8 row · x (`cols = x.len()`, a multiple of 16), before the row scale: four
/// independent accumulators over 64 columns per step, so consecutive FMAs do not wait on each other.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) fn dot_packed_avx512(kind: PackedKind<'_>, row: &[u8], x: &[f32]) -> f32 {
    let cols = x.len();
    assert!(cols.is_multiple_of(16) && row.len() >= cols * byte_width(kind), "dot_packed shapes");
    assert!(!matches!(kind, PackedKind::Int4 { .. }), "dot_packed: INT4 has its own kernel");
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut c = 0;
    // SAFETY: every decode and load below covers columns c .. c + 16 <= cols (asserted above).
    unsafe {
        while c + 64 <= cols {
            for (j, a) in acc.iter_mut().enumerate() {
                let cc = c + 16 * j;
                *a = _mm512_fmadd_ps(decode16(kind, rp, cc), _mm512_loadu_ps(xp.add(cc)), *a);
            }
            c += 64;
        }
        while c < cols {
            acc[0] = _mm512_fmadd_ps(decode16(kind, rp, c), _mm512_loadu_ps(xp.add(c)), acc[0]);
            c += 16;
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])))
}

/// One FP8 row with a scale per `span` columns (`scales`: the row's, in order) · x (`cols = x.len()`, a
/// multiple of 16; `span` of 32): each vector of codes is re-biased and scaled by one multiply
/// ([`fp8_scales_fold`]: the reference's dequantized values, exactly) and summed into four accumulators that
/// run across the groups, so the groups cost what per-row scales do, with no reductions.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) fn dot_fp8_groups_avx512(row: &[u8], x: &[f32], scales: &[f32], span: usize) -> f32 {
    let cols = x.len();
    assert!(
        cols.is_multiple_of(16)
            && span.is_multiple_of(32)
            && row.len() >= cols
            && fp8_groups_cover(scales.len(), span, cols),
        "dot_fp8_groups shapes"
    );
    if fp8_scales_fold(scales) {
        fp8_groups_body16::<true>(row, x, scales, span)
    } else {
        fp8_groups_body16::<false>(row, x, scales, span)
    }
}

/// The loop of [`dot_fp8_groups_avx512`], with the fold decided at compile time.
#[inline(always)]
fn fp8_groups_body16<const FOLD: bool>(row: &[u8], x: &[f32], scales: &[f32], span: usize) -> f32 {
    let cols = x.len();
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    // SAFETY (every block below): AVX-512F is enabled by the only caller.
    let mut acc = [unsafe { _mm512_setzero_ps() }; 4];
    let mut start = 0;
    for &s in scales {
        let f = unsafe { _mm512_set1_ps(fp8_group_factor(s, FOLD)) };
        let (mut c, end) = (start, (start + span).min(cols));
        start = end;
        // SAFETY: every decode and load covers columns c .. c + 16 <= end <= cols (asserted above).
        unsafe {
            while c + 64 <= end {
                for (j, a) in acc.iter_mut().enumerate() {
                    let cc = c + 16 * j;
                    let w = fp8_group16(rp, cc, f, FOLD);
                    *a = _mm512_fmadd_ps(w, _mm512_loadu_ps(xp.add(cc)), *a);
                }
                c += 64;
            }
            // What is left is 0, 16, 32 or 48 columns (a group of 32, a short last group); constant indices
            // keep the accumulators in registers.
            if c + 32 <= end {
                acc[0] = _mm512_fmadd_ps(fp8_group16(rp, c, f, FOLD), _mm512_loadu_ps(xp.add(c)), acc[0]);
                let w = fp8_group16(rp, c + 16, f, FOLD);
                acc[1] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xp.add(c + 16)), acc[1]);
                c += 32;
            }
            if c < end {
                acc[2] = _mm512_fmadd_ps(fp8_group16(rp, c, f, FOLD), _mm512_loadu_ps(xp.add(c)), acc[2]);
            }
        }
    }
    unsafe { _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))) }
}

/// Several tokens (`NT`, up to 8) against rows `r0 .. r0 + nr` of a packed matrix: each group of 16 weights
/// is decoded to f32 once and multiplied into the `NT` accumulators (one per token), so the weights are read
/// and decoded once for the whole batch, not once per token. `x` holds `NT` rows of `cols` activations (INT4:
/// de-interleaved per 32). `out.write(t, r, ..)` receives row `r0 + r` of token `t` (`out.row0` = `r0`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) fn rows_multi_avx512<const NT: usize>(
    kind: PackedKind<'_>,
    data: &[u8],
    cols: usize,
    r0: usize,
    nr: usize,
    x: &[f32],
    out: OutPtr,
) {
    assert!(cols.is_multiple_of(32), "rows_multi needs cols % 32 == 0");
    let row_bytes = match kind {
        PackedKind::Int4 { .. } => cols / 2,
        _ => cols * byte_width(kind),
    };
    assert!(NT <= 8 && x.len() >= NT * cols && data.len() >= (r0 + nr) * row_bytes, "rows_multi shapes");
    let xp = x.as_ptr();
    for r in 0..nr {
        let row = &data[(r0 + r) * row_bytes..(r0 + r + 1) * row_bytes];
        let rp = row.as_ptr();
        let mut acc = [_mm512_setzero_ps(); NT];
        // One 16-weight vector `w` at column `c` into every token's accumulator.
        macro_rules! fma_all {
            ($w:expr, $c:expr) => {{
                let w = $w;
                for (t, a) in acc.iter_mut().enumerate() {
                    // SAFETY: t < NT and c + 16 <= cols, so the load lies in x (asserted above).
                    *a = _mm512_fmadd_ps(w, unsafe { _mm512_loadu_ps(xp.add(t * cols + $c)) }, *a);
                }
            }};
        }
        let mut post_scale = 1.0f32;
        match kind {
            PackedKind::Fp8 { scales, span } if span < cols => {
                // Scale groups: each group's weights scaled once for all tokens (spans are multiples of 32).
                let gpr = cols.div_ceil(span);
                let row_scales = &scales[(r0 + r) * gpr..(r0 + r + 1) * gpr];
                let fold = fp8_scales_fold(row_scales);
                for (g, &s) in row_scales.iter().enumerate() {
                    let f = _mm512_set1_ps(fp8_group_factor(s, fold));
                    for c in (g * span..((g + 1) * span).min(cols)).step_by(16) {
                        // SAFETY: c + 16 <= cols, so the 16 weights lie in the row (asserted above).
                        fma_all!(unsafe { fp8_group16(rp, c, f, fold) }, c);
                    }
                }
            }
            PackedKind::Bf16 | PackedKind::Fp8 { .. } | PackedKind::Int8(_) => {
                assert!(row.len() >= cols * byte_width(kind));
                if let PackedKind::Fp8 { scales: s, .. } | PackedKind::Int8(s) = kind {
                    post_scale = s[r0 + r];
                }
                for c in (0..cols).step_by(16) {
                    // SAFETY: c + 16 <= cols, so the 16 weights lie in the row (asserted above).
                    fma_all!(unsafe { decode16(kind, rp, c) }, c);
                }
            }
            PackedKind::Int4 { scales, zeros, group } => {
                assert!(row.len() * 2 >= cols);
                let gpr = cols.div_ceil(group);
                for g in 0..gpr {
                    let i = (r0 + r) * gpr + g;
                    let lut = int4_lut_avx512(f16_bits_to_f32(scales[i].to_bits()), zeros.map_or(8.0, |z| z[i] as f32));
                    let c1 = ((g + 1) * group).min(cols);
                    for c in (g * group..c1).step_by(32) {
                        // 16 bytes at c / 2 lie in the row (c + 32 <= cols).
                        let (lo, hi) = nibbles_lut_avx512(rp.wrapping_add(c / 2), lut);
                        fma_all!(lo, c);
                        fma_all!(hi, c + 16);
                    }
                }
            }
        }
        for (t, a) in acc.iter().enumerate() {
            out.write(t, r, _mm512_reduce_add_ps(*a) * post_scale);
        }
    }
}

// AVX2 versions of the weight-only kernels above (BF16, FP8, INT8 and INT4 weights against f32 activations),
// eight weights per register, with the same decodes. The multi-token kernel dequantizes INT4 weights as
// `(n - z) * s` exactly as the reference does; the one-token INT4 kernel factors the zero point out.

/// 8 weights of a BF16, FP8 or INT8 row starting at column `c`, as f32 (see [`decode16`]).
///
/// # Safety
/// The row behind `rp` holds at least `c + 8` weights; the caller has AVX2.
#[inline(always)]
unsafe fn decode8(kind: PackedKind<'_>, rp: *const u8, c: usize) -> __m256 {
    // SAFETY: as documented above.
    unsafe {
        match kind {
            PackedKind::Bf16 => {
                let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(rp.add(2 * c) as *const __m128i));
                _mm256_castsi256_ps(_mm256_slli_epi32(h, 16))
            }
            PackedKind::Fp8 { .. } => _mm256_mul_ps(fp8_raw8(rp, c), _mm256_set1_ps(E4M3_REBIAS)),
            PackedKind::Int8(_) => {
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(rp.add(c) as *const __m128i)))
            }
            PackedKind::Int4 { .. } => unreachable!("INT4 rows are decoded by int4_block_avx2"),
        }
    }
}

/// The 32 weights of 16 INT4 bytes (low nibbles: the block's first 16 weights in de-interleaved order, high
/// nibbles the next 16), dequantized as `(n - z) * s`: four vectors of 8, matching x de-interleaved per 32.
#[inline(always)]
fn int4_block_avx2(p: *const u8, zero: __m256, scale: __m256) -> [__m256; 4] {
    // SAFETY: callers pass a pointer with 16 readable bytes; AVX2 is enabled by every caller.
    unsafe {
        let bytes = _mm_loadu_si128(p as *const __m128i);
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(bytes, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
        let deq = |v: __m128i| _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), zero), scale);
        [deq(lo), deq(_mm_srli_si128(lo, 8)), deq(hi), deq(_mm_srli_si128(hi, 8))]
    }
}

/// AVX2 version of [`dot_fp8_groups_avx512`] (`cols` a multiple of 8).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_fp8_groups_avx2(row: &[u8], x: &[f32], scales: &[f32], span: usize) -> f32 {
    let cols = x.len();
    assert!(
        cols.is_multiple_of(8)
            && span.is_multiple_of(32)
            && row.len() >= cols
            && fp8_groups_cover(scales.len(), span, cols),
        "dot_fp8_groups shapes"
    );
    if fp8_scales_fold(scales) {
        fp8_groups_body8::<true>(row, x, scales, span)
    } else {
        fp8_groups_body8::<false>(row, x, scales, span)
    }
}

/// The loop of [`dot_fp8_groups_avx2`], with the fold decided at compile time.
#[inline(always)]
fn fp8_groups_body8<const FOLD: bool>(row: &[u8], x: &[f32], scales: &[f32], span: usize) -> f32 {
    let cols = x.len();
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    // SAFETY (every block below): AVX2 and FMA are enabled by the only caller.
    let mut acc = [unsafe { _mm256_setzero_ps() }; 4];
    let mut start = 0;
    for &s in scales {
        let f = unsafe { _mm256_set1_ps(fp8_group_factor(s, FOLD)) };
        let (mut c, end) = (start, (start + span).min(cols));
        start = end;
        // SAFETY: every decode and load covers columns c .. c + 8 <= end <= cols (asserted above).
        unsafe {
            while c + 32 <= end {
                for (j, a) in acc.iter_mut().enumerate() {
                    let cc = c + 8 * j;
                    let w = fp8_group8(rp, cc, f, FOLD);
                    *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(cc)), *a);
                }
                c += 32;
            }
            while c < end {
                let w = fp8_group8(rp, c, f, FOLD);
                acc[0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(c)), acc[0]);
                c += 8;
            }
        }
    }
    hsum256(unsafe { _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])) })
}

/// AVX2 version of [`dot_packed_avx512`] (`cols` a multiple of 8).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_packed_avx2(kind: PackedKind<'_>, row: &[u8], x: &[f32]) -> f32 {
    let cols = x.len();
    assert!(cols.is_multiple_of(8) && row.len() >= cols * byte_width(kind), "dot_packed shapes");
    assert!(!matches!(kind, PackedKind::Int4 { .. }), "dot_packed: INT4 has its own kernel");
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut c = 0;
    // SAFETY: every decode and load below covers columns c .. c + 8 <= cols (asserted above).
    unsafe {
        while c + 32 <= cols {
            for (j, a) in acc.iter_mut().enumerate() {
                let cc = c + 8 * j;
                *a = _mm256_fmadd_ps(decode8(kind, rp, cc), _mm256_loadu_ps(xp.add(cc)), *a);
            }
            c += 32;
        }
        while c < cols {
            acc[0] = _mm256_fmadd_ps(decode8(kind, rp, c), _mm256_loadu_ps(xp.add(c)), acc[0]);
            c += 8;
        }
    }
    hsum256(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
}

/// INT4 row · x de-interleaved per 32 (`cols` a multiple of 32) at AVX2 width. Eight-lane permutes cannot
/// look up a 16-entry table in one step, so unlike [`dot_int4_avx512`] this factors the zero point out of
/// each group: `s * (n . x - z * sum x)`, with the group sums of x (`gsum`) computed once per input. The raw
/// nibbles cost a widening, a conversion and an FMA per 8 weights, and the group's scale one FMA per
/// accumulator, as the portable kernel computes it.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_int4_avx2(
    row: &[u8],
    xd: &[f32],
    gsum: &[f32],
    scales: &[half::f16],
    zeros: Option<&[u8]>,
    group: usize,
) -> f32 {
    let cols = xd.len();
    assert!(
        cols.is_multiple_of(32)
            && row.len() * 2 >= cols
            && scales.len() == cols.div_ceil(group)
            && gsum.len() == scales.len()
            && zeros.is_none_or(|z| z.len() == scales.len()),
        "dot_int4 shapes"
    );
    let (rp, xp) = (row.as_ptr(), xd.as_ptr());
    let mask = _mm_set1_epi8(0x0f);
    let mut acc = _mm256_setzero_ps();
    let mut zero_part = 0.0f32;
    for (g, s16) in scales.iter().enumerate() {
        let s = f16_bits_to_f32(s16.to_bits());
        zero_part += s * zeros.map_or(8.0, |z| z[g] as f32) * gsum[g];
        let mut gacc = [_mm256_setzero_ps(); 4];
        for c in (g * group..((g + 1) * group).min(cols)).step_by(32) {
            // SAFETY: c + 32 <= cols: bytes c/2 .. c/2 + 16 lie in the row, floats c .. c + 32 in xd.
            unsafe {
                let bytes = _mm_loadu_si128(rp.add(c / 2) as *const __m128i);
                let lo = _mm_and_si128(bytes, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
                let n = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
                for (j, a) in gacc.iter_mut().enumerate() {
                    let w = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(n[j]));
                    *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(c + 8 * j)), *a);
                }
            }
        }
        let sum = _mm256_add_ps(_mm256_add_ps(gacc[0], gacc[1]), _mm256_add_ps(gacc[2], gacc[3]));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(s), sum, acc);
    }
    hsum256(acc) - zero_part
}

/// AVX2 version of [`rows_multi_avx512`]: each group of 8 weights is decoded once for the `NT` tokens
/// (`NT` accumulators + a weight vector + an activation load fit in the 16 ymm registers).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn rows_multi_avx2<const NT: usize>(
    kind: PackedKind<'_>,
    data: &[u8],
    cols: usize,
    r0: usize,
    nr: usize,
    x: &[f32],
    out: OutPtr,
) {
    assert!(cols.is_multiple_of(32), "rows_multi needs cols % 32 == 0");
    let row_bytes = match kind {
        PackedKind::Int4 { .. } => cols / 2,
        _ => cols * byte_width(kind),
    };
    assert!(NT <= 8 && x.len() >= NT * cols && data.len() >= (r0 + nr) * row_bytes, "rows_multi shapes");
    let xp = x.as_ptr();
    for r in 0..nr {
        let rp = data[(r0 + r) * row_bytes..(r0 + r + 1) * row_bytes].as_ptr();
        let mut acc = [_mm256_setzero_ps(); NT];
        // One 8-weight vector `w` at column `c` into every token's accumulator.
        macro_rules! fma_all {
            ($w:expr, $c:expr) => {{
                let w = $w;
                for (t, a) in acc.iter_mut().enumerate() {
                    // SAFETY: t < NT and c + 8 <= cols, so the load lies in x (asserted above).
                    *a = _mm256_fmadd_ps(w, unsafe { _mm256_loadu_ps(xp.add(t * cols + $c)) }, *a);
                }
            }};
        }
        let mut post_scale = 1.0f32;
        match kind {
            PackedKind::Fp8 { scales, span } if span < cols => {
                // As at the AVX-512 level.
                let gpr = cols.div_ceil(span);
                let row_scales = &scales[(r0 + r) * gpr..(r0 + r + 1) * gpr];
                let fold = fp8_scales_fold(row_scales);
                for (g, &s) in row_scales.iter().enumerate() {
                    let f = _mm256_set1_ps(fp8_group_factor(s, fold));
                    for c in (g * span..((g + 1) * span).min(cols)).step_by(8) {
                        // SAFETY: c + 8 <= cols, so the 8 weights lie in the row (row_bytes checked above).
                        fma_all!(unsafe { fp8_group8(rp, c, f, fold) }, c);
                    }
                }
            }
            PackedKind::Bf16 | PackedKind::Fp8 { .. } | PackedKind::Int8(_) => {
                if let PackedKind::Fp8 { scales: s, .. } | PackedKind::Int8(s) = kind {
                    post_scale = s[r0 + r];
                }
                for c in (0..cols).step_by(8) {
                    // SAFETY: c + 8 <= cols, so the 8 weights lie in the row (row_bytes checked above).
                    fma_all!(unsafe { decode8(kind, rp, c) }, c);
                }
            }
            PackedKind::Int4 { scales, zeros, group } => {
                let gpr = cols.div_ceil(group);
                for g in 0..gpr {
                    let i = (r0 + r) * gpr + g;
                    let scale = _mm256_set1_ps(f16_bits_to_f32(scales[i].to_bits()));
                    let zero = _mm256_set1_ps(zeros.map_or(8.0, |z| z[i] as f32));
                    for c in (g * group..((g + 1) * group).min(cols)).step_by(32) {
                        // 16 bytes at c / 2 lie in the row (c + 32 <= cols).
                        let w = int4_block_avx2(rp.wrapping_add(c / 2), zero, scale);
                        for (j, wj) in w.into_iter().enumerate() {
                            fma_all!(wj, c + 8 * j);
                        }
                    }
                }
            }
        }
        for (t, a) in acc.iter().enumerate() {
            out.write(t, r, hsum256(*a) * post_scale);
        }
    }
}

// INT8-activation (W8A8, W4A8) kernels. Per block of 32 inputs the product is an exact integer dot product
// (`maddubs`: unsigned x signed bytes into i16 pairs, then `madd` against ones into eight i32 lanes), which
// is converted once and scaled by the block's activation scale: one FMA per 32 weights instead of four, and
// the weights are never widened to f32. The products cannot overflow: |w| <= 128 and |q| <= 127 give i16
// pairs of at most 2 * 128 * 127 = 32512; INT4 nibbles give at most 2 * 15 * 127.

/// INT8 row · `NT` tokens' INT8 activations (codes `q`, one scale per 32 in `d`), before the row scale: one
/// token in decode, up to four in a batch step or a prefill chunk, each 32-byte weight block loaded and made
/// unsigned once for all of them (`maddubs` and `vpdpbusd` want an unsigned left operand: |w| with the sign
/// of w moved onto q leaves each product unchanged). `dot(u, s)` sums the byte products four to an i32 lane
/// (AVX2: `maddubs` then `madd`, exact since pairs stay below 2 * 127 * 127; VNNI: `vpdpbusd`), the same
/// lanes either way. Per token the arithmetic is the same whatever `NT` (exact block products, even blocks
/// into one accumulator and odd into the other), so a token's result in a batch is bit for bit its result
/// alone: batch invariance holds.
///
/// # Safety
/// The caller has AVX2 and FMA, and whatever `dot` uses.
#[inline(always)]
unsafe fn i8_q8_body<const NT: usize>(
    row: &[u8],
    q: [&[i8]; NT],
    d: [&[f32]; NT],
    dot: impl Fn(__m256i, __m256i) -> __m256i,
) -> [f32; NT] {
    let n = row.len() / 32;
    assert!(q.iter().all(|q| q.len() >= n * 32) && d.iter().all(|d| d.len() >= n), "dot_i8_q8_multi shapes");
    let rp = row.as_ptr();
    // SAFETY (whole body): b < n wherever a block is read, so 32 bytes at b * 32 lie in the row and in every
    // token's codes (asserted above); loads are unaligned; the caller guarantees the CPU features.
    unsafe {
        // Macros, not closures: see `i4_q8_body`.
        macro_rules! weights {
            ($b:expr) => {{
                let w = _mm256_loadu_si256(rp.add($b * 32) as *const __m256i);
                (_mm256_sign_epi8(w, w), w)
            }};
        }
        macro_rules! product {
            ($w:expr, $qt:expr, $b:expr) => {{
                let (wabs, w): (__m256i, __m256i) = $w;
                let qv = _mm256_loadu_si256($qt.as_ptr().add($b * 32) as *const __m256i);
                _mm256_cvtepi32_ps(dot(wabs, _mm256_sign_epi8(qv, w)))
            }};
        }
        let mut acc0 = [_mm256_setzero_ps(); NT];
        let mut acc1 = [_mm256_setzero_ps(); NT];
        let mut b = 0;
        while b + 2 <= n {
            let (w0, w1) = (weights!(b), weights!(b + 1));
            for t in 0..NT {
                acc0[t] = _mm256_fmadd_ps(_mm256_set1_ps(d[t][b]), product!(w0, q[t], b), acc0[t]);
                acc1[t] = _mm256_fmadd_ps(_mm256_set1_ps(d[t][b + 1]), product!(w1, q[t], b + 1), acc1[t]);
            }
            b += 2;
        }
        if b < n {
            let w0 = weights!(b);
            for t in 0..NT {
                acc0[t] = _mm256_fmadd_ps(_mm256_set1_ps(d[t][b]), product!(w0, q[t], b), acc0[t]);
            }
        }
        let mut out = [0.0f32; NT];
        for t in 0..NT {
            out[t] = hsum256(_mm256_add_ps(acc0[t], acc1[t]));
        }
        out
    }
}

/// [`i8_q8_body`] with AVX2's `maddubs` + `madd`.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn dot_i8_q8_multi_avx2<const NT: usize>(row: &[u8], q: [&[i8]; NT], d: [&[f32]; NT]) -> [f32; NT] {
    let dot = |u: __m256i, s: __m256i| _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
    // SAFETY: this function has the body's features.
    unsafe { i8_q8_body(row, q, d, dot) }
}

/// [`i8_q8_body`] with AVX-512 VNNI's `vpdpbusd` (256 bits wide): the same lanes, so the same bits.
#[target_feature(enable = "avx512vnni,avx512vl,avx2,fma")]
pub(crate) fn dot_i8_q8_multi_vnni<const NT: usize>(row: &[u8], q: [&[i8]; NT], d: [&[f32]; NT]) -> [f32; NT] {
    let dot = |u: __m256i, s: __m256i| _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
    // SAFETY: this function has the body's features and VNNI for `dot`.
    unsafe { i8_q8_body(row, q, d, dot) }
}

/// Integer products of INT4 blocks with INT8 activations: `pair(lo, hi, q0, q1)` returns eight i32 lanes
/// holding `lo . q0 + hi . q1` summed four bytes to a lane (`lo`, `hi` unsigned nibbles, `q0`, `q1` signed
/// codes), which is exact either way: `maddubs` pairs stay below 2 * 15 * 127 and their sum below i16::MAX.
/// AVX2 multiplies and widens in three steps; AVX-512 VNNI's `vpdpbusd` does it in one per operand pair.
/// Both give the same lanes, so the two kernels agree bit for bit.
macro_rules! i4_pair_avx2 {
    () => {
        |lo: __m256i, hi: __m256i, q0: __m256i, q1: __m256i| {
            let sum16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, q0), _mm256_maddubs_epi16(hi, q1));
            _mm256_madd_epi16(sum16, _mm256_set1_epi16(1))
        }
    };
}
macro_rules! i4_pair_vnni {
    () => {
        |lo: __m256i, hi: __m256i, q0: __m256i, q1: __m256i| {
            _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, q0), hi, q1)
        }
    };
}

/// One INT4 row for the W4A8 kernels: its bytes (16 per block of 32), f16 group scales as bits, zero points
/// (None: symmetric, zero point 8) and group size.
#[derive(Clone, Copy)]
pub(crate) struct I4Row<'a> {
    pub bytes: &'a [u8],
    pub scales: &'a [u16],
    pub zeros: Option<&'a [u8]>,
    pub group: usize,
}

/// One token's input for the INT4 integer kernels (`packed_kernels::IntInput`): codes `q` (pair order for
/// the row kernels, column order for the interleaved ones), `d` one scale per block; `gzero[g]` = sum over
/// group g's blocks of d_b * sum(x_b), for asymmetric rows; `corr`, for symmetric rows, eight i32 lanes per
/// pair of blocks (and for an unpaired last block) holding 8 * sum(x_b) of the pair's first block in lane 0
/// and of its second in lane 4. INT8 activations: `x_b = q_b` and `lo` is empty. A bf16 input as 16-bit
/// fixed point (the interleaved kernels' [`dot_i4x8_fixed16_avx2`]): `x_b = 256 q_b + lo_b`, `q` the signed
/// high bytes and `lo` the unsigned low bytes.
#[derive(Clone, Copy)]
pub(crate) struct I4Act<'a> {
    pub q: &'a [i8],
    pub lo: &'a [u8],
    pub d: &'a [f32],
    pub gzero: &'a [f32],
    pub corr: &'a [i32],
}

/// The f16 scale bits of blocks `$b .. $b + $nb` (`$nb` <= 8, zero past it; block i in group `i >> $shift`)
/// as eight 16-bit lanes built in registers: a vector load from eight scalar stores would wait on store
/// forwarding (it cost a fifth of the kernel's time).
macro_rules! scale_bits8 {
    ($scales:expr, $b:expr, $nb:expr, $shift:expr) => {{
        let s = |i: usize| if i < $nb { $scales[($b + i) >> $shift] as i16 } else { 0 };
        _mm_setr_epi16(s(0), s(1), s(2), s(3), s(4), s(5), s(6), s(7))
    }};
}

/// The body of [`dot_i4_q8_avx2`] and [`dot_i4_q8_vnni`]: one INT4 row against `NT` tokens' INT8 activations.
///
/// The activations come in the pair order of `packed_kernels::prepare_q8`: for blocks 2p and 2p + 1 (64
/// codes at 64 p) the even elements of both blocks, then their odd elements, so one 32-byte load of the
/// row (two blocks of 16 bytes) splits into low nibbles (both blocks' even elements) and high nibbles (their
/// odd elements) that meet 32 contiguous codes each; a last unpaired block keeps evens then odds. Lanes 0-3
/// of a pair's product belong to its first block and lanes 4-7 to its second, so one multiply by the
/// blocks' scales (group scale times activation scale, permuted into place) and one FMA apply both.
///
/// The zero point: a symmetric row's is 8 for every group, so `corr` subtracts 8 * sum(q_b) from each
/// block's integer product before the conversion, and the block contributes s * d_b * ((n - 8) . q_b)
/// exactly as integers. An asymmetric row's zero points vary per group; the term `s_g * z_g * gzero[g]` is
/// subtracted once per row, eight groups at a time.
///
/// Each token's arithmetic (pairs alternating between two accumulators) does not depend on `NT`: a token's
/// result is the same in a batch as alone.
///
/// # Safety
/// The caller has AVX2, FMA and F16C, and whatever `pair` uses.
#[inline(always)]
unsafe fn i4_q8_body<const NT: usize>(
    row: I4Row<'_>,
    act: [I4Act<'_>; NT],
    pair: impl Fn(__m256i, __m256i, __m256i, __m256i) -> __m256i,
) -> [f32; NT] {
    let I4Row { bytes, scales, zeros, group } = row;
    let n = bytes.len() / 16;
    let per_group = group / 32;
    let ng = scales.len();
    assert!(
        per_group.is_power_of_two()
            && ng * per_group >= n
            && zeros.is_none_or(|z| z.len() >= ng)
            && act.iter().all(|a| a.q.len() >= n * 32 && a.d.len() >= n)
            && act.iter().all(|a| if zeros.is_some() {
                a.gzero.len() >= ng
            } else {
                a.corr.len() >= 8 * n.div_ceil(2)
            }),
        "dot_i4_q8 shapes"
    );
    let shift = per_group.trailing_zeros();
    // SAFETY (whole body): every pointer offset below is bounded by the lengths asserted above (pair or
    // block b of n: 16 bytes at 16 b of the row, 32 codes at 32 b, 8 corrections at 4 b); loads are unaligned;
    // the caller guarantees the CPU features.
    unsafe {
        let mut zero_part = [0.0f32; NT];
        if let Some(z) = zeros {
            let mut zacc = [_mm256_setzero_ps(); NT];
            let mut g = 0;
            while g + 8 <= ng {
                let s = _mm256_cvtph_ps(_mm_loadu_si128(scales.as_ptr().add(g) as *const __m128i));
                let zv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(z.as_ptr().add(g) as *const __m128i)));
                let sz = _mm256_mul_ps(s, zv);
                for t in 0..NT {
                    zacc[t] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(act[t].gzero.as_ptr().add(g)), zacc[t]);
                }
                g += 8;
            }
            for t in 0..NT {
                zero_part[t] = hsum256(zacc[t]);
            }
            for g in g..ng {
                let sz = f16_bits_to_f32(scales[g]) * z[g] as f32;
                for (zp, a) in zero_part.iter_mut().zip(&act) {
                    *zp += sz * a.gzero[g];
                }
            }
        }
        // The integer product of the pair or block at `$b` for token `$t`, corrected for a symmetric zero
        // point. Macros, not closures, here and below: a closure LLVM declines to inline is compiled without
        // the caller's CPU features, and its intrinsics become calls (4 tokens/s instead of 90).
        macro_rules! product {
            ($t:expr, $b:expr, $lo:expr, $hi:expr, $q1:expr) => {{
                let qp = act[$t].q.as_ptr().add($b * 32) as *const __m256i;
                let q1 = if $q1 { _mm256_loadu_si256(qp.add(1)) } else { _mm256_setzero_si256() };
                let p = pair($lo, $hi, _mm256_loadu_si256(qp), q1);
                let p = match zeros {
                    Some(_) => p,
                    None => {
                        _mm256_sub_epi32(p, _mm256_loadu_si256(act[$t].corr.as_ptr().add($b * 4) as *const __m256i))
                    }
                };
                _mm256_cvtepi32_ps(p)
            }};
        }
        let rp = bytes.as_ptr();
        let mask = _mm256_set1_epi8(0x0f);
        // Lane i of the pair's product takes the scale of block i / 4 of the pair: pair k of eight blocks
        // reads scales 2k and 2k + 1.
        let idx = [
            _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
            _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
            _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5),
            _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7),
        ];
        let mut acc0 = [_mm256_setzero_ps(); NT];
        let mut acc1 = [_mm256_setzero_ps(); NT];
        // `$npairs` pairs from block `$b`, with the scales `$bs` of blocks `$b..` (group scale times
        // activation scale, one vector per token).
        macro_rules! pairs {
            ($b:expr, $bs:expr, $npairs:expr) => {
                for (k, &spread_k) in idx[..$npairs].iter().enumerate() {
                    let bb = $b + 2 * k;
                    let w = _mm256_loadu_si256(rp.add(bb * 16) as *const __m256i);
                    let (lo, hi) = (_mm256_and_si256(w, mask), _mm256_and_si256(_mm256_srli_epi16(w, 4), mask));
                    for t in 0..NT {
                        let scale = _mm256_permutevar8x32_ps($bs[t], spread_k);
                        if k % 2 == 0 {
                            acc0[t] = _mm256_fmadd_ps(scale, product!(t, bb, lo, hi, true), acc0[t]);
                        } else {
                            acc1[t] = _mm256_fmadd_ps(scale, product!(t, bb, lo, hi, true), acc1[t]);
                        }
                    }
                }
            };
        }
        // Eight blocks at a time: their scales in one conversion and one multiply per token.
        let mut b = 0;
        while b + 8 <= n {
            let s8 = if per_group == 1 {
                _mm256_cvtph_ps(_mm_loadu_si128(scales.as_ptr().add(b) as *const __m128i))
            } else {
                _mm256_cvtph_ps(scale_bits8!(scales, b, 8, shift))
            };
            let mut bs = [_mm256_setzero_ps(); NT];
            for t in 0..NT {
                bs[t] = _mm256_mul_ps(s8, _mm256_loadu_ps(act[t].d.as_ptr().add(b)));
            }
            pairs!(b, bs, 4);
            b += 8;
        }
        if b < n {
            // The last 1-7 blocks the same way, their scales zero past the end (a masked load of the
            // activation scales); then an unpaired last block.
            let nb = n - b;
            let s8 = _mm256_cvtph_ps(scale_bits8!(scales, b, nb, shift));
            let live = _mm256_cmpgt_epi32(_mm256_set1_epi32(nb as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            let mut bs = [_mm256_setzero_ps(); NT];
            for t in 0..NT {
                bs[t] = _mm256_mul_ps(s8, _mm256_maskload_ps(act[t].d.as_ptr().add(b), live));
            }
            pairs!(b, bs, nb / 2);
            if nb % 2 == 1 {
                // Evens then odds of its own: all eight lanes belong to it.
                let bl = n - 1;
                let bytes = _mm_loadu_si128(rp.add(bl * 16) as *const __m128i);
                let m128 = _mm_set1_epi8(0x0f);
                let nib = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), m128), _mm_and_si128(bytes, m128));
                let last = _mm256_set1_epi32(nb as i32 - 1);
                for t in 0..NT {
                    let scale = _mm256_permutevar8x32_ps(bs[t], last);
                    acc1[t] = _mm256_fmadd_ps(scale, product!(t, bl, nib, _mm256_setzero_si256(), false), acc1[t]);
                }
            }
        }
        let mut out = [0.0f32; NT];
        for t in 0..NT {
            out[t] = hsum256(_mm256_add_ps(acc0[t], acc1[t])) - zero_part[t];
        }
        out
    }
}

/// INT4 row · `NT` tokens' INT8 activations (see [`i4_q8_body`]): the group contributes
/// s_g * sum_b d_b * ((n - z_g) . q_b).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_i4_q8_avx2<const NT: usize>(row: I4Row<'_>, act: [I4Act<'_>; NT]) -> [f32; NT] {
    // SAFETY: this function has the body's features; `pair` uses AVX2 only.
    unsafe { i4_q8_body(row, act, i4_pair_avx2!()) }
}

/// [`dot_i4_q8_avx2`] with AVX-512 VNNI's `vpdpbusd` (256 bits wide): the same lanes, so the same bits.
#[target_feature(enable = "avx512vnni,avx512vl,avx2,fma,f16c")]
pub(crate) fn dot_i4_q8_vnni<const NT: usize>(row: I4Row<'_>, act: [I4Act<'_>; NT]) -> [f32; NT] {
    // SAFETY: this function has the body's features and VNNI for `pair`.
    unsafe { i4_q8_body(row, act, i4_pair_vnni!()) }
}

/// Eight interleaved INT4 rows for the W4A8 kernels (`PackedLayout::Int4Rows8`): the row group's 128 bytes
/// per block of 32 columns, and its f16 scale bits and zero points (None: symmetric), eight per weight group.
#[derive(Clone, Copy)]
pub(crate) struct I4Rows8<'a> {
    pub bytes: &'a [u8],
    pub scales: &'a [u16],
    pub zeros: Option<&'a [u8]>,
    pub group: usize,
}

/// `acc + lo . q0 + hi . q1` per i32 lane, four u8 x i8 products per lane and input pair, with AVX2
/// (`maddubs` sums two products into i16 lanes, which cannot saturate for 4-bit weights: 4 x 15 x 127 fits)
/// or with VNNI's `vpdpbusd`; the sums are exact integers, so the two give the same bits.
macro_rules! i4x8_pair_avx2 {
    () => {
        |acc: __m256i, lo: __m256i, hi: __m256i, q0: __m256i, q1: __m256i| {
            let sum16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, q0), _mm256_maddubs_epi16(hi, q1));
            _mm256_add_epi32(acc, _mm256_madd_epi16(sum16, _mm256_set1_epi16(1)))
        }
    };
}
macro_rules! i4x8_pair_vnni {
    () => {
        |acc: __m256i, lo: __m256i, hi: __m256i, q0: __m256i, q1: __m256i| {
            _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc, lo, q0), hi, q1)
        }
    };
}

/// The body of [`dot_i4x8_q8_avx2`], [`dot_i4x8_q8_vnni`] and (`FIXED16`) [`dot_i4x8_fixed16_avx2`]: eight
/// interleaved INT4 rows against `NT` tokens' integer inputs in column order, one output row per vector lane.
///
/// A block's four 32-byte runs split into low nibbles (for each row, 4 codes of columns `4 v ..` of the
/// block) and high nibbles (columns `16 + 4 v ..`); each meets the token's 4 codes of those columns
/// broadcast to every lane, so a run's two multiply-adds give all eight rows their products, with no
/// horizontal sums and one scale multiply per block for the eight rows. A symmetric row's zero point 8 is the
/// exact integer correction 8 * sum(x_b) per block (`corr`, the same for every row); an asymmetric row's is
/// the float term `s_g * z_g * gzero[g]` per group, as in [`i4_q8_body`].
///
/// `FIXED16`: the input is 16-bit, `x = 256 q + lo` ([`I4Act`]), and a block's exact integer product is
/// `256 (n . q) + n . lo`. The high bytes are signed, so they take `maddubs`'s signed operand as INT8 codes
/// do; the low bytes are unsigned, so they take the unsigned one and the nibbles (0..15, valid as signed
/// bytes) the signed one. Both sums accumulate in i16 lanes before one widening each: the high bytes' 16
/// products per lane stay within 16 * 15 * 128 = 30720, the low bytes' within 8 * 15 * 255 = 30600 per half
/// block; the block's i32 total, at most 32 * 15 * 32768 < 2^24, converts to f32 exactly.
///
/// Each token's arithmetic (blocks in order into one accumulator) does not depend on `NT`.
///
/// # Safety
/// The caller has AVX2, FMA and F16C, and whatever `pair` uses.
#[inline(always)]
unsafe fn i4x8_body<const NT: usize, const FIXED16: bool>(
    rows: I4Rows8<'_>,
    act: [I4Act<'_>; NT],
    pair: impl Fn(__m256i, __m256i, __m256i, __m256i, __m256i) -> __m256i,
    out: OutPtr,
    (t0, r): (usize, usize),
) {
    let I4Rows8 { bytes, scales, zeros, group } = rows;
    let n = bytes.len() / 128;
    let per_group = group / 32;
    let ng = n.div_ceil(per_group.max(1));
    assert!(
        per_group >= 1
            && scales.len() >= 8 * ng
            && zeros.is_none_or(|z| z.len() >= 8 * ng)
            && act.iter().all(|a| a.q.len() >= n * 32 && a.d.len() >= n && (!FIXED16 || a.lo.len() >= n * 32))
            && act.iter().all(|a| if zeros.is_some() {
                a.gzero.len() >= ng
            } else {
                a.corr.len() >= 8 * n.div_ceil(2)
            }),
        "dot_i4x8_q8 shapes"
    );
    // SAFETY (whole body): block b < n reads 128 bytes at 128 b, codes 32 b .. 32 b + 32, scale b and the
    // correction at 8 (b / 2) + 4 (b % 2); group g < ng reads 8 scales and zero points at 8 g: all within the
    // lengths asserted above; loads are unaligned; the caller guarantees the CPU features.
    unsafe {
        let mask = _mm256_set1_epi8(0x0f);
        let mut acc = [_mm256_setzero_ps(); NT];
        let mut zacc = [_mm256_setzero_ps(); NT];
        for g in 0..ng {
            let s = _mm256_cvtph_ps(_mm_loadu_si128(scales.as_ptr().add(8 * g) as *const __m128i));
            for b in g * per_group..n.min((g + 1) * per_group) {
                let wp = bytes.as_ptr().add(128 * b) as *const __m256i;
                let (w0, w1) = (_mm256_loadu_si256(wp), _mm256_loadu_si256(wp.add(1)));
                let (w2, w3) = (_mm256_loadu_si256(wp.add(2)), _mm256_loadu_si256(wp.add(3)));
                // Macros, not closures: see `i4_q8_body`.
                macro_rules! lo {
                    ($w:expr) => {
                        _mm256_and_si256($w, mask)
                    };
                }
                macro_rules! hi {
                    ($w:expr) => {
                        _mm256_and_si256(_mm256_srli_epi16($w, 4), mask)
                    };
                }
                let (l0, l1, l2, l3) = (lo!(w0), lo!(w1), lo!(w2), lo!(w3));
                let (h0, h1, h2, h3) = (hi!(w0), hi!(w1), hi!(w2), hi!(w3));
                for t in 0..NT {
                    let qp = act[t].q.as_ptr().add(32 * b) as *const i32;
                    macro_rules! q4 {
                        ($k:expr) => {
                            _mm256_set1_epi32(qp.add($k).read_unaligned())
                        };
                    }
                    let mut p = if FIXED16 {
                        let lp = act[t].lo.as_ptr().add(32 * b) as *const i32;
                        macro_rules! lo4 {
                            ($k:expr) => {
                                _mm256_set1_epi32(lp.add($k).read_unaligned())
                            };
                        }
                        let (ub, add16) = (_mm256_maddubs_epi16, _mm256_add_epi16);
                        let high = add16(
                            add16(add16(ub(l0, q4!(0)), ub(h0, q4!(4))), add16(ub(l1, q4!(1)), ub(h1, q4!(5)))),
                            add16(add16(ub(l2, q4!(2)), ub(h2, q4!(6))), add16(ub(l3, q4!(3)), ub(h3, q4!(7)))),
                        );
                        let low0 =
                            add16(add16(ub(lo4!(0), l0), ub(lo4!(4), h0)), add16(ub(lo4!(1), l1), ub(lo4!(5), h1)));
                        let low1 =
                            add16(add16(ub(lo4!(2), l2), ub(lo4!(6), h2)), add16(ub(lo4!(3), l3), ub(lo4!(7), h3)));
                        let one = _mm256_set1_epi16(1);
                        _mm256_add_epi32(
                            _mm256_madd_epi16(high, _mm256_set1_epi16(256)),
                            _mm256_add_epi32(_mm256_madd_epi16(low0, one), _mm256_madd_epi16(low1, one)),
                        )
                    } else {
                        // Two chains of two runs each, added: shorter dependency chains than one of four.
                        let p0 = pair(pair(_mm256_setzero_si256(), l0, h0, q4!(0), q4!(4)), l1, h1, q4!(1), q4!(5));
                        let p1 = pair(pair(_mm256_setzero_si256(), l2, h2, q4!(2), q4!(6)), l3, h3, q4!(3), q4!(7));
                        _mm256_add_epi32(p0, p1)
                    };
                    if zeros.is_none() {
                        p = _mm256_sub_epi32(
                            p,
                            _mm256_set1_epi32(*act[t].corr.get_unchecked(8 * (b / 2) + 4 * (b % 2))),
                        );
                    }
                    let sd = _mm256_mul_ps(s, _mm256_set1_ps(*act[t].d.get_unchecked(b)));
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sd, acc[t]);
                }
            }
            if let Some(z) = zeros {
                let zf =
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(z.as_ptr().add(8 * g) as *const __m128i)));
                let sz = _mm256_mul_ps(s, zf);
                for t in 0..NT {
                    zacc[t] = _mm256_fmadd_ps(sz, _mm256_set1_ps(*act[t].gzero.get_unchecked(g)), zacc[t]);
                }
            }
        }
        for t in 0..NT {
            // Rows r .. r + 8 of token t0 + t are contiguous in the output.
            _mm256_storeu_ps(out.rows_ptr(t0 + t, r, 8), _mm256_sub_ps(acc[t], zacc[t]));
        }
    }
}

/// Eight interleaved INT4 rows · `NT` tokens' INT8 activations (see [`i4x8_body`]), stored as rows
/// `r .. r + 8` of tokens `t0 .. t0 + NT` of `out`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_i4x8_q8_avx2<const NT: usize>(
    rows: I4Rows8<'_>,
    act: [I4Act<'_>; NT],
    out: OutPtr,
    at: (usize, usize),
) {
    // SAFETY: this function has the body's features; `pair` uses AVX2 only.
    unsafe { i4x8_body::<NT, false>(rows, act, i4x8_pair_avx2!(), out, at) }
}

/// Eight interleaved INT4 rows · `NT` tokens' bf16 inputs held as 16-bit fixed point (`I4Act` with `lo`;
/// see [`i4x8_body`]), stored as rows `r .. r + 8` of tokens `t0 .. t0 + NT` of `out`: the weight-only INT4
/// tiers' AVX2 product, in integers as the W4A8 kernels, at about twice their multiply-adds.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_i4x8_fixed16_avx2<const NT: usize>(
    rows: I4Rows8<'_>,
    act: [I4Act<'_>; NT],
    out: OutPtr,
    at: (usize, usize),
) {
    // SAFETY: this function has the body's features; the fixed-point products use AVX2 only.
    unsafe { i4x8_body::<NT, true>(rows, act, i4x8_pair_avx2!(), out, at) }
}

/// [`dot_i4x8_q8_avx2`] with AVX-512 VNNI's `vpdpbusd` (256 bits wide): the same integers, so the same bits.
#[target_feature(enable = "avx512vnni,avx512vl,avx2,fma,f16c")]
pub(crate) fn dot_i4x8_q8_vnni<const NT: usize>(
    rows: I4Rows8<'_>,
    act: [I4Act<'_>; NT],
    out: OutPtr,
    at: (usize, usize),
) {
    // SAFETY: this function has the body's features and VNNI for `pair`.
    unsafe { i4x8_body::<NT, false>(rows, act, i4x8_pair_vnni!(), out, at) }
}

/// Whether the CPU has AVX-512 VNNI (with VL, for its 256-bit forms): the AVX-512 level's integer kernels
/// then use `vpdpbusd`.
pub(crate) fn has_vnni() -> bool {
    is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
}

#[cfg(test)]
mod tests {
    use super::fp8_groups_cover;

    /// The kernels' division-free shape check agrees with `groups == cols.div_ceil(span)`.
    #[test]
    fn group_cover_check_equals_div_ceil() {
        for span in 1..70 {
            for cols in 0..300 {
                for groups in 0..12 {
                    assert_eq!(
                        fp8_groups_cover(groups, span, cols),
                        groups == cols.div_ceil(span),
                        "{groups} {span} {cols}"
                    );
                }
            }
        }
        assert!(!fp8_groups_cover(1, 0, 0));
        assert!(!fp8_groups_cover(usize::MAX, 2, 4));
    }
}

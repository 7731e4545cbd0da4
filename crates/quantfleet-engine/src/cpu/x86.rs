//! Hand-written x86 kernels for the decode dot products (Q4_1 and Q8_0 weights against f32 activations).
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

/// Prefill micro-kernel: dot products of 4 dequantized weight rows with 4 activation rows, `k` a multiple of
/// 16. 16 accumulators + 4 weight + 4 activation vectors = 24 of the 32 zmm registers, so nothing spills
/// (the portable version spills its lane arrays to the stack); 8 loads feed 16 FMAs per step.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
pub(crate) fn kernel_4x4_avx512(w: [&[f32]; 4], x: [&[f32]; 4], k: usize) -> [[f32; 4]; 4] {
    assert!(k.is_multiple_of(16) && w.iter().chain(&x).all(|s| s.len() >= k), "kernel_4x4 shapes");
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let (w0, w1, w2, w3) = (w[0].as_ptr(), w[1].as_ptr(), w[2].as_ptr(), w[3].as_ptr());
    let (x0, x1, x2, x3) = (x[0].as_ptr(), x[1].as_ptr(), x[2].as_ptr(), x[3].as_ptr());
    let mut c = 0;
    // Plain loads and loops (no closures): debug-profile test builds do not inline closures, and the
    // engine's tests run this kernel on the real model.
    while c < k {
        // SAFETY: c + 16 <= k <= every slice's length (asserted above).
        let (wv, xv) = unsafe {
            (
                [
                    _mm512_loadu_ps(w0.add(c)),
                    _mm512_loadu_ps(w1.add(c)),
                    _mm512_loadu_ps(w2.add(c)),
                    _mm512_loadu_ps(w3.add(c)),
                ],
                [
                    _mm512_loadu_ps(x0.add(c)),
                    _mm512_loadu_ps(x1.add(c)),
                    _mm512_loadu_ps(x2.add(c)),
                    _mm512_loadu_ps(x3.add(c)),
                ],
            )
        };
        for r in 0..4 {
            for t in 0..4 {
                acc[r][t] = _mm512_fmadd_ps(wv[r], xv[t], acc[r][t]);
            }
        }
        c += 16;
    }
    let mut out = [[0.0f32; 4]; 4];
    for r in 0..4 {
        for t in 0..4 {
            out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
    out
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
            for (r, &v) in lanes.iter().enumerate().take(nr) {
                out.write(t + j, r, v);
            }
        }
        t += n;
    }
}

/// `NT` tokens (`x`, NT x k) against the k-major 32-row tile; returns [token][row] (6 rows of 32 at most).
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

//! Row dot products between a weight row kept in its GGUF block format and f32 activations, used for
//! matrix-vector products (decode, one token). Weights stay quantized in memory: decode is bandwidth bound, so
//! reading 20 bytes per 32 Q4_1 weights instead of 128 bytes of f32 is the whole point.
//!
//! `dot_row_reference` is the slow, obviously-correct scalar reference (dequantize, then sum in f64); the
//! `*_fast` kernels are written as fixed 16-lane loops that LLVM vectorizes, and are compiled several times
//! (`simd.rs`) with AVX-512 / AVX2+FMA enabled and selected at run time. Tests compare them with the reference.

use crate::dtype::{GgmlType, dequantize_row_reference, f16_at};

/// Scalar reference: dequantize the row and sum `w * x` in f64.
pub fn dot_row_reference(ty: GgmlType, row: &[u8], x: &[f32]) -> crate::Result<f32> {
    let mut w = vec![0.0f32; x.len()];
    dequantize_row_reference(ty, row, &mut w)?;
    Ok(w.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() as f32)
}

/// Sum of each 32-element block of `x`: Q4_1's per-block minimum multiplies the block's activation sum, so
/// computing these once per matrix-vector product halves the work per row.
pub fn block_sums(x: &[f32], out: &mut [f32]) {
    for (o, xb) in out.iter_mut().zip(x.chunks_exact(32)) {
        *o = xb.iter().sum();
    }
}

#[inline(always)]
fn hsum16(v: [f32; 16]) -> f32 {
    // Pairwise reduction: same cost as a serial sum once vectorized, and better rounding.
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

/// Q4_1 row · x. `xsum[b]` is the sum of block b of x. Shapes: row = K/32 blocks of 20 bytes, x = K floats.
#[inline(always)]
pub(crate) fn dot_q4_1_fast(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    // Fixed-size array views remove bounds checks so the 16-lane loops compile to whole-register operations.
    let mut acc = [0.0f32; 16];
    let mut min_part = 0.0f32;
    for ((blk, xb), &xs) in row.chunks_exact(20).zip(x.chunks_exact(32)).zip(xsum) {
        let blk: &[u8; 20] = blk.try_into().unwrap();
        let xb: &[f32; 32] = xb.try_into().unwrap();
        let d = f16_at(blk);
        let m = f16_at(&blk[2..4]);
        let mut s = [0.0f32; 16];
        for j in 0..16 {
            let q = blk[4 + j];
            s[j] = (q & 0x0f) as f32 * xb[j] + (q >> 4) as f32 * xb[16 + j];
        }
        for j in 0..16 {
            acc[j] += d * s[j];
        }
        min_part += m * xs;
    }
    hsum16(acc) + min_part
}

/// Q8_0 row · x. Shapes: row = K/32 blocks of 34 bytes, x = K floats.
#[inline(always)]
pub(crate) fn dot_q8_0_fast(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 32];
    for (blk, xb) in row.chunks_exact(34).zip(x.chunks_exact(32)) {
        let blk: &[u8; 34] = blk.try_into().unwrap();
        let xb: &[f32; 32] = xb.try_into().unwrap();
        let d = f16_at(blk);
        for j in 0..32 {
            acc[j] += d * ((blk[2 + j] as i8) as f32 * xb[j]);
        }
    }
    let mut half = [0.0f32; 16];
    for j in 0..16 {
        half[j] = acc[j] + acc[j + 16];
    }
    hsum16(half)
}

/// f32 row · x (row as little-endian bytes, possibly unaligned inside the file).
#[inline(always)]
pub(crate) fn dot_f32_fast(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut rows = row.chunks_exact(64);
    let mut xs = x.chunks_exact(16);
    for (r, xc) in (&mut rows).zip(&mut xs) {
        for j in 0..16 {
            let w = f32::from_le_bytes([r[4 * j], r[4 * j + 1], r[4 * j + 2], r[4 * j + 3]]);
            acc[j] += w * xc[j];
        }
    }
    let tail: f32 = rows
        .remainder()
        .chunks_exact(4)
        .zip(xs.remainder())
        .map(|(c, &xv)| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * xv)
        .sum();
    hsum16(acc) + tail
}

/// Types without a dedicated kernel (F16, BF16): dequantize 32 elements at a time, then dot.
#[inline(always)]
pub(crate) fn dot_generic(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    let per = ty.row_bytes(32).expect("computable types have 32-element rows") as usize;
    let mut w = [0.0f32; 32];
    let mut acc = 0.0f32;
    let mut chunks = row.chunks_exact(per);
    let mut xs = x.chunks_exact(32);
    for (c, xc) in (&mut chunks).zip(&mut xs) {
        // Cannot fail: the chunk holds exactly 32 elements of a computable type.
        let _ = dequantize_row_reference(ty, c, &mut w);
        acc += w.iter().zip(xc).map(|(a, b)| a * b).sum::<f32>();
    }
    let tail_len = xs.remainder().len();
    if tail_len > 0 {
        let _ = dequantize_row_reference(ty, chunks.remainder(), &mut w[..tail_len]);
        acc += w[..tail_len].iter().zip(xs.remainder()).map(|(a, b)| a * b).sum::<f32>();
    }
    acc
}

//! The orthonormal Walsh-Hadamard rotation used by the per-token quantized KV caches (the idea of QuaRot,
//! Ashkboos et al. 2024, applied to the cache alone).
//!
//! Attention only needs dot products of a query with the keys and a weighted sum of the values, and an
//! orthonormal `R` keeps both: `(R q) . (R k) = q . k` and `sum p_i (R v_i) = R (sum p_i v_i)`. So a cache may
//! store `R k` and `R v` if the queries are rotated the same way and the output is rotated back. What that
//! buys is in the rounding: keys have a few outlier channels, large in the queries too, and the error a
//! per-token format puts on a score, `sum_d q_d e_d`, is dominated by those channels (FP8: `e_d` grows with
//! `|k_d|`; INT8/INT4: the outlier sets the step size of every channel). `R` spreads each channel over all of
//! them, so no channel dominates either product.
//!
//! `R` is the Sylvester Hadamard matrix scaled by `1 / sqrt(b)`, applied to each block of `b` values, `b` the
//! largest power of two dividing the vector's length (64 for a 64-wide head; 16 for an 80-wide one). It is
//! symmetric and orthonormal, so it is its own inverse, and costs `b log2 b` additions per block.

/// Length of the Hadamard blocks [`rotate`] uses on a vector of `len` values: the largest power of two that
/// divides `len` (1 for an odd length, where the rotation is the identity).
pub fn block_len(len: usize) -> usize {
    if len == 0 { 1 } else { 1 << len.trailing_zeros() }
}

/// In place, `x <- R x`: every block of [`block_len`]`(x.len())` values is multiplied by the normalized
/// Hadamard matrix. Applying it twice gives `x` back (up to f32 rounding).
pub fn rotate(x: &mut [f32]) {
    let b = block_len(x.len());
    if b == 1 {
        return;
    }
    let norm = 1.0 / (b as f32).sqrt();
    for block in x.chunks_exact_mut(b) {
        let mut h = 1;
        while h < b {
            for pair in block.chunks_exact_mut(2 * h) {
                let (lo, hi) = pair.split_at_mut(h);
                for (a, c) in lo.iter_mut().zip(hi) {
                    (*a, *c) = (*a + *c, *a - *c);
                }
            }
            h *= 2;
        }
        block.iter_mut().for_each(|v| *v *= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entry (i, j) of the unnormalized Sylvester Hadamard matrix: (-1)^popcount(i & j).
    fn sylvester(i: usize, j: usize) -> f32 {
        if (i & j).count_ones().is_multiple_of(2) { 1.0 } else { -1.0 }
    }

    #[test]
    fn block_lengths() {
        assert_eq!([64, 128, 80, 96, 7, 0].map(block_len), [64, 128, 16, 32, 1, 1]);
    }

    #[test]
    fn rotation_is_the_normalized_hadamard_matrix_per_block() {
        // 24 values: three blocks of 8, each its own product.
        let x: Vec<f32> = (0..24).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.37).collect();
        let mut y = x.clone();
        rotate(&mut y);
        for (blk, (xb, yb)) in x.chunks(8).zip(y.chunks(8)).enumerate() {
            for (i, &got) in yb.iter().enumerate() {
                let want: f32 = xb.iter().enumerate().map(|(j, &v)| sylvester(i, j) * v).sum::<f32>() / 8f32.sqrt();
                assert!((got - want).abs() < 1e-5, "block {blk} row {i}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn rotation_keeps_dot_products_and_undoes_itself() {
        let q: Vec<f32> = (0..64).map(|i| (i as f32 * 0.61).sin()).collect();
        let mut k: Vec<f32> = (0..64).map(|i| (i as f32 * 1.37).cos()).collect();
        k[5] = 40.0; // an outlier channel
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let (mut rq, mut rk) = (q.clone(), k.clone());
        rotate(&mut rq);
        rotate(&mut rk);
        assert!((dot(&rq, &rk) - dot(&q, &k)).abs() < 1e-4);
        // The outlier is spread: no rotated channel keeps more than a fraction of it.
        let amax = rk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(amax < 0.25 * 40.0, "{amax}");
        rotate(&mut rk);
        assert!(rk.iter().zip(&k).all(|(a, b)| (a - b).abs() < 1e-5));
    }

    #[test]
    fn odd_lengths_are_left_alone() {
        let mut x = vec![1.0, -2.0, 3.0];
        rotate(&mut x);
        assert_eq!(x, [1.0, -2.0, 3.0]);
    }
}

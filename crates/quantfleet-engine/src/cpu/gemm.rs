//! The portable prefill kernels (many tokens): a tile of weight rows, dequantized once into f32, multiplies a
//! block of activation rows. The 4x4 kernel keeps 16 accumulators of 16 lanes and loads 4 weight and 4
//! activation vectors per step: 8 loads feed 16 FMAs. x86 levels use the k-major broadcast kernels of
//! `x86.rs` instead (`matmul::gemm_dequantized`); this one serves the portable level and other targets.

/// Lanes per accumulator: one AVX-512 register of f32 (two AVX2 registers).
const L: usize = 16;

#[inline(always)]
fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    // mul_add is a single instruction only when FMA is enabled; otherwise it would be a slow libm call.
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

#[inline(always)]
fn hsum(v: &[f32; L]) -> f32 {
    let mut w = *v;
    let mut n = L;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            w[i] += w[i + n];
        }
    }
    w[0]
}

/// Dot products of `NR` weight rows with `NT` activation rows, all of length `k` (a multiple of 16).
/// `w[r]` and `x[t]` are the rows; returns `[r][t]`.
/// The portable 4x4 kernel (`kernel_4x4` argument of `gemm_tile` where no hand-written one exists).
#[inline(always)]
pub(crate) fn portable_4x4<const FMA: bool>(w: [&[f32]; 4], x: [&[f32]; 4], k: usize) -> [[f32; 4]; 4] {
    kernel::<4, 4, FMA>(w, x, k)
}

#[inline(always)]
fn kernel<const NR: usize, const NT: usize, const FMA: bool>(
    w: [&[f32]; NR],
    x: [&[f32]; NT],
    k: usize,
) -> [[f32; NT]; NR] {
    let mut acc = [[[0.0f32; L]; NT]; NR];
    let mut c = 0;
    while c + L <= k {
        let mut wv = [[0.0f32; L]; NR];
        let mut xv = [[0.0f32; L]; NT];
        for r in 0..NR {
            wv[r].copy_from_slice(&w[r][c..c + L]);
        }
        for t in 0..NT {
            xv[t].copy_from_slice(&x[t][c..c + L]);
        }
        for r in 0..NR {
            for t in 0..NT {
                for l in 0..L {
                    acc[r][t][l] = fmadd::<FMA>(wv[r][l], xv[t][l], acc[r][t][l]);
                }
            }
        }
        c += L;
    }
    let mut out = [[0.0f32; NT]; NR];
    for r in 0..NR {
        for t in 0..NT {
            out[r][t] = hsum(&acc[r][t]);
        }
    }
    out
}

/// Token block: activation rows per pass over the weight tile, sized so a block of activations
/// (64 x 1536 f32 = 384 KiB at most for this model) stays in L2 while the weight rows stream past.
const TOKEN_BLOCK: usize = 64;

/// `out[t * out_stride + r] = w_rows[r] · x[t]` for `nr` dequantized weight rows (`w`, row-major, nr x k) and
/// `nt` activation rows (`x`, nt x k). `k` must be a multiple of 16.
///
/// # Safety contract
/// `out` is written only at the given indices; the caller guarantees no other thread writes them.
#[inline(always)]
pub(crate) fn gemm_tile<const FMA: bool>(
    w: &[f32],
    nr: usize,
    x: &[f32],
    nt: usize,
    k: usize,
    out: OutPtr,
    kernel_4x4: impl Fn([&[f32]; 4], [&[f32]; 4], usize) -> [[f32; 4]; 4],
) {
    debug_assert!(k.is_multiple_of(L) && w.len() >= nr * k && x.len() >= nt * k);
    let mut t0 = 0;
    while t0 < nt {
        let t_end = (t0 + TOKEN_BLOCK).min(nt);
        let mut r = 0;
        while r + 4 <= nr {
            let wr = [row(w, k, r), row(w, k, r + 1), row(w, k, r + 2), row(w, k, r + 3)];
            let mut t = t0;
            while t + 4 <= t_end {
                let res = kernel_4x4(wr, [row(x, k, t), row(x, k, t + 1), row(x, k, t + 2), row(x, k, t + 3)], k);
                for (i, rr) in res.iter().enumerate() {
                    for (j, v) in rr.iter().enumerate() {
                        out.write(t + j, r + i, *v);
                    }
                }
                t += 4;
            }
            while t < t_end {
                let res = kernel::<4, 1, FMA>(wr, [row(x, k, t)], k);
                for (i, rr) in res.iter().enumerate() {
                    out.write(t, r + i, rr[0]);
                }
                t += 1;
            }
            r += 4;
        }
        while r < nr {
            for t in t0..t_end {
                out.write(t, r, kernel::<1, 1, FMA>([row(w, k, r)], [row(x, k, t)], k)[0][0]);
            }
            r += 1;
        }
        t0 = t_end;
    }
}

#[inline(always)]
fn row(m: &[f32], k: usize, i: usize) -> &[f32] {
    &m[i * k..(i + 1) * k]
}

/// Where a tile writes: element (t, r) goes to `base[t * stride + row0 + r]`. Tiles of one matrix product
/// cover disjoint row ranges, so concurrent tiles never write the same element.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr {
    pub base: *mut f32,
    pub stride: usize,
    pub row0: usize,
    /// Number of elements behind `base`, checked in debug builds.
    pub len: usize,
}

// SAFETY: OutPtr is only handed to tasks that write disjoint elements (distinct row ranges).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    pub fn with_row0(self, row0: usize) -> Self {
        Self { row0, ..self }
    }

    /// Writes `values` to rows `0 .. values.len()` (after `row0`) of token `t`.
    #[inline(always)]
    pub(crate) fn write_rows(&self, t: usize, values: &[f32]) {
        for (r, &v) in values.iter().enumerate() {
            self.write(t, r, v);
        }
    }

    /// A pointer to `n` consecutive rows from row `r` of token `t` (bounds checked), for vector stores.
    #[inline(always)]
    pub(crate) fn rows_ptr(&self, t: usize, r: usize, n: usize) -> *mut f32 {
        let i = t * self.stride + self.row0 + r;
        assert!(i + n <= self.len, "gemm output rows {i}..{} out of {}", i + n, self.len);
        // SAFETY: in bounds (checked above); the caller writes only this tile's rows.
        unsafe { self.base.add(i) }
    }

    #[inline(always)]
    pub(crate) fn write(&self, t: usize, r: usize, v: f32) {
        // SAFETY: `rows_ptr` checked that the element is in bounds; it belongs to this tile's rows only.
        unsafe { *self.rows_ptr(t, r, 1) = v };
    }
}

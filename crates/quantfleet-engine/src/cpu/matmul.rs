//! Matrix products `out[t] = W · x[t]` over weights in GGUF block format, parallel over output rows, with
//! run-time selection of the instruction set (AVX-512, AVX2+FMA, portable). The same kernel source is compiled
//! once per instruction set through `#[target_feature]` wrappers, so every level computes the same arithmetic.
//!
//! One token (decode): each row is dotted in block format (`dot.rs`), reading the weights once.
//! Several tokens (prefill): each task dequantizes a chunk of rows to f32 once and runs the register-blocked
//! kernels of `gemm.rs` over all tokens, amortising the dequantization.

use std::cell::RefCell;

use rayon::prelude::*;

use super::dot::{block_sums, dot_f32_fast, dot_generic, dot_q4_1_fast, dot_q8_0_fast};
use super::gemm::{OutPtr, gemm_tile, portable_4x4};
#[cfg(target_arch = "x86_64")]
use super::x86;
use crate::dtype::{GgmlType, dequantize_row_reference};

/// Instruction sets the CPU kernels are compiled for, in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    Portable,
    Avx2Fma,
    Avx512,
}

/// Environment variable capping the instruction set of the CPU kernels (`avx512`, `avx2`, `portable`; see
/// [`quantfleet_quant::simd::ISA_ENV`], which the load-time quantizers follow too).
pub use quantfleet_quant::simd::ISA_ENV;

/// The cap [`ISA_ENV`] sets as a [`SimdLevel`]: None when unset, an error naming the accepted values.
pub fn isa_cap() -> Result<Option<SimdLevel>, String> {
    quantfleet_quant::simd::isa_cap().map(|cap| cap.map(SimdLevel::from))
}

impl From<quantfleet_quant::Isa> for SimdLevel {
    fn from(isa: quantfleet_quant::Isa) -> Self {
        match isa {
            quantfleet_quant::Isa::Avx512 => SimdLevel::Avx512,
            quantfleet_quant::Isa::Avx2 => SimdLevel::Avx2Fma,
            quantfleet_quant::Isa::Scalar => SimdLevel::Portable,
        }
    }
}

impl SimdLevel {
    /// A level by its [`ISA_ENV`] name.
    pub fn parse(name: &str) -> Result<Self, String> {
        quantfleet_quant::Isa::parse(name).map(SimdLevel::from)
    }

    /// The best level this CPU supports, capped by [`ISA_ENV`].
    pub fn detect() -> Self {
        let hardware = Self::hardware();
        match isa_cap() {
            Ok(Some(cap)) => hardware.min(cap),
            _ => hardware,
        }
    }

    /// The best level this CPU supports.
    fn hardware() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return SimdLevel::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                return SimdLevel::Avx2Fma;
            }
        }
        SimdLevel::Portable
    }

    /// Whether this CPU can run kernels compiled for `self`.
    pub fn is_supported(self) -> bool {
        match self {
            SimdLevel::Portable => true,
            SimdLevel::Avx2Fma => matches!(Self::detect(), SimdLevel::Avx2Fma | SimdLevel::Avx512),
            SimdLevel::Avx512 => Self::detect() == SimdLevel::Avx512,
        }
    }
}

/// A weight matrix in GGUF block format: `rows` rows of `cols` elements, each row `row_bytes` long.
#[derive(Clone, Copy)]
pub(crate) struct BlockMatrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl BlockMatrix<'_> {
    fn row_bytes(&self) -> usize {
        self.data.len() / self.rows
    }
    fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }
}

/// Runs `$run!(N)` for the token count `$nt` (1 to 8), so that multi-token kernels get `N` as a constant.
macro_rules! by_token_count {
    ($nt:expr, $run:ident) => {
        match $nt {
            8 => $run!(8),
            7 => $run!(7),
            6 => $run!(6),
            5 => $run!(5),
            4 => $run!(4),
            3 => $run!(3),
            2 => $run!(2),
            _ => $run!(1),
        }
    };
}
pub(crate) use by_token_count;

/// Rows per parallel task: small enough to balance two to a few dozen cores, large enough that a rayon task
/// (about a microsecond of scheduling) does well over a hundred microseconds of work.
pub(crate) const ROWS_PER_TASK: usize = 32;

/// Runs `task(r0, nr, out)` in parallel for each chunk of [`ROWS_PER_TASK`] rows (`r0 .. r0 + nr`) of the
/// `[tokens, rows]` product `out`, with `out` positioned at the chunk's first row: tasks write disjoint rows.
pub(crate) fn par_row_chunks(rows: usize, out: &mut [f32], task: impl Fn(usize, usize, OutPtr) + Sync) {
    let out_ptr = OutPtr { base: out.as_mut_ptr(), stride: rows, row0: 0, len: out.len() };
    (0..rows.div_ceil(ROWS_PER_TASK)).into_par_iter().for_each(|c| {
        let r0 = c * ROWS_PER_TASK;
        task(r0, ROWS_PER_TASK.min(rows - r0), out_ptr.with_row0(r0));
    });
}

thread_local! {
    /// Per-thread scratch for dequantized weight rows; grows once, then is reused (no allocation per call).
    static DEQUANT_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per-thread scratch for activation block sums (Q4_1 decode).
    static XSUM_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out[t * rows + r] = W[r] · x[t * cols ..]` for `t < n_tokens`.
pub(crate) fn matmul(level: SimdLevel, w: BlockMatrix<'_>, x: &[f32], n_tokens: usize, out: &mut [f32]) {
    assert_eq!(x.len(), n_tokens * w.cols, "activation shape");
    assert_eq!(out.len(), n_tokens * w.rows, "output shape");
    if n_tokens == 1 {
        return matvec(level, w, x, out);
    }
    // A batch decode step or a short prefill chunk: the one-token kernels token by token over each task's
    // rows, which stay in L1 between tokens. Dequantizing tiles to f32 (with the scalar reference) cost more
    // than it saved below a prefill's worth of tokens; K must also suit the 16-lane GEMM kernels.
    if n_tokens <= DEQUANT_GEMM_MIN_TOKENS || !w.cols.is_multiple_of(16) {
        return matmul_by_token(level, w, x, out);
    }
    // Cannot fail: row lengths were validated when the matrix was built.
    let dequant = |r: usize, o: &mut [f32]| {
        let _ = dequantize_row_reference(w.ty, w.row(r), o);
    };
    gemm_dequantized(level, w.rows, w.cols, &dequant, x, n_tokens, out);
}

/// From this many tokens on, GGUF matrices are dequantized tile by tile into the f32 GEMM.
const DEQUANT_GEMM_MIN_TOKENS: usize = 16;

/// `matmul` of a few tokens: one parallel region over row chunks; each task runs the one-token kernel of
/// every token on its rows (so each token's result is exactly its one-token product).
fn matmul_by_token(level: SimdLevel, w: BlockMatrix<'_>, x: &[f32], out: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    let mut xsum = Vec::new();
    if w.ty == GgmlType::Q4_1 {
        xsum = vec![0.0f32; x.len() / 32];
        for (xt, st) in x.chunks_exact(cols).zip(xsum.chunks_exact_mut(cols / 32)) {
            block_sums(xt, st);
        }
    }
    let (xsum, per_token_sums) = (&xsum, cols / 32);
    #[cfg(target_arch = "x86_64")]
    if matches!(level, SimdLevel::Avx512 | SimdLevel::Avx2Fma) && matches!(w.ty, GgmlType::Q4_1 | GgmlType::Q8_0) {
        // Each block widened once for up to 8 tokens, with each token's one-token arithmetic.
        let n_tokens = x.len() / cols;
        let q4_1 = w.ty == GgmlType::Q4_1;
        // Q4_1's block sums by pass of 8 tokens, then by block, one lane per token (zero past the last).
        let mut xsum_t = vec![0.0f32; if q4_1 { n_tokens.div_ceil(8) * per_token_sums * 8 } else { 0 }];
        for (t, st) in xsum.chunks_exact(per_token_sums).enumerate() {
            let pass = &mut xsum_t[(t / 8) * per_token_sums * 8..];
            for (b, &v) in st.iter().enumerate() {
                pass[8 * b + t % 8] = v;
            }
        }
        let xsum_t = &xsum_t;
        par_row_chunks(rows, out, |r0, nr, o| {
            for t0 in (0..n_tokens).step_by(8) {
                let nt = (n_tokens - t0).min(8);
                let (xt, st) = (&x[t0 * cols..], xsum_t.get((t0 / 8) * per_token_sums * 8..).unwrap_or(&[]));
                let o = OutPtr { base: o.base.wrapping_add(t0 * rows), len: o.len - t0 * rows, ..o };
                let m = (w.data, w.row_bytes(), cols);
                macro_rules! run {
                    ($nt:literal) => {
                        // SAFETY: these levels are only selected where the CPU supports them (SimdLevel::detect).
                        unsafe {
                            if level == SimdLevel::Avx512 {
                                x86::gguf_rows_multi_avx512::<$nt>(q4_1, m, (r0, nr), xt, st, o)
                            } else {
                                x86::gguf_rows_multi_avx2::<$nt>(q4_1, m, (r0, nr), xt, st, o)
                            }
                        }
                    };
                }
                by_token_count!(nt, run)
            }
        });
        return;
    }
    par_row_chunks(rows, out, |r0, nr, o| {
        let mut tile = [0.0f32; ROWS_PER_TASK];
        for (t, xt) in x.chunks_exact(cols).enumerate() {
            let st = xsum.get(t * per_token_sums..(t + 1) * per_token_sums).unwrap_or(&[]);
            matvec_dispatch(level, w, r0, xt, st, &mut tile[..nr]);
            o.write_rows(t, &tile[..nr]);
        }
    });
}

/// Prefill product over any weight storage: each task dequantizes a chunk of rows with `dequant(row, out)`
/// to f32 once and runs the register-blocked kernels over all `n_tokens` tokens. `cols` must be a multiple
/// of 16.
pub(crate) fn gemm_dequantized(
    level: SimdLevel,
    rows: usize,
    cols: usize,
    dequant: &(dyn Fn(usize, &mut [f32]) + Sync),
    x: &[f32],
    n_tokens: usize,
    out: &mut [f32],
) {
    assert!(cols.is_multiple_of(16) && x.len() == n_tokens * cols && out.len() == n_tokens * rows, "gemm shapes");
    par_row_chunks(rows, out, |r0, nr, tile_out| {
        DEQUANT_SCRATCH.with_borrow_mut(|scratch| {
            let k = cols;
            scratch.resize(ROWS_PER_TASK * k + k, 0.0);
            #[cfg(target_arch = "x86_64")]
            if matches!(level, SimdLevel::Avx512 | SimdLevel::Avx2Fma) {
                // k-major tile (`wt[kk * 32 + r]`, padded rows zero) for the broadcast kernels.
                let (wt, row_buf) = scratch.split_at_mut(ROWS_PER_TASK * k);
                wt.fill(0.0);
                for r in 0..nr {
                    dequant(r0 + r, row_buf);
                    for (kk, &v) in row_buf.iter().enumerate() {
                        wt[kk * ROWS_PER_TASK + r] = v;
                    }
                }
                // SAFETY: these levels are only selected where the CPU supports them (SimdLevel::detect).
                unsafe {
                    match level {
                        SimdLevel::Avx512 => x86::gemm_kmajor32_avx512(wt, nr, x, n_tokens, k, tile_out),
                        _ => x86::gemm_kmajor32_avx2(wt, nr, x, n_tokens, k, tile_out),
                    }
                }
                return;
            }
            for r in 0..nr {
                dequant(r0 + r, &mut scratch[r * k..(r + 1) * k]);
            }
            gemm_portable(&scratch[..nr * k], nr, x, n_tokens, k, tile_out);
        });
    });
}

/// `out[r] = W[r] · x` (one token), parallel over row chunks.
pub(crate) fn matvec(level: SimdLevel, w: BlockMatrix<'_>, x: &[f32], out: &mut [f32]) {
    matvec_many(level, &[w], x, &mut [out]);
}

/// `outs[i] = ws[i] · x` for matrices sharing one input (Q/K/V, gate/up), in a single parallel region:
/// at one token each product is only tens of microseconds of work, so waking the thread pool once instead of
/// once per matrix saves a measurable share of decode time.
pub(crate) fn matvec_many<O: AsMut<[f32]> + Send>(level: SimdLevel, ws: &[BlockMatrix<'_>], x: &[f32], outs: &mut [O]) {
    assert_eq!(ws.len(), outs.len(), "one output per matrix");
    for (w, o) in ws.iter().zip(outs.iter_mut()) {
        assert_eq!((x.len(), o.as_mut().len()), (w.cols, w.rows), "matvec shape");
    }
    // Taken out of the thread-local rather than borrowed across the parallel region: while this thread waits
    // for its tasks it may run another job of the pool (another forward pass), which would find the
    // scratch borrowed; it now finds it empty and allocates its own.
    let mut xsum = XSUM_SCRATCH.take();
    if ws.iter().any(|w| w.ty == GgmlType::Q4_1) {
        xsum.resize(x.len() / 32, 0.0);
        block_sums(x, &mut xsum);
    }
    let sums: &[f32] = &xsum;
    outs.par_iter_mut().zip(ws.par_iter()).for_each(|(out, &w)| {
        out.as_mut().par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(c, oc)| {
            matvec_dispatch(level, w, c * ROWS_PER_TASK, x, sums, oc);
        });
    });
    XSUM_SCRATCH.set(xsum);
}

/// The row loop, with the Q4_1 and Q8_0 dot kernels of one instruction set plugged in.
#[inline(always)]
fn matvec_body(
    w: BlockMatrix<'_>,
    r0: usize,
    x: &[f32],
    xsum: &[f32],
    out: &mut [f32],
    q4_1: impl Fn(&[u8], &[f32], &[f32]) -> f32,
    q8_0: impl Fn(&[u8], &[f32]) -> f32,
) {
    for (i, o) in out.iter_mut().enumerate() {
        let row = w.row(r0 + i);
        *o = match w.ty {
            GgmlType::Q4_1 => q4_1(row, x, xsum),
            GgmlType::Q8_0 => q8_0(row, x),
            GgmlType::F32 => dot_f32_fast(row, x),
            other => dot_generic(other, row, x),
        };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn matvec_avx512(w: BlockMatrix<'_>, r0: usize, x: &[f32], xsum: &[f32], out: &mut [f32]) {
    // The closures inherit this function's target features, so the kernels are callable directly.
    matvec_body(w, r0, x, xsum, out, |r, x, s| x86::dot_q4_1_avx512(r, x, s), |r, x| x86::dot_q8_0_avx512(r, x))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn matvec_avx2(w: BlockMatrix<'_>, r0: usize, x: &[f32], xsum: &[f32], out: &mut [f32]) {
    // The closures inherit this function's target features, so the kernels are callable directly.
    matvec_body(w, r0, x, xsum, out, |r, x, s| x86::dot_q4_1_avx2(r, x, s), |r, x| x86::dot_q8_0_avx2(r, x))
}

fn matvec_dispatch(level: SimdLevel, w: BlockMatrix<'_>, r0: usize, x: &[f32], xsum: &[f32], out: &mut [f32]) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a level other than Portable is only constructed by `detect` or checked by `is_supported`
        // (CpuBackend::with_level), so the CPU has these features.
        SimdLevel::Avx512 => unsafe { matvec_avx512(w, r0, x, xsum, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdLevel::Avx2Fma => unsafe { matvec_avx2(w, r0, x, xsum, out) },
        _ => matvec_body(w, r0, x, xsum, out, dot_q4_1_fast, dot_q8_0_fast),
    }
}

/// The portable prefill kernels (x86 levels take the k-major broadcast kernels of `gemm_dequantized`).
fn gemm_portable(w: &[f32], nr: usize, x: &[f32], nt: usize, k: usize, out: OutPtr) {
    gemm_tile::<false>(w, nr, x, nt, k, out, portable_4x4::<false>)
}

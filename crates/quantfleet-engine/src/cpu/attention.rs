//! CPU attention over the paged KV cache. One task per (token row, query head): scores against every cached
//! position up to the row's own (causal), softmax, weighted sum of values. Grouped-query attention maps query
//! head h to KV head h / (n_heads / n_kv_heads).

use std::cell::RefCell;

use rayon::prelude::*;

use super::matmul::SimdLevel;
use crate::backend::{KvLayout, SeqSpan};

/// Slots per block for which scores are accumulated in registers (one AVX-512 vector).
const LANES: usize = 16;

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Where row `row` of the batch sits: its span's block table and its absolute position.
fn locate<'a>(spans: &'a [SeqSpan<'a>], row: usize) -> Option<(&'a SeqSpan<'a>, usize)> {
    spans.iter().find(|s| row >= s.row0 && row < s.row0 + s.n_tokens).map(|s| (s, s.start_pos + row - s.row0))
}

/// Copies K and V rows (`[n, n_kv * hd]`) into their slots.
pub(crate) fn kv_write(storage: &mut [f32], layout: &KvLayout, layer: usize, k: &[f32], v: &[f32], spans: &[SeqSpan]) {
    let (hd, bt) = (layout.head_dim, layout.block_tokens);
    let width = layout.n_kv_heads * hd;
    for span in spans {
        for i in 0..span.n_tokens {
            let row = span.row0 + i;
            let pos = span.start_pos + i;
            let block = span.block_table[pos / bt] as usize;
            let slot = pos % bt;
            for h in 0..layout.n_kv_heads {
                let src = row * width + h * hd;
                // Keys transposed within the block (see KvLayout), values as rows.
                let k_base = block * layout.block_elems() + layout.head_offset(layer, 0, h) + slot;
                for (d, &kv) in k[src..src + hd].iter().enumerate() {
                    storage[k_base + d * bt] = kv;
                }
                let v_base = block * layout.block_elems() + layout.head_offset(layer, 1, h) + slot * hd;
                storage[v_base..v_base + hd].copy_from_slice(&v[src..src + hd]);
            }
        }
    }
}

/// `out[row, h*hd..]` = attention of query head h of `row` over its sequence's positions `0..=pos`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    level: SimdLevel,
    storage: &[f32],
    layout: &KvLayout,
    layer: usize,
    q: &[f32],
    n_heads: usize,
    spans: &[SeqSpan],
    out: &mut [f32],
) {
    let hd = layout.head_dim;
    out.par_chunks_mut(hd).enumerate().for_each(|(task, o)| {
        let (row, h) = (task / n_heads, task % n_heads);
        let Some((span, pos)) = locate(spans, row) else { return };
        let kv_head = h / (n_heads / layout.n_kv_heads);
        let qv = &q[task * hd..(task + 1) * hd];
        SCORES.with_borrow_mut(|scores| {
            let job = Job { storage, layout, layer, kv_head, block_table: span.block_table, pos, q: qv };
            match level {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: non-portable levels exist only where the CPU supports them (SimdLevel::detect).
                SimdLevel::Avx512 => unsafe { attend_avx512(&job, scores, o) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                SimdLevel::Avx2Fma => unsafe { attend_avx2(&job, scores, o) },
                _ => attend(&job, scores, o),
            }
        });
    });
}

/// One (row, query head) of attention.
struct Job<'a> {
    storage: &'a [f32],
    layout: &'a KvLayout,
    layer: usize,
    kv_head: usize,
    block_table: &'a [u32],
    pos: usize,
    q: &'a [f32],
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn attend_avx512(job: &Job, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend(job, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_avx2(job: &Job, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend(job, scores, out)
}

/// Walks the sequence block by block: within a block one head's keys (transposed) and values are each one
/// contiguous run of `block_tokens * head_dim`, so both passes stream memory linearly.
#[inline(always)]
fn attend(job: &Job, scores: &mut Vec<f32>, out: &mut [f32]) {
    let l = job.layout;
    let (hd, bt) = (l.head_dim, l.block_tokens);
    let scale = 1.0 / (hd as f32).sqrt();
    let n = job.pos + 1;
    let k_off = l.head_offset(job.layer, 0, job.kv_head);
    let v_off = l.head_offset(job.layer, 1, job.kv_head);
    let block_at = |b: usize, off: usize, len: usize| {
        let base = job.block_table[b] as usize * l.block_elems() + off;
        &job.storage[base..base + len * hd]
    };
    scores.clear();
    scores.resize(n, 0.0);
    let mut max = f32::NEG_INFINITY;
    for b in 0..n.div_ceil(bt) {
        let len = bt.min(n - b * bt);
        // Keys are stored transposed ([d][slot]), so the block's scores accumulate as one vector over the
        // slots, one broadcast query element at a time: no horizontal reduction per key.
        let keys_t = block_at(b, k_off, bt);
        let sc = &mut scores[b * bt..b * bt + len];
        if bt == LANES {
            // The default block size: the 16 scores live in one register for the whole loop over d (through
            // memory, each step would wait on the previous step's store). Lanes past `len` are computed from
            // unused slots and dropped.
            let mut acc = [0.0f32; LANES];
            for (col, &qd) in keys_t.chunks_exact(LANES).zip(job.q) {
                let qd = qd * scale;
                for (a, &kv) in acc.iter_mut().zip(col) {
                    *a += qd * kv;
                }
            }
            sc.copy_from_slice(&acc[..len]);
        } else {
            for (d, &qd) in job.q.iter().enumerate() {
                let qd = qd * scale;
                for (s, &kv) in sc.iter_mut().zip(&keys_t[d * bt..d * bt + len]) {
                    *s += qd * kv;
                }
            }
        }
        max = sc.iter().fold(max, |m, &s| m.max(s));
    }
    let mut sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    out.fill(0.0);
    for b in 0..n.div_ceil(bt) {
        let len = bt.min(n - b * bt);
        let values = block_at(b, v_off, len);
        let weights = &scores[b * bt..b * bt + len];
        // Four value rows per pass over `out`: a quarter of the loads and stores of `out`, whose
        // store-to-load round trips otherwise dominate this loop.
        let mut rows = values.chunks_exact(4 * hd);
        let mut ws = weights.chunks_exact(4);
        for (v4, w4) in (&mut rows).zip(&mut ws) {
            let (v0, rest) = v4.split_at(hd);
            let (v1, rest) = rest.split_at(hd);
            let (v2, v3) = rest.split_at(hd);
            let w = [w4[0] * inv, w4[1] * inv, w4[2] * inv, w4[3] * inv];
            // Zipped iterators (not indexing) so the loop has no bounds checks and vectorizes.
            for ((((a, &x0), &x1), &x2), &x3) in out.iter_mut().zip(v0).zip(v1).zip(v2).zip(v3) {
                *a += (w[0] * x0 + w[1] * x1) + (w[2] * x2 + w[3] * x3);
            }
        }
        for (value, &w) in rows.remainder().chunks_exact(hd).zip(ws.remainder()) {
            let w = w * inv;
            for (a, &v) in out.iter_mut().zip(value) {
                *a += w * v;
            }
        }
    }
}

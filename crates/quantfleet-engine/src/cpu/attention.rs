//! CPU attention over the paged KV cache. One task per (token row, query head): scores against every cached
//! position up to the row's own (causal), softmax, weighted sum of values. Grouped-query attention maps query
//! head h to KV head h / (n_heads / n_kv_heads).

use std::cell::RefCell;

use rayon::prelude::*;

use crate::backend::{KvLayout, SeqSpan};

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
            for (kind, src) in [(0, k), (1, v)] {
                for h in 0..layout.n_kv_heads {
                    let dst = block * layout.block_elems() + layout.head_offset(layer, kind, h) + slot * hd;
                    storage[dst..dst + hd].copy_from_slice(&src[row * width + h * hd..row * width + (h + 1) * hd]);
                }
            }
        }
    }
}

/// `out[row, h*hd..]` = attention of query head h of `row` over its sequence's positions `0..=pos`.
pub(crate) fn attention(
    storage: &[f32],
    layout: &KvLayout,
    layer: usize,
    q: &[f32],
    n_heads: usize,
    spans: &[SeqSpan],
    out: &mut [f32],
) {
    let (hd, bt) = (layout.head_dim, layout.block_tokens);
    let group = n_heads / layout.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(hd).enumerate().for_each(|(task, o)| {
        let (row, h) = (task / n_heads, task % n_heads);
        let Some((span, pos)) = locate(spans, row) else { return };
        let kvh = h / group;
        let qv = &q[task * hd..(task + 1) * hd];
        let k_off = layout.head_offset(layer, 0, kvh);
        let v_off = layout.head_offset(layer, 1, kvh);
        let at = |p: usize, off: usize| span.block_table[p / bt] as usize * layout.block_elems() + off + (p % bt) * hd;
        SCORES.with_borrow_mut(|scores| {
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for p in 0..=pos {
                let kp = &storage[at(p, k_off)..][..hd];
                let s = dot(qv, kp) * scale;
                max = max.max(s);
                scores.push(s);
            }
            let mut sum = 0.0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            o.fill(0.0);
            for (p, &w) in scores.iter().enumerate() {
                let vp = &storage[at(p, v_off)..][..hd];
                let w = w * inv;
                for (a, &b) in o.iter_mut().zip(vp) {
                    *a += w * b;
                }
            }
        });
    });
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    for (ca, cb) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        for j in 0..16 {
            acc[j] += ca[j] * cb[j];
        }
    }
    let tail: f32 = a.chunks_exact(16).remainder().iter().zip(b.chunks_exact(16).remainder()).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

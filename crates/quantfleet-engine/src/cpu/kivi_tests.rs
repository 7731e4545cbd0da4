//! The CPU KIVI cache against `quantfleet_quant::kv`'s `KiviCache` (contents) and `attention_reference`
//! (attention, f64), and batching against one token at a time. All values SYNTHETIC (seeded), keys with a
//! planted outlier channel and per-channel offsets as real keys have.

use half::f16;
use quantfleet_quant::kv::{KiviCache, KiviConfig, KvLayout as QuantLayout, attention_reference};
use quantfleet_quant::synthetic::SynthRng;

use super::KiviStore;
use crate::backend::{Backend, KvLayout, SeqSpan};
use crate::cpu::attention::KvData;
use crate::cpu::{CpuBackend, CpuKvStorage, CpuTensor};
use crate::kv_cache::{KIVI_GROUP, KvDtype};

fn store(kv: &CpuKvStorage) -> &KiviStore {
    match &kv.store.data {
        KvData::Kivi(s) => s,
        _ => panic!("not a KIVI cache"),
    }
}

fn tensor(rows: usize, cols: usize, data: &[f32]) -> CpuTensor {
    CpuTensor { rows, cols, data: data.to_vec() }
}

/// `n` rows of `width` keys: channel 5 of every head is an outlier (x20), every channel has its own offset;
/// rounded to f16 so the f32 reference sees exactly what the fp16 window holds.
fn keys(rng: &mut SynthRng, n: usize, width: usize, hd: usize) -> Vec<f32> {
    (0..n * width)
        .map(|i| {
            let c = i % hd;
            let x = rng.uniform() * if c == 5 { 20.0 } else { 1.0 } + (c % 7) as f32 * 0.3;
            f16::from_f32(x).to_f32()
        })
        .collect()
}

fn values(rng: &mut SynthRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| f16::from_f32(rng.uniform()).to_f32()).collect()
}

/// The engine's cache holds what `KiviCache` holds, after every batch of uneven size. `KiviCache` quantizes
/// its oldest group when its residual reaches `residual + 32`; the engine when a token finds its ring of
/// `residual` slots full: the same states for engine residual = reference residual + 31. With head_dim 32
/// the reference's per-head value groups are the engine's 32-channel groups. Codes are identical; the
/// engine's f16 scale moves a decoded int4 value by at most `15 * scale * 2^-11 <= amax * 2^-10` (amax of
/// the group, bounded by the channel's (keys) or the token's (values) amax); fp16 window values are exact.
#[test]
fn kivi_cache_holds_what_the_quant_reference_holds() {
    let mut rng = SynthRng::new(9);
    let (sink, residual, hd, heads) = (4usize, 40usize, 32usize, 2usize);
    let layout = KvLayout { n_layers: 2, n_kv_heads: heads, head_dim: hd, block_tokens: KIVI_GROUP };
    let dtype = KvDtype::Int4Kivi { sink_tokens: sink as u32, residual_tokens: residual as u32 };
    let width = heads * hd;
    let cpu = CpuBackend::new();
    let mut kv = cpu.new_kv_storage(layout, dtype, 12).unwrap();
    let table = [7u32, 2, 11, 0, 5, 9, 1, 3, 10];
    let config = KiviConfig {
        layout: QuantLayout { n_heads: heads, head_dim: hd },
        group_tokens: KIVI_GROUP,
        residual_tokens: residual - (KIVI_GROUP - 1),
        sink_tokens: sink,
    };
    let mut reference = [KiviCache::new(config).unwrap(), KiviCache::new(config).unwrap()];
    let mut len = 0;
    for batch in [1usize, 37, 5, 60, 47] {
        for (layer, cache) in reference.iter_mut().enumerate() {
            let (k, v) = (keys(&mut rng, batch, width, hd), values(&mut rng, batch * width));
            let spans = [SeqSpan { row0: 0, n_tokens: batch, start_pos: len, block_table: &table }];
            cpu.kv_write(&mut kv, layer, &tensor(batch, width, &k), &tensor(batch, width, &v), &spans).unwrap();
            for t in 0..batch {
                cache.push(&k[t * width..][..width], &v[t * width..][..width]).unwrap();
            }
        }
        len += batch;
        let s = store(&kv);
        let quantized = s.geom.quantized_groups(len);
        for (layer, cache) in reference.iter().enumerate() {
            assert_eq!(cache.full_precision_tokens(), len - quantized * KIVI_GROUP, "len {len}: window policy");
            let (rk, rv) = (cache.keys(), cache.values());
            for h in 0..heads {
                let (ek, ev) = s.dequantize_reference(&table, layer, h, len);
                let channel_amax: Vec<f32> =
                    (0..hd).map(|d| (0..len).fold(0f32, |m, t| m.max(rk[t * width + h * hd + d].abs()))).collect();
                for t in 0..len {
                    let row = &rv[t * width + h * hd..][..hd];
                    let row_amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let int4 = s.geom.group_of(t, len).is_some();
                    for d in 0..hd {
                        let (kb, vb) = if int4 { (channel_amax[d] / 1024.0, row_amax / 1024.0) } else { (0.0, 0.0) };
                        let (r, e) = (rk[t * width + h * hd + d], ek[t * hd + d]);
                        assert!((r - e).abs() <= kb, "len {len} layer {layer} h{h} t{t} d{d} key {e} vs {r}");
                        let (r, e) = (row[d], ev[t * hd + d]);
                        assert!((r - e).abs() <= vb, "len {len} layer {layer} h{h} t{t} d{d} value {e} vs {r}");
                    }
                }
            }
        }
    }
    assert_eq!(store(&kv).geom.quantized_groups(len), 4, "150 tokens, window 44: four int4 groups");
}

/// Reference attention of every row of a batch: the cache's content at the batch's length decoded one
/// element at a time, attended in f64 by `attention_reference`, per query head (GQA: head h reads KV head
/// h / group).
fn reference_attention(
    kv: &CpuKvStorage,
    table: &[u32],
    q: &[f32],
    first_pos: usize,
    rows: usize,
    n_heads: usize,
) -> Vec<f32> {
    let s = store(kv);
    let (hd, n_kv) = (s.geom.layout.head_dim, s.geom.layout.n_kv_heads);
    let len = first_pos + rows;
    let decoded: Vec<(Vec<f32>, Vec<f32>)> = (0..n_kv).map(|h| s.dequantize_reference(table, 0, h, len)).collect();
    let one = QuantLayout { n_heads: 1, head_dim: hd };
    let mut out = Vec::new();
    for r in 0..rows {
        let n = first_pos + r + 1;
        for h in 0..n_heads {
            let (k, v) = &decoded[h / (n_heads / n_kv)];
            let qh = &q[(r * n_heads + h) * hd..][..hd];
            out.extend(attention_reference(qh, &k[..n * hd], &v[..n * hd], one).unwrap());
        }
    }
    out
}

/// One token at a time (decode), every step's attention equals the scalar reference at that length within
/// f32 accumulation error. Prefilling the same tokens in two batches of two sequences each (tiles of 16 rows
/// cut where a row sees one more int4 group, partial tiles, GQA 9/3, sink 4 + ring 64, groups quantized
/// inside both batches) gives every row bit for bit its decode step's output and leaves bit-identical cache
/// words: a prefill attends exactly as KIVI decode does.
#[test]
fn kivi_prefill_rows_equal_decode_steps_and_the_scalar_reference() {
    let mut rng = SynthRng::new(21);
    let (hd, n_kv, n_heads) = (64usize, 3usize, 9usize);
    let layout = KvLayout { n_layers: 1, n_kv_heads: n_kv, head_dim: hd, block_tokens: KIVI_GROUP };
    let dtype = KvDtype::Int4Kivi { sink_tokens: 4, residual_tokens: 64 };
    let (width, qw) = (n_kv * hd, n_heads * hd);
    let cpu = CpuBackend::new();
    // Sequence A: 191 tokens (7 window blocks + 4 groups), B: 141 (7 + 3); prefilled as 150 + 41 and 100 + 41.
    let tables: [Vec<u32>; 2] = [(13..24).rev().collect(), (0..10).collect()];
    let lens = [191usize, 141];
    let data: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = lens
        .iter()
        .map(|&n| {
            let (k, v) = (keys(&mut rng, n, width, hd), values(&mut rng, n * width));
            (k, v, (0..n * qw).map(|_| rng.uniform()).collect())
        })
        .collect();
    let mut decode = cpu.new_kv_storage(layout, dtype, 24).unwrap();
    let mut decoded: Vec<Vec<f32>> = vec![Vec::new(), Vec::new()];
    for (s, (k, v, q)) in data.iter().enumerate() {
        for t in 0..lens[s] {
            let span = [SeqSpan { row0: 0, n_tokens: 1, start_pos: t, block_table: &tables[s] }];
            let (kr, vr) = (&k[t * width..][..width], &v[t * width..][..width]);
            cpu.kv_write(&mut decode, 0, &tensor(1, width, kr), &tensor(1, width, vr), &span).unwrap();
            let mut out = CpuTensor::default();
            let qr = &q[t * qw..][..qw];
            cpu.attention(&tensor(1, qw, qr), &decode, 0, &span, &mut out).unwrap();
            let want = reference_attention(&decode, &tables[s], qr, t, 1, n_heads);
            let err = out.data.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-5, "sequence {s} step {t}: max error {err} against the reference");
            decoded[s].extend(out.data);
        }
    }
    let mut prefill = cpu.new_kv_storage(layout, dtype, 24).unwrap();
    for batch in [[(0, 150), (0, 100)], [(150, 41), (100, 41)]] {
        let (mut k, mut v, mut q, mut spans, mut row0) = (vec![], vec![], vec![], vec![], 0);
        for (s, &(start, n)) in batch.iter().enumerate() {
            k.extend_from_slice(&data[s].0[start * width..(start + n) * width]);
            v.extend_from_slice(&data[s].1[start * width..(start + n) * width]);
            q.extend_from_slice(&data[s].2[start * qw..(start + n) * qw]);
            spans.push(SeqSpan { row0, n_tokens: n, start_pos: start, block_table: &tables[s] });
            row0 += n;
        }
        cpu.kv_write(&mut prefill, 0, &tensor(row0, width, &k), &tensor(row0, width, &v), &spans).unwrap();
        let mut out = CpuTensor::default();
        cpu.attention(&tensor(row0, qw, &q), &prefill, 0, &spans, &mut out).unwrap();
        for (s, span) in spans.iter().enumerate() {
            for r in 0..span.n_tokens {
                let (got, pos) = (&out.data[(span.row0 + r) * qw..][..qw], span.start_pos + r);
                assert!(got == &decoded[s][pos * qw..][..qw], "sequence {s} position {pos}: prefill != decode");
            }
        }
    }
    assert!(store(&prefill).words == store(&decode).words, "cache words differ between prefill and decode");
    assert_eq!(store(&decode).geom.quantized_groups(191), 4);
}

/// A sink and ring that are not multiples of anything (3 + 33), one KV head: a prefill in one call and a
/// decode leave bit-identical cache words and give every row the same output, the first groups quantized
/// when the ring is full.
#[test]
fn kivi_decode_and_prefill_leave_the_same_cache() {
    let mut rng = SynthRng::new(5);
    let (hd, n_kv, n_heads, n) = (64usize, 1usize, 2usize, 120usize);
    let layout = KvLayout { n_layers: 1, n_kv_heads: n_kv, head_dim: hd, block_tokens: KIVI_GROUP };
    let dtype = KvDtype::Int4Kivi { sink_tokens: 3, residual_tokens: 33 };
    let (width, qw) = (n_kv * hd, n_heads * hd);
    let (k, v) = (keys(&mut rng, n, width, hd), values(&mut rng, n * width));
    let q: Vec<f32> = (0..n * qw).map(|_| rng.uniform()).collect();
    let cpu = CpuBackend::new();
    let table: Vec<u32> = (0..8).collect();
    let mut prefill = cpu.new_kv_storage(layout, dtype, 8).unwrap();
    let spans = [SeqSpan { row0: 0, n_tokens: n, start_pos: 0, block_table: &table }];
    cpu.kv_write(&mut prefill, 0, &tensor(n, width, &k), &tensor(n, width, &v), &spans).unwrap();
    let mut prefill_out = CpuTensor::default();
    cpu.attention(&tensor(n, qw, &q), &prefill, 0, &spans, &mut prefill_out).unwrap();
    let mut decode = cpu.new_kv_storage(layout, dtype, 8).unwrap();
    let mut out = CpuTensor::default();
    for t in 0..n {
        let span = [SeqSpan { row0: 0, n_tokens: 1, start_pos: t, block_table: &table }];
        let (kr, vr) = (&k[t * width..][..width], &v[t * width..][..width]);
        cpu.kv_write(&mut decode, 0, &tensor(1, width, kr), &tensor(1, width, vr), &span).unwrap();
        cpu.attention(&tensor(1, qw, &q[t * qw..][..qw]), &decode, 0, &span, &mut out).unwrap();
        assert_eq!(out.data.as_slice(), &prefill_out.data[t * qw..][..qw], "row {t}");
    }
    assert!(store(&prefill).words == store(&decode).words, "cache words differ between prefill and decode");
    assert_eq!(store(&decode).geom.quantized_groups(n), 3);
}

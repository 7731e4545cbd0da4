//! CPU attention over the paged KV cache. One task per (sequence, KV head, tile of up to 16 rows): each query
//! of the tile scores every cached position up to its row's own (causal), softmax, weighted sum of values.
//! Grouped-query attention maps query head h to KV head h / (n_heads / n_kv_heads).
//!
//! An int4 KIVI cache (`super::kivi`) is decoded per 32-position block for the tile like any other; its
//! tiles also end where the next row would see one more int4 key group, so every row sees the cache as
//! KIVI keeps it at the row's own length, in a prefill as in decode.

use std::cell::RefCell;

use rayon::prelude::*;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use quantfleet_quant::hadamard;
use quantfleet_quant::int4::GroupParams;
use quantfleet_quant::{Fp8Format, Saturation};

use super::kivi::{KiviStore, KiviView};
use super::matmul::SimdLevel;
use super::packed_kernels::e4m3_to_f32;
use crate::backend::{KvLayout, SeqSpan};
use crate::error::Result;
use crate::kv_cache::{KiviGeometry, KvDtype};

/// KV elements in the cache's dtype, in `KvLayout` order (keys transposed within a block, values as rows).
pub(crate) enum KvData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
    Fp8(Vec<u8>),
    Int8(Vec<i8>),
    /// Per-token int4: element `i` is the low (even `i`) or high nibble of byte `i / 2`, with one
    /// [`Int4Params`] per (token, head) indexed like `KvStore::scales`.
    Int4 {
        codes: Vec<u8>,
        params: Vec<Int4Params>,
    },
    /// Int4 KIVI groups and fp16 window rows, addressed by position (`KiviStore`), not by `get`/`put`.
    Kivi(KiviStore),
}

/// The f16 scale and zero point of one (token, head) of a per-token int4 cache: 4 bytes, the planner's.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Int4Params {
    scale: f16,
    zero: f16,
}

impl Int4Params {
    fn new(p: GroupParams) -> Self {
        Self { scale: f16::from_f32(p.scale), zero: f16::from_f32(p.zero as f32) }
    }
}

/// The CPU KV store: elements plus, for 8-bit dtypes, one f32 scale per (block, layer, K/V, head, slot) at
/// index `(element offset of the head's run) / head_dim + slot`.
pub(crate) struct KvStore {
    pub data: KvData,
    pub scales: Vec<f32>,
    /// Keys and values are stored Hadamard-rotated ([`KvDtype::rotated`]): `kv_write` rotates them,
    /// `attention` rotates its queries and its output back.
    pub rotated: bool,
}

impl KvStore {
    /// Storage for `n_blocks` blocks of `layout` (a KIVI cache: `KvDtype::cache_layout`).
    pub fn new(dtype: KvDtype, layout: &KvLayout, n_blocks: usize) -> Result<Self> {
        if let KvDtype::Int4Kivi { .. } = dtype {
            let store = KiviStore::new(KiviGeometry::new(*layout, dtype)?, n_blocks)?;
            return Ok(Self { data: KvData::Kivi(store), scales: Vec::new(), rotated: false });
        }
        let (n_elems, head_dim) = (layout.block_elems() * n_blocks, layout.head_dim);
        let data = match dtype {
            KvDtype::F32 => KvData::F32(vec![0.0; n_elems]),
            KvDtype::F16 => KvData::F16(vec![f16::ZERO; n_elems]),
            KvDtype::Bf16 => KvData::Bf16(vec![bf16::ZERO; n_elems]),
            KvDtype::Fp8E4m3 => KvData::Fp8(vec![0; n_elems]),
            KvDtype::Int8 => KvData::Int8(vec![0; n_elems]),
            KvDtype::Int4PerToken => KvData::Int4 {
                codes: vec![0; n_elems.div_ceil(2)],
                params: vec![Int4Params::default(); n_elems / head_dim],
            },
            KvDtype::Int4Kivi { .. } => unreachable!("returned above"),
        };
        let scales = match dtype {
            KvDtype::Fp8E4m3 | KvDtype::Int8 => vec![0.0; n_elems / head_dim],
            _ => Vec::new(),
        };
        Ok(Self { data, scales, rotated: dtype.rotated() })
    }

    /// Blocks a sequence of `len` positions needs in its block table.
    pub fn blocks_for(&self, layout: &KvLayout, len: usize) -> usize {
        match &self.data {
            KvData::Kivi(k) => k.geom.blocks_for(len),
            _ => len.div_ceil(layout.block_tokens),
        }
    }

    pub fn len(&self) -> usize {
        match &self.data {
            KvData::F32(v) => v.len(),
            KvData::F16(v) => v.len(),
            KvData::Bf16(v) => v.len(),
            KvData::Fp8(v) => v.len(),
            KvData::Int8(v) => v.len(),
            KvData::Int4 { codes, .. } => codes.len(),
            KvData::Kivi(k) => k.words.len(),
        }
    }

    /// Stores one token's head vector `src` at `slot` of the run starting at `base`: keys transposed
    /// (element d at `base + d * bt + slot`), values as a row (`base + slot * hd + d`).
    pub fn put(&mut self, base: usize, slot: usize, key: bool, bt: usize, hd: usize, src: &[f32]) {
        let idx = |d: usize| if key { base + d * bt + slot } else { base + slot * hd + d };
        let amax = src.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        match &mut self.data {
            KvData::F32(v) => src.iter().enumerate().for_each(|(d, &x)| v[idx(d)] = x),
            KvData::F16(v) => src.iter().enumerate().for_each(|(d, &x)| v[idx(d)] = f16::from_f32(x)),
            KvData::Bf16(v) => src.iter().enumerate().for_each(|(d, &x)| v[idx(d)] = bf16::from_f32(x)),
            KvData::Fp8(v) => {
                let scale = if amax > 0.0 { amax / Fp8Format::E4M3.max_finite() } else { 1.0 };
                self.scales[base / hd + slot] = scale;
                let inv = 1.0 / scale;
                src.iter()
                    .enumerate()
                    .for_each(|(d, &x)| v[idx(d)] = Fp8Format::E4M3.encode(x * inv, Saturation::Saturating));
            }
            KvData::Kivi(_) => unreachable!("kv_write writes KIVI caches through KiviStore::write"),
            KvData::Int4 { codes, params } => {
                // Codes from the f32 fit (as `quantize_kv_per_token`), then its scale kept as f16.
                let p = GroupParams::fit(src, false, 1.0);
                params[base / hd + slot] = Int4Params::new(p);
                for (d, &x) in src.iter().enumerate() {
                    let (byte, shift) = (idx(d) / 2, 4 * (idx(d) % 2));
                    codes[byte] = (codes[byte] & !(0xF << shift)) | (p.quantize(x) << shift);
                }
            }
            KvData::Int8(v) => {
                let scale = if amax > 0.0 { amax / 127.0 } else { 1.0 };
                self.scales[base / hd + slot] = scale;
                let inv = 1.0 / scale;
                src.iter()
                    .enumerate()
                    .for_each(|(d, &x)| v[idx(d)] = (x * inv).round_ties_even().clamp(-127.0, 127.0) as i8);
            }
        }
    }

    /// The run of `n` elements at `base` as f32: borrowed for an f32 cache, decoded into `scratch` otherwise.
    /// `key` selects the scale indexing (keys: per slot across the transposed run; values: per row).
    #[inline(always)]
    pub fn get<'a>(
        &'a self,
        base: usize,
        n: usize,
        key: bool,
        bt: usize,
        hd: usize,
        scratch: &'a mut Vec<f32>,
    ) -> &'a [f32] {
        let run = base..base + n;
        if let KvData::F32(v) = &self.data {
            return &v[run];
        }
        scratch.resize(n, 0.0);
        let out = &mut scratch[..n];
        let scale = |i: usize| self.scales[base / hd + if key { i % bt } else { i / hd }];
        match &self.data {
            KvData::F32(_) => unreachable!(),
            KvData::Kivi(_) => unreachable!("attention decodes KIVI caches through Tile::keys_t / Tile::values"),
            KvData::F16(v) => f16_run_to_f32(&v[run], out),
            KvData::Bf16(v) => v[run].convert_to_f32_slice(out),
            KvData::Fp8(v) => {
                out.iter_mut().zip(&v[run]).enumerate().for_each(|(i, (o, &c))| *o = e4m3_to_f32(c) * scale(i))
            }
            KvData::Int8(v) => {
                out.iter_mut().zip(&v[run]).enumerate().for_each(|(i, (o, &c))| *o = c as f32 * scale(i))
            }
            KvData::Int4 { codes, params } => {
                let param = |i: usize| params[base / hd + if key { i % bt } else { i / hd }];
                for (i, o) in out.iter_mut().enumerate() {
                    let e = base + i;
                    let code = (codes[e / 2] >> (4 * (e % 2))) & 0xF;
                    let p = param(i);
                    *o = (code as f32 - p.zero.to_f32()) * p.scale.to_f32();
                }
            }
        }
        out
    }
}

/// Decodes a run of f16 KV elements with F16C where the CPU has it (eight per instruction, inlined into the
/// attention kernels); `half`'s slice conversion makes a call per eight elements.
#[inline(always)]
fn f16_run_to_f32(src: &[f16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has F16C and AVX (F16C implies it), checked just above.
        return unsafe { super::x86::f16_run_to_f32(src, out) };
    }
    src.convert_to_f32_slice(out)
}

/// Slots per block for which scores are accumulated in registers (one AVX-512 vector).
const LANES: usize = 16;

/// Per-thread buffers of one attention task, reused across tasks.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    /// Decoded K and V runs of one block (quantized caches only).
    keys: Vec<f32>,
    values: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Copies K and V rows (`[n, n_kv * hd]`) into their slots, converting to the cache's dtype.
pub(crate) fn kv_write(
    storage: &mut KvStore,
    layout: &KvLayout,
    layer: usize,
    k: &[f32],
    v: &[f32],
    spans: &[SeqSpan],
) {
    let (hd, bt) = (layout.head_dim, layout.block_tokens);
    let width = layout.n_kv_heads * hd;
    if let KvData::Kivi(store) = &mut storage.data {
        store.write_spans(layer, k, v, spans);
        return;
    }
    let mut rotated = vec![0.0; if storage.rotated { hd } else { 0 }];
    for span in spans {
        for i in 0..span.n_tokens {
            let row = span.row0 + i;
            let pos = span.start_pos + i;
            let block = span.block_table[pos / bt] as usize;
            let slot = pos % bt;
            for h in 0..layout.n_kv_heads {
                let src = row * width + h * hd;
                // Keys transposed within the block (see KvLayout), values as rows.
                for (kind, rows) in [(0, k), (1, v)] {
                    let base = block * layout.block_elems() + layout.head_offset(layer, kind, h);
                    let mut head = &rows[src..src + hd];
                    if storage.rotated {
                        rotated.copy_from_slice(head);
                        hadamard::rotate(&mut rotated);
                        head = &rotated;
                    }
                    storage.put(base, slot, kind == 0, bt, hd, head);
                }
            }
        }
    }
}

/// Query rows attended together by one task: the keys and values of their KV head are fetched (decoded, for
/// a quantized cache) once per block for all of them and for every query head of the group, instead of once
/// per (row, head). A 2k-token prefill decoded each block ~2k x (heads per KV head) times before.
const ROW_TILE: usize = 16;

/// `out[row, h*hd..]` = attention of query head h of `row` over its sequence's positions `0..=pos`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    level: SimdLevel,
    storage: &KvStore,
    layout: &KvLayout,
    layer: usize,
    q: &[f32],
    n_heads: usize,
    spans: &[SeqSpan],
    out: &mut [f32],
) {
    let (hd, group) = (layout.head_dim, n_heads / layout.n_kv_heads);
    let width = n_heads * hd;
    // A rotated cache holds R k and R v: scores need R q, and the weighted sum of values comes out as R o.
    let rotated_q;
    let q = if storage.rotated {
        rotated_q = rotate_heads(q.to_vec(), hd);
        &rotated_q
    } else {
        q
    };
    // One task per (span, KV head, tile of rows): (span index, span, KV head, first row, rows). A KIVI tile
    // also ends where the next row sees one more int4 group, so all its rows see the same cache.
    let kivi = match &storage.data {
        KvData::Kivi(store) => Some(store),
        _ => None,
    };
    let mut tasks: Vec<(usize, &SeqSpan, usize, usize, usize)> = Vec::new();
    for (si, s) in spans.iter().enumerate() {
        let mut r0 = 0;
        while r0 < s.n_tokens {
            let mut rows = ROW_TILE.min(s.n_tokens - r0);
            if let Some(store) = kivi {
                let groups = |r: usize| store.geom.quantized_groups(s.start_pos + r + 1);
                rows = (1..rows).find(|&i| groups(r0 + i) != groups(r0)).unwrap_or(rows);
            }
            tasks.extend((0..layout.n_kv_heads).map(|kv_head| (si, s, kv_head, r0, rows)));
            r0 += rows;
        }
    }
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(si, span, kv_head, r0, rows)| {
            let kivi = kivi.map(|store| KiviView {
                table: span.block_table,
                layer,
                head: kv_head,
                groups: store.geom.quantized_groups(span.start_pos + r0 + 1),
                staged: store.staged_for(si, span, layer),
            });
            let mut o = vec![0.0; rows * group * hd];
            let tile = Tile {
                storage,
                layout,
                layer,
                kv_head,
                block_table: span.block_table,
                kivi,
                first_pos: span.start_pos + r0,
                rows,
                group,
                q,
                q_row0: span.row0 + r0,
                q_width: width,
            };
            // The scratch buffers are borrowed here, outside the kernels: a closure inside a
            // `target_feature` function is compiled as a function of its own, without the features.
            SCRATCH.with_borrow_mut(|s| match level {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: non-portable levels exist only where the CPU supports them (SimdLevel::detect).
                SimdLevel::Avx512 => unsafe { attend_avx512(&tile, s, &mut o) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                SimdLevel::Avx2Fma => unsafe { attend_avx2(&tile, s, &mut o) },
                _ => attend_blocks(SimdLevel::Portable, &tile, s, &mut o),
            });
            o
        })
        .collect();
    for (&(_, span, kv_head, r0, _), o) in tasks.iter().zip(&results) {
        for (i, head_out) in o.chunks_exact(hd).enumerate() {
            let (row, h) = (span.row0 + r0 + i / group, kv_head * group + i % group);
            let dst = &mut out[row * width + h * hd..][..hd];
            dst.copy_from_slice(head_out);
            if storage.rotated {
                hadamard::rotate(dst);
            }
        }
    }
}

/// Every `head_dim`-wide head of `rows` Hadamard-rotated.
fn rotate_heads(mut rows: Vec<f32>, head_dim: usize) -> Vec<f32> {
    rows.chunks_exact_mut(head_dim).for_each(hadamard::rotate);
    rows
}

/// Consecutive query rows of one sequence and the query heads of one KV head: query `i` of the tile is row
/// `q_row0 + i / group` (at position `first_pos + i / group`), head `kv_head * group + i % group`.
struct Tile<'a> {
    storage: &'a KvStore,
    layout: &'a KvLayout,
    layer: usize,
    kv_head: usize,
    block_table: &'a [u32],
    /// For a KIVI cache: what the tile's rows see (all of them the same).
    kivi: Option<KiviView<'a>>,
    first_pos: usize,
    rows: usize,
    group: usize,
    q: &'a [f32],
    q_row0: usize,
    q_width: usize,
}

impl Tile<'_> {
    fn queries(&self) -> usize {
        self.rows * self.group
    }
    /// Positions query `i` attends to (causal: up to and including its own).
    fn len(&self, i: usize) -> usize {
        self.first_pos + i / self.group + 1
    }
    fn query(&self, i: usize) -> &[f32] {
        let hd = self.layout.head_dim;
        let h = self.kv_head * self.group + i % self.group;
        &self.q[(self.q_row0 + i / self.group) * self.q_width + h * hd..][..hd]
    }

    /// Keys of block `b` (positions `b * bt ..`), transposed `[d][slot]`, `bt * hd` values; slots past
    /// `n_max` (positions no query of the tile reads) hold finite filler.
    #[inline(always)]
    fn keys_t<'a>(&'a self, b: usize, n_max: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        let l = self.layout;
        let (hd, bt) = (l.head_dim, l.block_tokens);
        if let (KvData::Kivi(store), Some(view)) = (&self.storage.data, &self.kivi) {
            scratch.clear();
            scratch.resize(bt * hd, 0.0);
            store.decode(view, (b * bt, n_max.min((b + 1) * bt)), true, scratch, bt);
            return scratch;
        }
        let base = self.block_table[b] as usize * l.block_elems() + l.head_offset(self.layer, 0, self.kv_head);
        self.storage.get(base, bt * hd, true, bt, hd, scratch)
    }

    /// Values of the first `block_len` slots of block `b`, as rows `[slot][d]`.
    #[inline(always)]
    fn values<'a>(&'a self, b: usize, block_len: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        let l = self.layout;
        let (hd, bt) = (l.head_dim, l.block_tokens);
        if let (KvData::Kivi(store), Some(view)) = (&self.storage.data, &self.kivi) {
            scratch.resize(block_len * hd, 0.0);
            store.decode(view, (b * bt, b * bt + block_len), false, scratch, hd);
            return &scratch[..block_len * hd];
        }
        let base = self.block_table[b] as usize * l.block_elems() + l.head_offset(self.layer, 1, self.kv_head);
        self.storage.get(base, block_len * hd, false, bt, hd, scratch)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn attend_avx512(tile: &Tile, s: &mut Scratch, out: &mut [f32]) {
    attend_blocks(SimdLevel::Avx512, tile, s, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn attend_avx2(tile: &Tile, s: &mut Scratch, out: &mut [f32]) {
    attend_blocks(SimdLevel::Avx2Fma, tile, s, out)
}

/// `acc[s] = sum_d (q[d] * scale) * keys_t[d * LANES + s]`, accumulated in `d` order with a separate multiply
/// and add on every level (the same bits as the portable loop). LLVM keeps the portable loop's 16 sums in
/// 16 scalar registers, so the x86 levels spell out the vector.
#[inline(always)]
fn block_scores(level: SimdLevel, keys_t: &[f32], q: &[f32], scale: f32) -> [f32; LANES] {
    assert_eq!(keys_t.len(), LANES * q.len(), "one transposed block of keys");
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the x86 levels are only passed by kernels compiled for (and dispatched on) those features.
        SimdLevel::Avx512 => unsafe { super::x86::block_scores16_avx512(keys_t, q, scale) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdLevel::Avx2Fma => unsafe { super::x86::block_scores16_avx2(keys_t, q, scale) },
        _ => {
            let mut acc = [0.0f32; LANES];
            for (col, &qd) in keys_t.chunks_exact(LANES).zip(q) {
                let qd = qd * scale;
                for (a, &kv) in acc.iter_mut().zip(col) {
                    *a += qd * kv;
                }
            }
            acc
        }
    }
}

/// Walks the sequence block by block: within a block one head's keys (transposed) and values are each one
/// contiguous run of `block_tokens * head_dim`, so both passes stream memory linearly, and each block is
/// fetched once for every query of the tile. Per query the arithmetic (and its order) is that of attending
/// it alone. `level` is a constant in each caller, so the kernel choices below fold away.
#[inline(always)]
fn attend_blocks(level: SimdLevel, tile: &Tile, s: &mut Scratch, out: &mut [f32]) {
    let Scratch { scores, keys: k_scratch, values: v_scratch } = s;
    let l = tile.layout;
    let (hd, bt) = (l.head_dim, l.block_tokens);
    let scale = 1.0 / (hd as f32).sqrt();
    let nq = tile.queries();
    // The last row sees the most positions; query i's scores live at `scores[i * n_max..][..len(i)]`.
    let n_max = tile.first_pos + tile.rows;
    scores.clear();
    scores.resize(nq * n_max, 0.0);
    let mut maxes = vec![f32::NEG_INFINITY; nq];
    for b in 0..n_max.div_ceil(bt) {
        // Keys are stored transposed ([d][slot]), so a block's scores accumulate as one vector over the
        // slots, one broadcast query element at a time: no horizontal reduction per key.
        let keys_t = tile.keys_t(b, n_max, k_scratch);
        for (i, max) in maxes.iter_mut().enumerate() {
            let n = tile.len(i);
            if b * bt >= n {
                continue;
            }
            let len = bt.min(n - b * bt);
            let sc = &mut scores[i * n_max + b * bt..][..len];
            let q = tile.query(i);
            if bt == LANES {
                // The default block size: the 16 scores live in one register for the whole loop over d
                // (through memory, each step would wait on the previous step's store). Lanes past `len` are
                // computed from unused slots and dropped.
                let acc = block_scores(level, &keys_t[..LANES * q.len()], q, scale);
                sc.copy_from_slice(&acc[..len]);
            } else {
                for (d, &qd) in q.iter().enumerate() {
                    let qd = qd * scale;
                    for (s, &kv) in sc.iter_mut().zip(&keys_t[d * bt..d * bt + len]) {
                        *s += qd * kv;
                    }
                }
            }
            *max = sc.iter().fold(*max, |m, &s| m.max(s));
        }
    }
    // Softmax per query; the normalisation is folded into the value weights below, as `inv`.
    for (i, inv) in maxes.iter_mut().enumerate() {
        let max = *inv;
        let mut sum = 0.0f32;
        for s in scores[i * n_max..][..tile.len(i)].iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        *inv = 1.0 / sum;
    }
    out.fill(0.0);
    for b in 0..n_max.div_ceil(bt) {
        let block_len = bt.min(n_max - b * bt);
        let values_all = tile.values(b, block_len, v_scratch);
        for (i, (out, &inv)) in out.chunks_exact_mut(hd).zip(maxes.iter()).enumerate() {
            let n = tile.len(i);
            if b * bt >= n {
                continue;
            }
            let len = bt.min(n - b * bt);
            let values = &values_all[..len * hd];
            let weights = &scores[i * n_max + b * bt..][..len];
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
}

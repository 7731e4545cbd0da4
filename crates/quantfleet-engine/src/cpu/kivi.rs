//! The int4 KIVI KV cache on the CPU (geometry and policy: `kv_cache::KiviGeometry`): tokens are written to
//! the fp16 window; when the ring of recent tokens is full, its oldest 32 tokens become an int4 key group
//! (keys per channel over the group's tokens, values per token over 32-channel groups, asymmetric, with
//! `quantfleet_quant`'s `GroupParams::fit` and f16 scale and zero point). Attention reads runs of positions
//! decoded to f32 ([`KiviStore::decode`]); `KiviStore::dequantize_reference` (tests only) is the element-at-a-time
//! reference it is tested against.
//!
//! Every query row sees the cache exactly as KIVI keeps it at the row's own length, also inside a prefill:
//! the first `quantized_groups(pos + 1)` groups in int4, everything after them in fp16. A batch that
//! quantizes groups overwrites ring slots that its earlier rows still read in fp16, so `write_spans` keeps an
//! fp16 copy of such a span's tail (the ring's tokens before the span, then the span's) for the attention
//! call that follows: transient memory like activations, `2 x (residual + span tokens) x kv width` f16 for
//! one layer, outside the KV budget. So a prompt prefilled in one call attends exactly as when fed one token
//! at a time.

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use quantfleet_quant::int4::GroupParams;

use crate::backend::SeqSpan;
use crate::error::{EngineError, Result};
use crate::kv_cache::{KIVI_GROUP, KiviGeometry};

/// All blocks of a KIVI cache as 16-bit words (`geom.layout` describes one block; see `KiviGeometry`).
pub(crate) struct KiviStore {
    pub geom: KiviGeometry,
    pub words: Vec<u16>,
    /// Per span of the last `write_spans` call: its fp16 tail copy, when the span quantized groups.
    pub staged: Vec<Option<Staged>>,
}

/// fp16 (bits) copies of positions `first..start_pos + n_tokens` of one span's sequence for one layer, rows
/// `[pos - first][kv head][d]`, kept by `write_spans` for the attention call of the same span.
pub(crate) struct Staged {
    pub layer: usize,
    pub start_pos: usize,
    pub n_tokens: usize,
    pub first: usize,
    pub k: Vec<u16>,
    pub v: Vec<u16>,
}

/// The cache as a tile of query rows sees it: `(layer, head)` of the sequence in `table`, its first `groups`
/// key groups int4, later positions fp16 (from `staged` when the span has a copy, else the ring).
#[derive(Clone, Copy)]
pub(crate) struct KiviView<'a> {
    pub table: &'a [u32],
    pub layer: usize,
    pub head: usize,
    pub groups: usize,
    pub staged: Option<&'a Staged>,
}

#[inline(always)]
fn nibble(words: &[u16], base: usize, idx: usize) -> u16 {
    (words[base + idx / 4] >> (4 * (idx % 4))) & 0xF
}

#[inline(always)]
fn set_nibble(words: &mut [u16], base: usize, idx: usize, v: u8) {
    let (w, shift) = (&mut words[base + idx / 4], 4 * (idx % 4));
    *w = (*w & !(0xF << shift)) | ((v as u16) << shift);
}

#[inline(always)]
fn half(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// Stores `p` as the f16 scale and zero point the block keeps. The codes were computed with the f32 scale:
/// the f16 scale moves a decoded value by at most `15 * scale * 2^-11` (zero points 0..15 are exact).
fn put_params(words: &mut [u16], at: usize, p: GroupParams) {
    words[at] = f16::from_f32(p.scale).to_bits();
    words[at + 1] = f16::from_f32(p.zero as f32).to_bits();
}

impl KiviStore {
    pub fn new(geom: KiviGeometry, n_blocks: usize) -> Result<Self> {
        let n = KiviGeometry::block_words(&geom.layout)
            .checked_mul(n_blocks)
            .ok_or_else(|| EngineError::InvalidRequest(format!("kv storage: {n_blocks} KIVI blocks overflow")))?;
        Ok(Self { geom, words: vec![0; n], staged: Vec::new() })
    }

    /// The fp16 window row (bits) of `pos`, `kind` 0 = K, 1 = V.
    fn window_row(&self, table: &[u32], layer: usize, kind: usize, head: usize, pos: usize) -> &[u16] {
        let g = &self.geom;
        let (index, row) = g.window_block(g.window_slot(pos));
        let at = self.block_base(table, index) + g.window_run(layer, kind, head) + row * g.layout.head_dim;
        &self.words[at..at + g.layout.head_dim]
    }

    /// The copy `spans[span]`'s attention reads, if `write_spans` kept one for this very span and layer.
    pub fn staged_for(&self, span_index: usize, span: &SeqSpan, layer: usize) -> Option<&Staged> {
        self.staged
            .get(span_index)?
            .as_ref()
            .filter(|s| (s.layer, s.start_pos, s.n_tokens) == (layer, span.start_pos, span.n_tokens))
    }

    /// Writes the rows of `k` and `v` (`[rows, n_kv_heads * head_dim]`) of `layer` at their spans' positions,
    /// in order, keeping an fp16 copy of the tail of every span that quantizes a group (see the module doc).
    pub fn write_spans(&mut self, layer: usize, k: &[f32], v: &[f32], spans: &[SeqSpan]) {
        let g = self.geom;
        let (hd, heads) = (g.layout.head_dim, g.layout.n_kv_heads);
        let width = heads * hd;
        self.staged.clear();
        for span in spans {
            let (start, end) = (span.start_pos, span.start_pos + span.n_tokens);
            let mut staged = (g.quantized_groups(end) > g.quantized_groups(start)).then(|| {
                let first = g.sink + KIVI_GROUP * g.quantized_groups(start);
                let rows = end - first.min(end);
                let mut s = Staged {
                    layer,
                    start_pos: start,
                    n_tokens: span.n_tokens,
                    first,
                    k: Vec::with_capacity(rows * width),
                    v: Vec::with_capacity(rows * width),
                };
                for p in first..start {
                    for h in 0..heads {
                        s.k.extend_from_slice(self.window_row(span.block_table, layer, 0, h, p));
                        s.v.extend_from_slice(self.window_row(span.block_table, layer, 1, h, p));
                    }
                }
                s
            });
            for i in 0..span.n_tokens {
                let row = (span.row0 + i) * width;
                let (k, v) = (&k[row..row + width], &v[row..row + width]);
                self.write(span.block_table, layer, start + i, k, v);
                if let Some(s) = staged.as_mut().filter(|s| start + i >= s.first) {
                    s.k.extend(k.iter().map(|&x| f16::from_f32(x).to_bits()));
                    s.v.extend(v.iter().map(|&x| f16::from_f32(x).to_bits()));
                }
            }
            self.staged.push(staged);
        }
    }

    fn block_base(&self, table: &[u32], index: usize) -> usize {
        table[index] as usize * KiviGeometry::block_words(&self.geom.layout)
    }

    /// Writes token `pos` of `layer` (`k`, `v`: all KV heads, `n_kv_heads * head_dim`) of a sequence whose
    /// positions before `pos` are written. When the ring is full, its oldest group is quantized first.
    fn write(&mut self, table: &[u32], layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let g = self.geom;
        let hd = g.layout.head_dim;
        let before = g.quantized_groups(pos);
        if g.quantized_groups(pos + 1) > before {
            self.quantize_group(table, layer, before);
        }
        let (index, row) = g.window_block(g.window_slot(pos));
        let base = self.block_base(table, index);
        for h in 0..g.layout.n_kv_heads {
            for (kind, src) in [(0, k), (1, v)] {
                let at = base + g.window_run(layer, kind, h) + row * hd;
                for (w, &x) in self.words[at..at + hd].iter_mut().zip(&src[h * hd..(h + 1) * hd]) {
                    *w = f16::from_f32(x).to_bits();
                }
            }
        }
    }

    /// Turns ring positions `sink + 32 group ..` (all heads of `layer`) into int4 group `group`.
    fn quantize_group(&mut self, table: &[u32], layer: usize, group: usize) {
        let g = self.geom;
        let hd = g.layout.head_dim;
        let first = g.sink + group * KIVI_GROUP;
        let dst = self.block_base(table, g.group_block(group));
        let (mut keys, mut values) = (vec![0f32; KIVI_GROUP * hd], vec![0f32; KIVI_GROUP * hd]);
        let mut column = [0f32; KIVI_GROUP];
        for h in 0..g.layout.n_kv_heads {
            for t in 0..KIVI_GROUP {
                let (index, row) = g.window_block(g.window_slot(first + t));
                let base = self.block_base(table, index);
                for (kind, out) in [(0, &mut keys), (1, &mut values)] {
                    let at = base + g.window_run(layer, kind, h) + row * hd;
                    self.words[at..at + hd].reinterpret_cast::<f16>().convert_to_f32_slice(&mut out[t * hd..][..hd]);
                }
            }
            let key_run = dst + g.group_run(layer, h);
            for d in 0..hd {
                column.iter_mut().enumerate().for_each(|(t, c)| *c = keys[t * hd + d]);
                let p = GroupParams::fit(&column, false, 1.0);
                for (t, &x) in column.iter().enumerate() {
                    set_nibble(&mut self.words, key_run, d * KIVI_GROUP + t, p.quantize(x));
                }
                put_params(&mut self.words, key_run + 8 * hd + 2 * d, p);
            }
            let value_run = key_run + KiviGeometry::key_run_words(hd);
            let groups = hd.div_ceil(KIVI_GROUP);
            for t in 0..KIVI_GROUP {
                for (gi, chunk) in values[t * hd..(t + 1) * hd].chunks(KIVI_GROUP).enumerate() {
                    let p = GroupParams::fit(chunk, false, 1.0);
                    for (c, &x) in chunk.iter().enumerate() {
                        set_nibble(&mut self.words, value_run, t * hd + gi * KIVI_GROUP + c, p.quantize(x));
                    }
                    put_params(&mut self.words, value_run + 8 * hd + 2 * (t * groups + gi), p);
                }
            }
        }
    }

    /// Decodes positions `lo..hi` of what `view` sees (`hi` at most the span's end): keys transposed into
    /// `out[d * stride + (p - lo)]`, values as rows into `out[(p - lo) * head_dim + d]`.
    /// Works a run at a time (a stretch of window rows in one block, or of one int4 group) so each run's
    /// f16 rows convert in bulk and each channel's scale and zero point decode once.
    pub fn decode(&self, view: &KiviView, (lo, hi): (usize, usize), key: bool, out: &mut [f32], stride: usize) {
        let KiviView { table, layer, head, groups, staged } = *view;
        let g = &self.geom;
        let hd = g.layout.head_dim;
        let kind = usize::from(!key);
        let mut rows = [0f32; 16 * 128];
        let mut p = lo;
        while p < hi {
            let i = p - lo;
            let in_group = p >= g.sink && (p - g.sink) / KIVI_GROUP < groups;
            if in_group {
                let (group, slot) = ((p - g.sink) / KIVI_GROUP, (p - g.sink) % KIVI_GROUP);
                let n = (KIVI_GROUP - slot).min(hi - p);
                let key_run = self.block_base(table, g.group_block(group)) + g.group_run(layer, head);
                if key {
                    for d in 0..hd {
                        let at = key_run + 8 * hd + 2 * d;
                        let (scale, zero) = (half(self.words[at]), half(self.words[at + 1]));
                        for j in 0..n {
                            let c = nibble(&self.words, key_run, d * KIVI_GROUP + slot + j) as f32;
                            out[d * stride + i + j] = (c - zero) * scale;
                        }
                    }
                } else {
                    let value_run = key_run + KiviGeometry::key_run_words(hd);
                    let groups = hd.div_ceil(KIVI_GROUP);
                    for j in 0..n {
                        let t = slot + j;
                        let row = &mut out[(i + j) * hd..][..hd];
                        for (gi, chunk) in row.chunks_mut(KIVI_GROUP).enumerate() {
                            let at = value_run + 8 * hd + 2 * (t * groups + gi);
                            let (scale, zero) = (half(self.words[at]), half(self.words[at + 1]));
                            for (c, o) in chunk.iter_mut().enumerate() {
                                let code = nibble(&self.words, value_run, t * hd + gi * KIVI_GROUP + c) as f32;
                                *o = (code - zero) * scale;
                            }
                        }
                    }
                }
                p += n;
                continue;
            }
            // A stretch of window rows: consecutive slots inside one block, not past the sinks or the ring's end.
            let slot = g.window_slot(p);
            let (index, row) = g.window_block(slot);
            if let Some(s) = staged.filter(|_| p >= g.sink) {
                // The span's fp16 copy: every later position is in it.
                let width = g.layout.n_kv_heads * hd;
                let bits = if key { &s.k } else { &s.v };
                for j in 0..hi - p {
                    let src = bits[(p + j - s.first) * width + head * hd..][..hd].reinterpret_cast::<f16>();
                    if key {
                        src.iter().enumerate().for_each(|(d, x)| out[d * stride + i + j] = x.to_f32());
                    } else {
                        src.convert_to_f32_slice(&mut out[(i + j) * hd..][..hd]);
                    }
                }
                break;
            }
            // Sinks are consecutive slots up to `sink`; ring positions are consecutive slots up to the ring's
            // end (and never followed by an int4 group: groups are older).
            let region_end = if p < g.sink { g.sink } else { g.window_tokens() };
            let n = (hi - p).min(g.window_rows - row).min(region_end - slot);
            let at = self.block_base(table, index) + g.window_run(layer, kind, head) + row * hd;
            let src = self.words[at..at + n * hd].reinterpret_cast::<f16>();
            if key {
                // Transpose through a stack buffer, as many rows at a time as it holds.
                let chunk_rows = rows.len() / hd;
                if chunk_rows == 0 {
                    for (j, row) in src.chunks_exact(hd).enumerate() {
                        row.iter().enumerate().for_each(|(d, x)| out[d * stride + i + j] = x.to_f32());
                    }
                }
                for (c, part) in src.chunks(chunk_rows.max(1) * hd).enumerate().filter(|_| chunk_rows > 0) {
                    let m = part.len() / hd;
                    part.convert_to_f32_slice(&mut rows[..part.len()]);
                    for d in 0..hd {
                        for j in 0..m {
                            out[d * stride + i + c * chunk_rows + j] = rows[j * hd + d];
                        }
                    }
                }
            } else {
                src.convert_to_f32_slice(&mut out[i * hd..(i + n) * hd]);
            }
            p += n;
        }
    }

    #[cfg(test)]
    /// Scalar reference: every position `0..len` of `(layer, head)` decoded one element at a time,
    /// `(keys, values)` as `[len][head_dim]` rows.
    pub fn dequantize_reference(&self, table: &[u32], layer: usize, head: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
        let g = &self.geom;
        let hd = g.layout.head_dim;
        let (mut keys, mut values) = (Vec::with_capacity(len * hd), Vec::with_capacity(len * hd));
        for p in 0..len {
            for d in 0..hd {
                match g.group_of(p, len) {
                    Some((group, slot)) => {
                        let key_run = self.block_base(table, g.group_block(group)) + g.group_run(layer, head);
                        let at = key_run + 8 * hd + 2 * d;
                        let code = nibble(&self.words, key_run, d * KIVI_GROUP + slot) as f32;
                        keys.push((code - half(self.words[at + 1])) * half(self.words[at]));
                        let value_run = key_run + KiviGeometry::key_run_words(hd);
                        let at = value_run + 8 * hd + 2 * (slot * hd.div_ceil(KIVI_GROUP) + d / KIVI_GROUP);
                        let code = nibble(&self.words, value_run, slot * hd + d) as f32;
                        values.push((code - half(self.words[at + 1])) * half(self.words[at]));
                    }
                    None => {
                        let (index, row) = g.window_block(g.window_slot(p));
                        let base = self.block_base(table, index) + row * hd + d;
                        keys.push(half(self.words[base + g.window_run(layer, 0, head)]));
                        values.push(half(self.words[base + g.window_run(layer, 1, head)]));
                    }
                }
            }
        }
        (keys, values)
    }
}

#[cfg(test)]
#[path = "kivi_tests.rs"]
mod tests;

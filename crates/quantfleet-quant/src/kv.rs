//! KV-cache quantization.
//! * Per-token, per-head: each (token, head) vector of `head_dim` values gets its own scale. FP8 E4M3
//!   (scale = amax / 448), INT8 (amax / 127) or asymmetric INT4 (one group per head, the baseline KIVI beats).
//! * KIVI INT4 ([`KiviCache`]): keys quantized per CHANNEL over blocks of `group_tokens` tokens (key outliers
//!   live in fixed channels, so per-token scales waste their range), values per token; the most recent
//!   `residual_tokens` tokens and the first `sink_tokens` attention-sink tokens stay in f32.
//!
//! A token row is `n_heads * head_dim` values, head-major (head h occupies `h*head_dim .. (h+1)*head_dim`).

use crate::error::{QuantError, Result, check_finite};
use crate::fp8::{Fp8Format, Saturation};
use crate::int4::GroupParams;
use crate::matrix::{MatrixRef, amax};

/// Shape of one token's K (or V) row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub n_heads: usize,
    pub head_dim: usize,
}

impl KvLayout {
    pub fn row_len(&self) -> usize {
        self.n_heads * self.head_dim
    }
    fn check(&self, cols: usize) -> Result<()> {
        if self.n_heads == 0 || self.head_dim == 0 {
            return Err(QuantError::Empty { what: "KV layout" });
        }
        if cols != self.row_len() {
            return Err(QuantError::GroupSizeNotDividing {
                what: "KV row length",
                len: cols,
                group_size: self.head_dim,
            });
        }
        Ok(())
    }
}

/// Element type of a per-token KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDtype {
    Fp8E4M3,
    Int8,
    Int4,
}

/// Tokens quantized per (token, head).
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedKv {
    pub dtype: KvDtype,
    pub layout: KvLayout,
    pub n_tokens: usize,
    /// FP8 codes, INT8 codes (two's complement) or INT4 nibbles (`ceil(head_dim/2)` bytes per head).
    pub codes: Vec<u8>,
    /// One scale per (token, head).
    pub scales: Vec<f32>,
    /// INT4 zero points per (token, head); empty otherwise.
    pub zeros: Vec<u8>,
}

impl QuantizedKv {
    fn head_bytes(&self) -> usize {
        match self.dtype {
            KvDtype::Int4 => self.layout.head_dim.div_ceil(2),
            _ => self.layout.head_dim,
        }
    }

    /// Dequantize token `t` into `out` (`n_heads * head_dim` values).
    pub fn dequantize_token(&self, t: usize, out: &mut [f32]) -> Result<()> {
        if t >= self.n_tokens {
            return Err(QuantError::RowOutOfRange { row: t, rows: self.n_tokens });
        }
        if out.len() != self.layout.row_len() {
            return Err(QuantError::LengthMismatch {
                what: "KV row",
                expected: self.layout.row_len(),
                actual: out.len(),
            });
        }
        let hb = self.head_bytes();
        for (h, o) in out.chunks_mut(self.layout.head_dim).enumerate() {
            let i = t * self.layout.n_heads + h;
            let codes = &self.codes[i * hb..(i + 1) * hb];
            let s = self.scales[i];
            match self.dtype {
                KvDtype::Fp8E4M3 => o.iter_mut().zip(codes).for_each(|(o, &c)| *o = Fp8Format::E4M3.decode(c) * s),
                KvDtype::Int8 => o.iter_mut().zip(codes).for_each(|(o, &c)| *o = c as i8 as f32 * s),
                KvDtype::Int4 => {
                    let p = GroupParams { scale: s, zero: self.zeros[i] };
                    for (d, o) in o.iter_mut().enumerate() {
                        *o = p.dequantize((codes[d / 2] >> (4 * (d % 2))) & 0xF);
                    }
                }
            }
        }
        Ok(())
    }

    /// All tokens dequantized, `[n_tokens x row_len]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n_tokens * self.layout.row_len()];
        for (t, row) in out.chunks_mut(self.layout.row_len()).enumerate() {
            // Cannot fail: t < n_tokens and rows have the layout's length.
            let _ = self.dequantize_token(t, row);
        }
        out
    }
}

/// Quantize `[n_tokens x n_heads*head_dim]` K or V rows per (token, head).
pub fn quantize_kv_per_token(rows: &MatrixRef<'_>, layout: KvLayout, dtype: KvDtype) -> Result<QuantizedKv> {
    layout.check(rows.cols())?;
    let d = layout.head_dim;
    let mut q =
        QuantizedKv { dtype, layout, n_tokens: rows.rows(), codes: Vec::new(), scales: Vec::new(), zeros: Vec::new() };
    for t in 0..rows.rows() {
        for head in rows.row(t).chunks(d) {
            match dtype {
                KvDtype::Fp8E4M3 => {
                    let s = crate::fp8_matrix::fp8_scale(Fp8Format::E4M3, amax(head));
                    q.codes.extend(head.iter().map(|&x| Fp8Format::E4M3.encode(x / s, Saturation::Saturating)));
                    q.scales.push(s);
                }
                KvDtype::Int8 => {
                    let s = crate::int8::int8_scale(amax(head));
                    q.codes.extend(head.iter().map(|&x| (x / s).round_ties_even().clamp(-127.0, 127.0) as i8 as u8));
                    q.scales.push(s);
                }
                KvDtype::Int4 => {
                    let p = GroupParams::fit(head, false, 1.0);
                    let nibbles: Vec<u8> = head.iter().map(|&x| p.quantize(x)).collect();
                    q.codes.extend(crate::int4::pack_nibbles(&nibbles));
                    q.scales.push(p.scale);
                    q.zeros.push(p.zero);
                }
            }
        }
    }
    Ok(q)
}

/// KIVI settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KiviConfig {
    pub layout: KvLayout,
    /// Tokens per key block: keys share per-channel scales across this many tokens (KIVI uses 32-128).
    pub group_tokens: usize,
    /// Most recent tokens kept in f32.
    pub residual_tokens: usize,
    /// First tokens (attention sinks) kept in f32 for the life of the cache.
    pub sink_tokens: usize,
}

/// One block of `group_tokens` keys quantized per channel: value = `(nibble - zero[c]) * scale[c]`.
#[derive(Clone, Debug)]
struct KeyBlock {
    /// Token-major nibbles, `ceil(row_len / 2)` bytes per token.
    packed: Vec<u8>,
    params: Vec<GroupParams>,
}

/// A streaming KIVI INT4 KV cache for one layer.
#[derive(Clone, Debug)]
pub struct KiviCache {
    config: KiviConfig,
    sink_k: Vec<f32>,
    sink_v: Vec<f32>,
    key_blocks: Vec<KeyBlock>,
    /// Quantized values of the tokens covered by `key_blocks`.
    values: Vec<QuantizedKv>,
    residual_k: Vec<f32>,
    residual_v: Vec<f32>,
}

impl KiviCache {
    pub fn new(config: KiviConfig) -> Result<Self> {
        config.layout.check(config.layout.row_len())?;
        if config.group_tokens == 0 {
            return Err(QuantError::InvalidParameter { name: "group_tokens", reason: "must be at least 1".into() });
        }
        Ok(Self {
            config,
            sink_k: Vec::new(),
            sink_v: Vec::new(),
            key_blocks: Vec::new(),
            values: Vec::new(),
            residual_k: Vec::new(),
            residual_v: Vec::new(),
        })
    }

    /// Number of tokens held.
    pub fn len(&self) -> usize {
        let row = self.config.layout.row_len();
        (self.sink_k.len() + self.residual_k.len()) / row + self.key_blocks.len() * self.config.group_tokens
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of tokens currently stored in f32 (sinks plus residual window).
    pub fn full_precision_tokens(&self) -> usize {
        (self.sink_k.len() + self.residual_k.len()) / self.config.layout.row_len()
    }

    /// Append one token's K and V rows.
    pub fn push(&mut self, k: &[f32], v: &[f32]) -> Result<()> {
        let row = self.config.layout.row_len();
        for (what, x) in [("key row", k), ("value row", v)] {
            if x.len() != row {
                return Err(QuantError::LengthMismatch { what, expected: row, actual: x.len() });
            }
            check_finite(what, x)?;
        }
        if self.sink_k.len() < self.config.sink_tokens * row {
            self.sink_k.extend_from_slice(k);
            self.sink_v.extend_from_slice(v);
            return Ok(());
        }
        self.residual_k.extend_from_slice(k);
        self.residual_v.extend_from_slice(v);
        let g = self.config.group_tokens;
        if self.residual_k.len() >= (self.config.residual_tokens + g) * row {
            self.flush_oldest_block()?;
        }
        Ok(())
    }

    fn flush_oldest_block(&mut self) -> Result<()> {
        let row = self.config.layout.row_len();
        let g = self.config.group_tokens;
        let k: Vec<f32> = self.residual_k.drain(..g * row).collect();
        let v: Vec<f32> = self.residual_v.drain(..g * row).collect();
        // Keys: one asymmetric group per channel, spanning the block's tokens.
        let params: Vec<GroupParams> = (0..row)
            .map(|c| {
                let column: Vec<f32> = (0..g).map(|t| k[t * row + c]).collect();
                GroupParams::fit(&column, false, 1.0)
            })
            .collect();
        let nibbles: Vec<u8> = k.iter().enumerate().map(|(i, &x)| params[i % row].quantize(x)).collect();
        let packed = nibbles.chunks(row).flat_map(crate::int4::pack_nibbles).collect();
        self.key_blocks.push(KeyBlock { packed, params });
        let vm = MatrixRef::new("value rows", &v, g, row)?;
        self.values.push(quantize_kv_per_token(&vm, self.config.layout, KvDtype::Int4)?);
        Ok(())
    }

    /// All keys in token order, dequantized, `[len x row_len]`.
    pub fn keys(&self) -> Vec<f32> {
        let row = self.config.layout.row_len();
        let rb = row.div_ceil(2);
        let mut out = self.sink_k.clone();
        for b in &self.key_blocks {
            for t in 0..self.config.group_tokens {
                let bytes = &b.packed[t * rb..(t + 1) * rb];
                out.extend((0..row).map(|c| b.params[c].dequantize((bytes[c / 2] >> (4 * (c % 2))) & 0xF)));
            }
        }
        out.extend_from_slice(&self.residual_k);
        out
    }

    /// All values in token order, dequantized, `[len x row_len]`.
    pub fn values(&self) -> Vec<f32> {
        let mut out = self.sink_v.clone();
        for v in &self.values {
            out.extend(v.dequantize());
        }
        out.extend_from_slice(&self.residual_v);
        out
    }
}

/// Reference single-query attention per head (no GQA): softmax(q.k / sqrt(d)) v, computed in f64.
/// `q` is one row; `k`, `v` are `[n_tokens x row_len]`. Used to measure what KV quantization does to outputs.
pub fn attention_reference(q: &[f32], k: &[f32], v: &[f32], layout: KvLayout) -> Result<Vec<f32>> {
    let row = layout.row_len();
    layout.check(q.len())?;
    if k.is_empty() || k.len() != v.len() || !k.len().is_multiple_of(row) {
        return Err(QuantError::LengthMismatch { what: "K/V rows", expected: k.len(), actual: v.len() });
    }
    let n = k.len() / row;
    let d = layout.head_dim;
    let mut out = vec![0f32; row];
    for h in 0..layout.n_heads {
        let qh = &q[h * d..(h + 1) * d];
        let logits: Vec<f64> = (0..n)
            .map(|t| {
                let kh = &k[t * row + h * d..t * row + (h + 1) * d];
                qh.iter().zip(kh).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() / (d as f64).sqrt()
            })
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
        let z: f64 = w.iter().sum();
        for j in 0..d {
            let acc: f64 = (0..n).map(|t| w[t] * v[t * row + h * d + j] as f64).sum();
            out[h * d + j] = (acc / z) as f32;
        }
    }
    Ok(out)
}

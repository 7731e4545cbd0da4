//! Decode attention over a block-paged KV cache, and the KV quantize/append kernels that fill it.
//! Layouts are documented in kernels/attention/attn_decode.cu; this module checks shapes and buffer sizes
//! against them. Block tables, sequence lengths and slot mappings are device data the kernels trust: the
//! caller guarantees `seq_len <= max_blocks * block_size` and block ids `< num_blocks`.

use crate::error::{KernelError, Result};
use crate::launch::{DeviceBuffer, KernelArg, Launch, LaunchConfig, buffer_arg};

/// Query heads per kv head one attention block serves; must equal QF_ATTN_MAX_GROUP in attn_decode.cu.
pub const MAX_GQA_GROUP: usize = 8;

/// Geometry of one layer's paged cache and of the decode batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedLayout {
    pub batch: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// 64 or 128 (the kernels give each lane D/32 contiguous dims).
    pub head_dim: usize,
    /// Tokens per cache block.
    pub block_size: usize,
    /// Physical blocks in the cache.
    pub num_blocks: usize,
    /// Columns of the block table (blocks per sequence at most).
    pub max_blocks: usize,
}

/// The cache buffers of one layer, by element type.
pub enum KvCache<'a> {
    F16 {
        k: &'a dyn DeviceBuffer,
        v: &'a dyn DeviceBuffer,
    },
    Fp8 {
        k: &'a dyn DeviceBuffer,
        v: &'a dyn DeviceBuffer,
        k_scale: &'a dyn DeviceBuffer,
        v_scale: &'a dyn DeviceBuffer,
    },
    Kivi {
        k: &'a dyn DeviceBuffer,
        v: &'a dyn DeviceBuffer,
        k_scale: &'a dyn DeviceBuffer,
        v_scale: &'a dyn DeviceBuffer,
        k_zero: &'a dyn DeviceBuffer,
        v_zero: &'a dyn DeviceBuffer,
        /// f16 residual (not yet quantized) block per (sequence, kv head).
        res_k: &'a dyn DeviceBuffer,
        res_v: &'a dyn DeviceBuffer,
    },
}

fn u32_of(kernel: &'static str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| KernelError::InvalidShape { kernel, reason: format!("{what} = {v} exceeds u32") })
}

impl PagedLayout {
    fn check(&self, kernel: &'static str) -> Result<()> {
        let bad = |reason: String| Err(KernelError::InvalidShape { kernel, reason });
        if self.batch == 0 || self.n_heads == 0 || self.n_kv_heads == 0 || self.block_size == 0 || self.max_blocks == 0
        {
            return bad(format!("empty dimension in {self:?}"));
        }
        if !matches!(self.head_dim, 64 | 128) {
            return bad(format!("head_dim {} (kernels exist for 64 and 128)", self.head_dim));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!("{} query heads do not share {} kv heads evenly", self.n_heads, self.n_kv_heads));
        }
        if self.n_heads / self.n_kv_heads > MAX_GQA_GROUP {
            return bad(format!(
                "{} query heads per kv head (the kernels serve up to {MAX_GQA_GROUP})",
                self.n_heads / self.n_kv_heads
            ));
        }
        if self.batch > 65535 || self.n_heads > u32::MAX as usize {
            return bad("batch above 65535 (grid y) or too many heads".into());
        }
        Ok(())
    }
    /// Tokens the cache holds (all blocks), per kv head.
    fn cache_tokens(&self) -> usize {
        self.num_blocks * self.n_kv_heads * self.block_size
    }
}

/// Attention of one query token per sequence: `out[b, h] = softmax(q . K^T * scale) V`.
#[allow(clippy::too_many_arguments)]
pub fn attn_decode(
    cache: KvCache<'_>,
    layout: PagedLayout,
    q: &dyn DeviceBuffer,
    out: &dyn DeviceBuffer,
    block_table: &dyn DeviceBuffer,
    seq_lens: &dyn DeviceBuffer,
    scale: f32,
) -> Result<Launch> {
    let l = layout;
    let kernel: &'static str = match (&cache, l.head_dim) {
        (KvCache::F16 { .. }, 64) => "attn_decode_f16_d64",
        (KvCache::F16 { .. }, _) => "attn_decode_f16_d128",
        (KvCache::Fp8 { .. }, 64) => "attn_decode_fp8_d64",
        (KvCache::Fp8 { .. }, _) => "attn_decode_fp8_d128",
        (KvCache::Kivi { .. }, 64) => "attn_decode_int4kivi_d64",
        (KvCache::Kivi { .. }, _) => "attn_decode_int4kivi_d128",
    };
    let mut extra = Vec::new();
    l.check(kernel)?;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(KernelError::InvalidShape { kernel, reason: format!("softmax scale {scale}") });
    }
    let elems = l.cache_tokens() * l.head_dim;
    match cache {
        KvCache::F16 { k, v } => {
            extra.push(buffer_arg(kernel, "k", k, 2 * elems)?);
            extra.push(buffer_arg(kernel, "v", v, 2 * elems)?);
        }
        KvCache::Fp8 { k, v, k_scale, v_scale } => {
            extra.push(buffer_arg(kernel, "k", k, elems)?);
            extra.push(buffer_arg(kernel, "v", v, elems)?);
            extra.push(buffer_arg(kernel, "k_scale", k_scale, 4 * l.cache_tokens())?);
            extra.push(buffer_arg(kernel, "v_scale", v_scale, 4 * l.cache_tokens())?);
        }
        KvCache::Kivi { k, v, k_scale, v_scale, k_zero, v_zero, res_k, res_v } => {
            let channels = l.num_blocks * l.n_kv_heads * l.head_dim;
            let residual = 2 * l.batch * l.n_kv_heads * l.block_size * l.head_dim;
            extra.push(buffer_arg(kernel, "k", k, elems / 2)?);
            extra.push(buffer_arg(kernel, "v", v, elems / 2)?);
            extra.push(buffer_arg(kernel, "k_scale", k_scale, 4 * channels)?);
            extra.push(buffer_arg(kernel, "v_scale", v_scale, 4 * l.cache_tokens())?);
            extra.push(buffer_arg(kernel, "k_zero", k_zero, channels)?);
            extra.push(buffer_arg(kernel, "v_zero", v_zero, l.cache_tokens())?);
            extra.push(buffer_arg(kernel, "res_k", res_k, residual)?);
            extra.push(buffer_arg(kernel, "res_v", res_v, residual)?);
        }
    }
    let qo = 2 * l.batch * l.n_heads * l.head_dim;
    let mut args = vec![
        buffer_arg(kernel, "q", q, qo)?,
        buffer_arg(kernel, "out", out, qo)?,
        buffer_arg(kernel, "block_table", block_table, 4 * l.batch * l.max_blocks)?,
        buffer_arg(kernel, "seq_lens", seq_lens, 4 * l.batch)?,
        KernelArg::F32(scale),
        KernelArg::U32(u32_of(kernel, "n_heads", l.n_heads)?),
        KernelArg::U32(u32_of(kernel, "n_kv_heads", l.n_kv_heads)?),
        KernelArg::U32(u32_of(kernel, "block_size", l.block_size)?),
        KernelArg::U32(u32_of(kernel, "max_blocks", l.max_blocks)?),
    ];
    args.extend(extra);
    // One block per (kv head, sequence): it serves all query heads of the kv head's GQA group.
    let config =
        LaunchConfig { grid: [l.n_kv_heads as u32, l.batch as u32, 1], block: [128, 1, 1], shared_mem_bytes: 0 };
    Ok(Launch { module: "attn_decode", kernel, config, args })
}

/// Where each sequence's new token goes.
pub enum KvAppendTarget<'a> {
    /// `slot_mapping[b]` = physical block * block_size + offset (negative: skip).
    F16 { slot_mapping: &'a dyn DeviceBuffer, k: &'a dyn DeviceBuffer, v: &'a dyn DeviceBuffer },
    Fp8 {
        slot_mapping: &'a dyn DeviceBuffer,
        k: &'a dyn DeviceBuffer,
        v: &'a dyn DeviceBuffer,
        k_scale: &'a dyn DeviceBuffer,
        v_scale: &'a dyn DeviceBuffer,
    },
    /// `positions[b]` = index of the new token in its sequence (negative: skip); the block table gives
    /// the physical block that a filled residual block is quantized into.
    Kivi { positions: &'a dyn DeviceBuffer, block_table: &'a dyn DeviceBuffer, cache: KvCache<'a> },
}

/// Appends `k_new`, `v_new` (`[batch x n_kv_heads x head_dim]` f16) to the cache.
pub fn kv_append(
    target: KvAppendTarget<'_>,
    layout: PagedLayout,
    k_new: &dyn DeviceBuffer,
    v_new: &dyn DeviceBuffer,
) -> Result<Launch> {
    let l = layout;
    let kernel = match target {
        KvAppendTarget::F16 { .. } => "kv_append_f16",
        KvAppendTarget::Fp8 { .. } => "kv_append_fp8",
        KvAppendTarget::Kivi { .. } => "kv_append_kivi",
    };
    l.check(kernel)?;
    let new_bytes = 2 * l.batch * l.n_kv_heads * l.head_dim;
    let elems = l.cache_tokens() * l.head_dim;
    let mut args = vec![buffer_arg(kernel, "k_new", k_new, new_bytes)?, buffer_arg(kernel, "v_new", v_new, new_bytes)?];
    match target {
        KvAppendTarget::F16 { slot_mapping, k, v } => {
            args.push(buffer_arg(kernel, "slot_mapping", slot_mapping, 4 * l.batch)?);
            args.push(buffer_arg(kernel, "k", k, 2 * elems)?);
            args.push(buffer_arg(kernel, "v", v, 2 * elems)?);
        }
        KvAppendTarget::Fp8 { slot_mapping, k, v, k_scale, v_scale } => {
            args.push(buffer_arg(kernel, "slot_mapping", slot_mapping, 4 * l.batch)?);
            args.push(buffer_arg(kernel, "k", k, elems)?);
            args.push(buffer_arg(kernel, "v", v, elems)?);
            args.push(buffer_arg(kernel, "k_scale", k_scale, 4 * l.cache_tokens())?);
            args.push(buffer_arg(kernel, "v_scale", v_scale, 4 * l.cache_tokens())?);
        }
        KvAppendTarget::Kivi { positions, block_table, cache } => {
            let KvCache::Kivi { k, v, k_scale, v_scale, k_zero, v_zero, res_k, res_v } = cache else {
                return Err(KernelError::InvalidShape { kernel, reason: "KIVI append needs a KIVI cache".into() });
            };
            let channels = l.num_blocks * l.n_kv_heads * l.head_dim;
            let residual = 2 * l.batch * l.n_kv_heads * l.block_size * l.head_dim;
            args.push(buffer_arg(kernel, "positions", positions, 4 * l.batch)?);
            args.push(buffer_arg(kernel, "block_table", block_table, 4 * l.batch * l.max_blocks)?);
            args.push(KernelArg::U32(u32_of(kernel, "max_blocks", l.max_blocks)?));
            args.push(buffer_arg(kernel, "res_k", res_k, residual)?);
            args.push(buffer_arg(kernel, "res_v", res_v, residual)?);
            args.push(buffer_arg(kernel, "k", k, elems / 2)?);
            args.push(buffer_arg(kernel, "v", v, elems / 2)?);
            args.push(buffer_arg(kernel, "k_scale", k_scale, 4 * channels)?);
            args.push(buffer_arg(kernel, "v_scale", v_scale, 4 * l.cache_tokens())?);
            args.push(buffer_arg(kernel, "k_zero", k_zero, channels)?);
            args.push(buffer_arg(kernel, "v_zero", v_zero, l.cache_tokens())?);
        }
    }
    args.push(KernelArg::U32(u32_of(kernel, "n_kv_heads", l.n_kv_heads)?));
    args.push(KernelArg::U32(u32_of(kernel, "block_size", l.block_size)?));
    args.push(KernelArg::U32(u32_of(kernel, "head_dim", l.head_dim)?));
    let config =
        LaunchConfig { grid: [l.n_kv_heads as u32, l.batch as u32, 1], block: [128, 1, 1], shared_mem_bytes: 0 };
    Ok(Launch { module: "kv_append", kernel, config, args })
}

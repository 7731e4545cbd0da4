//! The paged KV cache: a fixed pool of blocks (each `block_tokens` positions of one sequence, all layers)
//! whose size comes from a byte budget, and per-sequence block tables. Sequences grow block by block and
//! return their blocks when dropped from the cache, so several sequences can share one budget (continuous
//! batching) and running out of budget is a clean `KvBudgetExhausted` error, never an allocation failure.

use crate::backend::{Backend, KvLayout};
use crate::error::{EngineError, Result};

/// Positions per block: small enough to waste little at the end of a sequence, large enough that attention
/// reads contiguous runs (16 x 64 f32 = 4 KiB per head) and block tables stay short.
pub const DEFAULT_BLOCK_TOKENS: usize = 16;

/// Element type of the KV cache. Quantized types carry one f32 scale per (token, layer, K/V, head),
/// as in `quantfleet_quant::kv::quantize_kv_per_token` and the fit planner's KV figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// Unquantized f32: the reference (oracle tests).
    #[default]
    F32,
    F16,
    Bf16,
    /// FP8 E4M3, saturating, scale = amax / 448 per (token, head).
    Fp8E4m3,
    /// INT8 symmetric, scale = amax / 127 per (token, head).
    Int8,
}

impl KvDtype {
    /// Bytes of one block of `layout` in this dtype, scales included.
    pub fn block_bytes(self, layout: &KvLayout) -> usize {
        let elems = layout.block_elems();
        match self {
            KvDtype::F32 => 4 * elems,
            KvDtype::F16 | KvDtype::Bf16 => 2 * elems,
            KvDtype::Fp8E4m3 | KvDtype::Int8 => elems + 4 * (elems / layout.head_dim),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "fp16",
            KvDtype::Bf16 => "bf16",
            KvDtype::Fp8E4m3 => "fp8-e4m3",
            KvDtype::Int8 => "int8",
        }
    }
}

pub struct KvCache<B: Backend> {
    pub layout: KvLayout,
    pub dtype: KvDtype,
    pub storage: B::KvStorage,
    free: Vec<u32>,
    total_blocks: usize,
}

/// One sequence's view of the cache: which blocks hold its positions and how many positions are filled.
#[derive(Debug, Default, Clone)]
pub struct SeqKv {
    pub block_table: Vec<u32>,
    pub len: usize,
}

impl<B: Backend> KvCache<B> {
    /// A cache of as many blocks as fit in `budget_bytes` (f32 K and V).
    pub fn with_budget(backend: &B, layout: KvLayout, budget_bytes: usize) -> Result<Self> {
        Self::with_budget_dtype(backend, layout, KvDtype::F32, budget_bytes)
    }

    /// A cache of as many blocks of `dtype` as fit in `budget_bytes`: the smaller the dtype, the more blocks.
    pub fn with_budget_dtype(backend: &B, layout: KvLayout, dtype: KvDtype, budget_bytes: usize) -> Result<Self> {
        let block_bytes = dtype.block_bytes(&layout);
        let total_blocks = budget_bytes / block_bytes;
        if total_blocks == 0 {
            return Err(EngineError::InvalidRequest(format!(
                "KV budget of {budget_bytes} bytes is smaller than one block ({block_bytes} bytes)"
            )));
        }
        let storage = backend.new_kv_storage(layout, dtype, total_blocks)?;
        // Hand out low block ids first (pop from the end).
        let free = (0..total_blocks as u32).rev().collect();
        Ok(Self { layout, dtype, storage, free, total_blocks })
    }

    pub fn block_bytes(&self) -> usize {
        self.dtype.block_bytes(&self.layout)
    }

    pub fn total_blocks(&self) -> usize {
        self.total_blocks
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Makes `seq` able to hold `new_len` positions, taking blocks from the pool. All or nothing: on error
    /// the sequence and the pool are unchanged.
    pub fn reserve(&mut self, seq: &mut SeqKv, new_len: usize) -> Result<()> {
        let needed = new_len.div_ceil(self.layout.block_tokens).saturating_sub(seq.block_table.len());
        if needed > self.free.len() {
            return Err(EngineError::KvBudgetExhausted {
                needed_blocks: needed,
                free_blocks: self.free.len(),
                total_blocks: self.total_blocks,
            });
        }
        for _ in 0..needed {
            // Cannot be None: checked above.
            if let Some(b) = self.free.pop() {
                seq.block_table.push(b);
            }
        }
        Ok(())
    }

    /// Returns all of the sequence's blocks to the pool.
    pub fn release(&mut self, seq: &mut SeqKv) {
        self.free.extend(seq.block_table.drain(..).rev());
        seq.len = 0;
    }

    /// Forgets positions from `len` on (e.g. to re-run a suffix), returning blocks no longer needed.
    pub fn truncate(&mut self, seq: &mut SeqKv, len: usize) {
        if len >= seq.len {
            return;
        }
        let keep = len.div_ceil(self.layout.block_tokens);
        self.free.extend(seq.block_table.drain(keep..).rev());
        seq.len = len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;

    fn layout() -> KvLayout {
        KvLayout { n_layers: 2, n_kv_heads: 1, head_dim: 4, block_tokens: 4 }
    }

    #[test]
    fn budget_limits_blocks_and_exhaustion_is_a_clean_error() {
        let cpu = CpuBackend::new();
        let block_bytes = layout().block_elems() * 4;
        let mut kv = KvCache::with_budget(&cpu, layout(), 3 * block_bytes + 1).unwrap();
        assert_eq!(kv.total_blocks(), 3);
        let (mut a, mut b) = (SeqKv::default(), SeqKv::default());
        kv.reserve(&mut a, 5).unwrap(); // 2 blocks
        assert_eq!(a.block_table, vec![0, 1]);
        let err = kv.reserve(&mut b, 8).unwrap_err();
        assert!(matches!(err, EngineError::KvBudgetExhausted { needed_blocks: 2, free_blocks: 1, .. }));
        assert!(b.block_table.is_empty(), "failed reserve must not take blocks");
        a.len = 5;
        kv.truncate(&mut a, 3);
        assert_eq!((a.block_table.len(), kv.free_blocks()), (1, 2));
        kv.reserve(&mut b, 8).unwrap();
        kv.release(&mut a);
        kv.release(&mut b);
        assert_eq!(kv.free_blocks(), 3);
        assert!(KvCache::with_budget(&cpu, layout(), block_bytes - 1).is_err());
    }

    #[test]
    fn smaller_dtypes_get_more_blocks_from_the_same_budget() {
        let cpu = CpuBackend::new();
        // SmolLM2-135M's geometry: 30 layers, 3 KV heads of 64, 16-token blocks.
        let l = KvLayout { n_layers: 30, n_kv_heads: 3, head_dim: 64, block_tokens: 16 };
        let budget = 64 << 20;
        let blocks = |d| KvCache::with_budget_dtype(&cpu, l, d, budget).unwrap().total_blocks();
        let (f32b, f16b, bf16b, fp8b, i8b) = (
            blocks(KvDtype::F32),
            blocks(KvDtype::F16),
            blocks(KvDtype::Bf16),
            blocks(KvDtype::Fp8E4m3),
            blocks(KvDtype::Int8),
        );
        // Per token: f32 46080 B, fp16 23040 B, fp8/int8 11520 B of codes + 720 B of scales.
        assert_eq!(KvDtype::F32.block_bytes(&l), 16 * 46080);
        assert_eq!(KvDtype::Fp8E4m3.block_bytes(&l), 16 * (11520 + 720));
        assert_eq!((f32b, f16b, bf16b), (budget / (16 * 46080), budget / (16 * 23040), budget / (16 * 23040)));
        assert_eq!((fp8b, i8b), (budget / (16 * 12240), budget / (16 * 12240)));
        assert!(f32b < f16b && f16b < fp8b);
    }
}

//! The paged KV cache: a fixed pool of blocks (each `block_tokens` positions of one sequence, all layers)
//! whose size comes from a byte budget, and per-sequence block tables. Sequences grow block by block and
//! return their blocks when dropped from the cache, so several sequences can share one budget (continuous
//! batching) and running out of budget is a clean `KvBudgetExhausted` error, never an allocation failure.
//!
//! An int4 KIVI cache ([`KvDtype::Int4Kivi`], geometry in [`KiviGeometry`]) uses the same pool differently:
//! every block has the bytes of one 32-token int4 group, and a sequence's block table starts with the blocks
//! of its fp16 window (sink tokens and the recent residual tokens, as many fp16 token rows per block as fit)
//! followed by one block per int4 key group. Its bytes per sequence are the fit planner's
//! (`quantfleet_api::plan::kv::KvPlan::bytes_for_context`) rounded up to whole blocks: see
//! [`KiviGeometry::blocks_for`].

use crate::backend::{Backend, KvLayout};
use crate::error::{EngineError, Result};

/// Positions per block: small enough to waste little at the end of a sequence, large enough that attention
/// reads contiguous runs (16 x 64 f32 = 4 KiB per head) and block tables stay short.
pub const DEFAULT_BLOCK_TOKENS: usize = 16;

/// Tokens per KIVI key group, channels per KIVI value group, and tokens per block of a KIVI cache: the fit
/// planner's `KIVI_GROUP`, so the engine stores what the planner counts.
pub const KIVI_GROUP: usize = quantfleet_api::plan::kv::KIVI_GROUP as usize;

/// Element type of the KV cache. The 8-bit types carry one f32 scale per (token, layer, K/V, head),
/// as in `quantfleet_quant::kv::quantize_kv_per_token` and the fit planner's KV figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// Unquantized f32: the reference (oracle tests).
    #[default]
    F32,
    F16,
    Bf16,
    /// FP8 E4M3, saturating, scale = amax / 448 per (token, head), of the rotated head ([`KvDtype::rotated`]).
    Fp8E4m3,
    /// INT8 symmetric, scale = amax / 127 per (token, head), of the rotated head.
    Int8,
    /// INT4 asymmetric per (token, head) of the rotated head: `quantfleet_quant`'s per-token INT4
    /// (`GroupParams::fit` over the head's `head_dim` values, codes 0..15), its scale and zero point kept as
    /// f16. Even rotated, 16 levels per head lose far more than [`KvDtype::Int4Kivi`]'s per-channel keys.
    Int4PerToken,
    /// INT4 KIVI (asymmetric, f16 scale and f16 zero point per group): keys per channel over groups of
    /// [`KIVI_GROUP`] tokens, values per token over groups of [`KIVI_GROUP`] channels; the first
    /// `sink_tokens` tokens and (at most) the `residual_tokens` most recent ones stay in fp16.
    Int4Kivi {
        sink_tokens: u32,
        residual_tokens: u32,
    },
}

impl KvDtype {
    /// The layout a cache of this dtype uses for a model's `layout`: a KIVI block is one key group
    /// ([`KIVI_GROUP`] tokens) whatever block size was asked for; other dtypes keep `layout`.
    pub fn cache_layout(self, layout: KvLayout) -> KvLayout {
        match self {
            KvDtype::Int4Kivi { .. } => KvLayout { block_tokens: KIVI_GROUP, ..layout },
            _ => layout,
        }
    }

    /// Bytes of one block of `layout` (see [`KvDtype::cache_layout`]) in this dtype, scales included.
    pub fn block_bytes(self, layout: &KvLayout) -> usize {
        let elems = layout.block_elems();
        match self {
            KvDtype::F32 => 4 * elems,
            KvDtype::F16 | KvDtype::Bf16 => 2 * elems,
            KvDtype::Fp8E4m3 | KvDtype::Int8 => elems + 4 * (elems / layout.head_dim),
            KvDtype::Int4PerToken => elems.div_ceil(2) + 4 * (elems / layout.head_dim),
            KvDtype::Int4Kivi { .. } => 2 * KiviGeometry::block_words(layout),
        }
    }

    /// Blocks one sequence of `tokens` positions takes (KIVI: an error for an invalid window).
    pub fn blocks_for(self, layout: &KvLayout, tokens: usize) -> Result<usize> {
        Ok(match self {
            KvDtype::Int4Kivi { .. } => KiviGeometry::new(self.cache_layout(*layout), self)?.blocks_for(tokens),
            _ => tokens.div_ceil(layout.block_tokens),
        })
    }

    /// Bytes of the blocks one sequence of `tokens` positions takes: a budget that holds exactly it.
    pub fn sequence_bytes(self, layout: &KvLayout, tokens: usize) -> Result<usize> {
        Ok(self.blocks_for(layout, tokens)? * self.block_bytes(&self.cache_layout(*layout)))
    }

    /// Whether this cache keeps keys and values Hadamard-rotated (`quantfleet_quant::hadamard`): the per-token
    /// quantized dtypes (FP8, INT8, per-token INT4) do, so that the keys' outlier channels are spread over the
    /// head before one scale per (token, head) is fitted; attention rotates its queries the same way and its
    /// output back, which is exact in exact arithmetic. 16-bit caches need no help and KIVI already quantizes
    /// keys per channel.
    pub fn rotated(self) -> bool {
        matches!(self, KvDtype::Fp8E4m3 | KvDtype::Int8 | KvDtype::Int4PerToken)
    }

    /// Checks the rules of a KIVI cache's full-precision window, which do not depend on the model's shape
    /// (a tier spec is checked with it before its model loads); other dtypes have no window.
    pub fn check_window(self) -> Result<()> {
        if let KvDtype::Int4Kivi { residual_tokens, .. } = self
            && (residual_tokens as usize) < KIVI_GROUP
        {
            return Err(EngineError::UnsupportedModel(format!(
                "int4 KIVI KV cache: residualTokens is {residual_tokens}, it must be at least {KIVI_GROUP}: keys \
                 are quantized per channel over groups of {KIVI_GROUP} tokens, so the newest tokens wait in \
                 fp16 until their group is complete"
            )));
        }
        Ok(())
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "fp16",
            KvDtype::Bf16 => "bf16",
            KvDtype::Fp8E4m3 => "fp8-e4m3",
            KvDtype::Int8 => "int8",
            KvDtype::Int4PerToken => "int4",
            KvDtype::Int4Kivi { .. } => "int4-kivi",
        }
    }
}

/// Where a KIVI cache keeps what, in 16-bit words (int4 codes four to a word, f16 values as their bits).
///
/// A block is `block_words` words. Used for an int4 key group (positions `sink + 32 g ..` of one sequence),
/// it holds per (layer, KV head), at [`KiviGeometry::group_run`]:
/// - keys: codes transposed, `[channel][token]` (32 nibbles = 8 words per channel), then per channel an f16
///   scale and an f16 zero point (the group's per-channel min/max fit, `GroupParams::fit`);
/// - values: codes `[token][channel]`, then per (token, 32-channel group) an f16 scale and an f16 zero point.
///
/// That is the planner's KIVI bytes exactly: per token and head `head_dim / 2 + head_dim * 4 / 32` bytes of
/// keys and `head_dim / 2 + 4 * ceil(head_dim / 32)` of values, so `block_bytes = 32 x` the planner's
/// `bytes_per_token`.
/// Used for the fp16 window, a block holds `window_rows` token rows (all layers, K and V; 10 rows when
/// `head_dim` is a multiple of 32, which fill the block exactly), `[slot][d]` per (layer, K/V, head) run.
///
/// A sequence of `len` tokens: positions `< sink` are window slots `0..sink` for good. The following tokens
/// are quantized one 32-token group at a time, oldest first, as late as possible: group g holds positions
/// `sink + 32 g .. sink + 32 (g + 1)`, and the first [`KiviGeometry::quantized_groups`]`(len)` groups are int4.
/// The rest (the tail: at most `residual`, and once groups exist at least `residual - 31`, most recent
/// tokens, as KIVI keeps at most its residual length in full precision) live in a ring of `residual` window
/// slots after the sinks: position p at slot `sink + (p - sink) % residual`. When a new token finds the ring
/// full, the oldest 32 ring tokens become an int4 group first, which frees the ring slot the new token takes.
/// So the state depends only on the tokens written, not on how they were batched, and `residual` must be at
/// least one group (32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KiviGeometry {
    pub layout: KvLayout,
    pub sink: usize,
    pub residual: usize,
    /// fp16 token rows per window block.
    pub window_rows: usize,
    /// Window blocks of a sequence that has filled its window: `ceil((sink + residual) / window_rows)`.
    pub window_blocks: usize,
}

impl KiviGeometry {
    /// Words of one (layer, head)'s keys in a group block: 8 words of codes and 2 of scale/zero per channel.
    pub fn key_run_words(head_dim: usize) -> usize {
        10 * head_dim
    }

    /// Words of one (layer, head)'s values in a group block: codes, then 32 tokens x groups x (scale, zero).
    pub fn value_run_words(head_dim: usize) -> usize {
        8 * head_dim + 2 * KIVI_GROUP * head_dim.div_ceil(KIVI_GROUP)
    }

    /// Words of one block of `layout` (any block size: a KIVI block is always one 32-token group).
    pub fn block_words(layout: &KvLayout) -> usize {
        let hd = layout.head_dim;
        layout.n_layers * layout.n_kv_heads * (Self::key_run_words(hd) + Self::value_run_words(hd))
    }

    /// The geometry of a KIVI cache; `dtype` must be [`KvDtype::Int4Kivi`], `layout` a KIVI cache layout.
    pub fn new(layout: KvLayout, dtype: KvDtype) -> Result<Self> {
        let KvDtype::Int4Kivi { sink_tokens, residual_tokens } = dtype else {
            return Err(EngineError::InvalidRequest(format!("{} is not a KIVI KV cache", dtype.name())));
        };
        if layout.block_tokens != KIVI_GROUP || layout.head_dim == 0 || layout.n_kv_heads == 0 {
            return Err(EngineError::InvalidRequest(format!(
                "a KIVI KV cache needs blocks of {KIVI_GROUP} tokens and a non-empty head: {layout:?}"
            )));
        }
        dtype.check_window()?;
        let (sink, residual) = (sink_tokens as usize, residual_tokens as usize);
        let row_words = layout.n_layers * 2 * layout.n_kv_heads * layout.head_dim;
        let window_rows = Self::block_words(&layout) / row_words;
        Ok(Self { layout, sink, residual, window_rows, window_blocks: (sink + residual).div_ceil(window_rows) })
    }

    /// Tokens kept in fp16 once the window is full: the planner's `full_precision_window`.
    pub fn window_tokens(&self) -> usize {
        self.sink + self.residual
    }

    /// Int4 key groups of a sequence of `len` tokens: the fewest that leave at most `residual` tail tokens.
    pub fn quantized_groups(&self, len: usize) -> usize {
        len.saturating_sub(self.window_tokens()).div_ceil(KIVI_GROUP)
    }

    /// Blocks of a sequence of `len` tokens: its window blocks, then one per int4 group. With `W = sink +
    /// residual`, the planner counts `min(len, W)` fp16 tokens and `len - W` int4 tokens; the engine takes
    /// `ceil(min(len, W) / window_rows)` window blocks and `ceil((len - W) / 32)` group blocks, i.e. the
    /// planner's bytes with each part rounded up to whole blocks: planner <= engine < planner + 2 blocks, and
    /// equal when both parts fill their blocks (e.g. `W` a multiple of 10 and `len - W` of 32 for head dims
    /// that are multiples of 32).
    pub fn blocks_for(&self, len: usize) -> usize {
        len.min(self.window_tokens()).div_ceil(self.window_rows) + self.quantized_groups(len)
    }

    /// The longest sequence `blocks` blocks hold.
    pub fn max_tokens(&self, blocks: usize) -> usize {
        if blocks < self.window_blocks {
            (blocks * self.window_rows).min(self.window_tokens())
        } else {
            self.window_tokens() + (blocks - self.window_blocks) * KIVI_GROUP
        }
    }

    /// Window slot of a position that is not in an int4 group.
    pub fn window_slot(&self, pos: usize) -> usize {
        if pos < self.sink { pos } else { self.sink + (pos - self.sink) % self.residual }
    }

    /// Block-table index of window slot `slot`, and the row inside that block.
    pub fn window_block(&self, slot: usize) -> (usize, usize) {
        (slot / self.window_rows, slot % self.window_rows)
    }

    /// Block-table index of int4 group `g`.
    pub fn group_block(&self, g: usize) -> usize {
        self.window_blocks + g
    }

    /// Word offset inside a window block of `(layer, kind, head)`'s first row (kind 0 = K, 1 = V).
    pub fn window_run(&self, layer: usize, kind: usize, head: usize) -> usize {
        ((layer * 2 + kind) * self.layout.n_kv_heads + head) * self.window_rows * self.layout.head_dim
    }

    /// Word offset inside a group block of `(layer, head)`'s keys; its values follow at `+ key_run_words`.
    pub fn group_run(&self, layer: usize, head: usize) -> usize {
        let hd = self.layout.head_dim;
        (layer * self.layout.n_kv_heads + head) * (Self::key_run_words(hd) + Self::value_run_words(hd))
    }

    /// The int4 group holding `pos` in a sequence of `len` tokens, and its slot, or None (fp16 window).
    pub fn group_of(&self, pos: usize, len: usize) -> Option<(usize, usize)> {
        if pos < self.sink {
            return None;
        }
        let (g, slot) = ((pos - self.sink) / KIVI_GROUP, (pos - self.sink) % KIVI_GROUP);
        (g < self.quantized_groups(len)).then_some((g, slot))
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
    /// A KIVI cache uses [`KvDtype::cache_layout`] (32-token blocks) and checks its window first.
    pub fn with_budget_dtype(backend: &B, layout: KvLayout, dtype: KvDtype, budget_bytes: usize) -> Result<Self> {
        let layout = dtype.cache_layout(layout);
        dtype.blocks_for(&layout, 0)?;
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

    /// Blocks a sequence of `len` positions takes.
    pub fn blocks_for(&self, len: usize) -> usize {
        match self.kivi() {
            Some(g) => g.blocks_for(len),
            None => len.div_ceil(self.layout.block_tokens),
        }
    }

    /// The longest single sequence the whole pool holds.
    pub fn capacity_tokens(&self) -> usize {
        match self.kivi() {
            Some(g) => g.max_tokens(self.total_blocks),
            None => self.total_blocks * self.layout.block_tokens,
        }
    }

    fn kivi(&self) -> Option<KiviGeometry> {
        // Checked in `with_budget_dtype`, so this is Some for every KIVI cache.
        KiviGeometry::new(self.layout, self.dtype).ok()
    }

    /// Makes `seq` able to hold `new_len` positions, taking blocks from the pool. All or nothing: on error
    /// the sequence and the pool are unchanged.
    pub fn reserve(&mut self, seq: &mut SeqKv, new_len: usize) -> Result<()> {
        let needed = self.blocks_for(new_len).saturating_sub(seq.block_table.len());
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
    /// A KIVI sequence cannot go back past a key group it has quantized (the group's fp16 tokens are gone):
    /// that is an error, and the sequence is unchanged.
    pub fn truncate(&mut self, seq: &mut SeqKv, len: usize) -> Result<()> {
        if len >= seq.len {
            return Ok(());
        }
        if let Some(g) = self.kivi()
            && g.quantized_groups(len) != g.quantized_groups(seq.len)
        {
            return Err(EngineError::InvalidRequest(format!(
                "cannot truncate a KIVI KV sequence from {} to {len} tokens: the tokens in between are already \
                 int4 key groups",
                seq.len
            )));
        }
        let keep = self.blocks_for(len);
        self.free.extend(seq.block_table.drain(keep..).rev());
        seq.len = len;
        Ok(())
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
        kv.truncate(&mut a, 3).unwrap();
        assert_eq!((a.block_table.len(), kv.free_blocks()), (1, 2));
        kv.reserve(&mut b, 8).unwrap();
        kv.release(&mut a);
        kv.release(&mut b);
        assert_eq!(kv.free_blocks(), 3);
        assert!(KvCache::with_budget(&cpu, layout(), block_bytes - 1).is_err());
    }

    /// A KIVI window shorter than one key group is refused from the tier spec alone, before any model loads,
    /// with the tier's name and the rule; the smallest valid window and other dtypes pass.
    #[test]
    fn kivi_window_rules_are_checked_from_the_tier_spec() {
        let tier = |kv: &str| -> quantfleet_api::model::TierSpec {
            serde_json::from_str(&format!(r#"{{"name":"t","weights":{{"format":"bf16"}},"kvCache":{kv}}}"#)).unwrap()
        };
        let err = crate::tier::kv_dtype(&tier(r#"{"dtype":"int4","scheme":"kivi","residualTokens":31}"#)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, EngineError::UnsupportedModel(_)), "{err:?}");
        assert!(msg.contains("tier t") && msg.contains("residualTokens is 31"), "{msg}");
        let ok = crate::tier::kv_dtype(&tier(r#"{"dtype":"int4","scheme":"kivi","sinkTokens":0,"residualTokens":32}"#));
        assert_eq!(ok.unwrap(), KvDtype::Int4Kivi { sink_tokens: 0, residual_tokens: 32 });
        assert!(KvDtype::Int4Kivi { sink_tokens: 2, residual_tokens: 31 }.check_window().is_err());
        assert!(KvDtype::Fp8E4m3.check_window().is_ok());
    }

    #[test]
    fn smaller_dtypes_get_more_blocks_from_the_same_budget() {
        let cpu = CpuBackend::new();
        // SmolLM2-135M's geometry: 30 layers, 3 KV heads of 64, 16-token blocks.
        let l = smollm2().1;
        assert_eq!(l.block_tokens, 16);
        let budget = 64 << 20;
        let blocks = |d| KvCache::with_budget_dtype(&cpu, l, d, budget).unwrap().total_blocks();
        let (f32b, f16b, bf16b, fp8b, i8b, i4b) = (
            blocks(KvDtype::F32),
            blocks(KvDtype::F16),
            blocks(KvDtype::Bf16),
            blocks(KvDtype::Fp8E4m3),
            blocks(KvDtype::Int8),
            blocks(KvDtype::Int4PerToken),
        );
        // Per token: f32 46080 B, fp16 23040 B, fp8/int8 11520 B of codes + 720 B of scales, int4 5760 B of
        // codes + 720 B of f16 scales and zero points.
        assert_eq!(KvDtype::F32.block_bytes(&l), 16 * 46080);
        assert_eq!(KvDtype::Fp8E4m3.block_bytes(&l), 16 * (11520 + 720));
        assert_eq!(KvDtype::Int4PerToken.block_bytes(&l), 16 * (5760 + 720));
        assert_eq!((f32b, f16b, bf16b), (budget / (16 * 46080), budget / (16 * 23040), budget / (16 * 23040)));
        assert_eq!((fp8b, i8b, i4b), (budget / (16 * 12240), budget / (16 * 12240), budget / (16 * 6480)));
        assert!(f32b < f16b && f16b < fp8b && fp8b < i4b);
        // What the backend allocates is what the blocks were priced at.
        for d in [KvDtype::F16, KvDtype::Int8, KvDtype::Int4PerToken] {
            let storage = crate::backend::Backend::new_kv_storage(&cpu, l, d, 3).unwrap();
            assert_eq!(storage.allocated_bytes(), 3 * d.block_bytes(&l), "{d:?}");
        }
    }

    /// The per-token dtypes (no full-precision window) take exactly the fit planner's KV bytes for whole
    /// blocks, for the dtype the tier spec maps to.
    #[test]
    fn per_token_sequence_bytes_are_the_planners() {
        use quantfleet_api::model::KvCacheSpec;
        use quantfleet_api::vocab::{KvCacheDtype, KvCacheScheme};
        let (arch, l) = smollm2();
        for dtype in
            [KvCacheDtype::Fp16, KvCacheDtype::Bf16, KvCacheDtype::Fp8E4m3, KvCacheDtype::Int8, KvCacheDtype::Int4]
        {
            let spec = KvCacheSpec { dtype, scheme: KvCacheScheme::PerToken, sink_tokens: 0, residual_tokens: 0 };
            let tier: quantfleet_api::model::TierSpec = serde_json::from_value(
                serde_json::json!({"name": "t", "weights": {"format": "bf16"}, "kvCache": spec}),
            )
            .unwrap();
            let engine_dtype = crate::tier::kv_dtype(&tier).unwrap();
            let plan = quantfleet_api::plan::kv_plan(&arch, &spec);
            for tokens in [16, 160, 2048] {
                let engine = engine_dtype.sequence_bytes(&l, tokens).unwrap() as u64;
                assert_eq!(engine, plan.bytes_for_context(tokens as u64), "{dtype:?} at {tokens} tokens");
            }
        }
    }

    /// SmolLM2-135M's published shape (the fit planner's test shape) and the engine's KV layout of it.
    fn smollm2() -> (quantfleet_api::model::ModelArchitecture, KvLayout) {
        let arch = quantfleet_api::plan::test_shapes::smollm2_135m();
        let layout = KvLayout {
            n_layers: arch.num_layers as usize,
            n_kv_heads: arch.num_key_value_heads as usize,
            head_dim: arch.head_dim as usize,
            block_tokens: DEFAULT_BLOCK_TOKENS,
        };
        (arch, layout)
    }

    fn kivi(sink: u32, residual: u32) -> KvDtype {
        KvDtype::Int4Kivi { sink_tokens: sink, residual_tokens: residual }
    }

    /// The fit planner's KV plan for SmolLM2-135M's shape and a KIVI window.
    fn planner(sink: i32, residual: i32) -> quantfleet_api::plan::KvPlan {
        use quantfleet_api::model::KvCacheSpec;
        use quantfleet_api::vocab::{KvCacheDtype, KvCacheScheme};
        let spec = KvCacheSpec {
            dtype: KvCacheDtype::Int4,
            scheme: KvCacheScheme::Kivi,
            sink_tokens: sink,
            residual_tokens: residual,
        };
        quantfleet_api::plan::kv_plan(&smollm2().0, &spec)
    }

    /// A KIVI cache's bytes per sequence against the fit planner's `bytes_for_context` (SmolLM2's shape,
    /// sink 4 + residual 126: a 130-token window, 13 window blocks of 10 fp16 rows): a block is 32 x the
    /// planner's bytes per token, and for every length planner <= engine < planner + 2 blocks, with equality
    /// whenever the int4 part fills its blocks (length - 130 a multiple of 32).
    #[test]
    fn kivi_sequence_bytes_are_the_planners_rounded_up_to_blocks() {
        let (l, dtype, plan) = (smollm2().1, kivi(4, 126), planner(4, 126));
        let cl = dtype.cache_layout(l);
        let block = dtype.block_bytes(&cl);
        assert_eq!(cl.block_tokens, KIVI_GROUP);
        assert_eq!(block as u64, KIVI_GROUP as u64 * plan.bytes_per_token);
        let g = KiviGeometry::new(cl, dtype).unwrap();
        assert_eq!((g.window_rows, g.window_blocks), (10, 13));
        assert_eq!(g.window_rows as u64 * plan.full_precision_bytes_per_token, block as u64, "rows fill the block");
        assert_eq!(g.window_tokens() as u64, plan.full_precision_window);
        for tokens in (0..=2000).chain([4095, 8192]) {
            let engine = dtype.sequence_bytes(&l, tokens).unwrap() as u64;
            let planned = plan.bytes_for_context(tokens as u64);
            assert!(planned <= engine && engine < planned + 2 * block as u64, "{tokens}: {engine} vs {planned}");
            if tokens >= 130 && (tokens - 130) % KIVI_GROUP == 0 {
                assert_eq!(engine, planned, "{tokens} tokens");
            }
            if tokens <= 130 && tokens % 10 == 0 {
                assert_eq!(engine, planned, "{tokens} tokens inside the window");
            }
        }
        // A budget of the planner's bytes for 1000 tokens (1000 - 130 is not a multiple of 32) holds 994.
        let cpu = crate::cpu::CpuBackend::new();
        let kv = KvCache::with_budget_dtype(&cpu, l, dtype, plan.bytes_for_context(1000) as usize).unwrap();
        assert_eq!((kv.total_blocks(), kv.capacity_tokens()), (13 + 27, 130 + 27 * 32));
        let planned_max = plan.max_tokens(plan.bytes_for_context(1000));
        assert!(planned_max >= kv.capacity_tokens() as u64 && planned_max - (kv.capacity_tokens() as u64) < 32);
    }

    /// KIVI block tables: the window blocks come first and grow while the window fills, then one block per
    /// int4 group; running out of blocks is a clean error that leaves the sequence alone; a sequence cannot
    /// be truncated past a group it has quantized. SYNTHETIC geometry.
    #[test]
    fn kivi_blocks_budget_and_truncation() {
        let cpu = crate::cpu::CpuBackend::new();
        let l = KvLayout { n_layers: 1, n_kv_heads: 1, head_dim: 32, block_tokens: 4 };
        let dtype = kivi(2, 40);
        let cl = dtype.cache_layout(l);
        let g = KiviGeometry::new(cl, dtype).unwrap();
        assert_eq!((g.window_rows, g.window_blocks), (10, 5), "42 window tokens in 10-row blocks");
        let mut kv = KvCache::with_budget_dtype(&cpu, l, dtype, 7 * dtype.block_bytes(&cl)).unwrap();
        assert_eq!(kv.layout.block_tokens, KIVI_GROUP);
        assert_eq!(kv.capacity_tokens(), 42 + 2 * 32);
        let mut a = SeqKv::default();
        kv.reserve(&mut a, 11).unwrap();
        assert_eq!(a.block_table.len(), 2);
        kv.reserve(&mut a, 42).unwrap();
        assert_eq!(a.block_table.len(), 5);
        kv.reserve(&mut a, 43).unwrap(); // the ring is full at 42: token 42 quantizes group 0
        assert_eq!((a.block_table.len(), g.quantized_groups(43)), (6, 1));
        kv.reserve(&mut a, 74).unwrap();
        assert_eq!(a.block_table.len(), 6);
        let err = kv.reserve(&mut a, 42 + 64 + 1).unwrap_err();
        assert!(matches!(err, EngineError::KvBudgetExhausted { needed_blocks: 2, free_blocks: 1, .. }), "{err}");
        assert_eq!(a.block_table.len(), 6, "failed reserve must not take blocks");
        a.len = 74;
        kv.truncate(&mut a, 50).unwrap(); // still one group
        assert_eq!((a.len, a.block_table.len()), (50, 6));
        let err = kv.truncate(&mut a, 30).unwrap_err();
        assert!(err.to_string().contains("int4 key groups"), "{err}");
        assert_eq!((a.len, a.block_table.len()), (50, 6));
        kv.release(&mut a);
        assert_eq!(kv.free_blocks(), 7);
        for bad in [kivi(4, 0), kivi(4, 31)] {
            let err = KvCache::with_budget_dtype(&cpu, l, bad, 1 << 20).err().expect("residual under a group");
            assert!(err.to_string().contains("at least 32"), "{err}");
        }
    }
}

//! KV-cache memory per token of context, and the longest context a memory budget holds.
//!
//! Per layer and token the cache holds keys and values: `2 x kv_heads x head_dim` elements. Scale overhead:
//! - fp16/bf16: none.
//! - fp8-e4m3 / int8 per-token: one f32 scale per token, head and K/V.
//! - int4 per-token: one f16 scale and one f16 zero point per token, head and K/V.
//! - int4 kivi: values per token in groups of 32 channels (f16 scale + f16 zero per group); keys per channel
//!   over groups of 32 tokens (f16 scale + f16 zero per channel per group, i.e. amortized 4/32 byte per
//!   channel and token).
//!
//! A quantized cache keeps `sinkTokens + residualTokens` tokens of every sequence at fp16; that window costs
//! the difference between fp16 and quantized bytes for those tokens, once per sequence.

use crate::model::{KvCacheSpec, ModelArchitecture};
use crate::vocab::{KvCacheDtype, KvCacheScheme};

/// Channels per KIVI value group and tokens per KIVI key group.
pub const KIVI_GROUP: u64 = 32;

/// KV memory of one tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvPlan {
    /// Bytes per token of context in the cache's own dtype, scales included (all layers).
    pub bytes_per_token: u64,
    /// Bytes per token at fp16 (the full-precision window's cost).
    pub full_precision_bytes_per_token: u64,
    /// Tokens per sequence kept at fp16 (sink plus residual window) in a quantized cache; 0 otherwise.
    pub full_precision_window: u64,
}

impl KvPlan {
    /// Bytes one sequence of `tokens` tokens occupies.
    pub fn bytes_for_context(&self, tokens: u64) -> u64 {
        let window = tokens.min(self.full_precision_window);
        tokens * self.bytes_per_token + window * (self.full_precision_bytes_per_token - self.bytes_per_token)
    }

    /// The most tokens one sequence can hold in `budget` bytes.
    pub fn max_tokens(&self, budget: u64) -> u64 {
        let window_bytes = self.full_precision_window * self.full_precision_bytes_per_token;
        if budget <= window_bytes {
            budget / self.full_precision_bytes_per_token
        } else {
            self.full_precision_window + (budget - window_bytes) / self.bytes_per_token
        }
    }
}

/// Computes the KV memory of a cache spec for a model shape.
pub fn kv_plan(arch: &ModelArchitecture, kv: &KvCacheSpec) -> KvPlan {
    let layers = arch.num_layers.max(0) as u64;
    let heads = arch.num_key_value_heads.max(0) as u64;
    let head_dim = arch.head_dim.max(0) as u64;
    let elements = 2 * heads * head_dim; // keys and values, per layer and token
    let full = layers * elements * 2;
    let per_layer = match (kv.dtype, kv.scheme) {
        (KvCacheDtype::Fp16 | KvCacheDtype::Bf16, _) => elements * 2,
        (KvCacheDtype::Fp8E4m3 | KvCacheDtype::Int8, _) => elements + 2 * heads * 4,
        (KvCacheDtype::Int4, KvCacheScheme::PerToken) => elements / 2 + 2 * heads * 4,
        (KvCacheDtype::Int4, KvCacheScheme::Kivi) => {
            let values = heads * head_dim / 2 + heads * head_dim.div_ceil(KIVI_GROUP) * 4;
            let keys = heads * head_dim / 2 + (heads * head_dim * 4).div_ceil(KIVI_GROUP);
            values + keys
        }
    };
    let window = if kv.dtype.is_quantized() { (kv.sink_tokens.max(0) + kv.residual_tokens.max(0)) as u64 } else { 0 };
    KvPlan { bytes_per_token: layers * per_layer, full_precision_bytes_per_token: full, full_precision_window: window }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::test_shapes::{llama3_70b, smollm2_135m};

    fn spec(dtype: KvCacheDtype, scheme: KvCacheScheme, sink: i32, residual: i32) -> KvCacheSpec {
        KvCacheSpec { dtype, scheme, sink_tokens: sink, residual_tokens: residual }
    }

    #[test]
    fn llama3_70b_fp16_is_a_third_of_a_megabyte_per_token() {
        let plan = kv_plan(&llama3_70b(), &KvCacheSpec::default());
        // 80 layers x 2 (K,V) x 8 heads x 128 dims x 2 bytes.
        assert_eq!(plan.bytes_per_token, 327_680);
        assert!((plan.bytes_per_token as f64 / 1e6 - 0.33).abs() < 0.005);
        assert_eq!(plan.full_precision_window, 0);
    }

    #[test]
    fn quantized_caches_by_hand() {
        let arch = smollm2_135m(); // 30 layers, 3 KV heads, head dim 64
        let fp8 = kv_plan(&arch, &spec(KvCacheDtype::Fp8E4m3, KvCacheScheme::PerToken, 0, 0));
        assert_eq!(fp8.bytes_per_token, 30 * (2 * 3 * 64 + 2 * 3 * 4));
        let int4 = kv_plan(&arch, &spec(KvCacheDtype::Int4, KvCacheScheme::PerToken, 0, 0));
        assert_eq!(int4.bytes_per_token, 30 * (3 * 64 + 2 * 3 * 4));
        let kivi = kv_plan(&arch, &spec(KvCacheDtype::Int4, KvCacheScheme::Kivi, 4, 60));
        // values: 96 B + 3 heads x 2 groups x 4 B; keys: 96 B + 3*64*4/32 B.
        assert_eq!(kivi.bytes_per_token, 30 * (96 + 24 + 96 + 24));
        assert_eq!(kivi.full_precision_window, 64);
        assert_eq!(kivi.full_precision_bytes_per_token, 30 * 2 * 3 * 64 * 2);
    }

    #[test]
    fn window_costs_full_precision_and_max_tokens_inverts_bytes_for_context() {
        let arch = smollm2_135m();
        let kivi = kv_plan(&arch, &spec(KvCacheDtype::Int4, KvCacheScheme::Kivi, 4, 124));
        assert_eq!(kivi.bytes_for_context(100), 100 * kivi.full_precision_bytes_per_token);
        assert_eq!(
            kivi.bytes_for_context(1000),
            128 * kivi.full_precision_bytes_per_token + 872 * kivi.bytes_per_token
        );
        for tokens in [0u64, 1, 50, 127, 128, 129, 1000, 8191] {
            let bytes = kivi.bytes_for_context(tokens);
            assert_eq!(kivi.max_tokens(bytes), tokens, "tokens {tokens}");
            if tokens > 0 {
                assert_eq!(kivi.max_tokens(bytes - 1), tokens - 1, "one byte short of {tokens}");
            }
        }
    }
}

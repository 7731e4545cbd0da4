//! Weight memory: which format every tensor of a tier is stored in (tier weights plus layer overrides), and
//! how many bytes that costs, scales and zero points included.
//!
//! Storage conventions (the engine's packed containers follow them, so the plan matches what is allocated):
//! - bf16/fp16: 2 bytes per element.
//! - fp8-e4m3: 1 byte per element; f32 scales per tensor, per output row or per group.
//! - int8: 1 byte per element; f32 scales per tensor or per output row, f16 per group.
//! - int4: two elements per byte (a row of odd length pads its last byte); f16 scale per group (or f32 per
//!   row for per-channel scaling) and, when asymmetric, one u8 zero point per group (per row).
//! - nvfp4: two elements per byte, one E4M3 byte per block of 16, one f32 per tensor.
//! - mxfp4: two elements per byte, one E8M0 byte per block of 32.
//! - norm weights: f32.

use crate::model::{ModelArchitecture, TierSpec, WeightSpec};
use crate::vocab::{WeightFormat, WeightScaling};
use std::collections::BTreeMap;

/// Where a weight tensor sits in the model, which decides which override applies to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorSite {
    /// The token embedding matrix.
    Embedding,
    /// The output projection (the embedding matrix itself when embeddings are tied).
    LmHead,
    /// A linear weight of transformer block `layer` (0-based).
    Layer(u32),
}

/// The weight spec in force for a tensor at `site`: the tier's `weights`, unless a layer override selects the
/// site (later overrides win). With tied embeddings, embedding and lm_head are one tensor, so an override
/// selecting either applies to both.
pub fn weight_spec_for<'a>(arch: &ModelArchitecture, tier: &'a TierSpec, site: TensorSite) -> &'a WeightSpec {
    let layers = arch.num_layers.max(0) as u32;
    let selects = |o: &crate::model::LayerOverride| -> bool {
        let embeddings = o.embeddings == Some(true);
        let lm_head = o.lm_head == Some(true);
        match site {
            TensorSite::Embedding => embeddings || (arch.tied_embeddings && lm_head),
            TensorSite::LmHead => lm_head || (arch.tied_embeddings && embeddings),
            TensorSite::Layer(i) => {
                o.first_layers.is_some_and(|n| i < n.max(0) as u32)
                    || o.last_layers.is_some_and(|n| i + (n.max(0) as u32) >= layers)
                    || o.layers.as_ref().is_some_and(|ls| ls.iter().any(|&l| l >= 0 && l as u32 == i))
            }
        }
    };
    tier.layer_overrides.iter().rev().find(|o| selects(o)).map_or(&tier.weights, |o| &o.weights)
}

/// Bytes to store a `[rows x cols]` matrix (rows = output features, groups run along cols) in `spec`.
pub fn matrix_bytes(rows: u64, cols: u64, spec: &WeightSpec) -> u64 {
    let elements = rows * cols;
    let packed_4bit = rows * cols.div_ceil(2);
    let zero_point = |spec: &WeightSpec| u64::from(!spec.effective_symmetric());
    match spec.format {
        WeightFormat::Bf16 | WeightFormat::Fp16 => 2 * elements,
        WeightFormat::Nvfp4 => packed_4bit + rows * cols.div_ceil(16) + 4,
        WeightFormat::Mxfp4 => packed_4bit + rows * cols.div_ceil(32),
        WeightFormat::Fp8E4m3 | WeightFormat::Int8 | WeightFormat::Int4 => {
            let values = if spec.format == WeightFormat::Int4 { packed_4bit } else { elements };
            let zero = if spec.format == WeightFormat::Fp8E4m3 { 0 } else { zero_point(spec) };
            let scales = match spec.effective_scaling() {
                Some(WeightScaling::PerTensor) => 4 + zero,
                Some(WeightScaling::PerChannel) => rows * (4 + zero),
                Some(WeightScaling::PerGroup) => {
                    // Group scales: f16 for integers; f32 for FP8, whose scales (amax / 448) of small weights
                    // would be f16 subnormals.
                    let group = u64::from(spec.effective_group_size().unwrap_or(128));
                    let scale = if spec.format == WeightFormat::Fp8E4m3 { 4 } else { 2 };
                    rows * cols.div_ceil(group) * (scale + zero)
                }
                None => 0,
            };
            values + scales
        }
    }
}

/// Weight memory of one tier.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct WeightPlan {
    /// Parameters, norms included.
    pub params: u64,
    /// Bytes, scales and zero points included.
    pub bytes: u64,
    /// Parameters and bytes per storage format (norms are counted under no format).
    pub by_format: BTreeMap<WeightFormat, (u64, u64)>,
    /// Norm weights (f32) parameters.
    pub norm_params: u64,
}

/// Computes the weight memory of `tier` for a llama-family model of shape `arch`.
pub fn weight_plan(arch: &ModelArchitecture, tier: &TierSpec) -> WeightPlan {
    let hidden = arch.hidden_size as u64;
    let ffn = arch.intermediate_size as u64;
    let q_dim = arch.num_attention_heads as u64 * arch.head_dim as u64;
    let kv_dim = arch.num_key_value_heads as u64 * arch.head_dim as u64;
    let vocab = arch.vocab_size as u64;

    let mut plan = WeightPlan::default();
    let mut add = |rows: u64, cols: u64, spec: &WeightSpec| {
        let bytes = matrix_bytes(rows, cols, spec);
        let entry = plan.by_format.entry(spec.format).or_default();
        entry.0 += rows * cols;
        entry.1 += bytes;
    };

    add(vocab, hidden, weight_spec_for(arch, tier, TensorSite::Embedding));
    if !arch.tied_embeddings {
        add(vocab, hidden, weight_spec_for(arch, tier, TensorSite::LmHead));
    }
    for layer in 0..arch.num_layers.max(0) as u32 {
        let spec = weight_spec_for(arch, tier, TensorSite::Layer(layer));
        // [out x in]: q, k, v project hidden -> heads; o projects back; gate/up widen to ffn; down narrows.
        for (rows, cols) in [
            (q_dim, hidden),
            (kv_dim, hidden),
            (kv_dim, hidden),
            (hidden, q_dim),
            (ffn, hidden),
            (ffn, hidden),
            (hidden, ffn),
        ] {
            add(rows, cols, spec);
        }
    }
    plan.norm_params = (2 * arch.num_layers.max(0) as u64 + 1) * hidden;
    plan.params = plan.by_format.values().map(|(p, _)| p).sum::<u64>() + plan.norm_params;
    plan.bytes = plan.by_format.values().map(|(_, b)| b).sum::<u64>() + 4 * plan.norm_params;
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LayerOverride;
    use crate::plan::test_shapes::{llama3_70b, smollm2_135m, tier};

    #[test]
    fn matrix_bytes_by_hand() {
        let int4 = WeightSpec { group_size: Some(128), ..WeightSpec::of(WeightFormat::Int4) };
        // 4096 x 4096 int4 g128 asymmetric: 8 MiB of nibbles + 4096 * 32 groups * (2 B scale + 1 B zero).
        assert_eq!(matrix_bytes(4096, 4096, &int4), 8 * 1024 * 1024 + 4096 * 32 * 3);
        let sym = WeightSpec { symmetric: Some(true), ..int4.clone() };
        assert_eq!(matrix_bytes(4096, 4096, &sym), 8 * 1024 * 1024 + 4096 * 32 * 2);
        // Odd columns pad the last nibble and the last group.
        assert_eq!(matrix_bytes(3, 17, &WeightSpec { group_size: Some(32), ..sym.clone() }), 3 * 9 + 3 * 2);
        // fp8 per-channel: one f32 per row.
        assert_eq!(matrix_bytes(10, 100, &WeightSpec::of(WeightFormat::Fp8E4m3)), 1000 + 40);
        // fp8 per-group: one f32 per group, the last one short (100 = 3 x 32 + 4).
        let fp8_g32 = WeightSpec { group_size: Some(32), ..WeightSpec::of(WeightFormat::Fp8E4m3) };
        assert_eq!(matrix_bytes(10, 100, &fp8_g32), 1000 + 10 * 4 * 4);
        // int8 symmetric per-channel by default.
        assert_eq!(matrix_bytes(10, 100, &WeightSpec::of(WeightFormat::Int8)), 1000 + 40);
        assert_eq!(matrix_bytes(10, 100, &WeightSpec::of(WeightFormat::Bf16)), 2000);
        // nvfp4: 50 B values + 7 block scales per row, + one f32; mxfp4: 4 blocks of 32 per row.
        assert_eq!(matrix_bytes(10, 100, &WeightSpec::of(WeightFormat::Nvfp4)), 500 + 70 + 4);
        assert_eq!(matrix_bytes(10, 100, &WeightSpec::of(WeightFormat::Mxfp4)), 500 + 40);
    }

    #[test]
    fn llama3_70b_matches_the_seed_figures() {
        let arch = llama3_70b();
        // Parameter count by hand: per layer q 8192^2, k and v 8192*1024, o 8192^2, three FFN 8192*28672,
        // two norms of 8192; plus embedding and untied lm_head 128256*8192, and the final norm.
        let per_layer = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672;
        let params = 80 * per_layer + 2 * 128_256 * 8192 + (2 * 80 + 1) * 8192;
        let bf16 = weight_plan(&arch, &tier("bf16", WeightSpec::of(WeightFormat::Bf16)));
        assert_eq!(bf16.params, params);
        assert_eq!(bf16.bytes, 2 * (params - (2 * 80 + 1) * 8192) + 4 * (2 * 80 + 1) * 8192);
        // "A 70B model is 140 GB at BF16, 70 GB at FP8, about 35-39 GB at INT4 with group scales."
        let gb = |b: u64| b as f64 / 1e9;
        assert!((139.0..143.0).contains(&gb(bf16.bytes)), "bf16 {} GB", gb(bf16.bytes));
        let fp8 = weight_plan(&arch, &tier("fp8", WeightSpec::of(WeightFormat::Fp8E4m3)));
        assert!((69.5..71.5).contains(&gb(fp8.bytes)), "fp8 {} GB", gb(fp8.bytes));
        let int4 = weight_plan(&arch, &tier("int4", WeightSpec::of(WeightFormat::Int4)));
        assert!((35.0..39.0).contains(&gb(int4.bytes)), "int4 {} GB", gb(int4.bytes));
        // int4 g128 asymmetric costs exactly 0.5 + 3/128 bytes per matrix parameter here (all dims divide).
        let matrix_params = params - (2 * 80 + 1) * 8192;
        assert_eq!(int4.bytes, matrix_params / 2 + matrix_params / 128 * 3 + 4 * (2 * 80 + 1) * 8192);
    }

    #[test]
    fn overrides_select_first_last_and_listed_layers_and_later_ones_win() {
        let arch = smollm2_135m();
        let mut t = tier("int4", WeightSpec::of(WeightFormat::Int4));
        t.layer_overrides = vec![
            LayerOverride {
                first_layers: Some(2),
                last_layers: Some(1),
                layers: None,
                embeddings: None,
                lm_head: None,
                weights: WeightSpec::of(WeightFormat::Bf16),
            },
            LayerOverride {
                first_layers: None,
                last_layers: None,
                layers: Some(vec![1, 15]),
                embeddings: None,
                lm_head: Some(true),
                weights: WeightSpec::of(WeightFormat::Fp8E4m3),
            },
        ];
        let f = |site| weight_spec_for(&arch, &t, site).format;
        assert_eq!(f(TensorSite::Layer(0)), WeightFormat::Bf16);
        assert_eq!(f(TensorSite::Layer(1)), WeightFormat::Fp8E4m3, "the later override wins");
        assert_eq!(f(TensorSite::Layer(2)), WeightFormat::Int4);
        assert_eq!(f(TensorSite::Layer(15)), WeightFormat::Fp8E4m3);
        assert_eq!(f(TensorSite::Layer(29)), WeightFormat::Bf16);
        assert_eq!(f(TensorSite::Layer(28)), WeightFormat::Int4);
        // Tied: lm_head and the embedding are one tensor.
        assert_eq!(f(TensorSite::Embedding), WeightFormat::Fp8E4m3);
    }

    #[test]
    fn smollm2_bf16_and_tied_embeddings() {
        let arch = smollm2_135m();
        let plan = weight_plan(&arch, &tier("bf16", WeightSpec::of(WeightFormat::Bf16)));
        // 134.5M parameters (ENVIRONMENT.md), embedding stored once.
        assert_eq!(plan.params, 134_515_008);
        assert_eq!(plan.bytes, 2 * (134_515_008 - 61 * 576) + 4 * 61 * 576);
    }
}

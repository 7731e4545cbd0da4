//! The precision x hardware matrix: which compute capability each part of a tier's precision needs.
//!
//! - Every Quantfleet CUDA kernel targets SM80 (Ampere) or newer: bf16 arithmetic, cp.async, and the
//!   weight-only W8A16 / W4A16 kernels (FP8 weights are widened in registers, so they run on SM80 too).
//! - FP8 tensor-core compute (fp8-e4m3 activations, W8A8) needs SM89 (Ada) or newer.
//! - NVFP4 and MXFP4 weights need SM100 (Blackwell) FP4 tensor cores.
//! - KV caches in fp8/int8/int4 are dequantized in the attention kernel, so they run from SM80.

use super::accelerators::ComputeCapability;
use crate::model::TierSpec;
use crate::vocab::{ActivationPrecision, WeightFormat};

/// One capability a tier needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    /// What needs it, in words a user recognises (e.g. "fp8-e4m3 activations (W8A8)").
    pub what: String,
    /// The oldest compute capability that runs it.
    pub min: ComputeCapability,
}

/// The minimum compute capability of Quantfleet's kernels.
pub const BASELINE: ComputeCapability = ComputeCapability::new(8, 0);
const FP8_COMPUTE: ComputeCapability = ComputeCapability::new(8, 9);
const FP4_COMPUTE: ComputeCapability = ComputeCapability::new(10, 0);

/// Everything `tier` needs from the hardware, the baseline first.
pub fn requirements(tier: &TierSpec) -> Vec<Requirement> {
    let mut needs = vec![Requirement { what: "Quantfleet's CUDA kernels".into(), min: BASELINE }];
    if tier.activations == ActivationPrecision::Fp8E4m3 {
        needs.push(Requirement { what: "fp8-e4m3 activations (W8A8 FP8 compute)".into(), min: FP8_COMPUTE });
    }
    let formats = std::iter::once(tier.weights.format).chain(tier.layer_overrides.iter().map(|o| o.weights.format));
    let mut seen = Vec::new();
    for format in formats {
        if matches!(format, WeightFormat::Nvfp4 | WeightFormat::Mxfp4) && !seen.contains(&format) {
            seen.push(format);
            needs.push(Requirement { what: format!("{format} weights (FP4 tensor cores)"), min: FP4_COMPUTE });
        }
    }
    needs
}

/// The requirements `cc` does not meet.
pub fn unmet(tier: &TierSpec, cc: ComputeCapability) -> Vec<Requirement> {
    requirements(tier).into_iter().filter(|r| cc < r.min).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LayerOverride, WeightSpec};
    use crate::plan::test_shapes::tier;

    const T4: ComputeCapability = ComputeCapability::new(7, 5);
    const A100: ComputeCapability = ComputeCapability::new(8, 0);
    const L4: ComputeCapability = ComputeCapability::new(8, 9);
    const H100: ComputeCapability = ComputeCapability::new(9, 0);
    const B200: ComputeCapability = ComputeCapability::new(10, 0);

    fn w8a8_fp8() -> TierSpec {
        let mut t = tier("w8a8", WeightSpec::of(WeightFormat::Fp8E4m3));
        t.activations = ActivationPrecision::Fp8E4m3;
        t
    }

    #[test]
    fn the_matrix() {
        let cases: Vec<(TierSpec, ComputeCapability, bool)> = vec![
            (tier("bf16", WeightSpec::of(WeightFormat::Bf16)), A100, true),
            (tier("bf16", WeightSpec::of(WeightFormat::Bf16)), T4, false),
            (tier("w8a16", WeightSpec::of(WeightFormat::Fp8E4m3)), A100, true),
            (tier("w4a16", WeightSpec::of(WeightFormat::Int4)), A100, true),
            (w8a8_fp8(), A100, false),
            (w8a8_fp8(), L4, true),
            (w8a8_fp8(), H100, true),
            (tier("nvfp4", WeightSpec::of(WeightFormat::Nvfp4)), H100, false),
            (tier("nvfp4", WeightSpec::of(WeightFormat::Nvfp4)), B200, true),
            (tier("mxfp4", WeightSpec::of(WeightFormat::Mxfp4)), B200, true),
        ];
        for (t, cc, ok) in cases {
            assert_eq!(unmet(&t, cc).is_empty(), ok, "{} on {cc}: {:?}", t.name, unmet(&t, cc));
        }
    }

    #[test]
    fn overrides_count_too() {
        let mut t = tier("int4", WeightSpec::of(WeightFormat::Int4));
        t.layer_overrides.push(LayerOverride {
            first_layers: Some(1),
            last_layers: None,
            layers: None,
            embeddings: None,
            lm_head: None,
            weights: WeightSpec::of(WeightFormat::Mxfp4),
        });
        let missing = unmet(&t, H100);
        assert_eq!(missing.len(), 1);
        assert!(missing[0].what.contains("mxfp4"));
        assert_eq!(missing[0].min, B200);
    }
}

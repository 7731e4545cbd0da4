//! Canary evidence as the router reports it and the operator reads it (`GET /v1/canary/stats` on the
//! router). Counters are cumulative sums since the router started, so the operator can compute the mean of
//! any window (a canary step) by differencing two snapshots, and a router restart shows up as a counter that
//! went down. Counts are i64 because Kubernetes API conventions allow only int32/int64 (these sums are
//! also kept in PrecisionPolicy status).

use crate::vocab::TaskClass;
use serde::{Deserialize, Serialize};

/// Cumulative comparison sums for one (policy, task class, candidate).
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ComparisonSums {
    /// Shadow pairs compared.
    pub samples: i64,
    /// Sum over pairs of the pair's mean KL divergence (incumbent || candidate), nats per token.
    pub kl_divergence_sum: f64,
    /// Sum over pairs of the pair's top-1 agreement fraction.
    pub top1_agreement_sum: f64,
    /// Sum over pairs of ln(candidate perplexity / incumbent perplexity) on the incumbent's tokens.
    pub log_perplexity_ratio_sum: f64,
    /// Pairs whose request asked for structured output (tools or a JSON schema).
    pub structured_samples: i64,
    /// Of those, pairs whose candidate output was not valid JSON for the schema.
    pub structured_invalid: i64,
    /// Sum over pairs of candidate / incumbent latency per token.
    pub latency_ratio_sum: f64,
}

impl ComparisonSums {
    /// The sums accumulated since `earlier` (a snapshot of the same counters). When the counters went down
    /// (the router restarted), everything now is new.
    pub fn since(&self, earlier: &ComparisonSums) -> ComparisonSums {
        if self.samples < earlier.samples || self.structured_samples < earlier.structured_samples {
            return *self;
        }
        ComparisonSums {
            samples: self.samples - earlier.samples,
            kl_divergence_sum: self.kl_divergence_sum - earlier.kl_divergence_sum,
            top1_agreement_sum: self.top1_agreement_sum - earlier.top1_agreement_sum,
            log_perplexity_ratio_sum: self.log_perplexity_ratio_sum - earlier.log_perplexity_ratio_sum,
            structured_samples: self.structured_samples - earlier.structured_samples,
            structured_invalid: self.structured_invalid - earlier.structured_invalid,
            latency_ratio_sum: self.latency_ratio_sum - earlier.latency_ratio_sum,
        }
    }

    /// Both sets of sums together (e.g. the same counters of two router replicas).
    pub fn plus(&self, other: &ComparisonSums) -> ComparisonSums {
        ComparisonSums {
            samples: self.samples + other.samples,
            kl_divergence_sum: self.kl_divergence_sum + other.kl_divergence_sum,
            top1_agreement_sum: self.top1_agreement_sum + other.top1_agreement_sum,
            log_perplexity_ratio_sum: self.log_perplexity_ratio_sum + other.log_perplexity_ratio_sum,
            structured_samples: self.structured_samples + other.structured_samples,
            structured_invalid: self.structured_invalid + other.structured_invalid,
            latency_ratio_sum: self.latency_ratio_sum + other.latency_ratio_sum,
        }
    }

    fn mean(&self, sum: f64) -> Option<f64> {
        (self.samples > 0).then(|| sum / self.samples as f64)
    }
    pub fn mean_kl_divergence(&self) -> Option<f64> {
        self.mean(self.kl_divergence_sum)
    }
    pub fn top1_agreement(&self) -> Option<f64> {
        self.mean(self.top1_agreement_sum)
    }
    /// Geometric mean of the per-pair perplexity ratios.
    pub fn perplexity_ratio(&self) -> Option<f64> {
        self.mean(self.log_perplexity_ratio_sum).map(f64::exp)
    }
    pub fn structured_invalid_rate(&self) -> Option<f64> {
        (self.structured_samples > 0).then(|| self.structured_invalid as f64 / self.structured_samples as f64)
    }
    pub fn latency_ratio(&self) -> Option<f64> {
        self.mean(self.latency_ratio_sum)
    }
}

/// Evidence for one task class of one policy's canary.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClassComparison {
    pub task_class: TaskClass,
    #[serde(flatten)]
    pub sums: ComparisonSums,
    /// Mirrors dropped because the candidate was saturated (not compared, not counted in samples).
    #[serde(default)]
    pub dropped: i64,
}

/// Evidence for one PrecisionPolicy's candidate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyComparison {
    pub namespace: String,
    pub policy: String,
    pub candidate_tier: String,
    pub classes: Vec<ClassComparison>,
}

/// What one inference node endpoint reported about itself (its ModelInfo), as the router saw it. The operator
/// compares `tier_spec` with the tier the QuantizedModel declares (the QuantizationVerified condition).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    /// The namespace of the router's policy, where the model's tier Services are.
    pub namespace: String,
    /// The model the node says it serves (the QuantizedModel's name).
    pub model: String,
    /// The tier the router routes this endpoint as (from its EndpointSlice or the static endpoint list).
    pub tier: String,
    /// The endpoint, `host:port`.
    pub endpoint: String,
    /// The TierSpec the node was configured with (ModelInfo `tier_spec_json`; null if that was not JSON).
    pub tier_spec: serde_json::Value,
    /// The compute backend, e.g. "cpu-avx2", "cuda".
    pub backend: String,
    /// The weight formats in memory, e.g. "int4-g128-asym (211 matrices)".
    #[serde(default)]
    pub weights_loaded: String,
    /// Whether the tier's formats were applied at load (false: the checkpoint's native weights).
    #[serde(default)]
    pub tier_applied: bool,
}

/// The router's whole report.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStatsReport {
    pub policies: Vec<PolicyComparison>,
    /// Every node endpoint whose ModelInfo the router has read (absent from older routers' reports).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeReport>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums(samples: i64, kl: f64) -> ComparisonSums {
        ComparisonSums {
            samples,
            kl_divergence_sum: kl,
            top1_agreement_sum: samples as f64 * 0.9,
            log_perplexity_ratio_sum: samples as f64 * 0.1f64.ln_1p(),
            structured_samples: samples / 2,
            structured_invalid: samples / 10,
            latency_ratio_sum: samples as f64,
        }
    }

    #[test]
    fn windows_are_differences_of_snapshots() {
        let window = sums(300, 6.0).since(&sums(100, 1.0));
        assert_eq!(window.samples, 200);
        assert!((window.mean_kl_divergence().unwrap() - 0.025).abs() < 1e-12);
        assert!((window.top1_agreement().unwrap() - 0.9).abs() < 1e-12);
        assert!((window.perplexity_ratio().unwrap() - 1.1).abs() < 1e-12);
        assert_eq!(window.structured_invalid_rate(), Some(20.0 / 100.0));
    }

    #[test]
    fn a_router_restart_counts_everything_as_new() {
        let window = sums(50, 1.0).since(&sums(100, 1.0));
        assert_eq!(window.samples, 50);
    }

    #[test]
    fn sums_add_field_by_field() {
        let both = sums(100, 1.0).plus(&sums(50, 2.0));
        assert_eq!((both.samples, both.structured_samples, both.structured_invalid), (150, 75, 15));
        assert!((both.kl_divergence_sum - 3.0).abs() < 1e-12);
        assert!((both.top1_agreement().unwrap() - 0.9).abs() < 1e-12);
        assert_eq!(both.since(&sums(100, 1.0)).samples, 50);
    }

    #[test]
    fn no_samples_means_no_means() {
        let empty = ComparisonSums::default();
        assert_eq!(empty.mean_kl_divergence(), None);
        assert_eq!(empty.structured_invalid_rate(), None);
    }

    #[test]
    fn report_wire_format() {
        let report = CanaryStatsReport {
            policies: vec![PolicyComparison {
                namespace: "ns".into(),
                policy: "p".into(),
                candidate_tier: "int4".into(),
                classes: vec![ClassComparison { task_class: TaskClass::Code, sums: sums(10, 0.5), dropped: 2 }],
            }],
            nodes: vec![NodeReport {
                namespace: "ns".into(),
                model: "m".into(),
                tier: "int4".into(),
                endpoint: "10.0.0.1:50051".into(),
                tier_spec: serde_json::json!({"name": "int4", "weights": {"format": "int4"}}),
                backend: "cuda".into(),
                weights_loaded: "int4-g128-asym (211 matrices)".into(),
                tier_applied: true,
            }],
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["policies"][0]["classes"][0]["taskClass"], "code");
        assert_eq!(json["policies"][0]["classes"][0]["samples"], 10);
        assert_eq!(json["nodes"][0]["tierSpec"]["weights"]["format"], "int4");
        assert_eq!(json["nodes"][0]["tierApplied"], true);
        assert_eq!(serde_json::from_value::<CanaryStatsReport>(json).unwrap(), report);
        // A report from a router without node reports still reads, and an empty list is not written.
        let old: CanaryStatsReport = serde_json::from_str(r#"{"policies":[]}"#).unwrap();
        assert!(old.nodes.is_empty());
        assert_eq!(serde_json::to_string(&old).unwrap(), r#"{"policies":[]}"#);
    }
}

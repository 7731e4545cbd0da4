//! Fit planning: will each tier of a QuantizedModel fit its accelerator at the declared serving limits, and
//! can the accelerator run its precision? Pure functions of the spec and the accelerator table, used by the
//! operator (status, fail-closed deployment), the CLI (`quantfleet plan`) and tests.
//!
//! Memory model of one replica (all `accelerator.count` GPUs together):
//! `usable = count x memory x memoryUtilization`, of which the planner reserves
//! - the weights ([`weights`]),
//! - a runtime overhead of 512 MiB per GPU (CUDA context, cuBLAS workspace, allocator slack),
//! - activations: the bf16 intermediates of one 2048-token prefill chunk plus f32 logits for
//!   `maxConcurrency` sequences,
//!
//! and the rest is the KV budget ([`kv`]), shared by `maxConcurrency` sequences. The tier fits when every
//! sequence can hold `maxContextTokens` tokens. Tensor parallelism is planned as pooled memory.

pub mod accelerators;
pub mod hardware;
pub mod kv;
pub mod weights;

use crate::model::{
    AcceleratorSpec, KvCacheSpec, ModelArchitecture, QuantizedModelSpec, ServingSpec, TierSpec, TierStatus,
};
use crate::vocab::{KvCacheDtype, KvCacheScheme};
pub use accelerators::{Accelerator, AcceleratorTable, ComputeCapability, parse_quantity};
pub use kv::{KvPlan, kv_plan};
pub use weights::{TensorSite, WeightPlan, matrix_bytes, weight_plan, weight_spec_for};

/// Memory reserved per GPU for the CUDA context, library workspaces and allocator slack.
pub const RUNTIME_OVERHEAD_PER_GPU: u64 = 512 * 1024 * 1024;
/// Prompt tokens processed per prefill step; bounds activation memory.
pub const PREFILL_CHUNK_TOKENS: u64 = 2048;

/// Why a tier cannot be deployed.
#[derive(Clone, Debug, PartialEq)]
pub enum FitProblem {
    /// The accelerator is in neither the table nor the spec.
    UnknownAccelerator { message: String },
    /// The accelerator cannot run part of the tier's precision.
    UnsupportedPrecision { what: String, needs: ComputeCapability, product: String, has: ComputeCapability },
    /// Weights, activations and KV cache at the serving limits exceed usable memory.
    DoesNotFit { needed_bytes: u64, usable_bytes: u64 },
}

impl FitProblem {
    /// The condition reason this problem reports under.
    pub fn reason(&self) -> &'static str {
        use crate::conditions::reason;
        match self {
            FitProblem::UnknownAccelerator { .. } => reason::UNKNOWN_ACCELERATOR,
            FitProblem::UnsupportedPrecision { .. } => reason::UNSUPPORTED_PRECISION,
            FitProblem::DoesNotFit { .. } => reason::TIER_DOES_NOT_FIT,
        }
    }
}

impl std::fmt::Display for FitProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FitProblem::UnknownAccelerator { message } => f.write_str(message),
            FitProblem::UnsupportedPrecision { what, needs, product, has } => {
                write!(f, "{what} needs {needs} or newer; {product} is {has}")
            }
            FitProblem::DoesNotFit { needed_bytes, usable_bytes } => {
                write!(f, "needs {} but {} is usable", gib(*needed_bytes), gib(*usable_bytes))
            }
        }
    }
}

/// The plan of one tier.
#[derive(Clone, Debug, PartialEq)]
pub struct TierPlan {
    pub name: String,
    pub weights: WeightPlan,
    pub kv: KvPlan,
    pub activation_bytes: u64,
    pub runtime_overhead_bytes: u64,
    /// Usable memory of one replica (0 when the accelerator is unknown).
    pub usable_bytes: u64,
    /// Memory left for the KV cache (negative when weights and activations alone do not fit).
    pub kv_budget_bytes: i64,
    /// Longest context each of maxConcurrency sequences can have, capped at maxPositionEmbeddings.
    pub max_context_tokens: u64,
    /// Sequences of maxContextTokens that fit at once.
    pub max_concurrency_at_context: u64,
    /// Empty when the tier fits and its precision runs on the accelerator.
    pub problems: Vec<FitProblem>,
    /// Changes that would make a tier that does not fit, fit.
    pub suggestions: Vec<String>,
}

impl TierPlan {
    pub fn fits(&self) -> bool {
        self.problems.is_empty()
    }

    /// One line saying why the tier does not fit and what would (empty when it fits).
    pub fn message(&self) -> String {
        if self.fits() {
            return String::new();
        }
        let problems: Vec<String> = self.problems.iter().map(ToString::to_string).collect();
        let mut msg = format!("tier {}: {}", self.name, problems.join("; "));
        if !self.suggestions.is_empty() {
            msg.push_str(&format!(". Would fit: {}", self.suggestions.join(", or ")));
        }
        msg
    }

    /// The planned part of the tier's status (observed fields are left at their defaults).
    pub fn status(&self) -> TierStatus {
        let message = self.message();
        TierStatus {
            name: self.name.clone(),
            fits: self.fits(),
            weight_bytes: self.weights.bytes as i64,
            kv_bytes_per_token: self.kv.bytes_per_token as i64,
            max_context_tokens: self.max_context_tokens as i64,
            message: (!message.is_empty()).then_some(message),
            ..TierStatus::default()
        }
    }
}

/// The plan of every tier of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelPlan {
    /// The accelerator the plan assumed, or why it is unknown.
    pub accelerator: Result<Accelerator, String>,
    pub tiers: Vec<TierPlan>,
}

impl ModelPlan {
    pub fn all_fit(&self) -> bool {
        self.tiers.iter().all(TierPlan::fits)
    }
}

/// Resolves the accelerator from the spec's own description (memory + computeCapability) or the table.
pub fn resolve_accelerator(spec: &AcceleratorSpec, table: &AcceleratorTable) -> Result<Accelerator, String> {
    match (&spec.memory, &spec.compute_capability) {
        (Some(memory), Some(cc)) => Ok(Accelerator {
            product: spec.product.clone(),
            memory_bytes: parse_quantity(memory)?,
            compute_capability: cc.parse()?,
            memory_bandwidth: None,
        }),
        (None, None) => table.get(&spec.product).cloned().ok_or_else(|| {
            let known: Vec<&str> = table.products().map(|a| a.product.as_str()).collect();
            format!(
                "accelerator {} is not in Quantfleet's table ({}); describe it with accelerator.memory and accelerator.computeCapability",
                spec.product,
                known.join(", ")
            )
        }),
        _ => Err("accelerator.memory and accelerator.computeCapability must be given together".to_owned()),
    }
}

/// Activation memory for one prefill chunk and one decode step of `maxConcurrency` sequences.
pub fn activation_bytes(arch: &ModelArchitecture, serving: &ServingSpec) -> u64 {
    let hidden = arch.hidden_size.max(0) as u64;
    let ffn = arch.intermediate_size.max(0) as u64;
    let q_dim = (arch.num_attention_heads.max(0) * arch.head_dim.max(0)) as u64;
    let kv_dim = (arch.num_key_value_heads.max(0) * arch.head_dim.max(0)) as u64;
    let chunk = PREFILL_CHUNK_TOKENS.min(serving.max_context_tokens.max(1) as u64);
    // residual, normed input, attention output and MLP output (4 x hidden), q/k/v, and gate/up/product (3 x ffn)
    let per_token = 4 * hidden + q_dim + 2 * kv_dim + 3 * ffn;
    chunk * per_token * 2 + serving.max_concurrency.max(0) as u64 * arch.vocab_size.max(0) as u64 * 4
}

struct Budget {
    usable: u64,
    overhead: u64,
    kv_budget: i64,
}

fn budget(weights: u64, activations: u64, accelerator: &Accelerator, count: u64, serving: &ServingSpec) -> Budget {
    let usable = (accelerator.memory_bytes as f64 * count as f64 * serving.memory_utilization).floor() as u64;
    let overhead = RUNTIME_OVERHEAD_PER_GPU * count;
    let kv_budget = usable as i64 - weights as i64 - activations as i64 - overhead as i64;
    Budget { usable, overhead, kv_budget }
}

fn max_context(kv: &KvPlan, kv_budget: i64, concurrency: u64) -> u64 {
    if kv_budget <= 0 || concurrency == 0 { 0 } else { kv.max_tokens(kv_budget as u64 / concurrency) }
}

/// Plans one tier on a resolved accelerator (or an unknown one).
pub fn plan_tier(
    arch: &ModelArchitecture,
    serving: &ServingSpec,
    tier: &TierSpec,
    accelerator: &Result<Accelerator, String>,
    count: u64,
) -> TierPlan {
    let weights = weight_plan(arch, tier);
    let kv = kv_plan(arch, &tier.kv_cache);
    let activations = activation_bytes(arch, serving);
    let context = serving.max_context_tokens.max(0) as u64;
    let concurrency = serving.max_concurrency.max(0) as u64;
    let mut plan = TierPlan {
        name: tier.name.clone(),
        weights,
        kv,
        activation_bytes: activations,
        runtime_overhead_bytes: 0,
        usable_bytes: 0,
        kv_budget_bytes: 0,
        max_context_tokens: 0,
        max_concurrency_at_context: 0,
        problems: Vec::new(),
        suggestions: Vec::new(),
    };
    let accelerator = match accelerator {
        Ok(a) => a,
        Err(message) => {
            plan.problems.push(FitProblem::UnknownAccelerator { message: message.clone() });
            return plan;
        }
    };
    for req in hardware::unmet(tier, accelerator.compute_capability) {
        plan.problems.push(FitProblem::UnsupportedPrecision {
            what: req.what,
            needs: req.min,
            product: accelerator.product.clone(),
            has: accelerator.compute_capability,
        });
    }
    let b = budget(plan.weights.bytes, activations, accelerator, count, serving);
    plan.usable_bytes = b.usable;
    plan.runtime_overhead_bytes = b.overhead;
    plan.kv_budget_bytes = b.kv_budget;
    plan.max_context_tokens =
        max_context(&kv, b.kv_budget, concurrency).min(arch.max_position_embeddings.max(0) as u64);
    let per_sequence = kv.bytes_for_context(context);
    plan.max_concurrency_at_context =
        if b.kv_budget > 0 && per_sequence > 0 { b.kv_budget as u64 / per_sequence } else { 0 };

    if max_context(&kv, b.kv_budget, concurrency) < context {
        let needed = plan.weights.bytes + activations + b.overhead + per_sequence * concurrency;
        plan.problems.push(FitProblem::DoesNotFit { needed_bytes: needed, usable_bytes: b.usable });
        plan.suggestions = suggestions(arch, serving, tier, &plan, accelerator, count);
    }
    plan
}

fn suggestions(
    arch: &ModelArchitecture,
    serving: &ServingSpec,
    tier: &TierSpec,
    plan: &TierPlan,
    accelerator: &Accelerator,
    count: u64,
) -> Vec<String> {
    let mut out = Vec::new();
    if plan.max_context_tokens >= 16 {
        out.push(format!(
            "maxContextTokens <= {} at maxConcurrency {}",
            plan.max_context_tokens, serving.max_concurrency
        ));
    }
    if plan.max_concurrency_at_context >= 1 {
        out.push(format!(
            "maxConcurrency <= {} at maxContextTokens {}",
            plan.max_concurrency_at_context, serving.max_context_tokens
        ));
    }
    let context = serving.max_context_tokens.max(0) as u64;
    let concurrency = serving.max_concurrency.max(0) as u64;
    if !tier.kv_cache.dtype.is_quantized() {
        let fp8 = kv_plan(
            arch,
            &KvCacheSpec { dtype: KvCacheDtype::Fp8E4m3, scheme: KvCacheScheme::PerToken, ..tier.kv_cache.clone() },
        );
        if max_context(&fp8, plan.kv_budget_bytes, concurrency) >= context {
            out.push("kvCache.dtype fp8-e4m3".to_owned());
        }
    }
    if let Some(more) = (count + 1..=16).find(|&c| {
        let b = budget(plan.weights.bytes, plan.activation_bytes, accelerator, c, serving);
        max_context(&plan.kv, b.kv_budget, concurrency) >= context
    }) {
        out.push(format!("accelerator.count >= {more}"));
    }
    if plan.kv_budget_bytes <= 0 {
        out.push(format!("a smaller weight format (weights alone need {})", gib(plan.weights.bytes)));
    }
    out
}

/// Plans every tier of a model.
pub fn plan_model(spec: &QuantizedModelSpec, table: &AcceleratorTable) -> ModelPlan {
    let accelerator = resolve_accelerator(&spec.accelerator, table);
    let count = spec.accelerator.count.max(1) as u64;
    let tiers =
        spec.tiers.iter().map(|t| plan_tier(&spec.architecture, &spec.serving, t, &accelerator, count)).collect();
    ModelPlan { accelerator, tiers }
}

/// Formats bytes as GiB with two decimals.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Published model shapes for unit tests, here and (feature `test-shapes`) in other crates.
#[cfg(any(test, feature = "test-shapes"))]
pub mod test_shapes {
    use crate::model::{KvCacheSpec, ModelArchitecture, TierSpec, WeightSpec};
    use crate::vocab::ActivationPrecision;

    /// Llama-3-70B's published shape.
    pub fn llama3_70b() -> ModelArchitecture {
        ModelArchitecture {
            num_layers: 80,
            hidden_size: 8192,
            intermediate_size: 28672,
            num_attention_heads: 64,
            num_key_value_heads: 8,
            head_dim: 128,
            vocab_size: 128_256,
            tied_embeddings: false,
            max_position_embeddings: 8192,
        }
    }

    /// SmolLM2-135M's shape (ENVIRONMENT.md).
    pub fn smollm2_135m() -> ModelArchitecture {
        ModelArchitecture {
            num_layers: 30,
            hidden_size: 576,
            intermediate_size: 1536,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
            tied_embeddings: true,
            max_position_embeddings: 8192,
        }
    }

    pub fn tier(name: &str, weights: WeightSpec) -> TierSpec {
        TierSpec {
            name: name.to_owned(),
            weights,
            activations: ActivationPrecision::Bf16,
            kv_cache: KvCacheSpec::default(),
            layer_overrides: Vec::new(),
            replicas: 1,
            calibration: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_shapes::*;
    use super::*;
    use crate::model::{ModelSource, WeightSpec};
    use crate::vocab::WeightFormat;

    fn model(
        arch: ModelArchitecture,
        product: &str,
        count: i32,
        serving: ServingSpec,
        tiers: Vec<TierSpec>,
    ) -> QuantizedModelSpec {
        QuantizedModelSpec {
            source: ModelSource { uri: "file:///m.gguf".into(), format: None, sha256: None },
            architecture: arch,
            tiers,
            accelerator: AcceleratorSpec { product: product.into(), count, memory: None, compute_capability: None },
            serving,
        }
    }

    #[test]
    fn a_hand_computed_budget() {
        let arch = smollm2_135m();
        let serving = ServingSpec { max_context_tokens: 8192, max_concurrency: 32, memory_utilization: 0.9 };
        let spec = model(
            arch.clone(),
            "NVIDIA-L4",
            1,
            serving.clone(),
            vec![tier("bf16", WeightSpec::of(WeightFormat::Bf16))],
        );
        let plan = plan_model(&spec, &AcceleratorTable::builtin());
        let t = &plan.tiers[0];
        let usable = (23_034u64 * 1024 * 1024) as f64 * 0.9;
        assert_eq!(t.usable_bytes, usable.floor() as u64);
        // activations: 2048 tokens x (4*576 + 576 + 2*192 + 3*1536) x 2 B + 32 x 49152 x 4 B
        assert_eq!(t.activation_bytes, 2048 * (2304 + 576 + 384 + 4608) * 2 + 32 * 49152 * 4);
        let kv_budget = t.usable_bytes as i64 - t.weights.bytes as i64 - t.activation_bytes as i64 - (512 << 20);
        assert_eq!(t.kv_budget_bytes, kv_budget);
        // 30 layers x 2 x 3 heads x 64 x 2 B = 23040 B per token.
        assert_eq!(t.kv.bytes_per_token, 23_040);
        let per_seq_tokens = (kv_budget as u64 / 32) / 23_040;
        assert_eq!(t.max_context_tokens, per_seq_tokens.min(8192));
        assert!(t.fits(), "{}", t.message());
        assert_eq!(t.status().weight_bytes, t.weights.bytes as i64);
    }

    #[test]
    fn seventy_b_bf16_does_not_fit_an_l4_and_says_what_would() {
        let serving = ServingSpec { max_context_tokens: 8192, max_concurrency: 8, memory_utilization: 0.9 };
        let spec = model(llama3_70b(), "NVIDIA-L4", 1, serving, vec![tier("bf16", WeightSpec::of(WeightFormat::Bf16))]);
        let plan = plan_model(&spec, &AcceleratorTable::builtin());
        let t = &plan.tiers[0];
        assert!(!t.fits());
        assert!(matches!(t.problems[0], FitProblem::DoesNotFit { .. }));
        assert_eq!(t.max_context_tokens, 0);
        let msg = t.message();
        assert!(msg.contains("tier bf16: needs") && msg.contains("accelerator.count >= 8"), "{msg}");
        assert!(msg.contains("a smaller weight format"), "{msg}");
        assert_eq!(t.problems[0].reason(), "TierDoesNotFit");
    }

    #[test]
    fn seventy_b_int4_on_one_h100_fits_and_fp16_kv_limits_context() {
        let serving = ServingSpec { max_context_tokens: 8192, max_concurrency: 32, memory_utilization: 0.9 };
        let mut fp8_kv = tier("int4-kv8", WeightSpec::of(WeightFormat::Int4));
        fp8_kv.kv_cache.dtype = KvCacheDtype::Fp8E4m3;
        let spec = model(
            llama3_70b(),
            "NVIDIA-H100-80GB-HBM3",
            1,
            serving,
            vec![tier("int4", WeightSpec::of(WeightFormat::Int4)), fp8_kv],
        );
        let plan = plan_model(&spec, &AcceleratorTable::builtin());
        let (fp16, fp8) = (&plan.tiers[0], &plan.tiers[1]);
        // ~71.7 GiB usable - ~34.4 GiB weights leaves ~35 GiB: 32 x 8192 tokens x 0.33 MB does not fit at fp16.
        assert!(!fp16.fits());
        assert!(fp16.suggestions.iter().any(|s| s == "accelerator.count >= 2"), "{:?}", fp16.suggestions);
        assert!(fp16.suggestions.iter().any(|s| s.starts_with("maxContextTokens <= ")), "{:?}", fp16.suggestions);
        // fp8 KV halves the per-token cost, but 32 x 8192 tokens still need ~43 GB.
        assert!(fp8.max_context_tokens > fp16.max_context_tokens * 19 / 10, "fp8 KV should almost double context");
    }

    #[test]
    fn fp8_kv_is_suggested_when_it_alone_would_make_a_tier_fit() {
        let serving = ServingSpec { max_context_tokens: 8192, max_concurrency: 16, memory_utilization: 0.9 };
        let spec = model(
            llama3_70b(),
            "NVIDIA-H100-80GB-HBM3",
            1,
            serving,
            vec![tier("int4", WeightSpec::of(WeightFormat::Int4))],
        );
        let t = &plan_model(&spec, &AcceleratorTable::builtin()).tiers[0];
        assert!(!t.fits(), "16 x 8192 tokens x 0.33 MB = 43 GB should exceed the ~39 GB left after 37 GB of weights");
        assert!(t.suggestions.contains(&"kvCache.dtype fp8-e4m3".to_owned()), "{:?}", t.suggestions);
    }

    #[test]
    fn precision_the_hardware_cannot_run_fails_closed() {
        let mut w8a8 = tier("w8a8", WeightSpec::of(WeightFormat::Fp8E4m3));
        w8a8.activations = crate::vocab::ActivationPrecision::Fp8E4m3;
        let spec = model(smollm2_135m(), "NVIDIA-A100-SXM4-80GB", 1, ServingSpec::default(), vec![w8a8]);
        let t = &plan_model(&spec, &AcceleratorTable::builtin()).tiers[0];
        assert!(!t.fits());
        assert_eq!(t.problems.len(), 1);
        assert_eq!(t.problems[0].reason(), "UnsupportedPrecision");
        assert!(t.message().contains("needs SM89 or newer; NVIDIA-A100-SXM4-80GB is SM80"), "{}", t.message());
    }

    #[test]
    fn unknown_accelerators_fail_closed_unless_described() {
        let mut spec = model(
            smollm2_135m(),
            "ACME-X1",
            1,
            ServingSpec::default(),
            vec![tier("bf16", WeightSpec::of(WeightFormat::Bf16))],
        );
        let plan = plan_model(&spec, &AcceleratorTable::builtin());
        assert!(plan.accelerator.is_err());
        assert_eq!(plan.tiers[0].problems[0].reason(), "UnknownAccelerator");
        assert!(plan.tiers[0].message().contains("describe it with accelerator.memory"));
        spec.accelerator.memory = Some("48Gi".into());
        spec.accelerator.compute_capability = Some("8.9".into());
        let plan = plan_model(&spec, &AcceleratorTable::builtin());
        assert!(plan.all_fit(), "{}", plan.tiers[0].message());
        assert_eq!(plan.accelerator.unwrap().memory_bytes, 48 << 30);
    }

    #[test]
    fn the_sample_model_fits_its_l4() {
        let text = include_str!("../../../../deploy/samples/smollm2-135m.quantizedmodel.yaml");
        let qm: crate::QuantizedModel = serde_yaml::from_str(text).unwrap();
        let plan = plan_model(&qm.spec, &AcceleratorTable::builtin());
        for t in &plan.tiers {
            assert!(t.fits(), "{}", t.message());
            assert_eq!(t.max_context_tokens, 8192, "{} should reach the model's full context", t.name);
        }
        let bytes = |name: &str| plan.tiers.iter().find(|t| t.name == name).unwrap().weights.bytes;
        assert!(bytes("fp8") < bytes("bf16") * 55 / 100, "fp8 should be about half of bf16");
        assert!(bytes("int4-awq") < bytes("fp8"));
    }
}

//! The `PrecisionPolicy` custom resource: which task classes go to which tier of a QuantizedModel, and the
//! shadow canary that must prove a cheaper tier safe before it takes traffic.
//!
//! GitOps owns `spec`: the operator never writes it. What the router obeys is `status.effectiveRoutes`, which
//! the canary state machine advances; a promotion is reported with the spec change a person commits.

// kube-derive's repeated `printcolumn(type_ = ...)` arguments look like duplicated attributes to clippy.
#![allow(clippy::duplicated_attributes)]

use crate::conditions::Condition;
use crate::stats::ComparisonSums;
use crate::vocab::TaskClass;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Routes task classes to the precision tiers of one QuantizedModel and runs shadow canaries.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "quantfleet.io",
    version = "v1alpha1",
    kind = "PrecisionPolicy",
    plural = "precisionpolicies",
    shortname = "pp",
    category = "quantfleet",
    namespaced,
    status = "PrecisionPolicyStatus",
    derive = "PartialEq",
    doc = "Routes task classes (chat, code, math, agent, long-context) to the precision tiers of a QuantizedModel and runs shadow canaries that must prove a cheaper tier safe before it takes traffic.",
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.modelRef.name"),
    printcolumn(name = "Default", type_ = "string", json_path = ".spec.defaultTier"),
    printcolumn(name = "Candidate", type_ = "string", json_path = ".spec.canary.candidateTier"),
    printcolumn(name = "Canary", type_ = "string", json_path = ".status.canary.phase"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(
    validation = Rule::new("!has(self.canary) || self.canary.taskClasses.all(c, self.routes.exists(r, r.taskClass == c) ? !self.routes.exists(r, r.taskClass == c && r.tier == self.canary.candidateTier) : self.defaultTier != self.canary.candidateTier)")
        .message("canary.candidateTier already serves an in-scope task class: a canary compares a candidate with a different incumbent tier"),
)]
#[serde(rename_all = "camelCase")]
pub struct PrecisionPolicySpec {
    /// The QuantizedModel (in the same namespace) whose tiers this policy routes to. Immutable: canary
    /// evidence is only meaningful for one model.
    #[x_kube(validation = Rule::new("self == oldSelf").message("modelRef is immutable: canary evidence belongs to one model; create a new PrecisionPolicy for another model"))]
    pub model_ref: ModelRef,

    /// How a request's task class is decided.
    #[serde(default)]
    pub classifier: ClassifierSpec,

    /// Task class to tier routes. A class without a route goes to defaultTier. Each class appears at most once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5))]
    #[x_kube(validation = Rule::new("self.all(r, self.filter(s, s.taskClass == r.taskClass).size() == 1)").message("each taskClass may have only one route"))]
    pub routes: Vec<RouteSpec>,

    /// Tier for task classes without a route, and the last resort when a route's tier and its fallbacks
    /// have no healthy endpoint.
    #[schemars(length(min = 1, max = 30))]
    pub default_tier: String,

    /// A shadow canary that evaluates a candidate tier for some task classes before it takes their traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanarySpec>,
}

/// A reference to a QuantizedModel in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelRef {
    /// The QuantizedModel's metadata.name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// How the router decides a request's task class: an explicit header first, then the ordered rules, else chat.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClassifierSpec {
    /// Request header that names the task class explicitly (chat, code, math, agent, long-context). When
    /// present and valid it wins over every rule.
    #[serde(default = "default_header")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9-]+$"))]
    pub header: String,

    /// Rules tried in order; the first that matches decides. When empty, the built-in order applies:
    /// tools-or-json-schema -> agent, code-markers -> code, math-markers -> math,
    /// prompt-tokens-over longContextTokens -> long-context.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub rules: Vec<ClassifierRule>,

    /// Prompt length, in tokens, above which the built-in rules classify a request as long-context.
    #[serde(default = "default_long_context_tokens")]
    #[schemars(range(min = 1, max = 16777216))]
    pub long_context_tokens: i32,
}

fn default_header() -> String {
    "x-quantfleet-task-class".to_owned()
}
fn default_long_context_tokens() -> i32 {
    2048
}

impl Default for ClassifierSpec {
    fn default() -> Self {
        ClassifierSpec {
            header: default_header(),
            rules: Vec::new(),
            long_context_tokens: default_long_context_tokens(),
        }
    }
}

/// What a classifier rule looks at.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleCondition {
    /// The request declares tools or asks for a JSON schema / JSON object response format.
    #[serde(rename = "tools-or-json-schema")]
    ToolsOrJsonSchema,
    /// The prompt contains code fences or strong code markers (def, fn, #include, class ... :).
    #[serde(rename = "code-markers")]
    CodeMarkers,
    /// The prompt contains arithmetic or math markers (equations, LaTeX, word problems with numbers).
    #[serde(rename = "math-markers")]
    MathMarkers,
    /// The prompt has more than `promptTokensOver` tokens.
    #[serde(rename = "prompt-tokens-over")]
    PromptTokensOver,
    /// The prompt contains one of `keywords` (case-insensitive).
    #[serde(rename = "keywords")]
    Keywords,
}

/// One ordered classifier rule.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.when != 'prompt-tokens-over' || has(self.promptTokensOver)")
        .message("a prompt-tokens-over rule needs promptTokensOver"),
    validation = Rule::new("self.when != 'keywords' || (has(self.keywords) && size(self.keywords) > 0)")
        .message("a keywords rule needs at least one keyword"),
)]
#[serde(rename_all = "camelCase")]
pub struct ClassifierRule {
    /// The condition this rule tests.
    pub when: RuleCondition,
    /// The task class a matching request gets.
    pub task_class: TaskClass,
    /// Token threshold, for `when: prompt-tokens-over`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16777216))]
    pub prompt_tokens_over: Option<i32>,
    /// Case-insensitive substrings, for `when: keywords`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub keywords: Option<Vec<String>>,
}

/// Sends one task class to a tier, with ordered fallbacks.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("!self.fallbacks.exists(f, f == self.tier)").message("a route's fallbacks must not repeat its own tier"),
    validation = Rule::new("self.fallbacks.all(f, self.fallbacks.filter(g, g == f).size() == 1)").message("a route's fallbacks must be distinct"),
)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    /// The task class this route serves.
    pub task_class: TaskClass,
    /// Tier name in the referenced QuantizedModel.
    #[schemars(length(min = 1, max = 30))]
    pub tier: String,
    /// Tiers tried in order when `tier` has no healthy endpoint (usually higher precision ones).
    #[serde(default)]
    #[schemars(length(max = 8), inner(length(min = 1, max = 30)))]
    pub fallbacks: Vec<String>,
}

/// A shadow canary: mirror traffic to a candidate tier, compare it with the incumbent, then step live
/// traffic over while the gates keep passing.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.taskClasses.all(c, self.taskClasses.filter(d, d == c).size() == 1)").message("canary.taskClasses must be distinct"),
    validation = Rule::new("self.steps.all(s, self.steps.filter(t, t.livePercent == s.livePercent).size() == 1) && self.steps.map(s, s.livePercent).isSorted()")
        .message("canary.steps must have strictly increasing livePercent"),
    validation = Rule::new("self.gates.all(g, !has(g.taskClass) || g.taskClass in self.taskClasses)")
        .message("every canary gate's taskClass must be one of canary.taskClasses"),
    validation = Rule::new("self.gates.all(g, self.gates.filter(h, has(h.taskClass) == has(g.taskClass) && (!has(h.taskClass) || h.taskClass == g.taskClass)).size() == 1)")
        .message("at most one gate per taskClass, and at most one default gate (without taskClass)"),
)]
#[serde(rename_all = "camelCase")]
pub struct CanarySpec {
    /// The tier under evaluation, from the referenced QuantizedModel.
    #[schemars(length(min = 1, max = 30))]
    pub candidate_tier: String,

    /// Task classes whose traffic the candidate may take over.
    #[schemars(length(min = 1, max = 5))]
    pub task_classes: Vec<TaskClass>,

    /// Percent of in-scope requests mirrored to the candidate during shadowing (deterministic decoding, never
    /// returned to the client).
    #[serde(default = "default_shadow_percent")]
    #[schemars(range(min = 0.01, max = 100.0))]
    pub shadow_percent: f64,

    /// Live traffic steps after shadowing passes, in strictly increasing percent. After the last step the
    /// candidate is promoted (100%). Empty: promote straight after shadowing.
    #[serde(default)]
    #[schemars(length(max = 10))]
    pub steps: Vec<CanaryStep>,

    /// Quality gates. A gate without taskClass is the default for every in-scope class without its own gate.
    /// A class with no applicable gate uses the built-in defaults (minSamples 200, maxMeanKlDivergence 0.05,
    /// minTop1Agreement 0.9).
    #[serde(default)]
    #[schemars(length(max = 6))]
    pub gates: Vec<QualityGate>,

    /// automatic: promote when the last step's gates pass. manual: pause there until a person promotes.
    #[serde(default)]
    pub promotion: PromotionMode,

    /// What a failed gate does: rollback (all in-scope traffic back to the incumbent) or pause (hold the current
    /// step for a person to decide).
    #[serde(default)]
    pub on_failure: FailureAction,
}

fn default_shadow_percent() -> f64 {
    10.0
}

/// One live-traffic step of a canary.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStep {
    /// Percent of each in-scope class's live traffic served by the candidate during this step.
    #[schemars(range(min = 1, max = 100))]
    pub live_percent: i32,
    /// New comparison samples per class required at this step before the gates are re-checked and the canary
    /// moves on. Defaults to the gate's minSamples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub min_samples: Option<i32>,
}

/// Thresholds a candidate must meet for a task class, measured on shadow pairs against the incumbent.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.maxMeanKlDivergence) || has(self.minTop1Agreement) || has(self.maxPerplexityRatio) || has(self.maxStructuredInvalidRate) || has(self.maxLatencyRatio)")
    .message("a gate must set at least one threshold"))]
#[serde(rename_all = "camelCase")]
pub struct QualityGate {
    /// The class this gate applies to; omitted, it is the default for in-scope classes without their own gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_class: Option<TaskClass>,
    /// Comparison samples needed before the gate is evaluated.
    #[serde(default = "default_min_samples")]
    #[schemars(range(min = 1, max = 1000000))]
    pub min_samples: i32,
    /// Largest allowed mean KL divergence (incumbent || candidate) of next-token distributions, in nats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub max_mean_kl_divergence: Option<f64>,
    /// Smallest allowed fraction of positions where the candidate's top token equals the incumbent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_top1_agreement: Option<f64>,
    /// Largest allowed ratio of candidate to incumbent perplexity on the incumbent's tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub max_perplexity_ratio: Option<f64>,
    /// Largest allowed fraction of agent/structured responses that are not valid JSON for their schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_structured_invalid_rate: Option<f64>,
    /// Largest allowed ratio of candidate to incumbent p50 latency per token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.01, max = 100.0))]
    pub max_latency_ratio: Option<f64>,
}

fn default_min_samples() -> i32 {
    200
}

/// Whether the final promotion needs a person.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PromotionMode {
    /// Promote as soon as the last step's gates pass.
    #[default]
    #[serde(rename = "automatic")]
    Automatic,
    /// Pause before promotion until a person sets the annotation quantfleet.io/promote=true.
    #[serde(rename = "manual")]
    Manual,
}

/// What happens when a gate fails.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FailureAction {
    /// Send all in-scope traffic back to the incumbent tiers and stop the canary.
    #[default]
    #[serde(rename = "rollback")]
    Rollback,
    /// Hold the current step for a person to decide.
    #[serde(rename = "pause")]
    Pause,
}

/// What the operator decided for a PrecisionPolicy; the router obeys `effectiveRoutes`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PrecisionPolicyStatus {
    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready (routes resolved against the model's tiers), CanaryHealthy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The routes the router applies right now, one per task class (every class is listed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub effective_routes: Vec<EffectiveRoute>,
    /// State of the canary, when spec.canary is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryStatus>,
}

/// The route the router applies to one task class.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveRoute {
    /// The task class.
    pub task_class: TaskClass,
    /// The tier serving this class's live traffic (the incumbent during a canary).
    pub tier: String,
    /// Ordered fallback tiers.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// The canary candidate for this class, while a canary is shadowing or stepping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_tier: Option<String>,
    /// Percent of this class's requests mirrored to the candidate.
    #[serde(default)]
    pub shadow_percent: f64,
    /// Percent of this class's live traffic served by the candidate.
    #[serde(default)]
    pub candidate_live_percent: i32,
}

/// Phases of a canary.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CanaryPhase {
    /// Waiting for the candidate tier to become ready.
    #[default]
    Pending,
    /// Mirroring traffic until every in-scope class has enough samples, then evaluating the gates.
    Shadowing,
    /// Serving a step's percent of live traffic from the candidate, gates re-checked at every step.
    Stepping,
    /// Waiting for a person (manual promotion, or onFailure: pause).
    Paused,
    /// The candidate serves all in-scope traffic.
    Promoted,
    /// A gate failed; in-scope traffic went back to the incumbent.
    RolledBack,
}

/// Canary progress and its evidence.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStatus {
    /// Current phase.
    pub phase: CanaryPhase,
    /// The candidate tier evaluated (copied from spec when the canary started).
    pub candidate_tier: String,
    /// Index into spec.canary.steps of the current step while Stepping (0-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<i32>,
    /// Percent of in-scope live traffic the candidate serves now.
    #[serde(default)]
    pub live_percent: i32,
    /// When the current phase (or step) started, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_since: Option<String>,
    /// Per-class measurements and verdicts. Kept in status so an operator restart resumes without re-counting.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<ClassEvidence>,
    /// Human-readable reason for the last transition, naming the gate that decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// After promotion or rollback: the spec change to commit to Git so spec matches what is served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommended_spec_change: Option<String>,
}

/// Measured comparison of candidate and incumbent for one task class.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClassEvidence {
    /// The task class.
    pub task_class: TaskClass,
    /// Comparison samples (shadow pairs) measured since the current phase or step began.
    pub samples: i64,
    /// The router's cumulative counters when the current phase or step began; the window's means are the
    /// difference between the router's counters now and these.
    #[serde(default)]
    pub window_start: ComparisonSums,
    /// Mean KL divergence (incumbent || candidate), nats per token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_kl_divergence: Option<f64>,
    /// Fraction of positions with the same top-1 token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
    /// Candidate / incumbent perplexity on the incumbent's tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity_ratio: Option<f64>,
    /// Fraction of structured responses that were not valid JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structured_invalid_rate: Option<f64>,
    /// Candidate / incumbent p50 latency per token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ratio: Option<f64>,
    /// Pending (not enough samples), Pass or Fail.
    #[serde(default)]
    pub verdict: GateVerdict,
    /// The gate threshold that decided a Fail (e.g. maxMeanKlDivergence), empty otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deciding_gate: Option<String>,
}

/// Outcome of a class's gate.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GateVerdict {
    /// Fewer samples than the gate's minimum.
    #[default]
    Pending,
    /// Every threshold met.
    Pass,
    /// A threshold was missed.
    Fail,
}

//! Quantfleet's public API: the `QuantizedModel` and `PrecisionPolicy` custom resources (group
//! `quantfleet.io`, version `v1alpha1`), the shared vocabulary (precisions, KV-cache dtypes, task classes,
//! conditions) and the pure fit planner that decides whether a tier fits its accelerator.
//!
//! No Kubernetes client lives here: the operator, router, node and CLI all depend on this crate.

pub mod conditions;
pub mod model;
pub mod node;
pub mod plan;
pub mod policy;
pub mod routes;
pub mod stats;
pub mod validate;
pub mod vocab;

pub use model::{
    AcceleratorSpec, CalibrationSpec, CheckpointFormat, KvCacheSpec, LayerOverride, ModelArchitecture, ModelSource,
    QuantizedModel, QuantizedModelSpec, QuantizedModelStatus, ServingSpec, TierSpec, TierStatus, WeightSpec,
};
pub use policy::{
    CanaryPhase, CanarySpec, CanaryStatus, CanaryStep, ClassEvidence, ClassifierRule, ClassifierSpec, EffectiveRoute,
    FailureAction, GateVerdict, ModelRef, PrecisionPolicy, PrecisionPolicySpec, PrecisionPolicyStatus, PromotionMode,
    QualityGate, RouteSpec, RuleCondition,
};
pub use vocab::{
    ActivationPrecision, KvCacheDtype, KvCacheScheme, QuantMethod, TaskClass, UnknownName, WeightFormat, WeightScaling,
};

/// API group of every Quantfleet resource.
pub const GROUP: &str = "quantfleet.io";
/// API version served and stored.
pub const VERSION: &str = "v1alpha1";

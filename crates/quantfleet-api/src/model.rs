//! The `QuantizedModel` custom resource: one checkpoint served at several precision tiers.
//!
//! Validation that needs only the object itself is declared here as CEL rules, so `kubectl apply` rejects a
//! bad resource with a message that says what to fix; [`crate::validate`] repeats the same checks in Rust for
//! the operator and the CLI, and adds those that need other objects.

// kube-derive's repeated `printcolumn(type_ = ...)` arguments look like duplicated attributes to clippy.
#![allow(clippy::duplicated_attributes)]

use crate::conditions::Condition;
use crate::vocab::{ActivationPrecision, KvCacheDtype, KvCacheScheme, QuantMethod, WeightFormat, WeightScaling};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A model checkpoint served at one or more precision tiers on GPU workers.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "quantfleet.io",
    version = "v1alpha1",
    kind = "QuantizedModel",
    plural = "quantizedmodels",
    shortname = "qm",
    category = "quantfleet",
    namespaced,
    status = "QuantizedModelStatus",
    derive = "PartialEq",
    doc = "A model checkpoint served at several precision tiers (BF16, FP8, INT8, INT4, NVFP4/MXFP4 weights; FP16/FP8/INT8/INT4 KV cache).",
    printcolumn(name = "Accelerator", type_ = "string", json_path = ".spec.accelerator.product"),
    printcolumn(name = "Tiers", type_ = "string", json_path = ".spec.tiers[*].name"),
    printcolumn(name = "Fits", type_ = "string", json_path = ".status.conditions[?(@.type==\"FitsAccelerator\")].status"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.spec.tiers.all(t, size(self.metadata.name) + size(t.name) <= 62)")
        .message("metadata.name and each tier name together must be at most 62 characters: every tier gets a Service named <model>-<tier>")
)]
#[x_kube(
    validation = Rule::new("self.serving.maxContextTokens <= self.architecture.maxPositionEmbeddings")
        .message("serving.maxContextTokens exceeds architecture.maxPositionEmbeddings: the model cannot attend that far"),
    validation = Rule::new("self.tiers.all(t, !has(t.layerOverrides) || t.layerOverrides.all(o, (!has(o.layers) || o.layers.all(l, l < self.architecture.numLayers)) && (!has(o.firstLayers) || o.firstLayers <= self.architecture.numLayers) && (!has(o.lastLayers) || o.lastLayers <= self.architecture.numLayers)))")
        .message("a layerOverride names a layer the model does not have: layer indices run from 0 to architecture.numLayers - 1"),
)]
#[serde(rename_all = "camelCase")]
pub struct QuantizedModelSpec {
    /// Where the checkpoint is read from, and how to check it.
    pub source: ModelSource,

    /// The transformer's shape, used to plan memory (weights, KV cache) before anything is deployed.
    /// `quantfleet plan --gguf FILE` prints it for a GGUF checkpoint. Immutable: a different shape is a
    /// different model, so create a new QuantizedModel.
    #[x_kube(validation = Rule::new("self == oldSelf").message("architecture is immutable: a different shape is a different model; create a new QuantizedModel"))]
    pub architecture: ModelArchitecture,

    /// The precision tiers to serve. Each tier becomes a Deployment of inference nodes and a Service.
    /// Tier names are unique within the model.
    #[schemars(length(min = 1, max = 8))]
    #[x_kube(validation = Rule::new("self.all(t, self.filter(u, u.name == t.name).size() == 1)").message("tier names must be unique within a QuantizedModel"))]
    pub tiers: Vec<TierSpec>,

    /// The GPU every replica of every tier runs on.
    pub accelerator: AcceleratorSpec,

    /// Serving limits the memory plan must satisfy on the accelerator.
    #[serde(default)]
    pub serving: ServingSpec,
}

/// Location and integrity of a checkpoint.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.uri.startsWith('file://') || self.uri.startsWith('pvc://') || self.uri.startsWith('http://') || self.uri.startsWith('https://')")
        .message("source.uri must start with file://, pvc:// or https:// (hf:// and oci:// are not supported yet)"),
    validation = Rule::new("!(self.uri.startsWith('http://') || self.uri.startsWith('https://')) || has(self.sha256)")
        .message("http(s) sources need source.sha256, so that a changed or truncated download is refused"),
    validation = Rule::new("!self.uri.startsWith('pvc://') || self.uri.matches('^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.+$')")
        .message("pvc:// URIs look like pvc://CLAIM/path/inside/the/claim/model.gguf"),
)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// The checkpoint's location: `file:///path/model.gguf` (a path inside the node image or a mounted volume),
    /// `pvc://CLAIM/path/model.gguf` (a PersistentVolumeClaim in the model's namespace, mounted read-only), or
    /// `https://host/model.gguf` (downloaded by an init container; `sha256` required).
    #[schemars(length(min = 1, max = 2048))]
    pub uri: String,

    /// Checkpoint format. Detected from the file when omitted (GGUF magic, else safetensors with config.json).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<CheckpointFormat>,

    /// Lower-case hex SHA-256 of the checkpoint file: the GGUF file, or a safetensors directory's
    /// `model.safetensors`; for sharded safetensors, of the shards its index names concatenated in file-name
    /// order (`LC_ALL=C cat model-*.safetensors | sha256sum`). When set, the node refuses weights whose digest
    /// differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-f0-9]{64}$"))]
    pub sha256: Option<String>,
}

/// On-disk checkpoint formats the node can load.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// A single GGUF v3 file (llama.cpp's format); tokenizer and chat template are read from its metadata.
    #[serde(rename = "gguf")]
    Gguf,
    /// Hugging Face safetensors shards with config.json and tokenizer.json beside them.
    #[serde(rename = "safetensors")]
    Safetensors,
}

/// The decoder-only transformer's shape (llama family: RMSNorm, RoPE, grouped-query attention, SwiGLU).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.numAttentionHeads % self.numKeyValueHeads == 0")
    .message("numAttentionHeads must be a multiple of numKeyValueHeads (grouped-query attention)"))]
#[serde(rename_all = "camelCase")]
pub struct ModelArchitecture {
    /// Number of transformer blocks.
    #[schemars(range(min = 1, max = 1024))]
    pub num_layers: i32,
    /// Width of the residual stream (embedding dimension).
    #[schemars(range(min = 1, max = 131072))]
    pub hidden_size: i32,
    /// Inner width of the SwiGLU feed-forward network.
    #[schemars(range(min = 1, max = 1048576))]
    pub intermediate_size: i32,
    /// Number of query heads.
    #[schemars(range(min = 1, max = 1024))]
    pub num_attention_heads: i32,
    /// Number of key/value heads (equal to numAttentionHeads without grouped-query attention).
    #[schemars(range(min = 1, max = 1024))]
    pub num_key_value_heads: i32,
    /// Dimension of one attention head.
    #[schemars(range(min = 1, max = 1024))]
    pub head_dim: i32,
    /// Number of tokens in the vocabulary (rows of the embedding matrix).
    #[schemars(range(min = 1, max = 4194304))]
    pub vocab_size: i32,
    /// True when the output projection (lm_head) shares the embedding matrix, so it is stored once.
    #[serde(default)]
    pub tied_embeddings: bool,
    /// Longest context the model was trained for, in tokens.
    #[schemars(range(min = 1, max = 16777216))]
    pub max_position_embeddings: i32,
}

/// One precision tier: how the weights, activations and KV cache of this copy of the model are stored.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.activations != 'fp8-e4m3' || self.weights.format in ['fp8-e4m3', 'int8']")
        .message("8-bit activations (W8A8) need 8-bit weights: set weights.format to fp8-e4m3 or int8, or activations to bf16"),
    validation = Rule::new("self.activations != 'int8' || self.weights.format in ['int8', 'int4']")
        .message("int8 activations need int8 (W8A8) or int4 (W4A8) weights: set weights.format, or activations to bf16"),
    validation = Rule::new("self.weights.method != 'smoothquant' || self.activations in ['fp8-e4m3', 'int8']")
        .message("weights.method smoothquant is for W8A8: set activations to int8 or fp8-e4m3"),
)]
#[serde(rename_all = "camelCase")]
pub struct TierSpec {
    /// Tier name, unique within the model (e.g. bf16, fp8, int4-awq). Routes in a PrecisionPolicy refer to it,
    /// and it is part of the tier's Deployment and Service names.
    #[schemars(length(min = 1, max = 30), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,

    /// Weight format and quantization method.
    pub weights: WeightSpec,

    /// Activation precision: bf16 (the default) for weight-only quantization, int8 or fp8-e4m3 for W8A8.
    #[serde(default)]
    pub activations: ActivationPrecision,

    /// KV-cache precision. Independent of the weights: an fp8 KV cache halves KV memory at any weight tier.
    #[serde(default)]
    pub kv_cache: KvCacheSpec,

    /// Parts of the model kept at a different (usually higher) precision than `weights`: the first and last
    /// layers, the embeddings and lm_head are the most sensitive to quantization. Later entries win.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub layer_overrides: Vec<LayerOverride>,

    /// Number of inference node replicas serving this tier.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// Calibration data for methods that need activations (awq, gptq, smoothquant). Defaults to the node's
    /// built-in calibration text when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationSpec>,
}

fn default_replicas() -> i32 {
    1
}

impl TierSpec {
    /// Whether loading the tier runs a calibration pass: some part of it (the tier's weights or a layer
    /// override) uses AWQ, GPTQ or SmoothQuant.
    pub fn needs_calibration(&self) -> bool {
        std::iter::once(&self.weights)
            .chain(self.layer_overrides.iter().map(|o| &o.weights))
            .any(|w| w.method.needs_calibration())
    }

    /// The ConfigMap holding the tier's calibration text when `calibration.dataset` is `configmap/NAME` and the
    /// tier calibrates at all (a tier that only rounds to nearest never reads it).
    pub fn calibration_config_map(&self) -> Option<&str> {
        self.calibration.as_ref().and_then(CalibrationSpec::config_map).filter(|_| self.needs_calibration())
    }
}

/// How the weights of a tier (or of an overridden part of it) are quantized.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("!has(self.groupSize) || self.groupSize in [32, 64, 128, 256]")
        .message("weights.groupSize must be one of 32, 64, 128, 256"),
    validation = Rule::new("!(self.format in ['nvfp4', 'mxfp4']) || (!has(self.groupSize) && !has(self.scaling))")
        .message("nvfp4 (blocks of 16) and mxfp4 (blocks of 32) have fixed block scales: remove groupSize and scaling"),
    validation = Rule::new("!(self.format in ['bf16', 'fp16']) || (self.method == 'rtn' && !has(self.groupSize) && !has(self.scaling) && !has(self.symmetric))")
        .message("bf16 and fp16 weights are not quantized: remove method, groupSize, scaling and symmetric"),
    validation = Rule::new("!has(self.groupSize) || !has(self.scaling) || self.scaling == 'per-group'")
        .message("weights.groupSize applies only to per-group scaling"),
    validation = Rule::new("self.format != 'int4' || !has(self.scaling) || self.scaling != 'per-tensor'")
        .message("int4 weights need per-group or per-channel scaling; a single scale per tensor loses too much"),
    validation = Rule::new("self.method != 'awq' || self.format == 'int4'")
        .message("weights.method awq is for int4 weights"),
    validation = Rule::new("self.method != 'gptq' || self.format in ['int4', 'int8', 'fp8-e4m3']")
        .message("weights.method gptq is for int4, int8 or fp8-e4m3 weights"),
    validation = Rule::new("self.method != 'smoothquant' || self.format in ['int8', 'fp8-e4m3']")
        .message("weights.method smoothquant is for int8 or fp8-e4m3 weights"),
    validation = Rule::new("!has(self.symmetric) || self.format in ['int4', 'int8']")
        .message("weights.symmetric applies to integer formats (int4, int8) only"),
)]
#[serde(rename_all = "camelCase")]
pub struct WeightSpec {
    /// Number format of the stored weights.
    pub format: WeightFormat,

    /// How weights are rounded: rtn (round to nearest, no calibration); awq (int4: activation-aware input
    /// scales) and gptq (int4, int8, fp8-e4m3: rounding errors compensated column by column), both calibrated
    /// on the tier's calibration text; smoothquant (W8A8 smoothing factors).
    #[serde(default)]
    pub method: QuantMethod,

    /// Elements per scale group for per-group scaling: 32, 64, 128 or 256. Smaller groups are more accurate
    /// and cost more scale memory (an f16 scale per group for int4, f32 for fp8-e4m3). Defaults to 128 for
    /// int4; setting it on int8 or fp8-e4m3 selects per-group scaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_size: Option<i32>,

    /// Scale granularity. Defaults: per-group for int4, per-channel for int8 and fp8-e4m3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<WeightScaling>,

    /// Integer formats only: true for symmetric quantization (no zero point). Defaults: int4 asymmetric
    /// (with zero points), int8 symmetric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric: Option<bool>,
}

impl WeightSpec {
    /// An unquantized or round-to-nearest spec of `format` with every other field at its default.
    pub fn of(format: WeightFormat) -> Self {
        WeightSpec { format, method: QuantMethod::Rtn, group_size: None, scaling: None, symmetric: None }
    }

    /// Scale granularity after defaults.
    pub fn effective_scaling(&self) -> Option<WeightScaling> {
        match self.format {
            WeightFormat::Bf16 | WeightFormat::Fp16 => None,
            WeightFormat::Nvfp4 | WeightFormat::Mxfp4 => Some(WeightScaling::PerGroup),
            WeightFormat::Int4 => Some(self.scaling.unwrap_or(WeightScaling::PerGroup)),
            WeightFormat::Int8 | WeightFormat::Fp8E4m3 => Some(self.scaling.unwrap_or(if self.group_size.is_some() {
                WeightScaling::PerGroup
            } else {
                WeightScaling::PerChannel
            })),
        }
    }

    /// Elements per scale group after defaults, for per-group scaling (fixed blocks for nvfp4 and mxfp4).
    pub fn effective_group_size(&self) -> Option<u32> {
        if let Some(block) = self.format.fixed_block() {
            return Some(block);
        }
        match self.effective_scaling() {
            Some(WeightScaling::PerGroup) => Some(self.group_size.map_or(128, |g| g.max(1) as u32)),
            _ => None,
        }
    }

    /// Whether integer weights carry zero points, after defaults.
    pub fn effective_symmetric(&self) -> bool {
        match self.format {
            WeightFormat::Int4 => self.symmetric.unwrap_or(false),
            _ => self.symmetric.unwrap_or(true),
        }
    }
}

/// KV-cache precision of a tier.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("self.scheme != 'kivi' || self.dtype == 'int4'")
        .message("kvCache.scheme kivi is for int4 KV caches"),
    validation = Rule::new("self.scheme == 'kivi' || (self.sinkTokens == 0 && self.residualTokens == 0)")
        .message("kvCache.sinkTokens and residualTokens keep tokens at full precision in an int4 KIVI cache; they need scheme kivi (the per-token caches have no full-precision window)"),
    validation = Rule::new("self.scheme != 'kivi' || self.residualTokens >= 32")
        .message("an int4 KIVI cache needs residualTokens >= 32: keys are quantized per channel over 32-token groups, so the newest tokens wait at full precision until their group is complete"),
)]
#[serde(rename_all = "camelCase")]
pub struct KvCacheSpec {
    /// Element type of cached keys and values.
    #[serde(default)]
    pub dtype: KvCacheDtype,
    /// Scale grouping of a quantized cache: per-token (one scale per token and head) or kivi (int4 only:
    /// keys per channel, values per token).
    #[serde(default)]
    pub scheme: KvCacheScheme,
    /// Number of first tokens (attention sinks) kept at full precision (fp16) in an int4 KIVI cache.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1024))]
    pub sink_tokens: i32,
    /// Most recent tokens kept at full precision (fp16) in an int4 KIVI cache before they are quantized, 32
    /// at a time (at least 32).
    #[serde(default)]
    #[schemars(range(min = 0, max = 8192))]
    pub residual_tokens: i32,
}

/// Keeps part of the model at another precision than the tier's `weights`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.firstLayers) || has(self.lastLayers) || has(self.layers) || (has(self.embeddings) && self.embeddings) || (has(self.lmHead) && self.lmHead)")
    .message("a layerOverride must select something: firstLayers, lastLayers, layers, embeddings or lmHead"))]
#[serde(rename_all = "camelCase")]
pub struct LayerOverride {
    /// Applies to the first N transformer layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub first_layers: Option<i32>,
    /// Applies to the last N transformer layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub last_layers: Option<i32>,
    /// Applies to these transformer layers (0-based indices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub layers: Option<Vec<i32>>,
    /// Applies to the token embedding matrix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embeddings: Option<bool>,
    /// Applies to the output projection (lm_head). With tied embeddings it is the embedding matrix, so
    /// embeddings and lmHead select the same tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lm_head: Option<bool>,
    /// Weight format of the selected parts.
    pub weights: WeightSpec,
}

/// Calibration data for methods that need activations.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.dataset == 'builtin' || self.dataset.matches('^configmap/[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')")
    .message("calibration.dataset is 'builtin' or 'configmap/NAME' (a ConfigMap in the model's namespace with key calibration.txt)"))]
#[serde(rename_all = "camelCase")]
pub struct CalibrationSpec {
    /// `builtin` (text bundled with the node: chat, code, math and JSON samples) or `configmap/NAME` for a
    /// ConfigMap in the model's namespace whose key `calibration.txt` holds the text. The operator mounts that
    /// ConfigMap in the tier's pods and rolls them when the text changes (seen at its next resync, within
    /// 5 minutes); until it exists with a non-empty
    /// `calibration.txt` the tier is not applied (Ready=False, reason CalibrationDataMissing). Read only by
    /// tiers that use awq, gptq or smoothquant.
    #[serde(default = "default_dataset")]
    #[schemars(length(max = 270))]
    pub dataset: String,
    /// Number of calibration sequences.
    #[serde(default = "default_samples")]
    #[schemars(range(min = 1, max = 4096))]
    pub samples: i32,
    /// Tokens per calibration sequence.
    #[serde(default = "default_sequence_length")]
    #[schemars(range(min = 16, max = 8192))]
    pub sequence_length: i32,
}

impl CalibrationSpec {
    /// NAME of a `configmap/NAME` dataset; None for `builtin`.
    pub fn config_map(&self) -> Option<&str> {
        self.dataset.strip_prefix("configmap/")
    }
}

impl Default for CalibrationSpec {
    fn default() -> Self {
        Self { dataset: default_dataset(), samples: default_samples(), sequence_length: default_sequence_length() }
    }
}

fn default_dataset() -> String {
    "builtin".to_owned()
}
fn default_samples() -> i32 {
    128
}
fn default_sequence_length() -> i32 {
    512
}

/// The accelerator every replica runs on.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.memory) == has(self.computeCapability)")
    .message("accelerator.memory and accelerator.computeCapability describe a product missing from Quantfleet's table: give both or neither"))]
#[serde(rename_all = "camelCase")]
pub struct AcceleratorSpec {
    /// GPU product, as the `nvidia.com/gpu.product` node label spells it (e.g. NVIDIA-H100-80GB-HBM3,
    /// NVIDIA-A100-SXM4-80GB, NVIDIA-L4). Pods are scheduled only onto nodes with this label value.
    #[schemars(length(min = 1, max = 63))]
    pub product: String,
    /// GPUs per replica; the weights and KV cache are split across them (tensor parallelism).
    #[serde(default = "default_count")]
    #[schemars(range(min = 1, max = 16))]
    pub count: i32,
    /// Memory of one GPU (a quantity such as 80Gi), for products missing from Quantfleet's accelerator table.
    /// Set together with computeCapability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"))]
    pub memory: Option<String>,
    /// CUDA compute capability (e.g. "8.9"), for products missing from Quantfleet's accelerator table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{1,2}\.[0-9]$"))]
    pub compute_capability: Option<String>,
}

fn default_count() -> i32 {
    1
}

/// Serving limits the memory plan must satisfy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServingSpec {
    /// Longest context (prompt plus generated tokens) one request may use.
    #[serde(default = "default_max_context")]
    #[schemars(range(min = 16, max = 16777216))]
    pub max_context_tokens: i32,
    /// Requests one replica serves at the same time, each at up to maxContextTokens.
    #[serde(default = "default_max_concurrency")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_concurrency: i32,
    /// Fraction of GPU memory the node may use for weights, KV cache and activations (like vLLM's
    /// gpu-memory-utilization); the rest is headroom for the CUDA context and fragmentation.
    #[serde(default = "default_memory_utilization")]
    #[schemars(range(min = 0.1, max = 0.99))]
    pub memory_utilization: f64,
}

fn default_max_context() -> i32 {
    4096
}
fn default_max_concurrency() -> i32 {
    8
}
fn default_memory_utilization() -> f64 {
    0.9
}

impl Default for ServingSpec {
    fn default() -> Self {
        ServingSpec {
            max_context_tokens: default_max_context(),
            max_concurrency: default_max_concurrency(),
            memory_utilization: default_memory_utilization(),
        }
    }
}

/// What the operator observed and decided about a QuantizedModel.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct QuantizedModelStatus {
    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded, FitsAccelerator and QuantizationVerified.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// One entry per tier in spec.tiers, in the same order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<TierStatus>,
}

/// Observed state and memory plan of one tier.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TierStatus {
    /// The tier's name in spec.tiers.
    pub name: String,
    /// Whether the tier fits its accelerator at the declared serving limits. A tier that does not fit is not
    /// deployed.
    pub fits: bool,
    /// Planned bytes of weights per replica (all GPUs of the replica together).
    pub weight_bytes: i64,
    /// Planned bytes of KV cache per token of context, scales included.
    pub kv_bytes_per_token: i64,
    /// Longest context every one of serving.maxConcurrency requests can have at once with the memory left after
    /// weights and activations.
    pub max_context_tokens: i64,
    /// Desired replicas.
    #[serde(default)]
    pub replicas: i32,
    /// Replicas whose node reports SERVING.
    #[serde(default)]
    pub ready_replicas: i32,
    /// gRPC address of the tier's Service (host:port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Backend the nodes report (cuda or cpu).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Precision the nodes report serving, as `weights/activations/kv` (e.g. int4-g128/bf16/fp8-e4m3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_precision: Option<String>,
    /// Why the tier is not ready or does not fit, and what would.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

//! The node's settings: the operator's [`NodeConfig`] file (`--config`), command-line flags that override or
//! replace it, and validation that names the offending field before anything is loaded.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use quantfleet_api::model::{KvCacheSpec, TierSpec, WeightSpec};
use quantfleet_api::node::{NODE_GRPC_PORT, NODE_METRICS_PORT, NodeConfig};

/// Command-line flags of `quantfleet node`. Flags override the config file's fields.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct NodeArgs {
    /// The node configuration written by the operator (NodeConfig, YAML or JSON).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model: a GGUF file, or a Hugging Face llama checkpoint directory (config.json, safetensors weights,
    /// tokenizer.json); overrides the config's source.uri.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Expected lower-case hex SHA-256 of the model file (for a checkpoint directory: of model.safetensors, or
    /// of its shards concatenated in file-name order); overrides source.sha256.
    #[arg(long)]
    pub sha256: Option<String>,
    /// Model name reported in ModelInfo and metrics labels (default: the file's stem).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Tier spec file (a TierSpec of the API types, YAML or JSON); overrides the config's tier.
    #[arg(long, conflicts_with = "tier")]
    pub tier_spec: Option<PathBuf>,
    /// Tier name, for a tier given by flags (with --weights and --kv-cache-dtype).
    #[arg(long)]
    pub tier: Option<String>,
    /// Weight format of a tier given by flags: bf16, fp16, fp8-e4m3, int8, int4, nvfp4, mxfp4.
    #[arg(long, requires = "tier")]
    pub weights: Option<String>,
    /// KV-cache dtype of a tier given by flags: fp16, bf16, fp8-e4m3, int8, int4.
    #[arg(long, requires = "tier")]
    pub kv_cache_dtype: Option<String>,
    /// Calibration text for a tier that uses AWQ, GPTQ or SmoothQuant, replacing its `calibration.dataset`
    /// (default: the config's calibrationFile for a `configmap/NAME` dataset, else the built-in text).
    #[arg(long)]
    pub calibration_file: Option<PathBuf>,
    /// Address to bind the gRPC server to.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// gRPC port (Generate, Score, ModelInfo, grpc.health.v1); 0 picks a free port.
    #[arg(long, default_value_t = NODE_GRPC_PORT)]
    pub port: u16,
    /// Prometheus metrics port (HTTP GET /metrics); 0 picks a free port.
    #[arg(long, default_value_t = NODE_METRICS_PORT)]
    pub metrics_port: u16,
    /// KV-cache budget in bytes (overrides kvBudgetBytes; default 256 MiB).
    #[arg(long)]
    pub kv_budget_bytes: Option<u64>,
    /// Sequences decoded together in one step (default: serving.maxConcurrency, else 32).
    #[arg(long)]
    pub max_batch: Option<u32>,
    /// Requests waiting for a batch slot before new ones get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 64)]
    pub max_queue: u32,
    /// Longest context (prompt plus generated tokens); default serving.maxContextTokens, capped by the model's.
    #[arg(long)]
    pub max_context: Option<u32>,
    /// Tokens generated when a request leaves max_tokens at 0.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: u32,
    /// Timeout of requests that set none, in milliseconds (0: none).
    #[arg(long, default_value_t = 0)]
    pub request_timeout_ms: u64,
    /// On SIGTERM, how long in-flight requests may take to finish before they are cancelled, in seconds.
    #[arg(long, default_value_t = 30)]
    pub drain_seconds: u64,
    /// Numerical faults (NaN/Inf logits) after which health turns NOT_SERVING.
    #[arg(long, default_value_t = 3)]
    pub fault_threshold: u32,
    /// Write the bound gRPC and metrics addresses as JSON to this file once listening (for tests and `up`).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Testing aid: poison the logits with NaN for every request whose prompt text contains this marker, to
    /// exercise the numerical-fault guard end to end. Never set in production.
    #[arg(long, hide = true)]
    pub fault_injection_marker: Option<String>,
    /// Compute backend: `auto` serves on the CUDA GPU when a driver and a device are present (builds with the
    /// `cuda` feature) and otherwise on the CPU, logging why; `cuda` fails start-up when the GPU cannot serve.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
}

/// Which compute backend the node serves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// A configuration error, naming the field (config path or flag) at fault.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

fn err(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { field: field.into(), message: message.into() }
}

/// Everything the node needs, validated.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub model_path: PathBuf,
    pub sha256: Option<String>,
    pub model_name: String,
    pub tier: TierSpec,
    /// The tier's calibration text and the file it was read from (None: the engine's built-in text), read
    /// before anything is loaded.
    pub calibration: Option<(PathBuf, String)>,
    /// The declared shape the checkpoint must match (from the config file).
    pub architecture: Option<quantfleet_api::model::ModelArchitecture>,
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub kv_budget_bytes: u64,
    pub max_batch: usize,
    pub max_queue: usize,
    /// Requested context limit; the model's own context caps it at load.
    pub max_context: Option<usize>,
    pub default_max_tokens: usize,
    pub request_timeout: Option<Duration>,
    pub drain: Duration,
    pub fault_threshold: u32,
    pub ready_file: Option<PathBuf>,
    pub fault_injection_marker: Option<String>,
    pub backend: BackendChoice,
}

pub const DEFAULT_KV_BUDGET_BYTES: u64 = 256 << 20;
const DEFAULT_MAX_BATCH: u32 = 32;

fn parse_enum<T: serde::de::DeserializeOwned>(field: &str, value: &str) -> Result<T, ConfigError> {
    serde_json::from_value(serde_json::Value::String(value.into()))
        .map_err(|e| err(field, format!("{value:?} is not valid: {e}")))
}

fn read_structured<T: serde::de::DeserializeOwned>(field: &str, path: &PathBuf) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| err(field, format!("cannot read {}: {e}", path.display())))?;
    // YAML is a superset of JSON; serde_yaml's error names the offending key and line.
    serde_yaml::from_str(&text).map_err(|e| err(field, format!("{}: {e}", path.display())))
}

impl NodeSettings {
    pub fn resolve(args: &NodeArgs) -> Result<Self, ConfigError> {
        let file: Option<NodeConfig> = args.config.as_ref().map(|p| read_structured("--config", p)).transpose()?;

        let (model_path, model_field) = match (&args.model, &file) {
            (Some(p), _) => (p.clone(), "--model"),
            (None, Some(c)) => {
                let uri = &c.source.uri;
                let path = uri.strip_prefix("file://").ok_or_else(|| {
                    err("source.uri", format!("{uri:?}: the node loads file:// paths (the operator rewrites others)"))
                })?;
                (PathBuf::from(path), "source.uri")
            }
            (None, None) => return Err(err("--model", "no model: pass --config FILE or --model PATH")),
        };
        // A directory is a Hugging Face checkpoint; the engine reports what is missing from it.
        if !model_path.is_file() && !model_path.join("config.json").is_file() {
            return Err(err(
                model_field,
                format!("{} is neither a readable file nor a directory with config.json", model_path.display()),
            ));
        }
        let sha256 = args.sha256.clone().or_else(|| file.as_ref().and_then(|c| c.source.sha256.clone()));
        if let Some(h) = &sha256
            && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        {
            let field = if args.sha256.is_some() { "--sha256" } else { "source.sha256" };
            return Err(err(field, format!("{h:?} is not 64 lower-case hex digits")));
        }
        let model_name = match (&args.model_name, &file) {
            (Some(n), _) => n.clone(),
            (None, Some(c)) => c.model_name.clone(),
            (None, None) => model_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        if model_name.is_empty() || model_name.len() > 253 {
            return Err(err("modelName", "must be 1..=253 characters"));
        }

        let tier = if let Some(p) = &args.tier_spec {
            read_structured::<TierSpec>("--tier-spec", p)?
        } else if let Some(name) = &args.tier {
            let mut tier = match &file {
                Some(c) if args.weights.is_none() && c.tier.name == *name => c.tier.clone(),
                _ => {
                    let weights = args.weights.as_deref().ok_or_else(|| {
                        err("--weights", format!("tier {name:?} given by flags needs --weights FORMAT"))
                    })?;
                    TierSpec {
                        name: name.clone(),
                        weights: WeightSpec::of(parse_enum("--weights", weights)?),
                        activations: Default::default(),
                        kv_cache: KvCacheSpec::default(),
                        layer_overrides: vec![],
                        replicas: 1,
                        calibration: None,
                    }
                }
            };
            if let Some(d) = &args.kv_cache_dtype {
                tier.kv_cache.dtype = parse_enum("--kv-cache-dtype", d)?;
            }
            tier
        } else if let Some(c) = &file {
            c.tier.clone()
        } else {
            return Err(err("--tier", "no tier: pass --config, --tier-spec FILE, or --tier NAME --weights FORMAT"));
        };
        if !quantfleet_api::validate::is_dns_label(&tier.name, 30) {
            return Err(err(
                "tier.name",
                format!("{:?} must be 1-30 of [a-z0-9-], not starting or ending with '-'", tier.name),
            ));
        }

        let calibration = resolve_calibration(args, file.as_ref(), &tier)?;
        quantfleet_engine::cpu::isa_cap().map_err(|e| err(quantfleet_engine::cpu::ISA_ENV, e))?;

        let ip: std::net::IpAddr =
            args.host.parse().map_err(|e| err("--host", format!("{:?} is not an IP address: {e}", args.host)))?;
        let kv_budget_bytes = args
            .kv_budget_bytes
            .or_else(|| file.as_ref().and_then(|c| c.kv_budget_bytes))
            .unwrap_or(DEFAULT_KV_BUDGET_BYTES);
        if kv_budget_bytes < (1 << 20) {
            let field = if args.kv_budget_bytes.is_some() { "--kv-budget-bytes" } else { "kvBudgetBytes" };
            return Err(err(field, format!("{kv_budget_bytes} bytes is below the 1 MiB minimum")));
        }
        let max_batch = match (args.max_batch, &file) {
            (Some(b), _) => b,
            (None, Some(c)) => u32::try_from(c.serving.max_concurrency)
                .map_err(|_| err("serving.maxConcurrency", "must be positive"))?,
            (None, None) => DEFAULT_MAX_BATCH,
        };
        if !(1..=1024).contains(&max_batch) {
            let field = if args.max_batch.is_some() { "--max-batch" } else { "serving.maxConcurrency" };
            return Err(err(field, format!("{max_batch} is not in 1..=1024")));
        }
        if !(1..=100_000).contains(&args.max_queue) {
            return Err(err("--max-queue", format!("{} is not in 1..=100000", args.max_queue)));
        }
        let max_context = match (args.max_context, &file) {
            (Some(c), _) => Some(c as usize),
            (None, Some(c)) => Some(
                usize::try_from(c.serving.max_context_tokens)
                    .map_err(|_| err("serving.maxContextTokens", "must be positive"))?,
            ),
            (None, None) => None,
        };
        if max_context == Some(0) {
            let field = if args.max_context.is_some() { "--max-context" } else { "serving.maxContextTokens" };
            return Err(err(field, "must be positive"));
        }
        if args.default_max_tokens == 0 {
            return Err(err("--default-max-tokens", "must be positive"));
        }
        Ok(Self {
            model_path,
            sha256,
            model_name,
            tier,
            calibration,
            architecture: file.as_ref().map(|c| c.architecture.clone()),
            grpc_addr: SocketAddr::new(ip, args.port),
            metrics_addr: SocketAddr::new(ip, args.metrics_port),
            kv_budget_bytes,
            max_batch: max_batch as usize,
            max_queue: args.max_queue as usize,
            max_context,
            default_max_tokens: args.default_max_tokens as usize,
            request_timeout: (args.request_timeout_ms > 0).then(|| Duration::from_millis(args.request_timeout_ms)),
            drain: Duration::from_secs(args.drain_seconds),
            fault_threshold: args.fault_threshold.max(1),
            ready_file: args.ready_file.clone(),
            fault_injection_marker: args.fault_injection_marker.clone().filter(|m| !m.is_empty()),
            backend: args.backend,
        })
    }
}

/// The calibration text the tier is quantized with: `--calibration-file`, else the config's calibrationFile
/// (where the operator mounts a `configmap/NAME` dataset), else None for the built-in text. A tier that does
/// not calibrate reads nothing; one whose dataset names a ConfigMap never falls back to the built-in text.
fn resolve_calibration(
    args: &NodeArgs,
    file: Option<&NodeConfig>,
    tier: &TierSpec,
) -> Result<Option<(PathBuf, String)>, ConfigError> {
    if !tier.needs_calibration() {
        return Ok(None);
    }
    // The config's file belongs to the config's tier (not to one given by --tier-spec or --weights instead).
    let config_file = file
        .filter(|c| c.tier.name == tier.name && c.tier.calibration == tier.calibration)
        .and_then(|c| c.calibration_file.as_ref());
    let (path, field) = match (&args.calibration_file, config_file) {
        (Some(p), _) => (p.clone(), "--calibration-file"),
        (None, Some(p)) => (PathBuf::from(p), "calibrationFile"),
        (None, None) => match tier.calibration_config_map() {
            Some(name) => {
                return Err(err(
                    "tier.calibration.dataset",
                    format!(
                        "configmap/{name}: the operator mounts that ConfigMap's calibration.txt and names it in the \
                         config's calibrationFile; outside a cluster pass --calibration-file PATH"
                    ),
                ));
            }
            None => return Ok(None),
        },
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| err(field, format!("cannot read calibration text {}: {e}", path.display())))?;
    if text.trim().is_empty() {
        return Err(err(field, format!("calibration text {} is empty", path.display())));
    }
    Ok(Some((path, text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory with a stand-in model file (resolve only checks that it is a file), a calibration
    /// text and a node config whose GPTQ tier names that text.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("qf-node-config-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.gguf"), b"stand-in").unwrap();
        std::fs::write(dir.join("calibration.txt"), "User: hi\nAssistant: hello").unwrap();
        std::fs::write(dir.join("other.txt"), "other text").unwrap();
        std::fs::write(
            dir.join("node.yaml"),
            format!(
                "modelName: m\nsource: {{uri: \"file://{0}/model.gguf\"}}\narchitecture: {{numLayers: 30, \
                 hiddenSize: 576, intermediateSize: 1536, numAttentionHeads: 9, numKeyValueHeads: 3, headDim: 64, \
                 vocabSize: 49152, maxPositionEmbeddings: 8192}}\ntier: {{name: int8-gptq, weights: {{format: int8, \
                 method: gptq}}, calibration: {{dataset: configmap/chat}}}}\nserving: {{}}\ncalibrationFile: \
                 {0}/calibration.txt\n",
                dir.display()
            ),
        )
        .unwrap();
        std::fs::write(dir.join("rtn.yaml"), "name: int8\nweights: {format: int8}\n").unwrap();
        std::fs::write(dir.join("awq.yaml"), "name: int4-awq\nweights: {format: int4, method: awq}\n").unwrap();
        dir
    }

    fn resolve(dir: &std::path::Path, extra: impl FnOnce(&mut NodeArgs)) -> Result<NodeSettings, ConfigError> {
        let mut args = NodeArgs {
            config: Some(dir.join("node.yaml")),
            host: "127.0.0.1".into(),
            max_queue: 64,
            default_max_tokens: 256,
            drain_seconds: 30,
            fault_threshold: 3,
            ..NodeArgs::default()
        };
        extra(&mut args);
        NodeSettings::resolve(&args)
    }

    #[test]
    fn calibration_text_comes_from_the_flag_then_the_configs_file_for_its_own_tier() {
        let dir = scratch("calibration");
        let text = |s: &NodeSettings| s.calibration.as_ref().map(|(p, t)| (p.clone(), t.clone()));
        // The operator's config: its tier calibrates on the mounted file.
        let s = resolve(&dir, |_| {}).unwrap();
        assert_eq!(text(&s), Some((dir.join("calibration.txt"), "User: hi\nAssistant: hello".into())));
        // --calibration-file replaces it.
        let s = resolve(&dir, |a| a.calibration_file = Some(dir.join("other.txt"))).unwrap();
        assert_eq!(text(&s), Some((dir.join("other.txt"), "other text".into())));
        // Another tier (its built-in dataset) does not inherit the config tier's file, and a tier that does not
        // calibrate reads nothing.
        let s = resolve(&dir, |a| a.tier_spec = Some(dir.join("awq.yaml"))).unwrap();
        assert_eq!(text(&s), None);
        let s = resolve(&dir, |a| {
            a.tier_spec = Some(dir.join("rtn.yaml"));
            a.calibration_file = Some(dir.join("missing.txt"));
        })
        .unwrap();
        assert_eq!(text(&s), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

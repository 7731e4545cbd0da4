//! The static configuration source (`quantfleet router --config FILE`): the PrecisionPolicy in the CRD's
//! shape (inline or a file beside the config), the node endpoints of every tier, and the router's limits.
//! In a cluster the same policy comes from the API server and the endpoints from EndpointSlices.
//!
//! ```yaml
//! listen: 127.0.0.1:8080
//! policyFile: smollm2-135m.precisionpolicy.yaml   # or `policy:` with the object inline
//! endpoints:                                       # every tier the policy names, host:port of its nodes
//!   bf16: [127.0.0.1:50051]
//!   fp8: [127.0.0.1:50052, 127.0.0.1:50053]
//! tokenizer: /path/to/model.gguf                   # optional: exact prompt token counts
//! limits: {defaultMaxTokens: 256, maxTokens: 8192, maxPromptBytes: 1048576, maxContextTokens: 8192}
//! shadow: {maxInFlight: 4, topK: 8, seed: 1234}
//! ```
//!
//! A policy's `status` is honoured when present: `status.effectiveRoutes` verbatim, or else the routes the
//! operator would derive from `status.canary` (so a local file can run a canary at a fixed phase and live
//! percent).

use crate::classify::Classifier;
use quantfleet_api::routes::effective_routes;
use quantfleet_api::{EffectiveRoute, PrecisionPolicy, TaskClass};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Parse(String, serde_yaml::Error),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), message: message.into() }
}

#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "default_default_max_tokens")]
    pub default_max_tokens: u32,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    #[serde(default = "default_max_prompt_bytes")]
    pub max_prompt_bytes: usize,
    /// Prompt plus max_tokens must fit this (checked when the router counts tokens exactly).
    #[serde(default)]
    pub max_context_tokens: Option<u32>,
}

fn default_default_max_tokens() -> u32 {
    256
}
fn default_max_tokens() -> u32 {
    8192
}
fn default_max_prompt_bytes() -> usize {
    1 << 20
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            default_max_tokens: default_default_max_tokens(),
            max_tokens: default_max_tokens(),
            max_prompt_bytes: default_max_prompt_bytes(),
            max_context_tokens: None,
        }
    }
}

#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShadowConfig {
    /// Mirrors in flight per candidate tier; a mirror that finds them all busy is dropped and counted.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Alternatives per position compared for the KL estimate.
    #[serde(default = "default_top_k")]
    pub top_k: u32,
    /// The fixed seed of the candidate's deterministic (temperature 0) generation.
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_max_in_flight() -> usize {
    4
}
fn default_top_k() -> u32 {
    8
}
fn default_seed() -> u64 {
    0x5eed
}

impl Default for ShadowConfig {
    fn default() -> Self {
        ShadowConfig { max_in_flight: default_max_in_flight(), top_k: default_top_k(), seed: default_seed() }
    }
}

#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouterConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default)]
    pub policy: Option<PrecisionPolicy>,
    #[serde(default)]
    pub policy_file: Option<PathBuf>,
    /// Node endpoints per tier (the static source; the Kubernetes source fills them from EndpointSlices).
    #[serde(default)]
    pub endpoints: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub shadow: ShadowConfig,
    /// How often every endpoint's gRPC health is checked.
    #[serde(default = "default_health_interval_ms")]
    pub health_interval_ms: u64,
    /// Largest request body accepted.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_owned()
}
fn default_health_interval_ms() -> u64 {
    1000
}
fn default_max_body_bytes() -> usize {
    4 << 20
}

/// The policy as the router applies it.
#[derive(Clone, Debug)]
pub struct RoutingTable {
    pub namespace: String,
    pub policy_name: String,
    /// The served model id (the policy's modelRef).
    pub model: String,
    pub classifier: Classifier,
    pub routes: BTreeMap<TaskClass, EffectiveRoute>,
    pub default_tier: String,
}

impl RoutingTable {
    pub fn from_policy(policy: &PrecisionPolicy) -> Self {
        let status = policy.status.as_ref();
        let routes = match status.filter(|s| !s.effective_routes.is_empty()) {
            Some(s) => s.effective_routes.clone(),
            None => effective_routes(&policy.spec, status.and_then(|s| s.canary.as_ref())),
        };
        let mut by_class: BTreeMap<TaskClass, EffectiveRoute> = routes.into_iter().map(|r| (r.task_class, r)).collect();
        // A status listing only some classes: the rest route by spec.
        for r in effective_routes(&policy.spec, None) {
            by_class.entry(r.task_class).or_insert(r);
        }
        RoutingTable {
            namespace: policy.metadata.namespace.clone().unwrap_or_else(|| "default".to_owned()),
            policy_name: policy.metadata.name.clone().unwrap_or_default(),
            model: policy.spec.model_ref.name.clone(),
            classifier: Classifier::new(&policy.spec.classifier),
            routes: by_class,
            default_tier: policy.spec.default_tier.clone(),
        }
    }

    pub fn route(&self, class: TaskClass) -> &EffectiveRoute {
        self.routes.get(&class).expect("every class has a route")
    }

    /// Every tier the table may send traffic to.
    pub fn tiers(&self) -> Vec<String> {
        let mut tiers: Vec<String> = self
            .routes
            .values()
            .flat_map(|r| std::iter::once(&r.tier).chain(&r.fallbacks).chain(r.candidate_tier.as_ref()))
            .chain([&self.default_tier])
            .cloned()
            .collect();
        tiers.sort();
        tiers.dedup();
        tiers
    }
}

/// A loaded, checked configuration.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub config: RouterConfig,
    pub policy: PrecisionPolicy,
    pub table: RoutingTable,
}

impl RouterConfig {
    pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        let mut config: RouterConfig =
            serde_yaml::from_str(&text).map_err(|e| ConfigError::Parse(path.display().to_string(), e))?;
        if let Some(rel) = &config.policy_file {
            let policy_path = path.parent().unwrap_or(Path::new(".")).join(rel);
            let text = std::fs::read_to_string(&policy_path).map_err(|e| ConfigError::Read(policy_path.clone(), e))?;
            let policy =
                serde_yaml::from_str(&text).map_err(|e| ConfigError::Parse(policy_path.display().to_string(), e))?;
            if config.policy.is_some() {
                return Err(invalid("policyFile", "set either policy or policyFile, not both"));
            }
            config.policy = Some(policy);
        }
        config.check()
    }

    /// The settings file of the Kubernetes source (`quantfleet router --kubernetes [--config FILE]`): listen
    /// address, limits, shadow and health settings, tokenizer. The policy and the endpoints come from the API
    /// server, so the file must not give them. Without a file: the defaults.
    pub fn load_settings(path: Option<&Path>) -> Result<RouterConfig, ConfigError> {
        let config: RouterConfig = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
                serde_yaml::from_str(&text).map_err(|e| ConfigError::Parse(path.display().to_string(), e))?
            }
            None => serde_yaml::from_str("{}").map_err(|e| ConfigError::Parse("the default settings".into(), e))?,
        };
        Self::load_settings_from(config)
    }

    /// Checks settings given as a value (see [`RouterConfig::load_settings`]).
    pub fn load_settings_from(config: RouterConfig) -> Result<RouterConfig, ConfigError> {
        for (field, set) in [
            ("policy", config.policy.is_some()),
            ("policyFile", config.policy_file.is_some()),
            ("endpoints", !config.endpoints.is_empty()),
        ] {
            if set {
                return Err(invalid(
                    field,
                    "comes from the Kubernetes API with --kubernetes (the PrecisionPolicy and its EndpointSlices); remove it",
                ));
            }
        }
        config.check_settings()?;
        Ok(config)
    }

    /// Checks the settings every source shares: limits, shadow, listen address.
    fn check_settings(&self) -> Result<(), ConfigError> {
        if self.limits.default_max_tokens == 0 || self.limits.default_max_tokens > self.limits.max_tokens {
            return Err(invalid("limits.defaultMaxTokens", "must be between 1 and limits.maxTokens"));
        }
        if self.shadow.top_k == 0 || self.shadow.top_k > 64 {
            return Err(invalid("shadow.topK", "must be between 1 and 64"));
        }
        if self.shadow.max_in_flight == 0 {
            return Err(invalid("shadow.maxInFlight", "must be at least 1"));
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid("listen", format!("{:?} is not an address:port", self.listen)));
        }
        Ok(())
    }

    /// Checks the configuration: a policy, an endpoint list for every tier the policy names, sane limits.
    pub fn check(self) -> Result<Loaded, ConfigError> {
        let policy = self.policy.clone().ok_or_else(|| invalid("policy", "a policy (or policyFile) is required"))?;
        if policy.metadata.name.as_deref().is_none_or(str::is_empty) {
            return Err(invalid("policy.metadata.name", "the policy needs a name (it labels the canary stats)"));
        }
        let table = RoutingTable::from_policy(&policy);
        for tier in table.tiers() {
            if !self.endpoints.contains_key(&tier) {
                return Err(invalid(
                    format!("endpoints.{tier}"),
                    format!(
                        "the policy routes to tier {tier:?} but endpoints does not list it (an empty list is allowed)"
                    ),
                ));
            }
        }
        for (tier, eps) in &self.endpoints {
            for (i, ep) in eps.iter().enumerate() {
                let ok =
                    ep.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
                if !ok {
                    return Err(invalid(format!("endpoints.{tier}[{i}]"), format!("{ep:?} is not host:port")));
                }
            }
        }
        self.check_settings()?;
        Ok(Loaded { config: self, policy, table })
    }

    pub fn health_interval(&self) -> Duration {
        Duration::from_millis(self.health_interval_ms.max(50))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quantfleet_api::{CanaryPhase, CanaryStatus, PrecisionPolicyStatus};

    const SAMPLE: &str = include_str!("../../../deploy/samples/smollm2-135m.precisionpolicy.yaml");

    fn config(endpoints: &str) -> RouterConfig {
        let mut c: RouterConfig = serde_yaml::from_str(&format!("endpoints: {endpoints}")).unwrap();
        c.policy = Some(serde_yaml::from_str(SAMPLE).unwrap());
        c
    }

    const ALL: &str =
        "{bf16: ['127.0.0.1:1'], fp8: ['127.0.0.1:2'], fp8-kv8: [], int4-awq: ['127.0.0.1:3', 'localhost:4']}";

    #[test]
    fn the_sample_policy_loads_and_routes_by_spec() {
        let loaded = config(ALL).check().unwrap();
        let t = &loaded.table;
        assert_eq!(
            (t.model.as_str(), t.policy_name.as_str(), t.namespace.as_str()),
            ("smollm2-135m", "smollm2-135m", "default")
        );
        assert_eq!(t.route(TaskClass::Code).tier, "fp8");
        assert_eq!(t.route(TaskClass::Code).candidate_tier, None, "no status: the canary is Pending");
        assert_eq!(t.tiers(), ["bf16", "fp8", "fp8-kv8", "int4-awq"]);
    }

    #[test]
    fn a_status_canary_phase_is_applied() {
        let mut c = config(ALL);
        c.policy.as_mut().unwrap().status = Some(PrecisionPolicyStatus {
            canary: Some(CanaryStatus {
                phase: CanaryPhase::Stepping,
                candidate_tier: "int4-awq".into(),
                live_percent: 50,
                ..Default::default()
            }),
            ..Default::default()
        });
        let loaded = c.check().unwrap();
        let code = loaded.table.route(TaskClass::Code);
        assert_eq!(
            (code.candidate_tier.as_deref(), code.shadow_percent, code.candidate_live_percent),
            (Some("int4-awq"), 10.0, 50)
        );
    }

    #[test]
    fn errors_name_the_field() {
        let err = config("{bf16: ['127.0.0.1:1'], fp8: []}").check().unwrap_err().to_string();
        assert!(err.starts_with("endpoints.fp8-kv8:") || err.starts_with("endpoints.int4-awq:"), "{err}");
        let err = config("{bf16: ['nope'], fp8: [], fp8-kv8: [], int4-awq: []}").check().unwrap_err().to_string();
        assert!(err.starts_with("endpoints.bf16[0]:"), "{err}");
        let mut c = config(ALL);
        c.shadow.top_k = 0;
        assert!(c.check().unwrap_err().to_string().starts_with("shadow.topK"));
        assert!(serde_yaml::from_str::<RouterConfig>("endpoints: {}\nbogus: 1").is_err(), "unknown fields are refused");
    }

    #[test]
    fn the_kubernetes_settings_file_refuses_what_the_api_provides() {
        let defaults = RouterConfig::load_settings(None).unwrap();
        assert_eq!((defaults.listen.as_str(), defaults.shadow.top_k), ("127.0.0.1:8080", 8));
        let dir = std::env::temp_dir().join(format!("qf-router-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, body: &str| {
            let path = dir.join(name);
            std::fs::write(&path, body).unwrap();
            path
        };
        let ok = file("ok.yaml", "listen: 0.0.0.0:9000\nlimits: {maxTokens: 512, defaultMaxTokens: 64}\n");
        let settings = RouterConfig::load_settings(Some(&ok)).unwrap();
        assert_eq!((settings.listen.as_str(), settings.limits.max_tokens), ("0.0.0.0:9000", 512));
        let with_endpoints = file("eps.yaml", "endpoints: {fp8: ['10.0.0.1:50051']}\n");
        let err = RouterConfig::load_settings(Some(&with_endpoints)).unwrap_err().to_string();
        assert!(err.starts_with("endpoints: comes from the Kubernetes API"), "{err}");
        let with_policy = file("policy.yaml", "policyFile: p.yaml\n");
        assert!(RouterConfig::load_settings(Some(&with_policy)).unwrap_err().to_string().starts_with("policyFile:"));
        let bad = file("bad.yaml", "shadow: {topK: 0}\n");
        assert!(RouterConfig::load_settings(Some(&bad)).unwrap_err().to_string().starts_with("shadow.topK"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

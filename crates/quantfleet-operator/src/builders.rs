//! The objects one tier of a QuantizedModel becomes, built as plain data (no client): a ConfigMap with the
//! node configuration, a Deployment of `quantfleet node` pods on the declared GPU product, and a Service.
//! Every object carries a controller ownerReference to the model, so deleting the model garbage-collects them.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    GRPCAction, KeyToPath, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use quantfleet_api::model::{ModelSource, QuantizedModel, TierSpec};
use quantfleet_api::node::{
    CALIBRATION_DIR, CALIBRATION_KEY, NODE_CONFIG_DIR, NODE_CONFIG_KEY, NODE_GRPC_PORT, NODE_METRICS_PORT, NodeConfig,
};
use quantfleet_api::plan::TierPlan;
use std::collections::BTreeMap;

/// The field manager every server-side apply of the operator uses.
pub const FIELD_MANAGER: &str = "quantfleet-operator";
/// Labels naming the QuantizedModel and the tier an object serves (the router selects EndpointSlices by them).
pub use quantfleet_api::node::{MODEL_LABEL, TIER_LABEL};
/// Pod-template annotation with a hash of the node configuration: a changed tier spec rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "quantfleet.io/config-hash";
/// Pod-template annotation with a hash of the tier's calibration text (`calibration.dataset: configmap/NAME`):
/// the node quantizes at start, so edited calibration text rolls the pods.
pub const CALIBRATION_HASH_ANNOTATION: &str = "quantfleet.io/calibration-hash";
/// GPU extended resource and product label (NVIDIA device plugin and GPU feature discovery).
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
pub const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
/// Where model volumes (PVCs, downloads) are mounted in node pods.
pub const MODELS_DIR: &str = "/models";
/// Unprivileged user the node runs as (the distroless "nonroot" user).
pub const NODE_UID: i64 = 65532;

/// Operator-wide settings the builders need.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Image with the `quantfleet` binary, for node pods and their init containers.
    pub node_image: String,
}

/// Why a tier's objects cannot be built.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BuildError {
    #[error("the QuantizedModel has no {0} (it must come from the API server)")]
    MissingMetadata(&'static str),
    #[error("source.uri {0:?} is not file://, pvc://CLAIM/PATH or https://")]
    UnsupportedSource(String),
    #[error("serializing the node configuration: {0}")]
    Config(String),
    #[error("tier {tier}: calibration.dataset names ConfigMap {config_map}, whose text was not read")]
    CalibrationNotRead { tier: String, config_map: String },
}

/// The objects of one tier.
#[derive(Clone, Debug, PartialEq)]
pub struct TierObjects {
    pub config_map: ConfigMap,
    pub deployment: Deployment,
    pub service: Service,
}

/// `<model>-<tier>`: the name of every object of a tier (CEL keeps it within 63 characters).
pub fn tier_object_name(model: &str, tier: &str) -> String {
    format!("{model}-{tier}")
}

/// Labels of a tier's objects; the first three also select its pods.
pub fn tier_labels(model: &str, tier: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), quantfleet_api::node::NODE_APP_NAME.to_owned()),
        (MODEL_LABEL.to_owned(), model.to_owned()),
        (TIER_LABEL.to_owned(), tier.to_owned()),
        ("app.kubernetes.io/managed-by".to_owned(), FIELD_MANAGER.to_owned()),
    ])
}

fn selector_labels(model: &str, tier: &str) -> BTreeMap<String, String> {
    let mut labels = tier_labels(model, tier);
    labels.remove("app.kubernetes.io/managed-by");
    labels
}

/// How the pod gets at the checkpoint: extra volume, init container, and the URI the node then reads.
struct SourcePlan {
    node_uri: String,
    volume: Option<Volume>,
    mount: Option<VolumeMount>,
    init: Option<Container>,
}

fn plan_source(source: &ModelSource, settings: &Settings) -> Result<SourcePlan, BuildError> {
    let uri = &source.uri;
    if uri.starts_with("file://") {
        return Ok(SourcePlan { node_uri: uri.clone(), volume: None, mount: None, init: None });
    }
    let mount = |read_only| VolumeMount {
        name: "model".into(),
        mount_path: MODELS_DIR.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    };
    if let Some(rest) = uri.strip_prefix("pvc://") {
        let (claim, path) = rest
            .split_once('/')
            .filter(|(c, p)| !c.is_empty() && !p.is_empty())
            .ok_or_else(|| BuildError::UnsupportedSource(uri.clone()))?;
        return Ok(SourcePlan {
            node_uri: format!("file://{MODELS_DIR}/{path}"),
            volume: Some(Volume {
                name: "model".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.into(),
                    read_only: Some(true),
                }),
                ..Volume::default()
            }),
            mount: Some(mount(true)),
            init: None,
        });
    }
    if uri.starts_with("https://") || uri.starts_with("http://") {
        let file = uri.rsplit('/').next().filter(|f| !f.is_empty()).unwrap_or("model");
        let target = format!("{MODELS_DIR}/{file}");
        let mut args = vec!["fetch".into(), "--uri".into(), uri.clone(), "--out".into(), target.clone()];
        if let Some(sha) = &source.sha256 {
            args.extend(["--sha256".into(), sha.clone()]);
        }
        return Ok(SourcePlan {
            node_uri: format!("file://{target}"),
            volume: Some(Volume {
                name: "model".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            }),
            mount: Some(mount(true)),
            init: Some(Container {
                name: "fetch-model".into(),
                image: Some(settings.node_image.clone()),
                args: Some(args),
                volume_mounts: Some(vec![mount(false)]),
                security_context: Some(container_security()),
                ..Container::default()
            }),
        });
    }
    Err(BuildError::UnsupportedSource(uri.clone()))
}

fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
        ..SecurityContext::default()
    }
}

/// 64-bit FNV-1a: a hash that is stable across Rust releases, so upgrading the operator does not roll pods.
fn stable_hash(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{hash:016x}")
}

fn grpc_probe(period: i32, failures: i32) -> Probe {
    Probe {
        grpc: Some(GRPCAction { port: i32::from(NODE_GRPC_PORT), service: None }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// Builds the ConfigMap, Deployment and Service of `tier` from its plan. `calibration` is the text of the
/// tier's calibration ConfigMap ([`TierSpec::calibration_config_map`]), as the caller read it; the pods mount
/// that ConfigMap and carry a hash of the text, so an edit rolls them.
pub fn build_tier(
    model: &QuantizedModel,
    tier: &TierSpec,
    plan: &TierPlan,
    calibration: Option<&str>,
    settings: &Settings,
) -> Result<TierObjects, BuildError> {
    let model_name = model.metadata.name.as_deref().ok_or(BuildError::MissingMetadata("metadata.name"))?;
    let namespace = model.metadata.namespace.clone().ok_or(BuildError::MissingMetadata("metadata.namespace"))?;
    let uid = model.metadata.uid.clone().ok_or(BuildError::MissingMetadata("metadata.uid"))?;
    let owner = OwnerReference {
        api_version: format!("{}/{}", quantfleet_api::GROUP, quantfleet_api::VERSION),
        kind: "QuantizedModel".into(),
        name: model_name.into(),
        uid,
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let name = tier_object_name(model_name, &tier.name);
    let labels = tier_labels(model_name, &tier.name);
    let meta = ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(namespace),
        labels: Some(labels.clone()),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    };

    let source = plan_source(&model.spec.source, settings)?;
    let calibration = match (tier.calibration_config_map(), calibration) {
        (None, _) => None,
        (Some(config_map), Some(text)) => Some((config_map, stable_hash(text.as_bytes()))),
        (Some(config_map), None) => {
            return Err(BuildError::CalibrationNotRead { tier: tier.name.clone(), config_map: config_map.into() });
        }
    };
    let config = NodeConfig {
        model_name: model_name.into(),
        source: ModelSource { uri: source.node_uri.clone(), ..model.spec.source.clone() },
        architecture: model.spec.architecture.clone(),
        // Replicas are the Deployment's business; leaving them out keeps scaling from rolling the pods.
        tier: TierSpec { replicas: 1, ..tier.clone() },
        serving: model.spec.serving.clone(),
        kv_budget_bytes: u64::try_from(plan.kv_budget_bytes).ok().filter(|&b| b > 0),
        calibration_file: calibration.as_ref().map(|_| format!("{CALIBRATION_DIR}/{CALIBRATION_KEY}")),
    };
    let config_yaml = serde_yaml::to_string(&config).map_err(|e| BuildError::Config(e.to_string()))?;
    let config_map = ConfigMap {
        metadata: meta.clone(),
        data: Some(BTreeMap::from([(NODE_CONFIG_KEY.to_owned(), config_yaml.clone())])),
        ..ConfigMap::default()
    };

    let gpus = Quantity(model.spec.accelerator.count.to_string());
    // Host memory: the node stages the checkpoint and the quantized weights in RAM before upload.
    let host_memory_mib = plan.weights.bytes.div_ceil(1 << 20) + 1024;
    let mut volume_mounts = vec![
        VolumeMount {
            name: "config".into(),
            mount_path: NODE_CONFIG_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..VolumeMount::default() },
    ];
    volume_mounts.extend(source.mount);
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource { name: name.clone(), ..ConfigMapVolumeSource::default() }),
            ..Volume::default()
        },
        Volume { name: "tmp".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Volume::default() },
    ];
    volumes.extend(source.volume);
    if let Some((config_map, _)) = &calibration {
        volume_mounts.push(VolumeMount {
            name: "calibration".into(),
            mount_path: CALIBRATION_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "calibration".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: (*config_map).into(),
                items: Some(vec![KeyToPath { key: CALIBRATION_KEY.into(), path: CALIBRATION_KEY.into(), mode: None }]),
                optional: Some(false),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
    }

    let node = Container {
        name: "node".into(),
        image: Some(settings.node_image.clone()),
        args: Some(vec!["node".into(), "--config".into(), format!("{NODE_CONFIG_DIR}/{NODE_CONFIG_KEY}")]),
        ports: Some(vec![
            ContainerPort {
                name: Some(quantfleet_api::node::NODE_GRPC_PORT_NAME.into()),
                container_port: i32::from(NODE_GRPC_PORT),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: i32::from(NODE_METRICS_PORT),
                ..ContainerPort::default()
            },
        ]),
        env: Some(vec![EnvVar { name: "RUST_LOG".into(), value: Some("info".into()), ..EnvVar::default() }]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("2".into())),
                ("memory".to_owned(), Quantity(format!("{host_memory_mib}Mi"))),
                (GPU_RESOURCE.to_owned(), gpus.clone()),
            ])),
            limits: Some(BTreeMap::from([(GPU_RESOURCE.to_owned(), gpus)])),
            ..ResourceRequirements::default()
        }),
        // Loading and quantizing at start can take minutes: the startup probe allows 10 of them.
        startup_probe: Some(grpc_probe(5, 120)),
        readiness_probe: Some(grpc_probe(5, 2)),
        liveness_probe: Some(grpc_probe(10, 3)),
        volume_mounts: Some(volume_mounts),
        security_context: Some(container_security()),
        ..Container::default()
    };

    let mut template_annotations =
        BTreeMap::from([(CONFIG_HASH_ANNOTATION.to_owned(), stable_hash(config_yaml.as_bytes()))]);
    template_annotations.insert("quantfleet.io/weight-bytes".into(), plan.weights.bytes.to_string());
    if let Some((_, hash)) = calibration {
        template_annotations.insert(CALIBRATION_HASH_ANNOTATION.into(), hash);
    }
    let pod = PodSpec {
        init_containers: source.init.map(|c| vec![c]),
        containers: vec![node],
        volumes: Some(volumes),
        affinity: Some(Affinity {
            node_affinity: Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: GPU_PRODUCT_LABEL.into(),
                            operator: "In".into(),
                            values: Some(vec![model.spec.accelerator.product.clone()]),
                        }]),
                        ..NodeSelectorTerm::default()
                    }],
                }),
                ..NodeAffinity::default()
            }),
            ..Affinity::default()
        }),
        tolerations: Some(vec![Toleration {
            key: Some(GPU_RESOURCE.into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Toleration::default()
        }]),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(NODE_UID),
            run_as_group: Some(NODE_UID),
            fs_group: Some(NODE_UID),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
            ..PodSecurityContext::default()
        }),
        // In-flight streams get this long to drain after SIGTERM.
        termination_grace_period_seconds: Some(60),
        ..PodSpec::default()
    };
    let deployment = Deployment {
        metadata: meta.clone(),
        spec: Some(DeploymentSpec {
            replicas: Some(tier.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(model_name, &tier.name)),
                ..LabelSelector::default()
            },
            // GPUs are scarce: replace pods one at a time without surging past the declared replicas.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(0)),
                    max_unavailable: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels.clone()),
                    annotations: Some(template_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    };
    let service = Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(model_name, &tier.name)),
            ports: Some(vec![
                ServicePort {
                    name: Some(quantfleet_api::node::NODE_GRPC_PORT_NAME.into()),
                    port: i32::from(NODE_GRPC_PORT),
                    target_port: Some(IntOrString::String(quantfleet_api::node::NODE_GRPC_PORT_NAME.into())),
                    app_protocol: Some("grpc".into()),
                    ..ServicePort::default()
                },
                ServicePort {
                    name: Some("metrics".into()),
                    port: i32::from(NODE_METRICS_PORT),
                    target_port: Some(IntOrString::String("metrics".into())),
                    ..ServicePort::default()
                },
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    Ok(TierObjects { config_map, deployment, service })
}

#[cfg(test)]
mod tests;

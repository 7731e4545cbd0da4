//! The contract between the operator (or `quantfleet up`) and an inference node process: the configuration
//! a node serves. The operator writes it into each tier's ConfigMap (key [`NODE_CONFIG_KEY`]) and the node
//! reads it with `quantfleet node --config FILE`, so both sides share one type.

use crate::model::{ModelArchitecture, ModelSource, ServingSpec, TierSpec};
use serde::{Deserialize, Serialize};

/// ConfigMap key (and file name in the pod) holding the node configuration.
pub const NODE_CONFIG_KEY: &str = "node.yaml";
/// Directory the tier ConfigMap is mounted at in node pods.
pub const NODE_CONFIG_DIR: &str = "/etc/quantfleet";
/// ConfigMap key holding a tier's calibration text (`calibration.dataset: configmap/NAME`).
pub const CALIBRATION_KEY: &str = "calibration.txt";
/// Directory a tier's calibration ConfigMap is mounted at in node pods (beside, not under, [`NODE_CONFIG_DIR`]:
/// a mount inside another ConfigMap volume would need a directory the kubelet cannot create there).
pub const CALIBRATION_DIR: &str = "/etc/quantfleet-calibration";
/// gRPC port of the inference service (Generate, Score, ModelInfo, grpc.health.v1).
pub const NODE_GRPC_PORT: u16 = 50051;
/// HTTP port of the node's Prometheus metrics.
pub const NODE_METRICS_PORT: u16 = 9090;
/// Name of the gRPC port on node containers and tier Services (and so in their EndpointSlices).
pub const NODE_GRPC_PORT_NAME: &str = "grpc";
/// `app.kubernetes.io/name` of every tier object (Deployment, pods, Service and the Service's EndpointSlices).
pub const NODE_APP_NAME: &str = "quantfleet-node";
/// Label naming the QuantizedModel an object belongs to (copied onto EndpointSlices from the tier Service).
pub const MODEL_LABEL: &str = "quantfleet.io/model";
/// Label naming the tier an object serves (copied onto EndpointSlices from the tier Service).
pub const TIER_LABEL: &str = "quantfleet.io/tier";

/// What one node process serves.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeConfig {
    /// The QuantizedModel's name (a metrics label and ModelInfo field).
    pub model_name: String,
    /// The checkpoint, with the URI as the node sees it (pvc:// and https:// sources are rewritten by the
    /// operator to the file:// path where the volume or the download lands).
    pub source: ModelSource,
    /// The declared shape; the node refuses a checkpoint whose shape differs.
    pub architecture: ModelArchitecture,
    /// The tier to serve (its `replicas` is always written as 1: one node serves one replica).
    pub tier: TierSpec,
    /// Serving limits (context, concurrency) the plan was made for.
    pub serving: ServingSpec,
    /// KV-cache budget in bytes, from the fit planner; None lets the node size it from free memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_budget_bytes: Option<u64>,
    /// Path of the tier's calibration text in the pod, when `tier.calibration.dataset` names a ConfigMap (the
    /// operator mounts its key [`CALIBRATION_KEY`] there). None: the node's built-in text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration_file: Option<String>,
}

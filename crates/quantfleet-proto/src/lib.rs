//! The inference node's gRPC API, package `quantfleet.inference.v1`: `Generate` (server streaming), `Score`,
//! `ModelInfo`; health is the standard `grpc.health.v1` service. The proto file is the documentation of every
//! field: proto/quantfleet/inference/v1/inference.proto.

/// Generated messages, client (`inference_client::InferenceClient`) and server
/// (`inference_server::{Inference, InferenceServer}`).
pub mod v1 {
    #![allow(clippy::doc_lazy_continuation, clippy::doc_overindented_list_items)]
    tonic::include_proto!("quantfleet.inference.v1");
}

/// The service name clients and health checks use for the inference service.
pub const INFERENCE_SERVICE_NAME: &str = "quantfleet.inference.v1.Inference";

/// Response metadata key on RESOURCE_EXHAUSTED: suggested wait before retrying, in milliseconds.
pub const RETRY_AFTER_MS_METADATA: &str = "retry-after-ms";

/// Request metadata key carrying a caller-chosen request id; the node logs it and echoes it back.
pub const REQUEST_ID_METADATA: &str = "x-request-id";

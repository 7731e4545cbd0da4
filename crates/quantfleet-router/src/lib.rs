//! Quantfleet's router: the OpenAI-compatible front door. It classifies each request into a task class
//! (chat, code, math, agent, long-context) by a PrecisionPolicy's classifier, sends it to the tier the
//! policy's effective routes name (ordered fallbacks, least-outstanding balancing over the tier's nodes,
//! retries only before the first token), steps a canary candidate into live traffic, and mirrors a share of
//! requests to the candidate off the client's path to compare it with the incumbent token by token. The
//! operator reads the comparison sums from `GET /v1/canary/stats`.
//!
//! The node API is behind [`backend::NodeClient`]; [`grpc`] implements it over the nodes' gRPC service.
//! The policy and the node endpoints come from a static file ([`config`]) or, in a cluster, from the API
//! server ([`kubernetes`]: the PrecisionPolicy and the EndpointSlices of its model's tier Services), applied
//! live.

pub mod backend;
pub mod canary;
pub mod classify;
pub mod compare;
pub mod config;
pub mod error;
pub mod grpc;
pub mod kubernetes;
pub mod metrics;
pub mod openai;
pub mod pool;
pub mod server;
pub mod structured;

#[cfg(test)]
mod fake;

pub use config::{Loaded, RouterConfig, RoutingTable};
pub use server::Router;

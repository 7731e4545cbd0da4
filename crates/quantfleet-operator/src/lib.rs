//! Quantfleet's operator. Reconcile is a pipeline: read -> validate -> build desired objects (pure) -> apply
//! -> compute status. The pure parts live in their own modules and are tested without a cluster:
//! [`canary`] (the canary state machine), [`routes`] (what the router obeys) and [`builders`] (the objects a
//! QuantizedModel's tiers become).

pub mod builders;
pub mod canary;
pub mod controller;
pub mod lease;
pub mod metrics;
pub mod routes;
pub mod stats_source;
pub mod status;

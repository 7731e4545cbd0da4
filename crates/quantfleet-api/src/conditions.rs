//! Status conditions: the fixed condition types and reasons Quantfleet writes, and the rule for updating a
//! condition list (keep `lastTransitionTime` while a condition's status does not change).
//!
//! Types and reasons are constants so that dashboards, alerts and tests can rely on them; only `message`
//! carries free text.

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types of a QuantizedModel.
pub mod model {
    /// Every tier that fits is deployed and has all replicas serving.
    pub const READY: &str = "Ready";
    /// Some tier is rolling out or loading.
    pub const PROGRESSING: &str = "Progressing";
    /// Some tier has fewer serving replicas than desired after it was ready, or reports numerical faults.
    pub const DEGRADED: &str = "Degraded";
    /// Every tier's weights, KV cache and activations fit its accelerator at the declared serving limits, and
    /// the accelerator can run its precision.
    pub const FITS_ACCELERATOR: &str = "FitsAccelerator";
    /// The nodes report serving exactly the declared precision of their tier.
    pub const QUANTIZATION_VERIFIED: &str = "QuantizationVerified";
}

/// Condition types of a PrecisionPolicy.
pub mod policy {
    /// The model exists and every tier the policy names is declared by it.
    pub const READY: &str = "Ready";
    /// No canary gate has failed.
    pub const CANARY_HEALTHY: &str = "CanaryHealthy";
}

/// Reasons: CamelCase, fixed, usable as metric labels.
pub mod reason {
    pub const ALL_TIERS_FIT: &str = "AllTiersFit";
    pub const TIER_DOES_NOT_FIT: &str = "TierDoesNotFit";
    /// A tier's `calibration.dataset` names a ConfigMap that is missing, lacks key `calibration.txt`, or is empty.
    pub const CALIBRATION_DATA_MISSING: &str = "CalibrationDataMissing";
    pub const UNSUPPORTED_PRECISION: &str = "UnsupportedPrecision";
    pub const UNKNOWN_ACCELERATOR: &str = "UnknownAccelerator";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const ROLLING_OUT: &str = "RollingOut";
    pub const ALL_REPLICAS_SERVING: &str = "AllReplicasServing";
    pub const REPLICAS_UNAVAILABLE: &str = "ReplicasUnavailable";
    pub const ALL_TIERS_VERIFIED: &str = "AllTiersVerified";
    pub const PRECISION_MISMATCH: &str = "PrecisionMismatch";
    pub const AWAITING_NODES: &str = "AwaitingNodes";
    pub const MODEL_NOT_FOUND: &str = "ModelNotFound";
    pub const UNKNOWN_TIER: &str = "UnknownTier";
    pub const ROUTES_RESOLVED: &str = "RoutesResolved";
    pub const GATES_PASSING: &str = "GatesPassing";
    pub const GATE_FAILED: &str = "GateFailed";
}

/// Condition status values.
pub mod status {
    pub const TRUE: &str = "True";
    pub const FALSE: &str = "False";
    pub const UNKNOWN: &str = "Unknown";
}

/// A True/False condition observed at `now` for `generation`.
pub fn boolean(type_: &str, ok: bool, reason: &str, message: String, generation: Option<i64>, now: &Time) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { status::TRUE } else { status::FALSE }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// Inserts or replaces the condition of `new.type_`. When the status is unchanged the existing
/// `lastTransitionTime` is kept, so a steady state produces identical status (and no writes).
/// Returns true when anything changed.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            if existing.status == new.status {
                new.last_transition_time = existing.last_transition_time.clone();
            }
            let changed = *existing != new;
            *existing = new;
            changed
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(type_: &str, status: &str, reason: &str, at: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: Time(at.parse().unwrap()),
        }
    }

    #[test]
    fn unchanged_status_keeps_transition_time() {
        let mut list = vec![cond("Ready", "True", "A", "2026-01-01T00:00:00Z")];
        let changed = set_condition(&mut list, cond("Ready", "True", "A", "2026-06-01T00:00:00Z"));
        assert!(!changed, "same status and reason must not count as a change");
        assert_eq!(list[0].last_transition_time, Time("2026-01-01T00:00:00Z".parse().unwrap()));
    }

    #[test]
    fn changed_status_moves_transition_time() {
        let mut list = vec![cond("Ready", "True", "A", "2026-01-01T00:00:00Z")];
        assert!(set_condition(&mut list, cond("Ready", "False", "B", "2026-06-01T00:00:00Z")));
        assert_eq!(list[0].last_transition_time, Time("2026-06-01T00:00:00Z".parse().unwrap()));
        assert_eq!(list[0].reason, "B");
    }

    #[test]
    fn reason_change_without_status_change_is_a_change_but_keeps_time() {
        let mut list = vec![cond("Ready", "False", "A", "2026-01-01T00:00:00Z")];
        assert!(set_condition(&mut list, cond("Ready", "False", "B", "2026-06-01T00:00:00Z")));
        assert_eq!(list[0].last_transition_time, Time("2026-01-01T00:00:00Z".parse().unwrap()));
    }

    #[test]
    fn new_types_are_appended() {
        let mut list = vec![];
        assert!(set_condition(&mut list, cond("Ready", "True", "A", "2026-01-01T00:00:00Z")));
        assert!(set_condition(&mut list, cond("Degraded", "False", "A", "2026-01-01T00:00:00Z")));
        assert_eq!(list.len(), 2);
        assert!(find(&list, "Degraded").is_some());
    }
}

//! Validation outside the API server.
//!
//! - [`policy_against_model`]: what CEL cannot check because it spans two objects: every tier a
//!   PrecisionPolicy names must be declared by its QuantizedModel. The operator reports these as
//!   `Ready=False, reason UnknownTier`; the CLI refuses to plan them.
//! - [`cel_violations`] (feature `cel`): evaluates the CRDs' own CEL rules client-side, so the CLI rejects a
//!   file exactly as `kubectl apply` would, from one source of truth (the rules in the Rust types).
//! - [`is_dns_label`]: the RFC 1123 label rule of Kubernetes names, for values given outside an object
//!   (command-line flags, node configuration).

use crate::model::QuantizedModelSpec;
use crate::policy::PrecisionPolicySpec;

/// Whether `s` is an RFC 1123 label of at most `max_len` bytes, as Kubernetes requires of namespace names (63)
/// and as tier names are (30, the CRD's `^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`): lower-case letters, digits and
/// '-', not empty, alphanumeric at both ends.
pub fn is_dns_label(s: &str, max_len: usize) -> bool {
    !s.is_empty()
        && s.len() <= max_len
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Every tier name `policy` uses that `model` does not declare, as messages naming the field.
pub fn policy_against_model(policy: &PrecisionPolicySpec, model: &QuantizedModelSpec) -> Vec<String> {
    let declared = |tier: &str| model.tiers.iter().any(|t| t.name == tier);
    let tier_list = || model.tiers.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ");
    let mut problems = Vec::new();
    let mut check = |field: String, tier: &str| {
        if !declared(tier) {
            problems.push(format!("{field}: tier {tier:?} is not declared by the model (its tiers: {})", tier_list()));
        }
    };
    check("spec.defaultTier".into(), &policy.default_tier);
    for (i, route) in policy.routes.iter().enumerate() {
        check(format!("spec.routes[{i}].tier"), &route.tier);
        for (j, fallback) in route.fallbacks.iter().enumerate() {
            check(format!("spec.routes[{i}].fallbacks[{j}]"), fallback);
        }
    }
    if let Some(canary) = &policy.canary {
        check("spec.canary.candidateTier".into(), &canary.candidate_tier);
    }
    problems
}

/// A failed CEL rule: the field it is attached to and its message.
#[cfg(feature = "cel")]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub message: String,
}

#[cfg(feature = "cel")]
impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Evaluates `K`'s CRD CEL rules against `object` (and `old`, for transition rules such as immutability).
/// Defaults from the schema are applied first, as the API server does.
#[cfg(feature = "cel")]
pub fn cel_violations<K>(object: &K, old: Option<&K>) -> Result<Vec<Violation>, serde_json::Error>
where
    K: kube::CustomResourceExt + serde::Serialize,
{
    let crd = K::crd();
    let Some(schema) =
        crd.spec.versions.first().and_then(|v| v.schema.as_ref()).and_then(|s| s.open_api_v3_schema.as_ref())
    else {
        return Ok(Vec::new());
    };
    let schema = serde_json::to_value(schema)?;
    let object = serde_json::to_value(object)?;
    let old = old.map(serde_json::to_value).transpose()?;
    Ok(match kube_cel::validate(&schema, &object, old.as_ref()) {
        Ok(()) => Vec::new(),
        Err(errors) => {
            errors.iter().map(|e| Violation { field: e.field_path.clone(), message: e.message.clone() }).collect()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels_are_lower_case_alphanumerics_and_inner_dashes() {
        for ok in ["a", "ns1", "team-a", "a-b-c", "0"] {
            assert!(is_dns_label(ok, 63), "{ok:?}");
        }
        assert!(is_dns_label(&"x".repeat(63), 63));
        for bad in ["", "Team", "-a", "a-", "a_b", "a.b", "a b", "é"] {
            assert!(!is_dns_label(bad, 63), "{bad:?}");
        }
        assert!(!is_dns_label(&"x".repeat(64), 63));
        assert!(is_dns_label(&"x".repeat(30), 30) && !is_dns_label(&"x".repeat(31), 30));
    }
    use crate::{PrecisionPolicy, QuantizedModel};

    fn samples() -> (QuantizedModel, PrecisionPolicy) {
        let qm =
            serde_yaml::from_str(include_str!("../../../deploy/samples/smollm2-135m.quantizedmodel.yaml")).unwrap();
        let pp =
            serde_yaml::from_str(include_str!("../../../deploy/samples/smollm2-135m.precisionpolicy.yaml")).unwrap();
        (qm, pp)
    }

    #[test]
    fn the_samples_agree() {
        let (qm, pp) = samples();
        assert_eq!(policy_against_model(&pp.spec, &qm.spec), Vec::<String>::new());
    }

    #[test]
    fn undeclared_tiers_are_named_with_their_field() {
        let (qm, mut pp) = samples();
        pp.spec.routes[1].fallbacks.push("int8".into());
        pp.spec.canary.as_mut().unwrap().candidate_tier = "nvfp4".into();
        let problems = policy_against_model(&pp.spec, &qm.spec);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("spec.routes[1].fallbacks[1]: tier \"int8\" is not declared"),
            "{}",
            problems[0]
        );
        assert!(problems[1].starts_with("spec.canary.candidateTier: tier \"nvfp4\""), "{}", problems[1]);
        assert!(problems[1].contains("bf16, fp8, fp8-kv8, int4-awq"));
    }

    #[cfg(feature = "cel")]
    #[test]
    fn cel_rules_run_client_side() {
        let (mut qm, pp) = samples();
        assert_eq!(cel_violations(&qm, None).unwrap(), vec![]);
        assert_eq!(cel_violations(&pp, None).unwrap(), vec![]);
        let old = qm.clone();
        qm.spec.architecture.num_layers = 32;
        qm.spec.tiers[1].weights.group_size = Some(100);
        let v = cel_violations(&qm, Some(&old)).unwrap();
        assert!(v.iter().any(|v| v.message.contains("architecture is immutable")), "{v:?}");
        assert!(v.iter().any(|v| v.message.contains("one of 32, 64, 128, 256")), "{v:?}");
    }
}

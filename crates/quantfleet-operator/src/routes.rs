//! The spec change a person should commit after a canary ends (GitOps owns spec; the operator only reports).
//! The effective routes themselves are pure API logic shared with the router ([`quantfleet_api::routes`]).

pub use quantfleet_api::routes::effective_routes;
use quantfleet_api::{CanaryPhase, CanaryStatus, PrecisionPolicySpec};

/// After promotion or rollback, the spec change that makes spec say what is served (for the Event and
/// `status.canary.recommendedSpecChange`).
pub fn recommended_spec_change(spec: &PrecisionPolicySpec, status: &CanaryStatus) -> Option<String> {
    let canary = spec.canary.as_ref()?;
    match status.phase {
        CanaryPhase::Promoted => {
            let routes: Vec<String> = effective_routes(spec, Some(status))
                .into_iter()
                .filter(|r| canary.task_classes.contains(&r.task_class))
                .map(|r| {
                    format!(
                        "{{taskClass: {}, tier: {}, fallbacks: [{}]}}",
                        r.task_class,
                        r.tier,
                        r.fallbacks.join(", ")
                    )
                })
                .collect();
            Some(format!("set spec.routes entries {} and remove spec.canary", routes.join(", ")))
        }
        CanaryPhase::RolledBack => Some(format!(
            "remove spec.canary (candidate {} was rolled back) or change its candidateTier",
            status.candidate_tier
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quantfleet_api::PrecisionPolicy;

    fn sample() -> PrecisionPolicySpec {
        let pp: PrecisionPolicy =
            serde_yaml::from_str(include_str!("../../../deploy/samples/smollm2-135m.precisionpolicy.yaml")).unwrap();
        pp.spec
    }

    fn status(phase: CanaryPhase, live: i32) -> CanaryStatus {
        CanaryStatus { phase, candidate_tier: "int4-awq".into(), live_percent: live, ..CanaryStatus::default() }
    }

    #[test]
    fn recommended_changes_name_the_routes_to_commit() {
        let spec = sample();
        let text = recommended_spec_change(&spec, &status(CanaryPhase::Promoted, 100)).unwrap();
        assert_eq!(
            text,
            "set spec.routes entries {taskClass: code, tier: int4-awq, fallbacks: [fp8, bf16]} and remove spec.canary"
        );
        assert!(recommended_spec_change(&spec, &status(CanaryPhase::RolledBack, 0)).unwrap().contains("rolled back"));
        assert_eq!(recommended_spec_change(&spec, &status(CanaryPhase::Stepping, 10)), None);
    }
}

//! What the router obeys: the effective route of every task class, derived from the policy's spec and its
//! canary status, and the spec change a person should commit after a canary ends (GitOps owns spec; the
//! operator only reports).

use quantfleet_api::{CanaryPhase, CanaryStatus, EffectiveRoute, PrecisionPolicySpec, TaskClass};

/// The spec route of `class`: its tier and fallbacks, or the default tier.
pub fn spec_route(spec: &PrecisionPolicySpec, class: TaskClass) -> (String, Vec<String>) {
    spec.routes
        .iter()
        .find(|r| r.task_class == class)
        .map(|r| (r.tier.clone(), r.fallbacks.clone()))
        .unwrap_or_else(|| (spec.default_tier.clone(), Vec::new()))
}

/// One effective route per task class, in [`TaskClass::ALL`] order.
pub fn effective_routes(spec: &PrecisionPolicySpec, canary: Option<&CanaryStatus>) -> Vec<EffectiveRoute> {
    TaskClass::ALL
        .iter()
        .map(|&class| {
            let (tier, fallbacks) = spec_route(spec, class);
            let mut route = EffectiveRoute {
                task_class: class,
                tier,
                fallbacks,
                candidate_tier: None,
                shadow_percent: 0.0,
                candidate_live_percent: 0,
            };
            let in_scope = spec.canary.as_ref().is_some_and(|c| c.task_classes.contains(&class));
            if let (true, Some(status), Some(canary)) = (in_scope, canary, spec.canary.as_ref()) {
                match status.phase {
                    CanaryPhase::Shadowing | CanaryPhase::Stepping | CanaryPhase::Paused => {
                        route.candidate_tier = Some(status.candidate_tier.clone());
                        route.shadow_percent = canary.shadow_percent;
                        route.candidate_live_percent = status.live_percent;
                    }
                    CanaryPhase::Promoted => {
                        let incumbent = std::mem::replace(&mut route.tier, status.candidate_tier.clone());
                        let mut fallbacks = vec![incumbent];
                        fallbacks.extend(route.fallbacks.drain(..).filter(|f| *f != status.candidate_tier));
                        fallbacks.dedup();
                        route.fallbacks = fallbacks;
                    }
                    CanaryPhase::Pending | CanaryPhase::RolledBack => {}
                }
            }
            route
        })
        .collect()
}

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

    fn route(routes: &[EffectiveRoute], class: TaskClass) -> &EffectiveRoute {
        routes.iter().find(|r| r.task_class == class).unwrap()
    }

    #[test]
    fn every_class_gets_a_route_and_unrouted_ones_use_the_default() {
        let mut spec = sample();
        spec.routes.retain(|r| r.task_class != TaskClass::Math);
        let routes = effective_routes(&spec, None);
        assert_eq!(routes.len(), TaskClass::ALL.len());
        assert_eq!(route(&routes, TaskClass::Math).tier, "bf16");
        assert!(route(&routes, TaskClass::Math).fallbacks.is_empty());
        assert_eq!(route(&routes, TaskClass::Code).tier, "fp8");
    }

    #[test]
    fn canary_phases_shape_the_in_scope_routes_only() {
        let spec = sample();
        let stepping = effective_routes(&spec, Some(&status(CanaryPhase::Stepping, 50)));
        let code = route(&stepping, TaskClass::Code);
        assert_eq!((code.tier.as_str(), code.candidate_tier.as_deref()), ("fp8", Some("int4-awq")));
        assert_eq!((code.shadow_percent, code.candidate_live_percent), (10.0, 50));
        assert_eq!(route(&stepping, TaskClass::Chat).candidate_tier, None, "chat is not in scope");

        let promoted = effective_routes(&spec, Some(&status(CanaryPhase::Promoted, 100)));
        let code = route(&promoted, TaskClass::Code);
        assert_eq!(code.tier, "int4-awq");
        assert_eq!(code.fallbacks, vec!["fp8".to_owned(), "bf16".to_owned()]);
        assert_eq!(code.candidate_tier, None);

        for phase in [CanaryPhase::Pending, CanaryPhase::RolledBack] {
            let routes = effective_routes(&spec, Some(&status(phase, 0)));
            assert_eq!(routes, effective_routes(&spec, None), "{phase:?} routes like no canary");
        }
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

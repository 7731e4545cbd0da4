//! What the router obeys: the effective route of every task class, derived from a policy's spec and its
//! canary status. Pure: the operator writes the result into `status.effectiveRoutes`, and the router computes
//! the same routes from a static policy file when no operator runs (`quantfleet up`).

use crate::policy::{CanaryPhase, CanaryStatus, EffectiveRoute, PrecisionPolicySpec};
use crate::vocab::TaskClass;

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

/// The tiers to try for a route, in order: the route's tier, its fallbacks, then the policy's default tier
/// (the last resort), each once.
pub fn tiers_in_order(route: &EffectiveRoute, default_tier: &str) -> Vec<String> {
    let mut tiers = Vec::with_capacity(route.fallbacks.len() + 2);
    for tier in std::iter::once(&route.tier).chain(&route.fallbacks).map(String::as_str).chain([default_tier]) {
        if !tiers.iter().any(|t: &String| t == tier) {
            tiers.push(tier.to_owned());
        }
    }
    tiers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PrecisionPolicy;

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
    fn tiers_are_tried_route_then_fallbacks_then_default_once_each() {
        let routes = effective_routes(&sample(), None);
        assert_eq!(tiers_in_order(route(&routes, TaskClass::Chat), "bf16"), ["int4-awq", "fp8", "bf16"]);
        assert_eq!(tiers_in_order(route(&routes, TaskClass::Math), "bf16"), ["bf16", "fp8"]);
        assert_eq!(tiers_in_order(route(&routes, TaskClass::Code), "int4-awq"), ["fp8", "bf16", "int4-awq"]);
    }
}

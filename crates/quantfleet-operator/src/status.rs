//! QuantizedModel status as plain data: from the plan, what the tier Deployments report, and the previous
//! status (whose condition transition times are kept while nothing changes, so a steady state writes
//! nothing).

use k8s_openapi::api::apps::v1::Deployment;
use quantfleet_api::conditions::{
    Condition, Time, boolean as condition, model as cond, reason, set_condition, status as st,
};
use quantfleet_api::node::NODE_GRPC_PORT;
use quantfleet_api::plan::ModelPlan;
use quantfleet_api::{QuantizedModel, QuantizedModelStatus, TierStatus};
use std::collections::BTreeMap;

use crate::builders::tier_object_name;

/// What a tier's Deployment reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeploymentObservation {
    /// spec.replicas.
    pub desired: i32,
    /// status.readyReplicas.
    pub ready: i32,
    /// status.updatedReplicas.
    pub updated: i32,
    /// The Deployment controller has seen its latest spec (status.observedGeneration >= metadata.generation).
    pub current: bool,
    /// The Deployment's Available condition is False (fewer than the minimum replicas available).
    pub unavailable: bool,
}

impl DeploymentObservation {
    /// Reads the fields that matter from a Deployment.
    pub fn of(d: &Deployment) -> Self {
        let status = d.status.clone().unwrap_or_default();
        let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let generation = d.metadata.generation.unwrap_or(0);
        DeploymentObservation {
            desired,
            ready: status.ready_replicas.unwrap_or(0),
            updated: status.updated_replicas.unwrap_or(0),
            current: status.observed_generation.unwrap_or(0) >= generation,
            unavailable: status
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Available" && c.status == "False"),
        }
    }

    fn rolled_out(&self) -> bool {
        self.current && self.updated >= self.desired && self.ready >= self.desired
    }
}

/// Computes the whole status. `observed` maps tier names to their Deployment (absent: not created).
pub fn model_status(
    model: &QuantizedModel,
    plan: &ModelPlan,
    observed: &BTreeMap<String, DeploymentObservation>,
    previous: Option<&QuantizedModelStatus>,
    now: &Time,
) -> QuantizedModelStatus {
    let name = model.metadata.name.as_deref().unwrap_or_default();
    let namespace = model.metadata.namespace.as_deref().unwrap_or_default();
    let generation = model.metadata.generation;
    let tiers: Vec<TierStatus> = plan
        .tiers
        .iter()
        .zip(&model.spec.tiers)
        .map(|(p, spec)| {
            let mut t = p.status();
            t.replicas = spec.replicas;
            if let Some(o) = observed.get(&spec.name) {
                t.ready_replicas = o.ready;
            }
            if p.fits() {
                t.endpoint = Some(format!("{}.{namespace}.svc:{NODE_GRPC_PORT}", tier_object_name(name, &spec.name)));
            }
            t
        })
        .collect();

    let mut conditions = previous.map(|s| s.conditions.clone()).unwrap_or_default();
    let misfits: Vec<_> = plan.tiers.iter().filter(|t| !t.fits()).collect();
    let fits = match misfits.first() {
        None => condition(
            cond::FITS_ACCELERATOR,
            true,
            reason::ALL_TIERS_FIT,
            "every tier fits its accelerator".into(),
            generation,
            now,
        ),
        Some(first) => condition(
            cond::FITS_ACCELERATOR,
            false,
            first.problems[0].reason(),
            misfits.iter().map(|t| t.message()).collect::<Vec<_>>().join(" | "),
            generation,
            now,
        ),
    };
    set_condition(&mut conditions, fits);

    let deployed: Vec<(&str, DeploymentObservation)> = plan
        .tiers
        .iter()
        .filter(|t| t.fits())
        .map(|t| (t.name.as_str(), observed.get(&t.name).copied().unwrap_or_default()))
        .collect();
    let rolling: Vec<&str> = deployed.iter().filter(|(_, o)| !o.rolled_out()).map(|(n, _)| *n).collect();
    let unavailable: Vec<&str> = deployed.iter().filter(|(_, o)| o.unavailable).map(|(n, _)| *n).collect();

    let progressing = if rolling.is_empty() {
        condition(
            cond::PROGRESSING,
            false,
            reason::ALL_REPLICAS_SERVING,
            "every deployed tier is rolled out".into(),
            generation,
            now,
        )
    } else {
        condition(
            cond::PROGRESSING,
            true,
            reason::ROLLING_OUT,
            format!("rolling out: {}", rolling.join(", ")),
            generation,
            now,
        )
    };
    set_condition(&mut conditions, progressing);
    let degraded = if unavailable.is_empty() {
        condition(
            cond::DEGRADED,
            false,
            reason::ALL_REPLICAS_SERVING,
            "no tier is below its minimum availability".into(),
            generation,
            now,
        )
    } else {
        let msg = format!("below minimum availability: {}", unavailable.join(", "));
        condition(cond::DEGRADED, true, reason::REPLICAS_UNAVAILABLE, msg, generation, now)
    };
    set_condition(&mut conditions, degraded);

    let ready = if !misfits.is_empty() {
        let names: Vec<&str> = misfits.iter().map(|t| t.name.as_str()).collect();
        condition(
            cond::READY,
            false,
            reason::TIER_DOES_NOT_FIT,
            format!("not deployed: {}", names.join(", ")),
            generation,
            now,
        )
    } else if !rolling.is_empty() {
        condition(
            cond::READY,
            false,
            reason::ROLLING_OUT,
            format!("waiting for: {}", rolling.join(", ")),
            generation,
            now,
        )
    } else {
        condition(
            cond::READY,
            true,
            reason::ALL_REPLICAS_SERVING,
            "every tier has all replicas serving".into(),
            generation,
            now,
        )
    };
    set_condition(&mut conditions, ready);

    // The node's ModelInfo is what verifies the precision; until the operator has read it from every tier the
    // honest answer is Unknown.
    set_condition(
        &mut conditions,
        Condition {
            type_: cond::QUANTIZATION_VERIFIED.into(),
            status: st::UNKNOWN.into(),
            reason: reason::AWAITING_NODES.into(),
            message: "no node has reported its served precision (ModelInfo) yet".into(),
            observed_generation: generation,
            last_transition_time: now.clone(),
        },
    );

    QuantizedModelStatus { observed_generation: generation, conditions, tiers }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quantfleet_api::conditions::find;
    use quantfleet_api::plan::{AcceleratorTable, plan_model};

    fn sample() -> QuantizedModel {
        let mut qm: QuantizedModel =
            serde_yaml::from_str(include_str!("../../../deploy/samples/smollm2-135m.quantizedmodel.yaml")).unwrap();
        qm.metadata.namespace = Some("serving".into());
        qm.metadata.generation = Some(3);
        qm
    }

    fn at(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    fn healthy(qm: &QuantizedModel) -> BTreeMap<String, DeploymentObservation> {
        qm.spec
            .tiers
            .iter()
            .map(|t| {
                let o = DeploymentObservation {
                    desired: t.replicas,
                    ready: t.replicas,
                    updated: t.replicas,
                    current: true,
                    unavailable: false,
                };
                (t.name.clone(), o)
            })
            .collect()
    }

    fn status_of(c: &QuantizedModelStatus, type_: &str) -> (String, String) {
        let c = find(&c.conditions, type_).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn a_healthy_model_is_ready_and_a_second_pass_changes_nothing() {
        let qm = sample();
        let plan = plan_model(&qm.spec, &AcceleratorTable::builtin());
        let first = model_status(&qm, &plan, &healthy(&qm), None, &at("2026-11-23T10:00:00Z"));
        assert_eq!(status_of(&first, cond::READY), ("True".into(), "AllReplicasServing".into()));
        assert_eq!(status_of(&first, cond::FITS_ACCELERATOR), ("True".into(), "AllTiersFit".into()));
        assert_eq!(status_of(&first, cond::QUANTIZATION_VERIFIED), ("Unknown".into(), "AwaitingNodes".into()));
        assert_eq!(first.observed_generation, Some(3));
        assert_eq!(first.tiers[3].endpoint.as_deref(), Some("smollm2-135m-int4-awq.serving.svc:50051"));
        assert_eq!((first.tiers[3].replicas, first.tiers[3].ready_replicas), (2, 2));
        let second = model_status(&qm, &plan, &healthy(&qm), Some(&first), &at("2026-11-23T11:00:00Z"));
        assert_eq!(first, second, "same observation, same status: no write");
    }

    #[test]
    fn rolling_out_and_degraded_tiers_are_named() {
        let qm = sample();
        let plan = plan_model(&qm.spec, &AcceleratorTable::builtin());
        let mut observed = healthy(&qm);
        observed.get_mut("fp8").unwrap().ready = 0;
        observed.get_mut("fp8").unwrap().unavailable = true;
        observed.remove("bf16");
        let s = model_status(&qm, &plan, &observed, None, &at("2026-11-23T10:00:00Z"));
        assert_eq!(status_of(&s, cond::READY), ("False".into(), "RollingOut".into()));
        let progressing = find(&s.conditions, cond::PROGRESSING).unwrap();
        assert_eq!(progressing.message, "rolling out: bf16, fp8");
        assert_eq!(find(&s.conditions, cond::DEGRADED).unwrap().message, "below minimum availability: fp8");
    }

    #[test]
    fn a_tier_that_does_not_fit_fails_closed_with_its_reason() {
        let mut qm = sample();
        qm.spec.tiers[0].activations = quantfleet_api::ActivationPrecision::Fp8E4m3;
        qm.spec.tiers[0].weights = quantfleet_api::WeightSpec::of(quantfleet_api::WeightFormat::Fp8E4m3);
        qm.spec.accelerator.product = "NVIDIA-A100-SXM4-80GB".into();
        let plan = plan_model(&qm.spec, &AcceleratorTable::builtin());
        let s = model_status(&qm, &plan, &healthy(&qm), None, &at("2026-11-23T10:00:00Z"));
        assert_eq!(status_of(&s, cond::FITS_ACCELERATOR), ("False".into(), "UnsupportedPrecision".into()));
        assert_eq!(status_of(&s, cond::READY), ("False".into(), "TierDoesNotFit".into()));
        assert!(!s.tiers[0].fits && s.tiers[0].endpoint.is_none());
        assert!(s.tiers[0].message.as_ref().unwrap().contains("needs SM89"));
    }

    #[test]
    fn deployment_observation_reads_the_real_fields() {
        let d: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x", "generation": 4},
            "spec": {"replicas": 2, "selector": {}, "template": {}},
            "status": {"observedGeneration": 3, "readyReplicas": 1, "updatedReplicas": 2,
                       "conditions": [{"type": "Available", "status": "False"}]}
        }))
        .unwrap();
        let o = DeploymentObservation::of(&d);
        assert_eq!(o, DeploymentObservation { desired: 2, ready: 1, updated: 2, current: false, unavailable: true });
    }
}

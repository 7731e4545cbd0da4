//! QuantizedModel status as plain data: from the plan, what the tier Deployments report, and the previous
//! status (whose condition transition times are kept while nothing changes, so a steady state writes
//! nothing).

use k8s_openapi::api::apps::v1::Deployment;
use quantfleet_api::conditions::{
    Condition, Time, boolean as condition, model as cond, reason, set_condition, status as st,
};
use quantfleet_api::model::TierSpec;
use quantfleet_api::node::NODE_GRPC_PORT;
use quantfleet_api::plan::ModelPlan;
use quantfleet_api::stats::NodeReport;
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

/// The fields of a tier spec that differ between what is declared and what a node serves: everything but
/// `replicas` (the Deployment's business; nodes are configured with 1). Each as "field declared X, served Y".
fn precision_differences(declared: &TierSpec, served: &TierSpec) -> Vec<String> {
    let strip = |t: &TierSpec| {
        let mut v = serde_json::to_value(TierSpec { replicas: 0, ..t.clone() }).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.remove("replicas");
        }
        v
    };
    let (d, s) = (strip(declared), strip(served));
    let empty = serde_json::Map::new();
    let (d, s) = (d.as_object().unwrap_or(&empty), s.as_object().unwrap_or(&empty));
    let mut keys: Vec<&String> = d.keys().chain(s.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&serde_json::Value>| v.map_or_else(|| "(none)".to_owned(), |v| v.to_string());
    keys.into_iter()
        .filter(|k| d.get(*k) != s.get(*k))
        .map(|k| format!("{k} declared {}, served {}", show(d.get(k)), show(s.get(k))))
        .collect()
}

/// QuantizationVerified: every tier with ready replicas has node reports (ModelInfo, via the router) and each
/// reports the declared precision -> True; any node serving another precision (or the checkpoint's native
/// weights, or a spec that cannot be read) -> False naming the tier, declared vs served; otherwise Unknown.
/// `nodes` is None when no router is configured or its report could not be read.
pub fn quantization_condition(
    model: &QuantizedModel,
    plan: &ModelPlan,
    observed: &BTreeMap<String, DeploymentObservation>,
    nodes: Option<&[NodeReport]>,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let name = model.metadata.name.as_deref().unwrap_or_default();
    let namespace = model.metadata.namespace.as_deref().unwrap_or_default();
    let unknown = |message: String| Condition {
        type_: cond::QUANTIZATION_VERIFIED.into(),
        status: st::UNKNOWN.into(),
        reason: reason::AWAITING_NODES.into(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    };
    let serving: Vec<&TierSpec> = model
        .spec
        .tiers
        .iter()
        .zip(&plan.tiers)
        .filter(|(t, p)| p.fits() && observed.get(&t.name).is_some_and(|o| o.ready > 0))
        .map(|(t, _)| t)
        .collect();
    let Some(nodes) = nodes else {
        return unknown(
            "no router report of the nodes' ModelInfo (no router configured, or it could not be read)".into(),
        );
    };
    let mut mismatches = Vec::new();
    let mut verified = Vec::new();
    let mut waiting = Vec::new();
    for tier in &serving {
        let reports: Vec<&NodeReport> =
            nodes.iter().filter(|n| n.namespace == namespace && n.model == name && n.tier == tier.name).collect();
        if reports.is_empty() {
            waiting.push(tier.name.as_str());
            continue;
        }
        let mut tier_ok = true;
        for report in &reports {
            let problem = match serde_json::from_value::<TierSpec>(report.tier_spec.clone()) {
                Err(err) => Some(format!("a tier spec that cannot be read ({err})")),
                Ok(_) if !report.tier_applied => Some("the checkpoint's native weights (tier not applied)".into()),
                Ok(served) => {
                    let diff = precision_differences(tier, &served);
                    (!diff.is_empty()).then(|| diff.join("; "))
                }
            };
            if let Some(problem) = problem {
                tier_ok = false;
                mismatches.push(format!("tier {} at {}: {problem}", tier.name, report.endpoint));
            }
        }
        if tier_ok {
            verified.push(format!(
                "{} ({} node{})",
                tier.name,
                reports.len(),
                if reports.len() == 1 { "" } else { "s" }
            ));
        }
    }
    if !mismatches.is_empty() {
        return condition(
            cond::QUANTIZATION_VERIFIED,
            false,
            reason::PRECISION_MISMATCH,
            mismatches.join(" | "),
            generation,
            now,
        );
    }
    if serving.is_empty() {
        return unknown("no tier has a ready replica yet".into());
    }
    if !waiting.is_empty() {
        return unknown(format!(
            "no node has reported its served precision (ModelInfo) yet for: {}",
            waiting.join(", ")
        ));
    }
    condition(
        cond::QUANTIZATION_VERIFIED,
        true,
        reason::ALL_TIERS_VERIFIED,
        format!("every tier with ready replicas serves its declared precision: {}", verified.join(", ")),
        generation,
        now,
    )
}

/// Computes the whole status. `observed` maps tier names to their Deployment (absent: not created); `blocked`
/// maps tiers that fit but were not applied to why (their calibration ConfigMap cannot be used); `nodes` is
/// what the router reports of the nodes' ModelInfo (None: no router, or not read).
pub fn model_status(
    model: &QuantizedModel,
    plan: &ModelPlan,
    observed: &BTreeMap<String, DeploymentObservation>,
    blocked: &BTreeMap<String, String>,
    nodes: Option<&[NodeReport]>,
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
            if let Some(why) = blocked.get(&spec.name) {
                t.message = Some(why.clone());
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
        .filter(|t| t.fits() && !blocked.contains_key(&t.name))
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
    } else if !blocked.is_empty() {
        let why: Vec<String> = blocked.iter().map(|(tier, why)| format!("{tier}: {why}")).collect();
        condition(
            cond::READY,
            false,
            reason::CALIBRATION_DATA_MISSING,
            format!("not applied: {}", why.join("; ")),
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

    // The nodes' ModelInfo (read by the router from every endpoint) is what verifies the precision.
    set_condition(&mut conditions, quantization_condition(model, plan, observed, nodes, generation, now));

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
        let first = model_status(&qm, &plan, &healthy(&qm), &BTreeMap::new(), None, None, &at("2026-11-23T10:00:00Z"));
        assert_eq!(status_of(&first, cond::READY), ("True".into(), "AllReplicasServing".into()));
        assert_eq!(status_of(&first, cond::FITS_ACCELERATOR), ("True".into(), "AllTiersFit".into()));
        assert_eq!(status_of(&first, cond::QUANTIZATION_VERIFIED), ("Unknown".into(), "AwaitingNodes".into()));
        assert_eq!(first.observed_generation, Some(3));
        assert_eq!(first.tiers[3].endpoint.as_deref(), Some("smollm2-135m-int4-awq.serving.svc:50051"));
        assert_eq!((first.tiers[3].replicas, first.tiers[3].ready_replicas), (2, 2));
        let second =
            model_status(&qm, &plan, &healthy(&qm), &BTreeMap::new(), None, Some(&first), &at("2026-11-23T11:00:00Z"));
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
        let s = model_status(&qm, &plan, &observed, &BTreeMap::new(), None, None, &at("2026-11-23T10:00:00Z"));
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
        let s = model_status(&qm, &plan, &healthy(&qm), &BTreeMap::new(), None, None, &at("2026-11-23T10:00:00Z"));
        assert_eq!(status_of(&s, cond::FITS_ACCELERATOR), ("False".into(), "UnsupportedPrecision".into()));
        assert_eq!(status_of(&s, cond::READY), ("False".into(), "TierDoesNotFit".into()));
        assert!(!s.tiers[0].fits && s.tiers[0].endpoint.is_none());
        assert!(s.tiers[0].message.as_ref().unwrap().contains("needs SM89"));
    }

    #[test]
    fn a_tier_without_its_calibration_text_is_named_and_not_counted_as_rolling_out() {
        let qm = sample();
        let plan = plan_model(&qm.spec, &AcceleratorTable::builtin());
        let mut observed = healthy(&qm);
        observed.remove("int4-awq");
        let why = "ConfigMap chat-logs not found in serving (calibration.dataset: configmap/chat-logs)";
        let blocked = BTreeMap::from([("int4-awq".to_owned(), why.to_owned())]);
        let s = model_status(&qm, &plan, &observed, &blocked, None, None, &at("2026-11-23T10:00:00Z"));
        assert_eq!(status_of(&s, cond::READY), ("False".into(), "CalibrationDataMissing".into()));
        assert_eq!(find(&s.conditions, cond::READY).unwrap().message, format!("not applied: int4-awq: {why}"));
        assert_eq!(s.tiers[3].message.as_deref(), Some(why));
        assert_eq!(status_of(&s, cond::FITS_ACCELERATOR).0, "True");
        assert_eq!(status_of(&s, cond::PROGRESSING).0, "False", "the other tiers are rolled out");
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

    /// What a node serving `tier` of the sample model would report (the builders configure nodes with replicas 1).
    fn report(qm: &QuantizedModel, tier: &str, endpoint: &str) -> NodeReport {
        let spec = qm.spec.tiers.iter().find(|t| t.name == tier).unwrap();
        NodeReport {
            namespace: "serving".into(),
            model: "smollm2-135m".into(),
            tier: tier.into(),
            endpoint: endpoint.into(),
            tier_spec: serde_json::to_value(TierSpec { replicas: 1, ..spec.clone() }).unwrap(),
            backend: "cpu-avx2".into(),
            weights_loaded: "synthetic".into(),
            tier_applied: true,
        }
    }

    #[test]
    fn quantization_is_verified_from_what_the_nodes_report() {
        let qm = sample();
        let plan = plan_model(&qm.spec, &AcceleratorTable::builtin());
        let all = |qm: &QuantizedModel| -> Vec<NodeReport> {
            qm.spec.tiers.iter().map(|t| report(qm, &t.name, &format!("{}:50051", t.name))).collect()
        };
        type Edit = fn(&QuantizedModel, &mut Vec<NodeReport>, &mut BTreeMap<String, DeploymentObservation>);
        // (case, edit of the reports and observations, expected status, reason, text the message must contain)
        let cases: Vec<(&str, Option<Edit>, &str, &str, &str)> = vec![
            (
                "every tier reports its declared spec",
                Some(|_, _, _| {}),
                "True",
                "AllTiersVerified",
                "int4-awq (1 node)",
            ),
            ("no router report", None, "Unknown", "AwaitingNodes", "no router report"),
            (
                "one tier has not reported",
                Some(|_, r, _| r.retain(|n| n.tier != "fp8")),
                "Unknown",
                "AwaitingNodes",
                "yet for: fp8",
            ),
            (
                "a tier without ready replicas need not report",
                Some(|_, r, o| {
                    r.retain(|n| n.tier != "fp8");
                    o.get_mut("fp8").unwrap().ready = 0;
                }),
                "True",
                "AllTiersVerified",
                "bf16 (1 node)",
            ),
            (
                "nothing ready",
                Some(|_, r, o| {
                    r.clear();
                    o.values_mut().for_each(|o| o.ready = 0);
                }),
                "Unknown",
                "AwaitingNodes",
                "no tier has a ready replica",
            ),
            (
                "other models and namespaces do not count",
                Some(|_, r, _| {
                    for n in r.iter_mut().filter(|n| n.tier == "bf16") {
                        n.namespace = "elsewhere".into();
                    }
                    let mut other = r[1].clone();
                    other.model = "another-model".into();
                    other.tier = "bf16".into();
                    r.push(other);
                }),
                "Unknown",
                "AwaitingNodes",
                "yet for: bf16",
            ),
            (
                "another weight format",
                Some(|_, r, _| {
                    let n = r.iter_mut().find(|n| n.tier == "int4-awq").unwrap();
                    n.tier_spec["weights"] = serde_json::json!({"format": "int8"});
                }),
                "False",
                "PrecisionMismatch",
                "tier int4-awq at int4-awq:50051: weights declared {",
            ),
            (
                "another KV cache on one of two nodes",
                Some(|qm, r, _| {
                    let mut second = report(qm, "fp8", "fp8-b:50051");
                    second.tier_spec["kvCache"] = serde_json::json!({"dtype": "fp8-e4m3"});
                    r.push(second);
                }),
                "False",
                "PrecisionMismatch",
                "tier fp8 at fp8-b:50051: kvCache declared",
            ),
            (
                "the checkpoint's native weights",
                Some(|_, r, _| r[0].tier_applied = false),
                "False",
                "PrecisionMismatch",
                "tier not applied",
            ),
            (
                "an unreadable spec",
                Some(|_, r, _| r[0].tier_spec = serde_json::Value::Null),
                "False",
                "PrecisionMismatch",
                "cannot be read",
            ),
            (
                "a mismatch wins over a missing report",
                Some(|_, r, _| {
                    r.retain(|n| n.tier != "bf16");
                    r[0].tier_spec["activations"] = serde_json::json!("int8");
                }),
                "False",
                "PrecisionMismatch",
                "activations declared",
            ),
        ];
        for (name, edit, status, why, text) in cases {
            let mut reports = all(&qm);
            let mut observed = healthy(&qm);
            let nodes = edit.map(|edit| {
                edit(&qm, &mut reports, &mut observed);
                reports.clone()
            });
            let c =
                quantization_condition(&qm, &plan, &observed, nodes.as_deref(), Some(3), &at("2026-11-23T10:00:00Z"));
            assert_eq!((c.status.as_str(), c.reason.as_str()), (status, why), "{name}: {}", c.message);
            assert!(c.message.contains(text), "{name}: {:?} lacks {text:?}", c.message);
        }
        // Replicas are not precision: a node configured with 1 matches a tier of 2.
        assert_eq!(qm.spec.tiers[3].replicas, 2);
        let verified = model_status(
            &qm,
            &plan,
            &healthy(&qm),
            &BTreeMap::new(),
            Some(&all(&qm)),
            None,
            &at("2026-11-23T10:00:00Z"),
        );
        assert_eq!(status_of(&verified, cond::QUANTIZATION_VERIFIED), ("True".into(), "AllTiersVerified".into()));
    }
}

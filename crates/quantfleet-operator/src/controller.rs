//! The two controllers and their wiring to the API server. Reconcile is the pipeline of STYLE.md: read ->
//! validate -> build (pure, in [`crate::builders`] / [`crate::canary`]) -> server-side apply under one field
//! manager -> compute status (pure, in [`crate::status`]) and write it only when it changed.

use crate::builders::{FIELD_MANAGER, MODEL_LABEL, Settings, TIER_LABEL, build_tier};
use crate::canary::{self, ABORT_ANNOTATION, Observation, PROMOTE_ANNOTATION};
use crate::routes::effective_routes;
use crate::stats_source::RouterStats;
use crate::status::{DeploymentObservation, model_status};
use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use quantfleet_api::conditions::{Condition, Time, policy as pcond, reason, set_condition};
use quantfleet_api::node::CALIBRATION_KEY;
use quantfleet_api::plan::{AcceleratorTable, plan_model};
use quantfleet_api::validate::policy_against_model;
use quantfleet_api::{CanaryPhase, PrecisionPolicy, PrecisionPolicyStatus, QuantizedModel};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

/// A reconcile failure, with a fixed category for metrics and Events (never the message text).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("building tier objects: {0}")]
    Build(#[from] crate::builders::BuildError),
    #[error("serializing: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("object without {0}")]
    Metadata(&'static str),
}

impl Error {
    /// Bounded label value for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_api",
            Error::Build(_) => "build",
            Error::Serialize(_) => "serialize",
            Error::Metadata(_) => "metadata",
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub accelerators: AcceleratorTable,
    pub recorder: Recorder,
    /// The router replicas' canary stats; None when no router is configured (canaries then wait for samples).
    pub stats: Option<RouterStats>,
    /// Reconcile outcome counters by (controller, outcome or error category).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The one namespace whose QuantizedModels and PrecisionPolicies (and the objects made for them) the
    /// controllers watch; `None` watches every namespace. Scoped, the operator needs rights in that namespace
    /// only (a RoleBinding instead of a ClusterRoleBinding), and several operators can split a cluster.
    pub watch_namespace: Option<String>,
}

impl Context {
    /// An API for `K` over what the controllers watch: the one namespace of [`Context::watch_namespace`], or
    /// every namespace.
    fn watched<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        match &self.watch_namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }
}

/// How often a settled object is re-checked, and how often a running canary polls the router.
const RESYNC: Duration = Duration::from_secs(300);
const CANARY_POLL: Duration = Duration::from_secs(10);
/// How often a model with serving tiers whose precision is not verified (or mismatched), or with a tier waiting
/// for its calibration ConfigMap, is re-checked.
const VERIFY_POLL: Duration = Duration::from_secs(20);
/// How old a router read may be for the QuantizedModel status (node ModelInfo changes only with the pods).
const NODES_MAX_AGE: Duration = Duration::from_secs(5);

fn now() -> Time {
    Time(Timestamp::now())
}

/// Whether every field set in `desired` has the same value in `existing` (what the API server added, such as
/// defaults and status, is ignored). Numbers compare by value, lists element by element.
pub fn is_subset(desired: &serde_json::Value, existing: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (desired, existing) {
        (Value::Object(d), Value::Object(e)) => {
            d.iter().all(|(k, v)| v.is_null() || e.get(k).is_some_and(|x| is_subset(v, x)))
        }
        (Value::Array(d), Value::Array(e)) => d.len() == e.len() && d.iter().zip(e).all(|(a, b)| is_subset(a, b)),
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (a, b) => a == b,
    }
}

/// Server-side applies `object` under the operator's field manager (forcing ownership of its fields), unless
/// the live object already carries every desired field: a steady state then costs one read and no write. The
/// live object comes from `cache` when given (a watch of the operator's objects: no request), else from a GET.
async fn apply<K>(api: &Api<K>, cache: Option<&Store<K>>, object: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + Debug,
{
    let name = object.meta().name.clone().ok_or(Error::Metadata("metadata.name"))?;
    let live = match cache {
        Some(cache) => {
            let ns = object.meta().namespace.clone().ok_or(Error::Metadata("metadata.namespace"))?;
            cache.get(&ObjectRef::new(&name).within(&ns)).map(|k| (*k).clone())
        }
        None => api.get_opt(&name).await?,
    };
    if let Some(live) = live
        && is_subset(&serde_json::to_value(object)?, &serde_json::to_value(&live)?)
    {
        return Ok(live);
    }
    Ok(api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(object)).await?)
}

/// Writes `status` with server-side apply on the status subresource.
async fn apply_status<K>(api: &Api<K>, name: &str, status: &impl Serialize) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await?;
    Ok(())
}

/// Deletes the tier objects of `model` (in `ns`) whose tier is no longer in its spec, as the watch cache of the
/// operator's objects lists them (one that is already gone is fine).
async fn prune<K>(api: &Api<K>, cache: &Store<K>, ns: &str, model: &str, keep: &[String]) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    for object in cache.state() {
        let labels = object.labels();
        if object.namespace().as_deref() != Some(ns) || labels.get(MODEL_LABEL).map(String::as_str) != Some(model) {
            continue;
        }
        let tier = labels.get(TIER_LABEL).cloned().unwrap_or_default();
        if !keep.contains(&tier) {
            match api.delete(&object.name_any(), &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Watch caches of the objects the operator owns (label MODEL_LABEL), read instead of the API server.
#[derive(Clone)]
pub struct OwnedCaches {
    deployments: Store<Deployment>,
    services: Store<Service>,
    config_maps: Store<ConfigMap>,
}

/// A reflector for one kind of owned object (in the watched namespaces), running until the returned handle is
/// aborted.
fn cache<K>(ctx: &Context) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher::watcher(ctx.watched::<K>(), watcher::Config::default().labels(MODEL_LABEL)).default_backoff(),
    );
    let task = tokio::spawn(stream.for_each(|event| {
        if let Err(err) = event {
            tracing::warn!(%err, "watching the operator's objects");
        }
        std::future::ready(())
    }));
    (store, task)
}

/// What the QuantizedModel reconciler shares.
pub struct ModelContext {
    pub ctx: Arc<Context>,
    pub owned: OwnedCaches,
}

/// QuantizedModel -> per fitting tier a ConfigMap, Deployment and Service; status from the plan and the
/// Deployments. A tier that does not fit is not applied (an already running one keeps its previous config).
pub async fn reconcile_model(model: Arc<QuantizedModel>, shared: Arc<ModelContext>) -> Result<Action, Error> {
    let (ctx, owned) = (&shared.ctx, &shared.owned);
    let _timer = ctx.metrics.time("quantizedmodel");
    if model.metadata.deletion_timestamp.is_some() {
        // Being deleted (foreground deletion waits for the children): re-applying them would resurrect them.
        return Ok(Action::await_change());
    }
    let name = model.metadata.name.clone().ok_or(Error::Metadata("metadata.name"))?;
    let ns = model.metadata.namespace.clone().ok_or(Error::Metadata("metadata.namespace"))?;
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);

    let plan = plan_model(&model.spec, &ctx.accelerators);
    let mut observed = BTreeMap::new();
    let mut blocked = BTreeMap::new();
    for (tier, tier_plan) in model.spec.tiers.iter().zip(&plan.tiers) {
        if !tier_plan.fits() {
            continue;
        }
        let calibration = match tier.calibration_config_map() {
            None => None,
            Some(config_map) => match calibration_text(&config_maps, &ns, config_map).await? {
                Ok(text) => Some(text),
                Err(why) => {
                    // Like a tier that does not fit: not applied, so a running one keeps its previous config.
                    blocked.insert(tier.name.clone(), why);
                    continue;
                }
            },
        };
        let objects = build_tier(&model, tier, tier_plan, calibration.as_deref(), &ctx.settings)?;
        apply(&config_maps, Some(&owned.config_maps), &objects.config_map).await?;
        apply(&services, Some(&owned.services), &objects.service).await?;
        // The Deployment is read from the API server: its status (readiness) may be newer than the cache.
        let deployment = apply(&deployments, None, &objects.deployment).await?;
        observed.insert(tier.name.clone(), DeploymentObservation::of(&deployment));
    }
    let keep: Vec<String> = model.spec.tiers.iter().map(|t| t.name.clone()).collect();
    prune(&deployments, &owned.deployments, &ns, &name, &keep).await?;
    prune(&services, &owned.services, &ns, &name, &keep).await?;
    prune(&config_maps, &owned.config_maps, &ns, &name, &keep).await?;

    // The nodes' ModelInfo, as the router replicas report it (one read shared by every model for a while).
    let nodes = match &ctx.stats {
        Some(source) => {
            let evidence = source.recent(NODES_MAX_AGE).await;
            (evidence.replicas_read > 0).then_some(evidence.nodes)
        }
        None => None,
    };
    let status = model_status(&model, &plan, &observed, &blocked, nodes.as_deref(), model.status.as_ref(), &now());
    if model.status.as_ref() != Some(&status) {
        apply_status(&Api::<QuantizedModel>::namespaced(ctx.client.clone(), &ns), &name, &status).await?;
    }
    // Serving tiers whose precision is not verified yet while the router answers: it reads a new node's
    // ModelInfo within its health interval, so look again soon rather than at the next resync.
    let awaiting = nodes.is_some()
        && observed.values().any(|o| o.ready > 0)
        && quantfleet_api::conditions::find(
            &status.conditions,
            quantfleet_api::conditions::model::QUANTIZATION_VERIFIED,
        )
        .is_some_and(|c| c.status != quantfleet_api::conditions::status::TRUE);
    // A missing calibration ConfigMap is not watched (the operator watches only its own objects): look again
    // soon, so creating it takes effect without waiting for the resync.
    Ok(Action::requeue(if awaiting || !blocked.is_empty() { VERIFY_POLL } else { RESYNC }))
}

/// The calibration text of ConfigMap `name` (key [`CALIBRATION_KEY`]), or why the tier cannot use it.
async fn calibration_text(api: &Api<ConfigMap>, ns: &str, name: &str) -> Result<Result<String, String>, Error> {
    let dataset = format!("calibration.dataset: configmap/{name}");
    let Some(config_map) = api.get_opt(name).await? else {
        return Ok(Err(format!("ConfigMap {name} not found in {ns} ({dataset})")));
    };
    Ok(match config_map.data.as_ref().and_then(|d| d.get(CALIBRATION_KEY)) {
        None => Err(format!("ConfigMap {name} has no data key {CALIBRATION_KEY} ({dataset})")),
        Some(text) if text.trim().is_empty() => {
            Err(format!("ConfigMap {name} key {CALIBRATION_KEY} is empty ({dataset})"))
        }
        Some(text) => Ok(text.clone()),
    })
}

fn policy_condition(type_: &str, ok: bool, reason: &str, message: String, generation: Option<i64>) -> Condition {
    quantfleet_api::conditions::boolean(type_, ok, reason, message, generation, &now())
}

fn annotation_set(policy: &PrecisionPolicy, key: &str) -> bool {
    policy.annotations().get(key).is_some_and(|v| v == "true")
}

/// PrecisionPolicy -> effective routes and the canary state machine, all in status.
pub async fn reconcile_policy(policy: Arc<PrecisionPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.time("precisionpolicy");
    if policy.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let name = policy.metadata.name.clone().ok_or(Error::Metadata("metadata.name"))?;
    let ns = policy.metadata.namespace.clone().ok_or(Error::Metadata("metadata.namespace"))?;
    let generation = policy.metadata.generation;
    let models: Api<QuantizedModel> = Api::namespaced(ctx.client.clone(), &ns);
    let previous = policy.status.clone().unwrap_or_default();
    let mut status = PrecisionPolicyStatus { observed_generation: generation, ..previous.clone() };

    let model = models.get_opt(&policy.spec.model_ref.name).await?;
    let problems = match &model {
        None => {
            Some((reason::MODEL_NOT_FOUND, format!("QuantizedModel {} not found in {ns}", policy.spec.model_ref.name)))
        }
        Some(m) => {
            let p = policy_against_model(&policy.spec, &m.spec);
            (!p.is_empty()).then(|| (reason::UNKNOWN_TIER, p.join("; ")))
        }
    };
    let mut transition = None;
    match problems {
        Some((why, message)) => {
            // Nothing can be routed safely: keep the routes and canary state the router already has.
            set_condition(&mut status.conditions, policy_condition(pcond::READY, false, why, message, generation));
        }
        None => {
            let model = model.expect("checked above");
            let mut obs = Observation {
                candidate_ready: false,
                stats: BTreeMap::new(),
                promote_requested: annotation_set(&policy, PROMOTE_ANNOTATION),
                abort_requested: annotation_set(&policy, ABORT_ANNOTATION),
                now: Timestamp::now().to_string(),
                evidence_problem: None,
            };
            if let Some(canary) = &policy.spec.canary {
                obs.candidate_ready = model
                    .status
                    .as_ref()
                    .and_then(|s| s.tiers.iter().find(|t| t.name == canary.candidate_tier))
                    .is_some_and(|t| t.ready_replicas > 0);
                if let Some(source) = &ctx.stats {
                    let evidence = source.read().await;
                    if let Some(problem) = &evidence.problem {
                        tracing::warn!(policy = %name, %problem, "router stats incomplete; the canary holds");
                    }
                    obs.stats = evidence.classes(&ns, &name, &canary.candidate_tier);
                    obs.evidence_problem = evidence.problem;
                }
            }
            match canary::advance(&policy.spec, previous.canary.as_ref(), &obs) {
                Some((canary_status, t)) => {
                    status.canary = Some(canary_status);
                    transition = t;
                }
                None => status.canary = None,
            }
            status.effective_routes = effective_routes(&policy.spec, status.canary.as_ref());
            set_condition(
                &mut status.conditions,
                policy_condition(
                    pcond::READY,
                    true,
                    reason::ROUTES_RESOLVED,
                    "every tier the policy names is declared by the model".into(),
                    generation,
                ),
            );
            let failed = status.canary.as_ref().is_some_and(|c| {
                c.phase == CanaryPhase::RolledBack
                    || c.evidence.iter().any(|e| e.verdict == quantfleet_api::GateVerdict::Fail)
            });
            let health = if failed {
                let msg = status.canary.as_ref().and_then(|c| c.message.clone()).unwrap_or_default();
                policy_condition(pcond::CANARY_HEALTHY, false, reason::GATE_FAILED, msg, generation)
            } else {
                policy_condition(
                    pcond::CANARY_HEALTHY,
                    true,
                    reason::GATES_PASSING,
                    "no canary gate has failed".into(),
                    generation,
                )
            };
            set_condition(&mut status.conditions, health);
        }
    }

    ctx.metrics.set_canary_phase(&ns, &name, status.canary.as_ref().map(|c| c.phase));
    if status != previous {
        apply_status(&Api::<PrecisionPolicy>::namespaced(ctx.client.clone(), &ns), &name, &status).await?;
    }
    if let Some(t) = transition {
        let event = Event {
            type_: if matches!(t.reason, canary::reason::ROLLED_BACK | canary::reason::EVIDENCE_INCOMPLETE) {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: t.reason.into(),
            note: Some(match status.canary.as_ref().and_then(|c| c.recommended_spec_change.clone()) {
                Some(change) if t.reason != canary::reason::EVIDENCE_INCOMPLETE => {
                    format!("{}. Commit to Git: {change}", t.message)
                }
                _ => t.message.clone(),
            }),
            action: "AdvanceCanary".into(),
            secondary: None,
        };
        if let Err(err) = ctx.recorder.publish(&event, &policy.object_ref(&())).await {
            tracing::warn!(policy = %name, %err, "could not publish canary event");
        }
    }
    let running = status.canary.as_ref().is_some_and(|c| {
        matches!(c.phase, CanaryPhase::Pending | CanaryPhase::Shadowing | CanaryPhase::Stepping | CanaryPhase::Paused)
    });
    Ok(Action::requeue(if running { CANARY_POLL } else { RESYNC }))
}

fn error_policy<K, C>(_object: Arc<K>, error: &Error, _ctx: Arc<C>) -> Action {
    tracing::warn!(category = error.category(), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Runs both controllers until `shutdown` resolves, over the namespaces of [`Context::watch_namespace`].
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + 'static) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let (deployments, deployments_task) = cache::<Deployment>(&ctx);
    let (services, services_task) = cache::<Service>(&ctx);
    let (config_maps, config_maps_task) = cache::<ConfigMap>(&ctx);
    for ready in
        [deployments.wait_until_ready().await, services.wait_until_ready().await, config_maps.wait_until_ready().await]
    {
        ready.expect("the cache writers run until aborted");
    }
    let shared = Arc::new(ModelContext { ctx: ctx.clone(), owned: OwnedCaches { deployments, services, config_maps } });
    let models = Controller::new(ctx.watched::<QuantizedModel>(), watcher::Config::default())
        .owns(ctx.watched::<Deployment>(), watcher::Config::default().labels(MODEL_LABEL))
        .owns(ctx.watched::<Service>(), watcher::Config::default().labels(MODEL_LABEL))
        .owns(ctx.watched::<ConfigMap>(), watcher::Config::default().labels(MODEL_LABEL))
        .graceful_shutdown_on(stop(rx.clone()))
        .run(reconcile_model, error_policy, shared)
        .for_each(|result| {
            let ctx = ctx.clone();
            async move { ctx.metrics.record("quantizedmodel", &result) }
        });

    // A policy depends on its model's status (candidate readiness, tiers): re-reconcile policies that name a
    // model whenever the model changes.
    let policies_controller = Controller::new(ctx.watched::<PrecisionPolicy>(), watcher::Config::default());
    let policies_reader = policies_controller.store();
    let policies = policies_controller
        .watches(ctx.watched::<QuantizedModel>(), watcher::Config::default(), move |model| {
            let ns = model.namespace();
            let name = model.name_any();
            policies_reader
                .state()
                .into_iter()
                .filter(move |p| p.namespace() == ns && p.spec.model_ref.name == name)
                .map(|p| ObjectRef::from_obj(&*p))
        })
        .graceful_shutdown_on(stop(rx))
        .run(reconcile_policy, error_policy, ctx.clone())
        .for_each(|result| {
            let ctx = ctx.clone();
            async move { ctx.metrics.record("precisionpolicy", &result) }
        });
    futures::join!(models, policies);
    deployments_task.abort();
    services_task.abort();
    config_maps_task.abort();
}

/// The Event reporter identity.
pub fn reporter(instance: Option<String>) -> Reporter {
    Reporter { controller: FIELD_MANAGER.into(), instance }
}

#[cfg(test)]
mod tests {
    use super::is_subset;
    use serde_json::json;

    #[test]
    fn subset_ignores_server_additions_and_catches_drift() {
        let desired =
            json!({"metadata": {"name": "a", "labels": {"x": "1"}}, "spec": {"replicas": 2, "ports": [{"port": 80}]}});
        let live = json!({"metadata": {"name": "a", "labels": {"x": "1"}, "uid": "u", "resourceVersion": "7"},
                          "spec": {"replicas": 2.0, "ports": [{"port": 80, "protocol": "TCP"}]}, "status": {}});
        assert!(is_subset(&desired, &live));
        let drifted =
            json!({"metadata": {"name": "a", "labels": {"x": "2"}}, "spec": {"replicas": 2, "ports": [{"port": 80}]}});
        assert!(!is_subset(&desired, &drifted), "a changed label must be re-applied");
        let fewer = json!({"metadata": {"name": "a", "labels": {"x": "1"}}, "spec": {"replicas": 2, "ports": []}});
        assert!(!is_subset(&desired, &fewer), "a removed list element must be re-applied");
        assert!(!is_subset(&desired, &json!({"metadata": {"name": "a"}})), "a missing field must be re-applied");
    }
}

//! The Kubernetes source (`quantfleet router --kubernetes --policy NAME`): the router serves one
//! PrecisionPolicy and follows it and its model's node endpoints live, without restarting.
//!
//! - The policy: a watch on the one PrecisionPolicy (field selector `metadata.name`). Its routes are applied
//!   exactly as the static source applies a policy file ([`RoutingTable::from_policy`]): `status.effectiveRoutes`
//!   as the operator wrote them, else the routes derived from `status.canary`, else the spec. So a canary step
//!   (live percent), a promotion or a rollback takes effect as soon as the operator writes status.
//! - The endpoints: a watch on the EndpointSlices labelled `app.kubernetes.io/name=quantfleet-node` (the
//!   EndpointSlice controller copies the labels of the operator's tier Services onto their slices). A slice
//!   counts for the policy's model (`quantfleet.io/model` = `spec.modelRef.name`) and its `quantfleet.io/tier`;
//!   its endpoints that are ready (or whose readiness is unknown, as the API defines) are used on the port
//!   named `grpc`.
//!
//! Updates replace the routing table and the endpoint set atomically (a status write that changes no route, such
//! as new canary evidence, changes nothing); requests already running keep the
//! table and the endpoint they started with. Objects that cannot be used (a slice without a tier label or a
//! gRPC port, a policy that is missing or deleted) and watch errors are logged and counted in
//! `quantfleet_router_source_problems_total`; they never stop the router. A deleted policy leaves the last
//! routes in place until it comes back (removing routes from a serving router would turn a GitOps mistake
//! into an outage).

use crate::config::RoutingTable;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::server::Router;
use axum::response::IntoResponse;
use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use quantfleet_api::node::{MODEL_LABEL, NODE_APP_NAME, NODE_GRPC_PORT_NAME, TIER_LABEL};
use quantfleet_api::{EffectiveRoute, PrecisionPolicy, TaskClass};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use tokio::sync::watch;
use tower::ServiceExt;

/// What the router serves: the policy and the ready gRPC endpoints of its model's tiers. `endpoints` lists
/// every tier the policy routes to (empty when it has no ready endpoint) and every tier with slices.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub policy: PrecisionPolicy,
    pub endpoints: BTreeMap<String, Vec<String>>,
}

/// One EndpointSlice's usable content.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceEndpoints {
    pub model: String,
    pub tier: String,
    /// Ready endpoints as `host:port` (IPv6 in brackets).
    pub endpoints: Vec<String>,
}

/// Why a slice of a node Service cannot be used.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SliceProblem {
    #[error("no {MODEL_LABEL} label")]
    NoModelLabel,
    #[error("no {TIER_LABEL} label")]
    NoTierLabel,
    #[error("no port named {NODE_GRPC_PORT_NAME:?}")]
    NoGrpcPort,
    #[error("address type {0:?} is not IPv4, IPv6 or FQDN")]
    AddressType(String),
}

impl SliceProblem {
    /// A fixed label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            SliceProblem::NoModelLabel => "no_model_label",
            SliceProblem::NoTierLabel => "no_tier_label",
            SliceProblem::NoGrpcPort => "no_grpc_port",
            SliceProblem::AddressType(_) => "address_type",
        }
    }
}

/// The label selector of the node Services' EndpointSlices.
pub fn slice_selector() -> String {
    format!("app.kubernetes.io/name={NODE_APP_NAME}")
}

/// Reads one EndpointSlice: its model and tier (labels), and its ready endpoints on the gRPC port.
pub fn parse_slice(slice: &EndpointSlice) -> Result<SliceEndpoints, SliceProblem> {
    let labels = slice.labels();
    let model = labels.get(MODEL_LABEL).filter(|m| !m.is_empty()).ok_or(SliceProblem::NoModelLabel)?;
    let tier = labels.get(TIER_LABEL).filter(|t| !t.is_empty()).ok_or(SliceProblem::NoTierLabel)?;
    let port = slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(NODE_GRPC_PORT_NAME))
        .and_then(|p| p.port)
        .ok_or(SliceProblem::NoGrpcPort)?;
    let bracket = match slice.address_type.as_str() {
        "IPv4" | "FQDN" => false,
        "IPv6" => true,
        other => return Err(SliceProblem::AddressType(other.to_owned())),
    };
    let mut endpoints: Vec<String> = slice
        .endpoints
        .iter()
        // A nil `ready` means unknown, which consumers are to treat as ready; terminating endpoints are false.
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| e.addresses.iter())
        .map(|a| if bracket { format!("[{a}]:{port}") } else { format!("{a}:{port}") })
        .collect();
    endpoints.sort();
    endpoints.dedup();
    Ok(SliceEndpoints { model: model.clone(), tier: tier.clone(), endpoints })
}

/// The endpoints per tier of `policy`'s model: every tier the policy names (possibly empty), plus any other
/// tier of the model that has slices, each list sorted and without duplicates (a Service may have several
/// slices, and an address may be in two while the controller moves it).
pub fn endpoints_for<'a>(
    policy: &PrecisionPolicy,
    slices: impl IntoIterator<Item = &'a SliceEndpoints>,
) -> BTreeMap<String, Vec<String>> {
    let model = &policy.spec.model_ref.name;
    let mut map: BTreeMap<String, Vec<String>> =
        RoutingTable::from_policy(policy).tiers().into_iter().map(|t| (t, Vec::new())).collect();
    for slice in slices.into_iter().filter(|s| s.model == *model) {
        map.entry(slice.tier.clone()).or_default().extend(slice.endpoints.iter().cloned());
    }
    for endpoints in map.values_mut() {
        endpoints.sort();
        endpoints.dedup();
    }
    map
}

/// The source's view of the cluster, fed watch events; pure (no client), so it is tested event by event.
pub struct SourceState {
    namespace: String,
    policy_name: String,
    metrics: Arc<Metrics>,
    policy: Option<PrecisionPolicy>,
    policy_listed: bool,
    /// Usable slices by name.
    slices: BTreeMap<String, SliceEndpoints>,
    slices_listed: bool,
    /// Slices being relisted (between `Init` and `InitDone`).
    relist: Option<BTreeMap<String, SliceEndpoints>>,
}

impl SourceState {
    pub fn new(namespace: &str, policy_name: &str, metrics: Arc<Metrics>) -> Self {
        SourceState {
            namespace: namespace.to_owned(),
            policy_name: policy_name.to_owned(),
            metrics,
            policy: None,
            policy_listed: false,
            slices: BTreeMap::new(),
            slices_listed: false,
            relist: None,
        }
    }

    fn problem(&self, object: &str, reason: &str) {
        self.metrics.source_problems.inc(&[object, reason]);
    }

    /// Applies a PrecisionPolicy watch event.
    pub fn policy_event(&mut self, event: Event<PrecisionPolicy>) {
        match event {
            Event::Init => {}
            Event::InitApply(p) | Event::Apply(p) => {
                if p.name_any() == self.policy_name {
                    self.policy = Some(p);
                }
            }
            Event::InitDone => {
                self.policy_listed = true;
                if self.policy.is_none() {
                    self.problem("precisionpolicy", "missing");
                    tracing::warn!(namespace = %self.namespace, policy = %self.policy_name,
                        "the PrecisionPolicy does not exist (yet); waiting for it");
                }
            }
            Event::Delete(p) => {
                if p.name_any() == self.policy_name {
                    self.problem("precisionpolicy", "deleted");
                    tracing::warn!(namespace = %self.namespace, policy = %self.policy_name,
                        "the PrecisionPolicy was deleted; the router keeps its last routes until it is back");
                }
            }
        }
    }

    fn parse(&self, slice: &EndpointSlice) -> Option<SliceEndpoints> {
        match parse_slice(slice) {
            Ok(s) => Some(s),
            Err(problem) => {
                self.problem("endpointslice", problem.reason());
                tracing::warn!(namespace = %self.namespace, slice = %slice.name_any(), %problem,
                    "ignoring an EndpointSlice of a node Service");
                None
            }
        }
    }

    /// Applies an EndpointSlice watch event.
    pub fn slice_event(&mut self, event: Event<EndpointSlice>) {
        match event {
            Event::Init => self.relist = Some(BTreeMap::new()),
            Event::InitApply(slice) => {
                let parsed = self.parse(&slice);
                if let (Some(relist), Some(parsed)) = (self.relist.as_mut(), parsed) {
                    relist.insert(slice.name_any(), parsed);
                }
            }
            Event::InitDone => {
                if let Some(relist) = self.relist.take() {
                    self.slices = relist;
                }
                self.slices_listed = true;
            }
            Event::Apply(slice) => match self.parse(&slice) {
                Some(parsed) => {
                    self.slices.insert(slice.name_any(), parsed);
                }
                None => {
                    // A slice that became unusable no longer contributes endpoints.
                    self.slices.remove(&slice.name_any());
                }
            },
            Event::Delete(slice) => {
                self.slices.remove(&slice.name_any());
            }
        }
    }

    /// Records a watch error (the watcher retries with backoff).
    pub fn watch_error(&self, object: &str, error: &watcher::Error) {
        self.problem(object, "watch_error");
        tracing::warn!(namespace = %self.namespace, object, %error, "watch failed; retrying");
    }

    /// What to serve, once the policy is known and the slices were listed.
    pub fn snapshot(&self) -> Option<Snapshot> {
        let policy = self.policy.as_ref()?;
        if !self.slices_listed {
            return None;
        }
        Some(Snapshot { policy: policy.clone(), endpoints: endpoints_for(policy, self.slices.values()) })
    }

    pub fn policy_listed(&self) -> bool {
        self.policy_listed
    }
}

enum Update {
    Policy(Box<Result<Event<PrecisionPolicy>, watcher::Error>>),
    Slice(Box<Result<Event<EndpointSlice>, watcher::Error>>),
}

/// Starts watching `policy_name` and the node EndpointSlices in `namespace`. The receiver holds the latest
/// [`Snapshot`] (None until the policy exists and the slices were listed); the task runs until the receiver
/// is dropped.
pub fn watch(
    client: Client,
    namespace: &str,
    policy_name: &str,
    metrics: Arc<Metrics>,
) -> watch::Receiver<Option<Arc<Snapshot>>> {
    let policies: Api<PrecisionPolicy> = Api::namespaced(client.clone(), namespace);
    let slices: Api<EndpointSlice> = Api::namespaced(client, namespace);
    let policy_events =
        watcher::watcher(policies, watcher::Config::default().fields(&format!("metadata.name={policy_name}")))
            .default_backoff()
            .map(|e| Update::Policy(Box::new(e)))
            .boxed();
    let slice_events = watcher::watcher(slices, watcher::Config::default().labels(&slice_selector()))
        .default_backoff()
        .map(|e| Update::Slice(Box::new(e)))
        .boxed();
    let mut state = SourceState::new(namespace, policy_name, metrics);
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut events = futures::stream::select(policy_events, slice_events);
        while let Some(update) = events.next().await {
            match update {
                Update::Policy(e) => match *e {
                    Ok(e) => state.policy_event(e),
                    Err(e) => state.watch_error("precisionpolicy", &e),
                },
                Update::Slice(e) => match *e {
                    Ok(e) => state.slice_event(e),
                    Err(e) => state.watch_error("endpointslice", &e),
                },
            }
            if let Some(next) = state.snapshot() {
                let changed = tx.borrow().as_deref() != Some(&next);
                if changed && tx.send(Some(Arc::new(next))).is_err() {
                    return;
                }
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

/// Waits for the first snapshot, logging what it waits for now and then.
pub async fn first_snapshot(
    rx: &mut watch::Receiver<Option<Arc<Snapshot>>>,
    what: &str,
) -> Result<Arc<Snapshot>, watch::error::RecvError> {
    let mut waited = 0u64;
    loop {
        if let Some(s) = rx.borrow_and_update().clone() {
            return Ok(s);
        }
        match tokio::time::timeout(std::time::Duration::from_secs(10), rx.changed()).await {
            Ok(r) => r?,
            Err(_) => {
                waited += 10;
                tracing::info!("waiting for {what} ({waited} s so far)");
            }
        }
    }
}

fn route_summary(table: &RoutingTable) -> String {
    table
        .routes
        .values()
        .map(|r| match &r.candidate_tier {
            Some(c) => format!(
                "{}->{} (candidate {c}: live {}%, shadow {}%)",
                r.task_class, r.tier, r.candidate_live_percent, r.shadow_percent
            ),
            None => format!("{}->{}", r.task_class, r.tier),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What of a policy the router applies: its spec (classifier, default tier) and the routes it derives. Status
/// writes that change neither (canary evidence, conditions) are not re-applied.
fn routing_of(policy: &PrecisionPolicy) -> (&quantfleet_api::PrecisionPolicySpec, BTreeMap<TaskClass, EffectiveRoute>) {
    (&policy.spec, RoutingTable::from_policy(policy).routes)
}

/// Applies every new snapshot to `router` (endpoints first, so a tier the new policy routes to is known
/// before traffic goes there). `applied` is the snapshot the router was built from. Runs until the source
/// stops.
pub async fn follow(router: Arc<Router>, mut rx: watch::Receiver<Option<Arc<Snapshot>>>, applied: Arc<Snapshot>) {
    let mut applied = applied;
    while rx.changed().await.is_ok() {
        let Some(next) = rx.borrow_and_update().clone() else { continue };
        if next.endpoints != applied.endpoints {
            let change = router.set_endpoints(&next.endpoints);
            router.metrics.source_updates.inc(&["endpoints"]);
            tracing::info!(added = ?change.added, removed = ?change.removed, "node endpoints updated");
        }
        if routing_of(&next.policy) != routing_of(&applied.policy) {
            router.set_policy(&next.policy);
            router.metrics.source_updates.inc(&["policy"]);
            tracing::info!(
                policy = %next.policy.name_any(),
                resource_version = next.policy.resource_version().unwrap_or_default(),
                routes = %route_summary(&router.table()),
                "policy applied"
            );
        }
        applied = next;
    }
}

/// The HTTP application of a router that starts before its policy is known: until `slot` holds the router's
/// own application, `/health` answers 503 (so the pod is not ready), `/metrics` serves the source's counters,
/// and API requests get a 503 in OpenAI's error format naming what the router waits for; then every request
/// goes to the router's application.
pub fn app_when_ready(slot: Arc<OnceLock<axum::Router>>, metrics: Arc<Metrics>, waiting_for: String) -> axum::Router {
    axum::Router::new().fallback(move |request: axum::extract::Request| {
        let (slot, metrics, waiting_for) = (slot.clone(), metrics.clone(), waiting_for.clone());
        async move {
            if let Some(app) = slot.get() {
                return app.clone().oneshot(request).await.unwrap_or_else(|never| match never {});
            }
            match request.uri().path() {
                "/metrics" => ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics.render())
                    .into_response(),
                "/health" => (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    axum::Json(serde_json::json!({"status": "waiting", "waitingFor": waiting_for})),
                )
                    .into_response(),
                _ => {
                    ApiError::unavailable(format!("the router is starting: waiting for {waiting_for}")).into_response()
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use kube::api::ObjectMeta;
    use quantfleet_api::{CanaryPhase, CanaryStatus, PrecisionPolicyStatus};

    const SAMPLE: &str = include_str!("../../../deploy/samples/smollm2-135m.precisionpolicy.yaml");

    fn policy() -> PrecisionPolicy {
        let mut p: PrecisionPolicy = serde_yaml::from_str(SAMPLE).unwrap();
        p.metadata.namespace = Some("models".into());
        p
    }

    fn slice(name: &str, tier: Option<&str>, port: Option<(&str, i32)>, eps: &[(&str, Option<bool>)]) -> EndpointSlice {
        let mut labels = BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), NODE_APP_NAME.to_owned()),
            (MODEL_LABEL.to_owned(), "smollm2-135m".to_owned()),
        ]);
        if let Some(t) = tier {
            labels.insert(TIER_LABEL.to_owned(), t.to_owned());
        }
        EndpointSlice {
            metadata: ObjectMeta { name: Some(name.into()), labels: Some(labels), ..ObjectMeta::default() },
            address_type: "IPv4".into(),
            ports: port.map(|(n, p)| vec![EndpointPort { name: Some(n.into()), port: Some(p), ..Default::default() }]),
            endpoints: eps
                .iter()
                .map(|(a, ready)| Endpoint {
                    addresses: vec![(*a).to_owned()],
                    conditions: Some(EndpointConditions { ready: *ready, ..Default::default() }),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn slices_give_ready_endpoints_on_the_grpc_port() {
        let s = slice(
            "a",
            Some("fp8"),
            Some(("grpc", 50051)),
            &[("10.0.0.2", Some(true)), ("10.0.0.1", None), ("10.0.0.3", Some(false))],
        );
        assert_eq!(
            parse_slice(&s).unwrap(),
            SliceEndpoints {
                model: "smollm2-135m".into(),
                tier: "fp8".into(),
                endpoints: vec!["10.0.0.1:50051".into(), "10.0.0.2:50051".into()],
            },
            "unknown readiness counts as ready, not-ready (terminating) endpoints are left out"
        );
        let mut v6 = s.clone();
        v6.address_type = "IPv6".into();
        v6.endpoints[0].addresses = vec!["fd00::2".into()];
        assert_eq!(parse_slice(&v6).unwrap().endpoints[1], "[fd00::2]:50051");
        assert_eq!(parse_slice(&slice("b", None, Some(("grpc", 1)), &[])), Err(SliceProblem::NoTierLabel));
        assert_eq!(parse_slice(&slice("c", Some("fp8"), Some(("metrics", 9090)), &[])), Err(SliceProblem::NoGrpcPort));
        assert_eq!(parse_slice(&slice("d", Some("fp8"), None, &[])), Err(SliceProblem::NoGrpcPort));
    }

    #[test]
    fn every_policy_tier_is_listed_and_other_models_are_ignored() {
        let p = policy();
        let mine = parse_slice(&slice("a", Some("fp8"), Some(("grpc", 1)), &[("10.0.0.1", None)])).unwrap();
        let second =
            parse_slice(&slice("b", Some("fp8"), Some(("grpc", 1)), &[("10.0.0.1", None), ("10.0.0.9", None)]))
                .unwrap();
        let other_model = SliceEndpoints { model: "other".into(), ..mine.clone() };
        let map = endpoints_for(&p, [&mine, &second, &other_model]);
        assert_eq!(map["fp8"], ["10.0.0.1:1", "10.0.0.9:1"]);
        assert_eq!(map.keys().collect::<Vec<_>>(), ["bf16", "fp8", "fp8-kv8", "int4-awq"]);
        assert!(map["bf16"].is_empty());
    }

    #[test]
    fn only_route_changes_are_reapplied() {
        let p = policy();
        let mut evidence_only = p.clone();
        evidence_only.status = Some(PrecisionPolicyStatus { observed_generation: Some(3), ..Default::default() });
        evidence_only.metadata.resource_version = Some("42".into());
        assert_eq!(routing_of(&p), routing_of(&evidence_only));
        let mut stepped = p.clone();
        stepped.status = Some(PrecisionPolicyStatus {
            canary: Some(CanaryStatus {
                phase: CanaryPhase::Stepping,
                candidate_tier: "int4-awq".into(),
                live_percent: 10,
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_ne!(routing_of(&p), routing_of(&stepped));
        let mut respec = p.clone();
        respec.spec.default_tier = "fp8".into();
        assert_ne!(routing_of(&p), routing_of(&respec));
    }

    #[test]
    fn events_build_snapshots_and_bad_or_missing_objects_are_counted() {
        let metrics = Arc::new(Metrics::default());
        let mut st = SourceState::new("models", "smollm2-135m", metrics.clone());
        st.policy_event(Event::Init);
        st.policy_event(Event::InitDone);
        assert_eq!(metrics.source_problems.get(&["precisionpolicy", "missing"]), 1.0);
        st.slice_event(Event::Init);
        st.slice_event(Event::InitApply(slice("a", Some("fp8"), Some(("grpc", 1)), &[("10.0.0.1", None)])));
        st.slice_event(Event::InitApply(slice("bad", None, Some(("grpc", 1)), &[("10.0.0.5", None)])));
        assert_eq!(st.snapshot(), None, "not listed yet, and no policy");
        st.slice_event(Event::InitDone);
        assert_eq!(st.snapshot(), None, "no policy yet");
        assert_eq!(metrics.source_problems.get(&["endpointslice", "no_tier_label"]), 1.0);
        st.policy_event(Event::Apply(policy()));
        let snap = st.snapshot().unwrap();
        assert_eq!(snap.endpoints["fp8"], ["10.0.0.1:1"]);

        // An endpoint becomes unready, another tier appears, a slice is deleted.
        st.slice_event(Event::Apply(slice("a", Some("fp8"), Some(("grpc", 1)), &[("10.0.0.1", Some(false))])));
        st.slice_event(Event::Apply(slice("b", Some("bf16"), Some(("grpc", 1)), &[("10.0.0.2", Some(true))])));
        let snap = st.snapshot().unwrap();
        assert!(snap.endpoints["fp8"].is_empty());
        assert_eq!(snap.endpoints["bf16"], ["10.0.0.2:1"]);
        st.slice_event(Event::Delete(slice("b", Some("bf16"), None, &[])));
        assert!(st.snapshot().unwrap().endpoints["bf16"].is_empty());
        // A slice that loses its port stops contributing (and is counted).
        st.slice_event(Event::Apply(slice("a", Some("fp8"), None, &[("10.0.0.1", None)])));
        assert!(st.snapshot().unwrap().endpoints["fp8"].is_empty());
        assert_eq!(metrics.source_problems.get(&["endpointslice", "no_grpc_port"]), 1.0);

        // A relist replaces the slices wholesale (a slice deleted while the watch was down disappears).
        st.slice_event(Event::Init);
        st.slice_event(Event::InitApply(slice("c", Some("int4-awq"), Some(("grpc", 2)), &[("10.0.0.3", None)])));
        assert!(st.snapshot().unwrap().endpoints["int4-awq"].is_empty(), "the relist is applied at InitDone");
        st.slice_event(Event::InitDone);
        assert_eq!(st.snapshot().unwrap().endpoints["int4-awq"], ["10.0.0.3:2"]);

        // A canary step in status changes the snapshot's policy; deleting the policy keeps the last one.
        let mut stepped = policy();
        stepped.status = Some(PrecisionPolicyStatus {
            canary: Some(CanaryStatus {
                phase: CanaryPhase::Stepping,
                candidate_tier: "int4-awq".into(),
                live_percent: 50,
                ..Default::default()
            }),
            ..Default::default()
        });
        st.policy_event(Event::Apply(stepped.clone()));
        assert_eq!(st.snapshot().unwrap().policy, stepped);
        st.policy_event(Event::Delete(stepped.clone()));
        assert_eq!(st.snapshot().unwrap().policy, stepped);
        assert_eq!(metrics.source_problems.get(&["precisionpolicy", "deleted"]), 1.0);
        // Another policy's events (a field selector makes this impossible, but it costs nothing to be sure).
        let mut other = policy();
        other.metadata.name = Some("other".into());
        st.policy_event(Event::Apply(other));
        assert_eq!(st.snapshot().unwrap().policy, stepped);
    }
}

//! The router: the OpenAI-compatible HTTP API, routing by task class with ordered fallbacks and retries
//! before the first token, live canary traffic, and shadow mirroring off the client's path.

use crate::backend::{EventStream, Finish, GenerateEvent, GenerateParams, NodeClient, NodeError, Prompt, Token};
use crate::canary::{CanaryStats, PairRecord, ShareSelector};
use crate::classify::{Decision, Features};
use crate::compare::compare;
use crate::config::{Loaded, RoutingTable, ShadowConfig};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::openai::{self, ApiRequest, Limits, Structured, Usage};
use crate::pool::{Lease, Pool};
use crate::structured;
use axum::Router as AxumRouter;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use quantfleet_api::stats::NodeReport;
use quantfleet_api::{EffectiveRoute, PrecisionPolicy, TaskClass};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore, mpsc};

/// Request header forcing the tier (no fallbacks: the request is served there or fails).
pub const TIER_HEADER: &str = "x-quantfleet-tier";
/// Response header: the task class decided.
pub const CLASS_RESPONSE_HEADER: &str = "x-quantfleet-task-class";
/// Response header: what decided it (`header`, `metadata`, `rule[i]:CONDITION`, `default`).
pub const CLASSIFIED_BY_HEADER: &str = "x-quantfleet-classified-by";
/// Response header: the tier that served the request.
pub const SERVED_TIER_HEADER: &str = "x-quantfleet-tier";
/// Response header: how that tier was chosen (`route`, `fallback`, `canary`, `forced`).
pub const ROUTE_HEADER: &str = "x-quantfleet-route";
/// Response header: whether the request was mirrored to the canary candidate (`true` only when it was).
pub const SHADOW_HEADER: &str = "x-quantfleet-shadow";
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Counts a prompt's tokens exactly (the model's tokenizer), when the router has one.
pub type TokenCounter = Arc<dyn Fn(&str) -> usize + Send + Sync>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Route,
    Fallback,
    Canary,
    Forced,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::Route => "route",
            Via::Fallback => "fallback",
            Via::Canary => "canary",
            Via::Forced => "forced",
        }
    }
}

fn class_index(c: TaskClass) -> usize {
    TaskClass::ALL.iter().position(|t| *t == c).expect("a known class")
}

/// Tracks shadow tasks so tests and shutdown can wait for them.
#[derive(Default)]
struct ShadowTracker {
    in_flight: AtomicUsize,
    idle: Notify,
}

struct ShadowGuard(Arc<Router>);

impl Drop for ShadowGuard {
    fn drop(&mut self) {
        if self.0.shadows.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.shadows.idle.notify_waiters();
        }
    }
}

pub struct Router {
    client: Arc<dyn NodeClient>,
    table: RwLock<Arc<RoutingTable>>,
    pool: Pool,
    pub metrics: Arc<Metrics>,
    pub stats: CanaryStats,
    limits: Limits,
    max_body_bytes: usize,
    max_context_tokens: Option<u32>,
    shadow: ShadowConfig,
    live_share: [ShareSelector; 5],
    shadow_share: [ShareSelector; 5],
    shadow_permits: Mutex<BTreeMap<String, Arc<Semaphore>>>,
    counter: Option<TokenCounter>,
    ids: AtomicU64,
    shadows: ShadowTracker,
}

/// A request that reached a node and produced its first event.
struct Started {
    lease: Lease,
    tier: String,
    via: Via,
    first: GenerateEvent,
    stream: EventStream,
    started_at: Instant,
}

/// What the shadow needs from the primary generation.
struct ShadowJob {
    class: TaskClass,
    candidate: String,
    prompt: Prompt,
    max_tokens: u32,
    stop: Vec<String>,
    structured: Option<Structured>,
    incumbent: Vec<Token>,
    incumbent_secs_per_token: f64,
}

/// The primary generation's outcome, accumulated as events arrive.
#[derive(Default)]
struct Collected {
    text: String,
    tokens: Vec<Token>,
    finish: Option<(Finish, Usage)>,
}

impl Collected {
    fn absorb(&mut self, event: GenerateEvent, keep_tokens: bool) -> Option<String> {
        match event {
            GenerateEvent::Chunk { tokens, text } => {
                if keep_tokens {
                    self.tokens.extend(tokens);
                }
                self.text.push_str(&text);
                Some(text)
            }
            GenerateEvent::Done { finish, prompt_tokens, completion_tokens } => {
                self.finish = Some((finish, Usage { prompt_tokens, completion_tokens }));
                None
            }
        }
    }
}

impl Router {
    pub fn new(loaded: &Loaded, client: Arc<dyn NodeClient>, counter: Option<TokenCounter>) -> Arc<Self> {
        Self::with_metrics(loaded, client, counter, Arc::default())
    }

    /// A router exporting into `metrics` (shared with what ran before it, e.g. the Kubernetes source).
    pub fn with_metrics(
        loaded: &Loaded,
        client: Arc<dyn NodeClient>,
        counter: Option<TokenCounter>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let c = &loaded.config;
        Arc::new(Router {
            client,
            table: RwLock::new(Arc::new(loaded.table.clone())),
            pool: Pool::new(&c.endpoints),
            metrics,
            stats: CanaryStats::default(),
            limits: Limits {
                default_max_tokens: c.limits.default_max_tokens,
                max_tokens: c.limits.max_tokens,
                max_prompt_bytes: c.limits.max_prompt_bytes,
            },
            max_body_bytes: c.max_body_bytes,
            max_context_tokens: c.limits.max_context_tokens,
            shadow: c.shadow.clone(),
            live_share: Default::default(),
            shadow_share: Default::default(),
            shadow_permits: Mutex::new(BTreeMap::new()),
            counter,
            ids: AtomicU64::new(0),
            shadows: ShadowTracker::default(),
        })
    }

    pub fn table(&self) -> Arc<RoutingTable> {
        self.table.read().expect("table lock").clone()
    }

    /// Applies a new version of the policy (a canary step, a promotion). Tiers without configured
    /// endpoints are unroutable until the endpoints are.
    pub fn set_policy(&self, policy: &PrecisionPolicy) {
        *self.table.write().expect("table lock") = Arc::new(RoutingTable::from_policy(policy));
    }

    /// Replaces the node endpoints of every tier (an EndpointSlice change). Requests running on a removed
    /// endpoint finish there; new requests only see the new set.
    pub fn set_endpoints(&self, endpoints: &BTreeMap<String, Vec<String>>) -> crate::pool::PoolChange {
        let change = self.pool.set(endpoints);
        for endpoint in &change.removed {
            self.client.forget(endpoint);
        }
        change
    }

    /// The HTTP application.
    pub fn app(self: &Arc<Self>) -> AxumRouter {
        AxumRouter::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/models", get(models))
            .route("/v1/canary/stats", get(canary_stats))
            .route("/metrics", get(metrics))
            .route("/health", get(health))
            .fallback(|uri: Uri| async move { ApiError::not_found(uri.path()) })
            .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
            .layer(axum::extract::DefaultBodyLimit::max(self.max_body_bytes))
            .with_state(self.clone())
    }

    /// Checks every endpoint's health every `interval`, forever (spawn it); see [`Router::check_endpoints`].
    pub async fn health_loop(self: Arc<Self>, interval: Duration) {
        loop {
            self.check_endpoints(interval.max(Duration::from_millis(500))).await;
            tokio::time::sleep(interval).await;
        }
    }

    /// One round of health checks, each within `limit`. A healthy endpoint whose ModelInfo has not been read is
    /// asked for it (once: a new endpoint, or one that was unhealthy and may have restarted with another
    /// configuration); an unhealthy one forgets it.
    pub async fn check_endpoints(&self, limit: Duration) {
        let checks = self.pool.all().into_iter().map(|e| {
            let client = self.client.clone();
            async move {
                let ok = tokio::time::timeout(limit, client.healthy(&e.endpoint)).await.unwrap_or(false);
                e.set_healthy(ok);
                if !ok {
                    e.set_info(None);
                } else if e.info().is_none() {
                    match tokio::time::timeout(limit, client.model_info(&e.endpoint)).await {
                        Ok(Ok(info)) => e.set_info(Some(info)),
                        Ok(Err(err)) => tracing::warn!(endpoint = %e.endpoint, %err, "ModelInfo failed"),
                        Err(_) => tracing::warn!(endpoint = %e.endpoint, "ModelInfo timed out"),
                    }
                }
            }
        });
        futures::future::join_all(checks).await;
    }

    /// What every listed endpoint reported in ModelInfo, by tier and endpoint.
    pub fn node_reports(&self) -> Vec<NodeReport> {
        let namespace = self.table().namespace.clone();
        let mut nodes: Vec<NodeReport> = self
            .pool
            .all()
            .into_iter()
            .filter_map(|e| {
                let info = e.info()?;
                Some(NodeReport {
                    namespace: namespace.clone(),
                    model: info.model,
                    tier: e.tier.clone(),
                    endpoint: e.endpoint.0.clone(),
                    tier_spec: serde_json::from_str(&info.tier_spec_json).unwrap_or(serde_json::Value::Null),
                    backend: info.backend,
                    weights_loaded: info.weights_loaded,
                    tier_applied: info.tier_applied,
                })
            })
            .collect();
        nodes.sort_by(|a, b| (&a.tier, &a.endpoint).cmp(&(&b.tier, &b.endpoint)));
        nodes
    }

    /// Waits until no shadow comparison is running.
    pub async fn shadows_idle(&self) {
        loop {
            let notified = self.shadows.idle.notified();
            if self.shadows.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    fn count_tokens(&self, text: &str) -> usize {
        match &self.counter {
            Some(count) => count(text),
            // Without the model's tokenizer: about four bytes per token for English text and code.
            None => text.len().div_ceil(4),
        }
    }

    fn next_id(&self, prefix: &str) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
        format!("{prefix}-{t:x}{n:04x}")
    }

    /// The tiers to try in order, and whether to mirror to a candidate.
    fn plan(
        &self,
        route: &EffectiveRoute,
        default_tier: &str,
        class: TaskClass,
    ) -> (Vec<(String, Via)>, Option<String>) {
        let mut plan = Vec::new();
        let mut live_candidate = false;
        if let Some(candidate) = &route.candidate_tier
            && route.candidate_live_percent > 0
            && self.live_share[class_index(class)].select(f64::from(route.candidate_live_percent))
        {
            plan.push((candidate.clone(), Via::Canary));
            live_candidate = true;
        }
        for (i, tier) in quantfleet_api::routes::tiers_in_order(route, default_tier).into_iter().enumerate() {
            if !plan.iter().any(|(t, _)| *t == tier) {
                plan.push((tier, if i == 0 { Via::Route } else { Via::Fallback }));
            }
        }
        let mirror = match &route.candidate_tier {
            Some(c) if !live_candidate && route.shadow_percent > 0.0 => {
                self.shadow_share[class_index(class)].select(route.shadow_percent).then(|| c.clone())
            }
            _ => None,
        };
        (plan, mirror)
    }

    /// Tries the plan's tiers and endpoints in order until one produces a first event. Failures before the
    /// first token are retried elsewhere; invalid requests are not.
    async fn start(
        &self,
        plan: &[(String, Via)],
        class: TaskClass,
        params: &GenerateParams,
    ) -> Result<Started, ApiError> {
        let mut tried = Vec::new();
        let mut errors: Vec<NodeError> = Vec::new();
        let started_at = Instant::now();
        for (tier, via) in plan {
            while let Some(lease) = self.pool.pick(tier, &tried) {
                tried.push(lease.endpoint().clone());
                let attempt = async {
                    let mut stream = self.client.generate(lease.endpoint(), params.clone()).await?;
                    match stream.next().await {
                        Some(Ok(first)) => Ok((first, stream)),
                        Some(Err(e)) => Err(e),
                        None => Err(NodeError::Failed("the stream ended before its first message".into())),
                    }
                };
                match attempt.await {
                    Ok((first, stream)) => {
                        let via = if *via == Via::Route && !errors.is_empty() { Via::Fallback } else { *via };
                        self.metrics.routed.inc(&[class.as_str(), tier, via.as_str()]);
                        return Ok(Started { lease, tier: tier.clone(), via, first, stream, started_at });
                    }
                    Err(NodeError::InvalidArgument(msg)) => {
                        return Err(ApiError::invalid(None, msg));
                    }
                    Err(e) => {
                        tracing::warn!(endpoint = %lease.endpoint(), tier = %tier, error = %e, "attempt failed before the first token");
                        self.metrics.retries.inc(&[tier, e.category()]);
                        if matches!(e, NodeError::Unavailable(_)) {
                            lease.state().set_healthy(false);
                        }
                        errors.push(e);
                    }
                }
            }
        }
        let tiers: Vec<&str> = plan.iter().map(|(t, _)| t.as_str()).collect();
        if !errors.is_empty() && errors.iter().all(|e| matches!(e, NodeError::Saturated(_))) {
            return Err(ApiError::saturated(format!("every endpoint of tiers {tiers:?} is saturated; retry later")));
        }
        Err(ApiError::unavailable(match errors.last() {
            Some(e) => {
                format!("no endpoint of tiers {tiers:?} could serve the request ({} attempts, last: {e})", errors.len())
            }
            None => format!("no healthy endpoint in tiers {tiers:?}"),
        }))
    }

    /// Mirrors a finished request to the candidate, unless its shadow slots are full (then it is dropped and
    /// counted). Never awaited by the client's request.
    fn spawn_shadow(self: &Arc<Self>, job: ShadowJob) {
        let class = job.class.as_str();
        let permits = self
            .shadow_permits
            .lock()
            .expect("permits lock")
            .entry(job.candidate.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.shadow.max_in_flight)))
            .clone();
        let Ok(permit) = permits.try_acquire_owned() else {
            self.metrics.shadow_dropped.inc(&[class, &job.candidate]);
            self.stats.record_dropped(job.class, &job.candidate);
            return;
        };
        self.shadows.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = ShadowGuard(self.clone());
        let router = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _guard = guard;
            router.run_shadow(job).await;
        });
    }

    async fn run_shadow(&self, job: ShadowJob) {
        let class = job.class.as_str();
        let fail = |reason: &str| self.metrics.shadow_failed.inc(&[class, &job.candidate, reason]);
        let Some(lease) = self.pool.pick(&job.candidate, &[]) else {
            return fail("no_healthy_endpoint");
        };
        let params = GenerateParams {
            prompt: job.prompt.clone(),
            max_tokens: job.max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: Some(self.shadow.seed),
            stop: job.stop.clone(),
            logprobs: false,
            top_logprobs: 0,
            request_id: self.next_id("shadow"),
        };
        let t0 = Instant::now();
        let mut own = Collected::default();
        let generated: Result<(), NodeError> = async {
            let mut stream = self.client.generate(lease.endpoint(), params).await?;
            while let Some(event) = stream.next().await {
                own.absorb(event?, false);
            }
            Ok(())
        }
        .await;
        let cand_secs = t0.elapsed().as_secs_f64();
        let scored = match generated {
            Ok(()) => {
                let ids = job.incumbent.iter().map(|t| t.id).collect();
                self.client.score(lease.endpoint(), job.prompt.clone(), ids, self.shadow.top_k).await
            }
            Err(e) => Err(e),
        };
        let score = match scored {
            Ok(s) => s,
            Err(NodeError::Saturated(_)) => {
                self.metrics.shadow_dropped.inc(&[class, &job.candidate]);
                self.stats.record_dropped(job.class, &job.candidate);
                return;
            }
            Err(e) => return fail(e.category()),
        };
        let Some((_, usage)) = own.finish else { return fail("incomplete") };
        let comparison = match compare(&job.incumbent, &score) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "shadow pair not comparable");
                return fail("incomparable");
            }
        };
        let cand_secs_per_token = cand_secs / f64::from(usage.completion_tokens.max(1));
        let latency_ratio =
            if job.incumbent_secs_per_token > 0.0 { cand_secs_per_token / job.incumbent_secs_per_token } else { 1.0 };
        let structured_valid = job.structured.as_ref().map(|s| structured::is_valid(s, &own.text));
        self.stats.record(&PairRecord {
            class: job.class,
            candidate: &job.candidate,
            comparison: &comparison,
            structured_valid,
            latency_ratio,
        });
        self.metrics.shadow_pairs.inc(&[class, &job.candidate]);
        if let Some(pos) = comparison.first_divergence {
            self.metrics.shadow_first_divergence.observe(&[class, &job.candidate], pos as f64);
        }
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Response headers describing a routing decision.
fn decision_headers(decision: &Decision, served: Option<(&str, Via)>, mirrored: bool, request_id: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut put = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    put(CLASS_RESPONSE_HEADER, decision.class.as_str());
    put(CLASSIFIED_BY_HEADER, &decision.by.header_value());
    if let Some((tier, via)) = served {
        put(SERVED_TIER_HEADER, tier);
        put(ROUTE_HEADER, via.as_str());
    }
    if mirrored {
        put(SHADOW_HEADER, "true");
    }
    put(REQUEST_ID_HEADER, request_id);
    h
}

fn with_headers(mut response: Response, headers: HeaderMap) -> Response {
    response.headers_mut().extend(headers);
    response
}

async fn chat(State(r): State<Arc<Router>>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    handle(r, openai::Endpoint::Chat, headers, body).await
}

async fn completions(
    State(r): State<Arc<Router>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(r, openai::Endpoint::Completions, headers, body).await
}

async fn models(State(r): State<Arc<Router>>) -> Response {
    axum::Json(openai::models_response(&[r.table().model.clone()], openai::unix_now())).into_response()
}

async fn canary_stats(State(r): State<Arc<Router>>) -> Response {
    let table = r.table();
    let mut report = r.stats.report(&table.namespace, &table.policy_name);
    report.nodes = r.node_reports();
    axum::Json(report).into_response()
}

async fn health(State(r): State<Arc<Router>>) -> Response {
    let table = r.table();
    let down: Vec<String> = table.tiers().into_iter().filter(|t| !r.pool.has_healthy(t)).collect();
    let body = serde_json::json!({"status": if down.is_empty() { "ok" } else { "degraded" }, "tiersWithoutHealthyEndpoints": down});
    // Degraded still serves (fallbacks), so it is a 200: the process is up.
    axum::Json(body).into_response()
}

async fn metrics(State(r): State<Arc<Router>>) -> Response {
    let table = r.table();
    for e in r.pool.all() {
        r.metrics.endpoint_outstanding.set(&[&e.tier, &e.endpoint.0], e.outstanding() as f64);
        r.metrics.endpoint_healthy.set(&[&e.tier, &e.endpoint.0], if e.healthy() { 1.0 } else { 0.0 });
    }
    for p in r.stats.report(&table.namespace, &table.policy_name).policies {
        for c in p.classes {
            let labels = |q: &'static str| {
                [p.policy.clone(), c.task_class.as_str().to_owned(), p.candidate_tier.clone(), q.to_owned()]
            };
            let s = c.sums;
            for (q, v) in [
                ("samples", s.samples as f64),
                ("kl_divergence", s.kl_divergence_sum),
                ("top1_agreement", s.top1_agreement_sum),
                ("log_perplexity_ratio", s.log_perplexity_ratio_sum),
                ("latency_ratio", s.latency_ratio_sum),
                ("structured_samples", s.structured_samples as f64),
                ("structured_invalid", s.structured_invalid as f64),
                ("dropped", c.dropped as f64),
            ] {
                let l = labels(q);
                r.metrics.canary_sums.set(&l.iter().map(String::as_str).collect::<Vec<_>>(), v);
            }
        }
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], r.metrics.render()).into_response()
}

async fn handle(
    router: Arc<Router>,
    endpoint: openai::Endpoint,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let api = match endpoint {
        openai::Endpoint::Chat => "chat",
        openai::Endpoint::Completions => "completions",
    };
    let request_id = header_str(&headers, REQUEST_ID_HEADER)
        .filter(|id| !id.is_empty() && id.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(|| router.next_id("req"));
    let body = match body {
        Ok(b) => b,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            router.metrics.requests.inc(&[api, "none", "none", "invalid"]);
            return ApiError::too_large(router.max_body_bytes).into_response();
        }
        Err(rejection) => {
            router.metrics.requests.inc(&[api, "none", "none", "invalid"]);
            return ApiError::invalid(None, rejection.body_text()).into_response();
        }
    };
    let parsed = match endpoint {
        openai::Endpoint::Chat => openai::parse_chat(&body, &router.limits),
        openai::Endpoint::Completions => openai::parse_completion(&body, &router.limits),
    };
    let req = match parsed {
        Ok(r) => r,
        Err(e) => {
            router.metrics.requests.inc(&[api, "none", "none", "invalid"]);
            return e.into_response();
        }
    };
    let table = router.table();
    if req.model != table.model {
        router.metrics.requests.inc(&[api, "none", "none", "model_not_found"]);
        return ApiError::model_not_found(&req.model).into_response();
    }
    let forced = header_str(&headers, TIER_HEADER).map(str::trim).filter(|t| !t.is_empty());
    if let Some(tier) = forced
        && !router.pool.has_tier(tier)
    {
        router.metrics.requests.inc(&[api, "none", "none", "invalid"]);
        let known: Vec<String> = router
            .pool
            .all()
            .iter()
            .map(|e| e.tier.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        return ApiError::invalid(
            Some(TIER_HEADER.to_owned()),
            format!("unknown tier {tier:?}; the router serves {known:?}"),
        )
        .with_code("invalid_tier")
        .into_response();
    }
    let decision = match decide(&router, &table, &headers, &req, api, &request_id) {
        Ok(d) => d,
        Err(response) => return *response,
    };
    let class = decision.class;

    let (plan, mirror) = match forced {
        Some(tier) => (vec![(tier.to_owned(), Via::Forced)], None),
        None => router.plan(table.route(class), &table.default_tier, class),
    };
    if let Some(candidate) = &mirror {
        router.metrics.shadow_mirrored.inc(&[class.as_str(), candidate]);
    }
    let params = GenerateParams {
        prompt: req.prompt.clone(),
        max_tokens: req.max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        stop: req.stop.clone(),
        logprobs: mirror.is_some(),
        top_logprobs: if mirror.is_some() { router.shadow.top_k } else { 0 },
        request_id: request_id.clone(),
    };
    let started = match router.start(&plan, class, &params).await {
        Ok(s) => s,
        Err(e) => {
            let outcome = if e.status.is_client_error() && e.status != StatusCode::TOO_MANY_REQUESTS {
                "invalid"
            } else {
                "unavailable"
            };
            router.metrics.requests.inc(&[api, class.as_str(), "none", outcome]);
            return with_headers(e.into_response(), decision_headers(&decision, None, false, &request_id));
        }
    };
    let first_token_secs = started.started_at.elapsed().as_secs_f64();
    router.metrics.first_token_seconds.observe(&[&started.tier], first_token_secs);
    let headers = decision_headers(&decision, Some((&started.tier, started.via)), mirror.is_some(), &request_id);
    let ctx = Completion {
        router: router.clone(),
        api,
        class,
        mirror,
        req,
        id: router.next_id(match endpoint {
            openai::Endpoint::Chat => "chatcmpl",
            openai::Endpoint::Completions => "cmpl",
        }),
    };
    if ctx.req.stream {
        with_headers(ctx.stream(started).into_response(), headers)
    } else {
        with_headers(ctx.whole(started).await, headers)
    }
}

/// Classifies the request and checks its length against the context (when the router counts tokens
/// exactly). Synchronous: the token count is memoised in a cell that must not live across an await.
fn decide(
    router: &Router,
    table: &RoutingTable,
    headers: &HeaderMap,
    req: &ApiRequest,
    api: &'static str,
    request_id: &str,
) -> Result<Decision, Box<Response>> {
    let exact_tokens = std::cell::OnceCell::new();
    let count = || *exact_tokens.get_or_init(|| router.count_tokens(&req.prompt_text));
    let decision = table.classifier.classify(&Features {
        header: header_str(headers, &table.classifier.header),
        metadata_class: req.metadata_class.as_deref(),
        structured: req.structured.is_some(),
        text: &req.classify_text,
        prompt_tokens: &count,
    });
    let decision = match decision {
        Ok(d) => d,
        Err(e) => {
            router.metrics.requests.inc(&[api, "none", "none", "invalid"]);
            return Err(Box::new(e.into_response()));
        }
    };
    router.metrics.classifications.inc(&[decision.class.as_str(), decision.by.label()]);
    if let (Some(_), Some(limit)) = (&router.counter, router.max_context_tokens) {
        let tokens = count();
        if tokens + req.max_tokens as usize > limit as usize {
            router.metrics.requests.inc(&[api, decision.class.as_str(), "none", "invalid"]);
            let e = ApiError::invalid(
                Some("messages".to_owned()),
                format!(
                    "This model's maximum context length is {limit} tokens; the prompt has {tokens} and max_tokens is {}.",
                    req.max_tokens
                ),
            )
            .with_code("context_length_exceeded");
            return Err(Box::new(with_headers(
                e.into_response(),
                decision_headers(&decision, None, false, request_id),
            )));
        }
    }

    Ok(decision)
}

/// A started request and what finishing it needs.
struct Completion {
    router: Arc<Router>,
    api: &'static str,
    class: TaskClass,
    mirror: Option<String>,
    req: ApiRequest,
    id: String,
}

impl Completion {
    /// Bookkeeping when the generation ends: metrics, then the shadow mirror (never awaited).
    fn finish(&self, tier: &str, started_at: Instant, collected: Collected, outcome: Result<(), &NodeError>) {
        let m = &self.router.metrics;
        let outcome_label = match outcome {
            Ok(()) => "ok",
            Err(e) => e.category(),
        };
        m.requests.inc(&[self.api, self.class.as_str(), tier, outcome_label]);
        let elapsed = started_at.elapsed().as_secs_f64();
        m.request_seconds.observe(&[tier], elapsed);
        if let (Ok(()), Some(candidate), Some((_, usage))) = (outcome, &self.mirror, collected.finish) {
            if collected.tokens.is_empty() {
                m.shadow_failed.inc(&[self.class.as_str(), candidate, "empty"]);
                return;
            }
            self.router.spawn_shadow(ShadowJob {
                class: self.class,
                candidate: candidate.clone(),
                prompt: self.req.prompt.clone(),
                max_tokens: self.req.max_tokens,
                stop: self.req.stop.clone(),
                structured: self.req.structured.clone(),
                incumbent: collected.tokens,
                incumbent_secs_per_token: elapsed / f64::from(usage.completion_tokens.max(1)),
            });
        }
    }

    async fn whole(self, s: Started) -> Response {
        let Started { lease, tier, first, mut stream, started_at, .. } = s;
        let keep = self.mirror.is_some();
        let mut collected = Collected::default();
        collected.absorb(first, keep);
        let mut failure = None;
        while collected.finish.is_none() {
            match stream.next().await {
                Some(Ok(event)) => {
                    collected.absorb(event, keep);
                }
                Some(Err(e)) => {
                    failure = Some(e);
                    break;
                }
                None => {
                    failure = Some(NodeError::Failed("the stream ended without a summary".into()));
                    break;
                }
            }
        }
        drop(stream);
        drop(lease);
        if let Some(e) = failure {
            self.finish(&tier, started_at, collected, Err(&e));
            return mid_stream_error(&e).into_response();
        }
        let (finish, usage) = collected.finish.expect("finished");
        let body = openai::full_response(
            self.req.endpoint,
            &self.id,
            &self.router.table().model,
            openai::unix_now(),
            &collected.text,
            finish.as_str(),
            usage,
        );
        let response = axum::Json(body).into_response();
        self.finish(&tier, started_at, collected, Ok(()));
        response
    }

    fn stream(self, s: Started) -> impl IntoResponse {
        let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
        tokio::spawn(async move {
            let Started { lease, tier, first, mut stream, started_at, .. } = s;
            let model = self.router.table().model.clone();
            let created = openai::unix_now();
            let ep = self.req.endpoint;
            let keep = self.mirror.is_some();
            let send = |v: serde_json::Value| Event::default().data(v.to_string());
            let mut collected = Collected::default();
            let mut failure = None;
            let mut client_gone = false;
            if ep == openai::Endpoint::Chat {
                client_gone |= tx
                    .send(Ok(send(openai::stream_chunk(ep, &self.id, &model, created, None, true, None))))
                    .await
                    .is_err();
            }
            let mut next = Some(first);
            while !client_gone && collected.finish.is_none() {
                let event = match next.take() {
                    Some(e) => e,
                    None => match stream.next().await {
                        Some(Ok(e)) => e,
                        Some(Err(e)) => {
                            failure = Some(e);
                            break;
                        }
                        None => {
                            failure = Some(NodeError::Failed("the stream ended without a summary".into()));
                            break;
                        }
                    },
                };
                if let Some(text) = collected.absorb(event, keep)
                    && !text.is_empty()
                {
                    let chunk = openai::stream_chunk(ep, &self.id, &model, created, Some(&text), false, None);
                    client_gone |= tx.send(Ok(send(chunk))).await.is_err();
                }
            }
            // Stop the node's work at once when the client went away.
            drop(stream);
            drop(lease);
            if client_gone {
                self.router.metrics.requests.inc(&[self.api, self.class.as_str(), &tier, "client_cancelled"]);
                return;
            }
            if let Some(e) = failure {
                let _ = tx.send(Ok(Event::default().data(mid_stream_error(&e).body_json()))).await;
                self.finish(&tier, started_at, collected, Err(&e));
                return;
            }
            let (finish, usage) = collected.finish.expect("finished");
            let _ = tx
                .send(Ok(send(openai::stream_chunk(ep, &self.id, &model, created, None, false, Some(finish.as_str())))))
                .await;
            if self.req.include_usage {
                let _ = tx.send(Ok(send(openai::usage_chunk(ep, &self.id, &model, created, usage)))).await;
            }
            let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
            drop(tx);
            self.finish(&tier, started_at, collected, Ok(()));
        });
        let mut rx = rx;
        Sse::new(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}

/// A node failure after the first token: nothing can be retried any more.
fn mid_stream_error(e: &NodeError) -> ApiError {
    ApiError {
        status: StatusCode::BAD_GATEWAY,
        message: format!("the inference node failed mid-generation: {e}"),
        kind: "server_error",
        param: None,
        code: Some("node_failed"),
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;

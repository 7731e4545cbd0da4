//! Router behaviour against the scripted fake node (synthetic distributions; the real-node tests are in
//! tests/fleet.rs).

use super::*;
use crate::config::RouterConfig;
use crate::fake::{Behaviour, FakeNode};
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use quantfleet_api::{CanaryPhase, CanaryStatus, PrecisionPolicyStatus};
use serde_json::{Value, json};
use tower::ServiceExt;

const SAMPLE: &str = include_str!("../../../deploy/samples/smollm2-135m.precisionpolicy.yaml");

fn serve() -> Behaviour {
    Behaviour::Serve { flip_every: None, answer: None }
}

fn policy(phase: Option<(CanaryPhase, i32)>) -> PrecisionPolicy {
    let mut p: PrecisionPolicy = serde_yaml::from_str(SAMPLE).unwrap();
    if let Some((phase, live)) = phase {
        p.status = Some(PrecisionPolicyStatus {
            canary: Some(CanaryStatus {
                phase,
                candidate_tier: "int4-awq".into(),
                live_percent: live,
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    p
}

fn router(node: Arc<FakeNode>, phase: Option<(CanaryPhase, i32)>, edit: impl FnOnce(&mut RouterConfig)) -> Arc<Router> {
    let mut c: RouterConfig =
        serde_yaml::from_str("endpoints: {bf16: ['b:1'], fp8: ['f:1', 'f:2'], fp8-kv8: ['k:1'], int4-awq: ['i:1']}")
            .unwrap();
    c.policy = Some(policy(phase));
    edit(&mut c);
    Router::new(&c.check().unwrap(), node, None)
}

fn all_serving() -> Arc<FakeNode> {
    Arc::new(FakeNode::new(&[("b:1", serve()), ("f:1", serve()), ("f:2", serve()), ("k:1", serve()), ("i:1", serve())]))
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
    }
}

async fn call(r: &Arc<Router>, method: &str, path: &str, headers: &[(&str, &str)], body: impl Into<Body>) -> Reply {
    let mut req = Request::builder().method(method).uri(path).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let response = r.app().oneshot(req.body(body.into()).unwrap()).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    Reply { status, headers, body }
}

fn chat_body(content: &str, extra: Value) -> String {
    let mut v = json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": content}], "max_tokens": 4});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v.to_string()
}

async fn chat(r: &Arc<Router>, content: &str, extra: Value, headers: &[(&str, &str)]) -> Reply {
    call(r, "POST", "/v1/chat/completions", headers, chat_body(content, extra)).await
}

#[tokio::test]
async fn each_class_lands_on_its_tier_with_the_decision_in_headers() {
    let r = router(all_serving(), None, |_| {});
    let tools = json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]});
    let cases = [
        ("Tell me about Paris.", json!({}), "chat", "int4-awq", "default"),
        ("```python\nprint(1)\n```", json!({}), "code", "fp8", "rule[1]:code-markers"),
        ("What is 12 * 7?", json!({}), "math", "bf16", "rule[2]:math-markers"),
        ("Call f.", tools, "agent", "fp8", "rule[0]:tools-or-json-schema"),
        (&"word ".repeat(2000), json!({}), "long-context", "fp8-kv8", "rule[3]:prompt-tokens-over"),
    ];
    for (content, extra, class, tier, by) in cases {
        let reply = chat(&r, content, extra, &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(
            (
                reply.header("x-quantfleet-task-class"),
                reply.header("x-quantfleet-tier"),
                reply.header("x-quantfleet-classified-by")
            ),
            (class, tier, by)
        );
        assert_eq!(reply.header("x-quantfleet-route"), "route");
        let v = reply.json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["usage"]["completion_tokens"], 4);
        assert_eq!(v["choices"][0]["finish_reason"], "length");
    }
    let reply = chat(&r, "Tell me about Paris.", json!({}), &[("x-quantfleet-task-class", "math")]).await;
    assert_eq!((reply.header("x-quantfleet-tier"), reply.header("x-quantfleet-classified-by")), ("bf16", "header"));
    let metrics = call(&r, "GET", "/metrics", &[], Body::empty()).await.body;
    assert!(
        metrics.contains("quantfleet_router_classifications_total{task_class=\"code\",decided_by=\"code-markers\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "quantfleet_router_requests_total{api=\"chat\",task_class=\"math\",tier=\"bf16\",outcome=\"ok\"} 2"
        )
    );
}

#[tokio::test]
async fn fallback_when_a_tiers_endpoints_fail_before_the_first_token() {
    let node = all_serving();
    node.set("f:1", Behaviour::Unavailable);
    node.set("f:2", Behaviour::Saturated);
    let r = router(node.clone(), None, |_| {});
    let reply = chat(&r, "```rust\nfn main() {}\n```", json!({}), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!((reply.header("x-quantfleet-tier"), reply.header("x-quantfleet-route")), ("bf16", "fallback"));
    let tried: Vec<String> = node.calls("generate").iter().map(|c| c.endpoint.clone()).collect();
    assert_eq!(tried.len(), 3, "both fp8 endpoints, then bf16: {tried:?}");
    assert_eq!(tried[2], "b:1");
    // The unavailable endpoint is out of rotation now; the saturated one is not.
    let reply = chat(&r, "```rust\nfn main() {}\n```", json!({}), &[]).await;
    assert_eq!(reply.header("x-quantfleet-tier"), "bf16");
    let tried: Vec<String> = node.calls("generate").iter().map(|c| c.endpoint.clone()).collect();
    assert_eq!(&tried[3..], ["f:2", "b:1"]);

    // Nothing left anywhere: a 503 in OpenAI's format; everything saturated: a 429.
    for e in ["b:1", "f:2", "k:1", "i:1"] {
        node.set(e, Behaviour::Unavailable);
    }
    let reply = chat(&r, "```rust\nfn main() {}\n```", json!({}), &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["error"]["type"], "server_error");
    let node = all_serving();
    for e in ["b:1", "f:1", "f:2"] {
        node.set(e, Behaviour::Saturated);
    }
    let r = router(node, None, |_| {});
    let reply = chat(&r, "```rust\nfn main() {}\n```", json!({}), &[]).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.body);
}

#[tokio::test]
async fn invalid_arguments_are_not_retried_and_failures_after_the_first_token_are_not_either() {
    let node = all_serving();
    node.set("b:1", Behaviour::Invalid("max_tokens 9000 exceeds the context".into()));
    let r = router(node.clone(), None, |_| {});
    let reply = chat(&r, "What is 2 + 2?", json!({}), &[]).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.json()["error"]["message"].as_str().unwrap().contains("exceeds the context"));
    assert_eq!(node.calls("generate").len(), 1, "bf16's fallback fp8 was not tried");

    node.set("b:1", Behaviour::FailAfter(2));
    let reply = chat(&r, "What is 2 + 2?", json!({}), &[]).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(node.calls("generate").len(), 2, "no retry after tokens were produced");
    let reply = chat(&r, "What is 2 + 2?", json!({"stream": true}), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.body.contains("\"node_failed\""), "{}", reply.body);
    assert!(!reply.body.contains("[DONE]"));
}

#[tokio::test]
async fn forced_tier_header() {
    let node = all_serving();
    let r = router(node.clone(), None, |_| {});
    let reply = chat(&r, "Tell me about Paris.", json!({}), &[("x-quantfleet-tier", "bf16")]).await;
    assert_eq!((reply.header("x-quantfleet-tier"), reply.header("x-quantfleet-route")), ("bf16", "forced"));
    let reply = chat(&r, "Tell me about Paris.", json!({}), &[("x-quantfleet-tier", "fp4")]).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["error"]["param"], "x-quantfleet-tier");
    node.set("b:1", Behaviour::Unavailable);
    let reply = chat(&r, "Tell me about Paris.", json!({}), &[("x-quantfleet-tier", "bf16")]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "a forced tier has no fallbacks");
}

#[tokio::test]
async fn streaming_sends_role_deltas_finish_usage_and_done() {
    let r = router(all_serving(), None, |_| {});
    let reply = chat(&r, "Hi", json!({"stream": true, "stream_options": {"include_usage": true}}), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.header("content-type").starts_with("text/event-stream"));
    let events: Vec<&str> = reply.body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    let whole = chat(&r, "Hi", json!({}), &[]).await.json();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap(),
        "streamed text equals the whole response"
    );
    assert_eq!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[chunks.len() - 1]["usage"]["completion_tokens"], 4);

    let reply = call(
        &r,
        "POST",
        "/v1/completions",
        &[],
        json!({"model": "smollm2-135m", "prompt": "Once", "max_tokens": 3, "stream": true}).to_string(),
    )
    .await;
    let first: Value =
        serde_json::from_str(reply.body.lines().find_map(|l| l.strip_prefix("data: ")).unwrap()).unwrap();
    assert_eq!(first["object"], "text_completion");
}

#[tokio::test]
async fn bad_input_gets_openai_errors() {
    let r = router(all_serving(), None, |c| c.max_body_bytes = 2048);
    let reply = call(&r, "POST", "/v1/chat/completions", &[], "{not json").await;
    assert_eq!((reply.status, reply.json()["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_json")));
    let reply = call(
        &r,
        "POST",
        "/v1/chat/completions",
        &[],
        json!({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}).to_string(),
    )
    .await;
    assert_eq!(
        (reply.status, reply.json()["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("model_not_found"))
    );
    let reply = chat(&r, &"x".repeat(4096), json!({}), &[]).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.json()["error"]["type"], "invalid_request_error");
    let reply = chat(&r, "x", json!({"temperature": -1}), &[]).await;
    assert_eq!((reply.status, reply.json()["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("temperature")));
    let reply = chat(&r, "x", json!({}), &[("x-quantfleet-task-class", "poetry")]).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let reply = call(&r, "GET", "/v1/nothing", &[], Body::empty()).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(reply.json()["error"]["message"].is_string());
    let reply = call(&r, "GET", "/v1/chat/completions", &[], Body::empty()).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    let models = call(&r, "GET", "/v1/models", &[], Body::empty()).await.json();
    assert_eq!(models["data"][0]["id"], "smollm2-135m");
}

#[tokio::test]
async fn shadow_pairs_at_the_configured_share_without_changing_responses() {
    let node = all_serving();
    node.set("i:1", Behaviour::Serve { flip_every: Some(2), answer: None });
    let shadowing = router(node.clone(), Some((CanaryPhase::Shadowing, 0)), |_| {});
    let plain = router(all_serving(), None, |_| {});
    let code = "```python\nprint(1)\n```";
    for i in 0..20 {
        let content = format!("{code}\n# {i}");
        let a = chat(&shadowing, &content, json!({"temperature": 0}), &[]).await;
        let b = chat(&plain, &content, json!({"temperature": 0}), &[]).await;
        assert_eq!(a.header("x-quantfleet-tier"), "fp8");
        assert_eq!(a.json()["choices"], b.json()["choices"], "mirroring never changes the response");
        assert_eq!(a.header("x-quantfleet-shadow") == "true", i % 10 == 9, "every tenth code request is mirrored");
        shadowing.shadows_idle().await;
    }
    // Chat is not in the canary's scope.
    chat(&shadowing, "Hello", json!({}), &[]).await;
    shadowing.shadows_idle().await;
    let candidate_calls = node.calls("generate").iter().filter(|c| c.endpoint == "i:1").count();
    assert_eq!(candidate_calls, 3, "two mirrors plus the chat request itself (chat routes to int4-awq)");
    let shadow_call = node
        .calls("generate")
        .into_iter()
        .find(|c| c.params.as_ref().unwrap().request_id.starts_with("shadow"))
        .unwrap();
    let p = shadow_call.params.unwrap();
    assert_eq!((p.temperature, p.seed), (0.0, Some(0x5eed)), "mirrors decode deterministically");

    let stats = call(&shadowing, "GET", "/v1/canary/stats", &[], Body::empty()).await.json();
    let report: quantfleet_api::stats::CanaryStatsReport = serde_json::from_value(stats).unwrap();
    let p = &report.policies[0];
    assert_eq!((p.policy.as_str(), p.candidate_tier.as_str()), ("smollm2-135m", "int4-awq"));
    let code = &p.classes[0];
    assert_eq!((code.task_class, code.sums.samples, code.dropped), (TaskClass::Code, 2, 0));
    // The candidate swaps its top two tokens at every second position: agreement 1/2, divergence at 1.
    assert_eq!(code.sums.top1_agreement(), Some(0.5));
    assert!(code.sums.mean_kl_divergence().unwrap() > 0.1);
    assert!(code.sums.perplexity_ratio().unwrap() > 1.5);
    let metrics = call(&shadowing, "GET", "/metrics", &[], Body::empty()).await.body;
    assert!(
        metrics.contains("quantfleet_router_shadow_pairs_total{task_class=\"code\",candidate=\"int4-awq\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("quantfleet_router_shadow_first_divergence_position_bucket{task_class=\"code\",candidate=\"int4-awq\",le=\"1\"} 2"));
    assert!(metrics.contains("quantfleet_router_canary_sum{policy=\"smollm2-135m\",task_class=\"code\",candidate=\"int4-awq\",quantity=\"samples\"} 2"));
}

#[tokio::test]
async fn a_saturated_candidate_drops_mirrors_and_counts_them() {
    let node = all_serving();
    node.set("i:1", Behaviour::Saturated);
    let r = router(node.clone(), Some((CanaryPhase::Shadowing, 0)), |c| {
        c.policy.as_mut().unwrap().spec.canary.as_mut().unwrap().shadow_percent = 100.0
    });
    for _ in 0..3 {
        assert_eq!(chat(&r, "```\nls\n```", json!({}), &[]).await.status, StatusCode::OK);
        r.shadows_idle().await;
    }
    assert_eq!(r.stats.sums(TaskClass::Code, "int4-awq").1, 3);
    // Slots full: dropped without calling the candidate at all.
    node.set("i:1", serve());
    let permits = r.shadow_permits.lock().unwrap().get("int4-awq").unwrap().clone();
    let held = permits.clone().try_acquire_many_owned(4).unwrap();
    let before = node.calls("generate").len();
    chat(&r, "```\nls\n```", json!({}), &[]).await;
    assert_eq!(node.calls("generate").len(), before + 1, "only the primary");
    assert_eq!(r.stats.sums(TaskClass::Code, "int4-awq").1, 4);
    drop(held);
    chat(&r, "```\nls\n```", json!({}), &[]).await;
    r.shadows_idle().await;
    assert_eq!(r.stats.sums(TaskClass::Code, "int4-awq").0.samples, 1);
}

#[tokio::test]
async fn agent_mirrors_check_the_candidates_json() {
    let node = all_serving();
    node.set("i:1", Behaviour::Serve { flip_every: None, answer: Some("{\"name\": \"f\", \"arguments\": {}}".into()) });
    let mut p = policy(Some((CanaryPhase::Shadowing, 0)));
    let canary = p.spec.canary.as_mut().unwrap();
    canary.task_classes = vec![TaskClass::Agent];
    canary.shadow_percent = 100.0;
    canary.gates.clear();
    let r = router(node.clone(), None, |c| c.policy = Some(p));
    let tools = json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]});
    chat(&r, "Call f.", tools.clone(), &[]).await;
    r.shadows_idle().await;
    node.set("i:1", Behaviour::Serve { flip_every: None, answer: Some("I will call f".into()) });
    chat(&r, "Call f.", tools, &[]).await;
    r.shadows_idle().await;
    let (sums, _) = r.stats.sums(TaskClass::Agent, "int4-awq");
    assert_eq!((sums.samples, sums.structured_samples, sums.structured_invalid), (2, 2, 1));
}

#[tokio::test]
async fn live_canary_share_and_policy_updates() {
    let node = all_serving();
    let r = router(node.clone(), Some((CanaryPhase::Stepping, 50)), |_| {});
    let mut tiers = Vec::new();
    for _ in 0..10 {
        let reply = chat(&r, "```\nls\n```", json!({}), &[]).await;
        tiers.push((reply.header("x-quantfleet-tier").to_owned(), reply.header("x-quantfleet-route").to_owned()));
    }
    assert_eq!(tiers.iter().filter(|(t, v)| t == "int4-awq" && v == "canary").count(), 5);
    assert_eq!(tiers.iter().filter(|(t, v)| t == "fp8" && v == "route").count(), 5);
    // Promotion: the candidate serves code, the old incumbent is the first fallback.
    r.set_policy(&policy(Some((CanaryPhase::Promoted, 100))));
    let reply = chat(&r, "```\nls\n```", json!({}), &[]).await;
    assert_eq!((reply.header("x-quantfleet-tier"), reply.header("x-quantfleet-route")), ("int4-awq", "route"));
    node.set("i:1", Behaviour::Unavailable);
    let reply = chat(&r, "```\nls\n```", json!({}), &[]).await;
    assert_eq!((reply.header("x-quantfleet-tier"), reply.header("x-quantfleet-route")), ("fp8", "fallback"));
}

#[tokio::test]
async fn requests_spread_by_outstanding_count() {
    let mut node =
        FakeNode::new(&[("b:1", serve()), ("f:1", serve()), ("f:2", serve()), ("k:1", serve()), ("i:1", serve())]);
    node.token_delay = Duration::from_millis(20);
    let node = Arc::new(node);
    let r = router(node.clone(), None, |_| {});
    let replies = futures::future::join_all((0..4).map(|_| chat(&r, "```\nls\n```", json!({}), &[]))).await;
    assert!(replies.iter().all(|x| x.status == StatusCode::OK));
    let per: Vec<String> = node.calls("generate").iter().map(|c| c.endpoint.clone()).collect();
    assert_eq!(per.iter().filter(|e| *e == "f:1").count(), 2, "{per:?}");
    assert_eq!(per.iter().filter(|e| *e == "f:2").count(), 2, "{per:?}");
}

#[tokio::test]
async fn endpoint_changes_apply_live_and_running_requests_finish_where_they_started() {
    let mut node = FakeNode::new(&[("b:1", serve()), ("f:1", serve()), ("f:2", serve()), ("f:3", serve())]);
    node.token_delay = Duration::from_millis(60);
    let node = Arc::new(node);
    let r = router(node.clone(), None, |_| {});
    let code = "```python\nprint(1)\n```";
    let running = {
        let r = r.clone();
        tokio::spawn(async move { chat(&r, code, json!({}), &[]).await })
    };
    // The request is on f:1 or f:2 when both leave and f:3 arrives (an EndpointSlice update).
    tokio::time::sleep(Duration::from_millis(30)).await;
    let started_on = node.calls("generate")[0].endpoint.clone();
    let mut endpoints = BTreeMap::new();
    for (tier, eps) in [("bf16", vec!["b:1"]), ("fp8", vec!["f:3"]), ("fp8-kv8", vec![]), ("int4-awq", vec![])] {
        endpoints.insert(tier.to_owned(), eps.into_iter().map(str::to_owned).collect());
    }
    let change = r.set_endpoints(&endpoints);
    assert_eq!(change.added, ["fp8/f:3"]);
    assert_eq!(change.removed.len(), 4, "f:1, f:2, k:1 and i:1 left: {change:?}");
    let reply = running.await.unwrap();
    assert_eq!((reply.status, reply.header("x-quantfleet-tier")), (StatusCode::OK, "fp8"), "{}", reply.body);
    assert_eq!(reply.json()["usage"]["completion_tokens"], 4, "the running request finished on {started_on}");
    for _ in 0..3 {
        let reply = chat(&r, code, json!({}), &[]).await;
        assert_eq!(reply.header("x-quantfleet-tier"), "fp8");
        assert_eq!(node.calls("generate").last().unwrap().endpoint, "f:3", "new requests use the new endpoint");
    }
    // A tier left without endpoints falls back: chat routes to int4-awq, then fp8.
    let reply = chat(&r, "Tell me about Paris.", json!({}), &[]).await;
    assert_eq!((reply.header("x-quantfleet-tier"), reply.header("x-quantfleet-route")), ("fp8", "fallback"));
}

#[tokio::test]
async fn the_stats_report_what_each_node_said_in_model_info() {
    let node = all_serving();
    node.set_info(
        "i:1",
        crate::backend::NodeInfo {
            model: "smollm2-135m".into(),
            tier: "int4-awq".into(),
            tier_spec_json: r#"{"name":"int4-awq","weights":{"format":"int4","method":"awq","groupSize":128}}"#.into(),
            weights_loaded: "int4-g128-asym (211 matrices)".into(),
            backend: "cpu-avx2".into(),
            tier_applied: true,
        },
    );
    let r = router(node.clone(), None, |_| {});
    let nodes =
        |reply: Reply| serde_json::from_value::<quantfleet_api::stats::CanaryStatsReport>(reply.json()).unwrap();
    // Not read yet: no node in the report.
    assert!(nodes(call(&r, "GET", "/v1/canary/stats", &[], Body::empty()).await).nodes.is_empty());

    r.check_endpoints(Duration::from_secs(1)).await;
    let report = nodes(call(&r, "GET", "/v1/canary/stats", &[], Body::empty()).await);
    let listed: Vec<(&str, &str)> = report.nodes.iter().map(|n| (n.tier.as_str(), n.endpoint.as_str())).collect();
    assert_eq!(listed, [("bf16", "b:1"), ("fp8", "f:1"), ("fp8", "f:2"), ("fp8-kv8", "k:1"), ("int4-awq", "i:1")]);
    let int4 = &report.nodes[4];
    assert_eq!(
        (int4.namespace.as_str(), int4.model.as_str(), int4.backend.as_str()),
        ("default", "smollm2-135m", "cpu-avx2")
    );
    assert_eq!(int4.tier_spec["weights"]["method"], "awq");
    assert!(int4.tier_applied && int4.weights_loaded.starts_with("int4-g128"));

    // Read once per endpoint: a second round asks nobody again.
    r.check_endpoints(Duration::from_secs(1)).await;
    assert_eq!(node.calls("model_info").len(), 5);
    // An endpoint that goes down is dropped from the report and read again when it is back (it may have
    // restarted with another configuration).
    node.set("k:1", Behaviour::Unavailable);
    r.check_endpoints(Duration::from_secs(1)).await;
    let report = nodes(call(&r, "GET", "/v1/canary/stats", &[], Body::empty()).await);
    assert!(report.nodes.iter().all(|n| n.endpoint != "k:1") && report.nodes.len() == 4);
    node.set("k:1", serve());
    r.check_endpoints(Duration::from_secs(1)).await;
    assert_eq!(
        node.calls("model_info").iter().filter(|c| c.endpoint == "k:1").count(),
        2,
        "read, and again after coming back"
    );
    // A replaced endpoint set: the new endpoint is read, the removed one is gone.
    r.set_endpoints(&[("bf16".to_owned(), vec!["b:2".to_owned()])].into());
    node.set("b:2", serve());
    r.check_endpoints(Duration::from_secs(1)).await;
    let report = nodes(call(&r, "GET", "/v1/canary/stats", &[], Body::empty()).await);
    assert_eq!(report.nodes.iter().map(|n| n.endpoint.as_str()).collect::<Vec<_>>(), ["b:2"]);
}

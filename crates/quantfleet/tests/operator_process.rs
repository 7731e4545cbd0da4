//! Quantfleet's cluster roles as processes on a real control plane:
//! - `quantfleet operator --watch-namespace`: two replicas, one leader; when the leader is killed the standby
//!   takes over after the Lease expires and reconciles what happens next. They watch their test's namespace
//!   only: watching every namespace, they reconciled the PrecisionPolicy whose status the router test writes by
//!   hand (standing in for the operator) and could overwrite it (a CI run saw the router go back to a canary
//!   step the test had just promoted), so the two tests had to take turns.
//! - `quantfleet router --kubernetes`: under a ServiceAccount bound to deploy/rbac/router-role.yaml only, it
//!   follows its PrecisionPolicy and the EndpointSlices of the model's tiers live (no restart): endpoints added
//!   are used, removed ones fall back, running requests finish where they started, and a canary step or a
//!   promotion written into the policy's status changes the routes. Kwok pods run nothing, so the slices point
//!   at fake gRPC nodes in this process (synthetic: each answers with its own label) on this host's address.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding, RoleRef, Subject};
use kube::Api;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use quantfleet_api::conditions::find;
use quantfleet_api::{CanaryPhase, CanaryStatus, PrecisionPolicy, PrecisionPolicyStatus, QuantizedModel};
use quantfleet_testsupport::crds::{install_crds, repo_crds_dir};
use quantfleet_testsupport::wait::{Probe, until};
use quantfleet_testsupport::{Error, TestEnv, control_plane};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Operator processes, killed when dropped: also when the test fails half-way, so that none outlives its turn.
struct Operators(Vec<Child>);

impl Drop for Operators {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn operator(instance: &str, ns: &str, kubeconfig: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_quantfleet"))
        .args(["operator", "--node-image", "registry.invalid/quantfleet:test", "--metrics-addr", "127.0.0.1:0"])
        .args(["--lease-namespace", ns, "--lease-name", "op-process-test", "--lease-duration-seconds", "3"])
        .args(["--watch-namespace", ns])
        .args(["--instance", instance])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("starting quantfleet operator")
}

/// A model whose only tier cannot fit an L4: reconciling it writes FitsAccelerator=False and creates nothing.
fn misfit(name: &str) -> QuantizedModel {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "quantfleet.io/v1alpha1", "kind": "QuantizedModel", "metadata": {"name": name},
        "spec": {
            "source": {"uri": "file:///models/m.gguf"},
            "architecture": {"numLayers": 80, "hiddenSize": 8192, "intermediateSize": 28672, "numAttentionHeads": 64,
                             "numKeyValueHeads": 8, "headDim": 128, "vocabSize": 128256, "maxPositionEmbeddings": 8192},
            "accelerator": {"product": "NVIDIA-L4"},
            "tiers": [{"name": "bf16", "weights": {"format": "bf16"}}]
        }
    }))
    .unwrap()
}

async fn wait_reconciled(models: &Api<QuantizedModel>, name: &str) -> Result<(), Error> {
    until(&format!("model {name} to be reconciled"), Duration::from_secs(60), || async {
        let qm = models.get(name).await.map_err(Error::kube("reading model"))?;
        Ok(match qm.status.as_ref().and_then(|s| find(&s.conditions, "FitsAccelerator")) {
            Some(c) if c.status == "False" => Probe::Done(()),
            other => Probe::Pending(format!("{other:?}")),
        })
    })
    .await
}

async fn holder(leases: &Api<Lease>) -> Result<Option<String>, Error> {
    let lease = leases.get_opt("op-process-test").await.map_err(Error::kube("reading lease"))?;
    Ok(lease.and_then(|l| l.spec).and_then(|s| s.holder_identity))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_when_the_leader_dies() -> Result<(), Error> {
    let env = TestEnv::new("op-process").await?;
    install_crds(&env.client, &repo_crds_dir()).await?;
    let ns = env.namespace().to_owned();
    let kubeconfig = control_plane()?.kubeconfig().to_path_buf();
    let mut children =
        Operators(vec![operator("replica-a", &ns, &kubeconfig), operator("replica-b", &ns, &kubeconfig)]);
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &ns);
    let models: Api<QuantizedModel> = Api::namespaced(env.client.clone(), &ns);

    let leader = until("a leader to be elected", Duration::from_secs(60), || async {
        Ok(match holder(&leases).await? {
            Some(h) if !h.is_empty() => Probe::Done(h),
            other => Probe::Pending(format!("holder {other:?}")),
        })
    })
    .await?;
    models.create(&PostParams::default(), &misfit("first")).await.map_err(Error::kube("creating model"))?;
    wait_reconciled(&models, "first").await?;

    let index = if leader == "replica-a" { 0 } else { 1 };
    children.0[index].kill().expect("killing the leader");
    children.0[index].wait().expect("reaping the leader");
    let standby = if index == 0 { "replica-b" } else { "replica-a" };
    until("the standby to take the lease over", Duration::from_secs(60), || async {
        Ok(match holder(&leases).await? {
            Some(h) if h == standby => Probe::Done(()),
            other => Probe::Pending(format!("holder {other:?}")),
        })
    })
    .await?;
    // Scoped by --watch-namespace (with the admin's rights, so only the flag holds them back): a model of
    // another namespace, created before this one, is still unreconciled once this one is.
    let other = TestEnv::new("op-process-other").await?;
    let elsewhere: Api<QuantizedModel> = Api::namespaced(env.client.clone(), other.namespace());
    elsewhere.create(&PostParams::default(), &misfit("elsewhere")).await.map_err(Error::kube("creating model"))?;
    models.create(&PostParams::default(), &misfit("second")).await.map_err(Error::kube("creating model"))?;
    wait_reconciled(&models, "second").await?;
    let untouched = elsewhere.get("elsewhere").await.map_err(Error::kube("reading model"))?;
    assert!(
        untouched.status.is_none(),
        "an operator scoped to {ns} reconciled {}: {:?}",
        other.namespace(),
        untouched.status
    );

    drop(children);
    other.cleanup().await?;
    env.cleanup().await
}

// ---------------------------------------------------------------------------------------------------------------
// `quantfleet router --kubernetes`

mod fake_node {
    //! A fake inference node (synthetic, for routing tests only): every generated token's text is the node's
    //! label, so a response names the node that served it; `delay` passes between tokens.
    use quantfleet_proto::v1 as pb;
    use quantfleet_proto::v1::inference_server::{Inference, InferenceServer};
    use std::net::{IpAddr, SocketAddr};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tonic::{Request, Response, Status};

    pub struct FakeNode {
        label: String,
        delay: Duration,
        pub generates: Arc<AtomicUsize>,
    }

    type Stream = tokio_stream::wrappers::UnboundedReceiverStream<Result<pb::GenerateResponse, Status>>;

    #[tonic::async_trait]
    impl Inference for FakeNode {
        type GenerateStream = Stream;

        async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<Stream>, Status> {
            self.generates.fetch_add(1, Ordering::Relaxed);
            let req = request.into_inner();
            let n = req.max_tokens.max(1);
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let (label, delay, top) = (self.label.clone(), self.delay, req.top_logprobs > 0);
            tokio::spawn(async move {
                for i in 0..n {
                    if i > 0 {
                        tokio::time::sleep(delay).await;
                    }
                    let token = pb::GeneratedToken {
                        id: 7,
                        text: format!("{label} "),
                        logprob: -0.1,
                        top_logprobs: if top { vec![pb::TokenLogprob { id: 7, logprob: -0.1 }] } else { vec![] },
                    };
                    let chunk = pb::GenerateResponse { tokens: vec![token], text: format!("{label} "), summary: None };
                    if tx.send(Ok(chunk)).is_err() {
                        return;
                    }
                }
                let summary = pb::GenerateSummary {
                    finish_reason: pb::FinishReason::Length as i32,
                    prompt_tokens: 3,
                    completion_tokens: n,
                    ..Default::default()
                };
                let _ = tx.send(Ok(pb::GenerateResponse { summary: Some(summary), ..Default::default() }));
            });
            Ok(Response::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)))
        }

        async fn score(&self, _: Request<pb::ScoreRequest>) -> Result<Response<pb::ScoreResponse>, Status> {
            Err(Status::unimplemented("the fake node does not score"))
        }

        async fn model_info(
            &self,
            _: Request<pb::ModelInfoRequest>,
        ) -> Result<Response<pb::ModelInfoResponse>, Status> {
            Ok(Response::new(pb::ModelInfoResponse {
                model: "smollm2-135m".into(),
                tier: self.label.clone(),
                tier_spec_json: format!(r#"{{"name":"{}","weights":{{"format":"bf16"}}}}"#, self.label),
                backend: "fake-grpc".into(),
                tier_applied: true,
                ..Default::default()
            }))
        }
    }

    /// Serves a fake node on `ip` (a free port) with gRPC health SERVING; returns its address and call count.
    pub async fn start(label: &str, ip: IpAddr, delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let generates = Arc::new(AtomicUsize::new(0));
        let node = FakeNode { label: label.to_owned(), delay, generates: generates.clone() };
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(quantfleet_proto::INFERENCE_SERVICE_NAME, tonic_health::ServingStatus::Serving)
            .await;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .add_service(InferenceServer::new(node))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (addr, generates)
    }
}

/// This host's first non-loopback IPv4 address: the API server refuses loopback addresses in EndpointSlices.
fn host_ipv4() -> Ipv4Addr {
    quantfleet_testsupport::net::host_ipv4()
        .expect("this test needs a non-loopback IPv4 address (EndpointSlices cannot name 127.0.0.0/8)")
}

/// A `quantfleet router --kubernetes` process; its log is kept for failure messages.
struct RouterProcess {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl RouterProcess {
    fn start(kubeconfig: &Path, ns: &str, policy: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_quantfleet"))
            .args(["router", "--kubernetes", "--namespace", ns, "--policy", policy, "--listen", "127.0.0.1:0"])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting quantfleet router");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("router listening on http://") {
                    let _ = tx.send(rest.split('/').next().unwrap_or_default().to_owned());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(60)).expect("the router did not start listening");
        RouterProcess { child, addr: addr.parse().unwrap(), log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.head
            .lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()))
            .unwrap_or("")
    }
}

/// Sends one HTTP/1.1 request (`Connection: close`) and returns the stream after the response head.
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (tokio::net::TcpStream, u16, String, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let split = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (stream, status, head, buf[split + 4..].to_vec())
}

async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Reply {
    let (mut stream, status, head, mut rest) = send(addr, method, path, &[], body).await;
    stream.read_to_end(&mut rest).await.unwrap();
    Reply { status, head, body: String::from_utf8_lossy(&rest).into_owned() }
}

const CODE: &str = "```python\nprint(1)\n```";
const CHAT: &str = "Tell me about Paris.";

fn chat_body(content: &str, max_tokens: u32, stream: bool) -> String {
    serde_json::json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": content}],
                       "max_tokens": max_tokens, "stream": stream})
    .to_string()
}

async fn chat(addr: SocketAddr, content: &str) -> Reply {
    http(addr, "POST", "/v1/chat/completions", &chat_body(content, 1, false)).await
}

/// The content of a non-streaming chat reply: the label of the node that served it.
fn served_by(reply: &Reply) -> String {
    let v: serde_json::Value = serde_json::from_str(&reply.body).unwrap_or_default();
    v["choices"][0]["message"]["content"].as_str().unwrap_or_default().trim().to_owned()
}

/// A node Service's EndpointSlice as the EndpointSlice controller writes it (the Service's labels copied).
fn slice(name: &str, tier: Option<&str>, node: SocketAddr, ready: bool) -> EndpointSlice {
    let mut labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "quantfleet-node".to_owned()),
        ("quantfleet.io/model".to_owned(), "smollm2-135m".to_owned()),
        ("kubernetes.io/service-name".to_owned(), name.to_owned()),
        ("endpointslice.kubernetes.io/managed-by".to_owned(), "quantfleet-test".to_owned()),
    ]);
    if let Some(tier) = tier {
        labels.insert("quantfleet.io/tier".to_owned(), tier.to_owned());
    }
    EndpointSlice {
        metadata: ObjectMeta { name: Some(name.into()), labels: Some(labels), ..ObjectMeta::default() },
        address_type: "IPv4".into(),
        ports: Some(vec![
            EndpointPort { name: Some("metrics".into()), port: Some(9090), ..EndpointPort::default() },
            EndpointPort { name: Some("grpc".into()), port: Some(i32::from(node.port())), ..EndpointPort::default() },
        ]),
        endpoints: vec![Endpoint {
            addresses: vec![node.ip().to_string()],
            conditions: Some(EndpointConditions { ready: Some(ready), ..EndpointConditions::default() }),
            ..Endpoint::default()
        }],
    }
}

/// The metric's value in the router's /metrics (0 when absent).
async fn metric(addr: SocketAddr, series: &str) -> f64 {
    let text = http(addr, "GET", "/metrics", "").await.body;
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0.0)
}

/// A kubeconfig acting as `user` (impersonation through the admin credentials).
fn kubeconfig_as(admin: &Path, user: &str, out: &Path) {
    let mut config: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(admin).unwrap()).unwrap();
    for entry in config["users"].as_sequence_mut().unwrap() {
        entry["user"]["as"] = serde_yaml::Value::String(user.to_owned());
    }
    std::fs::write(out, serde_yaml::to_string(&config).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_follows_its_policy_and_endpoint_slices_live() -> Result<(), Error> {
    let env = TestEnv::new("router-k8s").await?;
    install_crds(&env.client, &repo_crds_dir()).await?;
    let ns = env.namespace().to_owned();
    let k = |what: &'static str| Error::kube(what);
    let admin = env.client.clone();

    // The router's identity: a ServiceAccount bound to deploy/rbac/router-role.yaml and nothing else.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let role: Role =
        serde_yaml::from_str(&std::fs::read_to_string(repo.join("deploy/rbac/router-role.yaml")).unwrap()).unwrap();
    Api::<Role>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &role)
        .await
        .map_err(k("creating the Role"))?;
    let sa = ServiceAccount {
        metadata: ObjectMeta { name: Some("router".into()), ..ObjectMeta::default() },
        ..ServiceAccount::default()
    };
    Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &sa)
        .await
        .map_err(k("creating the ServiceAccount"))?;
    let binding = RoleBinding {
        metadata: ObjectMeta { name: Some("router".into()), ..ObjectMeta::default() },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "quantfleet-router".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "router".into(),
            namespace: Some(ns.clone()),
            ..Subject::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &binding)
        .await
        .map_err(k("binding the Role"))?;
    let kubeconfig = std::env::temp_dir().join(format!("qf-router-kubeconfig-{}", std::process::id()));
    kubeconfig_as(control_plane()?.kubeconfig(), &format!("system:serviceaccount:{ns}:router"), &kubeconfig);

    let ip = IpAddr::V4(host_ipv4());
    let (fp8_a, fp8_a_calls) = fake_node::start("fp8-a", ip, Duration::from_millis(100)).await;
    let (fp8_b, _) = fake_node::start("fp8-b", ip, Duration::ZERO).await;
    let (bf16, _) = fake_node::start("bf16-a", ip, Duration::ZERO).await;
    let (int4, _) = fake_node::start("int4-a", ip, Duration::ZERO).await;

    // Started before its policy exists: it listens, but is not ready and says what it waits for.
    let router = RouterProcess::start(&kubeconfig, &ns, "smollm2-135m");
    let addr = router.addr;
    assert_eq!(http(addr, "GET", "/health", "").await.status, 503);
    let early = chat(addr, CHAT).await;
    assert_eq!(early.status, 503, "{}", early.body);
    assert!(early.body.contains(&format!("waiting for PrecisionPolicy {ns}/smollm2-135m")), "{}", early.body);

    let slices: Api<EndpointSlice> = Api::namespaced(admin.clone(), &ns);
    let policies: Api<PrecisionPolicy> = Api::namespaced(admin.clone(), &ns);
    let apply = PatchParams::apply("quantfleet-test").force();
    let put = |s: EndpointSlice| {
        let slices = slices.clone();
        let apply = apply.clone();
        async move {
            let name = s.metadata.name.clone().unwrap();
            slices
                .patch(&name, &apply, &Patch::Apply(&s))
                .await
                .map_err(Error::kube("applying an EndpointSlice"))
                .map(|_| ())
        }
    };
    put(slice("smollm2-135m-fp8-a", Some("fp8"), fp8_a, true)).await?;
    put(slice("smollm2-135m-bf16", Some("bf16"), bf16, true)).await?;
    put(slice("unlabelled", None, int4, true)).await?; // no tier label: ignored and counted
    let policy: PrecisionPolicy = serde_yaml::from_str(
        &std::fs::read_to_string(repo.join("deploy/samples/smollm2-135m.precisionpolicy.yaml")).unwrap(),
    )
    .unwrap();
    policies.create(&PostParams::default(), &policy).await.map_err(k("creating the policy"))?;

    let log = || router.log();
    let routed = |content: &'static str, tier: &'static str, node: &'static str, via: &'static str| async move {
        let reply = chat(addr, content).await;
        let seen = (
            reply.status,
            reply.header("x-quantfleet-tier").to_owned(),
            served_by(&reply),
            reply.header("x-quantfleet-route").to_owned(),
        );
        Ok(if seen == (200, tier.to_owned(), node.to_owned(), via.to_owned()) {
            Probe::Done(())
        } else {
            Probe::Pending(format!("{seen:?} {}\nrouter log:\n{}", reply.body, log()))
        })
    };
    // Code goes to fp8; chat's tier (int4-awq) has no endpoint yet, so it falls back to fp8.
    until("code routed to fp8-a", Duration::from_secs(30), || routed(CODE, "fp8", "fp8-a", "route")).await?;
    until("chat falling back to fp8", Duration::from_secs(5), || routed(CHAT, "fp8", "fp8-a", "fallback")).await?;
    assert_eq!(http(addr, "GET", "/health", "").await.status, 200);
    assert_eq!(
        metric(addr, "quantfleet_router_source_problems_total{object=\"endpointslice\",reason=\"no_tier_label\"}")
            .await,
        1.0
    );

    // An endpoint added: chat's own tier gets one and is used.
    put(slice("smollm2-135m-int4-awq", Some("int4-awq"), int4, true)).await?;
    until("chat routed to int4-a", Duration::from_secs(30), || routed(CHAT, "int4-awq", "int4-a", "route")).await?;
    // The router read every endpoint's ModelInfo over gRPC and publishes it in the stats the operator reads.
    until("the nodes' ModelInfo in the canary stats", Duration::from_secs(30), || async {
        let stats = http(addr, "GET", "/v1/canary/stats", "").await;
        let report: quantfleet_api::stats::CanaryStatsReport =
            serde_json::from_str(&stats.body).unwrap_or_else(|e| panic!("{e}: {}", stats.body));
        let seen: Vec<(String, String, String, String)> = report
            .nodes
            .iter()
            .map(|n| {
                (
                    n.namespace.clone(),
                    n.tier.clone(),
                    n.tier_spec["name"].as_str().unwrap_or("").into(),
                    n.backend.clone(),
                )
            })
            .collect();
        let want: Vec<(String, String, String, String)> =
            [("bf16", "bf16-a"), ("fp8", "fp8-a"), ("int4-awq", "int4-a")]
                .iter()
                .map(|(tier, label)| (ns.clone(), tier.to_string(), label.to_string(), "fake-grpc".to_owned()))
                .collect();
        Ok(if seen == want { Probe::Done(()) } else { Probe::Pending(format!("{seen:?}")) })
    })
    .await?;

    // A long streaming request runs on fp8-a while fp8-a becomes not ready (terminating) and fp8-b arrives:
    // new requests go to fp8-b, the running one finishes on fp8-a.
    let before = fp8_a_calls.load(Ordering::Relaxed);
    let (mut stream, status, _, mut streamed) =
        send(addr, "POST", "/v1/chat/completions", &[], &chat_body(CODE, 20, true)).await;
    assert_eq!(status, 200);
    assert_eq!(fp8_a_calls.load(Ordering::Relaxed), before + 1, "the stream started on fp8-a");
    put(slice("smollm2-135m-fp8-a", Some("fp8"), fp8_a, false)).await?;
    put(slice("smollm2-135m-fp8-b", Some("fp8"), fp8_b, true)).await?;
    until("code routed to fp8-b", Duration::from_secs(30), || routed(CODE, "fp8", "fp8-b", "route")).await?;
    stream.read_to_end(&mut streamed).await.unwrap();
    let streamed = String::from_utf8_lossy(&streamed);
    assert!(streamed.contains("data: [DONE]"), "the running stream was cut: {streamed}");
    assert_eq!(streamed.matches("fp8-a ").count(), 20, "all 20 tokens came from fp8-a: {streamed}");

    // Every fp8 endpoint gone: code falls back to bf16; one back: used again.
    slices.delete("smollm2-135m-fp8-b", &DeleteParams::default()).await.map_err(k("deleting a slice"))?;
    until("code falling back to bf16", Duration::from_secs(30), || routed(CODE, "bf16", "bf16-a", "fallback")).await?;
    put(slice("smollm2-135m-fp8-a", Some("fp8"), fp8_a, true)).await?;
    until("code back on fp8-a", Duration::from_secs(30), || routed(CODE, "fp8", "fp8-a", "route")).await?;

    // The operator steps the canary (status only): 50% of live code traffic goes to the candidate, exactly.
    let policy_updates = "quantfleet_router_source_updates_total{kind=\"policy\"}";
    let status_update = |phase: CanaryPhase, live: i32| {
        let policies = policies.clone();
        let spec = policy.spec.clone();
        async move {
            let canary = CanaryStatus {
                phase,
                candidate_tier: "int4-awq".into(),
                live_percent: live,
                ..CanaryStatus::default()
            };
            let status = PrecisionPolicyStatus {
                effective_routes: quantfleet_api::routes::effective_routes(&spec, Some(&canary)),
                canary: Some(canary),
                ..PrecisionPolicyStatus::default()
            };
            let patch = serde_json::json!({"apiVersion": "quantfleet.io/v1alpha1", "kind": "PrecisionPolicy", "status": status});
            policies
                .patch_status("smollm2-135m", &PatchParams::apply("quantfleet-operator").force(), &Patch::Apply(&patch))
                .await
                .map_err(Error::kube("writing the policy status"))
                .map(|_| ())
        }
    };
    let wait_policy_updates = |n: f64| async move {
        until("the router to apply the policy status", Duration::from_secs(30), || async {
            let seen = metric(addr, policy_updates).await;
            Ok(if seen >= n { Probe::Done(()) } else { Probe::Pending(format!("{seen} updates\n{}", log())) })
        })
        .await
    };
    status_update(CanaryPhase::Stepping, 50).await?;
    wait_policy_updates(1.0).await?;
    let mut via = BTreeMap::new();
    for _ in 0..10 {
        let reply = chat(addr, CODE).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        *via.entry((
            reply.header("x-quantfleet-tier").to_owned(),
            served_by(&reply),
            reply.header("x-quantfleet-route").to_owned(),
        ))
        .or_insert(0) += 1;
    }
    let want = BTreeMap::from([
        (("fp8".to_owned(), "fp8-a".to_owned(), "route".to_owned()), 5),
        (("int4-awq".to_owned(), "int4-a".to_owned(), "canary".to_owned()), 5),
    ]);
    assert_eq!(via, want, "live canary at 50%");

    // Promotion: the candidate is code's tier.
    status_update(CanaryPhase::Promoted, 100).await?;
    wait_policy_updates(2.0).await?;
    until("code routed to int4-awq", Duration::from_secs(5), || routed(CODE, "int4-awq", "int4-a", "route")).await?;

    // A deleted policy is counted, and the router keeps serving its last routes.
    policies.delete("smollm2-135m", &DeleteParams::default()).await.map_err(k("deleting the policy"))?;
    let deleted = "quantfleet_router_source_problems_total{object=\"precisionpolicy\",reason=\"deleted\"}";
    until("the deletion to be counted", Duration::from_secs(30), || async {
        Ok(if metric(addr, deleted).await == 1.0 { Probe::Done(()) } else { Probe::Pending(log()) })
    })
    .await?;
    until("code still routed to int4-awq", Duration::from_secs(5), || routed(CODE, "int4-awq", "int4-a", "route"))
        .await?;
    // SIGTERM (a rolling update): the router stops accepting connections, but a stream in flight finishes.
    let (mut stream, status, _, mut streamed) =
        send(addr, "POST", "/v1/chat/completions", &[("x-quantfleet-tier", "fp8")], &chat_body(CODE, 20, true)).await;
    assert_eq!(status, 200);
    let watch_errors =
        metric(addr, "quantfleet_router_source_problems_total{object=\"precisionpolicy\",reason=\"watch_error\"}")
            .await
            + metric(addr, "quantfleet_router_source_problems_total{object=\"endpointslice\",reason=\"watch_error\"}")
                .await;
    assert_eq!(watch_errors, 0.0, "the Role's rights are enough for the router's watches:\n{}", log());
    // SAFETY: kill(2) on the router child's pid.
    assert_eq!(unsafe { libc::kill(router.child.id() as i32, libc::SIGTERM) }, 0);
    stream.read_to_end(&mut streamed).await.unwrap();
    let streamed = String::from_utf8_lossy(&streamed);
    assert!(streamed.contains("data: [DONE]"), "the stream in flight was cut by SIGTERM: {streamed}\n{}", log());
    assert_eq!(streamed.matches("fp8-a ").count(), 20, "{streamed}");
    let mut router = router;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let exited = loop {
        if let Some(status) = router.child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the router did not exit after draining:\n{}", router.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exited.success(), "{exited}\n{}", router.log());
    assert!(router.log().contains("SIGTERM: draining the requests in flight"), "{}", router.log());

    drop(router);
    let _ = std::fs::remove_file(&kubeconfig);
    env.cleanup().await
}

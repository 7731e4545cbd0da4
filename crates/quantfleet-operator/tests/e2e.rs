//! The operator end to end on a real control plane (kube-apiserver, controller manager, scheduler, kwok fake
//! GPU nodes; see tests/controlplane). One test drives every scenario in order because the controllers watch
//! all namespaces: two operators in one cluster would fight over the same status.
//!
//! Canary evidence comes from recorded stats feeds in the router's wire format (no node pod can run under
//! kwok, so no real router can be fed here): two router replicas, each with its own counters, served on this
//! host's address and named in the EndpointSlices of a router Service, as the EndpointSlice controller would for
//! `router.replicas: 2`. The operator discovers both, sums them (a replica's restart counted as new samples) and
//! holds the canary while one of them cannot be read.

use http_body_util::Full;
use hyper::body::Bytes;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use quantfleet_api::conditions::find;
use quantfleet_api::plan::AcceleratorTable;
use quantfleet_api::stats::{CanaryStatsReport, ClassComparison, ComparisonSums, NodeReport, PolicyComparison};
use quantfleet_api::{CanaryPhase, PrecisionPolicy, QuantizedModel, TaskClass};
use quantfleet_operator::builders::{MODEL_LABEL, Settings};
use quantfleet_operator::controller::{Context, reporter, run};
use quantfleet_operator::metrics::Metrics;
use quantfleet_operator::stats_source::RouterStats;
use quantfleet_testsupport::crds::{install_crds, repo_crds_dir};
use quantfleet_testsupport::wait::{Probe, until};
use quantfleet_testsupport::{Error, TestEnv};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CONVERGE: Duration = Duration::from_secs(90);

fn sample<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let path = format!("{}/../../deploy/samples/{file}", env!("CARGO_MANIFEST_DIR"));
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The recorded feed of one router replica: a report the test rewrites as the "router" measures more pairs,
/// and a switch that makes it answer 503 (an unreadable replica).
#[derive(Clone, Default)]
struct Feed(Arc<Mutex<CanaryStatsReport>>, Arc<AtomicBool>);

impl Feed {
    /// Serves the feed at http://ADDR/v1/canary/stats on this host's address and returns ADDR.
    async fn serve(&self) -> SocketAddr {
        let ip = quantfleet_testsupport::net::host_ipv4().expect("this test needs a non-loopback IPv4 address");
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let feed = self.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let feed = feed.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        let mut response = hyper::Response::new(Full::new(Bytes::new()));
                        if feed.1.load(Ordering::SeqCst) {
                            *response.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                        } else {
                            *response.body_mut() =
                                Full::new(Bytes::from(serde_json::to_vec(&*feed.0.lock().unwrap()).unwrap()));
                        }
                        async move { Ok::<_, std::convert::Infallible>(response) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    /// Sets the nodes' ModelInfo this replica reports: every tier of `model` serving its declared spec (as the
    /// operator configures nodes: replicas 1), except `wrong` tiers, which serve int8 weights.
    fn set_nodes(&self, ns: &str, model: &QuantizedModel, wrong: &[&str]) {
        self.0.lock().unwrap().nodes = model
            .spec
            .tiers
            .iter()
            .map(|t| {
                let mut spec =
                    serde_json::to_value(quantfleet_api::model::TierSpec { replicas: 1, ..t.clone() }).unwrap();
                if wrong.contains(&t.name.as_str()) {
                    spec["weights"] = serde_json::json!({"format": "int8"});
                }
                NodeReport {
                    namespace: ns.into(),
                    model: model.metadata.name.clone().unwrap(),
                    tier: t.name.clone(),
                    endpoint: format!("10.1.0.{}:50051", t.name.len()),
                    tier_spec: spec,
                    backend: "cpu-avx2".into(),
                    weights_loaded: "recorded".into(),
                    tier_applied: true,
                }
            })
            .collect();
    }

    fn fail(&self, failing: bool) {
        self.1.store(failing, Ordering::SeqCst);
    }

    /// Sets one class's cumulative counters: `n` pairs, each with mean KL `kl` and top-1 agreement `top1`.
    #[allow(clippy::too_many_arguments)] // a recorded feed row reads best as one call
    fn set(&self, ns: &str, policy: &str, candidate: &str, class: TaskClass, n: i64, kl: f64, top1: f64) {
        let sums = ComparisonSums {
            samples: n,
            kl_divergence_sum: n as f64 * kl,
            top1_agreement_sum: n as f64 * top1,
            log_perplexity_ratio_sum: n as f64 * 1.01f64.ln(),
            structured_samples: 0,
            structured_invalid: 0,
            latency_ratio_sum: n as f64,
        };
        let mut report = self.0.lock().unwrap();
        report.policies.retain(|p| !(p.namespace == ns && p.policy == policy));
        report.policies.push(PolicyComparison {
            namespace: ns.into(),
            policy: policy.into(),
            candidate_tier: candidate.into(),
            classes: vec![ClassComparison { task_class: class, sums, dropped: 0 }],
        });
    }
}

const ROUTER_SERVICE: &str = "quantfleet-router";

/// The router Service and one EndpointSlice per replica (each replica listens on its own port, so each has its
/// own slice), as the EndpointSlice controller writes them for a selector Service.
async fn router_service(client: &Client, ns: &str, replicas: &[(&str, SocketAddr)]) -> Result<(), Error> {
    let service = Service {
        metadata: ObjectMeta { name: Some(ROUTER_SERVICE.into()), ..ObjectMeta::default() },
        spec: Some(ServiceSpec {
            ports: Some(vec![ServicePort { name: Some("http".into()), port: 8080, ..ServicePort::default() }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &service)
        .await
        .map_err(kerr("creating the router Service"))?;
    for (pod, addr) in replicas {
        let slice = EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{ROUTER_SERVICE}-{pod}")),
                labels: Some(
                    [
                        ("kubernetes.io/service-name".to_owned(), ROUTER_SERVICE.to_owned()),
                        ("endpointslice.kubernetes.io/managed-by".to_owned(), "quantfleet-e2e".to_owned()),
                    ]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(i32::from(addr.port())),
                ..EndpointPort::default()
            }]),
            endpoints: vec![Endpoint {
                addresses: vec![addr.ip().to_string()],
                conditions: Some(EndpointConditions { ready: Some(true), ..EndpointConditions::default() }),
                target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                    kind: Some("Pod".into()),
                    name: Some(format!("{ROUTER_SERVICE}-{pod}")),
                    namespace: Some(ns.into()),
                    uid: Some(format!("uid-{pod}")),
                    ..Default::default()
                }),
                ..Endpoint::default()
            }],
        };
        Api::<EndpointSlice>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &slice)
            .await
            .map_err(kerr("creating a router EndpointSlice"))?;
    }
    Ok(())
}

/// Starts the controllers in this process, reading every replica of the router Service in `ns`; the returned
/// sender stops them.
fn start_operator(client: &Client, ns: &str) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let service = format!("{ns}/{ROUTER_SERVICE}");
    let ctx = Arc::new(Context {
        recorder: kube::runtime::events::Recorder::new(client.clone(), reporter(Some("e2e".into()))),
        client: client.clone(),
        settings: Settings { node_image: "registry.invalid/quantfleet:e2e".into() },
        accelerators: AcceleratorTable::builtin(),
        stats: Some(RouterStats::service(client.clone(), &service, "http", Duration::from_secs(2)).unwrap()),
        metrics: Arc::new(Metrics::default()),
        watch_namespace: None,
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(run(ctx, async move {
        let _ = rx.await;
    }));
    (tx, handle)
}

fn kerr(what: &'static str) -> impl FnOnce(kube::Error) -> Error {
    Error::kube(what)
}

async fn condition_of(api: &Api<QuantizedModel>, name: &str, type_: &str) -> Result<Option<(String, String)>, Error> {
    let qm = api.get(name).await.map_err(kerr("reading the model"))?;
    Ok(qm.status.and_then(|s| find(&s.conditions, type_).map(|c| (c.status.clone(), c.reason.clone()))))
}

async fn wait_canary(
    api: &Api<PrecisionPolicy>,
    name: &str,
    phase: CanaryPhase,
    step: Option<i32>,
) -> Result<PrecisionPolicy, Error> {
    until(&format!("policy {name} canary {phase:?} {step:?}"), CONVERGE, || async {
        let pp = api.get(name).await.map_err(kerr("reading the policy"))?;
        let canary = pp.status.as_ref().and_then(|s| s.canary.clone());
        Ok(match canary {
            Some(c) if c.phase == phase && c.step == step => Probe::Done(pp),
            other => Probe::Pending(format!("{:?}", other.map(|c| (c.phase, c.step, c.message)))),
        })
    })
    .await
}

async fn resource_versions(client: &Client, ns: &str, model: &str) -> Vec<String> {
    let lp = ListParams::default().labels(&format!("{MODEL_LABEL}={model}"));
    let mut out = vec![
        Api::<QuantizedModel>::namespaced(client.clone(), ns).get(model).await.unwrap().resource_version().unwrap(),
    ];
    for d in Api::<Deployment>::namespaced(client.clone(), ns).list(&lp).await.unwrap() {
        out.push(format!("{}={}", d.name_any(), d.resource_version().unwrap()));
    }
    for s in Api::<Service>::namespaced(client.clone(), ns).list(&lp).await.unwrap() {
        out.push(format!("{}={}", s.name_any(), s.resource_version().unwrap()));
    }
    for c in Api::<ConfigMap>::namespaced(client.clone(), ns).list(&lp).await.unwrap() {
        out.push(format!("{}={}", c.name_any(), c.resource_version().unwrap()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_end_to_end() -> Result<(), Error> {
    let env = TestEnv::new("operator").await?;
    let client = env.client.clone();
    let ns = env.namespace().to_owned();
    install_crds(&client, &repo_crds_dir()).await?;
    let (feed, feed_b) = (Feed::default(), Feed::default());
    let (addr_a, addr_b) = (feed.serve().await, feed_b.serve().await);
    router_service(&client, &ns, &[("a", addr_a), ("b", addr_b)]).await?;
    let (stop, handle) = start_operator(&client, &ns);

    let models: Api<QuantizedModel> = Api::namespaced(client.clone(), &ns);
    let policies: Api<PrecisionPolicy> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);

    // 1. The sample model becomes four tier Deployments scheduled onto the fake L4 node, and Ready.
    let mut qm: QuantizedModel = sample("smollm2-135m.quantizedmodel.yaml");
    // The fake L4 node has 4 GPUs: one replica per tier fills it.
    qm.spec.tiers[3].replicas = 1;
    models.create(&PostParams::default(), &qm).await.map_err(kerr("creating the sample model"))?;
    until("the sample model to be Ready", CONVERGE, || async {
        Ok(match condition_of(&models, "smollm2-135m", "Ready").await? {
            Some((s, _)) if s == "True" => Probe::Done(()),
            other => Probe::Pending(format!("Ready: {other:?}")),
        })
    })
    .await?;
    let names: Vec<String> = deployments
        .list(&ListParams::default().labels(&format!("{MODEL_LABEL}=smollm2-135m")))
        .await
        .map_err(kerr("listing deployments"))?
        .iter()
        .map(|d| d.name_any())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    let pods = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels("quantfleet.io/tier=int4-awq"))
        .await
        .map_err(kerr("listing pods"))?;
    assert_eq!(pods.items.len(), 1);
    for pod in &pods {
        assert_eq!(pod.spec.as_ref().unwrap().node_name.as_deref(), Some("gpu-l4-0"), "scheduled onto the L4 node");
    }
    // QuantizationVerified from the nodes' ModelInfo in the router report: one tier serving int8 instead of its
    // declared int4 is a mismatch naming it; once every tier reports its declared spec, verified.
    feed.set_nodes(&ns, &qm, &["int4-awq"]);
    let mismatch = until("QuantizationVerified=False", CONVERGE, || async {
        let qm = models.get("smollm2-135m").await.map_err(kerr("reading the model"))?;
        let c = qm.status.and_then(|s| find(&s.conditions, "QuantizationVerified").cloned());
        Ok(match c {
            Some(c) if c.status == "False" => Probe::Done(c),
            other => Probe::Pending(format!("{other:?}")),
        })
    })
    .await?;
    assert_eq!(mismatch.reason, "PrecisionMismatch");
    assert!(
        mismatch.message.starts_with("tier int4-awq at ") && mismatch.message.contains(r#"served {"format":"int8""#),
        "{}",
        mismatch.message
    );
    feed.set_nodes(&ns, &qm, &[]);
    until("QuantizationVerified=True", CONVERGE, || async {
        Ok(match condition_of(&models, "smollm2-135m", "QuantizationVerified").await? {
            Some((s, r)) if s == "True" => Probe::Done(r),
            other => Probe::Pending(format!("{other:?}")),
        })
    })
    .await
    .map(|reason| assert_eq!(reason, "AllTiersVerified"))?;
    let status = models.get("smollm2-135m").await.map_err(kerr("reading the model"))?.status.unwrap();
    assert_eq!(condition_of(&models, "smollm2-135m", "FitsAccelerator").await?.unwrap().0, "True");
    assert!(
        status.tiers.iter().all(|t| t.fits && t.weight_bytes > 0 && t.ready_replicas == t.replicas),
        "{:?}",
        status.tiers
    );

    // 2. A tier that does not fit an L4 is refused with a reason and creates nothing.
    let mut big = qm.clone();
    big.metadata.name = Some("llama-70b".into());
    big.spec.architecture = quantfleet_api::ModelArchitecture {
        num_layers: 80,
        hidden_size: 8192,
        intermediate_size: 28672,
        num_attention_heads: 64,
        num_key_value_heads: 8,
        head_dim: 128,
        vocab_size: 128_256,
        tied_embeddings: false,
        max_position_embeddings: 8192,
    };
    big.spec.tiers.truncate(1);
    models.create(&PostParams::default(), &big).await.map_err(kerr("creating the 70B model"))?;
    until("the 70B model to report FitsAccelerator=False", CONVERGE, || async {
        Ok(match condition_of(&models, "llama-70b", "FitsAccelerator").await? {
            Some((s, r)) if s == "False" => Probe::Done(r),
            other => Probe::Pending(format!("{other:?}")),
        })
    })
    .await
    .map(|reason| assert_eq!(reason, "TierDoesNotFit"))?;
    let created = deployments.list(&ListParams::default().labels(&format!("{MODEL_LABEL}=llama-70b"))).await.unwrap();
    assert!(created.items.is_empty(), "a tier that does not fit must not be deployed");

    // 2b. A tier calibrated on a ConfigMap that does not exist yet is not applied, and says why; once the
    //     ConfigMap exists, the tier's pods mount it and the node config names the file.
    let mut calibrated = qm.clone();
    calibrated.metadata.name = Some("calibrated".into());
    calibrated.spec.tiers = vec![qm.spec.tiers[3].clone()];
    calibrated.spec.tiers[0].calibration.as_mut().unwrap().dataset = "configmap/chat-logs".into();
    models.create(&PostParams::default(), &calibrated).await.map_err(kerr("creating the calibrated model"))?;
    until("the calibrated model to report CalibrationDataMissing", CONVERGE, || async {
        Ok(match condition_of(&models, "calibrated", "Ready").await? {
            Some((s, r)) if s == "False" && r == "CalibrationDataMissing" => Probe::Done(()),
            other => Probe::Pending(format!("{other:?}")),
        })
    })
    .await?;
    let status = models.get("calibrated").await.map_err(kerr("reading the model"))?.status.unwrap();
    assert_eq!(
        status.tiers[0].message.as_deref(),
        Some(format!("ConfigMap chat-logs not found in {ns} (calibration.dataset: configmap/chat-logs)").as_str())
    );
    let lp = ListParams::default().labels(&format!("{MODEL_LABEL}=calibrated"));
    assert!(deployments.list(&lp).await.unwrap().items.is_empty(), "no tier without its calibration text");
    let text = ConfigMap {
        metadata: ObjectMeta { name: Some("chat-logs".into()), ..ObjectMeta::default() },
        data: Some([("calibration.txt".to_owned(), "User: hi\nAssistant: Hello! How can I help?".to_owned())].into()),
        ..ConfigMap::default()
    };
    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &text)
        .await
        .map_err(kerr("creating the calibration ConfigMap"))?;
    let deployment = until("the calibrated tier to be applied", CONVERGE, || async {
        let mut items = deployments.list(&lp).await.map_err(kerr("listing deployments"))?.items;
        Ok(match items.pop() {
            Some(d) => Probe::Done(d),
            None => Probe::Pending("no Deployment yet".into()),
        })
    })
    .await?;
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    let volume = pod.volumes.unwrap().into_iter().find(|v| v.name == "calibration").expect("a calibration volume");
    assert_eq!(volume.config_map.unwrap().name, "chat-logs");
    let node_config = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("calibrated-int4-awq")
        .await
        .map_err(kerr("reading the tier ConfigMap"))?;
    let node_yaml = &node_config.data.unwrap()["node.yaml"];
    assert!(node_yaml.contains("calibrationFile: /etc/quantfleet-calibration/calibration.txt"), "{node_yaml}");

    // 3. No steady-state writes: nothing the operator owns changes while nothing else does.
    let before = resource_versions(&client, &ns, "smollm2-135m").await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(before, resource_versions(&client, &ns, "smollm2-135m").await, "the operator wrote in steady state");

    // 4. A canary on good evidence steps through 10% and 50% and is promoted; the operator is killed and
    //    restarted mid-canary and resumes without repeating a step. The evidence is the sum of both replicas:
    //    neither alone has the 200 samples the gate needs.
    let pp: PrecisionPolicy = sample("smollm2-135m.precisionpolicy.yaml");
    policies.create(&PostParams::default(), &pp).await.map_err(kerr("creating the sample policy"))?;
    wait_canary(&policies, "smollm2-135m", CanaryPhase::Shadowing, None).await?;
    let set = |f: &Feed, n: i64| f.set(&ns, "smollm2-135m", "int4-awq", TaskClass::Code, n, 0.01, 0.97);
    set(&feed, 150);
    set(&feed_b, 100);
    let step0 = wait_canary(&policies, "smollm2-135m", CanaryPhase::Stepping, Some(0)).await?;
    assert_eq!(step0.status.unwrap().canary.unwrap().evidence[0].window_start.samples, 250, "the sum of a and b");
    set(&feed, 300);
    set(&feed_b, 200);
    let stepping = wait_canary(&policies, "smollm2-135m", CanaryPhase::Stepping, Some(1)).await?;

    let _ = stop.send(());
    handle.await.unwrap();
    let (stop, handle) = start_operator(&client, &ns);
    // The restarted operator sees the same counters: the step-1 window is still empty, so it must stay put.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let resumed = policies.get("smollm2-135m").await.map_err(kerr("reading the policy"))?;
    let (a, b) = (stepping.status.unwrap().canary.unwrap(), resumed.status.unwrap().canary.unwrap());
    assert_eq!((b.phase, b.step, b.live_percent), (CanaryPhase::Stepping, Some(1), 50));
    assert_eq!(a.evidence[0].window_start, b.evidence[0].window_start, "the restart must resume the same window");
    assert_eq!(b.evidence[0].window_start.samples, 500);

    // Replica b cannot be read: a alone has enough new samples (300), but the canary must hold and say so.
    feed_b.fail(true);
    set(&feed, 600);
    let held = until("the canary to hold on incomplete evidence", CONVERGE, || async {
        let pp = policies.get("smollm2-135m").await.map_err(kerr("reading the policy"))?;
        let canary = pp.status.and_then(|s| s.canary).unwrap();
        Ok(match &canary.message {
            Some(m) if m.starts_with("holding: canary evidence is incomplete") => Probe::Done(canary),
            other => Probe::Pending(format!("{:?} {:?} {other:?}", canary.phase, canary.step)),
        })
    })
    .await?;
    assert_eq!((held.phase, held.step, held.live_percent), (CanaryPhase::Stepping, Some(1), 50));
    let message = held.message.unwrap();
    assert!(message.contains("read 1 of 2 router replicas") && message.contains("HTTP 503"), "{message}");
    tokio::time::sleep(Duration::from_secs(12)).await;
    let still = policies.get("smollm2-135m").await.unwrap().status.unwrap().canary.unwrap();
    assert_eq!((still.phase, still.step), (CanaryPhase::Stepping, Some(1)), "no step on partial evidence");
    let events = Api::<Event>::namespaced(client.clone(), &ns).list(&ListParams::default()).await.unwrap();
    let incomplete: Vec<&Event> =
        events.iter().filter(|e| e.reason.as_deref() == Some("CanaryEvidenceIncomplete")).collect();
    assert_eq!(incomplete.len(), 1, "one Warning Event for the hold");
    assert_eq!(incomplete[0].type_.as_deref(), Some("Warning"));

    // b is back, restarted: its counters went down from 200 to 100, all of them new. Window: 300 + 100 >= 250.
    set(&feed_b, 100);
    feed_b.fail(false);
    let promoted = wait_canary(&policies, "smollm2-135m", CanaryPhase::Promoted, None).await?;
    let final_code = promoted.status.as_ref().unwrap().canary.as_ref().unwrap().evidence[0].clone();
    assert_eq!(final_code.samples, 400, "a's 300 new pairs and restarted b's 100: {final_code:?}");
    let routes = promoted.status.unwrap().effective_routes;
    let code = routes.iter().find(|r| r.task_class == TaskClass::Code).unwrap();
    assert_eq!((code.tier.as_str(), code.fallbacks.clone()), ("int4-awq", vec!["fp8".to_owned(), "bf16".to_owned()]));
    let events = Api::<Event>::namespaced(client.clone(), &ns).list(&ListParams::default()).await.unwrap();
    let reasons: Vec<String> = events.iter().filter_map(|e| e.reason.clone()).collect();
    for reason in ["CanaryShadowing", "CanaryStepped", "CanaryPromoted"] {
        assert!(reasons.iter().any(|r| r == reason), "missing Event {reason}: {reasons:?}");
    }
    assert_eq!(pp.spec, policies.get("smollm2-135m").await.unwrap().spec, "the operator never writes spec");

    // 5. A canary on bad evidence rolls back.
    let mut bad: PrecisionPolicy = sample("smollm2-135m.precisionpolicy.yaml");
    bad.metadata.name = Some("math-kv8".into());
    let canary = bad.spec.canary.as_mut().unwrap();
    canary.candidate_tier = "fp8-kv8".into();
    canary.task_classes = vec![TaskClass::Math];
    canary.gates[0].task_class = Some(TaskClass::Math);
    policies.create(&PostParams::default(), &bad).await.map_err(kerr("creating the bad policy"))?;
    wait_canary(&policies, "math-kv8", CanaryPhase::Shadowing, None).await?;
    feed.set(&ns, "math-kv8", "fp8-kv8", TaskClass::Math, 300, 0.4, 0.7);
    let rolled = wait_canary(&policies, "math-kv8", CanaryPhase::RolledBack, None).await?;
    let status = rolled.status.unwrap();
    let math = status.effective_routes.iter().find(|r| r.task_class == TaskClass::Math).unwrap();
    assert_eq!((math.tier.as_str(), math.candidate_tier.clone()), ("bf16", None));
    let healthy = find(&status.conditions, "CanaryHealthy").unwrap();
    assert_eq!((healthy.status.as_str(), healthy.reason.as_str()), ("False", "GateFailed"));
    assert!(healthy.message.contains("maxMeanKlDivergence"), "{}", healthy.message);

    // 6. Deleting the model garbage-collects every tier object.
    models.delete("smollm2-135m", &DeleteParams::foreground()).await.map_err(kerr("deleting the model"))?;
    until("the tier objects to be garbage-collected", CONVERGE, || async {
        let left = deployments
            .list(&ListParams::default().labels(&format!("{MODEL_LABEL}=smollm2-135m")))
            .await
            .map_err(kerr("listing deployments"))?;
        let services = Api::<Service>::namespaced(client.clone(), &ns)
            .list(&ListParams::default().labels(&format!("{MODEL_LABEL}=smollm2-135m")))
            .await
            .map_err(kerr("listing services"))?;
        Ok(if left.items.is_empty() && services.items.is_empty() {
            Probe::Done(())
        } else {
            Probe::Pending(format!("{} deployments, {} services left", left.items.len(), services.items.len()))
        })
    })
    .await?;

    let _ = stop.send(());
    handle.await.unwrap();
    env.cleanup().await
}

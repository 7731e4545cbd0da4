//! Where the operator reads canary evidence: the router's `GET /v1/canary/stats` (a [`CanaryStatsReport`]),
//! from every router replica.
//!
//! Each router replica keeps its own cumulative counters, so reading them through the router Service would
//! give a different replica's counters on each read. [`RouterStats`] instead discovers every replica (the
//! ready or serving endpoints of the router Service's EndpointSlices; or one URL for local use), reads them all
//! and keeps one cumulative total per (policy namespace, policy, candidate tier, task class) in [`Aggregate`]:
//! the sum of what every replica counted, built from per-replica snapshots so that a replica whose counters went
//! down (it restarted) contributes everything it has now as new, as [`ComparisonSums::since`] does for one
//! router. The totals only grow while this operator runs, so the canary's windows (differences of totals) stay
//! consistent whichever replica answers.
//!
//! A replica that cannot be read makes the read incomplete ([`Evidence::problem`]): its samples since the last
//! read are missing until it answers again. The canary must not start or pass a window on incomplete evidence
//! (see `crate::canary`). A missing or unreachable router is not a reconcile error: the canary holds and says why.
//!
//! On the first read after the operator starts, each replica's whole counters count (the totals start as the sum
//! of every replica's counters): with no replica restarted in between, a restarted operator sees the totals it
//! left and resumes its window. If a replica restarted meanwhile, the totals are lower than a window's start and
//! the window counts everything as new, as after a router restart with one replica.

use futures::future::join_all;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use quantfleet_api::TaskClass;
use quantfleet_api::stats::{CanaryStatsReport, ComparisonSums, NodeReport};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The path of the router's canary stats.
pub const STATS_PATH: &str = "/v1/canary/stats";

/// How long the snapshots of a replica that left the EndpointSlices are kept: a replica that was only briefly
/// unready comes back with the same counters and must not count them twice.
pub const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// Why the stats of one replica could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("router stats URL {0:?} is not a valid http:// URL")]
    BadUrl(String),
    #[error("requesting router stats: {0}")]
    Request(String),
    #[error("router stats answered HTTP {0}")]
    Status(u16),
    #[error("router stats are not a canary stats report: {0}")]
    Decode(String),
    #[error("router stats did not answer within {0:?}")]
    Timeout(Duration),
    #[error("router Service {0:?} is not NAMESPACE/NAME")]
    BadService(String),
}

/// Reads one router's canary stats over HTTP/1.
#[derive(Clone)]
pub struct HttpStats {
    url: hyper::Uri,
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

fn parse_url(url: &str) -> Result<hyper::Uri, StatsError> {
    let uri: hyper::Uri = url.parse().map_err(|_| StatsError::BadUrl(url.to_owned()))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(StatsError::BadUrl(url.to_owned()));
    }
    Ok(uri)
}

async fn get_report(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: hyper::Uri,
    timeout: Duration,
) -> Result<CanaryStatsReport, StatsError> {
    let request = async {
        let response = client.get(url).await.map_err(|e| StatsError::Request(e.to_string()))?;
        if !response.status().is_success() {
            return Err(StatsError::Status(response.status().as_u16()));
        }
        let body = response.into_body().collect().await.map_err(|e| StatsError::Request(e.to_string()))?.to_bytes();
        serde_json::from_slice(&body).map_err(|e| StatsError::Decode(e.to_string()))
    };
    tokio::time::timeout(timeout, request).await.map_err(|_| StatsError::Timeout(timeout))?
}

impl HttpStats {
    /// `url` is the full endpoint, e.g. `http://127.0.0.1:8080/v1/canary/stats`.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, StatsError> {
        Ok(HttpStats { url: parse_url(url)?, client: Client::builder(TokioExecutor::new()).build_http(), timeout })
    }

    pub async fn fetch(&self) -> Result<CanaryStatsReport, StatsError> {
        get_report(&self.client, self.url.clone(), self.timeout).await
    }
}

/// What the totals are kept per: (policy namespace, policy, candidate tier, task class).
pub type CounterKey = (String, String, String, TaskClass);

struct ReplicaState {
    /// The replica's cumulative counters at its last successful read.
    last: BTreeMap<CounterKey, ComparisonSums>,
    seen: Instant,
}

/// The cumulative totals over every router replica, from per-replica snapshots (pure; see the module docs).
#[derive(Default)]
pub struct Aggregate {
    replicas: BTreeMap<String, ReplicaState>,
    totals: BTreeMap<CounterKey, ComparisonSums>,
}

impl Aggregate {
    /// Adds what replica `id` counted since its previous report. Counters that went down (the replica restarted)
    /// count whole, as new; a key the replica no longer reports restarts from zero.
    pub fn observe(&mut self, id: &str, report: &CanaryStatsReport, now: Instant) {
        let state =
            self.replicas.entry(id.to_owned()).or_insert_with(|| ReplicaState { last: BTreeMap::new(), seen: now });
        state.seen = now;
        let mut current = BTreeMap::new();
        for policy in &report.policies {
            for class in &policy.classes {
                let key =
                    (policy.namespace.clone(), policy.policy.clone(), policy.candidate_tier.clone(), class.task_class);
                // A report naming the same key twice is summed, like two replicas.
                let sums: &mut ComparisonSums = current.entry(key).or_default();
                *sums = sums.plus(&class.sums);
            }
        }
        for (key, now_sums) in &current {
            let delta = now_sums.since(&state.last.get(key).copied().unwrap_or_default());
            let total = self.totals.entry(key.clone()).or_default();
            *total = total.plus(&delta);
        }
        state.last = current;
    }

    /// Drops the snapshots of replicas not read for `ttl` (their counted samples stay in the totals).
    pub fn forget_older_than(&mut self, now: Instant, ttl: Duration) {
        self.replicas.retain(|_, r| now.duration_since(r.seen) < ttl);
    }

    pub fn totals(&self) -> &BTreeMap<CounterKey, ComparisonSums> {
        &self.totals
    }
}

/// The canary evidence of one read of every router replica.
#[derive(Clone, Debug, Default)]
pub struct Evidence {
    /// Cumulative totals over every replica (see [`Aggregate`]).
    pub totals: BTreeMap<CounterKey, ComparisonSums>,
    /// Replicas whose report was read this time.
    pub replicas_read: usize,
    /// Replicas found (endpoints of the router Service, or 1 for a URL).
    pub replicas: usize,
    /// Why the read is incomplete (a replica unreadable, no replica found, discovery failed); None when every
    /// replica was read.
    pub problem: Option<String>,
    /// The nodes' ModelInfo as the replicas read this time report it, one entry per (namespace, tier,
    /// endpoint) (every replica reads every node).
    pub nodes: Vec<NodeReport>,
}

impl Evidence {
    /// The totals per task class of one policy's candidate.
    pub fn classes(&self, namespace: &str, policy: &str, candidate: &str) -> BTreeMap<TaskClass, ComparisonSums> {
        self.totals
            .iter()
            .filter(|((ns, p, c, _), _)| ns == namespace && p == policy && c == candidate)
            .map(|((_, _, _, class), sums)| (*class, *sums))
            .collect()
    }
}

/// Where the router replicas are.
#[derive(Clone)]
enum Replicas {
    /// One router (local use).
    Url(hyper::Uri),
    /// Every serving endpoint of a Service's EndpointSlices, on the Service's named port.
    Service(Box<ServiceReplicas>),
}

#[derive(Clone)]
struct ServiceReplicas {
    slices: Api<EndpointSlice>,
    namespace: String,
    name: String,
    port_name: String,
}

/// One replica to read: a stable identity (the pod's uid, else its address), a name for messages, the URL.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub id: String,
    pub name: String,
    pub url: String,
}

/// The replicas in `slices` (the EndpointSlices of one Service): every endpoint that is ready or still serving
/// (a terminating router drains and still counts), on the port named `port_name`, without duplicates.
pub fn targets_of(slices: &[EndpointSlice], port_name: &str) -> Vec<Target> {
    let mut targets: Vec<Target> = Vec::new();
    for slice in slices {
        let Some(port) =
            slice.ports.iter().flatten().find(|p| p.name.as_deref() == Some(port_name)).and_then(|p| p.port)
        else {
            continue;
        };
        let bracket = match slice.address_type.as_str() {
            "IPv4" | "FQDN" => false,
            "IPv6" => true,
            _ => continue,
        };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            // A nil `ready` means ready; a terminating endpoint is not ready but may still be serving.
            if conditions.ready == Some(false) && conditions.serving != Some(true) {
                continue;
            }
            let Some(address) = endpoint.addresses.first() else { continue };
            let host_port = if bracket { format!("[{address}]:{port}") } else { format!("{address}:{port}") };
            let pod = endpoint.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod"));
            let id =
                pod.and_then(|r| r.uid.clone()).map(|uid| format!("pod/{uid}")).unwrap_or_else(|| host_port.clone());
            let name = match pod.and_then(|r| r.name.clone()) {
                Some(pod) => format!("{pod} ({host_port})"),
                None => host_port.clone(),
            };
            if !targets.iter().any(|t| t.id == id) {
                targets.push(Target { id, name, url: format!("http://{host_port}{STATS_PATH}") });
            }
        }
    }
    targets.sort_by(|a, b| a.name.cmp(&b.name));
    targets
}

/// Reads every router replica and keeps the totals (see the module docs).
pub struct RouterStats {
    replicas: Replicas,
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
    /// Held for the whole read, so reads apply their snapshots in order.
    aggregate: tokio::sync::Mutex<Aggregate>,
    /// The last read and when it finished, for [`RouterStats::recent`].
    last: std::sync::Mutex<Option<(Instant, Evidence)>>,
}

impl RouterStats {
    fn with(replicas: Replicas, timeout: Duration) -> Self {
        RouterStats {
            replicas,
            client: Client::builder(TokioExecutor::new()).build_http(),
            timeout,
            aggregate: tokio::sync::Mutex::new(Aggregate::default()),
            last: std::sync::Mutex::new(None),
        }
    }

    /// One router at `url` (the full stats URL), for local use.
    pub fn url(url: &str, timeout: Duration) -> Result<Self, StatsError> {
        Ok(Self::with(Replicas::Url(parse_url(url)?), timeout))
    }

    /// Every replica behind the Service `service` ("NAMESPACE/NAME"), found in its EndpointSlices (label
    /// `kubernetes.io/service-name`), on the Service port named `port_name`.
    pub fn service(
        client: kube::Client,
        service: &str,
        port_name: &str,
        timeout: Duration,
    ) -> Result<Self, StatsError> {
        let (namespace, name) = service
            .split_once('/')
            .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
            .ok_or_else(|| StatsError::BadService(service.to_owned()))?;
        Ok(Self::with(
            Replicas::Service(Box::new(ServiceReplicas {
                slices: Api::namespaced(client, namespace),
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                port_name: port_name.to_owned(),
            })),
            timeout,
        ))
    }

    async fn targets(&self) -> Result<Vec<Target>, String> {
        match &self.replicas {
            Replicas::Url(url) => Ok(vec![Target { id: url.to_string(), name: url.to_string(), url: url.to_string() }]),
            Replicas::Service(service) => {
                let ServiceReplicas { slices, namespace, name, port_name } = service.as_ref();
                let selector = format!("kubernetes.io/service-name={name}");
                let list = slices
                    .list(&ListParams::default().labels(&selector))
                    .await
                    .map_err(|e| format!("listing the EndpointSlices of Service {namespace}/{name}: {e}"))?;
                let targets = targets_of(&list.items, port_name);
                if targets.is_empty() {
                    return Err(format!(
                        "no ready router endpoint with port {port_name:?} in the EndpointSlices of Service {namespace}/{name}"
                    ));
                }
                Ok(targets)
            }
        }
    }

    /// Reads every replica (concurrently) and returns the updated totals.
    pub async fn read(&self) -> Evidence {
        let mut aggregate = self.aggregate.lock().await;
        let (targets, mut problems) = match self.targets().await {
            Ok(targets) => (targets, Vec::new()),
            Err(problem) => (Vec::new(), vec![problem]),
        };
        let reports = join_all(targets.iter().map(|t| async {
            let url = parse_url(&t.url)?;
            get_report(&self.client, url, self.timeout).await
        }))
        .await;
        let now = Instant::now();
        let mut replicas_read = 0;
        let mut nodes: Vec<NodeReport> = Vec::new();
        for (target, report) in targets.iter().zip(reports) {
            match report {
                Ok(report) => {
                    aggregate.observe(&target.id, &report, now);
                    replicas_read += 1;
                    for node in report.nodes {
                        if !nodes.iter().any(|n| {
                            (&n.namespace, &n.tier, &n.endpoint) == (&node.namespace, &node.tier, &node.endpoint)
                        }) {
                            nodes.push(node);
                        }
                    }
                }
                Err(err) => problems.push(format!("router replica {}: {err}", target.name)),
            }
        }
        aggregate.forget_older_than(now, FORGET_AFTER);
        let problem = (!problems.is_empty())
            .then(|| format!("read {replicas_read} of {} router replicas; {}", targets.len(), problems.join("; ")));
        nodes.sort_by(|a, b| (&a.namespace, &a.tier, &a.endpoint).cmp(&(&b.namespace, &b.tier, &b.endpoint)));
        let evidence =
            Evidence { totals: aggregate.totals().clone(), replicas_read, replicas: targets.len(), problem, nodes };
        *self.last.lock().expect("last read lock") = Some((Instant::now(), evidence.clone()));
        evidence
    }

    /// The last read if it is younger than `max_age`, else a new one (for readers that need no fresh counters,
    /// such as the QuantizedModel status: many models share one read).
    pub async fn recent(&self, max_age: Duration) -> Evidence {
        if let Some((at, evidence)) = self.last.lock().expect("last read lock").as_ref()
            && at.elapsed() < max_age
        {
            return evidence.clone();
        }
        self.read().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use quantfleet_api::stats::{ClassComparison, PolicyComparison};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// `n` synthetic pairs, each with KL `kl`, on policy ns/p, candidate int4.
    fn report(rows: &[(TaskClass, i64, f64)]) -> CanaryStatsReport {
        let classes = rows
            .iter()
            .map(|&(task_class, n, kl)| ClassComparison {
                task_class,
                sums: ComparisonSums {
                    samples: n,
                    kl_divergence_sum: n as f64 * kl,
                    top1_agreement_sum: n as f64 * 0.9,
                    structured_samples: n / 2,
                    ..ComparisonSums::default()
                },
                dropped: 0,
            })
            .collect();
        CanaryStatsReport {
            policies: vec![PolicyComparison {
                namespace: "ns".into(),
                policy: "p".into(),
                candidate_tier: "int4".into(),
                classes,
            }],
            nodes: Vec::new(),
        }
    }

    fn total(aggregate: &Aggregate, class: TaskClass) -> ComparisonSums {
        aggregate.totals().get(&("ns".into(), "p".into(), "int4".into(), class)).copied().unwrap_or_default()
    }

    /// Table: a sequence of (replica, its cumulative samples of `code`) reads -> the total after each read.
    #[test]
    fn totals_sum_replicas_and_survive_restarts() {
        type Case = (&'static str, &'static [(&'static str, i64)], &'static [i64]);
        let cases: &[Case] = &[
            ("one replica counts its growth", &[("a", 10), ("a", 25), ("a", 25)], &[10, 25, 25]),
            ("two replicas add up", &[("a", 10), ("b", 5), ("a", 12), ("b", 9)], &[10, 15, 17, 21]),
            // b restarts: its counter goes from 40 down to 3: those 3 are new, nothing is subtracted.
            ("a restart counts the new counters whole", &[("a", 10), ("b", 40), ("b", 3), ("b", 8)], &[10, 50, 53, 58]),
            ("reads in any order", &[("b", 7), ("a", 1), ("b", 7), ("a", 1)], &[7, 8, 8, 8]),
        ];
        for (name, reads, want) in cases {
            let mut aggregate = Aggregate::default();
            let now = Instant::now();
            let got: Vec<i64> = reads
                .iter()
                .map(|&(replica, n)| {
                    aggregate.observe(replica, &report(&[(TaskClass::Code, n, 0.01)]), now);
                    total(&aggregate, TaskClass::Code).samples
                })
                .collect();
            assert_eq!(&got, want, "{name}");
        }
    }

    #[test]
    fn every_sum_is_carried_per_class() {
        let mut aggregate = Aggregate::default();
        let now = Instant::now();
        aggregate.observe("a", &report(&[(TaskClass::Code, 100, 0.01), (TaskClass::Math, 10, 0.5)]), now);
        aggregate.observe("b", &report(&[(TaskClass::Code, 300, 0.05)]), now);
        let code = total(&aggregate, TaskClass::Code);
        assert_eq!((code.samples, code.structured_samples), (400, 200));
        // The mean over both replicas weighs each pair once: (100 * 0.01 + 300 * 0.05) / 400.
        assert!((code.mean_kl_divergence().unwrap() - 0.04).abs() < 1e-12);
        assert_eq!(total(&aggregate, TaskClass::Math).samples, 10);
        let evidence = Evidence { totals: aggregate.totals().clone(), ..Evidence::default() };
        let classes = evidence.classes("ns", "p", "int4");
        assert_eq!(classes.len(), 2);
        assert!(evidence.classes("ns", "p", "fp8").is_empty());
    }

    #[test]
    fn a_key_that_disappears_restarts_from_zero_and_forgotten_replicas_count_whole() {
        let mut aggregate = Aggregate::default();
        let t0 = Instant::now();
        aggregate.observe("a", &report(&[(TaskClass::Code, 20, 0.01)]), t0);
        // The replica restarted and has not seen a `code` pair yet: no key; then 5 new pairs.
        aggregate.observe("a", &CanaryStatsReport::default(), t0);
        aggregate.observe("a", &report(&[(TaskClass::Code, 5, 0.01)]), t0);
        assert_eq!(total(&aggregate, TaskClass::Code).samples, 25);
        // A replica read again within the TTL keeps its snapshot: nothing counted twice.
        aggregate.forget_older_than(t0 + Duration::from_secs(10), Duration::from_secs(60));
        aggregate.observe("a", &report(&[(TaskClass::Code, 5, 0.01)]), t0 + Duration::from_secs(10));
        assert_eq!(total(&aggregate, TaskClass::Code).samples, 25);
        // Forgotten after the TTL: what it reports then is a new replica's.
        aggregate.forget_older_than(t0 + Duration::from_secs(100), Duration::from_secs(60));
        aggregate.observe("a", &report(&[(TaskClass::Code, 7, 0.01)]), t0 + Duration::from_secs(100));
        assert_eq!(total(&aggregate, TaskClass::Code).samples, 32);
    }

    fn endpoint(address: &str, pod: Option<(&str, &str)>, ready: Option<bool>, serving: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![address.into()],
            conditions: Some(EndpointConditions { ready, serving, terminating: None }),
            target_ref: pod.map(|(name, uid)| ObjectReference {
                kind: Some("Pod".into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
                ..ObjectReference::default()
            }),
            ..Endpoint::default()
        }
    }

    fn slice(address_type: &str, port: Option<(&str, i32)>, endpoints: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            address_type: address_type.into(),
            endpoints,
            ports: Some(
                port.map(|(name, port)| EndpointPort {
                    name: Some(name.into()),
                    port: Some(port),
                    ..EndpointPort::default()
                })
                .into_iter()
                .collect(),
            ),
            ..EndpointSlice::default()
        }
    }

    #[test]
    fn targets_are_the_serving_endpoints_on_the_named_port() {
        let slices = vec![
            slice(
                "IPv4",
                Some(("http", 8080)),
                vec![
                    endpoint("10.0.0.1", Some(("router-a", "uid-a")), None, None),
                    endpoint("10.0.0.2", Some(("router-b", "uid-b")), Some(false), Some(true)), // terminating, draining
                    endpoint("10.0.0.3", Some(("router-c", "uid-c")), Some(false), Some(false)), // not serving
                ],
            ),
            // The same pod in a second slice while the controller moves it: read once.
            slice(
                "IPv4",
                Some(("http", 8080)),
                vec![endpoint("10.0.0.1", Some(("router-a", "uid-a")), Some(true), None)],
            ),
            slice("IPv6", Some(("http", 8080)), vec![endpoint("fd00::4", None, Some(true), None)]),
            slice("IPv4", Some(("metrics", 9090)), vec![endpoint("10.0.0.5", None, None, None)]),
            slice("IPv4", None, vec![endpoint("10.0.0.6", None, None, None)]),
        ];
        let targets = targets_of(&slices, "http");
        let urls: Vec<(&str, &str)> = targets.iter().map(|t| (t.id.as_str(), t.url.as_str())).collect();
        assert_eq!(
            urls,
            vec![
                ("[fd00::4]:8080", "http://[fd00::4]:8080/v1/canary/stats"),
                ("pod/uid-a", "http://10.0.0.1:8080/v1/canary/stats"),
                ("pod/uid-b", "http://10.0.0.2:8080/v1/canary/stats"),
            ]
        );
        assert_eq!(targets[1].name, "router-a (10.0.0.1:8080)");
    }

    #[tokio::test]
    async fn service_names_are_checked() {
        // A client for an API server that is never called: only the name is checked here.
        let client = kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
        for bad in ["router", "/router", "ns/", "a/b/c"] {
            let err = RouterStats::service(client.clone(), bad, "http", Duration::from_secs(1)).err();
            assert!(matches!(err, Some(StatsError::BadService(_))), "{bad}");
        }
        assert!(RouterStats::service(client, "quantfleet-system/router", "http", Duration::from_secs(1)).is_ok());
    }

    #[tokio::test]
    async fn a_url_source_reads_one_router_and_reports_failures() {
        let body = serde_json::to_string(&report(&[(TaskClass::Code, 3, 0.1)])).unwrap();
        let response =
            Box::leak(format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len()).into_boxed_str());
        let source = RouterStats::url(&serve_once(response).await, Duration::from_secs(5)).unwrap();
        let evidence = source.read().await;
        assert_eq!((evidence.replicas_read, evidence.replicas, evidence.problem.clone()), (1, 1, None));
        assert_eq!(evidence.classes("ns", "p", "int4")[&TaskClass::Code].samples, 3);
        // The server answered once; now nothing listens: the read is incomplete, the totals are kept.
        let again = source.read().await;
        assert_eq!(again.replicas_read, 0);
        assert!(again.problem.as_deref().unwrap().starts_with("read 0 of 1 router replicas; router replica http://"));
        assert_eq!(again.classes("ns", "p", "int4")[&TaskClass::Code].samples, 3);
    }

    /// Serves one canned HTTP response on loopback and returns its URL.
    async fn serve_once(response: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
            socket.write_all(response.as_bytes()).await.unwrap();
        });
        format!("http://{addr}/v1/canary/stats")
    }

    #[tokio::test]
    async fn reads_a_report() {
        let body = r#"{"policies":[{"namespace":"ns","policy":"p","candidateTier":"int4","classes":[{"taskClass":"code","samples":3,"klDivergenceSum":0.3,"top1AgreementSum":2.7,"logPerplexityRatioSum":0.0,"structuredSamples":0,"structuredInvalid":0,"latencyRatioSum":3.0}]}]}"#;
        let response = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let stats = HttpStats::new(&serve_once(response).await, Duration::from_secs(5)).unwrap();
        let report = stats.fetch().await.unwrap();
        assert_eq!(report.policies[0].classes[0].sums.samples, 3);
    }

    #[tokio::test]
    async fn errors_are_typed() {
        let url = serve_once("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
        assert!(matches!(
            HttpStats::new(&url, Duration::from_secs(5)).unwrap().fetch().await,
            Err(StatsError::Status(503))
        ));
        let url = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]").await;
        assert!(matches!(
            HttpStats::new(&url, Duration::from_secs(5)).unwrap().fetch().await,
            Err(StatsError::Decode(_))
        ));
        assert!(matches!(HttpStats::new("ftp://x/y", Duration::from_secs(1)), Err(StatsError::BadUrl(_))));
        // Nothing listens on port 1.
        let err = HttpStats::new("http://127.0.0.1:1/v1/canary/stats", Duration::from_secs(5)).unwrap().fetch().await;
        assert!(matches!(err, Err(StatsError::Request(_))));
    }
}

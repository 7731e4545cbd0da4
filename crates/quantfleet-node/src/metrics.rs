//! The node's Prometheus metrics, kept as atomics and rendered in the text exposition format on `GET /metrics`
//! of a separate HTTP port. Labels are bounded: `model` and `tier` (one value each per process), `rpc` and
//! `outcome` (fixed sets), so cardinality never grows with traffic.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// How a request ended; the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    InvalidArgument,
    ResourceExhausted,
    Cancelled,
    DeadlineExceeded,
    Internal,
    Unavailable,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Ok,
        Outcome::InvalidArgument,
        Outcome::ResourceExhausted,
        Outcome::Cancelled,
        Outcome::DeadlineExceeded,
        Outcome::Internal,
        Outcome::Unavailable,
    ];
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::InvalidArgument => "invalid_argument",
            Outcome::ResourceExhausted => "resource_exhausted",
            Outcome::Cancelled => "cancelled",
            Outcome::DeadlineExceeded => "deadline_exceeded",
            Outcome::Internal => "internal",
            Outcome::Unavailable => "unavailable",
        }
    }
    pub fn of_code(code: tonic::Code) -> Self {
        match code {
            tonic::Code::Ok => Outcome::Ok,
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => Outcome::InvalidArgument,
            tonic::Code::ResourceExhausted => Outcome::ResourceExhausted,
            tonic::Code::Cancelled => Outcome::Cancelled,
            tonic::Code::DeadlineExceeded => Outcome::DeadlineExceeded,
            tonic::Code::Unavailable => Outcome::Unavailable,
            _ => Outcome::Internal,
        }
    }
}

/// The RPCs counted; the `rpc` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    Generate,
    Score,
}

impl Rpc {
    fn label(self) -> &'static str {
        match self {
            Rpc::Generate => "generate",
            Rpc::Score => "score",
        }
    }
}

/// A cumulative histogram with fixed bucket bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in nanoseconds (exact integer accumulation).
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }
    pub fn observe(&self, d: std::time::Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|&b| s <= b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_nanos.load(Relaxed) as f64 * 1e-9);
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

const TTFT_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const ITL_BOUNDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Gauges the engine loop publishes after every step.
#[derive(Default)]
pub struct EngineGauges {
    pub queue_depth: AtomicU64,
    pub running_sequences: AtomicU64,
    pub kv_blocks_used: AtomicU64,
    pub kv_blocks_free: AtomicU64,
}

pub struct Metrics {
    labels: String,
    requests: [[AtomicU64; 7]; 2],
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub numerical_faults: AtomicU64,
    pub engine_steps: AtomicU64,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub gauges: EngineGauges,
    /// 1 while health is SERVING.
    pub serving: AtomicU64,
    info: Mutex<Option<String>>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    pub fn new(model: &str, tier: &str) -> Arc<Self> {
        Arc::new(Self {
            labels: format!("model=\"{}\",tier=\"{}\"", escape(model), escape(tier)),
            requests: Default::default(),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            numerical_faults: AtomicU64::new(0),
            engine_steps: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BOUNDS),
            inter_token: Histogram::new(ITL_BOUNDS),
            gauges: EngineGauges::default(),
            serving: AtomicU64::new(0),
            info: Mutex::new(None),
        })
    }

    /// Static facts of the loaded model (backend, KV capacity), exported as an info metric once known.
    pub fn set_info(&self, backend: &str, kv_blocks_total: u64) {
        let line = format!("backend=\"{}\",kv_blocks_total=\"{kv_blocks_total}\"", escape(backend));
        *self.info.lock().unwrap_or_else(|e| e.into_inner()) = Some(line);
    }

    pub fn request(&self, rpc: Rpc, outcome: Outcome) {
        let i = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.requests[rpc as usize][i].fetch_add(1, Relaxed);
    }

    pub fn render(&self) -> String {
        let l = &self.labels;
        let mut out = String::with_capacity(8 << 10);
        let _ = writeln!(out, "# HELP quantfleet_node_requests_total Requests finished, by RPC and outcome.");
        let _ = writeln!(out, "# TYPE quantfleet_node_requests_total counter");
        for rpc in [Rpc::Generate, Rpc::Score] {
            for (i, o) in Outcome::ALL.iter().enumerate() {
                let v = self.requests[rpc as usize][i].load(Relaxed);
                let _ = writeln!(
                    out,
                    "quantfleet_node_requests_total{{{l},rpc=\"{}\",outcome=\"{}\"}} {v}",
                    rpc.label(),
                    o.label()
                );
            }
        }
        let counters = [
            ("prompt_tokens_total", "Prompt tokens admitted.", &self.prompt_tokens),
            ("generated_tokens_total", "Tokens generated.", &self.generated_tokens),
            ("numerical_faults_total", "Requests failed by NaN/Inf logits.", &self.numerical_faults),
            ("engine_steps_total", "Batched forward steps run by the engine loop.", &self.engine_steps),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP quantfleet_node_{name} {help}\n# TYPE quantfleet_node_{name} counter");
            let _ = writeln!(out, "quantfleet_node_{name}{{{l}}} {}", v.load(Relaxed));
        }
        let g = &self.gauges;
        let gauges = [
            ("queue_depth", "Requests waiting for admission.", &g.queue_depth),
            ("running_sequences", "Sequences in the running batch.", &g.running_sequences),
            ("kv_blocks_used", "KV-cache blocks held by sequences.", &g.kv_blocks_used),
            ("kv_blocks_free", "KV-cache blocks free.", &g.kv_blocks_free),
            ("serving", "1 when health is SERVING, else 0.", &self.serving),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP quantfleet_node_{name} {help}\n# TYPE quantfleet_node_{name} gauge");
            let _ = writeln!(out, "quantfleet_node_{name}{{{l}}} {}", v.load(Relaxed));
        }
        let hists = [
            ("time_to_first_token_seconds", "Arrival to first generated token.", &self.ttft),
            ("inter_token_latency_seconds", "Time between consecutive tokens of a stream.", &self.inter_token),
        ];
        for (name, help, h) in hists {
            let _ = writeln!(out, "# HELP quantfleet_node_{name} {help}\n# TYPE quantfleet_node_{name} histogram");
            h.render(&mut out, &format!("quantfleet_node_{name}"), l);
        }
        if let Some(info) = self.info.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = writeln!(out, "# HELP quantfleet_node_info The loaded model's backend and KV capacity.");
            let _ = writeln!(out, "# TYPE quantfleet_node_info gauge\nquantfleet_node_info{{{l},{info}}} 1");
        }
        out
    }
}

/// Serves `GET /metrics` (anything else: 404) until the listener is dropped with the task.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    if req.uri().path() == "/metrics" && req.method() == hyper::Method::GET {
                        hyper::Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(Full::new(Bytes::from(metrics.render())))
                    } else {
                        hyper::Response::builder().status(404).body(Full::new(Bytes::from_static(b"not found\n")))
                    }
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_labels_escaped() {
        let m = Metrics::new("m\"x", "fp8");
        m.ttft.observe(std::time::Duration::from_millis(3));
        m.ttft.observe(std::time::Duration::from_millis(40));
        m.ttft.observe(std::time::Duration::from_secs(100));
        m.request(Rpc::Score, Outcome::ResourceExhausted);
        let text = m.render();
        let l = r#"model="m\"x",tier="fp8""#;
        assert!(text.contains(&format!("quantfleet_node_time_to_first_token_seconds_bucket{{{l},le=\"0.005\"}} 1")));
        assert!(text.contains(&format!("quantfleet_node_time_to_first_token_seconds_bucket{{{l},le=\"0.05\"}} 2")));
        assert!(text.contains(&format!("quantfleet_node_time_to_first_token_seconds_bucket{{{l},le=\"+Inf\"}} 3")));
        assert!(text.contains(&format!("quantfleet_node_time_to_first_token_seconds_count{{{l}}} 3")));
        assert!(text.contains(&format!(
            "quantfleet_node_requests_total{{{l},rpc=\"score\",outcome=\"resource_exhausted\"}} 1"
        )));
    }
}

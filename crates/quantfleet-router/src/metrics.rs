//! The router's Prometheus metrics in the text exposition format. Label values come from bounded sets
//! (task classes, rule names, tier and endpoint names from the configuration, fixed outcome categories),
//! never from request content.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// A counter or gauge family.
pub struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    labels: &'static [&'static str],
    values: Mutex<BTreeMap<Vec<String>, f64>>,
}

impl Family {
    const fn new(name: &'static str, help: &'static str, kind: &'static str, labels: &'static [&'static str]) -> Self {
        Family { name, help, kind, labels, values: Mutex::new(BTreeMap::new()) }
    }
    pub fn add(&self, labels: &[&str], v: f64) {
        debug_assert_eq!(labels.len(), self.labels.len(), "{}", self.name);
        let key = labels.iter().map(|s| (*s).to_owned()).collect();
        *self.values.lock().expect("metrics lock").entry(key).or_default() += v;
    }
    pub fn inc(&self, labels: &[&str]) {
        self.add(labels, 1.0);
    }
    pub fn set(&self, labels: &[&str], v: f64) {
        let key = labels.iter().map(|s| (*s).to_owned()).collect();
        self.values.lock().expect("metrics lock").insert(key, v);
    }
    pub fn get(&self, labels: &[&str]) -> f64 {
        let key: Vec<String> = labels.iter().map(|s| (*s).to_owned()).collect();
        self.values.lock().expect("metrics lock").get(&key).copied().unwrap_or(0.0)
    }
    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} {}", self.name, self.help, self.name, self.kind);
        for (key, v) in self.values.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "{}{} {}", self.name, label_text(self.labels, key, None), v);
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn label_text(names: &[&str], values: &[String], le: Option<&str>) -> String {
    let mut parts: Vec<String> = names.iter().zip(values).map(|(n, v)| format!("{n}=\"{}\"", escape(v))).collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() { String::new() } else { format!("{{{}}}", parts.join(",")) }
}

/// Per label set: cumulative bucket counts, sum, count.
type Buckets = (Vec<u64>, f64, u64);

/// A histogram family with fixed buckets.
pub struct Histogram {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    buckets: &'static [f64],
    values: Mutex<BTreeMap<Vec<String>, Buckets>>,
}

impl Histogram {
    const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        buckets: &'static [f64],
    ) -> Self {
        Histogram { name, help, labels, buckets, values: Mutex::new(BTreeMap::new()) }
    }
    pub fn observe(&self, labels: &[&str], v: f64) {
        let key = labels.iter().map(|s| (*s).to_owned()).collect();
        let mut map = self.values.lock().expect("metrics lock");
        let entry = map.entry(key).or_insert_with(|| (vec![0; self.buckets.len()], 0.0, 0));
        for (i, b) in self.buckets.iter().enumerate() {
            if v <= *b {
                entry.0[i] += 1;
            }
        }
        entry.1 += v;
        entry.2 += 1;
    }
    /// Observations so far for these labels.
    pub fn count(&self, labels: &[&str]) -> u64 {
        let key: Vec<String> = labels.iter().map(|s| (*s).to_owned()).collect();
        self.values.lock().expect("metrics lock").get(&key).map_or(0, |e| e.2)
    }
    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} histogram", self.name, self.help, self.name);
        for (key, (counts, sum, count)) in self.values.lock().expect("metrics lock").iter() {
            for (b, c) in self.buckets.iter().zip(counts) {
                let _ = writeln!(out, "{}_bucket{} {c}", self.name, label_text(self.labels, key, Some(&b.to_string())));
            }
            let _ = writeln!(out, "{}_bucket{} {count}", self.name, label_text(self.labels, key, Some("+Inf")));
            let _ = writeln!(out, "{}_sum{} {sum}", self.name, label_text(self.labels, key, None));
            let _ = writeln!(out, "{}_count{} {count}", self.name, label_text(self.labels, key, None));
        }
    }
}

const LATENCY_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const POSITION_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Every metric the router exports.
pub struct Metrics {
    pub requests: Family,
    pub classifications: Family,
    pub routed: Family,
    pub retries: Family,
    pub endpoint_outstanding: Family,
    pub endpoint_healthy: Family,
    pub request_seconds: Histogram,
    pub first_token_seconds: Histogram,
    pub shadow_mirrored: Family,
    pub shadow_pairs: Family,
    pub shadow_dropped: Family,
    pub shadow_failed: Family,
    pub shadow_first_divergence: Histogram,
    pub canary_sums: Family,
    pub source_updates: Family,
    pub source_problems: Family,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::new(
                "quantfleet_router_requests_total",
                "Requests by API, task class, tier that served them (none when no tier did) and outcome.",
                "counter",
                &["api", "task_class", "tier", "outcome"],
            ),
            classifications: Family::new(
                "quantfleet_router_classifications_total",
                "Classification decisions by task class and what decided (header, metadata, a rule's condition, default).",
                "counter",
                &["task_class", "decided_by"],
            ),
            routed: Family::new(
                "quantfleet_router_routed_total",
                "Requests by task class, the tier that served them and how it was chosen (route, fallback, canary, forced).",
                "counter",
                &["task_class", "tier", "via"],
            ),
            retries: Family::new(
                "quantfleet_router_retries_total",
                "Attempts that failed before the first token and were retried elsewhere, by tier and error category.",
                "counter",
                &["tier", "reason"],
            ),
            endpoint_outstanding: Family::new(
                "quantfleet_router_endpoint_outstanding_requests",
                "Requests in flight per node endpoint (the balancing signal).",
                "gauge",
                &["tier", "endpoint"],
            ),
            endpoint_healthy: Family::new(
                "quantfleet_router_endpoint_healthy",
                "1 when the node endpoint is considered healthy.",
                "gauge",
                &["tier", "endpoint"],
            ),
            request_seconds: Histogram::new(
                "quantfleet_router_request_duration_seconds",
                "Time from request to last token, by tier.",
                &["tier"],
                LATENCY_BUCKETS,
            ),
            first_token_seconds: Histogram::new(
                "quantfleet_router_time_to_first_token_seconds",
                "Time from request to the first token, by tier.",
                &["tier"],
                LATENCY_BUCKETS,
            ),
            shadow_mirrored: Family::new(
                "quantfleet_router_shadow_mirrored_total",
                "Requests selected for shadow mirroring, by task class and candidate tier.",
                "counter",
                &["task_class", "candidate"],
            ),
            shadow_pairs: Family::new(
                "quantfleet_router_shadow_pairs_total",
                "Shadow pairs compared, by task class and candidate tier.",
                "counter",
                &["task_class", "candidate"],
            ),
            shadow_dropped: Family::new(
                "quantfleet_router_shadow_dropped_total",
                "Mirrors dropped (not queued) because the candidate was saturated, by task class and candidate.",
                "counter",
                &["task_class", "candidate"],
            ),
            shadow_failed: Family::new(
                "quantfleet_router_shadow_failed_total",
                "Mirrors that failed (candidate unavailable or erroring, incomparable pair), by task class, candidate and reason.",
                "counter",
                &["task_class", "candidate", "reason"],
            ),
            shadow_first_divergence: Histogram::new(
                "quantfleet_router_shadow_first_divergence_position",
                "Position of the first token where the candidate's top-1 differs from the incumbent's (pairs that diverge).",
                &["task_class", "candidate"],
                POSITION_BUCKETS,
            ),
            canary_sums: Family::new(
                "quantfleet_router_canary_sum",
                "Cumulative canary comparison sums (the /v1/canary/stats counters), by policy, class, candidate and quantity.",
                "counter",
                &["policy", "task_class", "candidate", "quantity"],
            ),
            source_updates: Family::new(
                "quantfleet_router_source_updates_total",
                "Changes applied live from the Kubernetes source, by kind (policy, endpoints).",
                "counter",
                &["kind"],
            ),
            source_problems: Family::new(
                "quantfleet_router_source_problems_total",
                "Objects of the Kubernetes source that were ignored or missing, and watch errors, by object kind and reason.",
                "counter",
                &["object", "reason"],
            ),
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in [
            &self.requests,
            &self.classifications,
            &self.routed,
            &self.retries,
            &self.endpoint_outstanding,
            &self.endpoint_healthy,
            &self.shadow_mirrored,
            &self.shadow_pairs,
            &self.shadow_dropped,
            &self.shadow_failed,
            &self.canary_sums,
            &self.source_updates,
            &self.source_problems,
        ] {
            f.render(&mut out);
        }
        for h in [&self.request_seconds, &self.first_token_seconds, &self.shadow_first_divergence] {
            h.render(&mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_format() {
        let m = Metrics::default();
        m.requests.inc(&["chat", "code", "fp8", "ok"]);
        m.requests.inc(&["chat", "code", "fp8", "ok"]);
        m.request_seconds.observe(&["fp8"], 0.02);
        let text = m.render();
        assert!(
            text.contains(
                "quantfleet_router_requests_total{api=\"chat\",task_class=\"code\",tier=\"fp8\",outcome=\"ok\"} 2\n"
            ),
            "{text}"
        );
        assert!(text.contains("quantfleet_router_request_duration_seconds_bucket{tier=\"fp8\",le=\"0.01\"} 0\n"));
        assert!(text.contains("quantfleet_router_request_duration_seconds_bucket{tier=\"fp8\",le=\"0.025\"} 1\n"));
        assert!(text.contains("quantfleet_router_request_duration_seconds_count{tier=\"fp8\"} 1\n"));
        assert!(text.contains("# TYPE quantfleet_router_endpoint_healthy gauge"));
    }
}

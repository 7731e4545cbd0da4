//! The operator's Prometheus metrics: reconciles by controller and outcome (success or an error's fixed
//! category: never message text, so cardinality stays bounded), reconcile duration histograms, and the canary
//! phase of every policy that runs one (one series per phase, 1 for the current one, as kube-state-metrics does).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use quantfleet_api::CanaryPhase;

/// Upper bounds (seconds) of the reconcile duration histogram buckets.
const DURATION_BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

const PHASES: [CanaryPhase; 6] = [
    CanaryPhase::Pending,
    CanaryPhase::Shadowing,
    CanaryPhase::Stepping,
    CanaryPhase::Paused,
    CanaryPhase::Promoted,
    CanaryPhase::RolledBack,
];

fn phase_name(phase: CanaryPhase) -> &'static str {
    match phase {
        CanaryPhase::Pending => "Pending",
        CanaryPhase::Shadowing => "Shadowing",
        CanaryPhase::Stepping => "Stepping",
        CanaryPhase::Paused => "Paused",
        CanaryPhase::Promoted => "Promoted",
        CanaryPhase::RolledBack => "RolledBack",
    }
}

#[derive(Default, Clone)]
struct Histogram {
    /// Cumulative counts per bucket of DURATION_BUCKETS.
    buckets: [u64; DURATION_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, n) in DURATION_BUCKETS.iter().zip(self.buckets.iter_mut()) {
            if seconds <= *bound {
                *n += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

#[derive(Default)]
pub struct Metrics {
    reconciles: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    durations: Mutex<BTreeMap<&'static str, Histogram>>,
    /// (namespace, policy) -> phase, for policies with a canary.
    canary_phases: Mutex<BTreeMap<(String, String), CanaryPhase>>,
}

/// Observes a reconcile's wall time into the histogram when dropped (so failed reconciles count too).
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    controller: &'static str,
    started: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics.observe_duration(self.controller, self.started.elapsed());
    }
}

impl Metrics {
    /// Counts one controller result.
    pub fn record<T, W: std::error::Error + 'static>(
        &self,
        controller: &'static str,
        result: &Result<T, kube::runtime::controller::Error<crate::controller::Error, W>>,
    ) {
        use kube::runtime::controller::Error as E;
        let outcome = match result {
            Ok(_) => "success",
            Err(E::ReconcilerFailed(err, _)) => err.category(),
            Err(E::ObjectNotFound(gone)) => {
                // Deleted: its canary series go with it.
                if controller == "precisionpolicy" {
                    let key = (gone.namespace.clone().unwrap_or_default(), gone.name.clone());
                    self.canary_phases.lock().expect("metrics lock").remove(&key);
                }
                "object_not_found"
            }
            Err(_) => "controller",
        };
        *self.reconciles.lock().expect("metrics lock").entry((controller, outcome)).or_default() += 1;
    }

    /// How many results of `controller` had `outcome`.
    pub fn count(&self, controller: &str, outcome: &str) -> u64 {
        let map = self.reconciles.lock().expect("metrics lock");
        map.iter().filter(|((c, o), _)| *c == controller && *o == outcome).map(|(_, n)| n).sum()
    }

    /// Starts timing one reconcile of `controller`.
    pub fn time(&self, controller: &'static str) -> ReconcileTimer<'_> {
        ReconcileTimer { metrics: self, controller, started: Instant::now() }
    }

    pub fn observe_duration(&self, controller: &'static str, elapsed: Duration) {
        self.durations.lock().expect("metrics lock").entry(controller).or_default().observe(elapsed.as_secs_f64());
    }

    /// How many reconciles of `controller` were timed.
    pub fn timed(&self, controller: &str) -> u64 {
        self.durations.lock().expect("metrics lock").get(controller).map_or(0, |h| h.count)
    }

    /// Records the canary phase of a policy; `None` (no canary in the spec any more) removes its series.
    pub fn set_canary_phase(&self, namespace: &str, policy: &str, phase: Option<CanaryPhase>) {
        let key = (namespace.to_owned(), policy.to_owned());
        let mut phases = self.canary_phases.lock().expect("metrics lock");
        match phase {
            Some(p) => {
                phases.insert(key, p);
            }
            None => {
                phases.remove(&key);
            }
        }
    }

    /// The Prometheus exposition text.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# HELP quantfleet_operator_reconciles_total Reconciles by controller and outcome.\n# TYPE quantfleet_operator_reconciles_total counter\n",
        );
        for ((controller, outcome), n) in self.reconciles.lock().expect("metrics lock").iter() {
            out.push_str(&format!(
                "quantfleet_operator_reconciles_total{{controller=\"{controller}\",outcome=\"{outcome}\"}} {n}\n"
            ));
        }
        out.push_str(
            "# HELP quantfleet_operator_reconcile_duration_seconds Wall time of one reconcile, by controller.\n# TYPE quantfleet_operator_reconcile_duration_seconds histogram\n",
        );
        for (controller, h) in self.durations.lock().expect("metrics lock").iter() {
            for (bound, n) in DURATION_BUCKETS.iter().zip(h.buckets) {
                out.push_str(&format!(
                    "quantfleet_operator_reconcile_duration_seconds_bucket{{controller=\"{controller}\",le=\"{bound}\"}} {n}\n"
                ));
            }
            let name = "quantfleet_operator_reconcile_duration_seconds";
            out.push_str(&format!("{name}_bucket{{controller=\"{controller}\",le=\"+Inf\"}} {}\n", h.count));
            out.push_str(&format!("{name}_sum{{controller=\"{controller}\"}} {}\n", h.sum));
            out.push_str(&format!("{name}_count{{controller=\"{controller}\"}} {}\n", h.count));
        }
        out.push_str(
            "# HELP quantfleet_operator_canary_phase Canary phase per policy: 1 for the current phase, 0 otherwise.\n# TYPE quantfleet_operator_canary_phase gauge\n",
        );
        for ((namespace, policy), current) in self.canary_phases.lock().expect("metrics lock").iter() {
            for phase in PHASES {
                out.push_str(&format!(
                    "quantfleet_operator_canary_phase{{namespace=\"{namespace}\",policy=\"{policy}\",phase=\"{}\"}} {}\n",
                    phase_name(phase),
                    u8::from(phase == *current)
                ));
            }
        }
        out
    }
}

/// Serves `GET /metrics` (and `GET /healthz`) on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: std::sync::Arc<Metrics>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Request, Response, StatusCode};
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/metrics" => (StatusCode::OK, metrics.render()),
                        "/healthz" => (StatusCode::OK, "ok\n".to_owned()),
                        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
                    };
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    *response.status_mut() = status;
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(err) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                tracing::debug!(%err, "metrics connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_category() {
        let m = Metrics::default();
        let ok: Result<(), kube::runtime::controller::Error<crate::controller::Error, std::io::Error>> = Ok(());
        m.record("quantizedmodel", &ok);
        m.record("quantizedmodel", &ok);
        let failed: Result<(), kube::runtime::controller::Error<crate::controller::Error, std::io::Error>> =
            Err(kube::runtime::controller::Error::ReconcilerFailed(
                crate::controller::Error::Metadata("metadata.name"),
                Box::new(kube::runtime::reflector::ObjectRef::<quantfleet_api::QuantizedModel>::new("x").erase()),
            ));
        m.record("quantizedmodel", &failed);
        assert_eq!(m.count("quantizedmodel", "success"), 2);
        let text = m.render();
        assert!(
            text.contains("quantfleet_operator_reconciles_total{controller=\"quantizedmodel\",outcome=\"metadata\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn durations_fill_cumulative_buckets() {
        let m = Metrics::default();
        m.observe_duration("quantizedmodel", Duration::from_millis(3));
        m.observe_duration("quantizedmodel", Duration::from_millis(70));
        m.observe_duration("quantizedmodel", Duration::from_secs(30));
        {
            let _timer = m.time("precisionpolicy");
        }
        assert_eq!(m.timed("precisionpolicy"), 1);
        let text = m.render();
        let line = |le: &str| {
            format!(
                "quantfleet_operator_reconcile_duration_seconds_bucket{{controller=\"quantizedmodel\",le=\"{le}\"}}"
            )
        };
        assert!(text.contains(&format!("{} 1\n", line("0.005"))), "{text}");
        assert!(text.contains(&format!("{} 1\n", line("0.05"))), "{text}");
        assert!(text.contains(&format!("{} 2\n", line("0.1"))), "{text}");
        assert!(text.contains(&format!("{} 2\n", line("10"))), "{text}");
        assert!(text.contains(&format!("{} 3\n", line("+Inf"))), "{text}");
        assert!(
            text.contains("quantfleet_operator_reconcile_duration_seconds_count{controller=\"quantizedmodel\"} 3\n")
        );
    }

    #[test]
    fn canary_phase_has_one_current_series_and_goes_away_with_the_policy() {
        let m = Metrics::default();
        m.set_canary_phase("ns", "chat", Some(CanaryPhase::Shadowing));
        m.set_canary_phase("ns", "chat", Some(CanaryPhase::Stepping));
        let text = m.render();
        let series = |phase: &str, v: u8| {
            format!("quantfleet_operator_canary_phase{{namespace=\"ns\",policy=\"chat\",phase=\"{phase}\"}} {v}\n")
        };
        assert!(text.contains(&series("Stepping", 1)), "{text}");
        assert!(text.contains(&series("Shadowing", 0)), "{text}");
        let chat: Vec<&str> = text.lines().filter(|l| l.contains("policy=\"chat\"")).collect();
        assert_eq!(chat.len(), 6, "{text}");
        assert_eq!(chat.iter().filter(|l| l.ends_with(" 1")).count(), 1, "{text}");

        let gone: Result<(), kube::runtime::controller::Error<crate::controller::Error, std::io::Error>> =
            Err(kube::runtime::controller::Error::ObjectNotFound(Box::new(
                kube::runtime::reflector::ObjectRef::<quantfleet_api::PrecisionPolicy>::new("chat")
                    .within("ns")
                    .erase(),
            )));
        m.record("precisionpolicy", &gone);
        assert!(!m.render().contains("policy=\"chat\""));

        m.set_canary_phase("ns", "code", Some(CanaryPhase::Pending));
        m.set_canary_phase("ns", "code", None);
        assert!(!m.render().contains("policy=\"code\""));
    }
}

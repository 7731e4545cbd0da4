//! Reconcile counters in the Prometheus text format, labelled by controller and outcome (success or an
//! error's fixed category: never message text, so cardinality stays bounded).

use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct Metrics {
    reconciles: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
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
            Err(E::ObjectNotFound(_)) => "object_not_found",
            Err(_) => "controller",
        };
        *self.reconciles.lock().expect("metrics lock").entry((controller, outcome)).or_default() += 1;
    }

    /// How many results of `controller` had `outcome`.
    pub fn count(&self, controller: &str, outcome: &str) -> u64 {
        let map = self.reconciles.lock().expect("metrics lock");
        map.iter().filter(|((c, o), _)| *c == controller && *o == outcome).map(|(_, n)| n).sum()
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
}

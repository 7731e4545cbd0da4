//! Where the operator reads canary evidence: the router's `GET /v1/canary/stats` (a
//! [`CanaryStatsReport`]). A missing or unreachable router is not an error for reconcile: the canary simply
//! sees no new samples and waits.

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use quantfleet_api::stats::CanaryStatsReport;
use std::time::Duration;

/// Why the stats could not be read.
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
}

/// Reads the router's canary stats over HTTP/1.
#[derive(Clone)]
pub struct HttpStats {
    url: hyper::Uri,
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

impl HttpStats {
    /// `url` is the full endpoint, e.g. `http://quantfleet-router.quantfleet-system:8080/v1/canary/stats`.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, StatsError> {
        let uri: hyper::Uri = url.parse().map_err(|_| StatsError::BadUrl(url.to_owned()))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(StatsError::BadUrl(url.to_owned()));
        }
        Ok(HttpStats { url: uri, client: Client::builder(TokioExecutor::new()).build_http(), timeout })
    }

    pub async fn fetch(&self) -> Result<CanaryStatsReport, StatsError> {
        let request = async {
            let response = self.client.get(self.url.clone()).await.map_err(|e| StatsError::Request(e.to_string()))?;
            if !response.status().is_success() {
                return Err(StatsError::Status(response.status().as_u16()));
            }
            let body = response.into_body().collect().await.map_err(|e| StatsError::Request(e.to_string()))?.to_bytes();
            serde_json::from_slice(&body).map_err(|e| StatsError::Decode(e.to_string()))
        };
        tokio::time::timeout(self.timeout, request).await.map_err(|_| StatsError::Timeout(self.timeout))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

//! The one error type of the test support crate: every failure names what was being done and why it failed.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No control plane could be started or reused; the message says what to run.
    #[error("no Kubernetes control plane for tests: {0}")]
    ControlPlane(String),
    #[error("cannot use kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("Kubernetes API call failed while {context}: {source}")]
    Kube {
        context: String,
        #[source]
        source: kube::Error,
    },
    #[error("timed out after {seconds}s waiting for {what}; last observed: {last}")]
    Timeout { what: String, seconds: u64, last: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {source}")]
    Yaml {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("invalid test data in {path}: {reason}")]
    InvalidData { path: PathBuf, reason: String },
}

impl Error {
    /// Wraps a kube error with what the caller was doing.
    pub fn kube(context: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let context = context.into();
        move |source| Self::Kube { context, source }
    }
}

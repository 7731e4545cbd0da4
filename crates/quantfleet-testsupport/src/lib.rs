//! Test support for Quantfleet: a real Kubernetes v1.33 control plane (etcd, kube-apiserver, controller manager,
//! scheduler and kwok with fake GPU nodes, built by `tests/controlplane/build.sh`), started once per test process
//! or reused from `scripts/test.sh` through `QUANTFLEET_KUBECONFIG`, plus what tests need on top of it: a
//! `kube::Client`, a fresh namespace per test, CRD installation and the admission-case runner.
//!
//! ```no_run
//! # async fn demo() -> Result<(), quantfleet_testsupport::Error> {
//! let env = quantfleet_testsupport::TestEnv::new("my-test").await?;
//! // env.client is a kube::Client with cluster-admin rights; env.namespace() is empty and private to this test.
//! env.cleanup().await
//! # }
//! ```

pub mod admission;
pub mod controlplane;
pub mod crds;
mod error;
pub mod namespace;
pub mod net;
pub mod scratch;
pub mod wait;

pub use controlplane::{ControlPlane, KUBECONFIG_ENV, control_plane};
pub use error::Error;
pub use namespace::TestNamespace;
pub use scratch::ScratchDir;

/// Everything one test needs: a client for the shared control plane and a namespace of its own.
pub struct TestEnv {
    pub client: kube::Client,
    pub namespace: TestNamespace,
}

impl TestEnv {
    /// Starts or reuses the control plane, connects, and creates a fresh namespace named after `purpose`.
    pub async fn new(purpose: &str) -> Result<Self, Error> {
        let client = control_plane()?.client().await?;
        let namespace = TestNamespace::create(&client, purpose).await?;
        Ok(Self { client, namespace })
    }

    /// The name of this test's namespace.
    pub fn namespace(&self) -> &str {
        self.namespace.name()
    }

    /// Deletes the namespace now (dropping a `TestEnv` also deletes it, from a helper thread).
    pub async fn cleanup(self) -> Result<(), Error> {
        self.namespace.delete(&self.client).await
    }
}

//! A fresh namespace per test, so tests share one control plane without seeing each other's objects.
//! Dropping a `TestNamespace` deletes it (on a helper thread with its own runtime, because a test's runtime is
//! already shutting down when its values drop); `delete` does the same explicitly and reports errors.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::{Error, control_plane};

/// Label on every namespace this crate creates, so leftovers on a reused control plane are easy to find.
pub const TEST_NAMESPACE_LABEL: &str = "quantfleet.io/test-namespace";

#[derive(Debug)]
pub struct TestNamespace {
    name: String,
    /// Where to reconnect from when the namespace is deleted on drop.
    kubeconfig: Option<PathBuf>,
    deleted: bool,
}

impl TestNamespace {
    /// Creates `qf-<purpose>-<unique suffix>`; `purpose` is reduced to a DNS label (lower case, digits, '-').
    pub async fn create(client: &Client, purpose: &str) -> Result<Self, Error> {
        let name = unique_name(purpose);
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(TEST_NAMESPACE_LABEL.to_string(), "true".to_string())])),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .map_err(Error::kube(format!("creating namespace {name}")))?;
        let kubeconfig = control_plane().ok().map(|cp| cp.kubeconfig().to_path_buf());
        Ok(Self { name, kubeconfig, deleted: false })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Deletes the namespace; the namespace controller then removes everything in it.
    pub async fn delete(mut self, client: &Client) -> Result<(), Error> {
        self.deleted = true;
        delete_namespace(client, &self.name).await
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        let (Some(kubeconfig), name) = (self.kubeconfig.take(), std::mem::take(&mut self.name)) else {
            return;
        };
        // Best effort: a namespace left behind only costs a little etcd space on a throwaway control plane.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let client = crate::controlplane::client_from_kubeconfig(&kubeconfig).await.ok()?;
                delete_namespace(&client, &name).await.ok()
            })
        })
        .join();
    }
}

async fn delete_namespace(client: &Client, name: &str) -> Result<(), Error> {
    match Api::<Namespace>::all(client.clone()).delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(Error::kube(format!("deleting namespace {name}"))(e)),
    }
}

fn unique_name(purpose: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let mut label: String = purpose
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    label.truncate(30);
    let label = label.trim_matches('-');
    let label = if label.is_empty() { "test" } else { label };
    // pid + per-process counter are unique among concurrent test processes; the clock part keeps names unique
    // across runs that reuse one long-lived control plane (pids get reused).
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("qf-{label}-{:x}-{n}-{:x}", std::process::id(), nanos >> 12)
}

#[cfg(test)]
mod tests {
    use super::unique_name;

    #[test]
    fn names_are_dns_labels_and_unique() {
        let a = unique_name("Admission: QM_case/1 with a very long purpose string indeed");
        let b = unique_name("Admission: QM_case/1 with a very long purpose string indeed");
        assert_ne!(a, b);
        for name in [&a, &b, &unique_name("--"), &unique_name("")] {
            assert!(name.len() <= 63, "{name} is longer than a DNS label");
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'), "{name}");
            assert!(!name.ends_with('-') && name.starts_with("qf-"), "{name}");
        }
        assert!(unique_name("").starts_with("qf-test-"));
    }
}

//! Leader election on a real API server: one leader at a time, takeover only after expiry, and an immediate
//! handover on release.

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use quantfleet_operator::lease::LeaderElector;
use quantfleet_testsupport::{Error, TestEnv};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_takeover_after_expiry_and_handover_on_release() -> Result<(), Error> {
    let env = TestEnv::new("lease").await?;
    let api: Api<Lease> = Api::namespaced(env.client.clone(), env.namespace());
    let duration = Duration::from_secs(3);
    let a = LeaderElector::new(api.clone(), "quantfleet-operator", "a", duration);
    let b = LeaderElector::new(api.clone(), "quantfleet-operator", "b", duration);
    let k = |e: kube::Error| Error::kube("lease")(e);

    assert!(a.try_acquire_or_renew().await.map_err(k)?, "a creates the lease");
    assert!(!b.try_acquire_or_renew().await.map_err(k)?, "b must not take a held lease");
    assert!(a.try_acquire_or_renew().await.map_err(k)?, "a renews");
    let lease = api.get("quantfleet-operator").await.map_err(k)?.spec.unwrap();
    assert_eq!((lease.holder_identity.as_deref(), lease.lease_transitions), (Some("a"), Some(0)));

    // a stops renewing; until a whole duration has passed b still may not take over.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!b.try_acquire_or_renew().await.map_err(k)?, "not expired yet");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(b.try_acquire_or_renew().await.map_err(k)?, "b takes over the expired lease");
    assert!(!a.try_acquire_or_renew().await.map_err(k)?, "a lost it");
    let lease = api.get("quantfleet-operator").await.map_err(k)?.spec.unwrap();
    assert_eq!((lease.holder_identity.as_deref(), lease.lease_transitions), (Some("b"), Some(1)));

    // b hands over on shutdown: a leads at once.
    b.release().await.map_err(k)?;
    assert!(a.try_acquire_or_renew().await.map_err(k)?, "a takes the released lease without waiting");
    a.release().await.map_err(k)?;
    b.release().await.map_err(k)?; // not the holder: a no-op
    env.cleanup().await
}

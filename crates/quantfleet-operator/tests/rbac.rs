//! The operator's ClusterRole (deploy/rbac/operator-clusterrole.yaml) is enough: the controllers run under a
//! ServiceAccount bound to it, on a real API server, and converge a model (one tier calibrated on a ConfigMap)
//! and a policy with no API error. Bound cluster-wide, the operator watches every namespace; with the same
//! rules as a Role bound in one namespace (the Helm chart's `operator.watchNamespace` install), the operator
//! started with that `watch_namespace` runs on those rights alone and leaves the models of other namespaces
//! alone.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding, RoleRef, Subject};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use quantfleet_api::conditions::find;
use quantfleet_api::plan::AcceleratorTable;
use quantfleet_api::{PrecisionPolicy, QuantizedModel};
use quantfleet_operator::builders::Settings;
use quantfleet_operator::controller::{Context, reporter, run};
use quantfleet_operator::lease::LeaderElector;
use quantfleet_operator::metrics::Metrics;
use quantfleet_operator::stats_source::RouterStats;
use quantfleet_testsupport::crds::{install_crds, repo_crds_dir};
use quantfleet_testsupport::wait::{Probe, until};
use quantfleet_testsupport::{Error, TestEnv, control_plane};
use std::sync::Arc;
use std::time::Duration;

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(format!("{}/../../{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// How the test grants the repo's rules to the operator's ServiceAccount.
#[derive(Clone, Copy, PartialEq)]
enum Grant {
    /// The ClusterRole and a ClusterRoleBinding; the operator watches every namespace.
    Cluster,
    /// The rules as a Role with a RoleBinding in the test's namespace, no cluster-scoped object; the operator
    /// watches that namespace only.
    Namespace,
}

/// The two tests take turns: the cluster-wide operator of the first would also reconcile the namespaces of
/// the second, whose other model must stay untouched.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_runs_with_exactly_its_cluster_role() -> Result<(), Error> {
    let _turn = ONE_AT_A_TIME.lock().await;
    converges_as_the_service_account(Grant::Cluster).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_scoped_operator_runs_on_a_namespaced_role_alone() -> Result<(), Error> {
    let _turn = ONE_AT_A_TIME.lock().await;
    converges_as_the_service_account(Grant::Namespace).await
}

async fn converges_as_the_service_account(grant: Grant) -> Result<(), Error> {
    let env = TestEnv::new(if grant == Grant::Cluster { "rbac" } else { "rbac-scoped" }).await?;
    let admin = env.client.clone();
    let ns = env.namespace().to_owned();
    install_crds(&admin, &repo_crds_dir()).await?;
    let k = |what: &'static str| Error::kube(what);

    // The role from the repo, bound to a fresh ServiceAccount (cluster-scoped names made unique per namespace).
    let mut role: ClusterRole = serde_yaml::from_str(&repo_file("deploy/rbac/operator-clusterrole.yaml")).unwrap();
    let role_name = format!("quantfleet-operator-{ns}");
    role.metadata.name = Some(role_name.clone());
    let sa = ServiceAccount {
        metadata: ObjectMeta { name: Some("operator".into()), ..ObjectMeta::default() },
        ..ServiceAccount::default()
    };
    Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &sa)
        .await
        .map_err(k("creating the SA"))?;
    let role_ref = |kind: &str| RoleRef {
        api_group: "rbac.authorization.k8s.io".into(),
        kind: kind.into(),
        name: role_name.clone(),
    };
    let subjects = Some(vec![Subject {
        kind: "ServiceAccount".into(),
        name: "operator".into(),
        namespace: Some(ns.clone()),
        ..Subject::default()
    }]);
    let metadata = ObjectMeta { name: Some(role_name.clone()), ..ObjectMeta::default() };
    let apply = PatchParams::apply("rbac-test").force();
    match grant {
        Grant::Cluster => {
            Api::<ClusterRole>::all(admin.clone())
                .patch(&role_name, &apply, &Patch::Apply(&role))
                .await
                .map_err(k("applying the cluster role"))?;
            let binding = ClusterRoleBinding { metadata, role_ref: role_ref("ClusterRole"), subjects };
            Api::<ClusterRoleBinding>::all(admin.clone())
                .patch(&role_name, &apply, &Patch::Apply(&binding))
                .await
                .map_err(k("binding the role"))?;
        }
        Grant::Namespace => {
            let namespaced = Role { metadata: metadata.clone(), rules: role.rules.clone() };
            Api::<Role>::namespaced(admin.clone(), &ns)
                .patch(&role_name, &apply, &Patch::Apply(&namespaced))
                .await
                .map_err(k("applying the role in the namespace"))?;
            let binding = RoleBinding { metadata, role_ref: role_ref("Role"), subjects };
            Api::<RoleBinding>::namespaced(admin.clone(), &ns)
                .patch(&role_name, &apply, &Patch::Apply(&binding))
                .await
                .map_err(k("binding the role in the namespace"))?;
        }
    }

    // A client that acts as the ServiceAccount (the admin impersonates it; RBAC checks the SA's rights).
    let mut config = control_plane()?.config().await?;
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{ns}:operator"));
    let client = kube::Client::try_from(config).map_err(k("building the SA client"))?;

    let elector = LeaderElector::new(
        Api::namespaced(client.clone(), &ns),
        "quantfleet-operator",
        "rbac-test",
        Duration::from_secs(6),
    );
    // The API server's authorizer learns of a new binding from its watch, a moment after the create returns:
    // a 403 until then is not the role's fault.
    let acquired = until("the binding to take effect", Duration::from_secs(30), || async {
        Ok(match elector.try_acquire_or_renew().await {
            Ok(acquired) => Probe::Done(acquired),
            Err(kube::Error::Api(status)) if status.code == 403 => Probe::Pending(status.message),
            Err(e) => return Err(k("acquiring the lease as the SA")(e)),
        })
    })
    .await?;
    assert!(acquired);
    assert!(elector.try_acquire_or_renew().await.map_err(k("renewing the lease as the SA"))?);

    // Reading every router replica lists the router Service's EndpointSlices (none here: no replica found, but
    // not a listing error).
    let stats =
        RouterStats::service(client.clone(), &format!("{ns}/quantfleet-router"), "http", Duration::from_secs(1))
            .expect("a valid Service name");
    let problem = stats.read().await.problem.unwrap_or_default();
    assert!(problem.starts_with("read 0 of 0 router replicas; no ready router endpoint"), "{problem}");

    let metrics = Arc::new(Metrics::default());
    let ctx = Arc::new(Context {
        recorder: kube::runtime::events::Recorder::new(client.clone(), reporter(Some("rbac".into()))),
        client: client.clone(),
        settings: Settings { node_image: "registry.invalid/quantfleet:rbac".into() },
        accelerators: AcceleratorTable::builtin(),
        stats: None,
        metrics: metrics.clone(),
        watch_namespace: (grant == Grant::Namespace).then(|| ns.clone()),
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(run(ctx, async move {
        let _ = stopped.await;
    }));

    let mut qm: QuantizedModel =
        serde_yaml::from_str(&repo_file("deploy/samples/smollm2-135m.quantizedmodel.yaml")).unwrap();
    qm.spec.tiers[3].replicas = 1;
    // int4-awq calibrates on a ConfigMap of the namespace, which the operator reads by name.
    qm.spec.tiers[3].calibration.as_mut().unwrap().dataset = "configmap/calibration".into();
    let text = ConfigMap {
        metadata: ObjectMeta { name: Some("calibration".into()), ..ObjectMeta::default() },
        data: Some([("calibration.txt".to_owned(), "User: What is 2+2?\nAssistant: 4.".to_owned())].into()),
        ..ConfigMap::default()
    };
    Api::<ConfigMap>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &text)
        .await
        .map_err(k("creating the calibration ConfigMap"))?;
    let pp: PrecisionPolicy =
        serde_yaml::from_str(&repo_file("deploy/samples/smollm2-135m.precisionpolicy.yaml")).unwrap();
    let models: Api<QuantizedModel> = Api::namespaced(admin.clone(), &ns);
    models.create(&PostParams::default(), &qm).await.map_err(k("creating the model"))?;
    // Scoped: a model in another namespace, which the operator must leave alone (it may not even read it).
    let other = match grant {
        Grant::Cluster => None,
        Grant::Namespace => {
            let other = TestEnv::new("rbac-other").await?;
            Api::<QuantizedModel>::namespaced(admin.clone(), other.namespace())
                .create(&PostParams::default(), &qm)
                .await
                .map_err(k("creating the other namespace's model"))?;
            Some(other)
        }
    };
    let policies: Api<PrecisionPolicy> = Api::namespaced(admin.clone(), &ns);
    policies.create(&PostParams::default(), &pp).await.map_err(k("creating the policy"))?;

    // The canary reaching Shadowing needs: model reconciled (SSA of children, status), policy status and an Event.
    until("the model Ready and the canary Shadowing under the SA", Duration::from_secs(90), || async {
        let ready = models
            .get("smollm2-135m")
            .await
            .map_err(k("reading the model"))?
            .status
            .and_then(|s| find(&s.conditions, "Ready").map(|c| c.status.clone()));
        let phase = policies
            .get("smollm2-135m")
            .await
            .map_err(k("reading the policy"))?
            .status
            .and_then(|s| s.canary)
            .map(|c| c.phase);
        Ok(match (ready.as_deref(), phase) {
            (Some("True"), Some(quantfleet_api::CanaryPhase::Shadowing)) => Probe::Done(()),
            other => Probe::Pending(format!("{other:?}; {}", metrics.render())),
        })
    })
    .await?;
    // Pruning a removed tier exercises list + delete.
    let mut fewer = models.get("smollm2-135m").await.map_err(k("reading the model"))?;
    fewer.spec.tiers.retain(|t| t.name != "fp8-kv8");
    models.replace("smollm2-135m", &PostParams::default(), &fewer).await.map_err(k("removing a tier"))?;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    until("the removed tier's Deployment to be pruned", Duration::from_secs(60), || async {
        Ok(match deployments.get_opt("smollm2-135m-fp8-kv8").await.map_err(k("reading deployment"))? {
            None => Probe::Done(()),
            Some(_) => Probe::Pending("still there".into()),
        })
    })
    .await?;
    assert_eq!(
        metrics.count("quantizedmodel", "kube_api") + metrics.count("precisionpolicy", "kube_api"),
        0,
        "{}",
        metrics.render()
    );
    elector.release().await.map_err(k("releasing the lease as the SA"))?;

    if let Some(other) = other {
        // By now the scoped operator has reconciled its own namespace's model twice over; the other one must
        // have no status and no objects.
        let untouched = Api::<QuantizedModel>::namespaced(admin.clone(), other.namespace())
            .get("smollm2-135m")
            .await
            .map_err(k("reading the other namespace's model"))?;
        assert!(
            untouched.status.is_none(),
            "the scoped operator wrote another namespace's status: {:?}",
            untouched.status
        );
        let made = Api::<Deployment>::namespaced(admin.clone(), other.namespace())
            .list(&Default::default())
            .await
            .map_err(k("listing the other namespace's Deployments"))?;
        assert!(made.items.is_empty(), "the scoped operator made Deployments in another namespace");
        let name = other.namespace().to_owned();
        other.cleanup().await?;
        namespace_gone(&admin, &name).await?;
    }
    let _ = stop.send(());
    operator.await.unwrap();
    if grant == Grant::Cluster {
        Api::<ClusterRoleBinding>::all(admin.clone())
            .delete(&role_name, &Default::default())
            .await
            .map_err(k("cleanup"))?;
        Api::<ClusterRole>::all(admin.clone()).delete(&role_name, &Default::default()).await.map_err(k("cleanup"))?;
    }
    env.cleanup().await?;
    namespace_gone(&admin, &ns).await
}

/// Waits until namespace `name` is deleted: while it terminates, its models are still listed, and the next
/// test's cluster-wide operator would reconcile them and fail to create objects in it.
async fn namespace_gone(admin: &kube::Client, name: &str) -> Result<(), Error> {
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(admin.clone());
    until(&format!("namespace {name} to be deleted"), Duration::from_secs(120), || async {
        Ok(match namespaces.get_opt(name).await.map_err(Error::kube("reading the namespace"))? {
            None => Probe::Done(()),
            Some(n) => Probe::Pending(format!("{:?}", n.status.and_then(|s| s.phase))),
        })
    })
    .await
}

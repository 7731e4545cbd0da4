//! The Helm chart (charts/quantfleet) on the real control plane, installed the GitOps way: `helm template` (helm
//! built by scripts/helm-build.sh), then server-side apply of the rendered manifests, first as a dry run, then for
//! real. Checks that the operator and router pods are scheduled onto the (kwok) nodes; that no container can run as
//! root or write its root filesystem; that the rendered operator ServiceAccount has exactly the permissions of
//! deploy/rbac/operator-clusterrole.yaml and the router's exactly those of deploy/rbac/router-role.yaml (the
//! rules, and the effective rights the API server reports), and that both really work under them; and that
//! nothing drifts: once converged, with the operator running, no chart-owned or user-owned object changes, nobody
//! but its owner holds its spec fields, and re-applying the same manifests (a GitOps resync) writes nothing.
//!
//! The chart's pods are kwok fakes (no container runs here), so the operator and the router's Kubernetes source
//! run in this process, each acting as its chart ServiceAccount.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{SelfSubjectRulesReview, SelfSubjectRulesReviewSpec};
use k8s_openapi::api::core::v1::{Pod, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{Api, DynamicObject, GroupVersionKind, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::discovery::{Scope, pinned_kind};
use kube::{Client, ResourceExt};
use quantfleet_api::conditions::find;
use quantfleet_api::plan::AcceleratorTable;
use quantfleet_api::{CanaryPhase, PrecisionPolicy, QuantizedModel};
use quantfleet_operator::builders::{FIELD_MANAGER, MODEL_LABEL, NODE_UID, Settings, TIER_LABEL};
use quantfleet_operator::controller::{Context, reporter, run};
use quantfleet_operator::lease::LeaderElector;
use quantfleet_operator::metrics::Metrics;
use quantfleet_testsupport::wait::{Probe, until};
use quantfleet_testsupport::{Error, TestEnv, control_plane};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The field manager the "GitOps tool" (this test) applies the chart with.
const CHART_MANAGER: &str = "quantfleet-chart-test";
/// The field manager the "user" applies models and policies with.
const USER_MANAGER: &str = "quantfleet-user";
/// How long a converged installation is watched for writes.
const QUIET_PERIOD: Duration = Duration::from_secs(20);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The helm binary scripts/helm-build.sh built (the test never builds it: that takes minutes).
fn helm() -> PathBuf {
    let out = Command::new("bash")
        .arg(repo().join("scripts/helm-build.sh"))
        .arg("--cached-only")
        .output()
        .expect("running scripts/helm-build.sh");
    assert!(
        out.status.success(),
        "helm is not built: run scripts/helm-build.sh once (scripts/test.sh does): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// `helm template` of the chart, CRDs included, as JSON objects in document order.
fn render(release: &str, namespace: &str, set: &[&str]) -> Vec<serde_json::Value> {
    let mut cmd = Command::new(helm());
    cmd.args(["template", release]).arg(repo().join("charts/quantfleet")).args([
        "--namespace",
        namespace,
        "--kube-version",
        "1.33.0",
        "--include-crds",
    ]);
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().expect("running helm");
    assert!(out.status.success(), "helm template failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("helm rendered invalid YAML"))
        .filter(|v: &serde_json::Value| !v.is_null())
        .collect()
}

fn kind(object: &serde_json::Value) -> &str {
    object["kind"].as_str().unwrap_or_default()
}

fn name(object: &serde_json::Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

fn typed<T: serde::de::DeserializeOwned>(object: &serde_json::Value) -> T {
    serde_json::from_value(object.clone()).unwrap_or_else(|e| panic!("{} {}: {e}", kind(object), name(object)))
}

/// The API of one rendered object (namespaced objects in their rendered namespace).
async fn api_for(client: &Client, object: &serde_json::Value) -> Api<DynamicObject> {
    let api_version = object["apiVersion"].as_str().unwrap();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind(object));
    let (resource, caps) = pinned_kind(client, &gvk).await.unwrap_or_else(|e| panic!("discovering {gvk:?}: {e}"));
    match caps.scope {
        Scope::Namespaced => {
            let ns = object["metadata"]["namespace"].as_str().expect("the chart sets every namespace");
            Api::namespaced_with(client.clone(), ns, &resource)
        }
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    }
}

/// Server-side applies every object (CRDs first, then in rendered order) under the chart's field manager.
async fn apply_all(client: &Client, objects: &[serde_json::Value], dry_run: bool) -> Result<(), Error> {
    let mut params = PatchParams::apply(CHART_MANAGER).force();
    if dry_run {
        params = params.dry_run();
    }
    let (crds, rest): (Vec<_>, Vec<_>) = objects.iter().partition(|o| kind(o) == "CustomResourceDefinition");
    for object in crds.into_iter().chain(rest) {
        let api = api_for(client, object).await;
        let body: DynamicObject = typed(object);
        api.patch(name(object), &params, &Patch::Apply(&body)).await.map_err(Error::kube(format!(
            "applying {} {} (dry run: {dry_run})",
            kind(object),
            name(object)
        )))?;
    }
    Ok(())
}

/// Why a pod spec could let a container run as root, escalate or write its root filesystem (empty: none).
fn security_violations(owner: &str, spec: &PodSpec) -> Vec<String> {
    let pod = spec.security_context.clone().unwrap_or_default();
    let mut found = Vec::new();
    let containers = spec.containers.iter().chain(spec.init_containers.iter().flatten());
    for c in containers {
        let sc = c.security_context.clone().unwrap_or_default();
        let at = format!("{owner} container {}", c.name);
        if sc.run_as_non_root.or(pod.run_as_non_root) != Some(true) {
            found.push(format!("{at}: runAsNonRoot is not true"));
        }
        match sc.run_as_user.or(pod.run_as_user) {
            Some(uid) if uid > 0 => {}
            other => found.push(format!("{at}: runAsUser is {other:?}, not a fixed non-zero UID")),
        }
        if sc.read_only_root_filesystem != Some(true) {
            found.push(format!("{at}: readOnlyRootFilesystem is not true"));
        }
        if sc.allow_privilege_escalation != Some(false) {
            found.push(format!("{at}: allowPrivilegeEscalation is not false"));
        }
        if sc.privileged == Some(true) {
            found.push(format!("{at}: privileged"));
        }
        let caps = sc.capabilities.clone().unwrap_or_default();
        if !caps.drop.unwrap_or_default().iter().any(|d| d == "ALL") || !caps.add.unwrap_or_default().is_empty() {
            found.push(format!("{at}: capabilities do not drop ALL (or add some)"));
        }
        let seccomp = sc.seccomp_profile.or(pod.seccomp_profile.clone()).map(|p| p.type_);
        if seccomp.as_deref() != Some("RuntimeDefault") {
            found.push(format!("{at}: seccomp profile is {seccomp:?}, not RuntimeDefault"));
        }
    }
    found
}

/// RBAC rules as a set of single grants: (group, resource, verb, resource name), one per combination.
fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String, String)> {
    let mut set = BTreeSet::new();
    for rule in rules {
        let names = rule.resource_names.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| vec!["*".into()]);
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    for n in &names {
                        set.insert((group.clone(), resource.clone(), verb.clone(), n.clone()));
                    }
                }
            }
        }
        for url in rule.non_resource_urls.iter().flatten() {
            for verb in &rule.verbs {
                set.insert(("<url>".into(), url.clone(), verb.clone(), "*".into()));
            }
        }
    }
    set
}

/// What the API server says `user` may do in `namespace` (SelfSubjectRulesReview, made as that user).
async fn effective_rights(user: &str, namespace: &str) -> Result<BTreeSet<(String, String, String, String)>, Error> {
    let mut config = control_plane()?.config().await?;
    config.auth_info.impersonate = Some(user.to_owned());
    let client = Client::try_from(config).map_err(Error::kube("building an impersonating client"))?;
    let review = SelfSubjectRulesReview {
        spec: SelfSubjectRulesReviewSpec { namespace: Some(namespace.to_owned()) },
        ..SelfSubjectRulesReview::default()
    };
    let status = Api::<SelfSubjectRulesReview>::all(client)
        .create(&PostParams::default(), &review)
        .await
        .map_err(Error::kube(format!("reviewing the rights of {user}")))?
        .status
        .expect("a rules review has a status");
    assert!(!status.incomplete, "the API server's rules review for {user} is incomplete");
    let mut set = BTreeSet::new();
    for r in status.resource_rules {
        let rule = PolicyRule {
            api_groups: r.api_groups,
            resources: r.resources,
            resource_names: r.resource_names,
            verbs: r.verbs,
            non_resource_urls: None,
        };
        set.extend(grants(&[rule]));
    }
    for r in status.non_resource_rules {
        let rule = PolicyRule { non_resource_urls: r.non_resource_urls, verbs: r.verbs, ..PolicyRule::default() };
        set.extend(grants(&[rule]));
    }
    Ok(set)
}

/// An object's resourceVersion and its field managers, as (manager, operation, subresource, fields).
#[derive(Debug, PartialEq)]
struct Snapshot {
    resource_version: String,
    managers: Vec<(String, String, String, String)>,
}

async fn snapshot(client: &Client, objects: &[serde_json::Value]) -> Result<BTreeMap<String, Snapshot>, Error> {
    let mut out = BTreeMap::new();
    for object in objects {
        let live = api_for(client, object).await.get(name(object)).await.map_err(Error::kube(format!(
            "reading {} {}",
            kind(object),
            name(object)
        )))?;
        let managers = live
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .map(|m| {
                (
                    m.manager.clone().unwrap_or_default(),
                    m.operation.clone().unwrap_or_default(),
                    m.subresource.clone().unwrap_or_default(),
                    m.fields_v1.as_ref().map(|f| f.0.to_string()).unwrap_or_default(),
                )
            })
            .collect();
        let key = format!("{} {}", kind(object), name(object));
        out.insert(key, Snapshot { resource_version: live.resource_version().unwrap_or_default(), managers });
    }
    Ok(out)
}

/// The owner of every non-status field of each object must be `owner`: anybody else writing spec is drift.
fn foreign_spec_writers(snapshots: &BTreeMap<String, Snapshot>, owner: &str) -> Vec<String> {
    snapshots
        .iter()
        .flat_map(|(object, s)| {
            s.managers
                .iter()
                .filter(|(manager, _, subresource, _)| manager != owner && subresource != "status")
                .map(move |(manager, op, _, fields)| format!("{object}: {manager} ({op}) owns {fields}"))
        })
        .collect()
}

#[test]
fn security_check_finds_a_writable_root_filesystem_and_root() {
    // The checker itself can fail: a container with a writable root filesystem and UID 0 is reported.
    let objects = render("probe", "probe-ns", &[]);
    let deployment = objects.iter().find(|o| kind(o) == "Deployment").expect("the chart renders Deployments");
    let mut spec = typed::<Deployment>(deployment).spec.unwrap().template.spec.unwrap();
    assert_eq!(security_violations("rendered", &spec), Vec::<String>::new());
    let sc = spec.containers[0].security_context.as_mut().unwrap();
    sc.read_only_root_filesystem = Some(false);
    sc.run_as_user = Some(0);
    let found = security_violations("mutated", &spec);
    assert!(found.iter().any(|f| f.contains("readOnlyRootFilesystem")), "{found:?}");
    assert!(found.iter().any(|f| f.contains("runAsUser is Some(0)")), "{found:?}");
}

/// `operator.watchNamespace`: the operator gets `--watch-namespace`, and its rules (deploy/rbac's ClusterRole's,
/// rule for rule) become a Role bound by a RoleBinding in the watched namespace and in the release namespace
/// (the Lease, the router's EndpointSlices); one of each when the two are the same namespace. No
/// cluster-scoped object is rendered (CRDs aside), so a namespace admin can install it. The router's policy
/// namespace follows the watched namespace.
/// `rbac::a_namespace_scoped_operator_runs_on_a_namespaced_role_alone` shows those rights are enough.
#[test]
fn a_watch_namespace_scopes_the_operator_and_its_bindings() {
    for (release_ns, watched, want_namespaces) in
        [("quantfleet-system", "team-a", vec!["quantfleet-system", "team-a"]), ("team-a", "team-a", vec!["team-a"])]
    {
        let objects = render("qf", release_ns, &[&format!("operator.watchNamespace={watched}")]);
        let operator_bindings: Vec<RoleBinding> =
            objects.iter().filter(|o| kind(o) == "RoleBinding" && name(o).ends_with("-operator")).map(typed).collect();
        assert!(
            !objects.iter().any(|o| matches!(kind(o), "ClusterRole" | "ClusterRoleBinding")),
            "a scoped operator has no cluster-scoped RBAC object"
        );
        let mut namespaces: Vec<_> = operator_bindings.iter().map(|b| b.metadata.namespace.clone().unwrap()).collect();
        namespaces.sort();
        assert_eq!(namespaces, want_namespaces);
        let reference: ClusterRole = serde_yaml::from_str(&repo_file("deploy/rbac/operator-clusterrole.yaml")).unwrap();
        let roles: Vec<Role> =
            objects.iter().filter(|o| kind(o) == "Role" && name(o).ends_with("-operator")).map(typed).collect();
        let mut role_namespaces: Vec<_> = roles.iter().map(|r| r.metadata.namespace.clone().unwrap()).collect();
        role_namespaces.sort();
        assert_eq!(role_namespaces, want_namespaces);
        for role in &roles {
            assert_eq!(role.rules, reference.rules, "the scoped Role holds deploy/rbac's rules exactly");
        }
        for binding in &operator_bindings {
            assert_eq!(
                (binding.role_ref.kind.as_str(), binding.role_ref.name.as_str()),
                ("Role", "qf-quantfleet-operator")
            );
            let subjects = binding.subjects.clone().unwrap_or_default();
            assert_eq!(subjects.len(), 1);
            assert_eq!(
                (subjects[0].name.as_str(), subjects[0].namespace.as_deref()),
                ("qf-quantfleet-operator", Some(release_ns))
            );
        }
        let deployment = objects.iter().find(|o| kind(o) == "Deployment" && name(o).ends_with("-operator")).unwrap();
        let args: Vec<String> =
            serde_json::from_value(deployment["spec"]["template"]["spec"]["containers"][0]["args"].clone()).unwrap();
        assert!(args.contains(&format!("--watch-namespace={watched}")), "{args:?}");
        // The router's policy defaults to the watched namespace (another one is refused, see
        // tests/helm/invalid-values.json): its Role is there.
        let router_role = objects.iter().find(|o| kind(o) == "Role" && name(o).ends_with("-router")).unwrap();
        assert_eq!(router_role["metadata"]["namespace"], watched);
    }
    // Unscoped (the default): no flag, the ClusterRole and one ClusterRoleBinding, no operator Role.
    let objects = render("qf", "quantfleet-system", &[]);
    assert_eq!(objects.iter().filter(|o| kind(o) == "ClusterRoleBinding").count(), 1);
    assert_eq!(objects.iter().filter(|o| kind(o) == "ClusterRole").count(), 1);
    assert!(!objects.iter().any(|o| kind(o) == "Role" && name(o).ends_with("-operator")));
    let deployment = objects.iter().find(|o| kind(o) == "Deployment" && name(o).ends_with("-operator")).unwrap();
    assert!(!deployment.to_string().contains("--watch-namespace"));
}

#[test]
fn gitops_manifests_point_at_models_and_policies_only() {
    // The Argo CD Application and the Flux Kustomization manage a directory of this repository that holds only
    // QuantizedModels and PrecisionPolicies, applied server-side so the operator's status is never overwritten.
    let argo: serde_json::Value = serde_yaml::from_str(&repo_file("deploy/gitops/argocd-application.yaml")).unwrap();
    let flux: Vec<serde_json::Value> =
        serde_yaml::Deserializer::from_str(&repo_file("deploy/gitops/flux-kustomization.yaml"))
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
    let kustomization = flux.iter().find(|o| kind(o) == "Kustomization").expect("a Flux Kustomization");
    assert!(flux.iter().any(|o| kind(o) == "GitRepository"));
    let sync_options = argo["spec"]["syncPolicy"]["syncOptions"].as_array().unwrap();
    assert!(sync_options.iter().any(|o| o == "ServerSideApply=true"), "{sync_options:?}");
    assert_eq!(kustomization["spec"]["prune"], true);
    for path in [argo["spec"]["source"]["path"].as_str().unwrap(), kustomization["spec"]["path"].as_str().unwrap()] {
        let dir = repo().join(path.trim_start_matches("./"));
        let mut kinds = BTreeSet::new();
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{path}: {e}")) {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let object: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
                kinds.insert(kind(&object).to_owned());
            }
        }
        assert_eq!(kinds, BTreeSet::from(["PrecisionPolicy".to_owned(), "QuantizedModel".to_owned()]), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_installs_converges_and_does_not_drift() -> Result<(), Error> {
    let started = Instant::now();
    let env = TestEnv::new("chart").await?;
    let admin = env.client.clone();
    let ns = env.namespace().to_owned();
    let k = |what: &'static str| Error::kube(what);
    // The release is named after the namespace, so its cluster-scoped objects are unique too.
    let release = ns.clone();
    let objects = render(&release, &ns, &["operator.replicas=2", "router.replicas=2"]);
    let rendered_object = |k: &str, suffix: &str| {
        objects
            .iter()
            .find(|o| kind(o) == k && name(o).ends_with(suffix))
            .unwrap_or_else(|| panic!("the chart renders no {k} *{suffix}"))
    };
    let operator_sa = name(rendered_object("ServiceAccount", "-operator")).to_owned();
    let router_sa = name(rendered_object("ServiceAccount", "-router")).to_owned();

    // Every container of the rendered chart: non-root, read-only root filesystem, no escalation, RuntimeDefault.
    let mut violations = Vec::new();
    for deployment in objects.iter().filter(|o| kind(o) == "Deployment") {
        let spec = typed::<Deployment>(deployment).spec.unwrap().template.spec.unwrap();
        violations.extend(security_violations(name(deployment), &spec));
    }
    assert_eq!(violations, Vec::<String>::new());

    // The rendered ClusterRole is deploy/rbac's, rule for rule, and bound only to the operator's ServiceAccount.
    let reference: ClusterRole = serde_yaml::from_str(&repo_file("deploy/rbac/operator-clusterrole.yaml")).unwrap();
    let rendered: ClusterRole = typed(rendered_object("ClusterRole", "-operator"));
    let want = grants(&reference.rules.clone().unwrap_or_default());
    assert_eq!(grants(&rendered.rules.clone().unwrap_or_default()), want, "chart vs deploy/rbac");
    let bindings: Vec<_> =
        objects.iter().filter(|o| matches!(kind(o), "ClusterRoleBinding" | "RoleBinding" | "Role")).collect();
    assert_eq!(bindings.len(), 3, "the operator's ClusterRoleBinding, the router's Role and RoleBinding: {bindings:?}");
    let binding: ClusterRoleBinding = typed(rendered_object("ClusterRoleBinding", "-operator"));
    assert_eq!(binding.role_ref.name, rendered.metadata.name.clone().unwrap());
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(
        (subjects[0].name.as_str(), subjects[0].namespace.as_deref()),
        (operator_sa.as_str(), Some(ns.as_str()))
    );
    // The router's Role is deploy/rbac's (same policy name: the chart's default is the sample's), bound only to
    // the router's ServiceAccount, in the policy's namespace (the release's by default).
    let router_reference: Role = serde_yaml::from_str(&repo_file("deploy/rbac/router-role.yaml")).unwrap();
    let router_role: Role = typed(rendered_object("Role", "-router"));
    let router_want = grants(&router_reference.rules.clone().unwrap_or_default());
    assert_eq!(grants(&router_role.rules.clone().unwrap_or_default()), router_want, "chart vs deploy/rbac (router)");
    let router_binding: RoleBinding = typed(rendered_object("RoleBinding", "-router"));
    assert_eq!(router_binding.role_ref.name, router_role.metadata.name.clone().unwrap());
    assert_eq!(router_binding.role_ref.kind, "Role");
    let subjects = router_binding.subjects.unwrap_or_default();
    assert_eq!(
        subjects.iter().map(|s| (s.name.as_str(), s.namespace.as_deref())).collect::<Vec<_>>(),
        [(router_sa.as_str(), Some(ns.as_str()))]
    );

    // Server-side dry run first: the API server validates and defaults everything, and nothing is created.
    apply_all(&admin, &objects, true).await?;
    // The namespace-scoped chart (the operator's rules as a Role) passes the API server's validation too.
    let watched = format!("operator.watchNamespace={ns}");
    let scoped = render(&release, &ns, &["operator.replicas=2", "router.replicas=2", &watched]);
    assert!(scoped.iter().any(|o| kind(o) == "Role" && name(o).ends_with("-operator")), "no scoped operator Role");
    apply_all(&admin, &scoped, true).await?;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    let operator_deployment = name(rendered_object("Deployment", "-operator")).to_owned();
    assert!(deployments.get_opt(&operator_deployment).await.map_err(k("reading"))?.is_none(), "dry run created");
    apply_all(&admin, &objects, false).await?;
    println!("chart: {} objects applied (dry run, then for real) after {:.1?}", objects.len(), started.elapsed());

    // The operator and router pods are scheduled onto the (kwok) nodes and become Ready.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let selector = format!("app.kubernetes.io/instance={release}");
    let scheduled = until("2 operator and 2 router pods scheduled and Ready", Duration::from_secs(60), || async {
        let list = pods.list(&ListParams::default().labels(&selector)).await.map_err(k("listing pods"))?;
        let ready: Vec<(String, String, String)> = list
            .items
            .iter()
            .filter(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .filter_map(|p| {
                let component = p.labels().get("app.kubernetes.io/name")?.clone();
                let node = p.spec.as_ref()?.node_name.clone()?;
                Some((component, p.name_any(), node))
            })
            .collect();
        let count = |c: &str| ready.iter().filter(|(component, _, _)| component == c).count();
        Ok(if count("quantfleet-operator") == 2 && count("quantfleet-router") == 2 {
            Probe::Done((ready, list.items))
        } else {
            Probe::Pending(format!("{} pods, ready and scheduled: {ready:?}", list.items.len()))
        })
    })
    .await?;
    for (component, pod, node) in &scheduled.0 {
        println!("chart: {component} pod {pod} on node {node}");
    }
    // The live pods (after admission and defaulting) keep the security settings.
    for pod in &scheduled.1 {
        assert_eq!(security_violations(&pod.name_any(), pod.spec.as_ref().unwrap()), Vec::<String>::new());
    }

    // Effective rights: the chart's operator ServiceAccount may do exactly what a ServiceAccount bound to
    // deploy/rbac's ClusterRole may do (in its own namespace and in another), and the router's ServiceAccount
    // exactly what one bound to deploy/rbac's router Role may (in the policy's namespace; elsewhere nothing
    // beyond what every authenticated user has).
    let reference_name = format!("{ns}-reference");
    let mut reference_role = reference.clone();
    reference_role.metadata = ObjectMeta { name: Some(reference_name.clone()), ..ObjectMeta::default() };
    Api::<ClusterRole>::all(admin.clone())
        .patch(&reference_name, &PatchParams::apply(CHART_MANAGER).force(), &Patch::Apply(&reference_role))
        .await
        .map_err(k("applying the reference role"))?;
    let service_accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), &ns);
    for sa in ["reference", "router-reference", "unbound"] {
        let sa = ServiceAccount {
            metadata: ObjectMeta { name: Some(sa.into()), ..ObjectMeta::default() },
            ..ServiceAccount::default()
        };
        service_accounts.create(&PostParams::default(), &sa).await.map_err(k("creating a ServiceAccount"))?;
    }
    let reference_binding = ClusterRoleBinding {
        metadata: ObjectMeta { name: Some(reference_name.clone()), ..ObjectMeta::default() },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: reference_name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "reference".into(),
            namespace: Some(ns.clone()),
            ..Subject::default()
        }]),
    };
    Api::<ClusterRoleBinding>::all(admin.clone())
        .patch(&reference_name, &PatchParams::apply(CHART_MANAGER).force(), &Patch::Apply(&reference_binding))
        .await
        .map_err(k("binding the reference role"))?;
    let mut router_reference_role = router_reference.clone();
    router_reference_role.metadata = ObjectMeta { name: Some("router-reference".into()), ..ObjectMeta::default() };
    Api::<Role>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &router_reference_role)
        .await
        .map_err(k("creating the router reference Role"))?;
    let router_reference_binding = RoleBinding {
        metadata: ObjectMeta { name: Some("router-reference".into()), ..ObjectMeta::default() },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "router-reference".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "router-reference".into(),
            namespace: Some(ns.clone()),
            ..Subject::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &router_reference_binding)
        .await
        .map_err(k("binding the router reference Role"))?;
    let sa_user = |sa: &str| format!("system:serviceaccount:{ns}:{sa}");
    let router_reference_rights =
        until("the router reference binding to take effect", Duration::from_secs(10), || async {
            let rights = effective_rights(&sa_user("router-reference"), &ns).await?;
            Ok(if rights.is_superset(&router_want) {
                Probe::Done(rights)
            } else {
                Probe::Pending(format!("{rights:?}"))
            })
        })
        .await?;
    assert_eq!(
        effective_rights(&sa_user(&router_sa), &ns).await?,
        router_reference_rights,
        "router ServiceAccount vs deploy/rbac, in the policy's namespace"
    );
    for review_ns in [ns.as_str(), "default"] {
        let reference_rights = until("the reference binding to take effect", Duration::from_secs(10), || async {
            let rights = effective_rights(&sa_user("reference"), review_ns).await?;
            Ok(if rights.is_superset(&want) { Probe::Done(rights) } else { Probe::Pending(format!("{rights:?}")) })
        })
        .await?;
        let operator_rights = effective_rights(&sa_user(&operator_sa), review_ns).await?;
        assert_eq!(operator_rights, reference_rights, "operator ServiceAccount vs deploy/rbac, in {review_ns}");
        let baseline = effective_rights(&sa_user("unbound"), review_ns).await?;
        if review_ns != ns {
            assert_eq!(effective_rights(&sa_user(&router_sa), review_ns).await?, baseline, "router rights elsewhere");
        }
        assert!(!baseline.is_superset(&want), "the baseline must not already include the operator's rights");
        assert!(!baseline.is_superset(&router_want), "the baseline must not already include the router's rights");
    }

    // The operator, acting as the chart's ServiceAccount (its rights are enough), reconciles a user's model and
    // policy until the model is Ready and the canary shadows (no router stats here, so it stays there).
    let mut config = control_plane()?.config().await?;
    config.auth_info.impersonate = Some(sa_user(&operator_sa));
    let client = Client::try_from(config).map_err(k("building the operator's client"))?;
    let lease_name = objects
        .iter()
        .find(|o| kind(o) == "Deployment" && name(o) == operator_deployment)
        .and_then(|d| d["spec"]["template"]["spec"]["containers"][0]["args"].as_array())
        .and_then(|args| args.iter().filter_map(|a| a.as_str()?.strip_prefix("--lease-name=")).next())
        .expect("the operator Deployment names its Lease")
        .to_owned();
    // The operator reads every router replica's stats through the router Service's EndpointSlices: the chart
    // names that Service, and its ServiceAccount may list them (kwok's router pods answer nothing, so the read is
    // incomplete, but not for lack of rights).
    let router_service = objects
        .iter()
        .find(|o| kind(o) == "Deployment" && name(o) == operator_deployment)
        .and_then(|d| d["spec"]["template"]["spec"]["containers"][0]["args"].as_array())
        .and_then(|args| args.iter().filter_map(|a| a.as_str()?.strip_prefix("--router-service=")).next())
        .expect("the operator Deployment names the router Service")
        .to_owned();
    assert_eq!(router_service, format!("{ns}/{}", name(rendered_object("Service", "-router"))));
    let stats = quantfleet_operator::stats_source::RouterStats::service(
        client.clone(),
        &router_service,
        "http",
        Duration::from_secs(1),
    )
    .unwrap();
    let evidence = stats.read().await;
    let problem = evidence.problem.unwrap_or_default();
    assert!(!problem.contains("listing the EndpointSlices"), "the operator could not list router endpoints: {problem}");
    let elector = LeaderElector::new(Api::namespaced(client.clone(), &ns), &lease_name, "chart-test", QUIET_PERIOD);
    assert!(elector.try_acquire_or_renew().await.map_err(k("taking the chart's leader Lease as the operator"))?);
    let metrics = Arc::new(Metrics::default());
    let ctx = Arc::new(Context {
        recorder: kube::runtime::events::Recorder::new(client.clone(), reporter(Some("chart-test".into()))),
        client: client.clone(),
        settings: Settings { node_image: "registry.invalid/quantfleet:chart-test".into() },
        accelerators: AcceleratorTable::builtin(),
        stats: None,
        metrics: metrics.clone(),
        watch_namespace: None,
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(run(ctx, async move {
        let _ = stopped.await;
    }));
    let mut model: QuantizedModel =
        serde_yaml::from_str(&repo_file("deploy/samples/smollm2-135m.quantizedmodel.yaml")).unwrap();
    for tier in &mut model.spec.tiers {
        tier.replicas = 1;
    }
    let policy: PrecisionPolicy =
        serde_yaml::from_str(&repo_file("deploy/samples/smollm2-135m.precisionpolicy.yaml")).unwrap();
    let user_params = PatchParams::apply(USER_MANAGER);
    let models: Api<QuantizedModel> = Api::namespaced(admin.clone(), &ns);
    let policies: Api<PrecisionPolicy> = Api::namespaced(admin.clone(), &ns);
    let model_name = model.name_any();
    models.patch(&model_name, &user_params, &Patch::Apply(&model)).await.map_err(k("applying the model"))?;
    policies.patch(&policy.name_any(), &user_params, &Patch::Apply(&policy)).await.map_err(k("applying the policy"))?;
    until("the model Ready and the canary Shadowing", Duration::from_secs(60), || async {
        let ready = models
            .get(&model_name)
            .await
            .map_err(k("reading the model"))?
            .status
            .and_then(|s| find(&s.conditions, "Ready").map(|c| c.status.clone()));
        let phase = policies.get(&policy.name_any()).await.map_err(k("reading the policy"))?;
        let phase = phase.status.and_then(|s| s.canary).map(|c| c.phase);
        Ok(match (ready.as_deref(), phase) {
            (Some("True"), Some(CanaryPhase::Shadowing)) => Probe::Done(()),
            other => Probe::Pending(format!("{other:?}; {}", metrics.render())),
        })
    })
    .await?;
    let errors = metrics.count("quantizedmodel", "kube_api") + metrics.count("precisionpolicy", "kube_api");
    assert_eq!(errors, 0, "API errors under the chart's ServiceAccount: {}", metrics.render());

    // The router's Kubernetes source, acting as the chart's router ServiceAccount, sees the policy with the
    // operator's status and the EndpointSlices the EndpointSlice controller made for the operator's tier Services:
    // every tier, on the gRPC port, with the (kwok) pods' addresses.
    let mut config = control_plane()?.config().await?;
    config.auth_info.impersonate = Some(sa_user(&router_sa));
    let router_client = Client::try_from(config).map_err(k("building the router's client"))?;
    let router_metrics = Arc::new(quantfleet_router::metrics::Metrics::default());
    let snapshots =
        quantfleet_router::kubernetes::watch(router_client, &ns, &policy.name_any(), router_metrics.clone());
    let services = Api::<Service>::namespaced(admin.clone(), &ns)
        .list(&ListParams::default().labels(&format!("{MODEL_LABEL}={model_name}")))
        .await
        .map_err(k("listing the tier Services"))?;
    let tiers: Vec<String> = services.items.iter().filter_map(|s| s.labels().get(TIER_LABEL).cloned()).collect();
    assert!(!tiers.is_empty(), "the operator created tier Services");
    let seen = until("the router source to see every tier's node endpoints", Duration::from_secs(60), || async {
        let snapshot = snapshots.borrow().clone();
        Ok(match snapshot {
            Some(s) if tiers.iter().all(|t| s.endpoints.get(t).is_some_and(|e| !e.is_empty())) => Probe::Done(s),
            other => Probe::Pending(format!("{:?}; {}", other.map(|s| s.endpoints.clone()), router_metrics.render())),
        })
    })
    .await?;
    let grpc_suffix = format!(":{}", quantfleet_api::node::NODE_GRPC_PORT);
    assert!(seen.endpoints.values().flatten().all(|e| e.ends_with(&grpc_suffix)), "{:?}", seen.endpoints);
    assert_eq!(
        seen.policy.status.as_ref().and_then(|s| s.canary.as_ref()).map(|c| c.phase),
        Some(CanaryPhase::Shadowing)
    );
    assert!(!router_metrics.render().contains("reason=\"watch_error\""), "{}", router_metrics.render());
    println!("chart: the router source (as the chart's router ServiceAccount) sees {:?}", seen.endpoints);
    drop(snapshots);

    // No drift. The watched set: every chart object and the user's two objects.
    let user_objects = [
        serde_json::to_value(models.get(&model_name).await.map_err(k("reading the model"))?).unwrap(),
        serde_json::to_value(policies.get(&policy.name_any()).await.map_err(k("reading the policy"))?).unwrap(),
    ];
    let watched: Vec<serde_json::Value> = objects.iter().cloned().chain(user_objects.iter().cloned()).collect();
    // Converged: the chart's Deployments report all replicas up to date and available.
    until("the chart's Deployments to settle", Duration::from_secs(30), || async {
        let mut pending = Vec::new();
        for d in objects.iter().filter(|o| kind(o) == "Deployment") {
            let live = deployments.get(name(d)).await.map_err(k("reading a Deployment"))?;
            let want = live.spec.as_ref().and_then(|s| s.replicas);
            let s = live.status.unwrap_or_default();
            let settled = s.observed_generation == live.metadata.generation
                && s.available_replicas == want
                && s.updated_replicas == want
                && s.replicas == want;
            if !settled {
                pending.push(name(d).to_owned());
            }
        }
        Ok(if pending.is_empty() { Probe::Done(()) } else { Probe::Pending(format!("{pending:?}")) })
    })
    .await?;
    // Converged: two snapshots 3 s apart agree (controllers finished writing status, e.g. the PDBs').
    let mut before = snapshot(&admin, &watched).await?;
    let settle_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = snapshot(&admin, &watched).await?;
        if now == before {
            break;
        }
        assert!(Instant::now() < settle_deadline, "the installation did not settle within 30 s");
        before = now;
    }
    let renewals = tokio::spawn({
        let elector = elector.clone();
        async move {
            // Keep the Lease held the way a leader does, so the operator stays the one active replica.
            let _ = elector.hold().await;
        }
    });
    tokio::time::sleep(QUIET_PERIOD).await;
    let after = snapshot(&admin, &watched).await?;
    renewals.abort();
    let changed: Vec<_> = before.keys().filter(|key| before[*key] != after[*key]).collect();
    assert!(changed.is_empty(), "objects changed during a quiet {QUIET_PERIOD:?}: {changed:?}");
    let (chart_snapshots, user_snapshots): (BTreeMap<_, _>, BTreeMap<_, _>) = after
        .into_iter()
        .partition(|(key, _)| !key.starts_with("QuantizedModel ") && !key.starts_with("PrecisionPolicy "));
    // The CRDs are cluster-scoped and shared with every other test on this control plane, which installs the
    // same files from crds/ (equal to the chart's, checked by scripts/helm-check.sh) under the testsupport
    // field manager: that co-owner depends on test order and is not drift.
    let foreign: Vec<String> = foreign_spec_writers(&chart_snapshots, CHART_MANAGER)
        .into_iter()
        .filter(|w| !(w.starts_with("CustomResourceDefinition ") && w.contains(": quantfleet-testsupport (Apply) ")))
        .collect();
    assert_eq!(foreign, Vec::<String>::new());
    assert_eq!(foreign_spec_writers(&user_snapshots, USER_MANAGER), Vec::<String>::new());
    // ...while the operator did write both user objects, through their status subresource only.
    for (object, snap) in &user_snapshots {
        let operator_entries: Vec<_> =
            snap.managers.iter().filter(|(manager, ..)| manager == FIELD_MANAGER).map(|(_, _, sub, _)| sub).collect();
        assert!(
            !operator_entries.is_empty() && operator_entries.iter().all(|sub| *sub == "status"),
            "{object}: the operator's entries are {operator_entries:?}"
        );
    }
    // A GitOps resync (the same manifests applied again) is a no-op: nothing changed what the chart declares.
    apply_all(&admin, &objects, false).await?;
    let resynced = snapshot(&admin, &objects).await?;
    for (key, snap) in &resynced {
        assert_eq!(snap.resource_version, before[key].resource_version, "{key} was rewritten by a resync");
    }
    println!(
        "chart: {} objects unchanged over {QUIET_PERIOD:?} with the operator running and after a resync; total {:.1?}",
        watched.len(),
        started.elapsed()
    );

    // The NetworkPolicies select what they are meant to (no CNI enforces them here, so check their selectors):
    // each component's policy selects its live pods, and the router's only egress besides DNS reaches the node
    // pods the operator created, on their gRPC port.
    let labels_match = |selector: &serde_json::Value, labels: &BTreeMap<String, String>| {
        selector["matchLabels"]
            .as_object()
            .is_some_and(|want| want.iter().all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str()))
    };
    let live_pods = pods.list(&ListParams::default()).await.map_err(k("listing pods"))?.items;
    let node_pods: Vec<&Pod> = live_pods.iter().filter(|p| p.labels().contains_key(TIER_LABEL)).collect();
    assert!(!node_pods.is_empty(), "the operator created node pods");
    for component in ["operator", "router"] {
        let policy = rendered_object("NetworkPolicy", &format!("-{component}"));
        let selected: Vec<_> =
            live_pods.iter().filter(|p| labels_match(&policy["spec"]["podSelector"], p.labels())).collect();
        assert_eq!(selected.len(), 2, "{component} NetworkPolicy selects {} pods", selected.len());
        assert!(selected.iter().all(|p| p.labels()["app.kubernetes.io/name"] == format!("quantfleet-{component}")));
    }
    let router_policy = rendered_object("NetworkPolicy", "-router");
    let egress = router_policy["spec"]["egress"].as_array().unwrap();
    let api_ports: Vec<serde_json::Value> =
        [443, 6443].iter().map(|p| serde_json::json!({"port": p, "protocol": "TCP"})).collect();
    let to_nodes: Vec<_> = egress
        .iter()
        .filter(|rule| rule["ports"].as_array().unwrap().iter().all(|p| p["port"] != 53))
        .filter(|rule| rule["ports"].as_array().unwrap() != &api_ports)
        .collect();
    assert_eq!(egress.len(), 3, "router egress: the API server, the nodes, DNS: {egress:?}");
    assert_eq!(to_nodes.len(), 1, "router egress besides DNS and the API server: {to_nodes:?}");
    let grpc_port = node_pods[0].spec.as_ref().unwrap().containers[0]
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("grpc"))
        .map(|p| p.container_port)
        .unwrap();
    assert_eq!(to_nodes[0]["ports"], serde_json::json!([{"port": grpc_port, "protocol": "TCP"}]));
    for pod in &node_pods {
        assert!(labels_match(&to_nodes[0]["to"][0]["podSelector"], pod.labels()), "{} not reachable", pod.name_any());
    }
    // Node pods run as the same non-root UID as the chart's containers (one image, one user).
    let chart_uid =
        typed::<Deployment>(rendered_object("Deployment", "-operator")).spec.unwrap().template.spec.unwrap();
    assert_eq!(chart_uid.security_context.unwrap().run_as_user, Some(NODE_UID));

    let _ = stop.send(());
    operator.await.unwrap();
    elector.release().await.map_err(k("releasing the Lease"))?;
    let crb: Api<ClusterRoleBinding> = Api::all(admin.clone());
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    for n in [&reference_name, name(rendered_object("ClusterRoleBinding", "-operator"))] {
        crb.delete(n, &Default::default()).await.map_err(k("cleanup"))?;
    }
    for n in [&reference_name, name(rendered_object("ClusterRole", "-operator"))] {
        roles.delete(n, &Default::default()).await.map_err(k("cleanup"))?;
    }
    env.cleanup().await
}

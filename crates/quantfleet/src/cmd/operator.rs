//! `quantfleet operator`: runs the QuantizedModel and PrecisionPolicy controllers against the cluster in the
//! kubeconfig (or the pod's service account), with Prometheus metrics on `--metrics-addr`.

use anyhow::{Context as _, Result};
use quantfleet_api::plan::AcceleratorTable;
use quantfleet_operator::builders::Settings;
use quantfleet_operator::controller::{Context, reporter, run};
use quantfleet_operator::lease::LeaderElector;
use quantfleet_operator::metrics::Metrics;
use quantfleet_operator::stats_source::RouterStats;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image with the `quantfleet` binary that node pods run.
    #[arg(long, env = "QUANTFLEET_NODE_IMAGE")]
    node_image: String,
    /// The router Service, as NAMESPACE/NAME: the operator reads the canary stats of every router replica (the
    /// endpoints of the Service's EndpointSlices) and sums them. Without it or --router-stats-url canaries wait
    /// in Shadowing for samples.
    #[arg(long, env = "QUANTFLEET_ROUTER_SERVICE", conflicts_with = "router_stats_url")]
    router_service: Option<String>,
    /// The name of the router Service's HTTP port (the EndpointSlices' port of that name is read).
    #[arg(long, default_value = "http")]
    router_service_port: String,
    /// One router's canary stats URL, e.g. http://127.0.0.1:8080/v1/canary/stats, for local use with a single
    /// router (with several replicas behind one URL the evidence would mix their counters: use --router-service).
    #[arg(long, env = "QUANTFLEET_ROUTER_STATS_URL")]
    router_stats_url: Option<String>,
    /// Extra accelerator for the fit planner, as NAME=MEMORY,COMPUTE_CAPABILITY. Repeatable.
    #[arg(long = "accelerator", value_name = "NAME=MEMORY,CC")]
    accelerators: Vec<String>,
    /// Address of the Prometheus metrics endpoint.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: String,
    /// This replica's identity in Events and in the leader Lease (usually the pod name).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
    /// Run only while holding the leader Lease, so several replicas can run with one active.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the leader Lease (the operator's own namespace in a cluster).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "quantfleet-operator")]
    lease_name: String,
    /// How long a leader's Lease is valid without renewal (renewed every third of it).
    #[arg(long, default_value = "15", value_name = "SECONDS")]
    lease_duration_seconds: u64,
    /// Watch the QuantizedModels and PrecisionPolicies of this one namespace only (and create their
    /// Deployments, Services and ConfigMaps there, as always). The operator then needs its rights in that
    /// namespace only: bind its ClusterRole with a RoleBinding there, plus one in the Lease's and the router's
    /// namespace. Without it, or empty (as operator-sdk's WATCH_NAMESPACE), every namespace is watched, which
    /// needs a ClusterRoleBinding.
    #[arg(long, env = "QUANTFLEET_WATCH_NAMESPACE", value_name = "NAMESPACE", value_parser = namespace_name)]
    watch_namespace: Option<String>,
}

/// A Kubernetes namespace name (an RFC 1123 label: at most 63 lower-case alphanumerics or '-', starting and
/// ending alphanumeric), or empty for every namespace, so a typo fails at start-up instead of as a forbidden or
/// empty watch.
fn namespace_name(s: &str) -> Result<String, String> {
    if s.is_empty() || quantfleet_api::validate::is_dns_label(s, 63) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a namespace name (at most 63 lower-case letters, digits and '-', alphanumeric at both ends)"
        ))
    }
}

pub fn run_operator(args: Args) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let watch_namespace = args.watch_namespace.clone().filter(|ns| !ns.is_empty());
        let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
        let mut accelerators = AcceleratorTable::builtin();
        for entry in &args.accelerators {
            accelerators.insert(AcceleratorTable::parse_entry(entry).map_err(anyhow::Error::msg)?);
        }
        let stats = match (&args.router_service, &args.router_stats_url) {
            (Some(service), _) => {
                Some(RouterStats::service(client.clone(), service, &args.router_service_port, Duration::from_secs(5))?)
            }
            (None, Some(url)) => Some(RouterStats::url(url, Duration::from_secs(5))?),
            (None, None) => None,
        };
        let identity = args.instance.clone().unwrap_or_else(|| format!("quantfleet-operator-{}", std::process::id()));
        let elector = args.leader_elect.then(|| {
            LeaderElector::new(
                kube::Api::namespaced(client.clone(), &args.lease_namespace),
                &args.lease_name,
                &identity,
                Duration::from_secs(args.lease_duration_seconds.max(3)),
            )
        });
        let metrics = Arc::new(Metrics::default());
        let listener = tokio::net::TcpListener::bind(&args.metrics_addr)
            .await
            .with_context(|| format!("binding the metrics address {}", args.metrics_addr))?;
        tokio::spawn(quantfleet_operator::metrics::serve(listener, metrics.clone()));
        let ctx = Arc::new(Context {
            recorder: kube::runtime::events::Recorder::new(client.clone(), reporter(args.instance.clone())),
            client,
            settings: Settings { node_image: args.node_image },
            accelerators,
            stats,
            metrics,
            watch_namespace: watch_namespace.clone(),
        });
        if let Some(elector) = &elector {
            tracing::info!(identity = elector.identity(), lease = %args.lease_name, "waiting to lead");
            tokio::select! {
                acquired = elector.acquire() => acquired.context("acquiring the leader lease")?,
                _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            }
        }
        let watching = watch_namespace.as_deref().unwrap_or("every namespace");
        tracing::info!(identity, watching, "quantfleet operator leading");
        let (lost_tx, mut lost_rx) = tokio::sync::watch::channel(false);
        let holder = elector.clone();
        run(ctx, async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
                _ = async { match &holder { Some(e) => e.hold().await, None => std::future::pending().await } } => {
                    tracing::error!("lost the leader lease; stopping so a standby can lead");
                    let _ = lost_tx.send(true);
                }
            }
        })
        .await;
        if *lost_rx.borrow_and_update() {
            return Ok(ExitCode::from(1));
        }
        if let Some(elector) = &elector {
            elector.release().await.context("releasing the leader lease")?;
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::namespace_name;

    #[test]
    fn watch_namespace_must_be_a_namespace_name() {
        for ok in ["default", "team-a", "a", "ns1", &"x".repeat(63), ""] {
            assert_eq!(namespace_name(ok).as_deref(), Ok(ok));
        }
        for bad in ["Team", "-a", "a-", "a_b", "a.b", "a b", &"x".repeat(64)] {
            let err = namespace_name(bad).unwrap_err();
            assert!(err.contains("is not a namespace name"), "{bad:?}: {err}");
        }
    }
}

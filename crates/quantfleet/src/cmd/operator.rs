//! `quantfleet operator`: runs the QuantizedModel and PrecisionPolicy controllers against the cluster in the
//! kubeconfig (or the pod's service account), with Prometheus metrics on `--metrics-addr`.

use anyhow::{Context as _, Result};
use quantfleet_api::plan::AcceleratorTable;
use quantfleet_operator::builders::Settings;
use quantfleet_operator::controller::{Context, reporter, run};
use quantfleet_operator::metrics::Metrics;
use quantfleet_operator::stats_source::HttpStats;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image with the `quantfleet` binary that node pods run.
    #[arg(long, env = "QUANTFLEET_NODE_IMAGE")]
    node_image: String,
    /// The router's canary stats endpoint, e.g. http://quantfleet-router.quantfleet-system:8080/v1/canary/stats.
    /// Without it canaries wait in Shadowing for samples.
    #[arg(long, env = "QUANTFLEET_ROUTER_STATS_URL")]
    router_stats_url: Option<String>,
    /// Extra accelerator for the fit planner, as NAME=MEMORY,COMPUTE_CAPABILITY. Repeatable.
    #[arg(long = "accelerator", value_name = "NAME=MEMORY,CC")]
    accelerators: Vec<String>,
    /// Address of the Prometheus metrics endpoint.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: String,
    /// This replica's identity in Events (usually the pod name).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
}

pub fn run_operator(args: Args) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
        let mut accelerators = AcceleratorTable::builtin();
        for entry in &args.accelerators {
            accelerators.insert(AcceleratorTable::parse_entry(entry).map_err(anyhow::Error::msg)?);
        }
        let stats = match &args.router_stats_url {
            Some(url) => Some(HttpStats::new(url, Duration::from_secs(5))?),
            None => None,
        };
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
        });
        tracing::info!("quantfleet operator started");
        run(ctx, async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        })
        .await;
        Ok(ExitCode::SUCCESS)
    })
}

//! `quantfleet router`: the OpenAI-compatible front door. Its policy and node endpoints come from a static
//! configuration (`--config FILE`, see quantfleet_router::config) or, in a cluster, from the Kubernetes API
//! (`--kubernetes --policy NAME`: the PrecisionPolicy and the EndpointSlices of its model's tier Services,
//! followed live; see quantfleet_router::kubernetes). Serves until SIGINT or SIGTERM.

use anyhow::{Context as _, Result};
use quantfleet_router::metrics::Metrics;
use quantfleet_router::server::TokenCounter;
use quantfleet_router::{Loaded, Router, RouterConfig, kubernetes};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Router configuration (YAML): the PrecisionPolicy (inline or policyFile), endpoints per tier, limits.
    /// With --kubernetes: only the settings (listen, limits, shadow, tokenizer); optional.
    #[arg(long, required_unless_present = "kubernetes")]
    config: Option<PathBuf>,
    /// Listen address, overriding the configuration's `listen`.
    #[arg(long)]
    listen: Option<String>,
    /// Take the policy and the node endpoints from the Kubernetes API (the kubeconfig, or the pod's service
    /// account): the PrecisionPolicy --policy and the EndpointSlices of its model's tier Services, followed live.
    #[arg(long, requires = "policy")]
    kubernetes: bool,
    /// Name of the PrecisionPolicy to serve (with --kubernetes).
    #[arg(long, requires = "kubernetes")]
    policy: Option<String>,
    /// Namespace of the PrecisionPolicy and its model (with --kubernetes; default: the kubeconfig's namespace,
    /// or the pod's own).
    #[arg(long, requires = "kubernetes")]
    namespace: Option<String>,
    /// On SIGTERM/SIGINT, stop accepting connections and give requests in flight this long to finish (keep it
    /// below the pod's terminationGracePeriodSeconds).
    #[arg(long, default_value = "25", value_name = "SECONDS")]
    drain_seconds: u64,
}

pub fn run(args: Args) -> Result<ExitCode> {
    if args.kubernetes {
        return run_kubernetes(args);
    }
    let config = args.config.expect("clap requires --config without --kubernetes");
    let mut loaded = RouterConfig::load(&config).with_context(|| format!("loading {}", config.display()))?;
    if let Some(listen) = args.listen {
        loaded.config.listen = listen;
        loaded = loaded.config.check()?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&loaded.config.listen)
            .await
            .with_context(|| format!("binding {}", loaded.config.listen))?;
        eprintln!("router listening on http://{}/v1", listener.local_addr()?);
        let counter = loaded.config.tokenizer.as_deref().map(token_counter).transpose()?;
        let router = Router::new(&loaded, grpc_client(), counter);
        tokio::spawn(router.clone().health_loop(loaded.config.health_interval()));
        serve_draining(listener, router.app(), std::future::pending(), Duration::from_secs(args.drain_seconds)).await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn grpc_client() -> Arc<quantfleet_router::grpc::GrpcClient> {
    Arc::new(quantfleet_router::grpc::GrpcClient::new(Duration::from_secs(2), Duration::from_secs(600)))
}

/// Serves `app` until SIGINT/SIGTERM (or until `other` fails), then stops accepting connections and lets the
/// requests in flight finish, streams included, for up to `drain`: a rolling update of the router's pods
/// loses no request.
async fn serve_draining(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    other: impl std::future::Future<Output = Result<()>>,
    drain: Duration,
) -> Result<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    tokio::select! {
        r = &mut server => r.context("the HTTP server failed")?.context("the HTTP server failed")?,
        r = other => r?,
        sig = shutdown_signal() => {
            eprintln!("{sig}: draining the requests in flight (up to {drain:?})");
            let _ = stop.send(());
            match tokio::time::timeout(drain, server).await {
                Ok(r) => r.context("the HTTP server failed")?.context("the HTTP server failed")?,
                Err(_) => eprintln!("requests still in flight after {drain:?}: stopping anyway"),
            }
            eprintln!("router stopped");
        }
    }
    Ok(())
}

/// `--kubernetes`: listens at once (answering 503 until the policy is known, so the pod is not ready), builds
/// the router from the first complete view of the policy and its EndpointSlices, then applies every change
/// live.
fn run_kubernetes(args: Args) -> Result<ExitCode> {
    let policy = args.policy.expect("clap requires --policy with --kubernetes");
    let mut settings = match &args.config {
        Some(path) => RouterConfig::load_settings(Some(path)).with_context(|| format!("loading {}", path.display()))?,
        None => RouterConfig::load_settings(None)?,
    };
    if let Some(listen) = args.listen {
        settings.listen = listen;
        settings = RouterConfig::load_settings_from(settings)?;
    }
    let counter = settings.tokenizer.as_deref().map(token_counter).transpose()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
        let namespace = args.namespace.unwrap_or_else(|| client.default_namespace().to_owned());
        let what = format!("PrecisionPolicy {namespace}/{policy}");
        let listener = tokio::net::TcpListener::bind(&settings.listen)
            .await
            .with_context(|| format!("binding {}", settings.listen))?;
        eprintln!("router listening on http://{}/v1 (policy and endpoints from {what})", listener.local_addr()?);
        let metrics = Arc::new(Metrics::default());
        let slot = Arc::new(OnceLock::new());
        let app = kubernetes::app_when_ready(slot.clone(), metrics.clone(), what.clone());
        let mut snapshots = kubernetes::watch(client, &namespace, &policy, metrics.clone());
        let serve = async {
            let first =
                kubernetes::first_snapshot(&mut snapshots, &what).await.context("the Kubernetes source stopped")?;
            let mut config = settings.clone();
            config.policy = Some(first.policy.clone());
            config.endpoints = first.endpoints.clone();
            let loaded = config.check().with_context(|| format!("applying {what}"))?;
            let router = Router::with_metrics(&loaded, grpc_client(), counter, metrics);
            tokio::spawn(router.clone().health_loop(loaded.config.health_interval()));
            let _ = slot.set(router.app());
            tracing::info!(endpoints = ?first.endpoints, "serving {what}");
            kubernetes::follow(router, snapshots, first).await;
            anyhow::bail!("the Kubernetes source stopped")
        };
        serve_draining(listener, app, serve, Duration::from_secs(args.drain_seconds)).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// A token counter from the model's own tokenizer (exact long-context classification and context checks).
pub fn token_counter(gguf: &Path) -> Result<TokenCounter> {
    let file = quantfleet_engine::gguf::GgufFile::open(gguf).with_context(|| format!("opening {}", gguf.display()))?;
    let tokenizer = quantfleet_engine::tokenizer::Tokenizer::from_gguf(&file)
        .with_context(|| format!("reading the tokenizer of {}", gguf.display()))?;
    Ok(Arc::new(move |text: &str| {
        tokenizer.encode_prompt(text).map(|ids| ids.len()).unwrap_or_else(|_| text.len().div_ceil(4))
    }))
}

/// Builds the router, starts its health checks and serves it on `listener` (the task runs until dropped).
pub fn start(
    loaded: &Loaded,
    listener: tokio::net::TcpListener,
) -> Result<(Arc<Router>, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let counter = loaded.config.tokenizer.as_deref().map(token_counter).transpose()?;
    let router = Router::new(loaded, grpc_client(), counter);
    tokio::spawn(router.clone().health_loop(loaded.config.health_interval()));
    let app = router.app();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((router, server))
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM, naming the signal.
pub async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        std::future::pending::<()>().await;
        unreachable!()
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

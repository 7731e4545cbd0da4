//! `quantfleet router --config FILE`: the OpenAI-compatible front door over a static configuration (policy
//! and node endpoints; see quantfleet_router::config). Serves until SIGINT or SIGTERM.

use anyhow::{Context as _, Result};
use quantfleet_router::server::TokenCounter;
use quantfleet_router::{Loaded, Router, RouterConfig};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Router configuration (YAML): the PrecisionPolicy (inline or policyFile), endpoints per tier, limits.
    #[arg(long)]
    config: PathBuf,
    /// Listen address, overriding the configuration's `listen`.
    #[arg(long)]
    listen: Option<String>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let mut loaded = RouterConfig::load(&args.config).with_context(|| format!("loading {}", args.config.display()))?;
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
        let (router, server) = start(&loaded, listener)?;
        let _ = router;
        tokio::select! {
            r = server => r.context("the HTTP server failed")??,
            sig = shutdown_signal() => eprintln!("{sig}: shutting down"),
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// A token counter from the model's own tokenizer (exact long-context classification and context checks).
pub fn token_counter(gguf: &Path) -> Result<TokenCounter> {
    let file = quantfleet_engine::gguf::GgufFile::open(gguf).with_context(|| format!("opening {}", gguf.display()))?;
    let tokenizer = quantfleet_engine::tokenizer::Tokenizer::from_gguf(&file)
        .with_context(|| format!("reading the tokenizer of {}", gguf.display()))?;
    Ok(Arc::new(move |text: &str| {
        tokenizer.encode(text).map(|ids| ids.len()).unwrap_or_else(|_| text.len().div_ceil(4))
    }))
}

/// Builds the router, starts its health checks and serves it on `listener` (the task runs until dropped).
pub fn start(
    loaded: &Loaded,
    listener: tokio::net::TcpListener,
) -> Result<(Arc<Router>, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let counter = loaded.config.tokenizer.as_deref().map(token_counter).transpose()?;
    let client = Arc::new(quantfleet_router::grpc::GrpcClient::new(Duration::from_secs(2), Duration::from_secs(600)));
    let router = Router::new(loaded, client, counter);
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

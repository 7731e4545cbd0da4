//! The Quantfleet inference node: loads one model at one tier and serves it over gRPC
//! (`quantfleet.inference.v1.Inference` plus `grpc.health.v1`), with Prometheus metrics on a separate port.
//!
//! Lifecycle ([`run`]): bind both ports and report health NOT_SERVING (RPCs answer UNAVAILABLE) -> load the
//! model on a blocking thread -> start the engine loop ([`scheduler`]) -> SERVING. On SIGTERM/SIGINT: health
//! NOT_SERVING, new requests UNAVAILABLE, in-flight requests finish within the drain deadline (then they are
//! ended with UNAVAILABLE), and the process exits.

pub mod config;
pub mod metrics;
pub mod scheduler;
pub mod service;
pub mod text;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use quantfleet_engine::tier::LoadOptions;
use quantfleet_engine::{Engine, backend::Backend};
use quantfleet_proto::INFERENCE_SERVICE_NAME;
use quantfleet_proto::v1 as pb;
use quantfleet_proto::v1::inference_server::InferenceServer;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

pub use config::{ConfigError, NodeArgs, NodeSettings};
use metrics::Metrics;
use scheduler::{EngineLoop, Scheduler};
use service::{NodeService, Phase, Ready};

async fn set_health(reporter: &HealthReporter, metrics: &Metrics, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(INFERENCE_SERVICE_NAME, status).await;
    metrics.serving.store(u64::from(status == ServingStatus::Serving), Relaxed);
}

/// Checks the checkpoint against the declared architecture, naming the first field that differs.
fn check_architecture(
    declared: &quantfleet_api::model::ModelArchitecture,
    c: &quantfleet_engine::model::LlamaConfig,
) -> Result<()> {
    let pairs = [
        ("architecture.numLayers", declared.num_layers as i64, c.n_layers as i64),
        ("architecture.hiddenSize", declared.hidden_size as i64, c.d_model as i64),
        ("architecture.intermediateSize", declared.intermediate_size as i64, c.d_ff as i64),
        ("architecture.numAttentionHeads", declared.num_attention_heads as i64, c.n_heads as i64),
        ("architecture.numKeyValueHeads", declared.num_key_value_heads as i64, c.n_kv_heads as i64),
        ("architecture.headDim", declared.head_dim as i64, c.head_dim as i64),
        ("architecture.vocabSize", declared.vocab_size as i64, c.vocab as i64),
    ];
    for (field, want, got) in pairs {
        if want != got {
            bail!("{field}: the config declares {want}, the checkpoint has {got}");
        }
    }
    Ok(())
}

/// The compute backend chosen at start-up (before the model loads).
enum Chosen {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(Box<quantfleet_engine::cuda::driver::CudaBackend>),
}

/// Picks the backend for `--backend`: `cuda` must get a usable GPU or start-up fails; `auto` falls back to
/// the CPU with a log line giving the reason. The driver probe never panics (no libcuda is a typed error).
fn choose_backend(choice: config::BackendChoice) -> Result<Chosen> {
    use config::BackendChoice;
    if choice == BackendChoice::Cpu {
        tracing::info!("serving on the CPU backend (--backend cpu)");
        return Ok(Chosen::Cpu);
    }
    #[cfg(feature = "cuda")]
    {
        let cache = std::env::var_os("QUANTFLEET_CACHE")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/quantfleet")))
            .unwrap_or_else(std::env::temp_dir)
            .join("ptx");
        match quantfleet_engine::cuda::driver::open(0, &cache) {
            Ok(b) => {
                tracing::info!(backend = %b.name(), ptx_cache = %cache.display(), "serving on the CUDA backend");
                Ok(Chosen::Cuda(Box::new(b)))
            }
            Err(e) if choice == BackendChoice::Auto => {
                tracing::info!(reason = %e, "no usable CUDA GPU: serving on the CPU backend");
                Ok(Chosen::Cpu)
            }
            Err(e) => bail!("--backend cuda: the CUDA backend cannot serve here: {e}"),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        if choice == BackendChoice::Cuda {
            bail!("--backend cuda: this build has no CUDA backend (the `cuda` cargo feature is off)");
        }
        tracing::info!("serving on the CPU backend: this build has no CUDA backend (the `cuda` cargo feature is off)");
        Ok(Chosen::Cpu)
    }
}

/// Starts the engine loop (generic over the backend) on its own thread.
type StartLoop = Box<dyn FnOnce(Arc<Scheduler>, Arc<Metrics>) -> std::io::Result<std::thread::JoinHandle<()>> + Send>;

/// The model loaded on its backend, and everything the engine loop and ModelInfo need.
struct Loaded {
    engine: Arc<dyn service::HasTokenizer>,
    info: pb::ModelInfoResponse,
    context: usize,
    eos: Vec<u32>,
    start: StartLoop,
}

/// Loads the model at its tier on the chosen backend.
fn load(s: &config::NodeSettings, chosen: Chosen, metrics: &Arc<Metrics>) -> Result<Loaded> {
    let started = Instant::now();
    let what = || format!("loading {} at tier {}", s.model_path.display(), s.tier.name);
    let options =
        LoadOptions { calibration_text: s.calibration.as_ref().map(|(_, t)| t.clone()), ..LoadOptions::default() };
    match chosen {
        Chosen::Cpu => {
            let engine =
                Engine::open_cpu_tier(&s.model_path, s.sha256.as_deref(), &s.tier, &options).with_context(what)?;
            finish(engine, s, metrics, started)
        }
        #[cfg(feature = "cuda")]
        Chosen::Cuda(backend) => {
            let engine = Engine::open_gpu_tier(*backend, &s.model_path, s.sha256.as_deref(), &s.tier, &options)
                .with_context(what)?;
            finish(engine, s, metrics, started)
        }
    }
}

/// Builds ModelInfo and the KV cache for a loaded engine.
fn finish<B: Backend + 'static>(
    engine: Engine<B>,
    s: &config::NodeSettings,
    metrics: &Arc<Metrics>,
    started: Instant,
) -> Result<Loaded>
where
    Engine<B>: Send + Sync,
{
    let report = engine.tier.clone().context("the engine did not report the tier it loaded")?;
    let c = &engine.model.config;
    if let Some(a) = &s.architecture {
        check_architecture(a, c)?;
    }
    let context = s.max_context.unwrap_or(c.context).min(c.context);
    let kv = engine.new_kv_cache(s.kv_budget_bytes as usize).context("kvBudgetBytes")?;
    let mut by_format: Vec<(&str, usize)> = Vec::new();
    for (_, f) in &report.formats {
        match by_format.iter_mut().find(|(n, _)| *n == f.as_str()) {
            Some((_, k)) => *k += 1,
            None => by_format.push((f.as_str(), 1)),
        }
    }
    let weights_loaded = by_format.iter().map(|(n, k)| format!("{n} ({k} matrices)")).collect::<Vec<_>>().join(", ");
    let backend = engine.model.backend.name();
    let block_tokens = kv.layout.block_tokens;
    let eos = engine.tokenizer.stop_ids();
    let info = pb::ModelInfoResponse {
        model: s.model_name.clone(),
        tier: s.tier.name.clone(),
        tier_spec_json: serde_json::to_string(&s.tier).unwrap_or_default(),
        weights_loaded,
        tier_applied: true,
        weight_bytes: report.weight_bytes,
        kv_cache_bytes: (kv.total_blocks() * kv.block_bytes()) as u64,
        kv_bytes_per_token: (kv.block_bytes() / block_tokens) as u64,
        kv_capacity_tokens: kv.capacity_tokens() as u64,
        kv_block_tokens: block_tokens as u32,
        kv_cache_dtype: engine.kv_dtype.name().into(),
        max_context_tokens: context as u32,
        backend: backend.clone(),
        vocab_size: c.vocab as u32,
        max_batch: s.max_batch as u32,
        max_queue: s.max_queue as u32,
        eos_token_ids: eos.clone(),
        calibration_tokens: report.calibration_tokens as u64,
        calibration_source: match (&s.calibration, report.calibration_tokens) {
            (_, 0) => String::new(),
            (Some((path, _)), _) => path.display().to_string(),
            (None, _) => "builtin".into(),
        },
    };
    metrics.set_info(&backend, kv.total_blocks() as u64);
    tracing::info!(
        model = %s.model_name,
        tier = %s.tier.name,
        backend = %backend,
        weights = %info.weights_loaded,
        kv_capacity_tokens = info.kv_capacity_tokens,
        max_context = context,
        kv_cache_dtype = %info.kv_cache_dtype,
        quantize_seconds = report.quantize_seconds,
        calibration_tokens = report.calibration_tokens,
        calibration_source = %info.calibration_source,
        seconds = started.elapsed().as_secs_f64(),
        "model loaded at its tier"
    );
    let engine = Arc::new(engine);
    let (loop_engine, max_batch, loop_eos) = (engine.clone(), s.max_batch, eos.clone());
    let start: StartLoop = Box::new(move |sched, metrics| {
        let engine_loop = EngineLoop { engine: loop_engine, kv, max_batch, eos: loop_eos, sched, metrics };
        std::thread::Builder::new().name("engine".into()).spawn(move || engine_loop.run())
    });
    Ok(Loaded { engine, info, context, eos, start })
}

/// Runs the node until SIGTERM/SIGINT and the drain complete.
pub async fn run(s: NodeSettings) -> Result<()> {
    let chosen = choose_backend(s.backend)?;
    let metrics = Metrics::new(&s.model_name, &s.tier.name);
    let grpc =
        tokio::net::TcpListener::bind(s.grpc_addr).await.with_context(|| format!("--port: binding {}", s.grpc_addr))?;
    let metrics_listener = tokio::net::TcpListener::bind(s.metrics_addr)
        .await
        .with_context(|| format!("--metrics-port: binding {}", s.metrics_addr))?;
    let (grpc_addr, metrics_addr) = (grpc.local_addr()?, metrics_listener.local_addr()?);

    let (reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&reporter, &metrics, ServingStatus::NotServing).await;
    let phase = Arc::new(AtomicU8::new(Phase::Loading as u8));
    let ready = Arc::new(std::sync::OnceLock::new());
    let service = NodeService {
        phase: phase.clone(),
        ready: ready.clone(),
        metrics: metrics.clone(),
        tier: s.tier.name.clone(),
        default_max_tokens: s.default_max_tokens,
        request_timeout: s.request_timeout,
        fault_marker: s.fault_injection_marker.clone(),
        next_id: AtomicU64::new(1),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(InferenceServer::new(service))
            .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(grpc), async {
                let _ = stop_rx.await;
            }),
    );
    let metrics_task = tokio::spawn(metrics::serve(metrics_listener, metrics.clone()));
    tracing::info!(%grpc_addr, %metrics_addr, model = %s.model_path.display(), "listening; loading the model");
    if let Some(path) = &s.ready_file {
        let json = serde_json::json!({ "grpc": grpc_addr.to_string(), "metrics": metrics_addr.to_string() });
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json.to_string()).and_then(|()| std::fs::rename(&tmp, path)).context("--ready-file")?;
    }

    let mut signals = Signals::new()?;
    let load_settings = s.clone();
    let load_metrics = metrics.clone();
    let loading = tokio::task::spawn_blocking(move || load(&load_settings, chosen, &load_metrics));
    let loaded = tokio::select! {
        r = loading => r.context("the loader thread panicked")??,
        sig = signals.recv() => {
            tracing::info!(signal = sig, "signal while loading: exiting");
            return Ok(());
        }
    };

    let handle = tokio::runtime::Handle::current();
    let (fault_reporter, fault_metrics, threshold) = (reporter.clone(), metrics.clone(), s.fault_threshold);
    let sched = Scheduler::new(
        s.max_queue,
        s.fault_threshold,
        metrics.clone(),
        Box::new(move || {
            tracing::error!(threshold, "numerical faults reached the threshold: health NOT_SERVING");
            let (r, m) = (fault_reporter.clone(), fault_metrics.clone());
            handle.spawn(async move { set_health(&r, &m, ServingStatus::NotServing).await });
        }),
    );
    let engine_thread = (loaded.start)(sched.clone(), metrics.clone())?;
    let ready_state = Ready {
        engine: loaded.engine,
        sched: sched.clone(),
        info: loaded.info,
        context: loaded.context,
        eos: loaded.eos,
    };
    let _ = ready.set(ready_state);
    phase.store(Phase::Serving as u8, Relaxed);
    set_health(&reporter, &metrics, ServingStatus::Serving).await;
    tracing::info!("serving");

    let sig = signals.recv().await;
    tracing::info!(signal = sig, in_flight = sched.in_flight(), drain_seconds = s.drain.as_secs(), "draining");
    phase.store(Phase::Draining as u8, Relaxed);
    set_health(&reporter, &metrics, ServingStatus::NotServing).await;
    sched.close();
    let deadline = Instant::now() + s.drain;
    while sched.in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if sched.in_flight() > 0 {
        tracing::warn!(in_flight = sched.in_flight(), "drain deadline passed: ending the remaining requests");
        sched.abort();
    }
    tokio::task::spawn_blocking(move || engine_thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("engine thread panicked"))?;
    let _ = stop_tx.send(());
    // Streams have all ended; give the server a moment to flush their last frames, never hang on a peer.
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    metrics_task.abort();
    tracing::info!("drained; exiting");
    Ok(())
}

/// SIGTERM and SIGINT as one stream of signal names.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

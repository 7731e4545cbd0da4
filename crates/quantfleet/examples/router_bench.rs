//! Router benchmark on loopback: what the router adds to a request's latency, and what shadowing costs the
//! primary path.
//!
//! Part 1, overhead: a SYNTHETIC node in this process (real gRPC and health service, answers at once with
//! fixed tokens) behind a real router process. Requests straight to it and through the router, interleaved,
//! give the router's own cost without the model's compute noise (milliseconds per request here, more than
//! the quantity being measured).
//!
//! Part 2, the real model: it starts the local fleet with `quantfleet up --tiers fp8,int4-awq` (the sample policy routes code to fp8
//! and shadows 10% of code to the int4-awq candidate), then a second router over the same two nodes with the
//! canary off, and sends the same greedy code request, one at a time, in interleaved rounds:
//!
//! - `direct`:    straight to the fp8 node over gRPC, with the router's own node client (a second `direct`
//!   series measured the same way gives the noise floor of the comparison);
//! - `router`:    through the router with shadowing off (OpenAI JSON over HTTP/1.1 keep-alive);
//! - `shadow10`:  through the `up` router, which mirrors 10% of these requests to int4-awq.
//!
//! Router overhead = router minus direct, at p50 and p99; shadow impact = shadow10 / router - 1 (targets from
//! issue 6: p50 overhead < 1 ms, shadow impact < 2%). Each node is pinned to its own core (`taskset`) so the
//! candidate's work does not steal the primary's CPU, as separate GPUs would not; `--no-pin` measures the
//! shared-CPU case too.
//!
//! cargo build --release -p quantfleet --bin quantfleet --example router_bench && \
//!   target/release/examples/router_bench --model "$(scripts/fetch-model.sh)"

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use futures::StreamExt as _;
use quantfleet_router::backend::{Endpoint, GenerateEvent, GenerateParams, Message, NodeClient, Prompt};
use quantfleet_router::grpc::GrpcClient;
use serde_json::{Value, json};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// The model file (GGUF).
    #[arg(long, env = "QUANTFLEET_SMOLLM2_GGUF")]
    model: PathBuf,
    /// The quantfleet binary (default: the one built beside this example).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Measured rounds (each sends one request of every series).
    #[arg(long, default_value_t = 300)]
    rounds: usize,
    /// Warm-up rounds, not measured.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 4)]
    max_tokens: u32,
    /// Do not pin the nodes to separate cores.
    #[arg(long)]
    no_pin: bool,
    /// Measured rounds against the instant node (part 1).
    #[arg(long, default_value_t = 2000)]
    instant_rounds: usize,
}

const PROMPT: &str = "Complete this function:\n```python\ndef add(a, b):\n```";

/// Kills (SIGINT, then waits) a child process when dropped.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-INT", &self.0.id().to_string()]).status();
        let _ = self.0.wait();
    }
}

/// Reads a child's output until a line contains `marker` (ending in `http://`); returns the `host:port` that
/// follows it, and keeps draining the output after it.
fn wait_for_address(out: impl std::io::Read + Send + 'static, marker: &str) -> Result<String> {
    let mut reader = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        ensure!(reader.read_line(&mut line)? > 0, "the process exited before printing {marker:?}");
        if let Some((_, rest)) = line.split_once(marker) {
            let addr = rest.split(['/', ' ']).next().context("no address")?.trim().to_owned();
            std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
            return Ok(addr);
        }
    }
}

/// A `quantfleet router` process over the sample policy with the given fp8 and int4-awq endpoints (the other
/// tiers empty), its configuration written to `run_dir/name.yaml`: the process and its `host:port`.
fn start_router(
    bin: &std::path::Path,
    model: &std::path::Path,
    run_dir: &std::path::Path,
    name: &str,
    fp8: &[String],
    int4_awq: &[String],
) -> Result<(Proc, String)> {
    let config = json!({
        "listen": "127.0.0.1:0",
        "policyFile": concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/samples/smollm2-135m.precisionpolicy.yaml"),
        "endpoints": {"bf16": [], "fp8-kv8": [], "fp8": fp8, "int4-awq": int4_awq},
        "tokenizer": model,
    });
    std::fs::create_dir_all(run_dir)?;
    let config_path = run_dir.join(format!("{name}.yaml"));
    std::fs::write(&config_path, serde_yaml::to_string(&config)?)?;
    let mut child = Command::new(bin).arg("router").arg("--config").arg(&config_path).stderr(Stdio::piped()).spawn()?;
    let stderr = child.stderr.take().context("no stderr")?;
    let router = Proc(child);
    let addr = wait_for_address(stderr, "router listening on http://")?;
    Ok((router, addr))
}

/// An HTTP/1.1 keep-alive connection for JSON POSTs.
struct Http {
    reader: BufReader<TcpStream>,
    addr: String,
}

impl Http {
    fn connect(addr: &str) -> Result<Http> {
        let s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        Ok(Http { reader: BufReader::new(s), addr: addr.to_owned() })
    }

    fn post(&mut self, path: &str, body: &str) -> Result<(u16, Value)> {
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        self.reader.get_mut().write_all(req.as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line.split(' ').nth(1).context("no HTTP status line")?.parse()?;
        let mut length = None;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = Some(v.trim().parse::<usize>()?);
                } else if k.eq_ignore_ascii_case("transfer-encoding") {
                    bail!("the router answered with {l}; this client reads content-length bodies only");
                }
            }
        }
        let mut body = vec![0; length.context("no content-length")?];
        self.reader.read_exact(&mut body)?;
        Ok((status, serde_json::from_slice(&body)?))
    }
}

/// A SYNTHETIC node for part 1: real gRPC (Generate, Score, ModelInfo, grpc.health.v1 SERVING), answering at
/// once with `max_tokens` fixed tokens, so a request's latency is transport and router only.
mod instant {
    use quantfleet_proto::v1::{self as pb, inference_server::Inference};
    use tonic::{Request, Response, Status};

    pub struct InstantNode;

    #[tonic::async_trait]
    impl Inference for InstantNode {
        type GenerateStream = futures::stream::Iter<std::vec::IntoIter<Result<pb::GenerateResponse, Status>>>;

        async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
            let n = req.into_inner().max_tokens.max(1);
            let tokens = (0..n)
                .map(|i| pb::GeneratedToken { id: 1000 + i, text: " x".into(), logprob: -0.5, top_logprobs: vec![] })
                .collect();
            let summary = pb::GenerateSummary {
                finish_reason: pb::FinishReason::Length as i32,
                prompt_tokens: 16,
                completion_tokens: n,
                ..Default::default()
            };
            let messages = vec![
                Ok(pb::GenerateResponse { tokens, text: " x".repeat(n as usize), summary: None }),
                Ok(pb::GenerateResponse { tokens: vec![], text: String::new(), summary: Some(summary) }),
            ];
            Ok(Response::new(futures::stream::iter(messages)))
        }

        async fn score(&self, _: Request<pb::ScoreRequest>) -> Result<Response<pb::ScoreResponse>, Status> {
            Err(Status::unimplemented("the instant node does not score"))
        }

        async fn model_info(
            &self,
            _: Request<pb::ModelInfoRequest>,
        ) -> Result<Response<pb::ModelInfoResponse>, Status> {
            Ok(Response::new(pb::ModelInfoResponse {
                model: "smollm2-135m".into(),
                tier: "fp8".into(),
                backend: "instant (synthetic)".into(),
                ..Default::default()
            }))
        }
    }
}

/// Part 1: the router's own overhead, against the instant node.
fn instant_overhead(bin: &std::path::Path, args: &Args, run_dir: &std::path::Path) -> Result<()> {
    use quantfleet_proto::v1::inference_server::InferenceServer;
    let server_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let listener = server_rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?.to_string();
    server_rt.spawn(async move {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_serving::<InferenceServer<instant::InstantNode>>().await;
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(InferenceServer::new(instant::InstantNode))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
    });
    let (router, router_addr) =
        start_router(bin, &args.model, run_dir, "router-instant", std::slice::from_ref(&addr), &[])?;
    // The router marks endpoints healthy on its first health round.
    std::thread::sleep(Duration::from_millis(1500));

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let client = GrpcClient::new(Duration::from_secs(2), Duration::from_secs(60));
    let endpoint = Endpoint(addr);
    let params = generate_params(args.max_tokens);
    let body = chat_body(args.max_tokens);
    let mut http = Http::connect(&router_addr)?;
    let mut series = [Series::new("direct"), Series::new("direct (again)"), Series::new("router")];
    for round in 0..args.warmup * 10 + args.instant_rounds {
        for k in 0..series.len() {
            let s = (round + k) % series.len();
            let (ms, tokens) = match s {
                0 | 1 => direct(&runtime, &client, &endpoint, &params)?,
                _ => routed(&mut http, &body)?,
            };
            ensure!(tokens == args.max_tokens, "{}: {tokens} tokens, expected {}", series[s].name, args.max_tokens);
            if round >= args.warmup * 10 {
                series[s].ms.push(ms);
            }
        }
    }
    println!(
        "part 1: router overhead against an instant node (SYNTHETIC, in-process gRPC), {} tokens, {} rounds, \
         sequential, loopback",
        args.max_tokens, args.instant_rounds
    );
    print_series(&series);
    let [d, d2, r] = &series;
    print_overhead(d, d2, r);
    println!();
    drop(router);
    server_rt.shutdown_background();
    Ok(())
}

fn generate_params(max_tokens: u32) -> GenerateParams {
    GenerateParams {
        prompt: Prompt::Chat(vec![Message { role: "user".into(), content: PROMPT.into() }]),
        max_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: None,
        stop: vec![],
        logprobs: false,
        top_logprobs: 0,
        request_id: String::new(),
    }
}

fn chat_body(max_tokens: u32) -> String {
    json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens, "temperature": 0})
    .to_string()
}

/// One generation straight to the node with the router's own client: (milliseconds, tokens).
fn direct(
    runtime: &tokio::runtime::Runtime,
    client: &GrpcClient,
    endpoint: &Endpoint,
    params: &GenerateParams,
) -> Result<(f64, u32)> {
    let t0 = Instant::now();
    let tokens = runtime.block_on(async {
        let mut stream = client.generate(endpoint, params.clone()).await?;
        while let Some(ev) = stream.next().await {
            if let GenerateEvent::Done { completion_tokens, .. } = ev? {
                return Ok(completion_tokens);
            }
        }
        Err(quantfleet_router::backend::NodeError::Failed("stream ended without Done".into()))
    })?;
    Ok((t0.elapsed().as_secs_f64() * 1e3, tokens))
}

/// One chat completion through a router: (milliseconds, tokens).
fn routed(http: &mut Http, body: &str) -> Result<(f64, u32)> {
    let t0 = Instant::now();
    let (status, v) = http.post("/v1/chat/completions", body)?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    ensure!(status == 200, "router answered {status}: {v}");
    Ok((ms, v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as u32))
}

fn print_series(series: &[Series]) {
    println!("{:<16} {:>9} {:>9} {:>9}", "series", "p50 ms", "p99 ms", "mean ms");
    for s in series {
        let mean = s.ms.iter().sum::<f64>() / s.ms.len() as f64;
        println!("{:<16} {:>9.3} {:>9.3} {:>9.3}", s.name, s.p(0.5), s.p(0.99), mean);
    }
}

/// The noise floor (two direct series) and the router's overhead over direct, at p50 and p99.
fn print_overhead(direct: &Series, direct_again: &Series, router: &Series) {
    println!(
        "noise floor (direct again - direct): p50 {:+.3} ms, p99 {:+.3} ms",
        direct_again.p(0.5) - direct.p(0.5),
        direct_again.p(0.99) - direct.p(0.99)
    );
    println!(
        "router overhead (router - direct):   p50 {:+.3} ms, p99 {:+.3} ms   (target p50 < 1 ms)",
        router.p(0.5) - direct.p(0.5),
        router.p(0.99) - direct.p(0.99)
    );
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

struct Series {
    name: &'static str,
    ms: Vec<f64>,
}

impl Series {
    fn new(name: &'static str) -> Series {
        Series { name, ms: vec![] }
    }
    fn p(&self, q: f64) -> f64 {
        let mut v = self.ms.clone();
        v.sort_by(f64::total_cmp);
        percentile(&v, q)
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bin = match args.bin.clone() {
        Some(b) => b,
        None => std::env::current_exe()?.parent().and_then(|d| d.parent()).context("no parent dir")?.join("quantfleet"),
    };
    ensure!(bin.is_file(), "{} is missing: build it with cargo build --release -p quantfleet", bin.display());
    let run_dir = std::env::temp_dir().join(format!("quantfleet-router-bench-{}", std::process::id()));
    instant_overhead(&bin, &args, &run_dir)?;

    // The fleet: fp8 (primary for code) and int4-awq (its shadow candidate), with the shadowing router.
    eprintln!("starting quantfleet up --tiers fp8,int4-awq (loads and quantizes both tiers) ...");
    let mut child = Command::new(&bin)
        .args(["up", "--tiers", "fp8,int4-awq", "--listen", "127.0.0.1:0", "--canary", "shadowing", "--run-dir"])
        .arg(&run_dir)
        .arg("--model")
        .arg(&args.model)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("no stdout")?;
    let up = Proc(child);
    let shadow_addr = wait_for_address(stdout, "Quantfleet is up: http://")?;
    let fleet: Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("fleet.json"))?)?;
    let node = |tier: &str| -> Result<(u32, String)> {
        let n = fleet["nodes"].as_array().and_then(|ns| ns.iter().find(|n| n["tier"] == tier));
        let n = n.with_context(|| format!("fleet.json has no {tier} node"))?;
        Ok((n["pid"].as_u64().context("pid")? as u32, n["grpc"].as_str().context("grpc")?.to_owned()))
    };
    let (primary_pid, primary) = node("fp8")?;
    let (candidate_pid, candidate) = node("int4-awq")?;
    if !args.no_pin {
        for (pid, cpu) in [(primary_pid, "0"), (candidate_pid, "1")] {
            let ok = Command::new("taskset").args(["-a", "-cp", cpu, &pid.to_string()]).stdout(Stdio::null()).status();
            ensure!(ok.is_ok_and(|s| s.success()), "taskset failed (use --no-pin where it is missing)");
        }
    }

    // A second router over the same nodes with the canary off: the sample policy has no status there.
    let (plain, plain_addr) =
        start_router(&bin, &args.model, &run_dir, "router-no-shadow", std::slice::from_ref(&primary), &[candidate])?;

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let client = GrpcClient::new(Duration::from_secs(2), Duration::from_secs(60));
    let endpoint = Endpoint(primary);
    let params = generate_params(args.max_tokens);
    let body = chat_body(args.max_tokens);
    let mut via_plain = Http::connect(&plain_addr)?;
    let mut via_shadow = Http::connect(&shadow_addr)?;
    let mut series =
        [Series::new("direct"), Series::new("direct (again)"), Series::new("router"), Series::new("shadow10")];
    eprintln!("{} warm-up and {} measured rounds of {} requests ...", args.warmup, args.rounds, series.len());
    for round in 0..args.warmup + args.rounds {
        // Rotate the order so no series always follows another.
        for k in 0..series.len() {
            let s = (round + k) % series.len();
            let (ms, tokens) = match s {
                0 | 1 => direct(&runtime, &client, &endpoint, &params)?,
                2 => routed(&mut via_plain, &body)?,
                _ => routed(&mut via_shadow, &body)?,
            };
            ensure!(tokens == args.max_tokens, "{}: {tokens} tokens, expected {}", series[s].name, args.max_tokens);
            if round >= args.warmup {
                series[s].ms.push(ms);
            }
        }
    }

    // Let the last mirrors finish, then read the shadow router's counters.
    std::thread::sleep(Duration::from_secs(2));
    let metrics = {
        let mut s = TcpStream::connect(&shadow_addr)?;
        write!(s, "GET /metrics HTTP/1.1\r\nhost: {shadow_addr}\r\nconnection: close\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        text
    };
    let counter = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && l.contains("task_class=\"code\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .fold(0.0, |a, b| a + b)
    };
    let code_requests = counter("quantfleet_router_requests_total");

    println!(
        "part 2: SmolLM2-135M fp8 node, greedy code prompt, {} tokens, {} rounds, sequential, loopback{}",
        args.max_tokens,
        args.rounds,
        if args.no_pin { ", nodes unpinned" } else { ", fp8 node on cpu 0, int4-awq candidate on cpu 1" }
    );
    print_series(&series);
    let [d, d2, r, sh] = &series;
    print_overhead(d, d2, r);
    println!(
        "shadow impact (shadow10 / router):   p50 {:+.2}%, p99 {:+.2}%   (target < 2%)",
        (sh.p(0.5) / r.p(0.5) - 1.0) * 100.0,
        (sh.p(0.99) / r.p(0.99) - 1.0) * 100.0
    );
    println!(
        "shadow router: {} code requests, {} mirrored ({:.1}%), {} compared pairs, {} dropped",
        code_requests,
        counter("quantfleet_router_shadow_mirrored_total"),
        100.0 * counter("quantfleet_router_shadow_mirrored_total") / code_requests.max(1.0),
        counter("quantfleet_router_shadow_pairs_total"),
        counter("quantfleet_router_shadow_dropped_total"),
    );
    drop(plain);
    drop(up);
    let _ = std::fs::remove_dir_all(&run_dir);
    Ok(())
}

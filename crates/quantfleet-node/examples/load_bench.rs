//! Load benchmark of an inference node on loopback: streams greedy Generate requests at concurrency 1, 8 and 32
//! and prints requests/s, generated tokens/s, and p50/p99 of request latency and time to first token.
//!
//! Starts its own node (`--node-bin target/release/quantfleet --model FILE.gguf`, optionally several
//! `--tier NAME:FORMAT`), or measures a running one (`--addr http://127.0.0.1:50051`). Loopback only.
//!
//! cargo build --release -p quantfleet && cargo run --release -p quantfleet-node --example load_bench -- \
//!     --node-bin target/release/quantfleet --model "$(scripts/fetch-model.sh)"

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use quantfleet_proto::v1::{self as pb, inference_client::InferenceClient};
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// A running node (loopback). Without it, --node-bin and --model start one per tier.
    #[arg(long)]
    addr: Option<String>,
    #[arg(long)]
    node_bin: Option<PathBuf>,
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tiers to start nodes for, NAME:WEIGHT_FORMAT (e.g. fp8:fp8-e4m3).
    #[arg(long, default_values_t = ["int4:int4".to_string()])]
    tier: Vec<String>,
    /// Requests per concurrency level (at least the concurrency).
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32])]
    concurrency: Vec<usize>,
}

struct NodeProcess(Child);
impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let _ = self.0.wait();
    }
}

fn start_node(bin: &PathBuf, model: &PathBuf, tier: &str, format: &str) -> anyhow::Result<(NodeProcess, String)> {
    let ready = std::env::temp_dir().join(format!("qf-bench-{}-{tier}.json", std::process::id()));
    let _ = std::fs::remove_file(&ready);
    let child = Command::new(bin)
        .args(["node", "--model"])
        .arg(model)
        .args(["--tier", tier, "--weights", format, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"])
        .args(["--max-batch", "32", "--max-queue", "256", "--ready-file"])
        .arg(&ready)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    let node = NodeProcess(child);
    let t0 = Instant::now();
    while !ready.exists() {
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(60), "node did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ready)?)?;
    let _ = std::fs::remove_file(&ready);
    Ok((node, format!("http://{}", v["grpc"].as_str().unwrap_or_default())))
}

async fn connect_ready(addr: &str) -> anyhow::Result<Channel> {
    let t0 = Instant::now();
    loop {
        if let Ok(ch) = Channel::from_shared(addr.to_string())?.connect().await
            && InferenceClient::new(ch.clone()).model_info(pb::ModelInfoRequest {}).await.is_ok()
        {
            return Ok(ch);
        }
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(120), "node at {addr} not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const PROMPTS: [&str; 8] = [
    "Write a short poem about the sea.",
    "Explain what a hash map is.",
    "List three facts about Paris.",
    "What is 17 times 23?",
    "Describe a sunrise in the mountains.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Summarize the plot of a detective story.",
];

/// One request: (latency, time to first token, tokens).
async fn one(mut c: InferenceClient<Channel>, i: usize, max_tokens: u32) -> anyhow::Result<(Duration, Duration, u32)> {
    let req = pb::GenerateRequest {
        prompt: Some(pb::Prompt { kind: Some(pb::prompt::Kind::Text(PROMPTS[i % PROMPTS.len()].into())) }),
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut stream = c.generate(req).await?.into_inner();
    let (mut ttft, mut n) = (None, 0);
    while let Some(msg) = stream.message().await? {
        if !msg.tokens.is_empty() && ttft.is_none() {
            ttft = Some(t0.elapsed());
        }
        n += msg.tokens.len() as u32;
    }
    Ok((t0.elapsed(), ttft.unwrap_or_default(), n))
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e3
}

async fn bench(label: &str, ch: Channel, args: &Args) -> anyhow::Result<()> {
    let info = InferenceClient::new(ch.clone()).model_info(pb::ModelInfoRequest {}).await?.into_inner();
    println!(
        "tier {label}: backend {}, weights {} (tier applied: {}), KV capacity {} tokens",
        info.backend, info.weights_loaded, info.tier_applied, info.kv_capacity_tokens
    );
    // Warm-up.
    one(InferenceClient::new(ch.clone()), 0, 4).await?;
    println!(
        "{:>11} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "concurrency", "req/s", "tok/s", "p50 ms", "p99 ms", "ttft p50", "ttft p99"
    );
    for &conc in &args.concurrency {
        let total = args.requests.max(conc);
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let t0 = Instant::now();
        let workers: Vec<_> = (0..conc)
            .map(|_| {
                let (ch, next, max_tokens) = (ch.clone(), next.clone(), args.max_tokens);
                tokio::spawn(async move {
                    let mut out = vec![];
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= total {
                            return anyhow::Ok(out);
                        }
                        out.push(one(InferenceClient::new(ch.clone()), i, max_tokens).await?);
                    }
                })
            })
            .collect();
        let mut results = vec![];
        for w in workers {
            results.extend(w.await??);
        }
        let wall = t0.elapsed().as_secs_f64();
        let tokens: u32 = results.iter().map(|r| r.2).sum();
        let mut lat: Vec<Duration> = results.iter().map(|r| r.0).collect();
        let mut ttft: Vec<Duration> = results.iter().map(|r| r.1).collect();
        println!(
            "{conc:>11} {:>9.2} {:>10.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            results.len() as f64 / wall,
            tokens as f64 / wall,
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
            pct(&mut ttft, 0.5),
            pct(&mut ttft, 0.99)
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    if let Some(addr) = &args.addr {
        anyhow::ensure!(addr.contains("127.0.0.1") || addr.contains("localhost"), "--addr must be loopback");
        return rt.block_on(async { bench("(running node)", connect_ready(addr).await?, &args).await });
    }
    let (bin, model) = match (&args.node_bin, &args.model) {
        (Some(b), Some(m)) => (b.clone(), m.clone()),
        _ => anyhow::bail!("pass --addr, or --node-bin and --model"),
    };
    for t in &args.tier {
        let (name, format) = t.split_once(':').ok_or_else(|| anyhow::anyhow!("--tier {t:?}: expected NAME:FORMAT"))?;
        let (_node, addr) = start_node(&bin, &model, name, format)?;
        rt.block_on(async { bench(name, connect_ready(&addr).await?, &args).await })?;
    }
    Ok(())
}

//! The inference node as a real process on loopback with the real SmolLM2-135M model (QUANTFLEET_SMOLLM2_GGUF,
//! exported by scripts/test.sh): streaming generation, scoring against the engine, argument errors, admission
//! control, cancellation, deadlines, numerical-fault guard, health transitions, metrics, SIGTERM drain, and 64
//! concurrent greedy streams on a batch-invariant (W8A8) tier equal to sequential runs.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quantfleet_proto::v1::{self as pb, inference_client::InferenceClient};
use quantfleet_testsupport::ScratchDir;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

fn model_path() -> PathBuf {
    let path = std::env::var_os("QUANTFLEET_SMOLLM2_GGUF").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").expect("HOME");
        PathBuf::from(home).join(".cache/quantfleet/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(path.is_file(), "SmolLM2 GGUF not found at {}: run scripts/fetch-model.sh", path.display());
    path
}

struct Node {
    child: Child,
    grpc: String,
    metrics: String,
    _dir: ScratchDir,
}

impl Node {
    /// A bf16 node with `extra` flags.
    fn start(extra: &[&str]) -> Node {
        Node::start_tier(&["--tier", "bf16", "--weights", "bf16"], extra)
    }

    fn start_tier(tier: &[&str], extra: &[&str]) -> Node {
        Node::start_env(tier, extra, &[])
    }

    /// A node at `tier` with `extra` flags and `env` variables set for its process.
    fn start_env(tier: &[&str], extra: &[&str], env: &[(&str, &str)]) -> Node {
        let dir = ScratchDir::new("qf-node-test").unwrap();
        let ready = dir.path().join("ready.json");
        let model = model_path();
        let mut args: Vec<String> = ["node", "--model"].map(String::from).to_vec();
        args.push(model.display().to_string());
        args.extend(tier.iter().map(|s| s.to_string()));
        for a in ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"] {
            args.push(a.into());
        }
        args.extend(["--ready-file".into(), ready.display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(env!("CARGO_BIN_EXE_quantfleet"))
            .args(&args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut node = Node { child, grpc: String::new(), metrics: String::new(), _dir: dir };
        let t0 = Instant::now();
        while !ready.exists() {
            assert!(node.child.try_wait().unwrap().is_none(), "node exited before listening");
            assert!(t0.elapsed() < Duration::from_secs(60), "node did not listen within 60 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
        node.grpc = format!("http://{}", v["grpc"].as_str().unwrap());
        node.metrics = v["metrics"].as_str().unwrap().to_string();
        node
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(self.grpc.clone()).unwrap().connect().await.unwrap()
    }

    async fn health(&self, ch: &Channel) -> ServingStatus {
        let r = HealthClient::new(ch.clone())
            .check(HealthCheckRequest { service: "quantfleet.inference.v1.Inference".into() })
            .await
            .unwrap();
        r.into_inner().status()
    }

    /// Waits for SERVING, returning every distinct status seen on the way.
    async fn wait_serving(&self, ch: &Channel) -> Vec<ServingStatus> {
        let mut seen = vec![];
        let t0 = Instant::now();
        loop {
            let s = self.health(ch).await;
            if seen.last() != Some(&s) {
                seen.push(s);
            }
            if s == ServingStatus::Serving {
                return seen;
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "not serving after 120 s: {seen:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn scrape(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.metrics).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    }

    /// The value of the first sample whose line starts with `prefix` (name plus labels up to a point).
    fn metric(&self, name: &str, label_filter: &str) -> f64 {
        let text = self.scrape();
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(label_filter) && !l.starts_with('#'))
            .find(|l| l[name.len()..].starts_with('{'))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or_else(|| panic!("metric {name} {label_filter} missing"))
            .parse()
            .unwrap()
    }

    fn sigterm(&self) {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text_prompt(t: &str) -> Option<pb::Prompt> {
    Some(pb::Prompt { kind: Some(pb::prompt::Kind::Text(t.into())) })
}

fn greedy(prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest { prompt: text_prompt(prompt), max_tokens, ..Default::default() }
}

/// Runs a Generate stream to its end: (tokens, text, summary) or the error status.
async fn collect(
    client: &mut InferenceClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<(Vec<pb::GeneratedToken>, String, pb::GenerateSummary), tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let (mut tokens, mut text) = (vec![], String::new());
    while let Some(msg) = stream.message().await? {
        tokens.extend(msg.tokens);
        text.push_str(&msg.text);
        if let Some(s) = msg.summary {
            assert!(stream.message().await?.is_none(), "the summary is the last message");
            return Ok((tokens, text, s));
        }
    }
    panic!("stream ended without a summary");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn serves_generate_score_and_info_rejects_bad_arguments_and_drains_on_sigterm() {
    let node = Node::start(&["--max-batch", "8"]);
    rt().block_on(async {
        let ch = node.channel().await;
        let seen = node.wait_serving(&ch).await;
        // Loading reports NOT_SERVING (when the probe was quick enough to see it), never SERVING before ready.
        assert!(seen == [ServingStatus::NotServing, ServingStatus::Serving] || seen == [ServingStatus::Serving]);
        let mut client = InferenceClient::new(ch.clone());

        let info = client.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
        assert_eq!((info.tier.as_str(), info.vocab_size, info.kv_block_tokens), ("bf16", 49152, 16));
        assert!(info.tier_applied && info.weights_loaded.to_lowercase().contains("bf16"), "{}", info.weights_loaded);
        assert!(info.backend.starts_with("cpu-"), "{}", info.backend);
        assert_eq!(info.kv_capacity_tokens * info.kv_bytes_per_token, info.kv_cache_bytes);
        let tier: serde_json::Value = serde_json::from_str(&info.tier_spec_json).unwrap();
        assert_eq!(tier["weights"]["format"], "bf16");

        let gen_ok = r#"rpc="generate",outcome="ok""#;
        let (ok_before, tokens_before) = (
            node.metric("quantfleet_node_requests_total", gen_ok),
            node.metric("quantfleet_node_generated_tokens_total", ""),
        );

        // Streaming greedy generation with logprobs.
        let mut req = greedy("The capital of France is", 3);
        req.logprobs = true;
        req.top_logprobs = 3;
        let (tokens, text, summary) = collect(&mut client, req).await.unwrap();
        assert!(text.starts_with(" Paris"), "{text:?}");
        assert_eq!(summary.finish_reason(), pb::FinishReason::Length);
        assert_eq!((summary.completion_tokens, tokens.len()), (3, 3));
        assert!(summary.time_to_first_token_micros > 0 && summary.total_micros >= summary.time_to_first_token_micros);
        for t in &tokens {
            assert_eq!(t.top_logprobs[0].id, t.id, "greedy picks the most likely token");
            assert!(t.logprob < 0.0 && (t.top_logprobs[0].logprob - t.logprob).abs() < 1e-6);
        }

        // Score equals the engine's own teacher-forced log-probabilities for the same tokens.
        let spec: quantfleet_api::model::TierSpec = serde_json::from_str(&info.tier_spec_json).unwrap();
        let engine = quantfleet_engine::Engine::open_cpu_tier(&model_path(), None, &spec, &Default::default()).unwrap();
        let prompt_ids = engine.tokenizer.encode("The capital of France is").unwrap();
        let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        let mut kv = engine.new_kv_cache(16 << 20).unwrap();
        let expected = engine.score(&mut kv, &prompt_ids, &ids).unwrap();
        let scored = client
            .score(pb::ScoreRequest {
                prompt: Some(pb::Prompt {
                    kind: Some(pb::prompt::Kind::Tokens(pb::TokenIds { ids: prompt_ids.clone() })),
                }),
                continuation: Some(pb::Continuation {
                    kind: Some(pb::continuation::Kind::Tokens(pb::TokenIds { ids: ids.clone() })),
                }),
                top_logprobs: 2,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(scored.prompt_tokens as usize, prompt_ids.len());
        for ((s, e), t) in scored.tokens.iter().zip(&expected).zip(&tokens) {
            assert!((s.logprob - e).abs() < 1e-5, "scored {} vs engine {e}", s.logprob);
            assert!((s.logprob - t.logprob).abs() < 2e-3, "scored {} vs generated {}", s.logprob, t.logprob);
            assert_eq!(s.top_logprobs.len(), 2);
        }

        // Stop strings end the stream before the match.
        let mut req = greedy("1, 2, 3, 4,", 24);
        req.stop = vec![" 7".into()];
        let (_, text, summary) = collect(&mut client, req).await.unwrap();
        assert_eq!(summary.finish_reason(), pb::FinishReason::StopString, "{text:?}");
        assert_eq!((text.as_str(), summary.matched_stop.as_str()), (" 5, 6,", " 7"));

        // Invalid arguments name the field.
        let cases: Vec<(pb::GenerateRequest, &str)> = vec![
            (greedy("", 4), "prompt"),
            (pb::GenerateRequest { prompt: None, ..greedy("x", 4) }, "prompt"),
            (
                pb::GenerateRequest {
                    sampling: Some(pb::SamplingParams { temperature: -1.0, ..Default::default() }),
                    ..greedy("hello", 4)
                },
                "sampling.temperature",
            ),
            (greedy("hello", 100_000), "max_tokens"),
            (pb::GenerateRequest { tier: "fp8".into(), ..greedy("hello", 4) }, "tier"),
            (
                pb::GenerateRequest {
                    prompt: Some(pb::Prompt {
                        kind: Some(pb::prompt::Kind::Tokens(pb::TokenIds { ids: vec![1, 60_000] })),
                    }),
                    ..greedy("", 4)
                },
                "prompt.tokens",
            ),
        ];
        for (req, field) in cases {
            let err = collect(&mut client, req).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {err:?}");
            assert!(err.message().starts_with(field), "message {:?} should name {field}", err.message());
        }
        let bad_score = client
            .score(pb::ScoreRequest { prompt: text_prompt("hi"), continuation: None, ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(bad_score.code(), tonic::Code::InvalidArgument);
        assert!(bad_score.message().starts_with("continuation"), "{}", bad_score.message());

        // Metrics moved.
        assert_eq!(node.metric("quantfleet_node_requests_total", gen_ok), ok_before + 2.0);
        assert!(node.metric("quantfleet_node_generated_tokens_total", "") >= tokens_before + 4.0);
        assert!(node.metric("quantfleet_node_time_to_first_token_seconds_count", "") >= 2.0);
        assert_eq!(node.metric("quantfleet_node_requests_total", r#"rpc="generate",outcome="invalid_argument""#), 6.0);
        assert_eq!(node.metric("quantfleet_node_requests_total", r#"rpc="score",outcome="ok""#), 1.0);
        assert_eq!(node.metric("quantfleet_node_kv_blocks_used", ""), 0.0);
        assert!(node.scrape().contains(r#"tier="bf16""#));

        // SIGTERM drains: health flips to NOT_SERVING, new work is refused, the in-flight stream finishes.
        let mut long = greedy("Once upon a time", 160);
        long.ignore_eos = true;
        let mut stream = client.generate(long).await.unwrap().into_inner();
        assert!(!stream.message().await.unwrap().unwrap().tokens.is_empty());
        node.sigterm();
        let t0 = Instant::now();
        while node.health(&ch).await != ServingStatus::NotServing {
            assert!(t0.elapsed() < Duration::from_secs(5), "health still SERVING after SIGTERM");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let refused = collect(&mut client, greedy("hello", 2)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        let mut last = None;
        while let Some(msg) = stream.message().await.unwrap() {
            last = msg.summary.or(last);
        }
        let last = last.expect("drained stream ends with its summary");
        assert_eq!((last.finish_reason(), last.completion_tokens), (pb::FinishReason::Length, 160));
    });
    let mut node = node;
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = node.child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "node did not exit after draining");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn full_queue_cancellation_deadlines_and_numerical_faults() {
    let node = Node::start(&[
        "--max-batch",
        "1",
        "--max-queue",
        "1",
        "--fault-injection-marker",
        "POISON",
        "--fault-threshold",
        "2",
    ]);
    rt().block_on(async {
        let ch = node.channel().await;
        node.wait_serving(&ch).await;
        let mut client = InferenceClient::new(ch.clone());
        let long = |p: &str| pb::GenerateRequest { ignore_eos: true, ..greedy(p, 400) };

        // A runs, B waits in the one queue slot, C is refused with a retry hint.
        let mut a = client.generate(long("Once upon a time")).await.unwrap().into_inner();
        assert!(a.message().await.unwrap().is_some());
        let mut b = client.generate(long("In a galaxy far away")).await.unwrap().into_inner();
        let t0 = Instant::now();
        while node.metric("quantfleet_node_queue_depth", "") < 1.0 {
            assert!(t0.elapsed() < Duration::from_secs(5));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let c = collect(&mut client, greedy("hello", 2)).await.unwrap_err();
        assert_eq!(c.code(), tonic::Code::ResourceExhausted, "{c:?}");
        let retry: u64 = c.metadata().get("retry-after-ms").unwrap().to_str().unwrap().parse().unwrap();
        assert!(retry > 0);
        assert_eq!(
            node.metric("quantfleet_node_requests_total", r#"rpc="generate",outcome="resource_exhausted""#),
            1.0
        );

        // Cancelling A frees its slot and KV blocks: B starts streaming.
        drop(a);
        let first_b = tokio::time::timeout(Duration::from_secs(10), b.message()).await.expect("B admitted after A");
        assert!(!first_b.unwrap().unwrap().tokens.is_empty());
        drop(b);
        let t0 = Instant::now();
        while node.metric("quantfleet_node_kv_blocks_used", "") != 0.0
            || node.metric("quantfleet_node_running_sequences", "") != 0.0
        {
            assert!(t0.elapsed() < Duration::from_secs(5), "cancelled sequences still hold KV blocks");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(node.metric("quantfleet_node_requests_total", r#"rpc="generate",outcome="cancelled""#), 2.0);

        // A per-request timeout ends the stream with DEADLINE_EXCEEDED.
        let err = collect(&mut client, pb::GenerateRequest { timeout_ms: 150, ..long("The weather today") })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");

        // NaN logits fail the request with INTERNAL and are counted; the threshold flips health.
        for _ in 0..2 {
            let err = collect(&mut client, greedy("POISON please", 4)).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
            assert!(err.message().contains("numerical fault"), "{}", err.message());
        }
        assert_eq!(node.metric("quantfleet_node_numerical_faults_total", ""), 2.0);
        let t0 = Instant::now();
        while node.health(&ch).await != ServingStatus::NotServing {
            assert!(t0.elapsed() < Duration::from_secs(5), "health still SERVING after the fault threshold");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(node.metric("quantfleet_node_kv_blocks_used", ""), 0.0);
    });
}

/// 64 concurrent streams, batched up to 32 per step, must each produce exactly the tokens of their sequential
/// run: no stream sees another's KV blocks, sampler or output. Exact equality needs a batch-invariant tier, so
/// this runs W8A8: its integer products and the attention give every token the same bits whatever shares its
/// step, on every CPU level. The weight-only tiers' f32 and bf16 kernels do not (their accumulator split
/// follows the token count), so on them a near-tie can flip a greedy token under load; a bf16 node failed
/// this test that way on a CI machine without AVX-512 BF16.
#[test]
fn sixty_four_concurrent_greedy_streams_equal_sequential_runs() {
    let scratch = ScratchDir::new("qf-node-w8a8").unwrap();
    let spec = scratch.file("w8a8.yaml", "name: w8a8\nweights: {format: int8}\nactivations: int8\n").unwrap();
    let node = Node::start_tier(&["--tier-spec", spec.to_str().unwrap()], &["--max-batch", "32", "--max-queue", "64"]);
    rt().block_on(async {
        let ch = node.channel().await;
        node.wait_serving(&ch).await;
        let subjects = ["cats", "the sea", "Rust", "Paris", "a robot", "music", "winter", "math"];
        let starts = [
            "Tell me about",
            "Write one line on",
            "A fact about",
            "My favourite thing about",
            "Why",
            "Describe",
            "Once,",
            "Consider",
        ];
        let prompts: Vec<String> = (0..64).map(|i| format!("{} {}", starts[i / 8], subjects[i % 8])).collect();
        let req = |p: &str| pb::GenerateRequest { ignore_eos: true, ..greedy(p, 6) };
        let mut client = InferenceClient::new(ch.clone());
        let mut sequential = Vec::new();
        for p in &prompts {
            let (tokens, _, _) = collect(&mut client, req(p)).await.unwrap();
            sequential.push(tokens.iter().map(|t| t.id).collect::<Vec<_>>());
        }
        let tasks: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (mut c, r) = (InferenceClient::new(ch.clone()), req(p));
                tokio::spawn(async move { collect(&mut c, r).await })
            })
            .collect();
        for (i, (t, want)) in tasks.into_iter().zip(&sequential).enumerate() {
            let (tokens, _, summary) = t.await.unwrap().unwrap_or_else(|e| panic!("stream {i}: {e:?}"));
            let got: Vec<u32> = tokens.iter().map(|t| t.id).collect();
            assert_eq!(&got, want, "stream {i} ({:?}) differs from its sequential run", prompts[i]);
            assert_eq!(summary.completion_tokens, 6);
        }
        assert!(node.metric("quantfleet_node_engine_steps_total", "") > 0.0);
    });
}

/// An int4-awq node calibrates AWQ while it loads (seconds), so the loading phase is observable: health says
/// NOT_SERVING and RPCs answer UNAVAILABLE until the model is ready; a SIGTERM during the load exits at once
/// instead of waiting for the quantizer.
#[test]
fn loading_is_not_serving_and_sigterm_while_loading_exits_promptly() {
    let scratch = ScratchDir::new("qf-node-awq").unwrap();
    let spec = scratch
        .file(
            "int4-awq.yaml",
            "name: int4-awq\nweights: {format: int4, method: awq, groupSize: 128}\n\
             layerOverrides:\n  - {firstLayers: 1, lastLayers: 1, weights: {format: bf16}}\n\
             calibration: {dataset: builtin, samples: 64, sequenceLength: 512}\n",
        )
        .unwrap();
    let mut node = Node::start_tier(&["--tier-spec", spec.to_str().unwrap()], &[]);
    rt().block_on(async {
        let ch = node.channel().await;
        assert_eq!(node.health(&ch).await, ServingStatus::NotServing);
        let err = collect(&mut InferenceClient::new(ch.clone()), greedy("Hello", 2)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        let err = InferenceClient::new(ch.clone()).model_info(pb::ModelInfoRequest {}).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert_eq!(node.metric("quantfleet_node_serving", ""), 0.0);
        // Still loading after all that (AWQ calibration takes seconds): stop it now.
        assert_eq!(node.health(&ch).await, ServingStatus::NotServing);
    });
    node.sigterm();
    let t0 = Instant::now();
    let status = loop {
        if let Some(status) = node.child.try_wait().unwrap() {
            break status;
        }
        assert!(t0.elapsed() < Duration::from_secs(3), "the node did not exit within 3 s of SIGTERM while loading");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn configuration_errors_name_the_field_before_loading() {
    let scratch = ScratchDir::new("qf-node-cfg").unwrap();
    let dir = scratch.path();
    let cfg = dir.join("node.yaml");
    std::fs::write(
        &cfg,
        "modelName: m\nsource:\n  uri: s3://bucket/model.gguf\narchitecture: {numLayers: 30, hiddenSize: 576, \
         intermediateSize: 1536, numAttentionHeads: 9, numKeyValueHeads: 3, headDim: 64, vocabSize: 49152, \
         maxPositionEmbeddings: 8192}\ntier:\n  name: fp8\n  weights: {format: fp8-e4m3}\nserving: {}\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_quantfleet")).arg("node").args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("source.uri"), "{err}");
    let model = model_path();
    let (code, err) =
        run(&["--model", model.to_str().unwrap(), "--tier", "x", "--weights", "int4", "--max-batch", "0"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--max-batch"), "{err}");
    let (code, err) = run(&["--model", model.to_str().unwrap(), "--tier", "x", "--weights", "int3"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--weights") && err.contains("int3"), "{err}");

    // A tier calibrated on a ConfigMap never falls back to the built-in text: without the file, or with an
    // unreadable or empty one, the node stops before loading and names what to fix.
    let spec = dir.join("gptq.yaml");
    std::fs::write(
        &spec,
        "name: int8-gptq\nweights: {format: int8, method: gptq}\ncalibration: {dataset: configmap/chat-logs}\n",
    )
    .unwrap();
    let with_spec = |extra: &[&str]| {
        let mut args = vec!["--model", model.to_str().unwrap(), "--tier-spec", spec.to_str().unwrap()];
        args.extend_from_slice(extra);
        run(&args)
    };
    let (code, err) = with_spec(&[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("tier.calibration.dataset: configmap/chat-logs") && err.contains("--calibration-file"),
        "{err}"
    );
    let (code, err) = with_spec(&["--calibration-file", "/nonexistent/calibration.txt"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--calibration-file: cannot read calibration text /nonexistent/calibration.txt"), "{err}");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, " \n").unwrap();
    let (code, err) = with_spec(&["--calibration-file", empty.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("is empty"), "{err}");
}

/// The operator's config for a tier calibrated on a ConfigMap: the node quantizes with the mounted file (its
/// `samples` x `sequenceLength` windows, not the built-in text's) and says so in ModelInfo.
#[test]
fn a_gptq_tier_calibrates_on_the_file_the_config_names() {
    let scratch = ScratchDir::new("qf-node-calib").unwrap();
    let dir = scratch.path();
    let text = dir.join("calibration.txt");
    let paragraph = "User: How do I reverse a list in Python?\nAssistant: Use slicing, `items[::-1]`, which \
                     returns a new list, or `items.reverse()`, which reverses it in place and returns None.\n\
                     User: What is 17 * 23?\nAssistant: 17 * 23 = 391.\n";
    std::fs::write(&text, paragraph.repeat(8)).unwrap();
    let config = dir.join("node.yaml");
    std::fs::write(
        &config,
        format!(
            "modelName: smollm2-135m\nsource:\n  uri: file://{}\narchitecture: {{numLayers: 30, hiddenSize: 576, \
             intermediateSize: 1536, numAttentionHeads: 9, numKeyValueHeads: 3, headDim: 64, vocabSize: 49152, \
             tiedEmbeddings: true, maxPositionEmbeddings: 8192}}\ntier:\n  name: int8-gptq\n  weights: {{format: \
             int8, method: gptq}}\n  calibration: {{dataset: configmap/chat-logs, samples: 4, sequenceLength: 64}}\n\
             serving: {{maxContextTokens: 2048, maxConcurrency: 4}}\ncalibrationFile: {}\n",
            model_path().display(),
            text.display()
        ),
    )
    .unwrap();
    let node = Node::start_tier(&["--config", config.to_str().unwrap()], &[]);
    rt().block_on(async {
        let ch = node.channel().await;
        node.wait_serving(&ch).await;
        let mut client = InferenceClient::new(ch.clone());
        let info = client.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.tier, "int8-gptq");
        assert_eq!(info.calibration_source, text.display().to_string());
        assert_eq!(info.calibration_tokens, 4 * 64, "four windows of 64 tokens of the file");
        let out = collect(&mut client, greedy("The capital of France is", 4)).await.unwrap();
        assert!(!out.0.is_empty(), "generated nothing");
    });
}

/// `--backend`: this machine has no NVIDIA driver, so `auto` serves on the CPU (ModelInfo says so, and the log
/// gives the reason) and `cuda` is a start-up error before anything listens. With the `cuda` feature the
/// reason comes from the real driver probe (no libcuda); without it, from the build.
#[test]
fn backend_auto_falls_back_to_the_cpu_and_cuda_without_a_gpu_fails_at_start_up() {
    let scratch = ScratchDir::new("qf-node-backend").unwrap();
    let model = model_path();
    let (ready, log) = (scratch.path().join("ready.json"), scratch.path().join("node.log"));
    let args = |backend: &str| {
        let mut a: Vec<String> = ["node", "--backend", backend, "--model"].map(String::from).to_vec();
        a.push(model.display().to_string());
        for x in ["--tier", "bf16", "--weights", "bf16", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"] {
            a.push(x.into());
        }
        a.extend(["--ready-file".into(), ready.display().to_string()]);
        a
    };
    let no_gpu = if cfg!(feature = "cuda") { "no CUDA driver" } else { "the `cuda` cargo feature is off" };

    let out = Command::new(env!("CARGO_BIN_EXE_quantfleet")).args(args("cuda")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--backend cuda") && err.contains(no_gpu), "{err}");
    assert!(!ready.exists(), "the node must fail before listening");

    let mut child = Command::new(env!("CARGO_BIN_EXE_quantfleet"))
        .args(args("auto"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !ready.exists() {
        assert!(child.try_wait().unwrap().is_none(), "node exited: {}", std::fs::read_to_string(&log).unwrap());
        assert!(t0.elapsed() < Duration::from_secs(60), "node did not listen within 60 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    let node =
        Node { child, grpc: format!("http://{}", v["grpc"].as_str().unwrap()), metrics: String::new(), _dir: scratch };
    rt().block_on(async {
        let ch = node.channel().await;
        node.wait_serving(&ch).await;
        let info = InferenceClient::new(ch).model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
        assert!(info.backend.starts_with("cpu-"), "{}", info.backend);
    });
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text.lines().find(|l| l.contains("serving on the CPU backend")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains(no_gpu), "{line}");
    drop(node);
}

/// QUANTFLEET_CPU_ISA caps the kernels' instruction set (an AVX2-only machine, reproduced on this one): the
/// node serves on the capped level and says so in ModelInfo; a value it does not know stops it at start-up.
#[test]
fn the_cpu_isa_cap_is_served_and_a_bad_one_refused() {
    let model = model_path();
    let out = Command::new(env!("CARGO_BIN_EXE_quantfleet"))
        .args(["node", "--model", model.to_str().unwrap(), "--tier", "bf16", "--weights", "bf16"])
        .env("QUANTFLEET_CPU_ISA", "avx3")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(r#"QUANTFLEET_CPU_ISA: QUANTFLEET_CPU_ISA="avx3" is not one of avx512, avx2, portable"#),
        "{err}"
    );

    let node = Node::start_env(&["--tier", "int8", "--weights", "int8"], &[], &[("QUANTFLEET_CPU_ISA", "avx2")]);
    rt().block_on(async {
        let ch = node.channel().await;
        node.wait_serving(&ch).await;
        let mut client = InferenceClient::new(ch);
        let info = client.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.backend, "cpu-avx2fma");
        let (tokens, text, _) = collect(&mut client, greedy("The capital of France is", 4)).await.unwrap();
        assert_eq!(tokens.len(), 4);
        assert!(text.contains("Paris"), "{text:?}");
    });
}

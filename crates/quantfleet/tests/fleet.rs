//! The local fleet end to end, with real processes and the real model (SmolLM2-135M, QUANTFLEET_SMOLLM2_GGUF):
//! `quantfleet up` starts a `quantfleet node` per sample tier and the router with the sample policy (its
//! code canary shadowing 10% to int4-awq). One test drives the scenarios in order, because the nodes take a
//! while to load: each class lands on its tier; mirrors happen at exactly the configured share, do not
//! change responses, and show up in /v1/canary/stats and /metrics; bad input gets OpenAI-style 4xx errors;
//! the official `openai` Python client streams (QUANTFLEET_OPENAI_PYTHON, a venv made by scripts/test.sh);
//! killing a tier's node makes its classes fall back; SIGINT stops the router and every node.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn env_path(var: &str, how: &str) -> PathBuf {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| panic!("{var} is not set: {how}"));
    assert!(p.exists(), "{var}={} does not exist: {how}", p.display());
    p
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).unwrap_or("")
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// A minimal HTTP/1.1 client (Connection: close; de-chunks the body).
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(": ").map(|(k, v)| (k.to_owned(), v.to_owned()))).collect();
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v == "chunked");
    let body = if chunked {
        let mut out = String::new();
        let mut rest = rest;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        rest.to_owned()
    };
    Reply { status, headers, body }
}

fn chat(addr: &str, content: &str, extra: Value, headers: &[(&str, &str)]) -> Reply {
    let mut body = json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    http(addr, "POST", "/v1/chat/completions", headers, &body.to_string())
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
        .unwrap_or(0.0)
}

/// `quantfleet up` as a child that is interrupted (SIGINT, then waited for) if the test fails midway, so a
/// failed run leaves no fleet behind.
struct Up(std::process::Child);
impl Drop for Up {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = Command::new("kill").args(["-INT", &self.0.id().to_string()]).status();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn local_fleet_end_to_end() {
    let model = env_path("QUANTFLEET_SMOLLM2_GGUF", "run scripts/fetch-model.sh (scripts/test.sh exports it)");
    let python = env_path("QUANTFLEET_OPENAI_PYTHON", "scripts/test.sh installs it and exports the variable");
    let run_dir = std::env::temp_dir().join(format!("quantfleet-fleet-test-{}", std::process::id()));
    let up_log = run_dir.with_extension("log");
    let mut up = Up(Command::new(env!("CARGO_BIN_EXE_quantfleet"))
        .args(["up", "--listen", "127.0.0.1:0", "--run-dir"])
        .arg(&run_dir)
        .arg("--model")
        .arg(&model)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&up_log).unwrap())
        .spawn()
        .unwrap());
    // `up` prints its URL once every node serves.
    let mut stdout = BufReader::new(up.0.stdout.take().unwrap());
    let started = Instant::now();
    let mut line = String::new();
    let url = loop {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "quantfleet up exited before it was up (its log: {}, the nodes' in {})",
            up_log.display(),
            run_dir.display()
        );
        if let Some(rest) = line.trim().strip_prefix("Quantfleet is up: http://") {
            break rest.split_whitespace().next().unwrap().trim_end_matches("/v1").to_owned();
        }
    };
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    eprintln!("fleet up in {:.1} s at {url}", started.elapsed().as_secs_f64());
    let addr = url.as_str();
    let fleet: Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("fleet.json")).unwrap()).unwrap();

    // 1. Every class lands on its tier, and the response says why.
    let tools = json!({"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]});
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(240);
    let cases = [
        ("Tell me about Paris.", json!({}), "chat", "int4-awq", "default"),
        ("Fix this:\n```python\nprint(1 +)\n```", json!({}), "code", "fp8", "rule[1]:code-markers"),
        ("What is 12 * 7?", json!({}), "math", "bf16", "rule[2]:math-markers"),
        ("What is the weather in Paris?", tools, "agent", "fp8", "rule[0]:tools-or-json-schema"),
        (long.as_str(), json!({"max_tokens": 1}), "long-context", "fp8-kv8", "rule[3]:prompt-tokens-over"),
    ];
    for (content, extra, class, tier, by) in cases {
        let r = chat(addr, content, extra, &[]);
        assert_eq!(r.status, 200, "{class}: {}", r.body);
        assert_eq!(
            (
                r.header("x-quantfleet-task-class"),
                r.header("x-quantfleet-tier"),
                r.header("x-quantfleet-classified-by")
            ),
            (class, tier, by)
        );
        assert!(!r.json()["choices"][0]["message"]["content"].as_str().unwrap().is_empty() || class == "long-context");
    }
    let r = chat(addr, "Tell me about Paris.", json!({}), &[("x-quantfleet-task-class", "math")]);
    assert_eq!((r.header("x-quantfleet-tier"), r.header("x-quantfleet-classified-by")), ("bf16", "header"));
    let r = chat(addr, "Tell me about Paris.", json!({}), &[("x-quantfleet-tier", "fp8")]);
    assert_eq!((r.header("x-quantfleet-tier"), r.header("x-quantfleet-route")), ("fp8", "forced"));

    // 2. Shadowing: exactly one code request in ten is mirrored, and mirrored responses equal the others.
    let code = "Complete this function:\n```python\ndef add(a, b):\n```";
    let mut texts = Vec::new();
    let mut mirrored = 0;
    for _ in 0..9 {
        let r = chat(addr, code, json!({}), &[]);
        assert_eq!(r.header("x-quantfleet-tier"), "fp8");
        mirrored += usize::from(r.header("x-quantfleet-shadow") == "true");
        texts.push(r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_owned());
    }
    assert_eq!(mirrored, 1, "10 code requests so far (one in part 1): one mirror");
    assert!(texts.windows(2).all(|w| w[0] == w[1]), "greedy responses are identical, mirrored or not: {texts:?}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let stats = loop {
        let stats = http(addr, "GET", "/v1/canary/stats", &[], "").json();
        if stats["policies"][0]["classes"][0]["samples"] == 1 {
            break stats;
        }
        assert!(Instant::now() < deadline, "no shadow pair after 120 s: {stats}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let p = &stats["policies"][0];
    assert_eq!((p["policy"].as_str(), p["candidateTier"].as_str()), (Some("smollm2-135m"), Some("int4-awq")));
    let c = &p["classes"][0];
    assert_eq!((c["taskClass"].as_str(), c["dropped"].as_i64()), (Some("code"), Some(0)));
    let (kl, top1, latency) = (
        c["klDivergenceSum"].as_f64().unwrap(),
        c["top1AgreementSum"].as_f64().unwrap(),
        c["latencyRatioSum"].as_f64().unwrap(),
    );
    assert!(kl >= 0.0 && (0.0..=1.0).contains(&top1) && latency > 0.0, "{c}");
    eprintln!(
        "shadow pair int4-awq vs fp8 (code): KL {kl:.4} nats, top-1 agreement {top1:.2}, log ppl ratio {}, latency ratio {latency:.2}",
        c["logPerplexityRatioSum"]
    );

    // 3. Metrics agree with the scripted sequence.
    let m = http(addr, "GET", "/metrics", &[], "").body;
    assert_eq!(
        metric(&m, "quantfleet_router_requests_total{api=\"chat\",task_class=\"code\",tier=\"fp8\",outcome=\"ok\"}"),
        10.0
    );
    assert_eq!(
        metric(&m, "quantfleet_router_requests_total{api=\"chat\",task_class=\"math\",tier=\"bf16\",outcome=\"ok\"}"),
        2.0
    );
    assert_eq!(
        metric(&m, "quantfleet_router_classifications_total{task_class=\"code\",decided_by=\"code-markers\"}"),
        10.0
    );
    assert_eq!(metric(&m, "quantfleet_router_classifications_total{task_class=\"math\",decided_by=\"header\"}"), 1.0);
    assert_eq!(metric(&m, "quantfleet_router_shadow_mirrored_total{task_class=\"code\",candidate=\"int4-awq\"}"), 1.0);
    assert_eq!(metric(&m, "quantfleet_router_shadow_pairs_total{task_class=\"code\",candidate=\"int4-awq\"}"), 1.0);
    assert_eq!(
        metric(
            &m,
            "quantfleet_router_canary_sum{policy=\"smollm2-135m\",task_class=\"code\",candidate=\"int4-awq\",quantity=\"samples\"}"
        ),
        1.0
    );
    assert_eq!(metric(&m, "quantfleet_router_routed_total{task_class=\"chat\",tier=\"fp8\",via=\"forced\"}"), 1.0);

    // The chart's Grafana dashboard plots router and node metrics by name: every one it names is exported.
    let ready: Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("node-fp8.ready.json")).unwrap()).unwrap();
    let node_metrics = http(ready["metrics"].as_str().unwrap(), "GET", "/metrics", &[], "").body;
    let dashboard =
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../charts/quantfleet/dashboards/quantfleet.json"));
    let names: std::collections::BTreeSet<&str> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("quantfleet_router_") || w.starts_with("quantfleet_node_"))
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("quantfleet_node_"))
            && names.iter().any(|n| n.starts_with("quantfleet_router_")),
        "{names:?}"
    );
    for name in names {
        let exported = if name.starts_with("quantfleet_node_") { &node_metrics } else { &m };
        assert!(exported.contains(name), "the dashboard plots {name}, which is not exported");
    }

    // 4. Bad input: OpenAI-style 4xx errors.
    let bad = [
        (http(addr, "POST", "/v1/chat/completions", &[], "{\"model\": "), 400, "invalid_json"),
        (chat(addr, "hi", json!({"model": "gpt-4"}), &[]), 404, "model_not_found"),
        (chat(addr, &"word ".repeat(9000), json!({}), &[]), 400, "context_length_exceeded"),
        (chat(addr, "hi", json!({"temperature": 5}), &[]), 400, ""),
        (chat(addr, "hi", json!({"max_tokens": 0}), &[]), 400, ""),
        (chat(addr, "hi", json!({"n": 3}), &[]), 400, "unsupported_parameter"),
    ];
    for (r, status, code) in bad {
        assert_eq!(r.status, status, "{}", r.body);
        let e = &r.json()["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()) && e["type"].is_string(), "{}", r.body);
        if !code.is_empty() {
            assert_eq!(e["code"], code, "{}", r.body);
        }
    }

    // 5. The official OpenAI client streams through the router.
    let out = Command::new(&python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py"))
        .arg(format!("http://{addr}/v1"))
        .arg("smollm2-135m")
        .output()
        .unwrap();
    assert!(out.status.success(), "openai client failed: {}", String::from_utf8_lossy(&out.stderr));
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(seen["stream_chunks"].as_u64().unwrap() >= 2, "{seen}");
    assert_eq!(seen["stream_roles"], json!(["assistant"]));
    assert_eq!(seen["stream_text"], seen["whole_text"], "{seen}");
    assert_eq!(seen["stream_usage_completion_tokens"], 8);
    assert!(seen["completion_text"].as_str().is_some_and(|t| !t.is_empty()), "{seen}");
    assert_eq!((seen["unknown_model"].as_u64(), seen["bad_temperature"].as_u64()), (Some(404), Some(400)));

    // 6. Kill the fp8 node: code falls back to bf16 (its route's first fallback).
    let fp8_pid =
        fleet["nodes"].as_array().unwrap().iter().find(|n| n["tier"] == "fp8").unwrap()["pid"].as_i64().unwrap();
    assert!(Command::new("kill").args(["-KILL", &fp8_pid.to_string()]).status().unwrap().success());
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        let r = chat(addr, code, json!({}), &[]);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!((r.header("x-quantfleet-tier"), r.header("x-quantfleet-route")), ("bf16", "fallback"));
    }

    // 7. SIGINT stops the router and every remaining node.
    assert!(Command::new("kill").args(["-INT", &up.0.id().to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while up.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "quantfleet up did not exit within 30 s of SIGINT");
        std::thread::sleep(Duration::from_millis(100));
    }
    for n in fleet["nodes"].as_array().unwrap() {
        let pid = n["pid"].as_i64().unwrap().to_string();
        let alive = Command::new("kill").args(["-0", &pid]).stderr(Stdio::null()).status().unwrap().success();
        assert!(!alive, "node {} (pid {pid}) outlived quantfleet up", n["tier"]);
    }
    assert!(TcpStream::connect(addr).is_err(), "the router still listens");
    let _ = std::fs::remove_dir_all(&run_dir);
    let _ = std::fs::remove_file(&up_log);
}

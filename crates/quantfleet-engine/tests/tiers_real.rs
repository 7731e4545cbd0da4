//! Precision tiers on the real SmolLM2-135M: each tier loaded from a `TierSpec` (the API type), compared with
//! the fp32 reference (the file's Q4_1/Q8_0 weights dequantized in f32) on short prompts by teacher-forced
//! logits, and its per-layer overrides and weight bytes checked against the fit planner.

mod common;

use std::sync::OnceLock;

use quantfleet_api::model::TierSpec;
use quantfleet_api::plan::{TensorSite, matrix_bytes, weight_spec_for};
use quantfleet_api::vocab::QuantMethod;
use quantfleet_engine::cpu::CpuBackend;
use quantfleet_engine::model::Logits;
use quantfleet_engine::quality::Divergence;
use quantfleet_engine::sampler::SamplingParams;
use quantfleet_engine::tier::{LoadOptions, architecture};
use quantfleet_engine::{Engine, EngineError, GenerateRequest};

const PROMPTS: [&str; 3] = [
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Germany is",
    "<|im_start|>user\nWrite a Python function that returns the square of a number.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
];

fn tier(json: &str) -> TierSpec {
    serde_json::from_str(json).expect("tier spec JSON")
}

fn reference() -> &'static Engine<CpuBackend> {
    static E: OnceLock<Engine<CpuBackend>> = OnceLock::new();
    E.get_or_init(|| Engine::open_cpu(&common::smollm2_path(), Some(common::SMOLLM2_SHA256)).unwrap())
}

fn logits_all(e: &Engine<CpuBackend>, tokens: &[u32]) -> Vec<f32> {
    let mut kv = e.new_kv_cache(16 << 20).unwrap();
    let mut seq = Default::default();
    let mut ws = e.model.new_workspace();
    let mut out = Vec::new();
    e.model.forward(&mut ws, &mut kv, &mut seq, tokens, Logits::All, &mut out).unwrap();
    kv.release(&mut seq);
    out
}

/// Divergence of `e` from the reference over every position of the test prompts.
fn divergence(e: &Engine<CpuBackend>) -> Divergence {
    let r = reference();
    let mut total = Divergence::default();
    for p in PROMPTS {
        let ids = r.tokenizer.encode(p).unwrap();
        let d = Divergence::measure(&logits_all(r, &ids), &logits_all(e, &ids), r.model.config.vocab);
        total.add(&d);
    }
    total
}

fn greedy_text(e: &Engine<CpuBackend>, prompt: &str, n: usize) -> String {
    let mut kv = e.new_kv_cache(16 << 20).unwrap();
    let ids = e.tokenizer.encode(prompt).unwrap();
    let req =
        GenerateRequest { max_tokens: n, sampling: SamplingParams::default(), stop_tokens: vec![], top_logprobs: 0 };
    let out = e.generate(&mut kv, &ids, &req).unwrap();
    e.tokenizer.decode(&out.tokens.iter().map(|t| t.id).collect::<Vec<_>>(), false).unwrap()
}

fn open(t: &TierSpec, opts: &LoadOptions) -> Engine<CpuBackend> {
    Engine::open_cpu_tier(&common::smollm2_path(), None, t, opts).unwrap()
}

/// Bytes the planner counts for every matrix of the tier, plus the AWQ/SmoothQuant input scales the engine
/// keeps (4 bytes per input feature of each such matrix), which the planner does not count.
fn planned_matrix_bytes(e: &Engine<CpuBackend>, t: &TierSpec) -> u64 {
    let arch = architecture(&e.model);
    let c = &e.model.config;
    let (d, f, kv) = (c.d_model as u64, c.d_ff as u64, (c.n_kv_heads * c.head_dim) as u64);
    let shapes = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)];
    let mut total = matrix_bytes(c.vocab as u64, d, weight_spec_for(&arch, t, TensorSite::Embedding));
    for l in 0..c.n_layers as u32 {
        let spec = weight_spec_for(&arch, t, TensorSite::Layer(l));
        for (rows, cols) in shapes {
            total += matrix_bytes(rows, cols, spec);
            if matches!(spec.method, QuantMethod::Awq | QuantMethod::SmoothQuant) {
                total += 4 * cols;
            }
        }
    }
    total
}

#[test]
fn bf16_fp8_and_int8_tiers_track_the_fp32_reference() {
    let cases = [
        // Bounds: what these tiers measure on these prompts (bf16 6e-5, fp8 0.032 / 83% top-1, int8 0.005 / 97%)
        // with margin. FP8 per-channel misses the issue's 0.01 target on this model (see README).
        (r#"{"name":"bf16","weights":{"format":"bf16"}}"#, 0.001, 0.98),
        (r#"{"name":"fp8","weights":{"format":"fp8-e4m3","scaling":"per-channel"}}"#, 0.05, 0.75),
        (r#"{"name":"int8","weights":{"format":"int8"}}"#, 0.01, 0.93),
    ];
    for (json, max_kld, min_top1) in cases {
        let t = tier(json);
        let e = open(&t, &LoadOptions::default());
        let d = divergence(&e);
        println!(
            "tier {}: mean KLD {:.5}, top-1 {:.3} over {} positions, first divergence {:?}",
            t.name,
            d.mean_kl(),
            d.top1(),
            d.positions,
            d.first_divergent
        );
        assert!(d.mean_kl() < max_kld && d.top1() >= min_top1, "tier {}: {d:?}", t.name);
        let report = e.tier.as_ref().unwrap();
        assert_eq!(report.weight_bytes, planned_matrix_bytes(&e, &t), "tier {}: stored vs planned bytes", t.name);
        assert!(greedy_text(&e, "The capital of France is", 2).starts_with(" Paris"), "tier {}", t.name);
    }
}

/// The sample int4-awq tier's layout (deploy/samples): INT4 g128 with the first and last layers and the tied
/// embeddings at bf16, loaded with RTN here (AWQ's search over all 28 layers is what `quantfleet eval` runs);
/// the override resolution and stored bytes are the planner's.
#[test]
fn int4_sample_tier_keeps_overridden_layers_high_and_matches_the_planner() {
    let t = tier(
        r#"{"name":"int4","weights":{"format":"int4","groupSize":128},
            "layerOverrides":[{"firstLayers":1,"lastLayers":1,"weights":{"format":"bf16"}},
                              {"embeddings":true,"lmHead":true,"weights":{"format":"bf16"}}]}"#,
    );
    let e = open(&t, &LoadOptions::default());
    let report = e.tier.as_ref().unwrap();
    let format = |name: &str| report.formats.iter().find(|(n, _)| n == name).map(|(_, f)| f.as_str()).unwrap();
    assert_eq!(format("token_embd"), "bf16");
    assert_eq!(format("blk.0.attn_q"), "bf16");
    assert_eq!(format("blk.29.ffn_down"), "bf16");
    assert_eq!(format("blk.1.attn_q"), "int4-g128-asym");
    assert_eq!(format("blk.28.ffn_down"), "int4-g128-asym");
    assert_eq!(report.calibration_tokens, 0, "RTN needs no calibration");
    assert_eq!(report.weight_bytes, planned_matrix_bytes(&e, &t));
    let d = divergence(&e);
    println!("tier int4 g128 RTN (on the Q4_1 grid: optimistic): mean KLD {:.4}, top-1 {:.3}", d.mean_kl(), d.top1());
    // Measured 0.34 / 71%: g128 is much coarser than the file's own g32 grid.
    assert!(d.mean_kl() < 0.5 && d.top1() > 0.6, "{d:?}");
    assert!(greedy_text(&e, "The capital of France is", 2).starts_with(" Paris"));
}

/// AWQ through an override on one layer (the rest bf16; AWQ's search costs about a minute per layer here):
/// the calibration pass runs, the layer's matrices are INT4 g128 with AWQ input scales, and the planner's
/// bytes plus those scales are what is stored.
#[test]
fn awq_override_on_selected_layers() {
    let t = tier(
        r#"{"name":"awq-some","weights":{"format":"bf16"},
            "layerOverrides":[{"layers":[5],"weights":{"format":"int4","method":"awq","groupSize":128}}]}"#,
    );
    let e = open(&t, &LoadOptions { calibration_tokens: 128, ..LoadOptions::default() });
    let report = e.tier.as_ref().unwrap();
    let formats: Vec<&str> = report.formats.iter().map(|(_, f)| f.as_str()).collect();
    assert_eq!(formats.iter().filter(|f| **f == "int4-g128-asym").count(), 7, "7 matrices of layer 5");
    assert_eq!(report.calibration_tokens, 128);
    assert_eq!(report.weight_bytes, planned_matrix_bytes(&e, &t));
    let d = divergence(&e);
    println!(
        "awq on layer 5: mean KLD {:.5}, top-1 {:.3}, load {:.1} s",
        d.mean_kl(),
        d.top1(),
        report.quantize_seconds
    );
    assert!(d.mean_kl() < 0.05 && d.top1() > 0.9, "{d:?}");
}

/// GPTQ through an override on two layers (the rest bf16): the calibration pass runs, the overridden layers
/// are INT4 g64 symmetric, and the model still answers. The top-1 bound is loose on purpose: over these 59
/// positions it moves by a few near-ties with the kernels' rounding (layer 17 is calibrated on layer 3's
/// INT4 outputs), measured 55, 53 and 56 of 59 at the portable, AVX2 and AVX-512 levels with mean KLD
/// 0.014-0.021; a broken GPTQ loses far more.
#[test]
fn gptq_override_on_selected_layers() {
    let t = tier(
        r#"{"name":"gptq-some","weights":{"format":"bf16"},
            "layerOverrides":[{"layers":[3,17],"weights":{"format":"int4","method":"gptq","groupSize":64,"symmetric":true}}]}"#,
    );
    let e = open(&t, &LoadOptions { calibration_tokens: 128, ..LoadOptions::default() });
    let report = e.tier.as_ref().unwrap();
    let formats: Vec<&str> = report.formats.iter().map(|(_, f)| f.as_str()).collect();
    assert_eq!(formats.iter().filter(|f| **f == "int4-g64-sym").count(), 14, "7 matrices x 2 layers");
    assert_eq!(report.calibration_tokens, 128);
    let d = divergence(&e);
    assert!(d.mean_kl() < 0.05 && d.top1() > 0.85, "{d:?}");
}

/// The first `n` tokens of Julius Caesar III.ii (the prose part of the bundled calibration text): a prompt
/// longer than a KIVI window, so most of its keys and values are int4 by the end.
fn long_prompt(e: &Engine<CpuBackend>, n: usize) -> Vec<u32> {
    let ids = e.tokenizer.encode(include_str!("../calibration/julius_caesar_iii_ii.txt")).unwrap();
    assert!(ids.len() >= n, "the oration has {} tokens", ids.len());
    ids[..n].to_vec()
}

/// Logits of the last `decode` tokens of `tokens` fed one at a time after a prefill of the rest: generation's
/// path, where every step reads the cache exactly as KIVI keeps it.
fn logits_decoded(e: &Engine<CpuBackend>, tokens: &[u32], decode: usize) -> Vec<f32> {
    let mut kv = e.new_kv_cache(16 << 20).unwrap();
    let mut seq = Default::default();
    let mut ws = e.model.new_workspace();
    let (mut out, mut step) = (Vec::new(), Vec::new());
    let split = tokens.len() - decode;
    e.model.forward(&mut ws, &mut kv, &mut seq, &tokens[..split], Logits::Last, &mut step).unwrap();
    for &t in &tokens[split..] {
        e.model.forward(&mut ws, &mut kv, &mut seq, &[t], Logits::Last, &mut step).unwrap();
        out.extend_from_slice(&step);
    }
    kv.release(&mut seq);
    out
}

/// KV cache dtypes on the real model: the tier's KV dtype is what `new_kv_cache` builds, its capacity grows
/// as the dtype shrinks, and an FP8 / INT8 / INT4-KIVI KV cache adds little divergence on top of the same
/// weights: on the short prompts, on a 320-token prompt (prefill, every position) and on 24 tokens decoded
/// one at a time after it. KIVI keeps sink 4 + at most 64 recent tokens in fp16, so at 320 tokens 8 of its 10
/// key groups are int4; the short prompts fit its window (fp16, as the base). Per-token int4 (one scale and
/// zero point per token and head) adds far more. Measured (added mean KLD: short / 320-token prompt /
/// decoded; the per-token dtypes Hadamard-rotated, `KvDtype::rotated`, unrotated in brackets): fp8 0.0056 /
/// 0.0291 / 0.0051 (0.0040 / 0.0131 / 0.0067), int8 0.00057 / 0.0014 / 0.00037 (0.0012 / 0.0042 / 0.0009),
/// per-token int4 0.069 / 0.179 / 0.056 (0.141 / 0.384 / 0.128), bf16 0.0002 / 0.0006 / 0.0002, KIVI 0.0 /
/// 0.0025 / 0.0047. The INT8 and INT4 bounds fail without the rotation. FP8 is the exception on this one
/// long prompt: over `quantfleet eval`'s 80 prompts the rotation lowers what it adds from 0.0047 to 0.0031
/// (README, "Quality per tier"), so its bounds only catch a broken cache. KIVI's bounds fail if keys are
/// quantized per token (32-channel groups, like the values) instead of per channel: that mutation measured
/// 0.0 / 0.0116 / 0.0097.
#[test]
fn kv_cache_dtypes_add_little_divergence() {
    use quantfleet_engine::kv_cache::KvDtype;
    let weights = r#""weights":{"format":"fp8-e4m3"}"#;
    let base = open(&tier(&format!(r#"{{"name":"fp8",{weights}}}"#)), &LoadOptions::default());
    assert_eq!(base.kv_dtype, KvDtype::F16, "the default KV cache is fp16");
    let f16_capacity = base.new_kv_cache(8 << 20).unwrap().capacity_tokens();
    let vocab = base.model.config.vocab;
    let long = long_prompt(&base, 320);
    let (base_long, base_decoded) = (logits_all(&base, &long), logits_decoded(&base, &long, 24));
    let kivi = KvDtype::Int4Kivi { sink_tokens: 4, residual_tokens: 64 };
    // (kvCache JSON, dtype, capacity vs fp16, max added KLD: short prompts, long prompt, decoded tail)
    // FP8 on the short prompts (59 positions) / the long one measured 0.0056 / 0.029 with the AVX-512 kernels
    // and 0.0064 / 0.033 with the AVX2 ones (QUANTFLEET_CPU_ISA=avx2): the E4M3 codes of keys near a rounding
    // boundary follow the weights' last bits, and so does a small sample's mean. `quantfleet eval` measures
    // the target on 2560 positions.
    let cases = [
        (r#"{"dtype":"fp8-e4m3"}"#, KvDtype::Fp8E4m3, 1.8, [0.01, 0.05, 0.01]),
        (r#"{"dtype":"int8"}"#, KvDtype::Int8, 1.8, [0.002, 0.003, 0.002]),
        (r#"{"dtype":"bf16"}"#, KvDtype::Bf16, 1.0, [0.001, 0.001, 0.001]),
        (r#"{"dtype":"int4","scheme":"kivi","sinkTokens":4,"residualTokens":64}"#, kivi, 2.5, [0.0005, 0.005, 0.008]),
        // One scale and zero point per 64 values of a token's rotated head: 16 levels are still too few for
        // these heads. Measured 0.069 / 0.179 / 0.056 (top-1 83% / 77% / 88%).
        (r#"{"dtype":"int4"}"#, KvDtype::Int4PerToken, 3.4, [0.12, 0.3, 0.1]),
    ];
    let mut measured = Vec::new();
    for (json, dtype, min_capacity, [max_short, max_long, max_decoded]) in cases {
        let e = open(&tier(&format!(r#"{{"name":"kv",{weights},"kvCache":{json}}}"#)), &LoadOptions::default());
        assert_eq!(e.kv_dtype, dtype);
        let capacity = e.new_kv_cache(8 << 20).unwrap().capacity_tokens();
        assert!(capacity as f64 >= f16_capacity as f64 * min_capacity, "{json}: {capacity} vs fp16 {f16_capacity}");
        let mut short = Divergence::default();
        for p in PROMPTS {
            let ids = e.tokenizer.encode(p).unwrap();
            short.add(&Divergence::measure(&logits_all(&base, &ids), &logits_all(&e, &ids), vocab));
        }
        let long_d = Divergence::measure(&base_long, &logits_all(&e, &long), vocab);
        let decoded = Divergence::measure(&base_decoded, &logits_decoded(&e, &long, 24), vocab);
        println!(
            "KV {} on fp8 weights, added mean KLD / top-1: short prompts {:.5} / {:.3}, 320-token prompt {:.5} / \
             {:.3}, 24 decoded after it {:.5} / {:.3}",
            dtype.name(),
            short.mean_kl(),
            short.top1(),
            long_d.mean_kl(),
            long_d.top1(),
            decoded.mean_kl(),
            decoded.top1()
        );
        assert!(short.mean_kl() < max_short, "KV {json} short prompts: {short:?}");
        assert!(long_d.mean_kl() < max_long, "KV {json} long prompt: {long_d:?}");
        assert!(decoded.mean_kl() < max_decoded, "KV {json} decoded: {decoded:?}");
        measured.push((dtype, long_d.mean_kl(), decoded.mean_kl()));
    }
    // KIVI's reason to exist: the same int4 bits, keys per channel, a fraction of per-token int4's divergence.
    let of = |d: KvDtype| measured.iter().find(|m| m.0 == d).map(|m| (m.1, m.2)).unwrap();
    let (kivi_d, per_token_d) = (of(kivi), of(KvDtype::Int4PerToken));
    assert!(kivi_d.0 * 5.0 < per_token_d.0 && kivi_d.1 * 5.0 < per_token_d.1, "{kivi_d:?} vs {per_token_d:?}");
    // Full-precision windows exist only in the KIVI cache: asking for one on a per-token cache is refused.
    let err = Engine::open_cpu_tier(
        &common::smollm2_path(),
        None,
        &tier(r#"{"name":"int4-kv","weights":{"format":"bf16"},"kvCache":{"dtype":"int4","sinkTokens":4}}"#),
        &LoadOptions::default(),
    )
    .err()
    .expect("a window on a per-token int4 cache");
    assert!(err.to_string().contains("only for int4 KIVI caches"), "{err}");
}

/// INT8-activation tiers (W8A8 with int8 weights, RTN and SmoothQuant; W4A8 with int4 g32 weights): every
/// int8/int4 matrix, lm_head included, quantizes its input at run time; the divergence they add over their
/// weight-only peers is small; the integer kernels are batch-invariant, so a decode step reproduces the
/// prefill's logits for the same position bit for bit.
#[test]
fn int8_activation_tiers_track_their_weight_only_peers() {
    // A short SmoothQuant search (its alpha grid runs per matrix on these tokens) keeps the test to a minute.
    let opts = LoadOptions { calibration_tokens: 32, awq_tokens: 16, ..LoadOptions::default() };
    let int4 = r#""weights":{"format":"int4","groupSize":32},"layerOverrides":[{"embeddings":true,"lmHead":true,"weights":{"format":"int8"}}]"#;
    let cases = [
        (
            r#"{"name":"int8","weights":{"format":"int8"}}"#.to_owned(),
            r#"{"name":"int8-a8","weights":{"format":"int8"},"activations":"int8"}"#.to_owned(),
        ),
        (
            r#"{"name":"int8","weights":{"format":"int8"}}"#.to_owned(),
            r#"{"name":"int8-sq","weights":{"format":"int8","method":"smoothquant"},"activations":"int8"}"#.to_owned(),
        ),
        (format!(r#"{{"name":"int4",{int4}}}"#), format!(r#"{{"name":"int4-a8","activations":"int8",{int4}}}"#)),
    ];
    let mut base_cache: Vec<(String, Divergence)> = Vec::new();
    for (base_json, a8_json) in &cases {
        let base_d = match base_cache.iter().find(|(j, _)| j == base_json) {
            Some((_, d)) => *d,
            None => {
                let d = divergence(&open(&tier(base_json), &opts));
                base_cache.push((base_json.clone(), d));
                d
            }
        };
        let t = tier(a8_json);
        let e = open(&t, &opts);
        let report = e.tier.as_ref().unwrap();
        for (name, format) in &report.formats {
            assert!(format.ends_with("-a8"), "tier {}: {name} is {format}", t.name);
        }
        assert_eq!(report.weight_bytes, planned_matrix_bytes(&e, &t), "tier {}: stored vs planned bytes", t.name);
        let d = divergence(&e);
        println!(
            "tier {}: mean KLD {:.5} (weight-only {:.5}), top-1 {:.3} (weight-only {:.3}), first divergence {:?}",
            t.name,
            d.mean_kl(),
            base_d.mean_kl(),
            d.top1(),
            base_d.top1(),
            d.first_divergent
        );
        assert!(d.mean_kl() < base_d.mean_kl() + 0.01 && d.top1() > base_d.top1() - 0.05, "tier {}: {d:?}", t.name);
        assert!(greedy_text(&e, "The capital of France is", 2).starts_with(" Paris"), "tier {}", t.name);

        // Decode (one token) against prefill (all tokens in one step) at the same position.
        let ids = e.tokenizer.encode(PROMPTS[2]).unwrap();
        let vocab = e.model.config.vocab;
        let all = logits_all(&e, &ids);
        let want = &all[(ids.len() - 1) * vocab..];
        let mut kv = e.new_kv_cache(16 << 20).unwrap();
        let mut seq = Default::default();
        let mut ws = e.model.new_workspace();
        let mut prefix = Vec::new();
        e.model.forward(&mut ws, &mut kv, &mut seq, &ids[..ids.len() - 1], Logits::Last, &mut prefix).unwrap();
        let mut got = Vec::new();
        e.model.forward(&mut ws, &mut kv, &mut seq, &ids[ids.len() - 1..], Logits::Last, &mut got).unwrap();
        let max_diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let scale = want.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
        println!("tier {}: decode vs prefill max |logit diff| {max_diff:.2e} (max |logit| {scale:.1})", t.name);
        assert_eq!(max_diff, 0.0, "tier {}: decode vs prefill", t.name);
    }
}

#[test]
fn unsupported_tiers_are_clear_errors() {
    let cases = [
        (r#"{"name":"nv","weights":{"format":"nvfp4"}}"#, "nvfp4"),
        (
            r#"{"name":"fp8a","weights":{"format":"fp8-e4m3","scaling":"per-channel"},"activations":"fp8-e4m3"}"#,
            "fp8-e4m3 activations",
        ),
        (r#"{"name":"f16","weights":{"format":"fp16"}}"#, "fp16"),
        (
            r#"{"name":"fp8g","weights":{"format":"fp8-e4m3","scaling":"per-group","groupSize":48}}"#,
            "groupSize 32, 64, 128 or 256",
        ),
    ];
    for (json, needle) in cases {
        let err = Engine::open_cpu_tier(&common::smollm2_path(), None, &tier(json), &LoadOptions::default())
            .err()
            .expect("unsupported tier must fail");
        assert!(matches!(err, EngineError::UnsupportedModel(_)) && err.to_string().contains(needle), "{err}");
    }
}

/// FP8 per-channel with the tied embedding/lm_head kept at bf16 through an override (as FP8 checkpoints keep
/// lm_head unquantized): the embedding is bf16, every layer matrix FP8, the stored bytes are the planner's, and
/// the divergence drops well below the all-FP8 tier's: the tied matrix carries about half of FP8's KLD on this
/// model, almost all of it through its lm_head use (`crates/quantfleet-quant/tools/fp8_grid_study.py`).
#[test]
fn fp8_tier_with_bf16_embedding_and_lm_head() {
    let t = tier(
        r#"{"name":"fp8-embd-bf16","weights":{"format":"fp8-e4m3","scaling":"per-channel"},
            "layerOverrides":[{"embeddings":true,"lmHead":true,"weights":{"format":"bf16"}}]}"#,
    );
    let e = open(&t, &LoadOptions::default());
    let report = e.tier.as_ref().unwrap();
    let format = |name: &str| report.formats.iter().find(|(n, _)| n == name).map(|(_, f)| f.as_str()).unwrap();
    assert_eq!(format("token_embd"), "bf16");
    assert_eq!(format("blk.0.attn_q"), "fp8-e4m3");
    assert_eq!(format("blk.29.ffn_down"), "fp8-e4m3");
    assert_eq!(report.weight_bytes, planned_matrix_bytes(&e, &t));
    let d = divergence(&e);
    println!(
        "tier fp8 + bf16 embedding/lm_head: mean KLD {:.5}, top-1 {:.3} over {} positions, {} weight bytes",
        d.mean_kl(),
        d.top1(),
        d.positions,
        report.weight_bytes
    );
    // Measured 0.0187 / 89.8% (the all-FP8 tier: 0.032 / 83%, so an ignored override fails both bounds); still
    // short of the issue's 0.01 / 97%: the FP8 layers alone exceed it.
    assert!(d.mean_kl() < 0.025 && d.top1() >= 0.85, "{d:?}");
}

/// FP8 with one scale per 32 weights of a row (RTN, every matrix FP8, the tied embedding/lm_head included):
/// the stored bytes are the planner's (an f32 scale per group), and the divergence is well below the
/// per-row tier's at 1/8 byte more per weight: a row's small weights no longer sit near E4M3's subnormal
/// range. The per-row and per-group tiers load the same weights, so only the scale layout differs.
#[test]
fn fp8_per_group_scales_beat_per_row_scales() {
    let row = tier(r#"{"name":"fp8","weights":{"format":"fp8-e4m3"}}"#);
    let group = tier(r#"{"name":"fp8-g32","weights":{"format":"fp8-e4m3","scaling":"per-group","groupSize":32}}"#);
    let (er, eg) = (open(&row, &LoadOptions::default()), open(&group, &LoadOptions::default()));
    let report = eg.tier.as_ref().unwrap();
    assert!(report.formats.iter().all(|(_, f)| f == "fp8-e4m3-g32"), "{:?}", report.formats);
    assert_eq!(report.weight_bytes, planned_matrix_bytes(&eg, &group));
    let (dr, dg) = (divergence(&er), divergence(&eg));
    println!(
        "fp8 per-row: mean KLD {:.5} top-1 {:.3} ({} bytes); per-group 32: {:.5} / {:.3} ({} bytes)",
        dr.mean_kl(),
        dr.top1(),
        er.tier.as_ref().unwrap().weight_bytes,
        dg.mean_kl(),
        dg.top1(),
        report.weight_bytes
    );
    // Measured 0.0171 / 93.2% against 0.0319 / 81.4%.
    assert!(dg.mean_kl() < 0.7 * dr.mean_kl() && dg.top1() > dr.top1() + 0.05, "per-group {dg:?} vs per-row {dr:?}");
    assert!(greedy_text(&eg, "The capital of France is", 2).starts_with(" Paris"));
}

/// GPTQ on FP8 weights (act-order, calibrated on the bundled text, lm_head included) against RTN at the same
/// layout, with and without the tied embedding/lm_head kept at bf16: GPTQ stores the same bytes and diverges
/// clearly less. With the default options the calibration pass runs the default cap of tokens, which the
/// bundled text fills.
#[test]
fn fp8_gptq_tiers_beat_rtn_at_the_same_bytes() {
    const BF16_HEAD: &str = r#""layerOverrides":[{"embeddings":true,"lmHead":true,"weights":{"format":"bf16"}}]"#;
    // (override, calibration tokens, max GPTQ/RTN KLD ratio). Measured on these prompts: see the printed
    // figures and the README (both still above the issue's 0.01 on these three short prompts; the eval
    // command's task-class prompts are the measure of the target).
    for (overrides, tokens, max_ratio) in
        [("", 2048, 0.75), (BF16_HEAD, LoadOptions::default().calibration_tokens, 0.8)]
    {
        let sep = if overrides.is_empty() { "" } else { "," };
        let rtn = tier(&format!(r#"{{"name":"fp8-rtn","weights":{{"format":"fp8-e4m3"}}{sep}{overrides}}}"#));
        let gptq = tier(&format!(
            r#"{{"name":"fp8-gptq","weights":{{"format":"fp8-e4m3","method":"gptq"}}{sep}{overrides}}}"#
        ));
        let er = open(&rtn, &LoadOptions::default());
        let eg = open(&gptq, &LoadOptions { calibration_tokens: tokens, ..LoadOptions::default() });
        let report = eg.tier.as_ref().unwrap();
        assert_eq!(report.calibration_tokens, tokens, "the bundled text fills the cap");
        assert_eq!(report.weight_bytes, er.tier.as_ref().unwrap().weight_bytes, "GPTQ keeps RTN's layout");
        assert_eq!(report.weight_bytes, planned_matrix_bytes(&eg, &gptq));
        let (dr, dg) = (divergence(&er), divergence(&eg));
        println!(
            "fp8 {} ({tokens} calibration tokens): RTN mean KLD {:.5} top-1 {:.3}; GPTQ {:.5} / {:.3} (load {:.1} s)",
            if overrides.is_empty() { "everywhere" } else { "with bf16 embedding/lm_head" },
            dr.mean_kl(),
            dr.top1(),
            dg.mean_kl(),
            dg.top1(),
            report.quantize_seconds
        );
        assert!(dg.mean_kl() < max_ratio * dr.mean_kl(), "GPTQ {dg:?} vs RTN {dr:?}");
        assert!(greedy_text(&eg, "The capital of France is", 2).starts_with(" Paris"));
    }
}

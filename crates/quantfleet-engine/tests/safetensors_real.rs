//! The Hugging Face safetensors path on the real SmolLM2-135M. tools/gguf_to_hf.py (numpy and the `gguf`
//! package, sharing nothing with the engine) converts the GGUF into an HF checkpoint directory: f32 weights in
//! two safetensors shards under an index, q/k projections in HF's rotate-half RoPE layout, config.json,
//! tokenizer.json and tokenizer_config.json. Both load here through `Engine::open_cpu`; logits, greedy
//! generations, tokenization and a precision tier must agree.
//!
//! The conversion runs once and is cached under $QUANTFLEET_CACHE/hf (keyed by the script's and the GGUF's
//! digests); its python is QUANTFLEET_GGUF_PYTHON (a venv made and exported by scripts/test.sh).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use quantfleet_api::model::TierSpec;
use quantfleet_engine::backend::Backend;
use quantfleet_engine::cpu::CpuBackend;
use quantfleet_engine::cuda::GpuBackend;
use quantfleet_engine::gguf::sha256_hex;
use quantfleet_engine::kv_cache::{KvDtype, SeqKv};
use quantfleet_engine::model::Logits;
use quantfleet_engine::sampler::SamplingParams;
use quantfleet_engine::tier::LoadOptions;
use quantfleet_engine::{Engine, GenerateRequest};
use quantfleet_kernels::emu::EmuRunner;

const SCRIPT: &str = include_str!("../tools/gguf_to_hf.py");

/// Bound on |HF logit - GGUF logit| at every position. Both models hold the same numbers (the converter
/// dequantizes Q4_1/Q8_0 exactly into f32) and the GGUF kernels dequantize blocks exactly before the same f32
/// arithmetic, so the logits were measured bit-identical (max diff 0.0 over the prompts below); the bound
/// leaves room for kernels that sum quantized blocks in another order, and is far below the top-1/top-2 gaps
/// greedy identity depends on (the oracle prompts' smallest is 0.018).
const LOGIT_BOUND: f32 = 1e-4;

fn cache_dir() -> PathBuf {
    std::env::var_os("QUANTFLEET_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/quantfleet")))
        .expect("neither QUANTFLEET_CACHE nor HOME is set")
}

fn python() -> PathBuf {
    let p = std::env::var_os("QUANTFLEET_GGUF_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("venv-gguf/bin/python"));
    assert!(
        p.is_file(),
        "python with numpy and gguf not found at {}: scripts/test.sh installs them (scripts/venv.sh) and exports \
         QUANTFLEET_GGUF_PYTHON",
        p.display()
    );
    p
}

/// The converted checkpoint, made once per (script, GGUF) pair.
fn hf_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let gguf = common::smollm2_path();
        let key = sha256_hex(format!("{SCRIPT}\n{}", common::SMOLLM2_SHA256).as_bytes());
        let root = cache_dir().join("hf");
        let dir = root.join(format!("SmolLM2-135M-Instruct-{}", &key[..16]));
        if !dir.join("config.json").is_file() {
            // Older conversions (another script version) are dead weight: 540 MB each.
            if let Ok(entries) = std::fs::read_dir(&root) {
                for e in entries.flatten() {
                    if e.file_name().to_string_lossy().starts_with("SmolLM2-135M-Instruct-") {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
            let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/gguf_to_hf.py");
            let status = Command::new(python())
                .arg(&script)
                .arg("--model")
                .arg(&gguf)
                .arg("--out")
                .arg(&dir)
                .arg("--shards")
                .arg("2")
                .status()
                .expect("run gguf_to_hf.py");
            assert!(status.success(), "gguf_to_hf.py failed: {status}");
        }
        dir
    })
}

fn gguf_engine() -> &'static Engine<CpuBackend> {
    static E: OnceLock<Engine<CpuBackend>> = OnceLock::new();
    E.get_or_init(|| Engine::open_cpu(&common::smollm2_path(), Some(common::SMOLLM2_SHA256)).unwrap())
}

fn hf_engine() -> &'static Engine<CpuBackend> {
    static E: OnceLock<Engine<CpuBackend>> = OnceLock::new();
    E.get_or_init(|| Engine::open_cpu(hf_dir(), None).unwrap())
}

fn all_logits<B: Backend>(e: &Engine<B>, ids: &[u32]) -> Vec<f32> {
    let mut kv = e.new_kv_cache(64 << 20).unwrap();
    let mut ws = e.model.new_workspace();
    let mut seq = SeqKv::default();
    let mut out = Vec::new();
    e.model.forward(&mut ws, &mut kv, &mut seq, ids, Logits::All, &mut out).unwrap();
    kv.release(&mut seq);
    out
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0
}

/// The oracle's prompts (chat, code, math, JSON, Unicode, ...), each cut to its first 32 tokens so the f32
/// models stay quick to run.
fn prompts() -> Vec<(String, Vec<u32>)> {
    common::oracle_cases().into_iter().map(|c| (c.name, c.ids.into_iter().take(32).collect())).collect()
}

#[test]
fn hf_checkpoint_has_the_gguf_models_configuration() {
    let (g, h) = (gguf_engine(), hf_engine());
    assert_eq!(h.model.config, g.model.config);
    assert_eq!(h.tokenizer.vocab_size(), g.tokenizer.vocab_size());
    assert_eq!((h.tokenizer.bos_id, h.tokenizer.eos_id), (g.tokenizer.bos_id, g.tokenizer.eos_id));
    assert_eq!(h.tokenizer.stop_ids(), g.tokenizer.stop_ids());
    assert_eq!(h.tokenizer.chat_template(), g.tokenizer.chat_template());
    assert!(h.tokenizer.chat_template().is_some());
    assert!((0..g.tokenizer.vocab_size() as u32).all(|id| h.tokenizer.is_special(id) == g.tokenizer.is_special(id)));
    // Matrices stay in the shards' memory map in f32 (tied embeddings: no lm_head).
    assert!(h.model.config.vocab == 49152);
}

#[test]
fn logits_match_the_gguf_model_at_every_position() {
    let (g, h) = (gguf_engine(), hf_engine());
    let vocab = g.model.config.vocab;
    let mut worst = 0.0f32;
    let mut positions = 0;
    for (name, ids) in prompts() {
        let (a, b) = (all_logits(g, &ids), all_logits(h, &ids));
        assert_eq!(a.len(), b.len());
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(diff <= LOGIT_BOUND, "{name}: max |logit diff| {diff} > {LOGIT_BOUND}");
        for (ra, rb) in a.chunks(vocab).zip(b.chunks(vocab)) {
            assert_eq!(argmax(ra), argmax(rb), "{name}: greedy token differs");
        }
        positions += ids.len();
        worst = worst.max(diff);
    }
    eprintln!("HF vs GGUF: max |logit diff| {worst:.2e} over {positions} positions (bound {LOGIT_BOUND})");
}

#[test]
fn greedy_generations_are_identical() {
    let (g, h) = (gguf_engine(), hf_engine());
    let req =
        GenerateRequest { max_tokens: 12, sampling: SamplingParams::default(), stop_tokens: vec![], top_logprobs: 0 };
    for text in
        ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", "def fibonacci(n):"]
    {
        let ids = g.tokenizer.encode(text).unwrap();
        let mut kv_g = g.new_kv_cache(32 << 20).unwrap();
        let mut kv_h = h.new_kv_cache(32 << 20).unwrap();
        let a: Vec<u32> = g.generate(&mut kv_g, &ids, &req).unwrap().tokens.iter().map(|t| t.id).collect();
        let b: Vec<u32> = h.generate(&mut kv_h, &ids, &req).unwrap().tokens.iter().map(|t| t.id).collect();
        assert_eq!(a, b, "{text:?}: {:?} vs {:?}", g.tokenizer.decode(&a, false), h.tokenizer.decode(&b, false));
    }
}

#[test]
fn tokenization_is_identical() {
    let (g, h) = (gguf_engine(), hf_engine());
    let mut texts: Vec<String> = common::oracle_cases().into_iter().map(|c| c.text).collect();
    texts.extend(
        [
            "",
            "  leading spaces and\ttabs\n\nnewlines",
            "numbers 1234567890 and 3.14159, 1e-5",
            "Unicode: naïve café, 日本語のテキスト, emoji 🚀🤖, Ελληνικά",
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|endoftext|>",
            "<|im_start|>inline<|im_end|>tokens<|im_start|>",
            "fn main() { println!(\"{}\", x.iter().map(|v| v * 2).sum::<i32>()); }",
        ]
        .map(String::from),
    );
    for t in &texts {
        let ids = g.tokenizer.encode(t).unwrap();
        assert_eq!(h.tokenizer.encode(t).unwrap(), ids, "{t:?}");
        assert_eq!(h.tokenizer.decode(&ids, false).unwrap(), g.tokenizer.decode(&ids, false).unwrap(), "{t:?}");
        assert_eq!(h.tokenizer.decode(&ids, true).unwrap(), g.tokenizer.decode(&ids, true).unwrap(), "{t:?}");
    }
}

#[test]
fn an_int8_tier_loads_from_the_hf_checkpoint_like_from_the_gguf() {
    let tier: TierSpec = serde_json::from_str(r#"{"name":"int8","weights":{"format":"int8"}}"#).unwrap();
    let opts = LoadOptions::default();
    let g = Engine::open_cpu_tier(&common::smollm2_path(), None, &tier, &opts).unwrap();
    let h = Engine::open_cpu_tier(hf_dir(), None, &tier, &opts).unwrap();
    let (rg, rh) = (g.tier.as_ref().unwrap(), h.tier.as_ref().unwrap());
    assert_eq!(rh.formats, rg.formats);
    assert_eq!(rh.weight_bytes, rg.weight_bytes);
    // Per-row int8 of the same f32 rows (q/k rows in another order): the same quantized model.
    let ids = g.tokenizer.encode("The quick brown fox jumps over the lazy dog because").unwrap();
    let (a, b) = (all_logits(&g, &ids), all_logits(&h, &ids));
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(diff <= LOGIT_BOUND, "int8 tier: max |logit diff| {diff}");
}

/// The GPU backend opens the HF directory too (emulated here: the CUDA kernels' C++ build run on the CPU). The
/// checkpoint's f32 weights become the same f16 matrices as the GGUF's dequantized ones, so the logits are
/// identical; a tier re-quantizes the same f32 rows, so it stores the same formats and bytes and gives the
/// same logits too.
#[test]
fn the_gpu_backend_opens_the_hf_checkpoint_like_the_gguf() {
    let emulated = || GpuBackend::new(EmuRunner, "cuda-emulated");
    let gguf = common::smollm2_path();
    let ids = gguf_engine().tokenizer.encode("The quick brown fox").unwrap();
    let g = Engine::open_gpu(emulated(), &gguf, None, KvDtype::F16).unwrap();
    let h = Engine::open_gpu(emulated(), hf_dir(), None, KvDtype::F16).unwrap();
    assert_eq!(h.model.config, g.model.config);
    assert_eq!(all_logits(&h, &ids), all_logits(&g, &ids), "file formats");
    let tier: TierSpec = serde_json::from_str(r#"{"name":"fp8","weights":{"format":"fp8-e4m3"}}"#).unwrap();
    let opts = LoadOptions::default();
    let g = Engine::open_gpu_tier(emulated(), &gguf, None, &tier, &opts).unwrap();
    let h = Engine::open_gpu_tier(emulated(), hf_dir(), None, &tier, &opts).unwrap();
    let (rg, rh) = (g.tier.as_ref().unwrap(), h.tier.as_ref().unwrap());
    assert_eq!((&rh.formats, rh.weight_bytes), (&rg.formats, rg.weight_bytes));
    assert_eq!(all_logits(&h, &ids), all_logits(&g, &ids), "fp8 tier");
}

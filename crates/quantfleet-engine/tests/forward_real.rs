//! The llama forward pass on the real SmolLM2-135M against the independent numpy oracle
//! (shared/oracle/reference_logits.json), and incremental decode against full-sequence evaluation.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use quantfleet_engine::EngineError;
use quantfleet_engine::cpu::CpuBackend;
use quantfleet_engine::gguf::GgufFile;
use quantfleet_engine::kv_cache::{KvCache, SeqKv};
use quantfleet_engine::model::{Llama, Logits};

fn model() -> &'static Llama<CpuBackend> {
    static MODEL: OnceLock<Llama<CpuBackend>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let file = Arc::new(GgufFile::open(&common::smollm2_path()).unwrap());
        Llama::load(CpuBackend::new(), file).unwrap()
    })
}

fn all_logits(m: &Llama<CpuBackend>, ids: &[u32]) -> Vec<f32> {
    let mut kv = KvCache::with_budget(&m.backend, m.config.kv_layout(16), 64 << 20).unwrap();
    let mut ws = m.new_workspace();
    let mut seq = SeqKv::default();
    let mut out = Vec::new();
    m.forward(&mut ws, &mut kv, &mut seq, ids, Logits::All, &mut out).unwrap();
    out
}

fn logsumexp(row: &[f32]) -> f32 {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    max + row.iter().map(|v| ((v - max) as f64).exp()).sum::<f64>().ln() as f32
}

fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32
}

/// Bound on |our logit - oracle logit| at every position of every prompt (and on the log-sum-exp). Measured
/// 1.3e-4 on this machine (the oracle's JSON keeps 5 decimals); the bound leaves room for other summation
/// orders (thread counts, instruction sets) and is still 18x below the smallest top-1/top-2 gap among the
/// oracle prompts (0.018, `json`), so greedy identity is asserted on all of them.
const LOGIT_BOUND: f32 = 1e-3;

#[test]
fn logits_match_the_numpy_oracle_on_every_prompt_and_position() {
    let m = model();
    let vocab = m.config.vocab;
    let mut worst = 0.0f32;
    let start = Instant::now();
    let cases = common::oracle_cases();
    assert!(cases.len() >= 8 && cases.iter().any(|c| c.ids.len() >= 512));
    for case in cases {
        let logits = all_logits(m, &case.ids);
        assert_eq!(logits.len(), case.ids.len() * vocab);
        let mut case_worst = 0.0f32;
        for (pos, top) in case.top.iter().enumerate() {
            let row = &logits[pos * vocab..(pos + 1) * vocab];
            for &(tok, want) in top {
                case_worst = case_worst.max((row[tok as usize] - want).abs());
            }
            case_worst = case_worst.max((logsumexp(row) - case.logsumexp[pos]).abs());
        }
        let last = &logits[(case.ids.len() - 1) * vocab..];
        eprintln!(
            "{:18} {:4} tokens: max |logit diff| {case_worst:.5}, greedy {} (oracle {}, gap {:.3})",
            case.name,
            case.ids.len(),
            argmax(last),
            case.greedy_next,
            case.last_gap
        );
        assert!(case_worst <= LOGIT_BOUND, "{}: max |logit diff| {case_worst} > {LOGIT_BOUND}", case.name);
        // With every logit within LOGIT_BOUND, a top-1/top-2 gap above twice the bound cannot flip.
        if case.last_gap > 2.0 * LOGIT_BOUND {
            assert_eq!(argmax(last), case.greedy_next, "{}: greedy next token", case.name);
        }
        worst = worst.max(case_worst);
    }
    eprintln!("worst {worst:.5} in {:.2?}", start.elapsed());
}

#[test]
fn incremental_decode_equals_full_sequence_evaluation() {
    let m = model();
    let vocab = m.config.vocab;
    let case = common::oracle_cases().into_iter().find(|c| c.name == "chat-template").unwrap();
    let full = all_logits(m, &case.ids);
    // Block size 16 with a 20-token prefill: decode crosses a block boundary at position 32.
    let mut kv = KvCache::with_budget(&m.backend, m.config.kv_layout(16), 16 << 20).unwrap();
    let mut ws = m.new_workspace();
    let mut seq = SeqKv::default();
    let mut step = Vec::new();
    let split = 20;
    m.forward(&mut ws, &mut kv, &mut seq, &case.ids[..split], Logits::All, &mut step).unwrap();
    let mut worst = max_diff(&step, &full[..split * vocab]);
    for pos in split..case.ids.len() {
        m.forward(&mut ws, &mut kv, &mut seq, &case.ids[pos..pos + 1], Logits::Last, &mut step).unwrap();
        worst = worst.max(max_diff(&step, &full[pos * vocab..(pos + 1) * vocab]));
    }
    eprintln!("incremental vs full: max |logit diff| {worst:.6}");
    // Prefill uses the dequantize-then-GEMM path, decode the block-format dot: only rounding differs.
    assert!(worst <= 1e-3, "incremental decode differs from full evaluation by {worst}");
    assert_eq!(seq.len, case.ids.len());
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn bad_requests_are_typed_errors() {
    let m = model();
    let mut ws = m.new_workspace();
    let mut out = Vec::new();
    let one_block = m.config.kv_layout(16).block_elems() * 4;
    let mut kv = KvCache::with_budget(&m.backend, m.config.kv_layout(16), 2 * one_block).unwrap();
    let mut seq = SeqKv::default();
    let long = vec![504u32; 33];
    assert!(matches!(
        m.forward(&mut ws, &mut kv, &mut seq, &long, Logits::Last, &mut out),
        Err(EngineError::KvBudgetExhausted { needed_blocks: 3, .. })
    ));
    let mut seq = SeqKv::default();
    assert!(matches!(
        m.forward(&mut ws, &mut kv, &mut seq, &[49152], Logits::Last, &mut out),
        Err(EngineError::TokenOutOfRange { .. })
    ));
    let mut seq = SeqKv { len: m.config.context, ..Default::default() };
    assert!(matches!(
        m.forward(&mut ws, &mut kv, &mut seq, &[1], Logits::Last, &mut out),
        Err(EngineError::ContextOverflow { .. })
    ));
    assert!(m.forward(&mut ws, &mut kv, &mut SeqKv::default(), &[], Logits::Last, &mut out).is_err());
}

/// The same forward pass at every instruction-set level this CPU supports (portable, AVX2, AVX-512): each
/// must match the oracle on a short prompt, so the portable fallback is proven on the real model too.
#[test]
fn every_simd_level_matches_the_oracle_on_the_real_model() {
    use quantfleet_engine::cpu::SimdLevel;
    let case = common::oracle_cases().into_iter().find(|c| c.name == "chat-short").unwrap();
    let file = Arc::new(GgufFile::open(&common::smollm2_path()).unwrap());
    let mut tested = 0;
    for level in [SimdLevel::Portable, SimdLevel::Avx2Fma, SimdLevel::Avx512] {
        let Ok(backend) = CpuBackend::with_level(level) else { continue };
        let m = Llama::load(backend, Arc::clone(&file)).unwrap();
        let logits = all_logits(&m, &case.ids);
        let vocab = m.config.vocab;
        for (pos, top) in case.top.iter().enumerate() {
            for &(tok, want) in top {
                let got = logits[pos * vocab + tok as usize];
                assert!((got - want).abs() <= LOGIT_BOUND, "{level:?} position {pos} token {tok}: {got} vs {want}");
            }
        }
        assert_eq!(argmax(&logits[(case.ids.len() - 1) * vocab..]), case.greedy_next, "{level:?}");
        tested += 1;
    }
    assert!(tested >= 1, "the portable level always runs");
}

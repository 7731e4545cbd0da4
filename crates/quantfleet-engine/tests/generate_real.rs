//! Generation and scoring through the engine API on the real SmolLM2-135M: the known greedy answer,
//! consistency between generation log-probabilities and teacher-forced scoring, seeded sampling.

mod common;

use std::sync::OnceLock;

use quantfleet_engine::cpu::CpuBackend;
use quantfleet_engine::sampler::SamplingParams;
use quantfleet_engine::{Engine, FinishReason, GenerateRequest};

fn engine() -> &'static Engine<CpuBackend> {
    static ENGINE: OnceLock<Engine<CpuBackend>> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::open_cpu(&common::smollm2_path(), None).unwrap())
}

fn greedy(max_tokens: usize) -> GenerateRequest {
    GenerateRequest { max_tokens, sampling: SamplingParams::default(), stop_tokens: vec![], top_logprobs: 3 }
}

#[test]
fn capital_of_france_is_paris() {
    let e = engine();
    let mut kv = e.new_kv_cache(32 << 20).unwrap();
    let prompt = e.tokenizer.encode("The capital of France is").unwrap();
    let out = e.generate(&mut kv, &prompt, &greedy(3)).unwrap();
    let ids: Vec<u32> = out.tokens.iter().map(|t| t.id).collect();
    let text = e.tokenizer.decode(&ids, false).unwrap();
    assert!(text.starts_with(" Paris."), "generated {text:?}");
    assert_eq!(out.finish, FinishReason::Length);
    assert_eq!(kv.free_blocks(), kv.total_blocks(), "blocks returned after generation");
    for t in &out.tokens {
        // Greedy: the chosen token is the most likely one, and log-probabilities are normalised.
        assert_eq!(t.top_logprobs[0].0, t.id);
        assert!((t.top_logprobs[0].1 - t.logprob).abs() < 1e-6 && t.logprob <= 0.0);
        assert!(t.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
    }
}

#[test]
fn scoring_agrees_with_generation_logprobs_and_stop_tokens_end_generation() {
    let e = engine();
    let mut kv = e.new_kv_cache(32 << 20).unwrap();
    let prompt = e.tokenizer.encode("<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n").unwrap();
    let free = e.generate(&mut kv, &prompt, &greedy(12)).unwrap();
    assert_eq!(free.tokens.len(), 12);
    // Declaring the 4th generated token a stop token must end generation right there, reporting it.
    let mut req = greedy(12);
    req.stop_tokens = vec![free.tokens[3].id];
    let out = e.generate(&mut kv, &prompt, &req).unwrap();
    let first_stop = free.tokens.iter().position(|t| t.id == free.tokens[3].id).unwrap();
    assert_eq!(out.finish, FinishReason::Stop);
    assert_eq!(out.tokens, free.tokens[..=first_stop].to_vec());
    let ids: Vec<u32> = out.tokens.iter().map(|t| t.id).collect();
    let scores = e.score(&mut kv, &prompt, &ids).unwrap();
    for (t, s) in out.tokens.iter().zip(&scores) {
        assert!((t.logprob - s).abs() < 2e-3, "token {}: generated logprob {} vs scored {s}", t.id, t.logprob);
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_seed_dependent() {
    let e = engine();
    let mut kv = e.new_kv_cache(32 << 20).unwrap();
    let prompt = e.tokenizer.encode("Once upon a time").unwrap();
    let req = |seed| GenerateRequest {
        max_tokens: 12,
        sampling: SamplingParams { temperature: 1.0, top_k: 40, top_p: 0.95, seed },
        stop_tokens: vec![],
        top_logprobs: 0,
    };
    let ids = |seed| -> Vec<u32> {
        let mut kv2 = e.new_kv_cache(32 << 20).unwrap();
        e.generate(&mut kv2, &prompt, &req(seed)).unwrap().tokens.iter().map(|t| t.id).collect()
    };
    let a = ids(7);
    assert_eq!(a, ids(7));
    assert!((1..6).any(|s| ids(s) != a), "different seeds should give a different continuation");
    assert!(e.generate(&mut kv, &[], &req(1)).is_err());
}

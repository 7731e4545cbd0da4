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

/// Continuous batching: sequences of different prompt lengths join a running batch at different steps (their
/// prefill shares a forward pass with others' decode steps) and leave when done; every sequence's greedy tokens
/// equal what it generates alone, and all KV blocks come back.
#[test]
fn continuous_batching_matches_one_by_one_greedy_generation() {
    use quantfleet_engine::kv_cache::SeqKv;
    use quantfleet_engine::sampler::{Sampler, logsumexp};
    use quantfleet_engine::{BatchEntry, Logits};

    let e = engine();
    let vocab = e.model.config.vocab;
    let prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,", "<|im_start|>user\nHi<|im_end|>\n"];
    // (prompt index, step at which it joins, tokens to generate)
    let plan = [(0, 0, 6), (1, 0, 3), (2, 2, 5), (3, 4, 4)];
    let mut kv = e.new_kv_cache(32 << 20).unwrap();
    let alone: Vec<Vec<(u32, f32)>> = plan
        .iter()
        .map(|&(p, _, n)| {
            let prompt = e.tokenizer.encode(prompts[p]).unwrap();
            e.generate(&mut kv, &prompt, &greedy(n)).unwrap().tokens.iter().map(|t| (t.id, t.logprob)).collect()
        })
        .collect();

    struct Running {
        idx: usize,
        seq: SeqKv,
        pending: Vec<u32>,
        out: Vec<(u32, f32)>,
        sampler: Sampler,
    }
    let mut ws = e.model.new_workspace();
    let mut running: Vec<Running> = vec![];
    let mut done: Vec<Option<Vec<(u32, f32)>>> = vec![None; plan.len()];
    let mut logits = Vec::new();
    let mut max_batch = 0;
    for step in 0.. {
        for (idx, &(p, join, _)) in plan.iter().enumerate() {
            if join == step {
                let pending = e.tokenizer.encode(prompts[p]).unwrap();
                let sampler = Sampler::new(SamplingParams::default()).unwrap();
                running.push(Running { idx, seq: SeqKv::default(), pending, out: vec![], sampler });
            }
        }
        if running.is_empty() {
            break;
        }
        max_batch = max_batch.max(running.len());
        let mut batch: Vec<BatchEntry> =
            running.iter_mut().map(|r| BatchEntry { seq: &mut r.seq, tokens: &r.pending }).collect();
        e.model.forward_batch(&mut ws, &mut kv, &mut batch, Logits::Last, &mut logits).unwrap();
        assert_eq!(logits.len(), running.len() * vocab);
        for (r, row) in running.iter_mut().zip(logits.chunks(vocab)) {
            let id = r.sampler.sample(row).unwrap();
            r.out.push((id, (row[id as usize] as f64 - logsumexp(row)) as f32));
            r.pending = vec![id];
        }
        running.retain_mut(|r| {
            if r.out.len() < plan[r.idx].2 {
                return true;
            }
            kv.release(&mut r.seq);
            done[r.idx] = Some(std::mem::take(&mut r.out));
            false
        });
    }
    assert!(max_batch >= 3, "the plan should overlap at least three sequences, got {max_batch}");
    for (i, (batched, alone)) in done.iter().zip(&alone).enumerate() {
        let batched = batched.as_ref().unwrap();
        let ids = |v: &[(u32, f32)]| v.iter().map(|t| t.0).collect::<Vec<_>>();
        assert_eq!(ids(batched), ids(alone), "sequence {i}: batched tokens differ from generating alone");
        for (b, a) in batched.iter().zip(alone) {
            assert!((b.1 - a.1).abs() < 1e-3, "sequence {i}: logprob {} batched vs {} alone", b.1, a.1);
        }
    }
    assert_eq!(kv.free_blocks(), kv.total_blocks(), "every sequence's blocks returned");
}

/// Forward passes of one model from several threads at once (as tests, or several engine loops in one
/// process, run them): each pass runs on a worker of the shared thread pool, and a worker waiting for its
/// own tasks may run another thread's whole pass in between, so no pass may keep per-thread scratch
/// borrowed across its parallel regions (this once panicked with "RefCell already borrowed"). Results equal
/// the same generations run one after another.
#[test]
fn concurrent_generations_on_one_model_equal_sequential_ones() {
    let e = engine();
    let prompts =
        ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,", "Once upon a time", "Water boils at"];
    let run = |p: &str| {
        let mut kv = e.new_kv_cache(8 << 20).unwrap();
        let prompt = e.tokenizer.encode(p).unwrap();
        e.generate(&mut kv, &prompt, &greedy(8)).unwrap().tokens.iter().map(|t| (t.id, t.logprob)).collect::<Vec<_>>()
    };
    let sequential: Vec<_> = prompts.iter().map(|p| run(p)).collect();
    for _ in 0..3 {
        let concurrent: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = prompts.iter().map(|p| s.spawn(move || run(p))).collect();
            handles.into_iter().map(|h| h.join().expect("generation thread")).collect()
        });
        assert_eq!(concurrent, sequential);
    }
}

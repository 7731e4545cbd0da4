//! Times prefill and decode of a GGUF llama model on the CPU backend:
//! `bench MODEL.gguf [PROMPT_TOKENS=128] [DECODE_TOKENS=64]`. Prints tokens per second for each phase.

use std::sync::Arc;
use std::time::Instant;

use quantfleet_engine::backend::Backend;
use quantfleet_engine::cpu::CpuBackend;
use quantfleet_engine::gguf::GgufFile;
use quantfleet_engine::kv_cache::{KvCache, SeqKv};
use quantfleet_engine::model::{Llama, Logits};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: bench MODEL.gguf [PROMPT_TOKENS] [DECODE_TOKENS]")?;
    let n_prompt: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(128);
    let n_decode: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(64);
    let model = Llama::load(CpuBackend::new(), Arc::new(GgufFile::open(path.as_ref())?))?;
    println!("backend {}, {} threads", model.backend.name(), rayon::current_num_threads());
    let layout = model.config.kv_layout(16);
    let mut kv = KvCache::with_budget(&model.backend, layout, 512 << 20)?;
    let mut ws = model.new_workspace();
    let mut seq = SeqKv::default();
    let mut logits = Vec::new();
    // Deterministic, vocabulary-spread prompt tokens.
    let prompt: Vec<u32> = (0..n_prompt as u32).map(|i| (i * 7919 + 13) % 49_000 + 100).collect();
    let t0 = Instant::now();
    model.forward(&mut ws, &mut kv, &mut seq, &prompt, Logits::Last, &mut logits)?;
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for _ in 0..n_decode {
        let next = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap_or(0);
        model.forward(&mut ws, &mut kv, &mut seq, &[next], Logits::Last, &mut logits)?;
    }
    let decode = t1.elapsed().as_secs_f64();
    println!("prefill {n_prompt} tokens: {prefill:.3} s, {:.1} tok/s", n_prompt as f64 / prefill);
    println!("decode {n_decode} tokens: {decode:.3} s, {:.1} tok/s", n_decode as f64 / decode);
    Ok(())
}

//! The engine's request-level API: a model, its tokenizer, and generation (prefill, then incremental decode
//! with sampling, stop tokens and log-probabilities) or teacher-forced scoring of a given continuation.

use std::path::Path;
use std::sync::Arc;

use crate::backend::Backend;
use crate::cpu::CpuBackend;
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kv_cache::{DEFAULT_BLOCK_TOKENS, KvCache, KvDtype, SeqKv};
use crate::model::{Llama, Logits};
use crate::safetensors::hf::HfCheckpoint;
use crate::sampler::{Sampler, SamplingParams, logsumexp, top_logprobs};
use crate::tier::{LoadOptions, TierLoadReport};
use crate::tokenizer::Tokenizer;
use quantfleet_api::model::TierSpec;

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends after any of these tokens (it is reported, not fed back).
    pub stop_tokens: Vec<u32>,
    /// How many alternative tokens to report per step with their log-probabilities.
    pub top_logprobs: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    pub id: u32,
    /// Log-probability under the model's raw distribution (before temperature / top-k / top-p).
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was generated (it is the last token of the output).
    Stop,
    /// `max_tokens` were generated.
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub tokens: Vec<GeneratedToken>,
    pub finish: FinishReason,
}

pub struct Engine<B: Backend> {
    pub model: Llama<B>,
    pub tokenizer: Tokenizer,
    /// What loading a precision tier did (None for a model served in its file's own formats).
    pub tier: Option<TierLoadReport>,
    /// Element type of the KV caches `new_kv_cache` makes (the tier's; f32 for the reference).
    pub kv_dtype: KvDtype,
}

/// A GGUF file, its sha256 verified when given.
pub(crate) fn open_file(path: &Path, sha256: Option<&str>) -> Result<Arc<GgufFile>> {
    Ok(Arc::new(match sha256 {
        Some(h) => GgufFile::open_verified(path, h)?,
        None => GgufFile::open(path)?,
    }))
}

impl Engine<CpuBackend> {
    /// Opens a model on the CPU backend, verifying its sha256 when given: a GGUF file, or a directory holding a
    /// Hugging Face llama checkpoint (config.json, safetensors weights, tokenizer.json; the sha256 is then that
    /// of `model.safetensors`). Weights are used in the file's own formats (dequantized to f32 inside the
    /// kernels): this is the fp32 reference the tiers are measured against.
    pub fn open_cpu(path: &Path, sha256: Option<&str>) -> Result<Self> {
        if path.is_dir() {
            return Self::from_hf(CpuBackend::new(), &HfCheckpoint::open(path, sha256)?);
        }
        Self::new(CpuBackend::new(), open_file(path, sha256)?)
    }

    /// Opens a model (GGUF file or HF checkpoint directory, as [`open_cpu`](Self::open_cpu)) on the CPU backend
    /// at a precision tier: every weight matrix is dequantized to fp32 and re-quantized as `tier` says (format,
    /// method, group size, per-layer overrides; AWQ/GPTQ calibrate on `opts`' calibration text). Unsupported
    /// tier settings are a clear error before any work is done.
    pub fn open_cpu_tier(path: &Path, sha256: Option<&str>, tier: &TierSpec, opts: &LoadOptions) -> Result<Self> {
        let kv_dtype = crate::tier::kv_dtype(tier)?;
        let Self { mut model, tokenizer, .. } = Self::open_cpu(path, sha256)?;
        let report = crate::tier::apply_tier(&mut model, &tokenizer, tier, opts)?;
        Ok(Self { model, tokenizer, tier: Some(report), kv_dtype })
    }
}

impl<B: Backend> Engine<B> {
    pub fn new(backend: B, file: Arc<GgufFile>) -> Result<Self> {
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let model = Llama::load(backend, file)?;
        Self::check_vocab(&tokenizer, &model)?;
        Ok(Self { model, tokenizer, tier: None, kv_dtype: KvDtype::F32 })
    }

    /// The model of an opened HF checkpoint; matrices stay in the safetensors memory map (q/k projections are
    /// permuted into the engine's RoPE layout, see `safetensors::hf`).
    pub fn from_hf(backend: B, ckpt: &HfCheckpoint) -> Result<Self> {
        let tokenizer = Tokenizer::from_hf_dir(&ckpt.dir, ckpt.bos_token_id, ckpt.eos_token_id)?;
        let model = Llama::from_weights(backend, ckpt.config.clone(), ckpt)?;
        Self::check_vocab(&tokenizer, &model)?;
        Ok(Self { model, tokenizer, tier: None, kv_dtype: KvDtype::F32 })
    }

    fn check_vocab(tokenizer: &Tokenizer, model: &Llama<B>) -> Result<()> {
        if tokenizer.vocab_size() != model.config.vocab {
            return Err(EngineError::UnsupportedModel(format!(
                "tokenizer has {} tokens, model {}",
                tokenizer.vocab_size(),
                model.config.vocab
            )));
        }
        Ok(())
    }

    /// A KV cache of the engine's dtype holding as many blocks as fit in `budget_bytes`.
    pub fn new_kv_cache(&self, budget_bytes: usize) -> Result<KvCache<B>> {
        let layout = self.model.config.kv_layout(DEFAULT_BLOCK_TOKENS);
        KvCache::with_budget_dtype(&self.model.backend, layout, self.kv_dtype, budget_bytes)
    }

    /// Generates after `prompt`; the sequence's KV blocks are returned to `kv` afterwards, also on error.
    pub fn generate(&self, kv: &mut KvCache<B>, prompt: &[u32], req: &GenerateRequest) -> Result<Generation> {
        let mut seq = SeqKv::default();
        let result = self.generate_in(kv, &mut seq, prompt, req);
        kv.release(&mut seq);
        result
    }

    fn generate_in(
        &self,
        kv: &mut KvCache<B>,
        seq: &mut SeqKv,
        prompt: &[u32],
        req: &GenerateRequest,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest("empty prompt".into()));
        }
        let mut sampler = Sampler::new(req.sampling.clone())?;
        let mut ws = self.model.new_workspace();
        let mut logits = Vec::new();
        self.model.forward(&mut ws, kv, seq, prompt, Logits::Last, &mut logits)?;
        let mut tokens = Vec::with_capacity(req.max_tokens);
        while tokens.len() < req.max_tokens {
            let id = sampler.sample(&logits)?;
            let lse = logsumexp(&logits);
            tokens.push(GeneratedToken {
                id,
                logprob: (logits[id as usize] as f64 - lse) as f32,
                top_logprobs: top_logprobs(&logits, req.top_logprobs, lse),
            });
            if req.stop_tokens.contains(&id) {
                return Ok(Generation { tokens, finish: FinishReason::Stop });
            }
            if tokens.len() < req.max_tokens {
                self.model.forward(&mut ws, kv, seq, &[id], Logits::Last, &mut logits)?;
            }
        }
        Ok(Generation { tokens, finish: FinishReason::Length })
    }

    /// Teacher-forced log-probability of each `continuation` token given `prompt` and the continuation
    /// before it (one forward pass over both).
    pub fn score(&self, kv: &mut KvCache<B>, prompt: &[u32], continuation: &[u32]) -> Result<Vec<f32>> {
        if prompt.is_empty() || continuation.is_empty() {
            return Err(EngineError::InvalidRequest("scoring needs a prompt and a continuation".into()));
        }
        let all: Vec<u32> = prompt.iter().chain(continuation).copied().collect();
        let mut seq = SeqKv::default();
        let mut ws = self.model.new_workspace();
        let mut logits = Vec::new();
        let r = self.model.forward(&mut ws, kv, &mut seq, &all, Logits::All, &mut logits);
        kv.release(&mut seq);
        r?;
        let vocab = self.model.config.vocab;
        Ok(continuation
            .iter()
            .enumerate()
            .map(|(i, &tok)| {
                let row = &logits[(prompt.len() - 1 + i) * vocab..(prompt.len() + i) * vocab];
                (row[tok as usize] as f64 - logsumexp(row)) as f32
            })
            .collect())
    }
}

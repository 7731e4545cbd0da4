//! The llama forward pass (SmolLM2 and other llama-architecture models), written once against `Backend`:
//! RMSNorm, RoPE (GGUF NORM layout), grouped-query attention over the paged KV cache, SwiGLU MLP, tied or
//! separate output projection. Prefill and incremental decode are the same call: tokens are appended to the
//! sequence's cache and attend to everything before them.

use std::sync::Arc;

use crate::backend::{Backend, KvLayout, RopeTable, SeqSpan};
use crate::dtype::dequantize_row_reference;
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kv_cache::{KvCache, SeqKv};
use crate::weights::{GgufWeights, WeightSource};

/// Hyper-parameters read from `llama.*` GGUF metadata or a Hugging Face `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub n_layers: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rope_base: f64,
    pub rms_eps: f32,
    pub context: usize,
    pub vocab: usize,
}

impl LlamaConfig {
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = g.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(EngineError::UnsupportedModel(format!("architecture {arch:?} (supported: llama)")));
        }
        let u = |k: &str| g.get_u64(&format!("llama.{k}")).map(|v| v as usize);
        let (n_layers, d_model, d_ff) = (u("block_count")?, u("embedding_length")?, u("feed_forward_length")?);
        let n_heads = u("attention.head_count")?;
        let n_kv_heads = u("attention.head_count_kv").unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || d_model % n_heads != 0 || n_heads % n_kv_heads != 0 {
            return Err(EngineError::UnsupportedModel(format!(
                "{n_heads} heads / {n_kv_heads} KV heads for width {d_model}"
            )));
        }
        let head_dim = d_model / n_heads;
        if head_dim % 2 != 0 || u("rope.dimension_count").is_ok_and(|d| d != head_dim) {
            return Err(EngineError::UnsupportedModel("partial or odd rotary dimensions".into()));
        }
        let tokens = g.get_array("tokenizer.ggml.tokens")?.len();
        Ok(Self {
            n_layers,
            d_model,
            d_ff,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_base: g.get_f64("llama.rope.freq_base").unwrap_or(10_000.0),
            rms_eps: g.get_f64("llama.attention.layer_norm_rms_epsilon")? as f32,
            context: u("context_length")?,
            vocab: u("vocab_size").unwrap_or(tokens),
        })
    }

    pub fn kv_layout(&self, block_tokens: usize) -> KvLayout {
        KvLayout { n_layers: self.n_layers, n_kv_heads: self.n_kv_heads, head_dim: self.head_dim, block_tokens }
    }
}

pub(crate) struct Layer<B: Backend> {
    pub(crate) attn_norm: B::Vector,
    pub(crate) wq: B::Matrix,
    pub(crate) wk: B::Matrix,
    pub(crate) wv: B::Matrix,
    pub(crate) wo: B::Matrix,
    pub(crate) ffn_norm: B::Vector,
    pub(crate) gate: B::Matrix,
    pub(crate) up: B::Matrix,
    pub(crate) down: B::Matrix,
}

impl<B: Backend> Layer<B> {
    /// The linear weights in a fixed order: q, k, v, o, gate, up, down.
    pub(crate) fn matrices(&self) -> [&B::Matrix; 7] {
        [&self.wq, &self.wk, &self.wv, &self.wo, &self.gate, &self.up, &self.down]
    }

    pub(crate) fn matrices_mut(&mut self) -> [&mut B::Matrix; 7] {
        [&mut self.wq, &mut self.wk, &mut self.wv, &mut self.wo, &mut self.gate, &mut self.up, &mut self.down]
    }
}

/// One sequence's part of a batched forward step: the tokens to append to `seq`.
pub struct BatchEntry<'a> {
    pub seq: &'a mut SeqKv,
    pub tokens: &'a [u32],
}

/// Which positions' logits a forward call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (scoring, tests).
    All,
}

/// Reusable activation buffers: a forward pass allocates only when a batch is larger than any before.
pub struct Workspace<B: Backend> {
    pub(crate) x: B::Activations,
    pub(crate) h: B::Activations,
    pub(crate) q: B::Activations,
    pub(crate) k: B::Activations,
    pub(crate) v: B::Activations,
    pub(crate) attn: B::Activations,
    pub(crate) proj: B::Activations,
    pub(crate) gate: B::Activations,
    pub(crate) up: B::Activations,
    pub(crate) act: B::Activations,
    last: B::Activations,
    logits: B::Activations,
    pub(crate) rope: RopeTable,
}

pub struct Llama<B: Backend> {
    pub backend: B,
    pub config: LlamaConfig,
    pub(crate) tok_embd: B::Matrix,
    /// `None`: tied to the embedding (SmolLM2).
    pub(crate) output: Option<B::Matrix>,
    pub(crate) output_norm: B::Vector,
    pub(crate) layers: Vec<Layer<B>>,
}

impl<B: Backend> Llama<B> {
    /// The model of a GGUF file, its matrices viewed in place in the file's memory map.
    pub fn load(backend: B, file: Arc<GgufFile>) -> Result<Self> {
        let config = LlamaConfig::from_gguf(&file)?;
        Self::from_weights(backend, config, &GgufWeights(file))
    }

    /// Builds the model from `source`'s tensors (GGUF names and layout, see [`WeightSource`]), checking every
    /// shape against `c`. A source without `output.weight` has tied embeddings.
    pub fn from_weights(backend: B, c: LlamaConfig, source: &dyn WeightSource) -> Result<Self> {
        let kv_width = c.n_kv_heads * c.head_dim;
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<B::Matrix> {
            let w = source.require(name)?;
            let expected = [cols as u64, rows as u64];
            if w.dims != expected {
                return Err(w.shape_error(&expected));
            }
            backend.upload_weight(&w)
        };
        let vector = |name: &str| -> Result<B::Vector> {
            let w = source.require(name)?;
            let expected = [c.d_model as u64];
            if w.dims != expected {
                return Err(w.shape_error(&expected));
            }
            let mut v = vec![0.0; c.d_model];
            dequantize_row_reference(w.ggml_type, w.data(), &mut v)?;
            backend.upload_vector(&v)
        };
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let p = |s: &str| format!("blk.{l}.{s}.weight");
            layers.push(Layer {
                attn_norm: vector(&p("attn_norm"))?,
                wq: matrix(&p("attn_q"), c.n_heads * c.head_dim, c.d_model)?,
                wk: matrix(&p("attn_k"), kv_width, c.d_model)?,
                wv: matrix(&p("attn_v"), kv_width, c.d_model)?,
                wo: matrix(&p("attn_output"), c.d_model, c.n_heads * c.head_dim)?,
                ffn_norm: vector(&p("ffn_norm"))?,
                gate: matrix(&p("ffn_gate"), c.d_ff, c.d_model)?,
                up: matrix(&p("ffn_up"), c.d_ff, c.d_model)?,
                down: matrix(&p("ffn_down"), c.d_model, c.d_ff)?,
            });
        }
        let tok_embd = matrix("token_embd.weight", c.vocab, c.d_model)?;
        let output = match source.tensor("output.weight")? {
            Some(_) => Some(matrix("output.weight", c.vocab, c.d_model)?),
            None => None,
        };
        let output_norm = vector("output_norm.weight")?;
        Ok(Self { backend, config: c, tok_embd, output, output_norm, layers })
    }

    pub fn new_workspace(&self) -> Workspace<B> {
        let a = || self.backend.new_activations();
        Workspace {
            x: a(),
            h: a(),
            q: a(),
            k: a(),
            v: a(),
            attn: a(),
            proj: a(),
            gate: a(),
            up: a(),
            act: a(),
            last: a(),
            logits: a(),
            rope: RopeTable::default(),
        }
    }

    /// Appends `tokens` to the sequence `seq` (prefill when it is empty, decode for one token), storing their
    /// keys and values in `kv`, and writes the requested logits (`[n, vocab]` row-major) to `logits_out`.
    pub fn forward(
        &self,
        ws: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        seq: &mut SeqKv,
        tokens: &[u32],
        which: Logits,
        logits_out: &mut Vec<f32>,
    ) -> Result<()> {
        self.forward_batch(ws, kv, &mut [BatchEntry { seq, tokens }], which, logits_out)
    }

    /// One step of continuous batching: appends each entry's tokens to its sequence in a single forward pass
    /// (the sequences may be at different positions: some prefilling, others decoding one token). Logits are
    /// written in entry order: with `Logits::Last` one row per entry (its last token), with `Logits::All` one
    /// row per token. Every entry is checked (context, KV blocks) before any work, so on error no sequence
    /// has advanced; blocks already reserved for an entry stay with it and are reused by its next step.
    pub fn forward_batch(
        &self,
        ws: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        batch: &mut [BatchEntry<'_>],
        which: Logits,
        logits_out: &mut Vec<f32>,
    ) -> Result<()> {
        self.backend.run_pass(|| self.forward_pass(ws, kv, batch, which, logits_out))
    }

    fn forward_pass(
        &self,
        ws: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        batch: &mut [BatchEntry<'_>],
        which: Logits,
        logits_out: &mut Vec<f32>,
    ) -> Result<()> {
        let (c, be) = (&self.config, &self.backend);
        if batch.is_empty() || batch.iter().any(|e| e.tokens.is_empty()) {
            return Err(EngineError::InvalidRequest("forward needs at least one token per sequence".into()));
        }
        if kv.layout != c.kv_layout(kv.layout.block_tokens) {
            return Err(EngineError::InvalidRequest("KV cache layout does not match the model".into()));
        }
        for e in batch.iter() {
            let end = e.seq.len + e.tokens.len();
            if end > c.context {
                return Err(EngineError::ContextOverflow { requested: end, max: c.context });
            }
        }
        for e in batch.iter_mut() {
            let end = e.seq.len + e.tokens.len();
            kv.reserve(e.seq, end)?;
        }
        let tokens: Vec<u32> = batch.iter().flat_map(|e| e.tokens.iter().copied()).collect();
        let n = tokens.len();
        let mut spans = Vec::with_capacity(batch.len());
        let mut last_rows = Vec::with_capacity(batch.len());
        let mut row0 = 0;
        for e in batch.iter() {
            spans.push(SeqSpan {
                row0,
                n_tokens: e.tokens.len(),
                start_pos: e.seq.len,
                block_table: &e.seq.block_table,
            });
            row0 += e.tokens.len();
            last_rows.push(row0 - 1);
        }
        ws.rope.fill(batch.iter().flat_map(|e| e.seq.len..e.seq.len + e.tokens.len()), c.head_dim, c.rope_base);

        be.embed(&self.tok_embd, &tokens, &mut ws.x)?;
        for (l, layer) in self.layers.iter().enumerate() {
            be.rms_norm(&ws.x, &layer.attn_norm, c.rms_eps, &mut ws.h)?;
            be.matmul_many(&[&layer.wq, &layer.wk, &layer.wv], &ws.h, &mut [&mut ws.q, &mut ws.k, &mut ws.v])?;
            be.rope(&mut ws.q, c.head_dim, &ws.rope)?;
            be.rope(&mut ws.k, c.head_dim, &ws.rope)?;
            be.kv_write(&mut kv.storage, l, &ws.k, &ws.v, &spans)?;
            be.attention(&ws.q, &kv.storage, l, &spans, &mut ws.attn)?;
            be.matmul(&layer.wo, &ws.attn, &mut ws.proj)?;
            be.add_assign(&mut ws.x, &ws.proj)?;

            be.rms_norm(&ws.x, &layer.ffn_norm, c.rms_eps, &mut ws.h)?;
            be.matmul_many(&[&layer.gate, &layer.up], &ws.h, &mut [&mut ws.gate, &mut ws.up])?;
            be.swiglu(&ws.gate, &ws.up, &mut ws.act)?;
            be.matmul(&layer.down, &ws.act, &mut ws.proj)?;
            be.add_assign(&mut ws.x, &ws.proj)?;
        }
        drop(spans);
        for e in batch.iter_mut() {
            e.seq.len += e.tokens.len();
        }

        let final_in = match which {
            Logits::All => &ws.x,
            // Decode steps (one token per sequence): every row is a last row.
            Logits::Last if n == batch.len() => &ws.x,
            Logits::Last => {
                be.gather_rows(&ws.x, &last_rows, &mut ws.last)?;
                &ws.last
            }
        };
        be.rms_norm(final_in, &self.output_norm, c.rms_eps, &mut ws.h)?;
        be.matmul(self.output.as_ref().unwrap_or(&self.tok_embd), &ws.h, &mut ws.logits)?;
        be.to_host(&ws.logits, logits_out)
    }
}

//! The `Backend` abstraction: the operations of a llama forward pass over device-resident weights, activations
//! and a block KV cache. The model code (`model.rs`) is written once against this trait; the CPU backend
//! (`cpu/`) always exists, and a CUDA backend will implement the same trait behind a feature.
//!
//! Shapes: activations are row-major `[rows, cols]` f32, one row per token. A batch may hold tokens of several
//! sequences: `SeqSpan`s list, in row order, which rows belong to which sequence and at which positions, so
//! continuous batching needs no change to the trait.

use std::sync::Arc;

use crate::error::Result;
use crate::gguf::{GgufFile, TensorInfo};
use crate::weights::WeightTensor;

/// Geometry of the paged KV cache: every block holds `block_tokens` consecutive positions of one sequence for
/// all layers, K and V. The run of `(layer, kind, kv_head)` (kind 0 = K, 1 = V) starts at
/// `((layer * 2 + kind) * n_kv_heads + kv_head) * block_tokens * head_dim`,
/// so one head's keys (values) within a block are contiguous. Within that run, V is `[slot][d]` but K is
/// stored transposed, `[d][slot]` (element `d * block_tokens + slot`): attention then computes a block's
/// scores as one vector over slots instead of one horizontal reduction per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub block_tokens: usize,
}

impl KvLayout {
    pub fn block_elems(&self) -> usize {
        self.n_layers * 2 * self.n_kv_heads * self.block_tokens * self.head_dim
    }

    /// Offset inside a block of `(layer, kind, head)`'s first slot; kind 0 = K, 1 = V.
    pub fn head_offset(&self, layer: usize, kind: usize, kv_head: usize) -> usize {
        ((layer * 2 + kind) * self.n_kv_heads + kv_head) * self.block_tokens * self.head_dim
    }
}

/// Rows `[row0, row0 + n_tokens)` of a batch are the tokens at positions `[start_pos, start_pos + n_tokens)` of
/// one sequence whose KV blocks are `block_table` (block i holds positions `i*block_tokens ..`).
#[derive(Debug, Clone, Copy)]
pub struct SeqSpan<'a> {
    pub row0: usize,
    pub n_tokens: usize,
    pub start_pos: usize,
    pub block_table: &'a [u32],
}

/// Rotary embedding angles for the batch rows: `cos[row * half + i]`, `sin[..]` for pair `i` of a head,
/// computed on the host in f64 (so long contexts keep their precision) and shared by all layers.
#[derive(Debug, Clone, Default)]
pub struct RopeTable {
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTable {
    /// Angles for `positions` with GGUF's NORM layout: pair i = elements (2i, 2i+1), frequency base^(-2i/d).
    pub fn fill(&mut self, positions: impl Iterator<Item = usize>, head_dim: usize, base: f64) {
        self.half = head_dim / 2;
        self.cos.clear();
        self.sin.clear();
        for p in positions {
            for i in 0..self.half {
                let inv_freq = base.powf(-((2 * i) as f64) / head_dim as f64);
                let (s, c) = (p as f64 * inv_freq).sin_cos();
                self.cos.push(c as f32);
                self.sin.push(s as f32);
            }
        }
    }
}

pub trait Backend: Send + Sync {
    /// A weight matrix `[rows, cols]` in its storage format (`out = x · Wᵀ`).
    type Matrix: Send + Sync;
    /// An f32 vector (norm weights).
    type Vector: Send + Sync;
    /// Row-major f32 activations on the device.
    type Activations: Send;
    /// Storage for KV blocks.
    type KvStorage: Send;

    fn name(&self) -> String;

    /// Runs one forward pass. A backend whose operations fan out to a pool of worker threads runs the whole
    /// pass on one of them, so that each operation forks locally (the pool's idle thread steals the other
    /// half) instead of being handed to the pool by an outside thread that then sleeps until it is done: on
    /// two cores that hand-off and wake-up, a couple of hundred times per token, cost more than the work.
    fn run_pass<R: Send>(&self, pass: impl FnOnce() -> R + Send) -> R {
        pass()
    }

    /// Makes a weight tensor usable as a matrix; the CPU backend keeps it where it is (the model file's memory
    /// map), a GPU backend copies.
    fn upload_weight(&self, w: &WeightTensor) -> Result<Self::Matrix>;
    /// [`upload_weight`](Self::upload_weight) of a GGUF tensor.
    fn upload_matrix(&self, file: &Arc<GgufFile>, info: &TensorInfo) -> Result<Self::Matrix> {
        self.upload_weight(&WeightTensor::from_gguf(file, info))
    }
    /// Makes a weight matrix quantized at load (a precision tier) usable as a matrix.
    fn upload_packed(&self, m: crate::packed::PackedMatrix) -> Result<Self::Matrix>;
    /// Bytes of weight data a matrix reads per full pass (its storage, scales included).
    fn matrix_storage_bytes(&self, m: &Self::Matrix) -> usize;
    fn upload_vector(&self, values: &[f32]) -> Result<Self::Vector>;
    fn matrix_shape(&self, m: &Self::Matrix) -> (usize, usize);

    fn new_activations(&self) -> Self::Activations;
    /// Reshapes `a` to `[rows, cols]` reusing its allocation where possible; contents are unspecified.
    fn resize(&self, a: &mut Self::Activations, rows: usize, cols: usize) -> Result<()>;
    fn shape(&self, a: &Self::Activations) -> (usize, usize);
    fn to_host(&self, a: &Self::Activations, out: &mut Vec<f32>) -> Result<()>;
    /// `dst = src[rows]` (e.g. the last token of each sequence, for logits).
    fn gather_rows(&self, src: &Self::Activations, rows: &[usize], dst: &mut Self::Activations) -> Result<()>;

    /// `out[i] = table[ids[i]]` (embedding lookup, dequantized).
    fn embed(&self, table: &Self::Matrix, ids: &[u32], out: &mut Self::Activations) -> Result<()>;
    /// `out = x · Wᵀ`: `[n, cols] -> [n, rows]`.
    fn matmul(&self, w: &Self::Matrix, x: &Self::Activations, out: &mut Self::Activations) -> Result<()>;
    /// `outs[i] = x · ws[i]ᵀ` for matrices sharing one input (Q/K/V, gate/up). Backends where launching work
    /// costs more than it does at one token (thread wake-ups, kernel launches) do it in one go.
    fn matmul_many(
        &self,
        ws: &[&Self::Matrix],
        x: &Self::Activations,
        outs: &mut [&mut Self::Activations],
    ) -> Result<()> {
        if ws.len() != outs.len() {
            return Err(crate::EngineError::InvalidRequest("matmul_many: one output per matrix".into()));
        }
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            self.matmul(w, x, out)?;
        }
        Ok(())
    }
    /// `out = x / rms(x) * weight` per row.
    fn rms_norm(&self, x: &Self::Activations, w: &Self::Vector, eps: f32, out: &mut Self::Activations) -> Result<()>;
    /// Rotates every head (`cols / head_dim` of them) of every row by the table's angles for that row.
    fn rope(&self, x: &mut Self::Activations, head_dim: usize, table: &RopeTable) -> Result<()>;
    /// `out = silu(gate) * up`.
    fn swiglu(&self, gate: &Self::Activations, up: &Self::Activations, out: &mut Self::Activations) -> Result<()>;
    /// `x += y`.
    fn add_assign(&self, x: &mut Self::Activations, y: &Self::Activations) -> Result<()>;

    fn new_kv_storage(
        &self,
        layout: KvLayout,
        dtype: crate::kv_cache::KvDtype,
        n_blocks: usize,
    ) -> Result<Self::KvStorage>;
    /// Stores the rows of `k` and `v` (`[n, n_kv_heads * head_dim]`) of layer `layer` at their sequences' slots.
    fn kv_write(
        &self,
        kv: &mut Self::KvStorage,
        layer: usize,
        k: &Self::Activations,
        v: &Self::Activations,
        spans: &[SeqSpan<'_>],
    ) -> Result<()>;
    /// Causal grouped-query attention of `q` (`[n, n_heads * head_dim]`) over each row's sequence up to and
    /// including its own position, reading K/V of `layer` from the cache. Softmax scale is 1/sqrt(head_dim).
    /// Each span's sequence must end at the span's last row (attention right after `kv_write` of the same
    /// spans, as the model runs): an int4 KIVI cache's layout depends on the sequence's length.
    fn attention(
        &self,
        q: &Self::Activations,
        kv: &Self::KvStorage,
        layer: usize,
        spans: &[SeqSpan<'_>],
        out: &mut Self::Activations,
    ) -> Result<()>;
}

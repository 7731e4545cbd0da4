//! Weight tensors independent of the file they come from, so the model is built by one function
//! (`Llama::from_weights`) whether its tensors live in a GGUF file or a Hugging Face safetensors checkpoint.
//!
//! A [`WeightTensor`] is named, typed and shaped the GGUF way (`dims[0]` is the contiguous dimension) and views
//! a validated byte range of a [`WeightBytes`] owner: a memory-mapped model file (no copy), or an owned buffer
//! for tensors that had to be rearranged at load (HF q/k projections, permuted into the GGUF RoPE layout).
//! A [`WeightSource`] answers "the tensor GGUF calls `blk.3.attn_q.weight`" for its format.

use std::sync::Arc;

use crate::dtype::GgmlType;
use crate::error::{EngineError, Result};
use crate::gguf::{GgufFile, TensorInfo};

/// Bytes holding model weights: a memory-mapped model file or an owned buffer.
pub trait WeightBytes: Send + Sync {
    fn bytes(&self) -> &[u8];
}

impl WeightBytes for GgufFile {
    fn bytes(&self) -> &[u8] {
        GgufFile::bytes(self)
    }
}

impl WeightBytes for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// How the source file orders a tensor's dimensions, for error messages in the file's own terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DimOrder {
    /// GGUF: innermost (contiguous) dimension first.
    Gguf,
    /// Row-major, outermost first (safetensors / PyTorch).
    RowMajor,
}

/// One weight tensor: GGUF-style type and dims over a byte range that is in bounds and exactly the size the
/// type and dims need (checked by [`WeightTensor::new`]).
#[derive(Clone)]
pub struct WeightTensor {
    /// The tensor's name in its own file (`blk.0.attn_q.weight`, `model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    pub ggml_type: GgmlType,
    /// GGUF order: `dims[0]` is the contiguous dimension, so a matrix is `[cols, rows]`.
    pub dims: Vec<u64>,
    /// The order the source file writes dims in (errors quote shapes that way).
    pub source_order: DimOrder,
    store: Arc<dyn WeightBytes>,
    start: usize,
    len: usize,
}

impl std::fmt::Debug for WeightTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightTensor")
            .field("name", &self.name)
            .field("type", &self.ggml_type.name())
            .field("dims", &self.dims)
            .field("bytes", &self.len)
            .finish()
    }
}

impl WeightTensor {
    /// A tensor over `store[start..start + len]`; refuses a range outside `store` or a length that does not
    /// match `ty` and `dims`.
    pub fn new(
        name: String,
        ggml_type: GgmlType,
        dims: Vec<u64>,
        source_order: DimOrder,
        store: Arc<dyn WeightBytes>,
        start: usize,
        len: usize,
    ) -> Result<Self> {
        let bad = |reason: String| EngineError::UnsupportedModel(format!("tensor {name:?}: {reason}"));
        let expected = match dims.split_first() {
            None => None,
            Some((&row, rest)) => {
                ggml_type.row_bytes(row).and_then(|r| rest.iter().try_fold(r, |acc, &d| acc.checked_mul(d)))
            }
        };
        if expected != Some(len as u64) {
            return Err(bad(format!("{len} bytes do not hold {} {:?}", ggml_type.name(), dims)));
        }
        if start.checked_add(len).is_none_or(|end| end > store.bytes().len()) {
            return Err(bad(format!("bytes {start}..+{len} lie outside the {}-byte store", store.bytes().len())));
        }
        Ok(Self { name, ggml_type, dims, source_order, store, start, len })
    }

    /// A GGUF tensor, viewed in place in the file's memory map.
    pub fn from_gguf(file: &Arc<GgufFile>, info: &TensorInfo) -> Self {
        // Validated when the file was opened: in range, and `len` is what the type and dims need.
        Self {
            name: info.name.clone(),
            ggml_type: info.ggml_type,
            dims: info.dims.clone(),
            source_order: DimOrder::Gguf,
            store: Arc::clone(file) as Arc<dyn WeightBytes>,
            start: info.start as usize,
            len: info.len as usize,
        }
    }

    pub fn data(&self) -> &[u8] {
        &self.store.bytes()[self.start..self.start + self.len]
    }

    /// The owner of the bytes and the tensor's range in it (backends that keep weights where they are).
    pub fn store(&self) -> (&Arc<dyn WeightBytes>, usize, usize) {
        (&self.store, self.start, self.len)
    }

    /// A shape mismatch against `expected` (GGUF order), quoting both shapes in the source file's order.
    pub fn shape_error(&self, expected: &[u64]) -> EngineError {
        let order = |d: &[u64]| match self.source_order {
            DimOrder::Gguf => d.to_vec(),
            DimOrder::RowMajor => d.iter().rev().copied().collect(),
        };
        EngineError::ShapeMismatch { name: self.name.clone(), expected: order(expected), found: order(&self.dims) }
    }
}

/// Where the model builder gets its tensors. Names are GGUF's (`token_embd.weight`, `blk.N.attn_q.weight`,
/// `output.weight`, ...), and q/k projections must be in GGUF's RoPE layout (rotation pairs adjacent).
pub trait WeightSource {
    /// The tensor GGUF calls `gguf_name`; `Ok(None)` when the checkpoint does not have it (e.g. `output.weight`
    /// of a model with tied embeddings).
    fn tensor(&self, gguf_name: &str) -> Result<Option<WeightTensor>>;

    /// The error for a required tensor that [`tensor`](Self::tensor) did not find.
    fn missing(&self, gguf_name: &str) -> EngineError;

    fn require(&self, gguf_name: &str) -> Result<WeightTensor> {
        self.tensor(gguf_name)?.ok_or_else(|| self.missing(gguf_name))
    }
}

/// A GGUF file as a weight source: names and layout are already the model's.
pub struct GgufWeights(pub Arc<GgufFile>);

impl WeightSource for GgufWeights {
    fn tensor(&self, gguf_name: &str) -> Result<Option<WeightTensor>> {
        Ok(self.0.tensor(gguf_name).map(|info| WeightTensor::from_gguf(&self.0, info)))
    }

    fn missing(&self, gguf_name: &str) -> EngineError {
        EngineError::MissingTensor { name: gguf_name.to_string(), location: "the GGUF file".to_string() }
    }
}

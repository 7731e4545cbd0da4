//! Quantfleet's inference engine: loads GGUF models, tokenizes with the model's own vocabulary, runs the llama
//! forward pass with a block KV cache through a `Backend` (CPU now, CUDA later), and samples or scores tokens.

pub mod dtype;
pub mod error;
pub mod gguf;

pub use error::{EngineError, GgufError, Result};

//! Quantfleet's inference engine: loads GGUF models, tokenizes with the model's own vocabulary, runs the llama
//! forward pass with a block KV cache through a `Backend` (CPU now, CUDA later), and samples or scores tokens.

pub mod chat;
pub mod dtype;
pub mod error;
pub mod gguf;
pub mod tokenizer;

pub use error::{EngineError, GgufError, Result};

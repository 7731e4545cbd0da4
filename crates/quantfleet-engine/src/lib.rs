//! Quantfleet's inference engine: loads GGUF models, tokenizes with the model's own vocabulary, runs the llama
//! forward pass with a block KV cache through a `Backend` (CPU, or CUDA in `cuda`), and samples or scores tokens.

pub mod backend;
pub mod chat;
pub mod cpu;
pub mod cuda;
pub mod dtype;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod kv_cache;
pub mod model;
pub mod packed;
pub mod quality;
pub mod sampler;
pub mod tier;
pub mod tokenizer;

pub use engine::{Engine, FinishReason, GenerateRequest, GeneratedToken, Generation};
pub use error::{EngineError, GgufError, Result};
pub use model::{BatchEntry, Logits};

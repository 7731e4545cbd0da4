//! Quantfleet's inference engine: loads GGUF models or Hugging Face safetensors checkpoints, tokenizes with the
//! model's own vocabulary, runs the llama forward pass with a block KV cache through a `Backend` (CPU, or CUDA in
//! `cuda`), and samples or scores tokens.

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
pub mod safetensors;
pub mod sampler;
pub mod tier;
pub mod tokenizer;
pub mod weights;

pub use engine::{Engine, FinishReason, GenerateRequest, GeneratedToken, Generation};
pub use error::{EngineError, GgufError, Result, SafetensorsError};
pub use model::{BatchEntry, Logits};

//! Typed errors of the engine: every bad input (corrupt model file, unsupported tensor type, bad token id,
//! exhausted KV budget) surfaces as one of these, never as a panic.

use std::path::PathBuf;

/// Errors found while reading a GGUF file. Offsets are byte offsets into the file, for debugging corrupt files.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file: magic is {found:#010x}, expected 0x46554747 (\"GGUF\")")]
    BadMagic { found: u32 },
    #[error("unsupported GGUF version {0}: this engine reads versions 2 and 3")]
    UnsupportedVersion(u32),
    #[error("GGUF file truncated: needed {needed} bytes at offset {offset}, file has {len}")]
    Truncated { offset: u64, needed: u64, len: u64 },
    #[error("GGUF metadata value type {0} is unknown")]
    UnknownValueType(u32),
    #[error("GGUF string at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { offset: u64 },
    #[error("GGUF metadata arrays nest deeper than {0} levels")]
    NestingTooDeep(usize),
    #[error("GGUF declares {count} {what}, more than the file could hold")]
    ImplausibleCount { what: &'static str, count: u64 },
    #[error("duplicate GGUF {what} {name:?}")]
    Duplicate { what: &'static str, name: String },
    #[error("GGUF tensor {name:?} has unknown ggml type id {type_id}")]
    UnknownTensorType { name: String, type_id: u32 },
    #[error("GGUF tensor {name:?}: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("GGUF alignment {0} is not a power of two")]
    BadAlignment(u64),
    #[error("GGUF metadata key {key:?} is missing")]
    MissingKey { key: String },
    #[error("GGUF metadata key {key:?} has type {found}, expected {expected}")]
    WrongType { key: String, expected: &'static str, found: &'static str },
    #[error("sha256 mismatch for {path}: expected {expected}, computed {actual}")]
    ChecksumMismatch { path: PathBuf, expected: String, actual: String },
}

/// Errors found while reading a safetensors file or a sharded checkpoint's index. Offsets are relative to the
/// start of the data section (after the 8-byte length and the JSON header), as `data_offsets` are.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("safetensors file of {len} bytes is too short for its 8-byte header length")]
    TooShort { len: u64 },
    #[error("safetensors header length {header_len} does not fit: the file has {len} bytes after the length field")]
    HeaderLength { header_len: u64, len: u64 },
    #[error("safetensors header of {0} bytes exceeds the 100 MB limit")]
    HeaderTooLarge(u64),
    #[error("safetensors header is not valid UTF-8 (at byte {0} of the header)")]
    HeaderUtf8(usize),
    #[error("safetensors header is not valid JSON: {0}")]
    HeaderJson(String),
    #[error("safetensors header: {0}")]
    Header(String),
    #[error("safetensors tensor {name:?}: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("safetensors tensor {name:?} has dtype {dtype:?}, not one of F32, F16, BF16")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("safetensors data of tensor {name:?} ends at {end}, past the {data_len}-byte data section")]
    OutOfRange { name: String, end: u64, data_len: u64 },
    #[error("safetensors data of tensor {name:?} overlaps tensor {other:?}")]
    Overlap { name: String, other: String },
    #[error("safetensors data section has {len} bytes at offset {offset} that no tensor covers")]
    Hole { offset: u64, len: u64 },
    #[error("sha256 mismatch for {path}: expected {expected}, computed {actual}")]
    ChecksumMismatch { path: PathBuf, expected: String, actual: String },
    #[error("checkpoint index {path}: {reason}")]
    BadIndex { path: PathBuf, reason: String },
}

/// Errors of the engine above the file format: model structure, tokenizer, inference requests.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    /// A Hugging Face checkpoint directory's files (config.json, tokenizer files) are missing or malformed.
    #[error("model directory {dir}: {reason}")]
    BadCheckpoint { dir: PathBuf, reason: String },
    /// `location` names the file or directory searched.
    #[error("tensor {name:?} is missing from {location}")]
    MissingTensor { name: String, location: String },
    #[error("unsupported model: {0}")]
    UnsupportedModel(String),
    #[error("tensor {name:?} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { name: String, expected: Vec<u64>, found: Vec<u64> },
    #[error("tensor type {0} is not supported by this operation")]
    UnsupportedTensorType(&'static str),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("sequence of {requested} tokens exceeds the model context of {max}")]
    ContextOverflow { requested: usize, max: usize },
    #[error("KV cache budget exhausted: {needed_blocks} more blocks needed, {free_blocks} free of {total_blocks}")]
    KvBudgetExhausted { needed_blocks: usize, free_blocks: usize, total_blocks: usize },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A GPU device or driver call failed (the CUDA backend).
    #[error("device: {0}")]
    Device(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

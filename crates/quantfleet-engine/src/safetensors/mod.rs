//! safetensors files (Hugging Face's weight format) over a memory map, and Hugging Face checkpoint directories
//! (`hf`): a llama `config.json`, `model.safetensors` or a sharded `model.safetensors.index.json`, and
//! `tokenizer.json`.
//!
//! The format: an 8-byte little-endian header length N, N bytes of JSON
//! `{"NAME": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [begin, end]}, ..., "__metadata__": {..}}`,
//! then the data section; offsets are relative to its start. Everything is validated when the file is opened
//! (header length against the file, UTF-8, JSON structure, dtype names, that each tensor's byte size is its
//! element count times its dtype size, that tensors lie inside the data section and tile it without overlaps
//! or holes, as the format requires), so later code slices tensor data without further checks. A truncated or
//! corrupted file is a `SafetensorsError`, never a panic or an out-of-bounds read.

pub mod hf;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::dtype::GgmlType;
use crate::error::SafetensorsError;
use crate::weights::WeightBytes;

/// The format's own bound on the JSON header (the reference implementation refuses larger ones).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Element types of the format. The engine computes with F32, F16 and BF16 (what HF checkpoints of llama
/// models hold); the others are recognised so a file holding them still opens, and refused if used as weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    Bool,
    F8E4M3,
    F8E5M2,
}

impl Dtype {
    pub fn parse(s: &str) -> Option<Self> {
        use Dtype::*;
        Some(match s {
            "F64" => F64,
            "F32" => F32,
            "F16" => F16,
            "BF16" => BF16,
            "I64" => I64,
            "I32" => I32,
            "I16" => I16,
            "I8" => I8,
            "U64" => U64,
            "U32" => U32,
            "U16" => U16,
            "U8" => U8,
            "BOOL" => Bool,
            "F8_E4M3" => F8E4M3,
            "F8_E5M2" => F8E5M2,
            _ => return None,
        })
    }

    pub fn size(self) -> u64 {
        use Dtype::*;
        match self {
            F64 | I64 | U64 => 8,
            F32 | I32 | U32 => 4,
            F16 | BF16 | I16 | U16 => 2,
            I8 | U8 | Bool | F8E4M3 | F8E5M2 => 1,
        }
    }

    /// The ggml type with the same element encoding, for the types the engine computes with.
    pub fn ggml_type(self) -> Option<GgmlType> {
        match self {
            Dtype::F32 => Some(GgmlType::F32),
            Dtype::F16 => Some(GgmlType::F16),
            Dtype::BF16 => Some(GgmlType::BF16),
            _ => None,
        }
    }
}

/// One tensor of the header. `shape` is row-major (outermost first); `start`/`len` are absolute in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct StTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub start: u64,
    pub len: u64,
}

enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// An opened, validated safetensors file.
pub struct SafetensorsFile {
    storage: Storage,
    path: Option<PathBuf>,
    tensors: Vec<StTensor>,
    index: HashMap<String, usize>,
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("bytes", &self.storage.bytes().len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl WeightBytes for SafetensorsFile {
    fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }
}

impl SafetensorsFile {
    /// Memory-maps and validates the file at `path`.
    pub fn open(path: &Path) -> Result<Self, SafetensorsError> {
        let io = |source| SafetensorsError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: read-only map, accessed only through bounds-checked slices (see `GgufFile::open` for the
        // one residual risk, another process truncating the file while it is mapped).
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let mut f = Self::parse(Storage::Mapped(map))?;
        f.path = Some(path.to_path_buf());
        Ok(f)
    }

    /// Parses and validates an in-memory safetensors image.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, SafetensorsError> {
        Self::parse(Storage::Owned(bytes))
    }

    fn parse(storage: Storage) -> Result<Self, SafetensorsError> {
        let bytes = storage.bytes();
        let file_len = bytes.len() as u64;
        let Some(len_bytes) = bytes.first_chunk::<8>() else {
            return Err(SafetensorsError::TooShort { len: file_len });
        };
        let header_len = u64::from_le_bytes(*len_bytes);
        if header_len > file_len - 8 {
            return Err(SafetensorsError::HeaderLength { header_len, len: file_len - 8 });
        }
        if header_len > MAX_HEADER_BYTES {
            return Err(SafetensorsError::HeaderTooLarge(header_len));
        }
        let data_start = 8 + header_len;
        let header = std::str::from_utf8(&bytes[8..data_start as usize])
            .map_err(|e| SafetensorsError::HeaderUtf8(e.valid_up_to()))?;
        let json: serde_json::Value =
            serde_json::from_str(header).map_err(|e| SafetensorsError::HeaderJson(e.to_string()))?;
        let serde_json::Value::Object(entries) = json else {
            return Err(SafetensorsError::Header("the header is not a JSON object".into()));
        };
        let data_len = file_len - data_start;

        let mut metadata = HashMap::new();
        let mut tensors = Vec::with_capacity(entries.len());
        for (name, entry) in entries {
            if name == "__metadata__" {
                let serde_json::Value::Object(m) = entry else {
                    return Err(SafetensorsError::Header("__metadata__ is not an object".into()));
                };
                for (k, v) in m {
                    let serde_json::Value::String(v) = v else {
                        return Err(SafetensorsError::Header(format!("__metadata__ value {k:?} is not a string")));
                    };
                    metadata.insert(k, v);
                }
                continue;
            }
            let (dtype, shape, begin, end) = parse_entry(&name, &entry)?;
            let elems = shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| bad_tensor(&name, format!("element count of {shape:?} overflows")))?;
            let needed = elems.checked_mul(dtype.size());
            if needed != Some(end - begin) {
                return Err(bad_tensor(
                    &name,
                    format!(
                        "data_offsets span {} bytes, but {dtype:?} {shape:?} needs {elems} x {}",
                        end - begin,
                        dtype.size()
                    ),
                ));
            }
            if end > data_len {
                return Err(SafetensorsError::OutOfRange { name, end, data_len });
            }
            tensors.push(StTensor { name, dtype, shape, start: data_start + begin, len: end - begin });
        }
        check_tiling(&tensors, data_start, data_len)?;
        // serde_json's object keys are unique, so the names are.
        let index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(Self { storage, path: None, tensors, index, metadata })
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// The file this was opened from (None for an in-memory image).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Tensors in header order.
    pub fn tensors(&self) -> &[StTensor] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&StTensor> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor's bytes; in range by construction (validated at open).
    pub fn tensor_data(&self, t: &StTensor) -> &[u8] {
        &self.bytes()[t.start as usize..(t.start + t.len) as usize]
    }

    /// The header's `__metadata__` (string to string).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }
}

fn bad_tensor(name: &str, reason: String) -> SafetensorsError {
    SafetensorsError::BadTensor { name: name.to_string(), reason }
}

/// `(dtype, shape, begin, end)` of one header entry, with `begin <= end`.
fn parse_entry(name: &str, entry: &serde_json::Value) -> Result<(Dtype, Vec<u64>, u64, u64), SafetensorsError> {
    let field = |key: &str| entry.get(key).ok_or_else(|| bad_tensor(name, format!("has no {key:?}")));
    let dtype_name = field("dtype")?.as_str().ok_or_else(|| bad_tensor(name, "dtype is not a string".into()))?;
    let dtype = Dtype::parse(dtype_name)
        .ok_or_else(|| bad_tensor(name, format!("dtype {dtype_name:?} is not a safetensors dtype")))?;
    let u64_list = |key: &str| -> Result<Vec<u64>, SafetensorsError> {
        field(key)?
            .as_array()
            .ok_or_else(|| bad_tensor(name, format!("{key} is not an array")))?
            .iter()
            .map(|v| v.as_u64().ok_or_else(|| bad_tensor(name, format!("{key} holds {v}, not an unsigned integer"))))
            .collect()
    };
    let shape = u64_list("shape")?;
    let offsets = u64_list("data_offsets")?;
    let &[begin, end] = offsets.as_slice() else {
        return Err(bad_tensor(name, format!("data_offsets {offsets:?} is not [begin, end]")));
    };
    if begin > end {
        return Err(bad_tensor(name, format!("data_offsets [{begin}, {end}] end before they begin")));
    }
    Ok((dtype, shape, begin, end))
}

/// Tensors must cover the data section exactly: no overlaps (two names for the same bytes) and no holes
/// (bytes no tensor accounts for), as the format specifies.
fn check_tiling(tensors: &[StTensor], data_start: u64, data_len: u64) -> Result<(), SafetensorsError> {
    let mut spans: Vec<&StTensor> = tensors.iter().collect();
    spans.sort_by_key(|t| (t.start, t.len));
    let mut pos = data_start;
    let mut prev: Option<&StTensor> = None;
    for t in spans {
        if t.start < pos {
            let other = prev.map_or_else(String::new, |p| p.name.clone());
            return Err(SafetensorsError::Overlap { name: t.name.clone(), other });
        }
        if t.start > pos {
            return Err(SafetensorsError::Hole { offset: pos - data_start, len: t.start - pos });
        }
        pos = t.start + t.len;
        if t.len > 0 {
            prev = Some(t);
        }
    }
    let end = data_start + data_len;
    if pos < end {
        return Err(SafetensorsError::Hole { offset: pos - data_start, len: end - pos });
    }
    Ok(())
}

//! GGUF (v2/v3) model files: header, metadata, tensor directory and tensor data over a memory map.
//!
//! Everything the file declares is validated when it is opened (counts, string lengths, tensor ranks and
//! dimensions, type ids, that each tensor's bytes lie inside the data section, are aligned and do not overlap),
//! so later code can slice tensor data without further checks.

mod reader;
mod value;

#[cfg(test)]
pub(crate) mod tests;

use std::collections::HashMap;
use std::path::Path;

use memmap2::Mmap;
use sha2::{Digest, Sha256};

pub use value::MetadataValue;

use crate::dtype::GgmlType;
use crate::error::GgufError;
use reader::Cursor;
use value::wrong_type;

const GGUF_MAGIC: u32 = 0x4655_4747; // "GGUF" read as a little-endian u32
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;

/// One entry of the tensor directory. `dims` are in GGUF order: `dims[0]` is the contiguous (row) dimension.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute byte range of the tensor data in the file.
    pub start: u64,
    pub len: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// The bytes of a model file: a read-only memory map of a real file, or an owned buffer (tests, small files).
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

/// An opened, validated GGUF file.
pub struct GgufFile {
    storage: Storage,
    pub version: u32,
    pub alignment: u64,
    metadata: HashMap<String, MetadataValue>,
    /// Metadata keys in file order (HashMap iteration order is random; listings should be stable).
    metadata_order: Vec<String>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("bytes", &self.storage.bytes().len())
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and validates the file at `path`.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and every access goes through bounds-checked slices. Another process
        // truncating the file while it is mapped could still fault (SIGBUS); model files are immutable
        // inputs, and copying 100+ MB into memory to rule that out would defeat the point of mapping.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(Storage::Mapped(map))
    }

    /// Like [`open`](Self::open), but first checks the file's sha256 (hex, any case).
    pub fn open_verified(path: &Path, expected_sha256: &str) -> Result<Self, GgufError> {
        let gguf = Self::open(path)?;
        let actual = sha256_hex(gguf.storage.bytes());
        if !actual.eq_ignore_ascii_case(expected_sha256.trim()) {
            return Err(GgufError::ChecksumMismatch {
                path: path.to_path_buf(),
                expected: expected_sha256.trim().to_ascii_lowercase(),
                actual,
            });
        }
        Ok(gguf)
    }

    /// Parses and validates an in-memory GGUF image.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(Storage::Owned(bytes))
    }

    fn parse(storage: Storage) -> Result<Self, GgufError> {
        let bytes = storage.bytes();
        let mut cur = Cursor::new(bytes);
        let magic = cur.u32()?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = cur.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        // A tensor info is at least name length + n_dims + type + offset = 24 bytes; a KV pair at least
        // key length + type + 1 = 13.
        let n_tensors = cur.count("tensors", 24)?;
        let n_kv = cur.count("metadata entries", 13)?;

        let mut metadata = HashMap::with_capacity(n_kv as usize);
        let mut metadata_order = Vec::with_capacity(n_kv as usize);
        for _ in 0..n_kv {
            let key = cur.string()?;
            let type_id = cur.u32()?;
            let value = cur.value(type_id, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(GgufError::Duplicate { what: "metadata key", name: key });
            }
            metadata_order.push(key);
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v.as_u64().ok_or_else(|| wrong_type("general.alignment", "unsigned integer", v))?,
        };
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(GgufError::BadAlignment(alignment));
        }

        let mut raw = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = cur.string()?;
            let n_dims = cur.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(bad_tensor(&name, format!("has {n_dims} dimensions, expected 1..={MAX_DIMS}")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(cur.u64()?);
            }
            let type_id = cur.u32()?;
            let ggml_type = GgmlType::from_id(type_id)
                .ok_or_else(|| GgufError::UnknownTensorType { name: name.clone(), type_id })?;
            let rel_offset = cur.u64()?;
            raw.push((name, dims, ggml_type, rel_offset));
        }

        let data_start = (cur.pos() as u64).next_multiple_of(alignment);
        let file_len = bytes.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut tensor_index = HashMap::with_capacity(raw.len());
        for (name, dims, ggml_type, rel_offset) in raw {
            let len = tensor_byte_len(&name, &dims, ggml_type)?;
            if rel_offset % alignment != 0 {
                return Err(bad_tensor(&name, format!("data offset {rel_offset} is not aligned to {alignment}")));
            }
            let start = data_start.checked_add(rel_offset);
            let end = start.and_then(|s| s.checked_add(len));
            let (Some(start), Some(end)) = (start, end) else {
                return Err(bad_tensor(&name, "data offset overflows".into()));
            };
            if end > file_len {
                return Err(GgufError::Truncated { offset: start, needed: len, len: file_len });
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::Duplicate { what: "tensor", name });
            }
            tensors.push(TensorInfo { name, dims, ggml_type, start, len });
        }
        check_no_overlap(&tensors)?;

        Ok(Self { storage, version, alignment, metadata, metadata_order, tensors, tensor_index })
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    pub fn metadata(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata.get(key)
    }

    /// Metadata keys in file order.
    pub fn metadata_keys(&self) -> impl Iterator<Item = &str> {
        self.metadata_order.iter().map(String::as_str)
    }

    fn require(&self, key: &str) -> Result<&MetadataValue, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::MissingKey { key: key.to_string() })
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| wrong_type(key, "string", v))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| wrong_type(key, "unsigned integer", v))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| wrong_type(key, "float", v))
    }

    pub fn get_array(&self, key: &str) -> Result<&[MetadataValue], GgufError> {
        let v = self.require(key)?;
        v.as_array().ok_or_else(|| wrong_type(key, "array", v))
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor's bytes; in range by construction (validated at open).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        &self.bytes()[info.start as usize..(info.start + info.len) as usize]
    }
}

fn bad_tensor(name: &str, reason: String) -> GgufError {
    GgufError::BadTensor { name: name.to_string(), reason }
}

fn tensor_byte_len(name: &str, dims: &[u64], ty: GgmlType) -> Result<u64, GgufError> {
    if dims.contains(&0) {
        return Err(bad_tensor(name, format!("has a zero dimension {dims:?}")));
    }
    let row = ty.row_bytes(dims[0]).ok_or_else(|| {
        bad_tensor(
            name,
            format!(
                "row of {} elements is not a whole number of {}-element {} blocks",
                dims[0],
                ty.block_elems(),
                ty.name()
            ),
        )
    })?;
    dims[1..]
        .iter()
        .try_fold(row, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad_tensor(name, format!("byte size of {dims:?} overflows")))
}

fn check_no_overlap(tensors: &[TensorInfo]) -> Result<(), GgufError> {
    let mut spans: Vec<&TensorInfo> = tensors.iter().collect();
    spans.sort_by_key(|t| t.start);
    for pair in spans.windows(2) {
        if pair[0].start + pair[0].len > pair[1].start {
            return Err(bad_tensor(&pair[1].name, format!("data overlaps tensor {:?}", pair[0].name)));
        }
    }
    Ok(())
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

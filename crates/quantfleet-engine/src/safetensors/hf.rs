//! Hugging Face llama checkpoints: a directory with `config.json` (`LlamaForCausalLM` / `model_type: llama`),
//! the weights in `model.safetensors` or sharded under `model.safetensors.index.json`, and `tokenizer.json`
//! (see `Tokenizer::from_hf_dir`).
//!
//! The checkpoint is a [`WeightSource`]: it answers for GGUF tensor names with the HF tensors
//! (`model.layers.N.self_attn.q_proj.weight` for `blk.N.attn_q.weight`, ...), viewed in place in the memory
//! map, so the model is built by the same `Llama::from_weights` as from a GGUF file. The one conversion is
//! RoPE's layout: HF rotates the two halves of each head (element i pairs with i + head_dim/2), the engine
//! (like llama.cpp, whose converter permutes q/k rows) rotates adjacent pairs (2i, 2i+1) with the same
//! frequency index i. Rotations pair q/k rows of a head's output, so permuting those rows of `q_proj` and
//! `k_proj` (row 2i + j of a head <- HF row j * head_dim/2 + i) gives the same attention scores; those two
//! matrices are the only ones copied.
//!
//! The set of tensor names is checked when the checkpoint is opened: a missing tensor, or one the llama
//! forward pass would silently ignore (biases, other architectures' weights), is an error naming it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::{SafetensorsFile, StTensor};
use crate::error::{EngineError, Result, SafetensorsError};
use crate::gguf::sha256_hex;
use crate::model::LlamaConfig;
use crate::weights::{DimOrder, WeightBytes, WeightSource, WeightTensor};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// An opened HF llama checkpoint: its configuration and validated weight files.
pub struct HfCheckpoint {
    pub dir: PathBuf,
    pub config: LlamaConfig,
    /// `tie_word_embeddings`: the output projection is the embedding (no `lm_head.weight` is used).
    pub tied_embeddings: bool,
    /// `bos_token_id` / `eos_token_id` of config.json (the tokenizer prefers tokenizer_config.json's).
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    shards: Vec<Arc<SafetensorsFile>>,
    /// Tensor name -> index into `shards`.
    weight_map: HashMap<String, usize>,
}

impl std::fmt::Debug for HfCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfCheckpoint")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .field("shards", &self.shards.len())
            .field("tensors", &self.weight_map.len())
            .finish()
    }
}

fn bad(dir: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::BadCheckpoint { dir: dir.to_path_buf(), reason: reason.into() }
}

fn read_json(dir: &Path, file: &str) -> Result<Value> {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).map_err(|e| bad(dir, format!("cannot read {file}: {e}")))?;
    serde_json::from_str(&text).map_err(|e| bad(dir, format!("{file} is not valid JSON: {e}")))
}

impl HfCheckpoint {
    /// Opens the checkpoint in `dir`. `sha256` (hex, any case) is checked against `model.safetensors`, or for
    /// a sharded checkpoint against the shards its index names, concatenated in byte order of their file
    /// names (what `cat model-*.safetensors | sha256sum` computes in the C locale).
    pub fn open(dir: &Path, sha256: Option<&str>) -> Result<Self> {
        if !dir.is_dir() {
            return Err(bad(dir, "is not a directory"));
        }
        let json = read_json(dir, CONFIG_FILE)?;
        let (config, tied_embeddings) = llama_config(&json).map_err(|r| bad(dir, format!("{CONFIG_FILE}: {r}")))?;
        let token_id = |k: &str| json.get(k).and_then(Value::as_u64).and_then(|v| u32::try_from(v).ok());
        let (bos_token_id, eos_token_id) = (token_id("bos_token_id"), token_id("eos_token_id"));

        let single = dir.join(WEIGHTS_FILE);
        let (shards, weight_map) = if single.is_file() {
            let file = SafetensorsFile::open(&single)?;
            if let Some(expected) = sha256 {
                verify_sha256(&single, &file, expected)?;
            }
            let map = file.tensors().iter().map(|t| (t.name.clone(), 0)).collect();
            (vec![Arc::new(file)], map)
        } else if dir.join(INDEX_FILE).is_file() {
            let (shards, map) = open_shards(dir)?;
            if let Some(expected) = sha256 {
                verify_shards_sha256(dir, &shards, expected)?;
            }
            (shards, map)
        } else {
            return Err(bad(dir, format!("has neither {WEIGHTS_FILE} nor {INDEX_FILE}")));
        };
        let ckpt =
            Self { dir: dir.to_path_buf(), config, tied_embeddings, bos_token_id, eos_token_id, shards, weight_map };
        ckpt.check_tensor_names()?;
        Ok(ckpt)
    }

    fn lookup(&self, hf_name: &str) -> Option<(&Arc<SafetensorsFile>, &StTensor)> {
        let shard = &self.shards[*self.weight_map.get(hf_name)?];
        shard.tensor(hf_name).map(|t| (shard, t))
    }

    fn location(&self, hf_name: &str) -> String {
        let file = self.weight_map.get(hf_name).and_then(|&i| self.shards[i].path());
        match file {
            Some(p) => p.display().to_string(),
            None => self.dir.display().to_string(),
        }
    }

    /// Every tensor the llama model needs is present, and nothing else is (apart from tensors known to be
    /// redundant: a tied `lm_head.weight`, rotary `inv_freq` buffers).
    fn check_tensor_names(&self) -> Result<()> {
        let c = &self.config;
        let mut expected: Vec<String> = vec!["model.embed_tokens.weight".into(), "model.norm.weight".into()];
        if !self.tied_embeddings {
            expected.push("lm_head.weight".into());
        }
        for l in 0..c.n_layers {
            for gguf in LAYER_TENSORS {
                expected.push(hf_name(&format!("blk.{l}.{gguf}.weight"), self.tied_embeddings).expect("layer tensor"));
            }
        }
        for name in &expected {
            if !self.weight_map.contains_key(name) {
                return Err(EngineError::MissingTensor {
                    name: name.clone(),
                    location: self.dir.display().to_string(),
                });
            }
        }
        let expected: HashSet<&str> = expected.iter().map(String::as_str).collect();
        let mut unexpected: Vec<&str> = self
            .weight_map
            .keys()
            .map(String::as_str)
            .filter(|n| !expected.contains(n) && *n != "lm_head.weight" && !n.ends_with(".rotary_emb.inv_freq"))
            .collect();
        unexpected.sort_unstable();
        if let Some(first) = unexpected.first() {
            return Err(EngineError::UnsupportedModel(format!(
                "{}: tensor {first:?} ({} unexpected in all) is not part of a llama model this engine runs \
                 (biases and other architectures' weights are not supported)",
                self.dir.display(),
                unexpected.len()
            )));
        }
        Ok(())
    }

    /// The checkpoint's tensor named `hf_name`, in GGUF dim order, viewed in its file.
    fn view(&self, hf_name: &str) -> Result<WeightTensor> {
        let (shard, t) = self.lookup(hf_name).ok_or_else(|| EngineError::MissingTensor {
            name: hf_name.to_string(),
            location: self.location(hf_name),
        })?;
        let ty = t.dtype.ggml_type().ok_or_else(|| SafetensorsError::UnsupportedDtype {
            name: hf_name.to_string(),
            dtype: format!("{:?}", t.dtype),
        })?;
        let dims: Vec<u64> = t.shape.iter().rev().copied().collect();
        let store = Arc::clone(shard) as Arc<dyn WeightBytes>;
        WeightTensor::new(hf_name.to_string(), ty, dims, DimOrder::RowMajor, store, t.start as usize, t.len as usize)
    }
}

/// The per-layer tensors, by GGUF name (without `blk.N.` and `.weight`).
const LAYER_TENSORS: [&str; 9] =
    ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"];

/// The HF name of a GGUF tensor name (`None`: the checkpoint has no such tensor, e.g. a tied output).
pub fn hf_name(gguf_name: &str, tied_embeddings: bool) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return (!tied_embeddings).then(|| "lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?.strip_suffix(".weight")?;
    let (layer, what) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match what {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.weight"))
}

impl WeightSource for HfCheckpoint {
    fn tensor(&self, gguf_name: &str) -> Result<Option<WeightTensor>> {
        let Some(name) = hf_name(gguf_name, self.tied_embeddings) else { return Ok(None) };
        if !self.weight_map.contains_key(&name) {
            return Ok(None);
        }
        let w = self.view(&name)?;
        let heads = if gguf_name.ends_with(".attn_q.weight") {
            self.config.n_heads
        } else if gguf_name.ends_with(".attn_k.weight") {
            self.config.n_kv_heads
        } else {
            return Ok(Some(w));
        };
        // A q/k matrix of the wrong shape is left as it is: the model builder's shape check reports it.
        if w.dims.len() != 2 || w.dims[1] != (heads * self.config.head_dim) as u64 {
            return Ok(Some(w));
        }
        let permuted = rotate_half_to_adjacent(w.data(), self.config.head_dim, w.data().len() / w.dims[1] as usize);
        let len = permuted.len();
        let (ty, dims) = (w.ggml_type, w.dims.clone());
        WeightTensor::new(name, ty, dims, DimOrder::RowMajor, Arc::new(permuted), 0, len).map(Some)
    }

    fn missing(&self, gguf_name: &str) -> EngineError {
        let name = hf_name(gguf_name, self.tied_embeddings).unwrap_or_else(|| gguf_name.to_string());
        EngineError::MissingTensor { location: self.location(&name), name }
    }
}

/// Reorders the rows of a q or k projection (`row_bytes` per row, heads of `head_dim` rows) from HF's
/// rotate-half layout to the adjacent-pair layout: within each head, row `2i + j` comes from row
/// `j * head_dim / 2 + i` (i < head_dim / 2, j in {0, 1}).
pub fn rotate_half_to_adjacent(data: &[u8], head_dim: usize, row_bytes: usize) -> Vec<u8> {
    let half = head_dim / 2;
    let mut out = vec![0u8; data.len()];
    for (r, dst) in out.chunks_exact_mut(row_bytes).enumerate() {
        let (head, g) = (r / head_dim, r % head_dim);
        let src = head * head_dim + (g % 2) * half + g / 2;
        dst.copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
    out
}

fn verify_sha256(path: &Path, file: &SafetensorsFile, expected: &str) -> Result<()> {
    check_digest(path, sha256_hex(file.bytes()), expected)
}

/// The sharded checkpoint's digest: its shards' bytes, one after the other in byte order of their file names.
fn verify_shards_sha256(dir: &Path, shards: &[Arc<SafetensorsFile>], expected: &str) -> Result<()> {
    use sha2::{Digest, Sha256};
    let mut named: Vec<(PathBuf, &SafetensorsFile)> = Vec::with_capacity(shards.len());
    for shard in shards {
        let path = shard.path().ok_or_else(|| bad(dir, "a shard was not opened from a file"))?;
        named.push((path.to_path_buf(), shard));
    }
    named.sort_by(|a, b| a.0.file_name().cmp(&b.0.file_name()));
    let mut hasher = Sha256::new();
    named.iter().for_each(|(_, shard)| hasher.update(shard.bytes()));
    check_digest(&dir.join(format!("{{{}}}", shard_list(&named))), crate::gguf::hex(&hasher.finalize()), expected)
}

fn shard_list(named: &[(PathBuf, &SafetensorsFile)]) -> String {
    named.iter().map(|(p, _)| p.file_name().unwrap_or_default().to_string_lossy()).collect::<Vec<_>>().join(",")
}

fn check_digest(path: &Path, actual: String, expected: &str) -> Result<()> {
    if !actual.eq_ignore_ascii_case(expected.trim()) {
        return Err(SafetensorsError::ChecksumMismatch {
            path: path.to_path_buf(),
            expected: expected.trim().to_ascii_lowercase(),
            actual,
        }
        .into());
    }
    Ok(())
}

/// Opened weight files, and which of them holds each tensor.
type Shards = (Vec<Arc<SafetensorsFile>>, HashMap<String, usize>);

/// Opens the shards `model.safetensors.index.json` names; every tensor of its `weight_map` must be in the
/// shard it names.
fn open_shards(dir: &Path) -> Result<Shards> {
    let index_path = dir.join(INDEX_FILE);
    let bad_index = |reason: String| SafetensorsError::BadIndex { path: index_path.clone(), reason };
    let json = read_json(dir, INDEX_FILE)?;
    let map =
        json.get("weight_map").and_then(Value::as_object).ok_or_else(|| bad_index("no weight_map object".into()))?;
    let mut shard_ids: HashMap<&str, usize> = HashMap::new();
    let mut shards = Vec::new();
    let mut weight_map = HashMap::with_capacity(map.len());
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| bad_index(format!("weight_map[{name:?}] is not a file name")))?;
        // Shards live beside the index: a path (separators, `..`) could reach outside the model directory.
        if file.is_empty() || file.contains(['/', '\\']) || file == "." || file == ".." {
            return Err(bad_index(format!("weight_map[{name:?}] = {file:?} is not a plain file name")).into());
        }
        let id = match shard_ids.get(file) {
            Some(&id) => id,
            None => {
                shards.push(Arc::new(SafetensorsFile::open(&dir.join(file))?));
                shard_ids.insert(file, shards.len() - 1);
                shards.len() - 1
            }
        };
        if shards[id].tensor(name).is_none() {
            return Err(bad_index(format!("tensor {name:?} is not in {file}, where weight_map puts it")).into());
        }
        weight_map.insert(name.clone(), id);
    }
    Ok((shards, weight_map))
}

/// The engine's configuration from a llama `config.json`, and whether the embeddings are tied. Optional keys
/// take `transformers`' `LlamaConfig` defaults.
pub fn llama_config(json: &Value) -> std::result::Result<(LlamaConfig, bool), String> {
    let archs: Vec<&str> = json
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let model_type = json.get("model_type").and_then(Value::as_str);
    if model_type != Some("llama") && !archs.contains(&"LlamaForCausalLM") {
        return Err(format!(
            "unsupported architecture (model_type {model_type:?}, architectures {archs:?}): supported is llama \
             (LlamaForCausalLM)"
        ));
    }
    let uint = |key: &str| -> std::result::Result<Option<usize>, String> {
        match json.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64().and_then(|v| usize::try_from(v).ok()) {
                Some(0) | None => Err(format!("{key} is {v}, expected a positive integer")),
                Some(n) => Ok(Some(n)),
            },
        }
    };
    let required = |key: &str| uint(key)?.ok_or_else(|| format!("{key} is missing"));
    let float = |key: &str, default: f64| -> std::result::Result<f64, String> {
        match json.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|f| f.is_finite() && *f > 0.0)
                .ok_or_else(|| format!("{key} is {v}, expected a positive number")),
        }
    };
    let flag = |key: &str, default: bool| -> std::result::Result<bool, String> {
        match json.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| format!("{key} is {v}, expected true or false")),
        }
    };

    let d_model = required("hidden_size")?;
    let n_heads = required("num_attention_heads")?;
    let n_kv_heads = uint("num_key_value_heads")?.unwrap_or(n_heads);
    if d_model % n_heads != 0 || n_heads % n_kv_heads != 0 {
        return Err(format!("{n_heads} attention heads / {n_kv_heads} KV heads for hidden_size {d_model}"));
    }
    let head_dim = d_model / n_heads;
    if let Some(hd) = uint("head_dim")?
        && hd != head_dim
    {
        return Err(format!(
            "head_dim {hd} differs from hidden_size / num_attention_heads = {head_dim} (not supported)"
        ));
    }
    if head_dim % 2 != 0 {
        return Err(format!("head dimension {head_dim} is odd"));
    }
    if let Some(act) = json.get("hidden_act").and_then(Value::as_str)
        && act != "silu"
    {
        return Err(format!("hidden_act {act:?} is not supported (silu)"));
    }
    if json.get("rope_scaling").is_some_and(|v| !v.is_null()) {
        return Err("rope_scaling is not supported".into());
    }
    for key in ["attention_bias", "mlp_bias"] {
        if flag(key, false)? {
            return Err(format!("{key} is not supported"));
        }
    }
    let config = LlamaConfig {
        n_layers: required("num_hidden_layers")?,
        d_model,
        d_ff: required("intermediate_size")?,
        n_heads,
        n_kv_heads,
        head_dim,
        rope_base: float("rope_theta", 10_000.0)?,
        rms_eps: float("rms_norm_eps", 1e-6)? as f32,
        context: required("max_position_embeddings")?,
        vocab: required("vocab_size")?,
    };
    Ok((config, flag("tie_word_embeddings", false)?))
}

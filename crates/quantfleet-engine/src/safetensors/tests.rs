//! Tests of the safetensors reader and the HF checkpoint loader on SYNTHETIC files built here: valid files,
//! then truncations and corruptions (each a typed error, never a panic); a tiny random llama written both as
//! GGUF (adjacent-pair RoPE layout) and as an HF checkpoint (rotate-half layout), which must give the same
//! logits. The real-model check is tests/safetensors_real.rs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::hf::{HfCheckpoint, rotate_half_to_adjacent};
use super::*;
use crate::cpu::CpuBackend;
use crate::engine::Engine;
use crate::error::EngineError;
use crate::gguf::GgufFile;
use crate::gguf::tests::SyntheticGguf;
use crate::kv_cache::{KvCache, SeqKv};
use crate::model::{Llama, LlamaConfig, Logits};
use crate::tokenizer::Tokenizer;

/// A synthetic safetensors image: tensors laid out back to back in the order given.
fn build(tensors: &[(&str, &str, &[u64], &[u8])], metadata: Option<&str>) -> Vec<u8> {
    let mut header = String::from("{");
    if let Some(m) = metadata {
        header += &format!("\"__metadata__\":{m},");
    }
    let mut offset = 0;
    let mut data = Vec::new();
    for (i, (name, dtype, shape, bytes)) in tensors.iter().enumerate() {
        let sep = if i + 1 == tensors.len() { "" } else { "," };
        let end = offset + bytes.len();
        header +=
            &format!("\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{offset},{end}]}}{sep}");
        offset = end;
        data.extend_from_slice(bytes);
    }
    header += "}";
    with_header(&header, &data)
}

fn with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Values in a safetensors dtype (F32, F16 or BF16), little-endian.
fn encode(values: &[f32], dtype: &str) -> Vec<u8> {
    match dtype {
        "F32" => f32_bytes(values),
        "F16" => values.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
        "BF16" => values.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        other => panic!("{other}"),
    }
}

fn valid_image() -> Vec<u8> {
    let a = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let b: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
    let c: Vec<u8> = [0.25f32, 8.0, -1.0].iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
    build(&[("a", "F32", &[2, 3], &a), ("b", "F16", &[2], &b), ("c", "BF16", &[3], &c)], Some("{\"format\":\"pt\"}"))
}

#[test]
fn parses_a_valid_file_with_f32_f16_bf16_and_metadata() {
    let f = SafetensorsFile::from_bytes(valid_image()).unwrap();
    assert_eq!(f.tensors().len(), 3);
    assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
    let a = f.tensor("a").unwrap();
    assert_eq!((a.dtype, a.shape.as_slice(), a.len), (Dtype::F32, &[2u64, 3][..], 24));
    assert_eq!(&f.tensor_data(a)[4..8], &2.0f32.to_le_bytes());
    let mut out = [0.0f32; 3];
    let c = f.tensor("c").unwrap();
    crate::dtype::dequantize_row_reference(c.dtype.ggml_type().unwrap(), f.tensor_data(c), &mut out).unwrap();
    assert_eq!(out, [0.25, 8.0, -1.0]);
    let mut out = [0.0f32; 2];
    let b = f.tensor("b").unwrap();
    crate::dtype::dequantize_row_reference(b.dtype.ggml_type().unwrap(), f.tensor_data(b), &mut out).unwrap();
    assert_eq!(out, [1.5, -2.0]);
    assert!(f.tensor("missing").is_none());
}

#[test]
fn header_padding_scalars_and_empty_tensors_are_accepted() {
    // The format allows trailing spaces in the header, rank-0 tensors (one element) and zero-size tensors.
    let header = r#"{"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"e":{"dtype":"F16","shape":[0,7],"data_offsets":[4,4]}}   "#;
    let f = SafetensorsFile::from_bytes(with_header(header, &1.0f32.to_le_bytes())).unwrap();
    assert_eq!(f.tensor("s").unwrap().len, 4);
    assert_eq!(f.tensor("e").unwrap().len, 0);
}

#[test]
fn truncated_or_overlong_headers_are_errors() {
    use SafetensorsError as E;
    for len in 0..8 {
        assert!(matches!(SafetensorsFile::from_bytes(vec![0; len]), Err(E::TooShort { .. })), "{len}");
    }
    // The header length points past the end of the file.
    let mut img = valid_image();
    let len = img.len() as u64;
    img[..8].copy_from_slice(&len.to_le_bytes());
    assert!(matches!(SafetensorsFile::from_bytes(img), Err(E::HeaderLength { .. })));
    let mut img = valid_image();
    img[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(SafetensorsFile::from_bytes(img), Err(E::HeaderLength { .. })));
    // Cutting the data short: the last tensor no longer fits.
    let img = valid_image();
    let cut = img[..img.len() - 1].to_vec();
    assert!(matches!(SafetensorsFile::from_bytes(cut), Err(E::OutOfRange { .. })), "truncated data");
}

#[test]
fn bad_header_contents_are_typed_errors() {
    use SafetensorsError as E;
    let four = 1.0f32.to_le_bytes();
    let parse = |header: &str| SafetensorsFile::from_bytes(with_header(header, &four));
    assert!(matches!(parse("{\"a\": "), Err(E::HeaderJson(_))));
    assert!(matches!(parse("[1, 2]"), Err(E::Header(_))));
    let mut img = with_header("{\"a\":1}", &four);
    img[10] = 0xff; // inside the header: not UTF-8
    assert!(matches!(SafetensorsFile::from_bytes(img), Err(E::HeaderUtf8(_))));
    assert!(matches!(parse(r#"{"__metadata__":[1]}"#), Err(E::Header(_))));
    assert!(matches!(parse(r#"{"__metadata__":{"k":3}}"#), Err(E::Header(_))));
    let cases = [
        r#"{"a":{"shape":[1],"data_offsets":[0,4]}}"#,
        r#"{"a":{"dtype":"F32","data_offsets":[0,4]}}"#,
        r#"{"a":{"dtype":"F32","shape":[1]}}"#,
        r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,4]}}"#,
        r#"{"a":{"dtype":7,"shape":[1],"data_offsets":[0,4]}}"#,
        r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#,
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
        // Element count times dtype size differs from the byte span.
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
        r#"{"a":{"dtype":"F16","shape":[1],"data_offsets":[0,4]}}"#,
        r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,4]}}"#,
        r#"{"a":"F32"}"#,
    ];
    for h in cases {
        assert!(matches!(parse(h), Err(E::BadTensor { .. })), "{h}: {:?}", parse(h));
    }
}

#[test]
fn offsets_out_of_range_overlapping_or_leaving_holes_are_errors() {
    use SafetensorsError as E;
    let eight = [0u8; 8];
    let parse = |header: &str| SafetensorsFile::from_bytes(with_header(header, &eight));
    let out = parse(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#);
    assert!(matches!(out, Err(E::OutOfRange { .. })), "{out:?}");
    let huge = parse(r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[18446744073709551610,18446744073709551614]}}"#);
    assert!(matches!(huge, Err(E::OutOfRange { .. })), "{huge:?}");
    let overlap = parse(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
    );
    assert!(matches!(overlap, Err(E::Overlap { .. })), "{overlap:?}");
    let same = parse(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
    );
    assert!(matches!(same, Err(E::Overlap { .. })), "{same:?}");
    let gap = parse(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#);
    assert!(matches!(gap, Err(E::Hole { offset: 0, len: 4 })), "{gap:?}");
    let tail = parse(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#);
    assert!(matches!(tail, Err(E::Hole { offset: 4, len: 4 })), "{tail:?}");
}

/// Deterministic xorshift for the fuzz loop and the random weights.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn weight(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

#[test]
fn random_truncations_and_byte_flips_never_panic() {
    let img = valid_image();
    let mut rng = Rng(0x5eed);
    for len in 0..img.len() {
        // Every proper prefix is malformed (the data section no longer holds the last tensor, or worse).
        assert!(SafetensorsFile::from_bytes(img[..len].to_vec()).is_err(), "prefix {len}");
    }
    let mut ok = 0;
    for _ in 0..3000 {
        let mut m = img.clone();
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(m.len());
            m[i] ^= 1 << rng.below(8);
        }
        // Flips in the data section keep the file valid; anything else must be an error, not a panic.
        if let Ok(f) = SafetensorsFile::from_bytes(m) {
            for t in f.tensors() {
                assert_eq!(f.tensor_data(t).len() as u64, t.shape.iter().product::<u64>() * t.dtype.size());
            }
            ok += 1;
        }
    }
    assert!(ok > 0 && ok < 3000, "{ok}");
}

#[test]
fn rotate_half_permutation_pairs_each_element_with_its_partner() {
    // One head of 6 rows, one byte per row: HF rows (0,3), (1,4), (2,5) rotate together and become
    // adjacent pairs (0,1), (2,3), (4,5); a second head is permuted the same way on its own rows.
    let rows: Vec<u8> = (0..12).collect();
    assert_eq!(rotate_half_to_adjacent(&rows, 6, 1), vec![0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]);
    let wide: Vec<u8> = (0..8).collect(); // 4 rows of 2 bytes, head_dim 4
    assert_eq!(rotate_half_to_adjacent(&wide, 4, 2), vec![0, 1, 4, 5, 2, 3, 6, 7]);
}

// ---- A tiny random llama as GGUF and as an HF checkpoint ----

const VOCAB: usize = 10;
const TOKENS: [&str; VOCAB] = ["a", "b", "c", "d", "e", "f", "g", "h", "<|im_start|>", "<|im_end|>"];

fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        n_layers: 2,
        d_model: 16,
        d_ff: 24,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 4,
        rope_base: 10_000.0,
        rms_eps: 1e-5,
        context: 64,
        vocab: VOCAB,
    }
}

/// A tensor of the tiny model: GGUF name, row-major shape `[rows, cols]` (or `[n]`), values in the HF layout.
struct Tensor {
    gguf: String,
    shape: Vec<u64>,
    values: Vec<f32>,
}

fn tiny_weights(tied: bool) -> Vec<Tensor> {
    let c = tiny_config();
    let mut rng = Rng(42);
    let mut t = |gguf: String, shape: Vec<u64>, norm: bool| {
        let n = shape.iter().product::<u64>() as usize;
        let values = (0..n).map(|_| if norm { 1.0 + rng.weight() * 0.2 } else { rng.weight() }).collect();
        Tensor { gguf, shape, values }
    };
    let (d, ff, kv) = (c.d_model as u64, c.d_ff as u64, (c.n_kv_heads * c.head_dim) as u64);
    let mut out = vec![t("token_embd.weight".into(), vec![VOCAB as u64, d], false)];
    for l in 0..c.n_layers {
        let p = |s: &str| format!("blk.{l}.{s}.weight");
        out.push(t(p("attn_norm"), vec![d], true));
        out.push(t(p("attn_q"), vec![d, d], false));
        out.push(t(p("attn_k"), vec![kv, d], false));
        out.push(t(p("attn_v"), vec![kv, d], false));
        out.push(t(p("attn_output"), vec![d, d], false));
        out.push(t(p("ffn_norm"), vec![d], true));
        out.push(t(p("ffn_gate"), vec![ff, d], false));
        out.push(t(p("ffn_up"), vec![ff, d], false));
        out.push(t(p("ffn_down"), vec![d, ff], false));
    }
    out.push(t("output_norm.weight".into(), vec![d], true));
    if !tied {
        out.push(t("output.weight".into(), vec![VOCAB as u64, d], false));
    }
    out
}

/// HF rotate-half rows of one q/k matrix -> the adjacent-pair rows GGUF stores, written as the inverse of
/// HF's layout: GGUF row `h * hd + 2i + j` holds HF row `h * hd + j * hd / 2 + i`.
fn to_gguf_layout(values: &[f32], cols: usize, head_dim: usize) -> Vec<f32> {
    let rows = values.len() / cols;
    let mut out = vec![0.0; values.len()];
    for h in 0..rows / head_dim {
        for i in 0..head_dim / 2 {
            for j in 0..2 {
                let (dst, src) = (h * head_dim + 2 * i + j, h * head_dim + j * head_dim / 2 + i);
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// The tiny model as GGUF with matrices in `dtype` (norms F32); `permute` converts q/k into GGUF's layout
/// (false: HF rows stored as they are).
fn tiny_gguf(weights: &[Tensor], permute: bool, dtype: &str) -> GgufFile {
    let c = tiny_config();
    let mut g = SyntheticGguf::new()
        .string("general.architecture", "llama")
        .u32("llama.block_count", c.n_layers as u32)
        .u32("llama.embedding_length", c.d_model as u32)
        .u32("llama.feed_forward_length", c.d_ff as u32)
        .u32("llama.attention.head_count", c.n_heads as u32)
        .u32("llama.attention.head_count_kv", c.n_kv_heads as u32)
        .f32("llama.rope.freq_base", c.rope_base as f32)
        .f32("llama.attention.layer_norm_rms_epsilon", c.rms_eps)
        .u32("llama.context_length", c.context as u32)
        .str_array("tokenizer.ggml.tokens", &TOKENS);
    for t in weights {
        let values = if permute && (t.gguf.contains("attn_q") || t.gguf.contains("attn_k")) {
            to_gguf_layout(&t.values, t.shape[1] as usize, c.head_dim)
        } else {
            t.values.clone()
        };
        let dims: Vec<u64> = t.shape.iter().rev().copied().collect();
        let (ty, name) = match (t.shape.len(), dtype) {
            (1, _) | (_, "F32") => (GgmlType::F32, "F32"),
            (_, "F16") => (GgmlType::F16, "F16"),
            _ => (GgmlType::BF16, "BF16"),
        };
        g = g.tensor(&t.gguf, &dims, ty, encode(&values, name));
    }
    GgufFile::from_bytes(g.build()).unwrap()
}

/// Unique scratch directory for one test (removed and recreated).
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("quantfleet-safetensors-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config_json(tied: bool) -> serde_json::Value {
    let c = tiny_config();
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.d_model,
        "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "rms_norm_eps": c.rms_eps,
        "rope_theta": c.rope_base,
        "max_position_embeddings": c.context,
        "vocab_size": VOCAB,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "rope_scaling": null,
        "eos_token_id": 9,
    })
}

/// Writes the tiny model as an HF checkpoint (matrices in `dtype`, norms F32, a WordLevel tokenizer.json over `TOKENS`,
/// tokenizer_config.json with EOS and a ChatML template); `shards` > 1 splits it under an index.
fn write_hf(dir: &Path, weights: &[Tensor], tied: bool, shards: usize, dtype: &str) {
    std::fs::write(dir.join("config.json"), config_json(tied).to_string()).unwrap();
    let hf = |t: &Tensor| super::hf::hf_name(&t.gguf, tied).unwrap();
    let per_shard = weights.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (s, chunk) in weights.chunks(per_shard).enumerate() {
        let names: Vec<String> = chunk.iter().map(hf).collect();
        let dtypes: Vec<&str> = chunk.iter().map(|t| if t.shape.len() == 1 { "F32" } else { dtype }).collect();
        let bytes: Vec<Vec<u8>> = chunk.iter().zip(&dtypes).map(|(t, d)| encode(&t.values, d)).collect();
        let list: Vec<(&str, &str, &[u64], &[u8])> = chunk
            .iter()
            .enumerate()
            .map(|(i, t)| (names[i].as_str(), dtypes[i], t.shape.as_slice(), bytes[i].as_slice()))
            .collect();
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", s + 1)
        };
        std::fs::write(dir.join(&file), build(&list, None)).unwrap();
        for n in names {
            weight_map.insert(n, file.clone().into());
        }
    }
    if shards > 1 {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
    let vocab: serde_json::Map<String, serde_json::Value> =
        TOKENS.iter().enumerate().map(|(i, t)| (t.to_string(), i.into())).collect();
    let added: Vec<serde_json::Value> = [8, 9]
        .iter()
        .map(|&id| {
            serde_json::json!({"id": id, "content": TOKENS[id], "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "a"},
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let template = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + \
                    '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    let tok_config = serde_json::json!({"bos_token": null, "eos_token": "<|im_end|>", "chat_template": template});
    std::fs::write(dir.join("tokenizer_config.json"), tok_config.to_string()).unwrap();
}

fn logits(m: &Llama<CpuBackend>, ids: &[u32]) -> Vec<f32> {
    let mut kv = KvCache::with_budget(&m.backend, m.config.kv_layout(16), 1 << 20).unwrap();
    let (mut ws, mut seq, mut out) = (m.new_workspace(), SeqKv::default(), Vec::new());
    m.forward(&mut ws, &mut kv, &mut seq, ids, Logits::All, &mut out).unwrap();
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn hf_checkpoint_gives_the_logits_of_the_same_weights_in_gguf() {
    let ids = [1u32, 5, 2, 7, 7, 0, 3, 9, 4];
    for (tied, shards, dtype) in
        [(true, 1, "F32"), (false, 1, "F32"), (true, 3, "F32"), (false, 2, "BF16"), (true, 1, "F16")]
    {
        let weights = tiny_weights(tied);
        let gguf = Llama::load(CpuBackend::new(), Arc::new(tiny_gguf(&weights, true, dtype))).unwrap();
        let dir = scratch(&format!("equiv-{tied}-{shards}-{dtype}"));
        write_hf(&dir, &weights, tied, shards, dtype);
        let ckpt = HfCheckpoint::open(&dir, None).unwrap();
        assert_eq!(ckpt.config, gguf.config);
        let hf = Llama::from_weights(CpuBackend::new(), ckpt.config.clone(), &ckpt).unwrap();
        assert_eq!(hf.output.is_none(), tied);
        let (a, b) = (logits(&gguf, &ids), logits(&hf, &ids));
        // Same f32 weights, same kernels: only the q/k row order differs, so the results are identical.
        assert_eq!(max_diff(&a, &b), 0.0, "tied {tied} shards {shards} {dtype}");
        // The same weights read as if already in the adjacent-pair layout rotate the wrong pairs: the
        // permutation matters, so the equality above has teeth.
        let unpermuted = Llama::load(CpuBackend::new(), Arc::new(tiny_gguf(&weights, false, dtype))).unwrap();
        assert!(max_diff(&logits(&unpermuted, &ids), &b) > 1e-3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn engine_opens_an_hf_directory_with_its_tokenizer_and_chat_template() {
    let dir = scratch("engine");
    write_hf(&dir, &tiny_weights(true), true, 1, "F32");
    let engine = Engine::open_cpu(&dir, None).unwrap();
    assert_eq!(engine.tokenizer.vocab_size(), VOCAB);
    assert_eq!(engine.tokenizer.encode("b c <|im_end|> h").unwrap(), vec![1, 2, 9, 7]);
    assert_eq!(engine.tokenizer.eos_id, Some(9));
    assert!(engine.tokenizer.is_special(8) && engine.tokenizer.is_special(9) && !engine.tokenizer.is_special(0));
    assert!(engine.tokenizer.chat_template().is_some());
    let mut kv = engine.new_kv_cache(1 << 20).unwrap();
    let lp = engine.score(&mut kv, &[1, 2], &[3, 4]).unwrap();
    assert!(lp.iter().all(|p| p.is_finite() && *p < 0.0));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// BOS on prompts, as transformers adds it: `add_bos_token` of tokenizer_config.json when set, else what
/// tokenizer.json's post-processor does (Llama 3 puts `<|begin_of_text|>` first there); never doubled when
/// the text starts with it; a clear error when it is asked for without a BOS token or is not a bool.
#[test]
fn prompts_start_with_bos_when_the_tokenizer_adds_one() {
    let dir = scratch("bos");
    write_hf(&dir, &tiny_weights(true), true, 1, "F32");
    let tok = |dir: &Path| Tokenizer::from_hf_dir(dir, None, None);
    let plain = tok(&dir).unwrap();
    assert!(!plain.add_bos);
    assert_eq!(plain.encode_prompt("b c").unwrap(), vec![1, 2]);
    let set_config = |config: serde_json::Value| {
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    };
    set_config(serde_json::json!({"bos_token": "<|im_start|>", "add_bos_token": true}));
    let bos = tok(&dir).unwrap();
    assert!(bos.add_bos);
    assert_eq!(bos.encode("b c").unwrap(), vec![1, 2]);
    assert_eq!(bos.encode_prompt("b c").unwrap(), vec![8, 1, 2]);
    assert_eq!(bos.encode_prompt("<|im_start|> b c").unwrap(), vec![8, 1, 2], "not doubled");
    // No setting: the post-processor decides.
    let mut tokenizer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap()).unwrap();
    tokenizer["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [8], "tokens": ["<|im_start|>"]}},
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    set_config(serde_json::json!({"bos_token": "<|im_start|>"}));
    let post = tok(&dir).unwrap();
    assert!(post.add_bos, "the post-processor puts BOS first");
    assert_eq!(post.encode_prompt("b c").unwrap(), vec![8, 1, 2]);
    set_config(serde_json::json!({"bos_token": "<|im_start|>", "add_bos_token": false}));
    assert!(!tok(&dir).unwrap().add_bos, "an explicit setting wins");
    set_config(serde_json::json!({"bos_token": "<|im_start|>", "add_bos_token": "yes"}));
    assert!(tok(&dir).unwrap_err().to_string().contains("add_bos_token"));
    set_config(serde_json::json!({"add_bos_token": true}));
    assert!(tok(&dir).unwrap_err().to_string().contains("no BOS token"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sha256_is_checked_for_single_file_and_sharded_checkpoints() {
    let dir = scratch("sha");
    write_hf(&dir, &tiny_weights(true), true, 1, "F32");
    let digest = crate::gguf::sha256_hex(&std::fs::read(dir.join("model.safetensors")).unwrap());
    assert!(HfCheckpoint::open(&dir, Some(&digest.to_uppercase())).is_ok());
    let wrong = HfCheckpoint::open(&dir, Some(&"0".repeat(64))).unwrap_err();
    assert!(matches!(wrong, EngineError::Safetensors(SafetensorsError::ChecksumMismatch { .. })), "{wrong}");
    // Sharded: the shards the index names, concatenated in file-name order (`cat model-*.safetensors`).
    let sharded = scratch("sha-sharded");
    write_hf(&sharded, &tiny_weights(true), true, 3, "F32");
    let mut names: Vec<String> = std::fs::read_dir(&sharded)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "{names:?}");
    let concat: Vec<u8> = names.iter().flat_map(|n| std::fs::read(sharded.join(n)).unwrap()).collect();
    let digest = crate::gguf::sha256_hex(&concat);
    assert!(HfCheckpoint::open(&sharded, Some(&digest)).is_ok());
    // Another order of the same bytes is another digest.
    let reversed: Vec<u8> = names.iter().rev().flat_map(|n| std::fs::read(sharded.join(n)).unwrap()).collect();
    let err = HfCheckpoint::open(&sharded, Some(&crate::gguf::sha256_hex(&reversed))).unwrap_err();
    assert!(matches!(err, EngineError::Safetensors(SafetensorsError::ChecksumMismatch { .. })), "{err}");
    assert!(err.to_string().contains(&names.join(",")), "the message names the shards hashed: {err}");
    // A changed byte in the last shard's data.
    let last = sharded.join(&names[2]);
    let mut bytes = std::fs::read(&last).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&last, bytes).unwrap();
    let err = HfCheckpoint::open(&sharded, Some(&digest)).unwrap_err();
    assert!(matches!(err, EngineError::Safetensors(SafetensorsError::ChecksumMismatch { .. })), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&sharded).unwrap();
}

#[test]
fn broken_checkpoints_are_clear_errors() {
    let open = |dir: &Path| HfCheckpoint::open(dir, None).map(|_| ()).unwrap_err();
    let fresh = |name: &str, tied: bool, shards: usize| {
        let dir = scratch(name);
        write_hf(&dir, &tiny_weights(tied), tied, shards, "F32");
        dir
    };

    let dir = scratch("empty");
    assert!(matches!(open(&dir), EngineError::BadCheckpoint { .. }));
    assert!(matches!(Engine::open_cpu(&dir, None).map(|_| ()), Err(EngineError::BadCheckpoint { .. })));

    let dir = fresh("no-weights", true, 1);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert!(open(&dir).to_string().contains("has neither model.safetensors"));

    // Untied config without lm_head.weight: the missing tensor is named.
    let dir = fresh("untied", true, 1);
    std::fs::write(dir.join("config.json"), config_json(false).to_string()).unwrap();
    let e = open(&dir);
    assert!(matches!(&e, EngineError::MissingTensor { name, .. } if name == "lm_head.weight"), "{e}");

    // Wrong shape: a wider vocab in config.json than the embedding has.
    let dir = fresh("shape", true, 1);
    let mut cfg = config_json(true);
    cfg["vocab_size"] = 11.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let ckpt = HfCheckpoint::open(&dir, None).unwrap();
    let e = Llama::from_weights(CpuBackend::new(), ckpt.config.clone(), &ckpt).map(|_| ()).unwrap_err();
    match e {
        EngineError::ShapeMismatch { name, expected, found } => {
            // Shapes are quoted in the file's row-major order.
            assert_eq!((name.as_str(), expected, found), ("model.embed_tokens.weight", vec![11, 16], vec![10, 16]));
        }
        other => panic!("{other}"),
    }

    // Unsupported architecture and configuration values.
    for (key, value) in [
        ("model_type", serde_json::json!("mistral")),
        ("hidden_act", serde_json::json!("gelu")),
        ("rope_scaling", serde_json::json!({"rope_type": "llama3", "factor": 8.0})),
        ("attention_bias", serde_json::json!(true)),
        ("num_key_value_heads", serde_json::json!(3)),
        ("hidden_size", serde_json::json!(-16)),
        ("head_dim", serde_json::json!(8)),
    ] {
        let dir = fresh("config", true, 1);
        let mut cfg = config_json(true);
        cfg[key] = value;
        if key == "model_type" {
            cfg["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        }
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        let e = open(&dir);
        assert!(matches!(e, EngineError::BadCheckpoint { .. }), "{key}: {e}");
    }
    let dir = fresh("config-missing", true, 1);
    let mut cfg = config_json(true);
    cfg.as_object_mut().unwrap().remove("num_hidden_layers");
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    assert!(open(&dir).to_string().contains("num_hidden_layers is missing"));
    std::fs::write(dir.join("config.json"), "{not json").unwrap();
    assert!(matches!(open(&dir), EngineError::BadCheckpoint { .. }));

    // A tensor the llama model would ignore (a bias) is refused rather than silently dropped.
    let dir = fresh("extra", true, 1);
    let f = SafetensorsFile::open(&dir.join("model.safetensors")).unwrap();
    let mut list: Vec<(String, &str, Vec<u64>, Vec<u8>)> =
        f.tensors().iter().map(|t| (t.name.clone(), "F32", t.shape.clone(), f.tensor_data(t).to_vec())).collect();
    list.push(("model.layers.0.self_attn.q_proj.bias".into(), "F32", vec![16], vec![0; 64]));
    let refs: Vec<(&str, &str, &[u64], &[u8])> =
        list.iter().map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice())).collect();
    drop(f);
    std::fs::write(dir.join("model.safetensors"), build(&refs, None)).unwrap();
    assert!(open(&dir).to_string().contains("q_proj.bias"));

    // An integer dtype where a weight belongs.
    let dir = fresh("dtype", true, 1);
    let f = SafetensorsFile::open(&dir.join("model.safetensors")).unwrap();
    let list: Vec<(String, &str, Vec<u64>, Vec<u8>)> = f
        .tensors()
        .iter()
        .map(|t| {
            let dtype = if t.name == "model.norm.weight" { "I32" } else { "F32" };
            (t.name.clone(), dtype, t.shape.clone(), f.tensor_data(t).to_vec())
        })
        .collect();
    let refs: Vec<(&str, &str, &[u64], &[u8])> =
        list.iter().map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice())).collect();
    drop(f);
    std::fs::write(dir.join("model.safetensors"), build(&refs, None)).unwrap();
    let ckpt = HfCheckpoint::open(&dir, None).unwrap();
    let e = Llama::from_weights(CpuBackend::new(), ckpt.config.clone(), &ckpt).map(|_| ()).unwrap_err();
    assert!(matches!(e, EngineError::Safetensors(SafetensorsError::UnsupportedDtype { .. })), "{e}");

    // A truncated weights file.
    let dir = fresh("truncated", true, 1);
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    assert!(matches!(open(&dir), EngineError::Safetensors(SafetensorsError::OutOfRange { .. })));

    // Sharded: an index naming a missing shard, a path outside the directory, a tensor not in its shard.
    let dir = fresh("shards", true, 2);
    let index_path = dir.join("model.safetensors.index.json");
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    for (edit, want) in [
        ("model-00009-of-00002.safetensors", "cannot read"),
        ("../model-00001-of-00002.safetensors", "not a plain file name"),
        ("model-00002-of-00002.safetensors", "where weight_map puts it"),
    ] {
        let mut idx = index.clone();
        idx["weight_map"]["model.embed_tokens.weight"] = edit.into();
        std::fs::write(&index_path, idx.to_string()).unwrap();
        let e = open(&dir).to_string();
        assert!(e.contains(want), "{edit}: {e}");
    }
    std::fs::write(&index_path, r#"{"weight_map": 3}"#).unwrap();
    assert!(open(&dir).to_string().contains("no weight_map"));
    let mut idx = index.clone();
    idx["weight_map"].as_object_mut().unwrap().remove("model.norm.weight");
    std::fs::write(&index_path, idx.to_string()).unwrap();
    assert!(matches!(open(&dir), EngineError::MissingTensor { .. }));

    // Tokenizer: missing tokenizer.json, an EOS token not in the vocabulary.
    let dir = fresh("tokenizer", true, 1);
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": "</s>"}"#).unwrap();
    assert!(Engine::open_cpu(&dir, None).map(|_| ()).unwrap_err().to_string().contains("</s>"));
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    assert!(matches!(Engine::open_cpu(&dir, None).map(|_| ()), Err(EngineError::BadCheckpoint { .. })));

    for name in [
        "empty",
        "no-weights",
        "untied",
        "shape",
        "config",
        "config-missing",
        "extra",
        "dtype",
        "truncated",
        "shards",
        "tokenizer",
    ] {
        std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("quantfleet-safetensors-{}-{name}", std::process::id())),
        )
        .unwrap();
    }
}

//! The model's tokenizer, rebuilt from GGUF metadata with the `tokenizers` crate so that ids match llama.cpp's,
//! or loaded from a Hugging Face checkpoint's `tokenizer.json` (`Tokenizer::from_hf_dir`).
//!
//! Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE) with the "smollm" pre-tokenizer. The recipe that
//! reproduces llama.cpp (checked on the oracle's prompts): BPE over the GGUF vocab and merges; pre-tokenizer
//! Digits(individual) then ByteLevel(no prefix space, GPT-2 regex); ByteLevel decoder; control tokens
//! (token_type 3) registered as special tokens so they are matched whole in the input text.

use std::collections::HashSet;
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

use crate::chat::ChatTemplate;
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;

/// llama.cpp's `LLAMA_TOKEN_TYPE_CONTROL`.
const TOKEN_TYPE_CONTROL: i64 = 3;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
    special_ids: HashSet<u32>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Whether prompts start with BOS ([`Self::encode_prompt`]): GGUF `tokenizer.ggml.add_bos_token`; Hugging
    /// Face `add_bos_token` of tokenizer_config.json, else whether tokenizer.json's post-processor puts BOS
    /// first (Llama 3's does). False for SmolLM2.
    pub add_bos: bool,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab_size", &self.vocab_size).finish_non_exhaustive()
    }
}

fn tok_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

impl Tokenizer {
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let model = g.get_str("tokenizer.ggml.model")?;
        let pre = g.metadata("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default");
        if model != "gpt2" || pre != "smollm" {
            return Err(EngineError::UnsupportedModel(format!(
                "tokenizer model {model:?} with pre-tokenizer {pre:?}: supported is \"gpt2\" with \"smollm\""
            )));
        }
        let tokens = g.get_array("tokenizer.ggml.tokens")?;
        let mut vocab = Vocab::default();
        let mut names = Vec::with_capacity(tokens.len());
        for (id, t) in tokens.iter().enumerate() {
            let s = t.as_str().ok_or_else(|| tok_err(format!("token {id} is not a string")))?;
            // A repeated string keeps its first id, as llama.cpp's token-to-id map does.
            vocab.entry(s.to_string()).or_insert(id as u32);
            names.push(s);
        }
        let merges = g
            .get_array("tokenizer.ggml.merges")?
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let s = m.as_str().ok_or_else(|| tok_err(format!("merge {i} is not a string")))?;
                let (a, b) = s.split_once(' ').ok_or_else(|| tok_err(format!("merge {i} {s:?} has no space")))?;
                Ok((a.to_string(), b.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(tok_err)?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, true)),
        ])));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        let types = g.get_array("tokenizer.ggml.token_type")?;
        if types.len() != tokens.len() {
            return Err(tok_err(format!("{} token types for {} tokens", types.len(), tokens.len())));
        }
        let mut special_ids = HashSet::new();
        let mut specials = Vec::new();
        for (id, ty) in types.iter().enumerate() {
            if ty.as_i64() == Some(TOKEN_TYPE_CONTROL) {
                special_ids.insert(id as u32);
                specials.push(AddedToken::from(names[id].to_string(), true));
            }
        }
        inner.add_special_tokens(specials).map_err(tok_err)?;

        let id_key = |k: &str| g.metadata(k).and_then(|v| v.as_u64()).map(|v| v as u32);
        let chat_template = match g.metadata("tokenizer.chat_template").and_then(|v| v.as_str()) {
            Some(src) => Some(ChatTemplate::parse(src)?),
            None => None,
        };
        let bos_id = id_key("tokenizer.ggml.bos_token_id");
        let add_bos = match g.metadata("tokenizer.ggml.add_bos_token") {
            None => false,
            Some(v) => v.as_bool().ok_or_else(|| {
                tok_err(format!("tokenizer.ggml.add_bos_token is a {}, expected a bool", v.type_name()))
            })?,
        };
        if add_bos && bos_id.is_none() {
            return Err(tok_err("tokenizer.ggml.add_bos_token is true but the file names no bos_token_id"));
        }
        Ok(Self {
            inner,
            vocab_size: tokens.len(),
            special_ids,
            bos_id,
            eos_id: id_key("tokenizer.ggml.eos_token_id"),
            add_bos,
            chat_template,
        })
    }

    /// The tokenizer of a Hugging Face checkpoint directory: `tokenizer.json` (a "fast" tokenizer, loaded as
    /// is by the `tokenizers` crate), special tokens from its added tokens marked `special`, and from
    /// `tokenizer_config.json` when present the BOS/EOS tokens and the chat template (`bos_id`/`eos_id`, e.g.
    /// config.json's, are the fallback). Text is encoded without added special tokens, as with GGUF models.
    pub fn from_hf_dir(dir: &Path, bos_id: Option<u32>, eos_id: Option<u32>) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(EngineError::BadCheckpoint {
                dir: dir.to_path_buf(),
                reason: "has no tokenizer.json (only fast tokenizers are supported)".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| tok_err(format!("{}: {e}", path.display())))?;
        // Ids, not the count of strings: a vocabulary may give two ids the same string.
        let vocab_size = inner.get_vocab(true).values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let special_ids =
            inner.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(&id, _)| id).collect();

        let config_path = dir.join("tokenizer_config.json");
        let config: Option<serde_json::Value> = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| tok_err(format!("cannot read {}: {e}", config_path.display())))?;
            Some(
                serde_json::from_str(&text)
                    .map_err(|e| tok_err(format!("{} is not valid JSON: {e}", config_path.display())))?,
            )
        } else {
            None
        };
        // `bos_token` is a string or an AddedToken object `{"content": ..}`; an unknown token is an error.
        let token_id = |key: &str| -> Result<Option<u32>> {
            let Some(v) = config.as_ref().and_then(|c| c.get(key)).filter(|v| !v.is_null()) else { return Ok(None) };
            let text = v
                .as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))
                .ok_or_else(|| tok_err(format!("tokenizer_config.json: {key} is {v}, expected a token string")))?;
            inner
                .token_to_id(text)
                .map(Some)
                .ok_or_else(|| tok_err(format!("tokenizer_config.json: {key} {text:?} is not in the vocabulary")))
        };
        let (bos, eos) = (token_id("bos_token")?, token_id("eos_token")?);
        let chat_template = match config.as_ref().and_then(|c| c.get("chat_template")) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(src)) => Some(ChatTemplate::parse(src)?),
            // Several named templates: the one named "default" is what chat requests use.
            Some(serde_json::Value::Array(list)) => {
                let default = list.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"));
                match default.and_then(|t| t.get("template")).and_then(|t| t.as_str()) {
                    Some(src) => Some(ChatTemplate::parse(src)?),
                    None => None,
                }
            }
            Some(_) => {
                return Err(tok_err(
                    "tokenizer_config.json: chat_template is neither a string nor a list of named templates",
                ));
            }
        };
        let bos_id = bos.or(bos_id);
        let add_bos = match config.as_ref().and_then(|c| c.get("add_bos_token")).filter(|v| !v.is_null()) {
            Some(v) => v.as_bool().ok_or_else(|| tok_err(format!("tokenizer_config.json: add_bos_token is {v}")))?,
            // No setting: what the post-processor does to a text (transformers adds special tokens by default).
            None => match bos_id {
                Some(b) => {
                    let with = inner.encode_fast("a", true).map_err(tok_err)?;
                    let without = inner.encode_fast("a", false).map_err(tok_err)?;
                    with.get_ids().first() == Some(&b) && without.get_ids().first() != Some(&b)
                }
                None => false,
            },
        };
        if add_bos && bos_id.is_none() {
            return Err(tok_err("tokenizer_config.json: add_bos_token is true but no BOS token is named"));
        }
        Ok(Self { inner, vocab_size, special_ids, bos_id, eos_id: eos.or(eos_id), add_bos, chat_template })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Token ids of `text`, with special tokens written in the text (e.g. `<|im_start|>`) parsed as such and no
    /// BOS added (`tokenizer.ggml.add_bos_token` is false for SmolLM2), matching `llama-tokenize --parse-special`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode_fast(text, false).map_err(tok_err)?.get_ids().to_vec())
    }

    /// The ids of a prompt: [`Self::encode`], with BOS first when the model adds one ([`Self::add_bos`]) and the
    /// text does not already start with it (a chat template that writes `{{ bos_token }}`), as llama.cpp and
    /// transformers do; a continuation scored after a prompt is [`Self::encode`]d.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        if let (true, Some(bos)) = (self.add_bos, self.bos_id)
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(EngineError::TokenOutOfRange { id, vocab: self.vocab_size });
        }
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Tokens that end a chat turn: EOS and, for ChatML models, `<|im_end|>`.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.eos_id.into_iter().collect();
        if let Some(id) = self.token_to_id("<|im_end|>")
            && !ids.contains(&id)
        {
            ids.push(id);
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::tests::SyntheticGguf;

    /// A SYNTHETIC byte-level BPE vocabulary (no merges): `a`, `b`, and the control token `<s>`.
    fn gguf(extra: impl FnOnce(SyntheticGguf) -> SyntheticGguf) -> Result<Tokenizer> {
        let g = SyntheticGguf::new()
            .string("tokenizer.ggml.model", "gpt2")
            .string("tokenizer.ggml.pre", "smollm")
            .str_array("tokenizer.ggml.tokens", &["a", "b", "<s>"])
            .str_array("tokenizer.ggml.merges", &[])
            .i32_array("tokenizer.ggml.token_type", &[1, 1, 3]);
        Tokenizer::from_gguf(&GgufFile::from_bytes(extra(g).build()).unwrap())
    }

    #[test]
    fn prompts_start_with_bos_only_when_the_file_says_so() {
        let plain = gguf(|g| g.u32("tokenizer.ggml.bos_token_id", 2)).unwrap();
        assert!(!plain.add_bos, "llama.cpp's default for BPE vocabularies");
        assert_eq!(plain.encode_prompt("ab").unwrap(), vec![0, 1]);
        let bos = gguf(|g| g.u32("tokenizer.ggml.bos_token_id", 2).bool("tokenizer.ggml.add_bos_token", true)).unwrap();
        assert!(bos.add_bos);
        assert_eq!(bos.encode("ab").unwrap(), vec![0, 1], "plain encoding never adds it");
        assert_eq!(bos.encode_prompt("ab").unwrap(), vec![2, 0, 1]);
        assert_eq!(bos.encode_prompt("<s>ab").unwrap(), vec![2, 0, 1], "a template's own BOS is not doubled");
        let off = gguf(|g| g.u32("tokenizer.ggml.bos_token_id", 2).bool("tokenizer.ggml.add_bos_token", false));
        assert!(!off.unwrap().add_bos);
        let err = gguf(|g| g.bool("tokenizer.ggml.add_bos_token", true)).unwrap_err().to_string();
        assert!(err.contains("no bos_token_id"), "{err}");
        let err = gguf(|g| g.u32("tokenizer.ggml.bos_token_id", 2).u32("tokenizer.ggml.add_bos_token", 1));
        assert!(err.unwrap_err().to_string().contains("expected a bool"));
    }
}

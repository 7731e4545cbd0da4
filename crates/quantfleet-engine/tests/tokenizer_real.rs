//! The tokenizer rebuilt from the real SmolLM2 GGUF reproduces llama.cpp's ids for every oracle prompt,
//! round-trips text, and renders the model's chat template to the oracle's chat prompt.

mod common;

use quantfleet_engine::chat::ChatMessage;
use quantfleet_engine::gguf::GgufFile;
use quantfleet_engine::tokenizer::Tokenizer;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(&GgufFile::open(&common::smollm2_path()).unwrap()).unwrap()
}

#[test]
fn ids_match_llama_cpp_on_every_oracle_prompt() {
    let tok = tokenizer();
    let cases = common::oracle_cases();
    assert_eq!(cases.len(), 9);
    // SmolLM2 adds no BOS (`tokenizer.ggml.add_bos_token` false), so a prompt's ids are its text's.
    assert!(!tok.add_bos);
    for case in &cases {
        assert_eq!(tok.encode(&case.text).unwrap(), case.ids, "case {}", case.name);
        assert_eq!(tok.encode_prompt(&case.text).unwrap(), case.ids, "case {}", case.name);
        assert_eq!(tok.decode(&case.ids, false).unwrap(), case.text, "round trip of {}", case.name);
    }
}

#[test]
fn special_tokens_stop_ids_and_bad_ids() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert!(tok.is_special(2) && !tok.is_special(504));
    assert_eq!(tok.stop_ids(), vec![2]); // EOS is <|im_end|> in this GGUF
    assert_eq!(tok.decode(&[1, 504, 2], true).unwrap(), "The");
    assert!(tok.decode(&[49152], false).is_err());
}

#[test]
fn chat_template_renders_the_oracle_chat_prompt() {
    let tok = tokenizer();
    let case = common::oracle_cases().into_iter().find(|c| c.name == "chat-template").unwrap();
    // Parse the oracle's rendered prompt back into turns, re-render it with the GGUF's template, compare.
    let mut messages = Vec::new();
    for turn in case.text.split("<|im_start|>").skip(1) {
        let Some((role, rest)) = turn.split_once('\n') else { continue };
        if let Some((content, _)) = rest.split_once("<|im_end|>") {
            messages.push(ChatMessage::new(role, content));
        }
    }
    let generation_prompt = case.text.ends_with("<|im_start|>assistant\n");
    let rendered = tok.chat_template().unwrap().render(&messages, generation_prompt).unwrap();
    assert_eq!(rendered, case.text);
}

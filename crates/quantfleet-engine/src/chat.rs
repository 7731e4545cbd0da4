//! Chat templates. The GGUF carries a Jinja template; instead of a general Jinja engine we recognise the ChatML
//! family (SmolLM2, Qwen and others: `<|im_start|>role\ncontent<|im_end|>\n`), including the "insert a default
//! system prompt when the first message is not a system message" variant, and render it directly. An unknown
//! template is a typed error rather than a silently wrong prompt.

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: content.to_string() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// ChatML, optionally inserting `default_system` when the conversation does not start with a system turn.
    ChatMl { default_system: Option<String> },
}

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";

impl ChatTemplate {
    /// Recognises the template family from its Jinja source.
    pub fn parse(source: &str) -> Result<Self> {
        let chatml = source.contains(IM_START)
            && source.contains(IM_END)
            && source.contains("message['role']")
            && source.contains("message['content']")
            && source.contains("add_generation_prompt");
        if !chatml {
            return Err(EngineError::ChatTemplate(format!(
                "unrecognised template (only the ChatML family is supported): {:.120}",
                source
            )));
        }
        // The default system prompt is the literal `'<|im_start|>system\n...<|im_end|>\n'` emitted when
        // `messages[0]['role'] != 'system'`.
        let default_system = if source.contains("messages[0]['role'] != 'system'") {
            let marker = format!("'{IM_START}system\n");
            let start = source.find(&marker).map(|i| i + marker.len());
            let text = start.and_then(|s| source[s..].find(IM_END).map(|e| &source[s..s + e]));
            match text {
                Some(t) => Some(t.to_string()),
                None => {
                    return Err(EngineError::ChatTemplate(
                        "template inserts a default system turn but its text was not found".into(),
                    ));
                }
            }
        } else {
            None
        };
        Ok(ChatTemplate::ChatMl { default_system })
    }

    /// Renders the conversation; with `add_generation_prompt` it ends with the opening of an assistant turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let ChatTemplate::ChatMl { default_system } = self;
        let mut out = String::new();
        if let (Some(sys), Some(first)) = (default_system, messages.first())
            && first.role != "system"
        {
            out.push_str(&format!("{IM_START}system\n{sys}{IM_END}\n"));
        }
        for m in messages {
            if m.role.contains(IM_START) || m.role.contains('\n') {
                return Err(EngineError::ChatTemplate(format!("invalid role {:?}", m.role)));
            }
            out.push_str(&format!("{IM_START}{}\n{}{IM_END}\n", m.role, m.content));
        }
        if add_generation_prompt {
            out.push_str(&format!("{IM_START}assistant\n"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template, as stored in its GGUF.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_template_inserts_default_system_prompt() {
        let t = ChatTemplate::parse(SMOLLM2).unwrap();
        let out = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn explicit_system_prompt_replaces_the_default_and_no_generation_prompt() {
        let t = ChatTemplate::parse(SMOLLM2).unwrap();
        let msgs = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "2+2?")];
        let out = t.render(&msgs, false).unwrap();
        assert_eq!(out, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n");
        assert!(t.render(&[ChatMessage::new("us\ner", "x")], false).is_err());
    }

    #[test]
    fn non_chatml_templates_are_rejected() {
        let llama3 = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{% endfor %}";
        assert!(matches!(ChatTemplate::parse(llama3), Err(EngineError::ChatTemplate(_))));
    }
}

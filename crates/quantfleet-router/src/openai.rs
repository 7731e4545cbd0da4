//! The OpenAI-compatible request and response shapes, and the validation that turns a request body into what
//! the router routes: a prompt, decoding parameters, and the facts the classifier looks at. Every rejection is
//! a 400 naming the offending field; fields the router cannot honour are refused rather than ignored.

use crate::backend::{Message, Prompt};
use crate::error::ApiError;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Limits applied while validating.
#[derive(Clone, Debug)]
pub struct Limits {
    /// max_tokens when the request does not say.
    pub default_max_tokens: u32,
    /// The largest max_tokens accepted.
    pub max_tokens: u32,
    /// Largest prompt, in bytes of text.
    pub max_prompt_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { default_max_tokens: 256, max_tokens: 8192, max_prompt_bytes: 1 << 20 }
    }
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize, Debug)]
struct ChatMessageIn {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize, Debug)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize, Debug, Clone)]
pub struct ToolIn {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionIn,
}

#[derive(Deserialize, Debug, Clone)]
pub struct FunctionIn {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
}

#[derive(Deserialize, Debug)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    json_schema: Option<JsonSchemaFormat>,
}

#[derive(Deserialize, Debug)]
struct JsonSchemaFormat {
    #[serde(default)]
    schema: Option<Value>,
}

/// Fields shared by both endpoints.
#[derive(Deserialize, Debug)]
struct Common {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    n: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    stop: Option<OneOrMany>,
    seed: Option<i64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<BTreeMap<String, f64>>,
    metadata: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Debug)]
struct ChatRequestIn {
    #[serde(flatten)]
    common: Common,
    messages: Option<Vec<ChatMessageIn>>,
    tools: Option<Vec<ToolIn>>,
    tool_choice: Option<Value>,
    response_format: Option<ResponseFormat>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
}

#[derive(Deserialize, Debug)]
struct CompletionRequestIn {
    #[serde(flatten)]
    common: Common,
    prompt: Option<Value>,
    logprobs: Option<Value>,
    echo: Option<bool>,
    best_of: Option<i64>,
    suffix: Option<String>,
}

/// Which endpoint a request came through (it decides the response shape).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// What the request asks for beyond free text, for the classifier and the structured-output check.
#[derive(Clone, Debug, PartialEq)]
pub enum Structured {
    /// `tools` were declared: a valid answer is a call `{"name", "arguments"}` of one of them.
    Tools(Vec<ToolIn>),
    /// `response_format` json_schema (with its schema) or json_object (no schema).
    Json(Option<Value>),
}

impl PartialEq for ToolIn {
    fn eq(&self, other: &Self) -> bool {
        self.function.name == other.function.name && self.function.parameters == other.function.parameters
    }
}

/// A validated request.
#[derive(Clone, Debug)]
pub struct ApiRequest {
    pub endpoint: Endpoint,
    pub model: String,
    pub prompt: Prompt,
    /// The text the classifier's markers look at: the user's messages (or the completion prompt).
    pub classify_text: String,
    /// Every byte of prompt text (what the long-context rule measures).
    pub prompt_text: String,
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub structured: Option<Structured>,
    /// `metadata.task_class`, the body's way to name the class explicitly.
    pub metadata_class: Option<String>,
}

fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            ApiError::invalid(None, format!("The request body is not valid JSON: {e}")).with_code("invalid_json")
        } else {
            ApiError::invalid(None, format!("The request body does not match the API: {e}"))
        }
    })
}

fn require_range(param: &str, v: Option<f64>, lo: f64, hi: f64, default: f64) -> Result<f64, ApiError> {
    let v = v.unwrap_or(default);
    if !(lo..=hi).contains(&v) || !v.is_finite() {
        return Err(ApiError::invalid(
            Some(param.to_owned()),
            format!("{param} must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(v)
}

fn unsupported(param: &str, why: &str) -> ApiError {
    ApiError::invalid(Some(param.to_owned()), format!("{param} is not supported by this router: {why}"))
        .with_code("unsupported_parameter")
}

impl Common {
    fn validate(self, limits: &Limits, endpoint: Endpoint) -> Result<ApiRequest, ApiError> {
        let model = match self.model {
            Some(m) if !m.is_empty() => m,
            _ => return Err(ApiError::invalid(Some("model".into()), "you must provide a model parameter")),
        };
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(v), _) | (None, Some(v)) => {
                let param = if self.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
                if v < 1 || v > i64::from(limits.max_tokens) {
                    return Err(ApiError::invalid(
                        Some(param.into()),
                        format!("{param} must be between 1 and {}, got {v}", limits.max_tokens),
                    ));
                }
                v as u32
            }
            (None, None) => limits.default_max_tokens,
        };
        let temperature = require_range("temperature", self.temperature, 0.0, 2.0, 1.0)? as f32;
        let top_p = require_range("top_p", self.top_p, f64::MIN_POSITIVE, 1.0, 1.0)? as f32;
        if let Some(n) = self.n
            && n != 1
        {
            return Err(if n < 1 {
                ApiError::invalid(Some("n".into()), format!("n must be at least 1, got {n}"))
            } else {
                unsupported("n", "one choice per request")
            });
        }
        for (param, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            let v = require_range(param, v, -2.0, 2.0, 0.0)?;
            if v != 0.0 {
                return Err(unsupported(param, "the nodes do not apply penalties"));
            }
        }
        if self.logit_bias.is_some_and(|b| !b.is_empty()) {
            return Err(unsupported("logit_bias", "the nodes do not apply logit biases"));
        }
        let stop = match self.stop {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s],
            Some(OneOrMany::Many(v)) => v,
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(Some("stop".into()), "stop takes up to 4 non-empty strings"));
        }
        let seed = self.seed.map(|s| s as u64);
        let stream = self.stream.unwrap_or(false);
        let include_usage = self.stream_options.is_some_and(|o| o.include_usage);
        let metadata_class = self.metadata.and_then(|mut m| m.remove("task_class"));
        Ok(ApiRequest {
            endpoint,
            model,
            prompt: Prompt::Text(String::new()),
            classify_text: String::new(),
            prompt_text: String::new(),
            max_tokens,
            temperature,
            top_p,
            seed,
            stop,
            stream,
            include_usage,
            structured: None,
            metadata_class,
        })
    }
}

fn content_text(content: Option<Content>, index: usize) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t),
        Some(Content::Parts(parts)) => {
            let mut out = String::new();
            for part in parts {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(t)) => out.push_str(&t),
                    (kind, _) => {
                        return Err(unsupported(
                            &format!("messages[{index}].content"),
                            &format!("content parts of type {kind:?} (only text parts are served)"),
                        ));
                    }
                }
            }
            Ok(out)
        }
    }
}

/// Instructions that make a text-only model answer in the requested structure.
fn structured_instruction(structured: &Structured) -> String {
    match structured {
        Structured::Tools(tools) => {
            let specs: Vec<Value> = tools
                .iter()
                .map(|t| json!({"name": t.function.name, "description": t.function.description, "parameters": t.function.parameters}))
                .collect();
            format!(
                "You can call these functions. To call one, answer only with a JSON object {{\"name\": ..., \"arguments\": {{...}}}}.\n{}",
                Value::Array(specs)
            )
        }
        Structured::Json(Some(schema)) => format!("Answer only with JSON that matches this JSON schema:\n{schema}"),
        Structured::Json(None) => "Answer only with a JSON object.".to_owned(),
    }
}

/// Parses and validates a `/v1/chat/completions` body.
pub fn parse_chat(body: &[u8], limits: &Limits) -> Result<ApiRequest, ApiError> {
    let raw: ChatRequestIn = parse_body(body)?;
    if raw.logprobs == Some(true) || raw.top_logprobs.is_some_and(|k| k > 0) {
        return Err(unsupported("logprobs", "log-probabilities are not returned to clients yet"));
    }
    let mut req = raw.common.validate(limits, Endpoint::Chat)?;
    let messages = raw.messages.unwrap_or_default();
    if messages.is_empty() {
        return Err(ApiError::invalid(Some("messages".into()), "messages must be a non-empty array"));
    }
    let mut out = Vec::with_capacity(messages.len() + 1);
    let mut classify = String::new();
    for (i, m) in messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            other => {
                return Err(ApiError::invalid(
                    Some(format!("messages[{i}].role")),
                    format!("unknown role {other:?}: expected system, developer, user, assistant or tool"),
                ));
            }
        };
        let content = content_text(m.content, i)?;
        if matches!(role, "user" | "tool") {
            classify.push_str(&content);
            classify.push('\n');
        }
        out.push(Message { role: role.to_owned(), content });
    }
    if out.iter().all(|m| m.content.trim().is_empty()) {
        return Err(ApiError::invalid(Some("messages".into()), "every message is empty"));
    }
    let tools = raw.tools.unwrap_or_default();
    for (i, t) in tools.iter().enumerate() {
        if t.kind != "function" || t.function.name.is_empty() {
            return Err(ApiError::invalid(
                Some(format!("tools[{i}]")),
                "each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
            ));
        }
    }
    if raw.tool_choice.as_ref().is_some_and(|c| c != "none" && c != "auto" && c != "required") {
        return Err(unsupported("tool_choice", "only \"none\", \"auto\" and \"required\" are served"));
    }
    let structured = if !tools.is_empty() && raw.tool_choice.as_ref().is_none_or(|c| c != "none") {
        Some(Structured::Tools(tools))
    } else {
        match raw.response_format {
            None => None,
            Some(f) => match f.kind.as_str() {
                "text" => None,
                "json_object" => Some(Structured::Json(None)),
                "json_schema" => {
                    let schema = f.json_schema.and_then(|s| s.schema);
                    if schema.as_ref().is_some_and(|s| !s.is_object()) {
                        return Err(ApiError::invalid(
                            Some("response_format.json_schema.schema".into()),
                            "the schema must be a JSON object",
                        ));
                    }
                    Some(Structured::Json(schema))
                }
                other => {
                    return Err(ApiError::invalid(
                        Some("response_format.type".into()),
                        format!("unknown response_format type {other:?}: expected text, json_object or json_schema"),
                    ));
                }
            },
        }
    };
    if let Some(s) = &structured {
        out.insert(0, Message { role: "system".into(), content: structured_instruction(s) });
    }
    let prompt_text: String = out.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n");
    if prompt_text.len() > limits.max_prompt_bytes {
        return Err(ApiError::invalid(
            Some("messages".into()),
            format!("the prompt has {} bytes, more than the limit of {}", prompt_text.len(), limits.max_prompt_bytes),
        )
        .with_code("context_length_exceeded"));
    }
    req.classify_text = classify;
    req.prompt_text = prompt_text;
    req.prompt = Prompt::Chat(out);
    req.structured = structured;
    Ok(req)
}

/// Parses and validates a `/v1/completions` body.
pub fn parse_completion(body: &[u8], limits: &Limits) -> Result<ApiRequest, ApiError> {
    let raw: CompletionRequestIn = parse_body(body)?;
    if raw.logprobs.as_ref().is_some_and(|l| !l.is_null() && l != &json!(0)) {
        return Err(unsupported("logprobs", "log-probabilities are not returned to clients yet"));
    }
    if raw.echo == Some(true) {
        return Err(unsupported("echo", "the prompt is not echoed"));
    }
    if raw.best_of.is_some_and(|b| b != 1) {
        return Err(unsupported("best_of", "one candidate per request"));
    }
    if raw.suffix.is_some_and(|s| !s.is_empty()) {
        return Err(unsupported("suffix", "insertion is not served"));
    }
    let mut req = raw.common.validate(limits, Endpoint::Completions)?;
    let prompt = match raw.prompt {
        Some(Value::String(s)) => s,
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            items[0].as_str().expect("checked").to_owned()
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
            return Err(unsupported("prompt", "one prompt per request"));
        }
        None => return Err(ApiError::invalid(Some("prompt".into()), "you must provide a prompt")),
        Some(_) => return Err(unsupported("prompt", "token-id prompts (send text)")),
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid(Some("prompt".into()), "prompt must not be empty"));
    }
    if prompt.len() > limits.max_prompt_bytes {
        return Err(ApiError::invalid(
            Some("prompt".into()),
            format!("the prompt has {} bytes, more than the limit of {}", prompt.len(), limits.max_prompt_bytes),
        )
        .with_code("context_length_exceeded"));
    }
    req.classify_text = prompt.clone();
    req.prompt_text = prompt.clone();
    req.prompt = Prompt::Text(prompt);
    Ok(req)
}

/// Unix seconds, for `created`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Token usage, as reported in responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

impl Usage {
    fn json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

/// A whole (non-streaming) response.
pub fn full_response(
    endpoint: Endpoint,
    id: &str,
    model: &str,
    created: u64,
    text: &str,
    finish: &str,
    usage: Usage,
) -> Value {
    match endpoint {
        Endpoint::Chat => json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish,
            }],
            "usage": usage.json(),
        }),
        Endpoint::Completions => json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
            "usage": usage.json(),
        }),
    }
}

/// One streamed chunk: the role opener (chat only, `first`), a text delta, or the finish (`finish` set).
pub fn stream_chunk(
    endpoint: Endpoint,
    id: &str,
    model: &str,
    created: u64,
    text: Option<&str>,
    first: bool,
    finish: Option<&str>,
) -> Value {
    match endpoint {
        Endpoint::Chat => {
            let delta = match (first, text) {
                (true, _) => json!({"role": "assistant", "content": ""}),
                (false, Some(t)) => json!({"content": t}),
                (false, None) => json!({}),
            };
            json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            })
        }
        Endpoint::Completions => json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}],
        }),
    }
}

/// The usage chunk sent last when `stream_options.include_usage` is set.
pub fn usage_chunk(endpoint: Endpoint, id: &str, model: &str, created: u64, usage: Usage) -> Value {
    let object = match endpoint {
        Endpoint::Chat => "chat.completion.chunk",
        Endpoint::Completions => "text_completion",
    };
    json!({"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": usage.json()})
}

/// `GET /v1/models`.
pub fn models_response(models: &[String], created: u64) -> Value {
    json!({
        "object": "list",
        "data": models.iter().map(|m| json!({"id": m, "object": "model", "created": created, "owned_by": "quantfleet"})).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<ApiRequest, ApiError> {
        parse_chat(body.to_string().as_bytes(), &Limits::default())
    }

    #[test]
    fn a_plain_chat_request_validates_with_defaults() {
        let r = chat(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})).unwrap();
        assert_eq!((r.max_tokens, r.temperature, r.top_p, r.stream), (256, 1.0, 1.0, false));
        assert_eq!(r.prompt, Prompt::Chat(vec![Message { role: "user".into(), content: "hi".into() }]));
        assert_eq!(r.classify_text, "hi\n");
        assert_eq!(r.structured, None);
    }

    #[test]
    fn text_parts_are_joined_and_other_parts_refused() {
        let r = chat(json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}))
            .unwrap();
        assert_eq!(r.classify_text, "ab\n");
        let e = chat(json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}))
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));
    }

    #[test]
    fn bad_parameters_name_the_field() {
        let cases = [
            (json!({"model": "m", "messages": []}), "messages"),
            (json!({"messages": [{"role": "user", "content": "x"}]}), "model"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}), "temperature"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0}), "top_p"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), "max_tokens"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}), "max_tokens"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}), "n"),
            (json!({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}), "messages[0].role"),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 1}),
                "presence_penalty",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}),
                "stop",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}}),
                "response_format.type",
            ),
        ];
        for (body, param) in cases {
            let e = chat(body.clone()).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
    }

    #[test]
    fn malformed_json_and_wrong_types_are_400s() {
        let e = parse_chat(b"{\"model\": ", &Limits::default()).unwrap_err();
        assert_eq!(e.code, Some("invalid_json"));
        let e = chat(json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}))
            .unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(e.message.contains("invalid type"), "{}", e.message);
    }

    #[test]
    fn oversized_prompts_are_refused_before_routing() {
        let limits = Limits { max_prompt_bytes: 10, ..Limits::default() };
        let e = parse_completion(json!({"model": "m", "prompt": "x".repeat(11)}).to_string().as_bytes(), &limits)
            .unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
    }

    #[test]
    fn tools_and_schemas_are_structured_requests_with_instructions() {
        let r = chat(json!({"model": "m", "messages": [{"role": "user", "content": "weather?"}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]}))
        .unwrap();
        assert!(matches!(&r.structured, Some(Structured::Tools(t)) if t[0].function.name == "get_weather"));
        let Prompt::Chat(messages) = &r.prompt else { panic!() };
        assert_eq!(messages[0].role, "system");
        assert!(messages[0].content.contains("get_weather"));
        assert_eq!(r.classify_text, "weather?\n", "the instruction is not classified");

        let r = chat(json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}}}))
        .unwrap();
        assert_eq!(r.structured, Some(Structured::Json(Some(json!({"type": "object"})))));
        let r = chat(json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "none",
            "tools": [{"type": "function", "function": {"name": "f"}}]}))
        .unwrap();
        assert_eq!(r.structured, None, "tool_choice none: the tools will not be called");
    }

    #[test]
    fn completions_take_one_text_prompt() {
        let limits = Limits::default();
        let r =
            parse_completion(br#"{"model":"m","prompt":["def f():"],"max_tokens":5,"stop":"\n"}"#, &limits).unwrap();
        assert_eq!((r.prompt, r.max_tokens, r.stop), (Prompt::Text("def f():".into()), 5, vec!["\n".to_owned()]));
        for bad in [r#"{"model":"m"}"#, r#"{"model":"m","prompt":[1,2]}"#, r#"{"model":"m","prompt":"x","echo":true}"#]
        {
            assert_eq!(
                parse_completion(bad.as_bytes(), &limits).unwrap_err().status,
                axum::http::StatusCode::BAD_REQUEST
            );
        }
    }

    #[test]
    fn response_shapes() {
        let usage = Usage { prompt_tokens: 3, completion_tokens: 2 };
        let v = full_response(Endpoint::Chat, "id", "m", 1, "hello", "stop", usage);
        assert_eq!(v["choices"][0]["message"]["content"], "hello");
        assert_eq!(v["usage"]["total_tokens"], 5);
        let v = stream_chunk(Endpoint::Chat, "id", "m", 1, None, true, None);
        assert_eq!(v["choices"][0]["delta"]["role"], "assistant");
        let v = stream_chunk(Endpoint::Completions, "id", "m", 1, Some("x"), false, Some("length"));
        assert_eq!(
            (v["choices"][0]["text"].as_str(), v["choices"][0]["finish_reason"].as_str()),
            (Some("x"), Some("length"))
        );
    }
}

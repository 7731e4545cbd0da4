//! Is a structured (agent) answer valid? The answer must be JSON — optionally inside one ```json fence —
//! and match what the request asked for: a call `{"name", "arguments"}` of a declared tool whose arguments
//! match its parameters schema, or a value matching the response_format schema.
//!
//! The schema check covers the JSON Schema keywords structured-output APIs use: type, properties, required,
//! additionalProperties, items, enum, const, anyOf/oneOf/allOf, minItems/maxItems, minimum/maximum,
//! minLength/maxLength. Other keywords are not checked (a value is not refused for them).

use crate::openai::Structured;
use serde_json::Value;

/// The JSON value in an answer: the whole text, or the inside of one ``` fence.
pub fn extract_json(text: &str) -> Option<Value> {
    let t = text.trim();
    if let Ok(v) = serde_json::from_str(t) {
        return Some(v);
    }
    let start = t.find("```")?;
    let after = &t[start + 3..];
    let body_start = after.find('\n')? + 1;
    let end = after[body_start..].find("```")?;
    serde_json::from_str(after[body_start..body_start + end].trim()).ok()
}

/// Whether `answer` satisfies the structured request.
pub fn is_valid(structured: &Structured, answer: &str) -> bool {
    let Some(value) = extract_json(answer) else { return false };
    match structured {
        Structured::Json(None) => value.is_object(),
        Structured::Json(Some(schema)) => matches_schema(&value, schema),
        Structured::Tools(tools) => {
            let (Some(name), Some(args)) = (value.get("name").and_then(Value::as_str), value.get("arguments")) else {
                return false;
            };
            // Some models emit the arguments as a JSON string, as OpenAI's own wire format does.
            let args = match args {
                Value::String(s) => match serde_json::from_str::<Value>(s) {
                    Ok(v) => v,
                    Err(_) => return false,
                },
                other => other.clone(),
            };
            tools.iter().any(|t| {
                t.function.name == name
                    && t.function.parameters.as_ref().is_none_or(|schema| matches_schema(&args, schema))
            })
        }
    }
}

fn type_matches(value: &Value, ty: &str) -> bool {
    match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.as_f64().is_some_and(|f| f.fract() == 0.0),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => false,
    }
}

/// Whether `value` matches `schema` (see the module docs for the keywords checked).
pub fn matches_schema(value: &Value, schema: &Value) -> bool {
    let Some(s) = schema.as_object() else { return schema.as_bool().unwrap_or(true) };
    match s.get("type") {
        Some(Value::String(t)) if !type_matches(value, t) => return false,
        Some(Value::Array(ts)) if !ts.iter().filter_map(Value::as_str).any(|t| type_matches(value, t)) => return false,
        _ => {}
    }
    if let Some(Value::Array(options)) = s.get("enum")
        && !options.contains(value)
    {
        return false;
    }
    if let Some(c) = s.get("const")
        && c != value
    {
        return false;
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(Value::Array(subs)) = s.get(key)
            && !subs.iter().any(|sub| matches_schema(value, sub))
        {
            return false;
        }
    }
    if let Some(Value::Array(subs)) = s.get("allOf")
        && !subs.iter().all(|sub| matches_schema(value, sub))
    {
        return false;
    }
    let bound = |key: &str| s.get(key).and_then(Value::as_f64);
    if let Some(x) = value.as_f64()
        && (bound("minimum").is_some_and(|m| x < m) || bound("maximum").is_some_and(|m| x > m))
    {
        return false;
    }
    if let Some(text) = value.as_str() {
        let n = text.chars().count() as f64;
        if bound("minLength").is_some_and(|m| n < m) || bound("maxLength").is_some_and(|m| n > m) {
            return false;
        }
    }
    if let Some(items) = value.as_array() {
        let n = items.len() as f64;
        if bound("minItems").is_some_and(|m| n < m) || bound("maxItems").is_some_and(|m| n > m) {
            return false;
        }
        if let Some(item_schema) = s.get("items")
            && !items.iter().all(|item| matches_schema(item, item_schema))
        {
            return false;
        }
    }
    if let Some(obj) = value.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        if let Some(Value::Array(required)) = s.get("required")
            && !required.iter().filter_map(Value::as_str).all(|k| obj.contains_key(k))
        {
            return false;
        }
        for (k, v) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(prop_schema) => {
                    if !matches_schema(v, prop_schema) {
                        return false;
                    }
                }
                None => match s.get("additionalProperties") {
                    Some(Value::Bool(false)) => return false,
                    Some(extra @ Value::Object(_)) if !matches_schema(v, extra) => return false,
                    _ => {}
                },
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::{FunctionIn, ToolIn};
    use serde_json::json;

    fn person() -> Value {
        json!({"type": "object", "properties": {"name": {"type": "string", "minLength": 1}, "age": {"type": "integer", "minimum": 0},
               "tags": {"type": "array", "items": {"enum": ["a", "b"]}}}, "required": ["name"], "additionalProperties": false})
    }

    #[test]
    fn schema_keywords() {
        let s = person();
        assert!(matches_schema(&json!({"name": "Ada", "age": 36, "tags": ["a"]}), &s));
        for bad in [
            json!({"age": 3}),
            json!({"name": ""}),
            json!({"name": "x", "age": -1}),
            json!({"name": "x", "age": 1.5}),
            json!({"name": "x", "tags": ["c"]}),
            json!({"name": "x", "extra": 1}),
            json!(["name"]),
        ] {
            assert!(!matches_schema(&bad, &s), "{bad}");
        }
        assert!(matches_schema(&json!(null), &json!({"type": ["string", "null"]})));
        assert!(!matches_schema(&json!(1), &json!({"anyOf": [{"type": "string"}, {"type": "boolean"}]})));
    }

    #[test]
    fn answers_may_be_fenced_but_must_be_json() {
        let s = Structured::Json(Some(person()));
        assert!(is_valid(&s, " {\"name\": \"Ada\"} "));
        assert!(is_valid(&s, "Here you go:\n```json\n{\"name\": \"Ada\"}\n```"));
        assert!(!is_valid(&s, "{\"name\": \"Ada\""));
        assert!(!is_valid(&s, "Ada is 36."));
        assert!(is_valid(&Structured::Json(None), "{}"));
        assert!(!is_valid(&Structured::Json(None), "[1]"), "json_object needs an object");
    }

    #[test]
    fn tool_calls_must_name_a_declared_tool_with_valid_arguments() {
        let tools = Structured::Tools(vec![ToolIn {
            kind: "function".into(),
            function: FunctionIn {
                name: "get_weather".into(),
                description: None,
                parameters: Some(
                    json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
                ),
            },
        }]);
        assert!(is_valid(&tools, r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#));
        assert!(is_valid(&tools, r#"{"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}"#));
        assert!(!is_valid(&tools, r#"{"name": "get_time", "arguments": {"city": "Paris"}}"#));
        assert!(!is_valid(&tools, r#"{"name": "get_weather", "arguments": {}}"#));
    }
}

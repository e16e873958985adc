//! Generation requests as JSON, shared by the NDJSON protocol and the
//! OpenAI-compatible endpoints. Every error names the field at fault and what
//! was expected; fields this daemon does not know are ignored (OpenAI clients
//! send many), but known ones with values it cannot honour are refused.

use crate::config::{Limits, SamplingDefaults};
use crate::engine::{GenerationRequest, Prompt, RequestError};
use bramble_runtime::chat::ChatMessage;
use serde_json::{Map, Value};

/// Which protocol a request came in on; they differ in the fields they require
/// and in whether they stream by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// NDJSON: `prompt` or `messages`; streams unless `"stream": false`.
    Ndjson,
    /// `POST /v1/completions`: `prompt`.
    Completions,
    /// `POST /v1/chat/completions`: `messages`.
    ChatCompletions,
}

/// A parsed request and how to answer it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRequest {
    /// What to generate.
    pub generation: GenerationRequest,
    /// Send text as it is generated.
    pub stream: bool,
    /// NDJSON's `auth` field (HTTP uses the `Authorization` header).
    pub auth: Option<String>,
}

/// The most stop strings a request may give, and their longest length.
pub const MAX_STOPS: usize = 8;
/// The longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// The most chat messages in one request.
pub const MAX_MESSAGES: usize = 1024;

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(field: &str, expected: &str, value: &Value) -> RequestError {
    RequestError::invalid(Some(field), format!("expected {expected}, got {}", type_name(value)))
}

fn real(object: &Map<String, Value>, field: &str, min: f64, max: f64) -> Result<Option<f64>, RequestError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let v = n.as_f64().unwrap_or(f64::NAN);
            if !(min..=max).contains(&v) {
                return Err(RequestError::invalid(Some(field), format!("{v} is out of range ({min} to {max})")));
            }
            Ok(Some(v))
        }
        Some(other) => Err(wrong_type(field, "a number", other)),
    }
}

fn integer(object: &Map<String, Value>, field: &str, min: u64, max: u64) -> Result<Option<u64>, RequestError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
            Some(v) => Err(RequestError::invalid(Some(field), format!("{v} is out of range ({min} to {max})"))),
            None => {
                Err(RequestError::invalid(Some(field), format!("expected a whole number from {min} to {max}, got {n}")))
            }
        },
        Some(other) => Err(wrong_type(field, "a whole number", other)),
    }
}

fn boolean(object: &Map<String, Value>, field: &str) -> Result<Option<bool>, RequestError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(wrong_type(field, "true or false", other)),
    }
}

fn stops(object: &Map<String, Value>) -> Result<Vec<String>, RequestError> {
    let list = match object.get("stop") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.clone()),
                other => Err(wrong_type(&format!("stop[{i}]"), "a string", other)),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(wrong_type("stop", "a string or an array of strings", other)),
    };
    if list.len() > MAX_STOPS {
        return Err(RequestError::invalid(Some("stop"), format!("{} stop strings; at most {MAX_STOPS}", list.len())));
    }
    if let Some(long) = list.iter().find(|s| s.len() > MAX_STOP_BYTES || s.is_empty()) {
        return Err(RequestError::invalid(
            Some("stop"),
            format!("a stop string of {} bytes; each must be 1 to {MAX_STOP_BYTES}", long.len()),
        ));
    }
    Ok(list)
}

fn content(field: &str, value: &Value) -> Result<String, RequestError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        // OpenAI's content parts: only text ones can go to a text model.
        Value::Array(parts) => {
            let mut text = String::new();
            for (i, part) in parts.iter().enumerate() {
                let field = format!("{field}[{i}]");
                let part = part.as_object().ok_or_else(|| wrong_type(&field, "a content part object", part))?;
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    (Some("text"), other) => {
                        return Err(wrong_type(&format!("{field}.text"), "a string", other.unwrap_or(&Value::Null)))
                    }
                    (kind, _) => {
                        return Err(RequestError::invalid(
                            Some(&field),
                            format!("content parts of type {kind:?} are not supported; only \"text\""),
                        ))
                    }
                }
            }
            Ok(text)
        }
        other => Err(wrong_type(field, "a string or an array of text parts", other)),
    }
}

fn messages(value: &Value) -> Result<Vec<ChatMessage>, RequestError> {
    let items = value.as_array().ok_or_else(|| wrong_type("messages", "an array of messages", value))?;
    if items.is_empty() {
        return Err(RequestError::invalid(Some("messages"), "is empty; give at least one message"));
    }
    if items.len() > MAX_MESSAGES {
        return Err(RequestError::invalid(
            Some("messages"),
            format!("{} messages; at most {MAX_MESSAGES}", items.len()),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let field = format!("messages[{i}]");
            let message =
                item.as_object().ok_or_else(|| wrong_type(&field, "an object with role and content", item))?;
            let role = match message.get("role") {
                Some(Value::String(role)) if matches!(role.as_str(), "system" | "user" | "assistant") => role.clone(),
                // OpenAI's newer name for the system role.
                Some(Value::String(role)) if role == "developer" => "system".to_string(),
                Some(Value::String(role)) => {
                    return Err(RequestError::invalid(
                        Some(&format!("{field}.role")),
                        format!("{role:?} is not one of system, user, assistant"),
                    ))
                }
                Some(other) => return Err(wrong_type(&format!("{field}.role"), "a string", other)),
                None => return Err(RequestError::invalid(Some(&format!("{field}.role")), "is missing")),
            };
            let text = match message.get("content") {
                Some(value) => content(&format!("{field}.content"), value)?,
                None => return Err(RequestError::invalid(Some(&format!("{field}.content")), "is missing")),
            };
            Ok(ChatMessage { role, content: text })
        })
        .collect()
}

/// Parses a request body (an NDJSON line or an HTTP body).
pub fn parse(
    body: &[u8],
    endpoint: Endpoint,
    defaults: &SamplingDefaults,
    limits: &Limits,
) -> Result<ParsedRequest, RequestError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        RequestError::invalid(None, format!("the request is not valid UTF-8 (at byte {})", e.valid_up_to()))
    })?;
    let value: Value =
        crate::json::parse_strict(text).map_err(|e| RequestError::invalid(None, format!("malformed JSON: {e}")))?;
    let object = value.as_object().ok_or_else(|| {
        RequestError::invalid(None, format!("the request must be a JSON object, got {}", type_name(&value)))
    })?;

    let prompt = match (endpoint, object.get("prompt"), object.get("messages")) {
        (Endpoint::Ndjson, Some(_), Some(_)) => {
            return Err(RequestError::invalid(Some("prompt"), "give either prompt or messages, not both"))
        }
        (Endpoint::Ndjson | Endpoint::Completions, Some(prompt), _) => match prompt {
            Value::String(s) => Prompt::Text(s.clone()),
            // OpenAI allows a batch of prompts; one generation at a time here.
            Value::Array(items) if items.len() == 1 && items[0].is_string() => {
                Prompt::Text(items[0].as_str().unwrap_or_default().to_string())
            }
            Value::Array(_) => {
                return Err(RequestError::invalid(
                    Some("prompt"),
                    "batches of prompts are not supported; give one string",
                ))
            }
            other => return Err(wrong_type("prompt", "a string", other)),
        },
        (Endpoint::Ndjson | Endpoint::ChatCompletions, _, Some(list)) => {
            Prompt::Chat { messages: messages(list)?, trim_to_fit: false }
        }
        (Endpoint::Ndjson, None, None) => {
            return Err(RequestError::invalid(Some("prompt"), "is missing; give prompt (text) or messages (a chat)"))
        }
        (Endpoint::Completions, None, _) => return Err(RequestError::invalid(Some("prompt"), "is missing")),
        (Endpoint::ChatCompletions, _, None) => return Err(RequestError::invalid(Some("messages"), "is missing")),
    };

    let mut generation = GenerationRequest::new(prompt, defaults);
    let limit = limits.max_tokens as u64;
    let max_tokens = match integer(object, "max_tokens", 1, u64::MAX)? {
        Some(n) => Some(n),
        None => integer(object, "max_completion_tokens", 1, u64::MAX)?,
    };
    if let Some(n) = max_tokens {
        if n > limit {
            return Err(RequestError::invalid(
                Some("max_tokens"),
                format!("{n} is over this daemon's limit of {limit} (limits.max_tokens)"),
            ));
        }
        generation.max_tokens = n as usize;
    }
    let s = &mut generation.sampling;
    if let Some(v) = real(object, "temperature", 0.0, 100.0)? {
        s.temperature = v as f32;
    }
    if let Some(v) = real(object, "top_p", 0.0, 1.0)? {
        s.top_p = v as f32;
    }
    if let Some(v) = integer(object, "top_k", 0, 1 << 20)? {
        s.top_k = v as usize;
    }
    if let Some(v) = real(object, "min_p", 0.0, 1.0)? {
        s.min_p = v as f32;
    }
    if let Some(v) = real(object, "repeat_penalty", 0.01, 100.0)? {
        s.repetition_penalty = v as f32;
    }
    if let Some(v) = integer(object, "seed", 0, u64::MAX)? {
        s.seed = v;
        generation.reseed = true;
    }
    if let Some(n) = integer(object, "n", 0, u64::MAX)? {
        if n != 1 {
            return Err(RequestError::invalid(Some("n"), format!("{n} choices asked; only 1 is supported")));
        }
    }
    generation.stop = stops(object)?;
    let stream = boolean(object, "stream")?.unwrap_or(endpoint == Endpoint::Ndjson);
    let auth = match object.get("auth") {
        None | Some(Value::Null) => None,
        Some(Value::String(token)) => Some(token.clone()),
        Some(other) => return Err(wrong_type("auth", "a string", other)),
    };
    Ok(ParsedRequest { generation, stream, auth })
}

/// Compares two secrets in time that depends only on their lengths, so a
/// client cannot find the token byte by byte from response times.
pub fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut difference = (given.len() ^ expected.len()) as u64;
    for (i, &e) in expected.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(0);
        difference |= u64::from(g ^ e);
    }
    difference == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(body: &str, endpoint: Endpoint) -> Result<ParsedRequest, RequestError> {
        parse(body.as_bytes(), endpoint, &SamplingDefaults::default(), &Limits::default())
    }

    #[test]
    fn a_full_ndjson_request() {
        let parsed = parse_str(
            r#"{"prompt":"Hi","max_tokens":5,"temperature":0,"top_p":0.5,"stop":["\n"],"stream":false,"seed":3}"#,
            Endpoint::Ndjson,
        )
        .unwrap();
        assert_eq!(parsed.generation.prompt, Prompt::Text("Hi".to_string()));
        assert_eq!(parsed.generation.max_tokens, 5);
        assert_eq!(parsed.generation.sampling.temperature, 0.0);
        assert_eq!(parsed.generation.sampling.top_p, 0.5);
        assert_eq!(parsed.generation.stop, vec!["\n".to_string()]);
        assert!(!parsed.stream);
        assert!(parsed.generation.reseed);
        assert!(parse_str(r#"{"prompt":"Hi"}"#, Endpoint::Ndjson).unwrap().stream, "NDJSON streams by default");
        assert!(!parse_str(r#"{"prompt":"Hi"}"#, Endpoint::Completions).unwrap().stream, "HTTP does not");
    }

    #[test]
    fn chat_messages_with_text_parts() {
        let parsed = parse_str(
            r#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi"}]}]}"#,
            Endpoint::ChatCompletions,
        )
        .unwrap();
        let Prompt::Chat { messages, .. } = parsed.generation.prompt else { panic!("a chat") };
        assert_eq!(messages, vec![ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")]);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"prompt":"Hi","max_tokens":"ten"}"#, Endpoint::Ndjson, Some("max_tokens"), "expected a whole number"),
            (r#"{"prompt":"Hi","max_tokens":-1}"#, Endpoint::Ndjson, Some("max_tokens"), "whole number"),
            (r#"{"prompt":"Hi","max_tokens":999999}"#, Endpoint::Ndjson, Some("max_tokens"), "limit"),
            (r#"{"prompt":"Hi","temperature":"hot"}"#, Endpoint::Ndjson, Some("temperature"), "a number"),
            (r#"{"prompt":"Hi","top_p":7}"#, Endpoint::Ndjson, Some("top_p"), "out of range"),
            (r#"{"prompt":"Hi","stop":5}"#, Endpoint::Ndjson, Some("stop"), "string"),
            (r#"{"prompt":"Hi","stream":"yes"}"#, Endpoint::Ndjson, Some("stream"), "true or false"),
            (r#"{"prompt":7}"#, Endpoint::Completions, Some("prompt"), "a string"),
            (r#"{"prompt":"Hi","n":2}"#, Endpoint::Completions, Some("n"), "only 1"),
            (r#"{"messages":[]}"#, Endpoint::ChatCompletions, Some("messages"), "empty"),
            (
                r#"{"messages":[{"role":"tool","content":"x"}]}"#,
                Endpoint::ChatCompletions,
                Some("messages[0].role"),
                "not one of",
            ),
            (r#"{"messages":[{"role":"user"}]}"#, Endpoint::ChatCompletions, Some("messages[0].content"), "missing"),
            (r#"{"prompt":"Hi"}"#, Endpoint::ChatCompletions, Some("messages"), "missing"),
            (r#"{}"#, Endpoint::Ndjson, Some("prompt"), "missing"),
            (r#"[1,2]"#, Endpoint::Ndjson, None, "JSON object"),
            (r#"{"prompt": "Hi""#, Endpoint::Ndjson, None, "malformed JSON"),
        ];
        for (body, endpoint, param, needle) in cases {
            let error = parse_str(body, endpoint).unwrap_err();
            assert_eq!(error.status, 400, "{body}");
            assert_eq!(error.param.as_deref(), param, "{body}: {error}");
            assert!(error.message.contains(needle), "{body}: {error}");
        }
        let error = parse(b"{\"prompt\":\"\xff\"}", Endpoint::Ndjson, &SamplingDefaults::default(), &Limits::default())
            .unwrap_err();
        assert!(error.message.contains("UTF-8"), "{error}");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdeF", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdef0", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"", b"0123456789abcdef"));
    }
}

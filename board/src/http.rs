//! The OpenAI-compatible HTTP/1.1 server: `GET /health`, `GET /v1/models`,
//! `POST /v1/completions`, `POST /v1/chat/completions`, and `GET /bias` (the
//! bias feedback: `{"feedback", "weights", "recent_signals", "responses"}`).
//! A completion carries its response's bias signal in an extra top-level
//! field, `bias_signal` (null when the feedback is off). Streaming answers are
//! Server-Sent Events (in a chunked body, so the connection can be kept)
//! ending in `data: [DONE]`; errors are OpenAI's `{"error": {...}}`.
//!
//! Written by hand for the four endpoints: request line, headers and a
//! `Content-Length` body, each under the byte cap and the request timeout.

use crate::connection::{Connection, ReadFailure, Shared};
use crate::engine::{self, FinishReason, Outcome, Prompt, RequestError, TokenSink, Usage};
use crate::json;
use crate::request::{self, Endpoint};
use crate::transport::TcpPort;
use serde_json::{json, Value};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The most header lines a request may have.
pub const MAX_HEADERS: usize = 64;

/// A request's head.
#[derive(Debug)]
struct Head {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    keep_alive: bool,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// OpenAI's error body.
pub fn error_body(error: &RequestError) -> Value {
    json!({"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.status}})
}

/// Writes a whole JSON response.
fn respond(out: &mut impl std::io::Write, status: u16, body: &Value, keep_alive: bool) -> std::io::Result<()> {
    let body = serde_json::to_vec(body)?;
    let mut response = Vec::with_capacity(body.len() + 256);
    write!(
        response,
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {}\r\n",
        reason_phrase(status),
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    )?;
    if status == 503 {
        response.extend_from_slice(b"Retry-After: 1\r\n");
    }
    if status == 401 {
        response.extend_from_slice(b"WWW-Authenticate: Bearer\r\n");
    }
    response.extend_from_slice(b"\r\n");
    response.extend_from_slice(&body);
    out.write_all(&response)
}

fn respond_error(out: &mut impl std::io::Write, error: &RequestError, keep_alive: bool) -> std::io::Result<()> {
    respond(out, error.status, &error_body(error), keep_alive)
}

fn parse_head(bytes: &[u8]) -> Result<Head, RequestError> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| RequestError::invalid(None, "the request head is not valid UTF-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && t.starts_with('/') => (m, t, v),
        _ => return Err(RequestError::invalid(None, format!("malformed request line {request_line:?}"))),
    };
    let keep_alive_default = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        other => {
            return Err(RequestError::new(
                505,
                "invalid_request_error",
                format!("{other:?} is not HTTP/1.0 or HTTP/1.1"),
            ))
        }
    };
    let mut headers = Vec::new();
    for line in lines {
        if headers.len() >= MAX_HEADERS {
            return Err(RequestError::new(
                431,
                "invalid_request_error",
                format!("more than {MAX_HEADERS} header lines"),
            ));
        }
        let (name, value) = line
            .split_once(':')
            .filter(|(n, _)| !n.is_empty() && !n.contains(' '))
            .ok_or_else(|| RequestError::invalid(None, format!("malformed header line {line:?}")))?;
        headers.push((name.to_string(), value.trim().to_string()));
    }
    let path = target.split('?').next().unwrap_or(target).to_string();
    let mut head = Head { method: method.to_string(), path, headers, keep_alive: keep_alive_default };
    if let Some(connection) = head.header("connection") {
        if connection.eq_ignore_ascii_case("close") {
            head.keep_alive = false;
        } else if connection.eq_ignore_ascii_case("keep-alive") {
            head.keep_alive = true;
        }
    }
    Ok(head)
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn unix_time() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Writes a completion or chat completion, streamed as SSE events or whole.
struct CompletionSink {
    out: TcpPort,
    chat: bool,
    stream: bool,
    keep_alive: bool,
    id: String,
    model: String,
    created: u64,
    /// The part of each streamed event before the text, and after it.
    event_prefix: Vec<u8>,
    event_suffix: &'static [u8],
    /// The event and the chunk that frames it, reused.
    event: Vec<u8>,
    chunk: Vec<u8>,
    /// The whole text when not streaming.
    text: String,
    /// Headers sent (streaming began).
    started: bool,
}

impl CompletionSink {
    fn new(out: TcpPort, chat: bool, stream: bool, keep_alive: bool, model: &str, max_tokens: usize) -> Self {
        let number = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let id = if chat { format!("chatcmpl-{number}") } else { format!("cmpl-{number}") };
        let created = unix_time();
        let object = if chat { "chat.completion.chunk" } else { "text_completion" };
        let mut event_prefix = Vec::with_capacity(256);
        event_prefix.extend_from_slice(b"data: {\"id\":");
        json::push_string(&mut event_prefix, &id);
        let _ = write!(event_prefix, ",\"object\":\"{object}\",\"created\":{created},\"model\":");
        json::push_string(&mut event_prefix, model);
        event_prefix.extend_from_slice(if chat {
            b",\"choices\":[{\"index\":0,\"delta\":{\"content\":"
        } else {
            b",\"choices\":[{\"index\":0,\"text\":"
        });
        let event_suffix: &'static [u8] = if chat {
            b"},\"logprobs\":null,\"finish_reason\":null}]}\n\n"
        } else {
            b",\"logprobs\":null,\"finish_reason\":null}]}\n\n"
        };
        Self {
            out,
            chat,
            stream,
            keep_alive,
            id,
            model: model.to_string(),
            created,
            event_prefix,
            event_suffix,
            event: Vec::with_capacity(1024),
            chunk: Vec::with_capacity(1100),
            // Room for every token's text, so it does not grow while decoding.
            text: if stream { String::new() } else { String::with_capacity(max_tokens * 16) },
            started: false,
        }
    }

    /// Sends `self.event` as one chunk of the chunked body.
    fn send_event(&mut self) -> std::io::Result<()> {
        self.chunk.clear();
        write!(self.chunk, "{:x}\r\n", self.event.len())?;
        self.chunk.extend_from_slice(&self.event);
        self.chunk.extend_from_slice(b"\r\n");
        embedded_io::Write::write_all(&mut self.out, &self.chunk)
    }

    fn send_json_event(&mut self, value: &Value) -> std::io::Result<()> {
        self.event.clear();
        self.event.extend_from_slice(b"data: ");
        serde_json::to_writer(&mut self.event, value)?;
        self.event.extend_from_slice(b"\n\n");
        self.send_event()
    }

    /// `data: [DONE]` and the end of the chunked body.
    fn end_stream(&mut self) -> std::io::Result<()> {
        self.event.clear();
        self.event.extend_from_slice(b"data: [DONE]\n\n");
        self.send_event()?;
        embedded_io::Write::write_all(&mut self.out, b"0\r\n\r\n")
    }

    fn chunk_object(&self, choice: Value, usage: Option<Value>) -> Value {
        let mut object = json!({
            "id": self.id,
            "object": if self.chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if let Some(usage) = usage {
            object["usage"] = usage;
        }
        object
    }
}

fn usage_json(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    })
}

fn cancelled_error() -> RequestError {
    RequestError::new(503, "cancelled", "the generation was cancelled (the daemon is shutting down)")
}

impl TokenSink for CompletionSink {
    fn start(&mut self, _prompt_tokens: usize) -> std::io::Result<()> {
        if !self.stream {
            return Ok(());
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
             Transfer-Encoding: chunked\r\nConnection: {}\r\n\r\n",
            if self.keep_alive { "keep-alive" } else { "close" }
        );
        embedded_io::Write::write_all(&mut self.out, head.as_bytes())?;
        self.started = true;
        if self.chat {
            // OpenAI's first chunk names the role.
            let choice = json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
            let first = self.chunk_object(choice, None);
            self.send_json_event(&first)?;
        }
        Ok(())
    }

    fn text(&mut self, piece: &str) -> std::io::Result<()> {
        if !self.stream {
            self.text.push_str(piece);
            return Ok(());
        }
        self.event.clear();
        self.event.extend_from_slice(&self.event_prefix);
        json::push_string(&mut self.event, piece);
        self.event.extend_from_slice(self.event_suffix);
        self.send_event()
    }

    fn finish(&mut self, reason: FinishReason, usage: &Usage) -> std::io::Result<()> {
        if reason == FinishReason::Cancelled {
            return self.fail(&cancelled_error());
        }
        let finish_reason = reason.name();
        if self.stream {
            let choice = if self.chat {
                json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason})
            } else {
                json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish_reason})
            };
            let mut last = self.chunk_object(choice, Some(usage_json(usage)));
            last["bias_signal"] = json!(usage.bias_signal);
            last["bias_regenerations"] = json!(usage.bias_regenerations);
            self.send_json_event(&last)?;
            return self.end_stream();
        }
        let body = if self.chat {
            json!({
                "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text}, "logprobs": null, "finish_reason": finish_reason}],
                "usage": usage_json(usage),
                "bias_signal": usage.bias_signal,
                "bias_regenerations": usage.bias_regenerations,
            })
        } else {
            json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": self.text, "logprobs": null, "finish_reason": finish_reason}],
                "usage": usage_json(usage),
                "bias_signal": usage.bias_signal,
                "bias_regenerations": usage.bias_regenerations,
            })
        };
        let keep_alive = self.keep_alive;
        respond(&mut PortWriter(&mut self.out), 200, &body, keep_alive)
    }

    fn discard(&mut self) -> bool {
        self.text.clear();
        !self.stream
    }

    fn fail(&mut self, error: &RequestError) -> std::io::Result<()> {
        if self.started {
            // Headers are gone: the error travels as an event, then the stream ends.
            self.send_json_event(&error_body(error))?;
            return self.end_stream();
        }
        let keep_alive = self.keep_alive;
        respond_error(&mut PortWriter(&mut self.out), error, keep_alive)
    }

    fn client_present(&self) -> bool {
        !crate::connection::peer_gone(self.out.stream())
    }
}

/// A transport as a `std::io::Write`, for the code that writes whole responses.
struct PortWriter<'a>(&'a mut TcpPort);

impl std::io::Write for PortWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        embedded_io::Write::write(self.0, buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        embedded_io::Write::flush(self.0)
    }
}

/// Serves one HTTP connection: requests one after another while the client keeps it.
pub fn serve(mut connection: Connection, shared: &Shared) {
    let limits = connection.limits().clone();
    loop {
        let head = match connection.read_until(b"\r\n\r\n", limits.max_request_bytes) {
            Ok(head) => head,
            Err(ReadFailure::Closed | ReadFailure::Idle | ReadFailure::Io(_)) => return,
            Err(ReadFailure::Timeout) => {
                let message = format!("the request head must arrive within {} s", limits.request_timeout.as_secs_f64());
                let _ = respond_error(&mut connection.stream, &RequestError::new(408, "timeout", message), false);
                return;
            }
            Err(ReadFailure::TooLarge) => {
                let message =
                    format!("the request head is over {} bytes (limits.max_request_bytes)", limits.max_request_bytes);
                let _ =
                    respond_error(&mut connection.stream, &RequestError::new(431, "request_too_large", message), false);
                return;
            }
        };
        let head = match parse_head(&head) {
            Ok(head) => head,
            Err(error) => {
                let _ = respond_error(&mut connection.stream, &error, false);
                return;
            }
        };
        match handle(&mut connection, &head, shared) {
            Ok(true) if head.keep_alive => continue,
            _ => return,
        }
    }
}

/// Answers one request. Returns whether the connection can take another.
fn handle(connection: &mut Connection, head: &Head, shared: &Shared) -> std::io::Result<bool> {
    let limits = connection.limits().clone();
    let keep_alive = head.keep_alive;
    // The body first, so an error response leaves the connection at a request boundary.
    if head.header("transfer-encoding").is_some() {
        let error = RequestError::new(
            501,
            "invalid_request_error",
            "chunked request bodies are not supported; send Content-Length",
        );
        respond_error(&mut connection.stream, &error, false)?;
        return Ok(false);
    }
    let length = match head.header("content-length") {
        None => 0,
        Some(text) => match text.parse::<usize>() {
            Ok(n) => n,
            Err(_) => {
                let error = RequestError::invalid(None, format!("Content-Length {text:?} is not a number"));
                respond_error(&mut connection.stream, &error, false)?;
                return Ok(false);
            }
        },
    };
    if length > limits.max_request_bytes {
        let message =
            format!("the body is {length} bytes; the limit is {} (limits.max_request_bytes)", limits.max_request_bytes);
        respond_error(&mut connection.stream, &RequestError::new(413, "request_too_large", message), false)?;
        return Ok(false);
    }
    if length > 0 && head.header("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue")) {
        connection.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let body = match connection.read_exact(length) {
        Ok(body) => body,
        Err(ReadFailure::Timeout) => {
            let message = format!("the body must arrive within {} s", limits.request_timeout.as_secs_f64());
            respond_error(&mut connection.stream, &RequestError::new(408, "timeout", message), false)?;
            return Ok(false);
        }
        Err(_) => return Ok(false),
    };

    let engine = &shared.engine;
    if connection.health_only && !(head.method == "GET" && head.path == "/health") {
        // Admitted in the slot kept for the health check, when every other slot is busy.
        let open = shared.connections.open();
        let error =
            RequestError::new(503, "server_busy", format!("busy: {open} connections are open; try again later"));
        respond_error(&mut connection.stream, &error, false)?;
        return Ok(false);
    }
    let endpoint = match (head.method.as_str(), head.path.as_str()) {
        ("GET", "/health") => {
            let stats = &engine.stats;
            let body = json!({
                "status": if engine.stopping.load(Ordering::SeqCst) { "stopping" } else { "ok" },
                "model": engine.info.name,
                "context": engine.info.context,
                "running": stats.running.load(Ordering::SeqCst),
                "queued": stats.queued.load(Ordering::SeqCst),
                "queue_depth": engine.queue_depth,
                "served": stats.served.load(Ordering::Relaxed),
                "refused": stats.refused.load(Ordering::Relaxed),
                "failed": stats.failed.load(Ordering::Relaxed),
                "cancelled": stats.cancelled.load(Ordering::Relaxed),
                "connections": shared.connections.open(),
                "decode_allocations": engine.decode_allocations(),
            });
            respond(&mut connection.stream, 200, &body, keep_alive)?;
            return Ok(true);
        }
        (_, "/health" | "/v1/models" | "/bias") if head.method != "GET" => None,
        ("GET", "/v1/models" | "/bias") => Some(Endpoint::Ndjson), // answered below, after the token check
        ("POST", "/v1/completions") => Some(Endpoint::Completions),
        ("POST", "/v1/chat/completions") => Some(Endpoint::ChatCompletions),
        (_, "/v1/completions" | "/v1/chat/completions") => None,
        (_, path) => {
            let error = RequestError::new(
                404,
                "not_found",
                format!(
                    "no endpoint {path}; this daemon serves /health, /v1/models, /bias, /v1/completions, /v1/chat/completions"
                ),
            );
            respond_error(&mut connection.stream, &error, keep_alive)?;
            return Ok(true);
        }
    };
    let Some(endpoint) = endpoint else {
        let error =
            RequestError::new(405, "method_not_allowed", format!("{} is not allowed on {}", head.method, head.path));
        respond_error(&mut connection.stream, &error, keep_alive)?;
        return Ok(true);
    };

    let bearer = head.header("authorization").and_then(|value| value.strip_prefix("Bearer ")).map(str::trim);
    if !shared.authorized(bearer) {
        let error =
            RequestError::new(401, "authentication_error", "missing or wrong token: send Authorization: Bearer TOKEN");
        respond_error(&mut connection.stream, &error, keep_alive)?;
        return Ok(true);
    }
    if endpoint == Endpoint::Ndjson && head.path == "/bias" {
        let body = engine.bias.lock().unwrap_or_else(|e| e.into_inner()).json();
        respond(&mut connection.stream, 200, &body, keep_alive)?;
        return Ok(true);
    }
    if endpoint == Endpoint::Ndjson {
        let body = json!({
            "object": "list",
            "data": [{"id": engine.info.name, "object": "model", "created": 0, "owned_by": "bramble", "context_length": engine.info.context}],
        });
        respond(&mut connection.stream, 200, &body, keep_alive)?;
        return Ok(true);
    }

    let mut parsed = match request::parse(&body, endpoint, &shared.config.sampling, &limits) {
        Ok(parsed) => parsed,
        Err(error) => {
            respond_error(&mut connection.stream, &error, keep_alive)?;
            return Ok(true);
        }
    };
    if let Prompt::Chat { trim_to_fit, .. } = &mut parsed.generation.prompt {
        // An app sends the conversation it wants answered; cutting it silently would change the question.
        *trim_to_fit = false;
    }
    let out = TcpPort::new(connection.stream.try_clone()?)?;
    let chat = endpoint == Endpoint::ChatCompletions;
    let sink =
        CompletionSink::new(out, chat, parsed.stream, keep_alive, &engine.info.name, parsed.generation.max_tokens);
    let cancel = Arc::new(AtomicBool::new(false));
    let outcome = match engine.submit(parsed.generation, Box::new(sink), Arc::clone(&cancel)) {
        Ok(outcome) => outcome,
        Err(refusal) => {
            respond_error(&mut connection.stream, &refusal.error(engine.queue_depth), keep_alive)?;
            return Ok(true);
        }
    };
    Ok(match engine::wait(&outcome, &cancel, || connection.peer_gone()) {
        Outcome::Finished { reason, .. } => reason != FinishReason::Cancelled,
        Outcome::Failed(_) => true,
        Outcome::Disconnected => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_and_bad_ones_are_named() {
        let head =
            parse_head(b"POST /v1/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close")
                .unwrap();
        assert_eq!((head.method.as_str(), head.path.as_str()), ("POST", "/v1/completions"));
        assert_eq!(head.header("content-length"), Some("5"));
        assert!(!head.keep_alive);
        assert!(parse_head(b"GET / HTTP/1.0").is_ok_and(|h| !h.keep_alive));
        assert!(parse_head(b"garbage").unwrap_err().message.contains("request line"));
        assert_eq!(parse_head(b"GET / HTTP/2.0").unwrap_err().status, 505);
        assert!(parse_head(b"GET / HTTP/1.1\r\nno colon here").unwrap_err().message.contains("header"));
        assert!(parse_head(b"GET / HTTP/1.1\r\n\xff: x").unwrap_err().message.contains("UTF-8"));
    }
}

//! The NDJSON protocol: one JSON object per line each way, as ollama's
//! `/api/generate` frames its stream.
//!
//! ```text
//! → {"prompt": "Why is the sky blue?", "max_tokens": 32, "temperature": 0}
//! ← {"model":"smollm2-135m-q4","response":"The","done":false}
//! ← {"model":"smollm2-135m-q4","response":" sky","done":false}
//! ← {"model":"smollm2-135m-q4","response":"","done":true,"done_reason":"length","prompt_eval_count":7,...}
//! ```
//!
//! A request is `prompt` (text) or `messages` (a chat), with `max_tokens`,
//! `temperature`, `top_p`, `top_k`, `min_p`, `repeat_penalty`, `seed`, `stop`,
//! `stream` (default true; false sends one line with the whole response) and,
//! when the daemon has a token, `auth`. Errors are one line,
//! `{"error":{"message":...,"type":...,"param":...},"done":true}`; the
//! connection stays open after a bad request (it is line-framed), but not after
//! a line over the byte cap or a timeout. The final line carries the
//! response's `bias_signal` (null when the bias feedback is off).

use crate::connection::{Connection, ReadFailure, Shared};
use crate::engine::{self, FinishReason, Outcome, RequestError, TokenSink, Usage};
use crate::json;
use crate::request::{self, Endpoint};
use crate::transport::{TcpPort, Write};
use serde_json::json;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The error line for `error`.
pub fn error_line(error: &RequestError) -> Vec<u8> {
    let mut line = serde_json::to_vec(&json!({
        "error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.status},
        "done": true,
    }))
    .unwrap_or_default();
    line.push(b'\n');
    line
}

/// Streams lines to the client (or, with `stream: false`, gathers the text for one line).
struct NdjsonSink {
    out: TcpPort,
    stream: bool,
    /// `{"model":"NAME","response":` — the part of each line before the text.
    prefix: Vec<u8>,
    /// The line being written, reused.
    line: Vec<u8>,
    /// The whole response when not streaming.
    text: String,
    model: String,
}

impl NdjsonSink {
    fn new(out: TcpPort, stream: bool, model: &str, max_tokens: usize) -> Self {
        let mut prefix = b"{\"model\":".to_vec();
        json::push_string(&mut prefix, model);
        prefix.extend_from_slice(b",\"response\":");
        // Room for every token's text, so neither buffer grows while decoding.
        let text = if stream { String::new() } else { String::with_capacity(max_tokens * 16) };
        Self { out, stream, prefix, line: Vec::with_capacity(1024), text, model: model.to_string() }
    }
}

fn nanos(duration: std::time::Duration) -> u64 {
    duration.as_nanos().min(u64::MAX as u128) as u64
}

impl TokenSink for NdjsonSink {
    fn start(&mut self, _prompt_tokens: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn text(&mut self, piece: &str) -> std::io::Result<()> {
        if !self.stream {
            self.text.push_str(piece);
            return Ok(());
        }
        self.line.clear();
        self.line.extend_from_slice(&self.prefix);
        json::push_string(&mut self.line, piece);
        self.line.extend_from_slice(b",\"done\":false}\n");
        self.out.write_all(&self.line)
    }

    fn finish(&mut self, reason: FinishReason, usage: &Usage) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(&json!({
            "model": self.model,
            "response": self.text,
            "done": true,
            "done_reason": reason.name(),
            "prompt_eval_count": usage.prompt_tokens,
            "prompt_cached_count": usage.cached_tokens,
            "eval_count": usage.completion_tokens,
            "queue_duration": nanos(usage.queued),
            "prompt_eval_duration": nanos(usage.prefill),
            "eval_duration": nanos(usage.decode),
            "total_duration": nanos(usage.queued + usage.prefill + usage.decode),
            "bias_signal": usage.bias_signal,
            "bias_regenerations": usage.bias_regenerations,
        }))?;
        line.push(b'\n');
        self.out.write_all(&line)
    }

    fn fail(&mut self, error: &RequestError) -> std::io::Result<()> {
        self.out.write_all(&error_line(error))
    }

    fn discard(&mut self) -> bool {
        // Streamed lines are gone; a whole response is still here.
        self.text.clear();
        !self.stream
    }

    fn client_present(&self) -> bool {
        !crate::connection::peer_gone(self.out.stream())
    }
}

/// Serves one NDJSON connection until it closes, idles out or misbehaves.
pub fn serve(mut connection: Connection, shared: &Shared) {
    let limits = connection.limits().clone();
    let send = |connection: &mut Connection, error: &RequestError| {
        let _ = std::io::Write::write_all(&mut connection.stream, &error_line(error));
    };
    loop {
        let line = match connection.read_until(b"\n", limits.max_request_bytes) {
            Ok(line) => line,
            Err(ReadFailure::Closed | ReadFailure::Idle) => return,
            Err(ReadFailure::Timeout) => {
                let seconds = limits.request_timeout.as_secs_f64();
                send(
                    &mut connection,
                    &RequestError::new(408, "timeout", format!("a request line must arrive whole within {seconds} s")),
                );
                return;
            }
            Err(ReadFailure::TooLarge) => {
                let error = RequestError::new(
                    413,
                    "request_too_large",
                    format!(
                        "the request line is longer than {} bytes (limits.max_request_bytes)",
                        limits.max_request_bytes
                    ),
                );
                send(&mut connection, &error);
                return;
            }
            Err(ReadFailure::Io(_)) => return,
        };
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = match request::parse(line, Endpoint::Ndjson, &shared.config.sampling, &limits) {
            Ok(parsed) => parsed,
            Err(error) => {
                send(&mut connection, &error);
                continue;
            }
        };
        if !shared.authorized(parsed.auth.as_deref()) {
            send(
                &mut connection,
                &RequestError::new(401, "authentication_error", "missing or wrong auth token (the \"auth\" field)"),
            );
            continue;
        }
        let out = match connection.stream.try_clone().and_then(TcpPort::new) {
            Ok(out) => out,
            Err(_) => return,
        };
        let sink = NdjsonSink::new(out, parsed.stream, &shared.engine.info.name, parsed.generation.max_tokens);
        let cancel = Arc::new(AtomicBool::new(false));
        let outcome = match shared.engine.submit(parsed.generation, Box::new(sink), Arc::clone(&cancel)) {
            Ok(outcome) => outcome,
            Err(refusal) => {
                send(&mut connection, &refusal.error(shared.engine.queue_depth));
                continue;
            }
        };
        match engine::wait(&outcome, &cancel, || connection.peer_gone()) {
            Outcome::Disconnected => return,
            Outcome::Finished { .. } | Outcome::Failed(_) => {}
        }
    }
}

//! The OpenAI-compatible HTTP/1.1 server: `GET /health`, `GET /v1/models`,
//! `POST /v1/completions`, `POST /v1/chat/completions`, and `GET /bias` (the
//! bias feedback: `{"feedback", "weights", "recent_signals", "responses"}`).
//! A completion carries its response's bias signal in an extra top-level
//! field, `bias_signal` (null when the feedback is off). Streaming answers are
//! Server-Sent Events (in a chunked body, so the connection can be kept; to
//! an HTTP/1.0 client, raw and ended by closing the connection) ending in
//! `data: [DONE]`; errors are OpenAI's `{"error": {...}}`. `HEAD` is answered
//! on the `GET` paths (the headers a `GET` gets, no body), `OPTIONS` on all.
//!
//! The request head is parsed by `httparse`, with the checks it leaves to its
//! caller on top ([`parse_head`]): every line ends in CRLF (a bare LF is
//! refused), `Content-Length` is digits and given once, `Host` is given once
//! (and must be, in HTTP/1.1: RFC 9112 §3.2), and a `Transfer-Encoding` is
//! refused (no chunked bodies: 501 alone, 400 beside a `Content-Length`). A
//! head that is wrong is answered 400 and the connection closed (RFC 9112 §5,
//! §6.3), so nothing after it can be taken for a second request; bytes that
//! cannot begin an HTTP/1.x head (a TLS handshake) are refused as they arrive,
//! not at the request timeout. Absolute-form targets and empty lines before
//! the request line are accepted (RFC 9112 §3.2.2, §2.2).
//!
//! Web pages: on a loopback listener only loopback `Host` names are served
//! (DNS rebinding: a page whose name was rebound to 127.0.0.1 gets 403); a
//! request whose `Origin` is neither on this machine (loopback), the `Host`
//! itself, nor in `tcp.cors_origins` gets 403; an allowed one gets
//! `Access-Control-Allow-Origin` and its preflight (`OPTIONS`) answered; a POST
//! body must be `application/json` (else 415), which a page cannot send to
//! another site without a preflight.

use crate::connection::{Connection, ReadFailure, Shared};
use crate::engine::{self, FinishReason, Outcome, Prompt, RequestError, TokenSink, Usage};
use crate::json;
use crate::request::{self, Endpoint};
use crate::transport::TcpPort;
use serde_json::{json, Value};
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The most header lines a request may have.
pub const MAX_HEADERS: usize = 64;

/// Empty lines ignored before a request line (RFC 9112 §2.2 asks for at least one).
pub const MAX_EMPTY_LINES: usize = 8;

/// A head's first bytes are parsed after every read, so that what is not
/// HTTP is refused at once; past them, only when an empty line may have ended
/// the head, which keeps the work linear in the head's length.
const EARLY_PARSE_BYTES: usize = 1024;

/// Headers a request may carry once at most: a second one could be read
/// differently by another parser on the way (RFC 9110 §5.3, RFC 9112 §6.3).
const SINGLE_HEADERS: [&str; 6] =
    ["Content-Length", "Transfer-Encoding", "Host", "Content-Type", "Authorization", "Origin"];

/// A request head, parsed and checked by [`parse_head`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The method, an RFC 9110 token.
    pub method: String,
    /// The target's path without its query: as sent (origin-form), taken
    /// from an absolute-form target (`http://host/path`), or `*`.
    pub path: String,
    /// The authority (`host[:port]`) of an absolute-form target.
    pub authority: Option<String>,
    /// The header fields in order: each name a token, each value UTF-8
    /// without surrounding whitespace or control characters.
    pub headers: Vec<(String, String)>,
    /// HTTP/1.0 rather than HTTP/1.1.
    pub http10: bool,
    /// Whether the connection may carry another request after this one.
    pub keep_alive: bool,
    /// The body's length in bytes (`Content-Length`; 0 without one).
    pub content_length: u64,
}

impl Head {
    /// The value of the header named `name` (any case), the first if there are several.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn count(&self, name: &str) -> usize {
        self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).count()
    }
}

/// Whether `byte` may be in a token (RFC 9110 §5.6.2 tchar): a method or a header name.
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

fn is_token(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(is_token_byte)
}

/// `bytes` for an error message: as text, cut short.
fn quote(bytes: &[u8]) -> String {
    const MOST: usize = 80;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MOST)]);
    let more = if bytes.len() > MOST { "…" } else { "" };
    format!("{text:?}{more}")
}

/// Splits an authority, `host[:port]` (RFC 3986 without user information),
/// into the host (an IPv6 literal keeps its brackets) and the port; `None` if
/// `text` is not one.
pub fn split_authority(text: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(inside) = text.strip_prefix('[') {
        let (address, after) = inside.split_once(']')?;
        if address.is_empty() || !address.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
            return None;
        }
        let port = if after.is_empty() { None } else { Some(after.strip_prefix(':')?) };
        (&text[..address.len() + 2], port)
    } else {
        let (host, port) = match text.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        };
        let reg_name = |b: u8| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b);
        if host.is_empty() || !host.bytes().all(reg_name) {
            return None;
        }
        (host, port)
    };
    let port = match port {
        None => None,
        Some(digits) if (1..=5).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) => {
            Some(digits.parse().ok()?)
        }
        Some(_) => return None,
    };
    Some((host, port))
}

/// Splits an origin, `scheme://host[:port]` (RFC 6454, as a browser sends it
/// in `Origin`), into its scheme and authority; `None` if `text` is not one
/// (`null`, a path, a trailing slash, user information).
pub fn split_origin(text: &str) -> Option<(&str, &str)> {
    let (scheme, authority) = text.split_once("://")?;
    let mut bytes = scheme.bytes();
    let scheme_ok = bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    (scheme_ok && split_authority(authority).is_some()).then_some((scheme, authority))
}

/// Whether `host` (as [`split_authority`] gives it) names this machine's
/// loopback interface: `localhost`, `127.x.y.z` or `[::1]`.
pub fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<Ipv4Addr>().is_ok_and(|address| address.is_loopback())
        || host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .and_then(|h| h.parse::<Ipv6Addr>().ok())
            .is_some_and(|address| address.is_loopback())
}

fn bare_lf_error() -> RequestError {
    RequestError::invalid(None, "a line of the request head ends in a bare LF; HTTP/1.1 lines end in CRLF")
}

/// Refuses a line that ends in LF without CR, looking at the LFs of `bytes[from..]`.
fn check_line_ends(bytes: &[u8], from: usize) -> Result<(), RequestError> {
    match (from..bytes.len()).find(|&i| bytes[i] == b'\n' && (i == 0 || bytes[i - 1] != b'\r')) {
        Some(_) => Err(bare_lf_error()),
        None => Ok(()),
    }
}

/// What is wrong with a request line that `httparse` refused.
fn request_line_problem(line: &[u8]) -> RequestError {
    if let Some(&first) = line.first().filter(|&&b| !is_token_byte(b)) {
        let start: Vec<String> = line.iter().take(4).map(|b| format!("{b:02x}")).collect();
        let hint = if first == 0x16 { ": a TLS handshake? this port serves plain HTTP, not https" } else { "" };
        return RequestError::invalid(
            None,
            format!("not an HTTP/1.x request: it begins with the bytes {}{hint}", start.join(" ")),
        );
    }
    let parts: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    if let [_, _, version] = parts[..] {
        let shaped = |v: &[u8]| {
            v.len() == 8 && v.starts_with(b"HTTP/") && v[5].is_ascii_digit() && v[6] == b'.' && v[7].is_ascii_digit()
        };
        if shaped(version) {
            let message = format!("{} is not HTTP/1.0 or HTTP/1.1", quote(version));
            return RequestError::new(505, "invalid_request_error", message);
        }
    }
    RequestError::invalid(None, format!("not an HTTP/1.x request: the request line {} is malformed", quote(line)))
}

/// What is wrong with a header line, if anything.
fn header_line_problem(line: &[u8]) -> Option<RequestError> {
    let problem = |message: String| Some(RequestError::invalid(None, message));
    if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
        return problem(format!(
            "the header line {} begins with whitespace: obsolete line folding (obs-fold) is refused",
            quote(line)
        ));
    }
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return problem(format!("the header line {} has no colon", quote(line)));
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    let trimmed = name.trim_ascii_end();
    if trimmed.len() < name.len() && !trimmed.is_empty() && trimmed.iter().all(|&b| is_token_byte(b)) {
        return problem(format!("whitespace between the header name {} and the colon", quote(trimmed)));
    }
    if name.is_empty() || !name.iter().all(|&b| is_token_byte(b)) {
        return problem(format!("header name {} is not a token", quote(name)));
    }
    if value.contains(&b'\r') {
        return problem(format!("header {} has a CR that does not end its line", quote(name)));
    }
    if let Some(&control) = value.iter().find(|&&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return problem(format!("header {} has a control character (0x{control:02x}) in its value", quote(name)));
    }
    None
}

/// What is wrong with `bytes` (a head without its leading empty lines),
/// which `httparse` refused with `error`: the first problem in reading order.
fn head_problem(bytes: &[u8], error: httparse::Error) -> RequestError {
    let line_end = bytes.iter().position(|&b| b == b'\n');
    if matches!(error, httparse::Error::Token | httparse::Error::Version | httparse::Error::NewLine) {
        let line = &bytes[..line_end.unwrap_or(bytes.len())];
        return request_line_problem(line.strip_suffix(b"\r").unwrap_or(line));
    }
    let mut position = 0;
    let mut request_line = true;
    while position < bytes.len() {
        let (line, ended) = match bytes[position..].iter().position(|&b| b == b'\n') {
            Some(at) => (&bytes[position..position + at], true),
            None => (&bytes[position..], false),
        };
        position += line.len() + 1;
        if ended && !line.ends_with(b"\r") {
            return bare_lf_error();
        }
        let text = if ended { &line[..line.len() - 1] } else { line };
        if std::mem::take(&mut request_line) {
            continue;
        }
        if text.is_empty() {
            break;
        }
        if let Some(problem) = header_line_problem(text) {
            return problem;
        }
    }
    RequestError::invalid(None, format!("malformed request head ({error})"))
}

/// The path and authority of a request target (RFC 9112 §3.2).
fn split_target(method: &str, target: &str) -> Result<(String, Option<String>), RequestError> {
    let path_of = |text: &str| text.split(['?', '#']).next().unwrap_or_default().to_string();
    if target.starts_with('/') {
        return Ok((path_of(target), None));
    }
    if target == "*" && method == "OPTIONS" {
        return Ok(("*".to_string(), None));
    }
    let scheme_length = ["http://", "https://"]
        .iter()
        .find(|scheme| target.get(..scheme.len()).is_some_and(|s| s.eq_ignore_ascii_case(scheme)))
        .map(|scheme| scheme.len());
    if let Some(length) = scheme_length {
        let rest = &target[length..];
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..end];
        if split_authority(authority).is_some() {
            let path = path_of(&rest[end..]);
            let path = if path.is_empty() { "/".to_string() } else { path };
            return Ok((path, Some(authority.to_string())));
        }
    }
    Err(RequestError::invalid(
        None,
        format!("the request target {} is neither a path (/...) nor an http:// URL", quote(target.as_bytes())),
    ))
}

/// Parses the request head at the start of `bytes`: `Ok(None)` while it is
/// incomplete, else the head and its length in bytes, with the empty line
/// that ends it (what follows is its body or the next request). Up to
/// [`MAX_EMPTY_LINES`] empty lines before the request line are skipped. The
/// error names what is wrong; its status is 400, or 431 (more than
/// [`MAX_HEADERS`] header lines), 501 (a `Transfer-Encoding`), 505 (an HTTP
/// version other than 1.0 and 1.1).
pub fn parse_head(bytes: &[u8]) -> Result<Option<(Head, usize)>, RequestError> {
    let mut start = 0;
    while bytes[start..].starts_with(b"\r\n") {
        start += 2;
        if start / 2 > MAX_EMPTY_LINES {
            return Err(RequestError::invalid(
                None,
                format!("more than {MAX_EMPTY_LINES} empty lines before the request line"),
            ));
        }
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut fields);
    let length = match request.parse(bytes) {
        Ok(httparse::Status::Partial) => {
            check_line_ends(bytes, 0)?;
            return Ok(None);
        }
        Ok(httparse::Status::Complete(length)) => length,
        Err(httparse::Error::TooManyHeaders) => {
            let message = format!("more than {MAX_HEADERS} header lines");
            return Err(RequestError::new(431, "invalid_request_error", message));
        }
        Err(error) => return Err(head_problem(&bytes[start..], error)),
    };
    // httparse takes a bare LF for a line end; only the head's own bytes are looked at, the body may hold any.
    check_line_ends(&bytes[..length], 0)?;
    let (Some(method), Some(target), Some(version)) = (request.method, request.path, request.version) else {
        return Err(RequestError::invalid(None, "malformed request line"));
    };
    let (path, authority) = split_target(method, target)?;
    let mut headers = Vec::with_capacity(request.headers.len());
    for field in request.headers.iter() {
        let value = std::str::from_utf8(field.value).map_err(|_| {
            RequestError::invalid(
                None,
                format!("the value of header {} is not valid UTF-8", quote(field.name.as_bytes())),
            )
        })?;
        headers.push((field.name.to_string(), value.trim_matches([' ', '\t']).to_string()));
    }
    let mut head = Head {
        method: method.to_string(),
        path,
        authority,
        headers,
        http10: version == 0,
        keep_alive: version == 1,
        content_length: 0,
    };
    for name in SINGLE_HEADERS {
        match head.count(name) {
            0 | 1 => {}
            2 => return Err(RequestError::invalid(None, format!("two {name} headers; one at most is allowed"))),
            n => return Err(RequestError::invalid(None, format!("{n} {name} headers; one at most is allowed"))),
        }
    }
    if let Some(coding) = head.header("transfer-encoding") {
        if head.header("content-length").is_some() {
            return Err(RequestError::invalid(
                None,
                "both Transfer-Encoding and Content-Length: the body's length would be ambiguous",
            ));
        }
        let message = format!(
            "chunked request bodies are not supported (Transfer-Encoding {}); send Content-Length",
            quote(coding.as_bytes())
        );
        return Err(RequestError::new(501, "invalid_request_error", message));
    }
    if let Some(text) = head.header("content-length") {
        // Digits only (RFC 9110 §8.6): Rust's parse would also take a sign.
        let digits = text.bytes().all(|b| b.is_ascii_digit());
        head.content_length =
            text.parse().ok().filter(|_| digits).ok_or_else(|| {
                RequestError::invalid(None, format!("Content-Length {text:?} is not a number of bytes"))
            })?;
    }
    match head.header("host") {
        None if !head.http10 => {
            return Err(RequestError::invalid(None, "an HTTP/1.1 request must have a Host header (RFC 9112 §3.2)"))
        }
        Some(host) if split_authority(host).is_none() => {
            return Err(RequestError::invalid(None, format!("Host {} is not host[:port]", quote(host.as_bytes()))))
        }
        _ => {}
    }
    // `close` wins over `keep-alive`; either may be one option of a list.
    let option = |name| head.headers.iter().any(|(n, v)| n.eq_ignore_ascii_case("connection") && has_option(v, name));
    let (close, keep_alive) = (option("close"), option("keep-alive"));
    if close {
        head.keep_alive = false;
    } else if keep_alive {
        head.keep_alive = true;
    }
    Ok(Some((head, length)))
}

/// Whether the comma-separated list `value` holds `option` (any case).
fn has_option(value: &str, option: &str) -> bool {
    value.split(',').any(|item| item.trim().eq_ignore_ascii_case(option))
}

/// [`parse_head`] as bytes arrive, `shown` of them seen by an earlier call:
/// the bytes are parsed after every read until [`EARLY_PARSE_BYTES`] have
/// been seen, so what is not HTTP is refused at once; after that, only when
/// an empty line may have ended the head, the new bytes meanwhile checked for
/// bare LFs, so that a long head costs time linear in its length.
fn head_progress(bytes: &[u8], shown: usize) -> Result<Option<(Head, usize)>, RequestError> {
    let ended = bytes[shown.saturating_sub(3)..].windows(4).any(|w| w == b"\r\n\r\n");
    if shown < EARLY_PARSE_BYTES || ended {
        return parse_head(bytes);
    }
    check_line_ends(bytes, shown).map(|()| None)
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
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

/// What every response to one request carries besides its status and body.
#[derive(Debug, Clone, Default)]
struct Reply {
    keep_alive: bool,
    /// The request was HEAD: the headers a GET gets, and no body.
    head_only: bool,
    /// `Access-Control-Allow-Origin` and `Vary` for a cross-origin caller
    /// that is allowed, as header lines each ending in CRLF; else empty.
    cors: String,
}

impl Reply {
    fn closing() -> Self {
        Self::default()
    }
}

/// Writes a whole response; `extra` is more header lines, each ending in CRLF.
fn write_response(
    out: &mut impl std::io::Write,
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
    reply: &Reply,
    extra: &str,
) -> std::io::Result<()> {
    let mut response = Vec::with_capacity(body.len() + 256);
    write!(response, "HTTP/1.1 {status} {}\r\n", reason_phrase(status))?;
    if let Some(content_type) = content_type {
        write!(response, "Content-Type: {content_type}\r\n")?;
    }
    // A 204 has no body and says nothing of its length (RFC 9110 §8.6).
    if status != 204 {
        write!(response, "Content-Length: {}\r\n", body.len())?;
    }
    write!(response, "Connection: {}\r\n", if reply.keep_alive { "keep-alive" } else { "close" })?;
    if status == 503 {
        response.extend_from_slice(b"Retry-After: 1\r\n");
    }
    if status == 401 {
        response.extend_from_slice(b"WWW-Authenticate: Bearer\r\n");
    }
    response.extend_from_slice(reply.cors.as_bytes());
    response.extend_from_slice(extra.as_bytes());
    response.extend_from_slice(b"\r\n");
    if !reply.head_only {
        response.extend_from_slice(body);
    }
    out.write_all(&response)
}

/// Writes a whole JSON response.
fn respond(out: &mut impl std::io::Write, status: u16, body: &Value, reply: &Reply) -> std::io::Result<()> {
    write_response(out, status, Some("application/json"), &serde_json::to_vec(body)?, reply, "")
}

fn respond_error(out: &mut impl std::io::Write, error: &RequestError, reply: &Reply) -> std::io::Result<()> {
    respond(out, error.status, &error_body(error), reply)
}

/// Ends a connection after an answer that closes it: our side is shut
/// first, then what the client still sends is read and dropped for a moment,
/// so that unread bytes do not make the kernel reset the connection and
/// destroy the answer on its way.
fn close_gracefully(stream: &TcpStream) {
    const LINGER: Duration = Duration::from_secs(1);
    const MOST: usize = 256 * 1024;
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut dropped = 0;
    let mut chunk = [0u8; 4096];
    while dropped < MOST {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match (&*stream).read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => dropped += n,
        }
    }
}

/// Answers `error` and ends the connection.
fn refuse(connection: &mut Connection, error: &RequestError) {
    if respond_error(&mut connection.stream, error, &Reply::closing()).is_ok() {
        close_gracefully(&connection.stream);
    }
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
    /// Framing and the headers every response carries.
    reply: Reply,
    /// Events go in a chunked body; else (HTTP/1.0) raw, the connection's close ending them.
    chunked: bool,
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
    fn new(
        out: TcpPort,
        chat: bool,
        stream: bool,
        reply: Reply,
        chunked: bool,
        model: &str,
        max_tokens: usize,
    ) -> Self {
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
            reply,
            chunked,
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

    /// Sends `self.event`: one chunk of the chunked body, or as it is.
    fn send_event(&mut self) -> std::io::Result<()> {
        if !self.chunked {
            return embedded_io::Write::write_all(&mut self.out, &self.event);
        }
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

    /// `data: [DONE]` and the end of the chunked body (a raw stream ends when the connection closes).
    fn end_stream(&mut self) -> std::io::Result<()> {
        self.event.clear();
        self.event.extend_from_slice(b"data: [DONE]\n\n");
        self.send_event()?;
        if !self.chunked {
            return Ok(());
        }
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
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n{}Connection: {}\r\n{}\r\n",
            if self.chunked { "Transfer-Encoding: chunked\r\n" } else { "" },
            if self.reply.keep_alive { "keep-alive" } else { "close" },
            self.reply.cors,
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
        let reply = self.reply.clone();
        respond(&mut PortWriter(&mut self.out), 200, &body, &reply)
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
        let reply = self.reply.clone();
        respond_error(&mut PortWriter(&mut self.out), error, &reply)
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
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        // Whole, within the send timeout from the first byte (`transport::send_all`).
        embedded_io::Write::write_all(self.0, buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        embedded_io::Write::flush(self.0)
    }
}

/// Serves one HTTP connection: requests one after another while the client keeps it.
pub fn serve(mut connection: Connection, shared: &Shared) {
    let limits = connection.limits().clone();
    loop {
        let head = match connection.read_head(limits.max_request_bytes, head_progress) {
            Ok(Ok(head)) => head,
            Ok(Err(error)) => return refuse(&mut connection, &error),
            Err(ReadFailure::Closed | ReadFailure::Idle | ReadFailure::Io(_)) => return,
            Err(ReadFailure::Timeout) => {
                let message = format!("the request head must arrive within {} s", limits.request_timeout.as_secs_f64());
                return refuse(&mut connection, &RequestError::new(408, "timeout", message));
            }
            Err(ReadFailure::TooLarge) => {
                let message =
                    format!("the request head is over {} bytes (limits.max_request_bytes)", limits.max_request_bytes);
                return refuse(&mut connection, &RequestError::new(431, "request_too_large", message));
            }
        };
        match handle(&mut connection, &head, shared) {
            Ok(true) => continue,
            Ok(false) => return close_gracefully(&connection.stream),
            Err(_) => return,
        }
    }
}

/// The methods a path allows, for `Allow` and CORS; `None` for no endpoint.
fn allowed_methods(path: &str) -> Option<&'static str> {
    match path {
        "/health" | "/v1/models" | "/bias" => Some("GET, HEAD, OPTIONS"),
        "/v1/completions" | "/v1/chat/completions" => Some("POST, OPTIONS"),
        // `OPTIONS *` asks about the server as a whole (RFC 9110 §9.3.7).
        "*" => Some("GET, HEAD, POST, OPTIONS"),
        _ => None,
    }
}

/// The token of an `Authorization: Bearer TOKEN` header; the scheme is
/// case-insensitive (RFC 9110 §11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once([' ', '\t'])?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Refuses what a web page on another site could send: on a loopback
/// listener, a `Host` (or absolute-form authority) that is not loopback (DNS
/// rebinding); and an `Origin` that is neither on this machine, the `Host`
/// itself, nor in `tcp.cors_origins`. Returns the `Origin` to name in
/// `Access-Control-Allow-Origin`, if one was sent and is allowed.
fn check_site<'a>(head: &'a Head, shared: &Shared) -> Result<Option<&'a str>, RequestError> {
    let forbidden = |message: String| RequestError::new(403, "permission_error", message);
    if shared.config.tcp.http.is_some_and(|address| address.ip().is_loopback()) {
        for authority in [head.header("host"), head.authority.as_deref()].into_iter().flatten() {
            if !split_authority(authority).is_some_and(|(host, _)| is_loopback_host(host)) {
                return Err(forbidden(format!(
                    "Host {authority:?} is not a loopback name: brambled listens on loopback and answers only \
                     localhost, 127.0.0.1 or [::1] (a web page whose name points at this machine is refused)"
                )));
            }
        }
    }
    let Some(origin) = head.header("origin") else { return Ok(None) };
    let listed = shared.config.tcp.cors_origins.iter().any(|allowed| allowed.eq_ignore_ascii_case(origin));
    let local = split_origin(origin).is_some_and(|(_, authority)| {
        split_authority(authority).is_some_and(|(host, _)| is_loopback_host(host))
            || head.header("host").is_some_and(|host| host.eq_ignore_ascii_case(authority))
    });
    if listed || local {
        Ok(Some(origin))
    } else {
        Err(forbidden(format!(
            "Origin {origin:?} may not call brambled: only pages on this machine and the origins in \
             tcp.cors_origins may"
        )))
    }
}

/// The header lines answering a CORS preflight from an allowed origin:
/// the path's methods, and the headers asked for (tokens only) besides
/// `Authorization` and `Content-Type`.
fn preflight_headers(head: &Head, methods: &str) -> String {
    let mut headers = vec!["Authorization", "Content-Type"];
    for asked in head.header("access-control-request-headers").unwrap_or_default().split(',').map(str::trim) {
        if is_token(asked) && !headers.iter().any(|h| h.eq_ignore_ascii_case(asked)) {
            headers.push(asked);
        }
    }
    format!(
        "Access-Control-Allow-Methods: {methods}\r\nAccess-Control-Allow-Headers: {}\r\nAccess-Control-Max-Age: 600\r\n",
        headers.join(", ")
    )
}

/// Requires a JSON body: `application/json`, with any parameters.
fn check_json_body(head: &Head) -> Result<(), RequestError> {
    let unsupported = |message: String| RequestError::new(415, "invalid_request_error", message);
    match head.header("content-type") {
        None => Err(unsupported("no Content-Type: the body must be sent as application/json".to_string())),
        Some(value) if value.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case("application/json") => {
            Ok(())
        }
        Some(value) => Err(unsupported(format!("Content-Type {value:?} is not application/json"))),
    }
}

/// Answers one request. Returns whether the connection can take another.
fn handle(connection: &mut Connection, head: &Head, shared: &Shared) -> std::io::Result<bool> {
    let limits = connection.limits().clone();
    let mut reply = Reply { keep_alive: head.keep_alive, head_only: head.method == "HEAD", cors: String::new() };
    // The body first, so an error response leaves the connection at a request boundary.
    let length = match usize::try_from(head.content_length) {
        Ok(length) if length <= limits.max_request_bytes => length,
        _ => {
            let message = format!(
                "the body is {} bytes; the limit is {} (limits.max_request_bytes)",
                head.content_length, limits.max_request_bytes
            );
            respond_error(
                &mut connection.stream,
                &RequestError::new(413, "request_too_large", message),
                &Reply::closing(),
            )?;
            return Ok(false);
        }
    };
    if length > 0 && head.header("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue")) {
        connection.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let body = match connection.read_exact(length) {
        Ok(body) => body,
        Err(ReadFailure::Timeout) => {
            let message = format!("the body must arrive within {} s", limits.request_timeout.as_secs_f64());
            respond_error(&mut connection.stream, &RequestError::new(408, "timeout", message), &Reply::closing())?;
            return Ok(false);
        }
        Err(_) => return Ok(false),
    };

    match check_site(head, shared) {
        Ok(Some(origin)) => reply.cors = format!("Access-Control-Allow-Origin: {origin}\r\nVary: Origin\r\n"),
        Ok(None) => {}
        Err(error) => {
            respond_error(&mut connection.stream, &error, &reply)?;
            return Ok(reply.keep_alive);
        }
    }
    let engine = &shared.engine;
    if connection.health_only && !(matches!(head.method.as_str(), "GET" | "HEAD") && head.path == "/health") {
        // Admitted in the slot kept for the health check, when every other slot is busy.
        let open = shared.connections.open();
        let error =
            RequestError::new(503, "server_busy", format!("busy: {open} connections are open; try again later"));
        respond_error(&mut connection.stream, &error, &Reply { keep_alive: false, ..reply })?;
        return Ok(false);
    }
    let Some(methods) = allowed_methods(&head.path) else {
        let path = &head.path;
        let error = RequestError::new(
            404,
            "not_found",
            format!(
                "no endpoint {path}; this daemon serves /health, /v1/models, /bias, /v1/completions, /v1/chat/completions"
            ),
        );
        respond_error(&mut connection.stream, &error, &reply)?;
        return Ok(reply.keep_alive);
    };
    if head.method == "OPTIONS" {
        // A preflight comes without credentials: it is answered before the token check.
        let extra = if reply.cors.is_empty() || head.header("access-control-request-method").is_none() {
            format!("Allow: {methods}\r\n")
        } else {
            preflight_headers(head, methods)
        };
        write_response(&mut connection.stream, 204, None, b"", &reply, &extra)?;
        return Ok(reply.keep_alive);
    }
    if !methods.split(", ").any(|method| method == head.method) {
        let error =
            RequestError::new(405, "method_not_allowed", format!("{} is not allowed on {}", head.method, head.path));
        let body = serde_json::to_vec(&error_body(&error))?;
        let extra = format!("Allow: {methods}\r\n");
        write_response(&mut connection.stream, 405, Some("application/json"), &body, &reply, &extra)?;
        return Ok(reply.keep_alive);
    }
    if head.path == "/health" {
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
        respond(&mut connection.stream, 200, &body, &reply)?;
        return Ok(reply.keep_alive);
    }

    let bearer = head.header("authorization").and_then(bearer_token);
    if !shared.authorized(bearer) {
        let error =
            RequestError::new(401, "authentication_error", "missing or wrong token: send Authorization: Bearer TOKEN");
        respond_error(&mut connection.stream, &error, &reply)?;
        return Ok(reply.keep_alive);
    }
    let endpoint = match head.path.as_str() {
        "/bias" => {
            let body = engine.bias.lock().unwrap_or_else(|e| e.into_inner()).json();
            respond(&mut connection.stream, 200, &body, &reply)?;
            return Ok(reply.keep_alive);
        }
        "/v1/models" => {
            let body = json!({
                "object": "list",
                "data": [{"id": engine.info.name, "object": "model", "created": 0, "owned_by": "bramble", "context_length": engine.info.context}],
            });
            respond(&mut connection.stream, 200, &body, &reply)?;
            return Ok(reply.keep_alive);
        }
        "/v1/chat/completions" => Endpoint::ChatCompletions,
        _ => Endpoint::Completions,
    };
    if let Err(error) = check_json_body(head) {
        respond_error(&mut connection.stream, &error, &reply)?;
        return Ok(reply.keep_alive);
    }

    let mut parsed = match request::parse(&body, endpoint, &shared.config.sampling, &limits) {
        Ok(parsed) => parsed,
        Err(error) => {
            respond_error(&mut connection.stream, &error, &reply)?;
            return Ok(reply.keep_alive);
        }
    };
    if let Prompt::Chat { trim_to_fit, .. } = &mut parsed.generation.prompt {
        // An app sends the conversation it wants answered; cutting it silently would change the question.
        *trim_to_fit = false;
    }
    // HTTP/1.0 has no chunked coding: a stream to it ends when the connection closes.
    let chunked = !head.http10;
    if parsed.stream && !chunked {
        reply.keep_alive = false;
    }
    let out = TcpPort::new(connection.stream.try_clone()?)?;
    let chat = endpoint == Endpoint::ChatCompletions;
    let sink = CompletionSink::new(
        out,
        chat,
        parsed.stream,
        reply.clone(),
        chunked,
        &engine.info.name,
        parsed.generation.max_tokens,
    );
    let cancel = Arc::new(AtomicBool::new(false));
    let outcome = match engine.submit(parsed.generation, Box::new(sink), Arc::clone(&cancel)) {
        Ok(outcome) => outcome,
        Err(refusal) => {
            respond_error(&mut connection.stream, &refusal.error(engine.queue_depth), &reply)?;
            return Ok(reply.keep_alive);
        }
    };
    let reusable = match engine::wait(&outcome, &cancel, || connection.peer_gone()) {
        Outcome::Finished { reason, .. } => reason != FinishReason::Cancelled,
        Outcome::Failed(_) => true,
        Outcome::Disconnected => false,
    };
    Ok(reusable && reply.keep_alive)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Head, RequestError> {
        match parse_head(bytes) {
            Ok(Some((head, length))) => {
                assert_eq!(length, bytes.len(), "the whole of {bytes:?} is the head");
                Ok(head)
            }
            Ok(None) => panic!("{bytes:?} is incomplete"),
            Err(error) => Err(error),
        }
    }

    fn refused(bytes: &[u8]) -> RequestError {
        parse(bytes).expect_err(&String::from_utf8_lossy(bytes))
    }

    #[test]
    fn heads_parse_and_bad_ones_are_named() {
        let head =
            parse(b"POST /v1/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\n")
                .unwrap();
        assert_eq!((head.method.as_str(), head.path.as_str()), ("POST", "/v1/completions"));
        assert_eq!((head.header("content-length"), head.content_length), (Some("5"), 5));
        assert!(!head.keep_alive && !head.http10);
        assert!(parse(b"GET / HTTP/1.0\r\n\r\n").is_ok_and(|h| !h.keep_alive && h.http10));
        assert!(parse(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").is_ok_and(|h| h.keep_alive));
        assert!(
            parse(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, close\r\n\r\n").is_ok_and(|h| !h.keep_alive)
        );
        assert!(refused(b"garbage\r\n\r\n").message.contains("request line \"garbage\""));
        assert_eq!(refused(b"GET / HTTP/2.0\r\n\r\n").status, 505);
        assert!(refused(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n").message.contains("no colon"));
        assert!(refused(b"GET / HTTP/1.1\r\nHost: a\r\nX: \xff\r\n\r\n").message.contains("UTF-8"));
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost: a\r\n").unwrap(), None, "incomplete");
        assert_eq!(parse_head(b"").unwrap(), None);
    }

    /// Which checks httparse makes by itself, and which `parse_head` adds on top.
    #[test]
    fn httparse_alone_refuses_some_framing_and_parse_head_the_rest() {
        let httparse = |bytes: &[u8]| {
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            httparse::Request::new(&mut fields).parse(bytes).map(|status| status.is_complete())
        };
        let get = |headers: &str| format!("GET / HTTP/1.1\r\nHost: a\r\n{headers}\r\n");
        for (headers, error) in [
            ("Transfer-Encoding : chunked\r\n", httparse::Error::HeaderName),
            ("X: a\r\n Transfer-Encoding: chunked\r\n", httparse::Error::HeaderName),
            ("X(y): z\r\n", httparse::Error::HeaderName),
            ("X: a\0b\r\n", httparse::Error::HeaderValue),
            ("X: a\rb\r\n", httparse::Error::HeaderValue),
        ] {
            assert_eq!(httparse(get(headers).as_bytes()), Err(error), "{headers:?}");
            assert!(parse_head(get(headers).as_bytes()).is_err(), "{headers:?}");
        }
        for bytes in [
            get("Content-Length: 1\r\nContent-Length: 2\r\n"),
            get("Content-Length: +1\r\n"),
            get("Host: b\r\n"),
            "GET / HTTP/1.1\r\n\r\n".to_string(),
            "GET / HTTP/1.1\nHost: a\n\n".to_string(),
        ] {
            assert_eq!(httparse(bytes.as_bytes()), Ok(true), "httparse takes {bytes:?}");
            assert_eq!(parse_head(bytes.as_bytes()).unwrap_err().status, 400, "{bytes:?}");
        }
    }

    #[test]
    fn framing_that_two_parsers_could_read_two_ways_is_refused() {
        let get = |headers: &str| format!("GET / HTTP/1.1\r\nHost: a\r\n{headers}\r\n");
        let cases = [
            (get("Content-Length: 1\r\nContent-Length: 1\r\n"), "two Content-Length headers"),
            (get("Content-Length: 1\r\ncontent-length: 2\r\nCONTENT-LENGTH: 3\r\n"), "3 Content-Length headers"),
            (get("Content-Length: +1\r\n"), "Content-Length \"+1\" is not a number"),
            (get("Content-Length: 1 1\r\n"), "Content-Length \"1 1\""),
            (get("Content-Length: 18446744073709551616\r\n"), "not a number"),
            (get("Content-Length:\r\n"), "Content-Length \"\""),
            (get("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"), "both Transfer-Encoding and Content-Length"),
            (get("Transfer-Encoding : chunked\r\n"), "whitespace between the header name \"Transfer-Encoding\""),
            (get("Transfer-Encoding\t: chunked\r\n"), "whitespace between the header name \"Transfer-Encoding\""),
            (get("X: a\r\n Transfer-Encoding: chunked\r\n"), "obs-fold"),
            (get("X: a\r\n\tTransfer-Encoding: chunked\r\n"), "obs-fold"),
            (get("X-Nul: a\0b\r\n"), "header \"X-Nul\" has a control character (0x00)"),
            (get("X-Cr: a\rb\r\n"), "header \"X-Cr\" has a CR"),
            (get("X(y): z\r\n"), "header name \"X(y)\" is not a token"),
            (get("a b: c\r\n"), "header name \"a b\" is not a token"),
            (get(": empty\r\n"), "header name \"\" is not a token"),
            (get("Host: b\r\n"), "two Host headers"),
            (get("Origin: http://a\r\nOrigin: http://b\r\n"), "two Origin headers"),
            ("GET / HTTP/1.1\r\n\r\n".to_string(), "must have a Host"),
            (get("").replace("Host: a", "Host: a b"), "Host \"a b\" is not host[:port]"),
            (get("").replace("Host: a", "Host: a:99999"), "is not host[:port]"),
            ("GET / HTTP/1.1\nHost: a\n\n".to_string(), "bare LF"),
            ("GET / HTTP/1.1\r\nHost: a\n\r\n".to_string(), "bare LF"),
            ("\nGET / HTTP/1.1\r\nHost: a\r\n\r\n".to_string(), "bare LF"),
            ("GET /a b HTTP/1.1\r\nHost: a\r\n\r\n".to_string(), "request line \"GET /a b HTTP/1.1\""),
            ("GET a HTTP/1.1\r\nHost: a\r\n\r\n".to_string(), "neither a path"),
            ("GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n".to_string(), "neither a path"),
            ("GET * HTTP/1.1\r\nHost: a\r\n\r\n".to_string(), "neither a path"),
            ("\x16\x03\x01\x02\x00\r\n\r\n".to_string(), "TLS"),
            (format!("{}GET / HTTP/1.1\r\nHost: a\r\n\r\n", "\r\n".repeat(MAX_EMPTY_LINES + 1)), "empty lines"),
        ];
        for (bytes, named) in &cases {
            let error = refused(bytes.as_bytes());
            assert_eq!(error.status, 400, "{bytes:?}: {error:?}");
            assert!(error.message.contains(named), "{bytes:?}: {:?} should say {named:?}", error.message);
        }
        let chunked = refused(get("Transfer-Encoding: chunked\r\n").as_bytes());
        assert_eq!(chunked.status, 501, "{chunked:?}");
        assert!(chunked.message.contains("Content-Length"), "{chunked:?}");
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: {i}\r\n")).collect();
        assert_eq!(refused(get(&many).as_bytes()).status, 431);
    }

    #[test]
    fn what_rfc_9112_asks_a_server_to_accept_is_accepted() {
        let absolute =
            parse(b"POST http://127.0.0.1:8080/v1/completions?x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n").unwrap();
        assert_eq!(
            (absolute.path.as_str(), absolute.authority.as_deref()),
            ("/v1/completions", Some("127.0.0.1:8080"))
        );
        let bare = parse(b"GET HTTPS://localhost HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        assert_eq!((bare.path.as_str(), bare.authority.as_deref()), ("/", Some("localhost")));
        for leading in 1..=MAX_EMPTY_LINES {
            let bytes = format!("{}GET /health HTTP/1.1\r\nHost: a\r\n\r\n", "\r\n".repeat(leading));
            assert_eq!(parse(bytes.as_bytes()).unwrap().path, "/health");
        }
        let options = parse(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!(options.path, "*");
        let spaced = parse(b"GET / HTTP/1.1\r\nHost:a\r\nX-Tab:\t v \t\r\nX-Empty:\r\n\r\n").unwrap();
        assert_eq!(
            (spaced.header("host"), spaced.header("x-tab"), spaced.header("x-empty")),
            (Some("a"), Some("v"), Some(""))
        );
        // A body that follows may hold anything, bare LFs included.
        let (head, length) =
            parse_head(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n\n\n\n").unwrap().unwrap();
        assert_eq!((head.content_length, length), (3, 47));
    }

    #[test]
    fn non_http_bytes_are_refused_before_a_line_ends() {
        let tls = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
        assert!(head_progress(&tls, 0).unwrap_err().message.contains("not an HTTP/1.x request"));
        assert!(head_progress(b"SSH-2.0-OpenSSH\r\n", 0).unwrap_err().message.contains("not an HTTP/1.x request"));
        assert!(head_progress(b"GET / HTTP/1.1\nHo", 0).unwrap_err().message.contains("bare LF"));
        assert!(matches!(head_progress(b"GET / HTTP/1.1\r\nHo", 0), Ok(None)));
        // Past the early bytes, a bare LF in what just arrived is still seen.
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(EARLY_PARSE_BYTES + 10, b'a');
        let shown = long.len();
        assert!(matches!(head_progress(&long, 0), Ok(None)));
        long.extend_from_slice(b"\nY: b");
        assert!(head_progress(&long, 0).unwrap_err().message.contains("bare LF"));
        assert!(head_progress(&long, shown).unwrap_err().message.contains("bare LF"));
    }

    #[test]
    fn authorities_origins_and_loopback_names() {
        assert_eq!(split_authority("localhost:8080"), Some(("localhost", Some(8080))));
        assert_eq!(split_authority("[::1]:80"), Some(("[::1]", Some(80))));
        assert_eq!(split_authority("[::1]"), Some(("[::1]", None)));
        for bad in ["", ":80", "a:", "a:b", "a:123456", "[::1", "[]:1", "a b", "user@host", "a/b", "[::1]x"] {
            assert_eq!(split_authority(bad), None, "{bad:?}");
        }
        for loopback in ["localhost", "LOCALHOST", "127.0.0.1", "127.255.0.9", "[::1]"] {
            assert!(is_loopback_host(loopback), "{loopback}");
        }
        for foreign in ["localhost.evil.example", "127.0.0.1.nip.io", "128.0.0.1", "[::2]", "0.0.0.0", "::1"] {
            assert!(!is_loopback_host(foreign), "{foreign}");
        }
        assert_eq!(split_origin("https://app.example:8443"), Some(("https", "app.example:8443")));
        assert_eq!(split_origin("chrome-extension://abcdef"), Some(("chrome-extension", "abcdef")));
        for bad in ["null", "*", "app.example", "https://app.example/", "https://", "1http://a", "https://u@a"] {
            assert_eq!(split_origin(bad), None, "{bad:?}");
        }
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bEARER \t abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

    /// A deterministic xorshift64* generator, so a failing case can be replayed.
    struct Xorshift(u64);

    impl Xorshift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Heads the mutations start from: valid ones, and each kind of hostile one.
    const CORPUS: [&[u8]; 14] = [
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{\"prompt\":1}",
        b"POST http://127.0.0.1:8080/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        b"\r\nGET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\nOrigin: https://app.example\r\nAccess-Control-Request-Method: POST\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n\tTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\nY: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"GET /v1/models HTTP/1.1\r\nHost: [::1]:8080\r\nAuthorization: bearer 0123456789abcdef\r\nTransfer-Encoding: chunked\r\n\r\n",
    ];

    /// Bytes that matter to HTTP framing, inserted more often than others.
    const SPECIAL: &[u8] = b"\r\n\0 \t:,+-;\"/?#[]@\x7f\xff";

    fn mutate(random: &mut Xorshift, bytes: &mut Vec<u8>) {
        for _ in 0..1 + random.below(4) {
            let at = random.below(bytes.len() + 1);
            match random.below(6) {
                0 if at < bytes.len() => bytes[at] ^= 1 << random.below(8),
                1 => bytes.insert(at, SPECIAL[random.below(SPECIAL.len())]),
                2 => bytes.insert(at, random.next() as u8),
                3 if at < bytes.len() => {
                    // Repeats a stretch, a line or a header twice over.
                    let end = (at + 1 + random.below(40)).min(bytes.len());
                    let stretch = bytes[at..end].to_vec();
                    bytes.splice(end..end, stretch);
                }
                4 => bytes.truncate(at),
                _ if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => {}
            }
        }
    }

    /// What every head `parse_head` accepts must satisfy, whatever the bytes.
    fn check_invariants(bytes: &[u8], head: &Head, length: usize) {
        let context = || String::from_utf8_lossy(bytes).into_owned();
        assert!(length <= bytes.len(), "{:?}", context());
        assert!(bytes[..length].ends_with(b"\r\n\r\n"), "a head ends in an empty line: {:?}", context());
        assert!(is_token(&head.method), "method {:?}: {:?}", head.method, context());
        assert!(head.path.starts_with('/') || head.path == "*", "path {:?}: {:?}", head.path, context());
        for (name, value) in &head.headers {
            assert!(is_token(name), "header name {name:?}: {:?}", context());
            assert!(!value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f), "{value:?}: {:?}", context());
            assert_eq!(value.trim(), value, "{:?}", context());
        }
        for name in SINGLE_HEADERS {
            assert!(head.count(name) <= 1, "{name} twice: {:?}", context());
        }
        assert_eq!(head.header("transfer-encoding"), None, "{:?}", context());
        match head.header("content-length") {
            Some(text) => assert_eq!(text.parse::<u64>().ok(), Some(head.content_length), "{:?}", context()),
            None => assert_eq!(head.content_length, 0),
        }
        assert!(head.http10 || head.header("host").is_some(), "HTTP/1.1 without Host: {:?}", context());
        let line_ends = bytes[..length].iter().enumerate().filter(|(_, &b)| b == b'\n');
        assert!(line_ends.clone().all(|(i, _)| i > 0 && bytes[i - 1] == b'\r'), "bare LF: {:?}", context());
    }

    #[test]
    fn fuzz_parse_head_seeded() {
        const MUTATIONS: usize = 20_000;
        let mut random = Xorshift(0x9e37_79b9_7f4a_7c15);
        let (mut accepted, mut refused, mut incomplete) = (0, 0, 0);
        for round in 0..MUTATIONS {
            let mut bytes = CORPUS[round % CORPUS.len()].to_vec();
            mutate(&mut random, &mut bytes);
            let outcome = std::panic::catch_unwind(|| parse_head(&bytes));
            let Ok(outcome) = outcome else {
                panic!("round {round}: parse_head panicked on {:?}", String::from_utf8_lossy(&bytes));
            };
            match outcome {
                Ok(Some((head, length))) => {
                    check_invariants(&bytes, &head, length);
                    accepted += 1;
                }
                Ok(None) => incomplete += 1,
                Err(error) => {
                    assert!([400, 431, 501, 505].contains(&error.status), "{error:?}");
                    assert!(!error.message.is_empty());
                    refused += 1;
                }
            }
            // The reader's incremental parse agrees with the whole one, wherever the last read began.
            let cut = random.below(bytes.len() + 1);
            if cut < EARLY_PARSE_BYTES {
                let (whole, incremental) = (parse_head(&bytes), head_progress(&bytes, cut));
                assert_eq!(format!("{incremental:?}"), format!("{whole:?}"), "{:?}", String::from_utf8_lossy(&bytes));
            }
        }
        println!("{MUTATIONS} mutated heads: {accepted} accepted, {refused} refused, {incomplete} incomplete");
        assert!(accepted > 100 && refused > 100 && incomplete > 100, "{accepted} {refused} {incomplete}");
    }
}

//! Request smuggling and HTTP/1.1 framing (RFC 9112 §2.2, §3, §5, §6.3): a
//! head whose framing two parsers could read two ways is refused with 400
//! and the connection closed, so nothing after it is ever taken for a second
//! request; what is not HTTP is refused at once, not at the request timeout;
//! what RFC 9112 asks a server to accept is accepted. See the table in `main.rs`.

use bramble_tests::daemon::*;
use serde_json::{json, Value};
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Well under the daemon's 10 s request timeout: an answer that waits for it fails the test.
const AT_ONCE: Duration = Duration::from_secs(3);

/// A request that must never be answered when it follows a refused head.
const SMUGGLED: &str = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

/// One response as read off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// What came back for `bytes` on a fresh connection, read until the daemon
/// closes it but for at most [`AT_ONCE`]; and whether it closed in that time.
fn exchange(address: SocketAddr, bytes: &[u8]) -> (Vec<u8>, bool) {
    let mut stream = connect(address);
    stream.write_all(bytes).unwrap();
    let started = Instant::now();
    let mut reply = Vec::new();
    let closed = loop {
        let left = AT_ONCE.saturating_sub(started.elapsed());
        if left.is_zero() {
            break false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => reply.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // A reset ends the connection too; what was read is kept.
            Err(_) => break true,
        }
    };
    (reply, closed)
}

/// Splits `reply` into responses; `bodiless` says which of them (by index)
/// answer a HEAD and so carry no body whatever their Content-Length.
fn split_answers(reply: &[u8], bodiless: &[usize]) -> Vec<Answer> {
    let mut rest = reply;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("a response head without its end: {:?}", String::from_utf8_lossy(rest)));
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        let status = head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {head:?}"));
        let mut answer = Answer { status, head, body: String::new() };
        rest = &rest[end + 4..];
        let length = if bodiless.contains(&out.len()) {
            0
        } else {
            answer.header("content-length").map_or(rest.len(), |l| l.parse().unwrap())
        };
        assert!(length <= rest.len(), "a body cut short: {answer:?} {:?}", String::from_utf8_lossy(rest));
        answer.body = String::from_utf8_lossy(&rest[..length]).into_owned();
        rest = &rest[length..];
        out.push(answer);
    }
    out
}

/// Whether `bytes` get one 400 naming `named`, the connection closing at once
/// and nothing after the refused head answered; what went wrong if not.
fn refused(address: SocketAddr, bytes: &[u8], named: &str) -> Result<String, String> {
    let (reply, closed) = exchange(address, bytes);
    let text = String::from_utf8_lossy(&reply);
    if !closed {
        return Err(format!("the connection is still open after {AT_ONCE:?}; got {text:?}"));
    }
    let answers = split_answers(&reply, &[]);
    let [answer] = &answers[..] else {
        return Err(format!("one answer and nothing for what followed; got {answers:?}"));
    };
    if answer.status != 400 || answer.header("connection") != Some("close") {
        return Err(format!("400 and Connection: close; got {answer:?}"));
    }
    let error: Value = serde_json::from_str(&answer.body).map_err(|e| format!("{e}: {answer:?}"))?;
    let message = error["error"]["message"].as_str().unwrap_or_default();
    if !message.contains(named) {
        return Err(format!("{message:?} should name {named:?}"));
    }
    Ok(message.to_string())
}

#[test]
fn ambiguous_framing_is_refused_with_400_and_close() {
    let daemon = Daemon::start(&[]);
    let address = daemon.http();
    let n = SMUGGLED.len();
    let get = |headers: &str| format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n{SMUGGLED}");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "two Content-Length, 0 first",
            get(&format!("Content-Length: 0\r\nContent-Length: {n}\r\n")),
            "two Content-Length",
        ),
        (
            "two Content-Length, 0 last",
            get(&format!("Content-Length: {n}\r\nContent-Length: 0\r\n")),
            "two Content-Length",
        ),
        (
            "two equal Content-Length",
            get(&format!("Content-Length: {n}\r\nContent-Length: {n}\r\n")),
            "two Content-Length",
        ),
        ("Content-Length as a list", get(&format!("Content-Length: {n}, {n}\r\n")), "Content-Length"),
        ("signed Content-Length", get(&format!("Content-Length: +{n}\r\n")), "Content-Length \"+"),
        ("hex Content-Length", get(&format!("Content-Length: 0x{n:x}\r\n")), "Content-Length \"0x"),
        ("negative Content-Length", get("Content-Length: -0\r\n"), "Content-Length \"-0\""),
        ("huge Content-Length", get("Content-Length: 99999999999999999999999\r\n"), "Content-Length"),
        (
            "Transfer-Encoding with Content-Length",
            get("Content-Length: 0\r\nTransfer-Encoding: chunked\r\n"),
            "Transfer-Encoding",
        ),
        ("space before the colon", get("Transfer-Encoding : chunked\r\n"), "Transfer-Encoding"),
        ("tab before the colon", get("Transfer-Encoding\t: chunked\r\n"), "Transfer-Encoding"),
        ("obs-fold with a space", get("X-Fold: a\r\n Transfer-Encoding: chunked\r\n"), "fold"),
        ("obs-fold with a tab", get("X-Fold: a\r\n\tTransfer-Encoding: chunked\r\n"), "fold"),
        ("NUL in a value", get("X-Nul: a\0b\r\n"), "X-Nul"),
        ("bare CR in a value", get("X-Cr: a\rb\r\n"), "X-Cr"),
        ("bare CR hiding a header", get("X-Cr: a\rTransfer-Encoding: chunked\r\n"), "X-Cr"),
        ("a name with parentheses", get("X(y): z\r\n"), "header name \"X(y)\" is not a token"),
        ("a name with a space", get("a b: c\r\n"), "\"a b\""),
        ("a name with @", get("X@Y: z\r\n"), "\"X@Y\""),
        ("two Host headers", get("Host: evil.example.com\r\n"), "two Host"),
        ("no Host in HTTP/1.1", format!("GET /health HTTP/1.1\r\n\r\n{SMUGGLED}"), "Host"),
        ("bare LF line ends", "GET /health HTTP/1.1\nHost: 127.0.0.1\n\n".to_string(), "bare LF"),
        ("one bare LF", format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1\n\r\n{SMUGGLED}"), "bare LF"),
        ("SSH on the HTTP port", "SSH-2.0-OpenSSH_9.6\r\n".to_string(), "not an HTTP/1.x request"),
    ];
    let mut cases: Vec<(&str, Vec<u8>, &str)> =
        cases.into_iter().map(|(what, text, named)| (what, text.into_bytes(), named)).collect();
    // A TLS ClientHello's first bytes (record type 22, version 3.1), as a
    // browser sends for https:// to the plain-HTTP port: no CRLF ever comes.
    let mut hello = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
    hello.extend((0..32u8).map(|i| i.wrapping_mul(37)));
    hello.extend_from_slice(&[0x20, 0x13, 0x01, 0x13, 0x02, 0x00, 0x0a]);
    cases.push(("TLS ClientHello", hello, "not an HTTP/1.x request"));
    let mut failures = Vec::new();
    for (what, bytes, named) in &cases {
        match refused(address, bytes, named) {
            Ok(message) => println!("{what}: 400 {message}"),
            Err(failure) => failures.push(format!("{what}: {failure}")),
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    let served = health(&daemon);
    assert_eq!(served["status"], "ok", "the daemon serves on: {served}");
}

/// Sends `bytes` and reads until the daemon closes the connection (within [`HANG`]).
fn whole_exchange(address: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = connect(address);
    stream.write_all(bytes).unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).expect("the daemon closes the connection");
    reply
}

#[test]
fn absolute_targets_and_a_leading_empty_line_are_accepted() {
    let daemon = Daemon::start(&[]);
    let address = daemon.http();
    let body = json!({"prompt": "Hi", "max_tokens": 2, "temperature": 0}).to_string();
    let absolute = format!(
        "POST http://{address}/v1/completions?x=1 HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answers = split_answers(&whole_exchange(address, absolute.as_bytes()), &[]);
    assert_eq!(answers.len(), 1, "{answers:#?}");
    assert_eq!(answers[0].status, 200, "{answers:?}");
    let completion: Value = serde_json::from_str(&answers[0].body).unwrap();
    assert_eq!(completion["usage"]["completion_tokens"], 2, "{completion}");

    for leading in ["\r\n", "\r\n\r\n"] {
        let request = format!("{leading}GET /health HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        let answers = split_answers(&whole_exchange(address, request.as_bytes()), &[]);
        assert_eq!(answers.len(), 1, "{leading:?}: {answers:#?}");
        assert_eq!(answers[0].status, 200, "{leading:?}: {answers:?}");
    }
    // HTTP/1.0 has no Host requirement.
    let answers = split_answers(&whole_exchange(address, b"GET /health HTTP/1.0\r\n\r\n"), &[]);
    assert_eq!(answers.len(), 1, "{answers:#?}");
    assert_eq!(answers[0].status, 200, "{answers:?}");
}

#[test]
fn a_head_request_gets_headers_and_no_body() {
    let daemon = Daemon::start(&[]);
    let address = daemon.http();
    // Pipelined on one connection: a HEAD answer with a body would be read as the next response's start.
    let request = format!(
        "HEAD /health HTTP/1.1\r\nHost: {address}\r\n\r\nHEAD /v1/completions HTTP/1.1\r\nHost: {address}\r\n\r\n\
         HEAD /nowhere HTTP/1.1\r\nHost: {address}\r\n\r\nGET /health HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    );
    let reply = whole_exchange(address, request.as_bytes());
    let answers = split_answers(&reply, &[0, 1, 2]);
    assert_eq!(answers.len(), 4, "{answers:#?}");
    let (head, get) = (&answers[0], &answers[3]);
    assert_eq!((head.status, get.status), (200, 200), "{answers:#?}");
    assert_eq!(head.header("content-length"), get.header("content-length"), "HEAD's length is the GET's: {answers:#?}");
    assert!(get.body.contains("\"status\":\"ok\""), "{get:?}");
    assert_eq!(answers[1].status, 405, "HEAD on a POST endpoint: {answers:#?}");
    assert_eq!(answers[1].header("allow"), Some("POST, OPTIONS"), "{answers:#?}");
    assert_eq!(answers[2].status, 404, "{answers:#?}");
}

#[test]
fn server_sent_events_to_http_1_0_end_with_the_connection() {
    let daemon = Daemon::start(&[]);
    let address = daemon.http();
    let body = json!({"prompt": "Hi", "max_tokens": 3, "temperature": 0, "stream": true}).to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let reply = whole_exchange(address, request.as_bytes());
    let answers = split_answers(&reply, &[]);
    assert_eq!(answers.len(), 1, "{answers:#?}");
    let answer = &answers[0];
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("transfer-encoding"), None, "HTTP/1.0 has no chunked coding: {answer:?}");
    assert_eq!(answer.header("connection"), Some("close"), "{answer:?}");
    assert!(answer.body.starts_with("data: {"), "the events raw, without chunk sizes: {:?}", answer.body);
    assert!(answer.body.ends_with("data: [DONE]\n\n"), "{:?}", answer.body);
    let events = sse_events(&answer.body);
    assert!(events.len() >= 3, "a token, the usage and [DONE] at least: {events:?}");
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["usage"]["completion_tokens"], 3, "{events:?}");
}

#[test]
fn the_bearer_scheme_is_case_insensitive() {
    let token = "test-token-0123456789";
    let daemon = Daemon::start_with(&["--http", "0.0.0.0:0"], &[("BRAMBLED_AUTH_TOKEN", token)]);
    let address = on_loopback(daemon.http());
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let authorization = format!("Authorization: {scheme} {token}");
        let response = http(address, "GET", "/v1/models", None, &[&authorization]);
        assert_eq!(response.status, 200, "{scheme}: {}", response.text());
    }
    for wrong in [format!("Basic {token}"), format!("Bearer{token}"), "bearer".to_string()] {
        let authorization = format!("Authorization: {wrong}");
        let response = http(address, "GET", "/v1/models", None, &[&authorization]);
        assert_eq!(response.status, 401, "{wrong}: {}", response.text());
    }
}

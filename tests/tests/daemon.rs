//! `brambled` end to end: the real binary on real loopback sockets and a real
//! pseudo-terminal, serving a small synthetic model.
//!
//! | module | what |
//! |---|---|
//! | `ndjson` | the NDJSON protocol: streamed lines, the final line's counts, chat, errors |
//! | `http` | the OpenAI-compatible endpoints with our own client, SSE, errors, auth |
//! | `openai_client` | the official `openai` Python client against the daemon (`tests/daemon_openai.py`) |
//! | `scheduling` | queue depth, busy refusals, cancel on disconnect |
//! | `load` | 32 clients × 10 requests: every request answered or refused busy, memory flat |
//! | `bad_input` | the bad-input battery on NDJSON, HTTP and the console |
//! | `console` | the serial console on an openpty pair: typing, editing, commands, chat, Ctrl-C, garbage, the device vanishing |
//! | `operations` | config errors, sd_notify READY, SIGTERM drain and exit 0 |
//! | `bias` | the bias feedback: `bias_signal` on NDJSON and HTTP, `GET /bias`, the console's `/bias`, the state file |
//!
//! The model is synthetic (random weights, a byte-level BPE vocabulary with
//! ChatML tokens), with a context of 2048 so a long generation lasts seconds:
//! the scheduling tests need one to be running while they act. Timeouts here
//! only keep a broken daemon from hanging the test; nothing checks speed.

use bramble_tests::daemon::*;
use bramble_tests::*;
use serde_json::{json, Value};
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

mod ndjson {
    use super::*;

    #[test]
    fn streams_lines_then_a_done_line_with_counts_and_timings() {
        let daemon = Daemon::start(&[]);
        let request = json!({"prompt": "Hello world", "max_tokens": 8, "temperature": 0});
        let lines = ndjson(daemon.ndjson(), &request);
        let last = lines.last().unwrap();
        assert_eq!(last["done_reason"], "length", "{last}");
        assert_eq!(last["eval_count"], 8);
        assert!(last["prompt_eval_count"].as_u64().unwrap() >= 2, "{last}");
        for timing in ["total_duration", "prompt_eval_duration", "eval_duration"] {
            assert!(last[timing].as_u64().is_some(), "{timing} in {last}");
        }
        assert!(lines[..lines.len() - 1].iter().all(|l| l["done"] == false && l["response"].is_string()));
        let streamed = streamed_text(&lines);
        assert!(!streamed.is_empty());

        // Greedy is deterministic, and the whole answer in one line is the streamed one.
        let whole = ndjson(
            daemon.ndjson(),
            &json!({"prompt": "Hello world", "max_tokens": 8, "temperature": 0, "stream": false}),
        );
        assert_eq!(whole.len(), 1, "{whole:?}");
        assert_eq!(whole[0]["response"].as_str().unwrap(), streamed);
        // The second run reused the cached prompt.
        assert!(whole[0]["prompt_cached_count"].as_u64().unwrap() > 0, "{}", whole[0]);

        // A chat, and several requests on one connection.
        let mut stream = connect(daemon.ndjson());
        let chat = json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_tokens": 4, "stop": ["zzz"]});
        writeln!(stream, "{chat}\n{request}").unwrap();
        let mut reader = BufReader::new(stream);
        let first = read_until_done(&mut reader);
        assert!(first.last().unwrap()["prompt_eval_count"].as_u64().unwrap() > 10, "the chat template was applied");
        let second = read_until_done(&mut reader);
        assert_eq!(streamed_text(&second), streamed);
    }

    #[test]
    fn prompts_longer_than_the_context_and_bad_requests_get_errors_on_the_same_connection() {
        let daemon = Daemon::start(&["--context", "64"]);
        let mut stream = connect(daemon.ndjson());
        let long = "hello world ".repeat(200);
        writeln!(stream, "{}", json!({"prompt": long, "max_tokens": 4})).unwrap();
        writeln!(stream, "{}", json!({"prompt": "Hi", "max_tokens": 100000})).unwrap();
        writeln!(stream, "{}", json!({"prompt": "Hi", "max_tokens": 3})).unwrap();
        let mut reader = BufReader::new(stream);
        let too_long = read_until_done(&mut reader);
        let message = too_long[0]["error"]["message"].as_str().unwrap();
        assert!(message.contains("context holds 64"), "{message}");
        let too_many = read_until_done(&mut reader);
        assert_eq!(too_many[0]["error"]["param"], "max_tokens", "{:?}", too_many);
        let fine = read_until_done(&mut reader);
        assert_eq!(fine.last().unwrap()["eval_count"], 3);
    }
}

mod http {
    use super::*;

    #[test]
    fn openai_endpoints_with_our_own_client() {
        let daemon = Daemon::start(&[]);
        let address = daemon.http();

        let health = http(address, "GET", "/health", None, &[]);
        assert_eq!(health.status, 200);
        assert_eq!(health.json()["status"], "ok");
        let models = http(address, "GET", "/v1/models", None, &[]).json();
        let name = models["data"][0]["id"].as_str().unwrap().to_string();
        assert!(name.starts_with("synthetic"), "{models}");

        let request = json!({"prompt": "Hello world", "max_tokens": 6, "temperature": 0});
        let completion = http(address, "POST", "/v1/completions", Some(&request), &[]);
        assert_eq!(completion.status, 200, "{}", completion.text());
        let completion = completion.json();
        assert_eq!(completion["object"], "text_completion");
        assert_eq!(completion["model"], name.as_str());
        assert_eq!(completion["choices"][0]["finish_reason"], "length");
        assert_eq!(completion["usage"]["completion_tokens"], 6);
        let usage = &completion["usage"];
        assert_eq!(usage["total_tokens"].as_u64(), Some(usage["prompt_tokens"].as_u64().unwrap() + 6));
        let text = completion["choices"][0]["text"].as_str().unwrap().to_string();

        // Streamed: the same text, in SSE events ending with [DONE], usage in the last chunk.
        let mut streamed_request = request.clone();
        streamed_request["stream"] = json!(true);
        let stream = http(address, "POST", "/v1/completions", Some(&streamed_request), &[]);
        assert_eq!(stream.status, 200);
        assert_eq!(stream.header("content-type"), Some("text/event-stream"));
        let events = sse_events(&stream.text());
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
        let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        let joined: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
        assert_eq!(joined, text);
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert_eq!(last["usage"]["completion_tokens"], 6);

        // Chat, whole and streamed.
        let chat = json!({"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 5, "temperature": 0});
        let whole = http(address, "POST", "/v1/chat/completions", Some(&chat), &[]).json();
        assert_eq!(whole["object"], "chat.completion");
        assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
        let content = whole["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        let mut streamed_chat = chat.clone();
        streamed_chat["stream"] = json!(true);
        let events = sse_events(&http(address, "POST", "/v1/chat/completions", Some(&streamed_chat), &[]).text());
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
        let joined: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(joined, content);

        // Errors in OpenAI's shape.
        let cases = [
            ("GET", "/v1/nothing", None, 404),
            ("DELETE", "/v1/completions", None, 405),
            ("POST", "/v1/completions", Some(json!({"prompt": "Hi", "max_tokens": "ten"})), 400),
            ("POST", "/v1/chat/completions", Some(json!({"messages": [{"role": "robot", "content": "x"}]})), 400),
            ("POST", "/v1/chat/completions", Some(json!({"prompt": "no messages"})), 400),
        ];
        for (method, path, body, status) in cases {
            let response = http(address, method, path, body.as_ref(), &[]);
            assert_eq!(response.status, status, "{method} {path}: {}", response.text());
            let error = response.json();
            assert!(error["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{error}");
            assert!(error["error"]["type"].is_string(), "{error}");
        }
    }

    #[test]
    fn keep_alive_serves_requests_one_after_another_on_one_connection() {
        let daemon = Daemon::start(&[]);
        let address = daemon.http();
        let mut stream = connect(address);
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        for path in ["/health", "/v1/models", "/health"] {
            write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n").unwrap();
            assert_eq!(read_response(&mut reader).status, 200);
        }
        let body = json!({"prompt": "Hi", "max_tokens": 2, "stream": true}).to_string();
        write!(
            stream,
            "POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        assert!(read_response(&mut reader).text().ends_with("data: [DONE]\n\n"));
        write!(stream, "GET /health HTTP/1.1\r\nHost: {address}\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut reader).status, 200, "the connection survives a streamed answer");
    }

    #[test]
    fn a_token_is_required_off_loopback_and_checked_everywhere() {
        refused_off_loopback_without_a_token("--http");
        let token = "test-token-0123456789";
        let daemon = Daemon::start_with(&["--http", "0.0.0.0:0"], &[("BRAMBLED_AUTH_TOKEN", token)]);
        let address = on_loopback(daemon.http());
        let request = json!({"prompt": "Hi", "max_tokens": 2});
        assert_eq!(http(address, "POST", "/v1/completions", Some(&request), &[]).status, 401);
        let wrong =
            http(address, "POST", "/v1/completions", Some(&request), &["Authorization: Bearer test-token-0123456788"]);
        assert_eq!(wrong.status, 401);
        assert_eq!(wrong.json()["error"]["type"], "authentication_error");
        let bearer = format!("Authorization: Bearer {token}");
        assert_eq!(http(address, "POST", "/v1/completions", Some(&request), &[&bearer]).status, 200);
        assert_eq!(http(address, "GET", "/health", None, &[]).status, 200, "health needs no token");

        let refused = ndjson(daemon.ndjson(), &request);
        assert_eq!(refused[0]["error"]["code"], 401, "{refused:?}");
        let served = ndjson(daemon.ndjson(), &json!({"prompt": "Hi", "max_tokens": 2, "auth": token}));
        assert_eq!(served.last().unwrap()["eval_count"], 2, "{served:?}");
    }
}

mod openai_client {
    use super::*;

    #[test]
    fn the_official_python_client_completes_and_chats_streamed_and_whole() {
        if std::env::var("BRAMBLE_SKIP_PYTHON").is_ok_and(|v| v == "1") {
            eprintln!("BRAMBLE_SKIP_PYTHON=1: skipping the openai client test");
            return;
        }
        let probe = Command::new("python3").args(["-c", "import openai"]).output();
        assert!(
            probe.as_ref().is_ok_and(|o| o.status.success()),
            "the openai client test needs python3 with the `openai` package: \
             `python3 -m pip install -r tests/reference/requirements.txt` (or set BRAMBLE_SKIP_PYTHON=1)"
        );
        let daemon = Daemon::start(&[]);
        let script = workspace_root().join("tests/daemon_openai.py");
        let output =
            Command::new("python3").arg(&script).arg(format!("http://{}/v1", daemon.http())).output().expect("python3");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{} failed:\n{stdout}\n{}\n--- daemon\n{}",
            script.display(),
            String::from_utf8_lossy(&output.stderr),
            daemon.log()
        );
        assert!(stdout.contains("openai client: 6 checks passed"), "{stdout}");
    }
}

mod scheduling {
    use super::*;

    #[test]
    fn beyond_the_queue_requests_are_refused_busy_and_a_disconnect_cancels() {
        let daemon = Daemon::start(&["--queue", "1"]);
        let running = long_generation(daemon.ndjson());
        // One waits in the queue...
        let mut queued = connect(daemon.ndjson());
        writeln!(queued, "{}", json!({"prompt": "Hi", "max_tokens": 2})).unwrap();
        wait_for("one queued", &daemon, |h| h["queued"] == 1);
        // ...and the next is refused at once, on both protocols.
        let busy = ndjson(daemon.ndjson(), &json!({"prompt": "Hi", "max_tokens": 2}));
        assert_eq!(busy[0]["error"]["code"], 503, "{busy:?}");
        assert!(busy[0]["error"]["message"].as_str().unwrap().contains("busy"));
        let response = http(daemon.http(), "POST", "/v1/completions", Some(&json!({"prompt": "Hi"})), &[]);
        assert_eq!(response.status, 503);
        assert_eq!(response.header("retry-after"), Some("1"));
        assert_eq!(response.json()["error"]["type"], "server_busy");

        // The running client hangs up: its generation is cancelled and the queued one runs.
        drop(running);
        let lines = read_until_done(&mut BufReader::new(queued));
        assert_eq!(lines.last().unwrap()["eval_count"], 2);
        let after = wait_for("the cancel counted", &daemon, |h| h["cancelled"] == 1 && h["running"] == false);
        assert_eq!(after["refused"], 2, "{after}");
    }

    #[test]
    fn a_client_that_disconnects_while_queued_is_skipped() {
        let daemon = Daemon::start(&["--queue", "2"]);
        let running = long_generation(daemon.ndjson());
        let address = daemon.http();
        let mut queued = connect(address);
        let body = json!({"prompt": "Hi", "max_tokens": 5}).to_string();
        write!(
            queued,
            "POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        wait_for("one queued", &daemon, |h| h["queued"] == 1);
        // The hang-up reaches the daemon's socket before the queued job can start.
        hang_up(queued);
        drop(running);
        // Both end cancelled (the queued one before it ran a token); nothing is left running.
        wait_for("both cancelled", &daemon, |h| h["cancelled"] == 2 && h["running"] == false && h["queued"] == 0);
        let lines = ndjson(daemon.ndjson(), &json!({"prompt": "Hi", "max_tokens": 2}));
        assert_eq!(lines.last().unwrap()["eval_count"], 2, "the daemon serves on");
    }
}

mod load {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// One request, NDJSON or HTTP by `n`'s parity: true if served, false if refused busy; panics on anything else.
    fn one_request(daemon_http: SocketAddr, daemon_ndjson: SocketAddr, n: usize) -> bool {
        let request = json!({"prompt": format!("Request {n}"), "max_tokens": 8, "temperature": 0.8, "seed": n});
        if n.is_multiple_of(2) {
            let lines = ndjson(daemon_ndjson, &request);
            let last = lines.last().unwrap();
            match last["error"]["code"].as_u64() {
                None => {
                    // Sampling may end the turn before max_tokens.
                    assert!(last["eval_count"].as_u64().is_some_and(|n| n <= 8), "{last}");
                    assert!(last["done_reason"] == "length" || last["done_reason"] == "stop", "{last}");
                    true
                }
                Some(503) => false,
                Some(_) => panic!("request {n}: {last}"),
            }
        } else {
            let response = http(daemon_http, "POST", "/v1/completions", Some(&request), &[]);
            match response.status {
                200 => {
                    let tokens = response.json()["usage"]["completion_tokens"].as_u64();
                    assert!(tokens.is_some_and(|n| n <= 8), "{}", response.text());
                    true
                }
                503 => false,
                other => panic!("request {n}: {other} {}", response.text()),
            }
        }
    }

    #[test]
    fn thirty_two_clients_times_ten_requests_are_all_answered_or_refused_busy_and_memory_stays_flat() {
        const CLIENTS: usize = 32;
        const REQUESTS: usize = 10;
        let daemon = Daemon::start(&["--queue", "4"]);
        let (http_address, ndjson_address) = (daemon.http(), daemon.ndjson());
        let round = |requests: usize| {
            let (served, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            let clients: Vec<_> = (0..CLIENTS)
                .map(|client| {
                    let (served, refused) = (Arc::clone(&served), Arc::clone(&refused));
                    std::thread::spawn(move || {
                        for request in 0..requests {
                            let counter = if one_request(http_address, ndjson_address, client * requests + request) {
                                &served
                            } else {
                                &refused
                            };
                            counter.fetch_add(1, Ordering::SeqCst);
                        }
                    })
                })
                .collect();
            let errors = clients.into_iter().map(|c| c.join()).filter(Result::is_err).count();
            (served.load(Ordering::SeqCst), refused.load(Ordering::SeqCst), errors)
        };
        // A first round grows the allocator's arenas and thread stacks to their working size.
        let (warm_served, warm_refused, warm_errors) = round(2);
        assert_eq!((warm_served + warm_refused, warm_errors), (2 * CLIENTS as u64, 0));
        let (rss_warm, _) = daemon.memory();
        let (served, refused, errors) = round(REQUESTS);
        let (rss_after, peak) = daemon.memory();
        let after = health(&daemon);
        println!(
            "load figures: {CLIENTS} clients x {REQUESTS} requests: {served} served, {refused} refused busy, \
             {errors} errors, {} lost; daemon VmRSS {rss_warm} KiB after warm-up, {rss_after} KiB after, VmHWM {peak} KiB",
            (CLIENTS * REQUESTS) as u64 - served - refused
        );
        assert_eq!(errors, 0, "client threads that failed (an unanswered or wrong answer)");
        assert_eq!(served + refused, (CLIENTS * REQUESTS) as u64, "every request answered or refused");
        assert!(served > 0 && refused > 0, "with 32 clients and a queue of 4 some are served and some refused");
        assert_eq!(after["queued"], 0);
        assert_eq!(after["failed"], 0, "{after}");
        // Flat: the second, five-times-longer round grows the resident set by less than 16 MiB.
        assert!(rss_after < rss_warm + 16 * 1024, "VmRSS grew from {rss_warm} KiB to {rss_after} KiB");
    }
}

mod bad_input {
    use super::*;

    /// A good request still works.
    fn still_serving(daemon: &mut Daemon) {
        daemon.assert_alive();
        let lines = ndjson(daemon.ndjson(), &json!({"prompt": "Hi", "max_tokens": 2}));
        assert_eq!(lines.last().unwrap()["eval_count"], 2, "{lines:?}");
        let response =
            http(daemon.http(), "POST", "/v1/completions", Some(&json!({"prompt": "Hi", "max_tokens": 2})), &[]);
        assert_eq!(response.status, 200, "{}", response.text());
    }

    /// Sends raw bytes and reads everything until the daemon closes or HANG.
    fn exchange(address: SocketAddr, bytes: &[u8], close_write: bool) -> String {
        let mut stream = connect(address);
        let _ = stream.write_all(bytes);
        if close_write {
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn garbage(length: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        (0..length)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (state >> 33) as u8
            })
            .collect()
    }

    /// Sends `bytes` one a second and returns what came back.
    fn slow_client(address: SocketAddr, bytes: &[u8]) -> String {
        let mut stream = connect(address);
        let mut reader = stream.try_clone().unwrap();
        reader.set_read_timeout(Some(Duration::from_millis(1000))).unwrap();
        let mut out = Vec::new();
        for &byte in bytes {
            if stream.write_all(&[byte]).is_err() {
                break;
            }
            let mut chunk = [0u8; 4096];
            match reader.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(_) => {}
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn ndjson_battery() {
        let (_dir, config) = config_file("[limits]\nrequest_timeout_secs = 2\n");
        let mut daemon = Daemon::start(&["--config", config.to_str().unwrap()]);
        let address = daemon.ndjson();
        let mut errors = Vec::new();

        // Malformed JSON, wrong types, invalid UTF-8, binary garbage: one error line each, on one connection that stays open.
        let mut stream = connect(address);
        let mut bad = Vec::new();
        bad.extend_from_slice(b"{\"prompt\": \"Hi\"\n");
        bad.extend_from_slice(b"{\"prompt\": 5, \"max_tokens\": true}\n");
        bad.extend_from_slice(b"{\"prompt\": \"\xff\xfe\"}\n");
        bad.extend(garbage(2000, 7).into_iter().map(|b| if b == b'\n' { b' ' } else { b }));
        bad.push(b'\n');
        bad.extend_from_slice(b"{\"prompt\": \"Hi\", \"max_tokens\": 2}\n");
        stream.write_all(&bad).unwrap();
        let mut reader = BufReader::new(stream);
        for expected in ["malformed JSON", "prompt: expected a string", "not valid UTF-8", ""] {
            let line = read_until_done(&mut reader);
            let message =
                line[0]["error"]["message"].as_str().unwrap_or_else(|| panic!("an error: {line:?}")).to_string();
            assert!(message.contains(expected), "{message:?} should say {expected:?}");
            assert_eq!(line[0]["error"]["code"], 400);
            errors.push(message);
        }
        assert_eq!(read_until_done(&mut reader).last().unwrap()["eval_count"], 2, "the connection still serves");

        // A 1 MiB line: one error, then the connection is closed.
        let mut huge = vec![b'a'; 1 << 20];
        huge.push(b'\n');
        let reply = exchange(address, &huge, false);
        assert!(reply.contains("longer than 65536 bytes"), "{reply:?}");
        errors.push(reply.trim().to_string());

        // A client sending one byte a second is cut off at the request timeout.
        let reply = slow_client(address, b"{\"prompt\": \"Hi\"}");
        assert!(reply.contains("\"code\":408") && reply.contains("within 2 s"), "{reply:?}");
        errors.push(reply.trim().to_string());

        // Abrupt disconnects: mid-stream, and in the middle of a request line.
        drop(long_generation(address));
        let _ = exchange(address, b"{\"prompt\": \"Hi", false);
        wait_for("the dropped stream cancelled", &daemon, |h| h["cancelled"] == 1 && h["running"] == false);
        still_serving(&mut daemon);
        println!("ndjson bad-input errors:\n{}", errors.join("\n"));
    }

    #[test]
    fn http_battery() {
        let (_dir, config) = config_file("[limits]\nrequest_timeout_secs = 2\n");
        let mut daemon = Daemon::start(&["--config", config.to_str().unwrap()]);
        let address = daemon.http();
        let post = |body: &[u8]| {
            let mut request = format!(
                "POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            request.extend_from_slice(body);
            request
        };
        let mut huge_header = format!("GET /health HTTP/1.1\r\nHost: {address}\r\nX-Big: ").into_bytes();
        huge_header.extend(std::iter::repeat_n(b'a', 1 << 20));
        huge_header.extend_from_slice(b"\r\n\r\n");
        let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
            ("malformed JSON", post(b"{\"prompt\": "), "400 Bad Request", "malformed JSON"),
            ("wrong type", post(b"{\"prompt\": \"Hi\", \"temperature\": \"hot\"}"), "400 Bad Request", "temperature"),
            ("invalid UTF-8", post(b"{\"prompt\": \"\xff\"}"), "400 Bad Request", "UTF-8"),
            (
                "garbage",
                [garbage(3000, 9), b"\r\n\r\n".to_vec()].concat(),
                "400 Bad Request",
                "not an HTTP/1.x request",
            ),
            ("1 MiB header", huge_header, "431", "over 65536 bytes"),
            (
                "1 MiB body",
                format!("POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Length: 1048576\r\n\r\n")
                    .into_bytes(),
                "413",
                "limit is 65536",
            ),
            (
                "chunked",
                format!("POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .into_bytes(),
                "501",
                "Content-Length",
            ),
            (
                "bad length",
                format!("POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Length: lots\r\n\r\n")
                    .into_bytes(),
                "400",
                "not a number",
            ),
        ];
        let mut errors = Vec::new();
        for (what, bytes, status, message) in cases {
            // Closing our side lets a kept-alive connection end after the answer.
            let reply = exchange(address, &bytes, true);
            let first = reply.lines().next().unwrap_or_default().to_string();
            assert!(first.contains(status), "{what}: status line {first:?}");
            let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default();
            let error: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {reply:?}"));
            let text = error["error"]["message"].as_str().unwrap();
            assert!(text.contains(message), "{what}: {text:?} should say {message:?}");
            errors.push(format!("{what}: {first} {text}"));
        }
        let reply = slow_client(address, format!("GET /health HTTP/1.1\r\nHost: {address}\r\n\r\n").as_bytes());
        assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
        errors.push("slow client: HTTP/1.1 408".to_string());

        // A streamed answer whose client hangs up is cancelled (the client
        // reads little, so the answer is still being written when it goes).
        let mut stream = stalled_connection(address);
        stream.set_read_timeout(Some(HANG)).unwrap();
        let body =
            json!({"prompt": "Once upon a time", "max_tokens": 1024, "temperature": 0, "stream": true}).to_string();
        write!(
            stream,
            "POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut first = [0u8; 64];
        stream.read_exact(&mut first).unwrap();
        drop(stream);
        wait_for("the dropped stream cancelled", &daemon, |h| h["cancelled"] == 1 && h["running"] == false);
        still_serving(&mut daemon);
        println!("http bad-input errors:\n{}", errors.join("\n"));
    }
}

/// What a terminal talks over: a pty's master end or a TCP connection.
trait Line: Read + Write + std::os::fd::AsFd {}
impl Line for std::fs::File {}
impl Line for TcpStream {}

/// The test's end of a console line (a pseudo-terminal, or the TCP console):
/// what a person types and sees.
struct Terminal {
    master: Box<dyn Line>,
    seen: Vec<u8>,
    mark: usize,
    /// The far end closed the connection (TCP only; a pty reports errors).
    closed: bool,
}

impl Terminal {
    /// The TCP console at `address`.
    fn tcp(address: SocketAddr) -> Terminal {
        Terminal { master: Box::new(connect(address)), seen: Vec::new(), mark: 0, closed: false }
    }

    /// Waits until the far end closes the connection; returns everything not yet matched.
    fn expect_closed(&mut self) -> String {
        let started = Instant::now();
        while !self.closed {
            assert!(started.elapsed() < HANG, "the connection stayed open: {:?}", String::from_utf8_lossy(&self.seen));
            self.read_some();
        }
        String::from_utf8_lossy(&self.seen[self.mark..]).into_owned()
    }

    /// A new pty; returns the terminal and the path of its device end.
    ///
    /// The master is opened close-on-exec, atomically. `openpty(3)` returns
    /// inheritable descriptors, and every `brambled` this process spawns (the
    /// tests run in parallel) would then hold a copy of the master: closing
    /// the test's copy would no longer hang the line up, and the daemon would
    /// never see its device disappear. The slave end is not opened here at all;
    /// the daemon opens it by its path.
    fn open() -> (Terminal, PathBuf) {
        use nix::fcntl::OFlag;
        let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC).expect("posix_openpt");
        nix::pty::grantpt(&master).expect("grantpt");
        nix::pty::unlockpt(&master).expect("unlockpt");
        let path = PathBuf::from(nix::pty::ptsname_r(&master).expect("ptsname"));
        let master = std::fs::File::from(std::os::fd::OwnedFd::from(master));
        (Terminal { master: Box::new(master), seen: Vec::new(), mark: 0, closed: false }, path)
    }

    fn type_bytes(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).expect("typing");
    }

    /// Types `line` and Enter, then waits until `shown` appears; returns the text up to it.
    fn command(&mut self, line: &str, shown: &str) -> String {
        self.type_bytes(line.as_bytes());
        self.type_bytes(b"\r");
        self.expect(shown)
    }

    /// Waits until `needle` appears after what was already matched; returns the text up to it.
    fn expect(&mut self, needle: &str) -> String {
        let started = Instant::now();
        loop {
            let window = &self.seen[self.mark..];
            if let Some(at) = window.windows(needle.len()).position(|w| w == needle.as_bytes()) {
                let text = String::from_utf8_lossy(&window[..at + needle.len()]).into_owned();
                self.mark += at + needle.len();
                return text;
            }
            assert!(
                started.elapsed() < HANG,
                "{needle:?} did not appear; the terminal shows {:?}",
                String::from_utf8_lossy(&self.seen[self.mark..])
            );
            self.read_some();
        }
    }

    /// Reads what arrives within a tenth of a second.
    fn read_some(&mut self) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(self.master.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(100u16)).unwrap_or(0) > 0 {
            let mut chunk = [0u8; 4096];
            match self.master.read(&mut chunk) {
                Ok(0) => {
                    self.closed = true;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(n) => self.seen.extend_from_slice(&chunk[..n]),
                // No one has the device end open yet (or between the
                // daemon's reopens): the master reports a hangup at once,
                // so wait rather than spin.
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

mod console {
    use super::*;

    #[test]
    fn a_person_at_the_serial_console_types_edits_chats_cancels_and_survives_noise() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("serial");
        let (mut terminal, device) = Terminal::open();
        std::os::unix::fs::symlink(&device, &link).unwrap();
        let daemon = Daemon::start(&["--uart", link.to_str().unwrap()]);
        terminal.expect("/help for commands.\r\n> ");

        // Echo and editing: Backspace erases a character, Ctrl-U the line.
        terminal.type_bytes(b"Hellx\x7fo");
        terminal.expect("Hellx\x08 \x08o");
        terminal.type_bytes(b"\x15");
        terminal.expect(&"\x08 \x08".repeat(5));
        terminal.command("/help", "/reset");
        terminal.command("/set max_tokens 4", "max_tokens = 4");
        terminal.command("/set bogus 1", "unknown setting bogus");
        terminal.command("/launch rockets", "unknown command /launch");

        // A chat turn; the conversation holds it.
        terminal.type_bytes(b"Hello there\r");
        terminal.type_bytes(b"");
        wait_for("the reply", &daemon, |h| h["served"] == 1 && h["running"] == false);
        terminal.command("/stats", "conversation: 2 messages");

        // Ctrl-C cancels a long reply.
        terminal.command("/set max_tokens 1024", "max_tokens = 1024");
        terminal.command("/set temperature 0", "temperature = 0");
        terminal.type_bytes(b"Tell me a long story\r");
        wait_for("the reply running", &daemon, |h| h["running"] == true);
        terminal.type_bytes(b"\x03");
        terminal.expect("(cancelled)");
        terminal.command("/reset", "(conversation cleared)");

        // Line noise: invalid UTF-8, a very long line, binary garbage.
        terminal.type_bytes(b"\xff\xfe\r");
        terminal.expect("not valid UTF-8");
        terminal.type_bytes(&[b'a'; 5000]);
        terminal.type_bytes(b"\r");
        terminal.expect("longer than 4096 bytes");
        terminal.command("/set max_tokens 2", "max_tokens = 2");
        let mut state = 5u64;
        let noise: Vec<u8> = (0..3000)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (state >> 33) as u8
            })
            .collect();
        terminal.type_bytes(&noise);
        std::thread::sleep(Duration::from_millis(500));
        wait_for("the noise handled", &daemon, |h| h["running"] == false && h["queued"] == 0);
        terminal.type_bytes(b"\x15\r/stats\r");
        terminal.expect("daemon:");
    }

    /// Regression: this failed while the test's pty masters leaked into the
    /// daemons it spawned (see [`Terminal::open`]); the daemon now also moves
    /// when its path is re-pointed while the old line stays open but silent.
    #[test]
    fn the_console_reopens_a_device_that_disappeared() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("serial");
        let (mut terminal, device) = Terminal::open();
        std::os::unix::fs::symlink(&device, &link).unwrap();
        let daemon = Daemon::start(&["--uart", link.to_str().unwrap()]);
        terminal.expect("/help for commands.\r\n> ");
        // The device disappears (the adapter is unplugged) and comes back: the console reopens it.
        drop(terminal);
        let (mut terminal, device) = Terminal::open();
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&device, &link).unwrap();
        terminal.expect("/help for commands.\r\n> ");
        // Noticed by the hangup of the closed line, not only by the re-pointed path.
        assert!(daemon.log().contains("device gone (end of file)"), "{}", daemon.log());
        terminal.command("/help", "/reset");
    }
}

/// The serial console over TCP (`--console-tcp`), for a board without a UART.
mod console_tcp {
    use super::*;

    #[test]
    fn the_tcp_console_chats_like_the_serial_one() {
        let daemon = Daemon::start(&["--console-tcp", "127.0.0.1:0"]);
        let address = daemon.console.expect("a console listener");
        let mut terminal = Terminal::tcp(address);
        // No token configured: straight to the banner.
        let banner = terminal.expect("/help for commands.\r\n> ");
        assert!(!banner.contains("token"), "{banner:?}");
        terminal.type_bytes(b"Hellx\x7fo\x15/set max_tokens 3\r");
        terminal.expect("max_tokens = 3");
        terminal.type_bytes(b"Hi there\r");
        wait_for("the reply", &daemon, |h| h["served"] == 1 && h["running"] == false);
        terminal.command("/stats", "conversation: 2 messages");
        let stats = terminal.expect("> ");
        let tokens = last_reply_tokens(&stats);
        assert!((1..=3).contains(&tokens), "{stats:?}");
        // Each connection is its own console: a second one starts a new conversation.
        let mut other = Terminal::tcp(address);
        other.expect("/help for commands.\r\n> ");
        other.command("/stats", "conversation: 0 messages");
        // A client that hangs up in the middle of a reply cancels it; the daemon serves on.
        terminal.command("/set max_tokens 1024", "max_tokens = 1024");
        // Greedy, alone in its conversation, this request's reply runs to its
        // 1024 tokens (a reply that ends its turn sooner may be over within
        // milliseconds on the host's AVX2 kernels, before /health sees it run).
        terminal.command("/reset", "(conversation cleared)");
        terminal.command("/set temperature 0", "temperature = 0");
        terminal.type_bytes(b"Write a long poem\r");
        wait_for("the long reply running", &daemon, |h| h["running"] == true);
        drop(terminal);
        wait_for("the hang-up cancelled the reply", &daemon, |h| h["cancelled"] == 1 && h["running"] == false);
        other.type_bytes(b"/set max_tokens 2\rHello\r/stats\r");
        other.expect("last reply: ");
    }

    #[test]
    fn off_loopback_the_tcp_console_wants_the_token_first_and_hides_it() {
        refused_off_loopback_without_a_token("--console-tcp");
        let token = "console-token-0123456789";
        let daemon = Daemon::start_with(&["--console-tcp", "0.0.0.0:0"], &[("BRAMBLED_AUTH_TOKEN", token)]);
        let address = on_loopback(daemon.console.expect("a console listener"));

        // A wrong token: an error, and the connection is closed before any console.
        let mut wrong = Terminal::tcp(address);
        wrong.expect("token: ");
        wrong.command("console-token-0123456788", "error: wrong token");
        let rest = wrong.expect_closed();
        assert!(!rest.contains("brambled:") && !rest.contains("console-token"), "{rest:?}");

        // The right one (typed with an edit): the console, and the token was never echoed.
        let mut right = Terminal::tcp(address);
        right.expect("token: ");
        right.type_bytes(format!("{token}x\x7f\r\n").as_bytes());
        let shown = right.expect("/help for commands.\r\n> ");
        assert!(!shown.contains(token), "the token was echoed: {shown:?}");
        right.type_bytes(b"/set max_tokens 2\rHi\r/stats\r");
        right.expect("last reply: ");
    }

    #[test]
    fn lines_typed_right_after_the_token_are_not_lost() {
        let token = "console-token-0123456789";
        let daemon = Daemon::start_with(&["--console-tcp", "0.0.0.0:0"], &[("BRAMBLED_AUTH_TOKEN", token)]);
        let address = on_loopback(daemon.console.expect("a console listener"));
        let mut terminal = Terminal::tcp(address);
        terminal.expect("token: ");
        // As a script piping into `nc` sends it: the token and the first command in one packet.
        terminal.type_bytes(format!("{token}\n/set max_tokens 5\n").as_bytes());
        terminal.expect("max_tokens = 5");
    }
}

/// The token count in the console's `/stats` "last reply: N tokens" line.
fn last_reply_tokens(stats: &str) -> usize {
    stats
        .split_once("last reply: ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no \"last reply: N tokens\" in {stats:?}"))
}

/// The daemon's own check of the no-allocation promise: `brambled` counts
/// heap allocations on the inference thread during each decode loop and
/// reports them in `/health` (and the console's `/stats`).
mod decode_allocations {
    use super::*;

    #[test]
    fn no_transport_allocates_in_the_decode_loop() {
        let daemon = Daemon::start(&["--console-tcp", "127.0.0.1:0"]);
        let start = health(&daemon);
        assert_eq!(start["decode_allocations"], json!({"total": 0, "last": null}), "{start}");

        // Every sampling stage, and a stop string that never appears, so the text stream's hold-back runs on every token.
        let sampling = json!({"max_tokens": 24, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.05,
                              "repeat_penalty": 1.1, "seed": 3, "stop": ["<<never seen>>"]});
        let with = |extra: Value| {
            let mut request = sampling.clone();
            request.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            request
        };
        let chat = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there \u{e9}\u{1f600}"}]);
        // NDJSON streamed (JSON escaping per piece) and whole (text gathered for one line).
        let streamed = ndjson(daemon.ndjson(), &with(json!({"prompt": "Hello \"world\"\n"})));
        assert!(streamed.last().unwrap()["eval_count"].as_u64().unwrap() > 0, "{streamed:?}");
        ndjson(daemon.ndjson(), &with(json!({"messages": chat, "stream": false})));
        // HTTP: SSE and whole, completion and chat.
        for (path, extra) in [
            ("/v1/completions", json!({"prompt": "Once upon a time", "stream": true})),
            ("/v1/chat/completions", json!({"messages": chat, "stream": true})),
            ("/v1/chat/completions", json!({"messages": chat})),
        ] {
            let response = http(daemon.http(), "POST", path, Some(&with(extra)), &[]);
            assert_eq!(response.status, 200, "{path}: {}", response.text());
        }
        // The TCP console: the reply is echoed with CR LF and kept for the conversation.
        let mut terminal = Terminal::tcp(daemon.console.expect("a console listener"));
        terminal.expect("/help for commands.\r\n> ");
        terminal.type_bytes(b"/set max_tokens 24\rTell me about the sea\r");
        wait_for("the console reply", &daemon, |h| h["served"] == 6 && h["running"] == false);
        terminal.type_bytes(b"/stats\r");
        let stats = terminal.expect("heap allocations");
        assert!(stats.contains("last reply's decode loop: 0 heap allocations"), "{stats:?}");

        let after = health(&daemon);
        assert_eq!(after["served"], 6, "{after}");
        assert_eq!(after["decode_allocations"], json!({"total": 0, "last": 0}), "{after}");
    }
}

mod operations {
    use super::*;

    #[test]
    fn config_errors_name_the_key_and_a_missing_model_names_the_file() {
        let (_dir, config) = config_file("model = \"x.bramble\"\n[uart]\nbaud = 12345\n");
        let output = Command::new(brambled_binary()).arg("--config").arg(&config).output().unwrap();
        assert_eq!(output.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&output.stderr).contains("uart.baud: 12345 is not a standard rate"));
        let output = Command::new(brambled_binary())
            .args(["--model", "/nonexistent/m.bramble", "--uart", "none"])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/m.bramble"));
    }

    #[test]
    fn sd_notify_ready_then_sigterm_drains_the_running_request_and_exits_zero() {
        let dir = tempfile::tempdir().unwrap();
        let socket_path = dir.path().join("notify");
        let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
        socket.set_read_timeout(Some(HANG)).unwrap();
        let mut daemon = Daemon::start_with(&[], &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())]);
        let mut message = [0u8; 256];
        let n = socket.recv(&mut message).unwrap();
        assert!(String::from_utf8_lossy(&message[..n]).contains("READY=1"));

        // A generation held by its client is running when SIGTERM arrives.
        let mut running = long_generation(daemon.ndjson());
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.pid()), nix::sys::signal::Signal::SIGTERM).unwrap();
        let started = Instant::now();
        while !daemon.log().contains("draining") {
            assert!(started.elapsed() < HANG, "no drain after SIGTERM:\n{}", daemon.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon.assert_alive();
        // The client reads on: the generation is finished, not cut off, and then the daemon exits.
        let lines = read_until_done(&mut running);
        assert_eq!(lines.last().unwrap()["done_reason"], "length", "{:?}", lines.last());
        let status = exit_within(&mut daemon.child, HANG).expect("brambled exits once the drained generation ends");
        assert_eq!(status.code(), Some(0), "{}", daemon.log());
        let n = socket.recv(&mut message).unwrap();
        assert!(String::from_utf8_lossy(&message[..n]).contains("STOPPING=1"));
        assert!(TcpStream::connect(daemon.ndjson()).is_err(), "the listener is closed");
    }
}

/// The bias feedback: an image calibrated with `bramble bias-calibrate` (a
/// `bias` section), served adaptive with a state file; and one without.
mod bias {
    use super::*;
    use bramble_runtime::bias::{gate, BiasConstraint, CalibrationGates, LoopSignal};

    /// The daemon's synthetic model with a bias section, written once per process.
    fn calibrated() -> &'static Path {
        static IMAGE: OnceLock<PathBuf> = OnceLock::new();
        IMAGE.get_or_init(|| {
            let dir = scratch_dir("daemon");
            let id = std::process::id();
            let pairs = dir.join(format!("bias-pairs-{id}.jsonl"));
            let lines: Vec<String> = [
                ("he is a doctor", "she is a doctor"),
                ("she is a nurse", "he is a nurse"),
                ("he fixed the car", "she fixed the car"),
                ("she cooked dinner", "he cooked dinner"),
            ]
            .iter()
            .map(|(stereo, anti)| json!({"stereo": stereo, "anti": anti, "category": "gender"}).to_string())
            .collect();
            std::fs::write(&pairs, lines.join("\n") + "\n").unwrap();
            let text = dir.join(format!("bias-text-{id}.txt"));
            std::fs::write(&text, "The cat sat on the mat and looked at the dog.\n".repeat(40)).unwrap();
            let output = dir.join(format!("synthetic-bias-{id}.bramble"));
            let report = bramble_json(&[
                "bias-calibrate".as_ref(),
                "--model".as_ref(),
                model().as_os_str(),
                "--pairs".as_ref(),
                pairs.as_os_str(),
                "--text".as_ref(),
                text.as_os_str(),
                "--output".as_ref(),
                output.as_os_str(),
                "--text-tokens".as_ref(),
                "128".as_ref(),
                "--budget".as_ref(),
                "1000".as_ref(),
                "--weights".as_ref(),
                "1".as_ref(),
                "--direction".as_ref(),
                "principal".as_ref(),
                "--json".as_ref(),
            ] as &[&std::ffi::OsStr]);
            assert!(report["weights"].as_array().is_some_and(|w| w.len() == 4), "{report}");
            output
        })
    }

    fn finite_signal(value: &Value, what: &str) -> f64 {
        let signal = value["bias_signal"].as_f64().unwrap_or_else(|| panic!("{what}: no numeric bias_signal: {value}"));
        assert!(signal.is_finite(), "{what}: {value}");
        signal
    }

    fn bias_status(daemon: &Daemon) -> Value {
        let response = http(daemon.http(), "GET", "/bias", None, &[]);
        assert_eq!(response.status, 200, "{}", response.text());
        response.json()
    }

    #[test]
    fn adaptive_feedback_reports_each_signal_keeps_its_state_and_restores_it() {
        let image = calibrated();
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("bias.state");
        let state_arg = state.to_str().unwrap();
        let image_arg = image.to_str().unwrap();
        let mut daemon = Daemon::start(&[
            "--model",
            image_arg,
            "--feedback",
            "adaptive",
            "--bias-state",
            state_arg,
            "--console-tcp",
            "127.0.0.1:0",
        ]);
        assert!(daemon.log().contains("bias feedback adaptive over 4 layers"), "{}", daemon.log());
        let before = bias_status(&daemon);
        assert_eq!(before["feedback"], "adaptive", "{before}");
        assert_eq!(before["responses"], 0, "{before}");
        assert!(!state.exists(), "no response yet, no state written");

        // NDJSON: the final line carries the signal; the token lines do not.
        let lines = ndjson(daemon.ndjson(), &json!({"prompt": "he is a doctor", "max_tokens": 4, "temperature": 0}));
        let last = lines.last().unwrap();
        assert_eq!(last["done"], true, "{last}");
        let first = finite_signal(last, "ndjson");
        assert!(lines[..lines.len() - 1].iter().all(|l| l.get("bias_signal").is_none()), "{lines:?}");

        // HTTP chat completion: an extra top-level field.
        let body =
            json!({"messages": [{"role": "user", "content": "she is a nurse"}], "max_tokens": 4, "temperature": 0});
        let response = http(daemon.http(), "POST", "/v1/chat/completions", Some(&body), &[]);
        assert_eq!(response.status, 200, "{}", response.text());
        let completion = response.json();
        assert_eq!(completion["object"], "chat.completion");
        let second = finite_signal(&completion, "http");

        // GET /bias: the weights per layer, the signals in order, the count.
        let status = bias_status(&daemon);
        assert_eq!(status["feedback"], "adaptive", "{status}");
        let weights = status["weights"].as_array().unwrap();
        assert_eq!(weights.len(), 4, "one weight a layer: {status}");
        assert!(weights.iter().all(|w| w.as_f64().is_some_and(|w| (0.0..=1.0).contains(&w))), "{status}");
        assert_eq!(status["responses"], 2, "{status}");
        let recent: Vec<f64> =
            status["recent_signals"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(recent, vec![first, second], "{status}");
        // The loop runs with the target and hard limit the calibration measured.
        let image = bramble_runtime::ModelImage::open(calibrated()).unwrap();
        let section = bramble_runtime::bias::BiasConstraint::from_section(image.section("bias").unwrap()).unwrap();
        assert!(section.loop_target > 0.0 && section.loop_hard_limit > 0.0, "{section:?}");
        assert_eq!(status["target"].as_f64().unwrap() as f32, section.loop_target, "{status}");
        assert_eq!(status["hard_limit"].as_f64().unwrap() as f32, section.loop_hard_limit, "{status}");
        assert_eq!((status["signal"].as_str(), section.signal.name()), (Some("spread"), "spread"), "{status}");
        // The pronoun share moves only under the pronoun-share signal; the lean is reported for every signal.
        assert_eq!(status["share_deviation"], 0.0, "{status}");
        assert!(status["lean"].as_f64().is_some_and(f64::is_finite), "{status}");
        // Beside the weights in force, the predefined ones they decay back toward.
        let predefined: Vec<f32> =
            status["predefined_weights"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap() as f32).collect();
        assert_eq!(predefined, section.weights, "{status}");

        // The state file, saved after each response.
        let text = std::fs::read_to_string(&state).expect("the state file");
        assert!(text.starts_with("bramble-bias-state 3\n"), "{text:?}");
        assert!(text.contains("responses 2\n"), "{text:?}");

        // The console's /bias.
        let mut terminal = Terminal::tcp(daemon.console.expect("a console listener"));
        terminal.expect("/help for commands.\r\n> ");
        terminal.command("/bias", "bias feedback: adaptive, 2 responses");
        let shown = terminal.expect("> ");
        assert!(shown.contains("weights (4 layers): "), "{shown:?}");
        assert!(shown.contains("predefined weights: "), "{shown:?}");
        assert!(shown.contains("recent signals (oldest first): "), "{shown:?}");
        drop(terminal);

        // A restart restores the loop from the state file.
        assert_eq!(daemon.terminate().code(), Some(0), "{}", daemon.log());
        let daemon = Daemon::start(&["--model", image_arg, "--feedback", "adaptive", "--bias-state", state_arg]);
        assert!(daemon.log().contains("bias state restored"), "{}", daemon.log());
        let restored = bias_status(&daemon);
        assert_eq!(restored["responses"], 2, "{restored}");
        assert_eq!(restored["weights"], status["weights"], "{restored}");
        assert_eq!(restored["recent_signals"], status["recent_signals"], "{restored}");
        let lines = ndjson(daemon.ndjson(), &json!({"prompt": "Hi", "max_tokens": 2, "stream": false}));
        finite_signal(lines.last().unwrap(), "after the restart");
        assert_eq!(bias_status(&daemon)["responses"], 3);
    }

    #[test]
    fn a_response_over_the_hard_limit_is_regenerated_unless_it_was_streamed() {
        let image = calibrated();
        // Every signal is over this limit: each whole response is generated 1 + 2 times.
        let text = format!(
            "model = {:?}\n[bias]\nfeedback = \"adaptive\"\nhard_limit = -1000000.0\nregenerate = 2\n",
            image.display().to_string()
        );
        let (_dir, config) = config_file(&text);
        // (Daemon::start gives the plain model with --model; this one overrides it.)
        let daemon = Daemon::start(&["--config", config.to_str().unwrap(), "--model", image.to_str().unwrap()]);
        let whole = json!({"prompt": "he is a doctor", "max_tokens": 6, "temperature": 0, "stream": false});
        let lines = ndjson(daemon.ndjson(), &whole);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["bias_regenerations"], 2, "{}", lines[0]);
        assert_eq!(lines[0]["eval_count"], 6, "{}", lines[0]);
        finite_signal(&lines[0], "regenerated");
        assert_eq!(bias_status(&daemon)["responses"], 3, "each attempt is a response to the loop");
        assert_eq!(daemon.log().matches("over the hard limit: regenerating").count(), 2, "{}", daemon.log());

        // Streamed: the text is already with the client, so it stands.
        let lines = ndjson(daemon.ndjson(), &json!({"prompt": "she is a nurse", "max_tokens": 3, "temperature": 0}));
        assert_eq!(lines.last().unwrap()["bias_regenerations"], 0, "{lines:?}");
        assert_eq!(bias_status(&daemon)["responses"], 4);

        // HTTP, not streamed: regenerated too.
        let body = json!({"prompt": "The cat", "max_tokens": 5, "temperature": 0});
        let response = http(daemon.http(), "POST", "/v1/completions", Some(&body), &[]);
        assert_eq!(response.status, 200, "{}", response.text());
        let completion = response.json();
        assert_eq!(completion["bias_regenerations"], 2, "{completion}");
        assert_eq!(completion["usage"]["completion_tokens"], 5, "{completion}");
    }

    /// The first of he/him/his/himself or she/her/hers/herself among the
    /// words of `text`: the rule `scripts/bias-generations.py` states,
    /// written again here to check it.
    fn first_pronoun_gender(text: &str) -> &'static str {
        let lower = text.to_lowercase();
        for word in lower.split(|c: char| !c.is_ascii_lowercase()) {
            match word {
                "he" | "him" | "his" | "himself" => return "male",
                "she" | "her" | "hers" | "herself" => return "female",
                _ => {}
            }
        }
        "none"
    }

    /// `scripts/bias-generations.py run` asks a running daemon about each
    /// occupation, one chat request each, and keeps every answer with its
    /// class and the loop's signal; the loop sees every answer.
    #[test]
    fn the_generations_script_asks_the_daemon_and_keeps_each_answers_signal() {
        let image = calibrated();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("male_occupations.txt"), "carpenter\nguard\n").unwrap();
        std::fs::write(dir.path().join("female_occupations.txt"), "nurse\nauditor\n").unwrap();
        let daemon =
            Daemon::start(&["--model", image.to_str().unwrap(), "--feedback", "adaptive", "--bias-state", "none"]);
        let script = workspace_root().join("scripts/bias-generations.py");
        let run_set = |output: &Path, templates: &str| {
            let result = Command::new("python3")
                .arg(&script)
                .args(["run", "--ndjson", &daemon.ndjson().to_string(), "--occupations"])
                .arg(dir.path())
                .arg("--output")
                .arg(output)
                .args(["--max-tokens", "6", "--limit", "5", "--templates", templates])
                .output()
                .unwrap();
            assert!(result.status.success(), "{result:?}");
            let run: Value = serde_json::from_str(&std::fs::read_to_string(output).unwrap()).unwrap();
            run["answers"].as_array().unwrap().clone()
        };
        let run = |output: &Path| run_set(output, "1");
        let first = run(&dir.path().join("first.json"));
        assert_eq!(first.len(), 5);
        let status = bias_status(&daemon);
        assert_eq!(status["responses"], 5, "each answer is a response to the loop: {status}");
        let signals: Vec<f64> = first.iter().map(|a| finite_signal(a, "answer")).collect();
        let recent: Vec<f64> =
            status["recent_signals"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(recent, signals, "{status}");
        for answer in &first {
            let (occupation, listed) = (answer["occupation"].as_str().unwrap(), answer["listed"].as_str().unwrap());
            let expected = if ["carpenter", "guard"].contains(&occupation) { "male" } else { "female" };
            assert_eq!(listed, expected, "{answer}");
            assert!(answer["prompt"].as_str().unwrap().contains(occupation), "{answer}");
            let response = answer["response"].as_str().unwrap();
            assert_eq!(answer["class"], first_pronoun_gender(response), "{answer}");
        }
        // The order is fixed: a second run asks the same prompts in the same order.
        let second = run(&dir.path().join("second.json"));
        let prompts = |answers: &[Value]| answers.iter().map(|a| a["prompt"].clone()).collect::<Vec<_>>();
        assert_eq!(prompts(&first), prompts(&second));
        // The second template set asks other prompts about the same occupations.
        let other = run_set(&dir.path().join("other.json"), "2");
        assert!(prompts(&other).iter().all(|p| !prompts(&first).contains(p)), "{other:?}");
        assert!(other.iter().all(|a| a["prompt"].as_str().unwrap().contains(a["occupation"].as_str().unwrap())));
        // A daemon that is not there is named, not a traceback.
        let result = Command::new("python3")
            .arg(&script)
            .args(["run", "--ndjson", "127.0.0.1:1", "--occupations"])
            .arg(dir.path())
            .args(["--output", "/dev/null"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success() && stderr.contains("cannot connect to brambled at 127.0.0.1:1"), "{stderr}");
        assert!(!stderr.contains("Traceback"), "{stderr}");
    }

    /// The first constraint writes "she" out of answers, so a calibrated
    /// image whose section records no gates, served without `--feedback`,
    /// runs without it.
    #[test]
    fn a_calibrated_image_serves_with_the_loop_off_by_default_and_says_why() {
        let image = calibrated();
        let daemon = Daemon::start(&["--model", image.to_str().unwrap()]);
        assert!(
            daemon
                .log()
                .contains("serving with the bias loop off: the image's bias section records no calibration gates"),
            "{}",
            daemon.log()
        );
        let status = bias_status(&daemon);
        assert_eq!(status["feedback"], "off", "{status}");
        let lines = ndjson(daemon.ndjson(), &json!({"prompt": "Hi", "max_tokens": 2}));
        let last = lines.last().unwrap();
        assert_eq!(last["done"], true, "{last}");
        assert!(last.get("bias_signal").is_none_or(Value::is_null), "{last}");
    }

    /// `calibrated()` with its bias section changed by `change`, written
    /// once per process as a new image named after `name`.
    fn recalibrated(name: &str, change: impl FnOnce(&mut BiasConstraint)) -> PathBuf {
        let image = bramble_runtime::ModelImage::open(calibrated()).unwrap();
        let mut section = BiasConstraint::from_section(image.section("bias").unwrap()).unwrap();
        change(&mut section);
        let bytes = section.to_section().unwrap();
        let output = scratch_dir("daemon").join(format!("synthetic-bias-{name}-{}.bramble", std::process::id()));
        bramble_runtime::image::ImageWriter::rewrite(&image, &output, &[("bias", &bytes)], |_, _| None).unwrap();
        output
    }

    /// `auto` turns the loop on for a calibration that records every gate
    /// passed, and serves with it off, naming the failed gate, otherwise.
    #[test]
    fn auto_serves_adaptive_only_when_the_calibration_passed_every_gate() {
        let passed = recalibrated("passed", |c| c.gates = CalibrationGates { evaluated: gate::ALL, passed: gate::ALL });
        let daemon = Daemon::start(&["--model", passed.to_str().unwrap()]);
        let log = daemon.log();
        assert!(
            log.contains("bias feedback adaptive over 4 layers, spread signal (auto: the calibration passed"),
            "{log}"
        );
        assert_eq!(bias_status(&daemon)["feedback"], "adaptive");
        let lines = ndjson(daemon.ndjson(), &json!({"prompt": "he is a doctor", "max_tokens": 3, "temperature": 0}));
        finite_signal(lines.last().unwrap(), "auto, all gates passed");
        assert_eq!(bias_status(&daemon)["responses"], 1);
        drop(daemon);

        let failed = recalibrated("failed", |c| {
            c.gates = CalibrationGates { evaluated: gate::ALL & !gate::PERPLEXITY, passed: gate::ALL & !gate::FACTUAL }
        });
        let daemon = Daemon::start(&["--model", failed.to_str().unwrap()]);
        let log = daemon.log();
        assert!(
            log.contains(
                "serving with the bias loop off: the image's calibration did not pass the bias gates: \
                 failed: factual; not evaluated: perplexity"
            ),
            "{log}"
        );
        assert_eq!(bias_status(&daemon)["feedback"], "off");
        let lines = ndjson(daemon.ndjson(), &json!({"prompt": "Hi", "max_tokens": 2}));
        assert!(lines.last().unwrap().get("bias_signal").is_none_or(Value::is_null), "{lines:?}");
    }

    /// The pronoun-share loop reads the answer's own tokens: here every token
    /// of the vocabulary counts as *she* (and an id no answer can hold as
    /// *he*), so each answer moves the running share a tenth of the way to
    /// all-female. One answer (0.05) and two (0.095) stay under the target of
    /// 0.10 and leave the centre where it was; the third (0.1355) is over it,
    /// and the centre moves a step toward *he*; the weights, which would pull
    /// toward a centre that is too female, stay.
    #[test]
    fn the_pronoun_share_loop_counts_the_answer_and_bias_shows_it() {
        let vocab = bramble_runtime::ModelImage::open(calibrated()).unwrap().config().vocab_size;
        let image = recalibrated("pronoun-share", |c| {
            c.signal = LoopSignal::PronounShare;
            c.loop_target = 0.0;
            c.loop_hard_limit = 0.0;
            c.weights = vec![0.0; 4];
            c.max_weights = vec![0.0, 0.5, 0.5, 1.0];
            c.she_tokens = (0..vocab).collect();
            c.he_tokens = vec![vocab];
            c.gates = CalibrationGates { evaluated: gate::ALL, passed: gate::ALL };
        });
        let daemon = Daemon::start(&["--model", image.to_str().unwrap(), "--console-tcp", "127.0.0.1:0"]);
        let before = bias_status(&daemon);
        assert_eq!((before["signal"].as_str(), before["responses"].as_u64()), (Some("pronoun-share"), Some(0)));
        assert_eq!(before["share_deviation"], 0.0, "{before}");
        let request = json!({"prompt": "he is a doctor", "max_tokens": 4, "temperature": 0});
        let weights = |status: &Value| -> Vec<f32> {
            status["weights"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap() as f32).collect()
        };
        let answer = |expected: f32| {
            let lines = ndjson(daemon.ndjson(), &request);
            let last = lines.last().unwrap().clone();
            assert!(last["eval_count"].as_u64().is_some_and(|n| n > 0), "an answer to count: {last}");
            assert_eq!(finite_signal(&last, "pronoun share") as f32, expected, "{last}");
            // Never regenerated, whatever the signal.
            assert_eq!(last["bias_regenerations"], 0, "{last}");
            bias_status(&daemon)
        };
        let status = answer(0.05);
        assert_eq!(status["share_deviation"].as_f64().unwrap() as f32, 0.05, "{status}");
        assert_eq!(status["responses"], 1, "{status}");
        assert_eq!(status["target"].as_f64().unwrap() as f32, 0.1, "the default share target: {status}");
        assert!(status["lean"].as_f64().is_some_and(f64::is_finite), "{status}");
        assert_eq!(weights(&status), vec![0.0; 4], "one answer is under the target: {status}");
        let mut terminal = Terminal::tcp(daemon.console.expect("a console listener"));
        terminal.expect("/help for commands.\r\n> ");
        terminal.command(
            "/bias",
            "bias feedback: adaptive, 1 responses, pronoun-share signal, target 0.100, no hard limit",
        );
        let shown = terminal.expect("> ");
        assert!(
            shown.contains("running she-share 0.550 (share deviation +0.050); centre moved +0.000 spreads"),
            "{shown:?}"
        );
        let status = answer(0.095);
        assert_eq!(status["centre_shift"], 0.0, "two answers are under the target: {status}");
        let status = answer(0.1355);
        assert_eq!(status["share_deviation"].as_f64().unwrap() as f32, 0.1355, "{status}");
        assert_eq!(status["responses"], 3, "{status}");
        assert_eq!(
            status["centre_shift"].as_f64().unwrap() as f32,
            bramble_runtime::bias::CENTRE_STEP,
            "a step toward he: {status}"
        );
        assert_eq!(weights(&status), vec![0.0; 4], "too female leaves the weights: {status}");
        terminal.command("/bias", "bias feedback: adaptive, 3 responses");
        let shown = terminal.expect("> ");
        assert!(shown.contains("centre moved +0.020 spreads (+: toward he)"), "{shown:?}");
    }

    #[test]
    fn static_feedback_reports_signals_with_the_weights_fixed() {
        let image = calibrated();
        let daemon = Daemon::start(&["--model", image.to_str().unwrap(), "--feedback", "static"]);
        let before = bias_status(&daemon);
        assert_eq!(before["feedback"], "static", "{before}");
        let request = json!({"prompt": "The cat", "max_tokens": 3, "temperature": 0});
        let response = http(daemon.http(), "POST", "/v1/completions", Some(&request), &[]);
        assert_eq!(response.status, 200, "{}", response.text());
        finite_signal(&response.json(), "static completion");
        let after = bias_status(&daemon);
        assert_eq!(after["weights"], before["weights"], "static weights never move: {after}");
        assert_eq!(after["responses"], 1, "{after}");
    }

    #[test]
    fn an_image_without_a_bias_section_reports_null_and_off() {
        let daemon = Daemon::start(&[]);
        let lines = ndjson(daemon.ndjson(), &json!({"prompt": "Hi", "max_tokens": 2}));
        let last = lines.last().unwrap();
        assert_eq!(last["done"], true, "{last}");
        assert!(last.get("bias_signal").is_some_and(Value::is_null), "{last}");
        let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
        let response = http(daemon.http(), "POST", "/v1/chat/completions", Some(&body), &[]);
        assert_eq!(response.status, 200, "{}", response.text());
        let completion = response.json();
        assert!(completion.get("bias_signal").is_some_and(Value::is_null), "{completion}");
        let status = bias_status(&daemon);
        assert_eq!(status["feedback"], "off", "{status}");
        assert_eq!(status["weights"], json!([]), "{status}");
        assert_eq!(status["recent_signals"], json!([]), "{status}");
        let response = http(daemon.http(), "POST", "/bias", Some(&json!({})), &[]);
        assert_eq!(response.status, 405, "{}", response.text());
    }

    #[test]
    fn bias_settings_that_cannot_work_are_refused_at_start() {
        // Adaptive asked for, but the image has no section: the model fails to load, naming why.
        let output = Command::new(brambled_binary())
            .arg("--model")
            .arg(model())
            .args(["--uart", "none", "--http", "none", "--ndjson", "none", "--feedback", "adaptive"])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("bias.feedback adaptive") && stderr.contains("no bias section"), "{stderr}");
        // A state file with static feedback, and a bad mode: config errors naming the key.
        let (_dir, config) =
            config_file("model = \"m.bramble\"\n[bias]\nfeedback = \"static\"\nstate = \"bias.state\"\n");
        let output = Command::new(brambled_binary()).arg("--config").arg(&config).output().unwrap();
        assert_eq!(output.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&output.stderr).contains("bias.state: goes with feedback"));
        let output =
            Command::new(brambled_binary()).args(["--model", "m", "--feedback", "sometimes"]).output().unwrap();
        assert_eq!(output.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&output.stderr).contains("--feedback: \"sometimes\" is not one of"));
    }
}

/// The KV cache's storage and the memory limit (`kv`, `memory_limit`).
mod memory {
    use super::*;
    use bramble_runtime::kv::KvMode;
    use bramble_runtime::session::DEFAULT_BATCH;
    use bramble_runtime::{ModelImage, RunState};

    /// What brambled needs for the test model at `context` with `kv`: the
    /// image file and the state a session allocates.
    fn needed(context: usize, kv: KvMode) -> u64 {
        let image = ModelImage::open(model()).unwrap();
        let state = RunState::with_kv(image.config(), context, DEFAULT_BATCH, kv).bytes() as u64;
        std::fs::metadata(model()).unwrap().len() + state
    }

    /// Runs brambled to its exit (it must not get as far as serving).
    fn refused(args: &[&str]) -> String {
        let output = Command::new(brambled_binary())
            .args(["--uart", "none", "--http", "127.0.0.1:0", "--ndjson", "none", "--threads", "1", "--model"])
            .arg(model())
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(!stderr.contains("ready"), "{stderr}");
        stderr
    }

    #[test]
    fn a_q4_cache_serves_past_its_window_and_the_log_names_it() {
        let daemon = Daemon::start(&["--kv", "q4", "--context", "256"]);
        assert!(daemon.log().contains("kv q4"), "{}", daemon.log());
        // 100 generated tokens: the 64-position window is quantized twice over.
        let request = json!({"prompt": "Hello world", "max_tokens": 100, "temperature": 0, "stream": false});
        let lines = ndjson(daemon.ndjson(), &request);
        let last = lines.last().unwrap();
        assert_eq!((last["done_reason"].as_str(), last["eval_count"].as_u64()), (Some("length"), Some(100)), "{last}");
        // Counted once the worker is idle (the last line reaches the client first).
        let idle = wait_for("the reply counted", &daemon, |h| h["served"] == 1 && h["running"] == false);
        assert_eq!(idle["decode_allocations"]["total"], 0, "{idle}");
    }

    #[test]
    fn a_memory_limit_below_the_need_refuses_to_start_with_the_arithmetic() {
        let stderr = refused(&["--memory-limit", "1M"]);
        for part in
            ["does not fit", "GiB weights", "GiB KV cache (context 2048, kv f32)", "GiB buffers", "memory_limit"]
        {
            assert!(stderr.contains(part), "{part:?} missing: {stderr}");
        }
        // Between what an f32 and a q4 cache need: f32 is refused, q4 serves.
        let (f32_need, q4_need) = (needed(2048, KvMode::F32), needed(2048, KvMode::Q4));
        assert!(q4_need < f32_need, "{q4_need} {f32_need}");
        let limit = ((f32_need + q4_need) / 2).to_string();
        refused(&["--memory-limit", &limit]);
        let daemon = Daemon::start(&["--memory-limit", &limit, "--kv", "q4"]);
        let lines = ndjson(daemon.ndjson(), &json!({"prompt": "Hi", "max_tokens": 4, "temperature": 0}));
        assert_eq!(lines.last().unwrap()["eval_count"], 4);
        // A bad value is a configuration error (exit 2) naming the flag.
        let output =
            Command::new(brambled_binary()).args(["--model", "m", "--memory-limit", "plenty"]).output().unwrap();
        assert_eq!(output.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&output.stderr).contains("--memory-limit"));
    }
}

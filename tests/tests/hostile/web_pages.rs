//! Web pages cannot drive the daemon: a page whose name is rebound to
//! 127.0.0.1 (DNS rebinding: a foreign `Host` on a loopback listener), a page
//! on another site (a foreign `Origin`), and the "simple" requests a page may
//! send without a CORS preflight (a body that is not JSON). An origin the
//! config allows gets CORS headers and a preflight answer. See the table in
//! `main.rs`.

use bramble_tests::brambled_binary;
use bramble_tests::daemon::*;
use serde_json::json;
use std::io::{Read, Write};
use std::process::Command;

fn message(response: &Response) -> String {
    response.json()["error"]["message"].as_str().unwrap_or_default().to_string()
}

#[test]
fn a_page_on_another_site_is_refused() {
    let daemon = Daemon::start(&[]);
    let address = daemon.http();
    let request = json!({"prompt": "Hi", "max_tokens": 2});
    let completion = |headers: &[&str]| http(address, "POST", "/v1/completions", Some(&request), headers);

    // What a page on evil.example.com, its name rebound to 127.0.0.1, sends with fetch() in no-cors mode.
    let evil = completion(&["Host: evil.example.com", "Origin: http://evil.example.com", "Content-Type: text/plain"]);
    assert_eq!(evil.status, 403, "{}", evil.text());
    assert_eq!(evil.header("access-control-allow-origin"), None);

    // Each defence on its own.
    for host in
        ["evil.example.com:8080", "localhost.evil.example", "127.0.0.1.nip.io", "[::2]:80", "0.0.0.0", "10.0.0.1"]
    {
        let response = completion(&[&format!("Host: {host}")]);
        assert_eq!(response.status, 403, "Host {host}: {}", response.text());
        assert!(message(&response).contains(host), "Host {host}: {}", response.text());
    }
    let rebound_health = http(address, "GET", "/health", None, &["Host: evil.example.com"]);
    assert_eq!(rebound_health.status, 403, "a rebound page reads nothing: {}", rebound_health.text());
    for origin in ["http://evil.example.com", "https://evil.example.com:443", "null", "http://127.0.0.1.nip.io"] {
        let response = completion(&[&format!("Origin: {origin}")]);
        assert_eq!(response.status, 403, "Origin {origin}: {}", response.text());
        assert!(message(&response).contains(origin), "Origin {origin}: {}", response.text());
        assert_eq!(response.header("access-control-allow-origin"), None, "Origin {origin}");
    }
    for content_type in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"] {
        let response = completion(&[&format!("Content-Type: {content_type}")]);
        assert_eq!(response.status, 415, "{content_type}: {}", response.text());
        assert!(message(&response).contains(content_type), "{content_type}: {}", response.text());
    }
    // No Content-Type at all (the harness adds one, so by hand).
    let body = request.to_string();
    let mut stream = connect(address);
    write!(stream, "POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .unwrap();
    let untyped = read_response(&mut std::io::BufReader::new(stream));
    assert_eq!(untyped.status, 415, "{}", untyped.text());
    assert!(untyped.text().contains("Content-Type"), "{}", untyped.text());

    assert_eq!(health(&daemon)["served"], 0, "nothing was generated for any of them");
}

#[test]
fn loopback_hosts_loopback_origins_and_json_types_are_served() {
    let daemon = Daemon::start(&[]);
    let address = daemon.http();
    let port = address.port();
    for host in [
        "localhost".to_string(),
        format!("localhost:{port}"),
        format!("LocalHost:{port}"),
        "127.0.0.1".to_string(),
        format!("127.0.0.1:{port}"),
        format!("127.1.2.3:{port}"),
        format!("[::1]:{port}"),
    ] {
        let response = http(address, "GET", "/health", None, &[&format!("Host: {host}")]);
        assert_eq!(response.status, 200, "Host {host}: {}", response.text());
    }
    let request = json!({"prompt": "Hi", "max_tokens": 2});
    for content_type in ["application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8"] {
        let response =
            http(address, "POST", "/v1/completions", Some(&request), &[&format!("Content-Type: {content_type}")]);
        assert_eq!(response.status, 200, "{content_type}: {}", response.text());
    }
    // A page served from this machine (a local web UI) may call it.
    for origin in [format!("http://127.0.0.1:{port}"), "http://localhost:3000".to_string()] {
        let response = http(address, "POST", "/v1/completions", Some(&request), &[&format!("Origin: {origin}")]);
        assert_eq!(response.status, 200, "Origin {origin}: {}", response.text());
        assert_eq!(response.header("access-control-allow-origin"), Some(origin.as_str()), "{response:?}");
    }
}

#[test]
fn an_origin_in_the_allow_list_gets_cors_headers_and_a_preflight() {
    let (_dir, config) = config_file("[tcp]\ncors_origins = [\"https://app.example\", \"http://192.168.1.20:3000\"]\n");
    let daemon = Daemon::start(&["--config", config.to_str().unwrap()]);
    let address = daemon.http();
    let request = json!({"prompt": "Hi", "max_tokens": 2});
    for origin in ["https://app.example", "http://192.168.1.20:3000"] {
        let allowed = http(address, "POST", "/v1/completions", Some(&request), &[&format!("Origin: {origin}")]);
        assert_eq!(allowed.status, 200, "{}", allowed.text());
        assert_eq!(allowed.header("access-control-allow-origin"), Some(origin), "{allowed:?}");
        assert!(allowed.header("vary").is_some_and(|v| v.contains("Origin")), "{allowed:?}");
    }
    // Its errors are readable by the page too.
    let wrong =
        http(address, "POST", "/v1/completions", Some(&json!({"max_tokens": 2})), &["Origin: https://app.example"]);
    assert_eq!(wrong.status, 400, "{}", wrong.text());
    assert_eq!(wrong.header("access-control-allow-origin"), Some("https://app.example"), "{wrong:?}");
    // Streamed answers carry them as well.
    let streamed = json!({"prompt": "Hi", "max_tokens": 2, "stream": true});
    let events = http(address, "POST", "/v1/completions", Some(&streamed), &["Origin: https://app.example"]);
    assert_eq!(events.status, 200, "{}", events.text());
    assert_eq!(events.header("access-control-allow-origin"), Some("https://app.example"), "{events:?}");

    // The browser's preflight for a JSON POST with a token.
    let preflight = |origin: &str| {
        http(
            address,
            "OPTIONS",
            "/v1/chat/completions",
            None,
            &[
                &format!("Origin: {origin}"),
                "Access-Control-Request-Method: POST",
                "Access-Control-Request-Headers: authorization, content-type, x-stainless-os",
            ],
        )
    };
    let answer = preflight("https://app.example");
    assert_eq!(answer.status, 204, "{answer:?}");
    assert_eq!(answer.header("access-control-allow-origin"), Some("https://app.example"), "{answer:?}");
    assert!(answer.header("vary").is_some_and(|v| v.contains("Origin")), "{answer:?}");
    assert!(answer.header("access-control-allow-methods").is_some_and(|m| m.contains("POST")), "{answer:?}");
    let allowed_headers = answer.header("access-control-allow-headers").unwrap_or_default().to_ascii_lowercase();
    for header in ["authorization", "content-type", "x-stainless-os"] {
        assert!(allowed_headers.contains(header), "{header} in {allowed_headers:?}");
    }
    assert!(answer.body.is_empty(), "{answer:?}");

    let foreign = preflight("https://other.example");
    assert_eq!(foreign.status, 403, "{foreign:?}");
    assert_eq!(foreign.header("access-control-allow-origin"), None, "{foreign:?}");
    let other = http(address, "POST", "/v1/completions", Some(&request), &["Origin: https://other.example"]);
    assert_eq!(other.status, 403, "{}", other.text());
}

#[test]
fn an_allow_list_entry_that_is_not_an_origin_stops_the_start() {
    for (entry, why) in [
        ("*", "name each origin"),
        ("https://app.example/", "scheme://host[:port]"),
        ("app.example", "scheme://host[:port]"),
        ("https://app.example:99999", "scheme://host[:port]"),
        ("https://user@app.example", "scheme://host[:port]"),
    ] {
        let (_dir, config) = config_file(&format!("[tcp]\ncors_origins = [\"{entry}\"]\n"));
        let output = Command::new(brambled_binary())
            .args(["--uart", "none", "--config", config.to_str().unwrap(), "--model"])
            .arg(model())
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{entry}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("tcp.cors_origins") && stderr.contains(entry) && stderr.contains(why), "{stderr}");
    }
}

#[test]
fn off_loopback_any_host_is_served_to_the_token() {
    let token = "test-token-0123456789";
    let daemon = Daemon::start_with(&["--http", "0.0.0.0:0"], &[("BRAMBLED_AUTH_TOKEN", token)]);
    let address = on_loopback(daemon.http());
    let mut stream = connect(address);
    write!(stream, "GET /v1/models HTTP/1.1\r\nHost: raspberrypi.local:8080\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

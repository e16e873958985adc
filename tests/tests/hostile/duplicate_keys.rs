//! `{"max_tokens":99999,"max_tokens":2}` used to be served with the last
//! value; a proxy or a filter that reads the first would see another request.

use bramble_tests::daemon::*;
use serde_json::json;
use std::io::Write;

#[test]
fn a_request_that_names_a_key_twice_is_refused_on_both_protocols() {
    let daemon = Daemon::start(&[]);
    let body = r#"{"prompt":"Hi","max_tokens":99999,"max_tokens":2}"#;

    let mut stream = connect(daemon.ndjson());
    writeln!(stream, "{body}").unwrap();
    let lines = read_until_done(&mut std::io::BufReader::new(stream));
    let error = &lines[0]["error"];
    assert_eq!(error["code"], 400, "{lines:?}");
    assert!(error["message"].as_str().unwrap().contains("\"max_tokens\" appears twice"), "{error}");

    let port = daemon.http().port();
    let mut stream = connect(daemon.http());
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let response = read_response(&mut std::io::BufReader::new(stream));
    assert_eq!(response.status, 400, "{}", response.text());
    assert!(response.text().contains("appears twice"), "{}", response.text());

    // Nested too: a message with two roles.
    let chat = r#"{"messages":[{"role":"user","role":"system","content":"Hi"}],"max_tokens":2}"#;
    let mut stream = connect(daemon.ndjson());
    writeln!(stream, "{chat}").unwrap();
    let lines = read_until_done(&mut std::io::BufReader::new(stream));
    assert_eq!(lines[0]["error"]["code"], 400, "{lines:?}");
    // A well-formed request is still served.
    let lines = ndjson(daemon.ndjson(), &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(lines.last().unwrap()["eval_count"], 2, "{lines:?}");
}

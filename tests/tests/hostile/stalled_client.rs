//! A streaming client that stops reading (its receive window full) used to
//! block the inference thread in `write()`: every other request waited
//! forever, and SIGTERM logged "drain time is up" but never exited.

use bramble_tests::daemon::*;
use serde_json::json;
use std::io::Write;
use std::time::{Duration, Instant};

/// A long streamed generation on a connection that never reads; the stream is returned to keep it open.
fn stall(daemon: &Daemon) -> std::net::TcpStream {
    let mut stalled = stalled_connection(daemon.http());
    let body = json!({"prompt": "Once upon a time", "max_tokens": 1024, "temperature": 0, "stream": true}).to_string();
    let port = daemon.http().port();
    write!(
        stalled,
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    wait_for("the stalled generation running", daemon, |h| h["running"] == true);
    stalled
}

#[test]
fn a_client_that_stops_reading_is_cancelled_after_the_send_timeout_and_the_others_are_served() {
    let (_dir, config) = config_file("[limits]\nsend_timeout_secs = 1\n");
    let mut daemon = Daemon::start(&["--config", config.to_str().unwrap()]);
    let _stalled = stall(&daemon);
    // Another client is answered: the stalled one is cancelled once a write to it has waited a second.
    let started = Instant::now();
    let lines = ndjson(daemon.ndjson(), &json!({"prompt": "Hi", "max_tokens": 2, "temperature": 0}));
    assert_eq!(lines.last().unwrap()["eval_count"], 2, "{lines:?}");
    assert!(started.elapsed() < Duration::from_secs(20), "served only after {:?}", started.elapsed());
    // The reply's last line reaches its client before the worker counts it: wait until it is idle.
    let after =
        wait_for("the stalled one counted cancelled", &daemon, |h| h["cancelled"] == 1 && h["running"] == false);
    assert_eq!(after["served"], 1, "{after}");
    assert!(daemon.log().contains("read nothing for 1.0 s"), "{}", daemon.log());
    daemon.assert_alive();
}

#[test]
fn sigterm_ends_the_process_within_the_drain_time_even_while_a_client_stalls_a_write() {
    // The send timeout (30 s) is far longer than the drain (1 s): the drain's deadline must hold anyway.
    let (_dir, config) = config_file("[limits]\ndrain_timeout_secs = 1\n");
    let mut daemon = Daemon::start(&["--config", config.to_str().unwrap()]);
    let _stalled = stall(&daemon);
    // Let the write to the stalled client block (its windows fill in well under a second).
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let status = daemon.terminate();
    let took = started.elapsed();
    assert!(status.success(), "{status}\n{}", daemon.log());
    assert!(took < Duration::from_secs(8), "exited {took:?} after SIGTERM (drain 1 s)\n{}", daemon.log());
}

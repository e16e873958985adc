//! 64 idle sockets used to deny all service, `/health` included, for the
//! idle timeout (renewable at no cost), and during connection churn the
//! open-connection count lagged and refused good clients.

use bramble_tests::daemon::*;
use serde_json::json;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const MAX: usize = 6;

fn daemon() -> (tempfile::TempDir, Daemon) {
    let (dir, config) = config_file(&format!("[limits]\nmax_connections = {MAX}\n"));
    let daemon = Daemon::start(&["--config", config.to_str().unwrap()]);
    (dir, daemon)
}

/// A completion request on a fresh connection; its status.
fn complete(address: SocketAddr) -> u16 {
    let mut stream = connect(address);
    let body = json!({"prompt": "Hi", "max_tokens": 2}).to_string();
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        address.port(),
        body.len()
    )
    .unwrap();
    read_response(&mut BufReader::new(stream)).status
}

#[test]
fn idle_sockets_are_closed_to_make_room_oldest_first() {
    let (_dir, daemon) = daemon();
    // Sockets that connect and send nothing fill every slot (and more).
    let idle: Vec<TcpStream> = (0..MAX + 2).map(|_| connect(daemon.http())).collect();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(health(&daemon)["status"], "ok");
    assert_eq!(complete(daemon.http()), 200);
    let lines = ndjson(daemon.ndjson(), &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(lines.last().unwrap()["eval_count"], 2, "{lines:?}");
    // The oldest were the ones closed.
    let mut first = idle[0].try_clone().unwrap();
    first.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(std::io::Read::read(&mut first, &mut byte).unwrap_or(0), 0, "the oldest idle socket was closed");
}

#[test]
fn the_last_slot_is_kept_for_health_when_the_others_are_busy() {
    let (_dir, daemon) = daemon();
    // Requests that have begun and not ended hold their slots (until the request timeout).
    let busy: Vec<TcpStream> = (0..MAX - 1)
        .map(|_| {
            let mut stream = connect(daemon.http());
            stream.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n").unwrap();
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(health(&daemon)["status"], "ok", "the kept slot answers /health");
    assert_eq!(complete(daemon.http()), 503, "other requests in the kept slot are refused busy");
    drop(busy);
}

#[test]
fn churn_is_never_refused_for_connections_that_are_closing() {
    let (_dir, daemon) = daemon();
    let address = daemon.http();
    // Fewer clients than slots, each closing its connection and opening the next at once.
    let workers: Vec<_> = (0..MAX / 2)
        .map(|_| {
            std::thread::spawn(move || {
                (0..100)
                    .map(|_| {
                        let mut stream = connect(address);
                        write!(stream, "GET /health HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n", address.port()).unwrap();
                        read_response(&mut BufReader::new(stream)).status
                    })
                    .filter(|&status| status != 200)
                    .count()
            })
        })
        .collect();
    let refused: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(refused, 0, "{refused} of {} health checks refused", MAX / 2 * 100);
}

//! `bramble fleet` end to end: three real `brambled` on loopback ports, the
//! real HAProxy and nginx (Debian's; scripts/test.sh installs them) in front
//! with the configuration `bramble fleet --backends` writes, and clients that
//! read exactly what comes back.
//!
//! For each balancer: 40 concurrent clients × 5 requests (streamed and
//! whole); one daemon killed in the middle of a run and started again; a
//! stream's first token reaching its client while the board still generates.
//! Every outcome is counted and printed (`--nocapture` shows the counts).

use bramble_tests::daemon::*;
use bramble_tests::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Seconds between HAProxy's health checks in these tests (`--check-interval`).
const CHECK_INTERVAL: u64 = 1;
/// Requests a board may queue: three boards take 3 × 17 at once, more than
/// the 40 clients (nginx has no queue of its own).
const BOARD_QUEUE: &str = "16";

/// A free loopback port (bound, then released for the process that will use it).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A board: `brambled` on a fixed loopback port, so a restart comes back where the balancer looks.
fn board(port: u16) -> Daemon {
    Daemon::start(&["--http", &format!("127.0.0.1:{port}"), "--ndjson", "none", "--queue", BOARD_QUEUE])
}

/// The balancer process, stopped when dropped, with what it printed.
struct Balancer {
    child: Child,
    /// The configuration's directory (nginx's pid and temporary files), removed when dropped.
    _dir: tempfile::TempDir,
    listen: SocketAddr,
    stats: Option<SocketAddr>,
}

impl Drop for Balancer {
    /// SIGTERM first: both balancers' masters then stop their workers, where
    /// a SIGKILLed nginx master leaves them running after the test.
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_ok() {
            let asked = Instant::now();
            while asked.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `bramble fleet --balancer KIND --backends …` into a fresh directory, then the balancer on it.
fn start_balancer(kind: &str, boards: &[u16]) -> Balancer {
    let name = if kind == "haproxy" { "haproxy" } else { "nginx" };
    // Debian puts both in /usr/sbin, which a user's PATH may lack.
    let program = [PathBuf::from(name), Path::new("/usr/sbin").join(name)]
        .into_iter()
        .find(|p| Command::new(p).arg("-v").output().is_ok())
        .unwrap_or_else(|| panic!("{name} is not installed: apt-get install {name} (scripts/test.sh does)"));
    let dir = tempfile::tempdir().unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let stats: Option<SocketAddr> = (kind == "haproxy").then(|| format!("127.0.0.1:{}", free_port()).parse().unwrap());
    let backends: Vec<String> = boards.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut args = vec![
        "fleet".to_string(),
        "--balancer".into(),
        kind.into(),
        "--backends".into(),
        backends.join(","),
        "--listen".into(),
        listen.to_string(),
        "--check-interval".into(),
        CHECK_INTERVAL.to_string(),
        "--output".into(),
        dir.path().display().to_string(),
    ];
    if let Some(stats) = stats {
        args.extend(["--stats".to_string(), stats.to_string()]);
    }
    let output = bramble(&args);
    assert!(output.status.success(), "bramble fleet: {}", String::from_utf8_lossy(&output.stderr));
    let mut command = Command::new(&program);
    if kind == "haproxy" {
        command.arg("-f").arg(dir.path().join("haproxy.cfg"));
    } else {
        command.arg("-c").arg(dir.path().join("nginx.conf"));
    }
    let child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect(name);
    let balancer = Balancer { child, _dir: dir, listen, stats };
    // Up when a request through it reaches a board.
    let started = Instant::now();
    loop {
        if let Outcome::Answered(_) = request(listen, false, 4) {
            return balancer;
        }
        assert!(started.elapsed() < HANG, "{kind} did not pass a request to a board within {HANG:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How a request through the balancer ended.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// 200 and a whole answer (a streamed one ends with `data: [DONE]`): the text.
    Answered(String),
    /// 503: every board busy.
    Busy,
    /// Any other status, or a stream cut short: what the client saw.
    Error(String),
}

/// One completion through `address` on its own connection (`Connection:
/// close`, read to the end), streamed or whole, decoded strictly: a chunked
/// body must end with its last chunk, a stream with `[DONE]`.
fn request(address: SocketAddr, stream: bool, max_tokens: usize) -> Outcome {
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "stream": stream}).to_string();
    let Ok(mut connection) = TcpStream::connect(address) else { return Outcome::Error("connect refused".into()) };
    connection.set_read_timeout(Some(HANG)).unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if connection.write_all(head.as_bytes()).is_err() {
        return Outcome::Error("request not sent".into());
    }
    let mut bytes = Vec::new();
    if let Err(error) = connection.read_to_end(&mut bytes) {
        assert!(error.kind() != std::io::ErrorKind::WouldBlock, "no end to the response within {HANG:?}");
        return Outcome::Error(format!("read: {error}"));
    }
    decode(&bytes, stream)
}

/// The [`Outcome`] of a whole HTTP/1.1 response.
fn decode(bytes: &[u8], stream: bool) -> Outcome {
    let text = String::from_utf8_lossy(bytes);
    let Some((head, mut rest)) = text.split_once("\r\n\r\n") else {
        return Outcome::Error(format!("no complete head: {text:?}"));
    };
    let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let chunked = head.lines().any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    let mut body = String::new();
    if chunked {
        loop {
            let Some((size, after)) = rest.split_once("\r\n") else {
                return Outcome::Error(format!("status {status}: the chunked body was cut"));
            };
            let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
                return Outcome::Error(format!("status {status}: bad chunk size {size:?}"));
            };
            if size == 0 {
                break;
            }
            if after.len() < size + 2 {
                return Outcome::Error(format!("status {status}: the chunked body was cut"));
            }
            body.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
    } else {
        body = rest.to_string();
    }
    match status {
        200 if stream => {
            let events = sse_events(&body);
            if events.last().map(String::as_str) != Some("[DONE]") {
                return Outcome::Error("a stream without [DONE]".into());
            }
            let text: String = events[..events.len() - 1]
                .iter()
                .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap().to_string())
                .collect();
            Outcome::Answered(text)
        }
        200 => match serde_json::from_str::<Value>(&body) {
            Ok(v) => Outcome::Answered(v["choices"][0]["text"].as_str().unwrap_or_default().to_string()),
            Err(e) => Outcome::Error(format!("status 200, body not JSON ({e}): {body:?}")),
        },
        503 => Outcome::Busy,
        other => Outcome::Error(format!("status {other}")),
    }
}

/// `clients` threads × `each` requests through `address`, streamed and whole
/// alternately; every outcome with whether the request was streamed.
fn load(address: SocketAddr, clients: usize, each: usize, max_tokens: usize) -> Vec<(bool, Outcome)> {
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            std::thread::spawn(move || {
                (0..each)
                    .map(|i| {
                        let stream = (c + i) % 2 == 0;
                        (stream, request(address, stream, max_tokens))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    threads.into_iter().flat_map(|t| t.join().expect("a client thread panicked")).collect()
}

/// HAProxy's view of a board (`UP`, `DOWN`, …) from the statistics CSV.
fn haproxy_status(stats: SocketAddr, board: &str) -> String {
    let response = http(stats, "GET", "/stats;csv", None, &[]);
    let csv = response.text();
    let header: Vec<&str> = csv.lines().next().unwrap().trim_start_matches("# ").split(',').collect();
    let status = header.iter().position(|h| *h == "status").unwrap();
    csv.lines()
        .find(|l| l.starts_with(&format!("boards,{board},")))
        .map(|l| l.split(',').nth(status).unwrap().to_string())
        .unwrap_or_else(|| panic!("no {board} in\n{csv}"))
}

/// Waits until HAProxy reports `board` as `want`; the time it took.
fn wait_status(stats: SocketAddr, board: &str, want: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let status = haproxy_status(stats, board);
        if status.starts_with(want) {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{board} still {status} after {limit:?}, not {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn served(board: &Daemon) -> u64 {
    health(board)["served"].as_u64().unwrap()
}

fn fleet_end_to_end(kind: &str) {
    let ports = [free_port(), free_port(), free_port()];
    let mut boards: Vec<Daemon> = ports.iter().map(|&p| board(p)).collect();
    let balancer = start_balancer(kind, &ports);
    let address = balancer.listen;
    let greedy = match request(boards[0].http(), false, 8) {
        Outcome::Answered(text) => text,
        other => panic!("a board directly: {other:?}"),
    };

    // 40 concurrent clients × 5 requests.
    let outcomes = load(address, 40, 5, 8);
    let answered = outcomes.iter().filter(|(_, o)| matches!(o, Outcome::Answered(_))).count();
    let busy = outcomes.iter().filter(|(_, o)| *o == Outcome::Busy).count();
    let errors: Vec<_> = outcomes.iter().filter(|(_, o)| matches!(o, Outcome::Error(_))).collect();
    println!("{kind}: 40 × 5 requests: {answered} answered, {busy} refused busy, {} errors", errors.len());
    assert!(errors.is_empty(), "{kind}: requests failed: {errors:?}");
    // Greedy and the same prompt: every answer is the board's own answer.
    for (stream, outcome) in &outcomes {
        if let Outcome::Answered(text) = outcome {
            assert_eq!(text, &greedy, "{kind}: a {} answer differs", if *stream { "streamed" } else { "whole" });
        }
    }
    // The boards' queues hold 51 requests and HAProxy queues the rest itself:
    // with 40 clients no board is ever refused busy, so none may be.
    assert_eq!(busy, 0, "{kind}: requests refused busy although a board had room");
    let per_board: Vec<u64> = boards.iter().map(served).collect();
    println!("{kind}: served per board {per_board:?}");
    assert!(per_board.iter().all(|&n| n >= 20), "{kind}: least connections left a board idle: {per_board:?}");

    // A board killed in the middle of a run.
    let load_thread = std::thread::spawn(move || load(address, 12, 12, 64));
    std::thread::sleep(Duration::from_millis(300));
    let state = health(&boards[1]);
    let in_flight_before = u64::from(state["running"] == true) + state["queued"].as_u64().unwrap();
    boards[1].child.kill().unwrap();
    boards[1].child.wait().unwrap();
    // HAProxy's view of the board, watched from the kill on: measured after
    // the load below, the time would include the load's own, which a busy
    // machine stretches past the bound.
    let down_watch = balancer
        .stats
        .map(|stats| std::thread::spawn(move || wait_status(stats, "board2", "DOWN", Duration::from_secs(10))));
    let outcomes = load_thread.join().unwrap();
    let answered = outcomes.iter().filter(|(_, o)| matches!(o, Outcome::Answered(_))).count();
    let errors: Vec<&Outcome> =
        outcomes.iter().filter(|(_, o)| !matches!(o, Outcome::Answered(_))).map(|(_, o)| o).collect();
    println!(
        "{kind}: 12 × 12 requests, board2 killed with {in_flight_before} running or queued: {answered} answered, {} ended \
         with an error: {errors:?}",
        errors.len()
    );
    // Only what the killed board had taken may fail; it fails with an error its client sees.
    assert!(errors.len() as u64 <= 1 + BOARD_QUEUE.parse::<u64>().unwrap(), "{kind}: {errors:?}");
    assert!(errors.iter().all(|o| matches!(o, Outcome::Error(_))), "{kind}: {errors:?}");
    // Requests after the kill go to the others.
    let after = load(address, 6, 3, 8);
    assert!(after.iter().all(|(_, o)| matches!(o, Outcome::Answered(_))), "{kind}: after the kill: {after:?}");
    if let (Some(stats), Some(down_watch)) = (balancer.stats, down_watch) {
        // Marked down within its checks (2 failures, 1 s apart), and up again after a restart.
        let down = down_watch.join().expect("board2 marked DOWN");
        println!("{kind}: board2 marked DOWN {down:?} after the kill");
        assert!(down < Duration::from_secs(2 * CHECK_INTERVAL + 3), "{kind}: DOWN only after {down:?}");
        boards[1] = board(ports[1]);
        let restarted = Instant::now();
        let up = wait_status(stats, "board2", "UP", Duration::from_secs(10));
        println!("{kind}: board2 marked UP {up:?} after its restart ({:?})", restarted.elapsed());
    } else {
        // nginx checks passively: the restarted board is used again once its fail_timeout has passed.
        boards[1] = board(ports[1]);
        std::thread::sleep(Duration::from_secs(CHECK_INTERVAL + 1));
    }
    let started = Instant::now();
    while served(&boards[1]) == 0 {
        assert!(
            matches!(request(address, false, 4), Outcome::Answered(_)),
            "{kind}: a request failed after the restart"
        );
        assert!(started.elapsed() < HANG, "{kind}: the restarted board gets no requests");
    }

    // Streaming through the balancer is not buffered: the first token reaches
    // the client while the board is still generating.
    let mut connection = stalled_connection(address);
    connection.set_read_timeout(Some(HANG)).unwrap();
    let body = json!({"prompt": "Once upon a time", "max_tokens": 1024, "temperature": 0, "stream": true}).to_string();
    write!(
        connection,
        "POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buffer = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("\"text\"") {
        let n = connection.read(&mut buffer).unwrap();
        assert!(n > 0, "{kind}: the stream closed before its first token: {:?}", String::from_utf8_lossy(&seen));
        assert!(!seen.starts_with(b"HTTP/1.1 4"), "{kind}: {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buffer[..n]);
    }
    let running_now = boards.iter().filter(|b| health(b)["running"] == true).count();
    println!("{kind}: first token through the balancer with {running_now} generation running");
    assert_eq!(running_now, 1, "{kind}: the first token arrived only after the generation ended (buffered)");
    // (Not shown here: that the balancer would not buffer a slow reader's
    // stream. Loopback's socket buffers hold a whole 1024-token answer, so a
    // board finishes unread with or without `proxy_buffering`; the generated
    // configuration's unit test checks the directive.)
    drop(connection);
    drop(balancer);
    for board in &mut boards {
        board.assert_alive();
    }
}

#[test]
fn haproxy_fleet_answers_every_request_survives_a_dead_board_and_streams() {
    fleet_end_to_end("haproxy");
}

#[test]
fn nginx_fleet_answers_every_request_survives_a_dead_board_and_streams() {
    fleet_end_to_end("nginx");
}

#[test]
fn fleet_dry_run_plans_every_deploy_and_the_configuration_and_does_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
    // An aarch64 ELF header is all the preflight reads of brambled.
    let brambled = dir.path().join("brambled");
    let mut header = vec![0u8; 64];
    header[..4].copy_from_slice(b"\x7fELF");
    header[4..7].copy_from_slice(&[2, 1, 1]);
    header[16] = 2;
    header[18..20].copy_from_slice(&183u16.to_le_bytes());
    std::fs::write(&brambled, header).unwrap();
    let out = dir.path().join("out");
    let args: Vec<std::ffi::OsString> = [
        "fleet",
        "--balancer",
        "haproxy",
        "--hosts",
        "pi@pi-a.local,pi@pi-b.local",
        "--board-port",
        "8090",
        "--ssh",
        "/nonexistent/ssh",
        "--scp",
        "/nonexistent/scp",
        "--dry-run",
    ]
    .iter()
    .map(Into::into)
    .chain([
        "--model".into(),
        model().into(),
        "--brambled".into(),
        brambled.clone().into(),
        "--auth-token-file".into(),
        token.clone().into(),
        "--output".into(),
        out.clone().into(),
    ])
    .collect();
    let output = bramble(&args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    for expected in [
        "== pi@pi-a.local",
        "/nonexistent/ssh -o BatchMode=yes pi@pi-a.local 'sudo sh -s'",
        "== pi@pi-b.local",
        "/nonexistent/ssh -o BatchMode=yes pi@pi-b.local 'curl -fsS --max-time 5 http://127.0.0.1:8090/health'",
        "would write",
        "|     server board1 pi-a.local:8090",
        "|     server board2 pi-b.local:8090",
        "dry run: nothing was written",
    ] {
        assert!(stdout.contains(expected), "{expected:?} not in\n{stdout}");
    }
    assert!(!out.exists(), "the dry run wrote the configuration");
    // Without the token, boards off loopback would refuse to start: refused here first.
    let without: Vec<_> =
        args.iter().filter(|a| *a != "--auth-token-file" && **a != *token.as_os_str()).cloned().collect();
    let output = bramble(&without);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--auth-token-file"));
}

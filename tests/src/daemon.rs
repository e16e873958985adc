//! The harness of the `brambled` end-to-end tests: a synthetic model, a
//! running daemon on ephemeral loopback ports, and small NDJSON and HTTP
//! clients that read exactly what the daemon sends.

use crate::*;
use bramble_runtime::vocab::TokenizerKind;
use bramble_tools::synth::SyntheticShape;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Longest any single wait may take before the test calls the daemon hung.
pub const HANG: Duration = Duration::from_secs(60);

/// The synthetic model image, converted once per process.
pub fn model() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let shape = SyntheticShape {
            dim: 256,
            n_layers: 4,
            ffn_dim: 640,
            context_length: 2048,
            tokenizer: TokenizerKind::ByteLevelBpe,
            ..SyntheticShape::default()
        };
        let path = scratch_dir("daemon").join(format!("synthetic-{}.bramble", std::process::id()));
        convert_synthetic(&synthetic(shape, 11), &path, "q8");
        path
    })
}

/// A running `brambled`, killed when dropped.
pub struct Daemon {
    /// The process.
    pub child: Child,
    log: Arc<Mutex<String>>,
    /// The HTTP listener, if one was bound.
    pub http: Option<SocketAddr>,
    /// The NDJSON listener, if one was bound.
    pub ndjson: Option<SocketAddr>,
    /// The TCP console listener, if one was bound.
    pub console: Option<SocketAddr>,
}

impl Daemon {
    /// Starts `brambled --model MODEL --uart none` on ephemeral loopback ports plus `args`; waits for "ready".
    pub fn start(args: &[&str]) -> Daemon {
        Self::start_with(args, &[])
    }

    /// As [`Daemon::start`], with environment variables for the daemon.
    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut command = Command::new(brambled_binary());
        command.arg("--model").arg(model());
        command.args(["--uart", "none", "--http", "127.0.0.1:0", "--ndjson", "127.0.0.1:0", "--threads", "1"]);
        command.args(args);
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child =
            command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn brambled");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let started = Instant::now();
        loop {
            let text = log.lock().unwrap().clone();
            if text.contains("brambled: info: ready") {
                let address = |name: &str| {
                    text.lines().find_map(|l| {
                        l.split_once(&format!("{name} listening on ")).map(|(_, a)| a.trim().parse().unwrap())
                    })
                };
                return Daemon {
                    http: address("http"),
                    ndjson: address("ndjson"),
                    console: address("console"),
                    child,
                    log,
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("brambled exited ({status}) before it was ready:\n{text}");
            }
            assert!(started.elapsed() < HANG, "brambled not ready after {HANG:?}:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The HTTP listener's address.
    pub fn http(&self) -> SocketAddr {
        self.http.expect("an HTTP listener")
    }
    /// The NDJSON listener's address.
    pub fn ndjson(&self) -> SocketAddr {
        self.ndjson.expect("an NDJSON listener")
    }
    /// What the daemon has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
    /// The daemon's process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// (VmRSS, VmHWM) of the daemon in KiB.
    pub fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} in /proc status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), nix::sys::signal::Signal::SIGTERM)
            .expect("kill");
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(started.elapsed() < HANG, "brambled did not exit after SIGTERM:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the daemon is still running, with its log for messages.
    pub fn assert_alive(&mut self) {
        assert!(self.child.try_wait().unwrap().is_none(), "brambled died:\n{}", self.log());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connection to `address` whose reads time out after [`HANG`].
pub fn connect(address: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(address).unwrap_or_else(|e| panic!("connect {address}: {e}"));
    stream.set_read_timeout(Some(HANG)).unwrap();
    stream
}

/// Reads NDJSON lines from `reader` until one has `"done": true`.
pub fn read_until_done(reader: &mut BufReader<TcpStream>) -> Vec<Value> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("an NDJSON line before the timeout");
        assert!(n > 0, "connection closed before a done line; got {lines:?}");
        let value: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        let done = value["done"] == json!(true);
        lines.push(value);
        if done {
            return lines;
        }
    }
}

/// Starting with `flag 0.0.0.0:0` and no token fails at once (exit 2), naming the flag and `auth_token`.
pub fn refused_off_loopback_without_a_token(flag: &str) {
    let output = Command::new(brambled_binary())
        .args(["--uart", "none", flag, "0.0.0.0:0", "--model"])
        .arg(model())
        .env_remove("BRAMBLED_AUTH_TOKEN")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(flag) && stderr.contains("auth_token"), "{stderr}");
}

/// A listener bound to 0.0.0.0, reached on loopback.
pub fn on_loopback(address: SocketAddr) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], address.port()))
}

/// One NDJSON request on a fresh connection; the lines up to the done line.
pub fn ndjson(address: SocketAddr, request: &Value) -> Vec<Value> {
    let mut stream = connect(address);
    writeln!(stream, "{request}").unwrap();
    read_until_done(&mut BufReader::new(stream))
}

/// The text of a streamed NDJSON answer.
pub fn streamed_text(lines: &[Value]) -> String {
    lines.iter().filter_map(|l| l["response"].as_str()).collect()
}

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The header lines, in order.
    pub headers: Vec<(String, String)>,
    /// The body (chunks joined).
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    /// A header's value, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one HTTP response (Content-Length or chunked) from `reader`.
pub fn read_response(reader: &mut BufReader<TcpStream>) -> Response {
    let mut status_line = String::new();
    reader.read_line(&mut status_line).expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line {status_line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("header line");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').expect("name: value");
        headers.push((name.to_string(), value.trim().to_string()));
    }
    let mut response = Response { status, headers, body: Vec::new() };
    if response.header("transfer-encoding") == Some("chunked") {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).expect("chunk size");
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or_else(|_| panic!("chunk size {size:?}"));
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).expect("chunk");
            if size == 0 {
                break;
            }
            response.body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = response.header("content-length") {
        let mut body = vec![0; length.parse().unwrap()];
        reader.read_exact(&mut body).expect("body");
        response.body = body;
    }
    response
}

/// One HTTP request on a fresh connection, as a client library sends it:
/// `Host` is the address connected to and a body is `application/json`,
/// unless `headers` give another `Host` or `Content-Type`.
pub fn http(address: SocketAddr, method: &str, path: &str, body: Option<&Value>, headers: &[&str]) -> Response {
    let mut stream = connect(address);
    let given = |name: &str| headers.iter().any(|h| h.to_ascii_lowercase().starts_with(name));
    let host = if given("host:") { String::new() } else { format!("Host: {address}\r\n") };
    let content_type =
        if body.is_some() && !given("content-type:") { "Content-Type: application/json\r\n" } else { "" };
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut request = format!("{method} {path} HTTP/1.1\r\n{host}{content_type}Content-Length: {}\r\n", body.len());
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request.push_str(&body);
    stream.write_all(request.as_bytes()).unwrap();
    read_response(&mut BufReader::new(stream))
}

/// The data of each SSE event.
pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_string).collect()
}

/// Starts a streamed NDJSON generation that lasts until the test lets it
/// end, and returns its connection once the first token arrived.
///
/// The synthetic model writes 1024 tokens in a fraction of a second, so a
/// generation that is merely long can end before the test's next step on a
/// fast machine, or while it waits on a slow one. This one is held by its
/// client instead: the connection is [`stalled_connection`]'s, so once the
/// test stops reading, the daemon's writes fill the few kilobytes the kernel
/// buffers and block. The generation then runs until the client reads on
/// ([`read_until_done`]) or hangs up (its generation is cancelled), or the
/// daemon's send timeout (30 s by default) passes.
pub fn long_generation(address: SocketAddr) -> BufReader<TcpStream> {
    let mut stream = stalled_connection(address);
    stream.set_read_timeout(Some(HANG)).unwrap();
    writeln!(stream, "{}", json!({"prompt": "Once upon a time", "max_tokens": 1024, "temperature": 0})).unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let first: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(first["done"], false, "the long generation is running: {first}");
    reader
}

/// `GET /health` as JSON.
pub fn health(daemon: &Daemon) -> Value {
    http(daemon.http(), "GET", "/health", None, &[]).json()
}

/// Polls `/health` until `condition` holds; panics after [`HANG`].
pub fn wait_for(what: &str, daemon: &Daemon, mut condition: impl FnMut(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let value = health(daemon);
        if condition(&value) {
            return value;
        }
        assert!(started.elapsed() < HANG, "{what}: still not after {HANG:?}: {value}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Closes `client` and waits until the kernel has delivered the hang-up to
/// the daemon's end of the connection (that socket leaves ESTABLISHED in
/// `/proc/net/tcp`), so a test can rely on the daemon being able to see it.
/// A fixed sleep is not enough on a loaded machine, where loopback packets
/// may wait for a starved softirq thread.
pub fn hang_up(client: TcpStream) {
    let client_end = client.local_addr().unwrap();
    let daemon_end = client.peer_addr().unwrap();
    drop(client);
    let started = Instant::now();
    loop {
        match daemon_socket_state(daemon_end, client_end) {
            Some(ESTABLISHED) => {}
            _ => return,
        }
        assert!(started.elapsed() < HANG, "the hang-up of {client_end} never reached the daemon's {daemon_end}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `/proc/net/tcp`'s code for an established connection.
const ESTABLISHED: u8 = 0x01;

/// The TCP state of the IPv4 socket `local` ↔ `remote` (`None` once it is gone).
fn daemon_socket_state(local: SocketAddr, remote: SocketAddr) -> Option<u8> {
    let hex = |address: SocketAddr| match address {
        // The kernel prints the address as the raw network-order word read as a host integer.
        SocketAddr::V4(v4) => format!("{:08X}:{:04X}", u32::from_ne_bytes(v4.ip().octets()), v4.port()),
        SocketAddr::V6(_) => panic!("hang_up: the test daemons listen on IPv4 loopback, not {address}"),
    };
    let (local, remote) = (hex(local), hex(remote));
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp (the daemon tests run on Linux)");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&local.as_str()) && fields.get(2) == Some(&remote.as_str()))
            .then(|| u8::from_str_radix(fields[3], 16).expect("a TCP state in /proc/net/tcp"))
    })
}

/// A config file in a temporary directory (kept alive by the returned guard).
pub fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("brambled.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// A connection to `address` that reads almost nothing: a receive buffer as
/// small as the kernel allows and a small segment size, as a phone app sent
/// to the background or a stalled Wi-Fi link looks to the daemon. The caller
/// sends its request and then never reads.
pub fn stalled_connection(address: SocketAddr) -> TcpStream {
    use nix::sys::socket::{connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let SocketAddr::V4(v4) = address else { panic!("{address}: the daemon listens on IPv4 loopback here") };
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::empty(), None).expect("socket");
    setsockopt(&fd, sockopt::RcvBuf, &1).expect("SO_RCVBUF");
    setsockopt(&fd, sockopt::TcpMaxSeg, &536).expect("TCP_MAXSEG");
    connect(fd.as_raw_fd(), &SockaddrIn::from(v4)).unwrap_or_else(|e| panic!("connect {address}: {e}"));
    TcpStream::from(fd)
}

/// Waits for `child` to exit, at most `limit`; `None` if it is still running
/// (then it is killed), so a hang fails a test instead of stalling it.
pub fn exit_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Runs `command` (no input, its output captured) to its exit; panics, with
/// what it wrote to standard error, when it is still running after `limit`.
pub fn run_bounded(command: &mut Command, limit: Duration) -> std::process::Output {
    let mut child = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let status = exit_within(&mut child, limit);
    let output = child.wait_with_output().unwrap();
    assert!(
        status.is_some(),
        "{command:?} still running after {limit:?}:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

//! The daemon's configuration: a TOML file (see `board/brambled.toml`), with
//! defaults for everything but the model, and flags that override the file.
//! Every validation error names the key at fault (`limits.queue_depth: ...`).

pub use bramble_runtime::bias::Feedback;
use bramble_runtime::kv::KvMode;
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Baud rates a UART can be set to (the standard termios rates).
pub const BAUD_RATES: [u32; 19] = [
    1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 500000, 576000, 921600, 1000000, 1152000,
    1500000, 2000000, 3000000, 4000000,
];

/// A configuration error: the key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The key (`uart.baud`), or the file for errors of the whole file.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    fn new(key: &str, message: impl Into<String>) -> Self {
        Self { key: key.to_string(), message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The whole configuration, as the daemon uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The model image.
    pub model: PathBuf,
    /// Worker threads of the matrix products (the inference thread included).
    pub threads: usize,
    /// KV-cache positions: the longest conversation, prompt and reply together.
    pub context: usize,
    /// How the KV cache is stored (`f32`, `q8`, `q4`; docs/kv.md).
    pub kv: KvMode,
    /// The most memory the model may take (mapped weights, KV cache, buffers):
    /// the daemon refuses to start above it.
    pub memory_limit: MemoryLimit,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub log_level: log::LevelFilter,
    /// The serial console.
    pub uart: UartConfig,
    /// The TCP protocols.
    pub tcp: TcpConfig,
    /// Per-request and per-connection limits.
    pub limits: Limits,
    /// Sampling defaults for requests that do not set them.
    pub sampling: SamplingDefaults,
    /// The bias constraint's feedback loop.
    pub bias: BiasConfig,
}

fn parse_feedback(key: &str, text: &str) -> Result<Feedback, ConfigError> {
    text.parse().map_err(|e: String| ConfigError::new(key, e))
}

/// The `memory_limit` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryLimit {
    /// `MemTotal` of `/proc/meminfo` less [`OS_HEADROOM_BYTES`] for the system.
    #[default]
    Auto,
    /// No check.
    Off,
    /// At most this many bytes.
    Bytes(u64),
}

/// What `memory_limit = "auto"` leaves to the operating system and its
/// services: the Pi 4 and Pi 5 profiles' headroom of `bramble flash`/`plan`.
pub const OS_HEADROOM_BYTES: u64 = 256 << 20;

impl MemoryLimit {
    /// `auto`, `off`, or a size: bytes, or a number with K, M or G (binary units, `3.5G`).
    fn parse(key: &str, text: &str) -> Result<Self, ConfigError> {
        let text = text.trim();
        match text {
            "auto" => return Ok(MemoryLimit::Auto),
            "off" | "none" => return Ok(MemoryLimit::Off),
            _ => {}
        }
        let upper = text.to_ascii_uppercase();
        let number = upper.trim_end_matches("IB").trim_end_matches('B');
        let (number, unit) = match number.chars().last() {
            Some('K') => (&number[..number.len() - 1], 1u64 << 10),
            Some('M') => (&number[..number.len() - 1], 1 << 20),
            Some('G') => (&number[..number.len() - 1], 1 << 30),
            _ => (number, 1),
        };
        match number.trim().parse::<f64>() {
            Ok(value) if value.is_finite() && value > 0.0 && value * unit as f64 <= (1u64 << 50) as f64 => {
                Ok(MemoryLimit::Bytes((value * unit as f64) as u64))
            }
            _ => Err(ConfigError::new(
                key,
                format!("{text:?} is not auto, off or a size (bytes, or a number with K, M or G: 3.5G, 512M)"),
            )),
        }
    }

    /// The limit in bytes, with how it was found, or `None` when off.
    /// `meminfo` is the text of `/proc/meminfo` (for `auto`).
    pub fn resolve(self, meminfo: Option<&str>) -> Result<Option<(u64, String)>, String> {
        match self {
            MemoryLimit::Off => Ok(None),
            MemoryLimit::Bytes(bytes) => Ok(Some((bytes, "memory_limit".to_string()))),
            MemoryLimit::Auto => {
                let meminfo = meminfo.ok_or("memory_limit = \"auto\" needs /proc/meminfo; set a size or off")?;
                let total = meminfo
                    .lines()
                    .find_map(|line| line.strip_prefix("MemTotal:"))
                    .and_then(|rest| rest.trim().strip_suffix("kB"))
                    .and_then(|kib| kib.trim().parse::<u64>().ok())
                    .ok_or("/proc/meminfo has no \"MemTotal: N kB\" line; set memory_limit to a size or off")?
                    * 1024;
                let limit = total.saturating_sub(OS_HEADROOM_BYTES);
                Ok(Some((
                    limit,
                    format!(
                        "memory_limit auto: MemTotal {:.2} GiB less {} MiB for the system",
                        gib(total),
                        OS_HEADROOM_BYTES >> 20
                    ),
                )))
            }
        }
    }
}

/// Bytes as GiB, for messages.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// The `[bias]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct BiasConfig {
    /// The feedback mode.
    pub feedback: Feedback,
    /// Where the adaptive loop's state persists (weights, recent signals), or `None`: not kept across restarts.
    pub state: Option<PathBuf>,
    /// A response whose signal is above this is regenerated (when it was
    /// not streamed); `None`: the image's, measured by `bias-calibrate`.
    pub hard_limit: Option<f32>,
    /// At most this many regenerations per request (0: never).
    pub regenerate: usize,
}

impl Default for BiasConfig {
    fn default() -> Self {
        Self { feedback: Feedback::Auto, state: None, hard_limit: None, regenerate: 0 }
    }
}

/// The serial console's device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UartConfig {
    /// The device (`/dev/serial0`), or `None` for no console.
    pub device: Option<PathBuf>,
    /// Bits per second (8 data bits, no parity, 1 stop bit).
    pub baud: u32,
}

/// The TCP listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConfig {
    /// The OpenAI-compatible HTTP server, or `None`.
    pub http: Option<SocketAddr>,
    /// The NDJSON protocol, or `None`.
    pub ndjson: Option<SocketAddr>,
    /// The serial console over TCP (for a machine without a UART), or `None`.
    pub console: Option<SocketAddr>,
    /// The Bearer token every TCP request must carry; required when a
    /// listener is bound to a non-loopback address.
    pub auth_token: Option<String>,
    /// Origins (`scheme://host[:port]`, lower case) of web pages outside this
    /// machine that may call the HTTP server (CORS); others are refused.
    pub cors_origins: Vec<String>,
}

/// Limits that keep one client from taking the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Requests that may wait while one generates; beyond them, "busy".
    pub queue_depth: usize,
    /// The largest `max_tokens` a request may ask for.
    pub max_tokens: usize,
    /// The longest NDJSON line, HTTP head or HTTP body, in bytes.
    pub max_request_bytes: usize,
    /// Time to receive a whole request once its first byte has arrived.
    pub request_timeout: Duration,
    /// Time a connection may sit idle between requests.
    pub idle_timeout: Duration,
    /// Open TCP connections at once; beyond them, "busy".
    pub max_connections: usize,
    /// On SIGTERM, time running and queued requests get to finish before they are cancelled.
    pub drain_timeout: Duration,
    /// Time one write to a client may take (a streamed token, a whole
    /// response); a client that reads nothing for this long is cancelled, so
    /// it cannot hold the inference thread.
    pub send_timeout: Duration,
}

/// Sampling settings for requests that do not give them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingDefaults {
    /// 0 is greedy.
    pub temperature: f32,
    /// Nucleus sampling (1: off).
    pub top_p: f32,
    /// Keep the k most likely (0: all).
    pub top_k: usize,
    /// Drop tokens less likely than this × the most likely (0: off).
    pub min_p: f32,
    /// Penalty on recent tokens (1: off).
    pub repeat_penalty: f32,
    /// Seed of the sampler.
    pub seed: u64,
    /// `max_tokens` of a request that does not give it.
    pub max_tokens: usize,
}

impl Default for SamplingDefaults {
    fn default() -> Self {
        Self { temperature: 0.7, top_p: 0.95, top_k: 40, min_p: 0.05, repeat_penalty: 1.0, seed: 0, max_tokens: 256 }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            queue_depth: 4,
            max_tokens: 1024,
            max_request_bytes: 64 * 1024,
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_connections: 64,
            drain_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(30),
        }
    }
}

/// The default HTTP address: loopback only.
pub const DEFAULT_HTTP: &str = "127.0.0.1:8080";
/// The default NDJSON address: loopback only.
pub const DEFAULT_NDJSON: &str = "127.0.0.1:8081";
/// The default UART: the Pi's primary serial port.
pub const DEFAULT_UART: &str = "/dev/serial0";

// The file as written: every field optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    model: Option<PathBuf>,
    threads: Option<i64>,
    context: Option<i64>,
    kv: Option<String>,
    memory_limit: Option<String>,
    log_level: Option<String>,
    #[serde(default)]
    uart: FileUart,
    #[serde(default)]
    tcp: FileTcp,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    sampling: FileSampling,
    #[serde(default)]
    bias: FileBias,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBias {
    feedback: Option<String>,
    state: Option<String>,
    hard_limit: Option<f64>,
    regenerate: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUart {
    device: Option<String>,
    baud: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTcp {
    http: Option<String>,
    ndjson: Option<String>,
    console: Option<String>,
    auth_token: Option<String>,
    cors_origins: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    queue_depth: Option<i64>,
    max_tokens: Option<i64>,
    max_request_bytes: Option<i64>,
    request_timeout_secs: Option<f64>,
    idle_timeout_secs: Option<f64>,
    max_connections: Option<i64>,
    drain_timeout_secs: Option<f64>,
    send_timeout_secs: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSampling {
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    min_p: Option<f64>,
    repeat_penalty: Option<f64>,
    seed: Option<i64>,
    max_tokens: Option<i64>,
}

/// The flags of `brambled`, which override the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--config FILE`.
    pub config: Option<PathBuf>,
    /// `--model IMG`.
    pub model: Option<PathBuf>,
    /// `--http ADDR:PORT|none`.
    pub http: Option<String>,
    /// `--ndjson ADDR:PORT|none`.
    pub ndjson: Option<String>,
    /// `--console-tcp ADDR:PORT|none`.
    pub console: Option<String>,
    /// `--uart DEVICE|none`.
    pub uart: Option<String>,
    /// `--baud N`.
    pub baud: Option<String>,
    /// `--queue N`.
    pub queue: Option<String>,
    /// `--threads N`.
    pub threads: Option<String>,
    /// `--context N`.
    pub context: Option<String>,
    /// `--kv f32|f16|q8|q4`.
    pub kv: Option<String>,
    /// `--memory-limit auto|off|SIZE`.
    pub memory_limit: Option<String>,
    /// `--log-level LEVEL`.
    pub log_level: Option<String>,
    /// `--feedback auto|off|static|adaptive`.
    pub feedback: Option<String>,
    /// `--bias-state FILE|none`.
    pub bias_state: Option<String>,
}

/// The usage text of `brambled`.
pub const USAGE: &str =
    "usage: brambled [--config FILE] [--model IMG] [--http ADDR:PORT|none] [--ndjson ADDR:PORT|none]
                [--uart DEVICE|none] [--baud N] [--queue N] [--threads N] [--context N]
                [--kv f32|f16|q8|q4] [--memory-limit auto|off|SIZE]
                [--console-tcp ADDR:PORT|none] [--log-level LEVEL]
                [--feedback auto|off|static|adaptive] [--bias-state FILE|none]

Flags override the config file; with no file, flags alone suffice (--model is then required).
The auth token can also be given as BRAMBLED_AUTH_TOKEN in the environment.";

impl Overrides {
    /// Parses the flags (without the program name).
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Self, ConfigError> {
        let mut overrides = Overrides::default();
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let (name, inline) = match flag.split_once('=') {
                Some((name, value)) if name.starts_with("--") => (name.to_string(), Some(value.to_string())),
                _ => (flag.clone(), None),
            };
            let mut value =
                || inline.clone().or_else(|| args.next()).ok_or_else(|| ConfigError::new(&name, "needs a value"));
            match name.as_str() {
                "--config" => overrides.config = Some(PathBuf::from(value()?)),
                "--model" => overrides.model = Some(PathBuf::from(value()?)),
                "--http" => overrides.http = Some(value()?),
                "--ndjson" => overrides.ndjson = Some(value()?),
                "--console-tcp" => overrides.console = Some(value()?),
                "--uart" => overrides.uart = Some(value()?),
                "--baud" => overrides.baud = Some(value()?),
                "--queue" => overrides.queue = Some(value()?),
                "--threads" => overrides.threads = Some(value()?),
                "--context" => overrides.context = Some(value()?),
                "--kv" => overrides.kv = Some(value()?),
                "--memory-limit" => overrides.memory_limit = Some(value()?),
                "--log-level" => overrides.log_level = Some(value()?),
                "--feedback" => overrides.feedback = Some(value()?),
                "--bias-state" => overrides.bias_state = Some(value()?),
                _ => return Err(ConfigError::new(&flag, "unknown flag (brambled --help lists them)")),
            }
        }
        Ok(overrides)
    }
}

fn integer(key: &str, value: i64, min: i64, max: i64) -> Result<usize, ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::new(key, format!("{value} is out of range ({min} to {max})")));
    }
    Ok(value as usize)
}

fn flag_integer(key: &str, text: &str, min: i64, max: i64) -> Result<usize, ConfigError> {
    let value = text.trim().parse::<i64>().map_err(|_| ConfigError::new(key, format!("{text:?} is not an integer")))?;
    integer(key, value, min, max)
}

fn real(key: &str, value: f64, min: f64, max: f64) -> Result<f64, ConfigError> {
    if !value.is_finite() || value < min || value > max {
        return Err(ConfigError::new(key, format!("{value} is out of range ({min} to {max})")));
    }
    Ok(value)
}

fn seconds(key: &str, value: f64) -> Result<Duration, ConfigError> {
    Ok(Duration::from_secs_f64(real(key, value, 0.001, 86_400.0)?))
}

/// `ADDR:PORT`, or `None` for `none`/`off`/empty.
fn address(key: &str, text: &str) -> Result<Option<SocketAddr>, ConfigError> {
    match text.trim() {
        "" | "none" | "off" => Ok(None),
        other => other.parse::<SocketAddr>().map(Some).map_err(|_| {
            ConfigError::new(key, format!("{other:?} is not ADDR:PORT (for example 127.0.0.1:8080), or none"))
        }),
    }
}

/// An entry of `tcp.cors_origins`: an origin as a browser sends it, lower case.
fn cors_origin(text: &str) -> Result<String, ConfigError> {
    const KEY: &str = "tcp.cors_origins";
    if text.trim() == "*" {
        return Err(ConfigError::new(KEY, "\"*\" is not allowed: name each origin that may call brambled"));
    }
    if crate::http::split_origin(text).is_none() {
        return Err(ConfigError::new(
            KEY,
            format!(
                "{text:?} is not an origin: scheme://host[:port], no path or trailing slash (\"https://app.example\")"
            ),
        ));
    }
    Ok(text.to_ascii_lowercase())
}

fn level(key: &str, text: &str) -> Result<log::LevelFilter, ConfigError> {
    text.parse::<log::LevelFilter>()
        .map_err(|_| ConfigError::new(key, format!("{text:?} is not one of off, error, warn, info, debug, trace")))
}

/// The largest configuration file read: a real one is a few KiB, and a
/// device such as `/dev/zero` given by mistake must not be read forever.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a configuration file: a regular file (not a FIFO, which would block
/// the start, nor a device) of at most [`MAX_CONFIG_BYTES`].
fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    let name = path.display().to_string();
    let fail = |message: String| ConfigError::new(&name, message);
    let metadata = std::fs::metadata(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    if !metadata.is_file() {
        return Err(fail(format!("cannot read: not a regular file ({})", file_kind(&metadata))));
    }
    let file = std::fs::File::open(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes).map_err(|e| fail(format!("cannot read: {e}")))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(fail(format!("is over {MAX_CONFIG_BYTES} bytes; a configuration is a few KiB")));
    }
    String::from_utf8(bytes).map_err(|e| fail(format!("is not UTF-8 text (at byte {})", e.utf8_error().valid_up_to())))
}

/// What kind of file `metadata` describes, for messages.
pub fn file_kind(metadata: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let kind = metadata.file_type();
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

impl Config {
    /// Reads the file named by `--config` (if any) and applies the flags over it.
    pub fn load(overrides: &Overrides) -> Result<Config, ConfigError> {
        let file = match &overrides.config {
            Some(path) => Some((path.as_path(), read_config_file(path)?)),
            None => None,
        };
        Self::from_parts(file.as_ref().map(|(p, t)| (*p, t.as_str())), overrides)
    }

    /// The configuration from a file's text (with its path, for messages) and flags.
    pub fn from_parts(file: Option<(&Path, &str)>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let parsed: FileConfig = match file {
            Some((path, text)) => toml::from_str(text).map_err(|e| {
                // toml's message names the key and the line; keep it on one line.
                let message = e.to_string().replace('\n', " ").split_whitespace().collect::<Vec<_>>().join(" ");
                ConfigError::new(&path.display().to_string(), message)
            })?,
            None => FileConfig::default(),
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

        let model = overrides.model.clone().or(parsed.model).ok_or_else(|| {
            ConfigError::new("model", "no model image: give --model IMG or `model = \"...\"` in the config file")
        })?;
        let max_threads = bramble_runtime::kernels::pool::MAX_THREADS as i64;
        let threads = match (&overrides.threads, parsed.threads) {
            (Some(text), _) => flag_integer("--threads", text, 1, max_threads)?,
            (None, Some(value)) => integer("threads", value, 1, max_threads)?,
            (None, None) => cores.min(max_threads as usize),
        };
        let context = match (&overrides.context, parsed.context) {
            (Some(text), _) => flag_integer("--context", text, 8, 1 << 20)?,
            (None, Some(value)) => integer("context", value, 8, 1 << 20)?,
            (None, None) => 2048,
        };
        let kv_mode = |key: &str, text: &str| {
            text.parse::<KvMode>()
                .map_err(|_| ConfigError::new(key, format!("{text:?} is not one of f32, f16, q8, q4")))
        };
        let kv = match (&overrides.kv, &parsed.kv) {
            (Some(text), _) => kv_mode("--kv", text)?,
            (None, Some(text)) => kv_mode("kv", text)?,
            (None, None) => KvMode::F32,
        };
        let memory_limit = match (&overrides.memory_limit, &parsed.memory_limit) {
            (Some(text), _) => MemoryLimit::parse("--memory-limit", text)?,
            (None, Some(text)) => MemoryLimit::parse("memory_limit", text)?,
            (None, None) => MemoryLimit::Auto,
        };
        let log_level = match (&overrides.log_level, &parsed.log_level) {
            (Some(text), _) => level("--log-level", text)?,
            (None, Some(text)) => level("log_level", text)?,
            (None, None) => log::LevelFilter::Info,
        };

        let device = match (&overrides.uart, &parsed.uart.device) {
            (Some(text), _) | (None, Some(text)) => match text.trim() {
                "" | "none" | "off" => None,
                path => Some(PathBuf::from(path)),
            },
            (None, None) => Some(PathBuf::from(DEFAULT_UART)),
        };
        let baud = match (&overrides.baud, parsed.uart.baud) {
            (Some(text), _) => flag_integer("--baud", text, 1, i64::from(u32::MAX))? as u32,
            (None, Some(value)) => integer("uart.baud", value, 1, i64::from(u32::MAX))? as u32,
            (None, None) => 115_200,
        };
        if !BAUD_RATES.contains(&baud) {
            let key = if overrides.baud.is_some() { "--baud" } else { "uart.baud" };
            return Err(ConfigError::new(key, format!("{baud} is not a standard rate (one of {BAUD_RATES:?})")));
        }

        let pick =
            |flag: &Option<String>, file: &Option<String>, flag_key: &str, key: &str, default: Option<&str>| match (
                flag, file,
            ) {
                (Some(text), _) => address(flag_key, text),
                (None, Some(text)) => address(key, text),
                (None, None) => default.map_or(Ok(None), |d| address(key, d)),
            };
        let http = pick(&overrides.http, &parsed.tcp.http, "--http", "tcp.http", Some(DEFAULT_HTTP))?;
        let ndjson = pick(&overrides.ndjson, &parsed.tcp.ndjson, "--ndjson", "tcp.ndjson", Some(DEFAULT_NDJSON))?;
        let console = pick(&overrides.console, &parsed.tcp.console, "--console-tcp", "tcp.console", None)?;
        let auth_token = std::env::var("BRAMBLED_AUTH_TOKEN").ok().or(parsed.tcp.auth_token).filter(|t| !t.is_empty());
        if let Some(token) = &auth_token {
            if token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ConfigError::new(
                    "tcp.auth_token",
                    "must be at least 16 characters, without spaces or control characters",
                ));
            }
        }
        for (key, addr) in [("tcp.http", http), ("tcp.ndjson", ndjson), ("tcp.console", console)] {
            if let Some(addr) = addr {
                if !addr.ip().is_loopback() && auth_token.is_none() {
                    return Err(ConfigError::new(
                        key,
                        format!(
                            "{addr} is not a loopback address; binding it requires tcp.auth_token \
                             (or BRAMBLED_AUTH_TOKEN) so that only clients with the token are served"
                        ),
                    ));
                }
            }
        }

        let mut cors_origins = Vec::new();
        for entry in parsed.tcp.cors_origins.iter().flatten() {
            cors_origins.push(cors_origin(entry)?);
        }

        let defaults = Limits::default();
        let l = &parsed.limits;
        let queue_depth = match (&overrides.queue, l.queue_depth) {
            (Some(text), _) => flag_integer("--queue", text, 0, 1024)?,
            (None, Some(value)) => integer("limits.queue_depth", value, 0, 1024)?,
            (None, None) => defaults.queue_depth,
        };
        let limits = Limits {
            queue_depth,
            max_tokens: l
                .max_tokens
                .map_or(Ok(defaults.max_tokens), |v| integer("limits.max_tokens", v, 1, 1 << 20))?,
            max_request_bytes: l
                .max_request_bytes
                .map_or(Ok(defaults.max_request_bytes), |v| integer("limits.max_request_bytes", v, 1024, 1 << 24))?,
            request_timeout: l
                .request_timeout_secs
                .map_or(Ok(defaults.request_timeout), |v| seconds("limits.request_timeout_secs", v))?,
            idle_timeout: l
                .idle_timeout_secs
                .map_or(Ok(defaults.idle_timeout), |v| seconds("limits.idle_timeout_secs", v))?,
            max_connections: l
                .max_connections
                .map_or(Ok(defaults.max_connections), |v| integer("limits.max_connections", v, 1, 4096))?,
            drain_timeout: l
                .drain_timeout_secs
                .map_or(Ok(defaults.drain_timeout), |v| seconds("limits.drain_timeout_secs", v))?,
            send_timeout: l
                .send_timeout_secs
                .map_or(Ok(defaults.send_timeout), |v| seconds("limits.send_timeout_secs", v))?,
        };

        let s = &parsed.sampling;
        let d = SamplingDefaults::default();
        let sampling = SamplingDefaults {
            temperature: s
                .temperature
                .map_or(Ok(d.temperature as f64), |v| real("sampling.temperature", v, 0.0, 100.0))?
                as f32,
            top_p: s.top_p.map_or(Ok(d.top_p as f64), |v| real("sampling.top_p", v, 0.0, 1.0))? as f32,
            top_k: s.top_k.map_or(Ok(d.top_k), |v| integer("sampling.top_k", v, 0, 1 << 20))?,
            min_p: s.min_p.map_or(Ok(d.min_p as f64), |v| real("sampling.min_p", v, 0.0, 1.0))? as f32,
            repeat_penalty: s
                .repeat_penalty
                .map_or(Ok(d.repeat_penalty as f64), |v| real("sampling.repeat_penalty", v, 0.01, 100.0))?
                as f32,
            seed: s.seed.map_or(Ok(d.seed as usize), |v| integer("sampling.seed", v, 0, i64::MAX))? as u64,
            max_tokens: s.max_tokens.map_or(Ok(d.max_tokens.min(limits.max_tokens)), |v| {
                integer("sampling.max_tokens", v, 1, limits.max_tokens as i64)
            })?,
        };

        let feedback = match (&overrides.feedback, &parsed.bias.feedback) {
            (Some(text), _) => parse_feedback("--feedback", text)?,
            (None, Some(text)) => parse_feedback("bias.feedback", text)?,
            (None, None) => Feedback::Auto,
        };
        let (state_key, state) = match (&overrides.bias_state, &parsed.bias.state) {
            (Some(text), _) => ("--bias-state", Some(text)),
            (None, Some(text)) => ("bias.state", Some(text)),
            (None, None) => ("bias.state", None),
        };
        let state = match state.map(|t| t.trim()) {
            None | Some("none" | "off") => None,
            Some("") => return Err(ConfigError::new(state_key, "is empty; give a file, or none")),
            Some(path) => {
                let path = PathBuf::from(path);
                if path.file_name().is_none() || path.is_dir() {
                    return Err(ConfigError::new(state_key, format!("{} is not a file name", path.display())));
                }
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    if !dir.is_dir() {
                        return Err(ConfigError::new(
                            state_key,
                            format!("{}: the directory {} does not exist", path.display(), dir.display()),
                        ));
                    }
                }
                Some(path)
            }
        };
        if state.is_some() && matches!(feedback, Feedback::Off | Feedback::Static) {
            return Err(ConfigError::new(
                state_key,
                format!(
                    "goes with feedback auto or adaptive, not {}: only the adaptive loop has state",
                    feedback.name()
                ),
            ));
        }
        let hard_limit =
            parsed.bias.hard_limit.map(|v| real("bias.hard_limit", v, -1e6, 1e6)).transpose()?.map(|v| v as f32);
        let regenerate = parsed.bias.regenerate.map_or(Ok(0), |v| integer("bias.regenerate", v, 0, 8))?;
        let bias = BiasConfig { feedback, state, hard_limit, regenerate };

        Ok(Config {
            model,
            threads,
            context,
            kv,
            memory_limit,
            log_level,
            uart: UartConfig { device, baud },
            tcp: TcpConfig { http, ndjson, console, auth_token, cors_origins },
            limits,
            sampling,
            bias,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Overrides {
        Overrides::parse(args.iter().map(|s| s.to_string())).unwrap()
    }

    fn from_file(text: &str, args: &[&str]) -> Result<Config, ConfigError> {
        Config::from_parts(Some((Path::new("brambled.toml"), text)), &flags(args))
    }

    #[test]
    fn flags_alone_suffice_and_defaults_are_loopback_and_serial0() {
        let config = Config::from_parts(None, &flags(&["--model", "m.bramble"])).unwrap();
        assert_eq!(config.model, PathBuf::from("m.bramble"));
        assert_eq!(config.uart, UartConfig { device: Some(PathBuf::from("/dev/serial0")), baud: 115_200 });
        assert!(config.tcp.http.unwrap().ip().is_loopback());
        assert!(config.tcp.ndjson.unwrap().ip().is_loopback());
        assert_eq!(config.tcp.console, None);
        assert_eq!(config.limits.max_request_bytes, 64 * 1024);
    }

    #[test]
    fn flags_override_the_file() {
        let text = "model = \"a.bramble\"\n[uart]\ndevice = \"/dev/ttyAMA0\"\n[tcp]\nhttp = \"127.0.0.1:1\"\n[limits]\nqueue_depth = 9\n";
        let config =
            from_file(text, &["--model", "b.bramble", "--uart", "none", "--http", "127.0.0.1:2", "--queue", "3"])
                .unwrap();
        assert_eq!(config.model, PathBuf::from("b.bramble"));
        assert_eq!(config.uart.device, None);
        assert_eq!(config.tcp.http, Some("127.0.0.1:2".parse().unwrap()));
        assert_eq!(config.limits.queue_depth, 3);
        let config = from_file(text, &[]).unwrap();
        assert_eq!(config.uart.device, Some(PathBuf::from("/dev/ttyAMA0")));
        assert_eq!(config.limits.queue_depth, 9);
    }

    #[test]
    fn errors_name_the_key() {
        let cases: [(&str, &[&str], &str); 13] = [
            ("kv = \"q2\"\n", &[], "kv"),
            ("", &["--kv", "f16x"], "--kv"),
            ("memory_limit = \"lots\"\n", &[], "memory_limit"),
            ("", &["--memory-limit", "-3G"], "--memory-limit"),
            ("[uart]\nbaud = 12345\n", &[], "uart.baud"),
            ("[limits]\nqueue_depth = -1\n", &[], "limits.queue_depth"),
            ("[tcp]\nhttp = \"localhost\"\n", &[], "tcp.http"),
            ("[tcp]\nndjson = \"0.0.0.0:9000\"\n", &[], "tcp.ndjson"),
            ("[sampling]\ntop_p = 2.0\n", &[], "sampling.top_p"),
            ("context = 0\n", &[], "context"),
            ("log_level = \"loud\"\n", &[], "log_level"),
            ("", &["--queue", "many"], "--queue"),
            ("[tcp]\nauth_token = \"short\"\n", &[], "tcp.auth_token"),
        ];
        for (text, args, key) in cases {
            let mut all = vec!["--model", "m"];
            all.extend_from_slice(args);
            let error = from_file(text, &all).unwrap_err();
            assert_eq!(error.key, key, "{text:?} {args:?}: {error}");
        }
    }

    #[test]
    fn kv_mode_and_memory_limit_from_the_file_and_flags() {
        let config = from_file("model = \"m\"\n", &[]).unwrap();
        assert_eq!((config.kv, config.memory_limit), (KvMode::F32, MemoryLimit::Auto));
        let config = from_file("model = \"m\"\nkv = \"q8\"\nmemory_limit = \"3.5G\"\n", &[]).unwrap();
        assert_eq!((config.kv, config.memory_limit), (KvMode::Q8, MemoryLimit::Bytes(7 << 29)));
        let config = from_file("model = \"m\"\nkv = \"q8\"\n", &["--kv", "q4", "--memory-limit=off"]).unwrap();
        assert_eq!((config.kv, config.memory_limit), (KvMode::Q4, MemoryLimit::Off));
        let config = from_file("model = \"m\"\nkv = \"q8\"\n", &["--kv", "f16"]).unwrap();
        assert_eq!(config.kv, KvMode::F16);
        let error = from_file("model = \"m\"\nkv = \"f8\"\n", &[]).unwrap_err().to_string();
        assert!(error.contains("\"f8\" is not one of f32, f16, q8, q4"), "{error}");
        for (text, bytes) in
            [("512M", 512u64 << 20), ("512MiB", 512 << 20), ("4g", 4 << 30), ("1000", 1000), ("64K", 65536)]
        {
            assert_eq!(MemoryLimit::parse("k", text).unwrap(), MemoryLimit::Bytes(bytes), "{text}");
        }
        for bad in ["", "G", "0", "1e30", "NaN", "3T"] {
            assert!(MemoryLimit::parse("k", bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn memory_limit_auto_is_memtotal_less_the_headroom() {
        let meminfo = "MemTotal:        3884428 kB\nMemFree:          123 kB\n";
        let (limit, why) = MemoryLimit::Auto.resolve(Some(meminfo)).unwrap().unwrap();
        assert_eq!(limit, 3_884_428 * 1024 - OS_HEADROOM_BYTES);
        assert!(why.contains("MemTotal 3.70 GiB"), "{why}");
        assert_eq!(MemoryLimit::Off.resolve(None).unwrap(), None);
        assert_eq!(MemoryLimit::Bytes(5).resolve(None).unwrap().unwrap().0, 5);
        assert!(MemoryLimit::Auto.resolve(None).unwrap_err().contains("/proc/meminfo"));
        assert!(MemoryLimit::Auto.resolve(Some("MemFree: 1 kB\n")).unwrap_err().contains("MemTotal"));
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_with_the_key_named() {
        let error = from_file("model = \"m\"\n[uart]\nspeed = 9600\n", &[]).unwrap_err();
        assert!(error.message.contains("speed"), "{error}");
        let error = from_file("model = \"m\"\nthreads = \"four\"\n", &[]).unwrap_err();
        assert!(error.message.contains("threads"), "{error}");
        let error = Config::from_parts(None, &Overrides::default()).unwrap_err();
        assert_eq!(error.key, "model");
    }

    #[test]
    fn non_loopback_with_a_token_is_allowed() {
        let text = "model = \"m\"\n[tcp]\nhttp = \"0.0.0.0:8080\"\nauth_token = \"0123456789abcdef\"\n";
        let config = from_file(text, &[]).unwrap();
        assert_eq!(config.tcp.auth_token.as_deref(), Some("0123456789abcdef"));
    }

    #[test]
    fn cors_origins_are_origins_named_one_by_one() {
        let text = "model = \"m\"\n[tcp]\ncors_origins = [\"https://App.Example\", \"http://192.168.1.20:3000\"]\n";
        let config = from_file(text, &[]).unwrap();
        assert_eq!(config.tcp.cors_origins, ["https://app.example", "http://192.168.1.20:3000"]);
        assert!(from_file("model = \"m\"\n", &[]).unwrap().tcp.cors_origins.is_empty());
        for (entry, says) in [
            ("*", "name each origin"),
            ("https://app.example/", "not an origin"),
            ("app.example", "not an origin"),
            ("https://app.example:65536", "not an origin"),
            ("https://user@app.example", "not an origin"),
            ("null", "not an origin"),
        ] {
            let text = format!("model = \"m\"\n[tcp]\ncors_origins = [\"{entry}\"]\n");
            let error = from_file(&text, &[]).unwrap_err().to_string();
            assert!(error.contains("tcp.cors_origins") && error.contains(says), "{entry}: {error}");
        }
        let error = from_file("model = \"m\"\n[tcp]\ncors_origins = \"https://a\"\n", &[]).unwrap_err();
        assert!(error.to_string().contains("cors_origins"), "{error}");
    }

    #[test]
    fn bias_keys_from_the_file_and_flags_with_errors_naming_the_key() {
        let config = from_file("model = \"m\"\n", &[]).unwrap();
        assert_eq!(config.bias, BiasConfig::default());
        assert_eq!((config.bias.hard_limit, config.bias.regenerate), (None, 0), "the image's limit, no regeneration");
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("bias.state");
        let text =
            format!("model = \"m\"\n[bias]\nfeedback = \"adaptive\"\nstate = {:?}\n", state.display().to_string());
        let config = from_file(&text, &[]).unwrap();
        assert_eq!(
            config.bias,
            BiasConfig { feedback: Feedback::Adaptive, state: Some(state.clone()), ..BiasConfig::default() }
        );
        let config = from_file(&text, &["--feedback", "auto", "--bias-state", "none"]).unwrap();
        assert_eq!(config.bias, BiasConfig::default());
        let config = from_file("model = \"m\"\n[bias]\nhard_limit = 1.5\nregenerate = 3\n", &[]).unwrap();
        assert_eq!((config.bias.hard_limit, config.bias.regenerate), (Some(1.5), 3));

        let cases: [(&str, &[&str], &str); 8] = [
            ("[bias]\nregenerate = 9\n", &[], "bias.regenerate"),
            ("[bias]\nhard_limit = nan\n", &[], "bias.hard_limit"),
            ("[bias]\nfeedback = \"sometimes\"\n", &[], "bias.feedback"),
            ("", &["--feedback", "always"], "--feedback"),
            ("[bias]\nstate = \"/no/such/dir/bias.state\"\n", &[], "bias.state"),
            ("", &["--bias-state", "/no/such/dir/bias.state"], "--bias-state"),
            ("[bias]\nfeedback = \"static\"\nstate = \"bias.state\"\n", &[], "bias.state"),
            ("[bias]\nstate = \"\"\n", &[], "bias.state"),
        ];
        for (text, args, key) in cases {
            let mut all = vec!["--model", "m"];
            all.extend_from_slice(args);
            let error = from_file(text, &all).unwrap_err();
            assert_eq!(error.key, key, "{text:?} {args:?}: {error}");
        }
        let error = from_file("model = \"m\"\n[bias]\nweights = 1\n", &[]).unwrap_err();
        assert!(error.message.contains("weights"), "{error}");
    }

    #[test]
    fn flag_errors() {
        assert_eq!(Overrides::parse(["--model".to_string()]).unwrap_err().key, "--model");
        assert_eq!(Overrides::parse(["--bogus".to_string()]).unwrap_err().key, "--bogus");
        assert_eq!(flags(&["--http=none"]).http.as_deref(), Some("none"));
    }
}

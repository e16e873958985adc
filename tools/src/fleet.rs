//! `bramble fleet`: several boards behind a load balancer operators already
//! run (HAProxy or nginx), configured for what serving a small LLM needs.
//!
//! Two ways in:
//! - `--hosts USER@PI,… --model IMG`: [`crate::deploy`] to every board (each
//!   daemon listening on `0.0.0.0:--board-port` with the `--auth-token-file`
//!   token, which a non-loopback listener requires), then the configuration
//!   for those boards;
//! - `--backends HOST:PORT,…`: boards already serving; only the configuration.
//!
//! Either writes `DIR/haproxy.cfg` (run `haproxy -f DIR/haproxy.cfg`) or
//! `DIR/nginx.conf` (run `nginx -c DIR/nginx.conf`), both runnable by an
//! unprivileged user: no `user`, `chroot` or privileged port of their own,
//! logs to the terminal, nginx's pid and temporary files under DIR.
//!
//! What the configuration does, and why:
//! - **least connections**: a generation holds a board for seconds, so the
//!   board with the fewest open requests is the free one;
//! - **one generation a board, the queue in the balancer** (HAProxy:
//!   `maxconn 1` a server, `timeout queue`): a board runs one generation at a
//!   time, and a request waiting in the balancer goes to whichever board frees
//!   first instead of queueing behind one long answer. nginx's open-source
//!   build has no such queue: the boards' own queues (`limits.queue_depth`)
//!   hold the waiting requests;
//! - **health**: HAProxy checks `GET /health` actively (`option httpchk`,
//!   every `--check-interval`, down after 2 failures, up after 2 passes) and
//!   wants `"status":"ok"`, so a draining board (SIGTERM: `"stopping"`) leaves
//!   the rotation before it closes; nginx checks passively (`max_fails`,
//!   `fail_timeout`);
//! - **a busy board's 503 goes to the next board** (HAProxy `retry-on 503
//!   conn-failure`, nginx `proxy_next_upstream error timeout http_503
//!   non_idempotent`): the daemon answers 503 before it reads any of the
//!   request's work, so nothing started; a board that dies mid-answer is not
//!   retried, and its client gets the error (502, or a cut stream);
//! - **streaming unbuffered**: SSE (`/v1/… "stream": true`) and chunked
//!   responses pass through as they come (nginx `proxy_buffering off`, HTTP/1.1
//!   to the boards; HAProxy forwards as it receives);
//! - **timeouts that fit a slow generation** (`--timeout`, 600 s by default:
//!   the longest silence between two bytes of an answer, and the longest wait
//!   in the queue);
//! - **the auth token carried through**: the client's `Authorization` header
//!   goes to the board unchanged (both balancers forward it); `/health` needs
//!   none.

use crate::deploy::{self, DeployArgs, RemoteArgs};
use crate::flash::BoardArgs;
use anyhow::{anyhow, bail, Context, Result};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The balancer a configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Balancer {
    /// HAProxy 2.x: `DIR/haproxy.cfg`.
    Haproxy,
    /// nginx: `DIR/nginx.conf`.
    Nginx,
}

impl Balancer {
    /// The file the configuration is written to, inside `--output`.
    pub fn file_name(self) -> &'static str {
        match self {
            Balancer::Haproxy => "haproxy.cfg",
            Balancer::Nginx => "nginx.conf",
        }
    }
}

/// `bramble fleet`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// The load balancer to configure.
    #[arg(long, value_enum)]
    pub balancer: Balancer,
    /// Where the configuration goes (created if missing).
    #[arg(long)]
    pub output: PathBuf,
    /// Boards already serving, HOST:PORT of each one's HTTP listener (only the configuration is written).
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["hosts", "model"], required_unless_present = "hosts")]
    pub backends: Vec<String>,
    /// Boards to deploy to first, as ssh takes them (user@host).
    #[arg(long, value_delimiter = ',', requires = "model")]
    pub hosts: Vec<String>,
    /// The model image to deploy (with --hosts).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where the balancer listens for clients.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// HAProxy's statistics page (CSV at `/stats;csv`), e.g. 127.0.0.1:8404.
    #[arg(long)]
    pub stats: Option<String>,
    /// Seconds between health checks (HAProxy), or a failed board's time out of the rotation (nginx).
    #[arg(long, default_value_t = 2)]
    pub check_interval: u64,
    /// Seconds a generation may stay silent (and a request may wait for a free board).
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// With --hosts: the port each board's daemon serves HTTP on (bound to 0.0.0.0).
    #[arg(long, default_value_t = 8080)]
    pub board_port: u16,
    /// With --hosts: a file holding the Bearer token the boards require (16+ characters).
    #[arg(long)]
    pub auth_token_file: Option<PathBuf>,
    /// With --hosts: the board profile, memory, brambled, context and KV cache (as `deploy`).
    #[command(flatten)]
    pub board: BoardArgs,
    /// Print everything it would do (deploys and the configuration) and do nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With --hosts: how the boards are reached, and how long each restart may take.
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// A board behind the balancer: where it serves HTTP, and its name in logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// `board1`, `board2`, … in the order given.
    pub name: String,
    /// `host:port` as the balancer connects to it.
    pub address: String,
}

/// What a configuration is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The boards.
    pub backends: Vec<Backend>,
    /// Where clients connect.
    pub listen: SocketAddr,
    /// HAProxy's statistics listener.
    pub stats: Option<SocketAddr>,
    /// Seconds between checks / out of rotation after failures.
    pub check_interval: u64,
    /// Seconds of silence a generation may have.
    pub timeout: u64,
}

/// Reads `HOST:PORT` (a name, an IPv4 address or `[IPv6]`), with a message naming what is wrong.
pub fn parse_backend(text: &str) -> Result<String> {
    let text = text.trim();
    let (host, port) = text.rsplit_once(':').ok_or_else(|| anyhow!("backend {text:?} is not HOST:PORT"))?;
    let port: u16 = port.parse().map_err(|_| anyhow!("backend {text:?}: port {port:?} is not a number 1–65535"))?;
    if port == 0 {
        bail!("backend {text:?}: port 0 is not a port a board listens on");
    }
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    let valid = match bare {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
                && !host.starts_with('-')
        }
    };
    if !valid {
        bail!("backend {text:?}: {host:?} is not a host name or IP address");
    }
    Ok(format!("{host}:{port}"))
}

impl Plan {
    /// The plan for `backends` (`HOST:PORT` each), checked.
    pub fn new(
        backends: &[String],
        listen: &str,
        stats: Option<&str>,
        check_interval: u64,
        timeout: u64,
    ) -> Result<Plan> {
        if backends.is_empty() {
            bail!("no boards: give --backends HOST:PORT[,HOST:PORT…] or --hosts USER@PI[,…]");
        }
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for (i, text) in backends.iter().enumerate() {
            let address = parse_backend(text)?;
            if !seen.insert(address.clone()) {
                bail!("backend {address} is given twice");
            }
            out.push(Backend { name: format!("board{}", i + 1), address });
        }
        let address = |what: &str, text: &str| -> Result<SocketAddr> {
            text.parse().map_err(|_| anyhow!("{what} {text:?} is not ADDR:PORT (e.g. 0.0.0.0:8080)"))
        };
        let listen = address("--listen", listen)?;
        let stats = stats.map(|s| address("--stats", s)).transpose()?;
        if stats == Some(listen) {
            bail!("--stats and --listen are both {listen}");
        }
        if check_interval == 0 || timeout == 0 {
            bail!("--check-interval and --timeout are seconds, at least 1");
        }
        Ok(Plan { backends: out, listen, stats, check_interval, timeout })
    }
}

/// `DIR/haproxy.cfg` for `plan`.
pub fn haproxy_config(plan: &Plan) -> String {
    let Plan { listen, check_interval, timeout, .. } = *plan;
    let mut text = format!(
        "# HAProxy in front of {n} Bramble boards, written by `bramble fleet` (docs/fleet.md).
# Run it as any user: haproxy -f haproxy.cfg
global
    log stdout format raw local0 info
    maxconn 4096

defaults
    mode http
    log global
    option httplog
    option dontlognull
    timeout connect 3s
    # A generation may stay silent between tokens for a while on a busy Pi,
    # and a request may wait this long for a free board.
    timeout client {timeout}s
    timeout server {timeout}s
    timeout queue {timeout}s
    timeout http-request 30s
    timeout http-keep-alive 10s
    timeout check 3s
    # A board that refuses the connection or answers 503 (busy: nothing was
    # started) is retried on another board; a board that fails mid-answer is not.
    retries 3
    option redispatch 1
    retry-on conn-failure 503

frontend bramble
    bind {listen}
    default_backend boards

backend boards
    # The board with the fewest open requests; one generation a board, the
    # rest wait here (timeout queue) for the first board to free.
    balance leastconn
    option httpchk
    http-check send meth GET uri /health ver HTTP/1.1 hdr Host localhost
    # \"stopping\" (draining after SIGTERM) takes a board out before it closes.
    http-check expect string \"status\\\":\\\"ok\\\"\"
    # A refused connection marks a board down at once (leastconn would
    # otherwise keep choosing a dead board: it has the fewest connections).
    default-server check inter {check_interval}s fall 2 rise 2 maxconn 1 observe layer4 error-limit 1 on-error mark-down
",
        n = plan.backends.len()
    );
    for backend in &plan.backends {
        let _ = writeln!(text, "    server {} {}", backend.name, backend.address);
    }
    if let Some(stats) = plan.stats {
        let _ = write!(
            text,
            "
frontend stats
    bind {stats}
    stats enable
    stats uri /stats
    stats refresh 5s
"
        );
    }
    text
}

/// Failures (refused connections, timeouts, busy 503s) within `fail_timeout`
/// that take a board out of nginx's rotation: more than one, so that a board
/// merely busy for a moment stays in.
const NGINX_MAX_FAILS: u32 = 3;

/// `DIR/nginx.conf` for `plan`, its pid file and temporary files under `dir` (absolute).
pub fn nginx_config(plan: &Plan, dir: &Path) -> String {
    let Plan { listen, check_interval, timeout, .. } = *plan;
    let dir = dir.display();
    let mut text = format!(
        "# nginx in front of {n} Bramble boards, written by `bramble fleet` (docs/fleet.md).
# Run it as any user: nginx -c {dir}/nginx.conf   (in the foreground; ^C stops it)
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr warn;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

    upstream boards {{
        # The board with the fewest open requests. nginx's open-source build
        # checks passively: {NGINX_MAX_FAILS} failures within {check_interval} s take a board
        # out for {check_interval} s. A busy board's 503 counts as one.
        least_conn;
",
        n = plan.backends.len(),
    );
    for backend in &plan.backends {
        let _ = writeln!(
            text,
            "        server {} max_fails={NGINX_MAX_FAILS} fail_timeout={check_interval}s;",
            backend.address
        );
    }
    let _ = write!(
        text,
        "        keepalive 16;
    }}

    server {{
        listen {listen};
        client_max_body_size 1m;

        location / {{
            proxy_pass http://boards;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host $host;
            # Tokens stream through as they come (SSE and chunked NDJSON-style bodies).
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_cache off;
            # Refused connections and busy boards (503: nothing started) go to the next board.
            proxy_next_upstream error timeout http_503 non_idempotent;
            proxy_next_upstream_tries 3;
            proxy_connect_timeout 3s;
            # A generation may stay silent between tokens for a while on a busy Pi.
            proxy_read_timeout {timeout}s;
            proxy_send_timeout {timeout}s;
        }}
    }}
}}
"
    );
    text
}

/// `bramble fleet`.
pub fn run(args: FleetArgs) -> Result<()> {
    let deploying = !args.hosts.is_empty();
    if args.balancer == Balancer::Nginx && args.stats.is_some() {
        bail!("--stats is HAProxy's statistics page; nginx's open-source build has none");
    }
    let backends: Vec<String> = if deploying {
        args.hosts
            .iter()
            .map(|host| {
                let name = host.rsplit_once('@').map_or(host.as_str(), |(_, h)| h);
                format!("{name}:{}", args.board_port)
            })
            .collect()
    } else {
        args.backends.clone()
    };
    let plan = Plan::new(&backends, &args.listen, args.stats.as_deref(), args.check_interval, args.timeout)?;
    let output = std::path::absolute(&args.output).context("the output directory")?;
    let text = match args.balancer {
        Balancer::Haproxy => haproxy_config(&plan),
        Balancer::Nginx => nginx_config(&plan, &output),
    };
    let file = output.join(args.balancer.file_name());

    if deploying {
        let token_file = args.auth_token_file.as_ref().ok_or_else(|| {
            anyhow!("--hosts needs --auth-token-file: the boards listen off loopback, which requires a token")
        })?;
        let model = args.model.clone().ok_or_else(|| anyhow!("--hosts needs --model"))?;
        for host in &args.hosts {
            println!("== {host}");
            let mut board = args.board.clone();
            board.http = format!("0.0.0.0:{}", args.board_port);
            deploy::run(DeployArgs {
                host: host.clone(),
                model: model.clone(),
                board,
                dry_run: args.dry_run,
                no_uart: false,
                remote: args.remote.clone(),
                auth_token_file: Some(token_file.clone()),
            })
            .with_context(|| format!("deploying to {host}"))?;
        }
    }
    if args.dry_run {
        println!("would write {} ({} boards):", file.display(), plan.backends.len());
        for line in text.lines() {
            println!("    | {line}");
        }
        println!("dry run: nothing was written");
        return Ok(());
    }
    std::fs::create_dir_all(&output).with_context(|| format!("creating {}", output.display()))?;
    std::fs::write(&file, &text).with_context(|| format!("writing {}", file.display()))?;
    let run = match args.balancer {
        Balancer::Haproxy => format!("haproxy -f {}", file.display()),
        Balancer::Nginx => format!("nginx -c {}", file.display()),
    };
    println!("wrote {} for {} boards; run: {run}", file.display(), plan.backends.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_for(backends: &[&str]) -> Result<Plan> {
        let backends: Vec<String> = backends.iter().map(|s| s.to_string()).collect();
        Plan::new(&backends, "127.0.0.1:9000", Some("127.0.0.1:9001"), 2, 600)
    }

    #[test]
    fn backends_are_checked_and_named_in_order() {
        let plan = plan_for(&["pi-1.local:8080", "10.0.0.7:8080", "[fe80::1]:8080"]).unwrap();
        let names: Vec<_> = plan.backends.iter().map(|b| (b.name.as_str(), b.address.as_str())).collect();
        assert_eq!(names, [("board1", "pi-1.local:8080"), ("board2", "10.0.0.7:8080"), ("board3", "[fe80::1]:8080")]);
        for (bad, says) in [
            ("pi", "not HOST:PORT"),
            ("pi:http", "not a number"),
            ("pi:0", "port 0"),
            ("pi:70000", "not a number"),
            (":8080", "not a host name"),
            ("pi;rm -rf /:8080", "not a host name"),
            ("[zz]:8080", "not a host name"),
        ] {
            let error = plan_for(&[bad]).unwrap_err().to_string();
            assert!(error.contains(says), "{bad}: {error}");
        }
        assert!(plan_for(&["a:1", "a:1"]).unwrap_err().to_string().contains("twice"));
        assert!(plan_for(&[]).unwrap_err().to_string().contains("no boards"));
        let backends = vec!["a:1".to_string()];
        assert!(Plan::new(&backends, "nowhere", None, 2, 600).unwrap_err().to_string().contains("--listen"));
        assert!(Plan::new(&backends, "127.0.0.1:1", Some("127.0.0.1:1"), 2, 600).is_err());
        assert!(Plan::new(&backends, "127.0.0.1:1", None, 0, 600).is_err());
    }

    #[test]
    fn haproxy_config_has_what_a_fleet_needs() {
        let text = haproxy_config(&plan_for(&["10.0.0.1:8080", "10.0.0.2:8080"]).unwrap());
        for needed in [
            "balance leastconn",
            "option httpchk",
            "uri /health",
            "http-check expect string \"status\\\":\\\"ok\\\"\"",
            "retry-on conn-failure 503",
            "option redispatch",
            "maxconn 1",
            "observe layer4 error-limit 1 on-error mark-down",
            "inter 2s",
            "timeout server 600s",
            "timeout queue 600s",
            "bind 127.0.0.1:9000",
            "server board1 10.0.0.1:8080",
            "server board2 10.0.0.2:8080",
            "bind 127.0.0.1:9001",
            "stats uri /stats",
        ] {
            assert!(text.contains(needed), "{needed:?} missing from\n{text}");
        }
        // Nothing an unprivileged user cannot do.
        for privileged in ["user ", "chroot", "daemon", "/var/"] {
            assert!(!text.contains(privileged), "{privileged:?} in\n{text}");
        }
    }

    #[test]
    fn nginx_config_has_what_a_fleet_needs() {
        let mut plan = plan_for(&["10.0.0.1:8080", "10.0.0.2:8080"]).unwrap();
        plan.stats = None;
        let text = nginx_config(&plan, Path::new("/tmp/fleet"));
        for needed in [
            "least_conn;",
            "server 10.0.0.1:8080 max_fails=3 fail_timeout=2s;",
            "server 10.0.0.2:8080 max_fails=3 fail_timeout=2s;",
            "proxy_next_upstream error timeout http_503 non_idempotent;",
            "proxy_buffering off;",
            "proxy_http_version 1.1;",
            "proxy_read_timeout 600s;",
            "listen 127.0.0.1:9000;",
            "pid /tmp/fleet/nginx.pid;",
            "proxy_temp_path /tmp/fleet/proxy;",
            "error_log stderr",
        ] {
            assert!(text.contains(needed), "{needed:?} missing from\n{text}");
        }
        assert!(!text.contains("user "), "{text}");
    }
}

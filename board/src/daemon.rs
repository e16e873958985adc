//! Startup and shutdown: load the model, bind the listeners, start the
//! console, tell systemd we are ready, then wait for SIGTERM/SIGINT and drain.

use crate::config::Config;
use crate::connection::{Admission, Connection, ConnectionTable, Shared};
use crate::engine::{Engine, RequestError};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Sends `state` (`READY=1`, `STOPPING=1`, `STATUS=...`) to systemd's
/// notification socket, when the daemon runs under a `Type=notify` unit.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        // `@name` is a socket in the abstract namespace.
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &address)?;
        } else {
            socket.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        log::warn!("sd_notify {state:?} to {}: {e}", path.to_string_lossy());
    }
}

/// What kind of connections a listener takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http,
    Ndjson,
    Console,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Ndjson => "ndjson",
            Protocol::Console => "console",
        }
    }
}

/// Refuses a connection over the limit in the protocol's own words, then closes it.
fn refuse(mut stream: TcpStream, protocol: Protocol, open: usize) {
    let error = RequestError::new(503, "server_busy", format!("busy: {open} connections are open; try again later"));
    let bytes = match protocol {
        Protocol::Ndjson => crate::ndjson::error_line(&error),
        Protocol::Console => format!("error: {}\r\n", error.message).into_bytes(),
        Protocol::Http => {
            let body = crate::http::error_body(&error).to_string();
            format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        }
    };
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream.write_all(&bytes);
}

/// Accepts connections until the daemon stops; one thread per connection.
fn accept_loop(listener: TcpListener, protocol: Protocol, shared: Shared) {
    while !shared.engine.stopping.load(Ordering::SeqCst) {
        // Poll with a timeout so a shutdown is noticed without a connection arriving.
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, PollTimeout::from(200u16)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => {
                log::error!("{}: poll failed: {e}", protocol.name());
                return;
            }
        }
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) => {
                log::warn!("{}: accept failed: {e}", protocol.name());
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        // Writes to this client (its streamed tokens among them) wait at most the send timeout.
        let _ = stream.set_write_timeout(Some(shared.config.limits.send_timeout));
        let limit = shared.config.limits.max_connections;
        let admission = ConnectionTable::admit(&shared.connections, &stream, limit);
        let admission = match (admission, protocol) {
            (Admission::Refused, _) => None,
            // The kept slot is for `GET /health`, which only HTTP has.
            (Admission::HealthOnly(_), Protocol::Ndjson | Protocol::Console) => None,
            (admission, _) => Some(admission),
        };
        let Some(admission) = admission else {
            log::warn!("{}: refusing {peer}: {limit} connections are open and busy", protocol.name());
            refuse(stream, protocol, limit);
            continue;
        };
        let shared = shared.clone();
        let spawned = std::thread::Builder::new().name(format!("{}-{peer}", protocol.name())).spawn(move || {
            log::debug!("{}: connection from {peer}", protocol.name());
            let limits = &shared.config.limits;
            match protocol {
                Protocol::Http => {
                    if let Some(connection) = Connection::admitted(stream, limits, admission) {
                        crate::http::serve(connection, &shared)
                    }
                }
                Protocol::Ndjson => {
                    if let Some(connection) = Connection::admitted(stream, limits, admission) {
                        crate::ndjson::serve(connection, &shared)
                    }
                }
                Protocol::Console => {
                    let _slot = admission;
                    crate::console::serve_tcp(stream, &shared)
                }
            }
        });
        if let Err(e) = spawned {
            log::error!("{}: cannot start a connection thread: {e}", protocol.name());
        }
    }
}

/// After the drain time, how long cancelled work gets to notice and tell its
/// client before the process ends regardless (a client that stopped reading
/// must not keep the daemon alive).
pub const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Waits for signals on its own thread from before the model is opened, so
/// the daemon can be stopped while it loads: SIGTERM or SIGINT then ends the
/// process at once; once it serves, they are passed on to drain. SIGHUP (a
/// closed terminal, or `systemctl reload`) is logged and ignored: the
/// configuration is read once, at start.
fn watch_signals(signals: SigSet, serving: Arc<AtomicBool>) -> Result<mpsc::Receiver<Signal>, String> {
    let (sender, receiver) = mpsc::channel();
    std::thread::Builder::new()
        .name("signals".to_string())
        .spawn(move || loop {
            match signals.wait() {
                Ok(Signal::SIGHUP) => log::info!("SIGHUP: ignored; restart brambled to apply a changed configuration"),
                Ok(signal) if !serving.load(Ordering::SeqCst) => {
                    log::info!("{signal:?} while starting: exiting");
                    notify("STOPPING=1");
                    std::process::exit(0);
                }
                Ok(signal) => {
                    if sender.send(signal).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    log::error!("waiting for signals: {e}");
                    return;
                }
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(receiver)
}

/// Waits until every thread in `threads` has finished or `deadline` passes; returns those still running.
fn join_until(threads: Vec<std::thread::JoinHandle<()>>, deadline: Instant) -> usize {
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut running = 0;
    for thread in threads {
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            running += 1;
        }
    }
    running
}

/// Runs the daemon until SIGTERM or SIGINT; returns after draining, within
/// `limits.drain_timeout` plus [`CANCEL_GRACE`] whatever the clients do.
pub fn run(config: Config) -> Result<(), String> {
    // Block the signals in this thread before any other starts (threads
    // inherit the mask), so only the signal thread's `sigwait` receives them — no handler, no unsafe.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGHUP);
    signals.thread_block().map_err(|e| format!("cannot block SIGTERM/SIGINT/SIGHUP: {e}"))?;
    let serving = Arc::new(AtomicBool::new(false));
    let stop_signals = watch_signals(signals, Arc::clone(&serving))?;

    let (engine, inference) = Engine::start(&config).map_err(|e| format!("model: {e}"))?;
    log::info!("loaded {}: {}", engine.info.name, engine.info.summary);
    let config = Arc::new(config);
    let shared = Shared { engine: engine.clone(), config: Arc::clone(&config), connections: Arc::default() };

    let mut acceptors = Vec::new();
    let listeners = [
        (config.tcp.http, Protocol::Http, "tcp.http"),
        (config.tcp.ndjson, Protocol::Ndjson, "tcp.ndjson"),
        (config.tcp.console, Protocol::Console, "tcp.console"),
    ];
    for (address, protocol, key) in listeners {
        let Some(address) = address else { continue };
        let listener = TcpListener::bind(address).map_err(|e| format!("{key}: cannot listen on {address}: {e}"))?;
        let bound: SocketAddr = listener.local_addr().map_err(|e| format!("{key}: {e}"))?;
        log::info!("{} listening on {bound}", protocol.name());
        let shared = shared.clone();
        acceptors.push(
            std::thread::Builder::new()
                .name(format!("accept-{}", protocol.name()))
                .spawn(move || accept_loop(listener, protocol, shared))
                .map_err(|e| format!("cannot start a listener thread: {e}"))?,
        );
    }
    let console = config.uart.device.clone().map(|device| {
        let (engine, sampling, limit, baud) =
            (engine.clone(), config.sampling, config.limits.max_tokens, config.uart.baud);
        let stopping = Arc::clone(&engine.stopping);
        std::thread::Builder::new()
            .name("console".to_string())
            .spawn(move || crate::console::run_serial(&device, baud, engine, sampling, limit, stopping))
    });
    let console = console.transpose().map_err(|e| format!("cannot start the console thread: {e}"))?;

    log::info!("ready");
    serving.store(true, Ordering::SeqCst);
    notify("READY=1\nSTATUS=serving");
    let signal = stop_signals.recv().map_err(|_| "the signal thread ended".to_string())?;
    log::info!("{signal:?}: draining (up to {:.1} s), then exiting", config.limits.drain_timeout.as_secs_f64());
    notify("STOPPING=1");

    // Stop taking work, give what is running or queued the drain time (a
    // second signal cuts it short), then cancel it.
    engine.stopping.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + config.limits.drain_timeout;
    while !engine.idle() && Instant::now() < deadline {
        if let Ok(again) = stop_signals.try_recv() {
            log::info!("{again:?} again: cancelling now");
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if !engine.idle() {
        log::warn!("drain time is up: cancelling what is left");
        engine.cancel_all.store(true, Ordering::SeqCst);
    }
    // A hard deadline: threads still held (a write to a client that stopped
    // reading waits up to the send timeout) are left behind when the process ends.
    let mut threads = acceptors;
    threads.push(inference);
    threads.extend(console);
    let left = join_until(threads, Instant::now() + CANCEL_GRACE);
    if left > 0 {
        log::warn!(
            "{left} threads did not stop within {:.1} s of the cancel: exiting without them",
            CANCEL_GRACE.as_secs_f64()
        );
    }
    let stats = &engine.stats;
    log::info!(
        "stopped: {} served, {} refused busy, {} failed, {} cancelled",
        stats.served.load(Ordering::Relaxed),
        stats.refused.load(Ordering::Relaxed),
        stats.failed.load(Ordering::Relaxed),
        stats.cancelled.load(Ordering::Relaxed)
    );
    Ok(())
}

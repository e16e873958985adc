//! Reading requests from a TCP connection within the limits: a byte cap on
//! each line or head or body, a request timeout once a request has begun (so
//! a client sending one byte a second is cut off), an idle timeout between
//! requests, and a check for a client that has gone away while it waits.

use crate::config::Limits;
use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why no request could be read.
#[derive(Debug)]
pub enum ReadFailure {
    /// The client closed the connection between requests.
    Closed,
    /// No request began within the idle timeout.
    Idle,
    /// A request began but did not complete within the request timeout.
    Timeout,
    /// The request went over the byte cap.
    TooLarge,
    /// The connection failed (reset, closed part way through a request).
    Io(io::Error),
}

/// One client connection and the bytes read past the last request.
pub struct Connection {
    /// The stream.
    pub stream: TcpStream,
    pending: Vec<u8>,
    limits: Limits,
}

impl Connection {
    /// Wraps an accepted stream.
    pub fn new(stream: TcpStream, limits: &Limits) -> Self {
        let _ = stream.set_nodelay(true);
        Self { stream, pending: Vec::with_capacity(4096), limits: limits.clone() }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Reads more bytes into `pending`, waiting no later than `deadline`.
    fn fill(&mut self, deadline: Instant, began: bool) -> Result<(), ReadFailure> {
        let now = Instant::now();
        if now >= deadline {
            return Err(if began { ReadFailure::Timeout } else { ReadFailure::Idle });
        }
        let wait = (deadline - now).max(Duration::from_millis(1));
        self.stream.set_read_timeout(Some(wait)).map_err(ReadFailure::Io)?;
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) if began => {
                Err(ReadFailure::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "closed in the middle of a request")))
            }
            Ok(0) => Err(ReadFailure::Closed),
            Ok(n) => {
                self.pending.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                Err(if began { ReadFailure::Timeout } else { ReadFailure::Idle })
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(ReadFailure::Io(e)),
        }
    }

    /// Reads up to `delimiter` (not included, and consumed). At most `max`
    /// bytes before it; a request that has begun must end within the request timeout.
    pub fn read_until(&mut self, delimiter: &[u8], max: usize) -> Result<Vec<u8>, ReadFailure> {
        let idle_deadline = Instant::now() + self.limits.idle_timeout;
        let mut request_deadline = (!self.pending.is_empty()).then(|| Instant::now() + self.limits.request_timeout);
        let mut searched = 0;
        loop {
            if let Some(at) = find(&self.pending[searched..], delimiter) {
                let end = searched + at;
                if end > max {
                    return Err(ReadFailure::TooLarge);
                }
                let line = self.pending[..end].to_vec();
                self.pending.drain(..end + delimiter.len());
                return Ok(line);
            }
            if self.pending.len() > max + delimiter.len() {
                return Err(ReadFailure::TooLarge);
            }
            searched = self.pending.len().saturating_sub(delimiter.len() - 1);
            let began = request_deadline.is_some();
            self.fill(request_deadline.unwrap_or(idle_deadline), began)?;
            if request_deadline.is_none() && !self.pending.is_empty() {
                request_deadline = Some(Instant::now() + self.limits.request_timeout);
            }
        }
    }

    /// Reads a message head whose end `parse` finds. After each read, `parse`
    /// is shown every byte received so far and how many of them it was shown
    /// before; it answers `Ok(None)` (not complete yet), `Ok(Some((head,
    /// length)))` (the first `length` bytes are the head: they are consumed),
    /// or an error, returned at once: bytes that cannot begin a valid head are
    /// refused as soon as they arrive, not at the request timeout. At most
    /// `max` bytes; the timeouts are those of [`Connection::read_until`].
    pub fn read_head<T, E>(
        &mut self,
        max: usize,
        mut parse: impl FnMut(&[u8], usize) -> Result<Option<(T, usize)>, E>,
    ) -> Result<Result<T, E>, ReadFailure> {
        let idle_deadline = Instant::now() + self.limits.idle_timeout;
        let mut request_deadline = (!self.pending.is_empty()).then(|| Instant::now() + self.limits.request_timeout);
        let mut shown = 0;
        loop {
            if self.pending.len() > shown {
                match parse(&self.pending, shown) {
                    Err(error) => return Ok(Err(error)),
                    Ok(Some((_, length))) if length > max => return Err(ReadFailure::TooLarge),
                    Ok(Some((head, length))) => {
                        self.pending.drain(..length);
                        return Ok(Ok(head));
                    }
                    Ok(None) => shown = self.pending.len(),
                }
            }
            if self.pending.len() > max {
                return Err(ReadFailure::TooLarge);
            }
            let began = request_deadline.is_some();
            self.fill(request_deadline.unwrap_or(idle_deadline), began)?;
            if request_deadline.is_none() && !self.pending.is_empty() {
                request_deadline = Some(Instant::now() + self.limits.request_timeout);
            }
        }
    }

    /// Reads exactly `length` bytes (an HTTP body), within the request timeout.
    pub fn read_exact(&mut self, length: usize) -> Result<Vec<u8>, ReadFailure> {
        let deadline = Instant::now() + self.limits.request_timeout;
        while self.pending.len() < length {
            self.fill(deadline, true)?;
        }
        Ok(self.pending.drain(..length).collect())
    }

    /// Whether the client has closed its end or reset the connection (looked
    /// at without reading: pending request bytes stay in the socket).
    pub fn peer_gone(&self) -> bool {
        peer_gone(&self.stream)
    }
}

/// Whether the client of `stream` has closed its end or reset the connection
/// (looked at without reading: pending request bytes stay in the socket).
pub fn peer_gone(stream: &TcpStream) -> bool {
    use nix::sys::socket::{recv, MsgFlags};
    let mut byte = [0u8; 1];
    match recv(stream.as_raw_fd(), &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
        Ok(0) => true,
        Ok(_) => false,
        Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => false,
        Err(_) => true,
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Counts open connections; each accepted one holds a guard until it closes.
#[derive(Debug, Default)]
pub struct ConnectionCount(AtomicUsize);

/// One counted connection.
pub struct ConnectionGuard(Arc<ConnectionCount>);

impl ConnectionCount {
    /// A guard if fewer than `max` connections are open.
    pub fn enter(count: &Arc<ConnectionCount>, max: usize) -> Option<ConnectionGuard> {
        let previous = count.0.fetch_add(1, Ordering::SeqCst);
        if previous >= max {
            count.0.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(ConnectionGuard(Arc::clone(count)))
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What every connection thread shares.
#[derive(Clone)]
pub struct Shared {
    /// The inference thread.
    pub engine: crate::engine::Engine,
    /// The configuration.
    pub config: Arc<crate::config::Config>,
    /// Open TCP connections.
    pub connections: Arc<ConnectionCount>,
}

impl Shared {
    /// Whether `given` is the configured token (true when none is configured).
    pub fn authorized(&self, given: Option<&str>) -> bool {
        match &self.config.tcp.auth_token {
            None => true,
            Some(token) => given.is_some_and(|g| crate::request::constant_time_eq(g.as_bytes(), token.as_bytes())),
        }
    }
}

//! Reading requests from a TCP connection within the limits: a byte cap on
//! each line or head or body, a request timeout once a request has begun (so
//! a client sending one byte a second is cut off), an idle timeout between
//! requests, and a check for a client that has gone away while it waits.

use crate::config::Limits;
use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
    /// Its place in the connection table, marked idle while it waits for a request.
    slot: Option<ConnectionGuard>,
    /// Admitted in the slot kept for `GET /health`: other requests are refused busy.
    pub health_only: bool,
}

impl Connection {
    /// Wraps an accepted stream. Writes to it wait at most `limits.send_timeout`.
    pub fn new(stream: TcpStream, limits: &Limits) -> Self {
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(limits.send_timeout));
        Self { stream, pending: Vec::with_capacity(4096), limits: limits.clone(), slot: None, health_only: false }
    }

    /// Wraps an accepted stream admitted to the connection table.
    pub fn admitted(stream: TcpStream, limits: &Limits, admission: Admission) -> Option<Self> {
        let (slot, health_only) = match admission {
            Admission::Full(slot) => (slot, false),
            Admission::HealthOnly(slot) => (slot, true),
            Admission::Refused => return None,
        };
        Some(Self { slot: Some(slot), health_only, ..Self::new(stream, limits) })
    }

    fn set_idle(&self, idle: bool) {
        if let Some(slot) = &self.slot {
            slot.set_idle(idle);
        }
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
        let found = self.read_head(max + delimiter.len(), |pending: &[u8], shown| {
            // Only the bytes new since the last look (and a delimiter's worth before them) are searched.
            let from = shown.saturating_sub(delimiter.len() - 1);
            Ok::<_, std::convert::Infallible>(
                find(&pending[from..], delimiter)
                    .map(|at| (pending[..from + at].to_vec(), from + at + delimiter.len())),
            )
        })?;
        Ok(found.unwrap_or_else(|never| match never {}))
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
        // Between requests the connection may be closed to make room for another.
        self.set_idle(request_deadline.is_none());
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
                self.set_idle(false);
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

/// Whether bytes from the client wait unread in `stream` (looked at without reading).
fn has_input(stream: &TcpStream) -> bool {
    use nix::sys::socket::{recv, MsgFlags};
    let mut byte = [0u8; 1];
    matches!(recv(stream.as_raw_fd(), &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT), Ok(n) if n > 0)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The open TCP connections, so that the limit on them cannot be held by
/// clients that send nothing: at the limit, the connection idle the longest
/// (between requests, or never having sent one) is closed to make room; the
/// last slot is kept for `GET /health`; and connections already closing (shut
/// down by us, or whose client has hung up) are not counted.
#[derive(Debug, Default)]
pub struct ConnectionTable {
    slots: Mutex<Vec<Slot>>,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct Slot {
    id: u64,
    /// A handle on the socket, to shut it down when it is evicted.
    stream: TcpStream,
    /// Since when it has been waiting for a request; `None` while one is read or answered.
    idle_since: Option<Instant>,
    /// Shut down by us or hung up by the client: its thread is on its way out.
    closing: bool,
}

/// How long a connection must have waited for a request before it may be
/// closed to make room: a client that has just connected is about to send.
pub const IDLE_BEFORE_CLOSING: Duration = Duration::from_millis(200);

/// How an accepted connection was let in.
pub enum Admission {
    /// As any connection.
    Full(ConnectionGuard),
    /// In the slot kept for `GET /health`: anything else is refused busy.
    HealthOnly(ConnectionGuard),
    /// Not at all: every slot is busy with a request.
    Refused,
}

/// One admitted connection; its slot is freed when the guard drops.
#[derive(Debug)]
pub struct ConnectionGuard {
    table: Arc<ConnectionTable>,
    id: u64,
}

impl ConnectionTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits `stream` if the table has room under `max`, making room by
    /// closing the connection idle the longest when it has not.
    pub fn admit(table: &Arc<ConnectionTable>, stream: &TcpStream, max: usize) -> Admission {
        let Ok(handle) = stream.try_clone() else { return Admission::Refused };
        let mut slots = table.lock();
        let mut open = slots.iter().filter(|s| !s.closing).count();
        if open + 1 >= max {
            // Full, or at the kept slot: those whose client hung up do not count.
            for slot in slots.iter_mut().filter(|s| !s.closing && peer_gone(&s.stream)) {
                slot.closing = true;
                open -= 1;
            }
        }
        if open + 1 >= max {
            // Still full: close the connection that has waited longest for a request.
            // One whose next request has already arrived (unread) is not idle.
            let oldest = slots
                .iter_mut()
                .filter(|s| !s.closing && s.idle_since.is_some_and(|t| t.elapsed() >= IDLE_BEFORE_CLOSING))
                .filter(|s| !has_input(&s.stream))
                .min_by_key(|s| s.idle_since);
            if let Some(slot) = oldest {
                log::debug!("connection limit {max}: closing the connection idle the longest to make room");
                let _ = slot.stream.shutdown(std::net::Shutdown::Both);
                slot.closing = true;
                open -= 1;
            }
        }
        if open >= max {
            return Admission::Refused;
        }
        let id = table.next_id.fetch_add(1, Ordering::Relaxed);
        slots.push(Slot { id, stream: handle, idle_since: Some(Instant::now()), closing: false });
        let guard = ConnectionGuard { table: Arc::clone(table), id };
        // `max` > 1: the last slot is kept for the health check.
        if open + 1 == max && max > 1 {
            Admission::HealthOnly(guard)
        } else {
            Admission::Full(guard)
        }
    }

    /// Connections open now (those closing not counted).
    pub fn open(&self) -> usize {
        self.lock().iter().filter(|s| !s.closing).count()
    }
}

impl ConnectionGuard {
    /// Marks the connection as waiting for a request (evictable) or not.
    pub fn set_idle(&self, idle: bool) {
        if let Some(slot) = self.table.lock().iter_mut().find(|s| s.id == self.id) {
            slot.idle_since = if idle { slot.idle_since.or_else(|| Some(Instant::now())) } else { None };
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.table.lock().retain(|s| s.id != self.id);
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
    pub connections: Arc<ConnectionTable>,
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

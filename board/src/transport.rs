//! The one transport abstraction: embedded-io's [`Read`] and [`Write`] (the
//! embedded-hal 1.0 family), so the console is written once and runs over a
//! UART, a pseudo-terminal, or a TCP stream — and, on a microcontroller, over
//! whatever implements the same traits.
//!
//! One convention on top of the traits: a reader returns an error of kind
//! [`ErrorKind::TimedOut`] when nothing arrived within [`READ_TICK`], so a
//! reading loop can look at its flags (Ctrl-C, shutdown) between reads; `Ok(0)`
//! and any other error mean the device or peer is gone.

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{self, BaudRate, ControlFlags, SetArg, SpecialCharacterIndices};
use std::fs::File;
use std::io;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use embedded_io::{ErrorKind, ErrorType, Read, Write};

/// How long a read waits before reporting [`ErrorKind::TimedOut`].
pub const READ_TICK: Duration = Duration::from_millis(100);

/// Whether a transport error only means "nothing yet".
pub fn is_tick<E: embedded_io::Error>(error: &E) -> bool {
    error.kind() == ErrorKind::TimedOut
}

fn tick_error() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "no input within the read tick")
}

/// A TCP stream as a transport.
pub struct TcpPort(TcpStream);

impl TcpPort {
    /// Wraps `stream`, setting its read timeout to [`READ_TICK`].
    pub fn new(stream: TcpStream) -> io::Result<Self> {
        stream.set_read_timeout(Some(READ_TICK))?;
        stream.set_nodelay(true)?;
        Ok(Self(stream))
    }

    /// A second handle to the same connection (one thread reads, another writes).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }

    /// The stream.
    pub fn stream(&self) -> &TcpStream {
        &self.0
    }
}

impl ErrorType for TcpPort {
    type Error = io::Error;
}

impl Read for TcpPort {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, io::Error> {
        match io::Read::read(&mut self.0, buf) {
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Err(tick_error()),
            other => other,
        }
    }
}

/// Sends all of `bytes` on `stream` within its write timeout (`SO_SNDTIMEO`,
/// set per connection from `limits.send_timeout`), counted from the call: a
/// client that stops reading fails the write with [`io::ErrorKind::TimedOut`]
/// instead of holding the caller, even if it reads a byte now and then. With
/// no timeout set, waits as long as the client does.
pub fn send_all(stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    use nix::sys::socket::{send, MsgFlags};
    use std::os::fd::AsRawFd;
    let timeout = stream.write_timeout()?;
    let deadline = timeout.map(|t| Instant::now() + t);
    while !bytes.is_empty() {
        match send(stream.as_raw_fd(), bytes, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => bytes = &bytes[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::EAGAIN) => {
                // The socket's buffer is full: wait for room, until the deadline.
                let wait = match deadline {
                    None => PollTimeout::NONE,
                    Some(deadline) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return Err(send_timed_out(timeout.unwrap_or_default()));
                        }
                        PollTimeout::try_from(left.max(Duration::from_millis(1))).unwrap_or(PollTimeout::MAX)
                    }
                };
                let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLOUT)];
                match nix::poll::poll(&mut fds, wait) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn send_timed_out(timeout: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("the client read nothing for {:.1} s (limits.send_timeout_secs)", timeout.as_secs_f64()),
    )
}

impl Write for TcpPort {
    fn write(&mut self, buf: &[u8]) -> Result<usize, io::Error> {
        // One write waits at most the write timeout (`SO_SNDTIMEO`), as `send_all` does.
        io::Write::write(&mut self.0, buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> Result<(), io::Error> {
        send_all(&self.0, buf)
    }
    fn flush(&mut self) -> Result<(), io::Error> {
        io::Write::flush(&mut self.0)
    }
}

/// A serial device (a UART, a USB adapter, a pseudo-terminal) in raw mode, 8N1.
pub struct SerialPort {
    file: File,
    /// The path it was opened by and the device number it named then, to
    /// notice the path being re-pointed (see [`SerialPort::replaced`]).
    path: PathBuf,
    device: u64,
    /// When the path was last compared with the open device.
    checked: Instant,
}

/// How often a quiet serial port checks that its path still names the open device.
pub const REPLACED_CHECK: Duration = Duration::from_secs(1);

/// The termios speed for `baud` bits per second.
pub fn baud_rate(baud: u32) -> Option<BaudRate> {
    Some(match baud {
        1200 => BaudRate::B1200,
        2400 => BaudRate::B2400,
        4800 => BaudRate::B4800,
        9600 => BaudRate::B9600,
        19200 => BaudRate::B19200,
        38400 => BaudRate::B38400,
        57600 => BaudRate::B57600,
        115200 => BaudRate::B115200,
        230400 => BaudRate::B230400,
        460800 => BaudRate::B460800,
        500000 => BaudRate::B500000,
        576000 => BaudRate::B576000,
        921600 => BaudRate::B921600,
        1000000 => BaudRate::B1000000,
        1152000 => BaudRate::B1152000,
        1500000 => BaudRate::B1500000,
        2000000 => BaudRate::B2000000,
        3000000 => BaudRate::B3000000,
        4000000 => BaudRate::B4000000,
        _ => return None,
    })
}

impl SerialPort {
    /// Opens `path` (without making it our controlling terminal) and sets raw
    /// mode at `baud`, 8 data bits, no parity, one stop bit, no flow control.
    pub fn open(path: &Path, baud: u32) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags_noctty()
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let speed = baud_rate(baud).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{baud} is not a standard baud rate"))
        })?;
        let mut settings = termios::tcgetattr(file.as_fd())
            .map_err(|e| io::Error::other(format!("{}: not a terminal ({e})", path.display())))?;
        // Raw: no echo, no line discipline, no signals from Ctrl-C, no output
        // processing; the console does its own echo, editing and newlines.
        termios::cfmakeraw(&mut settings);
        settings.control_flags &= !(ControlFlags::CSIZE | ControlFlags::PARENB | ControlFlags::CSTOPB);
        settings.control_flags |= ControlFlags::CS8 | ControlFlags::CREAD | ControlFlags::CLOCAL;
        settings.control_flags &= !ControlFlags::CRTSCTS;
        // Reads return what is there; waiting is done with poll.
        settings.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
        settings.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
        termios::cfsetspeed(&mut settings, speed).map_err(io::Error::from)?;
        termios::tcsetattr(file.as_fd(), SetArg::TCSANOW, &settings).map_err(io::Error::from)?;
        // Drop whatever line noise queued up while nobody was reading.
        let _ = termios::tcflush(file.as_fd(), termios::FlushArg::TCIFLUSH);
        let device = file.metadata()?.rdev();
        Ok(Self { file, path: path.to_path_buf(), device, checked: Instant::now() })
    }

    /// A second handle to the same device (one thread reads, another writes).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self { file: self.file.try_clone()?, path: self.path.clone(), device: self.device, checked: self.checked })
    }

    /// Why the path no longer names the open device, if it does not.
    ///
    /// An unplugged adapter or a closed pty hangs the line up, and a read
    /// reports that. But the open device can also go quiet for good while
    /// still open — some other process holds the far end of a pty, or udev
    /// re-points `/dev/serial0` or a `by-id` link at a new adapter — and then
    /// only the path tells that the console should move.
    fn replaced(&self) -> Option<String> {
        match std::fs::metadata(&self.path) {
            Ok(now) if now.rdev() == self.device => None,
            Ok(_) => Some(format!("{} now names another device", self.path.display())),
            Err(e) => Some(format!("{}: {e}", self.path.display())),
        }
    }
}

/// `O_NOCTTY` on open: a daemon must not acquire the serial line as its
/// controlling terminal (a hangup would then signal it).
trait NoControllingTerminal {
    fn custom_flags_noctty(&mut self) -> &mut Self;
}

impl NoControllingTerminal for std::fs::OpenOptions {
    fn custom_flags_noctty(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(nix::fcntl::OFlag::O_NOCTTY.bits())
    }
}

impl ErrorType for SerialPort {
    type Error = io::Error;
}

impl Read for SerialPort {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, io::Error> {
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
        let tick = PollTimeout::try_from(READ_TICK.as_millis() as i32).unwrap_or(PollTimeout::MAX);
        match nix::poll::poll(&mut fds, tick) {
            Ok(0) => {
                // Quiet: a moment to check (once a second, a stat) that the path still names this device.
                if self.checked.elapsed() >= REPLACED_CHECK {
                    self.checked = Instant::now();
                    if let Some(why) = self.replaced() {
                        return Err(io::Error::new(io::ErrorKind::NotConnected, why));
                    }
                }
                return Err(tick_error());
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Err(tick_error()),
            Err(e) => return Err(e.into()),
        }
        let events = fds[0].revents().unwrap_or(PollFlags::empty());
        if events.intersects(PollFlags::POLLNVAL) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the device was closed"));
        }
        // On POLLHUP/POLLERR the read reports the failure (EIO, or 0 for end of file).
        io::Read::read(&mut self.file, buf)
    }
}

impl Write for SerialPort {
    fn write(&mut self, buf: &[u8]) -> Result<usize, io::Error> {
        io::Write::write(&mut self.file, buf)
    }
    fn flush(&mut self) -> Result<(), io::Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    fn pty() -> (OwnedFd, std::path::PathBuf) {
        let pty = nix::pty::openpty(None, None).unwrap();
        let path = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&pty.slave)))
            .expect("the pty slave's path");
        // Keep the slave open only through our port; the master stays with the test.
        drop(pty.slave);
        (pty.master, path)
    }

    #[test]
    fn serial_port_on_a_pty_is_raw_and_reads_time_out() {
        let (master, path) = pty();
        let mut port = SerialPort::open(&path, 115200).unwrap();
        let settings = termios::tcgetattr(port.file.as_fd()).unwrap();
        assert!(!settings.local_flags.contains(termios::LocalFlags::ECHO), "raw mode turns echo off");
        assert!(!settings.local_flags.contains(termios::LocalFlags::ICANON), "raw mode has no line discipline");
        let mut buf = [0u8; 16];
        assert!(is_tick(&port.read(&mut buf).unwrap_err()), "nothing typed: a tick");
        let mut master = File::from(master);
        // Ctrl-C arrives as a byte, not a signal.
        io::Write::write_all(&mut master, b"a\x03").unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            match port.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if is_tick(&e) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, b"a\x03");
        drop(master);
        // The other end is gone: an error or end of file, not a tick.
        let gone = (0..50).find_map(|_| match port.read(&mut buf) {
            Ok(0) => Some(()),
            Err(e) if !is_tick(&e) => Some(()),
            _ => None,
        });
        assert!(gone.is_some(), "a closed pty is reported as gone");
    }

    #[test]
    fn a_quiet_port_whose_path_is_re_pointed_is_reported_gone() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("serial");
        // Both masters stay open, so neither line hangs up: only the path changes.
        let (_first_master, first) = pty();
        let (_second_master, second) = pty();
        std::os::unix::fs::symlink(&first, &link).unwrap();
        let mut port = SerialPort::open(&link, 115200).unwrap();
        let mut buf = [0u8; 16];
        assert!(is_tick(&port.read(&mut buf).unwrap_err()), "the path unchanged: a tick");
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&second, &link).unwrap();
        // Within a few checks (each a tick of 100 ms, a check a second), not at once.
        let started = std::time::Instant::now();
        let error = loop {
            match port.read(&mut buf) {
                Err(e) if is_tick(&e) => {}
                Err(e) => break e,
                Ok(n) => panic!("read {n} bytes from a silent pty"),
            }
            assert!(started.elapsed() < Duration::from_secs(30), "the re-pointed path was never noticed");
        };
        assert!(error.to_string().contains("now names another device"), "{error}");
    }

    #[test]
    fn unknown_baud_and_missing_device_are_errors() {
        assert!(baud_rate(12345).is_none());
        let error = SerialPort::open(Path::new("/nonexistent/tty"), 115200).err().unwrap();
        assert!(error.to_string().contains("/nonexistent/tty"), "{error}");
    }
}

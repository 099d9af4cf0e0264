//! Live migration over a UNIX socket or TCP, with Cloud Hypervisor's protocol shape
//! (vm-migration's `protocol`): Start → Config → Memory → State → Complete, or Abandon.
//!
//! The State payload is a [`MigrationState`]: the snapshot tree (child `"clock"` is the plugin's
//! framed section), the sender's last guest observation (so the receiver can measure the
//! guest-observed error), and restore options for demos (mode override, injected skew).
//! An `Error` response may carry a UTF-8 reason (a guest-clock extension; CH sends none).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use guest_clock::restore::RestoreOptions;
use serde::{Deserialize, Serialize};
use vm_migration::protocol::{Command, MemoryRange, MemoryRangeTable, Request, Response, Status};
use vm_migration::Snapshot;

use crate::vm::{GuestObservation, VmConfig};

/// Socket read/write timeout.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a receiver waits for a sender to connect.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest Config payload accepted, bytes.
pub const MAX_CONFIG_LEN: u64 = 1 << 20;
/// The largest State payload accepted, bytes.
pub const MAX_STATE_LEN: u64 = 64 << 20;
/// The largest error reason accepted, bytes.
pub const MAX_REASON_LEN: u64 = 64 << 10;

/// The State payload.
#[derive(Clone, Serialize, Deserialize)]
pub struct MigrationState {
    /// The VM's snapshot tree (child "clock").
    pub snapshot: Snapshot,
    /// The sender's last guest observation before the pause.
    pub observation: GuestObservation,
    /// Restore options chosen by the sender's operator (demos and benchmarks).
    pub restore_options: Option<RestoreOptions>,
}

/// A connected migration socket.
pub enum Stream {
    /// UNIX.
    Unix(UnixStream),
    /// TCP.
    Tcp(TcpStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// A migration URL: `unix:/path` or `tcp:host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUrl {
    /// A UNIX socket path.
    Unix(String),
    /// A TCP address.
    Tcp(String),
}

impl MigrationUrl {
    /// Parse `unix:PATH` or `tcp:HOST:PORT`.
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(p) = url.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("empty unix: path".into());
            }
            return Ok(MigrationUrl::Unix(p.to_string()));
        }
        if let Some(a) = url.strip_prefix("tcp:") {
            if !a.contains(':') {
                return Err(format!("tcp: URL needs HOST:PORT, got {a:?}"));
            }
            return Ok(MigrationUrl::Tcp(a.to_string()));
        }
        Err(format!(
            "unsupported migration URL {url:?} (unix:PATH or tcp:HOST:PORT)"
        ))
    }

    /// Connect (sender).
    pub fn connect(&self) -> Result<Stream, String> {
        let s = match self {
            MigrationUrl::Unix(p) => {
                let s = UnixStream::connect(p).map_err(|e| format!("connecting to {p}: {e}"))?;
                s.set_read_timeout(Some(IO_TIMEOUT)).ok();
                s.set_write_timeout(Some(IO_TIMEOUT)).ok();
                Stream::Unix(s)
            }
            MigrationUrl::Tcp(a) => {
                let s = TcpStream::connect(a).map_err(|e| format!("connecting to {a}: {e}"))?;
                s.set_read_timeout(Some(IO_TIMEOUT)).ok();
                s.set_write_timeout(Some(IO_TIMEOUT)).ok();
                Stream::Tcp(s)
            }
        };
        Ok(s)
    }

    /// Listen, accept exactly one sender, stop listening (a second sender is refused).
    pub fn accept_one(&self) -> Result<Stream, String> {
        match self {
            MigrationUrl::Unix(p) => {
                let _ = std::fs::remove_file(p);
                let l = UnixListener::bind(p).map_err(|e| format!("binding {p}: {e}"))?;
                l.set_nonblocking(true).ok();
                let s = accept_before_deadline(|| l.accept().map(|(s, _)| s))?;
                drop(l);
                let _ = std::fs::remove_file(p);
                s.set_nonblocking(false).ok();
                s.set_read_timeout(Some(IO_TIMEOUT)).ok();
                s.set_write_timeout(Some(IO_TIMEOUT)).ok();
                Ok(Stream::Unix(s))
            }
            MigrationUrl::Tcp(a) => {
                let l = TcpListener::bind(a).map_err(|e| format!("binding {a}: {e}"))?;
                l.set_nonblocking(true).ok();
                let s = accept_before_deadline(|| l.accept().map(|(s, _)| s))?;
                drop(l);
                s.set_nonblocking(false).ok();
                s.set_read_timeout(Some(IO_TIMEOUT)).ok();
                s.set_write_timeout(Some(IO_TIMEOUT)).ok();
                Ok(Stream::Tcp(s))
            }
        }
    }
}

/// Poll a non-blocking `accept` until a sender connects or [`ACCEPT_TIMEOUT`] passes.
fn accept_before_deadline<S>(mut accept: impl FnMut() -> std::io::Result<S>) -> Result<S, String> {
    let deadline = std::time::Instant::now() + ACCEPT_TIMEOUT;
    loop {
        match accept() {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline {
                    return Err(format!("no sender connected within {ACCEPT_TIMEOUT:?}"));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
}

/// Send a request with a payload and wait for the response; an Error response becomes
/// `Err(reason)`.
pub fn request(s: &mut Stream, req: Request, payload: &[u8]) -> Result<(), String> {
    req.write_to(s).map_err(|e| e.to_string())?;
    s.write_all(payload)
        .map_err(|e| format!("sending {}: {e}", command_name(req.command())))?;
    s.flush().ok();
    let (r, length) = read_response(s)
        .map_err(|e| format!("no response to {}: {e}", command_name(req.command())))?;
    match r.status() {
        Status::Ok => Ok(()),
        Status::Error => {
            let n = length.min(MAX_REASON_LEN);
            let mut reason = vec![0u8; n as usize];
            s.read_exact(&mut reason).ok();
            Err(format!(
                "receiver refused {}: {}",
                command_name(req.command()),
                String::from_utf8_lossy(&reason)
            ))
        }
        Status::Invalid => Err(format!(
            "invalid response to {}",
            command_name(req.command())
        )),
    }
}

/// Read a response header and its `length` field (CH v38's `Response` keeps it private; this
/// VMM sends an error's reason as that many bytes after an `Error` header).
fn read_response(s: &mut Stream) -> Result<(Response, u64), String> {
    let mut b = [0u8; 16];
    s.read_exact(&mut b).map_err(|e| e.to_string())?;
    let r = Response::read_from(&mut &b[..]).map_err(|e| e.to_string())?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&b[8..16]);
    Ok((r, u64::from_ne_bytes(len)))
}

/// Reply Ok.
pub fn reply_ok(s: &mut Stream) -> Result<(), String> {
    Response::ok().write_to(s).map_err(|e| e.to_string())
}

/// Reply Error with a reason.
pub fn reply_error(s: &mut Stream, reason: &str) {
    let b = reason.as_bytes();
    let _ = Response::new(Status::Error, b.len() as u64).write_to(s);
    let _ = s.write_all(b);
}

/// Read a request's payload, refusing one longer than `max`.
pub fn read_payload(s: &mut Stream, req: &Request, max: u64) -> Result<Vec<u8>, String> {
    if req.length() > max {
        return Err(format!(
            "{} payload of {} bytes exceeds the {max}-byte bound",
            command_name(req.command()),
            req.length()
        ));
    }
    let mut buf = vec![0u8; req.length() as usize];
    s.read_exact(&mut buf)
        .map_err(|e| format!("reading {} payload: {e}", command_name(req.command())))?;
    Ok(buf)
}

/// The memory table a clockvmm sender sends: one range covering all of guest memory.
pub fn memory_table(size: u64) -> MemoryRangeTable {
    let mut t = MemoryRangeTable::default();
    t.push(MemoryRange {
        gpa: 0,
        length: size,
    });
    t
}

/// Serialize a Config payload.
pub fn config_payload(cfg: &VmConfig) -> Vec<u8> {
    serde_json::to_vec(cfg).unwrap_or_default()
}

/// The commands, for logs.
pub fn command_name(c: Command) -> &'static str {
    match c {
        Command::Invalid => "Invalid",
        Command::Start => "Start",
        Command::Config => "Config",
        Command::State => "State",
        Command::Memory => "Memory",
        Command::Complete => "Complete",
        Command::Abandon => "Abandon",
        Command::MemoryFd => "MemoryFd",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            MigrationUrl::parse("unix:/tmp/x").unwrap(),
            MigrationUrl::Unix("/tmp/x".into())
        );
        assert_eq!(
            MigrationUrl::parse("tcp:127.0.0.1:7").unwrap(),
            MigrationUrl::Tcp("127.0.0.1:7".into())
        );
        assert!(MigrationUrl::parse("tcp:nohost").is_err());
        assert!(MigrationUrl::parse("file:///x").is_err());
        assert!(MigrationUrl::parse("unix:").is_err());
    }
}

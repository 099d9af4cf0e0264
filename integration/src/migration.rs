//! Live migration over a UNIX socket or TCP, with Cloud Hypervisor's protocol shape
//! (vm-migration's `protocol`): Start → Config → Memory → State → Complete, or Abandon.
//!
//! The State payload is a [`MigrationState`]: the snapshot tree (child `"clock"` is the plugin's
//! framed section), the sender's last guest observation (so the receiver can measure the
//! guest-observed error), and a [`MigrationHint`]. It carries no restore policy: the receiver
//! owns it (its own API/CLI); a hint can only make the restore safer. An `Error` response may
//! carry a UTF-8 reason (a guest-clock extension; CH sends none), NUL-free and at most
//! [`MAX_REASON_LEN`] bytes.
//!
//! # Deadlines
//! Every request/response exchange is a phase with its own deadline, and the whole migration
//! has one ([`Deadlines`]); a peer trickling bytes cannot extend either (each read and write
//! waits at most until the nearer deadline).
//!
//! # The hand-over rule (never two running copies)
//! - The receiver restores the clocks at State but starts its vCPUs only when it receives
//!   Complete, before it answers Ok.
//! - Until the sender sends Complete, any failure makes it send Abandon (best effort) and resume
//!   its guest; the receiver, which never got Complete, discards its VM.
//! - Once the sender has sent Complete it never resumes by itself: Ok → it discards its VM;
//!   an Error answer (the receiver did not start) → it resumes; no answer (connection lost,
//!   deadline) → it cannot know whether the receiver runs the guest, so its VM stays paused
//!   ("migration outcome unknown") until an operator checks the destination and resumes it
//!   (`vm.resume`) or shuts it down.
//!
//! So in every failure at most one side runs the guest, and exactly one does except when
//! Complete itself is lost: then the paused source still holds the guest for the operator.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_migration::protocol::{Command, MemoryRange, MemoryRangeTable, Request, Response, Status};
use vm_migration::Snapshot;

use crate::vm::{GuestObservation, VmConfig};

/// How long a receiver waits for a sender to connect.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest Config payload accepted, bytes.
pub const MAX_CONFIG_LEN: u64 = 1 << 20;
/// The largest State payload accepted, bytes.
pub const MAX_STATE_LEN: u64 = 64 << 20;
/// The largest error reason sent or kept, bytes.
pub const MAX_REASON_LEN: u64 = 64 << 10;

/// Migration deadlines, configurable per migration (API body `deadlines`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Deadlines {
    /// One request and its response (a payload included), ms. Default 60 s.
    pub phase_ms: u64,
    /// The whole migration from connect/accept to the last response, ms. Default 300 s.
    pub total_ms: u64,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            phase_ms: 60_000,
            total_ms: 300_000,
        }
    }
}

/// What a sender may ask of the receiver's restore. Only requests that make it safer: the
/// receiver ORs them into its own policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MigrationHint {
    /// Signal the guest (PVCLOCK_GUEST_STOPPED, vmclock marker) even if the restore is exact.
    pub always_signal: bool,
}

/// The State payload.
#[derive(Clone, Serialize, Deserialize)]
pub struct MigrationState {
    /// The VM's snapshot tree (child "clock").
    pub snapshot: Snapshot,
    /// The sender's last guest observation before the pause.
    pub observation: GuestObservation,
    /// The sender's hint (fields an older sender sent, such as `restore_options`, are ignored).
    #[serde(default)]
    pub hint: MigrationHint,
}

/// A connected migration socket.
pub enum Socket {
    /// UNIX.
    Unix(UnixStream),
    /// TCP.
    Tcp(TcpStream),
}

impl Socket {
    fn set_timeouts(&self, t: Duration) {
        let t = Some(t.max(Duration::from_millis(1)));
        let _ = match self {
            Socket::Unix(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
            Socket::Tcp(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
        };
    }
}

/// A migration socket whose every read and write ends by the current phase's deadline and the
/// migration's.
pub struct Stream {
    sock: Socket,
    deadlines: Deadlines,
    total_end: Instant,
    phase_end: Instant,
    phase: &'static str,
}

impl Stream {
    fn new(sock: Socket, deadlines: Deadlines) -> Self {
        let now = Instant::now();
        let total_end = now + Duration::from_millis(deadlines.total_ms);
        Stream {
            sock,
            deadlines,
            total_end,
            phase_end: total_end.min(now + Duration::from_millis(deadlines.phase_ms)),
            phase: "connect",
        }
    }

    /// Start a phase (one request and its response): its deadline is `phase_ms` from now, never
    /// past the migration's.
    pub fn begin_phase(&mut self, phase: &'static str) {
        self.phase = phase;
        self.phase_end = self
            .total_end
            .min(Instant::now() + Duration::from_millis(self.deadlines.phase_ms));
    }

    fn arm(&mut self) -> std::io::Result<()> {
        let left = self.phase_end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.expired());
        }
        self.sock.set_timeouts(left);
        Ok(())
    }

    fn expired(&self) -> std::io::Error {
        let which = if self.phase_end >= self.total_end {
            format!("the migration's {} ms deadline", self.deadlines.total_ms)
        } else {
            format!("the {} ms phase deadline", self.deadlines.phase_ms)
        };
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{}: {which} passed", self.phase),
        )
    }

    fn map(&self, e: std::io::Error) -> std::io::Error {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) && Instant::now() + Duration::from_millis(5) >= self.phase_end
        {
            self.expired()
        } else {
            e
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm()?;
        let r = match &mut self.sock {
            Socket::Unix(s) => s.read(buf),
            Socket::Tcp(s) => s.read(buf),
        };
        r.map_err(|e| self.map(e))
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm()?;
        let r = match &mut self.sock {
            Socket::Unix(s) => s.write(buf),
            Socket::Tcp(s) => s.write(buf),
        };
        r.map_err(|e| self.map(e))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.sock {
            Socket::Unix(s) => s.flush(),
            Socket::Tcp(s) => s.flush(),
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

    /// Connect (sender); the migration's deadlines start now.
    pub fn connect(&self, deadlines: Deadlines) -> Result<Stream, String> {
        let sock = match self {
            MigrationUrl::Unix(p) => {
                Socket::Unix(UnixStream::connect(p).map_err(|e| format!("connecting to {p}: {e}"))?)
            }
            MigrationUrl::Tcp(a) => {
                let addr = std::net::ToSocketAddrs::to_socket_addrs(a.as_str())
                    .map_err(|e| format!("resolving {a}: {e}"))?
                    .next()
                    .ok_or_else(|| format!("{a}: no address"))?;
                let t = Duration::from_millis(deadlines.phase_ms.max(1));
                Socket::Tcp(
                    TcpStream::connect_timeout(&addr, t)
                        .map_err(|e| format!("connecting to {a}: {e}"))?,
                )
            }
        };
        Ok(Stream::new(sock, deadlines))
    }

    /// Listen, accept exactly one sender, stop listening (a second sender is refused). A UNIX
    /// path must be free or a stale socket ([`crate::sockets::bind`]); the socket is removed once
    /// the sender is accepted (or the wait ends). The migration's deadlines start at the accept.
    pub fn accept_one(&self, deadlines: Deadlines) -> Result<Stream, String> {
        match self {
            MigrationUrl::Unix(p) => {
                let bound = crate::sockets::bind(std::path::Path::new(p))?;
                let cleanup = bound.cleanup_guard();
                let l = bound.listener;
                l.set_nonblocking(true).ok();
                let s = accept_before_deadline(|| l.accept().map(|(s, _)| s));
                drop(l);
                cleanup.remove();
                let s = s?;
                s.set_nonblocking(false).ok();
                Ok(Stream::new(Socket::Unix(s), deadlines))
            }
            MigrationUrl::Tcp(a) => {
                let l = TcpListener::bind(a).map_err(|e| format!("binding {a}: {e}"))?;
                l.set_nonblocking(true).ok();
                let s = accept_before_deadline(|| l.accept().map(|(s, _)| s))?;
                drop(l);
                s.set_nonblocking(false).ok();
                Ok(Stream::new(Socket::Tcp(s), deadlines))
            }
        }
    }
}

/// Poll a non-blocking `accept` until a sender connects or [`ACCEPT_TIMEOUT`] passes.
fn accept_before_deadline<S>(mut accept: impl FnMut() -> std::io::Result<S>) -> Result<S, String> {
    let deadline = Instant::now() + ACCEPT_TIMEOUT;
    loop {
        match accept() {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(format!("no sender connected within {ACCEPT_TIMEOUT:?}"));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
}

/// Why a request failed, as the hand-over rule needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// The receiver answered Error (with its reason): it did not act on the request.
    Refused(String),
    /// No usable answer: the request may or may not have been acted on.
    NoAnswer(String),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Refused(m) | RequestError::NoAnswer(m) => f.write_str(m),
        }
    }
}

/// Send a request with a payload and wait for the response, within a new phase.
pub fn request(s: &mut Stream, req: Request, payload: &[u8]) -> Result<(), RequestError> {
    let name = command_name(req.command());
    s.begin_phase(name);
    let no_answer = |m: String| RequestError::NoAnswer(m);
    req.write_to(s)
        .map_err(|e| no_answer(format!("sending {name}: {e}")))?;
    s.write_all(payload)
        .map_err(|e| no_answer(format!("sending {name}: {e}")))?;
    s.flush().ok();
    let (r, length) =
        read_response(s).map_err(|e| no_answer(format!("no response to {name}: {e}")))?;
    match r.status() {
        Status::Ok => Ok(()),
        Status::Error => {
            let n = length.min(MAX_REASON_LEN);
            let mut reason = Vec::new();
            let _ = s.take(n).read_to_end(&mut reason);
            Err(RequestError::Refused(format!(
                "receiver refused {name}: {}",
                clean_reason(&String::from_utf8_lossy(&reason))
            )))
        }
        Status::Invalid => Err(no_answer(format!("invalid response to {name}"))),
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

/// A reason fit to send or show: control characters (NUL included) replaced by spaces, at
/// most [`MAX_REASON_LEN`] bytes (cut at a character boundary).
pub fn clean_reason(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len().min(MAX_REASON_LEN as usize));
    for c in reason.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_REASON_LEN as usize {
            break;
        }
        out.push(c);
    }
    out
}

/// Reply Error with a reason (cleaned and bounded, see [`clean_reason`]).
pub fn reply_error(s: &mut Stream, reason: &str) {
    let reason = clean_reason(reason);
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

    #[test]
    fn reasons_are_nul_free_and_bounded() {
        assert_eq!(clean_reason("a\0b\nc"), "a b c");
        let long = "é".repeat(MAX_REASON_LEN as usize);
        let c = clean_reason(&long);
        assert!(c.len() <= MAX_REASON_LEN as usize && c.len() >= MAX_REASON_LEN as usize - 1);
    }
}

//! A small HTTP/1.1 client over a UNIX socket, like ch-remote's.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// The largest response accepted, bytes.
pub const MAX_RESPONSE: u64 = 16 << 20;

/// Send `method /api/v1/<endpoint>` with an optional JSON body; returns (status, JSON).
pub fn call(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<(u16, Value), String> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("sending: {e}"))?;
    let mut buf = Vec::new();
    s.take(MAX_RESPONSE)
        .read_to_end(&mut buf)
        .map_err(|e| format!("reading the response: {e}"))?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let off = match resp.parse(&buf).map_err(|e| format!("bad response: {e}"))? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Err("truncated response".into()),
    };
    let code = resp.code.unwrap_or(0);
    let text = &buf[off..];
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(text).map_err(|e| format!("bad JSON in response: {e}"))?
    };
    Ok((code, v))
}

/// Like [`call`] with a 120 s timeout, but an error status becomes `Err` with the server's
/// `{"error": ...}` message.
pub fn call_ok(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&Value>,
) -> Result<Value, String> {
    let (code, v) = call(socket, method, endpoint, body, Duration::from_secs(120))?;
    if code >= 400 {
        let msg = v.get("error").and_then(Value::as_str).unwrap_or("error");
        return Err(format!("{endpoint}: {msg}"));
    }
    Ok(v)
}

/// Wait until the API socket answers `vm.info`.
pub fn wait_ready(socket: &Path, timeout: Duration) -> Result<(), String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if call(socket, "GET", "vm.info", None, Duration::from_secs(2)).is_ok() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "{} did not answer within {timeout:?}",
                socket.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

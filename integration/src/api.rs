//! The REST API on a UNIX socket, named like Cloud Hypervisor's: `/api/v1/vm.pause`,
//! `vm.resume`, `vm.info`, `vm.clock`, `vm.snapshot`, `vm.restore`, `vm.send-migration`,
//! `vm.receive-migration`, `vmm.shutdown`. Errors: HTTP 4xx/5xx with `{"error": "..."}`
//! ([`VmmError::status`]: 400 bad request, 404 no VM, 409 wrong state, 500 failure; the HTTP
//! layer adds 408 body too slow, 413 body too large).
//!
//! Served by hyper (HTTP/1.1) on a small tokio runtime: every connection is its own task, so a
//! client that stalls (headers or body) holds nothing but its own connection. The VMM is behind
//! one lock, taken only once a request is completely read; operations run one at a time (a
//! migration blocks other operations until it ends, like CH's VMM thread), reads never wait on a
//! stalled client. Bounds: headers within [`HEADER_TIMEOUT`], a declared `Content-Length` above
//! [`MAX_BODY`] refused before reading a byte, the body (any framing) cut at [`MAX_BODY`] and
//! read within [`BODY_TIMEOUT`], at most [`MAX_CONNECTIONS`] connections at once.
//!
//! Beside the API, a [`VmclockRefresher`] thread (when `--vmclock-refresh-ms` is not 0) keeps
//! the vmclock page current; it only ever tries the VMM's lock, so it never runs inside an
//! operation.
//!
//! The socket is created 0600, never over a live socket or a non-socket path
//! ([`crate::sockets::bind`]), and removed on `vmm.shutdown`, SIGTERM and SIGINT.

use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use guest_clock::restore::RestoreOptions;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use log::{debug, info, warn};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::VmmError;
use crate::migration::{Deadlines, MigrationHint};
use crate::refresher::VmclockRefresher;
use crate::vmm::Vmm;

/// The largest request body accepted, bytes.
pub const MAX_BODY: u64 = 1 << 20;
/// How long a client may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may take to send its request body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    destination_url: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreBody {
    source_url: String,
    /// This VMM's own restore policy (it is the receiver).
    #[serde(default)]
    restore_options: Option<RestoreOptions>,
}

/// The sender's request. It carries no restore policy: the receiver owns it; a sender may only
/// pass a [`MigrationHint`] that makes the restore safer.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    destination_url: String,
    #[serde(default)]
    downtime_ms: u64,
    #[serde(default)]
    hint: MigrationHint,
    #[serde(default)]
    deadlines: Deadlines,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiveBody {
    receiver_url: String,
    #[serde(default)]
    vcpus: Option<usize>,
    /// This receiver's restore policy (mode override, bounds, demo skew injection).
    #[serde(default)]
    restore_options: Option<RestoreOptions>,
    #[serde(default)]
    deadlines: Deadlines,
}

fn parse<T: for<'a> Deserialize<'a>>(body: &str) -> Result<T, VmmError> {
    serde_json::from_str(body).map_err(|e| VmmError::bad(format!("bad request body: {e}")))
}

/// Handle one request: (status, JSON body, shut down after replying).
pub fn handle(vmm: &mut Vmm, method: &str, path: &str, body: &str) -> (u16, Value, bool) {
    let route = path.strip_prefix("/api/v1/").unwrap_or("");
    let r: Result<Value, VmmError> = match (method, route) {
        ("PUT", "vm.pause") => vmm.pause().map(|_| json!({})),
        ("PUT", "vm.resume") => vmm.resume().map(|_| json!({})),
        ("GET", "vm.info") => Ok(vmm.info()),
        ("GET", "vm.clock") => vmm.clock(),
        ("PUT", "vm.snapshot") => parse::<SnapshotBody>(body).and_then(|b| {
            vmm.snapshot(&b.destination_url)
                .map(|d| json!({"snapshot": d}))
        }),
        ("PUT", "vm.restore") => parse::<RestoreBody>(body).and_then(|b| {
            vmm.restore(&b.source_url, b.restore_options)
                .map(|r| json!({"restore_report": r}))
        }),
        ("PUT", "vm.send-migration") => parse::<SendBody>(body).and_then(|b| {
            vmm.send_migration(&b.destination_url, b.downtime_ms, b.hint, b.deadlines)
                .map(|m| json!({"result": m}))
        }),
        ("PUT", "vm.receive-migration") => parse::<ReceiveBody>(body).and_then(|b| {
            vmm.receive_migration(&b.receiver_url, b.vcpus, b.restore_options, b.deadlines)
                .map(|m| json!({"result": m}))
        }),
        ("PUT", "vmm.shutdown") => {
            vmm.shutdown();
            return (200, json!({}), true);
        }
        (_, "") => return (404, json!({"error": format!("unknown path {path}")}), false),
        (m, r) => {
            return (
                405,
                json!({"error": format!("{m} {r}: no such endpoint")}),
                false,
            )
        }
    };
    match r {
        Ok(v) => (200, v, false),
        Err(e) => (e.status(), json!({"error": e.to_string()}), false),
    }
}

fn lock(m: &Mutex<Vmm>) -> MutexGuard<'_, Vmm> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn reply(code: u16, value: &Value, close: bool) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if close {
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

fn error(code: u16, msg: String) -> Response<Full<Bytes>> {
    warn!("API: {code} {msg}");
    // An error before the body was read leaves the connection in an unknown place: close it.
    reply(code, &json!({ "error": msg }), true)
}

/// Read a request's body within the bounds, then run it on the VMM (in the blocking pool, so the
/// runtime keeps serving other connections).
async fn serve_request(
    req: Request<Incoming>,
    vmm: Arc<Mutex<Vmm>>,
    shut_down: Arc<AtomicBool>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    if let Some(v) = req.headers().get(CONTENT_LENGTH) {
        match v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
            Some(n) if n > MAX_BODY => {
                return Ok(error(
                    413,
                    format!("request body of {n} bytes exceeds the {MAX_BODY}-byte bound"),
                ))
            }
            Some(_) => {}
            None => return Ok(error(400, "bad Content-Length".into())),
        }
    }
    let limited = Limited::new(req.into_body(), MAX_BODY as usize);
    let body = match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => {
            return Ok(error(
                408,
                format!("request body not received within {BODY_TIMEOUT:?}"),
            ))
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Ok(error(
                413,
                format!("request body exceeds the {MAX_BODY}-byte bound"),
            ))
        }
        Ok(Err(e)) => return Ok(error(400, format!("reading the body: {e}"))),
        Ok(Ok(c)) => c.to_bytes(),
    };
    let Ok(body) = String::from_utf8(body.to_vec()) else {
        return Ok(error(400, "request body is not UTF-8".into()));
    };
    let (m, p) = (method.clone(), path.clone());
    let done = tokio::task::spawn_blocking(move || handle(&mut lock(&vmm), &m, &p, &body)).await;
    let (code, value, shut) = done.unwrap_or_else(|e| {
        (
            500,
            json!({"error": format!("request handler failed: {e}")}),
            false,
        )
    });
    if code >= 400 {
        warn!("{method} {path}: {code} {value}");
    }
    if shut {
        // The accept loop stops once this connection has written the reply and closed.
        shut_down.store(true, Ordering::SeqCst);
    }
    Ok(reply(code, &value, shut))
}

/// Serve the API on `socket` until `vmm.shutdown`, SIGTERM or SIGINT; the socket is removed on
/// the way out.
pub fn serve(socket: &Path, vmm: Vmm) -> Result<(), String> {
    let bound = crate::sockets::bind(socket)?;
    let cleanup = bound.cleanup_guard();
    bound
        .listener
        .set_nonblocking(true)
        .map_err(|e| format!("API socket: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("API runtime: {e}"))?;
    let period = vmm.vmclock_refresh();
    let vmm = Arc::new(Mutex::new(vmm));
    let refresher = match period {
        Some(p) => Some(
            VmclockRefresher::spawn(Arc::downgrade(&vmm), p)
                .map_err(|e| format!("vmclock refresh thread: {e}"))?,
        ),
        None => None,
    };
    let r = rt.block_on(accept_loop(bound.listener, vmm.clone()));
    cleanup.remove();
    if let Some(t) = refresher {
        t.stop();
    }
    // A migration still holding the VMM must not keep the process alive.
    rt.shutdown_timeout(Duration::from_secs(1));
    if let Ok(mut v) = vmm.try_lock() {
        v.shutdown();
    }
    info!("API on {} closed", socket.display());
    r
}

async fn accept_loop(
    listener: std::os::unix::net::UnixListener,
    vmm: Arc<Mutex<Vmm>>,
) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let listener =
        tokio::net::UnixListener::from_std(listener).map_err(|e| format!("API socket: {e}"))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT: {e}"))?;
    let stop = Arc::new(tokio::sync::Notify::new());
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    info!("API serving");
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!("API accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stop.notified() => return Ok(()),
            _ = term.recv() => { info!("SIGTERM"); return Ok(()) }
            _ = int.recv() => { info!("SIGINT"); return Ok(()) }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            warn!("API: {MAX_CONNECTIONS} connections open, closing a new one");
            continue;
        };
        let (vmm, stop) = (vmm.clone(), stop.clone());
        tokio::spawn(async move {
            let shut_down = Arc::new(AtomicBool::new(false));
            let flag = shut_down.clone();
            let svc = hyper::service::service_fn(move |req| {
                serve_request(req, vmm.clone(), flag.clone())
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(64 << 10)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                debug!("API connection: {e}");
            }
            drop(permit);
            if shut_down.load(Ordering::SeqCst) {
                stop.notify_one();
            }
        });
    }
}

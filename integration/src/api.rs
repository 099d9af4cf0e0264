//! The REST API on a UNIX socket, named like Cloud Hypervisor's: `/api/v1/vm.pause`,
//! `vm.resume`, `vm.info`, `vm.clock`, `vm.snapshot`, `vm.restore`, `vm.send-migration`,
//! `vm.receive-migration`, `vmm.shutdown`. Requests are served one at a time (a migration
//! blocks the API until it ends, like CH's VMM thread). Errors: HTTP 4xx/5xx with
//! `{"error": "..."}`.

use std::io::Read;
use std::path::Path;

use guest_clock::restore::RestoreOptions;
use log::{info, warn};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::vmm::Vmm;

/// The largest request body accepted, bytes.
pub const MAX_BODY: u64 = 1 << 20;

#[derive(Deserialize)]
struct SnapshotBody {
    destination_url: String,
}

#[derive(Deserialize)]
struct RestoreBody {
    source_url: String,
    #[serde(default)]
    restore_options: Option<RestoreOptions>,
}

#[derive(Deserialize)]
struct SendBody {
    destination_url: String,
    #[serde(default)]
    downtime_ms: u64,
    #[serde(default)]
    restore_options: Option<RestoreOptions>,
}

#[derive(Deserialize)]
struct ReceiveBody {
    receiver_url: String,
    #[serde(default)]
    vcpus: Option<usize>,
}

fn parse<T: for<'a> Deserialize<'a>>(body: &str) -> Result<T, (u16, String)> {
    serde_json::from_str(body).map_err(|e| (400, format!("bad request body: {e}")))
}

/// Handle one request: (status, JSON body, shut down after replying).
pub fn handle(vmm: &mut Vmm, method: &str, url: &str, body: &str) -> (u16, Value, bool) {
    let route = url.strip_prefix("/api/v1/").unwrap_or("");
    let r: Result<Value, (u16, String)> = match (method, route) {
        ("PUT", "vm.pause") => vmm.pause().map(|_| json!({})).map_err(|e| (500, e)),
        ("PUT", "vm.resume") => vmm.resume().map(|_| json!({})).map_err(|e| (500, e)),
        ("GET", "vm.info") => Ok(vmm.info()),
        ("GET", "vm.clock") => vmm.clock().map_err(|e| (500, e)),
        ("PUT", "vm.snapshot") => parse::<SnapshotBody>(body).and_then(|b| {
            vmm.snapshot(&b.destination_url)
                .map(|d| json!({"snapshot": d}))
                .map_err(|e| (500, e))
        }),
        ("PUT", "vm.restore") => parse::<RestoreBody>(body).and_then(|b| {
            vmm.restore(&b.source_url, b.restore_options)
                .map(|r| json!({"restore_report": r}))
                .map_err(|e| (500, e))
        }),
        ("PUT", "vm.send-migration") => parse::<SendBody>(body).and_then(|b| {
            vmm.send_migration(&b.destination_url, b.downtime_ms, b.restore_options)
                .map(|m| json!({"result": m}))
                .map_err(|e| (500, e))
        }),
        ("PUT", "vm.receive-migration") => parse::<ReceiveBody>(body).and_then(|b| {
            vmm.receive_migration(&b.receiver_url, b.vcpus)
                .map(|m| json!({"result": m}))
                .map_err(|e| (500, e))
        }),
        ("PUT", "vmm.shutdown") => {
            vmm.shutdown();
            return (200, json!({}), true);
        }
        (_, "") => Err((404, format!("unknown path {url}"))),
        (m, r) => Err((405, format!("{m} {r}: no such endpoint"))),
    };
    match r {
        Ok(v) => (200, v, false),
        Err((code, e)) => (code, json!({"error": e}), false),
    }
}

/// Serve the API on `socket` until `vmm.shutdown`.
pub fn serve(socket: &Path, mut vmm: Vmm) -> Result<(), String> {
    let _ = std::fs::remove_file(socket);
    let server = tiny_http::Server::http_unix(socket)
        .map_err(|e| format!("API socket {}: {e}", socket.display()))?;
    info!("API on {}", socket.display());
    for mut req in server.incoming_requests() {
        let method = req.method().as_str().to_string();
        let url = req.url().to_string();
        let mut body = String::new();
        let read = req
            .as_reader()
            .take(MAX_BODY)
            .read_to_string(&mut body)
            .map_err(|e| e.to_string());
        let (code, value, stop) = match read {
            Ok(_) => handle(&mut vmm, &method, &url, &body),
            Err(e) => (
                400,
                json!({"error": format!("reading the body: {e}")}),
                false,
            ),
        };
        if code >= 400 {
            warn!("{method} {url}: {code} {value}");
        }
        let resp = tiny_http::Response::from_string(value.to_string())
            .with_status_code(code)
            .with_header(
                tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
                    .map_err(|_| "header".to_string())?,
            );
        let _ = req.respond(resp);
        if stop {
            break;
        }
    }
    let _ = std::fs::remove_file(socket);
    Ok(())
}

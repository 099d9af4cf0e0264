//! What the clockvmm end-to-end test suites share: a `clockvmm run` process killed when its guard
//! drops, a temporary directory removed likewise, and raw HTTP over the API socket (independent
//! of clockvmm's own client). Deadlines are generous: a 10x slower machine passes.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Proc {
    pub child: Child,
    pub socket: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

pub struct Dir(pub PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn tmp(tag: &str) -> Dir {
    let d = std::env::temp_dir().join(
        format!(
            "clockvmm-test-{tag}-{}-{:?}",
            std::process::id(),
            Instant::now()
        )
        .replace([' ', ':', '.'], "_"),
    );
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

/// The binary under test; `CLOCKVMM_BIN` runs these tests against another build (e.g. an older
/// main, to see them fail there).
pub fn clockvmm() -> Command {
    match std::env::var_os("CLOCKVMM_BIN") {
        Some(p) => Command::new(p),
        None => Command::new(env!("CARGO_BIN_EXE_clockvmm")),
    }
}

pub fn spawn(socket: &Path, args: &[&str]) -> Proc {
    let child = clockvmm()
        .arg("run")
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let p = Proc {
        child,
        socket: socket.to_path_buf(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while api(&p, "GET", "vm.info", None).is_err() {
        assert!(Instant::now() < deadline, "VMM did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

/// Raw HTTP over the UNIX socket: (status, JSON).
pub fn call(
    socket: &Path,
    method: &str,
    ep: &str,
    body: Option<Value>,
    t: Duration,
) -> Result<(u16, Value), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(t)).unwrap();
    let b = body.map(|b| b.to_string()).unwrap_or_default();
    write!(s, "{method} /api/v1/{ep} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}", b.len())
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let (head, body) = out.split_once("\r\n\r\n").ok_or("no body")?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .ok_or("no status")?
        .parse()
        .map_err(|_| "status")?;
    let v: Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    Ok((code, v))
}

pub fn api_at(socket: &Path, method: &str, ep: &str, body: Option<Value>) -> Result<Value, String> {
    let (code, v) = call(socket, method, ep, body, Duration::from_secs(120))?;
    if code >= 400 {
        return Err(format!("{code} {}", v["error"].as_str().unwrap_or("error")));
    }
    Ok(v)
}

pub fn api(p: &Proc, method: &str, ep: &str, body: Option<Value>) -> Result<Value, String> {
    api_at(&p.socket, method, ep, body)
}

/// Guest samples taken so far, over all vCPUs (the tiny guest's loop count).
pub fn samples(p: &Proc) -> u64 {
    let c = api(p, "GET", "vm.clock", None).unwrap();
    c["observation"]["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["samples"].as_u64().unwrap())
        .sum()
}

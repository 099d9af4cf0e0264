//! Hostile and clumsy clients, issue 14: real `clockvmm` processes, loopback UNIX sockets only.
//! Every case is listed in docs/RELIABILITY.md. Deadlines are generous (a 10x slower machine
//! passes); the tests assert behaviour, never timing.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::*;

fn state(p: &Proc) -> String {
    api(p, "GET", "vm.info", None).unwrap()["state"]
        .as_str()
        .unwrap()
        .to_string()
}

fn has_vm(p: &Proc) -> bool {
    !api(p, "GET", "vm.info", None).unwrap()["backend"].is_null()
}

fn is_model(p: &Proc) -> bool {
    api(p, "GET", "vm.info", None).unwrap()["backend"]
        .as_str()
        .is_some_and(|b| b.starts_with("MODEL"))
}

/// Whether the guest of `p` makes progress (on the model, whose samples are computed on demand,
/// the VMM's state says it).
fn guest_runs(p: &Proc) -> bool {
    if !has_vm(p) || state(p) != "running" {
        return false;
    }
    if is_model(p) {
        return true;
    }
    let s1 = samples(p);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        if samples(p) > s1 {
            return true;
        }
    }
    false
}

fn wait_exists(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Connect to a receiver's migration socket. Its path appears at bind(), a moment before
/// listen(): a connect in between is refused, a window a slow (nested TCG) machine widens, so a
/// refusal is retried until a 60 s deadline.
fn connect_listening(p: &Path) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match UnixStream::connect(p) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5))
            }
            r => return r,
        }
    }
}

fn start_receiver(b: &Proc, path: &Path, extra: Value) -> JoinHandle<Result<Value, String>> {
    let sock = b.socket.clone();
    let mut body = json!({"receiver_url": format!("unix:{}", path.display())});
    if let (Some(o), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    let h = std::thread::spawn(move || api_at(&sock, "PUT", "vm.receive-migration", Some(body)));
    wait_exists(path);
    h
}

// ---------------------------------------------------------------------------------------------
// A migration proxy between a real sender and a real receiver, cutting at a chosen point.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Forward Complete, drop the receiver's answer, close both sides.
    DropCompleteOk,
    /// Drop Complete, close both sides.
    DropComplete,
    /// Add a `restore_options` field to the State payload (what an old or hostile sender sends).
    InjectPolicy,
}

fn read_n(s: &mut UnixStream, n: usize) -> Option<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).ok()?;
    Some(b)
}

fn header(cmd: u16, len: u64) -> Vec<u8> {
    let mut h = vec![0u8; 16];
    h[0..2].copy_from_slice(&cmd.to_le_bytes());
    h[8..16].copy_from_slice(&len.to_le_bytes());
    h
}

fn proxy(listen: &Path, upstream: PathBuf, cut: Cut) -> JoinHandle<()> {
    let l = UnixListener::bind(listen).unwrap();
    std::thread::spawn(move || {
        let Ok((mut a, _)) = l.accept() else { return };
        let Ok(mut b) = connect_listening(&upstream) else {
            return;
        };
        loop {
            let Some(h) = read_n(&mut a, 16) else { return };
            let cmd = u16::from_le_bytes([h[0], h[1]]);
            let len = u64::from_le_bytes(h[8..16].try_into().unwrap());
            let Some(mut payload) = read_n(&mut a, len as usize) else {
                return;
            };
            if cmd == 4 {
                // Memory: the range table, then the bytes of its ranges.
                let total: u64 = payload
                    .chunks(16)
                    .map(|r| u64::from_le_bytes(r[8..16].try_into().unwrap()))
                    .sum();
                let Some(mem) = read_n(&mut a, total as usize) else {
                    return;
                };
                payload.extend_from_slice(&mem);
            }
            let mut h = h;
            if cmd == 3 && cut == Cut::InjectPolicy {
                let mut v: Value = serde_json::from_slice(&payload).unwrap();
                v["restore_options"] = json!({
                    "mode": "live-update",
                    "inject_wallclock_skew_ns": 3_600_000_000_000i64,
                    "max_age_ns": u64::MAX,
                });
                payload = serde_json::to_vec(&v).unwrap();
                h = header(3, payload.len() as u64);
            }
            if cmd == 5 && cut == Cut::DropComplete {
                return;
            }
            if b.write_all(&h).and_then(|_| b.write_all(&payload)).is_err() {
                return;
            }
            let Some(r) = read_n(&mut b, 16) else { return };
            let rlen = u64::from_le_bytes(r[8..16].try_into().unwrap());
            let reason = if u16::from_le_bytes([r[0], r[1]]) == 2 {
                read_n(&mut b, rlen as usize).unwrap_or_default()
            } else {
                Vec::new()
            };
            if cmd == 5 && cut == Cut::DropCompleteOk {
                return;
            }
            if a.write_all(&r).and_then(|_| a.write_all(&reason)).is_err() {
                return;
            }
            if cmd == 5 || cmd == 6 {
                return;
            }
        }
    })
}

/// A sender in the test: Start, Config (2 vCPUs, 2 MiB), Memory (zeros), then `last` (e.g.
/// Complete without State). Returns the status of each answer.
fn fake_sender(path: &Path, last: u16) -> Vec<u16> {
    let mut s = connect_listening(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut statuses = Vec::new();
    let send = |s: &mut UnixStream, cmd: u16, len: u64, payload: &[u8]| -> Option<u16> {
        s.write_all(&header(cmd, len)).ok()?;
        s.write_all(payload).ok()?;
        let r = read_n(s, 16)?;
        let st = u16::from_le_bytes([r[0], r[1]]);
        let rlen = u64::from_le_bytes(r[8..16].try_into().unwrap());
        if st == 2 {
            read_n(s, rlen as usize)?;
        }
        Some(st)
    };
    let cfg = br#"{"vcpus":2,"memory_mib":2,"force_model":false}"#;
    let mut mem = Vec::new();
    mem.extend_from_slice(&0u64.to_le_bytes());
    mem.extend_from_slice(&(2u64 << 20).to_le_bytes());
    mem.extend(std::iter::repeat_n(0u8, 2 << 20));
    for (cmd, len, p) in [
        (1u16, 0u64, &[][..]),
        (2, cfg.len() as u64, &cfg[..]),
        (4, 16, &mem[..]),
        (last, 0, &[][..]),
    ] {
        match send(&mut s, cmd, len, p) {
            Some(st) => {
                statuses.push(st);
                if st != 1 {
                    break;
                }
            }
            None => break,
        }
    }
    statuses
}

// ---------------------------------------------------------------------------------------------
// API

/// `Content-Length: 2⁶⁴−1` (and 32 GiB, 1 TiB) with a 1-byte body and a half-close: refused,
/// the VMM and its guest live on.
#[test]
fn absurd_content_length_is_refused_and_the_vmm_survives() {
    let d = tmp("cl");
    let mut a = spawn(&d.0.join("a.sock"), &[]);
    for len in [
        "18446744073709551615",
        "34359738368",
        "1099511627776",
        "99999999999999999999999",
    ] {
        let mut s = UnixStream::connect(&a.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(
            s,
            "PUT /api/v1/vm.snapshot HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\nx"
        )
        .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        if let Some(code) = out.split_whitespace().nth(1) {
            assert!(code.starts_with('4'), "{len}: {out}");
        }
        assert!(a.alive(), "the VMM died on Content-Length {len}");
    }
    assert!(guest_runs(&a), "the guest lives on");
}

/// A client that declares 2000 body bytes and sends one holds only its own connection: other
/// clients are served meanwhile.
#[test]
fn a_stalled_client_does_not_block_other_clients() {
    let d = tmp("stall");
    let a = spawn(&d.0.join("a.sock"), &[]);
    let mut stalled = UnixStream::connect(&a.socket).unwrap();
    write!(
        stalled,
        "PUT /api/v1/vm.pause HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\nx"
    )
    .unwrap();
    let mut half = UnixStream::connect(&a.socket).unwrap();
    write!(half, "GET /api/v1/vm.in").unwrap(); // headers never finished
    std::thread::sleep(Duration::from_millis(200));
    let t = Duration::from_secs(20);
    let (code, v) =
        call(&a.socket, "GET", "vm.info", None, t).expect("served while another client stalls");
    assert_eq!(code, 200, "{v}");
    let (code, _) = call(&a.socket, "PUT", "vm.pause", None, t).unwrap();
    assert_eq!(code, 200);
    let (code, _) = call(&a.socket, "PUT", "vm.resume", None, t).unwrap();
    assert_eq!(code, 200);
    drop((stalled, half));
}

/// Typed errors map to statuses: 400 bad body, 404 no VM, 409 wrong state, unknown fields
/// refused.
#[test]
fn errors_map_to_http_statuses() {
    let d = tmp("status");
    let a = spawn(&d.0.join("a.sock"), &[]);
    let b = spawn(&d.0.join("b.sock"), &["--no-vm"]);
    let t = Duration::from_secs(60);
    let c = |p: &Proc, m, ep, body| call(&p.socket, m, ep, body, t).unwrap().0;
    assert_eq!(c(&a, "PUT", "vm.snapshot", Some(json!({"nope": 1}))), 400);
    assert_eq!(c(&b, "PUT", "vm.pause", None), 404);
    assert_eq!(c(&b, "GET", "vm.clock", None), 404);
    let snap = format!("file://{}", d.0.join("s").display());
    assert_eq!(
        c(&a, "PUT", "vm.restore", Some(json!({"source_url": snap}))),
        409
    );
    assert_eq!(
        c(
            &a,
            "PUT",
            "vm.receive-migration",
            Some(json!({"receiver_url": "unix:/nonexistent/x"}))
        ),
        409
    );
    assert_eq!(
        c(&b, "PUT", "vm.restore", Some(json!({"source_url": snap}))),
        400
    );
}

/// The API socket: 0600; a second VMM on a live socket or on a non-socket path refuses to
/// start (the first keeps serving, the file is intact); a stale socket is replaced; the socket
/// is removed on vmm.shutdown and on SIGTERM.
#[test]
fn api_socket_is_private_exclusive_and_cleaned_up() {
    let d = tmp("sock");
    let path = d.0.join("a.sock");
    let a = spawn(&path, &[]);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let st = clockvmm()
        .args(["run", "--no-vm", "--api-socket"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!st.success(), "a second VMM took over a live socket");
    assert!(guest_runs(&a), "the first VMM still serves");
    let file = d.0.join("precious");
    std::fs::write(&file, b"keep me").unwrap();
    let st = clockvmm()
        .args(["run", "--no-vm", "--api-socket"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!st.success());
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"keep me",
        "the file is intact"
    );
    api(&a, "PUT", "vmm.shutdown", None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while path.exists() {
        assert!(Instant::now() < deadline, "socket not removed at shutdown");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(a);
    // A stale socket (nobody listens) is replaced; SIGTERM removes the socket.
    drop(UnixListener::bind(&path).unwrap());
    let mut b = spawn(&path, &["--no-vm"]);
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(b.child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while b.alive() {
        assert!(Instant::now() < deadline, "SIGTERM did not stop the VMM");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!path.exists(), "socket not removed on SIGTERM");
}

/// `receive-migration unix:PATH` never deletes what is at PATH unless it is a stale socket.
#[test]
fn receive_migration_keeps_what_is_at_its_path() {
    let d = tmp("rxpath");
    let b = spawn(&d.0.join("b.sock"), &["--no-vm"]);
    let file = d.0.join("m.sock");
    std::fs::write(&file, b"not a socket").unwrap();
    let e = api(
        &b,
        "PUT",
        "vm.receive-migration",
        Some(json!({"receiver_url": format!("unix:{}", file.display())})),
    )
    .unwrap_err();
    assert!(e.contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");
    // A live socket of someone else's: refused, left alone.
    let live = d.0.join("live.sock");
    let _l = UnixListener::bind(&live).unwrap();
    let e = api(
        &b,
        "PUT",
        "vm.receive-migration",
        Some(json!({"receiver_url": format!("unix:{}", live.display())})),
    )
    .unwrap_err();
    assert!(e.contains("another process"), "{e}");
    assert!(live.exists());
}

// ---------------------------------------------------------------------------------------------
// Receiver policy

/// The sender cannot choose the receiver's restore: restore options in the send request are
/// refused (400); a State payload carrying `restore_options` (mode, skew 1 h, bounds) has them
/// ignored: the guest is not an hour off.
#[test]
fn the_sender_cannot_set_the_receivers_restore_policy() {
    let d = tmp("policy");
    let a = spawn(&d.0.join("a.sock"), &[]);
    let e = api(
        &a,
        "PUT",
        "vm.send-migration",
        Some(
            json!({"destination_url": "unix:/nonexistent", "restore_options":
            {"mode": "live-update", "inject_wallclock_skew_ns": 3_600_000_000_000i64}}),
        ),
    )
    .unwrap_err();
    assert!(e.starts_with("400") && e.contains("restore_options"), "{e}");
    assert_eq!(state(&a), "running");
    let b = spawn(&d.0.join("b.sock"), &["--no-vm"]);
    let rx = d.0.join("rx.sock");
    let recv = start_receiver(&b, &rx, json!({}));
    let px = d.0.join("px.sock");
    let p = proxy(&px, rx, Cut::InjectPolicy);
    api(
        &a,
        "PUT",
        "vm.send-migration",
        Some(json!({"destination_url": format!("unix:{}", px.display())})),
    )
    .unwrap();
    recv.join().unwrap().unwrap();
    p.join().unwrap();
    let c = api(&b, "GET", "vm.clock", None).unwrap();
    for e in c["observed_errors"].as_array().unwrap() {
        let err = e["kvmclock_error_ns"].as_i64().unwrap();
        assert!(
            err.unsigned_abs() < 60_000_000_000,
            "the sender's 1 h skew was applied: {c}"
        );
    }
    assert_eq!(
        c["restore_report"]["mode_auto"], true,
        "the sender forced the mode: {c}"
    );
}

// ---------------------------------------------------------------------------------------------
// Hand-over: exactly one running guest

/// The receiver's Ok to Complete is lost: the receiver runs the guest, the source stays paused
/// ("migration outcome unknown") instead of resuming a second copy.
#[test]
fn a_lost_ok_to_complete_leaves_one_running_guest() {
    let d = tmp("lostok");
    let a = spawn(&d.0.join("a.sock"), &[]);
    let b = spawn(&d.0.join("b.sock"), &["--no-vm"]);
    let rx = d.0.join("rx.sock");
    let recv = start_receiver(&b, &rx, json!({}));
    let px = d.0.join("px.sock");
    let p = proxy(&px, rx, Cut::DropCompleteOk);
    let e = api(
        &a,
        "PUT",
        "vm.send-migration",
        Some(json!({"destination_url": format!("unix:{}", px.display())})),
    )
    .unwrap_err();
    p.join().unwrap();
    assert!(e.contains("outcome unknown"), "{e}");
    recv.join().unwrap().unwrap();
    assert!(guest_runs(&b), "the receiver runs the guest");
    assert_eq!(state(&a), "migration-outcome-unknown");
    assert!(!guest_runs(&a), "the source must not run a second copy");
    if !is_model(&a) {
        let s1 = samples(&a);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(samples(&a), s1, "the source guest stays paused");
    }
}

/// Complete is lost: the receiver (which never got it) discards its VM and forgets the attempt;
/// the source keeps the guest paused, and the operator's resume brings it back. A second sender
/// that skips State is then refused instead of getting "migration received".
#[test]
fn a_lost_complete_keeps_the_guest_on_the_source_and_resets_the_receiver() {
    let d = tmp("lostcomplete");
    let a = spawn(&d.0.join("a.sock"), &[]);
    let b = spawn(&d.0.join("b.sock"), &["--no-vm"]);
    let rx = d.0.join("rx.sock");
    let recv = start_receiver(&b, &rx, json!({}));
    let px = d.0.join("px.sock");
    let p = proxy(&px, rx.clone(), Cut::DropComplete);
    let e = api(
        &a,
        "PUT",
        "vm.send-migration",
        Some(json!({"destination_url": format!("unix:{}", px.display())})),
    )
    .unwrap_err();
    p.join().unwrap();
    assert!(e.contains("outcome unknown"), "{e}");
    assert!(
        recv.join().unwrap().is_err(),
        "the receiver did not complete"
    );
    assert!(!has_vm(&b), "the receiver discarded its VM");
    assert!(!guest_runs(&a), "nothing resumed by itself");
    api(&a, "PUT", "vm.resume", None).unwrap();
    assert!(
        guest_runs(&a),
        "the operator's resume brings the guest back"
    );
    // Second attempt on the same receiver: Start, Config, Memory, Complete (no State).
    let recv = start_receiver(&b, &rx, json!({}));
    let statuses = fake_sender(&rx, 5);
    let r = recv.join().unwrap();
    assert!(r.is_err(), "a receive without State succeeded: {r:?}");
    assert_eq!(
        statuses.last(),
        Some(&2),
        "Complete before State is refused: {statuses:?}"
    );
    assert!(!has_vm(&b));
}

// ---------------------------------------------------------------------------------------------
// Deadlines and reasons

/// A fake receiver that accepts and trickles its answer to Start one byte at a time.
fn trickling_receiver(path: &Path) -> JoinHandle<()> {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = l.accept() else { return };
        let _ = read_n(&mut s, 16);
        let mut ok = [0u8; 16];
        ok[0] = 1;
        for b in ok {
            if s.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1000));
        }
    })
}

/// A peer trickling bytes cannot stretch a phase or the migration past its deadline: the
/// sender gives up with a deadline error and its guest keeps running; a receiver facing a
/// trickling sender gives up too, and is ready for the next sender.
#[test]
fn trickling_peers_hit_the_deadlines() {
    let d = tmp("trickle");
    let a = spawn(&d.0.join("a.sock"), &[]);
    for (deadlines, what) in [
        (
            json!({"phase_ms": 3000, "total_ms": 600_000}),
            "phase deadline",
        ),
        (
            json!({"phase_ms": 600_000, "total_ms": 3000}),
            "migration's 3000 ms deadline",
        ),
    ] {
        let m = d.0.join(format!("m{}.sock", what.len()));
        let fake = trickling_receiver(&m);
        let e = api(
            &a,
            "PUT",
            "vm.send-migration",
            Some(
                json!({"destination_url": format!("unix:{}", m.display()), "deadlines": deadlines}),
            ),
        )
        .unwrap_err();
        assert!(e.contains(what), "{e}");
        assert!(guest_runs(&a), "the source runs after the failed send");
        fake.join().unwrap();
    }
    // Receiver side: a sender that sends one byte of its Start header per second.
    let b = spawn(&d.0.join("b.sock"), &["--no-vm"]);
    let rx = d.0.join("rx.sock");
    let recv = start_receiver(
        &b,
        &rx,
        json!({"deadlines": {"phase_ms": 3000, "total_ms": 600_000}}),
    );
    let mut s = connect_listening(&rx).unwrap();
    let trickle = std::thread::spawn(move || {
        for b in header(1, 0) {
            if s.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1000));
        }
    });
    let e = recv.join().unwrap().unwrap_err();
    assert!(e.contains("deadline"), "{e}");
    trickle.join().unwrap();
    assert!(!has_vm(&b));
}

/// A receiver's refusal reason with NULs and 1 MiB long reaches the sender's caller NUL-free and
/// at most 64 KiB long; the source keeps running.
#[test]
fn refusal_reasons_are_nul_free_and_bounded() {
    let d = tmp("reason");
    let a = spawn(&d.0.join("a.sock"), &[]);
    let m = d.0.join("m.sock");
    let l = UnixListener::bind(&m).unwrap();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let _ = read_n(&mut s, 16);
        let reason: Vec<u8> = b"bad\0".iter().copied().cycle().take(1 << 20).collect();
        let _ = s.write_all(&header(2, reason.len() as u64));
        let _ = s.write_all(&reason);
    });
    let e = api(
        &a,
        "PUT",
        "vm.send-migration",
        Some(json!({"destination_url": format!("unix:{}", m.display())})),
    )
    .unwrap_err();
    fake.join().unwrap();
    assert!(!e.contains('\0'), "NUL in the reason");
    assert!(e.contains("bad"), "{}", &e[..e.len().min(200)]);
    assert!(e.len() <= (64 << 10) + 200, "reason of {} bytes", e.len());
    assert!(guest_runs(&a));
}

// ---------------------------------------------------------------------------------------------
// Snapshot files

fn snapshot(p: &Proc, dir: &Path) {
    api(
        p,
        "PUT",
        "vm.snapshot",
        Some(json!({"destination_url": format!("file://{}", dir.display())})),
    )
    .unwrap();
}

fn restore_err(b: &Proc, dir: &Path) -> String {
    let e = api(
        b,
        "PUT",
        "vm.restore",
        Some(json!({"source_url": format!("file://{}", dir.display())})),
    )
    .unwrap_err();
    assert!(!has_vm(b), "a VM exists after a refused restore ({e})");
    e
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["state.json", "memory.bin"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// Snapshot directories: symlinks refused on restore and on write, FIFOs and devices refused
/// without hanging, a missing or short memory file refused before any VM exists.
#[test]
fn snapshot_files_are_opened_safely() {
    let d = tmp("files");
    let a = spawn(&d.0.join("a.sock"), &[]);
    let good = d.0.join("good");
    snapshot(&a, &good);
    let b = spawn(&d.0.join("b.sock"), &["--no-vm"]);
    // memory.bin is a symlink to a private file elsewhere.
    let s1 = d.0.join("s1");
    copy_dir(&good, &s1);
    let secret = d.0.join("secret");
    std::fs::copy(good.join("memory.bin"), &secret).unwrap();
    std::fs::remove_file(s1.join("memory.bin")).unwrap();
    std::os::unix::fs::symlink(&secret, s1.join("memory.bin")).unwrap();
    assert!(restore_err(&b, &s1).contains("symlink"));
    // state.json is a symlink.
    let s2 = d.0.join("s2");
    copy_dir(&good, &s2);
    std::fs::rename(s2.join("state.json"), d.0.join("st.json")).unwrap();
    std::os::unix::fs::symlink(d.0.join("st.json"), s2.join("state.json")).unwrap();
    assert!(restore_err(&b, &s2).contains("symlink"));
    // state.json is a FIFO, or /dev/zero.
    let s3 = d.0.join("s3");
    copy_dir(&good, &s3);
    std::fs::remove_file(s3.join("state.json")).unwrap();
    let c = std::ffi::CString::new(s3.join("state.json").to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    assert!(restore_err(&b, &s3).contains("not a regular file"));
    std::fs::remove_file(s3.join("state.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", s3.join("state.json")).unwrap();
    assert!(restore_err(&b, &s3).contains("symlink"));
    // memory.bin missing, or short.
    let s4 = d.0.join("s4");
    copy_dir(&good, &s4);
    std::fs::remove_file(s4.join("memory.bin")).unwrap();
    assert!(restore_err(&b, &s4).contains("before creating the VM"));
    std::fs::write(s4.join("memory.bin"), [0u8; 4096]).unwrap();
    assert!(restore_err(&b, &s4).contains("before creating the VM"));
    assert!(!has_vm(&b));
    // The snapshot's own writes refuse a symlink planted in the target directory.
    let victim = d.0.join("victim");
    std::fs::write(&victim, b"victim").unwrap();
    let s5 = d.0.join("s5");
    std::fs::create_dir_all(&s5).unwrap();
    std::os::unix::fs::symlink(&victim, s5.join("memory.bin")).unwrap();
    let e = api(
        &a,
        "PUT",
        "vm.snapshot",
        Some(json!({"destination_url": format!("file://{}", s5.display())})),
    )
    .unwrap_err();
    assert!(e.contains("not a regular file"), "{e}");
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"victim",
        "the symlink target is intact"
    );
    // The intact snapshot still restores.
    api(
        &b,
        "PUT",
        "vm.restore",
        Some(json!({"source_url": format!("file://{}", good.display())})),
    )
    .unwrap();
}

/// `clockvmm inspect` reads bounded input: /dev/zero and a FIFO are refused, not waited on.
#[test]
fn inspect_reads_bounded_input() {
    let d = tmp("inspect");
    let fifo = d.0.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for p in [Path::new("/dev/zero"), fifo.as_path()] {
        let mut child = clockvmm()
            .arg("inspect")
            .arg(p)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("inspect {} hangs", p.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!st.success(), "inspect {} succeeded", p.display());
    }
}

// ---------------------------------------------------------------------------------------------
// VM identity

/// A clock section taken from another VM's snapshot is refused naming `vm_id` (no VM created);
/// asked explicitly, the receiver restores it as a signalled migration instead.
#[test]
fn another_vms_clock_section_is_refused() {
    let d = tmp("identity");
    let a = spawn(&d.0.join("a.sock"), &[]);
    let c = spawn(&d.0.join("c.sock"), &[]);
    let (sa, sc) = (d.0.join("sa"), d.0.join("sc"));
    snapshot(&a, &sa);
    snapshot(&c, &sc);
    let read = |p: &Path| -> Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let mut va = read(&sa.join("state.json"));
    let vc = read(&sc.join("state.json"));
    assert_ne!(
        va["config"]["vm_id"], vc["config"]["vm_id"],
        "each VM has its own id"
    );
    va["snapshot"]["snapshots"]["clock"] = vc["snapshot"]["snapshots"]["clock"].clone();
    std::fs::write(sa.join("state.json"), serde_json::to_vec(&va).unwrap()).unwrap();
    let b = spawn(&d.0.join("b.sock"), &["--no-vm"]);
    let e = restore_err(&b, &sa);
    assert!(e.contains("vm_id"), "{e}");
    let r = api(
        &b,
        "PUT",
        "vm.restore",
        Some(json!({"source_url": format!("file://{}", sa.display()),
                    "restore_options": {"on_vm_id_mismatch": "restore-as-migration"}})),
    )
    .unwrap();
    let rep = &r["restore_report"];
    assert_eq!(rep["mode"], "live-migration", "{r}");
    assert!(
        !rep["signalled"]["guest_stopped_vcpus"]
            .as_array()
            .unwrap()
            .is_empty()
            || is_model(&b),
        "{r}"
    );
    // inspect names the VM.
    let out = clockvmm().arg("inspect").arg(&sc).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("VM id"));
}

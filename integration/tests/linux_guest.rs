//! A real Linux guest under clockvmm: boots Debian's stock kernel (`GC_LINUX_KERNEL`, a bzImage)
//! with the built-in probe initramfs, reads the guest's own clocks through `vm.clock`, pauses
//! and resumes it (vCPUs kicked out of KVM_RUN), and checks that the guest did not complain.
//!
//! Runs in the nested kvm_amd lane (`integration/nested/lane`, which passes the kernel). On
//! kvm_pvm, or without a kernel, the boot tests print why and skip; the refusal on kvm_pvm is
//! tested there instead.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Proc(Child, PathBuf);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn flavour() -> String {
    for m in ["kvm_pvm", "kvm_amd", "kvm_intel"] {
        if Path::new("/sys/module").join(m).exists() {
            return m.into();
        }
    }
    "none".into()
}

fn kernel() -> Result<PathBuf, String> {
    let k = std::env::var_os("GC_LINUX_KERNEL")
        .map(PathBuf::from)
        .ok_or("GC_LINUX_KERNEL (a bzImage) is not set: the nested lane sets it")?;
    if !k.is_file() {
        return Err(format!("GC_LINUX_KERNEL={} is no file", k.display()));
    }
    match flavour().as_str() {
        "kvm_pvm" => Err("this /dev/kvm is kvm_pvm: a stock Linux kernel cannot run there".into()),
        "none" => Err("no /dev/kvm".into()),
        _ => Ok(k),
    }
}

fn api(socket: &Path, method: &str, ep: &str) -> Result<Value, String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(s, "{method} /api/v1/{ep} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let (head, body) = out.split_once("\r\n\r\n").ok_or("no body")?;
    let v: Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    if head.split_whitespace().nth(1).unwrap_or("500") >= "400" {
        return Err(v.to_string());
    }
    Ok(v)
}

fn boot(k: &Path, extra: &[&str]) -> (Proc, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "clockvmm-linux-{}-{}",
        std::process::id(),
        extra.len()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let serial = dir.join("serial.log");
    let child = Command::new(env!("CARGO_BIN_EXE_clockvmm"))
        .args(["run", "--vcpus", "2", "--memory-mib", "256", "--api-socket"])
        .arg(&sock)
        .arg("--kernel")
        .arg(k)
        .arg("--serial")
        .arg(&serial)
        .args(["--cmdline", "gcprobe_period_ms=300"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    (Proc(child, dir), sock, serial)
}

/// Wait (guest time is ~10× slower nested) until every vCPU reported `n` samples.
fn wait_samples(sock: &Path, serial: &Path, min_seq: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(c) = api(sock, "GET", "vm.clock") {
            let latest = c["observation"]["linux"]["latest"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if latest.len() == 2
                && latest
                    .iter()
                    .all(|s| s["seq"].as_u64().unwrap_or(0) >= min_seq)
            {
                return c;
            }
            if let Some(why) = c["observation"]["linux"]["stopped"].as_str() {
                panic!(
                    "the guest stopped: {why}\n{}",
                    std::fs::read_to_string(serial).unwrap_or_default()
                );
            }
        }
        assert!(
            Instant::now() < deadline,
            "no probe samples; console:\n{}",
            std::fs::read_to_string(serial).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn linux_boots_runs_the_probe_and_survives_pause_resume() {
    let k = match kernel() {
        Ok(k) => k,
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    let (_p, sock, serial) = boot(&k, &[]);
    let c = wait_samples(&sock, &serial, 2);
    let linux = &c["observation"]["linux"];
    eprintln!(
        "first samples: {}",
        serde_json::to_string(&linux["latest"]).unwrap()
    );
    assert_eq!(linux["clocksource"], "kvm-clock", "{linux}");
    let console = std::fs::read_to_string(&serial).unwrap();
    assert!(
        console.contains("Linux version"),
        "the kernel printed its banner"
    );
    assert!(
        console.contains("smp: Brought up 1 node, 2 CPUs"),
        "SMP through the MADT"
    );
    assert!(console.contains("Hypervisor detected: KVM"));
    assert!(
        console.contains("kvm-clock: Using msrs 4b564d01"),
        "kvmclock via CLOCKSOURCE2"
    );
    for s in linux["latest"].as_array().unwrap() {
        let err = s["guest_realtime_ns"].as_i64().unwrap_or(0) as i128
            - s["host_realtime_ns"].as_i64().unwrap_or(0) as i128;
        eprintln!("vCPU {}: guest CLOCK_REALTIME − host = {err} ns", s["vcpu"]);
        assert!(
            err.abs() < 5_000_000_000,
            "the guest's wall clock is the host's (kvmclock wall clock)"
        );
    }
    // Pause: the vCPUs idle inside KVM_RUN and must be kicked out.
    api(&sock, "PUT", "vm.pause").unwrap();
    let paused = api(&sock, "GET", "vm.clock").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let still = api(&sock, "GET", "vm.clock").unwrap();
    assert_eq!(
        paused["observation"]["linux"]["console_lines"],
        still["observation"]["linux"]["console_lines"],
        "paused: the guest prints nothing"
    );
    api(&sock, "PUT", "vm.resume").unwrap();
    let last = still["observation"]["linux"]["latest"][0]["seq"]
        .as_u64()
        .unwrap();
    let c = wait_samples(&sock, &serial, last + 4);
    let complaints = c["observation"]["linux"]["complaints"]
        .as_array()
        .unwrap()
        .clone();
    eprintln!("complaints after a 2 s pause: {complaints:?}");
}

#[test]
fn invariant_tsc_gives_the_tsc_clocksource() {
    let k = match kernel() {
        Ok(k) => k,
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    let (_p, sock, serial) = boot(&k, &["--invariant-tsc"]);
    let c = wait_samples(&sock, &serial, 0);
    assert_eq!(
        c["observation"]["linux"]["clocksource"], "tsc",
        "{}",
        c["observation"]["linux"]
    );
}

#[test]
fn kvm_pvm_refuses_a_linux_guest_and_says_why() {
    if flavour() != "kvm_pvm" {
        eprintln!("SKIP: not kvm_pvm ({})", flavour());
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_clockvmm"))
        .args([
            "run",
            "--api-socket",
            "/nonexistent/x.sock",
            "--kernel",
            "/nonexistent/bzImage",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kvm_pvm") && err.contains("stock Linux"),
        "{err}"
    );
}

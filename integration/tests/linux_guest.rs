//! A real Linux guest under clockvmm: boots Debian's stock kernel (`GC_LINUX_KERNEL`, a bzImage)
//! with the built-in probe initramfs, reads the guest's own clocks through `vm.clock`, pauses
//! and resumes it (vCPUs kicked out of KVM_RUN), and checks that the guest did not complain.
//! With the vmclock ACPI device and the kernel's ptp_vmclock module (`GC_LINUX_MODULES`), the
//! guest's PTP clock reads clockvmm's vmclock page: its error against the host is measured.
//!
//! Runs in the nested kvm_amd lane (`integration/nested/lane`, which passes the kernel and the
//! modules). On kvm_pvm, or without a kernel, the boot tests print why and skip; the refusal on
//! kvm_pvm is tested there instead.

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

fn modules() -> Result<Vec<PathBuf>, String> {
    let v = std::env::var("GC_LINUX_MODULES").map_err(|_| {
        "GC_LINUX_MODULES (the guest's ptp_vmclock.ko) is not set: the nested lane sets it"
    })?;
    let m: Vec<PathBuf> = v
        .split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect();
    if m.is_empty() {
        return Err("GC_LINUX_MODULES is empty".into());
    }
    for f in &m {
        if !f.is_file() {
            return Err(format!("GC_LINUX_MODULES: {} is no file", f.display()));
        }
    }
    Ok(m)
}

/// Boot with the vmclock ACPI device, a 200 ms page refresh and the guest modules.
fn boot_vmclock(k: &Path, mods: &[PathBuf], more: &[&str]) -> (Proc, PathBuf, PathBuf) {
    let mut extra: Vec<String> = vec![
        "--acpi-vmclock".into(),
        "--vmclock-refresh-ms".into(),
        "200".into(),
        // The L1 kernel does not know TAI − UTC and this machine's tzdata list may have expired:
        // 37 s, unchanged since 2017 (no leap second announced since).
        "--vmclock-tai-offset-s".into(),
        "37".into(),
    ];
    extra.extend(more.iter().map(|s| s.to_string()));
    for m in mods {
        extra.push("--guest-module".into());
        extra.push(m.display().to_string());
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    boot(k, &extra)
}

/// Wait for a PHC reading on every vCPU; Err(the observation) when the probe found no vmclock
/// PTP clock or its readings fail.
fn wait_phc(sock: &Path, serial: &Path) -> Result<Value, Value> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let c = wait_samples(sock, serial, 0);
        let linux = &c["observation"]["linux"];
        let phc = linux["phc_latest"].as_array().cloned().unwrap_or_default();
        if phc.len() == 2 && phc.iter().all(|p| !p["phc_error_ns"].is_null()) {
            return Ok(c);
        }
        let failing = !linux["phc_errors"].as_array().is_none_or(Vec::is_empty);
        if linux["phc_unavailable"].is_string() || (failing && phc.is_empty()) {
            return Err(linux.clone());
        }
        assert!(
            Instant::now() < deadline,
            "no PHC readings: {linux}\n{}",
            std::fs::read_to_string(serial).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The console lines about the TSC, vmclock and PTP (for a failure's message).
fn clock_lines(serial: &Path) -> String {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            !l.contains("GCPROBE s ")
                && ["tsc", "TSC", "vmclock", "ptp", "clocksource", "GCPROBE"]
                    .iter()
                    .any(|w| l.contains(w))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Print and check (within `bound_ns`) every vCPU's PHC error; the PTP device.
fn check_phc(c: &Value, bound_ns: i64) -> String {
    let linux = &c["observation"]["linux"];
    eprintln!("modules: {}", linux["modules"]);
    for m in linux["modules"].as_array().unwrap() {
        assert_eq!(m[1], 0, "finit_module of {} failed", m[0]);
    }
    let dev = linux["phc_device"].as_str().unwrap_or("").to_string();
    assert!(
        dev.starts_with("ptp") && dev[3..].parse::<u32>().is_ok(),
        "ptp_vmclock registered a PTP clock: {linux}"
    );
    eprintln!(
        "PHC {dev}; clocksource {}; guest vmclock view: {}",
        linux["clocksource"], linux["guest_vmclock"]
    );
    for p in linux["phc_latest"].as_array().unwrap() {
        let e = p["phc_error_ns"].as_i64().unwrap();
        eprintln!(
            "vCPU {}: PHC − host = {e} ± {} ns (direct {} ± {} ns); guest CLOCK_REALTIME − host \
             = {} ns; PHC − guest realtime = {} ns (bracket {} ns)",
            p["vcpu"],
            p["sample_bracket_ns"],
            p["phc_error_direct_ns"],
            p["direct_bracket_ns"],
            p["guest_realtime_error_ns"],
            p["phc_minus_guest_realtime_ns"],
            p["realtime_bracket_ns"],
        );
        assert_eq!(p["dev"], dev.as_str());
        // TAI (Linux 7.x's ptp_vmclock, from the page's UTC − TAI offset) or UTC (older).
        let scale = p["timescale_offset_s"].as_i64().unwrap();
        let page_tai = -c["vmclock"]["tai_offset_sec"].as_i64().unwrap_or(0);
        eprintln!(
            "vCPU {}: PHC timescale UTC + {scale} s (page: TAI = UTC + {page_tai} s)",
            p["vcpu"]
        );
        assert!(scale == 0 || scale == page_tai, "PHC timescale: {p}");
        assert!(
            e.abs() < bound_ns,
            "the PHC reads host time within {bound_ns} ns: {p}"
        );
    }
    dev
}

/// The vmclock ACPI device, Linux's ptp_vmclock bound to it: the guest has a PTP clock over
/// clockvmm's vmclock page, and that clock reads the host's realtime (loosely bounded: nested
/// TCG is slow, only gross errors fail). The page stays fresh while the guest runs.
///
/// With the invariant TSC (the guest's clocksource is then the TSC, the vmclock's own counter:
/// one TSC read serves the PHC and the system clock); the kvm-clock case is the next test.
#[test]
fn ptp_vmclock_gives_the_guest_a_phc_that_reads_host_time() {
    let (k, mods) = match kernel().and_then(|k| Ok((k, modules()?))) {
        Ok(x) => x,
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    let (_p, sock, serial) = boot_vmclock(&k, &mods, &["--invariant-tsc"]);
    let c = wait_phc(&sock, &serial)
        .unwrap_or_else(|linux| panic!("no PHC readings: {linux}\n{}", clock_lines(&serial)));
    check_phc(&c, 1_000_000);
    // Fresh: the guest sees the page rewritten while it runs.
    let v0 = c["observation"]["linux"]["guest_vmclock"].clone();
    assert_eq!(v0["counter_id"], 1, "X86_TSC: {v0}");
    let seq0 = v0["seq_count"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let c = api(&sock, "GET", "vm.clock").unwrap();
        let v = &c["observation"]["linux"]["guest_vmclock"];
        if v["seq_count"].as_u64().unwrap_or(0) > seq0 {
            eprintln!(
                "guest saw seq_count {seq0} → {}; host refreshes: {}",
                v["seq_count"], c["vmclock_refresh"]
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest never saw the page change: {c}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The same with kvm-clock as the guest's clocksource (no invariant TSC): ptp_vmclock registers
/// its PTP clock and reads it (seen nested); were the guest to mark its TSC unstable, the driver
/// would refuse readings (`check_tsc_unstable`): the test then reports that instead of failing.
#[test]
fn ptp_vmclock_beside_kvm_clock() {
    let (k, mods) = match kernel().and_then(|k| Ok((k, modules()?))) {
        Ok(x) => x,
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    let (_p, sock, serial) = boot_vmclock(&k, &mods, &[]);
    match wait_phc(&sock, &serial) {
        Ok(c) => {
            check_phc(&c, 1_000_000);
        }
        Err(linux) => {
            assert!(
                linux["phc_device"].is_string(),
                "ptp_vmclock registered no PTP clock: {linux}\n{}",
                clock_lines(&serial)
            );
            eprintln!(
                "kvm-clock guest: PTP clock {} registered, readings fail: {} (guest TSC lines:\n{})",
                linux["phc_device"],
                linux["phc_errors"],
                clock_lines(&serial)
            );
        }
    }
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

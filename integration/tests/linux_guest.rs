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

mod common;
use common::{call, Dir};

/// A VMM process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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
    api_with(socket, method, ep, None)
}

/// One API call (raw HTTP, tests/common); an error status is Err with the whole answer. The
/// generous timeout is for calls that wait for a migration under the nested lane.
fn api_with(socket: &Path, method: &str, ep: &str, body: Option<Value>) -> Result<Value, String> {
    let (code, v) = call(socket, method, ep, body, Duration::from_secs(600))?;
    if code >= 400 {
        return Err(v.to_string());
    }
    Ok(v)
}

fn test_dir(tag: &str) -> Dir {
    let dir = std::env::temp_dir().join(format!("clockvmm-linux-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Dir(dir)
}

/// Boot the Linux guest in a new VMM: (process, its directory, API socket, console file).
fn boot(k: &Path, tag: &str, extra: &[&str]) -> (Proc, Dir, PathBuf, PathBuf) {
    let dir = test_dir(tag);
    let sock = dir.0.join("api.sock");
    let serial = dir.0.join("serial.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clockvmm"));
    cmd.args(["run", "--vcpus", "2", "--memory-mib", "256", "--api-socket"])
        .arg(&sock)
        .arg("--kernel")
        .arg(k)
        .arg("--serial")
        .arg(&serial)
        .args(["--cmdline", "gcprobe_period_ms=300"])
        .args(extra);
    (Proc(start(cmd)), dir, sock, serial)
}

fn start(mut cmd: Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// A VMM without a VM (a restore or migration target) on `sock`; its console goes to `serial`
/// once it has a guest (the source's `--serial` path travels with the configuration, so the
/// receiver gets its own through the restored config's path — here the same directory).
fn empty_vmm(sock: &Path) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clockvmm"));
    cmd.args(["run", "--no-vm", "--api-socket"]).arg(sock);
    let c = start(cmd);
    let deadline = Instant::now() + Duration::from_secs(120);
    while api(sock, "GET", "vm.info").is_err() {
        assert!(Instant::now() < deadline, "the VMM did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    Proc(c)
}

/// The console's last `n` lines (a failure shows where the guest was).
fn console_tail(serial: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Wait until every vCPU reported a sample with sequence ≥ `min_seq`. No fixed deadline (the
/// nested lane is ~10× slower than native and varies): the wait fails only when the guest
/// stopped, or made no progress for `stall` — no new console line before its first sample, no
/// new probe sample after (a kernel printing complaints while the probe is stuck is stuck).
fn try_wait_samples(
    sock: &Path,
    serial: &Path,
    min_seq: u64,
    stall: Duration,
) -> Result<Value, String> {
    let mut last_mark = (0, 0);
    let mut last_progress = Instant::now();
    let mut reraised = Value::Null;
    loop {
        let mut seq = 0;
        if let Ok(c) = api(sock, "GET", "vm.clock") {
            reraised = c["observation"]["linux"]["com1_interrupts_reraised"].clone();
            let latest = c["observation"]["linux"]["latest"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            seq = latest
                .iter()
                .filter_map(|s| s["seq"].as_u64())
                .map(|s| s + 1)
                .max()
                .unwrap_or(0);
            if latest.len() == 2
                && latest
                    .iter()
                    .all(|s| s["seq"].as_u64().unwrap_or(0) >= min_seq)
            {
                return Ok(c);
            }
            if let Some(why) = c["observation"]["linux"]["stopped"].as_str() {
                return Err(format!(
                    "the guest stopped: {why}\n{}",
                    console_tail(serial, 80)
                ));
            }
        }
        let len = std::fs::metadata(serial).map(|m| m.len()).unwrap_or(0);
        let mark = if seq > 0 { (seq, 0) } else { (0, len) };
        if mark != last_mark {
            last_mark = mark;
            last_progress = Instant::now();
        }
        if last_progress.elapsed() >= stall {
            return Err(format!(
                "no probe samples (seq >= {min_seq}) and no progress for {} s (COM1 interrupts \
                 raised again by the VMM: {reraised}); the console's end:\n{}",
                stall.as_secs(),
                console_tail(serial, 80)
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn wait_samples(sock: &Path, serial: &Path, min_seq: u64) -> Value {
    try_wait_samples(sock, serial, min_seq, Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Boot attempts before a test gives up on a guest that stalls in its own boot.
const BOOT_ATTEMPTS: u32 = 3;

/// Boot and wait for the first samples. A boot whose console goes silent for 120 s before the
/// probe reported is retried (up to [`BOOT_ATTEMPTS`] boots), said on stderr with the stalled
/// console: under the nested lane with 2 L1 vCPUs, 4 of 12 boots deadlocked (an interrupt
/// delivered twice by QEMU's TCG SVM after a round-robin kick: `integration/nested/run` now
/// gives the L1 one vCPU; 0 of 30 since). Waits after a restore are never retried.
fn boot_sampled(k: &Path, tag: &str, extra: &[&str]) -> (Proc, Dir, PathBuf, PathBuf, Value) {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (p, d, sock, serial) = boot(k, &format!("{tag}{attempt}"), extra);
        match try_wait_samples(&sock, &serial, 2, Duration::from_secs(120)) {
            Ok(c) => return (p, d, sock, serial, c),
            Err(e) if attempt < BOOT_ATTEMPTS => {
                // Past the test harness's capture (it takes only the print macros): a retry
                // shows in the lane's log even when the test then passes.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "RETRYING the boot (attempt {attempt} of {BOOT_ATTEMPTS} stalled): {e}"
                );
            }
            Err(e) => panic!("{e}"),
        }
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
    let (_p, _d, sock, serial, c) = boot_sampled(&k, "pause", &[]);
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
fn boot_vmclock(
    k: &Path,
    tag: &str,
    mods: &[PathBuf],
    more: &[&str],
) -> (Proc, Dir, PathBuf, PathBuf) {
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
    let (p, d, sock, serial, _) = boot_sampled(k, tag, &extra);
    (p, d, sock, serial)
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
    let (_p, _d, sock, serial) = boot_vmclock(&k, "phc-tsc", &mods, &["--invariant-tsc"]);
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
    let (_p, _d, sock, serial) = boot_vmclock(&k, "phc-kvmclock", &mods, &[]);
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
    let (_p, _d, _sock, _serial, c) = boot_sampled(&k, "tsc", &["--invariant-tsc"]);
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

/// Wait until vm.clock's `linux_errors` had all the samples it compares after the disruption
/// (the first three probe rounds read after it: its `linux_errors_after_seqs`).
fn wait_compared(sock: &Path, serial: &Path) -> Value {
    let c = api(sock, "GET", "vm.clock").unwrap();
    let end = c["linux_errors_after_seqs"]["end_seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no samples compared after a disruption: {c}"));
    wait_samples(sock, serial, end.saturating_sub(1))
}

/// What the guest's own clocks did across the disruption, checked against `skew_ns` (the
/// destination's injected wallclock skew; 0 for a live update): CLOCK_REALTIME's error moved by
/// the skew, CLOCK_MONOTONIC and the TSC counted the downtime on the destination's timeline
/// (host time + skew: kvmclock is rebuilt from (K, W) and the destination's wallclock). The
/// bound is the plugin's own read-back residual plus 20 µs, ten times the live-update target
/// (the nested lane's figures are −130..67 ns): a strategy that loses or gains the downtime
/// (≥ 200 ms here) is far outside it; a µs-level error such as the kernel-docs offsets' (4–5
/// µs) is inside: comparing those is the bench's job. The time
/// figures are known only to the samples' RDTSC brackets (~100 ns under the nested lane; a
/// vCPU exit inside one widens it: seen 139 µs on the first samples after a migration, with the
/// TSC continuous to 31 ticks, before the probe kept the narrowest of 5 reads): each is
/// checked within the bound plus that uncertainty, which must itself be below the bound.
fn check_guest_clocks(c: &Value, skew_ns: i64) {
    let rep = &c["restore_report"];
    let bound = rep["kvmclock_error_ns"]
        .as_i64()
        .unwrap_or(0)
        .unsigned_abs()
        + 20_000;
    let khz = c["tsc_khz"].as_u64().unwrap();
    let errors = c["linux_errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "both vCPUs sampled across: {c}");
    for e in errors {
        let moved = e["realtime_error_after_ns"].as_i64().unwrap()
            - e["realtime_error_before_ns"].as_i64().unwrap();
        let mono = e["monotonic_error_ns"].as_i64().unwrap() - skew_ns;
        let skew_ticks = (i128::from(skew_ns) * i128::from(khz) / 1_000_000) as i64;
        let tsc = e["tsc_error_ticks"].as_i64().unwrap() - skew_ticks;
        eprintln!(
            "vCPU {}: CLOCK_REALTIME error moved {moved} ns (skew {skew_ns}); CLOCK_MONOTONIC \
             {mono} ns and TSC {tsc} ticks off the destination's timeline over {} ns of host \
             time; bound {bound} ns, samples' half bracket {} ns",
            e["vcpu"], e["host_elapsed_ns"], e["bracket_ns"]
        );
        // Both disruptions here keep the guest stopped for at least 200 ms: a shorter span
        // means a sample read before the pause was taken for one read after it.
        assert!(
            e["host_elapsed_ns"].as_i64().unwrap() >= 200_000_000,
            "the samples compared do not straddle the pause: {e}"
        );
        // Two samples, each placed in host time to ± its half bracket (the wider of the two).
        let uncertainty = 2 * e["bracket_ns"].as_u64().unwrap();
        assert!(
            uncertainty <= bound,
            "the samples' RDTSC brackets (± {uncertainty} ns) cannot resolve the bound: {e}"
        );
        assert!(
            (moved - skew_ns).unsigned_abs() <= bound + uncertainty,
            "CLOCK_REALTIME: {e}"
        );
        assert!(
            mono.unsigned_abs() <= bound + uncertainty,
            "CLOCK_MONOTONIC: {e}"
        );
        assert!(
            tsc.unsigned_abs() <= bound.saturating_mul(khz) / 1_000_000,
            "TSC continuity: {e}"
        );
    }
    let complaints = c["observation"]["linux"]["complaints"].as_array().unwrap();
    assert!(
        complaints.is_empty(),
        "the guest complained: {complaints:?}"
    );
}

/// Live update: the VMM snapshots the paused guest (vCPU registers, LAPIC, MSRs, irqchip, PIT,
/// serial, memory, clock section), its process ends, a new process restores it after ~200 ms.
/// The guest's clocks must not notice: realtime error unchanged, monotonic = the real downtime,
/// TSC continuous, nothing signalled, and the guest keeps printing through the restored UART.
#[test]
fn linux_live_update_into_a_new_process_keeps_the_guest_clocks() {
    let k = match kernel() {
        Ok(k) => k,
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    let (a, dir, sock, serial, _) = boot_sampled(&k, "update", &[]);
    wait_samples(&sock, &serial, 3);
    let snap = format!("file://{}", dir.0.join("snap").display());
    api_with(
        &sock,
        "PUT",
        "vm.snapshot",
        Some(serde_json::json!({ "destination_url": snap })),
    )
    .unwrap();
    drop(a);
    std::thread::sleep(Duration::from_millis(200));
    let b_sock = dir.0.join("b.sock");
    let _b = empty_vmm(&b_sock);
    let r = api_with(
        &b_sock,
        "PUT",
        "vm.restore",
        Some(serde_json::json!({ "source_url": snap })),
    )
    .unwrap();
    eprintln!("restore report: {}", r["restore_report"]);
    assert_eq!(r["restore_report"]["mode"], "live-update");
    let c = wait_compared(&b_sock, &serial);
    check_guest_clocks(&c, 0);
    assert!(
        c["restore_report"]["signalled"]["guest_stopped_vcpus"]
            .as_array()
            .unwrap()
            .is_empty(),
        "exact live update: nothing signalled"
    );
}

/// Live migration to another process whose wallclock is 250 µs ahead (the receiver's own
/// policy: mode live-migration, injected skew): the guest's CLOCK_REALTIME follows the
/// destination's wallclock, CLOCK_MONOTONIC and the TSC count the real downtime, and every
/// vCPU got PVCLOCK_GUEST_STOPPED (KVMCLOCK_CTRL works because the VMM restored the kvmclock
/// MSRs before the plugin ran).
#[test]
fn linux_live_migration_follows_the_destination_wallclock_and_signals() {
    let k = match kernel() {
        Ok(k) => k,
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    const SKEW_NS: i64 = 250_000;
    let (_a, dir, sock, serial, _) = boot_sampled(&k, "migrate", &[]);
    wait_samples(&sock, &serial, 3);
    let b_sock = dir.0.join("b.sock");
    let _b = empty_vmm(&b_sock);
    let m_sock = dir.0.join("m.sock");
    let url = format!("unix:{}", m_sock.display());
    let recv = {
        let b_sock = b_sock.clone();
        let body = serde_json::json!({
            "receiver_url": url,
            "restore_options": {"mode": "live-migration", "inject_wallclock_skew_ns": SKEW_NS},
        });
        std::thread::spawn(move || api_with(&b_sock, "PUT", "vm.receive-migration", Some(body)))
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !m_sock.exists() {
        assert!(Instant::now() < deadline, "the receiver did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    api_with(
        &sock,
        "PUT",
        "vm.send-migration",
        Some(serde_json::json!({ "destination_url": url, "downtime_ms": 200 })),
    )
    .unwrap();
    recv.join().unwrap().unwrap();
    let c = wait_compared(&b_sock, &serial);
    eprintln!("restore report: {}", c["restore_report"]);
    assert_eq!(c["restore_report"]["mode"], "live-migration");
    check_guest_clocks(&c, SKEW_NS);
    assert_eq!(
        c["restore_report"]["signalled"]["guest_stopped_vcpus"]
            .as_array()
            .map(Vec::len),
        Some(2),
        "every vCPU told it was stopped"
    );
    assert_eq!(api(&sock, "GET", "vm.info").unwrap()["state"], "migrated");
}

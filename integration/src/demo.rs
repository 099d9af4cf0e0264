//! `clockvmm demo`: boot a guest, live-update it (snapshot → new process → restore) and
//! live-migrate it (two processes, UNIX socket, injected wallclock skew), each after a visible
//! downtime, then print what the guest observed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::client::{call, wait_ready};

/// A child VMM process, killed when dropped.
pub struct VmmProcess {
    child: Child,
    /// Its API socket.
    pub socket: PathBuf,
}

impl VmmProcess {
    /// Start `clockvmm run` with extra arguments.
    pub fn spawn(socket: &Path, args: &[&str]) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let child = Command::new(exe)
            .arg("run")
            .arg("--api-socket")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("RUST_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .map_err(|e| format!("spawning clockvmm run: {e}"))?;
        let p = VmmProcess {
            child,
            socket: socket.to_path_buf(),
        };
        wait_ready(socket, Duration::from_secs(20))?;
        Ok(p)
    }

    /// Call the API; an error status becomes Err.
    pub fn api(&self, method: &str, endpoint: &str, body: Option<Value>) -> Result<Value, String> {
        crate::client::call_ok(&self.socket, method, endpoint, body.as_ref())
    }

    /// Ask it to shut down and wait.
    pub fn shutdown(mut self) {
        let _ = self.api("PUT", "vmm.shutdown", None);
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new(tag: &str) -> Result<Self, String> {
        let d = std::env::temp_dir().join(format!(
            "clockvmm-{tag}-{}-{}",
            std::process::id(),
            guest_clock::backend::host::rdtsc()
        ));
        std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        Ok(TempDir(d))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One row of the demo table.
#[derive(Debug, Clone)]
pub struct Row {
    /// Scenario.
    pub scenario: String,
    /// Guest-observed kvmclock error of the worst vCPU, ns.
    pub kvmclock_error_ns: i64,
    /// Guest-observed kvmclock error against its own TSC (the uninterrupted clock), ns.
    pub kvmclock_vs_tsc_ns: i64,
    /// Guest-observed TSC error of the worst vCPU, ticks.
    pub tsc_error_ticks: i64,
    /// What the guest was told.
    pub signalled: String,
    /// The plugin's read-back residual, ns.
    pub residual_ns: i64,
    /// The plugin's uncertainty, ns.
    pub uncertainty_ns: u64,
    /// Mode chosen.
    pub mode: String,
    /// Warnings.
    pub warnings: Vec<String>,
}

fn worst(errors: &[Value], key: &str) -> i64 {
    errors
        .iter()
        .filter_map(|e| e.get(key).and_then(Value::as_i64))
        .max_by_key(|v| v.unsigned_abs())
        .unwrap_or(0)
}

/// Build a row from a `vm.clock` answer.
pub fn row(scenario: &str, clock: &Value) -> Row {
    let errors = clock["observed_errors"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let rep = &clock["restore_report"];
    let stopped = rep["signalled"]["guest_stopped_vcpus"]
        .as_array()
        .map_or(0, Vec::len);
    let marker = rep["signalled"]["vmclock_disruption_marker"].as_u64();
    let signalled = match (stopped, marker) {
        (0, None) => "nothing".to_string(),
        (n, None) => format!("GUEST_STOPPED x{n}"),
        (0, Some(m)) => format!("vmclock marker {m}"),
        (n, Some(m)) => format!("GUEST_STOPPED x{n}, vmclock marker {m}"),
    };
    Row {
        scenario: scenario.to_string(),
        kvmclock_error_ns: worst(&errors, "kvmclock_error_ns"),
        kvmclock_vs_tsc_ns: worst(&errors, "kvmclock_vs_tsc_error_ns"),
        tsc_error_ticks: worst(&errors, "tsc_error_ticks"),
        signalled,
        residual_ns: rep["kvmclock_error_ns"].as_i64().unwrap_or(0),
        uncertainty_ns: rep["uncertainty_ns"].as_u64().unwrap_or(0),
        mode: rep["mode"].as_str().unwrap_or("?").to_string(),
        warnings: rep["warnings"]
            .as_array()
            .map(|w| {
                w.iter()
                    .filter_map(|s| {
                        serde_json::from_value::<guest_clock::restore::RestoreWarning>(s.clone())
                            .ok()
                            .map(|w| w.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

fn step(n: usize, text: &str) {
    println!("[{n}/4] {text}");
}

/// Run the demo (the tiny guest).
pub fn run(vcpus: usize, downtime_ms: u64, skew_ns: i64, model: bool) -> Result<(), String> {
    let dir = TempDir::new("demo")?;
    let extra: Vec<String> = {
        let mut v = vec!["--vcpus".to_string(), vcpus.to_string()];
        if model {
            v.push("--model".into());
        }
        v
    };
    let extra_ref: Vec<&str> = extra.iter().map(String::as_str).collect();
    let no_vm: Vec<&str> = if model {
        vec!["--no-vm", "--model"]
    } else {
        vec!["--no-vm"]
    };

    let a = VmmProcess::spawn(&dir.0.join("a.sock"), &extra_ref)?;
    let info = a.api("GET", "vm.info", None)?;
    println!(
        "clockvmm demo on {}",
        info["backend"].as_str().unwrap_or("?")
    );
    step(
        1,
        &format!(
            "booted a {vcpus}-vCPU guest (process {}); letting it run 0.5 s",
            a.child.id()
        ),
    );
    std::thread::sleep(Duration::from_millis(500));
    let c = a.api("GET", "vm.clock", None)?;
    let samples: u64 = c["observation"]["vcpus"]
        .as_array()
        .map_or(0, |v| v.iter().filter_map(|o| o["samples"].as_u64()).sum());
    println!("      guest running: {samples} clock samples so far");

    step(
        2,
        &format!(
            "live update: snapshot, stop the VMM, wait {downtime_ms} ms, restore in a new process"
        ),
    );
    let snap = dir.0.join("snapshot");
    a.api(
        "PUT",
        "vm.snapshot",
        Some(json!({"destination_url": format!("file://{}", snap.display())})),
    )?;
    a.shutdown();
    std::thread::sleep(Duration::from_millis(downtime_ms));
    let b = VmmProcess::spawn(&dir.0.join("b.sock"), &no_vm)?;
    b.api(
        "PUT",
        "vm.restore",
        Some(json!({"source_url": format!("file://{}", snap.display())})),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let lu = row("live update", &b.api("GET", "vm.clock", None)?);

    step(3, &format!("live migration to a new process over a UNIX socket: {downtime_ms} ms downtime, destination wallclock skewed by {skew_ns:+} ns"));
    let c_proc = VmmProcess::spawn(&dir.0.join("c.sock"), &no_vm)?;
    let mig = dir.0.join("migration.sock");
    let url = format!("unix:{}", mig.display());
    let recv_socket = c_proc.socket.clone();
    let recv_url = url.clone();
    let receiver = std::thread::spawn(move || {
        call(
            &recv_socket,
            "PUT",
            "vm.receive-migration",
            // The receiver owns its restore policy: the demo's skew is its option.
            Some(&json!({"receiver_url": recv_url,
                "restore_options": {"mode": "live-migration", "inject_wallclock_skew_ns": skew_ns}})),
            Duration::from_secs(120),
        )
    });
    for _ in 0..500 {
        if mig.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    b.api(
        "PUT",
        "vm.send-migration",
        Some(json!({
            "destination_url": url,
            "downtime_ms": downtime_ms,
        })),
    )?;
    match receiver.join() {
        Ok(Ok((code, v))) if code < 400 => {
            let _ = v;
        }
        Ok(Ok((_, v))) => return Err(format!("receiver: {v}")),
        Ok(Err(e)) => return Err(format!("receiver: {e}")),
        Err(_) => return Err("receiver thread panicked".into()),
    }
    std::thread::sleep(Duration::from_millis(300));
    let mg = row("live migration", &c_proc.api("GET", "vm.clock", None)?);
    b.shutdown();
    c_proc.shutdown();

    step(
        4,
        "results (guest-observed = what the guest's own kvmclock/TSC show across the disruption)",
    );
    print_table(&[lu, mg], skew_ns);
    Ok(())
}

/// Print the demo table.
pub fn print_table(rows: &[Row], skew_ns: i64) {
    println!();
    println!(
        "{:<15} {:<15} {:>12} {:>13} {:>12} {:>9} {:>12}  guest was told",
        "scenario", "mode", "kvmclock vs", "kvmclock vs", "TSC vs", "plugin", "uncertainty"
    );
    println!(
        "{:<15} {:<15} {:>12} {:>13} {:>12} {:>9} {:>12}",
        "", "", "own TSC ns", "wallclock ns", "wallclock tk", "resid ns", "ns"
    );
    for r in rows {
        println!(
            "{:<15} {:<15} {:>12} {:>13} {:>12} {:>9} {:>12}  {}",
            r.scenario,
            r.mode,
            r.kvmclock_vs_tsc_ns,
            r.kvmclock_error_ns,
            r.tsc_error_ticks,
            r.residual_ns,
            r.uncertainty_ns,
            r.signalled
        );
    }
    println!();
    println!("All errors are what the guest itself observes across the disruption (worst vCPU):");
    println!(
        "- kvmclock vs own TSC: kvmclock's jump relative to the uninterrupted kvmclock function of"
    );
    println!("  the guest TSC (the live-update criterion: 'as if merely not scheduled');");
    println!("- vs wallclock: relative to host CLOCK_REALTIME between the two samples; this includes the");
    println!(
        "  host's TSC-vs-NTP rate difference over the interval (kvmclock is not NTP-disciplined);"
    );
    println!("- the migration's injected skew is {skew_ns:+} ns: its wallclock error should be that skew,");
    println!("  and the guest is told it is out of NTP sync. Uncertainty sums both hosts' adjtimex maxerror.");
    for r in rows {
        for w in &r.warnings {
            println!("note ({}): {w}", r.scenario);
        }
    }
}

//! `clockvmm bench`: guest clock error and cost, side by side with the peers' strategies, in one
//! process and interleaved (every repetition runs every strategy back to back) so that machine
//! noise hits all alike. Every figure is labelled with the backend it was measured on.
//!
//! 1. Strategies ([`strategies`]): live update (new VM, same host) after a downtime, and
//!    migration with a wallclock skew, ≥ 20 repetitions; |kvmclock error| and |TSC error| as
//!    median / p99 / max, vCPU TSC skew, whether the guest was signalled.
//!    - model: two model hosts (2.445 GHz → 3.0 GHz for the migration, +250 µs wallclock skew,
//!      KVM's +500 ns SET_CLOCK realtime gap); the surviving source VM is the oracle.
//!    - KVM (where /dev/kvm works): real VMs running the clockvmm guest. The source VM stays
//!      alive, paused; the error is the destination guest's kvmclock at its own TSC sample minus
//!      the source guest's pvclock function at that TSC (exact on a host with a shared TSC). On
//!      kvm_pvm TSC writes are ignored, so TSC effects are only visible on the model.
//! 2. Scaling: capture and restore wall time and section size for 1, 2, 8, 64, 256 vCPUs.
//! 3. Drift: 1,000 consecutive live updates on the model.

pub mod linux;
pub mod strategies;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_clock::backend::model::{HostConfig, ModelHost, ModelTime, ModelVm};
use guest_clock::backend::{ClockBackend, Hypervisor, TscControl, KVM_CLOCK_HOST_TSC};
use guest_clock::capture::capture;
use guest_clock::format::encode;
use guest_clock::math;
use guest_clock::restore::{restore, RestoreMode, RestoreOptions};
use serde::Serialize;
use serde_json::json;

use crate::vm::{BackendKind, Vm, VmConfig};
use strategies::Strategy;

/// Median / p99 / max of |values|.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Stats {
    /// Median.
    pub median: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Stats {
    /// Of the absolute values.
    pub fn of(values: &[i64]) -> Stats {
        if values.is_empty() {
            return Stats::default();
        }
        let mut v: Vec<u64> = values.iter().map(|x| x.unsigned_abs()).collect();
        v.sort_unstable();
        let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1] as f64;
        Stats {
            median: rank(0.5),
            p99: rank(0.99),
            max: *v.last().unwrap_or(&0) as f64,
        }
    }
}

/// One strategy × backend × scenario row of the JSON.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyRow {
    /// Strategy name.
    pub name: String,
    /// "kvm" or "model".
    pub backend: String,
    /// "live-update" or "migration".
    pub scenario: String,
    /// |kvmclock error|, ns.
    pub kvmclock_error_ns: Stats,
    /// |TSC error|, ticks.
    pub tsc_error_ticks: Stats,
    /// Worst TSC difference between vCPUs that were in sync, ticks.
    pub vcpu_skew_ticks: f64,
    /// Whether the guest was told.
    pub signalled: bool,
    /// Repetitions.
    pub repetitions: usize,
    /// Median signed kvmclock error, ns (sign: ahead > 0).
    pub kvmclock_error_signed_median_ns: f64,
    /// How the TSC columns were measured.
    pub tsc_method: TscMethod,
    /// Repetitions thrown away because a measurement was impossible (not in the statistics).
    pub discarded: usize,
}

/// One scaling measurement.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingRow {
    /// Backend.
    pub backend: String,
    /// vCPUs.
    pub vcpus: usize,
    /// Median capture wall time, µs.
    pub capture_us: f64,
    /// Median restore wall time, µs.
    pub restore_us: f64,
    /// Encoded section size (v2), bytes.
    pub section_bytes: usize,
}

#[derive(Default)]
struct Acc {
    k: Vec<i64>,
    t: Vec<i64>,
    skew: u64,
    signalled: bool,
    tsc_method: Option<TscMethod>,
    discarded: usize,
}

const SRC_KHZ: u32 = 2_445_404;
const DST_KHZ: u32 = 3_000_000;
const SKEW_NS: i64 = 250_000;

fn model_pair(rep: u64, migration: bool) -> (ModelTime, Arc<ModelHost>, Arc<ModelHost>) {
    let time = ModelTime::new();
    let mut a = HostConfig::new(SRC_KHZ, 1);
    a.realtime_read_gap_ns = 500;
    a.boot_tsc_ticks = 1_000_003 * rep;
    let ha = ModelHost::new(time.clone(), a.clone());
    let hb = if migration {
        let mut b = HostConfig::new(DST_KHZ, 2);
        b.realtime_read_gap_ns = 500;
        b.skew_ns = SKEW_NS;
        b.boot_tsc_ticks = 77_777_777_777 + 13 * rep;
        ModelHost::new(time.clone(), b)
    } else {
        ha.clone()
    };
    (time, ha, hb)
}

/// One model run of a strategy; returns (kvmclock error, worst TSC error, skew, signalled).
fn model_once(
    s: Strategy,
    rep: u64,
    migration: bool,
    downtime_ns: u64,
) -> Result<(i64, i64, u64, bool), String> {
    let (time, ha, hb) = model_pair(rep, migration);
    let n = 4;
    let src = ModelVm::new(ha, n);
    for v in 0..n {
        src.guest_enable_kvmclock(v).map_err(|e| e.to_string())?;
    }
    src.run_all();
    time.advance_ns(2_000_000_000 + rep * 1_234_567);
    let state = capture(&src, 0).map_err(|e| e.to_string())?;
    time.advance_ns(downtime_ns + rep * 1_313);
    let dst = ModelVm::new(hb, n);
    for v in 0..n {
        dst.guest_enable_kvmclock(v).map_err(|e| e.to_string())?;
    }
    let mode = if migration {
        RestoreMode::LiveMigration
    } else {
        RestoreMode::LiveUpdate
    };
    // The peers never know the skew: their W comes from the destination's own wallclock.
    let signalled = s.apply(&dst, &state, mode, 0)?;
    dst.run_all();
    let k = math::diff_signed(
        dst.get_clock().map_err(|e| e.to_string())?.clock_ns,
        src.get_clock().map_err(|e| e.to_string())?.clock_ns,
    );
    let mut worst = 0i64;
    let mut lo = u64::MAX;
    let mut hi = 0u64;
    for v in 0..n {
        let d = dst.guest_tsc_now(v).map_err(|e| e.to_string())?;
        let e = math::diff_signed(d, src.guest_tsc_now(v).map_err(|e| e.to_string())?);
        if e.unsigned_abs() > worst.unsigned_abs() {
            worst = e;
        }
        lo = lo.min(d);
        hi = hi.max(d);
    }
    Ok((k, worst, hi - lo, signalled))
}

/// How a KVM row's TSC columns were measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TscMethod {
    /// The hypervisor honours offsets: guest TSC at one host TSC from the offset attributes,
    /// cross-checked against the guest's own RDTSC samples. Exact.
    Offsets,
    /// Offsets are ignored (kvm_pvm): destination TSC against the source's read just before and
    /// after it by MSR; the bracket width is the resolution.
    MsrBracket,
    /// The model's own exact TSC.
    Model,
}

/// One KVM run's figures.
struct KvmRun {
    kvmclock_error_ns: i64,
    tsc_error_ticks: i64,
    skew_ticks: u64,
    signalled: bool,
    tsc_method: TscMethod,
}

/// The largest kvmclock error a run can honestly show: the downtime plus a minute. Anything
/// larger is a broken measurement (e.g. a guest sample taken before its pvclock page was
/// rewritten) and aborts the run instead of reaching the table.
fn plausible_ns(downtime: Duration) -> u64 {
    downtime.as_nanos() as u64 + 60_000_000_000
}

/// Prefix of a run error that discards one repetition (an impossible measurement) instead of
/// aborting the bench; discarded repetitions are counted in the row.
const DISCARDED: &str = "discarded: ";

/// Start `vm` and wait until every vCPU has reported a sample with a valid pvclock (a guest
/// under TCG needs far longer than a native one to enable kvmclock; no fixed sleep).
fn run_until_sampled(vm: &Vm, what: &str) -> Result<crate::vm::GuestObservation, String> {
    vm.start().map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let o = vm.observe().map_err(|e| e.to_string())?;
        if o.vcpus.len() == vm.vcpu_count() && o.vcpus.iter().all(|v| v.samples > 0) {
            return Ok(o);
        }
        if Instant::now() > deadline {
            return Err(format!("{what} guest produced no samples in 120 s"));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// One KVM run: a source guest runs, pauses; a new VM is restored with the strategy after the
/// downtime and started; the error is measured on the destination guest's own samples against
/// the paused source's pvclock function.
/// `offsets_honoured`: whether this hypervisor applies TSC offset writes (false on kvm_pvm, which
/// accepts and ignores them; a write of the value already there proves nothing either way).
fn kvm_once(
    s: Strategy,
    migration: bool,
    downtime: Duration,
    offsets_honoured: bool,
) -> Result<KvmRun, String> {
    let cfg = VmConfig {
        vcpus: 2,
        memory_mib: 1,
        force_model: false,
        vm_id: [0; 16],
        linux: None,
    };
    let src = Vm::create(&cfg).map_err(|e| e.to_string())?;
    run_until_sampled(&src, "source")?;
    src.pause().map_err(|e| e.to_string())?;
    let sb = src.clock_backend();
    let state = capture(sb.as_ref(), 0).map_err(|e| e.to_string())?;
    std::thread::sleep(downtime);
    let dst = Vm::create(&cfg).map_err(|e| e.to_string())?;
    let mode = if migration {
        RestoreMode::LiveMigration
    } else {
        RestoreMode::LiveUpdate
    };
    let skew = if migration { SKEW_NS } else { 0 };
    let db = dst.clock_backend();
    let signalled = s.apply(db.as_ref(), &state, mode, skew)?;
    let h_started = guest_clock::backend::host::rdtsc();
    let obs = run_until_sampled(&dst, "destination")?;
    dst.pause().map_err(|e| e.to_string())?;
    let h_paused = guest_clock::backend::host::rdtsc();
    let mut worst = 0i64;
    for o in &obs.vcpus {
        let p = src
            .pvclock(o.vcpu)
            .map_err(|e| e.to_string())?
            .ok_or("source pvclock unreadable")?;
        // The source's pvclock function at the destination guest's TSC, signed: the sample may
        // precede the source page's tsc_timestamp, where the guest's u64 formula would wrap.
        let want = math::pvclock_eval_ns(&p, o.guest_tsc_ticks);
        let e = i128::from(o.guest_kvmclock_ns) - want;
        if e.unsigned_abs() > u128::from(plausible_ns(downtime)) {
            return Err(format!(
                "{DISCARDED}vCPU {}: kvmclock error {e} ns cannot be real (downtime {downtime:?})",
                o.vcpu
            ));
        }
        let e = e as i64;
        if e.unsigned_abs() > worst.unsigned_abs() {
            worst = e;
        }
    }
    let ignored = [db.tsc_control(), sb.tsc_control()].contains(&TscControl::Ignored);
    let tsc = if offsets_honoured && !ignored {
        tsc_by_offsets(
            sb.as_ref(),
            db.as_ref(),
            &state,
            &obs,
            migration,
            (h_started, h_paused),
        )?
    } else {
        tsc_by_msr_bracket(sb.as_ref(), db.as_ref())?
    };
    src.shutdown();
    dst.shutdown();
    Ok(KvmRun {
        kvmclock_error_ns: worst,
        tsc_error_ticks: tsc.0,
        skew_ticks: tsc.1,
        signalled,
        tsc_method: tsc.2,
    })
}

/// Exact TSC error where the hypervisor honours offsets (and no scaling is in force: guest
/// rate = host rate): at one host TSC `h`, vCPU n's guest TSC is `h + offsetₙ` on either VM.
/// - live update: error = `(h + ofs_dst) − (h + ofs_src)` = `ofs_dst − ofs_src`;
/// - migration: error = `(h + ofs_dst) − tsc_at_kvmclock(Tₙ, Kₙ, K_dst(h))` with `(K_dst, h)`
///   from the destination's `KVM_GET_CLOCK` (HOST_TSC): the TSC against the kvmclock actually set.
///
/// Skew = spread of those errors across vCPUs. Cross-check: every destination guest sample,
/// mapped back through its offset, is a host TSC between the destination's start and its pause.
fn tsc_by_offsets(
    sb: &dyn ClockBackend,
    db: &dyn ClockBackend,
    state: &guest_clock::format::ClockState,
    obs: &crate::vm::GuestObservation,
    migration: bool,
    (h_started, h_paused): (u64, u64),
) -> Result<(i64, u64, TscMethod), String> {
    let khz = state.tsc.guest_tsc_khz;
    let dst_khz = db.tsc_khz(0).map_err(|e| e.to_string())?;
    if dst_khz != state.tsc.host_tsc_khz || khz != state.tsc.host_tsc_khz {
        // Scaled TSCs: the offsets alone do not give the guest TSC; use the bracket.
        return tsc_by_msr_bracket(sb, db);
    }
    let now = db.get_clock().map_err(|e| e.to_string())?;
    if now.flags & KVM_CLOCK_HOST_TSC == 0 {
        return tsc_by_msr_bracket(sb, db);
    }
    let mut errs = Vec::new();
    for (n, v) in state.vcpus.iter().enumerate() {
        let ofs_d = db.tsc_offset(n).map_err(|e| e.to_string())?;
        let err = if migration {
            let want = math::tsc_at_kvmclock(v.tsc_ticks, v.kvmclock_ns, now.clock_ns, khz);
            math::diff_signed(now.host_tsc_ticks.wrapping_add(ofs_d), want)
        } else {
            let ofs_s = sb.tsc_offset(n).map_err(|e| e.to_string())?;
            ofs_d.wrapping_sub(ofs_s) as i64
        };
        errs.push(err);
    }
    for o in &obs.vcpus {
        let ofs_d = db.tsc_offset(o.vcpu).map_err(|e| e.to_string())?;
        let h = o.guest_tsc_ticks.wrapping_sub(ofs_d);
        if h < h_started || h > h_paused {
            return Err(format!(
                "vCPU {}: the guest's RDTSC {} minus offset {ofs_d} = host TSC {h}, outside \
                 [{h_started}, {h_paused}] of its run: offsets and guest disagree",
                o.vcpu, o.guest_tsc_ticks
            ));
        }
    }
    let (worst, spread) = worst_and_spread(&errs);
    Ok((worst, spread, TscMethod::Offsets))
}

/// Where offsets are ignored: each destination vCPU's TSC against the source's, read just
/// before and after it (sequential MSR reads: the bracket width is this measurement's
/// resolution). The skew is the spread of those per-vCPU errors, each against its own bracket.
fn tsc_by_msr_bracket(
    sb: &dyn ClockBackend,
    db: &dyn ClockBackend,
) -> Result<(i64, u64, TscMethod), String> {
    let mut errs = Vec::new();
    for v in 0..db.vcpu_count() {
        let a = sb.tsc_msr(v).map_err(|e| e.to_string())?;
        let d = db.tsc_msr(v).map_err(|e| e.to_string())?;
        let b = sb.tsc_msr(v).map_err(|e| e.to_string())?;
        errs.push(math::diff_signed(d, math::midpoint_u64(a, b)));
    }
    let (worst, spread) = worst_and_spread(&errs);
    Ok((worst, spread, TscMethod::MsrBracket))
}

/// The per-vCPU error of largest magnitude (signed) and the spread max − min (the skew).
fn worst_and_spread(errs: &[i64]) -> (i64, u64) {
    let worst = errs
        .iter()
        .copied()
        .max_by_key(|e| e.unsigned_abs())
        .unwrap_or(0);
    let lo = errs.iter().min().copied().unwrap_or(0);
    let hi = errs.iter().max().copied().unwrap_or(0);
    (worst, hi.abs_diff(lo))
}

fn median_us(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn scaling_model(vcpus: usize, reps: usize) -> Result<ScalingRow, String> {
    let mut cap = Vec::new();
    let mut res = Vec::new();
    let mut bytes = 0;
    for rep in 0..reps {
        let (time, h, _) = model_pair(rep as u64, false);
        let src = ModelVm::new(h.clone(), vcpus);
        src.run_all();
        time.advance_ns(1_000_000_000);
        let t0 = Instant::now();
        let st = capture(&src, 0).map_err(|e| e.to_string())?;
        cap.push(t0.elapsed().as_secs_f64() * 1e6);
        bytes = encode(&st, 2).map_err(|e| e.to_string())?.len();
        let dst = ModelVm::new(h, vcpus);
        let t0 = Instant::now();
        restore(&dst, &st, &RestoreOptions::default(), None).map_err(|e| e.to_string())?;
        res.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    Ok(ScalingRow {
        backend: "model".into(),
        vcpus,
        capture_us: median_us(cap),
        restore_us: median_us(res),
        section_bytes: bytes,
    })
}

fn scaling_kvm(vcpus: usize, reps: usize) -> Result<ScalingRow, String> {
    let cfg = VmConfig {
        vcpus,
        memory_mib: 2,
        force_model: false,
        vm_id: [0; 16],
        linux: None,
    };
    let mut cap = Vec::new();
    let mut res = Vec::new();
    let mut bytes = 0;
    for _ in 0..reps {
        let src = Vm::create(&cfg).map_err(|e| e.to_string())?;
        run_until_sampled(&src, "source")?;
        src.pause().map_err(|e| e.to_string())?;
        let b = src.clock_backend();
        let t0 = Instant::now();
        let st = capture(b.as_ref(), 0).map_err(|e| e.to_string())?;
        cap.push(t0.elapsed().as_secs_f64() * 1e6);
        bytes = encode(&st, 2).map_err(|e| e.to_string())?.len();
        let dst = Vm::create(&cfg).map_err(|e| e.to_string())?;
        let db = dst.clock_backend();
        let t0 = Instant::now();
        restore(db.as_ref(), &st, &RestoreOptions::default(), None).map_err(|e| e.to_string())?;
        res.push(t0.elapsed().as_secs_f64() * 1e6);
        src.shutdown();
    }
    Ok(ScalingRow {
        backend: "kvm".into(),
        vcpus,
        capture_us: median_us(cap),
        restore_us: median_us(res),
        section_bytes: bytes,
    })
}

fn drift(hops: usize) -> Result<(i64, i64), String> {
    let (time, h, _) = model_pair(0, false);
    let origin = ModelVm::new(h.clone(), 2);
    for v in 0..2 {
        origin.guest_enable_kvmclock(v).map_err(|e| e.to_string())?;
    }
    origin.run_all();
    time.advance_ns(1_000_000_000);
    let mut cur = ModelVm::new(h.clone(), 2);
    let first = capture(&origin, 0).map_err(|e| e.to_string())?;
    restore(&cur, &first, &RestoreOptions::default(), None).map_err(|e| e.to_string())?;
    for _ in 0..hops.saturating_sub(1) {
        cur.run_all();
        time.advance_ns(10_000_000);
        let s = capture(&cur, 0).map_err(|e| e.to_string())?;
        time.advance_ns(5_000_000);
        let next = ModelVm::new(h.clone(), 2);
        restore(&next, &s, &RestoreOptions::default(), None).map_err(|e| e.to_string())?;
        cur = next;
    }
    let k = math::diff_signed(
        cur.get_clock().map_err(|e| e.to_string())?.clock_ns,
        origin.get_clock().map_err(|e| e.to_string())?.clock_ns,
    );
    let t = math::diff_signed(
        cur.guest_tsc_now(0).map_err(|e| e.to_string())?,
        origin.guest_tsc_now(0).map_err(|e| e.to_string())?,
    );
    Ok((k, t))
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": kernel,
        "clocksource": std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource").unwrap_or_default().trim(),
    })
}

fn kvm_label(kind: &BackendKind) -> &'static str {
    match kind {
        BackendKind::Kvm { flavour } if flavour == "kvm_pvm" => "kvm_pvm",
        BackendKind::Kvm { flavour } if flavour == "kvm_intel" => "kvm_intel",
        BackendKind::Kvm { flavour } if flavour == "kvm_amd" => "kvm_amd",
        BackendKind::Kvm { .. } => "kvm",
        BackendKind::Model { .. } => "none",
    }
}

/// Whether this KVM is itself a guest's (a real KVM module on a CPU that reports a hypervisor),
/// and under what: `Some("QEMU TCG")` in the nested CI lane. kvm_pvm is always a guest's, by
/// design, and is not called nested.
pub fn nested_under(flavour: &str) -> Option<String> {
    if !matches!(flavour, "kvm_amd" | "kvm_intel") {
        return None;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or("");
    if !flags.split_whitespace().any(|f| f == "hypervisor") {
        return None;
    }
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .unwrap_or("");
    if model.contains("QEMU TCG") {
        return Some("QEMU TCG".into());
    }
    let vendor = std::fs::read_to_string("/sys/class/dmi/id/sys_vendor").unwrap_or_default();
    Some(match vendor.trim() {
        "" => "a hypervisor".to_string(),
        v => v.to_string(),
    })
}

/// `bench|demo --guest linux`: the strategy chain of [`linux`] on a real Linux guest, printed
/// and, with `json_path`, written with the machine and KVM flavour.
pub fn run_linux(
    kernel: &Path,
    downtime: Duration,
    skew_ns: i64,
    vmclock: linux::VmclockGuest,
    json_path: Option<&Path>,
) -> Result<(), String> {
    let flavour = guest_clock::backend::host::kvm_flavour();
    let nested = nested_under(flavour);
    println!(
        "clockvmm --guest linux: KVM {flavour}{}; kernel {}; downtime {downtime:?}, migration \
         skew {skew_ns:+} ns",
        nested
            .as_deref()
            .map(|n| format!(" (nested under {n})"))
            .unwrap_or_default(),
        kernel.display()
    );
    println!("machine: {}", machine());
    let dir = crate::demo::TempDir::new("linux-bench")?;
    let cfg = linux::LinuxBenchConfig {
        kernel: kernel.to_path_buf(),
        downtime,
        skew_ns,
        console_dir: dir.0.clone(),
        modules: vmclock.modules,
        tai_offset_fallback_s: vmclock.tai_offset_fallback_s,
    };
    let rows = linux::run(&cfg)?;
    println!();
    linux::print_table(&rows, skew_ns);
    if let Some(p) = json_path {
        let doc = json!({
            "machine": machine(),
            "kvm": flavour,
            "nested": nested.is_some(),
            "nested_under": nested,
            "downtime_ms": downtime.as_millis() as u64,
            "skew_ns": skew_ns,
            "linux": rows,
        });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        std::fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

/// Run the benchmark.
pub fn run(json_path: Option<&Path>, svg_path: Option<&Path>, quick: bool) -> Result<(), String> {
    let reps = if quick { 5 } else { 20 };
    let downtime = Duration::from_millis(if quick { 20 } else { 200 });
    let probe = Vm::create(&VmConfig {
        vcpus: 1,
        memory_mib: 1,
        force_model: false,
        vm_id: [0; 16],
        linux: None,
    })
    .map_err(|e| e.to_string())?;
    let kind = probe.backend_kind().clone();
    drop(probe);
    let kvm = matches!(kind, BackendKind::Kvm { .. });
    let label = kvm_label(&kind);
    let nested = nested_under(label);
    println!(
        "clockvmm bench: {} reps, downtime {downtime:?}; KVM: {label}{}{}",
        reps,
        nested
            .as_deref()
            .map(|n| format!(" (nested under {n})"))
            .unwrap_or_default(),
        if let BackendKind::Model { reason } = &kind {
            format!(" ({reason}: model only)")
        } else {
            String::new()
        }
    );
    println!("machine: {}", machine());

    // 1. strategies, interleaved.
    let backends: Vec<&str> = if kvm {
        vec!["kvm", "model"]
    } else {
        vec!["model"]
    };
    let scenarios = [("live-update", false), ("migration", true)];
    let mut acc: Vec<Vec<Vec<Acc>>> = backends
        .iter()
        .map(|_| {
            scenarios
                .iter()
                .map(|_| Strategy::ALL.iter().map(|_| Acc::default()).collect())
                .collect()
        })
        .collect();
    for rep in 0..reps {
        for (bi, b) in backends.iter().enumerate() {
            for (si, (_, mig)) in scenarios.iter().enumerate() {
                for (ki, s) in Strategy::ALL.iter().enumerate() {
                    let r = if *b == "kvm" {
                        kvm_once(*s, *mig, downtime, label != "kvm_pvm")
                    } else {
                        model_once(*s, rep as u64, *mig, downtime.as_nanos() as u64).map(
                            |(k, t, skew, sig)| KvmRun {
                                kvmclock_error_ns: k,
                                tsc_error_ticks: t,
                                skew_ticks: skew,
                                signalled: sig,
                                tsc_method: TscMethod::Model,
                            },
                        )
                    };
                    let a = &mut acc[bi][si][ki];
                    let r = match r {
                        Err(e) if e.starts_with(DISCARDED) => {
                            log::warn!("{b} {} {}: {e}", s.name(), scenarios[si].0);
                            a.discarded += 1;
                            continue;
                        }
                        r => r.map_err(|e| format!("{b} {} {}: {e}", s.name(), scenarios[si].0))?,
                    };
                    a.k.push(r.kvmclock_error_ns);
                    a.t.push(r.tsc_error_ticks);
                    a.skew = a.skew.max(r.skew_ticks);
                    a.signalled |= r.signalled;
                    // A row mixing methods reports the weaker one (the bracket).
                    a.tsc_method = match (a.tsc_method, r.tsc_method) {
                        (Some(TscMethod::MsrBracket), _) | (_, TscMethod::MsrBracket) => {
                            Some(TscMethod::MsrBracket)
                        }
                        (_, m) => Some(m),
                    };
                }
            }
        }
        eprint!("\r  repetition {}/{reps}", rep + 1);
    }
    eprintln!();
    let mut rows = Vec::new();
    for (bi, b) in backends.iter().enumerate() {
        for (si, (sc, _)) in scenarios.iter().enumerate() {
            for (ki, s) in Strategy::ALL.iter().enumerate() {
                let a = &acc[bi][si][ki];
                let mut signed = a.k.clone();
                signed.sort_unstable();
                rows.push(StrategyRow {
                    name: s.name().into(),
                    backend: b.to_string(),
                    scenario: sc.to_string(),
                    kvmclock_error_ns: Stats::of(&a.k),
                    tsc_error_ticks: Stats::of(&a.t),
                    vcpu_skew_ticks: a.skew as f64,
                    signalled: a.signalled,
                    repetitions: a.k.len(),
                    tsc_method: a.tsc_method.unwrap_or(TscMethod::Model),
                    discarded: a.discarded,
                    kvmclock_error_signed_median_ns: signed
                        .get(signed.len() / 2)
                        .copied()
                        .unwrap_or(0) as f64,
                });
            }
        }
    }
    println!(
        "\n{:<13} {:<7} {:<12} {:>14} {:>14} {:>14} {:>12} {:>12} {:>9} {:<9} {:<12}",
        "strategy",
        "backend",
        "scenario",
        "|kvmclk| med",
        "p99 ns",
        "max ns",
        "|TSC| med",
        "max tk",
        "skew tk",
        "signalled",
        "TSC method",
    );
    for r in &rows {
        println!(
            "{:<13} {:<7} {:<12} {:>14.0} {:>14.0} {:>14.0} {:>12.0} {:>12.0} {:>9.0} {:<9} {:<12}",
            r.name,
            r.backend,
            r.scenario,
            r.kvmclock_error_ns.median,
            r.kvmclock_error_ns.p99,
            r.kvmclock_error_ns.max,
            r.tsc_error_ticks.median,
            r.tsc_error_ticks.max,
            r.vcpu_skew_ticks,
            r.signalled,
            match r.tsc_method {
                TscMethod::Offsets => "offsets",
                TscMethod::MsrBracket => "msr-bracket",
                TscMethod::Model => "model",
            }
        );
    }
    for r in rows.iter().filter(|r| r.discarded > 0) {
        println!(
            "({} {} {}: {} of {} repetitions discarded as impossible measurements)",
            r.name,
            r.backend,
            r.scenario,
            r.discarded,
            r.discarded + r.repetitions
        );
    }
    if let Some(r) = rows.iter().find(|r| r.repetitions == 0) {
        return Err(format!(
            "{} {} {}: every repetition was discarded; no figure to report",
            r.name, r.backend, r.scenario
        ));
    }
    println!("(migration: the destination wallclock is {SKEW_NS:+} ns off; strategies that use W inherit it. \
model migration also changes the host TSC rate {SRC_KHZ} -> {DST_KHZ} kHz)");

    // 2. scaling.
    let sizes = [1usize, 2, 8, 64, 256];
    let sreps = if quick { 3 } else { 11 };
    let mut scaling = Vec::new();
    for &n in &sizes {
        scaling.push(scaling_model(n, sreps)?);
        if kvm {
            match scaling_kvm(n, if quick { 2 } else { 5 }) {
                Ok(r) => scaling.push(r),
                Err(e) => println!("kvm scaling stops at {n} vCPUs: {e}"),
            }
        }
    }
    println!(
        "\n{:<7} {:>6} {:>12} {:>12} {:>14}",
        "backend", "vCPUs", "capture µs", "restore µs", "section bytes"
    );
    for s in &scaling {
        println!(
            "{:<7} {:>6} {:>12.1} {:>12.1} {:>14}",
            s.backend, s.vcpus, s.capture_us, s.restore_us, s.section_bytes
        );
    }

    // 3. drift.
    let hops = 1000;
    let (dk, dt) = drift(hops)?;
    println!("\ndrift over {hops} model live updates: kvmclock {dk} ns, TSC {dt} ticks");

    let out = json!({
        "machine": machine(),
        "kvm": label,
        "nested": nested.is_some(),
        "nested_under": nested,
        "quick": quick,
        "downtime_ms": downtime.as_millis() as u64,
        "skew_ns": SKEW_NS,
        "strategies": rows,
        "scaling": scaling,
        "drift": {"hops": hops, "kvmclock_error_ns": dk as f64, "tsc_error_ticks": dt as f64},
    });
    if let Some(p) = json_path {
        std::fs::write(
            p,
            serde_json::to_vec_pretty(&out).map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("{}: {e}", p.display()))?;
        println!("wrote {}", p.display());
    }
    if let Some(p) = svg_path {
        svg(p, &rows, &scaling)?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn svg(path: &Path, rows: &[StrategyRow], scaling: &[ScalingRow]) -> Result<(), String> {
    use plotters::prelude::*;
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let root = SVGBackend::new(path, (1100, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (left, right) = root.split_horizontally(620);
    let labels: Vec<String> = rows
        .iter()
        .map(|r| format!("{} {} {}", r.name, r.backend, r.scenario))
        .collect();
    let ymax = rows
        .iter()
        .map(|r| r.kvmclock_error_ns.max.max(1.0))
        .fold(1.0, f64::max)
        * 10.0;
    let mut c = ChartBuilder::on(&left)
        .caption(
            "|kvmclock error| median (dot) and max (x), ns",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(150)
        .y_label_area_size(60)
        .build_cartesian_2d(0..labels.len(), (0.5f64..ymax).log_scale())
        .map_err(|x| e(&x))?;
    c.configure_mesh()
        .x_labels(labels.len())
        .x_label_formatter(&|i| labels.get(*i).cloned().unwrap_or_default())
        .x_label_style(
            ("sans-serif", 9)
                .into_font()
                .transform(FontTransform::Rotate90),
        )
        .draw()
        .map_err(|x| e(&x))?;
    c.draw_series(
        rows.iter()
            .enumerate()
            .map(|(i, r)| Circle::new((i, r.kvmclock_error_ns.median.max(0.6)), 4, BLUE.filled())),
    )
    .map_err(|x| e(&x))?;
    c.draw_series(
        rows.iter()
            .enumerate()
            .map(|(i, r)| Cross::new((i, r.kvmclock_error_ns.max.max(0.6)), 4, RED)),
    )
    .map_err(|x| e(&x))?;
    let tmax = scaling
        .iter()
        .map(|s| s.restore_us.max(s.capture_us))
        .fold(1.0, f64::max)
        * 1.2;
    let mut c2 = ChartBuilder::on(&right)
        .caption("capture / restore cost vs vCPUs, µs", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((1f64..300f64).log_scale(), 0f64..tmax)
        .map_err(|x| e(&x))?;
    c2.configure_mesh()
        .x_desc("vCPUs")
        .draw()
        .map_err(|x| e(&x))?;
    for (b, color) in [("model", BLUE), ("kvm", RED)] {
        let pts: Vec<&ScalingRow> = scaling.iter().filter(|s| s.backend == b).collect();
        if pts.is_empty() {
            continue;
        }
        c2.draw_series(LineSeries::new(
            pts.iter().map(|s| (s.vcpus as f64, s.capture_us)),
            color,
        ))
        .map_err(|x| e(&x))?
        .label(format!("{b} capture"))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
        c2.draw_series(LineSeries::new(
            pts.iter().map(|s| (s.vcpus as f64, s.restore_us)),
            color.mix(0.5),
        ))
        .map_err(|x| e(&x))?
        .label(format!("{b} restore"))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color.mix(0.5)));
    }
    c2.configure_series_labels()
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats() {
        let s = Stats::of(&[-5, 1, 3, 2, 4]);
        assert_eq!((s.median, s.p99, s.max), (3.0, 5.0, 5.0));
        assert_eq!(Stats::of(&[]).max, 0.0);
    }

    #[test]
    fn guest_clock_beats_naive_on_the_model() {
        let (k_ours, t_ours, skew, sig) =
            model_once(Strategy::GuestClock, 1, false, 200_000_000).unwrap();
        let (k_naive, _, _, _) = model_once(Strategy::Naive, 1, false, 200_000_000).unwrap();
        assert!(k_ours.abs() <= 2, "{k_ours}");
        assert_eq!(t_ours, 0);
        assert_eq!(skew, 0);
        assert!(!sig);
        assert!(
            k_naive.abs() > 100_000_000,
            "naive loses the downtime: {k_naive}"
        );
    }
}

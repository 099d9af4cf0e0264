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

pub mod strategies;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_clock::backend::model::{HostConfig, ModelHost, ModelTime, ModelVm};
use guest_clock::backend::Hypervisor;
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

/// One KVM run: a source guest runs, pauses; a new VM is restored with the strategy after the
/// downtime and started; the error is measured on the destination guest's own samples against
/// the paused source's pvclock function.
fn kvm_once(
    s: Strategy,
    migration: bool,
    downtime: Duration,
) -> Result<(i64, i64, u64, bool), String> {
    let cfg = VmConfig {
        vcpus: 2,
        memory_mib: 1,
        force_model: false,
    };
    let src = Vm::create(&cfg).map_err(|e| e.to_string())?;
    src.start().map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(5));
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
    let signalled = s.apply(dst.clock_backend().as_ref(), &state, mode, skew)?;
    dst.start().map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let obs = loop {
        let o = dst.observe().map_err(|e| e.to_string())?;
        if o.vcpus.len() == cfg.vcpus && o.vcpus.iter().all(|v| v.samples > 0) {
            break o;
        }
        if Instant::now() > deadline {
            return Err("destination guest produced no samples".into());
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    dst.pause().map_err(|e| e.to_string())?;
    let mut worst = 0i64;
    for o in &obs.vcpus {
        let p = src
            .pvclock(o.vcpu)
            .map_err(|e| e.to_string())?
            .ok_or("source pvclock unreadable")?;
        // The source's pvclock function at the destination guest's TSC, signed: the sample may
        // precede the source page's tsc_timestamp, where the guest's u64 formula would wrap.
        let want = math::pvclock_eval_ns(&p, o.guest_tsc_ticks);
        let e = (i128::from(o.guest_kvmclock_ns) - want)
            .clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
        if e.unsigned_abs() > worst.unsigned_abs() {
            worst = e;
        }
    }
    // TSC: each destination vCPU's TSC against the source's, read just before and after it
    // (sequential MSR reads: the bracket width is this measurement's resolution). The skew is
    // the spread of those per-vCPU errors, each against its own bracket.
    let db = dst.clock_backend();
    let mut tsc_worst = 0i64;
    let mut errs = Vec::new();
    for v in 0..cfg.vcpus {
        let a = sb.tsc_msr(v).map_err(|e| e.to_string())?;
        let d = db.tsc_msr(v).map_err(|e| e.to_string())?;
        let b = sb.tsc_msr(v).map_err(|e| e.to_string())?;
        let e = math::diff_signed(d, math::midpoint_u64(a, b));
        if e.unsigned_abs() > tsc_worst.unsigned_abs() {
            tsc_worst = e;
        }
        errs.push(e);
    }
    let skew = errs
        .iter()
        .max()
        .copied()
        .unwrap_or(0)
        .abs_diff(errs.iter().min().copied().unwrap_or(0));
    src.shutdown();
    dst.shutdown();
    Ok((worst, tsc_worst, skew, signalled))
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
    };
    let mut cap = Vec::new();
    let mut res = Vec::new();
    let mut bytes = 0;
    for _ in 0..reps {
        let src = Vm::create(&cfg).map_err(|e| e.to_string())?;
        src.start().map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_millis(2));
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
        BackendKind::Kvm { flavour } if flavour == "kvm_pvm" => "pvm",
        BackendKind::Kvm { flavour } if flavour == "kvm_intel" => "kvm_intel",
        BackendKind::Kvm { flavour } if flavour == "kvm_amd" => "kvm_amd",
        BackendKind::Kvm { .. } => "kvm",
        BackendKind::Model { .. } => "none",
    }
}

/// Run the benchmark.
pub fn run(json_path: Option<&Path>, svg_path: Option<&Path>, quick: bool) -> Result<(), String> {
    let reps = if quick { 5 } else { 20 };
    let downtime = Duration::from_millis(if quick { 20 } else { 200 });
    let probe = Vm::create(&VmConfig {
        vcpus: 1,
        memory_mib: 1,
        force_model: false,
    })
    .map_err(|e| e.to_string())?;
    let kind = probe.backend_kind().clone();
    drop(probe);
    let kvm = matches!(kind, BackendKind::Kvm { .. });
    let label = kvm_label(&kind);
    println!(
        "clockvmm bench: {} reps, downtime {downtime:?}; KVM: {label}{}",
        reps,
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
                        kvm_once(*s, *mig, downtime)
                    } else {
                        model_once(*s, rep as u64, *mig, downtime.as_nanos() as u64)
                    };
                    let (k, t, skew, sig) =
                        r.map_err(|e| format!("{b} {} {}: {e}", s.name(), scenarios[si].0))?;
                    let a = &mut acc[bi][si][ki];
                    a.k.push(k);
                    a.t.push(t);
                    a.skew = a.skew.max(skew);
                    a.signalled |= sig;
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
                    kvmclock_error_signed_median_ns: signed
                        .get(signed.len() / 2)
                        .copied()
                        .unwrap_or(0) as f64,
                });
            }
        }
    }
    println!(
        "\n{:<13} {:<7} {:<12} {:>14} {:>14} {:>14} {:>12} {:>12} {:>9} signalled",
        "strategy",
        "backend",
        "scenario",
        "|kvmclk| med",
        "p99 ns",
        "max ns",
        "|TSC| med",
        "max tk",
        "skew tk",
    );
    for r in &rows {
        println!(
            "{:<13} {:<7} {:<12} {:>14.0} {:>14.0} {:>14.0} {:>12.0} {:>12.0} {:>9.0} {}",
            r.name,
            r.backend,
            r.scenario,
            r.kvmclock_error_ns.median,
            r.kvmclock_error_ns.p99,
            r.kvmclock_error_ns.max,
            r.tsc_error_ticks.median,
            r.tsc_error_ticks.max,
            r.vcpu_skew_ticks,
            r.signalled
        );
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

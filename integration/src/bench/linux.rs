//! The restore strategies measured by a real Linux guest's own clocks (`clockvmm demo|bench
//! --guest linux`): for each guest clocksource (kvm-clock; tsc, with the invariant TSC
//! advertised) one guest boots, then goes through a chain of disruptions — per strategy a live
//! update (same host) and a live migration (destination wallclock skewed) — each into a new VM
//! built from the old one's whole state (memory, vCPU state, irqchip, PIT, serial) with the
//! strategy restoring the clocks. The guest probe's samples before and after each hop give:
//!
//! - CLOCK_REALTIME error = (guest − host realtime after) − (guest − host before) − skew: 0 when
//!   the guest's wall clock follows the destination's (host + skew);
//! - CLOCK_MONOTONIC error = its advance − the time between the two samples on the
//!   destination's timeline (host time, plus the skew on a migration: kvmclock is rebuilt from
//!   (K, W) and the destination's wallclock, so a guest whose clocks follow that wallclock
//!   counts the skew too); 0: the guest counted the downtime as time that passed;
//! - TSC error = guest TSC advance − that time × the guest's TSC rate, ticks (0: continuous);
//!
//!   per vCPU the samples compared are the narrowest (smallest RDTSC bracket) of the last two
//!   probe rounds before the pause and of the first rounds read after the landing (never the
//!   one sample whose line was still in the guest's tty at the pause:
//!   [`first_seq_after_pause`]): a vCPU exit
//!   inside a sample's bracket (seen: 32 µs under the nested lane) makes its host time that
//!   uncertain, and the row's `bracket_ns` is the widest bracket left;
//! - the kernel's complaints about time (watchdog, soft lockup, "time went backwards");
//! - with guest modules (ptp_vmclock) given: the guests also have clockvmm's vmclock ACPI device
//!   and guest-clock's hops go through a [`ClockManager`] that owns the page (written before the
//!   guest boots, rewritten by each restore before the first KVM_RUN, re-anchored every 200 ms
//!   while the guest runs, as a VMM's timer thread does). Its PTP clock (PHC) is measured
//!   against host time before the hop and against the destination's time (host + skew) after
//!   it, beside the guest's CLOCK_REALTIME, with the page's disruption marker, generation and
//!   status as the guest read them from `/dev/vmclock0`. The other strategies do not maintain a
//!   page (none of them has a vmclock writer that fills the time): no PHC figure for them.
//!
//! The chain runs guest-clock first and naive last: a strategy that breaks the guest's clocks
//! leaves the hops after it measuring relative to a broken guest (each hop compares the guest
//! with itself just before, so figures stay per-hop), and a guest that stops reporting ends its
//! chain with that reason in the table.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use guest_clock::capture::capture;
use guest_clock::restore::{RestoreMode, RestoreOptions};
use guest_clock::vmclock::{clock_status_name, VmclockConfig};
use guest_clock::ClockManager;
use serde::Serialize;
use vm_migration::Snapshot;

use super::strategies::Strategy;
use crate::vm::linux::measure::{
    disruption, first_seq_after_pause, narrowest, LinuxPhcSample, LinuxSample,
};
use crate::vm::linux::state::MachineState;
use crate::vm::linux::{LinuxConfig, LinuxObservation};
use crate::vm::{Vm, VmConfig};

/// A guest that makes no progress (see [`wait_samples_within`]) for this long is stuck; no
/// fixed deadline otherwise (the nested lane is ~10× slower than native and varies). The probe
/// samples every 200 ms of guest time.
const STALL: Duration = Duration::from_secs(90);

/// One hop of the chain.
#[derive(Debug, Clone, Serialize)]
pub struct LinuxRow {
    /// The clocksource the guest was booted for (`kvm-clock`, `tsc`).
    pub clocksource: String,
    /// The one the guest reported using.
    pub clocksource_seen: Option<String>,
    /// Restore strategy.
    pub strategy: &'static str,
    /// `live update` or `live migration`.
    pub scenario: &'static str,
    /// Worst vCPU's CLOCK_REALTIME error (see the module doc), ns.
    pub realtime_error_ns: Option<i64>,
    /// Worst vCPU's CLOCK_MONOTONIC error, ns.
    pub monotonic_error_ns: Option<i64>,
    /// Worst vCPU's TSC error, ticks.
    pub tsc_error_ticks: Option<i64>,
    /// Host time between the samples compared, ns (the downtime plus sampling gaps).
    pub host_elapsed_ns: Option<i64>,
    /// The widest half RDTSC bracket of the samples compared, ns: the figures' uncertainty
    /// (per vCPU the narrowest of the last two probe rounds before the pause and of the first
    /// ones after the landing are compared).
    pub bracket_ns: Option<u64>,
    /// The guest was signalled (PVCLOCK_GUEST_STOPPED).
    pub signalled: bool,
    /// Kernel complaints about time after the hop.
    pub complaints: Vec<String>,
    /// The guest's vmclock PTP clock across the hop (guest-clock with guest modules only).
    pub phc: Option<PhcHop>,
    /// Why figures are missing (the hop failed, or the guest stopped reporting).
    pub note: Option<String>,
}

/// The guest's vmclock PTP clock (ptp_vmclock over clockvmm's page) across one hop, worst vCPU.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhcHop {
    /// The PTP device (`ptpN`).
    pub device: Option<String>,
    /// PHC − host time (on the PHC's timescale) just before the pause, ns.
    pub error_before_ns: Option<i64>,
    /// PHC − the destination's time (host + skew on a migration) once the guest ran again, ns.
    pub error_after_ns: Option<i64>,
    /// The uncertainty of `error_after_ns`: the half RDTSC bracket of the system-clock sample
    /// it goes through, ns.
    pub bracket_after_ns: Option<u64>,
    /// Guest CLOCK_REALTIME − the destination's time at the same samples, ns: the system
    /// clock's standing error, which a restore preserves (NTP's to correct), where the PHC is
    /// the host's time.
    pub realtime_offset_after_ns: Option<i64>,
    /// `disruption_marker` the guest read before and after.
    pub marker: Option<(u64, u64)>,
    /// `vm_generation_counter` the guest read before and after.
    pub generation: Option<(u64, u64)>,
    /// `clock_status` the guest read after the hop.
    pub clock_status_after: Option<&'static str>,
    /// Why a figure is missing.
    pub note: Option<String>,
}

/// What a chain run needs.
#[derive(Debug, Clone)]
pub struct LinuxBenchConfig {
    /// The bzImage.
    pub kernel: PathBuf,
    /// Downtime of each hop.
    pub downtime: Duration,
    /// The migration's destination wallclock skew, ns.
    pub skew_ns: i64,
    /// Where the guests' consoles go (appended across hops).
    pub console_dir: PathBuf,
    /// Kernel modules for the guests (ptp_vmclock and what it depends on, in load order).
    /// Non-empty: the guests get the vmclock ACPI device and the PHC is measured.
    pub modules: Vec<PathBuf>,
    /// TAI − UTC for the vmclock page when the host does not know it.
    pub tai_offset_fallback_s: Option<i16>,
}

/// What makes the bench's guests vmclock guests (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct VmclockGuest {
    /// See [`LinuxBenchConfig::modules`].
    pub modules: Vec<PathBuf>,
    /// See [`LinuxBenchConfig::tai_offset_fallback_s`].
    pub tai_offset_fallback_s: Option<i16>,
}

impl LinuxBenchConfig {
    fn vmclock(&self) -> bool {
        !self.modules.is_empty()
    }
}

/// How often the bench re-anchors a guest-clock guest's vmclock page (a VMM's timer thread).
const VMCLOCK_REFRESH: Duration = Duration::from_millis(200);

/// A running guest and, when its vmclock page is maintained, the [`ClockManager`] that owns it.
struct Guest {
    vm: Vm,
    clock: Option<ClockManager<'static>>,
}

impl Guest {
    /// Its vmclock page is maintained, so its PHC is measured.
    fn measures_phc(&self) -> bool {
        self.clock
            .as_ref()
            .is_some_and(|c| c.vmclock_updater().is_some())
    }
}

/// The manager a VMM gives `vm`: with the vmclock page when the bench measures the PHC.
fn clock_manager(vm: &Vm, cfg: &LinuxBenchConfig) -> ClockManager<'static> {
    let backend = vm.clock_backend();
    let m = ClockManager::new(backend.clone()).with_vm_id(vm.config().vm_id);
    if !cfg.vmclock() {
        return m;
    }
    let mut c = VmclockConfig::for_backend(backend.as_ref());
    c.tai_offset_fallback_s = cfg.tai_offset_fallback_s;
    let ns = VMCLOCK_REFRESH.as_nanos() as u64;
    c.refresh_period_ns = ns - ns / 8;
    m.with_vmclock_config(vm.vmclock_memory(), c)
}

/// Wait until every vCPU reported a sample with sequence ≥ `min_seq`, failing when the guest
/// made no progress for `stall`: no new console line while it boots (no sample yet), no new
/// probe sample once it sampled — a guest whose kernel keeps printing complaints while its
/// probe no longer runs is stuck too.
fn wait_samples_within(
    g: &Guest,
    min_seq: u64,
    stall: Duration,
) -> Result<LinuxObservation, String> {
    let vm = &g.vm;
    let mut last_mark = (0, 0);
    let mut progress = Instant::now();
    loop {
        if let Some(Err(e)) = g.clock.as_ref().and_then(|c| c.refresh_vmclock_running()) {
            log::warn!("vmclock refresh failed: {e}");
        }
        let o = vm
            .observe()
            .map_err(|e| e.to_string())?
            .linux
            .ok_or("not a Linux guest")?;
        let n = vm.vcpu_count();
        if o.latest.len() == n
            && o.latest.iter().all(|s| s.seq >= min_seq)
            && (!g.measures_phc() || phc_settled(&o, n, min_seq))
        {
            return Ok(o);
        }
        if let Some(why) = &o.stopped {
            return Err(format!("the guest stopped: {why}"));
        }
        let seq = o.latest.iter().map(|s| s.seq + 1).max().unwrap_or(0);
        let mark = if seq > 0 {
            (seq, 0)
        } else {
            (0, o.console_lines)
        };
        if mark != last_mark {
            last_mark = mark;
            progress = Instant::now();
        }
        if progress.elapsed() > stall {
            return Err(format!(
                "the guest stopped reporting (no new {} for {} s)",
                if seq > 0 {
                    "probe sample"
                } else {
                    "console line"
                },
                stall.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_samples(g: &Guest, min_seq: u64) -> Result<LinuxObservation, String> {
    wait_samples_within(g, min_seq, STALL)
}

/// Every vCPU has a PHC reading with an error from sample `min_seq` on, or the probe found no
/// vmclock PTP clock, or its readings fail (then there is nothing to wait for: the row says
/// why).
fn phc_settled(o: &LinuxObservation, vcpus: usize, min_seq: u64) -> bool {
    let fresh = o
        .phc_latest
        .iter()
        .filter(|p| p.seq >= min_seq && p.phc_error_ns.is_some())
        .count();
    fresh == vcpus
        || o.phc_unavailable.is_some()
        || (!o.phc_errors.is_empty() && o.phc_latest.is_empty())
}

fn boot(cfg: &LinuxBenchConfig, invariant_tsc: bool) -> Result<Guest, String> {
    let name = if invariant_tsc { "tsc" } else { "kvm-clock" };
    let vm_cfg = VmConfig {
        vcpus: 2,
        memory_mib: 256,
        force_model: false,
        vm_id: crate::vm::new_vm_id(),
        linux: Some(LinuxConfig {
            kernel: cfg.kernel.clone(),
            initrd: None,
            cmdline: "gcprobe_period_ms=200".into(),
            serial: Some(cfg.console_dir.join(format!("console-{name}.log"))),
            invariant_tsc,
            acpi_vmclock: cfg.vmclock(),
            modules: cfg.modules.clone(),
        }),
    };
    let vm = Vm::create(&vm_cfg).map_err(|e| e.to_string())?;
    // The page is written before the guest boots: ptp_vmclock probes it once.
    let clock = cfg.vmclock().then(|| clock_manager(&vm, cfg));
    vm.start().map_err(|e| e.to_string())?;
    Ok(Guest { vm, clock })
}

/// Boot attempts before the bench gives up on a guest that stalls in its own boot.
const BOOT_ATTEMPTS: u32 = 3;

/// Boot and wait for the first samples; a boot that stalls before the probe reported is
/// retried, up to [`BOOT_ATTEMPTS`] boots, each retry said on stderr (under the nested lane
/// with 2 L1 vCPUs QEMU's TCG SVM delivered an interrupt twice and deadlocked 4 of 12 boots;
/// `integration/nested/run` gives the L1 one vCPU).
fn boot_sampled(
    cfg: &LinuxBenchConfig,
    invariant_tsc: bool,
) -> Result<(Guest, LinuxObservation), String> {
    let mut attempt = 1;
    loop {
        let g = boot(cfg, invariant_tsc)?;
        match wait_samples_within(&g, 2, Duration::from_secs(120)) {
            Ok(o) => return Ok((g, o)),
            Err(e) if attempt < BOOT_ATTEMPTS => {
                eprintln!(
                    "clockvmm bench: the Linux guest's boot stalled (attempt {attempt} of \
                     {BOOT_ATTEMPTS}: {e}); booting it again"
                );
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The machine state through its snapshot format (what a VMM writes and reads back).
fn machine_round_trip(vm: &Vm) -> Result<MachineState, String> {
    let mut root = Snapshot::default();
    for (id, child) in vm.save_machine().map_err(|e| e.to_string())? {
        root.add_snapshot(id, child);
    }
    let bytes = serde_json::to_vec(&root).map_err(|e| e.to_string())?;
    let root: Snapshot = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    MachineState::from_snapshot(&root, vm.vcpu_count()).map_err(|e| e.to_string())
}

/// Per-hop figures: the worst vCPU of each column.
struct Figures {
    realtime_ns: i64,
    monotonic_ns: i64,
    tsc_ticks: i64,
    elapsed_ns: i64,
    /// The widest `LinuxDisruption::bracket_ns` of the vCPUs compared.
    bracket_ns: Option<u64>,
}

fn figures(before: &[LinuxSample], after: &[LinuxSample], khz: u32, skew_ns: i64) -> Figures {
    let worst = |a: i64, b: i64| {
        if b.unsigned_abs() > a.unsigned_abs() {
            b
        } else {
            a
        }
    };
    let mut f = Figures {
        realtime_ns: 0,
        monotonic_ns: 0,
        tsc_ticks: 0,
        elapsed_ns: 0,
        bracket_ns: None,
    };
    for a in after {
        if let Some(b) = before.iter().find(|b| b.vcpu == a.vcpu) {
            let d = disruption(b, a, khz);
            let moved = d.realtime_error_after_ns - d.realtime_error_before_ns;
            f.realtime_ns = worst(f.realtime_ns, moved - skew_ns);
            let skew_ticks = (i128::from(skew_ns) * i128::from(khz) / 1_000_000) as i64;
            f.monotonic_ns = worst(f.monotonic_ns, d.monotonic_error_ns - skew_ns);
            f.tsc_ticks = worst(f.tsc_ticks, d.tsc_error_ticks - skew_ticks);
            f.elapsed_ns = f.elapsed_ns.max(d.host_elapsed_ns);
            f.bracket_ns = f.bracket_ns.max(Some(d.bracket_ns));
        }
    }
    f
}

/// One hop: pause `cur`, save everything, end it, wait the downtime, build a new VM from the
/// saved state with strategy `s` restoring the clocks, run it until it reported again.
fn hop(
    cur: Guest,
    s: Strategy,
    migration: bool,
    cfg: &LinuxBenchConfig,
    row: &mut LinuxRow,
) -> Result<Guest, String> {
    let Guest { vm: cur, clock } = cur;
    cur.pause().map_err(|e| e.to_string())?;
    let before = cur
        .observe()
        .map_err(|e| e.to_string())?
        .linux
        .ok_or("not a Linux guest")?;
    let last = before.latest.iter().map(|x| x.seq).max().unwrap_or(0);
    let n = cur.vcpu_count() as u64;
    // The last two probe rounds before the pause: per vCPU the sample (the observation's
    // baseline) and the PHC reading with the narrowest RDTSC bracket (a vCPU exit inside a
    // sample's bracket makes its host time uncertain by as much).
    let recent = |seq: u64| seq + 2 * n > last;
    let before_samples = before.baseline.clone();
    let before_phc = narrowest(
        cur.linux_phc_samples(),
        |p| recent(p.seq) && p.phc_error_ns.is_some(),
        |p| p.sample_bracket_ns.unwrap_or(u64::MAX),
    );
    let state = match clock {
        Some(mut m) => m.capture_now().map_err(|e| e.to_string())?,
        None => capture(cur.clock_backend().as_ref(), 0).map_err(|e| e.to_string())?,
    };
    let machine = machine_round_trip(&cur)?;
    let mut memory = Vec::new();
    cur.save_memory(&mut memory).map_err(|e| e.to_string())?;
    let vm_cfg = cur.config().clone();
    drop(cur);
    std::thread::sleep(cfg.downtime);
    let dst = Vm::create(&vm_cfg).map_err(|e| e.to_string())?;
    dst.load_memory(&mut memory.as_slice())
        .map_err(|e| e.to_string())?;
    dst.restore_machine(&machine).map_err(|e| e.to_string())?;
    let (mode, skew) = if migration {
        (RestoreMode::LiveMigration, cfg.skew_ns)
    } else {
        (RestoreMode::LiveUpdate, 0)
    };
    let clock = if s == Strategy::GuestClock {
        // As a VMM does: its manager (and vmclock writer) over the new VM.
        let mut m = clock_manager(&dst, cfg);
        m.set_restore_options(RestoreOptions {
            mode: Some(mode),
            inject_wallclock_skew_ns: skew,
            ..RestoreOptions::default()
        });
        let report = m.restore_state(&state).map_err(|e| e.to_string())?;
        row.signalled = report.signalled.any();
        Some(m)
    } else {
        row.signalled = s.apply(dst.clock_backend().as_ref(), &state, mode, skew)?;
        None
    };
    dst.start().map_err(|e| e.to_string())?;
    let g = Guest { vm: dst, clock };
    // Two whole probe rounds after the first sample read past the hop: the guest's vmclock
    // view (printed once a round) is then one it read after the restore.
    let first = first_seq_after_pause(last);
    let min_seq = first + 2 * n;
    let after = wait_samples(&g, min_seq)?;
    let landed = |seq: u64| seq >= first && seq <= min_seq;
    let after_samples = narrowest(g.vm.linux_samples(), |s| landed(s.seq), |s| s.bracket_ns);
    let after_phc = narrowest(
        g.vm.linux_phc_samples(),
        |p| landed(p.seq) && p.phc_error_ns.is_some(),
        |p| p.sample_bracket_ns.unwrap_or(u64::MAX),
    );
    let khz = g.vm.guest_tsc_khz();
    let f = figures(&before_samples, &after_samples, khz, skew);
    row.bracket_ns = f.bracket_ns;
    row.realtime_error_ns = Some(f.realtime_ns);
    row.monotonic_error_ns = Some(f.monotonic_ns);
    row.tsc_error_ticks = Some(f.tsc_ticks);
    row.host_elapsed_ns = Some(f.elapsed_ns);
    row.complaints = after.complaints.clone();
    row.clocksource_seen = after.clocksource.clone();
    if g.measures_phc() {
        row.phc = Some(phc_hop(&before, &after, &before_phc, &after_phc, skew));
    }
    Ok(g)
}

/// The larger in magnitude.
fn worst(a: Option<i64>, b: i64) -> Option<i64> {
    Some(match a {
        Some(a) if a.unsigned_abs() >= b.unsigned_abs() => a,
        _ => b,
    })
}

/// The PHC across a hop: `before_phc` and `after_phc` are per vCPU the narrowest readings
/// just before the pause and right after the landing; after against the destination's time
/// (host + `skew_ns`); the guest's view of the page from the observations.
fn phc_hop(
    before: &LinuxObservation,
    after: &LinuxObservation,
    before_phc: &[LinuxPhcSample],
    after_phc: &[LinuxPhcSample],
    skew_ns: i64,
) -> PhcHop {
    let mut h = PhcHop {
        device: after_phc.first().map(|p| p.dev.clone()),
        ..PhcHop::default()
    };
    for p in before_phc {
        if let Some(e) = p.phc_error_ns {
            h.error_before_ns = worst(h.error_before_ns, e);
        }
    }
    for p in after_phc {
        if let Some(e) = p.phc_error_ns {
            h.error_after_ns = worst(h.error_after_ns, e - skew_ns);
        }
        if let Some(e) = p.guest_realtime_error_ns {
            h.realtime_offset_after_ns = worst(h.realtime_offset_after_ns, e - skew_ns);
        }
        h.bracket_after_ns = h.bracket_after_ns.max(p.sample_bracket_ns);
    }
    if let (Some(b), Some(a)) = (&before.guest_vmclock, &after.guest_vmclock) {
        h.marker = Some((b.disruption_marker, a.disruption_marker));
        h.generation = Some((b.vm_generation_counter, a.vm_generation_counter));
        h.clock_status_after = Some(clock_status_name(a.clock_status));
    }
    h.note = if let Some(why) = &after.phc_unavailable {
        Some(format!("no vmclock PTP clock: {why}"))
    } else if h.error_after_ns.is_none() {
        Some(format!(
            "no PHC reading after the hop: {}",
            after
                .phc_errors
                .first()
                .map_or("none reported", String::as_str)
        ))
    } else if after.guest_vmclock.is_none() {
        Some(
            after
                .guest_vmclock_unavailable
                .clone()
                .unwrap_or_else(|| "the guest reported no vmclock view".into()),
        )
    } else {
        None
    };
    h
}

/// Run the chain for both clocksources. Never fails once a guest booted: a failed hop is a row
/// with its reason, and the rest of that chain is marked as not run.
pub fn run(cfg: &LinuxBenchConfig) -> Result<Vec<LinuxRow>, String> {
    let mut rows = Vec::new();
    for (invariant_tsc, name) in [(false, "kvm-clock"), (true, "tsc")] {
        let (g, first) = boot_sampled(cfg, invariant_tsc)?;
        let mut cur = Some(g);
        log::info!(
            "Linux guest ({name} requested) reports clocksource {:?}",
            first.clocksource
        );
        for s in Strategy::ALL.iter().rev() {
            for migration in [false, true] {
                let mut row = LinuxRow {
                    clocksource: name.into(),
                    clocksource_seen: first.clocksource.clone(),
                    strategy: s.name(),
                    scenario: if migration {
                        "live migration"
                    } else {
                        "live update"
                    },
                    realtime_error_ns: None,
                    monotonic_error_ns: None,
                    tsc_error_ticks: None,
                    host_elapsed_ns: None,
                    bracket_ns: None,
                    signalled: false,
                    complaints: Vec::new(),
                    phc: None,
                    note: None,
                };
                match cur.take() {
                    None => row.note = Some("not run: an earlier hop of this chain failed".into()),
                    Some(g) => match hop(g, *s, migration, cfg, &mut row) {
                        Ok(next) => cur = Some(next),
                        Err(e) => row.note = Some(e),
                    },
                }
                println!(
                    "  {name:<9} {:<12} {:<14} REALTIME {} ns, MONOTONIC {} ns, TSC {} ticks{}{}",
                    row.strategy,
                    row.scenario,
                    cell(row.realtime_error_ns),
                    cell(row.monotonic_error_ns),
                    cell(row.tsc_error_ticks),
                    row.phc
                        .as_ref()
                        .map(|p| format!(
                            ", PHC {} → {} ns",
                            cell(p.error_before_ns),
                            cell(p.error_after_ns)
                        ))
                        .unwrap_or_default(),
                    row.note
                        .as_deref()
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default()
                );
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

fn cell(v: Option<i64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// Print the table.
pub fn print_table(rows: &[LinuxRow], skew_ns: i64) {
    println!(
        "{:<10} {:<13} {:<15} {:>14} {:>14} {:>12} {:>9}  complaints / note",
        "clocksrc", "strategy", "scenario", "REALTIME ns", "MONOTONIC ns", "TSC ticks", "signalled"
    );
    for r in rows {
        let tail = match (&r.note, r.complaints.len()) {
            (Some(n), _) => n.clone(),
            (None, 0) => "none".into(),
            (None, n) => format!("{n}: {}", r.complaints[0]),
        };
        println!(
            "{:<10} {:<13} {:<15} {:>14} {:>14} {:>12} {:>9}  {}",
            r.clocksource_seen.as_deref().unwrap_or(&r.clocksource),
            r.strategy,
            r.scenario,
            cell(r.realtime_error_ns),
            cell(r.monotonic_error_ns),
            cell(r.tsc_error_ticks),
            if r.signalled { "yes" } else { "no" },
            tail
        );
    }
    println!();
    println!("The Linux guest's own clocks across each hop (worst vCPU; 0 is perfect):");
    println!("- REALTIME: change of guest CLOCK_REALTIME − host realtime, minus the destination's");
    println!(
        "  skew ({skew_ns:+} ns on migration): the guest's wall clock should follow the host's;"
    );
    println!("- MONOTONIC: CLOCK_MONOTONIC advance − time elapsed on the destination's timeline");
    println!("  (host time, + the skew on migration): the downtime counted;");
    println!("- TSC: guest TSC advance − that time × TSC rate (continuous TSC).");
    print_phc_table(rows);
}

fn pair(p: Option<(u64, u64)>) -> String {
    p.map_or_else(|| "-".into(), |(a, b)| format!("{a}→{b}"))
}

/// The PHC rows (guest-clock hops of vmclock guests), if any.
fn print_phc_table(rows: &[LinuxRow]) {
    let phc: Vec<(&LinuxRow, &PhcHop)> = rows
        .iter()
        .filter_map(|r| r.phc.as_ref().map(|p| (r, p)))
        .collect();
    if phc.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<10} {:<15} {:>13} {:>12} {:>7} {:>17} {:>7} {:>13} {:<13} note",
        "clocksrc",
        "scenario",
        "PHC before ns",
        "PHC after ns",
        "± ns",
        "REALTIME after ns",
        "marker",
        "generation",
        "status"
    );
    for (r, p) in phc {
        println!(
            "{:<10} {:<15} {:>13} {:>12} {:>7} {:>17} {:>7} {:>13} {:<13} {}",
            r.clocksource_seen.as_deref().unwrap_or(&r.clocksource),
            r.scenario,
            cell(p.error_before_ns),
            cell(p.error_after_ns),
            p.bracket_after_ns
                .map_or_else(|| "-".into(), |b| b.to_string()),
            cell(p.realtime_offset_after_ns),
            pair(p.marker),
            pair(p.generation),
            p.clock_status_after.unwrap_or("-"),
            p.note.as_deref().unwrap_or("")
        );
    }
    println!();
    println!(
        "The guest's vmclock PTP clock (ptp_vmclock over clockvmm's page) through guest-clock's"
    );
    println!(
        "hops, worst vCPU: PHC − host time before the hop, PHC − the destination's time (host +"
    );
    println!("skew on migration) after it (± the system-clock sample's RDTSC bracket it is mapped");
    println!(
        "through), beside the guest's CLOCK_REALTIME − the destination's time (its standing error,"
    );
    println!(
        "which a restore preserves); marker, generation and status as the guest read the page."
    );
}

/// Why the Linux demo cannot run here (None: it can).
pub fn unavailable(kernel: Option<&Path>, model: bool) -> Option<String> {
    let flavour = guest_clock::backend::host::kvm_flavour();
    if model {
        Some("--model: a Linux guest needs real KVM".into())
    } else if flavour == "kvm_pvm" {
        Some(crate::vm::linux::PVM_REASON.into())
    } else if !Path::new("/dev/kvm").exists() {
        Some("no /dev/kvm".into())
    } else if kernel.is_none() {
        Some("no --kernel given".into())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(vcpu: usize, seq: u64, bracket_ns: u64) -> LinuxSample {
        LinuxSample {
            vcpu,
            seq,
            guest_tsc: 0,
            guest_realtime_ns: 0,
            guest_monotonic_ns: 0,
            guest_boottime_ns: 0,
            host_realtime_ns: 0,
            tsc_offset: 0,
            bracket_ns,
        }
    }

    #[test]
    fn narrowest_keeps_per_vcpu_the_tightest_accepted_sample() {
        let all = vec![
            sample(1, 10, 30_000),
            sample(0, 11, 900),
            sample(1, 12, 1_200),
            sample(0, 13, 700),
            sample(0, 20, 1), // outside the window
        ];
        let got = narrowest(all, |s| s.seq <= 13, |s| s.bracket_ns);
        let picked: Vec<(usize, u64)> = got.iter().map(|s| (s.vcpu, s.seq)).collect();
        assert_eq!(picked, vec![(0, 13), (1, 12)]);
        assert!(narrowest(Vec::<LinuxSample>::new(), |_| true, |s| s.bracket_ns).is_empty());
    }
}

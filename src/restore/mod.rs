//! The receiver's side: decide the mode, validate against the destination *before* touching the
//! VM, restore the preserved relationships, read back, signal, report.
//!
//! The relationships (pure math in [`crate::math`]):
//! - live update: the identical kvmclock function of the host TSC,
//!   `E(h) = K + ticks_to_ns(h − h_src, host_khz)`, and the identical TSC offsets;
//! - live migration: "kvmclock was K at wallclock W", `E(r) = K + (r − W)`, and "vCPU n's TSC was
//!   Tₙ at kvmclock Kₙ", `Tₙ' = Tₙ + (K' − Kₙ)·freq`, rebuilt from the kvmclock actually set.
//!
//! Setting kvmclock: `KVM_SET_CLOCK` with `KVM_CLOCK_REALTIME` from a reference reading `(h, r)`
//! with `clock = E(h, r)`; the kernel adds the realtime that passed until its own read. It lands
//! ahead by the gap between its master-clock snapshot and its realtime read (+0.4..0.8 µs measured
//! on kvm_pvm; jittery under a nested hypervisor), its *bias*. Each round measures the residual
//! right after with `KVM_GET_CLOCK`, records the bias it implies (`residual + correction`), and
//! sets again with the lower median of the biases seen so far as the correction, until the first
//! round within [`RestoreOptions::residual_target_ns`] or [`RestoreOptions::max_correction_rounds`]
//! rounds: one spike does not steer the estimate, and the bound is a count, not a time.
//!
//! [`restore`] runs the phases in order, each a function here: [`validate`] (a refusal leaves
//! the VM untouched) → [`decide_mode`] → TSC rate → (live update: identical TSC offsets) →
//! kvmclock with correction → (live migration: offsets from the kvmclock actually set) →
//! read-back → uncertainty → signal.

mod identity;
mod types;

pub use identity::hex as vm_id_string;
use identity::{hex, vm_id_mismatch};
pub use types::*;

use guest_clock_format::{
    CaptureKind, ClockState, NtpState, KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME,
};
use log::{debug, info, warn};

use crate::backend::{Capabilities, ClockBackend, ClockData, TscControl};
use crate::math::{self, Relation};
use crate::signal::{signal_disruption, Signalled, VmclockMemory};

/// A live update whose kvmclock residual exceeds this is "not exact" and is signalled, ns.
pub const LIVE_UPDATE_EXACT_NS: u64 = 1_000;

/// KVM does not scale a guest TSC within this many ppm of the host's (`kvm_set_tsc_khz`).
const KVM_TSC_TOLERANCE_PPM: u64 = 250;

/// One simultaneous reading of the destination: kvmclock, host realtime and host TSC.
#[derive(Debug, Clone, Copy)]
struct Reading {
    clock_ns: u64,
    realtime_ns: u64,
    host_tsc_ticks: u64,
    /// Half-width of the userspace bracket, ns (0 when the kernel gave all three atomically).
    bracket_ns: u64,
}

/// Read (kvmclock, realtime, host TSC): atomically when `KVM_GET_CLOCK` gives
/// `REALTIME | HOST_TSC`, else bracketed by userspace reads (a fresh VM whose vCPUs never ran
/// reports neither).
fn read_destination(backend: &dyn ClockBackend) -> Result<Reading, RestoreError> {
    let r0 = backend.host_realtime_ns();
    let t0 = backend.host_tsc_ticks();
    let d: ClockData = backend.get_clock()?;
    let both = KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC;
    if d.flags & both == both {
        return Ok(Reading {
            clock_ns: d.clock_ns,
            realtime_ns: d.realtime_ns,
            host_tsc_ticks: d.host_tsc_ticks,
            bracket_ns: 0,
        });
    }
    let t1 = backend.host_tsc_ticks();
    let r1 = backend.host_realtime_ns();
    Ok(Reading {
        clock_ns: d.clock_ns,
        realtime_ns: math::midpoint_u64(r0, r1),
        host_tsc_ticks: math::midpoint_u64(t0, t1),
        bracket_ns: r1.saturating_sub(r0).div_ceil(2),
    })
}

/// Decide the mode: live update when the destination is the same machine and its host TSC
/// continued since the capture (kexec: boot_id changes, TSC continues — still a live update),
/// else live migration.
pub fn decide_mode(
    state: &ClockState,
    dest_machine_id_hash: u64,
    dest_realtime_ns: u64,
    dest_host_tsc_ticks: u64,
    opts: &RestoreOptions,
) -> (RestoreMode, ModeReason) {
    if let Some(m) = opts.mode {
        return (m, ModeReason::Forced);
    }
    if state.host.machine_id_hash != dest_machine_id_hash {
        return (RestoreMode::LiveMigration, ModeReason::DifferentMachine);
    }
    match math::host_tsc_continuity(
        state.clock.host_tsc_ticks,
        state.clock.realtime_ns,
        state.host.host_tsc_khz,
        dest_host_tsc_ticks,
        dest_realtime_ns,
        opts.continuity_tolerance_ppm,
        opts.continuity_floor_ns,
    ) {
        Ok(()) => (RestoreMode::LiveUpdate, ModeReason::HostTscContinuous),
        Err(why) => (
            RestoreMode::LiveMigration,
            ModeReason::HostTscDiscontinuous { why },
        ),
    }
}

/// Check the section against the destination before the first ioctl that changes anything.
/// Only reads the backend. A refusal names the field.
pub fn validate(
    backend: &dyn ClockBackend,
    state: &ClockState,
    opts: &RestoreOptions,
) -> Result<(), RestoreError> {
    state.validate().map_err(|e| RestoreError::Refused {
        field: e.field(),
        reason: e.to_string(),
    })?;
    if vm_id_mismatch(state, opts) && opts.on_vm_id_mismatch == VmIdMismatch::Refuse {
        return Err(RestoreError::refused(
            "vm_id",
            format!(
                "the section belongs to VM {}, the VM being restored is {}",
                hex(&state.vm_id),
                hex(&opts.expected_vm_id.unwrap_or_default())
            ),
        ));
    }
    validate_vcpus(backend, state)?;
    let caps = backend.capabilities();
    if caps.adjust_clock_flags == 0 {
        return Err(RestoreError::refused(
            "destination",
            "KVM_CAP_ADJUST_CLOCK absent: kvmclock cannot be set",
        ));
    }
    validate_rate(backend, state, caps)?;
    validate_wallclock(backend, state, opts)
}

fn validate_vcpus(backend: &dyn ClockBackend, state: &ClockState) -> Result<(), RestoreError> {
    let n = backend.vcpu_count();
    if state.vcpus.len() != n {
        return Err(RestoreError::refused(
            "vcpus",
            format!(
                "the section has {} vCPUs, the destination VM has {n}",
                state.vcpus.len()
            ),
        ));
    }
    match state
        .vcpus
        .iter()
        .enumerate()
        .find(|(i, v)| v.id as usize != *i)
    {
        Some((i, v)) => Err(RestoreError::refused(
            "vcpus.id",
            format!("entry {i} is vCPU {}: ids must be 0..{n} in order", v.id),
        )),
        None => Ok(()),
    }
}

fn validate_rate(
    backend: &dyn ClockBackend,
    state: &ClockState,
    caps: Capabilities,
) -> Result<(), RestoreError> {
    let want_khz = state.tsc.guest_tsc_khz;
    let have_khz = backend.tsc_khz(0)?;
    if want_khz == have_khz || caps.tsc_control {
        return Ok(());
    }
    let dest_host_khz = backend.host_info()?.identity.host_tsc_khz;
    let diff = u64::from(want_khz.abs_diff(dest_host_khz));
    if diff * 1_000_000 > u64::from(dest_host_khz) * KVM_TSC_TOLERANCE_PPM {
        return Err(RestoreError::refused(
            "tsc.guest_tsc_khz",
            format!(
                "guest TSC runs at {want_khz} kHz; the destination runs vCPUs at {have_khz} kHz, \
                 its host at {dest_host_khz} kHz, and has no TSC scaling (KVM_CAP_TSC_CONTROL)"
            ),
        ));
    }
    Ok(())
}

fn validate_wallclock(
    backend: &dyn ClockBackend,
    state: &ClockState,
    opts: &RestoreOptions,
) -> Result<(), RestoreError> {
    let now = backend.host_realtime_ns();
    let w = state.clock.realtime_ns;
    if w > now.saturating_add(opts.max_future_ns) {
        return Err(RestoreError::refused(
            "clock.realtime_ns",
            format!(
                "captured at W = {w} ns, {} s in the destination's future (bound {} s)",
                (w - now) / 1_000_000_000,
                opts.max_future_ns / 1_000_000_000
            ),
        ));
    }
    if now.saturating_sub(w) > opts.max_age_ns {
        return Err(RestoreError::refused(
            "clock.realtime_ns",
            format!(
                "captured at W = {w} ns, {} days ago (bound {} days)",
                (now - w) / 86_400_000_000_000,
                opts.max_age_ns / 86_400_000_000_000
            ),
        ));
    }
    Ok(())
}

/// The TSC rate the guest runs at on the destination and the ratio KVM applies.
#[derive(Debug, Clone, Copy)]
struct Rate {
    ratio: u64,
    frac_bits: u8,
}

/// Set every vCPU's TSC rate to the guest's (offsets and ratios depend on it).
fn set_rate(
    backend: &dyn ClockBackend,
    state: &ClockState,
    dest_host_khz: u32,
) -> Result<Rate, RestoreError> {
    let want_khz = state.tsc.guest_tsc_khz;
    for vcpu in 0..backend.vcpu_count() {
        if backend.tsc_khz(vcpu)? != want_khz {
            backend.set_tsc_khz(vcpu, want_khz)?;
        }
    }
    let frac_bits = backend.capabilities().tsc_scaling_frac_bits;
    Ok(Rate {
        ratio: math::effective_tsc_ratio(want_khz, dest_host_khz, frac_bits),
        frac_bits,
    })
}

/// The relationship to restore, as a function of a destination reading.
fn relation_for(
    state: &ClockState,
    mode: RestoreMode,
    first: &Reading,
    opts: &RestoreOptions,
    warnings: &mut Vec<RestoreWarning>,
) -> Relation {
    match mode {
        RestoreMode::LiveUpdate => Relation::live_update(state),
        RestoreMode::LiveMigration => {
            let rel =
                Relation::live_migration(state, opts.inject_wallclock_skew_ns, first.realtime_ns);
            if rel.clamped_ns > 0 {
                warnings.push(RestoreWarning::WallclockClamped {
                    behind_ns: rel.clamped_ns,
                });
            }
            rel
        }
    }
}

/// What setting kvmclock did.
#[derive(Debug, Clone, Copy)]
struct KvmclockSet {
    calls: u32,
    bias_ns: i64,
    residual_ns: i64,
}

/// The lower median: the middle element, or the lower of the two middle ones (a bias only grows
/// with delays, so a spike is upward: the lower one is the safer estimate).
fn lower_median(values: &[i64]) -> i64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(0)
}

/// `KVM_SET_CLOCK` asking for `relation` at `reading` less `correction_ns`.
fn clock_data(
    backend: &dyn ClockBackend,
    relation: &Relation,
    reading: &Reading,
    correction_ns: i64,
    use_realtime: bool,
) -> ClockData {
    if use_realtime {
        let target = relation.kvmclock_at(reading.host_tsc_ticks, reading.realtime_ns);
        ClockData {
            clock_ns: math::add_signed(target, -correction_ns),
            flags: KVM_CLOCK_REALTIME,
            realtime_ns: reading.realtime_ns,
            host_tsc_ticks: 0,
        }
    } else {
        // No kernel realtime path: the reading must be as fresh as possible.
        let h = backend.host_tsc_ticks();
        let r = backend.host_realtime_ns();
        ClockData {
            clock_ns: math::add_signed(relation.kvmclock_at(h, r), -correction_ns),
            flags: 0,
            realtime_ns: 0,
            host_tsc_ticks: 0,
        }
    }
}

/// Set kvmclock to `relation`, correcting the kernel's landing bias over bounded rounds.
fn set_kvmclock(
    backend: &dyn ClockBackend,
    relation: &Relation,
    first: Reading,
    opts: &RestoreOptions,
) -> Result<KvmclockSet, RestoreError> {
    let use_realtime = backend.capabilities().adjust_clock_flags & KVM_CLOCK_REALTIME != 0;
    let max_calls = if opts.correct_residual {
        opts.max_correction_rounds.saturating_add(1)
    } else {
        1
    };
    let mut biases: Vec<i64> = Vec::new();
    let mut correction_ns: i64 = 0;
    let mut reading = first;
    let mut calls = 0u32;
    loop {
        backend.set_clock(&clock_data(
            backend,
            relation,
            &reading,
            correction_ns,
            use_realtime,
        ))?;
        calls += 1;
        reading = read_destination(backend)?;
        let residual_ns = relation.residual_ns(&reading.as_tuple());
        // Asked for target − correction, landed at target + residual: the kernel's bias.
        biases.push(residual_ns.saturating_add(correction_ns));
        debug!("SET_CLOCK #{calls}: residual {residual_ns} ns (correction {correction_ns} ns)");
        if residual_ns.unsigned_abs() <= opts.residual_target_ns || calls >= max_calls {
            return Ok(KvmclockSet {
                calls,
                bias_ns: lower_median(&biases),
                residual_ns,
            });
        }
        correction_ns = lower_median(&biases);
    }
}

/// What the read-back found.
#[derive(Debug, Clone, Copy)]
struct ReadBack {
    fin: Reading,
    kvmclock_error_ns: i64,
    tsc_error_ticks: i64,
    vcpu_skew_ticks: u64,
}

fn read_back(
    backend: &dyn ClockBackend,
    state: &ClockState,
    relation: &Relation,
    rate: Rate,
) -> Result<ReadBack, RestoreError> {
    let fin = read_destination(backend)?;
    let kvmclock_error_ns = relation.residual_ns(&fin.as_tuple());
    let (tsc_error_ticks, vcpu_skew_ticks) = tsc_errors(backend, state, relation, &fin, rate)?;
    Ok(ReadBack {
        fin,
        kvmclock_error_ns,
        tsc_error_ticks,
        vcpu_skew_ticks,
    })
}

/// How far the restored clock may be from true time beyond the residual, ns.
fn uncertainty_ns(
    state: &ClockState,
    mode: RestoreMode,
    fin: &Reading,
    dest_ntp: &NtpState,
) -> u64 {
    let capture_unc = match state.capture_kind {
        CaptureKind::KvmClockData => 0,
        _ => state.capture_uncertainty_ns,
    };
    let base = capture_unc.saturating_add(fin.bracket_ns);
    match mode {
        // The relation converts host ticks with tsc_khz, rounded to 1 kHz: up to 0.5 kHz of
        // rate error, i.e. elapsed · 0.5 / khz (≈ 0.2 ppm at 2.6 GHz).
        RestoreMode::LiveUpdate => {
            let elapsed = fin
                .host_tsc_ticks
                .saturating_sub(state.clock.host_tsc_ticks);
            let khz = u64::from(state.host.host_tsc_khz.max(1));
            base.saturating_add(
                math::ticks_to_ns_round(elapsed, state.host.host_tsc_khz) / (2 * khz),
            )
        }
        RestoreMode::LiveMigration => {
            let us_to_ns = |us: i64| (us.max(0) as u64).saturating_mul(1000);
            base.saturating_add(us_to_ns(state.ntp.maxerror_us))
                .saturating_add(us_to_ns(dest_ntp.maxerror_us))
        }
    }
}

/// The warnings a finished restore carries, in a fixed order.
fn late_warnings(
    backend: &dyn ClockBackend,
    state: &ClockState,
    opts: &RestoreOptions,
    set: &KvmclockSet,
    fin: &Reading,
    warnings: &mut Vec<RestoreWarning>,
) {
    if set.residual_ns.unsigned_abs() > opts.residual_target_ns && opts.correct_residual {
        warnings.push(RestoreWarning::CorrectionExhausted {
            residual_ns: set.residual_ns,
            rounds: set.calls.saturating_sub(1),
            target_ns: opts.residual_target_ns,
        });
    }
    if backend.tsc_control() == TscControl::Ignored {
        warnings.push(RestoreWarning::TscWritesIgnored {
            backend: backend.name().to_string(),
        });
    }
    if fin.bracket_ns > 0 {
        warnings.push(RestoreWarning::BracketedReadBack {
            half_width_ns: fin.bracket_ns,
        });
    }
    if state.capture_kind == CaptureKind::UserspaceBracket {
        warnings.push(RestoreWarning::SourceBracketed {
            uncertainty_ns: state.capture_uncertainty_ns,
        });
    }
}

/// Restore the clocks of a freshly created (or paused) VM from `state`.
///
/// Phases: [`validate`] (a refusal leaves the VM untouched) → [`decide_mode`] → TSC rate →
/// (live update: identical offsets) → kvmclock with bias correction → (live migration: offsets
/// from the kvmclock actually set) → read back → uncertainty → signal when not an exact live
/// update.
pub fn restore(
    backend: &dyn ClockBackend,
    state: &ClockState,
    opts: &RestoreOptions,
    vmclock: Option<&dyn VmclockMemory>,
) -> Result<RestoreReport, RestoreError> {
    validate(backend, state, opts)?;
    let dest_host = backend.host_info()?;
    let first = read_destination(backend)?;
    let mut warnings = Vec::new();
    let foreign = vm_id_mismatch(state, opts);
    if foreign {
        warnings.push(RestoreWarning::ForeignVmSection {
            vm_id: hex(&state.vm_id),
        });
    } else if opts.expected_vm_id.is_some() && !state.has_vm_id() {
        warnings.push(RestoreWarning::VmIdUnchecked);
    }
    let (mode, mode_reason) = if foreign {
        (RestoreMode::LiveMigration, ModeReason::ForeignVm)
    } else {
        decide_mode(
            state,
            dest_host.identity.machine_id_hash,
            first.realtime_ns,
            first.host_tsc_ticks,
            opts,
        )
    };
    info!("restore mode {mode}: {mode_reason}");
    let relation = relation_for(state, mode, &first, opts, &mut warnings);
    let rate = set_rate(backend, state, dest_host.identity.host_tsc_khz)?;
    if mode == RestoreMode::LiveUpdate {
        let offsets: Vec<u64> = state.vcpus.iter().map(|v| v.tsc_offset_ticks).collect();
        apply_tsc(backend, &offsets, rate)?;
    }
    let set = set_kvmclock(backend, &relation, first, opts)?;
    if mode == RestoreMode::LiveMigration {
        let r = read_destination(backend)?;
        let offsets = math::migration_tsc_offsets(
            state,
            r.clock_ns,
            r.host_tsc_ticks,
            rate.ratio,
            rate.frac_bits,
        );
        apply_tsc(backend, &offsets, rate)?;
    }
    let rb = read_back(backend, state, &relation, rate)?;
    late_warnings(backend, state, opts, &set, &rb.fin, &mut warnings);
    let uncertainty_ns = uncertainty_ns(state, mode, &rb.fin, &dest_host.ntp);

    let exact = rb.kvmclock_error_ns.unsigned_abs() <= LIVE_UPDATE_EXACT_NS;
    if mode == RestoreMode::LiveUpdate && !exact {
        warnings.push(RestoreWarning::LiveUpdateNotExact {
            residual_ns: rb.kvmclock_error_ns,
            threshold_ns: LIVE_UPDATE_EXACT_NS,
        });
    }
    let signalled = if mode == RestoreMode::LiveMigration || !exact || opts.always_signal {
        signal_disruption(
            backend,
            vmclock,
            state.vmclock_disruption_marker,
            uncertainty_ns.saturating_add(rb.kvmclock_error_ns.unsigned_abs()),
        )?
    } else {
        Signalled::default()
    };
    for w in &warnings {
        warn!("{w}");
    }
    let report = RestoreReport {
        mode,
        mode_auto: !matches!(mode_reason, ModeReason::Forced | ModeReason::ForeignVm),
        mode_reason,
        kvmclock_error_ns: rb.kvmclock_error_ns,
        tsc_error_ticks: rb.tsc_error_ticks,
        vcpu_skew_ticks: rb.vcpu_skew_ticks,
        uncertainty_ns,
        set_clock_calls: set.calls,
        correction_rounds: set.calls.saturating_sub(1),
        set_clock_bias_ns: set.bias_ns,
        signalled,
        warnings,
    };
    info!(
        "restored clocks ({mode}): kvmclock residual {} ns, TSC error {} ticks, skew {} ticks, \
         uncertainty {} ns, {} SET_CLOCK (bias {} ns)",
        report.kvmclock_error_ns,
        report.tsc_error_ticks,
        report.vcpu_skew_ticks,
        report.uncertainty_ns,
        report.set_clock_calls,
        report.set_clock_bias_ns
    );
    Ok(report)
}

impl Reading {
    fn as_tuple(&self) -> math::DestinationReading {
        math::DestinationReading {
            kvmclock_ns: self.clock_ns,
            realtime_ns: self.realtime_ns,
            host_tsc_ticks: self.host_tsc_ticks,
        }
    }
}

/// Set every vCPU's TSC to `offsets[n]`: by the offset attribute when present (exact, no
/// heuristics), else by `MSR_IA32_TSC` with the value the offset gives at the host TSC of the
/// write (subject to KVM's ±1 s matching, which keeps in-sync vCPUs in one generation).
fn apply_tsc(backend: &dyn ClockBackend, offsets: &[u64], rate: Rate) -> Result<(), RestoreError> {
    let Rate { ratio, frac_bits } = rate;
    let attr = backend.capabilities().tsc_offset_attr;
    for (vcpu, &offset) in offsets.iter().enumerate() {
        if attr {
            backend.set_tsc_offset(vcpu, offset)?;
        } else {
            let value = math::guest_tsc_ticks(backend.host_tsc_ticks(), ratio, frac_bits, offset);
            backend.set_tsc_msr(vcpu, value)?;
        }
    }
    Ok(())
}

/// Read back every vCPU's guest TSC at the final reading's host TSC and compare with what the
/// relationship asks for. Returns (signed error of largest magnitude, skew among vCPUs that were
/// in sync on the source).
fn tsc_errors(
    backend: &dyn ClockBackend,
    state: &ClockState,
    relation: &Relation,
    fin: &Reading,
    rate: Rate,
) -> Result<(i64, u64), RestoreError> {
    let Rate { ratio, frac_bits } = rate;
    let attr = backend.capabilities().tsc_offset_attr;
    let expected_k = relation.kvmclock_at(fin.host_tsc_ticks, fin.realtime_ns);
    let khz = state.tsc.guest_tsc_khz;
    let mut worst: i64 = 0;
    let mut actual = Vec::with_capacity(state.vcpus.len());
    for (vcpu, v) in state.vcpus.iter().enumerate() {
        let guest_now = if attr {
            let off = backend.tsc_offset(vcpu)?;
            math::guest_tsc_ticks(fin.host_tsc_ticks, ratio, frac_bits, off)
        } else {
            // MSR read at a later host TSC: bring it back to fin.host_tsc_ticks.
            let h0 = backend.host_tsc_ticks();
            let t = backend.tsc_msr(vcpu)?;
            let h1 = backend.host_tsc_ticks();
            let h = math::midpoint_u64(h0, h1);
            t.wrapping_sub(math::scale_tsc(
                h.wrapping_sub(fin.host_tsc_ticks),
                ratio,
                frac_bits,
            ))
        };
        let expected = math::tsc_at_kvmclock(v.tsc_ticks, v.kvmclock_ns, expected_k, khz);
        let err = guest_now.wrapping_sub(expected) as i64;
        if err.unsigned_abs() > worst.unsigned_abs() {
            worst = err;
        }
        actual.push(guest_now);
    }
    // Skew among vCPUs that had equal offsets on the source.
    let mut skew = 0u64;
    for (i, a) in state.vcpus.iter().enumerate() {
        for (j, b) in state.vcpus.iter().enumerate().skip(i + 1) {
            if a.tsc_offset_ticks == b.tsc_offset_ticks {
                skew = skew.max((actual[i].wrapping_sub(actual[j]) as i64).unsigned_abs());
            }
        }
    }
    Ok((worst, skew))
}

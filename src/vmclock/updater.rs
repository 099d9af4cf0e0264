//! Keeping the vmclock page true: sample the guest-TSC → realtime relationship, build the
//! structure, rewrite it when it gets old or the host's clock discipline changes, and rewrite
//! it for a restored VM.
//!
//! The relationship comes from one `KVM_GET_CLOCK` (host TSC h₀ and CLOCK_REALTIME r₀ from one
//! kernel snapshot) and the guest's TSC function `guest = scale(host, ratio) + offset`:
//! `counter_value = scale(h₀) + offset` is the guest TSC at r₀, and the period is
//! [`math::guest_tsc_period`] of the host's TSC rate, the ratio KVM applies and adjtimex's
//! frequency correction. KVM_GET_CLOCK without `REALTIME | HOST_TSC` (a VM whose vCPUs never
//! ran, old kernels) falls back to a userspace bracket whose half-width is added to the errors.
//!
//! Semantics across a restore ([`VmclockUpdater::after_restore`]):
//! - live migration (any restore that disrupted the guest): the destination writes *its own*
//!   relationship and status, `disruption_marker` as signalled, and bumps
//!   `vm_generation_counter` — before the first `KVM_RUN`;
//! - exact live update: marker and generation unchanged, the relationship rewritten for the new
//!   process (same values up to the rate's rounding: the TSC and wallclock continued).
//!
//! The vmclock spec keeps `vm_generation_counter` constant across a *pure* live migration; the
//! plugin cannot tell one from a snapshot restore (possibly a clone) by the section alone, and
//! a missed bump on a clone is worse than a spurious one, so it bumps by default
//! ([`VmclockConfig::bump_generation_on_migration`]).

use std::sync::Mutex;

use log::{debug, info, warn};
use serde::{Deserialize, Serialize};

use super::{
    read_vmclock, write_vmclock, HostTimeStatus, VmclockAbi, VmclockError, VmclockMemory,
    VMCLOCK_COUNTER_X86_TSC, VMCLOCK_FLAG_PERIOD_MAXERROR_VALID, VMCLOCK_FLAG_TAI_OFFSET_VALID,
    VMCLOCK_FLAG_TIME_ESTERROR_VALID, VMCLOCK_FLAG_TIME_MAXERROR_VALID,
    VMCLOCK_FLAG_VM_GEN_COUNTER_PRESENT, VMCLOCK_LEAP_NONE, VMCLOCK_MAGIC, VMCLOCK_PAGE_SIZE,
    VMCLOCK_STATUS_FREERUNNING, VMCLOCK_STATUS_SYNCHRONIZED, VMCLOCK_STATUS_UNRELIABLE,
    VMCLOCK_TIME_UTC,
};
use crate::backend::{ClockBackend, KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME};
use crate::math::{self, RealtimeRate};
use crate::signal::VMCLOCK_ABI_SIZE;

/// Where the host's clock discipline (`adjtimex`) comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostTimeSource {
    /// This process's kernel ([`HostTimeStatus::from_kernel`]): right for a real KVM backend.
    Kernel,
    /// The backend's `host_info().ntp` (status, maxerror, esterror; nominal rate): right for
    /// the model, whose host is simulated.
    Backend,
    /// A fixed value (tests).
    Fixed(HostTimeStatus),
}

/// How the updater writes and refreshes the page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmclockConfig {
    /// Rewrite at least this often even when nothing changed, ns (re-anchors the relationship to
    /// a fresh sample, bounding the drift of the nominal-rate mapping). Default 1 s.
    pub refresh_period_ns: u64,
    /// Source of the host's NTP state.
    pub host_time: HostTimeSource,
    /// `size`: the region the guest maps. Default [`VMCLOCK_PAGE_SIZE`] (ptp_vmclock offers
    /// `/dev/vmclockN` only for a full page).
    pub region_size: u32,
    /// SYNCHRONIZED needs the host's `maxerror` at or below this, µs; a disciplined host with a
    /// larger (growing) maxerror is FREERUNNING. Default 1 s.
    pub synced_maxerror_limit_us: i64,
    /// Bump `vm_generation_counter` on every disrupting restore (see the module docs).
    /// Default true.
    pub bump_generation_on_migration: bool,
    /// TAI − UTC to publish when the host does not know it (adjtimex 0 and no unexpired
    /// leap-second list): the operator's knowledge. Default none: no `TAI_OFFSET_VALID` then,
    /// and Linux 7.x's ptp_vmclock offers no PTP clock.
    #[serde(default)]
    pub tai_offset_fallback_s: Option<i16>,
}

impl Default for VmclockConfig {
    fn default() -> Self {
        VmclockConfig {
            refresh_period_ns: 1_000_000_000,
            host_time: HostTimeSource::Kernel,
            region_size: VMCLOCK_PAGE_SIZE,
            synced_maxerror_limit_us: 1_000_000,
            bump_generation_on_migration: true,
            tai_offset_fallback_s: None,
        }
    }
}

impl VmclockConfig {
    /// The default for a backend: the model's host is simulated (its NTP state comes from the
    /// backend), every other backend runs on this kernel.
    pub fn for_backend(backend: &dyn ClockBackend) -> Self {
        VmclockConfig {
            host_time: if backend.name() == "model" {
                HostTimeSource::Backend
            } else {
                HostTimeSource::Kernel
            },
            ..Default::default()
        }
    }
}

/// One sample of the guest counter against host realtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterSample {
    /// Guest TSC (vCPU 0) at `realtime_ns`.
    pub guest_tsc_ticks: u64,
    /// Host CLOCK_REALTIME, ns.
    pub realtime_ns: u64,
    /// Host TSC at `realtime_ns`.
    pub host_tsc_ticks: u64,
    /// Half-width of the userspace bracket when the kernel did not give (h, r) atomically, plus
    /// the MSR read bracket without the offset attribute, ns (0: exact).
    pub uncertainty_ns: u64,
    /// Host TSC nominal rate, kHz.
    pub host_tsc_khz: u32,
    /// TSC scaling ratio KVM applies to vCPU 0.
    pub ratio: u64,
    /// Fractional bits of the ratio (0: no scaling hardware).
    pub frac_bits: u8,
    /// vCPU 0's TSC offset.
    pub tsc_offset_ticks: u64,
    /// Every vCPU has vCPU 0's ratio and offset (one counter relationship fits all).
    pub vcpus_consistent: bool,
}

/// The per-vCPU half of a [`CounterSample`]: how the guest's TSC derives from the host's (what
/// only the VMM changes: a restore, a TSC rate or offset it sets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterRelation {
    /// Host TSC nominal rate, kHz.
    pub host_tsc_khz: u32,
    /// TSC scaling ratio KVM applies to vCPU 0.
    pub ratio: u64,
    /// Fractional bits of the ratio (0: no scaling hardware).
    pub frac_bits: u8,
    /// vCPU 0's TSC offset.
    pub tsc_offset_ticks: u64,
    /// Every vCPU has vCPU 0's ratio and offset (one counter relationship fits all).
    pub vcpus_consistent: bool,
    /// The MSR read bracket without the offset attribute, ns (0: the offset is exact).
    pub offset_uncertainty_ns: u64,
}

/// Sample the per-vCPU relationship: the ratio KVM applies and the offset (attribute, or MSR
/// bracketed by host TSC reads) of every vCPU. These are vCPU ioctls: each waits until its vCPU
/// is outside `KVM_RUN`.
pub fn sample_counter_relation(
    backend: &dyn ClockBackend,
) -> Result<CounterRelation, VmclockError> {
    let caps = backend.capabilities();
    let host_khz = backend.host_info()?.identity.host_tsc_khz;
    if host_khz == 0 {
        return Err(VmclockError::Unrepresentable(
            "host TSC rate unknown (0 kHz)".into(),
        ));
    }
    let frac = caps.tsc_scaling_frac_bits;
    let n = backend.vcpu_count();
    if n == 0 {
        return Err(VmclockError::Unrepresentable("the VM has no vCPU".into()));
    }
    let mut first: Option<(u64, u64)> = None;
    let mut consistent = true;
    let mut msr_unc_ticks = 0u64;
    for v in 0..n {
        let ratio = math::effective_tsc_ratio(backend.tsc_khz(v)?, host_khz, frac);
        let offset = if caps.tsc_offset_attr {
            backend.tsc_offset(v)?
        } else {
            let h0 = backend.host_tsc_ticks();
            let t = backend.tsc_msr(v)?;
            let h1 = backend.host_tsc_ticks();
            let half = h1.saturating_sub(h0).div_ceil(2);
            msr_unc_ticks = msr_unc_ticks.max(half);
            math::tsc_offset_for(t, math::midpoint_u64(h0, h1), ratio, frac)
        };
        match first {
            None => first = Some((ratio, offset)),
            Some((r0, o0)) => {
                let off_gap = (offset.wrapping_sub(o0) as i64).unsigned_abs();
                if r0 != ratio || off_gap > 2 * msr_unc_ticks {
                    consistent = false;
                }
            }
        }
    }
    let (ratio, offset) = first.unwrap_or((1, 0));
    Ok(CounterRelation {
        host_tsc_khz: host_khz,
        ratio,
        frac_bits: frac,
        tsc_offset_ticks: offset,
        vcpus_consistent: consistent,
        offset_uncertainty_ns: math::ticks_to_ns_round(msr_unc_ticks, host_khz),
    })
}

/// Sample the VM-wide half: one `KVM_GET_CLOCK` (a VM ioctl: it never waits for a vCPU), the
/// guest TSC at its instant through `rel`.
pub fn sample_guest_counter_with(
    backend: &dyn ClockBackend,
    rel: &CounterRelation,
) -> Result<CounterSample, VmclockError> {
    let r0 = backend.host_realtime_ns();
    let t0 = backend.host_tsc_ticks();
    let d = backend.get_clock()?;
    let both = KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC;
    let (h, r, bracket_ns) = if d.flags & both == both {
        (d.host_tsc_ticks, d.realtime_ns, 0)
    } else {
        let t1 = backend.host_tsc_ticks();
        let r1 = backend.host_realtime_ns();
        (
            math::midpoint_u64(t0, t1),
            math::midpoint_u64(r0, r1),
            r1.saturating_sub(r0).div_ceil(2),
        )
    };
    Ok(CounterSample {
        guest_tsc_ticks: math::guest_tsc_ticks(h, rel.ratio, rel.frac_bits, rel.tsc_offset_ticks),
        realtime_ns: r,
        host_tsc_ticks: h,
        uncertainty_ns: bracket_ns.saturating_add(rel.offset_uncertainty_ns),
        host_tsc_khz: rel.host_tsc_khz,
        ratio: rel.ratio,
        frac_bits: rel.frac_bits,
        tsc_offset_ticks: rel.tsc_offset_ticks,
        vcpus_consistent: rel.vcpus_consistent,
    })
}

/// Sample the relationship: per vCPU the ratio KVM applies and the offset
/// ([`sample_counter_relation`]), then one `KVM_GET_CLOCK` ([`sample_guest_counter_with`]).
pub fn sample_guest_counter(backend: &dyn ClockBackend) -> Result<CounterSample, VmclockError> {
    let rel = sample_counter_relation(backend)?;
    sample_guest_counter_with(backend, &rel)
}

/// Build the whole structure from a sample and the host's clock discipline.
///
/// - `time_type` UTC (the host's CLOCK_REALTIME) with `TAI_OFFSET_VALID` when the host knows
///   TAI − UTC ([`HostTimeStatus::tai_offset`]: adjtimex, else the leap-second list), and
///   `tai_offset_sec` = UTC − TAI (−37 s since 2017) — the sign both generations of Linux's
///   ptp_vmclock compute with: before 7.x it returned UTC (TAI + offset for TAI pages), from 7.x
///   it returns TAI (UTC − offset for UTC pages, refusing a UTC page without a valid offset:
///   "vmclock does not provide unambiguous time"). The UAPI text calls the field the "offset
///   from TAI to UTC" with the value 37; the drivers, the only consumers checked, disagree with
///   that sign, and a UTC page read through them is right with either driver only this way;
/// - `clock_status` per [`HostTimeStatus::clock_status`], UNRELIABLE when the vCPUs' TSCs differ
///   (one relationship cannot serve them all);
/// - time errors from adjtimex maxerror/esterror plus the sample's own uncertainty, VALID only
///   while the host is disciplined (maxerror when SYNCHRONIZED or FREERUNNING, esterror only
///   when SYNCHRONIZED); the period's max error rate from adjtimex's tolerance under the same
///   condition as maxerror; no period esterror (adjtimex has no estimate of the frequency
///   error);
/// - `vm_generation_counter` with `VM_GEN_COUNTER_PRESENT`.
pub fn build_vmclock(
    sample: &CounterSample,
    host: &HostTimeStatus,
    config: &VmclockConfig,
    disruption_marker: u64,
    vm_generation_counter: u64,
) -> Result<VmclockAbi, VmclockError> {
    let rate = host.realtime_rate().unwrap_or_else(|| {
        warn!(
            "adjtimex tick {} / freq {} out of range: publishing the nominal rate",
            host.tick_us, host.freq_scaled_ppm
        );
        RealtimeRate::NOMINAL
    });
    let period = math::guest_tsc_period(sample.host_tsc_khz, sample.ratio, sample.frac_bits, rate)
        .ok_or_else(|| {
            VmclockError::Unrepresentable(format!(
                "no period for a guest TSC at {} kHz · {:#x} / 2^{}",
                sample.host_tsc_khz, sample.ratio, sample.frac_bits
            ))
        })?;
    let (time_sec, time_frac_sec) = math::realtime_ns_to_vmclock(sample.realtime_ns);
    let mut status = host.clock_status(config.synced_maxerror_limit_us);
    if !sample.vcpus_consistent {
        warn!("vCPUs have different TSC offsets or ratios: vmclock marked UNRELIABLE");
        status = VMCLOCK_STATUS_UNRELIABLE;
    }
    let mut flags = VMCLOCK_FLAG_VM_GEN_COUNTER_PRESENT;
    let tai = host.tai_offset().or(config.tai_offset_fallback_s);
    if tai.is_some() {
        flags |= VMCLOCK_FLAG_TAI_OFFSET_VALID;
    }
    let disciplined = matches!(
        status,
        VMCLOCK_STATUS_SYNCHRONIZED | VMCLOCK_STATUS_FREERUNNING
    );
    let us_to_ns = |us: i64| (us.max(0) as u64).saturating_mul(1000);
    let own_ns = sample.uncertainty_ns.saturating_add(1); // + the 1 ns of ns→2⁻⁶⁴ rounding
    let (mut maxerr, mut esterr, mut period_maxerr) = (0, 0, 0);
    if disciplined {
        maxerr = us_to_ns(host.maxerror_us).saturating_add(own_ns);
        flags |= VMCLOCK_FLAG_TIME_MAXERROR_VALID;
        if host.tolerance_scaled_ppm > 0 {
            // + 1: the period itself is rounded to half a unit.
            period_maxerr =
                math::period_error_rate(period, host.tolerance_scaled_ppm as u64).saturating_add(1);
            flags |= VMCLOCK_FLAG_PERIOD_MAXERROR_VALID;
        }
    }
    if status == VMCLOCK_STATUS_SYNCHRONIZED {
        esterr = us_to_ns(host.esterror_us).saturating_add(sample.uncertainty_ns);
        flags |= VMCLOCK_FLAG_TIME_ESTERROR_VALID;
    }
    Ok(VmclockAbi {
        magic: VMCLOCK_MAGIC,
        size: config.region_size.max(VMCLOCK_ABI_SIZE as u32),
        version: 1,
        counter_id: VMCLOCK_COUNTER_X86_TSC,
        time_type: VMCLOCK_TIME_UTC,
        seq_count: 0,
        disruption_marker,
        flags,
        clock_status: status,
        leap_second_smearing_hint: 0,
        tai_offset_sec: tai.map_or(0, |t| -t),
        leap_indicator: if status == VMCLOCK_STATUS_UNRELIABLE {
            VMCLOCK_LEAP_NONE
        } else {
            host.leap_indicator()
        },
        counter_period_shift: period.shift,
        counter_value: sample.guest_tsc_ticks,
        counter_period_frac_sec: period.frac_sec,
        counter_period_esterror_rate_frac_sec: 0,
        counter_period_maxerror_rate_frac_sec: period_maxerr,
        time_sec,
        time_frac_sec,
        time_esterror_nanosec: esterr,
        time_maxerror_nanosec: maxerr,
        vm_generation_counter,
    })
}

/// Why the page was rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefreshReason {
    /// Nothing had been written by this updater yet.
    First,
    /// The refresh period elapsed.
    PeriodElapsed,
    /// The host's rate, status, leap or TAI state changed.
    HostChanged,
    /// The guest counter's relationship to the host TSC changed (offset, ratio, host rate).
    CounterChanged,
    /// A restore, or the caller asked.
    Forced,
}

/// What [`VmclockUpdater::refresh`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// Still fresh; nothing written.
    Unchanged,
    /// Rewritten, for this reason, with these contents.
    Rewritten(RefreshReason, VmclockAbi),
}

/// What decides "changed at once".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HostKey {
    rate: Option<RealtimeRate>,
    status: u8,
    leap: u8,
    tai: Option<i16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CounterKey {
    host_tsc_khz: u32,
    ratio: u64,
    frac_bits: u8,
    tsc_offset_ticks: u64,
    consistent: bool,
}

#[derive(Debug)]
struct State {
    marker: u64,
    generation: u64,
    last: Option<(VmclockAbi, u64, HostKey, CounterKey)>,
    /// The per-vCPU relationship of the last full sample (what
    /// [`VmclockUpdater::refresh_running`] reuses).
    relation: Option<CounterRelation>,
    /// See [`VmclockUpdater::set_wallclock_skew_ns`].
    wallclock_skew_ns: i64,
}

/// Owns a guest's vmclock page on the host side. Thread-safe (`&self` everywhere): a VMM may
/// call [`refresh`](Self::refresh) from a timer thread while its API thread restores.
pub struct VmclockUpdater {
    mem: std::sync::Arc<dyn VmclockMemory>,
    config: VmclockConfig,
    state: Mutex<State>,
}

impl std::fmt::Debug for VmclockUpdater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmclockUpdater")
            .field("config", &self.config)
            .field("state", &self.state)
            .finish()
    }
}

impl VmclockUpdater {
    /// An updater over `mem`. Marker and generation start from the page when it already
    /// carries a vmclock structure (a restored or migrated guest's), else 0.
    pub fn new(mem: std::sync::Arc<dyn VmclockMemory>, config: VmclockConfig) -> Self {
        let (marker, generation) = match read_vmclock(mem.as_ref()) {
            Ok(a) if a.magic == VMCLOCK_MAGIC => (a.disruption_marker, a.vm_generation_counter),
            _ => (0, 0),
        };
        VmclockUpdater {
            mem,
            config,
            state: Mutex::new(State {
                marker,
                generation,
                last: None,
                relation: None,
                wallclock_skew_ns: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The configuration.
    pub fn config(&self) -> &VmclockConfig {
        &self.config
    }

    /// The page.
    pub fn memory(&self) -> &std::sync::Arc<dyn VmclockMemory> {
        &self.mem
    }

    /// `disruption_marker` as last written (or found).
    pub fn disruption_marker(&self) -> u64 {
        self.lock().marker
    }

    /// `vm_generation_counter` as last written (or found).
    pub fn vm_generation_counter(&self) -> u64 {
        self.lock().generation
    }

    /// Publish a host CLOCK_REALTIME `skew_ns` ahead of this one's (negative: behind) from the
    /// next write on: the emulated second host of demos, tests and benchmarks on one machine,
    /// whose kvmclock [`RestoreOptions::inject_wallclock_skew_ns`] rebuilds from the same skewed
    /// wallclock ([`ClockManager`] sets both from its restore options). 0 in production.
    ///
    /// [`RestoreOptions::inject_wallclock_skew_ns`]: crate::restore::RestoreOptions::inject_wallclock_skew_ns
    /// [`ClockManager`]: crate::manager::ClockManager
    pub fn set_wallclock_skew_ns(&self, skew_ns: i64) {
        self.lock().wallclock_skew_ns = skew_ns;
    }

    /// The skew set by [`set_wallclock_skew_ns`](Self::set_wallclock_skew_ns).
    pub fn wallclock_skew_ns(&self) -> i64 {
        self.lock().wallclock_skew_ns
    }

    /// The structure this updater last wrote.
    pub fn last_written(&self) -> Option<VmclockAbi> {
        self.lock().last.map(|l| l.0)
    }

    /// The host's clock discipline from the configured source.
    pub fn host_status(&self, backend: &dyn ClockBackend) -> Result<HostTimeStatus, VmclockError> {
        Ok(match self.config.host_time {
            HostTimeSource::Kernel => HostTimeStatus::from_kernel()?,
            HostTimeSource::Backend => HostTimeStatus::from_ntp(&backend.host_info()?.ntp),
            HostTimeSource::Fixed(s) => s,
        })
    }

    fn keys(&self, sample: &CounterSample, host: &HostTimeStatus) -> (HostKey, CounterKey) {
        (
            HostKey {
                rate: host.realtime_rate(),
                status: host.clock_status(self.config.synced_maxerror_limit_us),
                leap: host.leap_indicator(),
                // maxerror grows continuously: refreshed by the period, not compared.
                tai: host.tai_offset().or(self.config.tai_offset_fallback_s),
            },
            CounterKey {
                host_tsc_khz: sample.host_tsc_khz,
                ratio: sample.ratio,
                frac_bits: sample.frac_bits,
                tsc_offset_ticks: sample.tsc_offset_ticks,
                consistent: sample.vcpus_consistent,
            },
        )
    }

    /// Sample, build and write under the lock.
    fn write_locked(
        &self,
        st: &mut State,
        sample: &CounterSample,
        host: &HostTimeStatus,
        reason: RefreshReason,
    ) -> Result<VmclockAbi, VmclockError> {
        let published = CounterSample {
            realtime_ns: math::add_signed(sample.realtime_ns, st.wallclock_skew_ns),
            ..*sample
        };
        let mut abi = build_vmclock(&published, host, &self.config, st.marker, st.generation)?;
        abi.seq_count = write_vmclock(self.mem.as_ref(), &abi)?;
        let (hk, ck) = self.keys(sample, host);
        st.last = Some((abi, sample.realtime_ns, hk, ck));
        debug!(
            "vmclock rewritten ({reason:?}): status {}, counter {} at {}.{:09}, marker {}, \
             generation {}",
            abi.clock_status,
            abi.counter_value,
            abi.time_sec,
            math::frac_sec_to_ns(abi.time_frac_sec),
            abi.disruption_marker,
            abi.vm_generation_counter
        );
        Ok(abi)
    }

    /// Rewrite now, whatever the age of the page.
    pub fn write_now(&self, backend: &dyn ClockBackend) -> Result<VmclockAbi, VmclockError> {
        let host = self.host_status(backend)?;
        let rel = sample_counter_relation(backend)?;
        let sample = sample_guest_counter_with(backend, &rel)?;
        let mut st = self.lock();
        st.relation = Some(rel);
        self.write_locked(&mut st, &sample, &host, RefreshReason::Forced)
    }

    /// Keep the page fresh; the VMM calls this periodically (as often as it wants changes to
    /// be noticed: each call costs one adjtimex, one `KVM_GET_CLOCK` and one offset read per
    /// vCPU). Rewrites when nothing was written yet, when the host's rate (adjtimex tick/freq),
    /// clock status, leap or TAI state changed, when the guest counter's relationship to the
    /// host TSC changed, or when the refresh period elapsed; else writes nothing.
    pub fn refresh(&self, backend: &dyn ClockBackend) -> Result<Refresh, VmclockError> {
        let host = self.host_status(backend)?;
        let rel = sample_counter_relation(backend)?;
        let sample = sample_guest_counter_with(backend, &rel)?;
        let mut st = self.lock();
        st.relation = Some(rel);
        self.refresh_locked(&mut st, &sample, &host)
    }

    /// [`refresh`](Self::refresh) for a VM whose vCPUs are running: samples only VM-wide state
    /// (adjtimex and one `KVM_GET_CLOCK`, which never wait for a vCPU) and reuses the per-vCPU
    /// TSC ratio and offset of the last full sample. A vCPU ioctl waits until its vCPU leaves
    /// `KVM_RUN`, and an idle Linux vCPU (in-kernel irqchip) may not for seconds, so a timer
    /// thread calls this one. The per-vCPU relationship changes only by the VMM's doing (a
    /// restore, which rewrites the page through [`after_restore`](Self::after_restore)) or by a
    /// guest write to its TSC MSRs, which the next full refresh (at a pause, say) catches.
    /// Without any full sample yet it takes one.
    pub fn refresh_running(&self, backend: &dyn ClockBackend) -> Result<Refresh, VmclockError> {
        let host = self.host_status(backend)?;
        let known = self.lock().relation;
        let rel = match known {
            Some(r) => r,
            None => sample_counter_relation(backend)?,
        };
        let sample = sample_guest_counter_with(backend, &rel)?;
        let mut st = self.lock();
        st.relation.get_or_insert(rel);
        self.refresh_locked(&mut st, &sample, &host)
    }

    fn refresh_locked(
        &self,
        st: &mut State,
        sample: &CounterSample,
        host: &HostTimeStatus,
    ) -> Result<Refresh, VmclockError> {
        let (hk, ck) = self.keys(sample, host);
        let reason = match st.last {
            None => RefreshReason::First,
            Some((_, _, h, _)) if h != hk => RefreshReason::HostChanged,
            Some((_, _, _, c)) if c != ck => RefreshReason::CounterChanged,
            Some((_, at, _, _))
                if sample.realtime_ns.abs_diff(at) >= self.config.refresh_period_ns =>
            {
                RefreshReason::PeriodElapsed
            }
            Some(_) => return Ok(Refresh::Unchanged),
        };
        if reason == RefreshReason::HostChanged {
            info!("vmclock: host clock discipline changed, rewriting at once");
        }
        let abi = self.write_locked(st, sample, host, reason)?;
        Ok(Refresh::Rewritten(reason, abi))
    }

    /// Rewrite the page of a just-restored VM (vCPUs not yet running).
    ///
    /// `disrupted` (a live migration, or a live update that was signalled): marker ←
    /// `disruption_marker`, generation bumped (see the module docs: from the page's value when
    /// it carries a structure, else a fresh value from the realtime clock so that it cannot
    /// repeat the source's) unless disabled. Not disrupted (an exact live update): marker ←
    /// `disruption_marker` (the section's), generation as the page has it. Either way the
    /// relationship and status are this host's, now.
    pub fn after_restore(
        &self,
        backend: &dyn ClockBackend,
        disrupted: bool,
        disruption_marker: u64,
    ) -> Result<VmclockAbi, VmclockError> {
        let host = self.host_status(backend)?;
        let rel = sample_counter_relation(backend)?;
        let sample = sample_guest_counter_with(backend, &rel)?;
        let page_gen = match read_vmclock(self.mem.as_ref()) {
            Ok(a) if a.magic == VMCLOCK_MAGIC => Some(a.vm_generation_counter),
            _ => None,
        };
        let mut st = self.lock();
        st.relation = Some(rel);
        let current = page_gen.unwrap_or(st.generation);
        st.generation = if disrupted && self.config.bump_generation_on_migration {
            match page_gen {
                Some(g) => g.wrapping_add(1),
                None => st.generation.wrapping_add(1).max(sample.realtime_ns),
            }
        } else {
            current
        };
        st.marker = disruption_marker;
        let abi = self.write_locked(&mut st, &sample, &host, RefreshReason::Forced)?;
        info!(
            "vmclock rewritten after restore ({}): marker {}, generation {}, status {}",
            if disrupted { "disrupted" } else { "exact" },
            abi.disruption_marker,
            abi.vm_generation_counter,
            abi.clock_status
        );
        Ok(abi)
    }
}

//! The sender's side, at pause: record what must be preserved.
//!
//! - (K, W, host TSC): kvmclock K at host wallclock W, from ONE `KVM_GET_CLOCK` that returned
//!   `KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC` (one kernel snapshot, no userspace error). A kernel
//!   that cannot give both gets a userspace bracket: host realtime and TSC read before and after
//!   the ioctl, the midpoints recorded, half the bracket width recorded as the uncertainty. The
//!   REALTIME flag is never recorded unless the kernel gave it.
//! - For every vCPU n: (Tₙ, Kₙ) = guest TSC Tₙ at kvmclock Kₙ, and its TSC offset. With the offset
//!   attribute and HOST_TSC, Tₙ = scale(host_tsc) + offsetₙ at Kₙ = K exactly (same snapshot).
//!   Without them, Tₙ is read through `MSR_IA32_TSC` and Kₙ interpolated from kvmclock reads
//!   bracketing it.
//! - TSC rate and ratio, host identity, NTP state, the vmclock disruption marker.

use guest_clock_format::{
    CaptureKind, ClockState, KvmClockSample, TscScaling, VcpuClockState, KVM_CLOCK_HOST_TSC,
    KVM_CLOCK_REALTIME,
};
use log::{debug, info, warn};

use crate::backend::{BackendError, ClockBackend};
use crate::math;

/// Why a capture failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// A hypervisor operation failed.
    #[error("capture: {0}")]
    Backend(#[from] BackendError),
    /// The VM has no vCPUs or more than the section can carry.
    #[error("capture: the VM has {0} vCPUs (1..={max} supported)", max = guest_clock_format::MAX_VCPUS)]
    VcpuCount(usize),
    /// The hypervisor reported a TSC rate of 0.
    #[error("capture: vCPU {0} reports a TSC rate of 0 kHz")]
    ZeroTscRate(usize),
}

/// Take (K, W, host_tsc) with the best method the kernel offers; returns the sample, how it was
/// taken, and the uncertainty in ns (0 for an atomic kernel snapshot).
pub(crate) fn sample_clock(
    backend: &dyn ClockBackend,
) -> Result<(KvmClockSample, CaptureKind, u64), BackendError> {
    let r0 = backend.host_realtime_ns();
    let t0 = backend.host_tsc_ticks();
    let data = backend.get_clock()?;
    let both = KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC;
    if data.flags & both == both {
        let sample = KvmClockSample {
            clock_ns: data.clock_ns,
            flags: data.flags,
            realtime_ns: data.realtime_ns,
            host_tsc_ticks: data.host_tsc_ticks,
        };
        return Ok((sample, CaptureKind::KvmClockData, 0));
    }
    let t1 = backend.host_tsc_ticks();
    let r1 = backend.host_realtime_ns();
    // Midpoints of the bracket; half its width bounds the error of pairing them with K.
    let realtime_ns = r0 / 2 + r1 / 2 + (r0 % 2 + r1 % 2) / 2;
    let host_tsc_ticks = t0 / 2 + t1 / 2 + (t0 % 2 + t1 % 2) / 2;
    let uncertainty_ns = r1.saturating_sub(r0).div_ceil(2).max(1);
    warn!(
        "KVM_GET_CLOCK gave flags {:#x} (no REALTIME|HOST_TSC): userspace bracket of {} ns",
        data.flags,
        r1.saturating_sub(r0)
    );
    let sample = KvmClockSample {
        clock_ns: data.clock_ns,
        // Only what the kernel gave: never claim REALTIME/HOST_TSC we synthesised.
        flags: data.flags & !both,
        realtime_ns,
        host_tsc_ticks,
    };
    Ok((sample, CaptureKind::UserspaceBracket, uncertainty_ns))
}

/// Record the clock section of a paused VM. `vmclock_disruption_marker` is the marker the guest
/// currently sees (0 without a vmclock page).
pub fn capture(
    backend: &dyn ClockBackend,
    vmclock_disruption_marker: u64,
) -> Result<ClockState, CaptureError> {
    let n = backend.vcpu_count();
    if n == 0 || n > guest_clock_format::MAX_VCPUS {
        return Err(CaptureError::VcpuCount(n));
    }
    let caps = backend.capabilities();
    let host = backend.host_info()?;
    let guest_tsc_khz = backend.tsc_khz(0)?;
    if guest_tsc_khz == 0 {
        return Err(CaptureError::ZeroTscRate(0));
    }
    let host_tsc_khz = host.identity.host_tsc_khz;
    let frac_bits = caps.tsc_scaling_frac_bits;
    let ratio = math::effective_tsc_ratio(guest_tsc_khz, host_tsc_khz, frac_bits);

    let (clock, capture_kind, mut uncertainty_ns) = sample_clock(backend)?;
    let exact_pairs = capture_kind == CaptureKind::KvmClockData && caps.tsc_offset_attr;
    let mut vcpus = Vec::with_capacity(n);
    for id in 0..n {
        let khz = backend.tsc_khz(id)?;
        if khz == 0 {
            return Err(CaptureError::ZeroTscRate(id));
        }
        if exact_pairs {
            // Tₙ at Kₙ = K: the guest TSC at the host TSC of the same kernel snapshot.
            let offset = backend.tsc_offset(id)?;
            let tsc = math::guest_tsc_ticks(clock.host_tsc_ticks, ratio, frac_bits, offset);
            vcpus.push(VcpuClockState {
                id: id as u32,
                tsc_ticks: tsc,
                kvmclock_ns: clock.clock_ns,
                tsc_offset_ticks: offset,
            });
        } else {
            // Bracket the MSR read with two kvmclock reads; Kₙ is their midpoint.
            let a = backend.get_clock()?.clock_ns;
            let tsc = backend.tsc_msr(id)?;
            let b = backend.get_clock()?.clock_ns;
            let kn = a / 2 + b / 2 + (a % 2 + b % 2) / 2;
            uncertainty_ns = uncertainty_ns.max(b.saturating_sub(a).div_ceil(2));
            let offset = if caps.tsc_offset_attr {
                backend.tsc_offset(id)?
            } else {
                math::tsc_offset_for(tsc, backend.host_tsc_ticks(), ratio, frac_bits)
            };
            vcpus.push(VcpuClockState {
                id: id as u32,
                tsc_ticks: tsc,
                kvmclock_ns: kn,
                tsc_offset_ticks: offset,
            });
        }
    }
    debug!("captured {n} vCPUs, exact pairs: {exact_pairs}");
    let state = ClockState {
        capture_kind,
        clock,
        tsc: TscScaling {
            guest_tsc_khz,
            host_tsc_khz,
            ratio,
            frac_bits,
        },
        vcpus,
        host: host.identity,
        ntp: host.ntp,
        vmclock_disruption_marker,
        capture_uncertainty_ns: uncertainty_ns,
        // The backend does not know the VM's identity; `ClockManager` fills it in.
        vm_id: [0; 16],
    };
    info!(
        "captured clock: K={} ns at W={} ns (host TSC {}), {:?}, {} vCPUs at {} kHz",
        state.clock.clock_ns,
        state.clock.realtime_ns,
        state.clock.host_tsc_ticks,
        state.capture_kind,
        n,
        guest_tsc_khz
    );
    Ok(state)
}

//! What the guest observes and the metrics over it: each vCPU's latest RDTSC sample with the
//! kvmclock the guest computes from its pvclock page at that TSC (`pvclock_read_ns`, exactly as
//! a guest does), and the guest-observed errors across a disruption (shared by `vm.clock`, the
//! demo and the e2e tests).

use guest_clock::backend::PvclockTimeInfo;
use guest_clock::math;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::guest::PVCLOCK_GPA;

/// One guest sample and what the guest's kvmclock read at it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct VcpuObservation {
    /// vCPU index.
    pub vcpu: usize,
    /// The guest's RDTSC sample, ticks.
    pub guest_tsc_ticks: u64,
    /// kvmclock the guest computes at that TSC from its pvclock page, ns.
    pub guest_kvmclock_ns: u64,
    /// Host CLOCK_REALTIME at the instant of that sample, ns (mapped through the host TSC).
    pub host_realtime_ns: u64,
    /// The pvclock flags byte (bit 1: PVCLOCK_GUEST_STOPPED).
    pub pvclock_flags: u8,
    /// The pvclock multiplier the guest used.
    pub tsc_to_system_mul: u32,
    /// The pvclock shift the guest used.
    pub tsc_shift: i8,
    /// Loop iterations this vCPU has done.
    pub samples: u64,
}

/// The latest sample of every vCPU.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct GuestObservation {
    /// One per vCPU (vCPUs that have not sampled yet are absent).
    pub vcpus: Vec<VcpuObservation>,
    /// A Linux guest's own clocks (probe samples mapped to host time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linux: Option<super::linux::LinuxObservation>,
}

/// Guest-observed kvmclock error across a disruption:
/// `(after.kvmclock − before.kvmclock) − (after.realtime − before.realtime)`. Both realtimes come
/// from one machine's clock (or, for a migration with an injected skew, the skew shows up here).
pub fn observed_kvmclock_error_ns(before: &VcpuObservation, after: &VcpuObservation) -> i64 {
    math::diff_signed(after.guest_kvmclock_ns, before.guest_kvmclock_ns).saturating_sub(
        math::diff_signed(after.host_realtime_ns, before.host_realtime_ns),
    )
}

/// Guest-observed kvmclock error against the guest's own uninterrupted clock: how far kvmclock
/// moved minus how far the *previous* pvclock function says it should have moved for the TSC
/// ticks that passed: `(after.kvmclock − before.kvmclock) − scale(after.tsc − before.tsc;
/// before.mul, before.shift)`. For a live update (continuous TSC) this is the error "as if not
/// scheduled", free of the host's kvmclock-vs-NTP rate difference that the wallclock metric
/// includes.
pub fn observed_kvmclock_vs_tsc_error_ns(before: &VcpuObservation, after: &VcpuObservation) -> i64 {
    let ticks = after.guest_tsc_ticks.wrapping_sub(before.guest_tsc_ticks);
    let expected = math::pvclock_scale_delta(ticks, before.tsc_to_system_mul, before.tsc_shift);
    math::diff_signed(after.guest_kvmclock_ns, before.guest_kvmclock_ns)
        .saturating_sub(i64::try_from(expected).unwrap_or(i64::MAX))
}

/// Guest-observed TSC error: `(after.tsc − before.tsc) − ns_to_ticks(after.realtime −
/// before.realtime)` at the guest rate.
pub fn observed_tsc_error_ticks(
    before: &VcpuObservation,
    after: &VcpuObservation,
    tsc_khz: u32,
) -> i64 {
    let ticks = after.guest_tsc_ticks.wrapping_sub(before.guest_tsc_ticks) as i64;
    let rt = math::diff_signed(after.host_realtime_ns, before.host_realtime_ns);
    ticks.saturating_sub(math::delta_ns_to_ticks(rt, tsc_khz))
}

pub(super) fn decode_pvclock(b: &[u8; 32]) -> PvclockTimeInfo {
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    };
    PvclockTimeInfo {
        version: u32_at(0),
        tsc_timestamp: u64_at(8),
        system_time: u64_at(16),
        tsc_to_system_mul: u32_at(24),
        tsc_shift: b[28] as i8,
        flags: b[29],
    }
}

/// Read a vCPU's pvclock from guest memory, retrying while KVM updates it (odd version).
pub(super) fn read_pvclock(mem: &GuestMemoryMmap, vcpu: usize) -> Option<PvclockTimeInfo> {
    let gpa = GuestAddress(PVCLOCK_GPA + 32 * vcpu as u64);
    for _ in 0..100 {
        let mut b = [0u8; 32];
        mem.read_slice(&mut b, gpa).ok()?;
        let p = decode_pvclock(&b);
        if p.version.is_multiple_of(2) {
            return (p.tsc_to_system_mul != 0).then_some(p);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(k: u64, rt: u64, tsc: u64) -> VcpuObservation {
        VcpuObservation {
            vcpu: 0,
            guest_tsc_ticks: tsc,
            guest_kvmclock_ns: k,
            host_realtime_ns: rt,
            pvclock_flags: 1,
            tsc_to_system_mul: 1 << 31,
            tsc_shift: 0,
            samples: 1,
        }
    }

    #[test]
    fn observed_errors() {
        let a = obs(1_000, 10_000, 5_000);
        let b = obs(
            1_000 + 1_000_000 + 7,
            10_000 + 1_000_000,
            5_000 + 2_000_000 - 3,
        );
        assert_eq!(observed_kvmclock_error_ns(&a, &b), 7);
        assert_eq!(observed_tsc_error_ticks(&a, &b, 2_000_000), -3);
        // mul 2^31, shift 0: 2 GHz → 1 tick = 0.5 ns; 1_999_997 ticks = 999_998 ns (floor).
        assert_eq!(
            observed_kvmclock_vs_tsc_error_ns(&a, &b),
            1_000_007 - 999_998
        );
    }
}

//! The clock-restore strategies compared by `clockvmm bench`, each re-implemented from its
//! public description on the plugin's [`ClockBackend`] trait (none of their code is used):
//!
//! - `naive`: `KVM_SET_CLOCK(K)` with flags 0, then `MSR_IA32_TSC = Tₙ` (the saved value). What
//!   QEMU does (target/i386/kvm: kvmclock's `KVM_SET_CLOCK` with the saved clock; TSC via the MSR
//!   list), Firecracker's default snapshot restore, and Cloud Hypervisor up to v52. The guest
//!   loses the whole downtime; the MSR write may be swallowed by KVM's ±1 s matching.
//! - `realtime-msr`: `KVM_SET_CLOCK(K, W, KVM_CLOCK_REALTIME)` (the kernel adds the realtime that
//!   passed) + `MSR_IA32_TSC = Tₙ`: Cloud Hypervisor v53. kvmclock is right, the TSC still lags.
//! - `kvm-doc`: the algorithm of Linux `Documentation/virt/kvm/devices/vcpu.rst`
//!   (`KVM_VCPU_TSC_OFFSET`): `KVM_SET_CLOCK(K, W, REALTIME)`, then `KVM_GET_CLOCK` →
//!   `(guest_dest, tsc_dest)`, then `ofs_dst = ofs_src − (guest_src − guest_dest)·freq +
//!   (tsc_src − tsc_dest)`. It ignores TSC scaling (host ticks are mixed with guest ticks).
//! - `guest-clock`: this project ([`guest_clock::restore::restore`]).

use guest_clock::backend::{ClockBackend, ClockData, KVM_CLOCK_REALTIME};
use guest_clock::format::ClockState;
use guest_clock::restore::{restore, RestoreMode, RestoreOptions};

/// A restore strategy under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// SET_CLOCK(K) + MSR TSC = Tₙ.
    Naive,
    /// SET_CLOCK(K, W, REALTIME) + MSR TSC = Tₙ.
    RealtimeMsr,
    /// The kernel documentation's offset algorithm.
    KvmDoc,
    /// This project.
    GuestClock,
}

impl Strategy {
    /// All strategies, in table order.
    pub const ALL: [Strategy; 4] = [
        Strategy::Naive,
        Strategy::RealtimeMsr,
        Strategy::KvmDoc,
        Strategy::GuestClock,
    ];

    /// The name used in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Naive => "naive",
            Strategy::RealtimeMsr => "realtime-msr",
            Strategy::KvmDoc => "kvm-doc",
            Strategy::GuestClock => "guest-clock",
        }
    }

    /// Restore `state` into the (fresh) VM behind `backend`. `skew_ns` emulates a destination
    /// wallclock that is `skew_ns` ahead of the source's (a second host whose NTP is off):
    /// strategies that use W see `W − skew`. Returns whether the guest was signalled.
    pub fn apply(
        self,
        backend: &dyn ClockBackend,
        state: &ClockState,
        mode: RestoreMode,
        skew_ns: i64,
    ) -> Result<bool, String> {
        let w_seen = guest_clock::math::add_signed(state.clock.realtime_ns, -skew_ns);
        match self {
            Strategy::Naive => {
                set_clock(backend, state.clock.clock_ns, None)?;
                msr_tscs(backend, state)?;
                Ok(false)
            }
            Strategy::RealtimeMsr => {
                set_clock(backend, state.clock.clock_ns, Some(w_seen))?;
                msr_tscs(backend, state)?;
                Ok(false)
            }
            Strategy::KvmDoc => {
                set_clock(backend, state.clock.clock_ns, Some(w_seen))?;
                let d = backend.get_clock().map_err(|e| e.to_string())?;
                let freq_khz = i128::from(state.tsc.guest_tsc_khz);
                let guest_delta_ns = i128::from(state.clock.clock_ns) - i128::from(d.clock_ns);
                let tsc_delta =
                    i128::from(state.clock.host_tsc_ticks) - i128::from(d.host_tsc_ticks);
                for (n, v) in state.vcpus.iter().enumerate() {
                    // ofs_dst = ofs_src − (guest_src − guest_dest)·freq + (tsc_src − tsc_dest)
                    let ofs = i128::from(v.tsc_offset_ticks)
                        - guest_delta_ns * freq_khz / 1_000_000
                        + tsc_delta;
                    backend
                        .set_tsc_offset(n, ofs as u64)
                        .map_err(|e| e.to_string())?;
                }
                Ok(false)
            }
            Strategy::GuestClock => {
                let opts = RestoreOptions {
                    mode: Some(mode),
                    inject_wallclock_skew_ns: skew_ns,
                    ..RestoreOptions::default()
                };
                let report = restore(backend, state, &opts, None).map_err(|e| e.to_string())?;
                Ok(report.signalled.any())
            }
        }
    }
}

fn set_clock(
    backend: &dyn ClockBackend,
    clock_ns: u64,
    realtime_ns: Option<u64>,
) -> Result<(), String> {
    let data = ClockData {
        clock_ns,
        flags: if realtime_ns.is_some() {
            KVM_CLOCK_REALTIME
        } else {
            0
        },
        realtime_ns: realtime_ns.unwrap_or(0),
        host_tsc_ticks: 0,
    };
    backend.set_clock(&data).map_err(|e| e.to_string())
}

fn msr_tscs(backend: &dyn ClockBackend, state: &ClockState) -> Result<(), String> {
    for (n, v) in state.vcpus.iter().enumerate() {
        backend
            .set_tsc_msr(n, v.tsc_ticks)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

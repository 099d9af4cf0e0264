//! The clock section's content: plain Rust types, no KVM types.
//!
//! Every field carries its unit in its name. The byte layout of each version is in `SPEC.md`.
//! Fields added after version 1 carry `#[version(start = N, default_fn = ...)]`; their defaults
//! (what a v1 stream decodes to) are documented on the default functions.

use serde::{Deserialize, Serialize};
use versionize::{VersionMap, Versionize, VersionizeError, VersionizeResult};
use versionize_derive::Versionize;

/// `KVM_CLOCK_TSC_STABLE`: the host's master clock was in use (kvmclock is a TSC function).
pub const KVM_CLOCK_TSC_STABLE: u32 = 2;
/// `KVM_CLOCK_REALTIME`: `realtime_ns` is valid and was taken in the same snapshot as `clock_ns`.
pub const KVM_CLOCK_REALTIME: u32 = 4;
/// `KVM_CLOCK_HOST_TSC`: `host_tsc_ticks` is valid and was taken in the same snapshot.
pub const KVM_CLOCK_HOST_TSC: u32 = 8;
/// All flags the section may carry.
pub const KVM_CLOCK_VALID_FLAGS: u32 =
    KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC;

/// How (K, W, host TSC) were obtained on the sender.
#[derive(Versionize, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureKind {
    /// One `KVM_GET_CLOCK` that returned `KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC`: the three
    /// values come from one kernel snapshot, no userspace uncertainty.
    KvmClockData,
    /// The kernel could not give realtime and host TSC atomically: `realtime_ns` and
    /// `host_tsc_ticks` were read in userspace around a `KVM_GET_CLOCK`; the bracket width is the
    /// capture uncertainty.
    UserspaceBracket,
}

/// One `struct kvm_clock_data` as read by `KVM_GET_CLOCK` (or reconstructed by a bracket).
#[derive(Versionize, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvmClockSample {
    /// kvmclock K, ns since the VM's kvmclock epoch.
    pub clock_ns: u64,
    /// `KVM_CLOCK_*` flags; `KVM_CLOCK_REALTIME` only when the kernel gave it.
    pub flags: u32,
    /// Host CLOCK_REALTIME W, ns since the Unix epoch.
    pub realtime_ns: u64,
    /// Host TSC at the same instant, in host ticks.
    pub host_tsc_ticks: u64,
}

/// The guest TSC rate and how it maps onto the host TSC.
#[derive(Versionize, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TscScaling {
    /// Guest TSC frequency, kHz (`KVM_GET_TSC_KHZ`).
    pub guest_tsc_khz: u32,
    /// Host TSC frequency, kHz.
    pub host_tsc_khz: u32,
    /// Scaling ratio as a fixed-point number with `frac_bits` fractional bits
    /// (`1 << frac_bits` means 1:1).
    pub ratio: u64,
    /// Fractional bits of `ratio`: 48 on Intel, 32 on AMD, 0 when the host has no scaling.
    pub frac_bits: u8,
}

/// One vCPU's TSC, paired with the kvmclock value at which it was read.
#[derive(Versionize, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VcpuClockState {
    /// vCPU index.
    pub id: u32,
    /// Tₙ: the guest TSC of this vCPU, in guest ticks ...
    pub tsc_ticks: u64,
    /// Kₙ: ... when kvmclock read this value (ns).
    pub kvmclock_ns: u64,
    /// The vCPU's TSC offset (guest ticks) on the sender; used by a live update only.
    pub tsc_offset_ticks: u64,
}

/// Who the sender's host was.
#[derive(Versionize, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct HostIdentity {
    /// A 64-bit hash of /etc/machine-id (the id itself is not exported).
    pub machine_id_hash: u64,
    /// /proc/sys/kernel/random/boot_id as 16 bytes (changes at every boot, kexec included).
    pub boot_id: [u8; 16],
    /// The host kernel's TSC frequency, kHz (recalibrated at every boot).
    pub host_tsc_khz: u32,
    /// The host's current clocksource (`tsc`, `kvm-clock`, `hpet`...), at most 32 bytes.
    pub clocksource: String,
}

/// The sender host's NTP discipline state, from `adjtimex(2)`.
#[derive(Versionize, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NtpState {
    /// `timex.status` bits (STA_UNSYNC = 0x40 means not synchronised).
    pub status: i32,
    /// `timex.maxerror`, µs: the kernel's maximum error bound.
    pub maxerror_us: i64,
    /// `timex.esterror`, µs: the estimated error.
    pub esterror_us: i64,
}

/// The guest-clock section: everything a receiver needs to restore the guest's clocks.
#[derive(Versionize, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct ClockState {
    /// How `clock` was obtained.
    pub capture_kind: CaptureKind,
    /// (K, W, host TSC) and flags from one `KVM_GET_CLOCK`.
    pub clock: KvmClockSample,
    /// Guest TSC rate and scaling.
    pub tsc: TscScaling,
    /// Per-vCPU (id, Tₙ, Kₙ, offset), at most [`crate::MAX_VCPUS`].
    pub vcpus: Vec<VcpuClockState>,
    /// The sender's host.
    pub host: HostIdentity,
    /// The sender's NTP state.
    pub ntp: NtpState,
    /// The vmclock `disruption_marker` the guest last saw (0 when no vmclock page).
    pub vmclock_disruption_marker: u64,
    /// v2: half-width of the userspace bracket around the capture, ns: the captured values are
    /// exact to ± this much (0 for an atomic `KvmClockData` capture). v1 streams decode to
    /// `u64::MAX`, "unknown" (see `default_capture_uncertainty_ns`); encoding at v1 drops it.
    #[version(start = 2, default_fn = "default_capture_uncertainty_ns")]
    pub capture_uncertainty_ns: u64,
    /// v3: the identity of the VM the section belongs to: a random 128-bit id (UUID v4 bytes)
    /// the VMM gives a VM at its first boot and carries through every snapshot and migration.
    /// All zeros: unknown (v1 and v2 streams decode to it, see `default_vm_id`; a VMM that gives
    /// its VMs no identity writes it). A receiver that knows which VM it restores compares it.
    #[version(start = 3, default_fn = "default_vm_id")]
    pub vm_id: [u8; 16],
}

// versionize_derive does not accept `#[default]` on enum variants, so this stays hand-written.
#[allow(clippy::derivable_impls)]
impl Default for CaptureKind {
    fn default() -> Self {
        CaptureKind::KvmClockData
    }
}

impl ClockState {
    /// Default of `capture_uncertainty_ns` for a v1 stream: `u64::MAX`, "unknown". A v1 sender did
    /// not record its bracket width, so a receiver must not assume the capture was exact; restore
    /// reports the uncertainty as unknown and relies on `capture_kind` and the NTP error instead.
    fn default_capture_uncertainty_ns(_source_version: u16) -> u64 {
        u64::MAX
    }

    /// Default of `vm_id` for a v1 or v2 stream: all zeros, "unknown". Those senders did not
    /// record which VM the section belongs to, so a receiver cannot check it (it warns).
    fn default_vm_id(_source_version: u16) -> [u8; 16] {
        [0; 16]
    }

    /// Whether the section names its VM (`vm_id` is not all zeros).
    pub fn has_vm_id(&self) -> bool {
        self.vm_id != [0; 16]
    }
}

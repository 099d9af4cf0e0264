//! What the plugin needs from a hypervisor, as one trait with two backends.
//!
//! - [`kvm::KvmBackend`]: the real thing, over kvm-ioctls on `/dev/kvm`.
//! - [`model::ModelVm`]: a deterministic software model of KVM x86 clock semantics, driven by a
//!   test-controlled time source; the only place where TSC effects are visible on a host (like
//!   PVM) that ignores TSC offsets.
//!
//! Callers (capture, restore, signal, `ClockManager`) depend on [`ClockBackend`] only.

use guest_clock_format::{HostIdentity, NtpState};

pub mod host;
pub mod kvm;
#[cfg(feature = "model")]
pub mod model;

pub use guest_clock_format::{
    KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME, KVM_CLOCK_TSC_STABLE, KVM_CLOCK_VALID_FLAGS,
};

/// `struct kvm_clock_data` without its padding: what `KVM_GET_CLOCK` returns and
/// `KVM_SET_CLOCK` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClockData {
    /// kvmclock, ns.
    pub clock_ns: u64,
    /// `KVM_CLOCK_*` flags.
    pub flags: u32,
    /// Host CLOCK_REALTIME, ns; valid with `KVM_CLOCK_REALTIME`.
    pub realtime_ns: u64,
    /// Host TSC, ticks; valid with `KVM_CLOCK_HOST_TSC` (ignored by `KVM_SET_CLOCK`).
    pub host_tsc_ticks: u64,
}

/// The guest-visible `struct pvclock_vcpu_time_info` (32 bytes, packed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PvclockTimeInfo {
    /// Odd while the host updates the structure.
    pub version: u32,
    /// Guest TSC at `system_time`.
    pub tsc_timestamp: u64,
    /// kvmclock ns at `tsc_timestamp`.
    pub system_time: u64,
    /// 32.32 fixed-point multiplier (after `tsc_shift`).
    pub tsc_to_system_mul: u32,
    /// Power-of-two pre-shift of the TSC delta.
    pub tsc_shift: i8,
    /// `PVCLOCK_TSC_STABLE_BIT` (1), `PVCLOCK_GUEST_STOPPED` (2).
    pub flags: u8,
}

/// `PVCLOCK_TSC_STABLE_BIT`.
pub const PVCLOCK_TSC_STABLE_BIT: u8 = 1;
/// `PVCLOCK_GUEST_STOPPED`: set by `KVM_KVMCLOCK_CTRL`, cleared by the guest.
pub const PVCLOCK_GUEST_STOPPED: u8 = 2;

/// `MSR_IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;

/// What the hypervisor can do with clocks, probed once when the backend is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// `KVM_CAP_ADJUST_CLOCK`: the `KVM_CLOCK_*` flags `KVM_GET_CLOCK` can report
    /// (0 = no clock ioctls; 14 on Linux 5.16+).
    pub adjust_clock_flags: u32,
    /// `KVM_CAP_TSC_CONTROL`: per-vCPU hardware TSC scaling (`KVM_SET_TSC_KHZ`).
    pub tsc_control: bool,
    /// `KVM_CAP_VM_TSC_CONTROL`: VM-wide `KVM_SET_TSC_KHZ` before vCPUs exist.
    pub vm_tsc_control: bool,
    /// `KVM_VCPU_TSC_CTRL`/`KVM_VCPU_TSC_OFFSET` vCPU attribute present
    /// (`KVM_CAP_VCPU_ATTRIBUTES` and `KVM_HAS_DEVICE_ATTR`).
    pub tsc_offset_attr: bool,
    /// `KVM_CAP_KVMCLOCK_CTRL`.
    pub kvmclock_ctrl: bool,
    /// Fractional bits of the hardware TSC scaling ratio (48 Intel, 32 AMD; 0 = no scaling).
    pub tsc_scaling_frac_bits: u8,
}

/// Whether writes to a vCPU's TSC (offset attribute or MSR) take effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TscControl {
    /// Read-back after a write showed the value the write asked for.
    Effective,
    /// The hypervisor accepted the write but the read-back shows it was ignored
    /// (kvm_pvm does this); the guest TSC follows the host TSC whatever we write.
    Ignored,
    /// Not verified yet.
    Unknown,
}

/// The host a backend runs on, as the section records it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostInfo {
    /// machine-id hash, boot_id, host tsc_khz, clocksource.
    pub identity: HostIdentity,
    /// adjtimex NTP state.
    pub ntp: NtpState,
}

/// A backend operation that failed; every ioctl's errno surfaces here.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// An ioctl failed with an errno.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// The ioctl or operation name, e.g. `KVM_SET_CLOCK`.
        op: &'static str,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// The hypervisor lacks a capability the operation needs.
    #[error("{op} is not supported by this hypervisor")]
    Unsupported {
        /// The operation.
        op: &'static str,
    },
    /// `KVM_KVMCLOCK_CTRL` before the guest enabled kvmclock (EINVAL); not an error for callers
    /// that signal best-effort.
    #[error("vCPU {vcpu}: the guest has not enabled kvmclock")]
    KvmclockNotEnabled {
        /// The vCPU.
        vcpu: usize,
    },
    /// A vCPU index out of range.
    #[error("no vCPU {vcpu} (the VM has {count})")]
    NoSuchVcpu {
        /// Requested index.
        vcpu: usize,
        /// vCPU count.
        count: usize,
    },
    /// An argument the hypervisor would reject (e.g. a TSC rate it cannot reach).
    #[error("invalid argument to {op}: {reason}")]
    InvalidArgument {
        /// The operation.
        op: &'static str,
        /// Why.
        reason: String,
    },
    /// Reading host facts (/etc/machine-id, sysfs, adjtimex) failed.
    #[error("reading host information: {0}")]
    HostInfo(String),
}

/// Result of a backend operation.
pub type Result<T> = std::result::Result<T, BackendError>;

/// The clock operations of one VM and its vCPUs.
///
/// vCPUs are addressed by index `0..vcpu_count()`. All methods take `&self` (like kvm-ioctls
/// file descriptors); backends use interior mutability where they need it, and are `Send + Sync`
/// so a VMM can call them from its API thread while the vCPUs are paused.
pub trait ClockBackend: Send + Sync {
    /// A short name for logs and reports: `"kvm"`, `"kvm_pvm"`, `"model"`.
    fn name(&self) -> &str;
    /// Capabilities probed at open.
    fn capabilities(&self) -> Capabilities;
    /// Number of vCPUs.
    fn vcpu_count(&self) -> usize;

    /// `KVM_GET_CLOCK`.
    fn get_clock(&self) -> Result<ClockData>;
    /// `KVM_SET_CLOCK`. With `KVM_CLOCK_REALTIME` in `flags` the kernel adds
    /// `now_realtime - realtime_ns` to `clock_ns` when positive (never steps back).
    fn set_clock(&self, data: &ClockData) -> Result<()>;

    /// `KVM_GET_TSC_KHZ` of a vCPU.
    fn tsc_khz(&self, vcpu: usize) -> Result<u32>;
    /// `KVM_SET_TSC_KHZ` of a vCPU.
    fn set_tsc_khz(&self, vcpu: usize, khz: u32) -> Result<()>;

    /// `KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET)`.
    fn tsc_offset(&self, vcpu: usize) -> Result<u64>;
    /// `KVM_SET_DEVICE_ATTR(KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET)`.
    fn set_tsc_offset(&self, vcpu: usize, offset_ticks: u64) -> Result<()>;
    /// `KVM_GET_MSRS(MSR_IA32_TSC)`: the guest TSC now.
    fn tsc_msr(&self, vcpu: usize) -> Result<u64>;
    /// `KVM_SET_MSRS(MSR_IA32_TSC)`: goes through KVM's ±1 s "matching" heuristic.
    fn set_tsc_msr(&self, vcpu: usize, value_ticks: u64) -> Result<()>;
    /// What verify-after-write found about TSC writes on this hypervisor.
    fn tsc_control(&self) -> TscControl;

    /// `KVM_KVMCLOCK_CTRL`: set `PVCLOCK_GUEST_STOPPED` for the vCPU at its next entry.
    fn kvmclock_ctrl(&self, vcpu: usize) -> Result<()>;
    /// The pvclock structure the guest would read on this vCPU now, `None` when the guest has
    /// not enabled kvmclock (or the backend cannot see guest memory).
    fn pvclock(&self, vcpu: usize) -> Result<Option<PvclockTimeInfo>>;

    /// The host's CLOCK_REALTIME now, ns.
    fn host_realtime_ns(&self) -> u64;
    /// The host's TSC now, ticks.
    fn host_tsc_ticks(&self) -> u64;
    /// The host's identity and NTP state.
    fn host_info(&self) -> Result<HostInfo>;
}

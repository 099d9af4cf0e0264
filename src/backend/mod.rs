//! What the plugin needs, split by where it comes from:
//!
//! - [`Hypervisor`]: the VM's clock (get/set), each vCPU's TSC offset, rate and MSR, and
//!   `KVM_KVMCLOCK_CTRL` — what a VMM implements over its hypervisor layer;
//! - [`HostFacts`]: the host's realtime, TSC, identity and NTP state ([`SystemHost`]);
//! - [`PvclockPages`]: measurement only (what the guest reads), for test VMMs and the model.
//!
//! Implementations:
//! - [`kvm::KvmBackend`] (x86_64): kvm-ioctls on borrowed `VmFd`/`VcpuFd`s, no lock of its own;
//! - `model::ModelVm` (cargo feature `model`): a deterministic software model of KVM x86 clock
//!   semantics, driven by a test-controlled time source; the only place where TSC effects are
//!   visible on a host (like PVM) that ignores TSC offsets.
//!
//! Capture, restore, signal and `ClockManager` take a [`ClockBackend`] = [`Hypervisor`] +
//! [`HostFacts`]. Only x86_64 KVM is supported: elsewhere `kvm` and [`SystemHost`] are absent
//! and [`SUPPORTED`] is false.

use guest_clock_format::{HostIdentity, NtpState};

pub mod host;
#[cfg(target_arch = "x86_64")]
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

/// Whether this target has a supported hypervisor backend (x86_64 KVM).
pub const SUPPORTED: bool = cfg!(target_arch = "x86_64");

/// `MSR_IA32_TSC` (Linux `arch/x86/include/asm/msr-index.h`; not in kvm-bindings).
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

/// What the plugin needs from the hypervisor: the clock operations of one VM and its vCPUs.
///
/// This is the seam a VMM implements: the library's [`kvm::KvmBackend`] over kvm-ioctls file
/// descriptors, or an adapter over the VMM's own hypervisor layer (Cloud Hypervisor's
/// `hypervisor::Vm`/`Vcpu` already have every operation; see the README). vCPUs are addressed by
/// index `0..vcpu_count()`; all methods take `&self` and are called while the vCPUs are paused
/// (outside `KVM_RUN`).
pub trait Hypervisor: Send + Sync {
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
    /// What verify-after-write found about TSC writes on this hypervisor
    /// ([`TscControl::Unknown`] for an implementation that does not verify).
    fn tsc_control(&self) -> TscControl {
        TscControl::Unknown
    }

    /// `KVM_KVMCLOCK_CTRL`: set `PVCLOCK_GUEST_STOPPED` for the vCPU at its next entry.
    fn kvmclock_ctrl(&self, vcpu: usize) -> Result<()>;
}

/// Facts about the host the plugin runs on, not about the VM: its clocks, identity and NTP
/// state. [`SystemHost`] reads the real ones; the model simulates them.
pub trait HostFacts: Send + Sync {
    /// The host's CLOCK_REALTIME now, ns.
    fn host_realtime_ns(&self) -> u64;
    /// The host's TSC now, ticks.
    fn host_tsc_ticks(&self) -> u64;
    /// The host's identity and NTP state.
    fn host_info(&self) -> Result<HostInfo>;
}

/// Measurement only: the pvclock page a guest reads on a vCPU. The plugin never needs it; a test
/// VMM (clockvmm) or the model use it to see what the guest sees.
pub trait PvclockPages {
    /// The pvclock structure the guest would read on `vcpu` now, `None` when the guest has not
    /// enabled kvmclock (or guest memory is not visible).
    fn pvclock(&self, vcpu: usize) -> Result<Option<PvclockTimeInfo>>;
}

/// Everything capture and restore use: a [`Hypervisor`] on a host with [`HostFacts`].
/// Implemented for every type that is both; [`WithHost`] pairs a hypervisor adapter with
/// [`SystemHost`] (or another host).
pub trait ClockBackend: Hypervisor + HostFacts {}

impl<T: Hypervisor + HostFacts + ?Sized> ClockBackend for T {}

/// A [`Hypervisor`] paired with the [`HostFacts`] of the host it runs on.
#[derive(Debug)]
pub struct WithHost<H, F = SystemHost> {
    /// The hypervisor adapter.
    pub hypervisor: H,
    /// The host.
    pub host: F,
}

impl<H: Hypervisor, F: Send + Sync> Hypervisor for WithHost<H, F> {
    fn name(&self) -> &str {
        self.hypervisor.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.hypervisor.capabilities()
    }
    fn vcpu_count(&self) -> usize {
        self.hypervisor.vcpu_count()
    }
    fn get_clock(&self) -> Result<ClockData> {
        self.hypervisor.get_clock()
    }
    fn set_clock(&self, data: &ClockData) -> Result<()> {
        self.hypervisor.set_clock(data)
    }
    fn tsc_khz(&self, vcpu: usize) -> Result<u32> {
        self.hypervisor.tsc_khz(vcpu)
    }
    fn set_tsc_khz(&self, vcpu: usize, khz: u32) -> Result<()> {
        self.hypervisor.set_tsc_khz(vcpu, khz)
    }
    fn tsc_offset(&self, vcpu: usize) -> Result<u64> {
        self.hypervisor.tsc_offset(vcpu)
    }
    fn set_tsc_offset(&self, vcpu: usize, offset_ticks: u64) -> Result<()> {
        self.hypervisor.set_tsc_offset(vcpu, offset_ticks)
    }
    fn tsc_msr(&self, vcpu: usize) -> Result<u64> {
        self.hypervisor.tsc_msr(vcpu)
    }
    fn set_tsc_msr(&self, vcpu: usize, value_ticks: u64) -> Result<()> {
        self.hypervisor.set_tsc_msr(vcpu, value_ticks)
    }
    fn tsc_control(&self) -> TscControl {
        self.hypervisor.tsc_control()
    }
    fn kvmclock_ctrl(&self, vcpu: usize) -> Result<()> {
        self.hypervisor.kvmclock_ctrl(vcpu)
    }
}

impl<H: Send + Sync, F: HostFacts> HostFacts for WithHost<H, F> {
    fn host_realtime_ns(&self) -> u64 {
        self.host.host_realtime_ns()
    }
    fn host_tsc_ticks(&self) -> u64 {
        self.host.host_tsc_ticks()
    }
    fn host_info(&self) -> Result<HostInfo> {
        self.host.host_info()
    }
}

/// The real host: CLOCK_REALTIME, `RDTSC`, machine-id/boot_id/sysfs and `adjtimex`. The identity
/// is read once (machine-id and boot_id cannot change under a running process); the NTP state at
/// every [`HostFacts::host_info`].
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone)]
pub struct SystemHost {
    identity: HostIdentity,
}

#[cfg(target_arch = "x86_64")]
impl SystemHost {
    /// Read the host's identity; `host_tsc_khz` is the host TSC rate (sysfs, else what
    /// `KVM_GET_TSC_KHZ` reports for a fresh vCPU).
    pub fn new(host_tsc_khz: u32) -> Result<Self> {
        Ok(SystemHost {
            identity: host::read_host_info(host_tsc_khz)?.identity,
        })
    }
}

#[cfg(target_arch = "x86_64")]
impl HostFacts for SystemHost {
    fn host_realtime_ns(&self) -> u64 {
        host::realtime_ns()
    }
    fn host_tsc_ticks(&self) -> u64 {
        host::rdtsc()
    }
    fn host_info(&self) -> Result<HostInfo> {
        Ok(HostInfo {
            identity: self.identity.clone(),
            ntp: host::ntp_state()?,
        })
    }
}

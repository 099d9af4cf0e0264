//! The real backend: kvm-ioctls on `/dev/kvm` (x86_64).
//!
//! [`KvmBackend`] works on the VMM's own file descriptors, borrowed (`&VmFd`, `&[VcpuFd]`) or
//! through any [`VcpuFds`] the VMM implements; it holds no lock of its own, so nothing is held
//! across `KVM_RUN` (the plugin runs while the vCPUs are paused). [`KvmInfo`] (capabilities,
//! flavour, host TSC rate, host identity) is probed once and can be reused for every backend
//! built over the same VM.
//!
//! Thin wrappers, one per ioctl, every errno surfacing as [`BackendError::Ioctl`] with the ioctl's
//! name. kvm-ioctls 0.25 wraps `KVM_{HAS,GET,SET}_DEVICE_ATTR` on vCPU fds only for aarch64, so
//! the TSC-offset attribute ioctls are defined here with vmm-sys-util's ioctl macros; the
//! constants come from kvm-bindings.
//!
//! TSC writes are never trusted: after every offset or `MSR_IA32_TSC` write the backend reads
//! the guest TSC back through the MSR, bracketed by host TSC reads, and records
//! [`TscControl::Ignored`] when the guest TSC did not follow (kvm_pvm ignores such writes).

use std::borrow::Borrow;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use kvm_bindings::{
    kvm_clock_data, kvm_device_attr, kvm_msr_entry, Msrs, KVM_CAP_VCPU_ATTRIBUTES,
    KVM_CAP_VM_TSC_CONTROL, KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET,
};
use kvm_ioctls::{Cap, VcpuFd, VmFd};
use log::{debug, info, warn};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

use super::host;
use super::{
    BackendError, Capabilities, ClockData, HostFacts, HostInfo, Hypervisor, Result, SystemHost,
    TscControl, KVM_CLOCK_REALTIME, MSR_IA32_TSC,
};
use crate::math;

mod nr {
    //! The vCPU device-attribute ioctl numbers kvm-ioctls does not wrap on x86_64.
    use kvm_bindings::{kvm_device_attr, KVMIO};
    use vmm_sys_util::ioctl_iow_nr;

    ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
    ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);
    ioctl_iow_nr!(KVM_HAS_DEVICE_ATTR, KVMIO, 0xe3, kvm_device_attr);
}
use nr::{KVM_GET_DEVICE_ATTR, KVM_HAS_DEVICE_ATTR, KVM_SET_DEVICE_ATTR};

/// A guest TSC read back this many ticks outside the bracket of what a write asked for means the
/// write was ignored (0.1 ms at 1 GHz; a write that worked lands within a few ticks).
const TSC_VERIFY_SLACK_TICKS: u64 = 100_000;

fn ioctl_err(op: &'static str, e: vmm_sys_util::errno::Error) -> BackendError {
    let errno = e.errno();
    BackendError::Ioctl {
        op,
        source: std::io::Error::from_raw_os_error(errno),
    }
}

fn last_err(op: &'static str) -> BackendError {
    BackendError::Ioctl {
        op,
        source: std::io::Error::last_os_error(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a [`KvmBackend`] reaches the vCPU file descriptors: for the duration of one call each.
///
/// Implemented for slices and vectors of `VcpuFd` and `&VcpuFd`; a VMM that keeps its vCPU fds
/// elsewhere (behind its own lock, inside its vCPU objects) implements it over those.
pub trait VcpuFds: Send + Sync {
    /// Number of vCPUs.
    fn count(&self) -> usize;
    /// Run `f` on vCPU `index`'s fd; `None` when there is no such vCPU.
    fn with_vcpu<R>(&self, index: usize, f: impl FnOnce(&VcpuFd) -> R) -> Option<R>;
}

impl VcpuFds for [VcpuFd] {
    fn count(&self) -> usize {
        self.len()
    }
    fn with_vcpu<R>(&self, index: usize, f: impl FnOnce(&VcpuFd) -> R) -> Option<R> {
        self.get(index).map(f)
    }
}

impl VcpuFds for [&VcpuFd] {
    fn count(&self) -> usize {
        self.len()
    }
    fn with_vcpu<R>(&self, index: usize, f: impl FnOnce(&VcpuFd) -> R) -> Option<R> {
        self.get(index).map(|v| f(v))
    }
}

impl<T> VcpuFds for Vec<T>
where
    [T]: VcpuFds,
    T: Send + Sync,
{
    fn count(&self) -> usize {
        self.as_slice().count()
    }
    fn with_vcpu<R>(&self, index: usize, f: impl FnOnce(&VcpuFd) -> R) -> Option<R> {
        self.as_slice().with_vcpu(index, f)
    }
}

impl<T: VcpuFds + ?Sized> VcpuFds for &T {
    fn count(&self) -> usize {
        (**self).count()
    }
    fn with_vcpu<R>(&self, index: usize, f: impl FnOnce(&VcpuFd) -> R) -> Option<R> {
        (**self).with_vcpu(index, f)
    }
}

/// What a [`KvmBackend`] probes once per VM: capabilities, KVM flavour, host TSC rate and the
/// host's identity.
#[derive(Debug, Clone)]
pub struct KvmInfo {
    caps: Capabilities,
    flavour: &'static str,
    host_tsc_khz: u32,
    host: SystemHost,
}

impl KvmInfo {
    /// Probe `vm` and its first vCPU. The host TSC rate comes from sysfs, else from the vCPU's
    /// `KVM_GET_TSC_KHZ` (a fresh vCPU runs at the host's rate).
    pub fn probe(vm: &VmFd, vcpu0: &VcpuFd) -> Result<Self> {
        let adjust = vm.check_extension_int(Cap::AdjustClock);
        let tsc_control = vm.check_extension_int(Cap::TscControl) > 0;
        let vm_tsc_control = vm.check_extension_raw(u64::from(KVM_CAP_VM_TSC_CONTROL)) > 0;
        let attrs = vm.check_extension_raw(u64::from(KVM_CAP_VCPU_ATTRIBUTES)) > 0;
        let has_attr = attrs && has_tsc_offset_attr(vcpu0);
        let vcpu_khz = vcpu0
            .get_tsc_khz()
            .map_err(|e| ioctl_err("KVM_GET_TSC_KHZ", e))?;
        let caps = Capabilities {
            adjust_clock_flags: u32::try_from(adjust.max(0)).unwrap_or(0),
            tsc_control,
            vm_tsc_control,
            tsc_offset_attr: has_attr,
            kvmclock_ctrl: vm.check_extension(Cap::KvmclockCtrl),
            tsc_scaling_frac_bits: if tsc_control {
                host::tsc_scaling_frac_bits()
            } else {
                0
            },
        };
        let flavour = host::kvm_flavour();
        let host_tsc_khz = host::sysfs_tsc_khz().unwrap_or(vcpu_khz);
        info!("KVM ({flavour}): {caps:?}, host TSC {host_tsc_khz} kHz");
        Ok(KvmInfo {
            caps,
            flavour,
            host_tsc_khz,
            host: SystemHost::new(host_tsc_khz)?,
        })
    }

    /// The capabilities.
    pub fn capabilities(&self) -> Capabilities {
        self.caps
    }

    /// `kvm_pvm`, `kvm_intel`, `kvm_amd` or `kvm`.
    pub fn flavour(&self) -> &'static str {
        self.flavour
    }

    /// The host TSC rate used for conversions, kHz.
    pub fn host_tsc_khz(&self) -> u32 {
        self.host_tsc_khz
    }
}

/// The KVM backend of one VM over the VMM's file descriptors: `M` is how it holds the `VmFd`
/// (`&VmFd`, `Arc<VmFd>`...), `V` how it reaches the vCPUs (`&[VcpuFd]`, or the VMM's own
/// [`VcpuFds`]).
pub struct KvmBackend<M, V> {
    vm: M,
    vcpus: V,
    info: KvmInfo,
    tsc_control: Mutex<TscControl>,
    /// Each vCPU's TSC rate as last read or set through this backend, kHz (0 = not known):
    /// spares verify-after-write a `KVM_GET_TSC_KHZ` per vCPU. The public [`Hypervisor::tsc_khz`]
    /// always asks KVM (the VMM may change rates behind our back).
    khz_seen: Vec<AtomicU32>,
}

impl<M, V: VcpuFds> std::fmt::Debug for KvmBackend<M, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmBackend")
            .field("info", &self.info)
            .field("vcpus", &self.vcpus.count())
            .finish()
    }
}

/// `KVM_HAS_DEVICE_ATTR(KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET)` on a vCPU.
pub(crate) fn has_tsc_offset_attr(vcpu: &VcpuFd) -> bool {
    let attr = kvm_device_attr {
        group: KVM_VCPU_TSC_CTRL,
        attr: u64::from(KVM_VCPU_TSC_OFFSET),
        addr: 0,
        flags: 0,
    };
    // SAFETY: KVM_HAS_DEVICE_ATTR reads a kvm_device_attr we own; addr is not dereferenced.
    let rc = unsafe { ioctl_with_ref(vcpu, KVM_HAS_DEVICE_ATTR(), &attr) };
    rc == 0
}

/// `KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET)`.
pub(crate) fn get_tsc_offset(vcpu: &VcpuFd) -> Result<u64> {
    let mut value: u64 = 0;
    let attr = kvm_device_attr {
        group: KVM_VCPU_TSC_CTRL,
        attr: u64::from(KVM_VCPU_TSC_OFFSET),
        addr: &mut value as *mut u64 as u64,
        flags: 0,
    };
    // SAFETY: the kernel writes one u64 at attr.addr, which points at `value`, alive and
    // exclusively ours for the duration of the call.
    let rc = unsafe { ioctl_with_ref(vcpu, KVM_GET_DEVICE_ATTR(), &attr) };
    if rc != 0 {
        return Err(last_err("KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)"));
    }
    Ok(value)
}

/// `KVM_SET_DEVICE_ATTR(KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET)`.
pub(crate) fn set_tsc_offset(vcpu: &VcpuFd, offset: u64) -> Result<()> {
    let mut value = offset;
    let mut attr = kvm_device_attr {
        group: KVM_VCPU_TSC_CTRL,
        attr: u64::from(KVM_VCPU_TSC_OFFSET),
        addr: &mut value as *mut u64 as u64,
        flags: 0,
    };
    // SAFETY: the kernel reads one u64 at attr.addr, which points at `value`, alive for the call.
    let rc = unsafe { ioctl_with_mut_ref(vcpu, KVM_SET_DEVICE_ATTR(), &mut attr) };
    if rc != 0 {
        return Err(last_err("KVM_SET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)"));
    }
    Ok(())
}

impl<'a> KvmBackend<&'a VmFd, &'a [VcpuFd]> {
    /// A backend over borrowed fds; probes [`KvmInfo`] now (an error without vCPUs).
    pub fn new(vm: &'a VmFd, vcpus: &'a [VcpuFd]) -> Result<Self> {
        let first = vcpus
            .first()
            .ok_or(BackendError::NoSuchVcpu { vcpu: 0, count: 0 })?;
        let info = KvmInfo::probe(vm, first)?;
        Ok(Self::with_info(vm, vcpus, info))
    }
}

impl<M: Borrow<VmFd> + Send + Sync, V: VcpuFds> KvmBackend<M, V> {
    /// A backend over `vm` and `vcpus` with capabilities probed before (no ioctl).
    pub fn with_info(vm: M, vcpus: V, info: KvmInfo) -> Self {
        let khz_seen = (0..vcpus.count()).map(|_| AtomicU32::new(0)).collect();
        KvmBackend {
            vm,
            vcpus,
            info,
            tsc_control: Mutex::new(TscControl::Unknown),
            khz_seen,
        }
    }

    /// What was probed.
    pub fn info(&self) -> &KvmInfo {
        &self.info
    }

    /// `kvm_pvm`, `kvm_intel`, `kvm_amd` or `kvm`.
    pub fn flavour(&self) -> &'static str {
        self.info.flavour
    }

    /// The host TSC rate used for conversions, kHz.
    pub fn host_tsc_khz(&self) -> u32 {
        self.info.host_tsc_khz
    }

    /// vCPU `vcpu`'s guest TSC rate as last read or set through this backend, without a vCPU
    /// ioctl (None: never read yet). For a VMM's status paths, which must not wait for a vCPU
    /// that sits in KVM_RUN: KVM holds the vCPU's mutex for the whole of KVM_RUN, so any vCPU
    /// ioctl from another thread waits until the guest exits.
    pub fn tsc_khz_seen(&self, vcpu: usize) -> Option<u32> {
        self.khz_seen
            .get(vcpu)
            .map(|k| k.load(Ordering::Relaxed))
            .filter(|&k| k != 0)
    }

    /// Run `f` on vCPU `vcpu`.
    fn on<R>(&self, vcpu: usize, f: impl FnOnce(&VcpuFd) -> Result<R>) -> Result<R> {
        self.vcpus
            .with_vcpu(vcpu, f)
            .unwrap_or(Err(BackendError::NoSuchVcpu {
                vcpu,
                count: self.vcpus.count(),
            }))
    }

    fn read_msr(v: &VcpuFd, index: u32) -> Result<u64> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|e| BackendError::InvalidArgument {
            op: "KVM_GET_MSRS",
            reason: format!("{e:?}"),
        })?;
        let n = v
            .get_msrs(&mut msrs)
            .map_err(|e| ioctl_err("KVM_GET_MSRS", e))?;
        match msrs.as_slice().first() {
            Some(e) if n == 1 => Ok(e.data),
            _ => Err(BackendError::Unsupported { op: "KVM_GET_MSRS" }),
        }
    }

    /// Guest TSC now via the MSR, with the host TSC bracket around the read.
    fn guest_tsc_bracketed(v: &VcpuFd) -> Result<(u64, u64, u64)> {
        let h0 = host::rdtsc();
        let t = Self::read_msr(v, MSR_IA32_TSC)?;
        let h1 = host::rdtsc();
        Ok((h0, t, h1))
    }

    fn ratio(&self, v: &VcpuFd, vcpu: usize) -> (u64, u8) {
        let seen = self
            .khz_seen
            .get(vcpu)
            .map_or(0, |k| k.load(Ordering::Relaxed));
        let khz = if seen != 0 {
            seen
        } else {
            let k = v.get_tsc_khz().unwrap_or(self.info.host_tsc_khz);
            self.note_khz(vcpu, k);
            k
        };
        let frac = self.info.caps.tsc_scaling_frac_bits;
        (
            math::effective_tsc_ratio(khz, self.info.host_tsc_khz, frac),
            frac,
        )
    }

    /// Did the guest TSC follow `offset`? Compare the MSR read-back with
    /// `[scale(h0) + offset, scale(h1) + offset]`.
    fn verify_offset(&self, v: &VcpuFd, vcpu: usize, offset: u64) -> Result<()> {
        let (ratio, frac) = self.ratio(v, vcpu);
        let (h0, t, h1) = Self::guest_tsc_bracketed(v)?;
        let lo = math::guest_tsc_ticks(h0, ratio, frac, offset);
        let hi = math::guest_tsc_ticks(h1, ratio, frac, offset);
        let within = t.wrapping_sub(lo)
            <= hi.wrapping_sub(lo).saturating_add(TSC_VERIFY_SLACK_TICKS)
            || lo.wrapping_sub(t) <= TSC_VERIFY_SLACK_TICKS;
        self.record(vcpu, within, t, lo);
        Ok(())
    }

    fn note_khz(&self, vcpu: usize, khz: u32) {
        if let Some(k) = self.khz_seen.get(vcpu) {
            k.store(khz, Ordering::Relaxed);
        }
    }

    fn record(&self, vcpu: usize, effective: bool, got: u64, wanted: u64) {
        let mut c = lock(&self.tsc_control);
        let new = if effective {
            TscControl::Effective
        } else {
            TscControl::Ignored
        };
        if *c != new {
            if new == TscControl::Ignored {
                warn!(
                    "{}: vCPU {vcpu} TSC write ignored (guest TSC {got}, asked for ~{wanted}): \
                     this hypervisor does not honour TSC offsets",
                    self.info.flavour
                );
            } else {
                debug!("vCPU {vcpu}: TSC write verified");
            }
            *c = new;
        }
    }

    /// `KVM_SET_MSRS(MSR_IA32_TSC)` on `v`, verified by reading it back.
    fn write_tsc_msr(&self, v: &VcpuFd, vcpu: usize, value_ticks: u64) -> Result<()> {
        let h_write = host::rdtsc();
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_TSC,
            data: value_ticks,
            ..Default::default()
        }])
        .map_err(|e| BackendError::InvalidArgument {
            op: "KVM_SET_MSRS",
            reason: format!("{e:?}"),
        })?;
        let n = v
            .set_msrs(&msrs)
            .map_err(|e| ioctl_err("KVM_SET_MSRS", e))?;
        if n != 1 {
            return Err(BackendError::Unsupported { op: "KVM_SET_MSRS" });
        }
        // The guest TSC should now be value + (time since the write).
        let (ratio, frac) = self.ratio(v, vcpu);
        let (_, t, h1) = Self::guest_tsc_bracketed(v)?;
        let elapsed = math::scale_tsc(h1.wrapping_sub(h_write), ratio, frac);
        let within = t.wrapping_sub(value_ticks) <= elapsed.saturating_add(TSC_VERIFY_SLACK_TICKS);
        self.record(vcpu, within, t, value_ticks);
        Ok(())
    }

    /// Actively probe whether TSC writes work: move vCPU 0's TSC by +1e9 ticks, read it back,
    /// put the original offset back. Run it on a paused VM before the guest depends on its TSC.
    pub fn probe_tsc_control(&self) -> Result<TscControl> {
        let attr = self.info.caps.tsc_offset_attr;
        // Beyond KVM's 1 s matching window, then back.
        let jump = 3 * u64::from(self.info.host_tsc_khz) * 1000;
        self.on(0, |v| {
            if attr {
                let orig = get_tsc_offset(v)?;
                let (ratio, frac) = self.ratio(v, 0);
                let (h0, before, _) = Self::guest_tsc_bracketed(v)?;
                let natural = math::guest_tsc_ticks(h0, ratio, frac, 0);
                let probe = before.wrapping_sub(natural).wrapping_add(1_000_000_000);
                set_tsc_offset(v, probe)?;
                self.verify_offset(v, 0, probe)?;
                set_tsc_offset(v, orig)
            } else {
                let (_, t, _) = Self::guest_tsc_bracketed(v)?;
                self.write_tsc_msr(v, 0, t.wrapping_add(jump))?;
                let (_, t2, _) = Self::guest_tsc_bracketed(v)?;
                self.write_tsc_msr(v, 0, t2.wrapping_sub(jump))
            }
        })?;
        Ok(self.tsc_control())
    }
}

impl<M: Borrow<VmFd> + Send + Sync, V: VcpuFds> Hypervisor for KvmBackend<M, V> {
    fn name(&self) -> &str {
        self.info.flavour
    }

    fn capabilities(&self) -> Capabilities {
        self.info.caps
    }

    fn vcpu_count(&self) -> usize {
        self.vcpus.count()
    }

    fn get_clock(&self) -> Result<ClockData> {
        let d = self
            .vm
            .borrow()
            .get_clock()
            .map_err(|e| ioctl_err("KVM_GET_CLOCK", e))?;
        Ok(ClockData {
            clock_ns: d.clock,
            flags: d.flags,
            realtime_ns: d.realtime,
            host_tsc_ticks: d.host_tsc,
        })
    }

    fn set_clock(&self, data: &ClockData) -> Result<()> {
        let d = kvm_clock_data {
            clock: data.clock_ns,
            flags: data.flags & KVM_CLOCK_REALTIME,
            realtime: data.realtime_ns,
            ..Default::default()
        };
        self.vm
            .borrow()
            .set_clock(&d)
            .map_err(|e| ioctl_err("KVM_SET_CLOCK", e))
    }

    fn tsc_khz(&self, vcpu: usize) -> Result<u32> {
        let khz = self.on(vcpu, |v| {
            v.get_tsc_khz().map_err(|e| ioctl_err("KVM_GET_TSC_KHZ", e))
        })?;
        self.note_khz(vcpu, khz);
        Ok(khz)
    }

    fn set_tsc_khz(&self, vcpu: usize, khz: u32) -> Result<()> {
        self.on(vcpu, |v| {
            v.set_tsc_khz(khz)
                .map_err(|e| ioctl_err("KVM_SET_TSC_KHZ", e))
        })?;
        self.note_khz(vcpu, khz);
        Ok(())
    }

    fn tsc_offset(&self, vcpu: usize) -> Result<u64> {
        if !self.info.caps.tsc_offset_attr {
            return Err(BackendError::Unsupported {
                op: "KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)",
            });
        }
        self.on(vcpu, get_tsc_offset)
    }

    fn set_tsc_offset(&self, vcpu: usize, offset_ticks: u64) -> Result<()> {
        if !self.info.caps.tsc_offset_attr {
            return Err(BackendError::Unsupported {
                op: "KVM_SET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)",
            });
        }
        self.on(vcpu, |v| {
            set_tsc_offset(v, offset_ticks)?;
            self.verify_offset(v, vcpu, offset_ticks)
        })
    }

    fn tsc_msr(&self, vcpu: usize) -> Result<u64> {
        self.on(vcpu, |v| Self::read_msr(v, MSR_IA32_TSC))
    }

    fn set_tsc_msr(&self, vcpu: usize, value_ticks: u64) -> Result<()> {
        self.on(vcpu, |v| self.write_tsc_msr(v, vcpu, value_ticks))
    }

    fn tsc_control(&self) -> TscControl {
        *lock(&self.tsc_control)
    }

    fn kvmclock_ctrl(&self, vcpu: usize) -> Result<()> {
        self.on(vcpu, |v| match v.kvmclock_ctrl() {
            Ok(()) => Ok(()),
            Err(e) if e.errno() == libc::EINVAL => Err(BackendError::KvmclockNotEnabled { vcpu }),
            Err(e) => Err(ioctl_err("KVM_KVMCLOCK_CTRL", e)),
        })
    }
}

impl<M: Send + Sync, V: Send + Sync> HostFacts for KvmBackend<M, V> {
    fn host_realtime_ns(&self) -> u64 {
        self.info.host.host_realtime_ns()
    }

    fn host_tsc_ticks(&self) -> u64 {
        self.info.host.host_tsc_ticks()
    }

    fn host_info(&self) -> Result<HostInfo> {
        self.info.host.host_info()
    }
}

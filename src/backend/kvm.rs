//! The real backend: kvm-ioctls on `/dev/kvm`.
//!
//! Thin wrappers, one per ioctl, every errno surfacing as [`BackendError::Ioctl`] with the ioctl's
//! name. kvm-ioctls 0.25 wraps `KVM_{HAS,GET,SET}_DEVICE_ATTR` on vCPU fds only for aarch64, so
//! the TSC-offset attribute ioctls are defined here with vmm-sys-util's ioctl macros.
//!
//! TSC writes are never trusted: after every offset or `MSR_IA32_TSC` write the backend reads
//! the guest TSC back through the MSR, bracketed by host TSC reads, and records
//! [`TscControl::Ignored`] when the guest TSC did not follow (kvm_pvm ignores such writes).

use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{kvm_clock_data, kvm_device_attr, kvm_msr_entry, Msrs, KVMIO};
use kvm_ioctls::{Cap, VcpuFd, VmFd};
use log::{debug, info, warn};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::ioctl_iow_nr;

use super::host;
use super::{
    BackendError, Capabilities, ClockBackend, ClockData, HostInfo, PvclockTimeInfo, Result,
    TscControl, KVM_CLOCK_REALTIME, MSR_IA32_TSC,
};
use crate::math;

ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);
ioctl_iow_nr!(KVM_HAS_DEVICE_ATTR, KVMIO, 0xe3, kvm_device_attr);

/// `KVM_VCPU_TSC_CTRL`: the vCPU attribute group of the TSC.
pub const KVM_VCPU_TSC_CTRL: u32 = 0;
/// `KVM_VCPU_TSC_OFFSET`: the L1 TSC offset attribute (u64).
pub const KVM_VCPU_TSC_OFFSET: u64 = 0;
/// `KVM_CAP_VCPU_ATTRIBUTES`.
pub const KVM_CAP_VCPU_ATTRIBUTES: u64 = 127;
/// `KVM_CAP_VM_TSC_CONTROL`.
pub const KVM_CAP_VM_TSC_CONTROL: u64 = 214;

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

/// A pvclock reader: the VMM knows where each vCPU's pvclock page lies in guest memory.
pub type PvclockReader = Box<dyn Fn(usize) -> Option<PvclockTimeInfo> + Send + Sync>;

/// The KVM backend of one VM.
pub struct KvmBackend {
    vm: Arc<VmFd>,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    caps: Capabilities,
    flavour: &'static str,
    host_tsc_khz: u32,
    tsc_control: Mutex<TscControl>,
    pvclock_reader: Option<PvclockReader>,
    /// Host identity, read once: machine-id and boot_id cannot change under a running process
    /// (a kexec ends it); the clocksource is re-read with the NTP state by `host_info`.
    identity: guest_clock_format::HostIdentity,
}

impl std::fmt::Debug for KvmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmBackend")
            .field("flavour", &self.flavour)
            .field("vcpus", &self.vcpus.len())
            .field("caps", &self.caps)
            .field("host_tsc_khz", &self.host_tsc_khz)
            .finish()
    }
}

/// `KVM_HAS_DEVICE_ATTR(KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET)` on a vCPU.
pub fn has_tsc_offset_attr(vcpu: &VcpuFd) -> bool {
    let attr = kvm_device_attr {
        group: KVM_VCPU_TSC_CTRL,
        attr: KVM_VCPU_TSC_OFFSET,
        addr: 0,
        flags: 0,
    };
    // SAFETY: KVM_HAS_DEVICE_ATTR reads a kvm_device_attr we own; addr is not dereferenced.
    let rc = unsafe { ioctl_with_ref(vcpu, KVM_HAS_DEVICE_ATTR(), &attr) };
    rc == 0
}

/// `KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET)`.
pub fn get_tsc_offset(vcpu: &VcpuFd) -> Result<u64> {
    let mut value: u64 = 0;
    let attr = kvm_device_attr {
        group: KVM_VCPU_TSC_CTRL,
        attr: KVM_VCPU_TSC_OFFSET,
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
pub fn set_tsc_offset(vcpu: &VcpuFd, offset: u64) -> Result<()> {
    let mut value = offset;
    let mut attr = kvm_device_attr {
        group: KVM_VCPU_TSC_CTRL,
        attr: KVM_VCPU_TSC_OFFSET,
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

impl KvmBackend {
    /// Wrap a VM and its vCPUs (the VMM locks each vCPU's mutex around `KVM_RUN`; the backend is
    /// called while the vCPUs are paused). Probes capabilities now; the host TSC rate comes from
    /// sysfs, else from vCPU 0's `KVM_GET_TSC_KHZ` (a fresh vCPU runs at the host's rate).
    pub fn new(vm: Arc<VmFd>, vcpus: Vec<Arc<Mutex<VcpuFd>>>) -> Result<Self> {
        let first = vcpus
            .first()
            .ok_or(BackendError::NoSuchVcpu { vcpu: 0, count: 0 })?;
        let adjust = vm.check_extension_int(Cap::AdjustClock);
        let tsc_control = vm.check_extension_int(Cap::TscControl) > 0;
        let vm_tsc_control = vm.check_extension_raw(KVM_CAP_VM_TSC_CONTROL) > 0;
        let attrs = vm.check_extension_raw(KVM_CAP_VCPU_ATTRIBUTES) > 0;
        let (has_attr, vcpu_khz) = {
            let v = lock(first);
            (
                attrs && has_tsc_offset_attr(&v),
                v.get_tsc_khz()
                    .map_err(|e| ioctl_err("KVM_GET_TSC_KHZ", e))?,
            )
        };
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
        info!("KVM backend ({flavour}): {caps:?}, host TSC {host_tsc_khz} kHz");
        let identity = host::read_host_info(host_tsc_khz)?.identity;
        Ok(KvmBackend {
            identity,
            vm,
            vcpus,
            caps,
            flavour,
            host_tsc_khz,
            tsc_control: Mutex::new(TscControl::Unknown),
            pvclock_reader: None,
        })
    }

    /// Let the backend read the guest's pvclock pages (the VMM owns guest memory).
    pub fn with_pvclock_reader(mut self, reader: PvclockReader) -> Self {
        self.pvclock_reader = Some(reader);
        self
    }

    /// `kvm_pvm`, `kvm_intel`, `kvm_amd` or `kvm`.
    pub fn flavour(&self) -> &'static str {
        self.flavour
    }

    /// The host TSC rate used for conversions, kHz.
    pub fn host_tsc_khz(&self) -> u32 {
        self.host_tsc_khz
    }

    fn vcpu(&self, vcpu: usize) -> Result<MutexGuard<'_, VcpuFd>> {
        self.vcpus
            .get(vcpu)
            .map(|v| lock(v))
            .ok_or(BackendError::NoSuchVcpu {
                vcpu,
                count: self.vcpus.len(),
            })
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
        if n != 1 {
            return Err(BackendError::Unsupported { op: "KVM_GET_MSRS" });
        }
        Ok(msrs.as_slice()[0].data)
    }

    /// Guest TSC now via the MSR, with the host TSC bracket around the read.
    fn guest_tsc_bracketed(v: &VcpuFd) -> Result<(u64, u64, u64)> {
        let h0 = host::rdtsc();
        let t = Self::read_msr(v, MSR_IA32_TSC)?;
        let h1 = host::rdtsc();
        Ok((h0, t, h1))
    }

    fn ratio(&self, v: &VcpuFd) -> (u64, u8) {
        let khz = v.get_tsc_khz().unwrap_or(self.host_tsc_khz);
        let frac = self.caps.tsc_scaling_frac_bits;
        (
            math::effective_tsc_ratio(khz, self.host_tsc_khz, frac),
            frac,
        )
    }

    /// Did the guest TSC follow `offset`? Compare the MSR read-back with
    /// `[scale(h0) + offset, scale(h1) + offset]`.
    fn verify_offset(&self, v: &VcpuFd, vcpu: usize, offset: u64) -> Result<()> {
        let (ratio, frac) = self.ratio(v);
        let (h0, t, h1) = Self::guest_tsc_bracketed(v)?;
        let lo = math::guest_tsc_ticks(h0, ratio, frac, offset);
        let hi = math::guest_tsc_ticks(h1, ratio, frac, offset);
        let within = t.wrapping_sub(lo)
            <= hi.wrapping_sub(lo).saturating_add(TSC_VERIFY_SLACK_TICKS)
            || lo.wrapping_sub(t) <= TSC_VERIFY_SLACK_TICKS;
        self.record(vcpu, within, t, lo);
        Ok(())
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
                    self.flavour
                );
            } else {
                debug!("vCPU {vcpu}: TSC write verified");
            }
            *c = new;
        }
    }

    /// Actively probe whether TSC writes work: move vCPU 0's TSC by +1e9 ticks, read it back,
    /// put the original offset back. Run it on a paused VM before the guest depends on its TSC.
    pub fn probe_tsc_control(&self) -> Result<TscControl> {
        let v = self.vcpu(0)?;
        if self.caps.tsc_offset_attr {
            let orig = get_tsc_offset(&v)?;
            let (ratio, frac) = self.ratio(&v);
            let (h0, before, _) = Self::guest_tsc_bracketed(&v)?;
            let natural = math::guest_tsc_ticks(h0, ratio, frac, 0);
            let probe = before.wrapping_sub(natural).wrapping_add(1_000_000_000);
            set_tsc_offset(&v, probe)?;
            self.verify_offset(&v, 0, probe)?;
            set_tsc_offset(&v, orig)?;
        } else {
            let (_, t, _) = Self::guest_tsc_bracketed(&v)?;
            drop(v);
            // Beyond KVM's 1 s matching window, then back.
            let khz = u64::from(self.host_tsc_khz);
            self.set_tsc_msr(0, t.wrapping_add(3 * khz * 1000))?;
            let v = self.vcpu(0)?;
            let (_, t2, _) = Self::guest_tsc_bracketed(&v)?;
            drop(v);
            self.set_tsc_msr(0, t2.wrapping_sub(3 * khz * 1000))?;
        }
        Ok(self.tsc_control())
    }
}

impl ClockBackend for KvmBackend {
    fn name(&self) -> &str {
        self.flavour
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    fn get_clock(&self) -> Result<ClockData> {
        let d = self
            .vm
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
            .set_clock(&d)
            .map_err(|e| ioctl_err("KVM_SET_CLOCK", e))
    }

    fn tsc_khz(&self, vcpu: usize) -> Result<u32> {
        self.vcpu(vcpu)?
            .get_tsc_khz()
            .map_err(|e| ioctl_err("KVM_GET_TSC_KHZ", e))
    }

    fn set_tsc_khz(&self, vcpu: usize, khz: u32) -> Result<()> {
        self.vcpu(vcpu)?
            .set_tsc_khz(khz)
            .map_err(|e| ioctl_err("KVM_SET_TSC_KHZ", e))
    }

    fn tsc_offset(&self, vcpu: usize) -> Result<u64> {
        if !self.caps.tsc_offset_attr {
            return Err(BackendError::Unsupported {
                op: "KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)",
            });
        }
        get_tsc_offset(&*self.vcpu(vcpu)?)
    }

    fn set_tsc_offset(&self, vcpu: usize, offset_ticks: u64) -> Result<()> {
        if !self.caps.tsc_offset_attr {
            return Err(BackendError::Unsupported {
                op: "KVM_SET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)",
            });
        }
        let v = self.vcpu(vcpu)?;
        set_tsc_offset(&v, offset_ticks)?;
        self.verify_offset(&v, vcpu, offset_ticks)
    }

    fn tsc_msr(&self, vcpu: usize) -> Result<u64> {
        Self::read_msr(&*self.vcpu(vcpu)?, MSR_IA32_TSC)
    }

    fn set_tsc_msr(&self, vcpu: usize, value_ticks: u64) -> Result<()> {
        let v = self.vcpu(vcpu)?;
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
        let (ratio, frac) = self.ratio(&v);
        let (_, t, h1) = Self::guest_tsc_bracketed(&v)?;
        let elapsed = math::scale_tsc(h1.wrapping_sub(h_write), ratio, frac);
        let lo = value_ticks;
        let within = t.wrapping_sub(lo) <= elapsed.saturating_add(TSC_VERIFY_SLACK_TICKS);
        self.record(vcpu, within, t, lo);
        Ok(())
    }

    fn tsc_control(&self) -> TscControl {
        *lock(&self.tsc_control)
    }

    fn kvmclock_ctrl(&self, vcpu: usize) -> Result<()> {
        match self.vcpu(vcpu)?.kvmclock_ctrl() {
            Ok(()) => Ok(()),
            Err(e) if e.errno() == libc::EINVAL => Err(BackendError::KvmclockNotEnabled { vcpu }),
            Err(e) => Err(ioctl_err("KVM_KVMCLOCK_CTRL", e)),
        }
    }

    fn pvclock(&self, vcpu: usize) -> Result<Option<PvclockTimeInfo>> {
        if vcpu >= self.vcpus.len() {
            return Err(BackendError::NoSuchVcpu {
                vcpu,
                count: self.vcpus.len(),
            });
        }
        Ok(self.pvclock_reader.as_ref().and_then(|r| r(vcpu)))
    }

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

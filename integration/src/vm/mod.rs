//! The VM clockvmm hosts: real KVM (guest memory, N real-mode vCPUs running `guest/clockloop.S`)
//! or, where /dev/kvm is unusable, the plugin's model backend driven by the real clock.
//!
//! Split by concern: [`guest`] (the guest program and its memory layout), [`observe`] (what the
//! guest observes and the error metrics over it), [`vcpu`] (the vCPU threads' loop), [`model`]
//! (the real-time model backend); this module builds, runs, pauses and saves the VM.

mod guest;
pub mod linux;
mod model;
mod observe;
mod vcpu;

pub use guest::*;
pub use model::RealTimeModel;
pub use observe::*;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use guest_clock::backend::kvm::{KvmBackend, KvmInfo, VcpuFds};
use guest_clock::backend::{
    BackendError, ClockBackend, HostFacts, Hypervisor, PvclockPages, PvclockTimeInfo,
};
use guest_clock::math;
use guest_clock::signal::{HostVmclockMemory, VmclockMemory};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use log::{info, warn};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use observe::read_pvclock;
use vcpu::{vcpu_loop, Shared};

/// How to build the VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmConfig {
    /// vCPUs (1..=256).
    pub vcpus: usize,
    /// Guest memory, MiB.
    pub memory_mib: usize,
    /// Use the model backend even where /dev/kvm works.
    pub force_model: bool,
    /// The VM's identity: 128 random bits given at its first boot (all zeros: none yet, the VMM
    /// assigns one), kept by every snapshot and migration, carried in the clock section.
    #[serde(default)]
    pub vm_id: [u8; 16],
    /// Boot this Linux kernel instead of the tiny guest (real KVM only; not on kvm_pvm).
    #[serde(default)]
    pub linux: Option<linux::LinuxConfig>,
}

/// A new random VM identity (UUID v4 bytes) from the kernel's random source.
pub fn new_vm_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // SAFETY: getrandom(2) writes at most `id.len()` bytes into the valid, writable `id`.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        // Never all zeros ("none"): fall back to time and pid, still unique enough here.
        let t = guest_clock::backend::host::realtime_ns() ^ u64::from(std::process::id()) << 40;
        id[..8].copy_from_slice(&t.to_le_bytes());
        id[8..].copy_from_slice(&guest_clock::backend::host::rdtsc().to_le_bytes());
    }
    id[6] = (id[6] & 0x0f) | 0x40; // version 4
    id[8] = (id[8] & 0x3f) | 0x80; // RFC 4122 variant
    id
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vcpus: 2,
            memory_mib: 2,
            force_model: false,
            vm_id: [0; 16],
            linux: None,
        }
    }
}

/// Which backend the VM runs on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Real KVM, with the module's flavour (kvm_pvm, kvm_intel, kvm_amd).
    Kvm {
        /// Module flavour.
        flavour: String,
    },
    /// The model backend.
    Model {
        /// Why not KVM.
        reason: String,
    },
}

/// A VM failure.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM call failed.
    #[error("{op}: {source}")]
    Kvm {
        /// The call.
        op: &'static str,
        /// The errno.
        source: std::io::Error,
    },
    /// A clock-backend call failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Guest memory failed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// Bad configuration or input.
    #[error("{0}")]
    Invalid(String),
}

/// `size` bytes of guest memory at GPA 0, registered with `vm` as slot 0. The caller keeps the
/// returned mapping alive as long as the VM (both engines store it beside the VM fd).
fn guest_memory(vm: &VmFd, size: usize) -> Result<GuestMemoryMmap, VmError> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])
        .map_err(|e| VmError::Memory(e.to_string()))?;
    let host_addr = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| VmError::Memory(e.to_string()))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: size as u64,
        userspace_addr: host_addr as u64,
        flags: 0,
    };
    // SAFETY: the region is backed by `mem`, which the caller keeps alive as long as the VM.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| kvm_err("KVM_SET_USER_MEMORY_REGION", e))?;
    Ok(mem)
}

fn kvm_err(op: &'static str, e: vmm_sys_util::errno::Error) -> VmError {
    VmError::Kvm {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The vmclock page in guest memory.
struct GuestVmclock(GuestMemoryMmap);

impl VmclockMemory for GuestVmclock {
    fn read_bytes(&self, offset: usize, buf: &mut [u8]) -> std::io::Result<()> {
        self.0
            .read_slice(buf, GuestAddress(VMCLOCK_GPA + offset as u64))
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
    fn write_bytes(&self, offset: usize, data: &[u8]) -> std::io::Result<()> {
        self.0
            .write_slice(data, GuestAddress(VMCLOCK_GPA + offset as u64))
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// clockvmm's vCPU fds: each behind its own mutex, which its vCPU thread holds around KVM_RUN.
/// The plugin's backend takes one for the duration of one ioctl (the vCPUs are paused then).
pub struct LockedVcpus(Vec<Arc<Mutex<VcpuFd>>>);

impl VcpuFds for LockedVcpus {
    fn count(&self) -> usize {
        self.0.len()
    }
    fn with_vcpu<R>(&self, index: usize, f: impl FnOnce(&VcpuFd) -> R) -> Option<R> {
        self.0.get(index).map(|v| f(&lock(v)))
    }
}

/// The plugin's KVM backend as clockvmm builds it.
pub type ClockvmmKvm = KvmBackend<Arc<VmFd>, LockedVcpus>;

enum Engine {
    Kvm {
        _vm: Arc<VmFd>,
        vcpus: Vec<Arc<Mutex<VcpuFd>>>,
        mem: GuestMemoryMmap,
        kvm: Arc<ClockvmmKvm>,
        /// The Linux guest's devices (None: the tiny guest).
        linux: Option<Arc<linux::LinuxDevices>>,
    },
    Model {
        model: Arc<RealTimeModel>,
        memory: Mutex<Vec<u8>>,
    },
}

/// A Linux guest's VM fd, vCPUs and devices, borrowed.
type LinuxMachine<'a> = (&'a VmFd, &'a [Arc<Mutex<VcpuFd>>], &'a linux::LinuxDevices);

/// A VM with running (or paused) vCPUs.
pub struct Vm {
    engine: Engine,
    kind: BackendKind,
    config: VmConfig,
    backend: Arc<dyn ClockBackend>,
    vmclock: Arc<dyn VmclockMemory>,
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    started: AtomicBool,
}

impl Vm {
    /// Create the VM (memory, vCPUs, guest code, pvclock, vmclock page) without running it.
    pub fn create(cfg: &VmConfig) -> Result<Vm, VmError> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(VmError::Invalid(format!(
                "{} vCPUs requested (1..={MAX_VCPUS})",
                cfg.vcpus
            )));
        }
        if !(1..=1024).contains(&cfg.memory_mib) {
            return Err(VmError::Invalid(format!(
                "{} MiB of memory requested (1..=1024)",
                cfg.memory_mib
            )));
        }
        let shared = Arc::new(Shared {
            pause_requested: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            parked: Mutex::new(0),
            cv: Condvar::new(),
            obs: Mutex::new(vec![None; cfg.vcpus]),
            tids: Mutex::new(Vec::new()),
        });
        if let Some(lc) = &cfg.linux {
            return Self::create_linux(cfg, lc, shared);
        }
        let kvm_reason = if cfg.force_model {
            Err("--model requested".to_string())
        } else {
            Self::create_kvm(cfg)
        };
        match kvm_reason {
            Ok((engine, kvm)) => {
                let Engine::Kvm { mem, .. } = &engine else {
                    unreachable!("create_kvm returns a KVM engine")
                };
                let vmclock: Arc<dyn VmclockMemory> = Arc::new(GuestVmclock(mem.clone()));
                let flavour = kvm.flavour().to_string();
                info!("VM on real KVM ({flavour}), {} vCPUs", cfg.vcpus);
                Ok(Vm {
                    engine,
                    kind: BackendKind::Kvm { flavour },
                    config: cfg.clone(),
                    backend: kvm,
                    vmclock,
                    shared,
                    threads: Mutex::new(Vec::new()),
                    started: AtomicBool::new(false),
                })
            }
            Err(reason) => {
                warn!("using the model backend: {reason}");
                let model = Arc::new(RealTimeModel::new(cfg.vcpus));
                Ok(Vm {
                    engine: Engine::Model {
                        model: model.clone(),
                        memory: Mutex::new(vec![0; cfg.memory_mib << 20]),
                    },
                    kind: BackendKind::Model { reason },
                    config: cfg.clone(),
                    backend: model,
                    vmclock: Arc::new(HostVmclockMemory::new()),
                    shared,
                    threads: Mutex::new(Vec::new()),
                    started: AtomicBool::new(false),
                })
            }
        }
    }

    fn create_linux(
        cfg: &VmConfig,
        lc: &linux::LinuxConfig,
        shared: Arc<Shared>,
    ) -> Result<Vm, VmError> {
        if cfg.force_model {
            return Err(VmError::Invalid(
                "a Linux guest needs real KVM: --model does not run one".into(),
            ));
        }
        linux::install_kick_handler()?;
        let parts = linux::create(cfg, lc)?;
        let first = parts
            .vcpus
            .first()
            .ok_or_else(|| VmError::Invalid("no vCPUs".into()))?;
        let kvm_info = KvmInfo::probe(&parts.vm, &lock(first))?;
        let backend = Arc::new(KvmBackend::with_info(
            parts.vm.clone(),
            LockedVcpus(parts.vcpus.clone()),
            kvm_info,
        ));
        let flavour = backend.flavour().to_string();
        let vmclock: Arc<dyn VmclockMemory> = Arc::new(GuestVmclock(parts.mem.clone()));
        info!("Linux VM on real KVM ({flavour}), {} vCPUs", cfg.vcpus);
        Ok(Vm {
            engine: Engine::Kvm {
                _vm: parts.vm,
                vcpus: parts.vcpus,
                mem: parts.mem,
                kvm: backend.clone(),
                linux: Some(parts.devices),
            },
            kind: BackendKind::Kvm { flavour },
            config: cfg.clone(),
            backend,
            vmclock,
            shared,
            threads: Mutex::new(Vec::new()),
            started: AtomicBool::new(false),
        })
    }

    /// The Linux guest's devices (console, probe samples), if this VM runs Linux.
    pub fn linux(&self) -> Option<&Arc<linux::LinuxDevices>> {
        match &self.engine {
            Engine::Kvm { linux, .. } => linux.as_ref(),
            Engine::Model { .. } => None,
        }
    }

    fn create_kvm(cfg: &VmConfig) -> Result<(Engine, Arc<ClockvmmKvm>), String> {
        let kvm = Kvm::new().map_err(|e| format!("no usable /dev/kvm ({e})"))?;
        let vm = kvm
            .create_vm()
            .map_err(|e| format!("KVM_CREATE_VM failed ({e})"))?;
        let mem = guest_memory(&vm, cfg.memory_mib << 20).map_err(|e| e.to_string())?;
        mem.write_slice(&GUEST_CODE, GuestAddress(CODE_GPA))
            .map_err(|e| format!("guest memory: {e}"))?;
        let mut vcpus = Vec::with_capacity(cfg.vcpus);
        for id in 0..cfg.vcpus {
            let v = vm
                .create_vcpu(id as u64)
                .map_err(|e| format!("KVM_CREATE_VCPU {id}: {e}"))?;
            guest::setup_vcpu(&v, id).map_err(|e| format!("vCPU {id} setup: {e}"))?;
            vcpus.push(Arc::new(Mutex::new(v)));
        }
        let vm = Arc::new(vm);
        let first = vcpus.first().ok_or("no vCPUs")?;
        let info = KvmInfo::probe(&vm, &lock(first)).map_err(|e| format!("KVM backend: {e}"))?;
        let backend = Arc::new(KvmBackend::with_info(
            vm.clone(),
            LockedVcpus(vcpus.clone()),
            info,
        ));
        Ok((
            Engine::Kvm {
                _vm: vm,
                vcpus,
                mem,
                kvm: backend.clone(),
                linux: None,
            },
            backend,
        ))
    }

    /// Take a (host TSC, host realtime) reference: one KVM_GET_CLOCK with REALTIME|HOST_TSC
    /// (else the host's own TSC and realtime read back to back).
    fn linux_reference(&self, kvm: &ClockvmmKvm, dev: &linux::LinuxDevices) {
        const BOTH: u32 = 4 | 8; // KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC
        let r = match kvm.get_clock() {
            Ok(c) if c.flags & BOTH == BOTH => linux::measure::HostRef {
                host_tsc: c.host_tsc_ticks,
                realtime_ns: c.realtime_ns,
            },
            _ => linux::measure::HostRef {
                host_tsc: guest_clock::backend::host::rdtsc(),
                realtime_ns: guest_clock::backend::host::realtime_ns(),
            },
        };
        dev.add_ref(r);
    }

    /// Read every vCPU's TSC offset into the Linux devices (vCPUs parked or not started).
    fn linux_read_offsets(&self) {
        if let Engine::Kvm {
            linux: Some(dev),
            kvm,
            ..
        } = &self.engine
        {
            let offsets: Vec<u64> = (0..self.config.vcpus)
                .map(|i| kvm.tsc_offset(i).unwrap_or(0))
                .collect();
            *lock(&dev.offsets) = offsets;
            self.linux_reference(kvm, dev);
        }
    }

    /// `f` over a Linux guest's devices and the host TSC rate, after taking a fresh host
    /// reference (so that the latest readings map between two references); None: no Linux
    /// guest.
    fn with_linux_mapped<T>(&self, f: impl FnOnce(&linux::LinuxDevices, u32) -> T) -> Option<T> {
        match &self.engine {
            Engine::Kvm {
                linux: Some(dev),
                kvm,
                ..
            } => {
                self.linux_reference(kvm, dev);
                Some(f(dev, kvm.host_tsc_khz()))
            }
            _ => None,
        }
    }

    /// Every probe sample of a Linux guest still in its console log, mapped to host time.
    pub fn linux_samples(&self) -> Vec<linux::measure::LinuxSample> {
        self.with_linux_mapped(|dev, khz| dev.samples(khz))
            .unwrap_or_default()
    }

    /// A Linux guest's VM, vCPUs and devices (None: the tiny guest or the model).
    fn linux_machine(&self) -> Option<LinuxMachine<'_>> {
        match &self.engine {
            Engine::Kvm {
                _vm: vm,
                vcpus,
                linux: Some(dev),
                ..
            } => Some((vm, vcpus, dev)),
            _ => None,
        }
    }

    /// The machine state beyond memory and clocks, as CH-shaped snapshot children (a Linux
    /// guest: `cpu-manager/<n>`, `device-manager/<device>`; the tiny guest has none, its VMM
    /// restarts its loop). The vCPUs must be paused.
    pub fn save_machine(&self) -> Result<Vec<(String, vm_migration::Snapshot)>, VmError> {
        let Some((vm, vcpus, dev)) = self.linux_machine() else {
            return Ok(Vec::new());
        };
        if self.started.load(Ordering::SeqCst) && !self.is_paused() {
            return Err(VmError::Invalid(
                "the machine state is saved with the vCPUs paused".into(),
            ));
        }
        let mut states = Vec::with_capacity(vcpus.len());
        for v in vcpus {
            states.push(linux::state::capture_vcpu(&lock(v), &dev.msr_indices)?);
        }
        let (irqchips, pit) = linux::state::capture_chips(vm)?;
        let m = linux::state::MachineState {
            vcpus: states,
            irqchips,
            pit,
            serial: dev.serial_state(),
        };
        m.to_snapshots()
    }

    /// Restore what [`Vm::save_machine`] saved into this (created, not started) VM, up to the
    /// plugin: everything but the late MSRs, which [`Vm::start`] writes after the plugin's
    /// clock restore (see [`linux::state`] for the contract).
    pub fn restore_machine(&self, m: &linux::state::MachineState) -> Result<(), VmError> {
        let Some((vm, vcpus, dev)) = self.linux_machine() else {
            return Ok(());
        };
        if self.started.load(Ordering::SeqCst) {
            return Err(VmError::Invalid(
                "machine state restores into a VM that has not run".into(),
            ));
        }
        if m.vcpus.len() != vcpus.len() {
            return Err(VmError::Invalid(format!(
                "snapshot has {} vCPUs, the VM {}",
                m.vcpus.len(),
                vcpus.len()
            )));
        }
        linux::state::restore_chips(vm, &m.irqchips, &m.pit)?;
        let mut late = Vec::with_capacity(vcpus.len());
        for (n, (v, s)) in vcpus.iter().zip(&m.vcpus).enumerate() {
            late.push(linux::state::restore_vcpu_early(&lock(v), s, n)?);
        }
        dev.restore_serial(&m.serial)?;
        *lock(&dev.late_msrs) = late;
        info!(
            "machine state restored: {} vCPUs, irqchip, PIT, COM1",
            vcpus.len()
        );
        Ok(())
    }

    /// Write the late MSRs of a machine restore (after the plugin restored the clocks).
    fn write_late_msrs(&self) -> Result<(), VmError> {
        let Some((_, vcpus, dev)) = self.linux_machine() else {
            return Ok(());
        };
        let late = std::mem::take(&mut *lock(&dev.late_msrs));
        for (v, msrs) in vcpus.iter().zip(&late) {
            linux::state::write_msrs(&lock(v), msrs)?;
        }
        Ok(())
    }

    /// The guest TSC rate of vCPU 0, kHz, for status answers: never a vCPU ioctl on a running
    /// VM (a Linux vCPU idles inside KVM_RUN, which holds the vCPU; an ioctl from the API
    /// thread — or this VMM's per-vCPU mutex — would wait for its next exit, and the vCPU
    /// thread, relocking at once, can starve it indefinitely).
    pub fn guest_tsc_khz(&self) -> u32 {
        match &self.engine {
            Engine::Kvm { kvm, .. } => kvm.tsc_khz_seen(0).unwrap_or(kvm.host_tsc_khz()),
            Engine::Model { .. } => self.backend.tsc_khz(0).unwrap_or(0),
        }
    }

    /// The backend kind.
    pub fn backend_kind(&self) -> &BackendKind {
        &self.kind
    }

    /// One line: "real KVM (kvm_pvm), 2 vCPUs" or "MODEL backend (reason), 2 vCPUs".
    pub fn describe(&self) -> String {
        match &self.kind {
            BackendKind::Kvm { flavour } => {
                format!("real KVM ({flavour}), {} vCPUs", self.config.vcpus)
            }
            BackendKind::Model { reason } => {
                format!("MODEL backend ({reason}), {} vCPUs", self.config.vcpus)
            }
        }
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.config.vcpus
    }

    /// The plugin's view of this VM.
    pub fn clock_backend(&self) -> Arc<dyn ClockBackend> {
        self.backend.clone()
    }

    /// The pvclock page the guest reads on `vcpu` (measurement: not part of the plugin's seam).
    pub fn pvclock(&self, vcpu: usize) -> Result<Option<PvclockTimeInfo>, BackendError> {
        match &self.engine {
            Engine::Kvm { mem, .. } => Ok(read_pvclock(mem, vcpu)),
            Engine::Model { model, .. } => model.pvclock(vcpu),
        }
    }

    /// The vmclock page.
    pub fn vmclock_memory(&self) -> Arc<dyn VmclockMemory> {
        self.vmclock.clone()
    }

    /// Start the vCPU threads (KVM) — the model computes samples on demand. After a machine
    /// restore this first writes the late MSRs (TSC deadline, kvmclock wall clock): call it
    /// after the plugin's `ClockManager::restore`.
    pub fn start(&self) -> Result<(), VmError> {
        if self.started.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.write_late_msrs()?;
        if self.started.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let Engine::Kvm {
            vcpus,
            mem,
            kvm,
            linux,
            ..
        } = &self.engine
        else {
            return Ok(());
        };
        self.linux_read_offsets();
        let mut threads = lock(&self.threads);
        for (id, v) in vcpus.iter().enumerate() {
            let v = v.clone();
            let mem = mem.clone();
            let shared = self.shared.clone();
            let kvm = kvm.clone();
            let linux = linux.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || match linux {
                    Some(dev) => linux::vcpu_loop(id, v, shared, dev),
                    None => vcpu_loop(id, v, mem, shared, kvm),
                })
                .map_err(|e| VmError::Invalid(format!("spawning vCPU thread: {e}")))?;
            threads.push(t);
        }
        if let Some(dev) = linux.clone() {
            let shared = self.shared.clone();
            let t = std::thread::Builder::new()
                .name("com1-irq".into())
                .spawn(move || {
                    while !shared.stop.load(Ordering::SeqCst) {
                        std::thread::sleep(linux::serial::IRQ_WATCH_PERIOD);
                        dev.watch_irq(&shared.pause_requested);
                    }
                })
                .map_err(|e| VmError::Invalid(format!("spawning the COM1 thread: {e}")))?;
            threads.push(t);
        }
        Ok(())
    }

    /// Park every vCPU outside KVM_RUN and wait until they all are.
    pub fn pause(&self) -> Result<(), VmError> {
        self.shared.pause_requested.store(true, Ordering::SeqCst);
        if !self.started.load(Ordering::SeqCst) || matches!(self.engine, Engine::Model { .. }) {
            return Ok(());
        }
        let n = self.config.vcpus;
        let is_linux = self.linux().is_some();
        if let Some(dev) = self.linux() {
            // The COM1 watch reads the pause request under this lock: past it, it raises
            // nothing more until the resume.
            drop(lock(&dev.uart));
        }
        // A Linux vCPU idles inside KVM_RUN: kick it out, again until it parked (a kick that
        // lands just before KVM_RUN is lost).
        let step = if is_linux {
            Duration::from_millis(5)
        } else {
            Duration::from_secs(5)
        };
        let deadline =
            std::time::Instant::now() + Duration::from_secs(if is_linux { 30 } else { 5 });
        let mut parked = lock(&self.shared.parked);
        while *parked < n {
            if is_linux {
                if self.shared.stop.load(Ordering::SeqCst) {
                    // The guest stopped: its threads are gone, nothing runs.
                    return Ok(());
                }
                self.shared.kick_all();
            }
            let (p, _) = self
                .shared
                .cv
                .wait_timeout(parked, step)
                .unwrap_or_else(|e| e.into_inner());
            parked = p;
            if *parked < n && std::time::Instant::now() >= deadline {
                return Err(VmError::Invalid(format!(
                    "only {}/{n} vCPUs parked after {} s",
                    *parked,
                    if is_linux { 30 } else { 5 }
                )));
            }
        }
        drop(parked);
        self.linux_read_offsets();
        Ok(())
    }

    /// Release the vCPUs.
    pub fn resume(&self) -> Result<(), VmError> {
        self.shared.pause_requested.store(false, Ordering::SeqCst);
        self.shared.wake_all();
        Ok(())
    }

    /// Whether the vCPUs run: started, not paused, not stopped (a Linux guest that shut down).
    pub fn is_running(&self) -> bool {
        self.started.load(Ordering::SeqCst)
            && !self.shared.pause_requested.load(Ordering::SeqCst)
            && !self.shared.stop.load(Ordering::SeqCst)
    }

    /// Whether a pause is in force.
    /// Every PHC reading of a Linux guest still in its console log, mapped to host time.
    pub fn linux_phc_samples(&self) -> Vec<linux::measure::LinuxPhcSample> {
        self.with_linux_mapped(|dev, khz| dev.phc_samples(khz))
            .unwrap_or_default()
    }

    pub fn is_paused(&self) -> bool {
        self.shared.pause_requested.load(Ordering::SeqCst)
    }

    /// The latest sample of every vCPU.
    pub fn observe(&self) -> Result<GuestObservation, VmError> {
        if let Some(o) = self.with_linux_mapped(|dev, khz| dev.observe(khz)) {
            return Ok(GuestObservation {
                vcpus: Vec::new(),
                linux: Some(o),
            });
        }
        match &self.engine {
            Engine::Kvm { .. } => Ok(GuestObservation {
                vcpus: lock(&self.shared.obs).iter().flatten().copied().collect(),
                linux: None,
            }),
            Engine::Model { model, .. } => {
                let vm = model.sync();
                let mut out = Vec::new();
                for n in 0..self.config.vcpus {
                    let tsc = vm.guest_tsc_now(n)?;
                    let pv = vm.pvclock(n)?;
                    if let Some(p) = pv {
                        out.push(VcpuObservation {
                            vcpu: n,
                            guest_tsc_ticks: tsc,
                            guest_kvmclock_ns: math::pvclock_read_ns(&p, tsc),
                            host_realtime_ns: vm.host_realtime_ns(),
                            pvclock_flags: p.flags,
                            tsc_to_system_mul: p.tsc_to_system_mul,
                            tsc_shift: p.tsc_shift,
                            samples: 0,
                        });
                    }
                }
                if !self.is_paused() {
                    vm.run_all();
                }
                Ok(GuestObservation {
                    vcpus: out,
                    linux: None,
                })
            }
        }
    }

    /// Guest memory size, bytes.
    pub fn memory_size(&self) -> u64 {
        (self.config.memory_mib as u64) << 20
    }

    /// Write guest memory out.
    pub fn save_memory(&self, w: &mut dyn std::io::Write) -> Result<(), VmError> {
        match &self.engine {
            Engine::Kvm { mem, .. } => {
                let mut buf = vec![0u8; self.memory_size() as usize];
                mem.read_slice(&mut buf, GuestAddress(0))
                    .map_err(|e| VmError::Memory(e.to_string()))?;
                w.write_all(&buf)
                    .map_err(|e| VmError::Memory(e.to_string()))
            }
            Engine::Model { memory, .. } => w
                .write_all(&lock(memory))
                .map_err(|e| VmError::Memory(e.to_string())),
        }
    }

    /// Read guest memory in (exactly `memory_size()` bytes).
    pub fn load_memory(&self, r: &mut dyn std::io::Read) -> Result<(), VmError> {
        let mut buf = vec![0u8; self.memory_size() as usize];
        r.read_exact(&mut buf)
            .map_err(|e| VmError::Memory(format!("reading {} bytes: {e}", buf.len())))?;
        match &self.engine {
            Engine::Kvm { mem, linux, .. } => {
                mem.write_slice(&buf, GuestAddress(0))
                    .map_err(|e| VmError::Memory(e.to_string()))?;
                if linux.is_some() {
                    return Ok(());
                }
                // The code is this VMM's, not the sender's.
                mem.write_slice(&GUEST_CODE, GuestAddress(CODE_GPA))
                    .map_err(|e| VmError::Memory(e.to_string()))
            }
            Engine::Model { memory, .. } => {
                *lock(memory) = buf;
                Ok(())
            }
        }
    }

    /// Stop the vCPU threads.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.pause_requested.store(false, Ordering::SeqCst);
        self.shared.wake_all();
        if self.linux().is_some() {
            // A kick can land just before KVM_RUN and be lost: kick until every thread ended.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while lock(&self.threads).iter().any(|t| !t.is_finished())
                && std::time::Instant::now() < deadline
            {
                self.shared.kick_all();
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_vm_samples_pauses_and_resumes() {
        let vm = Vm::create(&VmConfig {
            vcpus: 2,
            ..Default::default()
        })
        .unwrap();
        if let BackendKind::Model { reason } = vm.backend_kind() {
            eprintln!("SKIP: {reason}");
            return;
        }
        vm.start().unwrap();
        // Conditions, not sleeps: a nested TCG machine is ~10x slower.
        let until = |what: &str, f: &dyn Fn(&GuestObservation) -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            loop {
                let o = vm.observe().unwrap();
                if f(&o) {
                    return o;
                }
                assert!(std::time::Instant::now() < deadline, "{what}: {o:?}");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let o1 = until("both vCPUs sampled", &|o| {
            o.vcpus.len() == 2 && o.vcpus.iter().all(|v| v.samples > 0)
        });
        let k = vm.clock_backend().get_clock().unwrap().clock_ns;
        for o in &o1.vcpus {
            assert!(
                o.guest_kvmclock_ns.abs_diff(k) < 50_000_000,
                "guest {} vs {k}",
                o.guest_kvmclock_ns
            );
        }
        vm.pause().unwrap();
        let p1 = vm.observe().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(vm.observe().unwrap(), p1, "paused: no new samples");
        vm.resume().unwrap();
        until("sampling again after resume", &|o| {
            o.vcpus[0].samples > p1.vcpus[0].samples
        });
        vm.shutdown();
    }

    #[test]
    fn sixty_four_vcpus() {
        let vm = Vm::create(&VmConfig {
            vcpus: 64,
            ..Default::default()
        })
        .unwrap();
        vm.start().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        vm.pause().unwrap();
        if matches!(vm.backend_kind(), BackendKind::Kvm { .. }) {
            assert_eq!(vm.observe().unwrap().vcpus.len(), 64);
        }
        vm.resume().unwrap();
        vm.shutdown();
    }

    #[test]
    fn model_fallback_and_memory_round_trip() {
        let vm = Vm::create(&VmConfig {
            vcpus: 2,
            memory_mib: 1,
            force_model: true,
            ..Default::default()
        })
        .unwrap();
        assert!(vm.describe().starts_with("MODEL"));
        let o = vm.observe().unwrap();
        assert_eq!(o.vcpus.len(), 2);
        let mut buf = Vec::new();
        vm.save_memory(&mut buf).unwrap();
        assert_eq!(buf.len() as u64, vm.memory_size());
        vm.load_memory(&mut buf.as_slice()).unwrap();
        assert!(vm.load_memory(&mut &buf[..10]).is_err());
    }
}

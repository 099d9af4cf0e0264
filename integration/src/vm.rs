//! The VM clockvmm hosts: real KVM (guest memory, N real-mode vCPUs running `guest/clockloop.S`)
//! or, where /dev/kvm is unusable, the plugin's model backend driven by the real clock.
//!
//! Each vCPU loops: RDTSC → store in its sample slot → OUT (exit). After every exit its thread
//! reads the sample and the vCPU's pvclock page and computes the guest's kvmclock exactly as a
//! guest does (`pvclock_read_ns`): the *guest-observed* clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use guest_clock::backend::kvm::{KvmBackend, KvmInfo, VcpuFds};
use guest_clock::backend::model::{HostConfig, ModelHost, ModelTime, ModelVm};
use guest_clock::backend::{
    host, BackendError, Capabilities, ClockBackend, ClockData, HostFacts, HostInfo, Hypervisor,
    PvclockPages, PvclockTimeInfo, TscControl,
};
use guest_clock::math;
use guest_clock::signal::{HostVmclockMemory, VmclockMemory};
use kvm_bindings::{kvm_msr_entry, kvm_userspace_memory_region, Msrs};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

/// Guest code, assembled from `guest/clockloop.S` (the listing gives each instruction's bytes).
pub const GUEST_CODE: [u8; 31] = [
    0x66, 0xb9, 0x01, 0x4d, 0x56, 0x4b, // mov ecx, 0x4b564d01
    0x66, 0x89, 0xf0, // mov eax, esi
    0x66, 0x31, 0xd2, // xor edx, edx
    0x0f, 0x30, // wrmsr
    0x0f, 0x31, // sample: rdtsc
    0x66, 0x89, 0x07, // mov [bx], eax
    0x66, 0x89, 0x57, 0x04, // mov [bx+4], edx
    0x66, 0xff, 0x47, 0x08, // inc dword [bx+8]
    0xe6, 0x10, // out 0x10, al
    0xeb, 0xef, // jmp sample
];
/// Where the guest code lives.
pub const CODE_GPA: u64 = 0x1000;
/// Sample slots: 16 bytes per vCPU.
pub const SLOTS_GPA: u64 = 0x8000;
/// pvclock areas: 32 bytes per vCPU.
pub const PVCLOCK_GPA: u64 = 0x10000;
/// The vmclock page.
pub const VMCLOCK_GPA: u64 = 0x20000;
/// The I/O port the guest exits on.
pub const EXIT_PORT: u16 = 0x10;
/// `MSR_KVM_SYSTEM_TIME_NEW`.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// The most vCPUs (slots and pvclock areas must stay below the vmclock page).
pub const MAX_VCPUS: usize = 256;

/// How to build the VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmConfig {
    /// vCPUs (1..=256).
    pub vcpus: usize,
    /// Guest memory, MiB.
    pub memory_mib: usize,
    /// Use the model backend even where /dev/kvm works.
    pub force_model: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vcpus: 2,
            memory_mib: 2,
            force_model: false,
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

fn kvm_err(op: &'static str, e: vmm_sys_util::errno::Error) -> VmError {
    VmError::Kvm {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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

fn decode_pvclock(b: &[u8; 32]) -> PvclockTimeInfo {
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
fn read_pvclock(mem: &GuestMemoryMmap, vcpu: usize) -> Option<PvclockTimeInfo> {
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

/// The model backend with its time following the real CLOCK_REALTIME, so that several
/// processes on one machine see one consistent model host (same TSC, same wallclock).
pub struct RealTimeModel {
    vm: ModelVm,
}

impl RealTimeModel {
    fn new(vcpus: usize) -> Self {
        let time = ModelTime::new();
        time.advance_to_ns(host::realtime_ns());
        let mut cfg = HostConfig::new(2_000_000, 0x006d_6f64_656c);
        cfg.realtime_epoch_ns = 0;
        cfg.identity.machine_id_hash = host::read_host_info(0)
            .map(|h| h.identity.machine_id_hash)
            .unwrap_or(1);
        let h = ModelHost::new(time, cfg);
        let vm = ModelVm::new(h, vcpus);
        for n in 0..vcpus {
            let _ = vm.guest_enable_kvmclock(n);
        }
        RealTimeModel { vm }
    }
    fn sync(&self) -> &ModelVm {
        self.vm.host().time().advance_to_ns(host::realtime_ns());
        &self.vm
    }
}

impl Hypervisor for RealTimeModel {
    fn name(&self) -> &str {
        "model"
    }
    fn capabilities(&self) -> Capabilities {
        self.vm.capabilities()
    }
    fn vcpu_count(&self) -> usize {
        self.vm.vcpu_count()
    }
    fn get_clock(&self) -> Result<ClockData, BackendError> {
        self.sync().get_clock()
    }
    fn set_clock(&self, d: &ClockData) -> Result<(), BackendError> {
        self.sync().set_clock(d)
    }
    fn tsc_khz(&self, v: usize) -> Result<u32, BackendError> {
        self.vm.tsc_khz(v)
    }
    fn set_tsc_khz(&self, v: usize, khz: u32) -> Result<(), BackendError> {
        self.sync().set_tsc_khz(v, khz)
    }
    fn tsc_offset(&self, v: usize) -> Result<u64, BackendError> {
        self.vm.tsc_offset(v)
    }
    fn set_tsc_offset(&self, v: usize, o: u64) -> Result<(), BackendError> {
        self.sync().set_tsc_offset(v, o)
    }
    fn tsc_msr(&self, v: usize) -> Result<u64, BackendError> {
        self.sync().tsc_msr(v)
    }
    fn set_tsc_msr(&self, v: usize, t: u64) -> Result<(), BackendError> {
        self.sync().set_tsc_msr(v, t)
    }
    fn tsc_control(&self) -> TscControl {
        self.vm.tsc_control()
    }
    fn kvmclock_ctrl(&self, v: usize) -> Result<(), BackendError> {
        self.vm.kvmclock_ctrl(v)
    }
}

impl PvclockPages for RealTimeModel {
    fn pvclock(&self, v: usize) -> Result<Option<PvclockTimeInfo>, BackendError> {
        self.sync().pvclock(v)
    }
}

impl HostFacts for RealTimeModel {
    fn host_realtime_ns(&self) -> u64 {
        self.sync().host_realtime_ns()
    }
    fn host_tsc_ticks(&self) -> u64 {
        self.sync().host_tsc_ticks()
    }
    fn host_info(&self) -> Result<HostInfo, BackendError> {
        self.vm.host_info()
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

struct Shared {
    pause_requested: AtomicBool,
    stop: AtomicBool,
    parked: Mutex<usize>,
    cv: Condvar,
    obs: Mutex<Vec<Option<VcpuObservation>>>,
}

enum Engine {
    Kvm {
        _vm: Arc<VmFd>,
        vcpus: Vec<Arc<Mutex<VcpuFd>>>,
        mem: GuestMemoryMmap,
        kvm: Arc<ClockvmmKvm>,
    },
    Model {
        model: Arc<RealTimeModel>,
        memory: Mutex<Vec<u8>>,
    },
}

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
        });
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

    fn create_kvm(cfg: &VmConfig) -> Result<(Engine, Arc<ClockvmmKvm>), String> {
        let kvm = Kvm::new().map_err(|e| format!("no usable /dev/kvm ({e})"))?;
        let vm = kvm
            .create_vm()
            .map_err(|e| format!("KVM_CREATE_VM failed ({e})"))?;
        let size = cfg.memory_mib << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])
            .map_err(|e| format!("guest memory: {e}"))?;
        let host_addr = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| format!("guest memory: {e}"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: size as u64,
            userspace_addr: host_addr as u64,
            flags: 0,
        };
        // SAFETY: the region is backed by `mem`, which the Engine keeps alive as long as the VM.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
        mem.write_slice(&GUEST_CODE, GuestAddress(CODE_GPA))
            .map_err(|e| format!("guest memory: {e}"))?;
        let mut vcpus = Vec::with_capacity(cfg.vcpus);
        for id in 0..cfg.vcpus {
            let v = vm
                .create_vcpu(id as u64)
                .map_err(|e| format!("KVM_CREATE_VCPU {id}: {e}"))?;
            Self::setup_vcpu(&v, id).map_err(|e| format!("vCPU {id} setup: {e}"))?;
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
            },
            backend,
        ))
    }

    fn setup_vcpu(v: &VcpuFd, id: usize) -> Result<(), VmError> {
        let mut sregs = v.get_sregs().map_err(|e| kvm_err("KVM_GET_SREGS", e))?;
        for seg in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
            seg.base = 0;
            seg.selector = 0;
        }
        v.set_sregs(&sregs)
            .map_err(|e| kvm_err("KVM_SET_SREGS", e))?;
        let mut regs = v.get_regs().map_err(|e| kvm_err("KVM_GET_REGS", e))?;
        let pvclock = PVCLOCK_GPA + 32 * id as u64;
        regs.rip = CODE_GPA;
        regs.rflags = 2;
        regs.rsi = pvclock | 1;
        regs.rbx = SLOTS_GPA + 16 * id as u64;
        v.set_regs(&regs).map_err(|e| kvm_err("KVM_SET_REGS", e))?;
        // Like restored vCPU state, the kvmclock MSR is set by the host too, so that
        // KVM_KVMCLOCK_CTRL works before the vCPU first runs.
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_KVM_SYSTEM_TIME_NEW,
            data: pvclock | 1,
            ..Default::default()
        }])
        .map_err(|e| VmError::Invalid(format!("{e:?}")))?;
        v.set_msrs(&msrs).map_err(|e| kvm_err("KVM_SET_MSRS", e))?;
        Ok(())
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

    /// Start the vCPU threads (KVM) — the model computes samples on demand.
    pub fn start(&self) -> Result<(), VmError> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let Engine::Kvm {
            vcpus, mem, kvm, ..
        } = &self.engine
        else {
            return Ok(());
        };
        let mut threads = lock(&self.threads);
        for (id, v) in vcpus.iter().enumerate() {
            let v = v.clone();
            let mem = mem.clone();
            let shared = self.shared.clone();
            let kvm = kvm.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu_loop(id, v, mem, shared, kvm))
                .map_err(|e| VmError::Invalid(format!("spawning vCPU thread: {e}")))?;
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
        let mut parked = lock(&self.shared.parked);
        while *parked < n {
            let (p, timeout) = self
                .shared
                .cv
                .wait_timeout(parked, Duration::from_secs(5))
                .unwrap_or_else(|e| e.into_inner());
            parked = p;
            if timeout.timed_out() && *parked < n {
                return Err(VmError::Invalid(format!(
                    "only {}/{n} vCPUs parked after 5 s",
                    *parked
                )));
            }
        }
        Ok(())
    }

    /// Release the vCPUs.
    pub fn resume(&self) -> Result<(), VmError> {
        self.shared.pause_requested.store(false, Ordering::SeqCst);
        self.shared.cv.notify_all();
        Ok(())
    }

    /// Whether a pause is in force.
    pub fn is_paused(&self) -> bool {
        self.shared.pause_requested.load(Ordering::SeqCst)
    }

    /// The latest sample of every vCPU.
    pub fn observe(&self) -> Result<GuestObservation, VmError> {
        match &self.engine {
            Engine::Kvm { .. } => Ok(GuestObservation {
                vcpus: lock(&self.shared.obs).iter().flatten().copied().collect(),
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
                Ok(GuestObservation { vcpus: out })
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
            Engine::Kvm { mem, .. } => {
                mem.write_slice(&buf, GuestAddress(0))
                    .map_err(|e| VmError::Memory(e.to_string()))?;
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
        self.shared.cv.notify_all();
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

fn vcpu_loop(
    id: usize,
    vcpu: Arc<Mutex<VcpuFd>>,
    mem: GuestMemoryMmap,
    shared: Arc<Shared>,
    kvm: Arc<ClockvmmKvm>,
) {
    let slot = GuestAddress(SLOTS_GPA + 16 * id as u64);
    let host_khz = kvm.host_tsc_khz();
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        if shared.pause_requested.load(Ordering::SeqCst) {
            let mut parked = lock(&shared.parked);
            *parked += 1;
            shared.cv.notify_all();
            while shared.pause_requested.load(Ordering::SeqCst)
                && !shared.stop.load(Ordering::SeqCst)
            {
                parked = shared.cv.wait(parked).unwrap_or_else(|e| e.into_inner());
            }
            *parked -= 1;
            continue;
        }
        let exit = {
            let mut v = lock(&vcpu);
            match v.run() {
                Ok(VcpuExit::IoOut(EXIT_PORT, _)) => Ok(()),
                Ok(other) => Err(format!("{other:?}")),
                Err(e) => Err(e.to_string()),
            }
        };
        let h_now = host::rdtsc();
        let rt_now = host::realtime_ns();
        if let Err(e) = exit {
            warn!("vCPU {id}: unexpected exit {e}; stopping it");
            return;
        }
        let mut b = [0u8; 16];
        if mem.read_slice(&mut b, slot).is_err() {
            continue;
        }
        let tsc = u64::from_le_bytes(b[0..8].try_into().unwrap_or([0; 8]));
        let samples = u64::from(u32::from_le_bytes(b[8..12].try_into().unwrap_or([0; 4])));
        if let Some(p) = read_pvclock(&mem, id) {
            // Guest TSC → host TSC through the offset the backend reads (0 on kvm_pvm; the VMM
            // does not use TSC scaling), then → realtime by the host rate.
            let offset = kvm.tsc_offset(id).unwrap_or(0);
            let h_sample = tsc.wrapping_sub(offset);
            let back_ns = math::ticks_to_ns_round(h_now.saturating_sub(h_sample), host_khz);
            let o = VcpuObservation {
                vcpu: id,
                guest_tsc_ticks: tsc,
                guest_kvmclock_ns: math::pvclock_read_ns(&p, tsc),
                host_realtime_ns: rt_now.saturating_sub(back_ns),
                pvclock_flags: p.flags,
                tsc_to_system_mul: p.tsc_to_system_mul,
                tsc_shift: p.tsc_shift,
                samples,
            };
            if let Some(s) = lock(&shared.obs).get_mut(id) {
                *s = Some(o);
            }
        } else {
            debug!("vCPU {id}: pvclock not valid yet");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
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

    #[test]
    fn guest_code_matches_listing() {
        let listing = include_str!("../guest/clockloop.S");
        let mut bytes = Vec::new();
        for line in listing.lines() {
            let Some((_, comment)) = line.split_once(';') else {
                continue;
            };
            for tok in comment.split_whitespace() {
                if tok.len() == 2
                    && tok.chars().all(|c| c.is_ascii_hexdigit())
                    && tok
                        .chars()
                        .any(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
                {
                    bytes.push(u8::from_str_radix(tok, 16).unwrap());
                } else {
                    break;
                }
            }
        }
        assert_eq!(bytes, GUEST_CODE.to_vec());
    }

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
        std::thread::sleep(Duration::from_millis(50));
        let o1 = vm.observe().unwrap();
        assert_eq!(o1.vcpus.len(), 2, "both vCPUs sampled");
        let k = vm.clock_backend().get_clock().unwrap().clock_ns;
        for o in &o1.vcpus {
            assert!(o.samples > 0);
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
        std::thread::sleep(Duration::from_millis(20));
        assert!(vm.observe().unwrap().vcpus[0].samples > p1.vcpus[0].samples);
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

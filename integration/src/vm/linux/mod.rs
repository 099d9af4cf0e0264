//! A real Linux guest: a bzImage booted through the 64-bit boot protocol ([`boot`]) with an
//! in-kernel irqchip and PIT, ACPI tables ([`acpi`]), a CPUID template ([`cpuid`]), an 8250
//! console ([`serial`]), and by default an initramfs holding the project's probe
//! ([`initramfs`], [`probe`]).
//!
//! Stock Linux cannot run on `kvm_pvm` (this project's CI machine): there [`create`] refuses
//! with [`PVM_REASON`]. It runs under the nested kvm_amd of `integration/nested/run`.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod initramfs;
pub mod layout;
pub mod measure;
pub mod probe;
pub mod serial;
pub mod state;

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use guest_clock::backend::host;
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::vcpu::Shared;
use super::{kvm_err, lock, VmConfig, VmError};
use serial::{Console, ConsoleWriter, IrqTrigger, Uart, COM1, COM1_GSI};

/// Why a Linux guest cannot run on kvm_pvm.
pub const PVM_REASON: &str = "this /dev/kvm is kvm_pvm (PVM, a software hypervisor that runs only \
     PVM-enabled guest kernels): a stock Linux kernel cannot run there; run it under the nested \
     kvm_amd of integration/nested/run";

/// The TSS KVM needs on Intel (three pages just below the BIOS area at 4 GiB).
const TSS_ADDR: usize = 0xfffb_d000;

/// How to boot the Linux guest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct LinuxConfig {
    /// The bzImage.
    pub kernel: PathBuf,
    /// An initramfs; none: the built-in one with the probe as /init.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Words appended to [`boot::BASE_CMDLINE`].
    #[serde(default)]
    pub cmdline: String,
    /// The console to this file instead of stdout.
    #[serde(default)]
    pub serial: Option<PathBuf>,
    /// Advertise the invariant TSC (Linux then prefers the TSC clocksource).
    #[serde(default)]
    pub invariant_tsc: bool,
    /// Describe the vmclock page to the guest as an ACPI device (HID AMZNC10C), for the
    /// guest's ptp_vmclock driver.
    #[serde(default)]
    pub acpi_vmclock: bool,
    /// Kernel modules (`.ko`, or `.ko.xz` decompressed by the host's `xz`) appended to the
    /// initramfs; the probe loads them in this order before sampling.
    #[serde(default)]
    pub modules: Vec<PathBuf>,
}

/// The Linux guest's devices (the irqchip and PIT are in KVM).
pub struct LinuxDevices {
    /// COM1.
    pub uart: Mutex<Uart>,
    /// What it printed.
    pub console: Arc<Console>,
    /// Why the guest stopped (triple fault, reset, KVM failure), once it has.
    pub stopped: Mutex<Option<String>>,
    /// Every vCPU's TSC offset as KVM holds it (read while the vCPUs are parked).
    pub offsets: Mutex<Vec<u64>>,
    /// (host TSC, host realtime) references from KVM_GET_CLOCK.
    pub refs: Mutex<std::collections::VecDeque<measure::HostRef>>,
    /// The MSRs a vCPU's state holds (KVM_GET_MSR_INDEX_LIST).
    pub msr_indices: Vec<u32>,
    /// COM1's interrupt (an irqfd), for a UART rebuilt from a snapshot.
    pub irq: EventFd,
    /// The guest's accesses to COM1 so far (for [`serial::IrqWatch`]).
    pub uart_accesses: std::sync::atomic::AtomicU64,
    /// COM1's interrupt as a level (see [`serial::IrqWatch`]).
    pub irq_watch: Mutex<serial::IrqWatch>,
    /// Per vCPU, the MSRs a restore writes after the plugin ([`state::MsrPhase::AfterClock`]);
    /// written by the VM's start.
    pub late_msrs: Mutex<Vec<state::MsrList>>,
}

/// The Linux guest's clocks as the probe reported them, mapped to host time.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LinuxObservation {
    /// The latest mapped sample of every vCPU that reported.
    pub latest: Vec<measure::LinuxSample>,
    /// Per vCPU, the sample with the narrowest RDTSC bracket of the last two probe rounds:
    /// what a disruption is measured from (see [`measure::narrowest`]).
    #[serde(default)]
    pub baseline: Vec<measure::LinuxSample>,
    /// The guest's clocksource (probe report).
    pub clocksource: Option<String>,
    /// Kernel complaints about time seen on the console.
    pub complaints: Vec<String>,
    /// Console lines seen.
    pub console_lines: u64,
    /// Why the guest stopped, if it has.
    pub stopped: Option<String>,
    /// Kernel modules the probe loaded: (name, finit_module result: 0 or −errno).
    #[serde(default)]
    pub modules: Vec<(String, i64)>,
    /// The vmclock PTP clock (ptp_vmclock's) the probe reads, `ptpN`.
    #[serde(default)]
    pub phc_device: Option<String>,
    /// Why the probe found no vmclock PTP clock.
    #[serde(default)]
    pub phc_unavailable: Option<String>,
    /// PHC readings that failed (the probe reports the first few).
    #[serde(default)]
    pub phc_errors: Vec<String>,
    /// The latest PHC reading of every vCPU, with its error beside the system clock's.
    #[serde(default)]
    pub phc_latest: Vec<measure::LinuxPhcSample>,
    /// The vmclock structure as the guest last read it from `/dev/vmclockN`.
    #[serde(default)]
    pub guest_vmclock: Option<probe::GuestVmclockView>,
    /// Why the guest has no vmclock device.
    #[serde(default)]
    pub guest_vmclock_unavailable: Option<String>,
    /// COM1 interrupts raised again because the guest left them unserviced (see
    /// [`serial::IrqWatch`]; a count above 0 is a lost edge the watch recovered).
    #[serde(default)]
    pub com1_interrupts_reraised: u64,
}

impl LinuxDevices {
    /// COM1's registers.
    pub fn serial_state(&self) -> state::SerialRegs {
        lock(&self.uart).state().into()
    }

    /// Rebuild COM1 from saved registers (same interrupt, same console).
    pub fn restore_serial(&self, regs: &state::SerialRegs) -> Result<(), VmError> {
        let evt = self.irq.try_clone().map_err(|e| VmError::Kvm {
            op: "eventfd dup",
            source: e,
        })?;
        let uart = Uart::from_state(
            &regs.into(),
            IrqTrigger(evt),
            vm_superio::serial::NoEvents,
            ConsoleWriter(self.console.clone()),
        )
        .map_err(|e| VmError::Invalid(format!("snapshot section serial: {e:?}")))?;
        *lock(&self.uart) = uart;
        Ok(())
    }

    /// One check of COM1's interrupt (see [`serial::IrqWatch`]); `paused` is the VM's pause
    /// request, read under the UART's lock: a pause takes that lock once after requesting, so
    /// nothing is raised into a VM whose state is being saved.
    pub fn watch_irq(&self, paused: &std::sync::atomic::AtomicBool) {
        let uart = lock(&self.uart);
        if paused.load(Ordering::SeqCst) {
            return;
        }
        let st = uart.state();
        let accesses = self.uart_accesses.load(Ordering::Relaxed);
        let mut w = lock(&self.irq_watch);
        if w.check(accesses, st.interrupt_enable, st.interrupt_identification) {
            let n = w.reraised;
            drop(w);
            match self.irq.write(1) {
                Ok(()) if n == 1 => info!(
                    "COM1: an enabled interrupt (IER {:#04x}, IIR {:#04x}) went unserviced for {} ms: raised again (a lost edge)",
                    st.interrupt_enable,
                    st.interrupt_identification,
                    2 * serial::IRQ_WATCH_PERIOD.as_millis()
                ),
                Ok(()) => debug!("COM1: interrupt raised again ({n} so far)"),
                Err(e) => warn!("COM1: raising the interrupt again: {e}"),
            }
        }
    }

    /// Record a (host TSC, realtime) reference.
    pub fn add_ref(&self, r: measure::HostRef) {
        let mut refs = lock(&self.refs);
        if refs.len() == measure::MAX_REFS {
            refs.pop_front();
        }
        refs.push_back(r);
    }

    /// Every probe sample still in the console log, mapped (unmappable ones skipped).
    pub fn samples(&self, host_khz: u32) -> Vec<measure::LinuxSample> {
        let offsets = lock(&self.offsets).clone();
        let refs: Vec<_> = lock(&self.refs).iter().copied().collect();
        let log = lock(&self.console.log);
        log.samples
            .iter()
            .filter_map(|s| measure::map_sample(s, &offsets, &refs, host_khz))
            .collect()
    }

    /// Every PHC reading still in the console log, mapped (with its system-clock sample where
    /// that is still there), oldest first.
    pub fn phc_samples(&self, host_khz: u32) -> Vec<measure::LinuxPhcSample> {
        let all = self.samples(host_khz);
        let offsets = lock(&self.offsets).clone();
        let refs: Vec<_> = lock(&self.refs).iter().copied().collect();
        let log = lock(&self.console.log);
        log.phc
            .iter()
            .map(|p| {
                let s = all.iter().find(|s| s.vcpu == p.cpu && s.seq == p.seq);
                measure::map_phc(p, s, &offsets, &refs, host_khz)
            })
            .collect()
    }

    /// The observation: the latest sample of each vCPU, the clocksource, the complaints, the
    /// latest PHC reading of each vCPU.
    pub fn observe(&self, host_khz: u32) -> LinuxObservation {
        let all = self.samples(host_khz);
        let mut latest: Vec<measure::LinuxSample> = Vec::new();
        for s in all.iter().rev() {
            if !latest.iter().any(|l| l.vcpu == s.vcpu) {
                latest.push(*s);
            }
        }
        latest.sort_by_key(|s| s.vcpu);
        let last = latest.iter().map(|s| s.seq).max().unwrap_or(0);
        let rounds2 = 2 * latest.len() as u64;
        let baseline = measure::narrowest(
            all.iter().copied(),
            |s| s.seq + rounds2 > last,
            |s| s.bracket_ns,
        );
        let offsets = lock(&self.offsets).clone();
        let refs: Vec<_> = lock(&self.refs).iter().copied().collect();
        let log = lock(&self.console.log);
        let mut phc_latest: Vec<measure::LinuxPhcSample> = Vec::new();
        for p in log.phc.iter().rev() {
            if phc_latest.iter().any(|l| l.vcpu == p.cpu) {
                continue;
            }
            let s = all.iter().rev().find(|s| s.vcpu == p.cpu && s.seq == p.seq);
            phc_latest.push(measure::map_phc(p, s, &offsets, &refs, host_khz));
        }
        phc_latest.sort_by_key(|p| p.vcpu);
        LinuxObservation {
            latest,
            baseline,
            clocksource: log.clocksource.clone(),
            complaints: log.complaints.clone(),
            console_lines: log.total_lines,
            stopped: lock(&self.stopped).clone(),
            modules: log.modules.clone(),
            com1_interrupts_reraised: lock(&self.irq_watch).reraised,
            phc_device: log.phc_device.clone(),
            phc_unavailable: log.phc_unavailable.clone(),
            phc_errors: log.phc_errors.clone(),
            phc_latest,
            guest_vmclock: log.guest_vmclock.clone(),
            guest_vmclock_unavailable: log.guest_vmclock_unavailable.clone(),
        }
    }
}

/// A created (not yet running) Linux VM.
pub struct LinuxParts {
    /// The VM.
    pub vm: Arc<VmFd>,
    /// Its vCPUs.
    pub vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    /// Its memory.
    pub mem: GuestMemoryMmap,
    /// Its devices.
    pub devices: Arc<LinuxDevices>,
}

fn read_bounded(path: &std::path::Path, max: u64) -> Result<Vec<u8>, VmError> {
    let f = std::fs::File::open(path)
        .map_err(|e| VmError::Invalid(format!("initramfs {}: {e}", path.display())))?;
    let mut v = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut v)
        .map_err(|e| VmError::Invalid(format!("initramfs {}: {e}", path.display())))?;
    if v.len() as u64 > max {
        return Err(VmError::Invalid(format!(
            "initramfs {} is larger than the guest's memory allows",
            path.display()
        )));
    }
    Ok(v)
}

/// Create the VM: memory, irqchip, PIT, ACPI, kernel, initramfs, console, vCPUs (the boot vCPU
/// at the kernel's entry, the others waiting for INIT/SIPI).
pub fn create(cfg: &VmConfig, lc: &LinuxConfig) -> Result<LinuxParts, VmError> {
    let flavour = host::kvm_flavour();
    if flavour == "kvm_pvm" {
        return Err(VmError::Invalid(PVM_REASON.into()));
    }
    let kvm = Kvm::new().map_err(|e| kvm_err("open /dev/kvm", e))?;
    let vm = kvm.create_vm().map_err(|e| kvm_err("KVM_CREATE_VM", e))?;
    if let Err(e) = vm.set_tss_address(TSS_ADDR) {
        warn!("KVM_SET_TSS_ADDR: {e} (needed on Intel only)");
    }
    vm.create_irq_chip()
        .map_err(|e| kvm_err("KVM_CREATE_IRQCHIP", e))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(|e| kvm_err("KVM_CREATE_PIT2", e))?;

    let size = cfg.memory_mib << 20;
    let mem = super::guest_memory(&vm, size)?;

    let mut initrd = match &lc.initrd {
        Some(p) => read_bounded(p, size as u64)?,
        None => initramfs::probe_initramfs().ok_or_else(|| {
            VmError::Invalid(
                "the probe initramfs was not built (no static C compiler at build time): pass \
                 --initrd"
                    .into(),
            )
        })?,
    };
    let modules = lc
        .modules
        .iter()
        .map(|m| initramfs::load_module(m, size as u64))
        .collect::<Result<Vec<_>, _>>()
        .map_err(VmError::Invalid)?;
    initramfs::append_modules(&mut initrd, &modules);
    let mut devices = Vec::new();
    if lc.acpi_vmclock {
        let (base, len) = layout::VMCLOCK_PAGE;
        devices.push(acpi::vmclock_device(base as u32, len as u32));
    }
    let tables = acpi::build(cfg.vcpus, &devices)?;
    for (at, b) in &tables.tables {
        mem.write_slice(b, GuestAddress(*at))
            .map_err(|e| VmError::Memory(format!("ACPI: {e}")))?;
    }
    let cmdline = format!("{} {}", boot::BASE_CMDLINE, lc.cmdline.trim());
    let loaded = boot::load(
        &mem,
        size as u64,
        &lc.kernel,
        &initrd,
        cmdline.trim(),
        tables.rsdp,
    )?;

    let out: Box<dyn std::io::Write + Send> = match &lc.serial {
        Some(p) => Box::new(
            crate::files::append_regular(p)
                .map_err(|e| VmError::Invalid(format!("--serial {}: {e}", p.display())))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let console = Console::new(out);
    let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Kvm {
        op: "eventfd",
        source: e,
    })?;
    vm.register_irqfd(&evt, COM1_GSI)
        .map_err(|e| kvm_err("KVM_IRQFD (COM1)", e))?;
    let uart = Uart::new(
        IrqTrigger(evt.try_clone().map_err(|e| VmError::Kvm {
            op: "eventfd dup",
            source: e,
        })?),
        ConsoleWriter(console.clone()),
    );
    state::check_xsave_size(&vm)?;
    let msr_indices = kvm
        .get_msr_index_list()
        .map_err(|e| kvm_err("KVM_GET_MSR_INDEX_LIST", e))?
        .as_slice()
        .to_vec();

    let template = cpuid::from_kvm(
        &kvm,
        cpuid::CpuidOptions {
            vcpus: cfg.vcpus,
            invariant_tsc: lc.invariant_tsc,
            tsc_deadline: vm.check_extension(Cap::TscDeadlineTimer),
        },
    )?;
    let mut vcpus = Vec::with_capacity(cfg.vcpus);
    for id in 0..cfg.vcpus {
        let v = vm
            .create_vcpu(id as u64)
            .map_err(|e| kvm_err("KVM_CREATE_VCPU", e))?;
        v.set_cpuid2(&cpuid::for_vcpu(&template, id)?)
            .map_err(|e| kvm_err("KVM_SET_CPUID2", e))?;
        boot::setup_boot_msrs(&v)?;
        boot::setup_lint(&v)?;
        if id == 0 {
            boot::setup_boot_vcpu(&v, loaded.entry)?;
        }
        vcpus.push(Arc::new(Mutex::new(v)));
    }
    info!(
        "Linux VM: {} vCPUs, {} MiB, kernel {} (entry {:#x}, ends {:#x}), initramfs {:?}",
        cfg.vcpus,
        cfg.memory_mib,
        lc.kernel.display(),
        loaded.entry,
        loaded.kernel_end,
        loaded.initrd
    );
    Ok(LinuxParts {
        vm: Arc::new(vm),
        vcpus,
        mem,
        devices: Arc::new(LinuxDevices {
            uart: Mutex::new(uart),
            console,
            stopped: Mutex::new(None),
            offsets: Mutex::new(vec![0; cfg.vcpus]),
            refs: Mutex::new(std::collections::VecDeque::new()),
            msr_indices,
            irq: evt,
            uart_accesses: std::sync::atomic::AtomicU64::new(0),
            irq_watch: Mutex::new(serial::IrqWatch::default()),
            late_msrs: Mutex::new(Vec::new()),
        }),
    })
}

enum Flow {
    Go,
    Stop(String),
}

fn handle_exit(exit: VcpuExit<'_>, dev: &LinuxDevices) -> Flow {
    if let VcpuExit::IoOut(port, _) | VcpuExit::IoIn(port, _) = &exit {
        if (COM1..COM1 + 8).contains(port) {
            dev.uart_accesses.fetch_add(1, Ordering::Relaxed);
        }
    }
    match exit {
        VcpuExit::IoOut(port, data) => {
            if (COM1..COM1 + 8).contains(&port) {
                if let Some(b) = data.first() {
                    if let Err(e) = lock(&dev.uart).write((port - COM1) as u8, *b) {
                        warn!("COM1 write: {e:?}");
                    }
                }
            } else if port == 0x64 && data.first() == Some(&0xfe) {
                return Flow::Stop("the guest reset the machine (i8042 0xfe)".into());
            }
            Flow::Go
        }
        VcpuExit::IoIn(port, data) => {
            if (COM1..COM1 + 8).contains(&port) {
                let v = lock(&dev.uart).read((port - COM1) as u8);
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
            } else {
                data.fill(0xff); // no device
            }
            Flow::Go
        }
        VcpuExit::MmioRead(_, data) => {
            data.fill(0);
            Flow::Go
        }
        VcpuExit::MmioWrite(..) | VcpuExit::Hlt => Flow::Go,
        VcpuExit::Shutdown => Flow::Stop("the guest shut down (triple fault or reboot)".into()),
        VcpuExit::SystemEvent(t, _) => Flow::Stop(format!("system event {t}")),
        other => Flow::Stop(format!("unexpected exit {other:?}")),
    }
}

/// Kick signal: interrupts KVM_RUN of a vCPU thread (the handler does nothing).
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the kick handler (idempotent).
pub fn install_kick_handler() -> Result<(), VmError> {
    static ONCE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| format!("kick signal handler: {e}"))
    })
    .clone()
    .map_err(VmError::Invalid)
}

/// One Linux vCPU's thread: KVM_RUN, device exits, parking on pause (a kick interrupts
/// KVM_RUN), and the end of the guest.
pub(super) fn vcpu_loop(
    id: usize,
    vcpu: Arc<Mutex<VcpuFd>>,
    shared: Arc<Shared>,
    dev: Arc<LinuxDevices>,
) {
    let _registered = shared.register_thread();
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        if shared.pause_requested.load(Ordering::SeqCst) {
            if let Flow::Stop(why) = complete_pending_exit(&vcpu, &dev) {
                stop_guest(id, &why, &shared, &dev);
                return;
            }
        }
        if shared.park_if_requested() {
            continue;
        }
        let flow = {
            let mut v = lock(&vcpu);
            match v.run() {
                Ok(exit) => handle_exit(exit, &dev),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Flow::Go,
                Err(e) => Flow::Stop(format!("KVM_RUN: {e}")),
            }
        };
        if let Flow::Stop(why) = flow {
            stop_guest(id, &why, &shared, &dev);
            return;
        }
    }
}

fn stop_guest(id: usize, why: &str, shared: &Shared, dev: &LinuxDevices) {
    info!("vCPU {id}: {why}; the guest stops");
    lock(&dev.stopped).get_or_insert(why.to_string());
    shared.stop.store(true, Ordering::SeqCst);
    shared.kick_all();
    shared.wake_all();
}

/// Before a vCPU parks for a save: one KVM_RUN with `immediate_exit` set, which completes what
/// the last exit left pending (the data of an IN or an MMIO read goes into the registers at the
/// next entry) and returns EINTR without running the guest. Without it a saved RAX could miss
/// the byte the guest was reading.
fn complete_pending_exit(vcpu: &Mutex<VcpuFd>, dev: &LinuxDevices) -> Flow {
    let mut v = lock(vcpu);
    v.set_kvm_immediate_exit(1);
    let flow = match v.run() {
        Ok(exit) => handle_exit(exit, dev),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Flow::Go,
        Err(e) => Flow::Stop(format!("KVM_RUN (immediate exit): {e}")),
    };
    v.set_kvm_immediate_exit(0);
    flow
}

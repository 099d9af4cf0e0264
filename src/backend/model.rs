//! A deterministic software model of KVM x86 clock semantics.
//!
//! Time is driven by the test through [`ModelTime`]; nothing reads a real clock. One
//! [`ModelTime`] can be shared by several [`ModelHost`]s (source and destination of a migration),
//! each with its own TSC rate, boot TSC, wallclock skew, identity, NTP state and capabilities.
//! A [`ModelVm`] on a host implements [`ClockBackend`] the way `arch/x86/kvm/x86.c` does:
//!
//! - host kernel clock: `kernel_ns(h) = ticks_to_ns_floor(h, host_khz)` (a TSC clocksource);
//! - kvmclock: `kernel_ns(h) + kvmclock_offset` (`get_kvmclock_base_ns` + `kvmclock_offset`);
//!   with the master clock, `master_kernel_ns + offset + scale(h − master_cycle_now)`
//!   (`get_kvmclock` / `__get_kvmclock`);
//! - `KVM_GET_CLOCK`: `REALTIME | HOST_TSC | TSC_STABLE` only with the master clock, which
//!   starts when a vCPU first runs or at `KVM_SET_CLOCK` (`pvclock_update_vm_gtod_copy`), and
//!   only on a host whose clocksource is the TSC;
//! - `KVM_SET_CLOCK` (`kvm_vm_ioctl_set_clock`): master-clock snapshot first, realtime read
//!   `realtime_read_gap_ns` later; with REALTIME, `clock += now − realtime` when positive (never
//!   back); `kvmclock_offset = clock − master_kernel_ns`;
//! - guest TSC: `scale(h, ratio) + offset` per vCPU; vCPU creation and host writes of
//!   `MSR_IA32_TSC` go through `kvm_synchronize_tsc` (once userspace has set a TSC, a write within ±1 s of the expected value
//!   for the elapsed time is replaced by the current generation's offset); the
//!   `KVM_VCPU_TSC_OFFSET` attribute sets the offset exactly (`kvm_vcpu_tsc_offset_set`);
//! - `KVM_SET_TSC_KHZ` (`kvm_set_tsc_khz`): within 250 ppm no scaling; scaling needs
//!   `tsc_control`; slower without it is EINVAL; faster without it is accepted unscaled (KVM's
//!   catch-up mode, not modelled further);
//! - `KVM_KVMCLOCK_CTRL`: EINVAL until the guest enabled kvmclock; sets `PVCLOCK_GUEST_STOPPED`
//!   at the vCPU's next entry (`kvm_set_guest_paused` → `kvm_guest_time_update`);
//! - `ignore_tsc_writes` emulates kvm_pvm: offset writes and MSR writes are accepted and
//!   ignored, offsets read 0, guest TSC == host TSC.

use std::sync::{Arc, Mutex, MutexGuard};

use guest_clock_format::{HostIdentity, NtpState};

use super::{
    BackendError, Capabilities, ClockData, HostFacts, HostInfo, Hypervisor, PvclockPages,
    PvclockTimeInfo, Result, TscControl, KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME,
    KVM_CLOCK_TSC_STABLE, PVCLOCK_GUEST_STOPPED, PVCLOCK_TSC_STABLE_BIT,
};
use crate::math;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The shared "true time" of a model world, ns. Only moves forward.
#[derive(Debug, Clone, Default)]
pub struct ModelTime(Arc<Mutex<u64>>);

impl ModelTime {
    /// Time 0.
    pub fn new() -> Self {
        Self::default()
    }
    /// Now, ns.
    pub fn now_ns(&self) -> u64 {
        *lock(&self.0)
    }
    /// Let `ns` pass.
    pub fn advance_ns(&self, ns: u64) {
        let mut t = lock(&self.0);
        *t = t.saturating_add(ns);
    }
    /// Move to `ns` if it is later than now (time never goes back).
    pub fn advance_to_ns(&self, ns: u64) {
        let mut t = lock(&self.0);
        *t = (*t).max(ns);
    }
}

/// A model host's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// Host TSC rate, kHz.
    pub tsc_khz: u32,
    /// Host TSC at true time `boot_true_ns`.
    pub boot_tsc_ticks: u64,
    /// True time of the last boot (TSC reset), ns.
    pub boot_true_ns: u64,
    /// CLOCK_REALTIME at true time 0, ns.
    pub realtime_epoch_ns: u64,
    /// This host's wallclock error, ns (a second host whose NTP is off by this much).
    pub skew_ns: i64,
    /// machine-id hash, boot_id, clocksource (host_tsc_khz is filled from `tsc_khz`).
    pub identity: HostIdentity,
    /// adjtimex state.
    pub ntp: NtpState,
    /// What KVM on this host can do.
    pub caps: Capabilities,
    /// kvm_pvm behaviour: TSC offset and MSR writes are accepted and ignored.
    pub ignore_tsc_writes: bool,
    /// Whether the host clocksource is the TSC (the master clock needs it).
    pub tsc_clocksource: bool,
    /// ns between KVM's master-clock snapshot and its realtime read in `KVM_SET_CLOCK`.
    pub realtime_read_gap_ns: u64,
    /// Extra gap of the n-th `KVM_SET_CLOCK`, ns, cycling (`[n % len]`; empty: none): a host
    /// where the gap jitters (preemption, a nested hypervisor's exits).
    pub realtime_read_gap_jitter_ns: Vec<u64>,
}

/// Everything a modern Intel KVM reports.
pub fn full_capabilities() -> Capabilities {
    Capabilities {
        adjust_clock_flags: KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC,
        tsc_control: true,
        vm_tsc_control: true,
        tsc_offset_attr: true,
        kvmclock_ctrl: true,
        tsc_scaling_frac_bits: 48,
    }
}

impl HostConfig {
    /// A healthy Intel host with a TSC clocksource, NTP-synchronised (maxerror 100 µs), booted
    /// with its TSC at 0 at true time 0; `seed` makes machine-id and boot_id distinct.
    pub fn new(tsc_khz: u32, seed: u64) -> Self {
        HostConfig {
            tsc_khz,
            boot_tsc_ticks: 0,
            boot_true_ns: 0,
            realtime_epoch_ns: 1_764_000_000_000_000_000,
            skew_ns: 0,
            identity: HostIdentity {
                machine_id_hash: 0x9e37_79b9_7f4a_7c15 ^ seed,
                boot_id: boot_id_for(seed, 0),
                host_tsc_khz: tsc_khz,
                clocksource: "tsc".into(),
            },
            ntp: NtpState {
                status: 0x2001,
                maxerror_us: 100,
                esterror_us: 10,
            },
            caps: full_capabilities(),
            ignore_tsc_writes: false,
            tsc_clocksource: true,
            realtime_read_gap_ns: 0,
            realtime_read_gap_jitter_ns: Vec::new(),
        }
    }
}

fn boot_id_for(seed: u64, boot: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&seed.to_le_bytes());
    b[8..].copy_from_slice(&boot.wrapping_add(1).to_le_bytes());
    b
}

/// A model host: its TSC and wallclock, derived from the shared true time.
#[derive(Debug)]
pub struct ModelHost {
    time: ModelTime,
    cfg: Mutex<HostConfig>,
    boots: Mutex<u64>,
}

impl ModelHost {
    /// A host on `time`.
    pub fn new(time: ModelTime, cfg: HostConfig) -> Arc<Self> {
        Arc::new(ModelHost {
            time,
            cfg: Mutex::new(cfg),
            boots: Mutex::new(0),
        })
    }
    /// The shared time.
    pub fn time(&self) -> &ModelTime {
        &self.time
    }
    /// A copy of the settings.
    pub fn config(&self) -> HostConfig {
        lock(&self.cfg).clone()
    }
    /// Change the settings (skew, NTP, capabilities...).
    pub fn update(&self, f: impl FnOnce(&mut HostConfig)) {
        f(&mut lock(&self.cfg));
    }
    /// Host TSC now: `boot_tsc + ns_to_ticks_floor(now − boot, khz)`.
    pub fn tsc_now(&self) -> u64 {
        let c = lock(&self.cfg);
        let since = self.time.now_ns().saturating_sub(c.boot_true_ns);
        c.boot_tsc_ticks
            .wrapping_add(math::ns_to_ticks_floor(since, c.tsc_khz))
    }
    /// Host CLOCK_REALTIME now: `epoch + now + skew`.
    pub fn realtime_now(&self) -> u64 {
        let c = lock(&self.cfg);
        math::add_signed(
            c.realtime_epoch_ns.saturating_add(self.time.now_ns()),
            c.skew_ns,
        )
    }
    /// The host kernel's clock at host TSC `h` (a TSC clocksource): `ticks_to_ns_floor(h)`.
    pub fn kernel_ns_at(&self, h: u64) -> u64 {
        math::ticks_to_ns_floor(h, lock(&self.cfg).tsc_khz)
    }
    /// kexec into a new kernel: new boot_id, the TSC continues.
    pub fn kexec(&self) {
        let mut n = lock(&self.boots);
        *n += 1;
        let mut c = lock(&self.cfg);
        let seed = c.identity.machine_id_hash;
        c.identity.boot_id = boot_id_for(seed, *n);
    }
    /// Reboot through firmware: new boot_id, the TSC restarts at 0.
    pub fn reboot(&self) {
        self.kexec();
        let now = self.time.now_ns();
        let mut c = lock(&self.cfg);
        c.boot_true_ns = now;
        c.boot_tsc_ticks = 0;
    }
}

/// One modelled vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelVcpu {
    /// L1 TSC offset, guest ticks.
    pub tsc_offset_ticks: u64,
    /// Scaling ratio (`1 << frac_bits` = none).
    pub ratio: u64,
    /// Virtual TSC rate, kHz.
    pub tsc_khz: u32,
    /// The guest wrote MSR_KVM_SYSTEM_TIME_NEW.
    pub kvmclock_enabled: bool,
    /// `KVM_KVMCLOCK_CTRL` was called; applied at the next entry.
    pub stop_pending: bool,
    /// `PVCLOCK_GUEST_STOPPED` is set in the guest's pvclock.
    pub guest_stopped: bool,
}

/// A model VM's full clock state (comparable: "untouched" means equal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelVmState {
    /// kvmclock = base + offset.
    pub kvmclock_offset_ns: i128,
    /// The master clock is in use.
    pub use_master_clock: bool,
    /// Master-clock snapshot: host TSC.
    pub master_cycle_now: u64,
    /// Master-clock snapshot: host kernel ns.
    pub master_kernel_ns: u64,
    /// vCPUs.
    pub vcpus: Vec<ModelVcpu>,
    /// kvm_synchronize_tsc state: last write's kernel ns.
    pub last_tsc_nsec: u64,
    /// ... its value.
    pub last_tsc_write: u64,
    /// ... its vCPU's rate.
    pub last_tsc_khz: u32,
    /// The current generation's offset.
    pub cur_tsc_offset: u64,
    /// Generation counter.
    pub cur_tsc_generation: u64,
    /// `kvm->arch.user_set_tsc`: userspace has set a TSC (MSR write or offset attribute) in
    /// this VM; until then a non-zero write is never "matched" (Linux 6.7+, "Don't sync TSC on
    /// the first write in state restoration").
    pub user_set_tsc: bool,
}

/// Calls that changed clock state, for tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelCounters {
    /// `KVM_SET_CLOCK`.
    pub set_clock: u64,
    /// `KVM_SET_DEVICE_ATTR(TSC_OFFSET)`.
    pub set_tsc_offset: u64,
    /// `KVM_SET_MSRS(MSR_IA32_TSC)`.
    pub set_tsc_msr: u64,
    /// `KVM_SET_TSC_KHZ`.
    pub set_tsc_khz: u64,
    /// `KVM_KVMCLOCK_CTRL`.
    pub kvmclock_ctrl: u64,
}

#[derive(Debug)]
struct Inner {
    st: ModelVmState,
    counters: ModelCounters,
    tsc_control: TscControl,
}

/// A model VM on a [`ModelHost`].
#[derive(Debug)]
pub struct ModelVm {
    host: Arc<ModelHost>,
    inner: Mutex<Inner>,
}

impl ModelVm {
    /// Create a VM with `vcpus` vCPUs at the host's TSC rate. Like KVM, kvmclock starts at 0 and
    /// each vCPU's creation writes TSC 0 through `kvm_synchronize_tsc` (one generation).
    pub fn new(host: Arc<ModelHost>, vcpus: usize) -> Self {
        let cfg = host.config();
        let one = if cfg.caps.tsc_scaling_frac_bits == 0 {
            1
        } else {
            1u64 << cfg.caps.tsc_scaling_frac_bits
        };
        let h = host.tsc_now();
        let k = host.kernel_ns_at(h);
        let vm = ModelVm {
            inner: Mutex::new(Inner {
                st: ModelVmState {
                    kvmclock_offset_ns: -i128::from(k),
                    use_master_clock: false,
                    master_cycle_now: h,
                    master_kernel_ns: k,
                    vcpus: vec![
                        ModelVcpu {
                            tsc_offset_ticks: 0,
                            ratio: one,
                            tsc_khz: cfg.tsc_khz,
                            kvmclock_enabled: false,
                            stop_pending: false,
                            guest_stopped: false,
                        };
                        vcpus
                    ],
                    last_tsc_nsec: 0,
                    last_tsc_write: 0,
                    last_tsc_khz: 0,
                    cur_tsc_offset: 0,
                    cur_tsc_generation: 0,
                    user_set_tsc: false,
                },
                counters: ModelCounters::default(),
                tsc_control: TscControl::Unknown,
            }),
            host,
        };
        for n in 0..vcpus {
            let mut g = lock(&vm.inner);
            vm.synchronize_tsc(&mut g, n, 0, false);
        }
        vm
    }

    /// The host.
    pub fn host(&self) -> &Arc<ModelHost> {
        &self.host
    }
    /// A copy of the full clock state.
    pub fn state(&self) -> ModelVmState {
        lock(&self.inner).st.clone()
    }
    /// Operation counters.
    pub fn counters(&self) -> ModelCounters {
        lock(&self.inner).counters
    }

    fn frac(&self) -> u8 {
        self.host.config().caps.tsc_scaling_frac_bits
    }

    fn check(&self, g: &Inner, vcpu: usize) -> Result<()> {
        let count = g.st.vcpus.len();
        if vcpu >= count {
            return Err(BackendError::NoSuchVcpu { vcpu, count });
        }
        Ok(())
    }

    /// `kvm_synchronize_tsc(vcpu, user_value)`: the ±1 s matching heuristic. A write of 0 (vCPU
    /// creation, or userspace asking for synchronisation) always matches; a non-zero write
    /// matches only once userspace has set a TSC before (`user_set_tsc`) and lies within 1 s of
    /// `last_tsc_write + elapsed`.
    fn synchronize_tsc(&self, g: &mut Inner, vcpu: usize, data: u64, user: bool) {
        if self.host.config().ignore_tsc_writes {
            // kvm_pvm: the guest TSC is the host TSC whatever is written.
            return;
        }
        let frac = self.frac();
        let h = self.host.tsc_now();
        let ns = self.host.kernel_ns_at(h);
        let v = &g.st.vcpus[vcpu];
        let mut offset = math::tsc_offset_for(data, h, v.ratio, frac);
        let elapsed = ns.saturating_sub(g.st.last_tsc_nsec);
        let khz = v.tsc_khz;
        let synchronizing = if data == 0 {
            true
        } else if !g.st.user_set_tsc {
            false
        } else {
            // tsc_exp = last_tsc_write + nsec_to_cycles(elapsed); a write within 1 s of it.
            let exp =
                g.st.last_tsc_write
                    .wrapping_add(math::ns_to_ticks_floor(elapsed, khz));
            let hz = u64::from(khz) * 1000;
            (u128::from(data) < u128::from(exp) + u128::from(hz))
                && (u128::from(data) + u128::from(hz) > u128::from(exp))
        };
        let matched = synchronizing && khz == g.st.last_tsc_khz;
        if matched {
            offset = g.st.cur_tsc_offset;
        } else {
            g.st.cur_tsc_generation += 1;
            g.st.cur_tsc_offset = offset;
        }
        g.st.user_set_tsc |= user;
        g.st.last_tsc_nsec = ns;
        g.st.last_tsc_write = data;
        g.st.last_tsc_khz = khz;
        g.st.vcpus[vcpu].tsc_offset_ticks = offset;
        self.request_master_update(g);
    }

    /// `KVM_REQ_MASTERCLOCK_UPDATE` (from `kvm_track_tsc_matching`): processed at the next
    /// entry; the model refreshes the snapshot right away when the master clock already runs,
    /// and leaves a VM whose vCPUs never ran without one.
    fn request_master_update(&self, g: &mut Inner) {
        if g.st.use_master_clock {
            self.master_update(g);
        }
    }

    /// `pvclock_update_vm_gtod_copy`: snapshot (host TSC, kernel ns); master clock on a TSC host.
    fn master_update(&self, g: &mut Inner) {
        let h = self.host.tsc_now();
        g.st.master_cycle_now = h;
        g.st.master_kernel_ns = self.host.kernel_ns_at(h);
        g.st.use_master_clock = self.host.config().tsc_clocksource;
    }

    fn kvmclock_at(&self, g: &Inner, h: u64) -> u64 {
        let base = if g.st.use_master_clock {
            // __get_kvmclock: master_kernel_ns + scale(h − master_cycle_now) at the host rate.
            let ts = math::pvclock_time_scale_for_khz(self.host.config().tsc_khz);
            g.st.master_kernel_ns
                .wrapping_add(math::pvclock_scale_delta(
                    h.wrapping_sub(g.st.master_cycle_now),
                    ts.mul,
                    ts.shift,
                ))
        } else {
            self.host.kernel_ns_at(h)
        };
        (i128::from(base) + g.st.kvmclock_offset_ns).clamp(0, i128::from(u64::MAX)) as u64
    }

    /// A vCPU enters the guest (`vcpu_enter_guest`): the master clock starts, a pending
    /// `KVMCLOCK_CTRL` becomes visible.
    pub fn run_vcpu(&self, vcpu: usize) -> Result<()> {
        let mut g = lock(&self.inner);
        self.check(&g, vcpu)?;
        if !g.st.use_master_clock && self.host.config().tsc_clocksource {
            self.master_update(&mut g);
        }
        let v = &mut g.st.vcpus[vcpu];
        if v.stop_pending && v.kvmclock_enabled {
            v.stop_pending = false;
            v.guest_stopped = true;
        }
        Ok(())
    }

    /// Every vCPU enters the guest once.
    pub fn run_all(&self) {
        for n in 0..self.vcpu_count() {
            let _ = self.run_vcpu(n);
        }
    }

    /// The guest writes MSR_KVM_SYSTEM_TIME_NEW (enables kvmclock on this vCPU).
    pub fn guest_enable_kvmclock(&self, vcpu: usize) -> Result<()> {
        let mut g = lock(&self.inner);
        self.check(&g, vcpu)?;
        g.st.vcpus[vcpu].kvmclock_enabled = true;
        Ok(())
    }

    /// The guest clears `PVCLOCK_GUEST_STOPPED` (its watchdog handling).
    pub fn guest_clear_stopped(&self, vcpu: usize) -> Result<()> {
        let mut g = lock(&self.inner);
        self.check(&g, vcpu)?;
        g.st.vcpus[vcpu].guest_stopped = false;
        Ok(())
    }

    /// The guest's RDTSC now.
    pub fn guest_tsc_now(&self, vcpu: usize) -> Result<u64> {
        let g = lock(&self.inner);
        self.check(&g, vcpu)?;
        let v = &g.st.vcpus[vcpu];
        Ok(math::guest_tsc_ticks(
            self.host.tsc_now(),
            v.ratio,
            self.frac(),
            v.tsc_offset_ticks,
        ))
    }

    /// The kvmclock the guest computes now on this vCPU from its pvclock and RDTSC.
    pub fn guest_kvmclock_now(&self, vcpu: usize) -> Result<Option<u64>> {
        let tsc = self.guest_tsc_now(vcpu)?;
        Ok(self.pvclock(vcpu)?.map(|p| math::pvclock_read_ns(&p, tsc)))
    }
}

impl Hypervisor for ModelVm {
    fn name(&self) -> &str {
        "model"
    }

    fn capabilities(&self) -> Capabilities {
        self.host.config().caps
    }

    fn vcpu_count(&self) -> usize {
        lock(&self.inner).st.vcpus.len()
    }

    fn get_clock(&self) -> Result<ClockData> {
        let caps = self.host.config().caps;
        if caps.adjust_clock_flags == 0 {
            return Err(BackendError::Unsupported {
                op: "KVM_GET_CLOCK",
            });
        }
        let g = lock(&self.inner);
        let h = self.host.tsc_now();
        let clock_ns = self.kvmclock_at(&g, h);
        if g.st.use_master_clock {
            let flags = (KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC)
                & caps.adjust_clock_flags;
            Ok(ClockData {
                clock_ns,
                flags,
                realtime_ns: if flags & KVM_CLOCK_REALTIME != 0 {
                    self.host.realtime_now()
                } else {
                    0
                },
                host_tsc_ticks: if flags & KVM_CLOCK_HOST_TSC != 0 {
                    h
                } else {
                    0
                },
            })
        } else {
            Ok(ClockData {
                clock_ns,
                ..ClockData::default()
            })
        }
    }

    fn set_clock(&self, data: &ClockData) -> Result<()> {
        let cfg = self.host.config();
        if cfg.caps.adjust_clock_flags == 0 {
            return Err(BackendError::Unsupported {
                op: "KVM_SET_CLOCK",
            });
        }
        let realtime_unsupported = data.flags & KVM_CLOCK_REALTIME != 0
            && cfg.caps.adjust_clock_flags & KVM_CLOCK_REALTIME == 0;
        if data.flags & !super::KVM_CLOCK_VALID_FLAGS != 0 || realtime_unsupported {
            return Err(BackendError::Ioctl {
                op: "KVM_SET_CLOCK",
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        let mut g = lock(&self.inner);
        let jitter = match cfg.realtime_read_gap_jitter_ns.len() {
            0 => 0,
            n => cfg.realtime_read_gap_jitter_ns[(g.counters.set_clock % n as u64) as usize],
        };
        g.counters.set_clock += 1;
        // Master-clock snapshot first, then the realtime read (the gap lands kvmclock ahead).
        self.master_update(&mut g);
        let mut clock = data.clock_ns;
        if data.flags & KVM_CLOCK_REALTIME != 0 {
            let now_real = self
                .host
                .realtime_now()
                .saturating_add(cfg.realtime_read_gap_ns)
                .saturating_add(jitter);
            if now_real > data.realtime_ns {
                clock = clock.saturating_add(now_real - data.realtime_ns);
            }
        }
        let base = if g.st.use_master_clock {
            g.st.master_kernel_ns
        } else {
            self.host.kernel_ns_at(self.host.tsc_now())
        };
        g.st.kvmclock_offset_ns = i128::from(clock) - i128::from(base);
        Ok(())
    }

    fn tsc_khz(&self, vcpu: usize) -> Result<u32> {
        let g = lock(&self.inner);
        self.check(&g, vcpu)?;
        Ok(g.st.vcpus[vcpu].tsc_khz)
    }

    fn set_tsc_khz(&self, vcpu: usize, khz: u32) -> Result<()> {
        let cfg = self.host.config();
        let mut g = lock(&self.inner);
        self.check(&g, vcpu)?;
        if khz == 0 {
            return Err(BackendError::InvalidArgument {
                op: "KVM_SET_TSC_KHZ",
                reason: "0 kHz".into(),
            });
        }
        let frac = cfg.caps.tsc_scaling_frac_bits;
        let one = if frac == 0 { 1 } else { 1u64 << frac };
        let within =
            u64::from(khz.abs_diff(cfg.tsc_khz)) * 1_000_000 <= u64::from(cfg.tsc_khz) * 250;
        let ratio = if within {
            one
        } else if cfg.caps.tsc_control && frac != 0 {
            math::tsc_scaling_ratio(khz, cfg.tsc_khz, frac).ok_or_else(|| {
                BackendError::InvalidArgument {
                    op: "KVM_SET_TSC_KHZ",
                    reason: format!("ratio for {khz} kHz overflows"),
                }
            })?
        } else if khz < cfg.tsc_khz {
            return Err(BackendError::Ioctl {
                op: "KVM_SET_TSC_KHZ",
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        } else {
            one // faster without scaling: catch-up mode, runs unscaled here
        };
        g.counters.set_tsc_khz += 1;
        let h = self.host.tsc_now();
        let v = &mut g.st.vcpus[vcpu];
        // Keep the guest TSC continuous across the rate change.
        let now_guest = math::guest_tsc_ticks(h, v.ratio, frac, v.tsc_offset_ticks);
        v.ratio = ratio;
        v.tsc_khz = khz;
        if !cfg.ignore_tsc_writes {
            v.tsc_offset_ticks = math::tsc_offset_for(now_guest, h, ratio, frac);
        }
        Ok(())
    }

    fn tsc_offset(&self, vcpu: usize) -> Result<u64> {
        let cfg = self.host.config();
        if !cfg.caps.tsc_offset_attr {
            return Err(BackendError::Unsupported {
                op: "KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)",
            });
        }
        let g = lock(&self.inner);
        self.check(&g, vcpu)?;
        Ok(if cfg.ignore_tsc_writes {
            0
        } else {
            g.st.vcpus[vcpu].tsc_offset_ticks
        })
    }

    fn set_tsc_offset(&self, vcpu: usize, offset_ticks: u64) -> Result<()> {
        let cfg = self.host.config();
        if !cfg.caps.tsc_offset_attr {
            return Err(BackendError::Unsupported {
                op: "KVM_SET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)",
            });
        }
        let mut g = lock(&self.inner);
        self.check(&g, vcpu)?;
        g.counters.set_tsc_offset += 1;
        if cfg.ignore_tsc_writes {
            // Read-back shows 0: the write was ignored.
            g.tsc_control = if offset_ticks == 0 {
                g.tsc_control
            } else {
                TscControl::Ignored
            };
            return Ok(());
        }
        g.st.vcpus[vcpu].tsc_offset_ticks = offset_ticks;
        // kvm_vcpu_tsc_offset_set → __kvm_synchronize_tsc(..., user_set_tsc = true).
        g.st.user_set_tsc = true;
        g.tsc_control = TscControl::Effective;
        self.request_master_update(&mut g);
        Ok(())
    }

    fn tsc_msr(&self, vcpu: usize) -> Result<u64> {
        self.guest_tsc_now(vcpu)
    }

    fn set_tsc_msr(&self, vcpu: usize, value_ticks: u64) -> Result<()> {
        let cfg = self.host.config();
        let mut g = lock(&self.inner);
        self.check(&g, vcpu)?;
        g.counters.set_tsc_msr += 1;
        if cfg.ignore_tsc_writes {
            let v = &g.st.vcpus[vcpu];
            let now = math::guest_tsc_ticks(
                self.host.tsc_now(),
                v.ratio,
                self.frac(),
                v.tsc_offset_ticks,
            );
            if now != value_ticks {
                g.tsc_control = TscControl::Ignored;
            }
            return Ok(());
        }
        self.synchronize_tsc(&mut g, vcpu, value_ticks, true);
        if g.tsc_control == TscControl::Unknown {
            g.tsc_control = TscControl::Effective;
        }
        Ok(())
    }

    fn tsc_control(&self) -> TscControl {
        lock(&self.inner).tsc_control
    }

    fn kvmclock_ctrl(&self, vcpu: usize) -> Result<()> {
        if !self.host.config().caps.kvmclock_ctrl {
            return Err(BackendError::Unsupported {
                op: "KVM_KVMCLOCK_CTRL",
            });
        }
        let mut g = lock(&self.inner);
        self.check(&g, vcpu)?;
        if !g.st.vcpus[vcpu].kvmclock_enabled {
            return Err(BackendError::KvmclockNotEnabled { vcpu });
        }
        g.counters.kvmclock_ctrl += 1;
        g.st.vcpus[vcpu].stop_pending = true;
        Ok(())
    }
}

impl PvclockPages for ModelVm {
    fn pvclock(&self, vcpu: usize) -> Result<Option<PvclockTimeInfo>> {
        let g = lock(&self.inner);
        self.check(&g, vcpu)?;
        let v = &g.st.vcpus[vcpu];
        if !v.kvmclock_enabled {
            return Ok(None);
        }
        // kvm_guest_time_update: tsc_timestamp = guest TSC at the master cycle,
        // system_time = master_kernel_ns + kvmclock_offset, scale at the guest's rate.
        let (cycle, kernel_ns) = if g.st.use_master_clock {
            (g.st.master_cycle_now, g.st.master_kernel_ns)
        } else {
            let h = self.host.tsc_now();
            (h, self.host.kernel_ns_at(h))
        };
        let ts = math::pvclock_time_scale_for_khz(v.tsc_khz);
        let mut flags = 0;
        if g.st.use_master_clock {
            flags |= PVCLOCK_TSC_STABLE_BIT;
        }
        if v.guest_stopped {
            flags |= PVCLOCK_GUEST_STOPPED;
        }
        Ok(Some(PvclockTimeInfo {
            version: 2,
            tsc_timestamp: math::guest_tsc_ticks(cycle, v.ratio, self.frac(), v.tsc_offset_ticks),
            system_time: (i128::from(kernel_ns) + g.st.kvmclock_offset_ns)
                .clamp(0, i128::from(u64::MAX)) as u64,
            tsc_to_system_mul: ts.mul,
            tsc_shift: ts.shift,
            flags,
        }))
    }
}

impl HostFacts for ModelVm {
    fn host_realtime_ns(&self) -> u64 {
        self.host.realtime_now()
    }

    fn host_tsc_ticks(&self) -> u64 {
        self.host.tsc_now()
    }

    fn host_info(&self) -> Result<HostInfo> {
        let c = self.host.config();
        let mut identity = c.identity.clone();
        identity.host_tsc_khz = c.tsc_khz;
        Ok(HostInfo {
            identity,
            ntp: c.ntp,
        })
    }
}

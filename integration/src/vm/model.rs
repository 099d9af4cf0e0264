//! The model backend for clockvmm: the plugin's `ModelVm` with its time following the real
//! clock (used where /dev/kvm is unusable, or with `--model`).

use guest_clock::backend::model::{HostConfig, ModelHost, ModelTime, ModelVm};
use guest_clock::backend::{
    host, BackendError, Capabilities, ClockData, HostFacts, HostInfo, Hypervisor, PvclockPages,
    PvclockTimeInfo, TscControl,
};

/// The model backend with its time following the real CLOCK_REALTIME, so that several
/// processes on one machine see one consistent model host (same TSC, same wallclock).
pub struct RealTimeModel {
    vm: ModelVm,
}

impl RealTimeModel {
    pub(super) fn new(vcpus: usize) -> Self {
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
    pub(super) fn sync(&self) -> &ModelVm {
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

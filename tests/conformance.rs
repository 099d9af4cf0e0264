//! The model is checked against real KVM: the same scripted scenarios run on the model backend
//! and on this machine's /dev/kvm, and must give the same *observable* results.
//!
//! Each scenario returns a small comparable value (flags, "stepped back or not", "the write
//! took effect or was matched", ...), never a timing. The model is configured as the KVM it is
//! compared with: the real backend's capabilities, and `ignore_tsc_writes` on kvm_pvm, whose
//! known deviation (TSC offset and MSR writes accepted and ignored) is declared here rather than
//! hidden. Where a scenario disagrees, the model is what gets fixed.
//!
//! Without /dev/kvm the KVM half is skipped with the reason printed, and the model half still
//! runs against the expectations written down for a real KVM.

mod common;

use std::time::Duration;

use common::{test_vm, TestVm};
use guest_clock::backend::model::{HostConfig, ModelHost, ModelTime, ModelVm};
use guest_clock::backend::{
    BackendError, ClockBackend, ClockData, Hypervisor, PvclockPages, PvclockTimeInfo,
    KVM_CLOCK_REALTIME, PVCLOCK_GUEST_STOPPED,
};
use guest_clock::math;

/// One side of the comparison: a fresh VM plus what a test can do to it.
trait World {
    fn backend(&self) -> &dyn ClockBackend;
    /// Every vCPU enters the guest once.
    fn run_all(&self);
    /// The guest (or a restored MSR) enables kvmclock on `vcpu`.
    fn enable_kvmclock(&self, vcpu: usize);
    /// Let `ns` of real time pass.
    fn pass(&self, ns: u64);
    /// The pvclock structure the guest sees on `vcpu`.
    fn pvclock(&self, vcpu: usize) -> Option<PvclockTimeInfo>;
    /// The pvclock flags byte the guest sees on `vcpu`.
    fn pvclock_flags(&self, vcpu: usize) -> u8 {
        self.pvclock(vcpu).map_or(0, |p| p.flags)
    }
}

struct Model {
    time: ModelTime,
    vm: ModelVm,
}

impl World for Model {
    fn backend(&self) -> &dyn ClockBackend {
        &self.vm
    }
    fn run_all(&self) {
        self.vm.run_all();
    }
    fn enable_kvmclock(&self, vcpu: usize) {
        self.vm.guest_enable_kvmclock(vcpu).unwrap();
    }
    fn pass(&self, ns: u64) {
        self.time.advance_ns(ns);
    }
    fn pvclock(&self, vcpu: usize) -> Option<PvclockTimeInfo> {
        PvclockPages::pvclock(&self.vm, vcpu).unwrap()
    }
}

struct Real {
    vm: TestVm,
    backend:
        guest_clock::backend::kvm::KvmBackend<std::sync::Arc<kvm_ioctls::VmFd>, common::Locked>,
}

impl World for Real {
    fn backend(&self) -> &dyn ClockBackend {
        &self.backend
    }
    fn run_all(&self) {
        self.vm.run_all();
    }
    fn enable_kvmclock(&self, vcpu: usize) {
        self.vm.enable_kvmclock(vcpu);
    }
    fn pass(&self, ns: u64) {
        std::thread::sleep(Duration::from_nanos(ns));
    }
    fn pvclock(&self, vcpu: usize) -> Option<PvclockTimeInfo> {
        self.vm.pvclock(vcpu)
    }
}

/// The KVM this machine has, and a model configured like it (same capabilities and host TSC
/// rate; kvm_pvm's ignored TSC writes declared).
struct Pair {
    flavour: &'static str,
    real: Box<dyn Fn(usize) -> Real>,
    model: Box<dyn Fn(usize) -> Model>,
}

fn pair() -> Option<Pair> {
    let probe = test_vm(1)?;
    let b = probe.backend();
    let flavour = b.flavour();
    let caps = b.capabilities();
    let khz = b.host_tsc_khz();
    let pvm = flavour == "kvm_pvm";
    eprintln!("conformance: {flavour}, caps {caps:?}, host {khz} kHz; model: same caps, ignore_tsc_writes {pvm}");
    Some(Pair {
        flavour,
        real: Box::new(|n| {
            let vm = test_vm(n).expect("/dev/kvm went away");
            let backend = vm.backend();
            Real { vm, backend }
        }),
        model: Box::new(move |n| {
            let time = ModelTime::new();
            let mut cfg = HostConfig::new(khz, 7);
            cfg.caps = caps;
            cfg.ignore_tsc_writes = pvm;
            // Start the model's host well after its boot, as a real host is.
            time.advance_ns(3_600_000_000_000);
            let host = ModelHost::new(time.clone(), cfg);
            Model {
                vm: ModelVm::new(host, n),
                time,
            }
        }),
    })
}

/// Run `scenario` on both and assert equal observations.
fn conform<T: PartialEq + std::fmt::Debug>(
    name: &str,
    n: usize,
    scenario: impl Fn(&dyn World) -> T,
) {
    let Some(p) = pair() else {
        eprintln!("SKIP {name}: /dev/kvm not usable here; the model half runs in the model tests");
        return;
    };
    let real = scenario(&(p.real)(n));
    let model = scenario(&(p.model)(n));
    eprintln!("{name} on {}: kvm {real:?}, model {model:?}", p.flavour);
    assert_eq!(model, real, "{name}: the model differs from {}", p.flavour);
}

/// GET_CLOCK flags on a fresh VM and after its vCPUs ran (the master clock starts at the first
/// entry on a TSC host).
#[test]
fn get_clock_flags_before_and_after_a_vcpu_ran() {
    conform("get_clock_flags", 2, |w| {
        let fresh = w.backend().get_clock().unwrap();
        w.run_all();
        let ran = w.backend().get_clock().unwrap();
        (fresh.flags, fresh.realtime_ns == 0, ran.flags)
    });
}

/// KVM_SET_CLOCK with REALTIME adds the realtime that passed since W and never steps back for a
/// W in the future. Observed: the step KVM added, in whole 100 ms units (0 for a future W).
#[test]
fn set_clock_realtime_never_steps_back() {
    conform("set_clock_realtime", 1, |w| {
        w.run_all();
        let b = w.backend();
        if b.capabilities().adjust_clock_flags & KVM_CLOCK_REALTIME == 0 {
            return (None, None);
        }
        let k = 1_000_000_000_000u64;
        let added_in_100ms = |realtime_ns: u64| {
            b.set_clock(&ClockData {
                clock_ns: k,
                flags: KVM_CLOCK_REALTIME,
                realtime_ns,
                host_tsc_ticks: 0,
            })
            .unwrap();
            let got = b.get_clock().unwrap().clock_ns;
            // Signed: a step back would be negative.
            math::diff_signed(got, k).div_euclid(100_000_000)
        };
        let future = added_in_100ms(b.host_realtime_ns() + 10_000_000_000);
        let past = added_in_100ms(b.host_realtime_ns() - 300_000_000);
        (Some(future), Some(past))
    });
}

/// The offset attribute: a written offset reads back and moves the guest TSC (kvm_pvm: reads 0,
/// the guest TSC stays the host's). Observed: (read-back equals the write, guest TSC moved by
/// the offset to within 1 s of ticks).
#[test]
fn tsc_offset_attribute_read_back() {
    conform("tsc_offset_attr", 1, |w| {
        w.run_all();
        let b = w.backend();
        if !b.capabilities().tsc_offset_attr {
            return None;
        }
        let khz = u64::from(b.tsc_khz(0).unwrap());
        let ofs = 1000 * khz * 3600; // one hour of ticks
        b.set_tsc_offset(0, ofs).unwrap();
        let read = b.tsc_offset(0).unwrap();
        let guest = b.tsc_msr(0).unwrap();
        let host = b.host_tsc_ticks();
        let moved = guest.wrapping_sub(host).abs_diff(ofs) < 1000 * khz;
        Some((read == ofs, moved))
    });
}

/// Host writes of MSR_IA32_TSC go through kvm_synchronize_tsc. Observed, in whole seconds of
/// guest TSC relative to where the previous value would have run on to: a first write 0.3 s
/// ahead, a second write 0.5 s beyond the first's trajectory (within ±1 s: matched or not), and
/// a third 5 s beyond (outside the window: always applied).
#[test]
fn msr_tsc_writes_within_and_beyond_one_second() {
    conform("msr_tsc_matching", 1, |w| {
        w.run_all();
        let b = w.backend();
        let khz = u64::from(b.tsc_khz(0).unwrap());
        let s = |x: f64| (x * 1000.0 * khz as f64) as u64;
        // Where the guest TSC is relative to a reference `(value written, host TSC then)`.
        let off_by_ds = |written: u64, host_then: u64| {
            let expect = written.wrapping_add(b.host_tsc_ticks().wrapping_sub(host_then));
            let now = b.tsc_msr(0).unwrap();
            // tenths of a second, rounded
            (math::diff_signed(now, expect) as f64 / (100.0 * khz as f64)).round() as i64
        };
        let g = b.tsc_msr(0).unwrap();
        let a = g.wrapping_add(s(0.3));
        let h = b.host_tsc_ticks();
        b.set_tsc_msr(0, a).unwrap();
        let first = off_by_ds(a, h);
        w.pass(20_000_000);
        let g = b.tsc_msr(0).unwrap();
        let c = g.wrapping_add(s(0.5));
        let h = b.host_tsc_ticks();
        b.set_tsc_msr(0, c).unwrap();
        let second = off_by_ds(c, h);
        let g = b.tsc_msr(0).unwrap();
        let d = g.wrapping_add(s(5.0));
        let h = b.host_tsc_ticks();
        b.set_tsc_msr(0, d).unwrap();
        let third = off_by_ds(d, h);
        (first, second, third)
    });
}

/// KVM_KVMCLOCK_CTRL: EINVAL before the guest enabled kvmclock; after, PVCLOCK_GUEST_STOPPED
/// appears at the vCPU's next entry (not before).
#[test]
fn kvmclock_ctrl_before_and_after_kvmclock_is_enabled() {
    conform("kvmclock_ctrl", 1, |w| {
        let b = w.backend();
        if !b.capabilities().kvmclock_ctrl {
            return None;
        }
        w.run_all();
        let before = matches!(
            b.kvmclock_ctrl(0),
            Err(BackendError::KvmclockNotEnabled { vcpu: 0 })
        );
        w.enable_kvmclock(0);
        w.run_all();
        let enabled_flags = w.pvclock_flags(0) & PVCLOCK_GUEST_STOPPED;
        b.kvmclock_ctrl(0).unwrap();
        let before_entry = w.pvclock_flags(0) & PVCLOCK_GUEST_STOPPED;
        w.run_all();
        let after_entry = w.pvclock_flags(0) & PVCLOCK_GUEST_STOPPED;
        Some((before, enabled_flags, before_entry, after_entry))
    });
}

/// The pvclock page the guest reads agrees with KVM_GET_CLOCK: the guest's formula at the
/// guest TSC read just before GET_CLOCK gives kvmclock within 1 ms (a correctness bound, not a
/// timing: the two reads are microseconds apart), and the page has the TSC-stable bit.
#[test]
fn pvclock_page_agrees_with_get_clock() {
    conform("pvclock_vs_get_clock", 2, |w| {
        for v in 0..2 {
            w.enable_kvmclock(v);
        }
        w.run_all();
        w.pass(10_000_000);
        w.run_all();
        let b = w.backend();
        let mut out = Vec::new();
        for v in 0..2 {
            let p = w.pvclock(v).expect("pvclock written at entry");
            let tsc = b.tsc_msr(v).unwrap();
            let k = b.get_clock().unwrap().clock_ns;
            let guest = math::pvclock_eval_ns(&p, tsc);
            let agrees = (i128::from(k) - guest).unsigned_abs() < 1_000_000;
            out.push((agrees, p.flags & 1));
        }
        out
    });
}

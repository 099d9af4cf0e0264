//! The model backend's behaviours, each pinned to the kernel function it models
//! (arch/x86/kvm/x86.c).

use guest_clock::backend::model::{HostConfig, ModelHost, ModelTime, ModelVm};
use guest_clock::backend::{
    BackendError, ClockData, HostFacts, Hypervisor, PvclockPages, TscControl, KVM_CLOCK_HOST_TSC,
    KVM_CLOCK_REALTIME, PVCLOCK_GUEST_STOPPED,
};

const KHZ: u32 = 2_445_404;

fn vm(cfg: impl FnOnce(&mut HostConfig), vcpus: usize) -> (ModelTime, ModelVm) {
    let time = ModelTime::new();
    let mut c = HostConfig::new(KHZ, 1);
    cfg(&mut c);
    let host = ModelHost::new(time.clone(), c);
    time.advance_ns(10_000_000_000);
    (time, ModelVm::new(host, vcpus))
}

#[test]
fn get_clock_flags_need_a_run_vcpu() {
    // kvm_vm_ioctl_get_clock / get_kvmclock: REALTIME|HOST_TSC only with the master clock.
    let (_t, vm) = vm(|_| {}, 2);
    let d = vm.get_clock().unwrap();
    assert_eq!(d.flags, 0);
    assert_eq!(d.realtime_ns, 0);
    vm.run_all();
    let d = vm.get_clock().unwrap();
    assert_eq!(d.flags, 0xe);
    assert_ne!(d.realtime_ns, 0);
    assert_eq!(d.host_tsc_ticks, vm.host().tsc_now());
}

#[test]
fn no_master_clock_without_tsc_clocksource() {
    // pvclock_update_vm_gtod_copy: use_master_clock needs a TSC-based host clocksource.
    let (_t, vm) = vm(|c| c.tsc_clocksource = false, 1);
    vm.run_all();
    assert_eq!(vm.get_clock().unwrap().flags & KVM_CLOCK_REALTIME, 0);
}

#[test]
fn set_clock_plain_and_kvmclock_runs_at_1ns_per_ns() {
    let (t, vm) = vm(|_| {}, 1);
    vm.run_all();
    vm.set_clock(&ClockData {
        clock_ns: 5_000_000_000,
        ..Default::default()
    })
    .unwrap();
    assert!(vm.get_clock().unwrap().clock_ns.abs_diff(5_000_000_000) <= 1);
    t.advance_ns(1_000_000_000);
    let k = vm.get_clock().unwrap().clock_ns;
    assert!(k.abs_diff(6_000_000_000) <= 2, "{k}");
}

#[test]
fn set_clock_realtime_never_steps_back_and_lands_ahead_by_the_gap() {
    // kvm_vm_ioctl_set_clock: if (now_real_ns > data.realtime) data.clock += now - realtime.
    let (t, vm) = vm(|c| c.realtime_read_gap_ns = 500, 1);
    vm.run_all();
    let w = vm.host_realtime_ns();
    t.advance_ns(200_000_000);
    vm.set_clock(&ClockData {
        clock_ns: 1_000,
        flags: KVM_CLOCK_REALTIME,
        realtime_ns: w,
        host_tsc_ticks: 0,
    })
    .unwrap();
    let k = vm.get_clock().unwrap().clock_ns as i64;
    assert!((k - (1_000 + 200_000_000 + 500)).abs() <= 1, "{k}");
    // W in the future: no step back, clock set as given.
    let future = vm.host_realtime_ns() + 5_000_000_000;
    vm.set_clock(&ClockData {
        clock_ns: 7_000,
        flags: KVM_CLOCK_REALTIME,
        realtime_ns: future,
        host_tsc_ticks: 0,
    })
    .unwrap();
    assert!(vm.get_clock().unwrap().clock_ns.abs_diff(7_000) <= 1);
}

#[test]
fn set_clock_rejects_unknown_flags_and_realtime_on_old_kernels() {
    let (_t, vm) = vm(|c| c.caps.adjust_clock_flags = 2, 1);
    let e = vm
        .set_clock(&ClockData {
            clock_ns: 1,
            flags: KVM_CLOCK_REALTIME,
            realtime_ns: 1,
            host_tsc_ticks: 0,
        })
        .unwrap_err();
    assert!(
        matches!(
            e,
            BackendError::Ioctl {
                op: "KVM_SET_CLOCK",
                ..
            }
        ),
        "{e}"
    );
    assert!(vm
        .set_clock(&ClockData {
            clock_ns: 1,
            flags: 0x100,
            ..Default::default()
        })
        .is_err());
}

#[test]
fn msr_write_within_one_second_is_matched() {
    // kvm_synchronize_tsc: the first non-zero user write is taken as written (Linux 6.7+,
    // user_set_tsc); later writes within ±1 s of the expected value take the generation's offset.
    let (t, vm) = vm(|_| {}, 2);
    let gen0 = vm.state().cur_tsc_generation;
    t.advance_ns(100_000_000);
    let now = vm.guest_tsc_now(0).unwrap();
    let first = now + 500_000; // 0.2 ms ahead, but the first write by userspace
    vm.set_tsc_msr(0, first).unwrap();
    assert_eq!(
        vm.guest_tsc_now(0).unwrap(),
        first,
        "first user write applied"
    );
    assert_eq!(vm.state().cur_tsc_generation, gen0 + 1);
    t.advance_ns(1_000_000);
    let now = vm.guest_tsc_now(0).unwrap();
    vm.set_tsc_msr(1, now + 500_000).unwrap(); // 0.2 ms ahead: "synchronising"
    assert_eq!(
        vm.guest_tsc_now(1).unwrap(),
        now,
        "the write was replaced by the generation's offset"
    );
    assert_eq!(vm.state().cur_tsc_generation, gen0 + 1);
    // 2 s ahead: taken as written, new generation.
    let want = now + 2 * u64::from(KHZ) * 1000;
    vm.set_tsc_msr(1, want).unwrap();
    assert_eq!(vm.guest_tsc_now(1).unwrap(), want);
    assert_eq!(vm.state().cur_tsc_generation, gen0 + 2);
}

#[test]
fn offset_attribute_is_exact() {
    // kvm_vcpu_tsc_offset_set
    let (_t, vm) = vm(|_| {}, 1);
    vm.set_tsc_offset(0, 123_456_789).unwrap();
    assert_eq!(vm.tsc_offset(0).unwrap(), 123_456_789);
    assert_eq!(
        vm.guest_tsc_now(0).unwrap(),
        vm.host().tsc_now() + 123_456_789
    );
    assert_eq!(vm.tsc_control(), TscControl::Effective);
}

#[test]
fn pvm_ignores_tsc_writes() {
    let (_t, vm) = vm(|c| c.ignore_tsc_writes = true, 2);
    assert_eq!(
        vm.guest_tsc_now(0).unwrap(),
        vm.host().tsc_now(),
        "guest TSC == host TSC"
    );
    vm.set_tsc_offset(0, 1_000_000).unwrap();
    vm.set_tsc_msr(1, 42).unwrap();
    assert_eq!(vm.tsc_offset(0).unwrap(), 0);
    assert_eq!(vm.guest_tsc_now(1).unwrap(), vm.host().tsc_now());
    assert_eq!(vm.tsc_control(), TscControl::Ignored);
}

#[test]
fn kvmclock_ctrl_needs_kvmclock_and_shows_at_next_entry() {
    let (_t, vm) = vm(|_| {}, 1);
    assert!(matches!(
        vm.kvmclock_ctrl(0),
        Err(BackendError::KvmclockNotEnabled { vcpu: 0 })
    ));
    assert_eq!(vm.pvclock(0).unwrap(), None);
    vm.guest_enable_kvmclock(0).unwrap();
    vm.run_all();
    vm.kvmclock_ctrl(0).unwrap();
    assert_eq!(
        vm.pvclock(0).unwrap().unwrap().flags & PVCLOCK_GUEST_STOPPED,
        0,
        "not before entry"
    );
    vm.run_vcpu(0).unwrap();
    assert_ne!(
        vm.pvclock(0).unwrap().unwrap().flags & PVCLOCK_GUEST_STOPPED,
        0
    );
    vm.guest_clear_stopped(0).unwrap();
    assert_eq!(
        vm.pvclock(0).unwrap().unwrap().flags & PVCLOCK_GUEST_STOPPED,
        0
    );
}

#[test]
fn guest_pvclock_read_agrees_with_get_clock() {
    for scaled_khz in [KHZ, 1_000_000, 3_000_000] {
        let (t, vm) = vm(|_| {}, 1);
        vm.set_tsc_khz(0, scaled_khz).unwrap();
        vm.guest_enable_kvmclock(0).unwrap();
        vm.run_all();
        t.advance_ns(123_456_789);
        let g = vm.guest_kvmclock_now(0).unwrap().unwrap();
        let k = vm.get_clock().unwrap().clock_ns;
        assert!(
            g.abs_diff(k) <= 2,
            "{scaled_khz} kHz: guest {g} vs GET_CLOCK {k}"
        );
    }
}

#[test]
fn tsc_scaling_intel_and_amd() {
    for frac in [48u8, 32] {
        let (t, vm) = vm(|c| c.caps.tsc_scaling_frac_bits = frac, 1);
        vm.set_tsc_khz(0, 1_000_000).unwrap();
        let a = vm.guest_tsc_now(0).unwrap();
        t.advance_ns(1_000_000_000);
        let b = vm.guest_tsc_now(0).unwrap();
        assert!(
            (b - a).abs_diff(1_000_000_000) <= 2,
            "frac {frac}: {}",
            b - a
        );
    }
    // Slower than the host without scaling: EINVAL.
    let (_t, vm) = vm(|c| c.caps.tsc_control = false, 1);
    assert!(vm.set_tsc_khz(0, KHZ / 2).is_err());
    assert!(vm.set_tsc_khz(0, KHZ + 100).is_ok(), "within 250 ppm");
}

#[test]
fn deterministic() {
    let run = || {
        let (t, vm) = vm(|_| {}, 2);
        vm.run_all();
        t.advance_ns(777);
        vm.set_tsc_msr(0, 5_000_000_000).unwrap();
        t.advance_ns(1_000_001);
        (
            vm.get_clock().unwrap(),
            vm.guest_tsc_now(0).unwrap(),
            vm.state(),
        )
    };
    assert_eq!(run(), run());
}

#[test]
fn realtime_flag_and_host_tsc_flag_values() {
    let (_t, vm) = vm(|_| {}, 1);
    vm.run_all();
    let d = vm.get_clock().unwrap();
    assert_eq!(
        d.flags & (KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC),
        KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC
    );
    assert_eq!(d.realtime_ns, vm.host_realtime_ns());
}

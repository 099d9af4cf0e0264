//! The KVM backend against this machine's /dev/kvm (skipped, with the reason printed, where it
//! is absent or unusable). Nothing here asserts on time taken.

mod common;

use common::test_vm;
use guest_clock::backend::kvm::KvmBackend;
use guest_clock::backend::{
    BackendError, ClockData, HostFacts, Hypervisor, TscControl, KVM_CLOCK_HOST_TSC,
    KVM_CLOCK_REALTIME, PVCLOCK_GUEST_STOPPED,
};
use guest_clock::restore::{restore, RestoreMode, RestoreOptions};
use kvm_ioctls::{Kvm, VcpuFd};

#[test]
fn capabilities_and_host_info() {
    let Some(t) = test_vm(1) else { return };
    let b = t.backend();
    let caps = b.capabilities();
    eprintln!(
        "flavour {} caps {caps:?} host {} kHz",
        b.flavour(),
        b.host_tsc_khz()
    );
    assert_ne!(caps.adjust_clock_flags, 0, "KVM_CAP_ADJUST_CLOCK");
    assert!(b.host_tsc_khz() > 0);
    let info = b.host_info().unwrap();
    assert_ne!(info.identity.boot_id, [0; 16]);
    assert!(!info.identity.clocksource.is_empty());
    assert!(
        matches!(
            b.tsc_offset(5),
            Err(BackendError::NoSuchVcpu { vcpu: 5, count: 1 })
        ) || !caps.tsc_offset_attr
    );
}

#[test]
fn get_clock_flags_after_vcpus_ran() {
    let Some(t) = test_vm(2) else { return };
    let b = t.backend();
    let fresh = b.get_clock().unwrap();
    eprintln!(
        "fresh VM: flags {:#x} realtime {}",
        fresh.flags, fresh.realtime_ns
    );
    t.run_all();
    let d = b.get_clock().unwrap();
    eprintln!("after run: flags {:#x}", d.flags);
    let both = KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC;
    if b.capabilities().adjust_clock_flags & both == both {
        assert_eq!(d.flags & both, both);
        assert!(d.realtime_ns.abs_diff(b.host_realtime_ns()) < 1_000_000_000);
        assert!(d.host_tsc_ticks <= b.host_tsc_ticks());
    }
}

#[test]
fn set_clock_plain_and_realtime() {
    let Some(t) = test_vm(1) else { return };
    let b = t.backend();
    t.run_all();
    b.set_clock(&ClockData {
        clock_ns: 5_000_000_000,
        ..Default::default()
    })
    .unwrap();
    let k = b.get_clock().unwrap().clock_ns;
    // Correctness bound: the read follows the set by far less than a millisecond.
    assert!((5_000_000_000..5_001_000_000).contains(&k), "{k}");
    if b.capabilities().adjust_clock_flags & KVM_CLOCK_REALTIME == 0 {
        eprintln!("SKIP realtime part: no KVM_CLOCK_REALTIME");
        return;
    }
    let w = b.host_realtime_ns();
    std::thread::sleep(std::time::Duration::from_millis(50));
    b.set_clock(&ClockData {
        clock_ns: 7_000_000_000,
        flags: KVM_CLOCK_REALTIME,
        realtime_ns: w,
        host_tsc_ticks: 0,
    })
    .unwrap();
    let after = b.host_realtime_ns();
    let k = b.get_clock().unwrap().clock_ns;
    // KVM added the realtime that passed since w: never less than the naive value.
    assert!(k >= 7_000_000_000 + 50_000_000, "{k}");
    assert!(k <= 7_000_000_000 + (after - w) + 1_000_000, "{k}");
}

#[test]
fn tsc_offset_write_is_verified_not_trusted() {
    let Some(t) = test_vm(1) else { return };
    let b = t.backend();
    t.run_all();
    assert_eq!(b.tsc_control(), TscControl::Unknown);
    let guest_before = b.tsc_msr(0).unwrap();
    let host_now = b.host_tsc_ticks();
    let want = 1_000_000_000_000u64; // move the guest TSC far from the host's
    if b.capabilities().tsc_offset_attr {
        b.set_tsc_offset(0, want.wrapping_sub(host_now)).unwrap();
    } else {
        b.set_tsc_msr(0, want).unwrap();
    }
    let guest_after = b.tsc_msr(0).unwrap();
    let followed = guest_after.abs_diff(want) < guest_after.abs_diff(b.host_tsc_ticks());
    eprintln!(
        "{}: guest TSC before {guest_before} after {guest_after} (asked ~{want}); detected {:?}",
        b.flavour(),
        b.tsc_control()
    );
    // The detection must agree with what the guest TSC actually did.
    let expected = if followed {
        TscControl::Effective
    } else {
        TscControl::Ignored
    };
    assert_eq!(b.tsc_control(), expected);
    if b.flavour() == "kvm_pvm" {
        assert_eq!(
            b.tsc_control(),
            TscControl::Ignored,
            "kvm_pvm ignores TSC writes"
        );
    }
    assert_eq!(
        b.probe_tsc_control().unwrap(),
        expected,
        "active probe agrees"
    );
}

#[test]
fn kvmclock_ctrl_before_and_after_enable() {
    let Some(t) = test_vm(1) else { return };
    let b = t.backend();
    if !b.capabilities().kvmclock_ctrl {
        eprintln!("SKIP: no KVM_CAP_KVMCLOCK_CTRL");
        return;
    }
    t.run_all();
    assert!(matches!(
        b.kvmclock_ctrl(0),
        Err(BackendError::KvmclockNotEnabled { vcpu: 0 })
    ));
    t.enable_kvmclock(0);
    t.run_once(0);
    let flags0 = t.pvclock_flags(0);
    assert_eq!(flags0 & PVCLOCK_GUEST_STOPPED, 0, "flags {flags0:#x}");
    b.kvmclock_ctrl(0).unwrap();
    t.run_once(0);
    let flags1 = t.pvclock_flags(0);
    eprintln!("pvclock flags {flags0:#x} -> {flags1:#x}");
    assert_ne!(flags1 & PVCLOCK_GUEST_STOPPED, 0);
}

#[test]
fn plugin_live_update_on_real_kvm() {
    let Some(src) = test_vm(2) else { return };
    src.run_all();
    let sb = src.backend();
    let state = guest_clock::capture::capture(&sb, 0).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let dst = test_vm(2).unwrap();
    let db = dst.backend();
    let r = restore(&db, &state, &RestoreOptions::default(), None).unwrap();
    eprintln!("{r:?}");
    assert_eq!(r.mode, RestoreMode::LiveUpdate);
    // The kvmclock of the new VM continues the old one's: compare both VMs now.
    let ks = sb.get_clock().unwrap().clock_ns;
    let kd = db.get_clock().unwrap().clock_ns;
    let ks2 = sb.get_clock().unwrap().clock_ns;
    // kd was read between ks and ks2: a correctness bound of 100 µs either side.
    assert!(kd + 100_000 >= ks && kd <= ks2 + 100_000, "{ks} {kd} {ks2}");
    assert!(r.kvmclock_error_ns.unsigned_abs() < 100_000);
}

/// The borrowed form a VMM with plain fds uses: `KvmBackend::new(&vm, &vcpus)`.
#[test]
fn backend_over_borrowed_fds() {
    let Ok(kvm) = Kvm::new() else {
        eprintln!("SKIP: /dev/kvm not usable here; KVM backend test not run");
        return;
    };
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let vcpus: Vec<VcpuFd> = (0..2).map(|i| vm.create_vcpu(i).unwrap()).collect();
    let b = KvmBackend::new(&vm, &vcpus).expect("backend");
    assert_eq!(b.vcpu_count(), 2);
    assert!(b.tsc_khz(1).unwrap() > 0);
    assert!(matches!(
        b.tsc_khz(2),
        Err(BackendError::NoSuchVcpu { vcpu: 2, count: 2 })
    ));
    assert!(b.host_realtime_ns() > 0);
    assert!(KvmBackend::new(&vm, &[]).is_err(), "no vCPUs");
}

/// The full vmclock structure on real KVM: the time it gives at the guest's TSC (read by MSR)
/// is this host's CLOCK_REALTIME, within the bracket of the reads plus 2 µs.
#[test]
fn vmclock_page_tells_host_realtime() {
    use guest_clock::vmclock::{
        read_vmclock, AtomicVmclockMemory, VmclockConfig, VmclockUpdater,
        VMCLOCK_STATUS_SYNCHRONIZED,
    };
    let Some(t) = test_vm(1) else { return };
    t.run_all();
    let b = t.backend();
    let page = std::sync::Arc::new(AtomicVmclockMemory::new());
    let u = VmclockUpdater::new(page.clone(), VmclockConfig::for_backend(&b));
    u.write_now(&b).unwrap();
    let p = read_vmclock(page.as_ref()).unwrap();
    eprintln!("{}", p.describe());
    let ntp = guest_clock::vmclock::HostTimeStatus::from_kernel().unwrap();
    if ntp.status & guest_clock::vmclock::host::STA_UNSYNC != 0 {
        assert_ne!(p.clock_status, VMCLOCK_STATUS_SYNCHRONIZED, "unsynced host");
    }
    let mut best = u64::MAX;
    for _ in 0..20 {
        let r0 = b.host_realtime_ns();
        let tsc = b.tsc_msr(0).unwrap();
        let r1 = b.host_realtime_ns();
        let got = p.time_at(tsc).expect("a time").as_ns();
        let mid = (u128::from(r0) + u128::from(r1)) / 2;
        let err = got.abs_diff(mid) as u64;
        let bound = (r1 - r0) / 2 + 2_000;
        best = best.min(err.saturating_sub(bound));
    }
    eprintln!("vmclock vs realtime beyond the read bracket: {best} ns");
    assert_eq!(
        best, 0,
        "the page's time is outside the bracket by {best} ns"
    );
}

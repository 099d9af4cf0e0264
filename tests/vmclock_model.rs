//! The full vmclock structure on the model backend (model time is exact): the page's time at
//! the guest's TSC is the host's realtime; across a live migration the destination writes its
//! own relationship and bumps marker and generation; a live update disrupts nothing; the status
//! follows the host's NTP state honestly; the updater rewrites at once when the host changes.

use std::sync::Arc;

use guest_clock::backend::model::{HostConfig, ModelHost, ModelTime, ModelVm};
use guest_clock::backend::Hypervisor;
use guest_clock::restore::{RestoreMode, RestoreOptions};
use guest_clock::signal::VmclockMemory;
use guest_clock::vmclock::host::STA_UNSYNC;
use guest_clock::vmclock::updater::RefreshReason;
use guest_clock::vmclock::{
    read_vmclock, AtomicVmclockMemory, HostTimeSource, Refresh, VmclockAbi, VmclockConfig,
    VmclockUpdater, VMCLOCK_COUNTER_X86_TSC, VMCLOCK_FLAG_TIME_ESTERROR_VALID,
    VMCLOCK_FLAG_TIME_MAXERROR_VALID, VMCLOCK_FLAG_VM_GEN_COUNTER_PRESENT, VMCLOCK_PAGE_SIZE,
    VMCLOCK_STATUS_SYNCHRONIZED, VMCLOCK_STATUS_UNKNOWN, VMCLOCK_STATUS_UNRELIABLE,
    VMCLOCK_TIME_UTC,
};
use guest_clock::ClockManager;
use vm_migration::{Pausable, Snapshottable};

const SRC_KHZ: u32 = 2_445_404;
const DST_KHZ: u32 = 3_000_000;
const SKEW_NS: i64 = 250_000;

fn host(time: &ModelTime, khz: u32, seed: u64, f: impl FnOnce(&mut HostConfig)) -> Arc<ModelHost> {
    let mut c = HostConfig::new(khz, seed);
    f(&mut c);
    ModelHost::new(time.clone(), c)
}

fn running_vm(h: &Arc<ModelHost>, vcpus: usize) -> Arc<ModelVm> {
    let vm = ModelVm::new(h.clone(), vcpus);
    for n in 0..vcpus {
        vm.guest_enable_kvmclock(n).unwrap();
    }
    vm.run_all();
    h.time().advance_ns(3_000_000_000);
    Arc::new(vm)
}

fn dest_vm(h: &Arc<ModelHost>, vcpus: usize) -> Arc<ModelVm> {
    let vm = ModelVm::new(h.clone(), vcpus);
    for n in 0..vcpus {
        vm.guest_enable_kvmclock(n).unwrap();
    }
    Arc::new(vm)
}

/// The guest memory holding the page moves with the guest.
fn copy_page(src: &AtomicVmclockMemory) -> Arc<AtomicVmclockMemory> {
    let dst = AtomicVmclockMemory::new();
    dst.write_bytes(0, &src.bytes()).unwrap();
    Arc::new(dst)
}

/// |page time at the guest's TSC now − the host's realtime now|, ns, on every vCPU.
fn page_error_ns(page: &VmclockAbi, vm: &ModelVm) -> u64 {
    let rt = u128::from(vm.host().realtime_now());
    (0..vm.vcpu_count())
        .map(|n| {
            let t = page
                .time_at(vm.guest_tsc_now(n).unwrap())
                .expect("the page gives a time");
            t.as_ns().abs_diff(rt) as u64
        })
        .max()
        .unwrap()
}

/// An updater over `page` whose host status comes from `host_time`.
fn updater_on(page: &Arc<AtomicVmclockMemory>, host_time: HostTimeSource) -> VmclockUpdater {
    VmclockUpdater::new(
        page.clone(),
        VmclockConfig {
            host_time,
            ..Default::default()
        },
    )
}

/// Why a refresh rewrote the page (None: it did not).
fn reason(r: Refresh) -> Option<RefreshReason> {
    match r {
        Refresh::Unchanged => None,
        Refresh::Rewritten(why, _) => Some(why),
    }
}

fn source_with_page(
    time: &ModelTime,
) -> (
    Arc<ModelHost>,
    Arc<ModelVm>,
    Arc<AtomicVmclockMemory>,
    ClockManager<'static>,
) {
    let a = host(time, SRC_KHZ, 1, |c| c.boot_tsc_ticks = 987_654_321_000);
    let src = running_vm(&a, 2);
    let page = Arc::new(AtomicVmclockMemory::new());
    let m = ClockManager::new(src.clone()).with_vmclock(page.clone());
    (a, src, page, m)
}

#[test]
fn the_page_is_written_whole_and_tells_the_time() {
    let time = ModelTime::new();
    let (_a, src, page, m) = source_with_page(&time);
    let p = read_vmclock(page.as_ref()).unwrap();
    p.check_header().unwrap();
    assert_eq!(p.size, VMCLOCK_PAGE_SIZE);
    assert_eq!(
        (p.counter_id, p.time_type),
        (VMCLOCK_COUNTER_X86_TSC, VMCLOCK_TIME_UTC)
    );
    assert_eq!(
        p.clock_status, VMCLOCK_STATUS_SYNCHRONIZED,
        "model host is synced"
    );
    let want = VMCLOCK_FLAG_VM_GEN_COUNTER_PRESENT
        | VMCLOCK_FLAG_TIME_MAXERROR_VALID
        | VMCLOCK_FLAG_TIME_ESTERROR_VALID;
    assert_eq!(p.flags & want, want);
    // adjtimex maxerror 100 µs, esterror 10 µs, plus 1 ns of rounding.
    assert_eq!(p.time_maxerror_nanosec, 100_001);
    assert_eq!(p.time_esterror_nanosec, 10_000);
    assert!(page_error_ns(&p, &src) <= 1);
    // An hour later the same structure still reads the (exact) model realtime.
    time.advance_ns(3_600_000_000_000);
    assert!(page_error_ns(&p, &src) <= 1, "{}", page_error_ns(&p, &src));
    // And a refresh re-anchors it.
    assert!(matches!(
        m.refresh_vmclock().unwrap().unwrap(),
        Refresh::Rewritten(RefreshReason::PeriodElapsed, _)
    ));
    let p2 = read_vmclock(page.as_ref()).unwrap();
    assert!(p2.seq_count > p.seq_count);
    assert!(page_error_ns(&p2, &src) <= 1);
}

/// Live migration to a host whose wallclock is +250 µs off and whose TSC runs at another rate:
/// the page the guest finds on landing reads the destination's realtime within 1 µs at its
/// TSC, with marker and generation changed and the destination's status.
#[test]
fn live_migration_with_skew_publishes_the_destination_time() {
    let time = ModelTime::new();
    let (_a, src, page, mut m) = source_with_page(&time);
    let before = read_vmclock(page.as_ref()).unwrap();
    m.pause().unwrap();
    let snap = m.snapshot().unwrap();
    time.advance_ns(300_000_000);
    let b = host(&time, DST_KHZ, 2, |c| c.skew_ns = SKEW_NS);
    let dst = dest_vm(&b, 2);
    let dpage = copy_page(&page);
    let mut m2 = ClockManager::new(dst.clone()).with_vmclock(dpage.clone());
    m2.restore_snapshot(&snap).unwrap();
    let rep = m2.last_report().unwrap();
    assert_eq!(rep.mode, RestoreMode::LiveMigration);
    let p = read_vmclock(dpage.as_ref()).unwrap();
    assert_eq!(p.disruption_marker, before.disruption_marker + 1);
    assert_ne!(p.vm_generation_counter, before.vm_generation_counter);
    assert_eq!(p.vm_generation_counter, before.vm_generation_counter + 1);
    assert_eq!(
        p.clock_status, VMCLOCK_STATUS_SYNCHRONIZED,
        "destination synced"
    );
    // The destination's time (skewed), not the source's.
    let err = page_error_ns(&p, &dst);
    assert!(err <= 1_000, "page vs destination realtime: {err} ns");
    let src_rt = u128::from(src.host().realtime_now());
    let t = p.time_at(dst.guest_tsc_now(0).unwrap()).unwrap().as_ns();
    assert!(
        (t as i128 - src_rt as i128 - i128::from(SKEW_NS)).unsigned_abs() <= 1_000,
        "the skew shows against the source's clock"
    );
    // The rate is the destination's scaled guest TSC: still exact 10 s later.
    time.advance_ns(10_000_000_000);
    assert!(page_error_ns(&p, &dst) <= 1_000);
    // Written before the guest runs: nothing of the source's relationship survives.
    assert_ne!(p.counter_period_frac_sec, 0);
}

/// One machine emulating the skewed destination (`inject_wallclock_skew_ns`, as the demos and
/// benchmarks do): the page publishes the same skewed wallclock kvmclock is rebuilt from, not
/// the machine's own, and keeps it through refreshes; a later restore without skew drops it.
#[test]
fn injected_skew_is_published_like_the_kvmclock_rebuild() {
    let time = ModelTime::new();
    let (a, _src, page, mut m) = source_with_page(&time);
    m.pause().unwrap();
    let snap = m.snapshot().unwrap();
    time.advance_ns(300_000_000);
    let dst = dest_vm(&a, 2);
    let dpage = copy_page(&page);
    let mut m2 = ClockManager::new(dst.clone()).with_vmclock(dpage.clone());
    m2.set_restore_options(RestoreOptions {
        mode: Some(RestoreMode::LiveMigration),
        inject_wallclock_skew_ns: SKEW_NS,
        ..RestoreOptions::default()
    });
    m2.restore_snapshot(&snap).unwrap();
    let at = |p: &VmclockAbi| {
        let t = p.time_at(dst.guest_tsc_now(0).unwrap()).unwrap().as_ns() as i128;
        t - i128::from(a.realtime_now())
    };
    let p = read_vmclock(dpage.as_ref()).unwrap();
    assert!(
        (at(&p) - i128::from(SKEW_NS)).unsigned_abs() <= 1,
        "{}",
        at(&p)
    );
    time.advance_ns(2_000_000_000);
    m2.refresh_vmclock().unwrap().unwrap();
    let p = read_vmclock(dpage.as_ref()).unwrap();
    assert!(
        (at(&p) - i128::from(SKEW_NS)).unsigned_abs() <= 1,
        "refreshed: {}",
        at(&p)
    );
    assert_eq!(m2.vmclock_updater().unwrap().wallclock_skew_ns(), SKEW_NS);
    // A live update of that guest with no skew publishes the machine's own time again.
    m2.pause().unwrap();
    let snap2 = m2.snapshot().unwrap();
    let dst2 = dest_vm(&a, 2);
    let dpage2 = copy_page(&dpage);
    let mut m3 = ClockManager::new(dst2.clone()).with_vmclock(dpage2.clone());
    m3.restore_snapshot(&snap2).unwrap();
    let p = read_vmclock(dpage2.as_ref()).unwrap();
    let t = p.time_at(dst2.guest_tsc_now(0).unwrap()).unwrap().as_ns() as i128;
    assert!((t - i128::from(a.realtime_now())).unsigned_abs() <= 1);
}

#[test]
fn unsynchronised_destination_is_never_synchronized() {
    let time = ModelTime::new();
    let (_a, _src, page, mut m) = source_with_page(&time);
    m.pause().unwrap();
    let snap = m.snapshot().unwrap();
    time.advance_ns(200_000_000);
    let b = host(&time, DST_KHZ, 2, |c| {
        c.skew_ns = SKEW_NS;
        c.ntp.status |= STA_UNSYNC;
        c.ntp.maxerror_us = 16_000_000;
    });
    let dst = dest_vm(&b, 2);
    let dpage = copy_page(&page);
    let mut m2 = ClockManager::new(dst.clone()).with_vmclock(dpage.clone());
    m2.restore_snapshot(&snap).unwrap();
    let p = read_vmclock(dpage.as_ref()).unwrap();
    assert_eq!(p.clock_status, VMCLOCK_STATUS_UNKNOWN);
    assert_eq!(p.flags & VMCLOCK_FLAG_TIME_MAXERROR_VALID, 0);
    assert_eq!(p.flags & VMCLOCK_FLAG_TIME_ESTERROR_VALID, 0);
    // Still the destination's relationship: ptp_vmclock reads through UNKNOWN.
    assert!(page_error_ns(&p, &dst) <= 1_000);
}

#[test]
fn live_update_disrupts_nothing_but_rewrites_the_relationship() {
    let time = ModelTime::new();
    let (a, _src, page, mut m) = source_with_page(&time);
    let before = read_vmclock(page.as_ref()).unwrap();
    m.pause().unwrap();
    let snap = m.snapshot().unwrap();
    time.advance_ns(200_000_000);
    let dst = dest_vm(&a, 2);
    let dpage = copy_page(&page);
    let mut m2 = ClockManager::new(dst.clone()).with_vmclock(dpage.clone());
    m2.restore_snapshot(&snap).unwrap();
    let rep = m2.last_report().unwrap();
    assert_eq!(rep.mode, RestoreMode::LiveUpdate);
    assert!(!rep.signalled.any());
    let p = read_vmclock(dpage.as_ref()).unwrap();
    assert_eq!(p.disruption_marker, before.disruption_marker);
    assert_eq!(p.vm_generation_counter, before.vm_generation_counter);
    assert_eq!(p.clock_status, VMCLOCK_STATUS_SYNCHRONIZED);
    assert!(p.seq_count > before.seq_count, "rewritten");
    assert_ne!(p.counter_value, before.counter_value, "a new sample");
    assert!(page_error_ns(&p, &dst) <= 1);
}

#[test]
fn updater_rewrites_at_once_when_the_host_changes() {
    let time = ModelTime::new();
    let a = host(&time, SRC_KHZ, 1, |_| {});
    let vm = running_vm(&a, 2);
    let page = Arc::new(AtomicVmclockMemory::new());
    let u = updater_on(&page, HostTimeSource::Backend);
    let r = |u: &VmclockUpdater| reason(u.refresh(vm.as_ref()).unwrap());
    assert_eq!(r(&u), Some(RefreshReason::First));
    assert_eq!(r(&u), None);
    time.advance_ns(500_000_000);
    assert_eq!(r(&u), None, "fresh for the refresh period");
    a.update(|c| c.ntp.status |= STA_UNSYNC);
    assert_eq!(r(&u), Some(RefreshReason::HostChanged), "at once");
    assert_eq!(
        read_vmclock(page.as_ref()).unwrap().clock_status,
        VMCLOCK_STATUS_UNKNOWN
    );
    time.advance_ns(1_000_000_000);
    assert_eq!(r(&u), Some(RefreshReason::PeriodElapsed));
    // A vCPU whose TSC offset differs: no single relationship fits → UNRELIABLE.
    let off0 = vm.tsc_offset(0).unwrap();
    vm.set_tsc_offset(1, off0.wrapping_add(1_000_000)).unwrap();
    assert_eq!(r(&u), Some(RefreshReason::CounterChanged));
    let p = read_vmclock(page.as_ref()).unwrap();
    assert_eq!(p.clock_status, VMCLOCK_STATUS_UNRELIABLE);
    assert_eq!(p.time_at(vm.guest_tsc_now(0).unwrap()), None);
}

/// `refresh_running` (the timer-thread refresh: no vCPU ioctl) re-anchors the page from one
/// `KVM_GET_CLOCK` with the per-vCPU relationship of the last full sample: it keeps the page
/// exact while time passes, and leaves a change of a vCPU's offset to the next full refresh.
#[test]
fn refresh_running_reuses_the_vcpu_relationship() {
    let time = ModelTime::new();
    let a = host(&time, SRC_KHZ, 1, |_| {});
    let vm = running_vm(&a, 2);
    let page = Arc::new(AtomicVmclockMemory::new());
    let u = updater_on(&page, HostTimeSource::Backend);
    // Nothing sampled yet: it takes a full sample.
    assert_eq!(
        reason(u.refresh_running(vm.as_ref()).unwrap()),
        Some(RefreshReason::First)
    );
    let p1 = read_vmclock(page.as_ref()).unwrap();
    assert_eq!(reason(u.refresh_running(vm.as_ref()).unwrap()), None);
    time.advance_ns(1_500_000_000);
    assert_eq!(
        reason(u.refresh_running(vm.as_ref()).unwrap()),
        Some(RefreshReason::PeriodElapsed)
    );
    let p2 = read_vmclock(page.as_ref()).unwrap();
    assert!(p2.seq_count > p1.seq_count && p2.time_sec > p1.time_sec);
    assert!(page_error_ns(&p2, &vm) <= 1, "{}", page_error_ns(&p2, &vm));
    // A vCPU offset change is invisible to it (no vCPU ioctl), seen by the full refresh.
    let off0 = vm.tsc_offset(0).unwrap();
    vm.set_tsc_offset(1, off0.wrapping_add(1_000_000)).unwrap();
    assert_eq!(reason(u.refresh_running(vm.as_ref()).unwrap()), None);
    assert_eq!(
        reason(u.refresh(vm.as_ref()).unwrap()),
        Some(RefreshReason::CounterChanged)
    );
}

/// A host that knows TAI − UTC (37 s): the UTC page carries it with the sign ptp_vmclock
/// computes with (UTC − TAI = −37), so a Linux 7.x guest's PHC reads TAI = UTC + 37 s and an
/// older one's reads UTC, both at the host's time.
#[test]
fn a_known_tai_offset_gives_the_guest_tai_and_utc() {
    let time = ModelTime::new();
    let a = host(&time, SRC_KHZ, 1, |_| {});
    let vm = running_vm(&a, 2);
    let page = Arc::new(AtomicVmclockMemory::new());
    let mut status = guest_clock::vmclock::HostTimeStatus::from_ntp(&a.config().ntp);
    status.tai_s = 37;
    let u = updater_on(&page, HostTimeSource::Fixed(status));
    u.write_now(vm.as_ref()).unwrap();
    let p = read_vmclock(page.as_ref()).unwrap();
    assert_eq!(p.time_type, VMCLOCK_TIME_UTC);
    assert_eq!(p.tai_offset_sec, -37);
    assert_ne!(
        p.flags & guest_clock::vmclock::VMCLOCK_FLAG_TAI_OFFSET_VALID,
        0
    );
    let tsc = vm.guest_tsc_now(0).unwrap();
    let utc = p.time_at(tsc).unwrap().as_ns();
    let tai = p.tai_at(tsc).unwrap().as_ns();
    assert_eq!(tai - utc, 37_000_000_000);
    assert!(page_error_ns(&p, &vm) <= 1);
    // Unknown to the host: the configured fallback, else no offset at all.
    status.tai_s = 0;
    for (fallback, want) in [(Some(37), Some(-37)), (None, None)] {
        let u = VmclockUpdater::new(
            page.clone(),
            VmclockConfig {
                host_time: HostTimeSource::Fixed(status),
                tai_offset_fallback_s: fallback,
                ..Default::default()
            },
        );
        let p = u.write_now(vm.as_ref()).unwrap();
        let valid = p.flags & guest_clock::vmclock::VMCLOCK_FLAG_TAI_OFFSET_VALID != 0;
        assert_eq!(valid.then_some(p.tai_offset_sec), want);
    }
}

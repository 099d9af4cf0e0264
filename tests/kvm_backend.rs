//! The KVM backend against this machine's /dev/kvm (skipped, with the reason printed, where it
//! is absent or unusable). Nothing here asserts on time taken.

use std::sync::{Arc, Mutex};

use guest_clock::backend::kvm::{KvmBackend, KvmInfo, VcpuFds};
use guest_clock::backend::{
    BackendError, ClockData, HostFacts, Hypervisor, TscControl, KVM_CLOCK_HOST_TSC,
    KVM_CLOCK_REALTIME, PVCLOCK_GUEST_STOPPED,
};
use guest_clock::restore::{restore, RestoreMode, RestoreOptions};
use kvm_bindings::{kvm_msr_entry, kvm_userspace_memory_region, Msrs};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

const MEM_SIZE: usize = 1 << 20;
const CODE_GPA: u64 = 0x1000;
const PVCLOCK_GPA: u64 = 0x2000;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

struct TestVm {
    mem: GuestMemoryMmap,
    vm: Arc<VmFd>,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
}

/// A VM with 1 MiB of memory and `n` real-mode vCPUs looping on `out 0x10, al; jmp $-2`.
fn test_vm(n: usize) -> Option<TestVm> {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("SKIP: /dev/kvm not usable here ({e}); KVM backend test not run");
            return None;
        }
    };
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: the region is backed by `mem`, which lives as long as the VM in TestVm.
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    // out 0x10, al ; jmp back to the out
    mem.write_slice(&[0xe6, 0x10, 0xeb, 0xfc], GuestAddress(CODE_GPA))
        .unwrap();
    let mut vcpus = Vec::new();
    for id in 0..n {
        let v = vm.create_vcpu(id as u64).expect("KVM_CREATE_VCPU");
        let mut sregs = v.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        v.set_sregs(&sregs).unwrap();
        let mut regs = v.get_regs().unwrap();
        regs.rip = CODE_GPA;
        regs.rflags = 2;
        v.set_regs(&regs).unwrap();
        vcpus.push(Arc::new(Mutex::new(v)));
    }
    Some(TestVm {
        mem,
        vm: Arc::new(vm),
        vcpus,
    })
}

/// This test VMM keeps each vCPU fd behind its own mutex (locked around KVM_RUN by its runner);
/// the backend reaches them through `VcpuFds`, one lock for the duration of one ioctl.
struct Locked(Vec<Arc<Mutex<VcpuFd>>>);

impl VcpuFds for Locked {
    fn count(&self) -> usize {
        self.0.len()
    }
    fn with_vcpu<R>(&self, index: usize, f: impl FnOnce(&VcpuFd) -> R) -> Option<R> {
        self.0.get(index).map(|v| f(&v.lock().unwrap()))
    }
}

impl TestVm {
    fn run_once(&self, vcpu: usize) {
        let mut v = self.vcpus[vcpu].lock().unwrap();
        match v.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x10, _) => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
    fn run_all(&self) {
        for n in 0..self.vcpus.len() {
            self.run_once(n);
        }
    }
    fn backend(&self) -> KvmBackend<Arc<VmFd>, Locked> {
        let info = KvmInfo::probe(&self.vm, &self.vcpus[0].lock().unwrap()).expect("probe");
        KvmBackend::with_info(self.vm.clone(), Locked(self.vcpus.clone()), info)
    }
    fn enable_kvmclock(&self, vcpu: usize) {
        let gpa = PVCLOCK_GPA + 32 * vcpu as u64;
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_KVM_SYSTEM_TIME_NEW,
            data: gpa | 1,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(self.vcpus[vcpu].lock().unwrap().set_msrs(&msrs).unwrap(), 1);
    }
    fn pvclock_flags(&self, vcpu: usize) -> u8 {
        let mut b = [0u8; 1];
        self.mem
            .read_slice(&mut b, GuestAddress(PVCLOCK_GPA + 32 * vcpu as u64 + 29))
            .unwrap();
        b[0]
    }
}

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

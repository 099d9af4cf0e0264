//! A minimal real-KVM test VM shared by the KVM test suites: 1 MiB of guest memory and `n`
//! real-mode vCPUs looping on `out 0x10, al; jmp $-2`; kvmclock enabled from the host by writing
//! `MSR_KVM_SYSTEM_TIME_NEW` (as a restored guest's MSRs would be).
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use guest_clock::backend::kvm::{KvmBackend, KvmInfo, VcpuFds};
use guest_clock::backend::PvclockTimeInfo;
use kvm_bindings::{kvm_msr_entry, kvm_userspace_memory_region, Msrs};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

const MEM_SIZE: usize = 1 << 20;
const CODE_GPA: u64 = 0x1000;
const PVCLOCK_GPA: u64 = 0x2000;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

pub struct TestVm {
    pub mem: GuestMemoryMmap,
    pub vm: Arc<VmFd>,
    pub vcpus: Vec<Arc<Mutex<VcpuFd>>>,
}

/// A VM with 1 MiB of memory and `n` real-mode vCPUs looping on `out 0x10, al; jmp $-2`.
pub fn test_vm(n: usize) -> Option<TestVm> {
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

impl TestVm {
    pub fn run_once(&self, vcpu: usize) {
        let mut v = self.vcpus[vcpu].lock().unwrap();
        match v.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x10, _) => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
    pub fn run_all(&self) {
        for n in 0..self.vcpus.len() {
            self.run_once(n);
        }
    }
    pub fn backend(&self) -> KvmBackend<Arc<VmFd>, Locked> {
        let info = KvmInfo::probe(&self.vm, &self.vcpus[0].lock().unwrap()).expect("probe");
        KvmBackend::with_info(self.vm.clone(), Locked(self.vcpus.clone()), info)
    }
    pub fn enable_kvmclock(&self, vcpu: usize) {
        let gpa = PVCLOCK_GPA + 32 * vcpu as u64;
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_KVM_SYSTEM_TIME_NEW,
            data: gpa | 1,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(self.vcpus[vcpu].lock().unwrap().set_msrs(&msrs).unwrap(), 1);
    }
    pub fn pvclock_flags(&self, vcpu: usize) -> u8 {
        let mut b = [0u8; 1];
        self.mem
            .read_slice(&mut b, GuestAddress(PVCLOCK_GPA + 32 * vcpu as u64 + 29))
            .unwrap();
        b[0]
    }
}

/// This test VMM keeps each vCPU fd behind its own mutex (locked around KVM_RUN by its runner);
/// the backend reaches them through `VcpuFds`, one lock for the duration of one ioctl.
pub struct Locked(Vec<Arc<Mutex<VcpuFd>>>);

impl VcpuFds for Locked {
    fn count(&self) -> usize {
        self.0.len()
    }
    fn with_vcpu<R>(&self, index: usize, f: impl FnOnce(&VcpuFd) -> R) -> Option<R> {
        self.0.get(index).map(|v| f(&v.lock().unwrap()))
    }
}

impl TestVm {
    /// The pvclock structure of `vcpu` in this VM's guest memory.
    pub fn pvclock(&self, vcpu: usize) -> Option<PvclockTimeInfo> {
        read_pvclock(&self.mem, vcpu)
    }
}

/// The pvclock structure of vCPU `n` in guest memory, `None` while it is being updated or was
/// never written.
pub fn read_pvclock(mem: &GuestMemoryMmap, n: usize) -> Option<PvclockTimeInfo> {
    let mut b = [0u8; 32];
    mem.read_slice(&mut b, GuestAddress(PVCLOCK_GPA + 32 * n as u64))
        .ok()?;
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    let version = u32_at(0);
    if version == 0 || version % 2 == 1 {
        return None;
    }
    Some(PvclockTimeInfo {
        version,
        tsc_timestamp: u64_at(8),
        system_time: u64_at(16),
        tsc_to_system_mul: u32_at(24),
        tsc_shift: b[28] as i8,
        flags: b[29],
    })
}

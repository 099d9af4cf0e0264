//! Pre-faulting the guest's RAM into KVM's stage-2 (NPT/EPT) tables before the first KVM_RUN:
//! `KVM_PRE_FAULT_MEMORY` (Linux 6.10+, `KVM_CAP_PRE_FAULT_MEMORY`).
//!
//! Why clockvmm does it: under the nested lane (kvm_amd in a QEMU 7.2 TCG guest) 4 of 12 Linux
//! boots deadlocked on CPU 0 — the serial port's interrupt was delivered a second time, with
//! RFLAGS.IF = 0 and before its EOI, inside `handle_edge_irq` (which holds the descriptor's
//! lock: the second delivery spins on it forever). A guest cannot be interrupted with IF = 0,
//! and its LAPIC does not deliver an in-service vector again: the hypervisor stack re-injected
//! an interrupt it had delivered, at some exit taken between the delivery and the EOI. Two of
//! those stalls were at the first instruction of `apic_ack_edge`, where the first fetch of a
//! code page takes a stage-2 fault; with the tables populated up front that exit is gone and 1
//! boot of 30 stalled (the re-injection then came at another exit, in `irq_can_handle_pm`). It
//! costs one ioctl per memory region at creation (the host pages are allocated at once, not on
//! first touch); a VMM engineer may want it anyway: no stage-2 faults on the guest's first
//! touches.

use kvm_bindings::kvm_pre_fault_memory;
use kvm_ioctls::{VcpuFd, VmFd};
use log::{debug, info};
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

/// `KVM_CAP_PRE_FAULT_MEMORY`.
const CAP_PRE_FAULT_MEMORY: u32 = 236;

vmm_sys_util::ioctl_iowr_nr!(
    KVM_PRE_FAULT_MEMORY,
    kvm_bindings::KVMIO,
    0xd5,
    kvm_pre_fault_memory
);

/// What [`prefault`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefault {
    /// Every region's pages are mapped in KVM's stage-2 tables, `bytes` in all.
    Done {
        /// Bytes mapped.
        bytes: u64,
    },
    /// This KVM has no `KVM_CAP_PRE_FAULT_MEMORY` (older than 6.10, or no TDP).
    Unsupported,
}

/// Map all of `mem` through `vcpu` (KVM_PRE_FAULT_MEMORY loops until a range is done: it
/// returns early on a signal, with `gpa`/`size` advanced).
pub fn prefault(vm: &VmFd, vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> Result<Prefault, errno::Error> {
    if vm.check_extension_raw(u64::from(CAP_PRE_FAULT_MEMORY)) <= 0 {
        debug!("KVM_PRE_FAULT_MEMORY not supported: guest RAM faults in on first touch");
        return Ok(Prefault::Unsupported);
    }
    let mut bytes = 0;
    for region in mem.iter() {
        let mut range = kvm_pre_fault_memory {
            gpa: region.start_addr().0,
            size: region.len(),
            ..Default::default()
        };
        while range.size > 0 {
            // SAFETY: the fd is a vCPU; the argument is a kvm_pre_fault_memory the kernel reads
            // and updates (gpa, size) in place, valid for the call.
            let rc = unsafe { ioctl_with_mut_ref(vcpu, KVM_PRE_FAULT_MEMORY(), &mut range) };
            if rc < 0 {
                let e = errno::Error::last();
                if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN {
                    continue;
                }
                return Err(e);
            }
        }
        bytes += region.len();
    }
    info!("guest RAM pre-faulted into KVM's stage-2 tables: {bytes} bytes");
    Ok(Prefault::Done { bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::Kvm;
    use vm_memory::GuestAddress;

    #[test]
    fn prefault_maps_every_region_or_says_unsupported() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("SKIP: no /dev/kvm");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 2 << 20),
            (GuestAddress(4 << 20), 1 << 20),
        ])
        .unwrap();
        for (slot, r) in mem.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region's host memory is `mem`'s mapping, alive past the VM's use.
            unsafe { vm.set_user_memory_region(region) }.unwrap();
        }
        let vcpu = vm.create_vcpu(0).unwrap();
        match prefault(&vm, &vcpu, &mem).unwrap() {
            Prefault::Done { bytes } => assert_eq!(bytes, 3 << 20),
            Prefault::Unsupported => eprintln!("this KVM has no KVM_PRE_FAULT_MEMORY"),
        }
    }
}

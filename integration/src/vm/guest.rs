//! The guest program: the 31-byte real-mode loop of `guest/clockloop.S` (enable kvmclock via
//! `MSR_KVM_SYSTEM_TIME_NEW`, then RDTSC → store in the vCPU's sample slot → OUT), where it and
//! its data live in guest memory, and the vCPU registers that start it.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use super::{kvm_err, VmError};

/// Guest code, assembled from `guest/clockloop.S` (the listing gives each instruction's bytes).
pub const GUEST_CODE: [u8; 31] = [
    0x66, 0xb9, 0x01, 0x4d, 0x56, 0x4b, // mov ecx, 0x4b564d01
    0x66, 0x89, 0xf0, // mov eax, esi
    0x66, 0x31, 0xd2, // xor edx, edx
    0x0f, 0x30, // wrmsr
    0x0f, 0x31, // sample: rdtsc
    0x66, 0x89, 0x07, // mov [bx], eax
    0x66, 0x89, 0x57, 0x04, // mov [bx+4], edx
    0x66, 0xff, 0x47, 0x08, // inc dword [bx+8]
    0xe6, 0x10, // out 0x10, al
    0xeb, 0xef, // jmp sample
];
/// Where the guest code lives.
pub const CODE_GPA: u64 = 0x1000;
/// Sample slots: 16 bytes per vCPU.
pub const SLOTS_GPA: u64 = 0x8000;
/// pvclock areas: 32 bytes per vCPU.
pub const PVCLOCK_GPA: u64 = 0x10000;
/// The vmclock page.
pub const VMCLOCK_GPA: u64 = 0x20000;
/// The I/O port the guest exits on.
pub const EXIT_PORT: u16 = 0x10;
/// `MSR_KVM_SYSTEM_TIME_NEW`.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// The most vCPUs (slots and pvclock areas must stay below the vmclock page).
pub const MAX_VCPUS: usize = 256;

/// Point a new vCPU at the guest program: flat real-mode segments, `rip` at the code, `rsi` =
/// its pvclock area (enable bit set), `rbx` = its sample slot; and the kvmclock MSR set by the
/// host too, like restored vCPU state, so that `KVM_KVMCLOCK_CTRL` works before it first runs.
pub(super) fn setup_vcpu(v: &VcpuFd, id: usize) -> Result<(), VmError> {
    let mut sregs = v.get_sregs().map_err(|e| kvm_err("KVM_GET_SREGS", e))?;
    for seg in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
        seg.base = 0;
        seg.selector = 0;
    }
    v.set_sregs(&sregs)
        .map_err(|e| kvm_err("KVM_SET_SREGS", e))?;
    let mut regs = v.get_regs().map_err(|e| kvm_err("KVM_GET_REGS", e))?;
    let pvclock = PVCLOCK_GPA + 32 * id as u64;
    regs.rip = CODE_GPA;
    regs.rflags = 2;
    regs.rsi = pvclock | 1;
    regs.rbx = SLOTS_GPA + 16 * id as u64;
    v.set_regs(&regs).map_err(|e| kvm_err("KVM_SET_REGS", e))?;
    // Like restored vCPU state, the kvmclock MSR is set by the host too, so that
    // KVM_KVMCLOCK_CTRL works before the vCPU first runs.
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_KVM_SYSTEM_TIME_NEW,
        data: pvclock | 1,
        ..Default::default()
    }])
    .map_err(|e| VmError::Invalid(format!("{e:?}")))?;
    v.set_msrs(&msrs).map_err(|e| kvm_err("KVM_SET_MSRS", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_code_matches_listing() {
        let listing = include_str!("../../guest/clockloop.S");
        let mut bytes = Vec::new();
        for line in listing.lines() {
            let Some((_, comment)) = line.split_once(';') else {
                continue;
            };
            for tok in comment.split_whitespace() {
                if tok.len() == 2
                    && tok.chars().all(|c| c.is_ascii_hexdigit())
                    && tok
                        .chars()
                        .any(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
                {
                    bytes.push(u8::from_str_radix(tok, 16).unwrap());
                } else {
                    break;
                }
            }
        }
        assert_eq!(bytes, GUEST_CODE.to_vec());
    }
}

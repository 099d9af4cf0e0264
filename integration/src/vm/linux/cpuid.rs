//! The CPUID template a Linux guest gets: KVM_GET_SUPPORTED_CPUID trimmed to a qemu64-like set
//! that boots under the nested kvm_amd (no XSAVE/AVX state: a guest given the L1's full XSAVE
//! leaves crashed in `fpstate_reset`), the KVM paravirtual leaves (signature "KVMKVMKVM",
//! KVM_FEATURE_CLOCKSOURCE2 and KVM_FEATURE_CLOCKSOURCE_STABLE_BIT), the TSC-deadline timer
//! where KVM emulates it, and the invariant-TSC bit only when asked for (with it Linux prefers
//! the TSC clocksource to kvm-clock).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::vm::{kvm_err, VmError};

/// KVM's paravirtual CPUID base.
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// KVM's paravirtual feature leaf.
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// KVM_FEATURE_CLOCKSOURCE (kvmclock at the old MSRs).
pub const KVM_FEATURE_CLOCKSOURCE: u32 = 1 << 0;
/// KVM_FEATURE_NOP_IO_DELAY.
pub const KVM_FEATURE_NOP_IO_DELAY: u32 = 1 << 1;
/// KVM_FEATURE_CLOCKSOURCE2 (kvmclock at MSR_KVM_SYSTEM_TIME_NEW).
pub const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
/// KVM_FEATURE_CLOCKSOURCE_STABLE_BIT.
pub const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;

/// Template options.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuidOptions {
    /// vCPUs (topology leaves).
    pub vcpus: usize,
    /// Advertise the invariant TSC (CPUID 0x8000_0007 EDX bit 8).
    pub invariant_tsc: bool,
    /// Advertise the TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER).
    pub tsc_deadline: bool,
}

fn bits_for(n: usize) -> u32 {
    usize::BITS - n.saturating_sub(1).leading_zeros()
}

/// Trim `supported` to the template, the same for every vCPU (see [`for_vcpu`]).
pub fn template(
    supported: &[kvm_cpuid_entry2],
    opt: CpuidOptions,
) -> Result<Vec<kvm_cpuid_entry2>, VmError> {
    let n = opt.vcpus.max(1);
    let mut out = Vec::new();
    for e in supported {
        let mut e = *e;
        match e.function {
            0 => e.eax = e.eax.min(7),
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((n.min(255) as u32) << 16);
                // MONITOR, VMX, FMA, XSAVE, OSXSAVE, AVX, F16C, RDRAND kept? (RDRAND is fine)
                e.ecx &= !((1 << 3)
                    | (1 << 5)
                    | (1 << 12)
                    | (1 << 26)
                    | (1 << 27)
                    | (1 << 28)
                    | (1 << 29));
                e.ecx |= 1 << 31; // hypervisor
                if opt.tsc_deadline {
                    e.ecx |= 1 << 24;
                } else {
                    e.ecx &= !(1 << 24);
                }
                if n > 1 {
                    e.edx |= 1 << 28; // HTT: EBX[23:16] is valid
                }
            }
            2..=6 => {}
            7 => {
                if e.index == 0 {
                    e.eax = 0;
                    // FSGSBASE, SMEP, ERMS, RDSEED, ADX, SMAP, CLFLUSHOPT: no VEX/EVEX state.
                    e.ebx &= (1 << 0)
                        | (1 << 7)
                        | (1 << 9)
                        | (1 << 18)
                        | (1 << 19)
                        | (1 << 20)
                        | (1 << 23);
                    e.ecx = 0;
                    e.edx = 0;
                } else {
                    continue;
                }
            }
            0x8000_0000 => e.eax = e.eax.min(0x8000_0008),
            0x8000_0001 => {
                // SVM, XOP, LWP, FMA4, TBM, TOPOEXT, PERFCTR_CORE/NB, MWAITX.
                e.ecx &= !((1 << 2)
                    | (1 << 11)
                    | (1 << 15)
                    | (1 << 16)
                    | (1 << 21)
                    | (1 << 22)
                    | (1 << 23)
                    | (1 << 24)
                    | (1 << 29));
            }
            0x8000_0002..=0x8000_0006 => {}
            0x8000_0007 => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = if opt.invariant_tsc { 1 << 8 } else { 0 };
            }
            0x8000_0008 => {
                e.ebx = 0;
                e.ecx = (bits_for(n) << 12) | (n.min(256) as u32 - 1);
            }
            _ => continue, // XSAVE (0xd), topology (0xb, 0x1f, 0x8000_001e), SVM, SEV, PT, ...
        }
        out.push(e);
    }
    if !out.iter().any(|e| e.function == 0x8000_0007) {
        out.push(kvm_cpuid_entry2 {
            function: 0x8000_0007,
            edx: if opt.invariant_tsc { 1 << 8 } else { 0 },
            ..Default::default()
        });
    }
    let kvm_features = supported
        .iter()
        .find(|e| e.function == KVM_CPUID_FEATURES)
        .map_or(0, |e| e.eax);
    let wanted = KVM_FEATURE_CLOCKSOURCE
        | KVM_FEATURE_NOP_IO_DELAY
        | KVM_FEATURE_CLOCKSOURCE2
        | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT;
    if kvm_features & KVM_FEATURE_CLOCKSOURCE2 == 0 {
        return Err(VmError::Invalid(
            "this KVM offers no KVM_FEATURE_CLOCKSOURCE2: no kvmclock for a Linux guest".into(),
        ));
    }
    let sig = *b"KVMKVMKVM\0\0\0";
    let word = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
    out.push(kvm_cpuid_entry2 {
        function: KVM_CPUID_SIGNATURE,
        eax: KVM_CPUID_FEATURES,
        ebx: word(0),
        ecx: word(4),
        edx: word(8),
        ..Default::default()
    });
    out.push(kvm_cpuid_entry2 {
        function: KVM_CPUID_FEATURES,
        eax: kvm_features & wanted,
        ..Default::default()
    });
    Ok(out)
}

/// The template with vCPU `id`'s APIC ID filled in.
pub fn for_vcpu(template: &[kvm_cpuid_entry2], id: usize) -> Result<CpuId, VmError> {
    let mut v = template.to_vec();
    for e in &mut v {
        if e.function == 1 {
            e.ebx = (e.ebx & 0x00ff_ffff) | ((id as u32 & 0xff) << 24);
        }
    }
    CpuId::from_entries(&v).map_err(|e| VmError::Invalid(format!("CPUID: {e:?}")))
}

/// The template for this KVM.
pub fn from_kvm(kvm: &Kvm, opt: CpuidOptions) -> Result<Vec<kvm_cpuid_entry2>, VmError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| kvm_err("KVM_GET_SUPPORTED_CPUID", e))?;
    template(supported.as_slice(), opt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn supported() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0, 0x10, 1, 2, 3),
            leaf(1, 0x800f12, 0x0800, 0xfffa_3203, 0x178b_fbff),
            leaf(7, 1, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff),
            leaf(0xd, 7, 0x340, 0x340, 0),
            leaf(0xb, 1, 1, 0x100, 0),
            leaf(0x4000_0000, 0x4000_0001, 0, 0, 0),
            leaf(0x4000_0001, 0x0100_7efb, 0, 0, 0),
            leaf(0x8000_0000, 0x8000_0021, 0, 0, 0),
            leaf(0x8000_0001, 0, 0, 0xffff_ffff, 0x2fd3_fbff),
            leaf(0x8000_0007, 0, 0, 0, 0x100),
            leaf(0x8000_0008, 0x3030, 0xffff, 0, 0),
            leaf(0x8000_000a, 1, 0x8000, 0, 0xffff),
        ]
    }

    fn get(t: &[kvm_cpuid_entry2], f: u32) -> Option<kvm_cpuid_entry2> {
        t.iter().find(|e| e.function == f).copied()
    }

    #[test]
    fn template_exposes_the_kvm_pv_clock_and_hides_xsave() {
        let t = template(
            &supported(),
            CpuidOptions {
                vcpus: 2,
                invariant_tsc: false,
                tsc_deadline: true,
            },
        )
        .unwrap();
        let sig = get(&t, KVM_CPUID_SIGNATURE).unwrap();
        let mut s = Vec::new();
        for w in [sig.ebx, sig.ecx, sig.edx] {
            s.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(&s[..9], b"KVMKVMKVM");
        let f = get(&t, KVM_CPUID_FEATURES).unwrap().eax;
        assert_ne!(f & KVM_FEATURE_CLOCKSOURCE2, 0);
        assert_ne!(f & KVM_FEATURE_CLOCKSOURCE_STABLE_BIT, 0);
        assert_eq!(f & (1 << 4), 0, "no async PF");
        let l1 = get(&t, 1).unwrap();
        assert_eq!(l1.ecx & (1 << 26), 0, "no XSAVE");
        assert_eq!(l1.ecx & (1 << 28), 0, "no AVX");
        assert_ne!(l1.ecx & (1 << 24), 0, "TSC deadline");
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor");
        assert!(get(&t, 0xd).is_none());
        assert!(get(&t, 0xb).is_none());
        assert!(get(&t, 0x8000_000a).is_none());
        assert_eq!(get(&t, 0x8000_0007).unwrap().edx, 0, "invariant TSC off");
        assert_eq!(get(&t, 0x8000_0000).unwrap().eax, 0x8000_0008);
        assert_eq!(get(&t, 0x8000_0001).unwrap().ecx & (1 << 2), 0, "no SVM");
        let v1 = for_vcpu(&t, 1).unwrap();
        let l1 = v1.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ebx >> 24, 1);
        assert_eq!((l1.ebx >> 16) & 0xff, 2);
    }

    #[test]
    fn invariant_tsc_is_an_option_and_clocksource2_is_required() {
        let t = template(
            &supported(),
            CpuidOptions {
                vcpus: 1,
                invariant_tsc: true,
                tsc_deadline: false,
            },
        )
        .unwrap();
        assert_eq!(get(&t, 0x8000_0007).unwrap().edx, 1 << 8);
        assert_eq!(get(&t, 1).unwrap().ecx & (1 << 24), 0);
        let mut s = supported();
        s.retain(|e| e.function != KVM_CPUID_FEATURES);
        assert!(template(&s, CpuidOptions::default()).is_err());
    }
}

//! The ordering contract a VMM follows when it restores a guest's vCPU MSRs around the
//! guest-clock plugin (issue 11, item 3). **Status:** the contract and its classification are
//! implemented and tested here; capturing and restoring the whole Linux VM state (regs, sregs,
//! XSAVE, XCRs, debug regs, LAPIC, MSRs, events, MP state, PIC/IOAPIC, PIT, serial) as
//! CH-shaped snapshot sections is not done yet.
//!
//! The contract, for a restore of one vCPU's MSRs (the list from `KVM_GET_MSR_INDEX_LIST`):
//!
//! 1. [`MsrPhase::BeforeClock`]: every MSR not named below — restored with the rest of the
//!    vCPU state, *before* the plugin's `ClockManager::restore`.
//! 2. [`MsrPhase::LeftToPlugin`]: `MSR_IA32_TSC` (0x10) and `MSR_IA32_TSC_ADJUST` (0x3b) are
//!    never written by the VMM: a host write of IA32_TSC goes through KVM's ±1 s "matching"
//!    heuristic and TSC_ADJUST writes move the offset; the plugin sets each vCPU's TSC through
//!    `KVM_VCPU_TSC_OFFSET` (or the MSR where that attribute is absent) exactly once.
//! 3. [`MsrPhase::AfterClock`]: `MSR_IA32_TSC_DEADLINE` (0x6e0) and the kvmclock MSRs
//!    (`MSR_KVM_SYSTEM_TIME{,_NEW}`, `MSR_KVM_WALL_CLOCK{,_NEW}`) are written *after* the plugin
//!    restored the clocks. KVM stores a TSC deadline as a guest TSC value and arms the host timer
//!    from the *current* offset: written before the offset is final, the guest's timer fires
//!    early or late by the offset change. Writing the kvmclock MSRs makes KVM (re)publish the
//!    pvclock page from the current kvmclock: before `KVM_SET_CLOCK` it publishes the fresh VM's
//!    clock, and the guest could read that page once before the restored one.

/// `MSR_IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `MSR_IA32_TSC_ADJUST`.
pub const MSR_IA32_TSC_ADJUST: u32 = 0x3b;
/// `MSR_IA32_TSC_DEADLINE`.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// `MSR_KVM_WALL_CLOCK`.
pub const MSR_KVM_WALL_CLOCK: u32 = 0x11;
/// `MSR_KVM_SYSTEM_TIME`.
pub const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
/// `MSR_KVM_WALL_CLOCK_NEW`.
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// `MSR_KVM_SYSTEM_TIME_NEW`.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// When a VMM restores an MSR relative to the plugin's clock restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MsrPhase {
    /// With the rest of the vCPU state, before the clocks.
    BeforeClock,
    /// Never by the VMM: the plugin owns it.
    LeftToPlugin,
    /// After the plugin restored the clocks.
    AfterClock,
}

/// The phase of MSR `index`.
pub fn msr_phase(index: u32) -> MsrPhase {
    match index {
        MSR_IA32_TSC | MSR_IA32_TSC_ADJUST => MsrPhase::LeftToPlugin,
        MSR_IA32_TSC_DEADLINE
        | MSR_KVM_WALL_CLOCK
        | MSR_KVM_SYSTEM_TIME
        | MSR_KVM_WALL_CLOCK_NEW
        | MSR_KVM_SYSTEM_TIME_NEW => MsrPhase::AfterClock,
        _ => MsrPhase::BeforeClock,
    }
}

/// Saved MSRs: `(index, value)`.
pub type MsrList = Vec<(u32, u64)>;

/// Split saved `(index, value)` MSRs into what the VMM writes before the clock restore and
/// after it; the plugin's MSRs are dropped.
pub fn split_for_restore(msrs: &[(u32, u64)]) -> (MsrList, MsrList) {
    let mut before = Vec::new();
    let mut after = Vec::new();
    for &(i, v) in msrs {
        match msr_phase(i) {
            MsrPhase::BeforeClock => before.push((i, v)),
            MsrPhase::AfterClock => after.push((i, v)),
            MsrPhase::LeftToPlugin => {}
        }
    }
    // Within the late phase the kvmclock MSRs go before the deadline, so that a deadline that
    // fires at once already sees the restored kvmclock.
    after.sort_by_key(|&(i, _)| i == MSR_IA32_TSC_DEADLINE);
    (before, after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ordering_contract() {
        let saved = [
            (0x1a0, 1),                        // IA32_MISC_ENABLE
            (MSR_IA32_TSC, 123),               // plugin
            (MSR_IA32_TSC_DEADLINE, 999),      // after
            (0xc000_0080, 0x500),              // EFER
            (MSR_KVM_SYSTEM_TIME_NEW, 0x1001), // after
            (MSR_IA32_TSC_ADJUST, 5),          // plugin
            (MSR_KVM_WALL_CLOCK_NEW, 0x2000),  // after
        ];
        let (before, after) = split_for_restore(&saved);
        assert_eq!(before, vec![(0x1a0, 1), (0xc000_0080, 0x500)]);
        assert_eq!(
            after,
            vec![
                (MSR_KVM_SYSTEM_TIME_NEW, 0x1001),
                (MSR_KVM_WALL_CLOCK_NEW, 0x2000),
                (MSR_IA32_TSC_DEADLINE, 999)
            ]
        );
        assert!(!before
            .iter()
            .chain(&after)
            .any(|(i, _)| *i == MSR_IA32_TSC || *i == MSR_IA32_TSC_ADJUST));
        assert_eq!(msr_phase(MSR_KVM_SYSTEM_TIME), MsrPhase::AfterClock);
        assert_eq!(msr_phase(MSR_KVM_WALL_CLOCK), MsrPhase::AfterClock);
    }
}

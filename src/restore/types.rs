//! Restore's public types: mode, options, report, errors.

use serde::{Deserialize, Serialize};

use crate::backend::BackendError;
use crate::math::TscDiscontinuity;
use crate::signal::Signalled;

/// How the receiver restores the clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreMode {
    /// Same host, same continuous host TSC (VMM restarted or kexec'd): restore the identical
    /// kvmclock function and TSC offsets; nothing is signalled to the guest.
    LiveUpdate,
    /// Another host (or a host TSC that did not continue): kvmclock from (K, W) and the
    /// destination wallclock, each TSC from (Tₙ, Kₙ); the guest is told it is out of NTP sync.
    LiveMigration,
}

impl std::fmt::Display for RestoreMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RestoreMode::LiveUpdate => "live-update",
            RestoreMode::LiveMigration => "live-migration",
        })
    }
}

/// What a restore does when the section names another VM than the one restored
/// ([`RestoreOptions::expected_vm_id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmIdMismatch {
    /// Refuse, naming the field `vm_id`; the VM is untouched. Default.
    #[default]
    Refuse,
    /// Restore as a live migration (kvmclock from (K, W) and the destination wallclock), with
    /// the guest signalled: the section's clocks are another VM's, never an exact continuation.
    RestoreAsMigration,
}

/// Knobs of a restore. `Default` is what a VMM wants in production. These are the receiver's
/// policy: a VMM takes them from its own configuration, never from the sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RestoreOptions {
    /// Force a mode instead of deciding from host identity and TSC continuity.
    pub mode: Option<RestoreMode>,
    /// A capture whose W lies more than this far in the destination's future is refused
    /// (the clocks disagree absurdly). Default 60 s.
    pub max_future_ns: u64,
    /// A capture older than this is refused. Default 365 days.
    pub max_age_ns: u64,
    /// Host TSC continuity tolerance for the live-update decision: the TSC delta converted to ns
    /// must agree with the realtime delta within `max(continuity_floor_ns, elapsed · ppm / 1e6)`.
    pub continuity_tolerance_ppm: u64,
    /// See `continuity_tolerance_ppm`. Default 1 ms.
    pub continuity_floor_ns: u64,
    /// Measure kvmclock right after setting it and correct KVM's landing error (its bias) with
    /// further `KVM_SET_CLOCK`s. Default true.
    pub correct_residual: bool,
    /// A residual at or below this is good enough: the correction stops at the first round
    /// within it, ns. Default 20.
    pub residual_target_ns: u64,
    /// Correction rounds after the first set, at most (a count, never a time: the result must
    /// not depend on the machine's speed). Default 8.
    pub max_correction_rounds: u32,
    /// Pretend the destination's wallclock is this far ahead of the source's (ns; negative:
    /// behind). For demos, tests and benchmarks on one machine; 0 in production. A
    /// [`ClockManager`](crate::ClockManager) with a vmclock page publishes the same skewed
    /// wallclock there.
    pub inject_wallclock_skew_ns: i64,
    /// Signal the guest even on an exact live update. Default false.
    pub always_signal: bool,
    /// The identity of the VM being restored, where the VMM knows it: a section naming another
    /// VM is handled by `on_vm_id_mismatch`; a section naming none (v1/v2, or a VMM without
    /// identities) is restored with a warning. `None`: not checked. Default `None`.
    pub expected_vm_id: Option<[u8; 16]>,
    /// See `expected_vm_id`. Default [`VmIdMismatch::Refuse`].
    pub on_vm_id_mismatch: VmIdMismatch,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            mode: None,
            max_future_ns: 60_000_000_000,
            max_age_ns: 365 * 24 * 3600 * 1_000_000_000,
            continuity_tolerance_ppm: 1000,
            continuity_floor_ns: 1_000_000,
            correct_residual: true,
            residual_target_ns: 20,
            max_correction_rounds: 8,
            inject_wallclock_skew_ns: 0,
            always_signal: false,
            expected_vm_id: None,
            on_vm_id_mismatch: VmIdMismatch::Refuse,
        }
    }
}

/// What a restore did and how well it went, read back from the hypervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// The mode used.
    pub mode: RestoreMode,
    /// Whether the mode was decided automatically (false: forced by the caller).
    pub mode_auto: bool,
    /// Why this mode.
    pub mode_reason: ModeReason,
    /// kvmclock read back minus the kvmclock the preserved relationship asks for, ns.
    pub kvmclock_error_ns: i64,
    /// Largest |guest TSC − expected guest TSC| over the vCPUs, read back, guest ticks (signed:
    /// the value of the vCPU with the largest magnitude).
    pub tsc_error_ticks: i64,
    /// Largest difference between vCPUs' guest TSCs that were equal before, ticks.
    pub vcpu_skew_ticks: u64,
    /// How far the restored clock may be from true time beyond the residual, ns: capture
    /// uncertainty, plus both hosts' NTP maxerror on a migration. `u64::MAX` when unknown.
    pub uncertainty_ns: u64,
    /// `KVM_SET_CLOCK` calls made (1 + correction rounds).
    pub set_clock_calls: u32,
    /// Correction rounds used after the first `KVM_SET_CLOCK`.
    pub correction_rounds: u32,
    /// `KVM_SET_CLOCK`'s landing bias as estimated over the rounds (the lower median of the
    /// observed biases), ns; positive: the kernel lands kvmclock ahead of what was asked.
    pub set_clock_bias_ns: i64,
    /// What was signalled to the guest.
    pub signalled: Signalled,
    /// Things the caller should know (TSC writes ignored, clamped clock, fallbacks used...).
    pub warnings: Vec<RestoreWarning>,
}

/// Why a restore used its mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum ModeReason {
    /// `RestoreOptions::mode` forced it.
    Forced,
    /// The destination is another machine (machine-id differs): live migration.
    DifferentMachine,
    /// Same machine and its host TSC continued since the capture (a VMM restart, or a kexec):
    /// live update.
    HostTscContinuous,
    /// Same machine, but its host TSC did not continue (reboot, stepped clock): live migration.
    HostTscDiscontinuous {
        /// What was seen.
        why: TscDiscontinuity,
    },
    /// The section belongs to another VM (`vm_id` differs) and the caller asked for such a
    /// section to be restored as a signalled live migration rather than refused.
    ForeignVm,
}

impl std::fmt::Display for ModeReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModeReason::Forced => f.write_str("forced by the caller"),
            ModeReason::DifferentMachine => f.write_str("different machine"),
            ModeReason::HostTscContinuous => f.write_str("same machine, host TSC continuous"),
            ModeReason::HostTscDiscontinuous { why } => write!(f, "same machine but {why}"),
            ModeReason::ForeignVm => f.write_str("the section belongs to another VM"),
        }
    }
}

/// Something a VMM should know about a restore that succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum RestoreWarning {
    /// Live migration: the destination's wallclock was behind the capture's W; kvmclock resumes
    /// at K instead of stepping back.
    #[error(
        "destination wallclock is {behind_ns} ns behind the capture: kvmclock resumes at K \
         instead of stepping back"
    )]
    WallclockClamped {
        /// How far behind, ns.
        behind_ns: u64,
    },
    /// The hypervisor accepts TSC offset/MSR writes and ignores them (kvm_pvm): the guest TSC
    /// follows the host TSC.
    #[error(
        "{backend}: TSC offset/MSR writes are ignored by this hypervisor; the guest TSC follows \
         the host TSC"
    )]
    TscWritesIgnored {
        /// The backend's name.
        backend: String,
    },
    /// `KVM_GET_CLOCK` on the destination lacks REALTIME|HOST_TSC: the read-back was bracketed
    /// by userspace reads.
    #[error(
        "KVM_GET_CLOCK lacks REALTIME|HOST_TSC on the destination: read-back bracketed \
         ±{half_width_ns} ns"
    )]
    BracketedReadBack {
        /// Half-width of the bracket, ns.
        half_width_ns: u64,
    },
    /// The source captured with a userspace bracket (an old kernel).
    #[error("the source captured with a userspace bracket (old kernel), ±{uncertainty_ns} ns")]
    SourceBracketed {
        /// The capture's uncertainty, ns.
        uncertainty_ns: u64,
    },
    /// The correction used every round without reaching its target.
    #[error(
        "kvmclock residual {residual_ns} ns after {rounds} correction rounds (target \
         {target_ns} ns)"
    )]
    CorrectionExhausted {
        /// The residual left, ns.
        residual_ns: i64,
        /// Rounds used.
        rounds: u32,
        /// The target, ns.
        target_ns: u64,
    },
    /// A live update whose kvmclock residual exceeds the exactness threshold; the guest was
    /// signalled as after a migration.
    #[error(
        "live update not exact: kvmclock residual {residual_ns} ns > {threshold_ns} ns; guest \
         signalled"
    )]
    LiveUpdateNotExact {
        /// The residual, ns.
        residual_ns: i64,
        /// [`super::LIVE_UPDATE_EXACT_NS`].
        threshold_ns: u64,
    },
    /// The section's `vm_id` is not the VM's being restored; restored as a live migration with
    /// the guest signalled (`VmIdMismatch::RestoreAsMigration`).
    #[error(
        "the section belongs to VM {vm_id}, not to this VM: restored as a live migration, guest \
         signalled"
    )]
    ForeignVmSection {
        /// The section's VM identity, hex.
        vm_id: String,
    },
    /// The caller named the VM but the section (v1/v2) carries no identity: not checked.
    #[error("the section names no VM (v1/v2 section): its VM identity was not checked")]
    VmIdUnchecked,
}

/// Why a restore was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Validation against the destination failed; the VM was not touched.
    #[error("restore refused, VM untouched: {field}: {reason}")]
    Refused {
        /// The section field or destination property at fault.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A hypervisor operation failed after the VM was modified.
    #[error("restore failed: {0}")]
    Backend(#[from] BackendError),
}

impl RestoreError {
    pub(crate) fn refused(field: &'static str, reason: impl Into<String>) -> Self {
        RestoreError::Refused {
            field,
            reason: reason.into(),
        }
    }
}

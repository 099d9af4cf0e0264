//! Restore's public types: mode, options, report, errors.

use serde::{Deserialize, Serialize};

use crate::backend::BackendError;
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
    /// Measure kvmclock right after setting it and correct KVM's landing error with further
    /// `KVM_SET_CLOCK`s while that improves the result. Default true.
    pub correct_residual: bool,
    /// A residual at or below this is good enough, ns. Default 20.
    pub residual_target_ns: u64,
    /// Correction rounds after the first set, at most. Default 3.
    pub max_correction_rounds: u32,
    /// Pretend the destination's wallclock is this far ahead of the source's (ns; negative:
    /// behind). For demos, tests and benchmarks on one machine; 0 in production.
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
            max_correction_rounds: 3,
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
    /// `KVM_SET_CLOCK` calls made (1 + corrections).
    pub set_clock_calls: u32,
    /// What was signalled to the guest.
    pub signalled: Signalled,
    /// Things the caller should know (TSC writes ignored, clamped clock, fallbacks used...).
    pub warnings: Vec<String>,
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
    /// The plan could not be computed.
    #[error("restore plan: {0}")]
    Plan(String),
}

impl RestoreError {
    pub(crate) fn refused(field: &'static str, reason: impl Into<String>) -> Self {
        RestoreError::Refused {
            field,
            reason: reason.into(),
        }
    }
}

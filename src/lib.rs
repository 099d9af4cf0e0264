//! guest-clock: keep a KVM guest's clocks (kvmclock and every vCPU's TSC) preserved across live
//! update and live migration.
//!
//! Clocks advance themselves; a VMM never "advances" them, it *restores* the relationships that
//! held before: on a live update the identical kvmclock function and TSC offsets, on a live
//! migration "kvmclock was K at wallclock W" and "vCPU n's TSC was Tₙ at kvmclock Kₙ".

#![warn(missing_docs)]

pub mod backend;
pub mod math;

pub use guest_clock_format as format;
pub mod capture;
pub mod manager;
pub mod restore;
pub mod signal;
pub mod vmclock;

pub use manager::{clock_state_from_snapshot, ClockManager, CLOCK_SNAPSHOT_ID};

/// The README's Rust blocks, compiled as doc tests ("Use it in a VMM" must build).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

//! `guest-clock-format`: the versioned clock section of a VMM's migration stream.
//!
//! (Being written: framing, encode/decode, errors; see SPEC.md.)

mod state;
pub use state::*;

/// The largest vCPU count a section may carry.
pub const MAX_VCPUS: usize = 4096;

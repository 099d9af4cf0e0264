//! The VM identity check: a section belongs to one VM (`ClockState::vm_id`, format v3), and a
//! VMM that knows which VM it restores says so in `RestoreOptions::expected_vm_id`.

use guest_clock_format::ClockState;

use super::RestoreOptions;

/// Whether the section names a VM and it is not the one the caller expects. A section that
/// names no VM (all zeros: v1/v2, or a VMM without identities) is not a mismatch: it cannot be
/// checked, and restore warns instead.
pub(crate) fn vm_id_mismatch(state: &ClockState, opts: &RestoreOptions) -> bool {
    match opts.expected_vm_id {
        Some(want) => state.has_vm_id() && state.vm_id != want,
        None => false,
    }
}

/// A VM id as a UUID string (8-4-4-4-12 hex digits).
pub fn hex(id: &[u8; 16]) -> String {
    let h: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatch_rules() {
        let mut s = ClockState::default();
        let mut o = RestoreOptions::default();
        assert!(!vm_id_mismatch(&s, &o), "nothing expected");
        o.expected_vm_id = Some([1; 16]);
        assert!(!vm_id_mismatch(&s, &o), "the section names no VM");
        s.vm_id = [1; 16];
        assert!(!vm_id_mismatch(&s, &o));
        s.vm_id = [2; 16];
        assert!(vm_id_mismatch(&s, &o));
        assert_eq!(hex(&[0xab; 16]), "abababab-abab-abab-abab-abababababab");
    }
}

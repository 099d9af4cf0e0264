//! clockvmm's typed errors and the HTTP status each maps to.
//!
//! | variant | status | meaning |
//! |---|---|---|
//! | [`VmmError::BadRequest`] | 400 | the caller's input is wrong (body, URL, a snapshot or migration stream that does not decode or is refused) |
//! | [`VmmError::NoVm`] | 404 | the operation needs a VM and there is none |
//! | [`VmmError::WrongState`] | 409 | the VMM is in the wrong state (a VM already exists, a migration is in progress...) |
//! | [`VmmError::Failed`] | 500 | the hypervisor, the host or the migration peer failed |

use std::fmt;

/// A VMM error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmmError {
    /// The caller's input is wrong.
    #[error("{0}")]
    BadRequest(String),
    /// No VM exists.
    #[error("no VM")]
    NoVm,
    /// The VMM is in the wrong state for the operation.
    #[error("{0}")]
    WrongState(String),
    /// The hypervisor, the host or the migration peer failed.
    #[error("{0}")]
    Failed(String),
}

impl VmmError {
    /// The HTTP status of this error.
    pub fn status(&self) -> u16 {
        match self {
            VmmError::BadRequest(_) => 400,
            VmmError::NoVm => 404,
            VmmError::WrongState(_) => 409,
            VmmError::Failed(_) => 500,
        }
    }

    /// A 400.
    pub fn bad(msg: impl fmt::Display) -> Self {
        VmmError::BadRequest(msg.to_string())
    }

    /// A 409.
    pub fn state(msg: impl fmt::Display) -> Self {
        VmmError::WrongState(msg.to_string())
    }

    /// A 500.
    pub fn failed(msg: impl fmt::Display) -> Self {
        VmmError::Failed(msg.to_string())
    }
}

impl From<crate::vm::VmError> for VmmError {
    fn from(e: crate::vm::VmError) -> Self {
        match e {
            crate::vm::VmError::Invalid(m) => VmmError::BadRequest(m),
            other => VmmError::Failed(other.to_string()),
        }
    }
}

/// A VMM result.
pub type VmmResult<T> = Result<T, VmmError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(VmmError::bad("x").status(), 400);
        assert_eq!(VmmError::NoVm.status(), 404);
        assert_eq!(VmmError::state("x").status(), 409);
        assert_eq!(VmmError::failed("x").status(), 500);
    }
}

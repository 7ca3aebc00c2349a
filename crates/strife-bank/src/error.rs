//! The bank's errors, and their one mapping to gRPC statuses.

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum BankError {
    /// The caller sent something malformed; the message is for a person.
    #[error("{0}")]
    Invalid(String),
    /// No account of that name (only for reads; prepare votes no instead).
    #[error("no account '{0}' at this bank")]
    UnknownAccount(String),
    /// A 2PC message that contradicts a decided outcome (commit after
    /// abort, or the reverse). It changes nothing.
    #[error("{0}")]
    Conflict(String),
    /// Too much work queued; the caller may retry.
    #[error("{0}")]
    Busy(String),
    #[error("storage: {0}")]
    Storage(#[from] rusqlite::Error),
    #[error("internal: {0}")]
    Internal(String),
}

impl From<BankError> for Status {
    fn from(e: BankError) -> Status {
        match e {
            BankError::Invalid(m) => Status::invalid_argument(m),
            BankError::UnknownAccount(u) => Status::not_found(format!("no account '{u}' at this bank")),
            BankError::Conflict(m) => Status::failed_precondition(m),
            BankError::Busy(m) => Status::resource_exhausted(m),
            BankError::Storage(err) => {
                tracing::error!(error = %err, "storage failure");
                Status::internal("internal error")
            }
            BankError::Internal(err) => {
                tracing::error!(error = %err, "internal failure");
                Status::internal("internal error")
            }
        }
    }
}

//! The bank's errors, and their one mapping to gRPC statuses (with the rich
//! error details of [`strife_rpc::errors`]).

use strife_proto::gateway::v1::ErrorReason;
use strife_rpc::errors;
use strife_rpc::storage::{self, StorageCause, StorageFailure};
use tonic::{Code, Status};

/// UNAVAILABLE (`STORAGE_UNAVAILABLE`) for a ledger failure the machine
/// caused, naming the bank (`who`) and the cause. At prepare the gateway
/// counts it as a no vote; a decision it keeps re-sending until it lands.
fn storage_unavailable(who: &str, failure: &StorageFailure) -> Status {
    errors::status(
        Code::Unavailable,
        ErrorReason::StorageUnavailable,
        format!("{who} cannot write its ledger: {}", failure.cause),
    )
}

#[derive(Debug, thiserror::Error)]
pub enum BankError {
    /// The caller sent something malformed in `field`; the message is for a
    /// person. Nothing changed.
    #[error("{message}")]
    Invalid { field: &'static str, message: String },
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
    /// A statement of the SQLite ledger failed.
    #[error("storage: {0}")]
    Storage(#[from] rusqlite::Error),
    /// The ledger's batch could not commit (a full disk, an I/O error):
    /// nothing of it was kept. Already reported by the ledger's thread.
    #[error("bank {bank}: storage: {failure}")]
    StoreFailed { bank: String, failure: StorageFailure },
    /// The PostgreSQL backend's database failed (or refused a statement).
    #[error("database: {}", with_cause(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("internal: {0}")]
    Internal(String),
}

/// A database error with what the server said (tokio-postgres keeps that
/// in the error's source).
fn with_cause(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// A connection from the pool: none free in time means busy.
impl From<deadpool_postgres::PoolError> for BankError {
    fn from(e: deadpool_postgres::PoolError) -> BankError {
        match e {
            deadpool_postgres::PoolError::Timeout(_) => {
                BankError::Busy("every database connection is busy; try again shortly".into())
            }
            deadpool_postgres::PoolError::Backend(e) => BankError::Postgres(e),
            other => BankError::Internal(format!("database connection pool: {other}")),
        }
    }
}

impl BankError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> BankError {
        BankError::Invalid { field, message: message.into() }
    }
}

impl From<BankError> for Status {
    fn from(e: BankError) -> Status {
        match e {
            BankError::Invalid { field, message } => errors::invalid(field, message),
            BankError::UnknownAccount(u) => errors::status(
                Code::NotFound,
                ErrorReason::AccountNotFound,
                format!("no account '{u}' at this bank"),
            ),
            BankError::Conflict(m) => {
                errors::status(Code::FailedPrecondition, ErrorReason::DecisionConflict, m)
            }
            BankError::Busy(m) => errors::status(Code::ResourceExhausted, ErrorReason::Overloaded, m),
            BankError::Storage(err) if StorageCause::of(&err).is_environment() => {
                let failure = StorageFailure::sqlite(&err, None);
                storage::report("bank", &failure);
                storage_unavailable("the bank", &failure)
            }
            BankError::Storage(err) => {
                tracing::error!(error = %err, "storage failure");
                errors::internal()
            }
            BankError::StoreFailed { bank, failure } if failure.cause.is_environment() => {
                storage_unavailable(&format!("bank {bank}"), &failure)
            }
            BankError::StoreFailed { bank, failure } => {
                tracing::error!(%bank, error = %failure, "storage failure");
                errors::internal()
            }
            BankError::Postgres(err) if StorageCause::of_postgres(&err).is_environment() => {
                let failure = StorageFailure::postgres(&err);
                storage::report("bank", &failure);
                storage_unavailable("the bank", &failure)
            }
            BankError::Postgres(err) => {
                tracing::error!(error = %with_cause(&err), "database failure");
                errors::internal()
            }
            BankError::Internal(err) => {
                tracing::error!(error = %err, "internal failure");
                errors::internal()
            }
        }
    }
}

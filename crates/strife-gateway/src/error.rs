//! The gateway's errors, and their one mapping to gRPC statuses with the
//! rich error details of [`strife_rpc::errors`] (the proto's `ErrorReason`).

use std::time::Duration;
use strife_proto::gateway::v1::ErrorReason;
use strife_rpc::errors;
use strife_rpc::storage::{self, StorageCause, StorageFailure};
use tonic::{Code, Status};

/// How the gateway names itself in what it answers about its store.
const STORE_OWNER: &str = "gateway";

/// UNAVAILABLE (`STORAGE_UNAVAILABLE`) for a store failure the machine
/// caused: the client keeps the payment queued and sends it again later
/// with the same id (nothing of the failed batch was kept).
fn storage_unavailable(failure: &StorageFailure) -> Status {
    errors::status(
        Code::Unavailable,
        ErrorReason::StorageUnavailable,
        format!("the gateway cannot write its store: {}", failure.cause),
    )
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Malformed input in `field` (a request field path, like
    /// `payee.bank`); the message is for a person. Nothing changed.
    #[error("{message}")]
    Invalid { field: &'static str, message: String },
    /// The caller is not (or no longer) logged in.
    #[error("{message}")]
    Unauthenticated { reason: ErrorReason, message: String },
    /// The caller's certificate may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// What the caller named does not exist (a bank, an account, a payment).
    #[error("{message}")]
    NotFound { reason: ErrorReason, message: String },
    /// The payment id was used before for a different payment; `fields`
    /// are the request fields that differ.
    #[error("{message}")]
    IdReused { payment_id: String, fields: Vec<&'static str>, message: String },
    /// Too many failed logins; the caller may try again after `retry_after`.
    #[error("{message}")]
    Throttled { retry_after: Duration, message: String },
    /// A bounded queue or table is full; the caller may retry shortly.
    #[error("{0}")]
    Overloaded(String),
    /// Another live instance holds what the caller asked for.
    #[error("{0}")]
    AlreadyExists(String),
    /// The calling bank uses the gateways of another cluster.
    #[error("{0}")]
    OtherCluster(String),
    /// Someone we depend on (a bank) or we ourselves cannot serve right now.
    #[error("{message}")]
    Unavailable { reason: ErrorReason, message: String },
    /// A statement of the SQLite store failed.
    #[error("storage: {0}")]
    Storage(#[from] rusqlite::Error),
    /// The store's batch could not commit (a full disk, an I/O error):
    /// nothing of it was kept. Already reported by the store's thread.
    #[error("storage: {0}")]
    StoreFailed(StorageFailure),
    /// The PostgreSQL store's database failed (or refused a statement).
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

/// Whether a database error says the server is out of reach (the
/// connection broke or could not be made, or the server is shutting down
/// or starting): the caller may try another gateway, which may reach it.
/// Every write of a payment is idempotent per payment id, so a retry
/// elsewhere finds what this one wrote.
fn database_unreachable(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    if e.is_closed() || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()) {
        return true;
    }
    e.code().is_some_and(|c| {
        c.code().starts_with("08")
            || *c == SqlState::ADMIN_SHUTDOWN
            || *c == SqlState::CRASH_SHUTDOWN
            || *c == SqlState::CANNOT_CONNECT_NOW
    })
}

/// A connection from the pool: none free in time means overloaded.
impl From<deadpool_postgres::PoolError> for GatewayError {
    fn from(e: deadpool_postgres::PoolError) -> GatewayError {
        match e {
            deadpool_postgres::PoolError::Timeout(_) => {
                GatewayError::Overloaded("every database connection is busy; try again shortly".into())
            }
            deadpool_postgres::PoolError::Backend(e) => GatewayError::Postgres(e),
            other => GatewayError::Internal(format!("database connection pool: {other}")),
        }
    }
}

impl GatewayError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> GatewayError {
        GatewayError::Invalid { field, message: message.into() }
    }

    pub fn unauthenticated(reason: ErrorReason, message: impl Into<String>) -> GatewayError {
        GatewayError::Unauthenticated { reason, message: message.into() }
    }

    pub fn not_found(reason: ErrorReason, message: impl Into<String>) -> GatewayError {
        GatewayError::NotFound { reason, message: message.into() }
    }

    pub fn unavailable(reason: ErrorReason, message: impl Into<String>) -> GatewayError {
        GatewayError::Unavailable { reason, message: message.into() }
    }

    /// No bank of that name is connected.
    pub fn unknown_bank(bank: &str) -> GatewayError {
        GatewayError::not_found(
            ErrorReason::UnknownBank,
            format!("no bank named {bank} is connected to this gateway"),
        )
    }
}

impl GatewayError {
    /// What each item of a failed batch is answered (the batch's error is
    /// one, and not `Clone`): the same status the error itself maps to.
    pub fn for_each(&self) -> GatewayError {
        match self {
            GatewayError::Postgres(err) if database_unreachable(err) => {
                GatewayError::unavailable(ErrorReason::Unavailable, DATABASE_UNREACHABLE)
            }
            // Reported once here, for the batch; each caller is answered
            // as a failed SQLite batch's are.
            GatewayError::Postgres(err) if StorageCause::of_postgres(err).is_environment() => {
                let failure = StorageFailure::postgres(err);
                storage::report(STORE_OWNER, &failure);
                GatewayError::StoreFailed(failure)
            }
            GatewayError::StoreFailed(failure) => GatewayError::StoreFailed(failure.clone()),
            GatewayError::Overloaded(m) => GatewayError::Overloaded(m.clone()),
            GatewayError::Unavailable { reason, message } => {
                GatewayError::Unavailable { reason: *reason, message: message.clone() }
            }
            GatewayError::Postgres(err) => GatewayError::Internal(format!("database: {}", with_cause(err))),
            other => GatewayError::Internal(other.to_string()),
        }
    }
}

/// What a caller is told when this gateway cannot reach its database.
const DATABASE_UNREACHABLE: &str =
    "this gateway cannot reach its database right now; try again (another gateway may answer)";

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Status {
        match e {
            GatewayError::Invalid { field, message } => errors::invalid(field, message),
            GatewayError::Unauthenticated { reason, message } => {
                errors::status(Code::Unauthenticated, reason, message)
            }
            GatewayError::PermissionDenied(m) => {
                errors::status(Code::PermissionDenied, ErrorReason::WrongCertificate, m)
            }
            GatewayError::NotFound { reason, message } => errors::status(Code::NotFound, reason, message),
            GatewayError::IdReused { payment_id, fields, message } => {
                errors::id_reused(&payment_id, &fields, message)
            }
            GatewayError::Throttled { retry_after, message } => errors::throttled(retry_after, message),
            GatewayError::Overloaded(m) => {
                errors::status(Code::ResourceExhausted, ErrorReason::Overloaded, m)
            }
            GatewayError::AlreadyExists(m) => {
                errors::status(Code::AlreadyExists, ErrorReason::BankAlreadyRegistered, m)
            }
            GatewayError::OtherCluster(m) => {
                errors::status(Code::FailedPrecondition, ErrorReason::OtherCluster, m)
            }
            GatewayError::Unavailable { reason, message } => {
                errors::status(Code::Unavailable, reason, message)
            }
            GatewayError::Storage(err) if StorageCause::of(&err).is_environment() => {
                let failure = StorageFailure::sqlite(&err, None);
                storage::report(STORE_OWNER, &failure);
                storage_unavailable(&failure)
            }
            GatewayError::Storage(err) => {
                tracing::error!(error = %err, "storage failure");
                errors::internal()
            }
            GatewayError::StoreFailed(failure) if failure.cause.is_environment() => {
                storage_unavailable(&failure)
            }
            GatewayError::StoreFailed(failure) => {
                tracing::error!(error = %failure, "storage failure");
                errors::internal()
            }
            GatewayError::Postgres(err) if database_unreachable(&err) => {
                tracing::warn!(error = %with_cause(&err), "the database is unreachable");
                errors::status(Code::Unavailable, ErrorReason::Unavailable, DATABASE_UNREACHABLE)
            }
            GatewayError::Postgres(err) if StorageCause::of_postgres(&err).is_environment() => {
                let failure = StorageFailure::postgres(&err);
                storage::report(STORE_OWNER, &failure);
                storage_unavailable(&failure)
            }
            GatewayError::Postgres(err) => {
                tracing::error!(error = %with_cause(&err), "database failure");
                errors::internal()
            }
            GatewayError::Internal(err) => {
                tracing::error!(error = %err, "internal failure");
                errors::internal()
            }
        }
    }
}

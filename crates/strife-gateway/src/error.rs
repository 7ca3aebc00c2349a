//! The gateway's errors, and their one mapping to gRPC statuses.

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Malformed input; the message is for a person. Nothing changed.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    /// The payment id was used before for a different payment.
    #[error("{0}")]
    IdReused(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("storage: {0}")]
    Storage(#[from] rusqlite::Error),
    #[error("internal: {0}")]
    Internal(String),
}

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Status {
        match e {
            GatewayError::Invalid(m) => Status::invalid_argument(m),
            GatewayError::Unauthenticated(m) => Status::unauthenticated(m),
            GatewayError::PermissionDenied(m) => Status::permission_denied(m),
            GatewayError::NotFound(m) => Status::not_found(m),
            GatewayError::IdReused(m) => Status::failed_precondition(m),
            GatewayError::Unavailable(m) => Status::unavailable(m),
            GatewayError::Storage(err) => {
                tracing::error!(error = %err, "storage failure");
                Status::internal("internal error")
            }
            GatewayError::Internal(err) => {
                tracing::error!(error = %err, "internal failure");
                Status::internal("internal error")
            }
        }
    }
}

impl From<strife_core::AmountError> for GatewayError {
    fn from(e: strife_core::AmountError) -> GatewayError {
        GatewayError::Invalid(e.to_string())
    }
}

impl From<strife_core::NameError> for GatewayError {
    fn from(e: strife_core::NameError) -> GatewayError {
        GatewayError::Invalid(e.to_string())
    }
}

//! The contract's exit codes, and what a command hands back to `main`.

use serde_json::{Value, json};
use strife_rpc::errors;

/// The contract's exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Done = 0,
    Unexpected = 1,
    Usage = 2,
    Declined = 3,
    Queued = 4,
    NotAllowed = 5,
    Invalid = 6,
    IdReused = 7,
}

impl Exit {
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The snake_case name used in JSON error objects.
    pub fn name(self) -> &'static str {
        match self {
            Exit::Done => "done",
            Exit::Unexpected => "unexpected_error",
            Exit::Usage => "usage_error",
            Exit::Declined => "declined",
            Exit::Queued => "queued",
            Exit::NotAllowed => "not_authenticated",
            Exit::Invalid => "invalid_input",
            Exit::IdReused => "payment_id_reused",
        }
    }
}

/// A command's answer: a JSON object for `--json`, text for people, and
/// the exit code.
#[derive(Debug, Clone)]
pub struct Reply {
    pub exit: Exit,
    pub json: Value,
    pub text: String,
}

impl Reply {
    pub fn done(json: Value, text: impl Into<String>) -> Reply {
        Reply { exit: Exit::Done, json, text: text.into() }
    }
}

/// A command that failed: an exit code and a message for a person.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub exit: Exit,
    pub message: String,
    /// The gateway's `ErrorInfo` reason, when the error came from it.
    pub reason: Option<&'static str>,
    /// The fields a reused payment id differs in.
    pub fields: Vec<String>,
}

impl CliError {
    pub fn new(exit: Exit, message: impl Into<String>) -> CliError {
        CliError { exit, message: message.into(), reason: None, fields: Vec::new() }
    }

    pub fn unexpected(e: impl std::fmt::Display) -> CliError {
        CliError::new(Exit::Unexpected, e.to_string())
    }

    /// Maps a gateway status to the contract's exit code, reading its
    /// error details: the `ErrorInfo` reason where it decides, the fields a
    /// reused id differs in, how long a throttled login must wait.
    pub fn from_status(status: &tonic::Status) -> CliError {
        use strife_proto::gateway::v1::ErrorReason;
        use tonic::Code;
        let reason = errors::reason_of(status);
        if let Some(alert) = strife_rpc::tls::refused_by_server() {
            return CliError::new(
                Exit::NotAllowed,
                format!(
                    "the gateway refused this client's certificate ({alert}): if it was revoked, \
                     get a new one with `strife certs issue --client client`"
                ),
            );
        }
        let exit = match (reason, status.code()) {
            (Some(ErrorReason::PaymentIdReused), _) => Exit::IdReused,
            (Some(ErrorReason::InvalidRequest | ErrorReason::UnknownBank), _) => Exit::Invalid,
            (
                Some(
                    ErrorReason::TokenMissing
                    | ErrorReason::TokenInvalid
                    | ErrorReason::TokenExpired
                    | ErrorReason::TokenRevoked
                    | ErrorReason::WrongCredentials
                    | ErrorReason::WrongCertificate
                    | ErrorReason::LoginThrottled,
                ),
                _,
            ) => Exit::NotAllowed,
            (_, Code::InvalidArgument | Code::NotFound | Code::OutOfRange) => Exit::Invalid,
            (_, Code::Unauthenticated | Code::PermissionDenied | Code::ResourceExhausted) => Exit::NotAllowed,
            (_, Code::FailedPrecondition) => Exit::IdReused,
            _ => Exit::Unexpected,
        };
        let fields = errors::differing_fields(status);
        let message = match status.code() {
            Code::Unavailable | Code::DeadlineExceeded if status.message().is_empty() => {
                "the gateway is unreachable".to_owned()
            }
            Code::Internal => "the gateway had an internal error; see its log".to_owned(),
            _ if reason == Some(ErrorReason::PaymentIdReused) && !fields.is_empty() => format!(
                "this payment id was already used for a different payment ({}); \
                 use a new id for a new payment",
                strife_core::differences_text(&fields)
            ),
            _ => match errors::retry_after(status) {
                Some(wait) => format!("too many failed logins: try again in {} s", wait.as_secs().max(1)),
                None => status.message().to_owned(),
            },
        };
        CliError { exit, message, reason: reason.map(errors::reason_code), fields }
    }

    pub fn to_reply(&self) -> Reply {
        let mut json = json!({ "error": self.exit.name(), "message": self.message });
        if let Some(reason) = self.reason {
            json["reason"] = json!(reason);
        }
        if !self.fields.is_empty() {
            json["fields"] = json!(self.fields);
        }
        Reply { exit: self.exit, json, text: format!("error: {}", self.message) }
    }
}

impl From<rusqlite::Error> for CliError {
    fn from(e: rusqlite::Error) -> CliError {
        CliError::new(Exit::Unexpected, format!("client storage: {e}"))
    }
}

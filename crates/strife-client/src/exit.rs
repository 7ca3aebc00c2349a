//! The contract's exit codes, and what a command hands back to `main`.

use serde_json::{Value, json};

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
}

impl CliError {
    pub fn new(exit: Exit, message: impl Into<String>) -> CliError {
        CliError { exit, message: message.into() }
    }

    pub fn unexpected(e: impl std::fmt::Display) -> CliError {
        CliError::new(Exit::Unexpected, e.to_string())
    }

    /// Maps a gateway status to the contract's exit code.
    pub fn from_status(status: &tonic::Status) -> CliError {
        use tonic::Code;
        let exit = match status.code() {
            Code::InvalidArgument | Code::NotFound | Code::OutOfRange => Exit::Invalid,
            Code::Unauthenticated | Code::PermissionDenied | Code::ResourceExhausted => Exit::NotAllowed,
            Code::FailedPrecondition => Exit::IdReused,
            _ => Exit::Unexpected,
        };
        let message = match status.code() {
            Code::Unavailable | Code::DeadlineExceeded if status.message().is_empty() => {
                "the gateway is unreachable".to_owned()
            }
            Code::Internal => "the gateway had an internal error; see its log".to_owned(),
            _ => status.message().to_owned(),
        };
        CliError { exit, message }
    }

    pub fn to_reply(&self) -> Reply {
        Reply {
            exit: self.exit,
            json: json!({ "error": self.exit.name(), "message": self.message }),
            text: format!("error: {}", self.message),
        }
    }
}

impl From<rusqlite::Error> for CliError {
    fn from(e: rusqlite::Error) -> CliError {
        CliError::new(Exit::Unexpected, format!("client storage: {e}"))
    }
}

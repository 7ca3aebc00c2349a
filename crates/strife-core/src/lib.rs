//! Strife's domain vocabulary, shared by every component. Nothing here does IO.

pub mod limits;
pub mod money;
pub mod names;
pub mod reason;
pub mod rng;
pub mod secret;

pub use money::{Amount, AmountError};
pub use names::{NameError, PaymentId, UserRef, banks_involved, validate_bank_name, validate_user_name};
pub use reason::DeclineReason;
pub use secret::Secret;

/// Milliseconds since the Unix epoch, for timestamps in the stores (0 if the
/// clock is before 1970).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

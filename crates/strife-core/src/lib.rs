//! Strife's domain vocabulary, shared by every component. Nothing here does IO.

pub mod limits;
pub mod money;
pub mod names;
pub mod reason;
pub mod secret;

pub use money::{Amount, AmountError};
pub use names::{NameError, PaymentId, UserRef, validate_bank_name, validate_user_name};
pub use reason::DeclineReason;
pub use secret::Secret;

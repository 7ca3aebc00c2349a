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

/// How a reused payment id's request differs, for a person: "amount
/// differs", "payee and amount differ".
pub fn differences_text<S: AsRef<str>>(fields: &[S]) -> String {
    let names: Vec<&str> = fields.iter().map(AsRef::as_ref).collect();
    let verb = if names.len() == 1 { "differs" } else { "differ" };
    format!("{} {verb}", names.join(" and "))
}

/// Milliseconds since the Unix epoch, for timestamps in the stores (0 if the
/// clock is before 1970).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn differences_read_as_english() {
        assert_eq!(super::differences_text(&["amount"]), "amount differs");
        assert_eq!(super::differences_text(&["payee", "amount"]), "payee and amount differ");
    }
}

//! Names of users and banks, and payment ids: validated once, at the edge.

use crate::limits::{BANK_NAME_MAX, USER_NAME_MAX};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is longer than {max} characters")]
    TooLong { what: &'static str, max: usize },
    #[error("{what} may contain only letters, digits and {allowed}")]
    BadCharacter { what: &'static str, allowed: &'static str },
    #[error("payee must look like USER@BANK")]
    NotUserAtBank,
    #[error("payment id must be a UUID like 6f1c0f4e-3a47-4f63-9b9e-2f2c1a0e8d11")]
    BadPaymentId,
}

fn validate(what: &'static str, max: usize, text: &str, extra: &'static str) -> Result<(), NameError> {
    if text.is_empty() {
        return Err(NameError::Empty { what });
    }
    if text.len() > max {
        return Err(NameError::TooLong { what, max });
    }
    if !text.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(c)) {
        return Err(NameError::BadCharacter { what, allowed: extra });
    }
    Ok(())
}

/// A user name: 1..=64 of `[A-Za-z0-9._-]`.
pub fn validate_user_name(text: &str) -> Result<(), NameError> {
    validate("user name", USER_NAME_MAX, text, "-_.")
}

/// A bank name: 1..=32 of `[A-Za-z0-9-]`, so that it also fits a DNS label
/// (a bank's certificate names it as `<bank>.bank.strife`).
pub fn validate_bank_name(text: &str) -> Result<(), NameError> {
    validate("bank name", BANK_NAME_MAX, text, "-")
}

/// A customer: a user at a bank, written `user@bank`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserRef {
    pub user: String,
    pub bank: String,
}

impl UserRef {
    pub fn new(user: &str, bank: &str) -> Result<UserRef, NameError> {
        validate_user_name(user)?;
        validate_bank_name(bank)?;
        Ok(UserRef { user: user.to_owned(), bank: bank.to_owned() })
    }
}

/// The banks a payment from `payer` to `payee` involves: the payer's, then
/// the payee's if it is another one. Each gets one prepare and one decision.
pub fn banks_involved<'a>(payer: &'a UserRef, payee: &'a UserRef) -> Vec<&'a str> {
    let mut banks = vec![payer.bank.as_str()];
    if payee.bank != payer.bank {
        banks.push(payee.bank.as_str());
    }
    banks
}

impl FromStr for UserRef {
    type Err = NameError;
    fn from_str(text: &str) -> Result<UserRef, NameError> {
        let (user, bank) = text.split_once('@').ok_or(NameError::NotUserAtBank)?;
        UserRef::new(user, bank)
    }
}

impl fmt::Display for UserRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.user, self.bank)
    }
}

/// The customer's idempotency key for one payment: a UUID, kept in its
/// canonical lower-case hyphenated form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PaymentId(uuid::Uuid);

impl PaymentId {
    /// A new id: a UUIDv7, unique and time-ordered, so that the stores'
    /// indexes grow at their end instead of everywhere.
    pub fn new_random() -> PaymentId {
        PaymentId(uuid::Uuid::now_v7())
    }
}

impl FromStr for PaymentId {
    type Err = NameError;
    fn from_str(text: &str) -> Result<PaymentId, NameError> {
        if text.len() != 36 {
            return Err(NameError::BadPaymentId);
        }
        uuid::Uuid::parse_str(text).map(PaymentId).map_err(|_| NameError::BadPaymentId)
    }
}

impl fmt::Display for PaymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_refs() {
        let r: UserRef = "user2@BankB".parse().expect("valid");
        assert_eq!((r.user.as_str(), r.bank.as_str()), ("user2", "BankB"));
        assert_eq!(r.to_string(), "user2@BankB");
        assert_eq!("user2".parse::<UserRef>(), Err(NameError::NotUserAtBank));
        assert!("@BankB".parse::<UserRef>().is_err());
        assert!("u@".parse::<UserRef>().is_err());
        assert!("u@Bank.B".parse::<UserRef>().is_err());
        assert!("u v@BankB".parse::<UserRef>().is_err());
        assert!(format!("{}@B", "x".repeat(65)).parse::<UserRef>().is_err());
    }

    #[test]
    fn one_or_two_banks() {
        let a1 = UserRef::new("u1", "A").expect("name");
        let a2 = UserRef::new("u2", "A").expect("name");
        let b1 = UserRef::new("u1", "B").expect("name");
        assert_eq!(banks_involved(&a1, &a2), ["A"]);
        assert_eq!(banks_involved(&a1, &b1), ["A", "B"]);
    }

    #[test]
    fn payment_ids_are_canonical_uuids() {
        let id = PaymentId::new_random();
        assert_eq!(id.to_string().parse::<PaymentId>(), Ok(id));
        let upper = "6F1C0F4E-3A47-4F63-9B9E-2F2C1A0E8D11".parse::<PaymentId>().expect("uuid");
        assert_eq!(upper.to_string(), "6f1c0f4e-3a47-4f63-9b9e-2f2c1a0e8d11");
        assert!("not-a-uuid".parse::<PaymentId>().is_err());
        assert!("6f1c0f4e3a474f639b9e2f2c1a0e8d11".parse::<PaymentId>().is_err());
    }
}

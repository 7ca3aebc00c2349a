//! Exact money: integer minor units, parsed from and shown as decimal strings.

use crate::limits::{AMOUNT_MAX_MINOR, AMOUNT_TEXT_MAX};
use std::fmt;

/// A positive amount of one payment, in minor units (cents). Never a float.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount(i64);

/// Why a string is not an amount. Messages are for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("amount is empty")]
    Empty,
    #[error("amount is too long")]
    TooLong,
    #[error("amount must be a decimal number like 12 or 12.50")]
    NotANumber,
    #[error("amount has more than two digits after the decimal point")]
    TooPrecise,
    #[error("amount must be greater than zero")]
    NotPositive,
    #[error("amount is above the maximum of {}", Amount(AMOUNT_MAX_MINOR))]
    TooLarge,
}

impl Amount {
    /// An amount from minor units; `None` unless `1 ..= AMOUNT_MAX_MINOR`.
    pub fn from_minor(minor: i64) -> Option<Amount> {
        (1..=AMOUNT_MAX_MINOR).contains(&minor).then_some(Amount(minor))
    }

    pub fn minor(self) -> i64 {
        self.0
    }

    /// Parses `12`, `12.5` or `12.50`. No sign, no exponent, no separators.
    pub fn parse(text: &str) -> Result<Amount, AmountError> {
        if text.is_empty() {
            return Err(AmountError::Empty);
        }
        if text.len() > AMOUNT_TEXT_MAX {
            return Err(AmountError::TooLong);
        }
        if text.starts_with('-') {
            return Err(AmountError::NotPositive);
        }
        let (whole, frac) = match text.split_once('.') {
            Some((w, f)) => (w, f),
            None => (text, ""),
        };
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !digits(whole) || !digits(frac) || (text.contains('.') && frac.is_empty()) {
            return Err(AmountError::NotANumber);
        }
        if frac.len() > 2 {
            return Err(AmountError::TooPrecise);
        }
        let mut minor: i64 = 0;
        for b in whole.bytes() {
            minor = minor
                .checked_mul(10)
                .and_then(|m| m.checked_add(i64::from(b - b'0')))
                .ok_or(AmountError::TooLarge)?;
            if minor > AMOUNT_MAX_MINOR {
                return Err(AmountError::TooLarge);
            }
        }
        let mut cents: i64 = 0;
        for (i, b) in frac.bytes().enumerate() {
            cents += i64::from(b - b'0') * if i == 0 { 10 } else { 1 };
        }
        let minor = minor.checked_mul(100).and_then(|m| m.checked_add(cents)).ok_or(AmountError::TooLarge)?;
        if minor == 0 {
            return Err(AmountError::NotPositive);
        }
        Amount::from_minor(minor).ok_or(AmountError::TooLarge)
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_minor(self.0))
    }
}

/// Shows any signed number of minor units with two fraction digits.
pub fn format_minor(minor: i64) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract_forms() {
        assert_eq!(Amount::parse("12").map(Amount::minor), Ok(1200));
        assert_eq!(Amount::parse("12.5").map(Amount::minor), Ok(1250));
        assert_eq!(Amount::parse("12.50").map(Amount::minor), Ok(1250));
        assert_eq!(Amount::parse("0.01").map(Amount::minor), Ok(1));
        assert_eq!(Amount::parse("1000000000").map(Amount::minor), Ok(AMOUNT_MAX_MINOR));
    }

    #[test]
    fn refuses_every_bad_amount() {
        let bad = [
            ("", AmountError::Empty),
            ("0", AmountError::NotPositive),
            ("0.00", AmountError::NotPositive),
            ("-5", AmountError::NotPositive),
            ("abc", AmountError::NotANumber),
            ("1e3", AmountError::NotANumber),
            ("+5", AmountError::NotANumber),
            (" 5", AmountError::NotANumber),
            ("5.", AmountError::NotANumber),
            (".5", AmountError::NotANumber),
            ("1,000", AmountError::NotANumber),
            ("NaN", AmountError::NotANumber),
            ("1.2.3", AmountError::NotANumber),
            ("12.345", AmountError::TooPrecise),
            ("1000000000.01", AmountError::TooLarge),
            ("99999999999999999999", AmountError::TooLarge),
            ("123456789012345678901234567890123", AmountError::TooLong),
        ];
        for (text, want) in bad {
            assert_eq!(Amount::parse(text), Err(want), "{text:?}");
        }
    }

    #[test]
    fn formats_with_two_digits() {
        assert_eq!(format_minor(1250), "12.50");
        assert_eq!(format_minor(5), "0.05");
        assert_eq!(format_minor(-305), "-3.05");
        assert_eq!(Amount(100_000).to_string(), "1000.00");
    }

    #[test]
    fn round_trips_every_small_amount() {
        for minor in 1..20_000 {
            let a = Amount::from_minor(minor).expect("in range");
            assert_eq!(Amount::parse(&a.to_string()), Ok(a));
        }
    }
}

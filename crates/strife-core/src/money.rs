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

/// Seeded properties over many random values. The seed is printed (shown
/// when a test fails); `STRIFE_PROP_SEED=<n>` replays it.
#[cfg(test)]
mod properties {
    use super::*;

    /// Random values per property.
    const CASES: u64 = 100_000;

    use crate::rng::SplitMix64 as Rng;

    /// `n` random decimal digits.
    fn digits(rng: &mut Rng, n: u64) -> String {
        (0..n).map(|_| char::from(b'0' + (rng.next() % 10) as u8)).collect()
    }

    fn rng(test: &str) -> Rng {
        eprintln!("replay: STRIFE_PROP_SEED=<seed> cargo test -p strife-core {test}");
        Rng(crate::rng::seed_from_env("STRIFE_PROP_SEED"))
    }

    /// A valid amount, biased towards the small and the largest ones.
    fn valid_minor(rng: &mut Rng) -> i64 {
        let hi = match rng.next() % 4 {
            0 => 1_000,
            1 => 10_000_000,
            _ => AMOUNT_MAX_MINOR as u64,
        };
        let minor = if rng.next().is_multiple_of(8) {
            AMOUNT_MAX_MINOR as u64 - rng.range(0, 99)
        } else {
            rng.range(1, hi)
        };
        minor as i64
    }

    /// What `format_minor` must show, by an independent route: i128 value
    /// read back from the text.
    fn value_of(text: &str) -> i128 {
        let (negative, unsigned) = text.strip_prefix('-').map_or((false, text), |rest| (true, rest));
        let (whole, frac) = unsigned.split_once('.').expect("a decimal point");
        assert_eq!(frac.len(), 2, "{text:?}");
        assert!(whole == "0" || !whole.starts_with('0'), "{text:?} has a leading zero");
        let magnitude =
            whole.parse::<i128>().expect("whole digits") * 100 + frac.parse::<i128>().expect("cents");
        if negative { -magnitude } else { magnitude }
    }

    #[test]
    fn every_valid_amount_round_trips_exactly() {
        let mut rng = rng("every_valid_amount_round_trips_exactly");
        for _ in 0..CASES {
            let minor = valid_minor(&mut rng);
            let text = format_minor(minor);
            let amount = Amount::parse(&text).map(Amount::minor);
            assert_eq!(amount, Ok(minor), "{minor} shown as {text:?}");
            assert_eq!(Amount::from_minor(minor).map(|a| a.to_string()), Some(text));
        }
    }

    #[test]
    fn format_minor_shows_every_i64_exactly() {
        let mut rng = rng("format_minor_shows_every_i64_exactly");
        let edges = [i64::MIN, i64::MIN + 1, -100, -99, -1, 0, 1, 99, 100, i64::MAX - 1, i64::MAX];
        for minor in edges.into_iter().chain((0..CASES).map(|_| rng.next() as i64)) {
            let text = format_minor(minor);
            assert_eq!(value_of(&text), i128::from(minor), "format_minor({minor}) = {text:?}");
        }
    }

    #[test]
    fn decimal_strings_parse_to_exact_minor_units() {
        let mut rng = rng("decimal_strings_parse_to_exact_minor_units");
        for _ in 0..CASES {
            // Whole part of up to 11 digits (a little above the maximum),
            // sometimes with leading zeros; then 0, 1 or 2 fraction digits.
            let whole_digits = rng.range(1, 11);
            let whole = format!("{}{}", "0".repeat(rng.range(0, 2) as usize), digits(&mut rng, whole_digits));
            let frac_digits = rng.range(0, 2);
            let frac = digits(&mut rng, frac_digits);
            let text = if frac.is_empty() { whole.clone() } else { format!("{whole}.{frac}") };
            let cents = match frac.len() {
                0 => 0,
                1 => i128::from(frac.as_bytes()[0] - b'0') * 10,
                _ => frac.parse::<i128>().expect("two digits"),
            };
            let want = whole.parse::<i128>().expect("whole digits") * 100 + cents;
            let got = Amount::parse(&text).map(|a| i128::from(a.minor()));
            let expected = match want {
                0 => Err(AmountError::NotPositive),
                w if w > i128::from(AMOUNT_MAX_MINOR) => Err(AmountError::TooLarge),
                w => Ok(w),
            };
            assert_eq!(got, expected, "{text:?}");
        }
    }

    #[test]
    fn more_than_two_fraction_digits_are_refused() {
        let mut rng = rng("more_than_two_fraction_digits_are_refused");
        for _ in 0..CASES {
            let whole_digits = rng.range(1, 12);
            let frac_digits = rng.range(3, 32 - 1 - whole_digits);
            let text = format!("{}.{}", digits(&mut rng, whole_digits), digits(&mut rng, frac_digits));
            assert_eq!(Amount::parse(&text), Err(AmountError::TooPrecise), "{text:?}");
        }
    }

    #[test]
    fn amounts_above_the_maximum_are_refused_never_wrapped() {
        let mut rng = rng("amounts_above_the_maximum_are_refused_never_wrapped");
        // Values whose cents would wrap an i64 or a u64 to something small.
        let wrapping = [
            "92233720368547758.08",
            "92233720368547758.07",
            "184467440737095516.16",
            "184467440737095516.17",
        ];
        for text in wrapping {
            assert_eq!(Amount::parse(text), Err(AmountError::TooLarge), "{text:?}");
        }
        for _ in 0..CASES {
            // Anything from just above the maximum to 29 whole digits (the
            // text stays within AMOUNT_TEXT_MAX).
            let over = match rng.next() % 3 {
                0 => AMOUNT_MAX_MINOR as u128 + u128::from(rng.range(1, 1_000)),
                1 => AMOUNT_MAX_MINOR as u128 + u128::from(rng.next()),
                _ => {
                    u128::from(rng.next()) * u128::from(rng.next()) % 10u128.pow(30)
                        + AMOUNT_MAX_MINOR as u128
                        + 1
                }
            };
            let text = format!("{}.{:02}", over / 100, over % 100);
            assert!(text.len() <= AMOUNT_TEXT_MAX, "{text:?}");
            assert_eq!(Amount::parse(&text), Err(AmountError::TooLarge), "{text:?}");
            let whole_only = (over / 100).to_string();
            if over / 100 > (AMOUNT_MAX_MINOR / 100) as u128 {
                assert_eq!(Amount::parse(&whole_only), Err(AmountError::TooLarge), "{whole_only:?}");
            }
        }
    }
}

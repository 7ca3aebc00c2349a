//! Page tokens for the paged history (AIP-158): the opaque text a caller
//! sends back to get the next page.
//!
//! A token carries the cursor (the `(created_at, txn_id)` of the last entry
//! of the page it follows) and the time bounds it was made for, so that
//! reusing it with other bounds is refused rather than silently giving a
//! page of another listing. The text is `p1.` (the format's version) and the
//! lowercase hex of:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | cursor `created_at` (ms, big-endian) |
//! | 1 | bounds present: bit 0 start, bit 1 end |
//! | 8 + 8 | start and end (ms, big-endian; 0 when absent) |
//! | n | cursor `txn_id` (UTF-8) |
//! | 8 | the first 8 bytes of SHA-256 over the version and all the above |
//!
//! The checksum catches damaged or edited tokens; it is not a signature,
//! and needs not be: the listing is always scoped to the caller, so the
//! most a forged token can do is start the caller's own history at a point
//! they could also reach with time bounds.

use crate::hex;
use crate::store::Cursor;
use strife_core::limits::PAGE_TOKEN_MAX;

/// The format's version, first in every token.
const PREFIX: &str = "p1.";
/// Bytes of the checksum at the end of a token's body.
const CHECK_LEN: usize = 8;
/// Bytes of the fixed fields before the txn id.
const HEAD_LEN: usize = 8 + 1 + 8 + 8;
const HAS_START: u8 = 1;
const HAS_END: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PageTokenError {
    #[error("the page token is longer than {PAGE_TOKEN_MAX} bytes")]
    TooLong,
    #[error("the page token is from another version of the gateway; start again from the first page")]
    UnknownVersion,
    #[error("the page token is not one the gateway issued")]
    Malformed,
    #[error("the page token was issued for other time bounds; send the same bounds or start again")]
    BoundsChanged,
}

/// The token for the page after `cursor`, in a listing with these bounds.
pub fn encode(cursor: &Cursor, start_ms: Option<i64>, end_ms: Option<i64>) -> String {
    let mut body = Vec::with_capacity(HEAD_LEN + cursor.txn_id.len() + CHECK_LEN);
    body.extend_from_slice(&cursor.created_at_ms.to_be_bytes());
    body.push((u8::from(start_ms.is_some()) * HAS_START) | (u8::from(end_ms.is_some()) * HAS_END));
    body.extend_from_slice(&start_ms.unwrap_or(0).to_be_bytes());
    body.extend_from_slice(&end_ms.unwrap_or(0).to_be_bytes());
    body.extend_from_slice(cursor.txn_id.as_bytes());
    let check = checksum(&body);
    body.extend_from_slice(&check);
    let token = format!("{PREFIX}{}", hex::encode(&body));
    debug_assert!(token.len() <= PAGE_TOKEN_MAX, "txn ids are UUIDs: a token fits its limit");
    token
}

/// The cursor in `token`, if it is intact and was made for these bounds.
pub fn decode(token: &str, start_ms: Option<i64>, end_ms: Option<i64>) -> Result<Cursor, PageTokenError> {
    if token.len() > PAGE_TOKEN_MAX {
        return Err(PageTokenError::TooLong);
    }
    let Some(hex_text) = token.strip_prefix(PREFIX) else {
        return Err(if looks_versioned(token) {
            PageTokenError::UnknownVersion
        } else {
            PageTokenError::Malformed
        });
    };
    let body = hex::decode(hex_text).ok_or(PageTokenError::Malformed)?;
    if body.len() <= HEAD_LEN + CHECK_LEN {
        return Err(PageTokenError::Malformed);
    }
    let (fields, check) = body.split_at(body.len() - CHECK_LEN);
    if checksum(fields) != check {
        return Err(PageTokenError::Malformed);
    }
    let int = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&fields[at..at + 8]);
        i64::from_be_bytes(b)
    };
    let flags = fields[8];
    if flags & !(HAS_START | HAS_END) != 0 {
        return Err(PageTokenError::Malformed);
    }
    let made_start = (flags & HAS_START != 0).then(|| int(9));
    let made_end = (flags & HAS_END != 0).then(|| int(17));
    if (made_start, made_end) != (start_ms, end_ms) {
        return Err(PageTokenError::BoundsChanged);
    }
    let txn_id = std::str::from_utf8(&fields[HEAD_LEN..]).map_err(|_| PageTokenError::Malformed)?;
    Ok(Cursor { created_at_ms: int(0), txn_id: txn_id.to_owned() })
}

/// `p<digits>.`: a token of some version, not garbage.
fn looks_versioned(token: &str) -> bool {
    let Some(rest) = token.strip_prefix('p') else { return false };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0 && rest.as_bytes().get(digits) == Some(&b'.')
}

fn checksum(fields: &[u8]) -> [u8; CHECK_LEN] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(PREFIX.as_bytes());
    ctx.update(fields);
    let digest = ctx.finish();
    let mut out = [0u8; CHECK_LEN];
    out.copy_from_slice(&digest.as_ref()[..CHECK_LEN]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor() -> Cursor {
        Cursor { created_at_ms: 1_760_000_000_123, txn_id: "01990d1e-7c3a-7b2e-9f00-1234567890ab".into() }
    }

    const BOUNDS: [(Option<i64>, Option<i64>); 4] =
        [(None, None), (Some(5), None), (None, Some(-7)), (Some(i64::MIN), Some(i64::MAX))];

    #[test]
    fn a_token_round_trips_with_every_kind_of_bounds() {
        for (start, end) in BOUNDS {
            let t = encode(&cursor(), start, end);
            assert!(t.starts_with("p1."), "{t}");
            assert!(t.len() <= PAGE_TOKEN_MAX, "{} bytes", t.len());
            assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.'), "URL-safe: {t}");
            assert_eq!(decode(&t, start, end), Ok(cursor()));
        }
        let odd = Cursor { created_at_ms: i64::MIN, txn_id: "x".into() };
        assert_eq!(decode(&encode(&odd, None, None), None, None), Ok(odd));
    }

    #[test]
    fn a_token_works_only_with_the_bounds_it_was_made_for() {
        for (i, (start, end)) in BOUNDS.into_iter().enumerate() {
            let t = encode(&cursor(), start, end);
            for (j, (other_start, other_end)) in BOUNDS.into_iter().enumerate() {
                if i != j {
                    assert_eq!(decode(&t, other_start, other_end), Err(PageTokenError::BoundsChanged));
                }
            }
        }
        let t = encode(&cursor(), Some(5), Some(10));
        assert_eq!(decode(&t, Some(5), Some(11)), Err(PageTokenError::BoundsChanged));
        assert_eq!(decode(&t, Some(4), Some(10)), Err(PageTokenError::BoundsChanged));
    }

    #[test]
    fn any_edited_character_is_refused() {
        let t = encode(&cursor(), Some(5), None);
        for i in 0..t.len() {
            for replacement in ['0', '7', 'f', 'F', 'z', '.', 'p'] {
                if t.as_bytes()[i] == replacement as u8 {
                    continue;
                }
                let mut edited = t.clone().into_bytes();
                edited[i] = replacement as u8;
                let edited = String::from_utf8(edited).expect("ascii");
                assert!(decode(&edited, Some(5), None).is_err(), "accepted {edited}");
            }
        }
        // Cut short, extended, or with the body of another token's checksum.
        assert!(decode(&t[..t.len() - 2], Some(5), None).is_err());
        assert!(decode(&format!("{t}00"), Some(5), None).is_err());
        let other = encode(&Cursor { created_at_ms: 1, ..cursor() }, Some(5), None);
        let spliced = format!("{}{}", &t[..t.len() - 16], &other[other.len() - 16..]);
        assert_eq!(decode(&spliced, Some(5), None), Err(PageTokenError::Malformed));
    }

    #[test]
    fn garbage_and_oversized_input_is_refused() {
        for garbage in ["", "p1.", "p1.00", "abc", "p1.zz", "p1.0", "P1.00", "p1 .00", "💸", "p.00"] {
            assert_eq!(decode(garbage, None, None), Err(PageTokenError::Malformed), "{garbage:?}");
        }
        // The smallest body a token can have, with a valid checksum but no txn id.
        let empty_txn = encode(&Cursor { created_at_ms: 1, txn_id: String::new() }, None, None);
        assert_eq!(decode(&empty_txn, None, None), Err(PageTokenError::Malformed));
        assert_eq!(decode("p2.0011", None, None), Err(PageTokenError::UnknownVersion));
        assert_eq!(decode("p10.", None, None), Err(PageTokenError::UnknownVersion));
        let long = format!("p1.{}", "0".repeat(PAGE_TOKEN_MAX));
        assert_eq!(decode(&long, None, None), Err(PageTokenError::TooLong));
        let uppercase = encode(&cursor(), None, None).to_uppercase().replacen("P1.", "p1.", 1);
        assert_eq!(decode(&uppercase, None, None), Err(PageTokenError::Malformed));
    }
}

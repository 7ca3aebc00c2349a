//! The standard rich error model (`google.rpc.Status` details) as every
//! Strife server answers it: each error carries an `ErrorInfo` whose reason
//! is a value of the proto's `ErrorReason` enum, plus `BadRequest`,
//! `RetryInfo` or `PreconditionFailure` where they apply. Clients read them
//! back with [`reason_of`] and `tonic_types::StatusExt`.

use std::collections::HashMap;
use std::time::Duration;
use strife_proto::gateway::v1::ErrorReason;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// `ErrorInfo.domain` of every Strife error.
pub const ERROR_DOMAIN: &str = "strife";
/// `PreconditionFailure` violation type of a reused payment id.
pub const PAYMENT_ID_REUSED: &str = "PAYMENT_ID_REUSED";
const REASON_PREFIX: &str = "ERROR_REASON_";

/// The `ErrorInfo.reason` text of `reason`: its proto name without the
/// enum's prefix (`INVALID_REQUEST`).
pub fn reason_code(reason: ErrorReason) -> &'static str {
    let name = reason.as_str_name();
    name.strip_prefix(REASON_PREFIX).unwrap_or(name)
}

/// The `ErrorReason` whose [`reason_code`] is `code`.
pub fn reason_from_code(code: &str) -> Option<ErrorReason> {
    ErrorReason::from_str_name(&format!("{REASON_PREFIX}{code}"))
}

/// An error with an `ErrorInfo` and nothing else.
pub fn status(code: Code, reason: ErrorReason, message: impl Into<String>) -> Status {
    Status::with_error_details(code, message, info(reason))
}

/// INVALID_ARGUMENT naming the offending field in a `BadRequest`.
pub fn invalid(field: &str, message: impl Into<String>) -> Status {
    let message = message.into();
    let mut details = info(ErrorReason::InvalidRequest);
    details.add_bad_request_violation(field, message.clone());
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// RESOURCE_EXHAUSTED for login throttling: `RetryInfo` and a `retry-after`
/// header (whole seconds, at least 1) say when to try again.
pub fn throttled(retry_after: Duration, message: impl Into<String>) -> Status {
    let secs = retry_after.as_secs().max(1);
    let mut details = info(ErrorReason::LoginThrottled);
    details.set_retry_info(Some(Duration::from_secs(secs)));
    let mut status = Status::with_error_details(Code::ResourceExhausted, message, details);
    if let Ok(v) = secs.to_string().parse() {
        status.metadata_mut().insert("retry-after", v);
    }
    status
}

/// FAILED_PRECONDITION for a payment id used before for another payment:
/// one `PreconditionFailure` violation per differing field.
pub fn id_reused(payment_id: &str, fields: &[&str], message: impl Into<String>) -> Status {
    let mut details = info(ErrorReason::PaymentIdReused);
    for field in fields {
        details.add_precondition_failure_violation(
            PAYMENT_ID_REUSED,
            *field,
            format!("payment {payment_id} was made with another {field}"),
        );
    }
    Status::with_error_details(Code::FailedPrecondition, message, details)
}

/// INTERNAL with nothing but "internal error": the cause is for the log.
pub fn internal() -> Status {
    status(Code::Internal, ErrorReason::Internal, "internal error")
}

fn info(reason: ErrorReason) -> ErrorDetails {
    ErrorDetails::with_error_info(reason_code(reason), ERROR_DOMAIN, HashMap::new())
}

/// The `ErrorReason` a status carries, if it carries a Strife one.
pub fn reason_of(status: &Status) -> Option<ErrorReason> {
    let info = status.get_details_error_info()?;
    if info.domain != ERROR_DOMAIN {
        return None;
    }
    reason_from_code(&info.reason)
}

/// The fields a reused payment id differs in, from its `PreconditionFailure`.
pub fn differing_fields(status: &Status) -> Vec<String> {
    status
        .get_details_precondition_failure()
        .map(|p| {
            p.violations.into_iter().filter(|v| v.r#type == PAYMENT_ID_REUSED).map(|v| v.subject).collect()
        })
        .unwrap_or_default()
}

/// How long a throttled caller should wait, from its `RetryInfo`.
pub fn retry_after(status: &Status) -> Option<Duration> {
    status.get_details_retry_info().and_then(|r| r.retry_delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_round_trip() {
        let s = invalid("payee.bank", "bank name must not be empty");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(reason_of(&s), Some(ErrorReason::InvalidRequest));
        let bad = s.get_details_bad_request().expect("bad request");
        assert_eq!(bad.field_violations[0].field, "payee.bank");

        let s = id_reused("x", &["payee", "amount"], "reused");
        assert_eq!(reason_of(&s), Some(ErrorReason::PaymentIdReused));
        assert_eq!(differing_fields(&s), ["payee", "amount"]);

        let s = throttled(Duration::from_millis(1500), "wait");
        assert_eq!(retry_after(&s), Some(Duration::from_secs(1)));
        assert_eq!(s.metadata().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));

        assert_eq!(reason_code(ErrorReason::TokenExpired), "TOKEN_EXPIRED");
        assert_eq!(reason_of(&Status::internal("no details")), None);
        assert_eq!(reason_of(&internal()), Some(ErrorReason::Internal));
    }
}

//! Validation of every request the gateway takes, as pure functions (no IO),
//! so that handlers stay short and the fuzz targets can reach them.

use crate::coordinator::PayRequest;
use crate::error::GatewayError;
use crate::page_token;
use crate::store::PageQuery;
use strife_core::limits::{ADDRESS_MAX, HISTORY_PAGE_DEFAULT, HISTORY_PAGE_MAX, PASSWORD_MAX, STORE_ID_MAX};
use strife_core::{Amount, PaymentId, Secret, UserRef, validate_bank_name, validate_user_name};
use strife_proto::gateway::v1 as pb;

/// A login request: the customer and the password.
pub fn login(req: pb::LoginRequest) -> Result<(UserRef, Secret<String>), GatewayError> {
    validate_bank_name(&req.bank).map_err(|e| GatewayError::invalid("bank", e.to_string()))?;
    validate_user_name(&req.user).map_err(|e| GatewayError::invalid("user", e.to_string()))?;
    if req.password.is_empty() || req.password.len() > PASSWORD_MAX {
        return Err(GatewayError::invalid(
            "password",
            format!("the password must be 1 to {PASSWORD_MAX} bytes"),
        ));
    }
    Ok((UserRef { user: req.user, bank: req.bank }, Secret::new(req.password)))
}

/// A customer named in a request, at `field`.
fn account(field: Field, account: Option<&pb::Account>) -> Result<UserRef, GatewayError> {
    let account =
        account.ok_or_else(|| GatewayError::invalid(field.whole, format!("{} is missing", field.whole)))?;
    validate_user_name(&account.user).map_err(|e| GatewayError::invalid(field.user, e.to_string()))?;
    validate_bank_name(&account.bank).map_err(|e| GatewayError::invalid(field.bank, e.to_string()))?;
    Ok(UserRef { user: account.user.clone(), bank: account.bank.clone() })
}

/// The paths of an `Account` field and of its parts, for `BadRequest`.
struct Field {
    whole: &'static str,
    user: &'static str,
    bank: &'static str,
}

/// A payment by `payer`.
pub fn pay(payer: &UserRef, req: &pb::PayRequest) -> Result<PayRequest, GatewayError> {
    let payment_id = payment_id(&req.payment_id)?;
    let payee =
        account(Field { whole: "payee", user: "payee.user", bank: "payee.bank" }, req.payee.as_ref())?;
    let amount = Amount::parse(&req.amount).map_err(|e| GatewayError::invalid("amount", e.to_string()))?;
    if payee == *payer {
        return Err(GatewayError::invalid("payee", "you cannot pay yourself"));
    }
    Ok(PayRequest { payment_id, payer: payer.clone(), payee, amount })
}

pub fn payment_id(text: &str) -> Result<PaymentId, GatewayError> {
    text.parse::<PaymentId>().map_err(|e| GatewayError::invalid("payment_id", e.to_string()))
}

/// A page size as AIP-158 has it: 0 means the default, anything above the
/// cap is capped, a negative size is refused.
pub fn page_size(size: i32) -> Result<u32, GatewayError> {
    match u32::try_from(size) {
        Err(_) => Err(GatewayError::invalid("page_size", "page_size must not be negative")),
        Ok(0) => Ok(HISTORY_PAGE_DEFAULT),
        Ok(n) => Ok(n.min(HISTORY_PAGE_MAX)),
    }
}

/// A history page request: its size, where it starts (the page token's
/// cursor) and its time bounds.
pub fn list_payments(req: &pb::ListPaymentsRequest) -> Result<PageQuery, GatewayError> {
    let limit = page_size(req.page_size)?;
    let (start_ms, end_ms) = time_bounds(req.start_time.as_ref(), req.end_time.as_ref())?;
    let after = if req.page_token.is_empty() {
        None
    } else {
        let cursor = page_token::decode(&req.page_token, start_ms, end_ms)
            .map_err(|e| GatewayError::invalid("page_token", e.to_string()))?;
        Some(cursor)
    };
    Ok(PageQuery { limit, after, start_ms, end_ms })
}

/// Optional time bounds `[start, end)` in Unix milliseconds.
pub fn time_bounds(
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
) -> Result<(Option<i64>, Option<i64>), GatewayError> {
    let start = start.map(|t| unix_ms("start_time", t)).transpose()?;
    let end = end.map(|t| unix_ms("end_time", t)).transpose()?;
    if let (Some(s), Some(e)) = (start, end)
        && s > e
    {
        return Err(GatewayError::invalid("start_time", "start_time is after end_time"));
    }
    Ok((start, end))
}

fn unix_ms(field: &'static str, t: &prost_types::Timestamp) -> Result<i64, GatewayError> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(GatewayError::invalid(field, format!("{field} has nanos out of range")));
    }
    t.seconds
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(i64::from(t.nanos / 1_000_000)))
        .ok_or_else(|| GatewayError::invalid(field, format!("{field} is out of range")))
}

/// A bank's registration (the certificate check is the handler's).
pub fn register(req: &pb::RegisterBankRequest) -> Result<(), GatewayError> {
    validate_bank_name(&req.name).map_err(|e| GatewayError::invalid("name", e.to_string()))?;
    if req.address.len() > ADDRESS_MAX || req.address.parse::<std::net::SocketAddr>().is_err() {
        return Err(GatewayError::invalid(
            "address",
            "address must be an IP address and port, like 127.0.0.1:7001",
        ));
    }
    store_id("ledger_id", &req.ledger_id)?;
    store_id("cluster_id", &req.cluster_id)?;
    Ok(())
}

/// A bank's inquiry: the transaction id must be a UUID.
pub fn inquire(req: &pb::InquireRequest) -> Result<(), GatewayError> {
    req.txn_id.parse::<PaymentId>().map_err(|_| GatewayError::invalid("txn_id", "txn_id must be a UUID"))?;
    store_id("cluster_id", &req.cluster_id)?;
    Ok(())
}

/// A ledger or cluster id: empty (a sender older than ids), or at most
/// [`STORE_ID_MAX`] letters, digits and '-'.
pub fn store_id(field: &'static str, id: &str) -> Result<(), GatewayError> {
    if id.len() > STORE_ID_MAX || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(GatewayError::invalid(
            field,
            format!("{field} must be at most {STORE_ID_MAX} letters, digits and '-'"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pay_requests() {
        let me = UserRef::new("user1", "BankA").expect("name");
        let ok = pb::PayRequest {
            payment_id: PaymentId::new_random().to_string(),
            payee: Some(pb::Account { user: "user2".into(), bank: "BankB".into() }),
            amount: "12.50".into(),
        };
        assert_eq!(pay(&me, &ok).expect("valid").amount.minor(), 1250);
        let field = |req: &pb::PayRequest| match pay(&me, req) {
            Err(GatewayError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let own = pb::PayRequest {
            payee: Some(pb::Account { user: "user1".into(), bank: "BankA".into() }),
            ..ok.clone()
        };
        assert_eq!(field(&own), "payee");
        assert_eq!(field(&pb::PayRequest { amount: "-1".into(), ..ok.clone() }), "amount");
        assert_eq!(field(&pb::PayRequest { payee: None, ..ok.clone() }), "payee");
        let no_bank = pb::PayRequest {
            payee: Some(pb::Account { user: "user2".into(), bank: String::new() }),
            ..ok.clone()
        };
        assert_eq!(field(&no_bank), "payee.bank");
        assert_eq!(field(&pb::PayRequest { payment_id: "x".into(), ..ok }), "payment_id");
        assert_eq!(page_size(0).expect("default"), HISTORY_PAGE_DEFAULT);
        assert_eq!(page_size(i32::MAX).expect("capped"), HISTORY_PAGE_MAX);
        assert!(page_size(-1).is_err());
        let t = |seconds| prost_types::Timestamp { seconds, nanos: 0 };
        assert_eq!(time_bounds(Some(&t(1)), Some(&t(2))).expect("ordered"), (Some(1000), Some(2000)));
        assert!(time_bounds(Some(&t(2)), Some(&t(1))).is_err());
    }

    #[test]
    fn ledger_and_cluster_ids() {
        let field = |id: &str| match store_id("ledger_id", id) {
            Ok(()) => None,
            Err(GatewayError::Invalid { field, .. }) => Some(field),
            Err(other) => panic!("{other:?}"),
        };
        assert_eq!(field(""), None, "a bank older than ids");
        assert_eq!(field("0b6f6d0e-8a43-4c1e-9d55-2f3a8c7f4b11"), None);
        assert_eq!(field(&"a".repeat(STORE_ID_MAX)), None);
        assert_eq!(field(&"a".repeat(STORE_ID_MAX + 1)), Some("ledger_id"));
        assert_eq!(field("ü"), Some("ledger_id"));
        assert_eq!(field("a b"), Some("ledger_id"));
    }
}

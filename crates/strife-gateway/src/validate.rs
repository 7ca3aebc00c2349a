//! Validation of every request the gateway takes, as pure functions (no IO),
//! so that handlers stay short and the fuzz targets can reach them.

use crate::coordinator::PayRequest;
use crate::error::GatewayError;
use strife_core::limits::{ADDRESS_MAX, HISTORY_PAGE_DEFAULT, HISTORY_PAGE_MAX, PASSWORD_MAX};
use strife_core::{Amount, PaymentId, Secret, UserRef, validate_bank_name, validate_user_name};
use strife_proto::gateway::v1 as pb;

/// A login request: the customer and the password.
pub fn login(req: pb::LoginRequest) -> Result<(UserRef, Secret<String>), GatewayError> {
    validate_bank_name(&req.bank)?;
    validate_user_name(&req.user)?;
    if req.password.is_empty() || req.password.len() > PASSWORD_MAX {
        return Err(GatewayError::Invalid(format!("the password must be 1 to {PASSWORD_MAX} bytes")));
    }
    Ok((UserRef { user: req.user, bank: req.bank }, Secret::new(req.password)))
}

/// A payment by `payer`.
pub fn pay(payer: &UserRef, req: &pb::PayRequest) -> Result<PayRequest, GatewayError> {
    let payment_id = payment_id(&req.payment_id)?;
    let payee = UserRef::new(&req.payee_user, &req.payee_bank)?;
    let amount = Amount::parse(&req.amount)?;
    if payee == *payer {
        return Err(GatewayError::Invalid("you cannot pay yourself".into()));
    }
    Ok(PayRequest { payment_id, payer: payer.clone(), payee, amount })
}

pub fn payment_id(text: &str) -> Result<PaymentId, GatewayError> {
    Ok(text.parse::<PaymentId>()?)
}

/// A history page size: 0 means the default, anything above the cap is capped.
pub fn history_limit(limit: u32) -> u32 {
    if limit == 0 { HISTORY_PAGE_DEFAULT } else { limit.min(HISTORY_PAGE_MAX) }
}

/// A bank's registration (the certificate check is the handler's).
pub fn register(req: &pb::RegisterBankRequest) -> Result<(), GatewayError> {
    validate_bank_name(&req.name)?;
    if req.address.len() > ADDRESS_MAX || req.address.parse::<std::net::SocketAddr>().is_err() {
        return Err(GatewayError::Invalid(
            "address must be an IP address and port, like 127.0.0.1:7001".into(),
        ));
    }
    Ok(())
}

/// A bank's inquiry: the transaction id must be a UUID.
pub fn inquire(req: &pb::InquireRequest) -> Result<(), GatewayError> {
    req.txn_id.parse::<PaymentId>().map_err(|_| GatewayError::Invalid("txn_id must be a UUID".into()))?;
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
            payee_user: "user2".into(),
            payee_bank: "BankB".into(),
            amount: "12.50".into(),
        };
        assert_eq!(pay(&me, &ok).expect("valid").amount.minor(), 1250);
        let own = pb::PayRequest { payee_user: "user1".into(), payee_bank: "BankA".into(), ..ok.clone() };
        assert!(pay(&me, &own).is_err());
        let bad = pb::PayRequest { amount: "-1".into(), ..ok };
        assert!(pay(&me, &bad).is_err());
        assert_eq!(history_limit(0), HISTORY_PAGE_DEFAULT);
        assert_eq!(history_limit(u32::MAX), HISTORY_PAGE_MAX);
    }
}

//! Who may call what at the gateway. Customers' calls need a client
//! certificate and a valid, unrevoked token; the interceptor puts the
//! customer it proves into the request extensions for the handlers.

use crate::backend::GatewayStore;
use crate::coordinator::Gateway;
use crate::error::GatewayError;
use crate::tokens::{Claims, TokenError};
use std::sync::Arc;
use strife_core::UserRef;
use strife_core::limits::TOKEN_MAX;
use strife_proto::gateway::v1::ErrorReason;
use strife_rpc::PeerRole;
use strife_rpc::identity::require;
use strife_rpc::telemetry::record_user;
use tonic::{Request, Status};

/// The customer a token proves, for handlers.
#[derive(Debug, Clone)]
pub struct Customer {
    pub who: UserRef,
    pub claims: Claims,
}

/// Interceptor for services only a client certificate may call.
pub fn only_clients(req: Request<()>) -> Result<Request<()>, Status> {
    require(&req, &[PeerRole::Client])?;
    Ok(req)
}

/// Interceptor for the bank registry: bank certificates only (the handler
/// checks that the name matches).
pub fn only_banks(req: Request<()>) -> Result<Request<()>, Status> {
    require(&req, &[PeerRole::Bank])?;
    Ok(req)
}

/// Interceptor for customers' calls: a client certificate and a bearer
/// token this gateway's keys signed. Whether the token was revoked (at any
/// replica) is a question for the store, which [`signed_in`] asks.
#[derive(Clone)]
pub struct CustomerAuth<S> {
    pub gateway: Arc<Gateway<S>>,
}

impl<S: GatewayStore> tonic::service::Interceptor for CustomerAuth<S> {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        require(&req, &[PeerRole::Client])?;
        let token = bearer_token(req.metadata())?;
        if token.len() > TOKEN_MAX {
            return Err(refused(ErrorReason::TokenInvalid, "the token is too long: log in again"));
        }
        let claims = self.gateway.tokens().verify(token).map_err(|e| match e {
            TokenError::Expired => {
                refused(ErrorReason::TokenExpired, "your session has expired: log in again")
            }
            other => refused(ErrorReason::TokenInvalid, format!("{other}: log in again")),
        })?;
        let who = claims.customer();
        record_user(&who);
        req.extensions_mut().insert(Customer { who, claims });
        Ok(req)
    }
}

fn refused(reason: ErrorReason, message: impl Into<String>) -> Status {
    let label = strife_rpc::errors::reason_code(reason);
    strife_rpc::metrics::GATEWAY.token_rejections.get_or_create(&[("reason", label)]).inc();
    GatewayError::unauthenticated(reason, message).into()
}

/// The token of an `authorization: Bearer <token>` header. The scheme is
/// matched case-insensitively, as in HTTP (RFC 9110, section 11.1).
fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Result<&str, Status> {
    let header = metadata
        .get("authorization")
        .ok_or_else(|| refused(ErrorReason::TokenMissing, "not logged in: run `strife login` first"))?;
    let malformed =
        || refused(ErrorReason::TokenMissing, "the authorization header must be `Bearer <token>`");
    let header = header.to_str().map_err(|_| malformed())?;
    let (scheme, token) = header.split_once(' ').ok_or_else(malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(malformed());
    }
    let token = token.trim_start_matches(' ');
    if token.is_empty() {
        return Err(malformed());
    }
    Ok(token)
}

/// The customer of a request that passed [`CustomerAuth`].
/// The customer of a request the interceptor let through, once the store
/// confirms that their token was not revoked.
pub async fn signed_in<S: GatewayStore, T>(
    gateway: &Gateway<S>,
    req: &Request<T>,
) -> Result<Customer, Status> {
    let customer = customer(req)?;
    if gateway.store.is_revoked(customer.claims.jti.clone()).await? {
        return Err(refused(ErrorReason::TokenRevoked, "this session was logged out: log in again"));
    }
    Ok(customer)
}

pub fn customer<T>(req: &Request<T>) -> Result<Customer, Status> {
    req.extensions()
        .get::<Customer>()
        .cloned()
        .ok_or_else(|| refused(ErrorReason::TokenMissing, "not logged in"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let with = |value: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("authorization", value.parse().expect("ascii"));
            bearer_token(&m).map(str::to_owned).map_err(|s| s.code())
        };
        for ok in ["Bearer abc", "bearer abc", "BEARER abc", "bEaReR  abc"] {
            assert_eq!(with(ok), Ok("abc".to_owned()), "{ok}");
        }
        for bad in ["Basic abc", "Bearer", "Bearer ", "Bearerabc", "abc"] {
            assert_eq!(with(bad), Err(tonic::Code::Unauthenticated), "{bad}");
        }
        assert!(bearer_token(&tonic::metadata::MetadataMap::new()).is_err());
    }
}

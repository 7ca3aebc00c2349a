//! Who may call what at the gateway. Customers' calls need a client
//! certificate and a valid, unrevoked token; the interceptor puts the
//! customer it proves into the request extensions for the handlers.

use crate::coordinator::Gateway;
use crate::tokens::{Claims, TokenError};
use std::sync::Arc;
use strife_core::UserRef;
use strife_core::limits::TOKEN_MAX;
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

/// Interceptor for customers' calls: a client certificate and a bearer token.
#[derive(Clone)]
pub struct CustomerAuth {
    pub gateway: Arc<Gateway>,
}

impl tonic::service::Interceptor for CustomerAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        require(&req, &[PeerRole::Client])?;
        let header = req
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("not logged in: run `strife login` first"))?;
        let header =
            header.to_str().map_err(|_| Status::unauthenticated("the authorization header is malformed"))?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| Status::unauthenticated("the authorization header must be `Bearer <token>`"))?;
        if token.len() > TOKEN_MAX {
            return Err(Status::unauthenticated("the token is too long"));
        }
        let claims = self.gateway.tokens.verify(token).map_err(|e| match e {
            TokenError::Expired => Status::unauthenticated("your session has expired: log in again"),
            other => Status::unauthenticated(format!("{other}: log in again")),
        })?;
        let revoked = self.gateway.revoked.read().map_err(|_| Status::internal("internal error"))?;
        if revoked.contains(&claims.jti) {
            return Err(Status::unauthenticated("this session was logged out: log in again"));
        }
        drop(revoked);
        let who = claims.customer();
        record_user(&who);
        req.extensions_mut().insert(Customer { who, claims });
        Ok(req)
    }
}

/// The customer of a request that passed [`CustomerAuth`].
pub fn customer<T>(req: &Request<T>) -> Result<Customer, Status> {
    req.extensions().get::<Customer>().cloned().ok_or_else(|| Status::unauthenticated("not logged in"))
}

//! The gateway's gRPC services: Session (login), Payments (customers'
//! calls, behind [`crate::auth::CustomerAuth`]), Registry (banks) and Admin.

use crate::auth::{Customer, signed_in};
use crate::backend::GatewayStore;
use crate::coordinator::{Gateway, Outcome};
use crate::error::GatewayError;
use crate::page_token;
use crate::registry::{Refused, Registered};
use crate::store::{PaymentRecord, PaymentState};
use crate::throttle::{self, Key};
use crate::validate;
use std::sync::Arc;
use strife_core::UserRef;
use strife_core::money::format_minor;
use strife_proto::bank::v1 as bank;
use strife_proto::gateway::v1 as pb;
use strife_proto::gateway::v1::ErrorReason;
use strife_rpc::Peer;
use strife_rpc::telemetry::{record_payment, record_user};
use strife_rpc::trace::TraceContext;
use strife_rpc::wire::{account, decline_reason, timestamp};
use tonic::{Request, Response, Status};

fn unavailable(bank: &str, status: &Status) -> GatewayError {
    tracing::warn!(%bank, code = ?status.code(), message = status.message(), "bank call failed");
    GatewayError::unavailable(
        ErrorReason::BankUnavailable,
        format!("bank {bank} is unreachable right now; try again shortly"),
    )
}

/// The trace of a call, as the call-log layer put it in the extensions
/// (a new one if the service runs without that layer, as in unit tests).
fn call_trace<T>(req: &Request<T>) -> TraceContext {
    req.extensions().get::<TraceContext>().copied().unwrap_or_else(TraceContext::new_root)
}

/// A request to a bank on behalf of a call in `trace`.
fn traced<T>(msg: T, trace: &TraceContext) -> Request<T> {
    let mut req = Request::new(msg);
    strife_rpc::telemetry::outgoing(trace).inject(&mut req);
    req
}

#[derive(Clone)]
pub struct SessionService<S> {
    pub gateway: Arc<Gateway<S>>,
}

#[tonic::async_trait]
impl<S: GatewayStore> pb::session_service_server::SessionService for SessionService<S> {
    async fn login(&self, req: Request<pb::LoginRequest>) -> Result<Response<pb::LoginResponse>, Status> {
        let answer = self.check_login(req).await;
        let result = match &answer {
            Ok(_) => "ok",
            Err(status) => match strife_rpc::errors::reason_of(status) {
                Some(ErrorReason::WrongCredentials) => "wrong_credentials",
                Some(ErrorReason::LoginThrottled) => "throttled",
                Some(ErrorReason::InvalidRequest) => "invalid",
                _ => "failed",
            },
        };
        strife_rpc::metrics::GATEWAY.logins.get_or_create(&[("result", result)]).inc();
        answer
    }
}

impl<S: GatewayStore> SessionService<S> {
    /// A login: the account's and the address's failure counts, the bank's
    /// password check, the token.
    async fn check_login(
        &self,
        req: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let peer_ip = req.remote_addr().map(|a| a.ip().to_string()).unwrap_or_else(|| "unknown".into());
        let trace = call_trace(&req);
        let (who, password) = validate::login(req.into_inner())?;
        record_user(&who);
        let account = who.to_string();
        let keys = [Key::Account(&account), Key::Peer(&peer_ip)];
        let store = &self.gateway.store;
        let found = store.throttle_entries(keys.iter().map(Key::text).collect()).await?;
        if let Err(wait) = throttle::check(&found, strife_core::unix_ms()) {
            let secs = wait.as_secs().max(1);
            return Err(GatewayError::Throttled {
                retry_after: wait,
                message: format!("too many failed logins: try again in {secs} s"),
            }
            .into());
        }
        let entry = self.gateway.bank(&who.bank).ok_or_else(|| GatewayError::unknown_bank(&who.bank))?;
        let call = entry.call(|mut client| {
            let req = traced(
                bank::VerifyPasswordRequest { user: who.user.clone(), password: password.expose().clone() },
                &trace,
            );
            async move { client.verify_password(req).await }
        });
        let valid = match tokio::time::timeout(self.gateway.config.prepare_timeout(), call).await {
            Ok(Ok(resp)) => resp.into_inner().valid,
            Ok(Err(status)) if status.code() == tonic::Code::ResourceExhausted => {
                return Err(GatewayError::Overloaded(status.message().to_owned()).into());
            }
            Ok(Err(status)) => return Err(unavailable(&who.bank, &status).into()),
            Err(_) => return Err(unavailable(&who.bank, &Status::deadline_exceeded("timeout")).into()),
        };
        if !valid {
            let mut counted = Vec::with_capacity(keys.len());
            for key in &keys {
                let rule = key.rule(&self.gateway.throttle);
                counted.push(store.throttle_failure(key.text(), rule, strife_core::unix_ms()).await?);
            }
            for ((key, before), after) in keys.iter().zip(&found).zip(&counted) {
                if after.locks > before.locks {
                    let secs = (after.locked_until_ms - strife_core::unix_ms()).max(0) / 1000;
                    strife_rpc::metrics::GATEWAY.login_locks.inc();
                    tracing::warn!(key = %key.text(), lock_secs = secs, "too many failed logins; locked");
                }
            }
            tokio::time::sleep(throttle::delay_after(&found, &counted)).await;
            return Err(GatewayError::unauthenticated(
                ErrorReason::WrongCredentials,
                "wrong user name or password",
            )
            .into());
        }
        // Failures count in a row: a success starts the count again.
        for (key, entry) in keys.iter().zip(&found) {
            if entry.failures > 0 {
                store.throttle_success(key.text()).await?;
            }
        }
        let (token, claims) = self
            .gateway
            .tokens()
            .issue(&who)
            .map_err(|e| GatewayError::Internal(format!("issuing a token: {e}")))?;
        tracing::info!(customer = %who, "logged in");
        let expires_ms = i64::try_from(claims.exp).unwrap_or(i64::MAX / 1000).saturating_mul(1000);
        Ok(Response::new(pb::LoginResponse {
            token: token.expose().clone(),
            expire_time: Some(timestamp(expires_ms)),
        }))
    }
}

#[derive(Clone)]
pub struct PaymentsService<S> {
    pub gateway: Arc<Gateway<S>>,
}

fn to_status(state: PaymentState) -> pb::PaymentStatus {
    match state {
        PaymentState::Committed => pb::PaymentStatus::Committed,
        PaymentState::Aborted => pb::PaymentStatus::Declined,
        PaymentState::Preparing => pb::PaymentStatus::Pending,
    }
}

/// A payment as `me` sees it.
fn view(me: &UserRef, p: PaymentRecord) -> pb::Payment {
    let sent = p.payer == *me;
    pb::Payment {
        payment_id: p.payment_id,
        direction: if sent { pb::Direction::Sent } else { pb::Direction::Received }.into(),
        counterparty: Some(account(if sent { &p.payee } else { &p.payer })),
        amount: format_minor(p.amount_minor),
        status: to_status(p.state).into(),
        reason: p.reason.map(decline_reason).unwrap_or_default().into(),
        create_time: Some(timestamp(p.created_at_ms)),
    }
}

#[tonic::async_trait]
impl<S: GatewayStore> pb::payments_service_server::PaymentsService for PaymentsService<S> {
    async fn logout(&self, req: Request<pb::LogoutRequest>) -> Result<Response<pb::LogoutResponse>, Status> {
        let Customer { who, claims } = signed_in(&self.gateway, &req).await?;
        let jti = claims.jti.clone();
        let exp = i64::try_from(claims.exp).unwrap_or(i64::MAX);
        self.gateway.store.revoke(jti, exp).await?;
        tracing::info!(customer = %who, "logged out");
        Ok(Response::new(pb::LogoutResponse {}))
    }

    async fn get_balance(
        &self,
        req: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceResponse>, Status> {
        let Customer { who, .. } = signed_in(&self.gateway, &req).await?;
        let trace = call_trace(&req);
        let entry = self.gateway.bank(&who.bank).ok_or_else(|| {
            GatewayError::unavailable(
                ErrorReason::BankUnavailable,
                format!("bank {} is not connected", who.bank),
            )
        })?;
        let call = entry.call(|mut client| {
            let req = traced(bank::GetBalanceRequest { user: who.user.clone() }, &trace);
            async move { client.get_balance(req).await }
        });
        let resp = match tokio::time::timeout(self.gateway.config.prepare_timeout(), call).await {
            Ok(Ok(resp)) => resp.into_inner(),
            Ok(Err(status)) if status.code() == tonic::Code::NotFound => {
                return Err(GatewayError::not_found(
                    ErrorReason::AccountNotFound,
                    format!("{who} has no account"),
                )
                .into());
            }
            Ok(Err(status)) => return Err(unavailable(&who.bank, &status).into()),
            Err(_) => return Err(unavailable(&who.bank, &Status::deadline_exceeded("timeout")).into()),
        };
        Ok(Response::new(pb::GetBalanceResponse {
            account: Some(account(&who)),
            balance: format_minor(resp.balance_minor),
            available: format_minor(resp.available_minor),
        }))
    }

    async fn pay(&self, req: Request<pb::PayRequest>) -> Result<Response<pb::PayResponse>, Status> {
        let Customer { who, .. } = signed_in(&self.gateway, &req).await?;
        let trace = call_trace(&req);
        let pay = validate::pay(&who, req.get_ref())?;
        record_payment(&pay.payment_id, &pay.amount);
        let (payment_id, payee) = (pay.payment_id, pay.payee.clone());
        if self.gateway.bank(&payee.bank).is_none() {
            return Err(GatewayError::unknown_bank(&payee.bank).into());
        }
        let outcome = self.gateway.pay(pay, trace).await?;
        let (status, reason) = match outcome.outcome {
            Outcome::Committed => (pb::PaymentStatus::Committed, pb::DeclineReason::Unspecified),
            Outcome::Declined(r) => (pb::PaymentStatus::Declined, decline_reason(r)),
        };
        Ok(Response::new(pb::PayResponse {
            payment_id: payment_id.to_string(),
            status: status.into(),
            reason: reason.into(),
            replayed: outcome.replayed,
        }))
    }

    async fn get_payment(
        &self,
        req: Request<pb::GetPaymentRequest>,
    ) -> Result<Response<pb::GetPaymentResponse>, Status> {
        let Customer { who, .. } = signed_in(&self.gateway, &req).await?;
        let id = validate::payment_id(&req.get_ref().payment_id)?;
        let me = who.clone();
        let found = self.gateway.store.find_payment_for(me, id.to_string()).await?;
        let p = found.ok_or_else(|| {
            GatewayError::not_found(
                ErrorReason::PaymentNotFound,
                format!("you made and received no payment with id {id}"),
            )
        })?;
        Ok(Response::new(pb::GetPaymentResponse { payment: Some(view(&who, p)) }))
    }

    async fn list_payments(
        &self,
        req: Request<pb::ListPaymentsRequest>,
    ) -> Result<Response<pb::ListPaymentsResponse>, Status> {
        let Customer { who, .. } = signed_in(&self.gateway, &req).await?;
        let query = validate::list_payments(req.get_ref())?;
        let (start_ms, end_ms) = (query.start_ms, query.end_ms);
        let me = who.clone();
        let page = self.gateway.store.list_payments(me, query).await?;
        Ok(Response::new(pb::ListPaymentsResponse {
            payments: page.payments.into_iter().map(|p| view(&who, p)).collect(),
            next_page_token: page.next.map(|c| page_token::encode(&c, start_ms, end_ms)).unwrap_or_default(),
        }))
    }
}

/// Whether a bank that names the cluster it uses (`theirs`; empty from
/// banks older than cluster ids) uses another one than ours.
fn other_cluster(ours: &str, theirs: &str) -> bool {
    !theirs.is_empty() && theirs != ours
}

#[derive(Clone)]
pub struct RegistryService<S> {
    pub gateway: Arc<Gateway<S>>,
}

#[tonic::async_trait]
impl<S: GatewayStore> pb::registry_service_server::RegistryService for RegistryService<S> {
    async fn register_bank(
        &self,
        req: Request<pb::RegisterBankRequest>,
    ) -> Result<Response<pb::RegisterBankResponse>, Status> {
        let peer = strife_rpc::identity::require(&req, &[strife_rpc::PeerRole::Bank])?;
        let req = req.into_inner();
        validate::register(&req)?;
        if peer != Peer::Bank(req.name.clone()) {
            return Err(GatewayError::PermissionDenied(format!(
                "this certificate is for {peer}; it cannot register bank {}",
                req.name
            ))
            .into());
        }
        if other_cluster(&self.gateway.cluster_id, &req.cluster_id) {
            strife_rpc::metrics::GATEWAY.registrations.get_or_create(&[("result", "refused")]).inc();
            // The bank says so itself (its certificate proves it is the
            // bank): it must not be used from here, now or after a restart.
            let known = self
                .gateway
                .registry
                .forget(&req.name, &req.address)
                .map_err(|e| GatewayError::Internal(e.to_string()))?;
            self.gateway.store.forget_bank(req.name.clone(), req.address.clone()).await?;
            if known {
                tracing::warn!(bank = %req.name, address = %req.address, bank_cluster_id = %req.cluster_id,
                    "the bank uses another cluster; forgot it at this address");
            }
            return Err(GatewayError::OtherCluster(format!(
                "this gateway belongs to cluster {}, not to cluster {} that bank {} uses",
                self.gateway.cluster_id, req.cluster_id, req.name
            ))
            .into());
        }
        // The certificate proves the caller is this bank; a new address is
        // another replica of it if it serves the same ledger.
        let registered = self.gateway.registry.register(&req.name, &req.address, &req.ledger_id);
        let result = if registered.is_ok() { "accepted" } else { "refused" };
        strife_rpc::metrics::GATEWAY.registrations.get_or_create(&[("result", result)]).inc();
        let changed = match registered {
            Ok(changed) => changed,
            Err(Refused::OtherLedger { address }) => {
                tracing::warn!(bank = %req.name, address = %req.address, ledger_id = %req.ledger_id, live = %address,
                    "refused a bank process serving another ledger than its live replicas");
                return Err(GatewayError::AlreadyExists(format!(
                    "bank {} is already served from {address} by another ledger; replicas of a bank must share one ledger",
                    req.name
                ))
                .into());
            }
            Err(Refused::Full(why)) => return Err(GatewayError::Overloaded(why).into()),
            Err(Refused::Internal(why)) => return Err(GatewayError::Internal(why).into()),
        };
        self.gateway.registry.note_transfers(&req.name, &req.address, req.transfers);
        if let Registered::Changed = changed {
            self.gateway.store.save_bank(req.name.clone(), req.address.clone()).await?;
            tracing::info!(bank = %req.name, address = %req.address, ledger_id = %req.ledger_id, "bank registered");
        }
        Ok(Response::new(pb::RegisterBankResponse {
            gateway_boot_id: self.gateway.boot_id.clone(),
            cluster_id: self.gateway.cluster_id.clone(),
        }))
    }

    async fn inquire(
        &self,
        req: Request<pb::InquireRequest>,
    ) -> Result<Response<pb::InquireResponse>, Status> {
        validate::inquire(req.get_ref())?;
        let req = req.into_inner();
        if other_cluster(&self.gateway.cluster_id, &req.cluster_id) {
            // This log never saw the bank's payments: presuming abort here
            // could abort a leg that its own cluster committed.
            return Err(GatewayError::OtherCluster(format!(
                "this gateway belongs to cluster {}, not to cluster {} that the bank uses; ask a gateway of that cluster",
                self.gateway.cluster_id, req.cluster_id
            ))
            .into());
        }
        let txn_id = req.txn_id;
        let decision = match self.gateway.inquire(txn_id).await? {
            None => pb::Decision::Pending,
            Some(PaymentState::Committed) => pb::Decision::Commit,
            Some(_) => pb::Decision::Abort,
        };
        Ok(Response::new(pb::InquireResponse { decision: decision.into() }))
    }
}

#[derive(Clone)]
pub struct AdminService<S> {
    pub gateway: Arc<Gateway<S>>,
}

#[tonic::async_trait]
impl<S: GatewayStore> pb::admin_service_server::AdminService for AdminService<S> {
    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let counts = self.gateway.store.counts().await?;
        let banks = self
            .gateway
            .registry
            .status()
            .into_iter()
            .map(|(name, address, reachable)| pb::BankStatus { name, address, reachable })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            gateway_boot_id: self.gateway.boot_id.clone(),
            banks,
            payments_committed: counts.committed,
            payments_declined: counts.aborted,
            payments_pending: counts.preparing,
        }))
    }
}

//! Direct gRPC access for tests that need what the CLI cannot express:
//! raw tokens, other identities' certificates, concurrency.
#![allow(dead_code)]

use std::path::Path;
use strife_proto::gateway::v1 as pb;
use strife_rpc::Peer;
use strife_rpc::pki::CertDir;
use strife_rpc::tls::Tls;
use tonic::transport::Channel;

/// A channel to `server` at `addr`, proving `me` (certificates from `dir`).
pub async fn channel(
    dir: &Path,
    me: Peer,
    server: Peer,
    addr: &str,
) -> Result<Channel, tonic::transport::Error> {
    let tls = Tls::load(&CertDir::new(dir), &me).expect("load identity");
    tls.endpoint(&server, addr).expect("endpoint").connect().await
}

pub async fn client_channel(dir: &Path, addr: &str) -> Channel {
    channel(dir, Peer::Client("client".into()), Peer::Gateway, addr).await.expect("connect as client")
}

pub async fn login(ch: &Channel, bank: &str, user: &str, password: &str) -> Result<String, tonic::Status> {
    let mut c = pb::session_service_client::SessionServiceClient::new(ch.clone());
    let r =
        c.login(pb::LoginRequest { bank: bank.into(), user: user.into(), password: password.into() }).await?;
    Ok(r.into_inner().token)
}

pub fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    req
}

pub fn payments(ch: &Channel) -> pb::payments_service_client::PaymentsServiceClient<Channel> {
    pb::payments_service_client::PaymentsServiceClient::new(ch.clone())
}

pub async fn balance(ch: &Channel, token: &str) -> Result<pb::GetBalanceResponse, tonic::Status> {
    Ok(payments(ch).get_balance(authed(pb::GetBalanceRequest {}, token)).await?.into_inner())
}

pub async fn pay(
    ch: &Channel,
    token: &str,
    id: &str,
    to_user: &str,
    to_bank: &str,
    amount: &str,
) -> Result<pb::PayResponse, tonic::Status> {
    let req = pb::PayRequest {
        payment_id: id.into(),
        payee: Some(pb::Account { user: to_user.into(), bank: to_bank.into() }),
        amount: amount.into(),
    };
    Ok(payments(ch).pay(authed(req, token)).await?.into_inner())
}

pub fn new_id() -> String {
    strife_core::PaymentId::new_random().to_string()
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

//! Starting a bank: storage, accounts, TLS, the gRPC server, and the task
//! that keeps the bank registered with the gateway.

use crate::accounts::{AccountSpec, Credential, hash_password, load_accounts_file, sample_accounts};
use crate::ledger::{Decision, Ledger, StoreUrl};
use crate::postgres::PostgresLedger;
use crate::service::{BankService, only_gateway};
use crate::store::{SqliteLedger, now_ms};
use anyhow::Context;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;
use strife_core::Secret;
use strife_core::limits::MESSAGE_MAX_BYTES;
use strife_proto::bank::v1::bank_service_server::BankServiceServer;
use strife_proto::gateway::v1 as gw;
use strife_rpc::config::GATEWAY_ADDR_FILE;
use strife_rpc::pki::CertDir;
use strife_rpc::tls::Tls;
use strife_rpc::{Config, Peer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Everything a bank needs to start.
#[derive(Debug, Clone)]
pub struct BankOptions {
    /// The Strife directory (certificates in `certs/`, logs in `logs/`).
    pub dir: PathBuf,
    /// This bank's name; its certificate must name it.
    pub name: String,
    pub config: Config,
    /// The gateway's address, overriding config and `DIR/gateway.addr`.
    pub gateway: Option<String>,
    /// Accounts to create if they do not exist yet.
    pub accounts: Option<PathBuf>,
}

/// Runs a bank on `listener` until `shutdown` resolves, with the ledger
/// that `bank.store` names (SQLite by default, or PostgreSQL).
pub async fn run(
    opts: BankOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let tls = Tls::load(&CertDir::new(&opts.dir), &Peer::Bank(opts.name.clone()))?;
    let data = opts.config.bank.data_dir(&opts.dir, &opts.name);
    let store = StoreUrl::parse("bank.store", &opts.config.bank.store, data.join("bank.db"))?;
    tracing::info!(store = %store.redacted(), "opening the ledger");
    match store {
        StoreUrl::Sqlite(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let ledger = SqliteLedger::open(&path, &opts.name)
                .with_context(|| format!("opening {}", path.display()))?;
            serve(opts, tls, ledger, listener, shutdown).await
        }
        StoreUrl::Postgres(url) => {
            let ledger = PostgresLedger::connect(&url, &opts.name).await.with_context(|| {
                format!("opening the ledger in {}", StoreUrl::Postgres(url.clone()).redacted())
            })?;
            serve(opts, tls, ledger, listener, shutdown).await
        }
    }
}

/// Creates the accounts of `--accounts FILE`, or the sample accounts in an
/// empty ledger; then serves.
async fn serve<L: Ledger>(
    opts: BankOptions,
    tls: Tls,
    ledger: L,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let created = match &opts.accounts {
        Some(path) => ledger.create_accounts(load_accounts_file(path)?).await?,
        None if ledger.account_count().await? == 0 => {
            let samples = sample_accounts()
                .into_iter()
                .map(|a| AccountSpec {
                    user: a.user,
                    credential: Credential::Password(a.password),
                    balance_minor: a.balance_minor,
                })
                .collect();
            ledger.create_accounts(samples).await?
        }
        None => 0,
    };
    if created > 0 {
        tracing::info!(created, "created accounts");
    }
    let decoy_hash = hash_password(&Secret::new(uuid_like()))?;
    let service = BankService::new(ledger, decoy_hash);
    let open = service.ledger().open_legs(i64::MAX, u32::MAX).await?.len();
    if open > 0 {
        tracing::info!(open, "legs prepared and waiting for the gateway's decision");
    }

    let local = listener.local_addr()?;
    let (_health_reporter, health, reflection_v1, reflection_v1alpha) =
        strife_rpc::serve::standard_services(&["strife.bank.v1.BankService"]).await?;
    let bank = InterceptedService::new(
        BankServiceServer::new(service.clone()).max_decoding_message_size(MESSAGE_MAX_BYTES),
        only_gateway as fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let registration =
        tokio::spawn(keep_registered(opts.clone(), tls.clone(), local.to_string(), stop_rx.clone()));
    let inquiries = tokio::spawn(resolve_in_doubt(opts.clone(), tls.clone(), service, stop_rx));
    strife_rpc::serve::announce_listening(&opts.name, local);
    tracing::info!(bank = %opts.name, %local, "bank serving");
    let served = strife_rpc::serve::builder(&tls)?
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(bank)
        .serve_with_incoming_shutdown(strife_rpc::serve::incoming(listener), shutdown)
        .await;
    let _ = stop_tx.send(true);
    let _ = registration.await;
    let _ = inquiries.await;
    served.context("serving")?;
    tracing::info!("bank stopped");
    Ok(())
}

fn uuid_like() -> String {
    strife_core::PaymentId::new_random().to_string()
}

/// Where the gateway is: `--gateway`, then config, then `DIR/gateway.addr`
/// (read again each time, so a gateway restarted elsewhere is found).
fn gateway_address(opts: &BankOptions) -> Option<String> {
    opts.gateway
        .clone()
        .or_else(|| (!opts.config.bank.gateway.is_empty()).then(|| opts.config.bank.gateway.clone()))
        .or_else(|| {
            std::fs::read_to_string(opts.dir.join(GATEWAY_ADDR_FILE)).ok().map(|s| s.trim().to_owned())
        })
}

/// A channel to the gateway, remade when its address changes.
struct GatewayLink {
    opts: BankOptions,
    tls: Tls,
    current: Option<(String, Channel)>,
}

impl GatewayLink {
    fn channel(&mut self) -> Result<Channel, String> {
        let addr = gateway_address(&self.opts).ok_or_else(|| {
            "no gateway address: pass --gateway, set bank.gateway, or start with `strife up`".to_owned()
        })?;
        if self.current.as_ref().is_none_or(|(a, _)| *a != addr) {
            let channel = self
                .tls
                .channel(&Peer::Gateway, &addr)
                .map_err(|e| format!("gateway address '{addr}': {e}"))?;
            self.current = Some((addr, channel));
        }
        self.current.as_ref().map(|(_, c)| c.clone()).ok_or_else(|| "no channel".to_owned())
    }
}

/// Registers with the gateway now, and again every interval, which is also
/// how the bank notices that the gateway restarted (its boot id changes).
async fn keep_registered(opts: BankOptions, tls: Tls, my_addr: String, mut stop: watch::Receiver<bool>) {
    let interval = Duration::from_millis(opts.config.bank.register_interval_ms);
    let name = opts.name.clone();
    let mut link = GatewayLink { opts, tls, current: None };
    let mut boot_id = String::new();
    let mut failing = false;
    let mut backoff = Duration::from_millis(50);
    loop {
        let outcome = match link.channel() {
            Err(why) => Err(why),
            Ok(ch) => {
                let mut client = gw::registry_service_client::RegistryServiceClient::new(ch);
                let req = gw::RegisterBankRequest { name: name.clone(), address: my_addr.clone() };
                match tokio::time::timeout(interval.max(Duration::from_secs(2)), client.register_bank(req))
                    .await
                {
                    Ok(Ok(resp)) => Ok(resp.into_inner().gateway_boot_id),
                    Ok(Err(status)) => Err(format!("gateway refused: {}", status.message())),
                    Err(_) => Err("gateway did not answer in time".to_owned()),
                }
            }
        };
        let wait = match outcome {
            Ok(id) => {
                if id != boot_id {
                    tracing::info!(gateway_boot_id = %id, "registered with the gateway");
                    boot_id = id;
                }
                failing = false;
                backoff = Duration::from_millis(50);
                interval
            }
            Err(why) => {
                if !failing {
                    tracing::warn!(%why, "cannot register with the gateway; retrying");
                    failing = true;
                }
                backoff = (backoff * 2).min(interval);
                backoff
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Most in-doubt legs asked about in one round.
const INQUIRY_BATCH_MAX: u32 = 256;
/// Longest wait between two inquiries about the same leg.
const INQUIRY_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Asks the gateway for the decision of every leg prepared here that has
/// waited longer than an inquiry interval, with per-leg backoff, and applies
/// the answer. A prepared hold is only ever released by a decision.
async fn resolve_in_doubt<L: Ledger>(
    opts: BankOptions,
    tls: Tls,
    service: BankService<L>,
    mut stop: watch::Receiver<bool>,
) {
    let interval = Duration::from_millis(opts.config.bank.inquiry_interval_ms);
    let interval_ms = i64::try_from(opts.config.bank.inquiry_interval_ms).unwrap_or(i64::MAX);
    let mut link = GatewayLink { opts, tls, current: None };
    let mut next_try: HashMap<String, (Instant, Duration)> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        let before = now_ms().saturating_sub(interval_ms);
        let open = match service.ledger().open_legs(before, INQUIRY_BATCH_MAX).await {
            Ok(open) => open,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list legs in doubt");
                continue;
            }
        };
        next_try.retain(|txn, _| open.contains(txn));
        let Ok(channel) = link.channel() else { continue };
        let mut client = gw::registry_service_client::RegistryServiceClient::new(channel);
        for txn_id in open {
            let now = Instant::now();
            if next_try.get(&txn_id).is_some_and(|(at, _)| *at > now) {
                continue;
            }
            let req = gw::InquireRequest { txn_id: txn_id.clone() };
            let answer =
                tokio::time::timeout(interval.max(Duration::from_secs(2)), client.inquire(req)).await;
            let decision = match answer {
                Ok(Ok(resp)) => resp.into_inner().decision(),
                _ => gw::Decision::Pending,
            };
            let t = txn_id.clone();
            let ledger = service.ledger();
            let applied = match decision {
                gw::Decision::Commit => Some(ledger.decide(t, Decision::Commit).await.map(|_| "commit")),
                gw::Decision::Abort => Some(ledger.decide(t, Decision::Abort).await.map(|_| "abort")),
                // Not decided yet (or an answer we do not know): ask again later.
                gw::Decision::Pending | gw::Decision::Unspecified => None,
            };
            match applied {
                Some(Ok(what)) => {
                    tracing::info!(%txn_id, decision = what, "resolved an in-doubt leg by inquiry");
                    next_try.remove(&txn_id);
                }
                Some(Err(e)) => tracing::error!(%txn_id, error = %e, "cannot apply the gateway's decision"),
                None => {
                    let delay =
                        next_try.get(&txn_id).map_or(interval, |(_, d)| (*d * 2).min(INQUIRY_BACKOFF_MAX));
                    next_try.insert(txn_id, (now + delay, delay));
                }
            }
        }
    }
}

//! Starting a bank: storage, accounts, TLS, the gRPC server, the tasks
//! that keep the bank registered with every gateway it lists, and the one
//! that asks them about legs in doubt.

use crate::accounts::{AccountSpec, Credential, hash_password, load_accounts_file, sample_accounts};
use crate::ledger::{Decision, Ledger, StoreUrl};
use crate::postgres::PostgresLedger;
use crate::service::{BankService, only_gateway};
use crate::store::{SqliteLedger, now_ms};
use anyhow::Context;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;
use std::time::Instant;
use strife_core::Secret;
use strife_core::limits::MESSAGE_MAX_BYTES;
use strife_proto::bank::v1::bank_service_server::BankServiceServer;
use strife_proto::gateway::v1 as gw;
use strife_rpc::config::GATEWAY_ADDR_FILE;
use strife_rpc::errors::reason_of;
use strife_rpc::etcd::{self, Etcd};
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
    /// The gateways' addresses (comma-separated), overriding config and
    /// `DIR/gateway.addr`; the bank registers with every one.
    pub gateway: Option<String>,
    /// Accounts to create if they do not exist yet.
    pub accounts: Option<PathBuf>,
    /// The gateways as etcd lists them, when discovery is through etcd
    /// (set by [`run`] itself; `None` from the caller).
    pub discovered: Option<watch::Receiver<etcd::View>>,
}

/// Runs a bank on `listener` until `shutdown` resolves, with the ledger
/// that `bank.store` names (SQLite by default, or PostgreSQL).
pub async fn run(
    opts: BankOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    check_gateway_list(&opts)?;
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
    let mut opts = opts;
    let mut etcd_registration = None;
    // This process's instance id in etcd: a new one at each start.
    let boot_id = uuid_like();
    if let Some(url) = opts.config.discovery.etcd_url() {
        let etcd = Etcd::connect(&tls, url)?;
        let key = etcd::bank_key(&opts.name, &boot_id);
        let (address, boot) = (local.to_string(), boot_id.clone());
        etcd_registration = Some(etcd::register(
            etcd.clone(),
            key,
            move || etcd::Entry::new(&address, &boot),
            opts.config.discovery.lease_ttl(),
            stop_rx.clone(),
        ));
        opts.discovered = Some(etcd::watch_prefix(etcd, etcd::GATEWAYS_PREFIX.to_owned(), stop_rx.clone()));
        tracing::info!(%url, "discovery through etcd: registering there, and finding the gateways there");
    }
    let me = Me {
        name: opts.name.clone(),
        address: local.to_string(),
        ledger_id: service.ledger().ledger_id().to_owned(),
    };
    tracing::info!(ledger_id = %me.ledger_id, "serving the ledger");
    let cluster = Arc::new(Cluster::default());
    let registration =
        tokio::spawn(keep_registered(opts.clone(), tls.clone(), me, cluster.clone(), stop_rx.clone()));
    let stop_rx_metrics = stop_rx.clone();
    let inquiries = tokio::spawn(resolve_in_doubt(opts.clone(), tls.clone(), cluster, service, stop_rx));
    let metrics_listener = strife_rpc::metrics::bind(&opts.config.metrics.listen).await?;
    std::sync::LazyLock::force(&strife_rpc::metrics::BANK);
    strife_rpc::serve::announce_listening(&opts.name, local);
    if let Some(listener) = metrics_listener {
        strife_rpc::metrics::announce(&opts.name, listener.local_addr()?);
        tokio::spawn(strife_rpc::metrics::serve(listener, tls.clone(), stop_rx_metrics));
    }
    tracing::info!(bank = %opts.name, %local, "bank serving");
    let served = strife_rpc::serve::builder()
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(bank)
        .serve_with_incoming_shutdown(strife_rpc::serve::incoming(listener, &tls), shutdown)
        .await;
    let _ = stop_tx.send(true);
    let _ = registration.await;
    let _ = inquiries.await;
    if let Some(mut state) = etcd_registration {
        // The lease is revoked at stop, so that the gateways stop using
        // this replica at once; wait for that, briefly.
        let _ = tokio::time::timeout(STOP_UNREGISTER_MAX, state.wait_for(|s| !s.registered)).await;
    }
    served.context("serving")?;
    tracing::info!("bank stopped");
    Ok(())
}

fn uuid_like() -> String {
    strife_core::PaymentId::new_random().to_string()
}

/// Longest a stopping bank waits for its etcd key to be removed.
const STOP_UNREGISTER_MAX: Duration = Duration::from_secs(2);

/// Most gateways one bank registers with.
pub const GATEWAYS_MAX: usize = 16;

/// The gateways: `--gateway`, then config, then `DIR/gateway.addr` (read
/// again each time, so a gateway restarted elsewhere is found); each a
/// list separated by commas (or, in the file, by white space). Duplicates
/// are dropped, and any beyond [`GATEWAYS_MAX`].
///
/// With discovery through etcd, the gateways registered there instead, once
/// etcd has been read (until then, and never after, the list above): a
/// gateway that stops renewing its lease leaves the list, a new one joins.
fn gateway_addresses(opts: &BankOptions) -> Vec<String> {
    if let Some(view) = &opts.discovered {
        let view = view.borrow();
        if view.loaded {
            let mut out: Vec<String> = view.parsed().into_values().map(|e| e.address).collect();
            out.sort();
            out.dedup();
            out.truncate(GATEWAYS_MAX);
            return out;
        }
    }
    let text = opts
        .gateway
        .clone()
        .or_else(|| (!opts.config.bank.gateway.is_empty()).then(|| opts.config.bank.gateway.clone()))
        .or_else(|| std::fs::read_to_string(opts.dir.join(GATEWAY_ADDR_FILE)).ok())
        .unwrap_or_default();
    let mut out: Vec<String> = Vec::new();
    for addr in text.split(|c: char| c == ',' || c.is_whitespace()).filter(|a| !a.is_empty()) {
        if out.len() < GATEWAYS_MAX && !out.iter().any(|a| a == addr) {
            out.push(addr.to_owned());
        }
    }
    out
}

/// Refuses a `--gateway` or `bank.gateway` list longer than [`GATEWAYS_MAX`]
/// rather than quietly ignoring part of it.
fn check_gateway_list(opts: &BankOptions) -> anyhow::Result<()> {
    for list in [opts.gateway.as_deref(), Some(opts.config.bank.gateway.as_str())].into_iter().flatten() {
        let count = list.split(',').filter(|a| !a.trim().is_empty()).count();
        anyhow::ensure!(
            count <= GATEWAYS_MAX,
            "{count} gateways listed; a bank registers with at most {GATEWAYS_MAX}"
        );
    }
    Ok(())
}

const NO_GATEWAY: &str = "no gateway address: pass --gateway, set bank.gateway, or start with `strife up`";

/// The cluster of gateways this process uses, shared by its registration
/// loops and its inquiries. A bank uses the gateways of one cluster (one
/// payment log) only: a gateway that never saw a payment presumes it
/// aborted, so asking one of another cluster about a leg could abort a leg
/// that its own cluster committed.
#[derive(Default)]
struct Cluster {
    /// The cluster id of the first gateway that answered with one; kept
    /// for the life of the process.
    id: OnceLock<String>,
    /// Whether any gateway has answered a registration yet (until one has,
    /// the gateways are tried one at a time, so the first decides).
    reached: AtomicBool,
    /// Gateways that answered from this cluster (or, older than cluster
    /// ids, with none): the ones asked about legs in doubt.
    ours: RwLock<HashSet<String>>,
}

impl Cluster {
    /// The cluster id to send; empty until a gateway told one.
    fn id(&self) -> String {
        self.id.get().cloned().unwrap_or_default()
    }

    fn reached(&self) -> bool {
        self.reached.load(Ordering::Relaxed)
    }

    /// `gateway` answered a registration with cluster id `theirs`: whether
    /// it is of this process's cluster (the first id seen becomes it).
    fn judge(&self, gateway: &str, theirs: &str) -> bool {
        self.reached.store(true, Ordering::Relaxed);
        let ours = theirs.is_empty() || self.id.get_or_init(|| theirs.to_owned()) == theirs;
        if let Ok(mut set) = self.ours.write() {
            if ours {
                set.insert(gateway.to_owned());
            } else {
                set.remove(gateway);
            }
        }
        ours
    }

    /// `gateway` refused us as being of another cluster.
    fn disown(&self, gateway: &str) {
        if let Ok(mut set) = self.ours.write() {
            set.remove(gateway);
        }
    }

    fn is_ours(&self, gateway: &str) -> bool {
        self.ours.read().is_ok_and(|set| set.contains(gateway))
    }
}

/// What registering with one gateway came to.
enum Registration {
    /// Registered; the gateway's boot id.
    Done(String),
    /// The gateway belongs to another cluster: it is not used.
    OtherCluster,
    /// The gateway refused: another process of this bank, serving another
    /// ledger, is registered there and live.
    OtherLedger(String),
    /// Not now (unreachable, overloaded, too slow): try again soon.
    Failed(String),
}

/// What a bank sends when it registers.
#[derive(Clone)]
struct Me {
    name: String,
    /// Where this process serves.
    address: String,
    /// The id of the ledger it serves.
    ledger_id: String,
}

/// Registers once with the gateway at `gateway`.
async fn register_once(
    me: &Me,
    cluster: &Cluster,
    gateway: &str,
    channel: &Channel,
    timeout: Duration,
) -> Registration {
    let mut client = gw::registry_service_client::RegistryServiceClient::new(channel.clone());
    let req = gw::RegisterBankRequest {
        name: me.name.clone(),
        address: me.address.clone(),
        ledger_id: me.ledger_id.clone(),
        cluster_id: cluster.id(),
        // This process serves Transfer and ResolveTransfer (one phase).
        transfers: true,
    };
    match tokio::time::timeout(timeout, client.register_bank(req)).await {
        Ok(Ok(resp)) => {
            let resp = resp.into_inner();
            if cluster.judge(gateway, &resp.cluster_id) {
                strife_rpc::metrics::BANK.registrations.get_or_create(&[("result", "accepted")]).inc();
                Registration::Done(resp.gateway_boot_id)
            } else {
                Registration::OtherCluster
            }
        }
        Ok(Err(status)) if reason_of(&status) == Some(gw::ErrorReason::OtherCluster) => {
            cluster.reached.store(true, Ordering::Relaxed);
            cluster.disown(gateway);
            Registration::OtherCluster
        }
        Ok(Err(status)) if status.code() == tonic::Code::AlreadyExists => {
            cluster.reached.store(true, Ordering::Relaxed);
            Registration::OtherLedger(status.message().to_owned())
        }
        Ok(Err(status)) => Registration::Failed(format!("gateway refused: {}", status.message())),
        Err(_) => Registration::Failed("gateway did not answer in time".to_owned()),
    }
}

/// How long one registration may take.
fn register_timeout(interval: Duration) -> Duration {
    interval.max(Duration::from_secs(2))
}

/// Keeps the bank registered with every gateway of its cluster: one loop
/// per gateway address ([`register_with`]), started and stopped as the list
/// changes (it is read again every interval); all of them end at `stop`.
/// Until some gateway has answered, the gateways are tried one at a time in
/// the order listed, so that the first that answers decides the cluster;
/// then each gets its loop.
async fn keep_registered(
    opts: BankOptions,
    tls: Tls,
    me: Me,
    cluster: Arc<Cluster>,
    mut stop: watch::Receiver<bool>,
) {
    let interval = Duration::from_millis(opts.config.bank.register_interval_ms);
    let mut loops: HashMap<String, (watch::Sender<bool>, tokio::task::JoinHandle<()>)> = HashMap::new();
    let mut backoff = Duration::from_millis(50);
    let mut warned = false;
    loop {
        let wanted = gateway_addresses(&opts);
        let gone: Vec<String> = loops.keys().filter(|a| !wanted.contains(a)).cloned().collect();
        for addr in gone {
            if let Some((tx, task)) = loops.remove(&addr) {
                tracing::info!(gateway = %addr, "no longer registering with this gateway");
                let _ = tx.send(true);
                let _ = task.await;
            }
        }
        if !cluster.reached() {
            for addr in &wanted {
                let Ok(channel) = tls.channel(&Peer::Gateway, addr) else { continue };
                if let Registration::Failed(why) =
                    register_once(&me, &cluster, addr, &channel, register_timeout(interval)).await
                {
                    tracing::debug!(gateway = %addr, %why, "cannot register with the gateway");
                } else {
                    break;
                }
            }
        }
        if cluster.reached() {
            for addr in &wanted {
                if !loops.contains_key(addr) {
                    let (tx, rx) = watch::channel(false);
                    let task = tokio::spawn(register_with(
                        me.clone(),
                        cluster.clone(),
                        tls.clone(),
                        addr.clone(),
                        interval,
                        rx,
                    ));
                    loops.insert(addr.clone(), (tx, task));
                }
            }
        }
        // Until some gateway is known and has answered, look again soon.
        let wait = if wanted.is_empty() || !cluster.reached() {
            if !warned {
                let why = if wanted.is_empty() { NO_GATEWAY } else { "no gateway answers" };
                tracing::warn!(why, "cannot register with the gateway; retrying");
                warned = true;
            }
            backoff = (backoff * 2).min(interval);
            backoff
        } else {
            interval
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => break,
        }
    }
    for (_, (tx, task)) in loops {
        let _ = tx.send(true);
        let _ = task.await;
    }
}

/// Registers with the gateway at `gateway` now, and again every interval,
/// which is also how the bank notices that it restarted (its boot id
/// changes). A gateway of another cluster is logged once and not used.
async fn register_with(
    me: Me,
    cluster: Arc<Cluster>,
    tls: Tls,
    gateway: String,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let channel = match tls.channel(&Peer::Gateway, &gateway) {
        Ok(channel) => Some(channel),
        Err(e) => {
            tracing::warn!(%gateway, error = %e, "not a gateway address; not registering there");
            None
        }
    };
    let mut boot_id = String::new();
    let (mut failing, mut foreign, mut refused) = (false, false, false);
    let mut backoff = Duration::from_millis(50);
    loop {
        let wait = match &channel {
            None => interval,
            Some(ch) => match register_once(&me, &cluster, &gateway, ch, register_timeout(interval)).await {
                Registration::Done(id) => {
                    if id != boot_id {
                        tracing::info!(%gateway, gateway_boot_id = %id, cluster_id = %cluster.id(),
                            "registered with the gateway");
                        boot_id = id;
                    }
                    (failing, foreign, refused) = (false, false, false);
                    backoff = Duration::from_millis(50);
                    interval
                }
                Registration::OtherCluster => {
                    if !foreign {
                        tracing::error!(%gateway, cluster_id = %cluster.id(),
                            "gateway {gateway} belongs to another cluster; it is not used");
                        foreign = true;
                    }
                    boot_id.clear();
                    interval
                }
                Registration::OtherLedger(why) => {
                    if !refused {
                        tracing::error!(%gateway, ledger_id = %me.ledger_id,
                            "the gateway refuses this process (ALREADY_EXISTS): {why}");
                        refused = true;
                    }
                    boot_id.clear();
                    interval
                }
                Registration::Failed(why) => {
                    if !failing {
                        tracing::warn!(%gateway, %why, "cannot register with the gateway; retrying");
                        failing = true;
                    }
                    backoff = (backoff * 2).min(interval);
                    backoff
                }
            },
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The gateways a bank asks about its legs in doubt, with a channel to
/// each: the one that answered last is asked first, the others in turn
/// when it does not answer. Only gateways of the bank's cluster are asked.
struct Gateways {
    opts: BankOptions,
    tls: Tls,
    cluster: Arc<Cluster>,
    /// `(address, channel)` in the order of the list.
    channels: Vec<(String, Channel)>,
    /// The address that answered last.
    preferred: Option<String>,
}

impl Gateways {
    /// Reads the list again, keeping the channels of unchanged addresses.
    fn refresh(&mut self) {
        let mut channels = Vec::new();
        for addr in gateway_addresses(&self.opts) {
            let known = self.channels.iter().position(|(a, _)| *a == addr);
            let channel = match known {
                Some(i) => self.channels.swap_remove(i).1,
                None => match self.tls.channel(&Peer::Gateway, &addr) {
                    Ok(channel) => channel,
                    Err(_) => continue,
                },
            };
            channels.push((addr, channel));
        }
        self.channels = channels;
    }

    /// The decision of `txn_id` from the first gateway that answers, or
    /// `None` if none does.
    async fn inquire(&mut self, txn_id: &str, timeout: Duration) -> Option<gw::Decision> {
        let first = self.preferred.as_ref().and_then(|p| self.channels.iter().position(|(a, _)| a == p));
        let count = self.channels.len();
        let order = first.into_iter().chain((0..count).filter(|i| Some(*i) != first));
        for i in order {
            let (addr, channel) = &self.channels[i];
            if !self.cluster.is_ours(addr) {
                continue;
            }
            let mut client = gw::registry_service_client::RegistryServiceClient::new(channel.clone());
            let req = gw::InquireRequest { txn_id: txn_id.to_owned(), cluster_id: self.cluster.id() };
            match tokio::time::timeout(timeout, client.inquire(req)).await {
                Ok(Ok(resp)) => {
                    self.preferred = Some(addr.clone());
                    return Some(resp.into_inner().decision());
                }
                Ok(Err(status)) => {
                    tracing::debug!(gateway = %addr, %txn_id, message = status.message(), "inquiry failed")
                }
                Err(_) => tracing::debug!(gateway = %addr, %txn_id, "inquiry timed out"),
            }
        }
        None
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
    cluster: Arc<Cluster>,
    service: BankService<L>,
    mut stop: watch::Receiver<bool>,
) {
    let interval = Duration::from_millis(opts.config.bank.inquiry_interval_ms);
    let interval_ms = i64::try_from(opts.config.bank.inquiry_interval_ms).unwrap_or(i64::MAX);
    let mut gateways = Gateways { opts, tls, cluster, channels: Vec::new(), preferred: None };
    let mut next_try: HashMap<String, (Instant, Duration)> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        match service.ledger().in_doubt().await {
            Ok(doubt) => {
                let m = &strife_rpc::metrics::BANK;
                m.in_doubt.set(doubt.legs);
                let age_ms = doubt.oldest_prepared_at_ms.map_or(0, |at| now_ms().saturating_sub(at).max(0));
                m.in_doubt_oldest_seconds.set(age_ms as f64 / 1000.0);
            }
            Err(e) => tracing::warn!(error = %e, "cannot count legs in doubt"),
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
        gateways.refresh();
        for txn_id in open {
            let now = Instant::now();
            if next_try.get(&txn_id).is_some_and(|(at, _)| *at > now) {
                continue;
            }
            let answer = gateways.inquire(&txn_id, interval.max(Duration::from_secs(2))).await;
            let Some(decision) = answer else {
                // No gateway answers: ask about the rest in the next round.
                tracing::debug!(%txn_id, "no gateway answered an inquiry");
                break;
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

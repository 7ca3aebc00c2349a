//! Starting the gateway: TLS, storage and recovery, token keys, the bank
//! registry, the gRPC services, and the finisher task.

use crate::auth::{CustomerAuth, only_banks, only_clients};
use crate::backend::{GatewayStore, SqliteStore, StoreUrl};
use crate::coordinator::Gateway;
use crate::postgres::{Leases, PostgresStore};
use crate::registry::Registry;
use crate::service::{AdminService, PaymentsService, RegistryService, SessionService};
use crate::tokens::{TokenKeys, load_keys};
use anyhow::Context;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use strife_core::limits::MESSAGE_MAX_BYTES;
use strife_proto::gateway::v1 as pb;
use strife_rpc::etcd::{self, Etcd};
use strife_rpc::pki::CertDir;
use strife_rpc::tls::Tls;
use strife_rpc::{Config, Peer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;

use strife_rpc::config::GATEWAY_ADDR_FILE;
/// How long shutdown waits for payments in flight.
const DRAIN_MAX: Duration = Duration::from_secs(10);

type Check = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;

#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// The Strife directory (certificates, logs, `gateway.addr`).
    pub dir: PathBuf,
    pub config: Config,
    /// Write this gateway's address to `DIR/gateway.addr` for clients. Off
    /// under `strife up`, which writes the list of every gateway there.
    pub write_address_file: bool,
}

/// Longest a stopping gateway waits for its etcd key to be removed.
const STOP_UNREGISTER_MAX: Duration = Duration::from_secs(2);

/// Registers this gateway in etcd under a lease (its boot id is its
/// instance), and follows the banks' keys there: a replica whose key goes
/// (killed, paused, cut off: its lease ran out) is no longer live for
/// calls, and one whose key appears is known at once (to be tried when no
/// live replica is) until it registers with its ledger id. What a key says
/// is only where: calls to it still require that bank's certificate.
fn discover<S: GatewayStore>(
    url: &str,
    opts: &GatewayOptions,
    tls: &Tls,
    gateway: &Arc<Gateway<S>>,
    local: std::net::SocketAddr,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(watch::Receiver<etcd::RegistrationState>, tokio::task::JoinHandle<()>)> {
    let etcd = Etcd::connect(tls, url)?;
    let boot_id = gateway.boot_id.clone();
    let (address, boot) = (local.to_string(), boot_id.clone());
    let state = etcd::register(
        etcd.clone(),
        etcd::gateway_key(&boot_id),
        move || etcd::Entry::new(&address, &boot),
        opts.config.discovery.lease_ttl(),
        stop.clone(),
    );
    let mut banks = etcd::watch_prefix(etcd, etcd::BANKS_PREFIX.to_owned(), stop.clone());
    let gateway = gateway.clone();
    let mut stop = stop;
    let watcher = tokio::spawn(async move {
        let mut known: std::collections::BTreeSet<(String, String)> = Default::default();
        loop {
            let now: std::collections::BTreeSet<(String, String)> = {
                let view = banks.borrow_and_update();
                if !view.loaded {
                    known.clone()
                } else {
                    view.parsed()
                        .into_iter()
                        .filter_map(|(key, entry)| {
                            let rest = key.strip_prefix(etcd::BANKS_PREFIX)?;
                            let (name, _instance) = rest.split_once('/')?;
                            Some((name.to_owned(), entry.address))
                        })
                        .collect()
                }
            };
            for (name, address) in now.difference(&known) {
                if gateway
                    .registry
                    .get(name)
                    .is_none_or(|b| !b.replicas.iter().any(|r| r.address == *address))
                    && let Err(e) = gateway.registry.restore(name, address)
                {
                    tracing::warn!(bank = %name, %address, error = %e, "cannot add a bank replica found in etcd");
                }
            }
            for (name, address) in known.difference(&now) {
                if let Ok(true) = gateway.registry.expire(name, address) {
                    tracing::info!(bank = %name, %address, "bank replica gone from etcd: not used while others are live");
                }
            }
            known = now;
            tokio::select! {
                changed = banks.changed() => if changed.is_err() { return },
                _ = stop.changed() => return,
            }
        }
    });
    tracing::info!(%url, "discovery through etcd: registering there, and following the banks there");
    Ok((state, watcher))
}

/// Runs the gateway on `listener` until `shutdown` resolves.
pub async fn run(
    opts: GatewayOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let certs = CertDir::new(&opts.dir);
    let tls = Tls::load(&certs, &Peer::Gateway)?;
    let data = opts.config.gateway.data_dir(&opts.dir);
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let store = StoreUrl::parse("gateway.store", &opts.config.gateway.store, data.join("gateway.db"))?;
    let shown = store.redacted();
    tracing::info!(store = %shown, "opening the store");
    match store {
        StoreUrl::Sqlite(path) => {
            let store = SqliteStore::open(&path)?;
            serve(opts, tls, store, listener, shutdown).await
        }
        StoreUrl::Postgres(url) => {
            let leases = Leases::for_commit_timeout(opts.config.gateway.commit_timeout());
            let store = PostgresStore::connect(&url, leases)
                .await
                .with_context(|| format!("opening the store in {shown}"))?;
            tracing::info!(instance = %store.instance(), "serving as one replica of the gateway");
            serve(opts, tls, store, listener, shutdown).await
        }
    }
}

/// Recovers what the store says was left half-done, restores the bank
/// registry, and serves until `shutdown` resolves.
async fn serve<S: GatewayStore>(
    opts: GatewayOptions,
    tls: Tls,
    store: S,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let certs = CertDir::new(&opts.dir);
    // Recovery: nobody drives a payment that was preparing when we stopped;
    // under presumed abort it is aborted, and the finisher tells its banks.
    let aborted = store.recover().await?;
    if aborted > 0 {
        tracing::warn!(aborted, "aborted payments left undecided by the previous run");
    }
    let registry = Registry::new(
        tls.clone(),
        Duration::from_millis(opts.config.bank.register_interval_ms),
        opts.config.gateway.prepare_timeout(),
        opts.config.gateway.commit_timeout(),
    );
    for (name, address) in store.banks().await? {
        if let Err(e) = registry.restore(&name, &address) {
            tracing::warn!(bank = %name, error = %e, "cannot restore a bank from the registry");
        }
    }
    let keys = store.token_keys(load_keys(&certs.path)?).await?;
    let tokens = TokenKeys::with_keys(&keys, opts.config.gateway.token_ttl_secs)?;
    let cluster_id = store.cluster_id().await?;
    let gateway = Arc::new(Gateway::new(
        store,
        registry,
        tokens,
        certs.path.clone(),
        opts.config.gateway.clone(),
        cluster_id,
    ));

    let local = listener.local_addr()?;
    if opts.write_address_file {
        strife_rpc::pki::write_public_file(&opts.dir.join(GATEWAY_ADDR_FILE), &format!("{local}\n"))?;
    }
    let (_health, health, reflection_v1, reflection_v1alpha) = strife_rpc::serve::standard_services(&[
        "strife.gateway.v1.SessionService",
        "strife.gateway.v1.PaymentsService",
        "strife.gateway.v1.RegistryService",
        "strife.gateway.v1.AdminService",
    ])
    .await?;
    let session = InterceptedService::new(
        pb::session_service_server::SessionServiceServer::new(SessionService { gateway: gateway.clone() })
            .max_decoding_message_size(MESSAGE_MAX_BYTES),
        only_clients as Check,
    );
    let payments = InterceptedService::new(
        pb::payments_service_server::PaymentsServiceServer::new(PaymentsService { gateway: gateway.clone() })
            .max_decoding_message_size(MESSAGE_MAX_BYTES),
        CustomerAuth { gateway: gateway.clone() },
    );
    let registry = InterceptedService::new(
        pb::registry_service_server::RegistryServiceServer::new(RegistryService { gateway: gateway.clone() })
            .max_decoding_message_size(MESSAGE_MAX_BYTES),
        only_banks as Check,
    );
    let admin = InterceptedService::new(
        pb::admin_service_server::AdminServiceServer::new(AdminService { gateway: gateway.clone() })
            .max_decoding_message_size(MESSAGE_MAX_BYTES),
        only_clients as Check,
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let discovery = match opts.config.discovery.etcd_url() {
        Some(url) => Some(discover(url, &opts, &tls, &gateway, local, stop_rx.clone())?),
        None => None,
    };
    let metrics_listener = strife_rpc::metrics::bind(&opts.config.metrics.listen).await?;
    let admin_listener = crate::dashboard::bind(&opts.config.admin.listen).await?;
    let admin_key = match admin_listener {
        Some(_) => Some(crate::admin_access::admin_key(&certs.path)?),
        None => None,
    };
    std::sync::LazyLock::force(&strife_rpc::metrics::GATEWAY);
    let finisher = tokio::spawn(gateway.clone().run_finisher(stop_rx.clone()));
    strife_rpc::serve::announce_listening("gateway", local);
    if let Some(listener) = metrics_listener {
        strife_rpc::metrics::announce("gateway", listener.local_addr()?);
        tokio::spawn(strife_rpc::metrics::serve(listener, tls.clone(), stop_rx.clone()));
    }
    let me = crate::cluster::Identity {
        address: local.to_string(),
        admin_address: match &admin_listener {
            Some(listener) => listener.local_addr()?.to_string(),
            None => String::new(),
        },
        started_at_ms: strife_core::unix_ms(),
    };
    let heartbeat = tokio::spawn(crate::cluster::run_heartbeat(gateway.clone(), me.clone(), stop_rx.clone()));
    let audits = match opts.config.admin.audit_interval_secs {
        0 => None,
        secs => Some(tokio::spawn(crate::audit::run_audits(
            gateway.clone(),
            Duration::from_secs(secs),
            stop_rx.clone(),
        ))),
    };
    if let (Some(listener), Some(key)) = (admin_listener, admin_key) {
        let addr = listener.local_addr()?;
        let admin = &opts.config.admin;
        let dashboard = Arc::new(crate::dashboard::Dashboard::new(
            gateway.clone(),
            me,
            crate::admin_access::Access::new(key, Duration::from_secs(admin.session_ttl_secs)),
            !addr.ip().is_loopback(),
            Duration::from_secs(admin.in_doubt_alarm_secs),
        ));
        crate::dashboard::announce(addr);
        tokio::spawn(strife_rpc::metrics::serve_http(listener, dashboard.router(), tls.clone(), stop_rx));
    }
    tracing::info!(%local, boot_id = %gateway.boot_id, cluster_id = %gateway.cluster_id, "gateway serving");
    let served = strife_rpc::serve::builder()
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(session)
        .add_service(payments)
        .add_service(registry)
        .add_service(admin)
        .serve_with_incoming_shutdown(strife_rpc::serve::incoming(listener, &tls), shutdown)
        .await;
    gateway.drain(DRAIN_MAX).await;
    let _ = stop_tx.send(true);
    let _ = finisher.await;
    let _ = heartbeat.await;
    if let Some(audits) = audits {
        let _ = audits.await;
    }
    if let Some((mut state, watcher)) = discovery {
        // The lease is revoked at stop, so that clients and banks stop
        // using this replica at once; wait for that, briefly.
        let _ = tokio::time::timeout(STOP_UNREGISTER_MAX, state.wait_for(|s| !s.registered)).await;
        let _ = watcher.await;
    }
    served.context("serving")?;
    tracing::info!("gateway stopped");
    Ok(())
}

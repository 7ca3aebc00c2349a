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
    let finisher = tokio::spawn(gateway.clone().run_finisher(stop_rx));
    strife_rpc::serve::announce_listening("gateway", local);
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
    served.context("serving")?;
    tracing::info!("gateway stopped");
    Ok(())
}

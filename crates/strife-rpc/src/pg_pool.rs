//! What every Strife store on PostgreSQL does the same way: one connection
//! pool per process, and its schema migrated at start by refinery, one
//! process at a time, on a server that forces its commits to disk.

use anyhow::{Context, bail};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::time::Duration;
use strife_core::Secret;
use tokio_postgres::NoTls;

/// Connections one process keeps to its database.
pub const POOL_SIZE_MAX: usize = 16;
/// Longest wait for a free connection; then the call fails as busy.
const POOL_WAIT: Duration = Duration::from_secs(10);
/// Longest wait for the database's host to answer a new connection (the
/// TCP handshake): a database cut off silently fails a call that needs a
/// new connection in about this time, so that its client moves on.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait to open a connection, authentication included.
const CREATE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection whose sent data stays unacknowledged this long is given up
/// (TCP_USER_TIMEOUT): a database cut off silently fails the call in about
/// this time, as UNAVAILABLE, instead of hanging until TCP's own retries
/// give up (minutes), so that clients move to another gateway.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(3);
/// Keep-alive probes on an idle connection: the first after this idle
/// time, then every [`KEEPALIVE_INTERVAL`], given up after
/// [`KEEPALIVE_RETRIES`] unanswered: a pooled connection to a database that
/// went silent is found dead before a call waits on it for long.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(2);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_RETRIES: u32 = 2;

/// A pool of connections to `url`, which `setting` (e.g. `bank.store`)
/// named. Connections open when first used. Errors never show the URL.
pub fn pool(url: &Secret<String>, setting: &str, application_name: &str) -> anyhow::Result<Pool> {
    let mut config: tokio_postgres::Config =
        url.expose().parse().map_err(|e| anyhow::anyhow!("{setting} is not a PostgreSQL URL: {e}"))?;
    config
        .connect_timeout(CONNECT_TIMEOUT)
        .application_name(application_name)
        .tcp_user_timeout(TCP_USER_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(KEEPALIVE_INTERVAL)
        .keepalives_retries(KEEPALIVE_RETRIES);
    let manager =
        Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(POOL_SIZE_MAX)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT))
        .create_timeout(Some(CREATE_TIMEOUT))
        .build()
        .context("a connection pool")
}

/// Refuses a server that does not force commits (a commit that returned
/// could be lost in a crash after the caller was answered); then applies
/// the migrations of `runner` the database lacks, holding the advisory lock
/// `lock` so that processes starting at once migrate one after the other.
/// `what` names the store in the log.
pub async fn migrate(pool: &Pool, lock: i64, runner: refinery::Runner, what: &str) -> anyhow::Result<()> {
    let mut client = pool.get().await.context("connecting")?;
    let synchronous: String = client.query_one("SHOW synchronous_commit", &[]).await?.try_get(0)?;
    if synchronous == "off" {
        bail!(
            "the database runs with synchronous_commit = off: a commit could be lost in a crash after \
             Strife answered; set it on"
        );
    }
    client.execute("SELECT pg_advisory_lock($1)", &[&lock]).await?;
    let migrated = runner.run_async(&mut **client).await;
    client.execute("SELECT pg_advisory_unlock($1)", &[&lock]).await?;
    let report = migrated.with_context(|| format!("migrating the {what}"))?;
    for m in report.applied_migrations() {
        tracing::info!(migration = %m, "applied a migration to the {what}");
    }
    Ok(())
}

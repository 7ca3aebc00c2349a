//! etcd as the discovery store: who is live and where (issue 12).
//!
//! Every gateway and bank replica writes one key under a lease it keeps
//! alive ([`register`]); a process killed or paused stops renewing, the lease
//! runs out after its TTL and etcd deletes the key. Parties that need the
//! others watch a prefix ([`watch_prefix`]): a range read, then a watch from
//! the revision after it, and after any break the same again (a resync), so
//! a change is seen at once and nothing is missed. While etcd cannot be
//! reached, a watcher keeps the last set it saw (marked not live) and a
//! registration retries until it is back.
//!
//! The keys (`/strife/v1/...`):
//!
//! ```text
//! /strife/v1/gateways/{instance}       -> Entry (JSON)   written by the gateway's certificate
//! /strife/v1/banks/{NAME}/{instance}   -> Entry (JSON)   written by bank NAME's certificate
//! ```
//!
//! An entry only says *where*: whoever connects to the address still
//! requires the certificate of the identity the key names, so a forged entry
//! leads nowhere. Who may write what is etcd's own check: etcd runs with
//! client-certificate authentication and auth enabled, takes the
//! certificate's common name as the user ([`crate::pki::CertDir::common_name`]),
//! and [`provision`] gives each user a role that may write its own keys only.
//!
//! The client is generated from the part of etcd's API Strife uses
//! (`crates/strife-proto/etcd/etcd.proto`), over Strife's own TLS connector:
//! the maintained etcd client crate compiles etcd's protos with `protoc` at
//! build time, which Strife's build does not need or install.

use crate::tls::Tls;
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use strife_core::Secret;
use strife_proto::etcd as pb;
use strife_proto::etcd::auth_client::AuthClient;
use strife_proto::etcd::kv_client::KvClient;
use strife_proto::etcd::lease_client::LeaseClient;
use strife_proto::etcd::maintenance_client::MaintenanceClient;
use strife_proto::etcd::watch_client::WatchClient;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// The scheme of a discovery URL naming etcd endpoints.
pub const URL_SCHEME: &str = "etcd://";
/// Where every Strife key lives.
pub const ROOT_PREFIX: &str = "/strife/v1/";
/// The gateways' keys.
pub const GATEWAYS_PREFIX: &str = "/strife/v1/gateways/";
/// The banks' keys (`{prefix}{NAME}/{instance}`).
pub const BANKS_PREFIX: &str = "/strife/v1/banks/";
/// The lease of a registration, unless configured: a process that stops
/// renewing is gone from every watcher's set this long after.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3);
/// The shortest lease etcd grants (its minimum TTL is about this).
pub const TTL_MIN: Duration = Duration::from_secs(2);
/// Renewals per TTL: one missed renewal does not lose the lease.
const RENEWALS_PER_TTL: u32 = 3;
/// Most endpoints in one discovery URL.
pub const ENDPOINTS_MAX: usize = 16;
/// Longest one unary call to etcd may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// The pause before trying again after etcd could not be reached; doubled
/// up to [`RETRY_PAUSE_MAX`].
const RETRY_PAUSE_FIRST: Duration = Duration::from_millis(200);
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(2);
/// HTTP/2 pings on the connection to etcd, so that a paused or cut-off etcd
/// breaks a watch (and is left for another endpoint) within about this
/// twice.
const KEEPALIVE: Duration = Duration::from_secs(1);
/// The user etcd's root role belongs to.
pub const ROOT_USER: &str = "root";
/// The role of the gateways, and of every client.
const GATEWAY_ROLE: &str = "strife-gateway";
const CLIENT_ROLE: &str = "strife-client";
/// The role of one bank is this prefix and its name.
const BANK_ROLE_PREFIX: &str = "strife-bank-";

/// The endpoints of `etcd://HOST:PORT,HOST:PORT`.
pub fn parse_url(url: &str) -> anyhow::Result<Vec<String>> {
    let Some(rest) = url.strip_prefix(URL_SCHEME) else {
        bail!("'{url}' is not an etcd URL: expected {URL_SCHEME}HOST:PORT[,HOST:PORT...]");
    };
    let endpoints: Vec<String> =
        rest.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_owned).collect();
    if endpoints.is_empty() {
        bail!("'{url}' names no etcd endpoint");
    }
    if endpoints.len() > ENDPOINTS_MAX {
        bail!("'{url}' names {} etcd endpoints; at most {ENDPOINTS_MAX}", endpoints.len());
    }
    for e in &endpoints {
        e.parse::<std::net::SocketAddr>()
            .with_context(|| format!("etcd endpoint '{e}' is not an IP:PORT address"))?;
    }
    Ok(endpoints)
}

/// The end of the key range holding every key that starts with `prefix`.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The key of a gateway replica.
pub fn gateway_key(instance: &str) -> String {
    format!("{GATEWAYS_PREFIX}{instance}")
}

/// The key of one replica of bank `name`.
pub fn bank_key(name: &str, instance: &str) -> String {
    format!("{BANKS_PREFIX}{name}/{instance}")
}

/// What one registration says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Where it serves (`IP:PORT`).
    pub address: String,
    /// Its boot id: a new one at each start.
    pub boot_id: String,
    /// Strife's version.
    pub version: String,
    /// When its current lease was granted, in ms since the Unix epoch.
    pub registered_at_ms: u64,
}

impl Entry {
    pub fn new(address: &str, boot_id: &str) -> Entry {
        Entry {
            address: address.to_owned(),
            boot_id: boot_id.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            registered_at_ms: now_ms(),
        }
    }

    /// How long its lease has been held.
    pub fn lease_age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.registered_at_ms))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A connection to an etcd cluster, as one identity (its certificate, or
/// the root user's token). Calls go to one endpoint and move to the next
/// when it cannot be reached. Clones share it.
#[derive(Clone)]
pub struct Etcd {
    channels: Arc<Vec<(String, Channel)>>,
    current: Arc<AtomicUsize>,
    token: Option<Arc<Secret<String>>>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let endpoints: Vec<&str> = self.channels.iter().map(|(e, _)| e.as_str()).collect();
        f.debug_struct("Etcd").field("endpoints", &endpoints).finish()
    }
}

/// Whether a failed call may succeed at another endpoint or later.
fn unreachable(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown)
}

impl Etcd {
    /// A client of the etcd at `url` (`etcd://…`) that proves `tls`'s
    /// identity and checks etcd's certificate against our CA. Connects on
    /// first use.
    pub fn connect(tls: &Tls, url: &str) -> anyhow::Result<Etcd> {
        let mut channels = Vec::new();
        for endpoint in parse_url(url)? {
            let channel = tls
                .endpoint_named(crate::pki::ETCD_SERVER_DNS_NAME, &endpoint)?
                .timeout(CALL_TIMEOUT)
                .http2_keep_alive_interval(KEEPALIVE)
                .keep_alive_timeout(KEEPALIVE)
                .connect_lazy();
            channels.push((endpoint, channel));
        }
        Ok(Etcd { channels: Arc::new(channels), current: Arc::new(AtomicUsize::new(0)), token: None })
    }

    /// The endpoints.
    pub fn endpoints(&self) -> Vec<String> {
        self.channels.iter().map(|(e, _)| e.clone()).collect()
    }

    /// The same connection, acting as `user` (by password) instead of the
    /// certificate's common name.
    pub async fn authenticate(&self, user: &str, password: &Secret<String>) -> Result<Etcd, Status> {
        let req = pb::AuthenticateRequest { name: user.to_owned(), password: password.expose().clone() };
        let resp = self
            .call(|ch| {
                let r = req.clone();
                async move { AuthClient::new(ch).authenticate(r).await }
            })
            .await?;
        Ok(Etcd { token: Some(Arc::new(Secret::new(resp.token))), ..self.clone() })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut req = Request::new(message);
        if let Some(token) = &self.token
            && let Ok(value) = token.expose().parse()
        {
            req.metadata_mut().insert("token", value);
        }
        req
    }

    /// Runs one unary call at the current endpoint, moving to the next one
    /// when that one cannot be reached; each endpoint at most once.
    async fn call<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let count = self.channels.len();
        let first = self.current.load(Ordering::Relaxed);
        let mut last = Status::unavailable("no etcd endpoint");
        for i in 0..count {
            let at = (first + i) % count;
            let Some((_, channel)) = self.channels.get(at) else { break };
            match call(channel.clone()).await {
                Ok(resp) => {
                    self.current.store(at, Ordering::Relaxed);
                    return Ok(resp.into_inner());
                }
                Err(status) if unreachable(&status) => last = status,
                Err(status) => return Err(status),
            }
        }
        self.current.store((first + 1) % count.max(1), Ordering::Relaxed);
        Err(last)
    }

    fn channel(&self) -> Option<Channel> {
        let at = self.current.load(Ordering::Relaxed);
        self.channels.get(at % self.channels.len().max(1)).map(|(_, c)| c.clone())
    }

    fn next_endpoint(&self) {
        let count = self.channels.len().max(1);
        let _ = self.current.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| Some((c + 1) % count));
    }

    /// etcd's status: its version, when it answers.
    pub async fn status(&self) -> Result<String, Status> {
        let resp = self
            .call(|ch| {
                let r = self.request(pb::StatusRequest {});
                async move { MaintenanceClient::new(ch).status(r).await }
            })
            .await?;
        Ok(resp.version)
    }

    /// Every key under `prefix` and the revision they were read at.
    pub async fn range_prefix(&self, prefix: &str) -> Result<(BTreeMap<String, Vec<u8>>, i64), Status> {
        let req = pb::RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix),
            ..Default::default()
        };
        let resp = self
            .call(|ch| {
                let r = self.request(req.clone());
                async move { KvClient::new(ch).range(r).await }
            })
            .await?;
        let revision = resp.header.map_or(0, |h| h.revision);
        let entries = resp
            .kvs
            .into_iter()
            .map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), kv.value))
            .collect();
        Ok((entries, revision))
    }

    /// Writes `key` = `value`, attached to `lease` (0 for none).
    pub async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<(), Status> {
        let req = pb::PutRequest { key: key.as_bytes().to_vec(), value, lease, prev_kv: false };
        self.call(|ch| {
            let r = self.request(req.clone());
            async move { KvClient::new(ch).put(r).await }
        })
        .await
        .map(|_| ())
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) -> Result<(), Status> {
        let req = pb::DeleteRangeRequest { key: key.as_bytes().to_vec(), ..Default::default() };
        self.call(|ch| {
            let r = self.request(req.clone());
            async move { KvClient::new(ch).delete_range(r).await }
        })
        .await
        .map(|_| ())
    }

    /// A new lease of `ttl`; its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, Status> {
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let resp = self
            .call(|ch| {
                let r = self.request(pb::LeaseGrantRequest { ttl, id: 0 });
                async move { LeaseClient::new(ch).lease_grant(r).await }
            })
            .await?;
        if !resp.error.is_empty() {
            return Err(Status::unavailable(resp.error));
        }
        Ok(resp.id)
    }

    /// Ends lease `id` now: its keys go at once.
    pub async fn revoke(&self, id: i64) -> Result<(), Status> {
        self.call(|ch| {
            let r = self.request(pb::LeaseRevokeRequest { id });
            async move { LeaseClient::new(ch).lease_revoke(r).await }
        })
        .await
        .map(|_| ())
    }

    /// What is left of lease `id`, or `None` if it is gone.
    pub async fn time_to_live(&self, id: i64) -> Result<Option<Duration>, Status> {
        let resp = self
            .call(|ch| {
                let r = self.request(pb::LeaseTimeToLiveRequest { id, keys: false });
                async move { LeaseClient::new(ch).lease_time_to_live(r).await }
            })
            .await?;
        Ok(u64::try_from(resp.ttl).ok().map(Duration::from_secs))
    }
}

/// The state of one registration, as [`register`] reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistrationState {
    /// Whether the key is in etcd under a lease being renewed.
    pub registered: bool,
    /// The lease, when registered.
    pub lease: i64,
    /// Why it is not registered, when it is not.
    pub error: Option<String>,
}

/// Keeps `key` in etcd, its value made by `entry` at each new lease, under
/// a lease of `ttl` renewed [`RENEWALS_PER_TTL`] times per TTL, until `stop`
/// turns true; then revokes the lease so that the key goes at once. When the
/// lease is lost (etcd unreachable for longer than the TTL, or restarted),
/// it registers again as soon as etcd answers.
pub fn register(
    etcd: Etcd,
    key: String,
    entry: impl Fn() -> Entry + Send + Sync + 'static,
    ttl: Duration,
    mut stop: watch::Receiver<bool>,
) -> watch::Receiver<RegistrationState> {
    let (tx, rx) = watch::channel(RegistrationState::default());
    let ttl = ttl.max(TTL_MIN);
    tokio::spawn(async move {
        let mut pause = RETRY_PAUSE_FIRST;
        let mut logged_down = false;
        loop {
            if *stop.borrow() {
                return;
            }
            let attempt = async {
                let lease = etcd.grant(ttl).await?;
                let value = serde_json::to_vec(&entry()).map_err(|e| Status::internal(e.to_string()))?;
                etcd.put(&key, value, lease).await?;
                Ok::<i64, Status>(lease)
            };
            let lease = match attempt.await {
                Ok(lease) => lease,
                Err(status) => {
                    let why = status.message().to_owned();
                    if !logged_down {
                        tracing::warn!(%key, %why, "cannot register in etcd; retrying (payments go on)");
                        logged_down = true;
                    }
                    tx.send_replace(RegistrationState { registered: false, lease: 0, error: Some(why) });
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.changed() => {}
                    }
                    pause = (pause * 2).min(RETRY_PAUSE_MAX);
                    continue;
                }
            };
            tracing::info!(%key, lease, ttl_s = ttl.as_secs(), "registered in etcd");
            crate::metrics::DISCOVERY.registered.set(1);
            logged_down = false;
            pause = RETRY_PAUSE_FIRST;
            tx.send_replace(RegistrationState { registered: true, lease, error: None });
            let why = tokio::select! {
                why = keep_alive(&etcd, lease, ttl) => why,
                _ = stop.changed() => {
                    if let Err(e) = tokio::time::timeout(CALL_TIMEOUT, etcd.revoke(lease)).await.unwrap_or_else(|_| Err(Status::deadline_exceeded("revoke"))) {
                        tracing::debug!(%key, error = %e.message(), "revoking the lease at stop");
                    }
                    tx.send_replace(RegistrationState::default());
                    crate::metrics::DISCOVERY.registered.set(0);
                    return;
                }
            };
            tracing::warn!(%key, %why, "lost the etcd lease; registering again");
            crate::metrics::DISCOVERY.registered.set(0);
            crate::metrics::DISCOVERY.lease_losses.inc();
            tx.send_replace(RegistrationState { registered: false, lease: 0, error: Some(why) });
        }
    });
    rx
}

/// Renews `lease` until it is lost; why it was lost.
async fn keep_alive(etcd: &Etcd, lease: i64, ttl: Duration) -> String {
    let every = ttl / RENEWALS_PER_TTL;
    let Some(channel) = etcd.channel() else { return "no etcd endpoint".to_owned() };
    let (req_tx, req_rx) = mpsc::channel::<pb::LeaseKeepAliveRequest>(1);
    let stream = tokio_stream::wrappers::ReceiverStream::new(req_rx);
    let mut responses = match LeaseClient::new(channel).lease_keep_alive(etcd.request(stream)).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            etcd.next_endpoint();
            return status.message().to_owned();
        }
    };
    // The lease is good until this instant, as far as we know.
    let mut good_until = tokio::time::Instant::now() + ttl;
    loop {
        if req_tx.send(pb::LeaseKeepAliveRequest { id: lease }).await.is_err() {
            return "the keep-alive stream closed".to_owned();
        }
        let sent = tokio::time::Instant::now();
        match tokio::time::timeout_at(good_until.max(sent + every), responses.message()).await {
            Ok(Ok(Some(resp))) if resp.ttl > 0 => {
                good_until = sent + Duration::from_secs(u64::try_from(resp.ttl).unwrap_or(0));
            }
            Ok(Ok(Some(_))) => return "the lease expired".to_owned(),
            Ok(Ok(None)) => return "etcd closed the keep-alive stream".to_owned(),
            Ok(Err(status)) => {
                etcd.next_endpoint();
                return status.message().to_owned();
            }
            Err(_) => {
                etcd.next_endpoint();
                return "etcd did not renew the lease in time".to_owned();
            }
        }
        tokio::time::sleep_until(sent + every).await;
    }
}

/// What a watcher knows of a prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Every key under the prefix and its value, as last seen.
    pub entries: BTreeMap<String, Vec<u8>>,
    /// Whether the watch is established now; false while etcd cannot be
    /// reached (the entries are then the last known set).
    pub live: bool,
    /// Whether a first read has completed (until then `entries` is empty
    /// because nothing is known, not because nothing is registered).
    pub loaded: bool,
}

impl View {
    /// The entries that parse, keyed as in etcd.
    pub fn parsed(&self) -> BTreeMap<String, Entry> {
        self.entries
            .iter()
            .filter_map(|(k, v)| serde_json::from_slice::<Entry>(v).ok().map(|e| (k.clone(), e)))
            .collect()
    }
}

/// Watches every key under `prefix` until `stop` turns true: a first read,
/// then each change as it comes; after a break, a new read (a resync) and a
/// new watch. The receiver always holds the whole set.
pub fn watch_prefix(etcd: Etcd, prefix: String, mut stop: watch::Receiver<bool>) -> watch::Receiver<View> {
    let (tx, rx) = watch::channel(View::default());
    tokio::spawn(async move {
        let mut pause = RETRY_PAUSE_FIRST;
        let mut logged_down = false;
        loop {
            if *stop.borrow() {
                return;
            }
            let why = tokio::select! {
                why = watch_once(&etcd, &prefix, &tx, &mut pause, &mut logged_down) => why,
                _ = stop.changed() => return,
            };
            tx.send_if_modified(|v| std::mem::replace(&mut v.live, false));
            crate::metrics::DISCOVERY.watch_resyncs.inc();
            if !logged_down {
                tracing::warn!(%prefix, %why, "etcd watch broken; using the last known set until it is back");
                logged_down = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {}
            }
            pause = (pause * 2).min(RETRY_PAUSE_MAX);
        }
    });
    rx
}

/// One read and the watch after it, until the watch breaks; why it broke.
async fn watch_once(
    etcd: &Etcd,
    prefix: &str,
    tx: &watch::Sender<View>,
    pause: &mut Duration,
    logged_down: &mut bool,
) -> String {
    let (mut entries, revision) = match etcd.range_prefix(prefix).await {
        Ok(r) => r,
        Err(status) => return status.message().to_owned(),
    };
    let Some(channel) = etcd.channel() else { return "no etcd endpoint".to_owned() };
    let (req_tx, req_rx) = mpsc::channel::<pb::WatchRequest>(1);
    let create = pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix),
            start_revision: revision + 1,
            ..Default::default()
        })),
    };
    if req_tx.send(create).await.is_err() {
        return "the watch stream closed".to_owned();
    }
    let stream = tokio_stream::wrappers::ReceiverStream::new(req_rx);
    let mut responses = match WatchClient::new(channel).watch(etcd.request(stream)).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            etcd.next_endpoint();
            return status.message().to_owned();
        }
    };
    if *logged_down {
        tracing::info!(%prefix, keys = entries.len(), "etcd watch established again (resynced)");
        *logged_down = false;
    }
    *pause = RETRY_PAUSE_FIRST;
    tx.send_replace(View { entries: entries.clone(), live: true, loaded: true });
    loop {
        match responses.message().await {
            Ok(Some(resp)) => {
                if resp.canceled {
                    return format!("etcd cancelled the watch: {}", resp.cancel_reason);
                }
                if resp.events.is_empty() {
                    continue;
                }
                for event in resp.events {
                    let Some(kv) = event.kv else { continue };
                    let key = String::from_utf8_lossy(&kv.key).into_owned();
                    if event.r#type == pb::event::EventType::Delete as i32 {
                        entries.remove(&key);
                    } else {
                        entries.insert(key, kv.value);
                    }
                }
                tx.send_replace(View { entries: entries.clone(), live: true, loaded: true });
            }
            Ok(None) => return "etcd ended the watch".to_owned(),
            Err(status) => {
                etcd.next_endpoint();
                return status.message().to_owned();
            }
        }
        // Keep the request side open: closing it would end the watch.
        let _ = &req_tx;
    }
}

/// A status that says the thing already exists, which provisioning takes as
/// done.
fn already(status: &Status) -> bool {
    status.message().contains("already")
}

/// Sets up etcd's users and roles for one Strife cluster, and enables auth
/// (idempotent: run at every start). Each identity's certificate common
/// name is its user; the roles:
///
/// - `gateway`: read and write the gateways' keys, read the banks' keys;
/// - each bank `NAME`: read and write `/strife/v1/banks/NAME/`, read the
///   gateways' keys;
/// - `client` (every client certificate): read the gateways' keys.
///
/// `root` has a password (etcd needs a root user before auth is enabled);
/// it is what provisions again later, e.g. for a new bank.
pub async fn provision(etcd: &Etcd, root_password: &Secret<String>, banks: &[String]) -> anyhow::Result<()> {
    // Once auth is enabled, only root may change it; before, anyone with a
    // certificate of our CA may.
    let admin = match etcd.authenticate(ROOT_USER, root_password).await {
        Ok(admin) => admin,
        Err(status) if status.message().contains("not enabled") => etcd.clone(),
        Err(status) => bail!("cannot act as etcd's root user: {}", status.message()),
    };
    let ok = |r: Result<(), Status>, what: &str| -> anyhow::Result<()> {
        match r {
            Ok(()) => Ok(()),
            Err(s) if already(&s) => Ok(()),
            Err(s) => bail!("etcd refused to {what}: {}", s.message()),
        }
    };
    let add_user = |name: String, password: Option<&Secret<String>>| {
        let admin = admin.clone();
        let req = pb::AuthUserAddRequest {
            name,
            password: password.map(|p| p.expose().clone()).unwrap_or_default(),
            options: Some(pb::UserAddOptions { no_password: password.is_none() }),
        };
        async move {
            admin
                .call(|ch| {
                    let r = admin.request(req.clone());
                    async move { AuthClient::new(ch).user_add(r).await }
                })
                .await
                .map(|_| ())
        }
    };
    let add_role = |name: String, perms: Vec<(pb::permission::Type, &'static str, Option<String>)>| {
        let admin = admin.clone();
        async move {
            let role = pb::AuthRoleAddRequest { name: name.clone() };
            match admin
                .call(|ch| {
                    let r = admin.request(role.clone());
                    async move { AuthClient::new(ch).role_add(r).await }
                })
                .await
            {
                Ok(_) => {}
                Err(s) if already(&s) => {}
                Err(s) => return Err(s),
            }
            for (kind, prefix, extra) in perms {
                let prefix = format!("{prefix}{}", extra.unwrap_or_default());
                let req = pb::AuthRoleGrantPermissionRequest {
                    name: name.clone(),
                    perm: Some(pb::Permission {
                        perm_type: kind as i32,
                        key: prefix.as_bytes().to_vec(),
                        range_end: prefix_end(&prefix),
                    }),
                };
                admin
                    .call(|ch| {
                        let r = admin.request(req.clone());
                        async move { AuthClient::new(ch).role_grant_permission(r).await }
                    })
                    .await?;
            }
            Ok(())
        }
    };
    let grant = |user: String, role: String| {
        let admin = admin.clone();
        let req = pb::AuthUserGrantRoleRequest { user, role };
        async move {
            admin
                .call(|ch| {
                    let r = admin.request(req.clone());
                    async move { AuthClient::new(ch).user_grant_role(r).await }
                })
                .await
                .map(|_| ())
        }
    };
    use pb::permission::Type::{Read, Readwrite};

    ok(add_user(ROOT_USER.to_owned(), Some(root_password)).await, "add the root user")?;
    ok(grant(ROOT_USER.to_owned(), "root".to_owned()).await, "give root its role")?;
    ok(
        add_role(
            GATEWAY_ROLE.to_owned(),
            vec![(Readwrite, GATEWAYS_PREFIX, None), (Read, BANKS_PREFIX, None)],
        )
        .await,
        "add the gateways' role",
    )?;
    ok(add_user("gateway".to_owned(), None).await, "add the gateway user")?;
    ok(grant("gateway".to_owned(), GATEWAY_ROLE.to_owned()).await, "give the gateway its role")?;
    ok(add_role(CLIENT_ROLE.to_owned(), vec![(Read, GATEWAYS_PREFIX, None)]).await, "add the clients' role")?;
    ok(add_user("client".to_owned(), None).await, "add the client user")?;
    ok(grant("client".to_owned(), CLIENT_ROLE.to_owned()).await, "give clients their role")?;
    for bank in banks {
        strife_core::validate_bank_name(bank).map_err(|e| anyhow::anyhow!("{e}"))?;
        let role = format!("{BANK_ROLE_PREFIX}{bank}");
        ok(
            add_role(
                role.clone(),
                vec![(Readwrite, BANKS_PREFIX, Some(format!("{bank}/"))), (Read, GATEWAYS_PREFIX, None)],
            )
            .await,
            "add a bank's role",
        )?;
        ok(add_user(bank.clone(), None).await, "add a bank's user")?;
        ok(grant(bank.clone(), role).await, "give a bank its role")?;
    }
    let enable = admin
        .call(|ch| {
            let r = admin.request(pb::AuthEnableRequest {});
            async move { AuthClient::new(ch).auth_enable(r).await }
        })
        .await;
    ok(enable.map(|_| ()), "enable authentication")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_ip_endpoints() {
        assert_eq!(parse_url("etcd://127.0.0.1:2379").expect("one"), vec!["127.0.0.1:2379"]);
        assert_eq!(
            parse_url("etcd://127.0.0.1:1, 10.0.0.2:2").expect("two"),
            vec!["127.0.0.1:1", "10.0.0.2:2"]
        );
        assert!(parse_url("http://127.0.0.1:1").is_err());
        assert!(parse_url("etcd://").is_err());
        assert!(parse_url("etcd://localhost:2379").is_err());
    }

    #[test]
    fn a_prefix_range_ends_after_its_last_key() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
        assert_eq!(bank_key("BankA", "x"), "/strife/v1/banks/BankA/x");
        assert!(bank_key("BankA", "x").as_bytes() < prefix_end(&format!("{BANKS_PREFIX}BankA/")).as_slice());
        // BankAB's keys are outside BankA's range.
        assert!(
            bank_key("BankAB", "x").as_bytes() >= prefix_end(&format!("{BANKS_PREFIX}BankA/")).as_slice()
        );
    }
}

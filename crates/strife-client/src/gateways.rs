//! The gateway replicas a client spreads its calls over, and failover
//! between them.
//!
//! [`Gateways`] holds the replicas' addresses and a connection to each one
//! it has used. [`Gateways::call`] runs one RPC at the next live replica in
//! turn; when that replica is unavailable (refused, reset, silent, shutting
//! down) the same request goes at once to another, each replica at most once
//! per call and all within the call's time budget. A payment retried this
//! way keeps its payment id, and replicas share one store in which an id
//! runs once per payer, so it still moves money at most once.
//!
//! The set can change at run time: [`Gateways::apply`] takes the changes a
//! discovery watch yields (an address put or deleted) and
//! [`Gateways::replace`] a whole new set (a resync), so a discovery backend
//! only has to feed it.
//!
//! Why not tonic's balancing channel (`Channel::balance_channel`): it hides
//! which replica served a call, so a retry cannot be steered to *another*
//! one nor bounded to one try per replica; it keeps routing to a lazily
//! connected endpoint whose connection fails (each such call fails instead
//! of moving on); and it needs a spawned task to feed it. Here the choice
//! of replica, the retry and the bound are explicit, and nothing runs in
//! the background.

use crate::connect::CLIENT_NAME;
use std::future::Future;
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use strife_proto::gateway::v1::ErrorReason;
use strife_rpc::Peer;
use strife_rpc::errors;
use strife_rpc::pki::CertDir;
use strife_rpc::tls::TlsEndpoint;
use strife_rpc::tls::{CONNECT_TIMEOUT, Tls};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

/// Most replicas one call tries (each at most once).
pub const GATEWAYS_PER_CALL_MAX: usize = 8;
/// How long a connection to one replica may take before the next replica
/// is tried alongside it (the first to connect serves): a hung replica,
/// whose kernel accepts TCP but which never answers TLS, costs this much.
pub const HEDGE_DELAY: Duration = Duration::from_millis(250);
/// The least time one attempt gets, of what is left of the call's budget.
pub const ATTEMPT_MIN: Duration = Duration::from_secs(1);
/// How long a replica that failed is passed over (tried only after the
/// live ones); doubled at each failure in a row, up to [`EJECT_MAX`].
pub const EJECT_FIRST: Duration = Duration::from_secs(1);
/// The longest a failed replica is passed over before it is tried again.
pub const EJECT_MAX: Duration = Duration::from_secs(4);
/// Times one call asks again about a payment another copy of which is
/// still being decided (`PAYMENT_IN_PROGRESS`), within its budget.
pub const IN_PROGRESS_RETRIES_MAX: u32 = 8;
/// First pause before asking again about a payment in progress; doubled
/// each time, up to [`IN_PROGRESS_PAUSE_MAX`].
pub const IN_PROGRESS_PAUSE_FIRST: Duration = Duration::from_millis(100);
/// Longest pause before asking again about a payment in progress.
pub const IN_PROGRESS_PAUSE_MAX: Duration = Duration::from_secs(1);
/// HTTP/2 pings on a connection: a replica that stops answering them
/// (paused, or cut off) fails the calls under way on it after
/// [`KEEPALIVE_TIMEOUT`], so they move to another replica.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long an HTTP/2 ping may go unanswered before the connection is
/// given up. (A false alarm costs a retry at another replica.)
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// A change to the set of replicas, as a discovery watch reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A replica at this address appeared (or is still there).
    Insert(String),
    /// The replica at this address is gone.
    Remove(String),
}

/// Why a call got no answer to use.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// Our own set-up is wrong (no certificate, bad address, no replica):
    /// not an outage.
    #[error("{0}")]
    Setup(String),
    /// No replica answered: each that was tried, and why it failed.
    #[error("the gateway is unreachable ({0})")]
    Unreachable(String),
    /// A replica answered with an error that another replica would give
    /// too (a refusal, a decline of the request, a payment still in
    /// progress after every ask-again).
    #[error("{}", .0.message())]
    Answered(tonic::Status),
    /// Our certificate is revoked (by the CRL we hold, or a gateway's TLS
    /// alert said so): no replica will take it.
    #[error("{0}")]
    Refused(String),
}

/// One replica as the client sees it, for status and measurements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub address: String,
    /// Not passed over at the moment.
    pub live: bool,
    /// Calls it answered.
    pub answered: u64,
    /// Attempts that failed at it (and moved to another replica).
    pub failed: u64,
}

/// What the client knows about one replica.
struct Member {
    address: String,
    /// A connection that worked, reused by later calls; dropped when the
    /// replica fails, so the next try connects afresh.
    channel: Option<Channel>,
    /// Passed over until then (tried only after every live replica).
    ejected_until: Option<Instant>,
    /// Failures in a row: how long the next ejection lasts.
    failures_in_row: u32,
    answered: u64,
    failed: u64,
}

impl Member {
    fn new(address: String) -> Member {
        Member { address, channel: None, ejected_until: None, failures_in_row: 0, answered: 0, failed: 0 }
    }

    fn live(&self, now: Instant) -> bool {
        self.ejected_until.is_none_or(|until| until <= now)
    }
}

struct Members {
    list: Vec<Member>,
    /// Where the next call starts looking (round robin).
    next: usize,
}

/// The gateway replicas of one client, and the calls it makes to them.
pub struct Gateways {
    /// The client's identity, loaded once; every connection proves it.
    tls: Tls,
    /// Held only between awaits, never across one.
    members: Mutex<Members>,
}

/// What the answer of one attempt means for the call.
enum Verdict {
    /// The replica is unavailable: try another at once.
    Unavailable,
    /// Another copy of the payment is being decided: ask again shortly.
    AskAgain,
    /// An answer: every replica would say the same.
    Final,
}

fn verdict(status: &tonic::Status) -> Verdict {
    match (status.code(), errors::reason_of(status)) {
        (Code::Unavailable, Some(ErrorReason::PaymentInProgress)) => Verdict::AskAgain,
        // No error details: the transport failed (refused, reset, a
        // stream cut); `UNAVAILABLE` (UNAVAILABLE): the replica is
        // shutting down. A bank's unavailability and every business
        // answer carry another reason and are final.
        (
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown,
            None | Some(ErrorReason::Unavailable),
        ) => Verdict::Unavailable,
        _ => Verdict::Final,
    }
}

impl Gateways {
    /// The replicas at `addresses`, proving the client identity of `dir`.
    pub fn open(dir: &Path, addresses: &[String]) -> Result<Gateways, CallError> {
        let tls = Tls::load(&CertDir::new(dir), &Peer::Client(CLIENT_NAME.to_owned()))
            .map_err(|e| CallError::Setup(format!("{e:#}")))?;
        Gateways::new(tls, addresses)
    }

    pub fn new(tls: Tls, addresses: &[String]) -> Result<Gateways, CallError> {
        let gateways = Gateways { tls, members: Mutex::new(Members { list: Vec::new(), next: 0 }) };
        gateways.replace(addresses)?;
        let start = usize::try_from(uuid::Uuid::new_v4().as_u128() % 1024).unwrap_or(0);
        gateways.lock().next = start;
        Ok(gateways)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn endpoint(&self, address: &str) -> Result<TlsEndpoint, CallError> {
        let endpoint = self
            .tls
            .endpoint(&Peer::Gateway, address)
            .map_err(|e| CallError::Setup(format!("gateway {address}: {e:#}")))?;
        Ok(endpoint.http2_keep_alive_interval(KEEPALIVE_INTERVAL).keep_alive_timeout(KEEPALIVE_TIMEOUT))
    }

    /// Applies one change of the set. An address already there keeps
    /// what is known about it.
    pub fn apply(&self, change: Change) -> Result<(), CallError> {
        match change {
            Change::Insert(address) => {
                self.endpoint(&address)?;
                let mut members = self.lock();
                if members.list.iter().all(|m| m.address != address) {
                    if members.list.len() >= crate::connect::GATEWAYS_MAX {
                        return Err(CallError::Setup(format!(
                            "more than {} gateways",
                            crate::connect::GATEWAYS_MAX
                        )));
                    }
                    members.list.push(Member::new(address));
                }
            }
            Change::Remove(address) => self.lock().list.retain(|m| m.address != address),
        }
        Ok(())
    }

    /// Makes `addresses` the whole set (what a resync reports): the ones
    /// already known keep their connection and record.
    pub fn replace(&self, addresses: &[String]) -> Result<(), CallError> {
        if addresses.len() > crate::connect::GATEWAYS_MAX {
            return Err(CallError::Setup(format!("more than {} gateways", crate::connect::GATEWAYS_MAX)));
        }
        for address in addresses {
            self.endpoint(address)?;
        }
        let mut members = self.lock();
        members.list.retain(|m| addresses.contains(&m.address));
        for address in addresses {
            if members.list.iter().all(|m| &m.address != address) {
                members.list.push(Member::new(address.clone()));
            }
        }
        Ok(())
    }

    /// Every replica, in the order of the set, with what the client knows.
    pub fn members(&self) -> Vec<MemberView> {
        let now = Instant::now();
        self.lock()
            .list
            .iter()
            .map(|m| MemberView {
                address: m.address.clone(),
                live: m.live(now),
                answered: m.answered,
                failed: m.failed,
            })
            .collect()
    }

    /// The replicas a call may try next, in order: the live ones from the
    /// round-robin position, then the passed-over ones, soonest back
    /// first; none in `tried`, at most `limit`.
    fn candidates(&self, tried: &[String], limit: usize) -> Vec<(String, Option<Channel>)> {
        let now = Instant::now();
        let mut members = self.lock();
        let n = members.list.len();
        if n == 0 {
            return Vec::new();
        }
        let start = members.next % n;
        members.next = members.next.wrapping_add(1);
        let open = |m: &&Member| !tried.contains(&m.address);
        let rotated = members.list[start..].iter().chain(&members.list[..start]);
        let mut live: Vec<&Member> = rotated.filter(open).filter(|m| m.live(now)).collect();
        let mut passed_over: Vec<&Member> =
            members.list.iter().filter(open).filter(|m| !m.live(now)).collect();
        passed_over.sort_by_key(|m| m.ejected_until);
        live.append(&mut passed_over);
        live.into_iter().take(limit).map(|m| (m.address.clone(), m.channel.clone())).collect()
    }

    /// How many replicas are not in `tried`.
    fn untried(&self, tried: &[String]) -> usize {
        self.lock().list.iter().filter(|m| !tried.contains(&m.address)).count()
    }

    /// The replica at `address` answered.
    fn answered(&self, address: &str, channel: &Channel) {
        if let Some(m) = self.lock().list.iter_mut().find(|m| m.address == address) {
            m.channel = Some(channel.clone());
            m.ejected_until = None;
            m.failures_in_row = 0;
            m.answered += 1;
        }
    }

    /// The replica at `address` failed (or was too slow to connect): pass
    /// it over for a while and connect afresh next time.
    fn failed(&self, address: &str) {
        if let Some(m) = self.lock().list.iter_mut().find(|m| m.address == address) {
            let doublings = m.failures_in_row.min(8);
            let pause = EJECT_FIRST.saturating_mul(1 << doublings).min(EJECT_MAX);
            m.channel = None;
            m.ejected_until = Some(Instant::now() + pause);
            m.failures_in_row = m.failures_in_row.saturating_add(1);
            m.failed += 1;
        }
    }

    /// A connection to the first of `candidates` that comes up: each is
    /// started [`HEDGE_DELAY`] after the one before (at once when that
    /// one failed), the first connected wins and the others are dropped.
    /// Every replica started is added to `tried`; each failure is noted.
    async fn reach(
        &self,
        candidates: Vec<(String, Option<Channel>)>,
        deadline: Instant,
        tried: &mut Vec<String>,
        failures: &mut Vec<String>,
    ) -> Option<(String, Channel)> {
        let mut waiting = candidates.into_iter();
        let mut connecting: JoinSet<(String, Result<Channel, String>)> = JoinSet::new();
        let mut running: Vec<String> = Vec::new();
        let mut hedge_at = Instant::now();
        if let Some((address, Some(channel))) = waiting.as_slice().first().cloned() {
            waiting.next();
            tried.push(address.clone());
            return Some((address, channel));
        }
        loop {
            if Instant::now() >= hedge_at || connecting.is_empty() {
                match waiting.next() {
                    Some((address, cached)) => {
                        tried.push(address.clone());
                        running.push(address.clone());
                        let endpoint = self.endpoint(&address);
                        connecting.spawn(async move {
                            let result = match (cached, endpoint) {
                                (Some(channel), _) => Ok(channel),
                                (None, Ok(endpoint)) => connect(&address, endpoint).await,
                                (None, Err(e)) => Err(e.to_string()),
                            };
                            (address, result)
                        });
                        hedge_at = Instant::now() + HEDGE_DELAY;
                    }
                    None if connecting.is_empty() => return None,
                    None => hedge_at = deadline,
                }
            }
            tokio::select! {
                joined = connecting.join_next() => {
                    let Some(Ok((address, result))) = joined else { continue };
                    running.retain(|a| a != &address);
                    match result {
                        Ok(channel) => {
                            for slow in &running {
                                tracing::info!(gateway = %slow, "gateway slower to connect than another; passed over");
                                self.failed(slow);
                            }
                            return Some((address, channel));
                        }
                        Err(why) => {
                            tracing::info!(gateway = %address, error = %why, "gateway unreachable; passed over, trying another");
                            self.failed(&address);
                            failures.push(why);
                            hedge_at = Instant::now();
                        }
                    }
                }
                _ = tokio::time::sleep_until(hedge_at), if hedge_at < deadline => {}
                _ = tokio::time::sleep_until(deadline) => {
                    for slow in running {
                        self.failed(&slow);
                        failures.push(format!("{slow}: not connected in time"));
                    }
                    return None;
                }
            }
        }
    }

    /// Runs `op` (one RPC, given a channel to one replica) at the next
    /// live replica; if that replica is unavailable, at once at another,
    /// each at most once, the whole within `budget`. A payment another
    /// copy of which is being decided is asked about again, with backoff,
    /// at most [`IN_PROGRESS_RETRIES_MAX`] times.
    pub async fn call<T, F, Fut>(&self, budget: Duration, mut op: F) -> Result<T, CallError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        if self.tls.is_revoked(&self.tls.serial()) {
            return Err(CallError::Refused(format!(
                "this client's certificate (serial {}) is revoked; get a new one with \
                 `strife certs issue --client {CLIENT_NAME}`",
                self.tls.serial()
            )));
        }
        let deadline = Instant::now() + budget;
        let mut tried: Vec<String> = Vec::new();
        let mut failures: Vec<String> = Vec::new();
        let mut asked_again = 0u32;
        let mut pause = IN_PROGRESS_PAUSE_FIRST;
        loop {
            let limit = GATEWAYS_PER_CALL_MAX.saturating_sub(tried.len());
            let candidates = self.candidates(&tried, limit);
            if candidates.is_empty() {
                return Err(self.unreachable(failures, tried.is_empty()));
            }
            let Some((address, channel)) = self.reach(candidates, deadline, &mut tried, &mut failures).await
            else {
                return Err(self.unreachable(failures, tried.is_empty()));
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let left = self.untried(&tried).min(GATEWAYS_PER_CALL_MAX.saturating_sub(tried.len()));
            let share =
                (remaining / u32::try_from(left + 1).unwrap_or(u32::MAX)).max(ATTEMPT_MIN).min(remaining);
            let why = match tokio::time::timeout(share, op(channel.clone())).await {
                Ok(Ok(value)) => {
                    self.answered(&address, &channel);
                    return Ok(value);
                }
                Ok(Err(status)) => match verdict(&status) {
                    Verdict::Final => {
                        self.answered(&address, &channel);
                        return Err(CallError::Answered(status));
                    }
                    Verdict::AskAgain => {
                        self.answered(&address, &channel);
                        let left = deadline.saturating_duration_since(Instant::now());
                        if asked_again >= IN_PROGRESS_RETRIES_MAX || left <= pause {
                            return Err(CallError::Answered(status));
                        }
                        asked_again += 1;
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(IN_PROGRESS_PAUSE_MAX);
                        // It answered: it may be asked again.
                        tried.retain(|a| a != &address);
                        continue;
                    }
                    Verdict::Unavailable if status.message().is_empty() => format!("{:?}", status.code()),
                    Verdict::Unavailable => status.message().to_owned(),
                },
                Err(_) => format!("no answer within {} ms", share.as_millis()),
            };
            tracing::info!(gateway = %address, error = %why, "gateway unavailable; passed over, trying another");
            self.failed(&address);
            failures.push(format!("{address}: {why}"));
            if Instant::now() >= deadline {
                return Err(self.unreachable(failures, false));
            }
        }
    }

    fn unreachable(&self, failures: Vec<String>, none_tried: bool) -> CallError {
        if none_tried && self.lock().list.is_empty() {
            return CallError::Setup("no gateway is known: give --gateway ADDR[,ADDR…]".to_owned());
        }
        if let Some(alert) = strife_rpc::tls::refused_by_server() {
            return CallError::Refused(format!(
                "a gateway refused this client's certificate ({alert}): if it was revoked, get a new one \
                 with `strife certs issue --client {CLIENT_NAME}`"
            ));
        }
        if failures.is_empty() {
            return CallError::Unreachable("no gateway answered in time".to_owned());
        }
        CallError::Unreachable(failures.join("; "))
    }
}

/// A connection to one replica (TCP, TLS, HTTP/2), within
/// [`CONNECT_TIMEOUT`]; the error names the address and what went wrong.
async fn connect(address: &str, endpoint: TlsEndpoint) -> Result<Channel, String> {
    match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(format!("{address}: {}", crate::connect::root_cause(&e))),
        Err(_) => Err(format!("{address}: no answer within {} ms", CONNECT_TIMEOUT.as_millis())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    /// A Strife directory with the gateway's and the client's certificates.
    fn certs(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("strife-client-gateways-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        CertDir::new(&dir).init(&[Peer::Gateway, Peer::Client(CLIENT_NAME.to_owned())]).expect("certs");
        dir
    }

    /// A server with the gateway's certificate that answers health checks;
    /// its address. It stops with the test's runtime.
    async fn serve(dir: &Path) -> String {
        let tls = Tls::load(&CertDir::new(dir), &Peer::Gateway).expect("gateway identity");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let (_, health) = tonic_health::server::health_reporter();
        let server = tonic::transport::Server::builder().add_service(health);
        tokio::spawn(server.serve_with_incoming(strife_rpc::serve::incoming(listener, &tls)));
        address
    }

    /// A replica that is hung: its kernel accepts connections, nothing
    /// answers. Kept open while the listener lives.
    async fn hung() -> (tokio::net::TcpListener, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        (listener, address)
    }

    /// Port 1 on loopback refuses connections: a dead replica.
    const DEAD: &str = "127.0.0.1:1";

    async fn health(channel: Channel) -> Result<(), tonic::Status> {
        HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.map(|_| ())
    }

    #[tokio::test]
    async fn a_call_moves_past_dead_and_hung_replicas_and_passes_them_over() {
        let dir = certs("past");
        let up = serve(&dir).await;
        let (_listener, stuck) = hung().await;
        let g = Gateways::open(&dir, &[DEAD.to_owned(), stuck.clone(), up.clone()]).expect("gateways");
        for _ in 0..6 {
            g.call(Duration::from_secs(20), health).await.expect("answered by the live replica");
        }
        let members = g.members();
        assert_eq!(members.iter().map(|m| m.answered).sum::<u64>(), 6, "{members:?}");
        assert_eq!(members.iter().find(|m| m.address == up).map(|m| m.answered), Some(6), "{members:?}");
        assert!(members.iter().filter(|m| m.address != up).all(|m| m.failed > 0), "{members:?}");

        // With no live replica, every one is tried once, and named.
        let g = Gateways::open(&dir, &[DEAD.to_owned(), stuck.clone()]).expect("gateways");
        match g.call(Duration::from_secs(20), health).await {
            Err(CallError::Unreachable(why)) => {
                assert!(why.contains(DEAD) && why.contains(&stuck), "{why}");
            }
            other => panic!("{other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn only_an_unavailable_replica_is_retried_elsewhere_each_once() {
        let dir = certs("retry");
        let (one, two) = (serve(&dir).await, serve(&dir).await);
        let g = Gateways::open(&dir, &[one.clone(), two.clone()]).expect("gateways");
        let count = Arc::new(AtomicU32::new(0));
        let counted = |answer: fn(u32) -> Result<(), tonic::Status>| {
            let count = count.clone();
            move |_channel: Channel| {
                let n = count.fetch_add(1, Ordering::SeqCst);
                async move { answer(n) }
            }
        };

        // Unavailable at the first, answered at the second.
        let first_down = counted(|n| if n == 0 { Err(tonic::Status::unavailable("")) } else { Ok(()) });
        g.call(Duration::from_secs(10), first_down).await.expect("failed over");
        assert_eq!(count.swap(0, Ordering::SeqCst), 2);

        // Unavailable everywhere: each replica once, then the error.
        let always_down = counted(|_| Err(tonic::Status::unavailable("shutting down")));
        let e = g.call(Duration::from_secs(10), always_down).await.expect_err("none answered");
        assert!(
            matches!(&e, CallError::Unreachable(why) if why.contains(&one) && why.contains(&two)),
            "{e:?}"
        );
        assert_eq!(count.swap(0, Ordering::SeqCst), 2, "each replica once");

        // A business answer, or a bank's unavailability, is final.
        let bank_down = counted(|_| {
            Err(errors::status(Code::Unavailable, ErrorReason::BankUnavailable, "BankB did not answer"))
        });
        let e = g.call(Duration::from_secs(10), bank_down).await.expect_err("final");
        assert!(matches!(&e, CallError::Answered(s) if s.code() == Code::Unavailable), "{e:?}");
        assert_eq!(count.swap(0, Ordering::SeqCst), 1);
        let refused = counted(|_| Err(tonic::Status::invalid_argument("bad amount")));
        g.call(Duration::from_secs(10), refused).await.expect_err("final");
        assert_eq!(count.swap(0, Ordering::SeqCst), 1);

        // A payment in progress is asked about again, within the budget.
        let in_progress = counted(|n| {
            if n < 2 {
                Err(errors::status(Code::Unavailable, ErrorReason::PaymentInProgress, "ask again shortly"))
            } else {
                Ok(())
            }
        });
        g.call(Duration::from_secs(10), in_progress).await.expect("answered once decided");
        assert_eq!(count.swap(0, Ordering::SeqCst), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_set_changes_at_run_time_and_keeps_what_it_knows() {
        let dir = certs("change");
        let up = serve(&dir).await;
        let g = Gateways::open(&dir, &[DEAD.to_owned()]).expect("gateways");
        assert!(matches!(g.call(Duration::from_secs(5), health).await, Err(CallError::Unreachable(_))));
        g.apply(Change::Insert(up.clone())).expect("insert");
        g.call(Duration::from_secs(5), health).await.expect("the new replica serves");
        g.apply(Change::Insert(up.clone())).expect("again");
        assert_eq!(g.members().len(), 2, "an address is in the set once");
        g.replace(&[up.clone(), "127.0.0.1:2".to_owned()]).expect("replace");
        let members = g.members();
        let addresses: Vec<&str> = members.iter().map(|m| m.address.as_str()).collect();
        assert_eq!(addresses, [up.as_str(), "127.0.0.1:2"], "{members:?}");
        assert_eq!(members[0].answered, 1, "a kept replica keeps its record");
        g.apply(Change::Remove(up.clone())).expect("remove");
        g.apply(Change::Remove("127.0.0.1:2".to_owned())).expect("remove");
        assert!(matches!(g.call(Duration::from_secs(5), health).await, Err(CallError::Setup(_))));
        assert!(matches!(g.apply(Change::Insert("not an address".into())), Err(CallError::Setup(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn calls_take_the_live_replicas_in_turn() {
        let dir = certs("turns");
        let (one, two, three) = (serve(&dir).await, serve(&dir).await, serve(&dir).await);
        let g = Gateways::open(&dir, &[one, two, three]).expect("gateways");
        for _ in 0..9 {
            g.call(Duration::from_secs(10), health).await.expect("answered");
        }
        let answered: Vec<u64> = g.members().iter().map(|m| m.answered).collect();
        assert_eq!(answered, [3, 3, 3]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

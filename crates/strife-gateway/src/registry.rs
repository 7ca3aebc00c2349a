//! The live banks. A bank is a name with one or more *replicas*: processes
//! that present the bank's certificate (which proves they are that bank)
//! and share its ledger. Each replica has its own address, channel, batched
//! link and last registration. Persisted in the store, a row per
//! `(name, address)`, so that a restarted gateway can reach banks (to finish
//! payments) before they register again.
//!
//! The certificate does not prove that two processes share one ledger: two
//! started by mistake on ledgers of their own would each hold and move the
//! money their own way. So each registration names its ledger (its id), and
//! a new address is a replica only if it serves the ledger of the bank's
//! live replicas; otherwise it is refused, as a second bank was before
//! replicas. Once none is live, a bank may come back on another ledger
//! (moved to a new database), and the replicas of the old one are dropped.
//!
//! Calls are spread over the live replicas of a bank in turn (round robin).
//! A replica not seen for the stale period is skipped while a live one
//! exists; one known only from the store is tried when nothing else is. A
//! call that fails at one replica in a way another may not (unreachable,
//! overloaded, timed out) is tried once more at the next one: prepares and
//! decisions are idempotent per transaction id at the bank, whichever
//! replica gets them, so a repeat gets the answer the first would have.

use crate::link::BankLink;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use strife_core::limits::{BANKS_MAX, REPLICAS_PER_BANK_MAX};
use strife_proto::bank::v1 as bank;
use strife_proto::bank::v1::bank_service_client::BankServiceClient;
use strife_rpc::Peer;
use strife_rpc::tls::Tls;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Replicas one call tries: the one whose turn it is and, if that one
/// fails in a way another may not, the next.
pub const ATTEMPTS_MAX: usize = 2;
/// HTTP/2 pings on each bank replica's connection, and how long one may go
/// unanswered before the connection is given up: a replica cut off
/// silently fails its calls within about their sum instead of when TCP
/// gives up, and once the network heals the next call makes a fresh
/// connection at once (an old one would wait out TCP's retransmission
/// backoff, seconds during which the bank looks down).
const BANK_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const BANK_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);
/// A replica not seen for this many stale periods is forgotten when its
/// bank registers (until then the status shows it as unreachable).
const FORGET_AFTER_STALE_PERIODS: u32 = 10;
/// A registration is written to the store again after this long even if
/// nothing changed, so that its `registered_at` stays fresh: the store
/// drops addresses that have not registered for a day.
const RESAVE_INTERVAL: Duration = Duration::from_secs(3600);

/// One bank replica as the dashboard shows it.
#[derive(Clone)]
pub struct ReplicaHealth {
    pub name: String,
    pub address: String,
    /// Registered recently enough to be used.
    pub reachable: bool,
    /// Since it last registered (its heartbeat); `None` if never here.
    pub last_seen: Option<Duration>,
    /// Its client, to ask it for its status.
    pub client: BankServiceClient<Channel>,
}

/// One process of a bank.
pub struct Replica {
    pub address: String,
    /// Whether it said, at its last registration, that it serves one-phase
    /// transfers (`RegisterBankRequest.transfers`); false until it
    /// registers (known only from the store or from discovery).
    transfers: AtomicBool,
    /// A client on a lazily connected channel that verifies the server's
    /// certificate names this bank.
    pub client: BankServiceClient<Channel>,
    /// Batched 2PC calls on that channel.
    pub link: BankLink,
}

/// What the registry knows of one replica.
struct Known {
    replica: Arc<Replica>,
    /// The id of the ledger it serves, as it last registered; empty when
    /// known only from the store, or sent by a bank older than ledger ids
    /// (which matches no other replica).
    ledger_id: String,
    /// When it last registered; `None` if only known from the store.
    last_seen: Option<Instant>,
    /// When this gateway learnt of it (from the store or a registration).
    known_since: Instant,
    /// When its registration was last handed to the caller to persist.
    saved_at: Option<Instant>,
}

impl Known {
    fn live(&self, stale_after: Duration) -> bool {
        self.last_seen.is_some_and(|t| t.elapsed() < stale_after)
    }

    /// Not seen for `forget_after`, or not at all for that long since this
    /// gateway learnt of it: a process that is gone (or moved).
    fn gone(&self, forget_after: Duration) -> bool {
        self.last_seen.unwrap_or(self.known_since).elapsed() >= forget_after
    }
}

/// The replicas of one bank.
#[derive(Default)]
struct Bank {
    replicas: Vec<Known>,
    /// Whose turn it is among the live replicas.
    next: AtomicUsize,
}

/// One bank for one call: its replicas in the order to try them.
#[derive(Clone)]
pub struct BankEntry {
    pub name: String,
    /// The live replicas, starting with the one whose turn it is; then the
    /// others, most recently seen first. Never empty.
    pub replicas: Vec<Arc<Replica>>,
    /// How many of `replicas`, from the first, are live (registered
    /// recently enough).
    pub live: usize,
}

pub struct Registry {
    /// Our TLS identity, to make channels to banks.
    tls: Tls,
    banks: RwLock<HashMap<String, Bank>>,
    /// A replica that has not registered for this long is shown as
    /// unreachable and skipped while another is live.
    stale_after: Duration,
    /// A replica not seen for this long is forgotten when its bank registers.
    forget_after: Duration,
    /// How long a batched prepare or decision call may take.
    prepare_timeout: Duration,
    decide_timeout: Duration,
}

#[derive(Debug)]
pub enum Registered {
    /// A new replica, its first registration since this gateway started,
    /// one now serving another ledger, or one due to be saved again: the
    /// caller persists it.
    Changed,
    Unchanged,
}

/// Why a registration was refused.
#[derive(Debug)]
pub enum Refused {
    /// A live replica of the bank, at `address`, serves another ledger (or
    /// the registration named none).
    OtherLedger { address: String },
    /// No room: too many banks, or replicas of this bank all live.
    Full(String),
    /// The registry's lock was poisoned.
    Internal(String),
}

impl From<anyhow::Error> for Refused {
    fn from(e: anyhow::Error) -> Refused {
        Refused::Internal(format!("{e:#}"))
    }
}

impl Registry {
    /// Batched calls to a bank give up after `prepare_timeout` (phase one)
    /// or `decide_timeout` (phase two).
    pub fn new(
        tls: Tls,
        register_interval: Duration,
        prepare_timeout: Duration,
        decide_timeout: Duration,
    ) -> Registry {
        Registry {
            tls,
            banks: RwLock::new(HashMap::new()),
            stale_after: register_interval * 3,
            forget_after: register_interval * 3 * FORGET_AFTER_STALE_PERIODS,
            prepare_timeout,
            decide_timeout,
        }
    }

    /// A replica of bank `name` at `address`, serving the ledger
    /// `ledger_id`, registers: refreshes it, or adds it ([`Self::admit`]
    /// says whether it may join). Replicas of that bank not seen for
    /// `forget_after` are forgotten; a bank
    /// at [`REPLICAS_PER_BANK_MAX`] makes room by dropping its least
    /// recently seen replica that is not live, and refuses a new one if
    /// every replica is live.
    pub fn register(&self, name: &str, address: &str, ledger_id: &str) -> Result<Registered, Refused> {
        let now = Instant::now();
        {
            let mut banks = self.write()?;
            if let Some(bank) = banks.get_mut(name) {
                let forget_after = self.forget_after;
                bank.replicas.retain(|k| k.replica.address == address || !k.gone(forget_after));
                self.admit(name, bank, address, ledger_id)?;
                if let Some(known) = bank.replicas.iter_mut().find(|k| k.replica.address == address) {
                    return Ok(refresh(known, ledger_id, now));
                }
            }
        }
        // A channel and link for the new replica, made outside the lock.
        let replica = Arc::new(self.replica(name, address)?);
        let mut banks = self.write()?;
        if banks.len() >= BANKS_MAX && !banks.contains_key(name) {
            return Err(Refused::Full(format!("the gateway already knows {BANKS_MAX} banks")));
        }
        let bank = banks.entry(name.to_owned()).or_default();
        // Again: the lock was let go meanwhile.
        self.admit(name, bank, address, ledger_id)?;
        if let Some(known) = bank.replicas.iter_mut().find(|k| k.replica.address == address) {
            // Registered concurrently by another call.
            return Ok(refresh(known, ledger_id, now));
        }
        if bank.replicas.len() >= REPLICAS_PER_BANK_MAX {
            let stale_after = self.stale_after;
            let evict = bank
                .replicas
                .iter()
                .enumerate()
                .filter(|(_, k)| !k.live(stale_after))
                .min_by_key(|(_, k)| k.last_seen)
                .map(|(i, _)| i);
            match evict {
                Some(i) => {
                    let old = bank.replicas.remove(i);
                    tracing::info!(bank = %name, address = %old.replica.address, "forgot a replica not seen lately, to make room");
                }
                None => {
                    return Err(Refused::Full(format!(
                        "bank {name} already has {REPLICAS_PER_BANK_MAX} live replicas"
                    )));
                }
            }
        }
        bank.replicas.push(Known {
            replica,
            ledger_id: ledger_id.to_owned(),
            last_seen: Some(now),
            known_since: now,
            saved_at: Some(now),
        });
        Ok(Registered::Changed)
    }

    /// Whether a replica at `address` serving `ledger_id` may join `bank`:
    /// not while a live replica at another address serves another ledger
    /// (an empty id, from a bank older than ledger ids, matches none).
    /// Once it may, replicas known to serve another ledger are dropped:
    /// none of them is live, so the bank has moved to this ledger.
    fn admit(&self, name: &str, bank: &mut Bank, address: &str, ledger_id: &str) -> Result<(), Refused> {
        let stale_after = self.stale_after;
        let other = bank.replicas.iter().find(|k| {
            k.replica.address != address
                && k.live(stale_after)
                && (ledger_id.is_empty() || k.ledger_id != ledger_id)
        });
        if let Some(other) = other {
            return Err(Refused::OtherLedger { address: other.replica.address.clone() });
        }
        let before = bank.replicas.len();
        bank.replicas
            .retain(|k| k.replica.address == address || k.ledger_id.is_empty() || k.ledger_id == ledger_id);
        if bank.replicas.len() < before {
            tracing::warn!(bank = %name, %ledger_id, forgotten = before - bank.replicas.len(),
                "the bank serves another ledger now; forgot its replicas of the old one");
        }
        Ok(())
    }

    /// Notes whether replica `address` of bank `name`, which just
    /// registered, serves one-phase transfers.
    pub fn note_transfers(&self, name: &str, address: &str, transfers: bool) {
        let Ok(banks) = self.banks.read() else { return };
        let known = banks.get(name).and_then(|b| b.replicas.iter().find(|k| k.replica.address == address));
        if let Some(known) = known {
            known.replica.transfers.store(transfers, Ordering::Relaxed);
        }
    }

    /// Forgets bank `name` at `address` (it uses another cluster); whether
    /// it was known there.
    pub fn forget(&self, name: &str, address: &str) -> anyhow::Result<bool> {
        let mut banks = self.write()?;
        let Some(bank) = banks.get_mut(name) else { return Ok(false) };
        let before = bank.replicas.len();
        bank.replicas.retain(|k| k.replica.address != address);
        let known = bank.replicas.len() < before;
        if bank.replicas.is_empty() {
            banks.remove(name);
        }
        Ok(known)
    }

    /// Discovery says replica `address` of bank `name` is gone (its etcd
    /// lease ran out, or it stopped): it is no longer live, so calls go to
    /// the live replicas, and to it only when none is; a registration makes
    /// it live again. Whether it was known.
    pub fn expire(&self, name: &str, address: &str) -> anyhow::Result<bool> {
        let mut banks = self.write()?;
        let Some(bank) = banks.get_mut(name) else { return Ok(false) };
        let Some(known) = bank.replicas.iter_mut().find(|k| k.replica.address == address) else {
            return Ok(false);
        };
        known.last_seen = None;
        Ok(true)
    }

    /// Restores a replica from the store, not yet seen in this run.
    pub fn restore(&self, name: &str, address: &str) -> anyhow::Result<()> {
        let replica = Arc::new(self.replica(name, address)?);
        let mut banks = self.write()?;
        if banks.len() >= BANKS_MAX && !banks.contains_key(name) {
            anyhow::bail!("the gateway already knows {BANKS_MAX} banks");
        }
        let bank = banks.entry(name.to_owned()).or_default();
        if bank.replicas.len() >= REPLICAS_PER_BANK_MAX {
            anyhow::bail!("bank {name} already has {REPLICAS_PER_BANK_MAX} replicas");
        }
        if !bank.replicas.iter().any(|k| k.replica.address == address) {
            let now = Instant::now();
            bank.replicas.push(Known {
                replica,
                ledger_id: String::new(),
                last_seen: None,
                known_since: now,
                saved_at: None,
            });
        }
        Ok(())
    }

    /// Bank `name` for one call, its replicas in the order to try them;
    /// each call takes the next live replica's turn.
    pub fn get(&self, name: &str) -> Option<BankEntry> {
        let banks = self.banks.read().ok()?;
        let bank = banks.get(name)?;
        let (mut live, mut rest): (Vec<&Known>, Vec<&Known>) =
            bank.replicas.iter().partition(|k| k.live(self.stale_after));
        if !live.is_empty() {
            let turn = bank.next.fetch_add(1, Ordering::Relaxed) % live.len();
            live.rotate_left(turn);
        }
        rest.sort_by_key(|k| std::cmp::Reverse(k.last_seen));
        let live_count = live.len();
        let replicas: Vec<Arc<Replica>> = live.into_iter().chain(rest).map(|k| k.replica.clone()).collect();
        (!replicas.is_empty()).then(|| BankEntry { name: name.to_owned(), replicas, live: live_count })
    }

    /// `(name, address, reachable)` of every replica of every bank, sorted
    /// by name and address: one row per bank when each runs once.
    pub fn status(&self) -> Vec<(String, String, bool)> {
        let Ok(banks) = self.banks.read() else { return Vec::new() };
        let mut out: Vec<_> = banks
            .iter()
            .flat_map(|(name, bank)| {
                bank.replicas
                    .iter()
                    .map(|k| (name.clone(), k.replica.address.clone(), k.live(self.stale_after)))
            })
            .collect();
        out.sort();
        out
    }

    /// Every replica of every bank as the dashboard shows it, sorted by
    /// name and address.
    pub fn health(&self) -> Vec<ReplicaHealth> {
        let Ok(banks) = self.banks.read() else { return Vec::new() };
        let mut out: Vec<_> = banks
            .iter()
            .flat_map(|(name, bank)| {
                bank.replicas.iter().map(|k| ReplicaHealth {
                    name: name.clone(),
                    address: k.replica.address.clone(),
                    reachable: k.live(self.stale_after),
                    last_seen: k.last_seen.map(|t| t.elapsed()),
                    client: k.replica.client.clone(),
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.name, &a.address).cmp(&(&b.name, &b.address)));
        out
    }

    fn replica(&self, name: &str, address: &str) -> anyhow::Result<Replica> {
        let channel = self
            .tls
            .endpoint(&Peer::Bank(name.to_owned()), address)?
            .http2_keep_alive_interval(BANK_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(BANK_KEEPALIVE_TIMEOUT)
            .connect_lazy();
        let client = BankServiceClient::new(channel)
            .max_decoding_message_size(strife_core::limits::MESSAGE_MAX_BYTES * 64);
        let link = BankLink::start(client.clone(), self.prepare_timeout, self.decide_timeout);
        Ok(Replica { address: address.to_owned(), transfers: AtomicBool::new(false), client, link })
    }

    fn write(&self) -> anyhow::Result<std::sync::RwLockWriteGuard<'_, HashMap<String, Bank>>> {
        self.banks.write().map_err(|_| anyhow::anyhow!("registry lock poisoned"))
    }
}

/// A known replica registers again, serving `ledger_id`.
fn refresh(known: &mut Known, ledger_id: &str, now: Instant) -> Registered {
    let first = known.last_seen.is_none() || known.ledger_id != ledger_id;
    known.ledger_id = ledger_id.to_owned();
    known.last_seen = Some(now);
    if first || known.saved_at.is_none_or(|t| now.duration_since(t) >= RESAVE_INTERVAL) {
        known.saved_at = Some(now);
        Registered::Changed
    } else {
        Registered::Unchanged
    }
}

/// Whether another replica may answer where this one failed: it was
/// unreachable, overloaded or too slow, or failed inside. A deliberate
/// answer about the item itself (invalid, contradicting a decision) would
/// be the same at every replica.
fn another_may_answer(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Internal
    )
}

impl Replica {
    /// Whether it serves one-phase transfers (as of its last registration).
    pub fn serves_transfers(&self) -> bool {
        self.transfers.load(Ordering::Relaxed)
    }
}

impl BankEntry {
    /// Whether a new payment within this bank may run in one phase: a live
    /// replica of it serves transfers. A bank whose replicas are all older
    /// (or not yet registered with this gateway) gets two-phase commit; so
    /// does a bank with no live replica, so that a payment within a bank
    /// known to be down is declined `bank_unavailable` (nothing moved) as
    /// before, rather than left for the bank to decide when it is back.
    /// (In one phase only the bank may decide: see `execute_one_phase`.)
    pub fn serves_transfers(&self) -> bool {
        self.replicas[..self.live.min(self.replicas.len())].iter().any(|r| r.serves_transfers())
    }

    /// This entry with only the replicas that serve one-phase transfers, in
    /// the same order: a transfer, or a question about one, never goes to
    /// a replica that would not understand it.
    fn transferring(&self) -> BankEntry {
        let live = self.replicas[..self.live.min(self.replicas.len())]
            .iter()
            .filter(|r| r.serves_transfers())
            .count();
        let replicas = self.replicas.iter().filter(|r| r.serves_transfers()).cloned().collect();
        BankEntry { name: self.name.clone(), replicas, live }
    }

    /// One phase for one payment, at the replica whose turn it is, or at the
    /// next if that one fails (a transfer is idempotent per `txn_id`).
    pub async fn transfer(&self, t: bank::Transfer) -> Result<bank::TransferResult, Status> {
        self.transferring()
            .first_answer(|r| {
                let t = t.clone();
                async move { r.link.transfer(t).await }
            })
            .await
    }

    /// What became of a one-phase payment (see `BankService.ResolveTransfer`):
    /// a transfer the bank never saw is fenced with `reason`.
    pub async fn resolve_transfer(
        &self,
        txn_id: &str,
        reason: &str,
    ) -> Result<bank::ResolveTransferResponse, Status> {
        let req = bank::ResolveTransferRequest { txn_id: txn_id.to_owned(), reason: reason.to_owned() };
        self.transferring()
            .first_answer(|r| {
                let mut client = r.client.clone();
                let req = req.clone();
                async move { Ok(client.resolve_transfer(req).await?.into_inner()) }
            })
            .await
    }

    /// Phase one for one leg, at the replica whose turn it is, or at the
    /// next if that one fails (a prepare is idempotent per `txn_id`).
    pub async fn prepare(&self, leg: bank::PrepareRequest) -> Result<bank::PrepareResponse, Status> {
        self.first_answer(|r| {
            let leg = leg.clone();
            async move { r.link.prepare(leg).await }
        })
        .await
    }

    /// Phase two for one payment, at the replica whose turn it is, or at
    /// the next if that one fails (a decision is idempotent per `txn_id`).
    /// `traceparent`: the payment's trace context (empty: none).
    pub async fn decide(&self, txn_id: &str, commit: bool, traceparent: &str) -> Result<(), Status> {
        self.first_answer(|r| {
            let (txn_id, traceparent) = (txn_id.to_owned(), traceparent.to_owned());
            async move { r.link.decide(txn_id, commit, traceparent).await }
        })
        .await
    }

    /// Any other call, with the same choice of replicas; `call` must be
    /// safe to repeat at another replica.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(BankServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.first_answer(|r| call(r.client.clone())).await
    }

    async fn first_answer<T, F, Fut>(&self, mut call: F) -> Result<T, Status>
    where
        F: FnMut(Arc<Replica>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let attempts = self.replicas.len().min(ATTEMPTS_MAX);
        let mut failed = Status::unavailable(format!("bank {} has no replica", self.name));
        for (i, replica) in self.replicas.iter().take(attempts).enumerate() {
            match call(replica.clone()).await {
                Ok(answer) => return Ok(answer),
                Err(status) if i + 1 < attempts && another_may_answer(status.code()) => {
                    tracing::warn!(bank = %self.name, address = %replica.address, code = ?status.code(),
                        message = status.message(), "a replica failed; trying another");
                    failed = status;
                }
                Err(status) => return Err(status),
            }
        }
        Err(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strife_rpc::pki::CertDir;

    const INTERVAL: Duration = Duration::from_secs(60);
    /// BankA's ledger.
    const LEDGER: &str = "0b6f6d0e-8a43-4c1e-9d55-2f3a8c7f4b11";
    /// Another ledger, of a BankA started by mistake on a database of its own.
    const OTHER: &str = "7c1d2e3f-4a5b-4c6d-8e7f-901a2b3c4d5e";

    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn registry() -> (Registry, Dir) {
        let dir = Dir(std::env::temp_dir().join(format!("strife-registry-{}", uuid::Uuid::new_v4())));
        let certs = CertDir::new(&dir.0);
        certs.init(&[Peer::Gateway, Peer::Bank("BankA".into())]).expect("certs");
        let tls = Tls::load(&certs, &Peer::Gateway).expect("tls");
        (Registry::new(tls, INTERVAL, Duration::from_secs(1), Duration::from_secs(1)), dir)
    }

    fn order(r: &Registry) -> Vec<String> {
        r.get("BankA").expect("known").replicas.iter().map(|x| x.address.clone()).collect()
    }

    fn age(r: &Registry, address: &str, by: Duration) {
        let mut banks = r.write().expect("lock");
        let known = banks
            .get_mut("BankA")
            .and_then(|b| b.replicas.iter_mut().find(|k| k.replica.address == address))
            .expect("replica");
        known.last_seen = known.last_seen.map(|t| t.checked_sub(by).expect("uptime"));
        known.known_since = known.known_since.checked_sub(by).expect("uptime");
    }

    #[tokio::test]
    async fn calls_take_turns_over_live_replicas_and_skip_stale_ones() {
        let (r, _dir) = registry();
        assert!(matches!(r.register("BankA", "127.0.0.1:1001", LEDGER), Ok(Registered::Changed)));
        assert!(matches!(r.register("BankA", "127.0.0.1:1002", LEDGER), Ok(Registered::Changed)));
        assert!(matches!(r.register("BankA", "127.0.0.1:1002", LEDGER), Ok(Registered::Unchanged)));
        let firsts: Vec<String> = (0..4).map(|_| order(&r)[0].clone()).collect();
        assert_eq!(firsts, ["127.0.0.1:1001", "127.0.0.1:1002", "127.0.0.1:1001", "127.0.0.1:1002"]);
        assert_eq!(r.status().len(), 2, "one row per replica");

        // A stale replica comes last, after every live one.
        age(&r, "127.0.0.1:1001", INTERVAL * 4);
        for _ in 0..3 {
            assert_eq!(order(&r), ["127.0.0.1:1002", "127.0.0.1:1001"]);
        }
        let status = r.status();
        assert_eq!(status[0], ("BankA".into(), "127.0.0.1:1001".into(), false));
        assert_eq!(status[1], ("BankA".into(), "127.0.0.1:1002".into(), true));
        assert!(matches!(r.register("BankA", "127.0.0.1:1002", LEDGER), Ok(Registered::Unchanged)));
        assert_eq!(r.status().len(), 2, "shown for a while");
        // Long gone, it is forgotten when the bank next registers.
        age(&r, "127.0.0.1:1001", INTERVAL * 3 * FORGET_AFTER_STALE_PERIODS);
        assert!(matches!(r.register("BankA", "127.0.0.1:1002", LEDGER), Ok(Registered::Unchanged)));
        assert_eq!(order(&r), ["127.0.0.1:1002"]);
    }

    #[tokio::test]
    async fn a_replica_known_only_from_the_store_is_tried_when_nothing_else_is() {
        let (r, _dir) = registry();
        r.restore("BankA", "127.0.0.1:1001").expect("restore");
        r.restore("BankA", "127.0.0.1:1002").expect("restore");
        assert_eq!(order(&r).len(), 2, "both tried");
        assert_eq!(r.status().iter().filter(|s| s.2).count(), 0, "neither seen yet");
        // Its first registration in this run is persisted again; then a
        // live replica goes first, the other only after it.
        assert!(matches!(r.register("BankA", "127.0.0.1:1002", LEDGER), Ok(Registered::Changed)));
        assert_eq!(order(&r), ["127.0.0.1:1002", "127.0.0.1:1001"]);
    }

    #[tokio::test]
    async fn a_bank_keeps_at_most_its_limit_of_replicas() {
        let (r, _dir) = registry();
        r.restore("BankA", "127.0.0.1:1999").expect("restore");
        for port in 1..REPLICAS_PER_BANK_MAX {
            r.register("BankA", &format!("127.0.0.1:{}", 2000 + port), LEDGER).expect("register");
        }
        // One that is not live makes room.
        r.register("BankA", "127.0.0.1:3000", LEDGER).expect("room");
        let addresses = order(&r);
        assert_eq!(addresses.len(), REPLICAS_PER_BANK_MAX);
        assert!(!addresses.contains(&"127.0.0.1:1999".to_owned()), "{addresses:?}");
        let err = r.register("BankA", "127.0.0.1:3001", LEDGER).expect_err("every replica is live");
        assert!(matches!(&err, Refused::Full(m) if m.contains("live replicas")), "{err:?}");
    }

    #[tokio::test]
    async fn a_second_ledger_is_refused_while_the_first_is_served() {
        let (r, _dir) = registry();
        r.register("BankA", "127.0.0.1:1001", LEDGER).expect("register");
        let refused = |address: &str, ledger: &str| match r.register("BankA", address, ledger) {
            Err(Refused::OtherLedger { address }) => address,
            other => panic!("{other:?}"),
        };
        assert_eq!(refused("127.0.0.1:1002", OTHER), "127.0.0.1:1001", "another ledger");
        assert_eq!(refused("127.0.0.1:1002", ""), "127.0.0.1:1001", "a bank that does not say");
        assert_eq!(order(&r), ["127.0.0.1:1001"], "neither was added");
        // The same ledger at another address is a replica.
        r.register("BankA", "127.0.0.1:1002", LEDGER).expect("a replica");
        assert_eq!(r.status().len(), 2);
        // A replica coming back on another ledger while its peer is live: refused.
        assert_eq!(refused("127.0.0.1:1002", OTHER), "127.0.0.1:1001");
        // A bank older than ledger ids runs once, as before replicas.
        r.register("BankB", "127.0.0.1:2001", "").expect("register");
        let again = r.register("BankB", "127.0.0.1:2001", "").expect("its heartbeat");
        assert!(matches!(again, Registered::Unchanged));
        assert!(matches!(r.register("BankB", "127.0.0.1:2002", ""), Err(Refused::OtherLedger { .. })));
    }

    #[tokio::test]
    async fn a_bank_whose_replicas_are_all_stale_may_move_to_another_ledger() {
        let (r, _dir) = registry();
        r.restore("BankA", "127.0.0.1:1000").expect("restore");
        r.register("BankA", "127.0.0.1:1001", LEDGER).expect("register");
        r.register("BankA", "127.0.0.1:1002", LEDGER).expect("register");
        age(&r, "127.0.0.1:1001", INTERVAL * 4);
        assert!(matches!(r.register("BankA", "127.0.0.1:1003", OTHER), Err(Refused::OtherLedger { .. })));
        age(&r, "127.0.0.1:1002", INTERVAL * 4);
        // None is live: the bank moved. The replicas of its old ledger go;
        // one known only from the store (its ledger unknown) stays, to be
        // judged when it registers.
        assert!(matches!(r.register("BankA", "127.0.0.1:1003", OTHER), Ok(Registered::Changed)));
        assert_eq!(order(&r), ["127.0.0.1:1003", "127.0.0.1:1000"]);
        assert!(matches!(r.register("BankA", "127.0.0.1:1000", LEDGER), Err(Refused::OtherLedger { .. })));
        r.register("BankA", "127.0.0.1:1000", OTHER).expect("a replica of the new ledger");
        // A lone replica restarted at its address on another ledger is the
        // bank moving too.
        r.forget("BankA", "127.0.0.1:1000").expect("forget");
        assert!(matches!(r.register("BankA", "127.0.0.1:1003", LEDGER), Ok(Registered::Changed)));
        assert_eq!(order(&r), ["127.0.0.1:1003"]);
        r.forget("BankA", "127.0.0.1:1003").expect("forget");
        assert!(r.get("BankA").is_none(), "forgotten with its last replica");
    }

    #[tokio::test]
    async fn a_call_failing_at_one_replica_is_answered_by_the_next() {
        let (r, _dir) = registry();
        r.register("BankA", "127.0.0.1:1001", LEDGER).expect("register");
        r.register("BankA", "127.0.0.1:1002", LEDGER).expect("register");
        let entry = r.get("BankA").expect("known");
        let tried = std::sync::Mutex::new(Vec::new());
        let answer = entry
            .first_answer(|replica| {
                tried.lock().expect("lock").push(replica.address.clone());
                let first = tried.lock().expect("lock").len() == 1;
                async move { if first { Err(Status::unavailable("gone")) } else { Ok(7) } }
            })
            .await;
        assert_eq!(answer.expect("the second answers"), 7);
        assert_eq!(*tried.lock().expect("lock"), ["127.0.0.1:1001", "127.0.0.1:1002"]);

        // A deliberate refusal is the same everywhere: not repeated.
        let calls = AtomicUsize::new(0);
        let refused = entry
            .first_answer(|_| {
                calls.fetch_add(1, Ordering::Relaxed);
                async { Err::<(), _>(Status::failed_precondition("contradicts the decision")) }
            })
            .await;
        assert_eq!(refused.err().map(|s| s.code()), Some(Code::FailedPrecondition));
        assert_eq!(calls.load(Ordering::Relaxed), 1);

        // At most ATTEMPTS_MAX replicas per call.
        r.register("BankA", "127.0.0.1:1003", LEDGER).expect("register");
        let entry = r.get("BankA").expect("known");
        let calls = AtomicUsize::new(0);
        let failed = entry
            .first_answer(|_| {
                calls.fetch_add(1, Ordering::Relaxed);
                async { Err::<(), _>(Status::unavailable("gone")) }
            })
            .await;
        assert_eq!(failed.err().map(|s| s.code()), Some(Code::Unavailable));
        assert_eq!(calls.load(Ordering::Relaxed), ATTEMPTS_MAX);
    }
}

//! The gateway's store: one interface ([`GatewayStore`]), two backends,
//! chosen by the URL in `gateway.store` ([`StoreUrl`]):
//!
//! - [`SqliteStore`]: SQLite in one file ([`crate::store::Store`]), driven
//!   by one group-commit thread; one gateway process (the default: nothing
//!   to install);
//! - [`crate::postgres::PostgresStore`]: PostgreSQL through a connection
//!   pool; any number of gateway replicas share it.
//!
//! Both store the same things and answer the same way; one conformance
//! suite (`conformance.rs`) runs against each. Neither decides anything
//! about 2PC: the coordinator ([`crate::coordinator`]) decides, and a
//! backend makes the write it is told to, durably (unless the method says
//! otherwise), before its future resolves.
//!
//! What makes replicas safe is in the statements, not in any process's
//! memory: a payment id is taken by one unique index, a decision is one
//! conditional update from `preparing` (so a payment never gets two), and a
//! replica claims the delivery of a decision before it drives it.

use crate::error::GatewayError;
use crate::store::{
    Cursor, Heartbeat, PageQuery, PaymentCounts, PaymentEvent, PaymentFilter, PaymentPage, PaymentRecord,
    PaymentState, ReplicaRow, Store,
};
use crate::throttle::{self, Entry, Rule};
use crate::tokens::SigningKey;
use std::collections::HashSet;
use std::future::{Future, ready};
use std::sync::{Arc, RwLock};
use strife_core::{DeclineReason, UserRef};
use strife_rpc::group_commit::{GroupCommit, GroupCommitError};

pub use strife_rpc::store_url::StoreUrl;

/// Addresses kept per bank name (a bank may run as several processes, and
/// each restart on a free port brings a new address): the newest ones.
pub const BANK_ADDRESSES_MAX: u32 = 16;

/// A bank's address that has not registered for this long is forgotten
/// when the bank registers again, unless it is the bank's newest.
pub const BANK_ADDRESS_RETENTION_MS: i64 = 24 * 3600 * 1000;

/// The gateway's durable state: payments (the coordinator's log), the bank
/// registry and revoked tokens. Cheap to clone.
///
/// The futures are `Send` and named by the implementation (no boxing): the
/// gateway is generic over its store.
pub trait GatewayStore: Clone + Send + Sync + 'static {
    /// Records a new payment as `preparing`, or returns the record that
    /// already holds this `(payer, payment id)`. The first of any number of
    /// concurrent begins of one id wins, across every replica. A two-phase
    /// payment's record need not be durable when it resolves (a lost
    /// `preparing` record means abort, which is what presumed abort assumes
    /// anyway), but it is durable before any later durable write of this
    /// store. A one-phase payment's record (`one_phase`) **is** durable when
    /// it resolves: its bank may commit as soon as it hears of it, so the
    /// gateway must find it after a crash (to ask the bank), and a retry of
    /// the id must find it too (or it would run again under a new txn id).
    fn begin_payment(
        &self,
        payment: PaymentRecord,
    ) -> impl Future<Output = Result<Result<(), PaymentRecord>, GatewayError>> + Send;

    /// Writes the decision durably if the payment is still `preparing`, and
    /// returns the state it ends up in: this decision, or the one made
    /// before (by this or another replica). A payment never gets two.
    fn decide(
        &self,
        txn_id: String,
        outcome: PaymentState,
        reason: Option<DeclineReason>,
    ) -> impl Future<Output = Result<PaymentState, GatewayError>> + Send;

    /// Records the decision of a one-phase payment's bank, and that the
    /// payment needs nothing more, if it is still `preparing`; without
    /// waiting and without forcing it: the bank holds the decision, so if
    /// the record is lost the payment is asked about again
    /// (`strife_twopc::coordinator::on_abandoned`).
    fn record_outcome_lazily(&self, txn_id: String, outcome: PaymentState, reason: Option<DeclineReason>);

    /// Notes, durably, that every bank applied the decision.
    fn mark_acked(&self, txn_id: String) -> impl Future<Output = Result<(), GatewayError>> + Send;

    /// Notes it without waiting and without forcing it to disk: if the note
    /// is lost, the decision is delivered again, which banks ignore.
    fn mark_acked_lazily(&self, txn_id: String);

    /// The payment with this 2PC transaction id.
    fn find_txn(
        &self,
        txn_id: String,
    ) -> impl Future<Output = Result<Option<PaymentRecord>, GatewayError>> + Send;

    /// The payment `payer` made under `payment_id`.
    fn find_payment(
        &self,
        payer: UserRef,
        payment_id: String,
    ) -> impl Future<Output = Result<Option<PaymentRecord>, GatewayError>> + Send;

    /// The payment with this id that `who` made, else the newest committed
    /// one `who` received.
    fn find_payment_for(
        &self,
        who: UserRef,
        payment_id: String,
    ) -> impl Future<Output = Result<Option<PaymentRecord>, GatewayError>> + Send;

    /// One page of `who`'s payments, newest first by `(created_at, txn_id)`.
    fn list_payments(
        &self,
        who: UserRef,
        query: PageQuery,
    ) -> impl Future<Output = Result<PaymentPage, GatewayError>> + Send;

    /// At most `limit` payments whose transaction id sorts after `after`,
    /// in transaction-id order: the audit reads the log a page at a time.
    fn payments_after(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<PaymentRecord>, GatewayError>> + Send;

    /// Claims at most `limit` decided payments that some bank may not have
    /// applied yet and that no other replica is delivering: this replica's
    /// own, and those whose claim lapsed (their replica died). Until the
    /// claim lapses, no other replica gets them.
    fn claim_unfinished(
        &self,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<PaymentRecord>, GatewayError>> + Send;

    /// Payments still `preparing` that began before `before_ms`, oldest
    /// first: the ones to abort if nobody is driving them.
    fn preparing_before(
        &self,
        before_ms: i64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<PaymentRecord>, GatewayError>> + Send;

    /// Aborts, at start, the payments this process was driving when it
    /// stopped. SQLite: every two-phase `preparing` payment (one gateway
    /// owns the file; a one-phase one is left to the deadline sweep, which
    /// asks its bank). PostgreSQL: none (other replicas may be driving
    /// them; the deadline sweep settles the abandoned ones). Returns how many.
    fn recover(&self) -> impl Future<Output = Result<usize, GatewayError>> + Send;

    /// Counts of payments by state.
    fn counts(&self) -> impl Future<Output = Result<PaymentCounts, GatewayError>> + Send;

    /// Deletes decided, acknowledged payments created before `before_ms`,
    /// and login counts idle since [`throttle::IDLE_FORGET`] and not locked.
    /// Returns how many payments.
    fn prune(&self, before_ms: i64) -> impl Future<Output = Result<usize, GatewayError>> + Send;

    /// The login counts of each key (fresh entries for keys never seen).
    fn throttle_entries(
        &self,
        keys: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Entry>, GatewayError>> + Send;

    /// Counts one failed login of `key` by `rule` ([`Rule::after_failure`]),
    /// reading and writing its entry in one transaction, so that failures
    /// at every replica add up; durable. Returns the new entry.
    fn throttle_failure(
        &self,
        key: String,
        rule: Rule,
        now_ms: i64,
    ) -> impl Future<Output = Result<Entry, GatewayError>> + Send;

    /// A successful login clears the key's failures (not its locks).
    fn throttle_success(&self, key: String) -> impl Future<Output = Result<(), GatewayError>> + Send;

    /// The token signing keys every replica uses, newest first, at most
    /// [`crate::tokens::KEYS_MAX`], after adding those of `from_file` (this
    /// process's key file, newest first) that the store lacks. SQLite: the
    /// file is the only source, and comes back as it is. PostgreSQL: the
    /// keys are shared, so a key rotated into one gateway's file reaches
    /// every replica.
    fn token_keys(
        &self,
        from_file: Vec<SigningKey>,
    ) -> impl Future<Output = Result<Vec<SigningKey>, GatewayError>> + Send;

    /// The cluster's id: random, made once when the store was created, and
    /// the same at every gateway that shares this store (one payment log);
    /// gateways with stores of their own answer different ids. Banks use
    /// the gateways of one cluster only. Read once, at start.
    fn cluster_id(&self) -> impl Future<Output = Result<String, GatewayError>> + Send;

    /// Every `(bank name, address)` registered, by name, each bank's most
    /// recently registered address first.
    fn banks(&self) -> impl Future<Output = Result<Vec<(String, String)>, GatewayError>> + Send;

    /// Records that `name` registered from `address` (beside its other
    /// addresses: a bank may have several replicas), and forgets its
    /// addresses not registered for a day (never the newest) and all but
    /// its newest [`BANK_ADDRESSES_MAX`].
    fn save_bank(
        &self,
        name: String,
        address: String,
    ) -> impl Future<Output = Result<(), GatewayError>> + Send;

    /// Forgets that `name` registered from `address` (the bank there uses
    /// gateways of another cluster), so that no replica restores it.
    fn forget_bank(
        &self,
        name: String,
        address: String,
    ) -> impl Future<Output = Result<(), GatewayError>> + Send;

    /// Revokes a token (by its id) until it expires (`expires_at`, seconds
    /// since the epoch), durably: every replica refuses it once this
    /// resolves.
    fn revoke(&self, jti: String, expires_at: i64) -> impl Future<Output = Result<(), GatewayError>> + Send;

    /// Whether a token was revoked, by this replica or any other.
    fn is_revoked(&self, jti: String) -> impl Future<Output = Result<bool, GatewayError>> + Send;

    /// Adds steps to payments' timelines (the dashboard's), without waiting
    /// and without forcing anything to disk: best-effort, a crash may lose
    /// the last ones (never a decision, which is a payment's own state).
    fn record_events(&self, events: Vec<PaymentEvent>);

    /// A payment's timeline, oldest step first (at most
    /// [`crate::store::EVENTS_PER_PAYMENT_MAX`]).
    fn payment_events(
        &self,
        txn_id: String,
    ) -> impl Future<Output = Result<Vec<PaymentEvent>, GatewayError>> + Send;

    /// At most `limit` of the newest payments that match `filter`, older
    /// than `before` by `(created_at, txn_id)`: the dashboard's list.
    fn recent_payments(
        &self,
        filter: PaymentFilter,
        before: Option<Cursor>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<PaymentRecord>, GatewayError>> + Send;

    /// Declined payments by reason code, most frequent first.
    fn decline_counts(&self) -> impl Future<Output = Result<Vec<(String, u64)>, GatewayError>> + Send;

    /// Writes this replica's heartbeat row (by its boot id), not forced:
    /// a lost one is replaced a second later. Rows silent for
    /// [`crate::cluster::REPLICA_FORGET_MS`] are deleted meanwhile. The
    /// time is the store's clock (PostgreSQL's: replicas' clocks may
    /// differ). SQLite queues it lazily and resolves at once.
    fn heartbeat(&self, beat: Heartbeat) -> impl Future<Output = Result<(), GatewayError>> + Send;

    /// Every replica's last heartbeat, the most recent first, at most
    /// `limit`, with its age by the store's clock.
    fn replicas(&self, limit: u32) -> impl Future<Output = Result<Vec<ReplicaRow>, GatewayError>> + Send;
}

/// [`throttle::IDLE_FORGET`] in ms.
pub fn idle_forget_ms() -> i64 {
    i64::try_from(throttle::IDLE_FORGET.as_millis()).unwrap_or(i64::MAX)
}

fn internal(e: impl std::fmt::Display) -> GatewayError {
    GatewayError::Internal(e.to_string())
}

/// A batch that failed (its cause kept), or a store that is gone.
fn batch_failed(e: GroupCommitError) -> GatewayError {
    match e {
        GroupCommitError::Commit(failure) => GatewayError::StoreFailed(failure),
        GroupCommitError::Closed => internal(e),
    }
}

/// The SQLite backend: [`Store`] behind its group-commit thread, with the
/// revoked tokens in memory as well (one gateway owns the file, so the set
/// it loaded at start plus its own revocations is every revocation).
#[derive(Clone)]
pub struct SqliteStore {
    store: GroupCommit<Store>,
    revoked: Arc<RwLock<HashSet<String>>>,
    /// The cluster's id, read at open.
    cluster_id: Arc<str>,
    /// The database file, for reads that scan (see [`SqliteStore::read`]).
    path: Arc<std::path::Path>,
}

impl SqliteStore {
    /// Opens the file and starts its group-commit thread.
    pub fn open(path: &std::path::Path) -> anyhow::Result<SqliteStore> {
        use anyhow::Context;
        let mut store = Store::open(path).with_context(|| format!("opening {}", path.display()))?;
        let now_secs = strife_core::unix_ms() / 1000;
        let revoked = store.revoked(now_secs)?;
        let cluster_id = Arc::from(store.cluster_id()?);
        let store = GroupCommit::start("gateway", store)?;
        Ok(SqliteStore {
            store,
            revoked: Arc::new(RwLock::new(revoked.into_iter().collect())),
            cluster_id,
            path: Arc::from(path),
        })
    }

    /// Runs `f` on a read-only connection of its own, off the store's
    /// thread, once everything asked of the store before is committed. For
    /// reads whose cost grows with the log (counting payments reads all of
    /// it: 1.6 s for 10,000,000), which on the store's thread would hold up
    /// every payment meanwhile. WAL lets the reader and the
    /// writer go on at once.
    async fn read<T, F>(&self, f: F) -> Result<T, GatewayError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        // Lazy writes queued before this call (a one-phase outcome, say)
        // commit with the next batch: wait for it, then read.
        self.run(|_| Ok(())).await?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = rusqlite::Connection::open_with_flags(
                &*path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            f(&conn)
        })
        .await
        .map_err(|e| GatewayError::Internal(format!("a store read stopped: {e}")))?
        .map_err(GatewayError::from)
    }

    /// Runs `f` on the store in its thread, in the next batch; resolves
    /// after the batch's commit.
    async fn run<T, F>(&self, f: F) -> Result<T, GatewayError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> rusqlite::Result<T> + Send + 'static,
    {
        self.store.run(f).await.map_err(batch_failed)?.map_err(GatewayError::from)
    }
}

impl GatewayStore for SqliteStore {
    async fn begin_payment(&self, payment: PaymentRecord) -> Result<Result<(), PaymentRecord>, GatewayError> {
        if payment.one_phase {
            // Durable first: see the trait.
            return self.run(move |s| s.begin_payment(&payment)).await;
        }
        self.store
            .run_before_commit(move |s| s.begin_payment(&payment))
            .await
            .map_err(batch_failed)?
            .map_err(GatewayError::from)
    }

    fn record_outcome_lazily(&self, txn_id: String, outcome: PaymentState, reason: Option<DeclineReason>) {
        self.store.run_lazily(move |s| {
            if let Err(e) = s.record_outcome(&txn_id, outcome, reason) {
                tracing::debug!(error = %e, %txn_id, "a one-phase outcome not recorded; it is asked for again");
            }
        });
    }

    async fn decide(
        &self,
        txn_id: String,
        outcome: PaymentState,
        reason: Option<DeclineReason>,
    ) -> Result<PaymentState, GatewayError> {
        self.run(move |s| s.decide(&txn_id, outcome, reason)).await
    }

    async fn mark_acked(&self, txn_id: String) -> Result<(), GatewayError> {
        self.run(move |s| s.mark_acked(&txn_id)).await
    }

    fn mark_acked_lazily(&self, txn_id: String) {
        self.store.run_lazily(move |s| {
            let _ = s.mark_acked(&txn_id);
        });
    }

    async fn find_txn(&self, txn_id: String) -> Result<Option<PaymentRecord>, GatewayError> {
        self.run(move |s| s.find_txn(&txn_id)).await
    }

    async fn find_payment(
        &self,
        payer: UserRef,
        payment_id: String,
    ) -> Result<Option<PaymentRecord>, GatewayError> {
        self.run(move |s| s.find_payment(&payer, &payment_id)).await
    }

    async fn find_payment_for(
        &self,
        who: UserRef,
        payment_id: String,
    ) -> Result<Option<PaymentRecord>, GatewayError> {
        self.run(move |s| s.find_payment_for(&who, &payment_id)).await
    }

    async fn list_payments(&self, who: UserRef, query: PageQuery) -> Result<PaymentPage, GatewayError> {
        self.run(move |s| s.list_payments(&who, &query)).await
    }

    async fn payments_after(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<PaymentRecord>, GatewayError> {
        self.run(move |s| s.payments_after(after.as_deref(), limit)).await
    }

    async fn claim_unfinished(&self, limit: u32) -> Result<Vec<PaymentRecord>, GatewayError> {
        // One process owns the file: every unfinished payment is its own.
        self.run(move |s| s.unfinished(limit)).await
    }

    async fn preparing_before(&self, before_ms: i64, limit: u32) -> Result<Vec<PaymentRecord>, GatewayError> {
        self.run(move |s| s.preparing_before(before_ms, limit)).await
    }

    async fn recover(&self) -> Result<usize, GatewayError> {
        self.run(Store::abort_all_preparing).await
    }

    async fn counts(&self) -> Result<PaymentCounts, GatewayError> {
        self.read(crate::store::counts).await
    }

    async fn prune(&self, before_ms: i64) -> Result<usize, GatewayError> {
        let idle_before = strife_core::unix_ms().saturating_sub(idle_forget_ms());
        self.run(move |s| s.prune_logins(idle_before)).await?;
        // In steps, each a short operation of the store's thread: payments
        // go on between them however much there is to delete.
        let step = crate::store::PRUNE_STEP_ROWS;
        while self.run(move |s| s.prune_timelines(before_ms, step)).await? == step as usize {}
        let (mut pruned, mut after) = (0, 0);
        loop {
            let done = self.run(move |s| s.prune_payments(before_ms, after, step)).await?;
            pruned += done.deleted;
            match done.next {
                Some(next) => after = next,
                None => return Ok(pruned),
            }
        }
    }

    async fn throttle_entries(&self, keys: Vec<String>) -> Result<Vec<Entry>, GatewayError> {
        self.run(move |s| keys.iter().map(|k| s.throttle_entry(k)).collect()).await
    }

    async fn throttle_failure(&self, key: String, rule: Rule, now_ms: i64) -> Result<Entry, GatewayError> {
        self.run(move |s| s.throttle_failure(&key, rule, now_ms)).await
    }

    async fn throttle_success(&self, key: String) -> Result<(), GatewayError> {
        self.run(move |s| s.throttle_success(&key)).await
    }

    fn token_keys(
        &self,
        from_file: Vec<SigningKey>,
    ) -> impl Future<Output = Result<Vec<SigningKey>, GatewayError>> + Send {
        ready(Ok(from_file))
    }

    fn cluster_id(&self) -> impl Future<Output = Result<String, GatewayError>> + Send {
        ready(Ok(self.cluster_id.to_string()))
    }

    async fn banks(&self) -> Result<Vec<(String, String)>, GatewayError> {
        self.run(|s| s.banks()).await
    }

    async fn forget_bank(&self, name: String, address: String) -> Result<(), GatewayError> {
        self.run(move |s| s.forget_bank(&name, &address)).await
    }

    async fn save_bank(&self, name: String, address: String) -> Result<(), GatewayError> {
        self.run(move |s| s.save_bank(&name, &address)).await
    }

    async fn revoke(&self, jti: String, expires_at: i64) -> Result<(), GatewayError> {
        let id = jti.clone();
        self.run(move |s| s.revoke(&id, expires_at)).await?;
        self.revoked.write().map_err(|_| internal("revocation lock poisoned"))?.insert(jti);
        Ok(())
    }

    fn record_events(&self, events: Vec<PaymentEvent>) {
        self.store.run_lazily(move |s| {
            if let Err(e) = s.record_events(&events) {
                tracing::debug!(error = %e, "timeline events not written");
            }
        });
    }

    async fn payment_events(&self, txn_id: String) -> Result<Vec<PaymentEvent>, GatewayError> {
        self.run(move |s| s.payment_events(&txn_id)).await
    }

    async fn recent_payments(
        &self,
        filter: PaymentFilter,
        before: Option<Cursor>,
        limit: u32,
    ) -> Result<Vec<PaymentRecord>, GatewayError> {
        self.run(move |s| s.recent_payments(&filter, before.as_ref(), limit)).await
    }

    async fn decline_counts(&self) -> Result<Vec<(String, u64)>, GatewayError> {
        self.read(crate::store::decline_counts).await
    }

    fn heartbeat(&self, beat: Heartbeat) -> impl Future<Output = Result<(), GatewayError>> + Send {
        self.store.run_lazily(move |s| {
            if let Err(e) = s.heartbeat(&beat, strife_core::unix_ms()) {
                tracing::debug!(error = %e, "heartbeat not written");
            }
        });
        ready(Ok(()))
    }

    async fn replicas(&self, limit: u32) -> Result<Vec<ReplicaRow>, GatewayError> {
        self.run(move |s| s.replicas(strife_core::unix_ms(), limit)).await
    }

    fn is_revoked(&self, jti: String) -> impl Future<Output = Result<bool, GatewayError>> + Send {
        ready(
            self.revoked
                .read()
                .map(|set| set.contains(&jti))
                .map_err(|_| internal("revocation lock poisoned")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{conformance_suite, record, user};

    /// A directory removed when dropped.
    pub struct TempDir(std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A fresh SQLite store in a directory of its own; one process owns a
    /// SQLite file, so its "other instance" is itself.
    async fn fresh() -> (SqliteStore, SqliteStore, TempDir) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("strife-gw-backend-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let store = SqliteStore::open(&dir.join("gateway.db")).expect("open");
        (store.clone(), store, TempDir(dir))
    }

    conformance_suite!(fresh);

    /// One gateway owns the file: at start, nobody drives what was
    /// preparing, so it is aborted (two-phase; a one-phase payment's bank
    /// may have committed it, so it waits for the sweep to ask); revocations
    /// survive the restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_aborts_what_was_preparing_and_keeps_revocations() {
        let (s, _, dir) = fresh().await;
        let (x, y) = (user("x@BankA"), user("y@BankB"));
        s.begin_payment(record(1, 1, &x, &y, PaymentState::Preparing)).await.expect("begin").expect("new");
        s.begin_payment(record(2, 2, &x, &y, PaymentState::Committed)).await.expect("begin").expect("new");
        let one_phase =
            PaymentRecord { one_phase: true, ..record(3, 3, &x, &user("z@BankA"), PaymentState::Preparing) };
        s.begin_payment(one_phase).await.expect("begin").expect("new");
        s.revoke("j1".into(), strife_core::unix_ms() / 1000 + 60).await.expect("revoke");
        drop(s);
        let s = SqliteStore::open(&dir.0.join("gateway.db")).expect("reopen");
        assert_eq!(s.recover().await.expect("recover"), 1, "the two-phase one only");
        let p = s.find_txn(crate::conformance::uuid_of(1)).await.expect("find").expect("exists");
        assert_eq!((p.state, p.reason), (PaymentState::Aborted, Some(DeclineReason::Timeout)));
        let p = s.find_txn(crate::conformance::uuid_of(3)).await.expect("find").expect("exists");
        assert_eq!(p.state, PaymentState::Preparing, "a one-phase payment is left for its bank to settle");
        assert!(s.is_revoked("j1".into()).await.expect("revoked?"));
    }
}

//! The PostgreSQL backend of the gateway's store ([`GatewayStore`]): the
//! tables of the SQLite store (`migrations/postgres`, applied at start by
//! refinery), reached through one connection pool. Any number of gateway
//! processes (replicas) share one database.
//!
//! Durability: a write the trait calls durable is one transaction, committed
//! before its future resolves, and the server must run with
//! `synchronous_commit = on` (checked at start), so a commit that returned is
//! on disk. Two writes are not forced: the `preparing` record and the lazy
//! acknowledgement marks (each one statement that sets `synchronous_commit = off`
//! for its own transaction with `set_config(…, true)`). Begins and decisions
//! are group-committed ([`crate::pg_batch`]): concurrent ones of one kind
//! are one statement over arrays, each row answered on its own.
//! PostgreSQL writes one log in order, so the next forced commit of any
//! replica flushes them first: a `preparing` record is durable before its
//! decision, wherever the decision is made.
//!
//! What keeps replicas apart is in the statements, not in memory:
//! - a payment id is taken by an `INSERT … ON CONFLICT DO NOTHING` on the
//!   unique `(payment_id, payer_bank, payer_user)` index: the first insert
//!   wins (in one batch, the first row), and every other reads its row;
//! - a decision is an `UPDATE … WHERE state = 'preparing'`: the first wins,
//!   and every later one reads it;
//! - a payment is driven by its `owner`, this process's instance id, until
//!   `lease_until` (both in its row of the work queue, `payment_queue`, which
//!   holds exactly the payments not yet acknowledged): the process that
//!   began it until its deadline plus the commit timeout, then whoever
//!   claimed its delivery ([`PostgresStore`]'s `claim_unfinished`: `FOR
//!   UPDATE SKIP LOCKED` on the queue's decided rows, so two claims never
//!   take one row), and after a lapse anyone.

use crate::backend::{BANK_ADDRESS_RETENTION_MS, BANK_ADDRESSES_MAX, GatewayStore, idle_forget_ms};
use crate::error::GatewayError;
use crate::pg_batch::Batcher;
use crate::store::{
    Cursor, EVENTS_PER_PAYMENT_MAX, Heartbeat, PageQuery, PaymentCounts, PaymentEvent, PaymentFilter,
    PaymentPage, PaymentRecord, PaymentState, ReplicaRow, now_ms,
};
use crate::throttle::{Entry, Rule};
use crate::tokens::{KEYS_MAX, SigningKey};
use deadpool_postgres::{Object, Pool};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use strife_core::limits::HISTORY_PAGE_MAX;
use strife_core::{DeclineReason, Secret, UserRef};
use strife_rpc::pg_pool;
use tokio::sync::mpsc;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

refinery::embed_migrations!("migrations/postgres");

pub use strife_rpc::pg_pool::POOL_SIZE_MAX;
/// Runs of one transaction that PostgreSQL aborted for a deadlock or a
/// serialization failure (nothing of an aborted run remains).
const TRANSACTION_TRIES_MAX: u32 = 8;
/// Tries of a begin whose id was taken by a payment that was then pruned
/// before it could be read.
const BEGIN_TRIES_MAX: u32 = 3;
/// The advisory lock that lets one process at a time migrate a database.
const MIGRATION_LOCK: i64 = 0x5354_5249_4645_0002;
/// Where refinery records the applied migrations (not its default name, so
/// that a database shared with a bank's ledger would not mix the two).
const MIGRATION_TABLE: &str = "gateway_schema_history";
/// Revoked tokens remembered in memory (a revocation is final).
const REVOKED_CACHED_MAX: usize = 100_000;
/// Lazy acknowledgement marks waiting to be written; more are dropped (the
/// finisher delivers those decisions again).
const LAZY_ACKS_QUEUED_MAX: usize = 8192;
/// Timeline events waiting to be written; more are dropped (best-effort).
const LAZY_EVENTS_QUEUED_MAX: usize = 16_384;
/// Timeline events written in one statement.
const LAZY_EVENTS_BATCH_MAX: usize = 1024;
/// How long a payment's opening steps wait for the rest of its timeline
/// (its decision, written after the banks acknowledged it), to be one row.
const TIMELINE_HOLD: Duration = Duration::from_secs(1);
/// Most payments whose opening steps wait so; beyond it they are written at once.
const TIMELINE_HELD_MAX: usize = 4096;
/// Lazy acknowledgement marks written in one statement.
const LAZY_ACKS_BATCH_MAX: usize = 512;
/// Lazy one-phase outcomes waiting to be written; more are dropped (those
/// payments are asked about again once their deadline passed).
const LAZY_OUTCOMES_QUEUED_MAX: usize = 8192;
/// Lazy one-phase outcomes written in one statement.
const LAZY_OUTCOMES_BATCH_MAX: usize = 512;
/// What a lease covers beyond the commit timeout: a wait for a database
/// connection to write the acknowledgement, and a margin.
const LEASE_SLACK: Duration = Duration::from_secs(15);

/// How long this process's hold on a payment lasts; until it lapses no
/// other replica drives the payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leases {
    /// A payment this process began: until its deadline plus this (its
    /// task decides by the deadline, then delivers for at most the commit
    /// timeout). The deadline is set by this process's clock and read
    /// against the database's: their clocks must agree to well within the
    /// slack this leaves (15 s by default).
    pub after_deadline: Duration,
    /// A decided payment this process claimed for delivery: this long from
    /// the claim (the finisher delivers a claim for at most the commit
    /// timeout, then writes the acknowledgement).
    pub claim: Duration,
}

impl Leases {
    /// The leases of a gateway whose deliveries wait `commit_timeout` at most.
    pub fn for_commit_timeout(commit_timeout: Duration) -> Leases {
        Leases { after_deadline: commit_timeout + LEASE_SLACK, claim: commit_timeout + LEASE_SLACK }
    }
}

/// The gateway's store in a PostgreSQL database; cheap to clone (one pool).
#[derive(Clone)]
pub struct PostgresStore {
    /// Connections to the database.
    pool: Pool,
    /// This process's id: the `owner` of the payments it drives. New at
    /// every connect, so a restarted process claims nothing of its past
    /// life before the leases lapse.
    instance: Arc<str>,
    /// The leases, in ms.
    after_deadline_ms: i64,
    claim_ms: i64,
    /// Tokens known to be revoked, with their expiry (seconds since the
    /// epoch): a revocation never ends, so a positive answer can be kept.
    revoked: Arc<RwLock<HashMap<String, i64>>>,
    /// Lazy acknowledgement marks, for the task that writes them in batches.
    lazy_acks: mpsc::Sender<String>,
    /// Lazy one-phase outcomes, for the task that writes them in batches.
    lazy_outcomes: mpsc::Sender<Decision>,
    /// Timeline events, for the task that writes them in batches, unforced.
    lazy_events: mpsc::Sender<PaymentEvent>,
    /// Begins, written a batch per statement: whether each was new.
    begins: Batcher<Begin, bool>,
    /// Decisions, written a batch per statement: the decision that stands
    /// for each (none: no such payment).
    decisions: Batcher<Decision, Option<PaymentState>>,
    /// Revocation lookups (one per customer call), a batch per statement:
    /// the expiry of each token found revoked.
    revocations: Batcher<String, Option<i64>>,
}

/// A payment to begin, with the lease of the process that begins it.
struct Begin {
    record: PaymentRecord,
    lease_until: i64,
}

/// A decision to record, if its payment has none yet.
struct Decision {
    txn_id: String,
    outcome: PaymentState,
    reason: Option<DeclineReason>,
    decided_at: i64,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl PostgresStore {
    /// Connects to the database at `url` and applies the migrations it
    /// lacks (one process at a time). Errors never show the URL: the
    /// caller names the store by [`crate::backend::StoreUrl::redacted`].
    pub async fn connect(url: &Secret<String>, leases: Leases) -> Result<PostgresStore, GatewayError> {
        let pool =
            pg_pool::pool(url, "gateway.store", "strife-gateway").map_err(|e| internal(format!("{e:#}")))?;
        let mut runner = migrations::runner();
        runner.set_migration_table_name(MIGRATION_TABLE);
        pg_pool::migrate(&pool, MIGRATION_LOCK, runner, "gateway's store")
            .await
            .map_err(|e| internal(format!("{e:#}")))?;
        let (lazy_acks, queue) = mpsc::channel(LAZY_ACKS_QUEUED_MAX);
        // Ends when the last clone of the store is dropped (the queue closes).
        tokio::spawn(write_lazy_acks(pool.clone(), queue));
        let (lazy_events, queue) = mpsc::channel(LAZY_EVENTS_QUEUED_MAX);
        tokio::spawn(write_lazy_events(pool.clone(), queue));
        let (lazy_outcomes, queue) = mpsc::channel(LAZY_OUTCOMES_QUEUED_MAX);
        tokio::spawn(write_lazy_outcomes(pool.clone(), queue));
        let instance: Arc<str> = Arc::from(uuid::Uuid::new_v4().to_string());
        let (p, owner) = (pool.clone(), instance.clone());
        let begins = Batcher::start(move |batch: Vec<Begin>| {
            let (pool, owner) = (p.clone(), owner.clone());
            async move { begin_many(&pool, &owner, &batch).await }
        });
        let p = pool.clone();
        let decisions = Batcher::start(move |batch: Vec<Decision>| {
            let pool = p.clone();
            async move { decide_many(&pool, &batch).await }
        });
        let p = pool.clone();
        let revocations = Batcher::start(move |jtis: Vec<String>| {
            let pool = p.clone();
            async move { revoked_many(&pool, &jtis).await }
        });
        Ok(PostgresStore {
            pool,
            instance,
            after_deadline_ms: millis(leases.after_deadline),
            claim_ms: millis(leases.claim),
            revoked: Arc::new(RwLock::new(HashMap::new())),
            lazy_acks,
            lazy_outcomes,
            lazy_events,
            begins,
            decisions,
            revocations,
        })
    }

    /// This process's instance id (the `owner` of what it drives).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    async fn client(&self) -> Result<Object, GatewayError> {
        Ok(self.pool.get().await?)
    }

    /// Runs `op` on a connection, and again on a fresh one if PostgreSQL
    /// aborted its transaction for a deadlock or a serialization failure.
    async fn retrying<T, F, Fut>(&self, op: F) -> Result<T, GatewayError>
    where
        F: Fn(Object) -> Fut,
        Fut: Future<Output = Result<T, GatewayError>>,
    {
        retrying(&self.pool, op).await
    }

    /// Reads payments with `sql`, whose parameters are `params`.
    async fn payments(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<PaymentRecord>, GatewayError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(sql).await?;
        client.query(&stmt, params).await?.iter().map(payment_from_row).collect()
    }

    async fn payment(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<PaymentRecord>, GatewayError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(sql).await?;
        client.query_opt(&stmt, params).await?.as_ref().map(payment_from_row).transpose()
    }

    fn revoked_cached(&self, jti: &str) -> Result<bool, GatewayError> {
        let cache = self.revoked.read().map_err(|_| internal("revocation cache lock poisoned"))?;
        Ok(cache.contains_key(jti))
    }

    fn cache_revoked(&self, jti: String, expires_at: i64) -> Result<(), GatewayError> {
        let mut cache = self.revoked.write().map_err(|_| internal("revocation cache lock poisoned"))?;
        if cache.len() >= REVOKED_CACHED_MAX {
            let now_secs = now_ms() / 1000;
            cache.retain(|_, expires| *expires >= now_secs);
            if cache.len() >= REVOKED_CACHED_MAX {
                // Still full of live revocations: start over (the table has them all).
                cache.clear();
            }
        }
        cache.insert(jti, expires_at);
        Ok(())
    }
}

/// Runs `op` on a connection of `pool`, and again on a fresh one if
/// PostgreSQL aborted its transaction for a deadlock or a serialization
/// failure.
async fn retrying<T, F, Fut>(pool: &Pool, op: F) -> Result<T, GatewayError>
where
    F: Fn(Object) -> Fut,
    Fut: Future<Output = Result<T, GatewayError>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match op(pool.get().await?).await {
            Err(e) if tries < TRANSACTION_TRIES_MAX && e.is_retryable() => continue,
            done => return done,
        }
    }
}

/// Writes a batch of begins in one statement (`BEGIN_MANY_SQL`, not
/// forced): whether each was new. A begin whose `(payer, payment
/// id)` is taken, by a payment before or by another begin of the same
/// batch, is not: its caller reads the payment that holds the id.
async fn begin_many(pool: &Pool, owner: &str, batch: &[Begin]) -> Result<Vec<bool>, GatewayError> {
    // The rows in one order (by the unique key), so that two batches that
    // meet on ids wait for each other in one direction only.
    let mut order: Vec<&Begin> = batch.iter().collect();
    order.sort_unstable_by(|a, b| {
        let key = |x: &Begin| {
            (x.record.payment_id.clone(), x.record.payer.bank.clone(), x.record.payer.user.clone())
        };
        key(a).cmp(&key(b))
    });
    let column =
        |f: fn(&PaymentRecord) -> &str| -> Vec<&str> { order.iter().map(|b| f(&b.record)).collect() };
    let (txn_ids, payment_ids) = (column(|p| &p.txn_id), column(|p| &p.payment_id));
    let (payer_users, payer_banks) = (column(|p| &p.payer.user), column(|p| &p.payer.bank));
    let (payee_users, payee_banks) = (column(|p| &p.payee.user), column(|p| &p.payee.bank));
    let states = column(|p| p.state.as_str());
    let amounts: Vec<i64> = order.iter().map(|b| b.record.amount_minor).collect();
    let reasons: Vec<Option<&str>> = order.iter().map(|b| b.record.reason.map(DeclineReason::code)).collect();
    let acked: Vec<bool> = order.iter().map(|b| b.record.acked).collect();
    let created: Vec<i64> = order.iter().map(|b| b.record.created_at_ms).collect();
    let deadlines: Vec<i64> = order.iter().map(|b| b.record.deadline_at_ms).collect();
    let fingerprints: Vec<&[u8]> = order.iter().map(|b| b.record.fingerprint.as_slice()).collect();
    let leases: Vec<i64> = order.iter().map(|b| b.lease_until).collect();
    let one_phase: Vec<bool> = order.iter().map(|b| b.record.one_phase).collect();
    // Forced when any row is one-phase (see `BEGIN_MANY_SQL`).
    let commit_mode = if one_phase.contains(&true) { "on" } else { "off" };
    let params: [&(dyn ToSql + Sync); 17] = [
        &txn_ids,
        &payment_ids,
        &payer_users,
        &payer_banks,
        &payee_users,
        &payee_banks,
        &amounts,
        &states,
        &reasons,
        &acked,
        &created,
        &deadlines,
        &fingerprints,
        &owner,
        &leases,
        &one_phase,
        &commit_mode,
    ];
    let params = &params;
    let inserted: HashSet<String> = retrying(pool, |client| async move {
        let stmt = client.prepare_cached(BEGIN_MANY_SQL).await?;
        client.query(&stmt, params).await?.iter().map(|r| Ok(r.try_get(0)?)).collect()
    })
    .await?;
    Ok(batch.iter().map(|b| inserted.contains(&b.record.txn_id)).collect())
}

/// Writes a batch of decisions in one statement, forced (autocommitted at
/// `synchronous_commit = on`): each payment's decision that stands, its
/// own if it had none, else the one made before (by another replica, the
/// deadline sweep, or another decision of the same batch).
async fn decide_many(pool: &Pool, batch: &[Decision]) -> Result<Vec<Option<PaymentState>>, GatewayError> {
    // One decision per payment (the first in the batch; the others learn
    // the one that stands), in txn_id order, so that batches lock rows in
    // one order.
    let mut first: Vec<&Decision> = Vec::with_capacity(batch.len());
    let mut seen = HashSet::with_capacity(batch.len());
    for d in batch {
        if seen.insert(d.txn_id.as_str()) {
            first.push(d);
        }
    }
    first.sort_unstable_by(|a, b| a.txn_id.cmp(&b.txn_id));
    let txn_ids: Vec<&str> = first.iter().map(|d| d.txn_id.as_str()).collect();
    let outcomes: Vec<&str> = first.iter().map(|d| d.outcome.as_str()).collect();
    let reasons: Vec<Option<&str>> = first.iter().map(|d| d.reason.map(DeclineReason::code)).collect();
    let decided: Vec<i64> = first.iter().map(|d| d.decided_at).collect();
    let (txn_ids, outcomes, reasons, decided) = (&txn_ids, &outcomes, &reasons, &decided);
    let mut stands: HashMap<String, PaymentState> = retrying(pool, |client| async move {
        let stmt = client.prepare_cached(DECIDE_MANY_SQL).await?;
        let rows = client.query(&stmt, &[txn_ids, outcomes, reasons, decided]).await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, decided_state(r.try_get(1)?)?))).collect()
    })
    .await?;
    if stands.len() < txn_ids.len() {
        // Decided before: read those decisions (final once made).
        let before: Vec<&str> = txn_ids.iter().copied().filter(|t| !stands.contains_key(*t)).collect();
        let client = pool.get().await?;
        let stmt = client.prepare_cached("SELECT txn_id, state FROM payments WHERE txn_id = ANY($1)").await?;
        for r in client.query(&stmt, &[&before]).await? {
            let txn_id: String = r.try_get(0)?;
            let state = decided_state(r.try_get(1)?)
                .map_err(|_| internal(format!("payment {txn_id} is undecided after its decision")))?;
            stands.insert(txn_id, state);
        }
    }
    Ok(batch.iter().map(|d| stands.get(&d.txn_id).copied()).collect())
}

/// Looks a batch of tokens up among the revocations, in one statement that
/// starts after each lookup was asked: a revocation committed before then
/// is seen. The expiry of each one found.
async fn revoked_many(pool: &Pool, jtis: &[String]) -> Result<Vec<Option<i64>>, GatewayError> {
    let client = pool.get().await?;
    let stmt =
        client.prepare_cached("SELECT jti, expires_at FROM revoked_tokens WHERE jti = ANY($1)").await?;
    let mut found = HashMap::new();
    for row in client.query(&stmt, &[&jtis]).await? {
        found.insert(row.try_get::<_, String>(0)?, row.try_get::<_, i64>(1)?);
    }
    Ok(jtis.iter().map(|jti| found.get(jti).copied()).collect())
}

/// A decided payment's state, from its text.
fn decided_state(state: &str) -> Result<PaymentState, GatewayError> {
    match state {
        "committed" => Ok(PaymentState::Committed),
        "aborted" => Ok(PaymentState::Aborted),
        other => Err(internal(format!("a decision of '{other}'"))),
    }
}

fn internal(e: impl std::fmt::Display) -> GatewayError {
    GatewayError::Internal(e.to_string())
}

/// Writes the lazy acknowledgement marks queued meanwhile, a batch per
/// transaction, not forced; until the queue closes.
async fn write_lazy_acks(pool: Pool, mut queue: mpsc::Receiver<String>) {
    let mut batch = Vec::with_capacity(LAZY_ACKS_BATCH_MAX);
    while queue.recv_many(&mut batch, LAZY_ACKS_BATCH_MAX).await > 0 {
        // Rows in one order, so two batches never wait for each other in a circle.
        batch.sort_unstable();
        if let Err(e) = ack_lazily(&pool, &batch).await {
            tracing::debug!(error = %e, marks = batch.len(), "acknowledgement marks not written; the finisher delivers again");
        }
        batch.clear();
    }
}

/// Writes the one-phase outcomes queued meanwhile, a batch per statement,
/// not forced; until the queue closes. A failed batch is dropped: those
/// payments stay undecided here, and the deadline sweep asks their bank.
async fn write_lazy_outcomes(pool: Pool, mut queue: mpsc::Receiver<Decision>) {
    let mut batch = Vec::with_capacity(LAZY_OUTCOMES_BATCH_MAX);
    while queue.recv_many(&mut batch, LAZY_OUTCOMES_BATCH_MAX).await > 0 {
        // One row per payment, in one order, so two batches never wait for
        // each other in a circle (every outcome of one payment is the same:
        // its bank's).
        batch.sort_unstable_by(|a, b| a.txn_id.cmp(&b.txn_id));
        batch.dedup_by(|a, b| a.txn_id == b.txn_id);
        if let Err(e) = outcomes_lazily(&pool, &batch).await {
            tracing::debug!(error = %e, outcomes = batch.len(), "one-phase outcomes not written; they are asked for again");
        }
        batch.clear();
    }
}

async fn outcomes_lazily(pool: &Pool, batch: &[Decision]) -> Result<(), GatewayError> {
    let txn_ids: Vec<&str> = batch.iter().map(|d| d.txn_id.as_str()).collect();
    let outcomes: Vec<&str> = batch.iter().map(|d| d.outcome.as_str()).collect();
    let reasons: Vec<Option<&str>> = batch.iter().map(|d| d.reason.map(DeclineReason::code)).collect();
    let decided: Vec<i64> = batch.iter().map(|d| d.decided_at).collect();
    let (txn_ids, outcomes, reasons, decided) = (&txn_ids, &outcomes, &reasons, &decided);
    retrying(pool, |client| async move {
        let stmt = client.prepare_cached(OUTCOME_MANY_SQL).await?;
        client.execute(&stmt, &[txn_ids, outcomes, reasons, decided]).await?;
        Ok(())
    })
    .await
}

/// Writes the timeline events queued meanwhile, a batch per statement, not
/// forced; until the queue closes. Best-effort: a failed batch is dropped.
/// A payment's opening steps (its begin and votes, without a decision or an
/// acknowledgement) wait in memory for the rest, at most
/// [`TIMELINE_HOLD`], so that a payment is usually one row, written once.
async fn write_lazy_events(pool: Pool, mut queue: mpsc::Receiver<PaymentEvent>) {
    let mut batch = Vec::with_capacity(LAZY_EVENTS_BATCH_MAX);
    let mut held = HeldSteps::default();
    loop {
        let closed = match held.next_due() {
            Some(due) => tokio::select! {
                n = queue.recv_many(&mut batch, LAZY_EVENTS_BATCH_MAX) => n == 0,
                () = tokio::time::sleep_until(due) => false,
            },
            None => queue.recv_many(&mut batch, LAZY_EVENTS_BATCH_MAX).await == 0,
        };
        let rows = held.rows(std::mem::take(&mut batch), closed);
        if !rows.is_empty()
            && let Err(e) = events_lazily(&pool, &rows).await
        {
            tracing::debug!(error = %e, rows = rows.len(), "timeline events not written");
        }
        if closed {
            return;
        }
    }
}

/// Payments' opening steps waiting for the rest of their timeline.
#[derive(Default)]
struct HeldSteps {
    steps: HashMap<String, Vec<PaymentEvent>>,
    /// When each began to wait, oldest first (an entry whose steps left
    /// already is passed over).
    since: std::collections::VecDeque<(tokio::time::Instant, String)>,
}

impl HeldSteps {
    /// When the oldest held steps are due to be written.
    fn next_due(&self) -> Option<tokio::time::Instant> {
        self.since.front().map(|(at, _)| *at + TIMELINE_HOLD)
    }

    /// The timeline rows to write now, a payment each, its steps in the
    /// order given: `events` grouped by payment after the steps held for it,
    /// less the opening steps now held, plus those held past their time (all
    /// of them once `all`).
    fn rows(&mut self, events: Vec<PaymentEvent>, all: bool) -> Vec<Vec<PaymentEvent>> {
        let mut rows: Vec<Vec<PaymentEvent>> = Vec::new();
        let mut row_of: HashMap<String, usize> = HashMap::new();
        for e in events {
            let at = match row_of.get(&e.txn_id) {
                Some(at) => *at,
                None => {
                    row_of.insert(e.txn_id.clone(), rows.len());
                    rows.push(self.steps.remove(&e.txn_id).unwrap_or_default());
                    rows.len() - 1
                }
            };
            rows[at].push(e);
        }
        let now = tokio::time::Instant::now();
        let mut ready = Vec::with_capacity(rows.len());
        for row in rows {
            let opening = row.iter().all(|e| e.kind != "decision" && e.kind != "ack");
            match row.first() {
                Some(first) if opening && !all && self.steps.len() < TIMELINE_HELD_MAX => {
                    self.since.push_back((now, first.txn_id.clone()));
                    self.steps.insert(first.txn_id.clone(), row);
                }
                _ => ready.push(row),
            }
        }
        while let Some((at, txn_id)) = self.since.front() {
            if !all && *at + TIMELINE_HOLD > now {
                break;
            }
            if let Some(row) = self.steps.remove(txn_id) {
                ready.push(row);
            }
            self.since.pop_front();
        }
        ready
    }
}

/// A PostgreSQL array literal of `items` (`NULL` for none), each quoted.
fn array_literal<'a>(items: impl Iterator<Item = Option<&'a str>>) -> String {
    let mut text = String::from("{");
    for (i, item) in items.enumerate() {
        if i > 0 {
            text.push(',');
        }
        match item {
            None => text.push_str("NULL"),
            Some(item) => {
                text.push('"');
                for c in item.chars() {
                    if c == '"' || c == '\\' {
                        text.push('\\');
                    }
                    text.push(c);
                }
                text.push('"');
            }
        }
    }
    text.push('}');
    text
}

/// Writes timeline rows, a payment's steps each (none empty).
async fn events_lazily(pool: &Pool, rows: &[Vec<PaymentEvent>]) -> Result<(), GatewayError> {
    let rows: Vec<&[PaymentEvent]> = rows.iter().filter(|r| !r.is_empty()).map(Vec::as_slice).collect();
    let txn_ids: Vec<&str> = rows.iter().map(|r| r[0].txn_id.as_str()).collect();
    let last: Vec<i64> = rows.iter().map(|r| r.iter().map(|e| e.at_ms).max().unwrap_or(0)).collect();
    let ats: Vec<String> = rows
        .iter()
        .map(|r| format!("{{{}}}", r.iter().map(|e| e.at_ms.to_string()).collect::<Vec<_>>().join(",")))
        .collect();
    let kinds: Vec<String> = rows.iter().map(|r| array_literal(r.iter().map(|e| Some(e.kind)))).collect();
    let banks: Vec<String> =
        rows.iter().map(|r| array_literal(r.iter().map(|e| e.bank.as_deref()))).collect();
    let details: Vec<String> =
        rows.iter().map(|r| array_literal(r.iter().map(|e| Some(e.detail.as_str())))).collect();
    let client = pool.get().await?;
    let stmt = client.prepare_cached(EVENTS_SQL).await?;
    client.execute(&stmt, &[&txn_ids, &last, &ats, &kinds, &banks, &details]).await?;
    Ok(())
}

async fn ack_lazily(pool: &Pool, txn_ids: &[String]) -> Result<(), GatewayError> {
    let client = pool.get().await?;
    let stmt = client.prepare_cached(ACK_MANY_SQL).await?;
    client.execute(&stmt, &[&txn_ids]).await?;
    Ok(())
}

/// The columns of a payment as `payment_from_row` reads them, from the
/// `payments` table by its own name. A payment is acknowledged when it is
/// decided and its row has left the work queue (which holds exactly the
/// unacknowledged payments; `V9__lean_queue.sql`): one probe of the queue's
/// small index of undelivered payments per row read. (A scalar subquery,
/// which PostgreSQL runs row by row: an `EXISTS` here may be planned as
/// one read of the whole queue, whatever its length, for a page of rows.)
macro_rules! payment_columns {
    () => {
        "txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor, state, reason,
       (state <> 'preparing' AND COALESCE((SELECT FALSE FROM payment_queue q
                                           WHERE q.txn_id = payments.txn_id AND q.decided LIMIT 1), TRUE)) AS acked,
       created_at, deadline_at, fingerprint, one_phase"
    };
}
const PAYMENT_COLUMNS: &str = payment_columns!();

fn payment_from_row(r: &Row) -> Result<PaymentRecord, GatewayError> {
    let state: &str = r.try_get(7)?;
    let reason: Option<&str> = r.try_get(8)?;
    Ok(PaymentRecord {
        txn_id: r.try_get(0)?,
        payment_id: r.try_get(1)?,
        payer: UserRef { user: r.try_get(2)?, bank: r.try_get(3)? },
        payee: UserRef { user: r.try_get(4)?, bank: r.try_get(5)? },
        amount_minor: r.try_get(6)?,
        state: match state {
            "preparing" => PaymentState::Preparing,
            "committed" => PaymentState::Committed,
            "aborted" => PaymentState::Aborted,
            other => return Err(GatewayError::Internal(format!("payment state '{other}' in the store"))),
        },
        reason: reason.and_then(DeclineReason::from_code),
        acked: r.try_get(9)?,
        created_at_ms: r.try_get(10)?,
        deadline_at_ms: r.try_get(11)?,
        fingerprint: r.try_get(12)?,
        one_phase: r.try_get(13)?,
    })
}

/// New payments (`$1`–`$13`, `$15`, `$16`: one array per column; `$14`:
/// the owner), each unless its `(payer, payment id)` is taken: the
/// transaction ids of those inserted. `ON CONFLICT DO NOTHING` also skips
/// the later of two rows of the batch with one id. One autocommitted
/// statement, not forced unless `$17` says so: `set_config(…, true)` sets
/// `synchronous_commit` to `$17` for the statement's own transaction,
/// `off` so that its commit does not wait for the disk (see the module's
/// documentation), `on` when the batch holds a one-phase payment, whose
/// record must be durable before its bank hears of it. Each payment not yet
/// acknowledged joins the work queue (`payment_queue`) in the same statement.
const BEGIN_MANY_SQL: &str = "
WITH new AS (
INSERT INTO payments (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor,
                      state, reason, created_at, deadline_at, fingerprint, one_phase)
SELECT b.txn_id, b.payment_id, b.payer_user, b.payer_bank, b.payee_user, b.payee_bank, b.amount_minor,
       b.state, b.reason, b.created_at, b.deadline_at, b.fingerprint, b.one_phase
FROM (SELECT set_config('synchronous_commit', $17::text, true)) AS commit_mode,
     unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[],
            $8::text[], $9::text[], $11::bigint[], $12::bigint[], $13::bytea[], $16::boolean[])
       AS b(txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor,
            state, reason, created_at, deadline_at, fingerprint, one_phase)
ON CONFLICT (payment_id, payer_bank, payer_user) DO NOTHING
RETURNING txn_id, created_at, state),
queued AS (
INSERT INTO payment_queue (txn_id, created_at, decided, owner, lease_until)
SELECT new.txn_id, new.created_at, new.state <> 'preparing', $14::text::uuid, b.lease_until
FROM new JOIN unnest($1::text[], $15::bigint[], $10::boolean[]) AS b(txn_id, lease_until, acked)
       ON b.txn_id = new.txn_id
WHERE NOT b.acked)
SELECT txn_id FROM new";

/// One-phase outcomes recorded lazily (`$1` txn ids, distinct; `$2` states;
/// `$3` reasons; `$4` times), each for a payment still undecided, and out
/// of the work queue, so acknowledged too (its bank holds the decision:
/// nothing to deliver). One autocommitted statement, not forced (as
/// `ACK_MANY_SQL`).
const OUTCOME_MANY_SQL: &str = "
WITH recorded AS (
UPDATE payments SET state = d.state, reason = d.reason, decided_at = d.decided_at
FROM (SELECT set_config('synchronous_commit', 'off', true)) AS not_forced,
     unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) AS d(txn_id, state, reason, decided_at)
WHERE payments.txn_id = ANY($1) AND payments.txn_id = d.txn_id AND payments.state = 'preparing'
RETURNING payments.txn_id)
DELETE FROM payment_queue WHERE txn_id = ANY($1) AND NOT decided AND txn_id IN (SELECT txn_id FROM recorded)";

/// Decisions (`$1` txn ids, distinct; `$2` states; `$3` reasons; `$4`
/// times), each for a payment that has none yet: the payments decided and
/// how. Forced: autocommitted at the server's `synchronous_commit = on`.
/// (`txn_id = ANY($1)`: the rows are found through the primary key,
/// whatever the estimate of the `unnest`.) Their queue rows are marked
/// decided in the same statement (moving from the queue's index of
/// undecided payments to that of undelivered ones). No indexed column of
/// the payment changes: a HOT update.
const DECIDE_MANY_SQL: &str = "
WITH decided AS (
UPDATE payments SET state = d.state, reason = d.reason, decided_at = d.decided_at
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) AS d(txn_id, state, reason, decided_at)
WHERE payments.txn_id = ANY($1) AND payments.txn_id = d.txn_id AND payments.state = 'preparing'
RETURNING payments.txn_id, payments.state),
queued AS (
UPDATE payment_queue SET decided = TRUE
WHERE txn_id = ANY($1) AND NOT decided AND txn_id IN (SELECT txn_id FROM decided))
SELECT txn_id, state FROM decided";

/// An acknowledgement (`$1`): a decided payment leaves the queue (which is
/// what makes it acknowledged; its own row is not written).
const ACK_SQL: &str = "DELETE FROM payment_queue WHERE txn_id = $1 AND decided";
/// Lazy acknowledgements: one autocommitted statement, not forced (as
/// `BEGIN_MANY_SQL`).
const ACK_MANY_SQL: &str = "
DELETE FROM payment_queue
USING (SELECT set_config('synchronous_commit', 'off', true)) AS not_forced
WHERE txn_id = ANY($1) AND decided";

/// The payment a customer made under an id: one row of the unique index.
const MADE_BY_ID_SQL: &str = concat!(
    "
SELECT ",
    payment_columns!(),
    "
FROM payments
WHERE payment_id = $3 AND payer_bank = $1 AND payer_user = $2"
);

/// A committed payment a customer received, by its id: through the unique
/// index that starts with `payment_id` (every payer that used this id).
const RECEIVED_BY_ID_SQL: &str = concat!(
    "
SELECT ",
    payment_columns!(),
    "
FROM payments
WHERE payment_id = $3 AND payee_bank = $1 AND payee_user = $2 AND state = 'committed'
ORDER BY created_at DESC, txn_id DESC
LIMIT 1"
);

/// A page of a customer's payments, as the SQLite store's `PAGE_SQL`: what
/// they sent (any state) and the committed payments they received, by
/// `(created_at, txn_id)` descending, strictly below `($4, $5)` and from
/// `created_at >= $3` on, at most `$6`.
///
/// Each arm is a backward range scan of its index, already in page order,
/// stopped at the page size; PostgreSQL merges the two (Merge Append, no
/// sort) and stops at the page size again: a page reads its own entries
/// (and the received-but-declined ones between them), however long the
/// history. The limit inside each arm is what makes that plan: PostgreSQL
/// merges `UNION ALL` arms in order only when each arm is a subquery of its
/// own (arms with a `WHERE` are not flattened into one scan).
const PAGE_SQL: &str = concat!(
    "
(SELECT ",
    payment_columns!(),
    "
 FROM payments
 WHERE payer_bank = $1 AND payer_user = $2 AND created_at >= $3 AND (created_at, txn_id) < ($4, $5)
 ORDER BY created_at DESC, txn_id DESC
 LIMIT $6)
UNION ALL
(SELECT ",
    payment_columns!(),
    "
 FROM payments
 WHERE payee_bank = $1 AND payee_user = $2 AND created_at >= $3 AND (created_at, txn_id) < ($4, $5)
   AND state = 'committed' AND NOT (payer_bank = $1 AND payer_user = $2)
 ORDER BY created_at DESC, txn_id DESC
 LIMIT $6)
ORDER BY created_at DESC, txn_id DESC
LIMIT $6"
);

/// Claims (owner `$1`, for `$2` ms) at most `$3` decided payments not yet
/// acknowledged, oldest first (by `txn_id`, a UUID v7: time order), that
/// are this process's or whose lease has lapsed. `SKIP LOCKED`: rows
/// another claim is taking right now are left to it, so two claims never
/// return one payment. Claims are timed by the database's clock, one clock
/// for every replica. (`= ANY(ARRAY(…))`: the claimed rows are then updated
/// through the index of undelivered payments, whatever the statistics say.)
/// What is claimed is a row of the work queue
/// (`payment_queue`: a row exactly while its payment is unacknowledged);
/// the claimed payments are then read.
const CLAIM_SQL: &str = concat!(
    "
WITH claimed AS (
UPDATE payment_queue
SET owner = $1::text::uuid, lease_until = (extract(epoch FROM statement_timestamp()) * 1000)::bigint + $2
WHERE decided AND txn_id = ANY(ARRAY(
    SELECT txn_id FROM payment_queue
    WHERE decided
      AND (owner = $1::text::uuid OR lease_until < (extract(epoch FROM statement_timestamp()) * 1000)::bigint)
    ORDER BY txn_id
    LIMIT $3
    FOR UPDATE SKIP LOCKED))
RETURNING txn_id)
SELECT ",
    payment_columns!(),
    "
FROM payments WHERE txn_id = ANY(ARRAY(SELECT txn_id FROM claimed))"
);

/// Undecided payments created before `$1`, oldest first, at most `$2`: from
/// the queue's undecided rows (in `txn_id` order, which is time order; there
/// are about as many as payments in flight).
const PREPARING_BEFORE_SQL: &str = concat!(
    "
SELECT ",
    payment_columns!(),
    "
FROM payments
WHERE txn_id = ANY(ARRAY(SELECT txn_id FROM payment_queue WHERE NOT decided AND created_at < $1
                         ORDER BY txn_id LIMIT $2))
  AND state = 'preparing'
ORDER BY created_at"
);

const AFTER_SQL: &str = concat!(
    "
SELECT ",
    payment_columns!(),
    "
FROM payments WHERE txn_id > $1 ORDER BY txn_id LIMIT $2"
);

/// A replica's heartbeat: its row written (not forced) with the
/// database's clock, and the rows of replicas silent for `$6` ms deleted,
/// in one statement.
const HEARTBEAT_SQL: &str = "
WITH not_forced AS (SELECT set_config('synchronous_commit', 'off', true)),
     clock AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now_ms FROM not_forced),
     forgotten AS (DELETE FROM gateway_replicas WHERE heartbeat_at < (SELECT now_ms FROM clock) - $6::bigint)
INSERT INTO gateway_replicas (boot_id, address, admin_address, started_at, heartbeat_at, report)
SELECT $1::text, $2::text, $3::text, $4::bigint, now_ms, $5::text FROM clock
ON CONFLICT (boot_id) DO UPDATE SET address = excluded.address, admin_address = excluded.admin_address,
    heartbeat_at = excluded.heartbeat_at, report = excluded.report";

/// The replicas' heartbeats, the most recent first, with their ages by the
/// database's clock.
const REPLICAS_SQL: &str = "
SELECT boot_id, address, admin_address, started_at,
       (extract(epoch FROM clock_timestamp()) * 1000)::bigint - heartbeat_at, report
FROM gateway_replicas ORDER BY heartbeat_at DESC LIMIT $1";

/// Timeline rows (`$1` txn ids, `$2` newest steps; `$3`–`$6` each row's
/// steps as array literals, one per field, made by `events_lazily`): a row
/// per payment. One autocommitted statement, not forced (as
/// `BEGIN_MANY_SQL`).
const EVENTS_SQL: &str = "
INSERT INTO payment_timeline (txn_id, last_at, ats, kinds, banks, details)
SELECT r.txn_id, r.last_at, r.ats::bigint[], r.kinds::text[], r.banks::text[], r.details::text[]
FROM (SELECT set_config('synchronous_commit', 'off', true)) AS not_forced,
     unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[])
       AS r (txn_id, last_at, ats, kinds, banks, details)";

/// A payment's timeline (`$1`), in time order, then as written; at most `$2` events.
const TIMELINE_SQL: &str = "
SELECT t.txn_id, e.at, e.kind, e.bank, e.detail
FROM payment_timeline t,
     unnest(t.ats, t.kinds, t.banks, t.details) WITH ORDINALITY AS e (at, kind, bank, detail, n)
WHERE t.txn_id = $1
ORDER BY e.at, t.id, e.n
LIMIT $2";

/// The newest payments: by transaction id, which is time-ordered (UUID v7),
/// through the primary key (no index of its own on the write path).
const RECENT_SQL: &str = concat!(
    "
SELECT ",
    payment_columns!(),
    "
FROM payments WHERE txn_id < $1 ORDER BY txn_id DESC LIMIT $2"
);

const RECENT_FIRST_SQL: &str = concat!(
    "
SELECT ",
    payment_columns!(),
    "
FROM payments ORDER BY txn_id DESC LIMIT $1"
);

const RECENT_BY_ID_SQL: &str = concat!(
    "
SELECT ",
    payment_columns!(),
    "
FROM payments WHERE payment_id = $1 AND (created_at, txn_id) < ($2, $3)
ORDER BY created_at DESC, txn_id DESC LIMIT $4"
);

/// Finished payments created before `$1`: decided, and out of the queue.
const PRUNE_SQL: &str = "
DELETE FROM payments
WHERE created_at < $1 AND state <> 'preparing'
  AND NOT EXISTS (SELECT 1 FROM payment_queue q WHERE q.txn_id = payments.txn_id AND q.decided)";

const SAVE_BANK_SQL: &str = "
INSERT INTO banks (name, address, registered_at) VALUES ($1, $2, $3)
ON CONFLICT (name, address) DO UPDATE SET registered_at = excluded.registered_at";

/// Forgets all but the newest `$2` addresses of bank `$1`, and those not
/// registered since `$3` (ms) unless they are their bank's newest.
const TRIM_BANK_SQL: &str = "
DELETE FROM banks WHERE name = $1 AND (
    address NOT IN (SELECT address FROM banks WHERE name = $1 ORDER BY registered_at DESC, address LIMIT $2)
    OR registered_at < LEAST($3, (SELECT MAX(registered_at) FROM banks WHERE name = $1)))";

/// Adds a failed login's key with fresh counts if it has none.
const THROTTLE_NEW_SQL: &str = "
INSERT INTO login_throttle (key, failures, locks, locked_until, last_failure_at) VALUES ($1, 0, 0, 0, $2)
ON CONFLICT (key) DO NOTHING";

const THROTTLE_READ_SQL: &str =
    "SELECT key, failures, locks, locked_until FROM login_throttle WHERE key = ANY($1)";

impl GatewayStore for PostgresStore {
    async fn begin_payment(&self, p: PaymentRecord) -> Result<Result<(), PaymentRecord>, GatewayError> {
        let lease_until = p.deadline_at_ms.saturating_add(self.after_deadline_ms);
        let (payer, payment_id) = (p.payer.clone(), p.payment_id.clone());
        let mut record = Some(p);
        for _ in 0..BEGIN_TRIES_MAX {
            let p = match record.take() {
                Some(p) => p,
                None => return Err(internal("a begin lost its record")),
            };
            let kept = p.clone();
            if self.begins.call(Begin { record: p, lease_until }).await? {
                return Ok(Ok(()));
            }
            // Taken (by another begin that committed first, here or at
            // another replica, or earlier in the same batch).
            if let Some(existing) = self.find_payment(payer.clone(), payment_id.clone()).await? {
                return Ok(Err(existing));
            }
            record = Some(kept);
        }
        Err(GatewayError::Internal(format!("payment id {payment_id} kept changing while it was recorded")))
    }

    async fn decide(
        &self,
        txn_id: String,
        outcome: PaymentState,
        reason: Option<DeclineReason>,
    ) -> Result<PaymentState, GatewayError> {
        assert_ne!(outcome, PaymentState::Preparing, "a decision is commit or abort");
        let asked = Decision { txn_id: txn_id.clone(), outcome, reason, decided_at: now_ms() };
        // Ours, or the one made before (by this or another replica): it stands.
        match self.decisions.call(asked).await? {
            Some(stands) => Ok(stands),
            None => Err(GatewayError::Internal(format!("no payment {txn_id} to decide"))),
        }
    }

    async fn mark_acked(&self, txn_id: String) -> Result<(), GatewayError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(ACK_SQL).await?;
        client.execute(&stmt, &[&txn_id]).await?;
        Ok(())
    }

    fn record_outcome_lazily(&self, txn_id: String, outcome: PaymentState, reason: Option<DeclineReason>) {
        assert_ne!(outcome, PaymentState::Preparing, "an outcome is commit or abort");
        let asked = Decision { txn_id, outcome, reason, decided_at: now_ms() };
        if self.lazy_outcomes.try_send(asked).is_err() {
            tracing::debug!("too many one-phase outcomes queued; they are asked for again");
        }
    }

    fn mark_acked_lazily(&self, txn_id: String) {
        if self.lazy_acks.try_send(txn_id).is_err() {
            tracing::debug!("too many acknowledgement marks queued; the finisher delivers again");
        }
    }

    async fn find_txn(&self, txn_id: String) -> Result<Option<PaymentRecord>, GatewayError> {
        self.payment(&format!("SELECT {PAYMENT_COLUMNS} FROM payments WHERE txn_id = $1"), &[&txn_id]).await
    }

    async fn find_payment(
        &self,
        payer: UserRef,
        payment_id: String,
    ) -> Result<Option<PaymentRecord>, GatewayError> {
        self.payment(MADE_BY_ID_SQL, &[&payer.bank, &payer.user, &payment_id]).await
    }

    async fn find_payment_for(
        &self,
        who: UserRef,
        payment_id: String,
    ) -> Result<Option<PaymentRecord>, GatewayError> {
        if let Some(made) = self.payment(MADE_BY_ID_SQL, &[&who.bank, &who.user, &payment_id]).await? {
            return Ok(Some(made));
        }
        self.payment(RECEIVED_BY_ID_SQL, &[&who.bank, &who.user, &payment_id]).await
    }

    async fn list_payments(&self, who: UserRef, q: PageQuery) -> Result<PaymentPage, GatewayError> {
        let limit = q.limit.clamp(1, HISTORY_PAGE_MAX);
        // `(created_at, txn_id) < (end, '')` is `created_at < end`: no txn
        // id sorts below the empty string. The cursor, when there is one,
        // is the tighter bound.
        let end = (q.end_ms.unwrap_or(i64::MAX), "");
        let upper = match &q.after {
            Some(c) if (c.created_at_ms, c.txn_id.as_str()) < end => (c.created_at_ms, c.txn_id.as_str()),
            _ => end,
        };
        // One more than the page, to know whether another follows.
        let fetch = i64::from(limit) + 1;
        let start = q.start_ms.unwrap_or(i64::MIN);
        let mut payments =
            self.payments(PAGE_SQL, &[&who.bank, &who.user, &start, &upper.0, &upper.1, &fetch]).await?;
        let more = payments.len() > limit as usize;
        payments.truncate(limit as usize);
        let next = if more { payments.last().map(Cursor::after) } else { None };
        Ok(PaymentPage { payments, next })
    }

    async fn payments_after(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<PaymentRecord>, GatewayError> {
        self.payments(AFTER_SQL, &[&after.unwrap_or_default(), &i64::from(limit)]).await
    }

    async fn claim_unfinished(&self, limit: u32) -> Result<Vec<PaymentRecord>, GatewayError> {
        self.retrying(|client| async move {
            let stmt = client.prepare_cached(CLAIM_SQL).await?;
            let rows = client.query(&stmt, &[&&*self.instance, &self.claim_ms, &i64::from(limit)]).await?;
            let mut claimed = rows.iter().map(payment_from_row).collect::<Result<Vec<_>, _>>()?;
            claimed.sort_by_key(|p| p.created_at_ms);
            Ok(claimed)
        })
        .await
    }

    async fn preparing_before(&self, before_ms: i64, limit: u32) -> Result<Vec<PaymentRecord>, GatewayError> {
        self.payments(PREPARING_BEFORE_SQL, &[&before_ms, &i64::from(limit)]).await
    }

    async fn recover(&self) -> Result<usize, GatewayError> {
        // Other replicas may be driving the payments still preparing; the
        // deadline sweep aborts those nobody drives (a conditional decision).
        Ok(0)
    }

    async fn counts(&self) -> Result<PaymentCounts, GatewayError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT state, COUNT(*) FROM payments GROUP BY state").await?;
        let mut counts = PaymentCounts::default();
        for row in client.query(&stmt, &[]).await? {
            let n = u64::try_from(row.try_get::<_, i64>(1)?).unwrap_or(0);
            match row.try_get::<_, &str>(0)? {
                "committed" => counts.committed = n,
                "aborted" => counts.aborted = n,
                _ => counts.preparing = n,
            }
        }
        let stmt = client.prepare_cached("SELECT COUNT(*) FROM payment_queue WHERE decided").await?;
        let undelivered: i64 = client.query_one(&stmt, &[]).await?.try_get(0)?;
        counts.undelivered = u64::try_from(undelivered).unwrap_or(0);
        Ok(counts)
    }

    fn record_events(&self, events: Vec<PaymentEvent>) {
        for e in events {
            if self.lazy_events.try_send(e).is_err() {
                tracing::debug!("too many timeline events queued; dropping some");
                return;
            }
        }
    }

    async fn heartbeat(&self, beat: Heartbeat) -> Result<(), GatewayError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(HEARTBEAT_SQL).await?;
        let forget = crate::cluster::REPLICA_FORGET_MS;
        client
            .execute(
                &stmt,
                &[
                    &beat.boot_id,
                    &beat.address,
                    &beat.admin_address,
                    &beat.started_at_ms,
                    &beat.report,
                    &forget,
                ],
            )
            .await?;
        Ok(())
    }

    async fn replicas(&self, limit: u32) -> Result<Vec<ReplicaRow>, GatewayError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(REPLICAS_SQL).await?;
        client
            .query(&stmt, &[&i64::from(limit)])
            .await?
            .iter()
            .map(|r| {
                Ok(ReplicaRow {
                    beat: Heartbeat {
                        boot_id: r.try_get(0)?,
                        address: r.try_get(1)?,
                        admin_address: r.try_get(2)?,
                        started_at_ms: r.try_get(3)?,
                        report: r.try_get(5)?,
                    },
                    age_ms: r.try_get::<_, i64>(4)?.max(0),
                })
            })
            .collect()
    }

    async fn payment_events(&self, txn_id: String) -> Result<Vec<PaymentEvent>, GatewayError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(TIMELINE_SQL).await?;
        let rows = client.query(&stmt, &[&txn_id, &i64::from(EVENTS_PER_PAYMENT_MAX)]).await?;
        rows.iter()
            .map(|r| {
                Ok(PaymentEvent {
                    txn_id: r.try_get(0)?,
                    at_ms: r.try_get(1)?,
                    kind: PaymentEvent::kind_of(r.try_get(2)?),
                    bank: r.try_get(3)?,
                    detail: r.try_get(4)?,
                })
            })
            .collect()
    }

    async fn recent_payments(
        &self,
        filter: PaymentFilter,
        before: Option<Cursor>,
        limit: u32,
    ) -> Result<Vec<PaymentRecord>, GatewayError> {
        let (at, txn) = before.map_or((i64::MAX, String::new()), |c| (c.created_at_ms, c.txn_id));
        let limit = i64::from(limit);
        match filter {
            PaymentFilter::All if txn.is_empty() => self.payments(RECENT_FIRST_SQL, &[&limit]).await,
            PaymentFilter::All => self.payments(RECENT_SQL, &[&txn, &limit]).await,
            PaymentFilter::PaymentId(id) => self.payments(RECENT_BY_ID_SQL, &[&id, &at, &txn, &limit]).await,
        }
    }

    async fn decline_counts(&self) -> Result<Vec<(String, u64)>, GatewayError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT COALESCE(reason, 'none'), COUNT(*) FROM payments WHERE state = 'aborted' GROUP BY 1 ORDER BY 2 DESC",
            )
            .await?;
        client
            .query(&stmt, &[])
            .await?
            .iter()
            .map(|r| Ok((r.try_get::<_, String>(0)?, u64::try_from(r.try_get::<_, i64>(1)?).unwrap_or(0))))
            .collect()
    }

    async fn prune(&self, before_ms: i64) -> Result<usize, GatewayError> {
        // Every replica prunes now and then; two at once may meet on a row.
        self.retrying(|client| async move {
            let stmt = client.prepare_cached(PRUNE_SQL).await?;
            let pruned = client.execute(&stmt, &[&before_ms]).await?;
            let stmt = client.prepare_cached("DELETE FROM payment_timeline WHERE last_at < $1").await?;
            client.execute(&stmt, &[&before_ms]).await?;
            // Now and then, too: revocations of tokens that have expired,
            // and login counts idle and unlocked.
            let stmt = client.prepare_cached("DELETE FROM revoked_tokens WHERE expires_at < $1").await?;
            client.execute(&stmt, &[&(now_ms() / 1000)]).await?;
            let idle_before = now_ms().saturating_sub(idle_forget_ms());
            let stmt = client
                .prepare_cached("DELETE FROM login_throttle WHERE last_failure_at < $1 AND locked_until < $1")
                .await?;
            client.execute(&stmt, &[&idle_before]).await?;
            Ok(usize::try_from(pruned).unwrap_or(usize::MAX))
        })
        .await
    }

    async fn banks(&self) -> Result<Vec<(String, String)>, GatewayError> {
        let client = self.client().await?;
        // Each bank's newest registration first.
        let stmt = client
            .prepare_cached("SELECT name, address FROM banks ORDER BY name, registered_at DESC, address")
            .await?;
        client.query(&stmt, &[]).await?.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
    }

    async fn save_bank(&self, name: String, address: String) -> Result<(), GatewayError> {
        let now = now_ms();
        let (name, address) = (&name, &address);
        self.retrying(|mut client| async move {
            let tx = client.transaction().await?;
            let save = tx.prepare_cached(SAVE_BANK_SQL).await?;
            tx.execute(&save, &[name, address, &now]).await?;
            let trim = tx.prepare_cached(TRIM_BANK_SQL).await?;
            let forget_before = now.saturating_sub(BANK_ADDRESS_RETENTION_MS);
            tx.execute(&trim, &[name, &i64::from(BANK_ADDRESSES_MAX), &forget_before]).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn cluster_id(&self) -> Result<String, GatewayError> {
        let client = self.client().await?;
        Ok(client.query_one("SELECT id FROM cluster", &[]).await?.try_get(0)?)
    }

    async fn forget_bank(&self, name: String, address: String) -> Result<(), GatewayError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("DELETE FROM banks WHERE name = $1 AND address = $2").await?;
        client.execute(&stmt, &[&name, &address]).await?;
        Ok(())
    }

    async fn revoke(&self, jti: String, expires_at: i64) -> Result<(), GatewayError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO revoked_tokens (jti, expires_at) VALUES ($1, $2) ON CONFLICT (jti) DO NOTHING",
            )
            .await?;
        client.execute(&stmt, &[&jti, &expires_at]).await?;
        self.cache_revoked(jti, expires_at)
    }

    async fn is_revoked(&self, jti: String) -> Result<bool, GatewayError> {
        if self.revoked_cached(&jti)? {
            return Ok(true);
        }
        let Some(expires_at) = self.revocations.call(jti.clone()).await? else { return Ok(false) };
        self.cache_revoked(jti, expires_at)?;
        Ok(true)
    }
    async fn throttle_entries(&self, keys: Vec<String>) -> Result<Vec<Entry>, GatewayError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(THROTTLE_READ_SQL).await?;
        let mut found = HashMap::new();
        for row in client.query(&stmt, &[&keys]).await? {
            found.insert(row.try_get::<_, String>(0)?, entry_from_row(&row, 1)?);
        }
        Ok(keys.iter().map(|k| found.get(k).copied().unwrap_or_default()).collect())
    }

    async fn throttle_failure(&self, key: String, rule: Rule, now_ms: i64) -> Result<Entry, GatewayError> {
        let key = &key;
        // The row is locked from read to write: failures at every replica add up.
        self.retrying(|mut client| async move {
            let tx = client.transaction().await?;
            let add = tx.prepare_cached(THROTTLE_NEW_SQL).await?;
            tx.execute(&add, &[key, &now_ms]).await?;
            let read = tx
                .prepare_cached("SELECT failures, locks, locked_until FROM login_throttle WHERE key = $1 FOR UPDATE")
                .await?;
            let e = rule.after_failure(entry_from_row(&tx.query_one(&read, &[key]).await?, 0)?, now_ms);
            let write = tx
                .prepare_cached(
                    "UPDATE login_throttle SET failures = $2, locks = $3, locked_until = $4, last_failure_at = $5
                     WHERE key = $1",
                )
                .await?;
            let (failures, locks) = (i32::try_from(e.failures).unwrap_or(i32::MAX), i32::try_from(e.locks).unwrap_or(i32::MAX));
            tx.execute(&write, &[key, &failures, &locks, &e.locked_until_ms, &now_ms]).await?;
            tx.commit().await?;
            Ok(e)
        })
        .await
    }

    async fn throttle_success(&self, key: String) -> Result<(), GatewayError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("UPDATE login_throttle SET failures = 0 WHERE key = $1 AND failures > 0")
            .await?;
        client.execute(&stmt, &[&key]).await?;
        Ok(())
    }

    async fn token_keys(&self, from_file: Vec<SigningKey>) -> Result<Vec<SigningKey>, GatewayError> {
        let from_file = &from_file;
        self.retrying(|mut client| async move {
            let kids: Vec<&str> = from_file.iter().map(|(kid, _)| kid.as_str()).collect();
            let known = client.prepare_cached("SELECT kid FROM token_keys WHERE kid = ANY($1)").await?;
            let known: Vec<String> =
                client.query(&known, &[&kids]).await?.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?;
            if known.len() < kids.len() {
                // Oldest first, so the file's newest key gets the highest seq.
                let tx = client.transaction().await?;
                let add = tx
                    .prepare_cached(
                        "INSERT INTO token_keys (kid, secret, added_at) VALUES ($1, $2, $3) ON CONFLICT (kid) DO NOTHING",
                    )
                    .await?;
                for (kid, secret) in from_file.iter().rev().filter(|(kid, _)| !known.contains(kid)) {
                    tx.execute(&add, &[kid, secret.expose(), &now_ms()]).await?;
                }
                tx.commit().await?;
            }
            let newest =
                client.prepare_cached("SELECT kid, secret FROM token_keys ORDER BY seq DESC LIMIT $1").await?;
            let rows = client.query(&newest, &[&i64::try_from(KEYS_MAX).unwrap_or(i64::MAX)]).await?;
            rows.iter()
                .map(|r| Ok((r.try_get::<_, String>(0)?, Secret::new(r.try_get::<_, Vec<u8>>(1)?))))
                .collect()
        })
        .await
    }
}

/// Login counts from `row`, starting at column `at`: failures, locks,
/// locked until.
fn entry_from_row(row: &Row, at: usize) -> Result<Entry, GatewayError> {
    let count = |i: usize| -> Result<u32, GatewayError> {
        Ok(u32::try_from(row.try_get::<_, i32>(at + i)?).unwrap_or(0))
    };
    Ok(Entry { failures: count(0)?, locks: count(1)?, locked_until_ms: row.try_get(at + 2)? })
}

impl GatewayError {
    /// Whether PostgreSQL aborted the whole transaction for a reason that
    /// running it again may not meet (a deadlock, a serialization failure).
    pub fn is_retryable(&self) -> bool {
        match self {
            GatewayError::Postgres(e) => e.code().is_some_and(|c| {
                *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
            }),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{conformance_suite, record, replica_suite, txn_ids, user, uuid_of};
    use strife_rpc::postgres_server::{PostgresServer, shared_for_tests, unique_name};

    /// The test binary's PostgreSQL server; a test that cannot have it
    /// fails, saying what to install.
    fn server() -> &'static PostgresServer {
        shared_for_tests().unwrap_or_else(|e| panic!("{e}"))
    }

    /// A URL of a new, empty database.
    fn new_database() -> Secret<String> {
        server().create_database(&unique_name("gateway")).expect("a database")
    }

    /// Leases that outlast any test.
    const LONG: Leases =
        Leases { after_deadline: Duration::from_secs(3600), claim: Duration::from_secs(3600) };
    /// Leases that lapse at once: a process long gone.
    const LAPSED: Leases = Leases { after_deadline: Duration::ZERO, claim: Duration::ZERO };

    /// Two instances (two pools, as two gateway processes) of a fresh store.
    async fn fresh() -> (PostgresStore, PostgresStore, ()) {
        let url = new_database();
        let a = PostgresStore::connect(&url, LONG).await.expect("connect");
        let b = PostgresStore::connect(&url, LONG).await.expect("connect");
        (a, b, ())
    }

    /// And a third whose leases lapse at once.
    async fn fresh_replicas() -> (PostgresStore, PostgresStore, PostgresStore, ()) {
        let url = new_database();
        let a = PostgresStore::connect(&url, LONG).await.expect("connect");
        let b = PostgresStore::connect(&url, LONG).await.expect("connect");
        let quick = PostgresStore::connect(&url, LAPSED).await.expect("connect");
        (a, b, quick, ())
    }

    conformance_suite!(fresh);
    replica_suite!(fresh_replicas);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_migrate_once_and_a_start_aborts_nothing() {
        let url = new_database();
        // Three processes starting at once: one migrates, all serve.
        let (a, b, c) = tokio::join!(
            PostgresStore::connect(&url, LONG),
            PostgresStore::connect(&url, LONG),
            PostgresStore::connect(&url, LONG)
        );
        let (a, b, _c) = (a.expect("first"), b.expect("second"), c.expect("third"));
        assert_ne!(a.instance(), b.instance(), "each process has its own instance id");
        let (x, y) = (user("x@BankA"), user("y@BankB"));
        a.begin_payment(record(1, 1, &x, &y, PaymentState::Preparing)).await.expect("begin").expect("new");
        // Another replica may be driving it: a start leaves it alone.
        let again = PostgresStore::connect(&url, LONG).await.expect("a restart");
        assert_eq!(again.recover().await.expect("recover"), 0);
        let p = again.find_txn(uuid_of(1)).await.expect("find").expect("the data survives");
        assert_eq!(p.state, PaymentState::Preparing);
        let history = server()
            .psql(&url, &["SELECT COUNT(*) FROM gateway_schema_history"])
            .expect("refinery's own table");
        assert_eq!(history, "9", "each migration applied once");
    }

    /// A full disk, an I/O error, no memory, no connection left or a
    /// read-only server, as PostgreSQL says them (raised here with their
    /// SQLSTATEs), are the machine's: UNAVAILABLE `STORAGE_UNAVAILABLE`
    /// naming the cause, as SQLite's, alone or for each caller of a batch,
    /// and counted by cause; any other database error stays INTERNAL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_machine_s_failures_answer_unavailable_with_their_cause() {
        use strife_proto::gateway::v1::ErrorReason;
        let store = fresh().await.0;
        let client = store.client().await.expect("a connection");
        for (sqlstate, cause) in [
            ("53100", "disk full"),
            ("58030", "I/O error"),
            ("53200", "out of memory"),
            ("53300", "too many database connections"),
            ("25006", "read-only file system"),
        ] {
            let raise =
                format!("DO $$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = '{sqlstate}'; END $$");
            let err = client.batch_execute(&raise).await.expect_err("raised");
            let code = strife_rpc::storage::StorageCause::of_postgres(&err).code();
            let before = strife_rpc::metrics::STORE.failures.get_or_create(&[("cause", code)]).get();
            let batch = GatewayError::Postgres(err);
            for status in [tonic::Status::from(batch.for_each()), tonic::Status::from(batch)] {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{sqlstate}: {status:?}");
                assert_eq!(strife_rpc::errors::reason_of(&status), Some(ErrorReason::StorageUnavailable));
                assert_eq!(status.message(), format!("the gateway cannot write its store: {cause}"));
            }
            let after = strife_rpc::metrics::STORE.failures.get_or_create(&[("cause", code)]).get();
            assert_eq!(after, before + 2, "{sqlstate}: counted under {code}");
        }
        let err = client.batch_execute("SELECT 1/0").await.expect_err("division by zero");
        assert_eq!(tonic::Status::from(GatewayError::Postgres(err)).code(), tonic::Code::Internal);
    }

    /// A new database migrated to schema `version` only, as a store of
    /// that version left it: its URL, a client and the client's connection.
    async fn database_at_version(
        version: i32,
    ) -> (Secret<String>, tokio_postgres::Client, tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>)
    {
        let url = new_database();
        let config: tokio_postgres::Config = url.expose().parse().expect("url");
        let (mut client, connection) = config.connect(tokio_postgres::NoTls).await.expect("connect");
        let task = tokio::spawn(connection);
        let mut runner = migrations::runner();
        runner.set_migration_table_name(MIGRATION_TABLE);
        runner.set_target(refinery::Target::Version(version)).run_async(&mut client).await.expect("migrate");
        (url, client, task)
    }

    /// A store written by the previous version (schema version 4: a
    /// finished payment with its timeline a row per step, a decided one not
    /// yet delivered, an undecided one) is migrated at connect: the payments
    /// and the timeline read back as they were, new steps add to it, and the
    /// unfinished payments are in the work queue (claimed, swept).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_of_the_previous_version_upgrades_with_its_timelines() {
        use crate::store::PaymentEvent;
        let (url, client, task) = database_at_version(4).await;
        let txn = uuid_of(1);
        client
            .execute(
                "INSERT INTO payments (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank,
                     amount_minor, fingerprint, state, acked, created_at, deadline_at, decided_at, owner, lease_until)
                 VALUES ($1, 'p1', 'x', 'BankA', 'y', 'BankB', 100, '\\x00', 'committed', TRUE, 10, 1000, 13,
                         gen_random_uuid(), 0)",
                &[&txn],
            )
            .await
            .expect("a payment of version 4");
        client
            .batch_execute(&format!(
                "INSERT INTO payments (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank,
                     amount_minor, fingerprint, state, acked, created_at, deadline_at, decided_at, owner, lease_until)
                 VALUES ('{}', 'p2', 'x', 'BankA', 'y', 'BankB', 100, '\\x00', 'committed', FALSE, 20, 1000, 23,
                         gen_random_uuid(), 0),
                        ('{}', 'p3', 'x', 'BankA', 'y', 'BankB', 100, '\\x00', 'preparing', FALSE, 30, 40, NULL,
                         gen_random_uuid(), 0)",
                uuid_of(2),
                uuid_of(3)
            ))
            .await
            .expect("unfinished payments of version 4");
        client
            .execute(
                "INSERT INTO payment_events (txn_id, at, kind, bank, detail) VALUES
                     ($1, 10, 'begin', NULL, ''), ($1, 12, 'vote', 'BankB', 'yes'),
                     ($1, 11, 'vote', 'BankA', 'yes'), ($1, 13, 'decision', NULL, 'commit'),
                     ($1, 13, 'ack', 'BankA', 'ok')",
                &[&txn],
            )
            .await
            .expect("its timeline");
        drop(client);
        let _ = task.await;
        let s = PostgresStore::connect(&url, LONG).await.expect("migrates");
        let p = s.find_txn(txn.clone()).await.expect("find").expect("the payment survives");
        assert_eq!((p.state, p.acked, p.amount_minor), (PaymentState::Committed, true, 100));
        let c = s.counts().await.expect("counts");
        assert_eq!((c.committed, c.preparing, c.undelivered), (2, 1, 1));
        let claimed = s.claim_unfinished(16).await.expect("claim");
        assert_eq!(txn_ids(&claimed), [uuid_of(2)], "its lease lapsed: claimed");
        let swept = s.preparing_before(i64::MAX, 16).await.expect("sweep");
        assert_eq!(txn_ids(&swept), [uuid_of(3)]);
        s.mark_acked(uuid_of(2)).await.expect("ack");
        assert_eq!(s.counts().await.expect("counts").undelivered, 0);
        let steps = |events: Vec<PaymentEvent>| -> Vec<(i64, String, Option<String>, String)> {
            events.into_iter().map(|e| (e.at_ms, e.kind.to_owned(), e.bank, e.detail)).collect()
        };
        let step = |at: i64, kind: &str, bank: Option<&str>, detail: &str| {
            (at, kind.to_owned(), bank.map(str::to_owned), detail.to_owned())
        };
        let old = vec![
            step(10, "begin", None, ""),
            step(11, "vote", Some("BankA"), "yes"),
            step(12, "vote", Some("BankB"), "yes"),
            step(13, "decision", None, "commit"),
            step(13, "ack", Some("BankA"), "ok"),
        ];
        assert_eq!(steps(s.payment_events(txn.clone()).await.expect("timeline")), old);
        s.record_events(vec![PaymentEvent::new(&txn, 13, "ack", Some("BankB"), "ok".into())]);
        let patience = crate::conformance::Patience::new();
        let now = loop {
            let now = steps(s.payment_events(txn.clone()).await.expect("timeline"));
            if now.len() == old.len() + 1 {
                break now;
            }
            patience.wait("the new step written").await;
        };
        assert_eq!(now[..old.len()], old[..], "the old steps first");
        assert_eq!(now[old.len()], step(13, "ack", Some("BankB"), "ok"), "then the new one");
        // Retention prunes the timeline with the payments.
        assert_eq!(s.prune(i64::MAX).await.expect("prune"), 2);
        assert!(s.payment_events(txn).await.expect("timeline").is_empty());
    }

    /// A store of the version before the lean queue (schema version 8: an
    /// `acked` column, a queue with a primary key) holding a finished
    /// payment, a decided one not yet delivered, an undecided two-phase one
    /// and an undecided one-phase one, with their timelines, is migrated at
    /// connect: each reads back as it was (acknowledged or not), the
    /// undelivered one is claimed and acknowledged, the undecided ones are
    /// swept and decided (the one-phase one by its bank's outcome), retention
    /// prunes only what is finished, and new payments run as before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_of_version_8_upgrades_with_its_queue() {
        use crate::store::PaymentEvent;
        let (url, client, task) = database_at_version(8).await;
        let (finished, undelivered, undecided, one_phase) = (uuid_of(1), uuid_of(2), uuid_of(3), uuid_of(4));
        client
            .batch_execute(&format!(
                "INSERT INTO payments (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank,
                     amount_minor, fingerprint, state, acked, created_at, deadline_at, decided_at, one_phase)
                 VALUES ('{finished}', 'p1', 'x', 'BankA', 'y', 'BankB', 100, '\\x00', 'committed', TRUE, 10, 1000, 13, FALSE),
                        ('{undelivered}', 'p2', 'x', 'BankA', 'y', 'BankB', 200, '\\x00', 'aborted', FALSE, 20, 1000, 23, FALSE),
                        ('{undecided}', 'p3', 'x', 'BankA', 'y', 'BankB', 300, '\\x00', 'preparing', FALSE, 30, 40, NULL, FALSE),
                        ('{one_phase}', 'p4', 'x', 'BankA', 'z', 'BankA', 400, '\\x00', 'preparing', FALSE, 31, 41, NULL, TRUE);
                 INSERT INTO payment_queue (txn_id, created_at, decided, owner, lease_until)
                 VALUES ('{undelivered}', 20, TRUE, gen_random_uuid(), 0),
                        ('{undecided}', 30, FALSE, gen_random_uuid(), 0),
                        ('{one_phase}', 31, FALSE, gen_random_uuid(), 0);
                 INSERT INTO payment_timeline (txn_id, last_at, ats, kinds, banks, details)
                 VALUES ('{finished}', 12, '{{10,11,12}}', '{{begin,vote,vote}}', '{{NULL,BankA,BankB}}', '{{\"\",yes,yes}}'),
                        ('{finished}', 13, '{{13}}', '{{decision}}', '{{NULL}}', '{{commit}}');"
            ))
            .await
            .expect("payments of version 8");
        drop(client);
        let _ = task.await;

        let s = PostgresStore::connect(&url, LONG).await.expect("migrates");
        let read = |txn: &String| {
            let (s, txn) = (s.clone(), txn.clone());
            async move { s.find_txn(txn).await.expect("find").expect("the payment survives") }
        };
        let p = read(&finished).await;
        assert_eq!((p.state, p.acked, p.amount_minor), (PaymentState::Committed, true, 100));
        let p = read(&undelivered).await;
        assert_eq!((p.state, p.acked, p.amount_minor), (PaymentState::Aborted, false, 200));
        let p = read(&undecided).await;
        assert_eq!((p.state, p.acked, p.one_phase), (PaymentState::Preparing, false, false));
        assert!(read(&one_phase).await.one_phase);
        let c = s.counts().await.expect("counts");
        assert_eq!((c.committed, c.aborted, c.preparing, c.undelivered), (1, 1, 2, 1));
        let steps = s.payment_events(finished.clone()).await.expect("timeline");
        let kinds: Vec<(i64, &str)> = steps.iter().map(|e| (e.at_ms, e.kind)).collect();
        assert_eq!(kinds, [(10, "begin"), (11, "vote"), (12, "vote"), (13, "decision")]);

        // The undelivered payment: claimed (its lease lapsed), then
        // acknowledged; retention keeps it until then.
        assert_eq!(txn_ids(&s.claim_unfinished(16).await.expect("claim")), [undelivered.as_str()]);
        assert_eq!(s.prune(100).await.expect("prune"), 1, "only the finished payment");
        assert!(s.find_txn(finished.clone()).await.expect("find").is_none());
        s.mark_acked(undelivered.clone()).await.expect("ack");
        assert!(read(&undelivered).await.acked);
        assert!(s.claim_unfinished(16).await.expect("claim").is_empty());
        // The undecided ones: swept, then decided; an acknowledgement of an
        // undecided payment changes nothing.
        s.mark_acked(undecided.clone()).await.expect("ack");
        assert!(!read(&undecided).await.acked);
        let swept = s.preparing_before(i64::MAX, 16).await.expect("sweep");
        assert_eq!(txn_ids(&swept), [undecided.clone(), one_phase.clone()]);
        let reason = Some(DeclineReason::Timeout);
        assert_eq!(
            s.decide(undecided.clone(), PaymentState::Aborted, reason).await.expect("decide"),
            PaymentState::Aborted
        );
        assert_eq!(txn_ids(&s.claim_unfinished(16).await.expect("claim")), [undecided.as_str()]);
        s.mark_acked_lazily(undecided.clone());
        s.record_outcome_lazily(one_phase.clone(), PaymentState::Committed, None);
        let patience = crate::conformance::Patience::new();
        while !(read(&undecided).await.acked && read(&one_phase).await.acked) {
            patience.wait("the lazy acknowledgement and outcome written").await;
        }
        assert_eq!(read(&one_phase).await.state, PaymentState::Committed);
        assert!(s.preparing_before(i64::MAX, 16).await.expect("sweep").is_empty());
        assert!(s.claim_unfinished(16).await.expect("claim").is_empty());
        // New payments, with their timelines, as before.
        let (x, y) = (user("x@BankA"), user("y@BankB"));
        s.begin_payment(record(9, 9, &x, &y, PaymentState::Preparing)).await.expect("begin").expect("new");
        assert_eq!(
            s.decide(uuid_of(9), PaymentState::Committed, None).await.expect("decide"),
            PaymentState::Committed
        );
        s.record_events(vec![PaymentEvent::new(&uuid_of(9), 1, "begin", None, String::new())]);
        s.record_events(vec![PaymentEvent::new(&uuid_of(9), 2, "decision", None, "commit".into())]);
        s.mark_acked(uuid_of(9)).await.expect("ack");
        let p = read(&uuid_of(9)).await;
        assert_eq!((p.state, p.acked), (PaymentState::Committed, true));
        while s.payment_events(uuid_of(9)).await.expect("timeline").len() < 2 {
            patience.wait("the new payment's timeline written").await;
        }
        let c = s.counts().await.expect("counts");
        assert_eq!((c.committed, c.aborted, c.preparing, c.undelivered), (2, 2, 0, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connect_errors_do_not_show_the_password() {
        let url = new_database();
        let (head, tail) = url.expose().rsplit_once('@').expect("a password in the URL");
        let wrong = Secret::new(format!("{head}x-wrong-secret@{tail}"));
        let err = PostgresStore::connect(&wrong, LONG).await.err().expect("a wrong password is refused");
        let text = format!("{err} {err:?}");
        assert!(!text.contains("x-wrong-secret"), "{text}");
        let (_, password) = head.rsplit_once(':').expect("user:password");
        assert!(!text.contains(password), "{text}");
    }

    /// The plan of `sql` with `params` (EXPLAIN, text format), in the
    /// plan cache mode `mode`.
    async fn plan_in(s: &PostgresStore, mode: &str, sql: &str, params: &[&(dyn ToSql + Sync)]) -> String {
        let client = s.client().await.expect("connection");
        client.batch_execute(&format!("SET plan_cache_mode = {mode}")).await.expect("mode");
        let rows = client.query(&format!("EXPLAIN {sql}"), params).await.expect("explain");
        client.batch_execute("RESET plan_cache_mode").await.expect("reset");
        rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>().join("\n")
    }

    async fn plan(s: &PostgresStore, sql: &str, params: &[&(dyn ToSql + Sync)]) -> String {
        plan_in(s, "auto", sql, params).await
    }

    /// On a table of 20,000 payments among 200 customers, a quarter of them
    /// not acknowledged (a backlog in the queue; statistics gathered): a page is two backward range scans of the payer and payee
    /// indexes merged in page order under a limit (no sort, no scan of the
    /// table); lookups by id, by transaction id, claims and the sweep each
    /// use their index.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pages_and_lookups_use_the_indexes_and_never_sort_or_scan() {
        let url = new_database();
        let s = PostgresStore::connect(&url, LONG).await.expect("connect");
        server()
            .psql(
                &url,
                &["INSERT INTO payments (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank,
                      amount_minor, fingerprint, state, created_at, deadline_at)
                   SELECT lpad(to_hex(n), 36, '0'), lpad(to_hex(n), 36, '0'), 'u' || (n % 200), 'BankA',
                          'u' || ((n + 1) % 200), 'BankB', 100, '\\x00', 
                          CASE WHEN n % 10 = 0 THEN 'aborted' ELSE 'committed' END,
                          1000000 + n, 2000000 + n
                   FROM generate_series(1, 20000) AS n",
                  "INSERT INTO payment_queue (txn_id, created_at, decided, owner, lease_until)
                   SELECT txn_id, created_at, state <> 'preparing', gen_random_uuid(), 0
                   FROM payments WHERE created_at % 4 = 0",
                  "ANALYZE payments",
                  "ANALYZE payment_queue"],
            )
            .expect("fill");
        let (bank, who, start, end, txn, limit) = ("BankA", "u7", i64::MIN, i64::MAX, "", 51i64);
        // The plan made for these values, and the generic one a prepared
        // statement may switch to: the same shape.
        for mode in ["auto", "force_generic_plan"] {
            let page = plan_in(&s, mode, PAGE_SQL, &[&bank, &who, &start, &end, &txn, &limit]).await;
            assert!(page.starts_with("Limit"), "{mode}: stops at the page size: {page}");
            assert!(page.contains("Merge Append"), "{mode}: the two ordered scans are merged: {page}");
            assert!(page.contains("Index Scan Backward using payments_by_payer"), "{mode}: {page}");
            assert!(page.contains("Index Scan Backward using payments_by_payee"), "{mode}: {page}");
            // (and each row's probe of the queue, a subplan, stops at one)
            let limits = page.matches("Limit").count() - page.matches("SubPlan").count();
            assert_eq!(limits, 3, "{mode}: each arm stops at the page size: {page}");
            assert!(
                !page.contains("Sort  ") && !page.contains("Seq Scan"),
                "{mode}: never sorts or scans: {page}"
            );
            // Whether each row is acknowledged: a probe of the queue's index.
            assert_eq!(page.matches("using payment_queue_undelivered").count(), 2, "{mode}: {page}");
            // Each arm is a range of its index: both bounds on created_at.
            assert_eq!(page.matches("AND (created_at >= ").count(), 2, "{mode}: {page}");
            assert_eq!(page.matches("AND (ROW(created_at, txn_id) < ROW(").count(), 2, "{mode}: {page}");
        }

        let id = "0000000000000000000000000000000000ff".to_owned();
        let made = plan(&s, MADE_BY_ID_SQL, &[&bank, &who, &id]).await;
        assert!(made.contains("Index Scan using payments_by_id"), "{made}");
        let received = plan(&s, RECEIVED_BY_ID_SQL, &[&"BankB", &who, &id]).await;
        assert!(received.contains("using payments_by_id"), "{received}");
        let by_txn =
            plan(&s, &format!("SELECT {PAYMENT_COLUMNS} FROM payments WHERE txn_id = $1"), &[&id]).await;
        assert!(by_txn.contains("Index Scan using payments_pkey"), "{by_txn}");
        let after = plan(&s, AFTER_SQL, &[&id, &16i64]).await;
        assert!(after.contains("Index Scan using payments_pkey") && !after.contains("Sort"), "{after}");
        let claim = plan(&s, CLAIM_SQL, &[&s.instance(), &1i64, &256i64]).await;
        assert!(claim.contains("Index Scan using payment_queue_undelivered"), "{claim}");
        assert!(claim.contains("Index Scan using payments_pkey"), "{claim}");
        assert!(!claim.contains("Seq Scan"), "{claim}");
        let ids = vec![id.clone()];
        let decide =
            plan(&s, DECIDE_MANY_SQL, &[&ids, &vec!["committed"], &vec![None::<&str>], &vec![1i64]]).await;
        // Through the primary key, or the index of undecided payments
        // (none here): never a scan of the table.
        assert!(decide.contains("Index Scan") && !decide.contains("Seq Scan"), "{decide}");
        let sweep = plan(&s, PREPARING_BEFORE_SQL, &[&0i64, &256i64]).await;
        assert!(sweep.contains("payment_queue_undecided"), "{sweep}");
        let prune = plan(&s, PRUNE_SQL, &[&1_000_100i64]).await;
        assert!(prune.contains("payments_by_age"), "{prune}");
    }
}

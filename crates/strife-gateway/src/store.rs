//! The gateway's durable state in SQLite (WAL, `synchronous=FULL`): every
//! payment with its 2PC state, the bank registry, and revoked tokens.
//!
//! A payment row is the coordinator's log. Its `state` is `preparing` until
//! the decision, then `committed` or `aborted`; the decision is written (and
//! synced) before any bank hears it. `acked` turns 1 once every bank has
//! acknowledged the decision.

use crate::throttle::{Entry, Rule};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashMap;
use std::path::Path;
use strife_core::{DeclineReason, UserRef};
use strife_rpc::folds::Folding;
use strife_rpc::storage::StorageFailure;

/// Version 1: the schema from before versioning (`PRAGMA user_version` 0),
/// verbatim. On such a database every statement is a no-op; on a new one it
/// creates the tables, and the migrations after it bring them up to date.
const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS payments (
    txn_id       TEXT PRIMARY KEY,
    payment_id   TEXT NOT NULL,
    payer_user   TEXT NOT NULL,
    payer_bank   TEXT NOT NULL,
    payee_user   TEXT NOT NULL,
    payee_bank   TEXT NOT NULL,
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    -- SHA-256 of the canonical request (payer, payee, amount): the
    -- idempotency check compares it before naming the fields that differ
    fingerprint  BLOB NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('preparing', 'committed', 'aborted')),
    reason       TEXT,
    -- 1 once every bank involved acknowledged the decision
    acked        INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL,
    deadline_at  INTEGER NOT NULL,
    decided_at   INTEGER,
    -- the idempotency key is scoped to the paying customer
    UNIQUE (payer_bank, payer_user, payment_id)
) STRICT;
CREATE INDEX IF NOT EXISTS payments_by_payee ON payments (payee_bank, payee_user, created_at);
CREATE INDEX IF NOT EXISTS payments_by_payer ON payments (payer_bank, payer_user, created_at);
CREATE INDEX IF NOT EXISTS payments_unfinished ON payments (state) WHERE acked = 0;
CREATE TABLE IF NOT EXISTS banks (
    name          TEXT PRIMARY KEY,
    address       TEXT NOT NULL,
    registered_at INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS revoked_tokens (
    jti        TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
) STRICT;
";

/// Version 2: paged history and lookups by payment id. The payer and payee
/// indexes end in `txn_id`, so a customer's payments come out of them in
/// `(created_at, txn_id)` order, the page order; the idempotency key becomes
/// a unique index that starts with `payment_id`, so it also finds a payment
/// someone *received* by its id. A UNIQUE table constraint cannot be
/// dropped, so the table is rebuilt (SQLite's documented procedure: create,
/// copy, drop, rename, index); it keeps five indexes, as before.
const SCHEMA_V2: &str = "
CREATE TABLE payments_v2 (
    txn_id       TEXT PRIMARY KEY,
    payment_id   TEXT NOT NULL,
    payer_user   TEXT NOT NULL,
    payer_bank   TEXT NOT NULL,
    payee_user   TEXT NOT NULL,
    payee_bank   TEXT NOT NULL,
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    -- SHA-256 of the canonical request (payer, payee, amount): the
    -- idempotency check compares it before naming the fields that differ
    fingerprint  BLOB NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('preparing', 'committed', 'aborted')),
    reason       TEXT,
    -- 1 once every bank involved acknowledged the decision
    acked        INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL,
    deadline_at  INTEGER NOT NULL,
    decided_at   INTEGER
) STRICT;
INSERT INTO payments_v2 (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor,
                         fingerprint, state, reason, acked, created_at, deadline_at, decided_at)
    SELECT txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor,
           fingerprint, state, reason, acked, created_at, deadline_at, decided_at
    FROM payments;
DROP TABLE payments;
ALTER TABLE payments_v2 RENAME TO payments;
-- the idempotency key is scoped to the paying customer
CREATE UNIQUE INDEX payments_by_id ON payments (payment_id, payer_bank, payer_user);
CREATE INDEX payments_by_payer ON payments (payer_bank, payer_user, created_at, txn_id);
CREATE INDEX payments_by_payee ON payments (payee_bank, payee_user, created_at, txn_id);
CREATE INDEX payments_unfinished ON payments (state) WHERE acked = 0;
";

/// Version 3: bank replicas. A bank may run as several processes, each at
/// its own address, so the registry has a row per `(name, address)`; the
/// table is rebuilt to change its key, keeping every row.
const SCHEMA_V3: &str = "
CREATE TABLE banks_v3 (
    name          TEXT NOT NULL,
    address       TEXT NOT NULL,
    registered_at INTEGER NOT NULL,
    PRIMARY KEY (name, address)
) STRICT;
INSERT INTO banks_v3 (name, address, registered_at) SELECT name, address, registered_at FROM banks;
DROP TABLE banks;
ALTER TABLE banks_v3 RENAME TO banks;
";

/// Version 4: failed logins, counted in the store so that the counts
/// survive a restart (see [`crate::throttle`]).
const SCHEMA_V4: &str = "
CREATE TABLE login_throttle (
    key             TEXT PRIMARY KEY,
    failures        INTEGER NOT NULL,
    locks           INTEGER NOT NULL,
    -- ms since the epoch; 0 when never locked
    locked_until    INTEGER NOT NULL,
    last_failure_at INTEGER NOT NULL
) STRICT;
";

/// Version 5: the cluster's id, random (a version 4 UUID) and made once,
/// with the store: every gateway that answers from this payment log says it
/// to the banks, which use the gateways of one cluster only.
const SCHEMA_V5: &str = "
CREATE TABLE cluster (
    only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
    id       TEXT NOT NULL
) STRICT;
INSERT INTO cluster (only_row, id) VALUES (1, lower(
    hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' || substr(hex(randomblob(2)), 2) || '-'
    || substr('89ab', 1 + (random() & 3), 1) || substr(hex(randomblob(2)), 2) || '-' || hex(randomblob(6))));
";

/// Version 6: each payment's 2PC timeline for the admin dashboard (begin,
/// each bank's vote, the decision, each acknowledgement), best-effort:
/// written lazily, never forced on its own. (The dashboard lists recent
/// payments by `txn_id`, time-ordered: no new index on the payments.)
const SCHEMA_V6: &str = "
CREATE TABLE payment_events (
    txn_id TEXT NOT NULL,
    -- ms since the epoch
    at     INTEGER NOT NULL,
    -- begin, vote, decision, ack
    kind   TEXT NOT NULL,
    bank   TEXT,
    detail TEXT NOT NULL
) STRICT;
CREATE INDEX payment_events_by_txn ON payment_events (txn_id, at);
CREATE INDEX payment_events_by_time ON payment_events (at);
";

/// Version 7: each gateway replica's heartbeat for the dashboard (issue 13):
/// one row per process (its boot id), rewritten about once a second, never
/// forced on its own; `report` is the replica's own figures as JSON
/// ([`crate::cluster::Report`]). Rows silent for an hour are deleted.
const SCHEMA_V7: &str = "
CREATE TABLE gateway_replicas (
    boot_id       TEXT PRIMARY KEY,
    address       TEXT NOT NULL,
    admin_address TEXT NOT NULL,
    -- ms since the epoch
    started_at    INTEGER NOT NULL,
    heartbeat_at  INTEGER NOT NULL,
    report        TEXT NOT NULL
) STRICT;
";

/// Version 8: one-phase payments (issue 14). A payment within one bank
/// may be decided by that bank (`one_phase` = 1): an undecided one is then
/// never aborted by the gateway but asked about (see
/// `strife_twopc::coordinator::on_abandoned`). Added with a default, so
/// every existing payment is two-phase, as it was.
const SCHEMA_V8: &str = "
ALTER TABLE payments ADD COLUMN one_phase INTEGER NOT NULL DEFAULT 0;
";

/// Version 9: the timeline packed (issue 14): one row per write of a
/// payment's steps instead of one row per step, each row a table entry and
/// two index entries. The coordinator writes a two-phase payment's whole
/// timeline at once, so its six rows become one. The existing steps move
/// over, a row per payment, in their order.
const SCHEMA_V9: &str = "
CREATE TABLE payment_timeline (
    txn_id  TEXT NOT NULL,
    -- ms since the epoch: the row's latest step, for pruning
    last_at INTEGER NOT NULL,
    -- the steps, a JSON array of [at, kind, bank or null, detail]
    steps   TEXT NOT NULL
) STRICT;
INSERT INTO payment_timeline (txn_id, last_at, steps)
    SELECT txn_id, max(at), json_group_array(json_array(at, kind, bank, detail) ORDER BY at, rowid)
    FROM payment_events GROUP BY txn_id ORDER BY min(rowid);
DROP TABLE payment_events;
CREATE INDEX payment_timeline_by_txn ON payment_timeline (txn_id);
CREATE INDEX payment_timeline_by_time ON payment_timeline (last_at);
";

/// Version 10: history pages read through folds ([`crate::history`]) instead
/// of the payer and payee indexes, which every payment wrote into; the
/// folds' tables come with it ([`strife_rpc::folds::SCHEMA`]). The store
/// folds the existing payments when it opens.
const SCHEMA_V10: &str = "
DROP INDEX payments_by_payer;
DROP INDEX payments_by_payee;
";

/// The schema's versions in order, each as the statements that make it: a
/// database at `PRAGMA user_version` n runs `MIGRATIONS[n..]`, all in one
/// transaction, at open.
const MIGRATIONS: &[&[&str]] = &[
    &[SCHEMA_V1],
    &[SCHEMA_V2],
    &[SCHEMA_V3],
    &[SCHEMA_V4],
    &[SCHEMA_V5],
    &[SCHEMA_V6],
    &[SCHEMA_V7],
    &[SCHEMA_V8],
    &[SCHEMA_V9],
    &[SCHEMA_V10, strife_rpc::folds::SCHEMA],
];

/// The schema version this gateway writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// A bank's address that has not registered for this long is dropped from
/// the registry when any bank registers, unless it is the bank's newest.
use crate::backend::BANK_ADDRESS_RETENTION_MS;

/// Brings the database to the latest schema version in one transaction: a
/// crash half-way leaves it as it was. Refuses a database from a newer
/// gateway rather than guessing at its schema.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let applied = usize::try_from(version).unwrap_or(usize::MAX);
    if applied > MIGRATIONS.len() {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(format!(
                "the gateway database has schema version {version}; this gateway knows versions up to {}",
                MIGRATIONS.len()
            )),
        ));
    }
    for (version, statements) in (1_i64..).zip(MIGRATIONS.iter()).skip(applied) {
        for sql in *statements {
            tx.execute_batch(sql)?;
        }
        tx.pragma_update(None, "user_version", version)?;
    }
    tx.commit()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentState {
    Preparing,
    Committed,
    Aborted,
}

impl PaymentState {
    fn parse(s: &str) -> rusqlite::Result<PaymentState> {
        match s {
            "preparing" => Ok(PaymentState::Preparing),
            "committed" => Ok(PaymentState::Committed),
            "aborted" => Ok(PaymentState::Aborted),
            other => Err(rusqlite::Error::InvalidColumnType(
                0,
                format!("payment state '{other}'"),
                rusqlite::types::Type::Text,
            )),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentState::Preparing => "preparing",
            PaymentState::Committed => "committed",
            PaymentState::Aborted => "aborted",
        }
    }
}

/// One payment as the gateway records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRecord {
    pub txn_id: String,
    pub payment_id: String,
    pub payer: UserRef,
    pub payee: UserRef,
    pub amount_minor: i64,
    pub state: PaymentState,
    pub reason: Option<DeclineReason>,
    pub acked: bool,
    pub created_at_ms: i64,
    pub deadline_at_ms: i64,
    /// SHA-256 of the canonical encoding of the request.
    pub fingerprint: Vec<u8>,
    /// Decided by its one bank (one-phase commit), not by the gateway: while
    /// undecided, it is asked about, never aborted.
    pub one_phase: bool,
}

pub(crate) const PAYMENT_COLUMNS: &str = "txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor, \
                               state, reason, acked, created_at, deadline_at, fingerprint, one_phase";

pub(crate) fn payment_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PaymentRecord> {
    let reason: Option<String> = r.get(8)?;
    Ok(PaymentRecord {
        txn_id: r.get(0)?,
        payment_id: r.get(1)?,
        payer: UserRef { user: r.get(2)?, bank: r.get(3)? },
        payee: UserRef { user: r.get(4)?, bank: r.get(5)? },
        amount_minor: r.get(6)?,
        state: PaymentState::parse(&r.get::<_, String>(7)?)?,
        reason: reason.as_deref().and_then(DeclineReason::from_code),
        acked: r.get::<_, i64>(9)? != 0,
        created_at_ms: r.get(10)?,
        deadline_at_ms: r.get(11)?,
        fingerprint: r.get(12)?,
        one_phase: r.get::<_, i64>(13)? != 0,
    })
}

/// Where a page of a customer's payments ended: the `(created_at, txn_id)`
/// of its last (oldest) entry. The next page starts strictly after it, so a
/// payment is never shown twice or skipped, however many arrive meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created_at_ms: i64,
    pub txn_id: String,
}

impl Cursor {
    /// The cursor just past this payment.
    pub fn after(p: &PaymentRecord) -> Cursor {
        Cursor { created_at_ms: p.created_at_ms, txn_id: p.txn_id.clone() }
    }
}

/// Which page of a customer's payments to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageQuery {
    /// Most entries on the page; clamped to `1..=HISTORY_PAGE_MAX`.
    pub limit: u32,
    /// The end of the previous page; `None` for the first page.
    pub after: Option<Cursor>,
    /// Only payments created at or after this instant (ms since the epoch).
    pub start_ms: Option<i64>,
    /// Only payments created before this instant (exclusive).
    pub end_ms: Option<i64>,
}

/// One page of a customer's payments, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentPage {
    pub payments: Vec<PaymentRecord>,
    /// Where the next page starts; `None` when this page is the last.
    pub next: Option<Cursor>,
}

/// The payment a customer made under an id: one row of the unique index.
const MADE_BY_ID_SQL: &str = "
SELECT txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor,
       state, reason, acked, created_at, deadline_at, fingerprint, one_phase
FROM payments
WHERE payment_id = ?3 AND payer_bank = ?1 AND payer_user = ?2";

/// A payment a customer received, by its id: through the unique index that
/// starts with `payment_id` (every payer that used this id, a handful at
/// most), never through the customer's received payments.
const RECEIVED_BY_ID_SQL: &str = "
SELECT txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor,
       state, reason, acked, created_at, deadline_at, fingerprint, one_phase
FROM payments INDEXED BY payments_by_id
WHERE payment_id = ?3 AND payee_bank = ?1 AND payee_user = ?2 AND state = 'committed'
ORDER BY created_at DESC, txn_id DESC
LIMIT 1";

/// One gateway replica's heartbeat, as it writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// The process's boot id ([`crate::coordinator::Gateway::boot_id`]).
    pub boot_id: String,
    /// Where customers and banks reach it.
    pub address: String,
    /// Where its dashboard is served (empty when off).
    pub admin_address: String,
    /// When it started, ms since the epoch (its clock).
    pub started_at_ms: i64,
    /// Its figures, JSON ([`crate::cluster::Report`]).
    pub report: String,
}

/// A replica's heartbeat as read back, with its age by the store's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRow {
    pub beat: Heartbeat,
    /// Since its last heartbeat, in ms.
    pub age_ms: i64,
}

/// One step of a payment's 2PC timeline, as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentEvent {
    pub txn_id: String,
    /// When it happened, ms since the epoch (this gateway's clock).
    pub at_ms: i64,
    /// `begin`, `vote`, `decision` or `ack`; for a one-phase payment
    /// `transfer` (the bank's decision) and `resolve` (a question about it).
    pub kind: &'static str,
    /// The bank of a vote or an acknowledgement.
    pub bank: Option<String>,
    /// `yes`, `no: <reason>`, `commit`, `abort: <reason>`, `ok`, `failed: …`,
    /// `no answer`.
    pub detail: String,
}

/// Most events read for one payment (a payment redelivered for long keeps
/// adding acknowledgement attempts).
pub const EVENTS_PER_PAYMENT_MAX: u32 = 100;

/// Longest detail kept with an event (an error message is cut).
pub const EVENT_DETAIL_MAX: usize = 200;

impl PaymentEvent {
    pub fn new(
        txn_id: &str,
        at_ms: i64,
        kind: &'static str,
        bank: Option<&str>,
        detail: String,
    ) -> PaymentEvent {
        let mut detail = detail;
        if detail.len() > EVENT_DETAIL_MAX {
            let mut end = EVENT_DETAIL_MAX;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail.truncate(end);
        }
        PaymentEvent { txn_id: txn_id.to_owned(), at_ms, kind, bank: bank.map(str::to_owned), detail }
    }

    /// The kind as stored, back to its static name (unknown kinds read as `other`).
    pub fn kind_of(text: &str) -> &'static str {
        match text {
            "begin" => "begin",
            "vote" => "vote",
            "decision" => "decision",
            "ack" => "ack",
            "transfer" => "transfer",
            "resolve" => "resolve",
            _ => "other",
        }
    }
}

/// Which payments the dashboard lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentFilter {
    /// Every payment.
    All,
    /// Those with this payment id (any payer).
    PaymentId(String),
}

/// Counts of payments by state, for the status RPC.
#[derive(Debug, Clone, Copy, Default)]
pub struct PaymentCounts {
    pub committed: u64,
    pub aborted: u64,
    pub preparing: u64,
    /// Decided, and some bank has not acknowledged the decision yet.
    pub undelivered: u64,
}

pub struct Store {
    /// The only connection; all writes are serial transactions.
    conn: Connection,
    /// Payments begun in the open batch: their `preparing` record was
    /// answered before the batch commits ([`Store::begin_payment`]).
    begun_in_batch: Vec<String>,
    /// Payments whose `preparing` record was lost because its batch failed,
    /// with that failure: deciding one says why instead of "no such row".
    /// At most [`LOST_BEGINS_MAX`]; a decision takes its entry out.
    lost_begins: HashMap<String, StorageFailure>,
    /// The rowid the next payment gets: above every row stored and every
    /// row a fold covers (see [`crate::history`]).
    next_row: i64,
    /// When to fold the payments for history pages: the payment that
    /// completes a fold's worth folds them, in its batch.
    folding: Folding,
}

/// Most lost `preparing` records remembered (one per payment that was in
/// flight when its batch failed; the group-commit queue bounds those).
pub const LOST_BEGINS_MAX: usize = strife_rpc::group_commit::QUEUE_MAX;

/// Group commit drives the store's one connection.
impl strife_rpc::sqlite::HasConnection for Store {
    fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    fn committed(&mut self) {
        self.begun_in_batch.clear();
    }

    fn rolled_back(&mut self, failure: &StorageFailure) {
        for txn_id in self.begun_in_batch.drain(..) {
            if self.lost_begins.len() < LOST_BEGINS_MAX {
                self.lost_begins.insert(txn_id, failure.clone());
            }
        }
        self.folding.rolled_back(&self.conn);
    }
}

/// Payments one prune step looks at, and timelines one step deletes: each
/// step is one short operation of the store's thread, so payments go on
/// between steps however much there is to prune.
pub const PRUNE_STEP_ROWS: u32 = 500;

/// Every two-phase payment still `preparing`, through the partial index of
/// unfinished payments (a `preparing` payment is never acknowledged: its
/// `acked` is set with its decision), not a scan of the whole log.
const ABORT_PREPARING_SQL: &str = "UPDATE payments SET state = 'aborted', reason = 'timeout', decided_at = ?1
     WHERE acked = 0 AND state = 'preparing' AND one_phase = 0";

/// At most ?2 timelines last written before ?1, through `last_at`'s index.
const PRUNE_TIMELINES_SQL: &str = "DELETE FROM payment_timeline WHERE rowid IN
     (SELECT rowid FROM payment_timeline WHERE last_at < ?1 LIMIT ?2)";

/// The ?3 payments stored after row ?2: the last one's row, how many, and
/// how many were created before ?1.
const PRUNE_STEP_SQL: &str = "SELECT max(r), count(*), coalesce(sum(created_at < ?1), 0) FROM
     (SELECT rowid AS r, created_at FROM payments WHERE rowid > ?2 ORDER BY rowid LIMIT ?3)";

/// The finished payments created before ?1 among rows ?2 (exclusive) to ?3.
const PRUNE_PAYMENTS_SQL: &str = "DELETE FROM payments WHERE rowid > ?2 AND rowid <= ?3
     AND created_at < ?1 AND acked = 1 AND state != 'preparing'";

/// Payments by state, and those decided but not yet acknowledged. Reads
/// the whole log: the SQLite backend runs it on a connection of its own.
pub fn counts(conn: &Connection) -> rusqlite::Result<PaymentCounts> {
    // One pass and no sort (a `GROUP BY state` sorted every row's state
    // through temporary files: 4.2 s against 1.6 s for 10,000,000).
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    let mut counts = conn
        .prepare_cached(
            "SELECT count(*) FILTER (WHERE state = 'committed'), count(*) FILTER (WHERE state = 'aborted'),
                    count(*) FILTER (WHERE state = 'preparing')
             FROM payments",
        )?
        .query_row([], |r| {
            Ok(PaymentCounts {
                committed: count(r.get(0)?),
                aborted: count(r.get(1)?),
                preparing: count(r.get(2)?),
                ..PaymentCounts::default()
            })
        })?;
    let undelivered: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM payments WHERE acked = 0 AND state != 'preparing'")?
        .query_row([], |r| r.get(0))?;
    counts.undelivered = count(undelivered);
    Ok(counts)
}

/// Declined payments by reason code. Reads the whole log, like [`counts`].
pub fn decline_counts(conn: &Connection) -> rusqlite::Result<Vec<(String, u64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT COALESCE(reason, 'none'), COUNT(*) FROM payments WHERE state = 'aborted' GROUP BY 1 ORDER BY 2 DESC",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0))))?;
    rows.collect()
}

/// What one step of [`Store::prune_payments`] did.
#[derive(Debug, PartialEq, Eq)]
pub struct PruneStep {
    /// Payments deleted.
    pub deleted: usize,
    /// The row the next step starts after; `None` when pruning is done.
    pub next: Option<i64>,
}

pub use strife_core::unix_ms as now_ms;

impl Store {
    pub fn open(path: &Path) -> rusqlite::Result<Store> {
        Store::open_folding(path, strife_rpc::folds::FOLD_ROWS)
    }

    /// [`Store::open`] with `fold_rows` payments per fold.
    fn open_folding(path: &Path, fold_rows: i64) -> rusqlite::Result<Store> {
        let mut conn = strife_rpc::sqlite::open_durable(path)?;
        migrate(&mut conn)?;
        strife_rpc::sqlite::state_check_as_comparisons(
            &mut conn,
            "payments",
            &["preparing", "committed", "aborted"],
        )?;
        let folding = Folding::open(&mut conn, crate::history::LOG, fold_rows)?;
        let next_row = strife_rpc::folds::last_row(&conn, crate::history::LOG)?.max(folding.folded_to()) + 1;
        Ok(Store { conn, begun_in_batch: Vec::new(), lost_begins: HashMap::new(), next_row, folding })
    }

    /// The payment a customer made under `payment_id`, if any.
    pub fn find_payment(&self, payer: &UserRef, payment_id: &str) -> rusqlite::Result<Option<PaymentRecord>> {
        self.conn
            .prepare_cached(MADE_BY_ID_SQL)?
            .query_row(params![payer.bank, payer.user, payment_id], payment_from_row)
            .optional()
    }

    /// The payment with this 2PC transaction id, if any.
    pub fn find_txn(&self, txn_id: &str) -> rusqlite::Result<Option<PaymentRecord>> {
        self.conn
            .prepare_cached(&format!("SELECT {PAYMENT_COLUMNS} FROM payments WHERE txn_id = ?1"))?
            .query_row([txn_id], payment_from_row)
            .optional()
    }

    /// Records a new payment as `preparing`. Returns the existing record
    /// instead when the customer already used this payment id.
    ///
    /// One statement, so no savepoint: the insert either happens whole or,
    /// when the id is taken (the UNIQUE index says so), not at all.
    pub fn begin_payment(&mut self, p: &PaymentRecord) -> rusqlite::Result<Result<(), PaymentRecord>> {
        let inserted = self
            .conn
            .prepare_cached(&format!(
                "INSERT INTO payments (rowid, {PAYMENT_COLUMNS})
                 VALUES (?15, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
            ))?
            .execute(params![
                p.txn_id,
                p.payment_id,
                p.payer.user,
                p.payer.bank,
                p.payee.user,
                p.payee.bank,
                p.amount_minor,
                p.state.as_str(),
                p.reason.map(DeclineReason::code),
                i64::from(p.acked),
                p.created_at_ms,
                p.deadline_at_ms,
                p.fingerprint,
                i64::from(p.one_phase),
                self.next_row,
            ]);
        match inserted {
            Ok(_) => {
                self.begun_in_batch.push(p.txn_id.clone());
                let row = self.next_row;
                self.next_row += 1;
                self.folding.after_row(&self.conn, row);
                Ok(Ok(()))
            }
            Err(rusqlite::Error::SqliteFailure(e, msg))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                match self.find_payment(&p.payer, &p.payment_id)? {
                    Some(existing) => Ok(Err(existing)),
                    None => Err(rusqlite::Error::SqliteFailure(e, msg)),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Writes the decision durably. Only a `preparing` payment can be
    /// decided; returns the state the payment ends up in, which is the
    /// earlier decision if there was one. One conditional update: no
    /// savepoint needed.
    pub fn decide(
        &mut self,
        txn_id: &str,
        outcome: PaymentState,
        reason: Option<DeclineReason>,
    ) -> rusqlite::Result<PaymentState> {
        assert_ne!(outcome, PaymentState::Preparing, "a decision is commit or abort");
        let changed = self
            .conn
            .prepare_cached(
                "UPDATE payments SET state = ?2, reason = ?3, decided_at = ?4 WHERE txn_id = ?1 AND state = 'preparing'",
            )?
            .execute(params![txn_id, outcome.as_str(), reason.map(DeclineReason::code), now_ms()])?;
        if changed == 1 {
            self.lost_begins.remove(txn_id);
            return Ok(outcome);
        }
        let current: Option<String> = self
            .conn
            .prepare_cached("SELECT state FROM payments WHERE txn_id = ?1")?
            .query_row([txn_id], |r| r.get(0))
            .optional()?;
        match (current, self.lost_begins.remove(txn_id)) {
            (Some(current), _) => PaymentState::parse(&current),
            // Its batch failed after the record was answered: no record
            // means abort (the banks learn it by inquiry); say why.
            (None, Some(failure)) => {
                Err(failure
                    .to_sqlite(&format!("payment {txn_id} was not recorded: its batch failed to commit")))
            }
            (None, None) => Err(rusqlite::Error::QueryReturnedNoRows),
        }
    }

    /// Records the decision a one-phase payment's bank made, and that it
    /// needs nothing more (acknowledged), if the payment is still
    /// `preparing`. One conditional update.
    pub fn record_outcome(
        &mut self,
        txn_id: &str,
        outcome: PaymentState,
        reason: Option<DeclineReason>,
    ) -> rusqlite::Result<()> {
        assert_ne!(outcome, PaymentState::Preparing, "an outcome is commit or abort");
        self.conn
            .prepare_cached(
                "UPDATE payments SET state = ?2, reason = ?3, decided_at = ?4, acked = 1
                 WHERE txn_id = ?1 AND state = 'preparing'",
            )?
            .execute(params![txn_id, outcome.as_str(), reason.map(DeclineReason::code), now_ms()])?;
        Ok(())
    }

    pub fn mark_acked(&mut self, txn_id: &str) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached("UPDATE payments SET acked = 1 WHERE txn_id = ?1 AND state != 'preparing'")?
            .execute([txn_id])?;
        Ok(())
    }

    /// Decided payments whose decision some bank may not have applied yet.
    pub fn unfinished(&self, limit: u32) -> rusqlite::Result<Vec<PaymentRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {PAYMENT_COLUMNS} FROM payments WHERE acked = 0 AND state != 'preparing'
             ORDER BY created_at LIMIT ?1"
        ))?;
        let rows = stmt.query_map([limit], payment_from_row)?;
        rows.collect()
    }

    /// Payments still `preparing` that began before `before_ms`.
    pub fn preparing_before(&self, before_ms: i64, limit: u32) -> rusqlite::Result<Vec<PaymentRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {PAYMENT_COLUMNS} FROM payments WHERE acked = 0 AND state = 'preparing' AND created_at < ?1
             ORDER BY created_at LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![before_ms, limit], payment_from_row)?;
        rows.collect()
    }

    /// One page of a customer's payments, sent (any outcome) and received
    /// (committed), newest first by `(created_at, txn_id)`; see
    /// [`crate::history`].
    pub fn list_payments(&self, who: &UserRef, q: &PageQuery) -> rusqlite::Result<PaymentPage> {
        crate::history::page(&self.conn, who, q)
    }

    /// The payment with this id that a customer made or received: the one
    /// they made if any (ids are scoped to the payer), else the newest
    /// committed one they received (several payers may have used the id).
    /// Two lookups in the unique index on `payment_id`.
    pub fn find_payment_for(
        &self,
        who: &UserRef,
        payment_id: &str,
    ) -> rusqlite::Result<Option<PaymentRecord>> {
        if let Some(made) = self.find_payment(who, payment_id)? {
            return Ok(Some(made));
        }
        self.conn
            .prepare_cached(RECEIVED_BY_ID_SQL)?
            .query_row(params![who.bank, who.user, payment_id], payment_from_row)
            .optional()
    }

    /// Adds timeline events (best-effort: the caller runs this lazily), one
    /// row for each payment's steps among them.
    pub fn record_events(&mut self, events: &[PaymentEvent]) -> rusqlite::Result<()> {
        let mut stmt = self
            .conn
            .prepare_cached("INSERT INTO payment_timeline (txn_id, last_at, steps) VALUES (?1, ?2, ?3)")?;
        let mut rest = events;
        while let Some(first) = rest.first() {
            let n = rest.iter().take_while(|e| e.txn_id == first.txn_id).count();
            let (row, after) = rest.split_at(n);
            let steps: Vec<(i64, &str, Option<&str>, &str)> =
                row.iter().map(|e| (e.at_ms, e.kind, e.bank.as_deref(), e.detail.as_str())).collect();
            let steps = serde_json::to_string(&steps)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            let last_at = row.iter().map(|e| e.at_ms).max().unwrap_or(0);
            stmt.execute(params![first.txn_id, last_at, steps])?;
            rest = after;
        }
        Ok(())
    }

    /// Writes this replica's heartbeat (the row of its boot id) at `now_ms`,
    /// and deletes the rows of replicas silent since
    /// [`crate::cluster::REPLICA_FORGET_MS`].
    pub fn heartbeat(&mut self, beat: &Heartbeat, now_ms: i64) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO gateway_replicas (boot_id, address, admin_address, started_at, heartbeat_at, report) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (boot_id) DO UPDATE SET address = excluded.address, \
                 admin_address = excluded.admin_address, heartbeat_at = excluded.heartbeat_at, report = excluded.report",
            )?
            .execute(params![beat.boot_id, beat.address, beat.admin_address, beat.started_at_ms, now_ms, beat.report])?;
        self.conn
            .prepare_cached("DELETE FROM gateway_replicas WHERE heartbeat_at < ?1")?
            .execute(params![now_ms.saturating_sub(crate::cluster::REPLICA_FORGET_MS)])?;
        Ok(())
    }

    /// The replicas' heartbeats, the most recent first, at most `limit`.
    pub fn replicas(&self, now_ms: i64, limit: u32) -> rusqlite::Result<Vec<ReplicaRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT boot_id, address, admin_address, started_at, heartbeat_at, report FROM gateway_replicas \
             ORDER BY heartbeat_at DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit], |r| {
            Ok(ReplicaRow {
                beat: Heartbeat {
                    boot_id: r.get(0)?,
                    address: r.get(1)?,
                    admin_address: r.get(2)?,
                    started_at_ms: r.get(3)?,
                    report: r.get(5)?,
                },
                age_ms: now_ms.saturating_sub(r.get(4)?).max(0),
            })
        })?;
        rows.collect()
    }

    /// A payment's timeline, in time order.
    pub fn payment_events(&self, txn_id: &str) -> rusqlite::Result<Vec<PaymentEvent>> {
        // Every row holds at least one step: the first rows are enough.
        let mut stmt = self
            .conn
            .prepare_cached("SELECT steps FROM payment_timeline WHERE txn_id = ?1 ORDER BY rowid LIMIT ?2")?;
        let mut events = Vec::new();
        for steps in stmt.query_map(params![txn_id, EVENTS_PER_PAYMENT_MAX], |r| r.get::<_, String>(0))? {
            let steps: Vec<(i64, String, Option<String>, String)> =
                serde_json::from_str(&steps?).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
                })?;
            events.extend(steps.into_iter().map(|(at_ms, kind, bank, detail)| PaymentEvent {
                txn_id: txn_id.to_owned(),
                at_ms,
                kind: PaymentEvent::kind_of(&kind),
                bank,
                detail,
            }));
        }
        // In time order, then as written (a stable sort).
        events.sort_by_key(|e| e.at_ms);
        events.truncate(EVENTS_PER_PAYMENT_MAX as usize);
        Ok(events)
    }

    /// The newest payments matching `filter`, strictly older than `before`
    /// by `(created_at, txn_id)`, at most `limit`.
    pub fn recent_payments(
        &self,
        filter: &PaymentFilter,
        before: Option<&Cursor>,
        limit: u32,
    ) -> rusqlite::Result<Vec<PaymentRecord>> {
        let upper = before.map_or((i64::MAX, String::new()), |c| (c.created_at_ms, c.txn_id.clone()));
        match filter {
            PaymentFilter::All => {
                // By transaction id, time-ordered (UUID v7): the primary key,
                // no index of its own on the write path.
                let txn = if upper.1.is_empty() { "~".to_owned() } else { upper.1 };
                let mut stmt = self.conn.prepare_cached(&format!(
                    "SELECT {PAYMENT_COLUMNS} FROM payments WHERE txn_id < ?1 ORDER BY txn_id DESC LIMIT ?2"
                ))?;
                let rows = stmt.query_map(params![txn, limit], payment_from_row)?;
                rows.collect()
            }
            PaymentFilter::PaymentId(id) => {
                let mut stmt = self.conn.prepare_cached(&format!(
                    "SELECT {PAYMENT_COLUMNS} FROM payments INDEXED BY payments_by_id \
                     WHERE payment_id = ?1 AND (created_at, txn_id) < (?2, ?3) \
                     ORDER BY created_at DESC, txn_id DESC LIMIT ?4"
                ))?;
                let rows = stmt.query_map(params![id, upper.0, upper.1, limit], payment_from_row)?;
                rows.collect()
            }
        }
    }

    /// Every payment, oldest first.
    pub fn all_payments(&self) -> rusqlite::Result<Vec<PaymentRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {PAYMENT_COLUMNS} FROM payments ORDER BY created_at"))?;
        let rows = stmt.query_map([], payment_from_row)?;
        rows.collect()
    }

    /// At most `limit` payments by transaction id, after `after`: the audit
    /// reads a log of any size this way, a page at a time (the primary key
    /// index), in bounded memory.
    pub fn payments_after(&self, after: Option<&str>, limit: u32) -> rusqlite::Result<Vec<PaymentRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {PAYMENT_COLUMNS} FROM payments WHERE txn_id > ?1 ORDER BY txn_id LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![after.unwrap_or(""), limit], payment_from_row)?;
        rows.collect()
    }

    /// Deletes login counts idle since `idle_before_ms` and not locked.
    pub fn prune_logins(&mut self, idle_before_ms: i64) -> rusqlite::Result<usize> {
        self.conn
            .prepare_cached("DELETE FROM login_throttle WHERE last_failure_at < ?1 AND locked_until < ?1")?
            .execute([idle_before_ms])
    }

    /// Deletes at most `limit` timelines whose latest step is before
    /// `before_ms` (through their `last_at` index).
    pub fn prune_timelines(&mut self, before_ms: i64, limit: u32) -> rusqlite::Result<usize> {
        self.conn.prepare_cached(PRUNE_TIMELINES_SQL)?.execute(params![before_ms, limit])
    }

    /// One step of pruning payments: among the `limit` payments stored
    /// after row `after` (rowid order: the order they began in), deletes
    /// the decided, acknowledged ones created before `before_ms`.
    ///
    /// The log has no index on `created_at` alone, and a `DELETE … WHERE
    /// created_at < ?` would read all of it, on the store's thread, while
    /// every payment waits (about 6 s for 10,000,000 payments). A step reads
    /// `limit` rows by rowid instead, and the walk stops at the first step
    /// that finds no payment older than the bound: payments are stored in
    /// the order they begin, so none older follows (but for one that began
    /// a few milliseconds before a later-stored one: the next prune takes it).
    pub fn prune_payments(&mut self, before_ms: i64, after: i64, limit: u32) -> rusqlite::Result<PruneStep> {
        let (last, seen, old): (Option<i64>, u32, u32) = self
            .conn
            .prepare_cached(PRUNE_STEP_SQL)?
            .query_row(params![before_ms, after, limit], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        let Some(last) = last else {
            return Ok(PruneStep { deleted: 0, next: None });
        };
        let deleted =
            self.conn.prepare_cached(PRUNE_PAYMENTS_SQL)?.execute(params![before_ms, after, last])?;
        // The folds of history entries whose payments are all gone go too
        // (a fold covers 4,096 rows: one goes every few steps).
        if deleted > 0 {
            strife_rpc::folds::drop_emptied(&self.conn, crate::history::LOG)?;
        }
        let next = (seen == limit && old > 0).then_some(last);
        Ok(PruneStep { deleted, next })
    }

    /// The login counts of `key` (a fresh entry when there are none).
    pub fn throttle_entry(&self, key: &str) -> rusqlite::Result<Entry> {
        Ok(self
            .conn
            .prepare_cached("SELECT failures, locks, locked_until FROM login_throttle WHERE key = ?1")?
            .query_row([key], |r| {
                Ok(Entry { failures: r.get(0)?, locks: r.get(1)?, locked_until_ms: r.get(2)? })
            })
            .optional()?
            .unwrap_or_default())
    }

    /// Counts one failed login of `key` by `rule`; returns the new entry.
    /// Read and write are in one transaction of the group-commit thread.
    pub fn throttle_failure(&mut self, key: &str, rule: Rule, now_ms: i64) -> rusqlite::Result<Entry> {
        let e = rule.after_failure(self.throttle_entry(key)?, now_ms);
        self.conn
            .prepare_cached(
                "INSERT INTO login_throttle (key, failures, locks, locked_until, last_failure_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (key) DO UPDATE SET failures = excluded.failures, locks = excluded.locks,
                     locked_until = excluded.locked_until, last_failure_at = excluded.last_failure_at",
            )?
            .execute(params![key, e.failures, e.locks, e.locked_until_ms, now_ms])?;
        Ok(e)
    }

    /// A successful login clears the key's failures (not its locks).
    pub fn throttle_success(&mut self, key: &str) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached("UPDATE login_throttle SET failures = 0 WHERE key = ?1 AND failures > 0")?
            .execute([key])?;
        Ok(())
    }

    /// Every known `(name, address)` of every bank's replicas, by name, the
    /// most recently registered address of a bank first.
    pub fn banks(&self) -> rusqlite::Result<Vec<(String, String)>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, address FROM banks ORDER BY name, registered_at DESC, address")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }

    /// Forgets that a replica of bank `name` registered from `address`.
    pub fn forget_bank(&mut self, name: &str, address: &str) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached("DELETE FROM banks WHERE name = ?1 AND address = ?2")?
            .execute(params![name, address])?;
        Ok(())
    }

    /// The cluster's id (schema version 5), made once with the store.
    pub fn cluster_id(&self) -> rusqlite::Result<String> {
        self.conn.query_row("SELECT id FROM cluster", [], |r| r.get(0))
    }

    /// Records that a replica of bank `name` registered from `address`,
    /// and drops addresses not registered for `BANK_ADDRESS_RETENTION_MS`
    /// (a bank's newest address stays, however old), and all but its newest
    /// [`crate::backend::BANK_ADDRESSES_MAX`].
    pub fn save_bank(&mut self, name: &str, address: &str) -> rusqlite::Result<()> {
        let now = now_ms();
        self.conn
            .prepare_cached(
                "INSERT INTO banks (name, address, registered_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name, address) DO UPDATE SET registered_at = excluded.registered_at",
            )?
            .execute(params![name, address, now])?;
        self.conn
            .prepare_cached(
                "DELETE FROM banks WHERE registered_at < ?1
                   AND registered_at < (SELECT MAX(newest.registered_at) FROM banks AS newest
                                        WHERE newest.name = banks.name)",
            )?
            .execute([now.saturating_sub(BANK_ADDRESS_RETENTION_MS)])?;
        self.conn
            .prepare_cached(
                "DELETE FROM banks WHERE name = ?1 AND address NOT IN (
                     SELECT address FROM banks WHERE name = ?1 ORDER BY registered_at DESC, address LIMIT ?2)",
            )?
            .execute(params![name, crate::backend::BANK_ADDRESSES_MAX])?;
        Ok(())
    }

    pub fn revoke(&mut self, jti: &str, expires_at: i64) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached("INSERT OR IGNORE INTO revoked_tokens (jti, expires_at) VALUES (?1, ?2)")?
            .execute(params![jti, expires_at])?;
        Ok(())
    }

    /// Revoked tokens that have not expired yet (older ones are deleted).
    pub fn revoked(&mut self, now_secs: i64) -> rusqlite::Result<Vec<String>> {
        self.conn.prepare_cached("DELETE FROM revoked_tokens WHERE expires_at < ?1")?.execute([now_secs])?;
        let mut stmt = self.conn.prepare_cached("SELECT jti FROM revoked_tokens")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect()
    }

    /// Aborts every two-phase payment still `preparing`: after a restart
    /// nobody is driving them, and under presumed abort that is always safe
    /// (the restart rule of `strife_twopc::coordinator::on_restart`). A
    /// one-phase payment is left for the deadline sweep, which asks its
    /// bank (`on_abandoned`): the bank may have committed it. Returns how
    /// many were aborted.
    pub fn abort_all_preparing(&mut self) -> rusqlite::Result<usize> {
        self.conn.prepare_cached(ABORT_PREPARING_SQL)?.execute([now_ms()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    /// A directory for one test's database, removed at the end.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("strife-gw-store-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp dir");
            TempDir(dir)
        }
        fn db(&self) -> PathBuf {
            self.0.join("gateway.db")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn user(text: &str) -> UserRef {
        text.parse().expect("user@bank")
    }

    /// A UUID-shaped id from a number (`n < 2^48`): ordered like the
    /// number, and quick to make (the fill below makes a million).
    fn uuid_of(n: u64) -> String {
        format!("01990000-0000-7000-8000-{n:012x}")
    }

    fn payment(txn_id: String, payment_id: String, payer: &UserRef, payee: &UserRef) -> PaymentRecord {
        PaymentRecord {
            txn_id,
            payment_id,
            payer: payer.clone(),
            payee: payee.clone(),
            amount_minor: 100,
            state: PaymentState::Committed,
            reason: None,
            acked: true,
            created_at_ms: 1_000,
            deadline_at_ms: 2_000,
            fingerprint: vec![0; 32],
            one_phase: false,
        }
    }

    fn insert(s: &mut Store, p: &PaymentRecord) {
        s.begin_payment(p).expect("insert").expect("a new payment");
    }

    /// The query plan of `sql`, one detail line per step.
    fn plan(s: &Store, sql: &str) -> String {
        let mut stmt = s.conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).expect("explain");
        let nulls = vec![rusqlite::types::Null; stmt.parameter_count()];
        let rows =
            stmt.query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3)).expect("plan");
        rows.collect::<rusqlite::Result<Vec<_>>>().expect("plan rows").join("\n")
    }

    fn payment_indexes(conn: &Connection) -> BTreeSet<String> {
        let mut stmt = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'payments'")
            .expect("indexes");
        let rows = stmt.query_map([], |r| r.get(0)).expect("indexes");
        rows.collect::<rusqlite::Result<_>>().expect("index names")
    }

    /// A `preparing` record answered before its batch commits, and lost
    /// when that commit fails: deciding it says why (the batch's cause),
    /// not "no rows", and writes nothing.
    #[test]
    fn deciding_a_payment_whose_batch_failed_names_the_failure() {
        use strife_rpc::group_commit::Batched;
        use strife_rpc::storage::{StorageCause, StorageFailure};
        let dir = TempDir::new("lost-begin");
        let mut s = Store::open(&dir.db()).expect("open");
        let (a, b) = (user("a@BankA"), user("b@BankB"));
        let p = PaymentRecord {
            state: PaymentState::Preparing,
            acked: false,
            ..payment(uuid_of(1), uuid_of(2), &a, &b)
        };
        s.begin().expect("begin");
        insert(&mut s, &p);
        let full = StorageFailure::new(StorageCause::DiskFull, "database or disk is full (gateway.db)");
        s.rollback(&full);
        let e = s.decide(&p.txn_id, PaymentState::Committed, None).expect_err("no record to decide");
        assert_eq!(StorageCause::of(&e), StorageCause::DiskFull, "{e}");
        assert!(e.to_string().contains("gateway.db") && e.to_string().contains(&p.txn_id), "{e}");
        assert_eq!(s.find_txn(&p.txn_id).expect("find"), None, "nothing written");
        // Asked again, the payment is simply unknown.
        let again = s.decide(&p.txn_id, PaymentState::Aborted, None).expect_err("still no record");
        assert!(matches!(again, rusqlite::Error::QueryReturnedNoRows), "{again}");
        // A payment whose batch commits is decided as usual.
        let q = PaymentRecord {
            state: PaymentState::Preparing,
            acked: false,
            ..payment(uuid_of(3), uuid_of(4), &a, &b)
        };
        s.begin().expect("begin");
        insert(&mut s, &q);
        s.commit().expect("commit");
        assert_eq!(
            s.decide(&q.txn_id, PaymentState::Committed, None).expect("decide"),
            PaymentState::Committed
        );
        assert!(s.lost_begins.is_empty() && s.begun_in_batch.is_empty());
    }

    /// Every page of every customer, read through the folds, is exactly the
    /// page the definition gives (their sent payments and their committed
    /// received ones, by `(created_at, txn_id)` descending, within the
    /// bounds), on a seeded random log: folds of 7 payments, clocks out of
    /// order and tied, decisions after the fold, a batch with a fold rolled
    /// back, pruning, and a reopen that folds what was left.
    #[test]
    fn pages_read_through_the_folds_are_the_pages_of_the_definition() {
        use strife_core::rng::SplitMix64;
        use strife_rpc::group_commit::Batched;
        let seed = strife_core::rng::seed_from_env("STRIFE_FOLD_SEED");
        let mut rng = SplitMix64(seed);
        let dir = TempDir::new("folds");
        const FOLD: i64 = 7;
        let mut s = Store::open_folding(&dir.db(), FOLD).expect("open");
        let people: Vec<UserRef> =
            ["a@BankA", "b@BankA", "c@BankB", "d@BankB", "e@BankC"].iter().map(|t| user(t)).collect();
        let n = std::cell::Cell::new(0_u64);
        let add = |s: &mut Store, rng: &mut SplitMix64| {
            let n = n.replace(n.get() + 1);
            let payer = &people[rng.below(5) as usize];
            let mut payee = &people[rng.below(5) as usize];
            if payee == payer {
                payee = &people[(people.iter().position(|p| p == payer).expect("one") + 1) % 5];
            }
            let state = match rng.below(3) {
                0 => PaymentState::Preparing,
                1 => PaymentState::Aborted,
                _ => PaymentState::Committed,
            };
            // Clocks that step back and tie.
            let created_at_ms = 1_000 + (n / 4) as i64 - rng.below(6) as i64;
            insert(
                s,
                &PaymentRecord { state, created_at_ms, ..payment(uuid_of(n), uuid_of(n), payer, payee) },
            );
        };
        let check = |s: &Store, rng: &mut SplitMix64, label: &str| {
            let all = s.all_payments().expect("all");
            for who in &people {
                let mut mine: Vec<&PaymentRecord> = all
                    .iter()
                    .filter(|p| p.payer == *who || (p.payee == *who && p.state == PaymentState::Committed))
                    .collect();
                mine.sort_by(|a, b| (b.created_at_ms, &b.txn_id).cmp(&(a.created_at_ms, &a.txn_id)));
                let bounds =
                    [(None, None), (Some(1_010), None), (None, Some(1_040)), (Some(1_005), Some(1_030))];
                for (start_ms, end_ms) in bounds {
                    let want: Vec<&str> = mine
                        .iter()
                        .filter(|p| start_ms.is_none_or(|t| p.created_at_ms >= t))
                        .filter(|p| end_ms.is_none_or(|t| p.created_at_ms < t))
                        .map(|p| p.txn_id.as_str())
                        .collect();
                    let limit = 1 + rng.below(9) as u32;
                    let (mut seen, mut after) = (Vec::new(), None);
                    loop {
                        let q = PageQuery { limit, after: after.clone(), start_ms, end_ms };
                        let page = s.list_payments(who, &q).expect("page");
                        assert!(page.payments.len() <= limit as usize);
                        seen.extend(page.payments.iter().map(|p| p.txn_id.clone()));
                        match page.next {
                            Some(next) => after = Some(next),
                            None => break,
                        }
                    }
                    assert_eq!(
                        seen, want,
                        "{label}: {who} from {start_ms:?} to {end_ms:?} by {limit} (seed {seed})"
                    );
                }
            }
        };
        for _ in 0..80 {
            add(&mut s, &mut rng);
        }
        check(&s, &mut rng, "80 payments");
        // Decisions after the fold show on the payee's pages.
        for m in 0..n.get() {
            if rng.below(2) == 0 {
                s.decide(&uuid_of(m), PaymentState::Committed, None).expect("decide");
            }
        }
        check(&s, &mut rng, "decided");
        // A batch that folds, rolled back: as if it never happened.
        let folded = strife_rpc::folds::folded(&s.conn).expect("folded");
        s.begin().expect("begin");
        for _ in 0..FOLD {
            add(&mut s, &mut rng);
        }
        assert!(strife_rpc::folds::folded(&s.conn).expect("folded").fold > folded.fold, "the batch folded");
        s.rollback(&StorageFailure::new(strife_rpc::storage::StorageCause::DiskFull, "test"));
        assert_eq!(strife_rpc::folds::folded(&s.conn).expect("folded"), folded);
        check(&s, &mut rng, "rolled back");
        for _ in 0..120 {
            add(&mut s, &mut rng);
        }
        check(&s, &mut rng, "200 payments");
        // Pruning the older half drops the folds that held only those.
        s.conn
            .execute_batch("UPDATE payments SET state = 'aborted' WHERE state = 'preparing'; UPDATE payments SET acked = 1")
            .expect("decide and acknowledge all");
        let folds_before: i64 =
            s.conn.query_row("SELECT count(*) FROM history_folds", [], |r| r.get(0)).expect("count");
        let mut after = 0;
        while let Some(next) = s.prune_payments(1_025, after, 4).expect("prune").next {
            after = next;
        }
        let folds_after: i64 =
            s.conn.query_row("SELECT count(*) FROM history_folds", [], |r| r.get(0)).expect("count");
        assert!(folds_after < folds_before, "{folds_after} of {folds_before} folds left");
        check(&s, &mut rng, "pruned");
        // Pruned empty, the next payments are numbered past every fold.
        after = 0;
        while let Some(next) = s.prune_payments(i64::MAX, after, 4).expect("prune").next {
            after = next;
        }
        assert!(s.all_payments().expect("all").is_empty());
        drop(s);
        let mut s = Store::open_folding(&dir.db(), FOLD).expect("reopen");
        for _ in 0..30 {
            add(&mut s, &mut rng);
        }
        check(&s, &mut rng, "after pruning everything and a reopen");
        // A log left unfolded (a fold per 1,000 rows) is folded by 7s when
        // opened again.
        drop(s);
        let mut s = Store::open_folding(&dir.db(), 1_000).expect("reopen");
        for _ in 0..50 {
            add(&mut s, &mut rng);
        }
        drop(s);
        let s = Store::open_folding(&dir.db(), FOLD).expect("reopen");
        let left = strife_rpc::folds::last_row(&s.conn, crate::history::LOG).expect("last")
            - strife_rpc::folds::folded(&s.conn).expect("f").last_row;
        assert!(left < FOLD, "{left} rows left unfolded");
        check(&s, &mut rng, "folded at open");
    }

    #[test]
    fn pages_and_lookups_use_the_indexes_and_never_sort_or_scan() {
        let dir = TempDir::new("plan");
        let mut s = Store::open(&dir.db()).expect("open");
        let check = |s: &Store| {
            // The payments since the last fold: a range of rowids (at most a
            // fold's worth, which it sorts), never the whole log.
            let recent = plan(s, &crate::history::PAGE_RECENT_SQL);
            assert!(recent.contains("SEARCH payments USING INTEGER PRIMARY KEY (rowid>?)"), "{recent}");
            assert!(!recent.contains("SCAN payments"), "{recent}");
            // A fold's entries of one customer: a range of its key, in page
            // order, and each payment by its rowid.
            let fold = plan(s, &crate::history::PAGE_FOLD_SQL);
            assert!(
                fold.contains(
                    "SEARCH e USING PRIMARY KEY (fold=? AND party=? AND at>? AND (at,txn_id)<(?,?))"
                ),
                "{fold}"
            );
            assert!(fold.contains("SEARCH p USING INTEGER PRIMARY KEY (rowid=?)"), "{fold}");
            assert!(!fold.contains("TEMP B-TREE"), "a fold's entries are never sorted: {fold}");
            assert!(!fold.contains("SCAN"), "{fold}");
            let made = plan(s, MADE_BY_ID_SQL);
            assert!(
                made.contains("USING INDEX payments_by_id (payment_id=? AND payer_bank=? AND payer_user=?)"),
                "{made}"
            );
            let received = plan(s, RECEIVED_BY_ID_SQL);
            // (It sorts the payments that share the id, a handful at most.)
            assert!(received.contains("USING INDEX payments_by_id (payment_id=?)"), "{received}");
            assert!(!received.contains("SCAN payments"), "{received}");
        };
        check(&s);
        // Statistics from ANALYZE do not move the plan either.
        let (a, b) = (user("a@BankA"), user("b@BankB"));
        for n in 0..2_000 {
            let (payer, payee) = if n % 2 == 0 { (&a, &b) } else { (&b, &a) };
            insert(
                &mut s,
                &PaymentRecord {
                    created_at_ms: n,
                    ..payment(uuid_of(n as u64), uuid_of(n as u64), payer, payee)
                },
            );
        }
        s.conn.execute_batch("ANALYZE").expect("analyze");
        check(&s);
    }

    /// The schema as the gateway created it before versioning, copied
    /// verbatim from that version (not from `SCHEMA_V1`): what a database
    /// in the field has.
    const OLD_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS payments (
    txn_id       TEXT PRIMARY KEY,
    payment_id   TEXT NOT NULL,
    payer_user   TEXT NOT NULL,
    payer_bank   TEXT NOT NULL,
    payee_user   TEXT NOT NULL,
    payee_bank   TEXT NOT NULL,
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    -- SHA-256 of the canonical request (payer, payee, amount): the
    -- idempotency check compares it before naming the fields that differ
    fingerprint  BLOB NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('preparing', 'committed', 'aborted')),
    reason       TEXT,
    -- 1 once every bank involved acknowledged the decision
    acked        INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL,
    deadline_at  INTEGER NOT NULL,
    decided_at   INTEGER,
    -- the idempotency key is scoped to the paying customer
    UNIQUE (payer_bank, payer_user, payment_id)
) STRICT;
CREATE INDEX IF NOT EXISTS payments_by_payee ON payments (payee_bank, payee_user, created_at);
CREATE INDEX IF NOT EXISTS payments_by_payer ON payments (payer_bank, payer_user, created_at);
CREATE INDEX IF NOT EXISTS payments_unfinished ON payments (state) WHERE acked = 0;
CREATE TABLE IF NOT EXISTS banks (
    name          TEXT PRIMARY KEY,
    address       TEXT NOT NULL,
    registered_at INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS revoked_tokens (
    jti        TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
) STRICT;
";

    /// Every row of every table, in a fixed order, as text.
    fn dump(conn: &Connection) -> Vec<String> {
        let mut out = Vec::new();
        for (table, order) in [("payments", "txn_id"), ("banks", "name"), ("revoked_tokens", "jti")] {
            let mut stmt = conn.prepare(&format!("SELECT * FROM {table} ORDER BY {order}")).expect("dump");
            let width = stmt.column_count();
            let rows = stmt
                .query_map([], |r| {
                    let cells: Vec<String> = (0..width)
                        .map(|i| r.get::<_, rusqlite::types::Value>(i).map(|v| format!("{v:?}")))
                        .collect::<rusqlite::Result<_>>()?;
                    Ok(format!("{table}: {}", cells.join(", ")))
                })
                .expect("dump rows");
            out.extend(rows.collect::<rusqlite::Result<Vec<_>>>().expect("dump rows"));
        }
        out
    }

    /// A database as the gateway of schema `version` left it, empty.
    fn database_at_version(dir: &TempDir, version: usize) -> Connection {
        let old = Connection::open(dir.db()).expect("old db");
        old.pragma_update(None, "journal_mode", "WAL").expect("wal");
        for sql in MIGRATIONS[..version].iter().flat_map(|v| v.iter()) {
            old.execute_batch(sql).expect("old schema");
        }
        old.pragma_update(None, "user_version", version as i64).expect("old version");
        old
    }

    fn user_version(conn: &Connection) -> i64 {
        conn.pragma_query_value(None, "user_version", |r| r.get(0)).expect("user_version")
    }

    fn schema(conn: &Connection) -> Vec<(String, Option<String>)> {
        let mut stmt = conn.prepare("SELECT name, sql FROM sqlite_master ORDER BY name").expect("schema");
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).expect("schema");
        rows.collect::<rusqlite::Result<_>>().expect("schema rows")
    }

    #[test]
    fn a_database_made_by_the_previous_gateway_keeps_its_data_and_gains_the_new_indexes() {
        let dir = TempDir::new("migrate");
        let old = Connection::open(dir.db()).expect("old db");
        old.pragma_update(None, "journal_mode", "WAL").expect("wal");
        old.execute_batch(OLD_SCHEMA).expect("old schema");
        let (a, b, c) = (user("a@BankA"), user("b@BankB"), user("c@BankA"));
        let rows = [
            (1, 10, &a, &b, "committed", Some(1_010), 1),
            (2, 10, &b, &a, "committed", Some(1_020), 1), // the same id, another payer
            (3, 11, &a, &c, "aborted", Some(1_030), 0),
            (4, 12, &c, &a, "preparing", None, 0),
        ];
        for (txn, id, payer, payee, state, decided, acked) in rows {
            old.execute(
                "INSERT INTO payments (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank,
                     amount_minor, fingerprint, state, reason, acked, created_at, deadline_at, decided_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 250, zeroblob(32), ?7, NULL, ?8, ?9, ?10, ?11)",
                params![
                    uuid_of(txn),
                    uuid_of(id),
                    payer.user,
                    payer.bank,
                    payee.user,
                    payee.bank,
                    state,
                    acked,
                    1_000 + txn as i64,
                    9_000,
                    decided
                ],
            )
            .expect("old row");
        }
        old.execute_batch(
            "INSERT INTO banks VALUES ('BankA', '127.0.0.1:1', 5);
             INSERT INTO revoked_tokens VALUES ('jti-1', 99999999999);",
        )
        .expect("old rows");
        let before = dump(&old);
        let indexes_before = payment_indexes(&old);
        assert_eq!(user_version(&old), 0);
        drop(old);

        let mut s = Store::open(&dir.db()).expect("migrate");
        assert_eq!(user_version(&s.conn), MIGRATIONS.len() as i64);
        // Version 8 adds `one_phase`: every old payment is two-phase (0).
        let before: Vec<String> = before
            .into_iter()
            .map(|row| if row.starts_with("payments:") { format!("{row}, Integer(0)") } else { row })
            .collect();
        assert_eq!(dump(&s.conn), before, "every row of every table kept as it was");
        let indexes_after = payment_indexes(&s.conn);
        assert_eq!(indexes_before.len(), 5, "{indexes_before:?}");
        assert_eq!(
            indexes_after.len(),
            indexes_before.len() - 2,
            "the payer and payee indexes gave way to the history folds, and nothing else is added: {indexes_after:?}"
        );
        assert!(!indexes_after.contains("payments_by_payer"), "{indexes_after:?}");
        assert!(indexes_after.contains("payments_by_id"), "{indexes_after:?}");
        let check: String = s.conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).expect("check");
        assert_eq!(check, "ok");
        // The state CHECK is a chain of comparisons: no temporary b-tree per
        // insert or decision (strife_rpc::sqlite::state_check_as_comparisons).
        let definition: String = s
            .conn
            .query_row("SELECT sql FROM sqlite_schema WHERE name = 'payments'", [], |r| r.get(0))
            .expect("sql");
        assert!(
            definition.contains("CHECK (state = 'preparing' OR state = 'committed' OR state = 'aborted')"),
            "{definition}"
        );

        // The idempotency key still holds, per payer.
        let replay = payment(uuid_of(50), uuid_of(10), &a, &b);
        assert_eq!(s.begin_payment(&replay).expect("begin").map_err(|p| p.txn_id), Err(uuid_of(1)));
        insert(&mut s, &payment(uuid_of(51), uuid_of(10), &c, &b));
        // And the new reads work on the old data.
        let page = s.list_payments(&a, &PageQuery { limit: 10, ..PageQuery::default() }).expect("list");
        let ids: Vec<String> = page.payments.into_iter().map(|p| p.txn_id).collect();
        assert_eq!(ids, [uuid_of(3), uuid_of(2), uuid_of(1)], "the preparing payment to a is not a's yet");
        assert_eq!(s.find_payment_for(&a, &uuid_of(10)).expect("find").map(|p| p.txn_id), Some(uuid_of(1)));
        drop(s);

        // Opening again migrates nothing; a new database gets the same schema.
        let s = Store::open(&dir.db()).expect("reopen");
        assert_eq!(user_version(&s.conn), MIGRATIONS.len() as i64);
        let fresh_dir = TempDir::new("migrate-fresh");
        let fresh = Store::open(&fresh_dir.db()).expect("fresh");
        assert_eq!(schema(&fresh.conn), schema(&s.conn), "migrated and new databases look alike");

        // A database from a newer gateway is refused, not guessed at.
        s.conn.pragma_update(None, "user_version", 99).expect("set version");
        drop(s);
        let err = Store::open(&dir.db()).err().expect("refused");
        assert!(err.to_string().contains("schema version 99"), "{err}");
    }

    /// A version-8 database's timeline (a row per step) becomes version 9's
    /// (a row per payment): every step kept, in its order, each payment's
    /// apart, and pruning still goes by the steps' time.
    #[test]
    fn a_version_8_timeline_keeps_every_step_packed() {
        let dir = TempDir::new("migrate-v8");
        let old = database_at_version(&dir, 8);
        // Two payments' steps, interleaved as they were written; two steps
        // of the first at one millisecond keep their written order.
        let steps = [
            (uuid_of(1), 10, "begin", None, ""),
            (uuid_of(2), 11, "begin", None, ""),
            (uuid_of(1), 12, "vote", Some("BankA"), "yes"),
            (uuid_of(1), 12, "vote", Some("BankB"), "no: INSUFFICIENT_FUNDS"),
            (uuid_of(2), 13, "transfer", Some("BankA"), "commit"),
            (uuid_of(1), 14, "decision", None, "abort: INSUFFICIENT_FUNDS"),
            (uuid_of(1), 15, "ack", Some("BankA"), "ok"),
        ];
        for (txn, at, kind, bank, detail) in &steps {
            old.execute(
                "INSERT INTO payment_events (txn_id, at, kind, bank, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![txn, at, kind, bank, detail],
            )
            .expect("old step");
        }
        drop(old);

        let mut s = Store::open(&dir.db()).expect("migrate");
        assert_eq!(user_version(&s.conn), MIGRATIONS.len() as i64);
        let rows: i64 =
            s.conn.query_row("SELECT COUNT(*) FROM payment_timeline", [], |r| r.get(0)).expect("rows");
        assert_eq!(rows, 2, "a row per payment");
        let read = |s: &Store, txn: &str| -> Vec<(i64, &'static str, Option<String>, String)> {
            s.payment_events(txn)
                .expect("timeline")
                .into_iter()
                .map(|e| (e.at_ms, e.kind, e.bank, e.detail))
                .collect()
        };
        for txn in [uuid_of(1), uuid_of(2)] {
            let want: Vec<_> = steps
                .iter()
                .filter(|(t, ..)| *t == txn)
                .map(|(_, at, kind, bank, detail)| {
                    (*at, *kind, bank.map(str::to_owned), (*detail).to_owned())
                })
                .collect();
            assert_eq!(read(&s, &txn), want, "{txn}");
        }
        // New steps of a payment add a row; the reads merge them in time order.
        s.record_events(&[PaymentEvent::new(&uuid_of(2), 16, "resolve", Some("BankA"), "commit".into())])
            .expect("more");
        assert_eq!(read(&s, &uuid_of(2)).last().map(|e| e.0), Some(16));
        // Pruning removes a row once its latest step is old.
        s.prune_timelines(16, PRUNE_STEP_ROWS).expect("prune");
        assert!(read(&s, &uuid_of(1)).is_empty(), "its last step was at 15");
        assert_eq!(read(&s, &uuid_of(2)).len(), 1, "the row of its step at 16 stays; the older row went");
        let check: String = s.conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).expect("check");
        assert_eq!(check, "ok");
    }

    /// A version-2 database (one address per bank) becomes version 3 (an
    /// address per replica): its banks are kept, a second address of a bank
    /// is a second row, and addresses not registered for a day are dropped
    /// unless they are their bank's newest.
    #[test]
    fn a_version_2_database_keeps_its_banks_and_holds_replicas() {
        let dir = TempDir::new("migrate-v2");
        let old = database_at_version(&dir, 2);
        old.execute_batch(
            "INSERT INTO banks VALUES ('BankB', '127.0.0.1:2', 7);
             INSERT INTO banks VALUES ('BankA', '127.0.0.1:1', 5);
             INSERT INTO revoked_tokens VALUES ('jti-1', 99999999999);",
        )
        .expect("old rows");
        let err = old
            .execute("INSERT INTO banks VALUES ('BankA', '127.0.0.1:3', 6)", [])
            .expect_err("version 2 keeps one address per bank");
        assert!(err.to_string().contains("UNIQUE"), "{err}");
        let before = dump(&old);
        drop(old);

        let mut s = Store::open(&dir.db()).expect("migrate");
        assert_eq!(user_version(&s.conn), MIGRATIONS.len() as i64);
        assert_eq!(dump(&s.conn), before, "every row of every table kept as it was");
        assert_eq!(
            s.banks().expect("banks"),
            [("BankA".to_owned(), "127.0.0.1:1".to_owned()), ("BankB".to_owned(), "127.0.0.1:2".to_owned())]
        );

        // A second replica of BankA; registering again adds no row.
        s.save_bank("BankA", "127.0.0.1:3").expect("save");
        s.save_bank("BankA", "127.0.0.1:3").expect("save again");
        let banks = s.banks().expect("banks");
        assert_eq!(
            banks,
            [("BankA".to_owned(), "127.0.0.1:3".to_owned()), ("BankB".to_owned(), "127.0.0.1:2".to_owned())],
            "BankA's address from time 5 is more than a day old; BankB's stays, being its newest"
        );
        s.conn.execute("UPDATE banks SET registered_at = ?1", [now_ms()]).expect("all fresh");
        s.save_bank("BankA", "127.0.0.1:1").expect("save");
        assert_eq!(s.banks().expect("banks").len(), 3, "fresh addresses are kept");
        let check: String = s.conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).expect("check");
        assert_eq!(check, "ok");
        drop(s);

        let fresh_dir = TempDir::new("migrate-v2-fresh");
        let fresh = Store::open(&fresh_dir.db()).expect("fresh");
        let s = Store::open(&dir.db()).expect("reopen");
        assert_eq!(schema(&fresh.conn), schema(&s.conn), "migrated and new databases look alike");
    }

    /// Version 5 gives a store its cluster id once: a database of version 4
    /// gets one as it migrates, keeps it on every open, and another store
    /// has its own.
    #[test]
    fn the_cluster_id_is_made_once_per_store() {
        let dir = TempDir::new("cluster-id");
        let old = Connection::open(dir.db()).expect("old db");
        for sql in MIGRATIONS[..4].iter().flat_map(|v| v.iter()) {
            old.execute_batch(sql).expect("schema up to v4");
        }
        old.pragma_update(None, "user_version", 4).expect("version 4");
        drop(old);
        let mut s = Store::open(&dir.db()).expect("migrate");
        let id = s.cluster_id().expect("id");
        assert!(uuid::Uuid::parse_str(&id).is_ok_and(|u| u.get_version_num() == 4), "{id}");
        s.save_bank("BankA", "127.0.0.1:1").expect("save");
        s.save_bank("BankA", "127.0.0.1:2").expect("save");
        s.forget_bank("BankA", "127.0.0.1:1").expect("forget");
        assert_eq!(s.banks().expect("banks"), [("BankA".to_owned(), "127.0.0.1:2".to_owned())]);
        drop(s);
        assert_eq!(Store::open(&dir.db()).expect("reopen").cluster_id().expect("id"), id);
        let other = TempDir::new("cluster-id-other");
        assert_ne!(Store::open(&other.db()).expect("another").cluster_id().expect("id"), id);
    }

    /// The median of `runs` timings of `f`.
    fn median_time(runs: usize, mut f: impl FnMut()) -> Duration {
        let mut times: Vec<Duration> = (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect();
        times.sort();
        times[runs / 2]
    }

    /// What a restart and a prune run on the store's thread reads only a
    /// part of the log, through an index, never all of it: at 10,000,000
    /// payments a scan held every payment up for about 6 s.
    #[test]
    fn restarts_and_prunes_read_no_whole_table() {
        let dir = TempDir::new("no-scans");
        let s = Store::open(&dir.db()).expect("open");
        for sql in [ABORT_PREPARING_SQL, PRUNE_TIMELINES_SQL, PRUNE_STEP_SQL, PRUNE_PAYMENTS_SQL] {
            let p = plan(&s, sql);
            assert!(
                !p.lines()
                    .any(|l| l.starts_with("SCAN payment") && !l.contains("USING INDEX payments_unfinished")),
                "{sql}:\n{p}"
            );
        }
    }

    /// Pruning walks the log a step at a time in the order payments began,
    /// deletes only finished payments older than the bound, and stops at
    /// the first step that finds none older: it never reads the rest of the
    /// log (the old `DELETE … WHERE created_at < ?` scanned all of it).
    #[test]
    fn pruning_walks_only_the_old_end_of_the_log() {
        let dir = TempDir::new("prune-steps");
        let mut s = Store::open(&dir.db()).expect("open");
        let (a, b) = (user("a@BankA"), user("b@BankB"));
        for n in 0..100_u64 {
            let p = PaymentRecord {
                created_at_ms: 1_000 + n as i64,
                // Payment 3 is not acknowledged yet, payment 5 undecided:
                // both stay, however old.
                acked: n != 3 && n != 5,
                state: if n == 5 { PaymentState::Preparing } else { PaymentState::Committed },
                ..payment(uuid_of(n), uuid_of(n), &a, &b)
            };
            insert(&mut s, &p);
        }
        let prune = |s: &mut Store, before_ms: i64| {
            let (mut steps, mut deleted, mut after) = (0, 0, 0);
            loop {
                let step = s.prune_payments(before_ms, after, 4).expect("step");
                steps += 1;
                deleted += step.deleted;
                match step.next {
                    Some(next) => after = next,
                    None => return (steps, deleted),
                }
            }
        };
        // Older than 1,010: payments 0 to 9, of which 3 and 5 stay. Steps
        // of 4: 0–3, 4–7, 8–11 (two old ones), then 12–15 has none: done,
        // 4 steps where the whole log is 25.
        assert_eq!(prune(&mut s, 1_010), (4, 8));
        let kept = |s: &Store, n: u64| s.find_txn(&uuid_of(n)).expect("find").is_some();
        assert!(kept(&s, 3) && kept(&s, 5) && kept(&s, 10) && kept(&s, 99));
        assert!(!kept(&s, 0) && !kept(&s, 9));
        // Everything older: all of the rest goes but 3 and 5, and the
        // walk reads to the end of the log.
        assert_eq!(prune(&mut s, i64::MAX).1, 90);
        assert!(kept(&s, 3) && kept(&s, 5) && !kept(&s, 99));
        assert_eq!(prune(&mut s, i64::MAX), (1, 0), "the two left are in one step");
    }

    /// One account with 1,000,000 payments (alternately sent and received,
    /// two per millisecond, every tenth declined): the first pages, a page
    /// in the middle (from a cursor) and a time-bounded page are exactly
    /// the expected entries. Prints the fill time and the first page's time
    /// fresh and at 1,000,000; timings are reported, not asserted (the
    /// query-plan test is the deterministic check).
    #[test]
    fn a_million_payments_of_one_account_page_correctly() {
        const COUNT: u64 = 1_000_000;
        const PAGE: u32 = strife_core::limits::HISTORY_PAGE_DEFAULT;
        let me = user("user1@BankA");
        let others = [user("user2@BankA"), user("user1@BankB"), user("user3@BankB")];
        let make = |n: u64| {
            let other = &others[(n % 3) as usize];
            let (payer, payee) = if n.is_multiple_of(2) { (&me, other) } else { (other, &me) };
            let state =
                if n % 10 == 3 || n % 10 == 4 { PaymentState::Aborted } else { PaymentState::Committed };
            PaymentRecord {
                state,
                created_at_ms: 1_700_000_000_000 + (n / 2) as i64,
                ..payment(uuid_of(n), uuid_of(n), payer, payee)
            }
        };
        // Received and declined (n % 10 == 3) is not listed.
        let listed = |n: u64| n % 10 != 3;
        let first_page = |s: &Store| {
            s.list_payments(&me, &PageQuery { limit: PAGE, ..PageQuery::default() }).expect("page")
        };

        let dir = TempDir::new("million");
        let mut s = Store::open(&dir.db()).expect("open");
        for n in 0..u64::from(PAGE) * 2 {
            insert(&mut s, &make(n));
        }
        let fresh = median_time(51, || drop(first_page(&s)));
        drop(s);
        let _ = std::fs::remove_dir_all(&dir.0);
        std::fs::create_dir_all(&dir.0).expect("dir");

        drop(Store::open(&dir.db()).expect("the schema"));
        let t = Instant::now();
        // Test-only, to fill fast: a connection of its own (the store is
        // closed) with no fsync and no journal (a fresh file), one
        // transaction, one prepared statement (every index maintained as on
        // the write path), a page cache that holds the indexes being
        // appended to; then the store is opened again with its own settings.
        let filler = Connection::open(dir.db()).expect("filler");
        filler.pragma_update(None, "synchronous", "OFF").expect("sync off");
        filler.pragma_update(None, "journal_mode", "OFF").expect("no journal");
        filler.pragma_update(None, "cache_size", -262_144).expect("cache");
        filler.execute_batch("BEGIN").expect("begin");
        {
            let mut fill = filler
                .prepare(
                    "INSERT INTO payments (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank,
                         amount_minor, fingerprint, state, acked, created_at, deadline_at, decided_at)
                     VALUES (?1, ?1, ?2, ?3, ?4, ?5, 100, zeroblob(32), ?6, 1, ?7, ?7, ?7)",
                )
                .expect("prepare");
            for n in 0..COUNT {
                let p = make(n);
                fill.execute(params![
                    p.txn_id,
                    p.payer.user,
                    p.payer.bank,
                    p.payee.user,
                    p.payee.bank,
                    p.state.as_str(),
                    p.created_at_ms
                ])
                .expect("fill");
            }
        }
        filler.execute_batch("COMMIT").expect("commit");
        filler.pragma_update(None, "journal_mode", "WAL").expect("wal");
        drop(filler);
        let s = Store::open(&dir.db()).expect("open");
        let fill = t.elapsed();

        let expected: Vec<String> = (0..COUNT).rev().filter(|&n| listed(n)).map(uuid_of).collect();
        let big = median_time(51, || drop(first_page(&s)));
        let mut cursor = None;
        for page_no in 0..3 {
            let q = PageQuery { limit: PAGE, after: cursor.clone(), ..PageQuery::default() };
            let page = s.list_payments(&me, &q).expect("page");
            let ids: Vec<String> = page.payments.iter().map(|p| p.txn_id.clone()).collect();
            let from = page_no * PAGE as usize;
            assert_eq!(ids, expected[from..from + PAGE as usize], "page {page_no}");
            cursor = page.next;
        }
        // A page from the middle, from a cursor.
        let mid = expected.len() / 2;
        let mid_row = s.find_txn(&expected[mid]).expect("find").expect("exists");
        let q = PageQuery { limit: PAGE, after: Some(Cursor::after(&mid_row)), ..PageQuery::default() };
        let middle = median_time(51, || drop(s.list_payments(&me, &q).expect("middle page")));
        let page = s.list_payments(&me, &q).expect("middle page");
        let ids: Vec<String> = page.payments.into_iter().map(|p| p.txn_id).collect();
        assert_eq!(ids, expected[mid + 1..mid + 1 + PAGE as usize]);
        // A time-bounded page in the middle: 10 ms hold 20 payments, 18 listed.
        let start_ms = mid_row.created_at_ms - 10;
        let q = PageQuery { limit: PAGE, start_ms: Some(start_ms), end_ms: Some(start_ms + 10), after: None };
        let page = s.list_payments(&me, &q).expect("bounded page");
        assert_eq!(page.next, None);
        let want: Vec<String> = (0..COUNT)
            .rev()
            .filter(|&n| listed(n) && (start_ms..start_ms + 10).contains(&make(n).created_at_ms))
            .map(uuid_of)
            .collect();
        assert_eq!(want.len(), 18);
        assert_eq!(page.payments.into_iter().map(|p| p.txn_id).collect::<Vec<_>>(), want);

        eprintln!(
            "paging at {COUNT} payments of one account: fill {:.1} s; first page of {PAGE} (median of 51): \
             fresh ({} payments) {:?}, at {COUNT} {:?}; a middle page {:?}",
            fill.as_secs_f64(),
            PAGE * 2,
            fresh,
            big,
            middle
        );
    }
}

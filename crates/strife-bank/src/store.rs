//! The bank's durable state in SQLite (WAL, `synchronous=FULL`): accounts and
//! one row per payment this bank takes part in (a *leg*). Every method is one
//! transaction; when it returns Ok, its effect is on disk.
//!
//! Money rules, checked here and again by CHECK constraints:
//! `0 <= held <= balance` and `balance + incoming <= BALANCE_MAX_MINOR`, so no
//! account can be overdrawn by any interleaving of prepares.

use crate::accounts::{AccountSpec, Credential, NewAccount, hash_password};
use crate::error::BankError;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use std::sync::Arc;
use strife_core::DeclineReason;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts (
    user          TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    balance_minor INTEGER NOT NULL CHECK (balance_minor >= 0),
    -- money on hold for prepared debits: not available, not yet gone
    held_minor    INTEGER NOT NULL DEFAULT 0 CHECK (held_minor >= 0 AND held_minor <= balance_minor),
    -- money of prepared credits: not yet here, but reserved against the maximum
    incoming_minor INTEGER NOT NULL DEFAULT 0 CHECK (incoming_minor >= 0),
    -- the balance the account was created with, for the audit's conservation check
    opening_minor INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS legs (
    txn_id       TEXT PRIMARY KEY,
    payment_id   TEXT NOT NULL,
    payer_user   TEXT NOT NULL,
    payer_bank   TEXT NOT NULL,
    payee_user   TEXT NOT NULL,
    payee_bank   TEXT NOT NULL,
    -- 0 only for an abort that arrived before (or instead of) its prepare
    amount_minor INTEGER NOT NULL CHECK (amount_minor >= 0),
    debit_user   TEXT,
    credit_user  TEXT,
    state        TEXT NOT NULL CHECK (state IN ('prepared', 'committed', 'aborted')),
    reason       TEXT,
    prepared_at  INTEGER NOT NULL,
    decided_at   INTEGER
) STRICT;
-- an account's legs are read through the folds of strife_rpc::folds (created
-- after this), not through a debit and a credit index that every leg wrote
-- into; a ledger from before folds loses those indexes and is folded at open
DROP INDEX IF EXISTS legs_by_debit;
DROP INDEX IF EXISTS legs_by_credit;
CREATE INDEX IF NOT EXISTS legs_open ON legs (state) WHERE state = 'prepared';
-- which ledger this is: one row, its id random and made once, when the
-- ledger is created (or first opened by a bank that knows ids); replicas of
-- a bank must serve the ledger of one id
CREATE TABLE IF NOT EXISTS ledger (
    only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
    id       TEXT NOT NULL
) STRICT;
";

use crate::ledger::{Funds, Ledger, check_leg, parse_state};
pub use crate::ledger::{Leg, LegRequest, LegState, Outcome, Totals, TransferRequest, Vote, state_name};
use strife_rpc::folds::{self, Folding, Log};
use strife_rpc::group_commit::{GroupCommit, GroupCommitError};
use strife_rpc::storage::StorageFailure;
use strife_twopc::Decision;
use strife_twopc::Vote as MachineVote;
use strife_twopc::participant::{self as machine, Effect, Force};

/// The legs stored since the last fold (rowid above `?3`) that are `?1`'s
/// and committed, newest first, at most `?2`: a range of rowids, at most a
/// fold's worth of rows.
const HISTORY_RECENT_SQL: &str = "
SELECT txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor, state, prepared_at
FROM legs NOT INDEXED
WHERE rowid > ?3 AND state = 'committed' AND (debit_user = ?1 OR credit_user = ?1)
ORDER BY prepared_at DESC, txn_id LIMIT ?2";

/// Fold `?3`'s committed legs of `?1`, newest first, at most `?2`: one
/// range of the fold's key, each leg by its rowid.
const HISTORY_FOLD_SQL: &str = "
SELECT l.txn_id, l.payment_id, l.payer_user, l.payer_bank, l.payee_user, l.payee_bank, l.amount_minor,
       l.state, l.prepared_at
FROM history_entries e CROSS JOIN legs l
WHERE e.fold = ?3 AND e.party = ?1 AND l.rowid = e.row AND l.txn_id = e.txn_id AND l.state = 'committed'
ORDER BY e.at DESC, e.txn_id LIMIT ?2";

/// The ledger in one SQLite file, owned by one thread (see
/// [`crate::ledger::Ledger`] and [`SqliteLedger`]).
pub struct Store {
    /// The only connection: SQLite serializes writers anyway, and one
    /// connection makes every method a plain serial transaction.
    conn: Connection,
    /// This bank's name, to tell which side of a leg is ours.
    bank: String,
    /// The ledger's id (see the `ledger` table).
    ledger_id: String,
    /// When to fold the legs for history: a batch that begins with a
    /// fold's worth waiting folds them.
    folding: Folding,
}

/// The legs, folded by the accounts they debit and credit (a fence, with
/// neither, has no entry). Legs are never deleted, so rowids only grow.
const LOG: Log = Log {
    table: "legs",
    rows: "SELECT rowid, debit_user, credit_user, prepared_at, txn_id FROM legs WHERE rowid > ?1 AND rowid <= ?2",
};

/// Group commit drives the store's one connection.
impl strife_rpc::sqlite::HasConnection for Store {
    fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// Folds the legs of earlier batches once a fold's worth is waiting,
    /// in this batch, under a savepoint (a failed fold is retried by the
    /// next batch and holds up no leg).
    fn began(&mut self) {
        if let Ok(last) = folds::last_row(&self.conn, LOG) {
            self.folding.after_row(&self.conn, last);
        }
    }

    fn rolled_back(&mut self, _failure: &StorageFailure) {
        self.folding.rolled_back(&self.conn);
    }
}

pub use strife_core::unix_ms as now_ms;

impl Store {
    pub fn open(path: &Path, bank: &str) -> Result<Store, BankError> {
        Store::open_folding(path, bank, folds::FOLD_ROWS)
    }

    /// [`Store::open`] with `fold_rows` legs per fold.
    fn open_folding(path: &Path, bank: &str, fold_rows: i64) -> Result<Store, BankError> {
        let mut conn = strife_rpc::sqlite::open_durable(path)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        strife_rpc::sqlite::state_check_as_comparisons(
            &mut conn,
            "legs",
            &["prepared", "committed", "aborted"],
        )?;
        conn.execute_batch(folds::SCHEMA)?;
        let folding = Folding::open(&mut conn, LOG, fold_rows)?;
        // The first open makes the id (of two at once, one wins); every
        // later one only reads it.
        let read = |conn: &Connection| conn.query_row("SELECT id FROM ledger", [], |r| r.get(0)).optional();
        let ledger_id = match read(&conn)? {
            Some(id) => id,
            None => {
                conn.execute(
                    "INSERT INTO ledger (only_row, id) VALUES (1, ?1) ON CONFLICT (only_row) DO NOTHING",
                    [uuid::Uuid::new_v4().to_string()],
                )?;
                read(&conn)?.ok_or_else(|| BankError::Internal("the ledger has no id".into()))?
            }
        };
        Ok(Store { conn, bank: bank.to_owned(), ledger_id, folding })
    }

    /// The ledger's id: random, made once when the ledger was created.
    pub fn ledger_id(&self) -> &str {
        &self.ledger_id
    }

    /// Creates each account that does not exist yet; never touches an
    /// existing one. Returns how many were created.
    pub fn create_accounts(&mut self, accounts: &[NewAccount]) -> anyhow::Result<usize> {
        let specs: Vec<AccountSpec> = accounts
            .iter()
            .map(|a| AccountSpec {
                user: a.user.clone(),
                credential: Credential::Password(a.password.clone()),
                balance_minor: a.balance_minor,
            })
            .collect();
        self.create_from_specs(&specs)
    }

    /// Creates each account that does not exist yet (hashing a plaintext
    /// password only then); never touches an existing one.
    pub fn create_from_specs(&mut self, accounts: &[AccountSpec]) -> anyhow::Result<usize> {
        let tx = strife_rpc::sqlite::Savepoint::new(&self.conn)?;
        let mut created = 0;
        for a in accounts {
            let exists: bool = tx
                .prepare_cached("SELECT EXISTS(SELECT 1 FROM accounts WHERE user = ?1)")?
                .query_row([&a.user], |r| r.get(0))?;
            if exists {
                continue;
            }
            let hash = match &a.credential {
                Credential::Password(p) => hash_password(p)?,
                Credential::Hash(h) => h.clone(),
            };
            tx.prepare_cached("INSERT INTO accounts (user, password_hash, balance_minor, opening_minor) VALUES (?1, ?2, ?3, ?3)")?.execute(params![a.user, hash, a.balance_minor])?;
            created += 1;
        }
        tx.commit()?;
        Ok(created)
    }

    pub fn account_count(&self) -> Result<u32, BankError> {
        Ok(self.conn.prepare_cached("SELECT COUNT(*) FROM accounts")?.query_row([], |r| r.get(0))?)
    }

    pub fn password_hash(&self, user: &str) -> Result<Option<String>, BankError> {
        Ok(self
            .conn
            .prepare_cached("SELECT password_hash FROM accounts WHERE user = ?1")?
            .query_row([user], |r| r.get(0))
            .optional()?)
    }

    /// `(balance, available)` in minor units.
    pub fn balance(&self, user: &str) -> Result<(i64, i64), BankError> {
        self.conn
            .prepare_cached("SELECT balance_minor, held_minor FROM accounts WHERE user = ?1")?
            .query_row([user], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
            .optional()?
            .map(|(balance, held)| (balance, balance - held))
            .ok_or_else(|| BankError::UnknownAccount(user.to_owned()))
    }

    /// Phase one. Votes yes only after the hold (debit) and the reservation
    /// (credit) are durable. A no vote is stored too, as an aborted leg, so
    /// that a repeated prepare gets the same answer and a later commit fails.
    pub fn prepare(&mut self, leg: &LegRequest) -> Result<Vote, BankError> {
        let (debit, credit) = leg.sides(&self.bank)?;
        let tx = strife_rpc::sqlite::Savepoint::new(&self.conn)?;
        let (current, stored_reason) = recorded_leg(&tx, leg, "prepared")?;
        let check = match current {
            None => {
                let debit = debit.map(|user| Self::funds(&tx, user)).transpose()?;
                let credit = credit.map(|user| Self::funds(&tx, user)).transpose()?;
                check_leg(debit, credit, leg.amount_minor)
            }
            Some(_) => Vote::Yes,
        };
        let (force, vote) = machine::on_prepare(current, check == Vote::Yes);
        let vote = match (vote, check) {
            (MachineVote::Yes, _) => Vote::Yes,
            (MachineVote::No, Vote::No(reason)) => Vote::No(reason),
            (MachineVote::No, Vote::Yes) => Vote::No(stored_reason.unwrap_or(DeclineReason::Timeout)),
        };
        if let Some(Force { state, effect }) = force {
            if effect == Some(Effect::PlaceHold) {
                if let Some(user) = debit {
                    tx.prepare_cached("UPDATE accounts SET held_minor = held_minor + ?2 WHERE user = ?1")?
                        .execute(params![user, leg.amount_minor])?;
                }
                if let Some(user) = credit {
                    tx.prepare_cached(
                        "UPDATE accounts SET incoming_minor = incoming_minor + ?2 WHERE user = ?1",
                    )?
                    .execute(params![user, leg.amount_minor])?;
                }
            }
            let reason = match vote {
                Vote::No(r) => Some(r.code()),
                Vote::Yes => None,
            };
            let now = now_ms();
            insert_leg(
                &tx,
                leg,
                (debit, credit),
                state,
                reason,
                now,
                (state == LegState::Aborted).then_some(now),
            )?;
            tx.commit()?;
        }
        Ok(vote)
    }

    /// One phase: decides a payment within this bank (both sides here) and
    /// writes the decision with its money in one savepoint: committed with
    /// both balances moved, or aborted with the reason. A repeat answers
    /// the record and writes nothing. `now` is this bank's clock.
    pub fn transfer(&mut self, t: &TransferRequest, now: i64) -> Result<Outcome, BankError> {
        let leg = &t.leg;
        let (debit, credit) = leg.both_sides(&self.bank)?;
        let tx = strife_rpc::sqlite::Savepoint::new(&self.conn)?;
        let (current, stored_reason) = recorded_leg(&tx, leg, "recorded")?;
        let past_deadline = now >= t.deadline_ms;
        let check = match current {
            None if !past_deadline => {
                let payer = Self::funds(&tx, debit)?;
                let payee = Self::funds(&tx, credit)?;
                check_leg(Some(payer), Some(payee), leg.amount_minor)
            }
            _ => Vote::Yes,
        };
        let (force, decision) = machine::on_transfer(current, check == Vote::Yes, past_deadline)
            .map_err(|v| BankError::Conflict(format!("payment {}: {v}", leg.txn_id)))?;
        let outcome = match (decision, current, check) {
            (Decision::Commit, _, _) => Outcome::Committed,
            (Decision::Abort, Some(_), _) => {
                Outcome::Aborted(stored_reason.unwrap_or(DeclineReason::Timeout))
            }
            (Decision::Abort, None, Vote::No(reason)) => Outcome::Aborted(reason),
            (Decision::Abort, None, Vote::Yes) => Outcome::Aborted(DeclineReason::Timeout),
        };
        let Some(Force { state, effect }) = force else { return Ok(outcome) };
        if effect == Some(Effect::Transfer) {
            tx.prepare_cached("UPDATE accounts SET balance_minor = balance_minor - ?2 WHERE user = ?1")?
                .execute(params![debit, leg.amount_minor])?;
            tx.prepare_cached("UPDATE accounts SET balance_minor = balance_minor + ?2 WHERE user = ?1")?
                .execute(params![credit, leg.amount_minor])?;
        }
        let reason = match outcome {
            Outcome::Aborted(r) => Some(r.code()),
            Outcome::Committed => None,
        };
        // Decided as it is recorded: its decision time is its record's.
        insert_leg(&tx, leg, (Some(debit), Some(credit)), state, reason, now, Some(now))?;
        tx.commit()?;
        Ok(outcome)
    }

    /// One phase: what became of a payment; one never heard of is recorded
    /// as aborted with `reason` first (a fence).
    pub fn resolve_transfer(&mut self, txn_id: &str, reason: DeclineReason) -> Result<Outcome, BankError> {
        let tx = strife_rpc::sqlite::Savepoint::new(&self.conn)?;
        let row: Option<(String, Option<String>)> = tx
            .prepare_cached("SELECT state, reason FROM legs WHERE txn_id = ?1")?
            .query_row([txn_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let current = row.as_ref().map(|r| parse_state(&r.0)).transpose()?;
        let stored = row.and_then(|r| r.1).as_deref().and_then(DeclineReason::from_code);
        let (force, decision) = machine::on_resolve(current)
            .map_err(|v| BankError::Conflict(format!("payment {txn_id}: {v}")))?;
        if force.is_some() {
            let now = now_ms();
            tx.prepare_cached(
                "INSERT INTO legs (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank,
                                   amount_minor, state, reason, prepared_at, decided_at)
                 VALUES (?1, '', '', '', '', '', 0, 'aborted', ?2, ?3, ?3)",
            )?
            .execute(params![txn_id, reason.code(), now])?;
            tx.commit()?;
        }
        Ok(match (decision, force) {
            (Decision::Commit, _) => Outcome::Committed,
            (Decision::Abort, Some(_)) => Outcome::Aborted(reason),
            (Decision::Abort, None) => Outcome::Aborted(stored.unwrap_or(DeclineReason::Timeout)),
        })
    }

    /// The money of `user`, if there is such an account.
    fn funds(tx: &rusqlite::Connection, user: &str) -> Result<Option<Funds>, BankError> {
        Ok(tx
            .prepare_cached("SELECT balance_minor, held_minor, incoming_minor FROM accounts WHERE user = ?1")?
            .query_row([user], |r| {
                Ok(Funds { balance_minor: r.get(0)?, held_minor: r.get(1)?, incoming_minor: r.get(2)? })
            })
            .optional()?)
    }

    /// Phase two, commit: applies the hold and the credit. Idempotent.
    pub fn commit(&mut self, txn_id: &str) -> Result<(), BankError> {
        self.decide(txn_id, Decision::Commit)
    }

    /// Phase two, abort: releases the hold. Idempotent; an abort for a
    /// payment never prepared here leaves a record so that a late prepare
    /// votes no.
    pub fn abort(&mut self, txn_id: &str) -> Result<(), BankError> {
        self.decide(txn_id, Decision::Abort)
    }

    pub fn decide(&mut self, txn_id: &str, decision: Decision) -> Result<(), BankError> {
        let tx = strife_rpc::sqlite::Savepoint::new(&self.conn)?;
        let row: Option<(String, i64, Option<String>, Option<String>)> = tx
            .prepare_cached(
                "SELECT state, amount_minor, debit_user, credit_user FROM legs WHERE txn_id = ?1",
            )?
            .query_row([txn_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .optional()?;
        let current = row.as_ref().map(|r| parse_state(&r.0)).transpose()?;
        // A decision that contradicts this leg's state is a protocol
        // violation: refused, nothing changes, and the gateway logs it.
        let force = machine::on_decision(current, decision)
            .map_err(|v| BankError::Conflict(format!("payment {txn_id}: {v}")))?;
        let Some(Force { state, effect }) = force else { return Ok(()) };
        let now = now_ms();
        match (row, effect) {
            (None, _) => {
                tx.prepare_cached(
                    "INSERT INTO legs (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank,
                                       amount_minor, state, reason, prepared_at, decided_at)
                     VALUES (?1, '', '', '', '', '', 0, ?2, 'timeout', ?3, ?3)",
                )?
                .execute(params![txn_id, state_name(state), now])?;
            }
            (Some((_, amount, debit, credit)), effect) => {
                let (release, apply) = match effect {
                    Some(Effect::ApplyCommit) => (amount, amount),
                    Some(Effect::ReleaseHold) => (amount, 0),
                    Some(Effect::PlaceHold | Effect::Transfer) | None => (0, 0),
                };
                if let Some(user) = debit {
                    tx.prepare_cached(
                        "UPDATE accounts SET held_minor = held_minor - ?2, balance_minor = balance_minor - ?3
                         WHERE user = ?1",
                    )?
                    .execute(params![user, release, apply])?;
                }
                if let Some(user) = credit {
                    tx.prepare_cached("UPDATE accounts SET incoming_minor = incoming_minor - ?2, balance_minor = balance_minor + ?3
                         WHERE user = ?1")?.execute(params![user, release, apply])?;
                }
                tx.prepare_cached("UPDATE legs SET state = ?2, decided_at = ?3 WHERE txn_id = ?1")?
                    .execute(params![txn_id, state_name(state), now])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Committed legs that touch `user`, newest first (by `prepared_at`,
    /// then `txn_id`): the legs stored since the last fold, then the
    /// account's folds from the newest (see [`strife_rpc::folds`]), never
    /// the whole ledger nor all of the account's legs.
    pub fn history(&self, user: &str, limit: u32) -> Result<Vec<Leg>, BankError> {
        let read = |sql: &str, x: i64| -> Result<Vec<Leg>, BankError> {
            let mut stmt = self.conn.prepare_cached(sql)?;
            let rows = stmt.query_map(params![user, limit, x], Self::leg_from_row)?;
            rows.map(|r| r.map_err(BankError::from).and_then(|l| l)).collect()
        };
        let recent = read(HISTORY_RECENT_SQL, folds::folded(&self.conn)?.last_row)?;
        folds::walk(
            &self.conn,
            user,
            limit as usize,
            i64::MIN,
            recent,
            |l| l.prepared_at_ms,
            |a, b| b.prepared_at_ms.cmp(&a.prepared_at_ms).then_with(|| a.txn_id.cmp(&b.txn_id)),
            |fold| read(HISTORY_FOLD_SQL, fold),
        )
    }

    /// At most `limit` legs with an amount, by transaction id, after
    /// `after`: the audit reads a ledger of any size this way, a page at a
    /// time, in bounded memory.
    pub fn legs_after(&self, after: Option<&str>, limit: u32) -> Result<Vec<Leg>, BankError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor, state, prepared_at
             FROM legs WHERE amount_minor > 0 AND txn_id > ?1 ORDER BY txn_id LIMIT ?2",
        )?;
        stmt.query_map(rusqlite::params![after.unwrap_or(""), limit], Self::leg_from_row)?
            .map(|r| r.map_err(BankError::from).and_then(|l| l))
            .collect()
    }

    /// The sums over every account.
    pub fn totals(&self) -> Result<Totals, BankError> {
        let totals = self
            .conn
            .prepare_cached(
                "SELECT COUNT(*), COALESCE(SUM(balance_minor), 0), COALESCE(SUM(held_minor), 0),
                    COALESCE(SUM(opening_minor), 0) FROM accounts",
            )?
            .query_row([], |r| {
                Ok(Totals {
                    accounts: r.get(0)?,
                    balance_minor: r.get(1)?,
                    held_minor: r.get(2)?,
                    opening_minor: r.get(3)?,
                })
            })?;
        Ok(totals)
    }

    /// Transaction ids of legs prepared here before `before_ms` and not yet
    /// decided, oldest first, at most `limit`.
    pub fn open_legs(&self, before_ms: i64, limit: u32) -> Result<Vec<String>, BankError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT txn_id FROM legs WHERE state = 'prepared' AND prepared_at < ?1 ORDER BY prepared_at LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![before_ms, limit], |r| r.get(0))?;
        Ok(rows.collect::<Result<Vec<String>, _>>()?)
    }

    fn leg_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Leg, BankError>> {
        let state: String = r.get(7)?;
        Ok(parse_state(&state).map(|state| Leg {
            txn_id: r.get(0).unwrap_or_default(),
            payment_id: r.get(1).unwrap_or_default(),
            payer_user: r.get(2).unwrap_or_default(),
            payer_bank: r.get(3).unwrap_or_default(),
            payee_user: r.get(4).unwrap_or_default(),
            payee_bank: r.get(5).unwrap_or_default(),
            amount_minor: r.get(6).unwrap_or_default(),
            state,
            prepared_at_ms: r.get(8).unwrap_or_default(),
        }))
    }
}

/// The SQLite backend of [`Ledger`]: a [`Store`] owned by its group-commit
/// thread, which runs the operations queued to it in batches, each batch one
/// transaction (one fsync) and each operation in its own savepoint.
#[derive(Clone)]
pub struct SqliteLedger {
    store: GroupCommit<Store>,
    /// The bank's name, for what a failed batch answers.
    bank: Arc<str>,
    /// The ledger's id, read at open.
    ledger_id: Arc<str>,
}

impl SqliteLedger {
    /// Opens (creating if needed) the store at `path` and starts its thread.
    pub fn open(path: &Path, bank: &str) -> Result<SqliteLedger, BankError> {
        let store = Store::open(path, bank)?;
        let ledger_id = Arc::from(store.ledger_id());
        let store = GroupCommit::start(bank, store).map_err(|e| BankError::Internal(e.to_string()))?;
        Ok(SqliteLedger { store, bank: Arc::from(bank), ledger_id })
    }

    /// Runs `op` on the store in the next batch; answers once it is durable.
    async fn run<T, F>(&self, op: F) -> Result<T, BankError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T, BankError> + Send + 'static,
    {
        self.store.run(op).await.map_err(|e| match e {
            GroupCommitError::Commit(failure) => {
                BankError::StoreFailed { bank: self.bank.to_string(), failure }
            }
            GroupCommitError::Closed => BankError::Internal(e.to_string()),
        })?
    }
}

impl Ledger for SqliteLedger {
    fn ledger_id(&self) -> &str {
        &self.ledger_id
    }

    async fn create_accounts(&self, accounts: Vec<AccountSpec>) -> Result<usize, BankError> {
        self.run(move |s| s.create_from_specs(&accounts).map_err(|e| BankError::Internal(format!("{e:#}"))))
            .await
    }

    async fn account_count(&self) -> Result<u32, BankError> {
        self.run(|s| s.account_count()).await
    }

    async fn password_hash(&self, user: String) -> Result<Option<String>, BankError> {
        self.run(move |s| s.password_hash(&user)).await
    }

    async fn balance(&self, user: String) -> Result<(i64, i64), BankError> {
        self.run(move |s| s.balance(&user)).await
    }

    async fn prepare(&self, leg: LegRequest) -> Result<Vote, BankError> {
        self.run(move |s| s.prepare(&leg)).await
    }

    async fn prepare_batch(&self, legs: Vec<LegRequest>) -> Result<Vec<Result<Vote, BankError>>, BankError> {
        // One store operation for the whole batch: each leg still runs in
        // its own savepoint (a failing one changes nothing), and every
        // answer waits for the one commit that makes the batch durable.
        self.run(move |s| Ok(legs.iter().map(|leg| s.prepare(leg)).collect())).await
    }

    async fn decide(&self, txn_id: String, decision: Decision) -> Result<(), BankError> {
        self.run(move |s| s.decide(&txn_id, decision)).await
    }

    async fn transfer_batch(
        &self,
        transfers: Vec<TransferRequest>,
    ) -> Result<Vec<Result<Outcome, BankError>>, BankError> {
        // As a batch of prepares: one store operation, a savepoint per
        // transfer, every answer after the batch's one commit.
        self.run(move |s| Ok(transfers.iter().map(|t| s.transfer(t, now_ms())).collect())).await
    }

    async fn resolve_transfer(&self, txn_id: String, reason: DeclineReason) -> Result<Outcome, BankError> {
        self.run(move |s| s.resolve_transfer(&txn_id, reason)).await
    }

    async fn decide_batch(
        &self,
        decisions: Vec<(String, Decision)>,
    ) -> Result<Vec<Result<(), BankError>>, BankError> {
        self.run(move |s| Ok(decisions.iter().map(|(txn_id, d)| s.decide(txn_id, *d)).collect())).await
    }

    async fn history(&self, user: String, limit: u32) -> Result<Vec<Leg>, BankError> {
        self.run(move |s| s.history(&user, limit)).await
    }

    async fn audit_page(&self, after: Option<String>, limit: u32) -> Result<(Vec<Leg>, Totals), BankError> {
        self.run(move |s| Ok((s.legs_after(after.as_deref(), limit)?, s.totals()?))).await
    }

    async fn open_legs(&self, before_ms: i64, limit: u32) -> Result<Vec<String>, BankError> {
        self.run(move |s| s.open_legs(before_ms, limit)).await
    }

    async fn in_doubt(&self) -> Result<crate::ledger::InDoubt, BankError> {
        self.run(move |s| {
            let (legs, oldest_prepared_at_ms) = s.conn.query_row(
                "SELECT count(*), min(prepared_at) FROM legs WHERE state = 'prepared'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            Ok(crate::ledger::InDoubt { legs, oldest_prepared_at_ms })
        })
        .await
    }
}

/// The state and stored reason of leg `leg.txn_id` if this bank recorded it
/// (read inside the caller's savepoint); a conflict if it was recorded, and
/// not aborted, with another amount ("payment … was {verb} with another
/// amount"). Shared by a prepare and a one-phase transfer.
/// Writes a leg's record: the sides it has at this bank, its state and
/// reason, made at `now`, decided at `decided_at` (`None` while open).
fn insert_leg(
    conn: &Connection,
    leg: &LegRequest,
    (debit, credit): (Option<&str>, Option<&str>),
    state: LegState,
    reason: Option<&str>,
    now: i64,
    decided_at: Option<i64>,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO legs (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor,
                           debit_user, credit_user, state, reason, prepared_at, decided_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?
    .execute(params![
        leg.txn_id,
        leg.payment_id,
        leg.payer_user,
        leg.payer_bank,
        leg.payee_user,
        leg.payee_bank,
        leg.amount_minor,
        debit,
        credit,
        state_name(state),
        reason,
        now,
        decided_at,
    ])?;
    Ok(())
}

fn recorded_leg(
    conn: &Connection,
    leg: &LegRequest,
    verb: &str,
) -> Result<(Option<LegState>, Option<DeclineReason>), BankError> {
    let existing: Option<(String, Option<String>, i64)> = conn
        .prepare_cached("SELECT state, reason, amount_minor FROM legs WHERE txn_id = ?1")?
        .query_row([&leg.txn_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    match existing {
        Some((state, reason, amount)) => {
            let state = parse_state(&state)?;
            if state != LegState::Aborted && amount != leg.amount_minor {
                return Err(BankError::Conflict(format!(
                    "payment {} was {verb} with another amount",
                    leg.txn_id
                )));
            }
            Ok((Some(state), reason.as_deref().and_then(DeclineReason::from_code)))
        }
        None => Ok((None, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{AccountRow, Inspect, LegRow, conformance_suite, opening_accounts};

    impl Inspect for SqliteLedger {
        async fn accounts(&self) -> Vec<AccountRow> {
            self.run(|s| {
                let mut stmt = s.conn.prepare(
                    "SELECT user, balance_minor, held_minor, incoming_minor FROM accounts ORDER BY user",
                )?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
            .expect("accounts")
        }

        async fn legs(&self) -> Vec<LegRow> {
            self.run(|s| {
                let mut stmt =
                    s.conn.prepare("SELECT txn_id, state, amount_minor FROM legs ORDER BY txn_id")?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
            .expect("legs")
        }
    }

    /// A directory removed when dropped.
    pub struct TempDir(std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A fresh SQLite ledger of `BankA` in a directory of its own.
    async fn fresh() -> (SqliteLedger, TempDir) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("strife-bank-store-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let ledger = SqliteLedger::open(&dir.join("bank.db"), "BankA").expect("open");
        ledger.create_accounts(opening_accounts()).await.expect("accounts");
        (ledger, TempDir(dir))
    }

    /// The ledger of `fresh` opened again, as a second process would.
    async fn reopen(dir: &TempDir) -> SqliteLedger {
        SqliteLedger::open(&dir.0.join("bank.db"), "BankA").expect("reopen")
    }

    conformance_suite!(fresh, reopen);

    /// An account's history read through the folds is exactly what the
    /// query over all legs gives (committed, newest first by `prepared_at`
    /// then `txn_id`), for every account and limit, on a seeded random
    /// ledger: folds of 5 legs made as batches begin, legs from and to
    /// another bank, prepared legs decided after their fold, a batch with a
    /// fold rolled back, and a reopen that folds what was left.
    #[test]
    fn history_read_through_the_folds_is_the_history_of_all_legs() {
        use strife_core::rng::SplitMix64;
        use strife_rpc::group_commit::Batched;
        let seed = strife_core::rng::seed_from_env("STRIFE_FOLD_SEED");
        let mut rng = SplitMix64(seed);
        let dir = std::env::temp_dir().join(format!("strife-bank-store-folds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let _clean = TempDir(dir.clone());
        const FOLD: i64 = 5;
        let users = ["a", "b", "c", "d", "e"];
        let mut s = Store::open_folding(&dir.join("bank.db"), "BankA", FOLD).expect("open");
        let specs: Vec<AccountSpec> = users
            .iter()
            .map(|u| AccountSpec {
                user: (*u).into(),
                credential: Credential::Hash(crate::conformance::TEST_HASH.into()),
                balance_minor: 1_000_000,
            })
            .collect();
        s.create_from_specs(&specs).expect("accounts");
        let mut n = 0;
        let mut open_legs: Vec<String> = Vec::new();
        let mut batch = |s: &mut Store, rng: &mut SplitMix64, open_legs: &mut Vec<String>| {
            s.begin().expect("begin");
            for _ in 0..1 + rng.below(4) {
                n += 1;
                let txn = format!("t{n:04}");
                let (from, to) = (users[rng.below(5) as usize], users[rng.below(5) as usize]);
                let mut leg = crate::conformance::leg(&txn, from, to, 1 + rng.below(9) as i64);
                match rng.below(4) {
                    0 => leg.payer_bank = "BankB".into(),
                    1 => leg.payee_bank = "BankB".into(),
                    _ if from == to => leg.payee_bank = "BankB".into(),
                    _ => {}
                }
                let _ = s.prepare(&leg).expect("prepare");
                match rng.below(3) {
                    0 => s.commit(&txn).unwrap_or(()),
                    1 => s.abort(&txn).expect("abort"),
                    _ => open_legs.push(txn),
                }
            }
            Batched::commit(s).expect("commit");
        };
        let check = |s: &Store, rng: &mut SplitMix64, label: &str| {
            for u in users {
                let limit = rng.below(12) as u32;
                let want: Vec<String> = s
                    .conn
                    .prepare(
                        "SELECT txn_id FROM legs WHERE state = 'committed' AND (debit_user = ?1 OR credit_user = ?1)
                         ORDER BY prepared_at DESC, txn_id LIMIT ?2",
                    )
                    .expect("all legs")
                    .query_map(params![u, limit], |r| r.get(0))
                    .expect("all legs")
                    .collect::<rusqlite::Result<_>>()
                    .expect("all legs");
                let got: Vec<String> =
                    s.history(u, limit).expect("history").into_iter().map(|l| l.txn_id).collect();
                assert_eq!(got, want, "{label}: {u} by {limit} (seed {seed})");
            }
        };
        for round in 0..40 {
            batch(&mut s, &mut rng, &mut open_legs);
            check(&s, &mut rng, &format!("round {round}"));
        }
        // Decisions after the fold show.
        s.begin().expect("begin");
        for txn in open_legs.drain(..) {
            s.commit(&txn).unwrap_or(());
        }
        Batched::commit(&mut s).expect("commit");
        check(&s, &mut rng, "decided");
        assert!(folds::folded(&s.conn).expect("folded").fold > 10, "the legs were folded");
        // A batch that folds, rolled back: as if it never happened.
        let before = folds::folded(&s.conn).expect("folded");
        s.conn
            .execute_batch(
                "INSERT INTO legs (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor,
                                   debit_user, state, prepared_at)
                 VALUES ('x1', 'x1', 'a', 'BankA', 'z', 'BankB', 1, 'a', 'committed', 1),
                        ('x2', 'x2', 'a', 'BankA', 'z', 'BankB', 1, 'a', 'committed', 2),
                        ('x3', 'x3', 'a', 'BankA', 'z', 'BankB', 1, 'a', 'committed', 3),
                        ('x4', 'x4', 'a', 'BankA', 'z', 'BankB', 1, 'a', 'committed', 4),
                        ('x5', 'x5', 'a', 'BankA', 'z', 'BankB', 1, 'a', 'committed', 5)",
            )
            .expect("five legs");
        s.begin().expect("begin");
        assert!(folds::folded(&s.conn).expect("folded").fold > before.fold, "the batch folded");
        s.rollback(&StorageFailure::new(strife_rpc::storage::StorageCause::DiskFull, "test"));
        assert!(folds::folded(&s.conn).expect("folded").fold == before.fold);
        check(&s, &mut rng, "rolled back");
        // Left unfolded (a fold per 1,000 legs), then folded by 5s at open.
        drop(s);
        let mut s = Store::open_folding(&dir.join("bank.db"), "BankA", 1_000).expect("reopen");
        for _ in 0..20 {
            batch(&mut s, &mut rng, &mut open_legs);
        }
        drop(s);
        let s = Store::open_folding(&dir.join("bank.db"), "BankA", FOLD).expect("reopen");
        let left = folds::last_row(&s.conn, LOG).expect("last") - folds::folded(&s.conn).expect("f").last_row;
        assert!(left < FOLD, "{left} legs left unfolded");
        check(&s, &mut rng, "folded at open");
    }

    /// The store itself, without its thread: what the bench and the audit use.
    #[test]
    fn the_store_works_on_its_own() {
        let dir = std::env::temp_dir().join(format!("strife-bank-store-own-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let mut s = Store::open(&dir.join("bank.db"), "BankA").expect("open");
        let a = NewAccount {
            user: "a".into(),
            password: strife_core::Secret::new("p".into()),
            balance_minor: 10,
        };
        assert_eq!(s.create_accounts(&[a]).expect("accounts"), 1);
        assert_eq!(s.account_count().expect("count"), 1);
        let vote = s.prepare(&crate::conformance::leg("t1", "a", "zz", 5)).expect("prepare");
        assert_eq!(vote, Vote::No(DeclineReason::UnknownPayee));
        s.commit("t1").expect_err("a no vote cannot commit");
        s.abort("t1").expect("abort");
        drop(s);
        let s = Store::open(&dir.join("bank.db"), "BankA").expect("reopen");
        let (legs, totals) = (s.legs_after(None, u32::MAX).expect("legs"), s.totals().expect("totals"));
        assert_eq!((legs.len(), totals.balance_minor), (1, 10));
        // The state CHECK is a chain of comparisons: no temporary b-tree per
        // leg written (strife_rpc::sqlite::state_check_as_comparisons).
        let definition: String = s
            .conn
            .query_row("SELECT sql FROM sqlite_schema WHERE name = 'legs'", [], |r| r.get(0))
            .expect("sql");
        assert!(
            definition.contains("CHECK (state = 'prepared' OR state = 'committed' OR state = 'aborted')"),
            "{definition}"
        );
        // A ledger made before ids existed gets one on open, and keeps it.
        let id = s.ledger_id().to_owned();
        s.conn.execute_batch("DROP TABLE ledger").expect("as it was");
        drop(s);
        let s = Store::open(&dir.join("bank.db"), "BankA").expect("reopen");
        assert_ne!(s.ledger_id(), id, "a new id");
        let made = s.ledger_id().to_owned();
        drop(s);
        assert_eq!(Store::open(&dir.join("bank.db"), "BankA").expect("reopen").ledger_id(), made);
        let _ = std::fs::remove_dir_all(dir);
    }
}

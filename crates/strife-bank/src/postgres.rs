//! The PostgreSQL backend of the bank's ledger ([`Ledger`]): the tables of
//! the SQLite store (`migrations/postgres`, applied at start by refinery),
//! reached through one connection pool. Several processes of one bank may
//! share the database.
//!
//! Durability: every write is one transaction, committed before its caller
//! is answered, and the server must run with `synchronous_commit = on` (the
//! default; checked at start), so a commit that returned is on disk.
//!
//! Each phase of a leg is one autocommitted statement, a call of a
//! function of the schema (`prepare_leg`, `decide_leg`, in
//! `migrations/postgres/V3__one_statement_legs.sql`): one round trip and one
//! transaction, where BEGIN, a read of the leg, a lock of its accounts, the
//! writes and COMMIT were six. The functions make the writes of the
//! participant rules (`strife_twopc::participant`) and return what they read
//! and wrote; every answer is checked here against those rules, which the
//! SQLite store applies directly, so the two backends cannot drift apart
//! unnoticed (and the conformance suite runs against both).
//!
//! Holds stay exact whichever process prepares: a new leg first locks the
//! rows of its accounts (`SELECT … FOR UPDATE`, in name order), checks the
//! money it read and only then, in the same transaction, places the hold.
//! A second prepare against the same account waits for the first to commit
//! and then reads what it left. Two processes racing to write the record of
//! one payment meet at its primary key: the loser's insert (`ON CONFLICT DO
//! NOTHING`) skips the row, its statement fails with a serialization failure
//! and is run again, answering with the winner's record. A statement that
//! PostgreSQL aborts for a deadlock is run again too.
//!
//! Since `V6__open_legs_and_set_based_transfers.sql` one function,
//! `make_legs`, makes a batch of prepares or of one-phase transfers, and the
//! single-item functions are batches of one; the prepared legs are listed in
//! `open_legs` (made with the leg, removed with its decision), which the
//! search for open legs and the in-doubt count read.
//!
//! A batch from the gateway is one statement too (`prepare_legs`,
//! `decide_legs`, `V4__set_based_batches.sql`): one transaction and one
//! commit for all its legs, and a handful of statements over the whole
//! batch. Its rows are locked and read in one order (legs by id, then
//! accounts by name), so two batches never wait for each other in a circle;
//! the legs are made in memory in order, each as alone; one statement per
//! table writes them. A leg recorded meanwhile by another process fails the
//! statement with a serialization failure, and it is run again. The function holds those rows for its own
//! run only (no round trip in between). A batch the database refuses as a
//! whole (a leg that breaks a `CHECK`) is made again a leg at a time, each a
//! statement of its own (see `each_alone`), so the other legs still get
//! their answers.

use crate::accounts::{AccountSpec, Credential, hash_password};
use crate::error::BankError;
use crate::ledger::{
    Decision, Ledger, Leg, LegRequest, LegState, Outcome, Totals, TransferRequest, Vote, parse_state,
};
use deadpool_postgres::{Pool, Transaction};
use std::future::Future;
use std::sync::Arc;
use strife_core::limits::BALANCE_MAX_MINOR;
use strife_core::{DeclineReason, Secret};
use strife_rpc::pg_pool;
use strife_twopc::Vote as MachineVote;
use strife_twopc::participant::{self as machine, Force};
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

refinery::embed_migrations!("migrations/postgres");

pub use strife_rpc::pg_pool::POOL_SIZE_MAX;
/// Runs of one statement that PostgreSQL aborted for a deadlock or a
/// serialization failure (nothing of an aborted run remains).
const TRANSACTION_TRIES_MAX: u32 = 8;
/// The advisory lock that lets one process at a time migrate a database.
const MIGRATION_LOCK: i64 = 0x5354_5249_4645_0001;

/// The ledger in a PostgreSQL database; cheap to clone (one pool).
#[derive(Clone)]
pub struct PostgresLedger {
    /// Connections to the bank's database.
    pool: Pool,
    /// This bank's name, to tell which side of a leg is ours.
    bank: Arc<str>,
    /// The ledger's id (`ledger.id`), read at connect.
    ledger_id: Arc<str>,
}

impl PostgresLedger {
    /// Connects to the database at `url`, applies the migrations it lacks,
    /// and claims the database for `bank` (a database holds one bank's
    /// ledger; a process of another bank is refused).
    pub async fn connect(url: &Secret<String>, bank: &str) -> Result<PostgresLedger, BankError> {
        let pool = pg_pool::pool(url, "bank.store", &format!("strife-bank-{bank}"))
            .map_err(|e| BankError::Internal(format!("{e:#}")))?;
        let mut ledger = PostgresLedger { pool, bank: Arc::from(bank), ledger_id: Arc::from("") };
        ledger.migrate().await?;
        ledger.ledger_id = Arc::from(ledger.claim().await?);
        Ok(ledger)
    }

    async fn migrate(&self) -> Result<(), BankError> {
        pg_pool::migrate(&self.pool, MIGRATION_LOCK, migrations::runner(), "ledger")
            .await
            .map_err(|e| BankError::Internal(format!("{e:#}")))
    }

    /// Claims the database for this bank; returns the ledger's id.
    async fn claim(&self) -> Result<String, BankError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO ledger (bank) VALUES ($1) ON CONFLICT (only_row) DO NOTHING",
                &[&&*self.bank],
            )
            .await?;
        let row = client.query_one("SELECT bank, id::text FROM ledger", &[]).await?;
        let owner: String = row.get(0);
        if owner != *self.bank {
            return Err(BankError::Internal(format!(
                "this database holds the ledger of bank {owner}, not of bank {}",
                self.bank
            )));
        }
        Ok(row.get(1))
    }

    /// One decision: one autocommitted statement (`decide_leg`); run
    /// again if PostgreSQL aborts it for a deadlock.
    async fn decide_alone(&self, txn_id: &str, decision: Decision) -> Result<(), BankError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match (self.decide_once(txn_id, decision).await, tries < TRANSACTION_TRIES_MAX) {
                (Err(e), true) if e.is_retryable() => continue,
                (answer, _) => return answer,
            }
        }
    }

    async fn decide_once(&self, txn_id: &str, decision: Decision) -> Result<(), BankError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(DECIDE_SQL).await?;
        let row =
            client.query_one(&stmt, &[&txn_id, &decision_name(decision), &crate::store::now_ms()]).await?;
        decide_answer(txn_id, decision, &row, 0)
    }

    /// Runs `op` for each item as a statement of its own, all at once over
    /// the pool, and answers in order: a batch that failed as a whole, made
    /// again so that one bad item fails alone. PostgreSQL flushes the log
    /// once for the commits that meet.
    async fn each_alone<I, T, F, Fut>(
        &self,
        items: Vec<I>,
        op: F,
    ) -> Result<Vec<Result<T, BankError>>, BankError>
    where
        I: Send + 'static,
        T: Send + 'static,
        F: Fn(PostgresLedger, I) -> Fut,
        Fut: Future<Output = Result<T, BankError>> + Send + 'static,
    {
        let count = items.len();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, item) in items.into_iter().enumerate() {
            let run = op(self.clone(), item);
            // Spawned: an item runs to its end even if the caller goes away.
            tasks.spawn(async move { (i, run.await) });
        }
        let mut answers: Vec<Option<Result<T, BankError>>> = (0..count).map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            let (i, result) = joined.map_err(|e| BankError::Internal(format!("a batch item's task: {e}")))?;
            answers[i] = Some(result);
        }
        Ok(every_answer(answers))
    }

    /// Phase one for one leg: one autocommitted statement
    /// (`prepare_leg`); run again if PostgreSQL aborts it for a deadlock.
    async fn prepare_alone(&self, leg: &LegRequest) -> Result<Vote, BankError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match (self.prepare_once(leg).await, tries < TRANSACTION_TRIES_MAX) {
                (Err(e), true) if e.is_retryable() => continue,
                (answer, _) => return answer,
            }
        }
    }

    async fn prepare_once(&self, leg: &LegRequest) -> Result<Vote, BankError> {
        let (debit, credit) = leg.sides(&self.bank)?;
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(PREPARE_SQL).await?;
        let row = client
            .query_one(
                &stmt,
                &[
                    &leg.txn_id,
                    &leg.payment_id,
                    &leg.payer_user,
                    &leg.payer_bank,
                    &leg.payee_user,
                    &leg.payee_bank,
                    &leg.amount_minor,
                    &debit,
                    &credit,
                    &crate::store::now_ms(),
                    &BALANCE_MAX_MINOR,
                ],
            )
            .await?;
        prepare_answer(leg, &row, 0)
    }

    /// A batch of legs as one statement (`prepare_legs`): one transaction
    /// and one commit; `None` when it failed as a whole for a reason that
    /// is not retryable, which one leg may cause (then each leg is made
    /// alone, so the others still get their answers).
    async fn prepare_together(
        &self,
        legs: &[LegRequest],
    ) -> Result<Option<Vec<Result<Vote, BankError>>>, BankError> {
        let mut answers: Vec<Option<Result<Vote, BankError>>> = (0..legs.len()).map(|_| None).collect();
        let c = LegColumns::new(legs.iter(), |leg| leg.sides(&self.bank), &mut answers);
        let now = crate::store::now_ms();
        let params = c.params(&[&now, &BALANCE_MAX_MINOR]);
        let Some(rows) = self.run_batch(PREPARE_BATCH_SQL, &params, c.places.len(), "legs").await? else {
            return Ok(None);
        };
        for (row, &i) in rows.iter().zip(&c.places) {
            answers[i] = Some(prepare_answer(&legs[i], row, 1));
        }
        Ok(Some(every_answer(answers)))
    }

    /// A batch of decisions as one statement (`decide_legs`), as
    /// [`PostgresLedger::prepare_together`].
    async fn decide_together(
        &self,
        decisions: &[(String, Decision)],
    ) -> Result<Option<Vec<Result<(), BankError>>>, BankError> {
        let txn_ids: Vec<&str> = decisions.iter().map(|d| d.0.as_str()).collect();
        let names: Vec<&str> = decisions.iter().map(|d| decision_name(d.1)).collect();
        let now = crate::store::now_ms();
        let params: [&(dyn ToSql + Sync); 3] = [&txn_ids, &names, &now];
        let Some(rows) = self.run_batch(DECIDE_BATCH_SQL, &params, decisions.len(), "decisions").await?
        else {
            return Ok(None);
        };
        Ok(Some(
            rows.iter().zip(decisions).map(|(row, (txn_id, d))| decide_answer(txn_id, *d, row, 1)).collect(),
        ))
    }

    /// Runs a batch function (`sql`, answering one row per item in order,
    /// its place first) as one statement, again while PostgreSQL aborts it
    /// for a deadlock or a serialization failure; `None` when it failed as
    /// a whole for a reason that is not retryable.
    async fn run_batch(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        items: usize,
        what: &str,
    ) -> Result<Option<Vec<Row>>, BankError> {
        let mut tries = 0;
        let rows = loop {
            tries += 1;
            let client = self.pool.get().await?;
            let stmt = client.prepare_cached(sql).await?;
            match client.query(&stmt, params).await.map_err(BankError::from) {
                Ok(rows) => break rows,
                Err(e) if e.is_retryable() && tries < TRANSACTION_TRIES_MAX => continue,
                Err(e) if e.is_retryable() => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, what, "a batch failed as a whole; each item alone");
                    return Ok(None);
                }
            }
        };
        if rows.len() != items {
            return Err(BankError::Internal(format!("{} answers to a batch of {items} {what}", rows.len())));
        }
        for (n, row) in rows.iter().enumerate() {
            if usize::try_from(row.try_get::<_, i32>(0)?).ok() != Some(n + 1) {
                return Err(BankError::Internal("a batch's answers out of order".into()));
            }
        }
        Ok(Some(rows))
    }
}

/// A batch of legs as the batch functions take it (`make_legs`, in
/// `V6__open_legs_and_set_based_transfers.sql`): a column per field, of the
/// legs that have their sides at this bank.
struct LegColumns<'a> {
    /// Each leg's place in the batch the caller gave.
    places: Vec<usize>,
    txn_ids: Vec<&'a str>,
    payment_ids: Vec<&'a str>,
    payer_users: Vec<&'a str>,
    payer_banks: Vec<&'a str>,
    payee_users: Vec<&'a str>,
    payee_banks: Vec<&'a str>,
    amounts: Vec<i64>,
    /// The accounts of this bank the legs debit and credit (`None`: the
    /// side is at another bank).
    debits: Vec<Option<&'a str>>,
    credits: Vec<Option<&'a str>>,
}

impl<'a> LegColumns<'a> {
    /// The columns as the first parameters of a batch function, then `more`.
    fn params<'p>(&'p self, more: &[&'p (dyn ToSql + Sync)]) -> Vec<&'p (dyn ToSql + Sync)> {
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![
            &self.txn_ids,
            &self.payment_ids,
            &self.payer_users,
            &self.payer_banks,
            &self.payee_users,
            &self.payee_banks,
            &self.amounts,
            &self.debits,
            &self.credits,
        ];
        params.extend_from_slice(more);
        params
    }

    /// The columns of `legs`; a leg whose `sides` are refused gets that
    /// refusal in `answers` (by place) and no place in the columns.
    fn new<T>(
        legs: impl Iterator<Item = &'a LegRequest>,
        sides: impl Fn(&'a LegRequest) -> Result<(Option<&'a str>, Option<&'a str>), BankError>,
        answers: &mut [Option<Result<T, BankError>>],
    ) -> LegColumns<'a> {
        let mut c = LegColumns {
            places: Vec::new(),
            txn_ids: Vec::new(),
            payment_ids: Vec::new(),
            payer_users: Vec::new(),
            payer_banks: Vec::new(),
            payee_users: Vec::new(),
            payee_banks: Vec::new(),
            amounts: Vec::new(),
            debits: Vec::new(),
            credits: Vec::new(),
        };
        for (i, leg) in legs.enumerate() {
            let (debit, credit) = match sides(leg) {
                Ok(both) => both,
                Err(e) => {
                    answers[i] = Some(Err(e));
                    continue;
                }
            };
            c.places.push(i);
            c.txn_ids.push(&leg.txn_id);
            c.payment_ids.push(&leg.payment_id);
            c.payer_users.push(&leg.payer_user);
            c.payer_banks.push(&leg.payer_bank);
            c.payee_users.push(&leg.payee_user);
            c.payee_banks.push(&leg.payee_bank);
            c.amounts.push(leg.amount_minor);
            c.debits.push(debit);
            c.credits.push(credit);
        }
        c
    }
}

/// Every item's answer, by place: one the batch left without an answer
/// (a bug) is an internal error.
fn every_answer<T>(answers: Vec<Option<Result<T, BankError>>>) -> Vec<Result<T, BankError>> {
    answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(BankError::Internal("an item without an answer".into()))))
        .collect()
}

impl PostgresLedger {
    /// One transfer: one autocommitted statement (`transfer_leg`); run again
    /// if PostgreSQL aborts it for a deadlock.
    async fn transfer_alone(&self, t: &TransferRequest) -> Result<Outcome, BankError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match (self.transfer_once(t).await, tries < TRANSACTION_TRIES_MAX) {
                (Err(e), true) if e.is_retryable() => continue,
                (answer, _) => return answer,
            }
        }
    }

    async fn transfer_once(&self, t: &TransferRequest) -> Result<Outcome, BankError> {
        let leg = &t.leg;
        let (debit, credit) = leg.both_sides(&self.bank)?;
        let now = crate::store::now_ms();
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(TRANSFER_SQL).await?;
        let row = client
            .query_one(
                &stmt,
                &[
                    &leg.txn_id,
                    &leg.payment_id,
                    &leg.payer_user,
                    &leg.payer_bank,
                    &leg.payee_user,
                    &leg.payee_bank,
                    &leg.amount_minor,
                    &debit,
                    &credit,
                    &t.deadline_ms,
                    &now,
                    &BALANCE_MAX_MINOR,
                ],
            )
            .await?;
        transfer_answer(t, now, &row, 0)
    }

    /// A batch of transfers as one statement (`transfer_legs`), as
    /// [`PostgresLedger::prepare_together`].
    async fn transfer_together(
        &self,
        transfers: &[TransferRequest],
    ) -> Result<Option<Vec<Result<Outcome, BankError>>>, BankError> {
        let mut answers: Vec<Option<Result<Outcome, BankError>>> =
            (0..transfers.len()).map(|_| None).collect();
        let c = LegColumns::new(
            transfers.iter().map(|t| &t.leg),
            |leg| leg.both_sides(&self.bank).map(|(d, c)| (Some(d), Some(c))),
            &mut answers,
        );
        let deadlines: Vec<i64> = c.places.iter().map(|&i| transfers[i].deadline_ms).collect();
        let now = crate::store::now_ms();
        let params = c.params(&[&deadlines, &now, &BALANCE_MAX_MINOR]);
        let Some(rows) = self.run_batch(TRANSFER_BATCH_SQL, &params, c.places.len(), "transfers").await?
        else {
            return Ok(None);
        };
        for (row, &i) in rows.iter().zip(&c.places) {
            answers[i] = Some(transfer_answer(&transfers[i], now, row, 1));
        }
        Ok(Some(every_answer(answers)))
    }
}

/// The decision of `t` from what `transfer_leg` read and wrote (its five
/// columns from `at` on) at `now`, checked against the participant rules.
fn transfer_answer(
    t: &TransferRequest,
    now: i64,
    row: &tokio_postgres::Row,
    at: usize,
) -> Result<Outcome, BankError> {
    let txn_id = &t.leg.txn_id;
    let prior = row.try_get::<_, Option<&str>>(at)?.map(parse_state).transpose()?;
    let written = row.try_get::<_, Option<&str>>(at + 3)?.map(parse_state).transpose()?;
    if let Some(state) = prior {
        // The record answers; nothing was written.
        let amount: i64 = row.try_get(at + 2)?;
        if state != LegState::Aborted && amount != t.leg.amount_minor {
            return Err(BankError::Conflict(format!("payment {txn_id} was recorded with another amount")));
        }
        let reason = stored_reason(row, at + 1)?;
        return match (machine::on_transfer(prior, true, false), written) {
            (Ok((None, Decision::Commit)), None) => Ok(Outcome::Committed),
            (Ok((None, Decision::Abort)), None) => {
                Ok(Outcome::Aborted(reason.unwrap_or(DeclineReason::Timeout)))
            }
            (Err(v), None) => Err(BankError::Conflict(format!("payment {txn_id}: {v}"))),
            (wanted, _) => Err(disagreement(txn_id, &format!("{wanted:?}"), prior, written)),
        };
    }
    // A new transfer: the function decided it as the rules do and wrote it.
    let check = stored_reason(row, at + 4)?;
    let past_deadline = now >= t.deadline_ms;
    match (machine::on_transfer(None, check.is_none(), past_deadline), check) {
        (Ok((Some(Force { state, .. }), Decision::Commit)), None) if Some(state) == written => {
            Ok(Outcome::Committed)
        }
        (Ok((Some(Force { state, .. }), Decision::Abort)), Some(r)) if Some(state) == written => {
            Ok(Outcome::Aborted(r))
        }
        (wanted, _) => Err(disagreement(txn_id, &format!("{wanted:?}"), prior, written)),
    }
}

/// The answer to a question about a transfer from what `resolve_transfer`
/// read and wrote, checked against the participant rules.
fn resolve_answer(
    txn_id: &str,
    reason: DeclineReason,
    row: &tokio_postgres::Row,
) -> Result<Outcome, BankError> {
    let prior = row.try_get::<_, Option<&str>>(0)?.map(parse_state).transpose()?;
    let written = row.try_get::<_, Option<&str>>(2)?.map(parse_state).transpose()?;
    let stored = stored_reason(row, 1)?;
    match machine::on_resolve(prior) {
        Ok((force, d)) if force.map(|f| f.state) == written => Ok(match (d, written) {
            (Decision::Commit, _) => Outcome::Committed,
            (Decision::Abort, Some(_)) => Outcome::Aborted(reason),
            (Decision::Abort, None) => Outcome::Aborted(stored.unwrap_or(DeclineReason::Timeout)),
        }),
        Err(v) if written.is_none() => Err(BankError::Conflict(format!("payment {txn_id}: {v}"))),
        wanted => Err(disagreement(txn_id, &format!("{wanted:?}"), prior, written)),
    }
}

/// A batch of transfers, as one statement: see `V5__transfers.sql` and V6.
const TRANSFER_BATCH_SQL: &str = "
SELECT item, prior_state, prior_reason, prior_amount_minor, written_state, written_reason
FROM transfer_legs($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

/// One transfer, as one statement (a batch of one since V6): see `V5__transfers.sql`.
const TRANSFER_SQL: &str = "
SELECT prior_state, prior_reason, prior_amount_minor, written_state, written_reason
FROM transfer_leg($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

/// A question about a transfer, as one statement: see `V5__transfers.sql`.
const RESOLVE_SQL: &str = "SELECT prior_state, prior_reason, written_state FROM resolve_transfer($1, $2, $3)";

/// How a decision is passed to `decide_leg`.
fn decision_name(decision: Decision) -> &'static str {
    match decision {
        Decision::Commit => "commit",
        Decision::Abort => "abort",
    }
}

/// A decline reason as the ledger stored it.
fn stored_reason(row: &tokio_postgres::Row, column: usize) -> Result<Option<DeclineReason>, BankError> {
    row.try_get::<_, Option<&str>>(column)?
        .map(|code| {
            DeclineReason::from_code(code)
                .ok_or_else(|| BankError::Internal(format!("decline reason '{code}' in the store")))
        })
        .transpose()
}

/// The vote on `leg` from what `prepare_leg` read and wrote (its five
/// columns from `at` on), checked against the participant rules.
fn prepare_answer(leg: &LegRequest, row: &tokio_postgres::Row, at: usize) -> Result<Vote, BankError> {
    let prior = row.try_get::<_, Option<&str>>(at)?.map(parse_state).transpose()?;
    let written = row.try_get::<_, Option<&str>>(at + 3)?.map(parse_state).transpose()?;
    if let Some(state) = prior {
        // The leg's record answers; nothing was written.
        let amount: i64 = row.try_get(at + 2)?;
        if state != LegState::Aborted && amount != leg.amount_minor {
            return Err(BankError::Conflict(format!(
                "payment {} was prepared with another amount",
                leg.txn_id
            )));
        }
        let reason = stored_reason(row, at + 1)?;
        return match (machine::on_prepare(prior, true), written) {
            ((None, MachineVote::Yes), None) => Ok(Vote::Yes),
            ((None, MachineVote::No), None) => Ok(Vote::No(reason.unwrap_or(DeclineReason::Timeout))),
            (wanted, _) => Err(disagreement(&leg.txn_id, &format!("{wanted:?}"), prior, written)),
        };
    }
    // A new leg: the function checked it as `check_leg` does and wrote its
    // record; the rules must have asked for exactly that write.
    let check = stored_reason(row, at + 4)?;
    match (machine::on_prepare(None, check.is_none()), check) {
        ((Some(Force { state, .. }), MachineVote::Yes), None) if Some(state) == written => Ok(Vote::Yes),
        ((Some(Force { state, .. }), MachineVote::No), Some(r)) if Some(state) == written => Ok(Vote::No(r)),
        (wanted, _) => Err(disagreement(&leg.txn_id, &format!("{wanted:?}"), prior, written)),
    }
}

/// The answer to a decision from what `decide_leg` read and wrote (its two
/// columns from `at` on), checked against the participant rules.
fn decide_answer(
    txn_id: &str,
    decision: Decision,
    row: &tokio_postgres::Row,
    at: usize,
) -> Result<(), BankError> {
    let prior = row.try_get::<_, Option<&str>>(at)?.map(parse_state).transpose()?;
    let written = row.try_get::<_, Option<&str>>(at + 1)?.map(parse_state).transpose()?;
    // The rules decide; the function must have made exactly their write.
    match machine::on_decision(prior, decision) {
        Ok(force) if force.map(|f| f.state) == written => Ok(()),
        // A decision that contradicts this leg's state is a protocol
        // violation: refused, nothing changed, and the gateway logs it.
        Err(v) if written.is_none() => Err(BankError::Conflict(format!("payment {txn_id}: {v}"))),
        wanted => Err(disagreement(txn_id, &format!("{wanted:?}"), prior, written)),
    }
}

/// A batch of legs, as one statement: see `V3__one_statement_legs.sql`.
const PREPARE_BATCH_SQL: &str = "
SELECT item, prior_state, prior_reason, prior_amount_minor, written_state, written_reason
FROM prepare_legs($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

/// A batch of decisions, as one statement: see `V3__one_statement_legs.sql`.
const DECIDE_BATCH_SQL: &str = "SELECT item, prior_state, written_state FROM decide_legs($1, $2, $3)";

/// An account's committed legs (`$1`), newest first, at most `$2`: through
/// the partial indexes of the legs that name an account on each side.
const HISTORY_SQL: &str = "
SELECT txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor, state, prepared_at
FROM legs WHERE state = 'committed' AND (debit_user = $1 OR credit_user = $1)
ORDER BY prepared_at DESC, txn_id LIMIT $2";

/// Phase one for a leg, as one statement: see `V3__one_statement_legs.sql`.
const PREPARE_SQL: &str = "
SELECT prior_state, prior_reason, prior_amount_minor, written_state, written_reason
FROM prepare_leg($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

/// Phase two for a leg, as one statement: see `V3__one_statement_legs.sql`.
const DECIDE_SQL: &str = "SELECT prior_state, written_state FROM decide_leg($1, $2, $3)";

/// The error when the database's functions made another write than the
/// participant rules ask for: a bug, said loudly (the write is committed).
fn disagreement(txn_id: &str, wanted: &str, prior: Option<LegState>, written: Option<LegState>) -> BankError {
    let error = BankError::Internal(format!(
        "payment {txn_id}: the ledger's function wrote {written:?} over {prior:?}, the participant rules say {wanted}"
    ));
    tracing::error!(%error, "the PostgreSQL ledger disagrees with the participant rules");
    error
}

/// The sums over every account, in `tx`'s snapshot.
async fn totals_in(tx: &Transaction<'_>) -> Result<Totals, BankError> {
    let row = tx
        .query_one(
            "SELECT COUNT(*), COALESCE(SUM(balance_minor), 0)::BIGINT, COALESCE(SUM(held_minor), 0)::BIGINT,
                    COALESCE(SUM(opening_minor), 0)::BIGINT FROM accounts",
            &[],
        )
        .await?;
    Ok(Totals {
        accounts: u32::try_from(row.get::<_, i64>(0)).unwrap_or(u32::MAX),
        balance_minor: row.get(1),
        held_minor: row.get(2),
        opening_minor: row.get(3),
    })
}

fn leg_from_row(r: &tokio_postgres::Row) -> Result<Leg, BankError> {
    Ok(Leg {
        txn_id: r.get(0),
        payment_id: r.get(1),
        payer_user: r.get(2),
        payer_bank: r.get(3),
        payee_user: r.get(4),
        payee_bank: r.get(5),
        amount_minor: r.get(6),
        state: parse_state(r.get(7))?,
        prepared_at_ms: r.get(8),
    })
}

impl Ledger for PostgresLedger {
    fn ledger_id(&self) -> &str {
        &self.ledger_id
    }

    async fn create_accounts(&self, accounts: Vec<AccountSpec>) -> Result<usize, BankError> {
        let mut client = self.pool.get().await?;
        let names: Vec<&str> = accounts.iter().map(|a| a.user.as_str()).collect();
        let existing: Vec<String> = client
            .query("SELECT user_name FROM accounts WHERE user_name = ANY($1)", &[&names])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        // Hash the new accounts' passwords first (slow, and off the async
        // threads), then create them all in one transaction.
        let mut new = Vec::new();
        for a in accounts.into_iter().filter(|a| !existing.contains(&a.user)) {
            let hash = match a.credential {
                Credential::Hash(h) => h,
                Credential::Password(p) => tokio::task::spawn_blocking(move || hash_password(&p))
                    .await
                    .map_err(|e| BankError::Internal(e.to_string()))?
                    .map_err(|e| BankError::Internal(format!("{e:#}")))?,
            };
            new.push((a.user, hash, a.balance_minor));
        }
        let tx = client.transaction().await?;
        let insert = tx
            .prepare_cached(
                "INSERT INTO accounts (user_name, password_hash, balance_minor, opening_minor)
                 VALUES ($1, $2, $3, $3) ON CONFLICT (user_name) DO NOTHING",
            )
            .await?;
        let mut created = 0;
        for (user, hash, balance) in &new {
            created += tx.execute(&insert, &[user, hash, balance]).await?;
        }
        tx.commit().await?;
        Ok(usize::try_from(created).unwrap_or(usize::MAX))
    }

    async fn account_count(&self) -> Result<u32, BankError> {
        let client = self.pool.get().await?;
        let count: i64 = client.query_one("SELECT COUNT(*) FROM accounts", &[]).await?.get(0);
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }

    async fn password_hash(&self, user: String) -> Result<Option<String>, BankError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached("SELECT password_hash FROM accounts WHERE user_name = $1").await?;
        Ok(client.query_opt(&stmt, &[&user]).await?.map(|r| r.get(0)))
    }

    async fn balance(&self, user: String) -> Result<(i64, i64), BankError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached("SELECT balance_minor, held_minor FROM accounts WHERE user_name = $1")
            .await?;
        let row = client.query_opt(&stmt, &[&user]).await?.ok_or(BankError::UnknownAccount(user))?;
        let (balance, held): (i64, i64) = (row.get(0), row.get(1));
        Ok((balance, balance - held))
    }

    async fn prepare(&self, leg: LegRequest) -> Result<Vote, BankError> {
        self.prepare_alone(&leg).await
    }

    async fn prepare_batch(&self, legs: Vec<LegRequest>) -> Result<Vec<Result<Vote, BankError>>, BankError> {
        match self.prepare_together(&legs).await? {
            Some(answers) => Ok(answers),
            None => {
                self.each_alone(legs, |ledger, leg| async move { ledger.prepare_alone(&leg).await }).await
            }
        }
    }

    async fn decide(&self, txn_id: String, decision: Decision) -> Result<(), BankError> {
        self.decide_alone(&txn_id, decision).await
    }

    async fn decide_batch(
        &self,
        decisions: Vec<(String, Decision)>,
    ) -> Result<Vec<Result<(), BankError>>, BankError> {
        match self.decide_together(&decisions).await? {
            Some(answers) => Ok(answers),
            None => {
                self.each_alone(decisions, |ledger, d| async move { ledger.decide_alone(&d.0, d.1).await })
                    .await
            }
        }
    }

    async fn transfer_batch(
        &self,
        transfers: Vec<TransferRequest>,
    ) -> Result<Vec<Result<Outcome, BankError>>, BankError> {
        if let Some(answers) = self.transfer_together(&transfers).await? {
            return Ok(answers);
        }
        self.each_alone(transfers, |ledger, t| async move { ledger.transfer_alone(&t).await }).await
    }

    async fn resolve_transfer(&self, txn_id: String, reason: DeclineReason) -> Result<Outcome, BankError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let run = async {
                let client = self.pool.get().await?;
                let stmt = client.prepare_cached(RESOLVE_SQL).await?;
                let row =
                    client.query_one(&stmt, &[&txn_id, &reason.code(), &crate::store::now_ms()]).await?;
                resolve_answer(&txn_id, reason, &row)
            };
            match (run.await, tries < TRANSACTION_TRIES_MAX) {
                (Err(e), true) if e.is_retryable() => continue,
                (answer, _) => return answer,
            }
        }
    }

    async fn history(&self, user: String, limit: u32) -> Result<Vec<Leg>, BankError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(HISTORY_SQL).await?;
        client.query(&stmt, &[&user, &i64::from(limit)]).await?.iter().map(leg_from_row).collect()
    }

    async fn audit_page(&self, after: Option<String>, limit: u32) -> Result<(Vec<Leg>, Totals), BankError> {
        let mut client = self.pool.get().await?;
        // One snapshot for the page and the totals.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let legs = tx
            .query(
                "SELECT txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor, state, prepared_at
                 FROM legs WHERE amount_minor > 0 AND txn_id > $1 ORDER BY txn_id LIMIT $2",
                &[&after.unwrap_or_default(), &i64::from(limit)],
            )
            .await?
            .iter()
            .map(leg_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let totals = totals_in(&tx).await?;
        tx.commit().await?;
        Ok((legs, totals))
    }

    async fn open_legs(&self, before_ms: i64, limit: u32) -> Result<Vec<String>, BankError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT txn_id FROM open_legs WHERE prepared_at < $1 ORDER BY prepared_at, txn_id LIMIT $2",
            )
            .await?;
        Ok(client.query(&stmt, &[&before_ms, &i64::from(limit)]).await?.iter().map(|r| r.get(0)).collect())
    }

    async fn in_doubt(&self) -> Result<crate::ledger::InDoubt, BankError> {
        let client = self.pool.get().await?;
        let row = client.query_one("SELECT count(*), min(prepared_at) FROM open_legs", &[]).await?;
        Ok(crate::ledger::InDoubt { legs: row.try_get(0)?, oldest_prepared_at_ms: row.try_get(1)? })
    }
}

impl BankError {
    /// Whether PostgreSQL aborted the whole transaction for a reason that
    /// running it again may not meet (a deadlock, a serialization failure).
    pub fn is_retryable(&self) -> bool {
        match self {
            BankError::Postgres(e) => e.code().is_some_and(|c| {
                *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
            }),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{AccountRow, Inspect, LegRow, conformance_suite, leg, opening_accounts};
    use strife_rpc::postgres_server::{PostgresServer, shared_for_tests, unique_name};

    impl Inspect for PostgresLedger {
        async fn accounts(&self) -> Vec<AccountRow> {
            let client = self.pool.get().await.expect("connection");
            let rows = client
                .query(
                    "SELECT user_name, balance_minor, held_minor, incoming_minor FROM accounts ORDER BY user_name",
                    &[],
                )
                .await
                .expect("accounts");
            let mut rows: Vec<AccountRow> =
                rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
            rows.sort();
            rows
        }

        async fn legs(&self) -> Vec<LegRow> {
            let client = self.pool.get().await.expect("connection");
            let rows = client.query("SELECT txn_id, state, amount_minor FROM legs", &[]).await.expect("legs");
            // `open_legs` lists exactly the prepared legs.
            let strays: i64 = client
                .query_one(
                    "SELECT (SELECT count(*) FROM legs l WHERE l.state = 'prepared' AND NOT EXISTS
                               (SELECT 1 FROM open_legs o WHERE o.txn_id = l.txn_id AND o.prepared_at = l.prepared_at))
                          + (SELECT count(*) FROM open_legs o WHERE NOT EXISTS
                               (SELECT 1 FROM legs l WHERE l.txn_id = o.txn_id AND l.state = 'prepared'))",
                    &[],
                )
                .await
                .expect("open legs")
                .get(0);
            assert_eq!(strays, 0, "open_legs and the prepared legs differ");
            let mut rows: Vec<LegRow> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
            rows.sort();
            rows
        }
    }

    /// The test binary's PostgreSQL server; a test that cannot have it
    /// fails, saying what to install.
    fn server() -> &'static PostgresServer {
        shared_for_tests().unwrap_or_else(|e| panic!("{e}"))
    }

    /// A URL of a new, empty database.
    fn new_database() -> Secret<String> {
        server().create_database(&unique_name("ledger")).expect("a database")
    }

    /// A fresh PostgreSQL ledger of `BankA` in a database of its own, and
    /// the database's URL.
    async fn fresh() -> (PostgresLedger, Secret<String>) {
        let url = new_database();
        let ledger = PostgresLedger::connect(&url, "BankA").await.expect("connect");
        ledger.create_accounts(opening_accounts()).await.expect("accounts");
        (ledger, url)
    }

    /// A second pool on the database of `fresh`, as another replica has.
    async fn reopen(url: &Secret<String>) -> PostgresLedger {
        PostgresLedger::connect(url, "BankA").await.expect("reopen")
    }

    conformance_suite!(fresh, reopen);

    /// A full disk (or another failure of the machine) as PostgreSQL says
    /// it: UNAVAILABLE `STORAGE_UNAVAILABLE` naming the cause, as SQLite's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_machine_s_failures_answer_unavailable_with_their_cause() {
        use strife_proto::gateway::v1::ErrorReason;
        let (ledger, _) = fresh().await;
        let client = ledger.pool.get().await.expect("connection");
        for (sqlstate, cause) in
            [("53100", "disk full"), ("58030", "I/O error"), ("25006", "read-only file system")]
        {
            let raise =
                format!("DO $$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = '{sqlstate}'; END $$");
            let err = client.batch_execute(&raise).await.expect_err("raised");
            let status = tonic::Status::from(BankError::Postgres(err));
            assert_eq!(status.code(), tonic::Code::Unavailable, "{sqlstate}: {status:?}");
            assert_eq!(strife_rpc::errors::reason_of(&status), Some(ErrorReason::StorageUnavailable));
            assert_eq!(status.message(), format!("the bank cannot write its ledger: {cause}"));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_holds_one_banks_ledger_and_migrates_once() {
        let url = new_database();
        // Two processes of one bank starting at once: one migrates, both serve.
        let (a, b) =
            tokio::join!(PostgresLedger::connect(&url, "BankA"), PostgresLedger::connect(&url, "BankA"));
        let (a, b) = (a.expect("first"), b.expect("second"));
        assert_eq!(a.ledger_id(), b.ledger_id(), "one ledger, one id");
        a.create_accounts(opening_accounts()).await.expect("accounts");
        let other = PostgresLedger::connect(&url, "BankB").await.err().expect("another bank is refused");
        assert!(other.to_string().contains("ledger of bank BankA"), "{other}");
        let again = PostgresLedger::connect(&url, "BankA").await.expect("a restart");
        assert_eq!(again.balance("a".into()).await.expect("a"), (1000, 1000), "the data survives");
        assert_eq!(again.ledger_id(), a.ledger_id(), "and so does the id");
    }

    /// Applies the migrations up to `version` only, as an older version did.
    async fn migrate_to(client: &mut tokio_postgres::Client, version: i32) {
        migrations::runner()
            .set_target(refinery::Target::Version(version))
            .run_async(client)
            .await
            .unwrap_or_else(|e| panic!("migrating to version {version}: {e}"));
    }

    /// A ledger made before ids existed (schema version 1) gets one when
    /// the migration runs, and keeps it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ledger_from_before_ids_gets_one() {
        let url = new_database();
        let config: tokio_postgres::Config = url.expose().parse().expect("url");
        let (mut client, connection) = config.connect(tokio_postgres::NoTls).await.expect("connect");
        let task = tokio::spawn(connection);
        migrate_to(&mut client, 1).await;
        client.execute("INSERT INTO ledger (bank) VALUES ('BankA')", &[]).await.expect("an old ledger");
        drop(client);
        let _ = task.await;
        let one = PostgresLedger::connect(&url, "BankA").await.expect("migrates");
        assert!(uuid::Uuid::parse_str(one.ledger_id()).is_ok(), "{:?}", one.ledger_id());
        let two = PostgresLedger::connect(&url, "BankA").await.expect("again");
        assert_eq!(two.ledger_id(), one.ledger_id());
    }

    /// A ledger written by an older version (schema version 3: legs
    /// prepared by its functions, one open; and a transfer of version 5) is
    /// migrated at connect: its open leg is listed in `open_legs` (version
    /// 6), and the functions that replace the older ones decide, prepare
    /// and transfer on it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ledger_of_the_previous_version_upgrades_with_its_open_legs() {
        let url = new_database();
        let config: tokio_postgres::Config = url.expose().parse().expect("url");
        let (mut client, connection) = config.connect(tokio_postgres::NoTls).await.expect("connect");
        let task = tokio::spawn(connection);
        migrate_to(&mut client, 3).await;
        client
            .batch_execute(
                "INSERT INTO ledger (bank) VALUES ('BankA');
                 INSERT INTO accounts (user_name, password_hash, balance_minor, opening_minor)
                 VALUES ('a', 'x', 1000, 1000), ('b', 'x', 1000, 1000);
                 SELECT prepare_legs(ARRAY['t1', 't2'], ARRAY['p1', 'p2'], ARRAY['a', 'a'], ARRAY['BankA', 'BankA'],
                                     ARRAY['b', 'b'], ARRAY['BankA', 'BankA'], ARRAY[100, 200]::BIGINT[],
                                     ARRAY['a', 'a'], ARRAY['b', 'b'], 1, 1000000);
                 SELECT decide_legs(ARRAY['t1'], ARRAY['commit'], 2);",
            )
            .await
            .expect("a ledger of version 3");
        migrate_to(&mut client, 5).await;
        client
            .batch_execute(
                "SELECT transfer_legs(ARRAY['t0'], ARRAY['p0'], ARRAY['b'], ARRAY['BankA'], ARRAY['a'],
                                      ARRAY['BankA'], ARRAY[50]::BIGINT[], ARRAY['b'], ARRAY['a'],
                                      ARRAY[10]::BIGINT[], 3, 1000000);",
            )
            .await
            .expect("a transfer of version 5");
        drop(client);
        let _ = task.await;
        let ledger = PostgresLedger::connect(&url, "BankA").await.expect("migrates");
        assert_eq!(ledger.balance("a".into()).await.expect("a"), (950, 750), "t2 holds 200");
        assert_eq!(ledger.open_legs(i64::MAX, 10).await.expect("open"), ["t2"], "carried over");
        assert_eq!(ledger.in_doubt().await.expect("in doubt").legs, 1);
        let again = ledger
            .transfer_batch(vec![
                crate::conformance::transfer("t0", "b", "a", 50),
                crate::conformance::transfer("t5", "a", "b", 50),
            ])
            .await
            .expect("transfers");
        assert!(again.iter().all(|o| matches!(o, Ok(Outcome::Committed))), "{again:?}");
        let votes = ledger
            .prepare_batch(vec![leg("t2", "a", "b", 200), leg("t3", "a", "b", 700), leg("t4", "a", "b", 1)])
            .await
            .expect("batch");
        assert!(matches!(votes[0], Ok(Vote::Yes)), "the old prepared leg answers: {votes:?}");
        assert!(matches!(votes[1], Ok(Vote::Yes)), "{votes:?}");
        assert!(matches!(votes[2], Ok(Vote::No(DeclineReason::InsufficientFunds))), "{votes:?}");
        let done = ledger
            .decide_batch(vec![
                ("t1".into(), Decision::Commit),
                ("t2".into(), Decision::Commit),
                ("t3".into(), Decision::Abort),
            ])
            .await
            .expect("batch");
        assert!(done.iter().all(Result::is_ok), "{done:?}");
        assert_eq!(ledger.balance("a".into()).await.expect("a"), (700, 700));
        assert_eq!(ledger.balance("b".into()).await.expect("b"), (1300, 1300));
        assert!(ledger.open_legs(i64::MAX, 10).await.expect("open").is_empty(), "all decided");
        assert_eq!(ledger.in_doubt().await.expect("in doubt").legs, 0);
        let history = server()
            .psql(&url, &["SELECT COUNT(*) FROM refinery_schema_history"])
            .expect("refinery's own table");
        assert_eq!(history, "6", "each migration applied once");
    }

    /// On 20,000 legs (half of them crossing banks, so naming an account of
    /// this bank on one side only; statistics gathered), an account's
    /// history is read through both partial indexes, custom plan or generic.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_history_uses_the_partial_indexes() {
        let (ledger, url) = fresh().await;
        server()
            .psql(
                &url,
                &[
                    "INSERT INTO legs (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank,
                      amount_minor, debit_user, credit_user, state, prepared_at, decided_at)
                   SELECT lpad(to_hex(n), 36, '0'), lpad(to_hex(n), 36, '0'), 'u' || (n % 500), 'BankA',
                          'v' || (n % 499), CASE WHEN n % 2 = 0 THEN 'BankA' ELSE 'BankB' END, 1,
                          'u' || (n % 500), CASE WHEN n % 2 = 0 THEN 'v' || (n % 499) END, 'committed', n, n
                   FROM generate_series(1, 20000) AS n",
                    "ANALYZE legs",
                ],
            )
            .expect("fill");
        let client = ledger.pool.get().await.expect("connection");
        for mode in ["auto", "force_generic_plan"] {
            client.batch_execute(&format!("SET plan_cache_mode = {mode}")).await.expect("mode");
            let rows =
                client.query(&format!("EXPLAIN {HISTORY_SQL}"), &[&"u7", &20i64]).await.expect("explain");
            let plan = rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>().join("\n");
            assert!(plan.contains("legs_by_debit") && plan.contains("legs_by_credit"), "{mode}: {plan}");
            assert!(!plan.contains("Seq Scan"), "{mode}: {plan}");
        }
        client.batch_execute("RESET plan_cache_mode").await.expect("reset");
    }

    /// A leg the database refuses (here a negative amount, against a CHECK)
    /// fails the batch's one statement; the batch is then made a leg at a
    /// time, so the other legs still get their answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leg_the_database_refuses_fails_alone_in_a_batch() {
        let (ledger, _url) = fresh().await;
        let votes = ledger
            .prepare_batch(vec![leg("t1", "a", "b", 100), leg("t2", "a", "b", -1), leg("t3", "a", "b", 200)])
            .await
            .expect("batch");
        assert!(matches!(votes[0], Ok(Vote::Yes)), "{votes:?}");
        assert!(matches!(votes[1], Err(BankError::Postgres(_))), "{votes:?}");
        assert!(matches!(votes[2], Ok(Vote::Yes)), "{votes:?}");
        assert_eq!(ledger.balance("a".into()).await.expect("a"), (1000, 700));
        let done = ledger
            .decide_batch(vec![("t1".into(), Decision::Commit), ("t3".into(), Decision::Abort)])
            .await
            .expect("batch");
        assert!(done.iter().all(Result::is_ok), "{done:?}");
        assert_eq!(ledger.balance("a".into()).await.expect("a"), (900, 900));
        assert_eq!(ledger.legs().await.len(), 2, "nothing of the refused leg");
    }

    /// Two replicas of one bank (two pools on one database) prepare against
    /// one hot account from many tasks at once, alone and in batches, some
    /// legs sent to both at once, some prepares racing an abort of the same
    /// payment: the account
    /// is never overdrawn, its hold is exactly the sum of its open legs, and
    /// no money appears or disappears.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_keep_holds_exact_on_a_hot_account() {
        const TASKS: u64 = 32;
        const LEGS_PER_TASK: u64 = 20;
        const HOT_MINOR: i64 = 20_000;
        const PAYEES: u64 = 4;
        let url = new_database();
        let one = PostgresLedger::connect(&url, "BankA").await.expect("replica one");
        let two = PostgresLedger::connect(&url, "BankA").await.expect("replica two");
        let mut accounts = vec![AccountSpec {
            user: "hot".into(),
            credential: Credential::Hash(crate::conformance::TEST_HASH.into()),
            balance_minor: HOT_MINOR,
        }];
        for p in 0..PAYEES {
            accounts.push(AccountSpec {
                user: format!("p{p}"),
                credential: Credential::Hash(crate::conformance::TEST_HASH.into()),
                balance_minor: 0,
            });
        }
        one.create_accounts(accounts).await.expect("accounts");

        let seed = strife_core::unix_ms().unsigned_abs();
        eprintln!("seed {seed}");
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let replicas = [one.clone(), two.clone()];
            tasks.push(tokio::spawn(async move {
                let mut rng =
                    strife_core::rng::SplitMix64(seed ^ (t + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                // (txn, amount, committed?) of every yes vote that was decided; the open ones.
                let (mut committed, mut open, mut no) = (0i64, Vec::new(), 0u32);
                for j in 0..LEGS_PER_TASK {
                    let txn = format!("h{t}-{j}");
                    let amount = 1 + rng.below(700) as i64;
                    let l = leg(&txn, "hot", &format!("p{}", rng.below(PAYEES)), amount);
                    let me = &replicas[rng.below(2) as usize];
                    let other = &replicas[rng.below(2) as usize];
                    let vote = match rng.below(7) {
                        // The same prepare at both replicas at once: one answer.
                        0 => {
                            let (x, y) = tokio::join!(me.prepare(l.clone()), other.prepare(l));
                            let (x, y) = (x.expect("prepare"), y.expect("prepare"));
                            assert_eq!(x, y, "{txn}: two answers to one prepare");
                            x
                        }
                        // A prepare racing an abort: aborted either way.
                        1 => {
                            let (x, y) =
                                tokio::join!(me.prepare(l), other.decide(txn.clone(), Decision::Abort));
                            y.expect("abort");
                            x.expect("prepare");
                            continue;
                        }
                        // The same, in batches (the loser runs its batch again).
                        4 => {
                            let (x, y) = tokio::join!(
                                me.prepare_batch(vec![l]),
                                other.decide_batch(vec![(txn.clone(), Decision::Abort)])
                            );
                            y.expect("batch")[0].as_ref().expect("abort");
                            x.expect("batch")[0].as_ref().expect("prepare");
                            continue;
                        }
                        // The same batch at both replicas at once: one answer.
                        3 => {
                            let (x, y) =
                                tokio::join!(me.prepare_batch(vec![l.clone()]), other.prepare_batch(vec![l]));
                            let (x, y) = (x.expect("batch"), y.expect("batch"));
                            let (x, y) = (x[0].as_ref().expect("vote"), y[0].as_ref().expect("vote"));
                            assert_eq!(x, y, "{txn}: two answers to one prepare");
                            *x
                        }
                        // A batch of one leg and a repeat of it.
                        2 => {
                            let votes = me.prepare_batch(vec![l.clone(), l]).await.expect("batch");
                            let (x, y) = (votes[0].as_ref().expect("vote"), votes[1].as_ref().expect("vote"));
                            assert_eq!(x, y, "{txn}");
                            *x
                        }
                        _ => me.prepare(l).await.expect("prepare"),
                    };
                    if vote != Vote::Yes {
                        assert_eq!(vote, Vote::No(DeclineReason::InsufficientFunds), "{txn}");
                        no += 1;
                        continue;
                    }
                    match rng.below(10) {
                        0..3 => {
                            other.decide(txn, Decision::Commit).await.expect("commit");
                            committed += amount;
                        }
                        3..5 => {
                            let done =
                                other.decide_batch(vec![(txn, Decision::Commit)]).await.expect("batch");
                            done[0].as_ref().expect("commit");
                            committed += amount;
                        }
                        5..7 => other.decide(txn, Decision::Abort).await.expect("abort"),
                        7 => {
                            let done = other.decide_batch(vec![(txn, Decision::Abort)]).await.expect("batch");
                            done[0].as_ref().expect("abort");
                        }
                        _ => open.push(amount),
                    }
                }
                (committed, open, no)
            }));
        }
        let (mut committed, mut open_held, mut no) = (0i64, 0i64, 0u32);
        for task in tasks {
            let (c, open, n) = task.await.expect("task");
            committed += c;
            open_held += open.iter().sum::<i64>();
            no += n;
        }
        one.legs().await; // asserts that `open_legs` lists exactly the prepared legs
        let accounts = one.accounts().await;
        let hot = accounts.iter().find(|a| a.0 == "hot").expect("hot");
        assert!(0 <= hot.2 && hot.2 <= hot.1, "overdrawn: {hot:?}");
        assert_eq!(hot.1, HOT_MINOR - committed, "the hot account paid exactly what was committed");
        assert_eq!(hot.2, open_held, "the hold is exactly the open legs' amounts");
        let payees: i64 = accounts.iter().filter(|a| a.0 != "hot").map(|a| a.1).sum();
        assert_eq!(payees + hot.1, HOT_MINOR, "money is conserved");
        let (_, totals) = two.audit_page(None, u32::MAX).await.expect("audit");
        assert_eq!((totals.balance_minor, totals.held_minor), (HOT_MINOR, open_held));
        assert!(no > 0, "the account was never short: the test proves little (seed {seed})");
    }

    /// One phase across replicas: the same transfer at both replicas at
    /// once, and a question (a fence) racing it, get one decision, and the
    /// money moves once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_decide_a_transfer_once() {
        const TRANSFERS: usize = 60;
        const AMOUNT_MINOR: i64 = 10;
        let (one, url) = fresh().await;
        let two = reopen(&url).await;
        let mut committed = 0i64;
        let mut fenced = 0;
        for i in 0..TRANSFERS {
            let t = crate::conformance::transfer(&format!("r{i}"), "a", "b", AMOUNT_MINOR);
            let (x, y, z) = tokio::join!(
                one.transfer_batch(vec![t.clone()]),
                two.transfer_batch(vec![t.clone()]),
                async {
                    if i % 2 == 0 {
                        Some(one.resolve_transfer(t.leg.txn_id.clone(), DeclineReason::Timeout).await)
                    } else {
                        None
                    }
                }
            );
            let x = x.expect("batch").remove(0).expect("transfer");
            let y = y.expect("batch").remove(0).expect("transfer");
            assert_eq!(x, y, "r{i}: two decisions at two replicas");
            if let Some(z) = z {
                assert_eq!(z.expect("resolve"), x, "r{i}: the question and the transfer disagree");
            }
            match x {
                Outcome::Committed => committed += AMOUNT_MINOR,
                Outcome::Aborted(DeclineReason::Timeout) => fenced += 1,
                other => panic!("r{i}: {other:?}"),
            }
        }
        assert_eq!(one.balance("a".into()).await.expect("a"), (1000 - committed, 1000 - committed));
        assert_eq!(two.balance("b".into()).await.expect("b"), (committed, committed));
        eprintln!("{} committed, {fenced} fenced", committed / AMOUNT_MINOR);
    }
}

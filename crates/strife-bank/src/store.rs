//! The bank's durable state in SQLite (WAL, `synchronous=FULL`): accounts and
//! one row per payment this bank takes part in (a *leg*). Every method is one
//! transaction; when it returns Ok, its effect is on disk.
//!
//! Money rules, checked here and again by CHECK constraints:
//! `0 <= held <= balance` and `balance + incoming <= BALANCE_MAX_MINOR`, so no
//! account can be overdrawn by any interleaving of prepares.

use crate::accounts::{NewAccount, hash_password};
use crate::error::BankError;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use std::path::Path;
use strife_core::DeclineReason;
use strife_core::limits::BALANCE_MAX_MINOR;

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
CREATE INDEX IF NOT EXISTS legs_by_debit ON legs (debit_user, prepared_at);
CREATE INDEX IF NOT EXISTS legs_by_credit ON legs (credit_user, prepared_at);
CREATE INDEX IF NOT EXISTS legs_open ON legs (state) WHERE state = 'prepared';
";

/// A leg's state at this bank: the participant's states of the 2PC state
/// machine in `strife-twopc`, which decides every transition below.
pub use strife_twopc::participant::LegState;
use strife_twopc::participant::{self as machine, Effect, Force};
use strife_twopc::{Decision, Vote as MachineVote};

fn parse_state(s: &str) -> Result<LegState, BankError> {
    match s {
        "prepared" => Ok(LegState::Prepared),
        "committed" => Ok(LegState::Committed),
        "aborted" => Ok(LegState::Aborted),
        other => Err(BankError::Internal(format!("leg state '{other}' in the store"))),
    }
}

/// How a leg state is written in the store and shown to operators.
pub fn state_name(state: LegState) -> &'static str {
    match state {
        LegState::Prepared => "prepared",
        LegState::Committed => "committed",
        LegState::Aborted => "aborted",
    }
}

/// What the gateway asks this bank to prepare.
#[derive(Debug, Clone)]
pub struct LegRequest {
    pub txn_id: String,
    pub payment_id: String,
    pub payer_user: String,
    pub payer_bank: String,
    pub payee_user: String,
    pub payee_bank: String,
    pub amount_minor: i64,
}

/// The bank's vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vote {
    Yes,
    No(DeclineReason),
}

/// A leg as stored, for history and audit.
#[derive(Debug, Clone)]
pub struct Leg {
    pub txn_id: String,
    pub payment_id: String,
    pub payer_user: String,
    pub payer_bank: String,
    pub payee_user: String,
    pub payee_bank: String,
    pub amount_minor: i64,
    pub state: LegState,
    pub prepared_at_ms: i64,
}

/// Totals over every account, for the audit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub accounts: u32,
    pub balance_minor: i64,
    pub held_minor: i64,
    /// What the accounts held when created: the sum of balances must equal
    /// the sum of opening balances plus committed credits from other banks
    /// minus committed debits to them.
    pub opening_minor: i64,
}

pub struct Store {
    /// The only connection: SQLite serializes writers anyway, and one
    /// connection makes every method a plain serial transaction.
    conn: Connection,
    /// This bank's name, to tell which side of a leg is ours.
    bank: String,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Store {
    pub fn open(path: &Path, bank: &str) -> Result<Store, BankError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store { conn, bank: bank.to_owned() })
    }

    /// Creates each account that does not exist yet; never touches an
    /// existing one. Returns how many were created.
    pub fn create_accounts(&mut self, accounts: &[NewAccount]) -> anyhow::Result<usize> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut created = 0;
        for a in accounts {
            let exists: bool =
                tx.query_row("SELECT EXISTS(SELECT 1 FROM accounts WHERE user = ?1)", [&a.user], |r| {
                    r.get(0)
                })?;
            if exists {
                continue;
            }
            let hash = hash_password(&a.password)?;
            tx.execute(
                "INSERT INTO accounts (user, password_hash, balance_minor, opening_minor) VALUES (?1, ?2, ?3, ?3)",
                params![a.user, hash, a.balance_minor],
            )?;
            created += 1;
        }
        tx.commit()?;
        Ok(created)
    }

    pub fn account_count(&self) -> Result<u32, BankError> {
        Ok(self.conn.query_row("SELECT COUNT(*) FROM accounts", [], |r| r.get(0))?)
    }

    pub fn password_hash(&self, user: &str) -> Result<Option<String>, BankError> {
        Ok(self
            .conn
            .query_row("SELECT password_hash FROM accounts WHERE user = ?1", [user], |r| r.get(0))
            .optional()?)
    }

    /// `(balance, available)` in minor units.
    pub fn balance(&self, user: &str) -> Result<(i64, i64), BankError> {
        self.conn
            .query_row("SELECT balance_minor, held_minor FROM accounts WHERE user = ?1", [user], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
            })
            .optional()?
            .map(|(balance, held)| (balance, balance - held))
            .ok_or_else(|| BankError::UnknownAccount(user.to_owned()))
    }

    /// Phase one. Votes yes only after the hold (debit) and the reservation
    /// (credit) are durable. A no vote is stored too, as an aborted leg, so
    /// that a repeated prepare gets the same answer and a later commit fails.
    pub fn prepare(&mut self, leg: &LegRequest) -> Result<Vote, BankError> {
        let debit = (leg.payer_bank == self.bank).then_some(leg.payer_user.as_str());
        let credit = (leg.payee_bank == self.bank).then_some(leg.payee_user.as_str());
        if debit.is_none() && credit.is_none() {
            return Err(BankError::Invalid(format!(
                "payment {} has no leg at bank {}",
                leg.txn_id, self.bank
            )));
        }
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing: Option<(String, Option<String>, i64)> = tx
            .query_row("SELECT state, reason, amount_minor FROM legs WHERE txn_id = ?1", [&leg.txn_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let (current, stored_reason) = match existing {
            Some((state, reason, amount)) => {
                let state = parse_state(&state)?;
                if state != LegState::Aborted && amount != leg.amount_minor {
                    return Err(BankError::Conflict(format!(
                        "payment {} was prepared with another amount",
                        leg.txn_id
                    )));
                }
                (Some(state), reason.as_deref().and_then(DeclineReason::from_code))
            }
            None => (None, None),
        };
        let check = match current {
            None => Self::check_leg(&tx, debit, credit, leg.amount_minor)?,
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
                    tx.execute(
                        "UPDATE accounts SET held_minor = held_minor + ?2 WHERE user = ?1",
                        params![user, leg.amount_minor],
                    )?;
                }
                if let Some(user) = credit {
                    tx.execute(
                        "UPDATE accounts SET incoming_minor = incoming_minor + ?2 WHERE user = ?1",
                        params![user, leg.amount_minor],
                    )?;
                }
            }
            let reason = match vote {
                Vote::No(r) => Some(r.code()),
                Vote::Yes => None,
            };
            let now = now_ms();
            tx.execute(
                "INSERT INTO legs (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor,
                                   debit_user, credit_user, state, reason, prepared_at, decided_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
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
                    (state == LegState::Aborted).then_some(now),
                ],
            )?;
            tx.commit()?;
        }
        Ok(vote)
    }

    fn check_leg(
        tx: &rusqlite::Transaction<'_>,
        debit: Option<&str>,
        credit: Option<&str>,
        amount: i64,
    ) -> Result<Vote, BankError> {
        if let Some(user) = debit {
            let row: Option<(i64, i64)> = tx
                .query_row("SELECT balance_minor, held_minor FROM accounts WHERE user = ?1", [user], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?;
            let Some((balance, held)) = row else { return Ok(Vote::No(DeclineReason::UnknownPayer)) };
            if balance - held < amount {
                return Ok(Vote::No(DeclineReason::InsufficientFunds));
            }
        }
        if let Some(user) = credit {
            let row: Option<(i64, i64)> = tx
                .query_row(
                    "SELECT balance_minor, incoming_minor FROM accounts WHERE user = ?1",
                    [user],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((balance, incoming)) = row else { return Ok(Vote::No(DeclineReason::UnknownPayee)) };
            if balance.saturating_add(incoming).saturating_add(amount) > BALANCE_MAX_MINOR {
                return Ok(Vote::No(DeclineReason::BalanceLimit));
            }
        }
        Ok(Vote::Yes)
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

    fn decide(&mut self, txn_id: &str, decision: Decision) -> Result<(), BankError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row: Option<(String, i64, Option<String>, Option<String>)> = tx
            .query_row(
                "SELECT state, amount_minor, debit_user, credit_user FROM legs WHERE txn_id = ?1",
                [txn_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
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
                tx.execute(
                    "INSERT INTO legs (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank,
                                       amount_minor, state, reason, prepared_at, decided_at)
                     VALUES (?1, '', '', '', '', '', 0, ?2, 'timeout', ?3, ?3)",
                    params![txn_id, state_name(state), now],
                )?;
            }
            (Some((_, amount, debit, credit)), effect) => {
                let (release, apply) = match effect {
                    Some(Effect::ApplyCommit) => (amount, amount),
                    Some(Effect::ReleaseHold) => (amount, 0),
                    Some(Effect::PlaceHold) | None => (0, 0),
                };
                if let Some(user) = debit {
                    tx.execute(
                        "UPDATE accounts SET held_minor = held_minor - ?2, balance_minor = balance_minor - ?3
                         WHERE user = ?1",
                        params![user, release, apply],
                    )?;
                }
                if let Some(user) = credit {
                    tx.execute(
                        "UPDATE accounts SET incoming_minor = incoming_minor - ?2, balance_minor = balance_minor + ?3
                         WHERE user = ?1",
                        params![user, release, apply],
                    )?;
                }
                tx.execute(
                    "UPDATE legs SET state = ?2, decided_at = ?3 WHERE txn_id = ?1",
                    params![txn_id, state_name(state), now],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Committed legs that touch `user`, newest first.
    pub fn history(&self, user: &str, limit: u32) -> Result<Vec<Leg>, BankError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor, state, prepared_at
             FROM legs WHERE state = 'committed' AND (debit_user = ?1 OR credit_user = ?1)
             ORDER BY prepared_at DESC, txn_id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![user, limit], Self::leg_from_row)?;
        rows.map(|r| r.map_err(BankError::from).and_then(|l| l)).collect()
    }

    /// Every leg with an amount (not bare abort records), and the totals.
    pub fn audit(&self) -> Result<(Vec<Leg>, Totals), BankError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor, state, prepared_at
             FROM legs WHERE amount_minor > 0 ORDER BY prepared_at, txn_id",
        )?;
        let legs = stmt
            .query_map([], Self::leg_from_row)?
            .map(|r| r.map_err(BankError::from).and_then(|l| l))
            .collect::<Result<Vec<_>, _>>()?;
        let totals = self.conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(balance_minor), 0), COALESCE(SUM(held_minor), 0),
                    COALESCE(SUM(opening_minor), 0) FROM accounts",
            [],
            |r| {
                Ok(Totals {
                    accounts: r.get(0)?,
                    balance_minor: r.get(1)?,
                    held_minor: r.get(2)?,
                    opening_minor: r.get(3)?,
                })
            },
        )?;
        Ok((legs, totals))
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

#[cfg(test)]
mod tests {
    use super::*;
    use strife_core::Secret;

    fn store() -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "strife-bank-store-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let mut s = Store::open(&dir.join("bank.db"), "BankA").expect("open");
        s.create_accounts(&[
            NewAccount { user: "a".into(), password: Secret::new("p".into()), balance_minor: 1000 },
            NewAccount { user: "b".into(), password: Secret::new("p".into()), balance_minor: 0 },
        ])
        .expect("accounts");
        (s, dir)
    }

    fn leg(txn: &str, from: &str, to: &str, amount: i64) -> LegRequest {
        LegRequest {
            txn_id: txn.into(),
            payment_id: txn.into(),
            payer_user: from.into(),
            payer_bank: "BankA".into(),
            payee_user: to.into(),
            payee_bank: "BankA".into(),
            amount_minor: amount,
        }
    }

    #[test]
    fn hold_then_commit_moves_money_once() {
        let (mut s, _d) = store();
        assert_eq!(s.prepare(&leg("t1", "a", "b", 600)).expect("prepare"), Vote::Yes);
        assert_eq!(s.balance("a").expect("a"), (1000, 400));
        assert_eq!(
            s.prepare(&leg("t2", "a", "b", 600)).expect("prepare"),
            Vote::No(DeclineReason::InsufficientFunds)
        );
        assert_eq!(s.prepare(&leg("t1", "a", "b", 600)).expect("again"), Vote::Yes, "prepare is idempotent");
        s.commit("t1").expect("commit");
        s.commit("t1").expect("commit is idempotent");
        assert_eq!(s.balance("a").expect("a"), (400, 400));
        assert_eq!(s.balance("b").expect("b"), (600, 600));
        assert!(s.abort("t1").is_err(), "a committed leg cannot be aborted");
        let (_, totals) = s.audit().expect("audit");
        assert_eq!((totals.balance_minor, totals.held_minor), (1000, 0));
    }

    #[test]
    fn abort_releases_and_wins_over_a_late_prepare() {
        let (mut s, _d) = store();
        assert_eq!(s.prepare(&leg("t1", "a", "b", 600)).expect("prepare"), Vote::Yes);
        s.abort("t1").expect("abort");
        assert_eq!(s.balance("a").expect("a"), (1000, 1000));
        assert!(s.commit("t1").is_err());
        s.abort("t9").expect("abort of an unknown payment");
        assert_eq!(s.prepare(&leg("t9", "a", "b", 10)).expect("late"), Vote::No(DeclineReason::Timeout));
        assert!(s.open_legs(i64::MAX, 10).expect("open").is_empty());
    }

    #[test]
    fn unknown_accounts_vote_no() {
        let (mut s, _d) = store();
        assert_eq!(s.prepare(&leg("t1", "zz", "b", 1)).expect("p"), Vote::No(DeclineReason::UnknownPayer));
        assert_eq!(s.prepare(&leg("t2", "a", "zz", 1)).expect("p"), Vote::No(DeclineReason::UnknownPayee));
        assert_eq!(s.balance("a").expect("a"), (1000, 1000));
    }
}

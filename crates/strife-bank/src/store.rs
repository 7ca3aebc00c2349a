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

/// Group commit drives the store's one connection.
impl strife_rpc::sqlite::HasConnection for Store {
    fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

pub use strife_core::unix_ms as now_ms;

impl Store {
    pub fn open(path: &Path, bank: &str) -> Result<Store, BankError> {
        let conn = strife_rpc::sqlite::open_durable(path)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store { conn, bank: bank.to_owned() })
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
        let debit = (leg.payer_bank == self.bank).then_some(leg.payer_user.as_str());
        let credit = (leg.payee_bank == self.bank).then_some(leg.payee_user.as_str());
        if debit.is_none() && credit.is_none() {
            return Err(BankError::invalid(
                "payee",
                format!("payment {} has no leg at bank {}", leg.txn_id, self.bank),
            ));
        }
        let tx = strife_rpc::sqlite::Savepoint::new(&self.conn)?;
        let existing: Option<(String, Option<String>, i64)> = tx
            .prepare_cached("SELECT state, reason, amount_minor FROM legs WHERE txn_id = ?1")?
            .query_row([&leg.txn_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
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
            tx.prepare_cached("INSERT INTO legs (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor,
                                   debit_user, credit_user, state, reason, prepared_at, decided_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)")?.execute(params![
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
                ])?;
            tx.commit()?;
        }
        Ok(vote)
    }

    fn check_leg(
        tx: &rusqlite::Connection,
        debit: Option<&str>,
        credit: Option<&str>,
        amount: i64,
    ) -> Result<Vote, BankError> {
        if let Some(user) = debit {
            let row: Option<(i64, i64)> = tx
                .prepare_cached("SELECT balance_minor, held_minor FROM accounts WHERE user = ?1")?
                .query_row([user], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((balance, held)) = row else { return Ok(Vote::No(DeclineReason::UnknownPayer)) };
            if balance - held < amount {
                return Ok(Vote::No(DeclineReason::InsufficientFunds));
            }
        }
        if let Some(user) = credit {
            let row: Option<(i64, i64)> = tx
                .prepare_cached("SELECT balance_minor, incoming_minor FROM accounts WHERE user = ?1")?
                .query_row([user], |r| Ok((r.get(0)?, r.get(1)?)))
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
                    Some(Effect::PlaceHold) | None => (0, 0),
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
    use std::collections::BTreeMap;
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

    /// A seeded random run of prepares, commits and aborts (duplicated, out
    /// of order, contradictory, for unknown ids) against a real store, with
    /// the money rules checked after every operation. The seed is printed
    /// (shown on failure); `STRIFE_PROP_SEED=<n>` replays a run.
    #[test]
    fn random_operations_keep_every_money_rule() {
        const OPERATIONS: u32 = 3_000;
        const USERS: [&str; 5] = ["a", "b", "c", "d", "e"];

        /// A leg as the test expects the store to hold it.
        #[derive(Debug, Clone, Copy, PartialEq)]
        enum Expect {
            Prepared,
            Committed,
            /// Aborted; a repeated prepare votes no with this reason.
            Aborted(DeclineReason),
        }
        #[derive(Debug, Clone, Copy)]
        struct Model {
            payer: usize,
            payee: usize,
            amount: i64,
            state: Expect,
        }

        use strife_core::rng::SplitMix64 as Rng;

        type Snapshot = (Vec<(String, i64, i64, i64)>, Vec<(String, String, i64)>);
        fn snapshot(s: &Store) -> Snapshot {
            let mut accounts = s
                .conn
                .prepare("SELECT user, balance_minor, held_minor, incoming_minor FROM accounts ORDER BY user")
                .expect("query");
            let accounts = accounts
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .expect("accounts")
                .collect::<Result<Vec<_>, _>>()
                .expect("accounts");
            let mut legs =
                s.conn.prepare("SELECT txn_id, state, amount_minor FROM legs ORDER BY txn_id").expect("q");
            let legs = legs
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .expect("legs")
                .collect::<Result<Vec<_>, _>>()
                .expect("legs");
            (accounts, legs)
        }

        /// Every money rule, and the store against the model.
        fn check(s: &Store, balances: &[i64], legs: &BTreeMap<String, Model>, total: i64, at: &str) {
            let (accounts, _) = snapshot(s);
            let sum: i64 = accounts.iter().map(|a| a.1).sum();
            assert_eq!(sum, total, "{at}: the sum of balances changed");
            for (i, (user, balance, held, incoming)) in accounts.iter().enumerate() {
                let open = || legs.values().filter(|l| l.state == Expect::Prepared);
                let debits: i64 = open().filter(|l| l.payer == i).map(|l| l.amount).sum();
                let credits: i64 = open().filter(|l| l.payee == i).map(|l| l.amount).sum();
                assert!(*balance >= 0, "{at}: {user} has a negative balance {balance}");
                assert!(0 <= *held && held <= balance, "{at}: {user} holds {held} of {balance}");
                assert_eq!(*held, debits, "{at}: {user}'s hold is not the sum of its prepared debits");
                assert_eq!(
                    *incoming, credits,
                    "{at}: {user}'s incoming is not the sum of its prepared credits"
                );
                assert_eq!(*balance, balances[i], "{at}: {user}'s balance");
                assert_eq!(s.balance(user).expect("balance"), (*balance, balance - held), "{at}: {user}");
            }
            let (_, totals) = s.audit().expect("audit");
            assert_eq!(
                (totals.balance_minor, totals.held_minor),
                (total, legs_held(legs)),
                "{at}: audit totals"
            );
        }
        fn legs_held(legs: &BTreeMap<String, Model>) -> i64 {
            legs.values().filter(|l| l.state == Expect::Prepared).map(|l| l.amount).sum()
        }

        let seed = strife_core::rng::seed_from_env("STRIFE_PROP_SEED");
        let mut rng = Rng(seed);
        let (mut s, dir) = store();
        let more: Vec<NewAccount> = USERS[2..]
            .iter()
            .map(|u| NewAccount { user: (*u).into(), password: Secret::new("p".into()), balance_minor: 0 })
            .map(|a| NewAccount { balance_minor: rng.below(5_000) as i64, ..a })
            .collect();
        s.create_accounts(&more).expect("accounts");
        let mut balances: Vec<i64> = USERS.iter().map(|u| s.balance(u).expect("balance").0).collect();
        let total: i64 = balances.iter().sum();
        let mut legs: BTreeMap<String, Model> = BTreeMap::new();
        // How often each case was met: every one must be, or the run proves little.
        let mut hits: BTreeMap<&str, u32> = BTreeMap::new();
        let mut hit = |case| *hits.entry(case).or_default() += 1;
        // Ids the store must not know: a commit for one is refused and
        // leaves no record.
        let mut fresh = 0u32;
        let mut fresh_id = || {
            fresh += 1;
            format!("t{fresh}")
        };

        for step in 0..OPERATIONS {
            let open: Vec<&String> =
                legs.iter().filter(|(_, l)| l.state == Expect::Prepared).map(|(t, _)| t).collect();
            // The leg an operation is about: mostly an open one, else any
            // known one, else one the store never heard of.
            let txn = match rng.below(10) {
                0..6 if !open.is_empty() => open[rng.below(open.len() as u64) as usize].clone(),
                0..9 if !legs.is_empty() => legs
                    .keys()
                    .nth(rng.below(legs.len() as u64) as usize)
                    .cloned()
                    .unwrap_or_else(&mut fresh_id),
                _ => fresh_id(),
            };
            let known = legs.get(&txn).copied();
            let op = rng.below(10);
            let at = format!("seed {seed}, step {step}, op {op} on {txn} ({known:?})");
            let before = snapshot(&s);
            match op {
                // Prepare: a new leg, or a repeated one (same or other amount).
                0..4 => {
                    let payer = rng.below(USERS.len() as u64) as usize;
                    let payee = (payer + 1 + rng.below(USERS.len() as u64 - 1) as usize) % USERS.len();
                    let available = balances[payer] - legs_held_by(&legs, payer);
                    let amount = match rng.below(4) {
                        0 => available + 1 + rng.below(100) as i64,
                        1 => available.max(1),
                        _ => 1 + rng.below(balances[payer].max(1) as u64 * 2) as i64,
                    };
                    let (payer, payee, amount) = match known {
                        Some(l) if rng.below(4) != 0 => (l.payer, l.payee, l.amount),
                        _ => (payer, payee, amount),
                    };
                    let got = s.prepare(&leg(&txn, USERS[payer], USERS[payee], amount));
                    match known {
                        None => {
                            let available = balances[payer] - legs_held_by(&legs, payer);
                            let (want, state) = if amount <= available {
                                (Vote::Yes, Expect::Prepared)
                            } else {
                                let r = DeclineReason::InsufficientFunds;
                                (Vote::No(r), Expect::Aborted(r))
                            };
                            assert_eq!(got.expect("prepare"), want, "{at}: amount {amount}");
                            hit(if want == Vote::Yes { "prepare: yes" } else { "prepare: no" });
                            legs.insert(txn.clone(), Model { payer, payee, amount, state });
                        }
                        Some(Model { state: Expect::Aborted(r), .. }) => {
                            assert_eq!(got.expect("prepare"), Vote::No(r), "{at}");
                            hit("prepare again: no");
                        }
                        Some(l) if l.amount == amount => {
                            assert_eq!(got.expect("prepare"), Vote::Yes, "{at}");
                            hit("prepare again: yes");
                        }
                        Some(_) => {
                            assert!(matches!(got, Err(BankError::Conflict(_))), "{at}: {got:?}");
                            assert_eq!(snapshot(&s), before, "{at}: a refused prepare changed something");
                            hit("prepare again: other amount, refused");
                        }
                    }
                }
                // Commit.
                4..7 => {
                    let got = s.commit(&txn);
                    match known {
                        Some(l) if l.state == Expect::Prepared => {
                            got.expect("commit");
                            balances[l.payer] -= l.amount;
                            balances[l.payee] += l.amount;
                            legs.insert(txn.clone(), Model { state: Expect::Committed, ..l });
                            hit("commit");
                        }
                        Some(Model { state: Expect::Committed, .. }) => {
                            got.expect("a repeated commit");
                            assert_eq!(snapshot(&s).0, before.0, "{at}: a repeated commit moved money");
                            hit("commit again");
                        }
                        _ => {
                            assert!(matches!(got, Err(BankError::Conflict(_))), "{at}: {got:?}");
                            assert_eq!(snapshot(&s), before, "{at}: a refused commit changed something");
                            hit(if known.is_some() {
                                "commit after abort, refused"
                            } else {
                                "commit unknown, refused"
                            });
                        }
                    }
                }
                // Abort.
                _ => {
                    let got = s.abort(&txn);
                    match known {
                        Some(l) if l.state == Expect::Prepared => {
                            got.expect("abort");
                            let state = Expect::Aborted(DeclineReason::Timeout);
                            legs.insert(txn.clone(), Model { state, ..l });
                            hit("abort");
                        }
                        Some(Model { state: Expect::Aborted(_), .. }) => {
                            got.expect("a repeated abort");
                            assert_eq!(snapshot(&s).0, before.0, "{at}: a repeated abort moved money");
                            hit("abort again");
                        }
                        Some(_) => {
                            assert!(matches!(got, Err(BankError::Conflict(_))), "{at}: {got:?}");
                            assert_eq!(snapshot(&s), before, "{at}: a refused abort changed something");
                            hit("abort after commit, refused");
                        }
                        None => {
                            got.expect("abort of an unknown leg");
                            let state = Expect::Aborted(DeclineReason::Timeout);
                            legs.insert(txn.clone(), Model { payer: 0, payee: 1, amount: 0, state });
                            assert_eq!(snapshot(&s).0, before.0, "{at}: an unknown abort moved money");
                            hit("abort unknown");
                        }
                    }
                }
            }
            check(&s, &balances, &legs, total, &at);
        }
        assert_eq!(hits.len(), 13, "seed {seed}: some cases never came up: {hits:?}");

        // Decide every open leg; then no hold and no reservation remains.
        let open: Vec<(String, Model)> =
            legs.iter().filter(|(_, l)| l.state == Expect::Prepared).map(|(t, l)| (t.clone(), *l)).collect();
        for (txn, l) in open {
            let at = format!("seed {seed}, deciding {txn}");
            if rng.below(2) == 0 {
                s.commit(&txn).expect("commit");
                balances[l.payer] -= l.amount;
                balances[l.payee] += l.amount;
                legs.insert(txn, Model { state: Expect::Committed, ..l });
            } else {
                s.abort(&txn).expect("abort");
                legs.insert(txn, Model { state: Expect::Aborted(DeclineReason::Timeout), ..l });
            }
            check(&s, &balances, &legs, total, &at);
        }
        let (accounts, _) = snapshot(&s);
        assert!(accounts.iter().all(|a| a.2 == 0 && a.3 == 0), "seed {seed}: a hold remains: {accounts:?}");
        assert!(s.open_legs(i64::MAX, u32::MAX).expect("open legs").is_empty(), "seed {seed}: an open leg");
        drop(s);
        let _ = std::fs::remove_dir_all(dir);

        fn legs_held_by(legs: &BTreeMap<String, Model>, payer: usize) -> i64 {
            legs.values().filter(|l| l.state == Expect::Prepared && l.payer == payer).map(|l| l.amount).sum()
        }
    }
}

//! The gateway's durable state in SQLite (WAL, `synchronous=FULL`): every
//! payment with its 2PC state, the bank registry, and revoked tokens.
//!
//! A payment row is the coordinator's log. Its `state` is `preparing` until
//! the decision, then `committed` or `aborted`; the decision is written (and
//! synced) before any bank hears it. `acked` turns 1 once every bank has
//! acknowledged the decision.

use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use strife_core::{DeclineReason, UserRef};

const SCHEMA: &str = "
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
}

const PAYMENT_COLUMNS: &str = "txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor, \
                               state, reason, acked, created_at, deadline_at, fingerprint";

fn payment_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PaymentRecord> {
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
    })
}

/// Counts of payments by state, for the status RPC.
#[derive(Debug, Clone, Copy, Default)]
pub struct PaymentCounts {
    pub committed: u64,
    pub aborted: u64,
    pub preparing: u64,
}

pub struct Store {
    /// The only connection; all writes are serial transactions.
    conn: Connection,
}

/// Group commit drives the store's one connection.
impl strife_rpc::sqlite::HasConnection for Store {
    fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

pub use strife_core::unix_ms as now_ms;

impl Store {
    pub fn open(path: &Path) -> rusqlite::Result<Store> {
        let conn = strife_rpc::sqlite::open_durable(path)?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store { conn })
    }

    /// The payment a customer made under `payment_id`, if any.
    pub fn find_payment(&self, payer: &UserRef, payment_id: &str) -> rusqlite::Result<Option<PaymentRecord>> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {PAYMENT_COLUMNS} FROM payments WHERE payer_bank = ?1 AND payer_user = ?2 AND payment_id = ?3"
            ))?
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
                "INSERT INTO payments ({PAYMENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
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
            ]);
        match inserted {
            Ok(_) => Ok(Ok(())),
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
            return Ok(outcome);
        }
        let current: String = self
            .conn
            .prepare_cached("SELECT state FROM payments WHERE txn_id = ?1")?
            .query_row([txn_id], |r| r.get(0))?;
        PaymentState::parse(&current)
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

    /// A customer's payments, sent (any outcome) and received (committed),
    /// newest first.
    pub fn history(&self, who: &UserRef, limit: u32) -> rusqlite::Result<Vec<PaymentRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {PAYMENT_COLUMNS} FROM (
                 SELECT * FROM payments WHERE payer_bank = ?1 AND payer_user = ?2
                 UNION ALL
                 SELECT * FROM payments WHERE payee_bank = ?1 AND payee_user = ?2 AND state = 'committed'
                     AND NOT (payer_bank = ?1 AND payer_user = ?2)
             ) ORDER BY created_at DESC, txn_id LIMIT ?3"
        ))?;
        let rows = stmt.query_map(params![who.bank, who.user, limit], payment_from_row)?;
        rows.collect()
    }

    /// Every payment, oldest first (for the audit).
    pub fn all_payments(&self) -> rusqlite::Result<Vec<PaymentRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {PAYMENT_COLUMNS} FROM payments ORDER BY created_at"))?;
        let rows = stmt.query_map([], payment_from_row)?;
        rows.collect()
    }

    pub fn counts(&self) -> rusqlite::Result<PaymentCounts> {
        let mut counts = PaymentCounts::default();
        let mut stmt = self.conn.prepare_cached("SELECT state, COUNT(*) FROM payments GROUP BY state")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let n = u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0);
            match PaymentState::parse(&row.get::<_, String>(0)?)? {
                PaymentState::Committed => counts.committed = n,
                PaymentState::Aborted => counts.aborted = n,
                PaymentState::Preparing => counts.preparing = n,
            }
        }
        Ok(counts)
    }

    /// Deletes decided, acknowledged payments created before `before_ms`.
    pub fn prune(&mut self, before_ms: i64) -> rusqlite::Result<usize> {
        self.conn
            .prepare_cached(
                "DELETE FROM payments WHERE created_at < ?1 AND acked = 1 AND state != 'preparing'",
            )?
            .execute([before_ms])
    }

    pub fn banks(&self) -> rusqlite::Result<Vec<(String, String)>> {
        let mut stmt = self.conn.prepare_cached("SELECT name, address FROM banks ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }

    pub fn save_bank(&mut self, name: &str, address: &str) -> rusqlite::Result<()> {
        self.conn.prepare_cached("INSERT INTO banks (name, address, registered_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET address = excluded.address, registered_at = excluded.registered_at")?.execute(params![name, address, now_ms()])?;
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

    /// Aborts every payment still `preparing`: after a restart nobody is
    /// driving them, and under presumed abort that is always safe (the
    /// restart rule of `strife_twopc::coordinator::on_restart`). Returns
    /// how many.
    pub fn abort_all_preparing(&mut self) -> rusqlite::Result<usize> {
        self.conn.prepare_cached("UPDATE payments SET state = 'aborted', reason = 'timeout', decided_at = ?1 WHERE state = 'preparing'")?.execute([now_ms()])
    }
}

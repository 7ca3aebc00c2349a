//! The client's durable state in `DIR/client.db` (mode 0600, SQLite with
//! `synchronous=FULL`): sessions, the outbox of payments not yet decided,
//! and the outcomes of payments that left the outbox.

use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use strife_core::{Secret, UserRef};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    user       TEXT NOT NULL,
    bank       TEXT NOT NULL,
    token      TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    -- increases with every login; the highest is the default session
    seq        INTEGER NOT NULL,
    PRIMARY KEY (user, bank)
) STRICT;
CREATE TABLE IF NOT EXISTS outbox (
    payment_id   TEXT PRIMARY KEY,
    payer_user   TEXT NOT NULL,
    payer_bank   TEXT NOT NULL,
    payee_user   TEXT NOT NULL,
    payee_bank   TEXT NOT NULL,
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    created_at   INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT
) STRICT;
CREATE TABLE IF NOT EXISTS finished (
    payment_id   TEXT PRIMARY KEY,
    payer_user   TEXT NOT NULL,
    payer_bank   TEXT NOT NULL,
    payee_user   TEXT NOT NULL,
    payee_bank   TEXT NOT NULL,
    amount_minor INTEGER NOT NULL,
    status       TEXT NOT NULL,
    reason       TEXT,
    finished_at  INTEGER NOT NULL,
    -- 1 once the customer has been shown the outcome
    reported     INTEGER NOT NULL DEFAULT 0
) STRICT;
";

/// A logged-in customer.
#[derive(Debug, Clone)]
pub struct Session {
    pub who: UserRef,
    pub token: Secret<String>,
    pub expires_at: String,
}

/// A payment waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub payment_id: String,
    pub payer: UserRef,
    pub payee: UserRef,
    pub amount_minor: i64,
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// A payment that left the outbox with a final outcome.
#[derive(Debug, Clone)]
pub struct Finished {
    pub payment_id: String,
    pub payer: UserRef,
    pub payee: UserRef,
    pub amount_minor: i64,
    pub status: String,
    pub reason: Option<String>,
}

pub struct ClientState {
    conn: Connection,
}

use strife_core::unix_ms as now_ms;

impl ClientState {
    pub fn open(dir: &Path) -> anyhow::Result<ClientState> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir)?;
        let path = dir.join("client.db");
        // Create it 0600 before SQLite does: it holds tokens.
        std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&path)?;
        let conn = Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)?;
        Ok(ClientState { conn })
    }

    pub fn save_session(&self, s: &Session) -> rusqlite::Result<()> {
        self.conn.execute(
            "INSERT INTO sessions (user, bank, token, expires_at, seq)
             VALUES (?1, ?2, ?3, ?4, (SELECT COALESCE(MAX(seq), 0) + 1 FROM sessions))
             ON CONFLICT (user, bank) DO UPDATE SET token = excluded.token, expires_at = excluded.expires_at,
                 seq = excluded.seq",
            params![s.who.user, s.who.bank, s.token.expose(), s.expires_at],
        )?;
        Ok(())
    }

    /// The session for `who`, or the most recent login when `who` is None.
    pub fn session(&self, who: Option<&UserRef>) -> rusqlite::Result<Option<Session>> {
        let map = |r: &rusqlite::Row<'_>| {
            Ok(Session {
                who: UserRef { user: r.get(0)?, bank: r.get(1)? },
                token: Secret::new(r.get(2)?),
                expires_at: r.get(3)?,
            })
        };
        match who {
            Some(w) => self
                .conn
                .query_row(
                    "SELECT user, bank, token, expires_at FROM sessions WHERE user = ?1 AND bank = ?2",
                    params![w.user, w.bank],
                    map,
                )
                .optional(),
            None => self
                .conn
                .query_row(
                    "SELECT user, bank, token, expires_at FROM sessions ORDER BY seq DESC LIMIT 1",
                    [],
                    map,
                )
                .optional(),
        }
    }

    pub fn delete_session(&self, who: &UserRef) -> rusqlite::Result<()> {
        self.conn
            .execute("DELETE FROM sessions WHERE user = ?1 AND bank = ?2", params![who.user, who.bank])?;
        Ok(())
    }

    /// Puts a payment in the outbox (durably) unless it is there already.
    /// Returns the stored entry when the id is taken.
    pub fn enqueue(&self, p: &Pending) -> rusqlite::Result<Option<Pending>> {
        if let Some(existing) = self.pending_by_id(&p.payment_id)? {
            return Ok(Some(existing));
        }
        self.conn.execute(
            "INSERT INTO outbox (payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![p.payment_id, p.payer.user, p.payer.bank, p.payee.user, p.payee.bank, p.amount_minor, now_ms()],
        )?;
        Ok(None)
    }

    fn pending_by_id(&self, id: &str) -> rusqlite::Result<Option<Pending>> {
        self.conn
            .query_row(
                "SELECT payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor, attempts, last_error
                 FROM outbox WHERE payment_id = ?1",
                [id],
                pending_from_row,
            )
            .optional()
    }

    pub fn pending(&self) -> rusqlite::Result<Vec<Pending>> {
        let mut stmt = self.conn.prepare(
            "SELECT payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor, attempts, last_error
             FROM outbox ORDER BY created_at",
        )?;
        let rows = stmt.query_map([], pending_from_row)?;
        rows.collect()
    }

    pub fn record_attempt(&self, id: &str, error: &str) -> rusqlite::Result<()> {
        self.conn.execute(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ?2 WHERE payment_id = ?1",
            params![id, error],
        )?;
        Ok(())
    }

    /// Moves a payment from the outbox to the finished list, in one
    /// transaction. `reported` says whether the customer saw the outcome.
    pub fn finish(
        &mut self,
        p: &Pending,
        status: &str,
        reason: Option<&str>,
        reported: bool,
    ) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO finished (payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor,
                                              status, reason, finished_at, reported)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                p.payment_id,
                p.payer.user,
                p.payer.bank,
                p.payee.user,
                p.payee.bank,
                p.amount_minor,
                status,
                reason,
                now_ms(),
                i64::from(reported)
            ],
        )?;
        tx.execute("DELETE FROM outbox WHERE payment_id = ?1", [&p.payment_id])?;
        tx.commit()
    }

    /// Outcomes of queued payments the customer has not been shown yet;
    /// marks them shown.
    pub fn take_unreported(&mut self) -> rusqlite::Result<Vec<Finished>> {
        let tx = self.conn.transaction()?;
        let rows = {
            let mut stmt = tx.prepare(
                "SELECT payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor, status, reason
                 FROM finished WHERE reported = 0 ORDER BY finished_at",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(Finished {
                    payment_id: r.get(0)?,
                    payer: UserRef { user: r.get(1)?, bank: r.get(2)? },
                    payee: UserRef { user: r.get(3)?, bank: r.get(4)? },
                    amount_minor: r.get(5)?,
                    status: r.get(6)?,
                    reason: r.get(7)?,
                })
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        tx.execute("UPDATE finished SET reported = 1 WHERE reported = 0", [])?;
        tx.commit()?;
        Ok(rows)
    }
}

fn pending_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Pending> {
    Ok(Pending {
        payment_id: r.get(0)?,
        payer: UserRef { user: r.get(1)?, bank: r.get(2)? },
        payee: UserRef { user: r.get(3)?, bank: r.get(4)? },
        amount_minor: r.get(5)?,
        attempts: u32::try_from(r.get::<_, i64>(6)?).unwrap_or(u32::MAX),
        last_error: r.get(7)?,
    })
}

//! The client's durable state in `DIR/client.db` (mode 0600, SQLite with
//! `synchronous=FULL`): sessions, the outbox of payments not yet decided,
//! and the outcomes of payments that left the outbox.
//!
//! Any number of `strife` processes may use one directory at once: every
//! read-then-write runs in one `BEGIN IMMEDIATE` transaction (it holds the
//! write lock from its first read, so no other process changes what it
//! read), and a process waits up to `BUSY_TIMEOUT` for the lock.

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
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

/// What [`ClientState::enqueue`] found under a payment id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    /// The payment is in the outbox now, ready to be sent: it was not
    /// there, or it is there or was decided already with the same payer,
    /// payee and amount (the same payment: sending it again is answered
    /// from the gateway's record).
    Ready,
    /// The id is taken by a different payment (in the outbox, or decided);
    /// nothing was written.
    Taken { payer: UserRef, payee: UserRef, amount_minor: i64, decided: bool },
}

/// The file under the client's directory that holds its state.
pub const STATE_FILE: &str = "client.db";
/// How long a command waits for another process that holds the write lock
/// of `client.db` (concurrent commands in one directory take turns).
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

use strife_core::unix_ms as now_ms;

/// `PRAGMA journal_mode = WAL`, asked again while another connection holds
/// the lock it needs, up to `BUSY_TIMEOUT`. When several commands open a new
/// `client.db` at once, SQLite can answer this pragma "database is locked"
/// at once, without waiting in the busy handler (seen once in CI in the
/// test of sixteen connections enqueueing at once).
fn use_wal(conn: &Connection) -> rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(e)
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            done => return done,
        }
    }
}

impl ClientState {
    /// Opens `DIR/client.db`, creating `DIR` (0700) and the file (0600:
    /// it holds tokens) if they are missing. Only commands that must write
    /// (a login, a payment) call this.
    pub fn create(dir: &Path) -> anyhow::Result<ClientState> {
        strife_rpc::files::create_private_dir_all(dir)?;
        let path = dir.join(STATE_FILE);
        strife_rpc::files::open_private_append(&path)?;
        Self::open_path(&path)
    }

    /// Opens `DIR/client.db` if it exists; None (and nothing created) if
    /// there is no client state in `dir` yet.
    pub fn open_existing(dir: &Path) -> anyhow::Result<Option<ClientState>> {
        let path = dir.join(STATE_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        Self::open_path(&path).map(Some)
    }

    fn open_path(path: &Path) -> anyhow::Result<ClientState> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // First, so that every statement below waits for a concurrent
        // command instead of failing with "database is locked".
        conn.busy_timeout(BUSY_TIMEOUT)?;
        use_wal(&conn)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
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
        let map = session_from_row;
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

    /// Every session in this directory, the most recent login first.
    pub fn sessions(&self) -> rusqlite::Result<Vec<Session>> {
        let mut stmt =
            self.conn.prepare("SELECT user, bank, token, expires_at FROM sessions ORDER BY seq DESC")?;
        let rows = stmt.query_map([], session_from_row)?;
        rows.collect()
    }

    pub fn delete_session(&self, who: &UserRef) -> rusqlite::Result<()> {
        self.conn
            .execute("DELETE FROM sessions WHERE user = ?1 AND bank = ?2", params![who.user, who.bank])?;
        Ok(())
    }

    /// Puts a payment in the outbox (durably), in one transaction with the
    /// check of its id, so that processes sending the same id at once
    /// agree on what it means.
    pub fn enqueue(&mut self, p: &Pending) -> rusqlite::Result<Enqueued> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let queued = tx
            .query_row(
                "SELECT payer_user, payer_bank, payee_user, payee_bank, amount_minor FROM outbox WHERE payment_id = ?1",
                [&p.payment_id],
                params_from_row,
            )
            .optional()?;
        // A payment the gateway refused for good says nothing about what
        // the id means at the gateway: only decided ones are compared.
        let decided = tx
            .query_row(
                "SELECT payer_user, payer_bank, payee_user, payee_bank, amount_minor FROM finished
                 WHERE payment_id = ?1 AND status IN ('committed', 'declined')",
                [&p.payment_id],
                params_from_row,
            )
            .optional()?;
        let same = |(payer, payee, amount_minor): &(UserRef, UserRef, i64)| {
            *payer == p.payer && *payee == p.payee && *amount_minor == p.amount_minor
        };
        let taken = match (queued, decided) {
            (Some(q), _) if same(&q) => return Ok(Enqueued::Ready),
            (Some((payer, payee, amount_minor)), _) => {
                Enqueued::Taken { payer, payee, amount_minor, decided: false }
            }
            (None, Some(d)) if !same(&d) => {
                let (payer, payee, amount_minor) = d;
                Enqueued::Taken { payer, payee, amount_minor, decided: true }
            }
            (None, _) => {
                tx.execute(
                    "INSERT INTO outbox (payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        p.payment_id,
                        p.payer.user,
                        p.payer.bank,
                        p.payee.user,
                        p.payee.bank,
                        p.amount_minor,
                        now_ms()
                    ],
                )?;
                tx.commit()?;
                return Ok(Enqueued::Ready);
            }
        };
        Ok(taken)
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
    /// Another process may have finished the same payment already (it sent
    /// the same id): the same outcome keeps its `reported` mark, so it is
    /// shown once; a different one (a refused attempt, then a decision)
    /// replaces it.
    pub fn finish(
        &mut self,
        p: &Pending,
        status: &str,
        reason: Option<&str>,
        reported: bool,
    ) -> rusqlite::Result<()> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO finished (payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor,
                                   status, reason, finished_at, reported)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (payment_id) DO UPDATE SET
                 payer_user = excluded.payer_user, payer_bank = excluded.payer_bank,
                 payee_user = excluded.payee_user, payee_bank = excluded.payee_bank,
                 amount_minor = excluded.amount_minor, finished_at = excluded.finished_at,
                 reported = CASE WHEN finished.status = excluded.status AND finished.reason IS excluded.reason
                                 THEN MAX(finished.reported, excluded.reported) ELSE excluded.reported END,
                 status = excluded.status, reason = excluded.reason",
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
    /// marks them shown, in the same transaction, so that of two processes
    /// listing at once each outcome is shown by exactly one.
    pub fn take_unreported(&mut self) -> rusqlite::Result<Vec<Finished>> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
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
        for f in &rows {
            tx.execute("UPDATE finished SET reported = 1 WHERE payment_id = ?1", [&f.payment_id])?;
        }
        tx.commit()?;
        Ok(rows)
    }
}

fn session_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Session> {
    Ok(Session {
        who: UserRef { user: r.get(0)?, bank: r.get(1)? },
        token: Secret::new(r.get(2)?),
        expires_at: r.get(3)?,
    })
}

fn params_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(UserRef, UserRef, i64)> {
    Ok((
        UserRef { user: r.get(0)?, bank: r.get(1)? },
        UserRef { user: r.get(2)?, bank: r.get(3)? },
        r.get(4)?,
    ))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    /// Upper bound for a test's loops.
    const WAIT: Duration = Duration::from_secs(60);

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("strife-client-state-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn payment(id: &str, payee: &str, amount_minor: i64) -> Pending {
        Pending {
            payment_id: id.to_owned(),
            payer: UserRef::new("user1", "BankA").expect("payer"),
            payee: UserRef::new(payee, "BankB").expect("payee"),
            amount_minor,
            attempts: 0,
            last_error: None,
        }
    }

    #[test]
    fn one_id_enqueued_by_many_connections_at_once_is_one_payment() {
        let dir = temp_dir("enqueue");
        let p = payment("a", "user2", 100);
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (dir, p) = (dir.clone(), p.clone());
                std::thread::spawn(move || {
                    let mut state = ClientState::create(&dir).expect("create, all at once");
                    state.enqueue(&p).expect("enqueue")
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().expect("thread"), Enqueued::Ready);
        }
        let mut state = ClientState::open_existing(&dir).expect("open").expect("exists");
        assert_eq!(state.pending().expect("pending").len(), 1);
        let other = payment("a", "user2", 200);
        assert!(matches!(
            state.enqueue(&other),
            Ok(Enqueued::Taken { amount_minor: 100, decided: false, .. })
        ));

        // Decided: the same payment is queued again (the gateway answers
        // it as a replay); another one under its id is refused.
        state.finish(&p, "committed", None, true).expect("finish");
        assert!(matches!(state.enqueue(&other), Ok(Enqueued::Taken { decided: true, .. })));
        assert!(state.pending().expect("pending").is_empty(), "a refused id writes nothing");
        assert_eq!(state.enqueue(&p).expect("again"), Enqueued::Ready);
        assert_eq!(state.pending().expect("pending").len(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_outcome_is_shown_once_however_many_processes_finish_and_list() {
        let dir = temp_dir("unreported");
        let mut state = ClientState::create(&dir).expect("create");
        let ids: Vec<String> = (0..40).map(|i| format!("p{i}")).collect();
        for id in &ids {
            assert_eq!(state.enqueue(&payment(id, "user2", 1)).expect("enqueue"), Enqueued::Ready);
        }
        // The same outcome finished twice (two processes sent the same id)
        // keeps its mark: shown once.
        let shown = payment("shown", "user2", 1);
        state.enqueue(&shown).expect("enqueue");
        state.finish(&shown, "committed", None, true).expect("finish");
        state.finish(&shown, "committed", None, false).expect("finish again");
        assert!(state.take_unreported().expect("take").is_empty());

        let taken_total = std::sync::Arc::new(AtomicUsize::new(0));
        let finishers: Vec<_> = ids
            .chunks(10)
            .map(|chunk| {
                let (dir, chunk) = (dir.clone(), chunk.to_vec());
                std::thread::spawn(move || {
                    let mut state = ClientState::open_existing(&dir).expect("open").expect("exists");
                    for id in chunk {
                        state.finish(&payment(&id, "user2", 1), "committed", None, false).expect("finish");
                    }
                })
            })
            .collect();
        let takers: Vec<_> = (0..4)
            .map(|_| {
                let (dir, total) = (dir.clone(), taken_total.clone());
                std::thread::spawn(move || {
                    let mut state = ClientState::open_existing(&dir).expect("open").expect("exists");
                    let mut taken = Vec::new();
                    let deadline = Instant::now() + WAIT;
                    while total.load(Ordering::SeqCst) < 40 {
                        assert!(Instant::now() < deadline, "outcomes were lost");
                        let rows = state.take_unreported().expect("take");
                        total.fetch_add(rows.len(), Ordering::SeqCst);
                        taken.extend(rows.into_iter().map(|f| f.payment_id));
                    }
                    taken
                })
            })
            .collect();
        for f in finishers {
            f.join().expect("finisher");
        }
        let mut count: HashMap<String, usize> = HashMap::new();
        for t in takers {
            for id in t.join().expect("taker") {
                *count.entry(id).or_default() += 1;
            }
        }
        assert_eq!(count.len(), 40, "every outcome shown");
        assert!(count.values().all(|&n| n == 1), "none shown twice: {count:?}");
        let _ = std::fs::remove_dir_all(dir);
    }
}

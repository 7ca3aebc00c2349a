//! How every server opens its SQLite store, and how a store joins group
//! commit: one place for the durability settings.

use crate::group_commit::Batched;
use crate::storage::{StorageCause, StorageFailure};
use rusqlite::Connection;
use rusqlite::hooks::Wal;
use rusqlite::wal::CheckpointMode;
use std::ffi::c_int;
use std::path::Path;
use std::time::Duration;

/// Prepared statements kept per connection: more than any store uses.
const STATEMENT_CACHE: usize = 64;

/// WAL pages (16 MiB with 4 KiB pages) past which each commit wakes the
/// store's background checkpointer.
const WAL_BACKGROUND_PAGES: i32 = 4000;

/// WAL pages past which the writer checkpoints itself, after its commit,
/// instead of waking the background checkpointer: the bound on the WAL's
/// length (see [`checkpoint_in_background`]).
const WAL_WRITER_PAGES: i32 = 16_000;

/// Opens (creating if needed) a store with the durability every server
/// relies on: WAL, `synchronous=FULL` (a commit is on disk when it
/// returns), and 32 MiB of page cache so a large ledger's indexes stay in
/// memory. A new database file is created 0600 before SQLite opens it, so
/// its `-wal` and `-shm` files are 0600 too.
pub fn open_durable(path: &Path) -> rusqlite::Result<Connection> {
    crate::files::open_private_append(path).map_err(|e| {
        // Keep the cause: a full disk is not a missing directory.
        let code = match StorageCause::of_io(&e) {
            StorageCause::DiskFull => rusqlite::ffi::SQLITE_FULL,
            StorageCause::ReadOnly => rusqlite::ffi::SQLITE_READONLY,
            _ => rusqlite::ffi::SQLITE_CANTOPEN,
        };
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            Some(format!("{}: {e}", path.display())),
        )
    })?;
    let mut conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "cache_size", -32_768)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // Every statement on a hot path is prepared once and reused.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    checkpoint_in_background(&mut conn, path)?;
    Ok(conn)
}

/// Moves checkpoints (copying the WAL back into the database file, then
/// syncing it) off the writer's commits, onto a thread with a connection
/// of its own.
///
/// SQLite's automatic checkpoint runs inside the commit that crosses its
/// threshold, so that batch, and every payment waiting on it, waits while
/// thousands of pages are written at scattered places of a file that may
/// be gigabytes long, and synced. Here that commit only wakes the
/// checkpointer, which runs passive checkpoints while the writer goes on
/// appending.
///
/// A passive checkpointer alone cannot bound the WAL: SQLite rewinds it
/// only when a write transaction begins with every frame already copied,
/// which a writer that never pauses may never allow. So past
/// [`WAL_WRITER_PAGES`] the writer stops waking the checkpointer and
/// checkpoints itself after its commit (only what the checkpointer has not
/// copied yet is left); its next transaction then rewinds the WAL. Should
/// the checkpointer still hold the checkpoint lock, the writer tries again
/// after its next commit.
///
/// Durability does not change: a commit is durable once its WAL frames are
/// synced, and a checkpoint cut short (by `kill -9`, say) is redone from
/// the WAL at the next open.
fn checkpoint_in_background(conn: &mut Connection, path: &Path) -> rusqlite::Result<()> {
    let checkpointer = Connection::open(path)?;
    checkpointer.busy_timeout(Duration::from_secs(5))?;
    // Until a connection has read the database it does not know the file
    // is in WAL mode, and a checkpoint on it does nothing.
    checkpointer.pragma_update(None, "journal_mode", "WAL")?;
    let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
    let thread = std::thread::Builder::new()
        .name("strife-checkpoint".into())
        .spawn(move || {
            // Ends when the writer's connection is closed (see Checkpointer).
            while woken.recv().is_ok() {
                if let Err(e) = checkpointer.wal_checkpoint_v2(None::<&str>, CheckpointMode::PASSIVE)
                    && !busy(&e)
                {
                    tracing::warn!(error = %e, "background checkpoint failed; the writer checkpoints past its bound");
                }
            }
        })
        .map_err(|e| {
            rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                Some(format!("cannot start the checkpoint thread: {e}")),
            )
        })?;
    let checkpointer = Checkpointer { wake: Some(wake), thread: Some(thread) };
    conn.wal_hook(Some(move |wal: &mut Wal, pages: c_int| {
        if pages >= WAL_WRITER_PAGES {
            // Busy means the checkpointer is still at work: next commit.
            if let Err(e) = wal.checkpoint_v2(CheckpointMode::PASSIVE)
                && !busy(&e)
            {
                tracing::warn!(error = %e, "checkpoint failed");
            }
        } else if pages >= WAL_BACKGROUND_PAGES {
            checkpointer.wake();
        }
        // An error here would fail the statement whose commit already
        // happened: never return one.
        Ok(())
    }))
}

/// Makes a `state` column's CHECK a chain of comparisons,
/// `state = 'a' OR state = 'b' OR state = 'c'`, where the table was made with
/// `state IN ('a', 'b', 'c')`. SQLite evaluates an `IN` list of three or
/// more constants by building a temporary b-tree of the list, on every
/// insert and every update of the row: at the gateway that was two
/// temporary b-trees per payment (`pcache1TruncateUnsafe`, dropping each
/// one's cache, was 7 % of the store thread's time in a profile). The
/// chain accepts and refuses exactly the same values.
///
/// A CHECK constraint cannot be altered, and rebuilding a table of
/// millions of rows to change one would take minutes at open. A change
/// that leaves every stored row as it is may instead edit the table's
/// definition in `sqlite_schema`, SQLite's documented procedure for such
/// changes ("Making Other Kinds Of Table Schema Changes" in its ALTER
/// TABLE page): in one immediate transaction, with `writable_schema`, and
/// the schema version raised by one so that every connection reads the
/// new definition. Returns whether the definition changed; a table
/// already rewritten (or made with the chain) is left alone, so this runs
/// at every open.
pub fn state_check_as_comparisons(
    conn: &mut Connection,
    table: &str,
    states: &[&str],
) -> rusqlite::Result<bool> {
    let quoted: Vec<String> = states.iter().map(|s| format!("'{s}'")).collect();
    let from = format!("CHECK (state IN ({}))", quoted.join(", "));
    let to =
        format!("CHECK ({})", quoted.iter().map(|q| format!("state = {q}")).collect::<Vec<_>>().join(" OR "));
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let definition: String =
        tx.query_row("SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?1", [table], |r| {
            r.get(0)
        })?;
    if !definition.contains(&from) {
        return Ok(false);
    }
    let version: i64 = tx.pragma_query_value(None, "schema_version", |r| r.get(0))?;
    tx.pragma_update(None, "writable_schema", true)?;
    tx.execute(
        "UPDATE sqlite_schema SET sql = ?2 WHERE type = 'table' AND name = ?1",
        rusqlite::params![table, definition.replacen(&from, &to, 1)],
    )?;
    tx.pragma_update(None, "schema_version", version + 1)?;
    tx.pragma_update(None, "writable_schema", false)?;
    tx.commit()?;
    Ok(true)
}

/// A store built on one SQLite connection.
pub trait HasConnection: Send + 'static {
    fn connection(&mut self) -> &mut Connection;

    /// The batch's transaction began: the store may write what it owes
    /// (a fold of its log, say) before the batch's operations run.
    fn began(&mut self) {}

    /// The batch's transaction committed: what it wrote is durable.
    fn committed(&mut self) {}

    /// The batch's transaction failed with `failure` and was rolled back:
    /// nothing it wrote was kept, even what was answered before the commit
    /// ([`crate::group_commit::GroupCommit::run_before_commit`]).
    fn rolled_back(&mut self, _failure: &StorageFailure) {}
}

/// A SQLite error of the store's connection, with its file.
fn failure(conn: &Connection, e: &rusqlite::Error) -> StorageFailure {
    StorageFailure::sqlite(e, conn.path())
}

/// Group commit wraps a batch in one transaction; each operation inside
/// uses a savepoint.
impl<T: HasConnection> Batched for T {
    fn begin(&mut self) -> Result<(), StorageFailure> {
        let conn = self.connection();
        conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| failure(conn, &e))?;
        self.began();
        Ok(())
    }
    fn commit(&mut self) -> Result<(), StorageFailure> {
        let conn = self.connection();
        conn.execute_batch("COMMIT").map_err(|e| failure(conn, &e))?;
        self.committed();
        Ok(())
    }
    fn rollback(&mut self, failure: &StorageFailure) {
        // After SQLITE_FULL or an I/O error in COMMIT the transaction may
        // still be open (or SQLite may have rolled it back already): roll
        // back so the next batch starts clean.
        let conn = self.connection();
        if !conn.is_autocommit()
            && let Err(e) = conn.execute_batch("ROLLBACK")
        {
            tracing::error!(error = %e, "cannot roll back a failed batch");
        }
        self.rolled_back(failure);
    }
}

/// A savepoint around one operation inside a group-commit batch, like
/// `rusqlite::Savepoint` but with its three statements prepared once per
/// connection instead of parsed at every use (operations run thousands of
/// times a second). Rolled back unless [`Savepoint::commit`] is called.
pub struct Savepoint<'c> {
    conn: &'c Connection,
    open: bool,
}

impl<'c> Savepoint<'c> {
    pub fn new(conn: &'c Connection) -> rusqlite::Result<Savepoint<'c>> {
        conn.prepare_cached("SAVEPOINT op")?.execute([])?;
        Ok(Savepoint { conn, open: true })
    }

    /// Keeps the operation's changes (they become durable with the batch).
    pub fn commit(mut self) -> rusqlite::Result<()> {
        self.open = false;
        self.conn.prepare_cached("RELEASE op")?.execute([])?;
        Ok(())
    }
}

impl Drop for Savepoint<'_> {
    fn drop(&mut self) {
        if self.open {
            // Undo the operation, then close the savepoint.
            let undo = self.conn.prepare_cached("ROLLBACK TO op").and_then(|mut s| s.execute([]));
            let close = self.conn.prepare_cached("RELEASE op").and_then(|mut s| s.execute([]));
            if let Err(e) = undo.and(close) {
                tracing::error!(error = %e, "cannot roll back an operation's savepoint");
            }
        }
    }
}

impl std::ops::Deref for Savepoint<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

/// The background checkpointer's thread, owned by the writer's WAL hook:
/// SQLite drops the hook when the writer's connection is closed, and the
/// thread is joined then, so once a store is closed no connection of it is
/// left open (a test or a tool may then change the file's journal mode).
struct Checkpointer {
    wake: Option<std::sync::mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn wake(&self) {
        // At most one wake-up waits; the checkpointer takes everything
        // committed by the time it starts.
        if let Some(wake) = &self.wake {
            let _ = wake.try_send(());
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // The thread's loop ends when the channel closes; its connection
        // closes as it returns.
        drop(self.wake.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the checkpoint thread panicked");
        }
    }
}

/// Another checkpoint holds the lock: not a failure, only a later turn.
fn busy(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_durable_store_has_the_durability_settings() {
        let dir = std::env::temp_dir().join(format!("strife-durable-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let conn = open_durable(&dir.join("s.db")).expect("open");
        let pragma = |name: &str| -> String {
            conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, rusqlite::types::Value>(0))
                .map(|v| format!("{v:?}"))
                .expect("pragma")
        };
        assert_eq!(pragma("journal_mode"), "Text(\"wal\")");
        assert_eq!(pragma("synchronous"), "Integer(2)", "FULL");
        assert_eq!(pragma("cache_size"), "Integer(-32768)");
        // Replaced by the store's own WAL hook (checkpoint_in_background).
        assert_eq!(pragma("wal_autocheckpoint"), "Integer(0)");
        assert_eq!(pragma("busy_timeout"), "Integer(5000)");
        drop(conn);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Frames in a WAL file of this length (32-byte header, then frames of a
    /// 24-byte header and a page each).
    fn frames(wal: &Path, page: u64) -> u64 {
        std::fs::metadata(wal).map(|m| m.len().saturating_sub(32) / (24 + page)).unwrap_or(0)
    }

    #[test]
    fn checkpoints_run_off_the_writer_and_the_wal_stays_bounded() {
        const PAGE: u64 = 1024;
        let dir = std::env::temp_dir().join(format!("strife-checkpoint-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let (db, wal) = (dir.join("s.db"), dir.join("s.db-wal"));
        // Small pages keep the test's files small; the thresholds count pages.
        Connection::open(&db)
            .and_then(|c| c.execute_batch(&format!("PRAGMA page_size = {PAGE}; CREATE TABLE t (b BLOB)")))
            .expect("a database with 1 KiB pages");
        let conn = open_durable(&db).expect("open");
        let db_pages = || std::fs::metadata(&db).expect("db").len() / PAGE;
        // About 100 pages per transaction.
        let write = |n: usize| {
            for _ in 0..n {
                conn.execute_batch("BEGIN; WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < 100) INSERT INTO t SELECT randomblob(1000) FROM r; COMMIT")
                    .expect("write");
            }
        };

        // Past the background threshold, but well short of the writer's own:
        // only the background checkpointer can have copied pages into the
        // database file.
        write(usize::try_from(WAL_BACKGROUND_PAGES).expect("pages") / 100 + 5);
        assert!(frames(&wal, PAGE) < u64::try_from(WAL_WRITER_PAGES).expect("pages"));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while db_pages() < u64::try_from(WAL_BACKGROUND_PAGES).expect("pages") {
            assert!(
                std::time::Instant::now() < deadline,
                "no background checkpoint: the database has {} pages",
                db_pages()
            );
            std::thread::sleep(Duration::from_millis(10));
        }

        // Three times the writer's bound, written without a pause: the WAL
        // is rewound and never grows far past the bound.
        write(usize::try_from(3 * WAL_WRITER_PAGES).expect("pages") / 100);
        let most = u64::try_from(WAL_WRITER_PAGES + 2_000).expect("pages");
        assert!(frames(&wal, PAGE) <= most, "the WAL holds {} frames", frames(&wal, PAGE));
        let rows: i64 = conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).expect("count");
        assert_eq!(
            rows,
            (i64::from(WAL_BACKGROUND_PAGES) / 100 + 5 + i64::from(3 * WAL_WRITER_PAGES) / 100) * 100
        );
        drop(conn);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The opcodes SQLite runs for `sql` (with every parameter null).
    fn opcodes(conn: &Connection, sql: &str) -> Vec<String> {
        let mut stmt = conn.prepare(&format!("EXPLAIN {sql}")).expect("explain");
        let nulls = vec![rusqlite::types::Null; stmt.parameter_count()];
        let rows = stmt.query_map(rusqlite::params_from_iter(nulls), |r| r.get(1)).expect("opcodes");
        rows.collect::<rusqlite::Result<_>>().expect("opcode rows")
    }

    #[test]
    fn a_state_check_becomes_comparisons_with_no_temporary_b_tree_and_the_same_rows() {
        let dir = std::env::temp_dir().join(format!("strife-state-check-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let db = dir.join("s.db");
        let mut conn = open_durable(&db).expect("open");
        conn.execute_batch(
            "CREATE TABLE t (k INTEGER PRIMARY KEY, state TEXT NOT NULL CHECK (state IN ('a', 'b', 'c')), n INTEGER) STRICT;
             INSERT INTO t VALUES (1, 'a', 10), (2, 'c', 20);",
        )
        .expect("table");
        // Opened before the change: it must see the new definition too.
        let other = Connection::open(&db).expect("second connection");
        let insert = "INSERT INTO t (k, state, n) VALUES (?1, ?2, ?3)";
        let update = "UPDATE t SET state = ?2 WHERE k = ?1";
        for sql in [insert, update] {
            assert!(opcodes(&conn, sql).contains(&"OpenEphemeral".to_owned()), "the IN list builds a b-tree");
        }
        let others_before: i64 = other.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).expect("read");

        assert!(state_check_as_comparisons(&mut conn, "t", &["a", "b", "c"]).expect("rewrite"));
        assert!(!state_check_as_comparisons(&mut conn, "t", &["a", "b", "c"]).expect("again"), "only once");
        let definition: String =
            conn.query_row("SELECT sql FROM sqlite_schema WHERE name = 't'", [], |r| r.get(0)).expect("sql");
        assert!(definition.contains("CHECK (state = 'a' OR state = 'b' OR state = 'c')"), "{definition}");
        let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).expect("check");
        assert_eq!(integrity, "ok");
        // A connection notices the new schema version at its next statement,
        // and compiles its statements anew.
        let others_after: i64 = other.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).expect("read");
        assert_eq!((others_before, others_after), (2, 2));
        for c in [&conn, &other, &Connection::open(&db).expect("a later connection")] {
            for sql in [insert, update] {
                assert!(!opcodes(c, sql).contains(&"OpenEphemeral".to_owned()), "no b-tree for {sql}");
            }
        }
        // The same values pass and fail, through every connection.
        conn.execute(insert, rusqlite::params![3, "b", 30]).expect("a valid state");
        other.execute(update, rusqlite::params![1, "c"]).expect("a valid state, other connection");
        for (c, k) in [(&conn, 4), (&other, 5)] {
            let refused = c.execute(insert, rusqlite::params![k, "d", 0]).expect_err("an invalid state");
            assert!(refused.to_string().contains("CHECK constraint failed"), "{refused}");
        }
        assert!(conn.execute(update, rusqlite::params![2, "B"]).is_err(), "compared exactly, as IN did");
        let rows: Vec<(i64, String, i64)> = conn
            .prepare("SELECT k, state, n FROM t ORDER BY k")
            .expect("prepare")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(rows, vec![(1, "c".to_owned(), 10), (2, "c".to_owned(), 20), (3, "b".to_owned(), 30)]);
        drop((conn, other));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_savepoint_keeps_or_undoes_one_operation_inside_a_transaction() {
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch("CREATE TABLE t (x INTEGER); BEGIN").expect("setup");
        let sp = Savepoint::new(&conn).expect("savepoint");
        sp.execute("INSERT INTO t VALUES (1)", []).expect("insert");
        sp.commit().expect("release");
        {
            let sp = Savepoint::new(&conn).expect("savepoint");
            sp.execute("INSERT INTO t VALUES (2)", []).expect("insert");
            // dropped without commit: undone
        }
        let sp = Savepoint::new(&conn).expect("savepoint, reused statements");
        sp.execute("INSERT INTO t VALUES (3)", []).expect("insert");
        sp.commit().expect("release");
        conn.execute_batch("COMMIT").expect("commit");
        let xs: Vec<i64> = conn
            .prepare("SELECT x FROM t ORDER BY x")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(xs, vec![1, 3]);
    }
}

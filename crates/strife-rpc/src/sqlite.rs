//! How every server opens its SQLite store, and how a store joins group
//! commit: one place for the durability settings.

use crate::group_commit::Batched;
use crate::storage::{StorageCause, StorageFailure};
use rusqlite::Connection;
use std::path::Path;
use std::time::Duration;

/// Prepared statements kept per connection: more than any store uses.
const STATEMENT_CACHE: usize = 64;

/// WAL pages between automatic checkpoints (16 MiB with 4 KiB pages).
const WAL_CHECKPOINT_PAGES: u32 = 4000;

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
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "cache_size", -32_768)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // Every statement on a hot path is prepared once and reused.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // Checkpoint (copy the WAL back into the database, with its own fsync)
    // every 4,000 pages rather than SQLite's 1,000: the store's thread does
    // it inside a commit, so fewer, larger checkpoints stall it less, and a
    // page written by many batches is copied once.
    conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)?;
    Ok(conn)
}

/// A store built on one SQLite connection.
pub trait HasConnection: Send + 'static {
    fn connection(&mut self) -> &mut Connection;

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
        conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| failure(conn, &e))
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
        assert_eq!(pragma("wal_autocheckpoint"), format!("Integer({WAL_CHECKPOINT_PAGES})"));
        assert_eq!(pragma("busy_timeout"), "Integer(5000)");
        drop(conn);
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

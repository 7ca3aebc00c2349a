//! How every server opens its SQLite store, and how a store joins group
//! commit: one place for the durability settings.

use crate::group_commit::Batched;
use rusqlite::Connection;
use std::path::Path;
use std::time::Duration;

/// Prepared statements kept per connection: more than any store uses.
const STATEMENT_CACHE: usize = 64;

/// Opens (creating if needed) a store with the durability every server
/// relies on: WAL, `synchronous=FULL` (a commit is on disk when it
/// returns), and 32 MiB of page cache so a large ledger's indexes stay in
/// memory.
pub fn open_durable(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "cache_size", -32_768)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // Every statement on a hot path is prepared once and reused.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// A store built on one SQLite connection.
pub trait HasConnection: Send + 'static {
    fn connection(&mut self) -> &mut Connection;
}

/// Group commit wraps a batch in one transaction; each operation inside
/// uses a savepoint.
impl<T: HasConnection> Batched for T {
    fn begin(&mut self) -> Result<(), String> {
        self.connection().execute_batch("BEGIN IMMEDIATE").map_err(|e| e.to_string())
    }
    fn commit(&mut self) -> Result<(), String> {
        self.connection().execute_batch("COMMIT").map_err(|e| e.to_string())
    }
    fn rollback(&mut self) {
        let _ = self.connection().execute_batch("ROLLBACK");
    }
}

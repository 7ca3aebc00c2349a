//! Per-customer history in SQLite without a per-customer index on the
//! write path: a log's rows are *folded* into append-only runs sorted by
//! customer. The gateway folds its payments, a bank its legs.
//!
//! An index keyed by customer puts each new row's entries at the end of
//! those customers' runs. Once every customer has more than a page of
//! history, each of those ends is a page of its own, so a batch writes
//! about one page per entry into a tree of gigabytes, to the WAL and again
//! at the checkpoint. Measured in the tenth session (BENCHMARKS.md): with
//! those indexes dropped, a ledger of 10,000,000 payments ran as fast as a
//! fresh one.
//!
//! Instead, every [`FOLD_ROWS`] rows of the log (by rowid, the order they
//! are stored in), the entries of the rows since the last fold are sorted
//! by customer and appended as one *fold*:
//!
//! - `history_entries (fold, party, at, txn_id) → row`: a fold's entries.
//!   The fold number leads the key, so a fold is written where the tree
//!   ends, in order: a few dozen pages for 4,096 rows.
//! - `history_parties (fold, party) → prev_fold`: each customer in the
//!   fold and the previous fold they are in, so a reader skips the folds a
//!   customer is not in.
//! - `history_heads (party) → fold`: each customer's newest fold, one small
//!   row per customer (a few dozen pages for thousands of customers).
//! - `history_folds (fold) → last_row, max_at`: the last row a fold covers,
//!   and the newest time in it or in any older fold.
//!
//! A reader takes the rows stored since the last fold (at most a fold's
//! worth, by rowid), then walks the customer's folds from the newest
//! ([`walk`]) and stops once its page is full of entries newer than
//! anything the folds left hold (`max_at`): the same entries, in the same
//! order, as a per-customer index gave.
//!
//! A fold runs inside one of the store's group-commit batches (at the
//! gateway, the batch of the payment that completes a fold's worth; at a
//! bank, the next batch to begin), under a savepoint ([`fold_in_batch`]),
//! so it commits or rolls back with that batch. The rows stay the source
//! of truth: a store opened with a fold's worth or more unfolded (a log
//! from before folds, or a fill) folds it then ([`catch_up`]), a fold per
//! transaction.

use rusqlite::{Connection, OptionalExtension, params};
use std::cmp::Ordering;

/// Rows per fold: the most a history read takes from outside the folds,
/// and the spacing of the folds' writes.
pub const FOLD_ROWS: i64 = 4096;

/// The folds' tables. Idempotent (`IF NOT EXISTS`).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS history_folds (
    fold     INTEGER PRIMARY KEY,
    -- the last rowid this fold covers (the rows after the previous fold's
    -- last_row, up to this one)
    last_row INTEGER NOT NULL,
    -- the newest time in this fold or in any older one
    max_at   INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS history_entries (
    fold   INTEGER NOT NULL,
    -- the customer (user@bank at the gateway, the user at a bank)
    party  TEXT NOT NULL,
    at     INTEGER NOT NULL,
    txn_id TEXT NOT NULL,
    -- the row's rowid in the log
    row    INTEGER NOT NULL,
    PRIMARY KEY (fold, party, at, txn_id)
) STRICT, WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history_parties (
    fold      INTEGER NOT NULL,
    party     TEXT NOT NULL,
    -- the previous fold this customer is in; NULL for their first
    prev_fold INTEGER,
    PRIMARY KEY (fold, party)
) STRICT, WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history_heads (
    party TEXT PRIMARY KEY,
    fold  INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
";

/// A log to fold: `rows` selects, for the rows with rowid above `?1` up
/// to `?2`, `(rowid, a customer, another customer, at, txn_id)`, either
/// customer NULL when the row has none on that side; `table` is the log's
/// table.
#[derive(Debug, Clone, Copy)]
pub struct Log {
    pub table: &'static str,
    pub rows: &'static str,
}

/// How far a log is folded: its newest fold, the last row that fold
/// covers, and the newest time folded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Folded {
    pub fold: i64,
    pub last_row: i64,
    pub max_at: i64,
}

impl Folded {
    const NONE: Folded = Folded { fold: 0, last_row: 0, max_at: i64::MIN };
}

/// The newest fold, as stored (the newest fold's row is never dropped).
pub fn folded(conn: &Connection) -> rusqlite::Result<Folded> {
    Ok(conn
        .prepare_cached("SELECT fold, last_row, max_at FROM history_folds ORDER BY fold DESC LIMIT 1")?
        .query_row([], |r| Ok(Folded { fold: r.get(0)?, last_row: r.get(1)?, max_at: r.get(2)? }))
        .optional()?
        .unwrap_or(Folded::NONE))
}

/// The log's newest rowid, 0 when it is empty.
pub fn last_row(conn: &Connection, log: Log) -> rusqlite::Result<i64> {
    conn.prepare_cached(&format!("SELECT coalesce(max(rowid), 0) FROM {}", log.table))?
        .query_row([], |r| r.get(0))
}

/// Folds the rows stored after the last fold, up to rowid `upto`, into one
/// new fold, and returns it. Several statements: the caller runs it in a
/// transaction or under a savepoint, so it happens whole or not at all.
pub fn fold(conn: &Connection, log: Log, upto: i64) -> rusqlite::Result<Folded> {
    let from = folded(conn)?;
    if upto <= from.last_row {
        // Already folded (the caller's idea of how far was behind).
        return Ok(from);
    }
    let fold = from.fold + 1;
    // Set-based, in SQLite: the entries of both sides, in key order (the
    // fold is appended page after page); a row with the same customer on
    // both sides is listed once.
    conn.prepare_cached(&format!(
        "WITH r (rid, a, b, t, txn) AS ({})
         INSERT INTO history_entries (fold, party, at, txn_id, row)
         SELECT ?3, a, t, txn, rid FROM r WHERE a IS NOT NULL
         UNION ALL
         SELECT ?3, b, t, txn, rid FROM r WHERE b IS NOT NULL AND b IS NOT a
         ORDER BY 2, 3, 4",
        log.rows
    ))?
    .execute(params![from.last_row, upto, fold])?;
    // Each customer in the fold, linked to their previous fold, then
    // made their newest (`WHERE true`: how an upsert's SELECT is written).
    conn.prepare_cached(
        "INSERT INTO history_parties (fold, party, prev_fold)
         SELECT ?1, e.party, (SELECT h.fold FROM history_heads h WHERE h.party = e.party)
         FROM history_entries e WHERE e.fold = ?1 GROUP BY e.party",
    )?
    .execute([fold])?;
    conn.prepare_cached(
        "INSERT INTO history_heads (party, fold) SELECT party, fold FROM history_parties WHERE fold = ?1 AND true
         ON CONFLICT (party) DO UPDATE SET fold = excluded.fold",
    )?
    .execute([fold])?;
    let newest: Option<i64> = conn
        .prepare_cached("SELECT max(at) FROM history_entries WHERE fold = ?1")?
        .query_row([fold], |r| r.get(0))?;
    let max_at = newest.map_or(from.max_at, |t| t.max(from.max_at));
    conn.prepare_cached("INSERT INTO history_folds (fold, last_row, max_at) VALUES (?1, ?2, ?3)")?
        .execute(params![fold, upto, max_at])?;
    Ok(Folded { fold, last_row: upto, max_at })
}

/// [`fold`] under a savepoint, inside whatever transaction is open: a fold
/// that fails leaves that transaction as it was, and is logged; the next
/// row tries again. Returns how far the log is folded when it succeeded.
pub fn fold_in_batch(conn: &Connection, log: Log, upto: i64) -> Option<Folded> {
    let folded = conn.execute_batch("SAVEPOINT fold").and_then(|()| match fold(conn, log, upto) {
        Ok(f) => conn.execute_batch("RELEASE fold").map(|()| f),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO fold; RELEASE fold");
            Err(e)
        }
    });
    folded
        .inspect_err(
            |e| tracing::warn!(error = %e, table = log.table, "could not fold rows for history; will retry"),
        )
        .ok()
}

/// Folds whole folds' worth of the log, each in its own transaction, until
/// fewer than `fold_rows` rows are left unfolded: at open, so a log from
/// before folds (or filled by hand) is folded once, and a crash half-way
/// resumes where it stopped. Returns how far the log is folded.
pub fn catch_up(conn: &mut Connection, log: Log, fold_rows: i64) -> rusqlite::Result<Folded> {
    let mut now = folded(conn)?;
    let last = last_row(conn, log)?;
    while last - now.last_row >= fold_rows {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        now = fold(&tx, log, now.last_row + fold_rows)?;
        tx.commit()?;
    }
    Ok(now)
}

/// A store's side of folding, shared by the gateway and the banks: how far
/// its log is folded as far as its connection knows, and the rows per fold.
/// The position is a hint for when to fold: a fold reads where the log is
/// folded to from the store, and one for rows already folded does nothing.
#[derive(Debug)]
pub struct Folding {
    log: Log,
    folded_to: i64,
    fold_rows: i64,
}

impl Folding {
    /// At open: folds what a fold's worth or more left unfolded
    /// ([`catch_up`]), and starts from there.
    pub fn open(conn: &mut Connection, log: Log, fold_rows: i64) -> rusqlite::Result<Folding> {
        let folded = catch_up(conn, log, fold_rows)?;
        Ok(Folding { log, folded_to: folded.last_row, fold_rows })
    }

    /// The last row folded, as far as this connection knows.
    pub fn folded_to(&self) -> i64 {
        self.folded_to
    }

    /// With `newest` the log's newest row: once a fold's worth of rows waits
    /// past the last fold, folds it, inside the open batch ([`fold_in_batch`]).
    pub fn after_row(&mut self, conn: &Connection, newest: i64) {
        if newest - self.folded_to >= self.fold_rows
            && let Some(f) = fold_in_batch(conn, self.log, self.folded_to + self.fold_rows)
        {
            self.folded_to = f.last_row;
        }
    }

    /// The batch was rolled back: a fold in it is gone with it.
    pub fn rolled_back(&mut self, conn: &Connection) {
        if let Ok(f) = folded(conn) {
            self.folded_to = f.last_row;
        }
    }
}

/// After rows are deleted from the log: drops the folds none of whose rows
/// is left, from the oldest, but never the newest fold's row, which says
/// how far the log is folded. Returns how many folds went.
pub fn drop_emptied(conn: &Connection, log: Log) -> rusqlite::Result<usize> {
    let newest = folded(conn)?.fold;
    let below: Option<i64> = conn
        .prepare_cached(&format!(
            "SELECT max(fold) FROM history_folds
             WHERE last_row < coalesce((SELECT min(rowid) FROM {}), 9223372036854775807) AND fold < ?1",
            log.table
        ))?
        .query_row([newest], |r| r.get(0))?;
    let Some(below) = below else { return Ok(0) };
    conn.prepare_cached("DELETE FROM history_entries WHERE fold <= ?1")?.execute([below])?;
    conn.prepare_cached("DELETE FROM history_parties WHERE fold <= ?1")?.execute([below])?;
    conn.prepare_cached("DELETE FROM history_folds WHERE fold <= ?1")?.execute([below])
}

/// One page of `party`'s history: `got` holds what the rows since the last
/// fold gave; the walk adds each of the party's folds from the newest
/// (`read_fold(fold)`: that fold's entries on the page, in page order, at
/// most `want`), and stops once it holds `want` entries all newer than any
/// fold left, or no fold left can hold one at or after `start`. `at` is an
/// entry's time and `order` the page order (newest first). Returns at
/// most `want` entries, in page order.
#[allow(clippy::too_many_arguments)]
pub fn walk<T, E: From<rusqlite::Error>>(
    conn: &Connection,
    party: &str,
    want: usize,
    start: i64,
    mut got: Vec<T>,
    at: impl Fn(&T) -> i64,
    order: impl Fn(&T, &T) -> Ordering,
    mut read_fold: impl FnMut(i64) -> Result<Vec<T>, E>,
) -> Result<Vec<T>, E> {
    if want == 0 {
        return Ok(Vec::new());
    }
    got.sort_by(&order);
    got.truncate(want);
    let mut next: Option<i64> = conn
        .prepare_cached("SELECT fold FROM history_heads WHERE party = ?1")?
        .query_row([party], |r| r.get(0))
        .optional()?;
    let mut max_at = conn.prepare_cached("SELECT max_at FROM history_folds WHERE fold = ?1")?;
    let mut prev =
        conn.prepare_cached("SELECT prev_fold FROM history_parties WHERE fold = ?1 AND party = ?2")?;
    while let Some(fold) = next {
        // A fold dropped after a prune: nothing older is left either.
        let Some(newest) = max_at.query_row([fold], |r| r.get::<_, i64>(0)).optional()? else { break };
        let full_and_newer = got.get(want - 1).is_some_and(|last| at(last) > newest);
        if newest < start || full_and_newer {
            break;
        }
        got.extend(read_fold(fold)?);
        got.sort_by(&order);
        got.truncate(want);
        next = prev.query_row(params![fold, party], |r| r.get(0)).optional()?.flatten();
    }
    Ok(got)
}

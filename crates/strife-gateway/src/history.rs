//! A customer's payments for history pages (SQLite backend, schema
//! version 10), read through the folds of [`strife_rpc::folds`] instead of
//! a payer and a payee index that every payment wrote into.
//!
//! A fold's entries name the payer and the payee (`user@bank`); a page
//! reads the payments stored since the last fold by rowid, then the
//! customer's folds, newest first. The order is `(created_at, txn_id)`
//! descending, exactly as the indexes gave it, and a received payment is
//! listed only once committed (read from the payment row, so a decision
//! after the fold shows).
//!
//! The store numbers the rows itself ([`Store::begin_payment`] gives each
//! its rowid), never at or below the last folded row, so a log pruned empty
//! does not reuse row numbers a fold already covers.
//!
//! [`Store::begin_payment`]: crate::store::Store::begin_payment

use crate::store::{Cursor, PAYMENT_COLUMNS, PageQuery, PaymentPage, PaymentRecord, payment_from_row};
use rusqlite::{Connection, params};
use std::sync::LazyLock;
use strife_core::UserRef;
use strife_core::limits::HISTORY_PAGE_MAX;
use strife_rpc::folds::{self, Log};

/// The payments, folded by payer and payee.
pub(crate) const LOG: Log = Log {
    table: "payments",
    rows: "SELECT rowid, payer_user || '@' || payer_bank, payee_user || '@' || payee_bank, created_at, txn_id
           FROM payments WHERE rowid > ?1 AND rowid <= ?2",
};

/// The payments stored since the last fold (rowid above `?6`) on the page
/// of `?1`: sent (any state) or received (committed), created from `?2` on
/// and below `(?3, ?4)`, newest first, at most `?5`. A range of rowids, at
/// most a fold's worth of rows whatever the log's size; `NOT INDEXED` keeps
/// the plan on it whatever a later `ANALYZE` says.
pub(crate) static PAGE_RECENT_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {PAYMENT_COLUMNS} FROM payments NOT INDEXED
         WHERE rowid > ?6 AND created_at >= ?2 AND (created_at, txn_id) < (?3, ?4)
           AND (payer_user || '@' || payer_bank = ?1
                OR (payee_user || '@' || payee_bank = ?1 AND state = 'committed'))
         ORDER BY created_at DESC, txn_id DESC LIMIT ?5"
    )
});

/// Fold `?6`'s entries of `?1` within the same bounds, newest first, at
/// most `?5`: one range of the fold's key, already in page order, and each
/// payment by its rowid. An entry where the customer is the payee is
/// listed only once that payment is committed.
pub(crate) static PAGE_FOLD_SQL: LazyLock<String> = LazyLock::new(|| {
    let columns: Vec<String> = PAYMENT_COLUMNS.split(',').map(|c| format!("p.{}", c.trim())).collect();
    format!(
        "SELECT {} FROM history_entries e CROSS JOIN payments p
         WHERE e.fold = ?6 AND e.party = ?1 AND e.at >= ?2 AND (e.at, e.txn_id) < (?3, ?4)
           AND p.rowid = e.row AND p.txn_id = e.txn_id
           AND (p.payer_user || '@' || p.payer_bank = ?1 OR p.state = 'committed')
         ORDER BY e.at DESC, e.txn_id DESC LIMIT ?5",
        columns.join(", ")
    )
});

/// One page of `who`'s payments.
pub(crate) fn page(conn: &Connection, who: &UserRef, q: &PageQuery) -> rusqlite::Result<PaymentPage> {
    let limit = q.limit.clamp(1, HISTORY_PAGE_MAX) as usize;
    // One more than the page, to know whether another follows.
    let want = limit + 1;
    let start = q.start_ms.unwrap_or(i64::MIN);
    // `(created_at, txn_id) < (end, '')` is `created_at < end`: no txn id
    // sorts below the empty string. The cursor, when there is one, is the
    // tighter bound.
    let end = (q.end_ms.unwrap_or(i64::MAX), "");
    let upper = match &q.after {
        Some(c) if (c.created_at_ms, c.txn_id.as_str()) < end => (c.created_at_ms, c.txn_id.as_str()),
        _ => end,
    };
    let party = who.to_string();
    let want_param = want as i64;
    // The recent payments (`x`: the last folded row) or a fold's (`x`: the fold).
    let read = |sql: &str, x: i64| -> rusqlite::Result<Vec<PaymentRecord>> {
        conn.prepare_cached(sql)?
            .query_map(params![party, start, upper.0, upper.1, want_param, x], payment_from_row)?
            .collect()
    };
    let recent = read(&PAGE_RECENT_SQL, folds::folded(conn)?.last_row)?;
    let mut got = folds::walk(
        conn,
        &party,
        want,
        start,
        recent,
        |p| p.created_at_ms,
        |a, b| (b.created_at_ms, b.txn_id.as_str()).cmp(&(a.created_at_ms, a.txn_id.as_str())),
        |fold| read(&PAGE_FOLD_SQL, fold),
    )?;
    let more = got.len() > limit;
    got.truncate(limit);
    let next = if more { got.last().map(Cursor::after) } else { None };
    Ok(PaymentPage { payments: got, next })
}

//! A store's failure said plainly: what caused it ([`StorageCause`]), and
//! the one place every server reports it ([`report`]).
//!
//! Failures that come from the machine rather than from the code (a full
//! disk, an I/O error, a file that cannot be opened, a read-only file
//! system) are the operator's to fix: servers answer them UNAVAILABLE
//! (`STORAGE_UNAVAILABLE`) naming the server and the cause, so that a
//! client keeps the payment queued and retries it once space is back.

use std::fmt;

/// The `tracing` target of every storage failure report. The metric of
/// storage failures (and the dashboard's "disk full" alarm) hooks in here:
/// one event per failure, with the fields `store` (the server), `cause`
/// ([`StorageCause::code`]) and `error`.
pub const TRACING_TARGET: &str = "strife::storage";

/// What a store's failure was caused by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageCause {
    /// The file system is full (`SQLITE_FULL`, `ENOSPC`).
    DiskFull,
    /// Reading or writing a file failed (`SQLITE_IOERR*`, `EIO`).
    Io,
    /// The store's files cannot be opened (`SQLITE_CANTOPEN`).
    CannotOpen,
    /// The file or the file system is read-only (`SQLITE_READONLY`, `EROFS`;
    /// PostgreSQL's `read_only_sql_transaction`, 25006: a standby, or
    /// `default_transaction_read_only`).
    ReadOnly,
    /// The database server ran out of memory (`SQLITE_NOMEM`; PostgreSQL's
    /// `out_of_memory`, 53200).
    OutOfMemory,
    /// The database server refuses more connections (PostgreSQL's
    /// `too_many_connections`, 53300: `max_connections` reached).
    TooManyConnections,
    /// Anything else: a fault of the code or the data, not of the machine.
    Other,
}

impl StorageCause {
    /// Every cause, for sums over the metric's labels.
    pub const ALL: [StorageCause; 7] = [
        StorageCause::DiskFull,
        StorageCause::Io,
        StorageCause::CannotOpen,
        StorageCause::ReadOnly,
        StorageCause::OutOfMemory,
        StorageCause::TooManyConnections,
        StorageCause::Other,
    ];

    /// The cause of a SQLite error.
    pub fn of(e: &rusqlite::Error) -> StorageCause {
        use rusqlite::ErrorCode;
        match e.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => StorageCause::DiskFull,
            Some(ErrorCode::SystemIoFailure) => StorageCause::Io,
            Some(ErrorCode::CannotOpen) => StorageCause::CannotOpen,
            Some(ErrorCode::ReadOnly) => StorageCause::ReadOnly,
            Some(ErrorCode::OutOfMemory) => StorageCause::OutOfMemory,
            _ => StorageCause::Other,
        }
    }

    /// The cause of a PostgreSQL error, by its SQLSTATE: `disk_full` (53100),
    /// `io_error` (58030), `out_of_memory` (53200), `too_many_connections`
    /// (53300), `read_only_sql_transaction` (25006). A server out of reach
    /// (a broken connection, class 08) is not a storage failure: the caller
    /// tells it apart first (another gateway may reach the database).
    pub fn of_postgres(e: &tokio_postgres::Error) -> StorageCause {
        use tokio_postgres::error::SqlState;
        match e.code() {
            Some(c) if *c == SqlState::DISK_FULL => StorageCause::DiskFull,
            Some(c) if *c == SqlState::IO_ERROR => StorageCause::Io,
            Some(c) if *c == SqlState::OUT_OF_MEMORY => StorageCause::OutOfMemory,
            Some(c) if *c == SqlState::TOO_MANY_CONNECTIONS => StorageCause::TooManyConnections,
            Some(c) if *c == SqlState::READ_ONLY_SQL_TRANSACTION => StorageCause::ReadOnly,
            _ => StorageCause::Other,
        }
    }

    /// The cause of an operating system's error.
    pub fn of_io(e: &std::io::Error) -> StorageCause {
        use std::io::ErrorKind;
        match e.kind() {
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded => StorageCause::DiskFull,
            ErrorKind::ReadOnlyFilesystem => StorageCause::ReadOnly,
            ErrorKind::NotFound | ErrorKind::PermissionDenied => StorageCause::CannotOpen,
            _ => StorageCause::Io,
        }
    }

    /// Whether the machine, not the code, is at fault: the server cannot
    /// serve until an operator frees space or mends the disk.
    pub fn is_environment(self) -> bool {
        self != StorageCause::Other
    }

    /// For a person: "disk full", "I/O error", …
    pub fn text(self) -> &'static str {
        match self {
            StorageCause::DiskFull => "disk full",
            StorageCause::Io => "I/O error",
            StorageCause::CannotOpen => "cannot open its files",
            StorageCause::ReadOnly => "read-only file system",
            StorageCause::OutOfMemory => "out of memory",
            StorageCause::TooManyConnections => "too many database connections",
            StorageCause::Other => "storage error",
        }
    }

    /// Stable snake_case, for logs and the metric's label.
    pub fn code(self) -> &'static str {
        match self {
            StorageCause::DiskFull => "disk_full",
            StorageCause::Io => "io_error",
            StorageCause::CannotOpen => "cannot_open",
            StorageCause::ReadOnly => "read_only",
            StorageCause::OutOfMemory => "out_of_memory",
            StorageCause::TooManyConnections => "too_many_connections",
            StorageCause::Other => "other",
        }
    }

    /// The SQLite result code of this cause, to hand a failure on as a
    /// `rusqlite::Error` that still says what it was.
    fn sqlite_code(self) -> std::ffi::c_int {
        use rusqlite::ffi;
        match self {
            StorageCause::DiskFull => ffi::SQLITE_FULL,
            StorageCause::Io => ffi::SQLITE_IOERR,
            StorageCause::CannotOpen => ffi::SQLITE_CANTOPEN,
            StorageCause::ReadOnly => ffi::SQLITE_READONLY,
            StorageCause::OutOfMemory => ffi::SQLITE_NOMEM,
            // SQLite has none: its nearest, a connection that cannot open.
            StorageCause::TooManyConnections => ffi::SQLITE_CANTOPEN,
            StorageCause::Other => ffi::SQLITE_ERROR,
        }
    }
}

impl fmt::Display for StorageCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
    }
}

/// A failed write (or read) of a store: its cause, and what the database
/// said, with the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{cause}: {detail}")]
pub struct StorageFailure {
    pub cause: StorageCause,
    /// What the database said, and the file when it is known.
    pub detail: String,
}

impl StorageFailure {
    pub fn new(cause: StorageCause, detail: impl Into<String>) -> StorageFailure {
        StorageFailure { cause, detail: detail.into() }
    }

    /// A SQLite error of the store in `file`.
    pub fn sqlite(e: &rusqlite::Error, file: Option<&str>) -> StorageFailure {
        let detail = match file {
            Some(file) if !file.is_empty() => format!("{e} ({file})"),
            _ => e.to_string(),
        };
        StorageFailure::new(StorageCause::of(e), detail)
    }

    /// A PostgreSQL error, with what the server said.
    pub fn postgres(e: &tokio_postgres::Error) -> StorageFailure {
        let detail = match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        };
        StorageFailure::new(StorageCause::of_postgres(e), detail)
    }

    /// The same failure as a `rusqlite::Error` whose code keeps the cause,
    /// so a store operation can return it and [`StorageCause::of`] still
    /// reads it.
    pub fn to_sqlite(&self, context: &str) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(self.cause.sqlite_code()),
            Some(format!("{context}: {}", self.detail)),
        )
    }
}

/// Reports a storage failure of `store` (the gateway, or a bank by its
/// name): one `tracing` event on [`TRACING_TARGET`], an error naming the
/// cause and the file. The hook for the storage failure metric.
pub fn report(store: &str, failure: &StorageFailure) {
    crate::metrics::STORE.failures.get_or_create(&[("cause", failure.cause.code())]).inc();
    tracing::error!(
        target: TRACING_TARGET,
        store,
        cause = failure.cause.code(),
        error = %failure.detail,
        "storage failure: {}",
        failure.cause
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite_error(code: std::ffi::c_int) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None)
    }

    #[test]
    fn the_machine_s_failures_are_told_from_the_code_s() {
        use rusqlite::ffi;
        assert_eq!(StorageCause::of(&sqlite_error(ffi::SQLITE_FULL)), StorageCause::DiskFull);
        assert_eq!(StorageCause::of(&sqlite_error(ffi::SQLITE_IOERR_FSYNC)), StorageCause::Io);
        assert_eq!(StorageCause::of(&sqlite_error(ffi::SQLITE_IOERR_WRITE)), StorageCause::Io);
        assert_eq!(StorageCause::of(&sqlite_error(ffi::SQLITE_CANTOPEN)), StorageCause::CannotOpen);
        assert_eq!(StorageCause::of(&sqlite_error(ffi::SQLITE_READONLY)), StorageCause::ReadOnly);
        assert_eq!(StorageCause::of(&sqlite_error(ffi::SQLITE_CONSTRAINT)), StorageCause::Other);
        assert_eq!(StorageCause::of(&rusqlite::Error::QueryReturnedNoRows), StorageCause::Other);
        let enospc = std::io::Error::from(std::io::ErrorKind::StorageFull);
        assert_eq!(StorageCause::of_io(&enospc), StorageCause::DiskFull);
        let nomem = sqlite_error(ffi::SQLITE_NOMEM);
        assert_eq!(StorageCause::of(&nomem), StorageCause::OutOfMemory);
        assert!(StorageCause::DiskFull.is_environment());
        assert!(!StorageCause::Other.is_environment());
    }

    #[test]
    fn a_failure_handed_on_keeps_its_cause_and_its_file() {
        let full = StorageFailure::sqlite(&sqlite_error(rusqlite::ffi::SQLITE_FULL), Some("/d/gateway.db"));
        assert_eq!(full.cause, StorageCause::DiskFull);
        assert!(full.to_string().starts_with("disk full: "), "{full}");
        assert!(full.detail.contains("/d/gateway.db"), "{full}");
        let again = full.to_sqlite("the batch failed");
        assert_eq!(StorageCause::of(&again), StorageCause::DiskFull);
        assert!(again.to_string().contains("/d/gateway.db"), "{again}");
    }
}
